"""Streaming conversions: the same files as the in-memory conversions, models that compute the same, atomic."""

import hashlib

import pytest
import torch
from conftest import logits

from lora_ckpt import (
    CheckpointFileError,
    LayoutError,
    convert_layout,
    load_checkpoint,
    load_into,
    merge_adapter,
    merge_lora,
    save_checkpoint,
    stream_convert,
)
from lora_ckpt.cli import main
from lora_ckpt.convert import convert_state_dict, fresh_factors
from lora_ckpt.layout import detect_layout
from lora_ckpt.streaming import StreamOptions
from lora_ckpt.testing import assert_state_dict_close, make_gpt


def _digest(path):
    files = sorted(path.rglob("*")) if path.is_dir() else [path]
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in files if p.is_file()}


@pytest.fixture(params=[".pt", ".safetensors"])
def lora_file(request, tmp_path):
    """A nanoGPT LoRA checkpoint (rank 4 on c_attn, 2 on the tied wte) behind torch.compile's prefix."""
    model = make_gpt(attn_rank=4, wte_rank=2, alpha=8.0, randomize=True)
    sd = {f"_orig_mod.{k}": v for k, v in model.state_dict().items()}
    return model, save_checkpoint(tmp_path / f"lora{request.param}", sd, alpha=8.0,
                                  extra={"model_args": {"n_layer": 2, "lora_rank": 4}})


@pytest.mark.parametrize("to", ["torchtune", "loralib", "minlora"])
def test_to_a_layout_gives_the_in_memory_result(lora_file, tmp_path, to):
    _, path = lora_file
    model = make_gpt(attn_rank=4, alpha=8.0, randomize=True)  # no wte update: these layouts have no embeddings
    path = save_checkpoint(tmp_path / f"nowte{path.suffix}", model.state_dict(), alpha=8.0)
    before = _digest(path)
    report = stream_convert(path, tmp_path / "out.safetensors", to=to)
    expected = convert_layout(load_checkpoint(path).state_dict, to, alpha=8.0)
    got = load_checkpoint(report.files[0])
    assert list(got.state_dict) == list(expected.state_dict)
    assert_state_dict_close(got.state_dict, expected.state_dict, rtol=0, atol=0)
    assert got.alpha == expected.alpha
    assert got.state_dict["lm_head.weight"] is got.state_dict["transformer.wte.weight"]  # stored once, tied on load
    plain = make_gpt(seed=9)
    plain.load_state_dict(merge_lora(got.state_dict, alpha=got.alpha))
    torch.testing.assert_close(logits(plain), logits(model))
    assert _digest(path) == before


def test_to_nanogpt_keeps_ties_alpha_and_model_args(lora_file, tmp_path):
    model, path = lora_file
    report = stream_convert(path, tmp_path / "out.safetensors", to="nanogpt_lora")
    got = load_checkpoint(report.files[0])
    expected = convert_layout(load_checkpoint(path).state_dict, "nanogpt_lora", alpha=8.0).state_dict
    assert list(got.state_dict) == list(expected)  # the torch.compile prefix is dropped, as in memory
    assert_state_dict_close(got.state_dict, expected, rtol=0, atol=0)
    assert got.state_dict["lm_head.weight"] is got.state_dict["transformer.wte.main_weight.weight"]
    assert got.extra["model_args"] == {"n_layer": 2, "lora_rank": 4} and got.alpha is not None
    lora = make_gpt(seed=3, attn_rank=4, wte_rank=2, alpha=8.0)
    load_into(lora, report.files[0])
    torch.testing.assert_close(logits(lora), logits(model))


def test_to_peft_streams_the_base_apart(lora_file, tmp_path):
    model, path = lora_file
    nowte = make_gpt(attn_rank=4, alpha=8.0, randomize=True)
    path = save_checkpoint(tmp_path / f"nowte{path.suffix}", nowte.state_dict(), alpha=8.0)
    report = stream_convert(path, tmp_path / "adapter", to="peft", base_out=tmp_path / "base", max_shard_size="40KB")
    shards = sorted(p.name for p in (tmp_path / "base").iterdir())
    assert "model.safetensors.index.json" in shards and len(shards) > 2
    assert (tmp_path / "adapter" / "adapter_config.json").is_file() and tmp_path / "adapter" in report.files
    merged = merge_adapter(tmp_path / "base", tmp_path / "adapter")
    assert_state_dict_close(merged, merge_lora(nowte.state_dict(), alpha=8.0), rtol=0, atol=0)
    plain = make_gpt(seed=9)
    plain.load_state_dict(merged)
    torch.testing.assert_close(logits(plain), logits(nowte))


def test_like_a_template_from_standard_matches_load_into(tmp_path):
    standard = make_gpt(seed=2)
    src = save_checkpoint(tmp_path / "std.safetensors", standard.state_dict())
    template = save_checkpoint(tmp_path / "template.pt", make_gpt(attn_rank=4, wte_rank=2, alpha=8.0).state_dict(),
                               alpha=8.0)
    report = stream_convert(src, tmp_path / "lora.safetensors", like=template, seed=7)
    assert report.conversion is not None and len(report.conversion.remapped) > 0 and not report.merged
    got = load_checkpoint(report.files[0])
    t_layout = detect_layout(load_checkpoint(template).state_dict)
    conversion = convert_state_dict(load_checkpoint(src), t_layout, target_alpha=8.0)
    expected = {**conversion.values, **fresh_factors(t_layout, conversion.report.initialised, seed=7)}
    assert_state_dict_close(got.state_dict, {k: expected[k] for k in t_layout.shapes}, rtol=0, atol=0)
    lora = make_gpt(seed=5, attn_rank=4, wte_rank=2, alpha=8.0)
    lora.load_state_dict(got.state_dict)  # strict: every key of the LoRA model, and nothing else
    torch.testing.assert_close(logits(lora), logits(standard), rtol=0, atol=0)  # fresh B = 0: the same function


def test_like_a_template_of_another_rank_merges_block_by_block(lora_file, tmp_path, monkeypatch):
    model, path = lora_file
    template = save_checkpoint(tmp_path / "r8.safetensors", make_gpt(attn_rank=8, wte_rank=2, alpha=8.0).state_dict(),
                               alpha=8.0)
    options = StreamOptions(block_bytes=4096)  # several blocks per merged weight
    report = stream_convert(path, tmp_path / "r8-lora.safetensors", like=template, options=options)
    assert report.merged == ["transformer.h.0.attn.c_attn.main_weight.weight", "transformer.h.1.attn.c_attn.main_weight.weight"]
    got = load_checkpoint(report.files[0])
    assert got.extra["model_args"] == {"n_layer": 2}  # the source's lora_* entries would be wrong here
    t_layout = detect_layout(load_checkpoint(template).state_dict)
    conversion = convert_state_dict(load_checkpoint(path), t_layout, target_alpha=8.0)
    for key in report.merged:
        torch.testing.assert_close(got.state_dict[key], conversion.values[key], rtol=0, atol=0)
    lora = make_gpt(seed=5, attn_rank=8, wte_rank=2, alpha=8.0)
    lora.load_state_dict(got.state_dict)
    torch.testing.assert_close(logits(lora), logits(model))  # the rank-4 update now lives in main_weight


def test_cli_streams_safetensors_and_keeps_pickles_in_memory(lora_file, tmp_path, capsys):
    model, path = lora_file
    template = save_checkpoint(tmp_path / "t.pt", make_gpt(attn_rank=4, wte_rank=2, alpha=8.0).state_dict(), alpha=8.0)
    std = tmp_path / "std.safetensors"
    assert main(["merge", str(path), str(std), "--quiet"]) == 0
    assert main(["convert", str(std), str(tmp_path / "s.safetensors"), "--to", "nanogpt", "--like", str(template),
                 "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "B streamed" in out and "standard checkpoint -> nanogpt_lora model" in out  # kB, MB or GB
    assert main(["convert", str(std), str(tmp_path / "m.pt"), "--to", "nanogpt", "--like", str(template)]) == 0
    assert "B streamed" not in capsys.readouterr().out
    assert_state_dict_close(load_checkpoint(tmp_path / "s.safetensors").state_dict,
                            load_checkpoint(tmp_path / "m.pt").state_dict, rtol=0, atol=0)


def test_errors_name_the_fix(lora_file, tmp_path):
    _, path = lora_file
    with pytest.raises(LayoutError, match=r"give the target layout \(to=...\) or a template checkpoint \(like=...\)"):
        stream_convert(path, tmp_path / "o.safetensors")
    with pytest.raises(LayoutError, match="unknown layout 'nowhere'; known: nanogpt_lora, peft"):
        stream_convert(path, tmp_path / "o.safetensors", to="nowhere")
    with pytest.raises(CheckpointFileError, match=r"o.pt: a streamed LoRA checkpoint is a .safetensors file"):
        stream_convert(path, tmp_path / "o.pt", to="torchtune")
    with pytest.raises(LayoutError, match=r"holds base weights, which peft keeps apart; pass base_out=PATH"):
        stream_convert(path, tmp_path / "adapter", to="peft")
    with pytest.raises(LayoutError, match=r"transformer.wte: torchtune has no LoRA embeddings"):
        stream_convert(path, tmp_path / "o.safetensors", to="torchtune")
    with pytest.raises(CheckpointFileError, match="the output is the input .*; lora-ckpt never writes over its inputs"):
        stream_convert(path, path, to="nanogpt_lora", overwrite=True)
    kohya = save_checkpoint(tmp_path / "kohya.safetensors", {"lora_unet_proj.lora_down.weight": torch.zeros(2, 8),
                                                            "lora_unet_proj.lora_up.weight": torch.zeros(8, 2)})
    with pytest.raises(LayoutError, match=r"kohya.safetensors holds a kohya adapter only, with no base weights to stream"):
        stream_convert(kohya, tmp_path / "o.safetensors", to="torchtune")
    kohya.unlink()
    assert sorted(p.name for p in tmp_path.iterdir()) == [path.name]


def test_a_failed_base_write_leaves_neither_output(lora_file, tmp_path, monkeypatch):
    _, path = lora_file
    nowte = save_checkpoint(tmp_path / f"nowte{path.suffix}", make_gpt(attn_rank=4, alpha=8.0).state_dict(), alpha=8.0)
    before = _digest(nowte)

    def failing(fd, data, offset):
        raise OSError(5, "disk went away")

    with pytest.raises(OSError, match="disk went away"):
        stream_convert(nowte, tmp_path / "adapter", to="peft", base_out=tmp_path / "base",
                       options=StreamOptions(pwrite=failing))
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([path.name, nowte.name])
    assert _digest(nowte) == before


def test_square_modules_into_loralib_are_written_and_merge_with_kinds(tmp_path):
    """loralib factors of a square weight fit a linear module and an embedding alike: the converted file records
    each module's kind, and a bare state dict (no record) asks which (kinds=...)."""
    from lora_ckpt.formats.hf import load_model_weights
    from lora_ckpt.formats.peft import load_peft_adapter
    from lora_ckpt.testing.llama import LlamaShape, write_llama_adapter, write_llama_checkpoint

    shape = LlamaShape(hidden=64, intermediate=172, layers=1, vocab=128)
    write_llama_checkpoint(tmp_path / "base", shape, dtype=torch.float32)
    write_llama_adapter(tmp_path / "adapter", shape, rank=4, dtype=torch.float32)
    peft = load_peft_adapter(tmp_path / "adapter")
    tune = convert_layout(peft.state_dict, "torchtune", scales=peft.scales, base=load_model_weights(tmp_path / "base"),
                          fan_in_fan_out=False)  # a bare state dict: Llama keeps nn.Linear
    src = save_checkpoint(tmp_path / "tune.safetensors", tune.state_dict, alpha=tune.alpha)
    got = load_checkpoint(stream_convert(src, tmp_path / "loralib.safetensors", to="loralib").files[0])
    assert got.alpha == tune.alpha and got.metadata["layout"] == "loralib"
    assert got.kinds == {name: "linear" for name in tune.alpha}
    with pytest.raises(LayoutError, match=r"4 modules \(model.layers.0.self_attn.k_proj, .*\) have square factors that fit "
                                          r"both a linear module and an embedding; say which: kinds=\{'\*':'linear'"):
        merge_lora(got.state_dict, alpha=got.alpha)
    layout = detect_layout(got.state_dict, kinds={name: "linear" for name in tune.alpha})
    assert got.detect().kinds == layout.kinds  # the record settles it
    merged = merge_lora(got.state_dict, alpha=got.alpha, layout=got.detect())
    assert_state_dict_close(merged, merge_adapter(tmp_path / "base", tmp_path / "adapter"), rtol=1e-6, atol=1e-6)


def test_cli_kinds_settles_square_loralib_modules(tmp_path, capsys):
    """The CLI takes what Python's kinds= says: --kinds linear (every square module) or --kinds MODULE=KIND."""
    from lora_ckpt.cli import main
    from lora_ckpt.formats.hf import load_model_weights
    from lora_ckpt.formats.peft import load_peft_adapter
    from lora_ckpt.testing.llama import LlamaShape, write_llama_adapter, write_llama_checkpoint

    shape = LlamaShape(hidden=64, intermediate=172, layers=1, vocab=128)
    write_llama_checkpoint(tmp_path / "base", shape, dtype=torch.float32)
    write_llama_adapter(tmp_path / "adapter", shape, rank=4, dtype=torch.float32)
    peft = load_peft_adapter(tmp_path / "adapter")
    tune = convert_layout(peft.state_dict, "torchtune", scales=peft.scales, base=load_model_weights(tmp_path / "base"),
                          fan_in_fan_out=False)
    src = save_checkpoint(tmp_path / "tune.safetensors", tune.state_dict, alpha=tune.alpha)
    lora = tmp_path / "loralib.safetensors"
    assert main(["convert", str(src), str(lora), "--to", "loralib", "--quiet"]) == 0
    capsys.readouterr()
    written = load_checkpoint(lora)  # it records the kinds (tests/test_kinds_meta.py); the same tensors without the
    lora = save_checkpoint(tmp_path / "old.safetensors", written.state_dict, alpha=written.alpha)  # record, as before
    assert load_checkpoint(lora).kinds == {}
    assert main(["merge", str(lora), str(tmp_path / "m.safetensors"), "--quiet"]) == 1
    err = capsys.readouterr().err
    assert "4 modules (model.layers.0.self_attn.k_proj, model.layers.0.self_attn.o_proj, " \
           "model.layers.0.self_attn.q_proj, …) have square factors that fit both a linear module and an embedding; " \
           "say which: --kinds linear or --kinds embedding for all of them, --kinds MODULE=KIND for one" in err
    assert "kinds={" not in err
    assert main(["inspect", str(lora), "--kinds", "linear"]) == 0
    assert "layout: loralib" in capsys.readouterr().out
    assert main(["merge", str(lora), str(tmp_path / "m.safetensors"), "--quiet", "--kinds", "linear",
                 "--kinds", "model.layers.0.self_attn.o_proj=linear"]) == 0
    assert_state_dict_close(load_checkpoint(tmp_path / "m.safetensors").state_dict,
                            merge_adapter(tmp_path / "base", tmp_path / "adapter"), rtol=1e-6, atol=1e-6)
    assert main(["convert", str(lora), str(tmp_path / "back.safetensors"), "--to", "torchtune", "--kinds", "linear",
                 "--quiet"]) == 0
    capsys.readouterr()
    assert main(["merge", str(lora), str(tmp_path / "x.safetensors"), "--kinds", "conv"]) == 2
    assert "'conv': give linear or embedding, or MODULE=linear / MODULE=embedding" in capsys.readouterr().err
    assert main(["merge", str(lora), str(tmp_path / "x.safetensors"), "--kinds", "linear", "--kinds", "embedding"]) == 2
    assert "--kinds gives the bare KIND two kinds (linear and embedding); give each once" in capsys.readouterr().err
    assert main(["merge", str(lora), str(tmp_path / "x.safetensors"), "--kinds", "typo=linear", "--kinds", "linear",
                 "--quiet"]) == 1
    assert "--kinds names modules that are not LoRA modules here: ['typo']" in capsys.readouterr().err
    assert not (tmp_path / "x.safetensors").exists()
