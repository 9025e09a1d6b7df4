"""The pure forwarding logic, fed bytes: local delivery, VXLAN, flooding, VLAN isolation,
the forwarding pointer of a move. No sockets, no clock."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from agent import vxlan
from agent.dataplane import Dataplane, DataplaneConfig
from agent.mactable import Entry, MacTable
from agent.switch import LocalSwitch

MS = 1_000_000
A, B, C, D, E = (0x02_00_00_00_00_00 + i for i in range(1, 6))
NIC = {m: ("127.0.0.1", 40_000 + (m & 0xFF)) for m in (A, B, C, D, E)}


def frame(dst, src, vlan=100, payload=b"payload"):
    return vxlan.build_tagged(dst, src, vlan, vxlan.ETHERTYPE_TEST, payload)


class Host:
    """One host's table, switch and data plane, with helpers that do what the core does."""

    def __init__(self, name="h1", config=None):
        self.name = name
        self.table = MacTable()
        self.switch = LocalSwitch()
        self.dp = Dataplane(name, self.table, self.switch, config)
        self.dp.plug([[m, NIC[m]] for m in NIC], 0)
        self.dp.take()

    def vm(self, mac, vlan=100, seq=0, port=None):
        """A VM whose port is active here (ATTACH / switchover)."""
        self.switch.activate(port or f"vEth{mac & 0xFF}", f"vm{mac & 0xFF}", vlan, mac)
        self.table.merge((vlan, mac), Entry(self.name, port or f"vEth{mac & 0xFF}", seq))

    def remote(self, mac, host, vlan=100, seq=0):
        """Gossip says the VM lives on `host`; an active local port for it goes, as the core does."""
        self.table.merge((vlan, mac), Entry(host, f"vEth{mac & 0xFF}", seq))
        port = self.switch.port_for(vlan, mac)
        if host != self.name and port is not None and port.state == "active":
            self.switch.remove_key(vlan, mac)

    def settle(self, now_ns=0):
        self.dp.after_core(now_ns)
        return self.dp.take()


def vnic_out(effects):
    return [(dest, f) for kind, dest, f in effects if kind == "vnic"]


def vxlan_out(effects):
    return [(dest, d) for kind, dest, d in effects if kind == "vxlan"]


def test_same_host_delivers_locally_and_counts_per_port():
    h = Host()
    h.vm(A)
    h.vm(B)
    h.settle()
    tx = h.switch.port_for(100, B).tx_frames
    f = frame(B, A)
    h.dp.from_vnic(f, NIC[A], 0)
    assert h.dp.take() == [("vnic", NIC[B], f)]
    assert h.switch.port_for(100, A).rx_frames == 1
    assert h.switch.port_for(100, B).tx_frames == tx + 1
    assert h.dp.counters["local"] == 1


def test_remote_unicast_goes_out_as_vxlan_to_the_owner():
    h = Host()
    h.vm(A)
    h.remote(B, "h2")
    h.settle()
    f = frame(B, A)
    h.dp.from_vnic(f, NIC[A], 0)
    [(dest, d)] = vxlan_out(h.dp.take())
    assert dest == "h2"
    vni, inner = vxlan.decap(d)
    assert vni == 10_100 and vxlan.retag(inner, 100) == f


def test_vxlan_in_is_delivered_tagged_to_the_local_port():
    h = Host()
    h.vm(B)
    h.settle()
    f = frame(B, A)
    h.dp.from_vxlan(vxlan.encap(f, 10_100), "h2", 0)
    assert h.dp.take() == [("vnic", NIC[B], f)]


def test_broadcast_floods_local_ports_and_one_copy_per_host_in_the_vlan():
    h = Host()
    h.vm(A)
    h.vm(B)
    h.remote(C, "h2")
    h.remote(D, "h3")
    h.remote(E, "h4", vlan=110)  # h4 has no port in VLAN 100: no copy for it
    h.settle()
    f = frame(vxlan.BROADCAST, A)
    h.dp.from_vnic(f, NIC[A], 0)
    out = h.dp.take()
    assert vnic_out(out) == [(NIC[B], f)]  # not back to A
    assert sorted(dest for dest, _ in vxlan_out(out)) == ["h2", "h3"]
    assert {vxlan.decap(d)[0] for _, d in vxlan_out(out)} == {10_100}


def test_unknown_unicast_is_flooded_within_the_vlan():
    h = Host()
    h.vm(A)
    h.vm(B)
    h.remote(C, "h2")
    h.settle()
    unknown = 0x02_00_00_00_99_99
    f = frame(unknown, A)
    h.dp.from_vnic(f, NIC[A], 0)
    out = h.dp.take()
    assert vnic_out(out) == [(NIC[B], f)]
    assert [dest for dest, _ in vxlan_out(out)] == ["h2"]
    assert h.dp.counters["unknown_unicast"] == 1


def test_flood_from_the_overlay_is_not_flooded_again():
    h = Host()
    h.vm(B)
    h.remote(C, "h3")
    h.settle()
    f = frame(vxlan.BROADCAST, A)
    h.dp.from_vxlan(vxlan.encap(f, 10_100), "h2", 0)
    assert h.dp.take() == [("vnic", NIC[B], f)]  # local ports only: split horizon


def test_vlans_are_isolated():
    h = Host()
    h.vm(A, vlan=100)
    h.vm(B, vlan=110)
    h.vm(C, vlan=100)
    h.remote(D, "h2", vlan=110)
    h.settle()
    # A (VLAN 100) sends to B's MAC: B lives in VLAN 110, so in VLAN 100 that MAC is unknown;
    # the flood stays in VLAN 100 (C only) and reaches no host without VLAN 100 ports.
    h.dp.from_vnic(frame(B, A, 100), NIC[A], 0)
    out = h.dp.take()
    assert [dest for dest, _ in vnic_out(out)] == [NIC[C]]
    assert vxlan_out(out) == []
    # A broadcast in VLAN 110 from the overlay reaches B only.
    h.dp.from_vxlan(vxlan.encap(frame(vxlan.BROADCAST, D, 110), 10_110), "h2", 0)
    assert [dest for dest, _ in vnic_out(h.dp.take())] == [NIC[B]]
    # A VM cannot send into a VLAN its port is not in.
    h.dp.from_vnic(frame(B, A, 110), NIC[A], 0)
    assert h.dp.take() == [] and h.dp.drops["unknown_source"] == 1


def test_malformed_and_spoofed_input_is_dropped_and_counted():
    h = Host()
    h.vm(A)
    h.settle()
    h.dp.from_vnic(b"\x00" * 10, NIC[A], 0)
    h.dp.from_vnic(frame(B, A), ("127.0.0.1", 1), 0)  # A's MAC from another backend
    h.dp.from_vxlan(b"\xff" * 30, "h2", 0)
    h.dp.from_vxlan(vxlan.encap(frame(A, B), 10_100), None, 0)  # not from a VTEP
    h.dp.from_vxlan(vxlan.encap(frame(A, B), 99), "h2", 0)  # VNI of no VLAN
    assert h.dp.take() == []
    d = h.dp.drops
    assert (d["malformed_vnic"], d["unknown_source"], d["malformed_vxlan"], d["unknown_vtep"], d["bad_vni"]) == (
        1, 1, 1, 1, 1)


@settings(max_examples=200)
@given(st.binary(max_size=120), st.sampled_from(["h2", None]))
def test_garbage_never_crashes_the_data_plane(data, src):
    h = Host()
    h.vm(A)
    h.dp.from_vnic(data, NIC[A], 0)
    h.dp.from_vxlan(data, src, 0)
    h.dp.from_vxlan(b"\x08\x00\x00\x00\x00\x27\x74\x00" + data, src, 0)


def test_a_new_vm_gets_a_link_notice_but_no_rarp():
    h = Host("h2")
    h.remote(C, "h3")
    h.settle()
    h.vm(A)  # ATTACH of a new VM
    out = h.settle(now_ns=MS)
    assert vxlan_out(out) == [] and h.dp.counters["rarp_sent"] == 0
    assert [vxlan.parse_link_notice(f) for _, f in vnic_out(out)] == [("h2", MS)]


def test_switchover_sends_rarp_to_the_vlans_local_ports_and_tells_the_vnic():
    h = Host("h2")
    h.remote(C, "h3")
    h.remote(A, "h1")
    h.vm(B)  # a VM of the VLAN on this host
    h.settle()
    h.vm(A, seq=1)  # switchover: the port is activated and the MAC claimed
    out = h.settle(now_ns=5 * MS)
    # EVPN's way: h3 learns the move from the control plane, so no RARP crosses the overlay.
    assert vxlan_out(out) == [] and h.dp.counters["rarp_sent"] == 1
    rarp, (nic, notice) = vnic_out(out)
    assert rarp[0] == NIC[B] and vxlan.parse_tagged(rarp[1]) == (vxlan.BROADCAST, A, 100, vxlan.ETHERTYPE_RARP)
    assert nic == NIC[A] and vxlan.parse_link_notice(notice) == ("h2", 5 * MS)


def test_switchover_floods_the_rarp_over_the_overlay_when_asked():
    h = Host("h2", DataplaneConfig(rarp_to_overlay=True))
    h.remote(C, "h3")
    h.remote(A, "h1")
    h.settle()
    h.vm(A, seq=1)
    out = h.settle(now_ns=5 * MS)
    [(dest, d)] = vxlan_out(out)
    assert dest == "h3"
    vni, inner = vxlan.decap(d)
    assert vni == 10_100
    assert vxlan.parse_tagged(vxlan.retag(inner, 100)) == (vxlan.BROADCAST, A, 100, vxlan.ETHERTYPE_RARP)
    [(nic, notice)] = vnic_out(out)
    assert nic == NIC[A] and vxlan.parse_link_notice(notice) == ("h2", 5 * MS)


def test_old_host_forwards_frames_that_still_reach_it_to_the_new_host():
    h = Host("h1", DataplaneConfig(forward_pointer_ms=100))
    h.vm(A, seq=0)
    h.settle()
    # Gossip: A moved to h2 with seq 1. The port leaves h1 and a forwarding pointer stays.
    h.remote(A, "h2", seq=1)
    h.settle(now_ns=0)
    f = frame(A, B)
    h.dp.from_vxlan(vxlan.encap(f, 10_100), "h3", 10 * MS)  # h3 has not caught up yet
    [(dest, d)] = vxlan_out(h.dp.take())
    assert dest == "h2" and vxlan.retag(vxlan.decap(d)[1], 100) == f
    assert h.dp.counters["relayed"] == 1
    # Even back to the sender's host, when that is where the VM went.
    h.dp.from_vxlan(vxlan.encap(f, 10_100), "h2", 10 * MS)
    assert [dest for dest, _ in vxlan_out(h.dp.take())] == ["h2"]
    # Once the pointer expires, a stale frame is dropped (split horizon) and counted.
    h.dp.tick(100 * MS)
    h.dp.from_vxlan(vxlan.encap(f, 10_100), "h3", 100 * MS)
    assert h.dp.take() == [] and h.dp.drops["not_here"] == 1


def test_without_a_pointer_overlay_frames_are_not_relayed():
    h = Host()
    h.remote(A, "h2")
    h.settle()
    h.dp.from_vxlan(vxlan.encap(frame(A, B), 10_100), "h3", 0)
    assert h.dp.take() == [] and h.dp.drops["not_here"] == 1


def test_frames_reaching_the_old_host_before_it_learns_the_new_one_are_held_then_sent_on():
    h = Host("h1")
    h.vm(A, seq=0)
    h.vm(B)
    h.settle()
    h.switch.remove_key(100, A)  # DETACH arrived before the destination's gossip
    h.settle(now_ns=0)
    f1, f2 = frame(A, C), frame(A, B, payload=b"local")
    h.dp.from_vxlan(vxlan.encap(f1, 10_100), "h3", MS)
    h.dp.from_vnic(f2, NIC[B], MS)
    assert h.dp.take() == [] and h.dp.counters["held"] == 2
    h.remote(A, "h2", seq=1)  # the gossip arrives
    out = h.settle(now_ns=2 * MS)
    assert [dest for dest, _ in vxlan_out(out)] == ["h2", "h2"]
    assert [vxlan.retag(vxlan.decap(d)[1], 100) for _, d in vxlan_out(out)] == [f1, f2]


def test_held_frames_expire_with_the_pointer():
    h = Host("h1", DataplaneConfig(forward_pointer_ms=50))
    h.vm(A)
    h.settle()
    h.switch.remove_key(100, A)
    h.settle(now_ns=0)
    h.dp.from_vxlan(vxlan.encap(frame(A, C), 10_100), "h3", MS)
    h.dp.tick(60 * MS)
    assert h.dp.drops["hold_expired"] == 1 and not h.dp.departed


def test_frames_the_vm_sent_before_it_left_are_still_switched():
    h = Host("h1")
    h.vm(A, seq=0)
    h.remote(B, "h3")
    h.settle()
    h.remote(A, "h2", seq=1)
    h.settle()
    h.dp.from_vnic(frame(B, A), NIC[A], MS)  # queued in h1's vNIC socket before the move
    assert [dest for dest, _ in vxlan_out(h.dp.take())] == ["h3"]
    assert h.dp.departed[(100, A)].ingress == 1


def test_a_vm_that_comes_back_clears_the_pointer():
    h = Host("h1")
    h.vm(A, seq=0)
    h.settle()
    h.remote(A, "h2", seq=1)
    h.settle()
    assert (100, A) in h.dp.departed
    h.vm(A, seq=2)
    h.settle()
    assert (100, A) not in h.dp.departed
    h.dp.from_vxlan(vxlan.encap(frame(A, B), 10_100), "h2", MS)
    assert [dest for dest, _ in vnic_out(h.dp.take())] == [NIC[A]]


def test_deleted_vm_frames_are_dropped():
    h = Host()
    h.vm(A)
    h.settle()
    h.table.merge((100, B), Entry("h2", "vEth2", 3, True))
    h.dp.from_vnic(frame(B, A), NIC[A], 0)
    assert h.dp.take() == [] and h.dp.drops["deleted"] == 1


def test_status_shows_per_port_counters():
    h = Host()
    h.vm(B)
    h.vm(A)
    h.settle()
    h.dp.from_vnic(frame(B, A), NIC[A], 0)
    st = h.dp.status()
    ports = {p["vm"]: p for p in st["ports"]}
    assert (ports["vm1"]["rx_frames"], ports["vm2"]["tx_frames"]) == (1, 1)
    assert st["counters"]["vnic_rx"] == 1 and st["dropped"] == 0


# ---------------------------------------------------------------------- moves under any interleaving

HOSTS = ["h1", "h2", "h3", "h4"]


def _payload_id(frame_bytes: bytes, offset: int) -> int | None:
    if frame_bytes[offset - 2 : offset] != vxlan.ETHERTYPE_TEST.to_bytes(2, "big"):
        return None  # a RARP or a link notice
    return int.from_bytes(frame_bytes[offset : offset + 4], "big")


@settings(max_examples=150, deadline=None)
@given(st.lists(st.sampled_from(["move", "gossip", "gossip", "detach", "send", "send", "net", "net", "net"]),
                min_size=1, max_size=120),
       st.randoms(use_true_random=False))
def test_moves_never_lose_duplicate_or_loop_frames(ops, rnd):
    """VM A moves between four hosts while B (on h4) sends to it. Gossip of each move, the old
    host's DETACH and the VXLAN datagrams in flight arrive in any order: every frame reaches A
    exactly once, nothing is dropped, and no frame is relayed more often than A moved."""
    hosts = {n: Host(n) for n in HOSTS}
    for n, h in hosts.items():
        for mac, home in ((A, "h1"), (B, "h4")):
            if n == home:
                h.vm(mac)
            else:
                h.remote(mac, home)
        h.settle()
    owner, seq = "h1", 0
    gossip: list[tuple[str, str, int]] = []
    detach: list[str] = []
    net: list[tuple[str, str, bytes]] = []
    delivered: dict[int, int] = {}
    hops: dict[int, int] = {}
    sent = 0

    def effects(name: str) -> None:
        hosts[name].dp.after_core(0)
        for kind, dest, data in hosts[name].dp.take():
            if kind == "vxlan":
                pid = _payload_id(data, vxlan.VXLAN_HDR_BYTES + vxlan.ETH_HDR_BYTES)
                if pid is not None:
                    hops[pid] = hops.get(pid, 0) + 1
                net.append((dest, name, data))
            elif dest == NIC[A]:
                pid = _payload_id(data, vxlan.TAGGED_HDR_BYTES)
                if pid is not None:
                    port = hosts[name].switch.port_for(100, A)
                    assert port is not None and port.state == "active", "delivered where A has no port"
                    delivered[pid] = delivered.get(pid, 0) + 1

    def step(op: str) -> None:
        nonlocal owner, seq, sent
        if op == "move" and not gossip:
            while detach:
                step("detach")
            dst = rnd.choice([h for h in HOSTS if h != owner])
            seq += 1
            hosts[dst].vm(A, seq=seq)  # switchover: port active, MAC claimed
            effects(dst)
            gossip.extend((h, dst, seq) for h in HOSTS if h != dst)
            detach.append(owner)
            owner = dst
        elif op in ("move", "gossip") and gossip:
            h, dst, s = gossip.pop(rnd.randrange(len(gossip)))
            hosts[h].remote(A, dst, seq=s)
            effects(h)
        elif op == "detach" and detach:
            h = detach.pop()
            if h != owner:
                hosts[h].switch.remove_key(100, A)
                effects(h)
        elif op == "send":
            hosts["h4"].dp.from_vnic(frame(A, B, payload=sent.to_bytes(4, "big")), NIC[B], 0)
            sent += 1
            effects("h4")
        elif op == "net" and net:
            dst, src, data = net.pop(rnd.randrange(len(net)))
            hosts[dst].dp.from_vxlan(data, src, 0)
            effects(dst)

    for op in ops:
        step(op)
    for op in ["gossip"] * len(gossip) + ["detach"] * len(detach):
        step(op)
    for _ in range(100_000):
        if not net:
            break
        step("net")
    assert not net, "datagrams still circulating: a relay loop"
    assert delivered == dict.fromkeys(range(sent), 1)
    assert all(sum(h.dp.drops.values()) == 0 for h in hosts.values()), {n: h.dp.drops for n, h in hosts.items()}
    assert all(n <= seq + 1 for n in hops.values())


@given(st.lists(st.tuples(st.sampled_from([100, 110]), st.integers(1, 6), st.sampled_from(["h1", "h2", "h3"]),
                          st.integers(0, 4), st.booleans()), max_size=60))
def test_flood_lists_follow_the_table(merges):
    """The per-VLAN flood lists, kept incrementally, always equal a scan of the table."""
    h = Host("h1")
    for vlan, mac, host, seq, tomb in merges:
        h.table.merge((vlan, mac), Entry(host, f"vEth{mac}", seq, tomb))
        for v in (100, 110):
            expect = sorted({e.host for (vv, _), e in h.table.items() if vv == v and not e.tombstone} - {"h1"})
            assert list(h.dp.flood_hosts(v)) == expect


def test_flood_lists_follow_bulk_gossip_merges():
    """The agent merges gossip rows in bulk (MacTable.merge_updates): the flood lists see them too."""
    h = Host("h1")
    h.table.merge_updates([[1, 100, C, "h2", "vEth3", 0, False], [2, 110, D, "h3", "vEth4", 0, False]])
    assert h.dp.flood_hosts(100) == ("h2",) and h.dp.flood_hosts(110) == ("h3",)
    h.table.merge_updates([[3, 100, C, "h3", "vEth3", 1, False]])
    assert h.dp.flood_hosts(100) == ("h3",)


def test_flood_lists_follow_a_batch_of_new_macs():
    """A message of distinct new keys takes the table's all-new path: the observer still sees each."""
    h = Host("h1")
    h.table.merge_updates([[i, 100 + 10 * (i % 2), 0x020000000100 + i, f"h{2 + i % 3}", f"vEth{i}", 0, False]
                           for i in range(1, 7)])
    assert h.dp.flood_hosts(100) == ("h2", "h3", "h4") and h.dp.flood_hosts(110) == ("h2", "h3", "h4")
