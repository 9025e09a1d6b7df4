"""One-line errors around the controller: a bind or a recorded endpoint that is no endpoint."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.conftest import run_dvs


def test_controller_bind_that_is_no_endpoint_is_one_line(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "controller", "--bind", "not-an-endpoint",
                           "--journal", str(tmp_path / "j")], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert lines[-1].startswith("controller: error: cannot bind 'not-an-endpoint'"), proc.stderr
    assert "Traceback" not in proc.stderr


def test_controller_refuses_bad_host_names(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "controller", "--hosts", "h1,bad name"],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "bad host name 'bad name'" in proc.stderr and "Traceback" not in proc.stderr


def test_recorded_controller_endpoint_that_is_no_endpoint_is_one_line(tmp_path):
    state = {"controller": {"name": "controller", "pid": 1, "create_time": 0.0, "log": "", "controller": "garbage"},
             "agents": []}
    (tmp_path / "cluster.json").write_text(json.dumps(state))
    proc = run_dvs("vm", "list", state_dir=tmp_path)
    assert proc.returncode == 4 and "Traceback" not in proc.stderr  # a cluster error
    assert proc.stderr.startswith("dvs: error: ") and "'garbage', which is not an endpoint" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1


def test_controller_with_an_unreadable_journal_says_so_in_one_line(tmp_path):
    (tmp_path / "j").mkdir()
    proc = subprocess.run([sys.executable, "-m", "controller", "--journal", str(tmp_path / "j")],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith(f"controller: error: journal {tmp_path / 'j'}: ")


def test_a_journal_of_the_previous_format_is_read_and_rewritten_on_start(tmp_path):
    from controller import journal
    from testbed import procs

    path = tmp_path / "controller.journal"
    rs = [{"host_incarnation": "h2", "incarnation": 3},
          {"vm": "vm1", "number": 1, "profile": "default", "vlan": 100, "host": "h2", "seq": 4, "seq_issued": 4,
           "state": "active"}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rs))
    [p] = procs.wait_ready([procs.spawn("controller", "controller", ["--journal", str(path)],
                                        tmp_path / "controller.log")], 30)
    try:
        from testbed.client import Client

        with Client(p.info["controller"], timeout_ms=10_000) as ctl:
            st = ctl.call("status")
            vms = ctl.call("vm_list")["vms"]
    finally:
        procs.stop([p])
    assert st["admitted"] == ["h2"]  # the hosts an old journal names were members
    assert [(v["vm"], v["host"], v["seq"]) for v in vms] == [("vm1", "h2", 4)]
    again = journal.read(path)
    assert not again.legacy and not again.damaged and again.records[:2] == rs
    assert "previous format: rewritten" in (tmp_path / "controller.log").read_text()


def test_vm_move_retries_what_the_controller_marks_retry(monkeypatch):
    from testbed import cli
    from testbed.client import ClusterError

    answers = [ClusterError("retry: host 'h5' has not registered again"), ClusterError("retry: again"),
               {"converged": True}]

    class FakeClient:
        def __enter__(self):
            return self

        def __exit__(self, *exc):
            pass

        def call(self, method, args):
            a = answers.pop(0)
            if isinstance(a, Exception):
                raise a
            return a

    class FakeCluster:
        def controller_client(self, timeout_ms):
            return FakeClient()

    monkeypatch.setattr("time.sleep", lambda s: None)
    assert cli.call_retrying(FakeCluster(), "vm_move", {}) == {"converged": True}
    answers[:] = [ClusterError("retry: host 'h5' has not registered again")] * 3
    with pytest.raises(ClusterError) as e:
        cli.call_retrying(FakeCluster(), "vm_move", {}, retry_s=0)
    assert str(e.value) == "host 'h5' has not registered again"  # without its marker, once the time is up
    answers[:] = [ClusterError("unknown VM 'vm9'"), {"converged": True}]
    with pytest.raises(ClusterError, match="^unknown VM 'vm9'$"):
        cli.call_retrying(FakeCluster(), "vm_move", {})
    assert len(answers) == 1  # not retried
