"""The sans-IO rule (DESIGN.md "Pure core, thin runtime"), checked on the source: the protocol
cores import nothing that does I/O, reads a clock or draws global randomness.

Which modules are cores is a rule, not a list to keep up: every module in agent/, controller/
and testbed/sim/ is one, unless DRIVERS below names it with the reason it may do I/O. A new
module is so checked from the day it lands."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
CORE_PACKAGES = ("agent", "controller", "testbed/sim")

# The drivers and boundary code among them: what may touch sockets, clocks, processes, files.
DRIVERS = {
    "agent/__main__.py": "the agent process's entry point",
    "agent/runtime.py": "the asyncio/ZeroMQ runtime that drives the core",
    "agent/dpruntime.py": "the data plane runtime: UDP sockets, TAP queues, the --vteps file",
    "agent/rtauth.py": "the runtime's CURVE guard, rpc role gate and key reload (ZeroMQ, loop timers)",
    "agent/rtevents.py": "the runtime's event log writer (a file) and its drop/epoch bookkeeping",
    "agent/zmqloop.py": "ZeroMQ plumbing of both runtimes",
    "agent/tap.py": "TAP devices of the data plane runtime",
    "agent/lifeline.py": "watches the owner process",
    "agent/metrics.py": "the Prometheus endpoint",
    "agent/clusterfile.py": "reads a cluster file from disk",
    "agent/faults.py": "the transport wrapper's fault injection (its own seeded RNG, at the boundary)",
    "controller/__main__.py": "the controller process's entry point",
    "controller/runtime.py": "the asyncio/ZeroMQ runtime that drives the core",
    "controller/journal.py": "the journal file (write, fsync, repair)",
    "controller/groupcommit.py": "the journal's writer thread (write, fsync) and the messages held for it",
    "testbed/sim/command.py": "the `dvs sim` command: wall-clock progress and timing",
}

# Modules a core may not import (any submodule included). `os` too: DESIGN.md's list.
FORBIDDEN = {"asyncio", "zmq", "socket", "time", "random", "os", "threading", "subprocess", "selectors",
             "uvloop", "psutil", "signal"}
# The simulator draws every random choice from `random.Random` instances it seeds from the
# run's seed; the module's global functions (random.random(), random.choice()) are not allowed.
SEEDED_RANDOM_OK = "testbed/sim/"


def core_modules() -> list[str]:
    found = []
    for pkg in CORE_PACKAGES:
        for path in sorted((ROOT / pkg).glob("*.py")):
            rel = path.relative_to(ROOT).as_posix()
            if rel not in DRIVERS:
                found.append(rel)
    return found


def violations(rel: str, source: str) -> list[str]:
    bad = []
    seeded_ok = rel.startswith(SEEDED_RANDOM_OK)
    for node in ast.walk(ast.parse(source, rel)):
        if isinstance(node, ast.Import):
            for alias in node.names:
                top = alias.name.split(".")[0]
                if top in FORBIDDEN and not (seeded_ok and alias.name == "random" and alias.asname is None):
                    bad.append(f"line {node.lineno}: import {alias.name}")
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            top = node.module.split(".")[0]
            if top in FORBIDDEN:
                names = [a.name for a in node.names]
                if not (seeded_ok and node.module == "random" and names == ["Random"]):
                    bad.append(f"line {node.lineno}: from {node.module} import {', '.join(names)}")
        elif (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "random"
              and node.attr != "Random"):
            bad.append(f"line {node.lineno}: random.{node.attr} (global randomness; seed a random.Random)")
    return bad


def test_the_rule_finds_the_cores_and_every_driver_it_excuses_exists():
    cores = core_modules()
    for must in ("agent/core.py", "agent/effects.py", "agent/dataplane.py", "agent/mactable.py",
                 "controller/core.py", "testbed/sim/engine.py", "testbed/sim/routing.py"):
        assert must in cores
    assert [d for d in DRIVERS if not (ROOT / d).exists()] == []


@pytest.mark.parametrize("rel", core_modules())
def test_a_core_module_imports_no_io_clock_or_global_randomness(rel: str):
    assert violations(rel, (ROOT / rel).read_text()) == []


@pytest.mark.parametrize("source, expected", [
    ("import time", ["line 1: import time"]),
    ("import zmq.asyncio", ["line 1: import zmq.asyncio"]),
    ("from asyncio import Event", ["line 1: from asyncio import Event"]),
    ("def f():\n    import socket", ["line 2: import socket"]),
    ("import random", ["line 1: import random"]),
    ("import heapq\nfrom collections import deque", []),
])
def test_the_check_catches_what_it_must(source: str, expected: list[str]):
    assert violations("agent/x.py", source) == expected


def test_the_simulator_may_seed_its_own_random_but_not_use_the_global_one():
    assert violations("testbed/sim/x.py", "import random\nrng = random.Random('1/net')") == []
    assert violations("testbed/sim/x.py", "import random\nx = random.random()") == [
        "line 2: random.random (global randomness; seed a random.Random)"]
    assert violations("testbed/sim/x.py", "from random import choice") == ["line 1: from random import choice"]
