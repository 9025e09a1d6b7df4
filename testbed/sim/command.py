"""`dvs sim`: the deterministic simulator on the command line (register `sim` in testbed/cli.py)."""

from __future__ import annotations

import gc
import json
import sys
import time

import click
import psutil
from rich.console import Console
from rich.table import Table

from testbed.client import ClusterError
from testbed.sim.config import NetConfig, SimConfig, config_from_params
from testbed.sim.engine import Simulator
from testbed.sim.spec import SpecError, faults_end_ms

HELP = """Simulate a whole cluster in one process, deterministically: the real agent and
controller cores on a virtual clock and a seeded network. One seed gives exactly one run;
`--json` output of two runs with the same arguments is byte-identical.

The run: N agents start (within the first virtual ms) and register, the client waits until
the mesh is ready, creates M VMs in one batch (round-robin), then makes K moves of random
active VMs to random running hosts (--concurrency at a time, or --move-rate per virtual
second). The fault window opens with the first move and closes when the last move is
answered (or after --fault-ms); then the run waits until every running agent's MAC table
equals the controller's inventory and reports how long that took.

\b
Network (per message): latency = --latency-us + exponential jitter of mean --jitter-us;
a receiver takes what arrived on a 32.8 us rx tick as one batch (interrupt coalescing).
--loss, --dup and --reorder act on agent-to-agent messages (gossip and repair) inside the
fault window; the agent<->controller connection stays reliable and in order (--ctl-faults
makes it lossy too).

\b
--partitions START-END:GROUP/GROUP[/...]   times in virtual ms after the window opens
    1000-4000:h1-h3/h4,h5     agents {h1..h3} | {h4,h5} | the rest, healed at 4 s
    500-2500:h2               h2 cut off from the other agents
    0-2000:h1-h4,ctl          the controller sides with h1..h4: the rest lose it too
  The controller reaches every group unless one names `ctl`. Several partitions:
  separate with ';' or repeat the option (they must not overlap).
--crashes HOST@AT[-RESTART]   times in virtual ms after the window opens
    h3@1000-2500              h3 crashes at 1 s, restarts (new incarnation) at 2.5 s
    h3@1000                   h3 stays down
    ctl@1000-2500             the controller crashes at 1 s and restarts from its journal at
                              2.5 s; moves in flight then are counted as interrupted (the final
                              checks judge that each ended done or rolled back)
  several: separate with ',' or repeat the option.
An agent silent to the controller for its dead_after_ms (3,000 ms) is declared dead and its
VMs are restarted elsewhere (HA); moves in flight to or from it may fail.

Exit status 0 only when every move converged (a move a controller crash interrupted counts if
it ended done or rolled back) and the final checks passed: every running agent's table equals
the inventory, every VM is active on exactly the host it names, no agent ever replaced an entry
by a lower (seq, host), and no core raised.
"""


# Set once a run's output is out: testbed.cli.main may then end the process at once, without
# freeing the simulation object by object (over a GB of small objects at 1,000 hosts: seconds).
finished_exit_code: int | None = None


def _probability(ctx, param, value):
    if value is not None and not 0.0 <= value < 1.0:
        raise click.BadParameter(f"{value} is not a probability in [0, 1)")
    return value


@click.command("sim", help=HELP, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--hosts", type=click.IntRange(1, 100_000), required=True, help="Agents h1..hN.")
@click.option("--vms", type=click.IntRange(0, 1_000_000), default=0, show_default=True,
              help="VMs vm1..vmM, placed round-robin.")
@click.option("--moves", "n_moves", type=click.IntRange(0, 1_000_000), default=0, show_default=True,
              help="VM moves to make.")
@click.option("--loss", type=float, default=0.0, callback=_probability, show_default=True,
              help="Probability an agent-to-agent message is lost.")
@click.option("--dup", type=float, default=0.0, callback=_probability, show_default=True,
              help="Probability an agent-to-agent message is delivered twice.")
@click.option("--reorder", is_flag=True, help="Hold back some agent-to-agent messages (--reorder-prob of them, by up to --reorder-max-us).")
@click.option("--partitions", multiple=True, metavar="SPEC", help="Partitions, START-END:GROUP/GROUP (see above).")
@click.option("--crashes", multiple=True, metavar="SPEC", help="Agent crashes, HOST@AT[-RESTART] (see above).")
@click.option("--move-rate", type=click.FloatRange(min=0.001), default=None,
              help="Moves per virtual second, not waiting for earlier ones [default: --concurrency].")
@click.option("--concurrency", type=click.IntRange(1, 100_000), default=None,
              help="Moves in flight at once, the next sent as one is answered [default: one per 20 "
                   "hosts, at least 1].")
@click.option("--fault-ms", type=click.IntRange(0, 10**9), default=None,
              help="Fault window length, virtual ms [default: until the last move is answered].")
@click.option("--gossip-interval-ms", type=click.IntRange(1, 10**9), default=None,
              help="Agents' heartbeat interval at full membership, ms (raises AgentConfig."
                   "heartbeat_budget_per_s) [default: the agents' own scaling, 500 ms up to 32 hosts].")
@click.option("--latency-us", type=click.IntRange(0, 10**9), default=NetConfig.base_latency_us, show_default=True,
              help="One-way base latency, µs.")
@click.option("--jitter-us", type=click.IntRange(0, 10**9), default=NetConfig.jitter_mean_us, show_default=True,
              help="Mean of the exponential jitter, µs.")
@click.option("--ctl-faults", is_flag=True, help="Apply --loss/--dup/--reorder to agent<->controller messages too.")
@click.option("--workload", type=click.Choice(["moves", "evacuate"]), default="moves", show_default=True,
              help="moves: --moves random moves; evacuate: put h1 in maintenance and wait until the controller "
                   "moved every VM off it (--concurrency at once), the faults running meanwhile.")
@click.option("--reorder-prob", type=click.FloatRange(0.0, 1.0), default=NetConfig.reorder_prob, show_default=True,
              help="With --reorder: probability a message is held back.")
@click.option("--reorder-max-us", type=click.IntRange(0, 10**9), default=NetConfig.reorder_max_us,
              show_default=True, help="With --reorder: the hold-back is uniform in [0, this], µs.")
@click.option("--rx-tick-ns", type=click.IntRange(0, 2**40), default=NetConfig.rx_tick_ns, show_default=True,
              help="Receivers take what arrived within one tick as one batch, ns (a power of two; 0: none).")
@click.option("--settle-ms", type=click.IntRange(0, 10**9), default=None,
              help="Wait this long for full agreement after the faults stop, virtual ms [default: twice "
                   "the liveness bound].")
@click.option("--start-spread-us", type=click.IntRange(0, 10**9), default=SimConfig.start_spread_us,
              show_default=True, help="Agents start at seeded times within this much virtual time, µs.")
@click.option("--ready-timeout-ms", type=click.IntRange(1, 10**9), default=SimConfig.ready_timeout_ms,
              show_default=True, help="How long the client waits for the cluster to be ready, virtual ms.")
@click.option("--seed", type=int, default=1, show_default=True, help="The run's seed.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON (no wall-clock time in it).")
@click.option("--progress", is_flag=True, help="Print a progress line to stderr every 10 s of wall-clock time.")
def sim(as_json, progress, **params) -> None:
    hosts, vms, n_moves, workload = params["hosts"], params["vms"], params["n_moves"], params["workload"]
    try:
        cfg = config_from_params(params)
    except SpecError as e:
        raise click.UsageError(str(e)) from None
    if workload == "evacuate" and (n_moves or params["move_rate"] is not None or hosts < 2 or vms == 0):
        raise click.UsageError("--workload evacuate moves h1's VMs itself: give --vms M and --hosts N >= 2, "
                               "and no --moves or --move-rate")
    if n_moves and vms == 0:
        raise click.UsageError("--moves needs VMs to move; add --vms M (M >= 1)")
    if n_moves and hosts < 2:
        raise click.UsageError("--moves needs at least 2 hosts")
    if cfg.net.rx_tick_ns & (cfg.net.rx_tick_ns - 1):
        raise click.UsageError(f"--rx-tick-ns {cfg.net.rx_tick_ns} is not a power of two (or 0)")
    fault_ms = cfg.fault_ms
    if fault_ms is not None and fault_ms < faults_end_ms(cfg.partitions, cfg.crashes):
        raise click.UsageError(f"--fault-ms {fault_ms} ends before the last scheduled fault "
                               f"({faults_end_ms(cfg.partitions, cfg.crashes)} ms); make it longer")
    need = estimate_memory_bytes(hosts, vms)
    avail = psutil.virtual_memory().available
    if need > avail:
        raise ClusterError(f"{hosts:,} hosts and {vms:,} VMs need about {need / 2**30:.1f} GiB "
                           f"(every agent keeps state for each peer and each MAC) but "
                           f"{avail / 2**30:.1f} GiB are free; simulate fewer hosts or VMs")
    started = time.perf_counter()
    phases: list[tuple[str, float]] = []

    def on_phase(name: str, t_ns: int) -> None:
        phases.append((name, time.perf_counter() - started))
        if progress:
            click.echo(f"dvs sim: {name} at virtual {t_ns / 1e9:.3f} s, wall {phases[-1][1]:.1f} s", err=True)

    simulator = Simulator(cfg, on_phase)
    if progress:
        last = [started]

        def on_progress(s: Simulator) -> None:
            now = time.perf_counter()
            if now - last[0] >= 10:
                last[0] = now
                click.echo(f"dvs sim: virtual {s.now / 1e9:.3f} s, {s.events:,} events, "
                           f"{len(s.client.records)}/{cfg.moves} moves, wall {now - started:.0f} s", err=True)

        simulator.on_progress = on_progress
    gc_was_on = gc.isenabled()
    gc.disable()  # the engine turns it off during the run; keep it off until the output is out
    try:
        result = simulator.run()
        wall_s = time.perf_counter() - started
        if as_json:
            click.echo(json.dumps(result, indent=1))
        else:
            print_human(result, wall_s, phases)
        # Millions of objects: tracing them all once more (a collection when gc comes back on)
        # just before the process exits takes seconds to minutes. Park them where the
        # collector never looks; freeing them at exit is reference counting alone.
        gc.freeze()
    finally:
        if gc_was_on:
            gc.enable()
    global finished_exit_code
    finished_exit_code = 0 if result["ok"] else 1
    sys.exit(finished_exit_code)


def estimate_memory_bytes(hosts: int, vms: int) -> int:
    """Rough peak memory of a run: ~350 B per (agent, peer) pair (PeerState, the peer map, the
    simulated subscription) and ~180 B per (agent, MAC) (table slot, flap-guard times, the
    controller's per-host apply times); keys and entries are shared between agents. Measured
    2026-11-27: 1,000 hosts 448 MB without VMs, 1.79 GB with 8,000 (0.97 GB since: an upper
    bound, as a refusal should be)."""
    return 350 * hosts * hosts + 180 * hosts * vms + 100 * 2**20


def _ms(v) -> str:
    return "-" if v is None else f"{v:.3f}"


def print_human(r: dict, wall_s: float, phases: list[tuple[str, float]] = (), console: Console | None = None) -> None:
    console = console or Console()
    c = r["config"]
    m = r["moves"]
    tr = r["traffic"]
    f = r["faults"]
    ag = r["agreement"]
    ch = r["checks"]
    t = Table("", "", title=f"dvs sim: {c['hosts']} hosts, {c['vms']} VMs, {c['moves']} moves, seed {c['seed']}",
              show_header=False)
    t.add_row("moves converged", f"{m['converged']} / {c['moves']}")
    t.add_row("convergence ms (virtual)", f"p50 {_ms(m['latency_ms_p50'])}  p99 {_ms(m['latency_ms_p99'])}  "
                                          f"max {_ms(m['latency_ms_max'])}")
    t.add_row("messages / move", f"{tr['messages_per_move']:,}")
    t.add_row("bytes / move", f"{tr['bytes_per_move']:,}")
    t.add_row("lost / duplicated / cut", f"{tr['lost']:,} / {tr['duplicated']:,} / {tr['cut_by_partition']:,}")
    t.add_row("cluster ready at (virtual ms)", _ms(r["ready_ms"]))
    t.add_row("faults stopped at (virtual ms)", _ms(f["stop_ms"]))
    t.add_row("full agreement after faults (ms)",
              f"{_ms(ag['after_faults_ms'])} (bound {ag['bound_ms']})" if ag["reached"] else "[red]never[/red]")
    t.add_row("final checks", "[green]passed[/green]" if ch["ok"] else
              f"[red]FAILED[/red]: {ch['mismatched_hosts']} tables differ, {ch['safety_violations']} safety "
              f"violations, handler errors {ch['handler_errors']}")
    t.add_row("gossip interval ms", str(c["gossip_interval_ms"]))
    t.add_row("events", f"{r['events']:,}")
    t.add_row("wall clock", f"{wall_s:.2f} s")
    if phases:
        t.add_row("wall clock by phase", "  ".join(f"{name} {at:.1f}s" for name, at in phases))
    console.print(t)
    for rec in m["failed"][:5]:
        console.print(f"[red]not converged[/red]: {rec['vm']} {rec['src']} -> {rec['dst']}: {rec.get('error', '')}")
    if r["error"]:
        console.print(f"[red]{r['error']}[/red]")
    click.echo(f"replay: {r['replay']}")
