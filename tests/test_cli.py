"""`dvs` as a user runs it: one process per command, clear one-line errors, nothing left behind."""

from __future__ import annotations

import json

import psutil
import pytest

from tests.conftest import run_dvs

pytestmark = pytest.mark.cluster


def assert_one_line_error(proc, *needles: str) -> None:
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    for n in needles:
        assert n in lines[0], lines[0]


def test_commands_without_a_cluster_say_so(tmp_path):
    assert_one_line_error(run_dvs("status", state_dir=tmp_path), "no cluster is running", "dvs up")
    assert_one_line_error(run_dvs("down", state_dir=tmp_path), "no cluster is running")
    assert_one_line_error(run_dvs("mac-table", "h1", state_dir=tmp_path), "no cluster is running")


def test_exit_codes_of_errors(tmp_path):
    assert run_dvs("status", state_dir=tmp_path).returncode == 4  # no cluster: a cluster error
    assert run_dvs("up", "--hostz", "3", state_dir=tmp_path).returncode == 2  # usage
    assert run_dvs("up", "--hosts", "2", "--vtep-base", "nope", state_dir=tmp_path).returncode == 2


def test_bad_flags_are_one_line(tmp_path):
    assert_one_line_error(run_dvs("up", "--hosts", "0", state_dir=tmp_path), "--hosts")
    assert_one_line_error(run_dvs("up", "--hosts", "many", state_dir=tmp_path), "--hosts")
    assert_one_line_error(run_dvs("up", "--hostz", "3", state_dir=tmp_path), "--hostz")
    assert_one_line_error(run_dvs("vm", "move", "vm1", state_dir=tmp_path), "--to")
    assert_one_line_error(run_dvs("up", "--hosts", "2", "--vtep-base", "nope", state_dir=tmp_path), "--vtep-base")
    assert_one_line_error(run_dvs("traffic", "--pairs", "1", state_dir=tmp_path), "no cluster is running")


def test_a_vtep_address_in_use_is_one_line(tmp_path):
    import socket

    from testbed.cluster import pick_vtep_base

    base = pick_vtep_base(2)  # a free block, so no other cluster is disturbed
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind((base[: base.rindex(".")] + ".2", 4789))  # h2's VTEP
        assert_one_line_error(run_dvs("up", "--hosts", "2", "--vtep-base", base, state_dir=tmp_path),
                              "is in use", "--vtep-base")
    assert not (tmp_path / "cluster.json").exists()


def test_cluster_lifecycle_through_the_cli(tmp_path):
    sd = tmp_path / "state"
    up = run_dvs("up", "--hosts", "3", "--vms", "6", "--vtep-base", "auto", state_dir=sd)
    assert up.returncode == 0, up.stderr
    try:
        assert_one_line_error(run_dvs("up", "--hosts", "3", state_dir=sd), "already running", "dvs down")

        st = json.loads(run_dvs("status", "--json", state_dir=sd).stdout)
        assert [h["host"] for h in st["hosts"]] == ["h1", "h2", "h3"]
        for h in st["hosts"]:
            assert h["state"] == "alive" and h["mac_entries"] == 6 and h["dropped_malformed"] == 0
            assert h["pub_endpoint"].startswith("tcp://") and h["rpc_endpoint"].startswith("tcp://")
            assert psutil.pid_exists(h["pid"])
        assert len(st["digests"]) == 1

        assert_one_line_error(run_dvs("vm", "move", "no-such-vm", "--to", "h1", state_dir=sd), "unknown VM")
        assert_one_line_error(run_dvs("vm", "move", "vm1", "--to", "h9", state_dir=sd), "unknown host", "h9")
        assert_one_line_error(run_dvs("vm", "move", "vm1", "--to", "h1", state_dir=sd), "already on h1")
        assert_one_line_error(run_dvs("mac-table", "h7", state_dir=sd), "unknown host")
        assert_one_line_error(run_dvs("vm", "create", "vm1", "--host", "h2", state_dir=sd), "already exists")
        assert_one_line_error(run_dvs("vm", "create", "x", "--host", "h2", "--profile", "nope", state_dir=sd),
                              "unknown port profile")

        mv = run_dvs("vm", "move", "vm1", "--to", "h3", "--json", state_dir=sd)
        assert mv.returncode == 0, mv.stderr
        rec = json.loads(mv.stdout)
        assert (rec["vm"], rec["src"], rec["dst"], rec["seq"], rec["converged"]) == ("vm1", "h1", "h3", 1, True)
        plain = run_dvs("vm", "move", "vm1", "--to", "h2", state_dir=sd)
        assert plain.returncode == 0 and "converged" in plain.stdout and " ms" in plain.stdout

        created = run_dvs("vm", "create", "web1", "--host", "h2", "--profile", "web", state_dir=sd)
        assert created.returncode == 0, created.stderr
        vms = {v["vm"]: v for v in json.loads(run_dvs("vm", "list", "--json", state_dir=sd).stdout)}
        assert (vms["vm1"]["host"], vms["vm1"]["seq"]) == ("h2", 2)
        assert (vms["web1"]["host"], vms["web1"]["vlan"]) == ("h2", 110)

        table = json.loads(run_dvs("mac-table", "h1", "--json", state_dir=sd).stdout)
        vm1 = next(e for e in table["entries"] if e["mac"] == vms["vm1"]["mac"])
        assert (vm1["host"], vm1["seq"], vm1["local"]) == ("h2", 2, False)

        assert run_dvs("check", state_dir=sd).returncode == 0
        moves = json.loads(run_dvs("moves", "--json", state_dir=sd).stdout)
        assert [m["dst"] for m in moves] == ["h3", "h2"]
    finally:
        pids = [h["pid"] for h in json.loads((sd / "cluster.json").read_text())["agents"]]
        down = run_dvs("down", state_dir=sd)
    assert down.returncode == 0, down.stderr
    assert not [p for p in pids if psutil.pid_exists(p)]
    assert_one_line_error(run_dvs("status", state_dir=sd), "no cluster is running")


def test_demo_json(tmp_path):
    proc = run_dvs("demo", "--hosts", "3", "--vms", "9", "--moves", "4", "--json", state_dir=tmp_path / "d")
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert (out["hosts"], out["vms"], len(out["moves"])) == (3, 9, 4)
    assert all(m["converged"] and m["latency_ms"] >= 0 for m in out["moves"])
    s = out["summary"]
    assert s["moves"] == s["converged"] == 4
    assert s["latency_ms_p50"] <= s["latency_ms_p99"] <= s["latency_ms_max"]
    # Traffic ran between 4 VM pairs during the moves; every move reports its frames.
    assert s["frames_sent"] > 0 and s["misdelivered"] == 0
    assert all(m["frames"] > 0 and m["frames_lost"] is not None for m in out["moves"])
    assert not (tmp_path / "d" / "cluster.json").exists()


def test_foreground_stops_everything_on_ctrl_c(tmp_path):
    import signal
    import subprocess
    import sys

    sd = tmp_path / "fg"
    proc = subprocess.Popen([sys.executable, "-m", "testbed.cli", "up", "--hosts", "2", "--foreground", "--vtep-base", "auto",
                             "--state-dir", str(sd)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        for line in proc.stderr:  # progress goes to stderr, results to stdout
            if "Ctrl-C" in line:
                break
        pids = [a["pid"] for a in json.loads((sd / "cluster.json").read_text())["agents"]]
        assert all(psutil.pid_exists(p) for p in pids)
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        if proc.returncode != 0 and (sd / "cluster.json").exists():
            # dvs failed before it stopped its cluster: stop it here (by pid), leave nothing behind.
            from testbed.cluster import Cluster

            Cluster.load(sd).down()
    assert proc.returncode == 0, err
    assert "cluster stopped" in out
    assert not [p for p in pids if psutil.pid_exists(p)]
    assert not (sd / "cluster.json").exists()
