"""Network faults as kernel rules (testbed/kernfaults.py): the rules we generate, and, as root,
that real packets between two namespaces are really lost and duplicated by them."""

from __future__ import annotations

import re
import shutil
import subprocess

import pytest

from agent.faults import parse_rule
from testbed.client import ClusterError
from testbed.kernfaults import KernelFaults, host_script, netem_argv, rule_lines, unsupported
from testbed.netns import NetnsLab, unavailable_reason

ADDRS = {"h1": "10.9.0.3", "h2": "10.9.0.4", "h3": "10.9.0.5", "controller": "10.9.0.1"}


def rule(**kw):
    return parse_rule({"id": "f1", **kw})


def test_loss_and_dup_rules_name_their_peers_probability_and_id():
    loss = rule_lines(rule(kind="loss", p=0.3, **{"from": ["h2", "controller"]}), ADDRS["h1"], ADDRS.get)
    assert loss == ['ip saddr { 10.9.0.1, 10.9.0.4 } numgen random mod 1000 < 300 counter drop comment "dvs f1 loss"']
    [dup] = rule_lines(rule(kind="dup", p=1.0), ADDRS["h1"], ADDRS.get)
    # Every packet (no numgen at p = 1), copied back in through lo, never a copy of a copy.
    assert "numgen" not in dup and 'dup to 10.9.0.3 device "lo"' in dup
    assert dup.startswith("meta mark != 0x00000d0b ") and "meta mark set 0x00000d0b counter dup" in dup
    assert rule_lines(rule(kind="loss", p=0.0), ADDRS["h1"], ADDRS.get) == []
    with pytest.raises(ClusterError, match="no address for 'h9'"):
        rule_lines(rule(kind="loss", p=0.5, **{"from": ["h9"]}), ADDRS["h1"], ADDRS.get)


def test_a_host_script_replaces_the_table_whole_losses_first_and_lets_dvs_through():
    rules = [rule(kind="dup", p=0.2), parse_rule({"id": "f2", "kind": "loss", "p": 0.5})]
    s = host_script("dvsabc", ADDRS["h1"], rules, ADDRS.get, admin=("10.9.0.1", 4321))
    assert s.startswith("table ip dvsabc {}\ndelete table ip dvsabc\n")
    body = s.split("policy accept;\n", 1)[1]
    lines = [ln.strip() for ln in body.splitlines() if "comment" in ln]
    assert lines[0] == 'ip saddr 10.9.0.1 tcp dport 4321 counter accept comment "dvs admin dvs"'
    assert "f2 loss" in lines[1] and "f1 dup" in lines[2]
    # No rules: the table is only removed (and nothing lets anyone through for nothing).
    assert host_script("dvsabc", ADDRS["h1"], [], ADDRS.get, admin=("10.9.0.1", 1)) == \
        "table ip dvsabc {}\ndelete table ip dvsabc\n"


def test_what_the_kernel_cannot_do_is_named():
    no_netem = "this kernel has no netem (tc: Specified qdisc kind is unknown)"
    assert "message types" in unsupported(rule(kind="loss", p=0.5, types=["UPDATES"]), None)
    assert "reorders" in unsupported(rule(kind="reorder", p=0.5), None)
    assert unsupported(rule(kind="delay", delay_ms=5), no_netem) == no_netem
    assert unsupported(rule(kind="delay", delay_ms=5), None) is None
    assert "--from" in unsupported(rule(kind="delay", delay_ms=5, **{"from": ["h2"]}), None)
    assert "steps of 0.001" in unsupported(rule(kind="loss", p=0.0005), None)
    assert unsupported(rule(kind="dup", p=0.25), None) is None
    assert netem_argv("dvxh1", [rule(kind="delay", delay_ms=5, jitter_ms=2)]) == \
        ["tc", "qdisc", "replace", "dev", "dvxh1", "root", "netem", "delay", "5ms", "2ms"]
    assert netem_argv("dvxh1", []) == ["tc", "qdisc", "del", "dev", "dvxh1", "root"]


# ---------------------------------------------------------------------- real packets (root)

root_only = pytest.mark.skipif(unavailable_reason() is not None or shutil.which("ping") is None,
                               reason=str(unavailable_reason() or "needs ping (apt-get install iputils-ping)"))


@pytest.fixture
def lab(tmp_path):
    lab = NetnsLab.for_state_dir(tmp_path)
    try:
        lab.create_bridge()
        lab.add_host("h1", 1)
        lab.add_host("h2", 2)
        yield lab
    finally:
        lab.destroy()
    assert lab.tag not in subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout


def ping(lab, src: str, dst: str, count: int) -> tuple[int, int]:
    """(replies, duplicates) of `count` pings from src's namespace to dst's address."""
    out = subprocess.run([*lab.exec_prefix(src), "ping", "-n", "-q", "-c", str(count), "-i", "0.002", "-W", "1",
                          lab.ips[dst]], capture_output=True, text=True).stdout
    m = re.search(r"(\d+) received(?:, \+(\d+) duplicates)?", out)
    assert m, out
    return int(m.group(1)), int(m.group(2) or 0)


@root_only
def test_kernel_loss_and_duplication_act_on_real_packets(lab):
    kf = KernelFaults(lab)
    assert ping(lab, "h2", "h1", 20) == (20, 0)
    # Every echo request from h2 is dropped in h1's namespace, and the counter says how many.
    kf.apply_host("h1", [parse_rule({"id": "f1", "kind": "loss", "p": 1.0, "from": ["h2"]})])
    assert ping(lab, "h2", "h1", 20) == (0, 0)
    [r] = kf.list_host("h1")
    assert r["id"] == "f1" and r["packets"] == 20 and r["where"] == f"nft {lab.namespace('h1')}"
    # Only what comes from the named peers: loss from the controller leaves h2's pings alone.
    kf.apply_host("h1", [parse_rule({"id": "f1", "kind": "loss", "p": 1.0, "from": ["controller"]})])
    assert ping(lab, "h2", "h1", 20) == (20, 0)
    # Every request copied once: 20 replies and 20 duplicates (ping may exit on its 20th reply
    # before the last duplicate comes in).
    kf.apply_host("h1", [parse_rule({"id": "f2", "kind": "dup", "p": 1.0})])
    got, dups = ping(lab, "h2", "h1", 20)
    assert got == 20 and dups in (19, 20)
    assert kf.list_host("h1")[0]["packets"] == 20
    # 30 % loss drops about 30 % (400 tries: 15 %..45 % is more than 5 standard deviations).
    kf.apply_host("h1", [parse_rule({"id": "f3", "kind": "loss", "p": 0.3})])
    got, _ = ping(lab, "h2", "h1", 400)
    assert 0.15 < 1 - got / 400 < 0.45
    [r] = kf.list_host("h1")
    assert r["packets"] == 400 - got and "numgen random mod 1000 < 300" in r["rule"]
    kf.clear(["h1"])
    assert kf.list_host("h1") == [] and ping(lab, "h2", "h1", 20) == (20, 0)
