"""Judge a chaos run from its history alone (history.jsonl), separately from the run.

Invariants (docs/scenarios.md states them precisely):
  tables-match-inventory  after heal, every live agent's table equals the controller's inventory
  moves-resolved          every acknowledged move converged or, if not, ended done (never undone)
  single-owner            no VM lost, none active on two hosts: one owner, a live one, per VM
  monotonic-applies       no agent ever went back to a lower (seq, host) for a MAC
  processes-up            the processes that should be up are up (and only those)
Two more for maintenance mode and placement rules (vacuous in a run without them):
  maintenance-respected   no op targeted a host after its evacuation began; it ends empty
  rules-hold              the placement rules hold in the final inventory

Verdict: valid (exit 0), invalid (exit 1: an invariant failed; its events are named), or
unknown (exit 2: the history is incomplete or the run itself broke, and nothing failed).
"""

from __future__ import annotations

import bisect
import json
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

from agent.mactable import parse_mac
from dvswitch.stats import percentile
from testbed.chaos.history import HISTORY_FILE, read_history

INVARIANTS = {
    "tables-match-inventory": "(a) after heal, every live agent's MAC table equals the controller's inventory",
    "moves-resolved": "(b) acknowledged moves converged (with a latency) or ended done; none was undone",
    "single-owner": "(c) no VM lost or active on two hosts: exactly one owner per VM, a live host",
    "monotonic-applies": "(d) no agent ever applied a lower (seq, host) for a MAC than it held",
    "processes-up": "(e) the processes that should be up are up, answer, and the controller agrees",
    "maintenance-respected": "(f) no op placed a VM on a host in maintenance; an evacuated host ends empty",
    "rules-hold": "(g) at the end, anti-affinity VMs run on distinct hosts and together VMs on one",
}
EXIT = {"valid": 0, "invalid": 1, "unknown": 2}
MAX_VIOLATIONS = 20
NS = 1_000_000_000


@dataclass
class Result:
    name: str
    ok: bool | None  # None: could not be decided from this history
    detail: str = ""
    violations: list[dict] = field(default_factory=list)

    def fail(self, what: str, around: list[str] | None = None, **data) -> None:
        self.ok = False
        if len(self.violations) < MAX_VIOLATIONS:
            self.violations.append({"what": what, "around": around or [], **data})

    def to_json(self) -> dict:
        return {"ok": self.ok, "title": INVARIANTS[self.name], "detail": self.detail, "violations": self.violations}


# ---------------------------------------------------------------------- reading a history


class History:
    def __init__(self, events: list[dict], problems: list[str]) -> None:
        self.events = events
        self.problems = list(problems)
        first = {}
        for ev in events:
            first.setdefault(ev["ev"], ev)
        self.start = first.get("run_start")
        self.end = first.get("run_end")
        ws = first.get("workload_start")
        self.t0 = ws["t0_ns"] if ws else (self.start["t_ns"] if self.start else (events[0]["t_ns"] if events else 0))
        self.errors = [e for e in events if e["ev"] in ("run_error", "nemesis_error")]
        self.settled = first.get("settled")
        self.final_inventory = first.get("final_inventory")
        self.final_procs = (first.get("final_procs") or {}).get("procs")
        self.final_tables = {e["host"]: e for e in events if e["ev"] == "final_table"}
        self.reqs = {e["id"]: e for e in events if e["ev"] == "move_req"}
        self.outcomes: dict[int, dict] = {}
        for e in events:
            if e["ev"] in ("move_ack", "move_refused"):
                self.outcomes[e["id"]] = e  # the last answer wins (a late one after "no reply")
            elif e["ev"] == "move_noreply":
                self.outcomes.setdefault(e["id"], e)
        self.applies: list[list] = []
        for e in events:
            if e["ev"] == "applies":
                self.applies.extend(e["rows"])
        self.applies_lost = sum(e.get("lost", 0) for e in events if e["ev"] == "applies")
        self.applies_unavailable = [e for e in events if e["ev"] == "applies_unavailable"]
        seen_ops = set()
        self.ctl_moves = []
        for e in events:
            if e["ev"] == "controller_moves":
                for m in e["moves"]:
                    k = (e["life"], m["op"])
                    if k not in seen_ops:
                        seen_ops.add(k)
                        self.ctl_moves.append(m | {"life": e["life"]})
        self.procs = [e for e in events if e["ev"] in ("proc", "proc_died")]
        # Agent incarnations: an apply stamped at or after a (re)start belongs to the new one.
        self.starts: dict[str, list[int]] = defaultdict(list)
        for e in self.procs:
            if e["ev"] == "proc" and e["action"] == "restart":
                self.starts[e["name"]].append(e["spawn_ns"])
        for v in self.starts.values():
            v.sort()
        self.keys: dict[str, tuple[int, int]] = {}
        self.vm_of: dict[tuple[int, int], str] = {}
        if self.final_inventory and "vms" in self.final_inventory:
            for v in self.final_inventory["vms"]:
                k = (v["vlan"], parse_mac(v["mac"]))
                self.keys[v["vm"]] = k
                self.vm_of[k] = v["vm"]

    @property
    def complete(self) -> bool:
        return self.start is not None and self.end is not None and self.final_procs is not None

    def rel(self, t_ns: int) -> float:
        return (t_ns - self.t0) / NS

    # ---- context: the events around a violation, one line each

    def line(self, e: dict) -> str:
        t = f"{self.rel(e['t_ns']):+8.3f}s"
        k = e["ev"]
        if k == "move_req":
            return f"{t} move #{e['id']} requested: {e['vm']} {e.get('src_known')} -> {e['dst']}"
        if k == "move_ack":
            r = e["rec"]
            how = f"converged in {r['latency_ms']:.2f} ms" if r.get("converged") else \
                f"NOT converged ({r.get('error') or 'no error given'})"
            return f"{t} move #{e['id']} answered: {r['vm']} {r['src']} -> {r['dst']} seq {r['seq']} {how}"
        if k == "move_refused":
            return f"{t} move #{e['id']} refused: {e['vm']}: {e['error']}"
        if k == "move_noreply":
            return f"{t} move #{e['id']} got no reply within {e['waited_s']} s: {e['vm']}"
        if k == "fault":
            return f"{t} fault {e['phase']}: {e.get('label', e.get('host', ''))}"
        if k == "proc":
            return f"{t} {e['action']} {e['name']} (pid {e['pid']})"
        if k == "proc_died":
            return f"{t} {e['name']} (pid {e['pid']}) DIED unexpectedly"
        if k in ("heal_all", "workload_start", "workload_end", "settled"):
            return f"{t} {k}" + (f" ok={e['ok']} after {e['elapsed_s']} s {e.get('why', '')}" if k == "settled" else "")
        return f"{t} {k}"

    def around(self, t_ns: int | None = None, *, vm: str | None = None, host: str | None = None,
               window_s: float = 2.0, limit: int = 14) -> list[str]:
        out = []
        for e in self.events:
            k = e["ev"]
            near = t_ns is None or abs(e["t_ns"] - t_ns) <= window_s * NS
            if k in ("fault", "proc", "proc_died", "heal_all") and near:
                if host is None or k == "fault" or e.get("name") in (host, "controller"):
                    out.append(e)
            elif vm is not None and k.startswith("move_") and e.get("vm") == vm and (near or t_ns is None):
                out.append(e)
        if len(out) > limit:
            out = out[-limit:] if t_ns is None else sorted(out, key=lambda e: abs(e["t_ns"] - t_ns))[:limit]
            out.sort(key=lambda e: e["t_ns"])
        lines = [self.line(e) for e in out]
        if vm is not None:
            lines += [f"{self.rel(m['switch_ns']):+8.3f}s controller op {m['op']} ({m['kind']}): {vm} "
                      f"{m['src']} -> {m['dst']} seq {m['seq']} "
                      + ("converged" if m["converged"] else f"not converged: {m['error']}")
                      for m in self.ctl_moves if m["vm"] == vm and m.get("switch_ns")][-4:]
        return lines


def _rank(seq: int, host: str) -> tuple[int, str]:
    return (seq, host)


def _final_placements(h: History) -> tuple[dict, dict]:
    """(inventory: key -> (host, seq, tomb), tables: host -> {key: (host, seq, tomb)})."""
    inv = {}
    if h.final_inventory and "expected" in h.final_inventory:
        inv = {(v, m): (ho, s, t) for v, m, ho, s, t in h.final_inventory["expected"]["entries"]}
    tables = {}
    for host, e in h.final_tables.items():
        if "entries" in e:
            tables[host] = {(x["vlan"], parse_mac(x["mac"])): (x["host"], x["seq"], x["tombstone"])
                            for x in e["entries"]}
    return inv, tables


def _should_be_up(h: History) -> list[str]:
    return [n for n, p in (h.final_procs or {}).items() if p["should_be_up"] and n != "controller"]


# ---------------------------------------------------------------------- the invariants


def check_tables(h: History) -> Result:
    r = Result("tables-match-inventory", True)
    if not h.final_inventory or "expected" not in h.final_inventory or h.final_procs is None:
        r.ok, r.detail = None, "no final inventory or process list in the history"
        return r
    inv, tables = _final_placements(h)
    unchecked = []
    for host in _should_be_up(h):
        if host not in tables:
            unchecked.append(host)
            continue
        got = tables[host]
        bad = sorted({*inv, *got} - {k for k in inv if got.get(k) == inv[k]})
        if bad:
            k = bad[0]
            vm = h.vm_of.get(k, f"vlan {k[0]} mac {k[1]:012x}")
            r.fail(f"{host}: {len(bad)} entries differ from the inventory, e.g. {vm}: inventory "
                   f"{inv.get(k)} (host, seq, tombstone), {host} holds {got.get(k)}",
                   h.around(None, vm=h.vm_of.get(k)), host=host, differing=len(bad))
    settle = h.settled or {}
    r.detail = (f"{len(tables)} live agents compared with {len(inv)} inventory entries; settle "
                f"{'reached' if settle.get('ok') else 'NOT reached'} after {settle.get('elapsed_s')} s")
    if unchecked:
        r.detail += f"; no table from {', '.join(unchecked)} (see processes-up)"
        if r.ok:
            r.ok = None
    return r


def check_moves(h: History) -> Result:
    r = Result("moves-resolved", True)
    inv, tables = _final_placements(h)
    if not inv:
        r.ok, r.detail = None, "no final inventory in the history"
        return r
    live = [t for host, t in tables.items() if host in _should_be_up(h)]
    ctl_down = _controller_down_intervals(h)
    counts = defaultdict(int)
    lat = []

    def lost(vm: str, seq: int, dst: str) -> str | None:
        k = h.keys.get(vm)
        if k is None:
            return f"{vm} is not in the final inventory"
        if k not in inv or _rank(inv[k][1], inv[k][0]) < _rank(seq, dst):
            return f"the inventory went back to {inv.get(k)} (host, seq, tombstone)"
        for t in live:
            e = t.get(k)
            if e is None or _rank(e[1], e[0]) < _rank(seq, dst):
                return f"an agent holds {e} (host, seq, tombstone)"
        return None

    for rid, req in sorted(h.reqs.items()):
        out = h.outcomes.get(rid)
        if out is None:
            counts["unresolved"] += 1
            continue
        if out["ev"] == "move_refused":
            counts["refused"] += 1
            continue
        if out["ev"] == "move_noreply":
            counts["noreply"] += 1
            if not any(a <= out["t_ns"] and b >= req["t_ns"] for a, b in ctl_down):
                r.fail(f"move #{rid} ({req['vm']} -> {req['dst']}) got no reply in {out['waited_s']} s although "
                       f"the controller was up all along", h.around(req["t_ns"], vm=req["vm"]), move=rid)
            continue
        rec = out["rec"]
        if rec.get("converged"):
            counts["converged"] += 1
            if rec.get("latency_ms") is None or rec["latency_ms"] < 0:
                r.fail(f"move #{rid} ({rec['vm']}) acknowledged converged without a latency: {rec}",
                       h.around(out["t_ns"], vm=rec["vm"]), move=rid)
                continue
            lat.append(rec["latency_ms"])
            why = lost(rec["vm"], rec["seq"], rec["dst"])
            if why:
                r.fail(f"move #{rid} ({rec['vm']} -> {rec['dst']} seq {rec['seq']}) was acknowledged converged "
                       f"but later undone: {why}", h.around(None, vm=rec["vm"]), move=rid)
        elif rec.get("switch_ns"):
            counts["not_converged"] += 1
            why = lost(rec["vm"], rec["seq"], rec["dst"])
            if why:
                r.fail(f"move #{rid} ({rec['vm']} -> {rec['dst']} seq {rec['seq']}) switched over (not converged "
                       f"in time) but did not end done: {why}", h.around(None, vm=rec["vm"]), move=rid)
        else:
            r.fail(f"move #{rid} ({rec['vm']}) answered neither converged nor switched over: {rec}",
                   h.around(out["t_ns"], vm=rec["vm"]), move=rid)
    restarts = [m for m in h.ctl_moves if m["kind"] == "restart"]
    for m in h.ctl_moves:
        if m["converged"] and m["kind"] == "restart":
            why = lost(m["vm"], m["seq"], m["dst"])
            if why:
                r.fail(f"HA restart op {m['op']} ({m['vm']} -> {m['dst']} seq {m['seq']}) converged but was undone: "
                       f"{why}", h.around(None, vm=m["vm"]), op=m["op"])
    if counts["unresolved"] and r.ok:
        r.ok = None
    lat.sort()
    p50, p99 = percentile(lat, 50), percentile(lat, 99)
    r.detail = (f"{len(h.reqs)} moves requested: {counts['converged']} converged (latency ms p50 {_f(p50)}, "
                f"p99 {_f(p99)}, max {_f(lat[-1] if lat else None)}), {counts['not_converged']} switched but "
                f"converged late, {counts['refused']} refused, {counts['noreply']} without reply, "
                f"{counts['unresolved']} unresolved; {len(restarts)} HA restarts by the controller")
    return r


def _f(v) -> str:
    return "-" if v is None else f"{v:.2f}"


def _controller_down_intervals(h: History) -> list[tuple[int, int]]:
    """When the controller could not answer: from its kill/pause to its restart/resume (+2 s)."""
    out, since = [], None
    for e in h.procs:
        if e.get("name") != "controller":
            continue
        if e["ev"] == "proc_died" or e["action"] in ("kill", "pause"):
            since = e["t_ns"] if since is None else since
        elif e["action"] in ("restart", "resume") and since is not None:
            out.append((since, e["t_ns"] + 2 * NS))
            since = None
    if since is not None:
        out.append((since, 1 << 62))
    return out


def check_owners(h: History) -> Result:
    r = Result("single-owner", True)
    if not h.final_inventory or "vms" not in h.final_inventory or h.final_procs is None:
        r.ok, r.detail = None, "no final inventory or process list in the history"
        return r
    procs_ = h.final_procs
    live = {n for n, p in procs_.items() if p["alive"] and n != "controller"}
    up = set(_should_be_up(h)) & live
    _, tables = _final_placements(h)
    vms = {v["vm"]: v for v in h.final_inventory["vms"]}
    expected_vms = (h.start or {}).get("scenario", {}).get("vms")
    if expected_vms is not None:
        for i in range(1, expected_vms + 1):
            if f"vm{i}" not in vms:
                r.fail(f"vm{i} was created but is missing from the final inventory", h.around(None, vm=f"vm{i}"))
    ports: dict[tuple[int, int], list[str]] = defaultdict(list)
    for host, e in h.final_tables.items():
        for p in e.get("ports", []):
            if p["state"] == "active":
                ports[(p["vlan"], p["mac"])].append(host)
    checked = 0
    for name, v in sorted(vms.items()):
        if v["state"] in ("deleted", "failed"):
            continue
        checked += 1
        k = h.keys[name]
        ctx = h.around(None, vm=name)
        if v["state"] != "active":
            r.fail(f"{name} is still {v['state']!r} in the inventory after settling", ctx, vm=name)
        if v["host"] not in up:
            r.fail(f"{name} is placed on {v['host']}, which is not a live host", ctx, vm=name)
        owners = set()
        for host in sorted(up):
            t = tables.get(host)
            if t is None:
                continue
            e = t.get(k)
            if e is None:
                r.fail(f"{name} is lost on {host}: no entry for its MAC", ctx, vm=name, host=host)
            elif e[2]:
                r.fail(f"{name} is a tombstone on {host} though it was never deleted", ctx, vm=name, host=host)
            else:
                owners.add(e[0])
        if len(owners) > 1:
            r.fail(f"{name} has {len(owners)} owners across the agents' tables: {', '.join(sorted(owners))}", ctx,
                   vm=name)
        active = sorted(ports.get(k, []))
        if len(active) > 1:
            r.fail(f"{name} is active on {len(active)} hosts: {', '.join(active)}", ctx, vm=name)
        elif not active:
            r.fail(f"{name} is active on no host (the inventory places it on {v['host']})", ctx, vm=name)
        elif active[0] != v["host"] or (owners and owners != {active[0]}):
            r.fail(f"{name} is active on {active[0]} but the inventory says {v['host']} and the tables say "
                   f"{', '.join(sorted(owners)) or 'nothing'}", ctx, vm=name)
    r.detail = f"{checked} VMs checked on {len(up)} live hosts"
    return r


def check_applies(h: History) -> Result:
    r = Result("monotonic-applies", True)
    rows = h.applies
    if not rows:
        r.ok, r.detail = None, "no applies in the history (the controller's applied_log was not read)"
        return r
    order = sorted(range(len(rows)), key=lambda i: (rows[i][0], i))
    last: dict[tuple, tuple[int, list]] = {}
    for i in order:
        t_ns, reporter, vlan, mac, host, seq, tomb = rows[i]
        inc = bisect.bisect_right(h.starts.get(reporter, []), t_ns)
        k = (reporter, inc, vlan, mac)
        prev = last.get(k)
        if prev is not None and _rank(seq, host) < _rank(prev[1][5], prev[1][4]):
            vm = h.vm_of.get((vlan, mac), f"vlan {vlan} mac {mac:012x}")
            p = prev[1]
            r.fail(f"{reporter} went back for {vm}: applied (seq {seq}, {host}) at {h.rel(t_ns):+.3f}s after "
                   f"(seq {p[5]}, {p[4]}) at {h.rel(p[0]):+.3f}s",
                   h.around(t_ns, vm=h.vm_of.get((vlan, mac)), host=reporter),
                   reporter=reporter, vm=vm, previous=p, row=rows[i])
        last[k] = (t_ns, rows[i])  # what the agent holds now, whether or not it went back
    reporters = {x[1] for x in rows}
    r.detail = f"{len(rows)} applies by {len(reporters)} agents checked, in order per agent incarnation and MAC"
    if h.applies_lost:
        r.detail += f"; {h.applies_lost} older applies were gone from the controller's bounded log"
    if h.applies_unavailable:
        r.detail += (f"; the applied log of {len(h.applies_unavailable)} controller life(s) could not be read "
                     "(a paused or dead controller)")
    return r


def check_processes(h: History) -> Result:
    r = Result("processes-up", True)
    if h.final_procs is None:
        r.ok, r.detail = None, "no final process list in the history"
        return r
    for name, p in sorted(h.final_procs.items()):
        ctx = h.around(None, host=name)[-8:]
        if p["should_be_up"] and not p["alive"]:
            r.fail(f"{name} should be up but is not running (pid {p['pid']})", ctx, name=name)
        elif p["should_be_up"] and p.get("answers") is False:
            r.fail(f"{name} is running but does not answer its API", ctx, name=name)
        elif not p["should_be_up"] and p["alive"]:
            r.fail(f"{name} should have stayed down (end.keep_down) but is running", ctx, name=name)
    for e in h.procs:
        if e["ev"] == "proc_died":
            r.fail(f"{e['name']} (pid {e['pid']}) died at {h.rel(e['t_ns']):+.3f}s though nothing killed it",
                   h.around(e["t_ns"], host=e["name"]), name=e["name"])
    fi = h.final_inventory or {}
    if "error" in fi:
        r.fail(f"the controller did not answer at the end: {fi['error']}")
    elif "expected" in fi:
        live = sorted(fi["expected"]["live_hosts"])
        want = sorted(_should_be_up(h))
        if live != want:
            r.fail(f"the controller's live hosts {live} are not the hosts that should be up {want}",
                   h.around(None)[-8:])
    n = sum(1 for p in h.final_procs.values() if p["should_be_up"])
    r.detail = f"{n} processes should be up at the end"
    errors = [f"{host}: {e['last_error']}" for host, e in sorted(h.final_tables.items()) if e.get("last_error")]
    if errors:
        r.detail += "; handler errors reported (not a failure by themselves): " + "; ".join(errors)
    return r


def check_maintenance(h: History) -> Result:
    r = Result("maintenance-respected", True)
    starts = [e for e in h.events if e["ev"] == "evacuate" and e.get("phase") == "start"]
    if not starts:
        r.detail = "no evacuation in this run"
        return r
    # From when the controller had it in maintenance: its answer says how long it waited (a
    # request sent at "start" may reach it later, while a move to the host is still allowed).
    since = {e["host"]: e["t_ns"] for e in starts}
    for e in h.events:
        if e["ev"] == "evacuate" and e.get("phase") == "done":
            since[e["host"]] = max(since[e["host"]], e["t_ns"] - int(e["elapsed_ms"] * 1e6))
    for m in h.ctl_moves:
        t = since.get(m["dst"])
        if t is not None and m["started_ns"] > t and m["kind"] in ("move", "restart", "create"):
            r.fail(f"op {m['op']} ({m['kind']} of {m['vm']}) targeted {m['dst']} {(m['started_ns'] - t) / 1e6:.1f} ms "
                   "after its evacuation began", h.around(m["started_ns"], vm=m["vm"]), vm=m["vm"])
    done = {e["host"] for e in h.events if e["ev"] == "evacuate" and e.get("phase") == "done"}
    fi = h.final_inventory or {}
    if "vms" not in fi:
        r.ok, r.detail = None, "no final inventory in the history"
        return r
    for host in sorted(since):
        if host not in done:
            r.fail(f"the controller never answered that {host} is empty", h.around(None)[-8:], host=host)
        if host not in fi["status"].get("maintenance", []):
            r.fail(f"{host} is not in maintenance at the end", host=host)
        left = [v["vm"] for v in fi["vms"] if v["host"] == host and v["state"] in ("active", "moving", "creating")]
        if left:
            r.fail(f"{host} still runs {', '.join(left[:5])} at the end", host=host)
    moved = sum(len(e["moves"]) for e in h.events if e["ev"] == "evacuate" and e.get("phase") == "done")
    r.detail = f"evacuated {', '.join(sorted(since))}: {moved} moves reported"
    return r


def check_rules(h: History) -> Result:
    r = Result("rules-hold", True)
    fi = h.final_inventory or {}
    if "rules" not in fi:
        r.detail = "no placement rules in this run" if "vms" in fi else "no final inventory in the history"
        r.ok = True if "vms" in fi else None
        return r
    at = {v["vm"]: v["host"] for v in fi["vms"] if v["state"] in ("active", "moving", "creating")}
    for rule in fi["rules"]:
        hosts = [(v, at[v]) for v in rule["vms"] if v in at]
        if rule["kind"] == "anti":
            seen: dict[str, str] = {}
            for v, host in hosts:
                if host in seen:
                    r.fail(f"anti-affinity rule {rule['rule']}: {seen[host]} and {v} both run on {host}", rule=rule["rule"])
                seen[host] = v
        elif len({host for _, host in hosts}) > 1:
            r.fail(f"together rule {rule['rule']}: its VMs run apart ({hosts})", rule=rule["rule"])
    r.detail = f"{len(fi['rules'])} rule(s) checked against the final inventory"
    return r


# ---------------------------------------------------------------------- verdict


def judge(h: History) -> dict:
    results = [check_tables(h), check_moves(h), check_owners(h), check_applies(h), check_processes(h),
               check_maintenance(h), check_rules(h)]
    failed = [x.name for x in results if x.ok is False]
    undecided = [x.name for x in results if x.ok is None]
    problems = list(h.problems)
    if h.start is None:
        problems.append("no run_start event")
    if h.end is None:
        problems.append("no run_end event: the history is incomplete (the runner died?)")
    problems += [f"{e['ev']}: {e['error']}" for e in h.errors]
    if failed:
        verdict = "invalid"
    elif undecided or problems or not h.complete:
        verdict = "unknown"
    else:
        verdict = "valid"
    scenario = (h.start or {}).get("scenario", {})
    return {
        "verdict": verdict,
        "exit_code": EXIT[verdict],
        "failed": failed,
        "undecided": undecided,
        "problems": problems,
        "scenario": scenario.get("name"),
        "scenario_path": scenario.get("path"),
        "seed": (h.start or {}).get("seed"),
        "invariants": {x.name: x.to_json() for x in results},
        "stats": stats(h),
    }


def stats(h: History) -> dict:
    acks = [o["rec"] for o in h.outcomes.values() if o["ev"] == "move_ack"]
    lat = sorted(r["latency_ms"] for r in acks if r.get("converged") and r.get("latency_ms") is not None)
    # How long the client waited for each answered move: more than the latency when the
    # controller waited for a silent host to be declared dead (it then leaves the latency).
    wait = sorted(round((o["t_ns"] - h.reqs[i]["t_ns"]) / 1e6, 3) for i, o in h.outcomes.items()
                  if o["ev"] == "move_ack" and i in h.reqs)

    kinds = defaultdict(int)
    for o in h.outcomes.values():
        kinds[o["ev"]] += 1
    return {
        "moves_requested": len(h.reqs),
        "moves_converged": sum(1 for r in acks if r.get("converged")),
        "moves_switched_not_converged": sum(1 for r in acks if not r.get("converged") and r.get("switch_ns")),
        "moves_refused": kinds["move_refused"],
        "moves_without_reply": kinds["move_noreply"],
        "moves_skipped": sum(1 for e in h.events if e["ev"] == "move_skip"),
        "latency_ms_p50": percentile(lat, 50),
        "latency_ms_p99": percentile(lat, 99),
        "latency_ms_max": lat[-1] if lat else None,
        "reply_wait_ms_p50": percentile(wait, 50),
        "reply_wait_ms_p99": percentile(wait, 99),
        "reply_wait_ms_max": wait[-1] if wait else None,
        "ha_restarts": sum(1 for m in h.ctl_moves if m["kind"] == "restart"),
        "faults_injected": sum(1 for e in h.events if e["ev"] == "fault" and e["phase"] == "inject"),
        "process_actions": sum(1 for e in h.events if e["ev"] == "proc"),
        "applies_checked": len(h.applies),
        "settle_s": (h.settled or {}).get("elapsed_s"),
        "settled": (h.settled or {}).get("ok"),
        "wall_s": (h.end or {}).get("wall_s"),
    }


def check_history(path: str | Path, *, write_outputs: bool = True) -> dict:
    """Re-read a history (a file, or a report dir holding history.jsonl) and judge it. With
    `write_outputs`, also write summary.json and timeline.png next to it."""
    path = Path(path)
    if path.is_dir():
        path = path / HISTORY_FILE
    if not path.exists():
        summary = {"verdict": "unknown", "exit_code": 2, "failed": [], "undecided": [],
                   "problems": [f"{path}: no such history file"], "invariants": {}, "stats": {}}
        return summary
    events, problems = read_history(path)
    h = History(events, problems)
    summary = judge(h)
    summary["history"] = str(path)
    if write_outputs:
        (path.parent / "summary.json").write_text(json.dumps(summary, indent=1, default=str))
        try:
            from testbed.chaos.timeline import draw_timeline

            draw_timeline(h, summary, path.parent / "timeline.png")
            summary["timeline"] = str(path.parent / "timeline.png")
        except Exception as e:  # noqa: BLE001 - a picture must never change the verdict
            summary["timeline_error"] = f"{type(e).__name__}: {e}"
    return summary
