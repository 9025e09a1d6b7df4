"""Reading the processes' event files (dvswitch/events.py) back: merged in time order, filtered,
followed as they grow. `dvs events` is a thin shell around this."""

from __future__ import annotations

import json
import os
import re
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

from dvswitch.events import SUFFIX, events_dir

HOST_FIELDS = ("host", "src", "dst", "peer")  # fields naming a host an event is about
_DURATION = re.compile(r"^(\d+(?:\.\d+)?)(ms|s|m|h|d)$")
_UNIT_S = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}


def files(state_dir: str | Path) -> list[Path]:
    """Every events file, a rotated `NAME.jsonl.1` before its `NAME.jsonl`."""
    d = events_dir(state_dir)
    if not d.is_dir():
        return []
    out = []
    for p in sorted(d.glob(f"*{SUFFIX}")):
        old = p.with_name(p.name + ".1")
        if old.is_file():
            out.append(old)
        out.append(p)
    return out


def parse_line(line: bytes | str) -> dict | None:
    """One line as an event, or None (a torn last line, or something that is no event)."""
    try:
        ev = json.loads(line)
    except ValueError:
        return None
    if not isinstance(ev, dict) or not isinstance(ev.get("t_ns"), int) or not isinstance(ev.get("kind"), str):
        return None
    return ev


def read_file(path: Path) -> tuple[list[dict], int]:
    """The events of one file and how many lines were not events."""
    evs, bad = [], 0
    try:
        with open(path, "rb") as f:
            for line in f:
                if not line.strip():
                    continue
                ev = parse_line(line)
                if ev is None:
                    bad += 1
                else:
                    evs.append(ev)
    except FileNotFoundError:
        pass  # rotated away between listing and opening
    return evs, bad


def read_all(state_dir: str | Path, procs: Iterable[str] | None = None) -> tuple[list[dict], int]:
    """Every event of every process (or of `procs`), in time order; and the count of bad lines."""
    want = set(procs) if procs is not None else None
    out, bad = [], 0
    for p in files(state_dir):
        if want is not None and p.name.split(SUFFIX)[0] not in want:
            continue
        evs, b = read_file(p)
        out.extend(evs)
        bad += b
    out.sort(key=lambda e: e["t_ns"])  # stable: a process's own lines keep their order
    return out, bad


# ---------------------------------------------------------------------- filters


def parse_since(text: str, now_mono_ns: int | None = None, now_wall_s: float | None = None) -> int:
    """`--since`: a duration back from now (`90s`, `5m`, `2h`, `1d`, `250ms`) or a wall-clock time
    (ISO 8601, e.g. 2026-12-03T17:05:00Z; no zone means local time), as a CLOCK_MONOTONIC ns
    bound (every events file is stamped with it). ValueError with a one-line reason."""
    now_mono_ns = time.monotonic_ns() if now_mono_ns is None else now_mono_ns
    now_wall_s = time.time() if now_wall_s is None else now_wall_s
    m = _DURATION.match(text.strip())
    if m:
        return now_mono_ns - int(float(m.group(1)) * _UNIT_S[m.group(2)] * 1e9)
    try:
        at = datetime.fromisoformat(text.strip())
    except ValueError:
        raise ValueError(f"--since {text!r} is neither a duration (30s, 5m, 2h, 1d) nor a time "
                         "(2026-12-03T17:05:00Z)") from None
    return now_mono_ns - int((now_wall_s - at.timestamp()) * 1e9)


@dataclass
class Filter:
    """`--host H` (repeatable): events of process H, and events of others about H (fields host,
    src, dst, peer); `--kind K` (repeatable): kind K or any kind under it (`move` = move.*);
    `since_ns`: CLOCK_MONOTONIC lower bound."""

    hosts: list[str] = field(default_factory=list)
    kinds: list[str] = field(default_factory=list)
    since_ns: int | None = None

    def __call__(self, ev: dict) -> bool:
        if self.since_ns is not None and ev["t_ns"] < self.since_ns:
            return False
        if self.kinds and not any(ev["kind"] == k or ev["kind"].startswith(k + ".") for k in self.kinds):
            return False
        if self.hosts and ev.get("proc") not in self.hosts and not any(ev.get(f) in self.hosts for f in HOST_FIELDS):
            return False
        return True


# ---------------------------------------------------------------------- following


class Follower:
    """Tails every events file of a state dir: new lines of known files, files that appear
    (a host added, a process that starts late), rotation (the old file is read to its end
    before the new one). Each poll returns what arrived since the last, in time order."""

    def __init__(self, state_dir: str | Path) -> None:
        self.state_dir = Path(state_dir)
        self._open: dict[Path, tuple[object, int, bytes]] = {}  # path -> (file, inode, partial line)
        self.bad = 0

    def start_at_end(self) -> None:
        """Skip what the files hold now (it was shown already)."""
        for p in self._current():
            try:
                f = open(p, "rb")  # noqa: SIM115 - kept open across polls, closed by close()
            except FileNotFoundError:
                continue
            f.seek(0, os.SEEK_END)
            self._open[p] = (f, os.fstat(f.fileno()).st_ino, b"")

    def _current(self) -> list[Path]:
        d = events_dir(self.state_dir)
        return sorted(d.glob(f"*{SUFFIX}")) if d.is_dir() else []

    def poll(self) -> list[dict]:
        out: list[dict] = []
        for p in self._current():
            if p not in self._open:
                try:
                    f = open(p, "rb")  # noqa: SIM115
                except FileNotFoundError:
                    continue
                self._open[p] = (f, os.fstat(f.fileno()).st_ino, b"")
            self._drain(p, out)
            f, ino, _ = self._open[p]
            try:
                now_ino = os.stat(p).st_ino
            except FileNotFoundError:
                now_ino = None
            if now_ino != ino:
                # Rotated: read the old file to its end (the writer may have added to it since
                # the read above, before it rotated); the new one is read from its start next poll.
                self._drain(p, out)
                f.close()
                del self._open[p]
        out.sort(key=lambda e: e["t_ns"])
        return out

    def _drain(self, p: Path, out: list[dict]) -> None:
        f, ino, partial = self._open[p]
        data = f.read()
        if not data:
            return
        lines = (partial + data).split(b"\n")
        partial = lines.pop()  # an incomplete last line waits for its end
        for line in lines:
            if not line.strip():
                continue
            ev = parse_line(line)
            if ev is None:
                self.bad += 1
            else:
                out.append(ev)
        self._open[p] = (f, ino, partial)

    def close(self) -> None:
        for f, _, _ in self._open.values():
            f.close()
        self._open.clear()


def follow(state_dir: str | Path, on_events: Callable[[list[dict]], None], *, poll_s: float = 0.2,
           should_stop: Callable[[], bool] = lambda: False) -> int:
    """Call `on_events` with what the files hold (the first batch, in time order), then with every
    batch of new events, until should_stop() (or Ctrl-C / SIGTERM, which `dvs` turns into
    KeyboardInterrupt). Returns the count of lines that were not events."""
    old, bad = [], 0
    for p in files(state_dir):
        if p.name.endswith(".1"):
            evs, b = read_file(p)
            old += evs
            bad += b
    fol = Follower(state_dir)
    try:
        first = True
        while not should_stop():
            evs = fol.poll()
            if first:
                evs = sorted(old + evs, key=lambda e: e["t_ns"])
                first = False
            if evs:
                on_events(evs)
            time.sleep(poll_s)  # (polling files: nothing to wait on that works for all of them)
    finally:
        fol.close()
    return bad + fol.bad


# ---------------------------------------------------------------------- showing


def details(ev: dict) -> str:
    """The human part of an event: its message (the fields are in --json), else its fields as k=v."""
    if ev.get("message"):
        return str(ev["message"])
    return _kv({k: v for k, v in ev.items() if k not in ("t_ns", "ts", "proc", "pid", "kind")})


def _kv(d: dict) -> str:
    parts = []
    for k, v in d.items():
        if isinstance(v, (list, dict)):
            v = json.dumps(v, separators=(",", ":"))
            if len(v) > 80:
                v = v[:77] + "..."
        parts.append(f"{k}={v}")
    return " ".join(parts)


def clock_of(ev: dict) -> str:
    """`ts` as HH:MM:SS.mmm in local time (the date is in --json)."""
    try:
        return datetime.fromisoformat(ev["ts"]).astimezone().strftime("%H:%M:%S.%f")[:-3]
    except (KeyError, TypeError, ValueError):
        return "?"
