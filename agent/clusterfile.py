"""The cluster file: every address of a cluster written down, so it can span several machines.

    [controller]
    endpoint = "tcp://192.0.2.1:5555"   # the controller binds it; every agent connects to it

    [hosts.h1]
    control = "192.0.2.11"   # the agent's PUB and ROUTER (rpc) sockets bind here, nowhere else
    vtep = "198.51.100.11"   # its VXLAN tunnel endpoint (UDP, --vtep-port, default 4789)
    pub_port = 7001          # optional, default 0: an ephemeral port
    rpc_port = 7002          # optional, default 0: an ephemeral port

Nothing is derived from anything else (no base address plus an index): each host's addresses
are the ones listed. The same file is read by the controller (`python -m controller --cluster
FILE`: bind the endpoint, admit the hosts), by every agent (`python -m agent --cluster FILE
--host h1`: its own addresses, and every peer's VTEP) and written by `dvs up --netns`.

Pure: parsing and checking take the decoded TOML; only `load` and `write` touch the disk.
"""

from __future__ import annotations

import ast
import ipaddress
import json
import os
import re
import tomllib
from dataclasses import dataclass
from pathlib import Path

# The controller's rule for a host name (controller/core.py NAME_RE; the agent may not import
# it, tests/test_clusterfile.py keeps the two equal).
HOST_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
ENDPOINT_RE = re.compile(r"^tcp://([0-9.]+):(\d{1,5})$")
_TWICE_RE = re.compile(r"^Cannot declare \((.*)\) twice( \(at line \d+, column \d+\))?$")
_BARE_KEY_RE = re.compile(r"^[A-Za-z0-9_-]+$")

TOP_KEYS = ("controller", "hosts")
CONTROLLER_KEYS = ("endpoint",)
HOST_KEYS = ("control", "vtep", "pub_port", "rpc_port")


class ClusterFileError(ValueError):
    """A cluster file that cannot be used; str() is one line naming the file and the key."""

    def __init__(self, path: str | Path, key: str | None, what: str) -> None:
        self.path, self.key, self.what = str(path), key, what
        super().__init__(f"cluster file {path}: {key}: {what}" if key else f"cluster file {path}: {what}")


@dataclass(frozen=True)
class HostAddrs:
    host: str
    control: str  # IPv4 address the agent's PUB and rpc ROUTER sockets bind on
    vtep: str  # IPv4 address of its VTEP (UDP port: the agent's --vtep-port, default 4789)
    pub_port: int = 0  # TCP port of the PUB socket; 0 (default) = ephemeral
    rpc_port: int = 0  # TCP port of the rpc ROUTER socket; 0 (default) = ephemeral


@dataclass(frozen=True)
class ClusterSpec:
    controller: str  # the controller's ZeroMQ endpoint, tcp://IPv4:PORT
    hosts: dict[str, HostAddrs]  # in file order

    def host(self, host: str, path: str | Path = "?") -> HostAddrs:
        if host not in self.hosts:
            raise ClusterFileError(path, f"hosts.{host}",
                                   f"no such host (the file lists {', '.join(self.hosts)}); add a "
                                   f"[hosts.{host}] table or pick a listed host")
        return self.hosts[host]

    def vteps(self) -> dict[str, str]:
        return {h: a.vtep for h, a in self.hosts.items()}

    @property
    def controller_ip(self) -> str:
        return ENDPOINT_RE.match(self.controller).group(1)

    @property
    def controller_port(self) -> int:
        return int(ENDPOINT_RE.match(self.controller).group(2))


# ---------------------------------------------------------------------- reading


def load(path: str | Path) -> ClusterSpec:
    """Read and check a cluster file; ClusterFileError (one line) for anything wrong."""
    try:
        text = Path(path).read_text()
    except OSError as e:
        raise ClusterFileError(path, None, f"cannot read it: {e.strerror or e}") from None
    except UnicodeDecodeError:
        raise ClusterFileError(path, None, "is not UTF-8 text") from None
    return loads(text, path)


def loads(text: str, path: str | Path = "<string>") -> ClusterSpec:
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        # A host listed twice is a table declared twice: name it as a key, like every other error.
        m = _TWICE_RE.match(str(e))
        try:
            key = ".".join(_key(str(k)) for k in ast.literal_eval(f"({m.group(1)},)")) if m else None
        except (ValueError, SyntaxError):
            key = None
        if key:
            raise ClusterFileError(path, key, f"is declared twice{m.group(2)}; keep one") from None
        raise ClusterFileError(path, None, f"is not valid TOML: {e}") from None
    return parse(data, path)


def parse(data: dict, path: str | Path = "<string>") -> ClusterSpec:
    """Check decoded TOML: no unknown key, every address valid, no address used twice."""
    _known(data, TOP_KEYS, "", path)
    ctl = _table(data, "controller", path)
    _known(ctl, CONTROLLER_KEYS, "controller.", path)
    endpoint = _endpoint(ctl, path)
    hosts_t = _table(data, "hosts", path)
    if not hosts_t:
        raise ClusterFileError(path, "hosts", "lists no host; add a [hosts.h1] table with control and vtep")
    hosts: dict[str, HostAddrs] = {}
    vtep_of: dict[str, str] = {}
    # (ip, port) -> who binds it: fixed TCP ports must not collide with each other or the controller
    tcp_of: dict[tuple[str, int], str] = {_split(endpoint): "controller.endpoint"}
    for host, t in hosts_t.items():
        key = f"hosts.{_key(host)}"
        if not HOST_RE.match(host):
            raise ClusterFileError(path, key, "bad host id: use letters, digits, '-', '_' or '.', at most 64, "
                                              "starting with a letter or digit")
        if not isinstance(t, dict):
            raise ClusterFileError(path, key, "must be a table with control and vtep")
        _known(t, HOST_KEYS, key + ".", path)
        control = _ipv4(t, "control", key, path)
        vtep = _ipv4(t, "vtep", key, path)
        if vtep in vtep_of:
            raise ClusterFileError(path, f"{key}.vtep", f"{vtep} is also the VTEP of {vtep_of[vtep]}; every "
                                                        "host needs its own (a datagram's source names its host)")
        vtep_of[vtep] = host
        ports = {}
        for name in ("pub_port", "rpc_port"):
            port = t.get(name, 0)
            if not isinstance(port, int) or isinstance(port, bool) or not 0 <= port <= 65535:
                raise ClusterFileError(path, f"{key}.{name}", f"{port!r} is not a TCP port (1-65535, or 0 for "
                                                               "an ephemeral one)")
            if port:
                other = tcp_of.get((control, port))
                if other is not None:
                    raise ClusterFileError(path, f"{key}.{name}",
                                           f"{control}:{port} is already bound by {other}; pick another port")
                tcp_of[(control, port)] = f"{key}.{name}"
            ports[name] = port
        hosts[host] = HostAddrs(host, control, vtep, **ports)
    return ClusterSpec(endpoint, hosts)


def _known(t: dict, keys: tuple[str, ...], prefix: str, path) -> None:
    for k in t:
        if k not in keys:
            raise ClusterFileError(path, prefix + _key(k), f"unknown key (known here: {', '.join(keys)})")


def _table(t: dict, name: str, path) -> dict:
    if name not in t:
        raise ClusterFileError(path, name, f"missing; add a [{name}] table")
    if not isinstance(t[name], dict):
        raise ClusterFileError(path, name, f"must be a table ([{name}])")
    return t[name]


def _ipv4(t: dict, name: str, key: str, path) -> str:
    if name not in t:
        raise ClusterFileError(path, f"{key}.{name}", "missing; give the host's IPv4 address")
    addr = _check_ip(t[name])
    if addr is None:
        raise ClusterFileError(path, f"{key}.{name}", f"{t[name]!r} is not a usable IPv4 address (one that "
                                                       "names this host: not 0.0.0.0, multicast or broadcast)")
    return addr


def _check_ip(value: object) -> str | None:
    if not isinstance(value, str):
        return None
    try:
        ip = ipaddress.IPv4Address(value)
    except ValueError:
        return None
    # A wildcard would bind every address (and peers cannot connect to it); multicast and
    # broadcast name no single host.
    if ip.is_unspecified or ip.is_multicast or ip == ipaddress.IPv4Address("255.255.255.255"):
        return None
    return str(ip)


def _endpoint(ctl: dict, path) -> str:
    key = "controller.endpoint"
    if "endpoint" not in ctl:
        raise ClusterFileError(path, key, "missing; give tcp://IPv4:PORT, e.g. tcp://192.0.2.1:5555")
    value = ctl["endpoint"]
    m = ENDPOINT_RE.match(value) if isinstance(value, str) else None
    ip = _check_ip(m.group(1)) if m else None
    if m is None or ip is None or not 1 <= int(m.group(2)) <= 65535:
        raise ClusterFileError(path, key, f"{value!r} is not tcp://IPv4:PORT with a fixed port (1-65535) on a "
                                          "usable address, e.g. tcp://192.0.2.1:5555")
    return f"tcp://{ip}:{int(m.group(2))}"


def _split(endpoint: str) -> tuple[str, int]:
    m = ENDPOINT_RE.match(endpoint)
    return m.group(1), int(m.group(2))


def _key(k: str) -> str:
    return k if _BARE_KEY_RE.match(k) else json.dumps(k)


# ---------------------------------------------------------------------- writing


def dumps(spec: ClusterSpec) -> str:
    """The TOML text of a cluster file (its values are checked addresses and ints, so a few
    lines of writing do; `loads(dumps(s)) == s`)."""
    lines = ["# dvswitch cluster file: every address of the cluster (README.md, \"Several machines\").",
             "", "[controller]", f"endpoint = {json.dumps(spec.controller)}"]
    for h, a in spec.hosts.items():
        lines += ["", f"[hosts.{_key(h)}]", f"control = {json.dumps(a.control)}", f"vtep = {json.dumps(a.vtep)}"]
        if a.pub_port:
            lines.append(f"pub_port = {a.pub_port}")
        if a.rpc_port:
            lines.append(f"rpc_port = {a.rpc_port}")
    return "\n".join(lines) + "\n"


def write(path: str | Path, spec: ClusterSpec) -> None:
    """Replace the file at once: agents that re-read it never see half of it."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(dumps(spec))
    os.replace(tmp, path)
