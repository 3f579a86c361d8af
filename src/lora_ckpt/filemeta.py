"""lora_ckpt's own metadata in the files it writes: the one reader (which validates) and the one writer.

In a ``.safetensors`` file it is the JSON string under ``"lora_ckpt"`` in the header's ``__metadata__``;
in a ``.pt`` checkpoint dict, the dict under ``"lora_ckpt"``. A file is input like any other: every field
is checked for type and range, aliases may only restore keys the file does not store, tied groups must
name keys the file holds, recorded module kinds must name LoRA modules whose shapes fit them, and a
``format_version`` this version does not know is refused.
"""

from __future__ import annotations

import json
import math
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from lora_ckpt._version import __version__
from lora_ckpt.checks import unique_keys
from lora_ckpt.errors import CheckpointFileError, LoraCkptError, brief
from lora_ckpt.layout import LAYOUTS, detect_layout, split_prefix

__all__ = ["FORMAT_VERSION", "META_KEY", "FileMeta"]

#: The key of lora_ckpt's metadata in a safetensors header's ``__metadata__`` and in a checkpoint dict.
META_KEY = "lora_ckpt"
#: The metadata format this version writes and reads (older versions are read too).
FORMAT_VERSION = 1

_FIELDS = ("format_version", "lora_ckpt_version", "layout", "alpha", "tied", "aliases", "order", "model_args", "kinds")


@dataclass(frozen=True)
class FileMeta:
    """lora_ckpt's metadata of one file, validated.

    ``alpha``: one float or per module; ``tied``: groups of keys holding one tensor; ``aliases``: keys a
    safetensors file stores once (alias -> the key stored); ``order``: the state dict's key order;
    ``model_args``: nanoGPT's model arguments; ``kinds``: module -> ``"linear"`` or ``"embedding"``, recorded in
    the layouts whose keys do not tell the two apart (loralib, minLoRA, nanoGPT's fork: see
    :attr:`~lora_ckpt.layout.LayoutSpec.kinds_by_shape`), so that reading the file back needs no ``kinds``
    (optional: older files have none, and nothing is then recorded).
    """

    format_version: int = FORMAT_VERSION
    lora_ckpt_version: str = __version__
    layout: str | None = None
    alpha: float | dict[str, float] | None = None
    tied: tuple[tuple[str, ...], ...] = ()
    aliases: dict[str, str] = field(default_factory=dict)
    order: tuple[str, ...] | None = None
    model_args: dict[str, Any] | None = None
    kinds: dict[str, str] = field(default_factory=dict)

    @classmethod
    def from_header(cls, header: Mapping[str, str] | None, *, stored: Collection[str], where: object) -> FileMeta | None:
        """Read the metadata of a safetensors header's ``__metadata__`` (None if the file has none of ours).

        ``stored``: the keys the file holds. Raises :class:`CheckpointFileError` naming ``where`` and the field.
        """
        if not header or META_KEY not in header:
            return None
        try:
            raw = json.loads(header[META_KEY], object_pairs_hook=unique_keys)
        except (TypeError, ValueError, RecursionError) as e:  # RecursionError: nested past the parser's limit
            raise CheckpointFileError(f"{where}: lora_ckpt metadata is not valid JSON ({e}); the file is corrupt") from None
        return cls.from_dict(raw, stored=stored, where=where)

    @classmethod
    def from_dict(cls, raw: object, *, stored: Collection[str], where: object) -> FileMeta:
        """Read the metadata dict (a ``.pt`` checkpoint's ``lora_ckpt`` entry, or a parsed header); validated."""
        bad = _Problems(where)
        if not isinstance(raw, Mapping):
            raise bad.error(f"is a {type(raw).__name__}, not an object")
        version = raw.get("format_version", FORMAT_VERSION)
        if not isinstance(version, int) or isinstance(version, bool) or version < 1:
            raise bad.error(f"format_version {brief(version)} is not a positive integer")
        written = raw.get("lora_ckpt_version", "0")
        if version > FORMAT_VERSION:
            shown = written if isinstance(written, str) and len(written) <= 40 else brief(written)
            raise CheckpointFileError(
                f"{where}: written by lora_ckpt {shown if 'lora_ckpt_version' in raw else '?'} in metadata format "
                f"{version}, which lora_ckpt {__version__} does not read; upgrade lora-ckpt"
            )
        layout = raw.get("layout")
        bad.check(isinstance(written, str), f"lora_ckpt_version {brief(written)} is not a string")
        bad.check(layout is None or isinstance(layout, str), f"layout {brief(layout)} is not a string")
        alpha = _alpha(raw.get("alpha"), bad)
        aliases = raw.get("aliases")
        if aliases is None:
            aliases = {}
        elif not (isinstance(aliases, Mapping)
                  and all(isinstance(k, str) and isinstance(v, str) for k, v in aliases.items())):
            bad.add("aliases is not an object of key -> key")
            aliases = {}
        aliases = dict(aliases)
        stored_set = set(stored)
        for alias, key in aliases.items():
            if alias in ("", "__metadata__"):
                bad.add(f"alias {alias!r} is not a key a state dict can hold")
            elif alias in stored_set:
                bad.add(f"alias {brief(alias)} names a tensor the file stores")
            elif key not in stored_set:
                bad.add(f"alias {brief(alias)} points at {brief(key)}, which the file does not store")
        tied = raw.get("tied")
        tied = [] if tied is None else tied
        groups: list[tuple[str, ...]] = []
        if isinstance(tied, list) and all(isinstance(g, list) and all(isinstance(k, str) for k in g) for g in tied):
            groups = [tuple(g) for g in tied]
        else:
            bad.add("tied is not a list of key lists")
        order = raw.get("order")
        if order is not None and not (isinstance(order, list) and all(isinstance(k, str) for k in order)):
            bad.add("order is not a list of keys")
            order = None
        model_args = raw.get("model_args")
        bad.check(model_args is None or isinstance(model_args, Mapping), f"model_args is a {type(model_args).__name__}")
        kinds = _kinds(raw.get("kinds"), layout, bad)
        bad.raise_any()
        return cls(
            version, str(written), layout, alpha, tuple(groups), aliases, tuple(order) if order else None,
            dict(model_args) if isinstance(model_args, Mapping) else None, kinds,
        )

    def check_keys(self, keys: Collection[str], *, where: object) -> None:
        """Raise unless every tied group names keys in ``keys`` (all the keys of the source, aliases included).

        A tie the source cannot restore would silently drop a key. (``order`` is used only where it lists
        exactly ``keys``; see :meth:`ordered`.)
        """
        known = set(keys)
        bad = _Problems(where)
        for group in self.tied:
            missing = [k for k in group if k not in known]
            if missing:
                bad.add(f"tied group {brief(list(group))} names {brief(missing)}, which the file neither stores "
                        "nor aliases")
        bad.raise_any()

    def check_kinds(self, shapes: Mapping[str, tuple[int, ...]], *, where: object) -> None:
        """Raise unless every module ``kinds`` names is a LoRA module of the source whose shapes fit the recorded kind.

        ``shapes``: every key of the source (aliases included) -> its shape. A kind its shapes contradict would
        otherwise reach a merge as if the user had said it.
        """
        if not self.kinds:
            return
        spec = LAYOUTS[str(self.layout)]  # from_dict refused kinds without a layout that records them
        plain = {split_prefix(k)[1]: k for k in shapes}
        bad = _Problems(where)
        for name, kind in self.kinds.items():
            keys = {role: plain.get(spec.key(name, role)) for role in spec.roles}
            if keys["a"] is None or keys["b"] is None:
                bad.add(f"kinds names {brief(name)}, which is not a LoRA module of the file")
                continue
            module = {k: torch.empty(shapes[k], device="meta") for k in keys.values() if k is not None}
            try:
                detect_layout(module, layout=spec.name, kinds={name: kind})  # type: ignore[dict-item]
            except LoraCkptError:
                found = ", ".join(f"{role} {tuple(shapes[k])}" for role, k in keys.items() if k is not None)
                bad.add(f"kinds records {brief(name)} as {kind}, which its shapes ({found}) do not fit")
        bad.raise_any()

    def ordered(self, keys: Collection[str]) -> list[str]:
        """``keys`` in the recorded order where it lists exactly them, else as given."""
        if self.order is not None and len(self.order) == len(keys) and set(self.order) == set(keys):
            return list(self.order)
        return list(keys)

    def to_dict(self) -> dict[str, Any]:
        """The metadata as written (a ``.pt`` checkpoint's ``lora_ckpt`` entry)."""
        out: dict[str, Any] = {"format_version": self.format_version, "lora_ckpt_version": self.lora_ckpt_version,
                               "layout": self.layout, "tied": [list(g) for g in self.tied]}
        if self.alpha is not None:
            out["alpha"] = dict(self.alpha) if isinstance(self.alpha, Mapping) else float(self.alpha)
        if self.aliases:
            out["aliases"] = dict(self.aliases)
        if self.order is not None:
            out["order"] = list(self.order)
        if self.model_args is not None:
            out["model_args"] = dict(self.model_args)
        if self.kinds:
            out["kinds"] = dict(self.kinds)
        return out

    def to_header(self) -> dict[str, str]:
        """The safetensors ``__metadata__`` that holds this metadata (strings only, as the format requires)."""
        try:
            text = json.dumps(self.to_dict(), allow_nan=False)
        except (TypeError, ValueError) as e:
            raise CheckpointFileError(f"cannot record lora_ckpt metadata: {e}; is model_args JSON-serialisable?") from None
        return {"format": "pt", META_KEY: text}


def _alpha(value: object, bad: _Problems) -> float | dict[str, float] | None:
    if value is None:
        return None
    if isinstance(value, Mapping):
        out: dict[str, float] = {}
        for name, a in value.items():
            if not isinstance(name, str) or not _is_scale(a):
                bad.add(f"alpha of {brief(name)} is {brief(a)}, not a finite number")
            else:
                out[name] = float(a)
        return out
    if not _is_scale(value):
        bad.add(f"alpha {brief(value)} is not a finite number")
        return None
    return float(value)  # type: ignore[arg-type]


def _kinds(value: object, layout: object, bad: _Problems) -> dict[str, str]:
    """The recorded module kinds (module -> linear / embedding), checked for type; {} where none are recorded."""
    if value is None:
        return {}
    if not (isinstance(value, Mapping) and all(isinstance(k, str) for k in value)):
        bad.add(f"kinds {brief(value)} is not an object of module -> kind")
        return {}
    out: dict[str, str] = {}
    for name, kind in value.items():
        if kind not in ("linear", "embedding"):
            bad.add(f"kinds gives {brief(name)} the kind {brief(kind)}, not linear or embedding")
        else:
            out[name] = kind
    spec = LAYOUTS.get(layout) if isinstance(layout, str) else None
    if value and (spec is None or not spec.kinds_by_shape):
        bad.add(f"kinds are recorded for layout {brief(layout)}, whose keys "
                + ("tell linear modules and embeddings apart" if spec is not None else "are not a LoRA layout's"))
    return out


def _is_scale(value: object) -> bool:
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        return False
    try:
        return math.isfinite(value)
    except OverflowError:  # an int too large for a float
        return False


class _Problems:
    """Every problem found in one file's metadata, raised once."""

    def __init__(self, where: object) -> None:
        self.where, self.items = where, []  # type: ignore[var-annotated]

    def add(self, text: str) -> None:
        self.items.append(text)

    def check(self, ok: bool, text: str) -> None:
        if not ok:
            self.add(text)

    def error(self, text: str) -> CheckpointFileError:
        return CheckpointFileError(f"{self.where}: lora_ckpt metadata {text}; the file is corrupt or was edited")

    def raise_any(self) -> None:
        if self.items:
            raise self.error("; ".join(self.items))
