"""On-demand CPU profiles of a running process (the `profile` API method of agents and the
controller): `dvs profile` and the bench's phase `profile` start one, run moves or wait, and read
back which Python code ran and how often.

cProfile, deterministic: it counts every call, so the call counts are exact run to run even on
a busy machine, but it slows each call by a fixed cost that dwarfs small functions (wire.decode:
~1.3 µs unprofiled, tens of µs profiled), so its times overweight call-heavy code. Read it as a
map of what runs; for what each part costs, sample with Linux perf (testbed/bench/perfdso.py).

Its clock is the main thread's CPU time (`time.thread_time_ns`), not the wall clock: on a
2-core machine shared by 33 processes a wall-clock profile charges whatever call was running
when the OS preempted the process (a `send` that woke another thread, typically) with the time
other processes ran. libzmq's I/O thread is not in it; `cpu_s` (the whole process) is.
"""

from __future__ import annotations

import cProfile
import os
import pstats
import time

TOP_DEFAULT = 25  # functions listed by `stop` unless asked otherwise


class Profiler:
    """One profile at a time per process: start, then stop (which writes the pstats file and
    returns a summary)."""

    def __init__(self) -> None:
        self._prof: cProfile.Profile | None = None
        self._t0_ns = 0
        self._cpu0_s = 0.0

    def api(self, args: dict) -> dict:
        """{"action": "start"} | {"action": "stop", "path": FILE, "top": N} | {"action": "status"}."""
        if type(args) is not dict:
            raise ValueError("arguments must be a map")
        action = args.get("action")
        if action == "start":
            return self.start()
        if action == "stop":
            top = args.get("top", TOP_DEFAULT)
            if type(top) is not int or not 1 <= top <= 500:
                raise ValueError("top must be an integer 1..500")
            path = args.get("path")
            if path is not None and type(path) is not str:
                raise ValueError("path must be a string")
            return self.stop(path, top)
        if action == "status":
            return {"running": self._prof is not None}
        raise ValueError("action must be start, stop or status")

    def start(self) -> dict:
        if self._prof is not None:
            raise ValueError("a profile is already running; stop it first")
        self._prof = cProfile.Profile(time.thread_time_ns, 1e-9)
        self._t0_ns = time.monotonic_ns()
        self._cpu0_s = time.process_time()
        self._prof.enable()
        return {"running": True}

    def stop(self, path: str | None = None, top: int = TOP_DEFAULT) -> dict:
        prof = self._prof
        if prof is None:
            raise ValueError("no profile is running; start one first")
        prof.disable()
        self._prof = None
        wall_s = (time.monotonic_ns() - self._t0_ns) / 1e9
        cpu_s = time.process_time() - self._cpu0_s
        if path:
            try:
                prof.dump_stats(path)
            except OSError as e:  # (the caller's path: say so, the process goes on)
                raise ValueError(f"cannot write the pstats file {path}: {e.strerror}") from None
        st = pstats.Stats(prof)
        return {"wall_s": wall_s, "cpu_s": cpu_s, "profiled_s": st.total_tt,  # type: ignore[attr-defined]
                "pid": os.getpid(), "path": path, "top": summarize(st, top), "areas": areas(st)}


def _name(func: tuple) -> str:
    filename, line, name = func
    if filename == "~":
        return name  # a builtin: "<method 'recv' of 'zmq...' objects>"
    parts = filename.replace("\\", "/").split("/")
    short = "/".join(parts[-2:]) if len(parts) > 1 else filename
    return f"{short}:{line}({name})"


def area(func: tuple) -> str:
    """What part of the process a function's own time belongs to: our modules by file
    (agent/wire.py), libraries by package (zmq, asyncio, msgpack), builtins by name."""
    filename, _line, name = func
    if filename == "~":
        # "<method 'send' of 'zmq.backend.cython._zmq.Socket' objects>", "<built-in method posix.fsync>"
        if "zmq" in name:
            return "zmq (C calls: send, recv, ...)"
        if name.startswith("<built-in method "):
            return name[len("<built-in method "):].rstrip(">").split(" ")[0]
        return name
    parts = filename.replace("\\", "/").split("/")
    for i, part in enumerate(parts):
        if part in ("agent", "controller", "dvswitch", "testbed") and i + 1 < len(parts):
            return "/".join(parts[i:])
        if part in ("site-packages", "dist-packages") and i + 1 < len(parts):
            return parts[i + 1].split(".")[0]
    if len(parts) >= 2 and parts[-2].startswith("python3"):
        return "stdlib " + parts[-1]
    if len(parts) >= 3 and parts[-3].startswith("python3"):
        return "stdlib " + parts[-2]
    return "/".join(parts[-2:])


def areas(st: pstats.Stats) -> list[dict]:
    """Own time summed per area (see `area`), largest first."""
    out: dict[str, list] = {}
    for func, (_cc, ncalls, tottime, _cum, _callers) in st.stats.items():  # type: ignore[attr-defined]
        row = out.setdefault(area(func), [0, 0.0])
        row[0] += ncalls
        row[1] += tottime
    rows = [{"area": k, "calls": v[0], "own_s": v[1]} for k, v in out.items()]
    rows.sort(key=lambda r: r["own_s"], reverse=True)
    return rows


def summarize(st: pstats.Stats, top: int) -> list[dict]:
    """The `top` functions by own time: calls, own and cumulative seconds."""
    rows = []
    for func, (_cc, ncalls, tottime, cumtime, _callers) in st.stats.items():  # type: ignore[attr-defined]
        rows.append({"function": _name(func), "calls": ncalls, "own_s": tottime, "cum_s": cumtime})
    rows.sort(key=lambda r: r["own_s"], reverse=True)
    return rows[:top]
