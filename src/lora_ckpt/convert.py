"""Converting a state dict into another model's layout: the pure core behind :func:`~lora_ckpt.load_into`.

Per module: standard -> LoRA remaps the base weights into ``main_weight``; LoRA -> standard merges;
LoRA -> LoRA copies where kind, rank and scale agree and otherwise merges into ``main_weight``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import torch

from lora_ckpt._table import Compact, render_html, render_text
from lora_ckpt.errors import AlphaError, KeyMismatchError, LayoutError, ShapeError
from lora_ckpt.io import Checkpoint
from lora_ckpt.layout import Layout, LoraModule, detect_layout, matches_any
from lora_ckpt.merge import Alpha, merge_module, resolve_scales

__all__ = ["Conversion", "LoadReport", "convert_state_dict", "fresh_factors"]


@dataclass(repr=False)
class LoadReport(Compact):
    """What :func:`load_into` did, key by key (model keys, without wrapper prefix).

    ``copied``: taken as they were; ``remapped``: standard weights put into ``main_weight``;
    ``merged``: weights that received a checkpoint's LoRA update; ``initialised``: LoRA factors
    the checkpoint could not supply (``lora_B`` set to zero so their update is zero, ``lora_A`` left as the
    model initialised it); ``ignored``: keys passed
    over by the ``ignore`` option; ``untied``: model keys given their own parameter.
    """

    source_layout: str
    model_layout: str
    copied: list[str] = field(default_factory=list)
    remapped: list[str] = field(default_factory=list)
    merged: list[str] = field(default_factory=list)
    initialised: list[str] = field(default_factory=list)
    ignored: list[str] = field(default_factory=list)
    untied: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def rows(self) -> list[dict[str, object]]:
        kinds = ("copied", "remapped", "merged", "initialised", "ignored", "untied")
        return [{"action": k, "keys": len(getattr(self, k)), "examples": ", ".join(getattr(self, k)[:2])} for k in kinds]

    def __str__(self) -> str:
        head = f"{self.source_layout} checkpoint -> {self.model_layout} model"
        return "\n".join([head, render_text(self.rows()), *self.notes])

    def _repr_html_(self) -> str:
        notes = "".join(f"<br>{n}" for n in self.notes)
        return f"<p>{self.source_layout} checkpoint -> {self.model_layout} model{notes}</p>" + render_html(self.rows())


def _scales(src: Layout, ckpt: Checkpoint, alpha: Alpha | None) -> dict[str, float]:
    if not any(m.has_factors for m in src.modules):
        return {}
    return resolve_scales(src, ckpt.resolve_alpha(alpha))


class _Plan:
    """Per target key: the value and where it came from ("copy", "remap", "merge")."""

    def __init__(
        self,
        src: Layout,
        dst: Layout,
        tensors: Mapping[str, torch.Tensor],
        scales: Mapping[str, float],
        model_alphas: Mapping[str, float],
        report: LoadReport,
        keep_factors: bool = False,
    ) -> None:
        self.src, self.dst, self.tensors, self.scales = src, dst, tensors, scales
        self.keep_factors = keep_factors
        self.model_alphas, self.report = model_alphas, report
        self.values: dict[str, torch.Tensor] = {}
        self.sources: dict[str, str] = {}
        self.used: set[str] = set()

    def put(self, key: str, value: torch.Tensor, how: str, *used: str) -> None:
        self.values[key], self.sources[key] = value, how
        self.used.update(used)
        getattr(self.report, {"copy": "copied", "remap": "remapped", "merge": "merged"}[how]).append(key)

    def merged(self, m: LoraModule, dtype: torch.dtype) -> torch.Tensor:
        self.used.update(m.keys)
        return merge_module(m, self.tensors, self.scales[m.name], dtype=dtype)

    def build(self) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
        src_mods = {m.name: m for m in self.src.modules}
        dst_mods = {m.name: m for m in self.dst.modules}
        for name, d in dst_mods.items():
            s = src_mods.get(name)
            if s is not None:
                self._lora_to_lora(s, d)
            elif f"{name}.weight" in self.tensors:
                self._standard_to_lora(name, d)
        for name, s in src_mods.items():
            if name not in dst_mods and f"{name}.weight" in self.dst.shapes:
                self._lora_to_standard(s)
        for key in self.dst.shapes:
            if key not in self.values and key in self.tensors and key not in self.src.module_by_key:
                self.put(key, self.tensors[key], "copy", key)
        return self.values, self.sources

    def _lora_to_lora(self, s: LoraModule, d: LoraModule) -> None:
        model_alpha = self.model_alphas.get(d.name)
        if model_alpha is None and self.keep_factors and s.has_factors and s.kind == d.kind and s.rank == d.rank:
            raise AlphaError(
                f"{d.name}: the model's module records no alpha (as alpha, lora_alpha or scaling), so it cannot be "
                f"told whether the checkpoint's rank-{s.rank} factors keep their scale in it; pass model_alpha=<the "
                "alpha the model was built with> (merging them into main_weight would reset the trained factors)"
            )
        same_scale = not s.has_factors or (
            d.rank > 0 and model_alpha is not None and self.scales[s.name] == model_alpha / d.rank
        )
        if s.kind == d.kind and s.rank == d.rank and same_scale:
            for key in s.keys:
                self.put(key, self.tensors[key], "copy", key)
            return
        if not d.has_base:
            raise LayoutError(
                f"{d.name}: the model's lora-only embedding (rank {d.rank}) cannot hold the checkpoint's "
                f"{s.kind} module (rank {s.rank}); build the model with the checkpoint's rank and alpha"
            )
        dtype = self.dst.dtypes[d.weight_key]
        if s.has_factors:
            self.put(d.weight_key, self.merged(s, dtype), "merge")
            self.report.notes.append(f"{d.name}: rank {s.rank} -> {d.rank}: update merged into main_weight")
        else:
            self.put(d.weight_key, self.tensors[s.weight_key], "copy", s.weight_key)
        if s.has_bias:
            self.put(d.bias_key, self.tensors[s.bias_key], "copy", s.bias_key)

    def _standard_to_lora(self, name: str, d: LoraModule) -> None:
        if not d.has_base:
            raise LayoutError(
                f"{name}.weight: the model's {name} is a lora-only embedding with no main_weight, so it "
                "cannot hold a full weight; give the model a main_weight or add the key to ignore"
            )
        self.put(d.weight_key, self.tensors[f"{name}.weight"], "remap", f"{name}.weight")
        if f"{name}.bias" in self.tensors:
            self.put(d.bias_key, self.tensors[f"{name}.bias"], "remap", f"{name}.bias")

    def _lora_to_standard(self, s: LoraModule) -> None:
        std = f"{s.name}.weight"
        if s.has_factors:
            self.put(std, self.merged(s, self.dst.dtypes[std]), "merge")
        else:
            self.put(std, self.tensors[s.weight_key], "remap", s.weight_key)
        if s.has_bias:
            self.put(f"{s.name}.bias", self.tensors[s.bias_key], "remap", s.bias_key)


def _check_strict(
    src: Layout,
    dst: Layout,
    values: Mapping[str, torch.Tensor],
    used: set[str],
    ignore: tuple[str, ...],
    report: LoadReport,
) -> None:
    factors = dst.factor_keys
    report.initialised = [k for k in dst.shapes if k in factors and k not in values]
    missing = [k for k in dst.shapes if k not in values and k not in factors]
    unused = [k for k in src.shapes if k not in used]
    report.ignored = [k for k in missing + unused if matches_any(k, ignore)]
    missing = [k for k in missing if k not in report.ignored]
    unused = [k for k in unused if k not in report.ignored]
    if missing or unused:
        parts = [f"the checkpoint supplies nothing for model key(s) {missing[:8]}"] if missing else []
        if "lm_head.weight" in missing and "transformer.wte.weight" in values and src.kind == "standard":
            parts[0] += (" (Hugging Face GPT-2 files leave lm_head.weight out, tied to wte: convert them with "
                         "gpt2=True (CLI: convert --gpt2 --like TEMPLATE))")
        parts += [f"the model has no place for checkpoint key(s) {unused[:8]}"] if unused else []
        raise KeyMismatchError(
            "; ".join(parts) + f" ({src.kind} checkpoint -> {dst.kind} model); check the model config "
            "matches the checkpoint, or leave keys out with ignore=[GLOBS] (CLI: --ignore GLOB)"
        )


def _check_shapes(dst: Layout, values: Mapping[str, torch.Tensor]) -> None:
    odd = {k: tuple(v.shape) for k, v in values.items() if tuple(v.shape) != dst.shapes[k]}
    if odd:
        bad = [f"{k}: checkpoint {s} vs model {dst.shapes[k]}" for k, s in odd.items()]
        flipped = all(len(s) == 2 and s[::-1] == dst.shapes[k] for k, s in odd.items())
        raise ShapeError("shapes differ: " + "; ".join(bad[:8]) + (
            "; each is the model's shape transposed: the checkpoint stores these weights (in, out), as Hugging Face "
            "GPT-2's Conv1D does; convert it first with gpt2=True (CLI: convert --gpt2 --like TEMPLATE), or "
            "lora_ckpt.formats.gpt2.hf_to_nanogpt" if flipped else "; the model config does not match the checkpoint"))


@dataclass
class Conversion:
    """The result of :func:`convert_state_dict`: the values per target key, how each was made, and the report."""

    values: dict[str, torch.Tensor]
    sources: dict[str, str]
    report: LoadReport


def convert_state_dict(
    checkpoint: Checkpoint | Mapping[str, torch.Tensor],
    target: Mapping[str, torch.Tensor] | Layout,
    *,
    alpha: Alpha | None = None,
    target_alpha: Alpha | None = None,
    ignore: Iterable[str] = (),
    keep_factors: bool = False,
    kinds: Mapping[str, str] | None = None,
) -> Conversion:
    """Return ``checkpoint``'s weights converted to ``target``'s layout (keys without prefix), and a report.

    LoRA factors the checkpoint cannot supply are absent from ``values`` (listed as ``initialised``
    in the report; :func:`fresh_factors` makes values for them). Nothing is copied that need not be.

    Args:
        checkpoint: the source state dict, or a :class:`~lora_ckpt.Checkpoint` carrying its alpha.
        target: the target's state dict (any device, ``meta`` too) or :class:`~lora_ckpt.Layout`.
        alpha: the source's alpha (defaults to the one the checkpoint records).
        target_alpha: the target's alpha per module (or one float): factors are copied only where
            the target's ``alpha / rank`` equals the source's; unknown means merge.
        ignore: glob patterns of keys that need not be used or supplied.
        keep_factors: refuse (rather than merge) a module whose factors could be copied but whose target
            alpha is unknown: a live model's trained factors are not reset behind the user's back.
        kinds: settles the checkpoint's modules whose square shapes fit both kinds (see :func:`detect_layout`), with
            the kinds its file records (:meth:`~lora_ckpt.Checkpoint.detect`: a contradiction is refused).

    Raises:
        KeyMismatchError, ShapeError, AlphaError, LayoutError.
    """
    ckpt = checkpoint if isinstance(checkpoint, Checkpoint) else Checkpoint(dict(checkpoint))
    ignore = tuple(ignore)
    src = ckpt.detect(kinds=kinds)
    dst = target if isinstance(target, Layout) else detect_layout(target)
    tensors = {k[len(src.prefix) :]: v for k, v in ckpt.state_dict.items()}
    report = LoadReport(source_layout=src.kind, model_layout=dst.kind)
    if isinstance(target_alpha, Mapping) or target_alpha is None:
        dst_alphas = dict(target_alpha or {})
    else:
        dst_alphas = {m.name: float(target_alpha) for m in dst.modules if m.has_factors}
    plan = _Plan(src, dst, tensors, _scales(src, ckpt, alpha), dst_alphas, report, keep_factors)
    values, sources = plan.build()
    _check_strict(src, dst, values, plan.used, ignore, report)
    _check_shapes(dst, values)
    return Conversion(values, sources, report)


def tie_conflicts(
    groups: Iterable[Sequence[str]],
    values: Mapping[str, torch.Tensor],
    report: LoadReport,
    *,
    read: Callable[[torch.Tensor], torch.Tensor] = lambda t: t,
) -> list[tuple[str, ...]]:
    """The template's tied ``groups`` of keys (``wte`` = ``lm_head``) whose converted values differ, recorded in
    ``report``.

    The output keeps each key's own value (exact function), as a merge does; a model built like the template
    would keep only one of them, so callers warn. ``values`` are keyed without prefix; ``read`` turns a
    stand-in (a ``meta`` tensor) into its data.
    """
    found = []
    for group in groups:
        given = [k for k in group if k in values]
        first = values[given[0]] if given else None
        if first is None or all(values[k] is first for k in given[1:]):
            continue
        ref = read(first)
        if all(same_value(ref, read(values[k])) for k in given[1:]):
            continue
        found.append(tuple(given))
        report.untied += given[1:]
        report.notes.append(f"untied {' = '.join(given)}: the source holds different values for them; each keeps "
                            "its own (exact function)")
    return found


def same_value(a: torch.Tensor, b: torch.Tensor) -> bool:
    """The same tensor, or equal in shape, dtype and every element."""
    return a is b or (a.shape == b.shape and a.dtype == b.dtype and torch.equal(a, b))


def fresh_factors(layout: Layout, keys: Iterable[str], *, seed: int = 0) -> dict[str, torch.Tensor]:
    """Return freshly initialised LoRA factors for ``keys`` of ``layout``: a zero update, trainable.

    ``lora_A`` is drawn as ``nn.Linear`` draws its weight (Kaiming-uniform) for linear modules and
    from a standard normal for embeddings; ``lora_B`` is zero, so the module computes its base weight.
    """
    gen = torch.Generator().manual_seed(seed)
    by_key = layout.module_by_key
    out: dict[str, torch.Tensor] = {}
    for key in keys:
        m = by_key[key]
        shape, dtype = layout.shapes[key], layout.dtypes[key]
        if key == m.b_key and m.has_base:
            out[key] = torch.zeros(shape, dtype=dtype)
        elif m.kind == "linear":
            bound = 1.0 / math.sqrt(shape[1])
            out[key] = (torch.rand(shape, generator=gen) * 2 - 1).mul_(bound).to(dtype)
        else:
            out[key] = torch.randn(shape, generator=gen).to(dtype)
    return out
