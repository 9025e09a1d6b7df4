"""gc.freeze() once after start-up is enough (issue 17): the cores make no reference cycles,
so everything they drop is freed by reference counting alone and the frozen generation only
ever holds what start-up made. Checked over a long run with the cyclic collector off: a
collection afterwards finds no garbage, and the live objects do not grow with the run."""

from __future__ import annotations

import gc
from collections.abc import Callable

from tests.test_agent_core import Cluster
from tests.test_controller_core import Lab


def cyclic_garbage(run: Callable[[], None]) -> int:
    """Objects `run` left in reference cycles (unreachable, found only by the cyclic collector)."""
    gc.collect()
    was_on = gc.isenabled()
    gc.disable()
    try:
        run()
        return gc.collect()
    finally:
        if was_on:
            gc.enable()


def test_the_check_sees_a_cycle():
    def make_cycle():
        a: list = []
        a.append(a)

    assert cyclic_garbage(make_cycle) == 1


def agent_workload(c: Cluster, moves: int) -> None:
    hosts = sorted(c.cores)
    where = {vm: hosts[vm % len(hosts)] for vm in range(1, 9)}
    seqs = dict.fromkeys(where, 0)
    for vm, h in where.items():
        c.attach(h, vm)
    for i in range(moves):
        vm = 1 + i % 8
        dst = hosts[(hosts.index(where[vm]) + 1) % len(hosts)]
        seqs[vm] += 1
        c.move(vm, where[vm], dst, seqs[vm])
        where[vm] = dst
        c.cores[dst].on_frame("sub", b"\x93garbage", c.now)  # (dropped and counted: an exception path)
        if i % 10 == 0:
            c.heartbeat_round()


def test_a_long_agent_run_leaves_no_reference_cycles_and_no_growth():
    c = Cluster(["h1", "h2", "h3", "h4"])
    # Lose a fifth of the gossip so the repair paths (pulls, retries, snapshots) run too.
    n = {"i": 0}

    def drop(src, dst, mt, frame):
        n["i"] += 1
        return n["i"] % 5 == 0

    c.drop = drop
    agent_workload(c, 40)  # warm up: the table, the flap guard and the logs reach their size
    c.events.clear()
    c.published.clear()
    c.ctl.clear()
    before = len(gc.get_objects())

    def run():
        agent_workload(c, 400)
        c.events.clear()  # (the harness's own records, not the cores')
        c.published.clear()
        c.ctl.clear()

    assert cyclic_garbage(run) == 0
    assert c.stat("pulls_sent") > 0 and c.stat("dropped_malformed") > 0
    # (Bounded: the per-MAC state is per MAC, not per move; allow slack for the move history.)
    assert len(gc.get_objects()) - before < 2_000


def test_a_long_controller_run_with_real_agents_leaves_no_reference_cycles():
    lab = Lab(["h1", "h2", "h3"])
    for _ in range(3):
        lab.tick(500)
    lab.client_replies.clear()
    for vm in range(1, 5):
        assert lab.call("vm_create", {"name": f"vm{vm}", "host": "h1", "profile": "web"})[0]

    where = dict.fromkeys(range(1, 5), 1)

    def run():
        for i in range(120):
            vm = 1 + i % 4
            where[vm] = 1 + where[vm] % 3
            ok, rec = lab.call("vm_move", {"name": f"vm{vm}", "to": f"h{where[vm]}"})
            assert ok and rec["converged"], rec
            if i % 20 == 0:
                lab.tick(500)
            assert lab.call("nope", {})[0] is False  # (an error reply: an exception path)
        lab.client_replies.clear()

    assert cyclic_garbage(run) == 0
