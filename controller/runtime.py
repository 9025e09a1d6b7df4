"""The real controller process: ControllerCore on asyncio (uvloop) behind one ZeroMQ ROUTER."""

from __future__ import annotations

import asyncio
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

log = logging.getLogger("controller")


class ControllerRuntime:
    def __init__(self, config: ControllerConfig, *, bind: str | None = None, bind_ip: str = "127.0.0.1",
                 ready_fd: int | None = None, journal: str | None = None,
                 hosts: list[str] | None = None, metrics_port: int = -1, parent_pid: int | None = None) -> None:
        self.config = config
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
        self.core = ControllerCore(self.config, journal=self._read_journal(), hosts=self.hosts)
        if self.journal_path is not None:
            self.journal_file = open(self.journal_path, "ab")  # noqa: SIM115
        self.timer = Timer(loop, self._on_timer)
        self.reader = Reader(loop, self.sock, self._on_frames, self._after)
        stop = asyncio.Event()
        on_stop_signals(loop, stop)
        if self.parent_pid:
            watch_owner(loop, self.parent_pid, stop.set)
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
        await stop.wait()
        log.info("controller stopping")
        self.reader.close()
        self.sock.close(linger=0)
        if self.journal_file:
            self.journal_file.close()
        self.ctx.term()
        return 0

    def _on_frames(self, frames: list[bytes]) -> None:
        if len(frames) < 2:
            self.core.dropped_malformed += 1
            return
        self.core.on_frame(frames[:-1], frames[-1], time.monotonic_ns())

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
        for envelope, payload in self.core.take_outbox():
            try:
                send_parts(self.sock, [*envelope, payload])
            except zmq.ZMQError as e:
                log.debug("send failed: %s", e)
        for event in self.core.take_events():
            if "message" in event:  # (the rest are facts for an event log, not log lines)
                log.warning("%s", event["message"])
        self.timer.set(self.core.next_deadline_ns())
        self.reader.check()
