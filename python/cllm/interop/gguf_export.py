"""GGUF export (llama.cpp's file format), written with the `gguf` package (llama.cpp's own reader/writer).

Architecture `gpt2`: the hyperparameters llama.cpp's GPT-2 loader reads, tensors under llama.cpp's names, linear
weights stored [out, in] (GPT-2's Conv1D keeps [in, out]; llama.cpp's converter transposes them), the tied
LM head written out as `output.weight`.
Architecture `llama`: llama.cpp's Llama hyperparameters (K/V heads, rope base, RMSNorm epsilon) and names, the
weights as stored ([out, in]) except q and k, whose rows are permuted as llama.cpp's converter does (its rotary
embedding pairs adjacent elements, Hugging Face's pairs the two halves of a head); `output.weight` only when untied
(llama.cpp reuses token_embd otherwise).
Both embed the tokenizer as a `gpt2` BPE (tokens, merges, token types, special ids). The byte tokenizer has no merges, which llama.cpp's loader refuses; it gets one merge of
two NUL bytes into a token that is not in the vocabulary, which text practically never holds.
"""
from __future__ import annotations

import errno
import json
import os
import tempfile
from pathlib import Path
from typing import List, Tuple, Union

import numpy as np

from ..errors import CLLMError, MissingFileError
from ..core.files import _fsync_dir
from ..core.model import Model
from ..data.tokenizer import ByteTokenizer, Tokenizer
from ..data.bpe import BPETokenizer

PathLike = Union[str, "os.PathLike[str]"]
DTYPES = ("f32", "f16")
F16_MAX = float(np.finfo(np.float16).max)  # 65504: a larger weight becomes Inf in float16
_TRANSPOSED = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
_BLOCK_NAMES = {"ln_1": "attn_norm", "attn.c_attn": "attn_qkv", "attn.c_proj": "attn_output", "ln_2": "ffn_norm",
                "mlp.c_fc": "ffn_up", "mlp.c_proj": "ffn_down"}


_LLAMA_BLOCK_NAMES = {"input_layernorm": "attn_norm", "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
                      "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
                      "post_attention_layernorm": "ffn_norm", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
                      "mlp.down_proj": "ffn_down"}


def gguf_name(name: str) -> str:
    """llama.cpp's tensor name of a CLLM parameter ("h.3.mlp.c_fc.weight" -> "blk.3.ffn_up.weight",
    "layers.3.mlp.up_proj.weight" -> "blk.3.ffn_up.weight")."""
    fixed = {"wte": "token_embd.weight", "wpe": "position_embd.weight", "ln_f.weight": "output_norm.weight",
             "ln_f.bias": "output_norm.bias", "embed_tokens.weight": "token_embd.weight",
             "norm.weight": "output_norm.weight", "lm_head.weight": "output.weight"}
    if name in fixed:
        return fixed[name]
    top, layer, rest = name.split(".", 2)
    part, kind = rest.rsplit(".", 1)
    return f"blk.{layer}.{(_LLAMA_BLOCK_NAMES if top == 'layers' else _BLOCK_NAMES)[part]}.{kind}"


def _interleave_rope_rows(w: np.ndarray, heads: int) -> np.ndarray:
    """q_proj / k_proj rows reordered from Hugging Face's rotary layout (pair i = elements i and i + hs/2 of a head)
    to llama.cpp's (pair i = elements 2i and 2i + 1), as convert_hf_to_gguf.py's LlamaModel.permute does."""
    out, inp = w.shape
    return w.reshape(heads, 2, out // heads // 2, inp).swapaxes(1, 2).reshape(out, inp)


def gguf_tensors(model: Model) -> List[Tuple[str, np.ndarray]]:
    """(llama.cpp name, array in llama.cpp's layout) of every tensor, in the order written."""
    params = model.parameters()
    c = model.config
    if c.architecture == "llama":
        out = []
        for name, arr in params.items():
            arr = np.asarray(arr, dtype=np.float32)
            if name.endswith("q_proj.weight"):
                arr = _interleave_rope_rows(arr, c.num_heads)
            elif name.endswith("k_proj.weight"):
                arr = _interleave_rope_rows(arr, c.num_kv_heads)
            out.append((gguf_name(name), np.ascontiguousarray(arr)))
        return out
    if "wpe" not in params:
        params["wpe"] = model.position_table()
    out = []
    for name, arr in params.items():
        arr = np.asarray(arr, dtype=np.float32)
        out.append((gguf_name(name), np.ascontiguousarray(arr.T if name.endswith(_TRANSPOSED) else arr)))
    out.append(("output.weight", np.ascontiguousarray(params["wte"], dtype=np.float32)))  # the tied head
    return out


def _vocab_and_merges(tokenizer: Tokenizer) -> Tuple[List[str], List[str]]:
    if isinstance(tokenizer, BPETokenizer):
        hf_tok = tokenizer.hf_tokenizer
        by_id = {i: t for t, i in hf_tok.get_vocab(with_added_tokens=True).items()}
        merges = json.loads(hf_tok.to_str())["model"].get("merges") or []
        return [by_id[i] for i in range(len(by_id))], [m if isinstance(m, str) else " ".join(m) for m in merges]
    if isinstance(tokenizer, ByteTokenizer):
        from .hf_tokenizer import byte_level_symbols
        nul = byte_level_symbols()[0]
        return byte_level_symbols(), [f"{nul} {nul}"]
    raise TypeError(f"cannot export a {type(tokenizer).__name__} to GGUF")


def export_gguf(model: Model, tokenizer: Tokenizer, path: PathLike, dtype: str = "f32") -> Path:
    """Write `model` and `tokenizer` as a GGUF file for llama.cpp; dtype "f16" halves the 2-D weights. The file is
    written as core.files.atomic_write writes one: whole or not at all, through a temporary file that no planted
    link can redirect; a write error is an OSError naming `path`."""
    try:
        import gguf
    except ImportError:
        raise CLLMError('GGUF export needs the gguf package (llama.cpp\'s writer): pip install "cllm[interop]"') from None
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {DTYPES}, got {dtype!r}")
    c = model.config
    tokens, merges = _vocab_and_merges(tokenizer)
    if len(tokens) > c.vocab_size:
        raise ValueError(f"the tokenizer has {len(tokens)} tokens, more than the model's vocab_size {c.vocab_size}")
    tensors = gguf_tensors(model)
    for name, arr in tensors:
        if not np.isfinite(arr).all():
            raise ValueError(f"cannot export: tensor {name} holds NaN or Inf")
        if dtype == "f16" and arr.ndim == 2 and arr.size and np.abs(arr).max() > F16_MAX:
            raise ValueError(f"cannot export as f16: tensor {name} holds {np.abs(arr).max():g} in magnitude, beyond "
                             f"float16's largest {F16_MAX:g} (it would become Inf); export with --dtype f32")
    path = Path(path)
    if not path.parent.is_dir():
        raise MissingFileError(2, "directory to write the GGUF file in not found", str(path.parent))
    # mkstemp: created O_EXCL under an unpredictable name, so the writer's reopening of that name by path finds
    # this new file, never a link planted in advance (a fixed name such as ".m.gguf.tmp<pid>" could be one)
    try:
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as e:  # a read-only directory, a full disk: named by the file asked for, not the temporary one
        raise _naming(e, path) from None
    w = None
    try:
        w = gguf.GGUFWriter(tmp, arch=c.architecture)
        _add_fields(gguf, w, model, tokenizer, tokens, merges, dtype)
        for name, arr in tensors:
            w.add_tensor(name, (arr.astype(np.float16) if dtype == "f16" and arr.ndim == 2 else arr).view(_Written))
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
        if not os.path.samestat(os.fstat(fd), os.lstat(tmp)):
            raise CLLMError(f"{tmp}: the temporary file was replaced by another process; {path} is not written")
        os.fsync(fd)
        os.fchmod(fd, 0o644)
        os.replace(tmp, path)
    except BaseException as e:
        _discard(w, tmp)
        if isinstance(e, OSError) and e.filename is None:  # e.g. a full disk: the error names no file by itself
            raise _naming(e, path) from e
        raise
    finally:
        os.close(fd)
    _fsync_dir(path.parent)
    return path


class _Written(np.ndarray):
    """A tensor gguf's writer writes with file.write, whose error says why (ENOSPC: "No space left on device"),
    instead of ndarray.tofile, whose short write says only "1024 requested and 776 written"."""

    def tofile(self, f, *args, **kwargs):
        f.write(memoryview(np.ascontiguousarray(self)).cast("B"))


def _discard(w, tmp: str) -> None:
    """Close the writer (its buffered bytes may meet the same full disk) and remove the temporary file."""
    try:
        if w is not None:
            w.close()
    except OSError:
        pass
    try:
        os.unlink(tmp)
    except OSError:
        pass


def _naming(e: OSError, path: Path) -> OSError:
    """`e` as an OSError naming the GGUF file; a short write with no errno is most likely a full disk: said so."""
    if e.errno is not None:
        return OSError(e.errno, f"cannot write the GGUF file: {e.strerror or e}", str(path))
    return OSError(errno.EIO, f"cannot write the GGUF file: {e} (is the disk full?)", str(path))


def _add_fields(gguf, w, model: Model, tokenizer: Tokenizer, tokens: List[str], merges: List[str], dtype: str):
    """The hyperparameters and the tokenizer, as llama.cpp's loader reads them."""
    c = model.config
    w.add_name(f"cllm-{c.architecture}")
    w.add_context_length(c.max_seq_len)
    w.add_embedding_length(c.embedding_dim)
    w.add_feed_forward_length(c.ff_dim)
    w.add_block_count(c.num_layers)
    w.add_head_count(c.num_heads)
    if c.architecture == "llama":
        w.add_head_count_kv(c.num_kv_heads)
        w.add_rope_freq_base(c.rope_theta)
        w.add_rope_dimension_count(c.head_dim)
        w.add_layer_norm_rms_eps(c.rms_norm_eps)
        w.add_vocab_size(c.vocab_size)
    else:
        w.add_layer_norm_eps(1e-5)
    w.add_file_type(gguf.LlamaFileType.MOSTLY_F16 if dtype == "f16" else gguf.LlamaFileType.ALL_F32)
    # the embedding may have more rows than the tokenizer has tokens: the rest are unused placeholders
    tokens = tokens + [f"[PAD{i}]" for i in range(len(tokens), c.vocab_size)]
    special = set(tokenizer.special_ids.values())
    types = [gguf.TokenType.CONTROL if i in special else
             gguf.TokenType.UNUSED if i >= tokenizer.vocab_size else gguf.TokenType.NORMAL for i in range(len(tokens))]
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("gpt-2")
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(merges)
    for role, token_id in tokenizer.special_ids.items():
        getattr(w, f"add_{role}_token_id")(token_id)
    w.add_add_bos_token(False)
