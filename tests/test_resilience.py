"""Real processes under real faults: SIGKILL of an agent, of the controller, and recovery."""

from __future__ import annotations

import os
import signal

import psutil
import pytest

from testbed import headless
from testbed.check import check

pytestmark = pytest.mark.cluster


def vms_by_name(cluster) -> dict:
    with cluster.controller_client() as ctl:
        return {v["vm"]: v for v in ctl.call("vm_list")["vms"]}


def test_killed_agent_vms_restart_elsewhere(make_cluster):
    cluster = make_cluster(4)
    cluster.create_vms(8)  # h3 holds vm3 and vm7
    victim = cluster.agents["h3"].pid
    os.kill(victim, signal.SIGKILL)
    psutil.Process(victim).wait(timeout=5)
    # The controller declares h3 dead after dead_after_ms and restarts its VMs on live hosts.
    result = check(cluster, settle_s=20)
    assert result["ok"], result
    vms = vms_by_name(cluster)
    for name in ("vm3", "vm7"):
        assert vms[name]["host"] != "h3" and vms[name]["seq"] == 1 and vms[name]["state"] == "active"
    assert set(result["hosts"]) == {"h1", "h2", "h4"}
    with cluster.controller_client() as ctl:
        restarts = [m for m in ctl.call("moves")["moves"] if m["kind"] == "restart"]
    assert sorted(m["vm"] for m in restarts) == ["vm3", "vm7"] and all(m["converged"] for m in restarts)


def test_headless_move_then_controller_recovers(make_cluster):
    cluster = make_cluster(4)
    cluster.create_vms(8)
    with cluster.controller_client(timeout_ms=30_000) as ctl:
        assert ctl.call("vm_move", {"name": "vm2", "to": "h4"})["converged"]
    ctl_pid = cluster.controller.pid
    os.kill(ctl_pid, signal.SIGKILL)
    psutil.Process(ctl_pid).wait(timeout=5)

    # Headless: tables still answer, and a move made agent to agent converges everywhere.
    with cluster.agent_client("h1") as a:
        assert len(a.call("mac_table")["entries"]) == 8
    rec = headless.move(cluster, "vm1", "h3")
    assert rec["converged"] and rec["seq"] == 1 and rec["dst"] == "h3", rec
    rec = headless.move(cluster, "vm2", "h1")
    assert rec["converged"] and rec["seq"] == 2, rec

    # The controller comes back on its old endpoint, replays its journal and adopts what the
    # agents hold: nothing lost, the headless moves included.
    cluster.start_controller()
    with cluster.controller_client(timeout_ms=30_000) as ctl:
        ctl.call("wait_ready", {"hosts": 4, "timeout_ms": 20_000})
    result = check(cluster, settle_s=10)
    assert result["ok"], result
    vms = vms_by_name(cluster)
    assert len(vms) == 8
    assert (vms["vm1"]["host"], vms["vm1"]["seq"]) == ("h3", 1)
    assert (vms["vm2"]["host"], vms["vm2"]["seq"]) == ("h1", 2)
    # And it can move VMs again, handing out seqs above the headless ones.
    with cluster.controller_client(timeout_ms=30_000) as ctl:
        rec = ctl.call("vm_move", {"name": "vm2", "to": "h2"})
    assert rec["converged"] and rec["seq"] == 3
