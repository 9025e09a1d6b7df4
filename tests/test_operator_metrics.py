"""agent/metrics.py without processes: the controller's lifetime counts survive its bounded
history, and the server reads on the event loop (a real socket, scraped with urllib)."""

from __future__ import annotations

import asyncio
import urllib.request
from collections import deque
from types import SimpleNamespace

from prometheus_client.parser import text_string_to_metric_families

from agent import metrics
from agent.core import AgentCore
from controller.core import ControllerCore


def samples(fams, name: str) -> dict:
    return {tuple(sorted(s.labels.items())): s.value for f in fams for s in f.samples if s.name == name}


def test_controller_counts_outlive_the_bounded_history():
    core = ControllerCore()
    core.history = deque(maxlen=3)
    cm = metrics.ControllerMetrics()

    def finish(kind: str, latency_ms: float | None, converged: bool = True) -> None:
        core.history.append(SimpleNamespace(kind=kind, converged=converged, latency_ms=latency_ms))

    for lat in (0.5, 3.0, 40.0):
        finish("move", lat)
    fams = cm.read(core, 0)
    count = samples(fams, "dvs_controller_move_convergence_ms_count")
    assert count[(("kind", "move"),)] == 3
    # Five more finish between two scrapes; the history keeps only 3 of them.
    finish("restart", 7.0)
    finish("move", 20_000.0)
    finish("move", None, converged=False)
    finish("move", 1.5)
    finish("move", 2.0)
    fams = cm.read(core, 0)
    moves = samples(fams, "dvs_controller_moves_total")
    # The ones evicted before we saw them (restart 7.0, move 20 s) are lost; nothing is counted twice.
    assert moves[(("kind", "move"), ("result", "converged"))] == 5
    assert moves[(("kind", "move"), ("result", "not_converged"))] == 1
    buckets = samples(fams, "dvs_controller_move_convergence_ms_bucket")
    assert buckets[(("kind", "move"), ("le", "1"))] == 1
    assert buckets[(("kind", "move"), ("le", "2"))] == 3
    assert buckets[(("kind", "move"), ("le", "50"))] == 5
    assert buckets[(("kind", "move"), ("le", "+Inf"))] == 5
    assert samples(fams, "dvs_controller_move_convergence_ms_sum")[(("kind", "move"),)] == 0.5 + 3 + 40 + 1.5 + 2
    assert cm.read(core, 0) and samples(cm.read(core, 0), "dvs_controller_moves_total") == moves  # idempotent


async def test_served_metrics_are_read_on_the_loop():
    core = AgentCore("h1", 7, pub_endpoint="tcp://x:1", rpc_endpoint="tcp://x:2")
    core.switch.activate("vEth1", "vm1", 100, 0x020000000001)
    core.stats.dropped_malformed = 3
    loop = asyncio.get_running_loop()
    url = metrics.serve(loop, lambda: metrics.agent_metrics(core, None, 0), "127.0.0.1", 0)
    assert url and url.startswith("http://127.0.0.1:")

    def scrape() -> str:
        with urllib.request.urlopen(url, timeout=10) as r:
            return r.read().decode()

    fams = list(text_string_to_metric_families(await loop.run_in_executor(None, scrape)))
    assert samples(fams, "dvs_agent_dropped_messages_total")[(("reason", "malformed"),)] == 3
    rx = samples(fams, "dvs_agent_port_rx_frames_total")
    assert rx == {(("mac", "02:00:00:00:00:01"), ("port", "vEth1"), ("vlan", "100"), ("vm", "vm1")): 0}
    assert samples(fams, "dvs_agent_info") == {(("host", "h1"), ("incarnation", "7")): 1}
