"""Resize a rank-64 adapter on a 7B-shaped model to rank 16 on CPU (synthetic factors only).

32 layers x 7 projections with Llama-7B shapes (hidden 4096, intermediate 11008): only the factors exist, never a
full weight. Prints the time of ``resize_lora`` over all 224 modules, then, on a few modules, the median time of ours
against the baseline that forms B@A and runs a full SVD (runs alternate, medians reported, ratio in the same run).

    .venv/bin/python benchmarks/bench_resize.py [--repeats 3] [--baseline-modules 2]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from lora_ckpt.lowrank import resize_lora

HIDDEN, INTER, LAYERS, RANK, TARGET = 4096, 11008, 32, 64, 16
SHAPES = {"self_attn.q_proj": (HIDDEN, HIDDEN), "self_attn.k_proj": (HIDDEN, HIDDEN),
          "self_attn.v_proj": (HIDDEN, HIDDEN), "self_attn.o_proj": (HIDDEN, HIDDEN),
          "mlp.gate_proj": (INTER, HIDDEN), "mlp.up_proj": (INTER, HIDDEN), "mlp.down_proj": (HIDDEN, INTER)}


def adapter(dtype: torch.dtype) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    sd = {}
    for layer in range(LAYERS):
        for proj, (out, inp) in SHAPES.items():
            key = f"base_model.model.model.layers.{layer}.{proj}"
            sd[f"{key}.lora_A.weight"] = (torch.randn(RANK, inp, generator=g) / inp**0.5).to(dtype)
            sd[f"{key}.lora_B.weight"] = (torch.randn(out, RANK, generator=g) * 0.01).to(dtype)
    return sd


def baseline(a: torch.Tensor, b: torch.Tensor, scale: float, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Form the full update and take its full SVD (what a resize without the QR route does)."""
    u, s, vh = torch.linalg.svd(scale * (b.float() @ a.float()), full_matrices=False)
    root = s[:k].sqrt()
    return root[:, None] * vh[:k], u[:, :k] * root


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--baseline-modules", type=int, default=2, help="q_proj, then gate_proj, … of layer 0")
    args = p.parse_args()
    torch.manual_seed(0)
    sd = adapter(torch.bfloat16)
    scales = {k.removeprefix("base_model.model.").removesuffix(".lora_A.weight"): 2.0
              for k in sd if k.endswith("lora_A.weight")}
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, {len(scales)} modules, rank {RANK} -> {TARGET}, "
          f"{sum(t.numel() for t in sd.values()) / 1e6:.0f} M factor parameters (bf16)")

    whole = []
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        out = resize_lora(sd, rank=TARGET, scales=scales, layout="peft")
        whole.append(time.perf_counter() - t0)
    print(f"resize_lora, all {len(scales)} modules: median {statistics.median(whole):.2f} s "
          f"(runs {', '.join(f'{t:.2f}' for t in whole)}); mean relative error "
          f"{out.report.totals()['mean_rel_error']:.4f}")

    names = [n for n in scales if n.startswith("model.layers.0.")]
    names = [names[0], names[4], names[6], names[1]][: args.baseline_modules]  # q_proj, gate_proj, down_proj, k_proj
    for name in names:
        one = {k: v for k, v in sd.items() if f".{name}." in f".{k.removeprefix('base_model.model.')}"}
        a, b = one[f"base_model.model.{name}.lora_A.weight"], one[f"base_model.model.{name}.lora_B.weight"]
        ours, theirs = [], []
        for _ in range(args.repeats):  # alternate, so drift hits both alike
            t0 = time.perf_counter()
            small = resize_lora(one, rank=TARGET, scales={name: 2.0}, layout="peft")
            ours.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            ba, bb = baseline(a, b, 2.0, TARGET)
            theirs.append(time.perf_counter() - t0)
        got = small.state_dict[f"base_model.model.{name}.lora_B.weight"].float() @ \
            small.state_dict[f"base_model.model.{name}.lora_A.weight"].float()
        ref = bb @ ba
        agree = float(torch.linalg.matrix_norm(got - ref) / torch.linalg.matrix_norm(ref))
        mo, mt = statistics.median(ours), statistics.median(theirs)
        print(f"{name} {SHAPES[name.split('.', 3)[-1]]}: QR+core {mo * 1e3:.1f} ms, B@A + full SVD {mt:.2f} s, "
              f"ratio {mt / mo:.0f}x; results differ by {agree:.1e} (relative, bf16 output)")


if __name__ == "__main__":
    main()
