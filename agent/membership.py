"""Membership as the controller lists it (PEERS): admit peers (subscribe to each), follow
their endpoints and incarnations, and let go of the ones it no longer lists.

Pure: no I/O, no clock, no randomness (tests/test_core_purity.py).
"""

from __future__ import annotations

from collections.abc import Callable

from agent.config import AgentConfig
from agent.effects import Effect, Subscribe, Unsubscribe
from agent.liveness import Liveness
from agent.peers import PeerState
from agent.repair import Repair

# A peer the controller's membership no longer lists stays (while it talks to us) this many
# suspect windows at most (default 3 x 1,500 ms): long enough for a restarted controller to hear
# from every live agent again, short enough that a host dropped for good is not a member for as
# long as it keeps publishing.
MEMBERSHIP_GRACE_SUSPECTS = 3


class Membership:
    __slots__ = ("leaving", "_bootstrapped", "_host", "_config", "_peers", "_liveness", "_repair", "_peer_of",
                 "_send", "_resized")

    def __init__(self, host: str, config: AgentConfig, peers: dict[str, PeerState], liveness: Liveness,
                 repair: Repair, *, peer_of: Callable[[str, int], PeerState | None],
                 send: Callable[[Effect], None], resized: Callable[[int], None] | None = None) -> None:
        # Peers the last PEERS did not list -> when a PEERS first left them out (see expire).
        self.leaving: dict[str, int] = {}
        self._bootstrapped = False
        self._host = host
        self._config = config
        self._peers = peers
        self._liveness = liveness
        self._repair = repair
        self._peer_of = peer_of  # the member's state for an incarnation (or None: an older life)
        self._send = send
        self._resized = resized  # told the membership's size (us included) whenever it changes

    def update(self, members: list, now_ns: int) -> None:
        """The controller's list of members [host, incarnation, pub, rpc], ourselves included."""
        peers = self._peers
        seen = set()
        for host, incarnation, pub, rpc in members:
            if host == self._host:
                continue
            seen.add(host)
            if host not in peers:
                peers[host] = PeerState(host)
            peer = self._peer_of(host, incarnation)
            # (None: the list names an older life of a peer we know a newer one of, e.g. from
            # a repair hint; its endpoints are gone, so we stay with what we have)
            if peer is not None and (pub, rpc) != (peer.pub_endpoint, peer.rpc_endpoint):
                peer.pub_endpoint, peer.rpc_endpoint = pub, rpc
                self._send(Subscribe(host, pub, rpc))
        leaving = self.leaving
        if leaving:
            for host in seen.intersection(leaving):
                del leaving[host]
        for host in [h for h in peers if h not in seen]:
            if host not in leaving:
                leaving[host] = now_ns
        if leaving:
            self.expire(now_ns)
        self._rescale()
        if not self._bootstrapped and peers:
            # Joining (or rejoining): one snapshot beats pulling every origin's history.
            self._bootstrapped = True
            first = peers[min(peers)]
            if first.rpc_endpoint and not self._config.defect_no_repair:
                self._repair.request_snapshot(first, now_ns)

    def expire(self, now_ns: int) -> None:
        """Peers the membership no longer lists leave the mesh once silent, or after the grace
        whatever they do: a controller that just restarted lists only the agents registered so
        far (they come back within a status interval or two, and a peer still talking to us
        stays meanwhile), but one that dropped a host for good must not see it stay a member
        for as long as it keeps publishing."""
        suspect_ns = self._liveness.suspect_ns
        grace_ns = MEMBERSHIP_GRACE_SUSPECTS * suspect_ns
        peers = self._peers
        left = False
        for host, since_ns in list(self.leaving.items()):
            peer = peers.get(host)
            if peer is not None and peer.last_heard_ns >= 0 and now_ns - peer.last_heard_ns <= suspect_ns \
                    and now_ns - since_ns < grace_ns:
                continue
            del self.leaving[host]
            if peer is None:
                continue
            del peers[host]
            self._liveness.forget(peer)
            self._repair.forget(peer)
            self._send(Unsubscribe(host))
            left = True
        if left:
            self._rescale()

    def _rescale(self) -> None:
        members = len(self._peers) + 1
        self._liveness.rescale(members)
        if self._resized is not None:
            self._resized(members)
