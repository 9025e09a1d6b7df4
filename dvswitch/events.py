"""The event log every process writes: what it did, one JSON object per line.

One file per process in the state dir (`STATE_DIR/events/h3.jsonl`, `controller.jsonl`),
appended by that process only, so no two writers ever share a file. Every line is
`{"t_ns", "ts", "proc", "pid", "kind", ...fields}`: `t_ns` is CLOCK_MONOTONIC (every process on
the machine shares it, so lines of different files merge in time order), `ts` the wall clock
(ISO 8601, UTC, ms) for people, `kind` a dotted name (`host.dead`, `move.converged`, ...).

Each line is one write(2) on an O_APPEND descriptor: what a process wrote is in the kernel
when it is SIGKILLed a microsecond later (the reason the chaos runner reads these files rather
than asking a controller that may be gone). A file that reaches `max_bytes` becomes
`NAME.jsonl.1` (replacing an older one) and a new file starts: at most twice the bound on disk.

Noisy kinds (a hostile peer sending garbage) go through `limited()`: per (kind, peer) at most
one line per `limit_interval_ms`; the next line that passes says how many were held back
(`suppressed`), and close() writes what is still held back (a line with `summary: true`
that stands for those only).
"""

from __future__ import annotations

import json
import logging
import os
import signal
import time
from datetime import UTC, datetime
from pathlib import Path

log = logging.getLogger(__name__)

EVENTS_DIR = "events"  # under the state dir
SUFFIX = ".jsonl"
# A file this big is rotated (kept as NAME.jsonl.1), in bytes. Default 64 MiB: a chaos run of a
# few minutes with every apply row logged stays far below it.
DEFAULT_MAX_BYTES = 64 * 1024 * 1024
# Rate-limited kinds: at most one line per (kind, peer) this often, in ms. Default 1,000.
DEFAULT_LIMIT_INTERVAL_MS = 1_000
# (kind, peer) pairs the rate limiter tracks, at most; peers past it share one key, so a flood of
# made-up identities cannot grow it. Default 1,024.
LIMIT_KEYS_MAX = 1_024
PEER_CHARS_MAX = 64  # a peer name is cut to this many characters (hostile identities can be long)
STAMPS = ("t_ns", "ts", "proc", "pid")


def events_dir(state_dir: str | Path) -> Path:
    return Path(state_dir) / EVENTS_DIR


def events_path(state_dir: str | Path, proc: str) -> Path:
    """Where process `proc` ("h3", "controller") writes its events."""
    return events_dir(state_dir) / f"{proc}{SUFFIX}"


def wall_iso(t_s: float) -> str:
    return datetime.fromtimestamp(t_s, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


class _WallIso:
    """wall_iso with the date and time of day made once per second: a cold start writes tens
    of thousands of events within a second or two, and datetime formatting was most of their cost."""

    __slots__ = ("second", "prefix")

    def __init__(self) -> None:
        self.second = -1
        self.prefix = ""

    def __call__(self, t_s: float) -> str:
        sec = int(t_s)
        if sec != self.second:
            self.second = sec
            self.prefix = datetime.fromtimestamp(sec, UTC).strftime("%Y-%m-%dT%H:%M:%S")
        return f"{self.prefix}.{int((t_s - sec) * 1000):03d}Z"


def _default(o):
    if isinstance(o, (bytes, bytearray)):
        return o.hex()
    if isinstance(o, (set, frozenset)):
        return sorted(o, key=str)
    if isinstance(o, tuple):
        return list(o)
    return str(o)


def as_event(item) -> dict:
    """A core's event as a dict: the contract's `{"kind": ..., ...}`, or a plain log line
    (what cores returned before they had kinds) as `{"kind": "log", "message": line}`."""
    if isinstance(item, dict) and isinstance(item.get("kind"), str):
        return item
    if isinstance(item, dict):
        return {"kind": "log", **item}
    return {"kind": "log", "message": str(item)}


class EventLog:
    """The writer of one process's events file. Never raises on I/O: an event log that cannot
    be written (disk full, directory removed) is counted (`write_errors`) and logged once; the
    process goes on."""

    def __init__(self, path: str | Path, proc: str, *, max_bytes: int = DEFAULT_MAX_BYTES,
                 limit_interval_ms: int = DEFAULT_LIMIT_INTERVAL_MS, clock=time.monotonic_ns, wall=time.time) -> None:
        self.path = Path(path)
        self.proc = proc
        self.pid = os.getpid()
        self.max_bytes = max_bytes
        self.limit_interval_ns = limit_interval_ms * 1_000_000
        self.clock = clock
        self.wall = wall
        self._wall_iso = _WallIso()
        # One encoder for every record: json.dumps with arguments builds a new one per call.
        self._encode = json.JSONEncoder(separators=(",", ":"), default=_default).encode
        self.written = 0  # events written
        self.write_errors = 0
        self.rotations = 0
        self._limits: dict[tuple[str, str], list] = {}  # (kind, peer) -> [last written ns, held back, fields]
        self._fd = -1
        self._size = 0
        self._open()

    def _open(self) -> None:
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o644)
            self._size = os.fstat(self._fd).st_size
        except OSError as e:
            self._failed(e)

    def _failed(self, e: OSError) -> None:
        self.write_errors += 1
        if self.write_errors == 1:
            log.warning("cannot write events to %s: %s; going on without them", self.path, e.strerror or e)

    # ------------------------------------------------------------------ writing

    def emit(self, kind: str, **fields) -> dict:
        """Write one event now; returns it as written."""
        rec = self._stamp({"kind": kind, **fields})
        self._write([rec])
        return rec

    def emit_many(self, events: list) -> list[dict]:
        """Write a core's events (dicts, or plain strings: see as_event) in one write."""
        if not events:
            return []
        recs = [self._stamp(as_event(e)) for e in events]
        self._write(recs)
        return recs

    def limited(self, kind: str, peer: str | None, **fields) -> bool:
        """Write `kind` unless one with this peer was written within limit_interval_ms; True if
        written. What is held back is counted in the next line of the pair (`suppressed`)."""
        peer = str(peer)[:PEER_CHARS_MAX] if peer is not None else "?"
        key = (kind, peer)
        st = self._limits.get(key)
        if st is None and len(self._limits) >= LIMIT_KEYS_MAX:
            key = (kind, "*")  # past the bound every new peer shares one key
            st = self._limits.get(key)
        now = self.clock()
        if st is not None and now - st[0] < self.limit_interval_ns:
            st[1] += 1
            st[2] = fields
            return False
        extra = {"suppressed": st[1]} if st is not None and st[1] else {}
        self._limits[key] = [now, 0, None]
        self.emit(kind, peer=peer, **fields, **extra)
        return True

    def _stamp(self, event: dict) -> dict:
        rec = {"t_ns": self.clock(), "ts": self._wall_iso(self.wall()), "proc": self.proc, "pid": self.pid}
        for k, v in event.items():
            if k not in STAMPS:  # a core has no clock; the runtime's stamps are the only ones
                rec[k] = v
        return rec

    def _write(self, recs: list[dict]) -> None:
        if self._fd < 0:
            return
        try:
            enc = self._encode
            data = "".join([enc(r) + "\n" for r in recs]).encode()
        except (TypeError, ValueError) as e:  # a field json cannot take (a circular structure): a bug of ours
            log.warning("event not written: %s", e)
            return
        if self._size and self._size + len(data) > self.max_bytes:
            self._rotate()
            if self._fd < 0:
                return
        try:
            os.write(self._fd, data)
        except OSError as e:
            self._failed(e)
            return
        self._size += len(data)
        self.written += len(recs)

    def _rotate(self) -> None:
        os.close(self._fd)
        self._fd = -1
        try:
            os.replace(self.path, self.path.with_name(self.path.name + ".1"))
        except OSError as e:
            self._failed(e)
        self.rotations += 1
        self._open()

    def close(self) -> None:
        """Write what the rate limiter still holds back, then close."""
        for (kind, peer), (_, held, fields) in list(self._limits.items()):
            if held:  # (a line for the held-back ones only: `summary`)
                self.emit(kind, peer=peer, **(fields or {}), suppressed=held, summary=True)
        self._limits.clear()
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


def stop_reasons(loop, stop) -> list[str]:
    """SIGTERM and SIGINT set `stop` (as the runtimes' on_stop_signals does) and name themselves
    in the returned list: process.down says why the process stopped."""
    why: list[str] = []
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, lambda name=sig.name: (why.append(name), stop.set()))
    return why


class NoEventLog(EventLog):
    """Where no events file was asked for: the same calls, nothing written."""

    def __init__(self, proc: str = "") -> None:  # noqa: D107 - no file, no counters to speak of
        self.proc = proc
        self.written = self.write_errors = self.rotations = 0

    def emit(self, kind: str, **fields) -> dict:
        return {"kind": kind, **fields}

    def emit_many(self, events: list) -> list[dict]:
        return [as_event(e) for e in events]

    def limited(self, kind: str, peer: str | None, **fields) -> bool:
        return False

    def close(self) -> None:
        pass
