"""The live-model adapter: load any checkpoint into any nanoGPT-style model, and merge a live LoRA model.

Works on modules following the nanoGPT LoRA convention (``LoRALinear``/``LoRAEmbedding`` with
``main_weight``, ``lora_A``, ``lora_B`` and ``rank``/``alpha`` attributes), compiled or DDP-wrapped.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import nn

from lora_ckpt._table import render_html, render_text
from lora_ckpt.errors import KeyMismatchError, LayoutError, ShapeError, TiedWeightError
from lora_ckpt.io import Checkpoint, PathLike, as_checkpoint
from lora_ckpt.layout import Layout, LoraModule, detect_layout, matches_any
from lora_ckpt.merge import Alpha, merge_lora, merge_module, resolve_scales

__all__ = ["LoadReport", "load_into", "merged_state_dict", "module_alphas", "unwrap"]


@dataclass
class LoadReport:
    """What :func:`load_into` did, key by key (model keys, without wrapper prefix).

    ``copied``: taken as they were; ``remapped``: standard weights put into ``main_weight``;
    ``merged``: weights that received a checkpoint's LoRA update; ``initialised``: LoRA factors
    the checkpoint could not supply, left as the model initialised them; ``ignored``: keys passed
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


def unwrap(model: nn.Module) -> nn.Module:
    """Return the module inside ``torch.compile`` (``_orig_mod``) and DDP/DataParallel (``module``) wrappers."""
    while True:
        inner = getattr(model, "_orig_mod", None)
        if isinstance(inner, nn.Module):
            model = inner
        elif isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            model = model.module
        else:
            return model


def module_alphas(model: nn.Module) -> dict[str, float]:
    """Return ``{module name: alpha}`` for each LoRA module of ``model`` that has factors."""
    out: dict[str, float] = {}
    for name, mod in unwrap(model).named_modules():
        if isinstance(getattr(mod, "lora_A", None), nn.Module) and hasattr(mod, "alpha"):
            out[name] = float(mod.alpha)
    return out


def merged_state_dict(
    model: nn.Module,
    *,
    device: torch.device | str | None = "cpu",
    dtype: torch.dtype | None = None,
    tied: Literal["untie", "tie"] = "untie",
) -> dict[str, torch.Tensor]:
    """Return the deployable standard state dict of a live LoRA model, without changing the model.

    Alphas come from the modules' ``alpha`` attributes. Sharp edge: entries that need no merge share
    memory with the model when ``device`` is the model's own (as ``state_dict()`` does); merged
    weights are new tensors. See :func:`~lora_ckpt.merge_lora` for ``tied`` and ``dtype``.

    Example:
        >>> from lora_ckpt.testing import make_gpt, make_tokens
        >>> lora = make_gpt(attn_rank=4, randomize=True)
        >>> plain = make_gpt()
        >>> _ = plain.load_state_dict(merged_state_dict(lora))
        >>> torch.testing.assert_close(plain(make_tokens()), lora(make_tokens()))
    """
    inner = unwrap(model)
    with torch.no_grad():
        sd = inner.state_dict()
        layout = detect_layout(sd)
        out = merge_lora(sd, alpha=module_alphas(inner), tied=tied, dtype=dtype, layout=layout) if layout.is_lora else dict(sd)
        if device is not None:
            out = {k: v.to(device) for k, v in out.items()}
    return out


def load_into(
    model: nn.Module,
    checkpoint: Checkpoint | Mapping[str, Any] | PathLike,
    *,
    alpha: Alpha | None = None,
    ignore: Iterable[str] = (),
    tied: Literal["error", "untie", "tie"] = "error",
) -> LoadReport:
    """Load ``checkpoint`` into ``model`` whatever their layouts; return what was done, key by key.

    Standard -> LoRA remaps base weights into ``main_weight`` (adapters keep their initialisation);
    LoRA -> standard merges; LoRA -> LoRA copies a module exactly where rank and alpha match and
    otherwise merges the checkpoint's update into ``main_weight``, leaving the model's fresh factors.
    Strict: every model key except LoRA factors must be supplied and every checkpoint key used,
    unless it matches a glob in ``ignore``. Nothing is loaded unless everything checks out.

    Sharp edge, tied parameters: when the values for parameters the model ties (``wte`` and
    ``lm_head``) differ, as after merging an embedding update, loading raises unless ``tied`` says
    what to do: ``"untie"`` gives each key its own parameter (exact function), ``"tie"`` loads the
    merged weight into the shared parameter (the other key's function changes).

    Args:
        model: a standard or LoRA nanoGPT-style model, compiled or DDP-wrapped or not.
        checkpoint: a file path, a nanoGPT checkpoint dict, a state dict or a :class:`Checkpoint`.
        alpha: the checkpoint's LoRA alpha; recorded values (file metadata, ``model_args``) are used
            when omitted, and a value that contradicts them is an error.
        ignore: glob patterns of keys (without prefix) that need not be used or supplied.
        tied: ``"error"``, ``"untie"`` or ``"tie"``, see above.

    Raises:
        KeyMismatchError, ShapeError, AlphaError, TiedWeightError, LayoutError, CheckpointFileError.

    Example:
        >>> from lora_ckpt.testing import make_gpt
        >>> report = load_into(make_gpt(attn_rank=8), make_gpt().state_dict())
        >>> len(report.remapped), len(report.initialised)
        (4, 4)
    """
    if tied not in ("error", "untie", "tie"):
        raise ValueError(f"tied must be 'error', 'untie' or 'tie', got {tied!r}")
    ckpt = as_checkpoint(checkpoint)
    inner = unwrap(model)
    ignore = tuple(ignore)
    src = detect_layout(ckpt.state_dict)
    tensors = {k[len(src.prefix) :]: v for k, v in ckpt.state_dict.items()}
    model_sd = inner.state_dict(keep_vars=True)
    dst = detect_layout({k: v.detach() for k, v in model_sd.items()})
    report = LoadReport(source_layout=src.kind, model_layout=dst.kind)
    scales = _scales(src, ckpt, alpha)
    plan = _Plan(src, dst, tensors, scales, module_alphas(inner), report)
    values, sources = plan.build()
    _check_strict(src, dst, values, plan.used, ignore, report)
    _check_shapes(dst, values)
    untie = _resolve_ties(inner, values, sources, tied, report)
    with torch.no_grad():
        for key in untie:
            _give_own_parameter(inner, key)
        result = inner.load_state_dict(values, strict=False)
    unexpected_missing = [k for k in result.missing_keys if k not in report.initialised and not matches_any(k, ignore)]
    if result.unexpected_keys or unexpected_missing:  # pragma: no cover - _check_strict covers these
        raise KeyMismatchError(f"load_state_dict disagreed: missing {unexpected_missing}, unexpected {result.unexpected_keys}")
    return report


def _scales(src: Layout, ckpt: Checkpoint, alpha: Alpha | None) -> dict[str, float]:
    if not any(m.has_factors for m in src.modules):
        return {}
    return resolve_scales(src, ckpt.resolve_alpha(alpha))


class _Plan:
    """Per model key: the value to load and where it came from ("copy", "remap", "merge")."""

    def __init__(
        self,
        src: Layout,
        dst: Layout,
        tensors: Mapping[str, torch.Tensor],
        scales: Mapping[str, float],
        model_alphas: Mapping[str, float],
        report: LoadReport,
    ) -> None:
        self.src, self.dst, self.tensors, self.scales = src, dst, tensors, scales
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
        parts += [f"the model has no place for checkpoint key(s) {unused[:8]}"] if unused else []
        raise KeyMismatchError(
            "; ".join(parts) + f" ({src.kind} checkpoint -> {dst.kind} model); check the model config "
            "matches the checkpoint, or pass ignore=[...] glob patterns for keys to leave out"
        )


def _check_shapes(dst: Layout, values: Mapping[str, torch.Tensor]) -> None:
    bad = [f"{k}: checkpoint {tuple(v.shape)} vs model {dst.shapes[k]}" for k, v in values.items() if tuple(v.shape) != dst.shapes[k]]
    if bad:
        raise ShapeError("shapes differ: " + "; ".join(bad[:8]) + "; the model config does not match the checkpoint")


def _resolve_ties(
    model: nn.Module,
    values: dict[str, torch.Tensor],
    sources: Mapping[str, str],
    tied: str,
    report: LoadReport,
) -> list[str]:
    """Check tied model parameters receive one value; return the keys to untie."""
    to_untie: list[str] = []
    for group in _model_ties(model):
        given = [k for k in group if k in values]
        if len(given) < 2 or all(_same(values[given[0]], values[k]) for k in given[1:]):
            continue
        merged = [k for k in given if sources.get(k) == "merge"]
        if tied == "untie":
            keep = merged[0] if merged else given[0]
            to_untie += [k for k in given if k != keep]
            report.untied += [k for k in given if k != keep]
            report.notes.append(f"untied {' = '.join(given)}: each keeps its own value (exact function)")
        elif tied == "tie" and len(merged) == 1:
            for k in given:
                values[k] = values[merged[0]]
            report.notes.append(f"tied {' = '.join(given)} to the merged {merged[0]}")
        else:
            reason = (
                f"the LoRA update merged into {merged[0]} would be lost, or leak into "
                f"{', '.join(k for k in given if k != merged[0])}"
                if len(merged) == 1
                else "the checkpoint holds different values for them"
            )
            choices = (
                "tied='untie' (give each key its own parameter: the model computes exactly what the checkpoint did) "
                "or tied='tie' (load the merged weight into the shared parameter: the tied head changes too)"
                if len(merged) == 1
                else "tied='untie' (give each key its own parameter)"
            )
            raise TiedWeightError(f"the model ties {' = '.join(given)}, but {reason}; choose {choices}")
    return to_untie


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a is b or (a.shape == b.shape and a.dtype == b.dtype and torch.equal(a, b))


def _model_ties(model: nn.Module) -> list[list[str]]:
    by_id: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        by_id.setdefault(id(p), []).append(name)
    return [names for names in by_id.values() if len(names) > 1]


def _give_own_parameter(model: nn.Module, key: str) -> None:
    owner_name, _, attr = key.rpartition(".")
    owner = model.get_submodule(owner_name)
    old = getattr(owner, attr)
    setattr(owner, attr, nn.Parameter(old.detach().clone(), requires_grad=old.requires_grad))
