"""The measured phases of `dvs bench`, on real local clusters.

For each N in --hosts: the floor (raw pyzmq fan-out to N-1 subscriber processes, with no
cluster running), the etcd baseline (one etcd, N watcher processes; skipped with a note where
etcd or its client is absent), then a cluster of N agents with --vms VMs and --moves moves one after
another. On the same cluster: at the largest N a profile of where a move's CPU goes and HA
(SIGKILL of a host holding --ha-vms VMs); at 32 hosts if measured (the goals' size), else at the
largest, an open-loop load curve over --rates. Last, a fresh cluster for the cold start
(--cold-ports ports created in one batch, on 32 hosts or the largest by default).
Only when --phases names it: balance, a fresh cluster of the largest N where --balance-vms VMs
are evacuated off h1, then piled on 4 hosts by moves and rebalanced.

Every cluster lives in a temp state dir under --out and is stopped in a `finally` by pid
(Cluster.down); every pid started is recorded in `pids` so a caller can prove none is left.
"""

from __future__ import annotations

import contextlib
import math
import os
import random
import shutil
import signal
import tempfile
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import msgpack
import psutil
import zmq
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from agent import wire
from agent.mactable import parse_mac
from agent.wire import MsgType
from controller.config import ControllerConfig
from testbed import procs
from testbed.bench import etcd, perfdso
from testbed.bench.floor import run_floor
from testbed.bench.stats import dist, mean, ratio, ratios
from testbed.check import check as settled_check
from testbed.check import check_once
from testbed.client import ClusterError
from testbed.cluster import Cluster

PHASES = ("floor", "etcd", "moves", "profile", "load", "ha", "cold", "curve")
# Phases run only when --phases names them (they add a cluster start and mass moves to a run).
EXTRA_PHASES = ("balance",)
ALL_PHASES = PHASES + EXTRA_PHASES
LOAD_P99_GOAL_MS = 50.0
PROFILE_MOVES = 100  # phase profile: moves profiled (at most --moves)
PROFILE_TOP = 25  # ...and functions listed per process
NS = 1_000_000_000
MB = 1024 * 1024


@dataclass
class Params:
    hosts: list[int]
    vms: int
    moves: int
    rates: list[float]
    quick: bool = False
    seed: int = 1
    step_s: float = 3.0  # offered load per rate, in s (at least `load_min_moves` moves)
    load_min_moves: int = 50
    load_max_inflight: int = 1000
    floor_msgs: int = 1000
    floor_rate: float = 200.0
    cold_hosts: int = 32
    cold_ports: int = 8000
    ha_vms: int = 40
    balance_vms: int = 40  # VMs on the evacuated host, then piled on `balance_skew_hosts` hosts
    balance_skew_hosts: int = 4  # hosts holding every VM before the rebalance
    balance_max_concurrent: int = 4  # moves at once, for both evacuate and rebalance
    idle_s: float = 2.0
    phases: tuple[str, ...] = PHASES
    insecure: bool = False  # every cluster without CURVE (`dvs bench --insecure`; phase curve runs both)
    curve_rounds: int = 2  # phase curve: rounds of (CURVE, no CURVE) clusters, in alternating order
    out: Path = field(default_factory=lambda: Path("bench-results"))
    keep_state: bool = False


GOAL_HOSTS = 32  # the size the throughput and cold-start goals are stated at


def goal_hosts(hosts: list[int]) -> int:
    """Where the load curve and the cold start run: at the goals' size if it is measured, else
    at the largest (so `--hosts 8,32,64` judges 300 moves/s at 32 hosts, as the goal says)."""
    return GOAL_HOSTS if GOAL_HOSTS in hosts else max(hosts)


def ms(later: int | None, earlier: int | None) -> float | None:
    """Milliseconds between two monotonic-ns stamps (None if either is missing)."""
    return (later - earlier) / 1e6 if later is not None and earlier is not None else None


def vm_hwm_bytes(pid: int) -> int | None:
    """Peak resident set size of a live process (Linux VmHWM), in bytes."""
    try:
        with open(f"/proc/{pid}/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


class Bench:
    def __init__(self, params: Params, console: Console) -> None:
        self.p = params
        self.console = console
        self.rng = random.Random(params.seed)
        self.pids: list[int] = []  # every process started, for the caller to prove none is left
        self._ps: dict[int, psutil.Process] = {}
        self.progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                 TimeElapsedColumn(), console=console, transient=False)
        self.log_dir = params.out / "logs"
        self.ctl_config = ControllerConfig()

    # ------------------------------------------------------------------ plumbing

    @contextlib.contextmanager
    def step(self, desc: str, total: int | None = None) -> Iterator:
        task = self.progress.add_task(desc, total=total)
        t0 = time.monotonic()
        try:
            yield lambda n=1: self.progress.advance(task, n)
        finally:
            done = total if total is not None else 1
            self.progress.update(task, total=done, completed=done,
                                 description=f"{desc} [dim]({time.monotonic() - t0:.1f} s)[/dim]")

    @contextlib.contextmanager
    def cluster(self, hosts: int, label: str, *, insecure: bool | None = None) -> Iterator[Cluster]:
        sdir = Path(tempfile.mkdtemp(prefix=f"cluster-{label.replace(' ', '-').replace('/', 'of')}-", dir=self.p.out))
        c = None
        ok = False
        insecure = self.p.insecure if insecure is None else insecure
        try:
            with self.step(f"{label}: starting the controller and {hosts} agents"):
                c = Cluster.up(sdir, hosts, ready_timeout_s=120, insecure=insecure)
            for pid in [c.controller.pid] + [a.pid for a in c.agents.values()]:
                self.track(pid)
            yield c
            ok = True
        finally:
            if c is not None:
                c.down()
            if ok and not self.p.keep_state:
                shutil.rmtree(sdir, ignore_errors=True)
            elif not ok:
                self.console.print(f"[yellow]logs of the failed cluster kept in {sdir / 'logs'}[/yellow]")

    def track(self, pid: int) -> None:
        self.pids.append(pid)
        with contextlib.suppress(psutil.Error):
            self.proc(pid)  # remembers its start time: `leftover` never mistakes a reused pid

    def leftover(self) -> list[int]:
        """Pids we started that still run (none, unless something went wrong)."""
        left = []
        for pid in self.pids:
            p = self._ps.get(pid)
            try:
                if p is not None and p.is_running() and p.status() != psutil.STATUS_ZOMBIE:
                    left.append(pid)
            except psutil.Error:
                pass
        return left

    def proc(self, pid: int) -> psutil.Process:
        p = self._ps.get(pid)
        if p is None:
            p = self._ps[pid] = psutil.Process(pid)
        return p

    def cpu_s(self, pid: int) -> float | None:
        """CPU time of the process, all threads (libzmq's I/O thread too), in s. Linux schedstat
        counts in ns; psutil's user+system (10 ms ticks) elsewhere."""
        try:
            total = 0
            for tid in os.listdir(f"/proc/{pid}/task"):
                with open(f"/proc/{pid}/task/{tid}/schedstat", encoding="ascii") as f:
                    total += int(f.read().split()[0])
            return total / NS
        except (OSError, ValueError, IndexError):
            pass
        try:
            t = self.proc(pid).cpu_times()
            return t.user + t.system
        except psutil.Error:
            return None

    def sample(self, c: Cluster, *, with_status: bool = True) -> dict:
        """CPU and memory of every process, the agents' counters, loopback traffic: one snapshot."""
        t_ns = time.monotonic_ns()
        agents: dict[str, dict] = {}
        for host, proc in c.agents.items():
            if not procs.alive(proc):
                continue
            try:
                mem = self.proc(proc.pid).memory_info().rss
            except psutil.Error:
                continue
            agents[host] = {"pid": proc.pid, "cpu_s": self.cpu_s(proc.pid), "rss": mem, "hwm": vm_hwm_bytes(proc.pid)}
        lo = psutil.net_io_counters(pernic=True).get("lo")
        s = {"t_ns": t_ns, "agents": agents, "controller_cpu_s": self.cpu_s(c.controller.pid),
             "controller_rss": self.proc(c.controller.pid).memory_info().rss,
             "lo_bytes": lo.bytes_sent if lo else None, "lo_packets": lo.packets_sent if lo else None}
        if with_status:
            for host, a in agents.items():
                try:
                    with c.agent_client(host, timeout_ms=10_000) as cl:
                        st = cl.call("status")
                except ClusterError:
                    continue
                a.update(stats=st["stats"], mac_entries=st["mac_entries"], incarnation=st["incarnation"],
                         originated=st["updates_originated"], gossip_interval_ms=st["gossip_interval_ms"])
        return s

    @staticmethod
    def stat_delta(a: dict, b: dict, key: str) -> int:
        return sum(b["agents"][h]["stats"][key] - a["agents"][h]["stats"][key]
                   for h in a["agents"] if h in b["agents"] and "stats" in a["agents"][h] and "stats" in b["agents"][h])

    @staticmethod
    def cpu_delta(a: dict, b: dict) -> dict[str, float]:
        return {h: b["agents"][h]["cpu_s"] - a["agents"][h]["cpu_s"] for h in a["agents"] if h in b["agents"]}

    def vm_list(self, c: Cluster) -> list[dict]:
        with c.controller_client(timeout_ms=30_000) as ctl:
            return ctl.call("vm_list")["vms"]

    def move(self, ctl, vm: str, dst: str) -> dict:
        return ctl.call("vm_move", {"name": vm, "to": dst})

    # ------------------------------------------------------------------ the run

    def run(self) -> dict:
        p = self.p
        self.log_dir.mkdir(parents=True, exist_ok=True)
        res: dict = {"per_hosts": [], "load": None, "ha": None, "cold_start": None}
        largest = max(p.hosts)
        load_n = goal_hosts(p.hosts)
        etcd_skip = etcd.skip_reason() if "etcd" in p.phases else None
        if etcd_skip:
            res["etcd_skipped"] = etcd_skip
            self.console.print(f"[yellow]{etcd_skip}[/yellow]")
        with self.progress:
            for n in p.hosts:
                entry: dict = {"hosts": n, "floor": None, "etcd": None, "moves": None}
                res["per_hosts"].append(entry)
                if "floor" in p.phases:
                    with self.step(f"N={n}: floor, {p.floor_msgs} msgs to {n - 1} subscribers",
                                   p.floor_msgs) as adv:
                        entry["floor"] = run_floor(n, p.floor_msgs, p.floor_rate, self.log_dir, track=self.track,
                                                   advance=adv)
                    with self.step(f"N={n}: agent-shaped floor (uvloop, CURVE, a report per message)",
                                   p.floor_msgs) as adv:
                        entry["floor_agent"] = run_floor(n, p.floor_msgs, p.floor_rate, self.log_dir,
                                                         track=self.track, advance=adv, shape="agent")
                if "etcd" in p.phases and not etcd_skip:
                    with self.step(f"N={n}: etcd, {p.floor_msgs} puts watched by {n} processes",
                                   p.floor_msgs) as adv:
                        entry["etcd"] = etcd.run_etcd(n, p.floor_msgs, p.floor_rate, self.log_dir, track=self.track,
                                                      advance=adv)
                wants = ({"moves"} | ({"profile", "ha"} if n == largest else set())
                         | ({"load"} if n == load_n else set()))
                if not wants & set(p.phases):
                    continue
                with self.cluster(n, f"N={n}") as c:
                    vms = p.vms
                    with self.step(f"N={n}: creating {vms} VMs"):
                        c.create_vms(vms, timeout_ms=300_000)
                    if "moves" in p.phases:
                        entry["moves"] = self.phase_moves(c, n, entry["floor"], entry["etcd"])
                    if n == largest and "profile" in p.phases:
                        res["profile"] = self.phase_profile(c, n)
                    if n == load_n and "load" in p.phases:
                        res["load"] = self.phase_load(c, n, entry["floor"], entry["etcd"])
                    if n == largest and "ha" in p.phases:
                        res["ha"] = self.phase_ha(c, n)
            if "cold" in p.phases:
                res["cold_start"] = self.phase_cold(p.cold_hosts)
            if "balance" in p.phases:
                res["balance"] = self.phase_balance(largest)
            if "curve" in p.phases:
                res["curve"] = self.phase_curve(largest)
        return res

    # ------------------------------------------------------------------ CURVE on and off

    def phase_curve(self, n: int) -> dict:
        """The cost of CURVE: --moves moves one after another on n hosts with CURVE and as many
        without, in the same sitting: `curve_rounds` rounds, each a fresh cluster of either kind in
        alternating order (so a drift of the machine's load falls on both alike)."""
        p = self.p
        per_round = max(1, p.moves // p.curve_rounds)
        lat: dict[str, list[float]] = {"curve": [], "insecure": []}
        converged = {"curve": 0, "insecure": 0}
        cpu_s = {"curve": 0.0, "insecure": 0.0}
        for r in range(p.curve_rounds):
            for mode in (("curve", "insecure") if r % 2 == 0 else ("insecure", "curve")):
                label = f"curve N={n} {'CURVE' if mode == 'curve' else 'no CURVE'} {r + 1}/{p.curve_rounds}"
                with self.cluster(n, label, insecure=mode == "insecure") as c:
                    with self.step(f"{label}: creating {p.vms} VMs"):
                        c.create_vms(p.vms, timeout_ms=300_000)
                    s0 = self.sample(c, with_status=False)
                    recs = self._move_series(c, per_round, label)
                    s1 = self.sample(c, with_status=False)
                cpu_s[mode] += sum(self.cpu_delta(s0, s1).values())
                converged[mode] += sum(1 for x in recs if x["converged"])
                lat[mode] += [x["latency_ms"] for x in recs if x["converged"] and x["latency_ms"] is not None]
        on, off = dist(lat["curve"]), dist(lat["insecure"])

        def overhead(q: str) -> float | None:
            return None if not off[q] or on[q] is None else round((on[q] / off[q] - 1) * 100, 1)

        return {"hosts": n, "moves_per_mode": per_round * p.curve_rounds, "rounds": p.curve_rounds,
                "curve": {"latency_ms": on, "converged": converged["curve"], "agents_cpu_s": round(cpu_s["curve"], 2)},
                "insecure": {"latency_ms": off, "converged": converged["insecure"],
                             "agents_cpu_s": round(cpu_s["insecure"], 2)},
                "overhead_pct": {"p50": overhead("p50"), "p99": overhead("p99")}}

    def _move_series(self, c: Cluster, count: int, label: str) -> list[dict]:
        vms = self.vm_list(c)
        placement = {v["vm"]: v["host"] for v in vms}
        names = sorted(placement)
        hosts = list(c.agents)
        with self.step(f"{label}: {count} moves one after another", count) as adv, \
                c.controller_client(timeout_ms=60_000) as ctl:
            return self.random_moves(ctl, count, placement, names, hosts, adv)

    def random_moves(self, ctl, count: int, placement: dict, names: list, hosts: list, adv) -> list[dict]:
        """`count` moves one after another of a random VM of `names` to a random other host of
        `hosts` (placement: VM -> host, kept current); the move records."""
        records = []
        for _ in range(count):
            vm = self.rng.choice(names)
            dst = self.rng.choice([h for h in hosts if h != placement[vm]])
            records.append(self.move(ctl, vm, dst))
            placement[vm] = dst
            adv()
        return records

    # ------------------------------------------------------------------ 1. moves one after another

    def phase_moves(self, c: Cluster, n: int, floor: dict | None, etcd_: dict | None = None) -> dict:
        p = self.p
        vms = self.vm_list(c)
        placement = {v["vm"]: v["host"] for v in vms}
        info = {v["vm"]: v for v in vms}
        names = sorted(placement)
        hosts = list(c.agents)
        with self.step(f"N={n}: idle mesh for {p.idle_s:.1f} s"):
            s0 = self.sample(c)
            time.sleep(p.idle_s)
            s1 = self.sample(c)
        with self.step(f"N={n}: {p.moves} moves one after another", p.moves) as adv, \
                c.controller_client(timeout_ms=60_000) as ctl:
            records = self.random_moves(ctl, p.moves, placement, names, hosts, adv)
        s2 = self.sample(c)
        lat = [r["latency_ms"] for r in records if r["converged"] and r["latency_ms"] is not None]
        out = {
            "moves": len(records),
            "converged": sum(1 for r in records if r["converged"]),
            "latency_ms": dist(lat),
            "latencies_ms": lat,
            "cost": self.cost(c, n, s0, s1, s2, records, info),
        }
        if floor:
            out["latency_vs_floor"] = ratios(out["latency_ms"], floor["latency_ms"])
        if etcd_:
            out["latency_vs_etcd"] = ratios(out["latency_ms"], etcd_["latency_ms"])
        return out

    def frame_sizes(self, n: int, records: list[dict], info: dict, s: dict) -> dict:
        """Bytes of each msgpack frame a move puts on the wire, built with agent.wire from the
        run's own values (payload only: no ZMTP framing, ROUTER routing ids or TCP/IP headers)."""
        enc = wire.encode
        sizes: dict[str, list[int]] = {k: [] for k in ("request", "reply", "prepare", "ack", "switchover", "detach",
                                                       "updates", "applied", "heartbeat")}
        agents = s["agents"]
        inc = {h: a.get("incarnation", time.monotonic_ns()) for h, a in agents.items()}
        now = time.monotonic_ns()
        for r in records:
            v = info[r["vm"]]
            vlan, mac, port, op = v["vlan"], parse_mac(v["mac"]), v["port"], r["op"]
            sizes["request"].append(len(enc(MsgType.REQUEST, [op, "vm_move", {"name": r["vm"], "to": r["dst"]}])))
            sizes["reply"].append(len(enc(MsgType.REPLY, [op, True, r])))
            sizes["prepare"].append(len(enc(MsgType.PREPARE, [op, r["vm"], vlan, mac, port])))
            for detail in ("prepared", "switched", "detached"):
                sizes["ack"].append(len(enc(MsgType.ACK, [op, True, detail, now])))
            sizes["switchover"].append(len(enc(MsgType.SWITCHOVER, [op, r["vm"], vlan, mac, port, r["seq"]])))
            sizes["detach"].append(len(enc(MsgType.DETACH, [op, r["vm"], vlan, mac, 0])))
            dst = agents.get(r["dst"], {})
            upd = [dst.get("originated", 1), vlan, mac, r["dst"], port, r["seq"], False]
            sizes["updates"].append(len(enc(MsgType.UPDATES, [r["dst"], inc.get(r["dst"], now), [upd]])))
            for h in r["applied_ms"]:
                sizes["applied"].append(len(enc(MsgType.APPLIED, [h, [[vlan, mac, r["dst"], r["seq"], False, now]]])))
        for h, a in agents.items():
            sizes["heartbeat"].append(len(enc(MsgType.HEARTBEAT, [h, inc[h], a.get("originated", 0), (1 << 64) - 1,
                                                                  a.get("mac_entries", 0)])))
        return {k: mean(v) for k, v in sizes.items()}

    def cost(self, c: Cluster, n: int, s0: dict, s1: dict, s2: dict, records: list[dict], info: dict) -> dict:
        """Messages, bytes, CPU and memory of the moves between samples s1 and s2 (s0..s1: idle)."""
        moves = max(1, len(records))
        idle_dt = (s1["t_ns"] - s0["t_ns"]) / NS
        dt = (s2["t_ns"] - s1["t_ns"]) / NS
        idle_cpu = self.cpu_delta(s0, s1)
        cpu = self.cpu_delta(s1, s2)
        idle_cpu_total_per_s = sum(idle_cpu.values()) / idle_dt
        sz = self.frame_sizes(n, records, info, s2)
        upd = self.stat_delta(s1, s2, "updates_received")
        applied_reports = mean([len(r["applied_ms"]) for r in records]) or 0.0
        repair = self.stat_delta(s1, s2, "pulls_sent") + self.stat_delta(s1, s2, "snapshots_requested")
        hb = self.stat_delta(s1, s2, "heartbeats_received")
        hb_idle = self.stat_delta(s0, s1, "heartbeats_received")
        msgs = {
            # Fixed by the protocol, one each per move: client REQUEST + REPLY, PREPARE, SWITCHOVER,
            # DETACH and the three ACKs.
            "control": 8,
            # Measured: sum over agents of the change in stats.updates_received (one per update).
            "gossip_updates": upd / moves,
            # Measured: entries in the move records' applied_ms (one APPLIED report per agent).
            "applied_reports": applied_reports,
            # Measured: pulls + snapshot requests sent (each answered once).
            "repair": 2 * repair / moves,
        }
        msgs["total"] = sum(msgs.values())
        bytes_ = {
            "control": sz["request"] + sz["reply"] + sz["prepare"] + sz["switchover"] + sz["detach"] + 3 * sz["ack"],
            "gossip_updates": msgs["gossip_updates"] * sz["updates"],
            "applied_reports": applied_reports * sz["applied"],
        }
        bytes_["total"] = sum(bytes_.values())
        lo = None
        if s0["lo_bytes"] is not None:
            lo_idle_per_s = (s1["lo_bytes"] - s0["lo_bytes"]) / idle_dt
            lo_moves = s2["lo_bytes"] - s1["lo_bytes"]
            lo = {"bytes_per_move": lo_moves / moves,
                  "bytes_per_move_minus_idle": (lo_moves - lo_idle_per_s * dt) / moves,
                  "idle_bytes_per_s": lo_idle_per_s}
        rss = [a["rss"] for a in s2["agents"].values()]
        hwm = [a["hwm"] for a in s2["agents"].values() if a["hwm"]]
        agent_cpu_per_move_s = (sum(cpu.values()) - idle_cpu_total_per_s * dt) / moves
        ctl_idle = (s1["controller_cpu_s"] - s0["controller_cpu_s"]) / idle_dt
        ctl_cpu = s2["controller_cpu_s"] - s1["controller_cpu_s"]
        return {
            "duration_s": dt,
            "moves_per_s": len(records) / dt if dt else None,
            "msgs_per_move": msgs,
            "frame_bytes": sz,
            "payload_bytes_per_move": bytes_,
            "loopback": lo,
            "background": {
                "heartbeats_received_per_s_idle": hb_idle / idle_dt,
                "heartbeats_received_per_move": hb / moves,
                "heartbeat_bytes_per_s_idle": hb_idle / idle_dt * sz["heartbeat"],
                "gossip_interval_ms": max((a.get("gossip_interval_ms", 0) for a in s2["agents"].values()), default=0),
                "agents_cpu_cores_idle": idle_cpu_total_per_s,
                "controller_cpu_cores_idle": ctl_idle,
            },
            "cpu": {
                "agent_s_mean": mean(list(cpu.values())),
                "agent_s_max": max(cpu.values(), default=None),
                "agents_ms_per_move": agent_cpu_per_move_s * 1000,
                # Comparable with the floor's CPU per message per subscriber.
                "agent_us_per_move_per_receiver": agent_cpu_per_move_s * 1e6 / max(1, n - 1),
                "controller_ms_per_move": (ctl_cpu - ctl_idle * dt) / moves * 1000,
                "agent_total_s_since_start_mean": mean([a["cpu_s"] for a in s2["agents"].values()]),
            },
            "memory": {
                "agent_rss_mb_mean": mean(rss) / MB if rss else None,
                "agent_rss_mb_max": max(rss) / MB if rss else None,
                "agent_peak_rss_mb_max": max(hwm) / MB if hwm else None,
                "controller_rss_mb": s2["controller_rss"] / MB,
            },
        }

    # ------------------------------------------------------------------ 2. where one move's CPU goes

    def phase_profile(self, c: Cluster, n: int) -> dict:
        """cProfile (main-thread CPU clock) in one receiving agent and in the controller while
        moves go one after another between the other hosts: each function's own CPU time per
        move. The receiver is a host no move leaves or enters (the last), so what it does is
        what each of the N-2 bystanders does per move: take the update, the data plane's RARP,
        report the apply, heartbeats. Profiling slows Python code, so the totals are larger
        than the unprofiled figures of phase moves; the shares are what to read."""
        p = self.p
        count = min(p.moves, PROFILE_MOVES)
        hosts = list(c.agents)
        receiver = hosts[-1]
        others = hosts[:-1]
        vms = self.vm_list(c)
        placement = {v["vm"]: v["host"] for v in vms if v["host"] != receiver}
        names = sorted(placement)
        stamp = time.strftime("%Y%m%dT%H%M%S")
        paths = {"agent": self.log_dir / f"profile-{receiver}-{stamp}.pstats",
                 "controller": self.log_dir / f"profile-controller-{stamp}.pstats"}
        out_perf = self.perf_phase(c, count, receiver, placement, names, others, stamp)
        with self.step(f"N={n}: {count} moves profiled at {receiver} and the controller", count) as adv, \
                c.controller_client(timeout_ms=60_000) as ctl, c.agent_client(receiver, timeout_ms=30_000) as ag:
            for who in (ag, ctl):
                if who.call("profile", {"action": "status"})["running"]:
                    who.call("profile", {"action": "stop", "top": 1})  # (a profile left over: start afresh)
                who.call("profile", {"action": "start"})
            try:
                records = self.random_moves(ctl, count, placement, names, others, adv)
                time.sleep(0.2)  # (the last move's apply report and heartbeats land in the profile)
            finally:
                got = {"agent": ag.call("profile", {"action": "stop", "path": str(paths["agent"]),
                                                    "top": PROFILE_TOP}),
                       "controller": ctl.call("profile", {"action": "stop", "path": str(paths["controller"]),
                                                          "top": PROFILE_TOP})}
        out: dict = {"hosts": n, "moves": count, "receiver": receiver,
                     "converged": sum(1 for r in records if r["converged"]), "perf": out_perf}
        for who, prof in got.items():
            out[who] = {
                "pstats": prof["path"],
                "cpu_us_per_move": prof["cpu_s"] / count * 1e6,  # whole process, all threads
                "profiled_us_per_move": prof["profiled_s"] / count * 1e6,  # main thread, as profiled
                "wall_s": prof["wall_s"],
                "areas": [{"area": a["area"], "calls_per_move": a["calls"] / count,
                           "own_us_per_move": a["own_s"] / count * 1e6} for a in prof["areas"][:12]],
                "top": [{"function": t["function"], "calls_per_move": t["calls"] / count,
                         "own_us_per_move": t["own_s"] / count * 1e6, "cum_us_per_move": t["cum_s"] / count * 1e6}
                        for t in prof["top"]],
            }
        return out

    def perf_phase(self, c: Cluster, count: int, receiver: str, placement: dict, names: list, others: list,
                   stamp: str) -> dict:
        """`count` moves with Linux perf sampling the receiver and the controller (no cProfile
        then): their CPU by thread and shared object. {"skipped": why} without perf."""
        why = perfdso.unavailable_reason()
        if why:
            return {"skipped": why}
        recs = {"agent": perfdso.Recording(c.agents[receiver].pid, self.log_dir / f"perf-{receiver}-{stamp}.data",
                                           self.log_dir / "perf.log"),
                "controller": perfdso.Recording(c.controller.pid, self.log_dir / f"perf-controller-{stamp}.data",
                                                self.log_dir / "perf.log")}
        with self.step(f"{count} moves sampled by perf at {receiver} and the controller", count) as adv, \
                c.controller_client(timeout_ms=60_000) as ctl:
            for r in recs.values():
                r.start(track=self.track)
            try:
                time.sleep(0.3)  # (perf attaches)
                self.random_moves(ctl, count, placement, names, others, adv)
                time.sleep(0.2)
            finally:
                wrote = {who: r.stop() for who, r in recs.items()}
        out: dict = {"kernel_visible": perfdso.kernel_visible(), "moves": count}
        for who, r in recs.items():
            if not wrote[who]:
                out[who] = {"error": f"perf wrote nothing (see {r.log_path})"}
                continue
            rows = perfdso.shares(r.path)
            by_dso: dict[str, float] = {}
            by_thread: dict[str, float] = {}
            for row in rows:
                name = perfdso.label(row["dso"])
                by_dso[name] = by_dso.get(name, 0.0) + row["share"]
                by_thread[row["thread"]] = by_thread.get(row["thread"], 0.0) + row["share"]
            out[who] = {"data": str(r.path),
                        "by_dso": sorted(({"dso": k, "share": v} for k, v in by_dso.items()),
                                         key=lambda x: x["share"], reverse=True),
                        "by_thread": sorted(({"thread": k, "share": v} for k, v in by_thread.items()),
                                            key=lambda x: x["share"], reverse=True)}
        return out

    # ------------------------------------------------------------------ 3. load curve (open loop)

    def phase_load(self, c: Cluster, n: int, floor: dict | None, etcd_: dict | None = None) -> dict:
        steps = []
        with self.step(f"N={n}: load curve at {', '.join(f'{r:g}' for r in self.p.rates)} moves/s",
                       len(self.p.rates)) as adv:
            for rate in self.p.rates:
                step = self.load_step(c, rate)
                if floor:
                    step["p99_vs_floor"] = ratio(step["latency_ms"]["p99"], floor["latency_ms"]["p99"])
                if etcd_:
                    step["p99_vs_etcd"] = ratio(step["latency_ms"]["p99"], etcd_["latency_ms"]["p99"])
                steps.append(step)
                adv()
        ok = [s["rate_per_s"] for s in steps if s["pass"]]
        ok_e2e = [s["rate_per_s"] for s in steps if s["pass"] and (s["e2e_ms"]["p99"] or 0) < LOAD_P99_GOAL_MS]
        return {"hosts": n, "p99_goal_ms": LOAD_P99_GOAL_MS, "steps": steps,
                "max_rate_p99_under_goal": max(ok, default=None),
                "max_rate_e2e_p99_under_goal": max(ok_e2e, default=None)}

    def load_step(self, c: Cluster, rate: float) -> dict:
        p = self.p
        total = max(p.load_min_moves, round(rate * p.step_s))
        placement = {v["vm"]: v["host"] for v in self.vm_list(c) if v["state"] == "active"}
        free = sorted(placement)
        hosts = list(c.agents)
        period_ns = NS / rate
        issue_s = total / rate
        ctx = zmq.Context.instance()
        sock = ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.SNDHWM, 100_000)
        sock.setsockopt(zmq.RCVHWM, 100_000)
        c.curve_socket(sock, "controller")
        sock.connect(c.controller_endpoint)
        inflight: dict[int, tuple[str, int, int]] = {}
        recs: list[dict] = []
        errors: Counter = Counter()
        sent = 0
        req_id = 0
        time.sleep(0.2)
        s0 = self.sample(c, with_status=False)
        t0 = time.monotonic_ns() + 10_000_000
        issue_deadline = t0 + int((2 * issue_s + 2) * NS)
        drain_deadline = issue_deadline + int((self.ctl_config.op_timeout_ms / 1000 + 10) * NS)
        abandoned = 0
        last_reply = t0
        try:
            while sent < total or inflight:
                now = time.monotonic_ns()
                while sent < total and t0 + sent * period_ns <= now and free and len(inflight) < p.load_max_inflight:
                    i = self.rng.randrange(len(free))
                    vm = free[i]
                    free[i] = free[-1]
                    free.pop()
                    dst = hosts[self.rng.randrange(len(hosts))]
                    while dst == placement[vm]:
                        dst = hosts[self.rng.randrange(len(hosts))]
                    req_id += 1
                    sock.send(wire.encode(MsgType.REQUEST, [req_id, "vm_move", {"name": vm, "to": dst}]))
                    inflight[req_id] = (vm, int(t0 + sent * period_ns), time.monotonic_ns())
                    sent += 1
                if sent < total and now > issue_deadline:
                    abandoned = total - sent
                    total = sent
                if now > drain_deadline:
                    break
                if sent < total and free and len(inflight) < p.load_max_inflight:
                    wait_ms = max(1, math.ceil((t0 + sent * period_ns - time.monotonic_ns()) / 1e6))
                else:
                    wait_ms = 100
                if not sock.poll(wait_ms, zmq.POLLIN):
                    continue
                while True:
                    try:
                        frame = sock.recv(zmq.NOBLOCK)
                    except zmq.Again:
                        break
                    t_reply = time.monotonic_ns()
                    try:
                        mt, body = wire.decode(frame)
                    except wire.WireError:
                        errors["undecodable reply"] += 1
                        continue
                    if mt is not MsgType.REPLY or body[0] not in inflight:
                        continue
                    rid, ok, result = body
                    vm, intended, sent_ns = inflight.pop(rid)
                    free.append(vm)
                    last_reply = t_reply
                    if not ok:
                        errors[str(result)[:120]] += 1
                        continue
                    placement[vm] = result["dst"]
                    recs.append({"converged": result["converged"], "latency_ms": result["latency_ms"],
                                 "e2e_ms": (t_reply - intended) / 1e6, "lag_ms": (sent_ns - intended) / 1e6})
        finally:
            sock.close(linger=0)
        s1 = self.sample(c, with_status=False)
        timed_out = len(inflight)
        lat = [r["latency_ms"] for r in recs if r["converged"] and r["latency_ms"] is not None]
        converged = sum(1 for r in recs if r["converged"])
        span_s = max(issue_s, (last_reply - t0) / NS)
        dt = (s1["t_ns"] - s0["t_ns"]) / NS
        agents_cpu = sum(self.cpu_delta(s0, s1).values())
        achieved = converged / span_s if span_s else 0.0
        lat_d = dist(lat)
        step = {
            "rate_per_s": rate,
            "offered": total + abandoned,
            "sent": sent,
            "abandoned": abandoned,
            "replies": len(recs),
            "converged": converged,
            "errors": sum(errors.values()),
            "error_examples": [e for e, _ in errors.most_common(3)],
            "no_reply": timed_out,
            "achieved_per_s": achieved,
            "latency_ms": lat_d,
            "e2e_ms": dist([r["e2e_ms"] for r in recs]),
            "send_lag_ms": dist([r["lag_ms"] for r in recs]),
            "agents_cpu_cores": agents_cpu / dt if dt else None,
            "controller_cpu_cores": (s1["controller_cpu_s"] - s0["controller_cpu_s"]) / dt if dt else None,
        }
        step["pass"] = bool(
            not abandoned and not timed_out and not errors and converged == sent and sent > 0
            and lat_d["p99"] is not None and lat_d["p99"] < LOAD_P99_GOAL_MS and achieved >= 0.9 * rate
        )
        return step

    # ------------------------------------------------------------------ 4a. HA: SIGKILL a host

    def phase_ha(self, c: Cluster, n: int) -> dict:
        target = self.p.ha_vms
        with self.step(f"N={n}: HA, placing {target} VMs on one host"), \
                c.controller_client(timeout_ms=60_000) as ctl:
            vms = [v for v in self.vm_list(c) if v["state"] == "active"]
            by_host: dict[str, list[str]] = {h: [] for h in c.agents}
            for v in vms:
                by_host.setdefault(v["host"], []).append(v["vm"])
            victim = min(by_host, key=lambda h: (abs(len(by_host[h]) - target), -int(h[1:]) if h[1:].isdigit() else 0))
            others = [h for h in by_host if h != victim]
            while len(by_host[victim]) > target:
                vm = by_host[victim].pop()
                dst = min(others, key=lambda h: len(by_host[h]))
                self.move(ctl, vm, dst)
                by_host[dst].append(vm)
            while len(by_host[victim]) < target:
                src = max(others, key=lambda h: len(by_host[h]))
                vm = by_host[src].pop()
                self.move(ctl, vm, victim)
                by_host[victim].append(vm)
        victim_vms = set(by_host[victim])
        time.sleep(0.5)
        pid = c.agents[victim].pid
        dead_after_ms = self.ctl_config.dead_after_ms
        with self.step(f"N={n}: HA, SIGKILL {victim} ({len(victim_vms)} VMs) until they run elsewhere"), \
                c.controller_client(timeout_ms=30_000) as ctl:
            t_kill = time.monotonic_ns()
            os.kill(pid, signal.SIGKILL)
            with contextlib.suppress(psutil.Error):
                psutil.Process(pid).wait(timeout=10)
            t_dead_seen = None
            restarts: dict[str, dict] = {}
            deadline = time.monotonic() + dead_after_ms / 1000 + 60
            while time.monotonic() < deadline:
                now = time.monotonic_ns()
                if t_dead_seen is None:
                    st = ctl.call("status")
                    if any(h["host"] == victim and h["state"] == "dead" for h in st["hosts"]):
                        t_dead_seen = now
                if t_dead_seen is not None:
                    for r in ctl.call("moves", {"last": 4 * len(victim_vms) + 20})["moves"]:
                        if r["kind"] == "restart" and r["vm"] in victim_vms and r["switch_ns"] > t_kill:
                            restarts[r["vm"]] = r
                    if len(restarts) == len(victim_vms):
                        break
                time.sleep(0.05)
            t_restarted_seen = time.monotonic_ns()
        with self.step(f"N={n}: HA, checking every live table against the inventory"):
            verdict = check_once(c)
            t_end = time.monotonic() + 20
            while not verdict["ok"] and time.monotonic() < t_end:
                time.sleep(0.2)
                verdict = check_once(c)
            t_agree = time.monotonic_ns()
            final = {v["vm"]: v for v in self.vm_list(c)}
        recs = list(restarts.values())
        converged = [r for r in recs if r["converged"]]
        first_attach = min((r["switch_ns"] for r in recs), default=None)
        last_apply = max((r["switch_ns"] + int(r["latency_ms"] * 1e6) for r in converged), default=None)
        elsewhere = sum(1 for v in victim_vms if final.get(v, {}).get("host") not in (None, victim)
                        and final[v]["state"] == "active")
        return {
            "hosts": n,
            "victim": victim,
            "vms_on_victim": len(victim_vms),
            "dead_after_ms": dead_after_ms,
            "restarted": len(recs),
            "restarts_converged": len(converged),
            "running_elsewhere": elsewhere,
            "tables_agree": verdict["ok"],
            "entries_checked": verdict["entries"],
            # Kill -> the first restarted VM attached on its new host (stamped by that agent): the
            # controller's dead detection plus one ATTACH.
            "detection_ms": ms(first_attach, t_kill),
            # Kill -> the controller listed the host as dead (polled every ~50 ms: an upper bound).
            "dead_seen_polled_ms": ms(t_dead_seen, t_kill),
            # First restart attached -> the last live agent applied the last restarted VM.
            "restart_convergence_ms": ms(last_apply, first_attach),
            "restart_latency_ms": dist([r["latency_ms"] for r in converged]),
            # Kill -> every VM of the host runs elsewhere and every live agent knows it.
            "total_ms": ms(last_apply, t_kill),
            "restarted_seen_polled_ms": ms(t_restarted_seen, t_kill),
            "tables_agree_polled_ms": ms(t_agree, t_kill),
        }

    # ------------------------------------------------------------------ 4c. evacuate and rebalance

    def phase_balance(self, n: int) -> dict:
        """A fresh cluster of n hosts: --balance-vms VMs created on h1, `host_evacuate h1`; then every
        VM moved onto h1..h<skew> and a `rebalance` (metric vms) from that skew."""
        from testbed import balance as client

        p = self.p
        k = p.balance_max_concurrent
        skew = min(p.balance_skew_hosts, max(1, n // 2))  # at 4 hosts: 2, so the rebalance has work
        with self.cluster(n, f"balance N={n}") as c:
            hosts = list(c.agents)
            victim = hosts[0]
            with self.step(f"balance N={n}: creating {p.balance_vms} VMs on {victim}"), \
                    c.controller_client(timeout_ms=300_000) as ctl:
                specs = [[f"vm{i}", victim, "default"] for i in range(1, p.balance_vms + 1)]
                made = ctl.call("vm_create", {"vms": specs})
                if any(not o["converged"] for o in made["ops"]):
                    raise ClusterError(f"balance: creating {p.balance_vms} VMs on {victim} did not converge")
            with self.step(f"balance N={n}: evacuate {victim} ({p.balance_vms} VMs, {k} at once)"):
                ev = client.evacuate(c, victim, k, timeout_s=300)
                left = sum(1 for v in self.vm_list(c) if v["host"] == victim)
            with c.controller_client(timeout_ms=30_000) as ctl:
                ctl.call("host_activate", {"name": victim})
            evac_moves = ev["moves"]
            lat = [m["latency_ms"] for m in evac_moves if m["converged"] and m["latency_ms"] is not None]
            evacuate = {
                "host": victim, "vms_on_host": p.balance_vms, "max_concurrent": k,
                "moves": len(evac_moves), "converged": sum(1 for m in evac_moves if m["converged"]),
                "vms_left_on_host": left,
                # Request sent -> the controller answered: host empty and every move off it ended.
                "until_empty_ms": ev["wall_s"] * 1000,
                "latency_ms": dist(lat),
                # Frames the data planes dropped meanwhile (None: the agents run without one; no
                # traffic runs in this phase, so this is a proxy for frames lost, not a measure).
                "dataplane_drops": ev["dataplane_drops"],
            }
            skewed = hosts[1:skew + 1]
            with self.step(f"balance N={n}: piling every VM on {skewed[0]}..{skewed[-1]} by moves"), \
                    c.controller_client(timeout_ms=60_000) as ctl:
                vms = sorted(self.vm_list(c), key=lambda v: int(v["vm"][2:]) if v["vm"][2:].isdigit() else 0)
                for i, v in enumerate(vms):
                    dst = skewed[i % len(skewed)]
                    if v["host"] != dst:
                        self.move(ctl, v["vm"], dst)
            with self.step(f"balance N={n}: rebalance from the skew ({k} at once)"):
                t0 = time.monotonic_ns()
                rb = client.rebalance(c, metric="vms", threshold=None, max_concurrent=k, dry_run=False,
                                      sample_s=0, timeout_s=300)
                t1 = time.monotonic_ns()
                after: Counter = Counter({h: 0 for h in hosts})
                after.update(v["host"] for v in self.vm_list(c))
            with self.step(f"balance N={n}: checking every live table against the inventory"):
                verdict = settled_check(c, settle_s=20)
            rb_moves = rb["moves"]
            rlat = [m["latency_ms"] for m in rb_moves if m["converged"] and m["latency_ms"] is not None]
            rebalance = {
                "skewed_hosts": skew, "vms": len(vms), "max_concurrent": k, "threshold": rb["threshold"],
                "planned": len(rb["plan"]), "moves": len(rb_moves),
                "converged": sum(1 for m in rb_moves if m["converged"]),
                "spread_before": rb["spread_before"], "spread_planned": rb["spread_planned"],
                "spread_after": max(after.values()) - min(after.values()),
                "max_vms_before": max(rb["load_before"].values()), "max_vms_after": max(after.values()),
                # Request sent -> the controller answered: every planned move ended.
                "total_ms": ms(t1, t0),
                "latency_ms": dist(rlat),
            }
            return {"hosts": n, "evacuate": evacuate, "rebalance": rebalance, "tables_agree": verdict["ok"]}

    # ------------------------------------------------------------------ 4b. cold start: one batch of ports

    def phase_cold(self, n: int) -> dict:
        ports = self.p.cold_ports
        with self.cluster(n, f"cold N={n}") as c:
            time.sleep(0.2)
            s0 = self.sample(c)
            hosts = list(c.agents)
            specs = [[f"vm{i}", hosts[(i - 1) % n], "default"] for i in range(1, ports + 1)]
            ctx = zmq.Context.instance()
            sock = ctx.socket(zmq.DEALER)
            sock.setsockopt(zmq.LINGER, 0)
            c.curve_socket(sock, "controller")
            sock.connect(c.controller_endpoint)
            try:
                with self.step(f"cold N={n}: creating {ports} ports in one vm_create batch"):
                    time.sleep(0.1)
                    t_send = time.monotonic_ns()
                    sock.send(wire.encode(MsgType.REQUEST, [1, "vm_create", {"vms": specs}]))
                    if not sock.poll(300_000, zmq.POLLIN):
                        raise ClusterError(f"cold start: no answer to a vm_create of {ports} VMs within 300 s")
                    frame = sock.recv()
                    t_reply = time.monotonic_ns()
            finally:
                sock.close(linger=0)
            # The reply holds every op's record (applied_ms per host): decoded without the
            # wire's 8 MB bound, which a large batch can exceed.
            _, _, body = msgpack.unpackb(frame, raw=False, strict_map_key=False)
            _, ok, result = body
            if not ok:
                raise ClusterError(f"cold start: vm_create failed: {result}")
            ops = result["ops"]
            conv = [o for o in ops if o["converged"]]
            first_attach = min((o["switch_ns"] for o in ops if o["switch_ns"]), default=None)
            with self.step(f"cold N={n}: every agent holds {ports} entries?"):
                stamps = self.cold_apply_stamps(c, ops)
                t_end = time.monotonic() + 30
                while True:
                    s1 = self.sample(c)
                    entries = {h: a.get("mac_entries") for h, a in s1["agents"].items()}
                    if all(e == ports for e in entries.values()) or time.monotonic() > t_end:
                        break
                    time.sleep(0.2)
            expected = n * ports
            last_apply = max(stamps.values()) if len(stamps) == expected else None
            cpu = self.cpu_delta(s0, s1)
            rss = [a["rss"] for a in s1["agents"].values()]
            hwm = [a["hwm"] for a in s1["agents"].values() if a["hwm"]]
            return {
                "hosts": n,
                "ports": ports,
                # Ports every agent applied (by the agents' stamps; the controller may still be
                # catching up on reports, see controller_converged_ops).
                "converged": sum(1 for k in {(v, m) for (_, v, m) in stamps}
                                 if all((h, *k) in stamps for h in hosts)),
                "agents_holding_all": sum(1 for e in entries.values() if e == ports),
                # Request sent -> the last agent applied the last port (agents' own stamps, one per
                # agent and port, from the controller's applied_log).
                "all_applied_ms": (last_apply - t_send) / 1e6 if last_apply else None,
                "apply_stamps": len(stamps),
                "apply_stamps_expected": expected,
                "controller_converged_ops": len(conv),
                "first_attach_ms": (first_attach - t_send) / 1e6 if first_attach else None,
                # Request sent -> the batch reply arrived (includes encoding every op's record).
                "reply_ms": (t_reply - t_send) / 1e6,
                "reply_bytes": len(frame),
                "agent_cpu_s_mean": mean(list(cpu.values())),
                "controller_cpu_s": s1["controller_cpu_s"] - s0["controller_cpu_s"],
                "agent_rss_mb_mean": mean(rss) / MB if rss else None,
                "agent_rss_mb_max": max(rss) / MB if rss else None,
                "agent_peak_rss_mb_max": max(hwm) / MB if hwm else None,
                "controller_rss_mb": s1["controller_rss"] / MB,
            }

    def cold_apply_stamps(self, c: Cluster, ops: list[dict], timeout_s: float = 60.0) -> dict[tuple, int]:
        """(agent, vlan, mac) -> that agent's apply stamp of the port, for every port created.

        From the controller's `applied_log` (every apply report, stamped by the agent), read
        until it holds one for every agent and port or `timeout_s` passes: the controller may
        still be working through reports after the batch reply. Falls back to the ops'
        `applied_ms` when the controller has no applied_log."""
        want = {(v["vlan"], parse_mac(v["mac"])): v["host"] for v in self.vm_list(c)}
        expected = len(c.agents) * len(want)
        stamps: dict[tuple, int] = {}
        since = 0
        deadline = time.monotonic() + timeout_s
        with c.controller_client(timeout_ms=60_000) as ctl:
            while len(stamps) < expected and time.monotonic() < deadline:
                try:
                    page = ctl.call("applied_log", {"since": since, "limit": 50_000})
                except ClusterError:
                    break  # no applied_log on this controller
                for t_ns, reporter, vlan, mac, host, seq, tomb in page["applies"]:
                    if want.get((vlan, mac)) == host and seq == 0 and not tomb:
                        stamps.setdefault((reporter, vlan, mac), t_ns)
                if page["next"] == since:
                    time.sleep(0.2)  # the controller is still catching up on reports
                since = page["next"]
        if stamps:
            return stamps
        by_name = {v["vm"]: (v["vlan"], parse_mac(v["mac"])) for v in self.vm_list(c)}
        for o in ops:
            vlan, mac = by_name[o["vm"]]
            for h, ms_ in o["applied_ms"].items():
                stamps[(h, vlan, mac)] = o["switch_ns"] + int(ms_ * 1e6)
        return stamps
