"""The deterministic simulator: the real AgentCore and ControllerCore on a virtual clock.

One process, no sockets, no asyncio, no wall clock: events keyed by
`(virtual time ns, destination id, sequence number)` in a calendar queue (a dict of time
slots of 2**SLOT_SHIFT ns, a heap of slot numbers, and a small heap for the slot being run:
a heartbeat round at 1,000 hosts puts a million deliveries in flight, and one big heap of
tuples spends its time on cache misses); every random choice comes from `random.Random`
instances seeded from the run's seed, so one seed gives exactly one run.

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

Network model (all per message, decided by the seeded network RNG):
- latency = `base_latency_us` + an exponential jitter of mean `jitter_mean_us` (defaults 100 µs
  and 50 µs). Every link is FIFO (TCP) unless `reorder` is on; what one sender emits in one
  flush to one receiver over the control connection travels together.
- a receiver takes its messages on a grid of `rx_tick_ns` (default 32,768 ns, as NIC interrupt
  coalescing does): what reaches it within one tick is handled as one batch at the tick's end.
  Under a burst (a thousand agents announcing 8,000 new VMs within a millisecond) an agent so
  handles many messages per wake-up, as a real one draining its socket does.
- `loss`, `dup` and `reorder` apply to agent-to-agent traffic (gossip and repair): ZeroMQ PUB/SUB
  drops silently and repair requests time out and are retried. The control connection
  (agent <-> controller DEALER/ROUTER over TCP) is reliable and FIFO unless `ctl_faults` is set:
  commands are sent again until acked, a lost apply report is made good by the target's ack and
  by repair hints (an agent that holds the hinted entry reports it again), and an op whose every
  resend is lost within its timeout fails.
- with `reorder`, a message is held back by an extra uniform delay in [0, `reorder_max_us`] with
  probability `reorder_prob` (defaults 1,000 µs and 0.2), and links are no longer FIFO.
- partitions drop every message between two groups while they last; the controller reaches
  every group (a separate management network) unless the partition names it (`ctl`), and then
  its control connections to the other groups are cut too;
  a crashed agent loses its sockets and whatever was on the way to it; a restarted agent is a
  new AgentCore with a higher incarnation that registers again over "ctl".
- loss, dup and reorder act only inside the fault window; partitions and crashes happen at their
  scheduled times, which lie inside it.
"""

from __future__ import annotations

import gc
import heapq
import math
import random
from array import array
from dataclasses import dataclass, field, replace

from agent import wire
from agent.config import AgentConfig
from agent.core import AgentCore
from agent.faults import peek_type
from agent.mactable import MacTable, entry_hash
from agent.wire import MsgType, WireError
from controller.config import ControllerConfig
from controller.core import ControllerCore
from testbed.sim.routing import route_agent
from testbed.sim.spec import CTL, Crash, Partition, faults_end_ms

NS_PER_US = 1_000
NS_PER_MS = 1_000_000

MOVES_PER_HOSTS = 20  # default concurrency: one move in flight per this many hosts
SLOT_SHIFT = 12  # a calendar slot is 4,096 ns of virtual time
PROGRESS_EVERY = 1 << 16  # events between two on_progress calls
FULL_CHECK_ENTRIES = 2_000_000  # final checks compare every table in full up to this many entries

# Destination ids in the event heap: actions run before deliveries of the same instant.
ACTION = -1
CONTROLLER = 0
CLIENT = 1
FIRST_AGENT = 2

# An event is `(key, seq, kind, ...)` with key = t << DST_SHIFT | (destination id + 1): events
# sort by (time, destination, seq) comparing one int (deliveries share their rx tick's time,
# and a tuple whose first items are equal compares item by item, slowly).
DST_SHIFT = 24
DST_MASK = (1 << DST_SHIFT) - 1

# Event kinds (third field of an event tuple).
K_SUB = 0  # (key, seq, K_SUB, msg_type, body)                   gossip, decoded once
K_CTLIN = 1  # (key, seq, K_CTLIN, [(msg_type, body, frame)])    controller -> agent, one train
K_P2P = 2  # (key, seq, K_P2P, channel, frame, envelope)        repair request or reply
K_TIMER = 3  # (key, seq, K_TIMER)
K_TOCTL = 4  # (key, seq, K_TOCTL, envelope, [frames])           agent or client -> controller
K_TOCLIENT = 5  # (key, seq, K_TOCLIENT, [frames])
K_ACTION = 6  # (key, seq, K_ACTION, function, args)

CLIENT_ENVELOPE = b"client:sim"
ANY_GROUP = -1  # partition group of a controller that every group reaches
MSG_NAMES = {int(m): m.name for m in MsgType}


@dataclass(frozen=True)
class NetConfig:
    """The simulated network. Units are in the names; defaults in the field values."""

    base_latency_us: int = 100  # one-way latency floor, µs
    jitter_mean_us: int = 50  # mean of the exponential jitter added to it, µs
    loss: float = 0.0  # probability an agent-to-agent message is lost
    dup: float = 0.0  # probability an agent-to-agent message is delivered twice
    reorder: bool = False  # hold some messages back so later ones overtake them
    reorder_prob: float = 0.2  # with `reorder`: probability a message is held back
    reorder_max_us: int = 1_000  # with `reorder`: the hold-back is uniform in [0, this], µs
    ctl_faults: bool = False  # also apply loss/dup/reorder to agent <-> controller messages
    # Receivers take what arrived at the next multiple of this, ns, as one batch: NIC interrupt
    # coalescing (rx-usecs, typically 20-50 µs) and an event loop that drains its socket when it
    # wakes. A power of two; 0: each message at its own arrival time. Default 32,768 (~33 µs).
    rx_tick_ns: int = 1 << 15


@dataclass(frozen=True)
class SimConfig:
    hosts: int
    vms: int
    moves: int
    seed: int = 1
    net: NetConfig = field(default_factory=NetConfig)
    partitions: tuple[Partition, ...] = ()
    crashes: tuple[Crash, ...] = ()
    # Moves per virtual second, issued whether or not earlier ones finished; None: `concurrency`
    # moves in flight, a new one sent as each reply arrives.
    move_rate: float | None = None
    # Moves in flight at once (without move_rate); None: one per MOVES_PER_HOSTS hosts, at
    # least one (a big cluster runs many vMotions at once; a small one, one at a time as `dvs demo`).
    concurrency: int | None = None
    # Length of the fault window in virtual ms; None: until the last move is answered (and at
    # least until the last scheduled partition heals or crashed host restarts).
    fault_ms: int | None = None
    # Gossip heartbeat interval at full membership, ms; None: AgentConfig's own scaling.
    gossip_interval_ms: int | None = None
    agent_config: AgentConfig | None = None
    controller_config: ControllerConfig | None = None
    # How long to wait for full agreement after the faults stop, virtual ms; None: 2x the bound.
    settle_ms: int | None = None
    # Agents start at seeded times spread over [0, this), µs.
    start_spread_us: int = 1_000
    # The client's wait_ready timeout, virtual ms.
    ready_timeout_ms: int = 60_000
    # "moves": `moves` random moves; "evacuate": maintenance mode for h1 (`dvs host evacuate h1`,
    # at most `concurrency` moves at once), the faults running meanwhile.
    workload: str = "moves"


def concurrency_for(cfg: SimConfig) -> int:
    """Moves the client keeps in flight (see SimConfig.concurrency)."""
    return cfg.concurrency if cfg.concurrency is not None else max(1, cfg.hosts // MOVES_PER_HOSTS)


def agent_config_for(cfg: SimConfig) -> AgentConfig:
    """The AgentConfig the simulated agents run with (see SimConfig.gossip_interval_ms); they
    keep no apply times of their own (the simulator stamps every apply itself)."""
    base = replace(cfg.agent_config or AgentConfig(), no_apply_times=True)
    if cfg.gossip_interval_ms is None:
        return base
    g = cfg.gossip_interval_ms
    n = cfg.hosts
    budget = max(1, -(-1000 * n * (n - 1) // g))  # ceil: the scaled interval stays <= g
    return replace(base, heartbeat_budget_per_s=budget, heartbeat_interval_ms=min(base.heartbeat_interval_ms, g))


def gossip_interval_ms(config: AgentConfig, n_hosts: int) -> int:
    """An agent's heartbeat interval once it knows all n_hosts - 1 peers (as AgentCore computes it)."""
    scaled = 1000 * n_hosts * (n_hosts - 1) // max(1, config.heartbeat_budget_per_s)
    return max(config.heartbeat_interval_ms, scaled)


def liveness_bound_ms(config: AgentConfig, n_hosts: int, ctl: ControllerConfig | None = None) -> int:
    """After the faults stop, every running agent agrees with the controller within this many ms.

    With G the gossip interval and S the status/timer interval (heartbeat_interval_ms):
    - an update some agent lost is announced by its origin's next heartbeat (<= G), then pulled;
      a pull lost before the faults stopped is retried at the first timer tick after
      pull_timeout_ms (<= pull_timeout_ms + S);
    - an update whose origin has since restarted (its log is gone) only comes back through a
      snapshot, asked after `digest_mismatch_rounds` heartbeats in a row show the same two
      differing digests, once the other repairs have settled (<= (rounds + 1) * G);
    - a host that crashed for good is declared dead dead_after_ms after its last word (it may
      have crashed just before the faults stopped) and its VMs restart elsewhere (HA), which
      converges within a tick and a few network hops;
    - a membership (PEERS) lost on a cut control connection is sent again when the agent's next
      status shows the old epoch, at most every peers_refresh_ms (<= peers_refresh_ms + S), and
      only then can the repairs above start;
    so B = max((digest_mismatch_rounds + 2) * G + pull_timeout_ms + 2 * S + 100,
               dead_after_ms + 2 * tick_interval_ms + 100) + peers_refresh_ms + S + tick_interval_ms.
    (The controller's repair hints usually settle a lost update within repair_hint_after_ms
    and a pull; the bound does not count on them.)
    """
    ctl = ctl or ControllerConfig()
    g = gossip_interval_ms(config, n_hosts)
    s = config.heartbeat_interval_ms
    repair = (config.digest_mismatch_rounds + 2) * g + config.pull_timeout_ms + 2 * s + 100
    refresh = getattr(ctl, "peers_refresh_ms", 0)
    refresh = refresh + s + ctl.tick_interval_ms if refresh else 0
    return max(repair, ctl.dead_after_ms + 2 * ctl.tick_interval_ms + 100) + refresh


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


class Simulator:
    table_class = MonitoredTable

    def __init__(self, cfg: SimConfig, on_phase=None) -> None:
        if cfg.hosts < 1:
            raise ValueError("a simulation needs at least one host")
        self.cfg = cfg
        # on_phase(name, virtual_ns): called as the run passes "ready", "created", "moved",
        # "faults_stopped" and "end" (the command uses it to time the phases in wall-clock).
        self.on_phase = on_phase or (lambda name, t: None)
        # on_progress(sim): called every 2**16 events when set (a progress line for long runs).
        self.on_progress = None
        self.net = cfg.net
        self.agent_config = agent_config_for(cfg)
        # The apply log is for the chaos checker, the move history for `dvs moves`: the simulator
        # watches every merge itself and takes each move's record from the client's reply (a
        # history of 2,000 moves at 1,000 hosts holds 2 million apply stamps).
        self.ctl_config = cfg.controller_config or ControllerConfig(applied_log_max=0, history_max=0)
        self.hosts = [f"h{i}" for i in range(1, cfg.hosts + 1)]
        self.hidx = {h: i for i, h in enumerate(self.hosts)}
        self.net_rng = random.Random(f"{cfg.seed}/net")
        self.work_rng = random.Random(f"{cfg.seed}/workload")
        self.start_rng = random.Random(f"{cfg.seed}/start")
        self.slots: dict[int, list[tuple]] = {}  # slot number -> its events, unordered
        self.slot_heap: list[int] = []  # slot numbers that have events
        self.slot = -1  # the slot being run
        self.heap: list[tuple] = []  # events pushed into that slot (or before) while it runs, a heap
        self.seq = 0
        self.now = 0
        self.stopped = False
        self.events = 0
        # Who is running and how to reach them.
        self.agents: dict[int, Agent] = {}  # iid -> running agent
        self.current: list[Agent | None] = [None] * cfg.hosts  # host index -> its running agent
        self.incarnations = [0] * cfg.hosts
        self.next_iid = FIRST_AGENT
        self.subs: dict[str, dict[int, int]] = {}  # pub endpoint -> {subscriber iid: subscriber host index}
        self.endpoints: dict[str, tuple[str, str]] = {}  # pub endpoint -> (pub, rpc) of that agent
        self.by_rpc: dict[str, Agent] = {}  # rpc endpoint -> running agent
        self.by_ctl_env: dict[bytes, Agent] = {}  # control envelope -> agent (running or not)
        self.by_pull_id: dict[bytes, int] = {}  # b"pull:h3" -> host index
        self.p2p_last: dict[tuple[int, int], int] = {}  # FIFO of repair links
        self.ctl_to_client_last = 0
        self.client_to_ctl_last = 0
        self.controller = ControllerCore(self.ctl_config)
        self.ctl_timer_at: int | None = None
        self.ctl_up = True
        # The controller's journal as it would be on disk (the runtime fsyncs each record
        # before acting on the outbox): a restarted controller replays it.
        self.journal: list[dict] = []
        # Network state.
        self.base_ns = self.net.base_latency_us * NS_PER_US
        self.jitter_ns = self.net.jitter_mean_us * NS_PER_US
        tick = self.net.rx_tick_ns
        if tick < 0 or tick & (tick - 1):
            raise ValueError(f"rx_tick_ns must be 0 or a power of two, not {tick}")
        self.tick_mask = tick - 1 if tick else 0
        self.p2p_faulty = False  # loss/dup/reorder active on agent-to-agent traffic
        self.ctl_faulty = False  # ... and on control traffic
        self.loss = self.dup = 0.0
        self.reorder = False
        self.partitioned = False
        self.gid = [0] * cfg.hosts  # host index -> partition group
        self.ctl_gid = 0
        # Counters.
        self.msgs = 0
        self.bytes = 0
        self.by_type: dict[int, list[int]] = {}  # msg type -> [messages, bytes]
        self.lost = 0
        self.duplicated = 0
        self.cut = 0  # dropped by a partition
        self.undeliverable = 0  # to a crashed agent, or unroutable
        # Safety and agreement.
        self.violations = 0
        self.violation_examples: list[dict] = []
        self.dirty = True
        self.last_change_ns = 0
        # Fault window and workload.
        self.f0_ns: int | None = None
        self.f1_ns: int | None = None
        self.moves_done_ns: int | None = None
        self.agree_ns: int | None = None
        self.settle_deadline_ns: int | None = None
        self.traffic_at_f0 = (0, 0)
        self.traffic_at_done = (0, 0)
        self.client = Client(self)
        self.crash_log: list[dict] = []

    # ------------------------------------------------------------------ scheduling

    def _push(self, t: int, dst: int, *rest) -> None:
        self.seq += 1
        ev = ((t << DST_SHIFT) | (dst + 1), self.seq, *rest)
        slot = t >> SLOT_SHIFT
        if slot <= self.slot:
            heapq.heappush(self.heap, ev)
            return
        events = self.slots.get(slot)
        if events is None:
            self.slots[slot] = [ev]
            heapq.heappush(self.slot_heap, slot)
        else:
            events.append(ev)

    def at(self, t: int, fn, *args) -> None:
        self._push(t, ACTION, K_ACTION, fn, args)

    def _latency(self) -> int:
        return self.base_ns + int(-math.log(1.0 - self.net_rng.random()) * self.jitter_ns)

    def _tick(self, arr: int) -> int:
        """The receiver's next rx tick after an arrival at `arr` (NetConfig.rx_tick_ns)."""
        return (arr | self.tick_mask) + 1 if self.tick_mask else arr

    # ------------------------------------------------------------------ run

    def run(self) -> dict:
        cfg = self.cfg
        spread = max(1, cfg.start_spread_us * NS_PER_US)
        starts = sorted((self.start_rng.randrange(spread), i) for i in range(cfg.hosts))
        for t, i in starts:
            self.at(t, self.start_agent, i)
        self._arm_controller(0)
        self.at(0, self.client.begin)
        # Millions of long-lived small objects (table entries, queued events) and no garbage
        # cycles worth chasing: the cyclic GC would rescan them all, again and again.
        gc_was_on = gc.isenabled()
        gc.disable()
        try:
            self._loop()
            self.on_phase("end", self.now)
            return self.result()
        finally:
            if gc_was_on:
                gc.enable()

    def _loop(self) -> None:
        pop = heapq.heappop
        agents = self.agents
        slots = self.slots
        slot_heap = self.slot_heap
        # A slot's events are sorted once when it starts (a sort of tuples compares their first
        # items natively; a heap pops with full tuple comparisons, a few per level), and run in
        # order; what is pushed into the slot while it runs (timers due now, actions) goes to
        # the small `side` heap, and the next event is the smaller of the two heads.
        side = self.heap
        cur: list[tuple] = []
        i = n = 0
        events = self.events
        progress_at = events + PROGRESS_EVERY
        while not self.stopped:
            if i < n:
                ev = cur[i]
                if side and side[0] < ev:
                    ev = pop(side)
                else:
                    i += 1
            elif side:
                ev = pop(side)
            elif slot_heap:
                self.slot = pop(slot_heap)
                cur = slots.pop(self.slot)
                cur.sort()
                i, n = 0, len(cur)
                continue
            else:
                break
            key = ev[0]
            t = key >> DST_SHIFT
            self.now = t
            dst = (key & DST_MASK) - 1
            # Everything else for the same destination at the same instant: one batch.
            more = None
            while True:
                if i < n and not (side and side[0] < cur[i]):
                    nxt = cur[i]
                    if nxt[0] != key:
                        break
                    i += 1
                elif side:
                    nxt = side[0]
                    if nxt[0] != key:
                        break
                    pop(side)
                else:
                    break
                if more is None:
                    more = [nxt]
                else:
                    more.append(nxt)
            events += 1 if more is None else 1 + len(more)
            if events >= progress_at and self.on_progress is not None:
                progress_at = events + PROGRESS_EVERY
                self.events = events
                self.on_progress(self)
            if dst >= FIRST_AGENT:
                a = agents.get(dst)
                if a is None:
                    self.undeliverable += 1 if more is None else 1 + len(more)
                    continue
                core = a.core
                if ev[2] == K_SUB:
                    core.on_gossip(ev[3], ev[4], t)
                else:
                    self._agent_event(a, ev, t)
                if more is not None:
                    for ev in more:
                        if ev[2] == K_SUB:
                            core.on_gossip(ev[3], ev[4], t)
                        else:
                            self._agent_event(a, ev, t)
                if a.alive:
                    self._after_agent(a, t)
            elif dst == CONTROLLER:
                batch = [ev] if more is None else [ev, *more]
                if not self.ctl_up:
                    # A crashed controller: what was on its way to it is lost, its timers with it.
                    self.undeliverable += sum(1 for e in batch if e[2] != K_TIMER)
                    continue
                ctl = self.controller
                for e in batch:
                    self._controller_event(ctl, e, t)
                self._after_controller(t)
            else:
                for e in [ev] if more is None else [ev, *more]:
                    if dst == CLIENT:
                        self.client.on_frames(e[3], t)
                    else:
                        e[3](*e[4])
        self.events = events

    def stop(self) -> None:
        self.stopped = True

    # ------------------------------------------------------------------ agents

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
        self.crash_log.append({"host": a.host, "incarnation": a.core.incarnation, "at_ms": _ms(self.now)})

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

    def _count(self, frame: bytes, n: int) -> None:
        size = len(frame) * n
        self.msgs += n
        self.bytes += size
        c = self.by_type.get(peek_type(frame))
        if c is None:
            c = self.by_type[peek_type(frame)] = [0, 0]
        c[0] += n
        c[1] += size

    def _publish(self, a: Agent, frame: bytes, t: int) -> None:
        subs = self.subs.get(a.pub_ep)
        if not subs:
            return
        self._count(frame, len(subs))
        try:
            mt, body = wire.decode(frame, wire.MAX_SMALL_FRAME_BYTES)
            body = AgentCore.prepare(mt, body)
        except WireError:
            # Never from our own cores; still, let each receiver drop and count it.
            for iid in subs:
                self._push(self._tick(t + self._latency()), iid, K_P2P, "sub", frame, None)
            return
        slots = self.slots
        slot_heap = self.slot_heap
        current = self.slot
        rnd = self.net_rng.random
        log = math.log
        base = t + self.base_ns
        jit = self.jitter_ns
        fifo = a.fifo
        if fifo is None:
            fifo = a.fifo = array("q", bytes(8 * len(self.hosts)))
        check_fifo = base < a.fifo_until
        until = 0
        mask = self.tick_mask
        # Faults (partitions, loss, duplication, reordering) are tested inline; without them
        # this loop only draws each subscriber's latency.
        faulty = self.p2p_faulty or self.partitioned
        partitioned = self.partitioned
        gid = self.gid
        my_gid = gid[a.hidx]
        loss, dup, reorder = (self.loss, self.dup, self.reorder) if self.p2p_faulty else (0.0, 0.0, False)
        hold_p = self.net.reorder_prob
        hold_ns = self.net.reorder_max_us * NS_PER_US
        heap = self.heap
        seq = self.seq
        for iid, hidx in subs.items():
            if partitioned and gid[hidx] != my_gid:
                self.cut += 1
                continue
            if loss and rnd() < loss:
                self.lost += 1
                continue
            arr = base + int(-log(1.0 - rnd()) * jit)
            if reorder and rnd() < hold_p:
                arr += int(rnd() * hold_ns)
            if mask:
                arr = (arr | mask) + 1
            if not reorder:
                if check_fifo and arr < fifo[hidx]:
                    arr = fifo[hidx]
                fifo[hidx] = arr
            if arr > until:
                until = arr
            seq += 1
            slot = arr >> SLOT_SHIFT
            ev = ((arr << DST_SHIFT) | (iid + 1), seq, K_SUB, mt, body)  # (_push, written out)
            if slot <= current:
                heapq.heappush(heap, ev)
            else:
                events = slots.get(slot)
                if events is None:
                    slots[slot] = [ev]
                    heapq.heappush(slot_heap, slot)
                else:
                    events.append(ev)
            if dup and rnd() < dup:
                self.duplicated += 1
                self._count(frame, 1)
                self.seq = seq
                self._push(self._tick(arr + self._latency()), iid, K_SUB, mt, body)
                seq = self.seq
        self.seq = seq
        a.fifo_until = max(until, a.fifo_until) if faulty else until

    def _p2p_send(self, src: Agent, dst: Agent, channel: str, frame: bytes, envelope, t: int) -> None:
        self._count(frame, 1)
        if self.partitioned and self.gid[src.hidx] != self.gid[dst.hidx]:
            self.cut += 1
            return
        faulty = self.p2p_faulty
        rnd = self.net_rng.random
        if faulty and self.loss and rnd() < self.loss:
            self.lost += 1
            return
        arr = t + self._latency()
        if faulty and self.reorder:
            if rnd() < self.net.reorder_prob:
                arr += int(rnd() * self.net.reorder_max_us * NS_PER_US)
            arr = self._tick(arr)
        else:
            arr = self._tick(arr)
            link = (src.iid, dst.iid)
            last = self.p2p_last.get(link, 0)
            if arr < last:
                arr = last
            self.p2p_last[link] = arr
        self._push(arr, dst.iid, K_P2P, channel, frame, envelope)
        if faulty and self.dup and rnd() < self.dup:
            self.duplicated += 1
            self._count(frame, 1)
            self._push(self._tick(arr + self._latency()), dst.iid, K_P2P, channel, frame, envelope)

    def _request(self, a: Agent, host: str, frame: bytes, t: int) -> None:
        eps = a.conns.get(host)
        dst = self.by_rpc.get(eps[1]) if eps is not None else None
        if dst is None:
            self._count(frame, 1)
            self.undeliverable += 1  # a ROUTER drops what it has no connection for
            return
        self._p2p_send(a, dst, "rpc", frame, [a.pull_id], t)

    def _reply(self, a: Agent, envelope, frame: bytes, t: int) -> None:
        hidx = self.by_pull_id.get(envelope[0]) if envelope else None
        dst = self.current[hidx] if hidx is not None else None
        # The reply travels back over the connection the requester made to our rpc socket.
        if dst is None or dst.conns.get(a.host, ("", ""))[1] != a.rpc_ep:
            self._count(frame, 1)
            self.undeliverable += 1
            return
        self._p2p_send(a, dst, "pull", frame, None, t)

    # ------------------------------------------------------------------ control connection

    def _ctl_link(self, hidx: int | None, frames: list, t: int, last: int) -> int | None:
        """Arrival time of a train on a control link, or None if it is lost."""
        for f in frames:
            self._count(f, 1)
        if self.partitioned and hidx is not None and self.ctl_gid != ANY_GROUP and self.gid[hidx] != self.ctl_gid:
            self.cut += len(frames)
            return None
        arr = t + self._latency()
        if self.ctl_faulty and self.reorder and self.net_rng.random() < self.net.reorder_prob:
            return self._tick(arr + int(self.net_rng.random() * self.net.reorder_max_us * NS_PER_US))
        return max(self._tick(arr), last)

    def _to_controller(self, a: Agent, frames: list, t: int) -> None:
        if self.ctl_faulty and self.loss:
            frames = self._lossy(frames, frames)
        arr = self._ctl_link(a.hidx, frames, t, a.ctl_out_last)
        if arr is None or not frames:
            return
        a.ctl_out_last = max(a.ctl_out_last, arr)
        self._push(arr, CONTROLLER, K_TOCTL, a.ctl_env, frames)

    def _lossy(self, items: list, frames: list) -> list:
        """--ctl-faults: drop or duplicate control messages (items[i] carries frames[i])."""
        rnd = self.net_rng.random
        kept = []
        for item, frame in zip(items, frames, strict=True):
            if rnd() < self.loss:
                self.lost += 1
                self._count(frame, 1)
                continue
            kept.append(item)
            if self.dup and rnd() < self.dup:
                self.duplicated += 1
                kept.append(item)
        return kept

    def client_send(self, frame: bytes, t: int) -> None:
        if not self.ctl_up:
            self._count(frame, 1)
            self.undeliverable += 1
            return
        arr = self._ctl_link(None, [frame], t, self.client_to_ctl_last)
        self.client_to_ctl_last = arr
        self._push(arr, CONTROLLER, K_TOCTL, [CLIENT_ENVELOPE], [frame])

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
                self._push(arr, iid, K_CTLIN, items)
            if to_client:
                arr = self._ctl_link(None, to_client, t, self.ctl_to_client_last)
                self.ctl_to_client_last = arr
                self._push(arr, CLIENT, K_TOCLIENT, to_client)
        self._arm_controller(t)

    # ------------------------------------------------------------------ faults

    def open_fault_window(self) -> None:
        """The first move is about to be sent: faults start, scheduled ones are laid out."""
        t = self.now
        self.f0_ns = t
        self.traffic_at_f0 = (self.msgs, self.bytes)
        net = self.net
        if net.loss or net.dup or net.reorder:
            self.loss, self.dup, self.reorder = net.loss, net.dup, net.reorder
            self.p2p_faulty = True
            self.ctl_faulty = net.ctl_faults
        for p in self.cfg.partitions:
            self.at(t + p.start_ms * NS_PER_MS, self.start_partition, p)
            self.at(t + p.end_ms * NS_PER_MS, self.heal_partition, p)
        for c in self.cfg.crashes:
            if c.host == CTL:
                self.at(t + c.at_ms * NS_PER_MS, self.crash_controller)
                self.at(t + c.restart_ms * NS_PER_MS, self.restart_controller)
                continue
            hidx = self.hidx[c.host]
            self.at(t + c.at_ms * NS_PER_MS, self.crash_agent, hidx)
            if c.restart_ms is not None:
                self.at(t + c.restart_ms * NS_PER_MS, self.start_agent, hidx)
        scheduled_end = t + faults_end_ms(self.cfg.partitions, self.cfg.crashes) * NS_PER_MS
        if self.cfg.fault_ms is not None:
            self.at(max(t + self.cfg.fault_ms * NS_PER_MS, scheduled_end), self.close_fault_window)
        self._scheduled_end = scheduled_end

    def moves_finished(self) -> None:
        self.on_phase("moved", self.now)
        self.moves_done_ns = self.now
        self.traffic_at_done = (self.msgs, self.bytes)
        if self.cfg.fault_ms is None:
            self.at(max(self.now, self._scheduled_end), self.close_fault_window)
        elif self.f1_ns is not None:
            self._start_settling()

    def close_fault_window(self) -> None:
        if self.f1_ns is not None:
            return
        self.f1_ns = self.now
        self.on_phase("faults_stopped", self.now)
        self.p2p_faulty = self.ctl_faulty = False
        self.loss = self.dup = 0.0
        self.reorder = False
        if self.moves_done_ns is not None:
            self._start_settling()

    def crash_controller(self) -> None:
        """The controller process dies: its memory is gone, its journal stays on disk."""
        self.ctl_up = False
        self.ctl_timer_at = None
        self.crash_log.append({"host": CTL, "incarnation": len([c for c in self.crash_log if c["host"] == CTL]) + 1,
                               "at_ms": _ms(self.now)})
        self.client.controller_crashed()

    def restart_controller(self) -> None:
        """A new controller process: it replays the journal, then agents re-register (it asks
        those it does not know) and report their tables, which it reconciles with."""
        self.controller = ControllerCore(self.ctl_config, journal=list(self.journal))
        self.ctl_up = True
        self.dirty = True
        self._arm_controller(self.now)
        self.client.controller_restarted()

    def start_partition(self, p: Partition) -> None:
        rest = len(p.groups)
        for i in range(len(self.hosts)):
            self.gid[i] = rest
        self.ctl_gid = ANY_GROUP  # the controller reaches every group unless it is named
        for gi, g in enumerate(p.groups):
            for h in g:
                if h == CTL:
                    self.ctl_gid = gi
                else:
                    self.gid[self.hidx[h]] = gi
        self.partitioned = True

    def heal_partition(self, p: Partition) -> None:
        self.partitioned = False
        self.gid = [0] * len(self.hosts)
        self.ctl_gid = 0

    def safety_violation(self, host: str, key, old, new) -> None:
        self.violations += 1
        if len(self.violation_examples) < 5:
            self.violation_examples.append({
                "at_ms": _ms(self.now), "host": host, "vlan": key[0], "mac": key[1],
                "held": [old.host, old.seq, old.tombstone], "applied": [new.host, new.seq, new.tombstone],
            })

    # ------------------------------------------------------------------ agreement

    def _start_settling(self) -> None:
        bound = liveness_bound_ms(self.agent_config, len(self.hosts), self.ctl_config)
        settle = self.cfg.settle_ms if self.cfg.settle_ms is not None else 2 * bound
        self.settle_deadline_ns = self.f1_ns + settle * NS_PER_MS
        self.dirty = True
        self._probe()

    def _probe(self) -> None:
        if self.agree_ns is not None or self.stopped:
            return
        # An op before its switchover may still change the inventory; one that is converging
        # already set it (it may wait for APPLIED reports a partition cut: tables agree anyway).
        if self.dirty and self.ctl_up and all(op.phase == "converging" for op in self.controller.ops.values()):
            self.dirty = False
            if self.agreement():
                self.agree_ns = max(self.f1_ns, self.last_change_ns)
                self.stop()
                return
        if self.now >= self.settle_deadline_ns:
            self.stop()
            return
        self.at(min(self.now + NS_PER_MS, self.settle_deadline_ns), self._probe)

    def agreement(self) -> bool:
        """Every running agent holds the controller's expected table (digests first, then in
        full), and every VM runs on exactly the host the inventory names."""
        running = [a for a in self.current if a is not None]
        if not running:
            return True
        d = running[0].core.table.digest
        if any(a.core.table.digest != d for a in running):
            return False
        if running[0].core.table.as_placement() != self.controller.inv.expected_table():
            return False
        return not self.misplaced_vms(running)

    def misplaced_vms(self, running: list[Agent]) -> list[dict]:
        """VMs not active on exactly one running host, the one the inventory names (a move cut
        short by a crash must end done or rolled back, never on two hosts or on none; a VM of
        a host that died must run again elsewhere). With no agent running, nothing can run."""
        if not running:
            return []
        active: dict[tuple[int, int], list[str]] = {}
        for a in running:
            for port in a.core.switch.ports.values():
                if port.state == "active":
                    active.setdefault((port.vlan, port.mac), []).append(a.host)
        bad = []
        for vm in sorted(self.controller.inv.vms.values(), key=lambda v: v.number):
            on = active.pop(vm.key, [])
            if vm.state == "active" and on != [vm.host]:
                bad.append({"vm": vm.name, "inventory": vm.host, "active_on": on})
            elif vm.state != "active" and on:
                bad.append({"vm": vm.name, "inventory": vm.state, "active_on": on})
        return bad

    # ------------------------------------------------------------------ results

    def final_checks(self) -> dict:
        """Every running agent's table against the controller's inventory. In full for every
        agent up to FULL_CHECK_ENTRIES entries in all; above that, in full once per distinct
        table digest (agents with equal digests, XOR of 64-bit blake2b hashes of every entry,
        port included, hold equal tables; the checked table's digest is recomputed first)."""
        expected = self.controller.inv.expected_table()
        running = [a for a in self.current if a is not None]
        full = sum(len(a.core.table) for a in running) <= FULL_CHECK_ENTRIES
        verdict: dict[int, dict | None] = {}  # digest -> None if equal, else the diff counts
        bad = []
        for a in running:
            table = a.core.table
            if full or table.digest not in verdict:
                actual = table.as_placement()
                if actual == expected and (full or _recomputed_digest(table) == table.digest):
                    verdict[table.digest] = None
                else:
                    verdict[table.digest] = {
                        "missing": sum(1 for k in expected if k not in actual),
                        "extra": sum(1 for k in actual if k not in expected),
                        "wrong": sum(1 for k in expected if k in actual and actual[k] != expected[k]),
                    }
            diff = verdict[table.digest]
            if diff is not None:
                bad.append({"host": a.host, **diff})
        bad_ports = self.misplaced_vms(running)
        ctl_live = set(self.controller.inv.live_hosts())
        not_live = [a.host for a in running if a.host not in ctl_live]
        agent_errors = sum(a.core.stats.handler_errors for a in running)
        last_errors = sorted({a.core.last_error for a in running if a.core.last_error})[:3]
        ctl = self.controller
        malformed = sum(a.core.stats.dropped_malformed for a in running) + ctl.dropped_malformed
        tables_ok = not bad
        ok = (tables_ok and not bad_ports and self.violations == 0 and agent_errors == 0
              and ctl.handler_errors == 0 and self.agree_ns is not None)
        return {
            "ok": ok,
            "tables_agree": tables_ok,
            "hosts_checked": len(running),
            "entries": len(expected),
            "mismatched_hosts": len(bad),
            "mismatch_examples": bad[:5],
            "vms_not_on_exactly_one_host": len(bad_ports),
            "vm_examples": bad_ports[:5],
            "running_but_dead_to_controller": not_live[:20],
            "safety_violations": self.violations,
            "safety_examples": self.violation_examples,
            "handler_errors": {"agents": agent_errors, "controller": ctl.handler_errors},
            "last_errors": last_errors + ([ctl.last_error] if ctl.last_error else []),
            "dropped_malformed": malformed,
        }

    def result(self) -> dict:
        from testbed.demo import summarize

        cfg = self.cfg
        client = self.client
        checks = self.final_checks()
        bound = liveness_bound_ms(self.agent_config, len(self.hosts), self.ctl_config)
        summary = summarize(client.records)
        k = max(1, len(client.records))
        msgs_moves = self.traffic_at_done[0] - self.traffic_at_f0[0]
        bytes_moves = self.traffic_at_done[1] - self.traffic_at_f0[1]
        after = None if self.agree_ns is None or self.f1_ns is None else _ms(self.agree_ns - self.f1_ns)
        expected = len(client.records) if cfg.workload == "evacuate" else cfg.moves
        moves_ok = (summary["converged"] + client.interrupted == summary["moves"] == expected
                    and client.error is None)
        if cfg.workload == "evacuate":
            # The host must end empty, in maintenance.
            moves_ok = moves_ok and client.evacuated and not any(
                vm.host == "h1" and vm.state == "active" for vm in self.controller.inv.vms.values())
        out = {
            "config": {
                "hosts": cfg.hosts, "vms": cfg.vms, "moves": cfg.moves, "seed": cfg.seed,
                "loss": cfg.net.loss, "dup": cfg.net.dup, "reorder": cfg.net.reorder,
                "partitions": [p.spec() for p in cfg.partitions],
                "crashes": [c.spec() for c in cfg.crashes],
                "move_rate": cfg.move_rate, "fault_ms": cfg.fault_ms,
                "concurrency": None if cfg.move_rate is not None else concurrency_for(cfg),
                "base_latency_us": cfg.net.base_latency_us, "jitter_mean_us": cfg.net.jitter_mean_us,
                "rx_tick_ns": cfg.net.rx_tick_ns,
                "gossip_interval_ms": gossip_interval_ms(self.agent_config, cfg.hosts),
                "heartbeat_budget_per_s": self.agent_config.heartbeat_budget_per_s,
            },
            "replay": replay_command(cfg),
            "ready_ms": None if client.ready_ns is None else _ms(client.ready_ns),
            "create": client.create_summary,
            "moves": {
                **summary,
                # In flight when the controller crashed: done or rolled back, as the final
                # checks (tables, one active port per VM) judge; not counted as failed.
                "interrupted": client.interrupted,
                "failed": [r for r in client.records if not r["converged"] and not r.get("interrupted")][:20],
            },
            "traffic": {
                "messages": self.msgs,
                "bytes": self.bytes,
                "messages_per_move": round(msgs_moves / k, 1),
                "bytes_per_move": round(bytes_moves / k, 1),
                "lost": self.lost,
                "duplicated": self.duplicated,
                "cut_by_partition": self.cut,
                "undeliverable": self.undeliverable,
                "by_type": {MSG_NAMES.get(t, str(t)): {"messages": c[0], "bytes": c[1]}
                            for t, c in sorted(self.by_type.items())},
            },
            "faults": {
                "start_ms": None if self.f0_ns is None else _ms(self.f0_ns),
                "stop_ms": None if self.f1_ns is None else _ms(self.f1_ns),
                "crashes": self.crash_log,
            },
            "agreement": {
                "reached": self.agree_ns is not None,
                "at_ms": None if self.agree_ns is None else _ms(self.agree_ns),
                "after_faults_ms": after,
                "bound_ms": bound,
                "within_bound": after is not None and after <= bound,
            },
            "checks": checks,
            "error": client.error,
            "client_warnings": client.warnings,
            "end_ms": _ms(self.now),
            "events": self.events,
            "ok": bool(moves_ok and checks["ok"]),
        }
        if cfg.workload != "moves":  # (only then: every other run's output stays as it was)
            out["config"]["workload"] = cfg.workload
            out["evacuate"] = {"host": "h1", "answered": client.evacuated, "max_concurrent": concurrency_for(cfg),
                               "elapsed_ms": client.evac_elapsed_ms,
                               "vms_left": sum(1 for vm in self.controller.inv.vms.values()
                                               if vm.host == "h1" and vm.state == "active")}
        return out


class Client:
    """The workload driver: talks to the controller with REQUEST frames, like testbed/client.py."""

    def __init__(self, sim: Simulator) -> None:
        self.sim = sim
        self.req_ids = 0
        self.pending: dict[int, tuple] = {}  # req id -> (kind, context)
        self.ready_ns: int | None = None
        self.create_summary: dict | None = None
        self.records: list[dict] = []
        self.error: str | None = None
        self.warnings: list[str] = []
        cfg = sim.cfg
        self.names = [f"vm{i}" for i in range(1, cfg.vms + 1)]
        self.placement = {f"vm{i}": sim.hosts[(i - 1) % cfg.hosts] for i in range(1, cfg.vms + 1)}
        self.inflight: set[str] = set()
        self.sent_moves = 0
        self.paused = False  # the controller crashed: moves wait until it is back and ready
        self.deferred = 0  # moves to start once it is
        self.interrupted = 0  # moves in flight when the controller crashed
        self._reready_deadline = 0  # after a controller restart: resume moves by then at the latest
        self.evacuated = False  # --workload evacuate: the controller answered that h1 is empty
        self.evac_elapsed_ms: float | None = None
        self._evac_again = False  # the controller crashed while we waited: ask the new one

    def controller_crashed(self) -> None:
        """Requests in flight die with the controller: a move's outcome (done or rolled back)
        is judged by the final checks, not by a reply."""
        self.paused = True
        for _req_id, (kind, ctx) in sorted(self.pending.items()):
            if kind == "move":
                name, src, dst = ctx
                self.inflight.discard(name)
                self.interrupted += 1
                self.sim.at(self.sim.now, self._record, {
                    "vm": name, "src": src, "dst": dst, "seq": None, "converged": False, "latency_ms": None,
                    "interrupted": True, "error": "the controller crashed with the move in flight"})
            elif kind == "evacuate":
                self._evac_again = True
        self.pending.clear()

    def controller_restarted(self) -> None:
        """Moves resume once the new controller knows every running agent again (they
        re-register at their next status report), or after its dead timeout at the latest."""
        sim = self.sim
        ctl = sim.ctl_config
        self._reready_deadline = sim.now + (ctl.dead_after_ms + 2 * ctl.tick_interval_ms) * NS_PER_MS
        sim.at(sim.now + NS_PER_MS, self._poll_reready)

    def _poll_reready(self) -> None:
        sim = self.sim
        if not sim.ctl_up or not self.paused:
            return
        hosts = sim.controller.inv.hosts
        known = all((h := hosts.get(a.host)) is not None and h.incarnation == a.core.incarnation
                    for a in sim.current if a is not None)
        if not known and sim.now < self._reready_deadline:
            sim.at(sim.now + NS_PER_MS, self._poll_reready)
            return
        self.paused = False
        if self._evac_again:
            self._evac_again = False
            self._evacuate()
        n, self.deferred = self.deferred, 0
        for _ in range(n):
            self._next_move()

    def call(self, method: str, args: dict, kind: str, ctx=None, timeout_ms: int | None = None) -> None:
        sim = self.sim
        self.req_ids += 1
        self.pending[self.req_ids] = (kind, ctx)
        sim.client_send(wire.encode(MsgType.REQUEST, [self.req_ids, method, args]), sim.now)
        if timeout_ms is None:
            # As testbed/client.py: give up on an answer that does not come (the run would
            # otherwise tick on forever). Ops end by the controller's op timeout long before.
            timeout_ms = 3 * sim.ctl_config.op_timeout_ms + 10_000
        sim.at(sim.now + timeout_ms * NS_PER_MS, self._timeout, self.req_ids, method, timeout_ms)

    def _timeout(self, req_id: int, method: str, timeout_ms: int) -> None:
        if req_id in self.pending:
            self.fail(f"the controller did not answer {method!r} within {timeout_ms} virtual ms")

    def begin(self) -> None:
        cfg = self.sim.cfg
        self.call("wait_ready", {"hosts": cfg.hosts, "timeout_ms": cfg.ready_timeout_ms}, "ready",
                  timeout_ms=cfg.ready_timeout_ms + 2_000)

    def on_frames(self, frames: list[bytes], t: int) -> None:
        for frame in frames:
            if len(frame) > wire.MAX_FRAME_BYTES and len(self.warnings) < 5:
                # testbed/client.py would drop this reply (wire.decode's size bound) and time out;
                # the simulated client reads it anyway so the run can go on, and says so.
                self.warnings.append(f"a reply of {len(frame):,} bytes exceeds wire.MAX_FRAME_BYTES "
                                     f"({wire.MAX_FRAME_BYTES:,}); a real client drops it")
            try:
                mt, body = wire.decode(frame, max(len(frame), wire.MAX_FRAME_BYTES))
            except WireError:
                continue
            if mt is not MsgType.REPLY:
                continue
            req_id, ok, result = body
            kind, ctx = self.pending.pop(req_id, (None, None))
            if kind == "ready":
                self._on_ready(ok, result)
            elif kind == "create":
                self._on_create(ok, result)
            elif kind == "move":
                self._on_move(ctx, ok, result)
            elif kind == "evacuate":
                self._on_evacuate(ok, result)

    def fail(self, msg: str) -> None:
        self.error = msg
        self.sim.stop()

    def _on_ready(self, ok: bool, result) -> None:
        if not ok:
            self.fail(f"cluster not ready: {result}")
            return
        self.ready_ns = self.sim.now
        self.sim.on_phase("ready", self.sim.now)
        cfg = self.sim.cfg
        if cfg.vms:
            specs = [[name, self.placement[name], "default"] for name in self.names]
            self.call("vm_create", {"vms": specs}, "create")
        else:
            self.create_summary = {"vms": 0, "converged": 0}
            self._start_moves()

    def _on_create(self, ok: bool, result) -> None:
        from testbed.demo import summarize

        if not ok:
            self.fail(f"vm_create failed: {result}")
            return
        ops = result["ops"]
        s = summarize(ops)
        self.create_summary = {"vms": s["moves"], "converged": s["converged"],
                               "latency_ms_p50": s["latency_ms_p50"], "latency_ms_p99": s["latency_ms_p99"],
                               "latency_ms_max": s["latency_ms_max"]}
        self._start_moves()

    def _start_moves(self) -> None:
        sim = self.sim
        sim.on_phase("created", sim.now)
        sim.open_fault_window()
        cfg = sim.cfg
        if cfg.workload == "evacuate":
            self._evacuate()
        elif cfg.moves == 0:
            sim.moves_finished()
        elif cfg.move_rate is None:
            for _ in range(min(cfg.moves, concurrency_for(cfg))):
                self._next_move()
        else:
            gap = 1e9 / cfg.move_rate
            for i in range(cfg.moves):
                sim.at(sim.now + int(i * gap), self._next_move)

    def _host_up(self, host: str) -> bool:
        return self.sim.current[self.sim.hidx[host]] is not None

    def _next_move(self) -> None:
        """Pick a VM that is active (no op in flight) on a running host, and a running destination.

        Placement comes from the controller's inventory, read directly (what `dvs vm list` would
        answer, without a round trip per move): HA may have moved VMs behind the client's back.
        """
        if self.paused:
            self.deferred += 1
            return
        sim = self.sim
        rng = sim.work_rng
        inv = sim.controller.inv
        busy = sim.controller.ops_by_key
        self.sent_moves += 1
        up = [h for h in sim.hosts if self._host_up(h)]
        for _ in range(64):
            name = self.names[rng.randrange(len(self.names))]
            vm = inv.vms.get(name)
            if vm is None or vm.state != "active" or vm.key in busy or name in self.inflight:
                continue
            src = vm.host
            if not self._host_up(src):
                continue
            choices = [h for h in up if h != src]
            if not choices:
                break
            dst = choices[rng.randrange(len(choices))]
            self.inflight.add(name)
            # (per-host apply times: not needed here, 1,000 of them per reply at 1,000 hosts)
            self.call("vm_move", {"name": name, "to": dst, "per_host": False}, "move", (name, src, dst))
            return
        # Nothing movable right now (every candidate busy or down): counted as a failed move.
        sim.at(sim.now, self._record, {"vm": "-", "src": "-", "dst": "-", "seq": None, "converged": False,
                                       "latency_ms": None, "error": "no movable VM (all busy or on down hosts)"})

    def _evacuate(self) -> None:
        # The controller drains h1 itself; its answer lists every move (and HA restart) off it.
        self.call("host_evacuate", {"name": "h1", "max_concurrent": concurrency_for(self.sim.cfg),
                                    "timeout_ms": 600_000}, "evacuate", timeout_ms=610_000)

    def _on_evacuate(self, ok: bool, result) -> None:
        if not ok:
            self.fail(f"host_evacuate failed: {result}")
            return
        self.evacuated = True
        self.evac_elapsed_ms = round(result["elapsed_ms"], 3)
        for m in result["moves"]:
            rec = {k: m[k] for k in ("vm", "src", "dst", "seq", "converged", "latency_ms")}
            if m.get("error"):
                rec["error"] = m["error"]
            self.records.append(rec)
        self.sim.moves_finished()

    def _on_move(self, ctx, ok: bool, result) -> None:
        name, src, dst = ctx
        self.inflight.discard(name)
        if ok:
            rec = {k: result[k] for k in ("vm", "src", "dst", "seq", "converged", "latency_ms")}
            if result.get("error"):
                rec["error"] = result["error"]
        else:
            rec = {"vm": name, "src": src, "dst": dst, "seq": None, "converged": False, "latency_ms": None,
                   "error": str(result)}
        self._record(rec)

    def _record(self, rec: dict) -> None:
        self.records.append(rec)
        cfg = self.sim.cfg
        if len(self.records) == cfg.moves:
            self.sim.moves_finished()
        elif cfg.move_rate is None and self.sent_moves < cfg.moves:
            self._next_move()


def _recomputed_digest(table: MacTable) -> int:
    d = 0
    for (vlan, mac), e in table.items():
        d ^= entry_hash(vlan, mac, e)
    return d


def _ms(ns: int) -> float:
    return round(ns / NS_PER_MS, 3)


def replay_command(cfg: SimConfig) -> str:
    """The `dvs sim` command line that replays this run."""
    parts = ["dvs sim", f"--hosts {cfg.hosts}", f"--vms {cfg.vms}", f"--moves {cfg.moves}"]
    net = cfg.net
    if net.loss:
        parts.append(f"--loss {net.loss!r}")
    if net.dup:
        parts.append(f"--dup {net.dup!r}")
    if net.reorder:
        parts.append("--reorder")
    if cfg.partitions:
        parts.append("--partitions '" + ";".join(p.spec() for p in cfg.partitions) + "'")
    if cfg.crashes:
        parts.append("--crashes '" + ",".join(c.spec() for c in cfg.crashes) + "'")
    if cfg.move_rate is not None:
        parts.append(f"--move-rate {cfg.move_rate!r}")
    if cfg.concurrency is not None:
        parts.append(f"--concurrency {cfg.concurrency}")
    if cfg.fault_ms is not None:
        parts.append(f"--fault-ms {cfg.fault_ms}")
    if cfg.gossip_interval_ms is not None:
        parts.append(f"--gossip-interval-ms {cfg.gossip_interval_ms}")
    if net.base_latency_us != NetConfig.base_latency_us:
        parts.append(f"--latency-us {net.base_latency_us}")
    if net.jitter_mean_us != NetConfig.jitter_mean_us:
        parts.append(f"--jitter-us {net.jitter_mean_us}")
    if net.ctl_faults:
        parts.append("--ctl-faults")
    if cfg.workload != "moves":
        parts.append(f"--workload {cfg.workload}")
    parts.append(f"--seed {cfg.seed}")
    return " ".join(parts)


def run_sim(cfg: SimConfig, on_phase=None) -> dict:
    """Run one simulation; the result is a JSON-ready dict (no wall-clock values in it)."""
    return Simulator(cfg, on_phase).run()
