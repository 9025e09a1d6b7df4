"""Who applied what: the controller's one record of which live host applied which op's target,
and the one converged check.

Agents tell it three ways, and all three end in the same place, `op.applied` (host -> that
agent's CLOCK_MONOTONIC ns of the apply):
- a row: "I applied (vlan, mac) -> (host, seq)" (a repair, an agent's own claim);
- the target's ack of the step that claims the MAC (it applied it then);
- a range: "my table dominates origin O's updates lo..hi since t" (gossip: the common case).
  A range names numbers, not entries: the origin itself reports each update it made with its
  number, so we learn which number settles which op. A range may come first (its reporter
  was quicker): the part above what the origin has told us waits in `Origin.early`.

Ops claimed together (a batch create: a host claims its new VMs' MACs in one run of numbers,
every agent takes them in one message and reports them as one range) share one `applied`
dict while every report covers them alike: at 1,000 hosts, creating 8,000 VMs is 8 million
(op, host) marks otherwise. That sharing is this module's fast path; its property test
holds it equal to one mark per (op, host).

The coordinator drives it and acts on what it yields: `(op, last_ns)` for an op every live
host has applied, the last of them at `last_ns`. Those are generators so the coordinator
finishes each op as soon as it is found, in the order the old inline code did (an op's
finish may start another op on the same MAC, which the next row of the same report sees).
No I/O, no clock.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field

from controller.ops import Op, Phase

# Range reports kept per origin while it has not told us the numbers yet, at most (they
# come first only by a few ms, unless we restarted and agents repair older updates: then the
# numbers may never be told, and the oldest go).
EARLY_MAX = 10_000
# An origin's numbered entries kept to write range reports into applied_log, at most (as
# many as an agent keeps in its own log by default).
ORIGIN_ROWS_MAX = 100_000


@dataclass
class Origin:
    """One incarnation of an agent as the origin of numbered updates, as apply reports see it."""

    incarnation: int
    told_n: int = 0  # the highest number the origin reported as its own
    awaiting: dict[int, Op] = field(default_factory=dict)  # number -> op converging on it
    early: list[tuple[str, int, int, int]] = field(default_factory=list)  # (reporter, lo, hi, t_ns)
    # number -> (vlan, mac, host, seq, tombstone): only while applied_log is kept
    rows: dict[int, tuple] = field(default_factory=dict)
    groups: dict[int, ClaimGroup] = field(default_factory=dict)  # first number -> its group


class ClaimGroup:
    """Ops whose claims an origin numbered lo..hi in one run, reported alike so far: they share
    one `applied` dict and a range is marked once, not once per op. Any report that sets one
    apart (a row, a part of the range, another number of the same op) dissolves the group
    first: each op gets its own copy, and from then on is marked alone. A finished op just
    leaves the group."""

    __slots__ = ("lo", "hi", "ops", "applied", "owner")

    def __init__(self, lo: int, hi: int, ops: list[Op], applied: dict[str, int], owner: dict) -> None:
        self.lo = lo
        self.hi = hi
        self.ops = ops
        self.applied = applied
        self.owner = owner  # the origin's `groups` (number lo -> this group)

    def leave(self, op: Op) -> None:
        """A finished op leaves; it keeps the shared dict (later reports of the others may add
        hosts to it: they did apply its update too, later)."""
        self.ops.remove(op)
        op.group = None
        if not self.ops and self.owner.get(self.lo) is self:
            del self.owner[self.lo]

    def dissolve(self) -> None:
        if self.owner.get(self.lo) is self:
            del self.owner[self.lo]
        for op in self.ops:
            op.applied = dict(self.applied)
            op.group = None
        self.ops = []


def settles(op: Op, ehost: str, seq: int, tomb: bool) -> bool:
    """An entry (ehost, seq, tomb) for op's MAC settles it: the target itself, or a later seq
    (that agent has moved past the target)."""
    target = op.target
    return seq > target[1] or (ehost == target[0] and seq == target[1] and tomb == target[2])


class ApplyTracker:
    def __init__(self, hosts: Mapping, applied_log_max: int) -> None:
        """`hosts`: the inventory's hosts (name -> Host), read for an origin's current
        incarnation. `applied_log_max`: every apply is also logged for checkers, this many at
        most (0: no log, and no origin rows kept for it)."""
        self._hosts = hosts
        self.origins: dict[str, Origin] = {}  # host -> its current incarnation as an origin
        self.live: frozenset[str] = frozenset()  # hosts not dead (the converged check's bar)
        self.live_n = 0
        # host -> its latest apply of a converging op's target from gossip (a range report),
        # minus that op's switchover (ns): how far behind the stream the host runs (repair
        # hints read it). Rows do not count: a repair hint is late by design.
        self.lag_ns: dict[str, int] = {}
        self.keep_log = applied_log_max
        # Every apply every agent reported: (t_ns, reporter, vlan, mac, host, seq, tombstone),
        # for checkers (e.g. "no agent ever went back to a lower (seq, host)"). Bounded.
        self.applied_log: deque[tuple] = deque(maxlen=applied_log_max)
        self.applied_count = 0

    # ------------------------------------------------------------------ the converged check

    def set_live(self, live: frozenset[str]) -> None:
        self.live = live
        self.live_n = len(live)

    def converged_at(self, op: Op) -> int | None:
        """When the last live host applied op's target (its clock; the switchover if no host
        is live); None while it is not converging or some live host has not."""
        if op.phase is not Phase.CONVERGING or len(op.applied) < self.live_n:
            return None  # cheap exit: called for every apply
        last = self._last_apply_ns(op.applied)
        if last is None:
            return None
        return op.switch_ns if last < 0 else last

    def _last_apply_ns(self, applied: dict[str, int]) -> int | None:
        """When the last live host applied it (-1: there are none); None while some have not."""
        live = self.live
        if not applied.keys() >= live:
            return None
        return max(map(applied.__getitem__, live), default=-1)

    def lacking(self, op: Op) -> set[str]:
        """The live hosts that have not applied op's target."""
        return self.live.difference(op.applied)

    # ------------------------------------------------------------------ marks

    def mark(self, op: Op, host: str, t_ns: int) -> bool:
        """`host` applied op's target at `t_ns` (a row or an ack); True if that is news."""
        if host in op.applied:
            return False
        if op.group is not None:
            op.group.dissolve()  # a mark of this op alone
        op.applied[host] = t_ns
        return True

    def log_rows(self, reporter: str, rows: list) -> None:
        self.applied_count += len(rows)
        if self.keep_log:
            self.applied_log.extend([(r[5], reporter, r[0], r[1], r[2], r[3], r[4]) for r in rows])

    def row(self, op: Op, reporter: str, ehost: str, seq: int, tomb: bool, t_ns: int) -> int | None:
        """`reporter` applied (ehost, seq, tomb) for op's MAC at t_ns; the op's last apply
        time if that made it converged."""
        if settles(op, ehost, seq, tomb) and self.mark(op, reporter, t_ns):
            return self.converged_at(op)
        return None

    def _origin(self, host: str, incarnation: int) -> Origin | None:
        """The origin state of `host` in `incarnation`; None for an older life of it."""
        o = self.origins.get(host)
        if o is None or incarnation > o.incarnation:
            o = self.origins[host] = Origin(incarnation)
        elif incarnation < o.incarnation:
            return None
        return o

    def own_updates(self, host: str, rows: list, ops_by_key: Mapping) -> Iterator[tuple[Op, int]]:
        """Rows `host` originated carry its number for them: which op waits on which number."""
        o = None
        fresh = None  # (n, op) of ops told their first number here: grouped if they run together
        keep_rows = bool(self.keep_log)
        for vlan, mac, ehost, seq, tomb, _t_ns, n in rows:
            if not n:
                continue
            if o is None:
                o = self._origin(host, self._hosts[host].incarnation)
                if o is None:  # pragma: no cover - the inventory holds the latest incarnation
                    return
            if n > o.told_n:
                o.told_n = n
            if keep_rows:
                o.rows[n] = (vlan, mac, ehost, seq, tomb)
                if len(o.rows) > ORIGIN_ROWS_MAX:
                    del o.rows[next(iter(o.rows))]
            op = ops_by_key.get((vlan, mac))
            if op is None or ehost != host:
                continue
            exact = op.target == (ehost, seq, tomb)
            if exact or seq > op.target[1]:
                # (a greater seq settles it too: that agent has moved past the target)
                prev = o.awaiting.get(n)
                if prev is not None or op.updates:
                    # A number told twice, or an op waiting on more than one: never grouped.
                    for other in (prev, op):
                        if other is not None and other.group is not None:
                            other.group.dissolve()
                elif fresh is None:
                    fresh = [(n, op)]
                else:
                    fresh.append((n, op))
                o.awaiting[n] = op
                op.updates.append((host, o.incarnation, n))
                if exact:
                    op.claim = (o.incarnation, n)
        if fresh is not None and len(fresh) > 1:
            self._group_claims(o, fresh)
        if o is not None and o.early:
            early, o.early = o.early, []
            for reporter, lo, hi, t_ns in early:
                yield from self.range(reporter, host, o.incarnation, lo, hi, t_ns)

    @staticmethod
    def _group_claims(o: Origin, fresh: list[tuple[int, Op]]) -> None:
        """Group the runs of consecutive numbers whose ops were reported alike so far."""
        start = 0
        for i in range(1, len(fresh) + 1):
            if (i < len(fresh) and fresh[i][0] == fresh[i - 1][0] + 1 and fresh[i][1] is not fresh[i - 1][1]
                    and fresh[i][1].applied == fresh[start][1].applied):
                continue
            if i - start > 1:
                ops = [op for _, op in fresh[start:i]]
                g = ClaimGroup(fresh[start][0], fresh[i - 1][0], ops, dict(ops[0].applied), o.groups)
                for op in ops:
                    op.applied = g.applied
                    op.group = g
                o.groups[g.lo] = g
            start = i

    def ranges(self, reporter: str, ranges: list) -> Iterator[tuple[Op, int]]:
        origins = self.origins
        keep_log = self.keep_log
        for origin, incarnation, lo, hi, t_ns in ranges:
            o = origins.get(origin)
            if (o is not None and not o.awaiting and o.incarnation == incarnation and hi <= o.told_n
                    and not keep_log):
                continue  # (the common case, inlined: known numbers, no op waits on that origin)
            yield from self.range(reporter, origin, incarnation, lo, hi, t_ns)

    def range(self, reporter: str, origin: str, incarnation: int, lo: int, hi: int, t_ns: int
              ) -> Iterator[tuple[Op, int]]:
        """`reporter`'s table dominates `origin`'s updates lo..hi since t_ns: the ops waiting
        on any of them are applied there."""
        o = self.origins.get(origin)
        if o is None or o.incarnation != incarnation:
            h = self._hosts.get(origin)
            if h is None or h.incarnation != incarnation:
                return  # another life of that host: no op of ours waits on its numbers
            o = self._origin(origin, incarnation)
            if o is None:  # pragma: no cover - the inventory holds the latest incarnation
                return
        top = min(hi, o.told_n)
        if hi > top:
            if len(o.early) >= EARLY_MAX:
                del o.early[: EARLY_MAX // 2]  # an origin that never reports (it died): forget the oldest
            o.early.append((reporter, max(lo, top + 1), hi, t_ns))
        if lo > top:
            return
        aw = o.awaiting
        if aw:
            g = o.groups.get(lo) if o.groups else None
            if g is not None and g.hi == top:
                # The whole group, as it was claimed: one mark for all its ops.
                last = g.ops[-1]
                if last.switched:
                    self.lag_ns[reporter] = t_ns - last.switch_ns
                done = g.applied
                if reporter not in done:
                    done[reporter] = t_ns
                    if len(done) >= self.live_n:
                        # (the converged check for each op, the shared part done once)
                        last = self._last_apply_ns(done)
                        if last is not None:
                            for op in list(g.ops):
                                if op.phase is Phase.CONVERGING:
                                    yield op, (op.switch_ns if last < 0 else last)
            else:
                if lo == top:  # (a move: one number)
                    op = aw.get(lo)
                    hits = () if op is None else (op,)
                elif top - lo < len(aw):
                    hits = [aw[n] for n in range(lo, top + 1) if n in aw]
                else:
                    hits = [op for n, op in aw.items() if lo <= n <= top]
                if hits and hits[-1].switched:
                    self.lag_ns[reporter] = t_ns - hits[-1].switch_ns
                for op in hits:
                    if self.mark(op, reporter, t_ns):
                        last = self.converged_at(op)
                        if last is not None:
                            yield op, last
        if self.keep_log and o.rows:
            rows = o.rows
            log = [(t_ns, reporter, *rows[n]) for n in range(lo, top + 1) if n in rows]
            self.applied_count += len(log)
            self.applied_log.extend(log)

    def forget(self, op: Op) -> None:
        """A finished op: nothing waits on its numbers any more."""
        if op.group is not None:
            op.group.leave(op)
        for host, incarnation, n in op.updates:
            o = self.origins.get(host)
            if o is not None and o.incarnation == incarnation:
                o.awaiting.pop(n, None)
