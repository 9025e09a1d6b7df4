"""VM moves without the controller: `dvs vm move` talks to the agents when it must.

The controller's journal in the state dir maps VM names to (vlan, mac, port); the
destination agent claims the MAC with max-known seq + 1 (EVPN style) and gossips it; we
then ask every agent until each maps the MAC to the destination with that seq.
"""

from __future__ import annotations

import time

from agent.mactable import format_mac
from controller import journal
from controller.inventory import MAC_BASE
from testbed.client import ClusterError
from testbed.cluster import JOURNAL_FILE, Cluster


def known_vms(cluster: Cluster) -> dict[str, dict]:
    """The latest journal record of every VM (what the controller last made durable), from the
    journal's sound records: a damaged tail is left out, as a starting controller would."""
    vms: dict[str, dict] = {}
    for r in read_journal(cluster).records:
        if "vm" in r:  # (host records carry no VM)
            vms[r["vm"]] = r
    return vms


def read_journal(cluster: Cluster) -> journal.Recovery:
    path = cluster.state_dir / JOURNAL_FILE
    try:
        return journal.read(path)
    except OSError as e:
        raise ClusterError(f"cannot read the controller's journal {path}: {e.strerror or e}") from None


def move(cluster: Cluster, name: str, to: str, timeout_s: float = 10.0) -> dict:
    cluster.agent(to)  # unknown host -> one clear error
    rec = known_vms(cluster).get(name)
    if rec is None or rec["state"] in ("deleted", "failed"):
        damage = read_journal(cluster)
        if damage.damaged:
            raise ClusterError(f"unknown VM {name!r} in the sound part of the controller's journal, which is "
                               f"damaged at byte {damage.sound_bytes} ({damage.why}); see `dvs controller "
                               "check-journal`, or start the controller (`dvs controller start`) to recover")
        raise ClusterError(f"unknown VM {name!r}; `dvs vm list` (with the controller up) shows the VMs")
    vlan, mac, port = rec["vlan"], MAC_BASE + rec["number"], f"vEth{rec['number']}"
    try:
        src = lookup(cluster, to, vlan, mac)  # the destination's view of where it is now
    except ClusterError:
        raise ClusterError(f"agent {to} does not answer; pick a live host") from None
    with cluster.agent_client(to) as a:
        claim = a.call("claim", {"vlan": vlan, "mac": mac, "port": port, "vm": name})
    target = (to, claim["seq"])
    deadline = time.monotonic() + timeout_s
    while True:
        answers = {}
        for host in cluster.agents:
            try:
                e = lookup(cluster, host, vlan, mac, timeout_ms=500)
            except ClusterError:
                continue  # down: "converged" is about live agents
            answers[host] = e
        lagging = [h for h, e in answers.items() if not e or (e["host"], e["seq"]) != target]
        if not lagging:
            last = max(e["applied_ns"] for e in answers.values())
            return {"vm": name, "mac": format_mac(mac), "src": (src or {}).get("host", rec["host"]), "dst": to,
                    "seq": claim["seq"], "converged": True, "latency_ms": max(0, last - claim["t_ns"]) / 1e6,
                    "headless": True, "hosts": len(answers), "error": ""}
        if time.monotonic() >= deadline:
            return {"vm": name, "mac": format_mac(mac), "src": (src or {}).get("host", rec["host"]), "dst": to, "seq": claim["seq"],
                    "converged": False, "latency_ms": None, "headless": True, "hosts": len(answers),
                    "error": f"{len(lagging)} hosts still disagree after {timeout_s:.0f} s: {', '.join(lagging[:5])}"}
        time.sleep(0.02)


def lookup(cluster: Cluster, host: str, vlan: int, mac: int, timeout_ms: int = 2_000) -> dict | None:
    with cluster.agent_client(host, timeout_ms=timeout_ms) as a:
        return a.call("lookup", {"vlan": vlan, "mac": mac})
