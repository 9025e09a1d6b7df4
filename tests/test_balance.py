"""Maintenance mode, rebalance and placement rules on real processes, through `dvs`."""

from __future__ import annotations

import json
import os
import signal

import psutil
import pytest

from testbed.client import ClusterError
from tests.conftest import run_dvs
from tests.test_cli import assert_one_line_error


def vms_at(sd) -> dict[str, str]:
    out = run_dvs("vm", "list", "--json", state_dir=sd)
    assert out.returncode == 0, out.stderr
    return {v["vm"]: v["host"] for v in json.loads(out.stdout)}


def test_evacuate_survives_a_controller_restart_then_activate_and_rebalance(make_cluster):
    cluster = make_cluster(4)
    cluster.create_vms(16)
    sd = cluster.state_dir
    assert run_dvs("vm", "rule", "add", "--anti", "vm1,vm2,vm3", "--name", "spread", state_dir=sd).returncode == 0
    assert_one_line_error(run_dvs("vm", "rule", "add", "--anti", "vm1,vm5", state_dir=sd), "both run on h1")
    assert_one_line_error(run_dvs("vm", "rule", "add", state_dir=sd), "exactly one of --anti")
    assert_one_line_error(run_dvs("host", "evacuate", "h9", state_dir=sd), "unknown host 'h9'")

    ev = run_dvs("host", "evacuate", "h3", "--max-concurrent", "2", "--json", state_dir=sd)
    assert ev.returncode == 0, ev.stderr
    rep = json.loads(ev.stdout)
    assert len(rep["moves"]) == 4 and rep["summary"]["converged"] == 4
    assert all(m["src"] == "h3" and m["latency_ms"] is not None for m in rep["moves"])
    at = vms_at(sd)
    assert "h3" not in at.values()
    assert len({at["vm1"], at["vm2"], at["vm3"]}) == 3  # the rule held through the evacuation

    # The controller dies; the one started in its place still keeps h3 out of placement.
    pid = cluster.controller.pid
    os.kill(pid, signal.SIGKILL)
    psutil.Process(pid).wait(timeout=5)
    cluster.start_controller()
    with cluster.controller_client(timeout_ms=30_000) as ctl:
        ctl.call("wait_ready", {"hosts": 4, "timeout_ms": 20_000})
        assert ctl.call("status")["maintenance"] == ["h3"]
    for n in range(4):
        made = run_dvs("vm", "create", f"new{n}", "--json", state_dir=sd)
        assert made.returncode == 0, made.stderr
        assert json.loads(made.stdout)["dst"] != "h3"
    assert_one_line_error(run_dvs("vm", "create", "x", "--host", "h3", state_dir=sd), "in maintenance")
    rules = json.loads(run_dvs("vm", "rule", "list", "--json", state_dir=sd).stdout)
    assert [(r["rule"], r["vms"]) for r in rules] == [("spread", ["vm1", "vm2", "vm3"])]

    act = run_dvs("host", "activate", "h3", state_dir=sd)
    assert act.returncode == 0 and "back in service" in act.stdout
    # h3 is empty and the others hold 20: a plan brings the spread to 2 at most.
    dry = json.loads(run_dvs("rebalance", "--dry-run", "--json", state_dir=sd).stdout)
    assert dry["spread_before"] >= 6 and dry["spread_planned"] <= 2 and dry["moves"] == []
    assert vms_at(sd) == {**at, **{f"new{n}": vms_at(sd)[f"new{n}"] for n in range(4)}}  # nothing moved
    run = run_dvs("rebalance", "--json", state_dir=sd)
    assert run.returncode == 0, run.stderr
    rep = json.loads(run.stdout)
    assert rep["plan"] == dry["plan"] and rep["summary"]["converged"] == len(dry["plan"])
    counts = rep["vms_per_host_after"]
    assert max(counts.values()) - min(counts.values()) <= 2, counts
    at = vms_at(sd)
    assert len({at["vm1"], at["vm2"], at["vm3"]}) == 3
    chk = run_dvs("check", state_dir=sd)
    assert chk.returncode == 0, chk.stdout + chk.stderr


def test_simulated_evacuation_under_loss_a_crash_and_a_partition_empties_h1_deterministically():
    from testbed.sim.engine import NetConfig, SimConfig, run_sim
    from testbed.sim.spec import parse_crashes, parse_partitions

    def run() -> dict:
        return run_sim(SimConfig(hosts=8, vms=32, moves=0, seed=2, net=NetConfig(loss=0.1), concurrency=2,
                                 partitions=parse_partitions(["300-1500:h1-h4/h5-h8"], 8),
                                 crashes=parse_crashes(["h5@200-2500"], 8), workload="evacuate"))

    r = run()
    assert r["ok"] and r["checks"]["ok"], (r["error"], r["moves"]["failed"])
    assert r["evacuate"]["answered"] and r["evacuate"]["vms_left"] == 0
    assert r["moves"]["moves"] == r["moves"]["converged"] == 4  # h1 held vm1, vm9, vm17, vm25
    assert "--workload evacuate" in r["replay"]
    assert run() == r  # the same seed, the same run


def test_the_evacuate_scenario_plans_its_action_and_the_checker_judges_maintenance_and_rules():
    from testbed.chaos.checker import History, check_maintenance, check_rules
    from testbed.chaos.scenario import build_plan, load_scenario, parse_scenario

    sc = load_scenario("scenarios/evacuate-under-faults.toml")
    (ev,) = [a for a in build_plan(sc, 1).actions if a.kind == "evacuate"]
    assert (ev.target, ev.settings, ev.label) == ("h2", {"max_concurrent": 2}, "evacuate h2")
    with pytest.raises(ClusterError, match=r"faults\[0\].target"):
        parse_scenario({"cluster": {"hosts": 2, "vms": 2}, "workload": {"duration_s": 1},
                        "faults": [{"at_s": 0, "kind": "evacuate", "target": "h9"}]})

    def history(moves: list[dict], vms: dict[str, str], rules: list[dict], maint: list[str]) -> History:
        t = 10**9
        ev = [{"ev": "evacuate", "phase": "start", "host": "h2", "t_ns": t},
              {"ev": "controller_moves", "t_ns": 3 * t, "life": 0, "moves": moves},
              {"ev": "evacuate", "phase": "done", "host": "h2", "t_ns": 3 * t, "elapsed_ms": 1000.0, "moves": []},
              {"ev": "final_inventory", "t_ns": 4 * t, "status": {"maintenance": maint}, "rules": rules,
               "vms": [{"vm": v, "host": h, "state": "active", "vlan": 100, "mac": "02:00:00:00:00:01"}
                       for v, h in vms.items()]}]
        return History(ev, [])

    rule = [{"rule": "r", "kind": "anti", "vms": ["a", "b"]}]
    ok = history([{"op": 1, "kind": "move", "vm": "a", "dst": "h2", "started_ns": 2 * 10**9 - 1}],
                 {"a": "h1", "b": "h3"}, rule, ["h2"])
    assert check_maintenance(ok).ok and check_rules(ok).ok  # (that move began before the controller had h2)
    bad = history([{"op": 2, "kind": "restart", "vm": "a", "dst": "h2", "started_ns": 2 * 10**9 + 5}],
                  {"a": "h1", "b": "h1", "c": "h2"}, rule, [])
    m, r = check_maintenance(bad), check_rules(bad)
    assert m.ok is False and r.ok is False
    whats = " | ".join(v["what"] for v in m.violations)
    assert "op 2 (restart of a) targeted h2" in whats and "not in maintenance" in whats and "still runs c" in whats
    assert "a and b both run on h1" in r.violations[0]["what"]
