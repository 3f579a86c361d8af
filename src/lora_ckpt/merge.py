"""Merging LoRA updates into weights: ``W' = W + scale · ΔW`` (DoRA: rescaled per row), rounded once."""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, replace
from typing import Literal

import torch

from lora_ckpt.dtypes import DType, as_dtype
from lora_ckpt.checks import check_alpha
from lora_ckpt.errors import AlphaError, KeyMismatchError, LayoutError, ShapeError
from lora_ckpt.layout import FORMULAS, KOHYA, PEFT, Layout, LoraModule, detect_layout, split_prefix

__all__ = [
    "Alpha", "Factors", "MergePlan", "Orientation", "Step", "merge_lora", "merge_module", "check_factors", "check_finite", "check_scale", "require_finite", "merge_rows", "module_factors",
    "orientation",
    "plan_merge", "require_data", "settle_orientation",
    "resolve_base_names", "resolve_scales",
]

#: One alpha for every module, or one per module name (without wrapper prefix).
Alpha = float | Mapping[str, float]
#: Whether base weights are stored (in, out) (GPT-2's ``Conv1D``): for every module, or per module name (as a live
#: model's layers say it); None where no record exists.
Orientation = bool | Mapping[str, bool] | None

# Rows per block: a float32 block of about 8 MiB (2048 rows of a 1024-wide weight) was fastest on 2 cores.
_BLOCK_BYTES = 8 << 20


def resolve_scales(
    layout: Layout,
    alpha: Alpha | None,
    tensors: Mapping[str, torch.Tensor] | None = None,
) -> dict[str, float]:
    """Return ``alpha / rank`` for every module with factors; raise if an alpha is unknown or misnamed.

    Layouts that store alpha as a tensor (kohya) use it (missing means alpha = rank) unless ``alpha``
    is given.
    """
    needing = [m for m in layout.modules if m.has_factors]
    if not needing:
        return {}
    if alpha is None and layout.spec is KOHYA and tensors is not None:
        return {m.name: _kohya_alpha(m, tensors) / m.rank for m in needing}
    if alpha is None:
        names = [m.name for m in needing]
        raise AlphaError(
            f"the LoRA alpha is not known for {len(names)} module(s) ({', '.join(names[:3])}"
            f"{', …' if len(names) > 3 else ''}); pass alpha=<float> (CLI: --alpha A) (in Python also a "
            "per-module mapping; nanoGPT stores it as checkpoint['model_args']['lora_alpha'])"
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


def _kohya_alpha(m: LoraModule, tensors: Mapping[str, torch.Tensor]) -> float:
    key = m.key_map.get("alpha")
    if key is None:
        return float(m.rank)
    t = tensors[key]
    if t.numel() != 1 or t.device.type == "meta" or t.is_complex():
        raise AlphaError(f"{key}: a kohya alpha is one number, got a {t.dtype} tensor of shape {tuple(t.shape)}")
    return check_alpha(t.item(), where=key, fix="pass alpha=<float> (CLI: --alpha) to override it")


def _accumulation_dtype(*dtypes: torch.dtype) -> torch.dtype:
    return torch.float64 if torch.float64 in dtypes else torch.float32


def settle_orientation(
    modules: list[tuple[LoraModule, torch.Tensor]], fan_in_fan_out: Orientation
) -> Orientation:
    """Decide once whether PEFT-layout bases are stored (in, out) (GPT-2's ``Conv1D``), for the square ones too.

    ``modules`` pairs each module with factors with its base weight (``meta`` is enough). A given
    ``fan_in_fan_out`` (from a config or an argument) is kept. Otherwise non-square weights tell their own
    orientation, and a square weight is (in, out) when every non-square sibling is (GPT-2's Conv1D family has
    no square nn.Linear); in every other case the merge is refused rather than guessed (a GPT-2 adapter on a
    square Conv1D weight and its nn.Linear head would read as nn.Linear). Returns None when no weight needs it.
    """
    if isinstance(fan_in_fan_out, Mapping):  # per module, from a live model's layers: each square one must be said
        unsaid = [m.name for m, _ in modules if m.kind == "linear" and m.spec.name == "peft"
                  and m.delta_shape[0] == m.delta_shape[1] and m.name not in fan_in_fan_out]
        if unsaid:
            raise LayoutError(f"{', '.join(unsaid[:3])}: no orientation recorded for this square weight; pass "
                              "fan_in_fan_out=True/False for it")
        return fan_in_fan_out
    if fan_in_fan_out is not None:
        return fan_in_fan_out
    linear = [(m, b) for m, b in modules if m.kind == "linear" and m.spec.name == "peft"]
    square = [m for m, _ in linear if m.delta_shape[0] == m.delta_shape[1]]
    if not square:
        return None
    shown = {orientation(m, b, None) for m, b in linear if m.delta_shape[0] != m.delta_shape[1]}
    if shown == {True}:  # (in, out) weights: a Conv1D model (GPT-2's family, which has no square nn.Linear)
        return True
    n = square[0].delta_shape[0]
    names = ", ".join(m.name for m in square[:3]) + (f" and {len(square) - 3} more" if len(square) > 3 else "")
    why = ("its non-square siblings disagree" if len(shown) > 1 else "no non-square sibling shows the orientation"
           if not shown else "(out, in) siblings do not tell: GPT-2 keeps square Conv1D weights beside an nn.Linear head")
    raise LayoutError(
        f"{names}: a square ({n}, {n}) weight reads the same stored (out, in) as nn.Linear keeps it or (in, out) as "
        f"GPT-2's Conv1D does, nothing records which, and {why}; pass fan_in_fan_out=True (CLI: --fan-in-fan-out) "
        "for Conv1D weights or fan_in_fan_out=False (CLI: --no-fan-in-fan-out) for nn.Linear"
    )


def orientation(module: LoraModule, base: torch.Tensor, fan_in_fan_out: Orientation) -> bool:
    """Whether ``base`` stores the weight transposed (GPT-2's ``Conv1D``); raise if it fits neither way."""
    if isinstance(fan_in_fan_out, Mapping):
        fan_in_fan_out = fan_in_fan_out.get(module.name)
    rows, cols = module.delta_shape
    shape = tuple(base.shape[:2]) if base.dim() == 4 else tuple(base.shape)
    if module.kind != "linear":
        fan_in_fan_out = False  # PEFT applies fan_in_fan_out to Conv1D-style linear layers only
    if fan_in_fan_out is not None and rows != cols:
        expected = (cols, rows) if fan_in_fan_out else (rows, cols)
        if shape != expected:
            raise ShapeError(
                f"{module.name}: base weight {shape} does not fit the adapter's update {(rows, cols)} with "
                f"fan_in_fan_out={fan_in_fan_out} (which stores it {expected}); is fan_in_fan_out right for this base?"
            )
        return fan_in_fan_out
    if shape == (rows, cols):
        return bool(fan_in_fan_out) if rows == cols else False
    if shape == (cols, rows) and module.spec.name == "peft":
        return True
    raise ShapeError(f"{module.name}: base weight {shape} does not fit the adapter's update {(rows, cols)}")


@dataclass(frozen=True)
class Factors:
    """A module's update as ``ΔW = left @ right`` in the base weight's stored orientation, ready to merge."""

    left: torch.Tensor  # (rows, r)
    right: torch.Tensor  # (r, cols)
    acc: torch.dtype
    out_dtype: torch.dtype
    transposed: bool


def module_factors(
    module: LoraModule,
    tensors: Mapping[str, torch.Tensor],
    base: torch.Tensor | None,
    *,
    dtype: torch.dtype | None = None,
    fan_in_fan_out: Orientation = None,
    device: torch.device | str | None = None,
) -> Factors:
    """The module's factors in the accumulation dtype, oriented like ``base`` (which may be ``meta``)."""
    a, b = tensors[module.a_key], tensors[module.b_key]
    a2, b2 = (a.flatten(1) if a.dim() == 4 else a), (b.flatten(1) if b.dim() == 4 else b)
    out_dtype = dtype or (base.dtype if base is not None else a.dtype)
    acc = _accumulation_dtype(out_dtype, a.dtype, *(() if base is None else (base.dtype,)))
    if device is None:
        device = base.device if base is not None else a.device
    left, right = FORMULAS[module.formula][2](a2.to(device, acc), b2.to(device, acc))  # ΔW = left @ right
    transposed = base is not None and orientation(module, base, fan_in_fan_out)
    if transposed:
        left, right = right.T, left.T
    return Factors(left, right, acc, out_dtype, transposed)


def merge_module(
    module: LoraModule,
    tensors: Mapping[str, torch.Tensor],
    scale: float,
    *,
    base: torch.Tensor | None = None,
    dtype: torch.dtype | None = None,
    fan_in_fan_out: Orientation = None,
) -> torch.Tensor:
    """Return the module's merged weight as a new tensor shaped like its base weight; inputs are not changed.

    The update is accumulated in float32 (float64 for float64 weights) block by block and rounded
    once to ``dtype`` (default: the base weight's dtype; a lora-only embedding takes the factors').
    DoRA modules are rescaled to their magnitude vector, ``W' = m / ‖W + s·ΔW‖ · (W + s·ΔW)``,
    computed on the whole weight in float32.

    Args:
        module: the module, as found by :func:`~lora_ckpt.detect_layout`.
        tensors: a state dict (without wrapper prefix) holding the module's keys.
        scale: ``alpha / rank`` (or PEFT's ``alpha / sqrt(rank)`` with rsLoRA).
        base: the base weight, where ``tensors`` does not hold it (adapter files).
        dtype: dtype of the result.
        fan_in_fan_out: whether the base weight is stored (in, out), as GPT-2's ``Conv1D``; None:
            decided from the shapes (square weights are then taken as (out, in)).
    """
    if base is None and module.has_base:
        base = tensors[module.weight_key]
    if base is not None:
        _require_float(module, base)
    f = module_factors(module, tensors, base, dtype=dtype, fan_in_fan_out=fan_in_fan_out)
    left, right, acc, out_dtype, transposed = f.left, f.right, f.acc, f.out_dtype, f.transposed
    check_scale(module.name, scale, acc)
    base2 = None if base is None else (base.flatten(1) if base.dim() == 4 else base)
    if module.is_dora:
        merged = _merge_dora(module, tensors, base2, left, right, scale, acc, transposed).to(out_dtype)
    else:
        merged = merge_rows(base2, left, right, scale, acc, out_dtype)
    check_finite(module.name, merged, base2, scale)
    return merged.view(base.shape) if base is not None and base.dim() == 4 else merged


def _finite(t: torch.Tensor) -> bool:
    """Whether every value is finite: min and max (NaN propagates to both, infinities land there) are."""
    if t.numel() == 0:
        return True
    if t.dtype.itemsize == 1:  # float8: aminmax has no kernel for it; float16 holds every float8 value exactly
        t = t.to(torch.float16)
    lo, hi = torch.aminmax(t.detach().reshape(-1))  # one pass, much faster than isfinite().all() on bf16
    return math.isfinite(float(lo)) and math.isfinite(float(hi))


def check_scale(name: str, scale: float, acc: torch.dtype) -> None:
    """Raise if ``scale`` does not fit the dtype the update is accumulated in (an absurd alpha)."""
    if not math.isfinite(scale) or abs(scale) > torch.finfo(acc).max:
        raise AlphaError(
            f"{name}: the scale {scale:g} (alpha / rank) does not fit {str(acc).replace('torch.', '')}, the dtype the "
            "update is accumulated in; check the alpha"
        )


def check_finite(name: str, merged: torch.Tensor, base: torch.Tensor | None, scale: float) -> None:
    """Raise if a merge made infinities or NaNs that its base did not have (overflow in the output dtype)."""
    if merged.device.type == "meta" or _finite(merged):
        return
    if base is not None and not _finite(base):
        return  # the base had them already: the merge did not make them
    raise ShapeError(
        f"{name}: the merged weight has non-finite values in {str(merged.dtype).replace('torch.', '')} (the update, "
        f"scaled by {scale:g}, overflows it); merge into a wider dtype: dtype=torch.float32 (CLI: --dtype fp32) "
        "or check the alpha"
    )


def require_finite(tensors: Mapping[str, torch.Tensor] | Iterable[tuple[str, torch.Tensor]], *, fix: str) -> None:
    """Raise :class:`ShapeError` naming every label whose tensor holds a NaN or an infinity, ``fix`` saying what to do.

    ``tensors``: label -> tensor, or a lazy iterable of ``(label, tensor)`` pairs (a label may come back once per row
    block, so a model is checked one block at a time). Integer, bool and ``meta`` tensors pass.

    Example:
        >>> require_finite({"w": torch.tensor([1.0, float("nan")])}, fix="use a good checkpoint")
        Traceback (most recent call last):
        lora_ckpt.errors.ShapeError: w holds NaN or infinite values; use a good checkpoint
    """
    broken: list[str] = []
    for label, t in tensors.items() if isinstance(tensors, Mapping) else tensors:
        if t.is_floating_point() and t.device.type != "meta" and label not in broken and not _finite(t):
            broken.append(label)
    if broken:
        raise ShapeError(f"{', '.join(broken[:4])}{' …' if len(broken) > 4 else ''} "
                         f"{'holds' if len(broken) == 1 else 'hold'} NaN or infinite values; {fix}")


def merge_rows(
    base: torch.Tensor | None,
    left: torch.Tensor,
    right: torch.Tensor,
    scale: float,
    acc: torch.dtype,
    out_dtype: torch.dtype,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """``base + scale · left @ right`` (or the update alone), accumulated in ``acc`` block by block and
    rounded once to ``out_dtype``, into ``out`` when given; ``base`` is (rows, cols), ``left`` (rows, r)."""
    rows, cols = left.shape[0], right.shape[1]
    if out is None:
        out = torch.empty((rows, cols), dtype=out_dtype, device=left.device)
    step = max(1, _BLOCK_BYTES // (4 * max(cols, 1)))
    direct = base is not None and base.dtype == acc and out_dtype == acc
    scratch = None if direct else torch.empty((min(step, rows), cols), dtype=acc, device=left.device)
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


def _merge_dora(
    module: LoraModule,
    tensors: Mapping[str, torch.Tensor],
    base: torch.Tensor | None,
    left: torch.Tensor,
    right: torch.Tensor,
    scale: float,
    acc: torch.dtype,
    transposed: bool,
) -> torch.Tensor:
    if base is None:
        raise LayoutError(f"{module.name}: a DoRA module needs its base weight")
    v = torch.addmm(base.to(acc), left, right, alpha=scale)
    magnitude = tensors[module.magnitude_key].to(v.device, acc)  # type: ignore[index]
    # norms run over the input features of each output feature: rows of (out, in), columns of (vocab, dim)
    per_row = (module.kind == "linear") != transposed
    norm = torch.linalg.vector_norm(v, dim=1 if per_row else 0)
    factor = magnitude / norm
    return v * (factor[:, None] if per_row else factor[None, :])


def resolve_base_names(layout: Layout, base_keys: Mapping[str, object] | list[str]) -> dict[str, str]:
    """Map each module of an adapter-only layout to its module name in the base state dict.

    PEFT names are the base names; kohya names (``lora_unet_down_blocks_0_…``) are matched to the one
    base module whose dotted name, with dots as underscores, they equal or end with.

    Raises:
        KeyMismatchError: a name that matches no base weight, or more than one.
    """
    base_modules = {k[: -len(".weight")] for k in base_keys if k.endswith(".weight")}
    out: dict[str, str] = {}
    problems: list[str] = []
    for m in layout.modules:
        if layout.spec is not KOHYA:
            if f"{m.name}.weight" not in base_keys and not m.has_base:
                problems.append(f"{m.name}: the base has no weight {m.name}.weight for this adapter module")
            out[m.name] = m.name
            continue
        flat = re.sub(r"^(lora_unet|lora_te\d?|lora_transformer)_", "", m.name)
        exact = [b for b in base_modules if b.replace(".", "_") == flat]
        found = exact or [b for b in base_modules if b.replace(".", "_").endswith("_" + flat)]
        if len(found) == 1:
            out[m.name] = found[0]
        elif not found:
            problems.append(f"{m.name}: the kohya name matches no base weight (looked for '*{flat}' with dots as _)")
        else:
            problems.append(f"{m.name}: the kohya name matches several base weights {sorted(found)[:3]}")
    if problems:
        raise KeyMismatchError("; ".join(problems) + "; is this the adapter's base model?")
    return out


def merge_lora(
    state_dict: Mapping[str, torch.Tensor],
    *,
    alpha: Alpha | None = None,
    base: Mapping[str, torch.Tensor] | None = None,
    tied: Literal["untie", "tie"] = "untie",
    dtype: DType | None = None,
    layout: Layout | str | None = None,
    scales: Mapping[str, float] | None = None,
    fan_in_fan_out: Orientation = None,
) -> dict[str, torch.Tensor]:
    """Return the standard-layout state dict of a LoRA state dict; the inputs are never changed.

    Each LoRA module's weight becomes ``W + (alpha / rank) · ΔW`` (accumulated in float32, rounded
    once), its bias moves to ``<module>.bias``, the factors disappear and the prefixes are removed.
    Every other entry passes through as the same tensor object (no copy). Adapter-only layouts (PEFT
    adapter files, kohya) take their base weights from ``base``, a standard state dict; the result
    then has the base's keys, with the adapter's own full tensors (PEFT ``modules_to_save``) in place.

    Sharp edge, tied weights: when an update lands on a weight tied to other keys (nanoGPT's ``wte``
    and ``lm_head``), ``tied="untie"`` (default) keeps the exact function: the updated key gets the
    merged tensor, the others keep the base tensor, so the group is no longer tied. ``tied="tie"``
    gives every key of the group the merged tensor (keeps the tying, changes the other keys' function).

    Args:
        state_dict: a LoRA state dict in any layout of :data:`~lora_ckpt.layout.LAYOUTS`, with or
            without ``_orig_mod.`` / ``module.`` prefixes.
        alpha: one alpha for all modules or a mapping module name -> alpha. Required whenever some
            module has factors and the layout does not record it: it is never guessed.
        base: the base model's standard state dict, for adapter-only layouts.
        tied: ``"untie"`` or ``"tie"``, see above.
        dtype: cast every floating-point output to this dtype (merged weights are rounded once).
        layout: the input's :class:`~lora_ckpt.Layout` if already detected, or a layout name.
        scales: module name -> scale, instead of ``alpha`` (as PEFT configs give them).
        fan_in_fan_out: whether base weights are stored (in, out) (GPT-2 ``Conv1D``); None: from shapes.

    Returns:
        A new dict in the standard layout, in the input's (or the base's) key order.

    Raises:
        LayoutError: the input is not a LoRA layout, or an adapter-only layout without ``base``.
        AlphaError: the alpha is missing, or a mapping misses or misnames modules.
        KeyMismatchError: adapter modules or entries that the base does not have.
        ShapeError: a base weight that does not fit its update.

    Example:
        >>> from lora_ckpt.testing import make_lora_state_dict
        >>> merged = merge_lora(make_lora_state_dict(rank=4), alpha=8.0)
        >>> "transformer.h.0.attn.c_attn.weight" in merged, any("lora_" in k for k in merged)
        (True, False)
    """
    dtype = as_dtype(dtype)
    require_data(state_dict, base or {})
    plan = plan_merge(
        state_dict, alpha=alpha, base=base, tied=tied, dtype=dtype, layout=layout, scales=scales,
        fan_in_fan_out=fan_in_fan_out,
    )
    return plan.execute(plan.big)


def require_data(*state_dicts: Mapping[str, torch.Tensor]) -> None:
    """Raise if a tensor to merge is a ``meta`` tensor (shapes only, no data): planning takes them, arithmetic not."""
    empty = [k for sd in state_dicts for k, v in sd.items() if v.device.type == "meta"]
    if empty:
        raise LayoutError(f"{empty[:3]} {'is a meta tensor' if len(empty) == 1 else 'are meta tensors'} (no data); "
                          "load the real weights (e.g. model.to_empty() then load them) before merging")


@dataclass(frozen=True)
class Step:
    """One output tensor of a merge: copied, merged, a merged bias, or the same tensor as another key."""

    key: str
    op: Literal["copy", "merge", "bias", "alias"]
    source: str | None = None
    from_adapter: bool = False
    module: LoraModule | None = None
    scale: float = 0.0


@dataclass
class MergePlan:
    """Every output tensor of a merge, in order, checked before any arithmetic.

    ``big`` holds the large tensors (the base weights; for a LoRA file that holds its base, the file
    itself), ``adapter`` the small ones (factors, magnitudes, replacements). Either may hold ``meta``
    tensors while planning; :meth:`execute` runs the plan in memory, and the streaming writer runs
    the same plan tensor by tensor.
    """

    steps: list[Step]
    big: Mapping[str, torch.Tensor]
    adapter: Mapping[str, torch.Tensor]
    dtype: torch.dtype | None
    fan_in_fan_out: Orientation

    def source(self, step: Step, big: Mapping[str, torch.Tensor]) -> torch.Tensor | None:
        if step.source is None:
            return None
        return (self.adapter if step.from_adapter else big)[step.source]

    def out_dtype(self, step: Step) -> torch.dtype:
        src = self.source(step, self.big)
        if src is None:  # a lora-only embedding
            assert step.module is not None
            return self.dtype or self.adapter[step.module.a_key].dtype
        return self.dtype if self.dtype is not None and src.is_floating_point() else src.dtype

    def compute(self, step: Step, big: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """The tensor of one (non-alias) step, from ``big``'s real tensors."""
        src = self.source(step, big)
        if step.op == "copy":
            assert src is not None
            return _cast(src, self.dtype)
        assert step.module is not None
        if step.op == "merge":
            return merge_module(
                step.module, self.adapter, step.scale, base=src, dtype=self.dtype, fan_in_fan_out=self.fan_in_fan_out
            )
        assert src is not None
        return _merged_bias(step.module, self.adapter, src, step.scale, self.dtype)

    def merged_modules(self) -> list[str]:
        """The names of the modules whose update this plan merges."""
        return [s.module.name for s in self.steps if s.op == "merge" and s.module is not None]

    def inert_modules(self) -> list[str]:
        """Merged modules whose update is zero (every ``lora_B`` entry 0, or a scale of 0): merging changes nothing."""
        out = []
        for s in self.steps:
            if s.op != "merge" or s.module is None:
                continue
            b = self.adapter.get(s.module.b_key)
            if s.scale == 0 or (b is not None and b.device.type != "meta" and not bool(b.any())):
                out.append(s.module.name)
        return out

    def execute(
        self, big: Mapping[str, torch.Tensor], *, on_step: Callable[[Step], None] | None = None
    ) -> dict[str, torch.Tensor]:
        """Run the plan in memory: a new dict in the plan's key order; ``on_step`` is called after each tensor
        (a progress bar's hook)."""
        done = {}
        for s in self.steps:
            if s.op != "alias":
                done[s.key] = self.compute(s, big)
            if on_step is not None:
                on_step(s)
        return {s.key: done[s.source if s.op == "alias" else s.key] for s in self.steps}  # type: ignore[index]


def plan_merge(
    state_dict: Mapping[str, torch.Tensor],
    *,
    alpha: Alpha | None = None,
    base: Mapping[str, torch.Tensor] | None = None,
    tied: Literal["untie", "tie"] = "untie",
    dtype: DType | None = None,
    layout: Layout | str | None = None,
    scales: Mapping[str, float] | None = None,
    fan_in_fan_out: Orientation = None,
) -> MergePlan:
    """Check everything a merge needs and return its plan (see :func:`merge_lora` for the arguments).

    Works on ``meta`` tensors for the large side, so a merge of any size is checked in seconds.
    """
    dtype = as_dtype(dtype)
    if not isinstance(layout, Layout):
        layout = detect_layout(state_dict, layout=layout)
    if not layout.is_lora:
        raise LayoutError("the state dict is already in the standard layout: it has no LoRA modules to merge")
    if tied not in ("untie", "tie"):
        raise ValueError(f"tied must be 'untie' or 'tie', got {tied!r}")
    tensors = {k[len(layout.prefix) :]: v for k, v in state_dict.items()}
    check_factors(layout, tensors)
    scales = dict(scales) if scales is not None else resolve_scales(layout, alpha, tensors)
    if layout.needs_base or base is not None:
        if base is None:
            raise LayoutError(
                f"this {layout.kind} state dict holds adapters only, with no base weights; give its base: base=... "
                "(CLI: merge BASE ADAPTER DST)"
            )
        return _plan_onto_base(layout, tensors, base, scales, dtype, fan_in_fan_out)

    by_key = layout.module_by_key
    fan_in_fan_out = settle_orientation(
        [(m, tensors[m.weight_key]) for m in layout.modules if m.has_factors and m.has_base], fan_in_fan_out
    )
    merged: dict[str, Step] = {}
    for m in layout.modules:
        if m.has_factors:
            src = m.weight_key if m.has_base else None
            if src is not None:
                _check_base(m, tensors[src], fan_in_fan_out)
            merged[f"{m.name}.weight"] = Step(f"{m.name}.weight", "merge", src, False, m, scales[m.name])
        if "b_bias" in m.key_map and m.has_bias:
            merged[f"{m.name}.bias"] = Step(f"{m.name}.bias", "bias", m.bias_key, False, m, scales[m.name])
    source_of = {m.weight_key: f"{m.name}.weight" for m in layout.modules if m.has_factors and m.has_base}
    aliases: dict[str, str] = {}
    if tied == "tie":
        for group in layout.tied_updates:
            updated = [source_of[k] for k in group if k in source_of]
            for k in group:
                std = _standard_key(k, by_key)
                if k not in source_of and std is not None:
                    aliases[std] = updated[0]
    prefix = layout.spec.key_prefix if layout.spec else ""
    wrapped = {k: _unwrapped(k) for k in tensors if layout.spec is PEFT and _PEFT_WRAPPER.search(k)}
    trained = {plain for k, plain in wrapped.items() if ".modules_to_save." in k}
    steps: list[Step] = []
    for key in tensors:
        std = _standard_key(key, by_key)
        if std is None:
            continue
        if key in wrapped and ".original_module." in key and wrapped[key] in trained:
            continue  # a live PEFT modules_to_save wrapper: the trained copy below replaces the original
        out_key = wrapped.get(key, std).removeprefix(prefix)
        if std in aliases:
            steps.append(Step(out_key, "alias", aliases[std].removeprefix(prefix)))
        elif std in merged:
            steps.append(replace(merged[std], key=out_key))
        else:
            steps.append(Step(out_key, "copy", key))
    _check_unique(steps, tensors)
    return MergePlan(steps, tensors, tensors, dtype, fan_in_fan_out)


def _check_unique(steps: list[Step], tensors: Mapping[str, torch.Tensor]) -> None:
    """Two inputs that would make the same output key (a stray plain weight beside a LoRA module) are refused."""
    seen: dict[str, Step] = {}
    clashes = []
    for step in steps:
        if step.key in seen:
            clashes.append(f"{step.key} (from {seen[step.key].source or seen[step.key].key} and "
                           f"{step.source or step.key})")
        seen[step.key] = step
    if clashes:
        raise LayoutError(
            "two entries would become the same key: " + "; ".join(clashes[:4])
            + "; the state dict mixes a LoRA module with a plain weight of the same name: drop the stray one"
        )


def check_factors(layout: Layout, tensors: Mapping[str, torch.Tensor]) -> None:
    """LoRA factors must be real floating-point tensors, with finite values where they have data."""
    bad, factors = [], {}
    for m in layout.modules:
        for key in m.factor_keys:
            t = tensors.get(key)
            if t is None or m.key_map.get("alpha") == key:
                continue
            if not t.is_floating_point():
                bad.append(f"{key} is {t.dtype}")
            factors[key] = t
    if bad:
        raise LayoutError("LoRA factors must be floating point: " + "; ".join(bad[:4])
                          + "; integer, bool or complex factors are not a LoRA update (dequantize them first)")
    require_finite(factors, fix="the adapter is broken (a diverged run?): merge a good checkpoint")


# A module PEFT trains in full (``modules_to_save``) is wrapped in a live model: ``lm_head.original_module.weight``
# is the base and ``lm_head.modules_to_save.<adapter>.weight`` the trained copy, which the merged model takes.
_PEFT_WRAPPER = re.compile(r"\.(?:original_module|modules_to_save\.[^.]+)\.")


def _unwrapped(key: str) -> str:
    return _PEFT_WRAPPER.sub(".", key, count=1)


def _require_float(m: LoraModule, base: torch.Tensor) -> None:
    if not base.is_floating_point():
        raise LayoutError(
            f"{m.name}: the base weight is {base.dtype}, a quantized base; dequantize it first "
            "(lora_ckpt merges into floating-point weights only)"
        )


def _check_base(m: LoraModule, base: torch.Tensor, fan_in_fan_out: Orientation) -> None:
    _require_float(m, base)
    orientation(m, base, fan_in_fan_out)


def _cast(value: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
    return value.to(dtype) if dtype is not None and value.is_floating_point() else value


def _merged_bias(
    m: LoraModule, tensors: Mapping[str, torch.Tensor], bias: torch.Tensor, scale: float, dtype: torch.dtype | None
) -> torch.Tensor:
    acc = _accumulation_dtype(bias.dtype)
    lora_bias = tensors[m.key_map["b_bias"]].to(bias.device, acc)
    return (bias.to(acc) + scale * lora_bias).to(dtype or bias.dtype)


def _plan_onto_base(
    layout: Layout,
    tensors: Mapping[str, torch.Tensor],
    base: Mapping[str, torch.Tensor],
    scales: Mapping[str, float],
    dtype: torch.dtype | None,
    fan_in_fan_out: Orientation,
) -> MergePlan:
    base_layout = detect_layout(base)
    if base_layout.is_lora:
        raise LayoutError(f"base must be a standard state dict, got a {base_layout.kind} one; merge it first")
    plain = {k[len(base_layout.prefix) :]: v for k, v in base.items()}
    names = resolve_base_names(layout, plain)
    by_key = layout.module_by_key
    prefix = layout.spec.key_prefix if layout.spec else ""
    replaced: dict[str, str] = {}  # base key -> adapter key of a full tensor that replaces it
    unknown: list[str] = []
    for key in tensors:
        m = by_key.get(key)
        if m is not None and key not in (m.weight_key, m.bias_key):
            continue
        std = _standard_key(key, by_key) or key
        std = split_prefix(std.removeprefix(prefix))[1]
        std = re.sub(r"\.modules_to_save\.[^.]+\.", ".", std)
        if std not in plain:
            unknown.append(key)
        elif std in replaced:
            raise LayoutError(f"{replaced[std]} and {key} both replace the base's {std}; keep one")
        elif tuple(tensors[key].shape) != tuple(plain[std].shape):
            raise ShapeError(
                f"{key}: the adapter's full tensor {tuple(tensors[key].shape)} would replace the base's {std} "
                f"{tuple(plain[std].shape)}; a modules_to_save copy has the base's shape: is this its base model?"
            )
        replaced[std] = key
    if unknown:
        raise KeyMismatchError(f"the adapter holds {unknown[:5]}, which the base does not have; is this its base model?")
    bases = []
    for m in layout.modules:
        w = f"{names[m.name]}.weight"
        if m.has_factors and (w in replaced or w in plain):
            bases.append((m, tensors[replaced[w]] if w in replaced else plain[w]))
    fan_in_fan_out = settle_orientation(bases, fan_in_fan_out)
    special: dict[str, Step] = {}
    for m in layout.modules:
        name = names[m.name]
        if m.has_factors:
            w = f"{name}.weight"
            src, from_adapter = (replaced[w], True) if w in replaced else (w, False)
            _check_base(m, (tensors if from_adapter else plain)[src], fan_in_fan_out)
            special[w] = Step(w, "merge", src, from_adapter, m, scales[m.name])
        if "b_bias" in m.key_map:
            b = f"{name}.bias"
            if b not in plain:
                raise KeyMismatchError(f"{m.name}: the adapter has lora_B.bias but the base module has no bias")
            src, from_adapter = (replaced[b], True) if b in replaced else (b, False)
            special[b] = Step(b, "bias", src, from_adapter, m, scales[m.name])
    steps = [
        special.get(k) or (Step(k, "copy", replaced[k], True) if k in replaced else Step(k, "copy", k))
        for k in plain
    ]
    return MergePlan(steps, plain, tensors, dtype, fan_in_fan_out)


def _standard_key(key: str, by_key: Mapping[str, LoraModule]) -> str | None:
    """The standard key for ``key`` (None for a factor)."""
    m = by_key.get(key)
    if m is None:
        return key
    if key == m.weight_key:
        return f"{m.name}.weight"
    if key == m.bias_key:
        return f"{m.name}.bias"
    if m.kind == "lora_only_embedding" and key == m.a_key:  # its weight takes lora_A's place
        return f"{m.name}.weight"
    return None
