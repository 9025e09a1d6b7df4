"""Chaos runs: scenarios as data (TOML), a runner that drives a real cluster through a fault
schedule while it moves VMs, and a checker that judges the recorded history afterwards.

- `scenario.py`  load and validate a scenario file; `build_plan(scenario, seed)` is the
                 deterministic schedule (same seed, same faults, same workload choices);
- `runner.py`    run a plan against real processes, writing `history.jsonl` as it goes;
- `checker.py`   re-read a history and decide: valid, invalid (which invariant) or unknown;
- `timeline.py`  the Jepsen-style picture of a run (moves, latency, fault intervals);
- `command.py`   `dvs chaos` (the click command `chaos`).

See docs/scenarios.md for the file format and the invariants.
"""
