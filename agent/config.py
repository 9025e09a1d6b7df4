"""Agent settings. Every field says its unit and default; the defaults hold up to 64 hosts on 2 cores."""

from __future__ import annotations

from dataclasses import dataclass, fields


@dataclass(frozen=True)
class AgentConfig:
    # How often an agent publishes a heartbeat (latest update number + table digest) and
    # reports its status to the controller, in ms. Default 500. Every peer receives N-1
    # heartbeats per interval, so this sets the background CPU cost: 64 hosts at 500 ms
    # is ~8,000 heartbeats/s machine-wide.
    heartbeat_interval_ms: int = 500
    # Gossip heartbeats, all agents together, per second at most, in messages/s. Default 2,000.
    # Every agent hears N-1 heartbeats per interval and each costs ~0.3 ms of CPU here, so
    # the gossip interval grows to max(heartbeat_interval_ms, 1000 * N * (N-1) / budget):
    # 500 ms up to 32 hosts, ~2 s at 64. Status reports to the controller keep the base interval.
    heartbeat_budget_per_s: int = 2_000
    # A peer silent for this long is suspect (no longer counted as heard), in ms. Default 1500;
    # never less than three gossip intervals.
    suspect_after_ms: int = 1500
    # A pull or snapshot request unanswered for this long is sent again, in ms. Default 300.
    pull_timeout_ms: int = 300
    # Heartbeats in a row showing the same two differing table digests before we ask that
    # peer for a full snapshot, in rounds. Default 3 (so ~1.5 s of stable disagreement).
    digest_mismatch_rounds: int = 3
    # Own updates kept for peers that pull a missing range, in updates. Default 100,000;
    # an older range is answered with a full snapshot instead.
    log_max_updates: int = 100_000
    # Updates in one pull reply at most, in updates. Default 5,000; the puller asks again.
    pull_batch_max: int = 5_000
    # A port prepared for an incoming VM but never switched over (the controller died mid-move)
    # is released after this long, in ms. Default 30,000.
    prepare_timeout_ms: int = 30_000
    # Flap guard: more than `flap_moves` moves of one MAC within `flap_window_ms` is reported.
    # Defaults 5 moves in 180,000 ms (FRR / Junos / Cumulus).
    flap_moves: int = 5
    flap_window_ms: int = 180_000
    # Apply reports to the controller, all agents together, per second at most, in reports/s.
    # Default 20,000; 0: no limit. One agent's reports are at least 1000 * N / budget ms apart (N hosts): 0.4 ms
    # at 8 hosts, 1.6 ms at 32, 3.2 ms at 64, 50 ms at 1,000. A report goes in the wake-up that
    # applied what it reports unless the last one went less than that ago; then at that
    # interval's end (a timer, or riding on any wake-up after it), with everything applied
    # meanwhile. So at one move at a time every agent reports each move at once (the controller
    # knows a move converged ~0.1 ms after its last apply); under load a busy agent's reports of
    # several moves share a frame, as do its wake-ups' updates; and the controller, which reads
    # every report (~30-40 µs each here), is never asked for more than the budget. The apply
    # stamps inside are exact either way: convergence figures do not depend on it. (It was one
    # report per 20 ms, each waiting 5 ms after its first apply to ride on a later wake-up, which
    # capped moves one after another at ~36/s at 32 hosts: `docs/benchmarks.md`.)
    applied_report_budget_per_s: int = 20_000
    # ...and never closer than this, in ms. Default 0.
    applied_report_interval_ms: int = 0
    # A report waits at least this long after its first apply, in ms (at most the interval).
    # Default 0: reports go at once. A delay lets reports of a move leave after its update fanned
    # out (they then compete less with it for the CPU) at the price of a timer wake-up per report.
    applied_report_delay_ms: int = 0
    # Keep no per-MAC time of this agent's last apply (the `lookup` API, by which headless
    # moves are timed, then answers applied_ns 0). Default False. The simulator sets it: it
    # stamps every apply itself, and at 1,000 hosts these are millions of dict entries.
    no_apply_times: bool = False
    # Test-only defects, for proving the checker catches bugs. Never set in production.
    defect_no_repair: bool = False
    defect_reverse_merge: bool = False

    @classmethod
    def field_names(cls) -> list[str]:
        return [f.name for f in fields(cls)]
