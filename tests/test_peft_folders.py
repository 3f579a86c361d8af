"""PEFT adapter folders written and read by lora_ckpt (no peft needed): config handling and bad input."""

import json

import pytest
import torch

from lora_ckpt import (
    AlphaError,
    CheckpointFileError,
    KeyMismatchError,
    LayoutError,
    ShapeError,
    convert_layout,
    merge_adapter,
    merge_lora,
)
from lora_ckpt.formats.peft import load_peft_adapter, pattern_key, save_peft_adapter
from lora_ckpt.testing import assert_state_dict_close, make_gpt


@pytest.fixture
def adapter(tmp_path):
    sd = make_gpt(attn_rank=4, alpha=8.0, randomize=True).state_dict()
    rel = convert_layout(sd, "peft", alpha=8.0)
    save_peft_adapter(tmp_path / "adapter", rel.state_dict, alpha=rel.alpha)
    return sd, rel, tmp_path / "adapter"


def _edit_config(folder, **changes):
    path = folder / "adapter_config.json"
    config = json.loads(path.read_text())
    config.update(changes)
    path.write_text(json.dumps(config))


def test_round_trip_through_a_folder(adapter):
    sd, rel, folder = adapter
    merged = merge_adapter(rel.base, folder)
    assert_state_dict_close(merged, merge_lora(sd, alpha=8.0), rtol=0, atol=0)


def test_pattern_key_follows_peft():
    assert pattern_key(["c_proj", "h.1.attn.c_attn"], "transformer.h.1.attn.c_attn") == "h.1.attn.c_attn"
    assert pattern_key(["attn"], "transformer.h.1.attn.c_attn") is None  # must match the end
    assert pattern_key(["c_attn", "h.1.attn.c_attn"], "transformer.h.1.attn.c_attn") == "c_attn"  # first wins
    assert pattern_key([r"h\.\d\.attn\.c_attn"], "transformer.h.0.attn.c_attn") is not None


def test_rslora_scale(adapter):
    sd, rel, folder = adapter
    _edit_config(folder, use_rslora=True)
    scales = load_peft_adapter(folder).scales
    assert scales["transformer.h.0.attn.c_attn"] == pytest.approx(8.0 / 2.0)  # alpha / sqrt(4)


def test_config_rank_disagrees_with_tensors(adapter):
    _, _, folder = adapter
    _edit_config(folder, rank_pattern={"h.1.attn.c_attn": 8})
    with pytest.raises(ShapeError, match="transformer.h.1.attn.c_attn: the config says rank 8, the tensors have rank 4"):
        load_peft_adapter(folder)


def test_missing_config_or_weights_or_bad_json(adapter, tmp_path):
    _, _, folder = adapter
    (folder / "adapter_model.safetensors").rename(tmp_path / "w.safetensors")
    with pytest.raises(CheckpointFileError, match="adapter: no adapter_model.safetensors or adapter_model.bin"):
        load_peft_adapter(folder)
    (folder / "adapter_config.json").write_text("{not json")
    with pytest.raises(CheckpointFileError, match="adapter_config.json: the adapter config is not valid UTF-8 JSON"):
        load_peft_adapter(folder)
    (folder / "adapter_config.json").unlink()
    with pytest.raises(CheckpointFileError, match=r"adapter: no model.safetensors, .* or adapter_config.json in this folder"):
        load_peft_adapter(folder)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"peft_type": "IA3"}, "peft_type 'IA3' is not LoRA"),
        ({"target_parameters": ["experts.gate_up_proj"]}, r"target_parameters \['experts.gate_up_proj'\] .*is not supported"),
        ({"lora_alpha": None}, "the PEFT config has no 'r' or 'lora_alpha'"),
    ],
)
def test_unsupported_configs_are_named(adapter, change, message):
    _, _, folder = adapter
    _edit_config(folder, **change)
    with pytest.raises((LayoutError, AlphaError), match=message):
        load_peft_adapter(folder)


def test_config_naming_modules_absent_from_the_base(adapter):
    _, rel, folder = adapter
    small = {k: v for k, v in rel.base.items() if ".h.1." not in k}
    with pytest.raises(KeyMismatchError, match="transformer.h.1.attn.c_attn: the base has no weight"):
        merge_adapter(small, folder)


def test_alpha_argument_with_a_peft_folder(adapter):
    _, rel, folder = adapter
    with pytest.raises(AlphaError, match="the alpha comes from adapter_config.json; do not pass alpha"):
        merge_adapter(rel.base, folder, alpha=3.0)


def test_existing_adapter_folder_is_not_overwritten(adapter):
    _, rel, folder = adapter
    with pytest.raises(CheckpointFileError, match="adapter: already exists; pass overwrite=True"):
        save_peft_adapter(folder, rel.state_dict, alpha=rel.alpha)


def test_adapter_entries_the_base_lacks(adapter):
    _, rel, folder = adapter
    sd = dict(rel.state_dict)
    sd["base_model.model.score.weight"] = torch.zeros(2, 32)
    with pytest.raises(KeyMismatchError, match=r"the adapter holds \['base_model.model.score.weight'\], which the base does not have"):
        merge_lora(sd, alpha=rel.alpha, base=rel.base)
