"""The ``lora-ckpt`` command line: parses arguments, calls the public API, prints the results.

Exit codes: 0 success, 1 a failed conversion (one line naming the file or key and the fix), 2 usage.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

import torch

from lora_ckpt import __version__
from lora_ckpt.convert import convert_state_dict, fresh_factors
from lora_ckpt.errors import CheckpointFileError, LoraCkptError
from lora_ckpt.io import Checkpoint, load_checkpoint, save_checkpoint
from lora_ckpt.layout import detect_layout
from lora_ckpt.merge import merge_lora

_DTYPES = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
           "fp16": torch.float16, "float16": torch.float16}


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="lora-ckpt", description="Portable checkpoints between standard and LoRA layouts.")
    p.add_argument("--version", action="version", version=f"lora-ckpt {__version__}")
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("inspect", help="show a checkpoint's layout, modules, ranks, alpha, dtypes, sizes, ties")
    s.add_argument("path")
    s.add_argument("--json", action="store_true", help="machine-readable output")

    s = sub.add_parser("merge", help="merge a LoRA checkpoint into a standard one")
    s.add_argument("src")
    s.add_argument("dst")
    _add_common(s)
    s.add_argument("--dtype", choices=sorted(_DTYPES), help="dtype of the output's floating-point tensors")
    s.add_argument("--tied", choices=("untie", "tie"), default="untie",
                   help="when an update lands on a tied weight: keep exact function (untie) or tie to merged")

    s = sub.add_parser("convert", help="convert a checkpoint to another layout")
    s.add_argument("src")
    s.add_argument("dst")
    s.add_argument("--to", required=True, choices=("standard", "nanogpt"))
    s.add_argument("--like", metavar="TEMPLATE", help="a checkpoint in the target layout (required for --to nanogpt)")
    s.add_argument("--seed", type=int, default=0, help="seed for the fresh LoRA factors")
    _add_common(s)

    s = sub.add_parser("demo", help="train a tiny nanoGPT LoRA model, convert it both ways, check outputs match")
    s.add_argument("--out", metavar="DIR", help="keep the files in DIR (default: a temporary folder)")
    s.add_argument("--steps", type=int, default=20, help="training steps")
    return p


def _add_common(s: argparse.ArgumentParser) -> None:
    s.add_argument("--alpha", type=float, help="the LoRA alpha, when the file does not record it")
    s.add_argument("--force", action="store_true", help="overwrite DST if it exists")


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line with ``argv`` (default ``sys.argv[1:]``) and return the exit code."""
    parser = _parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:
        return int(e.code or 0)
    try:
        return {"inspect": _inspect, "merge": _merge, "convert": _convert, "demo": _demo}[args.command](args)
    except LoraCkptError as e:
        if args.debug:
            raise
        print(f"lora-ckpt: error: {e}", file=sys.stderr)
        return 1


def _inspect(args: argparse.Namespace) -> int:
    ckpt = load_checkpoint(args.path)
    layout = detect_layout(ckpt.state_dict)
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
        "modules": layout.rows(),
        "tied": [list(g) for g in layout.tied],
        "other_entries": sorted(ckpt.extra),
    }
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    print(f"{args.path}: {layout.summary()}")
    alpha = "unknown (pass --alpha to merge)" if ckpt.alpha is None else f"{_alpha_text(ckpt.alpha)} ({ckpt.alpha_source})"
    if layout.is_lora:
        print(f"alpha: {alpha}")
    print(f"parameters: {info['parameters']:,}  bytes: {info['bytes']:,}  dtypes: {info['dtypes']}")
    if ckpt.extra:
        print(f"other entries: {', '.join(sorted(ckpt.extra))}")
    if layout.modules:
        print(str(layout).split("\n", len(layout.summary().splitlines()))[-1])
    return 0


def _alpha_text(alpha: float | dict[str, float]) -> str:
    if isinstance(alpha, dict):
        values = set(alpha.values())
        return f"{values.pop():g}" if len(values) == 1 else json.dumps(alpha)
    return f"{alpha:g}"


def _standard_extra(ckpt: Checkpoint, dst: Path) -> tuple[dict[str, object], list[str]]:
    """Entries to keep beside merged weights, and the names left out (optimizer state, LoRA args)."""
    dropped = [k for k in ckpt.extra if k == "optimizer" or (dst.suffix == ".safetensors" and k != "model_args")]
    extra = {k: v for k, v in ckpt.extra.items() if k not in dropped}
    model_args = extra.get("model_args")
    if isinstance(model_args, dict):
        lora_args = sorted(k for k in model_args if k.startswith("lora_"))
        extra["model_args"] = {k: v for k, v in model_args.items() if k not in lora_args}
        dropped += [f"model_args[{k!r}]" for k in lora_args]
    return extra, dropped


def _merge(args: argparse.Namespace) -> int:
    ckpt = load_checkpoint(args.src)
    dst = Path(args.dst)
    _refuse_existing(dst, args.force)
    merged = merge_lora(ckpt.state_dict, alpha=ckpt.resolve_alpha(args.alpha), tied=args.tied,
                        dtype=_DTYPES[args.dtype] if args.dtype else None)
    extra, dropped = _standard_extra(ckpt, dst)
    save_checkpoint(dst, merged, extra=extra, overwrite=args.force)
    layout = detect_layout(ckpt.state_dict)
    print(f"merged {sum(m.has_factors for m in layout.modules)} LoRA module(s) of {args.src} into {dst}")
    for group in layout.tied_updates:
        how = "untied: each key keeps its own value" if args.tied == "untie" else "tied to the merged weight"
        print(f"tied group {' = '.join(group)}: {how}")
    if dropped:
        print(f"left out: {', '.join(dropped)} (they do not apply to merged weights)")
    return 0


def _convert(args: argparse.Namespace) -> int:
    dst = Path(args.dst)
    _refuse_existing(dst, args.force)
    if args.to == "standard":
        return _merge(argparse.Namespace(**vars(args), dtype=None, tied="untie"))
    if args.like is None:
        print("lora-ckpt: error: --to nanogpt needs --like TEMPLATE, a checkpoint in the target LoRA layout "
              "(e.g. one saved from the LoRA model)", file=sys.stderr)
        return 2
    ckpt = load_checkpoint(args.src)
    template = load_checkpoint(args.like)
    layout = detect_layout(template.state_dict)
    conversion = convert_state_dict(ckpt, layout, alpha=args.alpha, target_alpha=template.alpha)
    values = {**conversion.values, **fresh_factors(layout, conversion.report.initialised, seed=args.seed)}
    ordered = {layout.prefix + k: values[k] for k in layout.shapes}
    extra = {k: v for k, v in ckpt.extra.items() if k != "optimizer"}
    save_checkpoint(dst, ordered, alpha=template.alpha, extra=extra if dst.suffix != ".safetensors" else None,
                    overwrite=args.force)
    print(f"converted {args.src} ({conversion.report.source_layout}) to the layout of {args.like}: {dst}")
    print(conversion.report)
    return 0


def _refuse_existing(dst: Path, force: bool) -> None:
    if dst.exists() and not force:
        raise CheckpointFileError(f"{dst}: already exists; pass --force to replace it")


def _demo(args: argparse.Namespace) -> int:
    from lora_ckpt.demo import DemoStep, run_demo

    def show(s: DemoStep) -> None:
        print(f"[{'ok' if s.ok else 'MISMATCH'}] {s.name}: {s.path.name}, max |Δlogits| = {s.max_abs_diff:.2e}")

    print("lora-ckpt demo: tiny nanoGPT, LoRA rank 4 on c_attn and rank 2 on the tied wte, alpha 8")
    if args.out:
        steps = run_demo(args.out, steps=args.steps, on_step=show)
    else:
        with tempfile.TemporaryDirectory() as tmp:
            steps = run_demo(tmp, steps=args.steps, on_step=show)
    ok = all(s.ok for s in steps)
    print("all outputs match" if ok else "some outputs differ")
    return 0 if ok else 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
