"""The deterministic simulator (testbed/sim): the real cores on a virtual clock and a seeded network.

Liveness bound asserted here (testbed.sim.engine.liveness_bound_ms): once the faults stop,
every running agent's table equals the controller's inventory within
    max((digest_mismatch_rounds + 2) * G + pull_timeout_ms + 2 * S + 100,
        dead_after_ms + 2 * tick_interval_ms + 100)
    + peers_refresh_ms + S + tick_interval_ms               virtual ms,
G being the gossip heartbeat interval and S the agent's timer/status interval
(heartbeat_interval_ms); with the default configs at <= 32 hosts that is 6,450 ms.
"""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
from click.testing import CliRunner
from hypothesis import HealthCheck, given, note, settings
from hypothesis import strategies as st

from agent.config import AgentConfig
from agent.mactable import MergeResult
from testbed.client import ClusterError
from testbed.sim.command import sim
from testbed.sim.engine import MonitoredTable, NetConfig, SimConfig, Simulator, run_sim
from testbed.sim.spec import Crash, Partition, SpecError, parse_crashes, parse_partitions


def check_run(r: dict, *, all_moves: bool = True) -> None:
    """Safety always; liveness after the faults stop, within the bound; every assertion names
    the command that replays the run."""
    replay = f"replay with: {r['replay']}"
    ch = r["checks"]
    assert ch["safety_violations"] == 0, f"safety monitor tripped: {ch['safety_examples']}; {replay}"
    assert ch["handler_errors"] == {"agents": 0, "controller": 0}, f"core errors {ch['last_errors']}; {replay}"
    assert r["error"] is None, f"{r['error']}; {replay}"
    ag = r["agreement"]
    assert ag["reached"], f"no full agreement {ch['mismatch_examples']}; {replay}"
    assert ag["within_bound"], f"agreement {ag['after_faults_ms']} ms after the faults, bound {ag['bound_ms']}; {replay}"
    assert ch["tables_agree"], f"tables differ: {ch['mismatch_examples']}; {replay}"
    if all_moves:
        assert r["moves"]["converged"] == r["config"]["moves"], f"failed moves {r['moves']['failed']}; {replay}"


FAULTY = SimConfig(hosts=8, vms=40, moves=15, seed=5, net=NetConfig(loss=0.3, dup=0.2, reorder=True))


def test_same_seed_gives_the_same_run_and_another_seed_another():
    a, b = run_sim(FAULTY), run_sim(FAULTY)
    assert a == b
    assert json.dumps(a) == json.dumps(b)
    c = run_sim(replace(FAULTY, seed=6))
    assert c["traffic"] != a["traffic"]


def test_clean_run_converges_fast_with_few_messages():
    r = run_sim(SimConfig(hosts=6, vms=30, moves=10, seed=1))
    check_run(r)
    assert r["ok"]
    assert r["traffic"]["lost"] == 0
    # Two hops (switchover, then gossip) of 100 µs + jitter: well under a millisecond.
    assert r["moves"]["latency_ms_max"] < 2
    assert r["create"]["converged"] == 30


def test_loss_dup_and_reorder_still_converge():
    r = run_sim(FAULTY)
    check_run(r)
    t = r["traffic"]
    assert t["lost"] > 0 and t["duplicated"] > 0
    assert r["ok"]


def test_heavy_loss_on_a_bigger_mesh():
    r = run_sim(SimConfig(hosts=24, vms=96, moves=8, seed=3, net=NetConfig(loss=0.5)))
    check_run(r)


def test_partition_of_the_agent_mesh_that_heals():
    parts = parse_partitions(["50-1500:h1-h3/h4-h6"], 8)
    r = run_sim(SimConfig(hosts=8, vms=40, moves=12, seed=2, partitions=parts, net=NetConfig(loss=0.1)))
    check_run(r)
    assert r["traffic"]["cut_by_partition"] > 0


def test_partition_that_cuts_agents_from_the_controller_heals():
    parts = parse_partitions(["0-2000:h1-h4,ctl/h5-h8"], 8)
    r = run_sim(SimConfig(hosts=8, vms=32, moves=10, seed=4, partitions=parts))
    # Moves in flight while h5..h8 were cut from the controller time out: their APPLIED reports
    # were lost with the control connection (see the report). The tables must agree anyway.
    check_run(r, all_moves=False)


def test_membership_lost_during_a_control_partition_comes_again():
    # h1 restarts 1 ms into the window while h2 is cut from the controller for 2 ms: h2 misses
    # the PEERS with h1's new endpoints. Until the controller resent the membership
    # (peers_refresh_ms), h2 kept listening to the dead incarnation and never got h1's HA
    # restart of vm1 (seq 1): found by this simulator.
    r = run_sim(SimConfig(hosts=2, vms=1, moves=0, seed=0, partitions=parse_partitions(["0-2:h2/h1,ctl"], 2),
                          crashes=parse_crashes(["h1@0-1"], 2)))
    check_run(r)


def test_agent_crash_and_restart_rebuilds_its_table():
    crashes = parse_crashes(["h3@100-1500"], 6)
    s = Simulator(SimConfig(hosts=6, vms=30, moves=10, seed=8, crashes=crashes, net=NetConfig(loss=0.1)))
    r = s.run()
    check_run(r, all_moves=False)
    h3 = s.current[2]
    assert h3 is not None and h3.core.incarnation == 2
    assert h3.core.table.as_placement() == s.controller.inv.expected_table()
    assert r["faults"]["crashes"] == [{"host": "h3", "incarnation": 1, "at_ms": pytest.approx(r["faults"]["start_ms"]
                                                                                            + 100, abs=0.01)}]


def test_agent_that_stays_down_is_declared_dead_and_the_rest_agree():
    r = run_sim(SimConfig(hosts=5, vms=20, moves=6, seed=9, crashes=parse_crashes(["h2@10"], 5)))
    check_run(r, all_moves=False)
    assert r["checks"]["hosts_checked"] == 4


def test_controller_crash_mid_moves_recovers_from_its_journal():
    # The controller dies with moves in flight and comes back 2 s later from its journal: the
    # agents re-register and report their tables; every interrupted move ended done or rolled
    # back (each VM active on exactly one host, the one the inventory names); the rest converge.
    cfg = SimConfig(hosts=8, vms=32, moves=40, seed=4, crashes=parse_crashes(["ctl@50-2000"], 8),
                    net=NetConfig(loss=0.1))
    s = Simulator(cfg)
    r = s.run()
    check_run(r, all_moves=False)
    assert r["ok"], r["moves"]["failed"]
    assert r["moves"]["interrupted"] >= 1
    assert r["moves"]["converged"] + r["moves"]["interrupted"] == 40
    assert r["checks"]["vms_not_on_exactly_one_host"] == 0
    assert r["faults"]["crashes"][0]["host"] == "ctl"
    assert "ctl@50-2000" in r["replay"]
    # The new controller's inventory came from the journal and the agents: every VM is there.
    assert len(s.controller.inv.vms) == 32


def test_final_checks_catch_a_vm_active_on_two_hosts():
    s = Simulator(SimConfig(hosts=3, vms=3, moves=0, seed=1))
    assert s.run()["checks"]["vms_not_on_exactly_one_host"] == 0
    vm = s.controller.inv.vms["vm1"]
    other = next(a for a in s.current if a.host != vm.host)
    other.core.switch.activate(vm.port, vm.name, vm.vlan, vm.mac)
    checks = s.final_checks()
    assert not checks["ok"] and checks["vms_not_on_exactly_one_host"] == 1
    assert sorted(checks["vm_examples"][0]["active_on"]) == sorted([vm.host, other.host])


def _apply_anything(table, key, new):
    """A broken merge: the incoming entry always wins."""
    old = table.get(key)
    table._entries[key] = new
    return MergeResult(True, old)


class BrokenTable(MonitoredTable):
    base_merge = _apply_anything


def test_safety_monitor_trips_when_an_older_entry_replaces_a_newer_one():
    s = Simulator(SimConfig(hosts=4, vms=8, moves=6, seed=1, net=NetConfig(dup=0.5, reorder=True)))
    s.table_class = BrokenTable
    r = s.run()
    assert r["checks"]["safety_violations"] > 0
    ex = r["checks"]["safety_examples"][0]
    assert (ex["applied"][1], ex["applied"][0]) <= (ex["held"][1], ex["held"][0])
    assert not r["ok"]


def test_safety_monitor_is_quiet_on_the_real_merge_rule_under_duplicates_and_reordering():
    r = run_sim(SimConfig(hosts=4, vms=8, moves=6, seed=1, net=NetConfig(dup=0.5, reorder=True)))
    check_run(r)


def test_liveness_check_catches_an_agent_that_never_repairs():
    broken = AgentConfig(defect_no_repair=True)
    r = run_sim(SimConfig(hosts=6, vms=24, moves=6, seed=2, net=NetConfig(loss=0.3), agent_config=broken,
                          settle_ms=5_000))
    assert not r["agreement"]["reached"]
    assert not r["ok"]


def test_move_rate_runs_moves_concurrently():
    r = run_sim(SimConfig(hosts=8, vms=64, moves=40, seed=3, move_rate=2_000.0, net=NetConfig(loss=0.2),
                          gossip_interval_ms=100))
    check_run(r)
    assert r["config"]["gossip_interval_ms"] == 100


def test_fault_window_length_is_honoured():
    r = run_sim(SimConfig(hosts=4, vms=8, moves=3, seed=1, fault_ms=5_000, net=NetConfig(loss=0.2)))
    check_run(r)
    assert r["faults"]["stop_ms"] == pytest.approx(r["faults"]["start_ms"] + 5_000, abs=0.01)


# ---------------------------------------------------------------------- fault specs


def test_partition_spec_parses_ranges_groups_and_the_controller():
    [p] = parse_partitions(["1000-4000:h1-h3/h5,ctl"], 6)
    assert p == Partition(1000, 4000, (("h1", "h2", "h3"), ("h5", "ctl")))
    assert p.spec() == "1000-4000:h1-h3/h5,ctl"
    two = parse_partitions(["3000-4000:h2;0-1000:h1"], 3)
    assert [x.start_ms for x in two] == [0, 3000]


def test_crash_spec_parses_and_sorts():
    assert parse_crashes(["h3@1000-2500,h1@5"], 4) == (Crash("h1", 5, None), Crash("h3", 1000, 2500))
    assert parse_crashes(["h1@5;ctl@5-900"], 4) == (Crash("ctl", 5, 900), Crash("h1", 5, None))


@pytest.mark.parametrize("spec, fragment", [
    ("1000:h1", "START-END"),
    ("5-1:h1", "END > START"),
    ("0-10:h9", "does not exist"),
    ("0-10:x1", "not a host name"),
    ("0-10:h1/h1", "two groups"),
    ("0-10:h3-h1", "backwards"),
    ("0-10:h1;5-20:h2", "overlap"),
])
def test_bad_partition_specs_say_why(spec, fragment):
    with pytest.raises(SpecError, match=fragment):
        parse_partitions([spec], 4)


@pytest.mark.parametrize("spec, fragment", [
    ("h1", "HOST@AT"),
    ("h1@10-5", "after the crash"),
    ("h7@10", "does not exist"),
    ("h1@10-50,h1@20", "restart before it crashes again"),
    ("h1@10,h1@20", "restart before it crashes again"),
    ("ctl@10", "controller must restart"),
    ("ctl@10-20,ctl@15-30", "restart before it crashes again"),
])
def test_bad_crash_specs_say_why(spec, fragment):
    with pytest.raises(SpecError, match=fragment):
        parse_crashes([spec], 4)


# ---------------------------------------------------------------------- the command


def test_command_json_is_byte_identical_and_exit_0_when_ok():
    args = ["--hosts", "6", "--vms", "24", "--moves", "8", "--loss", "0.2", "--dup", "0.1", "--reorder",
            "--partitions", "0-300:h1/h2", "--crashes", "h4@100-900", "--seed", "3", "--json"]
    runner = CliRunner()
    a = runner.invoke(sim, args)
    b = runner.invoke(sim, args)
    assert a.output == b.output
    r = json.loads(a.output)
    assert a.exit_code == (0 if r["ok"] else 1)
    assert r["replay"].startswith("dvs sim --hosts 6 --vms 24 --moves 8 --loss 0.2 --dup 0.1 --reorder")
    assert "wall" not in a.output


def test_command_human_output_has_the_summary_and_wall_time():
    res = CliRunner().invoke(sim, ["--hosts", "4", "--vms", "8", "--moves", "3", "--seed", "2"])
    assert res.exit_code == 0, res.output
    for text in ("moves converged", "3 / 3", "messages / move", "faults stopped at", "full agreement",
                 "passed", "wall clock", "replay: dvs sim --hosts 4 --vms 8 --moves 3 --seed 2"):
        assert text in res.output


@pytest.mark.parametrize("args, fragment", [
    (["--hosts", "4", "--partitions", "0-10:h9"], "host h9 does not exist"),
    (["--hosts", "4", "--crashes", "h1@"], "HOST@AT"),
    (["--hosts", "4", "--moves", "3"], "--moves needs VMs"),
    (["--hosts", "4", "--loss", "1.5"], "not a probability"),
    (["--hosts", "4", "--vms", "4", "--moves", "2", "--fault-ms", "10", "--crashes", "h1@5-50"], "--fault-ms"),
])
def test_command_errors_are_one_line(args, fragment):
    res = CliRunner().invoke(sim, args)
    assert res.exit_code == 2
    assert fragment in res.output
    assert "Traceback" not in res.output


def test_command_refuses_a_run_that_cannot_fit_in_memory():
    res = CliRunner().invoke(sim, ["--hosts", "100000"])
    assert isinstance(res.exception, ClusterError)
    assert "GiB" in str(res.exception) and "fewer hosts" in str(res.exception)


# ---------------------------------------------------------------------- property


@st.composite
def scenarios(draw, max_hosts: int = 8, max_vms: int = 24, max_moves: int = 12):
    hosts = draw(st.integers(2, max_hosts))
    names = [f"h{i}" for i in range(1, hosts + 1)]
    crashes = []
    for host in draw(st.lists(st.sampled_from(names), max_size=2, unique=True)):
        at = draw(st.integers(0, 3_000))
        down = draw(st.one_of(st.none(), st.integers(1, 5_000)))
        crashes.append(f"{host}@{at}" + ("" if down is None else f"-{at + down}"))
    if draw(st.integers(0, 3)) == 0:  # now and then the controller crashes and restarts too
        at = draw(st.integers(0, 3_000))
        crashes.append(f"ctl@{at}-{at + draw(st.integers(1, 4_000))}")
    parts = []
    if draw(st.booleans()):
        start = draw(st.integers(0, 2_000))
        # Shorter than the controller's dead_after_ms (3,000): nobody is declared dead by a
        # partition alone (a host that is comes back anyway, but its moves time out).
        end = start + draw(st.integers(1, 2_500))
        side = draw(st.lists(st.sampled_from([*names, "ctl"]), min_size=1, max_size=hosts, unique=True))
        parts.append(f"{start}-{end}:" + ",".join(side))
    return SimConfig(
        hosts=hosts,
        vms=draw(st.integers(1, max_vms)),
        moves=draw(st.integers(0, max_moves)),
        seed=draw(st.integers(0, 2**32 - 1)),
        net=NetConfig(loss=draw(st.sampled_from([0.0, 0.1, 0.3, 0.5])),
                      dup=draw(st.sampled_from([0.0, 0.1, 0.3])), reorder=draw(st.booleans())),
        partitions=parse_partitions(parts, hosts),
        crashes=parse_crashes(crashes, hosts),
        move_rate=draw(st.one_of(st.none(), st.just(50.0))),
        gossip_interval_ms=draw(st.sampled_from([None, None, 100, 1_000])),
    )


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(scenarios())
def test_property_safety_always_and_agreement_within_the_bound_after_faults(cfg):
    r = run_sim(cfg)
    note(f"seed {cfg.seed}; replay with: {r['replay']}")
    check_run(r, all_moves=False)


@pytest.mark.parametrize("tick", [0, 1 << 15])
def test_receivers_take_messages_on_their_rx_tick(monkeypatch, tick):
    from agent.core import AgentCore

    seen = []
    gossip = AgentCore.on_gossip
    monkeypatch.setattr(AgentCore, "on_gossip", lambda self, mt, body, t: (seen.append(t), gossip(self, mt, body, t)))
    r = run_sim(SimConfig(hosts=6, vms=24, moves=6, seed=4, net=NetConfig(rx_tick_ns=tick)))
    assert r["ok"] and r["config"]["rx_tick_ns"] == tick and len(seen) > 100
    on_grid = sum(1 for t in seen if t % (1 << 15) == 0)
    assert on_grid == len(seen) if tick else on_grid < len(seen) // 10


def test_rx_tick_must_be_a_power_of_two():
    with pytest.raises(ValueError, match="power of two"):
        Simulator(SimConfig(hosts=2, vms=0, moves=0, net=NetConfig(rx_tick_ns=30_000)))
