"""Fixtures for tests that run real agent and controller processes."""

from __future__ import annotations

import atexit
import os
import shutil
import subprocess
import sys
import tempfile

import psutil
import pytest

from testbed.cluster import Cluster

# The tests' clusters are listed in a registry of their own (`dvs cleanup`), never the user's.
if "DVS_REGISTRY_DIR" not in os.environ:
    os.environ["DVS_REGISTRY_DIR"] = tempfile.mkdtemp(prefix="dvs-test-registry-")
    atexit.register(shutil.rmtree, os.environ["DVS_REGISTRY_DIR"], ignore_errors=True)


def all_pids(cluster: Cluster) -> list[int]:
    return [p.pid for p in cluster.agents.values()] + ([cluster.controller.pid] if cluster.controller else [])


@pytest.fixture
def make_cluster(tmp_path):
    """Start clusters in a temp state dir; stop them after the test and prove nothing is left."""
    started: list[Cluster] = []
    pids: set[int] = set()

    def make(hosts: int, **kw) -> Cluster:
        c = Cluster.up(tmp_path / f"c{len(started)}", hosts, **kw)
        started.append(c)
        return c

    yield make
    for c in started:
        pids.update(all_pids(c))
        c.down()
    left = [pid for pid in pids if psutil.pid_exists(pid) and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE]
    assert not left, f"processes left running: {left}"


def run_dvs(*args: str, state_dir=None, timeout: float = 120) -> subprocess.CompletedProcess:
    """Run the `dvs` command as a user would, in its own process."""
    argv = [sys.executable, "-m", "testbed.cli", *args]
    if state_dir is not None:
        argv += ["--state-dir", str(state_dir)]
    return subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
