"""Streaming conversions between layouts, file to file, with memory bounded by the largest tensor.

The conversion itself is the in-memory one (:func:`~lora_ckpt.convert_layout`, or
:func:`~lora_ckpt.convert.convert_state_dict` as :func:`~lora_ckpt.load_into` uses it) run on
``meta`` stand-ins for the big tensors and the real LoRA factors. The stand-ins it passes through are
then copied from the source file block by block, the small tensors it makes (factors, alphas) are
written as they are, and the weights it merges (where a module's rank or alpha changes) are merged
block by block, as :func:`~lora_ckpt.stream_merge` does.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Mapping
from pathlib import Path

import torch

from lora_ckpt.convert import LoadReport, convert_state_dict, fresh_factors
from lora_ckpt.errors import CheckpointFileError, LayoutError
from lora_ckpt.formats.peft import save_peft_adapter
from lora_ckpt.io import Checkpoint, PathLike, _metadata, removed_on_failure, save_checkpoint
from lora_ckpt.layout import LAYOUTS, Layout, detect_layout
from lora_ckpt.merge import Alpha, MergePlan, Step, resolve_scales
from lora_ckpt.relayout import convert_layout
from lora_ckpt.stream import LazySource, StreamReport, _file_info, _output, _read_factors, _write_plan

__all__ = ["stream_convert"]


def stream_convert(
    source: PathLike,
    out: PathLike,
    *,
    to: str | None = None,
    like: PathLike | None = None,
    alpha: Alpha | None = None,
    base_out: PathLike | None = None,
    max_shard_size: int | str | None = None,
    seed: int = 0,
    progress: bool = False,
    overwrite: bool = False,
) -> StreamReport:
    """Convert a checkpoint file to another layout with bounded memory; return what was written.

    With ``to``, a LoRA checkpoint that holds its base goes to the LoRA layout ``to``, factors and
    scales kept exactly (as :func:`~lora_ckpt.convert_layout`). Layouts that keep the base apart
    (``peft``, ``kohya``) write the base weights to ``base_out`` (a ``.safetensors`` file or a folder,
    sharded by ``max_shard_size``) and the adapter to ``out`` (a PEFT folder, or a kohya
    ``.safetensors`` file). With ``like``, the checkpoint (standard or LoRA) goes to the layout of the
    template checkpoint ``like`` as :func:`~lora_ckpt.load_into` would load it: base weights into
    ``main_weight``, fresh factors (seeded by ``seed``) where the source has none, updates merged where
    rank or alpha change. Otherwise ``out`` is a ``.safetensors`` file, which records the alpha.

    Raises:
        CheckpointFileError: unreadable inputs, an existing output without ``overwrite``, too little disk.
        LayoutError, ShapeError, AlphaError, KeyMismatchError: found before any tensor is written.
    """
    started = time.perf_counter()
    if (to is None) == (like is None):
        raise LayoutError("give the target layout (to=...) or a template checkpoint (like=...), not both or neither")
    if to is not None and to not in LAYOUTS:
        raise LayoutError(f"unknown target layout {to!r}; known: {', '.join(LAYOUTS)}")
    apart = to is not None and not LAYOUTS[to].base_in_file
    target, max_bytes = _output(out, None if apart else max_shard_size, overwrite)
    if not apart and target.suffix != ".safetensors":
        raise CheckpointFileError(f"{target}: a streamed LoRA checkpoint is a .safetensors file")

    src = LazySource(source)
    lazy = src.meta()
    layout = detect_layout(lazy)
    if layout.needs_base:
        raise LayoutError(
            f"{src.path} holds a {layout.kind} adapter only, with no base weights to stream; convert it in memory "
            "(convert_layout, or lora-ckpt convert --base BASE)"
        )
    factors = _read_factors(src, layout)
    plain_factors = {k[len(layout.prefix) :]: v for k, v in factors.items()}  # as the modules name them
    info = _file_info(src)
    source_alpha = info.resolve_alpha(alpha)
    merges: dict[str, str] = {}
    conversion = None
    if like is not None:
        values, alphas, merges, conversion = _like(lazy, factors, info, alpha, like, seed)
    else:
        assert to is not None
        rel = convert_layout({**lazy, **factors}, to, alpha=source_alpha, layout=layout)
        values, alphas = rel.state_dict, rel.alpha
        if apart:
            return _write_apart(src, lazy, layout, rel.base or {}, values, alphas, to, target, base_out,
                                max_shard_size, progress, overwrite, started)
    scales = resolve_scales(layout, source_alpha, plain_factors) if merges else {}
    plan = _copy_plan(values, src, lazy, layout, merges, scales, plain_factors)
    metadata = {**_metadata(values, alphas), "order": list(values), **_ties(plan)}
    if info.extra.get("model_args"):  # a template's ranks and alpha may differ from the source's lora_* entries
        metadata["model_args"] = {k: v for k, v in dict(info.extra["model_args"]).items()
                                  if like is None or not str(k).startswith("lora_")}
    report = _write_plan(plan, src, "", target, metadata, max_bytes, None, progress, source)
    report.merged = [s.key for s in plan.steps if s.op == "merge"]
    report.seconds = time.perf_counter() - started
    report.conversion = conversion
    return report


def _like(
    lazy: Mapping[str, torch.Tensor],
    factors: Mapping[str, torch.Tensor],
    info: Checkpoint,
    alpha: Alpha | None,
    like: PathLike,
    seed: int,
) -> tuple[dict[str, torch.Tensor], Alpha | None, dict[str, str], LoadReport]:
    """The source in the template's layout and key order, the template's alpha, merged key -> module, the report."""
    template = LazySource(like)
    t_layout = detect_layout(template.meta())
    t_alpha = _file_info(template).alpha
    template.close()
    ckpt = Checkpoint({**lazy, **factors}, alpha=info.alpha, alpha_source=info.alpha_source, path=info.path)
    conversion = convert_state_dict(ckpt, t_layout, alpha=alpha, target_alpha=t_alpha)
    values = {**conversion.values, **fresh_factors(t_layout, conversion.report.initialised, seed=seed)}
    by_key = t_layout.module_by_key
    merges = {
        t_layout.prefix + k: by_key[k].name if k in by_key else k.removesuffix(".weight")
        for k, how in conversion.sources.items()
        if how == "merge"
    }
    return {t_layout.prefix + k: values[k] for k in t_layout.shapes}, t_alpha, merges, conversion.report


def _copy_plan(
    values: Mapping[str, torch.Tensor],
    src: LazySource,
    lazy: Mapping[str, torch.Tensor],
    layout: Layout,
    merges: Mapping[str, str],
    scales: Mapping[str, float],
    factors: Mapping[str, torch.Tensor],
) -> MergePlan:
    """A plan that writes ``values``: stand-ins copied from ``src`` (tied ones once), real tensors as they are,
    and the ``merges`` (output key -> source module) merged from the source with ``factors`` (the modules' keys)."""
    by_id = {id(t): k for k, t in lazy.items()}
    alias_of = src.aliases()
    modules = {m.name: m for m in layout.modules}
    small: dict[str, torch.Tensor] = {}
    steps: list[Step] = []
    first: dict[str, str] = {}  # source key -> the output key that holds it
    for key, t in values.items():
        if key in merges:
            m = modules[merges[key]]
            if m.weight_key is None or lazy[layout.prefix + m.weight_key].dtype != t.dtype:
                raise LayoutError(f"{key}: merging {m.name} into another dtype is not streamed; convert in memory")
            steps.append(Step(key, "merge", layout.prefix + m.weight_key, False, m, scales[m.name]))
        elif t.device.type != "meta":
            small[f"\0{key}"] = t  # apart from the factors, which merges read under their own keys
            steps.append(Step(key, "copy", f"\0{key}", from_adapter=True))
        elif id(t) in by_id:
            real = alias_of.get(by_id[id(t)], by_id[id(t)])
            steps.append(Step(key, "alias", first[real]) if real in first else Step(key, "copy", by_id[id(t)]))
            first.setdefault(real, key)
        else:
            raise LayoutError(f"{key}: the conversion computes this tensor in a way that is not streamed; convert in memory")
    return MergePlan(steps, lazy, {**factors, **small}, None, None)


def _ties(plan: MergePlan) -> dict[str, object]:
    """lora_ckpt's metadata for tied keys: ``aliases`` (alias -> key stored) and the ``tied`` groups."""
    aliases = {s.key: s.source for s in plan.steps if s.op == "alias" and s.source is not None}
    groups: dict[str, list[str]] = {}
    for alias, key in aliases.items():
        groups.setdefault(key, [key]).append(alias)
    return {"aliases": aliases, "tied": list(groups.values())}


def _write_apart(
    src: LazySource,
    lazy: Mapping[str, torch.Tensor],
    layout: Layout,
    base: Mapping[str, torch.Tensor],
    adapter: Mapping[str, torch.Tensor],
    alphas: Mapping[str, float],
    to: str,
    target: Path,
    base_out: PathLike | None,
    max_shard_size: int | str | None,
    progress: bool,
    overwrite: bool,
    started: float,
) -> StreamReport:
    """The base weights streamed to ``base_out``, then the (small) adapter written to ``target``: both or neither."""
    if base and base_out is None:
        raise LayoutError(f"{src.path} holds base weights, which {to} keeps apart; pass base_out=PATH")
    files: list[Path] = []
    report = StreamReport(files, 0, 0)
    pair = removed_on_failure(base_out) if base and base_out is not None else contextlib.nullcontext()
    with pair:
        if base and base_out is not None:
            base_target, max_bytes = _output(base_out, max_shard_size, overwrite)
            plan = _copy_plan(base, src, lazy, layout, {}, {}, {})
            metadata = {**_metadata(base, None), "order": list(base), **_ties(plan)}
            report = _write_plan(plan, src, "", base_target, metadata, max_bytes, None, progress, src.path)
        if to == "peft":
            save_peft_adapter(target, adapter, alpha=alphas, overwrite=overwrite)
            files.append(target)
        else:
            files.append(save_checkpoint(target, adapter, alpha=dict(alphas), overwrite=overwrite))
    report.files = [*report.files, *files]
    report.seconds = time.perf_counter() - started
    return report
