"""agent/core.py driven directly: several AgentCores wired by an in-test router, fake monotonic time."""

from __future__ import annotations

import random
from collections.abc import Callable

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agent import wire
from agent.config import AgentConfig
from agent.core import AgentCore
from agent.effects import Reply, Subscribe, ToController, Unsubscribe
from agent.mactable import Entry
from agent.wire import MsgType
from tests.effect_router import route

NS_PER_MS = 1_000_000
INC = 1
VLAN = 100
MAC_BASE = 0x02_00_00_00_00_00


def mac_of(vm: int) -> int:
    return MAC_BASE + vm


def ctl_frames(effects: list) -> list[bytes]:
    """The frames of the ToController effects among `effects`, in order."""
    return [e.frame for e in effects if type(e) is ToController]


class Cluster:
    """Routes outboxes between cores, as the runtime's sockets would, synchronously
    (through tests/effect_router.py's exhaustive route):

    - Publish           -> every other up core's on_frame("sub", ...), unless `drop` says no;
    - ToPeer            -> that host's on_frame("rpc", ..., envelope=[sender]);
    - Reply             -> the requester's on_frame("pull", ...);
    - ToController      -> self.ctl, as (host, msg_type, body);
    - Subscribe/Unsubscribe are recorded in self.subscriptions (the router reaches everyone);
    - Emit              -> self.events, as (host, event).
    A host in `down` neither sends nor receives.
    """

    def __init__(self, hosts: list[str], config: AgentConfig | None = None, now_ns: int = 1_000 * NS_PER_MS):
        self.now = now_ns
        # The harness's clock stands still unless a test moves it: apply reports go out at once
        # (no interval between two of an agent's reports, however large the membership).
        self.config = config or AgentConfig(applied_report_budget_per_s=0)
        self.cores: dict[str, AgentCore] = {}
        self.ctl: list[tuple[str, MsgType, list]] = []
        self.down: set[str] = set()
        # drop(src, dst, msg_type, frame) -> True to lose that publication on the way to dst.
        self.drop: Callable[[str, str, MsgType, bytes], bool] | None = None
        # drop_rpc(src, dst, frame) -> True to lose a request or a reply.
        self.drop_rpc: Callable[[str, str, bytes], bool] | None = None
        self.published: list[tuple[str, MsgType, bytes]] = []
        self.dropped = 0
        self.dropped_updates = 0
        self.subscriptions: list[tuple[str, str, bool]] = []  # (host, peer, subscribed)
        self.events: list[tuple[str, dict]] = []
        for h in hosts:
            self._add(h)
        self.pump()
        self.send_peers()

    def _add(self, host: str, incarnation: int = INC) -> AgentCore:
        core = AgentCore(host, incarnation, self.config, pub_endpoint=f"pub-{host}", rpc_endpoint=f"rpc-{host}")
        core.start(self.now)
        self.cores[host] = core
        return core

    def members(self) -> list[list]:
        return [[h, c.incarnation, c.pub_endpoint, c.rpc_endpoint] for h, c in self.cores.items()]

    def send_peers(self, to: list[str] | None = None) -> None:
        peers = wire.encode(MsgType.PEERS, [self.members(), 1])
        for h in to or list(self.cores):
            self.cores[h].on_frame("ctl", peers, self.now)
        self.pump()

    def join(self, host: str) -> AgentCore:
        core = self._add(host)
        self.send_peers()
        return core

    # -------------------------------------------------------------- routing

    def pump(self) -> None:
        for _ in range(10_000):
            moved = False
            for host, core in list(self.cores.items()):
                core.flush(self.now)
                for effect in core.take_outbox():
                    moved = True
                    if host not in self.down:
                        route(self, host, effect)
            if not moved:
                self.assert_no_handler_errors()
                return
        raise AssertionError("messages still flowing after 10,000 rounds: a request/reply loop")

    def publish(self, src: str, payload: bytes) -> None:
        mt, _ = wire.decode(payload)
        self.published.append((src, mt, payload))
        for dst, core in self.cores.items():
            if dst == src or dst in self.down:
                continue
            if self.drop is not None and self.drop(src, dst, mt, payload):
                self.dropped += 1
                self.dropped_updates += mt is MsgType.UPDATES
                continue
            core.on_frame("sub", payload, self.now)

    def to_controller(self, src: str, payload: bytes) -> None:
        mt, body = wire.decode(payload)
        self.ctl.append((src, mt, body))

    def to_peer(self, src: str, dst: str, payload: bytes) -> None:
        if dst in self.down or dst not in self.cores:
            return
        if self.drop_rpc is not None and self.drop_rpc(src, dst, payload):
            return
        self.cores[dst].on_frame("rpc", payload, self.now, envelope=[src.encode()])

    def reply(self, src: str, envelope, payload: bytes) -> None:
        dst = envelope[0].decode()
        if dst in self.down:
            return
        if self.drop_rpc is not None and self.drop_rpc(src, dst, payload):
            return
        self.cores[dst].on_frame("pull", payload, self.now)

    def subscribe(self, src: str, host: str, pub_endpoint: str, rpc_endpoint: str) -> None:
        self.subscriptions.append((src, host, True))

    def unsubscribe(self, src: str, host: str) -> None:
        self.subscriptions.append((src, host, False))

    def emit(self, src: str, event: dict) -> None:
        self.events.append((src, event))

    def assert_no_handler_errors(self) -> None:
        # on_frame turns an exception of the core's own into a counter: a bug must not hide there.
        errors = {h: (c.stats.handler_errors, c.last_error) for h, c in self.cores.items() if c.stats.handler_errors}
        assert not errors, errors

    # -------------------------------------------------------------- driving

    def command(self, host: str, mt: MsgType, body: list) -> tuple[bool, str]:
        """A controller command to `host`; returns its ACK (ok, detail)."""
        before = len(self.ctl)
        self.cores[host].on_frame("ctl", wire.encode(mt, body), self.now)
        self.pump()
        acks = [b for src, m, b in self.ctl[before:] if src == host and m is MsgType.ACK]
        assert len(acks) == 1, acks
        assert acks[0][0] == body[0] and acks[0][3] == self.now
        return acks[0][1], acks[0][2]

    def attach(self, host: str, vm: int, seq: int = 0) -> tuple[bool, str]:
        return self.command(host, MsgType.ATTACH, [vm, f"vm{vm}", VLAN, mac_of(vm), f"vEth{vm}", seq])

    def move(self, vm: int, src: str, dst: str, seq: int) -> tuple[bool, str]:
        """The controller's move: prepare on dst, switchover to seq, detach the source port."""
        assert self.command(dst, MsgType.PREPARE, [vm, f"vm{vm}", VLAN, mac_of(vm), f"vEth{vm}"]) == (True, "prepared")
        result = self.command(dst, MsgType.SWITCHOVER, [vm, f"vm{vm}", VLAN, mac_of(vm), f"vEth{vm}", seq])
        if result[0]:
            self.command(src, MsgType.DETACH, [vm, f"vm{vm}", VLAN, mac_of(vm), 0])
        return result

    def advance(self, ms: float) -> None:
        self.now += int(ms * NS_PER_MS)

    def heartbeat_round(self) -> None:
        # One gossip interval (the heartbeat interval, or more when the membership is large).
        self.advance(max(c.gossip_interval_ms() for c in self.up().values()))
        for host, core in self.cores.items():
            if host not in self.down:
                core.on_timer(self.now)
        self.pump()

    # -------------------------------------------------------------- looking

    def up(self) -> dict[str, AgentCore]:
        return {h: c for h, c in self.cores.items() if h not in self.down}

    def placements(self) -> dict[str, dict]:
        return {h: c.table.as_placement() for h, c in self.up().items()}

    def converged_to(self, expected: dict) -> bool:
        cores = self.up().values()
        return all(c.table.as_placement() == expected for c in cores) and len({c.table.digest for c in cores}) == 1

    def stat(self, name: str) -> int:
        return sum(getattr(c.stats, name) for c in self.cores.values())


def key(vm: int) -> tuple[int, int]:
    return (VLAN, mac_of(vm))


def admit(core: AgentCore, *hosts: str, now_ns: int = 0) -> AgentCore:
    """Give a lone core the controller's membership: `hosts` (incarnation INC) are its peers."""
    core.on_message("ctl", MsgType.PEERS, [[[h, INC, f"pub-{h}", f"rpc-{h}"] for h in hosts], 1], now_ns)
    core.take_outbox()
    return core


# ------------------------------------------------------------------ membership and bootstrap


def test_peers_message_sets_up_the_mesh():
    c = Cluster(["h1", "h2", "h3"])
    for h, core in c.cores.items():
        assert core.registered
        assert sorted(core.peers) == sorted(set(c.cores) - {h})
        assert all(p.incarnation == INC and p.rpc_endpoint == f"rpc-{p.host}" for p in core.peers.values())
    # Every core introduced itself to the controller when it started.
    assert sorted(b[0] for _, m, b in c.ctl if m is MsgType.REGISTER) == ["h1", "h2", "h3"]
    # Nobody is heard before the first heartbeat; everyone after it.
    assert all(core.peers_heard(c.now) == 0 for core in c.cores.values())
    c.heartbeat_round()
    assert all(core.peers_heard(c.now) == 2 for core in c.cores.values())
    statuses = [b for _, m, b in c.ctl if m is MsgType.AGENT_STATUS]
    assert statuses and all(s[1] == INC for s in statuses)
    # A peer silent past suspect_after_ms is no longer counted.
    c.down.add("h3")
    for _ in range(c.config.suspect_after_ms // c.config.heartbeat_interval_ms + 1):
        c.heartbeat_round()
    assert c.cores["h1"].peers_heard(c.now) == 1


def test_membership_change_drops_a_peer():
    c = Cluster(["h1", "h2", "h3"])
    core = c.cores["h1"]
    core.on_frame("ctl", wire.encode(MsgType.PEERS, [[m for m in c.members() if m[0] != "h3"], 2]), c.now)
    out = core.take_outbox()
    assert Unsubscribe("h3") in out
    assert sorted(core.peers) == ["h2"]


# ------------------------------------------------------------------ attach, switchover, late messages


def test_attach_propagates_to_all():
    c = Cluster(["h1", "h2", "h3", "h4"])
    assert c.attach("h2", 1) == (True, "attached")
    for h, core in c.cores.items():
        assert core.table.get(key(1)) == Entry("h2", "vEth1", 0), h
    assert len({core.table.digest for core in c.cores.values()}) == 1
    assert c.cores["h2"].switch.port_for(*key(1)).state == "active"
    assert all(c.cores[h].switch.port_for(*key(1)) is None for h in ("h1", "h3", "h4"))
    # Every core reported what it applied, stamped with the fake clock: h2 its own claim as an
    # entry with its update number, the others h2's update 1 as a range of h2's numbers.
    reports = {src: body[1:] for src, m, body in c.ctl if m is MsgType.APPLY_REPORT}
    assert sorted(reports) == ["h1", "h2", "h3", "h4"]
    assert reports.pop("h2") == [[[VLAN, mac_of(1), "h2", 0, False, c.now, 1]], []]
    assert all(r == [[], [["h2", 1, 1, 1, c.now]]] for r in reports.values())


def test_switchover_with_higher_seq_wins_everywhere_and_removes_the_old_port():
    c = Cluster(["h1", "h2", "h3"])
    c.attach("h1", 7)
    assert c.cores["h1"].switch.port_for(*key(7)) is not None
    assert c.command("h2", MsgType.PREPARE, [70, "vm7", VLAN, mac_of(7), "vEth7"]) == (True, "prepared")
    assert c.cores["h2"].switch.port_for(*key(7)).state == "prepared"
    assert c.cores["h2"].table.get(key(7)).host == "h1"  # preparing changes nothing in the table
    assert c.command("h2", MsgType.SWITCHOVER, [71, "vm7", VLAN, mac_of(7), "vEth7", 1]) == (True, "switched")
    for core in c.cores.values():
        assert core.table.get(key(7)) == Entry("h2", "vEth7", 1)
    # No DETACH was sent: the gossip alone took the MAC away from h1's switch.
    assert c.cores["h1"].switch.port_for(*key(7)) is None
    assert c.cores["h2"].switch.port_for(*key(7)).state == "active"
    assert c.converged_to({key(7): ("h2", 1, False)})


def test_prepared_port_survives_gossip_about_its_key():
    c = Cluster(["h1", "h2"])
    c.command("h2", MsgType.PREPARE, [1, "vm1", VLAN, mac_of(1), "vEth1"])
    c.attach("h1", 1)  # the VM's current owner announces it
    assert c.cores["h2"].switch.port_for(*key(1)).state == "prepared"


def test_lower_seq_arriving_late_never_pulls_the_mac_back():
    c = Cluster(["h1", "h2", "h3"])
    c.attach("h1", 1)
    old_updates = [f for src, mt, f in c.published if src == "h1" and mt is MsgType.UPDATES]
    assert len(old_updates) == 1
    assert c.move(1, "h1", "h2", 1) == (True, "switched")
    target = {key(1): ("h2", 1, False)}
    assert c.converged_to(target)
    applied_before = c.stat("updates_applied")
    # The old announcement, delivered again (late, duplicated), to everyone.
    for h in ("h2", "h3"):
        c.cores[h].on_frame("sub", old_updates[0], c.now)
    # A fresh update from h1 still claiming seq 0 (an old host that did not notice the move).
    stale = wire.encode(MsgType.UPDATES, ["h1", INC, [[2, VLAN, mac_of(1), "h1", "vEth1", 0, False]]])
    for h in ("h2", "h3"):
        c.cores[h].on_frame("sub", stale, c.now)
    c.pump()
    assert c.converged_to(target)
    assert c.stat("updates_applied") == applied_before
    assert c.cores["h2"].switch.port_for(*key(1)).state == "active"
    # The old host is told to attach with the old seq: refused, its port does not come back.
    ok, detail = c.attach("h1", 1, seq=0)
    assert not ok and "stale" in detail and "seq 1 on h2" in detail
    assert c.cores["h1"].switch.port_for(*key(1)) is None
    # A switchover below what the table holds is refused the same way.
    c.command("h3", MsgType.PREPARE, [5, "vm1", VLAN, mac_of(1), "vEth1"])
    ok, detail = c.command("h3", MsgType.SWITCHOVER, [5, "vm1", VLAN, mac_of(1), "vEth1", 0])
    assert not ok and detail == "stale: table holds seq 1 on h2"
    assert c.cores["h3"].switch.port_for(*key(1)) is None
    c.heartbeat_round()
    assert c.converged_to(target)


def test_concurrent_claims_for_the_same_seq_are_settled_by_host_order():
    # Headless: two hosts claim seq 1 at once; the larger host id (as a string) wins everywhere.
    c = Cluster(["h1", "h2", "h3"])
    c.attach("h1", 1)
    c.drop = lambda src, dst, mt, f: True  # the two claims cross in flight
    c.command("h3", MsgType.SWITCHOVER, [1, "vm1", VLAN, mac_of(1), "vEth1", 1])
    c.command("h2", MsgType.SWITCHOVER, [2, "vm1", VLAN, mac_of(1), "vEth1", 1])
    c.drop = None
    for _ in range(3):
        c.heartbeat_round()
    assert c.converged_to({key(1): ("h3", 1, False)})
    assert c.cores["h2"].switch.port_for(*key(1)) is None


def test_detach_with_tombstone_deletes_everywhere():
    c = Cluster(["h1", "h2", "h3"])
    c.attach("h1", 1)
    assert c.command("h1", MsgType.DETACH, [9, "vm1", VLAN, mac_of(1), 1]) == (True, "detached")
    assert c.converged_to({key(1): ("h1", 1, True)})
    assert all(core.table.live_count() == 0 for core in c.cores.values())
    assert c.cores["h1"].switch.port_for(*key(1)) is None
    # Detaching again: no port, still acked.
    assert c.command("h1", MsgType.DETACH, [10, "vm1", VLAN, mac_of(1), 0]) == (True, "no such port")


# ------------------------------------------------------------------ repair


def test_dropped_updates_are_repaired_by_pulls_after_heartbeats():
    c = Cluster(["h1", "h2", "h3", "h4"])
    # h3 misses every other update batch from h1, and h4 misses all of them.
    counter = {"n": 0}

    def drop(src, dst, mt, frame):
        if mt is not MsgType.UPDATES or src != "h1":
            return False
        if dst == "h4":
            return True
        if dst == "h3":
            counter["n"] += 1
            return counter["n"] % 2 == 1
        return False

    c.drop = drop
    for vm in range(1, 7):
        c.attach("h1", vm)
    c.move(2, "h1", "h2", 1)
    c.attach("h1", 7)
    expected = {key(vm): ("h1", 0, False) for vm in range(1, 8)} | {key(2): ("h2", 1, False)}
    assert c.dropped_updates > 0
    assert c.cores["h4"].table.as_placement() == {key(2): ("h2", 1, False)}
    assert c.cores["h3"].table.as_placement() != expected  # h3 already noticed gaps but lags
    c.drop = None
    c.heartbeat_round()
    c.heartbeat_round()
    assert c.converged_to(expected), c.placements()
    assert c.cores["h4"].stats.pulls_sent > 0
    assert c.cores["h4"].stats.repaired_updates > 0
    assert c.cores["h3"].stats.pulls_sent > 0
    assert c.stat("pulls_served") >= c.stat("pulls_sent")
    # Ranges still in the origin's log come back as updates, not as whole tables:
    # the only snapshots are the one each core took when it joined.
    assert c.stat("snapshots_received") == len(c.cores)
    # Repaired, they stay quiet: no more pulls once caught up.
    pulls = c.stat("pulls_sent")
    c.heartbeat_round()
    assert c.stat("pulls_sent") == pulls


def hint(c: Cluster, host: str, origin: str, entry: list | None = None, n: int = 0) -> None:
    args = {"origin": origin, "incarnation": c.cores[origin].incarnation}
    if entry is not None:
        args["entry"] = entry
    if n:
        args["n"] = n
    req = [0, "repair", args]
    c.cores[host].on_frame("ctl", wire.encode(MsgType.REQUEST, req), c.now)
    c.pump()


def h3_missed_a_move() -> Cluster:
    """vm1 moved h1 -> h2 (seq 1), and PUB/SUB lost h2's update on its way to h3."""
    c = Cluster(["h1", "h2", "h3"])
    c.attach("h1", 1)
    c.drop = lambda src, dst, mt, frame: dst == "h3" and mt is MsgType.UPDATES
    c.move(1, "h1", "h2", 1)
    c.drop = None
    return c


def test_repair_hint_pulls_a_lost_last_update_without_waiting_for_a_heartbeat():
    # h3 lost h2's only update, and no later one will show it the gap: the controller's hint
    # (it waits for h3's apply report) makes h3 pull it from h2 at once.
    c = h3_missed_a_move()
    assert c.cores["h3"].table.get(key(1)).host == "h1"
    reports = len(c.ctl)
    hint(c, "h3", "h2")
    assert c.cores["h3"].table.get(key(1)) == Entry("h2", "vEth1", 1)
    c.advance(AgentConfig().applied_report_interval_ms)
    c.pump()
    # The pulled update is reported as h2's number for the move (h2's latest).
    applied = [b for src, m, b in c.ctl[reports:] if src == "h3" and m is MsgType.APPLY_REPORT]
    n = c.cores["h2"].n
    assert [r[:2] for b in applied for r in b[2] if r[2] <= n <= r[3]] == [["h2", 1]]
    assert c.cores["h3"].stats.repair_hints == 1
    # Nothing lost: a hint costs one pull answered by an empty reply, and changes nothing.
    pulls = c.stat("pulls_served")
    hint(c, "h1", "h2")
    assert c.stat("pulls_served") == pulls + 1
    assert c.converged_to(c.cores["h2"].table.as_placement())
    assert c.stat("snapshots_served") == 3  # only the joins' snapshots


def test_repair_hint_with_the_entry_settles_it_in_one_message_and_never_goes_back():
    c = h3_missed_a_move()
    pulls = c.stat("pulls_sent")
    hint(c, "h3", "h2", [VLAN, mac_of(1), "h2", "vEth1", 1, False])
    assert c.cores["h3"].table.get(key(1)) == Entry("h2", "vEth1", 1)
    assert c.stat("pulls_sent") == pulls
    # A hint that is late (the VM moved on since) loses under the merge rule, as any update.
    c.move(1, "h2", "h3", 2)
    hint(c, "h1", "h2", [VLAN, mac_of(1), "h2", "vEth1", 1, False])
    assert c.converged_to({key(1): ("h3", 2, False)})
    # The numbering gap h3 has for h2 is pulled at h2's next heartbeat, as before.
    c.heartbeat_round()
    assert c.cores["h3"].peers["h2"].contiguous == c.cores["h2"].n


@pytest.mark.parametrize("args", [{}, {"origin": 5, "incarnation": 1}, {"origin": "h2", "incarnation": "x"},
                                  {"origin": "h2", "incarnation": -1},
                                  {"origin": "h2", "incarnation": 1, "entry": [VLAN, 1, "h2", "p", 1]},
                                  {"origin": "h2", "incarnation": 1, "entry": [0, 1, "h2", "p", 1, False]},
                                  {"origin": "h2", "incarnation": 1, "entry": None},
                                  {"origin": "h2", "incarnation": 1, "entry": [100, 1, "h2", "p", 1, 0]}])
def test_malformed_repair_hint_is_dropped_and_counted(args):
    c = Cluster(["h1", "h2"])
    core = c.cores["h1"]
    core.on_frame("ctl", wire.encode(MsgType.REQUEST, [0, "repair", args]), c.now)
    assert core.stats.dropped_malformed == 1 and core.stats.handler_errors == 0
    assert core.take_outbox() == []  # a notice: no reply, no pull


def test_lost_pull_is_retried_after_pull_timeout():
    c = Cluster(["h1", "h2"])
    c.drop = lambda src, dst, mt, f: mt is MsgType.UPDATES
    c.attach("h1", 1)
    c.drop = None
    c.drop_rpc = lambda src, dst, f: True  # the first pull request is lost
    c.heartbeat_round()
    assert c.cores["h2"].stats.pulls_sent == 1
    assert c.cores["h2"].table.get(key(1)) is None
    c.drop_rpc = None
    # Before pull_timeout_ms the pull is not repeated; after it, it is (also between heartbeats).
    c.advance(c.config.pull_timeout_ms - 1)
    c.cores["h2"].on_timer(c.now)
    c.pump()
    assert c.cores["h2"].stats.pulls_sent == 1
    c.advance(1)
    c.cores["h2"].on_timer(c.now)
    c.pump()
    assert c.cores["h2"].stats.pulls_sent == 2
    assert c.converged_to({key(1): ("h1", 0, False)})


def test_range_pulled_past_the_log_is_answered_with_a_snapshot():
    cfg = AgentConfig(log_max_updates=3)
    c = Cluster(["h1", "h2"], cfg)
    c.drop = lambda src, dst, mt, f: mt is MsgType.UPDATES
    for vm in range(1, 9):
        c.attach("h1", vm)
    c.drop = None
    c.heartbeat_round()
    assert c.converged_to({key(vm): ("h1", 0, False) for vm in range(1, 9)})
    assert c.cores["h1"].stats.snapshots_served >= 1
    assert c.cores["h2"].peers["h1"].contiguous == 8


def test_core_that_only_gets_a_snapshot_converges():
    c = Cluster(["h1", "h2"])
    for vm in range(1, 5):
        c.attach("h1" if vm % 2 else "h2", vm)
    c.move(3, "h1", "h2", 1)
    expected = {key(1): ("h1", 0, False), key(2): ("h2", 0, False), key(3): ("h2", 1, False),
                key(4): ("h2", 0, False)}
    assert c.converged_to(expected)
    h3 = c.join("h3")  # none of the earlier gossip ever reached it
    assert h3.stats.updates_received == 0
    assert h3.stats.snapshots_requested == 1 and h3.stats.snapshots_received == 1
    assert h3.table.as_placement() == expected and h3.table.digest == c.cores["h1"].table.digest
    # The snapshot's version vector covers every origin: no pulls follow.
    assert h3.peers["h1"].contiguous == c.cores["h1"].n
    assert h3.peers["h2"].contiguous == c.cores["h2"].n
    for _ in range(3):
        c.heartbeat_round()
    assert h3.stats.pulls_sent == 0 and h3.stats.updates_received == 0
    assert c.converged_to(expected)


@pytest.mark.parametrize("rounds", [1, 3, 5])
def test_digest_mismatch_with_dead_origin_is_repaired_by_snapshot(rounds):
    c = Cluster(["h1", "h2", "h3"], AgentConfig(digest_mismatch_rounds=rounds))
    c.drop = lambda src, dst, mt, f: src == "h1" and dst == "h3"
    c.attach("h1", 1)
    c.down.add("h1")  # the origin dies before anyone hears its heartbeat
    c.drop = None
    h3 = c.cores["h3"]
    assert key(1) not in h3.table
    for _ in range(rounds - 1):
        c.heartbeat_round()
    # Nothing tells h3 it misses an update of h1: only the digests disagree, not yet for long enough.
    assert key(1) not in h3.table
    assert h3.stats.pulls_sent == 0 and h3.stats.snapshots_requested == 1  # (the bootstrap one)
    c.heartbeat_round()
    assert h3.stats.snapshots_requested == 2
    assert h3.stats.repaired_updates >= 1
    assert c.converged_to({key(1): ("h1", 0, False)})
    c.heartbeat_round()
    assert h3.stats.snapshots_requested == 2  # agreed digests: no more snapshots


def test_restarted_agent_with_new_incarnation_rebuilds_from_peers():
    c = Cluster(["h1", "h2", "h3"])
    for vm in range(1, 4):
        c.attach("h2", vm)
    expected = c.cores["h1"].table.as_placement()
    c._add("h2", incarnation=INC + 1)  # same host, new life, empty table
    c.send_peers()
    h2 = c.cores["h2"]
    assert h2.table.as_placement() == expected
    c.heartbeat_round()
    # Peers forgot h2's old numbering: its new update 1 is not mistaken for the old update 1.
    c.attach("h2", 4)
    c.heartbeat_round()
    assert c.converged_to(expected | {key(4): ("h2", 0, False)})
    assert c.cores["h1"].peers["h2"].incarnation == INC + 1
    assert c.cores["h1"].peers["h2"].contiguous == 1


def test_new_incarnation_learned_from_gossip_resets_the_version_vector():
    c = Cluster(["h1", "h2", "h3"])
    for vm in range(1, 4):
        c.attach("h2", vm)
    assert c.cores["h1"].peers["h2"].contiguous == 3
    c._add("h2", incarnation=INC + 1)  # restarted; the others hear of it by gossip before any PEERS
    c.send_peers(to=["h2"])
    first = {"n": 0}

    def drop_first_update_to_h1(src, dst, mt, f):
        if src == "h2" and dst == "h1" and mt is MsgType.UPDATES:
            first["n"] += 1
            return first["n"] == 1
        return False

    c.drop = drop_first_update_to_h1
    c.attach("h2", 4)  # update 1 of the new life: lost on the way to h1
    c.attach("h2", 5)  # update 2: h1 sees the gap below it and pulls at once
    h1 = c.cores["h1"]
    assert h1.peers["h2"].incarnation == INC + 1
    assert h1.peers["h2"].contiguous == 2
    assert key(4) in h1.table and h1.stats.pulls_sent == 1
    # Gossip of the earlier life, arriving late, no longer moves the version vector.
    c.cores["h1"].on_frame("sub", wire.encode(MsgType.HEARTBEAT, ["h2", INC, 9, 0, 0]), c.now)
    assert h1.peers["h2"].incarnation == INC + 1 and h1.peers["h2"].latest_seen == 2
    c.drop = None
    c.heartbeat_round()
    assert c.converged_to({key(vm): ("h2", 0, False) for vm in range(1, 6)})


def test_pending_pull_counter_matches_after_peer_restart():
    c = Cluster(["h1", "h2"])
    c.drop = lambda src, dst, mt, f: mt is MsgType.UPDATES
    c.attach("h1", 1)
    c.drop = None
    c.drop_rpc = lambda src, dst, f: True
    c.heartbeat_round()  # h2 pulls from h1; the request is lost
    h2 = c.cores["h2"]
    assert h2.peers["h1"].pull_pending and h2.repair.pending == 1
    c.drop_rpc = None
    c._add("h1", incarnation=INC + 1)  # h1 restarts before answering
    c.send_peers()
    assert not h2.peers["h1"].pull_pending
    assert h2.repair.pending == sum(p.pull_pending for p in h2.peers.values())


def test_no_repair_defect_with_drops_does_not_converge():
    c = Cluster(["h1", "h2", "h3"], AgentConfig(defect_no_repair=True))
    c.drop = lambda src, dst, mt, f: mt is MsgType.UPDATES and dst == "h3"
    c.attach("h1", 1)
    c.attach("h2", 2)
    c.drop = None
    expected = {key(1): ("h1", 0, False), key(2): ("h2", 0, False)}
    for _ in range(10):
        c.heartbeat_round()
    assert not c.converged_to(expected)
    assert c.cores["h3"].table.as_placement() == {}
    assert c.stat("pulls_sent") == 0 and c.stat("snapshots_requested") == 0


# ------------------------------------------------------------------ flap guard


def test_flap_guard_reports_more_than_five_moves_in_the_window():
    c = Cluster(["h1", "h2", "h3"])
    c.attach("h1", 1)
    hosts = ["h1", "h2"]
    for seq in range(1, 6):
        assert c.move(1, hosts[(seq - 1) % 2], hosts[seq % 2], seq) == (True, "switched")
        c.advance(1000)
    assert c.stat("flap_reports") == 0
    c.move(1, "h2", "h1", 6)
    assert all(core.stats.flap_reports == 1 for core in c.cores.values())
    flapping = c.cores["h3"].status(c.now)["flapping"]
    assert flapping == [{"vlan": VLAN, "mac": "02:00:00:00:00:01", "moves": 6}]


def test_moves_spread_beyond_the_window_do_not_flap():
    c = Cluster(["h1", "h2"])
    c.attach("h1", 1)
    hosts = ["h1", "h2"]
    for seq in range(1, 10):
        assert c.move(1, hosts[(seq - 1) % 2], hosts[seq % 2], seq) == (True, "switched")
        c.advance(c.config.flap_window_ms / 4)
    assert c.stat("flap_reports") == 0


def test_a_move_older_than_the_window_does_not_count_toward_a_flap():
    c = Cluster(["h1", "h2", "h3"])
    c.attach("h1", 1)
    hosts = ["h1", "h2"]
    c.move(1, "h1", "h2", 1)
    c.advance(c.config.flap_window_ms + 1)
    for seq in range(2, 7):  # five more within the window: six in all, five in the window
        c.move(1, hosts[(seq - 1) % 2], hosts[seq % 2], seq)
    assert c.stat("flap_reports") == 0
    c.move(1, "h1", "h2", 7)
    assert all(core.stats.flap_reports == 1 for core in c.cores.values())


# ------------------------------------------------------------------ malformed input


def test_malformed_frames_are_dropped_and_counted():
    c = Cluster(["h1", "h2"])
    c.attach("h1", 1)
    core = c.cores["h2"]
    before = core.table.as_placement(), core.table.digest
    good_hb = ["h1", INC, 1, 0, 1]
    malformed = [
        ("sub", b"garbage"),
        ("sub", b""),
        ("rpc", b"\xc1\xc1"),
        ("pull", b"\x93\x01"),
        ("ctl", b"\xff" * 50),
        ("sub", msgpack.packb([2, 1, good_hb])),  # wrong schema version
        ("sub", msgpack.packb([1, 99, good_hb])),  # unknown type
        ("sub", msgpack.packb([1, 1, ["h1", "one", 1, 0, 1]])),  # wrong field type
        ("sub", msgpack.packb([1, 2, ["h1", INC, [[2, 0, mac_of(5), "h1", "p", 0, False]]]])),  # vlan 0
        ("ctl", msgpack.packb([1, int(MsgType.ATTACH), [1, "vm9", 5000, mac_of(9), "vEth9", 0]])),  # vlan 5000
        ("ctl", msgpack.packb([1, int(MsgType.ATTACH), [1, "vm9", VLAN, mac_of(9), "vEth9", True]])),  # bool seq
        ("pull", msgpack.packb([1, int(MsgType.SNAPSHOT), ["h1", [[VLAN, 1, "h1", "p", -1, False]], []]])),
        ("rpc", wire.encode(MsgType.PULL_REQ, ["h2", 1, 1])),  # wrong list length
        # Larger than any gossip frame may be (only repair replies carry whole tables).
        ("sub", wire.encode(MsgType.UPDATES, ["h1", INC, [[n, VLAN, n, "h1", "p" * 60, 0, False]
                                                           for n in range(1, 15_000)]])),
    ]
    unexpected = [
        ("sub", wire.encode(MsgType.ATTACH, [1, "vm9", VLAN, mac_of(9), "vEth9", 0])),
        ("sub", wire.encode(MsgType.SNAPSHOT, ["h1", [[VLAN, mac_of(9), "h1", "p", 9, False]], []])),
        ("ctl", wire.encode(MsgType.HEARTBEAT, good_hb)),
        ("ctl", wire.encode(MsgType.UPDATES, ["h1", INC, [[2, VLAN, mac_of(9), "h1", "p", 9, False]]])),
        ("rpc", wire.encode(MsgType.UPDATES, ["h1", INC, []])),
        ("rpc", wire.encode(MsgType.DETACH, [1, "vm1", VLAN, mac_of(1), 5])),
        ("pull", wire.encode(MsgType.PEERS, [[], 0])),
        ("pull", wire.encode(MsgType.PULL_REQ, ["h2", 1, 1, 5])),
    ]
    for channel, frame in malformed + unexpected:
        core.on_frame(channel, frame, c.now, envelope=[b"h1"])
    assert core.take_outbox() == []  # no reaction to any of it
    assert core.stats.handler_errors == 0, core.last_error
    assert core.stats.dropped_malformed == len(malformed)
    assert core.stats.dropped_unexpected == len(unexpected)
    assert core.status(c.now)["dropped_malformed"] == len(malformed) + len(unexpected)
    assert (core.table.as_placement(), core.table.digest) == before
    assert sorted(core.peers) == ["h1"]
    core.note_malformed()
    assert core.status(c.now)["dropped_malformed"] == len(malformed) + len(unexpected) + 1
    # The count reaches the controller in the next status report.
    c.heartbeat_round()
    statuses = [b for src, m, b in c.ctl if src == "h2" and m is MsgType.AGENT_STATUS]
    assert statuses[-1][5] == len(malformed) + len(unexpected) + 1
    # And the core still works.
    c.attach("h1", 2)
    assert c.converged_to({key(1): ("h1", 0, False), key(2): ("h1", 0, False)})


@settings(max_examples=150, deadline=None, derandomize=True)
@given(channel=st.sampled_from(["sub", "rpc", "pull", "ctl"]), data=st.binary(max_size=200))
def test_arbitrary_bytes_never_raise_from_on_frame(channel, data):
    core = AgentCore("h1", 1, pub_endpoint="p", rpc_endpoint="r")
    core.on_frame(channel, data, 5, envelope=[b"x"])
    status = core.status(5)
    assert core.stats.handler_errors == 0, core.last_error
    # Either dropped and counted, or a valid message that was handled.
    assert status["dropped_malformed"] in (0, 1)


def test_deeply_nested_frame_does_not_kill_the_agent():
    # Regression: a 1 KB frame nested ~1000 deep once raised RecursionError out of wire.decode.
    core = AgentCore("h1", 1, pub_endpoint="p", rpc_endpoint="r")
    core.on_frame("sub", b"\x93\x01\x01" + b"\x91" * 1015 + b"\x90", 5)
    assert core.status(5)["dropped_malformed"] == 1


def test_large_snapshot_is_accepted_on_the_pull_channel():
    c = Cluster(["h1", "h2"])
    entries = [[VLAN, n, "h1", "p" * 60, 0, False] for n in range(1, 15_000)]
    frame = wire.encode(MsgType.SNAPSHOT, ["h1", entries, [["h1", INC, 0]]])
    assert len(frame) > wire.MAX_SMALL_FRAME_BYTES
    c.cores["h2"].on_frame("pull", frame, c.now)
    assert len(c.cores["h2"].table) == len(entries)
    assert c.cores["h2"].stats.dropped_malformed == 0


def test_requests_on_rpc_and_ctl_are_answered():
    c = Cluster(["h1", "h2"])
    c.attach("h1", 1)
    core = c.cores["h2"]
    core.on_frame("rpc", wire.encode(MsgType.REQUEST, [7, "mac_table", {}]), c.now, envelope=[b"client"])
    core.on_frame("rpc", wire.encode(MsgType.REQUEST, [8, "nope", {}]), c.now, envelope=[b"client"])
    core.on_frame("ctl", wire.encode(MsgType.REQUEST, [9, "ping", {}]), c.now)
    e1, e2, e3 = core.take_outbox()
    assert e1 == Reply([b"client"], e1.frame) and e2 == Reply([b"client"], e2.frame) and type(e3) is ToController
    f1, f2, f3 = e1.frame, e2.frame, e3.frame
    _, (rid, ok, table) = wire.decode(f1)
    assert rid == 7 and ok and table["entries"][0]["mac"] == "02:00:00:00:00:01"
    assert table["entries"][0]["host"] == "h1" and not table["entries"][0]["local"]
    assert wire.decode(f2)[1][:2] == [8, False] and "unknown method" in wire.decode(f2)[1][2]
    assert wire.decode(f3)[1] == [9, True, {"host": "h2", "incarnation": INC}]
    # The controller asking us to register again gets a REGISTER, not a reply.
    core.on_frame("ctl", wire.encode(MsgType.REQUEST, [0, "register", {}]), c.now)
    (effect,) = core.take_outbox()
    assert type(effect) is ToController and wire.decode(effect.frame)[0] is MsgType.REGISTER


# ------------------------------------------------------------------ the convergence property


HOST_NAMES = ["h1", "h2", "h3", "h4", "h5"]


@st.composite
def scenarios(draw):
    n_hosts = draw(st.integers(3, 5))
    hosts = HOST_NAMES[:n_hosts]
    cmd = st.tuples(st.just("cmd"), st.integers(1, 5), st.sampled_from(hosts))
    tick = st.tuples(st.just("tick"), st.just(0), st.just(""))
    steps = draw(st.lists(st.one_of(cmd, cmd, cmd, tick), min_size=5, max_size=40))
    return hosts, steps, draw(st.integers(0, 2**32 - 1)), draw(st.sampled_from([0.0, 0.3, 0.6, 0.9, 1.0]))


def run_scenario(hosts, steps, seed, drop_p, config=None, drop_rpc=False):
    """Attach/move VMs as the controller would while gossip is lossy; return (cluster, expected)."""
    rng = random.Random(seed)
    c = Cluster(hosts, config)
    placement: dict[int, tuple[str, int]] = {}
    c.drop = lambda src, dst, mt, f: rng.random() < drop_p
    if drop_rpc:
        c.drop_rpc = lambda src, dst, f: rng.random() < drop_p
    for kind, vm, host in steps:
        if kind == "tick":
            c.heartbeat_round()
        elif vm not in placement:
            assert c.attach(host, vm) == (True, "attached")
            placement[vm] = (host, 0)
        elif placement[vm][0] != host:
            src, seq = placement[vm]
            assert c.move(vm, src, host, seq + 1) == (True, "switched")
            placement[vm] = (host, seq + 1)
    c.drop = c.drop_rpc = None
    expected = {key(vm): (h, seq, False) for vm, (h, seq) in placement.items()}
    return c, expected, placement


@settings(max_examples=150, deadline=None, derandomize=True)
@given(scenario=scenarios(), drop_rpc=st.booleans())
def test_random_moves_with_lossy_gossip_converge(scenario, drop_rpc):
    hosts, steps, seed, drop_p = scenario
    c, expected, placement = run_scenario(hosts, steps, seed, drop_p, drop_rpc=drop_rpc)
    for _ in range(3):
        c.heartbeat_round()
    assert c.converged_to(expected), (expected, c.placements())
    # Exactly the VM's current host has an active port for it.
    for vm, (host, _) in placement.items():
        for h, core in c.cores.items():
            port = core.switch.port_for(*key(vm))
            if h == host:
                assert port is not None and port.state == "active" and port.name == f"vEth{vm}"
            else:
                assert port is None, (vm, h)
    if c.dropped_updates:
        # Repair did the work: pulls, or snapshots beyond the one each core asks for when it joins.
        # (repaired_updates may stay 0: a lost update can be superseded before it is pulled.)
        assert c.stat("pulls_sent") + c.stat("snapshots_requested") > len(hosts)


def test_property_scenario_fails_without_repair():
    # The same harness and check as the property above, with the repair turned off: it must fail.
    steps = [("cmd", 1, "h1"), ("cmd", 2, "h2"), ("cmd", 1, "h3"), ("cmd", 3, "h3"), ("cmd", 2, "h1")]
    hosts = ["h1", "h2", "h3", "h4"]
    c, expected, _ = run_scenario(hosts, steps, seed=1, drop_p=0.6, config=AgentConfig(defect_no_repair=True))
    assert c.dropped_updates > 0
    for _ in range(10):
        c.heartbeat_round()
    assert not c.converged_to(expected)
    # ... and with repair on, the very same run converges.
    c, expected, _ = run_scenario(hosts, steps, seed=1, drop_p=0.6)
    for _ in range(3):
        c.heartbeat_round()
    assert c.converged_to(expected)


def test_prepared_port_is_released_when_the_switchover_never_comes():
    core = AgentCore("h2", 1, AgentConfig(prepare_timeout_ms=1_000), pub_endpoint="p", rpc_endpoint="r")
    core.start(0)
    core.on_frame("ctl", wire.encode(MsgType.PREPARE, [7, "vm1", 100, mac_of(1), "vEth1"]), 0)
    assert core.switch.ports["vEth1"].state == "prepared"
    core.on_timer(500 * NS_PER_MS)
    assert "vEth1" in core.switch.ports
    core.on_timer(1_600 * NS_PER_MS)  # the controller died mid-move: roll back
    assert "vEth1" not in core.switch.ports
    assert len(core.table) == 0


def test_apply_reports_share_a_frame_under_load_but_keep_exact_stamps():
    ms = NS_PER_MS
    core = AgentCore("h2", 1, AgentConfig(applied_report_interval_ms=5), pub_endpoint="p", rpc_endpoint="r")
    core.start(0)
    core.on_message("ctl", MsgType.PEERS, [[["h1", 1, "p1", "r1"], ["h2", 1, "p", "r"]], 1], 0)  # h1 is a member
    core.on_timer(0)  # first heartbeat and status: the next ones are 500 ms away
    core.take_outbox()

    def update(n: int, t: int) -> None:
        core.on_frame("sub", wire.encode(MsgType.UPDATES, ["h1", 1, [[n, 100, mac_of(n), "h1", "vEth1", 0, False]]]), t)

    def reports(t: int) -> list:
        core.flush(t)
        # (h1's update n is mac_of(n): its ranges name the MACs taken, with their stamps)
        return [[(mac_of(n), r[4]) for r in wire.decode(p)[1][2] for n in range(r[2], r[3] + 1)]
                for p in ctl_frames(core.take_outbox()) if wire.decode(p)[0] is MsgType.APPLY_REPORT]

    update(1, 1 * ms)
    assert reports(1 * ms) == [[(mac_of(1), 1 * ms)]]  # a quiet agent reports in the same wake-up
    update(2, 2 * ms)
    assert reports(2 * ms) == []  # within the interval after the last report: held back...
    assert core.next_deadline_ns() == 6 * ms  # ...with a wake-up asked for at its end
    update(3, 3 * ms)
    assert reports(3 * ms) == []
    assert reports(6 * ms) == [[(mac_of(2), 2 * ms), (mac_of(3), 3 * ms)]]  # ...then together, exact stamps
    update(4, 8 * ms)
    assert reports(8 * ms) == [] and core.next_deadline_ns() == 11 * ms
    core.on_timer(core.next_deadline_ns())  # nothing else happens: the agent's own timer sends it
    assert reports(11 * ms) == [[(mac_of(4), 8 * ms)]]
    assert core.next_deadline_ns() == 500 * ms  # (nothing pending: the next heartbeat)



def test_the_report_interval_follows_the_membership_the_controller_lists():
    ms = NS_PER_MS
    core = AgentCore("h2", 1, AgentConfig(), pub_endpoint="p", rpc_endpoint="r")  # 20,000 reports/s budget
    core.start(0)
    members = [[f"h{i}", 1, f"p{i}", f"r{i}"] for i in range(1, 41)]
    core.on_message("ctl", MsgType.PEERS, [members, 1], 0)  # 40 hosts: 2 ms between our reports
    core.on_timer(0)
    core.take_outbox()
    for n, t in ((1, 10 * ms), (2, 11 * ms)):
        core.on_frame("sub", wire.encode(MsgType.UPDATES, ["h1", 1, [[n, 100, mac_of(n), "h1", "vEth1", 0, False]]]), t)
        core.flush(t)
    assert len(ctl_frames(core.take_outbox())) == 1 and core.next_deadline_ns() == 12 * ms
    core.flush(12 * ms)
    assert len(ctl_frames(core.take_outbox())) == 1
    # 4 hosts now (the 36 others, never heard from, leave at once): 0.2 ms between our reports.
    core.on_message("ctl", MsgType.PEERS, [members[:4], 2], 12 * ms)
    for n, t in ((3, 14 * ms), (4, 14_100_000)):
        core.on_frame("sub", wire.encode(MsgType.UPDATES, ["h1", 1, [[n, 100, mac_of(n), "h1", "vEth1", 0, False]]]), t)
        core.flush(t)
    assert len(ctl_frames(core.take_outbox())) == 1 and core.next_deadline_ns() == 14_200_000


def test_the_controllers_pacing_notice_batches_reports_and_a_bad_one_is_counted():
    core = AgentCore("h2", 1, AgentConfig(), pub_endpoint="p", rpc_endpoint="r")
    core.start(0)
    core.take_outbox()  # (its REGISTER)
    notice = [0, "reports", {"batch_ms": 10, "for_ms": 3_000}]
    core.on_frame("ctl", wire.encode(MsgType.REQUEST, notice), 0)
    assert core.status(0)["report_batch_ms"] == 10 and core.take_outbox() == []  # a notice: no reply
    core.on_frame("ctl", wire.encode(MsgType.REQUEST, [0, "reports", {"batch_ms": "soon"}]), 0)
    assert core.stats.dropped_malformed == 1 and core.status(0)["report_batch_ms"] == 10
    # Only the controller paces: from a client it is an unknown API method, answered as such.
    core.on_frame("rpc", wire.encode(MsgType.REQUEST, [5, "reports", {"batch_ms": 0, "for_ms": 0}]), 0, [b"c"])
    (reply,) = [e for e in core.take_outbox() if isinstance(e, Reply)]
    assert wire.decode(reply.frame)[1][1] is False and core.status(0)["report_batch_ms"] == 10


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 4), st.integers(0, 3_000), st.booleans()), max_size=60))
def test_peers_heard_count_matches_a_full_scan(events):
    # The O(1) count of peers heard within the suspect window equals the plain definition.
    c = Cluster(["h1", "h2", "h3", "h4", "h5", "h6"])
    core = c.cores["h1"]
    for peer_i, gap_ms, check in events:
        c.advance(gap_ms)
        peer = f"h{peer_i + 2}"
        hb = [peer, INC, c.cores[peer].n, c.cores[peer].table.digest, len(c.cores[peer].table)]
        core.on_frame("sub", wire.encode(MsgType.HEARTBEAT, hb), c.now)
        if check:
            scan = sum(1 for p in core.peers.values()
                       if p.last_heard_ns >= 0 and c.now - p.last_heard_ns <= core.liveness.suspect_ns)
            assert core.peers_heard(c.now) == scan


def test_a_repair_hint_with_the_origins_number_leaves_no_gap_to_pull():
    # The controller knows h2's number for the claim: h3 takes the entry and counts the update
    # as received, so h2's next update or heartbeat shows no gap and nothing is pulled.
    c = h3_missed_a_move()
    n = c.cores["h2"].n
    hint(c, "h3", "h2", [VLAN, mac_of(1), "h2", "vEth1", 1, False], n=n)
    assert c.cores["h3"].table.get(key(1)) == Entry("h2", "vEth1", 1)
    assert c.cores["h3"].peers["h2"].contiguous == n
    pulls = c.stat("pulls_sent")
    c.attach("h2", 2)  # h2's update n + 1 reaches everyone
    c.advance(AgentConfig().heartbeat_interval_ms)
    c.pump()
    assert c.stat("pulls_sent") == pulls
    assert c.converged_to(c.cores["h2"].table.as_placement())


def test_a_repair_hint_with_a_bad_update_number_is_dropped_and_counted():
    c = h3_missed_a_move()
    dropped = c.cores["h3"].stats.dropped_malformed
    args = {"origin": "h2", "incarnation": 1, "entry": [VLAN, mac_of(1), "h2", "vEth1", 1, False], "n": -1}
    c.cores["h3"].on_frame("ctl", wire.encode(MsgType.REQUEST, [0, "repair", args]), c.now)
    assert c.cores["h3"].stats.dropped_malformed == dropped + 1
    assert c.cores["h3"].table.get(key(1)).host == "h1"


def test_end_batch_is_flush_take_outbox_and_next_deadline_in_one_call():
    # The simulator calls end_batch() after every batch; the runtime the three apart.
    def fed() -> AgentCore:
        core = AgentCore("h2", 1, pub_endpoint="p", rpc_endpoint="r")
        core.start(0)
        core.on_timer(0)
        core.take_outbox()
        frame = wire.encode(MsgType.UPDATES, ["h1", 1, [[1, VLAN, mac_of(1), "h1", "vEth1", 0, False]]])
        core.on_frame("sub", frame, 1_000_000)
        return core

    for t in (1_000_000, 6_000_000, 30_000_000):
        a, b = fed(), fed()
        a.flush(t)
        expected = (a.take_outbox(), a.next_deadline_ns())
        assert b.end_batch(t) == expected


def test_on_gossip_is_on_message_on_the_sub_channel():
    """The simulator's hot path hands decoded publications to on_gossip: same verdicts, same table."""
    frames = [
        wire.encode(MsgType.HEARTBEAT, ["h2", INC, 3, 0, 0]),
        wire.encode(MsgType.UPDATES, ["h2", INC, [[n, VLAN, mac_of(n), "h2", "p", 0, False] for n in range(1, 6)]]),
        wire.encode(MsgType.UPDATES, ["h2", INC, [[6, VLAN, mac_of(1), "h2", "p", 1, False]]]),
        wire.encode(MsgType.UPDATES, ["h3", INC, [[2, VLAN, mac_of(7), "h3", "p", 0, False]]]),  # a gap: pull
        wire.encode(MsgType.ATTACH, [1, "vm9", VLAN, mac_of(9), "vEth9", 0]),  # not a gossip type
        wire.encode(MsgType.UPDATES, ["h2", INC, [[7, VLAN, mac_of(8), "h2", "p", 0, False]] * 2]),  # twice
    ]
    a, b = (admit(AgentCore("h1", 1, pub_endpoint="p", rpc_endpoint="r"), "h2", "h3") for _ in range(2))
    for i, frame in enumerate(frames):
        mt, body = wire.decode(frame)
        a.on_message("sub", mt, body, 10 * i)
        b.on_gossip(mt, AgentCore.prepare(mt, body), 10 * i)
    assert a.stats.as_dict() == b.stats.as_dict() and a.stats.dropped_unexpected == 1
    assert (a.table.as_placement(), a.table.digest) == (b.table.as_placement(), b.table.digest)
    assert a.take_outbox() == b.take_outbox() != []
    assert a.end_batch(100) == b.end_batch(100)


@pytest.mark.parametrize("no_times", [False, True])
def test_lookup_answers_when_the_entry_was_last_changed_here(no_times):
    core = admit(AgentCore("h1", 1, AgentConfig(no_apply_times=no_times), pub_endpoint="p", rpc_endpoint="r"),
                 "h2", "h3")
    core.on_message("sub", MsgType.UPDATES, ["h2", 1, [[1, VLAN, mac_of(1), "h2", "p", 0, False]]], 5)
    core.on_message("sub", MsgType.UPDATES, ["h3", 1, [[1, VLAN, mac_of(1), "h3", "p", 1, False]]], 70)
    core.take_outbox()
    core.on_frame("rpc", wire.encode(MsgType.REQUEST, [9, "lookup", {"vlan": VLAN, "mac": mac_of(1)}]), 80,
                  envelope=[b"client"])
    (effect,) = core.take_outbox()
    assert effect == Reply([b"client"], effect.frame)
    frame = effect.frame
    assert wire.decode(frame)[1] == [9, True, {"host": "h3", "port": "p", "seq": 1, "tombstone": False,
                                               "applied_ns": 0 if no_times else 70}]


def test_a_membership_naming_an_older_life_of_a_peer_leaves_its_newer_endpoints_alone():
    core = AgentCore("h1", 1, pub_endpoint="p", rpc_endpoint="r")
    core.on_message("ctl", MsgType.PEERS, [[["h2", 2, "tcp://new:1", "tcp://new:2"]], 1], 5)
    core.take_outbox()
    # A stale list (an older epoch, reordered on a faulty control link) names h2's first life.
    core.on_message("ctl", MsgType.PEERS, [[["h2", 1, "tcp://old:1", "tcp://old:2"]], 0], 6)
    assert [e for e in core.take_outbox() if type(e) in (Subscribe, Unsubscribe)] == []
    peer = core.peers["h2"]
    assert (peer.incarnation, peer.pub_endpoint, peer.rpc_endpoint) == (2, "tcp://new:1", "tcp://new:2")


MS = 1_000_000


def _reported_rows(core: AgentCore, now_ns: int) -> list:
    """Apply-report rows sent by now_ns + 100 ms (the first flush after an apply only times it)."""
    out = list(core.end_batch(now_ns)[0])  # (an empty outbox is handed out as is: copy it)
    out += core.end_batch(now_ns + 100 * MS)[0]
    rows = []
    for frame in ctl_frames(out):
        mt, body = wire.decode(frame)
        if mt is MsgType.APPLY_REPORT:
            rows += body[1]
    return rows


def test_a_hint_for_what_we_already_hold_reports_it_again():
    # Our apply report of it was lost (a faulty control link): the controller hints; we hold the
    # entry, so we say so again, stamped when we took it, or the op would wait for us in vain.
    core = AgentCore("h1", 1, pub_endpoint="p", rpc_endpoint="r")
    core.on_message("ctl", MsgType.PEERS, [[["h2", 1, "p2", "r2"], ["h3", 1, "p3", "r3"]], 1], 0)
    core.on_message("sub", MsgType.UPDATES, ["h3", 1, [[1, VLAN, mac_of(1), "h3", "vEth1", 0, False]]], 5 * MS)
    core.on_message("sub", MsgType.UPDATES, ["h2", 1, [[1, VLAN, mac_of(1), "h2", "vEth1", 1, False]]], 70 * MS)
    _reported_rows(core, 1_000 * MS)  # (the ranges of both updates go out; that report is lost)
    hint_args = {"origin": "h2", "incarnation": 1, "entry": [VLAN, mac_of(1), "h2", "vEth1", 1, False]}
    core.on_message("ctl", MsgType.REQUEST, [0, "repair", hint_args], 2_000 * MS)
    assert core.stats.repaired_updates == 0
    assert _reported_rows(core, 3_000 * MS) == [[VLAN, mac_of(1), "h2", 1, False, 70 * MS, 0]]
    # A hint for an older entry than we hold: we report what we hold (past the target counts).
    hint_args["entry"] = [VLAN, mac_of(1), "h3", "vEth1", 0, False]
    core.on_message("ctl", MsgType.REQUEST, [0, "repair", hint_args], 4_000 * MS)
    assert _reported_rows(core, 5_000 * MS) == [[VLAN, mac_of(1), "h2", 1, False, 70 * MS, 0]]
