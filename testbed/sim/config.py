"""The simulator's configuration, its replay command, and the bounds derived from it.

`SimConfig` and `NetConfig` are the one description of a run. Every field a command line can
set names its `dvs sim` option in its metadata (`_option`); `replay_command` prints the fields
that differ from their defaults in the order `dvs sim --help` lists the options, and
`config_from_params` builds the config back from the parsed options, so the two cannot drift
apart (tests/test_sim_config.py parses replay commands of random configs back to equal configs).
"""

from __future__ import annotations

from dataclasses import MISSING, dataclass, field, fields, replace

import click

from agent.config import AgentConfig
from controller.config import ControllerConfig
from testbed.sim.spec import Crash, Partition, parse_crashes, parse_partitions

MOVES_PER_HOSTS = 20  # default concurrency: one move in flight per this many hosts


def _option(flag: str, *, always: bool = False, sep: str = "", parse=None) -> dict:
    """Field metadata: the `dvs sim` option that sets the field. `always`: printed in the replay
    command even at its default; `sep` and `parse(specs, n_hosts)`: a repeatable spec option."""
    return {"option": flag, "always": always, "sep": sep, "parse": parse}


@dataclass(frozen=True)
class NetConfig:
    """The simulated network. Units are in the names; defaults in the field values."""

    # One-way latency floor, µs.
    base_latency_us: int = field(default=100, metadata=_option("--latency-us"))
    # Mean of the exponential jitter added to it, µs.
    jitter_mean_us: int = field(default=50, metadata=_option("--jitter-us"))
    # Probability an agent-to-agent message is lost.
    loss: float = field(default=0.0, metadata=_option("--loss"))
    # Probability an agent-to-agent message is delivered twice.
    dup: float = field(default=0.0, metadata=_option("--dup"))
    # Hold some messages back so later ones overtake them.
    reorder: bool = field(default=False, metadata=_option("--reorder"))
    # With `reorder`: probability a message is held back.
    reorder_prob: float = field(default=0.2, metadata=_option("--reorder-prob"))
    # With `reorder`: the hold-back is uniform in [0, this], µs.
    reorder_max_us: int = field(default=1_000, metadata=_option("--reorder-max-us"))
    # Also apply loss/dup/reorder to agent <-> controller messages.
    ctl_faults: bool = field(default=False, metadata=_option("--ctl-faults"))
    # Receivers take what arrived at the next multiple of this, ns, as one batch: NIC interrupt
    # coalescing (rx-usecs, typically 20-50 µs) and an event loop that drains its socket when it
    # wakes. A power of two; 0: each message at its own arrival time. Default 32,768 (~33 µs).
    rx_tick_ns: int = field(default=1 << 15, metadata=_option("--rx-tick-ns"))


@dataclass(frozen=True)
class SimConfig:
    # Agents h1..hN, VMs vm1..vmM (placed round-robin), VM moves to make.
    hosts: int = field(metadata=_option("--hosts"))
    vms: int = field(metadata=_option("--vms"))
    moves: int = field(metadata=_option("--moves"))
    # The run's seed (always in the replay command, default or not).
    seed: int = field(default=1, metadata=_option("--seed", always=True))
    net: NetConfig = field(default_factory=NetConfig, metadata={"nested": True})
    # Partitions and crashes, times in virtual ms after the fault window opens (spec.py).
    partitions: tuple[Partition, ...] = field(default=(), metadata=_option("--partitions", sep=";",
                                                                           parse=parse_partitions))
    crashes: tuple[Crash, ...] = field(default=(), metadata=_option("--crashes", sep=",", parse=parse_crashes))
    # Moves per virtual second, issued whether or not earlier ones finished; None: `concurrency`
    # moves in flight, a new one sent as each reply arrives.
    move_rate: float | None = field(default=None, metadata=_option("--move-rate"))
    # Moves in flight at once (without move_rate); None: one per MOVES_PER_HOSTS hosts, at
    # least one (a big cluster runs many vMotions at once; a small one, one at a time as `dvs demo`).
    concurrency: int | None = field(default=None, metadata=_option("--concurrency"))
    # Length of the fault window in virtual ms; None: until the last move is answered (and at
    # least until the last scheduled partition heals or crashed host restarts).
    fault_ms: int | None = field(default=None, metadata=_option("--fault-ms"))
    # Gossip heartbeat interval at full membership, ms; None: AgentConfig's own scaling.
    gossip_interval_ms: int | None = field(default=None, metadata=_option("--gossip-interval-ms"))
    # The cores' own configs, for tests (a defect switched on, say); None: their defaults. No
    # command-line option: a replay command of a config that sets them says it is not the whole run.
    agent_config: AgentConfig | None = None
    controller_config: ControllerConfig | None = None
    # How long to wait for full agreement after the faults stop, virtual ms; None: 2x the bound.
    settle_ms: int | None = field(default=None, metadata=_option("--settle-ms"))
    # Agents start at seeded times spread over [0, this), µs.
    start_spread_us: int = field(default=1_000, metadata=_option("--start-spread-us"))
    # The client's wait_ready timeout, virtual ms.
    ready_timeout_ms: int = field(default=60_000, metadata=_option("--ready-timeout-ms"))
    # "moves": `moves` random moves; "evacuate": maintenance mode for h1 (`dvs host evacuate h1`,
    # at most `concurrency` moves at once), the faults running meanwhile.
    workload: str = field(default="moves", metadata=_option("--workload"))


def _optioned(cls) -> dict[str, tuple[tuple[str, ...], object]]:
    """Option flag -> (path of field names from SimConfig, the dataclass Field), nested configs included."""
    out: dict[str, tuple[tuple[str, ...], object]] = {}
    for f in fields(cls):
        if f.metadata.get("nested"):
            inner = f.default_factory if f.default_factory is not MISSING else f.default
            for flag, (path, g) in _optioned(inner).items():
                out[flag] = ((f.name, *path), g)
        elif "option" in f.metadata:
            out[f.metadata["option"]] = ((f.name,), f)
    return out


def _unreplayable(cfg: SimConfig) -> list[str]:
    """Fields set away from their defaults that no command-line option carries."""
    out = []
    for f in fields(cfg):
        if f.metadata.get("nested") or "option" in f.metadata:
            continue
        if getattr(cfg, f.name) != f.default:
            out.append(f.name)
    return out


def _get(cfg, path: tuple[str, ...]):
    for name in path:
        cfg = getattr(cfg, name)
    return cfg


def _command():
    from testbed.sim.command import sim  # (the command imports this module)

    return sim


def replay_command(cfg: SimConfig) -> str:
    """The `dvs sim` command line that replays this run: every field with an option that is not
    at its default (and the seed), in the command's option order."""
    by_flag = _optioned(SimConfig)
    parts = ["dvs sim"]
    for p in _command().params:
        if not isinstance(p, click.Option) or p.opts[0] not in by_flag:
            continue
        path, f = by_flag[p.opts[0]]
        flag = p.opts[0]
        value = _get(cfg, path)
        if not f.metadata["always"] and f.default is not MISSING and value == f.default:
            continue
        if p.is_flag:
            parts.append(flag)
        elif p.multiple:
            parts.append(f"{flag} '" + f.metadata["sep"].join(x.spec() for x in value) + "'")
        elif isinstance(value, float):
            parts.append(f"{flag} {value!r}")
        else:
            parts.append(f"{flag} {value}")
    missing = _unreplayable(cfg)
    if missing:
        parts.append(f"# (not the whole run: {', '.join(missing)} set in code)")
    return " ".join(parts)


def config_from_params(params: dict) -> SimConfig:
    """The SimConfig of parsed `dvs sim` options (click's `ctx.params`); a spec option that does
    not parse or fit the cluster raises spec.SpecError."""
    by_flag = _optioned(SimConfig)
    hosts = params["hosts"]
    values: dict[tuple[str, ...], object] = {}
    for p in _command().params:
        if isinstance(p, click.Option) and p.opts[0] in by_flag:
            path, f = by_flag[p.opts[0]]
            parse = f.metadata["parse"]
            values[path] = params[p.name] if parse is None else parse(params[p.name], hosts)
    return _build(SimConfig, (), values)


def _build(cls, prefix: tuple[str, ...], values: dict):
    kwargs = {}
    for f in fields(cls):
        path = (*prefix, f.name)
        if f.metadata.get("nested"):
            inner = f.default_factory if f.default_factory is not MISSING else f.default
            kwargs[f.name] = _build(inner, path, values)
        elif path in values:
            kwargs[f.name] = values[path]
    return cls(**kwargs)


def concurrency_for(cfg: SimConfig) -> int:
    """Moves the client keeps in flight (see SimConfig.concurrency)."""
    return cfg.concurrency if cfg.concurrency is not None else max(1, cfg.hosts // MOVES_PER_HOSTS)


def agent_config_for(cfg: SimConfig) -> AgentConfig:
    """The AgentConfig the simulated agents run with (see SimConfig.gossip_interval_ms); they
    keep no apply times of their own (the simulator stamps every apply itself)."""
    base = replace(cfg.agent_config or AgentConfig(), no_apply_times=True)
    if cfg.gossip_interval_ms is None:
        return base
    g = cfg.gossip_interval_ms
    n = cfg.hosts
    budget = max(1, -(-1000 * n * (n - 1) // g))  # ceil: the scaled interval stays <= g
    return replace(base, heartbeat_budget_per_s=budget, heartbeat_interval_ms=min(base.heartbeat_interval_ms, g))


def gossip_interval_ms(config: AgentConfig, n_hosts: int) -> int:
    """An agent's heartbeat interval once it knows all n_hosts - 1 peers (as AgentCore computes it)."""
    scaled = 1000 * n_hosts * (n_hosts - 1) // max(1, config.heartbeat_budget_per_s)
    return max(config.heartbeat_interval_ms, scaled)


def liveness_bound_ms(config: AgentConfig, n_hosts: int, ctl: ControllerConfig | None = None) -> int:
    """After the faults stop, every running agent agrees with the controller within this many ms.

    With G the gossip interval and S the status/timer interval (heartbeat_interval_ms):
    - an update some agent lost is announced by its origin's next heartbeat (<= G), then pulled;
      a pull lost before the faults stopped is retried at the first timer tick after
      pull_timeout_ms (<= pull_timeout_ms + S);
    - an update whose origin has since restarted (its log is gone) only comes back through a
      snapshot, asked after `digest_mismatch_rounds` heartbeats in a row show the same two
      differing digests, once the other repairs have settled (<= (rounds + 1) * G);
    - a host that crashed for good is declared dead dead_after_ms after its last word (it may
      have crashed just before the faults stopped) and its VMs restart elsewhere (HA), which
      converges within a tick and a few network hops;
    - a membership (PEERS) lost on a cut control connection is sent again when the agent's next
      status shows the old epoch, at most every peers_refresh_ms (<= peers_refresh_ms + S), and
      only then can the repairs above start;
    so B = max((digest_mismatch_rounds + 2) * G + pull_timeout_ms + 2 * S + 100,
               dead_after_ms + 2 * tick_interval_ms + 100) + peers_refresh_ms + S + tick_interval_ms.
    (The controller's repair hints usually settle a lost update within repair_hint_after_ms
    and a pull; the bound does not count on them.)
    """
    ctl = ctl or ControllerConfig()
    g = gossip_interval_ms(config, n_hosts)
    s = config.heartbeat_interval_ms
    repair = (config.digest_mismatch_rounds + 2) * g + config.pull_timeout_ms + 2 * s + 100
    refresh = getattr(ctl, "peers_refresh_ms", 0)
    refresh = refresh + s + ctl.tick_interval_ms if refresh else 0
    return max(repair, ctl.dead_after_ms + 2 * ctl.tick_interval_ms + 100) + refresh
