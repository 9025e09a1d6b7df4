"""Starting and stopping the project's processes, by pid only.

A process is started with a pipe it writes one JSON line to once it is ready (a
handshake, not a sleep). It is stopped by pid with SIGTERM, then SIGKILL after a
deadline; the recorded start time guards against a pid reused by another program.
"""

from __future__ import annotations

import json
import os
import select
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import psutil

from testbed.client import ClusterError


@dataclass
class Proc:
    name: str
    pid: int
    create_time: float
    log: str
    info: dict

    def to_json(self) -> dict:
        return {"name": self.name, "pid": self.pid, "create_time": self.create_time, "log": self.log, **self.info}

    @classmethod
    def from_json(cls, d: dict) -> Proc:
        """From a state file, checked: a pid that is not a positive int would make a kill hit a
        process group (0, -1: every process we may signal), never the process we meant."""
        if not isinstance(d, dict):
            raise ValueError(f"a process record must be an object, not {type(d).__name__}")
        d = dict(d)
        name, pid, create_time, log = d.pop("name"), d.pop("pid"), d.pop("create_time"), d.pop("log")
        if not isinstance(pid, int) or isinstance(pid, bool) or pid <= 0:
            raise ValueError(f"pid {pid!r} of {name!r} is not a positive integer")
        if not isinstance(create_time, int | float) or isinstance(create_time, bool):
            raise ValueError(f"create_time {create_time!r} of {name!r} is not a number")
        if not isinstance(name, str) or not isinstance(log, str):
            raise ValueError("a process's name and log must be strings")
        return cls(name, pid, float(create_time), log, d)


@dataclass
class Pending:
    name: str
    popen: subprocess.Popen
    read_fd: int
    log: str
    buf: bytes = b""


def spawn(name: str, module: str, args: list[str], log_path: Path, prefix: list[str] | None = None,
          pass_fds: tuple[int, ...] = ()) -> Pending:
    """Start `python -m module args...` in its own session, logging to `log_path`.
    `prefix` runs it through another program that execs it (e.g. `ip netns exec NS`), so the
    pid we record is still the Python process's. `pass_fds` are inherited besides the ready pipe."""
    r, w = os.pipe()
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "ab") as log:
        popen = subprocess.Popen(
            [*(prefix or []), sys.executable, "-m", module, *args, "--ready-fd", str(w)],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            pass_fds=(w, *pass_fds),
            start_new_session=True,  # Ctrl-C in the user's shell must not kill a detached cluster
        )
    os.close(w)
    return Pending(name, popen, r, str(log_path))


def wait_ready(pending: list[Pending], timeout_s: float) -> list[Proc]:
    """Read each process's ready line. On failure, stop them all and raise with a log excerpt."""
    by_fd = {p.read_fd: p for p in pending}
    done: dict[str, Proc] = {}
    deadline = time.monotonic() + timeout_s
    try:
        while by_fd:
            left = deadline - time.monotonic()
            if left <= 0:
                names = ", ".join(sorted(p.name for p in by_fd.values()))
                raise ClusterError(f"timed out after {timeout_s:.0f} s waiting for {names} to start; see logs")
            readable, _, _ = select.select(list(by_fd), [], [], left)
            for fd in readable:
                p = by_fd[fd]
                chunk = os.read(fd, 65536)
                if chunk:
                    p.buf += chunk
                    if not p.buf.endswith(b"\n"):
                        continue
                del by_fd[fd]
                os.close(fd)
                if not p.buf:
                    code = p.popen.wait(timeout=5)
                    raise ClusterError(f"{p.name} exited with status {code} before it was ready: "
                                       f"{last_line(p.log)} (log: {p.log})")
                info = json.loads(p.buf)
                done[p.name] = Proc(p.name, p.popen.pid, psutil.Process(p.popen.pid).create_time(), p.log, info)
    except BaseException:
        for fd in by_fd:
            os.close(fd)
        stop_pids([p.popen.pid for p in pending], timeout_s=3)
        raise
    return [done[p.name] for p in pending]


def last_line(path: str) -> str:
    try:
        lines = Path(path).read_text(errors="replace").strip().splitlines()
    except OSError:
        return "(no log)"
    return lines[-1] if lines else "(empty log)"


def alive(proc: Proc) -> bool:
    """True if `proc.pid` is still the process we started (not a reused pid, not a zombie)."""
    try:
        p = psutil.Process(proc.pid)
        return abs(p.create_time() - proc.create_time) < 0.01 and p.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def stop(procs: list[Proc], timeout_s: float = 5.0) -> list[str]:
    """SIGTERM every live process we started, SIGKILL what is left after `timeout_s`.
    Returns the names that had to be killed."""
    return stop_pids([p.pid for p in procs if alive(p)], timeout_s, names={p.pid: p.name for p in procs})


def stop_pids(pids: list[int], timeout_s: float, names: dict[int, str] | None = None) -> list[str]:
    ps = []
    for pid in pids:
        try:
            ps.append(psutil.Process(pid))
        except psutil.Error:
            continue
    for p in ps:
        try:
            p.resume()  # a paused (SIGSTOP) process would not act on SIGTERM until resumed
            p.terminate()
        except psutil.Error:
            pass
    _, still = psutil.wait_procs(ps, timeout=timeout_s)
    for p in still:
        try:
            p.kill()
        except psutil.Error:
            pass
    psutil.wait_procs(still, timeout=timeout_s)
    return [(names or {}).get(p.pid, str(p.pid)) for p in still]


def wait_gone(proc: Proc, timeout_s: float) -> None:
    """Wait until `proc` has exited (after a kill)."""
    try:
        psutil.Process(proc.pid).wait(timeout=timeout_s)
    except psutil.NoSuchProcess:
        pass
