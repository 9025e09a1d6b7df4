"""The controller's port commands (DESIGN.md "Moves"): PREPARE a port for an incoming VM,
ATTACH (create, HA restart) or SWITCHOVER (move) it and claim its MAC, DETACH it (with a
tombstone when the VM is deleted); a prepared port whose switchover never came is released.

Every command is acked (ACK op ok detail t_ns); a resent one finds its work done and acks again.

Pure: no I/O, no clock, no randomness (tests/test_core_purity.py).
"""

from __future__ import annotations

from collections.abc import Callable

from agent import wire
from agent.config import AgentConfig
from agent.effects import Effect, ToController
from agent.mactable import Entry, MacTable
from agent.switch import LocalSwitch
from agent.wire import MsgType

NS_PER_MS = 1_000_000


class PortCommands:
    __slots__ = ("prepared", "_host", "_switch", "_table", "_claim", "_send", "_prepare_timeout_ns")

    def __init__(self, host: str, config: AgentConfig, switch: LocalSwitch, *, table: Callable[[], MacTable],
                 claim: Callable[[int, int, Entry, int], bool], send: Callable[[Effect], None]) -> None:
        self.prepared: dict[str, int] = {}  # prepared port -> time (ns) it is released
        self._host = host
        self._switch = switch
        self._table = table  # the core's table, read when needed (a driver may replace it before start)
        self._claim = claim  # the core's claim: merge an entry of ours and number it
        self._send = send
        self._prepare_timeout_ns = config.prepare_timeout_ms * NS_PER_MS

    def ack(self, op: int, ok: bool, detail: str, now_ns: int) -> None:
        self._send(ToController(wire.encode(MsgType.ACK, [op, ok, detail, now_ns])))

    def prepare(self, body: list, now_ns: int) -> None:
        op, vm, vlan, mac, port = body
        held = self._switch.port_for(vlan, mac)
        if held is None or held.state != "active":
            # (A PREPARE resent by the controller may arrive after the switchover: then
            # the port is already active and stays so.)
            self._switch.prepare(port, vm, vlan, mac)
            self.prepared[port] = now_ns + self._prepare_timeout_ns
        self.ack(op, True, "prepared", now_ns)

    def attach(self, body: list, now_ns: int, done: str) -> None:
        """ATTACH (done "attached") or SWITCHOVER ("switched"): activate the port and claim the MAC."""
        op, vm, vlan, mac, port, seq = body
        self._switch.activate(port, vm, vlan, mac)
        entry = Entry(self._host, port, seq)
        table = self._table()
        if self._claim(vlan, mac, entry, now_ns) or table.get((vlan, mac)) == entry:
            self.ack(op, True, done, now_ns)
        else:
            self._switch.remove_key(vlan, mac)
            held = table.get((vlan, mac))
            self.ack(op, False, f"stale: table holds seq {held.seq} on {held.host}", now_ns)

    def detach(self, body: list, now_ns: int) -> None:
        op, vm, vlan, mac, tomb_seq = body
        port = self._switch.remove_key(vlan, mac)
        if tomb_seq:
            name = port.name if port else (self._table().get((vlan, mac)) or Entry("", "-", 0)).port
            self._claim(vlan, mac, Entry(self._host, name, tomb_seq, True), now_ns)
        self.ack(op, True, "detached" if port else "no such port", now_ns)

    def expire(self, now_ns: int) -> None:
        """Roll back a move whose switchover never came: the VM stays where it is."""
        for name, deadline in list(self.prepared.items()):
            port = self._switch.ports.get(name)
            if port is None or port.state != "prepared":
                del self.prepared[name]
            elif now_ns >= deadline:
                del self.prepared[name]
                self._switch.remove_key(port.vlan, port.mac)
