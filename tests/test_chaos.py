"""Chaos runs: scenario validation, deterministic plans, the checker on hand-made histories
(each invariant violated once), and real runs: one valid, and two against deliberately
broken agents that the checker must call INVALID for the right reason."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import psutil
import pytest

from testbed.chaos.checker import check_history
from testbed.chaos.scenario import build_plan, load_scenario, parse_scenario
from testbed.client import ClusterError

REPO = Path(__file__).resolve().parent.parent

# ---------------------------------------------------------------------- scenario files

GOOD = """
name = "unit"
[cluster]
hosts = 4
vms = 8
[workload]
duration_s = 10
move_rate_per_s = 2
hot_vms_fraction = 0.25
storms = [{ at_s = 2.0, count = 4 }]
[[faults]]
at_s = 1.0
kind = "kill"
target = "random"
for_s = 2.0
[[faults]]
at_s = 4.0
kind = "partition"
named = "isolate"
host = "random"
for_s = 1.0
[[faults]]
at_s = 6.0
kind = "loss"
p = 0.2
hosts = ["h1", "h2"]
[[faults]]
at_s = 7.0
kind = "heal"
"""


def write(tmp_path: Path, text: str, name: str = "s.toml") -> Path:
    p = tmp_path / name
    p.write_text(text)
    return p


def test_a_good_scenario_loads(tmp_path):
    sc = load_scenario(write(tmp_path, GOOD))
    assert (sc.name, sc.hosts, sc.vms, sc.duration_s) == ("unit", 4, 8, 10.0)
    assert [f.kind for f in sc.faults] == ["kill", "partition", "loss", "heal"]


def test_same_seed_same_plan_and_another_seed_differs(tmp_path):
    sc = load_scenario(write(tmp_path, GOOD))
    a, b, c = build_plan(sc, 1), build_plan(sc, 1), build_plan(sc, 2)
    assert a == b and a.to_json() == b.to_json()
    assert a.moves != c.moves or a.actions != c.actions
    kinds = [x.kind for x in a.actions]
    assert kinds == ["kill", "restart", "net", "heal", "net", "heal"]
    killed = a.actions[0].target
    assert a.actions[1].target == killed  # the restart follows the randomly chosen victim
    assert len(a.moves) == 20 + 4 and all(m.vm in sc.vm_names for m in a.moves)


BAD = [
    ("[cluster]\nhosts = 4\nvms = 2\n", "workload: missing; expected a [workload] table"),
    ("[cluster]\nhosts = 4\n", "cluster.vms: missing; expected an integer in [1, 4096]"),
    (GOOD.replace("p = 0.2", ""), "faults[2].p: missing; expected a probability in [0, 1]"),
    (GOOD.replace("hosts = 4", "hosts = \"4\""), "cluster.hosts: expected an integer in [2, 32], got '4'"),
    (GOOD.replace("vms = 8", "vms = 8\ncolour = 1"), "cluster.colour: expected one of the known keys"),
    (GOOD.replace("p = 0.2", "p = 1.5"), "faults[2].p: expected a number in [0, 1], got 1.5"),
    (GOOD.replace("kind = \"heal\"", "kind = \"explode\""), "faults[3].kind: expected one of partition"),
    (GOOD.replace("at_s = 7.0", "at_s = 70.0"), "faults[3].at_s: expected a number in [0, 10]"),
    (GOOD.replace("hosts = [\"h1\", \"h2\"]", "hosts = [\"h1\", \"h9\"]"), "faults[2].hosts[1]: expected one of h1"),
    (GOOD.replace("named = \"isolate\"", "named = \"quarters\""), "faults[1].named: expected one of isolate"),
    (GOOD + "[[faults]]\nat_s = 8.0\nkind = \"resume\"\ntarget = \"h1\"\n",
     "faults[4]: expected h1 paused at 8 s to resume it (it is up then)"),
    (GOOD + "[end]\nkeep_down = [\"h2\"]\n", "end.keep_down: expected only processes the schedule leaves killed"),
    (GOOD.replace("for_s = 1.0", "for_s = 9.0"), "faults[1].for_s: expected at_s + for_s <= workload.duration_s"),
    (GOOD.replace("[workload]", "[agent]\nheartbeat_interval_ms = true\n[workload]"),
     "agent.heartbeat_interval_ms: expected an integer"),
    (GOOD.replace("[workload]", "[controller]\ndead_after = 1\n[workload]"), "controller.dead_after: expected a "),
    ("[cluster\nhosts = 4\n", "not valid TOML"),
]


@pytest.mark.parametrize("text,msg", BAD)
def test_a_malformed_scenario_is_one_clear_line(tmp_path, text, msg):
    p = write(tmp_path, text, "bad.toml")
    with pytest.raises(ClusterError) as e:
        load_scenario(p)
    text = str(e.value)
    assert "\n" not in text and text.startswith(f"{p}: "), text
    assert msg in text, text


def test_a_missing_file_and_the_command_line_say_so_in_one_line(tmp_path):
    with pytest.raises(ClusterError, match="no such scenario file"):
        load_scenario(tmp_path / "nope.toml")
    p = write(tmp_path, GOOD.replace("p = 0.2", "p = -1"), "bad.toml")
    proc = subprocess.run([sys.executable, "-m", "testbed.chaos", str(p), "--report", str(tmp_path / "r")],
                          capture_output=True, text=True, cwd=REPO, timeout=60)
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and "Traceback" not in proc.stderr, proc.stderr
    assert "faults[2].p: expected a number in [0, 1], got -1" in proc.stderr


def test_the_shipped_scenarios_are_valid():
    files = sorted((REPO / "scenarios").glob("*.toml"))
    assert len(files) >= 6
    for f in files:
        sc = load_scenario(f)
        assert 4 <= sc.hosts <= 8 and sc.duration_s <= 20, f
        build_plan(sc, 1)


def test_parse_scenario_names_the_source():
    with pytest.raises(ClusterError, match=r"^inline: cluster: missing; expected a \[cluster\] table"):
        parse_scenario({"workload": {"duration_s": 1}}, "inline")


# ---------------------------------------------------------------------- the checker on hand-made histories

T0 = 5_000_000_000_000
MS = 1_000_000
MAC1, MAC2 = 0x020000000001, 0x020000000002


def _vm(name, mac, host, seq):
    return {"vm": name, "mac": ":".join(f"{(mac >> s) & 0xFF:02x}" for s in range(40, -1, -8)), "vlan": 100,
            "profile": "default", "host": host, "port": f"vEth{mac & 0xFF}", "seq": seq, "state": "active"}


def _table(host, placement):
    entries = [{"vlan": 100, "mac": _vm("x", mac, h, s)["mac"], "host": h, "port": f"vEth{mac & 0xFF}", "seq": s,
                "tombstone": False, "local": h == host} for mac, (h, s) in placement.items()]
    ports = [{"port": f"vEth{mac & 0xFF}", "vm": f"vm{mac & 0xFF}", "vlan": 100, "mac": mac, "state": "active"}
             for mac, (h, _) in placement.items() if h == host]
    return {"ev": "final_table", "host": host, "digest": "0", "entries": entries, "ports": ports, "incarnation": 1,
            "stats": {}, "last_error": ""}


def good_history() -> list[dict]:
    """Two hosts, two VMs; vm1 moves h1 -> h2 (seq 1) and converges."""
    final = {MAC1: ("h2", 1), MAC2: ("h2", 0)}
    rec = {"op": 3, "kind": "move", "vm": "vm1", "src": "h1", "dst": "h2", "seq": 1, "converged": True,
           "latency_ms": 1.5, "error": "", "missing": [], "switch_ns": T0 + 1000 * MS,
           "applied_ms": {"h1": 1.5, "h2": 0.0}}
    applies = [[T0 - 500 * MS, "h1", 100, MAC1, "h1", 0, False], [T0 - 500 * MS, "h2", 100, MAC1, "h1", 0, False],
               [T0 - 500 * MS, "h1", 100, MAC2, "h2", 0, False], [T0 - 500 * MS, "h2", 100, MAC2, "h2", 0, False],
               [T0 + 1000 * MS, "h2", 100, MAC1, "h2", 1, False],
               [T0 + 1001 * MS, "h1", 100, MAC1, "h2", 1, False]]
    ev = [
        {"ev": "run_start", "t_ns": T0 - 2000 * MS, "seed": 1, "plan": {},
         "scenario": {"name": "hand-made", "path": "hand.toml", "vms": 2}},
        {"ev": "workload_start", "t_ns": T0, "t0_ns": T0},
        {"ev": "move_req", "t_ns": T0 + 999 * MS, "id": 1, "vm": "vm1", "src_known": "h1", "dst": "h2"},
        {"ev": "move_ack", "t_ns": T0 + 1002 * MS, "id": 1, "vm": "vm1", "rec": rec, "late": False},
        {"ev": "heal_all", "t_ns": T0 + 3000 * MS},
        {"ev": "settled", "t_ns": T0 + 3500 * MS, "ok": True, "elapsed_s": 0.5, "why": ""},
        {"ev": "applies", "t_ns": T0 + 3600 * MS, "life": 0, "since": 0, "start": 0, "next": len(applies),
         "lost": 0, "rows": applies},
        {"ev": "controller_moves", "t_ns": T0 + 3600 * MS, "life": 0, "final": True, "moves": [rec]},
        {"ev": "final_inventory", "t_ns": T0 + 3700 * MS, "status": {},
         "vms": [_vm("vm1", MAC1, "h2", 1), _vm("vm2", MAC2, "h2", 0)],
         "expected": {"entries": [[100, m, h, s, False] for m, (h, s) in final.items()], "live_hosts": ["h1", "h2"]}},
        {**_table("h1", final), "t_ns": T0 + 3800 * MS},
        {**_table("h2", final), "t_ns": T0 + 3800 * MS},
        {"ev": "final_procs", "t_ns": T0 + 3900 * MS, "procs": {
            "h1": {"pid": 11, "alive": True, "should_be_up": True, "answers": True},
            "h2": {"pid": 12, "alive": True, "should_be_up": True, "answers": True},
            "controller": {"pid": 10, "alive": True, "should_be_up": True}}},
        {"ev": "run_end", "t_ns": T0 + 4000 * MS, "wall_s": 6.0},
    ]
    return ev


def judge(tmp_path: Path, events: list[dict], extra: str = "") -> dict:
    p = tmp_path / "history.jsonl"
    p.write_text("".join(json.dumps(e) + "\n" for e in events) + extra)
    return check_history(p)


def find(events, kind, **match):
    return next(e for e in events if e["ev"] == kind and all(e.get(k) == v for k, v in match.items()))


def test_a_good_history_is_valid_and_draws_a_timeline(tmp_path):
    s = judge(tmp_path, good_history())
    assert s["verdict"] == "valid" and s["exit_code"] == 0, s
    assert (tmp_path / "summary.json").exists() and (tmp_path / "timeline.png").stat().st_size > 1000
    assert s["stats"]["moves_converged"] == 1 and s["stats"]["latency_ms_p50"] == 1.5


def test_a_table_that_differs_from_the_inventory_fails_tables_match_inventory(tmp_path):
    ev = good_history()
    h1 = find(ev, "final_table", host="h1")
    h1["entries"].append({"vlan": 100, "mac": "02:00:00:00:00:09", "host": "h1", "port": "vEth9", "seq": 0,
                          "tombstone": False, "local": True})
    s = judge(tmp_path, ev)
    assert s["verdict"] == "invalid" and s["failed"] == ["tables-match-inventory"], s["failed"]
    assert "h1: 1 entries differ" in s["invariants"]["tables-match-inventory"]["violations"][0]["what"]


def test_an_acknowledged_move_that_is_undone_fails_moves_resolved(tmp_path):
    ev = good_history()
    ack = find(ev, "move_ack", id=1)
    ack["rec"] = ack["rec"] | {"seq": 2}  # acknowledged seq 2 converged, but everything ended at seq 1
    s = judge(tmp_path, ev)
    assert s["failed"] == ["moves-resolved"], s["failed"]
    v = s["invariants"]["moves-resolved"]["violations"][0]
    assert "acknowledged converged but later undone" in v["what"]
    assert any("move #1 requested: vm1 h1 -> h2" in line for line in v["around"]), v["around"]


def test_a_move_without_reply_from_a_live_controller_fails_but_not_when_it_was_killed(tmp_path):
    ev = good_history()
    ev.insert(3, {"ev": "move_req", "t_ns": T0 + 1500 * MS, "id": 2, "vm": "vm2", "src_known": "h2", "dst": "h1"})
    ev.insert(5, {"ev": "move_noreply", "t_ns": T0 + 2900 * MS, "id": 2, "vm": "vm2", "waited_s": 1.4,
                  "reason": "timed out"})
    s = judge(tmp_path, ev)
    assert s["failed"] == ["moves-resolved"] and "controller was up all along" in \
        s["invariants"]["moves-resolved"]["violations"][0]["what"]
    ev.insert(4, {"ev": "proc", "t_ns": T0 + 1600 * MS, "action": "kill", "name": "controller", "pid": 10})
    ev.insert(5, {"ev": "proc", "t_ns": T0 + 2000 * MS, "action": "restart", "name": "controller", "pid": 13,
                  "spawn_ns": T0 + 1900 * MS})
    assert judge(tmp_path, ev)["verdict"] == "valid"


def test_a_vm_active_on_two_hosts_fails_single_owner(tmp_path):
    ev = good_history()
    find(ev, "final_table", host="h1")["ports"].append(
        {"port": "vEth2", "vm": "vm2", "vlan": 100, "mac": MAC2, "state": "active"})
    s = judge(tmp_path, ev)
    assert s["failed"] == ["single-owner"], s["failed"]
    assert "vm2 is active on 2 hosts: h1, h2" in s["invariants"]["single-owner"]["violations"][0]["what"]


def test_an_agent_going_back_to_a_lower_seq_fails_monotonic_applies_unless_it_restarted(tmp_path):
    ev = good_history()
    rows = find(ev, "applies")["rows"]
    rows.append([T0 + 2000 * MS, "h1", 100, MAC1, "h1", 0, False])
    rows.append([T0 + 2001 * MS, "h1", 100, MAC1, "h2", 1, False])  # and forward again: still a violation
    ev.insert(4, {"ev": "fault", "t_ns": T0 + 1900 * MS, "phase": "inject", "label": "loss 0.3"})
    s = judge(tmp_path, ev)
    assert s["failed"] == ["monotonic-applies"], s["failed"]
    v = s["invariants"]["monotonic-applies"]["violations"][0]
    assert v["what"].startswith("h1 went back for vm1: applied (seq 0, h1)") and v["reporter"] == "h1"
    assert any("fault inject: loss 0.3" in line for line in v["around"]), v["around"]
    # The same applies from a new incarnation of h1 (it restarted in between) are fine.
    ev.insert(5, {"ev": "proc", "t_ns": T0 + 1990 * MS, "action": "restart", "name": "h1", "pid": 14,
                  "spawn_ns": T0 + 1950 * MS})
    assert judge(tmp_path, ev)["verdict"] == "valid"


def test_a_process_that_died_by_itself_fails_processes_up(tmp_path):
    ev = good_history()
    ev.insert(4, {"ev": "proc_died", "t_ns": T0 + 2000 * MS, "name": "h2", "pid": 12, "unexpected": True})
    s = judge(tmp_path, ev)
    assert s["failed"] == ["processes-up"], s["failed"]
    assert "h2 (pid 12) died" in s["invariants"]["processes-up"]["violations"][0]["what"]


def test_an_incomplete_or_broken_history_is_unknown(tmp_path):
    ev = good_history()
    s = judge(tmp_path, ev[:-1], extra='{"ev": "move_req", "t_')  # no run_end, torn last line
    assert s["verdict"] == "unknown" and s["exit_code"] == 2, s
    assert any("torn" in p for p in s["problems"]) and any("run_end" in p for p in s["problems"])
    ev = good_history()
    ev.insert(-1, {"ev": "run_error", "t_ns": T0 + 3950 * MS, "error": "ClusterError: boom"})
    assert judge(tmp_path, ev)["verdict"] == "unknown"
    assert check_history(tmp_path / "nowhere")["verdict"] == "unknown"


def test_check_only_rejudges_a_report_dir(tmp_path):
    ev = good_history()
    find(ev, "final_procs")["procs"]["h2"]["alive"] = False
    judge(tmp_path, ev)
    proc = subprocess.run([sys.executable, "-m", "testbed.chaos", "--check-only", str(tmp_path)],
                          capture_output=True, text=True, cwd=REPO, timeout=60)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "processes-up" in proc.stdout and "INVALID" in proc.stdout
    # (and its VMs are on a host that is not live: single-owner fails too)
    assert json.loads((tmp_path / "summary.json").read_text())["failed"] == ["single-owner", "processes-up"]


# ---------------------------------------------------------------------- real runs

SHORT = """
name = "{name}"
[cluster]
hosts = 4
vms = {vms}
{agent}
{controller}
[workload]
duration_s = {duration}
move_rate_per_s = {rate}
{storms}
{faults}
[end]
settle_s = {settle}
"""


def run_chaos(tmp_path: Path, name: str, *, vms=12, agent="", controller="", duration=4, rate=4.0, storms="",
              faults="", settle=15) -> tuple[subprocess.CompletedProcess, dict, list[dict]]:
    p = write(tmp_path, SHORT.format(name=name, vms=vms, agent=agent, controller=controller, duration=duration,
                                     rate=rate, storms=storms, faults=faults, settle=settle), f"{name}.toml")
    report = tmp_path / f"report-{name}"
    proc = subprocess.run([sys.executable, "-m", "testbed.chaos", str(p), "--seed", "1", "--report", str(report)],
                          capture_output=True, text=True, cwd=REPO, timeout=150)
    summary = json.loads((report / "summary.json").read_text())
    events = [json.loads(line) for line in (report / "history.jsonl").read_text().splitlines()]
    pids = [e["pid"] for e in events if e["ev"] == "proc" and e.get("action") == "restart"]
    up = next(e for e in events if e["ev"] == "cluster_up")
    pids += [up["controller"]["pid"], *up["agents"].values()]
    left = [pid for pid in pids if psutil.pid_exists(pid) and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE]
    assert not left, f"processes left running: {left}"
    return proc, summary, events


@pytest.mark.cluster
def test_a_short_run_with_a_crash_and_a_partition_is_valid(tmp_path):
    faults = """
[[faults]]
at_s = 0.8
kind = "partition"
named = "isolate"
host = "h2"
for_s = 1.2
[[faults]]
at_s = 2.5
kind = "kill"
target = "h3"
for_s = 1.0
"""
    proc, s, events = run_chaos(tmp_path, "short-valid", storms="storms = [{ at_s = 1.0, count = 6 }]",
                                faults=faults)
    assert proc.returncode == 0 and s["verdict"] == "valid", proc.stdout + proc.stderr
    assert "VALID" in proc.stdout
    kinds = {e["ev"] for e in events}
    assert {"move_req", "move_ack", "fault", "proc", "heal_all", "settled", "applies", "final_table",
            "final_inventory", "final_procs", "run_end"} <= kinds
    assert [e["action"] for e in events if e["ev"] == "proc"] == ["kill", "restart"]
    assert s["stats"]["moves_requested"] >= 10 and s["stats"]["applies_checked"] > 0
    assert (tmp_path / "report-short-valid" / "timeline.png").exists()
    # The report's replay_sim: the same scenario, schedule and seed in the simulator, VALID too.
    assert s["replay_sim"] == f"dvs sim --faults {tmp_path / 'short-valid.toml'} --seed 1"
    rep = replay_sim(tmp_path / "report-short-valid")
    assert rep["reproduced"] and rep["sim"]["verdict"] == "valid", rep


@pytest.mark.cluster
def test_the_checker_catches_agents_that_merge_backwards(tmp_path):
    # A restarted agent gets its VMs back with seq 1, then a peer's snapshot with seq 0: a correct
    # agent ignores the older entries, the defective one takes them (and can never agree again).
    faults = """
[[faults]]
at_s = 0.5
kind = "kill"
target = "h2"
for_s = 0.5
"""
    proc, s, _ = run_chaos(tmp_path, "reverse-merge", agent="[agent]\ndefect_reverse_merge = true", rate=0,
                           duration=2, faults=faults, settle=3)
    assert proc.returncode == 1 and s["verdict"] == "invalid", proc.stdout + proc.stderr
    assert "monotonic-applies" in s["failed"], s["failed"]
    v = s["invariants"]["monotonic-applies"]["violations"][0]
    assert v["reporter"] == "h2" and "went back" in v["what"]
    assert any("restart h2" in line for line in v["around"]), v["around"]
    # Found on real processes, reproduced in the simulator by the report's replay_sim.
    rep = replay_sim(tmp_path / "report-reverse-merge")
    assert rep["reproduced"] and rep["sim"]["verdict"] == "invalid", rep
    assert "monotonic-applies" in rep["sim"]["failed"] and "monotonic-applies" in rep["failed_in_both"], rep


def replay_sim(report: Path) -> dict:
    proc = subprocess.run([sys.executable, "-m", "testbed.chaos", "--replay-sim", str(report), "--json"],
                          capture_output=True, text=True, cwd=REPO, timeout=120)
    assert proc.returncode in (0, 1), proc.stderr
    rep = json.loads(proc.stdout)
    assert proc.returncode == (0 if rep["reproduced"] else 1)
    assert (report / "replay-sim" / "history.jsonl").exists()
    return rep


@pytest.mark.cluster
def test_the_checker_catches_agents_that_do_not_repair_lost_updates(tmp_path):
    faults = """
[[faults]]
at_s = 0.3
kind = "loss"
p = 0.3
types = ["UPDATES"]
for_s = 2.5
"""
    proc, s, _ = run_chaos(tmp_path, "no-repair", agent="[agent]\ndefect_no_repair = true",
                           controller="[controller]\nop_timeout_ms = 2000", rate=8, duration=3, faults=faults,
                           settle=3)
    assert proc.returncode == 1 and s["verdict"] == "invalid", proc.stdout + proc.stderr
    assert "tables-match-inventory" in s["failed"], s["failed"]
    assert "differ from the inventory" in s["invariants"]["tables-match-inventory"]["violations"][0]["what"]


@pytest.mark.cluster
def test_a_shipped_scenario_runs_both_ways_and_the_one_checker_finds_both_valid(tmp_path):
    # The cheapest shipped scenario on real processes (4 hosts, 6 s: a kill for good and a
    # controller pause); every shipped scenario runs in the simulator in tests/test_faultlang.py.
    report = tmp_path / "report"
    proc = subprocess.run([sys.executable, "-m", "testbed.chaos", str(REPO / "scenarios" / "ha-after-controller-pause.toml"),
                           "--seed", "1", "--report", str(report)], capture_output=True, text=True, cwd=REPO,
                          timeout=150)
    s = json.loads((report / "summary.json").read_text())
    assert proc.returncode == 0 and s["verdict"] == "valid", proc.stdout + proc.stderr
    assert "replay in the simulator: dvs sim --faults" in proc.stdout
    rep = replay_sim(report)
    assert rep["reproduced"] and rep["exactly"] and rep["sim"]["verdict"] == "valid", rep
