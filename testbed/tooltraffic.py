"""`dvs traffic --tool ping|iperf3`: real tools in the VMs' namespaces judge the data plane.

In `--netns` mode every VM is a network namespace with a real kernel stack (testbed/vmns.py).
For K pairs of VMs in one VLAN on different hosts (testbed/traffic.py choose_pairs), VM A of each
pair runs the tool against VM B while paired VMs move one after another, and the figures come from
the tools' own output, not from the switch's counters:

- ping: `ping -D -O -n -i 1/RATE -c RATE*DURATION ADDR_B`. -D stamps every line with the wall
  clock, -O prints "no answer yet" for a request whose reply did not come before the next one was
  sent. Per move: the pings sent in [switchover - 500 ms, switchover + 1,000 ms] (cut short at the
  pair's previous and next switchovers) that got no reply, and the longest gap between two
  consecutive replies overlapping that window. Beside it, ping's own longest gap between two
  requests in the window (reply time - rtt): the floor under the reply gap, since ping cannot
  see a reply to a request it has not sent (on a loaded 2-core machine `-i 0.01` paces at ~16 ms).
- iperf3: a one-off server (`iperf3 -s -1`) in B, a client (`iperf3 -c ADDR_B -t DURATION -i 0.1
  -J`) in A: one TCP session per pair for the whole run. Per session: whether it survived (the
  client ran its full time and reported no error); per move: the throughput over the window
  against the session's median 100 ms interval (the dip, in %), and the window's worst interval.

Moves carry the controller's switchover stamp (CLOCK_MONOTONIC); the tools stamp with the wall
clock; dvs reads both clocks together once to map one onto the other.

The parsing and per-move functions are pure (text in, numbers out) and unit-tested on recorded output.
"""

from __future__ import annotations

import json
import re
import shutil
import statistics
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from dvswitch.stats import percentile
from testbed import vmns
from testbed.client import ClusterError
from testbed.traffic import MOVE_WINDOW_AFTER_MS, MOVE_WINDOW_BEFORE_MS, choose_pairs, move_during

NS_PER_S = 1_000_000_000
TOOLS = ("ping", "iperf3")
IPERF3_PORT = 5201
IPERF3_INTERVAL_S = 0.1  # iperf3's smallest reporting interval
SERVER_READY_S = 5.0  # an iperf3 server not listening after this long is an error
TOOL_GRACE_S = 10.0  # a tool still running this long after its planned end is stopped

# ---------------------------------------------------------------------- ping output (pure)

_REPLY = re.compile(r"^\[(\d+\.\d+)\] \d+ bytes from [^:]+: icmp_seq=(\d+) ttl=\d+ time=([\d.]+) ms( \(DUP!\))?")
_NO_ANSWER = re.compile(r"^\[(\d+\.\d+)\] no answer yet for icmp_seq=(\d+)")
_SUMMARY = re.compile(r"^(\d+) packets transmitted, (\d+) received")


@dataclass
class PingLog:
    replies: dict[int, tuple[float, float]] = field(default_factory=dict)  # seq -> (wall s received, rtt ms)
    no_answer: dict[int, float] = field(default_factory=dict)  # seq -> wall s when ping noticed it
    duplicates: int = 0
    transmitted: int | None = None
    received: int | None = None


def parse_ping(text: str) -> PingLog:
    """`ping -D -O -n` output -> replies by icmp_seq, unanswered requests, and the summary."""
    log = PingLog()
    for line in text.splitlines():
        m = _REPLY.match(line)
        if m:
            seq = int(m.group(2))
            if m.group(4) or seq in log.replies:
                log.duplicates += 1
            else:
                log.replies[seq] = (float(m.group(1)), float(m.group(3)))
            continue
        m = _NO_ANSWER.match(line)
        if m:
            log.no_answer[int(m.group(2))] = float(m.group(1))
            continue
        m = _SUMMARY.match(line)
        if m:
            log.transmitted, log.received = int(m.group(1)), int(m.group(2))
    return log


def ping_send_times(log: PingLog, interval_s: float) -> dict[int, float]:
    """Wall time each request left: reply time - rtt for an answered one; for an unanswered one,
    the nearest answered earlier request plus the interval per seq in between (ping keeps its pace)."""
    n = log.transmitted or max([*log.replies, *log.no_answer], default=0)
    sent = {s: t - rtt / 1000 for s, (t, rtt) in log.replies.items()}
    out: dict[int, float] = {}
    last: tuple[int, float] | None = None
    first = min(sent) if sent else None
    for s in range(1, n + 1):
        if s in sent:
            last = (s, sent[s])
            out[s] = sent[s]
        elif last is not None:
            out[s] = last[1] + (s - last[0]) * interval_s
        elif first is not None:
            out[s] = sent[first] - (first - s) * interval_s
        elif s in log.no_answer:
            out[s] = log.no_answer[s] - interval_s
    return out


def _longest_gap_ms(stamps: list[float], lo: float, hi: float) -> float | None:
    stamps = sorted(stamps)
    gap = None
    for a, b in zip(stamps, stamps[1:], strict=False):
        if b >= lo and a <= hi:
            gap = b - a if gap is None else max(gap, b - a)
    return None if gap is None else round(gap * 1000, 3)


def ping_window_stats(log: PingLog, send_times: dict[int, float], lo: float, hi: float) -> dict:
    """Pings sent in [lo, hi] (wall s), how many got no reply, the longest gap in ms between
    consecutive replies (by arrival) where that gap overlaps the window, and ping's own longest
    gap between two requests there (its pacing: the floor under the reply gap)."""
    in_window = [s for s, t in send_times.items() if lo <= t <= hi]
    lost = sum(1 for s in in_window if s not in log.replies)
    return {"pings": len(in_window), "lost": lost,
            "gap_ms_max": _longest_gap_ms([t for t, _ in log.replies.values()], lo, hi),
            "send_gap_ms_max": _longest_gap_ms([t - rtt / 1000 for t, rtt in log.replies.values()], lo, hi)}


# ---------------------------------------------------------------------- iperf3 output (pure)


@dataclass
class IperfLog:
    ok: bool
    error: str | None
    seconds: float
    bits_per_second: float | None
    retransmits: int | None
    intervals: list[tuple[float, float, float]]  # (start s, end s, bits/s), relative to the test's start


def parse_iperf3(text: str) -> IperfLog:
    """An `iperf3 -c ... -J` client's JSON -> whether it ran without error, and its intervals."""
    try:
        d = json.loads(text)
    except json.JSONDecodeError:
        return IperfLog(False, "no JSON from iperf3" if not text.strip() else "iperf3 printed broken JSON",
                        0.0, None, None, [])
    err = d.get("error")
    intervals = [(iv["sum"]["start"], iv["sum"]["end"], iv["sum"]["bits_per_second"])
                 for iv in d.get("intervals", []) if "sum" in iv]
    sent = d.get("end", {}).get("sum_sent", {})
    return IperfLog(err is None, err, float(sent.get("seconds", 0.0)), sent.get("bits_per_second"),
                    sent.get("retransmits"), intervals)


def iperf_window_stats(log: IperfLog, start: float, lo: float, hi: float) -> dict:
    """Throughput over the intervals overlapping [lo, hi] (wall s; the test started at `start`)
    against the session's median interval, as a dip in %, and the window's worst 100 ms interval.
    The dip uses the window's mean, not its minimum: with -b, iperf3 sends whole blocks (128 KB),
    so at 10 Mbit/s single 100 ms intervals are 0 or 2x by construction."""
    rates = [bps for _, _, bps in log.intervals]
    if not rates:
        return {"mbps_min": None, "mbps_window": None, "mbps_median": None, "dip_pct": None}
    median = statistics.median(rates)
    window = [(b - a, bps) for a, b, bps in log.intervals if start + b >= lo and start + a <= hi]
    span = sum(d for d, _ in window)
    mean = sum(d * bps for d, bps in window) / span if span > 0 else None
    low = min(bps for _, bps in window) if window else None
    dip = None if mean is None or median <= 0 else round(max(0.0, 100 * (1 - mean / median)), 1)
    return {"mbps_min": None if low is None else round(low / 1e6, 2),
            "mbps_window": None if mean is None else round(mean / 1e6, 2), "mbps_median": round(median / 1e6, 2),
            "dip_pct": dip}


# ---------------------------------------------------------------------- running the tools


def unavailable_reason(tool: str) -> str | None:
    if shutil.which(tool) is None:
        return f"--tool {tool} needs `{tool}`: apt-get install {'iputils-ping' if tool == 'ping' else 'iperf3'}"
    return None


@dataclass
class Pair:
    a: dict
    b: dict
    addr_b: str
    proc: subprocess.Popen | None = None
    server: subprocess.Popen | None = None
    out: Path | None = None
    started_mono_ns: int = 0


def _wall_of_mono(mono_ns: int, offset_ns: int) -> float:
    return (mono_ns + offset_ns) / NS_PER_S


def _clock_offset_ns() -> int:
    """wall - monotonic, read back to back (the smaller spread of a few tries)."""
    best = None
    for _ in range(5):
        m0 = time.monotonic_ns()
        w = time.time_ns()
        m1 = time.monotonic_ns()
        if best is None or m1 - m0 < best[0]:
            best = (m1 - m0, w - (m0 + m1) // 2)
    return best[1]


def _stop(p: subprocess.Popen | None) -> None:
    if p is not None and p.poll() is None:
        p.terminate()
        try:
            p.wait(2)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


def _wait_listening(lab, vm: str, deadline: float) -> None:
    argv = vmns.exec_argv(lab, vm, ["ss", "-Hltn", f"sport = :{IPERF3_PORT}"])
    while time.monotonic() < deadline:
        if subprocess.run(argv, capture_output=True, text=True).stdout.strip():
            return
        time.sleep(0.02)
    raise ClusterError(f"the iperf3 server in {vm} is not listening after {SERVER_READY_S:.0f} s")


def run_tool_traffic(cluster, *, tool: str, pairs: int, rate: float, duration_s: float, moves: int = 0,
                     seed: int = 1, bitrate: str | None = None, on_move=None) -> dict:
    if cluster.netns is None:
        raise ClusterError(f"--tool {tool} runs in the VMs' namespaces: start the cluster with "
                           f"`dvs up --netns --hosts N --vms M`")
    if tool not in TOOLS:
        raise ClusterError(f"unknown --tool {tool!r}; use ping or iperf3")
    reason = unavailable_reason(tool)
    if reason:
        raise ClusterError(reason)
    lab = cluster.netns
    with cluster.controller_client(timeout_ms=10_000) as ctl:
        vms = [v for v in ctl.call("vm_list")["vms"] if v["state"] == "active"]
    chosen = choose_pairs(vms, pairs)
    addrs = vmns.sync(cluster, vms)
    interval_s = 1.0 / rate
    count = max(1, int(round(rate * duration_s)))
    if tool == "ping" and interval_s < 0.002:
        raise ClusterError(f"--rate {rate:g} is faster than ping allows (-i 0.002, 500/s); use --rate 500 or less")
    work = Path(tempfile.mkdtemp(prefix="tool-", dir=cluster.state_dir))
    runs = [Pair(a, b, addrs[b["vm"]]) for a, b in chosen]
    records: list[dict] = []
    hosts = list(cluster.agents)
    try:
        if tool == "iperf3":
            for r in runs:
                r.server = subprocess.Popen(vmns.exec_argv(lab, r.b["vm"], ["iperf3", "-s", "-1", "-J"]),
                                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                            start_new_session=True)
            deadline = time.monotonic() + SERVER_READY_S
            for r in runs:
                _wait_listening(lab, r.b["vm"], deadline)
        offset_ns = _clock_offset_ns()
        for i, r in enumerate(runs):
            r.out = work / f"pair{i + 1}.{tool}.txt"
            if tool == "ping":
                argv = ["ping", "-D", "-O", "-n", "-i", f"{interval_s:.6f}", "-c", str(count), "-W", "1",
                        r.addr_b]
            else:
                argv = ["iperf3", "-c", r.addr_b, "-t", f"{duration_s:g}", "-i", str(IPERF3_INTERVAL_S), "-J",
                        "--connect-timeout", "3000", *(["-b", bitrate] if bitrate else [])]
            with open(r.out, "w") as f:
                r.started_mono_ns = time.monotonic_ns()
                r.proc = subprocess.Popen(vmns.exec_argv(lab, r.a["vm"], argv), stdout=f,
                                          stderr=subprocess.STDOUT, start_new_session=True)
        t0 = time.monotonic_ns()
        if moves:
            placement = {v["vm"]: v["host"] for r in runs for v in (r.a, r.b)}
            move_during(cluster, placement, hosts, moves=moves, t0_ns=t0, duration_s=duration_s, seed=seed,
                        records=records, on_move=on_move)
        deadline = time.monotonic() + duration_s + TOOL_GRACE_S
        for r in runs:
            try:
                r.proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                _stop(r.proc)
    finally:
        for r in runs:
            _stop(r.proc)
            _stop(r.server)
    report = _report(tool, runs, records, offset_ns, interval_s, rate, duration_s)
    shutil.rmtree(work, ignore_errors=True)
    return report


def _windows(records: list[dict], runs: list[Pair], offset_ns: int) -> list[tuple[int, float, float] | None]:
    """Per move: (pair index, lo, hi) in wall s, cut at the same pair's neighbouring switchovers."""
    pair_of = {v["vm"]: i for i, r in enumerate(runs) for v in (r.a, r.b)}
    sws = [(pair_of.get(rec["vm"]), _wall_of_mono(rec.get("switch_ns") or 0, offset_ns)) for rec in records]
    out = []
    for j, rec in enumerate(records):
        p, sw = sws[j]
        if p is None or not rec.get("switch_ns"):
            out.append(None)
            continue
        lo, hi = sw - MOVE_WINDOW_BEFORE_MS / 1000, sw + MOVE_WINDOW_AFTER_MS / 1000
        for k, (q, t) in enumerate(sws):
            if k != j and q == p and records[k].get("switch_ns"):
                if t < sw:
                    lo = max(lo, t)
                elif t > sw:
                    hi = min(hi, t)
        out.append((p, lo, hi))
    return out


def baseline_windows(send_times: dict[int, float], busy: list[float], width_s: float) -> list[tuple[float, float]]:
    """The run cut into windows of `width_s` that hold none of the `busy` instants (this pair's
    switchovers, with the width as margin): where a move cannot have caused what is measured."""
    if not send_times:
        return []
    t, end = min(send_times.values()), max(send_times.values())
    out = []
    while t + width_s <= end:
        if not any(t - width_s <= b <= t + 2 * width_s for b in busy):
            out.append((t, t + width_s))
        t += width_s
    return out


def _pct(values: list[float], q: float) -> float | None:
    return percentile(values, q)


def _report(tool: str, runs: list[Pair], records: list[dict], offset_ns: int, interval_s: float, rate: float,
            duration_s: float) -> dict:
    texts = [r.out.read_text() if r.out and r.out.exists() else "" for r in runs]
    windows = _windows(records, runs, offset_ns)
    moves_out = []
    base = {"tool": tool, "pairs": len(runs), "rate_per_pair": rate, "duration_s": duration_s,
            "pairs_list": [[r.a["vm"], r.b["vm"], r.addr_b] for r in runs]}
    if tool == "ping":
        logs = [parse_ping(t) for t in texts]
        sends = [ping_send_times(lg, interval_s) for lg in logs]
        for rec, w in zip(records, windows, strict=True):
            m = {k: rec.get(k) for k in ("vm", "src", "dst", "seq", "converged", "latency_ms")}
            if w is None:
                m.update(pair=None, pings=None, lost=None, gap_ms_max=None, send_gap_ms_max=None)
            else:
                p, lo, hi = w
                m.update(pair=p + 1, **ping_window_stats(logs[p], sends[p], lo, hi))
            moves_out.append(m)
        sessions = []
        for r, lg, snd in zip(runs, logs, sends, strict=True):
            whole = ping_window_stats(lg, snd, float("-inf"), float("inf"))
            sessions.append({"a": r.a["vm"], "b": r.b["vm"], "transmitted": lg.transmitted, "received": lg.received,
                             "lost": None if lg.transmitted is None else lg.transmitted - len(lg.replies),
                             "duplicates": lg.duplicates, "gap_ms_max": whole["gap_ms_max"],
                             "send_gap_ms_max": whole["send_gap_ms_max"],
                             "exit_code": r.proc.returncode if r.proc else None})
        # The same statistic where no move happened: what the machine and ping do by themselves.
        width_s = (MOVE_WINDOW_BEFORE_MS + MOVE_WINDOW_AFTER_MS) / 1000
        quiet = []
        for p, (lg, snd) in enumerate(zip(logs, sends, strict=True)):
            busy = [_wall_of_mono(rec["switch_ns"], offset_ns) for rec, w in zip(records, windows, strict=True)
                    if w is not None and w[0] == p]
            for lo, hi in baseline_windows(snd, busy, width_s):
                g = ping_window_stats(lg, snd, lo, hi)["gap_ms_max"]
                if g is not None:
                    quiet.append(g)
        lost = [m["lost"] for m in moves_out if m["lost"] is not None]
        gaps = [m["gap_ms_max"] for m in moves_out if m["gap_ms_max"] is not None]
        floor = [m["send_gap_ms_max"] for m in moves_out if m["send_gap_ms_max"] is not None]
        summary = {"moves": len(moves_out), "pings_lost": sum(lost), "moves_with_loss": sum(1 for x in lost if x),
                   "gap_ms_p50": _pct(gaps, 50), "gap_ms_p99": _pct(gaps, 99), "gap_ms_max": max(gaps, default=None),
                   "send_gap_ms_p99": _pct(floor, 99),
                   "no_move_windows": len(quiet), "no_move_gap_ms_p50": _pct(quiet, 50),
                   "no_move_gap_ms_p99": _pct(quiet, 99),
                   "transmitted": sum(s["transmitted"] or 0 for s in sessions),
                   "lost_total": sum(s["lost"] or 0 for s in sessions),
                   "complete": all(s["transmitted"] is not None for s in sessions)}
        return base | {"moves": moves_out, "sessions": sessions, "moves_summary": summary}
    logs = [parse_iperf3(t) for t in texts]
    starts = [_wall_of_mono(r.started_mono_ns, offset_ns) for r in runs]
    sessions = []
    for r, lg in zip(runs, logs, strict=True):
        survived = lg.ok and r.proc is not None and r.proc.returncode == 0 and lg.seconds >= 0.95 * duration_s
        sessions.append({"a": r.a["vm"], "b": r.b["vm"], "survived": survived, "error": lg.error,
                         "seconds": round(lg.seconds, 3),
                         "mbps": None if lg.bits_per_second is None else round(lg.bits_per_second / 1e6, 2),
                         "retransmits": lg.retransmits})
    for rec, w in zip(records, windows, strict=True):
        m = {k: rec.get(k) for k in ("vm", "src", "dst", "seq", "converged", "latency_ms")}
        if w is None:
            m.update(pair=None, survived=None, mbps_min=None, mbps_window=None, mbps_median=None, dip_pct=None)
        else:
            p, lo, hi = w
            m.update(pair=p + 1, survived=sessions[p]["survived"], **iperf_window_stats(logs[p], starts[p], lo, hi))
        moves_out.append(m)
    dips = [m["dip_pct"] for m in moves_out if m["dip_pct"] is not None]
    summary = {"moves": len(moves_out), "sessions": len(sessions),
               "sessions_survived": sum(1 for s in sessions if s["survived"]),
               "dip_pct_p50": _pct(dips, 50), "dip_pct_max": max(dips, default=None)}
    return base | {"moves": moves_out, "sessions": sessions, "moves_summary": summary}
