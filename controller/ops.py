"""A VM operation's lifecycle as a state machine: its phases, the one transition table, and
how it ended.

An op (create, move, delete, or an HA restart) sends one command per step and waits for the
target's ack of that step; the ack's detail says which step it acknowledges, so a duplicated
"prepared" can never pass for "switched". Every legal step is one row of `TRANSITIONS`:
`(kind, phase, ack detail) -> next phase`. An ack no row names is a duplicate or a step we
are past. Plain data, no I/O.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum, StrEnum


class Phase(StrEnum):
    """Where an op is. (A StrEnum: drivers and records compare and print it as its name.)"""

    START = "start"  # built, first command not sent yet
    ATTACH = "attach"  # create/restart: the target makes the port and claims the MAC
    PREPARE = "prepare"  # move: the destination makes the port, not claiming yet
    SWITCHOVER = "switchover"  # move: the destination claims the MAC (seq + 1)
    TOMBSTONE = "tombstone"  # delete: the host removes the port and claims a tombstone
    CONVERGING = "converging"  # the target owns the MAC: waiting for every live agent's apply
    DONE = "done"  # finished, whatever the outcome


class Outcome(Enum):
    """How an op ended: decided where it ends, never read back from its error text."""

    PENDING = "pending"  # not ended yet
    CONVERGED = "converged"  # every live host applied the target
    REFUSED = "refused"  # the target refused the step (its ack said no)
    TARGET_DIED = "target_died"  # the target was declared dead before it took the VM over
    TARGET_RESTARTED = "target_restarted"  # the target's agent restarted while taking it over
    TIMED_OUT = "timed_out"  # op_timeout_ms passed first


# The first step of each kind.
FIRST_PHASE: dict[str, Phase] = {
    "create": Phase.ATTACH,
    "restart": Phase.ATTACH,
    "move": Phase.PREPARE,
    "delete": Phase.TOMBSTONE,
}

# (kind, phase, ack detail) -> the next phase. The one place an op moves forward.
TRANSITIONS: dict[tuple[str, Phase, str], Phase] = {
    ("create", Phase.ATTACH, "attached"): Phase.CONVERGING,
    ("restart", Phase.ATTACH, "attached"): Phase.CONVERGING,
    ("move", Phase.PREPARE, "prepared"): Phase.SWITCHOVER,
    ("move", Phase.SWITCHOVER, "switched"): Phase.CONVERGING,
    ("delete", Phase.TOMBSTONE, "detached"): Phase.CONVERGING,
    # The port was gone already: the tombstone is claimed all the same.
    ("delete", Phase.TOMBSTONE, "no such port"): Phase.CONVERGING,
}

# Phases in which the target may already have claimed the MAC with the op's seq: an op
# aborted there needs a fresh, higher claim so exactly one owner is left.
CLAIM_MAY_BE_OUT: frozenset[tuple[str, Phase]] = frozenset({
    ("move", Phase.SWITCHOVER),
    ("restart", Phase.ATTACH),
})


def next_phase(kind: str, phase: Phase, detail: str) -> Phase | None:
    """The phase an ack with `detail` moves an op of `kind` in `phase` to; None: not a step
    of this op now (a duplicate, a late ack, or a refusal)."""
    return TRANSITIONS.get((kind, phase, detail))


def is_commanding(phase: Phase) -> bool:
    """The target does not own the MAC yet: a refusal or the target's death ends the op."""
    return phase not in (Phase.CONVERGING, Phase.DONE)


@dataclass
class Op:
    op_id: int
    kind: str  # create | move | delete | restart (HA: VM of a dead host started elsewhere)
    vm: str
    src: str
    dst: str
    target: tuple[str, int, bool]  # (host, seq, tombstone) every agent must reach
    key: tuple[int, int]
    started_ns: int
    deadline_ns: int
    phase: Phase = Phase.START
    outcome: Outcome = Outcome.PENDING
    switch_ns: int = 0
    switched: bool = False  # the target host acked the step that claims the MAC
    # The command of the current step, sent again until its ack arrives (commands are idempotent).
    command: tuple[str, bytes] | None = None
    command_sent_ns: int = 0
    command_retry_ns: int = 0  # doubles after every resend: a busy agent is not flooded
    # host -> when it applied the target (its CLOCK_MONOTONIC ns); kept by the apply tracker,
    # which may share one dict between ops claimed together (see controller/applytrack.py)
    applied: dict[str, int] = field(default_factory=dict)
    waiters: list = field(default_factory=list)  # Batch objects waiting on this op
    converged: bool = False
    error: str = ""
    latency_ms: float | None = None
    missing: list[str] = field(default_factory=list)
    done_ns: int = 0  # when the controller finished it (its clock): the client's wait ends here
    src_lost: bool = False  # the source's agent restarted meanwhile: the VM no longer runs there
    converging_ns: int = 0  # when it started converging (our clock)
    next_hint_ns: int = 0  # converging: when to tell laggards where to pull from (0: never)
    hint_every_ns: int = 0
    # (host, incarnation, n) of the updates that settle this op, once their origins reported
    # their numbers: the target's claim (or a later claim of the same MAC)
    updates: list[tuple[str, int, int]] = field(default_factory=list)
    claim: tuple[int, int] | None = None  # (incarnation, n) of the target's claim itself
    # The apply tracker's group of ops claimed together with this one (None: marked alone).
    group: object | None = None

    def end(self, outcome: Outcome, error: str) -> None:
        """Record why it ends now (the caller finishes it at once)."""
        self.outcome = outcome
        self.error = error

    def record(self, per_host: bool = True) -> dict:
        return {
            "op": self.op_id,
            "kind": self.kind,
            "vm": self.vm,
            "src": self.src,
            "dst": self.dst,
            "seq": self.target[1],
            "converged": self.converged,
            "latency_ms": self.latency_ms,
            "error": self.error,
            "missing": self.missing,
            "switch_ns": self.switch_ns,
            "started_ns": self.started_ns,
            "done_ns": self.done_ns,
            # Per host, ms from switchover until that agent applied it: who lagged.
            "applied_ms": {h: round((t - self.switch_ns) / 1_000_000, 3) for h, t in self.applied.items()}
            if self.switched and per_host else {},
        }
