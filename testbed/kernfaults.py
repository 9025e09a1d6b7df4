"""Network faults as kernel rules in --netns mode (the real boundary; agent/faults.py is the fallback).

Where each rule lives, and why:
- loss and duplication of what host hN receives: an `ip` nftables table `dvsTAG` inside hN's own
  namespace, chain `input` (hook input, before anything else). `ip netns exec dvsTAG-hN nft list
  ruleset` shows exactly what hN suffers, its counters count what was done, and the rules die
  with the namespace. Loss: `ip saddr {peers} numgen random mod 1000 < N counter drop`.
  Duplication: `... meta mark set MARK counter dup to <hN's address> device "lo"`: the copy is
  looped back into hN's own stack and received a second time (the `dup` statement only sends
  copies out of a device, and the loopback device is the one that leads back in); the mark keeps
  the copy from being copied again. (`dup` needs the `ip` family: nftables 1.0 refuses it in
  `inet`. In the bridge family it does not exist; netdev `dup to eth0` on egress works too, but
  duplicates what the sender sends, not what one host receives.)
- partitions: the `bridge` table of testbed/netns.py (NetnsLab.apply_partition), because a cut is
  between two sides and the bridge sees both directions, including the controller's.
- delay and jitter: `tc netem` on hN's bridge port (root namespace, egress = what the bridge
  hands to hN), when the kernel has netem. Reordering and `--types` have no kernel rule: the
  kernel sees packets of TCP streams, not messages, and cannot hold one back without netem.
  Those are refused with a line that offers the agents' transport wrapper (`--in-agent`).

What kernel loss means here: agents talk ZeroMQ over TCP, so a dropped packet is retransmitted
by the kernel and reaches the agent late, not never (the transport wrapper loses whole
messages). That is what a lossy real network does to this product, so it is the test to trust.
Rule generation is pure (`host_script`, `netem_argv`); `apply_host` and friends run it.
"""

from __future__ import annotations

import functools
import os
import re
import subprocess
from collections.abc import Callable, Iterable

from agent.faults import CONTROLLER, Rule
from testbed.client import ClusterError

MARK = 0x00000D0B  # on a copy made by a dup rule: a copy is never copied again
STEPS = 1000  # numgen resolution: probabilities in steps of 0.001
COMMENT = "dvs "  # every rule we write carries `comment "dvs <id> <kind>"`


def _run(argv: list[str], input_text: str | None = None) -> subprocess.CompletedProcess:
    try:
        return subprocess.run(argv, input=input_text, capture_output=True, text=True)
    except FileNotFoundError:  # e.g. no `tc` (iproute2 without it): a failed command, not a traceback
        return subprocess.CompletedProcess(argv, 127, "", f"{argv[0]}: command not found")


@functools.cache
def netem_missing() -> str | None:
    """Why `tc netem` cannot be used here (None if it can): tried once in a scratch namespace."""
    ns = f"dvsprobe{os.getpid()}"
    if _run(["ip", "netns", "add", ns]).returncode != 0:
        return "cannot create a namespace to probe for netem"
    try:
        r = _run(["ip", "netns", "exec", ns, "tc", "qdisc", "add", "dev", "lo", "root", "netem", "delay", "1ms"])
    finally:
        _run(["ip", "netns", "del", ns])
    if r.returncode == 0:
        return None
    first = (r.stderr.strip() or r.stdout.strip() or "tc failed").splitlines()[0].removeprefix("Error: ")
    return f"this kernel has no netem (tc: {first.rstrip('.')})"


def unsupported(rule: Rule, netem: str | None) -> str | None:
    """Why `rule` cannot be a kernel rule (None if it can). `netem`: netem_missing()'s answer."""
    if rule.types is not None:
        return "the kernel sees packets, not message types, so --types has no kernel rule"
    if rule.kind == "reorder":
        return "the kernel has no rule that reorders packets (netem's reorder needs a delay to reorder behind)"
    if rule.kind == "delay":
        if netem is not None:
            return netem
        if rule.peers is not None:
            return "netem on a host's bridge port delays everything it receives; --from needs per-peer filters"
        return None
    n = rule.p * STEPS
    if abs(n - round(n)) > 1e-6:
        return f"kernel rules drop and copy in steps of {1 / STEPS:g}; {rule.p:g} is not one"
    return None


# ---------------------------------------------------------------------- rule generation (pure)


def _saddr(rule: Rule, addr_of: Callable[[str], str | None]) -> str:
    if rule.peers is None:
        return ""
    ips = []
    for p in sorted(rule.peers):
        ip = addr_of(p)
        if ip is None:
            raise ClusterError(f"fault {rule.id}: no address for {p!r} in this lab")
        ips.append(ip)
    return f"ip saddr {{ {', '.join(ips)} }} " if len(ips) > 1 else f"ip saddr {ips[0]} "


def _chance(p: float) -> str:
    n = round(p * STEPS)
    return "" if n >= STEPS else f"numgen random mod {STEPS} < {n} "


def rule_lines(rule: Rule, host_ip: str, addr_of: Callable[[str], str | None]) -> list[str]:
    """The nft rules (chain `input` of hN's table) for one loss or dup rule; none if p is 0."""
    if rule.p <= 0:
        return []
    match = _saddr(rule, addr_of) + _chance(rule.p)
    tag = f'comment "{COMMENT}{rule.id} {rule.kind}"'
    if rule.kind == "loss":
        return [f"{match}counter drop {tag}"]
    if rule.kind == "dup":
        return [f"meta mark != {MARK:#010x} {match}meta mark set {MARK:#010x} counter "
                f'dup to {host_ip} device "lo" {tag}']
    raise ValueError(f"{rule.kind} is not an nftables rule")


def host_script(table: str, host_ip: str, rules: Iterable[Rule], addr_of: Callable[[str], str | None],
                admin: tuple[str, int] | None = None) -> str:
    """An `nft -f` script that replaces hN's fault table with these rules in one transaction
    (or removes it when there are none). Losses come first: a lost packet is not copied.
    `admin` = (address, port): dvs's requests to the agent's API socket pass untouched, as the
    agent wrapper never faults a client (so `dvs fault show` and the agent-level faults of a
    chaos run are not slowed by the kernel's losses)."""
    rules = [r for r in rules if r.kind in ("loss", "dup")]
    lines = [ln for kind in ("loss", "dup") for r in rules if r.kind == kind for ln in rule_lines(r, host_ip, addr_of)]
    if lines and admin is not None:
        lines.insert(0, f'ip saddr {admin[0]} tcp dport {admin[1]} counter accept comment "{COMMENT}admin dvs"')
    # `table X {}` then `delete table X`: removes an old table whether or not it exists.
    script = f"table ip {table} {{}}\ndelete table ip {table}\n"
    if lines:
        body = "\n".join(f"    {ln}" for ln in lines)
        script += (f"table ip {table} {{\n  chain input {{\n    type filter hook input priority -10; "
                   f"policy accept;\n{body}\n  }}\n}}\n")
    return script


def netem_argv(dev: str, rules: Iterable[Rule]) -> list[str]:
    """`tc` arguments for the delay rules of one host on its bridge port (sum of delays and jitters:
    one qdisc per port), or the deletion of the qdisc when there are none."""
    rules = [r for r in rules if r.kind == "delay"]
    if not rules:
        return ["tc", "qdisc", "del", "dev", dev, "root"]
    delay = sum(r.delay_ms for r in rules)
    jitter = sum(r.jitter_ms for r in rules)
    argv = ["tc", "qdisc", "replace", "dev", dev, "root", "netem", "delay", f"{delay:g}ms"]
    return argv + ([f"{jitter:g}ms"] if jitter else [])


# ---------------------------------------------------------------------- applying and reading back


class KernelFaults:
    """The kernel rules of one NetnsLab (testbed/netns.py), host by host."""

    @classmethod
    def of(cls, cluster) -> KernelFaults:
        """For a cluster in netns mode, knowing its agents' API ports."""
        ports = {}
        for h, p in cluster.agents.items():
            ep = p.info.get("rpc", "")
            if ep.rsplit(":", 1)[-1].isdigit():
                ports[h] = int(ep.rsplit(":", 1)[-1])
        return cls(cluster.netns, ports)

    def __init__(self, lab, rpc_ports: dict[str, int] | None = None) -> None:
        self.lab = lab
        self.rpc_ports = rpc_ports or {}  # host -> its agent's API port (dvs connects there)

    def addr_of(self, name: str) -> str | None:
        return self.lab.controller_ip if name == CONTROLLER else self.lab.ips.get(name)

    def apply_host(self, host: str, rules: list[Rule]) -> None:
        """Make hN's kernel rules exactly `rules` (loss/dup in its namespace, delay by netem)."""
        ip = self.lab.ips.get(host)
        if ip is None:
            raise ClusterError(f"{host} has no namespace in this lab")
        port = self.rpc_ports.get(host)
        script = host_script(self.lab.table, ip, rules, self.addr_of,
                             None if port is None else (self.lab.controller_ip, port))
        r = _run([*self.lab.exec_prefix(host), "nft", "-f", "-"], input_text=script)
        if r.returncode != 0:
            raise ClusterError(f"nft in {self.lab.namespace(host)} refused the fault rules: "
                               f"{(r.stderr.strip() or r.stdout.strip()).splitlines()[0]}")
        delays = [r for r in rules if r.kind == "delay"]
        if delays or netem_missing() is None:  # (without netem there is never a qdisc to remove)
            argv = netem_argv(self.lab.veth(host), delays)
            res = _run(argv)
            if res.returncode != 0 and delays:
                raise ClusterError(f"`{' '.join(argv)}` failed: {res.stderr.strip()}")

    def clear(self, hosts: Iterable[str]) -> None:
        for h in hosts:
            if h in self.lab.ips:
                self.apply_host(h, [])

    def list_host(self, host: str) -> list[dict]:
        """The fault rules in force in the kernel for hN: [{id, kind, rule, packets}] as the kernel
        prints them (`nft list table`, `tc qdisc show`)."""
        out = []
        r = _run([*self.lab.exec_prefix(host), "nft", "list", "table", "ip", self.lab.table])
        if r.returncode == 0:
            for line in r.stdout.splitlines():
                m = re.search(r'comment "' + COMMENT + r'(\S+) (\S+)"', line)
                if m is None:
                    continue
                pk = re.search(r"counter packets (\d+)", line)
                out.append({"id": m.group(1), "kind": m.group(2), "where": f"nft {self.lab.namespace(host)}",
                            "rule": line.strip(), "packets": int(pk.group(1)) if pk else None})
        q = _run(["tc", "qdisc", "show", "dev", self.lab.veth(host)]) if netem_missing() is None else None
        for line in q.stdout.splitlines() if q else []:
            if "netem" in line:
                out.append({"id": None, "kind": "delay", "where": f"tc {self.lab.veth(host)}", "rule": line.strip(),
                            "packets": None})
        return out

    def list_partition(self) -> list[dict]:
        """The partition's drop rules on the lab bridge (root namespace), chain by chain."""
        r = _run(["nft", "list", "table", "bridge", self.lab.table])
        out, chain = [], ""
        for line in r.stdout.splitlines() if r.returncode == 0 else []:
            m = re.match(r"\s*chain (\S+)", line)
            if m:
                chain = m.group(1)
            elif " drop" in line:
                pk = re.search(r"counter packets (\d+)", line)
                out.append({"id": None, "kind": "partition", "where": f"nft bridge {self.lab.table} {chain}",
                            "rule": line.strip(), "packets": int(pk.group(1)) if pk else None})
        return out
