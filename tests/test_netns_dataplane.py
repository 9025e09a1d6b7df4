"""The data plane in --netns mode: VMs are namespaces with real stacks, real ping and iperf3."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import pytest

from testbed import procs, vmns
from testbed.netns import unavailable_reason
from testbed.tooltraffic import run_tool_traffic


def _why_not() -> str | None:
    reason = unavailable_reason()
    if reason:
        return reason
    for tool, pkg in (("ping", "iputils-ping"), ("iperf3", "iperf3")):
        if shutil.which(tool) is None:
            return f"needs `{tool}`: apt-get install {pkg}"
    if not os.path.exists("/dev/net/tun"):
        return "needs /dev/net/tun (TAP devices)"
    return None


pytestmark = [pytest.mark.cluster, pytest.mark.skipif(_why_not() is not None, reason=str(_why_not()))]


def dvs(state_dir, *args: str) -> subprocess.CompletedProcess:
    # --state-dir right after the command's name: everything after a VM's name belongs to the
    # command run in the VM.
    n = 2 if args[0] == "vm" else 1
    return subprocess.run([sys.executable, "-m", "testbed.cli", *args[:n], "--state-dir", str(state_dir), *args[n:]],
                          capture_output=True, text=True, timeout=60)


def ping_ok(state_dir, src: str, addr: str) -> str:
    proc = dvs(state_dir, "vm", "exec", src, "--", "ping", "-n", "-c", "3", "-i", "0.1", "-W", "2", addr)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert re.search(r"3 packets transmitted, 3 received", proc.stdout), proc.stdout
    return proc.stdout


def taps(cluster, host: str) -> dict[str, bool]:
    with cluster.agent_client(host) as a:
        return {t["vm"]: t["enabled"] for t in a.call("dataplane")["taps"]}


def test_vms_ping_across_hosts_through_moves_and_restarts_and_down_cleans_up(make_cluster):
    cluster = make_cluster(3, netns=True)
    tag, sd = cluster.netns.tag, cluster.state_dir
    cluster.create_vms(6)  # vm1 h1, vm2 h2, vm3 h3, vm4 h1, ...
    assert sorted(vmns.list_namespaces(cluster.netns)) == [f"vm{i}" for i in range(1, 7)]
    listed = dvs(sd, "vm", "list", "--json")
    addr = {v["vm"]: v["address"] for v in json.loads(listed.stdout)}
    assert addr["vm2"] == "198.18.64.2"
    mac = subprocess.run(vmns.exec_argv(cluster.netns, "vm2", ["cat", "/sys/class/net/eth0/address"]),
                         capture_output=True, text=True).stdout.strip()
    assert mac == "02:00:00:00:00:02"  # the inventory's MAC
    assert taps(cluster, "h2") == {"vm2": True, "vm5": True}

    ping_ok(sd, "vm1", addr["vm2"])  # h1 -> h2, VXLAN between the host namespaces
    with cluster.controller_client(timeout_ms=30_000) as ctl:
        assert ctl.call("vm_move", {"name": "vm2", "to": "h3"})["converged"]
    assert "vm2" not in taps(cluster, "h2") and taps(cluster, "h3")["vm2"] is True
    ping_ok(sd, "vm1", addr["vm2"])
    # The exit code of the command in the VM is dvs's.
    assert dvs(sd, "vm", "exec", "vm1", "--", "sh", "-c", "exit 7").returncode == 7
    assert dvs(sd, "vm", "exec", "nope", "--", "true").stderr.startswith("dvs: error: no VM namespace")

    # A VM created later gets its namespace (here in VLAN 110, VNI 10110); deleting it removes it.
    assert dvs(sd, "vm", "create", "web1", "--host", "h3", "--profile", "web").returncode == 0
    assert dvs(sd, "vm", "create", "web2", "--host", "h1", "--profile", "web").returncode == 0
    ping_ok(sd, "web2", vmns.vm_address(110, "02:00:00:00:00:07"))
    assert dvs(sd, "vm", "delete", "web1").returncode == 0 and not vmns.exists(cluster.netns, "web1")
    # The UDP-socket VMs of plain `dvs traffic` cannot reach agents in namespaces: one clear line.
    proc = dvs(sd, "traffic", "--pairs", "1")
    assert proc.returncode == 4 and "use --tool ping" in proc.stderr

    # Real tools during moves: figures come from their own output (the goal is measured in
    # docs/dataplane.md, not asserted here); a TCP session must survive a move.
    rep = run_tool_traffic(cluster, tool="ping", pairs=2, rate=50, duration_s=3, moves=1, seed=2)
    assert rep["moves_summary"]["complete"] and rep["moves_summary"]["transmitted"] == 300
    assert rep["moves"][0]["converged"] and rep["moves"][0]["pings"] > 0
    rep = run_tool_traffic(cluster, tool="iperf3", pairs=1, rate=1, duration_s=3, moves=1, bitrate="20M")
    assert rep["sessions"][0]["survived"], rep["sessions"]
    assert rep["moves"][0]["converged"] and rep["moves"][0]["mbps_median"] > 0

    # A restarted agent attaches the TAPs of its ports again.
    with cluster.controller_client() as ctl:
        host = next(v["host"] for v in ctl.call("vm_list")["vms"] if v["vm"] == "vm3")
    os.kill(cluster.agents[host].pid, signal.SIGKILL)
    procs.wait_gone(cluster.agents[host], 5)
    cluster.add_agent(host)
    deadline = time.monotonic() + 20  # it re-registers, gets its ports back (or HA moves vm3), attaches
    while dvs(sd, "vm", "exec", "vm1", "--", "ping", "-n", "-c", "1", "-W", "1", addr["vm3"]).returncode != 0:
        assert time.monotonic() < deadline, "vm3 unreachable 20 s after its host's agent restarted"
    ping_ok(sd, "vm1", addr["vm3"])

    cluster.down()
    assert f"dvs{tag}-" not in subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    assert f"dv{tag}" not in subprocess.run(["ip", "-br", "link"], capture_output=True, text=True).stdout
    assert f"dvs{tag}" not in subprocess.run(["nft", "list", "tables"], capture_output=True, text=True).stdout
