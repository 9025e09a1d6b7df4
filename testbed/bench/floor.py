"""The floor: what raw pyzmq fan-out costs on this machine, with no dvswitch code in the way.

One publisher (the bench process) sends small msgpack messages on a PUB socket, paced at a
fixed rate, to N-1 subscriber processes (the same fan-out as one move's gossip in an N-host
mesh). Each subscriber runs a BLOCKING `recv()` loop, stamps `time.monotonic_ns()` as soon
as `recv()` returns, and at the end sends its stamps and its CPU time back over PUSH. All
processes share CLOCK_MONOTONIC, so "time until the last subscriber has message i" is
`max(stamp_i over subscribers) - send_stamp_i`, exactly how move convergence is measured.

Subscriber (started by the bench through testbed.procs, with a ready-fd handshake):

    python -m testbed.bench.floor --sub tcp://127.0.0.1:P --report tcp://127.0.0.1:Q --id 3

On its own (spawns the subscribers, prints the result as JSON):

    python -m testbed.bench.floor --hosts 32 --msgs 1000 --rate 200 [--shape agent]

`--shape agent` is the agent-shaped floor: what an agent's receive path costs with no dvswitch
code in it. Each subscriber is built as an agent is (uvloop, `add_reader` on the SUB socket's
FD, drained with NOBLOCK until ZMQ_EVENTS shows no POLLIN, CURVE on every socket) and, like an
agent's apply report, sends a small message over a DEALER to a ROUTER of the publisher's for
every wake-up that took a message. The gap between it and the blocking floor is what that
architecture costs (an event loop's wake-up, CURVE, a send per message: the I/O thread wakes
again); the gap between dvswitch and it is dvswitch's own work per move.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import msgpack
import zmq

PROBE, DATA, END = 0, 1, 2
PROBE_INTERVAL_S = 0.05
# How long subscribers may take to connect, and to report at the end, in s.
CONNECT_TIMEOUT_S = 60.0
REPORT_TIMEOUT_S = 30.0


# What the figures call each shape's receive loop.
LOOPS = {"blocking": "blocking recv()",
         "agent": "uvloop reader, CURVE, a report per wake-up (the agent's shape)"}


# ---------------------------------------------------------------------- subscriber process


def _announce(ready_fd: int | None, ident: int) -> None:
    if ready_fd is not None:
        try:
            os.write(ready_fd, (json.dumps({"id": ident, "pid": os.getpid()}) + "\n").encode())
        finally:
            os.close(ready_fd)


def _sockets(ctx: zmq.Context, sub_ep: str, report_ep: str, server_key: bytes | None) -> tuple:
    sub = ctx.socket(zmq.SUB)
    sub.setsockopt(zmq.LINGER, 0)
    sub.setsockopt(zmq.RCVHWM, 100_000)
    sub.setsockopt(zmq.SUBSCRIBE, b"")
    if server_key is not None:
        sub.curve_publickey, sub.curve_secretkey = zmq.curve_keypair()
        sub.curve_serverkey = server_key
    sub.connect(sub_ep)
    push = ctx.socket(zmq.PUSH)
    push.setsockopt(zmq.LINGER, 5_000)
    push.connect(report_ep)
    return sub, push


def subscriber(sub_ep: str, report_ep: str, ident: int, ready_fd: int | None) -> int:
    ctx = zmq.Context()
    sub, push = _sockets(ctx, sub_ep, report_ep, None)
    _announce(ready_fd, ident)
    numbers: list[int] = []
    stamps: list[int] = []
    cpu0 = None
    unpackb = msgpack.unpackb
    recv = sub.recv
    while True:
        frame = recv()  # blocking: the cheapest way to wait for one message
        t = time.monotonic_ns()
        kind, n, _body = unpackb(frame)
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
    push.close(linger=5_000)
    sub.close(linger=0)
    ctx.term()
    return 0


def agent_shaped(sub_ep: str, report_ep: str, sink_ep: str, server_key: bytes, ident: int,
                 ready_fd: int | None) -> int:
    """The agent-shaped subscriber (module docstring): uvloop, CURVE, a report per wake-up."""
    import asyncio

    import uvloop

    ctx = zmq.Context()
    sub, push = _sockets(ctx, sub_ep, report_ep, server_key)
    dealer = ctx.socket(zmq.DEALER)
    dealer.setsockopt(zmq.LINGER, 0)
    dealer.curve_publickey, dealer.curve_secretkey = zmq.curve_keypair()
    dealer.curve_serverkey = server_key
    dealer.connect(sink_ep)
    _announce(ready_fd, ident)
    numbers: list[int] = []
    stamps: list[int] = []
    cpu0: list[float] = []
    events, pollin, noblock = int(zmq.EVENTS), int(zmq.POLLIN), int(zmq.NOBLOCK)

    async def run() -> None:
        loop = asyncio.get_running_loop()
        done = asyncio.Event()
        unpackb, packb = msgpack.unpackb, msgpack.packb
        recv, get = sub.recv, sub.get

        def drain() -> None:
            took = 0
            while get(events) & pollin:
                frame = recv(noblock)
                t = time.monotonic_ns()
                kind, n, _body = unpackb(frame)
                if kind == DATA:
                    if not cpu0:
                        cpu0.append(time.process_time())
                    numbers.append(n)
                    stamps.append(t)
                    took += 1
                elif kind == PROBE:
                    push.send(packb([PROBE, ident, n]))
                elif kind == END:
                    done.set()
                    return
            if took:
                # As an agent's apply report: one small message to another process per wake-up.
                dealer.send(packb([ident, took, time.monotonic_ns()]), noblock)
                dealer.get(events)  # (a send can take the edge that announced input on it)

        loop.add_reader(sub.get(zmq.FD), drain)
        loop.call_soon(drain)
        await done.wait()
        loop.remove_reader(sub.get(zmq.FD))

    uvloop.run(run())
    cpu_s = time.process_time() - cpu0[0] if cpu0 else 0.0
    push.send(msgpack.packb([END, ident, numbers, stamps, cpu_s]))
    push.close(linger=5_000)
    for s in (sub, dealer):
        s.close(linger=0)
    ctx.term()
    return 0


# ---------------------------------------------------------------------- publisher (the bench)


def sample_body(n: int) -> list:
    """What one gossip update looks like on the wire (an UPDATES body with one update)."""
    return ["h12", time.monotonic_ns(), [[n, 100, 0x02_00_00_00_00_01 + n % 1000, "h12", "vEth123", 3, False]]]


def run_floor(hosts: int, msgs: int, rate: float, log_dir: Path, *, track: Callable[[int], None] | None = None,
              advance: Callable[[int], None] | None = None, shape: str = "blocking") -> dict:
    """Fan `msgs` messages at `rate`/s out to `hosts - 1` subscriber processes; return the figures.
    `track(pid)` is called for every process started (all are stopped before returning).
    `shape`: "blocking" (the floor) or "agent" (the agent-shaped floor: module docstring)."""
    from testbed import procs
    from testbed.client import ClusterError

    if hosts < 2:
        raise ClusterError("the floor needs at least 2 hosts (one publisher, one subscriber)")
    if shape not in LOOPS:
        raise ValueError(f"unknown floor shape {shape!r}")
    subs = hosts - 1
    ctx = zmq.Context.instance()
    pub = ctx.socket(zmq.PUB)
    pub.setsockopt(zmq.LINGER, 0)
    pub.setsockopt(zmq.SNDHWM, 100_000)
    sink = None  # the agent shape's reports arrive there (read and dropped, as a controller would)
    extra: list[str] = []
    if shape == "agent":
        public, secret = zmq.curve_keypair()
        sink = ctx.socket(zmq.ROUTER)
        sink.setsockopt(zmq.LINGER, 0)
        for s in (pub, sink):
            s.curve_server = True
            s.curve_publickey, s.curve_secretkey = public, secret
        sink.bind("tcp://127.0.0.1:*")
        extra = ["--shape", "agent", "--sink", sink.getsockopt_string(zmq.LAST_ENDPOINT),
                 "--server-key", public.decode()]
    pub.bind("tcp://127.0.0.1:*")
    pub_ep = pub.getsockopt_string(zmq.LAST_ENDPOINT)
    pull = ctx.socket(zmq.PULL)
    pull.setsockopt(zmq.LINGER, 0)
    pull.bind("tcp://127.0.0.1:*")
    pull_ep = pull.getsockopt_string(zmq.LAST_ENDPOINT)
    pending = []
    started: list[int] = []
    try:
        for i in range(1, subs + 1):
            p = procs.spawn(f"floor-sub{i}", "testbed.bench.floor",
                            ["--sub", pub_ep, "--report", pull_ep, "--id", str(i), *extra],
                            log_dir / f"floor-{shape}-sub{i}.log")
            pending.append(p)
            started.append(p.popen.pid)
            if track is not None:
                track(p.popen.pid)
        procs.wait_ready(pending, CONNECT_TIMEOUT_S)
        poller = zmq.Poller()
        poller.register(pull, zmq.POLLIN)
        sink_poller = zmq.Poller()
        if sink is not None:
            sink_poller.register(sink, zmq.POLLIN)

        def wait(seconds: float) -> None:
            """Sleep that long, reading the agent shape's reports meanwhile."""
            if sink is None:
                time.sleep(seconds)
                return
            end = time.monotonic() + seconds
            while (left := end - time.monotonic()) > 0:
                if sink_poller.poll(left * 1000):
                    while sink.poll(0):
                        sink.recv_multipart()

        # Slow joiners: probe until every subscriber has answered one probe.
        heard: set[int] = set()
        deadline = time.monotonic() + CONNECT_TIMEOUT_S
        k = 0
        while len(heard) < subs:
            if time.monotonic() > deadline:
                raise ClusterError(f"floor: only {len(heard)} of {subs} subscribers connected "
                                   f"within {CONNECT_TIMEOUT_S:.0f} s")
            pub.send(msgpack.packb([PROBE, k, None]))
            k += 1
            t_probe = time.monotonic() + PROBE_INTERVAL_S
            while (left := t_probe - time.monotonic()) > 0 and poller.poll(left * 1000):
                kind, ident, _ = msgpack.unpackb(pull.recv())
                if kind == PROBE:
                    heard.add(ident)
        time.sleep(0.1)

        frame_bytes = len(msgpack.packb([DATA, msgs, sample_body(msgs)]))
        send_ns: list[int] = []
        t0 = time.monotonic() + 0.05
        for i in range(msgs):
            left = t0 + i / rate - time.monotonic()
            if left > 0:
                wait(left)
            frame = msgpack.packb([DATA, i, sample_body(i)])
            send_ns.append(time.monotonic_ns())
            pub.send(frame)
            if advance is not None:
                advance(1)
        wait(0.2)
        pub.send(msgpack.packb([END, msgs, None]))

        results: dict[int, tuple[list[int], list[int], float]] = {}
        deadline = time.monotonic() + REPORT_TIMEOUT_S
        while len(results) < subs:
            left = deadline - time.monotonic()
            if left <= 0 or not poller.poll(left * 1000):
                raise ClusterError(f"floor: only {len(results)} of {subs} subscribers reported "
                                   f"within {REPORT_TIMEOUT_S:.0f} s")
            body = msgpack.unpackb(pull.recv())
            if body[0] == END:
                _, ident, numbers, stamps, cpu_s = body
                results[ident] = (numbers, stamps, cpu_s)
    finally:
        procs.stop_pids(started, timeout_s=3)
        for s in (pub, pull, sink):
            if s is not None:
                s.close(linger=0)
    return {**summarize_floor(hosts, msgs, rate, frame_bytes, send_ns, results),
            "receive_loop": LOOPS[shape], "shape": shape}


def summarize_floor(hosts: int, msgs: int, rate: float, frame_bytes: int, send_ns: list[int],
                    results: dict[int, tuple[list[int], list[int], float]]) -> dict:
    from testbed.bench.stats import dist

    last: list[float] = []
    first: list[float] = []
    lost = 0
    per_sub = [dict(zip(numbers, stamps, strict=True)) for numbers, stamps, _ in results.values()]
    for i, t_send in enumerate(send_ns):
        got = [s[i] for s in per_sub if i in s]
        lost += len(per_sub) - len(got)
        if len(got) == len(per_sub) and got:
            last.append((max(got) - t_send) / 1e6)
            first.append((min(got) - t_send) / 1e6)
    cpu = [cpu_s / max(1, len(numbers)) * 1e6 for numbers, _, cpu_s in results.values()]
    return {
        "hosts": hosts,
        "subscribers": len(results),
        "msgs": msgs,
        "rate_per_s": rate,
        "frame_bytes": frame_bytes,
        "lost": lost,
        "latency_ms": dist(last),  # until the LAST subscriber has the message
        "first_subscriber_latency_ms": dist(first),
        "cpu_us_per_msg_per_subscriber": {
            "mean": sum(cpu) / len(cpu) if cpu else None,
            "max": max(cpu) if cpu else None,
        },
        "latencies_ms": last,
    }


# ---------------------------------------------------------------------- entry point


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m testbed.bench.floor",
                                description="Raw pyzmq fan-out floor (subscriber, or the whole measurement)")
    p.add_argument("--sub", help="subscriber mode: the publisher's endpoint")
    p.add_argument("--report", help="subscriber mode: where to PUSH the stamps")
    p.add_argument("--id", type=int, default=0, help="subscriber mode: this subscriber's number")
    p.add_argument("--shape", choices=sorted(LOOPS), default="blocking",
                   help="blocking recv() (the floor) or agent (uvloop, CURVE, a report per wake-up)")
    p.add_argument("--sink", help="subscriber mode, agent shape: where to send the reports")
    p.add_argument("--server-key", help="subscriber mode, agent shape: the publisher's CURVE public key (Z85)")
    p.add_argument("--ready-fd", type=int, default=None, help="pipe fd to announce readiness on")
    p.add_argument("--hosts", type=int, default=8, help="standalone: publisher + hosts-1 subscribers (default 8)")
    p.add_argument("--msgs", type=int, default=1000, help="standalone: messages to send (default 1000)")
    p.add_argument("--rate", type=float, default=200.0, help="standalone: messages per s (default 200)")
    args = p.parse_args(sys.argv[1:] if argv is None else argv)
    if args.sub:
        if not args.report:
            p.error("--sub needs --report")
        if args.shape == "agent":
            if not args.sink or not args.server_key:
                p.error("--shape agent needs --sink and --server-key")
            return agent_shaped(args.sub, args.report, args.sink, args.server_key.encode(), args.id, args.ready_fd)
        return subscriber(args.sub, args.report, args.id, args.ready_fd)
    if args.hosts < 2 or args.msgs < 1 or args.rate <= 0:
        p.error("need --hosts >= 2, --msgs >= 1 and --rate > 0")
    with tempfile.TemporaryDirectory(prefix="dvs-floor-") as d:
        result = run_floor(args.hosts, args.msgs, args.rate, Path(d), shape=args.shape)
    result.pop("latencies_ms")
    print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
