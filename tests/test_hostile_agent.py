"""Hostile input on the agent side, driven through the pure cores (issues 19 and 20): forged and
non-member claims (the membership gate), VXLAN from VTEPs of no member, vNIC bindings taken all
or nothing. The same cases against real processes are in tests/test_hostile.py."""

from __future__ import annotations

import pytest

from agent import vxlan, wire
from agent.core import MEMBERSHIP_GRACE_SUSPECTS, AgentCore
from agent.dataplane import Dataplane
from agent.effects import Reply
from agent.mactable import Entry, MacTable
from agent.switch import LocalSwitch
from agent.wire import MsgType
from tests.effect_router import route
from tests.test_agent_core import INC, VLAN, Cluster, key, mac_of

GHOST_SEQ = 4_000_000_000  # what issue 19's fake member claimed


def updates(origin: str, rows: list[tuple], incarnation: int = INC) -> bytes:
    """An UPDATES frame from `origin`: rows (n, vm, host, seq)."""
    return wire.encode(MsgType.UPDATES, [origin, incarnation,
                                         [[n, VLAN, mac_of(vm), host, f"vEth{vm}", seq, False] for n, vm, host, seq in rows]])


def three() -> Cluster:
    c = Cluster(["h1", "h2", "h3"])
    c.attach("h1", 1)
    c.attach("h3", 3)
    return c


# ------------------------------------------------------------------ gossip


def test_a_member_publishing_a_claim_for_another_host_is_dropped_and_counted():
    c = three()
    h1 = c.cores["h1"]
    before = h1.table.as_placement()
    n = c.cores["h2"].n + 1
    # h2 (a member) says vm1 now lives on h3 with a huge seq: h3 never numbered that.
    h1.on_frame("sub", updates("h2", [(n, 1, "h3", GHOST_SEQ)]), c.now)
    assert h1.table.as_placement() == before
    assert h1.stats.forged_claims == 1 and h1.stats.updates_applied == 2
    # The number still counts as received: h2's update n is what it is, pulling it changes nothing.
    assert h1.peers["h2"].contiguous == n and h1.peers["h2"].missing_range() is None
    # Honest rows of the same message are taken.
    h1.on_frame("sub", updates("h2", [(n + 1, 7, "h2", 0), (n + 2, 1, "ghost", GHOST_SEQ)]), c.now)
    assert h1.table.get(key(7)) == Entry("h2", "vEth7", 0) and h1.table.get(key(1)).host == "h1"
    assert h1.stats.forged_claims == 2
    c.pump()


def test_a_claim_from_a_name_nobody_admitted_is_dropped_and_leaves_no_state():
    c = three()
    h1 = c.cores["h1"]
    before = h1.table.as_placement()
    h1.on_frame("sub", updates("ghost", [(1, 1, "ghost", GHOST_SEQ), (2, 3, "ghost", GHOST_SEQ)]), c.now)
    h1.on_frame("sub", wire.encode(MsgType.HEARTBEAT, ["ghost", 1, 9, 0, 0]), c.now)
    assert h1.table.as_placement() == before
    assert (h1.stats.non_member_claims, h1.stats.non_member_messages) == (2, 1)
    assert "ghost" not in h1.peers and not h1.is_member("ghost")
    c.pump()
    # ...and the next real move of vm1 is not refused as "stale".
    assert c.move(1, "h1", "h2", 1) == (True, "switched")


def test_simulator_hot_path_gates_the_same_way():
    c = three()
    a = c.cores["h1"]
    frame = updates("h2", [(c.cores["h2"].n + 1, 1, "h5", GHOST_SEQ)])
    mt, body = wire.decode(frame)
    a.on_gossip(mt, AgentCore.prepare(mt, body), c.now)
    mt, body = wire.decode(updates("ghost", [(1, 3, "ghost", GHOST_SEQ)]))
    a.on_gossip(mt, AgentCore.prepare(mt, body), c.now)
    assert (a.stats.forged_claims, a.stats.non_member_claims) == (1, 1)
    assert a.table.get(key(1)).host == "h1" and a.table.get(key(3)).host == "h3"


def test_a_host_that_left_keeps_its_entries_but_makes_no_new_claims():
    c = three()
    c.down.add("h3")
    for _ in range(4):  # h3 falls silent past the suspect window...
        c.heartbeat_round()
    c.cores.pop("h3")
    c.send_peers()  # ...and the controller's membership no longer lists it
    h1 = c.cores["h1"]
    assert "h3" not in h1.peers
    assert h1.table.get(key(3)) == Entry("h3", "vEth3", 0)  # held until the controller moves vm3
    h1.on_frame("sub", updates("h3", [(2, 3, "h3", 5), (3, 9, "h3", 0)]), c.now)
    assert h1.table.get(key(3)).seq == 0 and key(9) not in h1.table
    assert h1.stats.non_member_claims == 2
    # HA: the controller restarts vm3 on h2, which claims it for itself; every table follows.
    assert c.attach("h2", 3, seq=1) == (True, "attached")
    assert all(core.table.get(key(3)) == Entry("h2", "vEth3", 1) for core in c.cores.values())


def test_headless_claim_by_the_destination_is_taken_everywhere():
    c = three()
    h2 = c.cores["h2"]
    h2.on_frame("rpc", wire.encode(MsgType.REQUEST, [5, "claim", {"vlan": VLAN, "mac": mac_of(1), "port": "vEth1",
                                                                "vm": "vm1"}]), c.now, envelope=[b"dvs"])
    h2.flush(c.now)
    for effect in h2.take_outbox():
        if type(effect) is not Reply:  # (the answer goes to dvs, not into the mesh)
            route(c, "h2", effect)
    c.pump()
    assert all(core.table.get(key(1)) == Entry("h2", "vEth1", 1) for core in c.cores.values())
    assert c.stat("forged_claims") == c.stat("non_member_claims") == 0


# ------------------------------------------------------------------ repair: pulls and snapshots


def test_a_pull_reply_over_one_hosts_connection_in_anothers_name_is_dropped():
    c = three()
    h1 = c.cores["h1"]
    forged = wire.encode(MsgType.PULL_REPLY, ["h3", INC, [[2, VLAN, mac_of(1), "h3", "vEth1", GHOST_SEQ, False]]])
    h1.on_frame("pull", forged, c.now, envelope="h2")  # (the runtime names the connection's host)
    assert h1.table.get(key(1)).host == "h1" and h1.stats.forged_claims == 1
    # The same reply from h3 itself is h3's own numbered update: taken.
    h1.on_frame("pull", forged, c.now, envelope="h3")
    assert h1.table.get(key(1)) == Entry("h3", "vEth1", GHOST_SEQ)


def snapshot(sender: str, entries: list[list], versions: list[list] | None = None) -> bytes:
    return wire.encode(MsgType.SNAPSHOT, [sender, entries, versions or []])


def test_snapshots_relay_members_entries_and_tombstones_but_no_live_claim_of_a_non_member():
    c = three()
    h1 = c.cores["h1"]
    received = h1.stats.snapshots_received
    frame = snapshot("h2", [
        [VLAN, mac_of(3), "h3", "vEth3", 2, False],  # a member's entry, relayed: taken
        [VLAN, mac_of(1), "ghost", "vEth1", GHOST_SEQ, False],  # nobody admitted "ghost": refused
        [VLAN, mac_of(8), "h9", "vEth8", 4, True],  # the tombstone of a host that left: taken
    ])
    h1.on_frame("pull", frame, c.now, envelope="h2")
    assert h1.table.get(key(3)) == Entry("h3", "vEth3", 2)
    assert h1.table.get(key(1)).host == "h1"
    assert h1.table.get(key(8)) == Entry("h9", "vEth8", 4, True)
    assert h1.stats.non_member_claims == 1 and h1.stats.snapshots_received == received + 1


@pytest.mark.parametrize("sender,via", [("ghost", None), ("ghost", "h2"), ("h3", "h2")])
def test_a_snapshot_from_no_member_or_in_anothers_name_is_dropped_whole(sender, via):
    c = three()
    h1 = c.cores["h1"]
    before, received = h1.table.as_placement(), h1.stats.snapshots_received
    h1.on_frame("pull", snapshot(sender, [[VLAN, mac_of(3), "h3", "vEth3", 7, False]]), c.now, envelope=via)
    assert h1.table.as_placement() == before
    assert h1.stats.non_member_messages == 1 and h1.stats.snapshots_received == received


def test_a_snapshots_version_vector_cannot_start_a_new_life_of_a_third_host():
    c = three()
    h1 = c.cores["h1"]
    h3 = h1.peers["h3"]
    assert (h3.incarnation, h3.contiguous) == (INC, 1)
    h1.on_frame("pull", snapshot("h2", [], [["h3", 1 << 60, 0], ["ghost", 1, 5]]), c.now, envelope="h2")
    assert (h3.incarnation, h3.contiguous) == (INC, 1) and "ghost" not in h1.peers
    # h3's own gossip is still heard as its current life.
    h1.on_frame("sub", wire.encode(MsgType.HEARTBEAT, ["h3", INC, 1, h1.table.digest, len(h1.table)]), c.now)
    assert h3.last_heard_ns == c.now


def test_gossip_never_grows_peer_state_for_made_up_names():
    c = three()
    h1 = c.cores["h1"]
    for i in range(500):
        h1.on_frame("sub", wire.encode(MsgType.HEARTBEAT, [f"x{i}", 1, 1, 0, 0]), c.now)
        h1.on_frame("sub", updates(f"y{i}", [(1, 1, f"y{i}", GHOST_SEQ)]), c.now)
    assert set(h1.peers) == {"h2", "h3"}
    assert (h1.stats.non_member_messages, h1.stats.non_member_claims) == (500, 500)
    assert h1.status(c.now)["stats"]["non_member_claims"] == 500


# ------------------------------------------------------------------ data plane


def test_vxlan_from_a_vtep_of_no_member_is_dropped_as_unknown_vtep():
    members = {"h1", "h2"}
    table, switch = MacTable(), LocalSwitch()
    dp = Dataplane("h1", table, switch, is_member=members.__contains__)
    vm = mac_of(1)
    dp.plug([[vm, ("127.0.0.1", 40_001)]], 0)
    switch.activate("vEth1", "vm1", VLAN, vm)
    table.merge((VLAN, vm), Entry("h1", "vEth1", 0))
    dp.after_core(0)
    dp.take()
    inner = vxlan.build_tagged(vm, mac_of(2), VLAN, vxlan.ETHERTYPE_TEST, b"hi")
    datagram = vxlan.encap(inner, vxlan.vni_of(VLAN, dp.config.vni_base))
    dp.from_vxlan(datagram, "h7", 0)  # inside the VTEP block, but h7 is no member
    assert dp.take() == [] and dp.drops["unknown_vtep"] == 1
    dp.from_vxlan(datagram, "h2", 0)
    assert [kind for kind, *_ in dp.take()] == ["vnic"]
    members.discard("h2")  # h2 leaves the membership: its VTEP is no longer heard
    dp.from_vxlan(datagram, "h2", 0)
    assert dp.take() == [] and dp.drops["unknown_vtep"] == 2


def test_vxlan_gate_follows_the_cores_membership():
    c = three()
    h1 = c.cores["h1"]
    assert h1.is_member("h1") and h1.is_member("h2") and not h1.is_member("h9")


# ------------------------------------------------------------------ vNIC bindings


def test_plug_is_all_or_nothing():
    dp = Dataplane("h1", MacTable(), LocalSwitch())
    with pytest.raises(ValueError, match="bad MAC"):
        dp.plug([[mac_of(1), ("127.0.0.1", 9)], ["not a mac", ("127.0.0.1", 9)]], 0)
    assert dp.vnics == {}
    with pytest.raises(ValueError, match="bad MAC"):
        dp.plug([[mac_of(1), ("127.0.0.1", 9)], [True, ("127.0.0.1", 9)]], 0)
    assert dp.vnics == {}


def test_gossip_in_another_members_name_is_dropped_when_the_publisher_is_known():
    # The runtime hands each frame over with the host whose publisher it came from.
    c = three()
    h1 = c.cores["h1"]
    h3 = h1.peers["h3"]
    spoofed = updates("h3", [(h3.contiguous + 1, 1, "h3", GHOST_SEQ)])
    h1.on_frame("sub", spoofed, c.now, envelope="h2")  # h2's publisher, speaking as h3
    h1.on_frame("sub", wire.encode(MsgType.HEARTBEAT, ["h3", INC, 10**9, 0, 0]), c.now, envelope="h2")
    assert h1.table.get(key(1)).host == "h1" and h1.stats.forged_claims == 2
    assert h3.latest_seen == 1 and not h3.pull_pending  # (no pull storm for numbers h3 never had)
    h1.on_frame("sub", spoofed, c.now, envelope="h3")  # the same from h3's own publisher: h3's claim
    assert h1.table.get(key(1)) == Entry("h3", "vEth1", GHOST_SEQ)


def _peers_without(c: Cluster, gone: str, epoch: int) -> bytes:
    return wire.encode(MsgType.PEERS, [[m for m in c.members() if m[0] != gone], epoch])


def test_a_host_the_membership_dropped_leaves_after_the_grace_even_while_it_keeps_talking():
    c = three()
    h1 = c.cores["h1"]
    h1.on_frame("ctl", _peers_without(c, "h3", 2), c.now)
    grace_ms = MEMBERSHIP_GRACE_SUSPECTS * h1.liveness.suspect_ns // 1_000_000
    c.heartbeat_round()
    assert "h3" in h1.peers  # still talking: maybe a controller that restarted and has not heard of it yet
    while c.now - 1_000 * 1_000_000 < grace_ms * 1_000_000:
        c.heartbeat_round()  # h3 keeps publishing all along
    assert "h3" not in h1.peers and not h1.is_member("h3")
    c.attach("h3", 9)  # its new claims no longer count at h1
    assert key(9) not in h1.table and h1.stats.non_member_claims >= 1
    assert key(9) in c.cores["h2"].table


def test_a_restarted_controllers_partial_membership_keeps_a_talking_peer():
    c = three()
    h1 = c.cores["h1"]
    h1.on_frame("ctl", _peers_without(c, "h3", 1), c.now)  # a new controller: h3 not registered yet
    c.heartbeat_round()
    h1.on_frame("ctl", wire.encode(MsgType.PEERS, [c.members(), 2]), c.now)  # ...and now it is
    for _ in range(10):
        c.heartbeat_round()
    assert "h3" in h1.peers and h1.membership.leaving == {}
    c.attach("h3", 9)
    assert key(9) in h1.table
