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
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import logging
import os
import socket
import time
from collections.abc import Callable
from pathlib import Path
from typing import assert_never

import zmq

from agent import metrics, tap, vxlan, wire
from agent.config import AgentConfig
from agent.core import FRAME_LIMIT, AgentCore
from agent.dataplane import Dataplane, DataplaneConfig
from agent.effects import Emit, Publish, Reply, Subscribe, ToController, ToPeer, Unsubscribe
from agent.faults import CONTROLLER, NetFaults, host_of_identity
from agent.lifeline import watch_owner
from agent.mactable import format_mac
from agent.wire import MsgType
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

log = logging.getLogger("agent")

HWM = 100_000  # messages queued per peer before ZeroMQ drops (PUB) or refuses (others)


class AgentRuntime:
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
        self._flaps_logged = 0
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
        guard = None
        if self.keys_dir is not None:
            # (ValueError: a missing key directory or key file; agent/__main__ reports it)
            guard = self.guard = auth.Guard(self.ctx, self.keys_dir, self.host, log)
            ctl_key = guard.server_key(keys.CONTROLLER)
            if ctl_key is None:
                raise ValueError(f"no controller key ({keys.CONTROLLER}.key) in {self.keys_dir}")
            guard.start()
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
        self.ctl = self._socket(zmq.DEALER, wire.socket_cap_bytes(FRAME_LIMIT["ctl"]))
        self.ctl.setsockopt(zmq.ROUTING_ID, f"agent:{self.host}:{self.incarnation}".encode())
        if guard:
            guard.client(self.ctl, ctl_key)  # commands come only from the holder of the controller's key
        self.ctl.connect(self.controller)

        self.core = AgentCore(self.host, self.incarnation, self.config, pub_endpoint=pub_ep, rpc_endpoint=rpc_ep,
                              pid=os.getpid())
        self.core.extra_methods["faults"] = self._configure_faults
        self.core.extra_methods["auth"] = self._api_auth
        if self.events_path:
            self.events = EventLog(self.events_path, self.host)
        self._drops_seen = 0  # the sum of the core's DROP_COUNTERS when last told
        self._drop_counts = dict.fromkeys(DROP_COUNTERS, 0)
        self._epoch_seen = 0
        self.timer = Timer(loop, self._on_timer)
        if guard:
            self.rpc_reader = Reader(loop, self.rpc, self._on_rpc_auth, self._after, roles=True)
        else:
            self.rpc_reader = Reader(loop, self.rpc, self._on_rpc, self._after)
        self.pull_reader = Reader(loop, self.pull, self._on_pull, self._after)
        self.ctl_reader = Reader(loop, self.ctl, self._on_ctl, self._after)
        self.readers = [self.rpc_reader, self.pull_reader, self.ctl_reader]
        if guard:
            for sock, what in ((self.pub, "gossip"), (self.rpc, "rpc")):
                guard.monitor(sock, what, self._add_monitor)
            self._key_timer = loop.call_later(KEY_RELOAD_S, self._reload_keys)
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

    # ---- authentication (dvswitch/auth.py): roles per connection, checked per rpc message

    def _add_monitor(self, mon: zmq.Socket, handle) -> None:
        r = Reader(self.loop, mon, handle, _nothing)
        r.kick()  # (a pipe signals new input only after a read found it empty: arm it)
        self.readers.append(r)

    def _reload_keys(self) -> None:
        self.guard.reload()
        self._key_timer = self.loop.call_later(KEY_RELOAD_S, self._reload_keys)

    def _api_auth(self, args: dict) -> dict:
        return self.guard.status() if self.guard is not None else auth.insecure_status()

    def _on_rpc_auth(self, frames: list[bytes], role: str | None) -> None:
        """The rpc socket with CURVE: the admin (`dvs`) may call anything (API, faults, headless
        claims); a host may only ask for repair (pull and snapshot requests); nobody else
        reaches this socket (ZAP), and the controller's key has no business here."""
        if role != keys.ADMIN:
            mt = auth.peek_type(frames[-1]) if len(frames) >= 2 else None
            if keys.host_of_role(role) is None or mt not in RPC_FROM_HOSTS:
                self.guard.refuse(role, f"a {_type_name(mt)} on the rpc socket")
                return
        self._on_rpc(frames)

    # ---- input

    def _on_sub(self, host: str, frames: list[bytes]) -> None:
        # `host`: whose publisher this SUB socket is connected to; the core holds the frame's
        # origin to it.
        frame = frames[-1]
        if self.faults.active:
            self._faulty("sub", host, frame, host)
        else:
            self._on_frame("sub", frame, time.monotonic_ns(), envelope=host)

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
        core = self.core
        core.on_frame(channel, frame, now_ns, envelope)
        s = core.stats
        drops = (s.dropped_malformed + s.dropped_unexpected + s.forged_claims + s.non_member_claims
                 + s.non_member_messages)
        if drops != self._drops_seen:
            self._dropped(channel, envelope, drops)

    def _dropped(self, channel: str, envelope, drops: int) -> None:
        """The core dropped (part of) a frame: say which counter grew and whose frame it was, at
        most once a second per (reason, peer) (dvswitch/events.py)."""
        s = self.core.stats
        now = {n: getattr(s, n) for n in DROP_COUNTERS}
        before = self._drop_counts
        self._drop_counts, self._drops_seen = now, drops
        if channel == "ctl":
            peer = CONTROLLER
        elif channel == "rpc":
            peer = host_of_identity(envelope[0]) if envelope else None
            peer = peer or "client"
        else:
            peer = envelope if isinstance(envelope, str) else "?"
        for reason in DROP_COUNTERS:
            if now[reason] != before[reason]:
                self.events.limited("frame.dropped", peer, reason=reason, channel=channel,
                                    count=now[reason] - before[reason], total=now[reason],
                                    message=f"dropped from {peer} on {channel}: {reason} "
                                            f"(+{now[reason] - before[reason]}, {now[reason]} so far)")

    def _configure_faults(self, args: dict) -> dict:
        """The `faults` API call (agent/faults.py), and an event per rule it adds or removes."""
        f = self.faults
        rules, blocked = dict(f.rules), set(f.blocked)
        out = f.configure(args)
        for rid, r in f.rules.items():
            if rules.get(rid) != r:
                self.events.emit("fault.applied", rule=r.to_json(), replaced=rid in rules,
                                 message=f"fault {rid} on what {self.host} receives: {_rule_text(r)}")
        for rid in rules.keys() - f.rules.keys():
            self.events.emit("fault.cleared", rule=rid, message=f"fault {rid} healed")
        if f.blocked != blocked:
            if f.blocked:
                self.events.emit("fault.applied", rule={"kind": "partition", "blocked": sorted(f.blocked)},
                                 message=f"partition: {self.host} hears nothing from {', '.join(sorted(f.blocked))}")
            else:
                self.events.emit("fault.cleared", rule="partition", message="partition healed")
        return out

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
                        if event.get("kind") in RATE_LIMITED:  # (under heavy loss: many a second)
                            fields = {k: v for k, v in event.items() if k not in ("kind", "peer")}
                            self.events.limited(event["kind"], event.get("peer"), **fields)
                        else:
                            self.events.emit_many([event])
                    case _:
                        assert_never(effect)
            except zmq.ZMQError as e:
                # Queue full or peer gone: the repair path recovers whatever this loses.
                log.debug("send %s failed: %s", type(effect).__name__, e)
        if core.stats.flap_reports != self._flaps_logged:
            self._flaps_logged = core.stats.flap_reports
            for (vlan, mac), moves in core.flapping.items():
                log.warning("MAC flap: vlan %d mac %s moved %d times within %d ms", vlan, format_mac(mac), moves,
                            self.config.flap_window_ms)
        if core.peers_epoch != self._epoch_seen:
            self._epoch_seen = core.peers_epoch
            self.events.emit("membership.epoch", epoch=core.peers_epoch, hosts=len(core.peers) + 1,
                             message=f"membership epoch {core.peers_epoch}: {len(core.peers) + 1} hosts")
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
        reader = Reader(self.loop, sub, lambda frames: self._on_sub(host, frames), self._after, single=True)
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


def _rule_text(r) -> str:
    what = f"delay {r.delay_ms:g} ms + up to {r.jitter_ms:g} ms" if r.kind == "delay" else f"{r.kind} p={r.p:g}"
    return what + (f" from {','.join(sorted(r.peers))}" if r.peers else "") + \
        (f" types {','.join(map(str, sorted(r.types)))}" if r.types else "")


# Core events written at most once a second per peer (dvswitch/events.py: EventLog.limited).
RATE_LIMITED = {"repair.pull"}

# The core's counters of frames (or parts of frames) it dropped: frame.dropped's `reason`.
DROP_COUNTERS = ("dropped_malformed", "dropped_unexpected", "forged_claims", "non_member_claims",
                 "non_member_messages")
KEY_RELOAD_S = 1.0  # how often the key directory is checked for a rotation (one stat())
RPC_FROM_HOSTS = frozenset({int(MsgType.PULL_REQ), int(MsgType.SNAPSHOT_REQ)})  # a peer's repair requests


def _type_name(mt: int | None) -> str:
    try:
        return MsgType(mt).name
    except ValueError:
        return "message that is not well-formed"


def _nothing() -> None:
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
        return vxlan.host_of_vtep(self.rt.vtep_base, ip)

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
