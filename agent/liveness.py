"""Liveness: how often we gossip for the current membership, and how many peers we heard from
within the suspect window (what our status report tells the controller).

Pure: no I/O, no clock, no randomness (tests/test_core_purity.py).
"""

from __future__ import annotations

import heapq

from agent.config import AgentConfig
from agent.peers import PeerState

NS_PER_MS = 1_000_000


class Liveness:
    __slots__ = ("hb_ns", "suspect_ns", "_config", "_heard", "_due", "_seq")

    def __init__(self, config: AgentConfig) -> None:
        self._config = config
        self.hb_ns = 0  # our heartbeat interval, ns (scaled to the membership: rescale())
        self.suspect_ns = 0  # a peer silent this long is no longer counted as heard
        # Peers heard within the suspect window, kept current in O(log N) amortized: one heap
        # entry per heard peer, at or before its last hearing; an entry that falls out of the
        # window either finds its peer silent since, or goes back in at its last hearing. (A
        # scan of all peers per status report costs N^2 per interval across a 1,000-host
        # cluster; an entry per hearing held millions in a simulated one.)
        self._heard = 0
        self._due: list[tuple[int, int, PeerState]] = []
        self._seq = 0  # tie-breaker: PeerStates do not compare

    def gossip_interval_ms(self, members: int) -> int:
        """The heartbeat interval for `members` hosts, us included (AgentConfig.heartbeat_budget_per_s)."""
        scaled = 1000 * members * (members - 1) // max(1, self._config.heartbeat_budget_per_s)
        return max(self._config.heartbeat_interval_ms, scaled)

    def rescale(self, members: int) -> None:
        gossip_ms = self.gossip_interval_ms(members)
        self.hb_ns = gossip_ms * NS_PER_MS
        self.suspect_ns = max(self._config.suspect_after_ms, 3 * gossip_ms) * NS_PER_MS

    def heard_from(self, peer: PeerState, now_ns: int) -> None:
        peer.last_heard_ns = now_ns
        if not peer.heard:
            peer.heard = True
            self._heard += 1
            self._seq += 1
            heapq.heappush(self._due, (now_ns, self._seq, peer))

    def forget(self, peer: PeerState) -> None:
        """`peer` left the membership: no longer counted (its heap entry is skipped when due)."""
        if peer.heard:
            peer.heard = False
            self._heard -= 1

    def heard(self, now_ns: int) -> int:
        """Peers heard within the suspect window before now_ns."""
        due = self._due
        horizon = now_ns - self.suspect_ns
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
