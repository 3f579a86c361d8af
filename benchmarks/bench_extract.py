"""Extracting a LoRA from a full fine-tune, side by side with mergekit (issue 11): time, peak RSS, size, error.

1. Generates a Llama-shaped bf16 base/tuned pair as two Hugging Face model folders (``config.json`` for
   ``LlamaForCausalLM`` + one ``model.safetensors``), deterministic, no downloads. Default: 8 layers, hidden 2048,
   intermediate 5632, vocab 32000, about 1.08 GB each. ``tuned = bf16(base + B @ A)``: a random rank-16 update on
   each of the 56 projections (q/k/v/o, gate/up/down) whose Frobenius norm is ``--delta-rel`` (1%) of the weight's;
   embeddings, norms and lm_head are the very same tensors in both files.
2. Runs, alternating ``--repeat`` times, ``lora-ckpt extract BASE TUNED OUT --rank R`` and mergekit's
   ``mergekit-extract-lora --max-rank R`` (from its own venv, ``--mergekit-python``; ``--mergekit-repeat`` runs it in
   fewer iterations where it is slow), each as a fresh process under a wrapper process that reads
   ``getrusage(RUSAGE_CHILDREN)``: wall time with process start (the user's wait), CPU time (user + system, less
   sensitive to other work on a shared machine), peak RSS, bytes written. The page cache is warmed once before the
   runs, so every run reads the pair from memory.
3. Reads each tool's output as PEFT would (``adapter_config.json``: ``lora_alpha``/``r``, ``use_rslora``,
   ``rank_pattern``/``alpha_pattern`` matched the way PEFT matches them) and measures the relative Frobenius error
   ``||scale * B @ A - dW|| / ||dW||`` per module, mean over modules, against dW = tuned - base as stored (what an
   extractor is given; the float32 Eckart-Young optimum at that rank is printed beside it) and against the planted
   update. With ``--quick`` (and ``--check-peft``) the reader is checked against PEFT's own
   ``PeftModel.from_pretrained(...).merge_and_unload()``.
4. Prints one table (medians; peak RSS is the largest of the runs) with ratios lora-ckpt / mergekit and the
   issue's targets, PASS or MISS: time <= 0.15x mergekit's at equal or lower error; peak RSS <= 1.5 x the largest
   tensor + 300 MB; only changed tensors saved (and none dropped).

PEFT's own route is reported too: the installed PEFT is checked for a conversion from a full fine-tune.

Run: ``python benchmarks/bench_extract.py --workdir DIR --keep`` (about 3 GB free; the pair is made once and kept).
On the project's 2-core machines one mergekit run took 6-9 minutes with ``--threads 1`` and 20 minutes with MKL's
default two threads (its full SVDs suffer from MKL threading on a busy 2-core VM), so ``--repeat 3`` takes 20-60
minutes; ``--quick`` is a smoke run of about 10 s per tool.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.metadata
import inspect
import json
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from lora_ckpt.testing.llama import LlamaShape

PROJECTIONS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
               "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
DEFAULT_MERGEKIT_PYTHON = "/work/bench-venvs/mergekit/bin/python"
MB = 1e6


# ---------------------------------------------------------------------------------------------------------------
# The pair


@dataclass(frozen=True)
class PairSpec:
    """Everything that decides the generated pair's bytes (a cached pair is reused only when this matches)."""

    shape: LlamaShape
    delta_rank: int
    delta_rel: float
    seed: int

    def key(self) -> str:
        s = self.shape
        return (f"L{s.layers}-h{s.hidden}-i{s.intermediate}-v{s.vocab}-r{self.delta_rank}-rel{self.delta_rel}"
                f"-seed{self.seed}-v2")


def projection_modules(shape: LlamaShape) -> list[str]:
    return [f"model.layers.{n}.{p}" for n in range(shape.layers) for p in PROJECTIONS]


def write_pair(work: Path, spec: PairSpec) -> None:
    """Write ``base/``, ``tuned/`` and ``planted.safetensors`` (the fp32 B and A of every update) under ``work``."""
    stamp = work / "pair.json"
    if stamp.exists() and json.loads(stamp.read_text()).get("key") == spec.key():
        print(f"reusing the pair in {work} ({spec.key()})")
        return
    for old in ("base", "tuned", "planted.safetensors", "pair.json"):
        path = work / old
        shutil.rmtree(path) if path.is_dir() else path.unlink(missing_ok=True)
    t = time.perf_counter()
    g = torch.Generator().manual_seed(spec.seed)
    targets = {m + ".weight" for m in projection_modules(spec.shape)}
    base: dict[str, torch.Tensor] = {}
    tuned: dict[str, torch.Tensor] = {}
    planted: dict[str, torch.Tensor] = {}
    for name, dims in spec.shape.tensors():
        if len(dims) == 1:
            w = torch.ones(dims, dtype=torch.bfloat16)
        else:
            w = (torch.randn(dims, generator=g) * 0.02).to(torch.bfloat16)
        base[name] = w
        if name not in targets:
            tuned[name] = w  # the same bytes: unchanged by the fine-tune
            continue
        rows, cols = dims
        a = torch.randn(spec.delta_rank, cols, generator=g)  # (r, in)
        b = torch.randn(rows, spec.delta_rank, generator=g)  # (out, r)
        update = b @ a
        factor = spec.delta_rel * w.float().norm() / update.norm()  # ||B @ A|| = delta_rel * ||W||
        b = b * factor
        planted[name.removesuffix(".weight") + ".B"] = b
        planted[name.removesuffix(".weight") + ".A"] = a
        tuned[name] = (w.float() + b @ a).to(torch.bfloat16)
    config = {**spec.shape.config(), "torch_dtype": "bfloat16", "max_position_embeddings": 2048}
    for folder, tensors in (("base", base), ("tuned", tuned)):
        (work / folder).mkdir()
        save_file(tensors, str(work / folder / "model.safetensors"), metadata={"format": "pt"})
        (work / folder / "config.json").write_text(json.dumps(config, indent=2))
    save_file(planted, str(work / "planted.safetensors"))
    del base, tuned, planted
    stamp.write_text(json.dumps({"key": spec.key(), "floors": {}}, indent=2))
    size = (work / "base" / "model.safetensors").stat().st_size
    print(f"generated the pair ({size / 1e9:.3f} GB each) in {time.perf_counter() - t:.0f} s")


def module_deltas(work: Path, modules: list[str]):  # type: ignore[no-untyped-def]
    """Yield ``(module, dW float32, planted B @ A float32)`` one module at a time."""
    with safe_open(str(work / "base" / "model.safetensors"), "pt") as fb, \
            safe_open(str(work / "tuned" / "model.safetensors"), "pt") as ft, \
            safe_open(str(work / "planted.safetensors"), "pt") as fp:
        for m in modules:
            delta = ft.get_tensor(m + ".weight").float() - fb.get_tensor(m + ".weight").float()
            yield m, delta, fp.get_tensor(m + ".B") @ fp.get_tensor(m + ".A")


def eckart_young_floor(work: Path, modules: list[str], rank: int) -> float:
    """Mean over modules of the relative error of dW's best rank-``rank`` approximation (cached in ``pair.json``).

    sigma^2 from the eigenvalues of the float32 Gram matrix of the short side (in float64); the tail energy is
    ||dW||^2 (float64) minus the top ``rank`` of them.
    """
    stamp = work / "pair.json"
    meta = json.loads(stamp.read_text())
    if str(rank) not in meta["floors"]:
        t = time.perf_counter()
        floors = []
        for _, delta, _ in module_deltas(work, modules):
            small = delta if delta.shape[0] <= delta.shape[1] else delta.T  # (k, n), k = min side
            eig = torch.linalg.eigvalsh((small @ small.T).double())  # ascending sigma^2
            total = delta.double().pow(2).sum()
            floors.append(float(((total - eig[-rank:].sum()).clamp_min(0) / total).sqrt()))
        meta["floors"][str(rank)] = statistics.fmean(floors)
        stamp.write_text(json.dumps(meta, indent=2))
        print(f"computed the rank-{rank} Eckart-Young optimum in {time.perf_counter() - t:.0f} s")
    return float(meta["floors"][str(rank)])


def changed_tensors(work: Path) -> tuple[set[str], set[str]]:
    """Names of the pair's tensors that differ between base and tuned, and of those that do not."""
    changed: set[str] = set()
    same: set[str] = set()
    with safe_open(str(work / "base" / "model.safetensors"), "pt") as fb, \
            safe_open(str(work / "tuned" / "model.safetensors"), "pt") as ft:
        names = fb.keys()  # a safe_open handle is not iterable
        for name in names:
            (same if torch.equal(fb.get_tensor(name), ft.get_tensor(name)) else changed).add(name)
    return changed, same


# ---------------------------------------------------------------------------------------------------------------
# Reading an adapter folder as PEFT does


@dataclass
class Adapter:
    """A PEFT LoRA adapter folder: per module the fp32 factors and the scale PEFT applies, plus full tensors."""

    factors: dict[str, tuple[torch.Tensor, torch.Tensor, float]] = field(default_factory=dict)  # B (out,r), A (r,in)
    full: dict[str, tuple[int, ...]] = field(default_factory=dict)  # checkpoint name -> shape (modules_to_save etc.)
    unknown: list[str] = field(default_factory=list)
    tensor_bytes: int = 0
    file_bytes: int = 0
    notes: list[str] = field(default_factory=list)


def pattern_value(patterns: dict[str, float], module: str, default: float) -> float:
    """PEFT's ``get_pattern_key``: the first key ``k`` with ``re.match(rf"(.*\\.)?({k})$", module)``."""
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", module):
            return float(value)
    return default


def read_adapter(folder: Path) -> Adapter:
    config = json.loads((folder / "adapter_config.json").read_text())
    if config.get("peft_type", "LORA") != "LORA":
        raise SystemExit(f"{folder}: peft_type {config.get('peft_type')!r}, not LORA")
    if config.get("use_dora"):
        raise SystemExit(f"{folder}: a DoRA adapter; this benchmark reads plain LoRA only")
    if config.get("fan_in_fan_out"):
        raise SystemExit(f"{folder}: fan_in_fan_out is set, but Llama's projections are nn.Linear")
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise SystemExit(f"{folder}: no .safetensors file (found {sorted(p.name for p in folder.iterdir())})")
    out = Adapter(file_bytes=sum(p.stat().st_size for p in folder.rglob("*") if p.is_file()))
    tensors: dict[str, torch.Tensor] = {}
    for path in files:
        with safe_open(str(path), "pt") as f:
            names = f.keys()  # a safe_open handle is not iterable
            for k in names:
                tensors[k] = f.get_tensor(k)
                out.tensor_bytes += tensors[k].numel() * tensors[k].element_size()
    r_default, alpha_default = float(config["r"]), float(config.get("lora_alpha", config["r"]))
    rank_pattern, alpha_pattern = config.get("rank_pattern") or {}, config.get("alpha_pattern") or {}
    prefix = "base_model.model."
    for key, t in tensors.items():
        name = key.removeprefix(prefix)
        if name.endswith(".lora_A.weight"):
            module = name.removesuffix(".lora_A.weight")
            a = t.float()
            b = tensors[f"{prefix}{module}.lora_B.weight"].float()
            r = pattern_value(rank_pattern, module, r_default)
            if r != a.shape[0]:
                out.notes.append(f"{module}: rank {a.shape[0]} in the file, {r:g} in the config")
            alpha = pattern_value(alpha_pattern, module, alpha_default)
            scale = alpha / (r**0.5 if config.get("use_rslora") else r)
            out.factors[module] = (b, a, scale)
        elif name.endswith(".lora_B.weight"):
            continue
        elif "lora_" in name:
            out.unknown.append(key)
        else:  # a full tensor: modules_to_save ("x.weight" or "x.modules_to_save[.default].weight")
            name = re.sub(r"\.modules_to_save(\.default)?\.", ".", name)
            out.full[name] = tuple(t.shape)
    return out


@dataclass
class Evaluation:
    mean_err: float  # vs tuned - base, mean over the pair's changed projections (a missing module counts 1.0)
    mean_err_planted: float
    missing: list[str]
    saved_unchanged: list[str]
    dropped: list[str]
    adapter: Adapter


def evaluate(work: Path, folder: Path, modules: list[str], changed: set[str], same: set[str]) -> Evaluation:
    adapter = read_adapter(folder)
    errs, errs_planted, missing = [], [], []
    for m, delta, planted in module_deltas(work, modules):
        if m not in adapter.factors:
            missing.append(m)
            errs.append(1.0)
            errs_planted.append(1.0)
            continue
        b, a, scale = adapter.factors[m]
        rec = (b @ a) * scale
        errs.append(float((rec - delta).norm() / delta.norm()))
        errs_planted.append(float((rec - planted).norm() / planted.norm()))
    saved = set(adapter.full) | {m + ".weight" for m in adapter.factors}
    return Evaluation(
        mean_err=statistics.fmean(errs), mean_err_planted=statistics.fmean(errs_planted), missing=missing,
        saved_unchanged=sorted(saved & same), dropped=sorted(changed - saved), adapter=adapter,
    )


def check_reader_with_peft(work: Path, folder: Path, adapter: Adapter) -> str:
    """Merge ``folder`` onto the base with PEFT itself and compare every update with what ``read_adapter`` reads."""
    import warnings

    import peft
    import transformers

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = transformers.AutoModelForCausalLM.from_pretrained(work / "base", dtype=torch.float32)
        base = {k: v.clone() for k, v in model.state_dict().items()}
        merged = peft.PeftModel.from_pretrained(model, str(folder)).merge_and_unload().state_dict()
    worst = 0.0
    for m, (b, a, scale) in adapter.factors.items():
        peft_delta = merged[m + ".weight"] - base[m + ".weight"]
        ours = (b @ a) * scale
        worst = max(worst, float((peft_delta - ours).norm() / ours.norm()))
    for name in adapter.full:
        if name in merged and name in base and not torch.equal(merged[name], base[name]):
            worst = max(worst, 1.0)  # in this pair every saved full tensor equals the base's
    verdict = "agrees" if worst < 1e-5 else "DISAGREES"
    return f"PEFT {peft.__version__} merge_and_unload {verdict} with the reader (worst relative difference {worst:.1e})"


# ---------------------------------------------------------------------------------------------------------------
# Running a tool


WRAPPER = textwrap.dedent(
    """
    import resource, subprocess, sys, time
    log = open(sys.argv[1], "wb")
    t = time.perf_counter()
    rc = subprocess.run(sys.argv[2:], stdout=log, stderr=subprocess.STDOUT).returncode
    wall = time.perf_counter() - t
    use = resource.getrusage(resource.RUSAGE_CHILDREN)
    print(rc, wall, use.ru_utime + use.ru_stime, use.ru_maxrss * 1024)
    """
)


@dataclass
class Run:
    seconds: float
    cpu_seconds: float
    peak_rss: int
    evaluation: Evaluation


def run_tool(argv: list[str], log: Path, env: dict[str, str]) -> tuple[float, float, int]:
    """Wall seconds, CPU seconds (user + system) and peak RSS (bytes) of ``argv`` in a fresh process.

    Measured by a fresh wrapper process, so that ``RUSAGE_CHILDREN`` holds this one child and its own children.
    """
    out = subprocess.run([sys.executable, "-c", WRAPPER, str(log), *argv], capture_output=True, text=True, check=True,
                         env=env)
    rc, seconds, cpu, rss = out.stdout.split()[-4:]
    if rc != "0":
        tail = log.read_text(errors="replace")[-3000:]
        raise SystemExit(f"exit {rc}: {' '.join(argv)}\n--- last output ---\n{tail}")
    return float(seconds), float(cpu), int(rss)


def ours_argv(args: argparse.Namespace, base: Path, tuned: Path, out: Path) -> list[str]:
    exe = Path(sys.executable).parent / "lora-ckpt"
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "lora_ckpt"]
    help_text = subprocess.run([*cmd, "extract", "--help"], check=False, capture_output=True, text=True).stdout
    quiet = ["--quiet"] if "--quiet" in help_text else []
    return [*cmd, "extract", str(base), str(tuned), str(out), "--rank", str(args.rank), *quiet, *args.ours_arg]


def mergekit_argv(args: argparse.Namespace, base: Path, tuned: Path, out: Path) -> list[str]:
    return [args.mergekit_python, "-m", "mergekit.scripts.extract_lora", "--model", str(tuned), "--base-model",
            str(base), "--out-path", str(out), "--max-rank", str(args.rank), "--quiet", "--no-copy-tokenizer",
            *args.mergekit_arg]


def mergekit_version(python: str) -> str:
    code = "import importlib.metadata as m; print(m.version('mergekit'), m.version('torch'), m.version('transformers'))"
    out = subprocess.run([python, "-c", code], check=False, capture_output=True, text=True)
    if out.returncode != 0:
        raise SystemExit(f"--mergekit-python {python}: cannot import mergekit ({out.stderr.strip()[-300:]}); make its "
                         "venv with: python3 -m venv V && V/bin/pip install torch==2.13.0 && V/bin/pip install mergekit")
    mk, tv, tf = out.stdout.split()
    return f"mergekit {mk} (torch {tv}, transformers {tf})"


def peft_full_finetune_route() -> str:
    """Whether the installed PEFT converts a full fine-tune (base + tuned weights) to a LoRA adapter."""
    try:
        import peft
    except ImportError:
        return "PEFT is not installed: its route is absent"
    convert = getattr(peft, "convert_to_lora", None)
    if convert is None:
        return f"PEFT {peft.__version__}: no LoRA conversion at all (convert_to_lora absent): route absent"
    params = list(inspect.signature(convert).parameters)
    # convert_to_lora(model, rank, ...) factors get_delta_weight() of the model's non-LoRA PEFT layers (LoKr, VeRA,
    # FourierFT, ...); it takes no base or tuned weights, so a full fine-tune has no way in.
    if any(p in params for p in ("base_model", "tuned_model", "finetuned_model", "base")):
        return f"PEFT {peft.__version__}: convert_to_lora{tuple(params)} may take a full fine-tune: not benchmarked yet"
    return (f"PEFT {peft.__version__}: convert_to_lora{tuple(params)} converts non-LoRA PEFT adapters (LoKr, VeRA, "
            "FourierFT, ...) to LoRA; it has no conversion from a full fine-tune (base + tuned): route absent, not timed")


# ---------------------------------------------------------------------------------------------------------------
# The report


def fmt_mb(n: float) -> str:
    return f"{n / MB:.1f}" if n < 100 * MB else f"{n / MB:.0f}"


def machine_notes(args: argparse.Namespace) -> str:
    cpu = "?"
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
        cpu = next(line.split(":", 1)[1].strip() for line in lines if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return (f"{platform.node()}: {cpu}, {os.cpu_count()} CPUs, Python {platform.python_version()}, torch "
            f"{torch.__version__} ({torch.get_num_threads()} threads); lora-ckpt {importlib.metadata.version('lora-ckpt')}")


def report(args: argparse.Namespace, spec: PairSpec, argvs: dict[str, list[str]], runs: dict[str, list[Run]],
           floor: float, pair_bytes: int) -> int:
    largest = max(torch.Size(s).numel() for _, s in spec.shape.tensors()) * 2
    bound = 1.5 * largest + 300 * MB
    rows = []
    med: dict[str, dict[str, float]] = {}
    for tool, rs in runs.items():
        ev = rs[-1].evaluation
        m = {
            "time": statistics.median(r.seconds for r in rs),
            "cpu": statistics.median(r.cpu_seconds for r in rs),
            "rss": max(r.peak_rss for r in rs),
            "size": statistics.median(r.evaluation.adapter.file_bytes for r in rs),
            "tensors": ev.adapter.tensor_bytes,
            "err": statistics.median(r.evaluation.mean_err for r in rs),
            "errp": statistics.median(r.evaluation.mean_err_planted for r in rs),
        }
        med[tool] = m
        rows.append([
            tool, f"{m['time']:.2f} ({', '.join(f'{r.seconds:.1f}' for r in rs)})", f"{m['cpu']:.1f}", fmt_mb(m["rss"]),
            f"{fmt_mb(m['size'])} ({len(ev.adapter.factors)} LoRA + {len(ev.adapter.full)} full)",
            f"{m['err']:.5f}", f"{m['errp']:.5f}",
        ])
    ours, mk = med.get("lora-ckpt"), med.get("mergekit")
    if ours and mk:
        rows.append([
            "ratio lora-ckpt / mergekit", f"{ours['time'] / mk['time']:.3f}x", f"{ours['cpu'] / mk['cpu']:.3f}x",
            f"{ours['rss'] / mk['rss']:.2f}x",
            f"{ours['size'] / mk['size']:.3f}x", f"{ours['err'] / mk['err']:.4f}x", f"{ours['errp'] / mk['errp']:.4f}x",
        ])
    head = ["tool", "wall s, median (runs)", "CPU s", "peak RSS MB (max)", "output MB (tensors)",
            "mean rel. err vs tuned-base", "vs planted update"]
    widths = [max(len(str(r[i])) for r in [head, *rows]) for i in range(len(head))]
    line = "| " + " | ".join(h.ljust(w) for h, w in zip(head, widths)) + " |"
    print()
    print(line)
    print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for r in rows:
        print("| " + " | ".join(str(c).ljust(w) for c, w in zip(r, widths)) + " |")
    print(f"Eckart-Young optimum at rank {args.rank} (float32 SVD of tuned-base, mean over modules): {floor:.5f}")
    print(f"versions: {args.versions}; threads per tool: {args.threads or f'torch default ({torch.get_num_threads()})'}")
    for tool, argv in argvs.items():
        print(f"{tool} command: {' '.join(Path(a).name if '/' in a else a for a in argv)}")
    print(f"pair: {spec.shape.layers} layers, hidden {spec.shape.hidden}, intermediate {spec.shape.intermediate}, vocab "
          f"{spec.shape.vocab}, bf16, {pair_bytes / 1e9:.3f} GB each; rank-{spec.delta_rank} updates with "
          f"||dW|| = {spec.delta_rel:g} ||W|| on all {len(projection_modules(spec.shape))} projections")
    for tool, rs in runs.items():
        ev = rs[-1].evaluation
        for note in ev.adapter.notes[:3] + ev.adapter.unknown[:3]:
            print(f"  {tool}: {note}")
    if not ours:
        print("targets: not checked (lora-ckpt was not run)")
        return 0
    misses = 0
    ev = runs["lora-ckpt"][-1].evaluation

    def target(ok: bool, text: str) -> None:
        nonlocal misses
        misses += not ok
        print(f"{'PASS' if ok else '*** MISS ***'}  {text}")

    print("targets (issue 11):")
    if mk:
        equal_err = ours["err"] <= mk["err"] * (1 + 1e-3)
        target(ours["time"] <= 0.15 * mk["time"] and equal_err,
               f"time <= 0.15x mergekit at equal or lower error: {ours['time'] / mk['time']:.3f}x wall "
               f"({ours['cpu'] / mk['cpu']:.3f}x CPU), error "
               f"{ours['err']:.5f} vs {mk['err']:.5f} ({'equal or lower' if equal_err else 'HIGHER'}, 0.1% tolerance)")
    else:
        print("(time target not checked: mergekit was not run)")
    target(ours["rss"] <= bound, f"peak RSS <= 1.5 x largest tensor ({fmt_mb(largest)} MB) + 300 MB = "
           f"{fmt_mb(bound)} MB: {fmt_mb(ours['rss'])} MB = {ours['rss'] / bound:.2f}x of the bound")
    only = not ev.saved_unchanged and not ev.dropped and not ev.missing
    detail = (f"{len(ev.adapter.factors)} LoRA modules + {len(ev.adapter.full)} full tensors; unchanged saved: "
              f"{ev.saved_unchanged[:4] or 'none'}; changed but dropped: {ev.dropped[:4] or 'none'}")
    target(only, "only changed tensors saved, none dropped: " + detail)
    if mk:
        mev = runs["mergekit"][-1].evaluation
        print(f"(mergekit, for reference: {len(mev.adapter.full)} full tensors saved, {len(mev.saved_unchanged)} of "
              f"them unchanged by the fine-tune, {fmt_mb(mev.adapter.tensor_bytes)} MB of tensors)")
    return misses


# ---------------------------------------------------------------------------------------------------------------


def load() -> str:
    """The 1-minute load average: this machine is shared, and other work slows every wall time."""
    return f"{os.getloadavg()[0]:.1f}"


def warm(work: Path) -> None:
    """Read the pair once so that every timed run finds it in the page cache."""
    buf = bytearray(64 << 20)
    for f in ("base/model.safetensors", "tuned/model.safetensors"):
        with open(work / f, "rb", buffering=0) as h:
            while h.readinto(buf):
                pass


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", help="folder for the pair and outputs, about 3 GB free (default: a temp folder)")
    parser.add_argument("--repeat", type=int, default=3, help="alternating runs per tool (medians are reported)")
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--intermediate", type=int, default=5632)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--rank", type=int, default=16, help="extraction rank, the same for both tools")
    parser.add_argument("--delta-rank", type=int, default=16, help="rank of the planted fine-tune update")
    parser.add_argument("--delta-rel", type=float, default=0.01, help="||B @ A|| / ||W|| of the planted update")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true",
                        help="smoke run: 2 layers, hidden 256, intermediate 688, vocab 4096, --repeat 1, --check-peft")
    parser.add_argument("--check-peft", action="store_true",
                        help="also merge each output with PEFT itself and compare with this script's reader")
    parser.add_argument("--mergekit-python", default=DEFAULT_MERGEKIT_PYTHON,
                        help=f"python of a venv with mergekit installed (default {DEFAULT_MERGEKIT_PYTHON})")
    parser.add_argument("--tools", default="lora-ckpt,mergekit", help="comma-separated subset to run, in this order")
    parser.add_argument("--mergekit-repeat", type=int,
                        help="mergekit runs (default: --repeat); made in the first iterations, alternating with ours")
    parser.add_argument("--mergekit-arg", action="append", default=[], help="extra argument for mergekit (repeatable)")
    parser.add_argument("--ours-arg", action="append", default=[], help="extra argument for lora-ckpt (repeatable)")
    parser.add_argument("--threads", type=int,
                        help="OMP_NUM_THREADS and MKL_NUM_THREADS for both tools (default: torch's own choice)")
    parser.add_argument("--keep", action="store_true", help="keep the workdir's pair for the next run")
    args = parser.parse_args()
    if args.quick:
        args.layers, args.hidden, args.intermediate, args.vocab, args.repeat = 2, 256, 688, 4096, 1
        args.check_peft = True
    tools = [t for t in args.tools.split(",") if t]
    args.mergekit_repeat = args.repeat if args.mergekit_repeat is None else min(args.mergekit_repeat, args.repeat)
    if unknown := set(tools) - {"mergekit", "lora-ckpt"}:
        parser.error(f"--tools: unknown {sorted(unknown)}; choose from mergekit, lora-ckpt")
    spec = PairSpec(LlamaShape(args.hidden, args.intermediate, args.layers, args.vocab), args.delta_rank,
                    args.delta_rel, args.seed)

    if args.workdir:
        work = Path(args.workdir) / f"bench-extract-{hashlib.sha1(spec.key().encode()).hexdigest()[:8]}"
        work.mkdir(parents=True, exist_ok=True)
    else:
        work = Path(tempfile.mkdtemp(prefix="bench-extract-"))
    print(machine_notes(args))
    mk_name = mergekit_version(args.mergekit_python) if "mergekit" in tools else "mergekit not run"
    print(mk_name)
    args.versions = f"{mk_name}; lora-ckpt {importlib.metadata.version('lora-ckpt')} (torch {torch.__version__})"
    print(peft_full_finetune_route())
    try:
        write_pair(work, spec)
        modules = projection_modules(spec.shape)
        floor = eckart_young_floor(work, modules, args.rank)
        changed, same = changed_tensors(work)
        pair_bytes = (work / "base" / "model.safetensors").stat().st_size
        base, tuned = work / "base", work / "tuned"
        argvs = {"mergekit": mergekit_argv(args, base, tuned, work / "out-mergekit")}
        if "lora-ckpt" in tools:
            argvs["lora-ckpt"] = ours_argv(args, base, tuned, work / "out-lora-ckpt")
        env = dict(os.environ)
        if args.threads:  # both tools alike: torch reads these at start (MKL's own pool too)
            env.update(OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads))
        warm(work)
        runs: dict[str, list[Run]] = {t: [] for t in tools}
        for i in range(args.repeat):
            for tool in tools:  # alternate, so both see the same machine and page cache conditions
                if tool == "mergekit" and i >= args.mergekit_repeat:
                    continue
                out = work / f"out-{tool}"
                shutil.rmtree(out, ignore_errors=True)
                seconds, cpu, rss = run_tool(argvs[tool], work / f"{tool}.log", env)
                ev = evaluate(work, out, modules, changed, same)
                runs[tool].append(Run(seconds, cpu, rss, ev))
                print(f"run {i + 1}/{args.repeat} {tool}: {seconds:.2f} s ({cpu:.1f} s CPU; load {load()}), peak RSS "
                      f"{fmt_mb(rss)} MB, output {fmt_mb(ev.adapter.file_bytes)} MB, mean rel. error {ev.mean_err:.5f}",
                      flush=True)
        if args.check_peft:
            for tool in tools:
                print(f"{tool}: {check_reader_with_peft(work, work / f'out-{tool}', runs[tool][-1].evaluation.adapter)}")
        misses = report(args, spec, {t: argvs[t] for t in tools}, runs, floor, pair_bytes)
    finally:
        for tool in ("mergekit", "lora-ckpt"):
            shutil.rmtree(work / f"out-{tool}", ignore_errors=True)
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    return 1 if misses else 0


if __name__ == "__main__":
    sys.exit(main())
