"""The real controller process: ControllerCore on asyncio (uvloop) behind one ZeroMQ ROUTER."""

from __future__ import annotations

import asyncio
import logging
import os
import time

import zmq

from agent import wire
from agent.zmqloop import Reader, Timer, bind_ephemeral, on_stop_signals, write_ready
from controller.config import ControllerConfig
from controller.core import ControllerCore

log = logging.getLogger("controller")


class ControllerRuntime:
    def __init__(self, config: ControllerConfig, *, bind: str | None = None, bind_ip: str = "127.0.0.1",
                 ready_fd: int | None = None) -> None:
        self.config = config
        self.bind = bind
        self.bind_ip = bind_ip
        self.ready_fd = ready_fd

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
        self.core = ControllerCore(self.config)
        self.timer = Timer(loop, self._on_timer)
        self.reader = Reader(loop, self.sock, self._on_frames, self._after)
        stop = asyncio.Event()
        on_stop_signals(loop, stop)
        self.core.on_timer(time.monotonic_ns())
        self._after()
        write_ready(self.ready_fd, {"controller": endpoint, "pid": os.getpid()})
        log.info("controller up on %s", endpoint)
        await stop.wait()
        log.info("controller stopping")
        self.reader.close()
        self.sock.close(linger=0)
        self.ctx.term()
        return 0

    def _on_frames(self, frames: list[bytes]) -> None:
        if len(frames) < 2:
            self.core.dropped_malformed += 1
            return
        self.core.on_frame(frames[:-1], frames[-1], time.monotonic_ns())

    def _on_timer(self) -> None:
        self.core.on_timer(time.monotonic_ns())
        self._after()

    def _after(self) -> None:
        for envelope, payload in self.core.take_outbox():
            try:
                self.sock.send_multipart([*envelope, payload], zmq.NOBLOCK)
            except zmq.ZMQError as e:
                log.debug("send failed: %s", e)
        self.timer.set(self.core.next_deadline_ns())
        self.reader.check()
