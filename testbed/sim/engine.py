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

from controller.config import ControllerConfig
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
from testbed.sim.network import Network
from testbed.sim.scheduler import NS_PER_MS, NS_PER_US, Scheduler
from testbed.sim.spec import CTL, faults_end_ms
from testbed.sim.workload import Client

__all__ = [
    "MOVES_PER_HOSTS", "Agent", "Client", "MonitoredTable", "NetConfig", "SimConfig", "Simulator",
    "agent_config_for", "concurrency_for", "gossip_interval_ms", "liveness_bound_ms", "replay_command", "run_sim",
]


class Simulator(Scheduler, Network, Cluster, Checks):
    """One run. Its parts are classes of one object rather than objects that call each other:
    the loop, the network and the routing run millions of times per virtual second and read
    each other's state (subscriptions, partition groups, counters) as plain attributes; each
    part's state is set up by its own `_init_*`, in its module."""

    table_class = MonitoredTable

    def __init__(self, cfg: SimConfig, on_phase=None) -> None:
        if cfg.hosts < 1:
            raise ValueError("a simulation needs at least one host")
        self.cfg = cfg
        # on_phase(name, virtual_ns): called as the run passes "ready", "created", "moved",
        # "faults_stopped" and "end" (the command uses it to time the phases in wall-clock).
        self.on_phase = on_phase or (lambda name, t: None)
        # on_progress(sim): called every 2**16 events when set (a progress line for long runs).
        self.on_progress = None
        self.agent_config = agent_config_for(cfg)
        # The apply log is for the chaos checker, the move history for `dvs moves`: the simulator
        # watches every merge itself and takes each move's record from the client's reply (a
        # history of 2,000 moves at 1,000 hosts holds 2 million apply stamps).
        self.ctl_config = cfg.controller_config or ControllerConfig(applied_log_max=0, history_max=0)
        self.work_rng = random.Random(f"{cfg.seed}/workload")
        self.start_rng = random.Random(f"{cfg.seed}/start")
        self._init_scheduler()
        self._init_cluster(cfg.hosts)
        self._init_network(cfg.net, cfg.seed, cfg.hosts)
        self._init_checks()
        # Fault window and workload.
        self.f0_ns: int | None = None
        self.f1_ns: int | None = None
        self.moves_done_ns: int | None = None
        self.traffic_at_f0 = (0, 0)
        self.traffic_at_done = (0, 0)
        self.client = Client(self)
        self.crash_log: list[dict] = []

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
            return self.result()
        finally:
            if gc_was_on:
                gc.enable()

    def open_fault_window(self) -> None:
        """The first move is about to be sent: faults start, scheduled ones are laid out."""
        t = self.now
        self.f0_ns = t
        self.traffic_at_f0 = (self.msgs, self.bytes)
        net = self.net
        if net.loss or net.dup or net.reorder:
            self.loss, self.dup, self.reorder = net.loss, net.dup, net.reorder
            self.p2p_faulty = True
            self.ctl_faulty = net.ctl_faults
        for p in self.cfg.partitions:
            self.at(t + p.start_ms * NS_PER_MS, self.start_partition, p)
            self.at(t + p.end_ms * NS_PER_MS, self.heal_partition, p)
        for c in self.cfg.crashes:
            if c.host == CTL:
                self.at(t + c.at_ms * NS_PER_MS, self.crash_controller)
                self.at(t + c.restart_ms * NS_PER_MS, self.restart_controller)
                continue
            hidx = self.hidx[c.host]
            self.at(t + c.at_ms * NS_PER_MS, self.crash_agent, hidx)
            if c.restart_ms is not None:
                self.at(t + c.restart_ms * NS_PER_MS, self.start_agent, hidx)
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
        if self.moves_done_ns is not None:
            self._start_settling()


def run_sim(cfg: SimConfig, on_phase=None) -> dict:
    """Run one simulation; the result is a JSON-ready dict (no wall-clock values in it)."""
    return Simulator(cfg, on_phase).run()
