"""The controller core's structured events: dicts {"kind": ..., facts}, no time in them (the
runtime stamps them), a "message" only where the operator's log shows a line."""

from __future__ import annotations

import json

from controller.config import ControllerConfig
from tests.test_controller_core import cluster, create, switched_move


def kinds(events: list[dict], kind: str) -> list[dict]:
    return [e for e in events if e["kind"] == kind]


def test_a_move_tells_started_switched_converged_with_its_figures():
    c = cluster(3)
    create(c, 1, "h1")
    c.core.take_events()
    req = switched_move(c, 1, "h2", applied_by=("h1", "h2", "h3"))
    assert c.reply(req)[0]
    evs = c.core.take_events()
    json.dumps(evs)  # plain data, for an event log
    assert all("t_ns" not in e and "ts" not in e for e in evs)
    (started,) = kinds(evs, "move.started")
    op = started["op"]
    assert (started["vm"], started["op_kind"], started["src"], started["dst"]) == ("vm1", "move", "h1", "h2")
    assert kinds(evs, "move.switched") == [{"kind": "move.switched", "op": op, "vm": "vm1", "host": "h2"}]
    (conv,) = kinds(evs, "move.converged")
    assert conv["op"] == op and conv["dst"] == "h2" and conv["hosts"] == 3 and conv["convergence_ms"] >= 0
    assert not kinds(evs, "move.failed") and not [e for e in evs if "message" in e]


def test_a_refused_move_fails_with_its_outcome():
    c = cluster(3)
    create(c, 1, "h1")
    req = c.request("vm_move", {"name": "vm1", "to": "h2"})
    ((_, (op, *_)),) = c.to("h2")
    c.ack("h2", op, ok=False, detail="out of ports")
    assert c.reply(req)[0] is False
    (failed,) = kinds(c.core.take_events(), "move.failed")
    assert failed == {"kind": "move.failed", "op": op, "vm": "vm1", "outcome": "refused",
                      "error": "h2 refused: out of ports"}


def test_a_silent_host_is_suspect_then_dead_and_its_vms_restart_elsewhere():
    cfg = ControllerConfig()
    c = cluster(3, cfg)
    create(c, 1, "h1")
    epoch = c.core.peers_epoch
    c.core.take_events()
    for _ in range(cfg.dead_after_ms // 500 + 2):  # h2 and h3 keep talking, h1 is silent
        c.advance(500)
        c.status("h2", 2)
        c.status("h3", 2)
    evs = c.core.take_events()
    assert kinds(evs, "host.suspect") == [{"kind": "host.suspect", "host": "h1"}]
    assert kinds(evs, "host.dead") == [{"kind": "host.dead", "host": "h1"}]
    assert kinds(evs, "membership.epoch") == [{"kind": "membership.epoch", "epoch": epoch + 1, "hosts": 2}]
    (restart,) = kinds(evs, "ha.restart")
    assert restart["vm"] == "vm1" and restart["src"] == "h1" and restart["dst"] in ("h2", "h3")
    # It speaks again: readmitted.
    c.status("h1", 2)
    assert kinds(c.core.take_events(), "host.readmitted") == [{"kind": "host.readmitted", "host": "h1"}]
