"""The real agent process: drives AgentCore with asyncio (uvloop) and ZeroMQ sockets.

Sockets:
- PUB  (bound)  gossip out: heartbeats and numbered updates to every peer;
- SUB           gossip in: connected to every peer's PUB (full mesh);
- ROUTER rpc (bound)  repair requests from peers and API calls from `dvs`;
- ROUTER pull   our repair requests, addressed to a peer by its host id;
- DEALER ctl    the control connection to the controller.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time

import zmq

from agent import wire
from agent.config import AgentConfig
from agent.core import AgentCore
from agent.faults import CONTROLLER, NetFaults, host_of_identity, peek_origin
from agent.mactable import format_mac
from agent.zmqloop import Reader, Timer, bind_ephemeral, on_stop_signals, write_ready

log = logging.getLogger("agent")

HWM = 100_000  # messages queued per peer before ZeroMQ drops (PUB) or refuses (others)


class AgentRuntime:
    def __init__(self, host: str, controller: str, config: AgentConfig, *, bind_ip: str = "127.0.0.1",
                 incarnation: int | None = None, ready_fd: int | None = None, fault_seed: int = 0) -> None:
        self.host = host
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
        self.readers = [Reader(loop, self.sub, self._on_sub, self._after), self.rpc_reader, self.pull_reader,
                        self.ctl_reader]
        stop = asyncio.Event()
        on_stop_signals(loop, stop)
        self.core.start(time.monotonic_ns())
        self._after()
        write_ready(self.ready_fd, {"host": self.host, "pid": os.getpid(), "pub": pub_ep, "rpc": rpc_ep,
                                    "incarnation": self.incarnation})
        log.info("agent %s up: pub %s rpc %s controller %s", self.host, pub_ep, rpc_ep, self.controller)
        await stop.wait()
        log.info("agent %s stopping", self.host)
        self.close()
        return 0

    def close(self) -> None:
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
        core.flush(time.monotonic_ns())
        sent_ctl = sent_pull = sent_rpc = False
        for dest, payload in core.take_outbox():
            try:
                if dest == "pub":
                    self.pub.send(payload, zmq.NOBLOCK)
                elif dest == "ctl":
                    if self.faults.blocked and not self.faults.may_send(CONTROLLER):
                        continue
                    sent_ctl = True
                    self.ctl.send(payload, zmq.NOBLOCK)
                elif dest[0] == "peer":
                    sent_pull = True
                    alias = self._alias.get(dest[1])
                    if alias is not None and self.faults.may_send(dest[1]):
                        self.pull.send_multipart([alias, payload], zmq.NOBLOCK)
                elif dest[0] == "reply":
                    sent_rpc = True
                    self.rpc.send_multipart([*dest[1], payload], zmq.NOBLOCK)
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
