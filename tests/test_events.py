"""The event log: the writer (dvswitch/events.py), the reader and follower (testbed/events.py) and
`dvs events` over files written here. No processes: see test_events_cluster.py for those."""

from __future__ import annotations

import json
import os

import pytest
from click.testing import CliRunner

from dvswitch.events import EventLog, NoEventLog, as_event, events_path
from testbed import events as evlog
from testbed.cli import cli, main


class Clock:
    def __init__(self, t: int = 1_000_000_000) -> None:
        self.t = t

    def __call__(self) -> int:
        return self.t


def lines(path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines()]


def test_writer_stamps_every_event_and_takes_both_shapes_of_core_events(tmp_path):
    clock = Clock(5_000)
    log = EventLog(tmp_path / "events" / "h3.jsonl", "h3", clock=clock, wall=lambda: 1_796_300_000.25)
    log.emit("process.up", incarnation=7)
    clock.t = 6_000
    log.emit_many(["refused REGISTER from 'x'", {"kind": "host.dead", "host": "h2"},
                   {"kind": "move.converged", "t_ns": 1, "proc": "forged", "op": 4}])
    log.close()
    got = lines(tmp_path / "events" / "h3.jsonl")
    assert [e["kind"] for e in got] == ["process.up", "log", "host.dead", "move.converged"]
    assert got[0] == {"t_ns": 5_000, "ts": "2026-12-03T12:13:20.250Z", "proc": "h3", "pid": os.getpid(),
                      "kind": "process.up", "incarnation": 7}
    assert got[1]["message"] == "refused REGISTER from 'x'"
    # The runtime's stamps are the only ones: a core event cannot set them.
    assert (got[3]["t_ns"], got[3]["proc"], got[3]["op"]) == (6_000, "h3", 4)
    assert as_event({"message": "no kind"}) == {"kind": "log", "message": "no kind"}


def test_a_restarted_process_appends_to_its_file(tmp_path):
    p = events_path(tmp_path, "controller")
    for life in range(2):
        log = EventLog(p, "controller")
        log.emit("process.up", life=life)
        log.close()
    assert [e["life"] for e in lines(p)] == [0, 1]


def test_rate_limiter_per_kind_and_peer_counts_what_it_held_back(tmp_path):
    clock = Clock()
    p = tmp_path / "h1.jsonl"
    log = EventLog(p, "h1", clock=clock, limit_interval_ms=1_000)
    assert log.limited("frame.dropped", "h2", reason="dropped_malformed")
    for _ in range(5):
        assert not log.limited("frame.dropped", "h2", reason="dropped_malformed")
    assert log.limited("frame.dropped", "h3", reason="dropped_malformed")  # another peer: its own budget
    clock.t += 999_999_999
    assert not log.limited("frame.dropped", "h2", reason="dropped_malformed")
    clock.t += 1
    assert log.limited("frame.dropped", "h2", reason="dropped_malformed")
    for _ in range(3):
        log.limited("frame.dropped", "h2", reason="forged_claims")
    log.close()  # what is still held back is written
    got = [(e["peer"], e.get("suppressed", 0), e.get("summary", False)) for e in lines(p)]
    assert got == [("h2", 0, False), ("h3", 0, False), ("h2", 6, False), ("h2", 3, True)]


def test_rate_limiter_state_is_bounded_against_made_up_peers(tmp_path):
    log = EventLog(tmp_path / "h1.jsonl", "h1", clock=Clock())
    for i in range(5_000):
        log.limited("frame.dropped", f"liar{i}" + "x" * 500, reason="dropped_malformed")
    assert len(log._limits) <= 1_025
    log.close()
    got = lines(tmp_path / "h1.jsonl")
    assert len(got) <= 1_026 and max(len(e["peer"]) for e in got) <= 64
    assert sum((0 if e.get("summary") else 1) + e.get("suppressed", 0) for e in got) == 5_000


def test_size_bound_rotates_once(tmp_path):
    p = events_path(tmp_path, "h1")
    log = EventLog(p, "h1", max_bytes=2_000)
    for i in range(100):
        log.emit("repair.pull", n=i, pad="x" * 50)
    log.close()
    assert log.rotations >= 2
    old, cur = lines(p.with_name("h1.jsonl.1")), lines(p)
    assert p.stat().st_size <= 2_000 and p.with_name("h1.jsonl.1").stat().st_size <= 2_000
    assert [e["n"] for e in old + cur] == list(range(old[0]["n"], 100))  # the newest, in order
    evs, bad = evlog.read_all(tmp_path)
    assert [e["n"] for e in evs] == [e["n"] for e in old + cur] and bad == 0


def test_an_unwritable_log_never_raises(tmp_path):
    (tmp_path / "events").write_text("a file where the directory should be")
    log = EventLog(events_path(tmp_path, "h1"), "h1")
    log.emit("process.up")
    log.limited("frame.dropped", "h2")
    log.close()
    assert log.write_errors >= 1 and log.written == 0
    quiet = NoEventLog("h1")
    assert quiet.emit("x", a=1) == {"kind": "x", "a": 1} and not quiet.limited("y", "h2")


def write(path, evs: list[dict], tail: str = "") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        for e in evs:
            f.write(json.dumps(e) + "\n")
        f.write(tail)


def ev(t: int, proc: str, kind: str, **kw) -> dict:
    return {"t_ns": t, "ts": "2026-12-03T17:00:00.000Z", "proc": proc, "pid": 1, "kind": kind, **kw}


@pytest.fixture
def state(tmp_path):
    d = tmp_path / "events"
    write(d / "controller.jsonl", [ev(10, "controller", "process.up"), ev(40, "controller", "host.dead", host="h3"),
                                   ev(50, "controller", "ha.restart", vm="vm3", src="h3", dst="h1"),
                                   ev(70, "controller", "move.converged", vm="vm3", dst="h1")])
    write(d / "h1.jsonl", [ev(20, "h1", "process.up"), ev(60, "h1", "membership.epoch", epoch=9)],
          tail='{"t_ns": 99, "kind": "torn')
    write(d / "h3.jsonl.1", [ev(5, "h3", "process.up")])
    write(d / "h3.jsonl", [ev(30, "h3", "frame.dropped", peer="h2", reason="dropped_malformed")])
    return tmp_path


def test_reader_merges_every_file_in_time_order(state):
    evs, bad = evlog.read_all(state)
    assert [e["t_ns"] for e in evs] == [5, 10, 20, 30, 40, 50, 60, 70]
    assert bad == 1  # the torn last line
    only, _ = evlog.read_all(state, procs=["h3"])
    assert [e["t_ns"] for e in only] == [5, 30]


def test_filters(state):
    evs, _ = evlog.read_all(state)

    def kept(**kw) -> list[int]:
        return [e["t_ns"] for e in evs if evlog.Filter(**kw)(e)]

    assert kept(hosts=["h3"]) == [5, 30, 40, 50]  # its own and the controller's about it
    assert kept(hosts=["h2"]) == [30]  # a peer named by an event
    assert kept(kinds=["move"]) == [70] and kept(kinds=["host.dead", "ha"]) == [40, 50]
    assert kept(kinds=["mov"]) == []  # a prefix of a kind's parts, not of its letters
    assert kept(since_ns=45) == [50, 60, 70]
    assert kept(hosts=["h1"], kinds=["process"]) == [20]


def test_since_takes_durations_and_times():
    now_mono, now_wall = 1_000 * 10**9, 1_796_300_000.0
    assert evlog.parse_since("90s", now_mono, now_wall) == now_mono - 90 * 10**9
    assert evlog.parse_since("2m", now_mono, now_wall) == now_mono - 120 * 10**9
    assert evlog.parse_since("250ms", now_mono, now_wall) == now_mono - 250 * 10**6
    assert evlog.parse_since("2026-12-03T12:13:10Z", now_mono, now_wall) == now_mono - 10 * 10**9
    with pytest.raises(ValueError, match="neither a duration"):
        evlog.parse_since("yesterday", now_mono, now_wall)


def test_follower_sees_appends_partial_lines_new_files_and_rotation(tmp_path):
    d = tmp_path / "events"
    write(d / "h1.jsonl", [ev(1, "h1", "process.up")])
    fol = evlog.Follower(tmp_path)
    assert [e["t_ns"] for e in fol.poll()] == [1]
    assert fol.poll() == []
    write(d / "h1.jsonl", [ev(3, "h1", "a")], tail='{"t_ns": 4, "kind": "b", "proc": "h1"')
    write(d / "controller.jsonl", [ev(2, "controller", "c")])
    assert [e["t_ns"] for e in fol.poll()] == [2, 3]  # merged in time order across files
    write(d / "h1.jsonl", [], tail="}\n")  # the rest of the partial line
    assert [e["t_ns"] for e in fol.poll()] == [4]
    write(d / "h1.jsonl", [ev(5, "h1", "last before rotation")])
    os.replace(d / "h1.jsonl", d / "h1.jsonl.1")
    write(d / "h1.jsonl", [ev(6, "h1", "first after")])
    assert [e["t_ns"] for e in fol.poll()] == [5]
    assert [e["t_ns"] for e in fol.poll()] == [6]
    fol.close()


def test_follow_starts_with_what_is_there(state):
    batches = []
    bad = evlog.follow(state, batches.append, poll_s=0, should_stop=lambda: len(batches) >= 1)
    assert [e["t_ns"] for e in batches[0]] == [5, 10, 20, 30, 40, 50, 60, 70]
    assert bad == 0  # (a partial last line waits for the rest of it)


def test_dvs_events_table_json_and_filters(state):
    r = CliRunner().invoke(cli, ["events", "--state-dir", str(state)])
    assert r.exit_code == 0, r.output
    rows = [x for x in r.output.splitlines() if x.strip()]
    assert rows[0].split()[:4] == ["time", "proc", "kind", "details"] and len(rows) == 10
    assert "host.dead" in rows[5] and "host=h3" in rows[5]
    assert rows[9] == "1 line(s) were not events (a torn last line of a killed process?); skipped"
    r = CliRunner().invoke(cli, ["events", "--json", "--kind", "host,ha", "--host", "h3", "--state-dir", str(state)])
    assert r.exit_code == 0
    assert [json.loads(x)["kind"] for x in r.output.splitlines() if x.startswith("{")] == ["host.dead", "ha.restart"]


def test_dvs_events_errors_are_one_line(tmp_path, state, capsys):
    assert main(["events", "--since", "yesterday", "--state-dir", str(state)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("dvs: error: --since 'yesterday' is neither")
    assert main(["events", "--state-dir", str(tmp_path / "nothing")]) == 4
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no events in" in err[0] and "dvs up" in err[0]
