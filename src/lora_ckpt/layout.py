"""Layouts as data, and :func:`detect_layout`, which tells which one a state dict is in.

A layout is described declaratively by a :class:`LoraLayoutSpec`: the key components that mark a
LoRA module, the roles of its keys, and, per module kind, how the factors' shapes relate to the
weight and how the update ``ΔW`` is formed from them. Detection only reads keys and shapes.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Literal

import torch

from lora_ckpt._table import render_html, render_text
from lora_ckpt.errors import LayoutError, ShapeError

__all__ = [
    "NANOGPT",
    "WRAPPER_PREFIXES",
    "Layout",
    "LoraLayoutSpec",
    "LoraModule",
    "ModuleKind",
    "detect_layout",
    "split_prefix",
]

ModuleKind = Literal["linear", "embedding", "lora_only_embedding", "base_only"]

#: Leading key components added by wrappers: ``torch.compile`` and DistributedDataParallel.
WRAPPER_PREFIXES = ("_orig_mod", "module")


@dataclass(frozen=True)
class LoraLayoutSpec:
    """One LoRA layout: the key roles of a module and the update formula per kind.

    Roles are the key suffixes that follow the module name. For ``linear`` modules the factors are
    ``A (rank, in)`` and ``B (out, rank)`` with ``ΔW = B @ A``; for ``embedding`` modules they are
    ``A (vocab, rank)`` and ``B (dim, rank)`` with ``ΔW = A @ B.T``.
    """

    name: str
    base_weight: str
    base_bias: str
    factor_a: str
    factor_b: str
    #: Components that mark a key as belonging to this layout.
    markers: tuple[str, ...]

    @property
    def roles(self) -> tuple[str, ...]:
        return (self.base_weight, self.base_bias, self.factor_a, self.factor_b)


#: The nanoGPT LoRA fork: ``LoRALinear`` / ``LoRAEmbedding`` with ``main_weight``, ``lora_A``, ``lora_B``.
NANOGPT = LoraLayoutSpec(
    name="nanogpt_lora",
    base_weight="main_weight.weight",
    base_bias="main_weight.bias",
    factor_a="lora_A.weight",
    factor_b="lora_B.weight",
    markers=("main_weight", "lora_A", "lora_B"),
)

# Components of layouts that lora_ckpt recognises but does not read yet, with the layout's name.
_FOREIGN_MARKERS = {
    "lora_down": "kohya",
    "lora_up": "kohya",
    "lora_a": "torchtune",
    "lora_b": "torchtune",
    "lora_embedding_A": "PEFT",
    "lora_embedding_B": "PEFT",
    "lora_magnitude_vector": "PEFT DoRA",
    "base_layer": "PEFT (live model)",
    "parametrizations": "minLoRA",
}


@dataclass(frozen=True)
class LoraModule:
    """One module of a LoRA layout, named without the wrapper prefix.

    ``in_features``/``out_features`` are the weight's (in, out) for a linear module and
    (num_embeddings, embedding_dim) for an embedding; ``rank`` is 0 for a module without factors.
    """

    name: str
    kind: ModuleKind
    rank: int
    in_features: int
    out_features: int
    has_bias: bool
    spec: LoraLayoutSpec = field(default=NANOGPT, repr=False, compare=False)

    @property
    def weight_key(self) -> str:
        return f"{self.name}.{self.spec.base_weight}"

    @property
    def bias_key(self) -> str:
        return f"{self.name}.{self.spec.base_bias}"

    @property
    def a_key(self) -> str:
        return f"{self.name}.{self.spec.factor_a}"

    @property
    def b_key(self) -> str:
        return f"{self.name}.{self.spec.factor_b}"

    @property
    def has_base(self) -> bool:
        return self.kind != "lora_only_embedding"

    @property
    def has_factors(self) -> bool:
        return self.rank > 0

    @property
    def factor_keys(self) -> tuple[str, ...]:
        return (self.a_key, self.b_key) if self.has_factors else ()

    @property
    def keys(self) -> tuple[str, ...]:
        """The module's keys in this layout."""
        base = (self.weight_key,) if self.has_base else ()
        bias = (self.bias_key,) if self.has_bias else ()
        return base + bias + self.factor_keys

    @property
    def standard_keys(self) -> tuple[str, ...]:
        """The keys the same module has in the standard layout."""
        return (f"{self.name}.weight",) + ((f"{self.name}.bias",) if self.has_bias else ())

    @property
    def weight_shape(self) -> tuple[int, int]:
        if self.kind == "linear" or self.kind == "base_only":
            return (self.out_features, self.in_features)
        return (self.in_features, self.out_features)


@dataclass(frozen=True)
class Layout:
    """What :func:`detect_layout` found: the layout, the wrapper prefix, the LoRA modules, tied keys.

    All key names here are without the wrapper ``prefix``. ``tied`` lists groups of keys that share
    one storage; ``tied_updates`` the groups in which a LoRA update lands on one member, so that a
    merge must untie them to keep the model's exact function.
    """

    kind: Literal["standard", "nanogpt_lora"]
    prefix: str
    modules: tuple[LoraModule, ...]
    tied: tuple[tuple[str, ...], ...]
    shapes: Mapping[str, tuple[int, ...]] = field(repr=False)
    dtypes: Mapping[str, torch.dtype] = field(repr=False)

    @property
    def is_lora(self) -> bool:
        return self.kind != "standard"

    @property
    def keys(self) -> tuple[str, ...]:
        return tuple(self.shapes)

    def module(self, name: str) -> LoraModule:
        for m in self.modules:
            if m.name == name:
                return m
        raise KeyError(name)

    @property
    def module_by_key(self) -> dict[str, LoraModule]:
        """Each LoRA module key mapped to its module."""
        return {k: m for m in self.modules for k in m.keys}

    @property
    def factor_keys(self) -> frozenset[str]:
        return frozenset(k for m in self.modules for k in m.factor_keys)

    @property
    def tied_updates(self) -> tuple[tuple[str, ...], ...]:
        updated = {m.weight_key for m in self.modules if m.has_factors and m.has_base}
        return tuple(g for g in self.tied if updated.intersection(g))

    def rows(self) -> list[dict[str, object]]:
        """One row per LoRA module, for tables."""
        return [
            {
                "module": m.name,
                "kind": m.kind,
                "rank": m.rank,
                "in": m.in_features,
                "out": m.out_features,
                "bias": m.has_bias,
                "dtype": str(self.dtypes.get(m.keys[0], "")).replace("torch.", ""),
            }
            for m in self.modules
        ]

    def summary(self) -> str:
        """A short description: layout, prefix, counts and tied groups."""
        lines = [f"layout: {self.kind}", f"prefix: {self.prefix or '(none)'}", f"tensors: {len(self.shapes)}"]
        if self.is_lora:
            lines.append(f"LoRA modules: {len(self.modules)}")
        for group in self.tied:
            note = " (a LoRA update lands here: merging unties it)" if group in self.tied_updates else ""
            lines.append("tied: " + " = ".join(group) + note)
        return "\n".join(lines)

    def __str__(self) -> str:
        table = render_text(self.rows()) if self.modules else ""
        return self.summary() + ("\n" + table if table else "")

    def _repr_html_(self) -> str:
        head = "<br>".join(self.summary().splitlines())
        return f"<p>{head}</p>" + (render_html(self.rows()) if self.modules else "")


def split_prefix(key: str) -> tuple[str, str]:
    """Split a key into its wrapper prefix (``_orig_mod.``, ``module.``, or both) and the rest."""
    parts = key.split(".")
    n = 0
    while n < len(parts) - 1 and parts[n] in WRAPPER_PREFIXES:
        n += 1
    return "".join(p + "." for p in parts[:n]), ".".join(parts[n:])


def _strip_prefix(state_dict: Mapping[str, torch.Tensor]) -> tuple[str, dict[str, torch.Tensor]]:
    by_prefix: dict[str, list[str]] = defaultdict(list)
    out: dict[str, torch.Tensor] = {}
    for key, value in state_dict.items():
        prefix, rest = split_prefix(key)
        by_prefix[prefix].append(key)
        out[rest] = value
    if len(by_prefix) > 1:
        examples = "; ".join(f"{p or '(none)'!r}: {ks[0]!r}" for p, ks in by_prefix.items())
        raise LayoutError(
            f"keys carry different wrapper prefixes ({examples}); "
            "save the state dict from one model (unwrap torch.compile / DDP consistently)"
        )
    (prefix,) = by_prefix
    return prefix, out


def _tied_groups(tensors: Mapping[str, torch.Tensor]) -> tuple[tuple[str, ...], ...]:
    groups: dict[tuple[object, ...], list[str]] = defaultdict(list)
    for key, t in tensors.items():
        if t.device.type == "meta" or t.numel() == 0:
            continue
        ident = (t.device, t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.stride(), t.dtype)
        groups[ident].append(key)
    return tuple(tuple(g) for g in groups.values() if len(g) > 1)


def _fits_linear(w: tuple[int, ...] | None, a: tuple[int, ...], b: tuple[int, ...]) -> bool:
    return b[1] == a[0] and (w is None or w == (b[0], a[1]))


def _fits_embedding(w: tuple[int, ...] | None, a: tuple[int, ...], b: tuple[int, ...]) -> bool:
    return b[1] == a[1] and (w is None or w == (a[0], b[0]))


def _describe_misfit(name: str, w: tuple[int, ...] | None, a: tuple[int, ...], b: tuple[int, ...]) -> str:
    base = f"main_weight {w}" if w is not None else "a lora-only embedding (no main_weight)"
    return (
        f"{name}: lora_B {b} @ lora_A {a} does not fit {base}; expected lora_A (rank, in) and "
        "lora_B (out, rank) for a linear module, or lora_A (vocab, rank) and lora_B (dim, rank) for an embedding"
    )


def _classify(
    name: str,
    roles: Mapping[str, tuple[int, ...]],
    hint: ModuleKind | None,
    spec: LoraLayoutSpec,
) -> LoraModule | str:
    """The module described by ``roles`` (role -> shape), or a message saying what is wrong."""
    w = roles.get(spec.base_weight)
    a = roles.get(spec.factor_a)
    b = roles.get(spec.factor_b)
    has_bias = spec.base_bias in roles
    if (a is None) != (b is None):
        present, absent = (spec.factor_a, spec.factor_b) if b is None else (spec.factor_b, spec.factor_a)
        return f"{name}: has {present} but no {absent}; a LoRA module needs both factors"
    if has_bias and w is None:
        return f"{name}: has {spec.base_bias} but no {spec.base_weight}"
    for role, shape in ((spec.base_weight, w), (spec.factor_a, a), (spec.factor_b, b)):
        if shape is not None and len(shape) != 2:
            return f"{name}.{role}: expected a 2-d tensor, got shape {shape}"
    if a is None or b is None:
        assert w is not None  # roles is non-empty and a bias needs a weight
        return LoraModule(name, "base_only", 0, w[1], w[0], has_bias, spec)
    linear = _fits_linear(w, a, b) and w is not None
    embedding = _fits_embedding(w, a, b)
    if hint is not None:
        linear, embedding = linear and hint == "linear", embedding and hint != "linear"
    if linear and embedding:
        return (
            f"{name}: shapes lora_A {a}, lora_B {b}, main_weight {w} fit both a linear module and an "
            f"embedding; pass kinds={{{name!r}: 'linear' or 'embedding'}}"
        )
    if linear:
        return LoraModule(name, "linear", a[0], a[1], b[0], has_bias, spec)
    if embedding:
        kind: ModuleKind = "embedding" if w is not None else "lora_only_embedding"
        return LoraModule(name, kind, a[1], a[0], b[0], has_bias, spec)
    return _describe_misfit(name, w, a, b)


def detect_layout(
    state_dict: Mapping[str, torch.Tensor],
    *,
    kinds: Mapping[str, ModuleKind] | None = None,
) -> Layout:
    """Return the :class:`Layout` of ``state_dict``; raise if it is mixed, ambiguous or unknown.

    Looks at keys and shapes only, never at values. The wrapper prefix must be the same on every key.

    Args:
        state_dict: a model state dict (tensors may be on any device, ``meta`` included).
        kinds: module name -> ``"linear"`` or ``"embedding"``, only needed where the shapes are square
            enough to fit both (rank equal to the width).

    Returns:
        The layout, with every LoRA module (kind, rank, features, bias) and every group of tied keys.

    Raises:
        LayoutError: empty input, non-tensor values, mixed prefixes, a module in both layouts at once,
            or keys of a layout lora_ckpt does not read.
        ShapeError: factors whose shapes do not fit each other or the weight.

    Example:
        >>> from lora_ckpt.testing import make_lora_state_dict
        >>> layout = detect_layout(make_lora_state_dict(rank=4, prefix="_orig_mod."))
        >>> layout.kind, layout.prefix, layout.modules[0].rank
        ('nanogpt_lora', '_orig_mod.', 4)
    """
    if not isinstance(state_dict, Mapping) or not state_dict:
        raise LayoutError("expected a non-empty mapping of key -> tensor (a model state dict)")
    bad = [k for k, v in state_dict.items() if not isinstance(v, torch.Tensor)]
    if bad:
        hint = " (this looks like a checkpoint dict: pass checkpoint['model'])" if "model" in state_dict else ""
        raise LayoutError(f"values are not tensors for keys {bad[:5]}{hint}")
    prefix, tensors = _strip_prefix(state_dict)
    shapes = {k: tuple(t.shape) for k, t in tensors.items()}
    dtypes = {k: t.dtype for k, t in tensors.items()}
    spec = NANOGPT

    foreign = [k for k in shapes if set(k.split(".")) & _FOREIGN_MARKERS.keys()]
    if foreign:
        names = sorted({_FOREIGN_MARKERS[c] for k in foreign for c in k.split(".") if c in _FOREIGN_MARKERS})
        raise LayoutError(
            f"keys such as {foreign[:3]} belong to the {', '.join(names)} LoRA layout, which this version "
            "does not read; supported: standard and nanoGPT LoRA (main_weight / lora_A / lora_B)"
        )

    roles: dict[str, dict[str, tuple[int, ...]]] = defaultdict(dict)
    problems: list[str] = []
    for key, shape in shapes.items():
        parts = key.split(".")
        at = [i for i, p in enumerate(parts) if p in spec.markers]
        if not at:
            continue
        name, role = ".".join(parts[: at[0]]), ".".join(parts[at[0] :])
        if role not in spec.roles or not name:
            problems.append(f"{key}: unrecognised LoRA key; expected <module>.{{{', '.join(spec.roles)}}}")
            continue
        roles[name][role] = shape
    for name in roles:
        both = [k for k in (f"{name}.weight", f"{name}.bias") if k in shapes]
        if both:
            problems.append(
                f"{name}: mixed layout, has standard key(s) {both} and LoRA key(s) "
                f"{[f'{name}.{r}' for r in roles[name]]}; a module is either standard or LoRA"
            )
    if problems:
        raise LayoutError("; ".join(problems))

    modules: list[LoraModule] = []
    misfits: list[str] = []
    for name, module_roles in roles.items():
        found = _classify(name, module_roles, (kinds or {}).get(name), spec)
        if isinstance(found, str):
            misfits.append(found)
        else:
            modules.append(found)
    if misfits:
        error = ShapeError if all("does not fit" in m or "2-d" in m for m in misfits) else LayoutError
        raise error("; ".join(misfits))
    unknown_hints = sorted(set(kinds or {}) - set(roles))
    if unknown_hints:
        raise LayoutError(f"kinds names modules that are not LoRA modules here: {unknown_hints}")

    return Layout(
        kind="nanogpt_lora" if modules else "standard",
        prefix=prefix,
        modules=tuple(modules),
        tied=_tied_groups(tensors),
        shapes=shapes,
        dtypes=dtypes,
    )


def canonical_key(key: str) -> str:
    """A key without wrapper prefix and with ``.main_weight.`` folded, so both layouts compare equal."""
    _, rest = split_prefix(key)
    parts = [p for p in rest.split(".") if p != NANOGPT.markers[0]]
    return ".".join(parts)


def matches_any(key: str, patterns: Iterable[str]) -> bool:
    """Whether ``key`` matches one of the glob ``patterns`` (``fnmatch``, whole key)."""
    from fnmatch import fnmatchcase

    return any(fnmatchcase(key, p) for p in patterns)
