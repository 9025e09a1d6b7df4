"""`dvs bench`: convergence benchmark of real local clusters against the raw ZeroMQ floor.

- `floor.py`    the floor: one PUB process fans small msgpack messages out to N-1 subscriber
                processes with a blocking receive loop (also runnable on its own);
- `runner.py`   the measured phases: floor, sequential moves per N, open-loop load curve,
                mass events (cold start, HA after SIGKILL);
- `report.py`   rich tables, matplotlib plots, bench.json and docs/benchmarks.md;
- `command.py`  the click command `bench` (registered as `dvs bench`; `python -m testbed.bench`
                runs it too).
"""
