"""`dvs bench`: the convergence benchmark, as a click command (`bench`) for testbed.cli to register.

    dvs bench --hosts 8,32 --vms 1280 --moves 200 --rates 10,100,300,1000 --json --out DIR
    dvs bench --quick --out DIR          # a tiny version, well under a minute

Writes DIR/bench.json (every figure and the environment), PNG plots and DIR/benchmarks.md; a
full run (all phases, not --quick) also rewrites the repository's docs/benchmarks.md.
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
import json
import os
import platform
import shlex
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

import click
import msgpack
import psutil
import zmq
from click.core import ParameterSource
from rich.console import Console

from dvswitch.errors import error_line
from testbed.bench import report
from testbed.bench.runner import ALL_PHASES, PHASES, Bench, Params, goal_hosts
from testbed.client import ClusterError
from testbed.cluster import owned_by_this_process
from testbed.console import EXIT_INVALID, make_console

REPO_DOCS = Path(__file__).resolve().parents[2] / "docs" / "benchmarks.md"

QUICK = {
    "hosts": [4],
    "vms": 32,
    "moves": 20,
    "rates": [20.0, 100.0],
    "step_s": 1.0,
    "floor_msgs": 100,
    "cold_ports": 400,
    "ha_vms": 8,
    "balance_vms": 8,
}


class IntList(click.ParamType):
    """A comma-separated list of integers within [lo, hi], e.g. `8,32`."""

    name = "N[,N...]"

    def __init__(self, lo: int, hi: int, what: str) -> None:
        self.lo, self.hi, self.what = lo, hi, what

    def convert(self, value, param, ctx):
        if isinstance(value, list):
            return value
        out = []
        for part in str(value).split(","):
            part = part.strip()
            try:
                n = int(part)
            except ValueError:
                self.fail(f"{part!r} is not a {self.what}; give whole numbers separated by commas, "
                          f"e.g. 8,32", param, ctx)
            if not self.lo <= n <= self.hi:
                self.fail(f"{n} is not a {self.what} between {self.lo} and {self.hi}", param, ctx)
            if n not in out:
                out.append(n)
        return out


class RateList(click.ParamType):
    """A comma-separated list of positive move rates per second, e.g. `10,100,300,1000`."""

    name = "R[,R...]"

    def convert(self, value, param, ctx):
        if isinstance(value, list):
            return value
        out = []
        for part in str(value).split(","):
            part = part.strip()
            try:
                r = float(part)
            except ValueError:
                self.fail(f"{part!r} is not a rate; give moves per second separated by commas, e.g. 10,100",
                          param, ctx)
            if not 0 < r <= 100_000 or r != r:
                self.fail(f"{part} is not a rate between 0 (excluded) and 100,000 moves/s", param, ctx)
            if r not in out:
                out.append(r)
        return out


class PhaseList(click.ParamType):
    name = "PHASE[,PHASE...]"

    def convert(self, value, param, ctx):
        if isinstance(value, tuple):
            return value
        out = tuple(p.strip() for p in str(value).split(",") if p.strip())
        bad = [p for p in out if p not in ALL_PHASES]
        if bad or not out:
            self.fail(f"unknown phase {bad[0] if bad else value!r}; choose from {', '.join(ALL_PHASES)}", param, ctx)
        return out


def environment() -> dict:
    def version(pkg: str) -> str:
        try:
            return importlib.metadata.version(pkg)
        except importlib.metadata.PackageNotFoundError:
            return "-"

    return {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "cpu_count": os.cpu_count(),
        "cpu_count_physical": psutil.cpu_count(logical=False),
        "mem_total_mb": round(psutil.virtual_memory().total / 2**20),
        "python": platform.python_version(),
        "python_implementation": platform.python_implementation(),
        "pyzmq": zmq.pyzmq_version(),
        "libzmq": zmq.zmq_version(),
        "msgpack": ".".join(map(str, msgpack.version)),
        "uvloop": version("uvloop"),
        "platform": platform.platform(),
        "machine": platform.machine(),
        "loadavg_start": list(os.getloadavg()),
    }


def machine_busy_s() -> float:
    t = psutil.cpu_times()
    return sum(t) - t.idle - getattr(t, "iowait", 0.0) - getattr(t, "guest", 0.0) - getattr(t, "guest_nice", 0.0)


def own_cpu_s() -> float:
    """CPU of this process and of its children that exited and were reaped (agents, controllers,
    floor subscribers: every one is waited for when stopped)."""
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


def command_line() -> str:
    argv = sys.argv[1:]
    if "bench" in argv:
        argv = argv[argv.index("bench") + 1:]
    return "dvs bench " + shlex.join(argv) if argv else "dvs bench"


@click.command("bench", context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--hosts", type=IntList(2, 256, "host count"), default="8,32", show_default=True,
              help="Cluster sizes N to measure, comma-separated (profile and HA at the largest; load curve "
                   "and cold start at 32 when it is one of them, the goals' size, else at the largest).")
@click.option("--vms", type=click.IntRange(2, 1_000_000), default=1280, show_default=True,
              help="VMs per cluster for the move phases.")
@click.option("--moves", type=click.IntRange(1, 1_000_000), default=200, show_default=True,
              help="Moves one after another per N.")
@click.option("--rates", type=RateList(), default="10,100,300,1000", show_default=True,
              help="Offered move rates (moves/s) of the open-loop load curve (at 32 hosts, or the largest N).")
@click.option("--quick", is_flag=True,
              help="A tiny run (4 hosts, 32 VMs, 20 moves, 2 rates, small mass events) for smoke tests; "
                   "options given explicitly still win.")
@click.option("--json", "as_json", is_flag=True, help="Also print bench.json on stdout.")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default="bench-results",
              show_default=True, help="Directory for bench.json, plots, Markdown and temp cluster state.")
@click.option("--seed", type=int, default=1, show_default=True, help="Seed for which VMs move where.")
@click.option("--step-s", type=click.FloatRange(0.1, 600), default=3.0, show_default=True,
              help="Seconds of offered load per rate (at least 50 moves).")
@click.option("--floor-msgs", type=click.IntRange(10, 1_000_000), default=1000, show_default=True,
              help="Messages the floor (and puts the etcd baseline) sends per N.")
@click.option("--floor-rate", type=click.FloatRange(1, 100_000), default=200, show_default=True,
              help="Messages per second the floor (and the etcd baseline) sends.")
@click.option("--cold-ports", type=click.IntRange(1, 1_000_000), default=8000, show_default=True,
              help="Ports created in one batch for the cold start.")
@click.option("--cold-hosts", type=click.IntRange(2, 256), default=None,
              help="Hosts of the cold-start cluster (default: 32 if --hosts has it, else the largest).")
@click.option("--ha-vms", type=click.IntRange(1, 1_000_000), default=40, show_default=True,
              help="VMs on the host that HA kills.")
@click.option("--balance-vms", type=click.IntRange(1, 100_000), default=40, show_default=True,
              help="Phase balance: VMs on the evacuated host, then piled on 4 hosts for the rebalance.")
@click.option("--phases", type=PhaseList(), default=",".join(PHASES), show_default=True,
              help="Which phases to run (balance, evacuate and rebalance, only when named).")
@click.option("--docs", "docs_path", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Rewrite this Markdown file with the figures (default: docs/benchmarks.md after a full run).")
@click.option("--no-docs", is_flag=True, help="Do not rewrite docs/benchmarks.md.")
@click.option("--keep-state", is_flag=True, help="Keep the clusters' state dirs and logs under --out.")
@click.option("--insecure", is_flag=True,
              help="Run every cluster without CURVE (phase curve still runs both). For comparison only.")
@click.option("--from-json", "from_json", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
              help="Measure nothing: show and re-render (plots, Markdown) an earlier bench.json.")
def bench(hosts, vms, moves, rates, quick, as_json, out, seed, step_s, floor_msgs, floor_rate, cold_ports,
          cold_hosts, ha_vms, balance_vms, phases, docs_path, no_docs, keep_state, insecure, from_json) -> None:
    """Measure move convergence of real local clusters against the raw ZeroMQ floor and etcd.

    For each N: the floor (one PUB → N-1 subscriber processes, blocking recv), the etcd
    baseline (one etcd on tmpfs, N watcher processes; skipped with a note where etcd is
    absent, and under --quick unless --phases names it), then N agents
    with --vms VMs and --moves moves one after another. At the largest N: a profile of where a
    move's CPU goes and HA after SIGKILL of one host; at 32 hosts (the goals' size) if measured,
    else at the largest: an open-loop load curve. Then a cold start of --cold-ports ports. Phase
    balance (only when --phases names it): a fresh cluster of the largest N, --balance-vms VMs
    evacuated off one host, then a rebalance from all of them on 4 hosts. Phase curve: at the
    largest N, --moves moves on clusters with CURVE and as many on clusters without, in
    alternating rounds, and the overhead of CURVE on p50 and p99 (skipped under --quick unless
    --phases names it).
    """
    ctx = click.get_current_context()
    if from_json is not None:
        rerender(from_json, as_json=as_json, docs_path=None if no_docs else docs_path)
        return
    given = {name for name in ctx.params
             if ctx.get_parameter_source(name) in (ParameterSource.COMMANDLINE, ParameterSource.ENVIRONMENT)}
    values = dict(hosts=hosts, vms=vms, moves=moves, rates=rates, step_s=step_s, floor_msgs=floor_msgs,
                  cold_ports=cold_ports, ha_vms=ha_vms, balance_vms=balance_vms)
    if quick:
        values |= {k: v for k, v in QUICK.items() if k not in given}
        if "phases" not in given:
            # The smoke test must not depend on an etcd install, nor spend its time on one.
            phases = tuple(p for p in phases if p not in ("etcd", "curve"))
    hosts = values["hosts"]
    if cold_hosts is None:
        cold_hosts = goal_hosts(hosts)
    if "ha" in phases and values["ha_vms"] >= values["vms"]:
        raise click.UsageError(f"--ha-vms ({values['ha_vms']}) must be below --vms ({values['vms']})", ctx)
    if out.exists() and not out.is_dir():
        raise click.UsageError(f"--out {out} exists and is not a directory", ctx)
    params = Params(hosts=hosts, vms=values["vms"], moves=values["moves"], rates=values["rates"], quick=quick,
                    seed=seed, step_s=values["step_s"], floor_msgs=values["floor_msgs"], floor_rate=floor_rate,
                    cold_hosts=cold_hosts, cold_ports=values["cold_ports"], ha_vms=values["ha_vms"],
                    balance_vms=values["balance_vms"], idle_s=0.5 if quick else 2.0, load_min_moves=20 if quick else 50,
                    phases=tuple(p for p in ALL_PHASES if p in phases), out=out, keep_state=keep_state,
                    insecure=insecure)
    if insecure:
        from testbed.cli import warn_insecure

        warn_insecure()
    run(params, as_json=as_json, docs_path=docs_path, no_docs=no_docs)


def run(params: Params, *, as_json: bool, docs_path: Path | None, no_docs: bool) -> dict:
    err = make_console(stderr=True)
    owned_by_this_process()  # its clusters die with this process, even after a SIGKILL
    out = params.out
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ClusterError(f"cannot create --out {out}: {e.strerror}") from None
    env = environment()
    cmd = command_line()
    psutil.cpu_percent(None)
    busy0, ours0 = machine_busy_s(), own_cpu_s()
    t0 = time.monotonic()
    b = Bench(params, err)
    err.print(f"[bold]dvs bench[/bold]: hosts {','.join(map(str, params.hosts))}, {params.vms:,} VMs, "
              f"{params.moves} moves, rates {','.join(f'{r:g}' for r in params.rates)}; phases "
              f"{','.join(params.phases)}; output in {out}")
    try:
        results = b.run()
    finally:
        left = b.leftover()
        if left:
            err.print(f"[yellow]stopping {len(left)} leftover process(es): {left}[/yellow]")
            from testbed import procs

            procs.stop_pids(left, timeout_s=3)
    env["loadavg_end"] = list(os.getloadavg())
    env["machine_cpu_busy_percent"] = psutil.cpu_percent(None)
    # CPU that other programs used meanwhile (machine busy time minus ours and our reaped
    # children's): how noisy this run's figures are.
    env["other_programs_cpu_cores"] = max(0.0, (machine_busy_s() - busy0) - (own_cpu_s() - ours0)) / (
        time.monotonic() - t0)
    doc = {
        "schema": 1,
        "command": cmd,
        "params": {k: (str(v) if isinstance(v, Path) else v) for k, v in dataclasses.asdict(params).items()},
        "environment": env,
        "wall_s": time.monotonic() - t0,
        "results": results,
        "pids": b.pids,
    }
    doc["headline"] = report.headline(results)
    doc["goals"] = report.goals(results)
    doc["problems"] = problems(results)
    doc["ok"] = not doc["problems"]
    files = {"json": str(out / "bench.json")}
    files |= report.plots(doc, out)
    md = report.markdown(doc, files)
    (out / "benchmarks.md").write_text(md)
    files["markdown"] = str(out / "benchmarks.md")
    full = not params.quick and set(params.phases) == set(PHASES)
    target = docs_path if docs_path is not None else (REPO_DOCS if full and REPO_DOCS.parent.is_dir() else None)
    if target is not None and not no_docs:
        target.write_text(md)
        files["docs"] = str(target)
    doc["files"] = files
    (out / "bench.json").write_text(json.dumps(doc, indent=1))
    show(doc, err if as_json else make_console())
    err.print(f"wall time {doc['wall_s']:.0f} s; wrote " + ", ".join(files.values()))
    if as_json:
        click.echo(json.dumps(doc, indent=1))
    if doc["problems"]:
        click.echo(error_line("dvs", f"bench finished but {doc['problems'][0]}")
                   + (f" (and {len(doc['problems']) - 1} more)" if len(doc["problems"]) > 1 else "")
                   + f"; see {out / 'bench.json'}", err=True)
        sys.exit(EXIT_INVALID)
    return doc


def show(doc: dict, console: Console) -> None:
    """The result tables: on stdout, unless --json puts the document there (then on stderr)."""
    for t in report.tables(doc):
        console.print(t)


def rerender(path: Path, *, as_json: bool, docs_path: Path | None) -> None:
    """Tables, plots and Markdown again from a bench.json (e.g. after improving the report)."""
    err = make_console(stderr=True)
    try:
        doc = json.loads(path.read_text())
    except ValueError as e:
        raise ClusterError(f"{path} is not JSON ({e})") from None
    missing = [k for k in ("results", "environment", "command", "params", "wall_s") if k not in doc]
    if missing:
        raise ClusterError(f"{path} is not a bench.json written by `dvs bench` (no {', '.join(missing)})")
    out = path.parent
    doc["headline"] = report.headline(doc["results"])
    doc["goals"] = report.goals(doc["results"])
    files = {"json": str(path)} | report.plots(doc, out)
    md = report.markdown(doc, files)
    (out / "benchmarks.md").write_text(md)
    files["markdown"] = str(out / "benchmarks.md")
    if docs_path is not None:
        docs_path.write_text(md)
        files["docs"] = str(docs_path)
    doc["files"] = files
    path.write_text(json.dumps(doc, indent=1))
    show(doc, err if as_json else make_console())
    err.print("re-rendered from " + str(path) + "; wrote " + ", ".join(files.values()))
    if as_json:
        click.echo(json.dumps(doc, indent=1))


def problems(results: dict) -> list[str]:
    """Correctness failures (not slowness): these make `dvs bench` exit non-zero."""
    out = []
    for e in results["per_hosts"]:
        m = e.get("moves")
        if m and m["converged"] != m["moves"]:
            out.append(f"{m['moves'] - m['converged']} of {m['moves']} moves at N={e['hosts']} did not converge")
        f = e.get("floor")
        if f and f["lost"]:
            out.append(f"the floor lost {f['lost']} messages at N={e['hosts']}")
        et = e.get("etcd")
        if et and et["lost"]:
            out.append(f"the etcd baseline lost {et['lost']} notifications at N={e['hosts']}")
    cold = results.get("cold_start")
    if cold and (cold["converged"] != cold["ports"] or cold["agents_holding_all"] != cold["hosts"]):
        out.append(f"cold start: {cold['converged']} of {cold['ports']} ports converged, "
                   f"{cold['agents_holding_all']} of {cold['hosts']} agents hold them all")
    ha = results.get("ha")
    if ha and not (ha["tables_agree"] and ha["running_elsewhere"] == ha["vms_on_victim"]):
        out.append(f"HA: {ha['running_elsewhere']} of {ha['vms_on_victim']} VMs run elsewhere, "
                   f"tables {'agree' if ha['tables_agree'] else 'disagree'}")
    return out
