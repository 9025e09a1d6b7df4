"""Apply reports: what this agent took, told to the controller (APPLY_REPORT), batched.

Entries applied one by one (own claims, repair hints, snapshots) go as rows; gossiped or
pulled updates as ranges of their origin's numbers (a row per (agent, entry) cost the
controller ~4 µs each: 8 million rows for 8,000 VMs at 1,000 hosts).

Timing: a report goes at once, in the wake-up that applied what it reports (the apply's own
frame costs no extra wake-up), unless one went less than the interval ago: then at that
interval's end, on the agent's own timer or on any wake-up from then on, with everything applied
meanwhile. The interval grows with the membership so that all agents together send at most
applied_report_budget_per_s reports (the controller reads each): 1.6 ms at 32 hosts, 50 ms at
1,000 (never below applied_report_interval_ms, default 0). So a quiet agent tells the controller
within microseconds, and a busy one or a large cluster batch. (applied_report_delay_ms, 0 by
default, holds every report back at least that long after its first apply.) A claim of our own
goes at once, with the command's ack.

Pure: no I/O, no clock, no randomness (tests/test_core_purity.py).
"""

from __future__ import annotations

from agent import wire
from agent.config import AgentConfig
from agent.mactable import Entry
from agent.updates import BATCH_MAX
from agent.wire import MsgType

NS_PER_MS = 1_000_000


class ApplyReporter:
    __slots__ = ("rows", "ranges", "_host", "_config", "_interval_ns", "_delay_ns", "_next_ns", "_send_ns", "_now")

    def __init__(self, host: str, config: AgentConfig) -> None:
        self._host = host
        # Pending: (vlan, mac, host, seq, tombstone, t_ns, n) rows, and
        # [origin, incarnation, first, last, t_ns] ranges (appended by the core's gossip path).
        self.rows: list[tuple] = []
        self.ranges: list[list] = []
        self._config = config
        self._interval_ns = 0
        self._delay_ns = 0
        self.rescale(1)
        self._next_ns = 0  # no report before this (the interval since the last one)
        self._send_ns = -1  # pending reports go with any flush from then on; -1: none pending yet
        self._now = False  # a claim of ours is pending: report at once

    def interval_ms(self, members: int) -> float:
        """The least time between two of our reports for `members` hosts, us included."""
        c = self._config
        budget = c.applied_report_budget_per_s
        return max(c.applied_report_interval_ms, 1000 * members / budget if budget > 0 else 0)

    def rescale(self, members: int) -> None:
        """The membership has `members` hosts now (us included)."""
        interval_ms = self.interval_ms(members)
        self._interval_ns = round(interval_ms * NS_PER_MS)
        self._delay_ns = round(min(self._config.applied_report_delay_ms, interval_ms) * NS_PER_MS)

    def row(self, vlan: int, mac: int, entry: Entry, t_ns: int, n: int = 0) -> None:
        """`entry` applied here at t_ns, a row of its own; `n`: our number for it if we
        originated it (then the report goes at once: it rides with the command's ack, and the
        controller learns our number for it before the other agents report it by number)."""
        self.rows.append((vlan, mac, entry.host, entry.seq, entry.tombstone, t_ns, n))
        if n:
            self._now = True

    def deadline_ns(self) -> int:
        """When a pending report may go: the wake-up to ask for (only meaningful while one is pending)."""
        return self._send_ns if self._send_ns >= 0 else self._next_ns

    def take(self, now_ns: int) -> list[bytes]:
        """The APPLY_REPORT frames to send at now_ns (none if nothing is pending or it is not time)."""
        rows = self.rows
        ranges = self.ranges
        if not rows and not ranges:
            return []
        if self._send_ns < 0:
            next_ns = self._next_ns
            self._send_ns = now_ns + self._delay_ns if now_ns + self._delay_ns > next_ns else next_ns
        if now_ns < self._send_ns and not self._now:
            return []
        self._now = False
        self._send_ns = -1
        self._next_ns = now_ns + self._interval_ns
        frames = [
            wire.encode(MsgType.APPLY_REPORT, [self._host, rows[i : i + BATCH_MAX], ranges[i : i + BATCH_MAX]])
            for i in range(0, max(len(rows), len(ranges)), BATCH_MAX)
        ]
        self.rows = []
        self.ranges = []
        return frames
