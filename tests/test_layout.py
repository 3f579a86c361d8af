import pytest
import torch

from lora_ckpt import LayoutError, ShapeError, detect_layout
from lora_ckpt.testing import make_gpt, make_lora_state_dict, make_state_dict

C_ATTN = "transformer.h.0.attn.c_attn"


@pytest.mark.parametrize("prefix", ["", "_orig_mod.", "module.", "module._orig_mod.", "_orig_mod.module."])
def test_detects_nanogpt_lora_with_any_wrapper_prefix(prefix):
    layout = detect_layout(make_lora_state_dict(rank=4, wte_rank=2, prefix=prefix))
    assert layout.kind == "nanogpt_lora" and layout.is_lora
    assert layout.prefix == prefix
    mods = {m.name: m for m in layout.modules}
    assert set(mods) == {"transformer.wte", C_ATTN, "transformer.h.1.attn.c_attn"}
    c = mods[C_ATTN]
    assert (c.kind, c.rank, c.in_features, c.out_features, c.has_bias) == ("linear", 4, 32, 96, True)
    w = mods["transformer.wte"]
    assert (w.kind, w.rank, w.in_features, w.out_features, w.has_bias) == ("embedding", 2, 64, 32, False)
    assert layout.tied == (("transformer.wte.main_weight.weight", "lm_head.weight"),)
    assert layout.tied_updates == layout.tied


def test_detects_standard_nanogpt_and_its_tie():
    layout = detect_layout(make_state_dict())
    assert layout.kind == "standard" and not layout.modules and layout.prefix == ""
    assert layout.tied == (("transformer.wte.weight", "lm_head.weight"),)
    assert layout.tied_updates == ()


def test_rank_zero_and_lora_only_embedding():
    sd = make_gpt(attn_rank=0, wte_rank=3, wte_lora_only=True).state_dict()
    mods = {m.name: m for m in detect_layout(sd).modules}
    assert mods[C_ATTN].kind == "base_only" and mods[C_ATTN].rank == 0
    assert mods[C_ATTN].keys == (f"{C_ATTN}.main_weight.weight", f"{C_ATTN}.main_weight.bias")
    wte = mods["transformer.wte"]
    assert (wte.kind, wte.rank, wte.in_features, wte.out_features) == ("lora_only_embedding", 3, 64, 32)


def test_works_on_meta_tensors():
    with torch.device("meta"):
        model = make_gpt(attn_rank=4)
    layout = detect_layout(model.state_dict())
    assert layout.modules[0].rank == 4 and layout.tied == ()


def test_layout_renders_as_text_and_html():
    layout = detect_layout(make_lora_state_dict(rank=4))
    text, html = str(layout), layout._repr_html_()
    assert "nanogpt_lora" in text and C_ATTN in text and "linear" in text
    assert html.startswith("<p>layout: nanogpt_lora") and f"<td>{C_ATTN}</td>" in html


def test_empty_or_non_tensor_input():
    with pytest.raises(LayoutError, match="expected a non-empty mapping"):
        detect_layout({})
    with pytest.raises(LayoutError, match=r"values are not tensors for keys \['model'.*pass checkpoint\['model'\]"):
        detect_layout({"model": make_state_dict(), "iter_num": 3})


def test_mixed_prefixes_name_the_keys():
    sd = make_state_dict()
    sd["_orig_mod.extra.weight"] = torch.zeros(1)
    with pytest.raises(LayoutError, match=r"different wrapper prefixes \('\(none\)': 'transformer.wte.weight'; '_orig_mod.': '_orig_mod.extra.weight'\)"):
        detect_layout(sd)


def test_module_in_both_layouts_is_mixed():
    sd = make_lora_state_dict(rank=4)
    sd[f"{C_ATTN}.weight"] = torch.zeros(96, 32)
    with pytest.raises(LayoutError, match=rf"{C_ATTN}: mixed layout, has standard key\(s\) \['{C_ATTN}.weight'\]"):
        detect_layout(sd)


def test_missing_factor():
    sd = make_lora_state_dict(rank=4)
    del sd[f"{C_ATTN}.lora_B.weight"]
    with pytest.raises(LayoutError, match=f"{C_ATTN}: has lora_A.weight but no lora_B.weight"):
        detect_layout(sd)


def test_shape_misfit_names_module_and_shapes():
    sd = make_lora_state_dict(rank=4)
    sd[f"{C_ATTN}.main_weight.weight"] = torch.zeros(96, 30)
    with pytest.raises(ShapeError, match=rf"^{C_ATTN}: lora_B \(96, 4\) @ lora_A \(4, 32\) does not fit main_weight \(96, 30\)"):
        detect_layout(sd)


def test_every_misfit_is_reported_at_once():
    sd = make_lora_state_dict(rank=4)
    sd["transformer.h.0.attn.c_attn.lora_A.weight"] = torch.zeros(4, 31)
    sd["transformer.h.1.attn.c_attn.lora_A.weight"] = torch.zeros(4, 31)
    with pytest.raises(ShapeError) as info:
        detect_layout(sd)
    assert "h.0.attn.c_attn" in str(info.value) and "h.1.attn.c_attn" in str(info.value)


def test_unrecognised_lora_key():
    sd = make_lora_state_dict(rank=4)
    sd[f"{C_ATTN}.lora_A.bias"] = torch.zeros(4)
    with pytest.raises(LayoutError, match=f"{C_ATTN}.lora_A.bias: unrecognised nanogpt_lora key"):
        detect_layout(sd)


@pytest.mark.parametrize(
    ("key", "message"),
    [("x.lora_E.default", "AdaLoRA \\(PEFT\\) adapters are not supported"), ("x.hada_w1_a", "LoHa")],
)
def test_unsupported_adapters_are_named_not_misread(key, message):
    with pytest.raises(LayoutError, match=f"{key}: {message}"):
        detect_layout({key: torch.zeros(2, 2)})


def test_square_shapes_are_ambiguous_until_hinted():
    sd = {
        "m.main_weight.weight": torch.zeros(4, 4),
        "m.lora_A.weight": torch.zeros(4, 4),
        "m.lora_B.weight": torch.zeros(4, 4),
    }
    with pytest.raises(LayoutError, match=r"m: shapes .* fit both a linear module and an embedding; say which: kinds="):
        detect_layout(sd)
    assert detect_layout(sd, kinds={"m": "embedding"}).modules[0].kind == "embedding"
    assert detect_layout(sd, kinds={"m": "linear"}).modules[0].kind == "linear"
    with pytest.raises(LayoutError, match=r"kinds \(CLI: --kinds\) names modules that are not LoRA modules here: \['n'\]"):
        detect_layout(sd, kinds={"m": "linear", "n": "linear"})


def test_factor_must_be_2d():
    sd = make_lora_state_dict(rank=4)
    sd[f"{C_ATTN}.lora_A.weight"] = torch.zeros(4, 32, 1)
    with pytest.raises(ShapeError, match=rf"{C_ATTN}.lora_A.weight: expected a 2-d tensor, got shape \(4, 32, 1\)"):
        detect_layout(sd)


def test_bias_without_weight():
    sd = make_lora_state_dict(rank=4)
    del sd[f"{C_ATTN}.main_weight.weight"]
    with pytest.raises(LayoutError, match=f"{C_ATTN}: has main_weight.bias but no main_weight.weight"):
        detect_layout(sd)


def test_peft_prefix_without_lora_modules_is_standard():
    sd = {f"base_model.model.{k}": v for k, v in make_state_dict().items()}
    layout = detect_layout(sd)
    assert layout.kind == "standard" and not layout.modules
