"""Real-network mode: hosts in network namespaces, partitions as nftables rules."""

from __future__ import annotations

import subprocess
import time

import pytest

from testbed import nemesis
from testbed.check import check
from testbed.netns import unavailable_reason
from tests.conftest import run_dvs

pytestmark = [pytest.mark.cluster,
              pytest.mark.skipif(unavailable_reason() is not None, reason=str(unavailable_reason()))]


def namespaces() -> str:
    return subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout


def test_netns_cluster_partition_by_nftables_and_cleanup(make_cluster):
    # Gossip alone: the controller's repair hints would cross the cut (management network).
    cluster = make_cluster(3, netns=True, controller_args=["--repair-hint-after-ms", "0"])
    tag = cluster.netns.tag
    assert all(f"dvs{tag}-h{i}" in namespaces() for i in (1, 2, 3))
    # Each agent listens on its own namespace's address, not on loopback.
    assert all(p.info["pub"].startswith(f"tcp://10.{cluster.netns.subnet}.") for p in cluster.agents.values())
    cluster.create_vms(6)
    # The agents' own wrappers stay clean: the kernel drops the packets.
    nemesis.partition(cluster, nemesis.groups_to_blocked(list(cluster.agents), [["h1"], ["h2", "h3"]]))
    rules = subprocess.run(["nft", "list", "table", "bridge", f"dvs{tag}"], capture_output=True, text=True).stdout
    assert "drop" in rules
    with cluster.controller_client(timeout_ms=30_000) as ctl:
        ctl.call("vm_move", {"name": "vm2", "to": "h3"})
    result = check(cluster, settle_s=0)
    assert not result["hosts"]["h1"]["ok"] and result["hosts"]["h2"]["ok"]
    with cluster.agent_client("h1") as a:
        assert a.call("faults", {})["blocked"] == []
    nemesis.heal(cluster)
    assert check(cluster, settle_s=20)["ok"]
    cluster.down()
    assert f"dvs{tag}-" not in namespaces()


def test_netns_through_dvs_and_a_clear_reason_without_root(tmp_path, monkeypatch):
    import testbed.netns as netns

    monkeypatch.setattr(netns.os, "geteuid", lambda: 1000)
    assert "needs root" in netns.unavailable_reason()
    proc = run_dvs("up", "--hosts", "2", "--netns", state_dir=tmp_path)  # real root here: works
    assert proc.returncode == 0, proc.stderr
    assert run_dvs("down", state_dir=tmp_path).returncode == 0


def nft_in(cluster, host: str) -> str:
    return subprocess.run([*cluster.netns.exec_prefix(host), "nft", "list", "ruleset"],
                          capture_output=True, text=True).stdout


def test_network_faults_are_kernel_rules_in_the_hosts_namespaces(make_cluster):
    import json

    from testbed.kernfaults import netem_missing

    cluster = make_cluster(3, netns=True)
    sd = cluster.state_dir
    out = run_dvs("fault", "loss", "0.3", "--hosts", "h1", state_dir=sd)
    assert out.returncode == 0 and "kernel rules" in out.stdout, out.stderr
    # In h1's own namespace, nowhere else; the agent's wrapper holds nothing.
    assert 'numgen random mod 1000 < 300 counter packets' in nft_in(cluster, "h1")
    assert "dvs f1 loss" in nft_in(cluster, "h1") and "dvs f1" not in nft_in(cluster, "h2")
    assert run_dvs("fault", "dup", "0.2", "--hosts", "h2", "--from", "h1,controller", state_dir=sd).returncode == 0
    assert f'dup to {cluster.netns.ips["h2"]} device "lo"' in nft_in(cluster, "h2")
    # What the kernel cannot do here is refused in one line that offers the agent wrapper.
    for args in (["delay", "5"], ["reorder", "0.2"], ["loss", "0.2", "--types", "UPDATES"]):
        proc = run_dvs("fault", *args, state_dir=sd)
        if args[0] == "delay" and netem_missing() is None:
            assert proc.returncode == 0, proc.stderr  # a kernel with netem: a real delay
            continue
        assert proc.returncode == 4 and proc.stderr.count("\n") == 1 and "--in-agent" in proc.stderr, proc.stderr
    assert run_dvs("fault", "reorder", "0.2", "--hosts", "h3", "--in-agent", state_dir=sd).returncode == 0
    shown = json.loads(run_dvs("fault", "show", "--json", state_dir=sd).stdout)
    assert shown["boundary"].startswith("kernel:")
    by_id = {f["id"]: f for f in shown["faults"]}
    assert by_id["f1"]["boundary"] == "kernel" and by_id["f2"]["rule"]["from"] == ["controller", "h1"]
    assert by_id["f3"]["boundary"] == "agent" and by_id["f3"]["why_agent"] == "asked for with --in-agent"
    assert {r["id"] for r in shown["hosts"]["h1"]["kernel"]} == {"admin", "f1"}
    assert [r["id"] for r in shown["hosts"]["h3"]["agent"]["rules"]] == ["f3"]
    # Real traffic meets the rule: gossip and heartbeats from h2 and h3 to h1 are dropped.
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        [f1] = [r for r in json.loads(run_dvs("fault", "show", "--json", state_dir=sd).stdout)["hosts"]["h1"]["kernel"]
                if r["id"] == "f1"]
        if f1["packets"] > 0:
            break
        time.sleep(0.2)
    assert f1["packets"] > 0
    # The rules live in the namespace and outlive the agent; its new API port stays exempt for dvs.
    # (in this process, the agent's parent, which reaps it: a `dvs` child would wait for a zombie)
    nemesis.restart(cluster, "h1")
    port = cluster.agents["h1"].info["rpc"].rsplit(":", 1)[1]
    assert f"tcp dport {port} counter" in nft_in(cluster, "h1") and "dvs f1 loss" in nft_in(cluster, "h1")
    assert run_dvs("fault", "heal", state_dir=sd).returncode == 0
    assert "dvs f" not in nft_in(cluster, "h1") + nft_in(cluster, "h2")
    with cluster.agent_client("h3") as a:
        assert a.call("faults", {})["rules"] == []


SHORT = """
name = "netns-short"
[cluster]
hosts = 3
vms = 6
[workload]
duration_s = 5
move_rate_per_s = 2
[[faults]]
at_s = 0.5
kind = "loss"
p = 0.2
for_s = 2.0
[[faults]]
at_s = 0.5
kind = "dup"
p = 0.3
[[faults]]
at_s = 0.5
kind = "reorder"
p = 0.2
[[faults]]
at_s = 3.0
kind = "partition"
named = "isolate"
host = "h1"
for_s = 1.0
[end]
settle_s = 15
"""


def test_chaos_with_netns_puts_its_faults_in_the_kernel(tmp_path):
    import json

    (tmp_path / "short.toml").write_text(SHORT)
    report = tmp_path / "report"
    proc = run_dvs("chaos", str(tmp_path / "short.toml"), "--netns", "--report", str(report), "--json")
    summary = json.loads(proc.stdout)
    assert proc.returncode == 0 and summary["verdict"] == "valid", (proc.stderr, summary.get("failed"))
    assert "faults[0] loss: kernel rules" in proc.stderr and "faults[3] partition: kernel rules" in proc.stderr
    assert "faults[2] reorder: the agents' transport wrapper (the kernel has no rule" in proc.stderr
    events = [json.loads(line) for line in (report / "history.jsonl").read_text().splitlines()]
    heal = next(e for e in events if e["ev"] == "fault" and e["phase"] == "heal" and e["fault"] == 0)
    assert sum(h.get("faults[0]", 0) for h in heal["kernel_packets"].values()) > 0
    assert sum(h.get("faults[1]", 0) for h in heal["kernel_packets"].values()) > 0
    tag = next(e for e in events if e["ev"] == "cluster_up")["netns"]["tag"]
    assert f"dvs{tag}-" not in namespaces()
