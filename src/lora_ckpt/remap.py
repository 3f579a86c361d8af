"""Mapping standard weights onto a LoRA layout: ``x.weight -> x.main_weight.weight`` and the bias too."""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import torch

from lora_ckpt.errors import KeyMismatchError, LayoutError, ShapeError
from lora_ckpt.layout import Layout, detect_layout, matches_any

__all__ = ["remap_standard_to_lora"]


def remap_standard_to_lora(
    state_dict: Mapping[str, torch.Tensor],
    target: Mapping[str, torch.Tensor] | Layout,
    *,
    ignore: Iterable[str] = (),
) -> dict[str, torch.Tensor]:
    """Return ``state_dict``'s tensors under the keys of ``target``'s LoRA layout; LoRA factors are left out.

    Each standard ``x.weight`` / ``x.bias`` of a module that ``target`` wraps goes to
    ``x.main_weight.weight`` / ``x.main_weight.bias``; other keys keep their names. Wrapper prefixes
    are taken off the input and the target's prefix is put on. Tensors are not copied.
    Strict both ways: a key the target lacks, or a target key (other than a LoRA factor) that the
    input does not supply, is an error unless it matches a glob in ``ignore``.

    Args:
        state_dict: a standard-layout state dict.
        target: the LoRA model's ``state_dict()`` (any device, ``meta`` too) or its :class:`Layout`.
        ignore: glob patterns of keys (without prefix) to drop from the input or not require.

    Returns:
        A new dict to pass to the LoRA model's ``load_state_dict(..., strict=False)``: its missing keys
        are exactly the LoRA factors, which keep their fresh initialisation.

    Raises:
        LayoutError: the input is not standard, or a target module cannot hold a full weight.
        KeyMismatchError: keys missing on either side.
        ShapeError: a tensor's shape differs from the target's.

    Example:
        >>> from lora_ckpt.testing import make_gpt
        >>> lora = make_gpt(attn_rank=4)
        >>> sd = remap_standard_to_lora(make_gpt().state_dict(), lora.state_dict())
        >>> sorted(lora.load_state_dict(sd, strict=False).missing_keys)[0]
        'transformer.h.0.attn.c_attn.lora_A.weight'
    """
    ignore = tuple(ignore)
    source = detect_layout(state_dict)
    if source.is_lora:
        raise LayoutError(
            "the input is already a LoRA layout; use lora_ckpt.load_into (copies or merges) "
            "or merge_lora first"
        )
    layout = target if isinstance(target, Layout) else detect_layout(target)
    wrapped = {m.name: m for m in layout.modules}
    out: dict[str, torch.Tensor] = {}
    unknown: list[str] = []
    misfits: list[str] = []
    for key, value in state_dict.items():
        key = key[len(source.prefix) :]
        module_name, _, leaf = key.rpartition(".")
        m = wrapped.get(module_name)
        if m is not None and leaf in ("weight", "bias"):
            if not m.has_base:
                raise LayoutError(
                    f"{key}: the target's {m.name} is a lora-only embedding with no main_weight, so it "
                    "cannot hold a full weight; give the target a main_weight or add the key to ignore"
                )
            new = m.weight_key if leaf == "weight" else m.bias_key
        else:
            new = key
        if new not in layout.shapes:
            if not matches_any(key, ignore):
                unknown.append(key)
            continue
        if tuple(value.shape) != layout.shapes[new]:
            misfits.append(f"{key} {tuple(value.shape)} -> {new} {layout.shapes[new]}")
            continue
        out[layout.prefix + new] = value
    factors = layout.factor_keys
    missing = [
        k for k in layout.shapes if k not in factors and layout.prefix + k not in out and not matches_any(k, ignore)
    ]
    if misfits:
        raise ShapeError("shapes differ from the target: " + "; ".join(misfits))
    if unknown or missing:
        parts = [f"the target has no key for {unknown}"] if unknown else []
        parts += [f"the input supplies nothing for target key(s) {missing}"] if missing else []
        raise KeyMismatchError("; ".join(parts) + "; check the model config, or leave keys out with ignore=[GLOBS]")
    return out
