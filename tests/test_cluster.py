"""A real cluster: controller and agents as OS processes, talking over ZeroMQ."""

from __future__ import annotations

import psutil
import pytest

from testbed.check import check
from testbed.client import Client

pytestmark = pytest.mark.cluster


def move(cluster, vm: str, to: str) -> dict:
    with cluster.controller_client(timeout_ms=30_000) as ctl:
        return ctl.call("vm_move", {"name": vm, "to": to})


def agent_status(cluster, host: str) -> dict:
    with cluster.agent_client(host) as a:
        return a.call("status")


def test_moves_converge_and_tables_match_inventory(make_cluster):
    cluster = make_cluster(4)
    cluster.create_vms(12)
    moves = [("vm1", "h2"), ("vm2", "h4"), ("vm1", "h3"), ("vm5", "h2"), ("vm1", "h4"), ("vm12", "h1")]
    for vm, dst in moves:
        rec = move(cluster, vm, dst)
        assert rec["converged"], rec
        assert rec["dst"] == dst and rec["latency_ms"] >= 0
    # vm1 moved three times: its seq counts the moves (MAC mobility sequence number).
    with cluster.controller_client() as ctl:
        vms = {v["vm"]: v for v in ctl.call("vm_list")["vms"]}
    assert (vms["vm1"]["host"], vms["vm1"]["seq"]) == ("h4", 3)
    result = check(cluster, settle_s=0)
    assert result["ok"], result
    assert len(result["digests"]) == 1
    # Every host sees vm1 on h4; only h4 holds its port locally.
    for host in cluster.agents:
        with cluster.agent_client(host) as a:
            table = a.call("mac_table")
        row = next(e for e in table["entries"] if e["port"] == vms["vm1"]["port"])
        assert (row["host"], row["seq"], row["local"]) == ("h4", 3, host == "h4")


def test_delete_leaves_a_tombstone_everywhere(make_cluster):
    cluster = make_cluster(3)
    cluster.create_vms(3)
    with cluster.controller_client(timeout_ms=30_000) as ctl:
        rec = ctl.call("vm_delete", {"name": "vm2"})
        assert rec["converged"], rec
        assert "vm2" not in {v["vm"] for v in ctl.call("vm_list")["vms"]}
    assert check(cluster, settle_s=0)["ok"]


def test_agent_that_loses_gossip_converges_through_repair(make_cluster):
    # Gossip repair alone: the controller's repair hints (which would hand h3 the entries
    # directly) are off.
    cluster = make_cluster(4, controller_args=["--repair-hint-after-ms", "0"])
    # h3 drops every gossip update it receives: only the repair path can bring it along.
    with cluster.agent_client("h3") as a:
        a.call("faults", {"drop": 1.0, "drop_types": ["UPDATES"]})
    cluster.create_vms(8)
    for vm, dst in [("vm1", "h2"), ("vm2", "h3"), ("vm4", "h1")]:
        assert move(cluster, vm, dst)["converged"]
    s = agent_status(cluster, "h3")
    assert s["stats"]["pulls_sent"] > 0
    assert s["stats"]["repaired_updates"] > 0
    assert check(cluster, settle_s=0)["ok"]


def test_late_joiner_gets_the_table(make_cluster):
    cluster = make_cluster(3)
    cluster.create_vms(9)
    assert move(cluster, "vm1", "h2")["converged"]
    # h4 starts after all that gossip went out: it must rebuild the table from its peers.
    cluster.add_agent("h4")
    with cluster.controller_client(timeout_ms=30_000) as ctl:
        ctl.call("wait_ready", {"hosts": 4, "timeout_ms": 20_000})
    result = check(cluster, settle_s=10)
    assert result["ok"], result
    assert agent_status(cluster, "h4")["mac_entries"] == 9


def test_sigterm_stops_an_agent_cleanly_with_status_0(make_cluster):
    cluster = make_cluster(2)
    proc = psutil.Process(cluster.agents["h2"].pid)
    proc.terminate()
    assert proc.wait(timeout=10) == 0


def test_hostile_frames_are_dropped_counted_and_survived(make_cluster):
    import msgpack

    from agent import wire

    cluster = make_cluster(2)
    cluster.create_vms(2)
    garbage = [
        b"",
        b"\x00\xff garbage",
        b"\x93\x01\x10\x93\x01",  # truncated msgpack
        b"\x93\x01\x10\xa3abc",  # REQUEST whose body is a string
        msgpack.packb([1, 16, [1, 2, 3]]),  # REQUEST with wrong field types
        msgpack.packb([1, 16, ["1", "status", {}]]),  # request id of the wrong type
        msgpack.packb([99, 16, [1, "status", {}]]),  # unknown schema version
        msgpack.packb([1, 999, []]),  # unknown message type
        wire.encode(wire.MsgType.ATTACH, [1, "evil", 100, 5, "vEth9", 0]),  # control msg on the rpc socket
        b"\x00" * (wire.MAX_SMALL_FRAME_BYTES + 10),  # oversize
    ]
    for server, endpoint in (("h1", cluster.agents["h1"].info["rpc"]), ("controller", cluster.controller_endpoint)):
        with Client(endpoint, curve=cluster.curve_for(server)) as c:
            for frame in garbage:
                c.sock.send(frame)
            c.sock.send_multipart([b"a", b"b", b"c"])  # a frame count nobody sends
            # The same connection keeps order: once this answers, every frame above was handled.
            status = c.call("status")
        assert status["dropped_malformed"] >= len(garbage), (endpoint, status)
    assert agent_status(cluster, "h1")["dropped_malformed"] >= len(garbage)
    assert move(cluster, "vm1", "h2")["converged"]
    assert check(cluster, settle_s=0)["ok"]
