"""controller/applytrack.py: its fast path (ops claimed together share one mark per host, ranges
wait for numbers the origin has not told yet) held equal to a naive reference that keeps one
mark per (op, host), over random report sequences."""

from __future__ import annotations

from dataclasses import dataclass

from hypothesis import given, settings
from hypothesis import strategies as st

from controller.applytrack import ApplyTracker, settles
from controller.ops import Op, Phase

HOSTS = ["h1", "h2", "h3", "h4"]
# Ops by origin: h1 claims six VMs (a batch create), h2 four, h3 two; h4 only reports.
OWNER = ["h1"] * 6 + ["h2"] * 4 + ["h3"] * 2
VLAN = 100


@dataclass
class FakeHost:
    incarnation: int = 1


class Reference:
    """One mark per (op, host), first effective time wins. A range's mark takes effect once the
    origin (in that incarnation) has told which number settles which op: at once if it had,
    else when it does."""

    def __init__(self, hosts: dict[str, FakeHost]) -> None:
        self.hosts = hosts
        self.marks: dict[int, dict[str, int]] = {}
        self.origin_inc: dict[str, int] = {}  # the incarnation the tracker follows per origin
        self.told: dict[tuple[str, int], dict[int, list[Op]]] = {}
        self.ranges: dict[tuple[str, int], list[tuple[str, int, int, int]]] = {}

    def mark(self, op: Op, host: str, t_ns: int) -> None:
        self.marks.setdefault(op.op_id, {}).setdefault(host, t_ns)

    def row(self, op: Op, reporter: str, ehost: str, seq: int, tomb: bool, t_ns: int) -> None:
        if settles(op, ehost, seq, tomb):
            self.mark(op, reporter, t_ns)

    def _follow(self, origin: str, inc: int) -> None:
        if inc > self.origin_inc.get(origin, 0):
            self.origin_inc[origin] = inc

    def tell(self, origin: str, n: int, op: Op | None) -> None:
        inc = self.hosts[origin].incarnation
        self._follow(origin, inc)
        if op is None:
            return
        self.told.setdefault((origin, inc), {}).setdefault(n, []).append(op)
        for reporter, lo, hi, t_ns in self.ranges.get((origin, inc), []):
            if lo <= n <= hi:
                self.mark(op, reporter, t_ns)

    def range(self, reporter: str, origin: str, inc: int, lo: int, hi: int, t_ns: int) -> None:
        if inc != self.origin_inc.get(origin) and inc != self.hosts[origin].incarnation:
            return  # another life of that host
        self._follow(origin, inc)
        self.ranges.setdefault((origin, inc), []).append((reporter, lo, hi, t_ns))
        for n, ops in self.told.get((origin, inc), {}).items():
            if lo <= n <= hi:
                for op in ops:
                    self.mark(op, reporter, t_ns)

    def converged_at(self, op: Op, live: frozenset[str]) -> int | None:
        marks = self.marks.get(op.op_id, {})
        if not live <= marks.keys():
            return None
        return max((marks[h] for h in live), default=op.switch_ns)


events = st.lists(st.one_of(
    st.tuples(st.just("own"), st.sampled_from(HOSTS[:3]), st.integers(1, 4), st.booleans()),
    st.tuples(st.just("own_again"), st.sampled_from(HOSTS[:3])),
    st.tuples(st.just("range"), st.sampled_from(HOSTS), st.sampled_from(HOSTS[:3]), st.integers(1, 8),
              st.integers(0, 5), st.integers(-1, 0)),
    st.tuples(st.just("row"), st.sampled_from(HOSTS), st.integers(0, len(OWNER) - 1), st.integers(-1, 1)),
    st.tuples(st.just("ack"), st.integers(0, len(OWNER) - 1)),
    st.tuples(st.just("restart"), st.sampled_from(HOSTS[:3])),
    st.tuples(st.just("finish"), st.integers(0, len(OWNER) - 1)),
    st.tuples(st.just("live"), st.sets(st.sampled_from(HOSTS), min_size=1)),
), max_size=60)


@settings(max_examples=400, deadline=None)
@given(events)
def test_the_tracker_marks_exactly_what_one_mark_per_op_and_host_would(evs):
    hosts = {h: FakeHost() for h in HOSTS}
    track = ApplyTracker(hosts, applied_log_max=0)
    ref = Reference(hosts)
    live = frozenset(HOSTS)
    track.set_live(live)
    ops = [Op(i + 1, "create", f"vm{i + 1}", o, o, (o, 0, False), (VLAN, i + 1), 0, 1 << 62,
              phase=Phase.CONVERGING, switched=True) for i, o in enumerate(OWNER)]
    ops_by_key = {op.key: op for op in ops}
    next_n = dict.fromkeys(HOSTS, 0)  # the origin's last number in its current incarnation
    untold = {h: [op for op in ops if op.target[0] == h] for h in HOSTS}
    last_told: dict[str, tuple[int, Op]] = {}
    t = 0

    def converged(found):
        for op, last in found:
            assert last == ref.converged_at(op, live), (op.op_id, last)

    def report(reporter, rows, ranges):
        # (what ControllerCore._on_apply_report does with one APPLY_REPORT)
        track.log_rows(reporter, rows)
        for vlan, mac, ehost, seq, tomb, t_ns, _n in rows:
            op = ops_by_key.get((vlan, mac))
            if op is not None:
                last = track.row(op, reporter, ehost, seq, tomb, t_ns)
                if last is not None:
                    converged([(op, last)])
        converged(track.own_updates(reporter, rows, ops_by_key))
        converged(track.ranges(reporter, ranges))

    for ev in evs:
        t += 1
        kind = ev[0]
        if kind == "own":
            _, origin, count, noise = ev
            rows, tells = [], []
            for op in untold[origin][:count]:
                if noise:  # an update of a MAC no op waits on, numbered in between
                    next_n[origin] += 1
                    rows.append([VLAN, 999, origin, 0, False, t, next_n[origin]])
                    tells.append((next_n[origin], None))
                next_n[origin] += 1
                rows.append([VLAN, op.key[1], origin, 0, False, t, next_n[origin]])
                tells.append((next_n[origin], op))
                last_told[origin] = (next_n[origin], op)
            del untold[origin][:count]
            for r in rows:
                op = ops_by_key.get((r[0], r[1]))
                if op is not None:
                    ref.row(op, origin, r[2], r[3], r[4], t)
            for n, op in tells:
                ref.tell(origin, n, op if op is not None and op.key in ops_by_key else None)
            report(origin, rows, [])
        elif kind == "own_again":  # the origin's last row reported once more
            origin = ev[1]
            if origin in last_told:
                n, op = last_told[origin]
                if op.key in ops_by_key:
                    ref.row(op, origin, origin, 0, False, t)
                ref.tell(origin, n, op if op.key in ops_by_key else None)
                report(origin, [[VLAN, op.key[1], origin, 0, False, t, n]], [])
        elif kind == "range":
            _, reporter, origin, lo, width, inc_delta = ev
            inc = hosts[origin].incarnation + inc_delta
            ref.range(reporter, origin, inc, lo, lo + width, t)
            report(reporter, [], [[origin, inc, lo, lo + width, t]])
        elif kind == "row":
            _, reporter, i, delta = ev
            op = ops[i]
            ref.row(op, reporter, op.target[0], op.target[1] + delta, False, t)
            report(reporter, [[VLAN, op.key[1], op.target[0], op.target[1] + delta, False, t, 0]], [])
        elif kind == "ack":
            op = ops[ev[1]]
            if op.key in ops_by_key:
                ref.mark(op, op.target[0], t)
                track.mark(op, op.target[0], t)
        elif kind == "restart":  # a new incarnation numbers its updates from 1 again
            origin = ev[1]
            hosts[origin].incarnation += 1
            next_n[origin] = 0
            last_told.pop(origin, None)
        elif kind == "finish":
            op = ops[ev[1]]
            if ops_by_key.pop(op.key, None) is not None:
                track.forget(op)
        elif kind == "live":
            live = frozenset(ev[1])
            track.set_live(live)
        for op in ops_by_key.values():
            assert op.applied == ref.marks.get(op.op_id, {}), (op.op_id, ev)
            assert track.converged_at(op) == ref.converged_at(op, live), (op.op_id, ev)
            assert track.lacking(op) == live - ref.marks.get(op.op_id, {}).keys()


def test_a_batch_claim_is_one_shared_mark_until_a_report_sets_one_op_apart():
    """The fast path is taken: six ops claimed in one run share one dict; a range over all of
    them marks it once; a range over a part gives each op its own copy first."""
    hosts = {h: FakeHost() for h in HOSTS}
    track = ApplyTracker(hosts, applied_log_max=0)
    track.set_live(frozenset(HOSTS))
    ops = [Op(i + 1, "create", f"vm{i + 1}", "h1", "h1", ("h1", 0, False), (VLAN, i + 1), 0, 1 << 62,
              phase=Phase.CONVERGING, switched=True) for i in range(6)]
    by_key = {op.key: op for op in ops}
    rows = [[VLAN, op.key[1], "h1", 0, False, 5, i + 1] for i, op in enumerate(ops)]
    for op in ops:
        track.row(op, "h1", "h1", 0, False, 5)
    assert list(track.own_updates("h1", rows, by_key)) == []
    assert len({id(op.applied) for op in ops}) == 1
    assert list(track.ranges("h2", [["h1", 1, 1, 6, 7]])) == []
    assert ops[0].applied == {"h1": 5, "h2": 7} and len({id(op.applied) for op in ops}) == 1
    list(track.ranges("h3", [["h1", 1, 2, 3, 8]]))
    assert len({id(op.applied) for op in ops}) == 6
    assert [sorted(op.applied) for op in ops] == [["h1", "h2"], ["h1", "h2", "h3"], ["h1", "h2", "h3"],
                                                  ["h1", "h2"], ["h1", "h2"], ["h1", "h2"]]
    found = list(track.ranges("h4", [["h1", 1, 1, 6, 9]]))
    assert [op.op_id for op, _ in found] == [2, 3] and all(last == 9 for _, last in found)
