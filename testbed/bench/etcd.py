"""The etcd baseline: what a user would pick instead of gossip, a watched key-value store
(Calico and Flannel keep their routes in etcd), measured on the same machine in the same run.

The bench starts one etcd server (Debian's `etcd-server`) on a tmpfs data dir, and N watcher
processes, one per host, each holding one gRPC watch on the bench's key prefix. The watchers are
etcd's own Go client where it is installed (`etcdctl watch --prefix -w json`, Debian's
`etcd-client`): a Go watcher costs a fraction of the CPU of a Python one, so at 32 and 64 hosts
etcd is not slowed by its own clients starving for the machine's two cores (the aetcd watchers
managed 123 of 200 puts/s at 32 hosts). Each etcdctl writes its events to a pipe; one stamper
process reads all pipes with epoll and stamps every line as it reads it (`time.monotonic_ns()`,
before any decoding, which waits until the end), so an etcd figure includes one pipe hop, as a
dvswitch figure includes the agent's own wake-up. Without etcdctl the watchers are Python
processes with the aetcd client (maintained, asyncio over grpcio). The bench process plays
the controller: it puts a value of the floor's frame size per message, paced at the floor's
rate, and every watcher stamps `time.monotonic_ns()` as soon as the event reaches its code. As
with the floor, all processes share CLOCK_MONOTONIC, so "time until every watcher has been
notified of put i" is `max(stamp_i over watchers) - stamp before put i was sent`; that includes
etcd's raft commit (one member, tmpfs) and the fan-out of the event.

Why N watchers where the floor has N-1 subscribers: in the floor (and in a dvswitch move) the
publisher is one of the N hosts and knows the update already; with etcd the writer is the
controller and every host learns the change from etcd, as a Calico node does.

Watcher (started by the bench through testbed.procs, with a ready-fd handshake):

    python -m testbed.bench.etcd --watch 127.0.0.1:P --prefix /dvs-bench/ --report tcp://127.0.0.1:Q --id 3

Stamper for etcdctl watchers (reads the pipes it inherited as fds 7, 8, ...):

    python -m testbed.bench.etcd --stamp 7,8,9 --pids 101,102,103 --report tcp://127.0.0.1:Q

On its own (starts etcd and the watchers, prints the result as JSON):

    python -m testbed.bench.etcd --hosts 8 --msgs 1000 --rate 200
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import importlib.util
import json
import os
import selectors
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import msgpack
import zmq

from dvswitch.errors import error_line
from testbed.bench.floor import DATA, END, PROBE, sample_body

PREFIX = b"/dvs-bench/"
PROBE_INTERVAL_S = 0.05
# How long etcd may take to answer after start, watchers to connect, and to report at the end, in s.
START_TIMEOUT_S = 30.0
CONNECT_TIMEOUT_S = 60.0
REPORT_TIMEOUT_S = 30.0
# Where etcd keeps its data: tmpfs, so the figure is etcd's protocol cost, not this disk's fsync.
TMPFS = Path("/dev/shm")


def skip_reason() -> str | None:
    """Why the etcd phase cannot run here (one line), or None if it can."""
    if shutil.which("etcd") is None:
        return "etcd not installed (Debian: apt-get install etcd-server); etcd baseline skipped"
    if importlib.util.find_spec("aetcd") is None:
        return "the aetcd client is not installed (pip install -e '.[etcd]'); etcd baseline skipped"
    return None


# Which watchers a run uses: "etcdctl" (Go, where installed) or "aetcd" (Python).
CLIENTS = ("etcdctl", "aetcd")


def default_client() -> str:
    return "etcdctl" if shutil.which("etcdctl") else "aetcd"


def etcd_version() -> str | None:
    try:
        out = subprocess.run(["etcd", "--version"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    first = out.splitlines()[0] if out else ""
    return first.split(":", 1)[1].strip() if ":" in first else None


def free_port() -> int:
    # A small race (another program may take it before etcd binds); etcd then exits at once and
    # the start fails with its log line, which says so.
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def etcd_server(log_dir: Path, *, track: Callable[[int], None] | None = None) -> Iterator[tuple[int, Path]]:
    """One etcd member on 127.0.0.1, data on tmpfs; yields (client port, data dir). Stopped by
    pid (SIGTERM, SIGKILL after a deadline) and its data dir removed, whatever happens."""
    from testbed import procs
    from testbed.client import ClusterError

    base = TMPFS if TMPFS.is_dir() and os.access(TMPFS, os.W_OK) else None
    data = Path(tempfile.mkdtemp(prefix="dvs-etcd-", dir=base))
    client_port, peer_port = free_port(), free_port()
    log_path = log_dir / "etcd.log"
    log_dir.mkdir(parents=True, exist_ok=True)
    peer = f"http://127.0.0.1:{peer_port}"
    client = f"http://127.0.0.1:{client_port}"
    popen = None
    try:
        with open(log_path, "ab") as log:
            popen = subprocess.Popen(
                ["etcd", "--name", "bench", "--data-dir", str(data / "member"),
                 "--listen-client-urls", client, "--advertise-client-urls", client,
                 "--listen-peer-urls", peer, "--initial-advertise-peer-urls", peer,
                 "--initial-cluster", f"bench={peer}", "--initial-cluster-state", "new",
                 "--logger", "zap", "--log-level", "warn"],
                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        if track is not None:
            track(popen.pid)
        deadline = time.monotonic() + START_TIMEOUT_S
        while not asyncio.run(_answers(client_port)):
            if popen.poll() is not None:
                raise ClusterError(f"etcd exited with status {popen.returncode} at start: "
                                   f"{procs.last_line(str(log_path))} (log: {log_path})")
            if time.monotonic() > deadline:
                raise ClusterError(f"etcd did not answer within {START_TIMEOUT_S:.0f} s (log: {log_path})")
            time.sleep(0.1)
        yield client_port, data
    finally:
        if popen is not None:
            procs.stop_pids([popen.pid], timeout_s=5)
            with contextlib.suppress(subprocess.TimeoutExpired):
                popen.wait(timeout=5)  # reap it: no zombie left behind
        shutil.rmtree(data, ignore_errors=True)


async def _answers(port: int) -> bool:
    import aetcd

    try:
        async with aetcd.Client(host="127.0.0.1", port=port, timeout=1, connect_wait_timeout=1) as c:
            await c.status()
        return True
    except Exception:  # noqa: BLE001 - not up yet, whatever the client raises
        return False


# ---------------------------------------------------------------------- watcher process


async def watch(port: int, prefix: bytes, report_ep: str, ident: int, ready_fd: int | None) -> int:
    import aetcd

    ctx = zmq.Context()
    push = ctx.socket(zmq.PUSH)
    push.setsockopt(zmq.LINGER, 5_000)
    push.connect(report_ep)
    numbers: list[int] = []
    stamps: list[int] = []
    cpu0 = None
    unpackb = msgpack.unpackb
    async with aetcd.Client(host="127.0.0.1", port=port) as client:
        events = await client.watch_prefix(prefix)
        if ready_fd is not None:
            try:
                os.write(ready_fd, (json.dumps({"id": ident, "pid": os.getpid()}) + "\n").encode())
            finally:
                os.close(ready_fd)
        async for ev in events:
            t = time.monotonic_ns()
            kind, n, _body = unpackb(ev.kv.value)
            if kind == DATA:
                if cpu0 is None:
                    cpu0 = time.process_time()
                numbers.append(n)
                stamps.append(t)
            elif kind == PROBE:
                push.send(msgpack.packb([PROBE, ident, n]))
            elif kind == END:
                cpu_s = time.process_time() - cpu0 if cpu0 is not None else 0.0
                push.send(msgpack.packb([END, ident, numbers, stamps, cpu_s]))
                break
        await events.cancel()
    push.close(linger=5_000)
    ctx.term()
    return 0


# ---------------------------------------------------------------------- stamper for etcdctl watchers

# The end key as etcdctl's JSON shows it (keys are base64): found in a raw line without decoding it.
END_KEY_B64 = base64.b64encode(PREFIX + b"end")


def _cpu_s(pid: int) -> float:
    """A process's CPU time in s: from /proc/PID/schedstat (ns, the scheduler's own count) where the
    kernel has it, since the tick-based user+system time moves in 10 ms steps, coarser than a
    short run's whole cost."""
    import psutil

    try:
        with open(f"/proc/{pid}/schedstat") as f:
            return int(f.read().split()[0]) / 1e9
    except (OSError, ValueError, IndexError):
        pass
    try:
        t = psutil.Process(pid).cpu_times()
    except psutil.Error:
        return 0.0
    return t.user + t.system


def stamp(fds: list[int], pids: list[int], report_ep: str, ready_fd: int | None) -> int:
    """Read every etcdctl watcher's pipe, stamp each line on arrival, decode after the end key."""
    ctx = zmq.Context()
    push = ctx.socket(zmq.PUSH)
    push.setsockopt(zmq.LINGER, 5_000)
    push.connect(report_ep)
    sel = selectors.DefaultSelector()
    for ident, fd in enumerate(fds, 1):
        os.set_blocking(fd, False)
        sel.register(fd, selectors.EVENT_READ, ident)
    partial = {ident: b"" for ident in range(1, len(fds) + 1)}
    lines: dict[int, list[tuple[int, bytes]]] = {ident: [] for ident in partial}
    cpu0: dict[int, float] = {}
    open_fds = set(fds)
    if ready_fd is not None:
        try:
            os.write(ready_fd, (json.dumps({"pid": os.getpid()}) + "\n").encode())
        finally:
            os.close(ready_fd)
    while open_fds:
        ready = sel.select(timeout=REPORT_TIMEOUT_S + CONNECT_TIMEOUT_S)
        if not ready:
            break  # a watcher went silent: report what arrived, the bench counts the rest as lost
        for key, _ in ready:
            ident = key.data
            chunk = os.read(key.fd, 1 << 16)
            t = time.monotonic_ns()
            if chunk:
                *complete, partial[ident] = (partial[ident] + chunk).split(b"\n")
            else:
                complete = []
            got = lines[ident]
            for line in complete:
                got.append((t, line))
            if complete and ident not in cpu0:
                # Its first line is a probe: the watch is live. Its CPU from here on is the watch's.
                cpu0[ident] = _cpu_s(pids[ident - 1])
                push.send(msgpack.packb([PROBE, ident, None]))
            if not chunk or any(END_KEY_B64 in line for line in complete):
                sel.unregister(key.fd)
                open_fds.discard(key.fd)
    for ident, got in lines.items():
        numbers: list[int] = []
        stamps: list[int] = []
        for t, line in got:
            if not line.strip():
                continue
            for ev in json.loads(line).get("Events") or ():
                kind, n, _body = msgpack.unpackb(base64.b64decode(ev["kv"].get("value", "")))
                if kind == DATA:
                    numbers.append(n)
                    stamps.append(t)
        cpu_s = _cpu_s(pids[ident - 1]) - cpu0.get(ident, 0.0)
        push.send(msgpack.packb([END, ident, numbers, stamps, cpu_s]))
    push.close(linger=5_000)
    ctx.term()
    return 0


def _start_etcdctl_watchers(port: int, hosts: int, log_dir: Path, pull_ep: str, started: list[int],
                            track: Callable[[int], None] | None) -> list:
    """N `etcdctl watch` processes writing to pipes, and the stamper reading them (tracked by pid)."""
    from testbed import procs

    env = {**os.environ, "ETCDCTL_API": "3"}
    reads: list[int] = []
    try:
        for i in range(1, hosts + 1):
            r, w = os.pipe()
            reads.append(r)
            with open(log_dir / f"etcd-watch{i}.log", "ab") as log:
                popen = subprocess.Popen(
                    ["etcdctl", f"--endpoints=127.0.0.1:{port}", "watch", "--prefix", PREFIX.decode(), "-w", "json"],
                    stdin=subprocess.DEVNULL, stdout=w, stderr=log, env=env, start_new_session=True)
            os.close(w)
            started.append(popen.pid)
            if track is not None:
                track(popen.pid)
        p = procs.spawn("etcd-stamp", "testbed.bench.etcd",
                        ["--stamp", ",".join(map(str, reads)), "--pids", ",".join(map(str, started)),
                         "--report", pull_ep], log_dir / "etcd-stamp.log", pass_fds=tuple(reads))
    finally:
        for r in reads:
            os.close(r)  # the stamper holds its own copies
    started.append(p.popen.pid)
    if track is not None:
        track(p.popen.pid)
    return [p]


# ---------------------------------------------------------------------- the bench side


def run_etcd(hosts: int, msgs: int, rate: float, log_dir: Path, *, track: Callable[[int], None] | None = None,
             advance: Callable[[int], None] | None = None, client: str | None = None) -> dict:
    """Put `msgs` values at `rate`/s into a fresh etcd watched by `hosts` watcher processes; return
    the figures. `track(pid)` is called for every process started (all are stopped before returning).
    `client` picks the watchers (CLIENTS; default: etcdctl where installed)."""
    from testbed import procs
    from testbed.client import ClusterError

    if hosts < 1:
        raise ClusterError("the etcd baseline needs at least 1 host")
    with etcd_server(log_dir, track=track) as (port, data):
        ctx = zmq.Context.instance()
        pull = ctx.socket(zmq.PULL)
        pull.setsockopt(zmq.LINGER, 0)
        pull.bind("tcp://127.0.0.1:*")
        pull_ep = pull.getsockopt_string(zmq.LAST_ENDPOINT)
        pending = []
        started: list[int] = []
        client = client or default_client()
        try:
            if client == "etcdctl":
                pending = _start_etcdctl_watchers(port, hosts, log_dir, pull_ep, started, track)
            for i in range(1, hosts + 1) if client == "aetcd" else ():
                p = procs.spawn(f"etcd-watch{i}", "testbed.bench.etcd",
                                ["--watch", f"127.0.0.1:{port}", "--prefix", PREFIX.decode(), "--report", pull_ep,
                                 "--id", str(i)], log_dir / f"etcd-watch{i}.log")
                pending.append(p)
                started.append(p.popen.pid)
                if track is not None:
                    track(p.popen.pid)
            procs.wait_ready(pending, CONNECT_TIMEOUT_S)
            frame_bytes, send_ns, results = asyncio.run(_publish(port, hosts, msgs, rate, pull, advance))
        finally:
            procs.stop_pids(started, timeout_s=3)
            pull.close(linger=0)
        on_tmpfs = data.resolve().is_relative_to(TMPFS)
    out = summarize_etcd(hosts, msgs, rate, frame_bytes, send_ns, results, client)
    out["etcd_version"] = etcd_version()
    out["data_dir_on_tmpfs"] = on_tmpfs
    out["data_dir"] = str(data)  # removed by now: kept so a caller can check that
    return out


async def _publish(port: int, hosts: int, msgs: int, rate: float, pull, advance) -> tuple:
    import aetcd

    from testbed.client import ClusterError

    poller = zmq.Poller()
    poller.register(pull, zmq.POLLIN)
    async with aetcd.Client(host="127.0.0.1", port=port) as client:
        # A watch is live once its watcher has seen a put: probe until every watcher answered one.
        heard: set[int] = set()
        deadline = time.monotonic() + CONNECT_TIMEOUT_S
        k = 0
        while len(heard) < hosts:
            if time.monotonic() > deadline:
                raise ClusterError(f"etcd: only {len(heard)} of {hosts} watchers saw a probe "
                                   f"within {CONNECT_TIMEOUT_S:.0f} s")
            await client.put(PREFIX + b"probe", msgpack.packb([PROBE, k, None]))
            k += 1
            await asyncio.sleep(PROBE_INTERVAL_S)
            while poller.poll(0):
                kind, ident, _ = msgpack.unpackb(pull.recv())
                if kind == PROBE:
                    heard.add(ident)
        await asyncio.sleep(0.1)

        # One key per MAC, as a controller would keep them; the value is the floor's frame.
        frame_bytes = len(msgpack.packb([DATA, msgs, sample_body(msgs)]))
        send_ns: list[int] = []
        t0 = time.monotonic() + 0.05
        for i in range(msgs):
            left = t0 + i / rate - time.monotonic()
            if left > 0:
                await asyncio.sleep(left)
            value = msgpack.packb([DATA, i, sample_body(i)])
            key = PREFIX + b"mac/%d" % (i % 1000)
            send_ns.append(time.monotonic_ns())
            await client.put(key, value)
            if advance is not None:
                advance(1)
        await asyncio.sleep(0.2)
        await client.put(PREFIX + b"end", msgpack.packb([END, msgs, None]))

    results: dict[int, tuple[list[int], list[int], float]] = {}
    deadline = time.monotonic() + REPORT_TIMEOUT_S
    while len(results) < hosts:
        left = deadline - time.monotonic()
        if left <= 0 or not poller.poll(left * 1000):
            raise ClusterError(f"etcd: only {len(results)} of {hosts} watchers reported "
                               f"within {REPORT_TIMEOUT_S:.0f} s")
        body = msgpack.unpackb(pull.recv())
        if body[0] == END:
            _, ident, numbers, stamps, cpu_s = body
            results[ident] = (numbers, stamps, cpu_s)
    return frame_bytes, send_ns, results


def summarize_etcd(hosts: int, msgs: int, rate: float, frame_bytes: int, send_ns: list[int],
                   results: dict[int, tuple[list[int], list[int], float]], client: str = "aetcd") -> dict:
    from testbed.bench.floor import summarize_floor

    out = summarize_floor(hosts, msgs, rate, frame_bytes, send_ns, results)
    out.pop("subscribers")
    cpu = out.pop("cpu_us_per_msg_per_subscriber")
    out["first_watcher_latency_ms"] = out.pop("first_subscriber_latency_ms")
    span_s = (send_ns[-1] - send_ns[0]) / 1e9 if len(send_ns) > 1 else 0.0
    return {
        "watchers": len(results),
        **out,
        "client": ("etcdctl (Go gRPC watch, -w json) per watcher process, stamped on arrival by one pipe reader"
                   if client == "etcdctl" else "aetcd (gRPC watch), one per watcher process"),
        "watcher_client": client,
        # Puts are sent one after another (each waits for its commit), so a slow etcd sends fewer per s.
        "achieved_puts_per_s": (len(send_ns) - 1) / span_s if span_s else None,
        "cpu_us_per_msg_per_watcher": cpu,
    }


# ---------------------------------------------------------------------- entry point


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m testbed.bench.etcd",
                                description="etcd watch fan-out baseline (watcher, or the whole measurement)")
    p.add_argument("--watch", help="watcher mode: etcd's client address HOST:PORT")
    p.add_argument("--prefix", default=PREFIX.decode(), help="watcher mode: key prefix to watch")
    p.add_argument("--report", help="watcher mode: where to PUSH the stamps")
    p.add_argument("--id", type=int, default=0, help="watcher mode: this watcher's number")
    p.add_argument("--ready-fd", type=int, default=None, help="pipe fd to announce readiness on")
    p.add_argument("--stamp", help="stamper mode: comma-separated pipe fds of etcdctl watchers")
    p.add_argument("--pids", help="stamper mode: the watchers' pids, in the order of --stamp")
    p.add_argument("--client", choices=CLIENTS, default=None,
                   help="standalone: watchers (default: etcdctl where installed, else aetcd)")
    p.add_argument("--hosts", type=int, default=8, help="standalone: watcher processes (default 8)")
    p.add_argument("--msgs", type=int, default=1000, help="standalone: puts (default 1000)")
    p.add_argument("--rate", type=float, default=200.0, help="standalone: puts per s (default 200)")
    args = p.parse_args(sys.argv[1:] if argv is None else argv)
    if args.stamp:
        try:
            fds = [int(x) for x in args.stamp.split(",")]
            pids = [int(x) for x in (args.pids or "").split(",")]
        except ValueError:
            p.error("--stamp and --pids take comma-separated integers")
        if not args.report or len(pids) != len(fds):
            p.error("--stamp needs --report and one --pids entry per fd")
        return stamp(fds, pids, args.report, args.ready_fd)
    if args.watch:
        if not args.report:
            p.error("--watch needs --report")
        host, _, port = args.watch.rpartition(":")
        if host != "127.0.0.1" or not port.isdigit():
            p.error("--watch takes 127.0.0.1:PORT")
        return asyncio.run(watch(int(port), args.prefix.encode(), args.report, args.id, args.ready_fd))
    if args.hosts < 1 or args.msgs < 1 or args.rate <= 0:
        p.error("need --hosts >= 1, --msgs >= 1 and --rate > 0")
    reason = skip_reason()
    if reason:
        print(error_line("dvs", reason), file=sys.stderr)
        return 1
    from testbed.client import ClusterError

    with tempfile.TemporaryDirectory(prefix="dvs-etcd-bench-") as d:
        try:
            result = run_etcd(args.hosts, args.msgs, args.rate, Path(d), client=args.client)
        except ClusterError as e:
            print(error_line("dvs", str(e)), file=sys.stderr)
            return 1
    result.pop("latencies_ms")
    print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
