"""The deterministic simulator: the real AgentCore and ControllerCore on a virtual clock.

    from testbed.sim import SimConfig, NetConfig, run_sim
    result = run_sim(SimConfig(hosts=8, vms=64, moves=20, seed=1, net=NetConfig(loss=0.2)))

`engine.py` puts the Simulator together from scheduler.py (event queue and loop), network.py
(the network model), cluster.py (agents, controller, routing), checks.py (safety, agreement,
result) and workload.py (the client); `config.py` holds SimConfig and its replay command;
`spec.py` the partition and crash schedules and their command-line syntax; `command.py` the
`dvs sim` command (a click command object named `sim`).
"""

from testbed.sim.engine import NetConfig, SimConfig, Simulator, liveness_bound_ms, run_sim
from testbed.sim.spec import Crash, Partition, SpecError, parse_crashes, parse_partitions

__all__ = [
    "Crash",
    "NetConfig",
    "Partition",
    "SimConfig",
    "Simulator",
    "SpecError",
    "liveness_bound_ms",
    "parse_crashes",
    "parse_partitions",
    "run_sim",
]
