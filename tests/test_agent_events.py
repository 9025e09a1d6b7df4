"""Structured events from the agent core (Emit effects): repair.pull, repair.snapshot,
flap.suppressed, as the shared event contract names them; and the typed effects themselves."""

from __future__ import annotations

import dataclasses

import pytest

from agent.core import AgentCore
from agent.effects import Emit, Publish, Subscribe, ToController, Unsubscribe
from agent.wire import MsgType
from tests.effect_router import route
from tests.test_agent_core import VLAN, Cluster, key


def kinds(c: Cluster, kind: str) -> list[tuple[str, dict]]:
    return [(h, e) for h, e in c.events if e["kind"] == kind]


def test_a_pull_is_an_event_naming_the_peer_and_the_range():
    c = Cluster(["h1", "h2"])
    c.drop = lambda src, dst, mt, frame: mt is MsgType.UPDATES
    for vm in range(1, 4):
        c.attach("h1", vm)
    c.drop = None
    assert kinds(c, "repair.pull") == []
    c.heartbeat_round()  # h2 learns h1's latest number and pulls what it lacks
    pulls = kinds(c, "repair.pull")
    assert pulls == [("h2", {"kind": "repair.pull", "peer": "h1", "lo": 1, "hi": 3})]
    assert c.cores["h2"].stats.pulls_sent == 1
    assert c.cores["h2"].table.get(key(3)).host == "h1"


def test_a_snapshot_taken_is_an_event_with_its_size_and_what_it_changed():
    c = Cluster(["h1", "h2"])
    for vm in range(1, 5):
        c.attach("h1", vm)
    c.events.clear()
    c.join("h3")  # a joiner bootstraps from one snapshot
    (host, ev), = kinds(c, "repair.snapshot")
    assert host == "h3" and ev["peer"] == "h1" and ev["entries"] == 4 and ev["applied"] == 4
    assert "h1" in ev["message"] and set(ev) == {"kind", "peer", "entries", "applied", "message"}


def test_a_flapping_mac_is_one_event_per_agent_when_it_starts_flapping():
    c = Cluster(["h1", "h2", "h3"])
    c.attach("h1", 1)
    hosts = ["h1", "h2"]
    for seq in range(1, 6):
        c.move(1, hosts[(seq - 1) % 2], hosts[seq % 2], seq)
        c.advance(1000)
    assert kinds(c, "flap.suppressed") == []
    c.move(1, "h2", "h1", 6)
    c.move(1, "h1", "h2", 7)  # (still flapping: no second event)
    flaps = kinds(c, "flap.suppressed")
    assert sorted(h for h, _ in flaps) == ["h1", "h2", "h3"]
    for _, ev in flaps:
        assert ev["vlan"] == VLAN and ev["mac"] == "02:00:00:00:00:01" and ev["moves"] == 6
        assert ev["window_ms"] == c.config.flap_window_ms and ev["host"] == "h1"
    assert all(core.stats.flap_reports == 1 for core in c.cores.values())


def test_the_runtime_logs_each_flapping_mac_once_however_many_flap(caplog):
    # A long run of moves makes many MACs flap; each is one log line, when it starts flapping
    # (the runtime once logged every flapping MAC again at each new flap: a quadratic log).
    from agent.rtevents import RuntimeEvents
    from dvswitch.events import NoEventLog

    class Runtime(RuntimeEvents):
        pass

    rt = Runtime()
    rt.events = NoEventLog("h2")
    for mac in range(1, 51):
        rt._emit_core_event({"kind": "flap.suppressed", "vlan": VLAN, "mac": f"02:00:00:00:00:{mac:02x}",
                             "host": "h1", "moves": 6, "window_ms": 180_000, "message": f"MAC flap: mac {mac}"})
    lines = [r.getMessage() for r in caplog.records if r.name == "agent"]
    assert lines == [f"MAC flap: mac {mac}" for mac in range(1, 51)]


def test_events_carry_no_timestamps_the_runtime_stamps_them():
    c = Cluster(["h1", "h2"])
    c.drop = lambda src, dst, mt, frame: mt is MsgType.UPDATES
    c.attach("h1", 1)
    c.drop = None
    c.heartbeat_round()
    c.join("h3")
    assert c.events
    for _, ev in c.events:
        assert not {"t_ns", "ts", "proc"} & set(ev) and ev["kind"].count(".") == 1


def test_effects_are_frozen_values_and_membership_carries_endpoints_not_core_state():
    core = AgentCore("h1", 1, pub_endpoint="p1", rpc_endpoint="r1")
    core.start(0)
    core.on_message("ctl", MsgType.PEERS, [[["h1", 1, "p1", "r1"], ["h2", 1, "p2", "r2"]], 1], 5)
    out = core.take_outbox()
    assert Subscribe("h2", "p2", "r2") in out
    sub = next(e for e in out if type(e) is Subscribe)
    with pytest.raises(dataclasses.FrozenInstanceError):
        sub.host = "h9"  # type: ignore[misc]
    assert not hasattr(sub, "__dict__")  # (slotted)
    core.on_message("ctl", MsgType.PEERS, [[["h1", 1, "p1", "r1"]], 2], 6)
    core.on_timer(10**12)  # past the grace: h2 leaves
    out = core.take_outbox()
    assert Unsubscribe("h2") in out
    assert all(type(e) in (Publish, ToController, Unsubscribe, Emit) for e in out)


class _Recorder:
    def __getattr__(self, name):
        return lambda *args: None


def test_a_router_refuses_an_effect_it_does_not_know():
    @dataclasses.dataclass(frozen=True, slots=True)
    class Teleport:
        host: str

    route(_Recorder(), "h1", Publish(b"x"))  # (known: routed)
    with pytest.raises(AssertionError):
        route(_Recorder(), "h1", Teleport("h2"))  # type: ignore[arg-type]


def test_the_simulators_route_refuses_an_effect_it_does_not_know():
    from testbed.sim.routing import route_agent

    @dataclasses.dataclass(frozen=True, slots=True)
    class Teleport:
        host: str

    sent = []
    sim = _Recorder()
    sim._to_controller = lambda a, frames, t: sent.append(frames)
    route_agent(sim, None, [ToController(b"a"), Emit({"kind": "x.y"}), ToController(b"b")], 0)
    assert sent == [[b"a", b"b"]]  # (frames to the controller travel together; events stay out of the sim)
    with pytest.raises(AssertionError):
        route_agent(sim, None, [Teleport("h2")], 0)


def test_the_runtimes_drop_sum_counts_exactly_the_drop_counters():
    from agent.rtevents import DROP_COUNTERS, drops_total
    from agent.updates import Stats

    s = Stats()
    for i, name in enumerate(s.__slots__):
        setattr(s, name, 1 << i)  # a distinct bit per counter: any one missing or extra shows
    assert drops_total(s) == sum(getattr(s, n) for n in DROP_COUNTERS)
