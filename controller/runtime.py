"""The real controller process: ControllerCore on asyncio (uvloop) behind one ZeroMQ ROUTER."""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import time
from pathlib import Path

import zmq

from agent import metrics, wire
from agent.lifeline import watch_owner
from agent.zmqloop import Reader, Timer, bind_ephemeral, on_stop_signals, send_parts, tune_gc, write_ready
from controller import journal
from controller.config import ControllerConfig
from controller.core import ControllerCore
from dvswitch.events import EventLog, NoEventLog, stop_reasons

log = logging.getLogger("controller")

# Core events that also go to the log as warnings (someone should look); the others only to
# the events file (and the log at debug level).
WARN_KINDS = {"log", "host.refused", "ha.blocked", "maintenance.blocked"}


class ControllerRuntime:
    def __init__(self, config: ControllerConfig, *, bind: str | None = None, bind_ip: str = "127.0.0.1",
                 ready_fd: int | None = None, journal: str | None = None,
                 hosts: list[str] | None = None, metrics_port: int = -1, parent_pid: int | None = None,
                 events_path: str | None = None, events_applies: bool = False) -> None:
        self.config = config
        self.events_path = events_path  # our events file (dvswitch/events.py); None: none
        # Also log every apply report row (apply.rows): the chaos runner's history. Off by
        # default: at thousands of VMs and hosts that is millions of rows.
        self.events_applies = events_applies
        self.events: EventLog = NoEventLog("controller")
        self.hosts = list(hosts or [])  # admitted at start, besides those the journal admitted
        self.metrics_port = metrics_port  # -1: no metrics server (see agent/metrics.py)
        self.parent_pid = parent_pid  # stop when this process exits (see agent/lifeline.py)
        self.bind = bind
        self.bind_ip = bind_ip
        self.ready_fd = ready_fd
        self.journal_path = Path(journal) if journal else None
        self.journal_file = None

    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        self.ctx = zmq.Context.instance()
        self.sock = self.ctx.socket(zmq.ROUTER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.setsockopt(zmq.SNDHWM, 100_000)
        self.sock.setsockopt(zmq.RCVHWM, 100_000)
        self.sock.setsockopt(zmq.MAXMSGSIZE, wire.SOCKET_MAX_BYTES)
        self.sock.setsockopt(zmq.ROUTER_HANDOVER, 1)
        if self.bind:
            self.sock.bind(self.bind)
            endpoint = self.sock.getsockopt_string(zmq.LAST_ENDPOINT)
        else:
            endpoint = bind_ephemeral(self.sock, self.bind_ip)
        if self.events_path:
            self.events = EventLog(self.events_path, "controller")
        self.core = ControllerCore(self.config, journal=self._read_journal(), hosts=self.hosts)
        self._seen: _Seen | None = _Seen(self.core) if self.events_path else None
        if self.journal_path is not None:
            self.journal_file = open(self.journal_path, "ab")  # noqa: SIM115
        self.timer = Timer(loop, self._on_timer)
        self.reader = Reader(loop, self.sock, self._on_frames, self._after)
        stop = asyncio.Event()
        on_stop_signals(loop, stop)
        self.stop_reason = stop_reasons(loop, stop)
        if self.parent_pid:
            watch_owner(loop, self.parent_pid, lambda: (self.stop_reason.append("owner gone"), stop.set()))
        ready = {"controller": endpoint, "pid": os.getpid()}
        if self.metrics_port >= 0:
            cm = metrics.ControllerMetrics()
            url = metrics.serve(loop, lambda: cm.read(self.core, time.monotonic_ns()), self.bind_ip,
                                self.metrics_port)
            if url:
                ready["metrics"] = url
        self.core.on_timer(time.monotonic_ns())
        tune_gc()
        self._after()
        write_ready(self.ready_fd, ready)
        log.info("controller up on %s", endpoint)
        self.events.emit("process.up", endpoint=endpoint, hosts=len(self.core.inv.hosts),
                         vms=len(self.core.inv.vms), message=f"controller up on {endpoint}")
        await stop.wait()
        log.info("controller stopping")
        reason = self.stop_reason[0] if self.stop_reason else "stopped"
        self.reader.close()
        self.sock.close(linger=0)
        if self.journal_file:
            self.journal_file.close()
        self.ctx.term()
        self.events.emit("process.down", reason=reason, message=f"controller stopped ({reason})")
        self.events.close()
        return 0

    def _on_frames(self, frames: list[bytes]) -> None:
        core = self.core
        if len(frames) < 2:
            core.dropped_malformed += 1
            return
        seen = core.dropped_malformed
        core.on_frame(frames[:-1], frames[-1], time.monotonic_ns())
        if core.dropped_malformed != seen:
            # Whose it was: an agent's control socket is named agent:HOST:INCARNATION.
            who = frames[0].decode(errors="replace")
            peer = who.split(":")[1] if who.startswith("agent:") and who.count(":") >= 2 else "client"
            self.events.limited("frame.dropped", peer, reason="dropped_malformed", total=core.dropped_malformed,
                                message=f"dropped a frame from {peer}: malformed ({core.dropped_malformed} so far)")

    def _on_timer(self) -> None:
        self.core.on_timer(time.monotonic_ns())
        # Every tick, not only after startup: the inventory and its ops keep growing (a cold
        # start of thousands of ports), and frozen objects are never scanned again, so this
        # collection only looks at what the last tick allocated before freezing it too.
        tune_gc()
        self._after()

    def _read_journal(self) -> list[dict]:
        if self.journal_path is None:
            return []
        rec = journal.read(self.journal_path)
        moved = journal.repair(rec)
        if moved is not None:
            log.error("journal %s damaged at byte %d (%s): kept %d records, moved the %d bytes from there "
                      "to %s", self.journal_path, rec.sound_bytes, rec.why, len(rec.records),
                      rec.size_bytes - rec.sound_bytes, moved)
        else:
            log.info("recovered %d journal records from %s%s", len(rec.records), self.journal_path,
                     " (previous format: rewritten)" if rec.legacy else "")
        return rec.records

    def _after(self) -> None:
        records = self.core.take_journal()
        if records and self.journal_file is not None:
            # Durable before anyone hears of it: write and fsync, then send.
            self.journal_file.write(b"".join(map(journal.encode, records)))
            self.journal_file.flush()
            os.fsync(self.journal_file.fileno())
        # Events before replies too: whoever hears that a move converged (and then kills us)
        # finds it, and every apply report it waited for, in our events file.
        events = self.core.take_events()
        for event in events:
            if not isinstance(event, dict):
                log.warning("%s", event)
            else:  # what needs the operator stays a warning; the rest is in the events file
                log.log(logging.WARNING if event.get("kind") in WARN_KINDS else logging.DEBUG, "%s",
                        event.get("message") or event)
        if self.events_path:
            self.events.emit_many(events)
            if self._seen is not None:
                try:
                    self._seen.derive(self.events, self.events_applies, events)
                except (AttributeError, KeyError, TypeError) as e:
                    # The core changed under the runtime (a refactor): its events stop, it goes on.
                    log.error("no more derived events: %s: %s", type(e).__name__, e)
                    self._seen = None
        for envelope, payload in self.core.take_outbox():
            try:
                send_parts(self.sock, [*envelope, payload])
            except zmq.ZMQError as e:
                log.debug("send failed: %s", e)
        self.timer.set(self.core.next_deadline_ns())
        self.reader.check()


class _Seen:
    """Events the runtime derives from what the core exposes, for what the core does not emit
    itself: host states, membership epochs, moves and HA restarts started and finished, and
    (--events-applies) every apply report row. Each check is O(what changed) except the host
    scan, which runs only when the membership epoch moved or a tick may have changed liveness."""

    def __init__(self, core: ControllerCore) -> None:
        self.core = core
        self.epoch = core.peers_epoch
        self.hosts = {h.name: h.state for h in core.inv.hosts.values()}
        self.next_op = core._next_op  # (ops are numbered 1, 2, 3 ...: the ones above it are new)
        self.last_done = core.history[-1] if core.history else None
        self.applied = _applied_total(core)
        self.tick = 0
        self.moving: dict[int, object] = {}  # moves and restarts started, not switched over yet
        self.core_kinds: set[str] = set()

    def _emit(self, ev: EventLog, kind: str, **fields) -> None:
        if kind not in self.core_kinds:
            ev.emit(kind, **fields)

    def derive(self, ev: EventLog, applies: bool, core_events: list) -> None:
        """`core_events`: what the core emitted itself this time; a kind it emits is never derived
        again (so a core that learns to emit move.converged replaces the derivation, no doubles)."""
        for e in core_events:
            if isinstance(e, dict) and e.get("kind") not in (None, "log"):
                self.core_kinds.add(e["kind"])
        core = self.core
        if core.peers_epoch != self.epoch or self.tick != core._next_tick_ns:
            self.tick = core._next_tick_ns
            self._hosts(ev)
            if core.peers_epoch != self.epoch:
                self.epoch = core.peers_epoch
                live = len(core.inv.live_hosts())
                self._emit(ev, "membership.epoch", epoch=core.peers_epoch, hosts=live,
                           message=f"membership epoch {core.peers_epoch}: {live} live hosts")
        if core._next_op != self.next_op:
            for n in range(self.next_op, core._next_op):
                op = core.ops.get(n)
                if op is None or op.kind not in ("move", "restart"):
                    continue  # (finished already: its move.converged/failed follows; creates are many)
                if op.kind == "restart":
                    self._emit(ev, "ha.restart", op=n, vm=op.vm, src=op.src, dst=op.dst, seq=op.target[1],
                               message=f"HA: {op.vm} restarts on {op.dst} ({op.src} is gone)")
                else:
                    self._emit(ev, "move.started", op=n, vm=op.vm, op_kind=op.kind, src=op.src, dst=op.dst,
                               seq=op.target[1], message=f"move of {op.vm} {op.src} -> {op.dst} started")
                self.moving[n] = op
            self.next_op = core._next_op
        if self.moving:
            for n, op in list(self.moving.items()):
                if op.switched:
                    del self.moving[n]
                    self._emit(ev, "move.switched", op=n, vm=op.vm, host=op.dst, op_kind=op.kind,
                               switch_ns=op.switch_ns, message=f"{op.vm} switched over to {op.dst}")
                elif n not in core.ops:
                    del self.moving[n]  # ended before it switched: its move.failed follows
        hist = core.history
        if hist and hist[-1] is not self.last_done:
            new = []
            for op in reversed(hist):
                if op is self.last_done:
                    break
                new.append(op)
            self.last_done = hist[-1]
            for op in reversed(new):
                kind, fields = _finished(op)
                self._emit(ev, kind, **fields)
        if applies and _applied_total(core) != self.applied:
            total = _applied_total(core)
            n = total - self.applied
            rows = list(itertools.islice(reversed(core.applied_log), n))
            rows.reverse()
            self.applied = total
            # (t_ns, reporter, vlan, mac, host, seq, tombstone), as the applied_log API gives them
            self._emit(ev, "apply.rows", rows=rows, **({"lost": n - len(rows)} if n > len(rows) else {}))

    def _hosts(self, ev: EventLog) -> None:
        for h in self.core.inv.hosts.values():
            was = self.hosts.get(h.name)
            if was == h.state:
                continue
            self.hosts[h.name] = h.state
            if h.state == "dead":
                self._emit(ev, "host.dead", host=h.name, message=f"host {h.name} is dead: silent too long")
            elif h.state == "suspect":
                self._emit(ev, "host.suspect", host=h.name, message=f"host {h.name} is suspect: silent")
            elif was is None:
                self._emit(ev, "host.registered", host=h.name, message=f"host {h.name} registered")
            elif was == "dead":
                self._emit(ev, "host.readmitted", host=h.name, message=f"host {h.name} is back")
            else:
                self._emit(ev, "host.alive", host=h.name, was=was, message=f"host {h.name} heard again (was {was})")


def _applied_total(core: ControllerCore) -> int:
    """Apply rows the core has logged so far (also those its bounded applied_log dropped)."""
    tracker = getattr(core, "applies", None)  # (the core split into components keeps them there)
    return tracker.applied_count if tracker is not None else core._applied_total()


def _finished(op) -> tuple:
    rec = op.record(per_host=False)
    rec.pop("applied_ms")
    fields = {"op": rec.pop("op"), "vm": rec.pop("vm"), "op_kind": rec.pop("kind")}
    fields.update(rec)
    fields["convergence_ms"] = fields.pop("latency_ms")
    fields["hosts"] = len(op.applied)
    what = f"{'HA restart' if op.kind == 'restart' else 'move'} of {op.vm} {op.src} -> {op.dst} (seq {fields['seq']})"
    if op.converged:
        fields["message"] = f"{what} converged in {op.latency_ms:.2f} ms on {len(op.applied)} hosts"
        return "move.converged", fields
    fields["outcome"] = "switched" if op.switched else "not switched"
    fields["message"] = f"{what} failed ({fields['outcome']}): {op.error}"
    return "move.failed", fields
