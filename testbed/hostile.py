"""A hostile peer against a running cluster (issue 19): every socket of every agent, every message
type, boundary and forged values; then the verdict: every process alive, the drop counters rose,
the tables match the inventory, a move still converges.

What it does, in order (`HostilePeer.run`):
1. rpc: a DEALER to every agent's rpc socket sends each MsgType with bodies of every arity made of
   huge, negative and wrongly typed values, truncated and deeply nested msgpack, a frame over the
   decode limit and one over the socket cap (on a connection of its own: the agent drops that
   connection), a frame count nobody sends, bad API arguments (a vNIC backend that is a host
   name, a headless claim out of range), and pull/snapshot requests in forged names;
2. PUB: an XSUB sends every agent's PUB socket an 8 MB subscription (the socket takes 256 bytes);
3. VXLAN: datagrams to every agent's VTEP from an address inside the VTEP block that belongs to
   no member;
4. gossip: it registers with the controller as host "ghost" (today anyone's REGISTER admits a
   member; where the controller refuses it, this part reports `admitted: false`), waits until the
   agents subscribe to its publisher and connect to its rpc socket, then publishes claims in
   other members' names (spoofed origin, another host's entry, heartbeats with absurd numbers),
   malformed gossip, and pushes forged pull replies and snapshots into the agents' pull sockets;
   then it falls silent and waits until the controller and the agents have let it go.

It never claims a MAC for "ghost" itself: a member's own claim passes the agents' gate by
design (the controller's registration gate is what keeps such a member out).

With CURVE (the default cluster) it runs in one of three modes:
- "member" (default): an insider, holding keys the cluster accepts: the admin's on the agents'
  rpc sockets (so every message reaches the cores' own gates) and a host key of its own for
  "ghost" (made in the cluster's key directory), which the controller still does not admit;
- "stranger": its own fresh key pair, which no process accepts;
- "plain": no CURVE at all.
The last two are outsiders: every handshake is refused, nothing they send reaches a core.
"""

from __future__ import annotations

import os
import socket
import time
from pathlib import Path

import msgpack
import psutil
import zmq
from zmq.utils.monitor import recv_monitor_message

from agent import vxlan, wire
from agent.wire import MsgType
from dvswitch import keys
from testbed.client import set_curve_client
from testbed.cluster import Cluster

GHOST = "ghost"
HUGE = wire.MAX_U64
BIG_SEQ = 4_000_000_000
# Values a field of any type gets in turn.
NASTY = [HUGE, -1, -(1 << 63), 2.5, "x" * 300, "", None, True, b"\x00" * 8, [1, [2, [3]]], {"a": 1}]
SUBSCRIPTION_BYTES = 8 * 1024 * 1024


def _frames_for(mt: int) -> list[bytes]:
    """Bodies of every arity 0..8 built from each nasty value, and a raw non-list body."""
    out = [msgpack.packb([wire.SCHEMA_VERSION, mt, None]), msgpack.packb([wire.SCHEMA_VERSION, mt, "body"])]
    for arity in range(9):
        for v in NASTY:
            out.append(msgpack.packb([wire.SCHEMA_VERSION, mt, [v] * arity], use_bin_type=True))
    return out


def garbage_frames() -> list[bytes]:
    """Frames that are malformed on any channel: every one of them must be dropped and counted."""
    good = wire.encode(MsgType.HEARTBEAT, ["h1", 1, 1, 0, 0])
    frames = [b"", b"\x00\xff garbage", good[: len(good) // 2], b"\x91" * 100_000,  # truncated, nested
              msgpack.packb([99, 1, []]), msgpack.packb([1, 999, []]), msgpack.packb([1, True, []]),
              msgpack.packb({"a": 1}), b"\x93" + b"\x00" * (wire.MAX_SMALL_FRAME_BYTES + 10)]  # over the limit
    for mt in MsgType:
        frames += _frames_for(int(mt))
    return frames


MODES = ("member", "stranger", "plain")


class HostilePeer:
    def __init__(self, cluster: Cluster, *, name: str = GHOST, wait_s: float = 20.0, mode: str = "member") -> None:
        if mode not in MODES:
            raise ValueError(f"mode must be one of {', '.join(MODES)}, not {mode!r}")
        self.cluster = cluster
        self.name = name
        self.wait_s = wait_s
        self.mode = mode if cluster.keys_dir is not None else "plain"
        self.ctx = zmq.Context.instance()
        self.socks: list[zmq.Socket] = []
        self.report: dict = {"sent": {}, "admitted": False, "mode": self.mode}
        self.stranger = keys.KeyPair(*zmq.curve_keypair())
        self.own: keys.KeyPair | None = None  # our host key ("member" mode), made on first use

    def _sock(self, kind: int) -> zmq.Socket:
        s = self.ctx.socket(kind)
        s.setsockopt(zmq.LINGER, 0)
        self.socks.append(s)
        return s

    def _own_pair(self) -> keys.KeyPair:
        if self.own is None:
            kdir = Path(self.cluster.keys_dir)
            self.own = keys.load_pair(kdir, self.name) if (kdir / f"{self.name}.key_secret").exists() \
                else keys.create(kdir, self.name)
        return self.own

    def client(self, sock: zmq.Socket, server: str, *, as_host: bool = False) -> None:
        """Before connect: speak as this mode does to `server` ("controller" or a host id)."""
        if self.mode == "plain":
            return
        server_public = keys.KeyRing(self.cluster.keys_dir).current[server]
        if self.mode == "stranger":
            pair = self.stranger
        else:
            pair = self._own_pair() if as_host else keys.load_pair(Path(self.cluster.keys_dir), keys.ADMIN)
        set_curve_client(sock, pair, server_public)

    def server(self, sock: zmq.Socket) -> None:
        """Before bind: our own publisher and rpc socket (the agents pin our key: "member" mode)."""
        if self.mode == "plain":
            return
        pair = self.stranger if self.mode == "stranger" else self._own_pair()
        sock.curve_secretkey, sock.curve_publickey, sock.curve_server = pair.secret, pair.public, True

    def _refused(self, kind: int, endpoint: str, payload: bytes, server: str) -> bool:
        """Send `payload` on a connection of its own; True once the agent dropped that
        connection (libzmq's answer to a message over the socket's cap). The socket is closed
        then, before it reconnects and sends it again."""
        s = self.ctx.socket(kind)
        s.setsockopt(zmq.LINGER, 0)
        mon = s.get_monitor_socket(zmq.EVENT_DISCONNECTED)
        try:
            self.client(s, server)
            s.connect(endpoint)
            s.send(payload)
            deadline = time.monotonic() + self.wait_s
            while time.monotonic() < deadline:
                if mon.poll(100) and recv_monitor_message(mon)["event"] == zmq.EVENT_DISCONNECTED:
                    return True
            return False
        finally:
            s.disable_monitor()
            mon.close(linger=0)
            s.close(linger=0)

    def _count(self, what: str, n: int = 1) -> None:
        self.report["sent"][what] = self.report["sent"].get(what, 0) + n

    def close(self) -> None:
        for s in self.socks:
            s.close(linger=0)
        self.socks = []

    # ------------------------------------------------------------------ the attack

    def run(self) -> dict:
        try:
            self.attack_rpc()
            self.attack_pub()
            self.attack_vxlan()
            self.attack_gossip()
        finally:
            self.close()
        return self.report

    def attack_rpc(self) -> None:
        frames = garbage_frames()
        # Wrong channel: gossip, repair replies and control commands have no business on rpc.
        frames += [wire.encode(MsgType.UPDATES, ["h1", 1, [[1, 100, 5, "h1", "vEth1", BIG_SEQ, False]]]),
                   wire.encode(MsgType.SNAPSHOT, ["h1", [[100, 5, GHOST, "vEth1", BIG_SEQ, False]], []]),
                   wire.encode(MsgType.PULL_REPLY, ["h1", 1, [[1, 100, 5, "h1", "vEth1", BIG_SEQ, False]]]),
                   wire.encode(MsgType.ATTACH, [1, "evil", 100, 5, "vEth9", BIG_SEQ]),
                   wire.encode(MsgType.PEERS, [[[GHOST, 1, "tcp://127.0.0.1:9", "tcp://127.0.0.1:9"]], HUGE])]
        requests = [
            ("vnic_plug", {"vnics": [[0x020000000001, "127.0.0.1", 9], [0x020000000002, "localhost", 9]]}),
            ("vnic_plug", {"vnics": [[0x020000000001, "::1", 9]]}),
            ("vnic_plug", {"vnics": [[0x020000000001, "127.0.0.1", 0]]}),
            ("vnic_plug", {"vnics": "all"}),
            ("claim", {"vlan": 0, "mac": HUGE, "port": "p", "vm": "vm1"}),
            ("claim", {"vlan": "100"}),
            ("lookup", {"vlan": [], "mac": {}}),
            ("no_such_method", {}),
        ]
        for host, proc in self.cluster.agents.items():
            d = self._sock(zmq.DEALER)
            d.setsockopt(zmq.ROUTING_ID, b"pull:nobody")  # a repair socket's name, of no member
            self.client(d, host)
            d.connect(proc.info["rpc"])
            for f in frames:
                d.send(f)
            d.send_multipart([b"a", b"b", b"c"])
            for i, (method, args) in enumerate(requests):
                d.send(wire.encode(MsgType.REQUEST, [i + 1, method, args]))
            # Served (any member may ask), but for ranges and names that do not exist.
            d.send(wire.encode(MsgType.PULL_REQ, [host, HUGE, 1, HUGE]))
            d.send(wire.encode(MsgType.PULL_REQ, [GHOST, 0, HUGE, 1]))
            d.send(wire.encode(MsgType.SNAPSHOT_REQ, [GHOST]))
            self.report["rpc_frames_per_agent"] = len(frames) + 1 + len(requests) + 3
            self.report.setdefault("rpc_errors", {})[host] = self._replies(d, len(requests))
            # Far over the socket's cap: the agent drops this connection before reading it.
            dropped = self._refused(zmq.DEALER, proc.info["rpc"], b"\x00" * (4 * wire.MAX_SMALL_FRAME_BYTES), host)
            self.report.setdefault("rpc_oversize_refused", {})[host] = dropped

    def _replies(self, d: zmq.Socket, n: int) -> list[str]:
        """Read the answers to our requests (errors, every one) until all n came."""
        errors: list[str] = []
        deadline = time.monotonic() + self.wait_s
        while len(errors) < n and time.monotonic() < deadline:
            if not d.poll(200):
                continue
            mt, body = wire.decode(d.recv())
            if mt is MsgType.REPLY and 1 <= body[0] <= n:
                errors.append("ok" if body[1] else str(body[2]))
        return errors

    def attack_pub(self) -> None:
        for host, proc in self.cluster.agents.items():
            dropped = raw_subscribe(proc.info["pub"], SUBSCRIPTION_BYTES, self.wait_s)
            self.report.setdefault("subscription_refused", {})[host] = dropped

    def attack_vxlan(self) -> None:
        base = self.cluster.vtep_base
        if base == "off":
            return
        intruder = vxlan.vtep_ip(base, f"h{len(self.cluster.agents) + 1}")  # inside the block, no member's
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        try:
            s.bind((intruder, vxlan.VXLAN_PORT))
            for host in self.cluster.agents:
                frame = vxlan.build_tagged(vxlan.BROADCAST, 0x020000EE0001, 100, vxlan.ETHERTYPE_TEST, b"intruder")
                s.sendto(vxlan.encap(frame, vxlan.vni_of(100, 10_000)), (vxlan.vtep_ip(base, host), vxlan.VXLAN_PORT))
                self._count("vxlan_from_no_member")
        finally:
            s.close()

    def attack_gossip(self) -> None:
        pub = self._sock(zmq.XPUB)  # XPUB: we see each agent's subscription arrive
        pub.setsockopt(zmq.XPUB_VERBOSE, 1)  # (every subscriber's, not only the topic's first)
        self.server(pub)
        pub.bind("tcp://127.0.0.1:*")
        rpc = self._sock(zmq.ROUTER)
        rpc.setsockopt(zmq.ROUTER_MANDATORY, 1)  # a send to an agent not connected yet raises
        self.server(rpc)
        rpc.bind("tcp://127.0.0.1:*")
        incarnation = time.monotonic_ns()
        ctl = self._sock(zmq.DEALER)
        ctl.setsockopt(zmq.ROUTING_ID, f"agent:{self.name}:{incarnation}".encode())  # as an agent names it
        self.client(ctl, "controller", as_host=True)
        ctl.connect(self.cluster.controller_endpoint)
        pub_ep, rpc_ep = (s.getsockopt_string(zmq.LAST_ENDPOINT) for s in (pub, rpc))
        register = wire.encode(MsgType.REGISTER, [self.name, incarnation, pub_ep, rpc_ep, os.getpid()])
        ctl.send(register)
        hosts = list(self.cluster.agents)
        subscribed = 0
        reachable: set[str] = set()
        listed = False  # a PEERS of the controller names us
        start = time.monotonic()
        deadline = start + self.wait_s
        status = wire.encode(MsgType.AGENT_STATUS, [self.name, incarnation, 0, 0, 0, 0, 0])
        while time.monotonic() < deadline and (subscribed < len(hosts) or len(reachable) < len(hosts)):
            if not listed and time.monotonic() - start > min(5.0, self.wait_s):
                break  # the controller does not admit us: nothing here reaches the agents' gossip
            ctl.send(status)  # alive, in the controller's eyes, while we attack
            while ctl.poll(0):
                try:
                    mt, body = wire.decode(ctl.recv())
                except wire.WireError:
                    continue
                listed = listed or (mt is MsgType.PEERS and any(m[0] == self.name for m in body[0]))
            while pub.poll(50):
                subscribed += pub.recv()[:1] == b"\x01"
            for h in hosts:
                if h not in reachable:
                    try:
                        rpc.send_multipart([f"pull:{h}".encode(), wire.encode(MsgType.PULL_REPLY, [self.name, incarnation, []])])
                        reachable.add(h)
                    except zmq.ZMQError:
                        pass
            while rpc.poll(0):
                rpc.recv_multipart()  # their pulls and snapshot requests to us: unanswered
        self.report["admitted"] = subscribed >= len(hosts) and len(reachable) >= len(hosts)
        if not self.report["admitted"]:
            return
        for frame in self._gossip(incarnation):
            pub.send(frame)
            self._count("gossip_frames")
        for h in hosts:
            for frame in self._repair(h, incarnation):
                rpc.send_multipart([f"pull:{h}".encode(), frame])
                self._count("pull_frames")
        # Silent from here: the controller declares us dead, the agents let us go.
        self.close()

    def _gossip(self, incarnation: int) -> list[bytes]:
        frames = []
        for i, h in enumerate(self.cluster.agents):
            row = [1, 100, 0x020000000001 + i, h, f"vEth{i + 1}", BIG_SEQ, False]
            frames += [
                wire.encode(MsgType.UPDATES, [h, HUGE, [row]]),  # spoofed origin, a member's name
                wire.encode(MsgType.UPDATES, [self.name, incarnation, [row]]),  # another host's entry
                wire.encode(MsgType.UPDATES, ["nobody", 1, [[1, 100, 0x020000000001 + i, "nobody", "p", BIG_SEQ, True]]]),
                wire.encode(MsgType.HEARTBEAT, [h, HUGE, HUGE, HUGE, HUGE]),  # a member's life, absurd numbers
            ]
        return frames + garbage_frames()

    def _repair(self, host: str, incarnation: int) -> list[bytes]:
        other = next((h for h in self.cluster.agents if h != host), host)
        row = [1, 100, 0x020000000001, other, "vEth1", BIG_SEQ, False]
        return [
            wire.encode(MsgType.PULL_REPLY, [other, HUGE, [row]]),  # a reply over our connection, in another's name
            wire.encode(MsgType.PULL_REPLY, [self.name, incarnation, [row]]),  # naming another host as ours
            wire.encode(MsgType.SNAPSHOT, [other, [row[1:]], [[other, HUGE, HUGE]]]),  # in another's name
            wire.encode(MsgType.SNAPSHOT, [self.name, [[100, 0x020000000001, "nobody", "vEth1", BIG_SEQ, False]],
                                           [[other, HUGE, HUGE]]]),  # a live claim for a name nobody admitted
            wire.encode(MsgType.ATTACH, [1, "evil", 100, 5, "vEth9", BIG_SEQ]),  # a command, not a reply
            *garbage_frames()[:20],
        ]


# ---------------------------------------------------------------------- raw ZMTP


def raw_subscribe(endpoint: str, topic_bytes: int, timeout_s: float = 10.0) -> bool:
    """Subscribe to a PUB socket with a topic of `topic_bytes`, speaking ZMTP 3.0 (RFC 23) over a
    plain TCP socket; True once the PUB side closed the connection on us.

    Not with a libzmq XSUB: libzmq 4.3.5 crashes the *sending* process (on close, or when it
    reconnects and resends) after a peer refused such a subscription."""
    host, port = endpoint.removeprefix("tcp://").rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=timeout_s) as s:
        try:
            # Greeting: signature, version 3.0, mechanism NULL, as-server 0, filler. (A CURVE
            # socket hangs up right after the greetings: the mechanisms differ.)
            s.sendall(b"\xff" + b"\x00" * 8 + b"\x7f" + b"\x03\x00" + b"NULL".ljust(20, b"\x00") + b"\x00" * 32)
            ready = b"\x05READY" + b"\x0bSocket-Type" + (3).to_bytes(4, "big") + b"SUB"
            s.sendall(b"\x04" + bytes([len(ready)]) + ready)
            # One message, long form (flag 0x02, 8-byte size): 0x01 (subscribe) then the topic.
            s.sendall(b"\x02" + (topic_bytes + 1).to_bytes(8, "big"))
            chunk = b"\x01" + b"s" * 65_535
            left = topic_bytes + 1
            while left > 0:
                s.sendall(chunk[: min(left, len(chunk))])
                left -= len(chunk)
            while s.recv(65_536):  # (their greeting and READY, then end of stream)
                pass
        except (BrokenPipeError, ConnectionResetError):
            pass
        except TimeoutError:
            return False
    return True


# ---------------------------------------------------------------------- the verdict


def agent_counters(cluster: Cluster) -> dict[str, dict]:
    """Per agent: its drop and gate counters, its data plane's unknown-VTEP drops, its RSS."""
    out = {}
    for host, proc in cluster.agents.items():
        with cluster.agent_client(host) as a:
            st = a.call("status")
            dp = a.call("dataplane") if cluster.vtep_base != "off" else {"drops": {}}
        s = st["stats"]
        out[host] = {"dropped_malformed": st["dropped_malformed"], "forged_claims": s["forged_claims"],
                     "non_member_claims": s["non_member_claims"], "non_member_messages": s["non_member_messages"],
                     "handler_errors": s["handler_errors"], "unknown_vtep": dp["drops"].get("unknown_vtep", 0),
                     "vnics": dp.get("vnics", 0), "peers": st["peers"],
                     "rss_bytes": psutil.Process(proc.pid).memory_info().rss}
    return out


def wait_until_gone(cluster: Cluster, name: str = GHOST, timeout_s: float = 30.0) -> bool:
    """Until the controller lists `name` as no live host and no agent keeps it as a peer."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        with cluster.controller_client() as ctl:
            live = ctl.call("expected_table")["live_hosts"]
        if name not in live and all(c["peers"] == len(cluster.agents) - 1 for c in agent_counters(cluster).values()):
            return True
        time.sleep(0.2)
    return False
