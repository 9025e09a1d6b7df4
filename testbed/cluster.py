"""A local cluster's lifecycle: `up` starts a controller and N agents, `down` stops them.

Everything about a running cluster lives in its state dir: `cluster.json` (pids, start
times, endpoints, log paths) and `logs/`. Commands find the cluster through that file.
Writes of it are atomic (a temp file per writer, renamed over it) and serialized by an
flock on `cluster.lock`, so parallel `dvs agent start` runs never lose each other's pids.

Every cluster is also listed in a registry, one file per cluster (see `registry_dir`), with
its pids and start times, so `dvs cleanup` finds clusters whose run crashed even when their
state dir is gone. A cluster started by a run that owns it (`dvs demo`, `dvs chaos`,
`dvs bench`: `owned_by_this_process()`) gives its processes `--parent-pid`: they stop when
that run's process is gone, even after a SIGKILL. `dvs up` clusters detach on purpose.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import ipaddress
import json
import os
import random
import re
import socket
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import psutil

from agent import clusterfile, vxlan
from dvswitch import keys
from dvswitch.events import events_dir, events_path
from dvswitch.naming import host_name
from testbed import procs
from testbed.client import Client, ClusterError, set_curve_client
from testbed.netns import NetnsLab
from testbed.procs import Proc

# What a ZeroMQ endpoint we connect to looks like (libzmq aborts the call on anything else).
ENDPOINT_RE = re.compile(r"^(tcp://[^\s:/]+:\d{1,5}|ipc://\S+|inproc://\S+)$")
STATE_FILE = "cluster.json"
LOCK_FILE = "cluster.lock"
JOURNAL_FILE = "controller.journal"
# netns mode: every address of the cluster (agent/clusterfile.py), written by `up`; the agents
# read it (--cluster FILE --host hN), re-reading it when `dvs host add`-style growth adds a host.
CLUSTER_FILE = "cluster.toml"
DEFAULT_STATE_DIR = ".dvs"

# (pid, create_time) of the run that owns the clusters this process starts, or None (detached).
_owner: tuple[int, float] | None = None


def default_state_dir() -> str:
    return os.environ.get("DVS_STATE_DIR", DEFAULT_STATE_DIR)


def owned_by_this_process() -> None:
    """Clusters this process starts from now on stop when it exits (`--parent-pid`)."""
    global _owner
    _owner = (os.getpid(), psutil.Process().create_time())


def registry_dir() -> Path:
    """Where every cluster is listed: $DVS_REGISTRY_DIR, else $XDG_RUNTIME_DIR/dvswitch/clusters,
    else ~/.cache/dvswitch/clusters."""
    if os.environ.get("DVS_REGISTRY_DIR"):
        return Path(os.environ["DVS_REGISTRY_DIR"])
    run = os.environ.get("XDG_RUNTIME_DIR")
    return (Path(run) if run else Path.home() / ".cache") / "dvswitch" / "clusters"


def registry_entry(state_dir: Path) -> Path:
    key = hashlib.sha256(str(state_dir.absolute()).encode()).hexdigest()[:20]
    return registry_dir() / f"{key}.json"


def _write_atomic(path: Path, text: str) -> None:
    """Write `text` to `path` all at once: a temp name unique to this writer, renamed over it."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{random.SystemRandom().getrandbits(32):08x}.tmp")
    try:
        tmp.write_text(text)
        tmp.replace(path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def state_dir_error(state_dir: Path, e: OSError) -> ClusterError:
    """An OSError about the state dir as the one line the user sees."""
    where = f" ({e.filename})" if e.filename and str(e.filename) != str(state_dir) else ""
    what = (e.strerror or str(e)).lower()
    return ClusterError(f"state dir {state_dir}: {what}{where}; pass another --state-dir (or set DVS_STATE_DIR)")


@contextlib.contextmanager
def state_dir_errors(state_dir: Path) -> Iterator[None]:
    try:
        yield
    except OSError as e:
        raise state_dir_error(state_dir, e) from None


def _check_state_dir(state_dir: Path) -> None:
    with state_dir_errors(state_dir):
        if state_dir.exists() and not state_dir.is_dir():
            raise ClusterError(f"state dir {state_dir} exists and is not a directory; pass another --state-dir "
                               f"(or set DVS_STATE_DIR)")


NETNS_WITH_CLUSTER_FILE = ("--cluster and --netns do not mix: netns mode picks its namespaces' addresses itself "
                           "(and writes them to STATE_DIR/cluster.toml); drop one")


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
    # The run this cluster belongs to: its processes stop when it exits. None: detached (`dvs up`).
    owner_pid: int | None = None
    owner_create_time: float | None = None
    # The cluster file the agents run from: STATE_DIR/cluster.toml in netns mode, the user's
    # with `dvs up --cluster FILE`, None otherwise.
    cluster_file: str | None = None
    # CURVE (dvswitch/keys.py): the key directory every process of this cluster runs with
    # (STATE_DIR/keys); None: no CURVE (`dvs up --insecure`).
    keys_dir: str | None = None

    # ------------------------------------------------------------------ persistence

    @property
    def state_file(self) -> Path:
        return self.state_dir / STATE_FILE

    @property
    def lock_file(self) -> Path:
        return self.state_dir / LOCK_FILE

    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        """Hold the state dir's lock (an flock, released if we die): one writer at a time."""
        with state_dir_errors(self.state_dir), open(self.lock_file, "a") as f:
            fcntl.flock(f, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(f, fcntl.LOCK_UN)

    def to_json(self) -> dict:
        return {
            "started_at": self.started_at,
            "agent_args": self.agent_args,
            "controller_args": self.controller_args,
            "netns": self.netns.to_json() if self.netns else None,
            "vtep_base": self.vtep_base,
            "owner_pid": self.owner_pid,
            "owner_create_time": self.owner_create_time,
            "cluster_file": self.cluster_file,
            "keys_dir": self.keys_dir,
            "controller": self.controller.to_json() if self.controller else None,
            "agents": [a.to_json() for a in self.agents.values()],
        }

    def save(self) -> None:
        with self.locked():
            self._write()

    def _write(self) -> None:
        data = self.to_json()
        with state_dir_errors(self.state_dir):
            _write_atomic(self.state_file, json.dumps(data, indent=1))
        self._register(data)

    def _register(self, data: dict) -> None:
        """List this cluster in the registry (best effort: without it only `dvs cleanup` is blind)."""
        entry = {"state_dir": str(self.state_dir.absolute()), **data}
        try:
            registry_dir().mkdir(parents=True, exist_ok=True)
            _write_atomic(registry_entry(self.state_dir), json.dumps(entry, indent=1))
        except OSError:
            pass

    def _unregister(self) -> None:
        with contextlib.suppress(OSError):
            registry_entry(self.state_dir).unlink(missing_ok=True)

    def _merge_from_disk(self) -> None:
        """Under the lock, before a write: take the processes another `dvs` recorded since we read."""
        if not self.state_file.exists():
            return
        try:
            fresh = type(self).load(self.state_dir)
        except ClusterError:
            return
        self.agents.update(fresh.agents)  # in place: callers may hold this dict
        if fresh.controller is not None:
            self.controller = fresh.controller

    def _record(self, proc: Proc) -> None:
        """Record one (re)started process in cluster.json without losing a parallel writer's."""
        with self.locked():
            self._merge_from_disk()
            if proc.name == "controller":
                self.controller = proc
            else:
                self.agents[proc.name] = proc
            self._write()

    @classmethod
    def load(cls, state_dir: str | Path) -> Cluster:
        state_dir = Path(state_dir)
        path = state_dir / STATE_FILE
        _check_state_dir(state_dir)
        with state_dir_errors(state_dir):
            if not path.exists():
                raise ClusterError(f"no cluster is running in {state_dir}; start one with `dvs up --hosts N`")
            text = path.read_text()
        try:
            data = json.loads(text)
            if not isinstance(data, dict):
                raise ValueError(f"a JSON object was expected, not {type(data).__name__}")
            if not isinstance(data.get("agents", []), list):
                raise ValueError("'agents' is not a list")
            c = cls(state_dir, started_at=float(data.get("started_at", 0.0)),
                    agent_args=[str(a) for a in data.get("agent_args", [])],
                    controller_args=[str(a) for a in data.get("controller_args", [])],
                    netns=NetnsLab.from_json(data["netns"]) if data.get("netns") else None,
                    vtep_base=str(data.get("vtep_base", "off")), owner_pid=data.get("owner_pid"),
                    owner_create_time=data.get("owner_create_time"), cluster_file=data.get("cluster_file"),
                    keys_dir=data.get("keys_dir"))
            if data.get("controller"):
                c.controller = Proc.from_json(data["controller"])
            for a in data.get("agents", []):
                p = Proc.from_json(a)
                c.agents[p.name] = p
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise ClusterError(f"{path} is damaged ({e}); stop its processes by hand (or `dvs cleanup`) "
                               f"and remove it") from None
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

    def curve_for(self, server: str, me: str = keys.ADMIN) -> tuple | None:
        """(`me`'s key pair, `server`'s public key) for a CURVE client, or None without CURVE.
        `server`: "controller" or a host id; `me`: whose key to speak with (default the admin's)."""
        if self.keys_dir is None:
            return None
        kdir = Path(self.keys_dir)
        try:
            pair = keys.load_pair(kdir, me)
        except ValueError as e:
            raise ClusterError(f"{e}; this cluster runs with CURVE and `dvs` needs its admin key") from None
        ring = keys.KeyRing(kdir)
        public = ring.current.get(server)
        if public is None:
            raise ClusterError(f"no public key for {server} in {kdir}; `dvs keys show` lists the cluster's keys")
        return pair, public

    def curve_socket(self, sock, server: str, me: str = keys.ADMIN) -> None:
        """Make a socket of ours (before connect) speak CURVE to `server`, if this cluster does."""
        curve = self.curve_for(server, me)
        if curve is not None:
            set_curve_client(sock, *curve)

    def controller_client(self, timeout_ms: int = 5_000) -> Client:
        return Client(self.controller_endpoint, name="the controller", timeout_ms=timeout_ms,
                      curve=self.curve_for(keys.CONTROLLER))

    def agent(self, host: str) -> Proc:
        if host not in self.agents:
            known = ", ".join(self.agents) or "none"
            raise ClusterError(f"unknown host {host!r} (hosts: {known})")
        return self.agents[host]

    def agent_client(self, host: str, timeout_ms: int = 3_000) -> Client:
        return Client(self.agent(host).info["rpc"], name=f"agent {host}", timeout_ms=timeout_ms,
                      curve=self.curve_for(host))

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
        insecure: bool = False,
    ) -> Cluster:
        """`vtep_base`: "auto" picks a free 127.a.b.0 block (so concurrent clusters never collide),
        an IPv4 address uses that (`dvs up` passes 127.0.0.1: h1 = 127.0.0.2), "off" runs no data plane.
        In netns mode the VTEPs are the hosts' namespace addresses, listed in CLUSTER_FILE, and
        every VM is a namespace with a TAP (testbed/vmns.py). `cluster_file` runs the hosts a
        cluster file names on the addresses it names (this machine's; `hosts` None or its count).
        Every socket speaks CURVE with keys made in STATE_DIR/keys unless `insecure`."""
        state_dir = Path(state_dir)
        spec = None
        if cluster_file is not None:
            if netns:
                raise ClusterError(NETNS_WITH_CLUSTER_FILE)
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
        _check_state_dir(state_dir)
        with state_dir_errors(state_dir):
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
        logs = state_dir / "logs"
        c = cls(state_dir, started_at=time.time(), agent_args=list(agent_args or []),
                controller_args=list(controller_args or []), vtep_base=vtep_base,
                cluster_file=str(cluster_file) if spec is not None else None)
        if _owner is not None:
            c.owner_pid, c.owner_create_time = _owner
        journal = state_dir / JOURNAL_FILE
        with state_dir_errors(state_dir):
            state_dir.mkdir(parents=True, exist_ok=True)
            logs.mkdir(exist_ok=True)
            probe = state_dir / f".probe.{os.getpid()}"
            probe.write_text("")  # not writable: say so now, not after the controller started
            probe.unlink()
            if journal.exists():
                journal.unlink()  # a new cluster starts with an empty inventory
            for old in events_dir(state_dir).glob("*.jsonl*"):
                old.unlink()  # ...and a story of its own (`dvs events`)
        names = list(spec.hosts) if spec is not None else [host_name(i) for i in range(1, hosts + 1)]
        if not insecure:
            kdir = keys.key_dir_of(state_dir)
            with state_dir_errors(state_dir):
                keys.ensure(kdir, [keys.ADMIN, keys.CONTROLLER, *names])  # (kept across `dvs up`s of one dir)
            c.keys_dir = str(kdir.resolve())
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
                             ["--journal", str(journal), *bind, *c.key_args(), *c.controller_args,
                              *c.owner_args(), *c.events_args("controller")],
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

    def key_args(self) -> list[str]:
        return ["--keys", self.keys_dir] if self.keys_dir is not None else ["--insecure"]

    def owner_args(self) -> list[str]:
        """Flags that tie a process to the run owning this cluster (none for a detached one)."""
        if self.owner_pid is None:
            return []
        if self.owner_create_time is not None:
            try:
                if abs(psutil.Process(self.owner_pid).create_time() - self.owner_create_time) >= 0.01:
                    return []  # the pid is someone else's now: tie nothing to it
            except psutil.Error:
                return []
        return ["--parent-pid", str(self.owner_pid)]

    def events_args(self, proc: str) -> list[str]:
        """Where process `proc` writes its events (`dvs events` reads them there)."""
        return ["--events", str(events_path(self.state_dir, proc))]

    def _spawn_agent(self, host: str, index: int) -> procs.Pending:
        if self.cluster_file is not None:
            # Every address from the file: the controller's endpoint, this host's, its peers' VTEPs.
            args = ["--cluster", self.cluster_file, "--host", host, *self.key_args(), *self.agent_args,
                    *self.owner_args()]
        else:
            args = ["--host", host, "--controller", self.controller_endpoint, "--vtep-base", self.vtep_base,
                    *self.key_args(), *self.agent_args, *self.owner_args()]
        args += self.events_args(host)
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
                          *self.key_args(), *self.controller_args, *self.owner_args(), *self.events_args("controller")],
                         self.state_dir / "logs" / "controller.log")],
            ready_timeout_s,
        )
        self._record(p)
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
        if self.keys_dir is not None:
            with state_dir_errors(self.state_dir):
                keys.ensure(Path(self.keys_dir), [host])  # (the running processes re-read the directory)
        if host not in self.agents:
            self.admit_host(host)  # the testbed adds a host on purpose: as the admin would
        index = int(host[1:]) if host[1:].isdigit() else len(self.agents) + 1
        [p] = procs.wait_ready([self._spawn_agent(host, index)], ready_timeout_s)
        self._record(p)
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
        with contextlib.suppress(OSError):
            self.state_file.unlink(missing_ok=True)
            (self.state_dir / CLUSTER_FILE).unlink(missing_ok=True)  # ours (netns mode); never a user's file
        self._unregister()
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


def _udp_bind_error(ip: str, port: int) -> int:
    """0 if ip:port can be bound now, else the errno (EADDRINUSE, EADDRNOTAVAIL, ...)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.bind((ip, port))
        except OSError as e:
            return e.errno or -1
    return 0


def _udp_free(ip: str, port: int) -> bool:
    return _udp_bind_error(ip, port) == 0


def check_vtep_base(base: str, hosts: int, port: int = vxlan.VXLAN_PORT) -> None:
    """Every host's VTEP address is valid, in the base's /24, local and free, or a one-line ClusterError."""
    try:
        first = ipaddress.IPv4Address(base)
    except ValueError:
        raise ClusterError(f"--vtep-base {base!r} is not an IPv4 address (nor 'auto' or 'off')") from None
    last = vxlan.vtep_ip(base, f"h{hosts}")
    if last is None or int(ipaddress.IPv4Address(last)) >> 8 != int(first) >> 8:
        raise ClusterError(f"--vtep-base {base} has no room for {hosts} hosts in its /24 (h{hosts} would be "
                           f"{last or 'past 255.255.255.255'}); pass a lower base or 'auto'")
    for i in range(1, hosts + 1):
        ip = vxlan.vtep_ip(base, f"h{i}")
        err = _udp_bind_error(ip, port)
        if err == errno.EADDRNOTAVAIL:
            raise ClusterError(f"VTEP {ip} of h{i} (--vtep-base {base}) is not a local address of this machine; "
                               f"pass a base in 127.0.0.0/8 or an address this machine has (or 'auto')")
        if err:
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


# ---------------------------------------------------------------------- `dvs cleanup`


def _owner_alive(pid, create_time) -> bool:
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        p = psutil.Process(pid)
        same = create_time is None or abs(p.create_time() - float(create_time)) < 0.01
        return same and p.status() != psutil.STATUS_ZOMBIE
    except (psutil.Error, TypeError, ValueError):
        return False


def cleanup(*, detached: bool = False, timeout_s: float = 5.0) -> list[dict]:
    """Stop the clusters the registry lists whose owning run is gone (and, with `detached`, the
    `dvs up` ones too), by pid, each checked against its recorded start time; drop entries whose
    processes are all gone. Rerunnable: a second run finds nothing to do. One dict per entry."""
    results = []
    try:
        entries = sorted(registry_dir().glob("*.json"))
    except OSError:
        entries = []
    for path in entries:
        res: dict = {"entry": str(path), "state_dir": None, "action": "", "stopped": [], "sigkill": []}
        results.append(res)
        try:
            data = json.loads(path.read_text())
            res["state_dir"] = data["state_dir"]
            ps = ([Proc.from_json(data["controller"])] if data.get("controller") else []) + \
                [Proc.from_json(a) for a in data.get("agents", [])]
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
            res["action"] = f"damaged entry removed ({e})"
            path.unlink(missing_ok=True)
            continue
        alive = [p for p in ps if procs.alive(p)]
        owner = data.get("owner_pid")
        if alive and owner is not None and _owner_alive(owner, data.get("owner_create_time")):
            res["action"] = f"kept: its run (pid {owner}) is still going"
            continue
        if alive and owner is None and not detached:
            res["action"] = "kept: started by `dvs up` (stop it with `dvs down`, or `dvs cleanup --all`)"
            continue
        res["stopped"] = [f"{p.name} (pid {p.pid})" for p in alive]
        res["sigkill"] = procs.stop(alive, timeout_s)
        if data.get("netns"):
            try:
                NetnsLab.from_json(data["netns"]).destroy()
            except Exception as e:  # noqa: BLE001 - reported, the rest is still cleaned up
                res["action"] = f"network namespaces not removed: {e}; "
        state_file = Path(data["state_dir"]) / STATE_FILE
        with contextlib.suppress(OSError):
            if state_file.exists() and json.loads(state_file.read_text()).get("started_at") == data.get("started_at"):
                state_file.unlink()
        res["action"] += "stopped" if alive else "stale entry removed (no process left)"
        path.unlink(missing_ok=True)
    return results
