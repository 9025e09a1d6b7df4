"""Run a chaos plan against real processes and record everything in history.jsonl.

Three actors share one monotonic clock (t0 = the start of the workload):
- the main thread sends the planned moves (one DEALER socket, many requests in flight) and
  reads the replies, refreshes its view of placement, watches for processes that die by
  themselves, and draws the progress bar;
- the nemesis thread applies the fault schedule at its times (network faults through each
  agent's transport wrapper, or with `netns` as kernel rules between the hosts' namespaces:
  nftables loss, duplication and partitions, and the wrapper for what the kernel cannot do;
  processes by pid with real signals);
- at the end: heal everything, wait for the outstanding moves, settle, observe the final
  state (tables, inventory) and stop every process by pid (Cluster.down, always); then take
  every apply report row and every finished move and HA restart of every controller life from
  the controller's events file (STATE_DIR/events/controller.jsonl, dvswitch/events.py), which a
  controller writes as it goes: a kill loses none of it (asking its applied_log every 0.5 s
  lost the last half second of each life that ended in a kill).
"""

from __future__ import annotations

import os
import platform
import signal
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import zmq
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

from agent import wire
from agent.faults import CONTROLLER, Rule, parse_rule
from agent.mactable import parse_mac
from agent.wire import MsgType, WireError
from testbed import events as evlog
from testbed import procs, schedule
from testbed.chaos.history import HISTORY_FILE, Journal
from testbed.chaos.scenario import Plan, Scenario
from testbed.client import ClusterError, set_curve_client
from testbed.cluster import JOURNAL_FILE, Cluster
from testbed.schedule import TimedFault

NS = 1_000_000_000
APPLIED_PAGE = 20_000  # apply rows per `applies` history record
WATCH_EVERY_S = 0.5  # how often the main thread looks for processes that died by themselves
# The controller also logs every apply report row (apply.rows): the history reads them there.
EVENTS_APPLIES = ["--events-applies"]


# ---------------------------------------------------------------------- a multiplexing client


class Mux:
    """Many requests in flight on one DEALER socket; replies are matched by id."""

    def __init__(self, endpoint: str, curve: tuple | None = None) -> None:
        self.sock = zmq.Context.instance().socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        if curve is not None:  # (the cluster's admin key: Cluster.curve_for)
            set_curve_client(self.sock, *curve)
        self.sock.connect(endpoint)
        self.poller = zmq.Poller()
        self.poller.register(self.sock, zmq.POLLIN)
        self._next = 1

    def send(self, method: str, args: dict) -> int:
        rid = self._next
        self._next += 1
        try:
            self.sock.send(wire.encode(MsgType.REQUEST, [rid, method, args]), zmq.NOBLOCK)
        except zmq.Again:
            pass  # the queue is full (controller gone for long): it will count as no reply
        return rid

    def poll(self, timeout_ms: int) -> list[tuple[int, bool, object]]:
        out = []
        if not self.poller.poll(max(0, timeout_ms)):
            return out
        while True:
            try:
                frame = self.sock.recv(zmq.NOBLOCK)
            except zmq.Again:
                return out
            try:
                mt, body = wire.decode(frame)
            except WireError:
                continue
            if mt is MsgType.REPLY:
                out.append((body[0], bool(body[1]), body[2]))

    def close(self) -> None:
        self.sock.close(linger=0)


# ---------------------------------------------------------------------- state shared by the actors


@dataclass
class MoveReq:
    id: int
    vm: str
    dst: str
    sent_ns: int
    deadline_ns: int


class Procs:
    """What the run believes of each process (up | paused | down), under one lock."""

    def __init__(self, names: list[str]) -> None:
        self.lock = threading.RLock()
        self.state = dict.fromkeys(names, "up")

    def get(self, name: str) -> str:
        # Without the lock: the nemesis holds it through a whole restart (~0.5 s) and the
        # workload must not stall meanwhile; reading one dict entry is atomic.
        return self.state[name]


class ChaosRun:
    def __init__(self, sc: Scenario, plan: Plan, report_dir: Path, *, err_console: Console | None = None,
                 netns: bool = False) -> None:
        self.sc = sc
        self.netns = netns
        self.plan = plan
        # The nemesis's schedule: the one fault type (testbed/schedule.py) the simulator runs too.
        self.schedule = schedule.from_plan(sc, plan)
        self.dir = report_dir
        self.err = err_console or Console(stderr=True)
        self.state_dir = report_dir / "state"
        self.journal: Journal | None = None
        self.cluster: Cluster | None = None
        self.procs = Procs([*sc.host_names, CONTROLLER])
        # host -> agent-level faults in force, re-applied on restart: {"blocked": [...], "rules": {id: rule}}.
        # Kernel rules (netns) live in the host's namespace and outlive an agent's restart.
        self.net: dict[str, dict] = {}
        self.kernel_rules: dict[str, dict[str, Rule]] = {}  # host -> kernel rules in force (netns)
        self.kernel_why: dict[int, str | None] = {}  # fault index -> why the kernel cannot (None: it can)
        # Controller lives: a kill (or a death we find) bumps it.
        self.life = 0
        self.ctl_gone_ns = 0  # when the controller was last killed (or found dead)
        self.placement: dict[str, str] = {}
        self.busy: dict[str, int] = {}  # vm -> id of our move request in flight
        self.outstanding: dict[int, MoveReq] = {}
        self.sent: dict[int, MoveReq] = {}
        self.counts = {"sent": 0, "acked": 0, "converged": 0, "refused": 0, "noreply": 0, "skipped": 0}
        self.active_faults: dict[int, str] = {}
        self.stop = threading.Event()
        self.evacuations: list[threading.Thread] = []  # `evacuate` actions waiting for their host to empty
        self.nemesis_error: str | None = None
        self.t0_ns = 0
        self.request_timeout_ns = (sc.op_timeout_ms + 5_000) * 1_000_000

    # ------------------------------------------------------------------ top level

    def run(self) -> Path:
        """Run the scenario; return the history path. Never leaves a process behind."""
        self.dir.mkdir(parents=True, exist_ok=True)
        for name in (HISTORY_FILE, "summary.json", "timeline.png"):
            (self.dir / name).unlink(missing_ok=True)
        logs = self.state_dir / "logs"
        if logs.is_dir():
            for f in logs.iterdir():
                f.unlink(missing_ok=True)
        path = self.dir / HISTORY_FILE
        j = self.journal = Journal(path)
        started = time.monotonic()
        j.write("run_start", scenario=self.sc.to_json(), seed=self.plan.seed, plan=self.plan.to_json(),
                schedule=schedule.to_json(self.schedule),
                argv=sys.argv, python=platform.python_version(), pid=os.getpid(), state_dir=str(self.state_dir))
        try:
            self._run()
        except KeyboardInterrupt:
            j.write("run_error", error="interrupted")
            raise
        except Exception as e:  # noqa: BLE001 - recorded, the verdict becomes "unknown"
            j.write("run_error", error=f"{type(e).__name__}: {e}")
            self.err.print(f"[red]run broke[/red]: {type(e).__name__}: {e}")
        finally:
            self.stop.set()
            if self.cluster is not None:
                killed = self.cluster.down()
                j.write("cluster_down", sigkill_needed=killed)
                self._history_from_events()
            j.write("run_end", wall_s=round(time.monotonic() - started, 3))
            j.close()
        return path

    def _run(self) -> None:
        sc, j = self.sc, self.journal
        with self.err.status(f"starting the controller and {sc.hosts} agents"):
            self.cluster = Cluster.up(self.state_dir, sc.hosts, agent_args=sc.agent_args(),
                                      controller_args=sc.controller_args() + EVENTS_APPLIES, netns=self.netns)
        c = self.cluster
        j.write("cluster_up", controller={"pid": c.controller.pid, "endpoint": c.controller_endpoint},
                agents={h: p.pid for h, p in c.agents.items()}, agent_args=sc.agent_args(),
                controller_args=sc.controller_args(), netns=c.netns.to_json() if c.netns else None,
                fault_boundaries={str(i): ("agent: " + why) if why else "kernel"
                                  for i, why in self.boundaries().items()})
        with self.err.status(f"creating {sc.vms} VMs"):
            res = c.create_vms(sc.vms)
        self.placement = {op["vm"]: op["dst"] for op in res["ops"]}
        j.write("vms_created", vms=len(res["ops"]), placement=self.placement)
        self._add_rules()
        self.mux = Mux(c.controller_endpoint, c.curve_for("controller"))
        try:
            self.t0_ns = time.monotonic_ns()
            j.write("workload_start", t0_ns=self.t0_ns, duration_s=sc.duration_s)
            nemesis = threading.Thread(target=self._nemesis, name="nemesis", daemon=True)
            nemesis.start()
            self._workload()
            nemesis.join(timeout=120)
            if nemesis.is_alive():
                raise ClusterError("the nemesis did not finish its schedule within 120 s of the workload's end")
            if self.nemesis_error:
                raise ClusterError(f"the nemesis failed: {self.nemesis_error}")
            j.write("workload_end", outstanding=len(self.outstanding), counts=self.counts)
            with self.err.status("healing: network faults reset, paused processes resumed, killed ones restarted"):
                self._heal_all()
            with self.err.status(f"waiting for {len(self.outstanding)} outstanding move(s)"):
                self._drain()
                for t in self.evacuations:
                    t.join(timeout=75)
            with self.err.status(f"settling (up to {sc.settle_s:g} s)"):
                ok, elapsed, why = self._settle()
            j.write("settled", ok=ok, elapsed_s=round(elapsed, 3), why=why)
            with self.err.status("reading final tables and inventory"):
                self._observe()
        finally:
            self.mux.close()

    # ------------------------------------------------------------------ workload (main thread)

    def _workload(self) -> None:
        sc = self.sc
        moves = self.plan.moves
        end_ns = self.t0_ns + int(sc.duration_s * NS)
        i = 0
        next_list_ns = self.t0_ns + NS
        next_watch_ns = self.t0_ns
        self.list_req: int | None = None
        progress = Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.fields[counts]}"),
                            TimeElapsedColumn(), console=self.err, transient=True)
        with progress:
            task = progress.add_task(f"chaos {sc.name}", total=sc.duration_s, counts="")
            while True:
                now = time.monotonic_ns()
                if now >= end_ns or self.stop.is_set():
                    break
                while i < len(moves) and self.t0_ns + int(moves[i].t_s * NS) <= now:
                    self._issue(moves[i], i)
                    i += 1
                if now >= next_list_ns:
                    # (an unanswered one, e.g. sent to a controller that was then killed, is dropped)
                    self.list_req = self.mux.send("vm_list", {})
                    next_list_ns = now + 2 * NS
                if now >= next_watch_ns:
                    self._watch_processes()
                    next_watch_ns = now + int(WATCH_EVERY_S * NS)
                nxt = min(end_ns, next_list_ns, next_watch_ns,
                          self.t0_ns + int(moves[i].t_s * NS) if i < len(moves) else end_ns)
                self._poll(max(1, min(100, (nxt - time.monotonic_ns()) // 1_000_000)))
                faults = ", ".join(tuple(self.active_faults.values())) or "no faults"
                c = self.counts
                progress.update(task, completed=min(sc.duration_s, (time.monotonic_ns() - self.t0_ns) / NS),
                                counts=f"moves {c['converged']}/{c['sent']} converged · {faults}")

    def _issue(self, pm, index: int) -> None:
        j, sc = self.journal, self.sc
        hosts = sc.host_names
        if pm.vm in self.busy:
            self.counts["skipped"] += 1
            j.write("move_skip", plan_index=index, vm=pm.vm, reason=f"our move #{self.busy[pm.vm]} is in flight")
            return
        cur = self.placement.get(pm.vm)
        dst = None
        for k in range(len(hosts)):
            cand = hosts[(pm.dst_index + k) % len(hosts)]
            if cand == cur or (sc.avoid_down_hosts and self.procs.get(cand) != "up"):
                continue
            dst = cand
            break
        if dst is None:
            self.counts["skipped"] += 1
            j.write("move_skip", plan_index=index, vm=pm.vm, reason="no running destination")
            return
        rid = self.mux.send("vm_move", {"name": pm.vm, "to": dst})
        now = time.monotonic_ns()
        req = MoveReq(rid, pm.vm, dst, now, now + self.request_timeout_ns)
        self.outstanding[rid] = self.sent[rid] = req
        self.busy[pm.vm] = rid
        self.counts["sent"] += 1
        j.write("move_req", id=rid, vm=pm.vm, src_known=cur, dst=dst, planned_dst=hosts[pm.dst_index],
                storm=pm.storm, plan_index=index)

    def _controller_gone(self) -> None:
        self.life += 1
        # Requests it had received die with it: the main thread gives up on them at once.
        self.ctl_gone_ns = time.monotonic_ns()

    def _poll(self, timeout_ms: int) -> None:
        j = self.journal
        for rid, ok, result in self.mux.poll(timeout_ms):
            if rid == self.list_req:
                self.list_req = None
                if ok:
                    for v in result["vms"]:
                        if v["vm"] not in self.busy:
                            self.placement[v["vm"]] = v["host"]
                continue
            req = self.sent.get(rid)
            if req is None:
                continue
            late = rid not in self.outstanding
            self.outstanding.pop(rid, None)
            if self.busy.get(req.vm) == rid:
                del self.busy[req.vm]
            if ok:
                self.counts["acked"] += 1
                if result.get("converged"):
                    self.counts["converged"] += 1
                if result.get("switch_ns"):
                    self.placement[req.vm] = result["dst"]
                j.write("move_ack", id=rid, vm=req.vm, rec=result, late=late)
            else:
                self.counts["refused"] += 1
                j.write("move_refused", id=rid, vm=req.vm, error=str(result), late=late)
        now = time.monotonic_ns()
        gone = self.ctl_gone_ns
        for rid, req in list(self.outstanding.items()):
            if now >= req.deadline_ns or req.sent_ns < gone:
                del self.outstanding[rid]
                if self.busy.get(req.vm) == rid:
                    del self.busy[req.vm]
                self.counts["noreply"] += 1
                j.write("move_noreply", id=rid, vm=req.vm, waited_s=round((now - req.sent_ns) / NS, 3),
                        reason="the controller was killed" if req.sent_ns < gone else "timed out")

    def _watch_processes(self) -> None:
        """A process that is gone though we did not kill it: recorded (invariant processes-up)."""
        if self.cluster is None or not self.procs.lock.acquire(timeout=0.01):
            return
        try:
            for name, st in self.procs.state.items():
                if st == "down":
                    continue
                p = self._proc(name)
                if p is not None and not procs.alive(p):
                    self.procs.state[name] = "down"
                    if name == CONTROLLER:
                        self._controller_gone()
                    self.journal.write("proc_died", name=name, pid=p.pid, unexpected=True)
        finally:
            self.procs.lock.release()

    def _proc(self, name: str):
        c = self.cluster
        return c.controller if name == CONTROLLER else c.agents.get(name)

    def _drain(self) -> None:
        while self.outstanding:
            self._poll(100)

    # ------------------------------------------------------------------ nemesis (its own thread)

    def _nemesis(self) -> None:
        try:
            for a in self.schedule:
                due = self.t0_ns + a.at_ms * 1_000_000
                while not self.stop.is_set():
                    left = (due - time.monotonic_ns()) / NS
                    if left <= 0:
                        break
                    self.stop.wait(min(left, 0.05))
                if self.stop.is_set():
                    return
                self._act(a)
        except Exception as e:  # noqa: BLE001 - reported by the main thread
            self.nemesis_error = f"{type(e).__name__}: {e}"
            self.journal.write("nemesis_error", error=self.nemesis_error)
            self.stop.set()  # the run is broken: end the workload now (verdict: unknown)

    def _act(self, a: TimedFault) -> None:
        j = self.journal
        late_ms = round((time.monotonic_ns() - self.t0_ns) / 1e6 - a.at_ms, 1)
        if a.kind in ("partition", *schedule.NET_KINDS):
            applied, skipped = {}, []
            settings = schedule.agent_settings(a)
            with self.procs.lock:
                if self.netns and self.boundaries().get(a.fault) is None:
                    applied = self._kernel_inject(settings)
                else:
                    for host, args in settings.items():
                        held = self.net.setdefault(host, {"blocked": [], "rules": {}})
                        if "blocked" in args:
                            held["blocked"] = args["blocked"]
                        for r in args.get("add", []):
                            held["rules"][r["id"]] = r
                        if self.procs.state[host] != "up":
                            skipped.append(host)  # applied when it is resumed or restarted
                            continue
                        applied[host] = self._configure(host, args)
            self.active_faults[a.fault] = a.label
            j.write("fault", phase="inject", fault=a.fault, label=a.label, settings=settings, applied=applied,
                    skipped=skipped, late_ms=late_ms)
        elif a.kind == "heal":
            with self.procs.lock:
                self.net.clear()
                kernel = self._kernel_heal()
                healed = {h: self._configure(h, {"reset": True}) for h, st in self.procs.state.items()
                          if h != CONTROLLER and st == "up"}
            ended = [f for f, label in self.active_faults.items()
                     if not label.startswith(("kill", "pause", "restart"))]
            for f in ended:
                self.active_faults.pop(f, None)
            j.write("fault", phase="heal", fault=a.fault, label=a.label, ends=ended, healed=sorted(healed),
                    late_ms=late_ms, **({"kernel_packets": kernel} if kernel else {}))
        elif a.kind == "evacuate":
            t = threading.Thread(target=self._evacuate, args=(a, late_ms), name=f"evacuate-{a.targets[0]}", daemon=True)
            self.evacuations.append(t)
            t.start()  # (it waits for the host to empty; the schedule's other faults go on meanwhile)
        else:
            (target,) = a.targets
            self._process_action(a.kind, target, fault=a.fault, label=a.label, late_ms=late_ms)
            if a.kind in ("kill", "pause"):
                self.active_faults[a.fault] = a.label
            elif a.ends is not None:
                self.active_faults.pop(a.ends, None)
            else:
                for f, label in list(self.active_faults.items()):
                    if label in (f"kill {target}", f"pause {target}"):
                        self.active_faults.pop(f, None)

    def _add_rules(self) -> None:
        """Placement rules the schedule's evacuations name, added before the workload starts."""
        for f in self.sc.faults:
            if f.kind == "evacuate" and "anti" in f.params:
                try:
                    with self.cluster.controller_client() as ctl:
                        r = ctl.call("rule_add", {"kind": "anti", "vms": f.params["anti"]})
                    self.journal.write("rule_added", fault=f.index, rule=r)
                except ClusterError as e:
                    self.journal.write("rule_refused", fault=f.index, vms=f.params["anti"], error=str(e))

    def _evacuate(self, a: TimedFault, late_ms: float) -> None:
        """`dvs host evacuate`: retried while the controller is down or not answering (a
        controller killed meanwhile keeps the host in maintenance from its journal)."""
        j = self.journal
        k = a.params["max_concurrent"]
        host = a.targets[0]
        j.write("evacuate", phase="start", fault=a.fault, host=host, max_concurrent=k, late_ms=late_ms)
        deadline = time.monotonic() + 60.0
        while True:
            try:
                # Short waits, asked again: a controller killed meanwhile never answers this one.
                with self.cluster.controller_client(timeout_ms=10_000) as ctl:
                    rep = ctl.call("host_evacuate", {"name": host, "max_concurrent": k, "timeout_ms": 8_000})
                j.write("evacuate", phase="done", fault=a.fault, host=host, moves=rep["moves"],
                        elapsed_ms=rep["elapsed_ms"])
                return
            except ClusterError as e:
                if time.monotonic() >= deadline or self.stop.is_set():
                    j.write("evacuate", phase="failed", fault=a.fault, host=host, error=str(e))
                    return
                j.write("evacuate", phase="retry", fault=a.fault, host=host, error=str(e))
                time.sleep(0.5)  # (the controller is down or restarting: polling with a deadline)

    def _configure(self, host: str, args: dict) -> dict:
        try:
            with self.cluster.agent_client(host, timeout_ms=2_000) as a:
                return a.call("faults", args)
        except ClusterError as e:
            return {"error": str(e)}

    def _process_action(self, kind: str, name: str, **info) -> None:
        j = self.journal
        with self.procs.lock:
            p = self._proc(name)
            st = self.procs.state[name]
            if kind == "pause":
                if st == "up" and procs.alive(p):
                    os.kill(p.pid, signal.SIGSTOP)
                    self.procs.state[name] = "paused"
                j.write("proc", action="pause", name=name, pid=p.pid, was=st, **info)
            elif kind == "resume":
                if st == "paused" and procs.alive(p):
                    os.kill(p.pid, signal.SIGCONT)
                    self.procs.state[name] = "up"
                    self._reapply_net(name)
                j.write("proc", action="resume", name=name, pid=p.pid, was=st, **info)
            elif kind == "kill":
                self._kill(name, p, st, info)
            elif kind == "restart":
                if procs.alive(p):
                    self._kill(name, p, st, info | {"for_restart": True})
                self._start(name, info)

    def _kill(self, name: str, p, st: str, info: dict) -> None:
        self.procs.state[name] = "down"
        if procs.alive(p):
            os.kill(p.pid, signal.SIGKILL)
            procs.wait_gone(p, timeout_s=5)
        self.journal.write("proc", action="kill", name=name, pid=p.pid, was=st, **info)
        if name == CONTROLLER:
            self._controller_gone()

    def _start(self, name: str, info: dict) -> None:
        c = self.cluster
        spawn_ns = time.monotonic_ns()
        old = self._proc(name)
        if name == CONTROLLER:
            p = start_controller(c, self.sc.controller_args() + EVENTS_APPLIES)
        else:
            p = c.add_agent(name, agent_args=self.sc.agent_args())
        self.procs.state[name] = "up"
        self.journal.write("proc", action="restart", name=name, old_pid=old.pid if old else None, pid=p.pid,
                           spawn_ns=spawn_ns, life=self.life if name == CONTROLLER else None, **info)
        if name != CONTROLLER:
            self._reapply_net(name)
            if self.kernel_rules.get(name):  # its new API port must stay exempt for us
                from testbed.kernfaults import KernelFaults

                KernelFaults.of(c).apply_host(name, list(self.kernel_rules[name].values()))

    def _reapply_net(self, host: str) -> None:
        if host in self.net:
            held = self.net[host]
            args = {"reset": True, "blocked": held["blocked"], "add": list(held["rules"].values())}
            res = self._configure(host, args)
            self.journal.write("fault", phase="reapply", host=host, settings=args, applied=res)

    # ------------------------------------------------------------------ kernel rules (netns)

    def boundaries(self) -> dict[int, str | None]:
        """For each network fault of the scenario: None if the kernel enforces it in netns mode,
        else why it falls back to the agents' transport wrapper. Empty without netns."""
        if not self.netns:
            return {}
        if not self.kernel_why:
            from testbed.kernfaults import netem_missing, unsupported

            for f in self.sc.faults:
                if f.kind == "partition":
                    self.kernel_why[f.index] = None
                elif f.kind in ("loss", "delay", "dup", "reorder"):
                    a = next(a for a in self.schedule if a.fault == f.index and a.kind == f.kind)
                    rule = parse_rule(next(iter(schedule.agent_settings(a).values()))["add"][0])
                    self.kernel_why[f.index] = unsupported(rule, netem_missing() if f.kind == "delay" else None)
        return self.kernel_why

    def _kernel_inject(self, settings: dict) -> dict:
        from testbed.kernfaults import KernelFaults

        lab = self.cluster.netns
        if any("blocked" in args for args in settings.values()):
            blocked = {h: set(args["blocked"]) for h, args in settings.items()}
            lab.apply_partition(blocked)
            return {h: {"blocked": sorted(b), "by": "nftables bridge"} for h, b in blocked.items()}
        kf = KernelFaults.of(self.cluster)
        out = {}
        for host, args in settings.items():
            rules = self.kernel_rules.setdefault(host, {})
            for r in args["add"]:
                rules[r["id"]] = parse_rule(r)
            kf.apply_host(host, list(rules.values()))
            out[host] = {"by": f"nftables in {lab.namespace(host)}", "rules": sorted(rules)}
        return out

    def _kernel_heal(self) -> dict:
        """Remove every kernel fault rule; returns what their counters say they did (host -> id -> packets)."""
        if not self.netns or self.cluster is None or self.cluster.netns is None:
            return {}
        from testbed.kernfaults import KernelFaults

        kf = KernelFaults.of(self.cluster)
        counted = {h: {r["id"]: r["packets"] for r in kf.list_host(h)} for h in self.kernel_rules}
        cut = sum(r["packets"] or 0 for r in kf.list_partition())
        if cut:
            counted["(bridge)"] = {"partition": cut}
        self.cluster.netns.apply_partition({})
        kf.clear(self.kernel_rules)
        self.kernel_rules.clear()
        return counted

    # ------------------------------------------------------------------ the end: heal, settle, observe

    def _heal_all(self) -> None:
        j = self.journal
        with self.procs.lock:
            self.net.clear()  # nothing to re-apply to what is resumed or restarted below
            kernel = self._kernel_heal()
            for name, st in list(self.procs.state.items()):
                if st == "paused":
                    self._process_action("resume", name, fault=None, label=f"resume {name}", final_heal=True)
            if self.procs.state[CONTROLLER] == "down":
                self._process_action("restart", CONTROLLER, fault=None, label="restart controller",
                                     final_heal=True)
            for name in self.sc.host_names:
                if self.procs.state[name] == "down" and name not in self.sc.keep_down:
                    self._process_action("restart", name, fault=None, label=f"restart {name}", final_heal=True)
            healed = [h for h, st in self.procs.state.items()
                      if h != CONTROLLER and st == "up" and "error" not in self._configure(h, {"reset": True})]
        self.active_faults.clear()
        j.write("heal_all", healed=healed, keep_down=list(self.sc.keep_down),
                **({"kernel_packets": kernel} if kernel else {}))

    def should_be_up(self) -> list[str]:
        return [h for h in self.sc.host_names if h not in self.sc.keep_down]

    def _settle(self) -> tuple[bool, float, str]:
        start = time.monotonic()
        deadline = start + self.sc.settle_s
        ok_since = None
        why = ""
        while True:
            ok, why = self._agreement()
            now = time.monotonic()
            if ok:
                ok_since = ok_since or now
                if now - ok_since >= 0.5:
                    return True, now - start, ""
            else:
                ok_since = None
            if now >= deadline:
                return False, now - start, why
            time.sleep(0.2)

    def _agreement(self) -> tuple[bool, str]:
        c = self.cluster
        try:
            with c.controller_client(timeout_ms=2_000) as ctl:
                st = ctl.call("status")
                if st["ops_in_flight"]:
                    return False, f"{st['ops_in_flight']} controller ops in flight"
                exp = ctl.call("expected_table")
        except ClusterError as e:
            return False, str(e)
        want = set(self.should_be_up())
        if set(exp["live_hosts"]) != want:
            return False, f"controller's live hosts {sorted(exp['live_hosts'])} != {sorted(want)}"
        expected = {(v, m): (h, s, t) for v, m, h, s, t in exp["entries"]}
        for host in sorted(want):
            try:
                with c.agent_client(host, timeout_ms=2_000) as a:
                    table = a.call("mac_table")
            except ClusterError as e:
                return False, str(e)
            got = {(e["vlan"], parse_mac(e["mac"])): (e["host"], e["seq"], e["tombstone"]) for e in table["entries"]}
            if got != expected:
                return False, f"{host}'s table differs from the inventory"
        return True, ""

    def _history_from_events(self) -> None:
        """Every apply row and every finished move and HA restart, of every controller life, from
        the controller's events file, as `applies` and `controller_moves` history records."""
        j = self.journal
        evs, bad = evlog.read_all(self.state_dir, procs=[CONTROLLER])
        lives: dict[int, int] = {}  # controller pid -> its life (in the order they wrote)
        rows: dict[int, list] = {}
        moves: dict[int, list] = {}
        for e in evs:
            life = lives.setdefault(e["pid"], len(lives))
            if e["kind"] == "apply.rows":
                rows.setdefault(life, []).extend(e["rows"])
            elif e["kind"] in ("move.converged", "move.failed") and e.get("op_kind") in ("move", "restart"):
                moves.setdefault(life, []).append(_move_record(e))
        if not lives:
            j.write("applies_unavailable", life=0, final=True,
                    error=f"no controller events in {evlog.events_dir(self.state_dir)}")
            return
        for life in lives.values():
            got = rows.get(life, [])
            for i in range(0, max(1, len(got)), APPLIED_PAGE):
                page = got[i : i + APPLIED_PAGE]
                j.write("applies", life=life, since=i, start=i, next=i + len(page), lost=0, rows=page,
                        source="events", **({"bad_lines": bad} if bad and i == 0 else {}))
            j.write("controller_moves", life=life, final=life == len(lives) - 1, moves=moves.get(life, []))

    def _observe(self) -> None:
        j, c = self.journal, self.cluster
        try:
            with c.controller_client(timeout_ms=5_000) as ctl:
                j.write("final_inventory", status=ctl.call("status"), vms=ctl.call("vm_list", {"all": True})["vms"],
                        expected=ctl.call("expected_table"), rules=ctl.call("rule_list")["rules"])
        except ClusterError as e:
            j.write("final_inventory", error=str(e))
        alive = {}
        for name in [*self.sc.host_names, CONTROLLER]:
            p = self._proc(name)
            alive[name] = {"pid": p.pid if p else None, "alive": bool(p and procs.alive(p)),
                           "should_be_up": name == CONTROLLER or name not in self.sc.keep_down,
                           "believed": self.procs.get(name)}
        for host in self.sc.host_names:
            if not alive[host]["alive"]:
                continue
            try:
                with c.agent_client(host, timeout_ms=3_000) as a:
                    table = a.call("mac_table")
                    st = a.call("status")
                j.write("final_table", host=host, digest=table["digest"], entries=table["entries"],
                        ports=table["ports"], incarnation=st["incarnation"], stats=st["stats"],
                        last_error=st.get("last_error", ""))
                alive[host]["answers"] = True
            except ClusterError as e:
                j.write("final_table", host=host, error=str(e))
                alive[host]["answers"] = False
        j.write("final_procs", procs=alive)


def start_controller(cluster: Cluster, controller_args: list[str], ready_timeout_s: float = 30.0):
    """Cluster.start_controller, but with the scenario's controller settings (it drops them)."""
    endpoint = cluster.controller_endpoint
    [p] = procs.wait_ready(
        [procs.spawn("controller", "controller",
                     ["--bind", endpoint, "--journal", str(cluster.state_dir / JOURNAL_FILE), *cluster.key_args(),
                      *controller_args, *cluster.owner_args(), *cluster.events_args(CONTROLLER)],
                     cluster.state_dir / "logs" / "controller.log")],
        ready_timeout_s,
    )
    cluster.controller = p
    cluster.save()
    return p


def _move_record(e: dict) -> dict:
    """A move.converged / move.failed event as the record `dvs moves` gives (what the checker reads)."""
    rec = {k: v for k, v in e.items() if k not in ("t_ns", "ts", "proc", "pid", "kind", "message", "op_kind",
                                                   "convergence_ms", "hosts", "outcome")}
    rec["kind"] = e["op_kind"]
    rec["latency_ms"] = e.get("convergence_ms")
    rec.setdefault("converged", e["kind"] == "move.converged")
    return rec
