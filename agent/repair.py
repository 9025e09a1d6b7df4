"""Repair (DESIGN.md "Dissemination ... and why it needs repair"): pulls of missing ranges and
snapshots, asked for, retried and answered, and the controller's repair hints.

The scheduler keeps one pull or snapshot in flight per peer (PeerState.pull_pending), retried
after pull_timeout_ms from a heap of due times (a scan of every peer per timer costs O(N) per
agent: 17 s at 1,000 hosts). What comes back is merged through the core's own merge path.

Pure: no I/O, no clock, no randomness (tests/test_core_purity.py).
"""

from __future__ import annotations

import heapq
from collections.abc import Callable

from agent import wire
from agent.config import AgentConfig
from agent.effects import Effect, Emit, Reply, ToPeer
from agent.mactable import Entry, MacTable
from agent.originlog import OriginLog
from agent.peers import PeerState
from agent.updates import Stats
from agent.wire import MsgType, WireError

NS_PER_MS = 1_000_000


class Repair:
    __slots__ = ("pending", "_due", "_timeout_ns", "_host", "_incarnation", "_config", "_stats", "_peers",
                 "_table", "_log", "_send", "_merge", "_take_updates", "_peer_of", "_report_row", "_applied_at")

    def __init__(
        self,
        host: str,
        incarnation: int,
        config: AgentConfig,
        stats: Stats,
        peers: dict[str, PeerState],
        table: Callable[[], MacTable],
        log: OriginLog,
        *,
        send: Callable[[Effect], None],
        merge: Callable[[int, int, Entry, int], bool],
        take_updates: Callable[[str, int, list, int, bool], None],
        peer_of: Callable[[str, int], PeerState | None],
        report_row: Callable[[int, int, Entry, int], None],
        applied_at: dict[tuple[int, int], int] | None,
    ) -> None:
        self.pending = 0  # peers with a pull or snapshot in flight
        # (retry time ns, peer host) for every pull set pending; stale ones are skipped when popped.
        self._due: list[tuple[int, str]] = []
        self._timeout_ns = config.pull_timeout_ms * NS_PER_MS
        self._host = host
        self._incarnation = incarnation
        self._config = config
        self._stats = stats
        self._peers = peers
        self._table = table  # the core's table, read when needed (a driver may replace it before start)
        self._log = log
        self._send = send  # the core's outbox
        self._merge = merge  # merge one entry as the core does (apply bookkeeping, report)
        self._take_updates = take_updates  # the core's gossip path, for pulled updates
        self._peer_of = peer_of  # the member's state for an incarnation (or None)
        self._report_row = report_row
        self._applied_at = applied_at

    # ------------------------------------------------------------------ asking

    def maybe_pull(self, peer: PeerState, now_ns: int) -> bool:
        """Pull the first missing range from its origin, unless a pull is already in flight;
        True if one is in flight now."""
        if peer.pull_pending or self._config.defect_no_repair:
            return peer.pull_pending
        rng = peer.missing_range()
        if rng is None:
            return False
        self.pull(peer, rng[0], rng[1], now_ns)
        return True

    def pull(self, peer: PeerState, lo: int, hi: int, now_ns: int) -> None:
        """Ask `peer` for its updates lo..hi (at most pull_batch_max of them)."""
        hi = min(hi, lo + self._config.pull_batch_max - 1)
        self._stats.pulls_sent += 1
        self._set_pending(peer, now_ns)
        self._send(ToPeer(peer.host, wire.encode(MsgType.PULL_REQ, [peer.host, peer.incarnation, lo, hi])))
        self._send(Emit({"kind": "repair.pull", "peer": peer.host, "lo": lo, "hi": hi}))

    def request_snapshot(self, peer: PeerState, now_ns: int) -> None:
        self._stats.snapshots_requested += 1
        self._set_pending(peer, now_ns)
        self._send(ToPeer(peer.host, wire.encode(MsgType.SNAPSHOT_REQ, [self._host])))

    def _set_pending(self, peer: PeerState, now_ns: int) -> None:
        if not peer.pull_pending:
            self.pending += 1
        peer.pull_pending = True
        peer.pull_retry_at_ns = now_ns + self._timeout_ns
        heapq.heappush(self._due, (peer.pull_retry_at_ns, peer.host))

    def clear(self, peer: PeerState) -> None:
        """No pull is in flight to `peer` any more (answered, or to be asked again)."""
        if peer.pull_pending:
            self.pending -= 1
        peer.pull_pending = False

    def forget(self, peer: PeerState) -> None:
        """`peer` left the membership (its heap entries are skipped when due)."""
        if peer.pull_pending:
            self.pending -= 1

    def retry(self, now_ns: int) -> None:
        """Ask again where an answer is overdue."""
        due = self._due
        if not self.pending:
            due.clear()
            return
        peers = self._peers
        while due and due[0][0] <= now_ns:
            peer = peers.get(heapq.heappop(due)[1])
            if peer is not None and peer.pull_pending and now_ns >= peer.pull_retry_at_ns:
                self.clear(peer)
                self.maybe_pull(peer, now_ns)

    # ------------------------------------------------------------------ answering

    def on_pull_req(self, body: list, envelope: object) -> None:
        origin, incarnation, lo, hi = body
        self._stats.pulls_served += 1
        updates = None
        if origin == self._host and incarnation == self._incarnation:
            updates = self._log.updates(lo, hi, self._config.pull_batch_max)
        if updates is None:
            # Not ours, an older life of ours, or a range we no longer keep: the whole table.
            self._send(Reply(envelope, self.snapshot_frame()))
            return
        self._send(Reply(envelope, wire.encode(MsgType.PULL_REPLY, [self._host, self._incarnation, updates])))

    def on_snapshot_req(self, envelope: object) -> None:
        self._stats.snapshots_served += 1
        self._send(Reply(envelope, self.snapshot_frame()))

    def snapshot_frame(self) -> bytes:
        versions = [[self._host, self._incarnation, self._log.n]]
        # (An origin we hold nothing of says nothing: at a cold start every joiner asks for a
        # snapshot and would get a vector of N zeros, N^2 rows across the cluster.)
        versions += [[p.host, p.incarnation, p.contiguous] for p in self._peers.values() if p.contiguous]
        return wire.encode(MsgType.SNAPSHOT, [self._host, self._table().snapshot(), versions])

    # ------------------------------------------------------------------ answers

    def on_pull_reply(self, body: list, now_ns: int, sender: str | None) -> None:
        origin, incarnation, updates = body
        if sender is not None and sender != origin:
            # A host answers a pull with its own updates only (on_pull_req); this one came
            # over our connection to `sender` yet speaks for another.
            self._stats.forged_claims += len(updates)
            return
        peer = self._peers.get(origin)
        if peer is not None:
            self.clear(peer)
        self._take_updates(origin, incarnation, updates, now_ns, True)
        if peer is not None and peer.incarnation == incarnation:
            self.maybe_pull(peer, now_ns)

    def on_snapshot(self, body: list, now_ns: int, via: str | None) -> None:
        sender, entries, versions = body
        peers = self._peers
        sender_peer = peers.get(sender)
        if sender_peer is None or (via is not None and via != sender):
            # From no member, or over our connection to one host in another's name.
            self._stats.non_member_messages += 1
            return
        stats = self._stats
        stats.snapshots_received += 1
        self.clear(sender_peer)
        me = self._host
        merge = self._merge
        repaired = stats.repaired_updates
        for vlan, mac, host, port, seq, tomb in entries:
            # A member relays what its table holds: entries of members (and ours: an earlier
            # life of ours claimed them), each one as its host numbered it. A live claim for a
            # name that is no member is refused; a tombstone is taken whoever deleted it, as
            # a host that left for good leaves its tombstones in every table and a joiner
            # that lacked them would disagree with every peer (and `dvs check`) for good.
            if host != me and host not in peers and not tomb:
                stats.non_member_claims += 1
                continue
            if merge(vlan, mac, Entry(host, port, seq, tomb), now_ns):
                stats.repaired_updates += 1
        # Our table now dominates every update the sender held, so we hold them too. (Only
        # for the life of each origin we know: a relay cannot tell us of a new life; that
        # comes from the origin itself or the controller.)
        for origin, incarnation, n in versions:
            peer = peers.get(origin)
            if peer is not None and peer.incarnation == incarnation:
                peer.advance_to(n)
        applied = stats.repaired_updates - repaired
        self._send(Emit({"kind": "repair.snapshot", "peer": sender, "entries": len(entries), "applied": applied,
                         "message": f"snapshot from {sender}: {len(entries)} entries, {applied} applied"}))

    def on_hint(self, args: dict, now_ns: int) -> None:
        """The controller waits for our apply report of an update from `origin`: PUB/SUB lost
        our copy and we would only learn so from the origin's next heartbeat. The hint carries
        the entry itself (merged as any update: the merge rule keeps it safe), with the origin's
        number for it when the controller knows it (then it counts as received: no gap to pull;
        without it the gap is pulled when the origin's next update or heartbeat shows it), or,
        for a tombstone, names the origin: ask it for everything after what we hold (an empty
        reply means nothing was lost)."""
        origin, incarnation, n = args.get("origin"), args.get("incarnation"), args.get("n", 0)
        if type(origin) is not str or type(incarnation) is not int or incarnation < 0:
            raise WireError("repair hint without origin and incarnation")
        if type(n) is not int or not 0 <= n <= wire.MAX_U64:
            raise WireError(f"repair hint with update number {n!r}")
        entry = args["entry"] if "entry" in args else None
        if "entry" in args and not (type(entry) is list and len(entry) == 6 and wire.entry_ok(*entry)):
            entry = wire.ENTRY(entry)  # raises, saying what is wrong
        if origin == self._host or origin not in self._peers or self._config.defect_no_repair:
            return
        self._stats.repair_hints += 1
        if entry is not None:
            vlan, mac, host, port, seq, tomb = entry
            if self._merge(vlan, mac, Entry(host, port, seq, tomb), now_ns):
                self._stats.repaired_updates += 1
            else:
                held = self._table().get((vlan, mac))
                if held is not None and (held.seq, held.host) >= (seq, host):
                    # We hold it (or newer) already: our apply report was lost (a faulty control
                    # link) or is still on its way. Report it again, or the controller waits
                    # for us until the op times out; stamped when we took it if we know.
                    applied_at = self._applied_at
                    t_ns = applied_at.get((vlan, mac), now_ns) if applied_at is not None else now_ns
                    self._report_row(vlan, mac, held, t_ns)
            if n:
                peer = self._peer_of(origin, incarnation)
                if peer is not None:
                    peer.mark(n)  # (we hold it, or something newer: as if gossip had brought it)
            return
        peer = self._peer_of(origin, incarnation)
        if peer is None:
            return
        # A pull already in flight may be the one that got lost: the hints are paced by the
        # controller, so ask again rather than wait out pull_timeout_ms.
        self.clear(peer)
        if not self.maybe_pull(peer, now_ns):
            self.pull(peer, peer.contiguous + 1, wire.MAX_U64, now_ns)
