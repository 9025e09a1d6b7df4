"""Prometheus metrics of a running agent or controller, served over HTTP on the process's own address.

Read at scrape time: a Collector turns the counters the cores keep anyway into metric families,
so the hot path pays nothing for metrics. prometheus-client's HTTP server runs in its own daemon
thread; the collector hands the reading itself to the event loop (call_soon_threadsafe) and waits
for it, so the core is read between two events, never halfway through one, and never from two
threads. A scrape thus costs the loop one wake-up plus the reading, and the server's thread
sleeps in accept() between scrapes.

`python -m agent` / `python -m controller` take `--metrics-port` (default 0: an ephemeral port;
-1: no metrics server) and announce `metrics` (http://ip:port/metrics) in their ready line.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import threading
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from prometheus_client.core import Metric

# prometheus-client (and the http, email, ssl and urllib modules it imports) is imported only by a
# process that serves metrics: ~3.5 MB of private memory each, which `--metrics-port -1` saves.

log = logging.getLogger(__name__)

# A scrape gives up on a loop that does not answer within this long, in s (the scraper sees a 500).
SCRAPE_TIMEOUT_S = 5.0
# Move convergence latency buckets, in ms (upper bounds; +Inf is added). Moves on this machine
# converge in 1-50 ms; the tail reaches seconds under faults, and the op timeout is 10 s.
CONVERGENCE_BUCKETS_MS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1_000, 2_000, 5_000, 10_000)


class LoopCollector:
    """A Collector whose `read()` runs on the event loop `loop` (see the module docstring)."""

    def __init__(self, loop: asyncio.AbstractEventLoop, read: Callable[[], list[Metric]]) -> None:
        self.loop = loop
        self.read = read

    def collect(self) -> Iterable[Metric]:
        fut: concurrent.futures.Future = concurrent.futures.Future()

        def run() -> None:
            try:
                fut.set_result(self.read())
            except BaseException as e:  # noqa: BLE001 - handed to the scraping thread
                fut.set_exception(e)

        self.loop.call_soon_threadsafe(run)
        return fut.result(timeout=SCRAPE_TIMEOUT_S)


def serve(loop: asyncio.AbstractEventLoop, read: Callable[[], list[Metric]], ip: str, port: int) -> str | None:
    """Serve `read()`'s metrics (plus this process's CPU and memory) on ip:port (0: ephemeral).
    Returns the URL, or None (logged) if the port cannot be bound: metrics are not worth dying for."""
    from wsgiref.simple_server import WSGIRequestHandler, make_server

    from prometheus_client import CollectorRegistry, ProcessCollector, make_wsgi_app
    from prometheus_client.exposition import ThreadingWSGIServer

    class QuietHandler(WSGIRequestHandler):
        def log_message(self, format, *args) -> None:  # noqa: A002 - the base class's signature
            pass  # a scrape is not worth a log line (stderr is the process's log)

    registry = CollectorRegistry()
    registry.register(LoopCollector(loop, read))
    ProcessCollector(registry=registry)
    try:
        server = make_server(ip, port, make_wsgi_app(registry), ThreadingWSGIServer, handler_class=QuietHandler)
    except OSError as e:
        log.error("cannot serve metrics on %s:%d: %s; running without", ip, port, e)
        return None
    # (start_http_server's thread would wake every 0.5 s to look for a shutdown we never ask
    # for, and take the GIL from the loop each time; this one sleeps until a scrape arrives.)
    threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 3600}, name="metrics",
                     daemon=True).start()
    return f"http://{ip}:{server.server_port}/metrics"



def _counter(name: str, doc: str, value: float):
    from prometheus_client.core import CounterMetricFamily

    return CounterMetricFamily(name, doc, value=value)


def _gauge(name: str, doc: str, value: float):
    from prometheus_client.core import GaugeMetricFamily

    return GaugeMetricFamily(name, doc, value=value)


# ---------------------------------------------------------------------- agent


def agent_metrics(core, dp, now_ns: int) -> list[Metric]:
    """An agent's metrics: `core` an AgentCore, `dp` its DataplaneRuntime or None."""
    from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

    from agent.mactable import format_mac

    st = core.status(now_ns)
    out: list[Metric] = [
        _gauge("dvs_agent_mac_entries", "Live (non-tombstone) entries in the MAC table.", st["mac_entries"]),
        _gauge("dvs_agent_table_entries", "Entries in the MAC table, tombstones included.", st["table_size"]),
        _gauge("dvs_agent_peers", "Peers in the membership.", st["peers"]),
        _gauge("dvs_agent_peers_heard", "Peers heard from within the suspect timeout.", st["peers_heard"]),
        _gauge("dvs_agent_ports", "Ports on the local switch.", st["ports"]),
        _gauge("dvs_agent_flapping_macs", "MACs moved more often than the flap guard allows.", len(st["flapping"])),
        _gauge("dvs_agent_gossip_interval_ms", "Current gossip heartbeat interval, in ms.", st["gossip_interval_ms"]),
    ]
    info = GaugeMetricFamily("dvs_agent_info", "This agent's identity.", labels=["host", "incarnation"])
    info.add_metric([core.host, str(core.incarnation)], 1)
    out.append(info)
    stats = st["stats"]
    dropped = CounterMetricFamily("dvs_agent_dropped_messages", "Messages dropped, by reason.", labels=["reason"])
    dropped.add_metric(["malformed"], stats["dropped_malformed"])
    dropped.add_metric(["unexpected"], stats["dropped_unexpected"])
    out.append(dropped)
    for name, value in stats.items():
        if not name.startswith("dropped_"):
            out.append(_counter(f"dvs_agent_{name}", f"Agent counter {name}.", value))
    labels = ["port", "vm", "vlan", "mac"]
    rx = CounterMetricFamily("dvs_agent_port_rx_frames", "Frames received from a local VM's port.", labels=labels)
    tx = CounterMetricFamily("dvs_agent_port_tx_frames", "Frames sent to a local VM's port.", labels=labels)
    drop = CounterMetricFamily("dvs_agent_port_drop_frames", "Frames dropped at a local VM's port.", labels=labels)
    for p in core.switch.ports.values():
        lv = [p.name, p.vm, str(p.vlan), format_mac(p.mac)]
        rx.add_metric(lv, p.rx_frames)
        tx.add_metric(lv, p.tx_frames)
        drop.add_metric(lv, p.drop_frames)
    out += [rx, tx, drop]
    if dp is not None:
        frames = CounterMetricFamily("dvs_agent_dataplane_frames", "Data plane frames, by counter.", labels=["kind"])
        for k, v in dp.dp.counters.items():
            frames.add_metric([k], v)
        drops = CounterMetricFamily("dvs_agent_dataplane_drops", "Data plane frames dropped, by reason.",
                                    labels=["reason"])
        for k, v in dp.dp.drops.items():
            drops.add_metric([k], v)
        out += [frames, drops, _counter("dvs_agent_dataplane_send_errors", "UDP sends that failed.", dp.send_errors)]
    return out


# ---------------------------------------------------------------------- controller


class ControllerMetrics:
    """The controller's metrics. Finished moves and HA restarts are counted as they appear in the
    core's bounded history (read on each scrape, newest first down to the last one seen), so the
    totals and the histogram cover the process's life, not only what the history still holds,
    as long as fewer than history_max (default 100,000) finish between two scrapes."""

    def __init__(self) -> None:
        self._last_seen = None  # the newest history entry counted so far
        # kind ("move" | "ha") -> converged/not counts, histogram bucket counts, latency sum
        self._done: dict[tuple[str, bool], int] = {}
        self._buckets: dict[str, list[int]] = {}
        self._sum_ms: dict[str, float] = {}

    def _count_new(self, history) -> None:
        new = []
        for op in reversed(history):
            if op is self._last_seen:
                break
            new.append(op)
        if not new:
            return
        self._last_seen = history[-1]
        for op in new:
            kind = "ha" if op.kind == "restart" else op.kind
            self._done[(kind, op.converged)] = self._done.get((kind, op.converged), 0) + 1
            if op.converged and op.latency_ms is not None:
                b = self._buckets.setdefault(kind, [0] * (len(CONVERGENCE_BUCKETS_MS) + 1))
                for i, le in enumerate(CONVERGENCE_BUCKETS_MS):
                    if op.latency_ms <= le:
                        b[i] += 1
                        break
                else:
                    b[-1] += 1
                self._sum_ms[kind] = self._sum_ms.get(kind, 0.0) + op.latency_ms

    def read(self, core, now_ns: int) -> list[Metric]:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily

        st = core.api_status({}, now_ns, None, 0)
        self._count_new(core.history)
        hosts = GaugeMetricFamily("dvs_controller_hosts", "Hosts in the membership, by state.", labels=["state"])
        by_state: dict[str, int] = {}
        for h in st["hosts"]:
            by_state[h["state"]] = by_state.get(h["state"], 0) + 1
        for state, n in sorted(by_state.items()):
            hosts.add_metric([state], n)
        in_flight = GaugeMetricFamily("dvs_controller_ops_in_flight", "Ops (create, move, delete, HA restart) "
                                      "in flight, by kind.", labels=["kind"])
        kinds: dict[str, int] = {}
        for op in core.ops.values():
            k = "ha" if op.kind == "restart" else op.kind
            kinds[k] = kinds.get(k, 0) + 1
        for k in ("create", "move", "delete", "ha"):
            in_flight.add_metric([k], kinds.get(k, 0))
        moves = CounterMetricFamily("dvs_controller_moves", "Finished moves and HA restarts, by kind and result.",
                                    labels=["kind", "result"])
        for k in ("move", "ha"):
            for converged in (True, False):
                moves.add_metric([k, "converged" if converged else "not_converged"], self._done.get((k, converged), 0))
        hist = HistogramMetricFamily("dvs_controller_move_convergence_ms", "Convergence latency of moves and HA "
                                     "restarts (last agent's apply - switchover), in ms.", labels=["kind"])
        for k in ("move", "ha"):
            counts = self._buckets.get(k, [0] * (len(CONVERGENCE_BUCKETS_MS) + 1))
            cum, buckets = 0, []
            for le, n in zip([*map(str, CONVERGENCE_BUCKETS_MS), "+Inf"], counts, strict=True):
                cum += n
                buckets.append((le, cum))
            hist.add_metric([k], buckets, self._sum_ms.get(k, 0.0))
        return [
            hosts, in_flight, moves, hist,
            _gauge("dvs_controller_vms", "VMs in the inventory (not deleted).", st["vms"]),
            _gauge("dvs_controller_moves_in_history", "Finished moves and HA restarts `dvs moves` can show.",
                   st["moves_done"]),
            _gauge("dvs_controller_peers_epoch", "Membership epoch.", st["peers_epoch"]),
            _counter("dvs_controller_repair_hints", "Repair hints sent to lagging agents.", st["repair_hints"]),
            _counter("dvs_controller_dropped_messages", "Malformed messages dropped.", st["dropped_malformed"]),
            _counter("dvs_controller_handler_errors", "Messages whose handler failed.", st["handler_errors"]),
        ]
