"""Converting LoRA state dicts between layouts without merging: factors, scales and DoRA carried exactly.

Every module is read into one canonical form, ``ΔW = left @ right`` with ``left`` (rows, r) and
``right`` (r, cols) in the standard orientation of the weight, and written with the target
layout's formula. The scale ``alpha / rank`` is kept: the target's alpha is ``scale · rank``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import torch

from lora_ckpt._table import Compact
from lora_ckpt.errors import LayoutError
from lora_ckpt.layout import FORMULAS, KOHYA, PEFT, formula_factors, Layout, LayoutSpec, LoraModule, detect_layout, layout_spec
from lora_ckpt.merge import Alpha, Orientation, orientation, resolve_base_names, resolve_scales, settle_orientation

__all__ = ["Relayout", "convert_layout"]


@dataclass
class Relayout(Compact):
    """The result of :func:`convert_layout`.

    ``state_dict`` is in the target layout; ``alpha`` the alpha per module that keeps each scale;
    ``base`` the standard base weights, where the target keeps them apart (PEFT, kohya);
    ``fan_in_fan_out`` whether the base weights as written are stored (in, out) (GPT-2's ``Conv1D``: kept so
    only in a PEFT target, which records it; every other layout gets (out, in)); ``task_type`` PEFT's, carried.
    """

    state_dict: dict[str, torch.Tensor]
    alpha: dict[str, float]
    layout: str
    base: dict[str, torch.Tensor] | None = None
    notes: list[str] = field(default_factory=list)
    fan_in_fan_out: bool = False
    task_type: str | None = None

    def __repr__(self) -> str:
        return (f"Relayout(layout={self.layout!r}, tensors={len(self.state_dict)}, modules={len(self.alpha)}, "
                f"base={None if self.base is None else len(self.base)}, fan_in_fan_out={self.fan_in_fan_out})")


def convert_layout(
    state_dict: Mapping[str, torch.Tensor],
    to: str,
    *,
    alpha: Alpha | None = None,
    scales: Mapping[str, float] | None = None,
    base: Mapping[str, torch.Tensor] | None = None,
    layout: Layout | str | None = None,
    fan_in_fan_out: Orientation = None,
    task_type: str | None = None,
) -> Relayout:
    """Return ``state_dict`` in the LoRA layout ``to``, with the same modules, ranks and scales; nothing merged.

    The input is not changed. Factors are re-oriented as the target's formula needs; DoRA magnitudes,
    biases and other entries are carried over. Adapter-only sources (PEFT, kohya) take their base
    weights from ``base`` when the target keeps them beside the factors; targets that keep them
    apart (PEFT, kohya) return them in ``Relayout.base``.

    Args:
        state_dict: a LoRA state dict in any known layout.
        to: the target layout's name: a key of :data:`~lora_ckpt.layout.LAYOUTS`.
        alpha: the source's alpha (float or per module), where the layout does not record it.
        scales: module -> scale instead of ``alpha`` (from a PEFT config).
        base: the base model's standard state dict, for adapter-only sources.
        layout: the source's layout or layout name, if known.
        fan_in_fan_out: whether the base weights (in the file or ``base``) are stored (in, out) (GPT-2
            ``Conv1D``); None: from shapes, a square weight from its non-square siblings, else refused.
        task_type: PEFT's ``task_type``, carried into a PEFT target's config.

    Raises:
        LayoutError: an unknown target, or a module the target cannot express (named), such as DoRA
            into a plain LoRA layout, an embedding into torchtune, or a lora-only embedding outside nanoGPT.
        AlphaError: the source's alpha is unknown.
    """
    target = layout_spec(to)
    if not isinstance(layout, Layout):
        layout = detect_layout(state_dict, layout=layout)
    if not layout.is_lora or layout.spec is None:
        raise LayoutError(
            "the input is in the standard layout, with no LoRA modules to convert; to give it a LoRA layout use "
            "remap_standard_to_lora (CLI: convert --to nanogpt --like TEMPLATE)"
        )
    tensors = {k[len(layout.prefix) :]: v for k, v in state_dict.items()}
    scales = dict(scales) if scales is not None else resolve_scales(layout, alpha, tensors)
    plain_base = None if base is None else {k.removeprefix("_orig_mod.").removeprefix("module."): v for k, v in base.items()}
    if layout.needs_base and target.base_in_file and plain_base is None:
        raise LayoutError(f"{layout.kind} holds adapters only and {to} keeps base weights beside them; pass base=... (CLI: --base BASE)")

    if layout.spec is KOHYA and target is not KOHYA and plain_base is None:
        raise LayoutError("kohya module names (lora_unet_…) write the model's dots as underscores, so only the base "
                          "model's names tell which module each one is: pass base=... (CLI: --base BASE)")
    problems = _inexpressible(layout, target)
    if problems:
        raise LayoutError("; ".join(problems))

    out: dict[str, torch.Tensor] = {}
    apart: dict[str, torch.Tensor] = {}
    alphas: dict[str, float] = {}
    owned: set[str] = set()
    src_prefix = layout.spec.key_prefix
    names = resolve_base_names(layout, plain_base) if layout.spec is KOHYA and plain_base is not None else {}
    weights = {m.name: _weight(m, tensors, plain_base, names) for m in layout.modules}
    settled = settle_orientation([(m, w) for m in layout.modules if m.has_factors and (w := weights[m.name]) is not None],
                                 fan_in_fan_out)
    keep_orientation = target is PEFT  # PEFT records it (fan_in_fan_out); every other layout is (out, in)
    if isinstance(settled, Mapping):  # per module (a live model): a config holds one value
        values = set(settled.values())
        if len(values) > 1:
            raise LayoutError("the modules mix (in, out) Conv1D and (out, in) nn.Linear weights; one fan_in_fan_out "
                              "cannot describe them: merge them instead")
        settled = values.pop() if values else None
    if settled and not keep_orientation:
        raise LayoutError(
            f"the base weights are stored (in, out) as GPT-2's Conv1D keeps them, and {to} has no way to record that "
            "(its modules are nn.Linear, (out, in)); turning only the LoRA modules' weights would leave the others "
            "(in, out) in one file: for GPT-2 use the --gpt2 conversion (lora_ckpt.formats.gpt2), which turns every "
            "Conv1D weight, or keep the PEFT layout"
        )
    for m in layout.modules:
        owned.update(m.keys)
        name = names.get(m.name, m.name)
        kind = "embedding" if m.kind in ("embedding", "lora_only_embedding") else "linear"
        weight = weights[m.name]
        if weight is not None and m.has_factors:
            orientation(m, weight, settled)  # a weight that fits neither way is an error here
        bias = tensors.get(m.bias_key) if m.has_bias else None
        if bias is None and plain_base is not None and not m.has_base:
            bias = plain_base.get(f"{name}.bias")
        dest = out if target.base_in_file else apart
        if weight is not None:
            dest[target.key(name, "weight", m.kind) if target.base_in_file else f"{name}.weight"] = weight
        if bias is not None:
            dest[target.key(name, "bias", m.kind) if target.base_in_file else f"{name}.bias"] = bias
        if not m.has_factors:
            continue
        a, b = tensors[m.a_key], tensors[m.b_key]
        left, right = FORMULAS[m.formula][2](a.flatten(1) if a.dim() == 4 else a, b.flatten(1) if b.dim() == 4 else b)
        ta, tb = formula_factors(target.formulas[kind], left, right)
        if a.dim() == 4 and target.conv_factors:  # a 1x1 convolution: (r, in, 1, 1) and (out, r, 1, 1)
            ta, tb = ta[:, :, None, None], tb[:, :, None, None]
        tname = _kohya_name(name) if target is KOHYA else name
        out[target.key(tname, "a", kind)] = ta
        out[target.key(tname, "b", kind)] = tb
        alphas[tname] = scales[m.name] * m.rank
        if target is KOHYA:
            out[target.key(tname, "alpha", kind)] = torch.tensor(alphas[tname])
        for role in ("magnitude", "b_bias"):
            if role in m.key_map:
                out[target.key(tname, role, kind)] = tensors[m.key_map[role]]
    for key, value in tensors.items():
        if key in owned:
            continue
        std = key.removeprefix(src_prefix)
        if target.base_in_file:
            out[target.key_prefix + std] = value
        else:
            apart[std] = value
    if plain_base is not None:
        module_keys = {f"{names.get(m.name, m.name)}.{leaf}" for m in layout.modules for leaf in ("weight", "bias")}
        rest = {k: v for k, v in plain_base.items() if k not in module_keys or not target.base_in_file}
        if target.base_in_file:
            out = {**{target.key_prefix + k: v for k, v in rest.items()}, **out}
        else:
            apart = {**rest, **apart}
    return Relayout(out, alphas, to, apart if not target.base_in_file else None,
                    fan_in_fan_out=bool(settled) and keep_orientation, task_type=task_type)


def _weight(
    m: LoraModule, tensors: Mapping[str, torch.Tensor], base: Mapping[str, torch.Tensor] | None, names: Mapping[str, str]
) -> torch.Tensor | None:
    """A module's base weight, from the file or from ``base``."""
    if m.has_base:
        return tensors.get(m.weight_key)
    return base.get(f"{names.get(m.name, m.name)}.weight") if base is not None else None


def _kohya_name(name: str) -> str:
    return name if name.startswith("lora_") else "lora_unet_" + name.replace(".", "_")


def _inexpressible(layout: Layout, target: LayoutSpec) -> list[str]:
    out = []
    for m in layout.modules:
        kind = "embedding" if m.kind in ("embedding", "lora_only_embedding") else "linear"
        if m.has_factors and kind not in target.formulas:
            out.append(f"{m.name}: {target.name} has no LoRA embeddings")
        if m.kind == "lora_only_embedding" and target.name != "nanogpt_lora":
            out.append(f"{m.name}: a lora-only embedding (no base weight) exists only in the nanoGPT layout")
        if m.is_dora and "magnitude" not in target.roles:
            out.append(f"{m.name}: DoRA (a magnitude vector) cannot be expressed in {target.name}; merge it instead")
        if "b_bias" in m.key_map and "b_bias" not in target.roles:
            out.append(f"{m.name}: a lora_B bias cannot be expressed in {target.name}; merge it instead")
        if m.is_dora and kind == "embedding" and target is not PEFT:
            out.append(f"{m.name}: a DoRA embedding exists only in PEFT")
    return out
