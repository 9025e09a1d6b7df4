"""One-line errors around the controller: a bind or a recorded endpoint that is no endpoint."""

from __future__ import annotations

import json
import subprocess
import sys

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
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert proc.stderr.startswith("dvs: error: ") and "'garbage', which is not an endpoint" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
