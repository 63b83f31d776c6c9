"""The CPU benchmark scripts run and print what docs/kernels.md quotes (no timing checked)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _call(script: str, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / script), *args],
        capture_output=True, text=True, env=env, timeout=300, check=False,
    )  # fmt: skip


def _run(script: str, *args: str) -> str:
    done = _call(script, *args)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


def test_model_cpu_prints_one_ratio_per_mode() -> None:
    out = _run("model_cpu.py", "--smoke", "--threads", "1")
    for mode in ("train", "prefill", "generate"):
        line = re.search(rf"^{mode} +tokens/s: modular [\d,]+ \| dense [\d,]+ \| "
                         r"modular/dense (\d+\.\d\d)x$", out, re.M)  # fmt: skip
        assert line, f"no {mode} line in:\n{out}"
        assert float(line.group(1)) > 0
    assert "backend cpu" in out


def test_model_cpu_runs_the_reference_backend_when_asked() -> None:
    out = _run("model_cpu.py", "--smoke", "--threads", "1", "--modes", "prefill",
               "--kernels", "reference")  # fmt: skip
    assert "backend reference" in out
    assert re.search(r"^prefill +tokens/s: .* modular/dense \d+\.\d\dx$", out, re.M), out


def test_model_cpu_refuses_a_misspelt_mode_in_one_line() -> None:
    done = _call("model_cpu.py", "--modes", "train,prefil")
    assert done.returncode == 2
    assert "--modes: prefil; choose from train, prefill, generate" in done.stderr
    assert "Traceback" not in done.stderr


def test_model_cpu_compares_cached_generation_with_rescoring() -> None:
    out = _run("model_cpu.py", "--smoke", "--threads", "1", "--modes", "generate",
               "--vs-rescoring")  # fmt: skip
    line = re.search(r"^cache +tokens/s: modular cached [\d,]+ \| rescoring [\d,]+ \| "
                     r"cached/rescoring \d+\.\d\dx \((.*)\)$", out, re.M)  # fmt: skip
    assert line, out
    assert line.group(1) == "same tokens"
