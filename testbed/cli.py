"""`dvs`: launch a local dvswitch cluster, look at it, move VMs, run the demo."""

from __future__ import annotations

import json
import os
import signal
import sys
import threading

import click
from rich.table import Table

from dvswitch.errors import error_line
from testbed.client import ClusterError
from testbed.cluster import NETNS_WITH_CLUSTER_FILE, Cluster, default_state_dir, owned_by_this_process
from testbed.console import EXIT_ERROR, EXIT_INVALID, EXIT_OK, EXIT_USAGE, make_console

console = make_console()
err_console = make_console(stderr=True)


def emit_json(obj) -> None:
    click.echo(json.dumps(obj, indent=1, default=str))


state_dir_option = click.option(
    "--state-dir",
    default=default_state_dir,
    show_default="./.dvs or $DVS_STATE_DIR",
    help="Where the cluster keeps pids, endpoints and logs.",
)
json_option = click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="dvswitch", prog_name="dvs", message="%(prog)s %(version)s")
def cli() -> None:
    """dvswitch: a distributed virtual switch on one machine, and a lab to test it.

    Results go to stdout, progress and errors to stderr; in a pipe nothing is cut short.

    \b
    Exit codes (every command):
      0  ok / valid
      1  invalid or disagreement (tables differ, a move did not converge, an invariant failed)
      2  usage error (bad flag, argument or input file); nothing was started
      3  unknown (chaos: the history is incomplete or the run broke)
      4  cluster or environment error (no cluster, a process that does not answer, an OS error)
      128+N  stopped by signal N (130 Ctrl-C, 143 SIGTERM), after stopping what it started
    """


# ---------------------------------------------------------------------- lifecycle


def agent_flags(heartbeat_interval_ms: int | None) -> list[str]:
    return ["--heartbeat-interval-ms", str(heartbeat_interval_ms)] if heartbeat_interval_ms else []


LOG_LEVELS = ["debug", "info", "warning", "error"]


def _vtep_base_value(ctx, param, value: str) -> str:
    import ipaddress

    if value in ("auto", "off"):
        return value
    try:
        ipaddress.IPv4Address(value)
    except ValueError:
        raise click.BadParameter(f"{value!r} is not an IPv4 address, 'auto' or 'off'") from None
    return value


@cli.command()
@click.option("--hosts", type=click.IntRange(1, 256), default=None,
              help="Number of agents (h1..hN); required unless --cluster names the hosts.")
@click.option("--vms", type=click.IntRange(0, 1_000_000), default=0, show_default=True,
              help="VMs to place round-robin (vm1..vmM).")
@click.option("--foreground", is_flag=True, help="Stay attached; Ctrl-C stops the cluster.")
@click.option("--heartbeat-interval-ms", type=click.IntRange(10, 60_000), default=None,
              help="Agent heartbeat interval in ms (agent default 500).")
@click.option("--timeout-s", type=click.FloatRange(1, 600), default=60, show_default=True,
              help="How long to wait for the cluster to be ready.")
@click.option("--netns", is_flag=True,
              help="Real-network mode: each host in its own network namespace on a bridge; partitions "
                   "become nftables rules (root only).")
@click.option("--vtep-base", default="127.0.0.1", show_default=True, callback=_vtep_base_value,
              help="Data plane: host hN's VTEP is this IPv4 address + N on UDP 4789 (h1 = 127.0.0.2); "
                   "'auto' picks a free 127.a.b.0 block, 'off' runs no data plane.")
@click.option("--log-level", type=click.Choice(LOG_LEVELS), default="info", show_default=True,
              help="Log level of the agents and the controller (their logs are in STATE_DIR/logs).")
@click.option("--no-metrics", is_flag=True,
              help="Serve no Prometheus metrics (saves ~3.5 MB of memory per process).")
@click.option("--cluster", "cluster_file", type=click.Path(dir_okay=False), default=None,
              help="Cluster file (TOML) naming the controller's endpoint and every host's control and VTEP "
                   "address; its addresses must be this machine's (e.g. 127.x). See README, Several machines.")
@click.option("--insecure", is_flag=True,
              help="No CURVE: any process that reaches a socket may command the cluster. For comparison only.")
@click.option("--rarp-to-overlay", is_flag=True,
              help="Flood a moved VM's RARP over VXLAN to every host of its VLAN, as a flood-and-learn switch "
                   "does (default: to the new host's own ports only; the other hosts learn the move from the "
                   "control plane, as EVPN's VTEPs do).")
@state_dir_option
def up(hosts, vms, foreground, heartbeat_interval_ms, timeout_s, netns, vtep_base, log_level, no_metrics,
       cluster_file, insecure, rarp_to_overlay, state_dir) -> None:
    """Start the controller and N agents, wait until the mesh is connected, place VMs."""
    if hosts is None and cluster_file is None:
        raise click.UsageError("give --hosts N (or --cluster FILE)")
    if insecure:
        warn_insecure()
    if netns and cluster_file is not None:  # (the caller's mistake first: it holds on any machine)
        raise ClusterError(NETNS_WITH_CLUSTER_FILE)
    if netns:
        from testbed.netns import unavailable_reason

        reason = unavailable_reason()
        if reason:
            raise ClusterError(reason)
    what = f"{hosts} agents" if hosts else f"the agents of {cluster_file}"
    with err_console.status(f"starting controller and {what}"):
        levels = (["--log-level", log_level] if log_level != "info" else []) + \
            (["--metrics-port", "-1"] if no_metrics else [])
        dp_flags = ["--rarp-to-overlay"] if rarp_to_overlay else []
        cluster = Cluster.up(state_dir, hosts, agent_args=agent_flags(heartbeat_interval_ms) + levels + dp_flags,
                             controller_args=levels, ready_timeout_s=timeout_s, netns=netns, vtep_base=vtep_base,
                             cluster_file=cluster_file, insecure=insecure)
    try:
        if vms:
            with err_console.status(f"placing {vms} VMs"):
                cluster.create_vms(vms)
    except BaseException:
        cluster.down()
        raise
    click.echo(f"cluster up: {len(cluster.agents)} hosts, {vms} VMs, state in {state_dir} "
               f"(controller {cluster.controller_endpoint})")
    if foreground:
        stop = threading.Event()
        # Handlers before the prompt: a Ctrl-C right after it must stop the cluster too.
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(sig, lambda *_: stop.set())
        click.echo("running in the foreground; Ctrl-C stops it", err=True)
        while not stop.wait(0.5):
            if not cluster.any_alive():
                click.echo("every process has exited", err=True)
                break
        killed = cluster.down()
        click.echo("cluster stopped" + (f" (SIGKILL needed for {', '.join(killed)})" if killed else ""))


@cli.command()
@state_dir_option
def down(state_dir) -> None:
    """Stop every process of the cluster (SIGTERM, then SIGKILL after 5 s)."""
    cluster = Cluster.load(state_dir)
    killed = cluster.down()
    click.echo("cluster stopped" + (f" (SIGKILL needed for {', '.join(killed)})" if killed else ""))


@cli.command()
@click.option("--all", "detached", is_flag=True,
              help="Also stop clusters started by `dvs up` (detached on purpose), wherever their state dir is.")
@click.option("--timeout-s", type=click.FloatRange(0.1, 600), default=5, show_default=True,
              help="SIGTERM, then SIGKILL after this long.")
def cleanup(detached, timeout_s) -> None:
    """Stop clusters left behind by crashed runs (`dvs demo`, `dvs chaos`, `dvs bench` killed
    before they could stop them), found in the registry of clusters ($DVS_REGISTRY_DIR, else
    $XDG_RUNTIME_DIR/dvswitch/clusters, else ~/.cache/dvswitch/clusters). Processes are stopped
    by pid, each checked against its recorded start time, so a reused pid is never signalled.
    Safe to run again and again (like `mn -c`)."""
    from testbed.cluster import cleanup as run_cleanup

    results = run_cleanup(detached=detached, timeout_s=timeout_s)
    stopped = 0
    for r in results:
        procs_ = f": {', '.join(r['stopped'])}" if r["stopped"] else ""
        killed = f" (SIGKILL needed for {', '.join(r['sigkill'])})" if r["sigkill"] else ""
        click.echo(f"{r['state_dir'] or r['entry']}: {r['action']}{procs_}{killed}")
        stopped += bool(r["stopped"])
    click.echo(f"cleanup: {stopped} cluster(s) stopped, {len(results)} registry entr"
               f"{'y' if len(results) == 1 else 'ies'} looked at")


# ---------------------------------------------------------------------- reading


def macs_as_strings(obj: dict) -> dict:
    """Ports as agents describe them carry the MAC as an int; everywhere else in JSON it is a string."""
    from agent.mactable import format_mac

    for port in obj.get("ports", []):
        if isinstance(port.get("mac"), int):
            port["mac"] = format_mac(port["mac"])
    return obj


def _metrics_fields(info: dict) -> dict:
    """`metrics` (the URL a Prometheus server scrapes) and `metrics_port`, None if it serves none."""
    url = info.get("metrics")
    port = None
    if url:
        from urllib.parse import urlsplit

        port = urlsplit(url).port
    return {"metrics": url, "metrics_port": port}


def _auth_fields(client) -> dict:
    """auth_failures and forbidden (dvswitch/auth.py), and whether the process speaks CURVE."""
    try:
        a = client.call("auth")
    except ClusterError:  # (a process of an older version: no such call)
        return {"curve": None, "auth_failures": None, "forbidden": None}
    return {"curve": a["curve"], "auth_failures": a["auth_failures"], "forbidden": a["forbidden"]}


def warn_insecure() -> None:
    err_console.print("[bold yellow]warning:[/] --insecure: no CURVE; any process on this machine that reaches "
                      "a socket can claim MACs, inject faults and move VMs. For comparison runs only.")


def gather_status(cluster: Cluster) -> dict:
    """The controller's view of each host, completed by each agent's own answer."""
    ctl_hosts = {}
    controller = {"endpoint": cluster.controller_endpoint, "pid": cluster.controller.pid, "state": "up",
                  **_metrics_fields(cluster.controller.info)}
    try:
        with cluster.controller_client(timeout_ms=2_000) as ctl:
            st = ctl.call("status")
            auth_ctl = _auth_fields(ctl)
        ctl_hosts = {h["host"]: h for h in st["hosts"]}
        controller.update(vms=st["vms"], ops_in_flight=st["ops_in_flight"], moves_done=st["moves_done"],
                          dropped_malformed=st["dropped_malformed"])
        controller.update(auth_ctl)
    except ClusterError:
        controller["state"] = "unreachable"
    hosts = []
    for name, proc in cluster.agents.items():
        row = {"host": name, "pid": proc.pid, "state": ctl_hosts.get(name, {}).get("state", "unknown"),
               "pub_endpoint": proc.info["pub"], "rpc_endpoint": proc.info["rpc"],
               **_metrics_fields(proc.info)}
        try:
            with cluster.agent_client(name, timeout_ms=1_000) as a:
                s = a.call("status")
                auth_row = _auth_fields(a)
            row.update(pid=s["pid"], incarnation=s["incarnation"], mac_entries=s["mac_entries"],
                       digest=s["digest"], dropped_malformed=s["dropped_malformed"], peers_heard=s["peers_heard"],
                       flapping=s["flapping"], stats=s["stats"])
            row.update(auth_row)
            if "vtep" in proc.info:
                with cluster.agent_client(name, timeout_ms=1_000) as a:
                    row["dataplane"] = macs_as_strings(a.call("dataplane"))
        except ClusterError:
            row.update(state="unreachable", mac_entries=None, digest=None, dropped_malformed=None)
        hosts.append(row)
    digests = sorted({h["digest"] for h in hosts if h.get("digest")})
    flapping = sorted({(f["vlan"], f["mac"]) for h in hosts for f in h.get("flapping") or []})
    return {"flapping": [{"vlan": v, "mac": m} for v, m in flapping],"state_dir": str(cluster.state_dir), "controller": controller, "hosts": hosts, "digests": digests}


@cli.command()
@json_option
@state_dir_option
def status(as_json, state_dir) -> None:
    """Hosts, their state, MAC entries, table digests and dropped messages."""
    st = gather_status(Cluster.load(state_dir))
    if as_json:
        emit_json(st)
        return
    c = st["controller"]
    console.print(f"controller pid {c['pid']} {c['state']} at {c['endpoint']}"
                  + (f", {c['vms']} VMs, {c['moves_done']} moves done" if "vms" in c else ""))
    t = Table("host", "pid", "state", "peers heard", "MAC entries", "digest", "dropped", "VTEP", "frames rx/tx/drop")
    for h in st["hosts"]:
        dp = h.get("dataplane")
        frames = "-"
        if dp:
            c = dp["counters"]
            frames = f"{c['vnic_rx'] + c['vxlan_rx']}/{c['vnic_tx'] + c['vxlan_tx']}/{dp['dropped']}"
        t.add_row(h["host"], str(h["pid"]), h["state"], str(h.get("peers_heard", "-")),
                  str(h.get("mac_entries", "-")), h.get("digest") or "-", str(h.get("dropped_malformed", "-")),
                  dp["vtep"] if dp else "-", frames)
    console.print(t)
    n = len(st["digests"])
    console.print("tables agree (one digest)" if n == 1 else f"[yellow]{n} different table digests[/yellow]")
    if st["flapping"]:
        # Reported, not refused (as FRR/Junos/Cumulus do by default): moves of these MACs still go ahead.
        macs = ", ".join(f"{f['mac']} (vlan {f['vlan']})" for f in st["flapping"])
        console.print(f"[yellow]flapping[/yellow] (more moves than the flap guard allows; moves still go "
                      f"ahead): {macs}", highlight=False)


@cli.command()
@click.option("--host", "only", default=None, help="Only this host (h1..hN) or `controller` [default: every process].")
@json_option
@state_dir_option
def metrics(only, as_json, state_dir) -> None:
    """One snapshot of the Prometheus metrics of every agent and the controller, merged: each
    sample gets a `process` label (h1..hN, controller). Each process serves its own at the URL
    `dvs status --json` shows (`metrics`), for a Prometheus server to scrape."""
    import urllib.error
    import urllib.request

    from prometheus_client import CollectorRegistry, generate_latest
    from prometheus_client.metrics_core import Metric
    from prometheus_client.parser import text_string_to_metric_families

    cluster = Cluster.load(state_dir)
    procs_ = {**({"controller": cluster.controller} if cluster.controller else {}), **cluster.agents}
    if only is not None:
        if only not in procs_:
            raise ClusterError(f"unknown process {only!r} (hosts: {', '.join(cluster.agents) or 'none'}, "
                               f"or controller)")
        procs_ = {only: procs_[only]}
    merged: dict[str, Metric] = {}
    samples = []
    answered = 0
    for name, proc in procs_.items():
        url = proc.info.get("metrics")
        if not url:
            err_console.print(f"{name}: serves no metrics (started with --metrics-port -1, or by an older dvs)")
            continue
        try:
            with urllib.request.urlopen(url, timeout=3) as resp:
                text = resp.read().decode()
        except (urllib.error.URLError, OSError) as e:
            err_console.print(f"{name}: no answer from {url} ({getattr(e, 'reason', e)})", highlight=False)
            continue
        answered += 1
        for fam in text_string_to_metric_families(text):
            m = merged.get(fam.name)
            if m is None:
                m = merged[fam.name] = Metric(fam.name, fam.documentation, fam.type, fam.unit)
            for smp in fam.samples:
                labels = {"process": name, **smp.labels}
                m.add_sample(smp.name, labels, smp.value, smp.timestamp, smp.exemplar)
                samples.append({"process": name, "name": smp.name, "labels": smp.labels, "value": smp.value})
    if not answered:
        raise ClusterError("no process answered for its metrics; is the cluster up? (`dvs status`)")
    if as_json:
        emit_json(samples)
        return

    class Snapshot:
        def collect(self):
            return list(merged.values())

    registry = CollectorRegistry()
    registry.register(Snapshot())
    click.echo(generate_latest(registry).decode(), nl=False)


@cli.command()
@click.argument("target")
@click.option("--seconds", type=click.FloatRange(0.1, 3600), default=5.0, show_default=True,
              help="How long to profile.")
@click.option("--top", type=click.IntRange(1, 500), default=20, show_default=True, help="Functions listed.")
@click.option("--out", type=click.Path(dir_okay=False), default=None,
              help="Also write the pstats file here (read it with `python -m pstats FILE`).")
@json_option
@state_dir_option
def profile(target, seconds, top, out, as_json, state_dir) -> None:
    """Where a running agent's (TARGET h1..hN) or the controller's (TARGET controller) CPU goes:
    cProfile on its main thread's CPU clock for --seconds, then its own time by area (our
    modules, zmq, asyncio, builtins) and the top functions. Profiling slows the process while
    it runs, small functions most (each call pays a fixed cost): read it as a map of what runs
    and how often; `perf` says what each part costs."""
    import time

    from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

    cluster = Cluster.load(state_dir)
    if target == "controller":
        if cluster.controller is None:
            raise ClusterError("no controller in this cluster's state; start one with `dvs controller start`")
        client = cluster.controller_client(timeout_ms=30_000)
    else:
        client = cluster.agent_client(target, timeout_ms=30_000)  # (unknown host: a one-line error)
    path = os.path.abspath(out) if out else None
    if path and not os.path.isdir(os.path.dirname(path)):
        raise click.BadParameter(f"no directory {os.path.dirname(path)} for the pstats file", param_hint="--out")
    with client as c:
        try:
            c.call("profile", {"action": "start"})
        except ClusterError as e:
            if "already running" not in str(e):
                raise
            raise ClusterError(f"{target} is being profiled already (by `dvs bench` or another `dvs profile`); "
                               "try again when that ends") from None
        try:
            with Progress(TextColumn("{task.description}"), BarColumn(), TimeRemainingColumn(),
                          console=err_console, transient=True) as bar:
                task = bar.add_task(f"profiling {target}", total=seconds)
                t_end = time.monotonic() + seconds
                while (left := t_end - time.monotonic()) > 0:
                    time.sleep(min(0.1, left))
                    bar.update(task, completed=seconds - max(0.0, t_end - time.monotonic()))
        finally:
            res = c.call("profile", {"action": "stop", "path": path, "top": top})
    if as_json:
        emit_json({"target": target, **res})
        return
    total = res["profiled_s"] or 1e-9
    console.print(f"{target} (pid {res['pid']}): {res['cpu_s']:.3f} s CPU in {res['wall_s']:.1f} s "
                  f"({res['cpu_s'] / res['wall_s'] * 100:.0f} % of a core, all threads); main thread as "
                  f"profiled {res['profiled_s']:.3f} s", highlight=False)
    t = Table("area", "calls", "own s", "share", title="Own CPU time by area")
    for a in res["areas"][:12]:
        t.add_row(a["area"], f"{a['calls']:,}", f"{a['own_s']:.4f}", f"{a['own_s'] / total:.0%}")
    console.print(t)
    t = Table("function", "calls", "own s", "cumulative s", title=f"Top {len(res['top'])} functions by own time")
    for r in res["top"]:
        t.add_row(r["function"], f"{r['calls']:,}", f"{r['own_s']:.4f}", f"{r['cum_s']:.4f}")
    console.print(t)
    if path:
        console.print(f"pstats written to {path}", highlight=False)


@cli.command("mac-table")
@click.argument("host")
@json_option
@state_dir_option
def mac_table(host, as_json, state_dir) -> None:
    """The MAC address table of one host, asked of its agent directly."""
    with Cluster.load(state_dir).agent_client(host) as a:
        table = a.call("mac_table")
    if as_json:
        emit_json(macs_as_strings(table))
        return
    t = Table("vlan", "mac", "host", "port", "seq", "where", "rx", "tx", "drop",
              title=f"{host} MAC table (digest {table['digest']})")
    for e in table["entries"]:
        where = "tombstone" if e["tombstone"] else ("local" if e["local"] else "remote")
        t.add_row(str(e["vlan"]), e["mac"], e["host"], e["port"], str(e["seq"]), where,
                  str(e["rx_frames"]), str(e["tx_frames"]), str(e["drop_frames"]))
    console.print(t)


@cli.command()
@click.option("--settle-s", type=click.FloatRange(0, 600), default=5, show_default=True,
              help="Keep re-checking this long while tables disagree.")
@json_option
@state_dir_option
def check(settle_s, as_json, state_dir) -> None:
    """Verify every live agent's table equals the controller's inventory (exit 1 if not)."""
    from testbed.check import check as run_check

    result = run_check(Cluster.load(state_dir), settle_s=settle_s)
    if as_json:
        emit_json(result)
    else:
        for host, h in result["hosts"].items():
            if not h["ok"]:
                console.print(f"{host}: {h.get('error') or h}")
        console.print(("[green]OK[/green]" if result["ok"] else "[red]MISMATCH[/red]")
                      + f": {len(result['hosts'])} hosts, {result['entries']} entries, "
                      f"{len(result['digests'])} digest(s)")
    sys.exit(EXIT_OK if result["ok"] else EXIT_INVALID)


# ---------------------------------------------------------------------- processes


@cli.group()
def controller() -> None:
    """The controller process."""


@controller.command("start")
@state_dir_option
def controller_start(state_dir) -> None:
    """Start the controller again (after a crash or kill) on its old endpoint; it recovers its
    inventory from its journal and from what the agents hold."""
    from controller import journal
    from testbed.cluster import JOURNAL_FILE

    cluster = Cluster.load(state_dir)
    try:
        damage = journal.read(cluster.state_dir / JOURNAL_FILE)
    except OSError:
        damage = None  # (the controller says what is wrong with it)
    p = cluster.start_controller()
    click.echo(f"controller started (pid {p.pid}) on {cluster.controller_endpoint}")
    if damage is not None and damage.damaged:
        click.echo(f"its journal was damaged at byte {damage.sound_bytes} ({damage.why}): it kept the "
                   f"{len(damage.records)} records before it and moved the rest to {damage.damaged_path()}")


@controller.command("check-journal")
@state_dir_option
def controller_check_journal(state_dir) -> None:
    """Check the controller's journal record by record without starting anything: exit 0 when
    it is sound, 1 when damaged (a start keeps the sound records before the damage and moves
    the rest aside to controller.journal.damaged-<offset>)."""
    from pathlib import Path

    from controller import journal
    from testbed.cluster import JOURNAL_FILE

    path = Path(state_dir) / JOURNAL_FILE
    if not path.exists():
        raise ClusterError(f"no journal at {path}; is --state-dir right?")
    try:
        rec = journal.read(path)
    except OSError as e:
        raise ClusterError(f"cannot read {path}: {e.strerror or e}") from None
    click.echo(rec.summary() + (f"; a controller start moves the {rec.size_bytes - rec.sound_bytes} bytes from "
                                f"there to {rec.damaged_path()}" if rec.damaged else ""))
    sys.exit(1 if rec.damaged else 0)


@cli.group()
def host() -> None:
    """Hosts the controller admits."""


@host.command("add")
@click.argument("name")
@click.option("--no-start", is_flag=True, help="Only admit it; start its agent later with `dvs agent start`.")
@state_dir_option
def host_add(name, no_start, state_dir) -> None:
    """Admit a new host NAME at the controller (only admitted hosts may register and join the
    mesh) and start its agent."""
    from testbed import procs

    cluster = Cluster.load(state_dir)
    r = cluster.admit_host(name)
    click.echo(f"host {name} admitted" if r["added"] else f"host {name} was admitted already")
    if not no_start and not (name in cluster.agents and procs.alive(cluster.agents[name])):
        p = cluster.add_agent(name)
        click.echo(f"agent {name} started (pid {p.pid})")


@host.command("evacuate")
@click.argument("name")
@click.option("--max-concurrent", type=click.IntRange(1, 64), default=4, show_default=True,
              help="Moves off the host at once, at most.")
@click.option("--timeout-s", type=click.FloatRange(1, 3_600), default=300, show_default=True,
              help="Seconds to wait for the host to empty (it stays in maintenance either way).")
@json_option
@state_dir_option
def host_evacuate(name, max_concurrent, timeout_s, as_json, state_dir) -> None:
    """Maintenance mode: no placement targets host NAME from now on (create, HA restart,
    rebalance), and its VMs move off it, targets chosen by the placement scorer. Returns once
    it is empty and every move converged; prints each move's convergence latency."""
    from testbed import balance

    rep = balance.evacuate(Cluster.load(state_dir), name, max_concurrent, timeout_s)
    sm = rep["summary"]
    if as_json:
        emit_json(rep)
    else:
        from testbed.demo import moves_table

        if rep["moves"]:
            console.print(moves_table(rep["moves"]))
        drops = "" if rep["dataplane_drops"] is None else f"; data-plane drops meanwhile {rep['dataplane_drops']}"
        click.echo(f"{name} is empty and in maintenance: {sm['moves']} moves, {sm['converged']} converged, "
                   f"in {rep['elapsed_ms'] / 1000:.2f} s; latency ms p50 {_fmt(sm['latency_ms_p50'])} "
                   f"p99 {_fmt(sm['latency_ms_p99'])} max {_fmt(sm['latency_ms_max'])}{drops}")
    if sm["converged"] < sm["moves"]:
        sys.exit(1)


@host.command("activate")
@click.argument("name")
@state_dir_option
def host_activate(name, state_dir) -> None:
    """Take host NAME out of maintenance: placement may target it again."""
    with Cluster.load(state_dir).controller_client() as ctl:
        r = ctl.call("host_activate", {"name": name})
    click.echo(f"host {name} is back in service" if r["was_in_maintenance"] else f"host {name} was in service already")


@cli.group()
def agent() -> None:
    """Agent processes."""


@agent.command("start")
@click.argument("host")
@state_dir_option
def agent_start(host, state_dir) -> None:
    """Start a stopped or crashed agent again; it rejoins with a new incarnation and rebuilds
    its table from its peers."""
    cluster = Cluster.load(state_dir)
    if host not in cluster.agents and not cluster.admitted(host):
        raise ClusterError(f"host {host!r} is not admitted; run `dvs host add {host}` first")
    p = cluster.add_agent(host)
    click.echo(f"agent {host} started (pid {p.pid})")


# ---------------------------------------------------------------------- faults


def _hosts_option(f):
    return click.option("--hosts", "only", default=None,
                        help="Comma-separated hosts that suffer it, on what they receive (default: every host).")(f)


def _peers_option(f):
    return click.option("--from", "from_", default=None,
                        help="Only what comes from these comma-separated hosts (or 'controller'); default: everyone.")(f)


def _types_option(f):
    return click.option("--types", default=None,
                        help="Only these message types, e.g. UPDATES,HEARTBEAT (agent wrapper only: the kernel "
                             "sees packets, not messages).")(f)


def _in_agent_option(f):
    return click.option("--in-agent", is_flag=True,
                        help="In --netns mode, apply it in the agents' transport wrapper instead of the kernel "
                             "(for what the kernel cannot do: --types, reorder, delay without netem).")(f)


def _csv(text: str | None) -> list[str] | None:
    return None if text is None else [x for x in (t.strip() for t in text.split(",")) if x]


# Numbers may be negative on the command line so that `dvs fault delay -3` is a range error,
# not an unknown option `-3`.
_NUMERIC = {"ignore_unknown_options": True}


def _add_fault(state_dir: str, kind: str, params: dict, only, from_, types, in_agent: bool) -> None:
    from testbed import nemesis, schedule

    cluster = Cluster.load(state_dir)
    tf = schedule.from_verb(kind, _csv(only) or (), **params, **{"from": _csv(from_), "types": _csv(types)})
    rec = nemesis.apply(cluster, tf, in_agent=in_agent)
    r = rec["rule"]
    where = {"kernel": "kernel rules", "agent": "agent wrapper"}[rec["boundary"]]
    if rec["why_agent"]:
        where += f" ({rec['why_agent']})"
    click.echo(f"{rec['id']} {kind} {nemesis.describe(rec)} on {','.join(rec['hosts'])} "
               f"from {','.join(r['from']) if r['from'] else 'everyone'}, "
               f"types {','.join(r['types']) if r['types'] else 'all'}: {where}")
    for old in rec["replaced"]:
        click.echo(f"  replaced {old['id']} ({kind} {nemesis.describe({'kind': kind, 'rule': old['rule']})}) "
                   f"on {','.join(old['hosts'])}: same kind, peers and types")


@cli.group()
def fault() -> None:
    """Inject faults into a running cluster. Network faults act on what each host receives: as kernel
    rules in --netns mode (nftables, netem where the kernel has it), else in each agent's transport
    wrapper. Each network fault is an independent rule with an id (f1, f2, ...); `dvs fault show`
    lists them."""


@fault.command("partition")
@click.argument("groups", nargs=-1, required=True)
@click.option("--rest", default=None, metavar="group|isolated|N",
              help="Where hosts named in no group go: one more group, each alone, or into group N. "
                   "Required when some host is in no group.")
@state_dir_option
def fault_partition(groups, rest, state_dir) -> None:
    """Split hosts into groups that cannot talk: `dvs fault partition h1,h2 h3,h4`.
    Put `controller` in a group to cut it off from the others. Replaces the partition in force."""
    from testbed import nemesis

    cluster = Cluster.load(state_dir)
    if rest is not None and rest not in nemesis.REST:
        if not rest.isdigit():
            raise click.BadParameter("expected group, isolated or a group number", param_hint="--rest")
        rest = int(rest)
    from testbed import schedule

    label = " | ".join(groups) + (f" (rest: {rest})" if rest is not None else "")
    nemesis.apply(cluster, schedule.from_verb("partition", label=label, groups=[_csv(g) for g in groups], rest=rest))
    click.echo(f"partitioned: {label}")


@fault.command("isolate")
@click.argument("kind", type=click.Choice(["host", "halves", "majority", "bridge", "controller"]))
@click.argument("host", required=False)
@state_dir_option
def fault_isolate(kind, host, state_dir) -> None:
    """Named partitions: `isolate host h3`, `isolate halves`, `isolate majority` (minority cut off),
    `isolate bridge` (two halves joined only through the middle host), `isolate controller`."""
    from testbed import nemesis

    cluster = Cluster.load(state_dir)
    from testbed import schedule

    blocked = nemesis.named_partition("isolate" if kind == "host" else kind, list(cluster.agents), host)
    nemesis.apply(cluster, schedule.from_verb("partition", label=f"isolate {kind}{' ' + host if host else ''}",
                                              blocked={h: sorted(b) for h, b in blocked.items()}))
    cut = {h: sorted(b) for h, b in blocked.items() if b}
    click.echo(f"partition {kind}{' ' + host if host else ''}: {len(cut)} host(s) cut off from some peers")


@fault.command("heal")
@click.argument("ids", nargs=-1)
@state_dir_option
def fault_heal(ids, state_dir) -> None:
    """Remove every network fault (kernel rules, partitions, agent wrapper faults), or only the
    faults IDS (e.g. `dvs fault heal f2`)."""
    from testbed import nemesis, schedule

    cluster = Cluster.load(state_dir)
    nemesis.apply(cluster, schedule.from_verb("heal", ids=list(ids)))
    click.echo(f"healed {', '.join(ids)}" if ids else f"healed every network fault on {len(cluster.agents)} host(s)")


@fault.command("loss", context_settings=_NUMERIC)
@click.argument("probability", type=click.FloatRange(0, 1))
@_types_option
@_hosts_option
@_peers_option
@_in_agent_option
@state_dir_option
def fault_loss(probability, types, only, from_, in_agent, state_dir) -> None:
    """Drop received packets (frames, in the agent wrapper) with this probability."""
    _add_fault(state_dir, "loss", {"p": probability}, only, from_, types, in_agent)


@fault.command("delay", context_settings=_NUMERIC)
@click.argument("ms", type=click.FloatRange(0, 60_000))
@click.option("--jitter", "jitter_ms", type=click.FloatRange(0, 60_000), default=0.0, show_default=True,
              help="Plus a uniform random 0..JITTER ms.")
@_types_option
@_hosts_option
@_peers_option
@_in_agent_option
@state_dir_option
def fault_delay(ms, jitter_ms, types, only, from_, in_agent, state_dir) -> None:
    """Delay received packets by MS milliseconds (plus jitter)."""
    _add_fault(state_dir, "delay", {"delay_ms": ms, "jitter_ms": jitter_ms}, only, from_, types, in_agent)


@fault.command("dup", context_settings=_NUMERIC)
@click.argument("probability", type=click.FloatRange(0, 1))
@_types_option
@_hosts_option
@_peers_option
@_in_agent_option
@state_dir_option
def fault_dup(probability, types, only, from_, in_agent, state_dir) -> None:
    """Deliver received packets twice with this probability."""
    _add_fault(state_dir, "dup", {"p": probability}, only, from_, types, in_agent)


@fault.command("reorder", context_settings=_NUMERIC)
@click.argument("probability", type=click.FloatRange(0, 1))
@_types_option
@_hosts_option
@_peers_option
@_in_agent_option
@state_dir_option
def fault_reorder(probability, types, only, from_, in_agent, state_dir) -> None:
    """Hold back received frames with this probability so later ones overtake them (agent wrapper)."""
    _add_fault(state_dir, "reorder", {"p": probability}, only, from_, types, in_agent)


def _process_fault(name: str, action: str, state_dir: str) -> None:
    from testbed import nemesis, schedule

    cluster = Cluster.load(state_dir)
    tf = schedule.from_verb(action, [name])  # (the one fault type: `ctl` is the controller too)
    p = nemesis.apply(cluster, tf)
    click.echo(f"{action}: {tf.targets[0]} (pid {p.pid})")


for _action, _doc in (("kill", "SIGKILL a host's agent, or the controller."),
                      ("pause", "SIGSTOP a host's agent or the controller (resume with `dvs fault resume`)."),
                      ("resume", "SIGCONT a paused agent or controller."),
                      ("restart", "Kill (if running) and start again: an agent rejoins with a new incarnation.")):
    def _make(action=_action):
        @click.argument("name")
        @state_dir_option
        def command(name, state_dir) -> None:
            _process_fault(name, action, state_dir)
        return command
    fault.command(_action, help=_doc + " NAME is h1..hN or `controller`.")(_make())


@fault.command("show")
@json_option
@state_dir_option
def fault_show(as_json, state_dir) -> None:
    """The network faults in force: every parameter, the boundary that enforces each, which fault a
    newer one replaced; then per host the kernel rules in force (with their packet counters) and
    the agent wrapper's faults (with what they did so far)."""
    from testbed import nemesis

    cluster = Cluster.load(state_dir)
    shown = nemesis.show(cluster)
    if as_json:
        emit_json(shown)
        return
    click.echo(f"boundary: {shown['boundary']}")
    t = Table("fault", "kind", "settings", "hosts", "from", "types", "boundary", "note", title="faults in force")
    for f in shown["faults"]:
        r = f.get("rule", {})
        notes = [f"replaced {o['id']} on {','.join(o['hosts'])}" for o in f["replaced"]]
        if f.get("why_agent"):
            notes.append(f["why_agent"])
        if f.get("missing"):
            notes.append(f"NOT in force on {','.join(f['missing'])} (restarted since?)")
        t.add_row(f["id"], f["kind"], nemesis.describe(f), ",".join(f["hosts"]) or "-",
                  ",".join(r.get("from") or []) or ("-" if f["kind"] == "partition" else "everyone"),
                  ",".join(r.get("types") or []) or ("-" if f["kind"] == "partition" else "all"),
                  f["boundary"], "; ".join(notes) or "-")
    console.print(t)
    if cluster.netns is not None:
        k = Table("host", "where", "kernel rule", "packets", title="kernel rules in force")
        for h, e in shown["hosts"].items():
            for r in e["kernel"]:
                k.add_row(h, r["where"], r["rule"], "-" if r["packets"] is None else str(r["packets"]))
        for r in shown["bridge"]:
            k.add_row("(bridge)", r["where"], r["rule"], "-" if r["packets"] is None else str(r["packets"]))
        console.print(k)
    a = Table("host", "rules", "blocked", "dropped", "delayed", "duplicated", title="agent wrapper")
    for h, e in shown["hosts"].items():
        ag = e["agent"] or {}
        if "error" in ag:
            a.add_row(h, ag["error"], "", "", "", "")
            continue
        rules = ", ".join(f"{r['id']} {r['kind']} ({r['hits']} frames)" for r in ag.get("rules", [])) or "-"
        a.add_row(h, rules, ",".join(ag.get("blocked", [])) or "-", str(ag.get("dropped", 0)),
                  str(ag.get("delayed", 0)), str(ag.get("duplicated", 0)))
    console.print(a)


# ---------------------------------------------------------------------- VMs


@cli.group()
def vm() -> None:
    """Create, list, move and delete VMs."""


@vm.command("list")
@click.option("--all", "include_deleted", is_flag=True, help="Include deleted VMs.")
@json_option
@state_dir_option
def vm_list(include_deleted, as_json, state_dir) -> None:
    """VMs in the controller's inventory (in --netns mode with each VM's IPv4 address)."""
    cluster = Cluster.load(state_dir)
    with cluster.controller_client() as ctl:
        vms = ctl.call("vm_list", {"all": include_deleted})["vms"]
    if cluster.netns is not None:
        from testbed.vmns import vm_address

        for v in vms:
            v["address"] = vm_address(v["vlan"], v["mac"])
    if as_json:
        emit_json(vms)
        return
    cols = ["vm", "mac", "vlan", "profile", "host", "port", "seq", "state"]
    t = Table(*cols, *(["address"] if cluster.netns is not None else []))
    for v in vms:
        t.add_row(*(str(v[c]) for c in cols), *([v["address"] or "-"] if cluster.netns is not None else []))
    console.print(t)


@vm.command("exec", context_settings={"ignore_unknown_options": True, "allow_interspersed_args": False})
@click.argument("name")
@click.argument("argv", nargs=-1, required=True, type=click.UNPROCESSED)
@state_dir_option
def vm_exec(name, argv, state_dir) -> None:
    """Run a command inside a VM's network namespace (--netns mode), e.g.
    `dvs vm exec vm1 -- ping -c 3 198.18.64.2`; its exit code is dvs's."""
    import subprocess

    from testbed import vmns

    argv = list(argv[1:] if argv and argv[0] == "--" else argv)
    if not argv:
        raise click.UsageError("no command to run; e.g. `dvs vm exec vm1 -- ping -c 3 ADDRESS`")
    cluster = Cluster.load(state_dir)
    if cluster.netns is None:
        raise ClusterError("VMs have network stacks only in --netns mode; start the cluster with "
                           "`dvs up --netns --hosts N --vms M`")
    if not vmns.exists(cluster.netns, name):
        known = ", ".join(vmns.list_namespaces(cluster.netns)[:10]) or "none"
        raise ClusterError(f"no VM namespace for {name!r} (VMs: {known}); see `dvs vm list`")
    try:
        rc = subprocess.call(vmns.exec_argv(cluster.netns, name, argv))
    except OSError as e:
        raise ClusterError(f"cannot run `ip netns exec`: {e.strerror}") from None
    sys.exit(rc)


@vm.command("create")
@click.argument("name")
@click.option("--host", default=None, help="Host to start it on, e.g. h1 (default: the placement scorer picks).")
@click.option("--profile", default="default", show_default=True, help="Port profile (default, web, app, db).")
@json_option
@state_dir_option
def vm_create(name, host, profile, as_json, state_dir) -> None:
    """Create a VM on a host and wait until every agent knows it."""
    cluster = Cluster.load(state_dir)
    with cluster.controller_client(timeout_ms=30_000) as ctl:
        rec = ctl.call("vm_create", {"name": name, "host": host, "profile": profile})
    host = rec["dst"]
    if cluster.netns is not None and rec.get("converged"):
        from testbed import vmns

        vmns.sync(cluster)  # its namespace and TAP
    if as_json:
        emit_json(rec)
    elif rec["converged"]:
        click.echo(f"created {name} on {host}; every agent knows it ({rec['latency_ms']:.2f} ms)")
    else:
        click.echo(error_line("dvs", f"created {name} on {host} but it did not converge: {rec['error']}"), err=True)
        sys.exit(EXIT_INVALID)


def _report_op(rec: dict, as_json: bool, what: str) -> None:
    if as_json:
        emit_json(rec)
        if not rec["converged"]:
            sys.exit(EXIT_INVALID)
    elif rec["converged"]:
        click.echo(f"{what}: converged on every live host in {rec['latency_ms']:.2f} ms (seq {rec['seq']})")
    else:
        click.echo(error_line("dvs", f"{what}: not converged: {rec['error']}"), err=True)
        sys.exit(EXIT_INVALID)


@vm.command("move")
@click.argument("name")
@click.option("--to", "to", required=True, help="Destination host, e.g. h3.")
@json_option
@state_dir_option
def vm_move(name, to, as_json, state_dir) -> None:
    """Live-migrate a VM and print how long until every host knew its new location.

    If the controller does not answer, the move is made agent to agent (headless)."""
    cluster = Cluster.load(state_dir)
    if not controller_answers(cluster):
        from testbed import headless

        err_console.print("controller unreachable: moving headless, agent to agent (EVPN-style seq claim)")
        rec = headless.move(cluster, name, to)
        _report_op(rec, as_json, f"moved {name} {rec['src']} -> {rec['dst']} headless")
        return
    rec = call_retrying(cluster, "vm_move", {"name": name, "to": to})
    _report_op(rec, as_json, f"moved {name} {rec['src']} -> {rec['dst']}")


def call_retrying(cluster: Cluster, method: str, args: dict, retry_s: float = 10.0):
    """Call the controller; an error it marks "retry: " (a restarted controller whose hosts have
    not all registered again) is retried every 200 ms for up to `retry_s`."""
    import time

    from controller.core import RETRY_PREFIX

    deadline = time.monotonic() + retry_s
    with cluster.controller_client(timeout_ms=30_000) as ctl:
        while True:
            try:
                return ctl.call(method, args)
            except ClusterError as e:
                if not str(e).startswith(RETRY_PREFIX) or time.monotonic() >= deadline:
                    raise ClusterError(str(e).removeprefix(RETRY_PREFIX)) from None
            time.sleep(0.2)  # (the controller waits for agents we cannot see: polling, with a deadline)


def controller_answers(cluster: Cluster) -> bool:
    try:
        with cluster.controller_client(timeout_ms=1_500) as ctl:
            ctl.call("status")
        return True
    except ClusterError:
        return False


@vm.command("delete")
@click.argument("name")
@json_option
@state_dir_option
def vm_delete(name, as_json, state_dir) -> None:
    """Delete a VM; its MAC becomes a tombstone on every host."""
    cluster = Cluster.load(state_dir)
    rec = call_retrying(cluster, "vm_delete", {"name": name})
    if cluster.netns is not None and rec.get("converged"):
        from testbed import vmns

        vmns.delete(cluster.netns, name)
    _report_op(rec, as_json, f"deleted {name}")


@vm.group("rule")
def vm_rule() -> None:
    """Placement rules: anti-affinity (never on one host) and together (always on one host)."""


@vm_rule.command("add")
@click.option("--anti", default=None, metavar="VM,VM,...", help="These VMs never share a host.")
@click.option("--together", default=None, metavar="VM,VM,...", help="These VMs always share one host.")
@click.option("--name", default=None, help="The rule's name (default: rule1, rule2, ...).")
@state_dir_option
def vm_rule_add(anti, together, name, state_dir) -> None:
    """Add a rule every placement honours (create, move, HA restart, evacuate, rebalance). It
    must hold already; a placement that cannot satisfy it is an error, never a violation."""
    if (anti is None) == (together is None):
        raise click.UsageError("give exactly one of --anti VM,VM,... or --together VM,VM,...")
    kind, vms = ("anti", _csv(anti)) if anti is not None else ("together", _csv(together))
    with Cluster.load(state_dir).controller_client() as ctl:
        r = ctl.call("rule_add", {"kind": kind, "vms": vms, "name": name})
    click.echo(f"rule {r['rule']}: {', '.join(r['vms'])} " + ("never share a host" if kind == "anti"
                                                                 else "always share one host"))


@vm_rule.command("list")
@json_option
@state_dir_option
def vm_rule_list(as_json, state_dir) -> None:
    """The placement rules, with where each of their VMs runs."""
    with Cluster.load(state_dir).controller_client() as ctl:
        rules = ctl.call("rule_list")["rules"]
    if as_json:
        emit_json(rules)
        return
    t = Table("rule", "kind", "vms (host)")
    for r in rules:
        t.add_row(r["rule"], r["kind"], ", ".join(f"{v} ({r['hosts'][v] or '-'})" for v in r["vms"]))
    console.print(t)


@vm_rule.command("remove")
@click.argument("name")
@state_dir_option
def vm_rule_remove(name, state_dir) -> None:
    """Remove placement rule NAME."""
    with Cluster.load(state_dir).controller_client() as ctl:
        ctl.call("rule_remove", {"name": name})
    click.echo(f"rule {name} removed")


@cli.command()
@click.option("--metric", type=click.Choice(["vms", "traffic"]), default="vms", show_default=True,
              help="Load per host: VM count, or the VMs' frame rate from the data-plane port counters.")
@click.option("--threshold", type=click.FloatRange(0, 1e9), default=None,
              help="Largest tolerated spread (most loaded host minus least loaded): in VMs for vms "
                   "(default 2), as a fraction of the mean host's frame rate for traffic (default 0.25).")
@click.option("--max-concurrent", type=click.IntRange(1, 64), default=4, show_default=True,
              help="Moves at once, at most.")
@click.option("--dry-run", is_flag=True, help="Print the plan, move nothing.")
@click.option("--sample-s", type=click.FloatRange(0.1, 60), default=2, show_default=True,
              help="Seconds over which --metric traffic measures frame rates.")
@click.option("--timeout-s", type=click.FloatRange(1, 3_600), default=600, show_default=True,
              help="Seconds to wait for the moves.")
@json_option
@state_dir_option
def rebalance(metric, threshold, max_concurrent, dry_run, sample_s, timeout_s, as_json, state_dir) -> None:
    """Even out load over the hosts outside maintenance (DRS-like): plan the fewest moves that
    bring the spread below the threshold, honouring placement rules, and run them."""
    from testbed import balance

    rep = balance.rebalance(Cluster.load(state_dir), metric=metric, threshold=threshold,
                            max_concurrent=max_concurrent, dry_run=dry_run, sample_s=sample_s, timeout_s=timeout_s)
    if as_json:
        emit_json(rep)
    else:
        unit = "VMs" if metric == "vms" else "frames/s"
        t = Table("#", "vm", "from", "to", title=f"plan ({metric})")
        for i, m in enumerate(rep["plan"], 1):
            t.add_row(str(i), m["vm"], m["src"], m["dst"])
        if rep["plan"]:
            console.print(t)
        click.echo(f"spread {rep['spread_before']:g} -> {rep['spread_planned']:g} {unit} (limit {rep['limit']:g}) "
                   f"with {len(rep['plan'])} moves" + (" (dry run: nothing moved)" if dry_run else ""))
        if rep["moves"]:
            sm = rep["summary"]
            click.echo(f"{sm['converged']}/{sm['moves']} moves converged; latency ms p50 {_fmt(sm['latency_ms_p50'])} "
                       f"p99 {_fmt(sm['latency_ms_p99'])} max {_fmt(sm['latency_ms_max'])}")
        for sk in rep["skipped"]:
            click.echo(f"skipped {sk['vm']} {sk['src']} -> {sk['dst']}: {sk['why']}")
    if rep["summary"]["converged"] < rep["summary"]["moves"] or rep["skipped"]:
        sys.exit(1)


MOVES_DEFAULT_LAST = 1_000


@cli.command()
@click.option("--last", "last", type=click.IntRange(1, 10_000_000), default=None,
              help=f"Show the last N finished moves and HA restarts [default: {MOVES_DEFAULT_LAST:,}].")
@click.option("--all", "show_all", is_flag=True,
              help="Show every one the controller keeps (its history_max, default 100,000).")
@json_option
@state_dir_option
def moves(last, show_all, as_json, state_dir) -> None:
    """Finished moves and HA restarts (kind "ha": a dead host's VM started elsewhere), oldest
    first, with their convergence latency. A notice on stderr says when the list is capped."""
    if last is not None and show_all:
        raise click.UsageError("give --last N or --all, not both")
    with Cluster.load(state_dir).controller_client() as ctl:
        kept = ctl.call("status")["moves_done"]
        n = kept if show_all else (last or MOVES_DEFAULT_LAST)
        recs = ctl.call("moves", {"last": max(n, 1)})["moves"] if kept else []
    if len(recs) < kept:
        err_console.print(f"showing the last {len(recs):,} of {kept:,} moves and HA restarts; "
                          f"--last N or --all for more", highlight=False)
    if as_json:
        emit_json(recs)
        return
    from testbed.demo import moves_table

    console.print(moves_table(recs, first=kept - len(recs) + 1))


# ---------------------------------------------------------------------- events


@cli.command()
@click.option("--follow", "-f", is_flag=True, help="Keep printing events as they are written, until Ctrl-C.")
@click.option("--host", "hosts", multiple=True, metavar="H",
              help="Only process H's events and others' events about H (host, src, dst or peer H); repeatable. "
                   "`controller` is the controller's.")
@click.option("--kind", "kinds", multiple=True, metavar="K",
              help="Only kind K or the kinds under it (`move` = move.started, move.converged, ...); repeatable.")
@click.option("--since", default=None, metavar="WHEN",
              help="Only events since WHEN: a duration back from now (30s, 5m, 2h, 1d) or a time "
                   "(2026-12-03T17:05:00Z).")
@click.option("--json", "as_json", is_flag=True, help="One JSON object per line (as written), not a table.")
@state_dir_option
def events(follow, hosts, kinds, since, as_json, state_dir) -> None:
    """What every process did, merged in time order: moves started, switched, converged or
    failed; hosts suspect, dead, readmitted; HA restarts and where they went; membership epochs;
    repairs; faults; frames dropped. From STATE_DIR/events/*.jsonl (one file per process; kept
    after `dvs down`, cleared by the next `dvs up`)."""
    from testbed import events as evlog

    try:
        since_ns = evlog.parse_since(since) if since is not None else None
    except ValueError as e:
        raise click.UsageError(str(e)) from None
    keep = evlog.Filter(hosts=[h for arg in hosts for h in arg.split(",") if h],
                        kinds=[k for arg in kinds for k in arg.split(",") if k], since_ns=since_ns)
    def show(evs: list[dict], table: bool) -> None:
        evs = [e for e in evs if keep(e)]
        if as_json:
            for e in evs:
                click.echo(json.dumps(e, separators=(",", ":")))
            sys.stdout.flush()
            return
        if table:
            t = Table("time", "proc", "kind", "details", box=None, pad_edge=False)
            for e in evs:
                t.add_row(evlog.clock_of(e), str(e.get("proc", "?")), e["kind"], evlog.details(e))
            console.print(t, highlight=False)
            return
        for e in evs:
            console.print(f"{evlog.clock_of(e)}  {e.get('proc', '?'):<10} {e['kind']:<18} {evlog.details(e)}",
                          highlight=False, markup=False, soft_wrap=True)

    if follow:
        evlog.follow(state_dir, lambda evs: show(evs, table=False))  # until Ctrl-C / SIGTERM
        return
    if not evlog.files(state_dir):
        raise ClusterError(f"no events in {evlog.events_dir(state_dir)}; start a cluster with `dvs up` "
                           "(or give its --state-dir)")
    evs, bad = evlog.read_all(state_dir)
    show(evs, table=True)
    if bad:
        err_console.print(f"{bad} line(s) were not events (a torn last line of a killed process?); skipped",
                          highlight=False)


# ---------------------------------------------------------------------- data plane traffic


@cli.command()
@click.option("--pairs", type=click.IntRange(1, 10_000), required=True, help="VM pairs exchanging frames.")
@click.option("--rate", type=click.FloatRange(0.1, 100_000), default=200, show_default=True,
              help="Frames per second per pair (half each way).")
@click.option("--duration", "duration_s", type=click.FloatRange(0.1, 3_600), default=10, show_default=True,
              help="Seconds of sending.")
@click.option("--moves", "n_moves", type=click.IntRange(0, 10_000), default=0, show_default=True,
              help="Paired VMs to move (one after another, evenly spread) while the traffic runs.")
@click.option("--seed", type=int, default=1, show_default=True, help="Seed for which VMs move where.")
@click.option("--tool", type=click.Choice(["ping", "iperf3"]), default=None,
              help="--netns mode: real ping (-i 1/RATE) or iperf3 TCP between the VMs' namespaces instead of "
                   "frames from this process; figures come from the tool's output.")
@click.option("--bitrate", default=None, help="--tool iperf3: target bitrate per session (iperf3 -b, e.g. 20M); "
                                                "default unlimited.")
@json_option
@state_dir_option
def traffic(pairs, rate, duration_s, n_moves, seed, tool, bitrate, as_json, state_dir) -> None:
    """Send sequence-numbered frames between VM pairs across hosts (this process plays the VMs)
    and count delivered, lost, duplicated and misdelivered frames; per move, frames lost and the
    data-plane blackout. With --tool, real ping or iperf3 run inside the VMs (--netns mode)."""
    from testbed.traffic import run_traffic

    cluster = Cluster.load(state_dir)
    if tool is not None:
        _tool_traffic(cluster, tool, pairs, rate, duration_s, n_moves, seed, bitrate, as_json)
        return
    if cluster.netns is not None:
        raise ClusterError("in --netns mode the VMs are namespaces with real stacks: use --tool ping or --tool iperf3")
    with err_console.status(f"{pairs} pairs at {rate:g} frames/s for {duration_s:g} s"
                            + (f", {n_moves} moves" if n_moves else "")):
        rep = run_traffic(cluster, pairs=pairs, rate=rate, duration_s=duration_s, moves=n_moves, seed=seed)
    if as_json:
        emit_json(rep)
    else:
        f = rep["frames"]
        if rep["moves"]:
            t = Table("#", "vm", "from", "to", "converged", "latency ms", "frames", "lost", "misdelivered",
                      "via old host", "blackout ms", title="moves during traffic")
            for i, m in enumerate(rep["moves"], 1):
                t.add_row(str(i), m["vm"], m["src"], m["dst"], "yes" if m["converged"] else "[red]no[/red]",
                          _fmt(m["latency_ms"]), _fmt(m["frames"]), _fmt(m["lost"]), _fmt(m["misdelivered"]),
                          _fmt(m["via_old_host"]), _fmt(m["blackout_ms"]))
            console.print(t)
        d = rep["delay_ms"]
        console.print(f"sent {f['sent']}, delivered {f['delivered']}, lost {f['lost']}, duplicated "
                      f"{f['duplicated']}, misdelivered {f['misdelivered']}; one-way delay ms p50 "
                      f"{_fmt(d['p50'])} p99 {_fmt(d['p99'])} max {_fmt(d['max'])}")
    ok = rep["accounted"] and all(m["converged"] for m in rep["moves"])
    sys.exit(EXIT_OK if ok else EXIT_INVALID)


def _tool_traffic(cluster, tool, pairs, rate, duration_s, n_moves, seed, bitrate, as_json) -> None:
    from testbed.tooltraffic import run_tool_traffic

    with err_console.status(f"{tool} between {pairs} VM pairs for {duration_s:g} s"
                            + (f", {n_moves} moves" if n_moves else "")):
        rep = run_tool_traffic(cluster, tool=tool, pairs=pairs, rate=rate, duration_s=duration_s, moves=n_moves,
                               seed=seed, bitrate=bitrate)
    s = rep["moves_summary"]
    if as_json:
        emit_json(rep)
    elif tool == "ping":
        if rep["moves"]:
            t = Table("#", "vm", "from", "to", "converged", "latency ms", "pair", "pings", "lost", "longest gap ms",
                      "ping pacing ms", title="moves during ping")
            for i, m in enumerate(rep["moves"], 1):
                t.add_row(str(i), m["vm"], m["src"], m["dst"], "yes" if m["converged"] else "[red]no[/red]",
                          _fmt(m["latency_ms"]), _fmt(m["pair"]), _fmt(m["pings"]), _fmt(m["lost"]),
                          _fmt(m["gap_ms_max"]), _fmt(m["send_gap_ms_max"]))
            console.print(t)
        console.print(f"ping: {s['transmitted']} sent, {s['lost_total']} lost in all; per move: {s['pings_lost']} "
                      f"lost, longest gap ms p50 {_fmt(s['gap_ms_p50'])} p99 {_fmt(s['gap_ms_p99'])} max "
                      f"{_fmt(s['gap_ms_max'])} (ping's own pacing p99 {_fmt(s['send_gap_ms_p99'])}; longest gap "
                      f"in windows without a move p99 {_fmt(s['no_move_gap_ms_p99'])})")
    else:
        if rep["moves"]:
            t = Table("#", "vm", "from", "to", "converged", "pair", "session survived", "Mbit/s window",
                      "Mbit/s median", "dip %", "worst 100 ms", title="moves during iperf3")
            for i, m in enumerate(rep["moves"], 1):
                t.add_row(str(i), m["vm"], m["src"], m["dst"], "yes" if m["converged"] else "[red]no[/red]",
                          _fmt(m["pair"]), {True: "yes", False: "[red]no[/red]"}.get(m["survived"], "-"),
                          _fmt(m["mbps_window"]), _fmt(m["mbps_median"]),
                          _fmt(m["dip_pct"]), _fmt(m["mbps_min"]))
            console.print(t)
        for x in rep["sessions"]:
            console.print(f"{x['a']} -> {x['b']}: {'survived' if x['survived'] else '[red]failed[/red]'}, "
                          f"{_fmt(x['mbps'])} Mbit/s, {_fmt(x['retransmits'])} retransmits"
                          + (f" ({x['error']})" if x["error"] else ""))
    converged = all(m["converged"] for m in rep["moves"])
    ok = converged and (s["complete"] if tool == "ping" else s["sessions_survived"] == s["sessions"])
    sys.exit(0 if ok else 1)


def _fmt(v) -> str:
    return "-" if v is None else (f"{v:.2f}" if isinstance(v, float) else str(v))


# ---------------------------------------------------------------------- demo


@cli.command()
@click.option("--hosts", type=click.IntRange(2, 256), default=8, show_default=True)
@click.option("--vms", type=click.IntRange(1, 100_000), default=64, show_default=True)
@click.option("--moves", "n_moves", type=click.IntRange(0, 100_000), default=20, show_default=True)
@click.option("--seed", type=int, default=1, show_default=True, help="Seed for which VMs move where.")
@click.option("--heartbeat-interval-ms", type=click.IntRange(10, 60_000), default=None)
@click.option("--pairs", type=click.IntRange(0, 10_000), default=32, show_default=True,
              help="VM pairs exchanging frames during the moves (0: no traffic); the moved VMs are among them.")
@click.option("--rate", type=click.FloatRange(0.1, 100_000), default=200, show_default=True,
              help="Frames per second per pair (half each way).")
@json_option
@click.option("--state-dir", default=None, help="State dir for the demo cluster (default: a new temp dir).")
def demo(hosts, vms, n_moves, seed, heartbeat_interval_ms, pairs, rate, as_json, state_dir) -> None:
    """Start a cluster, create VMs, run traffic between VM pairs, move random paired VMs one after
    another, report latency and frames lost per move, stop."""
    from testbed.demo import run_demo

    owned_by_this_process()  # its cluster dies with this process, even after a SIGKILL
    ok = run_demo(hosts=hosts, vms=vms, n_moves=n_moves, seed=seed, as_json=as_json, state_dir=state_dir,
                  agent_args=agent_flags(heartbeat_interval_ms), console=console, err_console=err_console,
                  pairs=pairs, rate=rate)
    sys.exit(EXIT_OK if ok else EXIT_INVALID)


# ---------------------------------------------------------------------- keys (CURVE; testbed/rotate.py)


@cli.group()
def keys() -> None:
    """The cluster's CURVE keys: list their fingerprints, rotate them live."""


def _secure_cluster(state_dir) -> Cluster:
    cluster = Cluster.load(state_dir)
    if cluster.keys_dir is None:
        raise ClusterError("this cluster runs without CURVE (`dvs up --insecure`); it has no keys")
    return cluster


@keys.command("show")
@json_option
@state_dir_option
def keys_show(as_json, state_dir) -> None:
    """Every key the cluster accepts: whose, its role, in use or being rotated, its fingerprint."""
    from testbed import rotate

    rows = rotate.show(_secure_cluster(state_dir).keys_dir)
    if as_json:
        emit_json({"keys": rows})
        return
    t = Table("name", "role", "stage", "fingerprint (SHA-256, 16 hex)", "file")
    for r in rows:
        t.add_row(r["name"], r["role"], r["stage"], r["fingerprint"], r["file"])
    console.print(t)


@keys.command("rotate")
@click.option("--host", "hosts", multiple=True, metavar="H",
              help="Rotate this host's key (repeatable). Default: every host's, then the admin's.")
@click.option("--admin", "admin_only", is_flag=True, help="Rotate only the admin key (the one `dvs` speaks with).")
@click.option("--controller", "controller_only", is_flag=True,
              help="Rotate only the controller's key: the controller restarts on it (from its journal) and "
                   "every agent renews its control connection; the API pauses for about a restart.")
@json_option
@state_dir_option
def keys_rotate(hosts, admin_only, controller_only, as_json, state_dir) -> None:
    """Install a new key pair, switch to it, retire the old one; the cluster keeps running."""
    from testbed import rotate

    if admin_only and controller_only:
        raise click.UsageError("--admin and --controller: give one (or neither, for every host's and the admin's)")
    cluster = _secure_cluster(state_dir)
    names = ["admin"] if admin_only else ["controller"] if controller_only else \
        list(hosts) or [*cluster.agents, "admin"]
    done = []
    for name in names:
        with err_console.status(f"rotating the key of {name}"):
            done.append(rotate.rotate(cluster, name, log=lambda m: err_console.print(m, highlight=False)))
    if as_json:
        emit_json({"rotated": done})
        return
    for d in done:
        console.print(f"{d['name']}: {d['old']} -> {d['new']}", highlight=False)


# ---------------------------------------------------------------------- lab commands in their own packages

from testbed.bench.command import bench  # noqa: E402 - registered after the core commands
from testbed.chaos.command import chaos  # noqa: E402
from testbed.sim import command as sim_command  # noqa: E402
from testbed.sim.command import sim  # noqa: E402

cli.add_command(bench)
cli.add_command(chaos)
cli.add_command(sim)


# ---------------------------------------------------------------------- entry point


class Stopped(KeyboardInterrupt):
    """SIGTERM or SIGHUP: unwinds like Ctrl-C, so every `finally` stops what it started."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


def _stop_on_signals() -> None:
    """SIGTERM and SIGHUP stop a command as SIGINT does (CI runners, `timeout`, a closed terminal).
    Only the first: a second one must not cut short the teardown the first one started."""
    def handler(signum, _frame):
        for sig in (signal.SIGTERM, signal.SIGHUP):
            signal.signal(sig, signal.SIG_IGN)
        raise Stopped(signum)

    for sig in (signal.SIGTERM, signal.SIGHUP):
        if signal.getsignal(sig) is signal.SIG_DFL:
            signal.signal(sig, handler)


def main(argv: list[str] | None = None) -> int:
    """Run `dvs`: errors the user can act on print as one line, never a traceback."""
    if threading.current_thread() is not threading.main_thread():
        return _main(argv)
    saved = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGHUP)}
    _stop_on_signals()
    try:
        return _main(argv)
    finally:
        for sig, old in saved.items():  # a caller in the same process (a test) gets its own back
            signal.signal(sig, old)


def _main(argv: list[str] | None) -> int:
    sim_command.finished_exit_code = None  # (set by this run's `dvs sim` only)
    try:
        cli.main(args=argv, prog_name="dvs", standalone_mode=False)
    except SystemExit:
        if sim_command.finished_exit_code is not None:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(sim_command.finished_exit_code)  # the OS takes the simulation's memory back at once
        raise
    except click.exceptions.Exit as e:
        return e.exit_code
    except click.exceptions.Abort as e:
        if isinstance(e.__cause__, Stopped):  # click turns the KeyboardInterrupt into Abort
            click.echo(f"dvs: stopped by {signal.Signals(e.__cause__.signum).name}", err=True)
            return 128 + e.__cause__.signum
        click.echo("dvs: interrupted", err=True)
        return 130
    except click.UsageError as e:
        hint = f"; see `{e.ctx.command_path} --help`" if e.ctx else ""
        click.echo(error_line("dvs", f"{e.format_message()}{hint}"), err=True)
        return EXIT_USAGE
    except click.ClickException as e:
        click.echo(error_line("dvs", e.format_message()), err=True)
        return e.exit_code
    except ClusterError as e:
        click.echo(error_line("dvs", str(e)), err=True)
        return EXIT_ERROR
    except Stopped as e:
        click.echo(f"dvs: stopped by {signal.Signals(e.signum).name}", err=True)
        return 128 + e.signum
    except KeyboardInterrupt:
        click.echo("dvs: interrupted", err=True)
        return 130
    except OSError as e:
        # Whatever the commands did not turn into a sentence themselves: still one line.
        where = f" ({e.filename})" if e.filename else ""
        click.echo(error_line("dvs", f"{e.strerror or e}{where}; check the path and its permissions"), err=True)
        return EXIT_ERROR
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
