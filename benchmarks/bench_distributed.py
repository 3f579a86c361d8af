"""Merging an FSDP2-sharded LoRA model: gather to rank 0 then merge, against merging on the shards.

For 1, 2 and 4 ranks (gloo process groups on the CPU, one torch thread per rank) a nanoGPT-LoRA model (8 layers,
1024 wide, vocab 32768, rank 16 on every ``c_attn`` and on ``wte``; fp32, about 540 MB) is built on the ``meta``
device, sharded with ``fully_shard`` and filled shard by shard, so no rank ever holds more than its shard. Then,
alternately, ``--repeat`` times each:

- gather: ``get_model_state_dict(full_state_dict=True, cpu_offload=True)`` (the whole model lands on rank 0), then
  ``merge_lora`` there: what users do today;
- shards: ``merged_state_dict(model)``: each rank merges its own shard, DTensors out.

Per rank it prints the median wall time and the peak RSS growth during the operation (Linux ``VmHWM`` reset through
``/proc/self/clear_refs`` just before it, after ``malloc_trim``, minus ``VmRSS`` then), the ratio gather/shards, and checks the sharded
merge's growth against the bound: the rank's new merged blocks + the factors it gathers whole + one 8 MiB block
(the rank's own shard is already resident, so that term of "shard + factors + block" is the baseline here).

Run: ``python benchmarks/bench_distributed.py`` (about two minutes on 2 cores; ranks beyond the core count share
cores, so times at 4 ranks measure oversubscription too).
"""

from __future__ import annotations

import argparse
import ctypes
import datetime
import gc
import os
import re
import socket
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

N_LAYER, N_EMBD, VOCAB, RANK, ALPHA = 8, 1024, 32768, 16, 32.0
BLOCK_BYTES = 8 << 20


def _status(field: str) -> int:
    text = Path("/proc/self/status").read_text()
    return int(re.search(rf"^{field}:\s+(\d+) kB", text, re.M).group(1)) * 1024  # type: ignore[union-attr]


def _reset_peak() -> int:
    """Hand freed memory back to the system (so an earlier run's free lists do not hide growth), reset VmHWM to
    the current RSS; return that RSS."""
    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    Path("/proc/self/clear_refs").write_text("5")
    return _status("VmRSS")


def _build():
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    from lora_ckpt.testing import GPT, GPTConfig

    cfg = GPTConfig(block_size=1024, vocab_size=VOCAB, n_layer=N_LAYER, n_head=16, n_embd=N_EMBD, attn_rank=RANK,
                    wte_rank=RANK, lora_alpha=ALPHA)
    with torch.device("meta"):
        model = GPT(cfg)
    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    for block in model.transformer.h:
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    model.to_empty(device="cpu")
    g = torch.Generator().manual_seed(dist.get_rank())
    with torch.no_grad():
        for p in model.parameters():  # each rank fills its own shard
            local = p.to_local()
            local.copy_(torch.randn(local.shape, generator=g) * 0.02)
    return model


def _merged_block_bytes(model) -> tuple[int, int]:
    """(bytes of this rank's merged blocks, bytes of the factors it gathers whole)."""
    from lora_ckpt.testing import LoRAEmbedding, LoRALinear

    blocks = gathered = 0
    for mod in model.modules():
        if isinstance(mod, (LoRALinear, LoRAEmbedding)) and mod.lora_A is not None:
            w = mod.main_weight.weight
            blocks += w.to_local().numel() * w.element_size()
            gathered += mod.lora_A.weight.numel() * 4 if isinstance(mod, LoRALinear) else mod.lora_B.weight.numel() * 4
    return blocks, gathered


def _gather_then_merge(model) -> None:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    from lora_ckpt import merge_lora

    full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if dist.get_rank() == 0:
        merged = merge_lora(full, alpha=ALPHA)
        del merged
    del full
    dist.barrier()


def _merge_on_shards(model) -> None:
    from lora_ckpt import merged_state_dict

    merged = merged_state_dict(model)
    del merged
    dist.barrier()


def _worker(rank: int, world: int, port: int, repeat: int, queue) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=datetime.timedelta(minutes=10))
    torch.set_num_threads(1)
    model = _build()
    shard = sum(p.to_local().numel() * p.element_size() for p in model.parameters())
    blocks, gathered = _merged_block_bytes(model)
    runs: dict[str, list[tuple[float, int]]] = {"gather": [], "shards": []}
    for i in range(repeat):
        order = (("gather", _gather_then_merge), ("shards", _merge_on_shards))
        for name, fn in order if i % 2 == 0 else order[::-1]:
            dist.barrier()
            before = _reset_peak()
            t = time.perf_counter()
            fn(model)
            runs[name].append((time.perf_counter() - t, _status("VmHWM") - before))
    queue.put((rank, shard, blocks, gathered, {k: (statistics.median(s for s, _ in v), max(r for _, r in v))
                                                for k, v in runs.items()}))
    dist.destroy_process_group()


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--ranks", type=int, nargs="+", default=[1, 2, 4])
    args = parser.parse_args(argv)
    ctx = mp.get_context("spawn")
    print(f"nanoGPT-LoRA {N_LAYER} layers x {N_EMBD}, vocab {VOCAB}, rank {RANK}, fp32; medians of {args.repeat} "
          "alternating runs; MB = 1e6 bytes; RSS = peak growth during the operation")
    print(f"{'ranks':>5} {'rank':>4} {'shard MB':>9} | {'gather s':>8} {'gather MB':>9} | {'shards s':>8} "
          f"{'shards MB':>9} | {'time x':>6} {'RSS x':>6} | {'bound MB':>8} {'within':>6}")
    ok = True
    for world in args.ranks:
        queue = ctx.SimpleQueue()
        procs = mp.start_processes(_worker, args=(world, _port(), args.repeat, queue), nprocs=world, join=False,
                                   start_method="spawn")
        results = sorted(queue.get() for _ in range(world))
        procs.join()
        for rank, shard, blocks, gathered, res in results:
            (gs, gm), (ss, sm) = res["gather"], res["shards"]
            bound = blocks + gathered + BLOCK_BYTES
            within = sm <= bound
            ok &= within
            print(f"{world:>5} {rank:>4} {shard / 1e6:>9.0f} | {gs:>8.2f} {gm / 1e6:>9.0f} | {ss:>8.2f} "
                  f"{sm / 1e6:>9.0f} | {gs / ss:>6.2f} {gm / max(sm, 1):>6.2f} | {bound / 1e6:>8.0f} "
                  f"{'yes' if within else 'NO':>6}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
