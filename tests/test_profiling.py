"""The `profile` API of agents and the controller (dvswitch/profiling.py), which `dvs bench`'s
phase profile reads: start, stop with a summary and a pstats file, one-line errors for bad
arguments, and a process that survives all of it."""

from __future__ import annotations

import pstats

import pytest

from dvswitch.profiling import Profiler, area
from testbed.client import ClusterError


def _work() -> int:
    return sum(i * i for i in range(20_000))


def test_a_profile_counts_the_calls_made_while_it_ran(tmp_path) -> None:
    p = Profiler()
    assert p.api({"action": "status"}) == {"running": False}
    p.api({"action": "start"})
    for _ in range(3):
        _work()
    out = p.api({"action": "stop", "path": str(tmp_path / "x.pstats"), "top": 50})
    assert out["cpu_s"] > 0 and out["wall_s"] > 0 and out["profiled_s"] > 0
    mine = [r for r in out["top"] if r["function"].endswith("(_work)")]
    assert mine and mine[0]["calls"] == 3
    assert any(a["area"].startswith("tests/") or "test_profiling" in a["area"] for a in out["areas"])
    st = pstats.Stats(str(tmp_path / "x.pstats"))  # a file `python -m pstats` reads
    assert st.total_calls > 0  # type: ignore[attr-defined]
    assert p.api({"action": "status"}) == {"running": False}


@pytest.mark.parametrize("args, msg", [
    ([1, 2], "arguments must be a map"),
    ({"action": "go"}, "action must be start, stop or status"),
    ({"action": "stop"}, "no profile is running"),
    ({"action": "stop", "top": 0}, "top must be an integer"),
    ({"action": "stop", "path": 3}, "path must be a string"),
])
def test_bad_arguments_say_what_is_wrong(args, msg) -> None:
    with pytest.raises(ValueError, match=msg):
        Profiler().api(args)


def test_one_profile_at_a_time() -> None:
    p = Profiler()
    p.api({"action": "start"})
    try:
        with pytest.raises(ValueError, match="already running"):
            p.api({"action": "start"})
    finally:
        p.api({"action": "stop"})


def test_areas_name_our_modules_libraries_and_builtins() -> None:
    assert area(("/x/y/agent/wire.py", 1, "decode")) == "agent/wire.py"
    assert area(("/v/lib/python3.11/site-packages/zmq/sugar/socket.py", 1, "send")) == "zmq"
    assert area(("~", 0, "<built-in method posix.fsync>")) == "posix.fsync"
    assert area(("~", 0, "<method 'recv' of 'zmq.backend.cython._zmq.Socket' objects>")).startswith("zmq")


@pytest.mark.cluster
def test_profile_a_running_agent_and_controller_over_their_apis(make_cluster, tmp_path) -> None:
    c = make_cluster(3)
    c.create_vms(6)
    with c.agent_client("h3", timeout_ms=10_000) as ag, c.controller_client(timeout_ms=30_000) as ctl:
        with pytest.raises(ClusterError, match="action must be"):
            ag.call("profile", {"action": "nope"})
        with pytest.raises(ClusterError, match="no profile is running"):
            ctl.call("profile", {"action": "stop"})
        ag.call("profile", {"action": "start"})
        ctl.call("profile", {"action": "start"})
        vms = ctl.call("vm_list")["vms"]
        moved = 0
        for v in vms:
            if v["host"] != "h3":
                dst = "h1" if v["host"] != "h1" else "h2"
                assert ctl.call("vm_move", {"name": v["vm"], "to": dst})["converged"]
                moved += 1
        got = {who: cl.call("profile", {"action": "stop", "path": str(tmp_path / f"{who}.pstats"), "top": 200})
               for who, cl in (("agent", ag), ("controller", ctl))}
        assert moved >= 2
        # The bystander took the moves' gossip; the controller handled their requests.
        names = {r["function"] for r in got["agent"]["top"]}
        assert any("_on_updates" in n for n in names), sorted(names)[:20]
        names = {r["function"] for r in got["controller"]["top"]}
        assert any("api_vm_move" in n or "_on_request" in n or "on_frame" in n for n in names), sorted(names)[:20]
        for who in got:
            assert pstats.Stats(str(tmp_path / f"{who}.pstats")).total_calls > 0  # type: ignore[attr-defined]
        assert ag.call("ping")["host"] == "h3"  # alive after all of it
        assert ctl.call("vm_list")["vms"]


def test_an_unwritable_pstats_path_is_the_callers_error(tmp_path) -> None:
    p = Profiler()
    p.api({"action": "start"})
    with pytest.raises(ValueError, match="cannot write the pstats file"):
        p.api({"action": "stop", "path": str(tmp_path / "no" / "such" / "dir" / "x.pstats")})
    assert p.api({"action": "status"}) == {"running": False}


@pytest.mark.cluster
def test_dvs_profile_shows_where_a_host_and_the_controller_spend_their_cpu(make_cluster, tmp_path) -> None:
    import json

    from tests.conftest import run_dvs

    c = make_cluster(2)
    c.create_vms(4)
    sd = c.state_dir
    out = run_dvs("profile", "h2", "--seconds", "0.5", "--top", "5", "--out", str(tmp_path / "h2.pstats"),
                  state_dir=sd)
    assert out.returncode == 0, out.stderr
    assert "Own CPU time by area" in out.stdout and "Top 5 functions" in out.stdout
    assert pstats.Stats(str(tmp_path / "h2.pstats")).total_calls > 0  # type: ignore[attr-defined]
    js = run_dvs("profile", "controller", "--seconds", "0.3", "--json", state_dir=sd)
    assert js.returncode == 0, js.stderr
    doc = json.loads(js.stdout)
    assert doc["target"] == "controller" and doc["cpu_s"] >= 0 and doc["areas"]
    for args, needle in ((["h9"], "unknown host"), (["h1", "--out", str(tmp_path / "nodir" / "x")], "no directory"),
                         (["h1", "--seconds", "0"], "--seconds")):
        bad = run_dvs("profile", *args, state_dir=sd)
        assert bad.returncode != 0 and "Traceback" not in bad.stderr
        assert needle in bad.stderr and len(bad.stderr.strip().splitlines()) == 1, bad.stderr
