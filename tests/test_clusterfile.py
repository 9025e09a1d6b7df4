"""The cluster file's parser and writer (pure), and its one-line errors from the real commands."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from hypothesis import given
from hypothesis import strategies as st

from agent import clusterfile
from agent.clusterfile import ClusterFileError, ClusterSpec, HostAddrs
from controller.core import NAME_RE
from tests.conftest import run_dvs
from tests.test_cli import assert_one_line_error

GOOD = """
[controller]
endpoint = "tcp://192.0.2.1:5555"

[hosts.h1]
control = "192.0.2.11"
vtep = "198.51.100.11"

[hosts."db-7.rack2"]
control = "192.0.2.12"
vtep = "198.51.100.12"
pub_port = 7001
rpc_port = 7002
"""


def test_a_good_file_names_every_address():
    spec = clusterfile.loads(GOOD, "c.toml")
    assert spec.controller == "tcp://192.0.2.1:5555"
    assert list(spec.hosts) == ["h1", "db-7.rack2"]
    assert spec.hosts["h1"] == HostAddrs("h1", "192.0.2.11", "198.51.100.11")
    assert spec.hosts["db-7.rack2"] == HostAddrs("db-7.rack2", "192.0.2.12", "198.51.100.12", 7001, 7002)
    assert spec.vteps() == {"h1": "198.51.100.11", "db-7.rack2": "198.51.100.12"}
    assert (spec.controller_ip, spec.controller_port) == ("192.0.2.1", 5555)
    assert clusterfile.loads(clusterfile.dumps(spec)) == spec
    # Several agents of one machine may share its control address (ephemeral ports differ).
    shared = GOOD.replace('"192.0.2.12"', '"192.0.2.11"')
    assert clusterfile.loads(shared).hosts["db-7.rack2"].control == "192.0.2.11"


def test_the_host_id_rule_is_the_controllers():
    assert clusterfile.HOST_RE.pattern == NAME_RE.pattern


@pytest.mark.parametrize("edit, key, what", [
    (("[controller]", "[controler]"), "controler", "unknown key"),
    (('vtep = "198.51.100.11"', 'vtep = "198.51.100.11"\nvtepp = "1.2.3.4"'), "hosts.h1.vtepp", "unknown key"),
    (('endpoint = "tcp://192.0.2.1:5555"', 'endpoint = "tcp://192.0.2.1:5555"\nport = 1'), "controller.port",
     "unknown key"),
    (('"198.51.100.12"', '"198.51.100.11"'), "hosts.\"db-7.rack2\".vtep", "also the VTEP of h1"),
    (('"198.51.100.11"', '"198.51.100.300"'), "hosts.h1.vtep", "not a usable IPv4"),
    (('control = "192.0.2.11"', 'control = "0.0.0.0"'), "hosts.h1.control", "not a usable IPv4"),
    (('control = "192.0.2.11"', 'control = "224.0.0.1"'), "hosts.h1.control", "not a usable IPv4"),
    (('control = "192.0.2.11"', 'control = 11'), "hosts.h1.control", "not a usable IPv4"),
    (('control = "192.0.2.11"\n', ''), "hosts.h1.control", "missing"),
    (('"tcp://192.0.2.1:5555"', '"tcp://192.0.2.1:*"'), "controller.endpoint", "fixed port"),
    (('"tcp://192.0.2.1:5555"', '"tcp://example.org:5555"'), "controller.endpoint", "tcp://IPv4:PORT"),
    (('"tcp://192.0.2.1:5555"', '"tcp://192.0.2.1:70000"'), "controller.endpoint", "tcp://IPv4:PORT"),
    (("pub_port = 7001", "pub_port = 70000"), "hosts.\"db-7.rack2\".pub_port", "not a TCP port"),
    (("pub_port = 7001", "pub_port = true"), "hosts.\"db-7.rack2\".pub_port", "not a TCP port"),
    (("rpc_port = 7002", "rpc_port = 7001"), "hosts.\"db-7.rack2\".rpc_port", "already bound"),
    (('"tcp://192.0.2.1:5555"', '"tcp://192.0.2.12:7001"'), "hosts.\"db-7.rack2\".pub_port", "already bound"),
    (("[hosts.h1]", "[hosts.-h1]"), "hosts.-h1", "bad host id"),
    (("[hosts.h1]", '[hosts."db-7.rack2"]'), "hosts.\"db-7.rack2\"", "declared twice"),
])
def test_bad_files_name_the_file_and_the_key(edit, key, what):
    old, new = edit
    assert old in GOOD
    with pytest.raises(ClusterFileError) as e:
        clusterfile.loads(GOOD.replace(old, new, 1), "c.toml")
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith(f"cluster file c.toml: {key}: ") and what in msg, msg


@pytest.mark.parametrize("text, what", [
    ('[hosts.h1]\ncontrol = "1.1.1.1"\nvtep = "1.1.1.2"\n', "controller: missing"),
    ('[controller]\nendpoint = "tcp://1.1.1.1:5"\n', "hosts: missing"),
    ('[controller]\nendpoint = "tcp://1.1.1.1:5"\n[hosts]\n', "hosts: lists no host"),
    ('controller = 5\n[hosts.h1]\ncontrol = "1.1.1.1"\nvtep = "1.1.1.2"\n', "controller: must be a table"),
    ('[controller\n', "is not valid TOML"),
])
def test_bad_structure(text, what):
    with pytest.raises(ClusterFileError, match=what):
        clusterfile.loads(text, "c.toml")


def test_missing_host_and_unreadable_file(tmp_path):
    spec = clusterfile.loads(GOOD, "c.toml")
    with pytest.raises(ClusterFileError, match=r"^cluster file c.toml: hosts.h9: no such host \(the file lists h1, "):
        spec.host("h9", "c.toml")
    with pytest.raises(ClusterFileError, match="cannot read it"):
        clusterfile.load(tmp_path / "nope.toml")
    path = tmp_path / "c.toml"
    clusterfile.write(path, spec)
    assert clusterfile.load(path) == spec and [p.name for p in tmp_path.iterdir()] == ["c.toml"]


_ips = st.integers(1, 0xDF_FF_FF_FE).map(lambda n: ".".join(str((n >> s) & 255) for s in (24, 16, 8, 0)))


@given(st.dictionaries(st.from_regex(clusterfile.HOST_RE, fullmatch=True), st.tuples(_ips, _ips), min_size=1,
                       max_size=6), st.integers(1, 65535))
def test_write_then_read_gives_the_same_cluster(hosts, port):
    vteps = {}
    for h, (_, vtep) in hosts.items():
        vteps.setdefault(vtep, h)
    spec = ClusterSpec(f"tcp://10.0.0.1:{port}",
                       {h: HostAddrs(h, c, v) for h, (c, v) in hosts.items() if vteps[v] == h})
    assert clusterfile.loads(clusterfile.dumps(spec)) == spec


def _run(module: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", module, *args], capture_output=True, text=True, timeout=60)


def test_the_commands_refuse_a_bad_file_in_one_line(tmp_path):
    good = tmp_path / "good.toml"
    good.write_text(GOOD)
    bad = tmp_path / "bad.toml"
    bad.write_text(GOOD.replace("vtep =", "vtp =", 1))
    for proc in (_run("agent", "--cluster", str(bad), "--host", "h1"), _run("controller", "--cluster", str(bad))):
        assert proc.returncode == 2
        assert_one_line_error(proc, f"cluster file {bad}: hosts.h1.vtp: unknown key")
    proc = _run("agent", "--cluster", str(good), "--host", "h9")
    assert proc.returncode == 2
    assert_one_line_error(proc, f"cluster file {good}: hosts.h9: no such host")
    proc = _run("agent", "--cluster", str(good), "--host", "h1", "--controller", "tcp://127.0.0.1:1")
    assert proc.returncode == 2
    assert_one_line_error(proc, "drop --controller")
    proc = _run("controller", "--cluster", str(good), "--hosts", "3")
    assert proc.returncode == 2
    assert_one_line_error(proc, "drop --hosts")
    # `dvs up --cluster` runs every host here: addresses of another machine are refused up front.
    proc = run_dvs("up", "--cluster", str(good), state_dir=tmp_path / "sd")
    assert proc.returncode != 0
    assert_one_line_error(proc, "controller.endpoint tcp://192.0.2.1:5555")
    assert_one_line_error(run_dvs("up", "--cluster", str(bad), state_dir=tmp_path / "sd"), "hosts.h1.vtp")
    assert_one_line_error(run_dvs("up", "--cluster", str(good), "--netns", state_dir=tmp_path / "sd"),
                          "do not mix" if os.geteuid() == 0 else "--netns")
    assert_one_line_error(run_dvs("up", state_dir=tmp_path / "sd"), "--hosts N")
