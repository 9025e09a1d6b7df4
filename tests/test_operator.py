"""The operator contract of `dvs` (issue 15): metrics, output in pipes, exit codes, the state
dir's defects, parallel writers of cluster.json, the registry and `dvs cleanup`."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import psutil
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import run_dvs
from tests.test_cli import assert_one_line_error

pytestmark = pytest.mark.cluster


def scrape(url: str) -> dict[str, list]:
    with urllib.request.urlopen(url, timeout=10) as resp:
        assert resp.status == 200
        assert resp.headers["Content-Type"].startswith("text/plain")
        text = resp.read().decode()
    return {f.name: f.samples for f in text_string_to_metric_families(text)}


def value(samples: list, name: str, **labels) -> float:
    [v] = [s.value for s in samples if s.name == name and all(s.labels.get(k) == x for k, x in labels.items())]
    return v


def alive_pids(pids) -> list[int]:
    left = []
    for pid in pids:
        try:
            if psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
                left.append(pid)
        except psutil.Error:
            pass
    return left


def wait_gone(pids, timeout_s: float = 15) -> list[int]:
    deadline = time.monotonic() + timeout_s
    while (left := alive_pids(pids)) and time.monotonic() < deadline:
        time.sleep(0.1)
    return left


@pytest.fixture
def cluster_dir(tmp_path):
    """A 3-host cluster started by `dvs up`, stopped (and proven gone) after the test."""
    sd = tmp_path / "state"
    up = run_dvs("up", "--hosts", "3", "--vms", "6", "--vtep-base", "auto", "--log-level", "debug", state_dir=sd)
    assert up.returncode == 0, up.stderr
    data = json.loads((sd / "cluster.json").read_text())
    pids = [a["pid"] for a in data["agents"]] + [data["controller"]["pid"]]
    yield sd
    if (sd / "cluster.json").exists():
        assert run_dvs("down", state_dir=sd).returncode == 0
    assert not wait_gone(pids, 10)


def test_metrics_status_moves_and_output_in_a_pipe(cluster_dir):
    sd = cluster_dir
    # Six moves of one VM: more than the flap guard's five within its window.
    for dst in ("h2", "h3", "h1", "h2", "h3", "h1"):
        mv = run_dvs("vm", "move", "vm1", "--to", dst, state_dir=sd)
        assert mv.returncode == 0, mv.stderr

    st = json.loads(run_dvs("status", "--json", state_dir=sd).stdout)
    ctl_url = st["controller"]["metrics"]
    assert ctl_url.startswith("http://127.0.0.1:") and ctl_url.endswith("/metrics")
    assert ctl_url == f"http://127.0.0.1:{st['controller']['metrics_port']}/metrics"
    for h in st["hosts"]:
        assert h["metrics"] == f"http://127.0.0.1:{h['metrics_port']}/metrics"
        # MACs are strings in every JSON output, the data plane's ports included.
        assert all(isinstance(p["mac"], str) and p["mac"].count(":") == 5 for p in h["dataplane"]["ports"])
    mt = json.loads(run_dvs("mac-table", "h1", "--json", state_dir=sd).stdout)
    assert all(isinstance(p["mac"], str) for p in mt["ports"])
    vm1_mac = next(v["mac"] for v in json.loads(run_dvs("vm", "list", "--json", state_dir=sd).stdout)
                   if v["vm"] == "vm1")
    assert any(f["mac"] == vm1_mac for f in st["flapping"])

    # The controller: moves by kind and result, and the convergence histogram (ms buckets).
    m = scrape(ctl_url)
    assert value(m["dvs_controller_moves"], "dvs_controller_moves_total", kind="move", result="converged") == 6
    hist = m["dvs_controller_move_convergence_ms"]
    assert value(hist, "dvs_controller_move_convergence_ms_count", kind="move") == 6
    assert value(hist, "dvs_controller_move_convergence_ms_bucket", kind="move", le="+Inf") == 6
    assert value(hist, "dvs_controller_move_convergence_ms_sum", kind="move") > 0
    assert value(m["dvs_controller_hosts"], "dvs_controller_hosts", state="alive") == 3
    # An agent: status counters, MAC entries, per-port frame counters labelled by port and VM.
    h1 = scrape(st["hosts"][0]["metrics"])
    assert value(h1["dvs_agent_mac_entries"], "dvs_agent_mac_entries") == 6
    assert value(h1["dvs_agent_dropped_messages"], "dvs_agent_dropped_messages_total", reason="malformed") == 0
    assert value(h1["dvs_agent_heartbeats_received"], "dvs_agent_heartbeats_received_total") > 0
    assert {s.labels["vm"] for s in h1["dvs_agent_port_rx_frames"]} >= {"vm4"}  # h1 holds vm4 now
    assert "process_resident_memory_bytes" in {s.name for f in h1.values() for s in f}

    merged = run_dvs("metrics", state_dir=sd)
    assert merged.returncode == 0, merged.stderr
    fams = {f.name: f.samples for f in text_string_to_metric_families(merged.stdout)}
    assert {s.labels["process"] for s in fams["dvs_agent_mac_entries"]} == {"h1", "h2", "h3"}
    only = run_dvs("metrics", "--host", "controller", state_dir=sd)
    assert "dvs_controller_move_convergence_ms_bucket" in only.stdout and "dvs_agent_" not in only.stdout
    assert_one_line_error(run_dvs("metrics", "--host", "h9", state_dir=sd), "unknown process")

    # In a pipe (stdout is one here) nothing is cut: full digests, every column, no ellipsis.
    human = run_dvs("status", state_dir=sd)
    assert human.returncode == 0, human.stderr
    assert "…" not in human.stdout and st["hosts"][0]["digest"] in human.stdout
    assert "frames rx/tx/drop" in human.stdout and st["hosts"][2]["dataplane"]["vtep"] in human.stdout
    assert "flapping" in human.stdout and vm1_mac in human.stdout and "moves still go ahead" in human.stdout

    last = run_dvs("moves", "--last", "2", state_dir=sd)
    assert last.returncode == 0 and "…" not in last.stdout
    assert "kind" in last.stdout and "latency ms" in last.stdout
    assert "showing the last 2 of 6" in last.stderr and "--all" in last.stderr
    assert "showing" not in last.stdout
    every = run_dvs("moves", "--all", "--json", state_dir=sd)
    recs = json.loads(every.stdout)
    assert len(recs) == 6 and {r["kind"] for r in recs} == {"move"} and every.stderr == ""
    assert_one_line_error(run_dvs("moves", "--last", "2", "--all", state_dir=sd), "not both")

    # --log-level reached the agents and the controller.
    for p in (st["hosts"][0]["pid"], st["controller"]["pid"]):
        cmd = psutil.Process(p).cmdline()
        assert cmd[cmd.index("--log-level") + 1] == "debug"


def test_exit_codes_have_one_meaning_each(cluster_dir, tmp_path):
    sd = cluster_dir
    assert run_dvs("check", state_dir=sd).returncode == 0
    assert run_dvs("up", "--hosts", "2", state_dir=sd).returncode == 4  # a cluster error
    assert run_dvs("status", state_dir=tmp_path / "none").returncode == 4
    assert run_dvs("up", "--hosts", "zero", state_dir=sd).returncode == 2  # usage
    assert run_dvs("vm", "move", "vm1", state_dir=sd).returncode == 2
    version = run_dvs("--version")
    assert version.returncode == 0 and version.stdout.startswith("dvs ")
    helptext = run_dvs("--help").stdout
    for line in ("0  ok / valid", "1  invalid or disagreement", "2  usage error", "3  unknown",
                 "4  cluster or environment error"):
        assert line in helptext, helptext


def test_parallel_agent_starts_keep_every_pid(tmp_path):
    sd = tmp_path / "state"
    up = run_dvs("up", "--hosts", "8", "--vtep-base", "off", state_dir=sd)
    assert up.returncode == 0, up.stderr
    data = json.loads((sd / "cluster.json").read_text())
    old = [a["pid"] for a in data["agents"]]
    started: list[int] = []
    try:
        for pid in old:
            os.kill(pid, signal.SIGKILL)
        assert not wait_gone(old, 10)
        with ThreadPoolExecutor(8) as pool:
            procs = list(pool.map(lambda h: run_dvs("agent", "start", h, state_dir=sd), [f"h{i}" for i in range(1, 9)]))
        assert all(p.returncode == 0 for p in procs), [p.stderr for p in procs]
        started = [int(p.stdout.split("pid ")[1].rstrip(")\n")) for p in procs]
        recorded = {a["name"]: a["pid"] for a in json.loads((sd / "cluster.json").read_text())["agents"]}
        assert sorted(recorded.values()) == sorted(started), (recorded, started)
        assert not set(old) & set(recorded.values())
        assert not [f for f in os.listdir(sd) if f.endswith(".tmp")]  # no temp file left by a writer
    finally:
        down = run_dvs("down", state_dir=sd)
    assert down.returncode == 0, down.stderr
    assert not wait_gone(started + [data["controller"]["pid"]], 10)


def test_state_dir_problems_are_one_line(tmp_path):
    regular = tmp_path / "file"
    regular.write_text("not a dir")
    cases = [regular, regular / "under", Path("/proc/dvs-state")]
    if os.geteuid() != 0:  # root may write anywhere: only a non-root user meets a permission error
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o500)
        cases.append(locked / "state")
        cases.append(locked)
    for sd in cases:
        proc = run_dvs("up", "--hosts", "1", "--vtep-base", "off", state_dir=sd)
        assert_one_line_error(proc, str(sd))
        assert proc.returncode == 4
        status = run_dvs("status", state_dir=sd)
        assert_one_line_error(status)
        assert status.returncode == 4
    assert "is not a directory" in run_dvs("status", state_dir=regular).stderr


def test_damaged_cluster_json_is_one_line(tmp_path):
    sd = tmp_path / "state"
    sd.mkdir()
    proc_json = {"name": "h1", "pid": -1, "create_time": 1.0, "log": "x", "pub": "", "rpc": ""}
    for text, needle in (("[1, 2]", "JSON object"), (json.dumps({"agents": [proc_json]}), "positive integer"),
                         (json.dumps({"agents": {"h1": 1}}), "not a list"), ("{", "damaged")):
        (sd / "cluster.json").write_text(text)
        for cmd in ("status", "down"):
            proc = run_dvs(cmd, state_dir=sd)
            assert_one_line_error(proc, "damaged", needle)
            assert proc.returncode == 4


def test_vtep_base_not_local_or_overflowing_is_one_line(tmp_path):
    assert_one_line_error(run_dvs("up", "--hosts", "2", "--vtep-base", "198.51.100.1", state_dir=tmp_path),
                          "not a local address")
    assert_one_line_error(run_dvs("up", "--hosts", "8", "--vtep-base", "127.9.9.250", state_dir=tmp_path),
                          "no room for 8 hosts", "/24")
    assert not (tmp_path / "cluster.json").exists()


# ---------------------------------------------------------------------- teardown


def _dvs_argv(*args: str) -> list[str]:
    return [sys.executable, "-m", "testbed.cli", *args]


def _follow(proc: subprocess.Popen, marker: str, timeout_s: float) -> tuple[Path, set[int]]:
    """Read the run's stderr up to the line naming its state dir; then collect every pid its
    cluster.json names while the run goes (restarts included), until it exits."""
    deadline = time.monotonic() + timeout_s
    state_dir = None
    for line in proc.stderr:
        if marker in line:
            state_dir = Path(line.split(marker, 1)[1].split()[0])
            break
    assert state_dir is not None, "the run did not print its state dir"
    pids: set[int] = set()
    while proc.poll() is None and time.monotonic() < deadline:
        try:
            data = json.loads((state_dir / "cluster.json").read_text())
            pids.update(a["pid"] for a in data["agents"])
            if data.get("controller"):
                pids.add(data["controller"]["pid"])
        except (OSError, ValueError):
            pass
        time.sleep(0.1)
    proc.stderr.read()
    proc.wait(timeout=max(1.0, deadline - time.monotonic()))
    return state_dir, pids


@pytest.mark.parametrize("argv, seconds", [
    (["demo", "--moves", "100000"], 10),
    (["chaos", "scenarios/rolling-restart.toml"], 15),
], ids=["demo", "chaos"])
def test_sigterm_stops_everything_the_run_started(tmp_path, argv, seconds):
    cmd = ["timeout", "-s", "TERM", str(seconds), *_dvs_argv(*argv)]
    if argv[0] == "chaos":
        cmd += ["--report", str(tmp_path / "report")]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            cwd=Path(__file__).resolve().parent.parent)
    state_dir, pids = _follow(proc, "state dir ", seconds + 90)
    if argv[0] == "chaos":  # every process the run ever started, restarts included
        for line in (tmp_path / "report" / "history.jsonl").read_text().splitlines():
            ev = json.loads(line)
            if ev.get("ev") != "run_start" and isinstance(ev.get("pid"), int):
                pids.add(ev["pid"])
    assert pids, "the run never recorded a cluster"
    assert proc.returncode == 124  # timeout sent the signal
    assert not alive_pids(pids), f"left running: {alive_pids(pids)}"
    assert not (state_dir / "cluster.json").exists()
    if argv[0] == "demo":
        shutil.rmtree(state_dir)  # the demo keeps its logs after a failed run; the test keeps nothing


def test_sigkill_of_the_run_takes_its_cluster_along(tmp_path, monkeypatch):
    monkeypatch.setenv("DVS_REGISTRY_DIR", str(tmp_path / "registry"))
    proc = subprocess.Popen(_dvs_argv("demo", "--hosts", "3", "--vms", "6", "--moves", "100000", "--pairs", "0"),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        state_dir = None
        for line in proc.stderr:
            if "state dir " in line:
                state_dir = Path(line.split("state dir ", 1)[1].split()[0])
                break
        assert state_dir is not None
        deadline = time.monotonic() + 60
        pids: list[int] = []
        while len(pids) < 4 and time.monotonic() < deadline:
            try:
                data = json.loads((state_dir / "cluster.json").read_text())
                pids = [a["pid"] for a in data["agents"]] + ([data["controller"]["pid"]] if data["controller"] else [])
            except (OSError, ValueError, KeyError, TypeError):
                pass
            time.sleep(0.1)
        assert len(pids) == 4, "the demo's cluster never came up"
    finally:
        proc.kill()
        proc.wait()
    assert not wait_gone(pids, 15), "agents or the controller outlived their run"
    shutil.rmtree(state_dir)
    # What it left: a stale registry entry, which cleanup removes (and a second cleanup finds nothing).
    first = run_dvs("cleanup")
    assert first.returncode == 0 and f"{state_dir}: stale entry removed" in first.stdout, first.stdout
    again = run_dvs("cleanup")
    assert again.returncode == 0 and str(state_dir) not in again.stdout


def test_cleanup_stops_clusters_of_dead_runs_by_pid(tmp_path, monkeypatch):
    from testbed.cluster import registry_entry

    monkeypatch.setenv("DVS_REGISTRY_DIR", str(tmp_path / "registry"))

    sd = tmp_path / "state"
    assert run_dvs("up", "--hosts", "2", "--vtep-base", "off", state_dir=sd).returncode == 0
    data = json.loads((sd / "cluster.json").read_text())
    pids = [a["pid"] for a in data["agents"]] + [data["controller"]["pid"]]
    try:
        kept = run_dvs("cleanup")
        assert f"{sd}: kept: started by `dvs up`" in kept.stdout and len(alive_pids(pids)) == 3
        # As if a run that owned it had died without stopping it (and its processes had not noticed):
        gone = subprocess.Popen(["true"])
        gone.wait()
        entry = registry_entry(sd)
        rec = json.loads(entry.read_text())
        rec.update(owner_pid=gone.pid, owner_create_time=1.0)
        entry.write_text(json.dumps(rec))
        out = run_dvs("cleanup")
        assert out.returncode == 0 and f"{sd}: stopped" in out.stdout, out.stdout
        assert not wait_gone(pids, 10)
        assert not (sd / "cluster.json").exists() and not entry.exists()
        again = run_dvs("cleanup")
        assert again.returncode == 0 and str(sd) not in again.stdout
    finally:
        if (sd / "cluster.json").exists():
            run_dvs("down", state_dir=sd)
    assert not wait_gone(pids, 10)


def test_cleanup_all_stops_detached_clusters(tmp_path, monkeypatch):
    monkeypatch.setenv("DVS_REGISTRY_DIR", str(tmp_path / "registry"))
    sd = tmp_path / "state"
    assert run_dvs("up", "--hosts", "1", "--vtep-base", "off", state_dir=sd).returncode == 0
    data = json.loads((sd / "cluster.json").read_text())
    pids = [data["agents"][0]["pid"], data["controller"]["pid"]]
    try:
        out = run_dvs("cleanup", "--all")
        assert f"{sd}: stopped" in out.stdout, out.stdout
        assert not wait_gone(pids, 10)
    finally:
        if (sd / "cluster.json").exists():
            run_dvs("down", state_dir=sd)


def test_sighup_stops_traffic_and_unplugs_its_vms(cluster_dir):
    from testbed.cluster import Cluster

    cluster = Cluster.load(cluster_dir)

    def vnics() -> int:
        total = 0
        for h in cluster.agents:
            with cluster.agent_client(h) as a:
                total += a.call("dataplane")["vnics"]
        return total

    proc = subprocess.Popen(_dvs_argv("traffic", "--pairs", "2", "--duration", "300", "--state-dir", str(cluster_dir)),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        while vnics() == 0 and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.1)
        assert vnics() > 0, "the traffic run never plugged its VMs in"
        proc.send_signal(signal.SIGHUP)
        err = proc.communicate(timeout=60)[1]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 128 + signal.SIGHUP, err
    assert "stopped by SIGHUP" in err and "Traceback" not in err
    assert vnics() == 0  # its VMs' backends are gone: no agent keeps sending to them
