"""`dvs traffic`: the VMs' side of the data plane. This process plays the VMs of K pairs.

Each VM gets a UDP socket here: its vNIC backend. The generator plugs every backend into every
agent (`vnic_plug`: as shared storage lets any host run the VM), and the agent whose port for the
VM is active tells the backend so with a link notice; the VM then sends its frames to that agent's
vNIC socket. When a VM moves, its new host's link notice arrives at switchover and the VM sends
there from then on. Agents deliver frames for a VM only while its port is active on them.

Frames: 802.1Q-tagged Ethernet II, ethertype 0x88B5 (IEEE local experimental), payload
`DVST | run id | frame index | send time`. Frame i belongs to pair i mod K; even rounds go
A→B, odd rounds B→A, so each pair carries R frames/s, R/2 each way. Frames really travel
agent→agent as VXLAN datagrams on the hosts' VTEPs (vtep_base + N : 4789).

Counted at the receiving sockets: delivered (first copy at the right VM, right VLAN), duplicated
(later copies), misdelivered (at a VM that is not the destination, or tagged with another VLAN).
lost = sent − delivered, so sent = delivered + lost always; the agents' counters (included in the
report) show where lost frames died.
"""

from __future__ import annotations

import asyncio
import random
import socket
import struct
import threading
import time
from array import array
from dataclasses import dataclass, field

from agent import vxlan
from agent.mactable import parse_mac
from dvswitch.stats import percentile
from testbed.client import ClusterError
from testbed.cluster import Cluster

NS_PER_MS = 1_000_000
NS_PER_S = 1_000_000_000
MAGIC = b"DVST"
_PAYLOAD = struct.Struct("!4sIIQ")  # magic, run id, frame index, send time (monotonic ns)
TICK_S = 0.002  # the sender wakes this often and sends every frame that is due
CHUNK = 65_536  # per-frame arrays grow by this many frames
SOCKET_BUFFER_BYTES = 4 * 1024 * 1024
# Per move: frames of the moved VM (to or from it) sent in [switchover - before, switchover + after],
# cut short at the VM's previous and next switchovers.
MOVE_WINDOW_BEFORE_MS = 500
MOVE_WINDOW_AFTER_MS = 1_000


@dataclass
class VmNic:
    name: str
    mac: int
    vlan: int
    host: str  # where the controller placed it when the run started
    sock: socket.socket | None = None
    egress: tuple[str, int] | None = None  # the vNIC socket of the agent where its port is active
    link_host: str = ""
    links: list = field(default_factory=list)  # (host, agent stamp ns, received ns)


def kernel_udp_rcvbuf_errors() -> int | None:
    """Machine-wide UDP datagrams the kernel dropped for a full receive buffer (/proc/net/snmp)."""
    try:
        lines = [ln.split() for ln in open("/proc/net/snmp").read().splitlines() if ln.startswith("Udp:")]
        head, vals = lines[0], lines[1]
        return int(vals[head.index("RcvbufErrors")])
    except (OSError, IndexError, ValueError):
        return None


def choose_pairs(vms: list[dict], k: int) -> list[tuple[dict, dict]]:
    """K pairs of VMs in the same VLAN, on different hosts where possible (in VM order)."""
    by_vlan: dict[int, list[dict]] = {}
    for v in sorted(vms, key=lambda v: (v["vlan"], parse_mac(v["mac"]))):
        by_vlan.setdefault(v["vlan"], []).append(v)
    pairs: list[tuple[dict, dict]] = []
    for group in by_vlan.values():
        free = list(group)
        while len(free) >= 2 and len(pairs) < k:
            a = free.pop(0)
            j = next((i for i, b in enumerate(free) if b["host"] != a["host"]), 0)
            pairs.append((a, free.pop(j)))
    if len(pairs) < k:
        raise ClusterError(f"--pairs {k} needs {2 * k} VMs (two per pair, in one VLAN); the cluster has "
                           f"{len(vms)} active VMs, enough for {len(pairs)} pairs; add VMs with "
                           f"`dvs vm create` or `dvs up --vms N`")
    return pairs


class TrafficRun:
    """Sends sequence-numbered frames between VM pairs from a background thread until stopped."""

    def __init__(self, cluster: Cluster, pairs: int, rate: float, *, seed: int = 1) -> None:
        if pairs < 1:
            raise ClusterError("--pairs must be at least 1")
        if rate <= 0:
            raise ClusterError("--rate must be positive")
        self.cluster = cluster
        self.k = pairs
        self.rate = rate
        self.run_id = random.Random(seed).getrandbits(32) ^ (time.monotonic_ns() & 0xFFFF_FFFF)
        self.hosts = [h for h in cluster.agents]
        if cluster.vtep_base == "off" or any("vnic" not in cluster.agents[h].info for h in self.hosts):
            raise ClusterError("this cluster runs without the data plane (netns mode or an older agent); "
                               "start one with `dvs up --hosts N --vms M`")
        self.vnic_host = {}
        for h in self.hosts:
            ip, port = cluster.agents[h].info["vnic"].rsplit(":", 1)
            self.vnic_host[(ip, int(port))] = h
        self.host_ids = {h: i + 1 for i, h in enumerate(self.hosts)}
        self.send_ns = array("q")
        self.recv_ns = array("q")
        self.recv_host = array("H")
        self.sent = 0
        self.delivered = 0
        self.duplicated = 0
        self.misdelivered = 0
        self.misdelivered_idx: list[int] = []
        self.other_rx = 0  # RARP and other broadcasts the VMs saw
        self.foreign = 0  # frames of another run, or not ours at all
        self.send_errors = 0
        self.not_linked = 0  # frames a VM could not send: no host had told it its port is up
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._sending = False
        self.t0_ns = 0
        self.end_ns: int | None = None
        self.agents_before: dict[str, dict] = {}
        self.kernel_before = None

    # ------------------------------------------------------------------ setup

    def setup(self, link_timeout_s: float = 10.0) -> None:
        with self.cluster.controller_client(timeout_ms=10_000) as ctl:
            vms = [v for v in ctl.call("vm_list")["vms"] if v["state"] == "active"]
        self.pairs_info = choose_pairs(vms, self.k)
        self.nics: list[tuple[VmNic, VmNic]] = []
        for a, b in self.pairs_info:
            self.nics.append(tuple(VmNic(v["vm"], parse_mac(v["mac"]), v["vlan"], v["host"]) for v in (a, b)))
        self.by_name = {n.name: n for pair in self.nics for n in pair}
        # Frame headers per (pair, direction), built once.
        self.headers = []
        for a, b in self.nics:
            self.headers.append(tuple(vxlan.mac_bytes(dst.mac) + vxlan.mac_bytes(src.mac)
                                      + struct.pack("!HHH", vxlan.TPID_8021Q, src.vlan, vxlan.ETHERTYPE_TEST)
                                      for src, dst in ((a, b), (b, a))))
        for nic in self.by_name.values():
            s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            s.bind(("127.0.0.1", 0))
            s.setblocking(False)
            for opt in (socket.SO_RCVBUF, socket.SO_SNDBUF):
                try:
                    s.setsockopt(socket.SOL_SOCKET, opt, SOCKET_BUFFER_BYTES)
                except OSError:
                    pass
            nic.sock = s
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._run_loop, name="dvs-traffic", daemon=True)
        self._thread.start()
        self.loop.call_soon_threadsafe(self._add_readers)
        bindings = [[n.mac, "127.0.0.1", n.sock.getsockname()[1]] for n in self.by_name.values()]
        self.agents_before = self._agent_counters()
        self.kernel_before = kernel_udp_rcvbuf_errors()
        for h in self.hosts:
            try:
                with self.cluster.agent_client(h, timeout_ms=5_000) as a:
                    a.call("vnic_plug", {"vnics": bindings})
            except ClusterError as e:
                self.close()
                raise ClusterError(f"could not plug the VMs' vNICs into {h}: {e}") from None
        deadline = time.monotonic() + link_timeout_s
        while time.monotonic() < deadline:
            missing = [n for n in self.by_name.values() if n.egress is None]
            if not missing:
                return
            time.sleep(0.01)
        self.close()
        n = missing[0]
        raise ClusterError(f"no link notice for {n.name} from its host {n.host} within {link_timeout_s:.0f} s "
                           f"({len(missing)} VMs without one); is its agent up?")

    def _run_loop(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.loop.run_forever()

    def _add_readers(self) -> None:
        for nic in self.by_name.values():
            self.loop.add_reader(nic.sock.fileno(), self._on_readable, nic)

    def _agent_counters(self) -> dict[str, dict]:
        out = {}
        for h in self.hosts:
            try:
                with self.cluster.agent_client(h, timeout_ms=3_000) as a:
                    st = a.call("dataplane")
                out[h] = {**st["counters"], **{f"drop_{k}": v for k, v in st["drops"].items()}}
            except ClusterError:
                pass
        return out

    # ------------------------------------------------------------------ running

    def start(self) -> None:
        self.t0_ns = time.monotonic_ns() + 20 * NS_PER_MS
        self._sending = True
        self.loop.call_soon_threadsafe(self._tick)

    def stop_sending_at(self, end_ns: int) -> None:
        self.end_ns = end_ns

    def _grow(self, n: int) -> None:
        while len(self.send_ns) < n:
            self.send_ns.extend(array("q", bytes(8 * CHUNK)))
            self.recv_ns.extend(array("q", bytes(8 * CHUNK)))
            self.recv_host.extend(array("H", bytes(2 * CHUNK)))

    def _tick(self) -> None:
        if not self._sending:
            return
        now = time.monotonic_ns()
        until = now if self.end_ns is None else min(now, self.end_ns)
        due = int(max(0, until - self.t0_ns) * self.k * self.rate / NS_PER_S)
        if due > self.sent:
            self._grow(due)
            self._send(self.sent, due, now)
        if self.end_ns is not None and now >= self.end_ns:
            self._sending = False
            return
        self.loop.call_later(TICK_S, self._tick)

    def _send(self, lo: int, hi: int, now: int) -> None:
        k, nics, headers, run = self.k, self.nics, self.headers, self.run_id
        send_ns = self.send_ns
        for i in range(lo, hi):
            p, d = i % k, (i // k) & 1
            src = nics[p][d]
            if src.egress is None:
                self.not_linked += 1
                continue
            t = time.monotonic_ns()
            frame = headers[p][d] + _PAYLOAD.pack(MAGIC, run, i, t) + bytes(26)
            try:
                src.sock.sendto(frame, src.egress)
                send_ns[i] = t
            except OSError:
                self.send_errors += 1
        self.sent = hi

    def _on_readable(self, nic: VmNic) -> None:
        sock = nic.sock
        for _ in range(256):
            try:
                data, addr = sock.recvfrom(65536)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                return  # e.g. ICMP unreachable from an agent that went away
            self._on_frame(nic, data, addr, time.monotonic_ns())

    def _on_frame(self, nic: VmNic, data: bytes, addr, now: int) -> None:
        if len(data) < vxlan.TAGGED_HDR_BYTES:
            self.foreign += 1
            return
        etype = data[16] << 8 | data[17]
        if etype == vxlan.ETHERTYPE_LINK:
            link = vxlan.parse_link_notice(data)
            if link is not None and addr in self.vnic_host:
                nic.egress = addr
                nic.link_host = link[0]
                nic.links.append((link[0], link[1], now))
            return
        if etype != vxlan.ETHERTYPE_TEST:
            self.other_rx += 1
            return
        if len(data) < vxlan.TAGGED_HDR_BYTES + _PAYLOAD.size:
            self.foreign += 1
            return
        magic, run, i, _ = _PAYLOAD.unpack_from(data, vxlan.TAGGED_HDR_BYTES)
        if magic != MAGIC or run != self.run_id or i >= self.sent:
            self.foreign += 1
            return
        p, d = i % self.k, (i // self.k) & 1
        dst = self.nics[p][1 - d]
        vlan = (data[14] << 8 | data[15]) & 0x0FFF
        if dst is not nic or int.from_bytes(data[0:6], "big") != nic.mac or vlan != nic.vlan:
            self.misdelivered += 1
            self.misdelivered_idx.append(i)
        elif self.recv_ns[i]:
            self.duplicated += 1
        else:
            self.recv_ns[i] = now
            self.recv_host[i] = self.host_ids.get(self.vnic_host.get(addr, ""), 0)
            self.delivered += 1

    # ------------------------------------------------------------------ finishing

    def finish(self, drain_s: float = 2.0) -> None:
        """Stop sending (if still), wait for frames in flight, unplug, collect counters."""
        if self.end_ns is None or self.end_ns > time.monotonic_ns():
            self.end_ns = time.monotonic_ns()
        while self._sending:
            time.sleep(0.005)
        deadline = time.monotonic() + drain_s
        while time.monotonic() < deadline and self.delivered + self.not_linked + self.send_errors < self.sent:
            time.sleep(0.01)
        time.sleep(0.05)  # duplicates and stragglers
        for h in self.hosts:
            try:
                with self.cluster.agent_client(h, timeout_ms=3_000) as a:
                    a.call("vnic_unplug", {"macs": [n.mac for n in self.by_name.values()]})
            except ClusterError:
                pass
        after = self._agent_counters()
        self.agents_delta: dict[str, int] = {}
        for h, c in after.items():
            for key, v in c.items():
                self.agents_delta[key] = self.agents_delta.get(key, 0) + v - self.agents_before.get(h, {}).get(key, 0)
        k = kernel_udp_rcvbuf_errors()
        self.kernel_rcvbuf_errors = None if k is None or self.kernel_before is None else k - self.kernel_before
        self.close()

    def abort(self) -> None:
        """Interrupted (Ctrl-C, SIGTERM, an error): stop sending, close our VMs' sockets and unplug
        them from the agents, so no agent keeps sending to a backend that is gone."""
        self.close()
        for h in getattr(self, "hosts", []):
            try:
                with self.cluster.agent_client(h, timeout_ms=1_000) as a:
                    a.call("vnic_unplug", {"macs": [n.mac for n in getattr(self, "by_name", {}).values()]})
            except ClusterError:
                pass

    def close(self) -> None:
        if getattr(self, "_thread", None) is not None and self._thread.is_alive():
            def shutdown():
                for nic in self.by_name.values():
                    if nic.sock is not None:
                        self.loop.remove_reader(nic.sock.fileno())
                self.loop.stop()
            self._sending = False
            self.loop.call_soon_threadsafe(shutdown)
            self._thread.join(5)
            self.loop.close()
        for nic in getattr(self, "by_name", {}).values():
            if nic.sock is not None:
                nic.sock.close()
                nic.sock = None

    # ------------------------------------------------------------------ report

    def move_stats(self, rec: dict) -> dict:
        """Frames lost and misdelivered around one move, and its data-plane blackout."""
        nic = self.by_name.get(rec["vm"])
        out = {"frames": 0, "lost": 0, "misdelivered": 0, "blackout_ms": None, "delay_ms_max": None,
               "via_old_host": None}
        sw = rec.get("switch_ns") or 0
        if nic is None:
            return out | {"frames": None, "lost": None, "misdelivered": None}
        if not sw:
            links = [t for h, t, _ in nic.links if h == rec["dst"]]
            sw = min(links) if links else 0
        if not sw:
            return out
        p = next(i for i, (a, b) in enumerate(self.nics) if nic in (a, b))
        to_d = 0 if self.nics[p][1] is nic else 1
        # The window, cut short by the VM's previous and next switchovers (link notices from
        # other hosts), so back-to-back moves of one VM do not count a frame twice.
        lo, hi = sw - MOVE_WINDOW_BEFORE_MS * NS_PER_MS, sw + MOVE_WINDOW_AFTER_MS * NS_PER_MS
        for h, t, _ in nic.links:
            if h != rec["dst"]:
                if t < sw:
                    lo = max(lo, t)
                elif t > sw:
                    hi = min(hi, t)
        dst_id = self.host_ids.get(rec["dst"], -1)
        src_id = self.host_ids.get(rec["src"], -1)
        old_host = 0
        frames = lost = 0
        delay = 0
        first_new = None
        k = self.k
        for i in range(p, self.sent, k):
            t = self.send_ns[i]
            if not t or t < lo or t > hi:
                continue
            frames += 1
            r = self.recv_ns[i]
            if not r:
                lost += 1
                continue
            delay = max(delay, r - t)
            if (i // k) & 1 == to_d and sw <= r < hi:
                if self.recv_host[i] == dst_id:
                    first_new = r if first_new is None else min(first_new, r)
                elif self.recv_host[i] == src_id:
                    old_host += 1
        mis = sum(1 for i in self.misdelivered_idx if i % k == p and lo <= self.send_ns[i] <= hi)
        out.update(frames=frames, lost=lost, misdelivered=mis, delay_ms_max=round(delay / NS_PER_MS, 3),
                   via_old_host=old_host,
                   blackout_ms=None if first_new is None else round((first_new - sw) / NS_PER_MS, 3))
        return out

    def report(self, moves: list[dict] | None = None) -> dict:
        lat = sorted((self.recv_ns[i] - self.send_ns[i]) / NS_PER_MS
                     for i in range(self.sent) if self.recv_ns[i] and self.send_ns[i])

        def pct(q):
            return round(percentile(lat, q), 3) if lat else None

        sent = self.sent - self.not_linked - self.send_errors
        frames = {
            "sent": sent,
            "delivered": self.delivered,
            "lost": sent - self.delivered,
            "duplicated": self.duplicated,
            "misdelivered": self.misdelivered,
            "not_sent": self.not_linked + self.send_errors,
            "broadcast_rx": self.other_rx,
            "foreign": self.foreign,
        }
        moves_out = []
        for rec in moves or []:
            moves_out.append({k: rec.get(k) for k in ("vm", "src", "dst", "seq", "converged", "latency_ms")}
                             | self.move_stats(rec))
        per_move_lost = [m["lost"] for m in moves_out if m["lost"] is not None]
        return {
            "pairs": self.k,
            "rate_per_pair": self.rate,
            "duration_s": round(((self.end_ns or self.t0_ns) - self.t0_ns) / NS_PER_S, 3),
            "frames": frames,
            "accounted": frames["sent"] == frames["delivered"] + frames["lost"],
            "delay_ms": {"p50": pct(50), "p99": pct(99), "max": round(lat[-1], 3) if lat else None},
            "moves": moves_out,
            "moves_summary": {
                "moves": len(moves_out),
                "frames_lost": sum(per_move_lost),
                "moves_with_loss": sum(1 for x in per_move_lost if x),
                "misdelivered": sum(m["misdelivered"] or 0 for m in moves_out),
                "via_old_host": sum(m["via_old_host"] or 0 for m in moves_out),
                "blackout_ms_max": max((m["blackout_ms"] for m in moves_out if m["blackout_ms"] is not None),
                                       default=None),
            },
            "agents": getattr(self, "agents_delta", {}),
            "kernel_udp_rcvbuf_errors": getattr(self, "kernel_rcvbuf_errors", None),
            "pairs_list": [[a.name, b.name] for a, b in self.nics],
        }


def move_during(cluster: Cluster, placement: dict[str, str], hosts: list[str], *, moves: int, t0_ns: int,
                duration_s: float, seed: int, records: list[dict], on_move=None) -> None:
    """Move `moves` random VMs of `placement` (VM -> host, kept current) to random other hosts,
    evenly spread over `duration_s` from `t0_ns`, one after another; each reply goes to `records`."""
    rng = random.Random(seed)
    gap_ns = int(duration_s * NS_PER_S / (moves + 1))
    with cluster.controller_client(timeout_ms=30_000) as ctl:
        for j in range(moves):
            delay = (t0_ns + (j + 1) * gap_ns - time.monotonic_ns()) / NS_PER_S
            if delay > 0:
                time.sleep(delay)
            name = rng.choice(sorted(placement))
            dst = rng.choice([h for h in hosts if h != placement[name]])
            rec = ctl.call("vm_move", {"name": name, "to": dst})
            if rec.get("converged"):
                placement[name] = dst
            records.append(rec)
            if on_move:
                on_move(rec)


def run_traffic(cluster: Cluster, *, pairs: int, rate: float, duration_s: float, moves: int = 0,
                seed: int = 1, on_move=None) -> dict:
    """Run traffic for `duration_s`, moving `moves` random paired VMs one after another during it."""
    run = TrafficRun(cluster, pairs, rate, seed=seed)
    records: list[dict] = []
    try:
        run.setup()
        run.start()
        run.stop_sending_at(run.t0_ns + int(duration_s * NS_PER_S))
        if moves:
            placement = {n.name: n.host for n in run.by_name.values()}
            move_during(cluster, placement, run.hosts, moves=moves, t0_ns=run.t0_ns, duration_s=duration_s,
                        seed=seed, records=records, on_move=on_move)
        remaining = (run.end_ns - time.monotonic_ns()) / NS_PER_S
        if remaining > 0:
            time.sleep(remaining)
        run.finish()
    except BaseException:
        run.abort()
        raise
    return run.report(records)
