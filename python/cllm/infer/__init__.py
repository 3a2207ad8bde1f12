"""Using a model: text generation (batched, streamed, stop strings) and evaluation (loss, perplexity, bits per
byte, scoring, multiple choice)."""
from .evaluation import evaluate_choices, evaluate_files, score
from .generation import generate_text, sample_text

__all__ = ["generate_text", "sample_text", "score", "evaluate_files", "evaluate_choices"]
