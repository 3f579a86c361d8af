"""File-to-file merges: one process vs ``torchrun`` with 1 and 2 ranks, and a DCP base vs a safetensors base.

Every case is a complete command line (``python -m lora_ckpt merge …`` or ``torchrun … -m lora_ckpt merge …``)
on the same synthetic Llama checkpoint and PEFT adapter, run in alternation; the table gives medians of
wall time (process start and torch import included, as a user sees it) and the peak RSS of the largest
process of the run, with ratios against the single-process stream measured in the same run. Each output
is checked against the single-process output (same bytes for the torchrun cases, same tensors for DCP).

    python benchmarks/bench_distributed_files.py [--gb 0.5] [--repeats 3] [--shard 64MB]

This file can also be imported: :func:`run` returns the rows (for ``bench_distributed.py``).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch

from lora_ckpt import load_checkpoint
from lora_ckpt.testing.llama import LlamaShape, write_llama_adapter, write_llama_checkpoint

_RSS = ("import resource, subprocess, sys; rc = subprocess.call(sys.argv[1:]); "
        "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, file=sys.stderr); sys.exit(rc)")


def _shape(gb: float) -> LlamaShape:
    hidden = 1024
    per_layer = (4 * hidden * hidden + 3 * hidden * 2816) * 4
    return LlamaShape(hidden=hidden, intermediate=2816, layers=max(1, int(gb * 1e9 / per_layer)), vocab=8192)


def _timed(cmd: list[str], env: dict[str, str]) -> tuple[float, int]:
    """Wall seconds and the peak RSS (bytes) of the largest process the command ran."""
    t = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", _RSS, *cmd], capture_output=True, text=True, env=env)
    seconds = time.perf_counter() - t
    if proc.returncode != 0:
        raise RuntimeError(f"{cmd} failed:\n{proc.stderr[-3000:]}")
    return seconds, int(proc.stderr.strip().splitlines()[-1]) * 1024


def _digest(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir()) if p.is_file()}


def run(gb: float = 0.5, repeats: int = 3, shard: str = "64MB", work: Path | None = None) -> list[dict[str, object]]:
    """Run every case ``repeats`` times in alternation; return one row per case (medians, ratios to one process)."""
    own = work is None
    work = Path(tempfile.mkdtemp(prefix="bench-dist-files-")) if work is None else work
    try:
        shape = _shape(gb)
        base, adapter, dcp_base = work / "base", work / "adapter", work / "base-dcp"
        write_llama_checkpoint(base, shape, dtype=torch.float32, shard_bytes=256 << 20)
        write_llama_adapter(adapter, shape, rank=16, alpha=32.0, dtype=torch.float32)
        import torch.distributed.checkpoint as dcp

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            dcp.save(load_checkpoint(base).state_dict, checkpoint_id=dcp_base, no_dist=True)
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
        merge = ["-m", "lora_ckpt", "merge", "--quiet", "--no-fan-in-fan-out", "--max-shard-size", shard]
        run_ = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node"]
        cases = {
            "1 process, safetensors base": lambda out: [sys.executable, *merge, str(base), str(adapter), str(out)],
            "torchrun 1 rank": lambda out: [*run_, "1", *merge, str(base), str(adapter), str(out)],
            "torchrun 2 ranks": lambda out: [*run_, "2", *merge, str(base), str(adapter), str(out)],
            "1 process, DCP base": lambda out: [sys.executable, *merge, str(dcp_base), str(adapter), str(out)],
        }
        times: dict[str, list[float]] = {k: [] for k in cases}
        rss: dict[str, list[int]] = {k: [] for k in cases}
        reference: dict[str, str] | None = None
        first: Path | None = None  # the first single-process output, kept to compare tensors with
        for i in range(repeats):
            for name, make in cases.items():
                out = work / f"out-{i}-{len(times[name])}-{name.replace(' ', '_').replace(',', '')}"
                seconds, peak = _timed(make(out), env)
                times[name].append(seconds)
                rss[name].append(peak)
                if name.startswith("torchrun") or name == "1 process, safetensors base":
                    digest = _digest(out)
                    if reference is None:
                        reference, first = digest, out
                    if digest != reference:
                        raise AssertionError(f"{name}: output differs from the single-process stream")
                else:
                    assert first is not None
                    got, want = load_checkpoint(out).state_dict, load_checkpoint(first).state_dict
                    if list(got) != list(want) or any(not torch.equal(got[k], want[k]) for k in want):
                        raise AssertionError(f"{name}: tensors differ from the single-process stream")
                if out != first:
                    shutil.rmtree(out)
        size = sum(p.stat().st_size for p in base.glob("*.safetensors"))
        baseline = statistics.median(times["1 process, safetensors base"])
        return [{"case": name, "gb": round(size / 1e9, 3), "seconds": round(statistics.median(times[name]), 2),
                 "ratio": round(statistics.median(times[name]) / baseline, 2),
                 "peak_rss_mb": round(statistics.median(rss[name]) / 2**20), "runs": repeats} for name in cases]
    finally:
        if own:
            shutil.rmtree(work, ignore_errors=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--gb", type=float, default=0.5, help="base checkpoint size (fp32), GB")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--shard", default="64MB", help="--max-shard-size of the output")
    p.add_argument("--json", action="store_true")
    args = p.parse_args()
    rows = run(args.gb, args.repeats, args.shard)
    if args.json:
        print(json.dumps(rows, indent=2))
        return
    print(f"{os.cpu_count()} CPUs; base {rows[0]['gb']} GB fp32; medians of {args.repeats} alternating runs; "
          "ratio = seconds / single-process stream")
    print(f"{'case':32} {'seconds':>8} {'ratio':>6} {'peak RSS MB':>12}")
    for r in rows:
        print(f"{r['case']:32} {r['seconds']:>8} {r['ratio']:>6} {r['peak_rss_mb']:>12}")


if __name__ == "__main__":
    main()
