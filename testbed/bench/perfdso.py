"""Linux `perf` as the judge of where a process's CPU goes: sampled, all threads, kernel included
(as root, or with kernel.perf_event_paranoid <= 1), by thread and shared object.

cProfile (the bench's other profile) counts every Python call but slows each one by tens of
times, so its shares overweight small Python functions; perf samples the real process at a few
kHz and costs it little, but sees no Python function names (Python 3.11 has no perf map), only
which library the time was in: libpython (the interpreter running our code), the kernel
(syscalls, wake-ups, TCP/UDP), libzmq, libsodium (CURVE), uvloop, msgpack.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
from pathlib import Path

SAMPLE_HZ = 2999  # (odd, so sampling does not beat with the 1 kHz timers)
STOP_TIMEOUT_S = 20.0


def unavailable_reason() -> str | None:
    if shutil.which("perf") is None:
        return "no `perf` here (Debian: apt-get install linux-perf)"
    return None


def kernel_visible() -> bool:
    """Whether samples can include the kernel: root, or perf_event_paranoid <= 1."""
    if os.geteuid() == 0:
        return True
    try:
        return int(Path("/proc/sys/kernel/perf_event_paranoid").read_text()) <= 1
    except (OSError, ValueError):
        return False


class Recording:
    """`perf record` of one process from start() until stop(), into `path`."""

    def __init__(self, pid: int, path: Path, log_path: Path) -> None:
        self.pid = pid
        self.path = path
        self.log_path = log_path
        self.proc: subprocess.Popen | None = None

    def start(self, track=None) -> None:
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                ["perf", "record", "-F", str(SAMPLE_HZ), "-p", str(self.pid), "-o", str(self.path),
                 *([] if kernel_visible() else ["-e", "cpu-clock:u"])],
                stdout=log, stderr=log, stdin=subprocess.DEVNULL, start_new_session=True)
        if track is not None:
            track(self.proc.pid)

    def stop(self) -> bool:
        """SIGINT (perf writes its file and exits), SIGKILL after a deadline; True if it wrote."""
        p = self.proc
        if p is None:
            return False
        if p.poll() is None:
            p.send_signal(signal.SIGINT)
            try:
                p.wait(STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        return self.path.exists() and self.path.stat().st_size > 0


def shares(path: Path) -> list[dict]:
    """Samples by (thread, shared object), largest first: [{thread, dso, share}], share in 0..1."""
    proc = subprocess.run(["perf", "report", "-i", str(path), "--no-children", "--sort", "comm,dso", "-g", "none",
                           "--stdio", "-q"], capture_output=True, text=True, timeout=120)
    out = []
    for line in proc.stdout.splitlines():
        parts = line.split()
        if len(parts) < 3 or not parts[0].endswith("%"):
            continue
        try:
            share = float(parts[0].rstrip("%")) / 100
        except ValueError:
            continue
        out.append({"thread": parts[1], "dso": " ".join(parts[2:]), "share": share})
    out.sort(key=lambda r: r["share"], reverse=True)
    return out


def label(dso: str) -> str:
    """A short name for a shared object: libpython3.11.so.1.0 -> python interpreter, ..."""
    d = dso.strip("[]")
    if d.startswith("python"):  # (an interpreter built without a shared libpython: Debian's python3.11)
        return "python interpreter"
    for prefix, name in (("libpython", "python interpreter"), ("kernel", "kernel"), ("libzmq", "libzmq"),
                         ("libsodium", "libsodium (CURVE)"), ("loop.cpython", "uvloop"), ("libc.so", "libc"),
                         ("_cmsgpack", "msgpack"), ("_zmq.cpython", "pyzmq"), ("vdso", "vdso (clock)")):
        if d.startswith(prefix):
            return name
    return d
