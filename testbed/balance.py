"""The client side of maintenance mode and rebalance: `dvs host evacuate`, `dvs rebalance`.

The controller does the work (it drains a host in maintenance itself, and runs a rebalance's
moves); this side waits for it, measures the VMs' frame rates for `--metric traffic` from the
agents' data-plane port counters, and sums up what each move took."""

from __future__ import annotations

import time

from dvswitch.stats import summarize_moves
from testbed.client import ClusterError
from testbed.cluster import Cluster

# The client waits this much longer than it asked the controller to wait: the controller's
# answer (an error that says how far it got) arrives before our own timeout.
REPLY_SLACK_MS = 5_000


def summary(moves: list[dict]) -> dict:
    """Counts and convergence latency (ms) over move records."""
    return summarize_moves(moves)


def _dataplane(cluster: Cluster) -> dict[str, dict]:
    """Each reachable agent's data-plane status (agents started with a VTEP only)."""
    out = {}
    for name, proc in cluster.agents.items():
        if "vtep" not in proc.info:
            continue
        try:
            with cluster.agent_client(name, timeout_ms=2_000) as a:
                out[name] = a.call("dataplane")
        except ClusterError:
            pass
    return out


def dataplane_drops(cluster: Cluster) -> int | None:
    """Frames every agent's data plane dropped so far (None: no agent has a data plane)."""
    dp = _dataplane(cluster)
    return sum(st["dropped"] for st in dp.values()) if dp else None


def frame_rates(cluster: Cluster, sample_s: float) -> dict[str, float]:
    """Each VM's frames per second (received + sent by its active port) over `sample_s`."""

    def frames() -> dict[str, int]:
        out: dict[str, int] = {}
        for st in _dataplane(cluster).values():
            for p in st["ports"]:
                if p["state"] == "active" and p["vm"]:
                    out[p["vm"]] = out.get(p["vm"], 0) + p["rx_frames"] + p["tx_frames"]
        return out

    t0, first = time.monotonic(), frames()
    if not first and not _dataplane(cluster):
        raise ClusterError("no agent has a data plane to count frames on (start the cluster with a VTEP, "
                           "the default of `dvs up`), or use --metric vms")
    time.sleep(sample_s)  # (a measurement window, not a synchronization)
    second, dt = frames(), max(time.monotonic() - t0, 1e-3)
    # A port made anew meanwhile (the VM moved) counts from zero: its second reading is its delta.
    return {vm: round((n - first.get(vm, 0) if n >= first.get(vm, 0) else n) / dt, 3) for vm, n in second.items()}


def evacuate(cluster: Cluster, host: str, max_concurrent: int, timeout_s: float) -> dict:
    drops0 = dataplane_drops(cluster)
    timeout_ms = int(timeout_s * 1000)
    t0 = time.monotonic()
    with cluster.controller_client(timeout_ms=timeout_ms + REPLY_SLACK_MS) as ctl:
        rep = ctl.call("host_evacuate", {"name": host, "max_concurrent": max_concurrent, "timeout_ms": timeout_ms})
    rep["wall_s"] = round(time.monotonic() - t0, 3)
    rep["summary"] = summary(rep["moves"])
    drops1 = dataplane_drops(cluster)
    rep["dataplane_drops"] = None if drops0 is None or drops1 is None else drops1 - drops0
    return rep


def rebalance(cluster: Cluster, *, metric: str, threshold: float | None, max_concurrent: int, dry_run: bool,
              sample_s: float, timeout_s: float) -> dict:
    args: dict = {"metric": metric, "max_concurrent": max_concurrent, "dry_run": dry_run}
    if threshold is not None:
        args["threshold"] = threshold
    if metric == "traffic":
        args["rates"] = frame_rates(cluster, sample_s)
    with cluster.controller_client(timeout_ms=int(timeout_s * 1000)) as ctl:
        rep = ctl.call("rebalance", args)
    rep["summary"] = summary(rep["moves"])
    return rep
