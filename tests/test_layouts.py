"""Every layout on real modules: the adapter's forward equals the merged model's, fp32 and bf16; round trips."""

import itertools

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize

from lora_ckpt import KeyMismatchError, LayoutError, ShapeError, convert_layout, detect_layout, merge_lora
from lora_ckpt.testing import assert_state_dict_close, make_gpt

loralib = pytest.importorskip("loralib")
DTYPES = [torch.float32, torch.bfloat16]
IDX = torch.tensor([[1, 5, 7, 19, 3]])


def _randomize(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g).to(p.dtype) * 0.2)
    return model


def _close(a, b, dtype):
    tol = {} if dtype == torch.float32 else {"rtol": 3e-2, "atol": 3e-2}
    torch.testing.assert_close(a.float(), b.float(), **tol)


class Plain(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(20, 8)
        self.lin = nn.Linear(8, 12)

    def forward(self, idx):
        return self.lin(self.emb(idx))


# loralib: the peer itself --------------------------------------------------------------------------------

class Loralib(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = loralib.Embedding(20, 8, r=2, lora_alpha=4, merge_weights=False)
        self.lin = loralib.Linear(8, 12, r=4, lora_alpha=8, merge_weights=False)

    def forward(self, idx):
        return self.lin(self.emb(idx))


@pytest.mark.parametrize("dtype", DTYPES)
def test_loralib(dtype):
    model = _randomize(Loralib()).to(dtype).eval()
    layout = detect_layout(model.state_dict())
    assert layout.kind == "loralib"
    assert {(m.name, m.kind, m.rank) for m in layout.modules} == {("emb", "embedding", 2), ("lin", "linear", 4)}
    plain = Plain().to(dtype)
    plain.load_state_dict(merge_lora(model.state_dict(), alpha={"emb": 4.0, "lin": 8.0}))
    _close(plain(IDX), model(IDX), dtype)


# torchtune: LoRALinear / DoRALinear as torchtune defines them (torchtune itself does not install here) ---

class TorchtuneLinear(nn.Module):
    def __init__(self, in_dim, out_dim, rank, alpha, dora=False):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(out_dim, in_dim))
        self.bias = nn.Parameter(torch.empty(out_dim))
        self.lora_a = nn.Linear(in_dim, rank, bias=False)
        self.lora_b = nn.Linear(rank, out_dim, bias=False)
        self.magnitude = nn.Parameter(torch.empty(out_dim)) if dora else None
        self.scaling = alpha / rank

    def forward(self, x):
        lora = self.scaling * self.lora_b(self.lora_a(x))
        if self.magnitude is None:
            return F.linear(x, self.weight, self.bias) + lora
        full = self.weight + self.scaling * self.lora_b.weight @ self.lora_a.weight
        scale = (self.magnitude / torch.linalg.norm(full, dim=1)).view(1, -1)
        return scale * (F.linear(x, self.weight) + lora) + self.bias


class Torchtune(nn.Module):
    def __init__(self, dora):
        super().__init__()
        self.emb = nn.Embedding(20, 8)
        self.lin = TorchtuneLinear(8, 12, 4, 8.0, dora)

    def forward(self, idx):
        return self.lin(self.emb(idx))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("dora", [False, True])
def test_torchtune(dtype, dora):
    model = _randomize(Torchtune(dora)).to(dtype).eval()
    layout = detect_layout(model.state_dict())
    assert layout.kind == "torchtune" and layout.modules[0].is_dora == dora
    plain = Plain().to(dtype)
    plain.load_state_dict(merge_lora(model.state_dict(), alpha=8.0))
    _close(plain(IDX), model(IDX), dtype)


# minLoRA: real torch parametrizations -------------------------------------------------------------------

class MinLoRA(nn.Module):
    def __init__(self, shape_a, shape_b, alpha, embedding):
        super().__init__()
        self.lora_A = nn.Parameter(torch.empty(shape_a))
        self.lora_B = nn.Parameter(torch.empty(shape_b))
        self.scaling = alpha / (shape_a[1] if embedding else shape_a[0])
        self.embedding = embedding

    def forward(self, w):
        delta = self.lora_A @ self.lora_B if self.embedding else self.lora_B @ self.lora_A
        return w + self.scaling * delta


@pytest.mark.parametrize("dtype", DTYPES)
def test_minlora(dtype):
    model = Plain()
    parametrize.register_parametrization(model.emb, "weight", MinLoRA((20, 2), (2, 8), 4.0, True))
    parametrize.register_parametrization(model.lin, "weight", MinLoRA((4, 8), (12, 4), 8.0, False))
    model = _randomize(model).to(dtype).eval()
    layout = detect_layout(model.state_dict())
    assert layout.kind == "minlora" and {m.kind for m in layout.modules} == {"embedding", "linear"}
    plain = Plain().to(dtype)
    plain.load_state_dict(merge_lora(model.state_dict(), alpha={"emb": 4.0, "lin": 8.0}))
    _close(plain(IDX), model(IDX), dtype)


# kohya: a file of flattened names applied to a base model by forward hooks ------------------------------

class Unet(nn.Module):
    def __init__(self):
        super().__init__()
        self.down_blocks = nn.ModuleList([nn.ModuleDict({"proj_in": nn.Linear(8, 8), "conv": nn.Conv2d(8, 6, 1)})])

    def forward(self, x):  # x: (batch, 8)
        h = self.down_blocks[0]["proj_in"](x)
        return self.down_blocks[0]["conv"](h[:, :, None, None]).flatten(1)


def _kohya_file(dtype, alpha_for_conv):
    g = torch.Generator().manual_seed(3)
    sd = {
        "lora_unet_down_blocks_0_proj_in.lora_down.weight": torch.randn(4, 8, generator=g),
        "lora_unet_down_blocks_0_proj_in.lora_up.weight": torch.randn(8, 4, generator=g),
        "lora_unet_down_blocks_0_proj_in.alpha": torch.tensor(2.0),
        "lora_unet_down_blocks_0_conv.lora_down.weight": torch.randn(2, 8, 1, 1, generator=g),
        "lora_unet_down_blocks_0_conv.lora_up.weight": torch.randn(6, 2, 1, 1, generator=g),
    }
    if alpha_for_conv:
        sd["lora_unet_down_blocks_0_conv.alpha"] = torch.tensor(1.0)
    return {k: v.to(dtype) * (0.2 if v.dim() else 1) for k, v in sd.items()}


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("alpha_for_conv", [True, False])
def test_kohya(dtype, alpha_for_conv):
    base = _randomize(Unet()).to(dtype).eval()
    lora = _kohya_file(dtype, alpha_for_conv)
    layout = detect_layout(lora)
    assert layout.kind == "kohya" and layout.needs_base

    def hook(name, rank, alpha):
        down, up = lora[f"{name}.lora_down.weight"].flatten(1), lora[f"{name}.lora_up.weight"].flatten(1)
        return lambda mod, args, out: out + (alpha / rank) * (
            (args[0].flatten(1) @ down.T @ up.T).view(out.shape)
        )

    x = torch.randn(3, 8).to(dtype)
    handles = [
        base.down_blocks[0]["proj_in"].register_forward_hook(hook("lora_unet_down_blocks_0_proj_in", 4, 2.0)),
        base.down_blocks[0]["conv"].register_forward_hook(
            hook("lora_unet_down_blocks_0_conv", 2, 1.0 if alpha_for_conv else 2.0)  # missing alpha = rank
        ),
    ]
    with torch.no_grad():
        expected = base(x)
    for h in handles:
        h.remove()
    merged = merge_lora(lora, base=base.state_dict())
    assert merged["down_blocks.0.conv.weight"].shape == (6, 8, 1, 1)
    plain = Unet().to(dtype)
    plain.load_state_dict(merged)
    with torch.no_grad():
        _close(plain(x), expected, dtype)


def test_kohya_conv_factors_keep_their_kernel_dims_into_a_real_peft_model():
    """A 1x1 convolution's factors stay (r, in, 1, 1) / (out, r, 1, 1) in PEFT and kohya: PEFT's Conv2d loads them."""
    peft = pytest.importorskip("peft")
    base = _randomize(Unet()).eval()
    lora = _kohya_file(torch.float32, alpha_for_conv=True)
    rel = convert_layout(lora, "peft", base=base.state_dict())
    assert rel.state_dict["base_model.model.down_blocks.0.conv.lora_A.weight"].shape == (2, 8, 1, 1)
    assert rel.state_dict["base_model.model.down_blocks.0.conv.lora_B.weight"].shape == (6, 2, 1, 1)
    assert rel.state_dict["base_model.model.down_blocks.0.proj_in.lora_A.weight"].shape == (4, 8)
    back = convert_layout(rel.state_dict, "kohya", scales={n: a / r for (n, a), r in zip(rel.alpha.items(), (4, 2))})
    assert_state_dict_close(back.state_dict, lora, rtol=0, atol=0)  # the kohya round trip, shapes included
    assert convert_layout(lora, "torchtune", base=base.state_dict()).state_dict["down_blocks.0.conv.lora_a.weight"].dim() == 2

    config = peft.LoraConfig(r=4, lora_alpha=rel.alpha["down_blocks.0.proj_in"], target_modules=["proj_in", "conv"],
                             rank_pattern={"conv": 2}, alpha_pattern={"conv": rel.alpha["down_blocks.0.conv"]})
    wrapped = Unet()
    wrapped.load_state_dict(base.state_dict())
    model = peft.get_peft_model(wrapped, config)
    result = peft.set_peft_model_state_dict(model, rel.state_dict)
    assert not result.unexpected_keys
    x = torch.randn(3, 8)
    merged = Unet()
    merged.load_state_dict(merge_lora(lora, base=base.state_dict()))
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(x), merged(x), rtol=1e-5, atol=1e-5)


def test_kohya_name_that_matches_no_base_key():
    lora = _kohya_file(torch.float32, True)
    lora["lora_unet_up_blocks_9_attn.lora_down.weight"] = torch.zeros(2, 8)
    lora["lora_unet_up_blocks_9_attn.lora_up.weight"] = torch.zeros(8, 2)
    with pytest.raises(KeyMismatchError, match=r"lora_unet_up_blocks_9_attn: the kohya name matches no base weight \(looked for '\*up_blocks_9_attn'"):
        merge_lora(lora, base=Unet().state_dict())


def test_conv_kernels_larger_than_1x1_are_refused():
    lora = {"lora_unet_c.lora_down.weight": torch.zeros(2, 8, 3, 3), "lora_unet_c.lora_up.weight": torch.zeros(6, 2, 1, 1)}
    with pytest.raises(LayoutError, match=r"lora_unet_c: convolution kernels of size \(3, 3\) are not supported \(only 1x1\)"):
        detect_layout(lora)


# conversions --------------------------------------------------------------------------------------------

LINEAR_LAYOUTS = ["nanogpt_lora", "peft", "torchtune", "loralib", "minlora", "kohya"]
EMBEDDING_LAYOUTS = ["nanogpt_lora", "peft", "loralib", "minlora"]


def _in(layout, wte):
    sd = make_gpt(attn_rank=4, wte_rank=2 if wte else None, alpha=8.0, randomize=True).state_dict()
    r = convert_layout(sd, layout, alpha=8.0)
    return sd, r


@pytest.mark.parametrize(("a", "b"), list(itertools.permutations(LINEAR_LAYOUTS, 2)))
def test_round_trip_linear(a, b):
    sd, ra = _in(a, wte=False)
    alpha = None if a == "kohya" else ra.alpha
    rb = convert_layout(ra.state_dict, b, alpha=alpha, base=ra.base)
    assert detect_layout(rb.state_dict).kind == b
    back = convert_layout(rb.state_dict, a, alpha=None if b == "kohya" else rb.alpha, base=rb.base)
    assert_state_dict_close(back.state_dict, ra.state_dict, rtol=0, atol=0)
    merged = merge_lora(rb.state_dict, alpha=None if b == "kohya" else rb.alpha, base=rb.base)
    assert_state_dict_close(merged, merge_lora(sd, alpha=8.0), rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize(("a", "b"), list(itertools.permutations(EMBEDDING_LAYOUTS, 2)))
def test_round_trip_with_embeddings(a, b):
    sd, ra = _in(a, wte=True)
    rb = convert_layout(ra.state_dict, b, alpha=ra.alpha, base=ra.base)
    back = convert_layout(rb.state_dict, a, alpha=rb.alpha, base=rb.base)
    assert_state_dict_close(back.state_dict, ra.state_dict, rtol=0, atol=0)


@pytest.mark.parametrize("to", ["torchtune", "kohya"])
def test_embedding_into_a_layout_without_embeddings(to):
    sd = make_gpt(attn_rank=4, wte_rank=2, randomize=True).state_dict()
    with pytest.raises(LayoutError, match=f"transformer.wte: {to} has no LoRA embeddings"):
        convert_layout(sd, to, alpha=8.0)


def test_dora_into_a_plain_layout_and_unknown_target():
    model = _randomize(Torchtune(dora=True))
    with pytest.raises(LayoutError, match="lin: DoRA \\(a magnitude vector\\) cannot be expressed in nanogpt_lora; merge it instead"):
        convert_layout(model.state_dict(), "nanogpt_lora", alpha=8.0)
    assert convert_layout(model.state_dict(), "peft", alpha=8.0).state_dict["base_model.model.lin.lora_magnitude_vector"].shape == (12,)
    with pytest.raises(LayoutError, match="unknown layout 'lycoris'"):
        convert_layout(model.state_dict(), "lycoris", alpha=8.0)


def test_lora_only_embedding_exists_only_in_nanogpt():
    sd = make_gpt(wte_rank=3, wte_lora_only=True, randomize=True).state_dict()
    with pytest.raises(LayoutError, match="transformer.wte: a lora-only embedding \\(no base weight\\) exists only in the nanoGPT layout"):
        convert_layout(sd, "peft", alpha=8.0)


def test_layouts_mixed_in_one_dict():
    sd = dict(Torchtune(False).state_dict())
    sd.update({f"x.{k}": v for k, v in Loralib().state_dict().items()})
    with pytest.raises(LayoutError, match=r"keys of several LoRA layouts are mixed: torchtune \('lin.lora_a.weight'\); loralib"):
        detect_layout(sd)


def test_adapter_only_needs_a_base_and_a_base_that_fits():
    sd = make_gpt(attn_rank=4, randomize=True).state_dict()
    r = convert_layout(sd, "peft", alpha=8.0)
    with pytest.raises(LayoutError, match="this peft state dict holds adapters only, with no base weights; give its base: base="):
        merge_lora(r.state_dict, alpha=r.alpha)
    bad = dict(r.base)
    bad["transformer.h.0.attn.c_attn.weight"] = torch.zeros(96, 31)
    with pytest.raises(ShapeError, match=r"transformer.h.0.attn.c_attn: base weight \(96, 31\) does not fit the adapter's update \(96, 32\)"):
        merge_lora(r.state_dict, alpha=r.alpha, base=bad)
    del bad["transformer.h.0.attn.c_attn.weight"]
    with pytest.raises(KeyMismatchError, match="transformer.h.0.attn.c_attn: the base has no weight transformer.h.0.attn.c_attn.weight"):
        merge_lora(r.state_dict, alpha=r.alpha, base=bad)
    quantized = {k: (v.to(torch.int8) if k == "transformer.h.1.attn.c_attn.weight" else v) for k, v in r.base.items()}
    with pytest.raises(LayoutError, match="transformer.h.1.attn.c_attn: the base weight is torch.int8, a quantized base; dequantize it first"):
        merge_lora(r.state_dict, alpha=r.alpha, base=quantized)
