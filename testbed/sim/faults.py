"""The simulator's side of the one fault schedule (testbed/schedule.py), and `dvs sim --faults`.

`Faults.apply_fault` interprets a `TimedFault` on the simulated cluster and network:
- partition: its `groups` (the controller reaches every group unless one names it), or, for a
  partition that is no set of groups (a bridge host that reaches both sides), its `blocked`
  relation host by host;
- heal: the partition ends and every timed network fault below is reset;
- loss / dup / reorder (`p`) and delay (`delay_ms` + `jitter_ms`), two ways:
  - a whole-cluster rule (every host, no `types`, no `from` or every host as `from`: what the
    shipped scenarios and --loss/--dup/--reorder use) is the network model's own: on all
    agent-to-agent traffic, and on the control connections unless `from` leaves out the
    controller; one in force per kind (a timed one takes the place of a `window` rule of
    --loss & co. while it lasts); a delay's uniform jitter is approximated as an exponential
    jitter of half its width;
  - any other rule acts exactly where the agents' transport wrapper would: on what each of its
    `targets` receives, from the `from` peers only (if given), of the `types` only (if given).
    Each such host gets an agent/faults.py `NetFaults` (`rx_faults`), configured with the very
    call the real nemesis sends it (schedule.agent_settings: the rule and its seed), and every
    frame that reaches it goes through `NetFaults.plan` (network.py); rules add up, as on an
    agent. A second whole-cluster rule of a kind already in force is taken this way too.
    What the controller receives has no wrapper (the real controller has none). The rules a
    host holds outlive its restarts (the chaos runner applies them again), and the result's
    `faults.receivers` gives each host's counters and hits per rule;
- kill / restart / pause / resume of an agent or the controller: a crash, a new incarnation,
  or SIGSTOP's effect: nothing the process would handle runs (timers included) and what
  arrives for it waits, to be handled at resume (as a stopped process's sockets buffer it);
- evacuate: `dvs host evacuate` through the client (with the scenario's anti-affinity rule
  added before the workload starts).

Time: a scenario's `at_s` (real seconds after the workload starts) is `at_ms` = at_s x 1000
virtual ms after the fault window opens, which is when the simulated workload starts; the
moves of the plan go out at their `t_s` the same way, and the cores run with the scenario's
[agent] and [controller] settings, so every timeout means the same span in both worlds.

`ScenarioClient` runs a chaos scenario's plan (the same moves, the same schedule, drawn from
the same seed by testbed/chaos/scenario.py) and writes the history in the chaos runner's
schema (testbed/chaos/history.py, docs/scenarios.md) with virtual ns in `t_ns`; the one
checker (testbed/chaos/checker.py) then judges it.

It stays one module (a little over 500 lines): the interpreter of the schedule and the client
that runs the scenario's plan share one reading of the scenario (its timing, its settings, its
seed), and the property that a scenario means the same here as on real processes is easiest to
check when that reading is in one place.
"""

from __future__ import annotations

from dataclasses import replace
from typing import TYPE_CHECKING

from agent.faults import NetFaults
from testbed.schedule import CONTROLLER, NET_KINDS, TimedFault, agent_settings
from testbed.sim.scheduler import CONTROLLER as CTL_DST
from testbed.sim.scheduler import K_TIMER, NS_PER_MS, NS_PER_US
from testbed.sim.spec import CTL, Partition
from testbed.sim.workload import Client

if TYPE_CHECKING:
    from testbed.sim.engine import Simulator

NS = 1_000_000_000


class Faults:
    """Interpreting timed faults (a part of Simulator)."""

    def _init_faults(self) -> None:
        self.paused: dict[int, list] = {}  # destination id -> events held while it is stopped
        self.timed_net: dict[str, TimedFault] = {}  # network kind -> the fault in force
        self.blocked: list[set[int]] | None = None  # host index -> host indexes it cannot reach
        self.ctl_blocked: set[int] = set()  # host indexes cut from the controller (a `blocked` partition)
        self.history = None  # a Journal when the run writes a chaos history
        self.lives_read: set[int] = set()  # controller lives whose move history is in it
        self.proc_state: dict[str, str] = {}  # process -> up | paused | down
        self.ctl_life = 1
        self.wrappers: dict[int, NetFaults] = {}  # host index -> its receive-side rules, once it had any
        self.rx_hits: dict[str, dict[str, int]] = {}  # host -> rule id -> frames it acted on, of healed rules

    def lay_out(self, schedule, t0: int) -> None:
        for tf in schedule:
            if tf.at_ms == 0 and tf.kind in NET_KINDS:
                self.apply_fault(tf)  # in force for the first move, which goes out at t0 too
            else:
                self.at(t0 + tf.at_ms * NS_PER_MS, self.apply_fault, tf)

    def apply_fault(self, tf: TimedFault) -> None:
        k = tf.kind
        if k == "partition":
            self._partition(tf)
        elif k == "heal":
            if self.partitioned:
                self.heal_partition(None)
            self.blocked = None
            self.ctl_blocked = set()
            if self.timed_net:
                self.timed_net.clear()
                self._set_net()
            if self.rx_faults:
                self._rx_heal()
        elif k in NET_KINDS:
            cur = self.timed_net.get(k)
            if self._whole(tf) and (cur is None or cur.params.get("window")):
                self.timed_net[k] = tf
                self._set_net()
            else:
                self._rx_add(tf)
        elif k in ("kill", "restart", "pause", "resume"):
            for who in tf.targets:
                self._process(k, who, tf)
            return
        elif k == "evacuate":
            self.client.evacuate(tf)
            return
        if self.history is not None:
            self._note("fault", phase="heal" if k == "heal" else "inject", fault=tf.fault, label=tf.label or k,
                       ends=tf.ends, schedule=tf.to_json())

    def _note(self, ev: str, **fields) -> None:
        if self.history is not None:
            self.history.write(ev, **fields)

    # ---- network

    def _partition(self, tf: TimedFault) -> None:
        groups = tf.params.get("groups")
        self.blocked = None
        self.ctl_blocked = set()
        if groups is not None:
            self.start_partition(Partition(tf.at_ms, tf.at_ms + 1, tuple(
                tuple(CTL if h == CONTROLLER else h for h in g) for g in groups)))
            return
        # Not a set of groups: every agent keeps its own list of whom it cannot reach.
        self.gid = [0] * len(self.hosts)
        self.ctl_gid = 0
        self.blocked = [set() for _ in self.hosts]
        for h, cut in tf.params["blocked"].items():
            i = self.hidx[h]
            for x in cut:
                if x == CONTROLLER:
                    self.ctl_blocked.add(i)
                else:
                    self.blocked[i].add(self.hidx[x])
                    self.blocked[self.hidx[x]].add(i)
        self.partitioned = True

    def _whole(self, tf: TimedFault) -> bool:
        """On every host, of every type, from everyone (or every agent: --loss without --ctl-faults)."""
        p = tf.params
        peers = p.get("from")
        return (p.get("types") is None and (not tf.targets or set(tf.targets) == set(self.hosts))
                and (peers is None or set(peers) - {CONTROLLER} == set(self.hosts)))

    def _rx_add(self, tf: TimedFault) -> None:
        """A rule on what its targets receive: each target's wrapper gets the nemesis's call."""
        if not tf.targets:
            tf = replace(tf, targets=tuple(self.hosts))  # (no targets: every host, as `dvs fault loss`)
        for h, args in agent_settings(tf).items():
            i = self.hidx[h]
            nf = self.wrappers.get(i)
            if nf is None:
                nf = self.wrappers[i] = NetFaults()
            nf.configure(args)
            self.rx_faults[i] = nf
        self.rx_match.clear()

    def _rx_heal(self) -> None:
        for i, nf in self.rx_faults.items():
            self._rx_harvest(i, nf)
            nf.configure({"reset": True})
        self.rx_faults = {}
        self.rx_match.clear()

    def _rx_harvest(self, i: int, nf: NetFaults) -> None:
        hits = self.rx_hits.setdefault(self.hosts[i], {})
        for rid, n in nf.hits.items():
            hits[rid] = hits.get(rid, 0) + n

    def receivers_report(self) -> dict:
        """Per host that held a receive-side rule: what its wrapper dropped, delayed and
        duplicated, and the frames each rule acted on (as `dvs fault show` reports an agent's)."""
        for i, nf in self.rx_faults.items():
            self._rx_harvest(i, nf)
            nf.hits = dict.fromkeys(nf.hits, 0)  # (counted once)
        out = {}
        for i in sorted(self.wrappers):
            nf, h = self.wrappers[i], self.hosts[i]
            out[h] = {"dropped": nf.dropped, "delayed": nf.delayed, "duplicated": nf.duplicated,
                      "hits": dict(sorted(self.rx_hits.get(h, {}).items()))}
        return out

    def _set_net(self) -> None:
        """Loss, duplication, reordering and delay: the fault window's (--loss ...) unless a
        timed fault is in force."""
        net = self.cfg.net
        window = self.f0_ns is not None and self.f1_ns is None
        t = self.timed_net
        self.loss = t["loss"].params["p"] if "loss" in t else (net.loss if window else 0.0)
        self.dup = t["dup"].params["p"] if "dup" in t else (net.dup if window else 0.0)
        self.reorder = "reorder" in t or (net.reorder and window)
        self.net = replace(net, reorder_prob=t["reorder"].params["p"]) if "reorder" in t else net
        delay = t.get("delay")
        self.base_ns = net.base_latency_us * NS_PER_US + (int(delay.params["delay_ms"] * NS_PER_MS) if delay else 0)
        self.jitter_ns = net.jitter_mean_us * NS_PER_US + (int(delay.params["jitter_ms"] * NS_PER_MS / 2)
                                                           if delay else 0)
        self.p2p_faulty = bool(self.loss or self.dup or self.reorder)
        self.ctl_faulty = (net.ctl_faults and window) or any(
            f.params.get("from") is None or CONTROLLER in f.params["from"] for f in t.values())

    # ---- processes

    def _dst(self, who: str) -> int | None:
        if who == CONTROLLER:
            return CTL_DST
        a = self.current[self.hidx[who]]
        return None if a is None else a.iid

    def _process(self, kind: str, who: str, tf: TimedFault | None) -> None:
        info = {"fault": None if tf is None else tf.fault, "label": f"{kind} {who}"}
        st = self.proc_state.get(who, "up")
        pid = self._pid(who)
        if kind == "pause":
            if st == "up":
                self.paused[self._dst(who)] = []
                self.proc_state[who] = "paused"
            self._note("proc", action="pause", name=who, pid=pid, was=st, **info)
        elif kind == "resume":
            if st == "paused":
                self._resume(who)
            self._note("proc", action="resume", name=who, pid=pid, was=st, **info)
        elif kind == "kill":
            self._kill(who, st, info)
        elif kind == "restart":
            if st != "down":
                self._kill(who, st, info | {"for_restart": True})
            self._start(who, info)

    def _pid(self, who: str) -> int:
        return self.ctl_life if who == CONTROLLER else 1000 * self.incarnations[self.hidx[who]] + self.hidx[who] + 1

    def _kill(self, who: str, st: str, info: dict) -> None:
        pid = self._pid(who)
        dst = self._dst(who)
        if dst is not None:
            self.paused.pop(dst, None)  # what waited for a stopped process dies with it
        if st != "down":
            if who == CONTROLLER:
                if self.history is not None:
                    self.controller_moves(final=False)  # its move history dies with it
                self.crash_controller()
            else:
                self.crash_agent(self.hidx[who])
        self.proc_state[who] = "down"
        self._note("proc", action="kill", name=who, pid=pid, was=st, **info)

    def _start(self, who: str, info: dict) -> None:
        old = self._pid(who)
        if who == CONTROLLER:
            self.ctl_life += 1
            self.restart_controller()
        else:
            self.start_agent(self.hidx[who])
        self.proc_state[who] = "up"
        self._note("proc", action="restart", name=who, old_pid=old, pid=self._pid(who), spawn_ns=self.now,
                   life=self.ctl_life if who == CONTROLLER else None, **info)

    def _resume(self, who: str) -> None:
        dst = self._dst(who)
        held = self.paused.pop(dst, [])
        self.proc_state[who] = "up"
        now = self.now
        for ev in held:
            if ev[2] != K_TIMER:
                self._push(now, dst, *ev[2:])
        # Its timers were held too: it looks at them at once, as a process woken by SIGCONT does.
        if dst == CTL_DST:
            self.ctl_timer_at = None
            self._arm_controller(now)
        else:
            a = self.agents[dst]
            a.timer_at = now
            a.timers.add(now)
            self._push(now, dst, K_TIMER)

    def members_agree(self) -> bool:
        """As the chaos runner settles: the controller's live hosts are the ones that should be
        up (a host killed for good must first be declared dead). For every run, not only
        scenarios: a --crashes run whose moves finished before the controller declared the
        crashed host dead stopped there, and its history failed processes-up."""
        want = {h for h in self.hosts if self.proc_state.get(h, "up") != "down"}
        return set(self.controller.inv.live_hosts()) == want

    def heal_all(self) -> None:
        """The end of the workload, as the chaos runner does it: network faults reset, paused
        processes resumed, the controller and killed agents restarted (unless end.keep_down)."""
        sc = self.scenario
        self.apply_fault(TimedFault(0, "heal", (), {}, None, None, "heal"))
        for who, st in sorted(self.proc_state.items()):
            if st == "paused":
                self._process("resume", who, None)
        if self.proc_state.get(CONTROLLER) == "down":
            self._process("restart", CONTROLLER, None)
        for h in self.hosts:
            if self.proc_state.get(h) == "down" and h not in self.keep_down():
                self._process("restart", h, None)
        self._note("heal_all", healed=[h for h in self.hosts if self.proc_state.get(h) == "up"],
                   keep_down=list(sc.keep_down))


    # ---- what the chaos runner reads at the end (a part of Simulator)

    def controller_moves(self, *, final: bool) -> None:
        sim = self
        if not sim.ctl_up or sim.ctl_life in self.lives_read:
            return
        self.lives_read.add(sim.ctl_life)
        ctl = sim.controller
        moves = ctl.api.api_moves({"last": 1_000_000}, sim.now, None, None)["moves"]
        self.history.write("controller_moves", life=sim.ctl_life, final=final, moves=moves)

    def observe(self) -> None:
        sim, h = self, self.history
        if sim.applies:
            h.write("applies", life=sim.ctl_life, since=0, start=0, next=len(sim.applies), lost=0, rows=sim.applies)
        self.controller_moves(final=True)
        if sim.ctl_up and CONTROLLER not in {w for w, st in sim.proc_state.items() if st == "paused"}:
            ctl, now = sim.controller, sim.now
            h.write("final_inventory", status=ctl.api.api_status({}, now, None, None),
                    vms=ctl.api.api_vm_list({"all": True}, now, None, None)["vms"],
                    expected=ctl.api.api_expected_table({}, now, None, None),
                    rules=ctl.api.api_rule_list({}, now, None, None)["rules"])
        else:
            h.write("final_inventory", error="the controller is not running")
        procs = {}
        for name in [*sim.hosts, CONTROLLER]:
            st = sim.proc_state.get(name, "up")
            procs[name] = {"pid": sim._pid(name), "alive": st != "down",
                           "should_be_up": name == CONTROLLER or name not in self.keep_down(), "believed": st}
        for host in sim.hosts:
            a = sim.current[sim.hidx[host]]
            if a is None:
                continue
            if sim.proc_state.get(host) == "paused":
                h.write("final_table", host=host, error="stopped (SIGSTOP): it does not answer")
                procs[host]["answers"] = False
                continue
            table = a.core.mac_table()
            st = a.core.status(sim.now)
            h.write("final_table", host=host, digest=table["digest"], entries=table["entries"], ports=table["ports"],
                    incarnation=st["incarnation"], stats=st["stats"], last_error=st.get("last_error", ""))
            procs[host]["answers"] = True
        h.write("final_procs", procs=procs)

    def keep_down(self) -> tuple[str, ...]:
        """Agents meant to stay down at the end: the scenario's end.keep_down, or the agents a
        --crashes spec never restarts."""
        if self.scenario is not None:
            return self.scenario.keep_down
        return tuple(c.host for c in self.cfg.crashes if c.restart_ms is None and c.host != CTL)


class ScenarioClient(Client):
    """The chaos runner's workload on the simulator: the plan's moves at their times, the
    schedule's faults, the runner's final heal, then the observations it makes, written to
    the history."""

    def __init__(self, sim: Simulator, sc, plan, schedule) -> None:
        super().__init__(sim)
        self.sc, self.plan, self.schedule = sc, plan, schedule
        self.move_ids = 0
        self.busy: dict[str, int] = {}  # vm -> our move id in flight
        self.sent: dict[int, tuple] = {}  # req id -> (move id, vm, sent_ns)
        self.outstanding: set[int] = set()
        self.rules_pending = 0
        self.evac: TimedFault | None = None
        self.evac_started_ns = 0
        self.workload_over = False
        self.t0_ns: int | None = None

    @property
    def h(self):
        return self.sim.history

    # ---- the run

    def _start_moves(self) -> None:
        sim = self.sim
        sim.on_phase("created", sim.now)
        inv = sim.controller.inv
        self.h.write("vms_created", vms=len(inv.vms), placement={n: v.host for n, v in sorted(inv.vms.items())})
        for f in self.sc.faults:
            if f.kind == "evacuate" and "anti" in f.params:
                self.rules_pending += 1
                self.call("rule_add", {"kind": "anti", "vms": f.params["anti"]}, "rule", f)
        if not self.rules_pending:
            self._begin()

    def _begin(self) -> None:
        sim = self.sim
        self.t0_ns = sim.now
        self.h.write("workload_start", t0_ns=self.t0_ns, duration_s=self.sc.duration_s)
        sim.open_fault_window()
        for i, m in enumerate(self.plan.moves):
            sim.at(self.t0_ns + round(m.t_s * NS), self._issue, m, i)
        sim.at(self.t0_ns + round(self.sc.duration_s * NS), self._end_workload)

    def _end_workload(self) -> None:
        sim = self.sim
        self.workload_over = True
        self.h.write("workload_end", outstanding=len(self.outstanding), counts={})
        sim.heal_all()
        sim.close_fault_window()
        self._maybe_done()

    def _maybe_done(self) -> None:
        sim = self.sim
        if self.workload_over and not self.outstanding and self.evac is None and sim.moves_done_ns is None:
            sim.on_phase("moved", sim.now)
            sim.moves_done_ns = sim.now
            sim.traffic_at_done = (sim.msgs, sim.bytes)
            sim._start_settling()

    def _issue(self, pm, index: int) -> None:
        sim, sc = self.sim, self.sc
        hosts = sc.host_names
        if pm.vm in self.busy:
            self.h.write("move_skip", plan_index=index, vm=pm.vm, reason=f"our move #{self.busy[pm.vm]} is in flight")
            return
        vm = sim.controller.inv.vms.get(pm.vm) if sim.ctl_up else None
        cur = vm.host if vm is not None else None
        dst = None
        for k in range(len(hosts)):
            cand = hosts[(pm.dst_index + k) % len(hosts)]
            if cand == cur or (sc.avoid_down_hosts and sim.proc_state.get(cand, "up") != "up"):
                continue
            dst = cand
            break
        if dst is None:
            self.h.write("move_skip", plan_index=index, vm=pm.vm, reason="no running destination")
            return
        self.move_ids += 1
        mid = self.move_ids
        self.call("vm_move", {"name": pm.vm, "to": dst}, "planned", mid, timeout_ms=sc.op_timeout_ms + 5_000)
        self.sent[self.req_ids] = (mid, pm.vm, sim.now)
        self.outstanding.add(self.req_ids)
        self.busy[pm.vm] = mid
        self.h.write("move_req", id=mid, vm=pm.vm, src_known=cur, dst=dst, planned_dst=hosts[pm.dst_index],
                     storm=pm.storm, plan_index=index)

    def _timeout(self, req_id: int, method: str, timeout_ms: int) -> None:
        if req_id in self.pending:
            self.pending.pop(req_id)
            self._noreply(req_id)

    def _noreply(self, req_id: int) -> None:
        if req_id not in self.sent:
            return
        mid, vm, sent = self.sent[req_id]
        self.outstanding.discard(req_id)
        self.busy.pop(vm, None)
        self.h.write("move_noreply", id=mid, vm=vm, waited_s=round((self.sim.now - sent) / NS, 3))
        self._maybe_done()

    def controller_crashed(self) -> None:
        # A killed controller answers nothing it was asked: those moves get no reply (the
        # checker allows that while the controller was down); an evacuation is asked again.
        self.paused = True
        for req_id, (kind, _ctx) in sorted(self.pending.items()):
            if kind == "planned":
                self._noreply(req_id)
        self.pending.clear()
        if self.evac is not None:
            self._evac_again = True
            self.h.write("evacuate", phase="retry", fault=self.evac.fault, host=self.evac.targets[0],
                         error="the controller was killed")

    def on_frames(self, frames: list[bytes], t: int) -> None:
        from agent import wire
        from agent.wire import MsgType, WireError

        for frame in frames:
            try:
                mt, body = wire.decode(frame, max(len(frame), wire.MAX_FRAME_BYTES))
            except WireError:
                continue
            if mt is not MsgType.REPLY:
                continue
            req_id, ok, result = body
            kind, ctx = self.pending.pop(req_id, (None, None))
            if kind == "ready":
                self._on_ready(ok, result)
            elif kind == "create":
                self._on_create(ok, result)
            elif kind == "rule":
                self.h.write("rule_added" if ok else "rule_refused", fault=ctx.index,
                             **({"rule": result} if ok else {"vms": ctx.params["anti"], "error": str(result)}))
                self.rules_pending -= 1
                if not self.rules_pending:
                    self._begin()
            elif kind == "planned":
                self._on_planned(req_id, ok, result)
            elif kind == "evacuate":
                self._on_evac(ok, result)

    def _on_planned(self, req_id: int, ok: bool, result) -> None:
        mid, vm, _ = self.sent[req_id]
        self.outstanding.discard(req_id)
        self.busy.pop(vm, None)
        if ok:
            self.h.write("move_ack", id=mid, vm=vm, rec=result, late=False)
            self.records.append({k: result.get(k) for k in ("vm", "src", "dst", "seq", "converged", "latency_ms")})
        else:
            self.h.write("move_refused", id=mid, vm=vm, error=str(result), late=False)
        self._maybe_done()

    # ---- evacuation

    def evacuate(self, tf: TimedFault) -> None:
        self.evac = tf
        self.evac_started_ns = self.sim.now
        self.h.write("evacuate", phase="start", fault=tf.fault, host=tf.targets[0],
                     max_concurrent=tf.params["max_concurrent"], late_ms=0.0)
        if self.sim.ctl_up:
            self._evacuate()
        else:
            self._evac_again = True

    def _evacuate(self) -> None:
        tf = self.evac
        self.call("host_evacuate", {"name": tf.targets[0], "max_concurrent": tf.params["max_concurrent"],
                                    "timeout_ms": 60_000}, "evacuate", timeout_ms=70_000)

    def _on_evac(self, ok: bool, result) -> None:
        tf, self.evac = self.evac, None
        if ok:
            self.h.write("evacuate", phase="done", fault=tf.fault, host=tf.targets[0], moves=result["moves"],
                         elapsed_ms=result["elapsed_ms"])
        else:
            self.h.write("evacuate", phase="failed", fault=tf.fault, host=tf.targets[0], error=str(result))
        self._maybe_done()
