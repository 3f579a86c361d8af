"""File operations: merge and convert files and folders, choosing the streamed or the in-memory route.

This module owns the routing the command line uses (stream when the output is safetensors and the merge
keeps exact function; in memory otherwise), the pairs of outputs some targets need (written both or
neither), and the summaries printed afterwards. Each operation opens each input once
(:class:`~lora_ckpt.source.Source`), detects the layout once and checks every output once
(:class:`~lora_ckpt.output.Output`) before anything is computed.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch

from lora_ckpt._table import Compact
from lora_ckpt.dtypes import DType, as_dtype
from lora_ckpt.checkpoint import Checkpoint
from lora_ckpt.convert import LoadReport, tie_conflicts, convert_state_dict, fresh_factors
from lora_ckpt.errors import CheckpointFileError, LayoutError
from lora_ckpt.formats.gpt2 import hf_to_nanogpt, nanogpt_lora_to_peft
from lora_ckpt.formats.hf import write_model_folder
from lora_ckpt.adapter import plan_adapter_merge
from lora_ckpt.formats.peft import PeftConfig, adapter_orientation, load_peft_adapter, write_peft_adapter
from lora_ckpt.io import write_checkpoint
from lora_ckpt.layout import LAYOUTS, PEFT, Layout, detect_layout, layout_spec, split_prefix, tied_groups
from lora_ckpt.merge import Alpha, MergePlan, Orientation, plan_merge
from lora_ckpt.progress import progress_bar
from lora_ckpt.output import FILE_SUFFIXES, Output, PathLike, write_together
from lora_ckpt.relayout import convert_layout
from lora_ckpt.source import ADAPTER_CONFIG, Source
from lora_ckpt.streaming import StreamOptions, stream_convert, stream_merge
from lora_ckpt.streaming.writer import human_size
from lora_ckpt.streaming.merge import merge_to_dcp, tie_metadata
from lora_ckpt.streaming.parallel import Ranks

__all__ = ["FileResult", "convert_files", "merge_files"]

_PICKLES = FILE_SUFFIXES[1:]


@dataclass(repr=False)
class FileResult(Compact):
    """What a file operation wrote: the outputs, how, and what the user should know about it.

    ``lines`` is the human summary (one fact per line); ``warnings`` what may surprise (a zero update, tied
    keys written apart), for stderr; ``leftovers`` what was cleaned up from
    interrupted runs; ``conversion`` the key-by-key report of a conversion to a template's layout.
    """

    outputs: list[Path]
    streamed: bool
    merged: int = 0
    bytes: int = 0
    seconds: float = 0.0
    lines: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    left_out: list[str] = field(default_factory=list)
    leftovers: list[str] = field(default_factory=list)
    conversion: LoadReport | None = None

    def to_dict(self) -> dict[str, Any]:
        """The result as JSON-able values."""
        return {"outputs": [str(p) for p in self.outputs], "streamed": self.streamed, "merged": self.merged,
                "bytes": self.bytes, "seconds": round(self.seconds, 3), "left_out": self.left_out,
                "leftovers": self.leftovers, "summary": self.lines, "warnings": self.warnings}

    def __str__(self) -> str:
        return "\n".join(self.lines)


def merge_files(
    source: PathLike,
    dst: PathLike,
    *,
    adapter: PathLike | None = None,
    alpha: Alpha | None = None,
    dtype: DType | None = None,
    tied: Literal["untie", "tie"] = "untie",
    max_shard_size: int | str | None = None,
    device: str | None = None,
    progress: bool = False,
    overwrite: bool = False,
    fan_in_fan_out: bool | None = None,
    options: StreamOptions | None = None,
    format: Literal["auto", "dcp"] = "auto",
    ranks: Ranks | None = None,
    kinds: Mapping[str, str] | None = None,
) -> FileResult:
    """Merge a LoRA checkpoint (``adapter=None``) or an adapter into its base ``source``, writing ``dst``.

    ``dst`` is a ``.safetensors`` file or a model folder (streamed, memory bounded by the largest tensor)
    or a ``.pt`` checkpoint (in memory, other checkpoint entries kept). ``tied="tie"`` runs in memory.
    ``format="dcp"``: ``dst`` is a ``torch.distributed.checkpoint`` directory instead (one tensor in memory
    at a time). ``source`` may itself be a DCP directory, read without a process group.
    ``ranks``: under ``torchrun`` (:meth:`Ranks.from_env <lora_ckpt.streaming.parallel.Ranks.from_env>`), every
    rank runs this call and writes its share of a streamed output's shards; rank 0 installs it.
    ``fan_in_fan_out``: whether base weights are stored (in, out) (GPT-2's ``Conv1D``) where no config says.
    ``kinds``: module -> ``"linear"``/``"embedding"`` (``"*"``: every such module) for LoRA factors whose square
    shapes fit both (loralib's), as :func:`~lora_ckpt.detect_layout` takes it; files lora_ckpt wrote record them,
    and a ``kinds`` that contradicts the record is refused (:meth:`~lora_ckpt.Checkpoint.detect`).

    Raises:
        LoraCkptError: any input problem, before anything is written; OSError from the file system.
    """
    dtype = as_dtype(dtype)
    with contextlib.ExitStack() as stack:
        src = stack.enter_context(Source.open(source))
        ad = stack.enter_context(Source.open(adapter)) if adapter is not None else None
        named_base = None
        if ad is None and src.kind == "peft" and src.config is not None:  # an adapter alone: the base it names
            ad, named_base = src, PeftConfig.read(src.config, where=src.path / ADAPTER_CONFIG).base_model()
            try:
                src = stack.enter_context(Source.open(named_base))
            except CheckpointFileError as e:  # say where the name came from, and the way around it
                raise CheckpointFileError(
                    f"{e} (the base model named by {ad.path / ADAPTER_CONFIG}'s base_model_name_or_path); give the "
                    "base model too: merge_files(BASE, DST, adapter=ADAPTER) (CLI: lora-ckpt merge BASE ADAPTER DST)"
                ) from None
        out = Output.prepare(dst, overwrite=overwrite, inputs=[*src.paths(), *(ad.paths() if ad else [])],
                             folder=True if format == "dcp" else None)
        streams = tied == "untie" and (out.folder or out.path.suffix not in _PICKLES)
        if ranks is not None and (format == "dcp" or not streams):
            raise CheckpointFileError(f"{out.path}: a merge across {ranks.world} ranks writes safetensors (a folder, "
                                      "sharded with --max-shard-size); run a .pt, --tied tie or --format dcp output "
                                      "in one process")
        if format == "dcp":
            return _merge_dcp(src, ad, out, alpha, dtype, tied, max_shard_size, fan_in_fan_out, kinds)
        if tied == "tie" and src.kind == "dcp":
            raise LayoutError(f"{src.path}: a DCP checkpoint does not record which weights are tied, so "
                              "tied='tie' (CLI: --tied tie) has nothing to tie; merge without it (each key keeps "
                              "its own value: exact function)")
        if max_shard_size is not None and not out.folder:
            raise CheckpointFileError(f"{out.path}: a sharded output is a folder; give a folder name (no suffix) "
                                      "or drop --max-shard-size")
        if ad is not None:
            result = _merge_adapter(src, ad, out, alpha, dtype, tied, max_shard_size, device, progress, options,
                                    streams, fan_in_fan_out, ranks=ranks, kinds=kinds)
            if named_base is not None:
                result.lines.insert(0, f"base: {named_base} (the adapter's base_model_name_or_path)")
            return result
        if streams:
            layout = src.recorded().detect(src.meta_tensors(), kinds=kinds)
            if not layout.is_lora:
                raise LayoutError(f"{src.path}: holds no LoRA modules (standard layout), so there is nothing to "
                                  "merge; to merge an adapter into it give both: merge_files(BASE, DST, "
                                  "adapter=ADAPTER) (CLI: merge BASE ADAPTER DST)")
            updated = _tied_updates(src, layout)
            report = stream_merge(src, out, alpha=alpha, dtype=dtype, max_shard_size=max_shard_size, device=device,
                                  progress=progress, layout=layout, fan_in_fan_out=fan_in_fan_out, options=options,
                                  ranks=ranks)
            result = FileResult(report.files, True, len(report.merged), report.bytes, report.seconds,
                                left_out=report.left_out)
            inert = report.inert
            dropped = _standard_extra(src.recorded(), out.path)[1]
        else:
            ckpt = src.load()
            layout = ckpt.detect(kinds=kinds)  # the tensors: ties too
            updated = _tied_updates(src, layout)
            plan = plan_merge(ckpt.state_dict, alpha=ckpt.resolve_alpha(alpha), tied=tied, dtype=dtype, layout=layout,
                              fan_in_fan_out=fan_in_fan_out)
            merged = _execute(plan, progress)  # a loaded file holds data (meta tensors are refused when it is read)
            extra, dropped = _standard_extra(ckpt, out.path)
            if out.folder:
                _write_standard(out, merged, like=src.path, dtype=dtype)
            else:
                with out.writing() as tmp:
                    write_checkpoint(tmp, merged, extra=extra, suffix=out.path.suffix)
            result = FileResult([out.path], False, len(plan.merged_modules()))
            inert = plan.inert_modules()
        result.leftovers = list(out.removed)
        present = sum(m.has_factors for m in layout.modules)
        result.lines.append(f"merged {result.merged} LoRA module(s) of {source} into "
                            + (f"the model folder {dst}/" if out.folder else f"{dst}")
                            + (f" ({present} present)" if present != result.merged else ""))
        for group in updated:
            how = "untied: each key keeps its own value" if tied == "untie" else "tied to the merged weight"
            result.lines.append(f"tied group {' = '.join(group)}: {how}")
        if updated and tied == "untie":
            keys = " and ".join(updated[0][:2])
            result.warnings.append(
                f"{out.path} keeps {keys} apart, because the update landed on one of them; a model that ties them "
                "(karpathy's nanoGPT does) would keep only one in load_state_dict and compute something else: load "
                "it with lora_ckpt.load_into(model, path, tied='untie'), or merge with --tied tie to keep them tied"
            )
        _warn_inert(result, inert)
        if src.kind == "dcp":
            result.warnings += _dcp_tie_hints(src, layout)
        if dropped:
            result.lines.append(f"left out: {', '.join(dropped)} (they do not apply to merged weights)")
        return result
    raise AssertionError("unreachable")  # pragma: no cover


def _merge_adapter(
    base: Source,
    adapter: Source,
    out: Output,
    alpha: Alpha | None,
    dtype: torch.dtype | None,
    tied: str,
    max_shard_size: int | str | None,
    device: str | None,
    progress: bool,
    options: StreamOptions | None,
    streams: bool,
    fan_in_fan_out: bool | None,
    *,
    ranks: Ranks | None = None,
    kinds: Mapping[str, str] | None = None,
) -> FileResult:
    if streams:
        report = stream_merge(base, out, adapter=adapter, alpha=alpha, dtype=dtype, max_shard_size=max_shard_size,
                              device=device, progress=progress, fan_in_fan_out=fan_in_fan_out, options=options,
                              kinds=kinds,
                              ranks=ranks)
        result = FileResult(report.files, True, len(report.merged), report.bytes, report.seconds,
                            left_out=report.left_out, leftovers=list(out.removed))
        inert = report.inert
        result.lines.append(
            f"merged {adapter.path} into {base.path}: {out.path} ({len(report.merged)} weights merged, "
            f"{human_size(report.bytes)} in {len(report.files)} file(s), {report.seconds:.1f} s)"
        )
    else:
        plan = plan_adapter_merge(adapter, base.load().state_dict, model_config=base.model_config, alpha=alpha,
                                  dtype=dtype, fan_in_fan_out=fan_in_fan_out, kinds=kinds)
        left_out = _write_standard(out, _execute(plan, progress), like=base.path, dtype=dtype)
        result = FileResult([out.path], False, len(plan.merged_modules()), left_out=left_out,
                            leftovers=list(out.removed))
        inert = plan.inert_modules()
        result.lines.append(f"merged {adapter.path} into {base.path}: {out.path}")
    _warn_inert(result, inert)
    if result.left_out:
        result.lines.append(f"not copied from {base.path}: {', '.join(result.left_out)} (not part of a model folder)")
    return result


def _merge_dcp(
    src: Source,
    ad: Source | None,
    out: Output,
    alpha: Alpha | None,
    dtype: torch.dtype | None,
    tied: str,
    max_shard_size: int | str | None,
    fan_in_fan_out: bool | None,
    kinds: Mapping[str, str] | None = None,
) -> FileResult:
    if max_shard_size is not None or tied != "untie":
        flag = "max_shard_size (CLI: --max-shard-size)" if max_shard_size is not None else "tied='tie' (CLI: --tied tie)"
        raise CheckpointFileError(f"{out.path}: a DCP output has its own files and no tied keys; drop {flag}")
    report = merge_to_dcp(src, out, adapter=ad, alpha=alpha, dtype=dtype, fan_in_fan_out=fan_in_fan_out, kinds=kinds)
    result = FileResult(report.files, True, len(report.merged), report.bytes, report.seconds,
                        leftovers=list(out.removed))
    result.lines.append(f"merged {len(report.merged)} LoRA module(s) of {src.path}"
                        + (f" and {ad.path}" if ad is not None else "")
                        + f" into the DCP checkpoint {out.path} ({report.tensors} tensors, {human_size(report.bytes)})")
    _warn_inert(result, report.inert)
    return result


def _warn_inert(result: FileResult, inert: list[str]) -> None:
    """Say so when merged modules carry a zero update (every lora_B entry 0, or a scale of 0)."""
    if not inert:
        return
    if len(inert) == result.merged:
        result.warnings.append(
            f"every merged module's update is zero ({len(inert)} of {len(inert)}: lora_B all 0 or a scale of 0), so the "
            "output equals the base; was the adapter trained, and is the alpha right?"
        )
    else:
        result.warnings.append(
            f"{len(inert)} of {result.merged} merged modules carry a zero update (lora_B all 0 or a scale of 0): "
            f"{', '.join(inert[:3])}{' …' if len(inert) > 3 else ''}"
        )


def _execute(plan: MergePlan, progress: bool) -> dict[str, torch.Tensor]:
    """Run a merge plan in memory, with a progress bar over its tensors when asked."""
    bar = progress_bar(len(plan.steps), "merging", unit="tensor") if progress else None
    try:
        return plan.execute(plan.big, on_step=None if bar is None else lambda _: bar.update(1))
    finally:
        if bar is not None:
            bar.close()


def _write_standard(
    out: Output, sd: Mapping[str, torch.Tensor], *, like: Path | None, dtype: torch.dtype | None
) -> list[str]:
    """Write a standard state dict to a file or model folder output; return the files of ``like`` left out."""
    left: list[str] = []
    with out.writing() as tmp:
        if out.folder:
            left = write_model_folder(tmp, sd, like=like if like is not None and like.is_dir() else None, dtype=dtype)
        else:
            write_checkpoint(tmp, sd, suffix=out.path.suffix)
    return left


def _dcp_tie_hints(src: Source, layout: Layout) -> list[str]:
    """DCP records no ties: where an update lands on an embedding that another key could be tied to (same shape
    and dtype, as nanoGPT's wte and lm_head), say what a model that ties them would do."""
    hints = []
    meta = {k[len(layout.prefix):]: t for k, t in src.meta_tensors().items()}
    for m in layout.modules:
        if not (m.has_factors and m.has_base and m.kind == "embedding"):
            continue
        w = meta[m.weight_key]
        partners = [k for k, t in meta.items() if k != m.weight_key and k not in layout.module_by_key
                    and t.shape == w.shape and t.dtype == w.dtype]
        for partner in partners:
            hints.append(
                f"{src.path} is a DCP checkpoint, which does not record tied weights: if the model ties "
                f"{m.name}.weight and {partner} (karpathy's nanoGPT ties wte and lm_head), the merged output keeps "
                "them apart and a model that ties them would keep only one in load_state_dict: load it with "
                "lora_ckpt.load_into(model, path, tied='untie')"
            )
    return hints


def _tied_updates(src: Source, layout: Layout) -> list[tuple[str, ...]]:
    """The tied key groups of the source that a LoRA update lands on."""
    if src.kind == "pickle" and src.loaded is not None:
        groups: tuple[tuple[str, ...], ...] = tied_groups(src.loaded.state_dict)
    else:
        groups = tie_metadata(src.aliases())
    updated = {layout.prefix + m.weight_key for m in layout.modules if m.has_factors and m.has_base}
    by_key = layout.module_by_key

    def written(key: str) -> str:  # the key as the merged output names it: no prefix, no main_weight
        plain = key[len(layout.prefix):]
        m = by_key.get(plain)
        return f"{m.name}.weight" if m is not None and plain == m.weight_key else plain

    return [tuple(written(k) for k in g) for g in groups if updated.intersection(g)]


def _standard_extra(ckpt: Checkpoint, dst: Path) -> tuple[dict[str, object], list[str]]:
    """Entries to keep beside merged weights, and the names left out (optimizer state, LoRA args)."""
    dropped = [k for k in ckpt.extra  # safetensors and folders keep model_args only; HF's flat .bin nothing
               if k == "optimizer" or dst.suffix == ".bin" or (dst.suffix not in _PICKLES and k != "model_args")]
    extra = {k: v for k, v in ckpt.extra.items() if k not in dropped}
    model_args = extra.get("model_args")
    if isinstance(model_args, dict):
        lora_args = sorted(k for k in model_args if str(k).startswith("lora_"))
        extra["model_args"] = {k: v for k, v in model_args.items() if k not in lora_args}
        dropped += [f"model_args[{k!r}]" for k in lora_args]
    return extra, dropped


def convert_files(
    source: PathLike,
    dst: PathLike,
    *,
    to: str,
    like: PathLike | None = None,
    base: PathLike | None = None,
    base_out: PathLike | None = None,
    gpt2: bool = False,
    n_head: int | None = None,
    alpha: Alpha | None = None,
    seed: int = 0,
    ignore: Iterable[str] = (),
    kinds: Mapping[str, str] | None = None,
    max_shard_size: int | str | None = None,
    progress: bool = False,
    overwrite: bool = False,
    fan_in_fan_out: bool | None = None,
    options: StreamOptions | None = None,
    format: Literal["auto", "dcp"] = "auto",
) -> FileResult:
    """Convert ``source`` to the layout ``to`` (``standard``, ``nanogpt`` or any LoRA layout), writing ``dst``.

    ``like``: a template whose LoRA layout a standard source takes (fresh factors seeded by ``seed``; keys
    matching a glob in ``ignore`` need not be used or supplied, e.g. old nanoGPT's ``*.attn.bias`` buffers).
    ``base``: base weights for an adapter-only source. ``base_out``: where base weights go for targets that
    keep them apart (``peft``, ``kohya``); ``dst`` and ``base_out`` are written both or neither. ``gpt2``:
    nanoGPT <-> Hugging Face GPT-2 (Conv1D weights transposed); ``n_head`` for its ``config.json``.
    ``fan_in_fan_out``: whether base weights are stored (in, out), where no config records it.
    Streams whenever what holds the base weights is safetensors. ``format="dcp"`` (``to="standard"`` only):
    ``dst`` is a ``torch.distributed.checkpoint`` directory, as :func:`merge_files` writes it.

    Raises:
        LoraCkptError: any input problem, before anything is written; OSError from the file system.
    """
    if format == "dcp" and to != "standard":
        raise LayoutError(f"format='dcp' (CLI: --format dcp) writes merged weights; use to='standard' (CLI: --to "
                          f"standard), or write the {to} layout as files")
    if to == "standard":
        if gpt2:
            raise LayoutError("gpt2=True (CLI: --gpt2) converts between nanoGPT and Hugging Face GPT-2 in a LoRA "
                              "conversion; to merge, use merge_files (CLI: lora-ckpt merge), which keeps each "
                              "weight's orientation")
        if base is not None:
            return merge_files(base, dst, adapter=source, alpha=alpha, max_shard_size=max_shard_size,
                               progress=progress, overwrite=overwrite, fan_in_fan_out=fan_in_fan_out, options=options,
                               format=format, kinds=kinds)
        return merge_files(source, dst, alpha=alpha, max_shard_size=max_shard_size, progress=progress,
                           overwrite=overwrite, fan_in_fan_out=fan_in_fan_out, options=options, format=format,
                           kinds=kinds)
    target_layout = layout_spec(to).name
    with contextlib.ExitStack() as stack:
        src = stack.enter_context(Source.open(source))
        dst_path = Path(dst)
        if like is not None:
            template = stack.enter_context(Source.open(like))
            if dst_path.suffix == ".safetensors" and src.kind != "peft" and not gpt2:
                report = stream_convert(src, dst, like=template, alpha=alpha, seed=seed, ignore=ignore,
                                        progress=progress, overwrite=overwrite, options=options, kinds=kinds)
                result = FileResult(report.files, True, len(report.merged), report.bytes, report.seconds,
                                    conversion=report.conversion)
                result.lines.append(f"converted {source} to the layout of {like}: {dst} ({report.tensors} tensors, "
                                    f"{human_size(report.bytes)} streamed, {report.seconds:.1f} s)")
            else:
                result = _convert_like(src, template, dst_path, alpha, seed, tuple(ignore), overwrite, gpt2, kinds)
            if result.conversion is not None:
                result.lines.append(str(result.conversion))
                if result.conversion.untied:
                    result.warnings.append(
                        f"{dst} holds its own value for {', '.join(result.conversion.untied)}, which {like} ties to "
                        "another key, because the source holds different values for them; a model that ties them (karpathy's nanoGPT does) would keep only one in "
                        "load_state_dict and compute something else: load it with lora_ckpt.load_into(model, path, "
                        "tied='untie'), or convert the LoRA checkpoint itself rather than its merged form"
                    )
            return result
        if src.kind != "peft" and not gpt2 and base is None and _streams_convert(target_layout, dst_path, base_out):
            report = stream_convert(src, dst, to=target_layout, alpha=alpha, base_out=base_out,
                                    max_shard_size=max_shard_size, seed=seed, progress=progress, overwrite=overwrite,
                                    options=options, kinds=kinds)
            result = FileResult(report.files, True, len(report.merged), report.bytes, report.seconds)
            result.lines.append(
                f"converted {source} to the {target_layout} layout: {dst} ({report.tensors} tensors, "
                f"{human_size(report.bytes)} streamed" + (f" to {base_out}" if base_out else "")
                + f", {report.seconds:.1f} s)"
            )
            return result
        return _convert_in_memory(src, dst_path, target_layout, base, base_out, gpt2, n_head, alpha, overwrite,
                                  fan_in_fan_out, kinds)
    raise AssertionError("unreachable")  # pragma: no cover


def _streams_convert(to: str, dst: Path, base_out: PathLike | None) -> bool:
    """Whether to convert file to file with bounded memory: what holds the base weights is safetensors."""
    if LAYOUTS[to].base_in_file:
        return dst.suffix == ".safetensors"
    return base_out is not None and Path(base_out).suffix not in _PICKLES


def _convert_in_memory(
    src: Source,
    dst: Path,
    to: str,
    base: PathLike | None,
    base_out: PathLike | None,
    gpt2: bool,
    n_head: int | None,
    alpha: Alpha | None,
    overwrite: bool,
    fan_in_fan_out: bool | None,
    kinds: Mapping[str, str] | None = None,
) -> FileResult:
    given = fan_in_fan_out
    orientation: Orientation = False if gpt2 else fan_in_fan_out
    task_type = None
    adapter = None
    settled: Layout | None = None  # the source's layout, where it is not PEFT's (convert_layout detects that)
    if src.kind == "peft":
        adapter = load_peft_adapter(src)
        sd, scales, rec_alpha, extra = adapter.state_dict, adapter.scales, None, {}
        assert adapter.settings is not None
        if not gpt2 and base is None:  # the factors alone: the config's value is carried as it is
            orientation = _agree(given, adapter.settings.fan_in_fan_out, adapter.settings.where)
        task_type = adapter.settings.task_type
        # PEFT's keys decide every kind: kinds may only agree with them
        peft_layout = adapter.layout if not kinds else detect_layout(sd, kinds=kinds, layout=PEFT.name)  # type: ignore
        source_kinds = peft_layout.kinds
    else:
        ckpt = src.load()
        if to == "peft" and gpt2:
            return _nanogpt_to_gpt2_peft(src, ckpt, dst, base_out, n_head, alpha, overwrite)
        sd, scales, rec_alpha = ckpt.state_dict, None, ckpt.resolve_alpha(alpha)
        extra = {k: v for k, v in ckpt.extra.items() if k != "optimizer"}
        settled = ckpt.detect(kinds=kinds)
        source_kinds = settled.kinds
    base_sd = None
    inputs: list[PathLike | None] = [*src.paths()]
    if base is not None:
        with Source.open(base) as base_src:
            base_sd = base_src.load().state_dict
            inputs += base_src.paths()
            model_config = base_src.model_config
        if gpt2:
            base_sd = hf_to_nanogpt(base_sd)
        elif adapter is not None:  # each weight as PEFT would load it: by the base model's layer types
            plain = {split_prefix(k)[1]: v for k, v in base_sd.items()}
            orientation = adapter_orientation(adapter, plain, model_config=model_config, given=given)
    rel = convert_layout(sd, to, alpha=rec_alpha, scales=scales, base=base_sd, fan_in_fan_out=orientation,
                         layout=settled,
                         task_type=task_type)
    writes_base = bool(rel.base) and base is None
    if writes_base and base_out is None:
        raise LayoutError(f"{src.path} holds base weights, which {to} keeps apart; pass --base-out PATH")
    if base_out is not None and not writes_base:
        raise LayoutError(f"--base-out {base_out}: nothing to write there (the base weights stay in {base or src.path}); "
                          "drop --base-out")
    out = Output.prepare(dst, overwrite=overwrite, folder=True if to == "peft" else None, inputs=inputs, siblings=[base_out])
    outputs = [out]
    if writes_base:
        outputs.insert(0, Output.prepare(base_out, overwrite=overwrite, inputs=inputs, siblings=[dst]))  # type: ignore[arg-type]
    with write_together(*outputs) as staged:
        if writes_base:
            assert rel.base is not None
            base_target = outputs[0]
            if base_target.folder:
                write_model_folder(staged[0], rel.base)
            else:
                write_checkpoint(staged[0], rel.base, suffix=base_target.path.suffix)
        if to == "peft":
            write_peft_adapter(staged[-1], rel.state_dict, alpha=rel.alpha, fan_in_fan_out=rel.fan_in_fan_out,
                               task_type=rel.task_type)
        else:
            keep = extra if dst.suffix != ".safetensors" else {k: v for k, v in extra.items() if k == "model_args"}
            write_checkpoint(staged[-1], rel.state_dict, alpha=rel.alpha, extra=keep, suffix=dst.suffix,
                             kinds=source_kinds)
    result = FileResult([o.path for o in outputs], False, leftovers=[x for o in outputs for x in o.removed])
    result.lines.append(f"converted {src.path} to the {to} layout: {dst} ({len(rel.alpha)} LoRA modules, factors unchanged)")
    return result


def _agree(given: bool | None, recorded: bool, where: str) -> bool:
    """The orientation a config records, unless an argument contradicts it (an error naming both)."""
    if given is not None and given != recorded:
        raise LayoutError(f"fan_in_fan_out={given} contradicts fan_in_fan_out={recorded} in {where}; drop the argument "
                          "(CLI: --fan-in-fan-out / --no-fan-in-fan-out) to use the recorded value")
    return recorded


def _nanogpt_to_gpt2_peft(
    src: Source, ckpt: Checkpoint, dst: Path, base_out: PathLike | None, n_head: int | None, alpha: Alpha | None,
    overwrite: bool,
) -> FileResult:
    recorded = (ckpt.extra.get("model_args") or {}).get("n_head")
    if n_head is not None and recorded is not None and n_head != recorded:
        raise LayoutError(f"n_head={n_head} (CLI: --n-head {n_head}) contradicts the checkpoint's "
                          f"model_args['n_head'] = {recorded!r}; drop n_head=... (CLI: --n-head) to use the recorded one")
    n_head = n_head or recorded
    if not base_out or not n_head:
        raise LayoutError("--to peft --gpt2 needs --base-out DIR (the GPT-2 model folder) and --n-head "
                          "(or model_args['n_head'] in the checkpoint)")
    nanogpt_lora_to_peft(ckpt.state_dict, base_out, dst, alpha=ckpt.resolve_alpha(alpha), n_head=int(n_head),
                         overwrite=overwrite, inputs=[src.path])
    result = FileResult([Path(base_out), dst], False)
    result.lines.append(f"wrote the GPT-2 base to {base_out} and the PEFT adapter to {dst}")
    return result


def _convert_like(src: Source, template: Source, dst: Path, alpha: Alpha | None, seed: int, ignore: tuple[str, ...],
                  overwrite: bool, gpt2: bool, kinds: Mapping[str, str] | None = None) -> FileResult:
    ckpt = src.load()
    if gpt2:  # Hugging Face GPT-2 (Conv1D weights, lm_head left out as tied) in nanoGPT's layout first
        ckpt = dataclasses.replace(ckpt, state_dict=hf_to_nanogpt(ckpt.state_dict))
    t_ckpt = template.load()
    layout = t_ckpt.detect()  # a template lora_ckpt wrote records its kinds
    conversion = convert_state_dict(ckpt, layout, alpha=alpha, target_alpha=t_ckpt.alpha, ignore=ignore, kinds=kinds)
    values = {**conversion.values, **fresh_factors(layout, conversion.report.initialised, seed=seed)}
    tie_conflicts(layout.tied, values, conversion.report)
    ordered = {layout.prefix + k: values[k] for k in layout.shapes}
    extra = {k: v for k, v in ckpt.extra.items() if k != "optimizer"}
    if isinstance(t_ckpt.extra.get("model_args"), dict):  # the output is for the template's model (nanoGPT resumes
        extra["model_args"] = dict(t_ckpt.extra["model_args"])  # from checkpoint['model_args'])
    if dst.suffix == ".safetensors":
        extra = {k: v for k, v in extra.items() if k == "model_args"}
    out = Output.prepare(dst, overwrite=overwrite, folder=False, inputs=[*src.paths(), *template.paths()])
    with out.writing() as tmp:
        write_checkpoint(tmp, ordered, alpha=t_ckpt.alpha, extra=extra, suffix=dst.suffix, kinds=layout.kinds)
    result = FileResult([dst], False, conversion=conversion.report, leftovers=list(out.removed))
    result.lines.append(f"converted {src.path} ({conversion.report.source_layout}) to the layout of {template.path}: {dst}")
    return result
