"""Reprs stay short at any model size, and every report has an HTML form for notebooks."""

import torch

from lora_ckpt import Checkpoint, FileResult, LoadReport, OptimizerReport, Relayout, StreamReport, convert_layout, detect_layout
from lora_ckpt.testing import make_gpt
from lora_ckpt.testing.llama import LlamaShape


def _big_lora_state_dict(layers=200):
    """A 200-layer Llama-shaped PEFT state dict of meta tensors (no memory): 1400 modules."""
    sd = {}
    for name, shape in LlamaShape(hidden=64, intermediate=172, layers=layers, vocab=128).tensors():
        sd[name] = torch.empty(shape, device="meta")
        if name.endswith("proj.weight"):
            module = name.removesuffix(".weight")
            sd[f"{module}.lora_A.weight"] = torch.empty(4, shape[1], device="meta")
            sd[f"{module}.lora_B.weight"] = torch.empty(shape[0], 4, device="meta")
    return sd


def test_reprs_are_short_for_a_big_model():
    sd = _big_lora_state_dict()
    layout = detect_layout(sd, layout="peft")
    assert len(layout.modules) == 1400
    keys = list(sd)
    values = [
        layout,
        Checkpoint(sd, alpha=8.0),
        LoadReport("peft", "nanogpt_lora", copied=keys, merged=keys[:700]),
        StreamReport([], len(sd), 1 << 40, merged=keys),
        FileResult([], True, 1400, lines=["x"] * 5, left_out=keys),
        OptimizerReport(transferred=keys, fresh=keys),
    ]
    for value in values:
        text = repr(value)
        assert len(text) < 700, (type(value).__name__, len(text))
        assert text.startswith(type(value).__name__ + "(")
        html = value._repr_html_()
        assert html.startswith("<") and len(html) < 5000, type(value).__name__
    assert "copied=[" + str(len(keys)) + " items: " in repr(values[2])


def test_relayout_repr_and_html():
    rel = convert_layout(make_gpt(attn_rank=4, alpha=8.0).state_dict(), "peft", alpha=8.0)
    assert isinstance(rel, Relayout)
    assert repr(rel) == "Relayout(layout='peft', tensors=4, modules=2, base=29, fan_in_fan_out=False)"
    assert "<td>state_dict</td><td>{4 entries}</td>" in rel._repr_html_()
