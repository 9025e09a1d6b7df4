"""A gossip message's rows prepared once for merging and apply reports, and the agent core's counters.

Pure: no I/O, no clock, no randomness (tests/test_core_purity.py).
"""

from __future__ import annotations

from agent.mactable import prepare_rows

# Updates (or apply-report rows, or table-report entries) per frame at most, so a frame stays
# far below its socket's limit.
BATCH_MAX = 2_000


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
