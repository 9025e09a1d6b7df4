"""The history of a chaos run: one JSON object per line, written (and flushed) as it happens.

Every line has `t_ns` (CLOCK_MONOTONIC, the same clock the agents stamp applies and
switchovers with) and `ev`, the event type; docs/scenarios.md lists the types.
"""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

HISTORY_FILE = "history.jsonl"


class Journal:
    """Writes a history. `clock`: where `t_ns` comes from (CLOCK_MONOTONIC on real processes,
    the virtual clock in the simulator). `path` None: kept in `records` only."""

    def __init__(self, path: Path | None, clock=time.monotonic_ns) -> None:
        self.path = path
        self.clock = clock
        self.records: list[dict] | None = None if path is not None else []
        self._f = open(path, "w", encoding="utf-8") if path is not None else None  # noqa: SIM115 - closed by close()
        self._lock = threading.Lock()

    def write(self, ev: str, **fields) -> dict:
        rec = {"t_ns": self.clock(), "ev": ev, **fields}
        if self._f is None:
            # As read back from a file: JSON types only (tuples as lists, sets sorted).
            self.records.append(json.loads(json.dumps(rec, default=_default)))
            return rec
        line = json.dumps(rec, separators=(",", ":"), default=_default)
        with self._lock:
            if not self._f.closed:
                self._f.write(line + "\n")
                self._f.flush()
        return rec

    def close(self) -> None:
        with self._lock:
            if self._f is not None:
                self._f.close()


def _default(o):
    if isinstance(o, (set, frozenset, tuple)):
        return sorted(o) if isinstance(o, (set, frozenset)) else list(o)
    return str(o)


def read_history(path: Path) -> tuple[list[dict], list[str]]:
    """The events of a history file, and problems found reading it (e.g. a torn last line)."""
    events, problems = [], []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            line = line.strip()
            if not line:
                continue
            try:
                ev = json.loads(line)
            except ValueError:
                problems.append(f"line {n} is not JSON (a torn write?)")
                continue
            if not isinstance(ev, dict) or "ev" not in ev or "t_ns" not in ev:
                problems.append(f"line {n} is not an event (no ev/t_ns)")
                continue
            events.append(ev)
    return events, problems
