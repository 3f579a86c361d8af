import pytest
import torch
from conftest import assert_unchanged, compiled, logits, snapshot

from lora_ckpt import (
    AlphaError,
    KeyMismatchError,
    LayoutError,
    ShapeError,
    TiedWeightError,
    load_into,
    merged_state_dict,
    save_checkpoint,
)
from lora_ckpt.testing import make_gpt

C_ATTN = "transformer.h.0.attn.c_attn"


def _untied(model):
    model.lm_head.weight = torch.nn.Parameter(model.lm_head.weight.detach().clone())
    return model


@pytest.mark.parametrize("prefix", ["", "_orig_mod.", "module.", "module._orig_mod."])
@pytest.mark.parametrize("compile_model", [False, True])
def test_lora_checkpoint_into_standard_model(prefix, compile_model):
    lora = make_gpt(attn_rank=4, randomize=True)
    ckpt = {prefix + k: v for k, v in lora.state_dict().items()}
    before = snapshot(ckpt)
    plain = make_gpt(seed=9)
    target = compiled(plain) if compile_model else plain
    report = load_into(target, ckpt, alpha=16.0)
    assert_unchanged(before, ckpt)
    assert sorted(report.merged) == [f"{C_ATTN}.weight", "transformer.h.1.attn.c_attn.weight"]
    torch.testing.assert_close(logits(target), logits(lora))
    assert plain.lm_head.weight is plain.transformer.wte.weight  # untouched tie: no update landed on it


@pytest.mark.parametrize("prefix", ["", "_orig_mod.", "module._orig_mod."])
def test_standard_checkpoint_into_compiled_lora_model_is_bit_identical(prefix):
    plain = make_gpt(seed=4)
    lora = make_gpt(seed=5, attn_rank=8, wte_rank=2)
    target = compiled(lora)
    report = load_into(target, {prefix + k: v for k, v in plain.state_dict().items()})
    assert f"{C_ATTN}.main_weight.bias" in report.remapped
    assert sorted(report.initialised)[0] == f"{C_ATTN}.lora_A.weight"
    assert torch.equal(logits(lora), logits(plain))


def test_lora_to_lora_copies_matching_modules_and_merges_the_rest():
    src = make_gpt(attn_rank=4, wte_rank=2, alpha=8.0, randomize=True)
    dst = make_gpt(seed=3, attn_rank=6, wte_rank=2, alpha=8.0)
    fresh_a = dst.transformer.h[0].attn.c_attn.lora_A.weight.detach().clone()
    report = load_into(dst, src.state_dict(), alpha=8.0)
    assert "transformer.wte.lora_A.weight" in report.copied
    assert f"{C_ATTN}.main_weight.weight" in report.merged
    assert f"{C_ATTN}.lora_A.weight" in report.initialised
    assert torch.equal(dst.transformer.h[0].attn.c_attn.lora_A.weight, fresh_a)
    torch.testing.assert_close(logits(dst), logits(src))


def test_same_rank_other_alpha_merges_rather_than_copies():
    src = make_gpt(attn_rank=4, alpha=8.0, randomize=True)
    dst = make_gpt(seed=3, attn_rank=4, alpha=16.0)
    report = load_into(dst, src.state_dict(), alpha=8.0)
    assert f"{C_ATTN}.main_weight.weight" in report.merged
    torch.testing.assert_close(logits(dst), logits(src))


def test_tied_conflict_is_an_error_with_both_choices():
    lora = make_gpt(attn_rank=4, wte_rank=2, randomize=True)
    plain = make_gpt(seed=9)
    before = snapshot(plain.state_dict())
    with pytest.raises(
        TiedWeightError,
        match=r"the model ties transformer.wte.weight = lm_head.weight, but the LoRA update merged into "
        r"transformer.wte.weight would be lost, or leak into lm_head.weight; choose tied='untie' .* or tied='tie'",
    ):
        load_into(plain, lora.state_dict(), alpha=16.0)
    assert_unchanged(before, plain.state_dict())  # nothing loaded


def test_tied_untie_gives_the_exact_function():
    lora = make_gpt(attn_rank=4, wte_rank=2, randomize=True)
    plain = make_gpt(seed=9)
    report = load_into(plain, lora.state_dict(), alpha=16.0, tied="untie")
    assert report.untied == ["lm_head.weight"]
    assert plain.lm_head.weight is not plain.transformer.wte.weight
    torch.testing.assert_close(logits(plain), logits(lora))


def test_tied_tie_loads_the_merged_weight_into_the_shared_parameter():
    lora = make_gpt(attn_rank=4, wte_rank=2, randomize=True)
    expected = merged_state_dict(lora)["transformer.wte.weight"]
    plain = make_gpt(seed=9)
    load_into(plain, lora.state_dict(), alpha=16.0, tied="tie")
    assert plain.lm_head.weight is plain.transformer.wte.weight
    assert torch.equal(plain.lm_head.weight, expected)


def test_tied_model_given_two_different_plain_values():
    sd = make_gpt().state_dict()
    sd["lm_head.weight"] = sd["lm_head.weight"] + 1
    with pytest.raises(TiedWeightError, match="the checkpoint holds different values for them; choose tied='untie'"):
        load_into(make_gpt(seed=2), sd)
    with pytest.raises(TiedWeightError):
        load_into(make_gpt(seed=2), sd, tied="tie")
    model = make_gpt(seed=2)
    load_into(model, sd, tied="untie")
    assert torch.equal(model.lm_head.weight, sd["lm_head.weight"])


def test_strict_missing_and_unused_keys_and_ignore():
    sd = make_gpt(attn_rank=4).state_dict()
    del sd["transformer.ln_f.weight"]
    sd["transformer.h.0.attn.bias"] = torch.ones(1, 1, 16, 16)
    model = make_gpt(seed=1)
    with pytest.raises(
        KeyMismatchError,
        match=r"the checkpoint supplies nothing for model key\(s\) \['transformer.ln_f.weight'\]; the model has no "
        r"place for checkpoint key\(s\) \['transformer.h.0.attn.bias'\] \(nanogpt_lora checkpoint -> standard model\)",
    ):
        load_into(model, sd, alpha=1.0)
    report = load_into(model, sd, alpha=1.0, ignore=["*.attn.bias", "transformer.ln_f.weight"])
    assert sorted(report.ignored) == ["transformer.h.0.attn.bias", "transformer.ln_f.weight"]


def test_shape_mismatch():
    with pytest.raises(ShapeError, match=r"shapes differ: transformer.wpe.weight: checkpoint \(32, 32\) vs model \(16, 32\)"):
        load_into(make_gpt(), make_gpt(block_size=32).state_dict())


def test_alpha_missing_or_conflicting(tmp_path):
    lora = make_gpt(attn_rank=4, randomize=True, alpha=8.0)
    with pytest.raises(AlphaError, match="alpha is not known"):
        load_into(make_gpt(), lora.state_dict())
    ckpt = {"model": lora.state_dict(), "model_args": {"lora_alpha": 8.0}}
    load_into(make_gpt(), ckpt)  # the recorded alpha is used
    path = save_checkpoint(tmp_path / "l.pt", lora.state_dict(), alpha=8.0)
    with pytest.raises(AlphaError, match=r"alpha=4 conflicts with alpha 8 recorded in .*l.pt \(lora_ckpt metadata\); drop the alpha"):
        load_into(make_gpt(), path, alpha=4.0)


def test_lora_only_embedding_model_cannot_take_another_rank_or_a_full_weight():
    with pytest.raises(LayoutError, match="transformer.wte: the model's lora-only embedding \\(rank 4\\) cannot hold"):
        load_into(make_gpt(wte_rank=4, wte_lora_only=True), make_gpt(wte_rank=2, wte_lora_only=True).state_dict(), alpha=1.0)
    with pytest.raises(LayoutError, match="transformer.wte.weight: the model's transformer.wte is a lora-only embedding"):
        load_into(make_gpt(wte_rank=4, wte_lora_only=True), make_gpt().state_dict())


def test_merged_state_dict_leaves_the_live_model_unchanged():
    lora = make_gpt(attn_rank=4, wte_rank=2, randomize=True)
    before = snapshot(lora.state_dict())
    out = merged_state_dict(compiled(lora))
    assert_unchanged(before, lora.state_dict())
    assert all(v.device.type == "cpu" for v in out.values())
    assert not any("lora_" in k or "_orig_mod" in k for k in out)
    plain = _untied(make_gpt(seed=9))
    plain.load_state_dict(out)
    torch.testing.assert_close(logits(plain), logits(lora))


def test_bad_tied_option():
    with pytest.raises(ValueError, match="tied must be 'error', 'untie' or 'tie', got 'x'"):
        load_into(make_gpt(), make_gpt().state_dict(), tied="x")  # type: ignore[arg-type]


def test_report_renders_as_text_and_html():
    report = load_into(make_gpt(attn_rank=4), make_gpt().state_dict())
    text, html = str(report), report._repr_html_()
    assert text.startswith("standard checkpoint -> nanogpt_lora model\naction")
    assert "remapped     4" in text
    assert "<td>remapped</td><td>4</td>" in html
