"""The simulator applies a timed network fault where the real agents would (agent/faults.py):
on what its hosts receive, from its `from` peers, of its `types`; whole-cluster rules, and runs
without narrowed rules, stay the network model's own (byte-identical output)."""

from __future__ import annotations

import json
from dataclasses import replace

from agent import wire
from agent.wire import MsgType
from testbed import schedule
from testbed.schedule import TimedFault
from testbed.sim.config import NetConfig, SimConfig
from testbed.sim.engine import Simulator

SCENARIO = """
name = "narrowed"
[cluster]
hosts = 6
vms = 24
[workload]
duration_s = 6
move_rate_per_s = 4
[[faults]]
at_s = 0.5
kind = "{kind}"
{params}
for_s = 4.0
[end]
settle_s = 20
"""


def _run(tmp_path, kind: str, params: str, seed: int = 1):
    p = tmp_path / f"{kind}.toml"
    p.write_text(SCENARIO.format(kind=kind, params=params))
    sim = Simulator(SimConfig(hosts=6, vms=0, moves=0, seed=seed, faults=str(p)))
    return sim, sim.run()


def _stats(sim, host: str) -> dict:
    return sim.current[sim.hidx[host]].core.status(sim.now)["stats"]


def test_a_loss_on_one_host_loses_only_what_that_host_receives_and_its_types_filter_spares_the_rest(tmp_path):
    # Every UPDATES frame h2 receives is lost for 4 s; its heartbeats and the controller's repair
    # hints still arrive, so h2 stays a member and repairs; nobody else loses anything.
    sim, r = _run(tmp_path, "loss", 'p = 1.0\nhosts = ["h2"]\ntypes = ["UPDATES"]')
    rx = r["faults"]["receivers"]
    assert list(rx) == ["h2"] and rx["h2"]["dropped"] > 0
    assert rx["h2"]["hits"] == {"faults[0]": rx["h2"]["dropped"]}
    assert r["traffic"]["lost"] == rx["h2"]["dropped"]  # no whole-cluster loss: nothing else was lost
    assert _stats(sim, "h2")["repaired_updates"] > 0
    assert all(_stats(sim, h)["repaired_updates"] == 0 for h in sim.hosts if h != "h2")
    c = r["chaos"]
    # (a scenario run is judged by the one checker; `ok` counts the plan's skipped moves as missing)
    assert c["verdict"] == "valid", (c["failed"], c["undecided"], c["problems"])


def test_from_and_types_pick_the_frames_a_rule_acts_on(tmp_path):
    cfg = SimConfig(hosts=4, vms=0, moves=0, seed=1)
    sim = Simulator(cfg)
    sim.apply_fault(TimedFault(0, "loss", ("h3",), {"p": 1.0, "from": ["h1"], "types": ["UPDATES"]}, 0))
    sim.start_agent(0)
    sim.start_agent(1)
    h1, h2 = sim.current[0], sim.current[1]
    upd = wire.encode(MsgType.UPDATES, ["h1", 1, []])
    hb = wire.encode(MsgType.HEARTBEAT, ["h1", 1, 0, 0])
    assert set(sim._rx_receivers(h1, upd)) == {2}  # h3, for an UPDATES from h1
    assert sim._rx_receivers(h1, hb) == {}  # another type: spared
    assert sim._rx_receivers(h2, upd) == {}  # from another peer: spared
    # A heal takes every narrowed rule away, as `{"reset": true}` does on an agent.
    sim.apply_fault(TimedFault(0, "heal", (), {}, 1, 0))
    assert sim.rx_faults == {} and sim._rx_receivers(h1, upd) == {}


def test_a_rule_that_changes_nothing_leaves_the_run_as_it_was(tmp_path):
    # A 0 ms delay on h2 sends every frame h2 receives (gossip, repair, the controller's trains)
    # through the receive-side path and changes no arrival: the run must be the same run, so that
    # path draws the network's randomness exactly as the plain one does.
    sim, narrowed = _run(tmp_path, "delay", 'ms = 0\nhosts = ["h2"]')
    assert narrowed["faults"].pop("receivers")["h2"]["hits"]["faults[0]"] > 0
    plain_sim = Simulator(SimConfig(hosts=6, vms=0, moves=0, seed=1, faults=str(tmp_path / "delay.toml")))
    # The same scenario with its rule taken out before the run: no receive-side rule ever.
    plain_sim.schedule = tuple(f for f in plain_sim.schedule if f.kind == "heal")
    plain_sim.client.schedule = plain_sim.schedule
    plain = plain_sim.run()
    for r in (narrowed, plain):
        r.pop("chaos")
    assert "receivers" not in plain["faults"]
    assert narrowed.pop("events") == plain.pop("events") + 1  # (the rule's own action)
    assert json.dumps(narrowed, sort_keys=True) == json.dumps(plain, sort_keys=True)


def test_a_rule_on_every_host_without_filters_is_the_whole_cluster_rule(tmp_path):
    every = ", ".join(f'"h{i}"' for i in range(1, 7))
    _, listed = _run(tmp_path, "loss", f"p = 0.3\nhosts = [{every}]")
    (tmp_path / "loss.toml").rename(tmp_path / "listed.toml")
    _, whole = _run(tmp_path, "loss", "p = 0.3")
    assert "receivers" not in listed["faults"] and listed["traffic"] == whole["traffic"]
    assert listed["agreement"] == whole["agreement"] and listed["checks"] == whole["checks"]
    assert listed["chaos"]["verdict"] == whole["chaos"]["verdict"] == "valid"


def test_a_delay_of_the_controllers_commands_to_one_host_delays_only_those(tmp_path):
    sim, r = _run(tmp_path, "delay", 'ms = 20\njitter_ms = 10\nhosts = ["h3"]\nfrom = ["controller"]')
    rx = r["faults"]["receivers"]
    assert list(rx) == ["h3"] and rx["h3"]["delayed"] > 0 and rx["h3"]["dropped"] == 0
    assert rx["h3"]["delayed"] == rx["h3"]["hits"]["faults[0]"]
    assert r["chaos"]["verdict"] == "valid", r["chaos"]["failed"]


def test_loss_dup_and_reorder_flags_are_whole_window_rules_of_the_one_schedule():
    hosts = ["h1", "h2", "h3", "h4"]
    net = replace(NetConfig(), loss=0.2, dup=0.1, reorder=True, reorder_prob=0.3)
    s = schedule.from_sim_flags((), (), net, hosts)
    assert [(f.at_ms, f.kind, f.targets, f.params["p"], f.label) for f in s] == [
        (0, "loss", (), 0.2, "--loss 0.2"), (0, "dup", (), 0.1, "--dup 0.1"), (0, "reorder", (), 0.3, "--reorder")]
    assert all(f.params["from"] == hosts and f.params["window"] for f in s)  # agent to agent only...
    assert "from" not in schedule.from_sim_flags((), (), replace(net, ctl_faults=True), hosts)[0].params  # ...or all
    sim = Simulator(SimConfig(hosts=4, vms=16, moves=8, seed=1, net=net), history=True)
    r = sim.run()
    # The network model's own rules (no receiver path), and the history's schedule holds them.
    assert "receivers" not in r["faults"] and r["traffic"]["lost"] > 0
    start = next(x for x in sim.history.records if x["ev"] == "run_start")
    assert [f["kind"] for f in start["schedule"]] == ["loss", "dup", "reorder"]
    assert r["chaos"]["verdict"] == "valid", r["chaos"]["failed"]
