"""One fault schedule, one history, one checker: scenarios in the simulator (issue 14 items 1-3).

The real side (a planted defect found by `dvs chaos` and reproduced by `--replay-sim`) is in
tests/test_chaos.py, next to the other real runs.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from testbed import schedule
from testbed.chaos.checker import check_history
from testbed.chaos.scenario import build_plan, load_scenario
from testbed.sim.config import SimConfig
from testbed.sim.engine import run_sim
from testbed.sim.spec import parse_crashes, parse_partitions

REPO = Path(__file__).resolve().parent.parent
SCENARIOS = sorted((REPO / "scenarios").glob("*.toml"))

REVERSE_MERGE = """
name = "reverse-merge"
[cluster]
hosts = 4
vms = 12
[agent]
defect_reverse_merge = true
[workload]
duration_s = 2
[[faults]]
at_s = 0.5
kind = "kill"
target = "h2"
for_s = 0.5
[end]
settle_s = 3
"""


def test_sim_shorthands_are_the_schedule_type_with_one_name_for_the_controller():
    parts = parse_partitions(["1000-4000:h1-h3/h4,ctl"], 6)
    crashes = parse_crashes(["h3@500-2500,ctl@1000-1800"], 6)
    s = schedule.from_sim_flags(parts, crashes)
    assert [(f.at_ms, f.kind, f.targets) for f in s] == [
        (1000, "partition", ()), (4000, "heal", ()), (500, "kill", ("h3",)), (2500, "restart", ("h3",)),
        (1000, "kill", ("controller",)), (1800, "restart", ("controller",))]
    assert s[0].params["groups"] == [["h1", "h2", "h3"], ["h4", "controller"]]
    assert schedule.from_verb("kill", ["ctl"]).targets == ("controller",)
    with pytest.raises(ValueError):
        schedule.from_verb("explode", ["h1"])


def test_named_partitions_become_groups_unless_they_are_none():
    hosts = ["h1", "h2", "h3", "h4"]
    assert schedule._groups_of(hosts, {h: (["h3", "h4"] if h in ("h1", "h2") else ["h1", "h2"]) for h in hosts}) \
        == [["h1", "h2"], ["h3", "h4"]]
    assert schedule._groups_of(hosts, {h: ["controller"] for h in hosts}) == [hosts, ["controller"]]
    # A bridge (h2 reaches both sides, h1 and h3 not each other) is no set of groups.
    assert schedule._groups_of(["h1", "h2", "h3"], {"h1": ["h3"], "h3": ["h1"]}) is None


@pytest.mark.parametrize("path", SCENARIOS, ids=lambda p: p.stem)
def test_every_shipped_scenario_runs_in_the_simulator_and_the_chaos_checker_finds_it_valid(path):
    sc = load_scenario(path)
    plan = build_plan(sc, 1)
    sched = schedule.from_plan(sc, plan)
    # The nemesis's actions and the schedule: one entry each, same times, kinds and targets.
    assert len(sched) == len(plan.actions)
    for a, f in zip(plan.actions, sched, strict=True):
        assert f.at_ms == round(a.t_s * 1000) and (f.targets == (a.target,) or a.target is None)
        if a.kind == "net":  # the real nemesis sends each agent what the plan says
            assert schedule.agent_settings(f) == a.settings
    r = run_sim(SimConfig(hosts=sc.hosts, vms=0, moves=0, seed=1, faults=str(path)))
    c = r["chaos"]
    assert c["verdict"] == "valid", (c["failed"], c["undecided"], c["problems"])
    assert c["simulated"] and c["stats"]["applies_checked"] > 0
    assert c["stats"]["moves_requested"] + c["stats"]["moves_skipped"] == len(plan.moves) or not plan.moves
    assert c["replay_sim"].startswith("dvs sim --hosts") and f"--faults {path}" in c["replay_sim"]


def test_the_same_seed_gives_the_same_simulated_history():
    path = REPO / "scenarios" / "agent-crash-mid-move.toml"
    a = run_sim(SimConfig(hosts=1, vms=0, moves=0, seed=4, faults=str(path)))
    b = run_sim(SimConfig(hosts=1, vms=0, moves=0, seed=4, faults=str(path)))
    assert json.dumps(a, sort_keys=True) == json.dumps(b, sort_keys=True)


def _dvs(*args, cwd=REPO):
    return subprocess.run([sys.executable, "-m", "testbed.cli", *args], capture_output=True, text=True, cwd=cwd,
                          timeout=120)


def test_a_planted_defect_is_invalid_in_the_simulator_and_check_only_rejudges_its_history(tmp_path):
    p = tmp_path / "reverse-merge.toml"
    p.write_text(REVERSE_MERGE)
    out = tmp_path / "sim"
    proc = _dvs("sim", "--faults", str(p), "--history", str(out), "--json")
    assert proc.returncode == 1, proc.stderr
    c = json.loads(proc.stdout)["chaos"]
    assert c["verdict"] == "invalid" and "monotonic-applies" in c["failed"]
    v = c["invariants"]["monotonic-applies"]["violations"][0]
    assert "went back" in v["what"] and any("restart h2" in line for line in v["around"]), v
    # One checker: the simulator's history is judged again by `dvs chaos --check-only`.
    again = _dvs("chaos", "--check-only", str(out), "--json")
    assert again.returncode == 1 and json.loads(again.stdout)["failed"] == c["failed"]
    assert check_history(out, write_outputs=False)["verdict"] == "invalid"


def test_bad_faults_options_are_one_line(tmp_path):
    proc = _dvs("sim", "--faults", str(tmp_path / "nope.toml"))
    assert proc.returncode == 2 and proc.stderr.strip().startswith("dvs: error:") and "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    p = tmp_path / "s.toml"
    p.write_text(REVERSE_MERGE)
    proc = _dvs("sim", "--faults", str(p), "--hosts", "9")
    assert proc.returncode == 2 and "--hosts 9 contradicts" in proc.stderr, proc.stderr
    proc = _dvs("sim")
    assert proc.returncode == 2 and "missing --hosts" in proc.stderr
    proc = _dvs("chaos", "--replay-sim", str(tmp_path / "nothing"))
    assert proc.returncode == 2 and "no such report directory" in proc.stderr


@pytest.mark.parametrize("kw", [
    {"partitions": "1000-4000:h1-h4/h5-h8", "crashes": "h3@1000-2500,ctl@4500-6000", "loss": 0.1},
    {"crashes": "h2@100", "dup": 0.1, "reorder": True},
], ids=["partition-crashes-loss", "crash-for-good-dup-reorder"])
def test_a_plain_run_with_a_history_is_judged_by_the_checker_and_otherwise_unchanged(kw):
    from dataclasses import replace

    from testbed.sim.config import NetConfig
    from testbed.sim.engine import Simulator

    cfg = SimConfig(hosts=8, vms=32, moves=40, seed=2,
                    net=replace(NetConfig(), loss=kw.get("loss", 0.0), dup=kw.get("dup", 0.0),
                                reorder=kw.get("reorder", False)),
                    partitions=parse_partitions([kw["partitions"]], 8) if "partitions" in kw else (),
                    crashes=parse_crashes([kw["crashes"]], 8))
    plain = run_sim(cfg)
    judged = Simulator(cfg, history=True).run()
    c = judged.pop("chaos")
    assert json.dumps(judged, sort_keys=True) == json.dumps(plain, sort_keys=True)
    assert plain["ok"] and c["verdict"] == "valid", (c["failed"], c["undecided"], c["problems"])
    assert c["stats"]["moves_requested"] == 40 and c["stats"]["process_actions"] >= 1


def test_the_checker_and_the_simulators_own_checks_both_catch_a_backwards_merge():
    from agent.config import AgentConfig
    from testbed.sim.engine import Simulator

    cfg = SimConfig(hosts=4, vms=12, moves=10, seed=1, crashes=parse_crashes(["h2@100-600"], 4),
                    agent_config=AgentConfig(defect_reverse_merge=True))
    r = Simulator(cfg, history=True).run()
    assert not r["ok"] and r["checks"]["safety_violations"] > 0
    assert r["chaos"]["verdict"] == "invalid" and "monotonic-applies" in r["chaos"]["failed"]
