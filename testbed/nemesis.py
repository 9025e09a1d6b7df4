"""The nemesis: faults applied to a running cluster, at the real boundary where there is one.

Process faults are real signals to recorded pids. Network faults are rules of one model
(agent/faults.py `Rule`: one kind, its own hosts, peers and message types, an id `fN`):
in --netns mode they become kernel rules (testbed/kernfaults.py: nftables in each host's
namespace, partitions on the lab bridge, netem where the kernel has it); without namespaces,
or for what the kernel cannot do when asked with `in_agent`, each agent's transport wrapper
applies them. The faults in force are recorded in STATE_DIR/faults.json so `dvs fault show`
can say what each one is, where it is enforced, and which earlier one it replaced.
Partitions are computed here as data: for each agent, the set of hosts (and maybe
"controller") it must neither hear nor reach."""

from __future__ import annotations

import json
import os
import signal

from agent.faults import CONTROLLER, Rule, parse_rule
from dvswitch.naming import host_order
from testbed import procs
from testbed.client import ClusterError
from testbed.cluster import Cluster
from testbed.procs import Proc

FAULTS_FILE = "faults.json"
KERNEL, AGENT = "kernel", "agent"
REST = ("group", "isolated")


def _order(hosts) -> list[str]:
    return sorted(hosts, key=host_order)


def groups_to_blocked(hosts: list[str], groups: list[list[str]], rest: str | int | None = "group",
                      ) -> dict[str, set[str]]:
    """Hosts in different groups cannot talk. "controller" may sit in a group; if it does,
    agents outside that group lose it. Hosts named in no group (the rest) go where `rest` says:
    "group" (one more group of their own), "isolated" (each cut off from everyone), N (join the
    N-th group, 1-based), or None: refused, with an error that names them."""
    seen: dict[str, int] = {}
    for i, g in enumerate(groups):
        for h in g:
            if h != CONTROLLER and h not in hosts:
                raise ClusterError(f"unknown host {h!r} in partition (hosts: {', '.join(_order(hosts))})")
            if h in seen:
                raise ClusterError(f"host {h!r} is in two partition groups")
            seen[h] = i
    left = _order(h for h in hosts if h not in seen)
    if left:
        if rest is None:
            raise ClusterError(f"{', '.join(left)} in no group; say where they go: --rest group (one more "
                               f"group), --rest isolated (each alone) or --rest N (join group N)")
        if rest == "group":
            for h in left:
                seen[h] = len(groups)
        elif rest == "isolated":
            for k, h in enumerate(left):
                seen[h] = len(groups) + k
        elif isinstance(rest, int) and 1 <= rest <= len(groups):
            for h in left:
                seen[h] = rest - 1
        else:
            raise ClusterError(f"--rest must be group, isolated or a group number 1..{len(groups)}, got {rest!r}")
    if len({seen[h] for h in hosts}) < 2 and CONTROLLER not in seen:
        raise ClusterError("a partition needs at least two groups of hosts")
    blocked = {}
    for h in hosts:
        b = {o for o in hosts if seen[o] != seen[h]}
        if CONTROLLER in seen and seen[CONTROLLER] != seen[h]:
            b.add(CONTROLLER)
        blocked[h] = b
    return blocked


def named_partition(kind: str, hosts: list[str], arg: str | None = None) -> dict[str, set[str]]:
    """isolate H | halves | majority | bridge | controller."""
    hs = _order(hosts)
    if kind == "isolate":
        if not arg:
            raise ClusterError("isolate needs a host, e.g. `dvs fault isolate h3`")
        return groups_to_blocked(hosts, [[arg]])
    if len(hs) < 2 and kind != "controller":
        raise ClusterError(f"{kind} needs at least two hosts")
    if kind == "halves":
        return groups_to_blocked(hosts, [hs[: len(hs) // 2], hs[len(hs) // 2 :]])
    if kind == "majority":
        # The smallest minority that still leaves a strict majority: floor((n-1)/2) hosts.
        k = max(1, (len(hs) - 1) // 2)
        return groups_to_blocked(hosts, [hs[:k], hs[k:]])
    if kind == "bridge":
        if len(hs) < 3:
            raise ClusterError("bridge needs at least three hosts")
        mid = len(hs) // 2
        bridge, left, right = hs[mid], hs[:mid], hs[mid + 1 :]
        blocked = {h: set(right) for h in left} | {h: set(left) for h in right}
        blocked[bridge] = set()
        return blocked
    if kind == "controller":
        return {h: {CONTROLLER} for h in hosts}
    raise ClusterError(f"unknown partition {kind!r} (isolate, halves, majority, bridge, controller)")


def configure(cluster: Cluster, settings: dict[str, dict]) -> dict[str, dict]:
    """Send fault settings to agents; `settings` maps host -> faults call arguments."""
    out = {}
    for host, args in settings.items():
        with cluster.agent_client(host) as a:
            out[host] = a.call("faults", args)
    return out


def live_hosts(cluster: Cluster) -> list[str]:
    return [h for h, p in cluster.agents.items() if procs.alive(p)]


# ---------------------------------------------------------------------- the record of faults in force


def load_registry(cluster: Cluster) -> dict:
    """The faults in force on this cluster. A record left by an earlier cluster in the same state
    dir (another `started_at`) is not this one's: its faults died with it."""
    path = cluster.state_dir / FAULTS_FILE
    try:
        reg = json.loads(path.read_text())
        if (isinstance(reg, dict) and isinstance(reg.get("faults"), list) and isinstance(reg.get("next"), int)
                and reg.get("cluster_started_at") == cluster.started_at):
            return reg
    except FileNotFoundError:
        pass
    except (OSError, ValueError):
        pass  # damaged: start a new record (`dvs fault heal` resets the kernel and agents anyway)
    return {"next": 1, "faults": []}


def save_registry(cluster: Cluster, reg: dict) -> None:
    path = cluster.state_dir / FAULTS_FILE
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(reg | {"cluster_started_at": cluster.started_at}, indent=1))
    os.replace(tmp, path)


def boundary(cluster: Cluster) -> str:
    """Which boundary network faults use on this cluster, in words (for `dvs fault show`)."""
    if cluster.netns is None:
        return ("agent: each agent's transport wrapper (agent/faults.py); this cluster is not in --netns mode, "
                "so there is no kernel boundary between its hosts")
    from testbed.kernfaults import netem_missing

    netem = netem_missing()
    delay = f"delay: {netem}, so only --in-agent" if netem else "delay: tc netem on each host's bridge port"
    return ("kernel: loss and dup as nftables rules in each host's namespace, partitions on the lab bridge, "
            f"{delay}; agent wrapper only for faults added with --in-agent")


def _kernel(cluster: Cluster):
    from testbed.kernfaults import KernelFaults

    return KernelFaults.of(cluster)


def _rules_on(reg: dict, host: str, where: str) -> list[Rule]:
    return [parse_rule(f["rule"]) for f in reg["faults"]
            if f["kind"] != "partition" and f["boundary"] == where and host in f["hosts"]]


def check_hosts(cluster: Cluster, names: list[str] | None, what: str, *, controller: bool = False) -> None:
    for h in names or []:
        if h not in cluster.agents and not (controller and h == CONTROLLER):
            known = ", ".join(_order(cluster.agents)) + (", controller" if controller else "")
            raise ClusterError(f"unknown host {h!r} in {what} (known: {known})")


def add_fault(cluster: Cluster, kind: str, params: dict, *, hosts: list[str] | None = None,
              from_: list[str] | None = None, types: list[str] | None = None, in_agent: bool = False) -> dict:
    """Add one network fault (loss | delay | dup | reorder) on `hosts` (default: every host),
    for frames from `from_` (default: everyone) of `types` (default: all). Everything is
    checked before anything is applied; if applying fails on one host, the hosts already done
    are put back. A fault of the same kind with the same peers and types on the same host
    (and the same boundary) is replaced, and the record says so. Returns the fault's record."""
    reg = load_registry(cluster)
    fid = f"f{reg['next']}"
    check_hosts(cluster, hosts, "--hosts")
    check_hosts(cluster, from_, "--from", controller=True)
    try:
        rule = parse_rule({"id": fid, "kind": kind, **params, "from": from_, "types": types})
    except ValueError as e:
        raise ClusterError(str(e)) from None
    where, why = AGENT, None
    if cluster.netns is not None:
        if in_agent:
            why = "asked for with --in-agent"
        else:
            from testbed.kernfaults import netem_missing, unsupported

            reason = unsupported(rule, netem_missing() if kind == "delay" else None)
            if reason:
                raise ClusterError(f"{kind} in --netns mode: {reason}; add --in-agent to apply it in the agents' "
                                   f"transport wrapper instead")
            where = KERNEL
    on = list(hosts) if hosts else (list(cluster.agents) if where == KERNEL else live_hosts(cluster))
    if where == AGENT:
        down = [h for h in on if not procs.alive(cluster.agent(h))]
        if down:
            raise ClusterError(f"{', '.join(down)} not running: an agent-level fault needs the agent; "
                               f"`dvs fault restart {down[0]}` starts it")
    rec = {"id": fid, "kind": kind, "rule": rule.to_json(), "hosts": on, "boundary": where, "why_agent": why,
           "replaced": []}
    new_reg = {"next": reg["next"] + 1, "faults": []}
    gone: dict[str, list[dict]] = {}  # host -> replaced rules (JSON) there
    for old in reg["faults"]:
        old = dict(old)
        same = (old["kind"] == kind and old["boundary"] == where and old["rule"]["from"] == rule.to_json()["from"]
                and old["rule"]["types"] == rule.to_json()["types"])
        overlap = [h for h in old["hosts"] if h in on] if same else []
        if overlap:
            rec["replaced"].append({"id": old["id"], "hosts": overlap, "rule": old["rule"]})
            for h in overlap:
                gone.setdefault(h, []).append(old["rule"])
            old["hosts"] = [h for h in old["hosts"] if h not in on]
        if old["hosts"] or old["kind"] == "partition":
            new_reg["faults"].append(old)
    new_reg["faults"].append(rec)
    done: list[str] = []

    def undo(h: str, client=None) -> None:
        """Put back what hN had. On the connection the failed request went out on, the undo queues
        behind it, so an agent that answers late (paused) still ends with what it had."""
        try:
            if where == KERNEL:
                _kernel(cluster).apply_host(h, _rules_on(reg, h, KERNEL))
            elif client is not None:
                client.call("faults", {"remove": [fid], "add": gone.get(h, [])}, timeout_ms=300)
            else:
                configure(cluster, {h: {"remove": [fid], "add": gone.get(h, [])}})
        except ClusterError:
            pass

    for h in on:
        try:
            if where == KERNEL:
                _kernel(cluster).apply_host(h, _rules_on(new_reg, h, KERNEL))
            else:
                with cluster.agent_client(h) as a:
                    try:
                        a.call("faults", {"add": [rule.to_json()], "remove": [r["id"] for r in gone.get(h, [])]})
                    except ClusterError:
                        undo(h, a)
                        raise
        except (ClusterError, OSError) as e:
            for d in done:  # never half applied
                undo(d)
            if where == KERNEL:
                undo(h)
            raise ClusterError(f"fault {kind} not applied (failed on {h}: {e}); nothing changed") from None
        done.append(h)
    save_registry(cluster, new_reg)
    return rec


def partition(cluster: Cluster, blocked: dict[str, set[str]], label: str = "") -> dict[str, dict]:
    """Cut hosts apart: with nftables between namespaces in --netns mode, else in each agent.
    A partition replaces the one in force (the record says so)."""
    reg = load_registry(cluster)
    if cluster.netns is not None:
        cluster.netns.apply_partition(blocked)
        out = {h: {"blocked": sorted(b), "by": "nftables"} for h, b in blocked.items()}
        where = KERNEL
    else:
        alive = set(live_hosts(cluster))
        out = configure(cluster, {h: {"blocked": sorted(b)} for h, b in blocked.items() if h in alive})
        where = AGENT
    old = [f for f in reg["faults"] if f["kind"] == "partition"]
    rec = {"id": f"f{reg['next']}", "kind": "partition", "label": label, "hosts": _order(h for h, b in blocked.items() if b),
           "blocked": {h: sorted(b) for h, b in blocked.items() if b}, "boundary": where, "why_agent": None,
           "replaced": [{"id": f["id"], "hosts": f["hosts"], "rule": {"label": f.get("label", "")}} for f in old]}
    reg = {"next": reg["next"] + 1, "faults": [f for f in reg["faults"] if f["kind"] != "partition"] + [rec]}
    save_registry(cluster, reg)
    return out


def heal(cluster: Cluster, ids: list[str] | None = None) -> dict[str, dict]:
    """Remove every network fault (or only the faults `ids`): kernel rules, netem, the bridge's
    partition rules and every agent's wrapper faults. Returns what each live agent reports."""
    reg = load_registry(cluster)
    if ids:
        known = {f["id"] for f in reg["faults"]}
        unknown = [i for i in ids if i not in known]
        if unknown:
            raise ClusterError(f"no fault {', '.join(unknown)} in force (in force: {', '.join(sorted(known)) or 'none'});"
                               f" `dvs fault show` lists them")
        drop = [f for f in reg["faults"] if f["id"] in ids]
        keep = {"next": reg["next"], "faults": [f for f in reg["faults"] if f["id"] not in ids]}
        out: dict[str, dict] = {}
        for f in drop:
            if f["kind"] == "partition":
                if f["boundary"] == KERNEL:
                    cluster.netns.apply_partition({})
                else:
                    out |= configure(cluster, {h: {"blocked": []} for h in live_hosts(cluster)})
            elif f["boundary"] == KERNEL:
                for h in f["hosts"]:
                    _kernel(cluster).apply_host(h, _rules_on(keep, h, KERNEL))
            else:
                alive = set(live_hosts(cluster))
                out |= configure(cluster, {h: {"remove": [f["id"]]} for h in f["hosts"] if h in alive})
        save_registry(cluster, keep)
        return out
    if cluster.netns is not None:
        cluster.netns.apply_partition({})
        _kernel(cluster).clear(cluster.agents)
    save_registry(cluster, {"next": reg["next"], "faults": []})
    return configure(cluster, {h: {"reset": True} for h in live_hosts(cluster)})


def show(cluster: Cluster) -> dict:
    """The faults in force: the record (every parameter, what replaced what), and per host what
    the kernel and the agent actually hold, with their counters. A recorded fault missing where
    it should be (e.g. an agent restarted since) is named in `missing`."""
    reg = load_registry(cluster)
    kf = _kernel(cluster) if cluster.netns is not None else None
    hosts: dict[str, dict] = {}
    for h in _order(cluster.agents):
        entry: dict = {"kernel": kf.list_host(h) if kf else [], "agent": None}
        if procs.alive(cluster.agents[h]):
            try:
                with cluster.agent_client(h, timeout_ms=2_000) as a:
                    entry["agent"] = a.call("faults", {})
            except ClusterError as e:
                entry["agent"] = {"error": str(e)}
        else:
            entry["agent"] = {"error": "not running"}
        hosts[h] = entry
    faults = []
    for f in reg["faults"]:
        f = dict(f)
        if f["kind"] != "partition":
            missing = []
            for h in f["hosts"]:
                got = hosts[h]
                ids = ({r["id"] for r in got["kernel"]} if f["boundary"] == KERNEL
                       else {r["id"] for r in (got["agent"] or {}).get("rules", [])})
                if f["boundary"] == KERNEL and f["kind"] == "delay":
                    ids = {f["id"]} if any(r["kind"] == "delay" for r in got["kernel"]) else set()
                if f["id"] not in ids:
                    missing.append(h)
            f["missing"] = missing
        faults.append(f)
    return {"boundary": boundary(cluster), "faults": faults, "hosts": hosts,
            "bridge": kf.list_partition() if kf else []}


def describe(f: dict) -> str:
    """One fault's settings in words: `p=0.3`, `10 ms + 0..5 ms`, or a partition's groups."""
    if f["kind"] == "partition":
        return f.get("label") or "partition"
    r = f["rule"]
    if "delay_ms" in r:
        return f"{r['delay_ms']:g} ms" + (f" + 0..{r['jitter_ms']:g} ms" if r.get("jitter_ms") else "")
    if "p" in r:
        return f"p={r['p']:g}"
    return r.get("label", "")


def target(cluster: Cluster, name: str) -> Proc:
    if name == CONTROLLER:
        if cluster.controller is None:
            raise ClusterError("this cluster has no controller")
        return cluster.controller
    return cluster.agent(name)


def signal_process(cluster: Cluster, name: str, sig: signal.Signals) -> Proc:
    p = target(cluster, name)
    if not procs.alive(p):
        raise ClusterError(f"{name} is not running (pid {p.pid}); `dvs fault restart {name}` starts it")
    os.kill(p.pid, sig)
    return p


def kill(cluster: Cluster, name: str) -> Proc:
    p = signal_process(cluster, name, signal.SIGKILL)
    procs.wait_gone(p, timeout_s=5)
    return p


def restart(cluster: Cluster, name: str) -> Proc:
    p = target(cluster, name)
    if procs.alive(p):
        os.kill(p.pid, signal.SIGKILL)
        procs.wait_gone(p, timeout_s=5)
    if name == CONTROLLER:
        return cluster.start_controller()
    p = cluster.add_agent(name)
    if cluster.netns is not None:
        rekernel(cluster, name)
    return p


def rekernel(cluster: Cluster, host: str) -> None:
    """Render hN's kernel rules again (after a restart its API port, exempt for dvs, is new).
    The rules themselves outlive the agent: they live in its namespace."""
    rules = _rules_on(load_registry(cluster), host, KERNEL)
    if rules:
        _kernel(cluster).apply_host(host, rules)
