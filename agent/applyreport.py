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

Batching: while the controller has several ops in flight (controller/reportpace.py) it asks
for at most one report per batch_ms. A held report then waits for a wake-up the agent has
anyway (an update from a peer, most often) from the interval's end on, and its own timer only
fires batch_ms after that: under load almost every report rides on a gossip wake-up. Nobody
waits on one move then, so the controller learning of it ~10-20 ms later costs nothing; at
one move at a time it never asks.

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
    __slots__ = ("rows", "ranges", "_host", "_config", "_members", "_batch_ns", "_interval_ns", "_delay_ns",
                 "_batch_until_ns", "_next_ns", "_send_ns", "_now")

    # Longest report batching the controller may ask for, and for how long at most, in ms (a
    # larger request is malformed).
    BATCH_MAX_MS = 1_000
    LEASE_MAX_MS = 60_000

    def __init__(self, host: str, config: AgentConfig) -> None:
        self._host = host
        # Pending: (vlan, mac, host, seq, tombstone, t_ns, n) rows, and
        # [origin, incarnation, first, last, t_ns] ranges (appended by the core's gossip path).
        self.rows: list[tuple] = []
        self.ranges: list[list] = []
        self._config = config
        self._members = 1
        self._batch_ns = 0  # the controller asked for batching (see pace): the ride window too
        self._batch_until_ns = 0  # ...until then (the notice's lease; the controller renews it)
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
        self._members = members
        interval_ms = self.interval_ms(members)
        self._interval_ns = max(round(interval_ms * NS_PER_MS), self._batch_ns)
        self._delay_ns = round(min(self._config.applied_report_delay_ms, interval_ms) * NS_PER_MS)

    def pace(self, args: object, now_ns: int) -> bool:
        """The controller's `reports` notice: {"batch_ms": B, "for_ms": L}: batch for L ms from
        now (B = 0: report at once again). False (nothing changed) for anything else."""
        if type(args) is not dict:
            return False
        batch_ms, for_ms = args.get("batch_ms"), args.get("for_ms")
        if (type(batch_ms) is not int or not 0 <= batch_ms <= self.BATCH_MAX_MS or type(for_ms) is not int
                or not 0 <= for_ms <= self.LEASE_MAX_MS):
            return False
        self._batch_ns = batch_ms * NS_PER_MS
        self._batch_until_ns = now_ns + for_ms * NS_PER_MS
        self.rescale(self._members)
        return True

    @property
    def batch_ms(self) -> float:
        return self._batch_ns / NS_PER_MS

    def row(self, vlan: int, mac: int, entry: Entry, t_ns: int, n: int = 0) -> None:
        """`entry` applied here at t_ns, a row of its own; `n`: our number for it if we
        originated it (then the report goes at once: it rides with the command's ack, and the
        controller learns our number for it before the other agents report it by number)."""
        self.rows.append((vlan, mac, entry.host, entry.seq, entry.tombstone, t_ns, n))
        if n:
            self._now = True

    def deadline_ns(self) -> int:
        """The wake-up to ask for while a report is pending: when it may go, or, while batching,
        a batch later (so that it rides on a wake-up we have anyway)."""
        return (self._send_ns if self._send_ns >= 0 else self._next_ns) + self._batch_ns

    def take(self, now_ns: int) -> list[bytes]:
        """The APPLY_REPORT frames to send at now_ns (none if nothing is pending or it is not time)."""
        rows = self.rows
        ranges = self.ranges
        if not rows and not ranges:
            return []
        if self._batch_ns and now_ns >= self._batch_until_ns:
            self._batch_ns = 0  # the controller did not renew it: report at once again
            self.rescale(self._members)
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
