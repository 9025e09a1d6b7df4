"""The agent's protocol core: no I/O, no clock, no randomness.

Drivers (the asyncio/ZeroMQ runtime, the simulator) feed it frames and timer ticks
with the current monotonic time in ns, then take its outbox: a list of effects
(agent/effects.py: Publish, ToPeer, Reply, ToController, Subscribe, Unsubscribe, Emit), each
routed by the driver's one exhaustive route function."""

from __future__ import annotations

import heapq
from collections import deque
from collections.abc import Callable

from agent import wire
from agent.config import AgentConfig
from agent.effects import Effect, Publish, Reply, Subscribe, ToController, ToPeer, Unsubscribe
from agent.mactable import Entry, MacTable, format_mac, prepare_rows
from agent.peers import PeerState
from agent.switch import LocalSwitch
from agent.wire import MsgType, WireError

NS_PER_MS = 1_000_000

# Which message types each input channel may carry; anything else is dropped and counted.
ALLOWED = {
    "sub": {MsgType.HEARTBEAT, MsgType.UPDATES},
    "rpc": {MsgType.PULL_REQ, MsgType.SNAPSHOT_REQ, MsgType.REQUEST},
    "pull": {MsgType.PULL_REPLY, MsgType.SNAPSHOT},
    "ctl": {
        MsgType.PEERS,
        MsgType.ATTACH,
        MsgType.DETACH,
        MsgType.PREPARE,
        MsgType.SWITCHOVER,
        MsgType.REQUEST,
    },
}


# Largest frame per channel, in bytes: only repair replies carry whole tables.
FRAME_LIMIT = {
    "sub": wire.MAX_SMALL_FRAME_BYTES,
    "rpc": wire.MAX_SMALL_FRAME_BYTES,
    "pull": wire.MAX_FRAME_BYTES,
    "ctl": wire.MAX_SMALL_FRAME_BYTES,
}
# A peer the controller's membership no longer lists stays (while it talks to us) this many
# suspect windows at most (default 3 x 1,500 ms): long enough for a restarted controller to hear
# from every live agent again, short enough that a host dropped for good is not a member for as
# long as it keeps publishing.
MEMBERSHIP_GRACE_SUSPECTS = 3
# Updates (or applied reports) per frame at most, so a batch stays far below the limit.
PUB_BATCH_MAX = 2_000


class Stats:
    __slots__ = (
        "dropped_malformed",
        "dropped_unexpected",
        "updates_received",
        "updates_applied",
        "updates_originated",
        "pulls_sent",
        "pulls_served",
        "snapshots_requested",
        "snapshots_served",
        "snapshots_received",
        "repaired_updates",
        "heartbeats_received",
        "flap_reports",
        "repair_hints",
        "handler_errors",
        # Membership gate (DESIGN.md "Trust"): entries a host sent in another host's name (or
        # naming another host as theirs; a heartbeat in another's name counts one), and entries
        # or messages of a host that is no current member. Dropped, never applied.
        "forged_claims",
        "non_member_claims",
        "non_member_messages",
    )

    def __init__(self) -> None:
        for name in self.__slots__:
            setattr(self, name, 0)

    def as_dict(self) -> dict[str, int]:
        return {name: getattr(self, name) for name in self.__slots__}


def _runs(updates: list[list]) -> list[tuple[int, int]]:
    """Runs of consecutive update numbers, in order: 1, 2, 3, 7, 5, 6 -> (1, 3), (7, 7), (5, 6)."""
    first = updates[0][0]
    if len(updates) == 1:
        return [(first, first)]  # a move: one update
    numbers = [u[0] for u in updates]
    if numbers[-1] - first == len(numbers) - 1 and numbers == list(range(first, first + len(numbers))):
        return [(first, numbers[-1])]  # one run: what our own agents always send
    runs = []
    prev = first
    for n in numbers[1:]:
        if n != prev + 1:
            runs.append((first, prev))
            first = n
        prev = n
    runs.append((first, prev))
    return runs


class Updates(list):
    """A message's gossip rows, as decoded (the list itself), with what merging and apply
    reports need built once: a driver that hands one message to many cores (the simulator)
    prepares it once with AgentCore.prepare(). `rows` holds only the rows that name their
    origin as host (an origin only ever numbers its own claims); `forged` counts the others."""

    __slots__ = ("rows", "runs", "origin", "forged")


def prepare_updates(updates: list, origin: str) -> Updates:
    prepared = Updates(updates)
    prepared.origin = origin
    honest = updates
    for u in updates:
        if u[3] != origin:
            honest = [u for u in updates if u[3] == origin]
            break
    prepared.forged = len(updates) - len(honest)
    prepared.rows = prepare_rows(honest)
    # (Runs cover every number, forged ones too: they are the origin's numbered messages, and
    # pulling them again would bring the same rows.)
    prepared.runs = _runs(updates) if updates else ()
    return prepared


class AgentCore:
    def __init__(
        self,
        host: str,
        incarnation: int,
        config: AgentConfig | None = None,
        *,
        pub_endpoint: str = "",
        rpc_endpoint: str = "",
        pid: int = 0,
    ) -> None:
        self.host = host
        self.incarnation = incarnation
        self.config = config or AgentConfig()
        self.pub_endpoint = pub_endpoint
        self.rpc_endpoint = rpc_endpoint
        self.pid = pid
        self.table = MacTable(reverse_merge_rule=self.config.defect_reverse_merge)
        self.switch = LocalSwitch()
        self.peers: dict[str, PeerState] = {}
        self.stats = Stats()
        self.registered = False
        self.outbox: list[Effect] = []
        # Own numbered updates, kept for peers that pull a range: _log[i] has n = _log_base + i + 1.
        self.n = 0
        self._log: deque[list] = deque()
        self._log_base = 0
        self._pending_pub: list[list] = []
        # Apply report, pending: entries applied one by one (own claims, repair hints, snapshots)
        # as rows, and gossiped or pulled updates as ranges of their origin's numbers (a row per
        # (agent, entry) cost the controller ~4 µs each: 8 million rows for 8,000 VMs at 1,000 hosts).
        self._applied: list[tuple] = []
        self._ranges: list[list] = []
        self._next_heartbeat_ns = 0
        self._next_status_ns = 0
        self._next_applied_ns = 0
        self._applied_first_ns = -1  # when the first pending apply report was made; -1: none pending
        self._applied_due_ns = 0  # pending reports go out by then at the latest
        self._applied_send_ns = 0  # ...and with any flush from then on
        # A claim of ours is pending: report at once. It rides with the command's ack, and the
        # controller learns our number for it before the other agents report it by number.
        self._report_now = False
        self._pulls_pending = 0
        # (retry time ns, peer host) for every pull set pending; stale ones are skipped when
        # popped. A scan of every peer per timer costs O(N) per agent: 17 s at 1,000 hosts.
        self._pull_due: list[tuple[int, str]] = []
        self._bootstrapped = False
        self.peers_epoch = 0  # the controller's membership epoch of the last PEERS we took
        # Peers the last PEERS did not list -> when a PEERS first left them out (see _expire_leaving).
        self._leaving: dict[str, int] = {}
        # Peers heard within the suspect window, kept current in O(log N) amortized: one heap
        # entry per heard peer, at or before its last hearing; an entry that falls out of the
        # window either finds its peer silent since, or goes back in at its last hearing. (A
        # scan of all peers per status report costs N^2 per interval across a 1,000-host
        # cluster; an entry per hearing held millions in a simulated one.)
        self._heard = 0
        self._heard_due: list[tuple[int, int, PeerState]] = []
        self._heard_seq = 0  # tie-breaker: PeerStates do not compare
        # Flap guard: key -> recent times (ns) its host changed.
        # (The first move's time alone, then a list; not deques: a deque costs ~600 B, and a
        # simulated 1,000-host cluster keeps one per agent and moved MAC.)
        self._moves: dict[tuple[int, int], int | list[int]] = {}
        self.flapping: dict[tuple[int, int], int] = {}
        self.extra_methods: dict[str, Callable[[dict], object]] = {}
        self.last_error = ""
        self._prepared: dict[str, int] = {}  # prepared port -> time (ns) it is released
        # When each key last changed here (monotonic ns): how headless moves measure convergence.
        # Changes of a held entry only: 8,000 creates at 1,000 simulated agents are 8 million.
        # (vlan, mac) -> when we last applied a change to it; None: not kept (config.no_apply_times)
        self.applied_at: dict[tuple[int, int], int] | None = None if self.config.no_apply_times else {}
        c = self.config
        self._status_ns = c.heartbeat_interval_ms * NS_PER_MS
        self._applied_interval_ns = c.applied_report_interval_ms * NS_PER_MS
        self._applied_delay_ns = min(c.applied_report_delay_ms, c.applied_report_interval_ms) * NS_PER_MS
        self._hb_ns = self._suspect_ns = 0
        self._rescale()
        self._pull_timeout_ns = c.pull_timeout_ms * NS_PER_MS
        self._flap_window_ns = c.flap_window_ms * NS_PER_MS

    # ------------------------------------------------------------------ driver API

    def start(self, now_ns: int) -> None:
        self._send_register()
        self._next_heartbeat_ns = self._next_status_ns = now_ns

    def take_outbox(self) -> list[Effect]:
        out = self.outbox
        if out:  # (an empty outbox is handed out as is: drivers call this after every event)
            self.outbox = []
        return out

    def end_batch(self, now_ns: int) -> tuple[list[Effect], int]:
        """flush(), take_outbox() and next_deadline_ns() in one call: what a driver does after
        every batch of events (the simulator, millions of times)."""
        if self._pending_pub or self._applied or self._ranges:
            self.flush(now_ns)
        out = self.outbox
        if out:
            self.outbox = []
        return out, self.next_deadline_ns()

    def next_deadline_ns(self) -> int:
        d = min(self._next_heartbeat_ns, self._next_status_ns)
        if not self._applied and not self._ranges:
            return d
        return min(d, self._applied_due_ns if self._applied_first_ns >= 0 else self._next_applied_ns)

    def gossip_interval_ms(self) -> int:
        """The heartbeat interval for the current membership (see AgentConfig.heartbeat_budget_per_s)."""
        n = len(self.peers) + 1
        scaled = 1000 * n * (n - 1) // max(1, self.config.heartbeat_budget_per_s)
        return max(self.config.heartbeat_interval_ms, scaled)

    def _rescale(self) -> None:
        gossip_ms = self.gossip_interval_ms()
        self._hb_ns = gossip_ms * NS_PER_MS
        self._suspect_ns = max(self.config.suspect_after_ms, 3 * gossip_ms) * NS_PER_MS

    def on_frame(self, channel: str, frame: bytes, now_ns: int, envelope: object = None) -> None:
        """One frame arrived on `channel` ("sub", "rpc", "pull" or "ctl")."""
        try:
            mt, body = wire.decode(frame, FRAME_LIMIT[channel])
        except WireError:
            self.stats.dropped_malformed += 1
            return
        self.on_message(channel, mt, body, now_ns, envelope)

    @staticmethod
    def prepare(mt: MsgType, body: list) -> list:
        """A decoded message made ready for on_message(); the same object may then go to
        many cores (they only read it)."""
        if mt is MsgType.UPDATES or mt is MsgType.PULL_REPLY:
            return [body[0], body[1], prepare_updates(body[2], body[0])]
        return body

    def on_message(self, channel: str, mt: MsgType, body: list, now_ns: int, envelope: object = None) -> None:
        """A frame already decoded and validated by `wire.decode` (the simulator decodes a
        published frame once and hands the same read-only body to every subscriber)."""
        if mt not in ALLOWED[channel]:
            self.stats.dropped_unexpected += 1
            return
        try:
            self._dispatch(mt, body, now_ns, envelope)
        except Exception as e:  # noqa: BLE001 - a bug of ours must not kill the agent either
            self._failed(mt, e)

    def on_gossip(self, mt: MsgType, body: list, now_ns: int) -> None:
        """on_message("sub", mt, body, now_ns): the hot path of a driver that hands one
        decoded publication to many cores (the simulator, millions of times a run)."""
        try:
            if mt is MsgType.UPDATES:
                self._on_updates(body[0], body[1], body[2], now_ns, False)
            elif mt is MsgType.HEARTBEAT:
                self._on_heartbeat(*body, now_ns=now_ns)
            else:
                self.stats.dropped_unexpected += 1
        except Exception as e:  # noqa: BLE001 - as in on_message
            self._failed(mt, e)

    def _failed(self, mt: MsgType, e: Exception) -> None:
        if isinstance(e, WireError):
            # Well-formed but semantically impossible: the sender's fault, dropped and counted.
            self.stats.dropped_malformed += 1
        else:
            # Our fault, not the sender's: counted apart and shown in status so it gets fixed.
            self.stats.handler_errors += 1
            self.last_error = f"{mt.name}: {type(e).__name__}: {e}"[:300]

    def on_timer(self, now_ns: int) -> None:
        if now_ns >= self._next_heartbeat_ns:
            self._next_heartbeat_ns = now_ns + self._hb_ns
            self.outbox.append(
                Publish(wire.encode(MsgType.HEARTBEAT,
                                    [self.host, self.incarnation, self.n, self.table.digest, len(self.table)]))
            )
        if now_ns >= self._next_status_ns:
            self._next_status_ns = now_ns + self._status_ns
            self._send_status(now_ns)
            if self._prepared:
                self._expire_prepared(now_ns)
            if self._leaving:
                self._expire_leaving(now_ns)
        self._retry_pulls(now_ns)

    def _expire_prepared(self, now_ns: int) -> None:
        """Roll back a move whose switchover never came: the VM stays where it is."""
        for name, deadline in list(self._prepared.items()):
            port = self.switch.ports.get(name)
            if port is None or port.state != "prepared":
                del self._prepared[name]
            elif now_ns >= deadline:
                del self._prepared[name]
                self.switch.remove_key(port.vlan, port.mac)

    def _send_status(self, now_ns: int) -> None:
        if not self.registered:
            self._send_register()
        self.outbox.append(
            ToController(
                wire.encode(
                    MsgType.AGENT_STATUS,
                    [
                        self.host,
                        self.incarnation,
                        self.peers_heard(now_ns),
                        self.table.live_count(),
                        self.table.digest,
                        self.stats.dropped_malformed + self.stats.dropped_unexpected,
                        self.peers_epoch,
                    ],
                ),
            )
        )

    def flush(self, now_ns: int) -> None:
        """Emit what accumulated during a batch of events: own updates, applied reports."""
        pending = self._pending_pub
        if pending:
            # Our updates tell every peer we are alive and how far our numbering goes, as a
            # heartbeat would: the next heartbeat waits a full interval (under load most are
            # never sent; each costs every receiver a wake-up).
            self._next_heartbeat_ns = now_ns + self._hb_ns
            for i in range(0, len(pending), PUB_BATCH_MAX):
                batch = pending[i : i + PUB_BATCH_MAX]
                self.outbox.append(Publish(wire.encode(MsgType.UPDATES, [self.host, self.incarnation, batch])))
            self._pending_pub = []
        applied = self._applied
        ranges = self._ranges
        if not applied and not ranges:
            return
        if self._applied_first_ns < 0:
            # The first apply since the last report. The report may go with any flush from
            # max(now + delay, previous report + interval) on; by now + interval at the latest
            # (next_deadline_ns asks the driver for a wake-up then).
            self._applied_first_ns = now_ns
            self._applied_due_ns = max(now_ns + self._applied_interval_ns, self._next_applied_ns)
            # From then on any flush sends it: once both the delay since the first apply and
            # the interval since the last report have passed, or at the due time whatever comes.
            self._applied_send_ns = min(self._applied_due_ns,
                                        max(now_ns + self._applied_delay_ns, self._next_applied_ns))
        if not self._report_now and now_ns < self._applied_send_ns:
            return
        self._report_now = False
        self._applied_first_ns = -1
        self._next_applied_ns = now_ns + self._applied_interval_ns
        for i in range(0, max(len(applied), len(ranges)), PUB_BATCH_MAX):
            self.outbox.append(ToController(wire.encode(MsgType.APPLY_REPORT, [
                self.host, applied[i : i + PUB_BATCH_MAX], ranges[i : i + PUB_BATCH_MAX]])))
        self._applied = []
        self._ranges = []

    def note_malformed(self) -> None:
        """A driver saw a frame it could not even hand over (bad envelope): count it."""
        self.stats.dropped_malformed += 1

    # ------------------------------------------------------------------ queries

    def peers_heard(self, now_ns: int) -> int:
        due = self._heard_due
        horizon = now_ns - self._suspect_ns
        while due and due[0][0] < horizon:
            _, seq, p = heapq.heappop(due)
            if not p.heard:
                continue  # (it left the membership meanwhile)
            if p.last_heard_ns < horizon:
                p.heard = False
                self._heard -= 1
            else:
                heapq.heappush(due, (p.last_heard_ns, seq, p))
        return self._heard

    def _heard_from(self, peer: PeerState, now_ns: int) -> None:
        peer.last_heard_ns = now_ns
        if not peer.heard:
            peer.heard = True
            self._heard += 1
            self._heard_seq += 1
            heapq.heappush(self._heard_due, (now_ns, self._heard_seq, peer))

    def status(self, now_ns: int) -> dict:
        return {
            "host": self.host,
            "incarnation": self.incarnation,
            "pid": self.pid,
            "registered": self.registered,
            "pub_endpoint": self.pub_endpoint,
            "rpc_endpoint": self.rpc_endpoint,
            "peers": len(self.peers),
            "peers_heard": self.peers_heard(now_ns),
            "gossip_interval_ms": self._hb_ns // NS_PER_MS,
            "mac_entries": self.table.live_count(),
            "table_size": len(self.table),
            "digest": f"{self.table.digest:016x}",
            "ports": len(self.switch.ports),
            "updates_originated": self.n,
            "dropped_malformed": self.stats.dropped_malformed + self.stats.dropped_unexpected,
            "flapping": [{"vlan": k[0], "mac": format_mac(k[1]), "moves": v} for k, v in self.flapping.items()],
            "stats": self.stats.as_dict(),
            "last_error": self.last_error,
        }

    def mac_table(self) -> dict:
        local = {(p.vlan, p.mac): p for p in self.switch.ports.values()}
        rows = []
        for (vlan, mac), e in sorted(self.table.items()):
            port = local.get((vlan, mac))
            rows.append(
                {
                    "vlan": vlan,
                    "mac": format_mac(mac),
                    "host": e.host,
                    "port": e.port,
                    "seq": e.seq,
                    "tombstone": e.tombstone,
                    "local": e.host == self.host,
                    "rx_frames": port.rx_frames if port else 0,
                    "tx_frames": port.tx_frames if port else 0,
                    "drop_frames": port.drop_frames if port else 0,
                }
            )
        return {"host": self.host, "digest": f"{self.table.digest:016x}", "entries": rows, "ports": self.switch.describe()}

    # ------------------------------------------------------------------ dispatch

    def _dispatch(self, mt: MsgType, body: list, now_ns: int, envelope: object) -> None:
        if mt is MsgType.UPDATES or mt is MsgType.HEARTBEAT:
            # `envelope` on the sub channel: the host whose publisher the frame came from, when
            # the driver knows it (the runtime has a SUB socket per peer). Gossip speaks for
            # its publisher only.
            if envelope is not None and envelope != body[0]:
                self.stats.forged_claims += len(body[2]) if mt is MsgType.UPDATES else 1
            elif mt is MsgType.UPDATES:
                self._on_updates(body[0], body[1], body[2], now_ns, repaired=False)
            else:
                self._on_heartbeat(*body, now_ns=now_ns)
        elif mt is MsgType.REQUEST:  # (third: repair hints come by the hundred thousand at 1,000 hosts)
            self._on_request(body, now_ns, envelope)
        elif mt is MsgType.PULL_REQ:
            self._on_pull_req(body, envelope)
        elif mt is MsgType.PULL_REPLY:
            # (`envelope` on the pull channel: the host whose rpc socket the reply came from, if
            # the driver knows it; see AgentRuntime._on_pull)
            self._on_pull_reply(body, now_ns, envelope if type(envelope) is str else None)
        elif mt is MsgType.SNAPSHOT_REQ:
            self.stats.snapshots_served += 1
            self.outbox.append(Reply(envelope, self._snapshot_frame()))
        elif mt is MsgType.SNAPSHOT:
            self._on_snapshot(body, now_ns, envelope if type(envelope) is str else None)
        elif mt is MsgType.PEERS:
            self.peers_epoch = body[1]
            self._on_peers(body[0], now_ns)
        elif mt is MsgType.ATTACH:
            self._on_attach(body, now_ns, "attached")
        elif mt is MsgType.PREPARE:
            op, vm, vlan, mac, port = body
            held = self.switch.port_for(vlan, mac)
            if held is None or held.state != "active":
                # (A PREPARE resent by the controller may arrive after the switchover: then
                # the port is already active and stays so.)
                self.switch.prepare(port, vm, vlan, mac)
                self._prepared[port] = now_ns + self.config.prepare_timeout_ms * NS_PER_MS
            self._ack(op, True, "prepared", now_ns)
        elif mt is MsgType.SWITCHOVER:
            self._on_attach(body, now_ns, "switched")
        elif mt is MsgType.DETACH:
            self._on_detach(body, now_ns)

    # ------------------------------------------------------------------ gossip in

    def is_member(self, host: str) -> bool:
        """Whether `host` is a current member: ourselves, or a peer the controller's membership
        (PEERS) admitted and that has not left it (a peer the latest PEERS leaves out stays
        while it talks to us, for a grace at most: see _expire_leaving)."""
        return host == self.host or host in self.peers

    def _peer(self, origin: str, incarnation: int) -> PeerState | None:
        """The member's state for this incarnation; None if it is no member (only PEERS admits
        one) or the message is from an older life."""
        peer = self.peers.get(origin)
        if peer is None:
            return None
        if incarnation > peer.incarnation:
            self._clear_pending(peer)
            peer.new_incarnation(incarnation)
        elif incarnation < peer.incarnation:
            return None
        return peer

    def _on_updates(self, origin: str, incarnation: int, updates: list, now_ns: int, repaired: bool) -> None:
        if origin == self.host:
            return
        peer = self.peers.get(origin)
        if peer is None:
            # No member's: nobody admitted that name (or it left). Nothing of it is applied,
            # and no state is kept for it (a stream of made-up names must not grow our peers).
            self.stats.non_member_claims += len(updates)
            return
        if peer.incarnation != incarnation:
            peer = self._peer(origin, incarnation)
        self.stats.updates_received += len(updates)
        if type(updates) is not Updates or updates.origin != origin:
            updates = prepare_updates(updates, origin)
        if updates.forged:
            self.stats.forged_claims += updates.forged
        applied = self.table.merge_prepared(updates.rows)
        if applied:
            if repaired:
                self.stats.repaired_updates += len(applied)
            self._note_applied_many(applied, now_ns)
        # Our table now dominates each of these updates: report them as runs of numbers (an
        # origin numbers its updates 1, 2, 3 ...; one message is one run unless it is not ours).
        # Only if we took one: what we held already was reported when we took it (the
        # controller reads a steady stream of reports as a busy host, not a laggard).
        runs = updates.runs
        if applied:
            ranges = self._ranges
            for first, last in runs:
                if last >= 1:  # (numbering starts at 1: a 0 is nobody's update)
                    ranges.append([origin, incarnation, max(first, 1), last, now_ns])
        if peer is not None:
            if len(runs) == 1 and not peer.above and runs[0][0] <= peer.contiguous + 1:
                last = runs[0][1]  # (mark_run's common case: in order, no gap)
                if last > peer.contiguous:
                    peer.contiguous = last
                if last > peer.latest_seen:
                    peer.latest_seen = last
            else:
                for first, last in runs:
                    peer.mark_run(first, last)
            if not repaired:
                # A published update stands in for a heartbeat.
                if peer.heard:
                    peer.last_heard_ns = now_ns
                else:
                    self._heard_from(peer, now_ns)
                if peer.latest_seen > peer.contiguous:  # (_maybe_pull's own first test)
                    self._maybe_pull(peer, now_ns)

    def _on_heartbeat(self, origin: str, incarnation: int, latest: int, digest: int, count: int, now_ns: int) -> None:
        if origin == self.host:
            return
        if origin not in self.peers:
            self.stats.non_member_messages += 1
            return
        self.stats.heartbeats_received += 1
        peer = self._peer(origin, incarnation)
        if peer is None:
            return
        self._heard_from(peer, now_ns)
        if latest > peer.latest_seen:
            peer.latest_seen = latest
        if self._maybe_pull(peer, now_ns):
            return
        # Caught up with this peer's own updates: a digest that differs, stably, means one of
        # us lost something from a third party (e.g. an origin that died). Ask for its table.
        if digest == self.table.digest or peer.pull_pending or peer.contiguous < latest:
            peer.mismatch = (0, 0, 0)
            return
        mine, theirs, rounds = peer.mismatch
        rounds = rounds + 1 if (mine, theirs) == (self.table.digest, digest) else 1
        if rounds >= self.config.digest_mismatch_rounds and not self.config.defect_no_repair:
            rounds = 0
            self._request_snapshot(peer, now_ns)
        peer.mismatch = (self.table.digest, digest, rounds)

    def _maybe_pull(self, peer: PeerState, now_ns: int) -> bool:
        """Pull the first missing range from its origin, unless a pull is already in flight."""
        if peer.pull_pending or self.config.defect_no_repair:
            return peer.pull_pending
        rng = peer.missing_range()
        if rng is None:
            return False
        self._pull(peer, rng[0], rng[1], now_ns)
        return True

    def _pull(self, peer: PeerState, lo: int, hi: int, now_ns: int) -> None:
        """Ask `peer` for its updates lo..hi (at most pull_batch_max of them)."""
        hi = min(hi, lo + self.config.pull_batch_max - 1)
        self.stats.pulls_sent += 1
        self._set_pending(peer, now_ns)
        self.outbox.append(ToPeer(peer.host, wire.encode(MsgType.PULL_REQ, [peer.host, peer.incarnation, lo, hi])))

    def _on_repair_hint(self, args: dict, now_ns: int) -> None:
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
        if origin == self.host or origin not in self.peers or self.config.defect_no_repair:
            return
        self.stats.repair_hints += 1
        if entry is not None:
            vlan, mac, host, port, seq, tomb = entry
            if self._merge(vlan, mac, Entry(host, port, seq, tomb), now_ns):
                self.stats.repaired_updates += 1
            else:
                held = self.table.get((vlan, mac))
                if held is not None and (held.seq, held.host) >= (seq, host):
                    # We hold it (or newer) already: our apply report was lost (a faulty control
                    # link) or is still on its way. Report it again, or the controller waits
                    # for us until the op times out; stamped when we took it if we know.
                    t_ns = self.applied_at.get((vlan, mac), now_ns) if self.applied_at is not None else now_ns
                    self._report_applied(vlan, mac, held, t_ns)
            if n:
                peer = self._peer(origin, incarnation)
                if peer is not None:
                    peer.mark(n)  # (we hold it, or something newer: as if gossip had brought it)
            return
        peer = self._peer(origin, incarnation)
        if peer is None:
            return
        # A pull already in flight may be the one that got lost: the hints are paced by the
        # controller, so ask again rather than wait out pull_timeout_ms.
        self._clear_pending(peer)
        if not self._maybe_pull(peer, now_ns):
            self._pull(peer, peer.contiguous + 1, wire.MAX_U64, now_ns)

    def _request_snapshot(self, peer: PeerState, now_ns: int) -> None:
        self.stats.snapshots_requested += 1
        self._set_pending(peer, now_ns)
        self.outbox.append(ToPeer(peer.host, wire.encode(MsgType.SNAPSHOT_REQ, [self.host])))

    def _set_pending(self, peer: PeerState, now_ns: int) -> None:
        if not peer.pull_pending:
            self._pulls_pending += 1
        peer.pull_pending = True
        peer.pull_retry_at_ns = now_ns + self._pull_timeout_ns
        heapq.heappush(self._pull_due, (peer.pull_retry_at_ns, peer.host))

    def _clear_pending(self, peer: PeerState) -> None:
        if peer.pull_pending:
            self._pulls_pending -= 1
        peer.pull_pending = False

    def _retry_pulls(self, now_ns: int) -> None:
        due = self._pull_due
        if not self._pulls_pending:
            due.clear()
            return
        while due and due[0][0] <= now_ns:
            peer = self.peers.get(heapq.heappop(due)[1])
            if peer is not None and peer.pull_pending and now_ns >= peer.pull_retry_at_ns:
                self._clear_pending(peer)
                self._maybe_pull(peer, now_ns)

    def _on_pull_req(self, body: list, envelope: object) -> None:
        origin, incarnation, lo, hi = body
        self.stats.pulls_served += 1
        first_held = self._log_base + 1
        if origin != self.host or incarnation != self.incarnation or lo < first_held or lo > hi:
            # Not ours, an older life of ours, or a range we no longer keep: the whole table.
            self.outbox.append(Reply(envelope, self._snapshot_frame()))
            return
        hi = min(hi, self.n, lo + self.config.pull_batch_max - 1)
        start = lo - first_held
        updates = [self._log[i] for i in range(start, start + max(0, hi - lo + 1))]
        self.outbox.append(Reply(envelope, wire.encode(MsgType.PULL_REPLY, [self.host, self.incarnation, updates])))

    def _on_pull_reply(self, body: list, now_ns: int, sender: str | None) -> None:
        origin, incarnation, updates = body
        if sender is not None and sender != origin:
            # A host answers a pull with its own updates only (_on_pull_req); this one came
            # over our connection to `sender` yet speaks for another.
            self.stats.forged_claims += len(updates)
            return
        peer = self.peers.get(origin)
        if peer is not None:
            self._clear_pending(peer)
        self._on_updates(origin, incarnation, updates, now_ns, repaired=True)
        if peer is not None and peer.incarnation == incarnation:
            self._maybe_pull(peer, now_ns)

    def _snapshot_frame(self) -> bytes:
        versions = [[self.host, self.incarnation, self.n]]
        # (An origin we hold nothing of says nothing: at a cold start every joiner asks for a
        # snapshot and would get a vector of N zeros, N^2 rows across the cluster.)
        versions += [[p.host, p.incarnation, p.contiguous] for p in self.peers.values() if p.contiguous]
        return wire.encode(MsgType.SNAPSHOT, [self.host, self.table.snapshot(), versions])

    def _on_snapshot(self, body: list, now_ns: int, via: str | None) -> None:
        sender, entries, versions = body
        sender_peer = self.peers.get(sender)
        if sender_peer is None or (via is not None and via != sender):
            # From no member, or over our connection to one host in another's name.
            self.stats.non_member_messages += 1
            return
        self.stats.snapshots_received += 1
        self._clear_pending(sender_peer)
        peers = self.peers
        me = self.host
        for vlan, mac, host, port, seq, tomb in entries:
            # A member relays what its table holds: entries of members (and ours: an earlier
            # life of ours claimed them), each one as its host numbered it. A live claim for a
            # name that is no member is refused; a tombstone is taken whoever deleted it, as
            # a host that left for good leaves its tombstones in every table and a joiner
            # that lacked them would disagree with every peer (and `dvs check`) for good.
            if host != me and host not in peers and not tomb:
                self.stats.non_member_claims += 1
                continue
            if self._merge(vlan, mac, Entry(host, port, seq, tomb), now_ns):
                self.stats.repaired_updates += 1
        # Our table now dominates every update the sender held, so we hold them too. (Only
        # for the life of each origin we know: a relay cannot tell us of a new life; that
        # comes from the origin itself or the controller.)
        for origin, incarnation, n in versions:
            peer = peers.get(origin)
            if peer is not None and peer.incarnation == incarnation:
                peer.advance_to(n)

    # ------------------------------------------------------------------ merge and origination

    def _merge(self, vlan: int, mac: int, entry: Entry, now_ns: int, n: int = 0) -> bool:
        """Merge one entry; `n` is our own update number for it when we originate it."""
        key = (vlan, mac)
        applied, old = self.table.merge(key, entry)
        if applied:
            self._note_applied_many([(key, old, entry)], now_ns)
            self._report_applied(vlan, mac, entry, now_ns, n)
        return applied

    def _report_applied(self, vlan: int, mac: int, entry: Entry, t_ns: int, n: int = 0) -> None:
        """Report `entry` as applied here at t_ns, a row of its own; `n`: our number for it if
        we originated it (then the report goes at once, with the command's ack)."""
        self._applied.append((vlan, mac, entry.host, entry.seq, entry.tombstone, t_ns, n))
        if n:
            self._report_now = True

    def _note_applied_many(self, applied: list, now_ns: int) -> None:
        """Bookkeeping after the table took entries `(key, old, new)`: local ports, flap guard,
        when each key changed (changes only: a first sighting is a create, not a move). One
        loop for a batch: 8,000 creates are 8,000 rows at every agent."""
        self.stats.updates_applied += len(applied)
        local = self.switch.by_key
        moves = self._moves
        applied_at = self.applied_at
        for key, old, new in applied:
            if old is not None:
                if applied_at is not None:
                    applied_at[key] = now_ns
                if old.host != new.host and not new.tombstone:
                    if key in moves or self.config.flap_moves < 1:
                        self._note_move(key, now_ns)
                    else:
                        moves[key] = now_ns  # (_note_move's common case: a MAC's first move)
            if key in local and new.host != self.host:
                self._release_local(key)

    def _release_local(self, key: tuple[int, int]) -> None:
        # The VM lives elsewhere now: a local port for it must not stay active.
        port = self.switch.port_for(key[0], key[1])
        if port is not None and port.state == "active":
            self.switch.remove_key(key[0], key[1])

    def _note_move(self, key: tuple[int, int], now_ns: int) -> None:
        times = self._moves.get(key)
        if times is None:
            # Its first move: an int, not a list (most MACs move once; a simulated 1,000-host
            # cluster keeps one per agent and moved MAC). Nothing reported before, nothing now.
            self._moves[key] = now_ns
            if self.config.flap_moves >= 1:
                return
            times = self._moves[key] = []
        elif type(times) is int:
            times = self._moves[key] = [times]
        times.append(now_ns)
        if now_ns - times[0] > self._flap_window_ns:
            expired = 1
            while now_ns - times[expired] > self._flap_window_ns:
                expired += 1
            del times[:expired]
        if len(times) > self.config.flap_moves:
            if key not in self.flapping:
                self.stats.flap_reports += 1
            self.flapping[key] = len(times)
        else:
            self.flapping.pop(key, None)

    def _originate(self, vlan: int, mac: int, entry: Entry) -> None:
        self.n += 1
        self.stats.updates_originated += 1
        upd = [self.n, vlan, mac, entry.host, entry.port, entry.seq, entry.tombstone]
        self._log.append(upd)
        if len(self._log) > self.config.log_max_updates:
            self._log.popleft()
            self._log_base += 1
        self._pending_pub.append(upd)

    def _claim(self, vlan: int, mac: int, entry: Entry, now_ns: int) -> bool:
        # (_originate numbers it self.n + 1: the controller maps our number to the entry)
        if not self._merge(vlan, mac, entry, now_ns, self.n + 1):
            return False
        self._originate(vlan, mac, entry)
        return True

    # ------------------------------------------------------------------ control commands

    def _send_register(self) -> None:
        self.outbox.append(
            ToController(
                wire.encode(MsgType.REGISTER, [self.host, self.incarnation, self.pub_endpoint, self.rpc_endpoint, self.pid])
            )
        )

    def _ack(self, op: int, ok: bool, detail: str, now_ns: int) -> None:
        self.outbox.append(ToController(wire.encode(MsgType.ACK, [op, ok, detail, now_ns])))

    def _on_peers(self, members: list, now_ns: int) -> None:
        if not self.registered:
            # Newly (re)registered: tell the controller what we hold, so one that restarted
            # can reconcile its inventory (the highest (seq, host) wins there too).
            self.registered = True
            snap = self.table.snapshot()
            for i in range(0, len(snap), PUB_BATCH_MAX):
                self.outbox.append(ToController(wire.encode(MsgType.TABLE_REPORT, [self.host, snap[i : i + PUB_BATCH_MAX]])))
        seen = set()
        for host, incarnation, pub, rpc in members:
            if host == self.host:
                continue
            seen.add(host)
            if host not in self.peers:
                self.peers[host] = PeerState(host)
            peer = self._peer(host, incarnation)
            # (None: the list names an older life of a peer we know a newer one of, e.g. from
            # a repair hint; its endpoints are gone, so we stay with what we have)
            if peer is not None and (pub, rpc) != (peer.pub_endpoint, peer.rpc_endpoint):
                peer.pub_endpoint, peer.rpc_endpoint = pub, rpc
                self.outbox.append(Subscribe(host, pub, rpc))
        leaving = self._leaving
        if leaving:
            for host in seen.intersection(leaving):
                del leaving[host]
        for host in [h for h in self.peers if h not in seen]:
            if host not in leaving:
                leaving[host] = now_ns
        if leaving:
            self._expire_leaving(now_ns)
        self._rescale()
        if not self._bootstrapped and self.peers:
            # Joining (or rejoining): one snapshot beats pulling every origin's history.
            self._bootstrapped = True
            first = self.peers[min(self.peers)]
            if first.rpc_endpoint and not self.config.defect_no_repair:
                self._request_snapshot(first, now_ns)

    def _expire_leaving(self, now_ns: int) -> None:
        """Peers the membership no longer lists leave the mesh once silent, or after the grace
        whatever they do: a controller that just restarted lists only the agents registered so
        far (they come back within a status interval or two, and a peer still talking to us
        stays meanwhile), but one that dropped a host for good must not see it stay a member
        for as long as it keeps publishing."""
        grace_ns = MEMBERSHIP_GRACE_SUSPECTS * self._suspect_ns
        left = False
        for host, since_ns in list(self._leaving.items()):
            peer = self.peers.get(host)
            if peer is not None and peer.last_heard_ns >= 0 and now_ns - peer.last_heard_ns <= self._suspect_ns \
                    and now_ns - since_ns < grace_ns:
                continue
            del self._leaving[host]
            if peer is None:
                continue
            del self.peers[host]
            if peer.heard:
                peer.heard = False
                self._heard -= 1
            if peer.pull_pending:
                self._pulls_pending -= 1
            self.outbox.append(Unsubscribe(host))
            left = True
        if left:
            self._rescale()

    def _on_attach(self, body: list, now_ns: int, done: str) -> None:
        """ATTACH (create, HA restart) or SWITCHOVER (move): activate the port and claim the MAC.
        A resent command finds the claim already made and acks it again."""
        op, vm, vlan, mac, port, seq = body
        self.switch.activate(port, vm, vlan, mac)
        entry = Entry(self.host, port, seq)
        if self._claim(vlan, mac, entry, now_ns) or self.table.get((vlan, mac)) == entry:
            self._ack(op, True, done, now_ns)
        else:
            self.switch.remove_key(vlan, mac)
            held = self.table.get((vlan, mac))
            self._ack(op, False, f"stale: table holds seq {held.seq} on {held.host}", now_ns)

    def _on_detach(self, body: list, now_ns: int) -> None:
        op, vm, vlan, mac, tomb_seq = body
        port = self.switch.remove_key(vlan, mac)
        if tomb_seq:
            name = port.name if port else (self.table.get((vlan, mac)) or Entry("", "-", 0)).port
            self._claim(vlan, mac, Entry(self.host, name, tomb_seq, True), now_ns)
        self._ack(op, True, "detached" if port else "no such port", now_ns)

    def _api_claim(self, args: dict, now_ns: int) -> dict:
        """Headless move: take a VM's MAC over without the controller, EVPN style: the
        destination claims max-known seq + 1 and the merge rule settles any race."""
        vlan, mac, port, vm = int(args["vlan"]), int(args["mac"]), str(args["port"]), str(args["vm"])
        if not (1 <= vlan <= wire.MAX_VLAN and 0 <= mac <= wire.MAX_MAC):
            raise ValueError("vlan or mac out of range")
        held = self.table.get((vlan, mac))
        if held is not None and held.tombstone:
            raise ValueError(f"{vm} was deleted (tombstone seq {held.seq}); it cannot move")
        if held is not None and held.host == self.host:
            raise ValueError(f"{vm} is already on {self.host}")
        seq = held.seq + 1 if held is not None else 0
        self.switch.activate(port, vm, vlan, mac)
        self._claim(vlan, mac, Entry(self.host, port, seq), now_ns)
        return {"host": self.host, "seq": seq, "t_ns": now_ns}

    def _on_request(self, body: list, now_ns: int, envelope: object) -> None:
        """A request from the controller (`envelope` None) or from a client on our rpc socket."""
        req_id, method, args = body
        if envelope is None and method in ("register", "repair"):
            if method == "register":
                # The controller does not know us (it restarted): introduce ourselves again.
                self.registered = False
                self._send_register()
            else:
                self._on_repair_hint(args, now_ns)
            return  # notices: no reply
        try:
            if method == "status":
                result = self.status(now_ns)
            elif method == "mac_table":
                result = self.mac_table()
            elif method == "claim":
                result = self._api_claim(args, now_ns)
            elif method == "lookup":
                key = (int(args["vlan"]), int(args["mac"]))
                e = self.table.get(key)
                applied_ns = self.applied_at.get(key, 0) if self.applied_at is not None else 0
                result = None if e is None else {"host": e.host, "port": e.port, "seq": e.seq,
                                                  "tombstone": e.tombstone, "applied_ns": applied_ns}
            elif method == "ping":
                result = {"host": self.host, "incarnation": self.incarnation}
            elif method in self.extra_methods:
                result = self.extra_methods[method](args)
            else:
                raise ValueError(f"unknown method {method!r}")
        except (ValueError, TypeError, KeyError) as e:
            frame = wire.encode(MsgType.REPLY, [req_id, False, str(e)])
        else:
            frame = wire.encode(MsgType.REPLY, [req_id, True, result])
        self.outbox.append(ToController(frame) if envelope is None else Reply(envelope, frame))
