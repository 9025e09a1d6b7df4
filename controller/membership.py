"""Membership and liveness: which hosts are live, the membership epoch and the PEERS list
agents follow, and `wait_ready` (answered once enough agents hear each other).

Facts for the coordinator: `scan` names the hosts that just died, `seen` says whether a
dead host came back; the coordinator restarts VMs and ends ops. What this component sends
itself (PEERS to agents, wait_ready replies) goes into the coordinator's outbox.
"""

from __future__ import annotations

import heapq
from collections.abc import Callable
from dataclasses import dataclass

from agent import wire
from agent.wire import MsgType
from controller.api import RETRY_PREFIX, ApiError
from controller.applytrack import ApplyTracker
from controller.config import ControllerConfig
from controller.inventory import Host, Inventory
from dvswitch.naming import host_order

NS_PER_MS = 1_000_000
# wait_ready requests pending at once, at most: each holds a client envelope until its deadline,
# and 20,000 abandoned ones must cost neither memory nor a scan per status message.
READY_WAITERS_MAX = 1_024
READY_TIMEOUT_MS_MAX = 600_000
# Refused REGISTER envelopes remembered (not asked to register again), at most.
REFUSED_MAX = 1_024


@dataclass
class ReadyWaiter:
    envelope: list
    req_id: int
    hosts: int
    deadline_ns: int
    done: bool = False  # answered: still in the other index until popped there (lazy deletion)


class Membership:
    def __init__(self, inv: Inventory, config: ControllerConfig, outbox: list, applies: ApplyTracker,
                 journal: list, hosts: list[str] | None, event: Callable[..., None]) -> None:
        """`hosts`: the host names admitted besides those the journal admitted. None admits any
        name that registers (the simulator and unit tests, whose every host is their own); a
        list (the controller process, even an empty one) admits only those, the journal's and
        those `admit` admits later. `outbox`, `journal`: the coordinator's (the same lists, never
        replaced); `event`: the coordinator's operator log."""
        self.inv = inv
        self.config = config
        self.outbox = outbox
        self.applies = applies
        self.journal = journal
        self._event = event
        self.routes: dict[bytes, str] = {}  # first envelope frame -> host
        self.refused_registrations = 0
        self.refused: dict[bytes, None] = {}  # envelopes refused lately (bounded, oldest first)
        self.admitted: set[str] | None = None
        if hosts is not None:
            self.admitted = set(inv.admitted)
            if not self.admitted:
                # A journal of the version before admission: the hosts it names were members.
                self.admitted = set(inv.incarnations) | {vm.host for vm in inv.vms.values()}
            for name in [*sorted(self.admitted - inv.admitted, key=host_order), *hosts]:
                self.admit(name)
        self._live_n = 0  # hosts not dead, kept current by recount()
        self._live: frozenset[str] = frozenset()  # their names
        self._rank: dict[str, int] = {}  # host name -> its place in registration order
        # Membership epoch: bumped on every change; PEERS carries it and agents report it back.
        self.peers_epoch = 0
        self._peers_dirty = False
        self._peers_last_ns: int | None = None  # last broadcast
        self._peers_batch_ns = config.peers_batch_ms * NS_PER_MS
        self._refresh_ns = config.peers_refresh_ms * NS_PER_MS
        # Pending wait_ready requests, indexed twice (heaps with lazy deletion): by the host count
        # they wait for (the smallest is the first to be satisfied) and by deadline.
        self._ready_by_hosts: list[tuple[int, int, ReadyWaiter]] = []
        self._ready_by_deadline: list[tuple[int, int, ReadyWaiter]] = []
        self._ready_n = 0  # pending (not done) waiters
        self._ready_seq = 0

    def admit(self, name: str) -> bool:
        """Admit `name` (durably); False if it already was."""
        if self.admitted is None or (name in self.admitted and name in self.inv.admitted):
            return False
        self.admitted.add(name)
        self.inv.admitted.add(name)
        self.journal.append({"admit": name})
        return True

    def is_admitted(self, name: str) -> bool:
        return self.admitted is None or name in self.admitted

    def register(self, envelope: list, body: list, now_ns: int) -> tuple[str, int | None, int] | None:
        """A REGISTER: (name, its previous incarnation or None, its incarnation now); None if
        refused. A stale one (an incarnation below the previous) changes nothing here."""
        name, incarnation, pub, rpc, pid = body
        if not self.is_admitted(name):
            # Registration is no way in: an admin admits a host (`dvs host add`, `--hosts` at
            # start). Refused, counted, told why; its later messages are dropped, not invited.
            self.refused_registrations += 1
            if envelope:
                if len(self.refused) >= REFUSED_MAX:
                    del self.refused[next(iter(self.refused))]
                self.refused[envelope[0]] = None
                if self.refused_registrations <= 10 or self.refused_registrations % 1000 == 0:
                    self._event("host.refused", f"refused REGISTER from {name!r}: not an admitted host "
                                f"({self.refused_registrations} refused so far)", host=name, reason="not admitted")
            self.outbox.append((envelope, wire.encode(MsgType.REPLY, [0, False, (
                f"host {name!r} is not admitted; an admin adds it with `dvs host add {name}`")[:200]])))
            return None
        self.refused.pop(envelope[0] if envelope else b"", None)
        old = self.inv.hosts.get(name)
        prev = old.incarnation if old is not None else self.inv.incarnations.get(name)
        if prev is not None and incarnation < prev:
            return name, prev, incarnation
        if prev != incarnation:
            self.inv.incarnations[name] = incarnation
            self.journal.append({"host_incarnation": name, "incarnation": incarnation})
        if old is not None:
            self.routes.pop(old.route[0], None)
        self.inv.hosts[name] = Host(name, incarnation, pub, rpc, pid, envelope, last_seen_ns=now_ns,
                                    registered_ns=now_ns)
        self.routes[envelope[0]] = name
        self.recount()
        self.changed(now_ns)
        return name, prev, incarnation

    @property
    def rank(self) -> dict[str, int]:
        """Host name -> its place in registration order."""
        return self._rank

    @property
    def dirty(self) -> bool:
        """A membership change waits for its PEERS broadcast (the batch window is open)."""
        return self._peers_dirty

    @property
    def ready_pending(self) -> int:
        return self._ready_n

    def _reply(self, envelope: list, req_id: int, ok: bool, result) -> None:
        self.outbox.append((envelope, wire.encode(MsgType.REPLY, [req_id, ok, result])))

    def next_deadline_ns(self, tick_ns: int) -> int:
        if self._peers_dirty and self._peers_last_ns is not None:
            return min(tick_ns, self._peers_last_ns + self._peers_batch_ns)
        return tick_ns

    def scan(self, now_ns: int) -> list[str]:
        """Mark silent hosts suspect, then dead; the names that died now (membership changed)."""
        suspect_ns = self.config.suspect_after_ms * NS_PER_MS
        dead_ns = self.config.dead_after_ms * NS_PER_MS
        died = []
        for h in self.inv.hosts.values():
            silent = now_ns - h.last_seen_ns
            if h.state != "dead" and silent > dead_ns:
                h.state = "dead"
                died.append(h.name)
                self._event("host.dead", host=h.name)
            elif h.state == "alive" and silent > suspect_ns:
                h.state = "suspect"
                self._event("host.suspect", host=h.name)
        if died:
            self.recount()
            self.changed(now_ns)
        return died

    def changed(self, now_ns: int) -> None:
        self.peers_epoch += 1
        self._event("membership.epoch", epoch=self.peers_epoch, hosts=self._live_n)
        self._peers_dirty = True
        if self._peers_last_ns is None or now_ns - self._peers_last_ns >= self._peers_batch_ns:
            self.broadcast(now_ns)
        # else: on_timer sends it when the batch window ends (next_deadline_ns says when)

    def _peers_frame(self) -> bytes:
        members = [[h.name, h.incarnation, h.pub_endpoint, h.rpc_endpoint]
                   for h in self.inv.hosts.values() if h.state != "dead"]
        return wire.encode(MsgType.PEERS, [members, self.peers_epoch])

    def broadcast(self, now_ns: int) -> None:
        if self._peers_last_ns is not None and now_ns - self._peers_last_ns < self._peers_batch_ns:
            return
        self._peers_dirty = False
        self._peers_last_ns = now_ns
        frame = self._peers_frame()
        for h in self.inv.hosts.values():
            if h.state != "dead":
                h.peers_sent_ns = now_ns
                self.outbox.append((h.route, frame))

    def seen(self, host: str, now_ns: int) -> None:
        h = self.inv.hosts[host]
        h.last_seen_ns = now_ns
        if h.state == "suspect":
            h.state = "alive"
        elif h.state == "dead":
            # It was only paused (SIGSTOP) or cut off: readmit it. Its VMs were restarted
            # elsewhere with higher seqs, so its stale ports lose under the merge rule.
            h.state = "alive"
            self._event("host.readmitted", host=host)
            self.recount()
            self.changed(now_ns)

    def on_status(self, host: str, body: list, now_ns: int) -> None:
        _, incarnation, peers_heard, entries, digest, dropped, epoch = body
        h = self.inv.hosts[host]
        if incarnation != h.incarnation:
            return
        self.seen(host, now_ns)
        h.peers_heard, h.mac_entries, h.digest, h.dropped_malformed = peers_heard, entries, digest, dropped
        if epoch != self.peers_epoch and not self._peers_dirty and now_ns - h.peers_sent_ns >= self._refresh_ns:
            # It missed a membership change (a PEERS lost on a faulty control link): send it
            # again, to this agent only.
            h.peers_sent_ns = now_ns
            self.outbox.append((h.route, self._peers_frame()))
        if self._ready_n:
            self.check_ready(now_ns, h)

    def recount(self) -> None:
        self._live = frozenset(h.name for h in self.inv.hosts.values() if h.state != "dead")
        self._live_n = len(self._live)
        self.applies.set_live(self._live)
        self._rank = {name: i for i, name in enumerate(self.inv.hosts)}  # registration order

    def api_wait_ready(self, args, now_ns, envelope, req_id) -> None:
        hosts = int(args["hosts"])
        timeout_ms = int(args.get("timeout_ms", 30_000))
        if not 1 <= hosts <= 1_000_000:
            raise ApiError(f"hosts must be 1..1,000,000, not {hosts}")
        if not 0 <= timeout_ms <= READY_TIMEOUT_MS_MAX:
            raise ApiError(f"timeout_ms must be 0..{READY_TIMEOUT_MS_MAX}, not {timeout_ms}")
        if self._ready_n >= READY_WAITERS_MAX:
            raise ApiError(f"{RETRY_PREFIX}{READY_WAITERS_MAX} wait_ready requests are pending already; "
                           "retry once some have been answered")
        w = ReadyWaiter(envelope, req_id, hosts, now_ns + timeout_ms * NS_PER_MS)
        self._ready_seq += 1
        heapq.heappush(self._ready_by_hosts, (hosts, self._ready_seq, w))
        heapq.heappush(self._ready_by_deadline, (w.deadline_ns, self._ready_seq, w))
        self._ready_n += 1
        self.check_ready(now_ns)

    def check_ready(self, now_ns: int, reporter: Host | None = None) -> None:
        """Answer the waiters the cluster satisfies now, and those whose deadline passed.
        `reporter`: the host whose status just arrived. Unless it now meets the bar of the
        waiter asking for the fewest hosts, nothing changed for any waiter: no pass over the
        hosts, and never one over the waiters (they are popped in order of hosts wanted)."""
        if not self._ready_n:
            return
        by_hosts, by_deadline = self._ready_by_hosts, self._ready_by_deadline
        while by_hosts and by_hosts[0][2].done:
            heapq.heappop(by_hosts)
        if by_hosts:
            need = by_hosts[0][0]
            if reporter is None or (reporter.peers_heard >= need - 1 and self._live_n >= need):
                live = [h for h in self.inv.hosts.values() if h.state == "alive"]
                # Ready for k hosts: k alive, each hearing the other k - 1.
                ready_for = min(len(live), min((h.peers_heard for h in live), default=0) + 1)
                while by_hosts and by_hosts[0][0] <= ready_for:
                    w = heapq.heappop(by_hosts)[2]
                    if not w.done:
                        self._reply(w.envelope, w.req_id, True, {"hosts": len(live)})
                        self._ready_done(w)
        while by_deadline and (by_deadline[0][2].done or by_deadline[0][0] <= now_ns):
            w = heapq.heappop(by_deadline)[2]
            if w.done:
                continue
            live = [h for h in self.inv.hosts.values() if h.state == "alive"]
            meshed = sum(1 for h in live if h.peers_heard >= w.hosts - 1)
            self._reply(w.envelope, w.req_id, False,
                        f"cluster not ready: {len(live)}/{w.hosts} agents registered, "
                        f"{meshed} hear all their peers")
            self._ready_done(w)

    def _ready_done(self, w: ReadyWaiter) -> None:
        w.done = True
        w.envelope = []  # (the heaps may hold it a while longer: not the client's identity)
        self._ready_n -= 1
        if not self._ready_n:
            self._ready_by_hosts.clear()
            self._ready_by_deadline.clear()
        elif len(self._ready_by_hosts) + len(self._ready_by_deadline) > 4 * READY_WAITERS_MAX:
            # Answered ones below a pending one pile up in a heap: drop them (bounded memory).
            for heap in (self._ready_by_hosts, self._ready_by_deadline):
                heap[:] = [x for x in heap if not x[2].done]
                heapq.heapify(heap)

