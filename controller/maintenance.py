"""Maintenance mode, evacuation and rebalance: the moves the controller starts by itself.

A host in maintenance is drained by the controller (from its timer, and whenever one of its
moves ends), so a drain cut short by a controller restart goes on from the journal; clients
only wait for it (`host_evacuate` answers once the host is empty). A rebalance runs the
moves a plan (controller/balance.py) chose, a few at a time. Targets always come from the one
placement scorer. Moves are started through the coordinator, which tells this component
when each ends (`op_ended`).
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from agent import wire
from agent.wire import MsgType
from controller import balance
from controller.api import RETRY_PREFIX, ApiError
from controller.inventory import Vm
from controller.ops import Op
from dvswitch.naming import host_order

NS_PER_MS = 1_000_000
# Evacuations waiting for their host to empty, at most (each holds a client envelope).
EVAC_WAITERS_MAX = 64
EVAC_TIMEOUT_MS_MAX = 3_600_000
# Moves one evacuation or rebalance runs at once: default, and the most a client may ask for.
MAX_CONCURRENT_DEFAULT = 4
MAX_CONCURRENT_MAX = 64


@dataclass
class EvacWaiter:
    """A `host_evacuate` request: answered once its host holds no VM and no move off it runs."""

    envelope: list
    req_id: int
    host: str
    started_ns: int
    deadline_ns: int
    ops: list = field(default_factory=list)  # moves and HA restarts off the host finished since


@dataclass
class Job:
    """A rebalance being run: planned moves started at most `max_concurrent` at once."""

    envelope: list
    req_id: int
    queue: deque
    max_concurrent: int
    result: dict
    running: set[int] = field(default_factory=set)
    ops: list = field(default_factory=list)
    skipped: list = field(default_factory=list)


class Maintenance:
    def __init__(self, coordinator) -> None:
        self.c = coordinator  # the ControllerCore: its inventory, ops and actions
        self._evac_waiters: list[EvacWaiter] = []
        self._drain_ops: dict[int, str] = {}  # op id -> the maintenance host it moves a VM off
        self._drain_retry_ns: dict[str, int] = {}  # VM -> earliest next try after a failed move
        self._drain_blocked: dict[str, str] = {}  # maintenance host -> why a VM cannot leave it
        self._jobs: list[Job] = []
        self._job_of: dict[int, Job] = {}  # op id -> the rebalance running it
        self._kick = False  # a drain or rebalance op ended: start the next ones

    def _reply(self, envelope: list, req_id: int, ok: bool, result) -> None:
        self.c.outbox.append((envelope, wire.encode(MsgType.REPLY, [req_id, ok, result])))

    @property
    def kicked(self) -> bool:
        """A drain or rebalance op ended: start the next ones now."""
        return self._kick

    def busy(self) -> bool:
        """Something to do at a tick: a host in maintenance, an evacuation waited for, a kick."""
        return self._kick or bool(self.c.inv.maintenance) or bool(self._evac_waiters)

    def tracking(self) -> bool:
        """An ended move must be told (op_ended): a drain, evacuation or rebalance runs."""
        return bool(self._evac_waiters or self._drain_ops or self._job_of)

    def op_ended(self, op: Op, vm: Vm | None, now_ns: int) -> None:
        """A move or restart finished: account it to its drain, evacuation waiters, rebalance."""
        host = self._drain_ops.pop(op.op_id, None)
        if host is not None:
            self._kick = True
            if not op.converged and vm is not None and vm.host == host:
                # It did not leave (refused, timed out before the switchover): try it again later.
                self._drain_retry_ns[vm.name] = now_ns + self.c.config.command_retry_max_ms * NS_PER_MS
        for w in self._evac_waiters:
            if op.src == w.host:
                w.ops.append(op)
        job = self._job_of.pop(op.op_id, None)
        if job is not None:
            job.running.discard(op.op_id)
            job.ops.append(op)
        if host is not None or job is not None or self._evac_waiters:
            self._kick = True

    def run(self, now_ns: int) -> None:
        self._kick = False
        for host in list(self.c.inv.maintenance):
            self._drain(host, now_ns)
        for job in list(self._jobs):
            self._job_step(job, now_ns)
        if self._evac_waiters:
            self._check_evac(now_ns)

    def _drain(self, host: str, now_ns: int) -> None:
        """Start moves off maintenance host `host`, up to its max concurrent, targets from the
        scorer. A dead host is left to HA (which never places on a host in maintenance); one
        that has not registered (again) is waited for."""
        h = self.c.inv.hosts.get(host)
        if h is None or h.state != "alive":
            return
        k = self.c.inv.maintenance[host]
        running = sum(1 for x in self._drain_ops.values() if x == host)
        if running >= k:
            return
        blocked = ""
        load = None
        for vm in sorted(self.c.inv.vms.values(), key=lambda v: v.number):
            if running >= k:
                break
            if vm.host != host or vm.state != "active" or vm.key in self.c.ops_by_key:
                continue
            if self._drain_retry_ns.get(vm.name, 0) > now_ns:
                continue
            if load is None:
                load = self.c.placement.load()
            dst = self.c.placement.place(load, None, vm.name)
            if dst is None:
                blocked = blocked or f"cannot move {vm.name} off {host}: {self.c.placement.why_unplaceable(vm.name)}"
                continue
            self._drain_retry_ns.pop(vm.name, None)
            vm.seq_issued = max(vm.seq, vm.seq_issued) + 1
            op = self.c.start_op("move", vm, host, dst, (dst, vm.seq_issued, False), now_ns)
            self._drain_ops[op.op_id] = host
            running += 1
        if blocked:
            if self._drain_blocked.get(host) != blocked:
                self.c.event("maintenance.blocked", f"host {host} (maintenance): {blocked}; trying again",
                              host=host, reason=blocked)
            self._drain_blocked[host] = blocked
        elif running or not any(vm.host == host and vm.state == "active" for vm in self.c.inv.vms.values()):
            self._drain_blocked.pop(host, None)

    def host_busy(self, host: str) -> int:
        """VMs on `host` plus ops moving one off it: 0 once it is empty and every move ended."""
        n = sum(1 for vm in self.c.inv.vms.values() if vm.host == host and vm.state in ("active", "moving", "creating"))
        return n + sum(1 for op in self.c.ops.values() if op.src == host and op.kind in ("move", "restart"))

    def _check_evac(self, now_ns: int) -> None:
        keep = []
        for w in self._evac_waiters:
            left = self.host_busy(w.host)
            moved = [op.record(per_host=False) for op in w.ops]
            if not left:
                self._reply(w.envelope, w.req_id, True, {
                    "host": w.host, "moves": moved, "elapsed_ms": (now_ns - w.started_ns) / NS_PER_MS})
            elif w.host in self._drain_blocked and not any(x == w.host for x in self._drain_ops.values()):
                self._reply(w.envelope, w.req_id, False,
                            f"{self._drain_blocked[w.host]}; {w.host} stays in maintenance with {left} VM(s): "
                            f"the controller moves them once a host fits (or `dvs host activate {w.host}`)")
            elif now_ns >= w.deadline_ns:
                self._reply(w.envelope, w.req_id, False,
                            f"{w.host} still holds {left} VM(s) after {(now_ns - w.started_ns) // NS_PER_MS} ms "
                            f"({len(moved)} moves done); it stays in maintenance and the controller "
                            "goes on draining it: run `dvs host evacuate` again to wait")
            else:
                keep.append(w)
        self._evac_waiters = keep

    def _check_maint_host(self, name: str) -> None:
        if name not in self.c.inv.hosts and not (self.c.admitted is not None and name in self.c.admitted) \
                and name not in self.c.inv.incarnations:
            known = ", ".join(sorted(self.c.inv.hosts, key=host_order)) or "none"
            raise ApiError(f"unknown host {name!r} (known: {known})")

    @staticmethod
    def _max_concurrent(args) -> int:
        k = args.get("max_concurrent", MAX_CONCURRENT_DEFAULT)
        if type(k) is not int or not 1 <= k <= MAX_CONCURRENT_MAX:
            raise ApiError(f"max_concurrent must be 1..{MAX_CONCURRENT_MAX}, not {k!r}")
        return k

    def api_host_evacuate(self, args, now_ns, envelope, req_id) -> None:
        """Maintenance mode: no placement targets the host from now on, and its VMs move off it.
        Answered once it is empty and every move off it ended (each move's record)."""
        name = args["name"]
        self._check_maint_host(name)
        k = self._max_concurrent(args)
        timeout_ms = args.get("timeout_ms", 300_000)
        if type(timeout_ms) is not int or not 0 <= timeout_ms <= EVAC_TIMEOUT_MS_MAX:
            raise ApiError(f"timeout_ms must be 0..{EVAC_TIMEOUT_MS_MAX}, not {timeout_ms!r}")
        if len(self._evac_waiters) >= EVAC_WAITERS_MAX:
            raise ApiError(f"{RETRY_PREFIX}{EVAC_WAITERS_MAX} evacuations are being waited for already")
        others = [h for h in self.c.inv.hosts.values()
                  if h.name != name and h.state != "dead" and h.name not in self.c.inv.maintenance]
        if not others and self.host_busy(name):
            raise ApiError(f"no other live host outside maintenance to move {name}'s VMs to; "
                           "add a host or activate one first")
        if self.c.inv.maintenance.get(name) != k:
            self.c.inv.maintenance[name] = k
            self.c.journal_out.append({"maintenance": name, "max_concurrent": k})
        self._drain_blocked.pop(name, None)
        self._evac_waiters.append(EvacWaiter(envelope, req_id, name, now_ns, now_ns + timeout_ms * NS_PER_MS))
        self.run(now_ns)

    def api_host_activate(self, args, now_ns, envelope, req_id) -> dict:
        """Return a host to service: placement may target it again."""
        name = args["name"]
        self._check_maint_host(name)
        was = self.c.inv.maintenance.pop(name, None) is not None
        if was:
            self.c.journal_out.append({"maintenance": name, "max_concurrent": 0})
        self._drain_blocked.pop(name, None)
        keep = []
        for w in self._evac_waiters:
            if w.host == name:
                self._reply(w.envelope, w.req_id, False, f"{name} was activated before it was empty")
            else:
                keep.append(w)
        self._evac_waiters = keep
        return {"host": name, "was_in_maintenance": was, "vms": self.host_busy(name)}

    def api_maintenance(self, args, now_ns, envelope, req_id) -> dict:
        return {"maintenance": [{"host": h, "max_concurrent": k, "vms": self.host_busy(h),
                                 "blocked": self._drain_blocked.get(h, "")}
                                for h, k in sorted(self.c.inv.maintenance.items(), key=lambda x: host_order(x[0]))]}

    def api_rebalance(self, args, now_ns, envelope, req_id) -> dict | None:
        """Plan (and unless `dry_run`, run) the fewest moves that bring the per-host spread of
        load (max - min) to `threshold`: VMs per host for metric vms (default 2), or a fraction
        of the mean host's frame rate for metric traffic (default 0.25; `rates`: VM -> frames/s)."""
        metric = args.get("metric", "vms")
        if metric not in ("vms", "traffic"):
            raise ApiError(f"metric must be vms or traffic, not {metric!r}")
        threshold = args.get("threshold")
        if threshold is None:
            threshold = 2 if metric == "vms" else 0.25
        if isinstance(threshold, bool) or not isinstance(threshold, int | float) or not 0 <= threshold <= 1e9:
            raise ApiError(f"threshold must be a number >= 0, not {threshold!r}")
        rates = args.get("rates") or {}
        if not isinstance(rates, dict) or not all(isinstance(v, int | float) and v >= 0 for v in rates.values()):
            raise ApiError("rates must map VM names to frame rates >= 0")
        if metric == "traffic" and not rates:
            raise ApiError("metric traffic needs the VMs' frame rates (`dvs rebalance` measures them)")
        k = self._max_concurrent(args)
        load, units, _ = self.c.placement.balance_state(metric, rates)
        if len(load) < 2:
            raise ApiError("rebalance needs at least two live hosts outside maintenance")
        before = dict(load)
        mean = sum(load.values()) / len(load)
        limit = float(threshold) if metric == "vms" else float(threshold) * mean

        def allowed(vms: list[str], dst: str, planned: dict[str, str]) -> bool:
            extra = {**planned, **dict.fromkeys(vms, dst)}
            return not any(self.c.placement.rule_conflict(v, dst, extra) for v in vms)

        moves = balance.plan(load, units, limit, allowed, host_order)
        def rnd(x: float) -> float:
            return round(x, 3)

        result = {"metric": metric, "threshold": threshold, "limit": rnd(limit),
                  "spread_before": rnd(balance.spread(before)), "spread_planned": rnd(balance.spread(load)),
                  "load_before": {h: rnd(v) for h, v in before.items()},
                  "load_planned": {h: rnd(v) for h, v in load.items()},
                  "plan": [{"vm": v, "src": a, "dst": b} for v, a, b in moves]}
        if args.get("dry_run", False) or not moves:
            return {**result, "moves": [], "skipped": []}
        job = Job(envelope, req_id, deque(moves), k, result)
        self._jobs.append(job)
        self._job_step(job, now_ns)
        return None

    def _job_step(self, job: Job, now_ns: int) -> None:
        while job.queue and len(job.running) < job.max_concurrent:
            name, src, dst = job.queue.popleft()
            vm = self.c.inv.vms.get(name)
            h = self.c.inv.hosts.get(dst)
            why = ""
            if vm is None or vm.state != "active" or vm.host != src or vm.key in self.c.ops_by_key:
                why = f"{name} is no longer idle on {src}"
            elif h is None or h.state != "alive" or dst in self.c.inv.maintenance:
                why = f"{dst} no longer takes VMs"
            else:
                why = self.c.placement.rule_conflict(name, dst)
                # (a together group moves member by member: the members still on src are
                # going to dst in this plan, so only a member elsewhere is a conflict)
                if why.startswith("together") and all(
                        (v, src, dst) in job.queue for r in self.c.inv.rules_of(name) if r.kind == "together"
                        for v in r.vms if v != name and self.c.placement.location(v) == src):
                    why = ""
            if why:
                job.skipped.append({"vm": name, "src": src, "dst": dst, "why": why})
                continue
            vm.seq_issued = max(vm.seq, vm.seq_issued) + 1
            op = self.c.start_op("move", vm, src, dst, (dst, vm.seq_issued, False), now_ns)
            job.running.add(op.op_id)
            self._job_of[op.op_id] = job
        if not job.queue and not job.running:
            self._jobs.remove(job)
            load, _, _ = self.c.placement.balance_state(job.result["metric"], {})
            self._reply(job.envelope, job.req_id, True, {
                **job.result, "moves": [op.record(per_host=False) for op in job.ops], "skipped": job.skipped,
                "vms_per_host_after": {h: int(v) for h, v in load.items()} if job.result["metric"] == "vms" else {}})

