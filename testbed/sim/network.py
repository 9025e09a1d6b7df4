"""The simulated network: latency, rx ticks, loss, duplication, reordering and partitions.

All per message, decided by the seeded network RNG:
- latency = `base_latency_us` + an exponential jitter of mean `jitter_mean_us` (defaults 100 µs
  and 50 µs). Every link is FIFO (TCP) unless `reorder` is on; what one sender emits in one
  flush to one receiver over the control connection travels together.
- a receiver takes its messages on a grid of `rx_tick_ns` (default 32,768 ns, as NIC interrupt
  coalescing does): what reaches it within one tick is handled as one batch at the tick's end.
  Under a burst (a thousand agents announcing 8,000 new VMs within a millisecond) an agent so
  handles many messages per wake-up, as a real one draining its socket does.
- `loss`, `dup` and `reorder` apply to agent-to-agent traffic (gossip and repair): ZeroMQ PUB/SUB
  drops silently and repair requests time out and are retried. The control connection
  (agent <-> controller DEALER/ROUTER over TCP) is reliable and FIFO unless `ctl_faults` is set:
  commands are sent again until acked, a lost apply report is made good by the target's ack and
  by repair hints (an agent that holds the hinted entry reports it again), and an op whose every
  resend is lost within its timeout fails.
- with `reorder`, a message is held back by an extra uniform delay in [0, `reorder_max_us`] with
  probability `reorder_prob` (defaults 1,000 µs and 0.2), and links are no longer FIFO.
- partitions drop every message between two groups while they last; the controller reaches
  every group (a separate management network) unless the partition names it (`ctl`), and then
  its control connections to the other groups are cut too.
- a partition that is no set of groups (a bridge host reaching both sides) is kept host by
  host (`blocked`, testbed/sim/faults.py), the controller cut from the hosts it names;
- loss, dup and reorder act only inside the fault window (or while a timed fault of the
  schedule, testbed/schedule.py, is in force); partitions and crashes happen at their
  scheduled times, which lie inside it.
- a timed fault narrowed to some hosts, peers (`from`) or message `types` acts where the real
  one does: on what each of its hosts receives (gossip, repair requests and replies, the
  controller's commands), through that host's own agent/faults.py `NetFaults`, the very code
  the agents' transport wrapper runs (`rx_faults`, testbed/sim/faults.py). The network
  delivers the frame first (partition, whole-cluster loss, latency, FIFO), then the receiver's
  rules drop, delay or copy it; a run without such a rule never takes that path.
"""

from __future__ import annotations

import heapq
import math
import random
from array import array
from typing import TYPE_CHECKING

from agent import wire
from agent.core import AgentCore
from agent.faults import CONTROLLER as CONTROLLER_NAME
from agent.faults import NetFaults, peek_type
from agent.wire import WireError
from testbed.sim.scheduler import (
    CLIENT_ENVELOPE,
    CONTROLLER,
    DST_SHIFT,
    K_CTLIN,
    K_P2P,
    K_SUB,
    K_TOCTL,
    NS_PER_US,
    SLOT_SHIFT,
)
from testbed.sim.spec import CTL, Partition

if TYPE_CHECKING:
    from testbed.sim.cluster import Agent
    from testbed.sim.config import NetConfig

ANY_GROUP = -1  # partition group of a controller that every group reaches


class Network:
    """Message delivery between the agents, the controller and the client (a part of Simulator)."""

    def _init_network(self, net: NetConfig, seed: int, n_hosts: int) -> None:
        self.net = net
        self.net_rng = random.Random(f"{seed}/net")
        self.p2p_last: dict[tuple[int, int], int] = {}  # FIFO of repair links
        self.ctl_to_client_last = 0
        self.client_to_ctl_last = 0
        self.base_ns = net.base_latency_us * NS_PER_US
        self.jitter_ns = net.jitter_mean_us * NS_PER_US
        tick = net.rx_tick_ns
        if tick < 0 or tick & (tick - 1):
            raise ValueError(f"rx_tick_ns must be 0 or a power of two, not {tick}")
        self.tick_mask = tick - 1 if tick else 0
        self.p2p_faulty = False  # loss/dup/reorder active on agent-to-agent traffic
        self.ctl_faulty = False  # ... and on control traffic
        self.loss = self.dup = 0.0
        self.reorder = False
        self.partitioned = False
        self.gid = [0] * n_hosts  # host index -> partition group
        self.ctl_gid = 0
        # Counters.
        self.msgs = 0
        self.bytes = 0
        self.by_type: dict[int, list[int]] = {}  # msg type -> [messages, bytes]
        self.lost = 0
        self.duplicated = 0
        self.cut = 0  # dropped by a partition
        self.undeliverable = 0  # to a crashed agent, or unroutable
        # Receive-side rules (timed faults narrowed by hosts, peers or types): host index -> its
        # wrapper while it holds a rule; empty almost always, and then no send path looks further.
        self.rx_faults: dict[int, NetFaults] = {}
        self.rx_match: dict[tuple[int, int], dict[int, NetFaults]] = {}  # (sender, msg type) -> receivers it hits

    def _latency(self) -> int:
        return self.base_ns + int(-math.log(1.0 - self.net_rng.random()) * self.jitter_ns)

    def _tick(self, arr: int) -> int:
        """The receiver's next rx tick after an arrival at `arr` (NetConfig.rx_tick_ns)."""
        return (arr | self.tick_mask) + 1 if self.tick_mask else arr

    def _count(self, frame: bytes, n: int) -> None:
        size = len(frame) * n
        self.msgs += n
        self.bytes += size
        c = self.by_type.get(peek_type(frame))
        if c is None:
            c = self.by_type[peek_type(frame)] = [0, 0]
        c[0] += n
        c[1] += size

    def _publish(self, a: Agent, frame: bytes, t: int) -> None:
        subs = self.subs.get(a.pub_ep)
        if not subs:
            return
        self._count(frame, len(subs))
        try:
            mt, body = wire.decode(frame, wire.MAX_SMALL_FRAME_BYTES)
            body = AgentCore.prepare(mt, body)
        except WireError:
            # Never from our own cores; still, let each receiver drop and count it.
            for iid in subs:
                self._push(self._tick(t + self._latency()), iid, K_P2P, "sub", frame, None)
            return
        if self.rx_faults:
            match = self._rx_receivers(a, frame)
            if match:
                self._publish_rx(a, subs, frame, mt, body, t, match)
                return
        slots = self.slots
        slot_heap = self.slot_heap
        current = self.slot
        rnd = self.net_rng.random
        log = math.log
        base = t + self.base_ns
        jit = self.jitter_ns
        fifo = a.fifo
        if fifo is None:
            fifo = a.fifo = array("q", bytes(8 * len(self.hosts)))
        check_fifo = base < a.fifo_until
        until = 0
        mask = self.tick_mask
        # Faults (partitions, loss, duplication, reordering) are tested inline; without them
        # this loop only draws each subscriber's latency.
        faulty = self.p2p_faulty or self.partitioned
        partitioned = self.partitioned
        gid = self.gid
        my_gid = gid[a.hidx]
        loss, dup, reorder = (self.loss, self.dup, self.reorder) if self.p2p_faulty else (0.0, 0.0, False)
        hold_p = self.net.reorder_prob
        hold_ns = self.net.reorder_max_us * NS_PER_US
        heap = self.heap
        seq = self.seq
        blk = self.blocked[a.hidx] if partitioned and self.blocked is not None else None
        for iid, hidx in subs.items():
            if partitioned and (gid[hidx] != my_gid or (blk is not None and hidx in blk)):
                self.cut += 1
                continue
            if loss and rnd() < loss:
                self.lost += 1
                continue
            arr = base + int(-log(1.0 - rnd()) * jit)
            if reorder and rnd() < hold_p:
                arr += int(rnd() * hold_ns)
            if mask:
                arr = (arr | mask) + 1
            if not reorder:
                if check_fifo and arr < fifo[hidx]:
                    arr = fifo[hidx]
                fifo[hidx] = arr
            if arr > until:
                until = arr
            seq += 1
            slot = arr >> SLOT_SHIFT
            ev = ((arr << DST_SHIFT) | (iid + 1), seq, K_SUB, mt, body)  # (_push, written out)
            if slot <= current:
                heapq.heappush(heap, ev)
            else:
                events = slots.get(slot)
                if events is None:
                    slots[slot] = [ev]
                    heapq.heappush(slot_heap, slot)
                else:
                    events.append(ev)
            if dup and rnd() < dup:
                self.duplicated += 1
                self._count(frame, 1)
                self.seq = seq
                self._push(self._tick(arr + self._latency()), iid, K_SUB, mt, body)
                seq = self.seq
        self.seq = seq
        a.fifo_until = max(until, a.fifo_until) if faulty else until

    def _rx_receivers(self, a: Agent, frame: bytes) -> dict[int, NetFaults]:
        """The receivers whose rules act on a frame of this type from `a` (cached until the rules change)."""
        key = (a.hidx, peek_type(frame))
        m = self.rx_match.get(key)
        if m is None:
            m = self.rx_match[key] = {i: nf for i, nf in self.rx_faults.items()
                                      if any(r.matches(a.host, frame) for r in nf.rules.values())}
        return m

    def _rx_push(self, nf: NetFaults, peer: str, frame: bytes, arr: int, dst: int, *rest) -> None:
        """A frame that reached its receiver at `arr`, through the receiver's rules: gone, or
        one or more copies, each after its delay (as the wrapper's call_later would)."""
        delays_s = nf.plan(peer, frame)
        if not delays_s:
            self.lost += 1
            return
        self.duplicated += len(delays_s) - 1
        for d in delays_s:
            self._push(self._tick(arr + round(d * 1e9)) if d else arr, dst, *rest)

    def _publish_rx(self, a: Agent, subs: dict, frame: bytes, mt, body, t: int, match: dict) -> None:
        """_publish's loop when some subscribers' rules act on this frame: the same network
        (and the same draws for everyone else), then each such receiver's rules."""
        rnd = self.net_rng.random
        log = math.log
        base = t + self.base_ns
        jit = self.jitter_ns
        fifo = a.fifo
        if fifo is None:
            fifo = a.fifo = array("q", bytes(8 * len(self.hosts)))
        until = a.fifo_until
        partitioned = self.partitioned
        gid = self.gid
        my_gid = gid[a.hidx]
        loss, dup, reorder = (self.loss, self.dup, self.reorder) if self.p2p_faulty else (0.0, 0.0, False)
        hold_p = self.net.reorder_prob
        hold_ns = self.net.reorder_max_us * NS_PER_US
        blk = self.blocked[a.hidx] if partitioned and self.blocked is not None else None
        for iid, hidx in subs.items():
            if partitioned and (gid[hidx] != my_gid or (blk is not None and hidx in blk)):
                self.cut += 1
                continue
            if loss and rnd() < loss:
                self.lost += 1
                continue
            arr = base + int(-log(1.0 - rnd()) * jit)
            if reorder and rnd() < hold_p:
                arr += int(rnd() * hold_ns)
            arr = self._tick(arr)
            if not reorder:
                if arr < fifo[hidx]:
                    arr = fifo[hidx]
                fifo[hidx] = arr
            if arr > until:
                until = arr
            nf = match.get(hidx)
            if nf is None:
                self._push(arr, iid, K_SUB, mt, body)
            else:
                self._rx_push(nf, a.host, frame, arr, iid, K_SUB, mt, body)
            if dup and rnd() < dup:
                self.duplicated += 1
                self._count(frame, 1)
                again = self._tick(arr + self._latency())
                if nf is None:
                    self._push(again, iid, K_SUB, mt, body)
                else:
                    self._rx_push(nf, a.host, frame, again, iid, K_SUB, mt, body)
        a.fifo_until = until

    def _p2p_send(self, src: Agent, dst: Agent, channel: str, frame: bytes, envelope, t: int) -> None:
        self._count(frame, 1)
        if self.partitioned and (self.gid[src.hidx] != self.gid[dst.hidx] or (
                self.blocked is not None and dst.hidx in self.blocked[src.hidx])):
            self.cut += 1
            return
        faulty = self.p2p_faulty
        rnd = self.net_rng.random
        if faulty and self.loss and rnd() < self.loss:
            self.lost += 1
            return
        arr = t + self._latency()
        if faulty and self.reorder:
            if rnd() < self.net.reorder_prob:
                arr += int(rnd() * self.net.reorder_max_us * NS_PER_US)
            arr = self._tick(arr)
        else:
            arr = self._tick(arr)
            link = (src.iid, dst.iid)
            last = self.p2p_last.get(link, 0)
            if arr < last:
                arr = last
            self.p2p_last[link] = arr
        rx = self.rx_faults
        nf = rx.get(dst.hidx) if rx else None
        if nf is None:
            self._push(arr, dst.iid, K_P2P, channel, frame, envelope)
        else:
            self._rx_push(nf, src.host, frame, arr, dst.iid, K_P2P, channel, frame, envelope)
        if faulty and self.dup and rnd() < self.dup:
            self.duplicated += 1
            self._count(frame, 1)
            again = self._tick(arr + self._latency())
            if nf is None:
                self._push(again, dst.iid, K_P2P, channel, frame, envelope)
            else:
                self._rx_push(nf, src.host, frame, again, dst.iid, K_P2P, channel, frame, envelope)

    def _request(self, a: Agent, host: str, frame: bytes, t: int) -> None:
        eps = a.conns.get(host)
        dst = self.by_rpc.get(eps[1]) if eps is not None else None
        if dst is None:
            self._count(frame, 1)
            self.undeliverable += 1  # a ROUTER drops what it has no connection for
            return
        self._p2p_send(a, dst, "rpc", frame, [a.pull_id], t)

    def _reply(self, a: Agent, envelope, frame: bytes, t: int) -> None:
        hidx = self.by_pull_id.get(envelope[0]) if envelope else None
        dst = self.current[hidx] if hidx is not None else None
        # The reply travels back over the connection the requester made to our rpc socket.
        if dst is None or dst.conns.get(a.host, ("", ""))[1] != a.rpc_ep:
            self._count(frame, 1)
            self.undeliverable += 1
            return
        self._p2p_send(a, dst, "pull", frame, None, t)

    def _ctl_link(self, hidx: int | None, frames: list, t: int, last: int) -> int | None:
        """Arrival time of a train on a control link, or None if it is lost."""
        for f in frames:
            self._count(f, 1)
        if self.partitioned and hidx is not None and (
                (self.ctl_gid != ANY_GROUP and self.gid[hidx] != self.ctl_gid) or hidx in self.ctl_blocked):
            self.cut += len(frames)
            return None
        arr = t + self._latency()
        if self.ctl_faulty and self.reorder and self.net_rng.random() < self.net.reorder_prob:
            return self._tick(arr + int(self.net_rng.random() * self.net.reorder_max_us * NS_PER_US))
        return max(self._tick(arr), last)

    def _ctl_rx(self, nf: NetFaults, a: Agent, items: list, arr: int) -> None:
        """A train from the controller that reached `a` at `arr`, through a's rules frame by
        frame: what is neither lost nor delayed stays one train, in order, ahead of the rest."""
        now, later = [], []
        for item in items:
            delays_s = nf.plan(CONTROLLER_NAME, item[2])
            if not delays_s:
                self.lost += 1
                continue
            self.duplicated += len(delays_s) - 1
            for d in delays_s:
                if d:
                    later.append((self._tick(arr + round(d * 1e9)), item))
                else:
                    now.append(item)
        if now:
            self._push(arr, a.iid, K_CTLIN, now)
        for at, item in later:
            self._push(at, a.iid, K_CTLIN, [item])

    def _to_controller(self, a: Agent, frames: list, t: int) -> None:
        if self.ctl_faulty and self.loss:
            frames = self._lossy(frames, frames)
        arr = self._ctl_link(a.hidx, frames, t, a.ctl_out_last)
        if arr is None or not frames:
            return
        a.ctl_out_last = max(a.ctl_out_last, arr)
        self._push(arr, CONTROLLER, K_TOCTL, a.ctl_env, frames)

    def _lossy(self, items: list, frames: list) -> list:
        """--ctl-faults: drop or duplicate control messages (items[i] carries frames[i])."""
        rnd = self.net_rng.random
        kept = []
        for item, frame in zip(items, frames, strict=True):
            if rnd() < self.loss:
                self.lost += 1
                self._count(frame, 1)
                continue
            kept.append(item)
            if self.dup and rnd() < self.dup:
                self.duplicated += 1
                kept.append(item)
        return kept

    def client_send(self, frame: bytes, t: int) -> None:
        if not self.ctl_up:
            self._count(frame, 1)
            self.undeliverable += 1
            return
        arr = self._ctl_link(None, [frame], t, self.client_to_ctl_last)
        self.client_to_ctl_last = arr
        self._push(arr, CONTROLLER, K_TOCTL, [CLIENT_ENVELOPE], [frame])

    def start_partition(self, p: Partition) -> None:
        rest = len(p.groups)
        for i in range(len(self.hosts)):
            self.gid[i] = rest
        self.ctl_gid = ANY_GROUP  # the controller reaches every group unless it is named
        for gi, g in enumerate(p.groups):
            for h in g:
                if h == CTL:
                    self.ctl_gid = gi
                else:
                    self.gid[self.hidx[h]] = gi
        self.partitioned = True

    def heal_partition(self, p: Partition) -> None:
        self.partitioned = False
        self.gid = [0] * len(self.hosts)
        self.ctl_gid = 0
