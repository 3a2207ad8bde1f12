"""The `cllm` command line: train, sample, eval, prepare, export.

    cllm train                                  # defaults: ~3 minutes on the Python stdlib, then a sample
    cllm train --config run.toml --lr 1e-3      # flags override the file
    cllm train --resume --out-dir runs/cllm     # continue exactly where last.safetensors stopped
    cllm sample --checkpoint runs/cllm/best.safetensors --prompt "def " --max-new-tokens 200
    cllm sample --checkpoint runs/cllm --stream --stop "\n\n" --num-samples 3 --repetition-penalty 1.2
    cllm eval runs/cllm --data test.txt --json  # loss, perplexity, bits per byte, accuracy
    cllm prepare corpus/ --out data/ --tokenizer bpe --vocab-size 2048
    cllm info                                   # the kernels in use on this CPU, for bug reports

User errors (a bad file, a bad value: USER_ERRORS) and running out of memory print one line to stderr and exit
with status 2.
"""
from __future__ import annotations

import argparse
import dataclasses
import itertools
import re
import sys
from pathlib import Path
from typing import Callable, Dict, List, Optional

from .errors import USER_ERRORS, CLLMError

UINT64_MAX = 2**64 - 1  # seeds are uint64 in the core (core/checks.py's; not imported here: it loads NumPy)

# name -> (help, add_arguments(parser), run(args) -> exit status), in the order `cllm --help` lists them
COMMANDS: Dict[str, tuple] = {}


def register_command(name: str, help: str, add_arguments: Callable, run: Callable) -> None:
    COMMANDS[name] = (help, add_arguments, run)


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line instead of usage + message
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _opt(convert, what):
    def parse(text):
        if text.strip().lower() in ("none", "null", "off", ""):
            return None
        try:
            return convert(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"invalid {what} value: {text!r} (or 'none')") from None
    parse.__name__ = what
    return parse


# ----------------------------------------------------------------------------------------------------
# train
# ----------------------------------------------------------------------------------------------------
def _train_arguments(p: argparse.ArgumentParser) -> None:
    from .train.config import TrainConfig

    p.add_argument("--config", metavar="FILE", help="read settings from a TOML or JSON file (flags override it)")
    for f in dataclasses.fields(TrainConfig):
        kind, choices, default = f.metadata["kind"], f.metadata["choices"], f.default
        shown = default
        if kind == "betas":
            shown = " ".join(str(b) for b in default)
        elif isinstance(default, str):
            shown = repr(default)
        elif default is None:
            shown = "none"
        helptext = f"{f.metadata['help']} (default: {shown})".replace("%", "%%")
        flag = "--" + f.name.replace("_", "-")
        kw = dict(dest=f.name, default=argparse.SUPPRESS, help=helptext)
        if kind == "bool":
            p.add_argument(flag, action=argparse.BooleanOptionalAction, **kw)
        elif kind == "paths":
            p.add_argument(flag, nargs="+", metavar="PATH", **kw)
        elif kind == "opt_path":
            p.add_argument(flag, type=_opt(str, "path"), metavar="PATH", **kw)
        elif kind == "betas":
            p.add_argument(flag, nargs=2, type=float, metavar=("BETA1", "BETA2"), **kw)
        elif kind in ("choice", "str"):
            p.add_argument(flag, choices=choices, metavar="{" + ",".join(choices) + "}" if choices else
                         "DIR" if f.name.endswith("_dir") else "TEXT", **kw)
        else:
            convert = {"int": int, "float": float, "opt_int": _opt(int, "int"),
                       "opt_float": _opt(float, "float")}[kind]
            p.add_argument(flag, type=convert, metavar=kind.replace("opt_", "").upper(), **kw)


def _run_train(args) -> int:
    from .train.checkpoint import read_metadata
    from .train.config import TrainConfig, read_config_file
    from .train.trainer import Trainer

    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    flags = {k: v for k, v in vars(args).items() if k in fields}
    from_file = read_config_file(args.config) if args.config else {}
    settings = {**from_file, **flags}
    source = args.config or "command line"
    if settings.get("resume"):
        # continue with the run's own settings unless the file or the flags change them
        out_dir = settings.get("out_dir", TrainConfig.out_dir)
        last = Path(out_dir) / "last.safetensors"
        if not last.is_file():
            raise CLLMError(f"cannot resume: {last} does not exist (start the run without --resume)")
        saved = read_metadata(last).get("trainer_state", {}).get("train_config", {})
        if not isinstance(saved, dict):
            raise CLLMError(f"cannot resume: {last} holds no valid train_config in its trainer_state")
        saved = {k: v for k, v in saved.items() if k in fields and k != "overwrite"}  # that run's start only
        settings = {**saved, **settings}
    config = TrainConfig.from_dict(settings, source=source)
    from .parallel.mpi import abort_on_error, auto_communicator
    comm = auto_communicator()  # MPICommunicator under `mpirun -n N` (N > 1), else SingleProcess
    with abort_on_error(comm, prog="cllm train"):  # an error on one rank ends the whole job
        summary = Trainer(config, comm=comm).fit()
    if summary["stop_reason"] == "nonfinite":  # the run failed: say so in the exit status, not only in the log
        kept = [p for p in (summary["best_checkpoint"], summary["last_checkpoint"]) if p and Path(p).is_file()]
        where = f"{' and '.join(kept)} hold the last finite weights" if kept else "no checkpoint was written"
        print(f"cllm train: error: stopped at step {summary['steps']} on a non-finite loss or gradient "
              f"(on_nonfinite=stop); {where}", file=sys.stderr)
        return 1
    return 130 if summary["stop_reason"] == "interrupted" else 0


# ----------------------------------------------------------------------------------------------------
# sample
# ----------------------------------------------------------------------------------------------------
def _sample_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint", required=True, metavar="PATH",
                   help="a checkpoint file, or a run directory (its best.safetensors, else last.safetensors)")
    p.add_argument("--prompt", default="", help="text to continue, with backslash escapes as --stop's (default: '', "
                                                "start from a newline)")
    p.add_argument("--max-new-tokens", type=int, default=200, metavar="N", help="tokens to generate (default: 200)")
    p.add_argument("--temperature", type=float, default=0.8, help="sampling temperature, 0 = greedy (default: 0.8)")
    p.add_argument("--top-k", type=_opt(int, "int"), default=None, metavar="K",
                   help="sample among the K most likely tokens (default: none)")
    p.add_argument("--top-p", type=_opt(float, "float"), default=None, metavar="P",
                   help="nucleus sampling: the smallest set of tokens with probability >= P (default: none)")
    p.add_argument("--repetition-penalty", type=float, default=1.0, metavar="R",
                   help="divide the positive logits and multiply the negative ones of tokens already in the prompt "
                        "or the output by R > 0, as transformers does; 1 = off (default: 1.0)")
    p.add_argument("--frequency-penalty", type=float, default=0.0, metavar="F",
                   help="subtract F x (times a token occurs in the output) from its logit (default: 0)")
    p.add_argument("--presence-penalty", type=float, default=0.0, metavar="P",
                   help="subtract P from the logit of every token already in the output (default: 0)")
    p.add_argument("--stop", action="append", default=[], metavar="TEXT",
                   help="end a sample just before TEXT (repeatable); samples also end at the tokenizer's EOS token. "
                        "In --stop and --prompt a backslash escape stands for its character, as in a Python string: "
                        "\\n newline, \\t tab, \\r, \\\\ (a backslash), \\xHH, \\uXXXX, \\UXXXXXXXX; a "
                        "backslash before any other character is kept as it is (stdin lines of --interactive are "
                        "taken literally)")
    p.add_argument("--no-escapes", dest="escapes", action="store_false",
                   help="take --prompt and --stop literally, backslashes included")
    p.add_argument("--ignore-eos", action="store_true", help="do not stop at the tokenizer's EOS token")
    p.add_argument("--num-samples", type=int, default=1, metavar="N",
                   help="samples per prompt, generated together, with seeds SEED, SEED+1, ... (default: 1)")
    p.add_argument("--stream", action="store_true", help="print the text as it is produced (one sample at a time)")
    p.add_argument("--interactive", action="store_true",
                   help="read prompts from stdin, one UTF-8 line each, until end of input (not with --prompt)")
    p.add_argument("--seed", type=int, default=0, help=f"sampling seed, 0 to {UINT64_MAX} (default: 0)")
    p.add_argument("--precision", choices=("fp32", "bf16"), default="fp32",
                   help="bf16: decode with bfloat16 weights and K/V cache (half the bytes per token, faster; tokens "
                        "may differ from fp32's where candidates are close; default: fp32)")
    p.add_argument("--threads", type=_opt(int, "int"), default=None, metavar="N",
                   help="CPU threads (default: OpenMP default)")


_ESCAPE = re.compile(r"\\(?:x[0-9a-fA-F]{2}|u[0-9a-fA-F]{4}|U[0-9a-fA-F]{8}|[ntr\\])")
_SIMPLE = {"n": "\n", "t": "\t", "r": "\r", "\\": "\\"}


def unescape(flag: str, text: str) -> str:
    """text with its backslash escapes (\\n, \\t, \\r, \\\\, \\xHH, \\uXXXX, \\UXXXXXXXX) replaced by their
    characters, as a shell passes them literally; a backslash before any other character stays. CLLMError naming
    the flag for an escape that is no character (a surrogate, beyond U+10FFFF)."""
    def char(m):
        e = m.group()[1:]
        if e in _SIMPLE:
            return _SIMPLE[e]
        code = int(e[1:], 16)
        if code > 0x10FFFF or 0xD800 <= code <= 0xDFFF:
            raise CLLMError(f"{flag}: {m.group()} is not a Unicode character")
        return chr(code)
    return _ESCAPE.sub(char, text)


def _run_sample(args) -> int:
    import math
    from .interop.pretrained import load_pretrained

    if args.escapes:
        args.prompt = unescape("--prompt", args.prompt)
        args.stop = [unescape("--stop", s) for s in args.stop]
    more = max(args.num_samples, 1) - 1  # --num-samples draws seeds SEED to SEED + more
    checks = [(0 <= args.seed <= UINT64_MAX - more,
               f"--seed must be in [0, {UINT64_MAX - more}]" + (f" with --num-samples {args.num_samples} (seeds SEED "
                                                                 f"to SEED + {more})" if more else "") +
               f", got {args.seed}"),(args.max_new_tokens >= 0, "--max-new-tokens must be non-negative"),
              (args.num_samples >= 1, "--num-samples must be at least 1"),
              (math.isfinite(args.temperature) and args.temperature >= 0, "--temperature must be a number >= 0"),
              (math.isfinite(args.repetition_penalty) and args.repetition_penalty > 0,
               "--repetition-penalty must be a number > 0"),
              (math.isfinite(args.frequency_penalty), "--frequency-penalty must be a finite number"),
              (math.isfinite(args.presence_penalty), "--presence-penalty must be a finite number"),
              (all(args.stop), "--stop must not be empty"),
              (not (args.interactive and args.prompt), "--prompt is not used with --interactive (prompts come from "
                                                         "stdin)")]
    for ok, msg in checks:
        if not ok:
            raise CLLMError(msg)
    _set_threads(args.threads)
    model, tokenizer = load_pretrained(args.checkpoint)
    # before the prompts and seeds of --num-samples are built (a huge count fails here, at once)
    model.check_generation_memory(1 if args.stream else args.num_samples, args.max_new_tokens,
                                  decode_precision=args.precision)
    if not args.interactive:
        _print_samples(model, tokenizer, args.prompt, args)
        return 0
    ask = sys.stdin.isatty()
    for number in itertools.count(1):
        if ask:
            print("> ", end="", file=sys.stderr, flush=True)
        line = sys.stdin.buffer.readline()  # bytes: a line that is not UTF-8 is an error, whatever the locale
        if not line:  # end of input
            return 0
        try:
            prompt = line.decode("utf-8").rstrip("\n")
        except UnicodeDecodeError as e:
            raise CLLMError(f"stdin line {number}: not UTF-8 text (byte {e.start})") from None
        _print_samples(model, tokenizer, prompt, args)


def _print_samples(model, tokenizer, prompt: str, args) -> None:
    """--num-samples continuations of one prompt, each printed after the prompt; streamed, or all at the end."""
    from .infer.generation import generate_text

    options = dict(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                   top_p=args.top_p, stop=args.stop, stop_at_eos=not args.ignore_eos,
                   repetition_penalty=args.repetition_penalty, frequency_penalty=args.frequency_penalty,
                   presence_penalty=args.presence_penalty, decode_precision=args.precision)
    if args.stream:  # one sample at a time, printed piece by piece
        for k in range(args.num_samples):
            sys.stdout.write(("---\n" if k else "") + prompt)
            generate_text(model, tokenizer, [prompt], seed=args.seed + k,
                          on_text=lambda _, piece: (sys.stdout.write(piece), sys.stdout.flush()), **options)
            sys.stdout.write("\n")
    else:  # all samples together, printed at the end
        seeds = [args.seed + k for k in range(args.num_samples)]
        texts = generate_text(model, tokenizer, [prompt] * args.num_samples, seed=seeds, **options)
        sys.stdout.write("\n---\n".join(prompt + t for t in texts) + "\n")
    sys.stdout.flush()


# ----------------------------------------------------------------------------------------------------
# eval
# ----------------------------------------------------------------------------------------------------
def _eval_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("checkpoint", metavar="CHECKPOINT",
                   help="a checkpoint file, a run directory (its best, else last, checkpoint) or an HF directory")
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--data", nargs="+", metavar="FILE",
                      help="UTF-8 text files or CLLM token files (.bin): loss, perplexity, bits per byte, accuracy "
                           "and top-5 accuracy over all of them")
    what.add_argument("--choices", metavar="FILE.jsonl",
                      help="multiple choice, one JSON object a line: context, endings (list), label (index); "
                           "accuracy and length-normalised accuracy (acc_norm) as lm-evaluation-harness")
    p.add_argument("--stride", type=int, default=None, metavar="N",
                   help="--data: windows of max_seq_len tokens start every N tokens; each token is predicted once "
                        "from at least max_seq_len - N tokens of context (default: max_seq_len // 2)")
    p.add_argument("--batch-size", type=int, default=None, metavar="N", help="--data: windows per forward (default: 4)")
    p.add_argument("--json", action="store_true",
                   help="print the figures as one JSON object (a figure that is not finite, e.g. the loss of a model "
                        "with NaN weights, as null)")
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True,
                   help="show a progress bar on stderr (default: on)")
    p.add_argument("--threads", type=_opt(int, "int"), default=None, metavar="N",
                   help="CPU threads (default: OpenMP default)")


def _json_figures(figures: dict) -> str:
    """figures as strict JSON: NaN and infinities (which json.dumps writes as the non-JSON NaN, Infinity) as null."""
    import json
    import math

    return json.dumps({k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in figures.items()},
                      allow_nan=False)


def _run_eval(args) -> int:
    from .infer.evaluation import evaluate_choices, evaluate_files
    from .interop.pretrained import load_pretrained

    if args.choices and (args.stride is not None or args.batch_size is not None):
        raise CLLMError("--stride and --batch-size apply to --data only (--choices scores one example at a time)")
    batch_size = 4 if args.batch_size is None else args.batch_size
    if batch_size < 1:
        raise CLLMError(f"--batch-size must be positive, got {batch_size}")
    _set_threads(args.threads)
    model, tokenizer = load_pretrained(args.checkpoint)
    T = model.config.max_seq_len
    if args.stride is not None and not 1 <= args.stride <= T:
        raise CLLMError(f"--stride must be in [1, max_seq_len = {T}], got {args.stride}")
    if args.data:
        figures = evaluate_files(model, tokenizer, args.data, stride=args.stride, batch_size=batch_size,
                                 progress=args.progress)
        text = (f"loss {figures['loss']:.4f}  perplexity {figures['perplexity']:.3f}  bits/byte "
                f"{figures['bits_per_byte']:.4f}  accuracy {figures['accuracy']:.4f}  top-5 "
                f"{figures['top5_accuracy']:.4f}  ({figures['tokens']:,} tokens, {figures['bytes']:,} bytes)")
    else:
        figures = evaluate_choices(model, tokenizer, args.choices, progress=args.progress)
        text = (f"accuracy {figures['accuracy']:.4f}  acc_norm {figures['acc_norm']:.4f}  "
                f"({figures['examples']:,} examples)")
    print(_json_figures(figures) if args.json else text)
    return 0


def _set_threads(threads) -> None:
    from . import set_num_threads

    if threads is not None:
        set_num_threads(threads)


# ----------------------------------------------------------------------------------------------------
# prepare
# ----------------------------------------------------------------------------------------------------
def _prepare_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("inputs", nargs="*", metavar="INPUT",
                   help="text files or directories (none: the Python standard library's .py files)")
    p.add_argument("--out", required=True, metavar="DIR", help="output directory for train.bin, val.bin, "
                                                              "tokenizer.json")
    p.add_argument("--tokenizer", default="byte", metavar="byte|bpe|PATH",
                   help="byte, bpe (trained on the corpus), or an existing tokenizer: a tokenizer.json or a Hugging "
                        "Face directory; documents are then separated by its end-of-text token (default: byte)")
    p.add_argument("--vocab-size", type=int, default=1024, help="BPE vocabulary size (default: 1024)")
    p.add_argument("--val-fraction", type=float, default=0.05, help="validation fraction (default: 0.05)")
    p.add_argument("--seed", type=int, default=0, help="seed of the train/validation split (default: 0)")
    p.add_argument("--max-bytes", type=_opt(int, "int"), default=None, metavar="N",
                   help="use only the first N bytes of the (shuffled) corpus (default: all)")


def _run_prepare(args) -> int:
    from .data import prepare

    if args.tokenizer in ("byte", "bpe"):
        spec = "byte" if args.tokenizer == "byte" else f"bpe:{args.vocab_size}"
    else:
        from .interop.hf_tokenizer import load_any_tokenizer
        spec = load_any_tokenizer(args.tokenizer)
    s = prepare(args.inputs or None, args.out, spec, val_fraction=args.val_fraction, seed=args.seed,
                max_bytes=args.max_bytes)
    print(f"{s['files']} files, {s['bytes']:,} bytes -> {s['train_tokens']:,} train and {s['val_tokens']:,} "
          f"validation tokens ({s['tokenizer']} tokenizer, vocab {s['vocab_size']}) in {s['out_dir']}")
    return 0


# ----------------------------------------------------------------------------------------------------
# export
# ----------------------------------------------------------------------------------------------------
def _export_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("checkpoint", metavar="CHECKPOINT",
                   help="a checkpoint file, a run directory (its best, else last, checkpoint) or an HF directory")
    p.add_argument("--format", required=True, choices=("hf", "gguf"),
                   help="hf: a Hugging Face transformers directory; gguf: a llama.cpp file")
    p.add_argument("--out", required=True, metavar="PATH", help="output directory (hf) or file (gguf)")
    p.add_argument("--dtype", choices=("f32", "f16"), default="f32",
                   help="gguf: weights in float32 or float16 (default: f32)")


def _run_export(args) -> int:
    from .interop.pretrained import load_pretrained

    out = Path(args.out)
    if args.format == "hf" and out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise CLLMError(f"{out}: exists and is not an empty directory (the export would mix with its files)")
    if args.format == "gguf" and out.exists():
        raise CLLMError(f"{out}: exists; give a new file to write (the export does not replace files)")
    if args.format == "hf" and args.dtype != "f32":
        raise CLLMError("--dtype applies to --format gguf only (Hugging Face exports are float32)")
    model, tokenizer = load_pretrained(args.checkpoint)
    if args.format == "hf":
        from .interop.hf import export_hf
        written = export_hf(model, tokenizer, out)
    else:
        from .interop.gguf_export import export_gguf
        written = export_gguf(model, tokenizer, out, dtype=args.dtype)
    print(f"wrote {written} ({args.format}, {model.num_parameters:,} parameters, vocab {tokenizer.vocab_size})")
    return 0


# ----------------------------------------------------------------------------------------------------
# info
# ----------------------------------------------------------------------------------------------------
def _info_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", action="store_true", help="print the fields as one JSON object")


def _run_info(args) -> int:
    import json
    from .core.isa import build_info, format_build_info
    info = build_info()
    print(json.dumps(info) if args.json else format_build_info(info))
    if info["variant"] is None:  # the report is printed whole (for a bug report); the error also goes to stderr
        print(f"cllm info: error: {info['reason']}", file=sys.stderr)
        return 2
    return 0


register_command("train", "train a model (every setting has a default)", _train_arguments, _run_train)
register_command("sample", "generate text from a checkpoint", _sample_arguments, _run_sample)
register_command("eval", "evaluate a model on text files or a multiple-choice task", _eval_arguments, _run_eval)
register_command("prepare", "tokenize a corpus into train.bin / val.bin / tokenizer.json", _prepare_arguments,
                 _run_prepare)
register_command("export", "write a model as a Hugging Face directory or a GGUF file", _export_arguments,
                 _run_export)
register_command("info", "show the kernel variant this CPU runs, bf16, OpenMP and threads", _info_arguments, _run_info)


# ----------------------------------------------------------------------------------------------------
# main
# ----------------------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="cllm", description="CLLM: train and sample small GPT-2-style models on the CPU.")
    from . import __version__
    parser.add_argument("--version", action="version", version=f"cllm {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (help, add_arguments, _) in COMMANDS.items():
        p = sub.add_parser(name, help=help, description=help)
        add_arguments(p)
    return parser


def _one_line(e: BaseException) -> str:
    if isinstance(e, OSError) and e.filename is not None and e.strerror:
        return f"{e.filename}: {e.strerror}"
    text = str(e) or type(e).__name__
    return " ".join(text.split())


def main(argv: Optional[List[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help(sys.stderr)
        return 2
    run = COMMANDS[args.command][2]
    try:
        if args.command != "info":
            from .core.isa import check_kernels
            check_kernels()  # CLLM_ISA asking for kernels this CPU lacks: say so before any work
        return int(run(args) or 0)
    except USER_ERRORS as e:
        print(f"cllm {args.command}: error: {_one_line(e)}", file=sys.stderr)
        return 2
    except MemoryError as e:  # an allocation the memory checks did not foresee (std::bad_alloc, NumPy)
        print(f"cllm {args.command}: error: out of memory{': ' + _one_line(e) if str(e) else ''}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"cllm {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
