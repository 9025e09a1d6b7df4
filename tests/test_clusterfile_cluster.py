"""A cluster run from a cluster file with real processes: a controller and 3 agents on the
loopback addresses the file names (a free 127.a.b.0 block), a move converging and frames flowing."""

from __future__ import annotations

import json
import socket

import psutil
import pytest

from agent import clusterfile
from agent.clusterfile import ClusterSpec, HostAddrs
from testbed.client import ClusterError
from testbed.cluster import pick_vtep_base
from tests.conftest import run_dvs

pytestmark = pytest.mark.cluster


def _free_tcp_port(ip: str) -> int:
    with socket.socket() as s:
        s.bind((ip, 0))
        return s.getsockname()[1]


def test_a_cluster_from_a_file_binds_only_its_addresses_and_moves(make_cluster, tmp_path):
    base = pick_vtep_base(4)  # 127.a.b.1..4 free: three hosts and the controller, nobody else's
    prefix = base.rsplit(".", 1)[0]
    ctl_ip = f"{prefix}.4"
    names = ["h1", "rack2-b", "h3"]
    hosts = {h: HostAddrs(h, f"{prefix}.{i}", f"{prefix}.{i}") for i, h in enumerate(names, 1)}
    # One host with fixed ports, as a firewall between machines would want them.
    pub, rpc = _free_tcp_port(f"{prefix}.3"), _free_tcp_port(f"{prefix}.3")
    hosts["h3"] = HostAddrs("h3", f"{prefix}.3", f"{prefix}.3", pub, rpc)
    path = tmp_path / "cluster.toml"
    clusterfile.write(path, ClusterSpec(f"tcp://{ctl_ip}:{_free_tcp_port(ctl_ip)}", hosts))

    cluster = make_cluster(None, cluster_file=path)
    assert list(cluster.agents) == names
    assert cluster.controller_endpoint == clusterfile.load(path).controller
    assert cluster.agents["h3"].info["pub"] == f"tcp://{prefix}.3:{pub}"
    assert cluster.agents["h3"].info["rpc"] == f"tcp://{prefix}.3:{rpc}"
    # Each agent listens on its own control address and VTEP address, nowhere else.
    for h, a in hosts.items():
        assert cluster.agents[h].info["vtep"] == f"{a.vtep}:4789"
        conns = psutil.Process(cluster.agents[h].pid).net_connections(kind="inet")
        bound = {c.laddr.ip for c in conns if c.status in (psutil.CONN_LISTEN, psutil.CONN_NONE) and c.laddr}
        assert bound == {a.control}, (h, bound)
    with cluster.controller_client() as ctl:
        assert set(ctl.call("status")["admitted"]) == set(names)

    cluster.create_vms(6)
    sd = str(cluster.state_dir)
    proc = run_dvs("traffic", "--pairs", "3", "--rate", "100", "--duration", "2", "--moves", "2", "--json",
                   state_dir=sd)
    assert proc.returncode == 0, proc.stderr
    rep = json.loads(proc.stdout)
    f = rep["frames"]
    assert f["sent"] > 0 and f["delivered"] == f["sent"] and f["lost"] == f["misdelivered"] == 0, f
    assert len(rep["moves"]) == 2 and all(m["converged"] and m["frames"] > 0 for m in rep["moves"])
    # A host the file does not list cannot be added to this cluster.
    with pytest.raises(ClusterError, match=r"hosts\.h9: no such host"):
        cluster.add_agent("h9")
