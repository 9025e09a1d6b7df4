"""Names of hosts, VMs, ports and VTEPs: the one place that knows what `h7`, `vm12`, `vEth12`
and host h7's VTEP address look like (pure, no I/O).

- hosts the lab numbers are `h1..hN` (N from 1 to MAX_HOST_NUMBER, no leading zero); a real
  cluster file may name its hosts otherwise, so code that merely sorts names uses host_order;
- VMs are `vm1..vmM`; VM number n has the vEthernet port `vEth<n>` (global numbers that stay
  with the VM across moves, as a Nexus 1000V numbers them);
- host hN's VTEP is IPv4 `base + N` (base 127.0.0.1 makes h1 127.0.0.2).
"""

from __future__ import annotations

import ipaddress
import re

HOST_PREFIX = "h"
VM_PREFIX = "vm"
PORT_PREFIX = "vEth"
MAX_HOST_NUMBER = 999_999  # six digits: h1..h999999

_HOST_RE = re.compile(r"^h([1-9][0-9]{0,5})$")
_ORDER_RE = re.compile(r"^([A-Za-z_-]*)(\d+)$")


def host_name(n: int) -> str:
    """Host number n (1-based): h<n>."""
    return f"{HOST_PREFIX}{n}"


def host_names(count: int) -> list[str]:
    """h1..h<count>."""
    return [f"{HOST_PREFIX}{i}" for i in range(1, count + 1)]


def host_number(name: str) -> int | None:
    """N of a name `hN` (1..MAX_HOST_NUMBER), None for any other name."""
    m = _HOST_RE.match(name)
    return int(m.group(1)) if m else None


def host_order(name: str) -> tuple:
    """Sort key for host names: h2 before h10 (by the number at the end of a name when it has
    one), other names by themselves."""
    m = _ORDER_RE.match(name)
    return (m.group(1), int(m.group(2)), "") if m else (name, -1, name)


def vm_name(n: int) -> str:
    """VM number n (1-based): vm<n>."""
    return f"{VM_PREFIX}{n}"


def vm_names(count: int) -> list[str]:
    """vm1..vm<count>."""
    return [f"{VM_PREFIX}{i}" for i in range(1, count + 1)]


def port_name(vm_number: int) -> str:
    """The vEthernet port of VM number n: vEth<n>."""
    return f"{PORT_PREFIX}{vm_number}"


def vtep_ip(base: str, host: str) -> str | None:
    """Host `hN`'s VTEP address: base + N (None for a name not of that form or a bad base)."""
    n = host_number(host)
    if n is None:
        return None
    try:
        return str(ipaddress.IPv4Address(base) + n)
    except (ipaddress.AddressValueError, ValueError):
        return None


def host_of_vtep(base: str, ip: str) -> str | None:
    """The host whose VTEP is `ip` (the inverse of vtep_ip), or None."""
    try:
        n = int(ipaddress.IPv4Address(ip)) - int(ipaddress.IPv4Address(base))
    except (ipaddress.AddressValueError, ValueError):
        return None
    return host_name(n) if 1 <= n <= MAX_HOST_NUMBER else None
