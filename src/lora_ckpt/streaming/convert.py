"""Streaming conversions between layouts, file to file, with memory bounded by the largest tensor.

The conversion itself is the in-memory one (:func:`~lora_ckpt.convert_layout`, or
:func:`~lora_ckpt.convert.convert_state_dict` as :func:`~lora_ckpt.load_into` uses it) run on ``meta``
stand-ins for the big tensors and the real LoRA factors. The stand-ins it passes through are then
copied from the source block by block, the small tensors it makes (factors, alphas) are written as they
are, and the weights it merges (where a module's rank or alpha change) are merged block by block, as
:func:`~lora_ckpt.stream_merge` does.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import replace

from typing import Any

import torch

from lora_ckpt.checkpoint import Checkpoint
from lora_ckpt.convert import LoadReport, tie_conflicts, convert_state_dict, fresh_factors
from lora_ckpt.errors import CheckpointFileError, LayoutError
from lora_ckpt.formats.peft import write_peft_adapter
from lora_ckpt.io import file_meta, write_checkpoint
from lora_ckpt.layout import LAYOUTS, Layout, layout_spec
from lora_ckpt.merge import Alpha, MergePlan, Step, resolve_scales
from lora_ckpt.output import Output, PathLike, write_together
from lora_ckpt.relayout import convert_layout
from lora_ckpt.source import Source
from lora_ckpt.streaming.merge import read_factors, tie_metadata, write_plan
from lora_ckpt.streaming.writer import ShardedWriter, StreamOptions, StreamReport

__all__ = ["stream_convert"]


def stream_convert(
    source: PathLike | Source,
    out: PathLike,
    *,
    to: str | None = None,
    like: PathLike | Source | None = None,
    alpha: Alpha | None = None,
    base_out: PathLike | None = None,
    max_shard_size: int | str | None = None,
    seed: int = 0,
    ignore: Iterable[str] = (),
    progress: bool = False,
    overwrite: bool = False,
    layout: Layout | None = None,
    options: StreamOptions | None = None,
    kinds: Mapping[str, str] | None = None,
) -> StreamReport:
    """Convert a checkpoint file to another layout with bounded memory; return what was written.

    With ``to``, a LoRA checkpoint that holds its base goes to the LoRA layout ``to``, factors and
    scales kept exactly (as :func:`~lora_ckpt.convert_layout`). Layouts that keep the base apart
    (``peft``, ``kohya``) write the base weights to ``base_out`` (a ``.safetensors`` file or a folder,
    sharded by ``max_shard_size``) and the adapter to ``out`` (a PEFT folder, or a kohya
    ``.safetensors`` file): both or neither. With ``like``, the checkpoint (standard or LoRA) goes to the
    layout of the template checkpoint ``like`` as :func:`~lora_ckpt.load_into` would load it: base
    weights into ``main_weight``, fresh factors (seeded by ``seed``) where the source has none, updates
    merged where rank or alpha change; ``ignore``: glob patterns of keys that need not be used or supplied
    (as :func:`~lora_ckpt.load_into`). Otherwise ``out`` is a ``.safetensors`` file, which records the alpha.
    ``layout``: the source's layout, when the caller detected it already; ``kinds`` settles the source's modules
    whose square shapes fit a linear module and an embedding alike (see :func:`~lora_ckpt.detect_layout`), with
    what the source records (:meth:`~lora_ckpt.Checkpoint.detect`: a contradiction is refused). The output
    records every LoRA module's kind where its layout's keys do not tell (loralib, minLoRA, nanoGPT's fork).

    Raises:
        CheckpointFileError: unreadable inputs, an output that may not be written, too little disk.
        LayoutError, ShapeError, AlphaError, KeyMismatchError: found before any tensor is written.
    """
    started = time.perf_counter()
    if (to is None) == (like is None):
        raise LayoutError("give the target layout (to=...) or a template checkpoint (like=...), not both or neither")
    to = layout_spec(to).name if to is not None else None
    apart = to is not None and not LAYOUTS[to].base_in_file
    src = source if isinstance(source, Source) else Source.open(source)
    try:
        inputs: list[PathLike | None] = [*src.paths(), *(like.paths() if isinstance(like, Source) else [like])]
        target = Output.prepare(out, overwrite=overwrite, folder=True if to == "peft" else None,
                                inputs=inputs, siblings=[base_out])
        if not apart and target.path.suffix != ".safetensors":
            raise CheckpointFileError(f"{target.path}: a streamed LoRA checkpoint is a .safetensors file")
        report = _convert(src, target, to, like, alpha, base_out, max_shard_size, seed, tuple(ignore), progress,
                          overwrite, layout, options, inputs, kinds)
    finally:
        if not isinstance(source, Source):
            src.close()
    report.seconds = time.perf_counter() - started
    return report


def _convert(
    src: Source,
    target: Output,
    to: str | None,
    like: PathLike | Source | None,
    alpha: Alpha | None,
    base_out: PathLike | None,
    max_shard_size: int | str | None,
    seed: int,
    ignore: tuple[str, ...],
    progress: bool,
    overwrite: bool,
    layout: Layout | None,
    options: StreamOptions | None,
    inputs: list[PathLike | None],
    kinds: Mapping[str, str] | None = None,
) -> StreamReport:
    lazy = src.meta_tensors()
    info = src.recorded()
    layout = layout or info.detect(lazy, kinds=kinds)
    if layout.needs_base:
        raise LayoutError(
            f"{src.path} holds a {layout.kind} adapter only, with no base weights to stream; convert it in memory "
            "(convert_layout, or lora-ckpt convert --base BASE)"
        )
    factors = read_factors(src, layout)
    plain_factors = {k[len(layout.prefix) :]: v for k, v in factors.items()}  # as the modules name them
    source_alpha = info.resolve_alpha(alpha)
    merges: dict[str, str] = {}
    conversion = None
    if like is not None:
        by_id = {id(t): k for k, t in lazy.items()}

        def read(t: torch.Tensor) -> torch.Tensor:  # a stand-in's data, to compare tied values
            return src.read(by_id[id(t)]) if t.device.type == "meta" and id(t) in by_id else t

        values, alphas, merges, conversion, t_args, out_kinds = _like(lazy, factors, info, alpha, like, seed, ignore,
                                                                      read, kinds)
    else:
        assert to is not None
        rel = convert_layout({**lazy, **factors}, to, alpha=source_alpha, layout=layout)
        values, alphas, t_args, out_kinds = rel.state_dict, rel.alpha, None, layout.kinds  # the same modules
        if not LAYOUTS[to].base_in_file:
            return _write_apart(src, lazy, layout, rel.base or {}, values, alphas, to, target, base_out,
                                max_shard_size, progress, overwrite, options, inputs, rel.fan_in_fan_out)
    scales = resolve_scales(layout, source_alpha, plain_factors) if merges else {}
    plan = _copy_plan(values, src, lazy, layout, merges, scales, plain_factors)
    aliases = _aliases(plan)
    model_args = None
    if like is not None and t_args is not None:  # the output is for the template's model
        model_args = t_args
    elif info.extra.get("model_args"):  # a template's ranks and alpha may differ from the source's lora_* entries
        model_args = {k: v for k, v in dict(info.extra["model_args"]).items()
                      if like is None or not str(k).startswith("lora_")}
    meta = replace(file_meta(values, alphas, kinds=out_kinds), order=tuple(values), aliases=aliases,
                   tied=tie_metadata(aliases), model_args=model_args)
    writer = ShardedWriter(target, options=options)
    report = write_plan(plan, src, "", writer, meta, progress=progress, label="converting")
    report.merged = [s.key for s in plan.steps if s.op == "merge"]
    report.conversion = conversion
    return report


def _like(
    lazy: Mapping[str, torch.Tensor],
    factors: Mapping[str, torch.Tensor],
    info: Checkpoint,
    alpha: Alpha | None,
    like: PathLike | Source,
    seed: int,
    ignore: tuple[str, ...],
    read: Callable[[torch.Tensor], torch.Tensor],
    kinds: Mapping[str, str] | None = None,
) -> tuple[dict[str, torch.Tensor], Alpha | None, dict[str, str], LoadReport, dict[str, Any] | None,
           dict[str, str]]:
    """The source in the template's layout and key order, the template's alpha, merged key -> module, the report,
    the template's ``model_args`` and module kinds."""
    template = like if isinstance(like, Source) else Source.open(like)
    try:
        t_info = template.recorded()
        t_layout = t_info.detect(template.meta_tensors())  # a template lora_ckpt wrote records its kinds
        t_alpha = t_info.alpha
        recorded_args = t_info.extra.get("model_args")
        tied: dict[str, list[str]] = {}  # the template's tied groups, from its file (meta tensors cannot show them)
        for alias, stored in template.aliases().items():
            tied.setdefault(stored[len(t_layout.prefix):], [stored[len(t_layout.prefix):]]).append(
                alias[len(t_layout.prefix):])
    finally:
        if not isinstance(like, Source):
            template.close()
    ckpt = Checkpoint({**lazy, **factors}, alpha=info.alpha, alpha_source=info.alpha_source, path=info.path,
                      kinds=info.kinds)
    conversion = convert_state_dict(ckpt, t_layout, alpha=alpha, target_alpha=t_alpha, ignore=ignore, kinds=kinds)
    values = {**conversion.values, **fresh_factors(t_layout, conversion.report.initialised, seed=seed)}
    tie_conflicts(tied.values(), values, conversion.report, read=read)
    by_key = t_layout.module_by_key
    merges = {
        t_layout.prefix + k: by_key[k].name if k in by_key else k.removesuffix(".weight")
        for k, how in conversion.sources.items()
        if how == "merge"
    }
    return ({t_layout.prefix + k: values[k] for k in t_layout.shapes}, t_alpha, merges, conversion.report,
            dict(recorded_args) if isinstance(recorded_args, dict) else None, t_layout.kinds)


def _copy_plan(
    values: Mapping[str, torch.Tensor],
    src: Source,
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


def _aliases(plan: MergePlan) -> dict[str, str]:
    """Output keys that hold the same tensor as another output key: alias -> the key stored."""
    return {s.key: s.source for s in plan.steps if s.op == "alias" and s.source is not None}


def _write_apart(
    src: Source,
    lazy: Mapping[str, torch.Tensor],
    layout: Layout,
    base: Mapping[str, torch.Tensor],
    adapter: Mapping[str, torch.Tensor],
    alphas: Mapping[str, float],
    to: str,
    target: Output,
    base_out: PathLike | None,
    max_shard_size: int | str | None,
    progress: bool,
    overwrite: bool,
    options: StreamOptions | None,
    inputs: list[PathLike | None],
    fan_in_fan_out: bool = False,
) -> StreamReport:
    """The base weights streamed to ``base_out`` and the (small) adapter written to the target: both or neither."""
    if base and base_out is None:
        raise LayoutError(f"{src.path} holds base weights, which {to} keeps apart; pass base_out=PATH")
    outputs = [target]
    base_target = None
    if base and base_out is not None:
        base_target = Output.prepare(base_out, overwrite=overwrite, inputs=inputs, siblings=[target.path])
        outputs.insert(0, base_target)
    report = StreamReport([], 0, 0)
    with write_together(*outputs) as staged:
        if base_target is not None:
            plan = _copy_plan(base, src, lazy, layout, {}, {}, {})
            aliases = _aliases(plan)
            meta = replace(file_meta(base, None), order=tuple(base), aliases=aliases, tied=tie_metadata(aliases))
            writer = ShardedWriter(base_target, max_shard_size=max_shard_size, options=options, extras_from=src.path)
            report = write_plan(plan, src, "", writer, meta, progress=progress, label="copying the base",
                                into=staged[0])
        if to == "peft":
            write_peft_adapter(staged[-1], adapter, alpha=alphas, fan_in_fan_out=fan_in_fan_out)
        else:
            write_checkpoint(staged[-1], adapter, alpha=dict(alphas), suffix=target.path.suffix)
    report.files = [*report.files, target.path]
    return report
