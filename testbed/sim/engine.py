"""The deterministic simulator: the real AgentCore and ControllerCore on a virtual clock.

One process, no sockets, no asyncio, no wall clock; every random choice comes from
`random.Random` instances seeded from the run's seed, so one seed gives exactly one run.
`Simulator` is put together from its parts, one module each:
- scheduler.py: the calendar queue of events and the loop (virtual time, batches);
- network.py: latency, rx ticks, loss, duplication, reordering, partitions (the network model);
- cluster.py: the agents and the controller, how their outputs are routed, crashes and restarts;
- checks.py: the safety monitor's record, agreement, final checks and the result;
- workload.py: the client (ready, create, moves or evacuation);
- config.py: SimConfig and NetConfig, the liveness bound, and the replay command.
This module opens and closes the fault window, which ties the workload to the faults.
"""

from __future__ import annotations

import gc
import random
from dataclasses import replace

from controller.config import ControllerConfig
from dvswitch.naming import host_names
from testbed import schedule
from testbed.chaos.history import Journal
from testbed.sim.checks import Checks
from testbed.sim.cluster import Agent, Cluster, MonitoredTable
from testbed.sim.config import (
    MOVES_PER_HOSTS,
    NetConfig,
    SimConfig,
    agent_config_for,
    concurrency_for,
    gossip_interval_ms,
    liveness_bound_ms,
    replay_command,
)
from testbed.sim.faults import Faults, ScenarioClient
from testbed.sim.network import Network
from testbed.sim.scheduler import NS_PER_MS, NS_PER_US, Scheduler
from testbed.sim.spec import faults_end_ms
from testbed.sim.workload import Client

__all__ = [
    "MOVES_PER_HOSTS", "Agent", "Client", "MonitoredTable", "NetConfig", "SimConfig", "Simulator",
    "agent_config_for", "concurrency_for", "gossip_interval_ms", "liveness_bound_ms", "replay_command", "run_sim",
]


class Simulator(Faults, Scheduler, Network, Cluster, Checks):
    """One run. Its parts are classes of one object rather than objects that call each other:
    the loop, the network and the routing run millions of times per virtual second and read
    each other's state (subscriptions, partition groups, counters) as plain attributes; each
    part's state is set up by its own `_init_*`, in its module."""

    table_class = MonitoredTable

    def __init__(self, cfg: SimConfig, on_phase=None, *, history: bool = False) -> None:
        if cfg.hosts < 1:
            raise ValueError("a simulation needs at least one host")
        # `dvs sim --faults SCENARIO.toml`: the chaos scenario's cluster, settings, plan and
        # schedule (testbed/sim/faults.py); None: the workload and faults of the options.
        self.scenario = self.plan = None
        if cfg.faults is not None:
            cfg, self.scenario, self.plan, self.schedule = scenario_config(cfg)
        else:
            self.schedule = schedule.from_sim_flags(cfg.partitions, cfg.crashes, cfg.net, host_names(cfg.hosts))
        self.cfg = cfg
        self.applies: list | None = None  # apply rows for a chaos history
        # on_phase(name, virtual_ns): called as the run passes "ready", "created", "moved",
        # "faults_stopped" and "end" (the command uses it to time the phases in wall-clock).
        self.on_phase = on_phase or (lambda name, t: None)
        # on_progress(sim): called every 2**16 events when set (a progress line for long runs).
        self.on_progress = None
        self.agent_config = agent_config_for(cfg)
        # The apply log is for the chaos checker, the move history for `dvs moves`: the simulator
        # watches every merge itself and takes each move's record from the client's reply (a
        # history of 2,000 moves at 1,000 hosts holds 2 million apply stamps).
        # (`history`: a chaos history of a plain run, `dvs sim --history`: the controller then
        # keeps its move history, which the checker reads.)
        self.ctl_config = cfg.controller_config or ControllerConfig(applied_log_max=0,
                                                                    history_max=100_000 if history else 0)
        self.work_rng = random.Random(f"{cfg.seed}/workload")
        self.start_rng = random.Random(f"{cfg.seed}/start")
        self._init_scheduler()
        self._init_cluster(cfg.hosts)
        self._init_network(cfg.net, cfg.seed, cfg.hosts)
        self._init_checks()
        self._init_faults()
        # Fault window and workload.
        self.f0_ns: int | None = None
        self.f1_ns: int | None = None
        self.moves_done_ns: int | None = None
        self.traffic_at_f0 = (0, 0)
        self.traffic_at_done = (0, 0)
        self.crash_log: list[dict] = []
        if self.scenario is None:
            self.client = Client(self)
            if history:
                self.history = Journal(None, clock=lambda: self.now)
                self.applies = []
                self.history.write("run_start", scenario={"name": "dvs sim", "path": None, "hosts": cfg.hosts,
                                                          "vms": cfg.vms},
                                   seed=cfg.seed, schedule=schedule.to_json(self.schedule), simulated=True,
                                   replay=replay_command(cfg))
        else:
            self.history = Journal(None, clock=lambda: self.now)
            self.applies = []
            self.client = ScenarioClient(self, self.scenario, self.plan, self.schedule)
            self.history.write("run_start", scenario=self.scenario.to_json(), seed=cfg.seed, plan=self.plan.to_json(),
                               schedule=schedule.to_json(self.schedule), simulated=True, replay=replay_command(cfg))

    def run(self) -> dict:
        cfg = self.cfg
        spread = max(1, cfg.start_spread_us * NS_PER_US)
        starts = sorted((self.start_rng.randrange(spread), i) for i in range(cfg.hosts))
        for t, i in starts:
            self.at(t, self.start_agent, i)
        self._arm_controller(0)
        self.at(0, self.client.begin)
        # Millions of long-lived small objects (table entries, queued events) and no garbage
        # cycles worth chasing: the cyclic GC would rescan them all, again and again.
        gc_was_on = gc.isenabled()
        gc.disable()
        try:
            self._loop()
            self.on_phase("end", self.now)
            result = self.result()
            if self.history is not None:
                result["chaos"] = self._chaos_verdict()
            return result
        finally:
            if gc_was_on:
                gc.enable()

    def open_fault_window(self) -> None:
        """The first move is about to be sent: faults start, scheduled ones are laid out."""
        t = self.now
        self.f0_ns = t
        self.traffic_at_f0 = (self.msgs, self.bytes)
        # The one schedule type: --loss, --dup, --reorder, --partitions and --crashes are
        # shorthands for it (its whole-window rules take effect now, before the first move).
        if self.history is not None and self.scenario is None:
            self.history.write("workload_start", t0_ns=t, duration_s=None)
        self.lay_out(self.schedule, t)
        if self.scenario is not None:
            self._scheduled_end = t  # (the workload's end closes the window: ScenarioClient)
            return
        scheduled_end = t + faults_end_ms(self.cfg.partitions, self.cfg.crashes) * NS_PER_MS
        if self.cfg.fault_ms is not None:
            self.at(max(t + self.cfg.fault_ms * NS_PER_MS, scheduled_end), self.close_fault_window)
        self._scheduled_end = scheduled_end

    def moves_finished(self) -> None:
        self.on_phase("moved", self.now)
        self.moves_done_ns = self.now
        self.traffic_at_done = (self.msgs, self.bytes)
        if self.cfg.fault_ms is None:
            self.at(max(self.now, self._scheduled_end), self.close_fault_window)
        elif self.f1_ns is not None:
            self._start_settling()

    def close_fault_window(self) -> None:
        if self.f1_ns is not None:
            return
        self.f1_ns = self.now
        self.on_phase("faults_stopped", self.now)
        self.p2p_faulty = self.ctl_faulty = False
        self.loss = self.dup = 0.0
        self.reorder = False
        self.timed_net.clear()  # (the whole-window rules end here)
        if self.moves_done_ns is not None:
            self._start_settling()


    def _chaos_verdict(self) -> dict:
        """The run's history, as the chaos runner would have written it, judged by the one checker."""
        from testbed.chaos.checker import History, judge

        h = self.history
        if self.client.error:
            h.write("run_error", error=self.client.error)
        settled = self.agree_ns is not None
        since = self.f1_ns if self.f1_ns is not None else self.now
        h.write("settled", ok=settled, elapsed_s=round(((self.agree_ns or self.now) - since) / 1e9, 3),
                why="" if settled else "no agreement before the settle deadline")
        self.observe()
        h.write("run_end", wall_s=None)
        return judge(History(h.records, []))


def scenario_config(cfg: SimConfig):
    """A SimConfig for `--faults SCENARIO.toml`: the scenario's cluster and settings, its plan
    and schedule for cfg.seed (a bad file raises ClusterError, one line)."""
    from agent.config import AgentConfig
    from testbed.chaos.scenario import build_plan, load_scenario

    sc = load_scenario(cfg.faults)
    plan = build_plan(sc, cfg.seed)
    ctl = ControllerConfig(**{**sc.controller, "applied_log_max": 0})
    cfg = replace(cfg, hosts=sc.hosts, vms=sc.vms, moves=len(plan.moves), agent_config=AgentConfig(**sc.agent),
                  controller_config=ctl, settle_ms=round(sc.settle_s * 1000) if cfg.settle_ms is None else cfg.settle_ms)
    # (--loss/--dup/--reorder given beside the file: its whole-window rules first)
    window = schedule.from_sim_flags((), (), cfg.net, sc.host_names)
    return cfg, sc, plan, window + schedule.from_plan(sc, plan)


def run_sim(cfg: SimConfig, on_phase=None) -> dict:
    """Run one simulation; the result is a JSON-ready dict (no wall-clock values in it)."""
    return Simulator(cfg, on_phase).run()
