"""Streaming merge of big checkpoints: time against a plain file copy, peak RSS, and the Hugging Face route.

1. Generates a synthetic Llama-style sharded safetensors checkpoint (bf16, at least ``--gb`` GB) and a PEFT
   adapter (rank 16 on q/k/v/o and the MLP projections), deterministic, no downloads.
2. Times a plain copy of the same bytes (read + write + fsync of every shard) and ``lora-ckpt merge BASE
   ADAPTER OUT`` (which also fsyncs), each in a fresh process, alternately ``--repeat`` times, and prints the
   ratio of the medians (target <= 1.5x) and the merge's peak RSS against 1.5 x the largest tensor + 300 MB.
   Two more copies are timed as references: a Python read/write loop, and a copy that writes with direct
   I/O the way lora-ckpt does (the fastest way these bytes reach the disk).
3. On a GPT-2-medium-sized checkpoint (fp32, about 1.4 GB) runs the Hugging Face route (``from_pretrained``,
   ``PeftModel.from_pretrained``, ``merge_and_unload``, ``save_pretrained``) and lora-ckpt side by side, each in
   a fresh process, and prints time and peak RSS ratios.
4. Converts a LoRA file holding its base (that checkpoint in the torchtune layout) with ``lora-ckpt convert``,
   to loralib and to a PEFT adapter with its base apart, against a copy of the file: time and peak RSS.

Run: ``python benchmarks/bench_stream.py --workdir /some/disk/with/15GB`` (a few minutes on 2 cores).
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import torch

from lora_ckpt.testing.llama import LlamaShape, write_llama_adapter, write_llama_checkpoint


def run_child(code: str, *args: str) -> tuple[float, int]:
    """Wall seconds and peak RSS (bytes) of ``python -c code args`` in a fresh process."""
    wrapper = textwrap.dedent(
        """
        import resource, subprocess, sys, time
        t = time.perf_counter()
        subprocess.run([sys.executable, "-c", sys.argv[1], *sys.argv[2:]], check=True)
        print(time.perf_counter() - t, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024)
        """
    )
    out = subprocess.run([sys.executable, "-c", wrapper, code, *args], capture_output=True, text=True, check=True)
    seconds, rss = out.stdout.split()[-2:]
    return float(seconds), int(rss)


COPY = """
import os, shutil, sys
from pathlib import Path
src, dst = Path(sys.argv[1]), Path(sys.argv[2])
dst.mkdir()
for f in sorted(src.iterdir()):
    shutil.copyfile(f, dst / f.name)  # sendfile: the kernel copies page to page
    with open(dst / f.name, "rb+") as h:
        os.fsync(h.fileno())
"""

READ_WRITE = """
import os, sys
from pathlib import Path
src, dst = Path(sys.argv[1]), Path(sys.argv[2])
dst.mkdir()
buf = bytearray(32 << 20)
view = memoryview(buf)
for f in sorted(src.iterdir()):
    with open(f, "rb", buffering=0) as s, open(dst / f.name, "wb", buffering=0) as d:
        while n := s.readinto(buf):
            d.write(view[:n])
        os.fsync(d.fileno())
"""

DIRECT_COPY = """
import mmap, os, sys
from pathlib import Path
src, dst = Path(sys.argv[1]), Path(sys.argv[2])
dst.mkdir()
buf = mmap.mmap(-1, 64 << 20)  # page-aligned, as direct I/O needs
for f in sorted(src.iterdir()):
    fd = os.open(dst / f.name, os.O_WRONLY | os.O_CREAT | os.O_DIRECT, 0o644)
    with open(f, "rb", buffering=0) as s:
        offset = 0
        while n := s.readinto(buf):
            os.pwrite(fd, memoryview(buf)[: n + -n % 4096], offset)  # the last chunk padded to whole blocks
            offset += n
    os.ftruncate(fd, offset)
    os.fsync(fd)
    os.close(fd)
"""

LORA_CKPT = """
import sys
from lora_ckpt.cli import main
sys.exit(main(["merge", sys.argv[1], sys.argv[2], sys.argv[3], "--quiet", "--max-shard-size", "2GB"]))
"""

HF_ROUTE = """
import sys, warnings
import torch, transformers, peft
warnings.simplefilter("ignore")
model = transformers.AutoModelForCausalLM.from_pretrained(sys.argv[1], torch_dtype=torch.float32)
model = peft.PeftModel.from_pretrained(model, sys.argv[2]).merge_and_unload()
model.save_pretrained(sys.argv[3], max_shard_size="2GB")
"""


def largest_tensor(shape: LlamaShape, dtype: torch.dtype) -> int:
    return max(torch.Size(s).numel() for _, s in shape.tensors()) * dtype.itemsize


def big(work: Path, gb: float, repeat: int) -> None:
    layers = 1
    while LlamaShape(4096, 11008, layers, 32000).nbytes(torch.bfloat16) < gb * 1e9:
        layers += 1
    shape = LlamaShape(4096, 11008, layers, 32000)
    t = time.perf_counter()
    write_llama_checkpoint(work / "base", shape, dtype=torch.bfloat16, shard_bytes=2 * 10**9)
    write_llama_adapter(work / "adapter", shape, rank=16, dtype=torch.bfloat16)
    size = shape.nbytes(torch.bfloat16)
    print(f"generated {size / 1e9:.2f} GB ({layers} layers, hidden 4096, bf16) in {time.perf_counter() - t:.0f} s")
    os.sync()
    copies, loops, directs, merges, rss = [], [], [], [], []
    for _ in range(repeat):  # alternate, so all see the same disk and page cache conditions
        for code, times in ((COPY, copies), (READ_WRITE, loops), (DIRECT_COPY, directs)):
            times.append(run_child(code, str(work / "base"), str(work / "copy"))[0])
            shutil.rmtree(work / "copy")
            os.sync()
        seconds, peak = run_child(LORA_CKPT, str(work / "base"), str(work / "adapter"), str(work / "merged"))
        merges.append(seconds)
        rss.append(peak)
        shutil.rmtree(work / "merged")
        os.sync()
    runs = {"copyfile": copies, "read/write loop": loops, "direct-I/O copy": directs, "merge": merges}
    print("runs (s):", "; ".join(f"{k} " + " ".join(f"{s:.1f}" for s in v) for k, v in runs.items()))
    copy_s, loop_s, direct_s = statistics.median(copies), statistics.median(loops), statistics.median(directs)
    merge_s, merge_rss = statistics.median(merges), max(rss)
    print(f"python read/write loop (32 MiB buffer, fsync) {loop_s:.1f} s -> merge / loop {merge_s / loop_s:.2f}x")
    print(f"copy with direct-I/O writes (64 MiB chunks, as lora-ckpt writes) {direct_s:.1f} s -> merge / direct copy "
          f"{merge_s / direct_s:.2f}x (the merge also imports torch, about 0.8 s)")
    bound = 1.5 * largest_tensor(shape, torch.bfloat16) + 300e6
    print(f"plain copy (read+write+fsync) {copy_s:.1f} s; lora-ckpt merge {merge_s:.1f} s -> time ratio "
          f"{merge_s / copy_s:.2f}x (target <= 1.5x)")
    print(f"lora-ckpt merge peak RSS {merge_rss / 1e6:.0f} MB; bound 1.5 x largest tensor "
          f"({largest_tensor(shape, torch.bfloat16) / 1e6:.0f} MB) + 300 MB = {bound / 1e6:.0f} MB -> "
          f"{merge_rss / bound:.2f}x of the bound (target <= 1.0x)")


def medium(work: Path) -> None:
    shape = LlamaShape(hidden=1024, intermediate=2816, layers=20, vocab=50304)
    write_llama_checkpoint(work / "mbase", shape, dtype=torch.float32, shard_bytes=2 * 10**9)
    write_llama_adapter(work / "madapter", shape, rank=16, dtype=torch.float32)
    print(f"GPT-2-medium-sized checkpoint: {shape.nbytes(torch.float32) / 1e9:.2f} GB fp32")
    hf_s, hf_rss = run_child(HF_ROUTE, str(work / "mbase"), str(work / "madapter"), str(work / "hf_out"))
    ours_s, ours_rss = run_child(LORA_CKPT, str(work / "mbase"), str(work / "madapter"), str(work / "ours_out"))
    print(f"Hugging Face route {hf_s:.1f} s, peak RSS {hf_rss / 1e6:.0f} MB; lora-ckpt {ours_s:.1f} s, peak RSS "
          f"{ours_rss / 1e6:.0f} MB -> lora-ckpt takes {ours_s / hf_s:.2f}x the time and {ours_rss / hf_rss:.2f}x "
          "the memory of the Hugging Face route")


CONVERT = """
import sys
from lora_ckpt.cli import main
sys.exit(main(["convert", *sys.argv[1:], "--quiet"]))
"""


def convert(work: Path, repeat: int) -> None:
    """lora-ckpt convert on a LoRA file that holds its base: time against a copy of the file, and peak RSS."""
    from lora_ckpt import convert_layout, save_checkpoint
    from lora_ckpt.formats.hf import load_model_weights
    from lora_ckpt.formats.peft import load_peft_adapter

    peft = load_peft_adapter(work / "madapter")
    rel = convert_layout(peft.state_dict, "torchtune", scales=peft.scales, base=load_model_weights(work / "mbase"),
                         fan_in_fan_out=False)  # a bare state dict records no layer types: Llama's are nn.Linear
    (work / "tune").mkdir()
    src = save_checkpoint(work / "tune" / "lora.safetensors", rel.state_dict, alpha=rel.alpha)
    largest = max(t.numel() * t.element_size() for t in rel.state_dict.values())
    del rel, peft
    os.sync()
    print(f"torchtune-layout LoRA file holding its base: {src.stat().st_size / 1e9:.2f} GB fp32")
    runs: dict[str, list[tuple[float, int]]] = {"copy": [], "--to loralib": [], "--to peft --base-out": []}
    for _ in range(repeat):
        runs["copy"].append(run_child(COPY, str(work / "tune"), str(work / "copy")))
        runs["--to loralib"].append(run_child(CONVERT, str(src), str(work / "out.safetensors"), "--to", "loralib"))
        runs["--to peft --base-out"].append(
            run_child(CONVERT, str(src), str(work / "out"), "--to", "peft", "--base-out", str(work / "out_base"))
        )
        for leftover in ("copy", "out", "out.safetensors", "out_base"):
            path = work / leftover
            shutil.rmtree(path) if path.is_dir() else path.unlink()
        os.sync()
    copy_s = statistics.median(t for t, _ in runs["copy"])
    bound = 1.5 * largest + 300e6
    for name in ("--to loralib", "--to peft --base-out"):
        seconds, peak = statistics.median(t for t, _ in runs[name]), max(r for _, r in runs[name])
        print(f"lora-ckpt convert {name}: {seconds:.1f} s = {seconds / copy_s:.2f}x the copy ({copy_s:.1f} s); "
              f"peak RSS {peak / 1e6:.0f} MB = {peak / bound:.2f}x of 1.5 x largest tensor + 300 MB")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", help="a folder with about 15 GB free (default: a temporary folder)")
    parser.add_argument("--gb", type=float, default=4.0, help="size of the big checkpoint")
    parser.add_argument("--repeat", type=int, default=3, help="alternating copy/merge runs (medians are reported)")
    parser.add_argument("--skip-big", action="store_true")
    parser.add_argument("--skip-medium", action="store_true")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="lora-ckpt-bench-", dir=args.workdir))
    print(f"torch {torch.__version__}, {os.cpu_count()} CPUs; working in {work}")
    try:
        if not args.skip_big:
            big(work, args.gb, args.repeat)
        if not args.skip_medium:
            medium(work)
            convert(work, args.repeat)
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
