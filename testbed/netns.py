"""Real-network mode: every host in its own Linux network namespace on a bridge, and
partitions enforced by nftables between them instead of by the agents' transport wrapper.

Layout for a cluster whose state dir hashes to TAG (so two clusters never collide):
- bridge `dvTAGbr` in the root namespace with 10.S.0.1/16, where the controller and `dvs` live;
- namespace `dvsTAG-hN` holding `eth0` = 10.S.(N // 250).(N % 250 + 2)/16 (veth peer `dvTAGhN`);
- nftables table `bridge dvsTAG`: drop rules between the addresses a partition separates.
Root only. Everything is removed by `destroy()` (called by `dvs down`).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

from agent.faults import CONTROLLER
from testbed.client import ClusterError


def _run(*argv: str, input_text: str | None = None, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run(list(argv), input=input_text, capture_output=True, text=True)
    if check and proc.returncode != 0:
        raise ClusterError(f"`{' '.join(argv)}` failed: {proc.stderr.strip() or proc.stdout.strip()}")
    return proc


def unavailable_reason() -> str | None:
    """Why real-network mode cannot run here, or None if it can."""
    if os.geteuid() != 0:
        return "--netns needs root (network namespaces, veth, bridge and nftables)"
    for tool, pkg in (("ip", "iproute2"), ("nft", "nftables")):
        if shutil.which(tool) is None:
            return f"--netns needs `{tool}`: apt-get install {pkg}"
    return None


@dataclass
class NetnsLab:
    tag: str
    subnet: int  # second octet of 10.S.0.0/16
    ips: dict[str, str] = field(default_factory=dict)

    @classmethod
    def for_state_dir(cls, state_dir: Path) -> NetnsLab:
        digest = hashlib.blake2b(str(state_dir.resolve()).encode(), digest_size=8).hexdigest()
        return cls(tag=digest[:5], subnet=100 + int(digest[5:9], 16) % 100)

    def to_json(self) -> dict:
        return {"tag": self.tag, "subnet": self.subnet, "ips": self.ips}

    @classmethod
    def from_json(cls, d: dict) -> NetnsLab:
        return cls(d["tag"], d["subnet"], dict(d["ips"]))

    # ---- names

    @property
    def bridge(self) -> str:
        return f"dv{self.tag}br"

    @property
    def table(self) -> str:
        return f"dvs{self.tag}"

    @property
    def controller_ip(self) -> str:
        return f"10.{self.subnet}.0.1"

    def namespace(self, host: str) -> str:
        return f"dvs{self.tag}-{host}"

    def veth(self, host: str) -> str:
        return f"dv{self.tag}{host}"[:15]

    def host_ip(self, index: int) -> str:
        return f"10.{self.subnet}.{index // 250}.{index % 250 + 2}"

    def exec_prefix(self, host: str) -> list[str]:
        return ["ip", "netns", "exec", self.namespace(host)]

    # ---- lifecycle

    def create_bridge(self) -> None:
        reason = unavailable_reason()
        if reason:
            raise ClusterError(reason)
        self.destroy()  # leftovers of a crashed run with the same state dir
        _run("ip", "link", "add", self.bridge, "type", "bridge")
        _run("ip", "addr", "add", f"{self.controller_ip}/16", "dev", self.bridge)
        _run("ip", "link", "set", self.bridge, "up")
        self.apply_partition({})

    def add_host(self, host: str, index: int) -> str:
        ns, veth, ip = self.namespace(host), self.veth(host), self.host_ip(index)
        _run("ip", "netns", "del", ns, check=False)
        _run("ip", "link", "del", veth, check=False)
        _run("ip", "netns", "add", ns)
        _run("ip", "netns", "exec", ns, "ip", "link", "set", "lo", "up")
        _run("ip", "link", "add", veth, "type", "veth", "peer", "name", "eth0", "netns", ns)
        _run("ip", "link", "set", veth, "master", self.bridge, "up")
        _run("ip", "netns", "exec", ns, "ip", "addr", "add", f"{ip}/16", "dev", "eth0")
        _run("ip", "netns", "exec", ns, "ip", "link", "set", "eth0", "up")
        self.ips[host] = ip
        return ip

    def destroy(self) -> None:
        for host in list(self.ips):
            _run("ip", "netns", "del", self.namespace(host), check=False)
            _run("ip", "link", "del", self.veth(host), check=False)
        listed = _run("ip", "netns", "list", check=False).stdout.split()
        for ns in listed:
            if ns.startswith(f"dvs{self.tag}-"):
                _run("ip", "netns", "del", ns, check=False)
        _run("ip", "link", "del", self.bridge, check=False)
        if shutil.which("nft"):
            _run("nft", "delete", "table", "bridge", self.table, check=False)

    def exists(self) -> bool:
        return _run("ip", "link", "show", self.bridge, check=False).returncode == 0

    # ---- partitions

    def apply_partition(self, blocked: dict[str, set[str]]) -> None:
        """Replace the drop rules: host h cannot exchange packets with anything in blocked[h]."""
        rules = []
        for h, others in sorted(blocked.items()):
            src = self.ips.get(h)
            if src is None:
                continue
            for o in sorted(others):
                dst = self.controller_ip if o == CONTROLLER else self.ips.get(o)
                if dst is None:
                    continue
                rules.append(f"ip saddr {src} ip daddr {dst} counter drop")
                rules.append(f"ip saddr {dst} ip daddr {src} counter drop")
        body = "\n".join(f"    {r}" for r in dict.fromkeys(rules))
        # Bridged frames between namespaces meet `forward`; frames to and from the controller
        # (root namespace, on the bridge) meet `input` and `output`.
        chains = "\n".join(
            f"  chain {name} {{\n    type filter hook {name} priority 0; policy accept;\n{body}\n  }}"
            for name in ("forward", "input", "output")
        )
        script = f"table bridge {self.table} {{}}\ndelete table bridge {self.table}\n" \
                 f"table bridge {self.table} {{\n{chains}\n}}\n"
        _run("nft", "-f", "-", input_text=script)
