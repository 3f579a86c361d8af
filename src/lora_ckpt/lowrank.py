"""Low-rank surgery on LoRA updates: extract, resize, combine and unmerge, over state dicts (no files).

- :func:`extract_lora`: base + tuned weights → a PEFT-keyed adapter. Per module ``ΔW = W_tuned − W_base``
  (float32, or float64 for float64 inputs or ``acc=torch.float64``) → truncated SVD → factors.
- :func:`resize_lora`: an adapter in any layout we read → the same layout at a smaller rank, by QR of ``B`` and
  ``Aᵀ`` and an SVD of the small ``r×r`` core (``B@A`` is never formed): ``O((m+n)r²)`` per module.
- :func:`combine_lora`: adapters → one, exactly (ranks concatenated, weights may be negative) or compressed to
  a rank by the same QR + core-SVD route.
- :func:`unmerge_lora`: merged weights − scale·ΔW, accumulated in float32/64 and rounded once (a merge with the
  scales negated, :func:`~lora_ckpt.merge.plan_merge`).

Conventions, the same everywhere here:

- **Rank selection** (:class:`RankRule`), with ``σ₁ ≥ σ₂ ≥ …`` the singular values of the scaled update and
  ``E_total = ‖ΔW‖²_F = Σσᵢ²`` (computed exactly, also when only the leading σ are):
  ``rank=R`` keeps at most ``R``; ``energy=E`` keeps the smallest ``k`` with ``Σᵢ≤ₖ σᵢ² ≥ E·E_total`` (PEFT's
  ``convert_to_lora`` float rank); ``sv_epsilon=S`` keeps the ``σᵢ > S`` (absolute, as mergekit's
  ``--sv-epsilon``); ``sv_ratio=T`` (``0 < T ≤ 1``) keeps the ``σᵢ ≥ T·σ₁`` (relative: ``T = 1`` keeps
  ``σ₁`` and its ties). Several given: the smallest ``k`` wins (mergekit's ``--max-rank`` with
  ``--sv-epsilon``). Singular values at the numerical noise floor (``σᵢ ≤ max(m, n)·ε·σ₁``, ε of the
  accumulation dtype) are never kept, so an exactly rank-r update comes out at rank r whatever the cap above it.
- **A rule that keeps nothing**: only ``sv_epsilon`` at or above a module's ``σ₁`` can. Such a module is never
  forced to rank 1: its update is judged negligible and **left out** (a zero update), reported as a row with
  rank 0 and relative error 1, its keys in ``report.left_out`` and a note naming the module, the rule and its
  ``σ₁``. A PEFT output names it in ``exclude_modules`` so PEFT does not adapt it. Where the state dict stores
  the module's base weight beside its factors (nanoGPT, torchtune, loralib, minLoRA) a module cannot lose its
  factors: resize and combine refuse, naming the module and the rule. A rule that keeps nothing of any module is
  refused. A zero update (an untrained ``B = 0``) is exact at any rank and keeps rank 1 in resize and combine.
- **Finite inputs only**: a NaN or an infinity in an adapter, in a merged weight unmerge changes, or in a tensor
  that differs between extract's two models is refused before any SVD, naming the key and where it came from
  (:func:`~lora_ckpt.merge.require_finite`); nothing is returned or written. Extract reads both models once for
  this (and to find what changed); an infinity both models hold at the same place passes that read, harmless in
  a tensor that did not change, and is refused before its module's SVD (``tuned − base`` is NaN there) in one
  that did.
- **Factor split**: ``B = U√Σ``, ``A = √Σ Vᵀ`` (√σ on both sides, as mergekit's default ``--distribute-scale``):
  both factors carry the same magnitude, which bf16 storage and further training both prefer.
- **Scale**: every module this module writes has scale 1 (``alpha = rank``; rsLoRA off), so the update in the
  file is exactly ``B@A``; per-module ranks go to PEFT's ``rank_pattern``/``alpha_pattern``.
- **Randomized SVD** (``svd="randomized"``, or ``"auto"`` with a rank cap): the algorithm of
  ``torch.svd_lowrank`` (Halko, Martinsson & Tropp 2011, randomized range finder with ``q = k + p`` columns and
  ``niter`` QR-stabilised power iterations), run over row blocks so ``ΔW`` need not be held. Its error bound
  (HMT Cor. 10.10): ``E‖ΔW − QQᵀΔW‖ ≤ [1 + √(k/(p−1)) + e√(k+p)/p · √(min(m,n)−k)]^{1/(2·niter+1)} σₖ₊₁``, and
  it is exact to round-off when rank(ΔW) ≤ q.
- **Reported error**: measured, per module, on the factors as computed (before rounding to the output dtype):
  ``‖ΔW − BA‖_F`` directly in float64, never as ``√(E_total − Σkept σ²)``, which cancels to noise (√ε of the
  accumulation dtype, ~3e-4 in float32) where the error is small. Extract reads ``ΔW = W_tuned − W_base`` once
  more, in float64 and cache-sized row blocks (one more pass over the rows, memory bounded as the others);
  resize and combine compare factor pairs by a QR of the stacked left factors (``B@A`` is never formed).

DoRA adapters are refused by resize, combine and unmerge: their magnitude vector rescales each row by the norm
of ``W + s·ΔW``, which is not a low-rank update of the weight.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Literal, Protocol

import torch

from lora_ckpt._table import render_html, render_text
from lora_ckpt.checks import check_alpha, check_rank
from lora_ckpt.dtypes import DType, as_dtype
from lora_ckpt.errors import AlphaError, KeyMismatchError, LayoutError, LoraCkptError, ShapeError
from lora_ckpt.layout import FORMULAS, KOHYA, PEFT, Layout, LayoutSpec, LoraModule, detect_layout, formula_factors, tied_groups
from lora_ckpt.memory import mapped_empty, release_freed
from lora_ckpt.merge import Orientation, check_factors, plan_merge, require_data, require_finite, resolve_scales

__all__ = [
    "Kind",
    "LowRankReport",
    "LowRankResult",
    "ModuleRow",
    "RankRule",
    "RowReader",
    "TensorRows",
    "combine_lora",
    "extract_lora",
    "factor_svd",
    "randomized_svd",
    "resize_lora",
    "unmerge_lora",
]

#: How a weight is used: ``nn.Linear`` (out, in), GPT-2's ``Conv1D`` (in, out), ``nn.Embedding`` (vocab, dim),
#: or ``other`` (never factored: saved whole when it changed).
Kind = Literal["linear", "conv1d", "embedding", "other"]
SvdMethod = Literal["auto", "randomized", "full"]

_PEFT_PREFIX = PEFT.key_prefix


@dataclass(frozen=True)
class RankRule:
    """Which singular values to keep; see the module docstring for the exact definitions.

    Example:
        >>> s = torch.tensor([4.0, 2.0, 1.0, 0.5])  # energies 16, 4, 1, 0.25 of 21.25
        >>> RankRule(energy=0.9).select(s, 21.25), RankRule(sv_epsilon=0.9).select(s, 21.25)
        (2, 3)
        >>> RankRule(rank=1, sv_ratio=0.1).select(s, 21.25), RankRule(sv_ratio=0.5).select(s, 21.25)
        (1, 2)
        >>> RankRule(sv_epsilon=5.0).select(s, 21.25)  # nothing above 5: the caller leaves the module out
        0
    """

    rank: int | None = None
    energy: float | None = None
    sv_epsilon: float | None = None
    sv_ratio: float | None = None

    def __post_init__(self) -> None:
        if self.rank is None and self.energy is None and self.sv_epsilon is None and self.sv_ratio is None:
            raise LoraCkptError("say how to choose the rank: rank=R (CLI: --rank R), energy=E (CLI: --energy E), "
                                "sv_epsilon=S (CLI: --sv-epsilon S) or sv_ratio=T")
        if self.rank is not None:
            check_rank(self.rank, where="rank")
        fix = "give a number in (0, 1]"
        if self.energy is not None and not 0 < check_alpha(self.energy, where="energy", fix=fix) <= 1:
            raise LoraCkptError(f"energy is {self.energy}, not in (0, 1]; it is the fraction of Σσ² to keep")
        if self.sv_epsilon is not None and check_alpha(self.sv_epsilon, where="sv_epsilon", fix="give a number ≥ 0") < 0:
            raise LoraCkptError(f"sv_epsilon is {self.sv_epsilon}, a negative singular-value cutoff; give a number ≥ 0")
        if self.sv_ratio is not None and not 0 < check_alpha(self.sv_ratio, where="sv_ratio", fix=fix) <= 1:
            raise LoraCkptError(f"sv_ratio is {self.sv_ratio}, not in (0, 1]; it keeps the σ ≥ sv_ratio·σ_max")

    def select(self, s: torch.Tensor, total: float, *, floor: float = 0.0) -> int:
        """How many of the singular values ``s`` (descending) to keep, ``total`` being ``Σσ²`` of all of them;
        0 where ``sv_epsilon`` is at or above ``s[0]`` (see the module docstring for what callers do then)."""
        s = s.double()
        k = int((s > max(floor, 0.0)).sum()) if floor > 0 else int((s > 0).sum())
        if self.rank is not None:
            k = min(k, self.rank)
        if self.sv_epsilon is not None:
            k = min(k, int((s > self.sv_epsilon).sum()))
        if self.sv_ratio is not None and len(s):
            k = min(k, int((s >= self.sv_ratio * float(s[0])).sum()))
        if self.energy is not None and len(s):
            cum = torch.cumsum(s.square(), 0)
            reach = int(torch.searchsorted(cum, torch.tensor(self.energy * total, dtype=cum.dtype))) + 1
            k = min(k, reach)
        return max(k, 0)

    @property
    def cap(self) -> int | None:
        """The most singular values any module may keep (``rank``), or None."""
        return self.rank

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in (("rank", self.rank), ("energy", self.energy), ("sv_epsilon", self.sv_epsilon),
                                  ("sv_ratio", self.sv_ratio)) if v is not None}


@dataclass(frozen=True)
class ModuleRow:
    """One module of a report: what was kept and how close it is.

    ``rank_in``: the rank of the input update (an adapter's rank; ``min(m, n)`` for a full ΔW). ``rel_error``:
    ``‖ΔW − ΔW_kept‖_F / ‖ΔW‖_F``, measured in float64 on the float32/64 factors (before rounding to the output
    dtype). ``energy``: ``1 − rel_error²`` from the same measurement (``Σkept σ²/Σσ²`` in exact arithmetic).
    ``max_abs_error``: for unmerge against a known base, the largest ``|W − W_base|``.
    """

    module: str
    kind: str
    shape: tuple[int, ...]
    rank_in: int
    rank: int
    energy: float
    rel_error: float
    max_abs_error: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"module": self.module, "kind": self.kind, "shape": list(self.shape), "rank_in": self.rank_in,
                "rank": self.rank, "energy": self.energy, "rel_error": self.rel_error,
                **({} if self.max_abs_error is None else {"max_abs_error": self.max_abs_error})}


@dataclass
class LowRankReport:
    """What an extract / resize / combine / unmerge did, per module and in total.

    ``saved``: keys written whole (PEFT ``modules_to_save``: norms, biases, embeddings that changed but are not
    factored); ``left_out``: changed keys not written (each also explained in ``notes``); ``notes``: one line per
    fact the user should know; ``warnings``: facts that make the result doubtful (also printed on stderr).
    """

    operation: str
    rows: list[ModuleRow] = field(default_factory=list)
    saved: list[str] = field(default_factory=list)
    left_out: list[str] = field(default_factory=list)
    unchanged: int = 0
    notes: list[str] = field(default_factory=list)
    rule: RankRule | None = None
    warnings: list[str] = field(default_factory=list)

    def totals(self) -> dict[str, Any]:
        """Module count, parameters kept, total retained energy (Σ over modules), mean and worst relative error."""
        factored = [r for r in self.rows if r.kind != "full"]
        worst = max((r.rel_error for r in factored), default=0.0)
        mean = sum(r.rel_error for r in factored) / len(factored) if factored else 0.0
        params = sum(r.rank * (r.shape[0] + r.shape[-1]) for r in factored)
        out: dict[str, Any] = {"modules": len(factored), "factor_parameters": params, "mean_rel_error": mean,
                               "max_rel_error": worst, "saved": len(self.saved), "left_out": len(self.left_out),
                               "unchanged": self.unchanged}
        errs = [r.max_abs_error for r in self.rows if r.max_abs_error is not None]
        if errs:
            out["max_abs_error"] = max(errs)
        return out

    def table_rows(self) -> list[dict[str, object]]:
        rows = []
        for r in self.rows:
            row: dict[str, object] = {"module": r.module, "kind": r.kind, "shape": "x".join(map(str, r.shape))}
            if self.operation == "unmerge":  # nothing is approximated: the rank taken out, and the error if known
                row["rank"] = r.rank
            else:
                row.update({"rank in": r.rank_in, "rank": r.rank, "energy": f"{r.energy:.6f}",
                            "rel error": f"{r.rel_error:.3e}"})
            if any(x.max_abs_error is not None for x in self.rows):
                row["max |error|"] = "" if r.max_abs_error is None else f"{r.max_abs_error:.3e}"
            rows.append(row)
        return rows

    def summary(self) -> str:
        t = self.totals()
        rule = f" ({', '.join(f'{k}={v}' for k, v in self.rule.to_dict().items())})" if self.rule else ""
        line = (f"{self.operation}{rule}: {t['modules']} module(s), {t['factor_parameters']:,} factor parameters, "
                f"mean relative error {t['mean_rel_error']:.3e}, worst {t['max_rel_error']:.3e}"
                if self.operation != "unmerge" else f"unmerge: {t['modules']} module(s) taken out")
        if "max_abs_error" in t:
            line += f", largest |error| against the base {t['max_abs_error']:.3e}"
        extra = [f"saved whole: {', '.join(self.saved)}"] if self.saved else []
        extra += [f"left out: {', '.join(self.left_out)}"] if self.left_out else []
        extra += [f"unchanged tensors (not saved): {self.unchanged}"] if self.unchanged else []
        return "\n".join([line, *extra, *self.notes])

    def __str__(self) -> str:
        table = render_text(self.table_rows())
        return table + ("\n" if table else "") + self.summary()

    def _repr_html_(self) -> str:
        return render_html(self.table_rows()) + "<p>" + "<br>".join(self.summary().splitlines()) + "</p>"

    def to_dict(self) -> dict[str, Any]:
        """The report as JSON-able values."""
        return {"operation": self.operation, "rule": self.rule.to_dict() if self.rule else None,
                "modules": [r.to_dict() for r in self.rows], "totals": self.totals(), "saved": self.saved,
                "left_out": self.left_out, "notes": self.notes, "warnings": self.warnings}


@dataclass
class LowRankResult:
    """A new state dict and what it took.

    ``state_dict`` is in ``layout`` (``"peft"`` keys ``base_model.model.…`` for extract; the input's layout for
    resize and combine; ``"standard"`` for unmerge). ``alpha``: the alpha per module (= its rank: scale 1).
    ``config``: the ``adapter_config.json`` fields a PEFT output needs beyond the tensors (``target_modules``,
    ``modules_to_save``, ``lora_bias`` …), for :func:`~lora_ckpt.formats.peft.write_peft_adapter`'s
    ``extra_config``. ``fan_in_fan_out``: whether the base weights are stored (in, out) (GPT-2's Conv1D).
    """

    state_dict: dict[str, torch.Tensor]
    alpha: dict[str, float]
    layout: str
    report: LowRankReport
    config: dict[str, Any] = field(default_factory=dict)
    fan_in_fan_out: bool = False

    def __repr__(self) -> str:
        return (f"LowRankResult(layout={self.layout!r}, tensors={len(self.state_dict)}, modules={len(self.alpha)}, "
                f"saved={len(self.report.saved)})")


# --- the SVDs ---------------------------------------------------------------------------------------------------

Blocks = Callable[[], Iterator[tuple[int, torch.Tensor]]]
_RESIDUAL_BLOCK_BYTES = 2 << 20  # float64 passes (norms, the residual): blocks that stay in cache
_FILL_BLOCK_BYTES = 4 << 20  # reading a ΔW that is held whole: the inputs' blocks beside it


def randomized_svd(
    blocks: Blocks,
    shape: tuple[int, int],
    q: int,
    *,
    niter: int = 2,
    seed: int = 0,
    acc: DType = torch.float32,
    device: torch.device | str | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, float]:
    """Return ``(U, S, Vh, ‖M‖²_F)`` of the randomized SVD (``q`` columns, ``niter`` power iterations) of the
    ``shape`` matrix ``M`` whose row blocks ``blocks()`` yields as ``(first_row, rows)``, one pass per call.

    ``M`` is never held whole: ``2·niter + 2`` passes over its rows. ``U`` is (m, q), ``S`` (q,), ``Vh`` (q, n),
    ``U·diag(S)·Vh = QQᵀM`` with ``Q`` an orthonormal basis of the sampled range (the module docstring states
    the error bound).

    Example:
        >>> m = torch.randn(40, 3, dtype=torch.float64) @ torch.randn(3, 30, dtype=torch.float64)
        >>> u, s, vh, total = randomized_svd(lambda: iter([(0, m)]), (40, 30), 6, acc=torch.float64)
        >>> torch.allclose(u[:, :3] * s[:3] @ vh[:3], m), round(total / float(m.square().sum()), 12)
        (True, 1.0)
    """
    m, n = shape
    acc = _acc_dtype(acc) or torch.float32
    dev = torch.device(device) if device is not None else torch.device("cpu")
    gen = torch.Generator().manual_seed(seed)
    omega = torch.randn(n, q, generator=gen, dtype=acc).to(dev)
    y = torch.empty(m, q, dtype=acc, device=dev)
    total = 0.0
    for start, rows in blocks():
        d = rows.to(dev, acc)
        torch.mm(d, omega, out=y[start : start + len(d)])
        total += _square_sum(d)
    basis = torch.linalg.qr(y).Q
    for _ in range(niter):
        z = torch.zeros(n, q, dtype=acc, device=dev)
        for start, rows in blocks():
            d = rows.to(dev, acc)
            z.addmm_(d.T, basis[start : start + len(d)])
        z = torch.linalg.qr(z).Q
        for start, rows in blocks():
            d = rows.to(dev, acc)
            torch.mm(d, z, out=y[start : start + len(d)])
        basis = torch.linalg.qr(y).Q
    bt = torch.zeros(n, q, dtype=acc, device=dev)  # (QᵀM)ᵀ
    for start, rows in blocks():
        d = rows.to(dev, acc)
        bt.addmm_(d.T, basis[start : start + len(d)])
    ub, s, vh = torch.linalg.svd(bt.T, full_matrices=False)
    return basis @ ub, s, vh, total


def _square_sum(d: torch.Tensor) -> float:
    """``‖d‖²_F`` of a 2-d tensor accumulated in float64, a cache-sized block of rows at a time (a float64 copy of a
    whole float32 ΔW would be twice its size)."""
    step = max(1, _RESIDUAL_BLOCK_BYTES // (8 * max(1, d.shape[1])))
    total = torch.zeros((), dtype=torch.float64, device=d.device)
    for start in range(0, d.shape[0], step):
        total += torch.linalg.vector_norm(d[start : start + step], dtype=torch.float64).square()
    return float(total)


def factor_svd(
    left: torch.Tensor, right: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Return ``(U, S, Vh)`` with ``U·diag(S)·Vh = left @ right`` and orthonormal ``U`` (m, r), ``Vh`` (r, n),
    without forming the product: QR of ``left`` and ``rightᵀ``, SVD of the small ``r×r`` core. ``O((m+n)r²)``.

    Example:
        >>> left, right = torch.randn(50, 4, dtype=torch.float64), torch.randn(4, 30, dtype=torch.float64)
        >>> u, s, vh = factor_svd(left, right)
        >>> torch.allclose(u * s @ vh, left @ right), tuple(u.shape), tuple(vh.shape)
        (True, (50, 4), (4, 30))
    """
    qb, rb = torch.linalg.qr(left)  # (m, r), (r, r)
    qa, ra = torch.linalg.qr(right.T)  # (n, r), (r, r)
    uc, s, vhc = torch.linalg.svd(rb @ ra.T)  # the core (r, r)
    return qb @ uc, s, vhc @ qa.T


def _noise_floor(s: torch.Tensor, shape: tuple[int, int], acc: torch.dtype) -> float:
    return float(s[0]) * max(shape) * torch.finfo(acc).eps if len(s) else 0.0


def _acc_dtype(acc: DType | None) -> torch.dtype | None:
    """``acc`` (a dtype or a name :func:`~lora_ckpt.dtypes.as_dtype` knows) as float32 or float64; None stays None."""
    out = as_dtype(acc)
    if out is not None and out not in (torch.float32, torch.float64):
        raise LoraCkptError(f"acc={out}: the SVDs accumulate in torch.float32 or torch.float64 (acc='fp32' or 'fp64')")
    return out


def _kept(rule: RankRule, s: torch.Tensor, total: float, shape: tuple[int, int], acc: torch.dtype) -> int:
    """How many singular triplets to keep: the rule's count (0: the module is left out), 1 for a zero update."""
    if not len(s) or float(s[0]) == 0.0:
        return 1  # a zero update is exact at any rank
    return rule.select(s, total, floor=_noise_floor(s, shape, acc))


def _nothing_kept(module: str, rule: RankRule, s: torch.Tensor) -> str:
    return (f"{module}: sv_epsilon={rule.sv_epsilon:g} keeps none of its singular values (the largest is "
            f"{float(s[0]):.4g})")


_BROKEN_ADAPTER = "the adapter is broken (a diverged run?): use a good checkpoint"


def _split(u: torch.Tensor, s: torch.Tensor, vh: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(left, right) = (U√Σ, √ΣVᵀ) of the first ``k`` singular triplets."""
    root = s[:k].sqrt()
    return u[:, :k] * root, root[:, None] * vh[:k]


def _row(
    module: str, kind: str, shape: tuple[int, ...], rank_in: int, k: int, total: float, residual: float
) -> ModuleRow:
    """The row from measured ``‖ΔW‖²_F`` and ``‖ΔW − left@right‖²_F``; never ``1 − Σkept σ²/Σσ²``, which cancels."""
    if total <= 0:
        return ModuleRow(module, kind, shape, rank_in, k, 1.0, 0.0)
    ratio = residual / total
    return ModuleRow(module, kind, shape, rank_in, k, max(0.0, 1.0 - ratio), math.sqrt(ratio))


def _require_fits(module: str, left: torch.Tensor, right: torch.Tensor, dtype: torch.dtype) -> float:
    """``‖left@right‖²_F`` (in float64, without the product); refuse an update whose size ``dtype`` cannot hold
    (factors of finite values whose product overflows), before an SVD fails on it or a file holds it."""
    norm = float(torch.linalg.vector_norm(torch.linalg.qr(left.double()).R @ right.double()))
    if not math.isfinite(norm) or norm > torch.finfo(dtype).max:
        name = str(dtype).removeprefix("torch.")
        raise ShapeError(f"{module}: the update (scale × B@A) has norm {norm:.3g}, which {name} cannot hold; "
                         f"{_BROKEN_ADAPTER}")
    return norm**2


def _factor_residual(
    left: torch.Tensor, right: torch.Tensor, new_left: torch.Tensor, new_right: torch.Tensor,
    total: float | None = None,
) -> tuple[float, float]:
    """``(‖left@right‖²_F, ‖left@right − new_left@new_right‖²_F)`` in float64 without forming a product: by QR of
    the stacked left factors, ``‖PQ‖_F = ‖R_P·Q‖_F``, accurate to ``ε₆₄·‖P‖‖Q‖`` (no difference of squares);
    ``total``: the first, where :func:`_require_fits` has measured it."""
    left, right = left.double(), right.double()
    stacked = torch.cat([left, -new_left.to(left.device, torch.float64)], 1)  # (m, r + k)
    both = torch.cat([right, new_right.to(right.device, torch.float64)], 0)  # (r + k, n)
    if total is None:
        total = float(torch.linalg.vector_norm(torch.linalg.qr(left).R @ right)) ** 2
    residual = float(torch.linalg.vector_norm(torch.linalg.qr(stacked).R @ both)) ** 2
    return total, residual


# --- reading row blocks -------------------------------------------------------------------------------------------


class RowReader(Protocol):
    """Tensors by key, readable by row ranges: what :func:`extract_lora` reads (a state dict, or a file)."""

    def keys(self) -> Iterable[str]: ...

    def shape(self, key: str) -> tuple[int, ...]: ...

    def dtype(self, key: str) -> torch.dtype: ...

    def rows(self, key: str, start: int, stop: int, *, scratch: torch.Tensor | None = None) -> torch.Tensor:
        """Rows ``start:stop`` of ``key`` (its first dimension; a 0-d tensor whole), never changed by the caller.

        ``scratch``: a uint8 buffer of at least their bytes that a reader of files reads them into (the result is
        then a view of it, valid until the buffer is reused), so a pass over a model allocates nothing per block.
        """
        ...

    def where(self, key: str) -> str:
        """Where ``key`` lives, for messages (a file path, or a name such as ``"the tuned weights"``)."""
        ...


class TensorRows:
    """A :class:`RowReader` over an in-memory state dict (read only, never changed); ``name`` says in messages
    where a key comes from."""

    def __init__(self, tensors: Mapping[str, torch.Tensor], name: str = "the state dict") -> None:
        self.tensors = tensors
        self.name = name

    def where(self, key: str) -> str:
        return self.name

    def keys(self) -> Iterable[str]:
        return self.tensors.keys()

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self.tensors[key].shape)

    def dtype(self, key: str) -> torch.dtype:
        return self.tensors[key].dtype

    def rows(self, key: str, start: int, stop: int, *, scratch: torch.Tensor | None = None) -> torch.Tensor:
        t = self.tensors[key]  # a view: ``scratch`` is not needed
        return t[start:stop] if t.dim() else t


class _Scratch:
    """Reusable CPU buffers, one per role (the tuned rows, the base rows, …), each grown to the largest block
    asked of it and mapped outside the heap: a pass over a model then allocates nothing per block."""

    def __init__(self) -> None:
        self.buffers: dict[str, torch.Tensor] = {}

    def _bytes(self, role: str, need: int) -> torch.Tensor:
        buffer = self.buffers.get(role)
        if buffer is None or buffer.numel() < need:
            buffer = self.buffers[role] = mapped_empty((need,), torch.uint8)
        return buffer

    def rows(self, reader: RowReader, key: str, start: int, stop: int, role: str) -> torch.Tensor:
        shape = reader.shape(key)
        need = (stop - start) * math.prod(shape[1:]) * reader.dtype(key).itemsize if shape else 0
        return reader.rows(key, start, stop, scratch=self._bytes(role, need))

    def converted(self, rows: torch.Tensor, dtype: torch.dtype, role: str,
                  device: torch.device | None = None) -> torch.Tensor:
        """A copy of ``rows`` in ``dtype`` (on ``device``, default the CPU), in ``role``'s buffer on the CPU: an
        operation on two dtypes would make a temporary copy of the narrower operand each time."""
        if device is not None and device.type != "cpu":
            return rows.to(device, dtype)
        need = rows.numel() * dtype.itemsize
        return self._bytes(role, need)[:need].view(dtype).view(rows.shape).copy_(rows)


def _reader(x: Mapping[str, torch.Tensor] | RowReader, name: str) -> RowReader:
    if isinstance(x, Mapping):
        require_data(x)
        return TensorRows(x, name)
    return x


def _equal(base: torch.Tensor, tuned: torch.Tensor, scratch: _Scratch) -> bool:
    """Whether two blocks hold the same values, in the wider of their dtypes where they differ (exact)."""
    if base.dtype != tuned.dtype and base.is_floating_point() and tuned.is_floating_point():
        wide = torch.promote_types(base.dtype, tuned.dtype)
        base, tuned = (scratch.converted(base, wide, "base, wide") if base.dtype != wide else base,
                       scratch.converted(tuned, wide, "tuned, wide") if tuned.dtype != wide else tuned)
    return torch.equal(base, tuned)


def _scan(b: RowReader, t: RowReader, block_bytes: int, mixed: list[str] | None = None) -> set[str]:
    """The keys of ``t`` whose values differ from ``b``'s (or that ``b`` lacks, or holds in another shape), reading
    both once in row blocks; ``mixed`` gets the keys the two hold in different dtypes. Every block that differs is checked finite (NaN never equals itself), so a
    NaN or an infinity the adapter would carry is refused here, before any SVD, naming its key and file."""
    changed: set[str] = set()
    base_keys = set(b.keys())
    scratch = _Scratch()  # each block is checked before the next is read
    mixed = mixed if mixed is not None else []

    def differing() -> Iterator[tuple[str, torch.Tensor]]:  # (label, block) pairs to check; notes `changed` as it goes
        for key in t.keys():
            shape = t.shape(key)
            same = key in base_keys and b.shape(key) == shape  # then both feed ΔW: check both
            if not same:
                changed.add(key)
            elif b.dtype(key) != t.dtype(key):
                mixed.append(key)
            rows = shape[0] if shape else 1
            step = max(1, (block_bytes // t.dtype(key).itemsize) // max(1, math.prod(shape[1:])))
            for start in range(0, rows, step):
                stop = min(start + step, rows)
                tuned = scratch.rows(t, key, start, stop, "tuned")
                base = scratch.rows(b, key, start, stop, "base") if same else None
                if base is not None and key not in changed and _equal(base, tuned, scratch):
                    continue  # equal so far (infinities too): nothing of it goes into the adapter yet
                changed.add(key)
                yield f"{key} in {t.where(key)}", tuned
                if base is not None:
                    yield f"{key} in {b.where(key)}", base

    require_finite(differing(), fix="the weights are broken (a diverged run?): extract from good checkpoints")
    release_freed()  # the scan's blocks
    return changed


# --- extract -------------------------------------------------------------------------------------------------------


@dataclass
class _Delta:
    """One changed weight's difference, readable in row blocks (float ``acc``), or held whole."""

    base: RowReader
    tuned: RowReader
    key: str
    shape: tuple[int, int]
    acc: torch.dtype
    step: int
    whole: torch.Tensor | None = None
    scratch: _Scratch = field(default_factory=_Scratch)
    buffer: torch.Tensor | None = None  # the streamed blocks of ΔW

    def blocks(self) -> Iterator[tuple[int, torch.Tensor]]:
        """``(first_row, rows)`` of ΔW; read from the files, ``rows`` is one buffer refilled for every block, valid
        until the next is asked for (a reader that keeps blocks copies them)."""
        if self.whole is not None:
            yield 0, self.whole
            return
        if self.buffer is None:  # one for every pass: a pass's last block may outlive it in the caller
            self.buffer = mapped_empty((min(self.step, self.shape[0]), self.shape[1]), self.acc)
        buffer = self.buffer
        for start in range(0, self.shape[0], self.step):
            stop = min(start + self.step, self.shape[0])
            yield start, self._difference(start, stop, buffer[: stop - start])

    def _difference(self, start: int, stop: int, out: torch.Tensor) -> torch.Tensor:
        """Rows ``start:stop`` of ``tuned − base`` into ``out`` (any device), rounded once to ``out``'s dtype: the
        inputs are widened exactly and subtracted in the widest of the three dtypes (float64 inputs with a float32
        ``out`` are subtracted in float64: rounding each first would leave only the noise of a small update)."""
        tuned = self.scratch.rows(self.tuned, self.key, start, stop, "tuned")
        base = self.scratch.rows(self.base, self.key, start, stop, "base")
        wide = torch.promote_types(torch.promote_types(tuned.dtype, base.dtype), out.dtype)
        if wide != out.dtype:
            difference = self.scratch.converted(tuned, wide, "tuned, wide")  # a copy: sub_ may not touch the input
            difference.sub_(base if base.dtype == wide else self.scratch.converted(base, wide, "base, wide"))
            return out.copy_(difference)
        out.copy_(tuned)
        if base.dtype != out.dtype or base.device != out.device:
            base = self.scratch.converted(base, out.dtype, "base, converted", out.device)
        return out.sub_(base)

    def fill(self) -> torch.Tensor:
        """ΔW whole (a new ``acc`` tensor), filled in small row blocks: besides it, only a block of each input
        (and the base's in ``acc``) is held, never a list of blocks to concatenate, whose peak is twice ΔW."""
        m, n = self.shape
        whole = mapped_empty((m, n), self.acc)
        widest = max(self.tuned.dtype(self.key).itemsize, self.base.dtype(self.key).itemsize)
        step = max(1, _FILL_BLOCK_BYTES // (widest * max(1, n)))
        for start in range(0, m, step):
            stop = min(start + step, m)
            self._difference(start, stop, whole[start:stop])
        return whole

    def residual(self, left: torch.Tensor, right: torch.Tensor) -> tuple[float, float]:
        """``(‖ΔW‖²_F, ‖ΔW − left@right‖²_F)``, ΔW read again as ``tuned − base`` in float64 (exact for float32
        and narrower inputs, where the ``acc`` difference may round), on ``left``'s device, in cache-sized blocks."""
        dev, f64 = left.device, torch.float64
        left, right = left.to(f64), right.to(f64)
        cached = max(1, min(self.step, _RESIDUAL_BLOCK_BYTES // (f64.itemsize * self.shape[1])))
        step = self.step if dev.type != "cpu" else cached
        rows = (min(step, self.shape[0]), self.shape[1])
        buffer = mapped_empty(rows, f64) if dev.type == "cpu" else torch.empty(rows, dtype=f64, device=dev)
        total = residual = torch.zeros((), dtype=f64, device=dev)
        for start in range(0, self.shape[0], step):
            stop = min(start + step, self.shape[0])
            d = self._difference(start, stop, buffer[: stop - start])
            total = total + torch.linalg.vector_norm(d).square()
            residual = residual + torch.linalg.vector_norm(d.addmm_(left[start:stop], right, alpha=-1)).square()
        return float(total), float(residual)


def extract_lora(
    base: Mapping[str, torch.Tensor] | RowReader,
    tuned: Mapping[str, torch.Tensor] | RowReader,
    *,
    rank: int | None = None,
    energy: float | None = None,
    sv_epsilon: float | None = None,
    sv_ratio: float | None = None,
    modules: str | None = None,
    kinds: Mapping[str, Kind] | None = None,
    tied: Mapping[str, str] | None = None,
    others: Literal["save", "report", "refuse"] = "save",
    svd: SvdMethod = "auto",
    oversample: int = 8,
    niter: int = 2,
    acc: DType | None = None,
    dtype: DType | None = None,
    device: torch.device | str | None = None,
    seed: int = 0,
    resident_bytes: int | None = None,
    block_bytes: int = 32 << 20,
    on_module: Callable[[str, int], None] | None = None,
) -> LowRankResult:
    """Return a PEFT-keyed adapter whose update reproduces ``tuned − base``, module by module, and its report.

    Only changed tensors are written. Every changed 2-d ``<module>.weight`` of a linear, Conv1D or embedding
    module (``kinds``; a module not named there is taken as ``nn.Linear`` (out, in)) that ``modules`` (a regex
    searched in the module name) selects is factored; everything else that changed (norms, biases of unfactored
    modules, embeddings whose vocabulary grew, unselected weights, new keys) goes whole into PEFT's
    ``modules_to_save`` (``others="save"``), is listed in ``report.left_out`` (``others="report"``), or is
    refused before any SVD (``others="refuse"``, for layouts that hold factors only): never silently dropped.
    Changed biases of factored modules count as such tensors under ``"refuse"``. A changed bias of a factored linear module becomes its ``lora_B.bias`` (PEFT's
    ``lora_bias``). ``tied`` maps a weight key the state dicts lack to the key it shares storage with (a tied
    ``lm_head``); its module gets the same update, so input and output embeddings both change as in ``tuned``.
    Update exact to round-off when rank(ΔW) ≤ the rank kept. A module of which ``sv_epsilon`` keeps nothing is
    left out (a zero update; its weight listed in ``report.left_out``), never forced to rank 1.

    Args:
        base, tuned: the two state dicts (standard layout, same keys), or :class:`RowReader` over files.
        rank, energy, sv_epsilon, sv_ratio: the :class:`RankRule`.
        svd: ``"full"`` (``torch.linalg.svd`` of ΔW), ``"randomized"`` (needs ``rank``), or ``"auto"``:
            randomized where a rank cap leaves ``rank + oversample < min(m, n) / 2``, full otherwise.
        oversample, niter: the randomized SVD's extra columns ``p`` and power iterations.
        acc: the accumulation dtype, float32 or float64 (default float32, float64 for float64 inputs; the same in
            resize and combine); a ``torch.dtype`` or a name (``"fp64"``), as ``dtype``.
        dtype: the factors' dtype (default: the tuned weight's): a ``torch.dtype`` or a name
            :func:`~lora_ckpt.dtypes.as_dtype` knows (``"bf16"``).
        device: where the SVDs run (``"cuda"``); tensors are read on the CPU.
        resident_bytes: hold a ΔW whole when its ``acc`` bytes are at most this (default: always); larger ones
            are read in row blocks of about ``block_bytes``, once per randomized pass.
        on_module: called with each module name and its weight's number of elements as it is done, once for
            every 2-d tensor of ``tuned`` (factored, unchanged or not factored): a progress bar's total.

    Raises:
        KeyMismatchError: keys in ``base`` that ``tuned`` lacks (and ``tied`` does not explain).
        ShapeError: a NaN or an infinity in a tensor that differs between the two (named with its key and file,
            before any SVD), or a ``tuned − base`` that overflows ``acc``.
        LoraCkptError: no rank rule, or a bad one; ``svd="randomized"`` without ``rank``; a rule that keeps no
            singular value of any module.
        ValueError: a ``dtype`` or ``acc`` that names no dtype.

    Example:
        >>> g = torch.Generator().manual_seed(0)
        >>> base = {"fc.weight": torch.randn(32, 16, generator=g), "fc.bias": torch.zeros(32)}
        >>> delta = torch.randn(32, 2, generator=g) @ torch.randn(2, 16, generator=g)
        >>> tuned = {"fc.weight": base["fc.weight"] + delta, "fc.bias": torch.zeros(32)}
        >>> out = extract_lora(base, tuned, rank=8)
        >>> sorted(out.state_dict), out.alpha
        (['base_model.model.fc.lora_A.weight', 'base_model.model.fc.lora_B.weight'], {'fc': 2.0})
        >>> b, a = out.state_dict['base_model.model.fc.lora_B.weight'], out.state_dict['base_model.model.fc.lora_A.weight']
        >>> torch.allclose(b @ a, delta, atol=1e-4), out.report.unchanged
        (True, 1)
    """
    rule = RankRule(rank, energy, sv_epsilon, sv_ratio)
    if svd not in ("auto", "randomized", "full"):
        raise LoraCkptError(f"svd is {svd!r}; use 'auto', 'randomized' or 'full'")
    if svd == "randomized" and rule.cap is None:
        raise LoraCkptError("svd='randomized' needs a rank cap: pass rank=R (CLI: --rank R) beside energy or "
                            "sv_epsilon, or svd='full' (CLI: --full-svd)")
    if others not in ("save", "report", "refuse"):
        raise LoraCkptError(f"others is {others!r}; use 'save', 'report' or 'refuse'")
    if oversample < 0 or niter < 0:
        raise LoraCkptError(f"oversample ({oversample}) and niter ({niter}) must be ≥ 0")
    acc, dtype = _acc_dtype(acc), as_dtype(dtype)
    b, t = _reader(base, "the base weights"), _reader(tuned, "the tuned weights")
    kinds, tied = dict(kinds or {}), dict(tied or {})
    if isinstance(base, Mapping) and isinstance(tuned, Mapping):
        tied = {**_shared_ties(base, tuned), **tied}
    pattern = _compile(modules)
    base_keys, tuned_keys = list(b.keys()), list(t.keys())
    tuned_set, base_set = set(tuned_keys), set(base_keys)
    missing = [k for k in base_keys if k not in tuned_set and k not in tied]
    if missing:
        raise KeyMismatchError(
            f"the tuned weights lack {missing[:5]}{' …' if len(missing) > 5 else ''}, which the base has; an adapter "
            "cannot remove a tensor: are these the same architecture (a tied weight the tuned file leaves out: pass "
            "tied={alias: key})?"
        )
    bad_ties = {a: s for a, s in tied.items() if s not in tuned_set or s not in base_set}
    if bad_ties:
        raise KeyMismatchError(f"tied names keys neither state dict holds in both: {bad_ties}")
    for reader, keys in ((b, base_keys), (t, tuned_keys)):
        eight = [k for k in keys if reader.dtype(k).is_floating_point and reader.dtype(k).itemsize == 1]
        if eight:  # torch has no arithmetic between float8 and other dtypes
            name = str(reader.dtype(eight[0])).removeprefix("torch.")
            raise LayoutError(f"{eight[0]} in {reader.where(eight[0])} is {name}"
                              f"{f' (and {len(eight) - 1} more)' if len(eight) > 1 else ''}: extract works on float16, "
                              "bfloat16, float32 or float64 weights; dequantize the model first")
    mixed: list[str] = []
    changed = _scan(b, t, block_bytes, mixed)  # refuses non-finite values before any arithmetic
    report = LowRankReport("extract", rule=rule)
    if differ := [k for k in mixed if k in changed]:
        k0 = differ[0]
        report.warnings.append(
            f"{len(differ)} changed tensor(s) are stored in another dtype in each model ({k0}: {b.dtype(k0)} in the "
            f"base, {t.dtype(k0)} in the tuned model{', …' if len(differ) > 1 else ''}): their difference holds the "
            "rounding of every value, which no low rank captures; extract from a base in the tuned model's dtype")
    out: dict[str, torch.Tensor] = {}
    alphas: dict[str, float] = {}
    dropped: dict[str, str] = {}  # module -> why the rule keeps nothing of it
    saved: dict[str, torch.Tensor] = {}
    lora_kinds: dict[str, Kind] = {}
    changed_bias: dict[str, str] = {}
    done: dict[str, tuple[torch.Tensor, torch.Tensor, ModuleRow]] = {}  # key -> (left, right, row)

    def kind_of(key: str) -> Kind:
        module = key[: -len(".weight")]
        kind = kinds.get(module, "linear")
        if kind == "other" or (pattern is not None and not pattern.search(module)):
            return "other"
        return kind

    plain: list[str] = []  # keys that are not factored: saved whole if they changed
    factored: list[tuple[str, Kind]] = []
    for key in tuned_keys:
        if key not in base_set:
            continue
        shape_b, shape_t = b.shape(key), t.shape(key)
        factorable = (key.endswith(".weight") and len(shape_t) == 2 and shape_b == shape_t
                      and t.dtype(key).is_floating_point and b.dtype(key).is_floating_point and min(shape_t) > 0)
        kind = kind_of(key) if factorable else "other"
        (plain.append(key) if kind == "other" else factored.append((key, kind)))
    new = [k for k in tuned_keys if k not in base_set]
    if others == "refuse" and (unfit := new + [k for k in plain if k in changed]):
        raise LayoutError(
            f"{len(unfit)} changed tensor(s) are not LoRA factors and would need to be saved whole "
            f"({', '.join(unfit[:3])}{' …' if len(unfit) > 3 else ''}), which this adapter cannot hold: keep them "
            "in a PEFT adapter's modules_to_save, to='peft' (CLI: --to peft), or leave them out, others='report' "
            "(CLI: --others report; the adapter then misses their change)")
    for key in new:
        _keep_whole(key, t, saved, report, others, why="new in the tuned weights")
    for key, kind in factored:
        try:
            if key not in changed:
                report.unchanged += 1
                continue
            release_freed()  # the last module's blocks: glibc keeps them, and each module's peak would add up
            acc_k = acc or (torch.float64 if torch.float64 in (b.dtype(key), t.dtype(key)) else torch.float32)
            m, n = t.shape(key)
            step = max(1, (block_bytes // acc_k.itemsize) // max(1, n))
            delta = _Delta(b, t, key, (m, n), acc_k, step)
            hold = resident_bytes is None or m * n * acc_k.itemsize <= resident_bytes
            acc_name = str(acc_k).removeprefix("torch.")
            label = f"{key}: tuned − base in {acc_name}"
            overflow = (f"both models hold an infinity there, or values near {acc_name}'s largest: extract from good "
                        "checkpoints, or with acc='fp64' (CLI: --acc fp64)")
            if hold:
                delta.whole = delta.fill()
                require_finite({label: delta.whole}, fix=overflow)
            else:
                require_finite(((label, d) for _, d in delta.blocks()), fix=overflow)
            cap = rule.cap
            q = min(m, n) if cap is None else min(cap + oversample, min(m, n))
            randomized = svd == "randomized" or (svd == "auto" and cap is not None and 2 * q < min(m, n))
            if randomized:
                u, s, vh, total = randomized_svd(delta.blocks, (m, n), q, niter=niter, seed=seed, acc=acc_k, device=device)
            else:
                whole = delta.whole if delta.whole is not None else delta.fill()
                whole = whole.to(device) if device is not None else whole
                u, s, vh = torch.linalg.svd(whole, full_matrices=False)
                total = float(s.double().square().sum())
                del whole
            delta.whole = None
            if not len(s) or float(s[0]) == 0.0:  # values that differ only below acc's precision: ΔW is zero
                report.unchanged += 1
                continue
            k = _kept(rule, s, total, (m, n), acc_k)
            module = key[: -len(".weight")]
            if k == 0:
                report.rows.append(_row(module, kind, (m, n), min(m, n), 0, total, total))
                report.left_out.append(key)
                dropped[module] = _nothing_kept(module, rule, s)
                continue
            left, right = _split(u, s, vh, k)  # stored ΔW ≈ left @ right
            del u, vh
            row = _row(module, kind, (m, n), min(m, n), k, *delta.residual(left, right))
            done[key] = (left, right, row)
            _emit(module, kind, left, right, row, dtype or t.dtype(key), out, alphas, report)
            lora_kinds[module] = kind
        finally:  # every weight considered, changed or not, moves the progress bar
            if on_module is not None:
                on_module(key[: -len(".weight")], math.prod(t.shape(key)))
    if on_module is not None:  # the other 2-d tensors, not factored: the bar ends at its total
        for key in [*plain, *new]:
            if len(t.shape(key)) == 2:
                on_module(key.rpartition(".")[0], math.prod(t.shape(key)))
    for alias, source in tied.items():
        if source in done and alias.endswith(".weight"):
            left, right, row = done[source]
            module = alias[: -len(".weight")]
            kind = kinds.get(module, "linear")
            if kind == "other":
                continue
            row = replace(row, module=module, kind=kind)
            _emit(module, kind, left, right, row, dtype or t.dtype(source), out, alphas, report)
            lora_kinds[module] = kind
            report.notes.append(f"{alias} shares {source}'s storage: its module gets the same update")
    if pattern is not None and not any(pattern.search(k[: -len(".weight")]) for k in tuned_keys if k.endswith(".weight")):
        report.warnings.append(f"modules={modules!r} (CLI: --modules) matches no module of the base: nothing was "
                               "factored")
    if report.rows and not lora_kinds:
        raise LoraCkptError(f"sv_epsilon={rule.sv_epsilon:g} keeps no singular value of any module ("
                            + "; ".join(list(dropped.values())[:3]) + "); give a smaller sv_epsilon")
    for key in plain:
        if key not in changed:
            report.unchanged += 1
            continue
        module, _, leaf = key.rpartition(".")
        if leaf == "bias" and lora_kinds.get(module) in ("linear", "conv1d") and b.shape(key) == t.shape(key):
            changed_bias[module] = key
            continue
        why = ("its shape changed from " f"{b.shape(key)} to {t.shape(key)}: resize the base's tensor (e.g. "
               "resize_token_embeddings) before loading the adapter") if b.shape(key) != t.shape(key) else ""
        _keep_whole(key, t, saved, report, others, why=why)
    base_set_keys = set(base_keys)
    lora_bias = bool(changed_bias) and all(
        kind in ("linear", "conv1d") and f"{module}.bias" in base_set_keys for module, kind in lora_kinds.items())
    if changed_bias and not lora_bias:  # PEFT's lora_bias needs every LoRA layer to be a linear one with a bias
        for module, bias_key in changed_bias.items():
            for leaf in ("lora_A.weight", "lora_B.weight"):
                out.pop(f"{_PEFT_PREFIX}{module}.{leaf}", None)
            alphas.pop(module, None)
            lora_kinds.pop(module, None)
            report.rows = [r for r in report.rows if r.module != module]
            for whole_key in (f"{module}.weight", bias_key):
                _keep_whole(whole_key, t, saved, report, others, why="")
        report.notes.append(
            f"{len(changed_bias)} module(s) whose bias changed are saved whole ({', '.join(list(changed_bias)[:3])}"
            f"{' …' if len(changed_bias) > 3 else ''}): PEFT's lora_bias is only for adapters whose LoRA layers are "
            "all linear layers with a bias")
    elif lora_bias:
        for module, kind in lora_kinds.items():
            key = changed_bias.get(module, f"{module}.bias")
            rows = b.shape(key)[0]
            value = t.rows(key, 0, rows).to(torch.float64) - b.rows(key, 0, rows).to(torch.float64)
            a_key = f"{_PEFT_PREFIX}{module}.lora_A.weight"
            out[f"{_PEFT_PREFIX}{module}.lora_B.bias"] = value.to(out[a_key].dtype)
        report.notes.append(f"{len(changed_bias)} bias(es) of factored modules changed: written as lora_B.bias "
                            "(PEFT lora_bias=true)")
    owners = {k.rpartition(".")[0] for k in saved} - {""}  # a top-level key is its own module
    for key in tuned_keys:  # PEFT loads a modules_to_save module whole: every parameter of it, changed or not
        owner, _, leaf = key.rpartition(".")
        if owner in owners and key not in saved:
            _keep_whole(key, t, saved, report, "save", why="")
    for key, value in saved.items():
        out[_PEFT_PREFIX + key] = value
    for module, why in dropped.items():
        if f"{module}.weight" in saved:  # its bias changed: PEFT saves the whole module after all
            report.left_out.remove(f"{module}.weight")
            report.rows = [r for r in report.rows if r.module != module]
            report.notes.append(f"{why}: saved whole (modules_to_save), as its bias changed")
        else:
            report.notes.append(f"{why}: left out, its update is not in the adapter")
    config = _peft_fields(lora_kinds, b, saved, lora_bias)
    fan = [k for k in lora_kinds.values() if k == "conv1d"]
    if fan and len(fan) != sum(k in ("linear", "conv1d") for k in lora_kinds.values()):
        report.notes.append("the factored modules mix Conv1D and nn.Linear layers; PEFT follows each layer's type")
    return LowRankResult(out, alphas, "peft", report, config, fan_in_fan_out=bool(fan))


def _compile(modules: str | None) -> re.Pattern[str] | None:
    if modules is None:
        return None
    try:
        return re.compile(modules)
    except re.error as e:
        raise LoraCkptError(f"modules={modules!r} is not a valid regular expression ({e})") from None


def _shared_ties(base: Mapping[str, torch.Tensor], tuned: Mapping[str, torch.Tensor]) -> dict[str, str]:
    """Keys tied in both state dicts: alias -> the first key of its group (computed once, reused)."""
    groups_b = {frozenset(g) for g in tied_groups(base)}
    return {k: g[0] for g in tied_groups(tuned) if frozenset(g) in groups_b for k in g[1:]}


def _keep_whole(key: str, t: RowReader, saved: dict[str, torch.Tensor], report: LowRankReport,
                others: str, *, why: str) -> None:
    note = f"{key}: {why}" if why else ""
    if others == "save":
        shape = t.shape(key)
        saved[key] = t.rows(key, 0, shape[0]).clone() if shape else t.rows(key, 0, 1).clone()
        report.saved.append(key)
    else:
        report.left_out.append(key)
        note = note or f"{key}: changed, not factored, and others='report' leaves it out: the adapter is not exact"
    if note:
        report.notes.append(note)


def _emit(
    module: str, kind: Kind, left: torch.Tensor, right: torch.Tensor, row: ModuleRow, dtype: torch.dtype,
    out: dict[str, torch.Tensor], alphas: dict[str, float], report: LowRankReport,
) -> None:
    """Write the factors of the stored ``ΔW ≈ left @ right`` under PEFT's keys for the layer ``kind``."""
    k = left.shape[1]
    if kind == "linear":
        a, bb, ka, kb = right, left, "lora_A.weight", "lora_B.weight"
    elif kind == "conv1d":  # stored (in, out): ΔW = (left @ right)ᵀ = rightᵀ @ leftᵀ
        a, bb, ka, kb = left.T, right.T, "lora_A.weight", "lora_B.weight"
    else:  # embedding: stored (vocab, dim) = (B@A)ᵀ with A (r, vocab), B (dim, r)
        a, bb, ka, kb = left.T, right.T, "lora_embedding_A", "lora_embedding_B"
    out[f"{_PEFT_PREFIX}{module}.{ka}"] = a.to("cpu", dtype).contiguous()
    out[f"{_PEFT_PREFIX}{module}.{kb}"] = bb.to("cpu", dtype).contiguous()
    alphas[module] = float(k)
    report.rows.append(row)


def _peft_fields(lora_kinds: Mapping[str, Kind], b: RowReader, saved: Mapping[str, torch.Tensor],
                 lora_bias: bool) -> dict[str, Any]:
    """``target_modules`` selecting exactly the factored modules (PEFT would add LoRA to every module a suffix
    names, and then miss their keys), ``modules_to_save`` and ``lora_bias``."""
    names = sorted(lora_kinds)
    suffixes = sorted({n.rsplit(".", 1)[-1] for n in names})
    candidates = {k[: -len(".weight")] for k in b.keys() if k.endswith(".weight") and len(b.shape(k)) == 2}
    by_suffix = {c for c in candidates if c.rsplit(".", 1)[-1] in suffixes}
    target: str | list[str] = suffixes if by_suffix <= set(names) else "|".join(re.escape(n) for n in names)
    fields: dict[str, Any] = {"target_modules": target, "lora_bias": lora_bias}
    owners = sorted({k.rpartition(".")[0] for k in saved if k.rpartition(".")[0]})
    fields["modules_to_save"] = owners or None
    return fields


# --- resize and combine -----------------------------------------------------------------------------------------


def _canonical(layout: Layout, tensors: Mapping[str, torch.Tensor], m: LoraModule,
               acc: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """(left, right) with ΔW = left @ right in the standard orientation: (out, in) or (vocab, dim)."""
    a, b = tensors[m.a_key], tensors[m.b_key]
    a2, b2 = (a.flatten(1) if a.dim() == 4 else a), (b.flatten(1) if b.dim() == 4 else b)
    return FORMULAS[m.formula][2](a2.to(acc), b2.to(acc))


def _acc(tensors: Iterable[torch.Tensor]) -> torch.dtype:
    """float64 where a factor is float64, float32 otherwise."""
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def _refuse_dora(layout: Layout, what: str) -> None:
    dora = [m.name for m in layout.modules if m.is_dora]
    if dora:
        raise LayoutError(
            f"{', '.join(dora[:3])}: DoRA modules cannot be {what}: the magnitude vector rescales each row by the "
            "norm of W + s·ΔW, which is not a low-rank update; merge the adapter instead (lora-ckpt merge)"
        )


def _scales(layout: Layout, tensors: Mapping[str, torch.Tensor], alpha: float | Mapping[str, float] | None,
            scales: Mapping[str, float] | None) -> dict[str, float]:
    return dict(scales) if scales is not None else resolve_scales(layout, alpha, tensors)


def _write_module(
    spec: LayoutSpec, m: LoraModule, left: torch.Tensor, right: torch.Tensor, dtype: torch.dtype, conv: bool,
    out: dict[str, torch.Tensor], alphas: dict[str, float],
) -> None:
    a, b = formula_factors(m.formula, left, right)
    if conv:
        a, b = a[:, :, None, None], b[:, :, None, None]
    out[m.a_key] = a.to(dtype)
    out[m.b_key] = b.to(dtype)
    alphas[m.name] = float(left.shape[1])
    if spec is KOHYA:
        alpha_key = m.key_map.get("alpha") or spec.key(m.name, "alpha")
        out[alpha_key] = torch.tensor(float(left.shape[1]))


def resize_lora(
    state_dict: Mapping[str, torch.Tensor],
    *,
    rank: int | None = None,
    energy: float | None = None,
    sv_epsilon: float | None = None,
    sv_ratio: float | None = None,
    alpha: float | Mapping[str, float] | None = None,
    scales: Mapping[str, float] | None = None,
    layout: Layout | str | None = None,
    acc: DType | None = None,
    name: str = "the adapter",
) -> LowRankResult:
    """Return the adapter at a smaller rank, in its own layout: per module the best rank-k approximation
    (Eckart–Young) of the scaled update ``s·B@A``, by :func:`factor_svd` (``B@A`` is never formed).

    Exact (to round-off) where the rank kept is at least the module's rank. Every module comes out with scale 1
    (``alpha = new rank``), so ``result.alpha`` is what the file must record. Other tensors (base weights,
    ``modules_to_save``) are carried; a ``lora_B.bias`` is multiplied by the old scale. A module of which
    ``sv_epsilon`` keeps nothing is left out (its keys in ``report.left_out``; for PEFT keys its name in
    ``result.config["exclude_modules"]``), or refused where the state dict stores its base weight beside the
    factors (see the module docstring). ``name``: how messages name the adapter (its file).

    Raises:
        LayoutError: not a LoRA layout, or DoRA modules (refused: see the module docstring).
        AlphaError: the alpha is unknown (pass ``alpha`` or ``scales``).
        ShapeError: a NaN or an infinity in the adapter.
        LoraCkptError: a rule that keeps nothing of a module that cannot be left out, or of every module.

    Example:
        >>> from lora_ckpt.testing import make_lora_state_dict
        >>> small = resize_lora(make_lora_state_dict(rank=4), rank=2, alpha=8.0)
        >>> small.layout, [r.rank for r in small.report.rows], small.alpha["transformer.h.0.attn.c_attn"]
        ('nanogpt_lora', [2, 2], 2.0)
    """
    rule = RankRule(rank, energy, sv_epsilon, sv_ratio)
    if not isinstance(layout, Layout):
        layout = detect_layout(state_dict, layout=layout)
    if not layout.is_lora or layout.spec is None:
        raise LayoutError(f"{name} is in the standard layout: there is no LoRA update to resize (resize takes an "
                          "adapter)")
    require_data(state_dict)
    _refuse_dora(layout, "resized")
    require_finite({f"{k} in {name}": v for k, v in state_dict.items()}, fix=_BROKEN_ADAPTER)
    tensors = {k[len(layout.prefix):]: v for k, v in state_dict.items()}
    check_factors(layout, tensors)  # floating point, as a merge requires
    scale = _scales(layout, tensors, alpha, scales)
    acc = _acc_dtype(acc) or _acc(tensors[k] for m in layout.modules if m.has_factors for k in (m.a_key, m.b_key))
    report = LowRankReport("resize", rule=rule)
    out = dict(tensors)
    alphas: dict[str, float] = {}
    dropped = _Dropped(layout, rule)
    for m in layout.modules:
        if not m.has_factors:
            continue
        left, right = _canonical(layout, tensors, m, acc)
        exact_left, exact_right = _canonical(layout, tensors, m, torch.float64)  # the target, in float64
        total = _require_fits(m.name, exact_left * scale[m.name], exact_right, acc)
        u, s, vh = factor_svd(left * scale[m.name], right)
        k = _kept(rule, s, float(s.double().square().sum()), m.delta_shape, acc)
        nl, nr = _split(u, s, vh, k)
        report.rows.append(_row(m.name, m.kind, m.delta_shape, m.rank, k,
                                *_factor_residual(exact_left * scale[m.name], exact_right, nl, nr, total)))
        if k == 0:
            dropped.add(m, s, out)
            continue
        _write_module(layout.spec, m, nl, nr, tensors[m.a_key].dtype, tensors[m.a_key].dim() == 4, out, alphas)
        if "b_bias" in m.key_map:
            out[m.key_map["b_bias"]] = tensors[m.key_map["b_bias"]] * scale[m.name]
    config = dropped.settle(report, kept=bool(alphas))
    return LowRankResult({layout.prefix + k: v for k, v in out.items()}, alphas, layout.kind, report, config)


class _Dropped:
    """The modules of an adapter a rule keeps nothing of: taken out of ``out`` where the layout allows it."""

    def __init__(self, layout: Layout, rule: RankRule | None) -> None:
        self.layout, self.rule = layout, rule
        self.modules: list[tuple[LoraModule, str]] = []  # (module, why)
        self.refused: list[str] = []

    def add(self, m: LoraModule, s: torch.Tensor, out: dict[str, torch.Tensor]) -> None:
        assert self.rule is not None
        why = _nothing_kept(m.name, self.rule, s)
        if m.has_base:  # its weight sits beside its factors: the module cannot lose them
            self.refused.append(why)
            return
        for key in m.factor_keys:
            out.pop(key, None)
        self.modules.append((m, why))

    def settle(self, report: LowRankReport, *, kept: bool) -> dict[str, Any]:
        """Raise for modules that cannot be left out or if nothing is kept; report the rest; the PEFT config."""
        if self.refused:
            raise LoraCkptError(
                "; ".join(self.refused[:3]) + f"{' …' if len(self.refused) > 3 else ''}: a {self.layout.kind} state "
                "dict stores each module's weight beside its factors and cannot leave a module out; give a smaller "
                "sv_epsilon")
        if self.modules and not kept:
            raise LoraCkptError(f"sv_epsilon={self.rule.sv_epsilon:g} keeps no singular value of any module ("  # type: ignore[union-attr]
                                + "; ".join(why for _, why in self.modules[:3]) + "); give a smaller sv_epsilon")
        for m, why in self.modules:
            report.left_out.extend(self.layout.prefix + k for k in m.factor_keys)
            report.notes.append(f"{why}: left out, its update is not in the adapter")
        names = sorted(m.name for m, _ in self.modules)
        return {"exclude_modules": names} if names and self.layout.spec is PEFT else {}


def combine_lora(
    state_dicts: Sequence[Mapping[str, torch.Tensor]],
    *,
    weights: Sequence[float] | None = None,
    rank: int | None = None,
    energy: float | None = None,
    sv_epsilon: float | None = None,
    sv_ratio: float | None = None,
    alphas: Sequence[float | Mapping[str, float] | None] | None = None,
    scales: Sequence[Mapping[str, float] | None] | None = None,
    layouts: Sequence[Layout | str | None] | None = None,
    acc: DType | None = None,
    names: Sequence[str] | None = None,
) -> LowRankResult:
    """Return one adapter whose update is ``Σᵢ wᵢ·sᵢ·ΔWᵢ``, in the first input's layout.

    With no rank rule the ranks are concatenated (``B = [w₁s₁B₁ | w₂s₂B₂ …]``, ``A = [A₁; A₂ …]``): exact,
    whatever the inputs' ranks, alphas or rsLoRA scales (folded in), and weights may be negative. With
    ``rank``/``energy``/… the sum is compressed by :func:`factor_svd` to the best approximation of that rank.
    A module present in only some inputs takes only theirs. Other tensors (base weights, ``modules_to_save``)
    must be equal wherever more than one input holds them. A module of which ``sv_epsilon`` keeps nothing is
    left out as in :func:`resize_lora`. ``names``: how messages name the adapters (default ``adapter 1``, …).

    Raises:
        LayoutError: inputs in different layouts, DoRA modules, fewer than one input, or weights of the wrong length.
        ShapeError: a module whose update shape or kind differs between inputs; a NaN or an infinity in an adapter.
        KeyMismatchError: another tensor that two inputs hold with different values.
        LoraCkptError: a rule that keeps nothing of a module that cannot be left out, or of every module.

    Example:
        >>> from lora_ckpt.testing import make_lora_state_dict
        >>> a = make_lora_state_dict(rank=4)
        >>> b = {k: (2 * v if ".lora_" in k else v) for k, v in a.items()}  # same base, another update
        >>> both = combine_lora([a, b], weights=[1.0, -0.5], alphas=[8.0, 4.0])
        >>> both.alpha["transformer.h.0.attn.c_attn"], both.report.rows[0].rank_in
        (8.0, 8)
    """
    n = len(state_dicts)
    if n < 1:
        raise LayoutError("combine needs at least one adapter")
    weights = list(weights) if weights is not None else [1.0] * n
    for name, seq in (("weights", weights), ("alphas", alphas), ("scales", scales), ("layouts", layouts),
                      ("names", names)):
        if seq is not None and len(seq) != n:
            raise LayoutError(f"{name} has {len(seq)} entries for {n} adapters; give one per adapter")
    for i, w in enumerate(weights):
        check_alpha(w, where=f"weights[{i}]", fix="give finite weights (CLI: --weights W1 W2 …)")
    rule = None if rank is None and energy is None and sv_epsilon is None and sv_ratio is None else \
        RankRule(rank, energy, sv_epsilon, sv_ratio)
    label = list(names) if names is not None else [f"adapter {i + 1}" for i in range(n)]
    found: list[Layout] = []
    for i, sd in enumerate(state_dicts):
        given = layouts[i] if layouts is not None else None
        lay = given if isinstance(given, Layout) else detect_layout(sd, layout=given)
        if not lay.is_lora or lay.spec is None:
            raise LayoutError(f"{label[i]} is in the standard layout: it holds no LoRA update to combine")
        require_data(sd)
        _refuse_dora(lay, "combined")
        found.append(lay)
    require_finite(((f"{k} in {label[i]}", v) for i, sd in enumerate(state_dicts) for k, v in sd.items()),
                   fix=_BROKEN_ADAPTER)
    for lay, sd in zip(found, state_dicts):
        check_factors(lay, {k[len(lay.prefix):]: v for k, v in sd.items()})  # floating point, as a merge requires
    kinds = {lay.kind for lay in found}
    if len(kinds) > 1:
        raise LayoutError(f"the adapters are in different layouts ({', '.join(lay.kind for lay in found)}); convert "
                          "them to one layout first (lora-ckpt convert --to …)")
    spec = found[0].spec
    assert spec is not None
    plain = [{k[len(lay.prefix):]: v for k, v in sd.items()} for sd, lay in zip(state_dicts, found)]
    scale = []
    for i, (lay, t) in enumerate(zip(found, plain)):
        try:
            scale.append(_scales(lay, t, alphas[i] if alphas is not None else None,
                                 scales[i] if scales is not None else None))
        except AlphaError as e:
            raise AlphaError(f"{label[i]}: {str(e).split('; pass ')[0]}; pass alphas=[…] with one alpha per adapter "
                             "(CLI: --alpha A, the same for each)") from None
    parts: dict[str, list[tuple[int, LoraModule]]] = {}
    for i, lay in enumerate(found):
        for m in lay.modules:
            if m.has_factors:
                parts.setdefault(m.name, []).append((i, m))
    problems = []
    for name, items in parts.items():
        shapes = {(m.kind, m.delta_shape) for _, m in items}
        if len(shapes) > 1:
            problems.append(f"{name}: " + ", ".join(f"{label[i]} {m.kind} {m.delta_shape}" for i, m in items))
    if problems:
        raise ShapeError("the adapters disagree on modules: " + "; ".join(problems[:4])
                         + "; combine adapters of one base model")
    factor_keys = {k for lay in found for m in lay.modules if m.has_factors for k in m.factor_keys}
    rest: dict[str, torch.Tensor] = {}
    clash = []
    for i, t in enumerate(plain):
        for k, v in t.items():
            if k in factor_keys:
                continue
            if k in rest and (rest[k].shape != v.shape or not torch.equal(rest[k], v)):
                clash.append(f"{k} ({label[i]})")
            rest.setdefault(k, v)
    if clash:
        raise KeyMismatchError(
            f"{', '.join(clash[:4])} differs from an earlier adapter's; combine sums LoRA updates and cannot combine "
            "base weights or whole tensors (modules_to_save) that differ: extract the adapters without them, "
            "others='report' (CLI: extract --others report), or combine adapters of one base")
    # Tensors an adapter replaces whole (modules_to_save): base + Σ wᵢ(T − base) over the adapters holding T is T
    # itself only where their weights sum to 1; any other sum needs the base, which combine does not have.
    whole = sorted(rest) if not spec.base_in_file else []
    holders = {k: [i for i, t in enumerate(plain) if k in t] for k in whole}
    unweighable = [k for k in whole if not math.isclose(sum(weights[i] for i in holders[k]), 1.0, abs_tol=1e-12)]
    if unweighable:
        k = unweighable[0]
        raise LayoutError(
            f"{', '.join(unweighable[:3])}{' …' if len(unweighable) > 3 else ''}: saved whole (modules_to_save), so "
            f"it replaces the base's value, and the weights of the adapters holding it sum to "
            f"{sum(weights[i] for i in holders[k]):g}, not 1; the weighted value needs the base: extract the adapters "
            "without such tensors, others='report' (CLI: extract --others report), or weight them to sum to 1")
    shared = [k for k in whole if len(holders[k]) > 1]
    acc = _acc_dtype(acc) or _acc(t[k] for lay, t in zip(found, plain) for m in lay.modules if m.has_factors
                                  for k in (m.a_key, m.b_key))
    report = LowRankReport("combine", rule=rule)
    if shared:
        report.notes.append(f"{', '.join(shared[:3])}{' …' if len(shared) > 3 else ''}: whole tensors "
                            "(modules_to_save) equal in several adapters are kept once: their weights sum to 1")
    out = dict(rest)
    new_alpha: dict[str, float] = {}
    dropped = _Dropped(found[0], rule)
    for name, items in parts.items():
        lefts, rights, exact_lefts, exact_rights = [], [], [], []
        for i, m in items:
            left, right = _canonical(found[i], plain[i], m, acc)
            c = weights[i] * scale[i][m.name]
            root = math.sqrt(abs(c))
            lefts.append(left * (root if c >= 0 else -root))
            rights.append(right * root)
            exact_left, exact_right = _canonical(found[i], plain[i], m, torch.float64)
            exact_lefts.append(exact_left * c)  # the target Σ cᵢ·leftᵢ@rightᵢ, in float64
            exact_rights.append(exact_right)
        left, right = torch.cat(lefts, 1), torch.cat(rights, 0)
        exact = torch.cat(exact_lefts, 1), torch.cat(exact_rights, 0)
        i0, m0 = items[0]
        r_in = left.shape[1]
        total = _require_fits(name, *exact, acc)
        if rule is None:  # exact: the concatenated factors as they are
            nl, nr = left, right
        else:
            u, s, vh = factor_svd(left, right)
            nl, nr = _split(u, s, vh, _kept(rule, s, float(s.double().square().sum()), m0.delta_shape, acc))
        terms = sum(float(torch.linalg.vector_norm(a) * torch.linalg.vector_norm(b))  # Σ ‖cᵢ·leftᵢ‖·‖rightᵢ‖
                    for a, b in zip(exact_lefts, exact_rights))
        if math.sqrt(total) <= 1e-12 * terms:  # the updates cancel: no relative error to speak of
            row = ModuleRow(name, m0.kind, m0.delta_shape, r_in, nl.shape[1], 1.0, 0.0)
            report.notes.append(f"{name}: the weighted updates cancel (the sum is below 1e-12 of its terms): a zero "
                                "update, to round-off")
        else:
            row = _row(name, m0.kind, m0.delta_shape, r_in, nl.shape[1], *_factor_residual(*exact, nl, nr, total))
        report.rows.append(row)
        if not nl.shape[1]:
            dropped.add(m0, s, out)
            continue
        dtype = plain[i0][m0.a_key].dtype
        _write_module(spec, m0, nl, nr, dtype, plain[i0][m0.a_key].dim() == 4, out, new_alpha)
        biases = [(weights[i] * scale[i][m.name], plain[i][m.key_map["b_bias"]]) for i, m in items if "b_bias" in m.key_map]
        if biases:
            out[m0.key_map.get("b_bias") or spec.key(name, "b_bias")] = sum(c * v.to(acc) for c, v in biases).to(dtype)  # type: ignore[union-attr]
    config = dropped.settle(report, kept=bool(new_alpha))
    prefix = found[0].prefix
    return LowRankResult({prefix + k: v for k, v in out.items()}, new_alpha, found[0].kind, report, config)


# --- unmerge ------------------------------------------------------------------------------------------------------


def unmerge_lora(
    merged: Mapping[str, torch.Tensor],
    adapter: Mapping[str, torch.Tensor],
    *,
    alpha: float | Mapping[str, float] | None = None,
    scales: Mapping[str, float] | None = None,
    layout: Layout | str | None = None,
    fan_in_fan_out: Orientation = None,
    base: Mapping[str, torch.Tensor] | None = None,
    dtype: DType | None = None,
    names: tuple[str, str] = ("the merged weights", "the adapter"),
) -> LowRankResult:
    """Return the merged weights with the adapter's update taken out: ``W − s·ΔW`` accumulated in float32 (float64
    for float64 weights) and rounded once, as a standard state dict; ``merged`` is not changed.

    It is the merge with every scale negated (:func:`~lora_ckpt.merge.plan_merge`), so the same checks run first:
    a factor that does not fit its weight is refused before any arithmetic. ``unmerge(merge(W)) == W`` within one
    rounding of the weights' dtype. Tensors an adapter replaces whole (PEFT ``modules_to_save``) cannot be
    restored: they stay as merged and are named in ``report.left_out``. With ``base`` (the original weights, when
    known) each row reports the largest ``|W − W_base|``. ``dtype``: the output's floating-point dtype (a
    ``torch.dtype`` or a name such as ``"bf16"``); ``names``: how messages name the merged weights and the adapter.

    Raises:
        LayoutError: DoRA modules, or an adapter that is not a LoRA layout.
        ShapeError, KeyMismatchError: factors that do not fit the merged weights, modules the weights lack; a NaN or
            an infinity in the adapter or in a merged weight it changes.
        AlphaError: the alpha is unknown.

    Example:
        >>> from lora_ckpt import merge_lora
        >>> from lora_ckpt.testing import make_lora_state_dict
        >>> lora = make_lora_state_dict(rank=4)
        >>> merged = merge_lora(lora, alpha=8.0)
        >>> w = lora["transformer.h.0.attn.c_attn.main_weight.weight"]
        >>> back = unmerge_lora(merged, lora, alpha=8.0)
        >>> torch.allclose(back.state_dict["transformer.h.0.attn.c_attn.weight"], w, atol=1e-6)
        True
    """
    if not isinstance(layout, Layout):
        layout = detect_layout(adapter, layout=layout)
    if not layout.is_lora or layout.spec is None:
        raise LayoutError(f"{names[1]} is in the standard layout: it holds no LoRA update to take out (the "
                          "arguments are the merged weights, then the adapter)")
    _refuse_dora(layout, "unmerged")
    require_data(merged, adapter)
    require_finite({f"{k} in {names[1]}": v for k, v in adapter.items()}, fix=_BROKEN_ADAPTER)
    tensors = {k[len(layout.prefix):]: v for k, v in adapter.items()}
    scale = _scales(layout, tensors, alpha, scales)
    report = LowRankReport("unmerge")
    spec = layout.spec
    if spec.base_in_file:  # keep only the factors, re-keyed as a PEFT adapter (the file's own base is not used)
        adapter_only: dict[str, torch.Tensor] = {}
        scale_by: dict[str, float] = {}
        for m in layout.modules:
            if not m.has_factors:
                continue
            if m.kind == "lora_only_embedding":
                raise LayoutError(f"{m.name}: a lora-only embedding has no base weight to take its update out of")
            left, right = _canonical(layout, tensors, m, tensors[m.a_key].dtype)
            kind = "embedding" if m.kind == "embedding" else "linear"
            a, b = formula_factors(PEFT.formulas[kind], left, right)
            adapter_only[PEFT.key(m.name, "a", kind)] = a
            adapter_only[PEFT.key(m.name, "b", kind)] = b
            scale_by[m.name] = scale[m.name]
        tensors, scale = adapter_only, scale_by
        layout = detect_layout(tensors, layout=PEFT.name)
    negated = {k: -v for k, v in scale.items()}
    saved = [k for k in tensors if k not in layout.factor_keys]
    factors = {k: v for k, v in tensors.items() if k in layout.factor_keys}
    if saved:
        layout = detect_layout(factors, layout=spec.name)
    plan = plan_merge(factors, base=merged, scales=negated, layout=layout, dtype=dtype, fan_in_fan_out=fan_in_fan_out)
    touched = [s for s in plan.steps if s.op in ("merge", "bias") and s.source is not None and not s.from_adapter]
    require_finite({f"{s.source} in {names[0]}": plan.big[s.source] for s in touched},  # type: ignore[index]
                   fix="the merged weights are broken (a diverged run?): unmerge from a good checkpoint")
    result = plan.execute(plan.big)
    _restore_whole([k.removeprefix(spec.key_prefix) for k in saved], result, base, report)
    for step in plan.steps:
        if step.op != "merge" or step.module is None:
            continue
        m = step.module
        err = None
        if base is not None and step.key in base:
            before = plan.source(step, plan.big)
            assert before is not None
            err, rel = _base_error(result[step.key], base[step.key], before, m.rank)
            if rel is not None:
                report.warnings.append(
                    f"{m.name}: the result differs from the base by up to {err:.3g}, {rel:.2g} of the update taken "
                    f"out (more than a merge's and an unmerge's roundings): {names[0]} is not the base plus this "
                    f"update; is {names[1]} the adapter merged into it, with its alpha (an adapter that only "
                    "approximates the change, such as an extracted one, leaves its own error)?")
        report.rows.append(ModuleRow(m.name, m.kind, tuple(result[step.key].shape), m.rank, m.rank, 1.0, 0.0, err))
    return LowRankResult(result, {}, "standard", report)


def _restore_whole(keys: Sequence[str], result: dict[str, torch.Tensor], base: Mapping[str, torch.Tensor] | None,
                   report: LowRankReport) -> None:
    """The tensors an adapter replaced whole (PEFT ``modules_to_save``): taken from ``base`` where it holds them,
    else left as merged and named in ``report.left_out``."""
    kept = []
    for key in keys:
        if base is not None and key in base and key in result and base[key].shape == result[key].shape:
            result[key] = base[key].to(result[key].dtype, copy=True)
        else:
            kept.append(key)
    if len(kept) < len(keys):
        report.notes.append(f"{len(keys) - len(kept)} tensor(s) the adapter replaced whole are the base's again "
                            "(from base)")
    if kept:
        report.left_out.extend(kept)
        report.notes.append(f"{len(kept)} tensor(s) the adapter replaced whole cannot be restored without the base; "
                            "they stay as merged: " + ", ".join(kept[:4]) + (" …" if len(kept) > 4 else ""))


def _ulp(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The spacing of ``dtype``'s values at each ``|x|`` (float64; the smallest subnormal's at zero)."""
    info = torch.finfo(dtype)
    _, exponent = torch.frexp(x.double())
    spacing = torch.ldexp(torch.full(x.shape, info.eps, dtype=torch.float64), exponent - 1)  # |x| < 2^e
    return spacing.clamp_min(info.smallest_normal * info.eps)


_FAR_FROM_BASE = 1e-3  # ‖result − base‖ / ‖update‖ above which an unmerge that also exceeds rounding is doubtful


def _base_error(result: torch.Tensor, base: torch.Tensor, merged: torch.Tensor, rank: int) -> tuple[float, float | None]:
    """``(max |result − base|, None)``, or with ``‖result − base‖_F / ‖merged − result‖_F`` in place of None where
    the result is not the base: some element beyond what rounding allows (half a unit in the last place of the
    merged and of the unmerged value, both doubled, plus ``2·r·ε`` of the largest update for a merge computed in the
    weights' own dtype, as PEFT's) and more than :data:`_FAR_FROM_BASE` of the update left.

    In float64 a cache-sized block of rows at a time (a whole float64 copy of an embedding, several times over,
    would be gigabytes): one pass for the norms and maxima, a second for the rounding check only where the
    relative error already exceeds :data:`_FAR_FROM_BASE`."""
    if not result.numel():
        return 0.0, None
    flat = [t.reshape(t.shape[0], -1) if t.dim() else t.reshape(1, 1) for t in (result, base, merged)]
    step = max(1, _RESIDUAL_BLOCK_BYTES // (8 * flat[0].shape[1]))

    def blocks() -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:  # (result, |err|, merged) in float64
        for start in range(0, flat[0].shape[0], step):
            r, b, mg = (t[start : start + step].double() for t in flat)
            yield r, (r - b).abs(), mg

    worst = largest = err_sq = update_sq = 0.0
    for r, err, mg in blocks():
        update = (mg - r).abs()
        worst, largest = max(worst, float(err.max())), max(largest, float(update.max()))
        err_sq, update_sq = err_sq + float(err.square().sum()), update_sq + float(update.square().sum())
    rel = math.sqrt(err_sq) / max(math.sqrt(update_sq), 1e-300)
    if rel <= _FAR_FROM_BASE:
        return worst, None
    slack = 2 * max(rank, 1) * max(torch.finfo(merged.dtype).eps, torch.finfo(result.dtype).eps) * largest
    beyond = any(bool((err > _ulp(mg, merged.dtype) + _ulp(r, result.dtype) + slack).any()) for r, err, mg in blocks())
    return worst, rel if beyond else None
