"""The ``lora-ckpt`` command line: parses arguments, calls the public API, prints the results.

Exit codes: 0 success, 1 a failed conversion (one line naming the file or key and the fix), 2 usage.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from collections import Counter
from contextlib import nullcontext
from collections.abc import Sequence
from pathlib import Path

import torch

from lora_ckpt import __version__
from lora_ckpt.adapter import merge_adapter
from lora_ckpt.convert import convert_state_dict, fresh_factors
from lora_ckpt.errors import CheckpointFileError, LoraCkptError
from lora_ckpt.formats.gpt2 import hf_to_nanogpt, nanogpt_lora_to_peft
from lora_ckpt.formats.hf import load_model_weights, save_model_folder
from lora_ckpt.formats.peft import is_peft_dir, load_peft_adapter, save_peft_adapter
from lora_ckpt.io import Checkpoint, load_checkpoint, removed_on_failure, save_checkpoint
from lora_ckpt.layout import LAYOUTS, detect_layout
from lora_ckpt.merge import merge_lora
from lora_ckpt.relayout import convert_layout
from lora_ckpt.stream import LazySource, StreamReport, parse_size, stream_merge
from lora_ckpt.stream_convert import stream_convert

_FILE_SUFFIXES = (".safetensors", ".pt", ".pth", ".bin", ".ckpt")

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

    s = sub.add_parser(
        "merge",
        help="merge a LoRA checkpoint (SRC DST) or an adapter into its base (BASE ADAPTER DST) into a standard one",
        description="SRC DST: merge a LoRA checkpoint. BASE ADAPTER DST: merge an adapter (PEFT folder, kohya or "
        "any LoRA file) into a base model (file or Hugging Face folder); DST is a file (.safetensors/.pt) "
        "or a model folder.",
    )
    s.add_argument("paths", nargs="+", metavar="PATH", help="SRC DST, or BASE ADAPTER DST")
    _add_common(s)
    s.add_argument("--max-shard-size", metavar="SIZE", type=_size, help="shard a folder output, e.g. 5GB")
    s.add_argument("--device", help="merge on this device, e.g. cuda (default: cpu)")
    s.add_argument("--quiet", action="store_true", help="no progress bar")
    s.add_argument("--dtype", choices=sorted(_DTYPES), help="dtype of the output's floating-point tensors")
    s.add_argument("--tied", choices=("untie", "tie"), default="untie",
                   help="when an update lands on a tied weight: keep exact function (untie) or tie to merged")

    s = sub.add_parser("convert", help="convert a checkpoint or adapter to another layout")
    s.add_argument("src", help="a checkpoint file or a PEFT adapter folder")
    s.add_argument("dst", help="a file, or a folder for --to peft")
    s.add_argument("--to", required=True, choices=("standard", "nanogpt", *sorted(LAYOUTS)))
    s.add_argument("--like", metavar="TEMPLATE", help="give a standard SRC the LoRA layout of this checkpoint")
    s.add_argument("--base", metavar="BASE", help="base weights for an adapter-only SRC (file or HF folder)")
    s.add_argument("--base-out", metavar="PATH", help="where base weights go when the target keeps them apart")
    s.add_argument("--gpt2", action="store_true", help="nanoGPT <-> Hugging Face GPT-2 (Conv1D weights transposed)")
    s.add_argument("--n-head", type=int, help="attention heads, for the GPT-2 config.json (default: model_args)")
    s.add_argument("--seed", type=int, default=0, help="seed for fresh LoRA factors (--like)")
    s.add_argument("--max-shard-size", metavar="SIZE", type=_size, help="shard a --base-out folder, e.g. 5GB")
    s.add_argument("--quiet", action="store_true", help="no progress bar")
    _add_common(s)

    s = sub.add_parser("demo", help="train a tiny nanoGPT LoRA model, convert it both ways, check outputs match")
    s.add_argument("--out", metavar="DIR", help="keep the files in DIR (default: a temporary folder)")
    s.add_argument("--steps", type=int, default=20, help="training steps")
    return p


def _size(text: str) -> int:
    try:
        return parse_size(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


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
    if len(args.paths) == 3:
        return _merge_adapter(args, *args.paths)
    if len(args.paths) != 2:
        print("lora-ckpt merge: error: give SRC DST, or BASE ADAPTER DST", file=sys.stderr)
        return 2
    args.src, args.dst = args.paths
    return _merge_file(args)


def _streams(dst: Path, args: argparse.Namespace) -> bool:
    """Whether to merge file to file with bounded memory (safetensors or folder output, exact function)."""
    return dst.suffix not in _FILE_SUFFIXES[1:] and getattr(args, "tied", "untie") == "untie"


def _stream(args: argparse.Namespace, src: str, dst: Path, adapter: str | None) -> StreamReport:
    return stream_merge(
        src, dst, adapter=adapter, alpha=args.alpha, dtype=_DTYPES[args.dtype] if args.dtype else None,
        max_shard_size=getattr(args, "max_shard_size", None), device=getattr(args, "device", None),
        progress=not getattr(args, "quiet", False), overwrite=args.force,
    )


def _merge_adapter(args: argparse.Namespace, base: str, adapter: str, dst_name: str) -> int:
    dst = Path(dst_name)
    _refuse_existing(dst, args.force)
    if _streams(dst, args):
        report = _stream(args, base, dst, adapter)
        print(f"merged {adapter} into {base}: {dst} ({len(report.merged)} weights merged, "
              f"{report.bytes / 1e9:.2f} GB in {len(report.files)} file(s), {report.seconds:.1f} s)")
        return 0
    dtype = _DTYPES[args.dtype] if args.dtype else None
    merged = merge_adapter(base, adapter, alpha=args.alpha, dtype=dtype)
    _write_standard(dst, merged, like=base, force=args.force)
    print(f"merged {adapter} into {base}: {dst}")
    return 0


def _write_standard(dst: Path, sd: dict[str, torch.Tensor], *, like: str | None, force: bool) -> None:
    if dst.suffix in _FILE_SUFFIXES:
        save_checkpoint(dst, sd, overwrite=force)
    else:
        save_model_folder(dst, sd, like=like if like and Path(like).is_dir() else None, overwrite=force)


def _merge_file(args: argparse.Namespace) -> int:
    dst = Path(args.dst)
    _refuse_existing(dst, args.force)
    source = LazySource(args.src)
    if source.checkpoint is not None:  # a torch pickle, memory-mapped: its ties and extra entries are known
        ckpt, tied_groups = source.checkpoint, detect_layout(source.checkpoint.state_dict).tied_updates
    else:
        extra = {"model_args": source.metadata["model_args"]} if source.metadata.get("model_args") else {}
        ckpt = Checkpoint({}, extra=extra)
        tied_groups = tuple(tuple(g) for g in source.metadata.get("tied", []) if any(".main_weight." in k for k in g))
    extra, dropped = _standard_extra(ckpt, dst)
    if _streams(dst, args):
        report = _stream(args, args.src, dst, None)
        merged_count = len(report.merged)
    else:
        full = load_checkpoint(args.src)
        merged = merge_lora(full.state_dict, alpha=full.resolve_alpha(args.alpha), tied=args.tied,
                            dtype=_DTYPES[args.dtype] if args.dtype else None)
        save_checkpoint(dst, merged, extra=extra, overwrite=args.force)
        merged_count = sum(m.has_factors for m in detect_layout(full.state_dict).modules)
    print(f"merged {merged_count} LoRA module(s) of {args.src} into {dst}")
    for group in tied_groups:
        how = "untied: each key keeps its own value" if args.tied == "untie" else "tied to the merged weight"
        print(f"tied group {' = '.join(group)}: {how}")
    if dropped:
        print(f"left out: {', '.join(dropped)} (they do not apply to merged weights)")
    return 0


def _convert(args: argparse.Namespace) -> int:
    dst = Path(args.dst)
    _refuse_existing(dst, args.force)
    to = "nanogpt_lora" if args.to == "nanogpt" else args.to
    if args.to == "standard":
        if args.base:
            return _merge_adapter(argparse.Namespace(**vars(args), dtype=None), args.base, args.src, args.dst)
        return _merge_file(argparse.Namespace(**vars(args), dtype=None, tied="untie"))
    if args.like is not None:
        if dst.suffix == ".safetensors" and not is_peft_dir(args.src):
            return _convert_streamed(args, dst, like=args.like)
        return _convert_like(args, dst)
    if not (is_peft_dir(args.src) or args.gpt2 or args.base) and _streams_convert(to, dst, args.base_out):
        return _convert_streamed(args, dst, to=to)
    if is_peft_dir(args.src):
        adapter = load_peft_adapter(args.src)
        sd, scales, alpha, extra = adapter.state_dict, adapter.scales, None, {}
    else:
        ckpt = load_checkpoint(args.src)
        if to == "peft" and args.gpt2:
            return _nanogpt_to_gpt2_peft(args, ckpt, dst)
        sd, scales, alpha = ckpt.state_dict, None, ckpt.resolve_alpha(args.alpha)
        extra = {k: v for k, v in ckpt.extra.items() if k != "optimizer"}
    base = load_model_weights(args.base) if args.base else None
    if base is not None and args.gpt2:
        base = hf_to_nanogpt(base)
    rel = convert_layout(sd, to, alpha=alpha, scales=scales, base=base, fan_in_fan_out=False if args.gpt2 else None)
    base_out = Path(args.base_out) if args.base_out else None
    if rel.base and not args.base:
        if base_out is None:
            raise LoraCkptError(f"{args.src} holds base weights, which {to} keeps apart; pass --base-out PATH")
        _refuse_existing(base_out, args.force)
    with removed_on_failure(base_out) if base_out is not None and rel.base and not args.base else nullcontext():
        if base_out is not None and rel.base and not args.base:
            _write_standard(base_out, rel.base, like=None, force=args.force)
        if to == "peft":
            save_peft_adapter(dst, rel.state_dict, alpha=rel.alpha, overwrite=args.force)
        else:
            keep = extra if dst.suffix != ".safetensors" else {k: v for k, v in extra.items() if k == "model_args"}
            save_checkpoint(dst, rel.state_dict, alpha=rel.alpha, extra=keep, overwrite=args.force)
    print(f"converted {args.src} to the {to} layout: {dst} ({len(rel.alpha)} LoRA modules, factors unchanged)")
    return 0


def _streams_convert(to: str, dst: Path, base_out: str | None) -> bool:
    """Whether to convert file to file with bounded memory: what holds the base weights is safetensors."""
    if LAYOUTS[to].base_in_file:
        return dst.suffix == ".safetensors"
    return base_out is not None and Path(base_out).suffix not in _FILE_SUFFIXES[1:]


def _convert_streamed(args: argparse.Namespace, dst: Path, *, to: str | None = None, like: str | None = None) -> int:
    if args.base_out:
        _refuse_existing(Path(args.base_out), args.force)
    report = stream_convert(args.src, dst, to=to, like=like, alpha=args.alpha, base_out=args.base_out,
                            max_shard_size=args.max_shard_size, seed=args.seed, progress=not args.quiet,
                            overwrite=args.force)
    what = f"the layout of {like}" if like else f"the {to} layout"
    print(f"converted {args.src} to {what}: {dst} ({report.tensors} tensors, {report.bytes / 1e9:.2f} GB streamed"
          + (f" to {args.base_out}" if args.base_out and not like else "") + f", {report.seconds:.1f} s)")
    if report.conversion is not None:
        print(report.conversion)
    return 0


def _nanogpt_to_gpt2_peft(args: argparse.Namespace, ckpt: Checkpoint, dst: Path) -> int:
    n_head = args.n_head or (ckpt.extra.get("model_args") or {}).get("n_head")
    if not args.base_out or not n_head:
        print("lora-ckpt: error: --to peft --gpt2 needs --base-out DIR (the GPT-2 model folder) and --n-head "
              "(or model_args['n_head'] in the checkpoint)", file=sys.stderr)
        return 2
    nanogpt_lora_to_peft(ckpt.state_dict, args.base_out, dst, alpha=ckpt.resolve_alpha(args.alpha),
                         n_head=int(n_head), overwrite=args.force)
    print(f"wrote the GPT-2 base to {args.base_out} and the PEFT adapter to {dst}")
    return 0


def _convert_like(args: argparse.Namespace, dst: Path) -> int:
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
