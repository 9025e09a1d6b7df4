"""Report pacing: whether agents should send their apply reports at once or batch them.

The controller knows a move converged only once every live agent's apply report is in.
With one op at a time (`dvs vm move`, a bench's moves one after another) whoever started it
waits for that knowledge, and so does the next op: every agent reports each apply at once.
With several ops in flight (open-loop load, an evacuation, a cold start) nobody waits on one
op, while a report per agent per move costs each agent a send (its libzmq I/O thread wakes)
and the controller a frame to read. Then the controller asks the agents to batch: at most one
report per `report_batch_ms`, riding on their other wake-ups (agent/applyreport.py). It learns
of convergence up to ~2x that later; the apply stamps inside, and so every convergence
latency, stay exact.

The signal is the number of ops in flight, sampled every tick and smoothed: moves one after
another never have more than one, open-loop moves at 300/s at 32 hosts have 2-5. Batching
starts above BATCH_ABOVE and stops below UNBATCH_BELOW (hysteresis: each change is a notice to
every agent). A batching notice holds for LEASE_MS: the controller renews it every RENEW_MS
while it wants batching, so an agent never keeps batching for a controller that crashed, lost
the notice that ended it, or restarted without it. Measured at 32 hosts, 300 moves/s, in
alternating pairs with and without it: convergence p99 49-123 -> 24-40 ms, agents ~1.55 -> ~1.45
cores (docs/benchmarks.md).

Pure: no I/O, no clock, no randomness (tests/test_core_purity.py).
"""

from __future__ import annotations

from agent import wire
from agent.wire import MsgType

# Smoothed ops in flight above which agents batch their reports, and below which they stop.
BATCH_ABOVE = 1.8
UNBATCH_BELOW = 1.2
# Weight of each tick's sample in the smoothed figure (0.3: ~3 ticks, ~150 ms at the default tick).
SMOOTHING = 0.3
# How long an agent keeps batching after a notice, and how often the controller renews it, in ms.
LEASE_MS = 3_000
RENEW_MS = 1_000
NS_PER_MS = 1_000_000


class ReportPacing:
    __slots__ = ("batch_ms", "batching", "load", "notices", "_told_ns")

    def __init__(self, batch_ms: int) -> None:
        self.batch_ms = batch_ms  # 0: never ask agents to batch
        self.batching = False
        self.load = 0.0  # ops in flight, smoothed over the last ticks
        self.notices = 0  # pacing notices sent (each to one agent)
        self._told_ns = 0  # when every agent was last told

    def tick(self, ops_in_flight: int, now_ns: int) -> bool:
        """One tick's sample; True if every agent must be told the pacing now (notice()): it
        changed, or batching goes on and its lease needs renewing."""
        self.load += SMOOTHING * (ops_in_flight - self.load)
        if not self.batch_ms:
            return False
        if self.batching != (self.load > (UNBATCH_BELOW if self.batching else BATCH_ABOVE)):
            self.batching = not self.batching
        elif not self.batching or now_ns - self._told_ns < RENEW_MS * NS_PER_MS:
            return False
        self._told_ns = now_ns
        return True

    def interval_ms(self) -> int:
        """The report interval agents should keep now (0: report at once)."""
        return self.batch_ms if self.batching else 0

    def notice(self) -> bytes:
        """The notice that tells an agent the current pacing (a REQUEST with no reply)."""
        return wire.encode(MsgType.REQUEST, [0, "reports", {"batch_ms": self.interval_ms(), "for_ms": LEASE_MS}])
