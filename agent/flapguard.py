"""Flap guard (DESIGN.md: as FRR/Junos/Cumulus default): more than `flap_moves` host changes of
one MAC within `flap_window_ms` is reported, not acted on.

Pure: no I/O, no clock, no randomness (tests/test_core_purity.py).
"""

from __future__ import annotations

from agent.config import AgentConfig

Key = tuple[int, int]


class FlapGuard:
    __slots__ = ("flapping", "_moves", "_max_moves", "_window_ns")

    def __init__(self, config: AgentConfig) -> None:
        # key -> recent times (ns) its host changed: the first move's time alone, then a list
        # (not deques: a deque costs ~600 B, and a simulated 1,000-host cluster keeps one per
        # agent and moved MAC).
        self._moves: dict[Key, int | list[int]] = {}
        self.flapping: dict[Key, int] = {}  # key -> moves within the window, while over the limit
        self._max_moves = config.flap_moves
        self._window_ns = config.flap_window_ms * 1_000_000

    def moved(self, key: Key, now_ns: int) -> bool:
        """`key`'s host changed at now_ns; True if that made it flap (it was not flapping before)."""
        moves = self._moves
        if self._max_moves >= 1 and key not in moves:
            # Its first move: an int, not a list (most MACs move once). Nothing to report.
            moves[key] = now_ns
            return False
        times = moves.get(key)
        if times is None:
            times = moves[key] = []
        elif type(times) is int:
            times = moves[key] = [times]
        times.append(now_ns)
        window_ns = self._window_ns
        if now_ns - times[0] > window_ns:
            expired = 1
            while now_ns - times[expired] > window_ns:
                expired += 1
            del times[:expired]
        if len(times) > self._max_moves:
            new = key not in self.flapping
            self.flapping[key] = len(times)
            return new
        self.flapping.pop(key, None)
        return False
