"""The real agent process: drives AgentCore with asyncio (uvloop) and ZeroMQ sockets.

Sockets:
- PUB  (bound)  gossip out: heartbeats and numbered updates to every peer;
- SUB           gossip in: connected to every peer's PUB (full mesh);
- ROUTER rpc (bound)  repair requests from peers and API calls from `dvs`;
- ROUTER pull   our repair requests, addressed to a peer by its host id;
- DEALER ctl    the control connection to the controller.

Data plane (UDP, asyncio datagram endpoints; see agent/dataplane.py and agent/vxlan.py):
- VXLAN  (bound on this host's VTEP, vtep_base + N : 4789)  frames to and from other hosts;
- vNIC   (bound on the VTEP address, ephemeral port)   frames to and from this host's VMs.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import time

import zmq

from agent import metrics, vxlan, wire
from agent.config import AgentConfig
from agent.core import AgentCore
from agent.dataplane import Dataplane, DataplaneConfig
from agent.faults import CONTROLLER, NetFaults, host_of_identity, peek_origin
from agent.lifeline import watch_owner
from agent.mactable import format_mac
from agent.zmqloop import (
    NOBLOCK,
    Reader,
    Timer,
    bind_ephemeral,
    on_stop_signals,
    send_parts,
    tune_gc,
    write_ready,
)

log = logging.getLogger("agent")

HWM = 100_000  # messages queued per peer before ZeroMQ drops (PUB) or refuses (others)


class AgentRuntime:
    def __init__(self, host: str, controller: str, config: AgentConfig, *, bind_ip: str = "127.0.0.1",
                 incarnation: int | None = None, ready_fd: int | None = None, fault_seed: int = 0,
                 vtep_base: str | None = None, vtep_port: int = vxlan.VXLAN_PORT,
                 dp_config: DataplaneConfig | None = None, metrics_port: int = -1,
                 parent_pid: int | None = None) -> None:
        self.host = host
        self.metrics_port = metrics_port  # -1: no metrics server (see agent/metrics.py)
        self.parent_pid = parent_pid  # stop when this process exits (see agent/lifeline.py)
        self.controller = controller
        self.config = config
        self.bind_ip = bind_ip
        self.incarnation = incarnation if incarnation is not None else time.monotonic_ns()
        self.ready_fd = ready_fd
        self.faults = NetFaults(fault_seed)
        self.ctx = zmq.Context.instance()
        self._peer_eps: dict[str, tuple[str, str]] = {}
        self._flaps_logged = 0
        self._alias: dict[str, bytes] = {}  # peer host -> routing id of our pull connection to it
        self._connects = 0
        self.vtep_base = vtep_base
        self.vtep_port = vtep_port
        self.dp_config = dp_config or DataplaneConfig()
        self.dp: DataplaneRuntime | None = None

    def _socket(self, kind: int) -> zmq.Socket:
        s = self.ctx.socket(kind)
        s.setsockopt(zmq.LINGER, 0)
        s.setsockopt(zmq.SNDHWM, HWM)
        s.setsockopt(zmq.RCVHWM, HWM)
        s.setsockopt(zmq.MAXMSGSIZE, wire.SOCKET_MAX_BYTES)
        return s

    async def run(self) -> int:
        loop = self.loop = asyncio.get_running_loop()
        self.pub = self._socket(zmq.PUB)
        pub_ep = bind_ephemeral(self.pub, self.bind_ip)
        self.sub = self._socket(zmq.SUB)
        self.sub.setsockopt(zmq.SUBSCRIBE, b"")
        self.rpc = self._socket(zmq.ROUTER)
        rpc_ep = bind_ephemeral(self.rpc, self.bind_ip)
        self.pull = self._socket(zmq.ROUTER)
        self.pull.setsockopt(zmq.ROUTING_ID, f"pull:{self.host}".encode())
        self.pull.setsockopt(zmq.ROUTER_HANDOVER, 1)
        self.ctl = self._socket(zmq.DEALER)
        self.ctl.setsockopt(zmq.ROUTING_ID, f"agent:{self.host}:{self.incarnation}".encode())
        self.ctl.connect(self.controller)

        self.core = AgentCore(self.host, self.incarnation, self.config, pub_endpoint=pub_ep, rpc_endpoint=rpc_ep,
                              pid=os.getpid())
        self.core.extra_methods["faults"] = self.faults.configure
        self.timer = Timer(loop, self._on_timer)
        self.rpc_reader = Reader(loop, self.rpc, self._on_rpc, self._after)
        self.pull_reader = Reader(loop, self.pull, self._on_pull, self._after)
        self.ctl_reader = Reader(loop, self.ctl, self._on_ctl, self._after)
        self.readers = [Reader(loop, self.sub, self._on_sub, self._after, single=True), self.rpc_reader, self.pull_reader,
                        self.ctl_reader]
        ready = {"host": self.host, "pid": os.getpid(), "pub": pub_ep, "rpc": rpc_ep, "incarnation": self.incarnation}
        if self.vtep_base:
            ip = vxlan.vtep_ip(self.vtep_base, self.host)
            if ip is None:
                log.error("no VTEP address for host %r from base %s; data plane off", self.host, self.vtep_base)
            else:
                dp = DataplaneRuntime(self, ip)
                try:
                    await dp.start(loop)
                except OSError as e:
                    log.error("cannot bind the data plane on %s:%d: %s", ip, self.vtep_port, e)
                    self.close()
                    return 1
                self.dp = dp
                ready.update(vtep=f"{ip}:{self.vtep_port}", vnic=f"{ip}:{dp.vnic_port}")
        stop = asyncio.Event()
        on_stop_signals(loop, stop)
        if self.parent_pid:
            watch_owner(loop, self.parent_pid, stop.set)
        if self.metrics_port >= 0:
            url = metrics.serve(loop, lambda: metrics.agent_metrics(self.core, self.dp, time.monotonic_ns()),
                                self.bind_ip, self.metrics_port)
            if url:
                ready["metrics"] = url
        self.core.start(time.monotonic_ns())
        tune_gc()
        self._after()
        write_ready(self.ready_fd, ready)
        log.info("agent %s up: pub %s rpc %s controller %s", self.host, pub_ep, rpc_ep, self.controller)
        await stop.wait()
        log.info("agent %s stopping", self.host)
        self.close()
        return 0

    def close(self) -> None:
        if self.dp is not None:
            self.dp.close()
        for r in self.readers:
            r.close()
        if self.timer.handle:
            self.timer.handle.cancel()
        for s in (self.pub, self.sub, self.rpc, self.pull, self.ctl):
            s.close(linger=0)
        self.ctx.term()

    # ---- input

    def _on_sub(self, frames: list[bytes]) -> None:
        frame = frames[-1]
        if self.faults.active:
            self._faulty("sub", peek_origin(frame) or "?", frame, None)
        else:
            self.core.on_frame("sub", frame, time.monotonic_ns())

    def _on_rpc(self, frames: list[bytes]) -> None:
        if len(frames) < 2:
            self.core.note_malformed()
            return
        envelope = frames[:-1]
        if self.faults.active:
            self._faulty("rpc", host_of_identity(envelope[0]), frames[-1], envelope)
        else:
            self.core.on_frame("rpc", frames[-1], time.monotonic_ns(), envelope=envelope)

    def _on_pull(self, frames: list[bytes]) -> None:
        if len(frames) != 2:
            self.core.note_malformed()
            return
        if self.faults.active:
            self._faulty("pull", host_of_identity(frames[0]) or "?", frames[1], None)
        else:
            self.core.on_frame("pull", frames[1], time.monotonic_ns())

    def _on_ctl(self, frames: list[bytes]) -> None:
        if self.faults.active:
            self._faulty("ctl", CONTROLLER, frames[-1], None)
        else:
            self.core.on_frame("ctl", frames[-1], time.monotonic_ns())

    def _faulty(self, channel: str, peer: str | None, frame: bytes, envelope) -> None:
        for delay_s in self.faults.plan(peer, frame):
            if delay_s <= 0:
                self.core.on_frame(channel, frame, time.monotonic_ns(), envelope=envelope)
            else:
                self.loop.call_later(delay_s, self._deliver_late, channel, frame, envelope)

    def _deliver_late(self, channel: str, frame: bytes, envelope) -> None:
        self.core.on_frame(channel, frame, time.monotonic_ns(), envelope=envelope)
        self._after()

    def _on_timer(self) -> None:
        self.core.on_timer(time.monotonic_ns())
        self._after()

    # ---- output

    def _after(self) -> None:
        core = self.core
        now = time.monotonic_ns()
        if self.dp is not None:
            self.dp.after_core(now)
        core.flush(now)
        sent_ctl = sent_pull = sent_rpc = False
        for dest, payload in core.take_outbox():
            try:
                if dest == "pub":
                    self.pub.send(payload, NOBLOCK)
                elif dest == "ctl":
                    if self.faults.blocked and not self.faults.may_send(CONTROLLER):
                        continue
                    sent_ctl = True
                    self.ctl.send(payload, NOBLOCK)
                elif dest[0] == "peer":
                    sent_pull = True
                    alias = self._alias.get(dest[1])
                    if alias is not None and self.faults.may_send(dest[1]):
                        send_parts(self.pull, [alias, payload])
                elif dest[0] == "reply":
                    sent_rpc = True
                    send_parts(self.rpc, [*dest[1], payload])
                elif dest[0] == "connect":
                    self._connect(dest[1])
                elif dest[0] == "disconnect":
                    self._disconnect(dest[1])
            except zmq.ZMQError as e:
                # Queue full or peer gone: the repair path recovers whatever this loses.
                log.debug("send to %s failed: %s", dest, e)
        if core.stats.flap_reports != self._flaps_logged:
            self._flaps_logged = core.stats.flap_reports
            for (vlan, mac), moves in core.flapping.items():
                log.warning("MAC flap: vlan %d mac %s moved %d times within %d ms", vlan, format_mac(mac), moves,
                            self.config.flap_window_ms)
        self.timer.set(core.next_deadline_ns())
        # A send can swallow the edge that announced new input on the same socket; check
        # only the sockets we sent on (each check costs a syscall inside libzmq).
        if sent_ctl:
            self.ctl_reader.check()
        if sent_pull:
            self.pull_reader.check()
        if sent_rpc:
            self.rpc_reader.check()

    def _connect(self, peer) -> None:
        self._disconnect(peer.host)
        self.sub.connect(peer.pub_endpoint)
        # A fresh alias per connection: libzmq aborts (router.cpp "!has_out_pipe") when a
        # CONNECT_ROUTING_ID is reused while the old pipe to a restarted peer still lingers.
        self._connects += 1
        alias = f"{peer.host}#{self._connects}".encode()
        self.pull.setsockopt(zmq.CONNECT_ROUTING_ID, alias)
        self.pull.connect(peer.rpc_endpoint)
        self._alias[peer.host] = alias
        self._peer_eps[peer.host] = (peer.pub_endpoint, peer.rpc_endpoint)

    def _disconnect(self, host: str) -> None:
        self._alias.pop(host, None)
        eps = self._peer_eps.pop(host, None)
        if eps is None:
            return
        for sock, ep in ((self.sub, eps[0]), (self.pull, eps[1])):
            try:
                sock.disconnect(ep)
            except zmq.ZMQError:
                pass


# ---------------------------------------------------------------------- data plane glue

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


class DataplaneRuntime:
    """Drives the pure Dataplane with two UDP sockets (VXLAN and vNIC) on the agent's loop."""

    def __init__(self, rt: AgentRuntime, ip: str) -> None:
        self.rt = rt
        self.ip = ip
        self.dp = Dataplane(rt.host, rt.core.table, rt.core.switch, rt.dp_config)
        self.vnic_port = 0
        self.send_errors = 0
        self._tick: asyncio.TimerHandle | None = None
        self._vtep_cache: dict[str, tuple[str, int] | None] = {}
        rt.core.extra_methods.update(vnic_plug=self._api_plug, vnic_unplug=self._api_unplug,
                                     dataplane=self._api_status)

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
        for t in (getattr(self, "vx", None), getattr(self, "vnic", None)):
            if t is not None:
                t.close()

    def _on_tick(self) -> None:
        self._tick = None
        self.dp.tick(time.monotonic_ns())
        self._flush()

    def _on_error(self, exc: Exception) -> None:
        self.send_errors += 1  # e.g. ICMP port unreachable: a VM backend went away

    def _on_vxlan(self, data: bytes, addr) -> None:
        src = vxlan.host_of_vtep(self.rt.vtep_base, addr[0]) if addr[1] == self.rt.vtep_port else None
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
        self._flush()

    def _vtep(self, host: str) -> tuple[str, int] | None:
        if host not in self._vtep_cache:
            ip = vxlan.vtep_ip(self.rt.vtep_base, host)
            self._vtep_cache[host] = (ip, self.rt.vtep_port) if ip else None
        return self._vtep_cache[host]

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
                else:
                    self.vnic.sendto(payload, dest)
            except OSError:
                self.send_errors += 1

    # ---- API (through the agent's rpc socket)

    def _api_plug(self, args: dict) -> dict:
        """{"vnics": [[mac, ip, port], ...]}: where each VM's vNIC backend listens."""
        bindings = []
        for item in args.get("vnics", []):
            mac, ip, port = item
            if not isinstance(ip, str) or not isinstance(port, int) or not 0 < port < 65536:
                raise ValueError(f"bad vNIC binding {item!r}")
            bindings.append((mac, (ip, port)))
        n = self.dp.plug(bindings, time.monotonic_ns())
        return {"plugged": n, "vnic": f"{self.ip}:{self.vnic_port}"}

    def _api_unplug(self, args: dict) -> dict:
        return {"unplugged": self.dp.unplug(args.get("macs"))}

    def _api_status(self, args: dict) -> dict:
        st = self.dp.status()
        st.update(vtep=f"{self.ip}:{self.rt.vtep_port}", vnic=f"{self.ip}:{self.vnic_port}",
                  send_errors=self.send_errors)
        return st
