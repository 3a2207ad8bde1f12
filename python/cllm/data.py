"""Data for CLLM: token files, corpus preparation and batch loading, in one namespace.

The three jobs live in their own modules; their public names are all importable from here:

- :mod:`cllm.tokenfile`: the token file format (``.bin``), :func:`write_tokens`, :func:`write_token_chunks`,
  :func:`load_tokens`, :class:`TokenFile`;
- :mod:`cllm.corpus`: :func:`read_corpus`, :func:`default_corpus_files`, :func:`prepare` (a corpus into
  ``train.bin``, ``val.bin`` and ``tokenizer.json``) and :func:`source_fingerprint` (what the inputs are now);
- :mod:`cllm.batches`: :class:`BatchLoader` (random, deterministic, shardable ``(x, y)`` windows) and
  :func:`eval_batches` (a fixed sequence for validation, drawn as it is read).
"""

from .batches import BatchLoader, eval_batches
from .corpus import default_corpus_files, prepare, read_corpus, source_fingerprint
from .tokenfile import (FORMAT_VERSION, HEADER_SIZE, MAGIC, NUM_TOKENS_OFFSET, TokenFile, load_tokens, write_token_chunks,
                        write_tokens)
from .errors import MissingFileError

__all__ = [
    "MAGIC",
    "FORMAT_VERSION",
    "HEADER_SIZE",
    "NUM_TOKENS_OFFSET",
    "TokenFile",
    "write_tokens",
    "write_token_chunks",
    "load_tokens",
    "default_corpus_files",
    "read_corpus",
    "prepare",
    "source_fingerprint",
    "BatchLoader",
    "eval_batches",
    "MissingFileError",
]
