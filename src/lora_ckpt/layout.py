"""Layouts as data, and :func:`detect_layout`, which tells which one a state dict is in.

Every LoRA layout is one :class:`LayoutSpec` in :data:`LAYOUTS`: the key roles of a module (base
weight, bias, factors, DoRA magnitude, alpha), where module names start, and per module kind the
update formula, which also fixes the factors' shapes. Detection reads only keys and shapes.
"""

from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Literal

import torch

from lora_ckpt._table import Compact, render_html, render_text
from lora_ckpt.errors import LayoutError, ShapeError, brief

__all__ = [
    "FORMULAS",
    "KOHYA",
    "LAYOUTS",
    "LORALIB",
    "Layout",
    "LayoutSpec",
    "LoraModule",
    "MINLORA",
    "ModuleKind",
    "NANOGPT",
    "PEFT",
    "TORCHTUNE",
    "WRAPPER_PREFIXES",
    "check_dense",
    "detect_layout",
    "split_prefix",
    "tied_groups",
]

ModuleKind = Literal["linear", "embedding", "lora_only_embedding", "base_only"]

#: Leading key components added by wrappers: ``torch.compile`` and DistributedDataParallel.
WRAPPER_PREFIXES = ("_orig_mod", "module")

#: Update formulas: name -> (rank of A and B, ΔW shape (rows, cols), (left, right) with ΔW = left @ right).
#: ``B@A``: A (r, in), B (out, r). ``A@B.T``: A (rows, r), B (cols, r). ``(B@A).T``: A (r, rows), B (cols, r).
#: ``A@B``: A (rows, r), B (r, cols). ΔW is in the standard orientation: (out, in) or (vocab, dim).
FORMULAS = {
    "B@A": (lambda a, b: (a[0], b[1]), lambda a, b: (b[0], a[1]), lambda a, b: (b, a)),
    "A@B.T": (lambda a, b: (a[1], b[1]), lambda a, b: (a[0], b[0]), lambda a, b: (a, b.T)),
    "(B@A).T": (lambda a, b: (a[0], b[1]), lambda a, b: (a[1], b[0]), lambda a, b: (a.T, b.T)),
    "A@B": (lambda a, b: (a[1], b[0]), lambda a, b: (a[0], b[1]), lambda a, b: (a, b)),
}


def formula_factors(formula: str, left: torch.Tensor, right: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(A, B) as ``formula`` stores them for ΔW = left @ right: the inverse of :data:`FORMULAS` (contiguous)."""
    a, b = {"B@A": (right, left), "A@B.T": (left, right.T), "(B@A).T": (left.T, right.T), "A@B": (left, right)}[formula]
    return a.contiguous(), b.contiguous()


@dataclass(frozen=True)
class LayoutSpec:
    """One LoRA layout, declaratively.

    ``roles`` maps a role (``weight``, ``bias``, ``a``, ``b``, ``magnitude``, ``alpha``, ``b_bias``)
    to the key suffix after the module name; ``embedding_roles`` overrides roles for embeddings
    where the layout names them apart. ``formulas`` gives the update formula per module kind
    (a key of :data:`FORMULAS`). ``key_prefix`` is put before every module name (PEFT's
    ``base_model.model.``). ``base_in_file``: whether the base weights normally sit beside the factors.
    ``alpha_from``: where the alpha is recorded (``"argument"`` if nowhere). ``conv_factors``: whether
    the factors of a 1x1 convolution keep their kernel dimensions (stored as ``Conv2d`` weights).
    """

    name: str
    roles: Mapping[str, str]
    formulas: Mapping[str, str]
    embedding_roles: Mapping[str, str] = field(default_factory=dict)
    key_prefix: str = ""
    base_in_file: bool = True
    alpha_from: Literal["argument", "config", "tensor"] = "argument"
    conv_factors: bool = False
    description: str = ""

    def role_of(self, suffix: str) -> str | None:
        for role, s in (*self.embedding_roles.items(), *self.roles.items()):
            if s == suffix:
                return role
        return None

    @property
    def factor_roles(self) -> tuple[str, ...]:
        return ("a", "b", "magnitude", "alpha", "b_bias")

    @property
    def kinds_by_shape(self) -> bool:
        """Whether linear modules and embeddings share key names here, so that only shapes (or a record) tell them
        apart: loralib, minLoRA, nanoGPT's fork."""
        return "embedding" in self.formulas and not self.embedding_roles

    def key(self, module: str, role: str, kind: str = "linear") -> str:
        """The key of ``role`` for ``module`` in this layout (without wrapper prefix)."""
        roles = {**self.roles, **(self.embedding_roles if kind in ("embedding", "lora_only_embedding") else {})}
        return f"{self.key_prefix}{module}.{roles.get(role, role)}"


NANOGPT = LayoutSpec(
    name="nanogpt_lora",
    roles={"weight": "main_weight.weight", "bias": "main_weight.bias", "a": "lora_A.weight", "b": "lora_B.weight"},
    formulas={"linear": "B@A", "embedding": "A@B.T"},
    description="nanoGPT LoRA fork: LoRALinear / LoRAEmbedding with main_weight, lora_A, lora_B",
)
PEFT = LayoutSpec(
    name="peft",
    roles={
        "weight": "base_layer.weight",
        "bias": "base_layer.bias",
        "a": "lora_A.weight",
        "b": "lora_B.weight",
        "b_bias": "lora_B.bias",
        "magnitude": "lora_magnitude_vector",
    },
    embedding_roles={"a": "lora_embedding_A", "b": "lora_embedding_B"},
    formulas={"linear": "B@A", "embedding": "(B@A).T"},
    key_prefix="base_model.model.",
    base_in_file=False,
    alpha_from="config",
    conv_factors=True,
    description="Hugging Face PEFT adapters (adapter_model.safetensors + adapter_config.json)",
)
TORCHTUNE = LayoutSpec(
    name="torchtune",
    roles={"weight": "weight", "bias": "bias", "a": "lora_a.weight", "b": "lora_b.weight", "magnitude": "magnitude"},
    formulas={"linear": "B@A"},
    description="torchtune LoRALinear / DoRA: lora_a, lora_b, magnitude beside weight",
)
LORALIB = LayoutSpec(
    name="loralib",
    roles={"weight": "weight", "bias": "bias", "a": "lora_A", "b": "lora_B"},
    formulas={"linear": "B@A", "embedding": "(B@A).T"},
    description="loralib and the nanoGPT-LoRA forks built on it: bare lora_A / lora_B parameters",
)
MINLORA = LayoutSpec(
    name="minlora",
    roles={
        "weight": "parametrizations.weight.original",
        "bias": "bias",
        "a": "parametrizations.weight.0.lora_A",
        "b": "parametrizations.weight.0.lora_B",
    },
    formulas={"linear": "B@A", "embedding": "A@B"},
    description="minLoRA: torch parametrizations holding lora_A / lora_B",
)
KOHYA = LayoutSpec(
    name="kohya",
    roles={"a": "lora_down.weight", "b": "lora_up.weight", "alpha": "alpha"},
    formulas={"linear": "B@A"},
    base_in_file=False,
    alpha_from="tensor",
    conv_factors=True,
    description="kohya-ss (sd-scripts) LoRA: lora_unet_… / lora_te_… with lora_down, lora_up, alpha",
)

#: Every known LoRA layout. Adding one means adding an entry here and its tests.
LAYOUTS: dict[str, LayoutSpec] = {s.name: s for s in (NANOGPT, PEFT, TORCHTUNE, LORALIB, MINLORA, KOHYA)}
#: Other names of LoRA layouts, the same in Python and on the command line.
LAYOUT_ALIASES: dict[str, str] = {"nanogpt": NANOGPT.name}


def layout_spec(name: str) -> LayoutSpec:
    """The LoRA layout called ``name`` (a key of :data:`LAYOUTS`, or an alias such as ``"nanogpt"``).

    Raises:
        LayoutError: an unknown name, listing the known ones.
    """
    spec = LAYOUTS.get(LAYOUT_ALIASES.get(name, name)) if isinstance(name, str) else None
    if spec is None:
        raise LayoutError(f"unknown layout {name!r}; known: {', '.join([*LAYOUTS, *LAYOUT_ALIASES])}")
    return spec

# Layouts lora_ckpt recognises but does not read, with what to say.
_UNSUPPORTED = {
    "lora_E": "AdaLoRA (PEFT) adapters are not supported",
    "hada_w1_a": "LoHa (LyCORIS) adapters are not supported",
    "lokr_w1": "LoKr (LyCORIS) adapters are not supported",
    "ia3_l": "IA3 adapters are not supported",
}
# Components that name LoRA factors in some layout: in a state dict of another layout they are a mix, never plain keys.
_FOREIGN_MARKERS = frozenset({"lora_A", "lora_B", "lora_a", "lora_b", "lora_down", "lora_up", "lora_embedding_A",
                              "lora_embedding_B", "lora_magnitude_vector"})
_KOHYA_NAME = re.compile(r"^(lora_unet|lora_te\d?|lora_transformer)_")
_PEFT_ADAPTER_PART = re.compile(
    r"\.(lora_A|lora_B|lora_embedding_A|lora_embedding_B|lora_magnitude_vector)\.(?!(?:weight|bias)$)([^.]+)"
    r"(?=\.weight$|\.bias$|$)"
)


@dataclass(frozen=True)
class LoraModule:
    """One LoRA module, named as in the standard model (no wrapper or layout prefix).

    ``in_features``/``out_features`` are (in, out) for a linear module and (num_embeddings,
    embedding_dim) for an embedding; ``rank`` is 0 for a module without factors. ``key_map`` maps
    each role present to its key; ``formula`` is the update formula (see :data:`FORMULAS`).
    """

    name: str
    kind: ModuleKind
    rank: int
    in_features: int
    out_features: int
    has_bias: bool
    key_map: Mapping[str, str] = field(default_factory=dict, repr=False, compare=False, hash=False)
    formula: str = "B@A"
    spec: LayoutSpec = field(default=NANOGPT, repr=False, compare=False)

    def _key(self, role: str) -> str | None:
        return self.key_map.get(role)

    @property
    def weight_key(self) -> str:
        return self.key_map.get("weight") or self.spec.key(self.name, "weight", self.kind)

    @property
    def bias_key(self) -> str:
        return self.key_map.get("bias") or self.spec.key(self.name, "bias", self.kind)

    @property
    def a_key(self) -> str:
        return self.key_map["a"]

    @property
    def b_key(self) -> str:
        return self.key_map["b"]

    @property
    def magnitude_key(self) -> str | None:
        return self.key_map.get("magnitude")

    @property
    def has_base(self) -> bool:
        """Whether this state dict holds the module's base weight."""
        return "weight" in self.key_map

    @property
    def has_factors(self) -> bool:
        return self.rank > 0

    @property
    def is_dora(self) -> bool:
        return "magnitude" in self.key_map

    @property
    def factor_keys(self) -> tuple[str, ...]:
        return tuple(k for r, k in self.key_map.items() if r in self.spec.factor_roles)

    @property
    def keys(self) -> tuple[str, ...]:
        """The module's keys in this state dict."""
        return tuple(self.key_map.values())

    @property
    def delta_shape(self) -> tuple[int, int]:
        """ΔW's shape in the standard orientation: (out, in) or (vocab, dim)."""
        if self.kind in ("linear", "base_only"):
            return (self.out_features, self.in_features)
        return (self.in_features, self.out_features)


@dataclass(frozen=True, repr=False)
class Layout(Compact):
    """What :func:`detect_layout` found: the layout, the wrapper prefix, the LoRA modules, tied keys.

    All key names here are without the wrapper ``prefix``. ``tied`` lists groups of keys that share
    one storage; ``tied_updates`` the groups in which a LoRA update lands on one member, so that a
    merge must untie them to keep the model's exact function.
    """

    kind: str
    prefix: str
    modules: tuple[LoraModule, ...]
    tied: tuple[tuple[str, ...], ...]
    shapes: Mapping[str, tuple[int, ...]] = field(repr=False)
    dtypes: Mapping[str, torch.dtype] = field(repr=False)
    spec: LayoutSpec | None = field(default=None, repr=False)

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
    def kinds(self) -> dict[str, str]:
        """Each module with factors mapped to ``"linear"`` or ``"embedding"``, as :func:`detect_layout`'s ``kinds``
        takes it: the decision, to carry to the same modules in another layout or file."""
        return {m.name: "linear" if m.kind == "linear" else "embedding" for m in self.modules if m.has_factors}

    @property
    def needs_base(self) -> bool:
        """Whether some module's base weight must come from another state dict (adapter-only files)."""
        return any(m.kind != "lora_only_embedding" and not m.has_base for m in self.modules)

    @property
    def tied_updates(self) -> tuple[tuple[str, ...], ...]:
        updated = {m.weight_key for m in self.modules if m.has_factors and m.has_base}
        return tuple(g for g in self.tied if updated.intersection(g))

    def rows(self, *, grouped: bool | None = None) -> list[dict[str, object]]:
        """Rows for tables: one per LoRA module, or with ``grouped`` one per layer pattern (layer numbers
        as ``*``; modules that agree on kind, rank, features, bias, DoRA and dtype share a row). ``None``:
        grouped when there are more than :data:`GROUP_OVER` modules."""
        if grouped or (grouped is None and len(self.modules) > GROUP_OVER):
            return self._grouped_rows()
        return [
            {
                "module": m.name,
                "kind": m.kind,
                "rank": m.rank,
                "in": m.in_features,
                "out": m.out_features,
                "bias": m.has_bias,
                "dora": m.is_dora,
                "dtype": str(self.dtypes.get(m.keys[0], "")).replace("torch.", ""),
            }
            for m in self.modules
        ]

    def _grouped_rows(self) -> list[dict[str, object]]:
        groups: dict[tuple[object, ...], list[int]] = {}
        for row in self.rows(grouped=False):
            parts = str(row["module"]).split(".")
            numbers = [int(p) for p in parts if p.isdigit()]
            pattern = ".".join("*" if p.isdigit() else p for p in parts)
            key = (pattern, *(v for k, v in row.items() if k != "module"))
            groups.setdefault(key, []).extend(numbers[:1])
        cols = [k for k in self.rows(grouped=False)[0] if k != "module"] if self.modules else []
        return [{"modules": key[0], "count": max(len(layers), 1), "layers": _spans(layers),
                 **dict(zip(cols, key[1:]))} for key, layers in groups.items()]

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


#: Tables of more modules than this show one row per layer pattern (``inspect --all`` shows every module).
GROUP_OVER = 16


def _spans(numbers: list[int]) -> str:
    """``[0, 1, 2, 5]`` as ``0-2,5``; empty as ``-``."""
    if not numbers:
        return "-"
    out: list[str] = []
    ordered = sorted(set(numbers))
    start = prev = ordered[0]
    for n in [*ordered[1:], None]:
        if n is not None and n == prev + 1:
            prev = n
            continue
        out.append(f"{start}" if start == prev else f"{start}-{prev}")
        if n is not None:
            start = prev = n
    return ",".join(out)


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


def tied_groups(tensors: Mapping[str, torch.Tensor]) -> tuple[tuple[str, ...], ...]:
    """Groups of keys whose tensors are the same view of the same storage (tied weights); meta, empty, sparse and
    nested tensors skipped."""
    groups: dict[tuple[object, ...], list[str]] = defaultdict(list)
    for key, t in tensors.items():
        if t.layout != torch.strided or t.is_nested or t.device.type == "meta" or t.numel() == 0:
            continue
        ident = (t.device, t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.stride(), t.dtype)
        groups[ident].append(key)
    return tuple(tuple(g) for g in groups.values() if len(g) > 1)


def check_dense(tensors: Mapping[str, torch.Tensor], *, where: str = "") -> None:
    """Raise :class:`LayoutError` naming the keys whose tensors are sparse or nested (lora_ckpt reads dense ones only).

    ``where`` prefixes the message (``"model.pt: "``).
    """
    odd = [k for k, t in tensors.items() if t.layout != torch.strided or t.is_nested]
    if odd:
        raise LayoutError(
            f"{where}keys {brief(odd[:5])} hold sparse or nested tensors; lora_ckpt reads dense tensors only "
            "(convert sparse ones with .to_dense())"
        )


def _evidence(key: str) -> str | None:
    """The layout a key can only belong to, if it says."""
    parts = key.split(".")
    comps = set(parts)
    if key.startswith(PEFT.key_prefix) or comps & {"base_layer", "lora_embedding_A", "lora_embedding_B", "lora_magnitude_vector"}:
        return PEFT.name
    if "main_weight" in comps:
        return NANOGPT.name
    if comps & {"lora_a", "lora_b"}:
        return TORCHTUNE.name
    if "parametrizations" in comps and comps & {"lora_A", "lora_B"}:
        return MINLORA.name
    if _KOHYA_NAME.match(key) or comps & {"lora_down", "lora_up"}:
        return KOHYA.name
    if parts[-1] in ("lora_A", "lora_B"):
        return LORALIB.name
    return None


def _choose_spec(keys: Iterable[str], layout: str | None) -> LayoutSpec | None:
    if layout is not None:
        return layout_spec(layout)
    found: dict[str, str] = {}
    plain_lora: list[str] = []
    for key in keys:
        comps = set(key.split("."))
        for marker, message in _UNSUPPORTED.items():
            if marker in comps:
                raise LayoutError(f"{key}: {message}; lora_ckpt reads {', '.join(LAYOUTS)}")
        name = _evidence(key)
        if name is not None:
            found.setdefault(name, key)
        elif comps & {"lora_A", "lora_B"}:
            plain_lora.append(key)
    if len(found) > 1:
        raise LayoutError(
            "keys of several LoRA layouts are mixed: "
            + "; ".join(f"{n} ({k!r})" for n, k in found.items())
            + "; a state dict must be in one layout (or pass layout=...)"
        )
    if found:
        return LAYOUTS[next(iter(found))]
    # bare `x.lora_A.weight` with no base weight anywhere: the nanoGPT fork's lora-only embedding (PEFT
    # files always carry `base_model.model.`; a prefix-less PEFT adapter needs layout="peft")
    return NANOGPT if plain_lora else None


def _normalise_peft(key: str) -> tuple[str, str | None]:
    """A live PEFT key without its adapter name (``lora_A.default.weight`` -> ``lora_A.weight``), and that name.

    A live DoRA magnitude is the ``weight`` of a layer (``lora_magnitude_vector.default.weight``); saved
    files call it ``lora_magnitude_vector``.
    """
    m = _PEFT_ADAPTER_PART.search(key)
    if not m:
        return key, None
    rest = key[m.end() :]
    if m.group(1) == "lora_magnitude_vector" and rest == ".weight":
        rest = ""
    return key[: m.start()] + f".{m.group(1)}" + rest, m.group(2)


def _split_roles(
    spec: LayoutSpec, keys: Iterable[str]
) -> tuple[dict[str, dict[str, str]], list[str], dict[str, str]]:
    """Group keys into modules: module -> role -> key; also the problems and each key's module."""
    suffixes = sorted(
        {s for s in (*spec.roles.values(), *spec.embedding_roles.values())}, key=lambda s: -len(s.split("."))
    )
    factor_suffixes = [s for s in suffixes if spec.role_of(s) in spec.factor_roles]
    base_suffixes = [s for s in suffixes if s not in factor_suffixes]
    modules: dict[str, dict[str, str]] = defaultdict(dict)
    problems: list[str] = []
    adapters: set[str] = set()
    normal: dict[str, str] = {}
    for key in keys:
        n, adapter = _normalise_peft(key) if spec is PEFT else (key, None)
        if adapter:
            adapters.add(adapter)
        normal[key] = n
    if len(adapters) > 1:
        problems.append(f"the state dict holds several PEFT adapters {sorted(adapters)}; keep one")
    owner: dict[str, str] = {}
    for pass_suffixes in (factor_suffixes, base_suffixes):
        for key, n in normal.items():
            if key in owner:
                continue
            for suffix in pass_suffixes:
                if n.endswith("." + suffix):
                    name = n[: -len(suffix) - 1]
                    if pass_suffixes is base_suffixes and name not in modules and suffix in ("weight", "bias"):
                        break  # a plain weight belongs to a LoRA module only if the module has factors
                    role = spec.role_of(suffix)
                    assert role is not None
                    if role in modules[name] and spec.embedding_roles.get(role) == suffix:
                        problems.append(f"{key}: a module cannot have both linear and embedding factors")
                    modules[name][role] = key
                    if suffix in spec.embedding_roles.values():
                        modules[name]["_embedding"] = key
                    owner[key] = name
                    break
    markers = {s.split(".")[0] for s in suffixes if s not in ("weight", "bias")} | _FOREIGN_MARKERS
    for key, n in normal.items():
        if key not in owner and markers & set(n.split(".")):
            problems.append(f"{key}: unrecognised {spec.name} key; expected <module>.{{{', '.join(suffixes)}}}")
    return modules, problems, owner


def _classify(
    name: str,
    roles: Mapping[str, str],
    shapes: Mapping[str, tuple[int, ...]],
    hint: ModuleKind | None,
    spec: LayoutSpec,
    default: ModuleKind | None = None,
) -> LoraModule | str:
    """The module described by ``roles`` (role -> key), or a message saying what is wrong; ``default`` settles
    only a module whose shapes fit both kinds."""
    key_map = {r: k for r, k in roles.items() if not r.startswith("_")}
    w = shapes[key_map["weight"]] if "weight" in key_map else None
    a = shapes[key_map["a"]] if "a" in key_map else None
    b = shapes[key_map["b"]] if "b" in key_map else None
    has_bias = "bias" in key_map
    if (a is None) != (b is None):
        present, absent = ("a", "b") if b is None else ("b", "a")
        return f"{name}: has {spec.roles[present]} but no {spec.roles[absent]}; a LoRA module needs both factors"
    if has_bias and w is None and spec.base_in_file:
        return f"{name}: has {spec.roles['bias']} but no {spec.roles['weight']}"
    if w is not None and len(w) == 4 and w[2:] == (1, 1):
        w = w[:2]  # a 1x1 convolution is a linear map
    if a is not None and b is not None and len(a) == 4 and len(b) == 4:
        if a[2:] != (1, 1) or b[2:] != (1, 1):
            return f"{name}: convolution kernels of size {a[2:]} are not supported (only 1x1)"
        a, b = a[:2], b[:2]
    for role, shape in (("weight", w), ("a", a), ("b", b)):
        if shape is not None and len(shape) != 2:
            return f"{key_map[role]}: expected a 2-d tensor, got shape {shape}"
    if a is None or b is None:
        if w is None:
            return f"{name}: has no LoRA factors and no weight"
        return LoraModule(name, "base_only", 0, w[1], w[0], has_bias, key_map, "B@A", spec)
    if "_embedding" in roles:
        kinds, decided = ["embedding"], f"its keys ({spec.embedding_roles['a']}) make it an embedding"
    elif spec.embedding_roles:  # a layout that names embedding factors apart: only linear modules under the plain names
        kinds = ["linear"]
        decided = f"{spec.name} names embedding factors apart, so {spec.roles['a']} is a linear module's"
    else:
        kinds, decided = list(spec.formulas), f"{spec.name} has no embeddings"
    fits = []
    for kind in kinds:
        formula = spec.formulas[kind]
        rank_of, rows_cols, _ = FORMULAS[formula]
        r_a, r_b = rank_of(a, b)
        rows, cols = rows_cols(a, b)
        if r_a != r_b:
            continue
        if w is not None and w != (rows, cols) and not (spec is PEFT and w == (cols, rows)):
            continue
        if w is None and kind == "linear" and spec.base_in_file:
            continue  # only embeddings may come without a base weight (nanoGPT lora-only)
        fits.append((kind, formula, r_a, rows, cols))
    if hint is not None:
        wanted = "linear" if hint == "linear" else "embedding"
        if fits and all(f[0] != wanted for f in fits):  # the keys or the shapes decide, and they say otherwise
            fitting = "a linear module" if fits[0][0] == "linear" else "an embedding"
            why = decided if wanted not in kinds else f"its shapes (A {a}, B {b}, weight {w}) fit only {fitting}"
            return (f"{name}: kinds={{{name!r}:{hint!r}}} (CLI: --kinds {name}={hint}) says {hint}, but {why}; "
                    "drop that entry (kinds settle only modules whose shapes fit both)")
        fits = [f for f in fits if f[0] == wanted]
    if len(fits) > 1 and default is not None:
        fits = [f for f in fits if f[0] == default]
    if len(fits) > 1:
        return (
            f"{name}: shapes A {a}, B {b}, weight {w} fit both a linear module and an embedding; "
            f"say which: kinds={{{name!r}:'linear'|'embedding'}} (CLI: --kinds {name}=linear or embedding; "
            "--kinds linear for every such module)"
        )
    if not fits:
        label = {r: s.removesuffix(".weight") for r, s in spec.roles.items()}
        base = (
            f"{label['weight']} {w}"
            if w is not None
            else "a lora-only embedding (no base weight; for a PEFT adapter without its prefix pass layout='peft')"
        )
        formulas = ", ".join(f"{k} ΔW = {f}" for k, f in spec.formulas.items())
        return f"{name}: {label['b']} {b} @ {label['a']} {a} does not fit {base} ({spec.name}: {formulas})"
    kind, formula, rank, rows, cols = fits[0]
    if kind == "linear":
        return LoraModule(name, "linear", rank, cols, rows, has_bias, key_map, formula, spec)
    only = w is None and spec.base_in_file
    return LoraModule(name, "lora_only_embedding" if only else "embedding", rank, rows, cols, has_bias, key_map, formula, spec)


def _check_extras(module: LoraModule, shapes: Mapping[str, tuple[int, ...]]) -> str | None:
    out_dim = module.delta_shape[0] if module.kind == "linear" else module.delta_shape[1]
    mag = module.key_map.get("magnitude")
    if mag is not None and shapes[mag] != (out_dim,):
        return f"{mag}: DoRA magnitude of shape {shapes[mag]} does not fit {module.name} (expected ({out_dim},))"
    alpha = module.key_map.get("alpha")
    if alpha is not None and shapes[alpha] not in ((), (1,)):
        return f"{alpha}: alpha must be a single number, got shape {shapes[alpha]}"
    b_bias = module.key_map.get("b_bias")
    if b_bias is not None and shapes[b_bias] != (module.out_features,):
        return f"{b_bias}: shape {shapes[b_bias]} does not fit {module.name} (expected ({module.out_features},))"
    return None


def detect_layout(
    state_dict: Mapping[str, torch.Tensor],
    *,
    kinds: Mapping[str, ModuleKind] | None = None,
    layout: str | None = None,
) -> Layout:
    """Return the :class:`Layout` of ``state_dict``; raise if it is mixed, ambiguous or unknown.

    Looks at keys and shapes only, never at values. The wrapper prefix must be the same on every key.

    Args:
        state_dict: a model state dict or adapter file's tensors (any device, ``meta`` included).
        kinds: module name -> ``"linear"`` or ``"embedding"``, only needed where the shapes are square
            (loralib's factors of a square weight fit both); a ``"*"`` entry is the kind of every module not named.
        layout: the layout's name (a key of :data:`LAYOUTS`), where the keys alone cannot tell.

    Returns:
        The layout, with every LoRA module (kind, rank, features, bias, DoRA) and every group of tied keys.

    Raises:
        LayoutError: empty input, non-tensor values, mixed prefixes or layouts, a module in both the
            standard and a LoRA layout, or keys of a layout lora_ckpt does not read.
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
        raise LayoutError(f"values are not tensors for keys {brief(bad[:5])}{hint}")
    check_dense(state_dict)
    prefix, tensors = _strip_prefix(state_dict)
    shapes = {k: tuple(t.shape) for k, t in tensors.items()}
    dtypes = {k: t.dtype for k, t in tensors.items()}
    spec = _choose_spec(shapes, layout)
    common = dict(prefix=prefix, tied=tied_groups(tensors), shapes=shapes, dtypes=dtypes)
    if spec is None:
        return Layout(kind="standard", modules=(), spec=None, **common)  # type: ignore[arg-type]

    roles, problems, _ = _split_roles(spec, shapes)
    for name, module_roles in roles.items():
        std = f"{spec.key_prefix}{name}"
        both = [k for k in (f"{std}.weight", f"{std}.bias") if k in shapes and k not in module_roles.values()]
        if both and spec.roles.get("weight") != "weight":
            problems.append(
                f"{name}: mixed layout, has standard key(s) {both} and LoRA key(s) "
                f"{list(module_roles.values())}; a module is either standard or LoRA"
            )
    if problems:
        raise LayoutError("; ".join(problems))

    modules: list[LoraModule] = []
    misfits: list[str] = []
    for full_name, module_roles in roles.items():
        name = full_name.removeprefix(spec.key_prefix)
        found = _classify(name, module_roles, shapes, (kinds or {}).get(name), spec, (kinds or {}).get("*"))
        if isinstance(found, LoraModule):
            extra = _check_extras(found, shapes)
            found = extra if extra is not None else found
        if isinstance(found, str):
            misfits.append(found)
        else:
            modules.append(found)
    both = [m for m in misfits if " fit both a linear module and an embedding; " in m]
    if len(both) > 1:  # one sentence for them all: a 7B model has hundreds of square modules
        names = [m.split(":", 1)[0] for m in both]
        misfits = [m for m in misfits if m not in both] + [
            f"{len(names)} modules ({', '.join(names[:3])}{', …' if len(names) > 3 else ''}) have square factors that "
            "fit both a linear module and an embedding; say which: kinds={'*':'linear'|'embedding'} (CLI: --kinds "
            "linear or --kinds embedding for all of them, --kinds MODULE=KIND for one)"]
    if misfits:
        error = ShapeError if all("does not fit" in m or "2-d" in m or "DoRA" in m for m in misfits) else LayoutError
        raise error("; ".join(misfits))
    unknown_hints = sorted(set(kinds or {}) - {m.name for m in modules} - {"*"})
    if unknown_hints:
        raise LayoutError(f"kinds (CLI: --kinds) names modules that are not LoRA modules here: {unknown_hints}")
    if not modules:  # keys in a LoRA layout's naming (a PEFT prefix, say) but no LoRA module in them
        return Layout(kind="standard", modules=(), spec=None, **common)  # type: ignore[arg-type]
    return Layout(kind=spec.name, modules=tuple(modules), spec=spec, **common)  # type: ignore[arg-type]


def canonical_key(key: str) -> str:
    """A key without wrapper prefix and with ``.main_weight.`` folded, so both layouts compare equal."""
    _, rest = split_prefix(key)
    parts = [p for p in rest.split(".") if p != "main_weight"]
    return ".".join(parts)


def matches_any(key: str, patterns: Iterable[str]) -> bool:
    """Whether ``key`` matches one of the glob ``patterns`` (``fnmatch``, whole key)."""
    from fnmatch import fnmatchcase

    return any(fnmatchcase(key, p) for p in patterns)
