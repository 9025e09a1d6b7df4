"""The nemesis: partitions as data, and real faults on a real cluster."""

from __future__ import annotations

import pytest

from agent.faults import NetFaults, host_of_identity, peek_origin
from agent.wire import MsgType, encode
from testbed import nemesis
from testbed.check import check
from testbed.client import ClusterError
from tests.conftest import run_dvs

HOSTS = ["h1", "h2", "h3", "h4", "h5"]


def test_groups_block_everything_across_and_nothing_within():
    b = nemesis.groups_to_blocked(HOSTS, [["h1", "h2"], ["h3", "h4"]])
    assert b["h1"] == {"h3", "h4", "h5"} and b["h3"] == {"h1", "h2", "h5"} and b["h5"] == {"h1", "h2", "h3", "h4"}
    b = nemesis.groups_to_blocked(HOSTS, [["h1", "controller"], ["h2", "h3", "h4", "h5"]])
    assert b["h1"] == {"h2", "h3", "h4", "h5"} and "controller" in b["h2"] and "controller" not in b["h1"]


@pytest.mark.parametrize("groups,msg", [([["h1"], ["h1", "h2"]], "two partition groups"),
                                        ([["h9"], ["h1"]], "unknown host"),
                                        ([HOSTS], "at least two groups")])
def test_bad_partitions_say_why(groups, msg):
    with pytest.raises(ClusterError, match=msg):
        nemesis.groups_to_blocked(HOSTS, groups)


def test_named_partitions():
    maj = nemesis.named_partition("majority", HOSTS)
    assert maj["h1"] == {"h3", "h4", "h5"} and maj["h3"] == {"h1", "h2"}
    bridge = nemesis.named_partition("bridge", HOSTS)
    assert bridge["h3"] == set() and bridge["h1"] == {"h4", "h5"} and bridge["h5"] == {"h1", "h2"}
    assert nemesis.named_partition("isolate", HOSTS, "h2")["h2"] == {"h1", "h3", "h4", "h5"}
    assert all(b == {"controller"} for b in nemesis.named_partition("controller", HOSTS).values())


def test_fault_plan_is_seeded_and_never_faults_clients():
    frame = encode(MsgType.UPDATES, ["h2", 1, []])
    assert peek_origin(frame) == "h2"
    assert host_of_identity(b"pull:h3") == "h3" and host_of_identity(b"h4#2") == "h4"
    assert host_of_identity(b"\x00k\x8bEg") is None
    plans = []
    for _ in range(2):
        f = NetFaults(seed=5)
        f.configure({"drop": 0.3, "dup": 0.2, "reorder": 0.2, "delay_ms": 2, "jitter_ms": 1})
        plans.append([f.plan("h2", frame) for _ in range(200)])
        assert f.plan(None, frame) == [0.0]  # dvs itself always gets through, so it can heal
    assert plans[0] == plans[1]
    flat = plans[0]
    assert any(p == [] for p in flat) and any(len(p) == 2 for p in flat)
    f = NetFaults()
    f.configure({"blocked": ["h2"]})
    assert f.plan("h2", frame) == [] and f.plan("h3", frame) == [0.0] and not f.may_send("h2")
    with pytest.raises(ValueError, match="unknown fault settings"):
        f.configure({"dorp": 0.1})
    f.configure({"reset": True})
    assert not f.active


@pytest.mark.cluster
def test_partition_during_moves_then_heal_converges(make_cluster):
    # Gossip alone (the controller's repair hints off: they cross the partition on the
    # management connection and would settle the move at once, see the next test).
    cluster = make_cluster(4, controller_args=["--repair-hint-after-ms", "0"])
    cluster.create_vms(8)
    nemesis.partition(cluster, nemesis.groups_to_blocked(list(cluster.agents), [["h1", "h2"], ["h3", "h4"]]))
    with cluster.controller_client(timeout_ms=30_000) as ctl:
        # Only one side can hear it: the move does not converge while the partition lasts...
        ctl.call("vm_move", {"name": "vm1", "to": "h2"})
        assert not check(cluster, settle_s=0)["ok"]
        nemesis.heal(cluster)
        # ...and after the heal repair brings everyone along; new moves converge again.
        assert check(cluster, settle_s=15)["ok"]
        assert ctl.call("vm_move", {"name": "vm3", "to": "h1"})["converged"]


@pytest.mark.cluster
def test_repair_hints_settle_a_move_across_an_agent_partition(make_cluster):
    # The agents are split, the controller reaches both sides: 100 ms after the switchover it
    # sends the far side the entry it could not hear, and the move converges during the cut.
    cluster = make_cluster(4)
    cluster.create_vms(8)
    nemesis.partition(cluster, nemesis.groups_to_blocked(list(cluster.agents), [["h1", "h2"], ["h3", "h4"]]))
    with cluster.controller_client(timeout_ms=30_000) as ctl:
        rec = ctl.call("vm_move", {"name": "vm1", "to": "h2"})
        assert rec["converged"]
        assert check(cluster, settle_s=0)["ok"]
        assert ctl.call("status", {})["repair_hints"] >= 2  # h3 and h4
    nemesis.heal(cluster)


@pytest.mark.cluster
def test_lossy_duplicating_reordering_network_still_converges(make_cluster):
    cluster = make_cluster(4)
    cluster.create_vms(8)
    nemesis.configure(cluster, {h: {"drop": 0.3, "dup": 0.2, "reorder": 0.3, "delay_ms": 1, "jitter_ms": 2,
                                    "seed": i} for i, h in enumerate(cluster.agents)})
    with cluster.controller_client(timeout_ms=30_000) as ctl:
        for vm, dst in [("vm1", "h3"), ("vm2", "h4"), ("vm3", "h1"), ("vm1", "h2")]:
            ctl.call("vm_move", {"name": vm, "to": dst})
    nemesis.heal(cluster)
    assert check(cluster, settle_s=15)["ok"]


@pytest.mark.cluster
def test_pause_longer_than_the_failure_timeout(make_cluster):
    cluster = make_cluster(3)
    cluster.create_vms(6)  # h2 holds vm2 and vm5
    assert run_dvs("fault", "pause", "h2", state_dir=cluster.state_dir).returncode == 0
    # Declared dead: its VMs start elsewhere...
    import time

    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        with cluster.controller_client() as ctl:
            vms = {v["vm"]: v for v in ctl.call("vm_list")["vms"]}
        if vms["vm2"]["host"] != "h2" and vms["vm5"]["host"] != "h2":
            break
        time.sleep(0.2)
    assert vms["vm2"]["host"] != "h2" and vms["vm2"]["seq"] == 1
    # ...and once it resumes it is readmitted and drops its stale ports: one owner per VM.
    assert run_dvs("fault", "resume", "h2", state_dir=cluster.state_dir).returncode == 0
    result = check(cluster, settle_s=15)
    assert result["ok"] and set(result["hosts"]) == {"h1", "h2", "h3"}, result
    with cluster.agent_client("h2") as a:
        assert a.call("status")["ports"] == 0
