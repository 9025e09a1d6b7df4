"""Real-network mode: hosts in network namespaces, partitions as nftables rules."""

from __future__ import annotations

import subprocess

import pytest

from testbed import nemesis
from testbed.check import check
from testbed.netns import unavailable_reason
from tests.conftest import run_dvs

pytestmark = [pytest.mark.cluster,
              pytest.mark.skipif(unavailable_reason() is not None, reason=str(unavailable_reason()))]


def namespaces() -> str:
    return subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout


def test_netns_cluster_partition_by_nftables_and_cleanup(make_cluster):
    # Gossip alone: the controller's repair hints would cross the cut (management network).
    cluster = make_cluster(3, netns=True, controller_args=["--repair-hint-after-ms", "0"])
    tag = cluster.netns.tag
    assert all(f"dvs{tag}-h{i}" in namespaces() for i in (1, 2, 3))
    # Each agent listens on its own namespace's address, not on loopback.
    assert all(p.info["pub"].startswith(f"tcp://10.{cluster.netns.subnet}.") for p in cluster.agents.values())
    cluster.create_vms(6)
    # The agents' own wrappers stay clean: the kernel drops the packets.
    nemesis.partition(cluster, nemesis.groups_to_blocked(list(cluster.agents), [["h1"], ["h2", "h3"]]))
    rules = subprocess.run(["nft", "list", "table", "bridge", f"dvs{tag}"], capture_output=True, text=True).stdout
    assert "drop" in rules
    with cluster.controller_client(timeout_ms=30_000) as ctl:
        ctl.call("vm_move", {"name": "vm2", "to": "h3"})
    result = check(cluster, settle_s=0)
    assert not result["hosts"]["h1"]["ok"] and result["hosts"]["h2"]["ok"]
    with cluster.agent_client("h1") as a:
        assert a.call("faults", {})["blocked"] == []
    nemesis.heal(cluster)
    assert check(cluster, settle_s=20)["ok"]
    cluster.down()
    assert f"dvs{tag}-" not in namespaces()


def test_netns_through_dvs_and_a_clear_reason_without_root(tmp_path, monkeypatch):
    import testbed.netns as netns

    monkeypatch.setattr(netns.os, "geteuid", lambda: 1000)
    assert "needs root" in netns.unavailable_reason()
    proc = run_dvs("up", "--hosts", "2", "--netns", state_dir=tmp_path)  # real root here: works
    assert proc.returncode == 0, proc.stderr
    assert run_dvs("down", state_dir=tmp_path).returncode == 0
