"""The agent's protocol core: no I/O, no clock, no randomness.

Drivers (the asyncio/ZeroMQ runtime, the simulator) feed it frames and timer ticks
with the current monotonic time in ns, then take its outbox: a list of effects
(agent/effects.py: Publish, ToPeer, Reply, ToController, Subscribe, Unsubscribe, Emit), each
routed by the driver's one exhaustive route function.

AgentCore is the coordinator: it dispatches messages, keeps the membership, merges gossip
into the table and acts on the controller's commands; the sub-machines are components with
their own state and narrow APIs:
- agent/originlog.py  OriginLog      our own numbered updates (served to pulls, published on flush);
- agent/applyreport.py ApplyReporter  what we applied, batched into APPLY_REPORTs;
- agent/repair.py     Repair         pulls and snapshots asked, retried, answered; repair hints;
- agent/commands.py   PortCommands   the controller's PREPARE, ATTACH, SWITCHOVER, DETACH;
- agent/membership.py Membership     peers admitted and let go as the controller's PEERS list them;
- agent/liveness.py   Liveness       gossip interval for the membership, peers heard;
- agent/flapguard.py  FlapGuard      MACs that move too often;
- agent/api.py                       the request API (status, mac_table, lookup, claim, ...);
- agent/updates.py                   prepared gossip rows, the counters.

Pure: no I/O, no clock, no randomness (tests/test_core_purity.py).
"""

from __future__ import annotations

from collections.abc import Callable

from agent import api, wire
from agent.applyreport import ApplyReporter
from agent.commands import PortCommands
from agent.config import AgentConfig
from agent.effects import Effect, Emit, Publish, Reply, ToController
from agent.flapguard import FlapGuard
from agent.liveness import Liveness
from agent.mactable import Entry, MacTable, format_mac
from agent.membership import MEMBERSHIP_GRACE_SUSPECTS, Membership
from agent.originlog import OriginLog
from agent.peers import PeerState
from agent.repair import Repair
from agent.switch import LocalSwitch
from agent.updates import BATCH_MAX, Stats, Updates, prepare_updates
from agent.wire import MsgType, WireError

__all__ = ["ALLOWED", "FRAME_LIMIT", "MEMBERSHIP_GRACE_SUSPECTS", "PUB_BATCH_MAX", "AgentCore", "Stats", "Updates",
           "prepare_updates"]

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
# Updates (or applied reports) per frame at most, so a batch stays far below the limit.
PUB_BATCH_MAX = BATCH_MAX


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
        self.config = c = config or AgentConfig()
        self.pub_endpoint = pub_endpoint
        self.rpc_endpoint = rpc_endpoint
        self.pid = pid
        self.table = MacTable(reverse_merge_rule=c.defect_reverse_merge)
        self.switch = LocalSwitch()
        self.peers: dict[str, PeerState] = {}
        self.stats = Stats()
        self.registered = False
        self.outbox: list[Effect] = []
        self.extra_methods: dict[str, Callable[[dict], object]] = {}
        self.last_error = ""
        # When each key last changed here (monotonic ns): how headless moves measure convergence.
        # Changes of a held entry only: 8,000 creates at 1,000 simulated agents are 8 million.
        # (vlan, mac) -> when we last applied a change to it; None: not kept (config.no_apply_times)
        self.applied_at: dict[tuple[int, int], int] | None = None if c.no_apply_times else {}
        self.log = OriginLog(c.log_max_updates)
        self.reports = ApplyReporter(host, c)
        self.liveness = Liveness(c)
        self.flap = FlapGuard(c)
        self.flapping = self.flap.flapping  # (the same dict: key -> moves, while flapping)
        self.repair = Repair(host, incarnation, c, self.stats, self.peers, lambda: self.table, self.log,
                             send=self._send, merge=self._merge, take_updates=self._on_updates,
                             peer_of=self._peer, report_row=self.reports.row, applied_at=self.applied_at)
        self._next_heartbeat_ns = 0
        self._next_status_ns = 0
        self.membership = Membership(host, c, self.peers, self.liveness, self.repair, peer_of=self._peer,
                                     send=self._send, resized=self.reports.rescale)
        self.peers_epoch = 0  # the controller's membership epoch of the last PEERS we took
        self.ports = PortCommands(host, c, self.switch, table=lambda: self.table, claim=self.claim, send=self._send)
        self._status_ns = c.heartbeat_interval_ms * NS_PER_MS
        self.liveness.rescale(1)

    @property
    def n(self) -> int:
        """Our latest own update number."""
        return self.log.n

    def _send(self, effect: Effect) -> None:
        self.outbox.append(effect)

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
        rep = self.reports
        if self.log.pending or rep.rows or rep.ranges:
            self.flush(now_ns)
        out = self.outbox
        if out:
            self.outbox = []
        return out, self.next_deadline_ns()

    def next_deadline_ns(self) -> int:
        d = min(self._next_heartbeat_ns, self._next_status_ns)
        rep = self.reports
        if not rep.rows and not rep.ranges:
            return d
        return min(d, rep.deadline_ns())

    def gossip_interval_ms(self) -> int:
        """The heartbeat interval for the current membership (see AgentConfig.heartbeat_budget_per_s)."""
        return self.liveness.gossip_interval_ms(len(self.peers) + 1)

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
            self._next_heartbeat_ns = now_ns + self.liveness.hb_ns
            self.outbox.append(
                Publish(wire.encode(MsgType.HEARTBEAT,
                                    [self.host, self.incarnation, self.log.n, self.table.digest, len(self.table)]))
            )
        if now_ns >= self._next_status_ns:
            self._next_status_ns = now_ns + self._status_ns
            self._send_status(now_ns)
            if self.ports.prepared:
                self.ports.expire(now_ns)
            if self.membership.leaving:
                self.membership.expire(now_ns)
        self.repair.retry(now_ns)

    def _send_status(self, now_ns: int) -> None:
        if not self.registered:
            self._send_register()
        self.outbox.append(ToController(wire.encode(MsgType.AGENT_STATUS, [
            self.host,
            self.incarnation,
            self.peers_heard(now_ns),
            self.table.live_count(),
            self.table.digest,
            self.stats.dropped_malformed + self.stats.dropped_unexpected,
            self.peers_epoch,
        ])))

    def flush(self, now_ns: int) -> None:
        """Emit what accumulated during a batch of events: own updates, applied reports."""
        log = self.log
        if log.pending:
            # Our updates tell every peer we are alive and how far our numbering goes, as a
            # heartbeat would: the next heartbeat waits a full interval (under load most are
            # never sent; each costs every receiver a wake-up).
            self._next_heartbeat_ns = now_ns + self.liveness.hb_ns
            pending = log.take_pending()
            for i in range(0, len(pending), PUB_BATCH_MAX):
                batch = pending[i : i + PUB_BATCH_MAX]
                self.outbox.append(Publish(wire.encode(MsgType.UPDATES, [self.host, self.incarnation, batch])))
        for frame in self.reports.take(now_ns):
            self.outbox.append(ToController(frame))

    def note_malformed(self) -> None:
        """A driver saw a frame it could not even hand over (bad envelope): count it."""
        self.stats.dropped_malformed += 1

    # ------------------------------------------------------------------ queries

    def peers_heard(self, now_ns: int) -> int:
        return self.liveness.heard(now_ns)

    def status(self, now_ns: int) -> dict:
        return api.status(self, now_ns)

    def mac_table(self) -> dict:
        return api.mac_table(self)

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
            self.repair.on_pull_req(body, envelope)
        elif mt is MsgType.PULL_REPLY:
            # (`envelope` on the pull channel: the host whose rpc socket the reply came from, if
            # the driver knows it; see AgentRuntime._on_pull)
            self.repair.on_pull_reply(body, now_ns, envelope if type(envelope) is str else None)
        elif mt is MsgType.SNAPSHOT_REQ:
            self.repair.on_snapshot_req(envelope)
        elif mt is MsgType.SNAPSHOT:
            self.repair.on_snapshot(body, now_ns, envelope if type(envelope) is str else None)
        elif mt is MsgType.PEERS:
            self.peers_epoch = body[1]
            self._on_peers(body[0], now_ns)
        elif mt is MsgType.ATTACH:
            self.ports.attach(body, now_ns, "attached")
        elif mt is MsgType.PREPARE:
            self.ports.prepare(body, now_ns)
        elif mt is MsgType.SWITCHOVER:
            self.ports.attach(body, now_ns, "switched")
        elif mt is MsgType.DETACH:
            self.ports.detach(body, now_ns)

    def _on_request(self, body: list, now_ns: int, envelope: object) -> None:
        """A request from the controller (`envelope` None) or from a client on our rpc socket."""
        req_id, method, args = body
        if envelope is None and method in ("register", "repair", "reports"):
            if method == "register":
                # The controller does not know us (it restarted): introduce ourselves again.
                self.registered = False
                self._send_register()
            elif method == "repair":
                self.repair.on_hint(args, now_ns)
            elif not self.reports.pace(args, now_ns):
                self.stats.dropped_malformed += 1
            return  # notices: no reply
        try:
            result = api.call(self, method, args, now_ns)
        except (ValueError, TypeError, KeyError) as e:
            frame = wire.encode(MsgType.REPLY, [req_id, False, str(e)])
        else:
            frame = wire.encode(MsgType.REPLY, [req_id, True, result])
        self.outbox.append(ToController(frame) if envelope is None else Reply(envelope, frame))

    # ------------------------------------------------------------------ gossip in

    def is_member(self, host: str) -> bool:
        """Whether `host` is a current member: ourselves, or a peer the controller's membership
        (PEERS) admitted and that has not left it (a peer the latest PEERS leaves out stays
        while it talks to us, for a grace at most: see Membership.expire)."""
        return host == self.host or host in self.peers

    def _peer(self, origin: str, incarnation: int) -> PeerState | None:
        """The member's state for this incarnation; None if it is no member (only PEERS admits
        one) or the message is from an older life."""
        peer = self.peers.get(origin)
        if peer is None:
            return None
        if incarnation > peer.incarnation:
            self.repair.clear(peer)
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
            ranges = self.reports.ranges
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
                    self.liveness.heard_from(peer, now_ns)
                if peer.latest_seen > peer.contiguous:  # (maybe_pull's own first test)
                    self.repair.maybe_pull(peer, now_ns)

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
        self.liveness.heard_from(peer, now_ns)
        if latest > peer.latest_seen:
            peer.latest_seen = latest
        if self.repair.maybe_pull(peer, now_ns):
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
            self.repair.request_snapshot(peer, now_ns)
        peer.mismatch = (self.table.digest, digest, rounds)

    # ------------------------------------------------------------------ merge and origination

    def _merge(self, vlan: int, mac: int, entry: Entry, now_ns: int, n: int = 0) -> bool:
        """Merge one entry; `n` is our own update number for it when we originate it."""
        key = (vlan, mac)
        applied, old = self.table.merge(key, entry)
        if applied:
            self._note_applied_many([(key, old, entry)], now_ns)
            self.reports.row(vlan, mac, entry, now_ns, n)
        return applied

    def _note_applied_many(self, applied: list, now_ns: int) -> None:
        """Bookkeeping after the table took entries `(key, old, new)`: local ports, flap guard,
        when each key changed (changes only: a first sighting is a create, not a move). One
        loop for a batch: 8,000 creates are 8,000 rows at every agent."""
        self.stats.updates_applied += len(applied)
        local = self.switch.by_key
        applied_at = self.applied_at
        for key, old, new in applied:
            if old is not None:
                if applied_at is not None:
                    applied_at[key] = now_ns
                if old.host != new.host and not new.tombstone and self.flap.moved(key, now_ns):
                    self._flapping(key, new.host)
            if key in local and new.host != self.host:
                self._release_local(key)

    def _flapping(self, key: tuple[int, int], host: str) -> None:
        """`key` just moved too often: reported (counted, an event), never acted on."""
        self.stats.flap_reports += 1
        moves, window_ms = self.flapping[key], self.config.flap_window_ms
        mac = format_mac(key[1])
        self.outbox.append(Emit({"kind": "flap.suppressed", "vlan": key[0], "mac": mac, "host": host, "moves": moves,
                                 "window_ms": window_ms,
                                 "message": f"MAC flap: vlan {key[0]} mac {mac} moved {moves} times within "
                                            f"{window_ms} ms (now on {host})"}))

    def _release_local(self, key: tuple[int, int]) -> None:
        # The VM lives elsewhere now: a local port for it must not stay active.
        port = self.switch.port_for(key[0], key[1])
        if port is not None and port.state == "active":
            self.switch.remove_key(key[0], key[1])

    def claim(self, vlan: int, mac: int, entry: Entry, now_ns: int) -> bool:
        """Take (vlan, mac) for `entry` of ours and number it; False if the table holds newer."""
        # (originate numbers it n + 1: the controller maps our number to the entry)
        if not self._merge(vlan, mac, entry, now_ns, self.log.n + 1):
            return False
        self.stats.updates_originated += 1
        self.log.originate(vlan, mac, entry)
        return True

    # ------------------------------------------------------------------ membership

    def _send_register(self) -> None:
        self.outbox.append(ToController(wire.encode(
            MsgType.REGISTER, [self.host, self.incarnation, self.pub_endpoint, self.rpc_endpoint, self.pid])))

    def _on_peers(self, members: list, now_ns: int) -> None:
        if not self.registered:
            # Newly (re)registered: tell the controller what we hold, so one that restarted
            # can reconcile its inventory (the highest (seq, host) wins there too).
            self.registered = True
            snap = self.table.snapshot()
            for i in range(0, len(snap), PUB_BATCH_MAX):
                self.outbox.append(ToController(wire.encode(MsgType.TABLE_REPORT, [self.host, snap[i : i + PUB_BATCH_MAX]])))
        self.membership.update(members, now_ns)
