"""Real processes under real faults: SIGKILL of an agent, of the controller, and recovery."""

from __future__ import annotations

import json
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
    # The same through `dvs`, which notices the controller is gone and says so.
    from tests.conftest import run_dvs

    proc = run_dvs("vm", "move", "vm2", "--to", "h1", "--json", state_dir=cluster.state_dir)
    assert proc.returncode == 0, proc.stderr
    assert "controller unreachable" in proc.stderr
    rec = json.loads(proc.stdout)
    assert rec["converged"] and rec["seq"] == 2 and rec["headless"], rec
    assert run_dvs("mac-table", "h4", state_dir=cluster.state_dir).returncode == 0

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


def test_restarted_agent_rejoins_and_gets_its_vms_back(make_cluster, tmp_path):
    from tests.conftest import run_dvs

    # A long dead timeout: the restart below must come "before the controller declares h2
    # dead" even on a loaded machine.
    cluster = make_cluster(3, controller_args=["--dead-after-ms", "60000", "--suspect-after-ms", "30000"])
    cluster.create_vms(6)  # h2 holds vm2 and vm5
    with cluster.controller_client(timeout_ms=30_000) as ctl:
        assert ctl.call("vm_move", {"name": "vm1", "to": "h2"})["converged"]
    old = cluster.agents["h2"]
    os.kill(old.pid, signal.SIGKILL)
    psutil.Process(old.pid).wait(timeout=5)
    # Back before the controller declares it dead: a new incarnation, an empty table.
    proc = run_dvs("agent", "start", "h2", state_dir=cluster.state_dir)
    assert proc.returncode == 0, proc.stderr
    cluster.agents["h2"] = type(cluster).load(cluster.state_dir).agents["h2"]
    result = check(cluster, settle_s=15)
    assert result["ok"], result
    vms = vms_by_name(cluster)
    # Its VMs died with it and started again on it with a new seq; nothing else moved.
    assert {n: (v["host"], v["seq"]) for n, v in vms.items() if n in ("vm1", "vm2", "vm5")} == {
        "vm1": ("h2", 2), "vm2": ("h2", 1), "vm5": ("h2", 1)}
    with cluster.agent_client("h2") as a:
        st = a.call("status")
    assert st["incarnation"] != 0 and st["mac_entries"] == 6 and st["ports"] == 3
