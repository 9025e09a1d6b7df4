"""SimConfig and its replay command: derived from the config's fields, parsed back by `dvs sim`
to an equal config (no field can be added to the config and left out of the command line)."""

from __future__ import annotations

import dataclasses
import shlex

import click
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.config import AgentConfig
from testbed.sim.command import sim
from testbed.sim.config import NetConfig, SimConfig, config_from_params, replay_command
from testbed.sim.spec import parse_crashes, parse_partitions


def parse_back(command: str) -> SimConfig:
    argv = shlex.split(command)
    assert argv[:2] == ["dvs", "sim"]
    ctx = sim.make_context("sim", argv[2:])
    params = dict(ctx.params)
    params.pop("as_json"), params.pop("progress")
    return config_from_params(params)


@st.composite
def configs(draw) -> SimConfig:
    hosts = draw(st.integers(1, 40))
    names = [f"h{i}" for i in range(1, hosts + 1)]
    crashes = []
    for host in draw(st.lists(st.sampled_from([*names, "ctl"]), max_size=3, unique=True)):
        at = draw(st.integers(0, 5_000))
        down = draw(st.integers(1, 5_000)) if host == "ctl" else draw(st.one_of(st.none(), st.integers(1, 5_000)))
        crashes.append(f"{host}@{at}" + ("" if down is None else f"-{at + down}"))
    parts = []
    t = 0
    for _ in range(draw(st.integers(0, 2))):
        start = t + draw(st.integers(0, 1_000))
        t = start + draw(st.integers(1, 2_000))
        groups = draw(st.lists(st.lists(st.sampled_from([*names, "ctl"]), min_size=1, max_size=4, unique=True),
                               min_size=1, max_size=3))
        seen: set[str] = set()
        groups = [[h for h in g if not (h in seen or seen.add(h))] for g in groups]
        groups = [g for g in groups if g]
        parts.append(f"{start}-{t}:" + "/".join(",".join(g) for g in groups))
    prob = st.floats(0.0, 1.0, exclude_max=True, allow_nan=False)
    optional = lambda s: st.one_of(st.none(), s)  # noqa: E731
    return SimConfig(
        hosts=hosts,
        vms=draw(st.integers(0, 1_000_000)),
        moves=draw(st.integers(0, 1_000_000)),
        seed=draw(st.integers(-(2**63), 2**63)),
        net=NetConfig(
            base_latency_us=draw(st.integers(0, 10**9)), jitter_mean_us=draw(st.integers(0, 10**9)),
            loss=draw(prob), dup=draw(prob), reorder=draw(st.booleans()),
            reorder_prob=draw(st.floats(0.0, 1.0, allow_nan=False)), reorder_max_us=draw(st.integers(0, 10**9)),
            ctl_faults=draw(st.booleans()), rx_tick_ns=draw(st.sampled_from([0, 1, 1 << 12, 1 << 15, 1 << 20])),
        ),
        partitions=parse_partitions(parts, hosts),
        crashes=parse_crashes(crashes, hosts),
        move_rate=draw(optional(st.floats(0.001, 1e9, allow_nan=False))),
        concurrency=draw(optional(st.integers(1, 100_000))),
        fault_ms=draw(optional(st.integers(0, 10**9))),
        gossip_interval_ms=draw(optional(st.integers(1, 10**9))),
        settle_ms=draw(optional(st.integers(0, 10**9))),
        start_spread_us=draw(st.integers(0, 10**9)),
        ready_timeout_ms=draw(st.integers(1, 10**9)),
        workload=draw(st.sampled_from(["moves", "evacuate"])),
    )


@settings(max_examples=300, deadline=None)
@given(configs())
def test_the_replay_command_parses_back_to_an_equal_config(cfg):
    command = replay_command(cfg)
    assert parse_back(command) == cfg, command


def test_defaults_stay_off_the_command_line_and_the_seed_is_always_on_it():
    assert replay_command(SimConfig(hosts=4, vms=8, moves=3)) == "dvs sim --hosts 4 --vms 8 --moves 3 --seed 1"
    cfg = SimConfig(hosts=24, vms=96, moves=60, seed=3, net=NetConfig(loss=0.2, reorder=True, ctl_faults=True),
                    crashes=parse_crashes(["ctl@1500-3000,h3@500"], 24), move_rate=20.0)
    assert replay_command(cfg) == ("dvs sim --hosts 24 --vms 96 --moves 60 --loss 0.2 --reorder "
                                   "--crashes 'h3@500,ctl@1500-3000' --move-rate 20.0 --ctl-faults --seed 3")


def test_every_config_field_has_an_option_of_dvs_sim_or_says_it_has_none():
    options = {p.opts[0] for p in sim.params if isinstance(p, click.Option)}
    for cls in (SimConfig, NetConfig):
        for f in dataclasses.fields(cls):
            if f.name in ("net", "agent_config", "controller_config"):
                continue
            assert f.metadata.get("option") in options, f"{cls.__name__}.{f.name} has no dvs sim option"


def test_a_config_the_command_line_cannot_carry_says_so_in_its_replay_command():
    cfg = SimConfig(hosts=4, vms=8, moves=3, agent_config=AgentConfig(defect_no_repair=True))
    assert replay_command(cfg).endswith("--seed 1 # (not the whole run: agent_config set in code)")


@pytest.mark.parametrize("args, fragment", [
    (["--hosts", "4", "--rx-tick-ns", "30000"], "not a power of two"),
    (["--hosts", "4", "--reorder-prob", "1.5"], "--reorder-prob"),
])
def test_bad_new_options_are_one_line_usage_errors(args, fragment):
    from click.testing import CliRunner

    res = CliRunner().invoke(sim, args)
    assert res.exit_code == 2 and fragment in res.output and "Traceback" not in res.output
