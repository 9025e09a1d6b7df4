"""dvswitch/: the shared rules (naming, statistics, user errors) and that each has one home."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from dvswitch import errors, naming, stats

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("agent", "controller", "testbed", "dvswitch")


def _modules():
    for pkg in PACKAGES:
        for path in sorted((ROOT / pkg).rglob("*.py")):
            yield path, ast.parse(path.read_text(), str(path))


# ---------------------------------------------------------------------- naming


def test_host_vm_and_port_names():
    assert naming.host_names(3) == ["h1", "h2", "h3"] and naming.host_name(12) == "h12"
    assert naming.vm_names(2) == ["vm1", "vm2"] and naming.vm_name(7) == "vm7"
    assert naming.port_name(7) == "vEth7"
    assert [naming.host_number(n) for n in ("h1", "h999999", "h0", "h01", "h1000000", "web", "h", "H3")] == [
        1, 999_999, None, None, None, None, None, None]
    assert sorted(["h10", "h2", "web", "h1", "rack3"], key=naming.host_order) == ["h1", "h2", "h10", "rack3", "web"]


@given(st.integers(1, naming.MAX_HOST_NUMBER))
def test_a_hosts_vtep_maps_back_to_the_host(n):
    host = naming.host_name(n)
    assert naming.host_number(host) == n
    ip = naming.vtep_ip("10.0.0.0", host)
    assert ip is not None and naming.host_of_vtep("10.0.0.0", ip) == host


def test_vtep_of_a_name_that_is_no_lab_host_or_a_bad_base_is_none():
    assert naming.vtep_ip("127.0.0.1", "h8") == "127.0.0.9"
    assert naming.vtep_ip("127.0.0.1", "web") is None and naming.vtep_ip("no-ip", "h1") is None
    assert naming.host_of_vtep("127.0.0.1", "127.0.0.1") is None  # the base itself is no host


# ---------------------------------------------------------------------- statistics


def test_percentile_is_nearest_rank():
    v = list(range(1, 101))  # 1..100
    assert [stats.percentile(v, q) for q in (0, 1, 50, 90, 99, 100)] == [1, 1, 50, 90, 99, 100]
    assert stats.percentile([3.0, 1.0, 2.0, 4.0], 50) == 2.0  # the lower middle value, not 2.5
    assert stats.percentile([], 50) is None and stats.percentile([5], 99) == 5


@given(st.lists(st.floats(-1e9, 1e9), min_size=1, max_size=200), st.floats(0, 100), st.floats(0, 100))
def test_a_percentile_is_a_measured_value_and_rises_with_q(values, q1, q2):
    lo, hi = sorted((q1, q2))
    a, b = stats.percentile(values, lo), stats.percentile(values, hi)
    assert a in values and b in values and a <= b
    assert stats.percentile(values, 0) == min(values) and stats.percentile(values, 100) == max(values)


def test_move_summary_and_distribution():
    recs = [{"converged": True, "latency_ms": 3.0}, {"converged": True, "latency_ms": 1.0},
            {"converged": False, "latency_ms": None}]
    assert stats.summarize_moves(recs) == {"moves": 3, "converged": 2, "latency_ms_p50": 1.0,
                                           "latency_ms_p99": 3.0, "latency_ms_max": 3.0}
    assert stats.summarize_moves([])["latency_ms_p50"] is None
    d = stats.distribution([1.0, 2.0, 3.0, 4.0])
    assert (d["count"], d["p50"], d["p90"], d["max"], d["mean"]) == (4, 2.0, 4.0, 4.0, 2.5)


def test_the_chaos_checker_reports_percentiles_by_the_same_definition():
    from testbed.chaos.checker import History
    from testbed.chaos.checker import stats as chaos_stats

    events = []
    for i in range(1, 101):  # moves 1..100 with latency i ms: nearest-rank p50 is 50, p99 is 99
        events.append({"ev": "move_req", "id": i, "t_ns": 0})
        events.append({"ev": "move_ack", "id": i, "t_ns": i * 1_000_000, "rec": {"converged": True,
                                                                              "latency_ms": float(i)}})
    h = History(events, [])
    s = chaos_stats(h)
    assert (s["latency_ms_p50"], s["latency_ms_p99"], s["reply_wait_ms_p99"]) == (50.0, 99.0, 99.0)


def test_one_percentile_definition_in_the_tree():
    """A function named like a percentile outside dvswitch/stats.py must call it, not rank itself."""
    for path, tree in _modules():
        if path == ROOT / "dvswitch" / "stats.py":
            continue
        for node in ast.walk(tree):
            if isinstance(node, ast.FunctionDef) and node.name.strip("_") in ("percentile", "pct", "quantile"):
                calls = {c.func.id for c in ast.walk(node) if isinstance(c, ast.Call) and isinstance(c.func, ast.Name)}
                assert "percentile" in calls, f"{path.relative_to(ROOT)}:{node.lineno} ranks values itself"


def test_no_module_imports_a_private_name_of_another_package():
    for path, tree in _modules():
        own = path.relative_to(ROOT).parts[0]
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] != own:
                private = [a.name for a in node.names if a.name.startswith("_") and not a.name.startswith("__")]
                assert not private, f"{path.relative_to(ROOT)}:{node.lineno} imports {node.module}.{private[0]}"


def test_dvswitch_imports_none_of_the_packages_above_it():
    for path, tree in _modules():
        if path.relative_to(ROOT).parts[0] != "dvswitch":
            continue
        for node in ast.walk(tree):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            assert not any(n.split(".")[0] in ("agent", "controller", "testbed") for n in names), path


# ---------------------------------------------------------------------- user errors


def test_fail_prints_one_line_and_returns_the_code(capsys):
    assert errors.fail("dvs", "no cluster in ./x; run `dvs up` first", errors.EXIT_ERROR) == 4
    assert capsys.readouterr().err == "dvs: error: no cluster in ./x; run `dvs up` first\n"
    assert errors.error_line("agent", "bad") == "agent: error: bad"


@pytest.mark.parametrize("prog, argv, fragment", [
    ("agent", ["--host", "h1"], "give --controller ENDPOINT"),
    ("controller", ["--cluster", "/nonexistent/cluster.toml"], "cluster.toml"),
])
def test_agent_and_controller_user_errors_are_one_line_with_exit_2(capsys, prog, argv, fragment):
    import importlib

    main = importlib.import_module(f"{prog}.__main__").main
    assert main(argv) == errors.EXIT_USAGE
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"{prog}: error: ") and fragment in err[0], err


def test_dvs_exit_codes_are_the_shared_ones():
    from testbed import console

    assert (console.EXIT_OK, console.EXIT_INVALID, console.EXIT_USAGE, console.EXIT_UNKNOWN, console.EXIT_ERROR) == (
        errors.EXIT_OK, errors.EXIT_INVALID, errors.EXIT_USAGE, errors.EXIT_UNKNOWN, errors.EXIT_ERROR)
