"""`dvs events` on a real cluster: a killed host's death, its VMs' HA restarts with their new
hosts and their convergence, in order; faults, hostile frames (rate-limited), --follow, and
every process saying why it stopped."""

from __future__ import annotations

import json
import os
import select
import signal
import subprocess
import sys
import time

import psutil
import pytest
import zmq

from agent.mactable import parse_mac
from testbed import events as evlog
from testbed import procs
from testbed.cluster import Cluster
from tests.conftest import run_dvs

pytestmark = pytest.mark.cluster


def events(sd, *args) -> list[dict]:
    r = run_dvs("events", "--json", *args, state_dir=sd)
    assert r.returncode == 0, r.stderr
    return [json.loads(x) for x in r.stdout.splitlines()]


def wait_for(sd, done, what: str, timeout_s: float = 30.0) -> list[dict]:
    deadline = time.monotonic() + timeout_s
    while True:
        evs = events(sd)
        if done(evs):
            return evs
        if time.monotonic() > deadline:
            pytest.fail(f"no {what} within {timeout_s} s; events: {[(e['proc'], e['kind']) for e in evs]}")
        time.sleep(0.2)  # (polling a file with a deadline)


def test_events_after_kill_show_death_restarts_and_convergence_in_order(tmp_path):
    sd = tmp_path / "state"
    up = run_dvs("up", "--hosts", "4", "--vms", "12", "--vtep-base", "auto", state_dir=sd)
    assert up.returncode == 0, up.stderr
    pids = [h["pid"] for h in json.loads((sd / "cluster.json").read_text())["agents"]]
    try:
        on_h3 = {v["vm"] for v in json.loads(run_dvs("vm", "list", "--json", state_dir=sd).stdout) if v["host"] == "h3"}
        assert len(on_h3) == 3

        # --follow: what arrives while it runs, until SIGTERM.
        fol = subprocess.Popen([sys.executable, "-m", "testbed.cli", "events", "--follow", "--json", "--kind", "move",
                                "--state-dir", str(sd)], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        try:
            assert run_dvs("vm", "move", "vm1", "--to", "h2", state_dir=sd).returncode == 0
            out = b""
            deadline = time.monotonic() + 20
            while out.count(b'"move.converged"') < 13:  # the 12 creates', then the move's
                assert time.monotonic() < deadline, f"--follow showed no move.converged of vm1: {out}"
                if select.select([fol.stdout], [], [], 0.5)[0]:
                    out += os.read(fol.stdout.fileno(), 65536)  # (unbuffered: select sees what is left)
            followed = [json.loads(x) for x in out.decode().splitlines() if x.strip()]
            [op] = [e["op"] for e in followed if e["kind"] == "move.started" and e["op_kind"] == "move"]
            assert [e["kind"] for e in followed if e["op"] == op] == ["move.started", "move.switched",
                                                                      "move.converged"]
        finally:
            fol.send_signal(signal.SIGTERM)
            _, err = fol.communicate(timeout=10)
        assert fol.returncode == 128 + signal.SIGTERM and b"Traceback" not in err, err

        # A fault on h2, then healed.
        assert run_dvs("fault", "loss", "0.2", "--hosts", "h2", state_dir=sd).returncode == 0
        assert run_dvs("fault", "heal", state_dir=sd).returncode == 0

        # Garbage on h1's API socket: dropped, counted, and told once a second, not once a frame.
        # (Sent with the admin key: without it CURVE refuses the connection before any frame.)
        state = json.loads((sd / "cluster.json").read_text())
        cluster = Cluster.load(sd)
        for endpoint, server in ((state["agents"][0]["rpc"], "h1"), (state["controller"]["controller"], "controller")):
            with zmq.Context.instance().socket(zmq.DEALER) as s:
                s.setsockopt(zmq.LINGER, 1000)
                cluster.curve_socket(s, server)
                s.connect(endpoint)
                for _ in range(20):
                    s.send(b"\xc1 not msgpack")

        kill = run_dvs("fault", "kill", "h3", state_dir=sd)
        assert kill.returncode == 0, kill.stderr

        def restarted(evs):
            return on_h3 <= {e["vm"] for e in evs if e["kind"] == "move.converged" and e["op_kind"] == "restart"}

        evs = wait_for(sd, restarted, "convergence of the HA restarts of h3's VMs")
    finally:
        down = run_dvs("down", state_dir=sd)
    assert down.returncode == 0, down.stderr
    assert not [p for p in pids if psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE]

    evs = events(sd)
    assert [e["t_ns"] for e in evs] == sorted(e["t_ns"] for e in evs)
    idx = {id(e): i for i, e in enumerate(evs)}
    [dead] = [e for e in evs if e["kind"] == "host.dead"]
    assert (dead["host"], dead["proc"]) == ("h3", "controller")
    live = {"h1", "h2", "h4"}
    for vm in on_h3:
        [ha] = [e for e in evs if e["kind"] == "ha.restart" and e["vm"] == vm]
        [conv] = [e for e in evs if e["kind"] == "move.converged" and e["vm"] == vm and e["op_kind"] == "restart"]
        assert idx[id(dead)] < idx[id(ha)] < idx[id(conv)]
        assert ha["src"] == "h3" and ha["dst"] in live and conv["dst"] == ha["dst"] and conv["src"] == "h3"
        assert conv["hosts"] == 3 and conv["convergence_ms"] > 0 and conv["switch_ns"] > dead["t_ns"] - 10**9
    kinds = [(e["proc"], e["kind"]) for e in evs]
    assert ("h2", "fault.applied") in kinds and ("h2", "fault.cleared") in kinds
    assert ("controller", "move.started") in kinds and ("controller", "membership.epoch") in kinds
    assert ("h1", "membership.epoch") in kinds
    # A joining agent asks a peer for its whole table.
    assert {p for p, k in kinds if k == "repair.snapshot"} == {"h1", "h2", "h3", "h4"}
    for proc in ("h1", "controller"):
        drops = [e for e in evs if e["kind"] == "frame.dropped" and e["proc"] == proc]
        assert drops and all(e["reason"] == "dropped_malformed" and e["peer"] == "client" for e in drops)
        assert sum((0 if e.get("summary") else 1) + e.get("suppressed", 0) for e in drops) == 20
        assert len(drops) < 20
    # Every process that was not killed says it stopped, and why; h3 was SIGKILLed: it could not.
    down_by = {e["proc"]: e["reason"] for e in evs if e["kind"] == "process.down"}
    assert down_by == {"h1": "SIGTERM", "h2": "SIGTERM", "h4": "SIGTERM", "controller": "SIGTERM"}
    # The next cluster in this state dir starts a story of its own.
    up = run_dvs("up", "--hosts", "1", "--vtep-base", "auto", state_dir=sd)
    try:
        assert up.returncode == 0, up.stderr
        assert not [e for e in events(sd) if e["kind"] == "host.dead"]
    finally:
        assert run_dvs("down", state_dir=sd).returncode == 0
    assert os.listdir(sd / "events")


def test_a_killed_controller_has_written_every_apply_and_move_it_answered(make_cluster):
    """What a controller answered is in its events file though it is SIGKILLed at once (the chaos
    runner's history depends on it): the move's move.converged and every host's apply row."""
    c = make_cluster(3, controller_args=["--events-applies"], vtep_base="off")
    c.create_vms(3)
    with c.controller_client() as ctl:
        rec = ctl.call("vm_move", {"name": "vm1", "to": "h2"})
        vm1 = next(v for v in ctl.call("vm_list")["vms"] if v["vm"] == "vm1")
    os.kill(c.controller.pid, signal.SIGKILL)
    procs.wait_gone(c.controller, timeout_s=5)
    assert rec["converged"]
    evs, bad = evlog.read_all(c.state_dir, procs=["controller"])
    assert bad == 0
    [conv] = [e for e in evs if e["kind"] == "move.converged" and e.get("op_kind") == "move"]
    assert (conv["op"], conv["dst"], conv["seq"], conv["switch_ns"]) == (rec["op"], "h2", 1, rec["switch_ns"])
    rows = [r for e in evs if e["kind"] == "apply.rows" for r in e["rows"]]
    key = (vm1["vlan"], parse_mac(vm1["mac"]), "h2", 1)
    assert {r[1] for r in rows if tuple(r[2:6]) == key} == {"h1", "h2", "h3"}
