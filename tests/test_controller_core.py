"""controller/core.py driven directly: fake agents and a fake client, fake monotonic time."""

from __future__ import annotations

import pytest

from agent import wire
from agent.config import AgentConfig
from agent.core import AgentCore
from agent.wire import MsgType
from controller.config import ControllerConfig
from controller.core import ControllerCore
from controller.inventory import MAC_BASE, Vm
from tests.effect_router import route as route_effect

NS_PER_MS = 1_000_000
CLIENT = [b"client"]
VLAN = 100  # the "default" port profile


def route(host: str) -> list[bytes]:
    return [f"id-{host}".encode()]


class Ctl:
    """A ControllerCore plus the agents and the client around it, all faked by the test."""

    def __init__(self, config: ControllerConfig | None = None, now_ms: int = 1_000):
        self.config = config or ControllerConfig()
        self.core = ControllerCore(self.config)
        self.now = now_ms * NS_PER_MS
        self.sent: list[tuple[list, MsgType, list]] = []  # everything the controller sent
        self._last_peers: dict[tuple, list] = {}
        self.hints: list[tuple[str, dict]] = []  # repair hints sent: (host, args), kept apart
        self.pacing: list[tuple[str, dict]] = []  # report pacing notices sent: (host, args), kept apart
        self._req = 0

    # -------------------------------------------------------------- input

    def feed(self, envelope: list, mt: MsgType, body: list) -> None:
        self.feed_raw(envelope, wire.encode(mt, body))

    def feed_raw(self, envelope: list, frame: bytes) -> None:
        self.core.on_frame(envelope, frame, self.now)
        self._collect()

    def _collect(self) -> None:
        for envelope, frame in self.core.take_outbox():
            mt, body = wire.decode(frame)
            if mt is MsgType.REQUEST and body[1] == "repair":
                self.hints.append((self.core.members.routes.get(envelope[0], "?"), body[2]))
                continue
            if mt is MsgType.REQUEST and body[1] == "reports":
                self.pacing.append((self.core.members.routes.get(envelope[0], "?"), body[2]))
                continue
            if mt is MsgType.PEERS:
                # These tests look at the members; the epoch has tests of its own.
                body = body[:1]
                # A resend of an unchanged membership is not news to these tests.
                if self._last_peers.get(tuple(envelope)) == body:
                    continue
                self._last_peers[tuple(envelope)] = body
            self.sent.append((envelope, mt, body))
        assert self.core.handler_errors == 0, self.core.last_error

    def advance(self, ms: float) -> None:
        self.now += int(ms * NS_PER_MS)
        self.core.on_timer(self.now)
        self._collect()

    def register(self, host: str, incarnation: int = 1) -> None:
        self.feed(route(host), MsgType.REGISTER, [host, incarnation, f"tcp://{host}:1", f"tcp://{host}:2", 100])
        self.advance(self.core.config.peers_batch_ms)  # past the batch window: PEERS is out

    def status(self, host: str, peers_heard: int, incarnation: int = 1, epoch: int | None = None) -> None:
        epoch = self.core.peers_epoch if epoch is None else epoch  # by default, it has the latest
        self.feed(route(host), MsgType.AGENT_STATUS, [host, incarnation, peers_heard, 0, 0, 0, epoch])

    def ack(self, host: str, op: int, ok: bool = True, detail: str | None = None, t_ns: int | None = None) -> None:
        """Ack `op` as an agent would; the detail names the step done (what the agent sends)."""
        if detail is None:
            step = {"prepare": "prepared", "switchover": "switched", "attach": "attached", "tombstone": "detached"}
            pending = self.core.ops.get(op)
            detail = step.get(pending.phase, "") if pending and ok else "refused"
        self.feed(route(host), MsgType.ACK, [op, ok, detail, self.now if t_ns is None else t_ns])

    def applied(self, host: str, vm: int, on: str, seq: int, t_ns: int | None = None, tomb: bool = False) -> None:
        """`host` applied vm<vm> -> (on, seq), as its APPLY_REPORT says it: one row, no number
        (the row of an entry it did not originate, or whose number the test does not care for)."""
        rows = [[VLAN, MAC_BASE + vm, on, seq, tomb, self.now if t_ns is None else t_ns, 0]]
        self.feed(route(host), MsgType.APPLY_REPORT, [host, rows, []])

    def request(self, method: str, args: dict) -> int:
        self._req += 1
        self.feed(CLIENT, MsgType.REQUEST, [self._req, method, args])
        return self._req

    # -------------------------------------------------------------- output

    def take(self, envelope: list | None = None, mt: MsgType | None = None) -> list[list]:
        """Bodies sent (to `envelope`, of type `mt`) since the last take, removed from the log."""
        hit = [(e, m, b) for e, m, b in self.sent if (envelope is None or e == envelope) and (mt is None or m is mt)]
        self.sent = [x for x in self.sent if x not in hit]
        return [b for _, _, b in hit]

    def to(self, host: str) -> list[tuple[MsgType, list]]:
        out = [(m, b) for e, m, b in self.sent if e == route(host)]
        self.sent = [x for x in self.sent if x[0] != route(host)]
        return out

    def reply(self, req_id: int):
        """(ok, result) of the client's request, or None while unanswered."""
        for e, m, b in self.sent:
            if e == CLIENT and m is MsgType.REPLY and b[0] == req_id:
                self.sent.remove((e, m, b))
                return b[1], b[2]
        return None

    def call(self, method: str, args: dict):
        got = self.reply(self.request(method, args))
        assert got is not None, f"{method} did not answer at once"
        return got


def cluster(hosts: int = 3, config: ControllerConfig | None = None) -> Ctl:
    c = Ctl(config)
    for i in range(1, hosts + 1):
        c.register(f"h{i}")
    c.take()
    return c


def switched_move(c: Ctl, vm: int, dst: str, applied_by: tuple[str, ...] = ()) -> int:
    """Move vm<vm> to dst through prepare and switchover; `applied_by` report applying it.
    Returns the client's request id (the reply comes once every live host applied it)."""
    req = c.request("vm_move", {"name": f"vm{vm}", "to": dst})
    ((_, (op, *_)),) = c.to(dst)
    c.ack(dst, op)
    c.ack(dst, op)
    for h in applied_by:
        c.applied(h, vm, dst, 1)
    return req


def create(c: Ctl, vm: int, host: str) -> dict:
    """Create vm<vm> on host and converge it on every registered host."""
    req = c.request("vm_create", {"name": f"vm{vm}", "host": host})
    ((op, *_),) = c.take(route(host), MsgType.ATTACH)
    c.ack(host, op)
    for h in c.core.inv.live_hosts():
        c.applied(h, vm, host, 0)
    ok, rec = c.reply(req)
    assert ok and rec["converged"], rec
    c.take()
    return rec


def live_hosts(c: Ctl) -> list[str]:
    return c.core.inv.live_hosts()


# ------------------------------------------------------------------ registration and readiness


def test_register_broadcasts_peers_to_every_host():
    c = Ctl()
    c.register("h1")
    assert c.take() == [[[["h1", 1, "tcp://h1:1", "tcp://h1:2"]]]]
    c.register("h2")
    c.register("h3")
    members = [[f"h{i}", 1, f"tcp://h{i}:1", f"tcp://h{i}:2"] for i in (1, 2, 3)]
    # The last registration sent the full membership to each of the three routes.
    last = c.sent[-3:]
    assert sorted(e[0] for e, _, _ in last) == [b"id-h1", b"id-h2", b"id-h3"]
    assert all(m is MsgType.PEERS and b == [members] for _, m, b in last)
    assert c.core.inv.live_hosts() == ["h1", "h2", "h3"]


def test_registrations_close_together_share_one_broadcast():
    cfg = ControllerConfig()
    core = ControllerCore(cfg)
    core.on_timer(0)
    sent = []
    for i in range(1, 51):  # 50 agents register within 1 ms
        core.on_frame(route(f"h{i}"), wire.encode(MsgType.REGISTER, [f"h{i}", 1, f"p{i}", f"r{i}", i]), i * 20_000)
        sent += core.take_outbox()
    assert len(sent) == 1  # the first one went out at once, to h1
    assert core.next_deadline_ns() == 20_000 + cfg.peers_batch_ms * NS_PER_MS
    core.on_timer(core.next_deadline_ns())
    out = [(e, wire.decode(f)) for e, f in core.take_outbox()]
    assert len(out) == 50 and all(mt is MsgType.PEERS for _, (mt, _) in out)
    members, epoch = out[0][1][1]
    assert len(members) == 50 and epoch == core.peers_epoch == 50


def test_register_with_new_incarnation_replaces_and_stale_one_is_ignored():
    c = cluster(2)
    c.register("h2", incarnation=5)
    peers = c.take(route("h1"), MsgType.PEERS)
    assert peers[-1] == [[["h1", 1, "tcp://h1:1", "tcp://h1:2"], ["h2", 5, "tcp://h2:1", "tcp://h2:2"]]]
    c.take()
    c.register("h2", incarnation=4)  # a late message from an earlier life
    assert c.sent == []
    assert c.core.inv.hosts["h2"].incarnation == 5
    # A status of the old life does not count either.
    c.status("h2", 1, incarnation=4)
    assert c.core.inv.hosts["h2"].peers_heard == 0


def test_wait_ready_replies_only_when_every_host_hears_all_peers():
    c = Ctl()
    req = c.request("wait_ready", {"hosts": 3, "timeout_ms": 10_000})
    c.register("h1")
    c.register("h2")
    c.status("h1", 1)
    c.status("h2", 1)
    assert c.reply(req) is None  # 2 of 3 registered
    c.register("h3")
    assert c.reply(req) is None
    c.status("h1", 2)
    c.status("h2", 2)
    c.status("h3", 1)
    assert c.reply(req) is None  # h3 hears only one peer
    c.status("h3", 2, incarnation=7)  # not its incarnation: ignored
    assert c.reply(req) is None
    c.status("h3", 2)
    assert c.reply(req) == (True, {"hosts": 3})
    # Asked again once ready: answered at once.
    assert c.call("wait_ready", {"hosts": 3}) == (True, {"hosts": 3})


def test_wait_ready_times_out_with_a_reason():
    c = cluster(2)
    c.status("h1", 1)
    c.status("h2", 0)
    req = c.request("wait_ready", {"hosts": 2, "timeout_ms": 500})
    c.advance(400)
    c.status("h1", 1)
    c.status("h2", 0)
    assert c.reply(req) is None
    c.advance(100)
    ok, msg = c.reply(req)
    assert not ok and "cluster not ready" in msg and "2/2 agents registered, 1 hear all their peers" in msg


# ------------------------------------------------------------------ create


def test_vm_create_attaches_and_replies_once_every_live_host_applied():
    c = cluster(3)
    req = c.request("vm_create", {"name": "vm1", "host": "h2"})
    assert c.to("h1") == [] and c.to("h3") == []
    ((mt, body),) = c.to("h2")
    assert mt is MsgType.ATTACH
    op = body[0]
    assert body == [op, "vm1", VLAN, MAC_BASE + 1, "vEth1", 0]
    # An apply report may come before the ack; it still counts.
    c.applied("h1", 1, "h2", 0, t_ns=c.now + 2 * NS_PER_MS)
    t_ack = c.now
    c.ack("h2", op, detail="attached", t_ns=t_ack)
    c.applied("h2", 1, "h2", 0, t_ns=t_ack)
    assert c.reply(req) is None  # h3 has not applied it
    c.applied("h3", 1, "h2", 0, t_ns=t_ack + 5 * NS_PER_MS)
    ok, rec = c.reply(req)
    assert ok and rec["converged"] and rec["kind"] == "create" and rec["vm"] == "vm1" and rec["seq"] == 0
    assert rec["latency_ms"] == 5.0 and rec["error"] == "" and rec["missing"] == []
    (vm,) = c.call("vm_list", {})[1]["vms"]
    assert (vm["vm"], vm["host"], vm["seq"], vm["state"], vm["mac"]) == ("vm1", "h2", 0, "active", "02:00:00:00:00:01")
    ok, table = c.call("expected_table", {})
    assert table == {"entries": [[VLAN, MAC_BASE + 1, "h2", 0, False]], "live_hosts": ["h1", "h2", "h3"]}


def test_batch_create_replies_once_all_ops_are_done():
    c = cluster(2)
    req = c.request("vm_create", {"vms": [["a", "h1", "web"], ["b", "h2", "db"]]})
    (a,) = c.take(route("h1"), MsgType.ATTACH)
    (b,) = c.take(route("h2"), MsgType.ATTACH)
    assert a[1:] == ["a", 110, MAC_BASE + 1, "vEth1", 0] and b[1:] == ["b", 130, MAC_BASE + 2, "vEth2", 0]
    c.ack("h1", a[0])
    c.ack("h2", b[0])
    for h in ("h1", "h2"):
        c.feed(route(h), MsgType.APPLY_REPORT, [h, [[110, MAC_BASE + 1, "h1", 0, False, c.now, 0]], []])
    assert c.reply(req) is None
    for h in ("h1", "h2"):
        c.feed(route(h), MsgType.APPLY_REPORT, [h, [[130, MAC_BASE + 2, "h2", 0, False, c.now, 0]], []])
    ok, result = c.reply(req)
    assert ok and [r["vm"] for r in result["ops"]] == ["a", "b"] and all(r["converged"] for r in result["ops"])


def test_create_never_acked_fails_after_op_timeout_and_the_name_is_free_again():
    c = cluster(2, ControllerConfig(op_timeout_ms=1_000))
    req = c.request("vm_create", {"name": "vm1", "host": "h1"})
    for _ in range(19):
        c.advance(50)
        c.status("h1", 1)
        c.status("h2", 1)
    assert c.reply(req) is None
    c.advance(50)
    ok, msg = c.reply(req)
    assert not ok and "not converged within 1000 ms" in msg and "phase attach" in msg
    assert c.call("vm_list", {"all": True})[1]["vms"][0]["state"] == "failed"
    assert c.call("expected_table", {})[1]["entries"] == []
    c.request("vm_create", {"name": "vm1", "host": "h2"})
    assert c.take(route("h2"), MsgType.ATTACH)


def test_refused_attach_is_an_error_reply():
    c = cluster(2)
    req = c.request("vm_create", {"name": "vm1", "host": "h1"})
    ((op, *_),) = c.take(route("h1"), MsgType.ATTACH)
    c.ack("h1", op, ok=False, detail="stale: table holds seq 3 on h2")
    ok, msg = c.reply(req)
    assert not ok and msg == "h1 refused: stale: table holds seq 3 on h2"


# ------------------------------------------------------------------ move


def test_vm_move_prepare_switchover_detach_and_latency():
    c = cluster(3)
    create(c, 1, "h1")
    req = c.request("vm_move", {"name": "vm1", "to": "h3"})
    # 1. prepare on the destination only
    ((mt, body),) = c.to("h3")
    assert mt is MsgType.PREPARE and body[1:] == ["vm1", VLAN, MAC_BASE + 1, "vEth1"]
    op = body[0]
    assert c.to("h1") == [] and c.to("h2") == []
    assert c.call("vm_list", {})[1]["vms"][0]["state"] == "moving"
    # The VM cannot be touched while it moves.
    ok, msg = c.call("vm_move", {"name": "vm1", "to": "h2"})
    assert not ok and "operation in flight" in msg
    # An ack from another host does not advance the move.
    c.ack("h2", op)
    assert c.to("h3") == []
    # 2. prepared -> switchover with seq + 1
    c.ack("h3", op, detail="prepared")
    ((mt, body),) = c.to("h3")
    assert mt is MsgType.SWITCHOVER and body == [op, "vm1", VLAN, MAC_BASE + 1, "vEth1", 1]
    assert c.to("h1") == []  # make before break: the source keeps its port for now
    # 3. switched (stamped t_sw) -> detach the source, keep the entry (tombstone seq 0)
    t_sw = c.now + 3 * NS_PER_MS
    c.ack("h3", op, detail="switched", t_ns=t_sw)
    ((mt, body),) = c.to("h1")
    assert mt is MsgType.DETACH and body[1:] == ["vm1", VLAN, MAC_BASE + 1, 0] and body[0] != op
    # 4. converged once every live host applied (h3, 1); stale reports do not count.
    c.applied("h3", 1, "h3", 1, t_ns=t_sw)
    c.applied("h2", 1, "h1", 0, t_ns=t_sw + NS_PER_MS)  # an old entry: not the target
    c.applied("h1", 1, "h3", 1, t_ns=t_sw + 4 * NS_PER_MS)
    assert c.reply(req) is None
    c.ack("h1", body[0], detail="detached")  # the detach's own ack changes nothing
    assert c.reply(req) is None
    c.applied("h2", 1, "h3", 1, t_ns=t_sw + 7_500_000)
    ok, rec = c.reply(req)
    assert ok, rec
    assert (rec["kind"], rec["vm"], rec["src"], rec["dst"], rec["seq"]) == ("move", "vm1", "h1", "h3", 1)
    assert rec["converged"] and rec["error"] == "" and rec["missing"] == []
    assert rec["latency_ms"] == 7.5  # (max applied t - switchover t) / 1e6
    assert rec["switch_ns"] == t_sw
    (vm,) = c.call("vm_list", {})[1]["vms"]
    assert (vm["host"], vm["seq"], vm["state"]) == ("h3", 1, "active")
    assert c.call("expected_table", {})[1]["entries"] == [[VLAN, MAC_BASE + 1, "h3", 1, False]]
    assert [m["op"] for m in c.call("moves", {})[1]["moves"]] == [op]
    # The next move carries seq 2.
    c.request("vm_move", {"name": "vm1", "to": "h1"})
    ((mt, body),) = c.to("h1")
    c.ack("h1", body[0])
    assert c.take(route("h1"), MsgType.SWITCHOVER)[0][5] == 2


def test_report_of_a_later_seq_counts_as_applied():
    c = cluster(2)
    create(c, 1, "h1")
    req = switched_move(c, 1, "h2", applied_by=("h2",))
    c.applied("h1", 1, "h1", 2)  # h1 already moved past the target
    ok, rec = c.reply(req)
    assert ok and rec["converged"]


def test_move_with_a_host_that_never_applies_times_out_not_converged():
    c = cluster(3, ControllerConfig(op_timeout_ms=2_000))
    create(c, 1, "h1")
    start = c.now
    req = c.request("vm_move", {"name": "vm1", "to": "h2"})
    ((_, (op, *_)),) = c.to("h2")
    c.ack("h2", op)
    t_sw = c.now
    c.ack("h2", op, t_ns=t_sw)
    c.applied("h1", 1, "h2", 1)
    c.applied("h2", 1, "h2", 1)
    # h3 stays alive (it reports status) but never applies the move.
    while c.now + 50 * NS_PER_MS < start + 2_000 * NS_PER_MS:
        c.advance(50)
        for h in ("h1", "h2", "h3"):
            c.status(h, 2)
        assert c.reply(req) is None, c.now - start
    c.advance(50)
    ok, rec = c.reply(req)
    assert ok and not rec["converged"] and rec["missing"] == ["h3"] and rec["latency_ms"] is None
    assert "not converged within 2000 ms" in rec["error"] and "1 hosts" in rec["error"]
    # The destination owns the MAC: the inventory follows it even though h3 lags.
    (vm,) = c.call("vm_list", {})[1]["vms"]
    assert (vm["host"], vm["seq"], vm["state"]) == ("h2", 1, "active")
    assert c.call("moves", {})[1]["moves"][-1]["converged"] is False


def test_move_refused_by_destination_is_an_error_and_the_vm_stays():
    c = cluster(2)
    create(c, 1, "h1")
    req = c.request("vm_move", {"name": "vm1", "to": "h2"})
    ((_, (op, *_)),) = c.to("h2")
    c.ack("h2", op)
    c.ack("h2", op, ok=False, detail="stale: table holds seq 4 on h9")
    ok, msg = c.reply(req)
    assert not ok and "h2 refused" in msg and "stale" in msg
    (vm,) = c.call("vm_list", {})[1]["vms"]
    assert (vm["host"], vm["seq"], vm["state"]) == ("h1", 0, "active")
    assert c.take(route("h1"), MsgType.DETACH) == []


@pytest.mark.parametrize(
    "args,expected",
    [
        ({"name": "vm9", "to": "h2"}, "unknown VM 'vm9'"),
        ({"name": "vm1", "to": "h9"}, "unknown host 'h9' (known: h1, h2, h3)"),
        ({"name": "vm1", "to": "h1"}, "VM 'vm1' is already on h1; pick another host"),
        ({"name": "vm1"}, "bad arguments for vm_move"),
        ({"name": ["vm1"], "to": "h2"}, "bad arguments for vm_move"),
    ],
)
def test_move_errors(args, expected):
    c = cluster(3)
    create(c, 1, "h1")
    ok, msg = c.call("vm_move", args)
    assert not ok and expected in msg
    assert c.to("h1") == [] and c.to("h2") == [] and c.to("h3") == []
    assert c.core.ops == {}


@pytest.mark.parametrize(
    "args,expected",
    [
        ({"name": "vm1", "host": "h1"}, "VM 'vm1' already exists"),
        ({"name": "bad name!", "host": "h1"}, "bad VM name"),
        ({"name": "vm2", "host": "h7"}, "unknown host 'h7'"),
        ({"name": "vm2", "host": "h1", "profile": "nope"}, "unknown port profile 'nope'"),
        ({"vms": []}, "at least one VM"),
        ({"vms": [["a", "h1"]]}, "each VM is [name, host, profile]"),
        ({"vms": [["a", "h1", "default"], ["a", "h2", "default"]]}, "VM 'a' already exists"),
    ],
)
def test_create_errors(args, expected):
    c = cluster(2)
    create(c, 1, "h1")
    ok, msg = c.call("vm_create", args)
    assert not ok and expected in msg
    assert c.core.ops == {} and c.take(mt=MsgType.ATTACH) == []


def test_unknown_method_is_an_error_reply():
    c = cluster(1)
    assert c.call("fly", {}) == (False, "unknown method 'fly'")


# ------------------------------------------------------------------ liveness


def test_silent_host_becomes_suspect_then_dead_and_is_no_longer_awaited():
    cfg = ControllerConfig()
    c = cluster(3, cfg)
    create(c, 1, "h1")
    req = switched_move(c, 1, "h2", applied_by=("h1", "h2"))
    last_h3 = c.now
    states = []
    # h3 falls silent; h1 and h2 keep reporting.
    while c.now - last_h3 <= cfg.dead_after_ms * NS_PER_MS:
        assert c.reply(req) is None
        c.advance(cfg.tick_interval_ms)
        c.status("h1", 2)
        c.status("h2", 2)
        states.append(c.core.inv.hosts["h3"].state)
    assert states[-1] == "dead"
    first_suspect = states.index("suspect")
    assert (first_suspect + 1) * cfg.tick_interval_ms > cfg.suspect_after_ms
    assert first_suspect * cfg.tick_interval_ms <= cfg.suspect_after_ms + cfg.tick_interval_ms
    assert "alive" not in states[first_suspect:]
    # Declared dead: the move no longer waits for it.
    ok, rec = c.reply(req)
    assert ok and rec["converged"] and rec["missing"] == []
    # The survivors get a membership without h3; h3 gets nothing.
    members = [["h1", 1, "tcp://h1:1", "tcp://h1:2"], ["h2", 1, "tcp://h2:1", "tcp://h2:2"]]
    assert c.take(route("h1"), MsgType.PEERS)[-1] == [members]
    assert c.take(route("h2"), MsgType.PEERS)[-1] == [members]
    assert c.take(route("h3")) == []
    assert live_hosts(c) == ["h1", "h2"]
    hosts = {h["host"]: h["state"] for h in c.call("status", {})[1]["hosts"]}
    assert hosts == {"h1": "alive", "h2": "alive", "h3": "dead"}
    # A dead host is no target, and later ops do not wait for it.
    ok, msg = c.call("vm_move", {"name": "vm1", "to": "h3"})
    assert not ok and "is dead" in msg
    assert c.take(route("h1"), MsgType.DETACH)  # (from the first move)
    req = c.request("vm_move", {"name": "vm1", "to": "h1"})
    ((_, (op, *_)),) = c.to("h1")
    c.ack("h1", op)
    c.ack("h1", op)
    c.applied("h1", 1, "h1", 2)
    c.applied("h2", 1, "h1", 2)
    assert c.reply(req)[1]["converged"]


def test_suspect_host_that_speaks_again_is_alive():
    cfg = ControllerConfig()
    c = cluster(2, cfg)
    c.advance(cfg.suspect_after_ms + cfg.tick_interval_ms)
    assert {h.state for h in c.core.inv.hosts.values()} == {"suspect"}
    c.status("h1", 1)
    c.ack("h2", 999)  # any frame from the host counts
    assert {h.state for h in c.core.inv.hosts.values()} == {"alive"}


def test_dead_host_that_speaks_again_is_readmitted():
    cfg = ControllerConfig()
    c = cluster(3, cfg)
    for _ in range(cfg.dead_after_ms // cfg.tick_interval_ms + 2):
        c.advance(cfg.tick_interval_ms)
        c.status("h1", 2)
        c.status("h2", 2)
    assert c.core.inv.hosts["h3"].state == "dead"
    c.take()
    # h3 was only paused: it resumes with the same incarnation and reports as usual.
    for _ in range(5):
        c.advance(cfg.tick_interval_ms)
        for h in ("h1", "h2", "h3"):
            c.status(h, 1)
    back_in_peers = any(m[0] == "h3" for b in c.take(route("h1"), MsgType.PEERS) for m in b[0])
    asked_to_register = any(b[1] == "register" for b in c.take(route("h3"), MsgType.REQUEST))
    assert back_in_peers or asked_to_register


# ------------------------------------------------------------------ malformed input


def test_garbage_and_unexpected_frames_are_counted():
    c = cluster(2)
    bad = [b"", b"garbage", b"\x93\x01", wire.encode(MsgType.ACK, [1, "yes", "", 0])[:-1],
           b"\x93\x02\x0d\x94\x01\xc3\xa0\x00",  # schema version 2
           b"\x93\x01\x63\x90"]  # message type 99
    for frame in bad:
        c.feed_raw(route("h1"), frame)
    # Well-formed, but no agent sends these to the controller.
    c.feed(route("h1"), MsgType.PEERS, [[], 0])
    c.feed(route("h2"), MsgType.HEARTBEAT, ["h2", 1, 0, 0, 0])
    assert c.core.dropped_malformed == len(bad) + 2
    assert c.sent == []
    ok, st = c.call("status", {})
    assert st["dropped_malformed"] == len(bad) + 2
    assert c.core.handler_errors == 0
    # Oversize: the controller never takes a snapshot-sized frame.
    big = wire.encode(MsgType.REQUEST, [1, "status", {"pad": "x" * wire.MAX_SMALL_FRAME_BYTES}])
    c.feed_raw(CLIENT, big)
    assert c.core.dropped_malformed == len(bad) + 3 and c.sent == []


def test_frames_from_an_unknown_agent_ask_it_to_register():
    c = cluster(1)
    stranger = [b"id-stranger"]
    c.feed(stranger, MsgType.AGENT_STATUS, ["hx", 1, 0, 0, 0, 0, 0])
    c.feed(stranger, MsgType.APPLY_REPORT, ["hx", [], []])
    c.feed(stranger, MsgType.ACK, [1, True, "", 1])
    assert c.take(stranger, MsgType.REQUEST) == [[0, "register", {}]] * 3
    c.feed(stranger, MsgType.REPLY, [1, True, None])
    assert c.core.dropped_malformed == 1
    assert "hx" not in c.core.inv.hosts


@pytest.mark.parametrize(
    "method,args",
    [("moves", {"last": float("inf")}), ("wait_ready", {"hosts": 1, "timeout_ms": float("inf")})],
)
def test_request_with_an_infinite_number_gets_an_error_reply(method, args):
    c = cluster(1)
    # Fed directly: the harness's own handler_errors check would stop the test too early.
    c.core.on_frame(CLIENT, wire.encode(MsgType.REQUEST, [42, method, args]), c.now)
    replies = [wire.decode(f)[1] for e, f in c.core.take_outbox() if e == CLIENT]
    assert c.core.handler_errors == 0
    assert len(replies) == 1 and replies[0][:2] == [42, False] and "bad arguments" in replies[0][2]


# ------------------------------------------------------------------ robustness of the move protocol


def test_duplicated_prepare_ack_is_not_taken_for_the_switchover_ack():
    c = cluster(2)
    create(c, 1, "h1")
    c.request("vm_move", {"name": "vm1", "to": "h2"})
    ((_, (op, *_)),) = c.to("h2")
    c.ack("h2", op, detail="prepared")
    c.ack("h2", op, detail="prepared")  # the same ack, delivered twice
    assert c.take(route("h1"), MsgType.DETACH) == []
    assert c.core.ops[op].phase == "switchover"


def test_controller_never_hands_out_the_same_seq_twice():
    c = cluster(3, ControllerConfig(op_timeout_ms=1_000))
    create(c, 1, "h1")
    req = c.request("vm_move", {"name": "vm1", "to": "h3"})
    ((_, (op, *_)),) = c.to("h3")
    c.ack("h3", op)
    ((_, switchover),) = c.to("h3")
    handed_out = [("h3", switchover[5])]
    for _ in range(21):  # h3 is paused with the SWITCHOVER in its queue; the move times out
        c.advance(50)
        c.status("h1", 2)
        c.status("h2", 2)
    assert c.reply(req)[0] is False
    # The controller cannot know whether h3 claimed seq 1: it re-claims on the source with a
    # seq never handed out before, so exactly one owner remains whatever h3 did.
    ((_, attach),) = c.to("h1")
    assert attach[5] == 2
    handed_out.append(("h1", attach[5]))
    # h3 resumes: it switches over (seq 1) and acks, too late; everyone applies (h3, 1) and
    # then the source's (h1, 2), which wins.
    c.ack("h3", op, detail="switched")
    c.ack("h1", attach[0])
    for h in ("h1", "h2", "h3"):
        c.applied(h, 1, "h3", 1)
        c.applied(h, 1, "h1", 2)
        c.status(h, 2)
    # The next move of vm1, to h2.
    c.request("vm_move", {"name": "vm1", "to": "h2"})
    ((_, (op2, *_)),) = c.to("h2")
    c.ack("h2", op2)
    ((_, switchover2),) = c.to("h2")
    handed_out.append(("h2", switchover2[5]))
    assert len({seq for _, seq in handed_out}) == len(handed_out), handed_out


# ------------------------------------------------------------------ with real agent cores


class Lab:
    """The controller and real AgentCores, wired synchronously (no drops): an end-to-end check."""

    def __init__(self, hosts: list[str]):
        self.ctl = Ctl()
        # The lab's clock stands still: apply reports go out at once (no report window).
        cfg = AgentConfig(applied_report_budget_per_s=0)
        self.agents = {h: AgentCore(h, 1, cfg, pub_endpoint=f"pub-{h}", rpc_endpoint=f"rpc-{h}")
                       for h in hosts}
        self.client_replies: list[list] = []
        for a in self.agents.values():
            a.start(self.ctl.now)
        self.pump()

    def pump(self) -> None:
        for _ in range(1000):
            moved = False
            for h, a in self.agents.items():
                a.flush(self.ctl.now)
                for effect in a.take_outbox():
                    moved = True
                    route_effect(self, h, effect)
            for envelope, frame in self.ctl.core.take_outbox():
                moved = True
                if envelope == CLIENT:
                    self.client_replies.append(wire.decode(frame)[1])
                else:
                    host = envelope[0].decode().removeprefix("id-")
                    self.agents[host].on_frame("ctl", frame, self.ctl.now)
            if not moved:
                assert self.ctl.core.handler_errors == 0, self.ctl.core.last_error
                assert all(a.stats.handler_errors == 0 for a in self.agents.values())
                return
        raise AssertionError("messages still flowing")

    # The agents' effects (tests/effect_router.py); the harness reaches every agent, so
    # (un)subscriptions change nothing here, and events are not looked at.
    def to_controller(self, h: str, payload: bytes) -> None:
        self.ctl.core.on_frame(route(h), payload, self.ctl.now)

    def publish(self, h: str, payload: bytes) -> None:
        for other, a in self.agents.items():
            if other != h:
                a.on_frame("sub", payload, self.ctl.now)

    def to_peer(self, h: str, host: str, payload: bytes) -> None:
        self.agents[host].on_frame("rpc", payload, self.ctl.now, envelope=[h.encode()])

    def reply(self, h: str, envelope, payload: bytes) -> None:
        self.agents[envelope[0].decode()].on_frame("pull", payload, self.ctl.now)

    def subscribe(self, h: str, host: str, pub_endpoint: str, rpc_endpoint: str) -> None:
        pass

    def unsubscribe(self, h: str, host: str) -> None:
        pass

    def emit(self, h: str, event: dict) -> None:
        pass

    def tick(self, ms: int) -> None:
        self.ctl.now += ms * NS_PER_MS
        for a in self.agents.values():
            a.on_timer(self.ctl.now)
        self.ctl.core.on_timer(self.ctl.now)
        self.pump()

    def call(self, method: str, args: dict):
        before = len(self.client_replies)
        self.ctl.core.on_frame(CLIENT, wire.encode(MsgType.REQUEST, [before + 1, method, args]), self.ctl.now)
        self.pump()
        replies = self.client_replies[before:]
        assert len(replies) == 1, replies
        return replies[0][1], replies[0][2]


def test_end_to_end_with_real_agents():
    lab = Lab(["h1", "h2", "h3"])
    req = len(lab.client_replies) + 1
    lab.ctl.core.on_frame(CLIENT, wire.encode(MsgType.REQUEST, [req, "wait_ready", {"hosts": 3}]), lab.ctl.now)
    lab.pump()
    assert lab.client_replies == []  # no heartbeats heard yet
    # (Agents take gossip only from members: the full PEERS goes out in the first tick, after the
    # agents' first heartbeats; the second round is heard, the third round's status reports it.)
    lab.tick(500)
    lab.tick(500)
    lab.tick(500)
    assert lab.client_replies == [[req, True, {"hosts": 3}]]
    lab.client_replies.clear()
    ok, rec = lab.call("vm_create", {"name": "web1", "host": "h1", "profile": "web"})
    assert ok and rec["converged"] and rec["latency_ms"] == 0.0
    for dst, seq in (("h2", 1), ("h3", 2), ("h1", 3)):
        ok, rec = lab.call("vm_move", {"name": "web1", "to": dst})
        assert ok and rec["converged"] and rec["seq"] == seq and rec["dst"] == dst, rec
    ok, table = lab.call("expected_table", {})
    expected = {(v, m): (h, s, t) for v, m, h, s, t in table["entries"]}
    assert expected == {(110, MAC_BASE + 1): ("h1", 3, False)}
    for h, a in lab.agents.items():
        assert a.table.as_placement() == expected, h
        port = a.switch.port_for(110, MAC_BASE + 1)
        assert (port is not None and port.state == "active") == (h == "h1")
    ok, rec = lab.call("vm_delete", {"name": "web1"})
    assert ok and rec["converged"] and rec["kind"] == "delete"
    assert all(a.table.as_placement() == {(110, MAC_BASE + 1): ("h1", 4, True)} for a in lab.agents.values())
    assert lab.call("vm_list", {})[1] == {"vms": []}


# ------------------------------------------------------------------ recovery from the journal


def test_recovered_controller_adopts_agent_tables_and_restarts_orphans():
    journal = [
        {"vm": "vm1", "number": 1, "profile": "default", "vlan": VLAN, "host": "h1", "seq": 0, "seq_issued": 0,
         "state": "active"},
        {"vm": "vm2", "number": 2, "profile": "default", "vlan": VLAN, "host": "h3", "seq": 0, "seq_issued": 0,
         "state": "active"},
    ]
    cfg = ControllerConfig()
    core = ControllerCore(cfg, journal=journal)
    now = 1_000 * NS_PER_MS
    core.on_timer(now)
    core.on_frame(route("h1"), wire.encode(MsgType.REGISTER, ["h1", 1, "pub1", "rpc1", 11]), now)
    # h1 holds vm1 moved headless to h2 (seq 1); h2 has not registered with us yet.
    core.on_frame(route("h1"), wire.encode(MsgType.TABLE_REPORT, ["h1", [
        [VLAN, MAC_BASE + 1, "h2", "vEth1", 1, False], [VLAN, MAC_BASE + 2, "h3", "vEth2", 0, False]]]), now)
    vm1 = core.inv.vms["vm1"]
    assert (vm1.host, vm1.seq, vm1.state) == ("h2", 1, "active")
    assert not core.ops  # an unregistered host is not a dead one: no restart yet
    assert core.take_journal()[-1]["host"] == "h2"
    core.on_frame(route("h2"), wire.encode(MsgType.REGISTER, ["h2", 1, "pub2", "rpc2", 12]), now)
    # h3 never comes back: after dead_after_ms its VM starts on a live host with a new seq.
    for step in range(cfg.dead_after_ms // cfg.tick_interval_ms + 2):
        t = now + (step + 1) * cfg.tick_interval_ms * NS_PER_MS
        for h in ("h1", "h2"):
            core.on_frame(route(h), wire.encode(MsgType.AGENT_STATUS, [h, 1, 1, 2, 0, 0, core.peers_epoch]), t)
        core.on_timer(t)
    (op,) = core.ops.values()
    assert (op.kind, op.vm, op.target[1]) == ("restart", "vm2", 1) and op.target[0] in ("h1", "h2")


def test_applied_log_pages_every_report():
    c = cluster(2)
    for i in range(5):
        c.applied("h1", 1, "h2", i)
    ok, page = c.call("applied_log", {"since": 0, "limit": 3})
    assert ok and page["from"] == 0 and page["next"] == 3 and page["lost"] == 0
    assert [r[1] for r in page["applies"]] == ["h1"] * 3 and [r[5] for r in page["applies"]] == [0, 1, 2]
    ok, page = c.call("applied_log", {"since": 3})
    assert [r[5] for r in page["applies"]] == [3, 4] and page["next"] == 5


def test_vms_of_a_dead_host_wait_for_a_live_host_instead_of_being_stranded():
    cfg = ControllerConfig()
    core = ControllerCore(cfg)
    now = 0
    core.on_timer(now)
    for h in ("h1", "h2"):
        core.on_frame(route(h), wire.encode(MsgType.REGISTER, [h, 1, f"pub-{h}", f"rpc-{h}", 1]), now)
    core.inv.add(Vm("vm1", 1, "default", VLAN, "h2", 0, "active"))
    # The controller was paused: on resume h2 is past dead and h1 only suspect. Nowhere to go...
    now = (cfg.dead_after_ms + 100) * NS_PER_MS
    core.inv.hosts["h1"].last_seen_ns = now - (cfg.suspect_after_ms + 100) * NS_PER_MS
    core.on_timer(now)
    assert core.inv.hosts["h2"].state == "dead" and core.inv.hosts["h1"].state == "suspect"
    assert not core.ops
    # ...until h1 speaks again: then vm1 restarts there with a new seq.
    core.on_frame(route("h1"), wire.encode(MsgType.AGENT_STATUS, ["h1", 1, 0, 0, 0, 0, core.peers_epoch]), now)
    for _ in range(10):
        now += cfg.tick_interval_ms * NS_PER_MS
        core.on_timer(now)
    (op,) = core.ops.values()
    assert (op.kind, op.vm, op.target) == ("restart", "vm1", ("h1", 1, False))


def test_host_restarted_while_a_move_to_it_converges_gets_the_vm_started_again():
    # Found by `dvs chaos scenarios/agent-crash-mid-move.toml`: the VM was left on a host whose
    # new process had no port for it.
    c = cluster(3)
    create(c, 1, "h1")
    req = switched_move(c, 1, "h3")  # switched: the move now waits for h1 and h2 to apply (h3, 1)
    c.take()
    c.feed(route("h3"), MsgType.REGISTER, ["h3", 2, "pub-h3b", "rpc-h3b", 99])  # h3 restarted
    ok, rec = c.reply(req)
    assert ok and not rec["converged"] and "restarted" in rec["error"]
    ((attach_op, vm, *_, seq),) = c.take(route("h3"), MsgType.ATTACH)
    assert (vm, seq) == ("vm1", 2)


def test_membership_is_resent_to_an_agent_whose_status_shows_an_old_epoch():
    # A PEERS lost on a faulty control connection must not leave an agent on stale peers;
    # an agent that has the latest one costs nothing.
    cfg = ControllerConfig()
    core = ControllerCore(cfg)
    core.on_timer(0)
    for h in ("h1", "h2"):
        core.on_frame(route(h), wire.encode(MsgType.REGISTER, [h, 1, "pub" + h, "rpc" + h, 1]), 0)
    core.on_timer(cfg.peers_batch_ms * NS_PER_MS)
    core.take_outbox()
    epoch = core.peers_epoch

    def status(h, held, at_ms):
        core.on_frame(route(h), wire.encode(MsgType.AGENT_STATUS, [h, 1, 1, 0, 0, 0, held]), at_ms * NS_PER_MS)
        return [wire.decode(f) for e, f in core.take_outbox() if e == route(h)]

    assert status("h1", epoch - 1, 100) == []  # just sent: it may still be on its way
    later = cfg.peers_refresh_ms + 100
    assert status("h2", epoch, later) == []  # up to date
    ((mt, (members, sent_epoch)),) = status("h1", epoch - 1, later)
    assert mt is MsgType.PEERS and sent_epoch == epoch and len(members) == 2
    assert status("h1", epoch - 1, later + 1) == []  # not again before the refresh interval


def test_laggards_get_a_repair_hint_with_the_entry():
    # PUB/SUB lost h3's copy of h2's update: the move waits for h3. The controller sends h3
    # (and only h3) the entry, again with a growing wait while it stays missing.
    cfg = ControllerConfig()
    c = cluster(3, cfg)
    create(c, 1, "h1")
    c.hints.clear()
    req = switched_move(c, 1, "h2", applied_by=("h1", "h2"))
    c.advance(cfg.repair_hint_after_ms - cfg.tick_interval_ms)
    assert c.hints == []
    c.advance(cfg.tick_interval_ms)
    port = c.core.inv.vms["vm1"].port
    assert c.hints == [("h3", {"origin": "h2", "incarnation": 1,
                               "entry": [VLAN, MAC_BASE + 1, "h2", port, 1, False]})]
    c.advance(cfg.repair_hint_after_ms)
    assert len(c.hints) == 1  # the wait grew by half
    c.advance(cfg.repair_hint_after_ms)
    assert len(c.hints) == 2
    c.applied("h3", 1, "h2", 1)
    assert c.reply(req)[1]["converged"]
    c.advance(10 * cfg.repair_hint_after_ms)
    assert len(c.hints) == 2
    assert c.call("status", {})[1]["repair_hints"] == 2


def test_a_lost_tombstone_hint_names_the_origin_to_pull_from():
    cfg = ControllerConfig()
    c = cluster(3, cfg)
    create(c, 1, "h1")
    c.hints.clear()
    req = c.request("vm_delete", {"name": "vm1"})
    ((op, *_),) = c.take(route("h1"), MsgType.DETACH)
    c.ack("h1", op)
    c.applied("h1", 1, "h1", 1, tomb=True)
    c.applied("h2", 1, "h1", 1, tomb=True)
    c.advance(cfg.repair_hint_after_ms + cfg.tick_interval_ms)
    assert c.hints == [("h3", {"origin": "h1", "incarnation": 1})]
    c.applied("h3", 1, "h1", 1, tomb=True)
    assert c.reply(req)[1]["converged"]


def busy_h3(lag_ms: int) -> tuple[Ctl, ControllerConfig]:
    """3 hosts; vm1 and vm2 on h1; h3 took vm2's create from gossip `lag_ms` after its attach."""
    cfg = ControllerConfig()
    c = cluster(3, cfg)
    create(c, 1, "h1")
    req = c.request("vm_create", {"name": "vm2", "host": "h1"})
    ((op, *_),) = c.take(route("h1"), MsgType.ATTACH)
    c.ack("h1", op)
    own(c, "h1", 2, 0, n=1)  # h1's first update is the claim
    ranges(c, "h2", ("h1", 1, 1, 1, c.now))
    ranges(c, "h3", ("h1", 1, 1, 1, c.now + lag_ms * NS_PER_MS))
    assert c.reply(req)[1]["converged"]
    c.take()
    c.hints.clear()
    return c, cfg


def test_a_busy_host_is_spared_hints_for_a_while_but_never_starved():
    # h3 runs behind the gossip stream (it applied vm2's create 80 ms late) and keeps reporting
    # applies of other VMs (busy, not left behind) while the move of vm1 waits for it: no hint
    # at first; once the op waited BUSY_GRACE hint delays, it gets one.
    from controller.hints import BUSY_GRACE

    c, cfg = busy_h3(lag_ms=80)
    switched_move(c, 1, "h2", applied_by=("h1", "h2"))
    t0 = c.now
    while c.now - t0 < (BUSY_GRACE + 1) * cfg.repair_hint_after_ms * NS_PER_MS:
        c.applied("h3", 2, "h1", 0)  # an apply report of something else, every tick
        c.advance(cfg.tick_interval_ms)
        if c.now - t0 < BUSY_GRACE * cfg.repair_hint_after_ms * NS_PER_MS:
            assert c.hints == []
    assert [h for h, _ in c.hints] == ["h3"]


def test_a_host_that_keeps_up_with_the_stream_gets_its_hint_at_once_however_busy():
    # h3 applied vm2's create within a millisecond: it keeps up, so its reports arriving all the
    # time do not mean a backlog; PUB/SUB lost its copy of vm1's move, and the first hint goes.
    c, cfg = busy_h3(lag_ms=1)
    switched_move(c, 1, "h2", applied_by=("h1", "h2"))
    t0 = c.now
    while not c.hints:
        assert c.now - t0 <= cfg.repair_hint_after_ms * NS_PER_MS
        c.applied("h3", 2, "h1", 0)
        c.advance(cfg.tick_interval_ms)
    assert [h for h, _ in c.hints] == ["h3"]


def test_no_hints_while_the_controller_reads_apply_reports_late():
    # A report whose applies are older than the hint delay: we are the laggard, not PUB/SUB.
    cfg = ControllerConfig()
    c = cluster(3, cfg)
    create(c, 1, "h1")
    c.hints.clear()
    switched_move(c, 1, "h2")
    c.advance(cfg.tick_interval_ms)
    c.applied("h1", 1, "h2", 1, t_ns=c.now - 2 * cfg.repair_hint_after_ms * NS_PER_MS)  # read late
    c.advance(cfg.repair_hint_after_ms)
    assert c.hints == []
    c.advance(2 * cfg.repair_hint_after_ms)
    assert [h for h, _ in c.hints] == ["h3"]


def test_repair_hints_can_be_turned_off():
    cfg = ControllerConfig(repair_hint_after_ms=0)
    c = cluster(3, cfg)
    create(c, 1, "h1")
    switched_move(c, 1, "h2")
    c.advance(2_000)
    assert c.hints == []


# ------------------------------------------------------------------ apply reports by origin numbers


def own(c: Ctl, host: str, vm: int, seq: int, n: int, t_ns: int | None = None) -> None:
    """`host` reports the claim it made of vm<vm> at `seq`, its own update number `n`."""
    row = [VLAN, MAC_BASE + vm, host, seq, False, c.now if t_ns is None else t_ns, n]
    c.feed(route(host), MsgType.APPLY_REPORT, [host, [row], []])


def ranges(c: Ctl, host: str, *rngs: tuple[str, int, int, int, int]) -> None:
    """`host` reports holding origin's updates lo..hi: (origin, incarnation, lo, hi, t_ns)."""
    c.feed(route(host), MsgType.APPLY_REPORT, [host, [], [list(r) for r in rngs]])


def switch(c: Ctl, vm: int, dst: str) -> tuple[int, int, int]:
    """Move vm<vm> to dst up to its switchover: (client request id, op id, switchover stamp)."""
    req = c.request("vm_move", {"name": f"vm{vm}", "to": dst})
    ((_, (op, *_)),) = c.to(dst)
    c.ack(dst, op, detail="prepared")
    c.ack(dst, op, detail="switched", t_ns=c.now)
    return req, op, c.now


def test_a_move_converges_on_range_reports_of_the_destinations_numbers():
    c = cluster(4)
    create(c, 1, "h1")
    req, op, t_sw = switch(c, 1, "h3")
    own(c, "h3", 1, 1, n=7, t_ns=t_sw)  # h3's 7th update is the claim
    ranges(c, "h1", ("h3", 1, 5, 8, t_sw + 2 * NS_PER_MS))  # 7 inside a run
    ranges(c, "h2", ("h3", 1, 1, 6, t_sw + 1 * NS_PER_MS))  # not 7: h2 still lacks it
    ranges(c, "h4", ("h3", 2, 7, 7, t_sw + 1 * NS_PER_MS))  # another life of h3: not this claim
    assert c.reply(req) is None
    assert sorted(c.core.ops[op].applied) == ["h1", "h3"]
    ranges(c, "h2", ("h3", 1, 7, 7, t_sw + 3 * NS_PER_MS))
    ranges(c, "h4", ("h3", 1, 7, 7, t_sw + 5 * NS_PER_MS))
    ok, rec = c.reply(req)
    assert ok and rec["converged"] and rec["latency_ms"] == 5.0
    assert c.core.applies.origins["h3"].awaiting == {}  # nothing kept for a finished op


def test_ranges_that_arrive_before_the_origin_names_its_numbers_wait_for_it():
    # The receivers' reports may overtake the destination's own (each agent reports on its own
    # schedule): their stamps still count once the destination says which number was the claim.
    c = cluster(3)
    create(c, 1, "h1")
    req, op, t_sw = switch(c, 1, "h2")
    ranges(c, "h1", ("h2", 1, 1, 1, t_sw + 2 * NS_PER_MS))
    ranges(c, "h3", ("h2", 1, 1, 1, t_sw + 4 * NS_PER_MS))
    assert c.reply(req) is None and c.core.ops[op].applied == {"h2": t_sw}  # (the target, by its ack)
    own(c, "h2", 1, 1, n=1, t_ns=t_sw)
    ok, rec = c.reply(req)
    assert ok and rec["converged"] and rec["latency_ms"] == 4.0


def test_range_reports_are_written_to_the_applied_log_entry_by_entry():
    c = cluster(2)
    create(c, 1, "h1")
    before = c.call("applied_log", {"since": 0})[1]["next"]
    own(c, "h2", 5, 0, n=1)
    ranges(c, "h1", ("h2", 1, 1, 1, 42))
    page = c.call("applied_log", {"since": before})[1]
    assert [r[:3] for r in page["applies"]] == [[c.now, "h2", VLAN], [42, "h1", VLAN]]
    assert page["applies"][1][3:] == [MAC_BASE + 5, "h2", 0, False]


def test_a_hint_names_the_origins_number_once_the_origin_reported_it():
    cfg = ControllerConfig()
    c = cluster(3, cfg)
    create(c, 1, "h1")
    c.hints.clear()
    req = switched_move(c, 1, "h2")
    own(c, "h2", 1, 1, n=4)
    ranges(c, "h1", ("h2", 1, 4, 4, c.now))
    c.advance(cfg.repair_hint_after_ms)
    port = c.core.inv.vms["vm1"].port
    assert c.hints == [("h3", {"origin": "h2", "incarnation": 1, "n": 4,
                               "entry": [VLAN, MAC_BASE + 1, "h2", port, 1, False]})]
    ranges(c, "h3", ("h2", 1, 4, 4, c.now))
    assert c.reply(req)[1]["converged"]


def test_ranges_whose_numbers_are_never_told_are_bounded():
    # (After a restart of ours, agents repair updates numbered before it: no own report of
    # their origin will ever name them.)
    from controller.applytrack import EARLY_MAX

    c = cluster(2)
    batch = [["h2", 1, n, n, c.now] for n in range(1, 2_001)]
    for _ in range(EARLY_MAX // len(batch) + 2):
        c.feed(route("h1"), MsgType.APPLY_REPORT, ["h1", [], batch])
    assert 0 < len(c.core.applies.origins["h2"].early) <= EARLY_MAX


def batch_on(c: Ctl, host: str, vms: range) -> tuple[int, list[int]]:
    """Create vm<i> for i in vms on `host` in one request, acked and claimed by `host` as its
    updates 1, 2, ... in one report: (client request id, op ids)."""
    req = c.request("vm_create", {"vms": [[f"vm{i}", host, "web"] for i in vms]})
    ops = [body[0] for body in c.take(route(host), MsgType.ATTACH)]
    for op in ops:
        c.ack(host, op)
    rows = [[110, MAC_BASE + i, host, 0, False, c.now, n] for n, i in enumerate(vms, start=1)]
    c.feed(route(host), MsgType.APPLY_REPORT, [host, rows, []])
    return req, ops


def test_claims_made_together_are_marked_together_while_reports_cover_them_alike():
    c = cluster(4)
    req, ops = batch_on(c, "h1", range(1, 5))
    group = c.core.ops[ops[0]].group
    assert group is not None and [op.op_id for op in group.ops] == ops  # numbers 1..4, one run
    ranges(c, "h2", ("h1", 1, 1, 4, c.now + 1))
    assert all(c.core.ops[op].applied == {"h1": c.now, "h2": c.now + 1} for op in ops)
    # h3 took only updates 1..2 so far (a pull of a part): the group comes apart, each op marked alone.
    ranges(c, "h3", ("h1", 1, 1, 2, c.now + 2))
    assert all(c.core.ops[op].group is None for op in ops)
    assert [sorted(c.core.ops[op].applied) for op in ops] == [["h1", "h2", "h3"]] * 2 + [["h1", "h2"]] * 2
    ranges(c, "h3", ("h1", 1, 3, 4, c.now + 3))
    ranges(c, "h4", ("h1", 1, 1, 4, c.now + 4))
    ok, result = c.reply(req)
    assert ok and all(r["converged"] for r in result["ops"])


def test_a_grouped_claim_reported_alone_leaves_the_others_waiting():
    c = cluster(3)
    req, ops = batch_on(c, "h1", range(1, 4))
    ranges(c, "h2", ("h1", 1, 1, 3, c.now))
    # A row (a repair hint's entry) for vm2 alone.
    c.feed(route("h3"), MsgType.APPLY_REPORT, ["h3", [[110, MAC_BASE + 2, "h1", 0, False, c.now, 0]], []])
    assert ops[1] not in c.core.ops  # vm2 converged: every host holds it
    assert [sorted(c.core.ops[op].applied) for op in (ops[0], ops[2])] == [["h1", "h2"]] * 2
    assert c.reply(req) is None
    ranges(c, "h3", ("h1", 1, 1, 3, c.now))
    ok, result = c.reply(req)
    assert ok and [r["vm"] for r in result["ops"]] == ["vm1", "vm2", "vm3"] and all(r["converged"] for r in result["ops"])


@pytest.mark.parametrize("per_host", [None, True, False])
def test_a_move_reply_carries_each_hosts_apply_time_unless_asked_not_to(per_host):
    c = cluster(3)
    create(c, 1, "h1")
    args = {"name": "vm1", "to": "h2"} | ({} if per_host is None else {"per_host": per_host})
    req = c.request("vm_move", args)
    ((_, (op, *_)),) = c.to("h2")
    c.ack("h2", op, detail="prepared")
    t_sw = c.now
    c.ack("h2", op, detail="switched", t_ns=t_sw)
    for h, dt_ms in (("h2", 0), ("h3", 1), ("h1", 2)):  # (h2, the target, applied it at its switchover)
        c.applied(h, 1, "h2", 1, t_ns=t_sw + dt_ms * NS_PER_MS)
    ok, rec = c.reply(req)
    assert ok and rec["converged"] and rec["latency_ms"] == 2.0
    assert rec["applied_ms"] == ({} if per_host is False else {"h1": 2.0, "h2": 0.0, "h3": 1.0})


def test_a_move_with_a_per_host_flag_that_is_not_a_bool_is_refused():
    c = cluster(2)
    create(c, 1, "h1")
    ok, msg = c.call("vm_move", {"name": "vm1", "to": "h2", "per_host": "no"})
    assert not ok and "per_host must be true or false" in msg


def test_the_target_counts_as_applied_from_its_ack_even_if_its_own_report_is_lost():
    # On a lossy control link (--ctl-faults) the target's own apply report may never come; its
    # ack already says its table holds the target entry.
    c = cluster(3)
    create(c, 1, "h1")
    req, op, t_sw = switch(c, 1, "h2")
    for h in ("h1", "h3"):
        c.applied(h, 1, "h2", 1, t_ns=t_sw + 3 * NS_PER_MS)
    ok, rec = c.reply(req)
    assert ok and rec["converged"] and rec["latency_ms"] == 3.0


# ------------------------------------------------------------------ hostile input and bad luck (issues 19, 20)


def admitted_core(hosts: list[str], journal: list[dict] | None = None) -> Ctl:
    c = Ctl()
    c.core = ControllerCore(c.config, journal=journal, hosts=hosts)
    return c


def test_only_admitted_hosts_may_register_and_a_refused_one_is_told_why():
    c = admitted_core(["h1", "h2"])
    assert [r for r in c.core.take_journal() if "admit" in r] == [{"admit": "h1"}, {"admit": "h2"}]
    c.register("h1")
    c.register("ghost")
    assert "ghost" not in c.core.inv.hosts and c.core.refused_registrations == 1
    (reply,) = c.take(route("ghost"), MsgType.REPLY)
    assert reply[1] is False and "not admitted" in reply[2] and "dvs host add ghost" in reply[2]
    # Nobody is handed "ghost" as a peer, and its later messages earn no invitation to register.
    assert all(m[0] != "ghost" for b in c.take(mt=MsgType.PEERS) for m in b[0])
    c.status("ghost", 0)
    assert c.take(route("ghost")) == [] and c.core.dropped_malformed == 1
    assert any(e["kind"] == "host.refused" and e["host"] == "ghost" and "ghost" in e["message"]
               for e in c.core.take_events())
    # An admin admits h3 (durably): then it registers like any host.
    ok, r = c.call("host_add", {"name": "h3"})
    assert ok and r["added"] and {"admit": "h3"} in c.core.take_journal()
    c.register("h3")
    assert c.core.inv.live_hosts() == ["h1", "h3"]
    assert c.call("host_add", {"name": "bad name!"})[0] is False


def test_admissions_survive_a_restart_and_an_old_journal_admits_its_hosts():
    c = admitted_core(["h1"])
    c.call("host_add", {"name": "h7"})
    again = ControllerCore(ControllerConfig(), journal=c.core.take_journal(), hosts=[])
    assert again.admitted == {"h1", "h7"}
    old = [{"host_incarnation": "h2", "incarnation": 1},
           {"vm": "vm1", "number": 1, "profile": "default", "vlan": VLAN, "host": "h3", "seq": 0, "seq_issued": 0,
            "state": "active"}]
    assert ControllerCore(ControllerConfig(), journal=old, hosts=[]).admitted == {"h2", "h3"}


def test_a_forged_table_report_naming_ghost_changes_nothing():
    c = admitted_core(["h1", "h2"])
    c.register("h1")
    c.register("h2")
    create(c, 1, "h1")
    for mt, body in ((MsgType.TABLE_REPORT, ["h2", [[VLAN, MAC_BASE + 1, "ghost", "vEth1", 4_000_000_000, False]]]),
                     (MsgType.APPLY_REPORT, ["h2", [[VLAN, MAC_BASE + 1, "ghost", 4_000_000_000, False, c.now, 0]],
                                             []])):
        c.feed(route("h2"), mt, body)
    vm = c.core.inv.vms["vm1"]
    assert (vm.host, vm.seq, vm.state) == ("h1", 0, "active")
    assert not [r for r in c.core.take_journal() if r.get("host") == "ghost"]


def test_abandoned_wait_ready_requests_are_bounded_expire_and_cost_a_status_nothing():
    from controller import core as core_mod

    c = cluster(2)
    answers = 0
    for i in range(20_000):
        c.feed([f"client{i}".encode()], MsgType.REQUEST, [1, "wait_ready", {"hosts": 50, "timeout_ms": 5_000}])
        answers += len(c.take(mt=MsgType.REPLY))
    assert c.core.members._ready_n == core_mod.READY_WAITERS_MAX
    assert answers == 20_000 - core_mod.READY_WAITERS_MAX  # refused at once, with a retry hint

    class CountingDict(dict):
        scans = 0

        def values(self):
            CountingDict.scans += 1
            return super().values()

    c.core.inv.hosts = CountingDict(c.core.inv.hosts)
    for _ in range(100):
        c.status("h1", 1)
    assert CountingDict.scans == 0  # 50 hosts wanted, 2 there: nothing to look at
    c.core.inv.hosts = dict(c.core.inv.hosts)
    c.advance(5_001)
    expired = c.take(mt=MsgType.REPLY)
    assert len(expired) == core_mod.READY_WAITERS_MAX and all(not ok for _, ok, _ in expired)
    assert c.core.members._ready_n == 0 and not c.core.members._ready_by_hosts and not c.core.members._ready_by_deadline
    c.status("h1", 1)
    c.status("h2", 1)
    assert c.call("wait_ready", {"hosts": 2})[0] is True


def test_a_restart_refused_over_and_over_stops_at_the_budget():
    # 19.1: an agent whose table holds a higher claim refuses every restart; the controller
    # must not spin on it (24 restarts in 5 s), and it reconciles to a seq above the refusal.
    cfg = ControllerConfig(restart_budget=3, restart_budget_window_ms=10_000)
    c = cluster(2, cfg)
    create(c, 1, "h2")
    attaches = 0
    c.core.inv.hosts["h2"].last_seen_ns = -(10**12)  # h2 dies at once (and stays silent): HA restarts vm1
    for _ in range(60):
        c.advance(100)
        c.status("h1", 1)
        for op, *_ in c.take(route("h1"), MsgType.ATTACH):  # (every restart goes to h1)
            attaches += 1
            c.ack("h1", op, ok=False, detail="stale: table holds seq 7 on h3")
    assert attaches == 3, attaches
    assert c.core.restarts.budget_exhausted == 1
    (event,) = [e for e in c.core.take_events() if "restart budget" in e.get("message", "")]
    assert event["kind"] == "ha.blocked" and event["vm"] == "vm1" and "vm1" in event["message"]
    assert c.core.inv.vms["vm1"].seq_issued >= 7  # the next claim goes above what agents hold
    assert c.call("status", {})[1]["restart_budget_exhausted"] == 1


def test_vms_of_a_dead_host_spread_over_the_live_hosts_with_fewest_vms():
    c = cluster(6)
    for n in range(1, 13):
        create(c, n, f"h{(n - 1) % 3 + 1}")  # h1..h3 hold 4 each, h4..h6 none
    c.core.inv.hosts["h1"].last_seen_ns = -(10**12)
    for h in ("h2", "h3", "h4", "h5", "h6"):
        c.core.inv.hosts[h].last_seen_ns = c.now
    c.advance(c.config.tick_interval_ms)
    targets = sorted(op.target[0] for op in c.core.ops.values() if op.kind == "restart")
    assert len(targets) == 4 and len(set(targets)) == 3 and set(targets) <= {"h4", "h5", "h6"}, targets
    # ...and with four empty hosts, four different ones.
    c = cluster(8)
    for n in range(1, 17):
        create(c, n, f"h{(n - 1) % 4 + 1}")
    c.core.inv.hosts["h1"].last_seen_ns = -(10**12)
    for h in c.core.inv.hosts:
        if h != "h1":
            c.core.inv.hosts[h].last_seen_ns = c.now
    c.advance(c.config.tick_interval_ms)
    targets = sorted(op.target[0] for op in c.core.ops.values() if op.kind == "restart")
    assert targets == ["h5", "h6", "h7", "h8"], targets


def test_after_a_full_outage_vms_go_home_instead_of_piling_on_the_first_host_back():
    cfg = ControllerConfig()
    c = cluster(4, cfg)
    for n in range(1, 9):
        create(c, n, f"h{(n - 1) % 4 + 1}")
    c.advance(cfg.dead_after_ms + 100)  # every agent is silent: all dead, nowhere to restart
    assert all(h.state == "dead" for h in c.core.inv.hosts.values()) and not c.core.ops
    for _ in range(100):
        c.advance(100)  # a long outage
    assert not c.core.ops
    for h in ("h1", "h2", "h3", "h4"):  # they come back one by one, as new processes
        c.register(h, incarnation=2)
        c.advance(300)
        for other in c.core.inv.hosts.values():
            if other.state != "dead":
                c.status(other.name, 0, incarnation=2)
    by_host = {}
    for op in c.core.ops.values():
        by_host.setdefault(op.target[0], []).append(op.vm)
    assert {h: len(v) for h, v in by_host.items()} == {"h1": 2, "h2": 2, "h3": 2, "h4": 2}, by_host


def test_creates_cut_by_a_controller_crash_are_adopted_or_finished():
    rec = {"number": 1, "profile": "default", "vlan": VLAN, "seq": 0, "seq_issued": 0, "state": "creating"}
    journal = [{"vm": "vm1", "host": "h1", **rec}, {"vm": "vm2", "host": "h1", **rec, "number": 2},
               {"vm": "vm3", "host": "h3", **rec, "number": 3}]
    c = Ctl()
    c.core = ControllerCore(c.config, journal=journal)
    c.advance(1)
    c.register("h1")
    c.register("h2")
    # h1's agent holds vm1 exactly as journaled (the attach went through): adopted at equal (seq, host).
    c.feed(route("h1"), MsgType.TABLE_REPORT, ["h1", [[VLAN, MAC_BASE + 1, "h1", "vEth1", 0, False]]])
    assert c.core.inv.vms["vm1"].state == "active"
    assert c.core.inv.expected_table()[(VLAN, MAC_BASE + 1)] == ("h1", 0, False)
    # vm2 (the attach never reached h1) and vm3 (h3 never comes back) are finished once the
    # hosts had their dead timeout to register again.
    for _ in range(c.config.dead_after_ms // 500 + 2):
        c.advance(500)
        c.status("h1", 1)
        c.status("h2", 1)
    kinds = {op.vm: (op.kind, op.target) for op in c.core.ops.values()}
    assert kinds["vm2"] == ("create", ("h1", 0, False))
    assert kinds["vm3"][0] == "restart" and kinds["vm3"][1][0] in ("h1", "h2") and kinds["vm3"][1][1] == 1
    op2 = next(op for op in c.core.ops.values() if op.vm == "vm2")
    c.ack("h1", op2.op_id)
    assert c.core.inv.vms["vm2"].state == "active"


def test_a_restarted_controller_asks_to_retry_moves_to_hosts_not_back_yet():
    journal = [{"admit": "h1"}, {"admit": "h5"},
               {"vm": "vm1", "number": 1, "profile": "default", "vlan": VLAN, "host": "h1", "seq": 0, "seq_issued": 0,
                "state": "active"}]
    c = admitted_core([], journal)
    c.advance(1)
    c.register("h1")
    ok, err = c.call("vm_move", {"name": "vm1", "to": "h5"})
    assert not ok and err.startswith("retry: ") and "h5" in err
    ok, err = c.call("vm_move", {"name": "vm1", "to": "h9"})
    assert not ok and err.startswith("unknown host 'h9'")
    c.register("h5")
    req = c.request("vm_move", {"name": "vm1", "to": "h5"})
    assert c.reply(req) is None and c.core.ops  # under way
    # Past the dead timeout a host that never came back is just unknown.
    c2 = admitted_core([], journal)
    c2.advance(1)
    c2.register("h1")
    c2.advance(c2.config.dead_after_ms + 100)
    ok, err = c2.call("vm_move", {"name": "vm1", "to": "h5"})
    assert not ok and err.startswith("unknown host 'h5'")


# ------------------------------------------------------------------ maintenance, rebalance, placement rules


def lab_with(hosts: int, placement: dict[str, str]) -> Lab:
    """A Lab of real agents, meshed, with VMs created where `placement` says (name -> host)."""
    lab = Lab([f"h{i}" for i in range(1, hosts + 1)])
    lab.tick(500)
    lab.tick(500)
    lab.client_replies.clear()
    ok, rec = lab.call("vm_create", {"vms": [[v, h, "default"] for v, h in placement.items()]})
    assert ok and all(r["converged"] for r in rec["ops"]), rec
    return lab


def where(lab: Lab) -> dict[str, str]:
    return {v["vm"]: v["host"] for v in lab.call("vm_list", {})[1]["vms"]}


def test_evacuate_moves_every_vm_off_and_no_placement_targets_the_host_until_activated():
    lab = lab_with(4, {f"vm{n}": f"h{n % 4 + 1}" for n in range(1, 13)})  # three VMs per host
    ok, rep = lab.call("host_evacuate", {"name": "h2", "max_concurrent": 2})
    assert ok, rep
    assert rep["host"] == "h2" and len(rep["moves"]) == 3
    assert all(m["converged"] and m["src"] == "h2" and m["dst"] != "h2" for m in rep["moves"]), rep
    assert "h2" not in where(lab).values()
    # The agents agree: no entry points at h2.
    assert all(h != "h2" for a in lab.agents.values() for (h, _s, _t) in a.table.as_placement().values())
    for n in range(20, 26):
        ok, rec = lab.call("vm_create", {"name": f"vm{n}"})  # no host named: the scorer picks
        assert ok and rec["dst"] != "h2", rec
    ok, err = lab.call("vm_create", {"name": "x", "host": "h2"})
    assert not ok and "maintenance" in err and "dvs host activate h2" in err
    ok, err = lab.call("vm_move", {"name": "vm1", "to": "h2"})
    assert not ok and "maintenance" in err
    ok, rec = lab.call("host_activate", {"name": "h2"})
    assert ok and rec == {"host": "h2", "was_in_maintenance": True, "vms": 0}
    ok, rec = lab.call("vm_create", {"name": "y"})
    assert ok and rec["dst"] == "h2"  # the emptiest host again


def test_evacuate_runs_at_most_k_moves_at_once():
    c = cluster(3)
    for n in range(1, 6):
        create(c, n, "h1")
    req = c.request("host_evacuate", {"name": "h1", "max_concurrent": 2})
    prepares = [b for h in ("h2", "h3") for m, b in c.to(h) if m is MsgType.PREPARE]
    assert len(prepares) == 2 and len(c.core.maint._drain_ops) == 2
    assert c.reply(req) is None  # answered once the host is empty
    done = 0
    while c.core.maint._drain_ops:
        assert len(c.core.maint._drain_ops) <= 2
        op = c.core.ops[min(c.core.maint._drain_ops)]
        c.ack(op.dst, op.op_id)
        c.ack(op.dst, op.op_id)
        for h in ("h1", "h2", "h3"):
            c.applied(h, int(op.vm[2:]), op.dst, op.target[1])
        done += 1
        assert done == 5 or len(c.core.maint._drain_ops) == min(2, 5 - done)  # the next one started at once
    ok, rep = c.reply(req)
    assert ok and len(rep["moves"]) == 5 and all(m["converged"] for m in rep["moves"])
    # The scorer spread them: h2 and h3 started empty.
    assert sorted(m["dst"] for m in rep["moves"]) == ["h2", "h2", "h2", "h3", "h3"]
    assert c.core.inv.maintenance == {"h1": 2}


def test_ha_never_restarts_onto_a_host_in_maintenance():
    c = cluster(3)
    for n in range(1, 5):
        create(c, n, "h1")
    c.core.inv.maintenance["h3"] = 1  # empty, in maintenance: the emptiest host by far
    c.core.inv.hosts["h1"].last_seen_ns = -(10**12)
    for h in ("h2", "h3"):
        c.core.inv.hosts[h].last_seen_ns = c.now
    c.advance(c.config.tick_interval_ms)
    targets = [op.target[0] for op in c.core.ops.values() if op.kind == "restart"]
    assert targets == ["h2"] * 4, targets


def test_maintenance_and_rules_survive_a_controller_restart():
    lab = lab_with(3, {"web1": "h1", "web2": "h2", "db1": "h3", "app1": "h3"})
    assert lab.call("rule_add", {"kind": "anti", "vms": ["web1", "web2"], "name": "web"})[0]
    assert lab.call("rule_add", {"kind": "together", "vms": ["db1", "app1"]})[1]["rule"] == "rule1"
    assert lab.call("host_activate", {"name": "h1"})[1]["was_in_maintenance"] is False
    ok, _ = lab.call("host_evacuate", {"name": "h3"})
    assert ok
    assert lab.call("rule_remove", {"name": "web"})[0]
    assert lab.call("rule_add", {"kind": "anti", "vms": ["db1", "later"], "name": "w2"})[0]
    # (everything the core journaled, as the runtime writes it, checked by the journal reader)
    from controller import journal

    records = lab.ctl.core.take_journal()
    assert all(journal.check_record(r) == "" for r in records)
    again = ControllerCore(journal=records)
    assert again.inv.maintenance == {"h3": 4}
    assert {n: (r.kind, r.vms) for n, r in again.inv.rules.items()} == {
        "rule1": ("together", ["db1", "app1"]), "w2": ("anti", ["db1", "later"])}
    assert [r.name for r in again.inv.rules_of("db1")] == ["rule1", "w2"]


def test_anti_affinity_holds_through_create_move_evacuate_and_ha():
    lab = lab_with(3, {"web1": "h1", "web2": "h2", "other": "h3"})
    assert lab.call("rule_add", {"kind": "anti", "vms": ["web1", "web2", "web3"]})[0]
    ok, err = lab.call("vm_create", {"name": "web3", "host": "h1"})
    assert not ok and "anti-affinity rule rule1: web1 runs on h1" in err
    ok, rec = lab.call("vm_create", {"name": "web3"})
    assert ok and rec["dst"] == "h3"
    ok, err = lab.call("vm_move", {"name": "web1", "to": "h2"})
    assert not ok and "web2 runs on h2" in err
    # Evacuating h1: web1 fits nowhere (web2 on h2, web3 on h3): a clear error, no violation.
    ok, err = lab.call("host_evacuate", {"name": "h1"})
    assert not ok and "cannot move web1 off h1" in err and "stays in maintenance" in err, err
    assert where(lab)["web1"] == "h1"
    assert lab.call("host_activate", {"name": "h1"})[0]
    # HA: h1 dies; web1 may go to neither h2 nor h3, so it waits (an event says why).
    lab.agents.pop("h1")
    for _ in range(8):
        lab.tick(500)
        lab.ctl.core.inv.hosts["h1"].last_seen_ns = 0
    assert where(lab)["web1"] == "h1"
    assert any(e["kind"] == "ha.blocked" and e["vm"] == "web1" and "cannot restart it yet" in e["message"]
               for e in lab.ctl.core.take_events())
    assert lab.call("rule_remove", {"name": "rule1"})[0]
    lab.tick(500)
    lab.tick(500)
    assert where(lab)["web1"] in ("h2", "h3")


def test_a_together_group_moves_as_one_and_a_member_alone_may_not():
    lab = lab_with(3, {"db1": "h1", "app1": "h1", "x1": "h2", "x2": "h2", "x3": "h3"})
    assert lab.call("rule_add", {"kind": "together", "vms": ["db1", "app1"]})[0]
    ok, err = lab.call("vm_move", {"name": "db1", "to": "h3"})
    assert not ok and "together rule rule1: app1 runs on h1" in err
    ok, err = lab.call("vm_create", {"name": "app2", "host": "h1"})
    assert ok  # not in the rule
    ok, rep = lab.call("host_evacuate", {"name": "h1", "max_concurrent": 1})
    assert ok, rep
    w = where(lab)
    assert w["db1"] == w["app1"] != "h1", w
    # A rule the inventory breaks already is refused.
    ok, err = lab.call("rule_add", {"kind": "anti", "vms": ["x1", "x2"]})
    assert not ok and "x1 and x2 both run on h2" in err
    ok, err = lab.call("rule_add", {"kind": "anti", "vms": ["db1", "app1"]})
    assert not ok and "no placement could satisfy both" in err


def test_rebalance_plans_the_fewest_moves_and_runs_them():
    lab = lab_with(4, {f"vm{n}": "h1" for n in range(1, 13)})
    assert lab.call("rule_add", {"kind": "anti", "vms": ["vm1", "vm2"]})[0] is False  # both on h1: refused
    ok, plan = lab.call("rebalance", {"dry_run": True})
    assert ok and plan["spread_before"] == 12 and plan["spread_planned"] <= 2
    # 12 VMs on h1 and three empty hosts: h1 may keep x with x - 2 <= every other host,
    # so x + 3 (x - 2) <= 12: x = 4, and 8 moves is the least that does it.
    assert len(plan["plan"]) == 8 and plan["moves"] == []
    assert where(lab) == {f"vm{n}": "h1" for n in range(1, 13)}  # a dry run moves nothing
    ok, rep = lab.call("rebalance", {"max_concurrent": 3})
    assert ok and len(rep["moves"]) == 8 and all(m["converged"] for m in rep["moves"]), rep
    counts = rep["vms_per_host_after"]
    assert max(counts.values()) - min(counts.values()) <= 2, counts
    ok, again = lab.call("rebalance", {"dry_run": True})
    assert ok and again["plan"] == []  # balanced: nothing to do


def test_rebalance_by_traffic_moves_the_heavy_vm_and_keeps_rules():
    lab = lab_with(2, {"a": "h1", "b": "h1", "c": "h1", "d": "h2"})
    assert lab.call("rule_add", {"kind": "anti", "vms": ["a", "d"]})[0]
    rates = {"a": 900.0, "b": 500.0, "c": 100.0, "d": 100.0}
    ok, plan = lab.call("rebalance", {"metric": "traffic", "rates": rates, "dry_run": True, "threshold": 0.5})
    assert ok, plan
    # a (900) may not join d; b (500) halves the gap best among the rest.
    assert plan["plan"] == [{"vm": "b", "src": "h1", "dst": "h2"}], plan
    ok, err = lab.call("rebalance", {"metric": "traffic"})
    assert not ok and "frame rates" in err
    ok, err = lab.call("rebalance", {"metric": "cpu"})
    assert not ok and "metric must be vms or traffic" in err


# ------------------------------------------------------------------ report pacing


def test_agents_are_asked_to_batch_reports_only_while_several_ops_are_in_flight():
    c = Ctl()
    for h in ("h1", "h2", "h3"):
        c.register(h)
    c.take()

    def ticks(n: int) -> None:
        for _ in range(n):
            for h in c.core.inv.hosts:
                c.status(h, len(c.core.inv.hosts) - 1)  # (alive: none of them dies meanwhile)
            c.advance(50)

    # One op at a time, for a long while: whoever started it waits on it, so no batching.
    c.request("vm_create", {"name": "vm1", "host": "h1"})
    ticks(40)
    assert c.pacing == [] and not c.core.pacing.batching
    # Three in flight: after a few ticks every live agent is asked to batch, with a lease...
    for vm, h in ((2, "h2"), (3, "h3")):
        c.request("vm_create", {"name": f"vm{vm}", "host": h})
    ticks(6)
    assert sorted(h for h, _ in c.pacing) == ["h1", "h2", "h3"]
    assert {a["batch_ms"] for _, a in c.pacing} == {c.config.report_batch_ms} and c.pacing[0][1]["for_ms"] > 1_000
    c.pacing.clear()
    # ...renewed while it lasts (a crashed or restarted controller stops renewing it)...
    ticks(22)
    assert sorted(h for h, _ in c.pacing) == ["h1", "h2", "h3"]
    c.pacing.clear()
    c.register("h4")  # ...and told to an agent that registers meanwhile
    assert c.pacing == [("h4", c.pacing[0][1])] and c.pacing[0][1]["batch_ms"] > 0
    c.pacing.clear()
    # Every op converges: the agents are told to report at once again.
    for op in list(c.core.ops.values()):
        c.ack(op.target[0], op.op_id)
        for h in c.core.inv.live_hosts():
            c.applied(h, int(op.vm[2:]), op.target[0], op.target[1])
    ticks(10)
    assert sorted(h for h, _ in c.pacing) == ["h1", "h2", "h3", "h4"] and {a["batch_ms"] for _, a in c.pacing} == {0}
    assert c.core.api.api_status({}, c.now, None, None)["report_pacing"]["batching"] is False


def test_report_pacing_can_be_turned_off():
    c = Ctl(ControllerConfig(report_batch_ms=0))
    c.register("h1")
    for vm in range(1, 6):
        c.request("vm_create", {"name": f"vm{vm}", "host": "h1"})
    for _ in range(20):
        c.advance(50)
    assert c.pacing == [] and c.core.pacing.load > 4
