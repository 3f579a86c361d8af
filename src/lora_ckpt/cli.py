"""The ``lora-ckpt`` command line: parses arguments, makes one call to the public API, prints the result.

Exit codes: 0 success; 1 a failed operation (one line naming the file or key and the fix; ``--debug``
for the traceback); 2 usage; 130 / 143 interrupted by SIGINT / SIGTERM (outputs cleaned up, inputs
untouched). Torch is imported only by the commands that need it, so ``--help`` and ``--version`` are quick.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import json
import logging
import os
import re
import signal
import sys
import tempfile
import threading
from collections import Counter
from collections.abc import Sequence
from typing import Any

from lora_ckpt._version import __version__
from lora_ckpt.dtypes import DTYPE_NAMES as _DTYPES

_LAYOUT_NAMES = ("standard", "nanogpt", "nanogpt_lora", "peft", "torchtune", "loralib", "minlora", "kohya")


class Interrupted(BaseException):
    """A signal asked the command to stop; carries the exit code (128 + the signal number)."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.code = 128 + signum


def _parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show tracebacks")
    p = argparse.ArgumentParser(prog="lora-ckpt", description="Portable checkpoints between standard and LoRA layouts.",
                                parents=[common])
    p.add_argument("--version", action="version", version=f"lora-ckpt {__version__}")
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("inspect", parents=[common],
                       help="show a checkpoint's layout, modules, ranks, alpha, dtypes, sizes, ties")
    s.add_argument("path", help="a checkpoint file, a Hugging Face model folder, a PEFT adapter folder or a Hub id "
                   "(org/name, hf://org/name@revision; needs the [hub] extra)")
    s.add_argument("--json", action="store_true", help="machine-readable output")
    s.add_argument("--all", action="store_true",
                   help="one row per module (default: one row per layer pattern when there are many)")
    _add_kinds(s)

    s = sub.add_parser(
        "merge", parents=[common],
        help="merge a LoRA checkpoint (SRC DST) or an adapter into its base (BASE ADAPTER DST) into a standard one",
        description="SRC DST: merge a LoRA checkpoint, or a PEFT adapter folder into the base model its "
        "adapter_config.json names (base_model_name_or_path). BASE ADAPTER DST: merge an adapter (PEFT folder, kohya "
        "or any LoRA file) into a base model (file, Hugging Face folder or Hub id); DST is a file "
        "(.safetensors/.pt/.bin) or a model folder.",
        usage="lora-ckpt merge [options] SRC DST | BASE ADAPTER DST",
    )
    s.add_argument("paths", nargs="+", metavar="PATH", help="SRC DST, or BASE ADAPTER DST")
    _add_common(s)
    s.add_argument("--max-shard-size", metavar="SIZE", type=_size, help="shard a folder output, e.g. 5GB")
    s.add_argument("--device", type=_device, help="merge on this device: cpu (default) or cuda[:N]")
    s.add_argument("--quiet", action="store_true", help="no progress bar")
    s.add_argument("--json", action="store_true", help="print the result (or the error) as JSON")
    s.add_argument("--dtype", choices=sorted(_DTYPES), help="dtype of the output's floating-point tensors")
    s.add_argument("--tied", choices=("untie", "tie"), default="untie",
                   help="when an update lands on a tied weight: keep exact function (untie) or tie to merged")
    s.add_argument("--format", choices=("auto", "dcp"), default="auto",
                   help="dcp: write DST as a torch.distributed.checkpoint directory (default: by DST's name)")
    _add_orientation(s)
    _add_kinds(s)

    s = sub.add_parser("convert", parents=[common], help="convert a checkpoint or adapter to another layout")
    s.add_argument("src", help="a checkpoint file or a PEFT adapter folder")
    s.add_argument("dst", help="a file, or a folder for --to peft")
    s.add_argument("--to", required=True, choices=_LAYOUT_NAMES,
                   help="the target layout (nanogpt and nanogpt_lora are the same: nanoGPT's LoRALinear keys)")
    s.add_argument("--like", metavar="TEMPLATE", help="give a standard SRC the LoRA layout of this checkpoint")
    s.add_argument("--base", metavar="BASE", help="base weights for an adapter-only SRC (file or HF folder)")
    s.add_argument("--base-out", metavar="PATH", help="where base weights go when the target keeps them apart")
    s.add_argument("--gpt2", action="store_true", help="nanoGPT <-> Hugging Face GPT-2 (Conv1D weights transposed)")
    s.add_argument("--n-head", type=_positive, help="attention heads, for the GPT-2 config.json (default: model_args)")
    s.add_argument("--seed", type=int, default=0, help="seed for fresh LoRA factors (--like)")
    s.add_argument("--ignore", metavar="GLOB", action="append", default=[],
                   help="with --like: keys that need not be used or supplied, e.g. '*.attn.bias' (repeatable)")
    s.add_argument("--max-shard-size", metavar="SIZE", type=_size, help="shard a --base-out folder, e.g. 5GB")
    s.add_argument("--format", choices=("auto", "dcp"), default="auto",
                   help="dcp (with --to standard): write DST as a torch.distributed.checkpoint directory")
    s.add_argument("--quiet", action="store_true", help="no progress bar")
    s.add_argument("--json", action="store_true", help="print the result (or the error) as JSON")
    _add_common(s)
    _add_orientation(s)
    _add_kinds(s)

    _add_lowrank_commands(sub, common)

    s = sub.add_parser("demo", parents=[common],
                       help="train a tiny nanoGPT LoRA model, convert it both ways, check outputs match",
                       description="Trains a tiny nanoGPT with LoRA (rank 4 on c_attn, rank 2 on the tied wte) for "
                       "a few steps, saves it, merges it to a standard file, converts that back to the LoRA layout, "
                       "reloads every file into a fresh model and checks that the outputs match. Takes seconds.")
    s.add_argument("--out", metavar="DIR", help="keep the files in DIR (default: a temporary folder, removed after)")
    s.add_argument("--steps", type=_positive, default=20, help="training steps (default: 20)")
    s.add_argument("--json", action="store_true", help="print the steps and their results (or the error) as JSON")
    return p


def _size(text: str) -> int:
    from lora_ckpt.streaming.writer import parse_size

    try:
        return parse_size(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _device(text: str) -> str:
    if not re.fullmatch(r"cpu|cuda(:\d+)?", text):
        raise argparse.ArgumentTypeError(f"{text!r} is not a device lora-ckpt merges on; use cpu or cuda[:N]")
    return text


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"{text} is not a positive integer")
    return value


def _finite(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if value != value or value in (float("inf"), float("-inf")):
        raise argparse.ArgumentTypeError(f"{text} is not a finite number")
    return value


def _add_kinds(s: argparse.ArgumentParser) -> None:
    s.add_argument("--kinds", metavar="[MODULE=]KIND", type=_kind, action="append", default=[],
                   help="linear or embedding, for LoRA factors whose square shapes fit both (loralib's): "
                   "MODULE=KIND for one module (it beats the bare KIND), KIND alone for every such module "
                   "(repeatable); files lora-ckpt wrote record each module's kind and need none (a --kinds that "
                   "contradicts the record, or a kind the keys or shapes decide, is refused)")


def _kinds(args: argparse.Namespace) -> dict[str, str] | None:
    """``--kinds`` as detect_layout's mapping (:func:`main` has refused contradictions)."""
    return dict(args.kinds) or None


def _kinds_problem(args: argparse.Namespace) -> str | None:
    """A module (or the bare KIND) given two different kinds: a usage error."""
    seen: dict[str, str] = {}
    for name, kind in getattr(args, "kinds", []):
        if seen.setdefault(name, kind) != kind:
            which = "the bare KIND" if name == "*" else name
            return (f"--kinds gives {which} two kinds ({seen[name]} and {kind}); give each once "
                    "(MODULE=KIND beats the bare KIND)")
    return None


def _kind(text: str) -> tuple[str, str]:
    name, _, kind = text.rpartition("=")
    if kind not in ("linear", "embedding") or (not name and "=" in text):
        raise argparse.ArgumentTypeError(f"{text!r}: give linear or embedding, or MODULE=linear / MODULE=embedding")
    return name or "*", kind


def _add_orientation(s: argparse.ArgumentParser) -> None:
    s.add_argument("--fan-in-fan-out", action=argparse.BooleanOptionalAction, default=None,
                   help="the 2-d weights are stored (in, out) as GPT-2's Conv1D keeps them (or not: nn.Linear); "
                   "needed where no config.json of the model records the layer types and the shapes cannot tell")


def _add_common(s: argparse.ArgumentParser) -> None:
    s.add_argument("--alpha", type=_finite, help="the LoRA alpha, when the file does not record it")
    s.add_argument("--force", action="store_true",
                   help="replace the output if it exists (only a file, or a folder holding only model files)")


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line with ``argv`` (default ``sys.argv[1:]``) and return the exit code."""
    parser = _parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:
        return int(e.code or 0)
    problem = _kinds_problem(args)
    if problem is not None:
        print(f"lora-ckpt {args.command}: error: {problem}", file=sys.stderr)
        return 2
    debug = getattr(args, "debug", False)
    _log_to_stderr()
    previous: dict[int, Any] = {}
    from lora_ckpt.output import installed

    done_before = len(installed())
    try:
        _on_signals(_COMMAND_MODULES.get(args.command, ()), previous)
        return {"inspect": _inspect, "merge": _merge, "convert": _convert, "demo": _demo, "extract": _extract,
                "resize": _resize, "combine": _combine, "unmerge": _unmerge}[args.command](args)
    except (Interrupted, KeyboardInterrupt) as e:
        written = installed()[done_before:]
        if written and args.command in ("merge", "convert", "extract", "resize", "combine", "unmerge"):  # the outputs were complete when the signal came
            print(f"lora-ckpt: interrupted after writing {', '.join(map(str, written))}, which is complete",
                  file=sys.stderr)
            return 0
        print(_INTERRUPTED, file=sys.stderr)
        return e.code if isinstance(e, Interrupted) else 130
    except BrokenPipeError:
        _quiet_stdout()  # the reader went away (`| head`): nothing more to say
        return 141
    except Exception as e:
        from lora_ckpt.errors import LoraCkptError

        if debug or not isinstance(e, (LoraCkptError, OSError)):
            raise
        if getattr(args, "json", False):
            print(json.dumps({"ok": False, "error": _one_line(e), "kind": type(e).__name__}))
        else:
            print(f"lora-ckpt: error: {_one_line(e)}", file=sys.stderr)
        return 1
    finally:
        _restore_signals(previous)


_INTERRUPTED = "lora-ckpt: interrupted; what was not finished was removed, and the inputs are unchanged"


def run() -> None:
    """The console script: :func:`main`, then exit without letting a late Ctrl-C print a traceback at shutdown."""
    code = main()
    with contextlib.suppress(ValueError):  # the work is done: shutting down (torch's takes a while) is not interrupted
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    sys.exit(code)


# Library messages name the Python argument (or call) with its flag beside it, ``alpha=<float> (CLI: --alpha A)``,
# ``merge_files(BASE, DST, adapter=ADAPTER) (CLI: merge BASE ADAPTER DST)``; the command line shows the flag alone.
_PYTHON_HINT = re.compile(r"\b\w+(?:=[^\s,;()]*(?: \([^()]*\))?|\([^()]*\))? \(CLI: ([^)]*)\)")


def _one_line(e: Exception) -> str:
    if not isinstance(e, OSError) or isinstance(e, BrokenPipeError):
        return _PYTHON_HINT.sub(r"\1", str(e))
    where = f"{e.filename}: " if e.filename else ""
    hint = {
        errno.ENOSPC: "no space left on the device; free some space or write elsewhere",
        errno.EDQUOT: "disk quota exceeded; free some space or write elsewhere",
        errno.EROFS: "read-only file system; write elsewhere",
        errno.EACCES: "permission denied; check the permissions or write elsewhere",
        errno.EPERM: "operation not permitted; check the permissions or write elsewhere",
        errno.EFBIG: "file too large for this file system; write a sharded folder (--max-shard-size) or elsewhere",
        errno.EIO: "input/output error; check the disk",
    }.get(e.errno or 0, e.strerror or str(e))
    return f"{where}{hint} (nothing was written; the inputs are unchanged)"


def _log_to_stderr() -> None:
    """Warnings of the library (e.g. leftovers of an interrupted run cleaned up) go to stderr as one line each."""
    logger = logging.getLogger("lora_ckpt")
    if not any(getattr(h, "_lora_ckpt_cli", False) for h in logger.handlers):
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("lora-ckpt: %(message)s"))
        handler._lora_ckpt_cli = True  # type: ignore[attr-defined]
        handler.setLevel(logging.WARNING)
        logger.addHandler(handler)


# What each command imports (torch among it) before its signal handlers go up: an exception raised inside
# torch's own import machinery is swallowed or aborts the process, so signals wait until the imports are done.
_COMMAND_MODULES = {**{c: ("lora_ckpt.lowrank_files",) for c in ("extract", "resize", "combine", "unmerge")},
                    "inspect": ("lora_ckpt.source", "lora_ckpt.layout"), "merge": ("lora_ckpt.files",),
                    "convert": ("lora_ckpt.files",), "demo": ("lora_ckpt.demo",)}


def _on_signals(modules: Sequence[str], previous: dict[int, Any]) -> None:
    """Import ``modules`` with SIGINT/SIGTERM held, then make those signals raise :class:`Interrupted` in the main
    thread (so cleanup runs); the old handlers go into ``previous``."""
    import importlib

    def stop(signum: int, frame: object) -> None:
        raise Interrupted(signum)

    held = {signal.SIGTERM, signal.SIGINT}
    main_thread = threading.current_thread() is threading.main_thread()
    if not main_thread:  # main() called from a worker thread: leave signals alone
        for name in modules:
            importlib.import_module(name)
        return
    mask = signal.pthread_sigmask(signal.SIG_BLOCK, held) if hasattr(signal, "pthread_sigmask") else None
    try:
        for name in modules:
            importlib.import_module(name)
        for sig in held:
            previous[sig] = signal.signal(sig, stop)
    finally:
        if mask is not None:
            signal.pthread_sigmask(signal.SIG_SETMASK, mask)  # a signal that came meanwhile is delivered now


def _restore_signals(previous: dict[int, Any]) -> None:
    for sig, handler in previous.items():
        signal.signal(sig, handler)


def _quiet_stdout() -> None:
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):
        pass


def _dtype(name: str | None) -> Any:
    from lora_ckpt.dtypes import as_dtype

    return as_dtype(name)


def _inspect(args: argparse.Namespace) -> int:
    from lora_ckpt.source import Source

    with Source.open(args.path) as source:
        ckpt = source.load()
        if source.kind == "peft":  # the scales are its config's: PEFT's alpha per module, as merges use them
            from lora_ckpt.formats.peft import load_peft_adapter

            peft = load_peft_adapter(source)
            ranks = {m.name: m.rank for m in peft.layout.modules if m.has_factors}
            alphas = {n: s * (ranks[n] ** 0.5 if peft.settings and peft.settings.use_rslora else ranks[n])
                      for n, s in peft.scales.items()}
            ckpt.alpha, ckpt.alpha_source = alphas, "adapter_config.json" + (", rsLoRA" if peft.settings and
                                                                                peft.settings.use_rslora else "")
    layout = ckpt.detect(kinds=_kinds(args))  # with the kinds the file records
    sd = ckpt.state_dict
    unique = {id(t): t for t in sd.values()}.values()
    info = {
        "path": str(args.path),
        "layout": layout.kind,
        "prefix": layout.prefix,
        "alpha": ckpt.alpha,
        "alpha_source": ckpt.alpha_source,
        "tensors": len(sd),
        "parameters": sum(t.numel() for t in unique),
        "bytes": sum(t.numel() * t.element_size() for t in unique),
        "dtypes": dict(Counter(str(t.dtype).replace("torch.", "") for t in sd.values())),
        "modules": layout.rows(grouped=False),
        "module_groups": layout.rows(grouped=True),
        "tied": [list(g) for g in layout.tied],
        "other_entries": sorted(map(str, ckpt.extra)),
    }
    if args.json:
        print(json.dumps(info, indent=2, default=str, allow_nan=False))
        return 0
    print(f"{args.path}: {layout.summary()}")
    alpha = "unknown (pass --alpha to merge)" if ckpt.alpha is None else f"{_alpha_text(ckpt.alpha)} ({ckpt.alpha_source})"
    if layout.is_lora:
        print(f"alpha: {alpha}")
    print(f"parameters: {info['parameters']:,}  bytes: {info['bytes']:,}  dtypes: {info['dtypes']}")
    if ckpt.extra:
        print(f"other entries: {', '.join(sorted(map(str, ckpt.extra)))}")
    if layout.modules:
        from lora_ckpt._table import render_text

        rows = layout.rows(grouped=False if args.all else None)
        print(render_text(rows))
        if len(rows) < len(layout.modules):
            print(f"({len(layout.modules)} modules in {len(rows)} layer patterns; --all lists each)")
    return 0


def _alpha_text(alpha: float | dict[str, float]) -> str:
    if isinstance(alpha, dict):
        values = set(alpha.values())
        return f"{values.pop():g}" if len(values) == 1 else json.dumps(alpha)
    return f"{alpha:g}"


def _merge(args: argparse.Namespace) -> int:
    if len(args.paths) not in (2, 3):
        print("lora-ckpt merge: error: give SRC DST, or BASE ADAPTER DST", file=sys.stderr)
        return 2
    from lora_ckpt.files import merge_files

    from lora_ckpt.streaming.parallel import Ranks

    *inputs, dst = args.paths
    source, adapter = (inputs[0], inputs[1]) if len(inputs) == 2 else (inputs[0], None)
    if adapter is None and os.path.isfile(os.path.join(dst, "adapter_config.json")):
        print(f"lora-ckpt merge: error: {dst} is a PEFT adapter folder, not an output; to merge it into {source} "
              "name the output too: merge BASE ADAPTER DST", file=sys.stderr)
        return 2
    ranks = Ranks.from_env()  # under torchrun: every rank writes its share of the shards
    try:
        result = merge_files(source, dst, adapter=adapter, alpha=args.alpha, dtype=_dtype(args.dtype), tied=args.tied,
                             max_shard_size=args.max_shard_size, device=args.device, progress=not args.quiet,
                             overwrite=args.force, fan_in_fan_out=args.fan_in_fan_out, format=args.format, ranks=ranks,
                             kinds=_kinds(args))
    finally:
        if ranks is not None:
            import torch.distributed as dist

            dist.destroy_process_group()
    return _report(result, args) if ranks is None or ranks.rank == 0 else 0


def _report(result: Any, args: argparse.Namespace) -> int:
    """Print a file operation's result: its summary (warnings to stderr), or JSON with ``--json``."""
    if args.json:
        print(json.dumps({"ok": True, **result.to_dict()}, indent=2, allow_nan=False))
        return 0
    print(result)
    for line in result.warnings:
        print(f"lora-ckpt: warning: {line}", file=sys.stderr)
    return 0


def _convert(args: argparse.Namespace) -> int:
    from lora_ckpt.files import convert_files

    if args.to == "peft" and args.gpt2 and not args.base_out:
        print("lora-ckpt convert: error: --to peft --gpt2 needs --base-out DIR (the GPT-2 model folder) and --n-head "
              "(or model_args['n_head'] in the checkpoint)", file=sys.stderr)
        return 2
    if args.ignore and not args.like:
        print("lora-ckpt convert: error: --ignore applies to --like TEMPLATE (keys the template's model has no place "
              "for); other conversions keep every key", file=sys.stderr)
        return 2
    result = convert_files(args.src, args.dst, to=args.to, like=args.like, base=args.base, base_out=args.base_out,
                           gpt2=args.gpt2, n_head=args.n_head, alpha=args.alpha, seed=args.seed, ignore=args.ignore,
                           max_shard_size=args.max_shard_size, progress=not args.quiet, overwrite=args.force,
                           fan_in_fan_out=args.fan_in_fan_out, format=args.format, kinds=_kinds(args))
    return _report(result, args)


def _demo(args: argparse.Namespace) -> int:
    from lora_ckpt.demo import DemoStep, run_demo

    def show(s: DemoStep) -> None:
        if not args.json:
            print(f"[{'ok' if s.ok else 'MISMATCH'}] {s.name}: {s.path.name}, max |Δlogits| = {s.max_abs_diff:.2e}")

    if not args.json:
        print("lora-ckpt demo: tiny nanoGPT, LoRA rank 4 on c_attn and rank 2 on the tied wte, alpha 8")
    if args.out:
        steps = run_demo(args.out, steps=args.steps, on_step=show)
    else:
        with tempfile.TemporaryDirectory() as tmp:
            steps = run_demo(tmp, steps=args.steps, on_step=show)
    ok = all(s.ok for s in steps)
    if args.json:
        rows = [{"name": s.name, "file": s.path.name if not args.out else str(s.path), "ok": s.ok,
                 "max_abs_diff": s.max_abs_diff} for s in steps]
        print(json.dumps({"ok": ok, "steps": rows}, indent=2, allow_nan=False))
    else:
        print("all outputs match" if ok else "some outputs differ")
    return 0 if ok else 1



def _add_lowrank_commands(sub: Any, common: argparse.ArgumentParser) -> None:
    """The subcommands of low-rank surgery: extract, resize, combine, unmerge."""
    s = sub.add_parser("extract", parents=[common], help="extract a LoRA adapter from a full fine-tune: BASE TUNED OUT",
                       description="Per module ΔW = TUNED − BASE, truncated SVD, factors written as a PEFT adapter "
                       "folder (default) that PEFT loads onto BASE. Changed tensors that are not factored go to "
                       "modules_to_save; unchanged ones are not saved.")
    s.add_argument("base", help="the base model (file or Hugging Face folder, sharded too)")
    s.add_argument("tuned", help="the fine-tuned model, same architecture")
    s.add_argument("out", help="a folder (PEFT) or a .safetensors file (--to kohya)")
    _add_rank_rule(s)
    s.add_argument("--to", choices=("peft", "kohya"), default="peft", help="the adapter's layout (default: peft)")
    s.add_argument("--modules", metavar="REGEX", help="factor only modules whose name this regex finds")
    s.add_argument("--others", choices=("save", "report"), default="save",
                   help="changed tensors that are not factored: into modules_to_save (default) or only reported")
    s.add_argument("--full-svd", action="store_true", help="exact SVD of every ΔW instead of the randomized one")
    s.add_argument("--oversample", type=_positive, default=8, help="randomized SVD: extra columns (default 8)")
    s.add_argument("--niter", type=int, default=2, help="randomized SVD: power iterations (default 2)")
    s.add_argument("--dtype", choices=sorted(_DTYPES), help="dtype of the factors (default: the tuned weights')")
    s.add_argument("--kinds", metavar="[MODULE=]KIND", type=_kind, action="append", default=[],
                   help="linear or embedding: the layer type of a 2-d weight of the base (MODULE=KIND; KIND alone for "
                   "every other one), needed only where transformers cannot build the model from config.json")
    s.add_argument("--acc", choices=("fp32", "fp64"), help="dtype the differences and SVDs are computed in (default "
                   "fp32; fp64 for float64 weights)")
    s.add_argument("--device", type=_device, help="run the SVDs on this device: cpu (default) or cuda[:N]")
    s.add_argument("--quiet", action="store_true", help="no progress bar")
    s.add_argument("--json", action="store_true", help="print the result (or the error) as JSON")
    s.add_argument("--force", action="store_true", help="replace OUT if it exists")
    _add_orientation(s)

    s = sub.add_parser("resize", parents=[common], help="change an adapter's rank: ADAPTER OUT",
                       description="Best rank-R approximation of each module's scaled update, via QR of the factors "
                       "and an SVD of the small core (B@A is never formed); exact when R ≥ the rank.")
    s.add_argument("adapter", help="a PEFT adapter folder or a LoRA checkpoint file")
    s.add_argument("out", help="a folder (PEFT input) or a file")
    _add_rank_rule(s)
    s.add_argument("--json", action="store_true", help="print the result (or the error) as JSON")
    _add_common(s)

    s = sub.add_parser("combine", parents=[common], help="combine adapters into one: A1 A2 … OUT",
                       description="The weighted sum of the adapters' updates: exact (ranks concatenated), or "
                       "compressed to --rank / --energy.")
    s.add_argument("paths", nargs="+", metavar="PATH", help="A1 A2 … OUT")
    s.add_argument("--weights", type=_finite, nargs="+", metavar="W", help="one weight per adapter (default 1 each)")
    s.add_argument("--base-model", metavar="NAME", help="PEFT adapters naming different base models: combine them "
                   "anyway, recording NAME as the base")
    _add_rank_rule(s)
    s.add_argument("--json", action="store_true", help="print the result (or the error) as JSON")
    _add_common(s)

    s = sub.add_parser("unmerge", parents=[common], help="take an adapter back out of merged weights: MERGED ADAPTER OUT",
                       description="W − scale·ΔW accumulated in float32/64 and rounded once; refused when the adapter "
                       "does not fit the weights.")
    s.add_argument("merged", help="the merged model (file or Hugging Face folder)")
    s.add_argument("adapter", help="the adapter that was merged (PEFT folder or LoRA file)")
    s.add_argument("out", help="a file (.safetensors/.pt) or a model folder")
    s.add_argument("--base", metavar="BASE", help="the original base, when known: report the largest error against it")
    s.add_argument("--dtype", choices=sorted(_DTYPES), help="dtype of the output's floating-point tensors")
    s.add_argument("--json", action="store_true", help="print the result (or the error) as JSON")
    _add_common(s)
    _add_orientation(s)


def _fraction(text: str) -> float:
    value = _finite(text)
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"{text} is not in (0, 1]")
    return value


def _nonnegative(text: str) -> float:
    value = _finite(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text} is negative; give a number ≥ 0")
    return value


def _add_rank_rule(s: argparse.ArgumentParser) -> None:  # ranges checked here: a bad value is a usage error (exit 2)
    s.add_argument("--rank", type=_positive, help="keep at most R singular values per module")
    s.add_argument("--energy", type=_fraction, metavar="E", help="keep the fewest with Σσ²_kept ≥ E·Σσ² (0 < E ≤ 1)")
    s.add_argument("--sv-epsilon", type=_nonnegative, metavar="S", help="keep the singular values above S "
                   "(absolute); a module with none above S is left out (reported)")
    s.add_argument("--sv-ratio", type=_fraction, metavar="T", help="keep the singular values ≥ T·σ_max (0 < T ≤ 1)")


def _rule(args: argparse.Namespace) -> dict[str, Any]:
    return {"rank": args.rank, "energy": args.energy, "sv_epsilon": args.sv_epsilon, "sv_ratio": args.sv_ratio}


def _no_rule(args: argparse.Namespace) -> bool:
    if any(v is not None for v in _rule(args).values()):
        return False
    print(f"lora-ckpt {args.command}: error: say how to choose the rank: --rank R, --energy E, --sv-epsilon S or "
          "--sv-ratio T", file=sys.stderr)
    return True


def _extract(args: argparse.Namespace) -> int:
    if _no_rule(args):
        return 2
    from lora_ckpt.lowrank_files import extract_files

    result = extract_files(args.base, args.tuned, args.out, **_rule(args), modules=args.modules, to=args.to,
                           others=args.others, svd="full" if args.full_svd else "auto", oversample=args.oversample,
                           niter=args.niter, dtype=_dtype(args.dtype), acc=args.acc, device=args.device,
                           kinds=_kinds(args),  # type: ignore[arg-type]
                           fan_in_fan_out=args.fan_in_fan_out, progress=not args.quiet, overwrite=args.force)
    return _report(result, args)


def _resize(args: argparse.Namespace) -> int:
    if _no_rule(args):
        return 2
    from lora_ckpt.lowrank_files import resize_files

    result = resize_files(args.adapter, args.out, **_rule(args), alpha=args.alpha, overwrite=args.force)
    return _report(result, args)


def _combine(args: argparse.Namespace) -> int:
    if len(args.paths) < 2:
        print("lora-ckpt combine: error: give the adapters and then OUT: A1 [A2 …] OUT", file=sys.stderr)
        return 2
    *adapters, out = args.paths
    if args.weights is not None and len(args.weights) != len(adapters):
        print(f"lora-ckpt combine: error: --weights has {len(args.weights)} value(s) for {len(adapters)} adapter(s); "
              "give one per adapter", file=sys.stderr)
        return 2
    from lora_ckpt.lowrank_files import combine_files

    result = combine_files(adapters, out, weights=args.weights, **_rule(args), alpha=args.alpha,
                           base_model=args.base_model, overwrite=args.force)
    return _report(result, args)


def _unmerge(args: argparse.Namespace) -> int:
    from lora_ckpt.lowrank_files import unmerge_files

    result = unmerge_files(args.merged, args.adapter, args.out, base=args.base, alpha=args.alpha,
                           dtype=_dtype(args.dtype), fan_in_fan_out=args.fan_in_fan_out, overwrite=args.force)
    return _report(result, args)


if __name__ == "__main__":  # pragma: no cover
    run()
