"""Controller settings. Every field says its unit and default."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ControllerConfig:
    # How often the controller checks deadlines and host liveness, in ms. Default 50.
    tick_interval_ms: int = 50
    # A host silent (no status, ack or report) for this long is suspect, in ms. Default 1500
    # (three missed agent heartbeats at the agent's default 500 ms).
    suspect_after_ms: int = 1500
    # A host silent for this long is dead: it leaves the membership and moves stop waiting
    # for it, in ms. Default 3000.
    dead_after_ms: int = 3000
    # A command to an agent (attach, prepare, switchover, delete) not acked within this long is
    # sent again, in ms. Default 200. Commands are idempotent, so a duplicate does no harm.
    command_retry_ms: int = 200
    # ...and the wait doubles after each resend up to this, in ms. Default 3,200.
    command_retry_max_ms: int = 3_200
    # Apply reports kept for checkers (`applied_log` API), in entries. Default 500,000.
    applied_log_max: int = 500_000
    # The membership (PEERS) is resent to every agent this often even when unchanged, in ms.
    # Default 2,000: it repairs a PEERS lost on a faulty control connection.
    peers_refresh_ms: int = 2_000
    # Finished moves and restarts kept for `dvs moves`, in records. Default 100,000.
    history_max: int = 100_000
    # A VM create, move or delete that has not converged by then is reported as not
    # converged, in ms. Default 10,000.
    op_timeout_ms: int = 10_000
