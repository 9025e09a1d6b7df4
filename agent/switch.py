"""The local switch of one host: vEthernet ports, one per VM vNIC, each in a VLAN.

Port names are given by the controller (as the Nexus 1000V VSM numbers vEthernet
interfaces) and stay with the VM across moves; so is each port's VLAN (the controller
maps port profiles to VLANs: controller/profiles.py). A port is `prepared` while a VM is
migrating in and `active` once it switched over.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field


@dataclass
class Port:
    name: str
    vm: str
    vlan: int
    mac: int
    state: str = "active"  # "prepared" | "active"
    rx_frames: int = 0
    tx_frames: int = 0
    drop_frames: int = 0


@dataclass
class LocalSwitch:
    ports: dict[str, Port] = field(default_factory=dict)
    by_key: dict[tuple[int, int], str] = field(default_factory=dict)
    # Told ("up", port) when a port becomes active and ("down", port) when an active port is
    # removed: how the data plane learns of switchovers without the core knowing about it.
    observer: Callable[[str, Port], None] | None = field(default=None, repr=False, compare=False)

    def prepare(self, name: str, vm: str, vlan: int, mac: int) -> Port:
        port = Port(name, vm, vlan, mac, state="prepared")
        self._put(port)
        return port

    def activate(self, name: str, vm: str, vlan: int, mac: int) -> Port:
        port = self.ports.get(name)
        if port is None or port.vm != vm or port.vlan != vlan or port.mac != mac:
            port = Port(name, vm, vlan, mac)
            self._put(port)
        port.state = "active"
        if self.observer is not None:
            self.observer("up", port)
        return port

    def remove_key(self, vlan: int, mac: int) -> Port | None:
        name = self.by_key.pop((vlan, mac), None)
        if name is None:
            return None
        port = self.ports.pop(name, None)
        if port is not None and port.state == "active" and self.observer is not None:
            self.observer("down", port)
        return port

    def port_for(self, vlan: int, mac: int) -> Port | None:
        name = self.by_key.get((vlan, mac))
        return self.ports.get(name) if name else None

    def _put(self, port: Port) -> None:
        old = self.ports.get(port.name)
        if old is not None:
            self.by_key.pop((old.vlan, old.mac), None)
        self.remove_key(port.vlan, port.mac)
        self.ports[port.name] = port
        self.by_key[(port.vlan, port.mac)] = port.name

    def describe(self) -> list[dict]:
        return [
            {
                "port": p.name,
                "vm": p.vm,
                "vlan": p.vlan,
                "mac": p.mac,
                "state": p.state,
                "rx_frames": p.rx_frames,
                "tx_frames": p.tx_frames,
                "drop_frames": p.drop_frames,
            }
            for p in self.ports.values()
        ]
