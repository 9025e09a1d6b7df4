"""The client API: one handler per method (`dvs` and the lab call them over the controller's
ROUTER socket as REQUEST [req_id, method, args]). A handler validates its arguments whole,
then asks the coordinator to act (start ops, journal a change) and returns the reply, or
None when the reply comes later (when the ops it started finish). A bad request raises
ApiError, whose text is the one-line error the client shows.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from agent import wire
from agent.wire import MsgType
from controller.inventory import RULE_KINDS, Host, Rule, Vm
from controller.ops import Op, Phase
from dvswitch.naming import host_order

NS_PER_MS = 1_000_000
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
# Error text of a request that may succeed if sent again shortly: `dvs vm move` retries it.
RETRY_PREFIX = "retry: "
RULES_MAX = 10_000
RULE_VMS_MAX = 64


@dataclass
class Batch:
    """A client request waiting for one or more ops to finish."""

    envelope: list
    req_id: int
    pending: set[int]
    ops: list[Op]
    single: bool
    per_host: bool  # records carry each host's apply time (only for a single op: MBs otherwise)


class ApiError(Exception):
    """A client asked for something impossible: the message says what and what to do."""


class ClientApi:
    def __init__(self, coordinator) -> None:
        self.c = coordinator  # the ControllerCore: its inventory, ops and actions
        # Methods the runtime adds (args -> result; a ValueError is the caller's fault), e.g.
        # `profile` (dvswitch/profiling.py): process matters the pure core knows nothing of.
        self.runtime_methods: dict = {}

    def _reply(self, envelope: list, req_id: int, ok: bool, result) -> None:
        self.c.outbox.append((envelope, wire.encode(MsgType.REPLY, [req_id, ok, result])))

    def handle(self, envelope: list, body: list, now_ns: int) -> None:
        """One client REQUEST: the handler named `api_<method>` of this API, of membership
        (wait_ready) or of maintenance answers it."""
        req_id, method, args = body
        name = f"api_{method}"
        handler = (getattr(self, name, None) or getattr(self.c.members, name, None)
                   or getattr(self.c.maint, name, None))
        if handler is None and method in self.runtime_methods:
            fn = self.runtime_methods[method]
            handler = lambda args, now_ns, envelope, req_id: fn(args)  # noqa: E731
        if handler is None:
            self._reply(envelope, req_id, False, f"unknown method {method!r}")
            return
        try:
            result = handler(args, now_ns, envelope, req_id)
        except ApiError as e:
            self._reply(envelope, req_id, False, str(e))
            return
        except (KeyError, TypeError, ValueError, OverflowError) as e:
            self._reply(envelope, req_id, False, f"bad arguments for {method}: {e}")
            return
        if result is not None:
            self._reply(envelope, req_id, True, result)

    def api_status(self, args, now_ns, envelope, req_id) -> dict:
        return {
            "hosts": [h.describe() for h in sorted(self.c.inv.hosts.values(), key=lambda h: host_order(h.name))],
            "vms": sum(1 for v in self.c.inv.vms.values() if v.state != "deleted"),
            "ops_in_flight": len(self.c.ops),
            # Agents asked to batch apply reports (controller/reportpace.py), the smoothed ops in
            # flight that decides it, and the notices sent to agents so far.
            "report_pacing": {"batching": self.c.pacing.batching, "batch_ms": self.c.pacing.interval_ms(),
                              "ops_in_flight_smoothed": round(self.c.pacing.load, 2),
                              "notices": self.c.pacing.notices},
            "moves_done": len(self.c.history),
            "peers_epoch": self.c.members.peers_epoch,
            "repair_hints": self.c.hints.repair_hints,
            "dropped_malformed": self.c.dropped_malformed,
            "handler_errors": self.c.handler_errors,
            "last_error": self.c.last_error,
            "refused_registrations": self.c.refused_registrations,
            "restart_budget_exhausted": self.c.restarts.budget_exhausted,
            "ready_waiters": self.c.members.ready_pending,
            "admitted": None if self.c.admitted is None else sorted(self.c.admitted, key=host_order),
            "maintenance": sorted(self.c.inv.maintenance, key=host_order),
            "rules": len(self.c.inv.rules),
        }

    def api_host_add(self, args, now_ns, envelope, req_id) -> dict:
        """Admit a host name: from now on it may register (and its agent join the mesh)."""
        name = args["name"]
        if not isinstance(name, str) or not NAME_RE.match(name):
            raise ApiError(f"bad host name {name!r}: use letters, digits, '-', '_' or '.', at most 64")
        added = self.c.members.admit(name)
        return {"host": name, "added": added, "registered": name in self.c.inv.hosts}

    def api_vm_list(self, args, now_ns, envelope, req_id) -> dict:
        include_deleted = bool(args.get("all", False))
        vms = [vm.describe() for vm in self.c.inv.vms.values() if include_deleted or vm.state != "deleted"]
        return {"vms": vms}

    def api_expected_table(self, args, now_ns, envelope, req_id) -> dict:
        return {"entries": [[k[0], k[1], h, s, t] for k, (h, s, t) in self.c.inv.expected_table().items()],
                "live_hosts": self.c.inv.live_hosts()}

    def api_applied_log(self, args, now_ns, envelope, req_id) -> dict:
        """Applies reported since index `since` (as returned by the previous call), at most `limit`."""
        since, limit = int(args.get("since", 0)), min(int(args.get("limit", 20_000)), 50_000)
        total = self._applied_total()
        first = total - len(self.c.applied_log)
        start = max(since, first)
        rows = [list(r) for r in list(self.c.applied_log)[start - first : start - first + limit]]
        return {"from": start, "next": start + len(rows), "lost": max(0, first - since), "applies": rows}

    def _applied_total(self) -> int:
        return self.c.applies.applied_count

    def api_moves(self, args, now_ns, envelope, req_id) -> dict:
        last = int(args.get("last", 1000))
        hist = list(self.c.history)
        return {"moves": [op.record() for op in hist[-last:]] if last > 0 else []}

    def check_host(self, name: str, now_ns: int | None = None) -> Host:
        h = self.c.inv.hosts.get(name)
        if h is None:
            if now_ns is not None and self.awaited(name, now_ns):
                raise ApiError(f"{RETRY_PREFIX}host {name!r} has not registered again since the controller "
                               f"restarted (it has until {self.c.config.dead_after_ms} ms after the start); "
                               "send it again shortly")
            known = ", ".join(sorted(self.c.inv.hosts, key=host_order)) or "none"
            raise ApiError(f"unknown host {name!r} (known: {known})")
        if h.state == "dead":
            raise ApiError(f"host {name!r} is dead; pick a live host")
        return h

    def check_placement(self, vm: str, host: str, now_ns: int, extra: dict[str, str] | None = None) -> None:
        """An admin named `host` for `vm`: it must be live, not in maintenance, and fit the VM's rules."""
        self.check_host(host, now_ns)
        if host in self.c.inv.maintenance:
            raise ApiError(f"host {host!r} is in maintenance; pick another host or `dvs host activate {host}`")
        why = self.c.placement.rule_conflict(vm, host, extra)
        if why:
            raise ApiError(f"{vm} may not run on {host}: {why}; pick another host or remove the rule "
                           "(`dvs vm rule list`)")

    def awaited(self, name: str, now_ns: int) -> bool:
        """A host we know from the journal and may still hear from: we started less than the dead
        timeout ago, and it was admitted or ran VMs before."""
        if self.c.started_ns is not None and now_ns - self.c.started_ns > self.c.config.dead_after_ms * NS_PER_MS:
            return False
        if self.c.admitted is not None:
            return name in self.c.admitted
        return name in self.c.inv.incarnations

    def check_vm(self, name: str) -> Vm:
        vm = self.c.inv.vms.get(name)
        if vm is None or vm.state in ("deleted", "failed"):
            raise ApiError(f"unknown VM {name!r}; `dvs vm list` shows the VMs")
        if name in (op.vm for op in self.c.ops.values()):
            raise ApiError(f"VM {name!r} has an operation in flight; wait for it to finish")
        return vm

    def api_vm_create(self, args, now_ns, envelope, req_id) -> None:
        specs = args.get("vms")
        single = specs is None
        if single:
            specs = [[args["name"], args.get("host"), args.get("profile", "default")]]
        if not isinstance(specs, list) or not specs:
            raise ApiError("vm_create needs at least one VM")
        names = set()
        placed: dict[str, str] = {}  # this request's VMs so far: their rules see them too
        load = None
        for spec in specs:
            if not isinstance(spec, list) or len(spec) != 3:
                raise ApiError("each VM is [name, host, profile]")
            name, host, profile = spec
            if not isinstance(name, str) or not NAME_RE.match(name):
                raise ApiError(f"bad VM name {name!r}: use letters, digits, '-', '_' or '.', at most 64")
            if name in names or (name in self.c.inv.vms and self.c.inv.vms[name].state not in ("deleted", "failed")):
                raise ApiError(f"VM {name!r} already exists")
            names.add(name)
            if profile not in self.c.inv.profiles:
                raise ApiError(f"unknown port profile {profile!r} (known: {', '.join(self.c.inv.profiles)})")
            if host is None:
                # No host named: the scorer picks one (as for an HA restart).
                if load is None:
                    load = self.c.placement.load()
                host = self.c.placement.place(load, None, name, placed)
                if host is None:
                    raise ApiError(f"cannot place {name}: {self.c.placement.why_unplaceable(name, placed)}")
                spec[1] = host
            else:
                self.check_placement(name, host, now_ns, placed)
            placed[name] = host
        ops = []
        for name, host, profile in specs:
            vm = self.c.inv.new_vm(name, host, profile)
            self.c.persist(vm)
            ops.append(self.c.start_op("create", vm, host, host, (host, 0, False), now_ns))
        self.wait(envelope, req_id, ops, single)

    def api_vm_move(self, args, now_ns, envelope, req_id) -> None:
        vm = self.check_vm(args["name"])
        dst = args["to"]
        # "per_host": false leaves each host's apply time out of the reply (1,000 of them at
        # 1,000 hosts; a client that wants the latency alone, as the simulator's, asks so).
        per_host = args.get("per_host", True)
        if type(per_host) is not bool:
            raise ApiError(f"per_host must be true or false, not {per_host!r}")
        self.check_placement(vm.name, dst, now_ns)
        if vm.host not in self.c.inv.hosts:
            if self.awaited(vm.host, now_ns):
                raise ApiError(f"{RETRY_PREFIX}{vm.name}'s host {vm.host!r} has not registered again since the "
                               "controller restarted; send it again shortly")
            raise ApiError(f"VM {vm.name!r} is on {vm.host}, which is no member now; wait for HA to restart it")
        if vm.host == dst:
            raise ApiError(f"VM {vm.name!r} is already on {dst}; pick another host")
        vm.seq_issued = max(vm.seq, vm.seq_issued) + 1
        op = self.c.start_op("move", vm, vm.host, dst, (dst, vm.seq_issued, False), now_ns)
        self.wait(envelope, req_id, [op], True, per_host)

    def api_vm_delete(self, args, now_ns, envelope, req_id) -> None:
        vm = self.check_vm(args["name"])
        if vm.host not in self.c.inv.hosts:
            prefix = RETRY_PREFIX if self.awaited(vm.host, now_ns) else ""
            raise ApiError(f"{prefix}VM {vm.name!r} is on {vm.host}, which has not registered (again) yet; "
                           "wait for it or for HA to restart the VM")
        if self.c.inv.hosts[vm.host].state == "dead":
            raise ApiError(f"VM {vm.name!r} is on dead host {vm.host}; wait for HA to restart it")
        vm.seq_issued = max(vm.seq, vm.seq_issued) + 1
        op = self.c.start_op("delete", vm, vm.host, vm.host, (vm.host, vm.seq_issued, True), now_ns)
        self.wait(envelope, req_id, [op], True)


    def api_rule_add(self, args, now_ns, envelope, req_id) -> dict:
        kind, vms = args["kind"], args["vms"]
        if kind not in RULE_KINDS:
            raise ApiError(f"rule kind must be anti or together, not {kind!r}")
        if not isinstance(vms, list) or not 2 <= len(vms) <= RULE_VMS_MAX or len(set(vms)) != len(vms) \
                or not all(isinstance(v, str) and NAME_RE.match(v) for v in vms):
            raise ApiError(f"a rule names 2..{RULE_VMS_MAX} distinct VMs, e.g. web1,web2")
        name = args.get("name") or next(f"rule{i}" for i in range(1, RULES_MAX + 2) if f"rule{i}" not in self.c.inv.rules)
        if not isinstance(name, str) or not NAME_RE.match(name):
            raise ApiError(f"bad rule name {name!r}: use letters, digits, '-', '_' or '.', at most 64")
        if name in self.c.inv.rules:
            raise ApiError(f"rule {name!r} exists already; remove it first or pick another name")
        if len(self.c.inv.rules) >= RULES_MAX:
            raise ApiError(f"{RULES_MAX} rules exist already")
        for r in self.c.inv.rules.values():
            if r.kind != kind and len(set(r.vms) & set(vms)) >= 2:
                both = sorted(set(r.vms) & set(vms))
                raise ApiError(f"{both[0]} and {both[1]} are in {r.kind} rule {r.name} already: "
                               "no placement could satisfy both rules")
        # The rule must hold now: never a rule the inventory already breaks.
        at = {v: self.c.placement.location(v) for v in vms}
        placed = [(v, h) for v, h in at.items() if h is not None]
        if kind == "anti":
            seen: dict[str, str] = {}
            for v, h in placed:
                if h in seen:
                    raise ApiError(f"{seen[h]} and {v} both run on {h}: move one first "
                                   f"(`dvs vm move {v} --to HOST`), then add the rule")
                seen[h] = v
        elif len({h for _, h in placed}) > 1:
            where = ", ".join(f"{v} on {h}" for v, h in placed)
            raise ApiError(f"the VMs run on different hosts ({where}): move them onto one host first")
        rule = Rule(name, kind, list(vms))
        self.c.inv.set_rule(rule, name)
        self.c.journal_out.append({"rule": name, "kind": kind, "vms": list(vms)})
        return rule.describe()

    def api_rule_list(self, args, now_ns, envelope, req_id) -> dict:
        out = []
        for r in self.c.inv.rules.values():
            d = r.describe()
            d["hosts"] = {v: self.c.placement.location(v) for v in r.vms}
            out.append(d)
        return {"rules": out}

    def api_rule_remove(self, args, now_ns, envelope, req_id) -> dict:
        name = args["name"]
        if name not in self.c.inv.rules:
            raise ApiError(f"no rule {name!r}; `dvs vm rule list` shows the rules")
        self.c.inv.set_rule(None, name)
        self.c.journal_out.append({"rule": name, "kind": "", "vms": []})
        return {"rule": name, "removed": True}

    def reply_batch(self, batch: Batch) -> None:
        # Per-host apply times only for a single op: a batch of 8,000 would make a reply of MBs.
        records = [op.record(per_host=batch.per_host) for op in batch.ops]
        if batch.single:
            op = batch.ops[0]
            if op.error and not op.converged and not op.switched:
                self._reply(batch.envelope, batch.req_id, False, op.error)
            else:
                self._reply(batch.envelope, batch.req_id, True, records[0])
        else:
            self._reply(batch.envelope, batch.req_id, True, {"ops": records})
        # Each op names its batch and the batch its ops: break the cycle, so a finished create
        # of 8,000 VMs (each op with an apply time per host) is freed now, not at the next full
        # collection (never, in the simulator, which runs with the collector off).
        batch.ops = []

    def wait(self, envelope: list, req_id: int, ops: list[Op], single: bool, per_host: bool = True) -> None:
        batch = Batch(envelope, req_id, {op.op_id for op in ops if op.phase is not Phase.DONE}, ops, single,
                      single and per_host)
        if not batch.pending:
            self.reply_batch(batch)
            return
        for op in ops:
            op.waiters.append(batch)
