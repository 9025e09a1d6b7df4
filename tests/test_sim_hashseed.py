"""`dvs sim --json` does not depend on the interpreter's string hashing: two processes with
different PYTHONHASHSEED print the same bytes (set and dict order of str keys differs between
them, so any iteration over a set of names that reached the output or the RNG would show)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

# A small run with every fault kind: loss, duplication, reordering on the control connection
# too, a partition that takes the controller's side, agent crashes with and without restart,
# and a controller crash.
ARGS = ["--hosts", "12", "--vms", "48", "--moves", "24", "--loss", "0.2", "--dup", "0.1", "--reorder",
        "--ctl-faults", "--partitions", "300-1800:h1-h4,ctl/h5-h8", "--crashes", "h3@100-1500,h10@400,ctl@900-2200",
        "--seed", "7"]


def run(args: list[str], hashseed: str, cwd) -> bytes:
    env = {**os.environ, "PYTHONHASHSEED": hashseed}
    res = subprocess.run([sys.executable, "-m", "testbed.cli", "sim", *args, "--json"], env=env, cwd=cwd,
                         capture_output=True, timeout=120)
    assert res.returncode in (0, 1), res.stderr.decode()
    assert res.stdout.startswith(b"{"), res.stderr.decode()
    return res.stdout


@pytest.mark.parametrize("args", [ARGS, ["--hosts", "8", "--vms", "32", "--workload", "evacuate", "--concurrency", "2",
                                         "--loss", "0.1", "--crashes", "h5@200-1200,ctl@500-1500", "--seed", "2"]],
                         ids=["moves", "evacuate"])
def test_sim_json_is_byte_identical_under_different_hash_seeds(tmp_path, args):
    hashes = {subprocess.run([sys.executable, "-c", "print(hash('h1'))"], env={**os.environ, "PYTHONHASHSEED": s},
                             capture_output=True, text=True, check=True).stdout for s in ("1", "4242")}
    assert len(hashes) == 2  # the two seeds do hash strings differently
    a = run(args, "1", tmp_path)
    b = run(args, "4242", tmp_path)
    assert a == b
