"""Interruption safety of a streamed ``lora-ckpt merge`` of a >= 300 MB checkpoint: kill it, then check.

1. Builds, once, in ``--workdir``: a Llama-shaped sharded bf16 base checkpoint (about 333 MB), a rank-16
   PEFT adapter (the one merged) and a second one (seed 2, merged into the "old" outputs that the
   ``--force`` trials replace). Every input file is hashed (sha256).
2. References: one uninterrupted ``lora-ckpt merge BASE ADAPTER OUT --quiet`` per output kind (a model
   folder; a model folder sharded with ``--max-shard-size 100MB``; a ``.safetensors`` file), timed and
   hashed, plus the old outputs (the second adapter). The folder reference is made twice, to show the
   output is deterministic (otherwise comparing with it would prove nothing).
3. ``--trials`` SIGKILL trials: a merge into a new output, or replacing an old complete output with
   ``--force``, killed at a random moment (seeded) between 0 and the reference duration. Checked:
   (a) the output is absent (new) / the old output (replace) / the complete new output, never partial;
   (b) the inputs are unchanged (hashes, and nothing added beside them);
   (c) leftovers ``.OUT.lora-ckpt-*`` beside the output (count, bytes);
   (d) the same command again (with ``--force`` where an output exists) exits 0, reports on stderr each
       leftover it removed or put back, leaves no ``.lora-ckpt-`` entry, and its output is the reference.
4. ``--signal-trials`` SIGTERM and as many SIGINT trials, sent at a random moment between when the command
   has installed its signal handlers (seen in /proc/PID/status) and when the reference had its output in
   place: exit 143 / 130, stderr exactly one line and no
   traceback, no leftovers at all, inputs unchanged, the output absent (new) or the old one (replace).
   Where the new output was already in place when the signal was sent, exit 0 is right; dying by the
   signal ("late") or exiting 143 / 130 saying it was interrupted ("mislabeled") are counted apart, as is
   a signal sent before that which the merge survives to exit 0 ("lost").

Prints a row per trial and a summary; exits 1 on any violation.

Run: ``python benchmarks/kill_trials.py [--workdir DIR] [--trials 20] [--signal-trials 5] [--seed 0]``
(about 5 minutes on 2 cores; needs about 3 GB of disk).
"""

from __future__ import annotations

import argparse
import hashlib
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import torch

from lora_ckpt.testing.llama import LlamaShape, write_llama_adapter, write_llama_checkpoint

SHAPE = LlamaShape(hidden=1024, intermediate=2752, layers=8, vocab=32000)  # 333 MB in bf16
SHARD_BYTES = 100 << 20
CLI = str(Path(sys.executable).with_name("lora-ckpt"))
KINDS = {  # name -> (output name, extra arguments)
    "folder": ("merged", []),
    "sharded": ("merged", ["--max-shard-size", "100MB"]),
    "file": ("merged.safetensors", []),
}
LEFTOVER_LINE = re.compile(r"^lora-ckpt: (removed (?P<name>\S+), left by|put back (?P<target>.+), moved aside by) "
                           r"an interrupted run \(pid (?P<pid>\d+)\)$")

VIOLATIONS = {
    "partial": "(a) output neither absent/old nor the complete new one",
    "inputs": "(b) inputs changed (or something added beside them)",
    "exit": "signal trial: exit code not 143 / 130",
    "stderr": "signal trial: stderr not exactly one line / a traceback",
    "leftover_sig": "signal trial: leftovers after SIGTERM / SIGINT",
    "lost": "signal trial: sent while the merge ran, before its output was in place, yet exit 0 (signal lost)",
    "late": "signal trial: sent after the new output was in place; died by it (-15 / -2), no message",
    "mislabeled": "signal trial: sent after the new output was in place; exit 143 / 130 saying interrupted",
    "stray": "unexpected entries beside the output (not a staging name)",
    "rerun_exit": "(d) rerun did not exit 0",
    "rerun_report": "(d) rerun did not report exactly the leftovers it cleaned",
    "rerun_left": "(d) .lora-ckpt- entries remain after the rerun",
    "rerun_output": "(d) rerun output differs from the reference",
}


# ----------------------------------------------------------------------------------------------- helpers


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb", buffering=0) as f:
        buf = bytearray(8 << 20)
        view = memoryview(buf)
        while n := f.readinto(buf):
            h.update(view[:n])
    return h.hexdigest()


def tree_hashes(path: Path) -> dict[str, str] | None:
    """``{relative path: sha256}`` of a file or every file under a folder; None if ``path`` does not exist.

    Anything that is not a plain file or folder is recorded as such, so it never matches a reference.
    """
    if not os.path.lexists(path):
        return None
    if path.is_symlink() or not (path.is_dir() or path.is_file()):
        return {".": "not a plain file or folder"}
    if path.is_file():
        return {".": sha256(path)}
    out: dict[str, str] = {}
    for p in sorted(path.rglob("*")):
        rel = str(p.relative_to(path))
        out[rel] = sha256(p) if p.is_file() and not p.is_symlink() else ("folder" if p.is_dir() else "other")
    return out


def size_of(path: Path) -> int:
    if path.is_symlink() or path.is_file():
        return path.lstat().st_size
    return sum(p.lstat().st_size for p in path.rglob("*") if p.is_file() or p.is_symlink())


def staging_entries(parent: Path, name: str) -> list[Path]:
    return sorted(p for p in parent.iterdir() if p.name.startswith(f".{name}.lora-ckpt-"))


def any_lora_ckpt_entries(parent: Path) -> list[Path]:
    return sorted(p for p in parent.iterdir() if ".lora-ckpt-" in p.name)


def copy_output(src: Path, dst: Path) -> None:
    if src.is_dir():
        shutil.copytree(src, dst)
    else:
        shutil.copy2(src, dst)


def remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif os.path.lexists(path):
        path.unlink()


def run_cli(args: list[str]) -> tuple[int, str, str, float]:
    t = time.perf_counter()
    p = subprocess.run([CLI, *args], capture_output=True, text=True)
    return p.returncode, p.stdout, p.stderr, time.perf_counter() - t


def timed_reference(args: list[str], out: Path) -> tuple[int, str, float, float, float]:
    """Run the CLI, polling beside ``out``: exit code, stderr, seconds, when a staging entry first appeared
    and when ``out`` appeared (the window in which a kill can leave something behind)."""
    t = time.perf_counter()
    proc = subprocess.Popen([CLI, *args], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    staged_at = installed_at = float("nan")
    while proc.poll() is None:
        now = time.perf_counter() - t
        if staged_at != staged_at and staging_entries(out.parent, out.name):
            staged_at = now
        if installed_at != installed_at and os.path.lexists(out):
            installed_at = now
        time.sleep(0.005)
    secs = time.perf_counter() - t
    if installed_at != installed_at and os.path.lexists(out):
        installed_at = secs
    return proc.returncode, proc.stderr.read() if proc.stderr else "", secs, staged_at, installed_at


def installed_now(out: Path, old_ino: int | None) -> bool:
    """Whether a new output is in place: ``out`` exists (a new output) or is no longer the old one (replace)."""
    try:
        st = out.lstat()
    except FileNotFoundError:
        return False
    return old_ino is None or st.st_ino != old_ino


def handler_installed(pid: int) -> bool:
    """True once the process catches SIGTERM (Python catches SIGINT from the start; SIGTERM only the CLI)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("SigCgt:"):
                    return bool(int(line.split()[1], 16) >> (signal.SIGTERM - 1) & 1)
    except (FileNotFoundError, ProcessLookupError):
        pass
    return False


def fmt_mb(n: int) -> str:
    return f"{n / 1e6:.1f}"


# ----------------------------------------------------------------------------------------------- setup


@dataclass
class Setup:
    work: Path
    base: Path
    adapter: Path
    adapter_old: Path
    inputs: dict[str, str]  # every input file -> sha256
    input_listing: dict[str, list[str]]  # every input folder -> its entries
    ref: dict[str, dict[str, str]] = field(default_factory=dict)  # kind -> hashes of the new output
    old: dict[str, Path] = field(default_factory=dict)  # kind -> a complete old output (copied per trial)
    old_hashes: dict[str, dict[str, str]] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)  # kind -> reference duration
    installed_at: dict[str, float] = field(default_factory=dict)  # kind -> when the reference output appeared

    def input_state(self) -> tuple[dict[str, str], dict[str, list[str]]]:
        files = {}
        listing = {}
        for folder in (self.base, self.adapter, self.adapter_old):
            listing[str(folder)] = sorted(os.listdir(folder))
            for p in sorted(folder.iterdir()):
                files[str(p)] = sha256(p)
        return files, listing

    def inputs_unchanged(self) -> bool:
        return self.input_state() == (self.inputs, self.input_listing)


def build(work: Path) -> Setup:
    t = time.perf_counter()
    base = write_llama_checkpoint(work / "inputs" / "base", SHAPE, dtype=torch.bfloat16, shard_bytes=SHARD_BYTES)
    adapter = write_llama_adapter(work / "inputs" / "adapter", SHAPE, rank=16)
    adapter_old = write_llama_adapter(work / "inputs" / "adapter_old", SHAPE, rank=16, seed=2)
    s = Setup(work, base, adapter, adapter_old, {}, {})
    s.inputs, s.input_listing = s.input_state()
    total = sum((work / "inputs" / d / f).stat().st_size for d in ("base", "adapter") for f in os.listdir(work / "inputs" / d))
    print(f"inputs: base {fmt_mb(size_of(base))} MB in {len(list(base.glob('*.safetensors')))} shards "
          f"(LlamaShape{SHAPE.hidden, SHAPE.intermediate, SHAPE.layers, SHAPE.vocab}, bf16), adapter rank 16 "
          f"{fmt_mb(size_of(adapter))} MB; {fmt_mb(total)} MB merged inputs; built and hashed in "
          f"{time.perf_counter() - t:.1f} s")

    refs = work / "refs"
    refs.mkdir()
    for kind, (name, extra) in KINDS.items():
        out = refs / kind / name
        out.parent.mkdir()
        rc, err, secs, staged_at, installed_at = timed_reference(
            ["merge", str(base), str(adapter), str(out), "--quiet", *extra], out)
        if rc != 0:
            sys.exit(f"reference merge ({kind}) failed with exit {rc}: {err}")
        s.ref[kind], s.seconds[kind], s.installed_at[kind] = tree_hashes(out) or {}, secs, installed_at
        old = refs / kind / f"old-{name}"
        rc, _, err, _ = run_cli(["merge", str(base), str(adapter_old), str(old), "--quiet", *extra])
        if rc != 0:
            sys.exit(f"old-output merge ({kind}) failed with exit {rc}: {err}")
        s.old[kind], s.old_hashes[kind] = old, tree_hashes(old) or {}
        assert s.old_hashes[kind] != s.ref[kind], "the old output must differ from the new one"
        files = ", ".join(sorted(s.ref[kind]))
        print(f"reference {kind:8s}: {secs:5.2f} s (staging entry from {staged_at:.2f} s, output installed at "
              f"{installed_at:.2f} s), {fmt_mb(size_of(out))} MB ({files})")
        remove(out)  # only the hashes are needed
    again = refs / "again" / "merged"
    again.parent.mkdir()
    rc, _, err, _ = run_cli(["merge", str(base), str(adapter), str(again), "--quiet"])
    if rc != 0 or tree_hashes(again) != s.ref["folder"]:
        sys.exit(f"a second uninterrupted merge differs from the first (exit {rc}, {err.strip()}): "
                 "the output is not deterministic, so comparing with a reference proves nothing")
    remove(again.parent)
    print("determinism: a second uninterrupted folder merge is byte-identical to the first")
    if not s.inputs_unchanged():
        sys.exit("the reference merges changed the inputs")
    return s


# ----------------------------------------------------------------------------------------------- trials


@dataclass
class Trial:
    n: int
    sig: str
    kind: str
    replace: bool
    delay: float = 0.0
    rc: int | None = None
    state: str = ""  # absent / old / new / PARTIAL
    leftovers: int = 0
    leftover_bytes: int = 0
    leftover_kinds: str = ""
    rerun_rc: int | None = None
    reported: int = 0
    cleaned: int = 0
    remaining: int = 0
    violations: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def start(s: Setup, trial: Trial, out: Path) -> subprocess.Popen[str]:
    _, extra = KINDS[trial.kind]
    cmd = [CLI, "merge", str(s.base), str(s.adapter), str(out), "--quiet", *extra]
    if trial.replace:
        cmd.append("--force")
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def output_state(s: Setup, trial: Trial, out: Path) -> str:
    hashes = tree_hashes(out)
    if hashes is None:
        return "absent"
    if hashes == s.ref[trial.kind]:
        return "new"
    if trial.replace and hashes == s.old_hashes[trial.kind]:
        return "old"
    return "PARTIAL"


def prepare_dir(s: Setup, trial: Trial) -> tuple[Path, Path]:
    parent = s.work / "trials" / f"t{trial.n:02d}"
    parent.mkdir(parents=True)
    out = parent / KINDS[trial.kind][0]
    if trial.replace:
        copy_output(s.old[trial.kind], out)
    return parent, out


def kill_trial(s: Setup, trial: Trial, rng: random.Random) -> None:
    parent, out = prepare_dir(s, trial)
    trial.delay = rng.uniform(0.0, s.seconds[trial.kind])
    proc = start(s, trial, out)
    t0 = time.perf_counter()
    time.sleep(max(0.0, trial.delay - (time.perf_counter() - t0)))
    if proc.poll() is None:
        proc.send_signal(signal.SIGKILL)
    else:
        trial.notes.append("finished before the kill")
    proc.communicate()
    trial.rc = proc.returncode

    # (a) the output: absent / old / complete new, never partial
    trial.state = output_state(s, trial, out)
    if trial.state == "PARTIAL" or (trial.state == "absent" and trial.replace):
        trial.violations.append("partial")
    # (b) inputs
    if not s.inputs_unchanged():
        trial.violations.append("inputs")
    # (c) leftovers beside the output
    left = staging_entries(parent, out.name)
    stray = [p for p in parent.iterdir() if p != out and p not in left]
    if stray:
        trial.violations.append("stray")
        trial.notes.append("stray: " + ", ".join(p.name for p in stray))
    trial.leftovers = len(left)
    trial.leftover_bytes = sum(size_of(p) for p in left)
    trial.leftover_kinds = ",".join(sorted(p.name.rsplit(".", 1)[-1] for p in left))

    # (d) the same command again (with --force where an output exists now)
    _, extra = KINDS[trial.kind]
    existed = os.path.lexists(out)
    force = trial.replace or existed
    if force and not trial.replace:
        trial.notes.append("rerun with --force (the killed run had finished)")
    rc, _, err, _ = run_cli(["merge", str(s.base), str(s.adapter), str(out), "--quiet", *extra,
                             *(["--force"] if force else [])])
    trial.rerun_rc = rc
    if rc != 0:
        trial.violations.append("rerun_exit")
        trial.notes.append(f"rerun stderr: {err.strip()[:300]}")
    removed, put_back = [], []
    for line in err.splitlines():
        m = LEFTOVER_LINE.match(line)
        if m and m.group("name"):
            removed.append(m.group("name"))
        elif m:
            put_back.append(m.group("target"))
    trial.reported = len(removed) + len(put_back)
    # each leftover is reported by its name, except an old output moved aside while the target is missing,
    # which is put back (reported by the target's name)
    olds = [p.name for p in left if p.name.endswith(".old")]
    n_put_back = 1 if olds and not existed else 0
    names = sorted(p.name for p in left)
    rest = sorted(set(names) - set(removed))
    report_ok = (
        len(removed) == len(set(removed)) and set(removed) <= set(names) and len(put_back) == n_put_back
        and all(t == str(out) for t in put_back) and len(rest) == n_put_back and all(r in olds for r in rest)
    )
    if not report_ok:
        trial.violations.append("rerun_report")
        trial.notes.append(f"found {names}, stderr reported removed {removed}, put back {put_back}")
    other = [line for line in err.splitlines() if line and not LEFTOVER_LINE.match(line)]
    if rc == 0 and other:
        trial.notes.append(f"rerun stderr also: {other[:3]}")
    remaining = any_lora_ckpt_entries(parent)
    trial.remaining = len(remaining)
    trial.cleaned = sum(1 for p in left if not os.path.lexists(p))
    if remaining:
        trial.violations.append("rerun_left")
        trial.notes.append("remaining: " + ", ".join(p.name for p in remaining))
    if tree_hashes(out) != s.ref[trial.kind]:
        trial.violations.append("rerun_output")
    if not s.inputs_unchanged() and "inputs" not in trial.violations:
        trial.violations.append("inputs")
    shutil.rmtree(parent)


def signal_trial(s: Setup, trial: Trial, rng: random.Random) -> None:
    parent, out = prepare_dir(s, trial)
    sig = signal.SIGTERM if trial.sig == "TERM" else signal.SIGINT
    old_ino = out.lstat().st_ino if trial.replace else None
    proc = start(s, trial, out)
    t0 = time.perf_counter()
    while not handler_installed(proc.pid) and proc.poll() is None:
        time.sleep(0.002)
    ready = time.perf_counter() - t0
    trial.notes.append(f"handlers at {ready:.2f} s")
    # a moment while the merge works: up to when the reference had its output in place
    end = s.installed_at[trial.kind] if s.installed_at[trial.kind] == s.installed_at[trial.kind] else s.seconds[trial.kind]
    trial.delay = ready + rng.uniform(0.0, max(0.0, end - ready))
    time.sleep(max(0.0, trial.delay - (time.perf_counter() - t0)))
    alive = proc.poll() is None
    installed = installed_now(out, old_ino)  # checked just before the signal: was the new output in place?
    if alive:
        proc.send_signal(sig)
    else:
        trial.notes.append("finished before the signal")
    _, err = proc.communicate()
    trial.rc = proc.returncode
    trial.state = output_state(s, trial, out)
    want = 143 if trial.sig == "TERM" else 130
    lines = err.strip("\n").splitlines()
    one_line = len(lines) == 1 and "Traceback" not in err and lines[0].startswith("lora-ckpt: interrupted")
    if not alive or (installed and trial.rc == 0):
        # the work was done before the signal: exit 0 and the new output is right
        if installed and alive:
            trial.notes.append("signal after the install; exit 0")
        if trial.rc != 0:
            trial.violations.append("exit")
        if trial.state != "new":
            trial.violations.append("partial")
    elif installed:
        # the new output was in place before the signal: it cannot be undone, but the exit should not claim so
        if trial.rc == -sig and not err.strip():
            trial.violations.append("late")
        elif trial.rc == want and one_line:
            trial.violations.append("mislabeled")
        else:
            trial.violations.append("exit")
            trial.notes.append(f"stderr: {err.strip()[-400:]!r}")
        if trial.state != "new":
            trial.violations.append("partial")
    elif trial.rc == 0 and trial.state == "new":
        trial.violations.append("lost")  # the signal reached a running merge and changed nothing
    else:
        expected_state = "old" if trial.replace else "absent"
        if trial.state != expected_state:
            trial.violations.append("partial")
            trial.notes.append(f"output {trial.state}, expected {expected_state}")
        if trial.rc != want:
            trial.violations.append("exit")
        if not one_line:
            trial.violations.append("stderr")
            trial.notes.append(f"stderr: {err.strip()[-400:]!r}")
    if not s.inputs_unchanged():
        trial.violations.append("inputs")
    left = any_lora_ckpt_entries(parent)
    trial.leftovers = len(left)
    trial.leftover_bytes = sum(size_of(p) for p in left)
    trial.leftover_kinds = ",".join(sorted(p.name.rsplit(".", 1)[-1] for p in left))
    if left:
        trial.violations.append("leftover_sig")
        trial.notes.append("left: " + ", ".join(p.name for p in left))
    stray = [p for p in parent.iterdir() if p != out and p not in left]
    if stray:
        trial.violations.append("stray")
        trial.notes.append("stray: " + ", ".join(p.name for p in stray))
    shutil.rmtree(parent)


# ----------------------------------------------------------------------------------------------- report


def row(t: Trial) -> str:
    case = "replace" if t.replace else "new"
    rerun = "-" if t.rerun_rc is None else str(t.rerun_rc)
    rep = "-" if t.rerun_rc is None else f"{t.reported}/{t.leftovers}"
    left = f"{t.leftovers} ({t.leftover_kinds})" if t.leftovers else "0"
    return (f"{t.n:>3} {t.sig:>4} {t.kind:>7} {case:>7} {t.delay:6.2f} {str(t.rc):>4} {t.state:>7} {left:>12} "
            f"{fmt_mb(t.leftover_bytes):>7} {rerun:>5} {rep:>8} {t.remaining:>4}  "
            f"{','.join(t.violations) or 'ok'}{'  ' + '; '.join(t.notes) if t.notes else ''}")


HEADER = (f"{'#':>3} {'sig':>4} {'kind':>7} {'case':>7} {'at_s':>6} {'rc':>4} {'output':>7} {'leftovers':>12} "
          f"{'left_MB':>7} {'rerun':>5} {'reported':>8} {'left':>4}  result")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--workdir", help="where inputs and outputs go (default: a temporary folder, removed at the end)")
    p.add_argument("--trials", type=int, default=20, help="SIGKILL trials")
    p.add_argument("--signal-trials", type=int, default=5, help="SIGTERM trials, and as many SIGINT trials")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--keep", action="store_true", help="keep the work folder")
    args = p.parse_args()
    started = time.perf_counter()
    rng = random.Random(args.seed)
    if args.workdir:
        Path(args.workdir).mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="kill-trials-", dir=args.workdir))
    try:
        s = build(work)
        variants = [(k, r) for k in KINDS for r in (False, True)]
        plan = [("KILL", *variants[i % len(variants)]) for i in range(args.trials)]
        plan += [("TERM", *variants[i % len(variants)]) for i in range(args.signal_trials)]
        plan += [("INT", *variants[(i + 3) % len(variants)]) for i in range(args.signal_trials)]
        rng.shuffle(plan)
        trials = []
        print()
        print(HEADER)
        for n, (sig, kind, replace) in enumerate(plan, 1):
            t = Trial(n, sig, kind, replace)
            (kill_trial if sig == "KILL" else signal_trial)(s, t, rng)
            trials.append(t)
            print(row(t), flush=True)
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    wall = time.perf_counter() - started

    print("\nsummary")
    for sig in ("KILL", "TERM", "INT"):
        ts = [t for t in trials if t.sig == sig]
        if not ts:
            continue
        states = Counter(t.state for t in ts)
        bad = sum(1 for t in ts if t.violations)
        print(f"  SIG{sig:4s}: {len(ts):2d} trials, outputs after the signal: "
              f"{', '.join(f'{k} {v}' for k, v in sorted(states.items()))}; trials with a violation: {bad}")
    kills = [t for t in trials if t.sig == "KILL"]
    found = sum(t.leftovers for t in kills)
    print(f"  leftovers after SIGKILL: {found} in {sum(1 for t in kills if t.leftovers)} trials, "
          f"{fmt_mb(sum(t.leftover_bytes for t in kills))} MB; reported by the rerun: {sum(t.reported for t in kills)}; "
          f"cleaned: {sum(t.cleaned for t in kills)}; remaining after reruns: {sum(t.remaining for t in kills)}")
    counts = Counter(v for t in trials for v in t.violations)
    print("  violations:")
    for key, text in VIOLATIONS.items():
        print(f"    {counts.get(key, 0):3d}  {text}")
    print(f"  wall time {wall:.0f} s")
    return 1 if counts else 0


if __name__ == "__main__":
    sys.exit(main())
