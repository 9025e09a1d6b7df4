"""The real agent process: drives AgentCore with asyncio (uvloop) and ZeroMQ sockets.

Sockets:
- PUB  (bound)  gossip out: heartbeats and numbered updates to every peer;
- SUB           gossip in: one per peer, connected to its PUB (full mesh; one socket each, so
                every frame is known to come from that peer's publisher: see AgentCore's gate);
- ROUTER rpc (bound)  repair requests from peers and API calls from `dvs`;
- ROUTER pull   our repair requests, addressed to a peer by its host id;
- DEALER ctl    the control connection to the controller.

Data plane (UDP, asyncio datagram endpoints; see agent/dataplane.py and agent/vxlan.py):
- VXLAN  (bound on this host's VTEP, vtep_base + N : 4789, or the address a `--vteps` file or
  a cluster file names for it)  frames to and from other hosts;
- vNIC   (bound on the VTEP address, ephemeral port)   frames to and from this host's VMs;
- TAP    (with `--vm-netns`) one queue of each local VM's multi-queue TAP (agent/tap.py),
  attached at prepare, enabled at switchover, read empty and closed when the port leaves.

This module owns the lifecycle (sockets up, run, close), the input readers and the one route
of the core's effects. Beside it: agent/dpruntime.py (the data plane sockets and TAPs, and the
--vteps map), agent/rtauth.py (CURVE: the guard, the rpc role gate, key reload, auth status)
and agent/rtevents.py (the event log: core events, frame.dropped, fault and epoch events).
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from typing import assert_never

import zmq

from agent import metrics, vxlan, wire
from agent.config import AgentConfig
from agent.core import FRAME_LIMIT, AgentCore
from agent.dataplane import DataplaneConfig
from agent.dpruntime import DataplaneRuntime, VtepMap
from agent.effects import Emit, Publish, Reply, Subscribe, ToController, ToPeer, Unsubscribe
from agent.faults import CONTROLLER, NetFaults, host_of_identity
from agent.lifeline import watch_owner
from agent.rtauth import RuntimeAuth
from agent.rtevents import RuntimeEvents, drops_total
from dvswitch import auth, keys
from dvswitch.bus import (
    NOBLOCK,
    Reader,
    Timer,
    bind_ephemeral,
    on_stop_signals,
    send_parts,
    tune_gc,
    write_ready,
)
from dvswitch.events import EventLog, NoEventLog, stop_reasons
from dvswitch.profiling import Profiler

__all__ = ["AgentRuntime", "DataplaneRuntime", "VtepMap"]  # (the last two live in agent/dpruntime.py)

log = logging.getLogger("agent")

HWM = 100_000  # messages queued per peer before ZeroMQ drops (PUB) or refuses (others)


class AgentRuntime(RuntimeAuth, RuntimeEvents):
    def __init__(self, host: str, controller: str, config: AgentConfig, *, bind_ip: str = "127.0.0.1",
                 incarnation: int | None = None, ready_fd: int | None = None, fault_seed: int = 0,
                 vtep_base: str | None = None, vtep_port: int = vxlan.VXLAN_PORT,
                 dp_config: DataplaneConfig | None = None, vteps: VtepMap | None = None,
                 vm_netns: str | None = None, pub_port: int = 0, rpc_port: int = 0, metrics_port: int = -1,
                 parent_pid: int | None = None, events_path: str | None = None,
                 keys_dir: str | None = None) -> None:
        self.host = host
        self.events_path = events_path  # our events file (dvswitch/events.py); None: none
        self.events: EventLog = NoEventLog(host)
        self.keys_dir = keys_dir  # None: no CURVE (--insecure); else the cluster's keys (dvswitch/keys.py)
        self.guard: auth.Guard | None = None
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
        self._alias: dict[str, bytes] = {}  # peer host -> routing id of our pull connection to it
        self._connects = 0
        self.vtep_base = vtep_base
        self.vtep_port = vtep_port
        self.vteps = vteps
        self.vm_netns = vm_netns
        self.pub_port = pub_port  # 0: ephemeral; a cluster file may fix it (firewalls between machines)
        self.rpc_port = rpc_port
        self.dp_config = dp_config or DataplaneConfig()
        self.dp: DataplaneRuntime | None = None

    def _socket(self, kind: int, max_msg_bytes: int) -> zmq.Socket:
        s = self.ctx.socket(kind)
        s.setsockopt(zmq.LINGER, 0)
        s.setsockopt(zmq.SNDHWM, HWM)
        s.setsockopt(zmq.RCVHWM, HWM)
        # ZMQ_MAXMSGSIZE is per socket, so each gets what its role needs (see wire.py): an 8 MB
        # "subscription" must not be read into memory because snapshots are allowed to be big.
        s.setsockopt(zmq.MAXMSGSIZE, max_msg_bytes)
        return s

    def _bind(self, sock: zmq.Socket, port: int) -> str:
        if not port:
            return bind_ephemeral(sock, self.bind_ip)
        sock.bind(f"tcp://{self.bind_ip}:{port}")
        return sock.getsockopt_string(zmq.LAST_ENDPOINT)

    async def run(self) -> int:
        loop = self.loop = asyncio.get_running_loop()
        guard, ctl_key = self._start_guard()
        # (With CURVE the cap also bounds the handshake's commands: a client's INITIATE with its
        # vouch and metadata is ~300 bytes, more than a subscription ever needs.)
        self.pub = self._socket(zmq.PUB, auth.HANDSHAKE_MAX_BYTES if guard else wire.SUBSCRIPTION_MAX_BYTES)
        if guard:
            guard.server(self.pub)
        pub_ep = self._bind(self.pub, self.pub_port)
        self.subs: dict[str, tuple[zmq.Socket, Reader]] = {}  # peer host -> its SUB socket, reader
        self.rpc = self._socket(zmq.ROUTER, wire.socket_cap_bytes(FRAME_LIMIT["rpc"]))
        if guard:
            guard.server(self.rpc)
        rpc_ep = self._bind(self.rpc, self.rpc_port)
        self.pull = self._socket(zmq.ROUTER, wire.socket_cap_bytes(FRAME_LIMIT["pull"]))
        self.pull.setsockopt(zmq.ROUTING_ID, f"pull:{self.host}".encode())
        self.pull.setsockopt(zmq.ROUTER_HANDOVER, 1)
        if guard:
            guard.client(self.pull, ctl_key)  # (its server key is set per peer before each connect)
        self._ctl_key = ctl_key  # the controller's public key the ctl socket pins (None: no CURVE)
        self._ctl_nonce = os.urandom(8).hex()
        self.ctl = self._ctl_socket(ctl_key)

        self.core = AgentCore(self.host, self.incarnation, self.config, pub_endpoint=pub_ep, rpc_endpoint=rpc_ep,
                              pid=os.getpid())
        self.core.extra_methods["faults"] = self._configure_faults
        self.core.extra_methods["auth"] = self._api_auth
        self.core.extra_methods["profile"] = Profiler().api  # (admin only: every rpc REQUEST is)
        self._open_events()
        self.timer = Timer(loop, self._on_timer)
        if guard:
            self.rpc_reader = Reader(loop, self.rpc, self._on_rpc_auth, self._after, roles=True)
        else:
            self.rpc_reader = Reader(loop, self.rpc, self._on_rpc, self._after)
        self.pull_reader = Reader(loop, self.pull, self._on_pull, self._after)
        self.ctl_reader = Reader(loop, self.ctl, self._on_ctl, self._after)
        self.readers = [self.rpc_reader, self.pull_reader, self.ctl_reader]
        if guard:
            self._watch_auth(guard)
        ready = {"host": self.host, "pid": os.getpid(), "pub": pub_ep, "rpc": rpc_ep, "incarnation": self.incarnation}
        if self.vteps is not None or self.vtep_base:
            ip = self.vteps.ip_of(self.host) if self.vteps is not None else vxlan.vtep_ip(self.vtep_base, self.host)
            if ip is None:
                where = f"file {self.vteps.path}" if self.vteps is not None else f"base {self.vtep_base}"
                log.error("no VTEP address for host %r in %s; data plane off", self.host, where)
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
        self.stop_reason = stop_reasons(loop, stop)
        if self.parent_pid:
            watch_owner(loop, self.parent_pid, lambda: (self.stop_reason.append("owner gone"), stop.set()))
        if self.metrics_port >= 0:
            url = metrics.serve(loop, lambda: metrics.agent_metrics(self.core, self.dp, time.monotonic_ns())
                                + auth.metrics("dvs_agent", self._api_auth({})), self.bind_ip, self.metrics_port)
            if url:
                ready["metrics"] = url
        self.core.start(time.monotonic_ns())
        tune_gc()
        self._after()
        write_ready(self.ready_fd, ready)
        log.info("agent %s up: pub %s rpc %s controller %s (%s)", self.host, pub_ep, rpc_ep, self.controller,
                 f"CURVE, key {keys.fingerprint(guard.pair.public)}" if guard else
                 "INSECURE: no CURVE, anyone who reaches these sockets can command this agent")
        self.events.emit("process.up", incarnation=self.incarnation, pub=pub_ep, rpc=rpc_ep, controller=self.controller,
                         curve=guard is not None, message=f"agent {self.host} up")
        await stop.wait()
        log.info("agent %s stopping", self.host)
        reason = self.stop_reason[0] if self.stop_reason else "stopped"
        self.close()
        self.events.emit("process.down", reason=reason, message=f"agent {self.host} stopped ({reason})")
        self.events.close()
        return 0

    def close(self) -> None:
        if self.dp is not None:
            self.dp.close()
        for host in list(self.subs):
            self._close_sub(host)
        for r in self.readers:
            r.close()
        if self.timer.handle:
            self.timer.handle.cancel()
        if self.guard is not None:
            self._key_timer.cancel()
            self.guard.close()
        for s in (self.pub, self.rpc, self.pull, self.ctl):
            s.close(linger=0)
        self.ctx.term()

    # ---- input

    def _on_rpc(self, frames: list[bytes]) -> None:
        if len(frames) < 2:
            self.core.note_malformed()
            return
        envelope = frames[:-1]
        if self.faults.active:
            self._faulty("rpc", host_of_identity(envelope[0]), frames[-1], envelope)
        else:
            self._on_frame("rpc", frames[-1], time.monotonic_ns(), envelope=envelope)

    def _on_pull(self, frames: list[bytes]) -> None:
        if len(frames) != 2:
            self.core.note_malformed()
            return
        # Our own alias for the connection (see _connect), not a name the peer chose: the host
        # the reply really came from, which the core holds it to.
        sender = host_of_identity(frames[0])
        if self.faults.active:
            self._faulty("pull", sender or "?", frames[1], sender)
        else:
            self._on_frame("pull", frames[1], time.monotonic_ns(), envelope=sender)

    def _on_ctl(self, frames: list[bytes]) -> None:
        if self.faults.active:
            self._faulty("ctl", CONTROLLER, frames[-1], None)
        else:
            self._on_frame("ctl", frames[-1], time.monotonic_ns())

    def _faulty(self, channel: str, peer: str | None, frame: bytes, envelope) -> None:
        for delay_s in self.faults.plan(peer, frame):
            if delay_s <= 0:
                self._on_frame(channel, frame, time.monotonic_ns(), envelope=envelope)
            else:
                self.loop.call_later(delay_s, self._deliver_late, channel, frame, envelope)

    def _deliver_late(self, channel: str, frame: bytes, envelope) -> None:
        self._on_frame(channel, frame, time.monotonic_ns(), envelope=envelope)
        self._after()

    def _on_frame(self, channel: str, frame: bytes, now_ns: int, envelope=None) -> None:
        self.core.on_frame(channel, frame, now_ns, envelope)
        drops = drops_total(self.core.stats)
        if drops != self._drops_seen:
            self._dropped(channel, envelope, drops)

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
        # The one route of the core's effects here: exhaustive (assert_never), so an effect
        # this runtime does not know fails loudly instead of vanishing.
        for effect in core.take_outbox():
            try:
                match effect:
                    case Publish(frame):
                        self.pub.send(frame, NOBLOCK)
                    case ToController(frame):
                        if self.faults.blocked and not self.faults.may_send(CONTROLLER):
                            continue
                        sent_ctl = True
                        self.ctl.send(frame, NOBLOCK)
                    case ToPeer(host, frame):
                        sent_pull = True
                        alias = self._alias.get(host)
                        if alias is not None and self.faults.may_send(host):
                            send_parts(self.pull, [alias, frame])
                    case Reply(envelope, frame):
                        sent_rpc = True
                        send_parts(self.rpc, [*envelope, frame])
                    case Subscribe():
                        self._connect(effect)  # (host, pub_endpoint, rpc_endpoint: what _connect reads)
                    case Unsubscribe(host):
                        self._disconnect(host)
                    case Emit(event):
                        self._emit_core_event(event)
                    case _:
                        assert_never(effect)
            except zmq.ZMQError as e:
                # Queue full or peer gone: the repair path recovers whatever this loses.
                log.debug("send %s failed: %s", type(effect).__name__, e)
        self._tell_changes()
        self.timer.set(core.next_deadline_ns())
        # A send can swallow the edge that announced new input on the same socket; check
        # only the sockets we sent on (each check costs a syscall inside libzmq).
        if sent_ctl:
            self.ctl_reader.check()
        if sent_pull:
            self.pull_reader.check()
        if sent_rpc:
            self.rpc_reader.check()

    def _ctl_socket(self, ctl_key: bytes | None) -> zmq.Socket:
        ctl = self._socket(zmq.DEALER, wire.socket_cap_bytes(FRAME_LIMIT["ctl"]))
        # agent:HOST:INCARNATION:NONCE. The nonce (this process's, never sent to anyone else) is
        # why another admitted host cannot present our routing id: the controller's ROUTER hands
        # a routing id over to whoever connects with it last (ROUTER_HANDOVER, which our own
        # reconnects need), and host names and incarnations are no secret (PEERS carries them).
        ctl.setsockopt(zmq.ROUTING_ID, f"agent:{self.host}:{self.incarnation}:{self._ctl_nonce}".encode())
        if self.guard is not None:
            self.guard.client(ctl, ctl_key)  # commands come only from the holder of the controller's key
        ctl.connect(self.controller)
        return ctl

    def _reconnect_ctl(self, ctl_key: bytes) -> None:
        """The controller's key changed (`dvs keys rotate --controller`): a new control connection
        that pins the new key. The old one is closed: the controller that held the old key
        stops for the switch, and the new one asks us to register (as after any restart)."""
        self.ctl_reader.close()
        self.readers.remove(self.ctl_reader)
        self.ctl.close(linger=0)
        self._ctl_key = ctl_key
        self.ctl = self._ctl_socket(ctl_key)
        self.ctl_reader = Reader(self.loop, self.ctl, self._on_ctl, self._after)
        self.readers.append(self.ctl_reader)
        self.ctl_reader.kick()
        log.info("the controller's key is now %s: control connection renewed", keys.fingerprint(ctl_key))
        self.events.emit("auth.controller_key", fingerprint=keys.fingerprint(ctl_key),
                         message="the controller's key changed: control connection renewed")

    def _connect(self, peer) -> None:
        self._disconnect(peer.host)
        host = peer.host
        server_key = None
        if self.guard is not None:
            # Pinned: what arrives on this SUB (and over the pull connection) comes from the
            # holder of `host`'s key, so gossip for host X is taken only from X's publisher.
            server_key = self.guard.server_key(host)
            if server_key is None:
                self.guard.rlog.warning(f"nokey:{host}", "no key for host %s in %s: not connecting to it",
                                        host, self.guard.ring.dir)
                return
        sub = self._socket(zmq.SUB, wire.socket_cap_bytes(FRAME_LIMIT["sub"]))
        if server_key is not None:
            self.guard.client(sub, server_key)
        sub.setsockopt(zmq.SUBSCRIBE, b"")
        sub.connect(peer.pub_endpoint)
        reader = Reader(self.loop, sub, _SubHandler(self, host), self._after, single=True)
        self.subs[host] = (sub, reader)
        reader.kick()
        # A fresh alias per connection: libzmq aborts (router.cpp "!has_out_pipe") when a
        # CONNECT_ROUTING_ID is reused while the old pipe to a restarted peer still lingers.
        self._connects += 1
        alias = f"{peer.host}#{self._connects}".encode()
        self.pull.setsockopt(zmq.CONNECT_ROUTING_ID, alias)
        if server_key is not None:
            self.pull.curve_serverkey = server_key  # (per connect: each peer's own key)
        self.pull.connect(peer.rpc_endpoint)
        self._alias[peer.host] = alias
        self._peer_eps[peer.host] = (peer.pub_endpoint, peer.rpc_endpoint)

    def _disconnect(self, host: str) -> None:
        self._alias.pop(host, None)
        eps = self._peer_eps.pop(host, None)
        if eps is None:
            return
        self._close_sub(host)
        try:
            self.pull.disconnect(eps[1])
        except zmq.ZMQError:
            pass

    def _close_sub(self, host: str) -> None:
        sub = self.subs.pop(host, None)
        if sub is not None:
            sub[1].close()
            sub[0].close(linger=0)


class _SubHandler:
    """Frames of the SUB socket connected to `host`'s publisher (the core holds each frame's
    origin to it), straight to the core: the hot path of every gossip update."""

    __slots__ = ("rt", "host", "on_frame")

    def __init__(self, rt: AgentRuntime, host: str) -> None:
        self.rt = rt
        self.host = host
        self.on_frame = rt.core.on_frame

    def __call__(self, frames: list[bytes]) -> None:
        rt = self.rt
        if rt.faults.active:
            rt._faulty("sub", self.host, frames[-1], self.host)
            return
        self.on_frame("sub", frames[-1], time.monotonic_ns(), self.host)
        drops = drops_total(rt.core.stats)
        if drops != rt._drops_seen:
            rt._dropped("sub", self.host, drops)
