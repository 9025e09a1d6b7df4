"""Placement: which host may take a VM, and which of them gets it. One scorer for every
placement decision (create, HA restart, evacuate, rebalance), the VM placement rules
(anti-affinity, together), and the load figures rebalance plans from.

It decides nothing by itself and changes nothing but the `load` dict a caller hands it:
it answers questions about the inventory and the ops in flight (read, never written).
"""

from __future__ import annotations

from controller.inventory import Inventory
from dvswitch.naming import host_order


class Placement:
    def __init__(self, inv: Inventory, ops_by_key: dict) -> None:
        self.inv = inv
        self.ops_by_key = ops_by_key  # the coordinator's ops in flight by (vlan, mac)

    def load(self) -> dict[str, int]:
        """VMs per host, counting each VM where it is going when an op is taking it there."""
        load: dict[str, int] = {}
        ops_by_key = self.ops_by_key
        for vm in self.inv.vms.values():
            if vm.state in ("active", "moving", "creating"):
                op = ops_by_key.get(vm.key)
                host = op.target[0] if op is not None and op.kind != "delete" else vm.host
                load[host] = load.get(host, 0) + 1
        return load

    def place(self, load: dict[str, int] | None, prefer: str | None = None, vm: str | None = None,
               extra: dict[str, str] | None = None) -> str | None:
        """The one placement scorer (create, HA restart, evacuate, rebalance): `prefer` if it may
        take `vm`, else the host that may with the fewest VMs (ties: by host name, h2 before h10).
        A host may take a VM when it is alive, not in maintenance, and the VM's placement rules
        hold there (`extra`: VMs placed in this round but not in the inventory yet, name -> host).
        Counts the choice in `load`, so the next decision of the same round sees it. None: no
        host may take it (`why_unplaceable` says why)."""
        maint = self.inv.maintenance
        rules = self.inv.rules_of(vm) if vm is not None else ()
        p = self.inv.hosts.get(prefer) if prefer is not None else None
        if p is None or p.state != "alive" or prefer in maint or (rules and self.rule_conflict(vm, prefer, extra)):
            alive = [h.name for h in self.inv.hosts.values() if h.state == "alive" and h.name not in maint]
            if rules:
                alive = [h for h in alive if not self.rule_conflict(vm, h, extra)]
            if not alive:
                return None
            if load is None:
                load = self.load()
            prefer = min(alive, key=lambda h: (load.get(h, 0), host_order(h)))
        if load is not None:
            load[prefer] = load.get(prefer, 0) + 1
        return prefer

    def location(self, name: str, extra: dict[str, str] | None = None) -> str | None:
        """Where VM `name` runs, or is going (an op taking it there); None: nowhere (deleted,
        failed, not created yet) or on a host that does not count (dead, in maintenance:
        its VMs are leaving it)."""
        if extra and name in extra:
            return extra[name]
        vm = self.inv.vms.get(name)
        if vm is None or vm.state not in ("active", "moving", "creating"):
            return None
        op = self.ops_by_key.get(vm.key)
        host = op.target[0] if op is not None and op.kind != "delete" else vm.host
        h = self.inv.hosts.get(host)
        if host in self.inv.maintenance or (h is not None and h.state == "dead"):
            return None
        return host

    def rule_conflict(self, vm: str, host: str, extra: dict[str, str] | None = None) -> str:
        """Why `vm` may not run on `host` under its rules ("" if it may)."""
        for r in self.inv.rules_of(vm):
            others = [(o, self.location(o, extra)) for o in r.vms if o != vm]
            if r.kind == "anti":
                near = [o for o, at in others if at == host]
                if near:
                    return f"anti-affinity rule {r.name}: {', '.join(near)} runs on {host}"
            else:
                away = [(o, at) for o, at in others if at is not None and at != host]
                if away:
                    o, at = away[0]
                    return f"together rule {r.name}: {o} runs on {at}, not {host}"
        return ""

    def why_unplaceable(self, vm: str, extra: dict[str, str] | None = None) -> str:
        alive = [h.name for h in self.inv.hosts.values() if h.state == "alive"]
        free = [h for h in alive if h not in self.inv.maintenance]
        if not free:
            return "no alive host outside maintenance" if alive else "no host is alive"
        why = [f"{h}: {self.rule_conflict(vm, h, extra)}" for h in sorted(free, key=host_order)]
        return f"no host fits its placement rules ({'; '.join(why[:4])}{'; ...' if len(why) > 4 else ''})"

    def balance_state(self, metric: str, rates: dict) -> tuple[dict[str, float], list, dict[str, float]]:
        """Per-host load (hosts that may take VMs), the movable units, and per-VM weights."""
        hosts = [h.name for h in self.inv.hosts.values() if h.state == "alive" and h.name not in self.inv.maintenance]
        load = dict.fromkeys(hosts, 0.0)
        weight: dict[str, float] = {}
        where: dict[str, str] = {}
        busy = set()
        for vm in self.inv.vms.values():
            if vm.state not in ("active", "moving", "creating"):
                continue
            op = self.ops_by_key.get(vm.key)
            host = op.target[0] if op is not None and op.kind != "delete" else vm.host
            w = 1.0 if metric == "vms" else float(rates.get(vm.name, 0.0))
            weight[vm.name] = w
            if host in load:
                load[host] += w
            if op is not None or vm.state != "active":
                busy.add(vm.name)
            where[vm.name] = host
        units = []
        seen = set()
        for vm in sorted(self.inv.vms.values(), key=lambda v: v.number):
            if vm.name in seen or vm.name not in where or vm.name in busy:
                continue
            group = [vm.name]
            for r in self.inv.rules_of(vm.name):
                if r.kind == "together":
                    group += [o for o in r.vms if o not in group and o in where]
            seen.update(group)
            if any(where[o] != where[vm.name] or o in busy for o in group):
                continue  # a group split (in flight, or placed apart before the rule): left alone
            units.append((where[vm.name], group, sum(weight[o] for o in group)))
        return load, units, weight

