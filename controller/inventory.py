"""The controller's inventory: hosts, port profiles and VMs. Plain data, no I/O."""

from __future__ import annotations

from dataclasses import dataclass, field

from agent.mactable import format_mac
from controller.profiles import DEFAULT_PROFILES
from dvswitch.naming import port_name

# Locally administered unicast MACs: 02:00:00 followed by a 24-bit VM number.
MAC_BASE = 0x02_00_00_00_00_00


@dataclass
class Host:
    name: str
    incarnation: int
    pub_endpoint: str
    rpc_endpoint: str
    pid: int
    route: list[bytes]
    state: str = "alive"  # alive | suspect | dead
    last_seen_ns: int = 0
    registered_ns: int = 0
    peers_heard: int = 0
    mac_entries: int = 0
    digest: int = 0
    dropped_malformed: int = 0
    peers_sent_ns: int = 0  # when we last sent it the membership

    def describe(self) -> dict:
        return {
            "host": self.name,
            "incarnation": self.incarnation,
            "pid": self.pid,
            "state": self.state,
            "pub_endpoint": self.pub_endpoint,
            "rpc_endpoint": self.rpc_endpoint,
            "peers_heard": self.peers_heard,
            "mac_entries": self.mac_entries,
            "digest": f"{self.digest:016x}",
            "dropped_malformed": self.dropped_malformed,
        }


@dataclass
class Vm:
    name: str
    number: int
    profile: str
    vlan: int
    host: str
    seq: int = 0
    state: str = "creating"  # creating | active | moving | deleted | failed (journal only: lost)
    # Highest seq ever handed out for this VM (>= seq): a switchover whose ack never came may
    # still have been applied, so its seq is never handed out again (single writer).
    seq_issued: int = 0

    @property
    def mac(self) -> int:
        return MAC_BASE + self.number

    @property
    def port(self) -> str:
        # vEthernet numbers are global and stay with the VM across moves, as on a Nexus 1000V.
        return port_name(self.number)

    @property
    def key(self) -> tuple[int, int]:
        return (self.vlan, self.mac)

    def describe(self) -> dict:
        return {
            "vm": self.name,
            "mac": format_mac(self.mac),
            "vlan": self.vlan,
            "profile": self.profile,
            "host": self.host,
            "port": self.port,
            "seq": self.seq,
            "state": self.state,
        }


@dataclass
class Rule:
    """A placement rule: `anti` (no two of `vms` on one host) or `together` (all of `vms` on one
    host). Names of VMs, not VMs: a rule may name a VM created later, and outlives a deleted one."""

    name: str
    kind: str  # anti | together
    vms: list[str]

    def describe(self) -> dict:
        return {"rule": self.name, "kind": self.kind, "vms": list(self.vms)}


RULE_KINDS = ("anti", "together")


@dataclass
class Inventory:
    hosts: dict[str, Host] = field(default_factory=dict)
    vms: dict[str, Vm] = field(default_factory=dict)
    profiles: dict[str, int] = field(default_factory=lambda: dict(DEFAULT_PROFILES))
    next_vm_number: int = 1
    _by_key: dict[tuple[int, int], Vm] = field(default_factory=dict)
    # The last incarnation each host registered with, journaled: a controller that restarts
    # must still tell an agent that restarted meanwhile (its VMs died with it) from one that
    # only re-registers with us.
    incarnations: dict[str, int] = field(default_factory=dict)
    # Host names an admin admitted (journaled): only these may register.
    admitted: set[str] = field(default_factory=set)
    # Hosts in maintenance (journaled): no placement targets them, and the controller moves
    # their VMs off, at most this many at once (host -> max concurrent moves).
    maintenance: dict[str, int] = field(default_factory=dict)
    rules: dict[str, Rule] = field(default_factory=dict)  # by rule name (journaled)
    _rules_of: dict[str, list[Rule]] = field(default_factory=dict)  # VM name -> the rules naming it

    def rules_of(self, vm: str) -> list[Rule]:
        return self._rules_of.get(vm, [])

    def set_rule(self, rule: Rule | None, name: str) -> None:
        """Add or replace rule `name` (None: remove it), keeping the per-VM index current."""
        self.rules.pop(name, None)
        if rule is not None:
            self.rules[name] = rule
        self._rules_of = {}
        for r in self.rules.values():
            for v in r.vms:
                self._rules_of.setdefault(v, []).append(r)

    def by_key(self, key: tuple[int, int]) -> Vm | None:
        return self._by_key.get(key)

    def live_hosts(self) -> list[str]:
        return [h.name for h in self.hosts.values() if h.state != "dead"]

    def new_vm(self, name: str, host: str, profile: str) -> Vm:
        vm = Vm(name, self.next_vm_number, profile, self.profiles[profile], host)
        self.add(vm)
        return vm

    def add(self, vm: Vm) -> None:
        self.next_vm_number = max(self.next_vm_number, vm.number + 1)
        self.vms[vm.name] = vm
        self._by_key[vm.key] = vm

    def to_record(self, vm: Vm) -> dict:
        return {"vm": vm.name, "number": vm.number, "profile": vm.profile, "vlan": vm.vlan, "host": vm.host,
                "seq": vm.seq, "seq_issued": vm.seq_issued, "state": vm.state}

    def apply_record(self, r: dict) -> None:
        """Replay one journal record (the latest record of a VM, or of a host's incarnation, wins)."""
        if "admit" in r:
            self.admitted.add(r["admit"])
            return
        if "maintenance" in r:
            if r["max_concurrent"]:
                self.maintenance[r["maintenance"]] = r["max_concurrent"]
            else:
                self.maintenance.pop(r["maintenance"], None)
            return
        if "rule" in r:
            self.set_rule(Rule(r["rule"], r["kind"], list(r["vms"])) if r["kind"] else None, r["rule"])
            return
        if "host_incarnation" in r:
            self.incarnations[r["host_incarnation"]] = r["incarnation"]
            return
        vm = Vm(r["vm"], r["number"], r["profile"], r["vlan"], r["host"], r["seq"], r["state"], r["seq_issued"])
        if vm.state == "moving":
            vm.state = "active"  # a move cut short by our crash: agents tell us where it ended
        self.add(vm)

    def expected_table(self) -> dict[tuple[int, int], tuple[str, int, bool]]:
        """What every live agent's table must hold once converged: (vlan, mac) -> (host, seq, tombstone)."""
        out = {}
        for vm in self.vms.values():
            if vm.state in ("creating", "failed"):
                continue
            out[vm.key] = (vm.host, vm.seq, vm.state == "deleted")
        return out
