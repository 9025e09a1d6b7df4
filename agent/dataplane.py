"""The data plane's forwarding logic: frames in, effects out. No I/O, no clock, no randomness.

It switches 802.1Q-tagged Ethernet frames for the host's VMs, using the replicated MAC table
(which the gossip core keeps) and the local switch's ports:

- a frame from a local VM (its vNIC) to a MAC on this host is delivered to that port;
- to a MAC on another host it is encapsulated in VXLAN and sent to that host's VTEP;
- broadcast, multicast and unknown unicast are flooded: to the other local ports of the VLAN
  and one copy to every other host with a port in that VLAN (head-end replication; which hosts
  those are is read off the MAC table);
- a frame from another host (VXLAN) is delivered to local ports only, never flooded again
  (split horizon), with one exception: the forwarding pointer below.

Moves: when a VM's port becomes active here the data plane tells its vNIC the port is up, and if
the VM came from another host (switchover, HA restart) it sends a RARP broadcast for it to the
VLAN's ports on this host (over the overlay too only with `rarp_to_overlay`: other hosts learn
the move from the control plane, as EVPN's do). When a VM's active port leaves this host,
the host keeps a *forwarding pointer* for `forward_pointer_ms`: frames that still reach it for
that VM (senders whose tables have not caught up) are sent on to the host the MAC table now
names, and frames that arrive before this host even learned where the VM went (the source may
get its DETACH before the destination's gossip) are held until it does. A relay only goes to an
entry with a higher seq than the one this host owned, so relays cannot loop.

Effects, in `self.out`: `("vxlan", host, datagram)` (UDP payload for that host's VTEP) and
`("vnic", backend, frame)` (a frame for a VM; `backend` is whatever address the VM plugged in
with). Drivers feed `now_ns` with every input.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, fields

from agent import vxlan
from agent.mactable import MacTable, format_mac
from agent.switch import LocalSwitch, Port
from agent.vxlan import FrameError

NS_PER_MS = 1_000_000


@dataclass(frozen=True)
class DataplaneConfig:
    # VNI of a VLAN is vni_base + VLAN id (RFC 7348 24-bit VNI), a VNI number. Default 10000:
    # VLAN 100 is VNI 10100.
    vni_base: int = 10_000
    # How long the old host of a moved VM forwards frames that still reach it to the VM's new
    # host, in ms. Default 10,000: longer than gossip repair takes after a lost update
    # (pull retry 300 ms, digest repair ~1.5-6 s), and it costs only a dict entry per move.
    forward_pointer_ms: int = 10_000
    # Frames held per departed VM while this host has not yet learned the VM's new host, in
    # frames. Default 256; more are dropped and counted (`hold_overflow`).
    hold_frames_max: int = 256
    # VM vNIC backends plugged into this agent at most, in bindings. Default 65,536.
    vnic_max: int = 65_536
    # Flood a moved VM's RARP over the overlay too (every host of its VLAN), as a flood-and-learn
    # VXLAN switch must, in which remote VTEPs learn the VM's new place from that frame. Default
    # False (EVPN's way, RFC 7432 §15): every VTEP learns a move from the control plane (the
    # destination's gossiped claim with seq + 1), so the RARP goes to this host's own ports of
    # the VLAN only. Flooded, it gave no host anything the gossip had not and cost each of them a
    # second wake-up per move: ~30 % of a bystander's CPU per move at 32 hosts (docs/benchmarks.md).
    rarp_to_overlay: bool = False

    @classmethod
    def field_names(cls) -> list[str]:
        return [f.name for f in fields(cls)]


# Drop reasons, each a counter in `status()["drops"]`.
DROP_REASONS = (
    "malformed_vnic",  # not a tagged Ethernet frame we accept, from a vNIC
    "malformed_vxlan",  # not a VXLAN datagram we accept
    "unknown_vtep",  # VXLAN from an address that is no current member's VTEP
    "bad_vni",  # a VNI that maps to no VLAN
    "unknown_source",  # from a vNIC, source MAC/VLAN is no active port here (or spoofed backend)
    "no_port",  # for a MAC the table places here but whose port is gone (no pointer)
    "not_here",  # unicast from another host for a MAC that lives elsewhere (stale sender, no pointer)
    "deleted",  # for a deleted VM (tombstone)
    "no_vnic",  # unicast for a local port whose VM has no vNIC backend plugged in
    "hairpin",  # unicast back to the port it came from
    "hold_overflow",  # held frames of one departed VM over hold_frames_max
    "hold_expired",  # held frames whose VM's new host was never learned before the pointer expired
)


@dataclass
class Departure:
    """A forwarding pointer: the VM's port left this host."""

    expires_ns: int
    min_seq: int  # relay only to an entry with at least this seq (strictly newer than ours)
    held: list[bytes] = field(default_factory=list)
    relayed: int = 0
    ingress: int = 0  # frames its VM sent here after it left (still in flight)


class Dataplane:
    def __init__(self, host: str, table: MacTable, switch: LocalSwitch, config: DataplaneConfig | None = None,
                 *, is_member: Callable[[str], bool] | None = None) -> None:
        self.host = host
        # Which hosts are current members (the agent core's membership, AgentCore.is_member):
        # VXLAN is taken only from their VTEPs. None: any host the VTEP block names.
        self.is_member = is_member
        self.table = table
        self.switch = switch
        self.config = config or DataplaneConfig()
        self.switch_mac = vxlan.switch_mac(host)
        self.out: list[tuple[str, object, bytes]] = []
        self.vnics: dict[int, object] = {}  # VM MAC -> backend address of its vNIC
        self.departed: dict[tuple[int, int], Departure] = {}
        self._holding: set[tuple[int, int]] = set()
        self._events: list[tuple[str, Port]] = []
        # Head-end replication lists: per VLAN, how many live entries each host has (kept by
        # watching the table's merges, O(1) each), and the other hosts with at least one.
        self._vlan_hosts: dict[int, dict[str, int]] = {}
        self._flood_cache: dict[int, tuple[str, ...]] = {}
        for (vlan, _), e in table.items():
            self._count(vlan, e, 1)
        table.observer = self._on_merge
        self.counters = {k: 0 for k in ("vnic_rx", "vnic_tx", "vxlan_rx", "vxlan_tx", "local", "flooded",
                                         "unknown_unicast", "relayed", "held", "rarp_sent", "link_notices",
                                         "departures")}
        self.drops = dict.fromkeys(DROP_REASONS, 0)
        self._pointer_ns = self.config.forward_pointer_ms * NS_PER_MS
        switch.observer = self._on_port_event

    # ------------------------------------------------------------------ driver API

    def take(self) -> list[tuple[str, object, bytes]]:
        out, self.out = self.out, []
        return out

    def _on_port_event(self, kind: str, port: Port) -> None:
        """LocalSwitch observer: a port became active ("up") or an active port went ("down").
        Called in the middle of the core's handling (a port is activated before its MAC is
        claimed); acted on in `after_core`."""
        if kind == "up":
            e = self.table.get((port.vlan, port.mac))
            if e is not None and e.host != self.host and not e.tombstone:
                kind = "arrived"  # the VM lived on another host: a move (or an HA restart)
        self._events.append((kind, port))

    def after_core(self, now_ns: int) -> None:
        """After the core handled a batch: act on port changes, release held frames whose
        VM's new host is now known."""
        if self._events:
            events, self._events = self._events, []
            announce: dict[tuple[int, int], tuple[Port, bool]] = {}
            for kind, port in events:
                key = (port.vlan, port.mac)
                if kind == "down":
                    announce.pop(key, None)
                    self._depart(key, now_ns)
                    continue
                dep = self.departed.pop(key, None)
                self._holding.discard(key)
                announce[key] = (port, kind == "arrived" or key in announce and announce[key][1])
                if dep is not None and dep.held:
                    for frame in dep.held:  # the VM came back before we learned it had gone on
                        self._deliver(port, frame)
            for key, (port, arrived) in announce.items():
                if port.state == "active" and self.switch.port_for(*key) is port:
                    e = self.table.get(key)
                    if e is not None and e.host == self.host and not e.tombstone:
                        self._announce(port, arrived, now_ns)
        if self._holding:
            for key in list(self._holding):
                e = self.table.get(key)
                dep = self.departed.get(key)
                if dep is None:
                    self._holding.discard(key)
                elif e is not None and e.tombstone:
                    self.drops["deleted"] += len(dep.held)
                    dep.held.clear()
                    self._holding.discard(key)
                elif e is not None and e.host != self.host and e.seq >= dep.min_seq:
                    for frame in dep.held:
                        self._to_host(e.host, frame, key[0])
                    dep.relayed += len(dep.held)
                    self.counters["relayed"] += len(dep.held)
                    dep.held.clear()
                    self._holding.discard(key)

    def tick(self, now_ns: int) -> None:
        """Expire forwarding pointers (call every ~100 ms)."""
        for key in [k for k, d in self.departed.items() if now_ns >= d.expires_ns]:
            dep = self.departed.pop(key)
            if dep.held:
                self.drops["hold_expired"] += len(dep.held)
            self._holding.discard(key)

    def _depart(self, key: tuple[int, int], now_ns: int) -> None:
        e = self.table.get(key)
        if e is None:
            min_seq = 0
        elif e.host == self.host:
            min_seq = e.seq + 1  # we still hold our own claim: relay only to a newer one
        else:
            min_seq = e.seq
        self.departed[key] = Departure(now_ns + self._pointer_ns, min_seq)
        self.counters["departures"] += 1

    def _announce(self, port: Port, arrived: bool, now_ns: int) -> None:
        """A VM's port is up here: tell its vNIC; if the VM came from another host, send a RARP
        broadcast for it into its VLAN (as vMotion does; a new VM announces itself by talking):
        to this host's ports of the VLAN, and over the overlay only with `rarp_to_overlay`
        (other hosts learn the move from the control plane)."""
        if arrived:
            self.counters["rarp_sent"] += 1
            self._flood(vxlan.rarp(port.mac, port.vlan), port.vlan, port, from_overlay=not self.config.rarp_to_overlay)
        backend = self.vnics.get(port.mac)
        if backend is not None:
            self.counters["link_notices"] += 1
            self.out.append(("vnic", backend, vxlan.link_notice(port.mac, self.switch_mac, port.vlan, self.host,
                                                                 now_ns)))

    # ------------------------------------------------------------------ vNIC backends

    def plug(self, bindings: list, now_ns: int) -> int:
        """VMs' vNIC backends: [[mac, backend], ...]. A VM whose port is active here is told so.
        All or nothing: every binding is checked before any is taken."""
        for mac, _ in bindings:
            if type(mac) is not int or not 0 <= mac <= 0xFFFF_FFFF_FFFF or vxlan.is_group(mac):
                raise ValueError(f"bad MAC {str(mac)[:40]}")
        new = {mac for mac, _ in bindings} - self.vnics.keys()
        if len(self.vnics) + len(new) > self.config.vnic_max:
            raise ValueError(f"more than {self.config.vnic_max} vNIC backends")
        n = 0
        for mac, backend in bindings:
            self.vnics[mac] = backend
            n += 1
        macs = {mac for mac, _ in bindings}
        for port in self.switch.ports.values():
            if port.mac in macs and port.state == "active":
                backend = self.vnics[port.mac]
                self.counters["link_notices"] += 1
                self.out.append(("vnic", backend, vxlan.link_notice(port.mac, self.switch_mac, port.vlan,
                                                                     self.host, now_ns)))
        return n

    def unplug(self, macs: list | None) -> int:
        if macs is None:
            n = len(self.vnics)
            self.vnics.clear()
            return n
        return sum(1 for m in macs if self.vnics.pop(m, None) is not None)

    # ------------------------------------------------------------------ frames in

    def from_vnic(self, frame: bytes, backend: object, now_ns: int) -> None:
        """A frame a VM sent through its vNIC."""
        self.counters["vnic_rx"] += 1
        try:
            dst, src, vlan, _ = vxlan.parse_tagged(frame)
        except FrameError:
            self.drops["malformed_vnic"] += 1
            return
        key = (vlan, src)
        port = self.switch.port_for(vlan, src)
        if self.vnics.get(src) != backend:
            port = None  # not the backend this VM plugged in with: spoofed
        elif port is None or port.state != "active":
            dep = self.departed.get(key)
            if dep is not None and now_ns < dep.expires_ns:
                # Sent while the VM still ran here, read after it left: switch it as if from
                # its port (the VM's last frames before the move must not be lost).
                dep.ingress += 1
                self._switch_local(frame, dst, src, vlan, None, now_ns)
                return
            port = None
        if port is None:
            self.drops["unknown_source"] += 1
            return
        port.rx_frames += 1
        self._switch_local(frame, dst, src, vlan, port, now_ns)

    def _switch_local(self, frame: bytes, dst: int, src: int, vlan: int, in_port: Port | None, now_ns: int) -> None:
        if vxlan.is_group(dst):
            self._flood(frame, vlan, in_port, from_overlay=False)
            return
        key = (vlan, dst)
        e = self.table.get(key)
        if e is None:
            self.counters["unknown_unicast"] += 1
            self._flood(frame, vlan, in_port, from_overlay=False)
        elif e.tombstone:
            self._drop("deleted", in_port)
        elif e.host == self.host:
            self._to_local(key, frame, in_port)
        else:
            self._to_host(e.host, frame, vlan)

    def from_vxlan(self, datagram: bytes, src_host: str | None, now_ns: int) -> None:
        """A VXLAN datagram from `src_host`'s VTEP (None: not from any host's VTEP)."""
        self.counters["vxlan_rx"] += 1
        if src_host is None or src_host == self.host or (self.is_member is not None and not self.is_member(src_host)):
            # An address inside the VTEP block is no proof of a host: only a member's VTEP
            # may put frames in front of our VMs.
            self.drops["unknown_vtep"] += 1
            return
        try:
            vni, inner = vxlan.decap(datagram)
        except FrameError:
            self.drops["malformed_vxlan"] += 1
            return
        vlan = vxlan.vlan_of(vni, self.config.vni_base)
        if vlan is None:
            self.drops["bad_vni"] += 1
            return
        frame = vxlan.retag(inner, vlan)
        dst = int.from_bytes(inner[0:6], "big")
        if vxlan.is_group(dst):
            self._flood(frame, vlan, None, from_overlay=True)
            return
        key = (vlan, dst)
        port = self.switch.port_for(vlan, dst)
        if port is not None and port.state == "active":
            self._deliver(port, frame)
            return
        e = self.table.get(key)
        if e is None:
            # The sender flooded a MAC it did not know: our local ports of the VLAN get it.
            self._flood(frame, vlan, None, from_overlay=True)
        elif e.tombstone:
            self.drops["deleted"] += 1
        else:
            dep = self.departed.get(key)
            if dep is None or now_ns >= dep.expires_ns:
                self.drops["no_port" if e.host == self.host else "not_here"] += 1
            elif e.host == self.host or e.seq < dep.min_seq:
                self._hold(key, dep, frame)  # we do not know yet where it went
            else:
                # Possibly back to the sender's host, if the VM moved there: each relay goes to a
                # claim newer than the relaying host's own, so a frame cannot loop.
                dep.relayed += 1
                self.counters["relayed"] += 1
                self._to_host(e.host, frame, vlan)

    # ------------------------------------------------------------------ frames out

    def _to_local(self, key: tuple[int, int], frame: bytes, in_port: Port | None) -> None:
        port = self.switch.port_for(*key)
        if port is not None and port.state == "active":
            if port is in_port:
                self._drop("hairpin", in_port)
            else:
                self.counters["local"] += 1
                self._deliver(port, frame)
            return
        dep = self.departed.get(key)
        if dep is not None:
            self._hold(key, dep, frame)
        else:
            self._drop("no_port", in_port)

    def _hold(self, key: tuple[int, int], dep: Departure, frame: bytes) -> None:
        if len(dep.held) >= self.config.hold_frames_max:
            self.drops["hold_overflow"] += 1
            return
        dep.held.append(frame)
        self.counters["held"] += 1
        self._holding.add(key)

    def _deliver(self, port: Port, frame: bytes, flood: bool = False) -> None:
        backend = self.vnics.get(port.mac)
        if backend is None:
            if flood:
                return  # a port whose vNIC is not connected is link-down: floods skip it
            port.drop_frames += 1
            self.drops["no_vnic"] += 1
            return
        port.tx_frames += 1
        self.counters["vnic_tx"] += 1
        self.out.append(("vnic", backend, frame))

    def _to_host(self, host: str, frame: bytes, vlan: int) -> None:
        self.counters["vxlan_tx"] += 1
        self.out.append(("vxlan", host, vxlan.encap(frame, vxlan.vni_of(vlan, self.config.vni_base))))

    def _flood(self, frame: bytes, vlan: int, in_port: Port | None, *, from_overlay: bool) -> None:
        self.counters["flooded"] += 1
        vnics = self.vnics
        if vnics:  # (a port whose vNIC is not connected is link-down: floods skip it)
            for port in list(self.switch.ports.values()):
                if port.vlan == vlan and port.state == "active" and port is not in_port and port.mac in vnics:
                    self._deliver(port, frame, flood=True)
        if from_overlay:
            return  # split horizon: what came from the overlay never goes back into it
        datagram = None
        for host in self.flood_hosts(vlan):
            if datagram is None:
                datagram = vxlan.encap(frame, vxlan.vni_of(vlan, self.config.vni_base))
            self.counters["vxlan_tx"] += 1
            self.out.append(("vxlan", host, datagram))

    def _drop(self, reason: str, in_port: Port | None) -> None:
        self.drops[reason] += 1
        if in_port is not None:
            in_port.drop_frames += 1

    def _on_merge(self, key: tuple[int, int], old, new) -> None:
        if old is not None:
            self._count(key[0], old, -1)
        self._count(key[0], new, 1)

    def _count(self, vlan: int, e, delta: int) -> None:
        if e.tombstone or e.host == self.host:
            return
        hosts = self._vlan_hosts.setdefault(vlan, {})
        n = hosts.get(e.host, 0) + delta
        if n > 0:
            hosts[e.host] = n
            if n == delta:  # 0 -> 1: a host joins the VLAN's flood list
                self._flood_cache.pop(vlan, None)
        else:
            hosts.pop(e.host, None)
            self._flood_cache.pop(vlan, None)

    def flood_hosts(self, vlan: int) -> tuple[str, ...]:
        """Other hosts with a live port in `vlan`, per the MAC table."""
        hosts = self._flood_cache.get(vlan)
        if hosts is None:
            hosts = self._flood_cache[vlan] = tuple(sorted(self._vlan_hosts.get(vlan, ())))
        return hosts

    # ------------------------------------------------------------------ queries

    def status(self) -> dict:
        return {
            "host": self.host,
            "vni_base": self.config.vni_base,
            "forward_pointer_ms": self.config.forward_pointer_ms,
            "counters": dict(self.counters),
            "drops": dict(self.drops),
            "dropped": sum(self.drops.values()),
            "vnics": len(self.vnics),
            "pointers_active": len(self.departed),
            "pointers": [  # the 100 newest
                {"vlan": k[0], "mac": format_mac(k[1]), "relayed": d.relayed, "ingress": d.ingress,
                 "held": len(d.held)}
                for k, d in list(self.departed.items())[-100:]
            ],
            "ports": self.switch.describe(),
        }

