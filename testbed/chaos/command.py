"""`dvs chaos`: run a fault-injection scenario against a real cluster and judge it.

Register in testbed/cli.py with:
    from testbed.chaos.command import chaos
    cli.add_command(chaos)
Until then: `python -m testbed.chaos SCENARIO.toml --seed S --report DIR`.
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
from pathlib import Path

import click
from rich.console import Console
from rich.table import Table

from dvswitch.errors import error_line
from testbed.client import ClusterError
from testbed.console import EXIT_INVALID, EXIT_OK, EXIT_UNKNOWN, EXIT_USAGE, make_console

HELP = """Run SCENARIO.toml against a real cluster (a controller and N agent processes) and
check what happened.

\b
The run: start the cluster in REPORT/state, create the VMs, then for workload.duration_s
send the planned moves while the nemesis applies the fault schedule (partitions, loss,
delay, duplication, reordering; kill, pause, resume, restart of agents or the controller).
Then heal everything (network faults reset, paused processes resumed, killed ones restarted
unless end.keep_down names them), wait for the tables to settle, read the final tables,
the inventory and every apply the agents reported, and stop every process by pid.

\b
The history is written to REPORT/history.jsonl as the run goes; the checker then judges it
(separately: `dvs chaos --check-only REPORT` judges it again) and writes REPORT/summary.json
and REPORT/timeline.png. Invariants: tables-match-inventory, moves-resolved, single-owner,
monotonic-applies, processes-up, maintenance-respected, rules-hold (docs/scenarios.md).

\b
With --netns (root) the cluster runs in network namespaces and network faults are kernel
rules: nftables loss, duplication and partitions. What the kernel cannot do here (reordering,
message types, delay on a kernel without netem) falls back to the agents' transport wrapper,
and the run says so fault by fault before it starts.

\b
The same --seed gives the same fault schedule and the same workload choices.
\b
Exit status: 0 valid, 1 invalid (an invariant failed), 2 usage (a bad flag or scenario
file; nothing ran), 3 unknown (the history is incomplete or the run broke).
SIGTERM and SIGHUP stop the run as Ctrl-C does (its cluster is stopped, the history kept);
the cluster's processes also stop by themselves if this process is killed outright.
"""

# The checker's verdict -> `dvs` exit code (testbed/console.py: one meaning per code).
VERDICT_EXIT = {"valid": EXIT_OK, "invalid": EXIT_INVALID, "unknown": EXIT_UNKNOWN}


@click.command("chaos", help=HELP, context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("scenario", required=False, metavar="SCENARIO.toml")
@click.option("--seed", type=int, default=1, show_default=True, help="Seed of the fault schedule and workload.")
@click.option("--report", "report", default=None, metavar="DIR",
              help="Where the history, summary, timeline and the cluster's state/logs go [default: a new temp dir].")
@click.option("--check-only", "check_only", default=None, metavar="DIR",
              help="Do not run anything: judge the history already in DIR.")
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON.")
@click.option("--netns", is_flag=True,
              help="Run the cluster in network namespaces; network faults become kernel rules (root only).")
def chaos(scenario, seed, report, check_only, as_json, netns) -> None:
    from testbed.chaos.checker import check_history

    out = make_console()
    err = make_console(stderr=True)
    if check_only is not None:
        if scenario is not None:
            raise click.UsageError("give either SCENARIO.toml or --check-only DIR, not both")
        if not Path(check_only).exists():
            _die(f"{check_only}: no such report directory (or history file)")
        summary = check_history(check_only)
        summary["exit_code"] = VERDICT_EXIT.get(summary["verdict"], EXIT_UNKNOWN)
        _print(summary, out, as_json)
        sys.exit(summary["exit_code"])
    if scenario is None:
        raise click.UsageError("missing SCENARIO.toml (or --check-only DIR)")

    from testbed.chaos.runner import ChaosRun
    from testbed.chaos.scenario import build_plan, load_scenario
    from testbed.cluster import owned_by_this_process

    try:
        sc = load_scenario(scenario)
        plan = build_plan(sc, seed)
    except ClusterError as e:
        _die(str(e))
    if netns:
        from testbed.netns import unavailable_reason

        reason = unavailable_reason()
        if reason:
            _die(reason)
    report_dir = Path(report) if report else Path(tempfile.mkdtemp(prefix=f"dvs-chaos-{sc.name}-"))
    if report_dir.exists() and not report_dir.is_dir():
        _die(f"--report {report_dir}: exists and is not a directory")
    err.print(f"chaos {sc.name}: {sc.hosts} hosts, {sc.vms} VMs, {len(plan.moves)} planned moves, "
              f"{len(plan.actions)} fault actions over {sc.duration_s:g} s, seed {seed}; report in {report_dir}",
              highlight=False)
    err.print(f"chaos state dir {report_dir / 'state'} (pids in cluster.json, logs in logs/)", highlight=False)
    owned_by_this_process()  # the cluster dies with this process, even after a SIGKILL
    started = time.monotonic()
    run = ChaosRun(sc, plan, report_dir, err_console=err, netns=netns)
    for i, why in run.boundaries().items():
        f = sc.faults[i]
        where = "kernel rules" if why is None else f"the agents' transport wrapper ({why})"
        err.print(f"faults[{i}] {f.kind}: {where}", highlight=False)
    history = run.run()
    summary = check_history(history)
    summary["wall_s"] = round(time.monotonic() - started, 2)
    summary["exit_code"] = VERDICT_EXIT.get(summary["verdict"], EXIT_UNKNOWN)  # (summary.json: the checker's)
    _print(summary, out, as_json)
    sys.exit(summary["exit_code"])


def _die(msg: str) -> None:
    click.echo(error_line("dvs", msg), err=True)
    sys.exit(EXIT_USAGE)


def _print(summary: dict, console: Console, as_json: bool) -> None:
    if as_json:
        click.echo(json.dumps(summary, indent=1, default=str))
        return
    t = Table("invariant", "", "detail", title=f"chaos {summary.get('scenario')} seed {summary.get('seed')}")
    marks = {True: "[green]ok[/green]", False: "[red]FAILED[/red]", None: "[yellow]unknown[/yellow]"}
    for name, inv in summary["invariants"].items():
        t.add_row(name, marks[inv["ok"]], inv["detail"])
    console.print(t)
    for name, inv in summary["invariants"].items():
        for v in inv["violations"][:3]:
            console.print(f"[red]{name}[/red]: {v['what']}", highlight=False)
            for line in v["around"]:
                console.print(f"    {line}", highlight=False)
        if len(inv["violations"]) > 3:
            console.print(f"    ... and {len(inv['violations']) - 3} more (summary.json)")
    for p in summary.get("problems", []):
        console.print(f"[yellow]problem[/yellow]: {p}", highlight=False)
    s = summary.get("stats", {})
    if s:
        wall = summary.get("wall_s", s.get("wall_s"))
        console.print(f"moves: {s.get('moves_requested')} requested, {s.get('moves_converged')} converged, "
                      f"{s.get('moves_switched_not_converged')} converged late, {s.get('moves_refused')} refused, "
                      f"{s.get('moves_without_reply')} without reply; latency ms p50 {_ms(s.get('latency_ms_p50'))} "
                      f"p99 {_ms(s.get('latency_ms_p99'))}, client wait ms p99 {_ms(s.get('reply_wait_ms_p99'))}; "
                      f"HA restarts {s.get('ha_restarts')}; "
                      f"settled {s.get('settled')} in {s.get('settle_s')} s; wall {wall} s", highlight=False)
    color = {"valid": "green", "invalid": "red"}.get(summary["verdict"], "yellow")
    failed = f" ({', '.join(summary['failed'])})" if summary.get("failed") else ""
    console.print(f"verdict: [{color}]{summary['verdict'].upper()}[/{color}]{failed}  "
                  f"history {summary.get('history')}" + (f", timeline {summary['timeline']}"
                                                         if summary.get("timeline") else ""), highlight=False)


def _ms(v) -> str:
    return "-" if v is None else f"{v:.2f}"


if __name__ == "__main__":
    from testbed.cli import main

    sys.exit(main(["chaos", *sys.argv[1:]]))
