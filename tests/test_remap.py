import pytest
import torch
from conftest import assert_unchanged, logits, snapshot
from hypothesis import given, settings
from hypothesis import strategies as st

from lora_ckpt import KeyMismatchError, LayoutError, ShapeError, detect_layout, merge_lora, remap_standard_to_lora
from lora_ckpt.testing import assert_state_dict_close, make_gpt, make_state_dict

C_ATTN = "transformer.h.0.attn.c_attn"


@pytest.mark.parametrize("wte_rank", [None, 4])
def test_standard_to_lora_is_bit_identical_with_zero_lora_b(wte_rank):
    plain = make_gpt(seed=1)
    lora = make_gpt(seed=2, attn_rank=8, wte_rank=wte_rank)
    plain_sd = plain.state_dict()
    before = snapshot(plain_sd)
    sd = remap_standard_to_lora(plain_sd, lora.state_dict())
    assert_unchanged(before, plain_sd)
    assert sd[f"{C_ATTN}.main_weight.bias"] is plain_sd[f"{C_ATTN}.bias"]  # biases kept, not copied
    result = lora.load_state_dict(sd, strict=False)
    assert set(result.missing_keys) == detect_layout(lora.state_dict()).factor_keys
    assert result.unexpected_keys == []
    assert torch.equal(logits(lora), logits(plain))


@pytest.mark.parametrize(("src", "dst"), [("module.", ""), ("", "_orig_mod."), ("_orig_mod.module.", "module._orig_mod.")])
def test_prefixes_on_either_side(src, dst):
    lora_sd = {dst + k: v for k, v in make_gpt(attn_rank=4).state_dict().items()}
    out = remap_standard_to_lora(make_state_dict(prefix=src), lora_sd)
    assert f"{dst}{C_ATTN}.main_weight.weight" in out
    assert all(k.startswith(dst) for k in out)


def test_target_may_be_a_layout_or_meta_state_dict():
    with torch.device("meta"):
        target = make_gpt(attn_rank=4).state_dict()
    by_sd = remap_standard_to_lora(make_state_dict(), target)
    by_layout = remap_standard_to_lora(make_state_dict(), detect_layout(target))
    assert list(by_sd) == list(by_layout)


def test_lora_input_is_refused():
    lora = make_gpt(attn_rank=4).state_dict()
    with pytest.raises(LayoutError, match="the input is already a LoRA layout; use lora_ckpt.load_into"):
        remap_standard_to_lora(lora, lora)


def test_unknown_and_missing_keys_are_errors_unless_ignored():
    sd = make_state_dict()
    sd["transformer.h.0.attn.bias"] = torch.ones(1, 1, 16, 16)  # old nanoGPT's causal-mask buffer
    del sd["transformer.ln_f.bias"]
    target = make_gpt(attn_rank=4).state_dict()
    with pytest.raises(
        KeyMismatchError,
        match=r"the target has no key for \['transformer.h.0.attn.bias'\]; the input supplies nothing for "
        r"target key\(s\) \['transformer.ln_f.bias'\]; check the model config, or leave keys out with ignore=",
    ):
        remap_standard_to_lora(sd, target)
    out = remap_standard_to_lora(sd, target, ignore=["*.attn.bias", "transformer.ln_f.bias"])
    assert "transformer.h.0.attn.bias" not in out


def test_shape_mismatch_names_both_keys():
    target = make_gpt(attn_rank=4, n_embd=16).state_dict()
    with pytest.raises(ShapeError, match=rf"{C_ATTN}.weight \(96, 32\) -> {C_ATTN}.main_weight.weight \(48, 16\)"):
        remap_standard_to_lora(make_state_dict(), target)


def test_lora_only_target_cannot_hold_a_full_weight():
    target = make_gpt(wte_rank=4, wte_lora_only=True).state_dict()
    with pytest.raises(LayoutError, match="transformer.wte.weight: the target's transformer.wte is a lora-only embedding"):
        remap_standard_to_lora(make_state_dict(), target)


@settings(max_examples=15, deadline=None)
@given(rank=st.integers(1, 6), wte=st.booleans(), seed=st.integers(0, 1000))
def test_remap_then_merge_gives_the_input_back(rank, wte, seed):
    plain_sd = make_state_dict(seed=seed)
    target = make_gpt(seed=seed + 1, attn_rank=rank, wte_rank=rank if wte else None)
    remapped = remap_standard_to_lora(plain_sd, target.state_dict())
    target.load_state_dict(remapped, strict=False)  # fresh factors, lora_B = 0
    back = merge_lora(target.state_dict(), alpha=16.0)
    assert_state_dict_close(back, plain_sd, rtol=0, atol=0)
