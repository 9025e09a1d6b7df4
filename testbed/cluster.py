"""A local cluster's lifecycle: `up` starts a controller and N agents, `down` stops them.

Everything about a running cluster lives in its state dir: `cluster.json` (pids, start
times, endpoints, log paths) and `logs/`. Commands find the cluster through that file.
"""

from __future__ import annotations

import json
import os
import random
import re
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path

from agent import clusterfile, vxlan
from testbed import procs
from testbed.client import Client, ClusterError
from testbed.netns import NetnsLab
from testbed.procs import Proc

# What a ZeroMQ endpoint we connect to looks like (libzmq aborts the call on anything else).
ENDPOINT_RE = re.compile(r"^(tcp://[^\s:/]+:\d{1,5}|ipc://\S+|inproc://\S+)$")
STATE_FILE = "cluster.json"
JOURNAL_FILE = "controller.journal"
# netns mode: every address of the cluster (agent/clusterfile.py), written by `up`; the agents
# read it (--cluster FILE --host hN), re-reading it when `dvs host add`-style growth adds a host.
CLUSTER_FILE = "cluster.toml"
DEFAULT_STATE_DIR = ".dvs"


def default_state_dir() -> str:
    return os.environ.get("DVS_STATE_DIR", DEFAULT_STATE_DIR)


@dataclass
class Cluster:
    state_dir: Path
    controller: Proc | None = None
    agents: dict[str, Proc] = field(default_factory=dict)
    started_at: float = 0.0
    controller_args: list[str] = field(default_factory=list)
    agent_args: list[str] = field(default_factory=list)
    netns: NetnsLab | None = None
    # Data plane addressing: host hN's VTEP is vtep_base + N on UDP 4789 ("off": no data plane,
    # "file": each VTEP is the one the cluster file names).
    vtep_base: str = "off"
    # The cluster file the agents run from: STATE_DIR/cluster.toml in netns mode, the user's
    # with `dvs up --cluster FILE`, None otherwise.
    cluster_file: str | None = None

    # ------------------------------------------------------------------ persistence

    @property
    def state_file(self) -> Path:
        return self.state_dir / STATE_FILE

    def save(self) -> None:
        data = {
            "started_at": self.started_at,
            "agent_args": self.agent_args,
            "controller_args": self.controller_args,
            "netns": self.netns.to_json() if self.netns else None,
            "vtep_base": self.vtep_base,
            "cluster_file": self.cluster_file,
            "controller": self.controller.to_json() if self.controller else None,
            "agents": [a.to_json() for a in self.agents.values()],
        }
        tmp = self.state_file.with_suffix(".tmp")
        tmp.write_text(json.dumps(data, indent=1))
        tmp.replace(self.state_file)

    @classmethod
    def load(cls, state_dir: str | Path) -> Cluster:
        state_dir = Path(state_dir)
        path = state_dir / STATE_FILE
        if not path.exists():
            raise ClusterError(f"no cluster is running in {state_dir}; start one with `dvs up --hosts N`")
        try:
            data = json.loads(path.read_text())
            c = cls(state_dir, started_at=data.get("started_at", 0.0),
                    agent_args=list(data.get("agent_args", [])), controller_args=list(data.get("controller_args", [])),
                    netns=NetnsLab.from_json(data["netns"]) if data.get("netns") else None,
                    vtep_base=data.get("vtep_base", "off"), cluster_file=data.get("cluster_file"))
            if data.get("controller"):
                c.controller = Proc.from_json(data["controller"])
            for a in data.get("agents", []):
                p = Proc.from_json(a)
                c.agents[p.name] = p
        except (ValueError, KeyError, TypeError) as e:
            raise ClusterError(f"{path} is damaged ({e}); stop its processes by hand and remove it") from None
        return c

    def any_alive(self) -> bool:
        procs_ = ([self.controller] if self.controller else []) + list(self.agents.values())
        return any(procs.alive(p) for p in procs_)

    # ------------------------------------------------------------------ endpoints and clients

    @property
    def controller_endpoint(self) -> str:
        if self.controller is None:
            raise ClusterError(f"the cluster in {self.state_dir} has no controller")
        endpoint = self.controller.info.get("controller")
        if not isinstance(endpoint, str) or not ENDPOINT_RE.match(endpoint):
            raise ClusterError(f"{self.state_file} names the controller endpoint {endpoint!r}, which is not an "
                               "endpoint (tcp://IP:PORT); stop the cluster's processes by hand and remove the file")
        return endpoint

    def controller_client(self, timeout_ms: int = 5_000) -> Client:
        return Client(self.controller_endpoint, name="the controller", timeout_ms=timeout_ms)

    def agent(self, host: str) -> Proc:
        if host not in self.agents:
            known = ", ".join(self.agents) or "none"
            raise ClusterError(f"unknown host {host!r} (hosts: {known})")
        return self.agents[host]

    def agent_client(self, host: str, timeout_ms: int = 3_000) -> Client:
        return Client(self.agent(host).info["rpc"], name=f"agent {host}", timeout_ms=timeout_ms)

    # ------------------------------------------------------------------ lifecycle

    @classmethod
    def up(
        cls,
        state_dir: str | Path,
        hosts: int | None,
        *,
        agent_args: list[str] | None = None,
        controller_args: list[str] | None = None,
        ready_timeout_s: float = 60.0,
        netns: bool = False,
        vtep_base: str = "auto",
        cluster_file: str | Path | None = None,
    ) -> Cluster:
        """`vtep_base`: "auto" picks a free 127.a.b.0 block (so concurrent clusters never collide),
        an IPv4 address uses that (`dvs up` passes 127.0.0.1: h1 = 127.0.0.2), "off" runs no data plane.
        In netns mode the VTEPs are the hosts' namespace addresses, listed in CLUSTER_FILE, and
        every VM is a namespace with a TAP (testbed/vmns.py). `cluster_file` runs the hosts a
        cluster file names on the addresses it names (this machine's; `hosts` None or its count)."""
        state_dir = Path(state_dir)
        spec = None
        if cluster_file is not None:
            if netns:
                raise ClusterError("--cluster and --netns do not mix: netns mode picks its namespaces' addresses "
                                   "itself (and writes them to STATE_DIR/cluster.toml); drop one")
            cluster_file = Path(cluster_file).resolve()
            try:
                spec = clusterfile.load(cluster_file)
            except ValueError as e:
                raise ClusterError(f"{e}") from None
            if hosts is not None and hosts != len(spec.hosts):
                raise ClusterError(f"--hosts {hosts} but cluster file {cluster_file} lists {len(spec.hosts)} "
                                   "hosts; drop --hosts")
            hosts = len(spec.hosts)
        if hosts is None or hosts < 1 or hosts > 256:
            raise ClusterError(f"--hosts must be between 1 and 256, got {hosts}")
        if (state_dir / STATE_FILE).exists():
            old = cls.load(state_dir)
            if old.any_alive():
                raise ClusterError(f"a cluster is already running in {state_dir}; run `dvs down` first")
            (state_dir / STATE_FILE).unlink()
        if spec is not None:
            check_cluster_spec(spec, cluster_file)
            vtep_base = "file"
        elif netns or vtep_base == "off":
            vtep_base = "off"
        elif vtep_base == "auto":
            vtep_base = pick_vtep_base(hosts)
        else:
            check_vtep_base(vtep_base, hosts)
        state_dir.mkdir(parents=True, exist_ok=True)
        logs = state_dir / "logs"
        c = cls(state_dir, started_at=time.time(), agent_args=list(agent_args or []),
                controller_args=list(controller_args or []), vtep_base=vtep_base,
                cluster_file=str(cluster_file) if spec is not None else None)
        journal = state_dir / JOURNAL_FILE
        if journal.exists():
            journal.unlink()  # a new cluster starts with an empty inventory
        bind = ["--hosts", str(hosts)]
        if spec is not None:
            bind = ["--cluster", str(cluster_file)]  # its endpoint, its hosts
        if netns:
            c.netns = NetnsLab.for_state_dir(state_dir)
            c.netns.create_bridge()
            c.save()  # `dvs down` removes the bridge even if the rest fails
            bind += ["--bind-ip", c.netns.controller_ip]
        try:
            [c.controller] = procs.wait_ready(
                [procs.spawn("controller", "controller",
                             ["--journal", str(journal), *bind, *c.controller_args],
                             logs / "controller.log")],
                ready_timeout_s,
            )
        except BaseException:
            c.down()
            raise
        c.save()  # from here on `dvs down` can clean up whatever happens next
        try:
            if c.netns is not None:
                for i in range(1, hosts + 1):
                    c.netns.add_host(f"h{i}", i)
                c.cluster_file = str((state_dir / CLUSTER_FILE).resolve())
                c.write_cluster_file()
                c.save()
            names = list(spec.hosts) if spec is not None else [f"h{i}" for i in range(1, hosts + 1)]
            pending = [c._spawn_agent(h, i) for i, h in enumerate(names, 1)]
            for p in procs.wait_ready(pending, ready_timeout_s):
                c.agents[p.name] = p
            c.save()
            with c.controller_client(timeout_ms=int(ready_timeout_s * 1000) + 2_000) as ctl:
                ctl.call("wait_ready", {"hosts": hosts, "timeout_ms": int(ready_timeout_s * 1000)})
        except BaseException:
            c.down()
            raise
        return c

    def _spawn_agent(self, host: str, index: int) -> procs.Pending:
        if self.cluster_file is not None:
            # Every address from the file: the controller's endpoint, this host's, its peers' VTEPs.
            args = ["--cluster", self.cluster_file, "--host", host, *self.agent_args]
        else:
            args = ["--host", host, "--controller", self.controller_endpoint, "--vtep-base", self.vtep_base,
                    *self.agent_args]
        prefix = None
        if self.netns is not None:
            from testbed import vmns

            if host not in self.netns.ips:
                self.netns.add_host(host, index)
                self.write_cluster_file()  # the running agents re-read it when they meet the new host
            args += ["--vm-netns", vmns.vm_prefix(self.netns)]
            prefix = self.netns.exec_prefix(host)
        return procs.spawn(host, "agent", args, self.state_dir / "logs" / f"{host}.log", prefix=prefix)

    def write_cluster_file(self) -> None:
        """netns mode: every host's namespace address is both its control address and its VTEP."""
        hosts = {h: clusterfile.HostAddrs(h, ip, ip) for h, ip in self.netns.ips.items()}
        clusterfile.write(self.state_dir / CLUSTER_FILE, clusterfile.ClusterSpec(self.controller_endpoint, hosts))

    def start_controller(self, ready_timeout_s: float = 30.0) -> Proc:
        """(Re)start the controller on its old endpoint; it recovers from its journal and the
        agents, whose control sockets reconnect by themselves."""
        if self.controller is not None and procs.alive(self.controller):
            raise ClusterError(f"the controller is already running (pid {self.controller.pid})")
        endpoint = self.controller_endpoint
        [p] = procs.wait_ready(
            [procs.spawn("controller", "controller",
                         ["--bind", endpoint, "--journal", str(self.state_dir / JOURNAL_FILE),
                          *self.controller_args],
                         self.state_dir / "logs" / "controller.log")],
            ready_timeout_s,
        )
        self.controller = p
        self.save()
        return p

    def add_agent(self, host: str, *, agent_args: list[str] | None = None, ready_timeout_s: float = 30.0) -> Proc:
        """Start one more agent (or restart a stopped one) that joins the running cluster."""
        if host in self.agents and procs.alive(self.agents[host]):
            raise ClusterError(f"host {host} is already running (pid {self.agents[host].pid})")
        if agent_args is not None:
            self.agent_args = list(agent_args)
        if self.cluster_file is not None and self.netns is None:
            try:
                clusterfile.load(self.cluster_file).host(host, self.cluster_file)
            except ValueError as e:
                raise ClusterError(f"{e}") from None
        if host not in self.agents:
            self.admit_host(host)  # the testbed adds a host on purpose: as the admin would
        index = int(host[1:]) if host[1:].isdigit() else len(self.agents) + 1
        [p] = procs.wait_ready([self._spawn_agent(host, index)], ready_timeout_s)
        self.agents[host] = p
        self.save()
        return p

    def admit_host(self, host: str) -> dict:
        """Admit a new host name at the controller (`dvs host add`): only admitted hosts may
        register and join the mesh."""
        with self.controller_client() as ctl:
            return ctl.call("host_add", {"name": host})

    def admitted(self, host: str) -> bool:
        """Does the controller admit `host`? (It may register.)"""
        with self.controller_client() as ctl:
            st = ctl.call("status")
        return st.get("admitted") is None or host in st["admitted"]

    def down(self, timeout_s: float = 5.0) -> list[str]:
        """Stop every process of this cluster by pid. Returns the ones that needed SIGKILL."""
        all_procs = list(self.agents.values()) + ([self.controller] if self.controller else [])
        killed = procs.stop(all_procs, timeout_s)
        if self.netns is not None:
            self.netns.destroy()
        if self.state_file.exists():
            self.state_file.unlink()
        (self.state_dir / CLUSTER_FILE).unlink(missing_ok=True)  # ours (netns mode); never a user's file
        return killed

    # ------------------------------------------------------------------ helpers for commands

    def create_vms(self, count: int, *, prefix: str = "vm", timeout_ms: int = 60_000) -> dict:
        """Place `count` VMs round-robin over the hosts, in one batch."""
        hosts = list(self.agents)
        specs = [[f"{prefix}{i}", hosts[(i - 1) % len(hosts)], "default"] for i in range(1, count + 1)]
        with self.controller_client(timeout_ms=timeout_ms) as ctl:
            result = ctl.call("vm_create", {"vms": specs})
        failed = [op for op in result["ops"] if not op["converged"]]
        if failed:
            raise ClusterError(f"{len(failed)} of {count} VMs did not converge: {failed[0]['error']}")
        if self.netns is not None:
            from testbed import vmns

            vmns.sync(self)
        return result


# ---------------------------------------------------------------------- data plane addressing


def _udp_free(ip: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.bind((ip, port))
        except OSError:
            return False
    return True


def check_vtep_base(base: str, hosts: int, port: int = vxlan.VXLAN_PORT) -> None:
    """Every host's VTEP address is valid and free, or a one-line ClusterError."""
    for i in range(1, hosts + 1):
        ip = vxlan.vtep_ip(base, f"h{i}")
        if ip is None:
            raise ClusterError(f"--vtep-base {base!r} is not an IPv4 address with room for {hosts} hosts")
        if not _udp_free(ip, port):
            raise ClusterError(f"VTEP {ip}:{port} of h{i} is in use (another cluster?); stop it with "
                               f"`dvs down` or pass another --vtep-base (or 'auto')")


def _tcp_free(ip: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as libzmq binds: TIME_WAIT is no conflict
        try:
            s.bind((ip, port))
        except OSError:
            return False
    return True


def check_cluster_spec(spec: clusterfile.ClusterSpec, path, port: int = vxlan.VXLAN_PORT) -> None:
    """`dvs up --cluster FILE` runs every process here: each address must be this machine's and
    each fixed port free, or a one-line ClusterError before anything starts."""
    where = f"(cluster file {path})"
    if not _tcp_free(spec.controller_ip, spec.controller_port):
        raise ClusterError(f"controller.endpoint {spec.controller} {where} is in use or not an address of this "
                           "machine; `dvs up --cluster` runs every host here, so use loopback addresses (127.x)")
    for h, a in spec.hosts.items():
        if not _udp_free(a.vtep, port):
            raise ClusterError(f"hosts.{h}.vtep {a.vtep}:{port} {where} is in use or not an address of this "
                               "machine; stop what holds it (`dvs down`?) or list another address")
        for name, p in (("control", 0), ("pub_port", a.pub_port), ("rpc_port", a.rpc_port)):
            if (name == "control" or p) and not _tcp_free(a.control, p):
                raise ClusterError(f"hosts.{h}.{name} {a.control}:{p or 'any'} {where} is in use or not an address "
                                   "of this machine; list a free one")


def pick_vtep_base(hosts: int, port: int = vxlan.VXLAN_PORT) -> str:
    """A 127.a.b.0 block whose addresses .1 .. .hosts are free on `port` (a != 0, so never the
    default 127.0.0.x block of `dvs up`)."""
    rng = random.SystemRandom()
    for _ in range(50):
        base = f"127.{rng.randrange(1, 255)}.{rng.randrange(0, 255)}.0"
        if all(_udp_free(vxlan.vtep_ip(base, f"h{i}"), port) for i in range(1, hosts + 1)):
            return base
    raise ClusterError("found no free 127.a.b.0 block for the data plane's VTEPs after 50 tries")
