"""controller/ops.py: the op lifecycle's transition table, and outcomes decided where an op ends."""

from __future__ import annotations

from agent.wire import MsgType
from controller.config import ControllerConfig
from controller.inventory import MAC_BASE
from controller.ops import FIRST_PHASE, TRANSITIONS, Outcome, Phase, next_phase
from tests.test_controller_core import VLAN, cluster, create, route


def test_every_kind_reaches_converging_through_its_table_rows_only():
    for kind, first in FIRST_PHASE.items():
        phase, seen = first, {first}
        while phase is not Phase.CONVERGING:
            steps = [nxt for (k, p, _), nxt in TRANSITIONS.items() if k == kind and p is phase]
            assert steps, f"{kind} is stuck in {phase}"
            phase = steps[0]
            assert phase not in seen or phase is Phase.CONVERGING
            seen.add(phase)
    # Nothing leaves converging or done through an ack: only convergence or a timeout ends an op.
    assert not [row for row in TRANSITIONS if row[1] in (Phase.CONVERGING, Phase.DONE)]


def test_an_ack_of_another_step_is_no_transition():
    assert next_phase("move", Phase.SWITCHOVER, "prepared") is None  # a duplicated "prepared"
    assert next_phase("move", Phase.PREPARE, "switched") is None
    assert next_phase("create", Phase.TOMBSTONE, "detached") is None  # another kind's step
    assert next_phase("move", Phase.PREPARE, "prepared") is Phase.SWITCHOVER


def test_outcomes_name_how_ops_ended():
    c = cluster(3, ControllerConfig(op_timeout_ms=1_000))
    create(c, 1, "h1")
    # A refusal whose text does not start with "<host> refused" is still a refusal: the outcome
    # decides what happens next, not the error text.
    req = c.request("vm_move", {"name": "vm1", "to": "h2"})
    ((_, (op_id, *_)),) = c.to("h2")
    op = c.core.ops[op_id]
    c.ack("h2", op_id, ok=False, detail="out of ports")
    assert op.outcome is Outcome.REFUSED and op.phase is Phase.DONE
    ok, msg = c.reply(req)
    assert not ok and msg == "h2 refused: out of ports"
    # A move that never switched over times out with that outcome.
    req = c.request("vm_move", {"name": "vm1", "to": "h3"})
    ((_, (op_id, *_)),) = c.to("h3")
    op = c.core.ops[op_id]
    c.advance(c.config.op_timeout_ms + c.config.tick_interval_ms)
    assert op.outcome is Outcome.TIMED_OUT and "not converged within" in op.error


def test_the_retired_applied_message_is_dropped_and_counted():
    """No agent sends APPLIED since APPLY_REPORT replaced it: from a known host it is counted
    as malformed and changes nothing; the same apply as an APPLY_REPORT row counts."""
    c = cluster(2)
    req = c.request("vm_create", {"name": "vm1", "host": "h1"})
    ((_, (op, *_)),) = c.to("h1")
    c.ack("h1", op)
    before = c.core.dropped_malformed
    c.feed(route("h2"), MsgType.APPLIED, ["h2", [[VLAN, MAC_BASE + 1, "h1", 0, False, c.now]]])
    assert c.core.dropped_malformed == before + 1 and c.reply(req) is None
    c.applied("h2", 1, "h1", 0)
    ok, result = c.reply(req)
    assert ok and result["converged"]
