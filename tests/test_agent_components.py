"""The agent core's components through their own narrow APIs (the core's tests drive them
through AgentCore): origin log, apply reporter, flap guard, liveness."""

from __future__ import annotations

from agent import wire
from agent.applyreport import ApplyReporter
from agent.config import AgentConfig
from agent.flapguard import FlapGuard
from agent.liveness import Liveness
from agent.mactable import Entry
from agent.originlog import OriginLog
from agent.peers import PeerState
from agent.updates import BATCH_MAX
from agent.wire import MsgType

MS = 1_000_000


def test_the_origin_log_numbers_keeps_the_last_updates_and_serves_ranges_of_them():
    log = OriginLog(log_max_updates=3)
    for vm in range(1, 6):
        log.originate(100, vm, Entry("h1", f"vEth{vm}", 0))
    assert log.n == 5
    assert [u[0] for u in log.take_pending()] == [1, 2, 3, 4, 5] and log.pending == []
    assert log.updates(3, 5, 100) == [[n, 100, n, "h1", f"vEth{n}", 0, False] for n in (3, 4, 5)]
    assert log.updates(2, 5, 100) is None  # (1 and 2 fell out of the log: the peer gets a snapshot)
    assert [u[0] for u in log.updates(3, 99, 2)] == [3, 4]  # at most the batch, none above ours
    assert log.updates(5, 4, 100) is None
    assert log.updates(6, 9, 100) == []  # (nothing past our latest yet)


def test_the_apply_reporter_sends_at_once_then_at_most_once_per_interval():
    rep = ApplyReporter("h1", AgentConfig(applied_report_interval_ms=5))
    assert rep.take(0) == []
    rep.ranges.append(["h2", 1, 1, 1, 1 * MS])
    (frame,) = rep.take(1 * MS)  # a quiet agent reports in the wake-up that applied it
    assert wire.decode(frame) == (MsgType.APPLY_REPORT, ["h1", [], [["h2", 1, 1, 1, 1 * MS]]])
    rep.ranges.append(["h2", 1, 2, 2, 2 * MS])
    assert rep.take(2 * MS) == [] and rep.deadline_ns() == 6 * MS  # 1 ms after the last: waits out the interval
    rep.ranges.append(["h2", 1, 3, 3, 3 * MS])
    assert rep.take(5 * MS) == []
    (frame,) = rep.take(6 * MS)  # ...then both in one frame, exact stamps
    assert wire.decode(frame)[1][2] == [["h2", 1, 2, 2, 2 * MS], ["h2", 1, 3, 3, 3 * MS]]
    rep.row(100, 7, Entry("h1", "vEth7", 0), 7 * MS, n=1)  # our own claim: with the ack, interval or not
    (frame,) = rep.take(7 * MS)
    assert wire.decode(frame)[1][1] == [[100, 7, "h1", 0, False, 7 * MS, 1]]


def test_the_apply_reporters_interval_keeps_all_agents_within_the_report_budget():
    rep = ApplyReporter("h1", AgentConfig())  # 20,000 reports/s across the cluster; no minimum
    assert [rep.interval_ms(n) for n in (1, 8, 32, 64, 1000)] == [0.05, 0.4, 1.6, 3.2, 50.0]
    assert ApplyReporter("h1", AgentConfig(applied_report_interval_ms=2)).interval_ms(8) == 2
    assert ApplyReporter("h1", AgentConfig(applied_report_budget_per_s=0)).interval_ms(1000) == 0
    rep.rescale(1000)
    rep.ranges.append(["h2", 1, 1, 1, 0])
    assert len(rep.take(0)) == 1
    rep.ranges.append(["h2", 1, 2, 2, 1 * MS])
    assert rep.take(1 * MS) == [] and rep.deadline_ns() == 50 * MS


def test_a_batching_reporter_rides_on_later_wake_ups_until_its_lease_ends():
    rep = ApplyReporter("h1", AgentConfig(applied_report_budget_per_s=0))
    assert rep.pace({"batch_ms": 10, "for_ms": 100}, 0)
    rep.ranges.append(["h2", 1, 1, 1, 1 * MS])
    assert len(rep.take(1 * MS)) == 1  # the first after a quiet spell goes at once, batching or not
    rep.ranges.append(["h2", 1, 2, 2, 2 * MS])
    assert rep.take(2 * MS) == []  # within the batch: held...
    assert rep.deadline_ns() == 21 * MS  # ...its own timer a batch after it may go: a later wake-up carries it
    assert rep.take(10 * MS) == []
    rep.ranges.append(["h2", 1, 3, 3, 12 * MS])
    (frame,) = rep.take(12 * MS)  # a wake-up after the batch's end carries both
    assert [r[2] for r in wire.decode(frame)[1][2]] == [2, 3]
    rep.ranges.append(["h2", 1, 4, 4, 150 * MS])
    assert len(rep.take(150 * MS)) == 1  # the lease ran out unrenewed: at once again
    rep.ranges.append(["h2", 1, 5, 5, 151 * MS])
    assert len(rep.take(151 * MS)) == 1
    for bad in (None, [], {"batch_ms": -1, "for_ms": 10}, {"batch_ms": 10}, {"batch_ms": 10**6, "for_ms": 10},
                {"batch_ms": True, "for_ms": 10}, {"batch_ms": 5, "for_ms": 10**9}):
        assert not rep.pace(bad, 0), bad
    assert rep.batch_ms == 0


def test_the_apply_reporter_holds_reports_back_for_a_delay_if_asked():
    rep = ApplyReporter("h1", AgentConfig(applied_report_delay_ms=5, applied_report_interval_ms=20))
    rep.ranges.append(["h2", 1, 1, 1, 1 * MS])
    assert rep.take(1 * MS) == [] and rep.deadline_ns() == 6 * MS
    assert len(rep.take(6 * MS)) == 1
    rep.ranges.append(["h2", 1, 2, 2, 7 * MS])
    assert rep.take(7 * MS) == [] and rep.deadline_ns() == 26 * MS  # the interval since the last one


def test_the_apply_reporter_splits_a_large_report_into_frames():
    rep = ApplyReporter("h1", AgentConfig(applied_report_delay_ms=0, applied_report_interval_ms=0))
    for mac in range(BATCH_MAX + 1):
        rep.row(100, mac, Entry("h2", "p", 0), 5)
    frames = rep.take(10)
    assert [len(wire.decode(f)[1][1]) for f in frames] == [BATCH_MAX, 1]
    assert rep.rows == [] and rep.take(11) == []


def test_the_flap_guard_reports_once_when_a_mac_moves_too_often_and_forgets_old_moves():
    guard = FlapGuard(AgentConfig(flap_moves=2, flap_window_ms=100))
    key = (100, 1)
    assert [guard.moved(key, t * MS) for t in (0, 10, 20, 30)] == [False, False, True, False]
    assert guard.flapping == {key: 4}
    assert guard.moved(key, 500 * MS) is False and guard.flapping == {}  # (the window emptied)
    eager = FlapGuard(AgentConfig(flap_moves=0))
    assert eager.moved(key, 0) is True  # (flap_moves 0: every move is a flap)


def test_liveness_counts_peers_heard_within_the_suspect_window():
    live = Liveness(AgentConfig(heartbeat_interval_ms=100, suspect_after_ms=300, heartbeat_budget_per_s=1_000_000))
    live.rescale(3)
    assert live.hb_ns == 100 * MS and live.suspect_ns == 300 * MS
    a, b = PeerState("h2"), PeerState("h3")
    live.heard_from(a, 0)
    live.heard_from(b, 0)
    assert live.heard(100 * MS) == 2
    live.heard_from(a, 250 * MS)
    assert live.heard(400 * MS) == 1  # (h3 silent since 0)
    live.forget(a)
    assert live.heard(400 * MS) == 0
