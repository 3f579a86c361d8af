"""Extract, resize, combine and unmerge adapters file to file: inputs through :class:`~lora_ckpt.source.Source`,
outputs through :class:`~lora_ckpt.output.Output`, the arithmetic in :mod:`lora_ckpt.lowrank`.

Extraction reads the two models tensor by tensor (row blocks, positioned reads), so its memory stays near
the largest tensor whatever the model's size: a ΔW is held whole only when its float32 copy is no larger than
the largest input tensor (or 64 MiB); larger ones are read in row blocks once per randomized-SVD pass
(``svd="full"`` holds the ΔW and its SVD). Resize, combine and unmerge hold their inputs in memory (an adapter
is small; unmerge holds the merged model).

Layer types (``nn.Linear``, GPT-2's ``Conv1D``, ``nn.Embedding``) and tied weights are facts of the model, read
from the base folder's ``config.json``: with transformers installed, the model is built on the ``meta``
device (no memory) and each layer's type read off it, as PEFT decides; without it, the model type's Conv1D
layers are known (:func:`~lora_ckpt.formats.hf.module_types`) and every other 2-d weight is taken as
``nn.Linear``, which the report says.
"""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import os
import re
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

import torch

from lora_ckpt.progress import progress_bar
from lora_ckpt.dtypes import DType, as_dtype
from lora_ckpt.errors import CheckpointFileError, LayoutError
from lora_ckpt.formats.hf import meta_model_facts, module_types, tied_weights, write_model_folder
from lora_ckpt.formats.peft import load_peft_adapter, write_peft_adapter
from lora_ckpt.io import write_checkpoint
from lora_ckpt.layout import KOHYA, PEFT, Layout, split_prefix
from lora_ckpt.lowrank import (
    Kind,
    LowRankReport,
    LowRankResult,
    SvdMethod,
    combine_lora,
    extract_lora,
    resize_lora,
    unmerge_lora,
)
from lora_ckpt.output import Output, PathLike
from lora_ckpt.relayout import convert_layout
from lora_ckpt.source import Source

__all__ = ["LowRankFileResult", "SourceRows", "combine_files", "extract_files", "layer_facts", "resize_files",
           "unmerge_files"]

log = logging.getLogger(__name__)

# PEFT config fields a resize or combine sets anew; the rest of the first input's config is carried.
_RECOMPUTED = ("r", "lora_alpha", "rank_pattern", "alpha_pattern", "use_rslora", "use_dora", "peft_type",
               "fan_in_fan_out", "task_type")


@dataclass
class LowRankFileResult:
    """What a file operation wrote and its per-module report (printed by the CLI, ``--json`` as :meth:`to_dict`)."""

    outputs: list[Path]
    report: LowRankReport
    seconds: float = 0.0
    leftovers: list[str] = field(default_factory=list)

    @property
    def warnings(self) -> list[str]:
        """What may surprise, for stderr: changed tensors the output leaves out."""
        left = self.report.left_out
        return [f"{len(left)} tensor(s) are not handled exactly (see the notes above): "
                f"{', '.join(left[:4])}{' …' if len(left) > 4 else ''}"] * bool(left) + self.report.warnings

    def to_dict(self) -> dict[str, Any]:
        return {"outputs": [str(p) for p in self.outputs], "seconds": round(self.seconds, 3),
                "leftovers": self.leftovers, **self.report.to_dict()}

    def __str__(self) -> str:
        return f"{self.report}\nwrote {', '.join(map(str, self.outputs))} ({self.seconds:.1f} s)"


class SourceRows:
    """A :class:`~lora_ckpt.lowrank.RowReader` over an open :class:`~lora_ckpt.source.Source`: row ranges read
    on demand (positioned reads), keys without their wrapper prefix."""

    def __init__(self, source: Source) -> None:
        self.source = source
        self.names: dict[str, str] = {}
        for key in source.keys():
            name = split_prefix(key)[1]
            if self.names.setdefault(name, key) != key:
                raise LayoutError(f"{source.path}: {self.names[name]!r} and {key!r} are one key under different "
                                  "wrapper prefixes; keep one of them")

    def keys(self) -> Iterable[str]:
        return self.names.keys()

    def shape(self, key: str) -> tuple[int, ...]:
        return self.source.entries[self.names[key]].shape

    def dtype(self, key: str) -> torch.dtype:
        return self.source.entries[self.names[key]].dtype

    def rows(self, key: str, start: int, stop: int, *, scratch: torch.Tensor | None = None) -> torch.Tensor:
        full = self.names[key]
        if not self.shape(key):
            return self.source.read(full)
        if scratch is not None:
            return self.source.read_into(full, start, stop, scratch)
        return self.source.read(full, start, stop)

    def where(self, key: str) -> str:
        return str(self.source.entries[self.names[key]].file)


#: Module names that usually are embeddings: only for warnings where the layer types were said, never for decisions.
_EMBEDDING_NAME = re.compile(r"(^|\.)(embed\w*|wte|wpe|tok_embeddings|word_embeddings|\w*_embeddings?)$")


def layer_facts(
    model_config: Mapping[str, Any] | None, names: Iterable[str], *, fan_in_fan_out: bool | None = None,
    kinds: Mapping[str, Kind] | None = None,
) -> tuple[dict[str, Kind], dict[str, str], str | None]:
    """Per module name the layer type (``linear``/``conv1d``/``embedding``), the tied weights (alias -> key) and a
    note where the types are stated rather than read; from the base model's ``config.json`` (see the module
    docstring).

    Where the model can be built (transformers installed, ``architectures`` in the config) its layers decide, and
    ``fan_in_fan_out`` or ``kinds`` may not contradict them. Otherwise they are said: ``fan_in_fan_out`` states
    that the 2-d weights are Conv1D (True) or nn.Linear (False) (a known ``model_type`` says it too), and ``kinds``
    (module name -> ``"embedding"``/``"linear"``, ``"*"`` for every other module) which ones are embeddings. With
    neither, :class:`LayoutError`: the shapes cannot tell, and an embedding taken as nn.Linear would load into PEFT
    as missing keys (its update lost).
    """
    names = list(names)
    given = dict(kinds or {})
    built = meta_model_facts(model_config)
    if built is not None:
        found, tied = built
        if fan_in_fan_out is not None and any((k == "conv1d") != fan_in_fan_out for k in found.values()
                                              if k in ("linear", "conv1d")):
            raise LayoutError(f"fan_in_fan_out={fan_in_fan_out} contradicts the base model's config.json (its layer "
                              "types decide); drop the argument")
        wrong = [f"{n}={k} (it is {found.get(n, 'not a layer')})" for n, k in given.items()
                 if n != "*" and found.get(n) not in (k, "conv1d" if k == "linear" else k)]
        if wrong:
            raise LayoutError(f"kinds {', '.join(wrong[:3])} contradict the base model's config.json (its layer types "
                              "decide); drop them (CLI: --kinds)")
        return found, tied, None
    types = module_types(model_config, names)
    why = ("no config.json records the base model's layer types" if model_config is None else
           "transformers is not installed, so the layer types of the model config.json describes are not known"
           if importlib.util.find_spec("transformers") is None else
           "transformers cannot build the model config.json describes (no 'architectures', or one it lacks), so its "
           "layer types are not known")
    example = next((n for n in names if _EMBEDDING_NAME.search(n)), names[0] if names else "MODULE")
    embeddings = (f"kinds={{{example!r}:'embedding'}} (CLI: --kinds {example}=embedding) for each embedding, or "
                  "kinds={'*':'linear'} (CLI: --kinds linear) where none is")
    if types is not None and fan_in_fan_out is not None:
        raise LayoutError(f"config.json's model_type says which 2-d weights are Conv1D: drop fan_in_fan_out (CLI: "
                          f"--fan-in-fan-out); {why}, so say only the embeddings: {embeddings}")
    if fan_in_fan_out is None and not given:  # a weight's shape never tells: (out, in) and (in, out) both fit ΔW
        raise LayoutError(
            f"{why}, and an adapter's factors depend on them: give the base as a Hugging Face model folder whose "
            "config.json transformers can build, or say them: "
            + (f"model_type gives the rest, so {embeddings}" if types is not None else
               "fan_in_fan_out=False (CLI: --no-fan-in-fan-out) for nn.Linear weights or fan_in_fan_out=True (CLI: "
               f"--fan-in-fan-out) for GPT-2's Conv1D, and {embeddings}"))
    default: Kind = "conv1d" if fan_in_fan_out else "linear"
    star = given.pop("*", None)
    out: dict[str, Kind] = {}
    for n in names:
        by_type = ("conv1d" if types[n] else "linear") if types is not None else default
        kind: Kind = given.get(n, star or by_type)
        out[n] = by_type if kind == "linear" else kind
    unknown = sorted(set(given) - set(names))
    if unknown:
        raise LayoutError(f"kinds names {unknown[:3]}, which are not 2-d weights of the base; check the names: "
                          "modules, without '.weight' (CLI: --kinds)")
    said = [f"{n}={k}" for n, k in given.items()]
    taken = ("the layer types of its model_type (Conv1D where GPT-2 has them, nn.Linear elsewhere)"
             if types is not None else "Conv1D" if default == "conv1d" else "nn.Linear")
    return out, {}, (f"{why}: the 2-d weights are taken as {taken}"
                     f"{', except ' + ', '.join(said[:3]) if said else ''}, as said")


def said_types_warnings(report: LowRankReport) -> list[str]:
    """Where the layer types were said rather than read off the model: a factored module whose name looks like an
    embedding but is taken as another layer, and factored embeddings whose tied output head is not known."""
    out = [f"{r.module} looks like an embedding by its name but is taken as {r.kind}, as said; if it is an "
           f"nn.Embedding, say kinds={{{r.module!r}:'embedding'}} (CLI: --kinds {r.module}=embedding): PEFT loads "
           "an embedding's update only as one" for r in report.rows if r.kind != "embedding"
           and _EMBEDDING_NAME.search(r.module)]
    out += [f"{r.module}: whether an output head shares this embedding's weight (tie_word_embeddings) is not known "
            "here, since the layer types were said; if one does, its half of the update is not in the adapter: give "
            "the base as a model folder transformers can build" for r in report.rows if r.kind == "embedding"]
    return out


def extract_files(
    base: PathLike,
    tuned: PathLike,
    out: PathLike,
    *,
    rank: int | None = None,
    energy: float | None = None,
    sv_epsilon: float | None = None,
    sv_ratio: float | None = None,
    modules: str | None = None,
    to: Literal["peft", "kohya"] = "peft",
    others: Literal["save", "report"] = "save",
    svd: SvdMethod = "auto",
    oversample: int = 8,
    niter: int = 2,
    dtype: DType | None = None,
    acc: DType | None = None,
    device: str | None = None,
    fan_in_fan_out: bool | None = None,
    kinds: Mapping[str, Kind] | None = None,
    progress: bool = False,
    overwrite: bool = False,
    block_bytes: int = 32 << 20,
) -> LowRankFileResult:
    """Extract the LoRA adapter ``tuned − base`` (files or Hugging Face folders, sharded too) into ``out``.

    ``to="peft"``: a PEFT adapter folder that ``PeftModel.from_pretrained(base_model, out)`` loads (ranks in
    ``rank_pattern``/``alpha_pattern``, changed norms and the like in ``modules_to_save``); ``to="kohya"``: a
    kohya ``.safetensors`` file (linear modules only). See :func:`~lora_ckpt.lowrank.extract_lora` for the
    options; memory as the module docstring says.

    Raises:
        LoraCkptError: any input problem, before anything is written (a NaN or an infinity named with its key and
            file); ValueError: a ``dtype`` that names no dtype; OSError from the file system.
    """
    started = time.perf_counter()
    dtype = as_dtype(dtype)
    if to not in ("peft", "kohya"):
        raise LayoutError(f"extract writes to='peft' (a folder) or to='kohya' (a file), not {to!r}; convert the PEFT "
                          "adapter afterwards (lora-ckpt convert --to … --base BASE)")
    with Source.open(base) as b, Source.open(tuned) as t:
        for src, role in ((b, "base"), (t, "tuned")):
            if src.kind == "peft":
                raise LayoutError(f"{src.path} is a PEFT adapter, not a model: extract takes the base model and the "
                                  "fine-tuned one (BASE TUNED OUT) and writes the adapter")
        target = Output.prepare(out, overwrite=overwrite, folder=True if to == "peft" else None,
                                inputs=[*b.paths(), *t.paths()])
        if to == "kohya" and target.folder:
            raise CheckpointFileError(f"{target.path}: a kohya adapter is a file; give a .safetensors name")
        rb, rt = SourceRows(b), SourceRows(t)
        names = [k[: -len(".weight")] for k in rb.keys() if k.endswith(".weight") and len(rb.shape(k)) == 2]
        config = b.model_config if b.kind == "folder" else None
        layers, tied, note = layer_facts(config, names, fan_in_fan_out=fan_in_fan_out, kinds=kinds)
        tied = {a: s for a, s in tied.items() if a not in set(rt.keys()) and s in set(rt.keys())}
        if to == "kohya":  # kohya has no LoRA embeddings: a changed embedding is a tensor it cannot hold
            layers = {n: "other" if k == "embedding" else k for n, k in layers.items()}
        largest = max((e.nbytes for e in [*b.entries.values(), *t.entries.values()]), default=0)
        total = sum(rt.shape(k)[0] * rt.shape(k)[1] for k in rt.keys() if len(rt.shape(k)) == 2)
        bar = progress_bar(total, "extracting", unit="param") if progress else None
        try:
            result = extract_lora(
                rb, rt, rank=rank, energy=energy, sv_epsilon=sv_epsilon, sv_ratio=sv_ratio, modules=modules,
                kinds=layers, tied=tied, others="refuse" if to == "kohya" and others == "save" else others, svd=svd,
                oversample=oversample, niter=niter, dtype=dtype, acc=acc, device=device,
                resident_bytes=max(largest, 64 << 20), block_bytes=block_bytes,
                on_module=(lambda name, n: bar.update(n)) if bar is not None else None,
            )
        finally:
            if bar is not None:
                bar.close()
        if note:
            result.report.notes.append(note)
            result.report.warnings.extend(said_types_warnings(result.report))
        if not result.alpha and not result.report.saved:
            result.report.notes.append("the two models are equal: the adapter holds no update")
        named = Path(os.path.abspath(base)) if os.path.exists(base) else b.path  # found from any directory
        _write_adapter(target, result, to=to, base_path=named)
    return LowRankFileResult([target.path], result.report, time.perf_counter() - started, list(target.removed))


def _write_adapter(target: Output, result: LowRankResult, *, to: str, base_path: Path,
                   carried: Mapping[str, Any] | None = None, kinds: Mapping[str, str] | None = None) -> None:
    """Install ``result`` (PEFT-keyed or in its own layout) at ``target``."""
    with target.writing() as tmp:
        if to == "peft" and result.layout == "peft":
            extra = {**dict(carried or {}), **result.config}
            extra.setdefault("base_model_name_or_path", str(base_path))
            task_type = extra.pop("task_type", None)
            if not result.alpha:
                raise LayoutError("no module changed in a way an adapter can hold; nothing to write")
            write_peft_adapter(tmp, result.state_dict, alpha=result.alpha, fan_in_fan_out=result.fan_in_fan_out,
                               task_type=task_type, extra_config=extra)
        elif to == "kohya" and result.layout == "peft":
            rel = convert_layout(result.state_dict, KOHYA.name, scales={m: 1.0 for m in result.alpha},
                                 layout=PEFT.name, fan_in_fan_out=False)
            write_checkpoint(tmp, rel.state_dict, alpha=rel.alpha, suffix=".safetensors")
        else:
            write_checkpoint(tmp, result.state_dict, alpha=result.alpha or None, suffix=target.path.suffix, kinds=kinds)


def _open_adapter(source: Source, alpha: float | None) -> tuple[dict[str, torch.Tensor], dict[str, float] | None,
                                                                 Any, dict[str, Any] | None, Layout | str]:
    """An adapter's tensors, its scales (a PEFT folder's, from its config), the alpha to use otherwise, its config,
    and its layout (a file's settled by the module kinds it records)."""
    if source.kind == "peft":
        peft = load_peft_adapter(source)
        if alpha is not None:
            raise LayoutError(f"{source.path}: the alpha comes from adapter_config.json; do not pass alpha")
        return peft.state_dict, peft.scales, None, peft.config, PEFT.name
    ckpt = source.load()
    return ckpt.state_dict, None, ckpt.resolve_alpha(alpha), None, ckpt.detect()


def resize_files(
    adapter: PathLike,
    out: PathLike,
    *,
    rank: int | None = None,
    energy: float | None = None,
    sv_epsilon: float | None = None,
    sv_ratio: float | None = None,
    alpha: float | None = None,
    overwrite: bool = False,
) -> LowRankFileResult:
    """Resize the adapter ``adapter`` (a PEFT folder or any LoRA file) into ``out``, in its own layout.

    See :func:`~lora_ckpt.lowrank.resize_lora`. A PEFT folder keeps its config (target modules,
    ``modules_to_save``, task type); rank and alpha become per-module exact (``rank_pattern``/``alpha_pattern``).
    """
    started = time.perf_counter()
    with Source.open(adapter) as src:
        target = Output.prepare(out, overwrite=overwrite, folder=True if src.kind == "peft" else None,
                                inputs=src.paths())
        sd, scales, rec_alpha, config, layout = _open_adapter(src, alpha)
        result = resize_lora(sd, rank=rank, energy=energy, sv_epsilon=sv_epsilon, sv_ratio=sv_ratio,
                             alpha=rec_alpha, scales=scales, layout=layout, name=str(src.path))
        _install_like(target, result, config, src, layout)
    return LowRankFileResult([target.path], result.report, time.perf_counter() - started, list(target.removed))


def _standard(src: Source) -> bool:
    """Whether a file's keys are in the standard layout (read from its header: nothing is loaded)."""
    try:
        return not src.recorded().detect(src.meta_tensors()).is_lora
    except LayoutError:
        return False  # a LoRA layout that needs more facts: the combine says which


def _install_like(target: Output, result: LowRankResult, config: Mapping[str, Any] | None, src: Source,
                  layout: Layout | str) -> None:
    """Write a resized or combined adapter in its input's form: a PEFT folder keeps the rest of its config, a file
    the module kinds (``layout``'s) of the modules it keeps."""
    if config is not None:
        carried = {k: v for k, v in config.items() if k not in _RECOMPUTED}
        task = config.get("task_type")
        fields: dict[str, Any] = {"task_type": task} if task else {}
        if result.config.get("exclude_modules"):  # modules the rule left out: PEFT must not adapt them
            fields["exclude_modules"] = _union(config.get("exclude_modules"), result.config["exclude_modules"])
        peft_result = LowRankResult(result.state_dict, result.alpha, "peft", result.report, fields,
                                    fan_in_fan_out=bool(config.get("fan_in_fan_out")))
        _write_adapter(target, peft_result, to="peft", base_path=Path(str(config.get("base_model_name_or_path") or "")),
                       carried=carried)
        return
    if target.folder:
        raise CheckpointFileError(f"{target.path}: {src.path} is a file; give a file name (.safetensors or .pt)")
    kinds = {n: k for n, k in layout.kinds.items() if n in result.alpha} if isinstance(layout, Layout) else None
    _write_adapter(target, result, to=result.layout, base_path=src.path, kinds=kinds)


def combine_files(
    adapters: Sequence[PathLike],
    out: PathLike,
    *,
    weights: Sequence[float] | None = None,
    rank: int | None = None,
    energy: float | None = None,
    sv_epsilon: float | None = None,
    sv_ratio: float | None = None,
    alpha: float | None = None,
    base_model: str | None = None,
    overwrite: bool = False,
) -> LowRankFileResult:
    """Combine ``adapters`` (PEFT folders, or LoRA files of one layout) into ``out`` (the first one's form).

    See :func:`~lora_ckpt.lowrank.combine_lora`. ``alpha``: for files that do not record theirs (the same for each).
    PEFT adapters must name one base model (``base_model_name_or_path``; an adapter that names none takes the
    others'): updates of different models do not add up. ``base_model`` overrides that check and is recorded as
    the combined adapter's base.

    Raises:
        LayoutError: PEFT adapters that name different base models (and no ``base_model``); any other input problem
            as :func:`~lora_ckpt.lowrank.combine_lora` says, before anything is written.
    """
    started = time.perf_counter()
    with contextlib.ExitStack() as stack:
        sources = [stack.enter_context(Source.open(p)) for p in adapters]
        for src in sources:
            if src.kind in ("folder", "dcp") or (src.kind != "peft" and _standard(src)):
                raise LayoutError(f"{src.path} is in the standard layout: it holds no LoRA update (combine takes "
                                  "adapters, then OUT)")
        kinds = {s.kind == "peft" for s in sources}
        if len(kinds) > 1:
            raise LayoutError("mix of PEFT folders and other files; convert them to one layout first (lora-ckpt "
                              "convert ADAPTER OUT --to peft; a kohya file needs its base too: --base BASE)")
        target = Output.prepare(out, overwrite=overwrite, folder=True if sources[0].kind == "peft" else None,
                                inputs=[p for s in sources for p in s.paths()])
        opened = [_open_adapter(s, alpha) for s in sources]
        bases = _one_base([(s, o[3]) for s, o in zip(sources, opened)], base_model)
        result = combine_lora(
            [o[0] for o in opened], weights=weights, rank=rank, energy=energy, sv_epsilon=sv_epsilon, sv_ratio=sv_ratio,
            alphas=[o[2] for o in opened], scales=[o[1] for o in opened],
            layouts=[o[4] for o in opened], names=[str(s.path) for s in sources],
        )
        config = opened[0][3]
        if config is not None:
            fields = ("target_modules", "modules_to_save")
            merged_cfg = dict(config)
            for o in opened[1:]:
                other = o[3] or {}
                for f in fields:
                    if other.get(f) != merged_cfg.get(f):
                        merged_cfg[f] = _union(merged_cfg.get(f), other.get(f))
            merged_cfg["base_model_name_or_path"] = bases
            config = merged_cfg
        _install_like(target, result, config, sources[0], opened[0][4])
    return LowRankFileResult([target.path], result.report, time.perf_counter() - started, list(target.removed))


def _one_base(adapters: Sequence[tuple[Source, Mapping[str, Any] | None]], given: str | None) -> str | None:
    """The base model the PEFT ``adapters`` were trained on (``given`` if given); refused when two name different ones."""
    if given is not None:
        if any(c is None for _, c in adapters):
            raise LayoutError("base_model is recorded in a PEFT adapter's config; these adapters are files that "
                              "record no base model: drop base_model (CLI: --base-model)")
        return given
    named = [(s.path, c.get("base_model_name_or_path")) for s, c in adapters if c is not None]
    named = [(p, b) for p, b in named if b]
    if len({b for _, b in named}) > 1:
        (p1, b1), (p2, b2) = named[0], next((p, b) for p, b in named if b != named[0][1])
        raise LayoutError(f"{p1} was trained on {b1!r} but {p2} on {b2!r} (base_model_name_or_path); updates of "
                          "different base models do not add up: combine adapters of one base, or pass "
                          "--base-model NAME (Python: base_model=NAME) to combine them anyway for the base NAME")
    return named[0][1] if named else None


def _union(a: Any, b: Any) -> Any:
    """Two ``target_modules``/``modules_to_save`` values as one: lists joined; regexes alternated."""
    if a is None or b is None:
        return a if b is None else b
    if isinstance(a, list) and isinstance(b, list):
        return sorted(set(a) | set(b))
    as_re = [x if isinstance(x, str) else "|".join(rf"(.*\.)?{y}" for y in x) for x in (a, b)]
    return f"(?:{as_re[0]})|(?:{as_re[1]})"


def unmerge_files(
    merged: PathLike,
    adapter: PathLike,
    out: PathLike,
    *,
    base: PathLike | None = None,
    alpha: float | None = None,
    dtype: DType | None = None,
    fan_in_fan_out: bool | None = None,
    overwrite: bool = False,
) -> LowRankFileResult:
    """Take the adapter's update out of the merged model ``merged``, writing ``out`` (a file or a model folder).

    In memory. See :func:`~lora_ckpt.lowrank.unmerge_lora`; ``base``: the original weights, when known, to report
    the largest error against them. A PEFT adapter's orientation is decided as PEFT loads it (the merged folder's
    ``config.json``).
    """
    from lora_ckpt.formats.peft import adapter_orientation

    started = time.perf_counter()
    dtype = as_dtype(dtype)
    with contextlib.ExitStack() as stack:
        m_src = stack.enter_context(Source.open(merged))
        a_src = stack.enter_context(Source.open(adapter))
        b_src = stack.enter_context(Source.open(base)) if base is not None else None
        inputs = [*m_src.paths(), *a_src.paths(), *(b_src.paths() if b_src else [])]
        target = Output.prepare(out, overwrite=overwrite, inputs=inputs,
                                exists_hint="is it the base? give the base as base=BASE (CLI: --base BASE) and a new OUT")
        merged_sd = m_src.load().state_dict
        orientation: Any = fan_in_fan_out
        tied: dict[str, str] = {}
        alias_ads: dict[str, tuple[dict[str, torch.Tensor], float]] = {}
        if a_src.kind == "peft":
            peft = load_peft_adapter(a_src)
            if alpha is not None:
                raise LayoutError(f"{a_src.path}: the alpha comes from adapter_config.json; do not pass alpha")
            plain = {split_prefix(k)[1]: v for k, v in merged_sd.items()}
            orientation = adapter_orientation(peft, plain, model_config=m_src.model_config, given=fan_in_fan_out)
            sd, scales, rec_alpha = peft.state_dict, peft.scales, None
            tied = _tied_alias_modules(sd, m_src, plain)
            if tied and b_src is None:
                raise LayoutError(_tied_unmerge_refusal(tied, m_src.path))
            sd, scales, alias_ads = _split_tied(sd, scales, tied)
        else:
            ck = a_src.load()
            sd, scales, rec_alpha = ck.state_dict, None, ck.resolve_alpha(alpha)
        base_sd = b_src.load().state_dict if b_src is not None else None
        result = unmerge_lora(merged_sd, sd, alpha=rec_alpha, scales=scales, fan_in_fan_out=orientation,
                              base=base_sd, dtype=dtype, layout=PEFT.name if a_src.kind == "peft" else ck.detect(),
                              names=(str(m_src.path), str(a_src.path)))
        if tied and base_sd is not None:
            _unmerge_tied(result, tied, alias_ads, base_sd, orientation=orientation, dtype=dtype,
                          names=(str(m_src.path), str(a_src.path)))
        with target.writing() as tmp:
            if target.folder:
                write_model_folder(tmp, result.state_dict, like=m_src.path if m_src.kind == "folder" else None,
                                   dtype=dtype)
            else:
                write_checkpoint(tmp, result.state_dict, suffix=target.path.suffix)
    return LowRankFileResult([target.path], result.report, time.perf_counter() - started, list(target.removed))


def _tied_alias_modules(sd: Mapping[str, torch.Tensor], merged: Source, plain: Mapping[str, torch.Tensor]
                        ) -> dict[str, str]:
    """The adapter's modules (name -> the key stored) whose weight the merged model ties to another key and does not
    store (a tied ``lm_head``): their update went into, or is, the shared tensor's."""
    if merged.kind != "folder":
        return {}
    ties = tied_weights(merged.model_config)
    prefix = PEFT.key_prefix
    return {alias[: -len(".weight")]: key for alias, key in ties.items()
            if alias.endswith(".weight") and alias not in plain and key in plain
            and any(k.startswith(f"{prefix}{alias[: -len('.weight')]}.") for k in sd)}


def _tied_unmerge_refusal(tied: Mapping[str, str], merged: Path) -> str:
    pairs = ", ".join(f"{a}.weight to {k}" for a, k in tied.items())
    names = ", ".join(tied)
    return (f"{merged} ties {pairs} (config.json) and stores the shared tensor once, and the adapter updates "
            f"{names} too: PEFT's merge_and_unload adds both updates to the shared tensor, a fine-tune (or a merge "
            "saved tied) holds one, and the merged weights cannot tell which; give the base model (--base BASE, "
            "Python: base=BASE) to decide")


def _split_tied(sd: dict[str, torch.Tensor], scales: dict[str, float], tied: Mapping[str, str]
                ) -> tuple[dict[str, torch.Tensor], dict[str, float], dict[str, tuple[dict[str, torch.Tensor], float]]]:
    """The adapter without the tied alias modules, and each alias module's own entries and scale."""
    prefix = PEFT.key_prefix
    own = {a: {k: v for k, v in sd.items() if k.startswith(f"{prefix}{a}.")} for a in tied}
    gone = {k for entries in own.values() for k in entries}
    rest = {k: v for k, v in sd.items() if k not in gone}
    return rest, {k: v for k, v in scales.items() if k not in tied}, {a: (own[a], scales[a]) for a in tied}


def _unmerge_tied(result: LowRankResult, tied: Mapping[str, str],
                  alias_ads: Mapping[str, tuple[dict[str, torch.Tensor], float]],
                  base: Mapping[str, torch.Tensor], *, orientation: Any, dtype: torch.dtype | None,
                  names: tuple[str, str]) -> None:
    """Where the shared tensor of a tied alias holds the alias's update too (PEFT's merge_and_unload adds both),
    take it out as well: the base decides which of once or both fits it; the report says which."""
    plain_base = {split_prefix(k)[1]: v for k, v in base.items()}
    for alias, key in tied.items():
        once = result.state_dict[key]
        w = f"{alias}.weight"
        sd, scale = alias_ads[alias]
        both = unmerge_lora({w: once}, sd, scales={alias: scale}, fan_in_fan_out=orientation, dtype=dtype,
                            layout=PEFT.name, names=names)
        ref = plain_base[key].to(torch.float64)
        err_once = float((once.to(torch.float64) - ref).abs().max())
        err_both = float((both.state_dict[w].to(torch.float64) - ref).abs().max())
        if err_both < err_once:
            result.state_dict[key] = both.state_dict[w]
            stored = key[: -len(".weight")]
            rows = [*result.report.rows, *both.report.rows]
            result.report.rows[:] = [replace(r, max_abs_error=err_both) if r.module in (stored, alias) else r
                                     for r in rows]
            result.report.notes.append(
                f"{alias}: {names[0]} ties {w} to {key} (stored once) and its tensor holds both updates (as PEFT's "
                f"merge_and_unload adds them): both taken out of {key} (largest |W − W_base| {err_both:.3g})")
        else:
            result.report.notes.append(
                f"{alias}: {names[0]} ties {w} to {key} (stored once) and its tensor holds one update: {alias}'s is "
                f"not taken out again (largest |W − W_base| {err_once:.3g}; with it {err_both:.3g})")
