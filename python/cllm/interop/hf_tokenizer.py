"""Tokenizers in Hugging Face's file layout: read from a transformers directory (tokenizer.json, or vocab.json +
merges.txt, with the special tokens of tokenizer_config.json / special_tokens_map.json), and written so that
transformers' AutoTokenizer loads them. The byte tokenizer is written as the byte-level BPE it equals: 256
tokens, no merges, token i the byte i."""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Dict, List, Optional, Union

from ..errors import MissingFileError
from ..core.files import atomic_write, read_json_object
from ..data.tokenizer import ByteTokenizer, Tokenizer
from ..data.bpe import SPECIAL_ROLES, BPETokenizer

PathLike = Union[str, "os.PathLike[str]"]
GPT2_EOS = "<|endoftext|>"


def _token_text(value) -> Optional[str]:
    """A special token as tokenizer_config.json writes it: a string or {"content": ...}."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) and value else None


def special_tokens_of(directory: Path, hf_tok) -> Dict[str, str]:
    """role -> token text, from tokenizer_config.json or special_tokens_map.json; else GPT-2's <|endoftext|>
    (its BOS and EOS) when the vocabulary has it as a special token."""
    found: Dict[str, str] = {}
    for name in ("special_tokens_map.json", "tokenizer_config.json"):
        spec = read_json_object(directory / name) if (directory / name).is_file() else {}
        for role in SPECIAL_ROLES:
            text = _token_text(spec.get(f"{role}_token"))
            if text is not None:
                found[role] = text
    if not found and hf_tok.token_to_id(GPT2_EOS) is not None:
        found = {"bos": GPT2_EOS, "eos": GPT2_EOS}
    for role, text in found.items():
        if hf_tok.token_to_id(text) is None:
            raise ValueError(f"{directory}: {role}_token {text!r} is not in the tokenizer's vocabulary")
    return found


def tokenizer_from_hf(path: PathLike) -> BPETokenizer:
    """The tokenizer of an HF directory (or a tokenizer.json file): byte-level BPE, lossless."""
    from tokenizers import Tokenizer as HFTokenizer, decoders, models, pre_tokenizers, processors

    path = Path(path)
    directory = path.parent if path.is_file() else path
    file = path if path.is_file() else path / "tokenizer.json"
    vocab, merges = directory / "vocab.json", directory / "merges.txt"
    if file.is_file():
        try:
            hf_tok = HFTokenizer.from_file(str(file))
        except Exception as e:  # the Rust side raises plain Exceptions
            raise ValueError(f"{file}: cannot be read by 'tokenizers': {e}") from None
    elif vocab.is_file() and merges.is_file():
        try:
            hf_tok = HFTokenizer(models.BPE.from_file(str(vocab), str(merges)))
        except Exception as e:
            raise ValueError(f"{vocab} / {merges}: cannot be read as a BPE: {e}") from None
        hf_tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        hf_tok.decoder = decoders.ByteLevel()
        hf_tok.post_processor = processors.ByteLevel(trim_offsets=False)
    else:
        raise MissingFileError(2, "no tokenizer.json (nor vocab.json + merges.txt)", str(directory))
    # the special tokens are named in the files beside a tokenizer.json (not beside a file named otherwise)
    specials = special_tokens_of(directory, hf_tok) if file.name == "tokenizer.json" else {}
    if specials:
        from tokenizers import AddedToken
        hf_tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in set(specials.values())])
    try:
        return BPETokenizer(hf_tok, special_tokens=specials)
    except ValueError as e:
        raise ValueError(f"{file}: {e}") from None


def load_any_tokenizer(path: PathLike) -> Tokenizer:
    """A tokenizer from a file or directory: CLLM's tokenizer.json (as `cllm prepare` writes it), a Hugging Face
    tokenizer.json, or an HF directory (tokenizer.json, or vocab.json + merges.txt)."""
    path = Path(path)
    file = path / "tokenizer.json" if path.is_dir() else path
    if not path.exists():
        raise MissingFileError(2, "tokenizer file or directory not found", str(path))
    if file.is_file():
        if read_json_object(file).get("type") in ("byte", "bpe"):  # CLLM's own format
            from ..data.tokenizer import load_tokenizer
            return load_tokenizer(file)
    return tokenizer_from_hf(path)


def _byte_level_bpe(tokenizer: Tokenizer):
    """The HF tokenizer equal to a CLLM tokenizer: the BPE's own, or for bytes a merge-free byte-level BPE."""
    from tokenizers import Tokenizer as HFTokenizer, decoders, models, pre_tokenizers, processors

    if isinstance(tokenizer, BPETokenizer):
        return HFTokenizer.from_str(tokenizer.hf_tokenizer.to_str())
    if not isinstance(tokenizer, ByteTokenizer):
        raise TypeError(f"cannot export a {type(tokenizer).__name__}")
    # the ByteLevel alphabet maps each byte b to one printable character; CLLM's id is b itself
    vocab = {symbol: b for b, symbol in enumerate(byte_level_symbols())}
    hf_tok = HFTokenizer(models.BPE(vocab=vocab, merges=[]))
    hf_tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    hf_tok.decoder = decoders.ByteLevel()
    hf_tok.post_processor = processors.ByteLevel(trim_offsets=False)
    return hf_tok


def byte_level_symbols() -> List[str]:
    """GPT-2's reversible byte -> printable character table, indexed by byte: printable Latin-1 bytes stand
    for themselves, the others for chr(256 + n) in order."""
    printable = set(range(ord("!"), ord("~") + 1)) | set(range(ord("¡"), ord("¬") + 1)) | \
        set(range(ord("®"), ord("ÿ") + 1))
    table, n = [], 0
    for b in range(256):
        if b in printable:
            table.append(chr(b))
        else:
            table.append(chr(256 + n))
            n += 1
    return table


def hf_tokenizer_files(tokenizer: Tokenizer, model_max_length: int) -> Dict[str, bytes]:
    """{file name: contents} of tokenizer.json, tokenizer_config.json and special_tokens_map.json, the files
    transformers' AutoTokenizer reads."""
    hf_tok = _byte_level_bpe(tokenizer)
    specials = {f"{role}_token": text for role, text in tokenizer.special_tokens.items()}
    config = {"tokenizer_class": "GPT2Tokenizer", "model_max_length": model_max_length,
              "add_prefix_space": False, "clean_up_tokenization_spaces": False, **specials}
    return {"tokenizer.json": hf_tok.to_str(pretty=True).encode("utf-8"),
            "tokenizer_config.json": (json.dumps(config, indent=2) + "\n").encode("utf-8"),
            "special_tokens_map.json": (json.dumps(specials, indent=2) + "\n").encode("utf-8")}


def save_hf_tokenizer(tokenizer: Tokenizer, directory: PathLike, model_max_length: int) -> None:
    """Write hf_tokenizer_files into `directory`, each file atomically."""
    for name, data in hf_tokenizer_files(tokenizer, model_max_length).items():
        atomic_write(Path(directory) / name, lambda f, data=data: f.write(data), what=f"tokenizer's {name}",
                     missing_dir="directory to save the tokenizer in not found")
