"""Data for CLLM: tokenizers, token files, corpus preparation and batch loading, in one namespace.

The jobs live in their own modules; their public names are all importable from here:

- :mod:`cllm.data.tokenizer`: the :class:`Tokenizer` interface, :class:`ByteTokenizer`, :func:`tokenizer_from_json`,
  :func:`load_tokenizer`; :mod:`cllm.data.bpe`: :class:`BPETokenizer`;
- :mod:`cllm.data.tokenfile`: the token file format (``.bin``), :func:`write_tokens`, :func:`write_token_chunks`,
  :func:`load_tokens`, :class:`TokenFile`;
- :mod:`cllm.data.corpus`: :func:`read_corpus`, :func:`default_corpus_files`, :func:`prepare` (a corpus into
  ``train.bin``, ``val.bin`` and ``tokenizer.json``) and :func:`source_fingerprint` (what the inputs are now);
- :mod:`cllm.data.batches`: :class:`BatchLoader` (random, deterministic, shardable ``(x, y)`` windows) and
  :func:`eval_batches` (a fixed sequence for validation, drawn as it is read).
"""

from .batches import BatchLoader, eval_batches
from .bpe import BPETokenizer
from .corpus import default_corpus_files, prepare, read_corpus, source_fingerprint
from .tokenfile import (FORMAT_VERSION, HEADER_SIZE, MAGIC, NUM_TOKENS_OFFSET, TokenFile, load_tokens, write_token_chunks,
                        write_tokens)
from .tokenizer import ByteTokenizer, Tokenizer, load_tokenizer, tokenizer_from_json
from ..errors import MissingFileError

__all__ = [
    "Tokenizer",
    "ByteTokenizer",
    "BPETokenizer",
    "tokenizer_from_json",
    "load_tokenizer",
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
