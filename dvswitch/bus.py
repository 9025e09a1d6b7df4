"""Shared plumbing for the asyncio + ZeroMQ drivers (agent and controller); CURVE: dvswitch/auth.py.

ZeroMQ's socket FD is edge-triggered: it signals when the socket's state changes, not while
input is queued. So on every wake-up we drain until ZMQ_EVENTS no longer shows POLLIN (reading
ZMQ_EVENTS processes the socket's pending commands and re-arms the FD, as libzmq's docs ask),
and after sending on a socket we read its ZMQ_EVENTS again, since a send can consume the edge
that announced new input.

Why not end each drain with a NOBLOCK recv that raises EAGAIN (as this did until 2026-12): the
libzmq work is the same, but pyzmq builds a `zmq.Again` for it, whose __init__ runs two
function-level imports and a strerror: ~2.6 µs hot, far more with the cold caches of 33
processes on 2 cores, twice per gossip update an agent takes (its SUB, then its control socket
after sending the apply report). Reading ZMQ_EVENTS as a plain int costs ~1 µs.
"""

from __future__ import annotations

import asyncio
import gc
import json
import logging
import os
import signal
import time
from collections.abc import Callable

import zmq

# Frames handled per wake-up of one socket before yielding to the loop, so one busy
# socket cannot starve timers and the others.
DRAIN_BATCH = 512

# Plain ints: pyzmq's enum flags cost microseconds per use on the hot path.
NOBLOCK = int(zmq.NOBLOCK)
RCVMORE = int(zmq.RCVMORE)
EVENTS = int(zmq.EVENTS)
POLLIN = int(zmq.POLLIN)
_MORE_NOBLOCK = int(zmq.NOBLOCK) | int(zmq.SNDMORE)


def send_parts(sock: zmq.Socket, parts: list[bytes]) -> None:
    """`sock.send_multipart(parts, NOBLOCK)` without pyzmq's per-part enum arithmetic
    (`flags | SNDMORE` on enum flags cost ~10 us a frame in the controller's profile)."""
    send = sock.send
    for part in parts[:-1]:
        send(part, _MORE_NOBLOCK)
    send(parts[-1], NOBLOCK)


def tune_gc() -> None:
    """After startup: everything allocated so far (modules, the loop, sockets) lives as long as
    the process, so the collector need never scan it again (gc.freeze), and the young
    generation is collected every 20,000 allocations instead of 700 (a cold start allocates a
    table entry and a report row per port; the default had the collector run every few frames)."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(20_000, 20, 20)


def install_uvloop() -> None:
    try:
        import uvloop

        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    except ImportError:  # pragma: no cover - uvloop is a hard dependency; fall back quietly
        logging.getLogger(__name__).warning("uvloop not available; using the default asyncio loop")


class Reader:
    """Drains one socket into `handle(frames)` whenever it becomes readable.

    `single=True` (SUB sockets, whose messages are one frame) hands over `[frame]` per
    frame without pyzmq's multipart bookkeeping; a part of a multipart message from a
    hostile publisher then arrives as a frame of its own and is judged like any other.

    `roles=True` (CURVE server sockets) calls `handle(frames, role)` with the User-Id the ZAP
    handler gave the sender's connection (dvswitch/auth.py), read from the message's first part."""

    def __init__(self, loop: asyncio.AbstractEventLoop, sock: zmq.Socket, handle: Callable[..., None],
                 after: Callable[[], None], *, single: bool = False, roles: bool = False) -> None:
        self.loop = loop
        self.sock = sock
        self.handle = handle
        self.after = after
        self.single = single
        self.roles = roles
        self._scheduled = False
        loop.add_reader(sock.getsockopt(zmq.FD), self._drain)

    def kick(self) -> None:
        if not self._scheduled:
            self._scheduled = True
            self.loop.call_soon(self._drain)

    def _drain(self) -> None:
        self._scheduled = False
        sock = self.sock
        recv = sock.recv
        get = sock.get
        handle = self.handle
        single = self.single
        roles = self.roles
        n = 0
        try:
            # (The FD may signal with nothing to read, e.g. for a state change: look first.)
            while n < DRAIN_BATCH and get(EVENTS) & POLLIN:
                n += 1
                if roles:
                    first = recv(NOBLOCK, copy=False)
                    try:
                        role = first.get("User-Id")
                    except zmq.ZMQError:
                        role = None  # no metadata: not an authenticated connection
                    frames = [first.bytes]
                    while get(RCVMORE):
                        frames.append(recv(NOBLOCK))
                    handle(frames, role)
                    continue
                frame = recv(NOBLOCK)
                if single:
                    handle([frame])
                    continue
                frames = [frame]
                while get(RCVMORE):
                    frames.append(recv(NOBLOCK))
                handle(frames)
        except zmq.Again:
            pass  # (POLLIN promised a message: only a socket closed or reset under us breaks that)
        except zmq.ZMQError:
            return  # socket closed during shutdown
        if n:
            self.after()
        if n >= DRAIN_BATCH:
            self.kick()

    def check(self) -> None:
        """After a send on this socket: if input is waiting, drain it (reading ZMQ_EVENTS also
        re-arms the FD, whose edge the send may have consumed)."""
        try:
            if self.sock.get(EVENTS) & POLLIN:
                self.kick()
        except zmq.ZMQError:
            pass  # closed

    def close(self) -> None:
        try:
            self.loop.remove_reader(self.sock.getsockopt(zmq.FD))
        except (zmq.ZMQError, ValueError):
            pass


def wildcard(ip: str | None) -> bool:
    """Is `ip` (or an endpoint's host) one that binds every address of the machine?"""
    return ip in ("0.0.0.0", "*", "::", "[::]", "")


def bind_ephemeral(sock: zmq.Socket, ip: str) -> str:
    """Bind on `ip` (the host's own address: never a wildcard unless the caller passes one)."""
    sock.bind(f"tcp://{ip}:*")
    return sock.getsockopt_string(zmq.LAST_ENDPOINT)


def write_ready(fd: int | None, info: dict) -> None:
    """Tell the launcher we are up: one JSON line on the inherited pipe, then close it."""
    if fd is None:
        return
    try:
        os.write(fd, (json.dumps(info) + "\n").encode())
    finally:
        os.close(fd)


class Timer:
    """One pending wake-up at a monotonic-ns deadline, moved as the core asks."""

    def __init__(self, loop: asyncio.AbstractEventLoop, fire: Callable[[], None]) -> None:
        self.loop = loop
        self.fire = fire
        self.handle: asyncio.TimerHandle | None = None
        self.deadline_ns = 0

    def set(self, deadline_ns: int) -> None:
        if self.handle is not None:
            if self.deadline_ns == deadline_ns:
                return
            self.handle.cancel()
        self.deadline_ns = deadline_ns
        delay_s = max(0.0, (deadline_ns - time.monotonic_ns()) / 1e9)
        self.handle = self.loop.call_later(delay_s, self._fire)

    def _fire(self) -> None:
        self.handle = None
        self.fire()


def on_stop_signals(loop: asyncio.AbstractEventLoop, stop: asyncio.Event) -> None:
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)


def setup_logging(name: str, level: str) -> logging.Logger:
    logging.basicConfig(
        level=getattr(logging, level.upper(), logging.INFO),
        format=f"%(asctime)s {name} %(levelname)s %(message)s",
    )
    return logging.getLogger(name)
