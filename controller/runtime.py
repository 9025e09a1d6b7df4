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
from agent.wire import MsgType, WireError
from controller import journal
from controller.config import ControllerConfig
from controller.core import ControllerCore
from controller.groupcommit import GroupCommit
from dvswitch import auth, keys
from dvswitch.bus import Reader, Timer, bind_ephemeral, on_stop_signals, send_parts, tune_gc, write_ready
from dvswitch.events import EventLog, NoEventLog, stop_reasons
from dvswitch.profiling import Profiler

log = logging.getLogger("controller")

KEY_RELOAD_S = 1.0  # how often the key directory is checked for a rotation (one stat())
REQUEST, REGISTER = MsgType.REQUEST, MsgType.REGISTER
AGENT_CONNS_MAX = 4096  # (host role, routing id) pairs remembered as judged before starting afresh


class ControllerRuntime:
    def __init__(self, config: ControllerConfig, *, bind: str | None = None, bind_ip: str = "127.0.0.1",
                 ready_fd: int | None = None, journal: str | None = None,
                 hosts: list[str] | None = None, metrics_port: int = -1, parent_pid: int | None = None,
                 events_path: str | None = None, events_applies: bool = False,
                 keys_dir: str | None = None) -> None:
        self.config = config
        self.events_path = events_path  # our events file (dvswitch/events.py); None: none
        # Also log every apply report row (apply.rows): the chaos runner's history. Off by
        # default: at thousands of VMs and hosts that is millions of rows.
        self.events_applies = events_applies
        self.events: EventLog = NoEventLog("controller")
        self.keys_dir = keys_dir  # None: no CURVE; else the cluster's keys (dvswitch/keys.py)
        self.guard: auth.Guard | None = None
        self.hosts = list(hosts or [])  # admitted at start, besides those the journal admitted
        self.metrics_port = metrics_port  # -1: no metrics server (see agent/metrics.py)
        self.parent_pid = parent_pid  # stop when this process exits (see agent/lifeline.py)
        self.bind = bind
        self.bind_ip = bind_ip
        self.ready_fd = ready_fd
        self.journal_path = Path(journal) if journal else None
        self.journal_file = None
        self.commit: GroupCommit | None = None  # the journal's writer (controller/groupcommit.py)
        # With CURVE: (role, routing id) of host connections named after their host, so their
        # frames skip the per-frame role checks of _on_frames_auth (they cannot change: a
        # connection keeps its key and its routing id).
        self._agent_conns: set[tuple[str, bytes]] = set()

    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        self.ctx = zmq.Context.instance()
        if self.keys_dir is not None:
            self.guard = auth.Guard(self.ctx, self.keys_dir, keys.CONTROLLER, log)
            self.guard.start()
        self.sock = self.ctx.socket(zmq.ROUTER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.setsockopt(zmq.SNDHWM, 100_000)
        self.sock.setsockopt(zmq.RCVHWM, 100_000)
        self.sock.setsockopt(zmq.MAXMSGSIZE, wire.SOCKET_MAX_BYTES)
        self.sock.setsockopt(zmq.ROUTER_HANDOVER, 1)
        if self.guard is not None:
            self.guard.server(self.sock)
        if self.bind:
            self.sock.bind(self.bind)
            endpoint = self.sock.getsockopt_string(zmq.LAST_ENDPOINT)
        else:
            endpoint = bind_ephemeral(self.sock, self.bind_ip)
        if self.events_path:
            self.events = EventLog(self.events_path, "controller")
            if self.guard is not None:
                self.guard.events = self.events
        self.core = ControllerCore(self.config, journal=self._read_journal(), hosts=self.hosts)
        self.core.api.runtime_methods["profile"] = Profiler().api  # (admin only with CURVE: API requests are)
        self._seen: _Seen | None = _Seen(self.core) if self.events_path else None
        if self._seen is not None:
            self._seen.applies = self.events_applies
        if self.journal_path is not None:
            self.journal_file = open(self.journal_path, "ab")  # noqa: SIM115
            self.commit = GroupCommit(loop, self.journal_file, self._send_all)
        self.timer = Timer(loop, self._on_timer)
        self.monitors: list[Reader] = []
        if self.guard is not None:
            self.reader = Reader(loop, self.sock, self._on_frames_auth, self._after, roles=True)
            self.guard.monitor(self.sock, "controller", self._add_monitor)
            self._key_timer = loop.call_later(KEY_RELOAD_S, self._reload_keys)
        else:
            self.reader = Reader(loop, self.sock, self._on_frames, self._after)
        stop = asyncio.Event()
        on_stop_signals(loop, stop)
        self.stop_reason = stop_reasons(loop, stop)
        if self.parent_pid:
            watch_owner(loop, self.parent_pid, lambda: (self.stop_reason.append("owner gone"), stop.set()))
        ready = {"controller": endpoint, "pid": os.getpid()}
        if self.metrics_port >= 0:
            cm = metrics.ControllerMetrics()
            url = metrics.serve(loop, lambda: cm.read(self.core, time.monotonic_ns())
                                + auth.metrics("dvs_controller", self._auth_status()), self.bind_ip,
                                self.metrics_port)
            if url:
                ready["metrics"] = url
        self.core.on_timer(time.monotonic_ns())
        tune_gc()
        self._after()
        write_ready(self.ready_fd, ready)
        log.info("controller up on %s (%s)", endpoint,
                 f"CURVE, key {keys.fingerprint(self.guard.pair.public)}" if self.guard else "INSECURE: no CURVE")
        self.events.emit("process.up", endpoint=endpoint, hosts=len(self.core.inv.hosts),
                         vms=len(self.core.inv.vms), curve=self.guard is not None,
                         message=f"controller up on {endpoint}")
        await stop.wait()
        log.info("controller stopping")
        reason = self.stop_reason[0] if self.stop_reason else "stopped"
        self.reader.close()
        for r in self.monitors:
            r.close()
        if self.guard is not None:
            self._key_timer.cancel()
            self.guard.close()
        if self.commit is not None:
            self.commit.close()  # (what waited for the disk still goes before the socket closes)
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
            self._told_malformed(frames)

    def _told_malformed(self, frames: list[bytes]) -> None:
        """frame.dropped (rate-limited) for a malformed frame the core or the auth gate counted."""
        # Whose it was: an agent's control socket is named agent:HOST:INCARNATION:NONCE.
        who = frames[0].decode(errors="replace")
        peer = who.split(":")[1] if who.startswith("agent:") and who.count(":") >= 2 else "client"
        total = self.core.dropped_malformed
        self.events.limited("frame.dropped", peer, reason="dropped_malformed", total=total,
                            message=f"dropped a frame from {peer}: malformed ({total} so far)")

    # ---- authentication (dvswitch/auth.py)

    def _add_monitor(self, mon: zmq.Socket, handle) -> None:
        r = Reader(asyncio.get_running_loop(), mon, handle, lambda: None)
        r.kick()  # (a pipe signals new input only after a read found it empty: arm it)
        self.monitors.append(r)

    def _reload_keys(self) -> None:
        self.guard.reload()
        self._key_timer = asyncio.get_running_loop().call_later(KEY_RELOAD_S, self._reload_keys)

    def _auth_status(self) -> dict:
        return self.guard.status() if self.guard is not None else auth.insecure_status()

    def _on_frames_auth(self, frames: list[bytes], role: str | None) -> None:
        """With CURVE: API requests only from the admin key; registrations and everything an agent
        sends only from a host key, over the connection named after that host (`agent:HOST:...`),
        and a registration only in that host's own name."""
        if len(frames) < 2:
            self.core.dropped_malformed += 1
            return
        frame = frames[-1]
        mt = auth.peek_type(frame)
        if (role, frames[0]) in self._agent_conns and mt is not None and mt != REQUEST and mt != REGISTER:
            self._on_frames(frames)  # (a host's own connection, already judged: most frames)
            return
        body = None
        if mt is None or mt == REQUEST or mt == REGISTER:
            try:  # (rare messages: an API call, a registration, a non-canonical encoding)
                mt, body = wire.decode(frame, wire.MAX_SMALL_FRAME_BYTES)
            except WireError:
                self.core.dropped_malformed += 1
                self._told_malformed(frames)
                return
        if role == keys.ADMIN:
            # (Anything else the admin sends meets the core's own gate: no route, no host.)
            if mt == REGISTER:
                self.guard.refuse(role, "a registration (only a host's own key registers it)")
                return
            if mt == REQUEST and body[1] == "auth":  # the runtime's own counters (`dvs status`)
                send_parts(self.sock, [*frames[:-1], wire.encode(MsgType.REPLY, [body[0], True,
                                                                                self._auth_status()])])
                self.reader.check()
                return
        else:
            host = keys.host_of_role(role)
            if host is None:
                self.guard.refuse(role, f"a message of type {int(mt)}")
                return
            if mt == REQUEST:
                self.guard.refuse(role, "an API request (a host key may not call the API)")
                return
            if not frames[0].startswith(f"agent:{host}:".encode()):
                self.guard.refuse(role, f"a message over a connection not named after {host}")
                return
            if mt == REGISTER and body[0] != host:
                self.guard.refuse(role, f"a registration as {str(body[0])[:40]!r}")
                return
            if len(self._agent_conns) >= AGENT_CONNS_MAX:
                self._agent_conns.clear()
            self._agent_conns.add((role, frames[0]))
        self._on_frames(frames)

    def _on_timer(self) -> None:
        self.core.on_timer(time.monotonic_ns())
        # Every tick, not only after startup: the inventory and its ops keep growing (a cold
        # start of thousands of ports), and frozen objects are never scanned again, so this
        # collection only looks at what the last tick allocated before freezing it too. A frozen
        # cycle would never be collected: tests/test_agent_gc.py holds that the controller core
        # makes none over a long run of moves, restarts and reports.
        tune_gc()
        self._after()

    def _send_all(self, outbox: list) -> None:
        for envelope, payload in outbox:
            try:
                send_parts(self.sock, [*envelope, payload])
            except zmq.ZMQError as e:
                log.debug("send failed: %s", e)
        # (A send can swallow the edge that announced new input: a release from the journal
        # thread's callback comes outside any drain, so look again.)
        self.reader.check()

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
        data = b"".join(map(journal.encode, records)) if records and self.commit is not None else b""
        # Events before replies too: whoever hears that a move converged (and then kills us)
        # finds it, and every apply report it waited for, in our events file.
        events = self.core.take_events()
        for event in events:
            if not isinstance(event, dict):
                log.warning("%s", event)
            elif "message" in event:  # (the rest are facts for the events file, not log lines)
                log.warning("%s", event["message"])
        if self.events_path:
            if self._seen is not None:
                try:
                    events = self._seen.complete(events)
                except (AttributeError, KeyError, TypeError) as e:
                    # The core changed under the runtime (a refactor): its own events go on.
                    log.error("no more derived events: %s: %s", type(e).__name__, e)
                    self._seen = None
            self.events.emit_many(events)
        outbox = self.core.take_outbox()
        if self.commit is not None:
            # Durable before anyone hears of it: what follows a record waits for its fsync
            # (done off the loop, one for every record journaled meanwhile).
            self.commit.submit(data, outbox)
        elif outbox:
            self._send_all(outbox)
        self.timer.set(self.core.next_deadline_ns())
        self.reader.check()


class _Seen:
    """What the runtime adds to the core's events from what the core exposes: a finished move's
    or HA restart's whole record (op_kind, src, seq, switch_ns, started_ns, done_ns, missing:
    what `dvs moves` shows and the chaos checker reads) on its move.converged / move.failed,
    host.registered and host.alive (a suspect host heard again), and with --events-applies
    every apply report row (apply.rows). O(what changed) per batch, except the host scan,
    which runs only when the membership epoch moved or a liveness tick ran."""

    def __init__(self, core: ControllerCore) -> None:
        self.core = core
        self.epoch = core.peers_epoch
        self.hosts = {h.name: h.state for h in core.inv.hosts.values()}
        self.last_done = core.history[-1] if core.history else None
        self.applied = _applied_total(core)
        self.applies = False
        self.tick = 0
        self.op_kinds: dict[int, str] = {}  # op in flight -> its kind, from its move.started

    def complete(self, events: list) -> list:
        core = self.core
        out = list(events)
        kinds = self.op_kinds
        for e in out:
            if not isinstance(e, dict) or not e.get("kind", "").startswith("move."):
                continue
            if e["kind"] == "move.started":
                kinds[e["op"]] = e.get("op_kind")
                continue
            # (the last event of every op: a create's or a delete's says what it was, too)
            kind = kinds.get(e.get("op")) if e["kind"] == "move.switched" else kinds.pop(e.get("op"), None)
            if kind is not None:
                e.setdefault("op_kind", kind)
        if len(kinds) > 2 * len(core.ops) + 1_000:  # (ends the core had no room to tell)
            self.op_kinds = {n: k for n, k in kinds.items() if n in core.ops}
        if core.peers_epoch != self.epoch or self.tick != core._next_tick_ns:
            self.tick, self.epoch = core._next_tick_ns, core.peers_epoch
            out += self._hosts()
        hist = core.history
        if hist and hist[-1] is not self.last_done:
            done = {}
            for op in reversed(hist):
                if op is self.last_done:
                    break
                done[op.op_id] = op
            self.last_done = hist[-1]
            for e in out:
                if not isinstance(e, dict) or e.get("kind") not in ("move.converged", "move.failed"):
                    continue
                op = done.pop(e.get("op"), None)
                if op is not None:
                    _add_record(e, op)
            for op in done.values():  # (an event the core's bounded queue had no room for)
                out.append(_add_record({"kind": "move.converged" if op.converged else "move.failed",
                                        "op": op.op_id, "vm": op.vm}, op))
        if self.applies and _applied_total(core) != self.applied:
            total = _applied_total(core)
            n = total - self.applied
            rows = list(itertools.islice(reversed(core.applied_log), n))
            rows.reverse()
            self.applied = total
            # (t_ns, reporter, vlan, mac, host, seq, tombstone), as the applied_log API gives them
            out.append({"kind": "apply.rows", "rows": rows, **({"lost": n - len(rows)} if n > len(rows) else {})})
        return out

    def _hosts(self) -> list[dict]:
        out = []
        for h in self.core.inv.hosts.values():
            was = self.hosts.get(h.name)
            if was == h.state:
                continue
            self.hosts[h.name] = h.state
            if was is None:
                out.append({"kind": "host.registered", "host": h.name})
            elif was == "suspect" and h.state == "alive":
                out.append({"kind": "host.alive", "host": h.name, "was": was})
        return out


def _applied_total(core: ControllerCore) -> int:
    """Apply rows the core has logged so far (also those its bounded applied_log dropped)."""
    tracker = getattr(core, "applies", None)  # (the core split into components keeps them there)
    return tracker.applied_count if tracker is not None else core._applied_total()


def _add_record(e: dict, op) -> dict:
    """The op's record (as `dvs moves` gives it) into its event, without overriding the core's facts."""
    rec = op.record(per_host=False)
    rec.pop("applied_ms", None)
    rec["op_kind"] = rec.pop("kind")
    rec.pop("latency_ms", None)  # (the event's convergence_ms)
    e.setdefault("convergence_ms", op.latency_ms)
    for k, v in rec.items():
        e.setdefault(k, v)
    return e
