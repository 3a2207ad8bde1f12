"""The ecosystem's formats: Hugging Face directories in and out (weights and tokenizers), GGUF for llama.cpp, and
loading a pretrained model from any of CLLM's or Hugging Face's forms."""
from .gguf_export import export_gguf
from .hf import export_hf, from_hf
from .pretrained import load_pretrained

__all__ = ["from_hf", "export_hf", "export_gguf", "load_pretrained"]
