"""The nemesis: faults applied to a running cluster, through real signals and each agent's
transport wrapper (agent/faults.py). Partitions are computed here as data: for each agent,
the set of hosts (and maybe "controller") it must neither hear nor reach."""

from __future__ import annotations

import os
import signal

from agent.faults import CONTROLLER
from testbed import procs
from testbed.client import ClusterError
from testbed.cluster import Cluster
from testbed.procs import Proc


def _order(hosts) -> list[str]:
    from controller.core import _host_order

    return sorted(hosts, key=_host_order)


def groups_to_blocked(hosts: list[str], groups: list[list[str]]) -> dict[str, set[str]]:
    """Hosts in different groups cannot talk. "controller" may sit in a group; if it does,
    agents outside that group lose it. Hosts named in no group form one more group."""
    seen: dict[str, int] = {}
    for i, g in enumerate(groups):
        for h in g:
            if h != CONTROLLER and h not in hosts:
                raise ClusterError(f"unknown host {h!r} in partition (hosts: {', '.join(_order(hosts))})")
            if h in seen:
                raise ClusterError(f"host {h!r} is in two partition groups")
            seen[h] = i
    rest = [h for h in hosts if h not in seen]
    if rest:
        for h in rest:
            seen[h] = len(groups)
    if len({seen[h] for h in hosts}) < 2 and CONTROLLER not in seen:
        raise ClusterError("a partition needs at least two groups of hosts")
    blocked = {}
    for h in hosts:
        b = {o for o in hosts if seen[o] != seen[h]}
        if CONTROLLER in seen and seen[CONTROLLER] != seen[h]:
            b.add(CONTROLLER)
        blocked[h] = b
    return blocked


def named_partition(kind: str, hosts: list[str], arg: str | None = None) -> dict[str, set[str]]:
    """isolate H | halves | majority | bridge | controller."""
    hs = _order(hosts)
    if kind == "isolate":
        if not arg:
            raise ClusterError("isolate needs a host, e.g. `dvs fault isolate h3`")
        return groups_to_blocked(hosts, [[arg]])
    if len(hs) < 2 and kind != "controller":
        raise ClusterError(f"{kind} needs at least two hosts")
    if kind == "halves":
        return groups_to_blocked(hosts, [hs[: len(hs) // 2], hs[len(hs) // 2 :]])
    if kind == "majority":
        # The smallest minority that still leaves a strict majority: floor((n-1)/2) hosts.
        k = max(1, (len(hs) - 1) // 2)
        return groups_to_blocked(hosts, [hs[:k], hs[k:]])
    if kind == "bridge":
        if len(hs) < 3:
            raise ClusterError("bridge needs at least three hosts")
        mid = len(hs) // 2
        bridge, left, right = hs[mid], hs[:mid], hs[mid + 1 :]
        blocked = {h: set(right) for h in left} | {h: set(left) for h in right}
        blocked[bridge] = set()
        return blocked
    if kind == "controller":
        return {h: {CONTROLLER} for h in hosts}
    raise ClusterError(f"unknown partition {kind!r} (isolate, halves, majority, bridge, controller)")


def configure(cluster: Cluster, settings: dict[str, dict]) -> dict[str, dict]:
    """Send fault settings to agents; `settings` maps host -> faults call arguments."""
    out = {}
    for host, args in settings.items():
        with cluster.agent_client(host) as a:
            out[host] = a.call("faults", args)
    return out


def live_hosts(cluster: Cluster) -> list[str]:
    return [h for h, p in cluster.agents.items() if procs.alive(p)]


def partition(cluster: Cluster, blocked: dict[str, set[str]]) -> dict[str, dict]:
    """Cut hosts apart: with nftables between namespaces in --netns mode, else in each agent."""
    if cluster.netns is not None:
        cluster.netns.apply_partition(blocked)
        return {h: {"blocked": sorted(b), "by": "nftables"} for h, b in blocked.items()}
    alive = set(live_hosts(cluster))
    return configure(cluster, {h: {"blocked": sorted(b)} for h, b in blocked.items() if h in alive})


def heal(cluster: Cluster) -> dict[str, dict]:
    if cluster.netns is not None:
        cluster.netns.apply_partition({})
    return configure(cluster, {h: {"reset": True} for h in live_hosts(cluster)})


def target(cluster: Cluster, name: str) -> Proc:
    if name == CONTROLLER:
        if cluster.controller is None:
            raise ClusterError("this cluster has no controller")
        return cluster.controller
    return cluster.agent(name)


def signal_process(cluster: Cluster, name: str, sig: signal.Signals) -> Proc:
    p = target(cluster, name)
    if not procs.alive(p):
        raise ClusterError(f"{name} is not running (pid {p.pid}); `dvs fault restart {name}` starts it")
    os.kill(p.pid, sig)
    return p


def kill(cluster: Cluster, name: str) -> Proc:
    p = signal_process(cluster, name, signal.SIGKILL)
    procs.wait_gone(p, timeout_s=5)
    return p


def restart(cluster: Cluster, name: str) -> Proc:
    p = target(cluster, name)
    if procs.alive(p):
        os.kill(p.pid, signal.SIGKILL)
        procs.wait_gone(p, timeout_s=5)
    return cluster.start_controller() if name == CONTROLLER else cluster.add_agent(name)
