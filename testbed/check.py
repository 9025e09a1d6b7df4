"""Does every live agent's MAC table equal the controller's inventory?"""

from __future__ import annotations

import time

from agent.mactable import format_mac, parse_mac
from testbed.client import ClusterError
from testbed.cluster import Cluster

Placement = dict[tuple[int, int], tuple[str, int, bool]]


def agent_placement(table: dict) -> Placement:
    return {(e["vlan"], parse_mac(e["mac"])): (e["host"], e["seq"], e["tombstone"]) for e in table["entries"]}


def diff(expected: Placement, actual: Placement) -> dict:
    missing = [k for k in expected if k not in actual]
    extra = [k for k in actual if k not in expected]
    wrong = [k for k in expected if k in actual and actual[k] != expected[k]]
    return {
        "missing": len(missing),
        "extra": len(extra),
        "wrong": len(wrong),
        "examples": [
            {"vlan": k[0], "mac": format_mac(k[1]), "expected": expected.get(k), "actual": actual.get(k)}
            for k in (missing + extra + wrong)[:3]
        ],
    }


def check_once(cluster: Cluster) -> dict:
    with cluster.controller_client() as ctl:
        exp = ctl.call("expected_table")
    expected: Placement = {(v, m): (h, s, t) for v, m, h, s, t in exp["entries"]}
    hosts = {}
    digests = set()
    for host in exp["live_hosts"]:
        try:
            with cluster.agent_client(host) as a:
                table = a.call("mac_table")
        except ClusterError as e:
            hosts[host] = {"ok": False, "error": str(e)}
            continue
        d = diff(expected, agent_placement(table))
        d["ok"] = not (d["missing"] or d["extra"] or d["wrong"])
        d["digest"] = table["digest"]
        digests.add(table["digest"])
        hosts[host] = d
    ok = bool(hosts) and all(h["ok"] for h in hosts.values())
    return {"ok": ok, "entries": len(expected), "hosts": hosts, "digests": sorted(digests)}


def check(cluster: Cluster, settle_s: float = 5.0) -> dict:
    """Check, and while it fails keep checking for up to `settle_s` (agents may still be repairing)."""
    deadline = time.monotonic() + settle_s
    while True:
        result = check_once(cluster)
        if result["ok"] or time.monotonic() >= deadline:
            return result
        time.sleep(0.1)
