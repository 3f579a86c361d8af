"""Names are the same everywhere: dtype strings wherever a dtype is taken, layout names in Python and on the CLI."""

import pytest
import torch

from lora_ckpt import convert_layout, merge_adapter, merge_files, merge_lora, merged_state_dict, save_checkpoint, stream_merge
from lora_ckpt.dtypes import as_dtype
from lora_ckpt.layout import LAYOUT_ALIASES, LAYOUTS, layout_spec
from lora_ckpt.testing import assert_state_dict_close, make_gpt


@pytest.fixture
def lora():
    return make_gpt(attn_rank=4, wte_rank=2, alpha=8.0, randomize=True)


@pytest.mark.parametrize("name", ["bf16", "bfloat16", "torch.bfloat16", "BF16"])
def test_dtype_strings_everywhere(lora, tmp_path, name):
    sd = lora.state_dict()
    ref = merge_lora(sd, alpha=8.0, dtype=torch.bfloat16)
    assert_state_dict_close(merge_lora(sd, alpha=8.0, dtype=name), ref, rtol=0, atol=0)
    assert_state_dict_close(merged_state_dict(lora, dtype=name), merged_state_dict(lora, dtype=torch.bfloat16),
                            rtol=0, atol=0)
    src = save_checkpoint(tmp_path / "lora.safetensors", sd, alpha=8.0)
    stream_merge(src, tmp_path / "s.safetensors", dtype=name)
    merge_files(src, tmp_path / "f.safetensors", dtype=name)
    from lora_ckpt import load_checkpoint

    for out in ("s", "f"):
        got = load_checkpoint(tmp_path / f"{out}.safetensors").state_dict
        assert {v.dtype for v in got.values()} == {torch.bfloat16}
        assert_state_dict_close(got, ref, rtol=0, atol=0)
    rel = convert_layout(sd, "peft", alpha=8.0)
    assert_state_dict_close(merge_adapter(rel.base, rel.state_dict, alpha=8.0, dtype=name),
                            merge_adapter(rel.base, rel.state_dict, alpha=8.0, dtype=torch.bfloat16), rtol=0, atol=0)


def test_bad_dtypes_say_what_is_accepted(lora):
    with pytest.raises(ValueError, match=r"dtype='int8': not a dtype lora_ckpt knows; give a torch.dtype or one of "
                                         r"'fp32', 'float32', 'float', 'bf16'"):
        merge_lora(lora.state_dict(), alpha=8.0, dtype="int8")
    with pytest.raises(ValueError, match=r"dtype=torch.int64: not a floating-point dtype"):
        as_dtype(torch.int64)


def test_layout_names_are_the_same_in_python_and_on_the_cli(lora):
    from lora_ckpt.cli import _LAYOUT_NAMES

    assert set(_LAYOUT_NAMES) == {"standard", *LAYOUTS, *LAYOUT_ALIASES}
    sd = lora.state_dict()
    alias = convert_layout(sd, "nanogpt", alpha=8.0)
    assert_state_dict_close(alias.state_dict, convert_layout(sd, "nanogpt_lora", alpha=8.0).state_dict, rtol=0, atol=0)
    with pytest.raises(Exception, match=r"unknown layout 'lycoris'; known: nanogpt_lora, peft, torchtune, loralib, "
                                        r"minlora, kohya, nanogpt"):
        layout_spec("lycoris")
