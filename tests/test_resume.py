"""Resuming with another LoRA configuration: standard -> LoRA -> LoRA of another rank -> standard."""

import pytest
import torch
from conftest import logits

from lora_ckpt import (
    KeyMismatchError,
    load_checkpoint,
    load_into,
    named_optimizer_state,
    save_checkpoint,
    transfer_optimizer_state,
)
from lora_ckpt.testing import make_gpt, make_tokens


def _train(model, opt, steps=3, seed=0):
    gen = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(steps):
        idx = torch.randint(64, (2, 9), generator=gen)
        loss = torch.nn.functional.cross_entropy(model(idx[:, :-1]).flatten(0, 1), idx[:, 1:].flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()


def _optimizer(model):
    return torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)


def test_every_direction_preserves_outputs_and_moves_optimizer_state(tmp_path):
    # 1. a standard run
    std = make_gpt(seed=0)
    opt = _optimizer(std)
    _train(std, opt)
    path = save_checkpoint(tmp_path / "std.pt", std.state_dict(), extra={"optimizer": named_optimizer_state(std, opt)})

    # 2. resume it as LoRA rank 4 on c_attn and wte: exact outputs, base moments stay with trainable params
    lora4 = make_gpt(seed=1, attn_rank=4, wte_rank=4, alpha=8.0)
    load_into(lora4, path)
    assert torch.equal(logits(lora4), logits(std))
    opt4 = _optimizer(lora4)
    rep = transfer_optimizer_state(opt4, lora4, load_checkpoint(path).extra["optimizer"])
    assert "transformer.wpe.weight" in rep.transferred and "transformer.h.0.mlp.c_fc.weight" in rep.transferred
    assert "transformer.h.0.attn.c_attn.lora_A.weight" in rep.fresh
    assert "transformer.h.0.attn.c_attn.weight" in rep.dropped  # frozen main weight has no optimizer state
    wpe_state = opt4.state[lora4.transformer.wpe.weight]
    assert torch.equal(wpe_state["exp_avg"], opt.state[std.transformer.wpe.weight]["exp_avg"])
    _train(lora4, opt4, seed=1)
    path4 = save_checkpoint(tmp_path / "lora4.pt", lora4.state_dict(), alpha=8.0,
                            extra={"optimizer": named_optimizer_state(lora4, opt4)})

    # 3. resume as rank 8 on c_attn, rank 4 on wte: c_attn merged into main, wte copied with its moments
    lora8 = make_gpt(seed=2, attn_rank=8, wte_rank=4, alpha=8.0)
    report = load_into(lora8, path4)
    assert "transformer.h.0.attn.c_attn.main_weight.weight" in report.merged
    assert "transformer.wte.lora_A.weight" in report.copied
    torch.testing.assert_close(logits(lora8), logits(lora4))
    opt8 = _optimizer(lora8)
    rep = transfer_optimizer_state(opt8, lora8, load_checkpoint(path4).extra["optimizer"])
    assert "transformer.wte.lora_A.weight" in rep.transferred
    assert "transformer.h.0.attn.c_attn.lora_A.weight" in rep.fresh  # rank 4 moments do not fit rank 8
    assert "transformer.h.0.attn.c_attn.lora_A.weight" in rep.dropped
    _train(lora8, opt8, seed=2)
    path8 = save_checkpoint(tmp_path / "lora8.safetensors", lora8.state_dict(), alpha=8.0)

    # 4. back to standard: everything merged, outputs preserved
    back = make_gpt(seed=3)
    load_into(back, path8, tied="untie")
    torch.testing.assert_close(logits(back), logits(lora8))


def test_index_keyed_state_uses_param_names_or_explicit_names():
    src = make_gpt(seed=0)
    opt = torch.optim.AdamW(src.named_parameters(), lr=1e-2)
    _train(src, opt)
    dst = make_gpt(seed=1, attn_rank=2)
    opt2 = _optimizer(dst)
    rep = transfer_optimizer_state(opt2, dst, opt.state_dict())
    assert "transformer.ln_f.weight" in rep.transferred
    plain_opt = _optimizer(src)
    _train(src, plain_opt)
    with pytest.raises(KeyMismatchError, match="integer keys and no parameter names, so it cannot be matched"):
        transfer_optimizer_state(_optimizer(dst), dst, plain_opt.state_dict())
    names = [n for n, p in src.named_parameters() if p.requires_grad]
    rep = transfer_optimizer_state(_optimizer(dst), dst, plain_opt.state_dict(), names=names)
    assert "transformer.ln_f.weight" in rep.transferred
    with pytest.raises(KeyMismatchError, match="names has 1 entries but the optimizer state has"):
        transfer_optimizer_state(_optimizer(dst), dst, plain_opt.state_dict(), names=["x"])
    with pytest.raises(KeyMismatchError, match="not an optimizer state dict"):
        transfer_optimizer_state(_optimizer(dst), dst, {"weights": 1})
    assert str(rep).startswith("optimizer state: ")


def test_tokens_fixture_and_lora_fixture_from_the_plugin(nanogpt_lora, nanogpt, tokens):
    report = load_into(nanogpt, nanogpt_lora.state_dict(), alpha=16.0, tied="untie")
    assert report.untied == ["lm_head.weight"]
    torch.testing.assert_close(nanogpt(tokens), nanogpt_lora(tokens))
    assert tokens.shape == make_tokens().shape


def test_optimizer_over_parameters_outside_the_model():
    model = make_gpt()
    stranger = torch.nn.Parameter(torch.zeros(3))
    opt = torch.optim.AdamW([*model.parameters(), stranger])
    with pytest.raises(KeyMismatchError, match="the optimizer holds a parameter that is not in the model"):
        transfer_optimizer_state(opt, model, {"state": {}, "param_groups": []})


def test_transfer_leaves_the_saved_state_unchanged_by_later_steps():
    src = make_gpt(seed=0)
    opt = _optimizer(src)
    _train(src, opt)
    saved = named_optimizer_state(src, opt)
    before = {k: {n: t.clone() for n, t in v.items()} for k, v in saved["state"].items()}
    dst = make_gpt(seed=1)
    opt2 = _optimizer(dst)
    transfer_optimizer_state(opt2, dst, saved)
    _train(dst, opt2, seed=5)
    for k, v in saved["state"].items():
        for n, t in v.items():
            assert torch.equal(t, before[k][n]), (k, n)
