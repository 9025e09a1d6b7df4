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
    def __init__(self, path: Path) -> None:
        self.path = path
        self._f = open(path, "w", encoding="utf-8")  # noqa: SIM115 - closed by close()
        self._lock = threading.Lock()

    def write(self, ev: str, **fields) -> dict:
        rec = {"t_ns": time.monotonic_ns(), "ev": ev, **fields}
        line = json.dumps(rec, separators=(",", ":"), default=_default)
        with self._lock:
            if not self._f.closed:
                self._f.write(line + "\n")
                self._f.flush()
        return rec

    def close(self) -> None:
        with self._lock:
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
