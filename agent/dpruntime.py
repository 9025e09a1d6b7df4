"""The agent's data plane runtime: drives the pure Dataplane (agent/dataplane.py) with asyncio
UDP endpoints and, with `--vm-netns`, the VMs' TAP queues (agent/tap.py); and VtepMap, the
`--vteps` file that says where each host's VTEP is. AgentRuntime (agent/runtime.py) starts it
on its loop when the host has a VTEP address.

- VXLAN  (bound on this host's VTEP, vtep_base + N : 4789, or the address a `--vteps` file or
  a cluster file names for it)  frames to and from other hosts;
- vNIC   (bound on the VTEP address, ephemeral port)   frames to and from this host's VMs;
- TAP    one queue of each local VM's multi-queue TAP, attached at prepare, enabled at
  switchover, read empty and closed when the port leaves.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import logging
import socket
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from agent import tap, vxlan
from agent.dataplane import Dataplane

if TYPE_CHECKING:
    from agent.runtime import AgentRuntime

log = logging.getLogger("agent")  # (the agent's one logger: the same lines as before the split)

SOCKET_BUFFER_BYTES = 4 * 1024 * 1024  # UDP send/receive buffers: a busy agent must not drop frames
DP_TICK_S = 0.1  # how often forwarding pointers are expired


def _grow_buffers(sock: socket.socket) -> None:
    for force, plain in ((getattr(socket, "SO_RCVBUFFORCE", None), socket.SO_RCVBUF),
                         (getattr(socket, "SO_SNDBUFFORCE", None), socket.SO_SNDBUF)):
        try:
            sock.setsockopt(socket.SOL_SOCKET, force or plain, SOCKET_BUFFER_BYTES)
        except OSError:  # not root: capped by net.core.[rw]mem_max
            sock.setsockopt(socket.SOL_SOCKET, plain, SOCKET_BUFFER_BYTES)


class _Udp(asyncio.DatagramProtocol):
    def __init__(self, on_datagram, on_error) -> None:
        self.datagram_received = on_datagram
        self.on_error = on_error

    def error_received(self, exc: Exception) -> None:
        self.on_error(exc)


VTEP_CACHE_MAX = 4096  # source addresses remembered by _host_of before it starts afresh
VTEP_RELOAD_S = 1.0  # an unknown host or address re-reads the --vteps file at most this often
TAP_RETRY_S = 1.0  # a VM port whose TAP could not be opened is tried again this often
TAP_READ_BATCH = 64  # frames read from one TAP queue per wake-up before other sockets get a turn


class VtepMap:
    """Host -> VTEP address from a JSON file (`--vteps`): explicit addresses, so the same file can
    describe hosts on several machines. Re-read when a host or address is not in it (a host added
    to a running cluster), at most once per VTEP_RELOAD_S and only if the file changed."""

    def __init__(self, path: str, read: Callable[[Path], dict[str, str]] | None = None) -> None:
        """ValueError with a one-line reason for a missing or bad file. `read` turns another
        kind of file into {host: IPv4} (a cluster file: agent/clusterfile.py); default JSON."""
        self.path = Path(path)
        self._read = read
        self._mtime_ns = 0
        self._checked = 0.0
        self.by_host: dict[str, str] = {}
        self.by_ip: dict[str, str] = {}
        self._load()

    def _load(self) -> None:
        if self._read is not None:
            try:
                st = self.path.stat()
            except OSError as e:
                raise ValueError(f"cannot read VTEP map {self.path}: {e.strerror}") from None
            self.by_host = self._read(self.path)
            self.by_ip = {ip: h for h, ip in self.by_host.items()}
            self._mtime_ns = st.st_mtime_ns
            return
        try:
            st = self.path.stat()
            data = json.loads(self.path.read_text())
        except OSError as e:
            raise ValueError(f"cannot read VTEP map {self.path}: {e.strerror}") from None
        except json.JSONDecodeError as e:
            raise ValueError(f"VTEP map {self.path} is not JSON: {e}") from None
        self.by_host = vxlan.parse_vtep_map(data)
        self.by_ip = {ip: h for h, ip in self.by_host.items()}
        self._mtime_ns = st.st_mtime_ns

    def _maybe_reload(self) -> None:
        now = time.monotonic()
        if now - self._checked < VTEP_RELOAD_S:
            return
        self._checked = now
        try:
            if self.path.stat().st_mtime_ns != self._mtime_ns:
                self._load()
        except (OSError, ValueError) as e:
            log.warning("keeping the old VTEP map: %s", e)

    def ip_of(self, host: str) -> str | None:
        ip = self.by_host.get(host)
        if ip is None:
            self._maybe_reload()
            ip = self.by_host.get(host)
        return ip

    def host_of(self, ip: str) -> str | None:
        host = self.by_ip.get(ip)
        if host is None:
            self._maybe_reload()
            host = self.by_ip.get(ip)
        return host


class DataplaneRuntime:
    """Drives the pure Dataplane with two UDP sockets (VXLAN and vNIC) on the agent's loop and,
    with `--vm-netns PREFIX`, a queue of the TAP of each VM whose port is on this host (VM `v`
    lives in namespace PREFIX + v, its TAP is `eth0` there)."""

    def __init__(self, rt: AgentRuntime, ip: str) -> None:
        self.rt = rt
        self.ip = ip
        self.dp = Dataplane(rt.host, rt.core.table, rt.core.switch, rt.dp_config, is_member=rt.core.is_member)
        self.vnic_port = 0
        self.send_errors = 0
        self._tick: asyncio.TimerHandle | None = None
        self._vtep_cache: dict[str, tuple[str, int] | None] = {}
        self._vtep_hosts: dict[str, str | None] = {}  # source address -> host (see _host_of)
        self.taps: dict[tuple[int, int], tap.TapQueue] = {}  # (vlan, mac) of a local port -> its queue
        self._tap_retry: dict[tuple[int, int], float] = {}  # -> monotonic s of the next attempt
        self._tap_timer: asyncio.TimerHandle | None = None
        self.tap_errors = 0
        rt.core.extra_methods.update(vnic_plug=self._api_plug, vnic_unplug=self._api_unplug,
                                     dataplane=self._api_status, tap_attach=self._api_tap_attach)

    async def start(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.vx, _ = await loop.create_datagram_endpoint(lambda: _Udp(self._on_vxlan, self._on_error),
                                                         local_addr=(self.ip, self.rt.vtep_port))
        try:
            self.vnic, _ = await loop.create_datagram_endpoint(lambda: _Udp(self._on_vnic, self._on_error),
                                                               local_addr=(self.ip, 0))
        except OSError:
            self.vx.close()
            raise
        for t in (self.vx, self.vnic):
            _grow_buffers(t.get_extra_info("socket"))
        self.vnic_port = self.vnic.get_extra_info("sockname")[1]

    def close(self) -> None:
        if self._tick is not None:
            self._tick.cancel()
        if self._tap_timer is not None:
            self._tap_timer.cancel()
        for q in self.taps.values():
            self.loop.remove_reader(q.fd)
            q.close()
        self.taps.clear()
        for t in (getattr(self, "vx", None), getattr(self, "vnic", None)):
            if t is not None:
                t.close()

    def _on_tick(self) -> None:
        self._tick = None
        self.dp.tick(time.monotonic_ns())
        self._flush()

    def _on_error(self, exc: Exception) -> None:
        self.send_errors += 1  # e.g. ICMP port unreachable: a VM backend went away

    def _host_of(self, ip: str) -> str | None:
        if self.rt.vteps is not None:
            return self.rt.vteps.host_of(ip)
        # Remembered: parsing two addresses with `ipaddress` was ~7 % of a receiver's profiled
        # CPU per move (one RARP datagram each). Bounded, as the source addresses are anyone's.
        cache = self._vtep_hosts
        try:
            return cache[ip]
        except KeyError:
            pass
        if len(cache) >= VTEP_CACHE_MAX:
            cache.clear()
        host = cache[ip] = vxlan.host_of_vtep(self.rt.vtep_base, ip)
        return host

    def _on_vxlan(self, data: bytes, addr) -> None:
        src = self._host_of(addr[0]) if addr[1] == self.rt.vtep_port else None
        faults = self.rt.faults
        if faults.active and src is not None:
            # The nemesis acts on the data plane as on gossip: partitions cut VXLAN between the
            # groups; loss, delay, duplication and reordering apply unless limited to message types.
            for delay_s in faults.plan(src, data):
                if delay_s <= 0:
                    self._vxlan_in(data, src)
                else:
                    self.loop.call_later(delay_s, self._vxlan_in, data, src)
            return
        self._vxlan_in(data, src)

    def _vxlan_in(self, data: bytes, src: str | None) -> None:
        self.dp.from_vxlan(data, src, time.monotonic_ns())
        self._flush()

    def _on_vnic(self, data: bytes, addr) -> None:
        self.dp.from_vnic(data, (addr[0], addr[1]), time.monotonic_ns())
        self._flush()

    def after_core(self, now_ns: int) -> None:
        self.dp.after_core(now_ns)
        if self.rt.vm_netns is not None:
            self._reconcile_taps(now_ns)
        self._flush()

    def _vtep(self, host: str) -> tuple[str, int] | None:
        addr = self._vtep_cache.get(host)
        if addr is None:
            if self.rt.vteps is not None:
                ip = self.rt.vteps.ip_of(host)  # not cached while unknown: the file may grow
            else:
                ip = vxlan.vtep_ip(self.rt.vtep_base, host)
            if ip is None:
                return None
            addr = self._vtep_cache[host] = (ip, self.rt.vtep_port)
        return addr

    # ---- TAP vNICs (--vm-netns)

    def _reconcile_taps(self, now_ns: int) -> None:
        """Make the TAP queues match the local ports: a prepared port has a disabled queue (so
        switchover only flips a flag), an active one an enabled queue plugged into the data
        plane, a port gone has none (after what its queue still held was switched)."""
        ports = {(p.vlan, p.mac): p for p in self.dp.switch.ports.values()}
        for key in [k for k, q in self.taps.items() if k not in ports or ports[k].vm != q.vm]:
            self._release(key, now_ns)
        for key in [k for k in self._tap_retry if k not in ports]:
            del self._tap_retry[key]
        now_s = time.monotonic()
        for key, port in ports.items():
            q = self.taps.get(key)
            active = port.state == "active"
            if q is None:
                if now_s < self._tap_retry.get(key, 0.0):
                    continue
                q = self._open_tap(port, active, now_s)
                if q is None:
                    continue
            elif q.enabled != active:
                try:
                    q.set_enabled(active)
                except OSError as e:
                    self.tap_errors += 1
                    log.warning("cannot %s the TAP queue of %s: %s", "enable" if active else "disable", port.vm, e)
        if self._tap_retry and self._tap_timer is None:
            self._tap_timer = self.loop.call_later(TAP_RETRY_S, self._on_tap_retry)

    def _open_tap(self, port, active: bool, now_s: float) -> tap.TapQueue | None:
        key = (port.vlan, port.mac)
        ns = self.rt.vm_netns + port.vm
        try:
            fd = tap.open_queue(ns, enabled=active)
        except OSError as e:
            if key not in self._tap_retry:  # once per port, not once per retry
                log.info("no TAP for %s yet (namespace %s: %s); retrying every %.0f s", port.vm, ns,
                         e.strerror or e, TAP_RETRY_S)
            self._tap_retry[key] = now_s + TAP_RETRY_S
            return None
        self._tap_retry.pop(key, None)
        if tap.steering_error is not None:
            log.warning("TAP of %s: no steering program (%s); a move may drop a frame", port.vm, tap.steering_error)
            tap.steering_error = None
        q = tap.TapQueue(fd, port.vm, port.vlan, port.mac, active)
        self.taps[key] = q
        self.loop.add_reader(fd, self._on_tap, q)
        # Plugged while still prepared: the data plane delivers only to active ports anyway, and
        # a write to a disabled queue reaches the VM, so frames for it flow from switchover on.
        self.dp.plug([(port.mac, q)], time.monotonic_ns())
        log.info("TAP of %s attached (%s)", port.vm, "enabled" if active else "disabled until switchover")
        return q

    def _release(self, key: tuple[int, int], now_ns: int) -> None:
        q = self.taps.pop(key)
        self.loop.remove_reader(q.fd)
        # What the VM sent before its port left is still switched (as departed ingress), then the
        # queue closes; closing it is what makes the kernel steer the VM's frames to the new host.
        try:
            while frames := q.read_frames(TAP_READ_BATCH):
                for frame in frames:
                    self.dp.from_vnic(frame, q, now_ns)
        except OSError:
            pass
        q.close()
        if self.dp.vnics.get(key[1]) is q:
            self.dp.unplug([key[1]])
        log.info("TAP of %s released", q.vm)

    def _on_tap_retry(self) -> None:
        self._tap_timer = None
        self._reconcile_taps(time.monotonic_ns())
        self._flush()

    def _on_tap(self, q: tap.TapQueue) -> None:
        try:
            frames = q.read_frames(TAP_READ_BATCH)
        except OSError as e:
            self.tap_errors += 1
            log.warning("TAP of %s failed: %s; closing it", q.vm, e)
            self._release((q.vlan, q.mac), time.monotonic_ns())
            return
        now = time.monotonic_ns()
        for frame in frames:
            self.dp.from_vnic(frame, q, now)
        self._flush()

    def _flush(self) -> None:
        if self._tick is None and self.dp.departed:
            # Only while forwarding pointers exist: an idle data plane costs no wake-ups.
            self._tick = self.loop.call_later(DP_TICK_S, self._on_tick)
        out = self.dp.out
        if not out:
            return
        self.dp.out = []
        for kind, dest, payload in out:
            try:
                if kind == "vxlan":
                    addr = self._vtep(dest)
                    if addr is not None:
                        self.vx.sendto(payload, addr)
                elif isinstance(dest, tap.TapQueue):
                    # Link notices are for the lab's UDP vNICs; a VM's kernel learns of its link
                    # from the TAP's carrier.
                    if (payload[16] << 8 | payload[17]) != vxlan.ETHERTYPE_LINK and dest.fd >= 0:
                        dest.write(payload)
                else:
                    self.vnic.sendto(payload, dest)
            except OSError:
                self.send_errors += 1

    # ---- API (through the agent's rpc socket)

    def _api_plug(self, args: dict) -> dict:
        """{"vnics": [[mac, ip, port], ...]}: where each VM's vNIC backend listens. Every binding
        is checked before any is taken (all or nothing); the address must be an IPv4 address,
        not a name: the loop's sendto() would resolve a name on every frame, and fail."""
        vnics = args.get("vnics", [])
        if type(vnics) is not list:
            raise ValueError("vnics must be a list of [mac, ipv4 address, udp port]")
        bindings = []
        for item in vnics:
            if type(item) is not list or len(item) != 3:
                raise ValueError(f"bad vNIC binding {str(item)[:60]}: expected [mac, ipv4 address, udp port]")
            mac, ip, port = item
            if self.taps and any(k[1] == mac for k in self.taps):
                raise ValueError(f"VM {str(mac)[:40]} has a TAP vNIC on this host; it cannot be plugged elsewhere")
            try:
                if type(ip) is not str:
                    raise ValueError
                ip = str(ipaddress.IPv4Address(ip))
            except ValueError:
                raise ValueError(f"bad vNIC binding {str(item)[:60]}: {str(ip)[:40]!r} is not an IPv4 address; "
                                 "give the backend's address, e.g. 127.0.0.1") from None
            if type(port) is not int or not 0 < port < 65536:
                raise ValueError(f"bad vNIC binding {str(item)[:60]}: port must be 1-65535")
            bindings.append((mac, (ip, port)))
        n = self.dp.plug(bindings, time.monotonic_ns())
        return {"plugged": n, "vnic": f"{self.ip}:{self.vnic_port}"}

    def _api_unplug(self, args: dict) -> dict:
        macs = args.get("macs")
        tapped = {k[1] for k in self.taps}
        if macs is None:
            macs = [m for m in self.dp.vnics if m not in tapped]
        return {"unplugged": self.dp.unplug([m for m in macs if m not in tapped])}

    def _api_tap_attach(self, args: dict) -> dict:
        """Try every local port without a TAP now (dvs calls this after making VM namespaces)."""
        if self.rt.vm_netns is None:
            raise ValueError("this agent runs without TAP vNICs (no --vm-netns)")
        self._tap_retry.clear()
        self._reconcile_taps(time.monotonic_ns())
        return {"taps": len(self.taps), "waiting": len(self._tap_retry)}

    def _api_status(self, args: dict) -> dict:
        st = self.dp.status()
        st.update(vtep=f"{self.ip}:{self.rt.vtep_port}", vnic=f"{self.ip}:{self.vnic_port}",
                  send_errors=self.send_errors)
        if self.rt.vm_netns is not None:
            st.update(taps=[q.describe() for q in self.taps.values()],
                      taps_waiting=len(self._tap_retry), tap_errors=self.tap_errors)
        return st
