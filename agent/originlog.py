"""Our own numbered updates: what we originate, numbered 1, 2, 3 ... per incarnation, kept
(the last `log_max_updates`) for peers that pull a range, and held until the next flush
publishes them.

Pure: no I/O, no clock, no randomness (tests/test_core_purity.py).
"""

from __future__ import annotations

from collections import deque

from agent.mactable import Entry


class OriginLog:
    __slots__ = ("n", "pending", "_log", "_base", "_max")

    def __init__(self, log_max_updates: int) -> None:
        self.n = 0  # our latest update number
        self.pending: list[list] = []  # numbered since the last flush: published by it
        # _log[i] has number _base + i + 1.
        self._log: deque[list] = deque()
        self._base = 0
        self._max = log_max_updates

    def originate(self, vlan: int, mac: int, entry: Entry) -> None:
        self.n += 1
        upd = [self.n, vlan, mac, entry.host, entry.port, entry.seq, entry.tombstone]
        self._log.append(upd)
        if len(self._log) > self._max:
            self._log.popleft()
            self._base += 1
        self.pending.append(upd)

    def take_pending(self) -> list[list]:
        pending = self.pending
        self.pending = []
        return pending

    def updates(self, lo: int, hi: int, batch_max: int) -> list[list] | None:
        """Our updates lo..hi (at most batch_max, none above ours); None if we no longer keep
        lo or the range is empty (then a peer gets the whole table instead)."""
        first_held = self._base + 1
        if lo < first_held or lo > hi:
            return None
        hi = min(hi, self.n, lo + batch_max - 1)
        start = lo - first_held
        return [self._log[i] for i in range(start, start + max(0, hi - lo + 1))]
