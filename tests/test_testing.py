"""lora_ckpt.testing: the helpers other projects use must fail loudly."""

import pytest
import torch

from lora_ckpt.testing import assert_state_dict_close, make_gpt, make_lora_state_dict, make_state_dict, randomize_lora


def test_assert_state_dict_close_names_keys_and_values():
    a = make_state_dict()
    b = dict(a)
    del b["lm_head.weight"]
    with pytest.raises(AssertionError, match=r"keys differ: missing \['lm_head.weight'\], unexpected \[\]"):
        assert_state_dict_close(b, a)
    c = {**a, "transformer.ln_f.bias": a["transformer.ln_f.bias"] + 1e-3}
    with pytest.raises(AssertionError, match="^transformer.ln_f.bias: "):
        assert_state_dict_close(c, a, rtol=0, atol=0)
    assert_state_dict_close(c, a, rtol=0, atol=2e-3)


def test_factories_are_seeded_and_randomize_only_touches_factors():
    assert_state_dict_close(make_lora_state_dict(rank=3, seed=4), make_lora_state_dict(rank=3, seed=4), rtol=0, atol=0)
    model = make_gpt(attn_rank=2)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    randomize_lora(model, seed=3)
    changed = {k for k, v in model.state_dict().items() if not torch.equal(v, before[k])}
    assert changed == {f"transformer.h.{i}.attn.c_attn.lora_{x}.weight" for i in (0, 1) for x in "AB"}


def test_the_pytest_plugin_imports_no_torch():
    import subprocess
    import sys

    code = "import sys, lora_ckpt.pytest_plugin; print('torch' in sys.modules)"
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert res.stdout.strip() == "False"


def test_fixtures_share_their_base_weights(nanogpt, nanogpt_lora, lora_state_dict):
    """``nanogpt_lora`` is ``nanogpt`` with adapters: every base weight is equal, as the fixtures' docs say."""
    plain = nanogpt.state_dict()
    for sd in (nanogpt_lora.state_dict(), lora_state_dict):
        bases = {k.replace(".main_weight.", "."): v for k, v in sd.items() if ".lora_" not in k}
        assert set(bases) == set(plain)
        for k, v in plain.items():
            assert torch.equal(bases[k], v), k
