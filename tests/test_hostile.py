"""Hostile input against real agent processes (issues 19 and 20): the hostile-peer harness on every
socket, and one regression test per case fixed (the 8 MB subscription, a vNIC backend given as a
host name, VXLAN from an address of no member). The pure-core cases: tests/test_hostile_agent.py."""

from __future__ import annotations

import socket
import time

import psutil
import pytest

from agent import vxlan
from testbed.check import check
from testbed.client import ClusterError
from testbed.hostile import SUBSCRIPTION_BYTES, HostilePeer, agent_counters, raw_subscribe, wait_until_gone

pytestmark = pytest.mark.cluster

MAC1, MAC2 = 0x020000000001, 0x020000000002


def move(cluster, vm: str, to: str) -> dict:
    with cluster.controller_client(timeout_ms=30_000) as ctl:
        return ctl.call("vm_move", {"name": vm, "to": to})


def alive(cluster) -> bool:
    pids = [p.pid for p in cluster.agents.values()] + [cluster.controller.pid]
    return all(psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE for p in pids)


def test_a_hostile_peer_on_every_socket_changes_nothing(make_cluster):
    cluster = make_cluster(3)
    cluster.create_vms(6)
    before = agent_counters(cluster)
    report = HostilePeer(cluster).run()
    assert wait_until_gone(cluster), "the hostile peer is still a member somewhere"
    after = agent_counters(cluster)
    assert alive(cluster)
    for host, a in after.items():
        b = before[host]
        assert a["handler_errors"] == 0, (host, a)
        # (Of what went to rpc, the well-formed requests are answered, the rest dropped and counted.)
        assert a["dropped_malformed"] - b["dropped_malformed"] >= report["rpc_frames_per_agent"] - 11, (host, a, b)
        assert report["subscription_refused"][host] and report["rpc_oversize_refused"][host], report
        assert a["unknown_vtep"] > b["unknown_vtep"], (host, a)
        assert a["vnics"] == b["vnics"] == 0  # the half-valid vnic_plug took nothing
        assert a["rss_bytes"] < b["rss_bytes"] + 64 * 2**20, (host, a["rss_bytes"], b["rss_bytes"])
        if report["admitted"]:  # (the controller admitted "ghost": the agents' gate alone held)
            assert a["forged_claims"] > b["forged_claims"], (host, a)
            assert a["non_member_claims"] > b["non_member_claims"], (host, a)
            assert a["non_member_messages"] > b["non_member_messages"], (host, a)
        errors = report["rpc_errors"][host]
        assert len(errors) == 8 and "ok" not in errors, errors
        assert "not an IPv4 address" in errors[0], errors
    result = check(cluster)
    assert result["ok"], result
    assert move(cluster, "vm1", "h3")["converged"]
    assert check(cluster, settle_s=0)["ok"]


def test_an_8_mb_subscription_is_refused_and_the_agent_stays_small(make_cluster):
    cluster = make_cluster(2)
    proc = cluster.agents["h1"]
    rss_before = psutil.Process(proc.pid).memory_info().rss
    for _ in range(4):
        # The agent hangs up on each (libzmq, on reading the size: the PUB socket takes 256 bytes)...
        assert raw_subscribe(proc.info["pub"], SUBSCRIPTION_BYTES)
        rss = psutil.Process(proc.pid).memory_info().rss
        assert rss < rss_before + 16 * 2**20, (rss_before, rss)
    # ...and answers as ever.
    with cluster.agent_client("h1") as a:
        assert a.call("status")["host"] == "h1"
    cluster.create_vms(1)
    assert move(cluster, "vm1", "h2")["converged"]


def test_a_vnic_backend_given_as_a_host_name_is_refused_whole(make_cluster):
    cluster = make_cluster(1)
    with cluster.agent_client("h1") as a:
        for vnics in ([[MAC1, "127.0.0.1", 9], [MAC2, "localhost", 9]], [[MAC1, "10.0.0.256", 9]],
                      [[MAC1, 2130706433, 9]], [[MAC1, "::1", 9]]):
            with pytest.raises(ClusterError, match="is not an IPv4 address"):
                a.call("vnic_plug", {"vnics": vnics})
        assert a.call("dataplane")["vnics"] == 0  # all or nothing: not even the valid first one
        assert a.call("vnic_plug", {"vnics": [[MAC1, "127.0.0.1", 9]]})["plugged"] == 1
        assert a.call("status")["stats"]["handler_errors"] == 0


def test_vxlan_from_an_address_of_no_member_never_reaches_a_vm(make_cluster):
    cluster = make_cluster(2)
    cluster.create_vms(2)  # vm1 on h1
    with cluster.controller_client() as ctl:
        vm1 = next(v for v in ctl.call("vm_list")["vms"] if v["vm"] == "vm1")
    mac = int(vm1["mac"].replace(":", ""), 16)
    backend = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    intruder = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        backend.bind(("127.0.0.1", 0))
        backend.settimeout(0.5)
        with cluster.agent_client("h1") as a:
            a.call("vnic_plug", {"vnics": [[mac, "127.0.0.1", backend.getsockname()[1]]]})
            backend.recv(2048)  # the link notice: vm1's port is up on h1
            intruder.bind((vxlan.vtep_ip(cluster.vtep_base, "h3"), vxlan.VXLAN_PORT))  # in the block, no member
            frame = vxlan.build_tagged(mac, 0x020000EE0001, vm1["vlan"], vxlan.ETHERTYPE_TEST, b"intruder")
            for _ in range(5):
                intruder.sendto(vxlan.encap(frame, vxlan.vni_of(vm1["vlan"], 10_000)),
                                (vxlan.vtep_ip(cluster.vtep_base, "h1"), vxlan.VXLAN_PORT))
            deadline = time.monotonic() + 5
            while a.call("dataplane")["drops"]["unknown_vtep"] < 5:
                assert time.monotonic() < deadline, a.call("dataplane")["drops"]
                time.sleep(0.05)
        with pytest.raises(TimeoutError):
            backend.recv(2048)  # nothing was delivered to vm1
    finally:
        backend.close()
        intruder.close()
