"""Extract, resize, combine and unmerge: numbers on real modules, definitions on known spectra, every error path."""

from __future__ import annotations

import json
import math
import re
import warnings

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import assert_unchanged, snapshot
from lora_ckpt import lowrank, merge_lora
from lora_ckpt.cli import main
from lora_ckpt.errors import AlphaError, KeyMismatchError, LayoutError, LoraCkptError, ShapeError
from lora_ckpt.formats.peft import load_peft_adapter
from lora_ckpt.lowrank import (
    RankRule,
    combine_lora,
    extract_lora,
    factor_svd,
    randomized_svd,
    resize_lora,
    unmerge_lora,
)
from lora_ckpt.lowrank_files import combine_files, extract_files, resize_files, unmerge_files
from lora_ckpt.testing import make_lora_state_dict

F64 = torch.float64


def _low_rank(m: int, n: int, r: int, seed: int, dtype=torch.float32, scale: float = 0.05) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return scale * torch.randn(m, r, generator=g, dtype=F64) @ torch.randn(r, n, generator=g, dtype=F64)


def _spectrum(s: list[float], m: int = 12, n: int = 10, seed: int = 0) -> torch.Tensor:
    """A matrix with exactly the singular values ``s``."""
    g = torch.Generator().manual_seed(seed)
    u = torch.linalg.qr(torch.randn(m, len(s), generator=g, dtype=F64)).Q
    v = torch.linalg.qr(torch.randn(n, len(s), generator=g, dtype=F64)).Q
    return u @ torch.diag(torch.tensor(s, dtype=F64)) @ v.T


def _product(sd: dict[str, torch.Tensor], module: str, kind: str) -> torch.Tensor:
    """The stored-orientation update of an extracted PEFT module (scale 1)."""
    p = f"base_model.model.{module}."
    if kind == "embedding":
        return (sd[p + "lora_embedding_B"].to(F64) @ sd[p + "lora_embedding_A"].to(F64)).T
    ba = sd[p + "lora_B.weight"].to(F64) @ sd[p + "lora_A.weight"].to(F64)
    return ba.T if kind == "conv1d" else ba


# --- rank selection on known spectra ---------------------------------------------------------------------------------

SPECTRUM = [5.0, 3.0, 2.0, 1.0, 0.5, 0.1]  # σ² = 25, 9, 4, 1, 0.25, 0.01 of 39.26


@pytest.mark.parametrize(("rule", "expected"), [
    (dict(energy=0.5), 1),  # 25/39.26 = 0.637 ≥ 0.5
    (dict(energy=0.6367), 1),  # 25/39.26 = 0.63678
    (dict(energy=0.8), 2),  # 34/39.26 = 0.866
    (dict(energy=0.99), 4),  # 38/39.26 = 0.968, 39/39.26 = 0.9934
    (dict(energy=1.0), 6),
    (dict(sv_epsilon=1.5), 3),  # σ > 1.5 (absolute), as mergekit's --sv-epsilon
    (dict(sv_epsilon=0.05), 6),
    (dict(sv_ratio=0.25), 3),  # σ ≥ 1.25
    (dict(sv_ratio=1.0), 1),  # σ ≥ σ₁
    (dict(rank=2, energy=0.99), 2),  # the smallest wins
    (dict(rank=5, sv_epsilon=0.3), 5),
])
def test_rank_rules_match_their_definitions(rule, expected):
    delta = _spectrum(SPECTRUM)
    out = extract_lora({"w.weight": torch.zeros_like(delta)}, {"w.weight": delta}, svd="full", **rule)
    (row,) = out.report.rows
    assert row.rank == expected
    kept = sum(x * x for x in SPECTRUM[:expected]) / sum(x * x for x in SPECTRUM)
    assert row.energy == pytest.approx(kept, rel=1e-9)
    assert row.rel_error == pytest.approx(math.sqrt(1 - kept), abs=1e-7)
    torch.testing.assert_close(_product(out.state_dict, "w", "linear"),
                               _spectrum(SPECTRUM[:expected] + [0.0] * (6 - expected)), rtol=0, atol=1e-12)


def test_energy_rule_agrees_with_peft_conversion():
    conversion = pytest.importorskip("peft.tuners.lora.conversion")
    s = torch.tensor(SPECTRUM, dtype=F64)
    for e in (0.3, 0.637, 0.8, 0.9, 0.95, 0.99, 0.999):
        assert RankRule(energy=e).select(s, float(s.square().sum())) == conversion._find_cutoff_index(s, e)


def test_rank_rule_errors():
    with pytest.raises(LoraCkptError, match=r"say how to choose the rank: rank=R \(CLI: --rank R\)"):
        RankRule()
    with pytest.raises(LoraCkptError, match=r"energy is 1.5, not in \(0, 1\]"):
        RankRule(energy=1.5)
    with pytest.raises(LoraCkptError, match=r"sv_epsilon is -1, a negative singular-value cutoff"):
        RankRule(sv_epsilon=-1)
    with pytest.raises(LoraCkptError, match=r"rank is 0, not a positive integer rank"):
        RankRule(rank=0)


# --- extraction in memory ------------------------------------------------------------------------------------------


def test_extract_exact_for_low_rank_update_and_inputs_unchanged():
    g = torch.Generator().manual_seed(0)
    base = {"a.weight": torch.randn(40, 30, generator=g), "a.bias": torch.randn(40, generator=g),
            "norm.weight": torch.ones(30), "same.weight": torch.randn(8, 8, generator=g)}
    tuned = {**base, "a.weight": base["a.weight"] + _low_rank(40, 30, 3, 1).float(), "norm.weight": torch.ones(30) * 1.5}
    before_b, before_t = snapshot(base), snapshot(tuned)
    out = extract_lora(base, tuned, rank=16)
    assert_unchanged(before_b, base)
    assert_unchanged(before_t, tuned)
    assert out.alpha == {"a": 3.0}  # the noise floor drops the zero singular values
    torch.testing.assert_close(_product(out.state_dict, "a", "linear"), (tuned["a.weight"] - base["a.weight"]).double(),
                               rtol=0, atol=1e-5)
    assert out.report.saved == ["norm.weight"] and "base_model.model.norm.weight" in out.state_dict
    assert out.report.unchanged == 2  # a.bias and same.weight are not saved
    assert out.config["modules_to_save"] == ["norm"]


def test_randomized_matches_full_and_reports_its_true_error():
    g = torch.Generator().manual_seed(3)
    delta = torch.randn(120, 80, generator=g, dtype=F64)
    base, tuned = {"w.weight": torch.zeros_like(delta)}, {"w.weight": delta}
    full = extract_lora(base, tuned, rank=8, svd="full")
    fast = extract_lora(base, tuned, rank=8, svd="randomized", niter=4)
    actual = float(torch.linalg.matrix_norm(delta - _product(fast.state_dict, "w", "linear")) / torch.linalg.matrix_norm(delta))
    assert fast.report.rows[0].rel_error == pytest.approx(actual, rel=1e-9)  # measured, not an estimate
    assert full.report.rows[0].rel_error <= actual <= 1.05 * full.report.rows[0].rel_error


def test_streamed_row_blocks_equal_the_whole_tensor():
    g = torch.Generator().manual_seed(5)
    base = {"w.weight": torch.randn(64, 48, generator=g)}
    tuned = {"w.weight": base["w.weight"] + torch.randn(64, 48, generator=g) * 0.01}
    whole = extract_lora(base, tuned, rank=6, svd="randomized")
    blocks = extract_lora(base, tuned, rank=6, svd="randomized", resident_bytes=0, block_bytes=7 * 48 * 4)
    torch.testing.assert_close(_product(blocks.state_dict, "w", "linear"), _product(whole.state_dict, "w", "linear"),
                               rtol=0, atol=1e-6)
    assert blocks.report.rows[0].rel_error == pytest.approx(whole.report.rows[0].rel_error, rel=1e-4)


def test_delta_held_whole_is_the_same_read_in_small_blocks(monkeypatch):
    """ΔW held whole is filled a few rows at a time, in place: the same bits as one subtraction of the whole."""
    g = torch.Generator().manual_seed(6)
    base = {"w.weight": torch.randn(64, 48, generator=g).bfloat16()}
    tuned = {"w.weight": (base["w.weight"].float() + 0.01 * torch.randn(64, 48, generator=g)).bfloat16()}
    one = extract_lora(base, tuned, rank=6, svd="full")
    monkeypatch.setattr(lowrank, "_FILL_BLOCK_BYTES", 5 * 48 * 2)  # 13 blocks, the last one short
    many = extract_lora(base, tuned, rank=6, svd="full")
    for key, value in one.state_dict.items():
        assert torch.equal(many.state_dict[key], value), key
    assert many.report.rows == one.report.rows


@pytest.mark.parametrize(("svd", "resident"), [("randomized", None), ("randomized", 0), ("full", None), ("full", 0)])
def test_float64_weights_with_a_float32_accumulator_subtract_first(svd, resident):
    """Regression (hostile review): float64 weights with acc='fp32' were each rounded to float32 before the
    subtraction, so an update 1e-9 of the weights became rounding noise (relative error 6.8, exit 0). The
    difference is taken in float64 and rounded once; a zero difference still counts as unchanged."""
    g = torch.Generator().manual_seed(7)
    w = torch.randn(40, 30, generator=g, dtype=torch.float64)
    delta = 1e-9 * torch.randn(40, 2, generator=g, dtype=torch.float64) @ torch.randn(2, 30, generator=g,
                                                                                         dtype=torch.float64)
    base, tuned = {"w.weight": w, "v.weight": w}, {"w.weight": w + delta, "v.weight": w.clone()}
    out = extract_lora(base, tuned, rank=4, svd=svd, acc="fp32", resident_bytes=resident, block_bytes=7 * 30 * 8)
    (row,) = out.report.rows
    assert row.module == "w" and row.rank == 2 and row.rel_error < 1e-5 and out.report.unchanged == 1
    product = _product(out.state_dict, "w", "linear").double()
    exact = (tuned["w.weight"] - base["w.weight"])
    assert float(torch.linalg.matrix_norm(product - exact) / torch.linalg.matrix_norm(exact)) < 1e-5


def _exact_rank_pair(m: int, n: int, r: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """float32 ``base``, ``tuned`` and their float64 difference, exactly of rank ``r``: dyadic values (multiples
    of 2⁻⁸ below 2⁴), so the product and the sums are exact in float32."""
    g = torch.Generator().manual_seed(seed)
    base = torch.randint(-512, 513, (m, n), generator=g).float() / 256
    delta = (torch.randint(-8, 9, (m, r), generator=g).double() / 16) @ (torch.randint(-8, 9, (r, n), generator=g).double() / 16)
    tuned = (base.double() + delta).float()
    assert torch.equal(tuned.double() - base.double(), delta) and int(torch.linalg.matrix_rank(delta)) == r
    return base, tuned, delta


@pytest.mark.parametrize("update", ["rank4", "full_rank"])
@pytest.mark.parametrize(("svd", "resident"), [("auto", None), ("auto", 0), ("full", None), ("full", 0)])
def test_reported_error_is_the_measured_one(update, svd, resident):
    """Regression: the randomized path reported √(Σσ² − Σkept σ²), float32 noise (0 or 2e-4 against a true 4e-7)."""
    if update == "rank4":
        base, tuned, delta = _exact_rank_pair(128, 64, 4, 0)
    else:
        g = torch.Generator().manual_seed(1)
        base = torch.randn(128, 64, generator=g)
        tuned = base + 0.01 * torch.randn(128, 64, generator=g)
        delta = tuned.double() - base.double()
    out = extract_lora({"w.weight": base}, {"w.weight": tuned}, rank=8, svd=svd, resident_bytes=resident,
                       block_bytes=20 * 64 * 4)
    (row,) = out.report.rows
    measured = float(torch.linalg.matrix_norm(delta - _product(out.state_dict, "w", "linear"))
                     / torch.linalg.matrix_norm(delta))
    assert row.rel_error == pytest.approx(measured, rel=1e-6)
    assert row.energy == pytest.approx(1 - measured**2, rel=0, abs=1e-12)
    if update == "rank4":
        assert row.rank == 4 and 0 < measured < 2e-6  # float32 round-off of the factors, nothing else
    else:
        assert row.rank == 8 and measured > 0.5


KINDS = st.sampled_from(["linear", "conv1d", "embedding"])


@settings(max_examples=30, deadline=None)
@given(kind=KINDS, m=st.integers(2, 24), n=st.integers(2, 24), r=st.integers(1, 4), square=st.booleans(),
       dtype=st.sampled_from([torch.float32, torch.float64, torch.bfloat16]), seed=st.integers(0, 10**6))
def test_extract_orientation_property(kind, m, n, r, square, dtype, seed):
    """Whatever the layer type, shape and dtype, the factors rebuild the stored ΔW (to the dtype's rounding)."""
    n = m if square else n
    r = min(r, m, n)
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(m, n, generator=g).to(dtype)
    tuned = (base.double() + _low_rank(m, n, r, seed, scale=0.3)).to(dtype)
    out = extract_lora({"x.weight": base}, {"x.weight": tuned}, rank=r + 2, kinds={"x": kind})
    delta = tuned.double() - base.double()
    tol = {torch.float32: 1e-5, torch.float64: 1e-10, torch.bfloat16: 3e-2}[dtype]
    got = _product(out.state_dict, "x", kind)
    assert got.shape == delta.shape
    assert float((got - delta).abs().max()) <= tol * max(1.0, float(delta.abs().max())) * max(m, n) ** 0.5


def test_extract_error_paths():
    base = {"a.weight": torch.zeros(4, 4), "b.weight": torch.zeros(4, 4)}
    with pytest.raises(KeyMismatchError, match=r"the tuned weights lack \['b.weight'\], which the base has"):
        extract_lora(base, {"a.weight": torch.ones(4, 4)}, rank=2)
    with pytest.raises(LoraCkptError, match=r"svd='randomized' needs a rank cap"):
        extract_lora(base, base, energy=0.9, svd="randomized")
    with pytest.raises(LoraCkptError, match=r"modules='\(' is not a valid regular expression"):
        extract_lora(base, base, rank=2, modules="(")
    with pytest.raises(LoraCkptError, match=r"svd is 'fast'; use 'auto', 'randomized' or 'full'"):
        extract_lora(base, base, rank=2, svd="fast")  # type: ignore[arg-type]
    with pytest.raises(KeyMismatchError, match=r"tied names keys neither state dict holds in both"):
        extract_lora(base, base, rank=2, tied={"lm.weight": "nope.weight"})
    with pytest.raises(LoraCkptError, match=r"^others is 'keep'; use 'save', 'report' or 'refuse'$"):
        extract_lora(base, base, rank=2, others="keep")  # type: ignore[arg-type]


def test_extract_reports_instead_of_saving_when_asked():
    base = {"n.weight": torch.ones(4), "e.weight": torch.zeros(10, 4)}
    tuned = {"n.weight": torch.ones(4) * 2, "e.weight": torch.zeros(12, 4)}  # a norm changed, the vocabulary grew
    out = extract_lora(base, tuned, rank=2, others="report")
    assert out.report.left_out == ["n.weight", "e.weight"] and not out.state_dict
    assert any("its shape changed from (10, 4) to (12, 4)" in n for n in out.report.notes)
    saved = extract_lora(base, tuned, rank=2)
    assert saved.report.saved == ["n.weight", "e.weight"]


def test_report_forms():
    out = extract_lora({"w.weight": torch.zeros(6, 5)}, {"w.weight": _spectrum([2.0, 1.0], 6, 5).float()}, rank=1)
    text, html, data = str(out.report), out.report._repr_html_(), out.report.to_dict()
    assert "module" in text and "rel error" in text and "extract (rank=1): 1 module(s)" in text
    assert html.startswith("<table>")
    assert data["modules"][0]["rank"] == 1 and data["totals"]["modules"] == 1
    assert data["modules"][0]["energy"] == pytest.approx(0.8)
    json.dumps(data, allow_nan=False)


# --- resize and combine ---------------------------------------------------------------------------------------------


def _peft_sd(m, n, r, seed, dtype=F64):
    g = torch.Generator().manual_seed(seed)
    return {"base_model.model.q.lora_A.weight": torch.randn(r, n, generator=g, dtype=dtype),
            "base_model.model.q.lora_B.weight": torch.randn(m, r, generator=g, dtype=dtype)}


@pytest.mark.parametrize("k", [1, 3, 5, 8, 12])
def test_resize_equals_float64_truncated_svd(k):
    sd, scale = _peft_sd(30, 20, 8, 0), 0.7
    out = resize_lora(sd, rank=k, scales={"q": scale}, layout="peft", acc=F64)
    delta = scale * sd["base_model.model.q.lora_B.weight"] @ sd["base_model.model.q.lora_A.weight"]
    u, s, vh = torch.linalg.svd(delta, full_matrices=False)
    kk = min(k, 8)
    expected = u[:, :kk] * s[:kk] @ vh[:kk]
    got = out.state_dict["base_model.model.q.lora_B.weight"] @ out.state_dict["base_model.model.q.lora_A.weight"]
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-12)
    assert out.alpha == {"q": float(kk)}  # scale 1 in the output
    if k >= 8:
        torch.testing.assert_close(got, delta, rtol=0, atol=1e-12)
        assert out.report.rows[0].rel_error < 1e-7


def test_factor_svd_never_forms_the_product_but_matches_it():
    left, right = torch.randn(300, 6, dtype=F64), torch.randn(6, 200, dtype=F64)
    u, s, vh = factor_svd(left, right)
    torch.testing.assert_close(u * s @ vh, left @ right)
    torch.testing.assert_close(s, torch.linalg.svdvals(left @ right)[:6])


def test_resize_keeps_layout_and_scales_bias_and_refuses_dora():
    sd = make_lora_state_dict(rank=4)
    out = resize_lora(sd, rank=4, alpha=8.0)
    torch.testing.assert_close(merge_lora(out.state_dict, alpha=out.alpha), merge_lora(sd, alpha=8.0),
                               rtol=1e-5, atol=1e-6)
    peft = {**_peft_sd(6, 5, 2, 1, torch.float32), "base_model.model.q.lora_B.bias": torch.ones(6)}
    out = resize_lora(peft, rank=1, scales={"q": 0.5}, layout="peft")
    torch.testing.assert_close(out.state_dict["base_model.model.q.lora_B.bias"], torch.full((6,), 0.5))
    dora = {**_peft_sd(6, 5, 2, 1, torch.float32), "base_model.model.q.lora_magnitude_vector": torch.ones(6)}
    with pytest.raises(LayoutError, match=r"q: DoRA modules cannot be resized: the magnitude vector rescales"):
        resize_lora(dora, rank=1, scales={"q": 1.0}, layout="peft")
    with pytest.raises(LayoutError, match=r"the adapter is in the standard layout: there is no LoRA update"):
        resize_lora({"w.weight": torch.zeros(2, 2)}, rank=1)


def test_combine_equals_weighted_sum_of_merges():
    a = make_lora_state_dict(rank=4, dtype=F64)
    b = {k: (v.flip(0) * 3 if ".lora_" in k else v) for k, v in a.items()}  # the same base, another update
    base = merge_lora(a, alpha=0.0)
    weights, alphas = [0.7, -1.3], [8.0, 2.0]
    both = combine_lora([a, b], weights=weights, alphas=alphas)
    got = merge_lora(both.state_dict, alpha=both.alpha)
    deltas = [{k: merge_lora(x, alpha=al)[k] - base[k] for k in base} for x, al in zip((a, b), alphas)]
    for k in base:
        expected = base[k] + weights[0] * deltas[0][k] + weights[1] * deltas[1][k]
        torch.testing.assert_close(got[k], expected, rtol=0, atol=1e-12)
    compressed = combine_lora([a, b], weights=weights, alphas=alphas, rank=3)
    assert [r.rank for r in compressed.report.rows] == [3, 3] and [r.rank_in for r in compressed.report.rows] == [8, 8]


def _measured(out, module: str, target: torch.Tensor) -> float:
    got = out.state_dict[f"base_model.model.{module}.lora_B.weight"].double() @ \
        out.state_dict[f"base_model.model.{module}.lora_A.weight"].double()
    return float(torch.linalg.matrix_norm(target - got) / torch.linalg.matrix_norm(target))


@pytest.mark.parametrize("k", [8, 4])
def test_resize_and_combine_report_the_measured_error(k):
    """Regression: with nothing cut the error was reported as 0.0 (Σkept σ² = Σσ²), not the round-off it is."""
    sd = _peft_sd(128, 64, 8, 0, torch.float32)
    update = sd["base_model.model.q.lora_B.weight"].double() @ sd["base_model.model.q.lora_A.weight"].double()
    rows = [(resize_lora(sd, rank=k, scales={"q": 0.5}, layout="peft"), 0.5 * update)]
    both = dict(weights=[1.0, -0.3], scales=[{"q": 0.5}, {"q": 0.5}], layouts=["peft", "peft"])
    rows.append((combine_lora([sd, sd], rank=k, **both), 0.35 * update))
    if k == 8:
        rows.append((combine_lora([sd, sd], **both), 0.35 * update))  # exact: ranks stacked, no SVD
    for out, target in rows:
        measured = _measured(out, "q", target)
        (row,) = out.report.rows
        assert row.rel_error == pytest.approx(measured, rel=1e-6)
        assert row.energy == pytest.approx(1 - measured**2, rel=0, abs=1e-12)
        assert (0 < measured < 2e-6) if k == 8 else measured > 0.1


def test_combine_module_in_one_adapter_only():
    one = _peft_sd(6, 5, 2, 0)
    two = {**_peft_sd(6, 5, 3, 1), **{k.replace(".q.", ".k."): v for k, v in _peft_sd(4, 5, 1, 2).items()}}
    both = combine_lora([one, two], weights=[2.0, -1.0], scales=[{"q": 0.5}, {"q": 0.25, "k": 3.0}], layouts=["peft"] * 2)
    assert both.alpha == {"q": 5.0, "k": 1.0}
    base = {"q.weight": torch.zeros(6, 5, dtype=F64), "k.weight": torch.zeros(4, 5, dtype=F64)}
    got = merge_lora(both.state_dict, base=base, alpha=both.alpha)
    a1 = merge_lora(one, base={"q.weight": base["q.weight"]}, alpha=1.0)["q.weight"]
    a2 = merge_lora(two, base=base, alpha={"q": 0.75, "k": 3.0})
    torch.testing.assert_close(got["q.weight"], 2.0 * a1 - a2["q.weight"], rtol=0, atol=1e-12)
    torch.testing.assert_close(got["k.weight"], -a2["k.weight"], rtol=0, atol=1e-12)


def test_combine_error_paths():
    a = make_lora_state_dict(rank=2)
    with pytest.raises(LayoutError, match=r"weights has 1 entries for 2 adapters; give one per adapter"):
        combine_lora([a, a], weights=[1.0])
    with pytest.raises(LayoutError, match=r"the adapters are in different layouts \(nanogpt_lora, peft\)"):
        combine_lora([a, _peft_sd(4, 4, 1, 0)], alphas=[1.0, 1.0])
    with pytest.raises(ShapeError, match=r"the adapters disagree on modules: q: adapter 1 linear \(4, 3\), adapter 2"):
        combine_lora([_peft_sd(4, 3, 1, 0), _peft_sd(5, 3, 1, 0)], scales=[{"q": 1.0}, {"q": 1.0}], layouts=["peft"] * 2)
    other = make_lora_state_dict(rank=2, seed=9)
    with pytest.raises(KeyMismatchError, match=r"differs from an earlier adapter's; combine sums LoRA updates"):
        combine_lora([a, other], alphas=[1.0, 1.0])
    with pytest.raises(LayoutError, match=r"combine needs at least one adapter"):
        combine_lora([])


# --- unmerge ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_unmerge_of_merge_is_within_one_rounding(dtype):
    lora = {k: v.to(dtype) for k, v in make_lora_state_dict(rank=4).items()}
    merged = merge_lora(lora, alpha=8.0)
    back = unmerge_lora(merged, lora, alpha=8.0, base=merge_lora(lora, alpha=0.0))
    w = lora["transformer.h.0.attn.c_attn.main_weight.weight"]
    got = back.state_dict["transformer.h.0.attn.c_attn.weight"]
    assert got.dtype == dtype
    ulp = torch.finfo(dtype).eps * torch.maximum(w.abs(), merged["transformer.h.0.attn.c_attn.weight"].abs()).float()
    assert bool(((got.float() - w.float()).abs() <= ulp + 1e-30).all())  # one rounding each way
    assert back.report.rows[0].max_abs_error is not None
    for k in merged:
        if "c_attn.weight" not in k:
            assert torch.equal(back.state_dict[k], merged[k])


def test_unmerge_error_paths():
    lora = make_lora_state_dict(rank=2)
    merged = merge_lora(lora, alpha=4.0)
    narrow = {**merged, "transformer.h.0.attn.c_attn.weight": torch.zeros(5, 5)}
    with pytest.raises(ShapeError, match=r"transformer.h.0.attn.c_attn: base weight \(5, 5\) does not fit"):
        unmerge_lora(narrow, lora, alpha=4.0)
    dora = {**_peft_sd(6, 5, 2, 1, torch.float32), "base_model.model.q.lora_magnitude_vector": torch.ones(6)}
    with pytest.raises(LayoutError, match=r"q: DoRA modules cannot be unmerged"):
        unmerge_lora({"q.weight": torch.zeros(6, 5)}, dora, scales={"q": 1.0}, layout="peft")
    with pytest.raises(LayoutError, match=r"the adapter is in the standard layout: it holds no LoRA update"):
        unmerge_lora(merged, merged)


def test_unmerge_leaves_modules_to_save_and_says_so():
    sd = {**_peft_sd(6, 5, 2, 1, torch.float32), "base_model.model.head.weight": torch.ones(3, 5)}
    merged = {"q.weight": torch.zeros(6, 5), "head.weight": torch.ones(3, 5) * 7}
    out = unmerge_lora(merged, sd, scales={"q": 1.0}, layout="peft")
    assert out.report.left_out == ["head.weight"]  # named by the model's key
    assert torch.equal(out.state_dict["head.weight"], merged["head.weight"])
    assert "cannot be restored without the base; they stay as merged: head.weight" in "\n".join(out.report.notes)
    base = {"q.weight": torch.zeros(6, 5), "head.weight": torch.full((3, 5), 2.0)}
    back = unmerge_lora(merged, sd, scales={"q": 1.0}, layout="peft", base=base)  # restored from the base
    assert back.report.left_out == [] and torch.equal(back.state_dict["head.weight"], base["head.weight"])
    assert back.state_dict["head.weight"] is not base["head.weight"]
    assert "1 tensor(s) the adapter replaced whole are the base's again" in "\n".join(back.report.notes)


# --- hostile input: non-finite values, dtype names, rules that keep nothing (issue 11's review) -----------------------

NAN_KEY = "base_model.model.q.lora_A.weight"


def _broken(sd, key=NAN_KEY, value=float("nan")):
    out = snapshot(sd)
    out[key][0, 1] = value
    return out


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_extract_refuses_non_finite_weights_before_any_svd(value):
    base = {"a.weight": torch.randn(8, 6), "n.weight": torch.ones(6)}
    tuned = {"a.weight": base["a.weight"] + 0.1, "n.weight": torch.ones(6)}
    bad = {**tuned, "a.weight": tuned["a.weight"].clone()}
    bad["a.weight"][2, 3] = value
    with pytest.raises(ShapeError, match=r"^a.weight in the tuned weights holds NaN or infinite values; the weights "
                                         r"are broken \(a diverged run\?\): extract from good checkpoints$"):
        extract_lora(base, bad, rank=2)
    norm = {**tuned, "n.weight": torch.ones(6)}
    norm["n.weight"][0] = value  # a tensor that would be saved whole, not factored
    with pytest.raises(ShapeError, match=r"^n.weight in the tuned weights holds NaN"):
        extract_lora(base, norm, rank=2)
    with pytest.raises(ShapeError, match=r"^a.weight in the base weights holds NaN"):
        extract_lora(bad, tuned, rank=2, svd="randomized")


def test_extract_infinities_equal_in_both_models():
    """An infinity both models hold in an unchanged tensor is harmless; in a changed one, ΔW there is NaN: refused."""
    g = torch.Generator().manual_seed(0)
    base = {"a.weight": torch.randn(8, 6, generator=g), "mask": torch.full((4,), float("-inf"))}
    tuned = {"a.weight": base["a.weight"] + _low_rank(8, 6, 1, 1).float(), "mask": base["mask"].clone()}
    out = extract_lora(base, tuned, rank=2)
    assert out.alpha == {"a": 1.0} and out.report.unchanged == 1
    base["a.weight"][7, 5] = tuned["a.weight"][7, 5] = float("inf")
    with pytest.raises(ShapeError, match=r"^a.weight in the tuned weights, a.weight in the base weights hold NaN or "
                                         r"infinite values; the weights are broken"):
        extract_lora(base, tuned, rank=2)
    base, tuned = snapshot(base), snapshot(tuned)
    tuned["a.weight"][:7] = base["a.weight"][:7]  # the infinity sits in an equal block (row 0), a later one differs
    base["a.weight"][0, 0] = tuned["a.weight"][0, 0] = float("inf")
    base["a.weight"][7, 5], tuned["a.weight"][7, 5] = 0.5, 1.0
    with pytest.raises(ShapeError, match=r"^a.weight: tuned − base in float32 holds NaN or infinite values; both "
                                         r"models hold an infinity there, or values near float32's largest: extract "
                                         r"from good checkpoints, or with acc='fp64' \(CLI: --acc fp64\)$"):
        extract_lora(base, tuned, rank=2, block_bytes=6 * 4)
    big = {"a.weight": torch.full((4, 4), 3e38)}
    with pytest.raises(ShapeError, match=r"^a.weight: tuned − base in float32 holds NaN or infinite values"):
        extract_lora({"a.weight": -big["a.weight"]}, big, rank=2, resident_bytes=0)  # streamed: checked too
    exact = extract_lora({"a.weight": -big["a.weight"]}, big, rank=2, acc="fp64", dtype=torch.float64)
    torch.testing.assert_close(_product(exact.state_dict, "a", "linear"), torch.full((4, 4), 6e38, dtype=F64))


def test_resize_combine_unmerge_refuse_non_finite_adapters():
    sd = _peft_sd(6, 5, 2, 0, torch.float32)
    nan = _broken(sd)
    msg = r"^base_model.model.q.lora_A.weight in {} holds NaN or infinite values; the adapter is broken \(a diverged " \
          r"run\?\): use a good checkpoint$"
    before = snapshot(nan)
    with pytest.raises(ShapeError, match=msg.format("the adapter")):
        resize_lora(nan, rank=1, scales={"q": 1.0}, layout="peft")
    with pytest.raises(ShapeError, match=msg.format("a_nan")):
        resize_lora(_broken(sd, value=float("-inf")), rank=1, scales={"q": 1.0}, layout="peft", name="a_nan")
    both = dict(scales=[{"q": 1.0}, {"q": 1.0}], layouts=["peft", "peft"])
    with pytest.raises(ShapeError, match=msg.format("adapter 2")):
        combine_lora([sd, nan], **both)  # exact: regression, it returned NaN factors reported as exact
    with pytest.raises(ShapeError, match=msg.format("b.safetensors")):
        combine_lora([sd, nan], rank=1, names=["a.safetensors", "b.safetensors"], **both)
    merged = {"q.weight": torch.zeros(6, 5)}
    with pytest.raises(ShapeError, match=msg.format("the adapter")):
        unmerge_lora(merged, nan, scales={"q": 1.0}, layout="peft")
    torch.testing.assert_close(nan, before, rtol=0, atol=0, equal_nan=True)  # the input is not changed


def test_unmerge_refuses_non_finite_merged_weights_it_changes():
    lora = make_lora_state_dict(rank=2)
    merged = merge_lora(lora, alpha=4.0)
    bad = snapshot(merged)
    bad["transformer.h.0.attn.c_attn.weight"][0, 0] = float("nan")
    with pytest.raises(ShapeError, match=r"^transformer.h.0.attn.c_attn.weight in m1_nan holds NaN or infinite values; "
                                         r"the merged weights are broken \(a diverged run\?\): unmerge from a good"):
        unmerge_lora(bad, lora, alpha=4.0, names=("m1_nan", "adapter"))
    other = snapshot(merged)
    other["transformer.ln_f.weight"][0] = float("inf")  # a weight the adapter does not touch is copied as it is
    out = unmerge_lora(other, lora, alpha=4.0)
    assert torch.equal(out.state_dict["transformer.ln_f.weight"], other["transformer.ln_f.weight"])


def test_dtype_names_are_accepted_everywhere():
    g = torch.Generator().manual_seed(0)
    base = {"a.weight": torch.randn(8, 6, generator=g)}
    tuned = {"a.weight": base["a.weight"] + _low_rank(8, 6, 2, 1).float()}
    out = extract_lora(base, tuned, rank=4, dtype="bf16", acc="float64")
    assert {v.dtype for v in out.state_dict.values()} == {torch.bfloat16}
    assert extract_lora(base, tuned, rank=4, dtype=torch.bfloat16).state_dict.keys() == out.state_dict.keys()
    with pytest.raises(ValueError, match=r"dtype='bf17': not a dtype lora_ckpt knows"):
        extract_lora(base, tuned, rank=4, dtype="bf17")
    with pytest.raises(LoraCkptError, match=r"acc=torch.float16: the SVDs accumulate in torch.float32 or torch.float64"):
        extract_lora(base, tuned, rank=4, acc="fp16")
    sd = _peft_sd(6, 5, 2, 0, torch.float32)
    assert resize_lora(sd, rank=1, scales={"q": 1.0}, layout="peft", acc="fp64").report.rows[0].rank == 1
    both = combine_lora([sd, sd], rank=1, scales=[{"q": 1.0}] * 2, layouts=["peft"] * 2, acc="fp64")
    assert both.report.rows[0].rank == 1
    back = unmerge_lora({"q.weight": torch.zeros(6, 5)}, sd, scales={"q": 1.0}, layout="peft", dtype="bf16")
    assert back.state_dict["q.weight"].dtype == torch.bfloat16
    u, s, vh, total = randomized_svd(lambda: iter([(0, tuned["a.weight"])]), (8, 6), 4, acc="fp64")
    assert s.dtype == F64


def test_sv_ratio_is_a_fraction_of_the_largest():
    for bad in (0, 2, 1.0001, -0.5):
        with pytest.raises(LoraCkptError, match=rf"^sv_ratio is {bad}, not in \(0, 1\]; it keeps the σ ≥ sv_ratio·σ_max$"):
            RankRule(sv_ratio=bad)
    s = torch.tensor(SPECTRUM, dtype=F64)
    total = float(s.square().sum())
    assert RankRule(sv_ratio=1.0).select(s, total) == 1  # σ₁ ≥ 1·σ₁
    assert RankRule(sv_ratio=0.2).select(s, total) == 4  # σ ≥ 1.0: ties are kept
    assert RankRule(sv_ratio=0.2001).select(s, total) == 3


def test_sv_epsilon_leaves_out_modules_it_keeps_nothing_of():
    """Regression: max(1, …) kept rank 1 of a module the rule kept nothing of, silently (a 0.76 relative error)."""
    big, small = _spectrum([5.0, 1.0], 12, 10, seed=1), _spectrum([0.5, 0.1], 12, 10, seed=2)
    base = {"big.weight": torch.zeros(12, 10, dtype=F64), "small.weight": torch.zeros(12, 10, dtype=F64)}
    out = extract_lora(base, {"big.weight": big, "small.weight": small}, sv_epsilon=0.7, svd="full")
    assert out.alpha == {"big": 2.0} and all(".small." not in k for k in out.state_dict)  # 5 and 1 > 0.7
    assert out.config["target_modules"] == ["big"]  # PEFT does not adapt the module left out
    row = {r.module: r for r in out.report.rows}["small"]
    assert (row.rank, row.energy, row.rel_error) == (0, 0.0, 1.0)
    assert out.report.left_out == ["small.weight"]
    assert "small: sv_epsilon=0.7 keeps none of its singular values (the largest is 0.5): left out, its update is not " \
           "in the adapter" in out.report.notes
    with pytest.raises(LoraCkptError, match=r"^sv_epsilon=6 keeps no singular value of any module \(big: sv_epsilon=6 "
                                            r"keeps none of its singular values \(the largest is 5\); small: .*give a "
                                            r"smaller sv_epsilon$"):
        extract_lora(base, {"big.weight": big, "small.weight": small}, sv_epsilon=6, svd="full")


def test_resize_and_combine_leave_out_or_refuse_what_sv_epsilon_drops():
    g = torch.Generator().manual_seed(0)
    peft = {**_peft_sd(6, 5, 2, 0), "base_model.model.k.lora_A.weight": 1e-3 * torch.randn(2, 5, generator=g, dtype=F64),
            "base_model.model.k.lora_B.weight": 1e-3 * torch.randn(4, 2, generator=g, dtype=F64)}
    scales = {"q": 1.0, "k": 1.0}
    out = resize_lora(peft, sv_epsilon=0.01, scales=scales, layout="peft")
    assert set(out.alpha) == {"q"} and not any(".k." in k for k in out.state_dict)
    assert out.config == {"exclude_modules": ["k"]}
    assert out.report.left_out == ["base_model.model.k.lora_A.weight", "base_model.model.k.lora_B.weight"]
    assert [r.rank for r in out.report.rows if r.module == "k"] == [0]
    both = combine_lora([peft, peft], sv_epsilon=0.01, scales=[scales] * 2, layouts=["peft"] * 2)
    assert set(both.alpha) == {"q"} and both.config == {"exclude_modules": ["k"]}
    with pytest.raises(LoraCkptError, match=r"^sv_epsilon=1000 keeps no singular value of any module"):
        resize_lora(peft, sv_epsilon=1000, scales=scales, layout="peft")
    nano = make_lora_state_dict(rank=2)  # nanoGPT stores main_weight beside the factors: a module cannot drop them
    with pytest.raises(LoraCkptError, match=r"^transformer.h.0.attn.c_attn: sv_epsilon=1000 keeps none of its singular "
                                            r"values \(the largest is .*\).*: a nanogpt_lora state dict stores each "
                                            r"module's weight beside its factors and cannot leave a module out; give a "
                                            r"smaller sv_epsilon$"):
        resize_lora(nano, sv_epsilon=1000, alpha=4.0)
    zero = {**peft, "base_model.model.k.lora_B.weight": torch.zeros(4, 2, dtype=F64)}  # untrained: exact at rank 1
    kept = resize_lora(zero, sv_epsilon=0.01, scales=scales, layout="peft")
    assert kept.alpha["k"] == 1.0 and not kept.config and not bool(kept.state_dict["base_model.model.k.lora_B.weight"].any())


# --- real models through PEFT, files and the command line -----------------------------------------------------------

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")
TOKENS = torch.randint(64, (2, 10), generator=torch.Generator().manual_seed(7))


def _gpt2():
    cfg = transformers.GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=64, n_positions=16, bos_token_id=0,
                                  eos_token_id=0)
    return transformers.GPT2LMHeadModel(cfg).eval()


def _llama():
    cfg = transformers.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                                   num_key_value_heads=1, vocab_size=64, bos_token_id=0, eos_token_id=0,
                                   pad_token_id=0, tie_word_embeddings=False)
    return transformers.LlamaForCausalLM(cfg).eval()


def _fine_tune(model, rank, seed):
    """A synthetic rank-``rank`` fine-tune of every 2-d weight, plus a changed norm (and a bias where there is one)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in model.named_parameters():
            if p.dim() == 2:
                p.add_(0.05 * torch.randn(p.shape[0], rank, generator=g) @ torch.randn(rank, p.shape[1], generator=g))
        norm = model.transformer.ln_f if hasattr(model, "transformer") else model.model.norm
        norm.weight.add_(0.1)
    return model


def _pair(tmp_path, make, rank=3, seed=1):
    """A base and its synthetic rank-``rank`` fine-tune, saved as Hugging Face folders ``base`` and ``tuned``."""
    torch.manual_seed(0)
    base = make()
    base.save_pretrained(tmp_path / "base")
    tuned = make()
    tuned.load_state_dict(base.state_dict())
    _fine_tune(tuned, rank, seed)
    tuned.save_pretrained(tmp_path / "tuned")
    return base, tuned


def _logits(model):
    with torch.no_grad():
        return model(TOKENS).logits


@pytest.mark.parametrize("make", [_gpt2, _llama], ids=["gpt2", "llama"])
def test_extracted_adapter_reproduces_the_tuned_model_in_peft(tmp_path, make):
    base, tuned = _pair(tmp_path, make, rank=3, seed=1)
    result = extract_files(tmp_path / "base", tmp_path / "tuned", tmp_path / "adapter", rank=8)
    assert all(r.rank == 3 for r in result.report.rows)
    assert result.report.totals()["max_rel_error"] < 1e-5
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loaded = peft.PeftModel.from_pretrained(type(base).from_pretrained(tmp_path / "base").eval(),
                                                tmp_path / "adapter").eval()
    torch.testing.assert_close(_logits(loaded), _logits(tuned), rtol=1e-4, atol=1e-4)
    assert not torch.allclose(_logits(base), _logits(tuned), atol=1e-2)
    adapter = load_peft_adapter(tmp_path / "adapter")  # and our own reader agrees with the config it wrote
    assert set(adapter.scales.values()) == {1.0}


@pytest.mark.parametrize("resident", [None, 0], ids=["held", "streamed"])
def test_extract_from_files_in_small_blocks_equals_extract_in_memory(tmp_path, monkeypatch, resident):
    """Files read block by block into reused buffers (the scan, ΔW, the randomized passes, the float64 residual)
    give the same bits as the state dicts held in memory, read in one piece (the residual: to float64 round-off)."""
    from safetensors.torch import load_file

    from lora_ckpt.lowrank_files import SourceRows
    from lora_ckpt.source import Source

    base, tuned = _pair(tmp_path, _llama, rank=3, seed=1)
    options = {"rank": 4, "svd": "randomized", "resident_bytes": resident, "block_bytes": 7 * 64 * 4}
    in_memory = extract_lora(load_file(tmp_path / "base" / "model.safetensors"),
                             load_file(tmp_path / "tuned" / "model.safetensors"), **options)
    monkeypatch.setattr(lowrank, "_FILL_BLOCK_BYTES", 5 * 64 * 4)  # ΔW held whole is filled in blocks too
    monkeypatch.setattr(lowrank, "_RESIDUAL_BLOCK_BYTES", 3 * 64 * 8)
    with Source.open(tmp_path / "base") as b, Source.open(tmp_path / "tuned") as t:
        blocks = extract_lora(SourceRows(b), SourceRows(t), **options)
    assert sorted(blocks.state_dict) == sorted(in_memory.state_dict)
    for key, value in in_memory.state_dict.items():
        torch.testing.assert_close(blocks.state_dict[key], value, rtol=0, atol=0, msg=key)
    assert [r.rank for r in blocks.report.rows] == [r.rank for r in in_memory.report.rows]
    for row, expected in zip(blocks.report.rows, in_memory.report.rows):
        assert row.rel_error == pytest.approx(expected.rel_error, rel=1e-9)


def test_files_resize_combine_unmerge_round_trip(tmp_path):
    base, tuned = _pair(tmp_path, _llama, rank=2, seed=3)
    extract_files(tmp_path / "base", tmp_path / "tuned", tmp_path / "a", rank=4)
    same = resize_files(tmp_path / "a", tmp_path / "a2", rank=8)  # R ≥ rank: exact
    assert all(r.rel_error < 1e-6 for r in same.report.rows)
    small = resize_files(tmp_path / "a", tmp_path / "a1", rank=1)
    assert all(r.rank == 1 for r in small.report.rows)
    combine_files([tmp_path / "a", tmp_path / "a"], tmp_path / "twice", weights=[0.5, 0.5])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for name in ("a2", "twice"):
            loaded = peft.PeftModel.from_pretrained(transformers.LlamaForCausalLM.from_pretrained(tmp_path / "base"),
                                                    tmp_path / name).eval()
            torch.testing.assert_close(_logits(loaded), _logits(tuned), rtol=1e-4, atol=1e-4)
    un = unmerge_files(tmp_path / "tuned", tmp_path / "a", tmp_path / "back.safetensors", base=tmp_path / "base")
    assert un.report.totals()["max_abs_error"] < 1e-5
    assert un.report.left_out == [] and un.warnings == []  # the norm saved whole comes from the base
    from safetensors.torch import load_file

    back = load_file(tmp_path / "back.safetensors")
    w = base.state_dict()["model.layers.0.self_attn.q_proj.weight"]
    torch.testing.assert_close(back["model.layers.0.self_attn.q_proj.weight"], w, rtol=0, atol=1e-5)
    assert torch.equal(back["model.norm.weight"], base.state_dict()["model.norm.weight"])
    no_base = unmerge_files(tmp_path / "tuned", tmp_path / "a", tmp_path / "back2.safetensors")
    assert no_base.report.left_out == ["model.norm.weight"]  # without the base it cannot be restored
    other = _llama()  # another fine-tune of the same base: its adapter fits every shape, not the merged weights
    other.load_state_dict(base.state_dict())
    _fine_tune(other, 2, 9)
    other.save_pretrained(tmp_path / "other")
    extract_files(tmp_path / "base", tmp_path / "other", tmp_path / "wrong", rank=4)
    bad = unmerge_files(tmp_path / "tuned", tmp_path / "wrong", tmp_path / "bad.safetensors", base=tmp_path / "base")
    assert len(bad.warnings) == len(bad.report.rows) == 16  # every module, embeddings and lm_head too
    assert re.search(r"the result differs from the base by up to \S+, \S+ of the update taken out \(more than a "
                     r"merge's and an unmerge's roundings\): .*tuned is not the base plus this update; is .*wrong the "
                     r"adapter merged into it", bad.warnings[0])


def test_cli_commands(tmp_path, capsys):
    base, tuned = _pair(tmp_path, _gpt2, rank=2, seed=5)
    b, t = str(tmp_path / "base"), str(tmp_path / "tuned")
    assert main(["extract", b, t, str(tmp_path / "x"), "--rank", "4", "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "extract (rank=4)" in out and "transformer.h.0.attn.c_attn" in out and "wrote" in out
    assert main(["extract", b, t, str(tmp_path / "x"), "--rank", "4", "--quiet"]) == 1
    assert "already exists; pass --force to replace it" in capsys.readouterr().err
    assert main(["extract", b, t, str(tmp_path / "y")]) == 2
    assert "say how to choose the rank: --rank R" in capsys.readouterr().err
    assert main(["resize", str(tmp_path / "x"), str(tmp_path / "r"), "--energy", "0.9", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["ok"] and data["operation"] == "resize" and data["modules"]
    assert main(["combine", str(tmp_path / "x"), str(tmp_path / "r"), str(tmp_path / "c"), "--weights", "1", "-1"]) == 1
    err = capsys.readouterr().err  # the changed norms are saved whole: x − r of them needs the base
    assert "saved whole (modules_to_save), so it replaces the base's value, and the weights of the adapters holding " \
           "it sum to 0, not 1" in err and "--others report" in err and not (tmp_path / "c").exists()
    assert main(["combine", str(tmp_path / "x"), str(tmp_path / "r"), str(tmp_path / "c"), "--weights", "2", "-1"]) == 0
    assert "combine:" in capsys.readouterr().out
    assert main(["combine", str(tmp_path / "x"), str(tmp_path / "c2"), "--weights", "1", "2"]) == 2
    assert "--weights has 2 value(s) for 1 adapter(s)" in capsys.readouterr().err
    assert main(["unmerge", t, str(tmp_path / "x"), str(tmp_path / "u"), "--base", b, "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["operation"] == "unmerge"
    assert main(["unmerge", b, str(tmp_path / "x"), str(tmp_path / "u2"), "--alpha", "3"]) == 1
    assert "the alpha comes from adapter_config.json; do not pass alpha" in capsys.readouterr().err
    assert main(["extract", b, t, str(tmp_path / "k"), "--rank", "2", "--to", "kohya", "--quiet", "--json"]) == 1
    assert "a kohya adapter is a file; give a .safetensors name" in capsys.readouterr().out


def test_randomized_svd_error_bound_holds():
    """Halko et al.'s bound on a full-rank matrix with a decaying spectrum (the reported error is below it)."""
    s = [0.8 ** i for i in range(40)]
    m = _spectrum(s, 60, 50, seed=2)
    k, p, q = 5, 8, 2
    u, sv, vh, total = randomized_svd(lambda: iter([(0, m)]), (60, 50), k + p, niter=q, acc=F64)
    approx = u[:, :k + p] * sv @ vh
    err = float(torch.linalg.matrix_norm(m - approx, ord=2))
    bound = (1 + math.sqrt(k / (p - 1)) + math.e * math.sqrt(k + p) / p * math.sqrt(50 - k)) ** (1 / (2 * q + 1)) * s[k]
    assert err <= bound
    assert total == pytest.approx(sum(x * x for x in s))


# --- hostile input through files and the command line (issue 11's review) --------------------------------------------


@pytest.fixture(scope="module")
def hostile(tmp_path_factory):
    """A llama base, its fine-tune, the extracted adapter, and broken copies of each (one value set to NaN or inf)."""
    from safetensors.torch import load_file, save_file

    root = tmp_path_factory.mktemp("hostile")
    base, tuned = _pair(root, _llama)
    extract_files(root / "base", root / "tuned", root / "adapter", rank=4)

    def broken(src, name, file, key, value):
        import shutil

        shutil.copytree(root / src, root / name)
        sd = load_file(root / name / file)
        sd[key].view(-1)[1] = value
        save_file(sd, root / name / file, metadata={"format": "pt"})

    q = "model.layers.1.self_attn.q_proj.weight"
    broken("tuned", "tuned_nan", "model.safetensors", q, float("nan"))
    broken("tuned", "tuned_inf", "model.safetensors", q, float("inf"))
    broken("tuned", "m1_nan", "model.safetensors", q, float("nan"))
    broken("adapter", "a_nan", "adapter_model.safetensors", "base_model.model.lm_head.lora_A.weight", float("nan"))
    import shutil

    shutil.copytree(root / "adapter", root / "b_other")
    config = json.loads((root / "b_other" / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = "meta-llama/Other"
    (root / "b_other" / "adapter_config.json").write_text(json.dumps(config))
    return root, base, tuned


NAN_A = r"base_model.model.lm_head.lora_A.weight in {a_nan} holds NaN or infinite values; the adapter is broken " \
        r"\(a diverged run\?\): use a good checkpoint"
NAN_T = r"model.layers.1.self_attn.q_proj.weight in {tuned}/model.safetensors holds NaN or infinite values; the " \
        r"weights are broken \(a diverged run\?\): extract from good checkpoints"


@pytest.mark.parametrize(("argv", "message"), [
    (["combine", "adapter", "a_nan", "o"], NAN_A),  # regression: exit 0, NaN factors, "mean relative error 0"
    (["combine", "adapter", "a_nan", "o", "--rank", "4"], NAN_A),  # regression: torch's LinAlgError traceback
    (["resize", "a_nan", "o", "--rank", "2"], NAN_A),
    (["unmerge", "tuned", "a_nan", "o"], NAN_A),
    (["extract", "base", "tuned_nan", "o", "--rank", "4", "--quiet"], NAN_T.replace("{tuned}", "{tuned_nan}")),
    (["extract", "base", "tuned_inf", "o", "--rank", "4", "--quiet"], NAN_T.replace("{tuned}", "{tuned_inf}")),
    (["unmerge", "m1_nan", "adapter", "o"], r"model.layers.1.self_attn.q_proj.weight in {m1_nan} holds NaN or "
     r"infinite values; the merged weights are broken \(a diverged run\?\): unmerge from a good checkpoint"),
    (["extract", "base", "tuned", "o", "--sv-epsilon", "1000", "--quiet"],
     r"sv_epsilon=1000 keeps no singular value of any module \(.*\); give a smaller sv_epsilon"),
    (["combine", "adapter", "b_other", "o"],  # regression: exit 0, keeping the first adapter's base
     r"{adapter} was trained on '{base}' but {b_other} on 'meta-llama/Other' \(base_model_name_or_path\); updates of "
     r"different base models do not add up: combine adapters of one base, or pass --base-model NAME \(Python: "
     r"base_model=NAME\) to combine them anyway for the base NAME"),
])
def test_cli_refuses_hostile_input_in_one_line(hostile, capsys, argv, message):
    root = hostile[0]
    names = {"base", "tuned", "adapter", "a_nan", "tuned_nan", "tuned_inf", "m1_nan", "b_other"}
    args = [str(root / a) if a in names | {"o"} else a for a in argv]
    assert main(args) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1, err
    pattern = message.format(**{n: re.escape(str(root / n)) for n in names})
    assert re.fullmatch(rf"lora-ckpt: error: {pattern}\n", err), err
    assert not (root / "o").exists()  # nothing written


def test_combine_base_model_flag_and_dtype_names_through_files(hostile, capsys):
    root = hostile[0]
    out = root / "c_other"
    assert main(["combine", str(root / "adapter"), str(root / "b_other"), str(out), "--base-model", "X",
                 "--weights", "0.5", "0.5"]) == 0  # their equal modules_to_save copies: weights summing to 1
    assert json.loads((out / "adapter_config.json").read_text())["base_model_name_or_path"] == "X"
    same = combine_files([root / "adapter", root / "adapter"], root / "c_same", weights=[0.25, 0.75])
    assert same.report.rows and json.loads((root / "c_same" / "adapter_config.json").read_text())[
        "base_model_name_or_path"] == str(root / "base")
    result = extract_files(root / "base", root / "tuned", root / "bf16", rank=4, dtype="bf16")
    assert result.report.rows
    factors = {k: v for k, v in load_peft_adapter(root / "bf16").state_dict.items() if ".lora_" in k}
    assert factors and {v.dtype for v in factors.values()} == {torch.bfloat16}  # the factors' dtype
    unmerge_files(root / "tuned", root / "adapter", root / "u.safetensors", dtype="bf16")
    from safetensors.torch import load_file

    assert {v.dtype for v in load_file(root / "u.safetensors").values()} == {torch.bfloat16}
    capsys.readouterr()
    from safetensors.torch import save_file

    save_file({k: v.clone() for k, v in make_lora_state_dict(rank=2).items()}, root / "nano.safetensors")
    with pytest.raises(LayoutError, match=r"^base_model is recorded in a PEFT adapter's config; these adapters are "
                                          r"files that record no base model: drop base_model \(CLI: --base-model\)$"):
        combine_files([root / "nano.safetensors"] * 2, root / "nano_sum.safetensors", alpha=4.0, base_model="X")
    assert not (root / "nano_sum.safetensors").exists()


def test_resized_adapter_leaving_modules_out_loads_in_peft(hostile):
    """Modules ``sv_epsilon`` keeps nothing of are excluded in adapter_config.json: PEFT leaves those layers plain and
    the model computes base + the kept modules' updates."""
    root, base, _ = hostile
    adapter = load_peft_adapter(root / "adapter")
    largest = {}
    for k, a in adapter.state_dict.items():
        for leaf in (".lora_A.weight", ".lora_embedding_A"):  # σ of B@A, the same as of its transpose
            if k.endswith(leaf):
                name = k.removeprefix("base_model.model.").removesuffix(leaf)
                b = adapter.state_dict[k.replace("_A", "_B")]
                largest[name] = float(factor_svd(b.double() * adapter.scales[name], a.double())[1][0])
    ordered = sorted(largest.values())
    eps = (ordered[len(ordered) // 2] + ordered[len(ordered) // 2 + 1]) / 2  # half the modules' σ₁ fall below it
    result = resize_files(root / "adapter", root / "half", sv_epsilon=eps)
    dropped = sorted(n for n, s in largest.items() if s <= eps)
    assert dropped and len(dropped) < len(largest)
    assert sorted(r.module for r in result.report.rows if r.rank == 0) == dropped
    config = json.loads((root / "half" / "adapter_config.json").read_text())
    assert config["exclude_modules"] == dropped
    resized = load_peft_adapter(root / "half")
    expected = type(base).from_pretrained(root / "base").eval()
    expected.load_state_dict(merge_lora(resized.state_dict, base=expected.state_dict(),
                                        scales=resized.scales, fan_in_fan_out=False))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # transformers' deprecation inside PEFT; others stay errors
        loaded = peft.PeftModel.from_pretrained(type(base).from_pretrained(root / "base").eval(), root / "half").eval()
    torch.testing.assert_close(_logits(loaded), _logits(expected), rtol=1e-5, atol=1e-5)
    layers = dict(loaded.base_model.model.named_modules())
    assert all(type(layers[n]) in (torch.nn.Linear, torch.nn.Embedding) for n in dropped)  # not adapted
    assert all(hasattr(layers[n], "lora_A") for n in largest if n not in dropped)
    full = merge_lora(adapter.state_dict, base=base.state_dict(), scales=adapter.scales, fan_in_fan_out=False)
    assert any(not torch.allclose(full[f"{n}.weight"], expected.state_dict()[f"{n}.weight"]) for n in dropped)


# --- a tied lm_head that save_pretrained leaves out of the base's files (issue: merge failed, unmerge skipped it) -----


@pytest.fixture(scope="module")
def tied_gpt2(tmp_path_factory):
    """A tied GPT-2 base (its files hold no lm_head.weight), a fine-tune of c_attn, c_fc and wte, and the adapter
    extracted from them, which updates wte and lm_head (PEFT needs both)."""
    root = tmp_path_factory.mktemp("tied")
    torch.manual_seed(0)
    base = _gpt2()
    base.save_pretrained(root / "gbase")
    tuned = _gpt2()
    tuned.load_state_dict(base.state_dict())
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in tuned.named_parameters():
            if any(part in name for part in ("c_attn.weight", "c_fc.weight", "wte.weight")):
                p.add_(0.05 * torch.randn(p.shape[0], 2, generator=g) @ torch.randn(2, p.shape[1], generator=g))
    tuned.save_pretrained(root / "gtuned")
    from safetensors import safe_open

    with safe_open(root / "gbase" / "model.safetensors", "pt") as f:
        assert "lm_head.weight" not in f.keys()
    extract_files(root / "gbase", root / "gtuned", root / "ad16", rank=16)
    modules = {k.removeprefix("base_model.model.").split(".lora_")[0] for k in load_peft_adapter(root / "ad16").state_dict}
    assert {"transformer.wte", "lm_head"} <= modules
    return root, base, tuned


def test_adapter_updating_a_tied_lm_head_merges_in_memory_streamed_and_from_the_adapter_alone(tied_gpt2, capsys):
    from lora_ckpt.adapter import merge_adapter
    from lora_ckpt.files import merge_files

    root, base, tuned = tied_gpt2
    merged = merge_adapter(root / "gbase", root / "ad16")
    assert set(merged) == set(base.state_dict())  # lm_head.weight is written, merged with its own update
    model = _gpt2()
    model.load_state_dict(merged)
    torch.testing.assert_close(_logits(model), _logits(tuned), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(merged["lm_head.weight"], merged["transformer.wte.weight"])  # equal updates
    assert main(["merge", str(root / "gbase"), str(root / "ad16"), str(root / "out")]) == 0  # streamed
    capsys.readouterr()
    merge_files(root / "ad16", root / "out2")  # the base the adapter names
    for out in ("out", "out2"):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            loaded = transformers.GPT2LMHeadModel.from_pretrained(root / out).eval()
        torch.testing.assert_close(_logits(loaded), _logits(tuned), rtol=1e-4, atol=1e-4)


def test_unmerge_of_a_tied_lm_head_refuses_without_the_base_and_recovers_it_with_it(tied_gpt2, capsys):
    from safetensors.torch import load_file

    root, base, _ = tied_gpt2
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft_model = peft.PeftModel.from_pretrained(transformers.GPT2LMHeadModel.from_pretrained(root / "gbase"),
                                                    root / "ad16")
        peft_model.merge_and_unload().save_pretrained(root / "pmerged")  # both updates in the shared tensor
    pm = str(root / "pmerged")
    capsys.readouterr()
    assert main(["unmerge", pm, str(root / "ad16"), str(root / "gback")]) == 1
    err = capsys.readouterr().err
    assert err == (f"lora-ckpt: error: {pm} ties lm_head.weight to transformer.wte.weight (config.json) and stores "
                   "the shared tensor once, and the adapter updates lm_head too: PEFT's merge_and_unload adds both "
                   "updates to the shared tensor, a fine-tune (or a merge saved tied) holds one, and the merged "
                   "weights cannot tell which; give the base model (--base BASE, Python: base=BASE) to decide\n")
    assert not (root / "gback").exists()
    want = base.state_dict()
    for merged, how in (("pmerged", "holds both updates"), ("gtuned", "holds one update")):
        result = unmerge_files(root / merged, root / "ad16", root / f"back_{merged}", base=root / "gbase")
        assert any(n.startswith("lm_head: ") and how in n for n in result.report.notes)
        back = load_file(root / f"back_{merged}" / "model.safetensors")
        for key, value in back.items():
            torch.testing.assert_close(value, want[key], rtol=0, atol=1e-6)
        assert result.report.totals()["max_abs_error"] < 1e-6


# --- review findings: facts, not assumptions -------------------------------------------------------------------


def test_extract_from_files_without_config_needs_the_layer_orientation(tmp_path, capsys):
    """Regression: GPT-2 weight files (no config.json) were factored as nn.Linear: PEFT loaded the transposed
    update of the square c_proj without a word and computed another model."""
    torch.manual_seed(0)
    base = _gpt2()
    base.save_pretrained(tmp_path / "base")
    tuned = _gpt2()
    tuned.load_state_dict(base.state_dict())
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # only the Conv1D layers change: "every 2-d weight is Conv1D" is then true of the update
        for name, p in tuned.named_parameters():
            if p.dim() == 2 and (".attn." in name or ".mlp." in name):
                p.add_(0.05 * torch.randn(p.shape[0], 3, generator=g) @ torch.randn(3, p.shape[1], generator=g))
    tuned.save_pretrained(tmp_path / "tuned")
    b, t = tmp_path / "base" / "model.safetensors", tmp_path / "tuned" / "model.safetensors"
    with pytest.raises(LayoutError, match=r"no config.json records the base model's layer types.*fan_in_fan_out="):
        extract_files(b, t, tmp_path / "a", rank=8)
    assert not (tmp_path / "a").exists()
    assert main(["extract", str(b), str(t), str(tmp_path / "a"), "--rank", "8", "--quiet"]) == 1
    err = capsys.readouterr().err
    assert "--no-fan-in-fan-out" in err and "--fan-in-fan-out" in err and "fan_in_fan_out=" not in err
    result = extract_files(b, t, tmp_path / "a", rank=8, fan_in_fan_out=True)
    assert "no config.json records the base model's layer types: the 2-d weights are taken as Conv1D, as said" in \
        result.report.notes
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loaded = peft.PeftModel.from_pretrained(_gpt2_from(tmp_path / "base"), tmp_path / "a").eval()
    torch.testing.assert_close(_logits(loaded), _logits(tuned), rtol=1e-4, atol=1e-4)


def _gpt2_from(path):
    return transformers.GPT2LMHeadModel.from_pretrained(path).eval()


def test_extract_to_kohya_refuses_tensors_it_cannot_hold_before_any_svd(tmp_path, monkeypatch, capsys):
    """Regression: --to kohya said 'saved whole: model.norm.weight' and wrote a file without it."""
    _pair(tmp_path, _llama)
    b, t, out = str(tmp_path / "base"), str(tmp_path / "tuned"), tmp_path / "k.safetensors"

    def no_svd(self):
        raise AssertionError("an SVD ran before the refusal")

    with monkeypatch.context() as m:
        m.setattr(lowrank._Delta, "fill", no_svd)
        with pytest.raises(LayoutError, match=r"model\.norm\.weight.*cannot hold: keep them in a PEFT adapter"):
            extract_files(b, t, out, rank=8, to="kohya")
    assert not out.exists()
    assert main(["extract", b, t, str(out), "--rank", "8", "--to", "kohya", "--quiet"]) == 1
    err = capsys.readouterr().err
    assert "--to peft" in err and "--others report" in err and not out.exists()
    left = extract_files(b, t, out, rank=8, to="kohya", others="report")
    assert left.report.left_out == ["model.embed_tokens.weight", "model.norm.weight"] and left.report.saved == []
    assert any("model.embed_tokens.weight, model.norm.weight" in w for w in left.warnings)  # no LoRA embeddings
    assert out.is_file()


def test_extract_compares_values_across_dtypes_and_warns_of_mixed_changed_weights():
    """Regression: a float32 base and a bfloat16 tuned model saved every unchanged norm whole (its dtype differed)
    and factored rounding noise without a word."""
    g = torch.Generator().manual_seed(8)
    w = torch.randn(24, 16, generator=g).bfloat16().float()  # float32 values that bfloat16 holds exactly
    delta = torch.randn(24, 2, generator=g) @ torch.randn(2, 16, generator=g)
    base = {"w.weight": w, "v.weight": w.clone(), "n.weight": torch.ones(24)}
    tuned = {"w.weight": (w + delta).bfloat16(), "v.weight": w.bfloat16(), "n.weight": torch.ones(24).bfloat16()}
    out = extract_lora(base, tuned, rank=8)
    assert out.report.saved == [] and out.report.unchanged == 2  # v and n: the same values in another dtype
    assert [r.module for r in out.report.rows] == ["w"]
    (warning,) = out.report.warnings
    assert "1 changed tensor(s) are stored in another dtype" in warning and "w.weight: torch.float32" in warning
    same = extract_lora({k: v.bfloat16() for k, v in base.items()}, tuned, rank=8)
    assert same.report.warnings == []


def test_extract_progress_covers_every_2d_tensor(tmp_path):
    """Regression: the bar ended at 69%: unchanged and unselected weights never moved it."""
    _pair(tmp_path, _llama)
    from safetensors.torch import load_file

    b = load_file(tmp_path / "base" / "model.safetensors")
    t = load_file(tmp_path / "tuned" / "model.safetensors")
    seen: list[tuple[str, int]] = []
    extract_lora(b, t, rank=8, modules=r"q_proj", on_module=lambda name, n: seen.append((name, n)))
    assert sum(n for _, n in seen) == sum(v.numel() for v in t.values() if v.dim() == 2)
    assert len(seen) == len({name for name, _ in seen}) == sum(v.dim() == 2 for v in t.values())


def test_extract_records_the_base_folder_so_the_adapter_merges_from_anywhere(tmp_path, monkeypatch, capsys):
    """Regression: base_model_name_or_path was the path as typed ('base'), so `merge ADAPTER DST` failed elsewhere,
    and the message did not say that the name came from adapter_config.json."""
    _pair(tmp_path, _llama)
    monkeypatch.chdir(tmp_path)
    extract_files("base", "tuned", "adapter", rank=4)
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(tmp_path / "base")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    assert main(["merge", str(tmp_path / "adapter"), str(tmp_path / "merged"), "--quiet"]) == 0
    config["base_model_name_or_path"] = "gone"
    (tmp_path / "adapter" / "adapter_config.json").write_text(json.dumps(config))
    assert main(["merge", str(tmp_path / "adapter"), str(tmp_path / "merged2"), "--quiet"]) == 1
    err = capsys.readouterr().err
    assert "gone: no such file or folder (the base model named by" in err and "base_model_name_or_path); give " \
           "the base model too: lora-ckpt merge BASE ADAPTER DST" in err


def test_folder_outputs_refuse_file_names_and_files(tmp_path, capsys):
    """Regression: `extract … x.safetensors` made a folder of that name; an existing file got 'pass --force', and
    --force then said it is not a folder."""
    _pair(tmp_path, _llama)
    b, t = str(tmp_path / "base"), str(tmp_path / "tuned")
    assert main(["extract", b, t, str(tmp_path / "x.safetensors"), "--rank", "4", "--quiet"]) == 1
    assert "x.safetensors: this output is a folder, and '.safetensors' names a file; give a folder name without a " \
           "file suffix" in capsys.readouterr().err
    assert not (tmp_path / "x.safetensors").exists()
    (tmp_path / "taken").write_text("mine")
    assert main(["extract", b, t, str(tmp_path / "taken"), "--rank", "4", "--quiet"]) == 1
    assert "taken: already exists and is a file, but this output is a folder; give another name" in \
           capsys.readouterr().err
    assert (tmp_path / "taken").read_text() == "mine"


def test_combine_lora_alpha_message_names_its_argument():
    sd = make_lora_state_dict(rank=2)
    with pytest.raises(AlphaError, match=r"^adapter 1: the LoRA alpha is not known for 2 module\(s\) .*; pass "
                                         r"alphas=\[…\] with one alpha per adapter \(CLI: --alpha A, the same for each\)$"):
        combine_lora([sd, sd], weights=[0.5, 0.5])
    assert combine_lora([sd, sd], weights=[0.5, 0.5], alphas=[4.0, 4.0]).report.rows


def test_combine_refuses_to_weight_a_whole_tensor():
    """Regression: combine(A, weights=[0.5]) halved the LoRA update and kept the norm A replaces whole, unweighted."""
    a = {**_peft_sd(6, 5, 2, 1, torch.float32), "base_model.model.norm.weight": torch.full((6,), 1.1)}
    with pytest.raises(LayoutError, match=r"^base_model.model.norm.weight: saved whole \(modules_to_save\), so it "
                                          r"replaces the base's value, and the weights of the adapters holding it "
                                          r"sum to 0.5, not 1; .*others='report'"):
        combine_lora([a], weights=[0.5], scales=[{"q": 1.0}])
    both = combine_lora([a, a], weights=[0.25, 0.75], scales=[{"q": 1.0}] * 2)  # the weighted value is that value
    assert torch.equal(both.state_dict["base_model.model.norm.weight"], a["base_model.model.norm.weight"])
    assert any("kept once: their weights sum to 1" in n for n in both.report.notes)


def test_unmerge_table_shows_what_unmerge_measures(tmp_path):
    _pair(tmp_path, _llama)
    extract_files(tmp_path / "base", tmp_path / "tuned", tmp_path / "a", rank=4)
    un = unmerge_files(tmp_path / "tuned", tmp_path / "a", tmp_path / "back.safetensors", base=tmp_path / "base")
    head = str(un.report).splitlines()[0]
    assert "rank" in head and "max |error|" in head and "energy" not in head and "rel error" not in head
    assert "unmerge: 16 module(s) taken out, largest |error| against the base" in str(un.report)


# --- hostile review of the rewrite ------------------------------------------------------------------------------


def test_a_config_transformers_cannot_build_needs_the_kinds_said(tmp_path, capsys):
    """Regression: without 'architectures' the embedding was factored as nn.Linear; PEFT only warned of missing
    keys and lost its update (exit 0), and the note blamed a missing transformers."""
    base, tuned = _pair(tmp_path, _llama)
    for name in ("base", "tuned"):
        config = json.loads((tmp_path / name / "config.json").read_text())
        del config["architectures"]
        (tmp_path / name / "config.json").write_text(json.dumps(config))
    b, t = str(tmp_path / "base"), str(tmp_path / "tuned")
    assert main(["extract", b, t, str(tmp_path / "a"), "--rank", "8", "--quiet"]) == 1
    err = capsys.readouterr().err
    assert "transformers cannot build the model config.json describes (no 'architectures'" in err
    assert "--kinds model.embed_tokens=embedding" in err and not (tmp_path / "a").exists()
    assert main(["extract", b, t, str(tmp_path / "a"), "--rank", "8", "--quiet", "--kinds",
                 "model.embed_tokens=embedding"]) == 0  # model_type llama: nn.Linear for the rest
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loaded = peft.PeftModel.from_pretrained(transformers.LlamaForCausalLM.from_pretrained(tmp_path / "base"),
                                                tmp_path / "a").eval()
    torch.testing.assert_close(_logits(loaded), _logits(tuned), rtol=1e-4, atol=1e-4)
    assert main(["extract", b, t, str(tmp_path / "c"), "--rank", "8", "--quiet", "--kinds", "nope=embedding"]) == 1
    assert "kinds names ['nope'], which are not 2-d weights of the base" in capsys.readouterr().err


def test_extract_kinds_may_not_contradict_the_built_model(tmp_path, capsys):
    _pair(tmp_path, _llama)
    assert main(["extract", str(tmp_path / "base"), str(tmp_path / "tuned"), str(tmp_path / "a"), "--rank", "8",
                 "--quiet", "--kinds", "model.layers.0.mlp.up_proj=embedding"]) == 1
    assert "kinds model.layers.0.mlp.up_proj=embedding (it is linear) contradict the base model's config.json" in \
        capsys.readouterr().err


def test_one_key_under_two_wrapper_prefixes_is_refused(tmp_path):
    """Regression: SourceRows kept the last of 'a.weight' and '_orig_mod.a.weight' without a word."""
    from safetensors.torch import save_file

    w = torch.randn(8, 6)
    save_file({"a.weight": w, "c.weight": w.clone()}, tmp_path / "b.safetensors")
    save_file({"a.weight": w + 1, "_orig_mod.a.weight": w.clone(), "c.weight": w.clone()}, tmp_path / "t.safetensors")
    with pytest.raises(LayoutError, match=r"t.safetensors: '_orig_mod.a.weight' and 'a.weight' are one key under "
                                          r"different wrapper prefixes; keep one of them"):
        extract_files(tmp_path / "b.safetensors", tmp_path / "t.safetensors", tmp_path / "o", rank=2,
                      fan_in_fan_out=False)


def test_resize_and_combine_refuse_integer_factors_and_overflowing_updates():
    sd = _peft_sd(6, 5, 2, 1, torch.float32)
    ints = {**sd, "base_model.model.q.lora_A.weight": sd["base_model.model.q.lora_A.weight"].to(torch.int32)}
    for call in (lambda x: resize_lora(x, rank=1, scales={"q": 1.0}, layout="peft"),
                 lambda x: combine_lora([x, sd], scales=[{"q": 1.0}] * 2, layouts=["peft"] * 2)):
        with pytest.raises(LayoutError, match=r"LoRA factors must be floating point: base_model.model.q.lora_A.weight is torch.int32; "
                                              r"integer, bool or complex factors are not a LoRA update"):
            call(ints)
    big = {k: v * 1e30 for k, v in sd.items()}  # finite factors, a product float32 cannot hold
    for call in (lambda x: resize_lora(x, rank=1, scales={"q": 1.0}, layout="peft"),
                 lambda x: combine_lora([x, sd], scales=[{"q": 1.0}] * 2, layouts=["peft"] * 2)):
        with pytest.raises(ShapeError, match=r"^q: the update \(scale × B@A\) has norm \S+, which float32 cannot hold"):
            call(big)


def test_float8_weights_are_refused_in_one_line():
    w = torch.randn(8, 6)
    with pytest.raises(LayoutError, match=r"^l.weight in the tuned weights is float8_e4m3fn: extract works on float16, "
                                          r"bfloat16, float32 or float64 weights; dequantize the model first$"):
        extract_lora({"l.weight": w}, {"l.weight": w.to(torch.float8_e4m3fn)}, rank=2)


def test_top_level_keys_are_their_own_modules_and_a_regex_that_matches_nothing_is_said():
    w = torch.randn(8, 6)
    base = {"step": torch.tensor(1.0), "mask": torch.ones(3), "l.weight": w}
    tuned = {"step": torch.tensor(2.0), "mask": torch.ones(3), "l.weight": w + 0.1}
    out = extract_lora(base, tuned, rank=2)
    assert out.report.saved == ["step"] and out.report.unchanged == 1  # mask: unchanged, not saved
    none = extract_lora(base, tuned, rank=2, modules=r"^nothing$")
    assert any("modules='^nothing$' (CLI: --modules) matches no module of the base" in w for w in none.report.warnings)


def test_arguments_in_the_wrong_order_are_named(tmp_path, capsys):
    """Newcomer review: swapped arguments got messages that named no file and no order."""
    _pair(tmp_path, _llama)
    b, t, a = str(tmp_path / "base"), str(tmp_path / "tuned"), str(tmp_path / "a")
    assert main(["extract", b, t, a, "--rank", "4", "--quiet"]) == 0
    capsys.readouterr()
    assert main(["extract", a, t, str(tmp_path / "x"), "--rank", "4", "--quiet"]) == 1
    assert f"{a} is a PEFT adapter, not a model: extract takes the base model and the fine-tuned one (BASE TUNED OUT)" \
        in capsys.readouterr().err
    assert main(["resize", b, str(tmp_path / "r"), "--rank", "2"]) == 1
    assert f"{b} is in the standard layout: there is no LoRA update to resize (resize takes an adapter)" in \
        capsys.readouterr().err
    assert main(["unmerge", a, t, str(tmp_path / "u.safetensors")]) == 1
    assert f"{t} is in the standard layout: it holds no LoRA update to take out (the arguments are the merged " \
           "weights, then the adapter)" in capsys.readouterr().err


def test_resize_combine_unmerge_read_and_keep_the_recorded_kinds_of_square_loralib_modules(tmp_path):
    """loralib factors of a square weight fit a linear module and an embedding: a file lora-ckpt wrote records
    which, and resize / combine / unmerge (which take no --kinds) read it and record it again."""
    from lora_ckpt import detect_layout, load_checkpoint, merge_lora, save_checkpoint

    g = torch.Generator().manual_seed(3)
    w = torch.randn(8, 8, generator=g)
    a, b = torch.randn(2, 8, generator=g), torch.randn(8, 2, generator=g)
    lora = {"q.weight": w, "q.lora_A": a, "q.lora_B": b}
    path = save_checkpoint(tmp_path / "l.safetensors", lora, alpha=2.0, kinds={"q": "linear"})
    with pytest.raises(LayoutError, match="fit both a linear module and an embedding"):
        detect_layout(lora)  # without the record the shapes cannot tell
    resized = resize_files(path, tmp_path / "r.safetensors", rank=1)
    assert [r.rank for r in resized.report.rows] == [1]
    assert load_checkpoint(tmp_path / "r.safetensors").kinds == {"q": "linear"}
    combine_files([path, path], tmp_path / "c.safetensors", weights=[0.5, 0.5])
    both = load_checkpoint(tmp_path / "c.safetensors")
    assert both.kinds == {"q": "linear"}
    merged = merge_lora(both.state_dict, alpha=both.alpha, layout=both.detect())
    torch.testing.assert_close(merged["q.weight"], w + b @ a, rtol=1e-6, atol=1e-6)  # alpha/rank = 1
    from safetensors.torch import save_file

    save_file({"q.weight": w + b @ a}, tmp_path / "m.safetensors")
    back = unmerge_files(tmp_path / "m.safetensors", path, tmp_path / "u.safetensors", fan_in_fan_out=False)
    torch.testing.assert_close(load_checkpoint(tmp_path / "u.safetensors").state_dict["q.weight"], w,
                               rtol=0, atol=1e-6)
    assert back.report.rows[0].module == "q"


def test_re_check_findings(tmp_path, capsys):
    """The re-check after the reviews: unmerge onto an existing folder points at --base; combine names a model
    given as an adapter; a model_type-only config asks only for the embeddings; --kinds with '.weight' is explained."""
    _pair(tmp_path, _llama)
    b, t, a = str(tmp_path / "base"), str(tmp_path / "tuned"), str(tmp_path / "a")
    assert main(["extract", b, t, a, "--rank", "4", "--quiet"]) == 0
    capsys.readouterr()
    assert main(["unmerge", t, a, b]) == 1
    assert f"{b}: already exists (is it the base? give the base as --base BASE and a new OUT); pass --force" in \
        capsys.readouterr().err
    assert main(["combine", a, t, str(tmp_path / "c")]) == 1
    assert f"{t} is in the standard layout: it holds no LoRA update (combine takes adapters, then OUT)" in \
        capsys.readouterr().err
    for name in ("base", "tuned"):
        config = json.loads((tmp_path / name / "config.json").read_text())
        del config["architectures"]
        (tmp_path / name / "config.json").write_text(json.dumps(config))
    assert main(["extract", b, t, str(tmp_path / "x"), "--rank", "4", "--quiet"]) == 1
    err = capsys.readouterr().err
    assert "model_type gives the rest, so --kinds model.embed_tokens=embedding for each embedding, or --kinds linear" \
           " where none is" in err and "fan-in-fan-out" not in err
    assert main(["extract", b, t, str(tmp_path / "x"), "--rank", "4", "--quiet", "--fan-in-fan-out"]) == 1
    assert "config.json's model_type says which 2-d weights are Conv1D: drop --fan-in-fan-out" in capsys.readouterr().err
    assert main(["extract", b, t, str(tmp_path / "x"), "--rank", "4", "--quiet", "--kinds",
                 "model.embed_tokens.weight=embedding"]) == 1
    assert "check the names: modules, without '.weight'" in capsys.readouterr().err
    assert main(["extract", b, t, str(tmp_path / "x"), "--rank", "4", "--quiet", "--kinds", "linear"]) == 0
    err = capsys.readouterr().err  # the user said 'no embeddings'; the name says otherwise: warned, not decided
    assert "model.embed_tokens looks like an embedding by its name but is taken as linear, as said" in err


def test_kohya_to_another_layout_needs_the_base_for_its_module_names(tmp_path, capsys):
    """Re-check finding: `convert k.safetensors out --to peft` without --base wrote kohya-mangled module names
    (lora_unet_model_layers_0_…) that PEFT refuses and that combine summed as separate modules (exit 0)."""
    _pair(tmp_path, _llama)
    b, k = str(tmp_path / "base"), str(tmp_path / "k.safetensors")
    assert main(["extract", b, str(tmp_path / "tuned"), k, "--to", "kohya", "--others", "report", "--rank", "4",
                 "--quiet"]) == 0
    capsys.readouterr()
    assert main(["convert", k, str(tmp_path / "p"), "--to", "peft"]) == 1
    assert "kohya module names (lora_unet_…) write the model's dots as underscores, so only the base model's names " \
           "tell which module each one is: pass --base BASE" in capsys.readouterr().err
    assert not (tmp_path / "p").exists()
    assert main(["convert", k, str(tmp_path / "p"), "--to", "peft", "--base", b]) == 0
    adapter = load_peft_adapter(tmp_path / "p")
    assert any(key.startswith("base_model.model.model.layers.0.self_attn.q_proj.") for key in adapter.state_dict)


@pytest.mark.parametrize(("flag", "value", "message"), [
    ("--sv-ratio", "2", "argument --sv-ratio: 2 is not in (0, 1]"),  # regression: exit 0, rank 1, 0.76 error
    ("--energy", "1.5", "argument --energy: 1.5 is not in (0, 1]"),
    ("--sv-epsilon", "-1", "argument --sv-epsilon: -1 is negative; give a number ≥ 0"),
])
def test_rank_rules_out_of_range_are_usage_errors(tmp_path, capsys, flag, value, message):
    assert main(["resize", str(tmp_path / "a"), str(tmp_path / "o"), flag, value]) == 2
    assert message in capsys.readouterr().err
    with pytest.raises(LoraCkptError, match=r"^sv_ratio is 2.0, not in \(0, 1\]; it keeps the σ ≥ sv_ratio·σ_max$"):
        RankRule(sv_ratio=2.0)


def test_combine_of_updates_that_cancel_reports_a_zero_update():
    """Hostile review: A − A reported a mean relative error of 1.03 for an update that is zero."""
    sd = _peft_sd(12, 9, 3, 4, torch.float32)
    out = combine_lora([sd, sd], weights=[1.0, -1.0], scales=[{"q": 1.0}] * 2)
    (row,) = out.report.rows
    assert row.rel_error == 0.0 and row.energy == 1.0
    assert any("q: the weighted updates cancel" in n for n in out.report.notes)
    torch.testing.assert_close(_product(out.state_dict, "q", "linear").float(), torch.zeros(12, 9), rtol=0, atol=1e-6)
    half = combine_lora([sd, sd], weights=[1.0, -0.5], scales=[{"q": 1.0}] * 2)  # no cancellation: measured
    assert half.report.rows[0].rel_error < 1e-6 and not any("cancel" in n for n in half.report.notes)
