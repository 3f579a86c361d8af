import json

import pytest
import torch
from conftest import logits

import lora_ckpt
from lora_ckpt import LoraCkptError, load_checkpoint, load_into, save_checkpoint
from lora_ckpt.cli import main
from lora_ckpt.testing import make_gpt


@pytest.fixture
def lora_file(tmp_path):
    model = make_gpt(attn_rank=4, wte_rank=2, alpha=8.0, randomize=True)
    path = tmp_path / "lora.pt"
    torch.save({"model": {f"_orig_mod.{k}": v for k, v in model.state_dict().items()},
                "model_args": {"n_layer": 2, "lora_alpha": 8.0, "lora_rank": 4},
                "optimizer": {"state": {}, "param_groups": []}, "iter_num": 5}, path)
    return model, path


def test_inspect_text_and_json(lora_file, capsys):
    _, path = lora_file
    assert main(["inspect", str(path)]) == 0
    out = capsys.readouterr().out
    assert "layout: nanogpt_lora" in out and "prefix: _orig_mod." in out
    assert "alpha: 8 (model_args['lora_alpha'])" in out
    assert "tied: transformer.wte.main_weight.weight = lm_head.weight (a LoRA update lands here" in out
    assert "transformer.h.0.attn.c_attn  linear     4" in out
    assert main(["inspect", str(path), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["layout"] == "nanogpt_lora" and info["alpha"] == 8.0 and info["dtypes"] == {"float32": 35}
    assert [m["rank"] for m in info["modules"]] == [2, 4, 4]
    assert info["other_entries"] == ["iter_num", "model_args", "optimizer"]


@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
def test_merge_gives_a_file_the_plain_model_loads(lora_file, tmp_path, capsys, suffix):
    model, path = lora_file
    dst = tmp_path / f"merged{suffix}"
    assert main(["merge", str(path), str(dst)]) == 0
    out = capsys.readouterr().out
    assert f"merged 3 LoRA module(s) of {path} into {dst}" in out
    assert "untied: each key keeps its own value" in out
    assert "left out: optimizer" in out and "model_args['lora_alpha']" in out
    plain = make_gpt(seed=4)
    load_into(plain, dst, tied="untie")
    torch.testing.assert_close(logits(plain), logits(model))
    if suffix == ".pt":
        assert load_checkpoint(dst).extra == {"model_args": {"n_layer": 2}, "iter_num": 5}


def test_merge_dtype_and_tie(lora_file, tmp_path):
    _, path = lora_file
    dst = tmp_path / "m.safetensors"
    assert main(["merge", str(path), str(dst), "--dtype", "bf16", "--tied", "tie"]) == 0
    sd = load_checkpoint(dst).state_dict
    assert all(v.dtype == torch.bfloat16 for v in sd.values())
    assert sd["lm_head.weight"] is sd["transformer.wte.weight"]


def test_convert_both_ways(lora_file, tmp_path, capsys):
    model, path = lora_file
    std = tmp_path / "std.safetensors"
    assert main(["convert", str(path), str(std), "--to", "standard"]) == 0
    back = tmp_path / "back.pt"
    assert main(["convert", str(std), str(back), "--to", "nanogpt", "--like", str(path)]) == 0
    assert "standard checkpoint -> nanogpt_lora model" in capsys.readouterr().out
    ckpt = load_checkpoint(back)
    assert set(ckpt.alpha.values()) == {8.0} and len(ckpt.alpha) == 3
    assert all(k.startswith("_orig_mod.") for k in ckpt.state_dict)
    assert torch.count_nonzero(ckpt.state_dict["_orig_mod.transformer.h.0.attn.c_attn.lora_A.weight"]) > 0
    assert torch.count_nonzero(ckpt.state_dict["_orig_mod.transformer.h.0.attn.c_attn.lora_B.weight"]) == 0
    again = make_gpt(seed=6, attn_rank=4, wte_rank=2, alpha=8.0)
    again.lm_head.weight = torch.nn.Parameter(again.lm_head.weight.detach().clone())
    load_into(again, back)
    torch.testing.assert_close(logits(again), logits(model))


def test_failures_exit_1_with_one_clear_line(lora_file, tmp_path, capsys):
    _, path = lora_file
    existing = save_checkpoint(tmp_path / "x.safetensors", {"w": torch.zeros(2)})
    assert main(["merge", str(path), str(existing)]) == 1
    err = capsys.readouterr().err
    assert err == f"lora-ckpt: error: {existing}: already exists; pass --force to replace it\n"  # CLI words only
    assert main(["merge", str(path), str(existing), "--force"]) == 0
    capsys.readouterr()
    assert main(["merge", str(path), str(tmp_path / "y.pt"), "--alpha", "3"]) == 1
    err = capsys.readouterr().err
    assert "alpha=3 conflicts with alpha 8 recorded" in err and err.count("\n") == 1
    assert not (tmp_path / "y.pt").exists()
    assert main(["merge", str(existing), str(tmp_path / "z.pt")]) == 1
    assert "already in the standard layout" in capsys.readouterr().err
    assert not (tmp_path / "z.pt").exists()
    assert main(["inspect", str(tmp_path / "missing.pt")]) == 1
    assert capsys.readouterr().err == f"lora-ckpt: error: {tmp_path / 'missing.pt'}: no such file or folder\n"


def test_debug_shows_the_traceback(tmp_path):
    with pytest.raises(LoraCkptError, match="no such file"):
        main(["--debug", "inspect", str(tmp_path / "missing.pt")])


def test_usage_errors_exit_2(lora_file, tmp_path, capsys):
    _, path = lora_file
    assert main(["frobnicate"]) == 2
    assert main(["merge", str(path)]) == 2
    assert main(["merge", "a", "b", "c", "d"]) == 2
    assert "give SRC DST, or BASE ADAPTER DST" in capsys.readouterr().err
    assert main(["convert", str(path), str(tmp_path / "o"), "--to", "peft", "--gpt2"]) == 2
    assert "--to peft --gpt2 needs --base-out DIR" in capsys.readouterr().err
    assert main(["convert", str(path), str(tmp_path / "o.pt"), "--to", "nowhere"]) == 2
    assert main([]) == 2


def test_demo(tmp_path, capsys):
    assert main(["demo", "--out", str(tmp_path), "--steps", "3"]) == 0
    out = capsys.readouterr().out
    assert out.count("[ok]") == 3 and "all outputs match" in out
    assert sorted(p.name for p in tmp_path.iterdir()) == ["lora.pt", "lora_again.pt", "merged.safetensors"]
    assert main(["demo", "--steps", "3", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["ok"] is True and len(result["steps"]) == 3 and all(s["ok"] for s in result["steps"])


def test_version(capsys):
    assert main(["--version"]) == 0
    assert capsys.readouterr().out.startswith("lora-ckpt 0.1.0")


def test_convert_standard_without_template_says_how(tmp_path, capsys):
    std = save_checkpoint(tmp_path / "std.safetensors", make_gpt().state_dict())
    assert main(["convert", str(std), str(tmp_path / "o.pt"), "--to", "nanogpt"]) == 1
    assert "to give it a LoRA layout use convert --to nanogpt --like TEMPLATE" in capsys.readouterr().err


@pytest.mark.parametrize("to", ["torchtune", "loralib", "minlora", "nanogpt"])
def test_convert_between_layouts_keeps_the_function(lora_file, tmp_path, to):
    model, path = lora_file
    nowte = make_gpt(attn_rank=4, alpha=8.0, randomize=True)
    src = save_checkpoint(tmp_path / "nowte.pt", nowte.state_dict(), alpha=8.0)
    dst = tmp_path / f"{to}.safetensors"
    assert main(["convert", str(src), str(dst), "--to", to]) == 0
    ckpt = load_checkpoint(dst)
    plain = make_gpt(seed=5)
    merged = lora_ckpt.merge_lora(ckpt.state_dict, alpha=ckpt.alpha)
    plain.load_state_dict(merged)
    torch.testing.assert_close(logits(plain), logits(nowte))


def test_convert_to_peft_needs_base_out_for_base_weights(lora_file, tmp_path, capsys):
    _, path = lora_file
    assert main(["convert", str(path), str(tmp_path / "adapter"), "--to", "peft"]) == 1
    assert "holds base weights, which peft keeps apart; pass --base-out PATH" in capsys.readouterr().err
    assert not (tmp_path / "adapter").exists()
    assert main(["convert", str(path), str(tmp_path / "adapter"), "--to", "peft", "--base-out",
                 str(tmp_path / "base.safetensors")]) == 0
    merged = lora_ckpt.merge_adapter(tmp_path / "base.safetensors", tmp_path / "adapter")
    ref = lora_ckpt.merge_lora(load_checkpoint(path).state_dict, alpha=8.0)
    for k, v in ref.items():
        torch.testing.assert_close(merged[k], v)


def test_json_results_and_errors_and_python_m(lora_file, tmp_path, capsys):
    import subprocess
    import sys

    _, path = lora_file
    assert main(["merge", str(path), str(tmp_path / "j.safetensors"), "--json", "--quiet"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["ok"] is True and result["merged"] == 3 and result["outputs"] == [str(tmp_path / "j.safetensors")]
    assert main(["merge", str(path), str(tmp_path / "j.safetensors"), "--json", "--quiet"]) == 1
    error = json.loads(capsys.readouterr().out)
    assert error["ok"] is False and error["kind"] == "CheckpointFileError" and "already exists" in error["error"]
    res = subprocess.run([sys.executable, "-m", "lora_ckpt", "--version"], capture_output=True, text=True)
    assert res.returncode == 0 and res.stdout.startswith("lora-ckpt ")


def test_cli_errors_name_flags_not_python_arguments(tmp_path, capsys):
    from lora_ckpt.testing import make_lora_state_dict

    raw = save_checkpoint(tmp_path / "raw.safetensors", make_lora_state_dict(rank=2))  # no alpha recorded
    assert main(["merge", str(raw), str(tmp_path / "o.safetensors"), "--quiet"]) == 1
    err = capsys.readouterr().err
    assert "pass --alpha A (in Python also a per-module mapping" in err and "alpha=<float>" not in err
    with pytest.raises(Exception, match=r"pass alpha=<float> \(CLI: --alpha A\)"):  # Python keeps both
        from lora_ckpt import merge_lora

        merge_lora(make_lora_state_dict(rank=2))


def test_inspect_an_adapter_folder_shows_its_config_alpha(tmp_path, capsys):
    from lora_ckpt.testing.llama import LlamaShape, write_llama_adapter

    write_llama_adapter(tmp_path / "ad", LlamaShape(hidden=32, intermediate=64, layers=1, vocab=64), rank=4, alpha=16.0)
    assert main(["inspect", str(tmp_path / "ad")]) == 0
    assert "alpha: 16 (adapter_config.json)" in capsys.readouterr().out
    assert repr(load_checkpoint(tmp_path / "ad")).startswith("Checkpoint(tensors=")


@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])  # streamed and in memory
def test_convert_like_ignore_leaves_old_buffers_out(tmp_path, capsys, suffix):
    std = make_gpt(seed=3).state_dict()
    old = {**std, "transformer.h.0.attn.bias": torch.ones(1, 1, 16, 16)}  # old nanoGPT's causal-mask buffer
    src = save_checkpoint(tmp_path / "old.safetensors", old)
    template = save_checkpoint(tmp_path / "t.pt", make_gpt(attn_rank=4, alpha=8.0).state_dict(), alpha=8.0)
    dst = tmp_path / f"out{suffix}"
    assert main(["convert", str(src), str(dst), "--to", "nanogpt", "--like", str(template), "--quiet"]) == 1
    err = capsys.readouterr().err
    assert "the model has no place for checkpoint key(s) ['transformer.h.0.attn.bias']" in err
    assert err.rstrip().endswith("or leave keys out with --ignore GLOB") and "ignore=" not in err
    assert not dst.exists()
    assert main(["convert", str(src), str(dst), "--to", "nanogpt", "--like", str(template), "--quiet",
                 "--ignore", "*.attn.bias"]) == 0
    out = load_checkpoint(dst).state_dict
    assert "transformer.h.0.attn.bias" not in out
    lora = make_gpt(attn_rank=4, alpha=8.0)
    load_into(lora, dst)
    plain = make_gpt(seed=3)
    torch.testing.assert_close(logits(lora), logits(plain))  # fresh factors: B = 0, the base function
    assert main(["convert", str(src), str(tmp_path / "x.pt"), "--to", "nanogpt", "--ignore", "*.attn.bias"]) == 2
    assert "--ignore applies to --like TEMPLATE" in capsys.readouterr().err


def test_inspect_groups_a_large_adapter_by_layer_pattern(tmp_path, capsys):
    from lora_ckpt.testing.llama import LlamaShape, write_llama_adapter

    write_llama_adapter(tmp_path / "ad", LlamaShape(hidden=32, intermediate=64, layers=6, vocab=64), rank=4, alpha=16.0)
    assert main(["inspect", str(tmp_path / "ad")]) == 0
    out = capsys.readouterr().out
    assert "model.layers.*.self_attn.q_proj" in out and "0-5" in out
    assert "(42 modules in 7 layer patterns; --all lists each)" in out
    assert "model.layers.3.self_attn.q_proj" not in out
    assert main(["inspect", str(tmp_path / "ad"), "--all"]) == 0
    out = capsys.readouterr().out
    assert "model.layers.3.self_attn.q_proj" in out and "layer patterns" not in out
    assert main(["inspect", str(tmp_path / "ad"), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert len(info["modules"]) == 42 and len(info["module_groups"]) == 7
    assert info["module_groups"][0]["count"] == 6 and info["module_groups"][0]["layers"] == "0-5"


def test_without_tqdm_the_cli_says_so_once(lora_file, tmp_path):
    import subprocess
    import sys

    _, path = lora_file
    code = ("import sys; sys.modules['tqdm'] = None; from lora_ckpt.cli import run; "
            f"sys.argv = ['lora-ckpt', 'merge', {str(path)!r}, {str(tmp_path / 'o.safetensors')!r}]; run()")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    hint = "lora-ckpt: no progress bar: tqdm is not installed (pip install 'lora-ckpt[progress]', or pass --quiet)"
    assert res.stderr.count(hint) == 1, res.stderr


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])  # in memory and streamed
def test_convert_like_onto_a_tied_template_keeps_different_values_apart_and_says_so(lora_file, tmp_path, capsys,
                                                                                      suffix):
    """A merged file with the wte update holds wte and lm_head apart; a template tying them gets both, and a warning."""
    model, path = lora_file
    merged = tmp_path / "merged.safetensors"
    assert main(["merge", str(path), str(merged), "--quiet"]) == 0
    capsys.readouterr()
    dst = tmp_path / f"again{suffix}"
    assert main(["convert", str(merged), str(dst), "--to", "nanogpt", "--like", str(path), "--quiet"]) == 0
    out, err = capsys.readouterr()
    assert "untied transformer.wte.main_weight.weight = lm_head.weight: the source holds different values" in out
    assert f"warning: {dst} holds its own value for lm_head.weight, which {path} ties to another key" in err
    assert "load_into(model, path, tied='untie')" in err
    tied = make_gpt(seed=6, attn_rank=4, wte_rank=2, alpha=8.0)
    with pytest.raises(LoraCkptError, match="the model ties transformer.wte.main_weight.weight = lm_head.weight"):
        load_into(tied, dst)
    load_into(tied, dst, tied="untie")
    torch.testing.assert_close(logits(tied), logits(model))
    # equal values (no update on wte) stay tied, without a warning
    plain = save_checkpoint(tmp_path / "plain.safetensors", make_gpt(seed=4).state_dict())
    assert main(["convert", str(plain), str(dst), "--to", "nanogpt", "--like", str(path), "--quiet", "--force"]) == 0
    assert "warning" not in capsys.readouterr().err
    out_sd = {k.removeprefix("_orig_mod."): v for k, v in load_checkpoint(dst).state_dict.items()}
    assert torch.equal(out_sd["transformer.wte.main_weight.weight"], out_sd["lm_head.weight"])


def test_folder_outputs_say_so_list_what_they_leave_out_and_name_output_keys(lora_file, tmp_path, capsys):
    _, path = lora_file
    for typo in ("out.txt", "merged.safetensor"):
        assert main(["merge", str(path), str(tmp_path / typo), "--quiet"]) == 1
        assert f"{typo}: '.{typo.rsplit('.', 1)[1]}' is not a checkpoint suffix (.safetensors, .pt" in capsys.readouterr().err
        assert not (tmp_path / typo).exists()
    assert main(["merge", str(path), str(tmp_path / "run.merged") + "/", "--quiet"]) == 0  # a trailing / says folder
    out, err = capsys.readouterr()
    assert f"into the model folder {tmp_path / 'run.merged'}/" in out
    assert "left out: optimizer, iter_num" in out  # a folder keeps model_args only, and says what it left
    assert (tmp_path / "run.merged" / "model.safetensors").is_file()
    # the tie warning names the keys as the output has them, not the source's prefixed LoRA keys
    assert "keeps transformer.wte.weight and lm_head.weight apart" in err and "_orig_mod." not in err


def test_merge_with_the_output_forgotten_or_nothing_to_merge(tmp_path, capsys):
    from lora_ckpt.testing.llama import LlamaShape, write_llama_adapter, write_llama_checkpoint

    shape = LlamaShape(hidden=32, intermediate=64, layers=1, vocab=64)
    base = write_llama_checkpoint(tmp_path / "base", shape)
    adapter = write_llama_adapter(tmp_path / "ad", shape, rank=4, alpha=8.0)
    before = sorted(p.name for p in adapter.iterdir())
    assert main(["merge", str(base), str(adapter)]) == 2
    assert f"{adapter} is a PEFT adapter folder, not an output; to merge it into {base} name the output too: " \
           "merge BASE ADAPTER DST" in capsys.readouterr().err
    assert sorted(p.name for p in adapter.iterdir()) == before
    assert main(["merge", str(base), str(tmp_path / "out"), "--quiet"]) == 1
    assert f"{base}: holds no LoRA modules (standard layout), so there is nothing to merge; to merge an adapter " \
           "into it give both: merge BASE ADAPTER DST" in capsys.readouterr().err


def test_in_memory_merges_show_a_progress_bar_labelled_merging(lora_file, tmp_path, capsys):
    _, path = lora_file
    assert main(["merge", str(path), str(tmp_path / "m.pt")]) == 0  # a .pt output is merged in memory
    err = capsys.readouterr().err
    assert "merging" in err and "tensor" in err
    assert main(["merge", str(path), str(tmp_path / "q.pt"), "--quiet"]) == 0
    assert "merging" not in capsys.readouterr().err
