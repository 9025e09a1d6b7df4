"""VMs with real network stacks (`dvs up --netns`): each VM is a network namespace of its own.

VM `v` of the cluster tagged TAG (testbed/netns.py) is namespace `dvsTAG-vm-v` with one
interface, `eth0`: a persistent multi-queue TAP (IFF_TAP | IFF_NO_PI | IFF_MULTI_QUEUE) whose MAC
is the inventory's MAC. The agent of the VM's current host holds a queue of it (agent/tap.py), so
what the VM's kernel sends is switched by dvswitch, and what dvswitch delivers reaches the VM's
kernel. Both names follow from the VM's name alone, which is how a restarted agent finds the TAPs
of its ports again.

Addresses (one place computes them: `vm_address`): RFC 2544's benchmarking block 198.18.0.0/15,
which no real network routes, cut into 32 /20 subnets; VLAN V uses subnet V mod 32 and the VM
with inventory number N (its MAC is 02:00:00:00:00:00 + N) is host N of it. So VLAN 100 (profile
`default`) is 198.18.64.0/20 and vm1 there is 198.18.64.1; `web` (110) is 198.18.224.0/20, `app`
(120) 198.19.128.0/20, `db` (130) 198.18.32.0/20. VLANs 32 apart share a subnet, harmlessly: they
are separate L2 segments. A VM number above 4094 has no address (netns mode is for lab-sized runs).

MTU 1450: the VM's frame plus VXLAN's 50 bytes (outer IPv4, UDP, VXLAN, inner Ethernet) fits the
1500-byte lab bridge without fragmenting. IPv6 address generation is off, so the VMs' kernels
send only what their users make them send (no router or multicast-listener chatter).
"""

from __future__ import annotations

import ipaddress
import os
import subprocess

from agent.mactable import parse_mac
from agent.tap import VM_IFNAME
from controller.inventory import MAC_BASE
from testbed.client import ClusterError
from testbed.netns import NetnsLab

VM_NET = ipaddress.IPv4Network("198.18.0.0/15")  # RFC 2544 benchmarking: no real network uses it
VLAN_PREFIX_LEN = 20
VM_MTU_BYTES = 1450
_SUBNETS = list(VM_NET.subnets(new_prefix=VLAN_PREFIX_LEN))
_HOSTS_PER_SUBNET = 2 ** (32 - VLAN_PREFIX_LEN) - 2


def vm_subnet(vlan: int) -> ipaddress.IPv4Network:
    return _SUBNETS[vlan % len(_SUBNETS)]


def vm_address(vlan: int, mac: int | str) -> str | None:
    """The IPv4 address of the VM with this VLAN and inventory MAC, or None if its number is
    past what a subnet holds."""
    n = (parse_mac(mac) if isinstance(mac, str) else mac) - MAC_BASE
    if not 1 <= n <= _HOSTS_PER_SUBNET:
        return None
    return str(vm_subnet(vlan).network_address + n)


def vm_prefix(lab: NetnsLab) -> str:
    """Namespace of VM v is this + v (the agents get it as --vm-netns)."""
    return f"dvs{lab.tag}-vm-"


def vm_namespace(lab: NetnsLab, vm: str) -> str:
    return vm_prefix(lab) + vm


def _ip(*argv: str, input_text: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", *argv], input=input_text, capture_output=True, text=True)


def exists(lab: NetnsLab, vm: str) -> bool:
    return os.path.exists(f"/run/netns/{vm_namespace(lab, vm)}")


def create(lab: NetnsLab, vm: str, mac: str, vlan: int) -> str:
    """Make VM `vm`'s namespace and TAP (idempotent: an existing one is kept). Returns its address."""
    addr = vm_address(vlan, mac)
    if addr is None:
        raise ClusterError(f"VM {vm} (MAC {mac}) is past the {_HOSTS_PER_SUBNET} VMs a VLAN's netns subnet "
                           f"holds; start a new cluster")
    if exists(lab, vm):
        return addr
    ns = vm_namespace(lab, vm)
    proc = _ip("netns", "add", ns)
    if proc.returncode != 0:
        raise ClusterError(f"cannot create namespace {ns} for {vm}: {proc.stderr.strip()}")
    script = "\n".join([
        "link set lo up",
        f"tuntap add dev {VM_IFNAME} mode tap multi_queue",
        f"link set {VM_IFNAME} address {mac} mtu {VM_MTU_BYTES} addrgenmode none",
        f"addr add {addr}/{VLAN_PREFIX_LEN} dev {VM_IFNAME}",
        f"link set {VM_IFNAME} up",
    ]) + "\n"
    proc = _ip("-n", ns, "-batch", "-", input_text=script)
    if proc.returncode != 0:
        _ip("netns", "del", ns)
        raise ClusterError(f"cannot set up {VM_IFNAME} of {vm} in {ns}: {proc.stderr.strip()}")
    return addr


def delete(lab: NetnsLab, vm: str) -> None:
    if exists(lab, vm):
        _ip("netns", "del", vm_namespace(lab, vm))


def list_namespaces(lab: NetnsLab) -> list[str]:
    """VM names whose namespaces exist."""
    prefix = vm_prefix(lab)
    try:
        return sorted(n[len(prefix):] for n in os.listdir("/run/netns") if n.startswith(prefix))
    except FileNotFoundError:
        return []


def sync(cluster, vms: list[dict] | None = None) -> dict[str, str]:
    """Every live VM of the inventory has its namespace, deleted ones have none; then each agent
    is asked to attach the TAPs of its ports at once (it also retries by itself). Returns
    {vm: address}."""
    lab = cluster.netns
    if vms is None:
        with cluster.controller_client(timeout_ms=10_000) as ctl:
            vms = ctl.call("vm_list", {"all": True})["vms"]
    out = {}
    for v in vms:
        if v["state"] == "deleted":
            delete(lab, v["vm"])
        else:
            out[v["vm"]] = create(lab, v["vm"], v["mac"], v["vlan"])
    for host in cluster.agents:
        try:
            with cluster.agent_client(host, timeout_ms=3_000) as a:
                a.call("tap_attach")
        except ClusterError:
            pass  # a stopped agent attaches when it comes back
    return out


def exec_argv(lab: NetnsLab, vm: str, argv: list[str]) -> list[str]:
    return ["ip", "netns", "exec", vm_namespace(lab, vm), *argv]
