"""The simulator's event loop: a calendar queue of events on a virtual clock, run in order.

Events are keyed by `(virtual time ns, destination id, sequence number)` in a calendar queue (a
dict of time slots of 2**SLOT_SHIFT ns, a heap of slot numbers, and a small heap for the slot
being run: a heartbeat round at 1,000 hosts puts a million deliveries in flight, and one big heap
of tuples spends its time on cache misses). Events of one (destination, virtual time) are handed
over as one batch, as a runtime drains a socket; the cluster (cluster.py) handles them.
"""

from __future__ import annotations

import heapq

NS_PER_US = 1_000
NS_PER_MS = 1_000_000

SLOT_SHIFT = 12  # a calendar slot is 4,096 ns of virtual time
PROGRESS_EVERY = 1 << 16  # events between two on_progress calls

# Destination ids in the event heap: actions run before deliveries of the same instant.
ACTION = -1
CONTROLLER = 0
CLIENT = 1
FIRST_AGENT = 2
CLIENT_ENVELOPE = b"client:sim"  # the simulated client's identity on the controller's socket

# An event is `(key, seq, kind, ...)` with key = t << DST_SHIFT | (destination id + 1): events
# sort by (time, destination, seq) comparing one int (deliveries share their rx tick's time,
# and a tuple whose first items are equal compares item by item, slowly).
DST_SHIFT = 24
DST_MASK = (1 << DST_SHIFT) - 1

# Event kinds (third field of an event tuple).
K_SUB = 0  # (key, seq, K_SUB, msg_type, body)                   gossip, decoded once
K_CTLIN = 1  # (key, seq, K_CTLIN, [(msg_type, body, frame)])    controller -> agent, one train
K_P2P = 2  # (key, seq, K_P2P, channel, frame, envelope)        repair request or reply
K_TIMER = 3  # (key, seq, K_TIMER)
K_TOCTL = 4  # (key, seq, K_TOCTL, envelope, [frames])           agent or client -> controller
K_TOCLIENT = 5  # (key, seq, K_TOCLIENT, [frames])
K_ACTION = 6  # (key, seq, K_ACTION, function, args)


def ms(ns: int) -> float:
    """Virtual ns as ms, rounded to the µs, as every figure of a result is."""
    return round(ns / NS_PER_MS, 3)


class Scheduler:
    """The event queue and the loop (a part of Simulator, which dispatches each batch: the
    loop is the hot path of a run, so it reads the cluster's state directly)."""

    def _init_scheduler(self) -> None:
        self.slots: dict[int, list[tuple]] = {}  # slot number -> its events, unordered
        self.slot_heap: list[int] = []  # slot numbers that have events
        self.slot = -1  # the slot being run
        self.heap: list[tuple] = []  # events pushed into that slot (or before) while it runs, a heap
        self.seq = 0
        self.now = 0
        self.stopped = False
        self.events = 0

    def _push(self, t: int, dst: int, *rest) -> None:
        self.seq += 1
        ev = ((t << DST_SHIFT) | (dst + 1), self.seq, *rest)
        slot = t >> SLOT_SHIFT
        if slot <= self.slot:
            heapq.heappush(self.heap, ev)
            return
        events = self.slots.get(slot)
        if events is None:
            self.slots[slot] = [ev]
            heapq.heappush(self.slot_heap, slot)
        else:
            events.append(ev)

    def at(self, t: int, fn, *args) -> None:
        self._push(t, ACTION, K_ACTION, fn, args)

    def _loop(self) -> None:
        pop = heapq.heappop
        agents = self.agents
        slots = self.slots
        slot_heap = self.slot_heap
        # A slot's events are sorted once when it starts (a sort of tuples compares their first
        # items natively; a heap pops with full tuple comparisons, a few per level), and run in
        # order; what is pushed into the slot while it runs (timers due now, actions) goes to
        # the small `side` heap, and the next event is the smaller of the two heads.
        side = self.heap
        cur: list[tuple] = []
        i = n = 0
        events = self.events
        progress_at = events + PROGRESS_EVERY
        while not self.stopped:
            if i < n:
                ev = cur[i]
                if side and side[0] < ev:
                    ev = pop(side)
                else:
                    i += 1
            elif side:
                ev = pop(side)
            elif slot_heap:
                self.slot = pop(slot_heap)
                cur = slots.pop(self.slot)
                cur.sort()
                i, n = 0, len(cur)
                continue
            else:
                break
            key = ev[0]
            t = key >> DST_SHIFT
            self.now = t
            dst = (key & DST_MASK) - 1
            # Everything else for the same destination at the same instant: one batch.
            more = None
            while True:
                if i < n and not (side and side[0] < cur[i]):
                    nxt = cur[i]
                    if nxt[0] != key:
                        break
                    i += 1
                elif side:
                    nxt = side[0]
                    if nxt[0] != key:
                        break
                    pop(side)
                else:
                    break
                if more is None:
                    more = [nxt]
                else:
                    more.append(nxt)
            events += 1 if more is None else 1 + len(more)
            if events >= progress_at and self.on_progress is not None:
                progress_at = events + PROGRESS_EVERY
                self.events = events
                self.on_progress(self)
            if dst >= FIRST_AGENT:
                a = agents.get(dst)
                if a is None:
                    self.undeliverable += 1 if more is None else 1 + len(more)
                    continue
                core = a.core
                if ev[2] == K_SUB:
                    core.on_gossip(ev[3], ev[4], t)
                else:
                    self._agent_event(a, ev, t)
                if more is not None:
                    for ev in more:
                        if ev[2] == K_SUB:
                            core.on_gossip(ev[3], ev[4], t)
                        else:
                            self._agent_event(a, ev, t)
                if a.alive:
                    self._after_agent(a, t)
            elif dst == CONTROLLER:
                batch = [ev] if more is None else [ev, *more]
                if not self.ctl_up:
                    # A crashed controller: what was on its way to it is lost, its timers with it.
                    self.undeliverable += sum(1 for e in batch if e[2] != K_TIMER)
                    continue
                ctl = self.controller
                for e in batch:
                    self._controller_event(ctl, e, t)
                self._after_controller(t)
            else:
                for e in [ev] if more is None else [ev, *more]:
                    if dst == CLIENT:
                        self.client.on_frames(e[3], t)
                    else:
                        e[3](*e[4])
        self.events = events

    def stop(self) -> None:
        self.stopped = True
