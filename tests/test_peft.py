"""Agreement with PEFT and transformers themselves, on tiny GPT-2 and Llama models built from configs."""

import json
import warnings

import pytest
import torch

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

from lora_ckpt import merge_adapter  # noqa: E402
from lora_ckpt.cli import main  # noqa: E402
from lora_ckpt.formats.gpt2 import nanogpt_lora_to_peft, peft_to_nanogpt_lora  # noqa: E402
from lora_ckpt.formats.hf import save_model_folder  # noqa: E402
from lora_ckpt.testing import make_gpt, make_tokens  # noqa: E402
from lora_ckpt import load_into  # noqa: E402

TOKENS = make_tokens(seed=4, batch=2, length=10)


def _gpt2(dtype=torch.float32):
    cfg = transformers.GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=64, n_positions=16,
                                  bos_token_id=0, eos_token_id=0, activation_function="gelu")
    return transformers.GPT2LMHeadModel(cfg).to(dtype).eval()


def _llama(dtype=torch.float32):
    cfg = transformers.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                                   num_key_value_heads=1, vocab_size=64, bos_token_id=0, eos_token_id=0,
                                   pad_token_id=0, tie_word_embeddings=False)
    return transformers.LlamaForCausalLM(cfg).to(dtype).eval()


def _logits(model):
    with torch.no_grad():
        return model(TOKENS).logits


def _perturb(model, seed):
    """Random non-zero adapters, magnitudes and modules_to_save copies (PEFT starts B at zero)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if any(s in name for s in ("lora_", "modules_to_save")):
                p.add_(torch.randn(p.shape, generator=g).to(p.dtype) * 0.05)


CASES = {
    "gpt2-conv1d-embedding": (_gpt2, dict(r=4, lora_alpha=8, target_modules=["c_attn", "c_proj", "wte"], fan_in_fan_out=True)),
    "gpt2-rslora-patterns": (_gpt2, dict(r=4, lora_alpha=8, target_modules=["c_attn", "c_proj"], fan_in_fan_out=True,
                                         use_rslora=True, rank_pattern={"c_proj": 2}, alpha_pattern={"h.1.attn.c_attn": 3})),
    "gpt2-dora": (_gpt2, dict(r=4, lora_alpha=8, target_modules=["c_attn"], fan_in_fan_out=True, use_dora=True)),
    "llama-dora-embedding-modules_to_save": (_llama, dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "embed_tokens"],
                                                          use_dora=True, rank_pattern={"v_proj": 2}, modules_to_save=["lm_head"])),
    "llama-lora-bias": (_llama, dict(r=4, lora_alpha=16, target_modules=["q_proj", "o_proj", "down_proj"], lora_bias=True)),
}


def _build(tmp_path, case, dtype=torch.float32):
    make, kwargs = CASES[case]
    torch.manual_seed(0)
    base = make(dtype)
    if case == "llama-lora-bias":  # lora_bias needs biases on the base layers
        for layer in base.model.layers:
            for mod in (layer.self_attn.q_proj, layer.self_attn.o_proj, layer.mlp.down_proj):
                mod.bias = torch.nn.Parameter(torch.randn(mod.out_features, dtype=dtype) * 0.1)
        base.config.attention_bias = True
        base.config.mlp_bias = True
    base.save_pretrained(tmp_path / "base")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = peft.get_peft_model(base, peft.LoraConfig(**kwargs))
        _perturb(model, seed=1)
        model.save_pretrained(tmp_path / "adapter")
    return model


@pytest.mark.parametrize("case", list(CASES))
def test_merge_matches_peft_merge_and_unload(tmp_path, case):
    model = _build(tmp_path, case)
    ours = merge_adapter(tmp_path / "base", tmp_path / "adapter")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        merged = model.merge_and_unload()
    theirs = merged.state_dict()
    assert set(ours) <= set(theirs)
    for k, v in ours.items():
        torch.testing.assert_close(v, theirs[k], rtol=1e-5, atol=1e-6, msg=lambda m, k=k: f"{k}: {m}")
    save_model_folder(tmp_path / "out", ours, like=tmp_path / "base")
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    torch.testing.assert_close(_logits(reloaded), _logits(merged), rtol=1e-5, atol=1e-5)


def test_bf16_merge_matches_peft(tmp_path):
    model = _build(tmp_path, "llama-dora-embedding-modules_to_save", dtype=torch.bfloat16)
    ours = merge_adapter(tmp_path / "base", tmp_path / "adapter")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = model.merge_and_unload().state_dict()
    for k, v in ours.items():
        assert v.dtype == torch.bfloat16
        # PEFT rounds its DoRA norm and update to bf16 before the final rounding; we round once
        torch.testing.assert_close(v.float(), theirs[k].float(), rtol=2e-2, atol=2e-2, msg=lambda m, k=k: f"{k}: {m}")


def test_cli_merge_base_adapter_out(tmp_path, capsys):
    model = _build(tmp_path, "gpt2-conv1d-embedding")
    assert main(["merge", str(tmp_path / "base"), str(tmp_path / "adapter"), str(tmp_path / "out")]) == 0
    assert "merged" in capsys.readouterr().out
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        merged = model.merge_and_unload()
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    torch.testing.assert_close(_logits(reloaded), _logits(merged), rtol=1e-5, atol=1e-5)
    assert (tmp_path / "out" / "config.json").is_file()


def test_nanogpt_lora_to_hf_gpt2_and_peft_and_back(tmp_path):
    lora = make_gpt(attn_rank=4, wte_rank=2, alpha=8.0, randomize=True)
    nanogpt_lora_to_peft(lora.state_dict(), tmp_path / "base", tmp_path / "adapter", alpha=8.0, n_head=2)
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["fan_in_fan_out"] is True and config["rank_pattern"] == {r"transformer\.wte": 2}
    base = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "base").eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        hf = peft.PeftModel.from_pretrained(base, tmp_path / "adapter").eval()
    with torch.no_grad():
        torch.testing.assert_close(hf(TOKENS).logits, lora(TOKENS), rtol=1e-5, atol=1e-5)

    back = peft_to_nanogpt_lora(tmp_path / "base", tmp_path / "adapter")
    again = make_gpt(seed=9, attn_rank=4, wte_rank=2, alpha=8.0)
    load_into(again, back.state_dict, alpha=back.alpha)
    torch.testing.assert_close(again(TOKENS), lora(TOKENS), rtol=1e-5, atol=1e-5)


def test_live_peft_model_state_dict_merges_like_merge_and_unload(tmp_path):
    model = _build(tmp_path, "gpt2-conv1d-embedding")
    live = {k: v.clone() for k, v in model.state_dict().items()}
    from lora_ckpt import detect_layout, merge_lora
    from lora_ckpt.formats.peft import load_peft_adapter

    layout = detect_layout(live)
    assert layout.kind == "peft" and not layout.needs_base
    scales = load_peft_adapter(tmp_path / "adapter").scales
    ours = merge_lora(live, scales=scales, fan_in_fan_out=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = model.merge_and_unload().state_dict()
    for k, v in ours.items():
        if k != "lm_head.weight":  # PEFT's merge also changes the tied head; ours keeps the exact function
            torch.testing.assert_close(v, theirs[k], rtol=1e-5, atol=1e-6, msg=lambda m, k=k: f"{k}: {m}")


def test_live_peft_model_with_modules_to_save_merges_like_merge_and_unload(tmp_path):
    """A live model wraps lm_head: original_module (the base) and modules_to_save.default (trained) become lm_head."""
    from lora_ckpt import merge_lora
    from lora_ckpt.formats.peft import load_peft_adapter

    model = _build(tmp_path, "llama-dora-embedding-modules_to_save")
    live = model.state_dict()
    assert "base_model.model.lm_head.modules_to_save.default.weight" in live
    assert "base_model.model.lm_head.original_module.weight" in live
    expected = _logits(model)
    ours = merge_lora(live, scales=load_peft_adapter(tmp_path / "adapter").scales, fan_in_fan_out=False)  # Llama: nn.Linear
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = model.merge_and_unload()
    assert list(ours) == list(theirs.state_dict())
    for k, v in theirs.state_dict().items():
        torch.testing.assert_close(ours[k], v, rtol=1e-5, atol=1e-6, msg=lambda m, k=k: f"{k}: {m}")
    torch.testing.assert_close(ours["lm_head.weight"], theirs.state_dict()["lm_head.weight"], rtol=0, atol=0)
    plain = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "base").eval()
    plain.load_state_dict(ours, strict=True)
    torch.testing.assert_close(_logits(plain), expected, rtol=1e-5, atol=1e-5)


def test_sharded_base_folder_and_cli_gpt2_conversions(tmp_path, capsys):
    model = _build(tmp_path, "gpt2-conv1d-embedding")
    expected = _logits(model)  # the unmerged adapter's function
    torch.manual_seed(0)
    base = _gpt2()  # the same weights as the adapter's base (seed 0)
    base.save_pretrained(tmp_path / "sharded", max_shard_size="20KB")
    assert (tmp_path / "sharded" / "model.safetensors.index.json").is_file()
    ours = merge_adapter(tmp_path / "sharded", tmp_path / "adapter")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = model.merge_and_unload().state_dict()
    for k, v in ours.items():
        torch.testing.assert_close(v, theirs[k], rtol=1e-5, atol=1e-6)

    # PEFT adapter on GPT-2 -> nanoGPT LoRA file, from the command line
    nano = tmp_path / "nano.pt"
    assert main(["convert", str(tmp_path / "adapter"), str(nano), "--to", "nanogpt", "--base",
                 str(tmp_path / "sharded"), "--gpt2"]) == 0
    # and back to a GPT-2 folder + PEFT adapter
    assert main(["convert", str(nano), str(tmp_path / "adapter2"), "--to", "peft", "--gpt2",
                 "--base-out", str(tmp_path / "base2"), "--n-head", "2"]) == 0
    capsys.readouterr()
    again = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "base2").eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        again = peft.PeftModel.from_pretrained(again, tmp_path / "adapter2").eval()
    torch.testing.assert_close(_logits(again), expected, rtol=1e-5, atol=1e-5)


def test_hf_gpt2_folder_to_nanogpt_lora_for_finetuning(tmp_path, capsys):
    """The guide's recipe: a Hugging Face GPT-2 folder (lm_head left out as tied) -> a nanoGPT-LoRA start point."""
    from lora_ckpt import save_checkpoint

    torch.manual_seed(0)
    hf = _gpt2()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        hf.save_pretrained(tmp_path / "gpt2")
    template = save_checkpoint(tmp_path / "t.pt", make_gpt(attn_rank=4, alpha=8.0).state_dict(), alpha=8.0,
                               extra={"model_args": {"n_layer": 2, "lora_alpha": 8.0}})
    out = tmp_path / "start.pt"
    assert main(["convert", str(tmp_path / "gpt2"), str(out), "--to", "nanogpt", "--like", str(template), "--gpt2",
                 "--quiet"]) == 0
    lora = make_gpt(seed=7, attn_rank=4, alpha=8.0)
    load_into(lora, out)
    assert lora.lm_head.weight is lora.transformer.wte.weight  # the tie survives
    with torch.no_grad():
        torch.testing.assert_close(lora(TOKENS), hf(TOKENS).logits, rtol=1e-5, atol=1e-5)
    from lora_ckpt import load_checkpoint

    assert load_checkpoint(out).extra["model_args"] == {"n_layer": 2, "lora_alpha": 8.0}  # the template's, to resume
    capsys.readouterr()
    # the same file again is nanoGPT's layout already: refused, not transposed twice
    assert main(["convert", str(out), str(tmp_path / "again.pt"), "--to", "nanogpt", "--like", str(template),
                 "--gpt2"]) == 1
    err = capsys.readouterr().err
    assert "mlp.c_fc.weight: shape (128, 32) is not Hugging Face GPT-2's Conv1D (in, out) with in = n_embd = 32; " \
           "the state dict looks like nanoGPT's layout already: drop --gpt2" in err
    assert main(["convert", str(tmp_path / "gpt2"), str(tmp_path / "s.pt"), "--to", "standard", "--gpt2"]) == 1
    assert "--gpt2 converts between nanoGPT and Hugging Face GPT-2 in a LoRA conversion" in capsys.readouterr().err


def test_n_head_must_fit_and_agree_with_the_checkpoint(tmp_path, capsys):
    from lora_ckpt import save_checkpoint

    lora = make_gpt(attn_rank=4, alpha=8.0, randomize=True)
    src = save_checkpoint(tmp_path / "ckpt.pt", lora.state_dict(), alpha=8.0, extra={"model_args": {"n_head": 2}})
    args = ["convert", str(src), str(tmp_path / "adapter"), "--to", "peft", "--gpt2", "--base-out", str(tmp_path / "g")]
    assert main([*args, "--n-head", "12"]) == 1
    assert "--n-head 12 contradicts the checkpoint's model_args['n_head'] = 2; drop --n-head" in capsys.readouterr().err
    bare = save_checkpoint(tmp_path / "bare.pt", lora.state_dict(), alpha=8.0)
    args[1] = str(bare)
    assert main([*args, "--n-head", "3"]) == 1
    assert "--n-head does not divide n_embd = 32; GPT-2's attention splits n_embd" in capsys.readouterr().err
    assert not (tmp_path / "adapter").exists() and not (tmp_path / "g").exists()
    assert main(args) == 1
    assert "needs --base-out DIR (the GPT-2 model folder) and --n-head" in capsys.readouterr().err


def test_loading_hugging_face_gpt2_weights_directly_points_at_gpt2(tmp_path):
    from lora_ckpt import KeyMismatchError, ShapeError

    sd = {k: v for k, v in _gpt2().state_dict().items() if k != "lm_head.weight" and not k.endswith(".attn.bias")}
    with pytest.raises(KeyMismatchError, match=r"\['lm_head.weight'\] \(Hugging Face GPT-2 files leave lm_head.weight "
                                               r"out, tied to wte: convert them with gpt2=True \(CLI: convert --gpt2"):
        load_into(make_gpt(attn_rank=4), sd)
    with pytest.raises(ShapeError, match=r"each is the model's shape transposed: the checkpoint stores these weights "
                                         r"\(in, out\), as Hugging Face GPT-2's Conv1D does; convert it first with gpt2=True"):
        load_into(make_gpt(attn_rank=4), sd, ignore=["lm_head.weight"])


def test_an_adapter_updating_a_tied_lm_head_alone_is_refused(tmp_path, capsys):
    """GPT-2 ties lm_head to wte; an update on lm_head only cannot be tied, and a folder whose config ties them
    would silently drop it: refused, naming both keys."""
    from lora_ckpt import TiedWeightError

    torch.manual_seed(0)
    base = _gpt2()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        base.save_pretrained(tmp_path / "base")
        model = peft.get_peft_model(base, peft.LoraConfig(r=4, lora_alpha=8, target_modules=["lm_head"]))
        _perturb(model, seed=2)
        model.save_pretrained(tmp_path / "adapter")
    with pytest.raises(TiedWeightError, match=r"lm_head.weight: the base model ties it to transformer.wte.weight \(its "
                                              r"config.json\), but the adapter gives the two different updates"):
        merge_adapter(tmp_path / "base", tmp_path / "adapter")
    assert main(["merge", str(tmp_path / "base"), str(tmp_path / "adapter"), str(tmp_path / "out"), "--quiet"]) == 1
    assert "would drop one update; leave lm_head out of the adapter" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_layer_facts_come_from_a_child_interpreter_when_transformers_is_not_loaded():
    """meta_model_facts builds the model in `python -m lora_ckpt.formats.hf` unless transformers is already
    imported: the same facts either way, and transformers stays out of the calling process's memory."""
    import subprocess
    import sys

    from lora_ckpt.formats.hf import meta_model_facts

    config = {**_gpt2().config.to_dict(), "architectures": ["GPT2LMHeadModel"]}  # as save_pretrained writes it
    here = meta_model_facts(config)
    assert here is not None and here[1] == {"lm_head.weight": "transformer.wte.weight"}
    code = ("import json, sys; from lora_ckpt.formats.hf import meta_model_facts; "
            "f = meta_model_facts(json.load(sys.stdin)); print(json.dumps([f, 'transformers' in sys.modules]))")
    res = subprocess.run([sys.executable, "-c", code], input=json.dumps(config), capture_output=True, text=True,
                         check=True)
    facts, loaded = json.loads(res.stdout)
    assert loaded is False
    assert facts == [here[0], here[1]]
