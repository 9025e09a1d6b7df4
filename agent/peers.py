"""What one agent knows of each peer: its incarnation, how far we hold its updates, repair state."""

from __future__ import annotations

from dataclasses import dataclass

EMPTY: frozenset[int] = frozenset()


# Every agent keeps one per peer: N^2 of them across a simulated cluster (a million at 1,000
# hosts), hence slots and no set until a gap needs one.
@dataclass(slots=True)
class PeerState:
    host: str
    incarnation: int = 0
    pub_endpoint: str = ""
    rpc_endpoint: str = ""
    # Highest n such that we hold every update 1..n of this incarnation (the version vector).
    contiguous: int = 0
    # Numbers above `contiguous` that already arrived (a gap lies below them); EMPTY: none.
    above: set[int] | frozenset[int] = EMPTY
    # Highest number the peer told us it has (heartbeat) or that we saw.
    latest_seen: int = 0
    last_heard_ns: int = -1
    heard: bool = False  # counted in AgentCore's peers-heard count (see AgentCore.peers_heard)
    # A pull or snapshot in flight to this peer is not repeated before this time.
    pull_retry_at_ns: int = 0
    pull_pending: bool = False
    # Stable digest disagreement: (our digest, their digest, rounds seen in a row).
    mismatch: tuple[int, int, int] = (0, 0, 0)

    def new_incarnation(self, incarnation: int) -> None:
        self.incarnation = incarnation
        self.contiguous = 0
        self.above = EMPTY
        self.latest_seen = 0
        self.pull_pending = False
        self.mismatch = (0, 0, 0)

    def mark(self, n: int) -> None:
        """Record that update `n` of the current incarnation is held."""
        if n <= self.contiguous:
            return
        if n == self.contiguous + 1:
            self.contiguous = n
            while self.contiguous + 1 in self.above:
                self.contiguous += 1
                self.above.discard(self.contiguous)
        elif self.above:
            self.above.add(n)
        else:
            self.above = {n}
        if n > self.latest_seen:
            self.latest_seen = n

    def mark_run(self, first: int, last: int) -> None:
        """mark() every number first..last."""
        if first <= self.contiguous + 1 and not self.above:
            if last > self.contiguous:  # the common case: in order, no gap
                self.contiguous = last
            if last > self.latest_seen:
                self.latest_seen = last
            return
        for n in range(first, last + 1):
            self.mark(n)

    def advance_to(self, n: int) -> None:
        """Everything up to `n` is covered (a snapshot dominated it)."""
        if n > self.contiguous:
            self.contiguous = n
            self.above = {x for x in self.above if x > n} if self.above else EMPTY
            while self.contiguous + 1 in self.above:
                self.contiguous += 1
                self.above.discard(self.contiguous)
        if n > self.latest_seen:
            self.latest_seen = n

    def missing_range(self) -> tuple[int, int] | None:
        """The first range of numbers we know exist but do not hold."""
        if self.latest_seen <= self.contiguous:
            return None
        lo = self.contiguous + 1
        hi = (min(self.above) - 1) if self.above else self.latest_seen
        return (lo, hi)
