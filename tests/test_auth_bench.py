"""`dvs bench` phase curve (issue 13 item 6): moves with CURVE and without in one sitting, the
overhead in bench.json and the Markdown; `--insecure` warns."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

pytestmark = pytest.mark.cluster


def run_bench(*args: str, timeout: float = 180) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "testbed.bench", *args], capture_output=True, text=True,
                          timeout=timeout)


def test_phase_curve_measures_both_kinds_of_cluster(tmp_path):
    out = tmp_path / "out"
    proc = run_bench("--hosts", "2", "--vms", "4", "--moves", "6", "--phases", "curve", "--json", "--no-docs",
                     "--out", str(out))
    assert proc.returncode == 0, proc.stderr[-4000:]
    cv = json.loads(proc.stdout)["results"]["curve"]
    assert (cv["hosts"], cv["moves_per_mode"], cv["rounds"]) == (2, 6, 2)
    for mode in ("curve", "insecure"):
        assert cv[mode]["converged"] == 6 and cv[mode]["latency_ms"]["count"] == 6, cv
    assert set(cv["overhead_pct"]) == {"p50", "p99"}
    assert "CURVE on and off" in (out / "benchmarks.md").read_text()


def test_insecure_bench_warns(tmp_path):
    proc = run_bench("--hosts", "2", "--vms", "2", "--moves", "2", "--phases", "moves", "--insecure", "--json",
                     "--no-docs", "--out", str(tmp_path / "out"))
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "--insecure" in proc.stderr and "no CURVE" in proc.stderr
