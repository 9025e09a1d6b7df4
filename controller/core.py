"""The controller's protocol core: inventory, VM create/move/delete, convergence tracking.

No I/O and no clock: drivers feed `on_frame(envelope, frame, now_ns)` and `on_timer(now_ns)`
and take `outbox`, a list of `(envelope, payload)` to send on the controller's ROUTER socket.

A VM operation is converged when every live agent has reported applying the target
`(host, seq)` for the VM's `(vlan, mac)`. Its latency is the last agent's apply time minus
the switchover time, both `CLOCK_MONOTONIC` stamps taken by the agents themselves.

Durability: every change of a VM is also appended to `journal_out` (one dict per change; the
latest record of a VM wins). The runtime writes it to disk with fsync before acting on the
outbox; a restarted controller replays it, then reconciles with the tables agents report:
the highest `(seq, host)` wins, as everywhere else.
"""

from __future__ import annotations

import heapq
import re
from collections import deque
from dataclasses import dataclass, field

from agent import wire
from agent.wire import MsgType, WireError
from controller import balance
from controller.applytrack import ApplyTracker
from controller.config import ControllerConfig
from controller.inventory import RULE_KINDS, Host, Inventory, Rule, Vm
from controller.ops import CLAIM_MAY_BE_OUT, FIRST_PHASE, Op, Outcome, Phase, is_commanding, next_phase

NS_PER_MS = 1_000_000
# Repair hint frames sent per controller tick at most: a backlog of thousands of converging
# ops (a cold start) must not turn into hundreds of thousands of hints at once.
HINTS_PER_TICK_MAX = 2_000
# A busy host (its apply reports keep arriving) is spared hints for this many hint delays.
BUSY_GRACE = 4
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
# wait_ready requests pending at once, at most: each holds a client envelope until its deadline,
# and 20,000 abandoned ones must cost neither memory nor a scan per status message.
READY_WAITERS_MAX = 1_024
READY_TIMEOUT_MS_MAX = 600_000
# Refused REGISTER envelopes remembered (not asked to register again), at most.
REFUSED_MAX = 1_024
# Events (one line each, for the runtime's log) held until the driver takes them, at most.
EVENTS_MAX = 1_000
# Restarts waiting for registrations to pause wait this many placement_settle_ms at most.
SETTLE_WINDOWS_MAX = 5
# Error text of a request that may succeed if sent again shortly: `dvs vm move` retries it.
RETRY_PREFIX = "retry: "
# An agent's refusal of a claim: "stale: table holds seq S on H".
STALE_RE = re.compile(r"^stale: table holds seq (\d+) on ")
# A refusal's seq is taken over only below this: a seq near 2^64 would leave no room above it.
SEQ_JUMP_MAX = 1 << 48
# Evacuations waiting for their host to empty, at most (each holds a client envelope).
EVAC_WAITERS_MAX = 64
EVAC_TIMEOUT_MS_MAX = 3_600_000
# Moves one evacuation or rebalance runs at once: default, and the most a client may ask for.
MAX_CONCURRENT_DEFAULT = 4
MAX_CONCURRENT_MAX = 64
RULES_MAX = 10_000
RULE_VMS_MAX = 64


class ApiError(Exception):
    """A client asked for something impossible: the message says what and what to do."""


@dataclass
class Batch:
    """A client request waiting for one or more ops to finish."""

    envelope: list
    req_id: int
    pending: set[int]
    ops: list[Op]
    single: bool
    per_host: bool  # records carry each host's apply time (only for a single op: MBs otherwise)


@dataclass
class EvacWaiter:
    """A `host_evacuate` request: answered once its host holds no VM and no move off it runs."""

    envelope: list
    req_id: int
    host: str
    started_ns: int
    deadline_ns: int
    ops: list = field(default_factory=list)  # moves and HA restarts off the host finished since


@dataclass
class Job:
    """A rebalance being run: planned moves started at most `max_concurrent` at once."""

    envelope: list
    req_id: int
    queue: deque
    max_concurrent: int
    result: dict
    running: set[int] = field(default_factory=set)
    ops: list = field(default_factory=list)
    skipped: list = field(default_factory=list)


@dataclass
class ReadyWaiter:
    envelope: list
    req_id: int
    hosts: int
    deadline_ns: int
    done: bool = False  # answered: still in the other index until popped there (lazy deletion)


class ControllerCore:
    def __init__(self, config: ControllerConfig | None = None, journal: list[dict] | None = None,
                 hosts: list[str] | None = None) -> None:
        """`hosts`: the host names admitted besides those the journal admitted. None admits any
        name that registers (the simulator and unit tests, whose every host is their own); a
        list (the controller process, even an empty one) admits only those, the journal's and
        those `host_add` admits later."""
        self.config = config or ControllerConfig()
        self.inv = Inventory()
        self.journal_out: list[dict] = []
        for record in journal or []:
            self.inv.apply_record(record)
        self.admitted: set[str] | None = None
        if hosts is not None:
            self.admitted = set(self.inv.admitted)
            if not self.admitted:
                # A journal of the version before admission: the hosts it names were members.
                self.admitted = set(self.inv.incarnations) | {vm.host for vm in self.inv.vms.values()}
            for name in [*sorted(self.admitted - self.inv.admitted, key=_host_order), *hosts]:
                self._admit(name)
        self.refused_registrations = 0
        self._refused: dict[bytes, None] = {}  # envelopes refused lately (bounded, oldest first)
        self.events: list[str] = []
        self.events_dropped = 0
        self.restart_budget_exhausted = 0
        self._restart_times: dict[str, deque[int]] = {}  # VM -> its recent restart times (ns)
        self._parked: set[str] = set()  # VMs whose restart budget ran out (their event is out)
        self._last_register_ns = -(1 << 62)
        self._burst_start_ns = -(1 << 62)
        self.outbox: list[tuple[list, bytes]] = []
        self.ops: dict[int, Op] = {}  # in flight, by op id
        self.ops_by_key: dict[tuple[int, int], Op] = {}
        self._unacked: dict[int, Op] = {}  # ops whose current command awaits its ack, by op id
        # Finished moves and HA restarts, oldest first; bounded so a long run cannot grow it forever.
        # (Ops, made into records when asked for: a record of a move at 1,000 hosts holds 1,000
        # apply times, and most are never read.)
        self.history: deque[Op] = deque(maxlen=self.config.history_max)
        # VMs that need a restart we could not do yet (no live host, or the target refused),
        # by name -> earliest retry time (ns). Retried from on_timer.
        self._pending_restarts: dict[str, int] = {}
        self._needs_claim: dict[str, bool] = {}  # deferred restarts that must re-claim even on a live host
        for vm in self.inv.vms.values():
            if vm.state == "lost":
                # Journaled when its host restarted under it; we crashed before it ran again.
                vm.state = "active"
                self._needs_claim[vm.name] = True
                self._pending_restarts[vm.name] = 0
        # Who applied what (and the log of every apply, for checkers).
        self.applies = ApplyTracker(self.inv.hosts, self.config.applied_log_max)
        self.applied_log = self.applies.applied_log
        self._routes: dict[bytes, str] = {}  # first envelope frame -> host
        self._next_op = 1
        # Pending wait_ready requests, indexed twice (heaps with lazy deletion): by the host count
        # they wait for (the smallest is the first to be satisfied) and by deadline.
        self._ready_by_hosts: list[tuple[int, int, ReadyWaiter]] = []
        self._ready_by_deadline: list[tuple[int, int, ReadyWaiter]] = []
        self._ready_n = 0  # pending (not done) waiters
        self._ready_seq = 0
        self.dropped_malformed = 0
        self.handler_errors = 0
        self.last_error = ""
        self._tick_ns = self.config.tick_interval_ms * NS_PER_MS
        self._started_ns: int | None = None
        self._live_n = 0  # hosts not dead, kept current by _recount_live()
        self._live: frozenset[str] = frozenset()  # their names
        self._rank: dict[str, int] = {}  # host name -> its place in registration order
        # Membership epoch: bumped on every change; PEERS carries it and agents report it back.
        self.peers_epoch = 0
        self._peers_dirty = False
        self._peers_last_ns: int | None = None  # last broadcast
        self._peers_batch_ns = self.config.peers_batch_ms * NS_PER_MS
        self._refresh_ns = self.config.peers_refresh_ms * NS_PER_MS
        self._hint_ns = self.config.repair_hint_after_ms * NS_PER_MS
        self.repair_hints = 0
        self._last_applied_ns: dict[str, int] = {}  # host -> when its last apply report arrived
        self._late_report_ns = -(1 << 62)  # when we last read an apply report late (see _hint_repairs)
        self._orphans_checked = False
        self._next_tick_ns = 0
        # Maintenance and rebalance. A host in maintenance is drained by the controller itself
        # (from on_timer, and whenever one of its moves ends), so a drain cut by our restart goes
        # on from the journal; clients only wait for it.
        self._evac_waiters: list[EvacWaiter] = []
        self._drain_ops: dict[int, str] = {}  # op id -> the maintenance host it moves a VM off
        self._drain_retry_ns: dict[str, int] = {}  # VM -> earliest next try after a failed move
        self._drain_blocked: dict[str, str] = {}  # maintenance host -> why a VM cannot leave it
        self._jobs: list[Job] = []
        self._job_of: dict[int, Job] = {}  # op id -> the rebalance running it
        self._kick = False  # a drain or rebalance op ended: start the next ones
        self._unplaceable_noted: set[str] = set()  # VMs whose "cannot restart" event is out

    # ------------------------------------------------------------------ driver API

    def take_outbox(self) -> list[tuple[list, bytes]]:
        out, self.outbox = self.outbox, []
        return out

    def take_journal(self) -> list[dict]:
        out, self.journal_out = self.journal_out, []
        return out

    def take_events(self) -> list[str]:
        """Lines for the operator's log (a refused host, a VM out of restart budget)."""
        out, self.events = self.events, []
        return out

    def _event(self, text: str) -> None:
        if len(self.events) >= EVENTS_MAX:
            self.events_dropped += 1
            return
        self.events.append(text)

    def _admit(self, name: str) -> bool:
        """Admit `name` (durably); False if it already was."""
        if self.admitted is None or (name in self.admitted and name in self.inv.admitted):
            return False
        self.admitted.add(name)
        self.inv.admitted.add(name)
        self.journal_out.append({"admit": name})
        return True

    def is_admitted(self, name: str) -> bool:
        return self.admitted is None or name in self.admitted

    def _persist(self, vm: Vm) -> None:
        self.journal_out.append(self.inv.to_record(vm))

    def next_deadline_ns(self) -> int:
        if self._peers_dirty and self._peers_last_ns is not None:
            return min(self._next_tick_ns, self._peers_last_ns + self._peers_batch_ns)
        return self._next_tick_ns

    def on_frame(self, envelope: list, frame: bytes, now_ns: int) -> None:
        try:
            mt, body = wire.decode(frame, wire.MAX_SMALL_FRAME_BYTES)
        except WireError:
            self.dropped_malformed += 1
            return
        try:
            self._dispatch(envelope, mt, body, now_ns)
            if self._kick:
                self._run_jobs(now_ns)
        except Exception as e:  # noqa: BLE001 - a bug of ours must not kill the controller
            self.handler_errors += 1
            self.last_error = f"{mt.name}: {type(e).__name__}: {e}"[:300]

    def _dispatch(self, envelope: list, mt: MsgType, body: list, now_ns: int) -> None:
        host = self._routes.get(envelope[0]) if envelope else None
        if mt is MsgType.REQUEST:
            self._on_request(envelope, body, now_ns)
        elif mt is MsgType.REGISTER:
            self._on_register(envelope, body, now_ns)
        elif mt is MsgType.APPLY_REPORT and host is not None and host in self.inv.hosts:
            self._on_apply_report(host, body[1], body[2], now_ns)  # (first: most of what agents send)
        elif host is None or host not in self.inv.hosts:
            if envelope and envelope[0] in self._refused:
                self.dropped_malformed += 1  # a host we refused: no invitation to register again
            elif mt in (MsgType.AGENT_STATUS, MsgType.APPLIED, MsgType.APPLY_REPORT, MsgType.ACK,
                        MsgType.TABLE_REPORT):
                # An agent we do not know (we restarted, or it did): ask it to register again.
                self.outbox.append((envelope, wire.encode(MsgType.REQUEST, [0, "register", {}])))
            else:
                self.dropped_malformed += 1
        elif mt is MsgType.AGENT_STATUS:
            self._on_status(host, body, now_ns)
        elif mt is MsgType.APPLIED:
            self._report_arrived(host, body[1][0][5] if body[1] else now_ns, now_ns)
            self._on_applied(host, body[1], now_ns)
        elif mt is MsgType.TABLE_REPORT:
            self._seen(host, now_ns)
            for vlan, mac, ehost, _port, seq, tomb in body[1]:
                self._adopt((vlan, mac), ehost, seq, tomb, now_ns)
        elif mt is MsgType.ACK:
            self._seen(host, now_ns)
            self._on_ack(host, body, now_ns)
        elif mt is MsgType.REPLY:
            self._seen(host, now_ns)
        else:
            self.dropped_malformed += 1

    def on_timer(self, now_ns: int) -> None:
        if self._peers_dirty:
            self._broadcast_peers(now_ns)
        if now_ns < self._next_tick_ns:
            return
        if self._started_ns is None:
            self._started_ns = now_ns
        self._next_tick_ns = now_ns + self._tick_ns
        self._check_liveness(now_ns)
        if self._pending_restarts:
            self._retry_restarts(now_ns)
        if self._hint_ns:
            self._hint_repairs(now_ns)
        if not self._orphans_checked and now_ns - self._started_ns > self.config.dead_after_ms * NS_PER_MS:
            self._orphans_checked = True
            self._restart_orphans(now_ns)
        # Ops are kept in start order, and every op's deadline is its start + op_timeout_ms: the
        # expired ones are a prefix (no scan of thousands of ops every tick).
        expired = []
        for op in self.ops.values():
            if now_ns < op.deadline_ns:
                break
            expired.append(op)
        for op in expired:
            self._finish(op, now_ns, timed_out=True)
        max_retry_ns = self.config.command_retry_max_ms * NS_PER_MS
        for op in self._unacked.values():
            if op.command is not None and now_ns - op.command_sent_ns >= op.command_retry_ns:
                host, frame = op.command
                if self.inv.hosts[host].state != "dead":
                    op.command_sent_ns = now_ns
                    op.command_retry_ns = min(2 * op.command_retry_ns, max_retry_ns)
                    self.outbox.append((self.inv.hosts[host].route, frame))
        if self._kick or self.inv.maintenance or self._evac_waiters:
            self._run_jobs(now_ns)
        self._check_ready(now_ns)

    # ------------------------------------------------------------------ agents

    def _on_register(self, envelope: list, body: list, now_ns: int) -> None:
        name, incarnation, pub, rpc, pid = body
        if not self.is_admitted(name):
            # Registration is no way in: an admin admits a host (`dvs host add`, `--hosts` at
            # start). Refused, counted, told why; its later messages are dropped, not invited.
            self.refused_registrations += 1
            if envelope:
                if len(self._refused) >= REFUSED_MAX:
                    del self._refused[next(iter(self._refused))]
                self._refused[envelope[0]] = None
                if self.refused_registrations <= 10 or self.refused_registrations % 1000 == 0:
                    self._event(f"refused REGISTER from {name!r}: not an admitted host "
                                f"({self.refused_registrations} refused so far)")
            self.outbox.append((envelope, wire.encode(MsgType.REPLY, [0, False, (
                f"host {name!r} is not admitted; an admin adds it with `dvs host add {name}`")[:200]])))
            return
        self._refused.pop(envelope[0] if envelope else b"", None)
        if now_ns - self._last_register_ns >= self._settle_ns():
            self._burst_start_ns = now_ns  # the first of a run of registrations
        self._last_register_ns = now_ns
        old = self.inv.hosts.get(name)
        prev = old.incarnation if old is not None else self.inv.incarnations.get(name)
        if prev is not None and incarnation < prev:
            return  # a stale message from an earlier life of that host
        if prev != incarnation:
            self.inv.incarnations[name] = incarnation
            self.journal_out.append({"host_incarnation": name, "incarnation": incarnation})
        if old is not None:
            self._routes.pop(old.route[0], None)
        self.inv.hosts[name] = Host(name, incarnation, pub, rpc, pid, envelope, last_seen_ns=now_ns,
                                    registered_ns=now_ns)
        self._routes[envelope[0]] = name
        self._recount_live()
        self._membership_changed(now_ns)
        if prev is not None and incarnation > prev:
            # The host's agent restarted (maybe while we were down: the journal knows its last
            # incarnation): the VMs it ran died with it. Start them again there
            # (with a new seq, so the new ports win over anything stale).
            for vm in sorted(self.inv.vms.values(), key=lambda v: v.number):
                if vm.host != name or vm.state not in ("active", "moving", "creating"):
                    continue
                if vm.state == "creating" and vm.key not in self.ops_by_key:
                    # A create our crash cut short (journaled, never acked): its port died with
                    # the old process, if it was made at all. Finish it: start it with a new seq.
                    vm.state = "active"
                # Durably: should we crash before it runs again, the next controller must
                # restart it (the journal already knows the host's new incarnation).
                self.journal_out.append({**self.inv.to_record(vm), "state": "lost"})
                op = self.ops_by_key.get(vm.key)
                if op is not None:
                    if op.target[0] != name:
                        # Moving away from the restarted host: that move carries on; if it
                        # fails, the VM must start again (it is no longer on the source).
                        op.src_lost = True
                        continue
                    # It had just taken the VM over; the claim died with the old process.
                    op.end(Outcome.TARGET_RESTARTED, f"{name} restarted while taking over {vm.name}")
                    self._finish(op, now_ns)
                if vm.key not in self.ops_by_key:
                    self._restart(vm, now_ns, prefer=name)
        self._check_ready(now_ns)

    def _membership_changed(self, now_ns: int) -> None:
        self.peers_epoch += 1
        self._peers_dirty = True
        if self._peers_last_ns is None or now_ns - self._peers_last_ns >= self._peers_batch_ns:
            self._broadcast_peers(now_ns)
        # else: on_timer sends it when the batch window ends (next_deadline_ns says when)

    def _peers_frame(self) -> bytes:
        members = [[h.name, h.incarnation, h.pub_endpoint, h.rpc_endpoint]
                   for h in self.inv.hosts.values() if h.state != "dead"]
        return wire.encode(MsgType.PEERS, [members, self.peers_epoch])

    def _broadcast_peers(self, now_ns: int) -> None:
        if self._peers_last_ns is not None and now_ns - self._peers_last_ns < self._peers_batch_ns:
            return
        self._peers_dirty = False
        self._peers_last_ns = now_ns
        frame = self._peers_frame()
        for h in self.inv.hosts.values():
            if h.state != "dead":
                h.peers_sent_ns = now_ns
                self.outbox.append((h.route, frame))

    def _seen(self, host: str, now_ns: int) -> None:
        h = self.inv.hosts[host]
        h.last_seen_ns = now_ns
        if h.state == "suspect":
            h.state = "alive"
        elif h.state == "dead":
            # It was only paused (SIGSTOP) or cut off: readmit it. Its VMs were restarted
            # elsewhere with higher seqs, so its stale ports lose under the merge rule.
            h.state = "alive"
            self._recount_live()
            self._membership_changed(now_ns)

    def _on_status(self, host: str, body: list, now_ns: int) -> None:
        _, incarnation, peers_heard, entries, digest, dropped, epoch = body
        h = self.inv.hosts[host]
        if incarnation != h.incarnation:
            return
        self._seen(host, now_ns)
        h.peers_heard, h.mac_entries, h.digest, h.dropped_malformed = peers_heard, entries, digest, dropped
        if epoch != self.peers_epoch and not self._peers_dirty and now_ns - h.peers_sent_ns >= self._refresh_ns:
            # It missed a membership change (a PEERS lost on a faulty control link): send it
            # again, to this agent only.
            h.peers_sent_ns = now_ns
            self.outbox.append((h.route, self._peers_frame()))
        if self._ready_n:
            self._check_ready(now_ns, h)

    def _check_liveness(self, now_ns: int) -> None:
        suspect_ns = self.config.suspect_after_ms * NS_PER_MS
        dead_ns = self.config.dead_after_ms * NS_PER_MS
        died = []
        for h in self.inv.hosts.values():
            silent = now_ns - h.last_seen_ns
            if h.state != "dead" and silent > dead_ns:
                h.state = "dead"
                died.append(h.name)
            elif h.state == "alive" and silent > suspect_ns:
                h.state = "suspect"
        if not died:
            return
        self._recount_live()
        self._membership_changed(now_ns)
        for op in list(self.ops.values()):
            if is_commanding(op.phase) and op.target[0] in died:
                op.end(Outcome.TARGET_DIED, f"{op.target[0]} died before it took over {op.vm}")
                self._finish(op, now_ns)
            else:
                self._check_converged(op, now_ns)
        # HA: every VM of a dead host starts again on a live one, with a new seq; one placement
        # decision per VM, each counting those made before it in this round.
        load = self._placement_load() if any(vm.host in died for vm in self.inv.vms.values()) else None
        for vm in sorted(self.inv.vms.values(), key=lambda v: v.number):
            if vm.host in died and vm.state == "active" and vm.key not in self.ops_by_key:
                self._restart(vm, now_ns, load=load)

    def _live_count(self) -> int:
        return self._live_n

    def _recount_live(self) -> None:
        self._live = frozenset(h.name for h in self.inv.hosts.values() if h.state != "dead")
        self._live_n = len(self._live)
        self.applies.set_live(self._live)
        self._rank = {name: i for i, name in enumerate(self.inv.hosts)}  # registration order

    def _defer_restart(self, vm: Vm, now_ns: int) -> None:
        self._pending_restarts[vm.name] = now_ns + self.config.command_retry_ms * NS_PER_MS

    def _retry_restarts(self, now_ns: int) -> None:
        due = [n for n, t in self._pending_restarts.items() if now_ns >= t]
        if not due:
            return
        # Hosts still registering (every agent restarting after a full outage): a VM whose host
        # is not up may yet see it come back and go home. Place the others once registrations
        # have been quiet for a while, so they spread over every host that came back.
        # (For SETTLE_WINDOWS_MAX windows at most: hosts that keep registering must not starve them.)
        settling = (now_ns - self._last_register_ns < self._settle_ns()
                    and now_ns - self._burst_start_ns < SETTLE_WINDOWS_MAX * self._settle_ns())
        load = None
        for name in sorted(due, key=lambda n: self.inv.vms[n].number if n in self.inv.vms else 0):
            vm = self.inv.vms.get(name)
            h = self.inv.hosts.get(vm.host) if vm is not None else None
            if vm is not None and settling and (h is None or h.state == "dead") and self.is_admitted(vm.host):
                continue  # stays pending: retried at a later tick
            del self._pending_restarts[name]
            if vm is None or vm.state != "active" or vm.key in self.ops_by_key:
                continue
            if h is None or h.state != "alive" or self._needs_claim.pop(name, False):
                if load is None:
                    load = self._placement_load()
                self._restart(vm, now_ns, prefer=vm.host, load=load)

    def _settle_ns(self) -> int:
        return self.config.placement_settle_ms * NS_PER_MS

    def _restart_orphans(self, now_ns: int) -> None:
        """After a restart of ours: VMs on hosts that never registered again within the dead
        timeout are as good as on a dead host (HA)."""
        load = self._placement_load()
        for vm in sorted(self.inv.vms.values(), key=lambda v: v.number):
            if vm.key in self.ops_by_key:
                continue
            if vm.state == "creating":
                # Cut short by our crash, and no agent reported holding it: finish the create on
                # its host if that is up (ATTACH is idempotent), else start it elsewhere.
                h = self.inv.hosts.get(vm.host)
                if h is not None and h.state == "alive":
                    self._start_op("create", vm, vm.host, vm.host, (vm.host, vm.seq, False), now_ns)
                    continue
                vm.state = "active"
            if vm.state == "active" and vm.host not in self.inv.hosts:
                self._restart(vm, now_ns, load=load)

    def _placement_load(self) -> dict[str, int]:
        """VMs per host, counting each VM where it is going when an op is taking it there."""
        load: dict[str, int] = {}
        ops_by_key = self.ops_by_key
        for vm in self.inv.vms.values():
            if vm.state in ("active", "moving", "creating"):
                op = ops_by_key.get(vm.key)
                host = op.target[0] if op is not None and op.kind != "delete" else vm.host
                load[host] = load.get(host, 0) + 1
        return load

    def _place(self, load: dict[str, int] | None, prefer: str | None = None, vm: str | None = None,
               extra: dict[str, str] | None = None) -> str | None:
        """The one placement scorer (create, HA restart, evacuate, rebalance): `prefer` if it may
        take `vm`, else the host that may with the fewest VMs (ties: by host name, h2 before h10).
        A host may take a VM when it is alive, not in maintenance, and the VM's placement rules
        hold there (`extra`: VMs placed in this round but not in the inventory yet, name -> host).
        Counts the choice in `load`, so the next decision of the same round sees it. None: no
        host may take it (`_why_unplaceable` says why)."""
        maint = self.inv.maintenance
        rules = self.inv.rules_of(vm) if vm is not None else ()
        p = self.inv.hosts.get(prefer) if prefer is not None else None
        if p is None or p.state != "alive" or prefer in maint or (rules and self._rule_conflict(vm, prefer, extra)):
            alive = [h.name for h in self.inv.hosts.values() if h.state == "alive" and h.name not in maint]
            if rules:
                alive = [h for h in alive if not self._rule_conflict(vm, h, extra)]
            if not alive:
                return None
            if load is None:
                load = self._placement_load()
            prefer = min(alive, key=lambda h: (load.get(h, 0), _host_order(h)))
        if load is not None:
            load[prefer] = load.get(prefer, 0) + 1
        return prefer

    def _location(self, name: str, extra: dict[str, str] | None = None) -> str | None:
        """Where VM `name` runs, or is going (an op taking it there); None: nowhere (deleted,
        failed, not created yet) or on a host that does not count (dead, in maintenance:
        its VMs are leaving it)."""
        if extra and name in extra:
            return extra[name]
        vm = self.inv.vms.get(name)
        if vm is None or vm.state not in ("active", "moving", "creating"):
            return None
        op = self.ops_by_key.get(vm.key)
        host = op.target[0] if op is not None and op.kind != "delete" else vm.host
        h = self.inv.hosts.get(host)
        if host in self.inv.maintenance or (h is not None and h.state == "dead"):
            return None
        return host

    def _rule_conflict(self, vm: str, host: str, extra: dict[str, str] | None = None) -> str:
        """Why `vm` may not run on `host` under its rules ("" if it may)."""
        for r in self.inv.rules_of(vm):
            others = [(o, self._location(o, extra)) for o in r.vms if o != vm]
            if r.kind == "anti":
                near = [o for o, at in others if at == host]
                if near:
                    return f"anti-affinity rule {r.name}: {', '.join(near)} runs on {host}"
            else:
                away = [(o, at) for o, at in others if at is not None and at != host]
                if away:
                    o, at = away[0]
                    return f"together rule {r.name}: {o} runs on {at}, not {host}"
        return ""

    def _why_unplaceable(self, vm: str, extra: dict[str, str] | None = None) -> str:
        alive = [h.name for h in self.inv.hosts.values() if h.state == "alive"]
        free = [h for h in alive if h not in self.inv.maintenance]
        if not free:
            return "no alive host outside maintenance" if alive else "no host is alive"
        why = [f"{h}: {self._rule_conflict(vm, h, extra)}" for h in sorted(free, key=_host_order)]
        return f"no host fits its placement rules ({'; '.join(why[:4])}{'; ...' if len(why) > 4 else ''})"

    def _restart_allowed(self, vm: Vm, now_ns: int) -> bool:
        """The restart budget: at most `restart_budget` restarts of one VM within
        `restart_budget_window_ms`. Past it the VM is parked (one event, a counter): no restart
        until the oldest leaves the window, and meanwhile what agents report of it is adopted."""
        budget = self.config.restart_budget
        if budget <= 0:
            return True
        window_ns = self.config.restart_budget_window_ms * NS_PER_MS
        times = self._restart_times.get(vm.name)
        if times is None:
            times = self._restart_times[vm.name] = deque()
        while times and now_ns - times[0] >= window_ns:
            times.popleft()
        if len(times) < budget:
            times.append(now_ns)
            self._parked.discard(vm.name)
            return True
        if vm.name not in self._parked:
            self._parked.add(vm.name)
            self.restart_budget_exhausted += 1
            self._event(f"vm {vm.name}: restart budget exhausted ({budget} restarts within "
                        f"{self.config.restart_budget_window_ms} ms; last target {vm.host}, seq {vm.seq}); "
                        f"reconciling from agent reports, next try in "
                        f"{(times[0] + window_ns - now_ns) // NS_PER_MS} ms")
        self._needs_claim[vm.name] = True
        self._pending_restarts[vm.name] = times[0] + window_ns
        return False

    def _restart(self, vm: Vm, now_ns: int, prefer: str | None = None, load: dict[str, int] | None = None
                 ) -> Op | None:
        """Start `vm` on `prefer` if it is alive, else on the live host with the fewest VMs."""
        if not self._restart_allowed(vm, now_ns):
            return None
        dst = self._place(load, prefer, vm.name)
        if dst is None:
            if vm.name not in self._unplaceable_noted and self.inv.hosts:
                self._unplaceable_noted.add(vm.name)
                self._event(f"vm {vm.name}: cannot restart it yet: {self._why_unplaceable(vm.name)}; "
                            "trying again")
            # Nowhere to go now (e.g. we were paused and every host looks suspect): try again.
            if vm.name in self._restart_times and self._restart_times[vm.name]:
                self._restart_times[vm.name].pop()  # (no restart happened: it costs no budget)
            self._defer_restart(vm, now_ns)
            return None
        self._unplaceable_noted.discard(vm.name)
        vm.seq_issued = max(vm.seq, vm.seq_issued) + 1
        return self._start_op("restart", vm, vm.host, dst, (dst, vm.seq_issued, False), now_ns)

    def _on_applied(self, host: str, applied: list, now_ns: int) -> None:
        track = self.applies
        track.log_rows(host, applied)
        ops_by_key = self.ops_by_key
        for vlan, mac, ehost, seq, tomb, t_ns, *_n in applied:
            op = ops_by_key.get((vlan, mac))
            if op is None:
                self._adopt((vlan, mac), ehost, seq, tomb, now_ns)
                continue
            last = track.row(op, host, ehost, seq, tomb, t_ns)
            if last is not None:
                self._converged(op, last, now_ns)

    def _report_arrived(self, host: str, oldest_ns: int, now_ns: int) -> None:
        """An apply report from `host` whose oldest apply is stamped `oldest_ns`."""
        self._seen(host, now_ns)
        self._last_applied_ns[host] = now_ns
        if now_ns - oldest_ns > self._hint_ns:
            # We read this report later than the hint delay after its oldest apply (rows and
            # ranges are in apply order): we, not PUB/SUB, are the laggard (see _hint_repairs).
            self._late_report_ns = now_ns

    def _on_apply_report(self, host: str, rows: list, ranges: list, now_ns: int) -> None:
        self._report_arrived(host, min(rows[0][5] if rows else now_ns, ranges[0][4] if ranges else now_ns),
                             now_ns)
        if rows:
            self._on_applied(host, rows, now_ns)
            for op, last in self.applies.own_updates(host, rows, self.ops_by_key):
                self._converged(op, last, now_ns)
        for op, last in self.applies.ranges(host, ranges):
            self._converged(op, last, now_ns)

    def _adopt(self, key: tuple[int, int], host: str, seq: int, tomb: bool, now_ns: int) -> None:
        """An agent holds a newer placement than our inventory (a headless move, or one that
        finished while we were down): the highest (seq, host) wins, here as in every agent."""
        vm = self.inv.by_key(key)
        if vm is None or key in self.ops_by_key or not self.is_admitted(host):
            return  # (a name nobody admitted is never a VM's host, whoever reports it)
        if (seq, host) < (vm.seq, vm.host) or ((seq, host) == (vm.seq, vm.host) and vm.state != "creating"):
            # (Equal settles a create our crash cut short: the agents hold what we journaled.)
            return
        if vm.state == "deleted" and not tomb:
            return  # a tombstone is final: nothing resurrects a deleted VM
        vm.host, vm.seq = host, seq
        vm.seq_issued = max(vm.seq_issued, seq)
        vm.state = "deleted" if tomb else "active"
        self._persist(vm)
        h = self.inv.hosts.get(host)
        if not tomb and h is not None and h.state == "dead":
            self._restart(vm, now_ns)
        # A host we have not heard from yet may still register (we may have just restarted):
        # _restart_orphans deals with hosts that never do.

    def _hint_repairs(self, now_ns: int) -> None:
        """Tell the agents a converging op still waits for what they lack. PUB/SUB lost their
        copy of the update, and they would only notice at its origin's next heartbeat."""
        if now_ns - self._late_report_ns < 2 * self._hint_ns:
            # Lately we read apply reports later than the hint delay after the applies themselves:
            # the missing reports are most likely in our own queue. Hints would only add to it.
            return
        max_every = 16 * self._hint_ns
        budget = HINTS_PER_TICK_MAX
        # A host whose apply reports keep arriving is likely not a laggard that PUB/SUB left
        # behind: it is busy (or we are behind on its reports, as in a cold start of thousands
        # of ports), and hints would only add load; it gets one once its reports pause, or once
        # the op has waited BUSY_GRACE hint delays (a host applying a steady stream of other
        # moves may never pause, and its lost update would wait for the op's timeout). Unless
        # its reports show it current: its latest apply of another move came within half a hint
        # delay of that move's switchover, so a backlog is not what keeps this one from it.
        quiet_since = now_ns - self._hint_ns
        grace_ns = BUSY_GRACE * self._hint_ns
        last_report = self._last_applied_ns
        lag = self.applies.lag_ns
        current_ns = self._hint_ns // 2
        hosts = self.inv.hosts
        for op in self.ops.values():
            if op.phase is not Phase.CONVERGING or not op.next_hint_ns or now_ns < op.next_hint_ns:
                continue
            if budget <= 0:
                break  # the rest wait for the next tick
            op.hint_every_ns = min(op.hint_every_ns * 3 // 2, max_every)
            op.next_hint_ns = now_ns + op.hint_every_ns
            origin = self.inv.hosts.get(op.target[0])
            vm = self.inv.vms.get(op.vm)
            if origin is None or origin.state == "dead" or vm is None:
                continue
            host, seq, tomb = op.target
            if tomb:
                # The tombstone's port name is the origin's to say: point to the origin instead.
                hint = {"origin": host, "incarnation": origin.incarnation}
            else:
                # The entry exactly as the target claimed it (ATTACH/SWITCHOVER carried vm.port):
                # one reliable message settles it, and the merge rule keeps it safe.
                hint = {"origin": host, "incarnation": origin.incarnation,
                        "entry": [vm.vlan, vm.mac, host, vm.port, seq, False]}
                if op.claim is not None and op.claim[0] == origin.incarnation:
                    # The origin's number for it: the agent marks it held and pulls no gap.
                    hint["n"] = op.claim[1]
            frame = wire.encode(MsgType.REQUEST, [0, "repair", hint])
            patient = now_ns - op.converging_ns < grace_ns
            # The live hosts that have not applied it, in registration order (a set difference,
            # not a pass over every host per op: at 1,000 hosts some 200 of them lack it).
            for name in sorted(self.applies.lacking(op), key=self._rank.__getitem__):
                if (name != host and (not patient or last_report.get(name, quiet_since) <= quiet_since
                                      or lag.get(name, current_ns + 1) <= current_ns)):
                    self.repair_hints += 1
                    budget -= 1
                    self.outbox.append((hosts[name].route, frame))

    def _on_ack(self, host: str, body: list, now_ns: int) -> None:
        op_id, ok, detail, t_ns = body
        op = self.ops.get(op_id)
        if op is None:
            return  # the ack of a detach, or of an op already finished
        # (Only the target's ack moves an op, and only one its transition table names: a
        # duplicated "prepared" must not pass for "switched".)
        nxt = next_phase(op.kind, op.phase, detail) if host == op.target[0] else None
        if nxt is None:
            if not ok and host == op.target[0] and is_commanding(op.phase):
                op.end(Outcome.REFUSED, f"{host} refused: {detail}")
                m = STALE_RE.match(detail)
                vm = self.inv.vms.get(op.vm)
                if m and vm is not None and int(m.group(1)) < SEQ_JUMP_MAX:
                    # Its table holds a higher seq than we handed out (a claim we never heard
                    # of): reconcile: the next claim goes above it, instead of creeping up by one.
                    vm.seq_issued = max(vm.seq_issued, int(m.group(1)))
                self._finish(op, now_ns)
            return  # a duplicate, or an ack for a step we are past
        vm = self.inv.vms[op.vm]
        op.phase = nxt
        if nxt is Phase.SWITCHOVER:
            self._command(op, op.dst, MsgType.SWITCHOVER, [op.op_id, vm.name, vm.vlan, vm.mac, vm.port, op.target[1]],
                          now_ns)
            return
        op.command = None
        self._unacked.pop(op.op_id, None)
        op.switch_ns = t_ns
        op.switched = True
        if ok and detail != "no such port":
            # The target acks once its table holds the target entry: it applied it then. (Its
            # own apply report says the same; on a lossy control link it may never arrive.)
            self.applies.mark(op, host, t_ns)
        if self._hint_ns:
            op.converging_ns = now_ns
            op.next_hint_ns = now_ns + self._hint_ns
            op.hint_every_ns = self._hint_ns
        vm.host, vm.seq = op.target[0], op.target[1]
        vm.seq_issued = max(vm.seq_issued, vm.seq)
        vm.state = "deleted" if op.kind == "delete" else "active"
        self._persist(vm)
        if op.kind == "move" and self.inv.hosts[op.src].state != "dead":
            # The source lets go only once the destination owns the MAC (make before break).
            self._send(op.src, MsgType.DETACH, [self._new_op_id(), vm.name, vm.vlan, vm.mac, 0])
        self._check_converged(op, now_ns)

    # ------------------------------------------------------------------ ops

    def _new_op_id(self) -> int:
        op_id = self._next_op
        self._next_op += 1
        return op_id

    def _send(self, host: str, mt: MsgType, body: list) -> None:
        self.outbox.append((self.inv.hosts[host].route, wire.encode(mt, body)))

    def _command(self, op: Op, host: str, mt: MsgType, body: list, now_ns: int) -> None:
        frame = wire.encode(mt, body)
        op.command, op.command_sent_ns = (host, frame), now_ns
        self._unacked[op.op_id] = op
        op.command_retry_ns = self.config.command_retry_ms * NS_PER_MS
        self.outbox.append((self.inv.hosts[host].route, frame))

    def _start_op(self, kind: str, vm: Vm, src: str, dst: str, target: tuple[str, int, bool], now_ns: int) -> Op:
        op = Op(self._new_op_id(), kind, vm.name, src, dst, target, vm.key, now_ns,
                now_ns + self.config.op_timeout_ms * NS_PER_MS)
        self.ops[op.op_id] = op
        self.ops_by_key[vm.key] = op
        op.phase = FIRST_PHASE[kind]
        if op.phase is Phase.ATTACH:
            self._command(op, dst, MsgType.ATTACH, [op.op_id, vm.name, vm.vlan, vm.mac, vm.port, target[1]], now_ns)
        elif op.phase is Phase.PREPARE:
            vm.state = "moving"
            self._command(op, dst, MsgType.PREPARE, [op.op_id, vm.name, vm.vlan, vm.mac, vm.port], now_ns)
        elif op.phase is Phase.TOMBSTONE:
            self._command(op, src, MsgType.DETACH, [op.op_id, vm.name, vm.vlan, vm.mac, target[1]], now_ns)
        return op

    def _check_converged(self, op: Op, now_ns: int) -> None:
        last = self.applies.converged_at(op)
        if last is not None:
            self._converged(op, last, now_ns)

    def _converged(self, op: Op, last_ns: int, now_ns: int) -> None:
        """Every live host applied it; the last of them at `last_ns` (its own clock)."""
        op.converged = True
        op.outcome = Outcome.CONVERGED
        op.latency_ms = max(0, last_ns - op.switch_ns) / NS_PER_MS
        self._finish(op, now_ns)

    def _finish(self, op: Op, now_ns: int, timed_out: bool = False) -> None:
        self.ops.pop(op.op_id, None)
        self.applies.forget(op)
        self._unacked.pop(op.op_id, None)
        if self.ops_by_key.get(op.key) is op:
            del self.ops_by_key[op.key]
        vm = self.inv.vms.get(op.vm)
        if timed_out and not op.converged:
            live = self.inv.live_hosts()
            op.missing = sorted(h for h in live if h not in op.applied)
            if not op.error:
                op.outcome = Outcome.TIMED_OUT
                op.error = (f"not converged within {self.config.op_timeout_ms} ms "
                            f"(phase {op.phase}; {len(op.missing)} hosts have not applied it)")
        sent_claim = (op.kind, op.phase) in CLAIM_MAY_BE_OUT
        was = op.phase
        op.phase = Phase.DONE
        op.done_ns = now_ns
        if vm is not None and was is not Phase.CONVERGING:
            # Aborted before the target owned the MAC (the inventory already follows a target
            # that did, even if some agent lags).
            if op.kind == "create":
                vm.state = "failed"
                self._persist(vm)
            elif op.kind in ("move", "restart"):
                vm.state = "active"
                h = self.inv.hosts.get(vm.host)
                if sent_claim or op.src_lost or h is None or h.state == "dead":
                    # The target may have claimed seq+1 after all, or the VM's host is gone:
                    # a fresh claim with a higher seq leaves exactly one owner. Not at once
                    # after a refusal: an agent that keeps refusing must not make us spin.
                    if op.outcome is Outcome.REFUSED:
                        self._needs_claim[vm.name] = True
                        self._defer_restart(vm, now_ns)
                    else:
                        self._restart(vm, now_ns, prefer=vm.host)
        if op.kind in ("move", "restart"):
            self.history.append(op)
            if self._evac_waiters or self._drain_ops or self._job_of:
                self._op_ended(op, vm, now_ns)
        if vm is not None and vm.state == "active" and vm.key not in self.ops_by_key:
            h = self.inv.hosts.get(vm.host)
            if h is not None and h.state == "dead":
                # Its new host died while the op converged (HA skipped it while it was busy).
                self._restart(vm, now_ns)
        for batch in op.waiters:
            batch.pending.discard(op.op_id)
            if not batch.pending:
                self._reply_batch(batch)

    def _reply_batch(self, batch: Batch) -> None:
        # Per-host apply times only for a single op: a batch of 8,000 would make a reply of MBs.
        records = [op.record(per_host=batch.per_host) for op in batch.ops]
        if batch.single:
            op = batch.ops[0]
            if op.error and not op.converged and not op.switched:
                self._reply(batch.envelope, batch.req_id, False, op.error)
            else:
                self._reply(batch.envelope, batch.req_id, True, records[0])
        else:
            self._reply(batch.envelope, batch.req_id, True, {"ops": records})
        # Each op names its batch and the batch its ops: break the cycle, so a finished create
        # of 8,000 VMs (each op with an apply time per host) is freed now, not at the next full
        # collection (never, in the simulator, which runs with the collector off).
        batch.ops = []

    # ------------------------------------------------------------------ client API

    def _reply(self, envelope: list, req_id: int, ok: bool, result) -> None:
        self.outbox.append((envelope, wire.encode(MsgType.REPLY, [req_id, ok, result])))

    def _on_request(self, envelope: list, body: list, now_ns: int) -> None:
        req_id, method, args = body
        handler = getattr(self, f"api_{method}", None)
        if handler is None:
            self._reply(envelope, req_id, False, f"unknown method {method!r}")
            return
        try:
            result = handler(args, now_ns, envelope, req_id)
        except ApiError as e:
            self._reply(envelope, req_id, False, str(e))
            return
        except (KeyError, TypeError, ValueError, OverflowError) as e:
            self._reply(envelope, req_id, False, f"bad arguments for {method}: {e}")
            return
        if result is not None:
            self._reply(envelope, req_id, True, result)

    def _wait(self, envelope: list, req_id: int, ops: list[Op], single: bool, per_host: bool = True) -> None:
        batch = Batch(envelope, req_id, {op.op_id for op in ops if op.phase is not Phase.DONE}, ops, single,
                      single and per_host)
        if not batch.pending:
            self._reply_batch(batch)
            return
        for op in ops:
            op.waiters.append(batch)

    def api_status(self, args, now_ns, envelope, req_id) -> dict:
        return {
            "hosts": [h.describe() for h in sorted(self.inv.hosts.values(), key=lambda h: _host_order(h.name))],
            "vms": sum(1 for v in self.inv.vms.values() if v.state != "deleted"),
            "ops_in_flight": len(self.ops),
            "moves_done": len(self.history),
            "peers_epoch": self.peers_epoch,
            "repair_hints": self.repair_hints,
            "dropped_malformed": self.dropped_malformed,
            "handler_errors": self.handler_errors,
            "last_error": self.last_error,
            "refused_registrations": self.refused_registrations,
            "restart_budget_exhausted": self.restart_budget_exhausted,
            "ready_waiters": self._ready_n,
            "admitted": None if self.admitted is None else sorted(self.admitted, key=_host_order),
            "maintenance": sorted(self.inv.maintenance, key=_host_order),
            "rules": len(self.inv.rules),
        }

    def api_host_add(self, args, now_ns, envelope, req_id) -> dict:
        """Admit a host name: from now on it may register (and its agent join the mesh)."""
        name = args["name"]
        if not isinstance(name, str) or not NAME_RE.match(name):
            raise ApiError(f"bad host name {name!r}: use letters, digits, '-', '_' or '.', at most 64")
        added = self._admit(name)
        return {"host": name, "added": added, "registered": name in self.inv.hosts}

    def api_vm_list(self, args, now_ns, envelope, req_id) -> dict:
        include_deleted = bool(args.get("all", False))
        vms = [vm.describe() for vm in self.inv.vms.values() if include_deleted or vm.state != "deleted"]
        return {"vms": vms}

    def api_expected_table(self, args, now_ns, envelope, req_id) -> dict:
        return {"entries": [[k[0], k[1], h, s, t] for k, (h, s, t) in self.inv.expected_table().items()],
                "live_hosts": self.inv.live_hosts()}

    def api_applied_log(self, args, now_ns, envelope, req_id) -> dict:
        """Applies reported since index `since` (as returned by the previous call), at most `limit`."""
        since, limit = int(args.get("since", 0)), min(int(args.get("limit", 20_000)), 50_000)
        total = self._applied_total()
        first = total - len(self.applied_log)
        start = max(since, first)
        rows = [list(r) for r in list(self.applied_log)[start - first : start - first + limit]]
        return {"from": start, "next": start + len(rows), "lost": max(0, first - since), "applies": rows}

    def _applied_total(self) -> int:
        return self.applies.applied_count

    def api_moves(self, args, now_ns, envelope, req_id) -> dict:
        last = int(args.get("last", 1000))
        hist = list(self.history)
        return {"moves": [op.record() for op in hist[-last:]] if last > 0 else []}

    def api_wait_ready(self, args, now_ns, envelope, req_id) -> None:
        hosts = int(args["hosts"])
        timeout_ms = int(args.get("timeout_ms", 30_000))
        if not 1 <= hosts <= 1_000_000:
            raise ApiError(f"hosts must be 1..1,000,000, not {hosts}")
        if not 0 <= timeout_ms <= READY_TIMEOUT_MS_MAX:
            raise ApiError(f"timeout_ms must be 0..{READY_TIMEOUT_MS_MAX}, not {timeout_ms}")
        if self._ready_n >= READY_WAITERS_MAX:
            raise ApiError(f"{RETRY_PREFIX}{READY_WAITERS_MAX} wait_ready requests are pending already; "
                           "retry once some have been answered")
        w = ReadyWaiter(envelope, req_id, hosts, now_ns + timeout_ms * NS_PER_MS)
        self._ready_seq += 1
        heapq.heappush(self._ready_by_hosts, (hosts, self._ready_seq, w))
        heapq.heappush(self._ready_by_deadline, (w.deadline_ns, self._ready_seq, w))
        self._ready_n += 1
        self._check_ready(now_ns)

    def _check_ready(self, now_ns: int, reporter: Host | None = None) -> None:
        """Answer the waiters the cluster satisfies now, and those whose deadline passed.
        `reporter`: the host whose status just arrived. Unless it now meets the bar of the
        waiter asking for the fewest hosts, nothing changed for any waiter: no pass over the
        hosts, and never one over the waiters (they are popped in order of hosts wanted)."""
        if not self._ready_n:
            return
        by_hosts, by_deadline = self._ready_by_hosts, self._ready_by_deadline
        while by_hosts and by_hosts[0][2].done:
            heapq.heappop(by_hosts)
        if by_hosts:
            need = by_hosts[0][0]
            if reporter is None or (reporter.peers_heard >= need - 1 and self._live_n >= need):
                live = [h for h in self.inv.hosts.values() if h.state == "alive"]
                # Ready for k hosts: k alive, each hearing the other k - 1.
                ready_for = min(len(live), min((h.peers_heard for h in live), default=0) + 1)
                while by_hosts and by_hosts[0][0] <= ready_for:
                    w = heapq.heappop(by_hosts)[2]
                    if not w.done:
                        self._reply(w.envelope, w.req_id, True, {"hosts": len(live)})
                        self._ready_done(w)
        while by_deadline and (by_deadline[0][2].done or by_deadline[0][0] <= now_ns):
            w = heapq.heappop(by_deadline)[2]
            if w.done:
                continue
            live = [h for h in self.inv.hosts.values() if h.state == "alive"]
            meshed = sum(1 for h in live if h.peers_heard >= w.hosts - 1)
            self._reply(w.envelope, w.req_id, False,
                        f"cluster not ready: {len(live)}/{w.hosts} agents registered, "
                        f"{meshed} hear all their peers")
            self._ready_done(w)

    def _ready_done(self, w: ReadyWaiter) -> None:
        w.done = True
        w.envelope = []  # (the heaps may hold it a while longer: not the client's identity)
        self._ready_n -= 1
        if not self._ready_n:
            self._ready_by_hosts.clear()
            self._ready_by_deadline.clear()
        elif len(self._ready_by_hosts) + len(self._ready_by_deadline) > 4 * READY_WAITERS_MAX:
            # Answered ones below a pending one pile up in a heap: drop them (bounded memory).
            for heap in (self._ready_by_hosts, self._ready_by_deadline):
                heap[:] = [x for x in heap if not x[2].done]
                heapq.heapify(heap)

    def _check_host(self, name: str, now_ns: int | None = None) -> Host:
        h = self.inv.hosts.get(name)
        if h is None:
            if now_ns is not None and self._awaited(name, now_ns):
                raise ApiError(f"{RETRY_PREFIX}host {name!r} has not registered again since the controller "
                               f"restarted (it has until {self.config.dead_after_ms} ms after the start); "
                               "send it again shortly")
            known = ", ".join(sorted(self.inv.hosts, key=_host_order)) or "none"
            raise ApiError(f"unknown host {name!r} (known: {known})")
        if h.state == "dead":
            raise ApiError(f"host {name!r} is dead; pick a live host")
        return h

    def _check_placement(self, vm: str, host: str, now_ns: int, extra: dict[str, str] | None = None) -> None:
        """An admin named `host` for `vm`: it must be live, not in maintenance, and fit the VM's rules."""
        self._check_host(host, now_ns)
        if host in self.inv.maintenance:
            raise ApiError(f"host {host!r} is in maintenance; pick another host or `dvs host activate {host}`")
        why = self._rule_conflict(vm, host, extra)
        if why:
            raise ApiError(f"{vm} may not run on {host}: {why}; pick another host or remove the rule "
                           "(`dvs vm rule list`)")

    def _awaited(self, name: str, now_ns: int) -> bool:
        """A host we know from the journal and may still hear from: we started less than the dead
        timeout ago, and it was admitted or ran VMs before."""
        if self._started_ns is not None and now_ns - self._started_ns > self.config.dead_after_ms * NS_PER_MS:
            return False
        if self.admitted is not None:
            return name in self.admitted
        return name in self.inv.incarnations

    def _check_vm(self, name: str) -> Vm:
        vm = self.inv.vms.get(name)
        if vm is None or vm.state in ("deleted", "failed"):
            raise ApiError(f"unknown VM {name!r}; `dvs vm list` shows the VMs")
        if name in (op.vm for op in self.ops.values()):
            raise ApiError(f"VM {name!r} has an operation in flight; wait for it to finish")
        return vm

    def api_vm_create(self, args, now_ns, envelope, req_id) -> None:
        specs = args.get("vms")
        single = specs is None
        if single:
            specs = [[args["name"], args.get("host"), args.get("profile", "default")]]
        if not isinstance(specs, list) or not specs:
            raise ApiError("vm_create needs at least one VM")
        names = set()
        placed: dict[str, str] = {}  # this request's VMs so far: their rules see them too
        load = None
        for spec in specs:
            if not isinstance(spec, list) or len(spec) != 3:
                raise ApiError("each VM is [name, host, profile]")
            name, host, profile = spec
            if not isinstance(name, str) or not NAME_RE.match(name):
                raise ApiError(f"bad VM name {name!r}: use letters, digits, '-', '_' or '.', at most 64")
            if name in names or (name in self.inv.vms and self.inv.vms[name].state not in ("deleted", "failed")):
                raise ApiError(f"VM {name!r} already exists")
            names.add(name)
            if profile not in self.inv.profiles:
                raise ApiError(f"unknown port profile {profile!r} (known: {', '.join(self.inv.profiles)})")
            if host is None:
                # No host named: the scorer picks one (as for an HA restart).
                if load is None:
                    load = self._placement_load()
                host = self._place(load, None, name, placed)
                if host is None:
                    raise ApiError(f"cannot place {name}: {self._why_unplaceable(name, placed)}")
                spec[1] = host
            else:
                self._check_placement(name, host, now_ns, placed)
            placed[name] = host
        ops = []
        for name, host, profile in specs:
            vm = self.inv.new_vm(name, host, profile)
            self._persist(vm)
            ops.append(self._start_op("create", vm, host, host, (host, 0, False), now_ns))
        self._wait(envelope, req_id, ops, single)

    def api_vm_move(self, args, now_ns, envelope, req_id) -> None:
        vm = self._check_vm(args["name"])
        dst = args["to"]
        # "per_host": false leaves each host's apply time out of the reply (1,000 of them at
        # 1,000 hosts; a client that wants the latency alone, as the simulator's, asks so).
        per_host = args.get("per_host", True)
        if type(per_host) is not bool:
            raise ApiError(f"per_host must be true or false, not {per_host!r}")
        self._check_placement(vm.name, dst, now_ns)
        if vm.host not in self.inv.hosts:
            if self._awaited(vm.host, now_ns):
                raise ApiError(f"{RETRY_PREFIX}{vm.name}'s host {vm.host!r} has not registered again since the "
                               "controller restarted; send it again shortly")
            raise ApiError(f"VM {vm.name!r} is on {vm.host}, which is no member now; wait for HA to restart it")
        if vm.host == dst:
            raise ApiError(f"VM {vm.name!r} is already on {dst}; pick another host")
        vm.seq_issued = max(vm.seq, vm.seq_issued) + 1
        op = self._start_op("move", vm, vm.host, dst, (dst, vm.seq_issued, False), now_ns)
        self._wait(envelope, req_id, [op], True, per_host)

    def api_vm_delete(self, args, now_ns, envelope, req_id) -> None:
        vm = self._check_vm(args["name"])
        if vm.host not in self.inv.hosts:
            prefix = RETRY_PREFIX if self._awaited(vm.host, now_ns) else ""
            raise ApiError(f"{prefix}VM {vm.name!r} is on {vm.host}, which has not registered (again) yet; "
                           "wait for it or for HA to restart the VM")
        if self.inv.hosts[vm.host].state == "dead":
            raise ApiError(f"VM {vm.name!r} is on dead host {vm.host}; wait for HA to restart it")
        vm.seq_issued = max(vm.seq, vm.seq_issued) + 1
        op = self._start_op("delete", vm, vm.host, vm.host, (vm.host, vm.seq_issued, True), now_ns)
        self._wait(envelope, req_id, [op], True)


    # ------------------------------------------------------------------ maintenance, rebalance, rules

    def _op_ended(self, op: Op, vm: Vm | None, now_ns: int) -> None:
        """A move or restart finished: account it to its drain, evacuation waiters, rebalance."""
        host = self._drain_ops.pop(op.op_id, None)
        if host is not None:
            self._kick = True
            if not op.converged and vm is not None and vm.host == host:
                # It did not leave (refused, timed out before the switchover): try it again later.
                self._drain_retry_ns[vm.name] = now_ns + self.config.command_retry_max_ms * NS_PER_MS
        for w in self._evac_waiters:
            if op.src == w.host:
                w.ops.append(op)
        job = self._job_of.pop(op.op_id, None)
        if job is not None:
            job.running.discard(op.op_id)
            job.ops.append(op)
        if host is not None or job is not None or self._evac_waiters:
            self._kick = True

    def _run_jobs(self, now_ns: int) -> None:
        self._kick = False
        for host in list(self.inv.maintenance):
            self._drain(host, now_ns)
        for job in list(self._jobs):
            self._job_step(job, now_ns)
        if self._evac_waiters:
            self._check_evac(now_ns)

    def _drain(self, host: str, now_ns: int) -> None:
        """Start moves off maintenance host `host`, up to its max concurrent, targets from the
        scorer. A dead host is left to HA (which never places on a host in maintenance); one
        that has not registered (again) is waited for."""
        h = self.inv.hosts.get(host)
        if h is None or h.state != "alive":
            return
        k = self.inv.maintenance[host]
        running = sum(1 for x in self._drain_ops.values() if x == host)
        if running >= k:
            return
        blocked = ""
        load = None
        for vm in sorted(self.inv.vms.values(), key=lambda v: v.number):
            if running >= k:
                break
            if vm.host != host or vm.state != "active" or vm.key in self.ops_by_key:
                continue
            if self._drain_retry_ns.get(vm.name, 0) > now_ns:
                continue
            if load is None:
                load = self._placement_load()
            dst = self._place(load, None, vm.name)
            if dst is None:
                blocked = blocked or f"cannot move {vm.name} off {host}: {self._why_unplaceable(vm.name)}"
                continue
            self._drain_retry_ns.pop(vm.name, None)
            vm.seq_issued = max(vm.seq, vm.seq_issued) + 1
            op = self._start_op("move", vm, host, dst, (dst, vm.seq_issued, False), now_ns)
            self._drain_ops[op.op_id] = host
            running += 1
        if blocked:
            if self._drain_blocked.get(host) != blocked:
                self._event(f"host {host} (maintenance): {blocked}; trying again")
            self._drain_blocked[host] = blocked
        elif running or not any(vm.host == host and vm.state == "active" for vm in self.inv.vms.values()):
            self._drain_blocked.pop(host, None)

    def _host_busy(self, host: str) -> int:
        """VMs on `host` plus ops moving one off it: 0 once it is empty and every move ended."""
        n = sum(1 for vm in self.inv.vms.values() if vm.host == host and vm.state in ("active", "moving", "creating"))
        return n + sum(1 for op in self.ops.values() if op.src == host and op.kind in ("move", "restart"))

    def _check_evac(self, now_ns: int) -> None:
        keep = []
        for w in self._evac_waiters:
            left = self._host_busy(w.host)
            moved = [op.record(per_host=False) for op in w.ops]
            if not left:
                self._reply(w.envelope, w.req_id, True, {
                    "host": w.host, "moves": moved, "elapsed_ms": (now_ns - w.started_ns) / NS_PER_MS})
            elif w.host in self._drain_blocked and not any(x == w.host for x in self._drain_ops.values()):
                self._reply(w.envelope, w.req_id, False,
                            f"{self._drain_blocked[w.host]}; {w.host} stays in maintenance with {left} VM(s): "
                            f"the controller moves them once a host fits (or `dvs host activate {w.host}`)")
            elif now_ns >= w.deadline_ns:
                self._reply(w.envelope, w.req_id, False,
                            f"{w.host} still holds {left} VM(s) after {(now_ns - w.started_ns) // NS_PER_MS} ms "
                            f"({len(moved)} moves done); it stays in maintenance and the controller "
                            "goes on draining it: run `dvs host evacuate` again to wait")
            else:
                keep.append(w)
        self._evac_waiters = keep

    def _check_maint_host(self, name: str) -> None:
        if name not in self.inv.hosts and not (self.admitted is not None and name in self.admitted) \
                and name not in self.inv.incarnations:
            known = ", ".join(sorted(self.inv.hosts, key=_host_order)) or "none"
            raise ApiError(f"unknown host {name!r} (known: {known})")

    @staticmethod
    def _max_concurrent(args) -> int:
        k = args.get("max_concurrent", MAX_CONCURRENT_DEFAULT)
        if type(k) is not int or not 1 <= k <= MAX_CONCURRENT_MAX:
            raise ApiError(f"max_concurrent must be 1..{MAX_CONCURRENT_MAX}, not {k!r}")
        return k

    def api_host_evacuate(self, args, now_ns, envelope, req_id) -> None:
        """Maintenance mode: no placement targets the host from now on, and its VMs move off it.
        Answered once it is empty and every move off it ended (each move's record)."""
        name = args["name"]
        self._check_maint_host(name)
        k = self._max_concurrent(args)
        timeout_ms = args.get("timeout_ms", 300_000)
        if type(timeout_ms) is not int or not 0 <= timeout_ms <= EVAC_TIMEOUT_MS_MAX:
            raise ApiError(f"timeout_ms must be 0..{EVAC_TIMEOUT_MS_MAX}, not {timeout_ms!r}")
        if len(self._evac_waiters) >= EVAC_WAITERS_MAX:
            raise ApiError(f"{RETRY_PREFIX}{EVAC_WAITERS_MAX} evacuations are being waited for already")
        others = [h for h in self.inv.hosts.values()
                  if h.name != name and h.state != "dead" and h.name not in self.inv.maintenance]
        if not others and self._host_busy(name):
            raise ApiError(f"no other live host outside maintenance to move {name}'s VMs to; "
                           "add a host or activate one first")
        if self.inv.maintenance.get(name) != k:
            self.inv.maintenance[name] = k
            self.journal_out.append({"maintenance": name, "max_concurrent": k})
        self._drain_blocked.pop(name, None)
        self._evac_waiters.append(EvacWaiter(envelope, req_id, name, now_ns, now_ns + timeout_ms * NS_PER_MS))
        self._run_jobs(now_ns)

    def api_host_activate(self, args, now_ns, envelope, req_id) -> dict:
        """Return a host to service: placement may target it again."""
        name = args["name"]
        self._check_maint_host(name)
        was = self.inv.maintenance.pop(name, None) is not None
        if was:
            self.journal_out.append({"maintenance": name, "max_concurrent": 0})
        self._drain_blocked.pop(name, None)
        keep = []
        for w in self._evac_waiters:
            if w.host == name:
                self._reply(w.envelope, w.req_id, False, f"{name} was activated before it was empty")
            else:
                keep.append(w)
        self._evac_waiters = keep
        return {"host": name, "was_in_maintenance": was, "vms": self._host_busy(name)}

    def api_maintenance(self, args, now_ns, envelope, req_id) -> dict:
        return {"maintenance": [{"host": h, "max_concurrent": k, "vms": self._host_busy(h),
                                 "blocked": self._drain_blocked.get(h, "")}
                                for h, k in sorted(self.inv.maintenance.items(), key=lambda x: _host_order(x[0]))]}

    # Rebalance

    def _balance_state(self, metric: str, rates: dict) -> tuple[dict[str, float], list, dict[str, float]]:
        """Per-host load (hosts that may take VMs), the movable units, and per-VM weights."""
        hosts = [h.name for h in self.inv.hosts.values() if h.state == "alive" and h.name not in self.inv.maintenance]
        load = dict.fromkeys(hosts, 0.0)
        weight: dict[str, float] = {}
        where: dict[str, str] = {}
        busy = set()
        for vm in self.inv.vms.values():
            if vm.state not in ("active", "moving", "creating"):
                continue
            op = self.ops_by_key.get(vm.key)
            host = op.target[0] if op is not None and op.kind != "delete" else vm.host
            w = 1.0 if metric == "vms" else float(rates.get(vm.name, 0.0))
            weight[vm.name] = w
            if host in load:
                load[host] += w
            if op is not None or vm.state != "active":
                busy.add(vm.name)
            where[vm.name] = host
        units = []
        seen = set()
        for vm in sorted(self.inv.vms.values(), key=lambda v: v.number):
            if vm.name in seen or vm.name not in where or vm.name in busy:
                continue
            group = [vm.name]
            for r in self.inv.rules_of(vm.name):
                if r.kind == "together":
                    group += [o for o in r.vms if o not in group and o in where]
            seen.update(group)
            if any(where[o] != where[vm.name] or o in busy for o in group):
                continue  # a group split (in flight, or placed apart before the rule): left alone
            units.append((where[vm.name], group, sum(weight[o] for o in group)))
        return load, units, weight

    def api_rebalance(self, args, now_ns, envelope, req_id) -> dict | None:
        """Plan (and unless `dry_run`, run) the fewest moves that bring the per-host spread of
        load (max - min) to `threshold`: VMs per host for metric vms (default 2), or a fraction
        of the mean host's frame rate for metric traffic (default 0.25; `rates`: VM -> frames/s)."""
        metric = args.get("metric", "vms")
        if metric not in ("vms", "traffic"):
            raise ApiError(f"metric must be vms or traffic, not {metric!r}")
        threshold = args.get("threshold")
        if threshold is None:
            threshold = 2 if metric == "vms" else 0.25
        if isinstance(threshold, bool) or not isinstance(threshold, int | float) or not 0 <= threshold <= 1e9:
            raise ApiError(f"threshold must be a number >= 0, not {threshold!r}")
        rates = args.get("rates") or {}
        if not isinstance(rates, dict) or not all(isinstance(v, int | float) and v >= 0 for v in rates.values()):
            raise ApiError("rates must map VM names to frame rates >= 0")
        if metric == "traffic" and not rates:
            raise ApiError("metric traffic needs the VMs' frame rates (`dvs rebalance` measures them)")
        k = self._max_concurrent(args)
        load, units, _ = self._balance_state(metric, rates)
        if len(load) < 2:
            raise ApiError("rebalance needs at least two live hosts outside maintenance")
        before = dict(load)
        mean = sum(load.values()) / len(load)
        limit = float(threshold) if metric == "vms" else float(threshold) * mean

        def allowed(vms: list[str], dst: str, planned: dict[str, str]) -> bool:
            extra = {**planned, **dict.fromkeys(vms, dst)}
            return not any(self._rule_conflict(v, dst, extra) for v in vms)

        moves = balance.plan(load, units, limit, allowed, _host_order)
        def rnd(x: float) -> float:
            return round(x, 3)

        result = {"metric": metric, "threshold": threshold, "limit": rnd(limit),
                  "spread_before": rnd(balance.spread(before)), "spread_planned": rnd(balance.spread(load)),
                  "load_before": {h: rnd(v) for h, v in before.items()},
                  "load_planned": {h: rnd(v) for h, v in load.items()},
                  "plan": [{"vm": v, "src": a, "dst": b} for v, a, b in moves]}
        if args.get("dry_run", False) or not moves:
            return {**result, "moves": [], "skipped": []}
        job = Job(envelope, req_id, deque(moves), k, result)
        self._jobs.append(job)
        self._job_step(job, now_ns)
        return None

    def _job_step(self, job: Job, now_ns: int) -> None:
        while job.queue and len(job.running) < job.max_concurrent:
            name, src, dst = job.queue.popleft()
            vm = self.inv.vms.get(name)
            h = self.inv.hosts.get(dst)
            why = ""
            if vm is None or vm.state != "active" or vm.host != src or vm.key in self.ops_by_key:
                why = f"{name} is no longer idle on {src}"
            elif h is None or h.state != "alive" or dst in self.inv.maintenance:
                why = f"{dst} no longer takes VMs"
            else:
                why = self._rule_conflict(name, dst)
                # (a together group moves member by member: the members still on src are
                # going to dst in this plan, so only a member elsewhere is a conflict)
                if why.startswith("together") and all(
                        (v, src, dst) in job.queue for r in self.inv.rules_of(name) if r.kind == "together"
                        for v in r.vms if v != name and self._location(v) == src):
                    why = ""
            if why:
                job.skipped.append({"vm": name, "src": src, "dst": dst, "why": why})
                continue
            vm.seq_issued = max(vm.seq, vm.seq_issued) + 1
            op = self._start_op("move", vm, src, dst, (dst, vm.seq_issued, False), now_ns)
            job.running.add(op.op_id)
            self._job_of[op.op_id] = job
        if not job.queue and not job.running:
            self._jobs.remove(job)
            load, _, _ = self._balance_state(job.result["metric"], {})
            self._reply(job.envelope, job.req_id, True, {
                **job.result, "moves": [op.record(per_host=False) for op in job.ops], "skipped": job.skipped,
                "vms_per_host_after": {h: int(v) for h, v in load.items()} if job.result["metric"] == "vms" else {}})

    # Placement rules

    def api_rule_add(self, args, now_ns, envelope, req_id) -> dict:
        kind, vms = args["kind"], args["vms"]
        if kind not in RULE_KINDS:
            raise ApiError(f"rule kind must be anti or together, not {kind!r}")
        if not isinstance(vms, list) or not 2 <= len(vms) <= RULE_VMS_MAX or len(set(vms)) != len(vms) \
                or not all(isinstance(v, str) and NAME_RE.match(v) for v in vms):
            raise ApiError(f"a rule names 2..{RULE_VMS_MAX} distinct VMs, e.g. web1,web2")
        name = args.get("name") or next(f"rule{i}" for i in range(1, RULES_MAX + 2) if f"rule{i}" not in self.inv.rules)
        if not isinstance(name, str) or not NAME_RE.match(name):
            raise ApiError(f"bad rule name {name!r}: use letters, digits, '-', '_' or '.', at most 64")
        if name in self.inv.rules:
            raise ApiError(f"rule {name!r} exists already; remove it first or pick another name")
        if len(self.inv.rules) >= RULES_MAX:
            raise ApiError(f"{RULES_MAX} rules exist already")
        for r in self.inv.rules.values():
            if r.kind != kind and len(set(r.vms) & set(vms)) >= 2:
                both = sorted(set(r.vms) & set(vms))
                raise ApiError(f"{both[0]} and {both[1]} are in {r.kind} rule {r.name} already: "
                               "no placement could satisfy both rules")
        # The rule must hold now: never a rule the inventory already breaks.
        at = {v: self._location(v) for v in vms}
        placed = [(v, h) for v, h in at.items() if h is not None]
        if kind == "anti":
            seen: dict[str, str] = {}
            for v, h in placed:
                if h in seen:
                    raise ApiError(f"{seen[h]} and {v} both run on {h}: move one first "
                                   f"(`dvs vm move {v} --to HOST`), then add the rule")
                seen[h] = v
        elif len({h for _, h in placed}) > 1:
            where = ", ".join(f"{v} on {h}" for v, h in placed)
            raise ApiError(f"the VMs run on different hosts ({where}): move them onto one host first")
        rule = Rule(name, kind, list(vms))
        self.inv.set_rule(rule, name)
        self.journal_out.append({"rule": name, "kind": kind, "vms": list(vms)})
        return rule.describe()

    def api_rule_list(self, args, now_ns, envelope, req_id) -> dict:
        out = []
        for r in self.inv.rules.values():
            d = r.describe()
            d["hosts"] = {v: self._location(v) for v in r.vms}
            out.append(d)
        return {"rules": out}

    def api_rule_remove(self, args, now_ns, envelope, req_id) -> dict:
        name = args["name"]
        if name not in self.inv.rules:
            raise ApiError(f"no rule {name!r}; `dvs vm rule list` shows the rules")
        self.inv.set_rule(None, name)
        self.journal_out.append({"rule": name, "kind": "", "vms": []})
        return {"rule": name, "removed": True}


def _host_order(name: str) -> tuple:
    """h2 before h10: sort by the number in the name when there is one."""
    m = re.match(r"^([A-Za-z_-]*)(\d+)$", name)
    return (m.group(1), int(m.group(2)), "") if m else (name, -1, name)
