"""The simulator's workload: a client that talks to the controller as testbed/client.py does
(wait until ready, create the VMs, then random moves or an evacuation of h1)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from agent import wire
from agent.wire import MsgType, WireError
from dvswitch.naming import vm_names
from dvswitch.stats import summarize_moves
from testbed.sim.config import concurrency_for
from testbed.sim.scheduler import NS_PER_MS

if TYPE_CHECKING:
    from testbed.sim.engine import Simulator


class Client:
    """The workload driver: talks to the controller with REQUEST frames, like testbed/client.py."""

    def __init__(self, sim: Simulator) -> None:
        self.sim = sim
        self.req_ids = 0
        self.pending: dict[int, tuple] = {}  # req id -> (kind, context)
        self.ready_ns: int | None = None
        self.create_summary: dict | None = None
        self.records: list[dict] = []
        self.error: str | None = None
        self.warnings: list[str] = []
        cfg = sim.cfg
        self.names = vm_names(cfg.vms)
        self.placement = {name: sim.hosts[i % cfg.hosts] for i, name in enumerate(self.names)}
        self.inflight: set[str] = set()
        self.sent_moves = 0
        self.paused = False  # the controller crashed: moves wait until it is back and ready
        self.deferred = 0  # moves to start once it is
        self.interrupted = 0  # moves in flight when the controller crashed
        self._reready_deadline = 0  # after a controller restart: resume moves by then at the latest
        self.evacuated = False  # --workload evacuate: the controller answered that h1 is empty
        self.evac_elapsed_ms: float | None = None
        self._evac_again = False  # the controller crashed while we waited: ask the new one

    def controller_crashed(self) -> None:
        """Requests in flight die with the controller: a move's outcome (done or rolled back)
        is judged by the final checks, not by a reply."""
        self.paused = True
        for _req_id, (kind, ctx) in sorted(self.pending.items()):
            if kind == "move":
                name, src, dst = ctx
                self.inflight.discard(name)
                self.interrupted += 1
                self.sim.at(self.sim.now, self._record, {
                    "vm": name, "src": src, "dst": dst, "seq": None, "converged": False, "latency_ms": None,
                    "interrupted": True, "error": "the controller crashed with the move in flight"})
            elif kind == "evacuate":
                self._evac_again = True
        self.pending.clear()

    def controller_restarted(self) -> None:
        """Moves resume once the new controller knows every running agent again (they
        re-register at their next status report), or after its dead timeout at the latest."""
        sim = self.sim
        ctl = sim.ctl_config
        self._reready_deadline = sim.now + (ctl.dead_after_ms + 2 * ctl.tick_interval_ms) * NS_PER_MS
        sim.at(sim.now + NS_PER_MS, self._poll_reready)

    def _poll_reready(self) -> None:
        sim = self.sim
        if not sim.ctl_up or not self.paused:
            return
        hosts = sim.controller.inv.hosts
        known = all((h := hosts.get(a.host)) is not None and h.incarnation == a.core.incarnation
                    for a in sim.current if a is not None)
        if not known and sim.now < self._reready_deadline:
            sim.at(sim.now + NS_PER_MS, self._poll_reready)
            return
        self.paused = False
        if self._evac_again:
            self._evac_again = False
            self._evacuate()
        n, self.deferred = self.deferred, 0
        for _ in range(n):
            self._next_move()

    def call(self, method: str, args: dict, kind: str, ctx=None, timeout_ms: int | None = None) -> None:
        sim = self.sim
        self.req_ids += 1
        self.pending[self.req_ids] = (kind, ctx)
        sim.client_send(wire.encode(MsgType.REQUEST, [self.req_ids, method, args]), sim.now)
        if timeout_ms is None:
            # As testbed/client.py: give up on an answer that does not come (the run would
            # otherwise tick on forever). Ops end by the controller's op timeout long before.
            timeout_ms = 3 * sim.ctl_config.op_timeout_ms + 10_000
        sim.at(sim.now + timeout_ms * NS_PER_MS, self._timeout, self.req_ids, method, timeout_ms)

    def _timeout(self, req_id: int, method: str, timeout_ms: int) -> None:
        if req_id in self.pending:
            self.fail(f"the controller did not answer {method!r} within {timeout_ms} virtual ms")

    def begin(self) -> None:
        cfg = self.sim.cfg
        self.call("wait_ready", {"hosts": cfg.hosts, "timeout_ms": cfg.ready_timeout_ms}, "ready",
                  timeout_ms=cfg.ready_timeout_ms + 2_000)

    def on_frames(self, frames: list[bytes], t: int) -> None:
        for frame in frames:
            if len(frame) > wire.MAX_FRAME_BYTES and len(self.warnings) < 5:
                # testbed/client.py would drop this reply (wire.decode's size bound) and time out;
                # the simulated client reads it anyway so the run can go on, and says so.
                self.warnings.append(f"a reply of {len(frame):,} bytes exceeds wire.MAX_FRAME_BYTES "
                                     f"({wire.MAX_FRAME_BYTES:,}); a real client drops it")
            try:
                mt, body = wire.decode(frame, max(len(frame), wire.MAX_FRAME_BYTES))
            except WireError:
                continue
            if mt is not MsgType.REPLY:
                continue
            req_id, ok, result = body
            kind, ctx = self.pending.pop(req_id, (None, None))
            if kind == "ready":
                self._on_ready(ok, result)
            elif kind == "create":
                self._on_create(ok, result)
            elif kind == "move":
                self._on_move(ctx, ok, result)
            elif kind == "evacuate":
                self._on_evacuate(ok, result)

    def fail(self, msg: str) -> None:
        self.error = msg
        self.sim.stop()

    def _on_ready(self, ok: bool, result) -> None:
        if not ok:
            self.fail(f"cluster not ready: {result}")
            return
        self.ready_ns = self.sim.now
        self.sim.on_phase("ready", self.sim.now)
        cfg = self.sim.cfg
        if cfg.vms:
            specs = [[name, self.placement[name], "default"] for name in self.names]
            self.call("vm_create", {"vms": specs}, "create")
        else:
            self.create_summary = {"vms": 0, "converged": 0}
            self._start_moves()

    def _on_create(self, ok: bool, result) -> None:
        if not ok:
            self.fail(f"vm_create failed: {result}")
            return
        ops = result["ops"]
        s = summarize_moves(ops)
        self.create_summary = {"vms": s["moves"], "converged": s["converged"],
                               "latency_ms_p50": s["latency_ms_p50"], "latency_ms_p99": s["latency_ms_p99"],
                               "latency_ms_max": s["latency_ms_max"]}
        self._start_moves()

    def _start_moves(self) -> None:
        sim = self.sim
        sim.on_phase("created", sim.now)
        sim.open_fault_window()
        cfg = sim.cfg
        if cfg.workload == "evacuate":
            self._evacuate()
        elif cfg.moves == 0:
            sim.moves_finished()
        elif cfg.move_rate is None:
            for _ in range(min(cfg.moves, concurrency_for(cfg))):
                self._next_move()
        else:
            gap = 1e9 / cfg.move_rate
            for i in range(cfg.moves):
                sim.at(sim.now + int(i * gap), self._next_move)

    def _host_up(self, host: str) -> bool:
        return self.sim.current[self.sim.hidx[host]] is not None

    def _next_move(self) -> None:
        """Pick a VM that is active (no op in flight) on a running host, and a running destination.

        Placement comes from the controller's inventory, read directly (what `dvs vm list` would
        answer, without a round trip per move): HA may have moved VMs behind the client's back.
        """
        if self.paused:
            self.deferred += 1
            return
        sim = self.sim
        rng = sim.work_rng
        inv = sim.controller.inv
        busy = sim.controller.ops_by_key
        self.sent_moves += 1
        up = [h for h in sim.hosts if self._host_up(h)]
        for _ in range(64):
            name = self.names[rng.randrange(len(self.names))]
            vm = inv.vms.get(name)
            if vm is None or vm.state != "active" or vm.key in busy or name in self.inflight:
                continue
            src = vm.host
            if not self._host_up(src):
                continue
            choices = [h for h in up if h != src]
            if not choices:
                break
            dst = choices[rng.randrange(len(choices))]
            self.inflight.add(name)
            # (per-host apply times: not needed here, 1,000 of them per reply at 1,000 hosts)
            self.call("vm_move", {"name": name, "to": dst, "per_host": False}, "move", (name, src, dst))
            return
        # Nothing movable right now (every candidate busy or down): counted as a failed move.
        sim.at(sim.now, self._record, {"vm": "-", "src": "-", "dst": "-", "seq": None, "converged": False,
                                       "latency_ms": None, "error": "no movable VM (all busy or on down hosts)"})

    def _evacuate(self) -> None:
        # The controller drains h1 itself; its answer lists every move (and HA restart) off it.
        self.call("host_evacuate", {"name": "h1", "max_concurrent": concurrency_for(self.sim.cfg),
                                    "timeout_ms": 600_000}, "evacuate", timeout_ms=610_000)

    def _on_evacuate(self, ok: bool, result) -> None:
        if not ok:
            self.fail(f"host_evacuate failed: {result}")
            return
        self.evacuated = True
        self.evac_elapsed_ms = round(result["elapsed_ms"], 3)
        for m in result["moves"]:
            rec = {k: m[k] for k in ("vm", "src", "dst", "seq", "converged", "latency_ms")}
            if m.get("error"):
                rec["error"] = m["error"]
            self.records.append(rec)
        self.sim.moves_finished()

    def _on_move(self, ctx, ok: bool, result) -> None:
        name, src, dst = ctx
        self.inflight.discard(name)
        if ok:
            rec = {k: result[k] for k in ("vm", "src", "dst", "seq", "converged", "latency_ms")}
            if result.get("error"):
                rec["error"] = result["error"]
        else:
            rec = {"vm": name, "src": src, "dst": dst, "seq": None, "converged": False, "latency_ms": None,
                   "error": str(result)}
        self._record(rec)

    def _record(self, rec: dict) -> None:
        self.records.append(rec)
        cfg = self.sim.cfg
        if len(self.records) == cfg.moves:
            self.sim.moves_finished()
        elif cfg.move_rate is None and self.sent_moves < cfg.moves:
            self._next_move()
