"""The agent's request API (REQUEST on the rpc socket or from the controller): status,
mac_table, lookup, ping, headless claim, and methods a runtime adds (AgentCore.extra_methods).

Read-only queries over the core, and `claim`, which goes through the core's own claim path.

Pure: no I/O, no clock, no randomness (tests/test_core_purity.py).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from agent import wire
from agent.mactable import Entry, format_mac

if TYPE_CHECKING:
    from agent.core import AgentCore

NS_PER_MS = 1_000_000


def status(core: AgentCore, now_ns: int) -> dict:
    return {
        "host": core.host,
        "incarnation": core.incarnation,
        "pid": core.pid,
        "registered": core.registered,
        "pub_endpoint": core.pub_endpoint,
        "rpc_endpoint": core.rpc_endpoint,
        "peers": len(core.peers),
        "peers_heard": core.peers_heard(now_ns),
        "gossip_interval_ms": core.liveness.hb_ns // NS_PER_MS,
        "report_batch_ms": core.reports.batch_ms,  # the controller asked for batched apply reports
        "mac_entries": core.table.live_count(),
        "table_size": len(core.table),
        "digest": f"{core.table.digest:016x}",
        "ports": len(core.switch.ports),
        "updates_originated": core.n,
        "dropped_malformed": core.stats.dropped_malformed + core.stats.dropped_unexpected,
        "flapping": [{"vlan": k[0], "mac": format_mac(k[1]), "moves": v} for k, v in core.flapping.items()],
        "stats": core.stats.as_dict(),
        "last_error": core.last_error,
    }


def mac_table(core: AgentCore) -> dict:
    local = {(p.vlan, p.mac): p for p in core.switch.ports.values()}
    rows = []
    for (vlan, mac), e in sorted(core.table.items()):
        port = local.get((vlan, mac))
        rows.append(
            {
                "vlan": vlan,
                "mac": format_mac(mac),
                "host": e.host,
                "port": e.port,
                "seq": e.seq,
                "tombstone": e.tombstone,
                "local": e.host == core.host,
                "rx_frames": port.rx_frames if port else 0,
                "tx_frames": port.tx_frames if port else 0,
                "drop_frames": port.drop_frames if port else 0,
            }
        )
    return {"host": core.host, "digest": f"{core.table.digest:016x}", "entries": rows, "ports": core.switch.describe()}


def claim(core: AgentCore, args: dict, now_ns: int) -> dict:
    """Headless move: take a VM's MAC over without the controller, EVPN style: the
    destination claims max-known seq + 1 and the merge rule settles any race."""
    vlan, mac, port, vm = int(args["vlan"]), int(args["mac"]), str(args["port"]), str(args["vm"])
    if not (1 <= vlan <= wire.MAX_VLAN and 0 <= mac <= wire.MAX_MAC):
        raise ValueError("vlan or mac out of range")
    held = core.table.get((vlan, mac))
    if held is not None and held.tombstone:
        raise ValueError(f"{vm} was deleted (tombstone seq {held.seq}); it cannot move")
    if held is not None and held.host == core.host:
        raise ValueError(f"{vm} is already on {core.host}")
    seq = held.seq + 1 if held is not None else 0
    core.switch.activate(port, vm, vlan, mac)
    core.claim(vlan, mac, Entry(core.host, port, seq), now_ns)
    return {"host": core.host, "seq": seq, "t_ns": now_ns}


def call(core: AgentCore, method: str, args: dict, now_ns: int) -> object:
    """The result of request `method`; ValueError, TypeError or KeyError for a bad one."""
    if method == "status":
        return status(core, now_ns)
    if method == "mac_table":
        return mac_table(core)
    if method == "claim":
        return claim(core, args, now_ns)
    if method == "lookup":
        key = (int(args["vlan"]), int(args["mac"]))
        e = core.table.get(key)
        applied_ns = core.applied_at.get(key, 0) if core.applied_at is not None else 0
        return None if e is None else {"host": e.host, "port": e.port, "seq": e.seq,
                                       "tombstone": e.tombstone, "applied_ns": applied_ns}
    if method == "ping":
        return {"host": core.host, "incarnation": core.incarnation}
    if method in core.extra_methods:
        return core.extra_methods[method](args)
    raise ValueError(f"unknown method {method!r}")
