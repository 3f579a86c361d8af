"""A state dict with what its file records beside it: :class:`Checkpoint`, and reading checkpoint dicts."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from lora_ckpt._table import Compact
from lora_ckpt.errors import AlphaError, CheckpointFileError, LayoutError, LoraCkptError, brief
from lora_ckpt.filemeta import META_KEY, FileMeta
from lora_ckpt.layout import Layout, ModuleKind, check_dense, detect_layout

__all__ = ["STATE_DICT_KEYS", "Checkpoint", "checkpoint_from_dict", "is_state_dict"]

#: Where checkpoint dicts keep their state dict (nanoGPT: ``model``; Lightning: ``state_dict``).
STATE_DICT_KEYS = ("model", "state_dict", "model_state_dict")


@dataclass
class Checkpoint(Compact):
    """A state dict with what is known about it: alpha, where it came from, and the rest of the file.

    ``extra`` holds the other entries of a checkpoint dict (``optimizer``, ``model_args``,
    ``iter_num`` …); ``alpha`` is the alpha recorded in the file (lora_ckpt metadata, or nanoGPT's
    ``model_args['lora_alpha']``), or None where the file does not say; ``kinds`` the module kinds
    (module -> ``"linear"``/``"embedding"``) its lora_ckpt metadata records, {} where it records none.
    """

    state_dict: dict[str, torch.Tensor]
    alpha: float | dict[str, float] | None = None
    alpha_source: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    path: Path | None = None
    metadata: dict[str, Any] = field(default_factory=dict)
    kinds: dict[str, str] = field(default_factory=dict)

    def __repr__(self) -> str:
        alpha = self.alpha if not isinstance(self.alpha, Mapping) else f"{{{len(self.alpha)} modules}}"
        return (f"Checkpoint(tensors={len(self.state_dict)}, alpha={alpha}, alpha_source={self.alpha_source!r}, "
                f"extra={sorted(map(str, self.extra))}, path={str(self.path) if self.path else None!r})")

    def resolve_alpha(self, alpha: float | Mapping[str, float] | None) -> float | Mapping[str, float] | None:
        """The alpha to merge with: ``alpha`` if given, else the recorded one; raise if they disagree."""
        if alpha is None or self.alpha is None:
            return alpha if alpha is not None else self.alpha
        if _same_alpha(alpha, self.alpha):
            return alpha
        where = f" in {self.path}" if self.path else ""
        raise AlphaError(
            f"alpha={_fmt(alpha)} conflicts with alpha {_fmt(self.alpha)} recorded{where} ({self.alpha_source}); "
            "drop the alpha argument to use the recorded value"
        )

    def resolve_kinds(self, kinds: Mapping[str, str] | None) -> dict[str, str] | None:
        """The module kinds to detect with: the recorded ones and ``kinds``; raise where ``kinds`` names a module
        the file records as the other kind (a ``"*"`` entry is checked by :meth:`detect`, which sees the shapes)."""
        given = dict(kinds or {})
        if not self.kinds:
            return given or None
        clash = {n: k for n, k in given.items() if n != "*" and n in self.kinds and self.kinds[n] != k}
        if clash:
            where = self.path or "the checkpoint"
            shown = [f"{n} is recorded as {self.kinds[n]} in {where}; drop kinds={{{n!r}:{k!r}}} (CLI: --kinds {n}={k})"
                     for n, k in list(clash.items())[:3]]
            more = f" ({len(clash)} modules in all)" if len(clash) > 3 else ""
            raise LayoutError("kinds: " + "; ".join(shown) + f"{more} to use the recorded kinds")
        return {**self.kinds, **given}

    def detect(self, tensors: Mapping[str, torch.Tensor] | None = None, *,
               kinds: Mapping[str, str] | None = None) -> Layout:
        """The :class:`~lora_ckpt.Layout` of ``tensors`` (default: :attr:`state_dict`; a file's ``meta`` stand-ins
        too), each module's kind settled by what the file records and by ``kinds``; raise if they disagree.

        ``kinds`` is :func:`~lora_ckpt.detect_layout`'s: module -> kind, ``"*"`` for every module whose shapes fit
        both and that neither ``kinds`` nor the file names. A ``"*"`` that contradicts the recorded kind of such a
        module is refused like a named one.

        Raises:
            LayoutError: ``kinds`` contradicts a recorded kind, or as :func:`~lora_ckpt.detect_layout`.
        """
        tensors = self.state_dict if tensors is None else tensors
        layout = detect_layout(tensors, kinds=self.resolve_kinds(kinds))  # type: ignore[arg-type]
        star = (kinds or {}).get("*")
        if star is None or not self.kinds:
            return layout
        clash = [m.name for m in layout.modules
                 if m.name in self.kinds and m.name not in (kinds or {}) and self.kinds[m.name] != star
                 and _fits(layout, m.name, tensors, star)]
        if clash:
            names = ", ".join(clash[:3]) + (", …" if len(clash) > 3 else "")
            recorded = sorted({self.kinds[n] for n in clash})
            raise LayoutError(
                f"kinds: {len(clash)} module(s) ({names}) whose shapes fit both kinds are recorded as "
                f"{' or '.join(recorded)} in {self.path or 'the checkpoint'}; drop kinds={{'*':{star!r}}} "
                f"(CLI: --kinds {star}) to use the recorded kinds"
            )
        return layout

    def record(self, meta: FileMeta | None) -> Checkpoint:
        """Take the alpha and module kinds this checkpoint's file records (lora_ckpt metadata; the alpha else
        ``model_args['lora_alpha']``)."""
        if meta is not None:
            self.metadata = meta.to_dict()
            self.kinds = dict(meta.kinds)
            if meta.alpha is not None:
                self.alpha, self.alpha_source = meta.alpha, "lora_ckpt metadata"
                return self
        model_args = self.extra.get("model_args")
        if isinstance(model_args, Mapping) and model_args.get("lora_alpha") is not None:
            value = model_args["lora_alpha"]
            try:
                finite = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
            except OverflowError:  # an int too large for a float
                finite = False
            if not finite:
                where = f"{self.path}: " if self.path else ""
                raise AlphaError(
                    f"{where}model_args['lora_alpha'] is {brief(value)}, not a finite number; pass the alpha yourself "
                    "(pass alpha=... (CLI: --alpha A)) or fix model_args"
                )
            self.alpha, self.alpha_source = float(value), "model_args['lora_alpha']"
        return self


def _fits(layout: Layout, name: str, tensors: Mapping[str, torch.Tensor], kind: str) -> bool:
    """Whether module ``name``'s own tensors fit ``kind`` too (detected alone, told that kind)."""
    module = {layout.prefix + k: tensors[layout.prefix + k] for k in layout.module(name).keys}
    kinds: dict[str, ModuleKind] = {name: kind}  # type: ignore[dict-item]
    try:
        detect_layout(module, layout=layout.kind, kinds=kinds)
    except LoraCkptError:
        return False
    return True


def _same_alpha(a: float | Mapping[str, float], b: float | Mapping[str, float]) -> bool:
    if isinstance(a, Mapping) and isinstance(b, Mapping):
        return dict(a) == dict(b)
    if isinstance(a, Mapping):
        return all(v == b for v in a.values())
    if isinstance(b, Mapping):
        return all(v == a for v in b.values())
    return float(a) == float(b)


def _fmt(alpha: float | Mapping[str, float]) -> str:
    if isinstance(alpha, Mapping):
        values = set(alpha.values())
        return _fmt(values.pop()) if len(values) == 1 else "{per-module}"
    return f"{float(alpha):g}"


def is_state_dict(obj: object) -> bool:
    """Whether ``obj`` is a non-empty mapping of string keys to tensors."""
    return (
        isinstance(obj, Mapping) and bool(obj)
        and all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items())
    )


def checkpoint_from_dict(obj: object, path: Path | None) -> Checkpoint:
    """Return the checkpoint in a loaded object: a state dict, or a checkpoint dict holding one.

    Raises:
        LayoutError: neither a state dict nor a dict holding one under ``model``/``state_dict``/``model_state_dict``.
        CheckpointFileError: invalid lora_ckpt metadata (see :class:`~lora_ckpt.filemeta.FileMeta`).
    """
    where = f"{path}: " if path else ""
    if not isinstance(obj, Mapping):
        raise LayoutError(f"{where}expected a state dict or a checkpoint dict, got {type(obj).__name__}")
    if is_state_dict(obj):
        check_dense(obj, where=where)
        return Checkpoint(dict(obj), path=path)
    key = next((k for k in STATE_DICT_KEYS if is_state_dict(obj.get(k))), None)
    if key is None:
        found = sorted(k if isinstance(k, str) else brief(k) for k in obj)
        raise LayoutError(
            f"{where}no state dict found: expected tensors at the top level or under one of "
            f"{list(STATE_DICT_KEYS)}; found keys {brief(found[:6])}"
        )
    extra = {k: v for k, v in obj.items() if k not in (key, META_KEY)}
    state_dict = dict(obj[key])
    _refuse_meta(state_dict, path)
    check_dense(state_dict, where=where)
    meta = None
    if obj.get(META_KEY) is not None:
        meta = FileMeta.from_dict(obj[META_KEY], stored=state_dict, where=path or "the checkpoint")
        meta.check_keys(state_dict, where=path or "the checkpoint")
        meta.check_kinds({k: tuple(t.shape) for k, t in state_dict.items()}, where=path or "the checkpoint")
    return Checkpoint(state_dict, extra=extra, path=path).record(meta)


def _refuse_meta(state_dict: Mapping[str, torch.Tensor], path: Path | None) -> None:
    if path is None:
        return  # a state dict in memory may hold meta tensors for planning; files must hold data
    empty = [k for k, v in state_dict.items() if v.device.type == "meta"]
    if empty:
        raise CheckpointFileError(
            f"{path}: {empty[:3]} {'is a meta tensor' if len(empty) == 1 else 'are meta tensors'} with no data; "
            "the file was saved from a model that was never materialised: save it again from real weights"
        )
