"""Scenario files (TOML) and the deterministic plan built from one and a seed.

A scenario is data: cluster size, agent/controller settings, a workload (a steady move rate,
a hot set of VMs, move storms) and a fault schedule. `load_scenario` validates it strictly:
anything wrong is ONE `ClusterError` line naming the file, the field and what was expected.
`build_plan(scenario, seed)` turns it into timed actions; it draws every choice (random
targets, fault RNG seeds, which VM moves where) from `random.Random(seed)` only, so the same
seed gives the same fault schedule and the same workload choices. The format is documented in
docs/scenarios.md.
"""

from __future__ import annotations

import math
import random
import tomllib
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

from agent.config import AgentConfig
from agent.faults import CONTROLLER
from agent.wire import MsgType
from controller.config import ControllerConfig
from testbed.client import ClusterError

RANDOM = "random"
NAMED_PARTITIONS = ("isolate", "halves", "majority", "bridge", "controller")
NET_KINDS = ("loss", "delay", "dup", "reorder")
PROC_KINDS = ("kill", "pause", "resume", "restart")
KINDS = ("partition", "heal", *NET_KINDS, *PROC_KINDS, "rolling-restart", "evacuate")
FOR_S_KINDS = ("partition", *NET_KINDS, "kill", "pause")
MAX_HOSTS = 32
MAX_VMS = 4096
MAX_DURATION_S = 600.0

# Parameters each fault kind takes (besides at_s, kind and for_s), and which are required.
_PARAMS: dict[str, dict[str, bool]] = {
    "partition": {"named": False, "groups": False, "host": False},
    "heal": {},
    "loss": {"p": True, "hosts": False, "from": False, "types": False},
    "delay": {"ms": True, "jitter_ms": False, "hosts": False, "from": False, "types": False},
    "dup": {"p": True, "hosts": False, "from": False, "types": False},
    "reorder": {"p": True, "hosts": False, "from": False, "types": False},
    "kill": {"target": True},
    "pause": {"target": True},
    "resume": {"target": True},
    "restart": {"target": True},
    "rolling-restart": {"interval_s": True, "targets": False},
    # Maintenance mode for `target` (`dvs host evacuate`); `anti`: VMs under an anti-affinity
    # rule added when the workload starts (they must be on distinct hosts then).
    "evacuate": {"target": True, "max_concurrent": False, "anti": False},
}
_EXPECT = {
    "p": "a probability in [0, 1]",
    "ms": "a delay in ms in [0, 60000]",
    "target": "h1..hN, \"controller\" or \"random\"",
    "interval_s": "seconds between two restarts",
}


# ---------------------------------------------------------------------- data


@dataclass(frozen=True)
class Storm:
    at_s: float
    count: int


@dataclass(frozen=True)
class Fault:
    index: int  # position in the file's [[faults]] list (0-based)
    at_s: float
    kind: str
    for_s: float | None
    params: dict


@dataclass(frozen=True)
class Scenario:
    path: str
    name: str
    description: str
    hosts: int
    vms: int
    agent: dict
    controller: dict
    duration_s: float
    move_rate_per_s: float
    hot_vms_fraction: float
    hot_moves_fraction: float
    storms: tuple[Storm, ...]
    avoid_down_hosts: bool
    faults: tuple[Fault, ...]
    settle_s: float
    keep_down: tuple[str, ...]

    @property
    def host_names(self) -> list[str]:
        return [f"h{i}" for i in range(1, self.hosts + 1)]

    @property
    def vm_names(self) -> list[str]:
        return [f"vm{i}" for i in range(1, self.vms + 1)]

    def agent_args(self) -> list[str]:
        out: list[str] = []
        for k, v in self.agent.items():
            flag = "--" + k.replace("_", "-")
            if isinstance(v, bool):
                out += [flag] if v else []
            else:
                out += [flag, str(v)]
        return out

    def controller_args(self) -> list[str]:
        out: list[str] = []
        for k, v in self.controller.items():
            out += ["--" + k.replace("_", "-"), str(v)]
        return out

    @property
    def op_timeout_ms(self) -> int:
        return int(self.controller.get("op_timeout_ms", ControllerConfig.op_timeout_ms))

    @property
    def dead_after_ms(self) -> int:
        return int(self.controller.get("dead_after_ms", ControllerConfig.dead_after_ms))

    def to_json(self) -> dict:
        d = asdict(self)
        d["storms"] = [asdict(s) for s in self.storms]
        d["faults"] = [asdict(f) for f in self.faults]
        d["keep_down"] = list(self.keep_down)
        return d


@dataclass(frozen=True)
class PlannedMove:
    t_s: float
    vm: str
    dst_index: int  # index into the host list; shifted at run time if it is the VM's own host
    storm: bool = False


@dataclass(frozen=True)
class Action:
    """One thing the nemesis does at `t_s`. kind: net | heal | kill | pause | resume | restart | evacuate."""

    t_s: float
    kind: str
    fault: int  # index of the [[faults]] entry it comes from
    label: str  # e.g. "partition halves", "loss 0.3", "kill h3"
    target: str | None = None  # process faults: h1..hN or "controller"
    settings: dict = field(default_factory=dict)  # net: host -> agent `faults` call arguments
    ends: int | None = None  # a heal/restart/resume that ends the interval opened by fault N


@dataclass(frozen=True)
class Plan:
    seed: int
    moves: tuple[PlannedMove, ...]
    actions: tuple[Action, ...]
    hot_vms: tuple[str, ...]

    def to_json(self) -> dict:
        return {"seed": self.seed, "hot_vms": list(self.hot_vms),
                "moves": [[m.t_s, m.vm, m.dst_index, m.storm] for m in self.moves],
                "actions": [asdict(a) for a in self.actions]}


# ---------------------------------------------------------------------- validation helpers


class _V:
    """Validation with one-line errors: `<file>: <field>: expected <what>, got <value>`."""

    def __init__(self, path: str) -> None:
        self.path = path

    def fail(self, where: str, expected: str, got=None, *, has_got: bool = True) -> None:
        tail = f", got {_show(got)}" if has_got else ""
        raise ClusterError(f"{self.path}: {where}: expected {expected}{tail}")

    def table(self, d: dict, where: str, known: set[str]) -> None:
        if not isinstance(d, dict):
            self.fail(where, "a table", d)
        unknown = sorted(set(d) - known)
        if unknown:
            prefix = f"{where}." if where else ""
            self.fail(f"{prefix}{unknown[0]}", f"one of the known keys ({', '.join(sorted(known))})",
                      has_got=False)

    def req(self, d: dict, key: str, where: str, expected: str):
        if key not in d:
            raise ClusterError(f"{self.path}: {where}{key}: missing; expected {expected}")
        return d[key]

    def int_(self, v, where: str, lo: int, hi: int) -> int:
        if type(v) is not int or not lo <= v <= hi:
            self.fail(where, f"an integer in [{lo}, {hi}]", v)
        return v

    def num(self, v, where: str, lo: float, hi: float, *, lo_open: bool = False) -> float:
        ok = type(v) in (int, float) and math.isfinite(v) and (lo < v if lo_open else lo <= v) and v <= hi
        if not ok:
            self.fail(where, f"a number in {'(' if lo_open else '['}{lo:g}, {hi:g}]", v)
        return float(v)

    def bool_(self, v, where: str) -> bool:
        if type(v) is not bool:
            self.fail(where, "true or false", v)
        return v

    def str_(self, v, where: str, choices: tuple[str, ...] | None = None) -> str:
        if not isinstance(v, str) or (choices is not None and v not in choices):
            self.fail(where, f"one of {', '.join(choices)}" if choices else "a string", v)
        return v

    def str_list(self, v, where: str, choices: list[str] | tuple[str, ...], *, min_len: int = 1) -> list[str]:
        if not isinstance(v, list) or len(v) < min_len or not all(isinstance(x, str) for x in v):
            self.fail(where, f"a list of at least {min_len} names", v)
        for i, x in enumerate(v):
            if x not in choices:
                self.fail(f"{where}[{i}]", f"one of {_choices(choices)}", x)
        if len(set(v)) != len(v):
            self.fail(where, "names without repeats", v)
        return list(v)


def _choices(choices) -> str:
    choices = list(choices)
    if len(choices) > 8:
        return ", ".join(choices[:3]) + ", ..., " + ", ".join(choices[-3:])
    return ", ".join(choices)


def _show(v) -> str:
    if isinstance(v, dict):
        return "a table"
    text = repr(v)
    return text if len(text) <= 60 else text[:57] + "..."


# ---------------------------------------------------------------------- loading


def load_scenario(path: str | Path) -> Scenario:
    """Read and validate a scenario file; any problem is one ClusterError line."""
    p = Path(path)
    where = str(path)
    try:
        raw = p.read_bytes()
    except FileNotFoundError:
        raise ClusterError(f"{where}: no such scenario file") from None
    except OSError as e:
        raise ClusterError(f"{where}: cannot read it ({e.strerror})") from None
    try:
        data = tomllib.loads(raw.decode("utf-8"))
    except UnicodeDecodeError:
        raise ClusterError(f"{where}: not UTF-8 text; a scenario is a TOML file") from None
    except tomllib.TOMLDecodeError as e:
        raise ClusterError(f"{where}: not valid TOML: {e}") from None
    return parse_scenario(data, where, default_name=p.stem)


def parse_scenario(data: dict, where: str = "<scenario>", default_name: str = "scenario") -> Scenario:
    v = _V(where)
    v.table(data, "", {"name", "description", "cluster", "agent", "controller", "workload", "faults", "end"})
    name = v.str_(data.get("name", default_name), "name")
    description = v.str_(data.get("description", ""), "description")

    cluster = v.req(data, "cluster", "", "a [cluster] table with hosts and vms")
    v.table(cluster, "cluster", {"hosts", "vms"})
    hosts = v.int_(v.req(cluster, "hosts", "cluster.", f"an integer in [2, {MAX_HOSTS}]"), "cluster.hosts", 2, MAX_HOSTS)
    vms = v.int_(v.req(cluster, "vms", "cluster.", f"an integer in [1, {MAX_VMS}]"), "cluster.vms", 1, MAX_VMS)
    host_names = [f"h{i}" for i in range(1, hosts + 1)]

    agent = _settings(v, data.get("agent", {}), "agent", AgentConfig)
    controller = _settings(v, data.get("controller", {}), "controller", ControllerConfig)

    wl = v.req(data, "workload", "", "a [workload] table with at least duration_s")
    v.table(wl, "workload", {"duration_s", "move_rate_per_s", "hot_vms_fraction", "hot_moves_fraction", "storms",
                             "avoid_down_hosts"})
    duration_s = v.num(v.req(wl, "duration_s", "workload.", "seconds"), "workload.duration_s", 0, MAX_DURATION_S, lo_open=True)
    rate = v.num(wl.get("move_rate_per_s", 0.0), "workload.move_rate_per_s", 0, 200)
    hot = v.num(wl.get("hot_vms_fraction", 0.0), "workload.hot_vms_fraction", 0, 1)
    hot_moves = v.num(wl.get("hot_moves_fraction", 0.8 if hot else 0.0), "workload.hot_moves_fraction", 0, 1)
    if hot_moves and not hot:
        v.fail("workload.hot_moves_fraction", "0 unless workload.hot_vms_fraction > 0", hot_moves)
    avoid = v.bool_(wl.get("avoid_down_hosts", True), "workload.avoid_down_hosts")
    storms_raw = wl.get("storms", [])
    if not isinstance(storms_raw, list):
        v.fail("workload.storms", "a list of {at_s = S, count = N} tables", storms_raw)
    storms = []
    for i, s in enumerate(storms_raw):
        w = f"workload.storms[{i}]"
        v.table(s, w, {"at_s", "count"})
        at = v.num(v.req(s, "at_s", w + ".", "seconds since the workload started"), w + ".at_s", 0, duration_s)
        storms.append(Storm(at, v.int_(v.req(s, "count", w + ".", "how many moves at once"), w + ".count", 1, 10_000)))
    if hosts < 2 and (rate or storms):
        v.fail("cluster.hosts", "at least 2 hosts for a workload that moves VMs", hosts)

    faults_raw = data.get("faults", [])
    if not isinstance(faults_raw, list):
        v.fail("faults", "an array of tables ([[faults]] entries)", faults_raw)
    faults = tuple(_fault(v, f, i, duration_s, host_names) for i, f in enumerate(faults_raw))

    end = data.get("end", {})
    v.table(end, "end", {"settle_s", "keep_down"})
    settle_s = v.num(end.get("settle_s", 20.0), "end.settle_s", 1, 600)
    keep_down = tuple(v.str_list(end.get("keep_down", []), "end.keep_down", host_names, min_len=0))

    sc = Scenario(where, name, description, hosts, vms, agent, controller, duration_s, rate, hot, hot_moves,
                  tuple(storms), avoid, faults, settle_s, keep_down)
    # The schedule must make sense process by process (e.g. no resume of a process that is
    # not paused): walking it once with any seed finds every such mistake.
    _walk(sc, random.Random(0), v)
    return sc


def _settings(v: _V, d, where: str, cls) -> dict:
    if not isinstance(d, dict):
        v.fail(where, "a table", d)
    known = {f.name: f for f in fields(cls)}
    out = {}
    for k, val in d.items():
        if k not in known:
            v.fail(f"{where}.{k}", f"a {cls.__name__} field ({_choices(sorted(known))})", has_got=False)
        default = known[k].default
        if isinstance(default, bool):
            out[k] = v.bool_(val, f"{where}.{k}")
        else:
            out[k] = v.int_(val, f"{where}.{k}", 0, 10**9)
    return out


def _fault(v: _V, f, i: int, duration_s: float, hosts: list[str]) -> Fault:
    w = f"faults[{i}]"
    if not isinstance(f, dict):
        v.fail(w, "a table ([[faults]] entry)", f)
    kind = v.str_(v.req(f, "kind", w + ".", f"one of {', '.join(KINDS)}"), w + ".kind", KINDS)
    v.table(f, w, {"at_s", "kind", "for_s", *_PARAMS[kind]})
    for key, required in _PARAMS[kind].items():
        if required:
            v.req(f, key, w + ".", _EXPECT[key])
    at = v.num(v.req(f, "at_s", w + ".", "seconds since the workload started"), w + ".at_s", 0, duration_s)
    for_s = None
    if "for_s" in f:
        if kind not in FOR_S_KINDS:
            v.fail(w + ".for_s", f"no for_s on a {kind} (only on {', '.join(FOR_S_KINDS)})", has_got=False)
        for_s = v.num(f["for_s"], w + ".for_s", 0, duration_s, lo_open=True)
        if at + for_s > duration_s + 1e-9:
            v.fail(w + ".for_s", f"at_s + for_s <= workload.duration_s ({duration_s:g})", for_s)
    targets = [*hosts, CONTROLLER, RANDOM]
    params: dict = {}
    if kind == "partition":
        named, groups = f.get("named"), f.get("groups")
        if (named is None) == (groups is None):
            v.fail(w, "exactly one of named = \"...\" or groups = [[...], ...]", has_got=False)
        if named is not None:
            params["named"] = v.str_(named, w + ".named", NAMED_PARTITIONS)
            if params["named"] == "isolate":
                params["host"] = v.str_(v.req(f, "host", w + ".", "the host to isolate (h1..hN or \"random\")"), w + ".host", (*hosts, RANDOM))
            elif "host" in f:
                v.fail(w + ".host", "no host except for named = \"isolate\"", has_got=False)
            if params["named"] == "bridge" and len(hosts) < 3:
                v.fail(w + ".named", "a partition that fits 2 hosts (bridge needs 3)", named)
        else:
            if "host" in f:
                v.fail(w + ".host", "no host with groups (name the hosts in the groups)", has_got=False)
            if not isinstance(groups, list) or not groups:
                v.fail(w + ".groups", "a list of host lists, e.g. [[\"h1\", \"h2\"], [\"h3\", \"controller\"]]",
                       groups)
            seen: set[str] = set()
            out = []
            for j, g in enumerate(groups):
                g = v.str_list(g, f"{w}.groups[{j}]", [*hosts, CONTROLLER])
                for h in g:
                    if h in seen:
                        v.fail(f"{w}.groups[{j}]", f"each host in one group only ({h} is in two)", has_got=False)
                    seen.add(h)
                out.append(g)
            rest = [h for h in hosts if h not in seen]
            n_groups = len({j for j, g in enumerate(out) for h in g if h != CONTROLLER}) + (1 if rest else 0)
            if n_groups < 2 and CONTROLLER not in seen:
                v.fail(w + ".groups", "at least two groups of hosts (or \"controller\" in a group)", groups)
            params["groups"] = out
    elif kind in NET_KINDS:
        if kind == "delay":
            params["ms"] = v.num(f["ms"], w + ".ms", 0, 60_000)
            params["jitter_ms"] = v.num(f.get("jitter_ms", 0), w + ".jitter_ms", 0, 60_000)
        else:
            params["p"] = v.num(f["p"], w + ".p", 0, 1)
        if "hosts" in f:
            params["hosts"] = v.str_list(f["hosts"], w + ".hosts", hosts)
        if "from" in f:
            params["from"] = v.str_list(f["from"], w + ".from", [*hosts, CONTROLLER])
        if "types" in f:
            params["types"] = v.str_list(f["types"], w + ".types", [t.name for t in MsgType])
    elif kind in PROC_KINDS:
        params["target"] = v.str_(f["target"], w + ".target", tuple(targets))
        if kind == "resume" and params["target"] == RANDOM:
            v.fail(w + ".target", "a named process (resume \"random\" is ambiguous; use for_s on the pause)",
                   RANDOM)
    elif kind == "evacuate":
        params["target"] = v.str_(f["target"], w + ".target", tuple(hosts))
        params["max_concurrent"] = v.int_(f.get("max_concurrent", 4), w + ".max_concurrent", 1, 64)
        if "anti" in f:
            anti = f["anti"]
            if not isinstance(anti, list) or len(anti) < 2 or not all(isinstance(x, str) for x in anti):
                v.fail(w + ".anti", "a list of at least 2 VM names", anti)
            params["anti"] = list(anti)
    elif kind == "rolling-restart":
        params["interval_s"] = v.num(f["interval_s"], w + ".interval_s", 0, duration_s, lo_open=True)
        params["targets"] = v.str_list(f.get("targets", list(hosts)), w + ".targets", [*hosts, CONTROLLER])
        last = at + params["interval_s"] * (len(params["targets"]) - 1)
        if last > duration_s + 1e-9:
            v.fail(w + ".interval_s", f"the last restart (at {last:g} s) within workload.duration_s "
                                      f"({duration_s:g})", params["interval_s"])
    return Fault(i, at, kind, for_s, params)


# ---------------------------------------------------------------------- the plan


@dataclass
class _Raw:
    t_s: float
    order: int
    kind: str  # net | heal | kill | pause | resume | restart
    fault: Fault
    target: str | None = None
    parent: int | None = None  # follow-up (end of a for_s) of the raw action at this position
    label: str = ""


def _expand(sc: Scenario) -> list[_Raw]:
    raws: list[_Raw] = []

    def add(r: _Raw) -> int:
        r.order = len(raws)
        raws.append(r)
        return r.order

    for f in sc.faults:
        p = f.params
        if f.kind in ("partition", *NET_KINDS):
            i = add(_Raw(f.at_s, 0, "net", f))
            if f.for_s is not None:
                add(_Raw(f.at_s + f.for_s, 0, "heal", f, parent=i))
        elif f.kind == "heal":
            add(_Raw(f.at_s, 0, "heal", f))
        elif f.kind in PROC_KINDS:
            i = add(_Raw(f.at_s, 0, f.kind, f, target=p["target"]))
            if f.for_s is not None:
                add(_Raw(f.at_s + f.for_s, 0, "restart" if f.kind == "kill" else "resume", f, parent=i))
        elif f.kind == "evacuate":
            add(_Raw(f.at_s, 0, "evacuate", f, target=p["target"]))
        elif f.kind == "rolling-restart":
            for j, t in enumerate(p["targets"]):
                add(_Raw(f.at_s + j * p["interval_s"], 0, "restart", f, target=t))
    # Stable: at equal times, file order (a follow-up after what it follows).
    return sorted(raws, key=lambda r: (round(r.t_s, 9), r.order))


def _walk(sc: Scenario, rng: random.Random, v: _V | None = None) -> list[Action]:
    """Resolve random choices in time order against the simulated process states, and check
    that every process fault makes sense when it happens."""
    from testbed import nemesis

    v = v or _V(sc.path)
    hosts = sc.host_names
    state = dict.fromkeys([*hosts, CONTROLLER], "up")  # up | paused | down
    resolved: dict[int, str] = {}
    opened: dict[int, int] = {}  # raw order -> fault index it opened (for `ends`)
    actions: list[Action] = []
    for r in _expand(sc):
        f = r.fault
        w = f"faults[{f.index}]"
        if r.kind == "net":
            p = f.params
            if f.kind == "partition":
                host = p.get("host")
                if host == RANDOM:
                    host = rng.choice(hosts)
                try:
                    if "named" in p:
                        blocked = nemesis.named_partition(p["named"], hosts, host)
                        label = f"partition {p['named']}" + (f" {host}" if host else "")
                    else:
                        blocked = nemesis.groups_to_blocked(hosts, p["groups"])
                        label = "partition " + " | ".join(",".join(g) for g in p["groups"])
                except ClusterError as e:
                    raise ClusterError(f"{sc.path}: {w}: {e}") from None
                settings = {h: {"blocked": sorted(b)} for h, b in blocked.items() if b}
            else:
                rule: dict = {"id": f"faults[{f.index}]", "kind": f.kind}
                if f.kind == "delay":
                    rule["delay_ms"], rule["jitter_ms"] = p["ms"], p["jitter_ms"]
                    label = f"delay {p['ms']:g}+{p['jitter_ms']:g} ms"
                else:
                    rule["p"] = p["p"]
                    label = f"{f.kind} {p['p']:g}"
                rule["from"] = p.get("from")
                rule["types"] = p.get("types")
                on = p.get("hosts", hosts)
                if "hosts" in p:
                    label += " on " + ",".join(on)
                settings = {h: {"add": [dict(rule)]} for h in on}
            for h in sorted(settings):
                settings[h]["seed"] = rng.getrandbits(31)
            actions.append(Action(r.t_s, "net", f.index, label, settings=settings))
            opened[r.order] = f.index
        elif r.kind == "evacuate":
            actions.append(Action(r.t_s, "evacuate", f.index, f"evacuate {r.target}", target=r.target,
                                  settings={"max_concurrent": f.params["max_concurrent"]}))
        elif r.kind == "heal":
            label = "heal" if r.parent is None else f"heal ({actions_label(actions, f.index)})"
            actions.append(Action(r.t_s, "heal", f.index, label, ends=None if r.parent is None else f.index))
        else:
            target = r.target if r.parent is None else resolved[r.parent]
            if target == RANDOM:
                want = "paused" if r.kind == "resume" else None
                cands = [h for h in hosts if (state[h] == want if want else state[h] == "up")]
                if not cands:
                    raise ClusterError(f"{sc.path}: {w}.target: expected a running agent to pick at random at "
                                       f"{r.t_s:g} s, but none is running")
                target = rng.choice(cands)
            resolved[r.order] = target
            st = state[target]
            if r.kind == "kill" and st == "down":
                v.fail(w, f"{target} running at {r.t_s:g} s to kill it (it is down then)", has_got=False)
            if r.kind == "pause" and st != "up":
                v.fail(w, f"{target} running at {r.t_s:g} s to pause it (it is {st} then)", has_got=False)
            if r.kind == "resume" and st != "paused":
                v.fail(w, f"{target} paused at {r.t_s:g} s to resume it (it is {st} then)", has_got=False)
            state[target] = {"kill": "down", "pause": "paused", "resume": "up", "restart": "up"}[r.kind]
            ends = f.index if r.parent is not None else None
            actions.append(Action(r.t_s, r.kind, f.index, f"{r.kind} {target}", target=target, ends=ends))
    for h in sc.keep_down:
        if state[h] != "down":
            v.fail("end.keep_down", f"only processes the schedule leaves killed ({h} is {state[h]} at the end)",
                   has_got=False)
    return actions


def actions_label(actions: list[Action], fault: int) -> str:
    for a in reversed(actions):
        if a.fault == fault and a.kind == "net":
            return a.label
    return f"faults[{fault}]"


def build_plan(sc: Scenario, seed: int) -> Plan:
    """The run's schedule: a pure function of (scenario, seed)."""
    base = random.Random(seed)
    fault_rng = random.Random(base.getrandbits(64))
    work_rng = random.Random(base.getrandbits(64))
    actions = _walk(sc, fault_rng)
    vms = sc.vm_names
    hot: list[str] = []
    if sc.hot_vms_fraction > 0:
        hot = sorted(work_rng.sample(vms, max(1, round(sc.hot_vms_fraction * len(vms)))),
                     key=lambda n: int(n[2:]))
    moves: list[PlannedMove] = []
    if sc.move_rate_per_s > 0:
        n = int(sc.duration_s * sc.move_rate_per_s)
        for k in range(n):
            t = (k + 0.5) / sc.move_rate_per_s
            if t >= sc.duration_s:
                break
            pool = hot if hot and work_rng.random() < sc.hot_moves_fraction else vms
            moves.append(PlannedMove(round(t, 6), work_rng.choice(pool), work_rng.randrange(sc.hosts)))
    for s in sc.storms:
        for vm in work_rng.sample(vms, min(s.count, len(vms))):
            moves.append(PlannedMove(s.at_s, vm, work_rng.randrange(sc.hosts), storm=True))
    moves.sort(key=lambda m: m.t_s)
    return Plan(seed, tuple(moves), tuple(actions), tuple(hot))
