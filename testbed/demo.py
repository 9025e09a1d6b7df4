"""`dvs demo`: up, create VMs, move random VMs one after another, report, down."""

from __future__ import annotations

import json
import random
import shutil
import tempfile
from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from testbed.check import check
from testbed.client import ClusterError
from testbed.cluster import Cluster


def percentile(values: list[float], q: float) -> float | None:
    """Nearest-rank percentile (q in 0..100); None for no values."""
    if not values:
        return None
    s = sorted(values)
    rank = max(1, min(len(s), int(-(-q * len(s) // 100))))
    return s[rank - 1]


def summarize(records: list[dict]) -> dict:
    lat = [r["latency_ms"] for r in records if r["converged"] and r["latency_ms"] is not None]
    return {
        "moves": len(records),
        "converged": sum(1 for r in records if r["converged"]),
        "latency_ms_p50": percentile(lat, 50),
        "latency_ms_p99": percentile(lat, 99),
        "latency_ms_max": max(lat) if lat else None,
    }


def _ms(v: float | None) -> str:
    return "-" if v is None else f"{v:.2f}"


def moves_table(records: list[dict]) -> Table:
    t = Table("#", "vm", "from", "to", "seq", "converged", "latency ms", title="VM moves")
    for i, r in enumerate(records, 1):
        t.add_row(str(i), r["vm"], r["src"], r["dst"], str(r["seq"]),
                  "yes" if r["converged"] else f"[red]no[/red] {r.get('error', '')}", _ms(r["latency_ms"]))
    return t


def run_demo(*, hosts: int, vms: int, n_moves: int, seed: int, as_json: bool, state_dir: str | None,
             agent_args: list[str], console: Console, err_console: Console) -> bool:
    own_dir = state_dir is None
    sdir = Path(tempfile.mkdtemp(prefix="dvs-demo-")) if own_dir else Path(state_dir)
    rng = random.Random(seed)
    records: list[dict] = []
    ok = False
    cluster = None
    try:
        with err_console.status(f"starting {hosts} agents and the controller"):
            cluster = Cluster.up(sdir, hosts, agent_args=agent_args)
        with err_console.status(f"creating {vms} VMs"):
            cluster.create_vms(vms)
        host_names = list(cluster.agents)
        placement = {f"vm{i}": host_names[(i - 1) % hosts] for i in range(1, vms + 1)}
        with Progress(TextColumn("moving VMs"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                      console=err_console, transient=True) as progress, cluster.controller_client(30_000) as ctl:
            task = progress.add_task("moves", total=n_moves)
            for _ in range(n_moves):
                name = rng.choice(sorted(placement))
                dst = rng.choice([h for h in host_names if h != placement[name]])
                rec = ctl.call("vm_move", {"name": name, "to": dst})
                placement[name] = dst
                records.append({k: rec[k] for k in ("vm", "src", "dst", "seq", "converged", "latency_ms")}
                               | ({"error": rec["error"]} if rec["error"] else {}))
                progress.advance(task)
        with err_console.status("checking every agent's table against the inventory"):
            verdict = check(cluster)
        summary = summarize(records)
        ok = verdict["ok"] and summary["converged"] == summary["moves"]
        if as_json:
            print(json.dumps({"hosts": hosts, "vms": vms, "moves": records, "summary": summary,
                              "tables_agree": verdict["ok"], "digests": verdict["digests"]}, indent=1))
        else:
            console.print(moves_table(records))
            console.print(f"{summary['converged']}/{summary['moves']} moves converged; latency ms "
                          f"p50 {_ms(summary['latency_ms_p50'])}, p99 {_ms(summary['latency_ms_p99'])}, "
                          f"max {_ms(summary['latency_ms_max'])}")
            console.print(f"{hosts} hosts, {vms} VMs: every agent's table "
                          + ("[green]equals the controller's inventory[/green]" if verdict["ok"]
                             else "[red]DIFFERS from the controller's inventory[/red]"))
    except ClusterError:
        if own_dir:
            err_console.print(f"logs kept in {sdir / 'logs'}")
            own_dir = False  # keep the evidence
        raise
    finally:
        if cluster is not None:
            cluster.down()
        if own_dir and ok:
            shutil.rmtree(sdir, ignore_errors=True)
        elif own_dir:
            err_console.print(f"demo failed; logs kept in {sdir / 'logs'}")
    return ok
