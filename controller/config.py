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
    # 0 keeps none (the simulator: it watches every merge itself).
    applied_log_max: int = 500_000
    # An agent whose status shows an older membership (PEERS epoch) than ours gets it again,
    # at most this often, in ms. Default 2,000: it repairs a PEERS lost on a faulty control link.
    peers_refresh_ms: int = 2_000
    # Membership changes within this long share one PEERS broadcast, in ms. Default 20. The
    # first change after a quiet spell goes out at once. Without it, N agents registering
    # one by one cost N broadcasts of N members to N agents: N^3 work at startup.
    peers_batch_ms: int = 20
    # A converging op still missing agents' apply reports this long after the switchover
    # makes the controller send those agents the entry they lack (for a delete: the origin to
    # pull its tombstone from), in ms. Default 100; the hint is repeated with the wait growing
    # by half each time, up to 1,600 ms. PUB/SUB loss is otherwise
    # repaired only by the origin's next heartbeat, whose interval grows with N (seconds at
    # 64 hosts, minutes at 1,000). 0 turns hints off.
    repair_hint_after_ms: int = 100
    # With more than one op in flight (smoothed over a few ticks), agents are asked to send
    # their apply reports at most once per this long, riding on their other wake-ups, in ms.
    # Default 10; 0: never ask (every agent reports each apply at once). Moves one after
    # another never batch: someone waits on each one. See controller/reportpace.py.
    report_batch_ms: int = 10
    # Finished moves and restarts kept for `dvs moves`, in records. Default 100,000.
    history_max: int = 100_000
    # A VM create, move or delete that has not converged by then is reported as not
    # converged, in ms. Default 10,000.
    op_timeout_ms: int = 10_000
    # HA restarts of one VM allowed within restart_budget_window_ms, in restarts. Default 10.
    # Past it the VM is parked: one log line and a counter (`restart_budget_exhausted`), no
    # restart until the oldest one leaves the window, and what agents report of it is adopted
    # meanwhile. A VM that keeps failing must not be restarted over and over. 0: no budget.
    restart_budget: int = 10
    # ...the window of that budget, in ms. Default 60,000.
    restart_budget_window_ms: int = 60_000
    # VMs waiting for a restart whose own host is down wait until no host has registered for
    # this long, in ms, before they are placed elsewhere. Default 2,000: after a full outage
    # agents come back one by one, and a VM whose host returns goes home; the rest spread
    # over every host that came back instead of piling onto the first one. (They wait 5 such
    # windows at most, so hosts that keep registering cannot starve them.)
    placement_settle_ms: int = 2_000
