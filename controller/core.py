"""The controller's protocol core: the coordinator of its components, and the one place that acts.

The components answer questions and keep their own state; this class decides what to do
with what they say (the h11 shape: no mixins, no component calls another's actions):
- ops.py: an op's phases, its transition table and outcomes;
- applytrack.py: who applied what, and the converged check;
- membership.py: registration, admission, liveness, PEERS, wait_ready;
- placement.py: the one placement scorer and the VM rules;
- ha.py: which VMs wait for an HA restart, the restart budget;
- hints.py: repair hints for agents that lack a converging op's update;
- reportpace.py: whether agents report applies at once or batch them (ops in flight);
- api.py / maintenance.py: client request handlers, drain/evacuate/rebalance.
What stays here is each op's life (start, ack, finish, with the restarts an abort needs) and
the glue of agent messages; it stays whole (a little over 500 lines) because those steps act
on each other: an ack starts the next step, a finish may start a restart, a restart an op.

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

import re
from collections import deque

from agent import wire
from agent.wire import MsgType, WireError
from controller.api import NAME_RE, RETRY_PREFIX, ApiError, ClientApi
from controller.applytrack import ApplyTracker
from controller.config import ControllerConfig
from controller.ha import Restarts
from controller.hints import RepairHints
from controller.inventory import Inventory, Vm
from controller.maintenance import Maintenance
from controller.membership import READY_WAITERS_MAX, Membership
from controller.ops import CLAIM_MAY_BE_OUT, FIRST_PHASE, Op, Outcome, Phase, is_commanding, next_phase
from controller.placement import Placement
from controller.reportpace import ReportPacing

# (Re-exported: the CLI and the clusterfile name them from here.)
__all__ = ["NAME_RE", "READY_WAITERS_MAX", "RETRY_PREFIX", "ApiError", "ControllerCore"]

NS_PER_MS = 1_000_000
# Events held until the driver takes them, at most (log lines: twice as many).
EVENTS_MAX = 1_000
# An agent's refusal of a claim: "stale: table holds seq S on H".
STALE_RE = re.compile(r"^stale: table holds seq (\d+) on ")
# A refusal's seq is taken over only below this: a seq near 2^64 would leave no room above it.
SEQ_JUMP_MAX = 1 << 48


class ControllerCore:
    def __init__(self, config: ControllerConfig | None = None, journal: list[dict] | None = None,
                 hosts: list[str] | None = None) -> None:
        """`journal`: records to recover from. `hosts`: the host names admitted besides those
        the journal admitted; None admits any name that registers (see Membership)."""
        self.config = config or ControllerConfig()
        self.inv = Inventory()
        self.journal_out: list[dict] = []
        for record in journal or []:
            self.inv.apply_record(record)
        self.events: list[dict] = []
        self.events_dropped = 0
        self.outbox: list[tuple[list, bytes]] = []
        # Who applied what (and the log of every apply, for checkers).
        self.applies = ApplyTracker(self.inv.hosts, self.config.applied_log_max)
        self.applied_log = self.applies.applied_log
        self.members = Membership(self.inv, self.config, self.outbox, self.applies, self.journal_out, hosts,
                                  self.event)
        self.ops: dict[int, Op] = {}  # in flight, by op id
        self.ops_by_key: dict[tuple[int, int], Op] = {}
        self._unacked: dict[int, Op] = {}  # ops whose current command awaits its ack, by op id
        # Finished moves and HA restarts, oldest first; bounded so a long run cannot grow it forever.
        # (Ops, made into records when asked for: a record of a move at 1,000 hosts holds 1,000
        # apply times, and most are never read.)
        self.history: deque[Op] = deque(maxlen=self.config.history_max)
        self.restarts = Restarts(self.config, self.inv)
        self._next_op = 1
        self.dropped_malformed = 0
        self.handler_errors = 0
        self.last_error = ""
        self._tick_ns = self.config.tick_interval_ms * NS_PER_MS
        self._started_ns: int | None = None
        self.placement = Placement(self.inv, self.ops_by_key)
        self.hints = RepairHints(self.config.repair_hint_after_ms, self.event)
        self.pacing = ReportPacing(self.config.report_batch_ms)
        self._hint_ns = self.config.repair_hint_after_ms * NS_PER_MS
        self.api = ClientApi(self)
        self.maint = Maintenance(self)
        self._orphans_checked = False
        self._next_tick_ns = 0

    @property
    def started_ns(self) -> int | None:
        """Our first tick (None before it): hosts from the journal may register until a dead timeout later."""
        return self._started_ns

    @property
    def peers_epoch(self) -> int:
        return self.members.peers_epoch

    @property
    def repair_hints(self) -> int:
        return self.hints.repair_hints

    def api_status(self, args, now_ns, envelope, req_id) -> dict:
        """(The metrics endpoint reads the status straight from the core.)"""
        return self.api.api_status(args, now_ns, envelope, req_id)

    # ------------------------------------------------------------------ driver API

    def take_outbox(self) -> list[tuple[list, bytes]]:
        # (The same list stays: the components append to it.)
        out = self.outbox[:]
        self.outbox.clear()
        return out

    def take_journal(self) -> list[dict]:
        out = self.journal_out[:]  # (the same list stays: the components append to it)
        self.journal_out.clear()
        return out

    def take_events(self) -> list[dict]:
        """Structured events, oldest first: {"kind": "<dotted.kind>", ...facts} (no time: the
        runtime stamps them). Those with a "message" are lines for the operator's log (a
        refused host, a VM out of restart budget, a drain that cannot go on)."""
        out = self.events[:]
        self.events.clear()
        return out

    def event(self, kind: str, message: str = "", /, **facts) -> None:
        n = len(self.events)
        # (A create of 8,000 VMs is 24,000 op events at once: they may go, the log lines stay.)
        if n >= EVENTS_MAX and (not message or n >= 2 * EVENTS_MAX):
            self.events_dropped += 1
            return
        ev = {"kind": kind, **facts}
        if message:
            ev["message"] = message
        self.events.append(ev)

    @property
    def admitted(self) -> set[str] | None:
        return self.members.admitted

    @property
    def refused_registrations(self) -> int:
        return self.members.refused_registrations

    def is_admitted(self, name: str) -> bool:
        return self.members.is_admitted(name)

    def persist(self, vm: Vm) -> None:
        self.journal_out.append(self.inv.to_record(vm))

    def next_deadline_ns(self) -> int:
        return self.members.next_deadline_ns(self._next_tick_ns)

    def on_frame(self, envelope: list, frame: bytes, now_ns: int) -> None:
        try:
            mt, body = wire.decode(frame, wire.MAX_SMALL_FRAME_BYTES)
        except WireError:
            self.dropped_malformed += 1
            return
        try:
            self._dispatch(envelope, mt, body, now_ns)
            if self.maint.kicked:
                self.maint.run(now_ns)
        except Exception as e:  # noqa: BLE001 - a bug of ours must not kill the controller
            self.handler_errors += 1
            self.last_error = f"{mt.name}: {type(e).__name__}: {e}"[:300]

    def _dispatch(self, envelope: list, mt: MsgType, body: list, now_ns: int) -> None:
        host = self.members.routes.get(envelope[0]) if envelope else None
        if mt is MsgType.REQUEST:
            self.api.handle(envelope, body, now_ns)
        elif mt is MsgType.REGISTER:
            self._on_register(envelope, body, now_ns)
        elif mt is MsgType.APPLY_REPORT and host is not None and host in self.inv.hosts:
            self._on_apply_report(host, body[1], body[2], now_ns)  # (first: most of what agents send)
        elif host is None or host not in self.inv.hosts:
            if envelope and envelope[0] in self.members.refused:
                self.dropped_malformed += 1  # a host we refused: no invitation to register again
            elif mt in (MsgType.AGENT_STATUS, MsgType.APPLY_REPORT, MsgType.ACK, MsgType.TABLE_REPORT):
                # An agent we do not know (we restarted, or it did): ask it to register again.
                self.outbox.append((envelope, wire.encode(MsgType.REQUEST, [0, "register", {}])))
            else:
                self.dropped_malformed += 1
        elif mt is MsgType.AGENT_STATUS:
            self.members.on_status(host, body, now_ns)
        elif mt is MsgType.TABLE_REPORT:
            self.members.seen(host, now_ns)
            for vlan, mac, ehost, _port, seq, tomb in body[1]:
                self._adopt((vlan, mac), ehost, seq, tomb, now_ns)
        elif mt is MsgType.ACK:
            self.members.seen(host, now_ns)
            self._on_ack(host, body, now_ns)
        elif mt is MsgType.REPLY:
            self.members.seen(host, now_ns)
        else:
            # (APPLIED among them: no agent sends it since APPLY_REPORT replaced it.)
            self.dropped_malformed += 1

    def on_timer(self, now_ns: int) -> None:
        if self.members.dirty:
            self.members.broadcast(now_ns)
        if now_ns < self._next_tick_ns:
            return
        if self._started_ns is None:
            self._started_ns = now_ns
        self._next_tick_ns = now_ns + self._tick_ns
        if self.pacing.tick(len(self.ops), now_ns):
            self._tell_pacing(h for h in self.inv.hosts.values() if h.state != "dead")
        self._check_liveness(now_ns)
        if self.restarts.pending:
            self._retry_restarts(now_ns)
        if self._hint_ns:
            self.outbox.extend(self.hints.due(now_ns, self.ops, self.inv, self.applies, self.members.rank))
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
        if self.maint.busy():
            self.maint.run(now_ns)
        self.members.check_ready(now_ns)

    # ------------------------------------------------------------------ agents

    def _on_register(self, envelope: list, body: list, now_ns: int) -> None:
        got = self.members.register(envelope, body, now_ns)
        if got is None:
            return  # refused
        self.restarts.registered(now_ns)
        name, prev, incarnation = got
        if prev is not None and incarnation < prev:
            return  # a stale message from an earlier life of that host
        if self.pacing.batching:
            self._tell_pacing([self.inv.hosts[name]])
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
        self.members.check_ready(now_ns)

    def _tell_pacing(self, hosts) -> None:
        """How the agents on `hosts` should pace their apply reports now (controller/reportpace.py)."""
        frame = None
        for h in hosts:
            if h.route:
                frame = frame or self.pacing.notice()
                self.pacing.notices += 1
                self.outbox.append((h.route, frame))

    def _check_liveness(self, now_ns: int) -> None:
        died = self.members.scan(now_ns)
        if not died:
            return
        for op in list(self.ops.values()):
            if is_commanding(op.phase) and op.target[0] in died:
                op.end(Outcome.TARGET_DIED, f"{op.target[0]} died before it took over {op.vm}")
                self._finish(op, now_ns)
            else:
                self._check_converged(op, now_ns)
        # HA: every VM of a dead host starts again on a live one, with a new seq; one placement
        # decision per VM, each counting those made before it in this round.
        load = self.placement.load() if any(vm.host in died for vm in self.inv.vms.values()) else None
        for vm in sorted(self.inv.vms.values(), key=lambda v: v.number):
            if vm.host in died and vm.state == "active" and vm.key not in self.ops_by_key:
                self._restart(vm, now_ns, load=load)

    def _retry_restarts(self, now_ns: int) -> None:
        load = None
        for vm in self.restarts.due(now_ns, self.inv, self.ops_by_key, self.is_admitted):
            if load is None:
                load = self.placement.load()
            self._restart(vm, now_ns, prefer=vm.host, load=load)

    def _restart_orphans(self, now_ns: int) -> None:
        """After a restart of ours: VMs on hosts that never registered again within the dead
        timeout are as good as on a dead host (HA)."""
        load = self.placement.load()
        for vm in sorted(self.inv.vms.values(), key=lambda v: v.number):
            if vm.key in self.ops_by_key:
                continue
            if vm.state == "creating":
                # Cut short by our crash, and no agent reported holding it: finish the create on
                # its host if that is up (ATTACH is idempotent), else start it elsewhere.
                h = self.inv.hosts.get(vm.host)
                if h is not None and h.state == "alive":
                    self.start_op("create", vm, vm.host, vm.host, (vm.host, vm.seq, False), now_ns)
                    continue
                vm.state = "active"
            if vm.state == "active" and vm.host not in self.inv.hosts:
                self._restart(vm, now_ns, load=load)

    def _restart(self, vm: Vm, now_ns: int, prefer: str | None = None, load: dict[str, int] | None = None
                 ) -> Op | None:
        """Start `vm` on `prefer` if it is alive, else on the live host with the fewest VMs."""
        allowed, next_try_ms = self.restarts.allow(vm, now_ns)
        if next_try_ms is not None:
            self.event("ha.blocked", f"vm {vm.name}: restart budget exhausted ({self.config.restart_budget} restarts within "
                        f"{self.config.restart_budget_window_ms} ms; last target {vm.host}, seq {vm.seq}); "
                        f"reconciling from agent reports, next try in {next_try_ms} ms",
                        vm=vm.name, reason="restart budget exhausted")
        if not allowed:
            return None
        dst = self.placement.place(load, prefer, vm.name)
        if dst is None:
            if vm.name not in self.restarts.unplaceable_noted and self.inv.hosts:
                self.restarts.unplaceable_noted.add(vm.name)
                why = self.placement.why_unplaceable(vm.name)
                self.event("ha.blocked", f"vm {vm.name}: cannot restart it yet: {why}; trying again",
                            vm=vm.name, reason=why)
            # Nowhere to go now (e.g. we were paused and every host looks suspect): try again.
            self.restarts.refund(vm)
            self.restarts.defer(vm, now_ns)
            return None
        self.restarts.unplaceable_noted.discard(vm.name)
        vm.seq_issued = max(vm.seq, vm.seq_issued) + 1
        self.event("ha.restart", vm=vm.name, src=vm.host, dst=dst)
        return self.start_op("restart", vm, vm.host, dst, (dst, vm.seq_issued, False), now_ns)

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

    def _on_apply_report(self, host: str, rows: list, ranges: list, now_ns: int) -> None:
        self.members.seen(host, now_ns)
        self.hints.report_arrived(host, min(rows[0][5] if rows else now_ns, ranges[0][4] if ranges else now_ns),
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
        self.persist(vm)
        h = self.inv.hosts.get(host)
        if not tomb and h is not None and h.state == "dead":
            self._restart(vm, now_ns)
        # A host we have not heard from yet may still register (we may have just restarted):
        # _restart_orphans deals with hosts that never do.

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
        self.event("move.switched", op=op.op_id, vm=op.vm, host=host)
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
        self.persist(vm)
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

    def start_op(self, kind: str, vm: Vm, src: str, dst: str, target: tuple[str, int, bool], now_ns: int) -> Op:
        op = Op(self._new_op_id(), kind, vm.name, src, dst, target, vm.key, now_ns,
                now_ns + self.config.op_timeout_ms * NS_PER_MS)
        self.ops[op.op_id] = op
        self.ops_by_key[vm.key] = op
        self.event("move.started", op=op.op_id, vm=vm.name, op_kind=kind, src=src, dst=dst)  # ("kind" is the event's)
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
        self.event("move.converged", op=op.op_id, vm=op.vm, dst=op.target[0], convergence_ms=op.latency_ms,
                    hosts=self.applies.live_n)
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
        if not op.converged:
            self.event("move.failed", op=op.op_id, vm=op.vm, outcome=op.outcome.value, error=op.error)
        sent_claim = (op.kind, op.phase) in CLAIM_MAY_BE_OUT
        was = op.phase
        op.phase = Phase.DONE
        op.done_ns = now_ns
        if vm is not None and was is not Phase.CONVERGING:
            # Aborted before the target owned the MAC (the inventory already follows a target
            # that did, even if some agent lags).
            if op.kind == "create":
                vm.state = "failed"
                self.persist(vm)
            elif op.kind in ("move", "restart"):
                vm.state = "active"
                h = self.inv.hosts.get(vm.host)
                if sent_claim or op.src_lost or h is None or h.state == "dead":
                    # The target may have claimed seq+1 after all, or the VM's host is gone:
                    # a fresh claim with a higher seq leaves exactly one owner. Not at once
                    # after a refusal: an agent that keeps refusing must not make us spin.
                    if op.outcome is Outcome.REFUSED:
                        self.restarts.needs_claim[vm.name] = True
                        self.restarts.defer(vm, now_ns)
                    else:
                        self._restart(vm, now_ns, prefer=vm.host)
        if op.kind in ("move", "restart"):
            self.history.append(op)
            if self.maint.tracking():
                self.maint.op_ended(op, vm, now_ns)
        if vm is not None and vm.state == "active" and vm.key not in self.ops_by_key:
            h = self.inv.hosts.get(vm.host)
            if h is not None and h.state == "dead":
                # Its new host died while the op converged (HA skipped it while it was busy).
                self._restart(vm, now_ns)
        for batch in op.waiters:
            batch.pending.discard(op.op_id)
            if not batch.pending:
                self.api.reply_batch(batch)
