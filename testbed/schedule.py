"""The one fault schedule: a list of timed faults, with one set of names and units.

A `TimedFault` is one thing that happens to the cluster at `at_ms`, milliseconds after the
workload starts (the first VM move is sent): real milliseconds on real processes, virtual
ones in the simulator. Its `kind` is one of KINDS, its `targets` name processes the same way
everywhere (agents `h1..hN`, the controller `controller`; the simulator's old spec strings
say `ctl`, which `name()` maps onto `controller`), and `params` holds the rest, units last in
the names (`p`, `delay_ms`, `jitter_ms`, `max_concurrent`, `groups`, `blocked`).

Three producers build it: a chaos scenario and its seed (`from_plan`, after `random` targets
are drawn), the `dvs sim` shorthands `--loss`, `--dup`, `--reorder`, `--partitions` and
`--crashes` (`from_sim_flags`), and
`dvs fault` verbs (`from_verb`). Two interpreters read it: the chaos runner's nemesis on real
processes, and the simulator's network and cluster (testbed/sim/faults.py).

Every fault is resolved: no `random`, no durations. A fault that lasts (`for_s` in a scenario)
is two entries, its start and the entry that ends it (`ends` = the [[faults]] index it ends).
"""

from __future__ import annotations

from dataclasses import dataclass, field

CONTROLLER = "controller"
SIM_CONTROLLER = "ctl"  # the simulator's spec strings (`--crashes ctl@1000-2500`)

NET_KINDS = ("loss", "dup", "reorder", "delay")
PROC_KINDS = ("kill", "restart", "pause", "resume")
KINDS = ("partition", "heal", *NET_KINDS, *PROC_KINDS, "evacuate")


def name(process: str) -> str:
    """One name for each process: `ctl` (the simulator's spelling) is the controller."""
    return CONTROLLER if process == SIM_CONTROLLER else process


@dataclass(frozen=True)
class TimedFault:
    at_ms: int  # ms after the workload starts (real or virtual)
    kind: str  # one of KINDS
    targets: tuple[str, ...] = ()  # processes it acts on (h1..hN, "controller"); network kinds: the receivers
    params: dict = field(default_factory=dict, compare=True, hash=False)
    fault: int | None = None  # index of the scenario's [[faults]] entry it comes from
    ends: int | None = None  # a heal / restart / resume that ends the interval opened by that entry
    label: str = ""

    def to_json(self) -> dict:
        return {"at_ms": self.at_ms, "kind": self.kind, "targets": list(self.targets), "params": self.params,
                "fault": self.fault, "ends": self.ends, "label": self.label or self.kind}


def to_json(schedule: tuple[TimedFault, ...] | list[TimedFault]) -> list[dict]:
    return [f.to_json() for f in schedule]


def _ms(t_s: float) -> int:
    return round(t_s * 1000)


def from_plan(sc, plan) -> tuple[TimedFault, ...]:
    """The schedule of a chaos scenario and seed (testbed/chaos/scenario.py's Plan, whose actions
    the real nemesis runs): one entry per action, in the same order, with the same targets."""
    out = []
    faults = {f.index: f for f in sc.faults}
    for a in plan.actions:
        f = faults[a.fault]
        if a.kind == "net":
            if f.kind == "partition":
                params = {"blocked": {h: sorted(s["blocked"]) for h, s in sorted(a.settings.items())},
                          "seeds": {h: s["seed"] for h, s in sorted(a.settings.items())}}
                groups = _groups_of(sc.host_names, params["blocked"])
                if groups is not None:
                    params["groups"] = groups
                out.append(TimedFault(_ms(a.t_s), "partition", (), params, a.fault, None, a.label))
            else:
                p = f.params
                params = {k: p[k] for k in ("p", "from", "types") if p.get(k) is not None}
                if f.kind == "delay":
                    params = {"delay_ms": p["ms"], "jitter_ms": p["jitter_ms"],
                              **{k: p[k] for k in ("from", "types") if p.get(k) is not None}}
                params["seeds"] = {h: s["seed"] for h, s in sorted(a.settings.items())}
                out.append(TimedFault(_ms(a.t_s), f.kind, tuple(a.settings), params, a.fault, None, a.label))
        elif a.kind == "heal":
            out.append(TimedFault(_ms(a.t_s), "heal", (), {}, a.fault, a.ends, a.label))
        elif a.kind == "evacuate":
            params = {"max_concurrent": a.settings["max_concurrent"]}
            if "anti" in f.params:
                params["anti"] = list(f.params["anti"])
            out.append(TimedFault(_ms(a.t_s), "evacuate", (a.target,), params, a.fault, None, a.label))
        else:
            out.append(TimedFault(_ms(a.t_s), a.kind, (a.target,), {}, a.fault, a.ends, a.label))
    return tuple(out)


def agent_settings(tf: TimedFault) -> dict[str, dict]:
    """What the real nemesis sends each agent for a network fault (its `faults` call: host ->
    arguments), the seed of that agent's fault RNG included."""
    p = tf.params
    seeds = p.get("seeds", {})
    if tf.kind == "partition":
        return {h: {"blocked": list(cut), "seed": seeds.get(h, 0)} for h, cut in p["blocked"].items() if cut}
    rule: dict = {"id": f"faults[{tf.fault}]", "kind": tf.kind}
    if tf.kind == "delay":
        rule["delay_ms"], rule["jitter_ms"] = p["delay_ms"], p["jitter_ms"]
    else:
        rule["p"] = p["p"]
    rule["from"] = p.get("from")
    rule["types"] = p.get("types")
    return {h: {"add": [dict(rule)], "seed": seeds.get(h, 0)} for h in tf.targets}


def _order(h: str) -> tuple[int, int]:
    return (1, 0) if h == CONTROLLER else (0, int(h[1:]))


def _groups_of(hosts: list[str], blocked: dict[str, list[str]]) -> list[list[str]] | None:
    """The partition as disjoint groups (the controller in one, or in none: it reaches all), or
    None when it is not one (a bridge host that reaches both sides)."""
    cut = {h: set(blocked.get(h, ())) for h in hosts}
    reach = {h: {x for x in [*hosts, CONTROLLER] if x != h and x not in cut[h]} for h in hosts}
    groups: list[set[str]] = []
    for h in hosts:
        side = {h} | {x for x in reach[h] if x != CONTROLLER}
        if any(h in g for g in groups):
            continue
        # Transitive: everyone on h's side reaches exactly h's side.
        for x in side:
            if ({x} | {y for y in reach[x] if y != CONTROLLER}) != side:
                return None
        groups.append(side)
    lost_ctl = {h for h in hosts if CONTROLLER in cut[h]}
    if lost_ctl:
        with_ctl = [g for g in groups if not g & lost_ctl]
        if len(with_ctl) > 1 or any(g & lost_ctl and g - lost_ctl for g in groups):
            return None
        if with_ctl:
            with_ctl[0].add(CONTROLLER)
        else:
            groups.append({CONTROLLER})
    return [sorted(g, key=_order) for g in groups]


def from_sim_flags(partitions, crashes, net=None, hosts: list[str] | tuple[str, ...] = ()) -> tuple[TimedFault, ...]:
    """The schedule `dvs sim --loss ... --dup ... --reorder --partitions ... --crashes ...` stands
    for (testbed/sim/spec.py, NetConfig `net` of a run on `hosts`), in the order the simulator
    lays it out: the whole-window rules, each partition and its heal, then each crash and its
    restart.

    --loss/--dup/--reorder are rules on every host at 0 ms with no end entry: they last while
    the fault window is open, and its close is the run's final heal (as the chaos runner heals
    at the end of a workload). They act on what the agents receive from each other (`from`:
    every host), and from the controller too with --ctl-faults (no `from`); --reorder's `p` is
    --reorder-prob. `window` marks them: a timed rule of the same kind on every host takes the
    place of one while it is in force, and after its heal the window's is back (as the flags
    always did beside a scenario's faults)."""
    out = []
    if net is not None:
        peers = {} if net.ctl_faults else {"from": list(hosts)}
        for kind, p, flag in (("loss", net.loss, f"--loss {net.loss:g}"), ("dup", net.dup, f"--dup {net.dup:g}"),
                              ("reorder", net.reorder_prob if net.reorder else 0.0, "--reorder")):
            if p:
                out.append(TimedFault(0, kind, (), {"p": p, **peers, "window": True}, None, None, flag))
    for i, p in enumerate(partitions):  # (fault indexes count the partitions and crashes only)
        groups = [[name(h) for h in g] for g in p.groups]
        out.append(TimedFault(p.start_ms, "partition", (), {"groups": groups}, i, None, f"partition {p.spec()}"))
        out.append(TimedFault(p.end_ms, "heal", (), {}, i, i, f"heal {p.spec()}"))
    for j, c in enumerate(crashes, start=len(partitions)):
        who = name(c.host)
        out.append(TimedFault(c.at_ms, "kill", (who,), {}, j, None, f"kill {who}"))
        if c.restart_ms is not None:
            out.append(TimedFault(c.restart_ms, "restart", (who,), {}, j, j, f"restart {who}"))
    return tuple(out)


def from_verb(kind: str, targets: list[str] | tuple[str, ...] = (), label: str | None = None, **params) -> TimedFault:
    """What one `dvs fault` verb does, now (at_ms 0): e.g. from_verb("kill", ["h3"]); the
    nemesis (testbed/nemesis.py apply) does it."""
    if kind not in KINDS:
        raise ValueError(f"unknown fault kind {kind!r} (one of {', '.join(KINDS)})")
    ts = tuple(name(t) for t in targets)
    return TimedFault(0, kind, ts, dict(params), None, None, label or " ".join([kind, *ts]))
