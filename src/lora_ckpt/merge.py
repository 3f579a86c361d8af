"""Merging LoRA updates into weights: ``W' = W + (alpha / rank) · ΔW``, rounded once."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Literal

import torch

from lora_ckpt.errors import AlphaError, LayoutError
from lora_ckpt.layout import Layout, LoraModule, detect_layout

__all__ = ["Alpha", "merge_lora", "merge_module", "resolve_scales"]

#: One alpha for every module, or one per module name (without wrapper prefix).
Alpha = float | Mapping[str, float]

# Rows per block: a float32 block of about 4 MiB (1024 rows of a 1024-wide weight) was fastest on 2 cores.
_BLOCK_BYTES = 4 << 20


def resolve_scales(layout: Layout, alpha: Alpha | None) -> dict[str, float]:
    """Return ``alpha / rank`` for every module with factors; raise if an alpha is unknown or misnamed."""
    needing = [m for m in layout.modules if m.has_factors]
    if not needing:
        return {}
    if alpha is None:
        names = [m.name for m in needing]
        raise AlphaError(
            f"the LoRA alpha is not known for {len(names)} module(s) ({', '.join(names[:3])}"
            f"{', …' if len(names) > 3 else ''}); pass alpha=<float> or a per-module mapping "
            "(nanoGPT stores it as checkpoint['model_args']['lora_alpha'])"
        )
    if isinstance(alpha, Mapping):
        missing = [m.name for m in needing if m.name not in alpha]
        unknown = sorted(set(alpha) - {m.name for m in needing})
        if missing or unknown:
            parts = [f"no alpha for module(s) {missing}"] if missing else []
            parts += [f"alpha given for unknown module(s) {unknown}"] if unknown else []
            raise AlphaError("; ".join(parts) + "; per-module alpha keys are module names without prefix")
        values = {m.name: alpha[m.name] for m in needing}
    else:
        values = {m.name: alpha for m in needing}
    bad = {k: v for k, v in values.items() if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v)}
    if bad:
        raise AlphaError(f"alpha must be a finite number, got {bad}")
    return {m.name: float(values[m.name]) / m.rank for m in needing}


def _accumulation_dtype(*dtypes: torch.dtype) -> torch.dtype:
    return torch.float64 if torch.float64 in dtypes else torch.float32


def merge_module(
    module: LoraModule,
    tensors: Mapping[str, torch.Tensor],
    scale: float,
    *,
    dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """Return the module's merged weight as a new tensor in the standard shape; inputs are not changed.

    The update is accumulated in float32 (float64 for float64 weights) block by block and rounded
    once to ``dtype`` (default: the weight's dtype; a lora-only embedding defaults to the factors').

    Args:
        module: the module, as found by :func:`~lora_ckpt.detect_layout`.
        tensors: a state dict (without wrapper prefix) holding the module's keys.
        scale: ``alpha / rank``.
        dtype: dtype of the result.
    """
    a, b = tensors[module.a_key], tensors[module.b_key]
    base = tensors[module.weight_key] if module.has_base else None
    out_dtype = dtype or (base.dtype if base is not None else a.dtype)
    acc = _accumulation_dtype(out_dtype, a.dtype, *(() if base is None else (base.dtype,)))
    device = base.device if base is not None else a.device
    if module.kind == "linear":  # ΔW (out, in) = B (out, r) @ A (r, in): rows follow B
        left, right = b.to(device, acc), a.to(device, acc)
    else:  # ΔW (vocab, dim) = A (vocab, r) @ B.T (r, dim): rows follow A
        left, right = a.to(device, acc), b.to(device, acc).T
    rows, cols = left.shape[0], right.shape[1]
    out = torch.empty((rows, cols), dtype=out_dtype, device=device)
    step = max(1, _BLOCK_BYTES // (4 * max(cols, 1)))
    direct = base is not None and base.dtype == acc and out_dtype == acc
    scratch = None if direct else torch.empty((min(step, rows), cols), dtype=acc, device=device)
    for start in range(0, rows, step):
        stop = min(start + step, rows)
        if direct:
            assert base is not None
            torch.addmm(base[start:stop], left[start:stop], right, alpha=scale, out=out[start:stop])
            continue
        assert scratch is not None
        buf = scratch[: stop - start]
        if base is None:
            torch.mm(left[start:stop], right, out=buf)
            buf.mul_(scale)
        else:
            buf.copy_(base[start:stop])
            buf.addmm_(left[start:stop], right, alpha=scale)
        out[start:stop].copy_(buf)  # the one rounding to out_dtype
    return out


def merge_lora(
    state_dict: Mapping[str, torch.Tensor],
    *,
    alpha: Alpha | None = None,
    tied: Literal["untie", "tie"] = "untie",
    dtype: torch.dtype | None = None,
    layout: Layout | None = None,
) -> dict[str, torch.Tensor]:
    """Return the standard-layout state dict of a LoRA state dict; the input is never changed.

    Each LoRA module's weight becomes ``W + (alpha / rank) · ΔW`` (accumulated in float32, rounded
    once), its bias moves from ``main_weight.bias`` to ``bias``, the factors disappear and the wrapper
    prefix is removed. Every other entry passes through as the same tensor object (no copy).

    Sharp edge, tied weights: when an update lands on a weight tied to other keys (nanoGPT's ``wte``
    and ``lm_head``), ``tied="untie"`` (default) keeps the exact function: the updated key gets the
    merged tensor, the others keep the base tensor, so the group is no longer tied. ``tied="tie"``
    gives every key of the group the merged tensor (keeps the tying, changes the other keys' function).

    Args:
        state_dict: a nanoGPT LoRA state dict, with or without ``_orig_mod.`` / ``module.`` prefixes.
        alpha: one alpha for all modules or a mapping module name -> alpha. Required whenever some
            module has factors: it is never guessed.
        tied: ``"untie"`` or ``"tie"``, see above.
        dtype: cast every floating-point output to this dtype (merged weights are rounded once).
        layout: the input's layout, if already detected.

    Returns:
        A new dict in the standard layout, in the input's key order.

    Raises:
        LayoutError: the input is not a LoRA layout (see also :func:`~lora_ckpt.detect_layout`).
        AlphaError: the alpha is missing, or a mapping misses or misnames modules.

    Example:
        >>> from lora_ckpt.testing import make_lora_state_dict
        >>> merged = merge_lora(make_lora_state_dict(rank=4), alpha=8.0)
        >>> "transformer.h.0.attn.c_attn.weight" in merged, any("lora_" in k for k in merged)
        (True, False)
    """
    layout = layout or detect_layout(state_dict)
    if not layout.is_lora:
        raise LayoutError("the state dict is already in the standard layout: it has no LoRA modules to merge")
    if tied not in ("untie", "tie"):
        raise ValueError(f"tied must be 'untie' or 'tie', got {tied!r}")
    scales = resolve_scales(layout, alpha)
    tensors = {k[len(layout.prefix) :]: v for k, v in state_dict.items()}
    by_key = layout.module_by_key

    merged: dict[str, torch.Tensor] = {}  # standard key -> merged weight
    for m in layout.modules:
        if m.has_factors:
            merged[f"{m.name}.weight"] = merge_module(m, tensors, scales[m.name], dtype=dtype)
    source_of = {m.weight_key: f"{m.name}.weight" for m in layout.modules if m.has_factors and m.has_base}
    if tied == "tie":
        for group in layout.tied_updates:
            updated = [source_of[k] for k in group if k in source_of]
            for k in group:
                std = _standard_key(k, by_key)
                if k not in source_of and std is not None:
                    merged[std] = merged[updated[0]]

    out: dict[str, torch.Tensor] = {}
    for key, value in tensors.items():
        std = _standard_key(key, by_key)
        if std is None:
            continue
        if std in merged:
            out[std] = merged[std]
        elif dtype is not None and value.is_floating_point():
            out[std] = value.to(dtype)
        else:
            out[std] = value
    return out


def _standard_key(key: str, by_key: Mapping[str, LoraModule]) -> str | None:
    """The standard key for ``key`` (None for a factor)."""
    m = by_key.get(key)
    if m is None:
        return key
    if key == m.weight_key:
        return f"{m.name}.weight"
    if key == m.bias_key:
        return f"{m.name}.bias"
    if key == m.a_key and not m.has_base:  # a lora-only embedding's weight takes lora_A's place
        return f"{m.name}.weight"
    return None
