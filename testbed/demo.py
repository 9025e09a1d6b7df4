"""`dvs demo`: up, create VMs, start traffic between VM pairs, move random paired VMs one after
another, report each move's convergence latency beside the frames it lost, down."""

from __future__ import annotations

import json
import random
import shutil
import tempfile
import time
from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from dvswitch.stats import summarize_moves
from testbed.check import check
from testbed.client import ClusterError
from testbed.cluster import Cluster


def _ms(v: float | None) -> str:
    return "-" if v is None else f"{v:.2f}"


def moves_table(records: list[dict], first: int = 1) -> Table:
    """`first`: the number of the first record shown (the list may be the tail of a longer one).
    kind: "move", or "ha" for a VM of a dead host restarted elsewhere."""
    traffic = any("frames_lost" in r for r in records)
    cols = ["#", "kind", "vm", "from", "to", "seq", "converged", "latency ms"]
    t = Table(*cols, *(["frames", "lost", "blackout ms"] if traffic else []), title="VM moves")
    for i, r in enumerate(records, first):
        kind = r.get("kind", "move")
        row = [str(i), "ha" if kind == "restart" else kind, r["vm"], r["src"], r["dst"], str(r["seq"]),
               "yes" if r["converged"] else f"[red]no[/red] {r.get('error', '')}", _ms(r["latency_ms"])]
        if traffic:
            lost = r.get("frames_lost")
            row += [_n(r.get("frames")), _n(lost) if not lost else f"[red]{lost}[/red]", _ms(r.get("blackout_ms"))]
        t.add_row(*row)
    return t


def _n(v) -> str:
    return "-" if v is None else str(v)


def run_demo(*, hosts: int, vms: int, n_moves: int, seed: int, as_json: bool, state_dir: str | None,
             agent_args: list[str], console: Console, err_console: Console, pairs: int = 32,
             rate: float = 200.0) -> bool:
    own_dir = state_dir is None
    sdir = Path(tempfile.mkdtemp(prefix="dvs-demo-")) if own_dir else Path(state_dir)
    rng = random.Random(seed)
    records: list[dict] = []
    ok = False
    cluster = None
    err_console.print(f"demo state dir {sdir} (pids in cluster.json, logs in logs/)", highlight=False)
    try:
        with err_console.status(f"starting {hosts} agents and the controller"):
            cluster = Cluster.up(sdir, hosts, agent_args=agent_args)
        with err_console.status(f"creating {vms} VMs"):
            cluster.create_vms(vms)
        host_names = list(cluster.agents)
        placement = {f"vm{i}": host_names[(i - 1) % hosts] for i in range(1, vms + 1)}
        run = None
        pairs = min(pairs, vms // 2)
        if pairs:
            from testbed.traffic import TrafficRun

            with err_console.status(f"starting traffic: {pairs} VM pairs at {rate:g} frames/s each"):
                run = TrafficRun(cluster, pairs, rate, seed=seed)
                run.setup()
                run.start()
                time.sleep(0.5)  # traffic flows before the first move
            placement = {n: h for n, h in placement.items() if n in run.by_name}  # move VMs that talk
        try:
            _moves(cluster, placement, host_names, n_moves, rng, records, err_console)
            if run is not None:
                time.sleep(1.0)  # and after the last one (the per-move window)
                run.finish()
                for rec in records:
                    st = run.move_stats(rec)
                    rec.update(frames=st["frames"], frames_lost=st["lost"], misdelivered=st["misdelivered"],
                               blackout_ms=st["blackout_ms"])
                traffic = run.report()
                traffic.pop("moves")
                traffic.pop("moves_summary")
                traffic.pop("pairs_list")
        except BaseException:
            if run is not None:
                run.abort()
            raise
        with err_console.status("checking every agent's table against the inventory"):
            verdict = check(cluster)
        summary = summarize_moves(records)
        if run is not None:
            summary.update(frames_sent=traffic["frames"]["sent"], frames_lost=traffic["frames"]["lost"],
                           frames_lost_in_moves=sum(r["frames_lost"] or 0 for r in records),
                           misdelivered=traffic["frames"]["misdelivered"])
        ok = verdict["ok"] and summary["converged"] == summary["moves"]
        if as_json:
            print(json.dumps({"hosts": hosts, "vms": vms, "moves": records, "summary": summary,
                              "tables_agree": verdict["ok"], "digests": verdict["digests"],
                              "traffic": traffic if run is not None else None}, indent=1))
        else:
            console.print(moves_table(records))
            console.print(f"{summary['converged']}/{summary['moves']} moves converged; latency ms "
                          f"p50 {_ms(summary['latency_ms_p50'])}, p99 {_ms(summary['latency_ms_p99'])}, "
                          f"max {_ms(summary['latency_ms_max'])}")
            if run is not None:
                f = traffic["frames"]
                console.print(f"traffic: {pairs} pairs at {rate:g} frames/s: sent {f['sent']}, delivered "
                              f"{f['delivered']}, lost {f['lost']} ({summary['frames_lost_in_moves']} around moves), "
                              f"duplicated {f['duplicated']}, misdelivered {f['misdelivered']}")
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


def _moves(cluster, placement: dict, host_names: list[str], n_moves: int, rng: random.Random, records: list[dict],
           err_console: Console) -> None:
    with Progress(TextColumn("moving VMs"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=err_console, transient=True) as progress, cluster.controller_client(30_000) as ctl:
        task = progress.add_task("moves", total=n_moves)
        for _ in range(n_moves):
            name = rng.choice(sorted(placement))
            dst = rng.choice([h for h in host_names if h != placement[name]])
            rec = ctl.call("vm_move", {"name": name, "to": dst})
            placement[name] = dst
            records.append({k: rec[k] for k in ("vm", "src", "dst", "seq", "converged", "latency_ms", "switch_ns")}
                           | ({"error": rec["error"]} if rec["error"] else {}))
            progress.advance(task)
