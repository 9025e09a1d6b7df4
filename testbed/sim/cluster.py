"""The simulated processes: agents (their cores, sockets and timers) and the controller.

Routing (testbed/sim/routing.py for the agents' effects) mirrors agent/runtime.py and controller/runtime.py:
- an agent's Publish goes to every agent that connected to that publisher (an agent
  connects when its core emits Subscribe and disconnects on Unsubscribe);
  it is decoded and prepared (`AgentCore.prepare`) once and the same read-only
  `(msg_type, body)` is handed to every subscriber through `AgentCore.on_gossip` (on_message("sub", ...));
- ToPeer goes to that host's "rpc" channel (only if the sender connected to it, as a
  ZeroMQ ROUTER drops what it cannot route) with the envelope `[b"pull:<sender>"]`; the answer,
  Reply, comes back on the requester's "pull" channel;
- ToController goes to the controller with the envelope `[b"agent:<host>:<incarnation>"]`; the
  controller's `(envelope, frame)` goes to the agent owning that envelope ("ctl" channel) or to
  the simulated client;
- events of one (destination, virtual time) are handled as one batch, then the driver calls
  `end_batch(now)` (flush, take the outbox, next deadline), as the runtime does after draining
  a socket; timers fire at that deadline.
A crashed agent loses its sockets and whatever was on the way to it; a restarted agent is a
new AgentCore with a higher incarnation that registers again over "ctl". A crashed controller
loses its memory and keeps its journal; a restarted one replays it.
"""

from __future__ import annotations

from array import array
from typing import TYPE_CHECKING

from agent import wire
from agent.core import AgentCore
from agent.mactable import MacTable
from agent.wire import WireError
from controller.core import ControllerCore
from dvswitch.naming import host_names
from testbed.sim.routing import route_agent
from testbed.sim.scheduler import (
    CLIENT,
    CLIENT_ENVELOPE,
    CONTROLLER,
    DST_MASK,
    FIRST_AGENT,
    K_CTLIN,
    K_P2P,
    K_SUB,
    K_TIMER,
    K_TOCLIENT,
    K_TOCTL,
    ms,
)
from testbed.sim.spec import CTL

if TYPE_CHECKING:
    from testbed.sim.engine import Simulator


class MonitoredTable(MacTable):
    """An agent's MacTable with the safety monitor: every applied merge is checked against the
    merge rule (an entry is only ever replaced by one with a greater (seq, host))."""

    # The merge under watch; a test swaps in a broken one to prove the monitor trips.
    base_merge = MacTable.merge

    def __init__(self, sim: Simulator, host: str, *, reverse_merge_rule: bool = False) -> None:
        super().__init__(reverse_merge_rule=reverse_merge_rule)
        self._sim = sim
        self._host = host
        # The real rule, unmodified: the bulk path may run (and is watched below).
        self._bulk = not self._reverse and type(self).base_merge is MacTable.merge

    def merge_prepared(self, rows):
        if not self._bulk:
            return self._merge_one_by_one(rows)  # through merge(), watched there
        applied = self._merge_prepared_fast(rows)
        if applied:
            self._watch(applied)
        return applied

    def merge(self, key, new):
        old = self._entries.get(key)
        res = self.base_merge(key, new)
        if res.applied:
            self._watch([(key, old, new)])
        return res

    def _watch(self, applied: list) -> None:
        """Merges were applied: the tables changed, and each must have obeyed the merge rule."""
        sim = self._sim
        sim.last_change_ns = sim.now
        sim.dirty = True
        for key, old, new in applied:
            if old is not None and (new.seq, new.host) <= (old.seq, old.host):
                sim.safety_violation(self._host, key, old, new)
        rows = sim.applies
        if rows is not None:
            # The history's apply rows (testbed/chaos/history.py): what the chaos runner reads
            # from the controller's applied_log, here taken at the merge itself.
            now, host = sim.now, self._host
            for (vlan, mac), _old, new in applied:
                rows.append([now, host, vlan, mac, new.host, new.seq, new.tombstone])


class Agent:
    """One running agent process: its core and what its sockets are connected to."""

    __slots__ = ("iid", "hidx", "host", "core", "alive", "pub_ep", "rpc_ep", "ctl_env", "pull_id", "conns",
                 "timer_at", "timers", "ctl_in_last", "ctl_out_last", "fifo", "fifo_until")

    def __init__(self, iid: int, hidx: int, host: str, core: AgentCore) -> None:
        self.iid = iid
        self.hidx = hidx
        self.host = host
        self.core = core
        self.alive = True
        self.pub_ep = core.pub_endpoint
        self.rpc_ep = core.rpc_endpoint
        self.ctl_env = [f"agent:{host}:{core.incarnation}".encode()]
        self.pull_id = f"pull:{host}".encode()
        self.conns: dict[str, tuple[str, str]] = {}  # peer host -> (pub endpoint, rpc endpoint)
        self.timer_at: int | None = None
        # Times with a timer event already queued: a deadline that moves back to one of them
        # needs no second event (an apply report's deadline comes and goes with every move).
        self.timers: set[int] = set()
        self.ctl_in_last = 0  # FIFO: last arrival controller -> this agent
        self.ctl_out_last = 0  # FIFO: last arrival this agent -> controller
        self.fifo: array | None = None  # FIFO: last arrival of our gossip at each host index
        self.fifo_until = 0  # the latest of those arrivals


class Cluster:
    """Starting, crashing and driving the agents and the controller (a part of Simulator)."""

    def _init_cluster(self, n_hosts: int) -> None:
        self.hosts = host_names(n_hosts)
        self.hidx = {h: i for i, h in enumerate(self.hosts)}
        # Who is running and how to reach them.
        self.agents: dict[int, Agent] = {}  # iid -> running agent
        self.current: list[Agent | None] = [None] * n_hosts  # host index -> its running agent
        self.incarnations = [0] * n_hosts
        self.next_iid = FIRST_AGENT
        self.subs: dict[str, dict[int, int]] = {}  # pub endpoint -> {subscriber iid: subscriber host index}
        self.endpoints: dict[str, tuple[str, str]] = {}  # pub endpoint -> (pub, rpc) of that agent
        self.by_rpc: dict[str, Agent] = {}  # rpc endpoint -> running agent
        self.by_ctl_env: dict[bytes, Agent] = {}  # control envelope -> agent (running or not)
        self.by_pull_id: dict[bytes, int] = {}  # b"pull:h3" -> host index
        self.controller = ControllerCore(self.ctl_config)
        self.ctl_timer_at: int | None = None
        self.ctl_up = True
        # The controller's journal as it would be on disk (the runtime fsyncs each record
        # before acting on the outbox): a restarted controller replays it.
        self.journal: list[dict] = []

    def start_agent(self, hidx: int) -> None:
        host = self.hosts[hidx]
        self.incarnations[hidx] += 1
        inc = self.incarnations[hidx]
        core = AgentCore(host, inc, self.agent_config, pub_endpoint=f"sim://{host}/{inc}/pub",
                         rpc_endpoint=f"sim://{host}/{inc}/rpc", pid=hidx + 1)
        core.table = self.table_class(self, host, reverse_merge_rule=core.config.defect_reverse_merge)
        a = Agent(self.next_iid, hidx, host, core)
        self.next_iid += 1
        if self.next_iid > DST_MASK:  # pragma: no cover - 16 million agent starts
            raise ValueError("too many agent starts for the event key")
        self.agents[a.iid] = a
        self.current[hidx] = a
        self.by_rpc[a.rpc_ep] = a
        self.by_ctl_env[a.ctl_env[0]] = a
        self.by_pull_id[a.pull_id] = hidx
        self.subs[a.pub_ep] = {}
        self.dirty = True
        self.last_change_ns = self.now
        core.start(self.now)
        self._after_agent(a, self.now)

    def crash_agent(self, hidx: int) -> None:
        a = self.current[hidx]
        if a is None:
            return
        a.alive = False
        del self.agents[a.iid]
        self.current[hidx] = None
        for pub_ep, _ in a.conns.values():
            s = self.subs.get(pub_ep)
            if s is not None:
                s.pop(a.iid, None)
        self.subs.pop(a.pub_ep, None)
        self.by_rpc.pop(a.rpc_ep, None)
        self.dirty = True
        self.last_change_ns = self.now
        self.crash_log.append({"host": a.host, "incarnation": a.core.incarnation, "at_ms": ms(self.now)})

    def _agent_event(self, a: Agent, ev: tuple, t: int) -> None:
        kind = ev[2]
        core = a.core
        if kind == K_SUB:
            core.on_gossip(ev[3], ev[4], t)
        elif kind == K_CTLIN:
            for mt, body, frame in ev[3]:
                if mt is None:
                    core.on_frame("ctl", frame, t)
                else:
                    core.on_message("ctl", mt, body, t)
        elif kind == K_P2P:
            core.on_frame(ev[3], ev[4], t, ev[5])
        elif kind == K_TIMER:
            a.timers.discard(t)
            if a.timer_at == t:
                a.timer_at = None
                core.on_timer(t)

    def _after_agent(self, a: Agent, t: int) -> None:
        out, d = a.core.end_batch(t)
        if out:
            route_agent(self, a, out, t)  # (testbed/sim/routing.py; routing never calls back into the core)
        if d < t:
            d = t
        if d != a.timer_at:
            a.timer_at = d
            if d not in a.timers:
                a.timers.add(d)
                self._push(d, a.iid, K_TIMER)

    def _disconnect(self, a: Agent, host: str) -> None:
        eps = a.conns.pop(host, None)
        if eps is not None:
            s = self.subs.get(eps[0])
            if s is not None:
                s.pop(a.iid, None)

    def _controller_event(self, ctl: ControllerCore, ev: tuple, t: int) -> None:
        kind = ev[2]
        if kind == K_TOCTL:
            env = ev[3]
            for frame in ev[4]:
                ctl.on_frame(env, frame, t)
        elif kind == K_TIMER:
            if self.ctl_timer_at == t:
                self.ctl_timer_at = None
                ctl.on_timer(t)

    def _arm_controller(self, t: int) -> None:
        d = max(t, self.controller.next_deadline_ns())
        if d != self.ctl_timer_at:
            self.ctl_timer_at = d
            self._push(d, CONTROLLER, K_TIMER)

    def _after_controller(self, t: int) -> None:
        records = self.controller.take_journal()
        if records:
            self.journal.extend(records)
            self.dirty = True  # the inventory changed: agreement must be judged again
        out = self.controller.take_outbox()
        if out:
            trains: dict[int, list] = {}
            decoded: dict[int, tuple] = {}
            to_client = []
            for envelope, frame in out:
                key = envelope[0] if envelope else b""
                if key == CLIENT_ENVELOPE:
                    to_client.append(frame)
                    continue
                a = self.by_ctl_env.get(key)
                if a is None or not a.alive:
                    self._count(frame, 1)
                    self.undeliverable += 1
                    continue
                d = decoded.get(id(frame))
                if d is None:
                    try:
                        mt, body = wire.decode(frame, wire.MAX_SMALL_FRAME_BYTES)
                        d = (mt, body, frame)
                    except WireError:
                        d = (None, None, frame)
                    decoded[id(frame)] = d
                train = trains.get(a.iid)
                if train is None:
                    trains[a.iid] = [d]
                else:
                    train.append(d)
            for iid, items in trains.items():
                a = self.agents[iid]
                if self.ctl_faulty and self.loss:
                    items = self._lossy(items, [d[2] for d in items])
                arr = self._ctl_link(a.hidx, [d[2] for d in items], t, a.ctl_in_last)
                if arr is None or not items:
                    continue
                a.ctl_in_last = max(a.ctl_in_last, arr)
                rx = self.rx_faults
                nf = rx.get(a.hidx) if rx else None
                if nf is None:
                    self._push(arr, iid, K_CTLIN, items)
                else:
                    self._ctl_rx(nf, a, items, arr)  # (a's receive-side rules, network.py)
            if to_client:
                arr = self._ctl_link(None, to_client, t, self.ctl_to_client_last)
                self.ctl_to_client_last = arr
                self._push(arr, CLIENT, K_TOCLIENT, to_client)
        self._arm_controller(t)

    def crash_controller(self) -> None:
        """The controller process dies: its memory is gone, its journal stays on disk."""
        self.ctl_up = False
        self.ctl_timer_at = None
        self.crash_log.append({"host": CTL, "incarnation": len([c for c in self.crash_log if c["host"] == CTL]) + 1,
                               "at_ms": ms(self.now)})
        self.client.controller_crashed()

    def restart_controller(self) -> None:
        """A new controller process: it replays the journal, then agents re-register (it asks
        those it does not know) and report their tables, which it reconciles with."""
        self.controller = ControllerCore(self.ctl_config, journal=list(self.journal))
        self.ctl_up = True
        self.dirty = True
        self._arm_controller(self.now)
        self.client.controller_restarted()
