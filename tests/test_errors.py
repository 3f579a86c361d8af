"""Error paths of the layouts, formats and streaming code, each asserted by its message."""

import dataclasses
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
    detect_layout,
    merge_lora,
    save_checkpoint,
    stream_merge,
)
from lora_ckpt.formats.gpt2 import hf_to_nanogpt
from lora_ckpt.formats.hf import load_model_weights, save_model_folder, weight_files
from lora_ckpt.formats.peft import save_peft_adapter
from lora_ckpt.merge import merge_module
from lora_ckpt.testing import make_gpt, make_state_dict


def _peft(**extra):
    sd = {
        "base_model.model.lin.lora_A.weight": torch.zeros(2, 8),
        "base_model.model.lin.lora_B.weight": torch.zeros(6, 2),
    }
    sd.update(extra)
    return sd


def test_layout_errors():
    with pytest.raises(LayoutError, match="unknown layout 'lycoris'; known: nanogpt_lora, peft"):
        detect_layout(_peft(), layout="lycoris")
    live = {"lin.lora_A.default.weight": torch.zeros(2, 8), "lin.lora_B.other.weight": torch.zeros(6, 2)}
    with pytest.raises(LayoutError, match=r"several PEFT adapters \['default', 'other'\]; keep one"):
        detect_layout(live, layout="peft")
    with pytest.raises(ShapeError, match=r"lora_magnitude_vector: DoRA magnitude of shape \(5,\) does not fit lin \(expected \(6,\)\)"):
        detect_layout(_peft(**{"base_model.model.lin.lora_magnitude_vector": torch.ones(5)}))
    with pytest.raises(ShapeError, match=r"lin.lora_B.bias: shape \(5,\) does not fit lin \(expected \(6,\)\)"):
        detect_layout(_peft(**{"base_model.model.lin.lora_B.bias": torch.ones(5)}))
    kohya = {"lora_unet_x.lora_down.weight": torch.zeros(2, 8), "lora_unet_x.lora_up.weight": torch.zeros(6, 2),
             "lora_unet_x.alpha": torch.ones(3)}
    with pytest.raises(LayoutError, match=r"lora_unet_x.alpha: alpha must be a single number, got shape \(3,\)"):
        detect_layout(kohya)


def test_merge_errors():
    base = {"lin.weight": torch.zeros(6, 8)}
    with pytest.raises(KeyMismatchError, match="lin: the adapter has lora_B.bias but the base module has no bias"):
        merge_lora(_peft(**{"base_model.model.lin.lora_B.bias": torch.ones(6)}), alpha=2.0, base=base)
    with pytest.raises(ShapeError, match=r"lin: base weight \(6, 8\) does not fit the adapter's update \(6, 8\) with fan_in_fan_out=True"):
        merge_lora(_peft(), alpha=2.0, base=base, fan_in_fan_out=True)
    kohya = {"lora_unet_proj.lora_down.weight": torch.zeros(2, 8), "lora_unet_proj.lora_up.weight": torch.zeros(6, 2)}
    two = {"a.proj.weight": torch.zeros(6, 8), "b.proj.weight": torch.zeros(6, 8)}
    with pytest.raises(KeyMismatchError, match=r"lora_unet_proj: the kohya name matches several base weights \['a.proj', 'b.proj'\]"):
        merge_lora(kohya, base=two)
    with pytest.raises(LayoutError, match="base must be a standard state dict, got a nanogpt_lora one; merge it first"):
        merge_lora(_peft(), alpha=2.0, base=make_gpt(attn_rank=2).state_dict())
    dora = _peft(**{"base_model.model.lin.lora_magnitude_vector": torch.ones(6)})
    with pytest.raises(LayoutError, match="lin: a DoRA module needs its base weight"):
        merge_module(detect_layout(dora).modules[0], dora, 1.0)


def test_relayout_of_an_adapter_without_its_base():
    with pytest.raises(LayoutError, match="peft holds adapters only and nanogpt_lora keeps base weights beside them; pass base="):
        convert_layout(_peft(), "nanogpt_lora", alpha=2.0)
    with pytest.raises(LayoutError, match="the input is in the standard layout, with no LoRA modules to convert"):
        convert_layout(make_state_dict(), "peft")


def test_model_folder_errors(tmp_path):
    with pytest.raises(CheckpointFileError, match="nothing: no such file or folder"):
        weight_files(tmp_path / "nothing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointFileError, match="empty: no model.safetensors, pytorch_model.bin"):
        weight_files(tmp_path / "empty")
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "model.safetensors.index.json").write_text("{}")
    with pytest.raises(CheckpointFileError, match="model.safetensors.index.json: not a valid index"):
        weight_files(bad)
    (bad / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"w": "model-00001-of-00002.safetensors"}}))
    with pytest.raises(CheckpointFileError, match=r"names shard\(s\) \['model-00001-of-00002.safetensors'\] that are not in"):
        load_model_weights(bad)
    save_model_folder(tmp_path / "out", make_state_dict())
    with pytest.raises(CheckpointFileError, match="out: already exists; pass overwrite=True"):
        save_model_folder(tmp_path / "out", make_state_dict())
    with pytest.raises(CheckpointFileError, match="the folder .*nowhere does not exist"):
        save_model_folder(tmp_path / "nowhere" / "out", make_state_dict())
    with pytest.raises(KeyMismatchError, match="not a GPT-2 state dict: no transformer.wte.weight"):
        hf_to_nanogpt({"model.embed_tokens.weight": torch.zeros(2, 2)})


def test_stream_errors(tmp_path):
    lora = make_gpt(attn_rank=2, randomize=True)
    src = save_checkpoint(tmp_path / "l.safetensors", lora.state_dict(), alpha=4.0)
    with pytest.raises(CheckpointFileError, match="the folder .*missing does not exist"):
        stream_merge(src, tmp_path / "missing" / "o.safetensors")
    broken = tmp_path / "broken.safetensors"
    broken.write_bytes(src.read_bytes()[:200])
    with pytest.raises(CheckpointFileError, match="broken.safetensors: corrupt"):
        stream_merge(broken, tmp_path / "o.safetensors")
    rel = convert_layout(lora.state_dict(), "peft", alpha=4.0)
    save_peft_adapter(tmp_path / "ad", rel.state_dict, alpha=rel.alpha)
    save_checkpoint(tmp_path / "base.safetensors", rel.base)
    with pytest.raises(AlphaError, match="ad: the alpha comes from adapter_config.json; do not pass alpha"):
        stream_merge(tmp_path / "base.safetensors", tmp_path / "o2.safetensors", adapter=tmp_path / "ad", alpha=3.0)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ad", "base.safetensors", "broken.safetensors", "l.safetensors"]


def test_pair_outputs_are_both_written_or_neither(tmp_path, monkeypatch):
    from lora_ckpt.formats.gpt2 import nanogpt_lora_to_peft

    lora = make_gpt(attn_rank=2, randomize=True)
    (tmp_path / "adapter").mkdir()
    (tmp_path / "adapter" / "adapter_config.json").write_text("{}")
    with pytest.raises(CheckpointFileError, match="adapter: already exists; pass overwrite=True"):
        nanogpt_lora_to_peft(lora.state_dict(), tmp_path / "base", tmp_path / "adapter", alpha=4.0, n_head=2)
    assert not (tmp_path / "base").exists()

    def broken(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr("lora_ckpt.formats.peft.write_checkpoint", broken)
    with pytest.raises(OSError, match="disk full"):
        nanogpt_lora_to_peft(lora.state_dict(), tmp_path / "base2", tmp_path / "adapter2", alpha=4.0, n_head=2)
    assert not (tmp_path / "base2").exists() and not (tmp_path / "adapter2").exists()


@dataclasses.dataclass
class GPTConfig:  # build-nanogpt pickles its config dataclass beside the weights
    block_size: int = 16
    n_layer: int = 2


def test_a_pickled_config_class_is_named_with_the_ways_out(tmp_path):
    from lora_ckpt import UnsafeCheckpointError, load_checkpoint
    from lora_ckpt.testing import make_gpt

    path = tmp_path / "model_00050.pt"
    torch.save({"model": make_gpt().state_dict(), "config": GPTConfig(), "step": 50}, path)
    with pytest.raises(UnsafeCheckpointError) as e:
        load_checkpoint(path)
    assert str(e.value) == (
        f"{path}: refusing to load, the pickle needs code beyond tensors and plain containers (weights_only=True "
        f"rejected it; it names {__name__}.GPTConfig, e.g. a config class saved beside the weights); re-save it as "
        "safetensors from a trusted environment, or, if you trust the file, load it yourself with torch.load(path, "
        "weights_only=False) and pass the dict (its 'model' entry), or allow that class first: "
        "torch.serialization.add_safe_globals([GPTConfig])"
    )
    with torch.serialization.safe_globals([GPTConfig]):  # the allow-list way out works as the message says
        ckpt = load_checkpoint(path)
    assert ckpt.extra["config"] == GPTConfig() and ckpt.extra["step"] == 50
