"""merge_lora on a GPT-2-medium-sized nanoGPT LoRA state dict: time and peak memory as ratios.

Builds 24 layers, 1024 wide, vocab 50304, LoRA rank 16 on every ``c_attn`` and on the tied ``wte``, in fp32 and
bf16, and prints for each dtype:

- time: ``merge_lora`` against cloning the targeted weights (the same bytes written), median of several runs
  measured alternately in the same process (target: at most 1.3x);
- peak extra memory of ``merge_lora`` (Linux VmHWM, reset just before the merge, in a fresh subprocess) against
  the bytes of the merged tensors plus the largest tensor (target: at most 1.0x of that bound).

Run: ``python benchmarks/bench_merge.py`` (about a minute on 2 cores; ``--repeat`` for more runs).
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time

import torch

from lora_ckpt import detect_layout, merge_lora

N_LAYER, N_EMBD, VOCAB, BLOCK, RANK, ALPHA = 24, 1024, 50304, 1024, 16, 32.0
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def build(dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """A nanoGPT LoRA state dict of GPT-2-medium size (random targeted weights, uninitialised others)."""
    g = torch.Generator().manual_seed(0)

    def rand(*shape: int) -> torch.Tensor:
        return (torch.randn(shape, generator=g, dtype=torch.float32) * 0.02).to(dtype)

    sd: dict[str, torch.Tensor] = {}
    wte = rand(VOCAB, N_EMBD)
    sd["transformer.wte.main_weight.weight"] = wte
    sd["transformer.wte.lora_A.weight"] = rand(VOCAB, RANK)
    sd["transformer.wte.lora_B.weight"] = rand(N_EMBD, RANK)
    sd["transformer.wpe.weight"] = torch.empty(BLOCK, N_EMBD, dtype=dtype)
    for i in range(N_LAYER):
        p = f"transformer.h.{i}."
        sd[p + "ln_1.weight"] = torch.ones(N_EMBD, dtype=dtype)
        sd[p + "ln_1.bias"] = torch.zeros(N_EMBD, dtype=dtype)
        sd[p + "attn.c_attn.main_weight.weight"] = rand(3 * N_EMBD, N_EMBD)
        sd[p + "attn.c_attn.main_weight.bias"] = torch.zeros(3 * N_EMBD, dtype=dtype)
        sd[p + "attn.c_attn.lora_A.weight"] = rand(RANK, N_EMBD)
        sd[p + "attn.c_attn.lora_B.weight"] = rand(3 * N_EMBD, RANK)
        sd[p + "attn.c_proj.weight"] = torch.empty(N_EMBD, N_EMBD, dtype=dtype)
        sd[p + "attn.c_proj.bias"] = torch.zeros(N_EMBD, dtype=dtype)
        sd[p + "ln_2.weight"] = torch.ones(N_EMBD, dtype=dtype)
        sd[p + "ln_2.bias"] = torch.zeros(N_EMBD, dtype=dtype)
        sd[p + "mlp.c_fc.weight"] = torch.empty(4 * N_EMBD, N_EMBD, dtype=dtype)
        sd[p + "mlp.c_fc.bias"] = torch.zeros(4 * N_EMBD, dtype=dtype)
        sd[p + "mlp.c_proj.weight"] = torch.empty(N_EMBD, 4 * N_EMBD, dtype=dtype)
        sd[p + "mlp.c_proj.bias"] = torch.zeros(N_EMBD, dtype=dtype)
    sd["transformer.ln_f.weight"] = torch.ones(N_EMBD, dtype=dtype)
    sd["transformer.ln_f.bias"] = torch.zeros(N_EMBD, dtype=dtype)
    sd["lm_head.weight"] = wte  # tied, as in nanoGPT
    return sd


def targeted(sd: dict[str, torch.Tensor]) -> list[torch.Tensor]:
    return [sd[m.weight_key] for m in detect_layout(sd).modules]


def time_ratio(sd: dict[str, torch.Tensor], repeat: int) -> tuple[float, float, float]:
    weights = targeted(sd)
    layout = detect_layout(sd)
    merge_lora(sd, alpha=ALPHA, layout=layout)  # warm-up
    [w.clone() for w in weights]
    clone_t, merge_t = [], []
    for _ in range(repeat):
        t0 = time.perf_counter()
        out = [w.clone() for w in weights]
        clone_t.append(time.perf_counter() - t0)
        del out
        t0 = time.perf_counter()
        out2 = merge_lora(sd, alpha=ALPHA, layout=layout)
        merge_t.append(time.perf_counter() - t0)
        del out2
    c, m = statistics.median(clone_t), statistics.median(merge_t)
    return m / c, m, c


def _vm(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def memory_child(dtype_name: str) -> None:
    """In a fresh process: peak extra bytes during merge_lora, and the bound it is held to."""
    sd = build(DTYPES[dtype_name])
    layout = detect_layout(sd)
    merged_bytes = sum(w.numel() * w.element_size() for w in targeted(sd))
    largest = max(t.numel() * t.element_size() for t in sd.values())
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset VmHWM, the peak resident set size
    before = _vm("VmRSS")
    out = merge_lora(sd, alpha=ALPHA, layout=layout)
    peak = _vm("VmHWM")
    assert len(out) > 0
    print(peak - before, merged_bytes, largest)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--memory-child", choices=DTYPES, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.memory_child:
        memory_child(args.memory_child)
        return
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; GPT-2-medium nanoGPT LoRA, rank {RANK}")
    for name, dtype in DTYPES.items():
        sd = build(dtype)
        ratio, m, c = time_ratio(sd, args.repeat)
        del sd
        res = subprocess.run(
            [sys.executable, __file__, "--memory-child", name], capture_output=True, text=True, check=True
        )
        extra, merged, largest = map(int, res.stdout.split())
        bound = merged + largest
        print(
            f"{name}: merge_lora {m * 1e3:.0f} ms vs clone of targeted weights {c * 1e3:.0f} ms -> "
            f"time ratio {ratio:.2f}x (target <= 1.3x)"
        )
        print(
            f"{name}: peak extra memory {extra / 2**20:.0f} MiB vs merged tensors {merged / 2**20:.0f} MiB + largest "
            f"tensor {largest / 2**20:.0f} MiB -> memory ratio {extra / bound:.2f}x of the bound (target <= 1.0x)"
        )


if __name__ == "__main__":
    main()
