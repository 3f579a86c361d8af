import math

import pytest
import torch
from conftest import assert_unchanged, logits, snapshot
from hypothesis import given, settings
from hypothesis import strategies as st

from lora_ckpt import AlphaError, LayoutError, detect_layout, merge_lora
from lora_ckpt.testing import assert_state_dict_close, make_gpt, make_lora_state_dict

C_ATTN = "transformer.h.0.attn.c_attn"


def test_golden_linear_and_embedding():
    sd = {
        "lin.main_weight.weight": torch.tensor([[1.0, 2.0], [3.0, 4.0]]),
        "lin.main_weight.bias": torch.tensor([0.5, -0.5]),
        "lin.lora_A.weight": torch.tensor([[1.0, 0.5]]),  # (r=1, in=2)
        "lin.lora_B.weight": torch.tensor([[2.0], [-1.0]]),  # (out=2, r=1)
        "emb.main_weight.weight": torch.zeros(3, 2),
        "emb.lora_A.weight": torch.tensor([[1.0], [2.0], [0.0]]),  # (vocab=3, r=1)
        "emb.lora_B.weight": torch.tensor([[1.0], [-1.0]]),  # (dim=2, r=1)
    }
    out = merge_lora(sd, alpha={"lin": 2.0, "emb": 1.0})
    assert list(out) == ["lin.weight", "lin.bias", "emb.weight"]
    assert torch.equal(out["lin.weight"], torch.tensor([[5.0, 4.0], [1.0, 3.0]]))  # W + 2 * B @ A
    assert torch.equal(out["emb.weight"], torch.tensor([[1.0, -1.0], [2.0, -2.0], [0.0, 0.0]]))  # A @ B.T
    assert out["lin.bias"] is sd["lin.main_weight.bias"]


@pytest.mark.parametrize("rank", [1, 4, 8])
@pytest.mark.parametrize("wte_rank", [None, 2])
def test_merged_model_matches_lora_model_fp32(rank, wte_rank):
    lora = make_gpt(attn_rank=rank, wte_rank=wte_rank, alpha=16.0, randomize=True)
    merged = merge_lora(lora.state_dict(), alpha=16.0)
    plain = make_gpt(seed=7)
    plain.lm_head.weight = torch.nn.Parameter(plain.lm_head.weight.detach().clone())  # the merge unties wte
    plain.load_state_dict(merged, strict=True)
    torch.testing.assert_close(logits(plain), logits(lora))


@pytest.mark.parametrize("rank", [2, 8])
def test_merged_model_matches_lora_model_bf16(rank):
    lora = make_gpt(attn_rank=rank, wte_rank=2, alpha=8.0, randomize=True, dtype=torch.bfloat16)
    merged = merge_lora(lora.state_dict(), alpha=8.0)
    assert all(v.dtype == torch.bfloat16 for v in merged.values())
    plain = make_gpt(seed=7, dtype=torch.bfloat16)
    plain.lm_head.weight = torch.nn.Parameter(plain.lm_head.weight.detach().clone())
    plain.load_state_dict(merged, strict=True)
    # bf16 forward passes round differently; the comparison is of the same function at bf16 precision
    torch.testing.assert_close(logits(plain).float(), logits(lora).float(), rtol=2e-2, atol=2e-2)


def _ulp_distance_ok(merged: torch.Tensor, reference: torch.Tensor) -> bool:
    up = torch.nextafter(merged, torch.full_like(merged, math.inf)).double()
    down = torch.nextafter(merged, torch.full_like(merged, -math.inf)).double()
    m = merged.double()
    return bool(((reference >= down) & (reference <= up)).all() & ((reference - m).abs() <= (up - down)).all())


def test_bf16_merge_is_within_one_ulp_of_float64_reference():
    sd = make_lora_state_dict(rank=8, wte_rank=4, seed=5)
    sd = {k: (v * 7).to(torch.bfloat16) for k, v in sd.items()}  # larger updates, more rounding to get wrong
    out = merge_lora(sd, alpha=16.0)
    for name, rank, delta in [
        (C_ATTN, 8, lambda a, b: b @ a),
        ("transformer.wte", 4, lambda a, b: a @ b.T),
    ]:
        a, b = sd[f"{name}.lora_A.weight"].double(), sd[f"{name}.lora_B.weight"].double()
        reference = sd[f"{name}.main_weight.weight"].double() + (16.0 / rank) * delta(a, b)
        assert _ulp_distance_ok(out[f"{name}.weight"], reference), name
        # a bf16 merge that rounds twice (update, then sum) is not within 1 ulp everywhere
    naive = sd[f"{C_ATTN}.main_weight.weight"] + 2.0 * (sd[f"{C_ATTN}.lora_B.weight"] @ sd[f"{C_ATTN}.lora_A.weight"])
    a, b = sd[f"{C_ATTN}.lora_A.weight"].double(), sd[f"{C_ATTN}.lora_B.weight"].double()
    reference = sd[f"{C_ATTN}.main_weight.weight"].double() + 2.0 * (b @ a)
    assert not _ulp_distance_ok(naive, reference)


def test_input_is_not_changed_and_untouched_entries_are_shared():
    sd = make_lora_state_dict(rank=4, wte_rank=2, prefix="_orig_mod.")
    before = snapshot(sd)
    out = merge_lora(sd, alpha=4.0)
    assert_unchanged(before, sd)
    assert out["transformer.wpe.weight"] is sd["_orig_mod.transformer.wpe.weight"]
    assert out[f"{C_ATTN}.bias"] is sd[f"_orig_mod.{C_ATTN}.main_weight.bias"]


def test_tied_untie_keeps_the_base_head_and_tie_shares_the_merged_weight():
    sd = make_lora_state_dict(rank=4, wte_rank=2)
    untied = merge_lora(sd, alpha=4.0)
    assert untied["lm_head.weight"] is sd["lm_head.weight"]
    assert not torch.equal(untied["transformer.wte.weight"], sd["lm_head.weight"])
    tied = merge_lora(sd, alpha=4.0, tied="tie")
    assert tied["lm_head.weight"] is tied["transformer.wte.weight"]
    assert torch.equal(tied["transformer.wte.weight"], untied["transformer.wte.weight"])
    assert detect_layout(tied).tied == (("transformer.wte.weight", "lm_head.weight"),)
    with pytest.raises(ValueError, match="tied must be 'untie' or 'tie', got 'both'"):
        merge_lora(sd, alpha=4.0, tied="both")  # type: ignore[arg-type]


def test_rank_zero_needs_no_alpha_and_lora_only_embedding_merges_to_a_full_weight():
    model = make_gpt(attn_rank=0, wte_rank=3, wte_lora_only=True, alpha=6.0)
    sd = model.state_dict()
    with pytest.raises(AlphaError, match=r"not known for 1 module\(s\) \(transformer.wte\)"):
        merge_lora(sd)
    out = merge_lora(sd, alpha=6.0)
    expected = 2.0 * sd["transformer.wte.lora_A.weight"] @ sd["transformer.wte.lora_B.weight"].T
    torch.testing.assert_close(out["transformer.wte.weight"], expected)
    assert list(out)[0] == "transformer.wte.weight"
    assert out[f"{C_ATTN}.weight"] is sd[f"{C_ATTN}.main_weight.weight"]
    plain = make_gpt(seed=3)
    plain.lm_head.weight = torch.nn.Parameter(plain.lm_head.weight.detach().clone())
    plain.load_state_dict(out)
    torch.testing.assert_close(logits(plain), logits(model))


def test_per_module_alpha_and_dtype():
    sd = make_lora_state_dict(rank=4)
    alphas = {C_ATTN: 4.0, "transformer.h.1.attn.c_attn": 8.0}
    out = merge_lora(sd, alpha=alphas, dtype=torch.bfloat16)
    assert all(v.dtype == torch.bfloat16 for v in out.values())
    one = merge_lora(sd, alpha=8.0)
    torch.testing.assert_close(out["transformer.h.1.attn.c_attn.weight"], one["transformer.h.1.attn.c_attn.weight"].bfloat16())


def test_alpha_errors():
    sd = make_lora_state_dict(rank=4)
    with pytest.raises(AlphaError, match=r"alpha is not known for 2 module\(s\) .*pass alpha=<float>.*model_args'\]\['lora_alpha'\]"):
        merge_lora(sd)
    with pytest.raises(AlphaError, match=r"no alpha for module\(s\) \['transformer.h.1.attn.c_attn'\]; alpha given for unknown module\(s\) \['h.1'\]"):
        merge_lora(sd, alpha={C_ATTN: 1.0, "h.1": 2.0})
    with pytest.raises(AlphaError, match="alpha must be a finite number"):
        merge_lora(sd, alpha=math.nan)


def test_standard_input_has_nothing_to_merge():
    with pytest.raises(LayoutError, match="already in the standard layout: it has no LoRA modules to merge"):
        merge_lora(make_gpt().state_dict(), alpha=1.0)


_shapes = st.tuples(st.integers(1, 40), st.integers(1, 40), st.integers(1, 6))


@settings(max_examples=40, deadline=None)
@given(shape=_shapes, seed=st.integers(0, 2**16), dtype=st.sampled_from([torch.float32, torch.bfloat16, torch.float16]))
def test_zero_lora_b_merges_to_the_base_weight_bit_for_bit(shape, seed, dtype):
    out_f, in_f, r = shape
    in_f += r + 1  # never square with the rank: such shapes also fit an embedding (see test_layout)
    g = torch.Generator().manual_seed(seed)
    sd = {
        "m.main_weight.weight": torch.randn(out_f, in_f, generator=g).to(dtype),
        "m.lora_A.weight": torch.randn(r, in_f, generator=g).to(dtype),
        "m.lora_B.weight": torch.zeros(out_f, r, dtype=dtype),
    }
    merged = merge_lora(sd, alpha=float(r) * 3)
    assert merged["m.weight"].dtype == dtype
    assert torch.equal(merged["m.weight"], sd["m.main_weight.weight"])


@settings(max_examples=30, deadline=None)
@given(shape=_shapes, seed=st.integers(0, 2**16), prefix=st.sampled_from(["_orig_mod.", "module.", "module._orig_mod."]))
def test_merge_commutes_with_wrapper_prefixes_and_matches_float64(shape, seed, prefix):
    out_f, in_f, r = shape
    g = torch.Generator().manual_seed(seed)
    sd = {
        "h.0.c.main_weight.weight": torch.randn(out_f, in_f + r + 1, generator=g),
        "h.0.c.lora_A.weight": torch.randn(r, in_f + r + 1, generator=g),
        "h.0.c.lora_B.weight": torch.randn(out_f, r, generator=g),
    }
    plain = merge_lora(sd, alpha=2.0)
    wrapped = merge_lora({prefix + k: v for k, v in sd.items()}, alpha=2.0)
    assert_state_dict_close(wrapped, plain, rtol=0, atol=0)
    ref = sd["h.0.c.main_weight.weight"].double() + (2.0 / r) * sd["h.0.c.lora_B.weight"].double() @ sd["h.0.c.lora_A.weight"].double()
    torch.testing.assert_close(plain["h.0.c.weight"].double(), ref, rtol=1e-6, atol=1e-5)
