"""Streaming merges, file to file, with memory bounded by the largest tensor whatever the model's size.

Everything is checked first on ``meta`` tensors (keys, shapes, dtypes, alphas, free disk space). Merging
changes no shape, so each output shard's header is written before any tensor is computed; each tensor is
then produced block by block (:class:`~lora_ckpt.streaming.blocks.BlockMerger`) into the sharded writer
(:class:`~lora_ckpt.streaming.writer.ShardedWriter`), which installs the output through its
:class:`~lora_ckpt.output.Output` once complete: a failure leaves no output and the inputs untouched.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from lora_ckpt.dtypes import DType, as_dtype
from lora_ckpt.checkpoint import Checkpoint
from lora_ckpt.errors import CheckpointFileError
from lora_ckpt.filemeta import FileMeta
from lora_ckpt.adapter import plan_adapter_merge
from lora_ckpt.layout import Layout, split_prefix
from lora_ckpt.merge import Alpha, MergePlan, Step, plan_merge
from lora_ckpt.output import Output, PathLike
from lora_ckpt.progress import progress_bar
from lora_ckpt.source import Source
from lora_ckpt.streaming.blocks import BlockMerger
from lora_ckpt.streaming.parallel import Ranks
from lora_ckpt.streaming.writer import ShardedWriter, StreamOptions, StreamReport

__all__ = ["merge_to_dcp", "read_factors", "stream_merge", "tie_metadata", "write_plan"]

log = logging.getLogger(__name__)


def stream_merge(
    source: PathLike | Source,
    out: PathLike | Output,
    *,
    adapter: PathLike | Source | Mapping[str, torch.Tensor] | Checkpoint | None = None,
    alpha: Alpha | None = None,
    dtype: DType | None = None,
    max_shard_size: int | str | None = None,
    device: str | torch.device | None = None,
    progress: bool = False,
    overwrite: bool = False,
    layout: Layout | None = None,
    fan_in_fan_out: bool | None = None,
    options: StreamOptions | None = None,
    ranks: Ranks | None = None,
    kinds: Mapping[str, str] | None = None,
) -> StreamReport:
    """Merge file to file with bounded memory; return what was written.

    ``source`` is a LoRA checkpoint holding its base (``adapter=None``) or, with ``adapter`` (a PEFT
    folder, kohya or any LoRA file), the base: a ``.safetensors``/``.pt`` file or a Hugging Face folder
    (sharded too); an open :class:`~lora_ckpt.source.Source` is used as it is. ``out`` is a
    ``.safetensors`` file, or a folder (``model.safetensors``, or shards ``model-00001-of-0000N.safetensors``
    and ``model.safetensors.index.json`` with ``max_shard_size``; the configs and tokenizer files of a
    source folder are copied). It may not be, hold or lie inside an input (see :class:`~lora_ckpt.output.Output`).
    The result is bit-identical to :func:`~lora_ckpt.merge_lora` in memory. With ``device="cuda"`` the
    blocks are merged on the GPU. ``layout``: the source's layout, when the caller detected it already.
    ``fan_in_fan_out``: whether base weights are stored (in, out) (GPT-2's ``Conv1D``) where no config says.
    ``options``: block and chunk sizes, direct I/O (see :class:`~lora_ckpt.streaming.StreamOptions`).
    ``kinds``: module -> ``"linear"``/``"embedding"`` for factors whose square shapes fit both, with what the
    file records (:meth:`~lora_ckpt.Checkpoint.detect`; a contradiction is refused).
    While it runs, torch uses one intra-op thread (restored afterwards), leaving the other cores to the writers.
    ``ranks``: under ``torchrun``, this process's place (:class:`~lora_ckpt.streaming.parallel.Ranks`): the
    output's shards are split across the ranks, and rank 0 writes the index and installs the output.

    Raises:
        CheckpointFileError: unreadable inputs, an output that may not be written, too little disk.
        LayoutError, ShapeError, AlphaError, KeyMismatchError: found before any tensor is computed.
    """
    dtype = as_dtype(dtype)
    started = time.perf_counter()
    dev = _device(device)
    src = source if isinstance(source, Source) else Source.open(source)
    try:
        target = out if isinstance(out, Output) else Output.prepare(
            out, overwrite=overwrite, inputs=[*src.paths(), *_paths(adapter)]
        )
        plan, model_args = plan_stream_merge(src, adapter, alpha=alpha, dtype=dtype, layout=layout,
                                             fan_in_fan_out=fan_in_fan_out, kinds=kinds)
        aliases = {s.key: s.source for s in plan.steps if s.op == "alias" and s.source is not None}
        meta = FileMeta(layout="standard", order=tuple(s.key for s in plan.steps), aliases=aliases,
                        tied=tie_metadata(aliases),
                        model_args={k: v for k, v in model_args.items() if not str(k).startswith("lora_")} or None)
        writer = ShardedWriter(target, max_shard_size=max_shard_size, options=options,
                               pinned=dev is not None and dev.type == "cuda", extras_from=src.path, extras_dtype=dtype,
                               ranks=ranks)
        prefix = plan_prefix(src)
        report = write_plan(plan, src, prefix, writer, meta, device=dev,
                            progress=progress and (ranks is None or ranks.rank == 0), label="merging")
    finally:
        if not isinstance(source, Source):
            src.close()
    report.merged = [s.key for s in plan.steps if s.op == "merge"]
    report.inert = plan.inert_modules()
    report.seconds = time.perf_counter() - started
    return report


def _device(device: str | torch.device | None) -> torch.device | None:
    if device is None:
        return None
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise CheckpointFileError(f"device {device!r} is not a device torch knows ({e}); use cpu or cuda") from None
    if dev.type not in ("cpu", "cuda"):
        raise CheckpointFileError(f"device {device!r}: streaming merges run on cpu or cuda")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise CheckpointFileError("device cuda was asked for, but torch sees no CUDA device")
    return dev


def _paths(*things: object) -> list[PathLike]:
    out: list[PathLike] = []
    for t in things:
        if isinstance(t, Source):
            out.extend(t.paths())
        elif isinstance(t, (str, os.PathLike)):
            out.append(t)
    return out


def plan_prefix(src: Source) -> str:
    """The wrapper prefix (``_orig_mod.``, ``module.``) of the source's keys (planning checked they share one)."""
    keys = src.keys()
    return split_prefix(keys[0])[0] if keys else ""


def read_factors(source: Source, layout: Layout) -> dict[str, torch.Tensor]:
    """The LoRA factors (and magnitudes, alphas) of a file that also holds its base: small, read now; keys as in the file."""
    return {layout.prefix + k: source.read(layout.prefix + k) for m in layout.modules for k in m.factor_keys}


def plan_stream_merge(
    src: Source,
    adapter: PathLike | Source | Mapping[str, torch.Tensor] | Checkpoint | None,
    *,
    alpha: Alpha | None,
    dtype: torch.dtype | None,
    layout: Layout | None = None,
    fan_in_fan_out: bool | None = None,
    kinds: Mapping[str, str] | None = None,
) -> tuple[MergePlan, dict[str, Any]]:
    """The merge plan over the source's ``meta`` tensors, and the source's ``model_args`` (or {})."""
    meta = src.meta_tensors()
    if adapter is None:  # a LoRA file that holds its base: factors are small, read them now
        info = src.recorded()
        layout = layout or info.detect(meta, kinds=kinds)
        small = read_factors(src, layout)
        plan = plan_merge({**meta, **small}, alpha=info.resolve_alpha(alpha), dtype=dtype, layout=layout,
                          fan_in_fan_out=fan_in_fan_out)
        model_args = info.extra.get("model_args")
        return plan, dict(model_args) if isinstance(model_args, Mapping) else {}
    if isinstance(adapter, (str, os.PathLike)):
        with Source.open(adapter) as opened:
            return plan_adapter_merge(opened, meta, model_config=src.model_config, alpha=alpha, dtype=dtype,
                                      fan_in_fan_out=fan_in_fan_out, kinds=kinds), {}
    return plan_adapter_merge(adapter, meta, model_config=src.model_config, alpha=alpha, dtype=dtype,
                              fan_in_fan_out=fan_in_fan_out, kinds=kinds), {}


def tie_metadata(aliases: Mapping[str, str]) -> tuple[tuple[str, ...], ...]:
    """The tied groups of an output that stores each ``alias``'s tensor once, under the key it points at."""
    groups: dict[str, list[str]] = {}
    for alias, key in aliases.items():
        groups.setdefault(key, [key]).append(alias)
    return tuple(tuple(g) for g in groups.values())


def write_plan(
    plan: MergePlan,
    src: Source,
    prefix: str,
    writer: ShardedWriter,
    meta: FileMeta,
    *,
    device: torch.device | None = None,
    progress: bool = False,
    label: str = "merging",
    into: Path | None = None,
) -> StreamReport:
    """Write the plan's output through ``writer``; ``prefix`` goes before the plan's source keys in ``src``.

    A sharded output stores tied tensors in full (an alias in one shard could not reach its tensor in another).
    """
    if writer.sharded and any(s.op == "alias" for s in plan.steps):
        by_key = {s.key: s for s in plan.steps}
        steps = [replace(by_key[s.source], key=s.key) if s.op == "alias" and s.source else s for s in plan.steps]
        plan = replace(plan, steps=steps)
        meta = replace(meta, aliases={}, tied=())  # stored in full: no longer tied in the file
    meta_out = {s.key: _meta_result(plan, s) for s in plan.steps if s.op != "alias"}
    order = [s.key for s in plan.steps if s.op != "alias"]
    entries = [(k, meta_out[k].dtype, tuple(meta_out[k].shape)) for k in order]
    by_key = {s.key: s for s in plan.steps}
    merger = BlockMerger(plan, src, prefix, device, writer.options)
    total = sum(t.numel() * t.dtype.itemsize for t in meta_out.values())
    bar = progress_bar(total, label) if progress else None

    def on_bytes(key: str, n: int) -> None:
        if bar is not None:
            bar.update(n)

    # One torch thread: with more, OpenMP workers spinning between the small block operations took the
    # cores from the reads and writes (a 4 GB merge ran in 3.5 s with 2 threads, 1.8 s with 1, on 2 cores).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return writer.write(entries, meta, lambda k, f: merger.emit(by_key[k], meta_out[k], f), on_bytes=on_bytes,
                            into=into)
    finally:
        torch.set_num_threads(threads)
        if bar is not None:
            bar.close()


def _meta_result(plan: MergePlan, step: Step) -> torch.Tensor:
    """The shape and dtype of a step's output (a merge keeps the base's shape)."""
    src = plan.source(step, plan.big)
    if src is None:  # a lora-only embedding
        assert step.module is not None
        shape: tuple[int, ...] = step.module.delta_shape
    else:
        shape = tuple(src.shape)
    return torch.empty(shape, dtype=plan.out_dtype(step), device="meta")


def merge_to_dcp(
    src: Source,
    out: Output,
    *,
    adapter: Source | None = None,
    alpha: Alpha | None = None,
    dtype: torch.dtype | None = None,
    fan_in_fan_out: bool | None = None,
    kinds: Mapping[str, str] | None = None,
) -> StreamReport:
    """Merge into a ``torch.distributed.checkpoint`` directory, one tensor in memory at a time.

    The plan is :func:`stream_merge`'s (so the values are :func:`~lora_ckpt.merge_lora`'s, bit for bit);
    each output tensor is computed when DCP's writer asks for it. Tied keys are stored in full (DCP
    has no aliases). ``out`` is a folder :class:`~lora_ckpt.output.Output`, installed once complete.
    ``kinds`` as :func:`stream_merge` takes it.
    """
    from lora_ckpt.formats.dcp import write_dcp

    started = time.perf_counter()
    plan, _ = plan_stream_merge(src, adapter, alpha=alpha, dtype=dtype, fan_in_fan_out=fan_in_fan_out, kinds=kinds)
    prefix = plan_prefix(src)
    by_key = {s.key: s for s in plan.steps}
    shapes = {s.key: _meta_result(plan, by_key[s.source] if s.op == "alias" and s.source else s) for s in plan.steps}

    def produce(key: str) -> torch.Tensor:
        step = by_key[key]
        if step.op == "alias" and step.source is not None:
            step = by_key[step.source]
        big = {} if step.source is None or step.from_adapter else {step.source: src.read(prefix + step.source)}
        return plan.compute(step, big)

    with out.writing() as staged:
        write_dcp(staged, shapes, produce)
        files = sorted(p.name for p in staged.iterdir())
    nbytes = sum(t.numel() * t.dtype.itemsize for t in shapes.values())
    report = StreamReport([out.path / f for f in files], len(shapes), nbytes,
                          merged=[s.key for s in plan.steps if s.op == "merge"], inert=plan.inert_modules())
    report.seconds = time.perf_counter() - started
    return report
