"""The simulator's judges: the safety monitor's record, full agreement after the faults, the
final checks of every table against the inventory, and the run's result."""

from __future__ import annotations

from typing import TYPE_CHECKING

from agent.mactable import MacTable, entry_hash
from agent.wire import MsgType
from dvswitch.stats import summarize_moves
from testbed.sim.config import concurrency_for, gossip_interval_ms, liveness_bound_ms, replay_command
from testbed.sim.scheduler import NS_PER_MS, ms

if TYPE_CHECKING:
    from testbed.sim.cluster import Agent

FULL_CHECK_ENTRIES = 2_000_000  # final checks compare every table in full up to this many entries
MSG_NAMES = {int(m): m.name for m in MsgType}


class Checks:
    """Safety, agreement and the result (a part of Simulator)."""

    def _init_checks(self) -> None:
        self.violations = 0
        self.violation_examples: list[dict] = []
        self.dirty = True
        self.last_change_ns = 0
        self.agree_ns: int | None = None
        self.settle_deadline_ns: int | None = None

    def safety_violation(self, host: str, key, old, new) -> None:
        self.violations += 1
        if len(self.violation_examples) < 5:
            self.violation_examples.append({
                "at_ms": ms(self.now), "host": host, "vlan": key[0], "mac": key[1],
                "held": [old.host, old.seq, old.tombstone], "applied": [new.host, new.seq, new.tombstone],
            })

    def _start_settling(self) -> None:
        bound = liveness_bound_ms(self.agent_config, len(self.hosts), self.ctl_config)
        settle = self.cfg.settle_ms if self.cfg.settle_ms is not None else 2 * bound
        self.settle_deadline_ns = self.f1_ns + settle * NS_PER_MS
        self.dirty = True
        self._probe()

    def _probe(self) -> None:
        if self.agree_ns is not None or self.stopped:
            return
        # An op before its switchover may still change the inventory; one that is converging
        # already set it (it may wait for APPLIED reports a partition cut: tables agree anyway).
        # (Until the controller's membership is right, e.g. a host killed for good is declared
        # dead, the tables are not judged and stay dirty: its verdict changes no table.)
        if self.dirty and self.ctl_up and all(op.phase == "converging" for op in self.controller.ops.values()) \
                and self.members_agree():
            self.dirty = False
            if self.agreement():
                self.agree_ns = max(self.f1_ns, self.last_change_ns)
                self.stop()
                return
        if self.now >= self.settle_deadline_ns:
            self.stop()
            return
        self.at(min(self.now + NS_PER_MS, self.settle_deadline_ns), self._probe)

    def members_agree(self) -> bool:
        """The controller's membership matches the processes (testbed/sim/faults.py knows them)."""
        return True

    def agreement(self) -> bool:
        """Every running agent holds the controller's expected table (digests first, then in
        full), and every VM runs on exactly the host the inventory names."""
        running = [a for a in self.current if a is not None]
        if not running:
            return True
        d = running[0].core.table.digest
        if any(a.core.table.digest != d for a in running):
            return False
        if running[0].core.table.as_placement() != self.controller.inv.expected_table():
            return False
        return not self.misplaced_vms(running)

    def misplaced_vms(self, running: list[Agent]) -> list[dict]:
        """VMs not active on exactly one running host, the one the inventory names (a move cut
        short by a crash must end done or rolled back, never on two hosts or on none; a VM of
        a host that died must run again elsewhere). With no agent running, nothing can run."""
        if not running:
            return []
        active: dict[tuple[int, int], list[str]] = {}
        for a in running:
            for port in a.core.switch.ports.values():
                if port.state == "active":
                    active.setdefault((port.vlan, port.mac), []).append(a.host)
        bad = []
        for vm in sorted(self.controller.inv.vms.values(), key=lambda v: v.number):
            on = active.pop(vm.key, [])
            if vm.state == "active" and on != [vm.host]:
                bad.append({"vm": vm.name, "inventory": vm.host, "active_on": on})
            elif vm.state != "active" and on:
                bad.append({"vm": vm.name, "inventory": vm.state, "active_on": on})
        return bad

    def final_checks(self) -> dict:
        """Every running agent's table against the controller's inventory. In full for every
        agent up to FULL_CHECK_ENTRIES entries in all; above that, in full once per distinct
        table digest (agents with equal digests, XOR of 64-bit blake2b hashes of every entry,
        port included, hold equal tables; the checked table's digest is recomputed first)."""
        expected = self.controller.inv.expected_table()
        running = [a for a in self.current if a is not None]
        full = sum(len(a.core.table) for a in running) <= FULL_CHECK_ENTRIES
        verdict: dict[int, dict | None] = {}  # digest -> None if equal, else the diff counts
        bad = []
        for a in running:
            table = a.core.table
            if full or table.digest not in verdict:
                actual = table.as_placement()
                if actual == expected and (full or _recomputed_digest(table) == table.digest):
                    verdict[table.digest] = None
                else:
                    verdict[table.digest] = {
                        "missing": sum(1 for k in expected if k not in actual),
                        "extra": sum(1 for k in actual if k not in expected),
                        "wrong": sum(1 for k in expected if k in actual and actual[k] != expected[k]),
                    }
            diff = verdict[table.digest]
            if diff is not None:
                bad.append({"host": a.host, **diff})
        bad_ports = self.misplaced_vms(running)
        ctl_live = set(self.controller.inv.live_hosts())
        not_live = [a.host for a in running if a.host not in ctl_live]
        agent_errors = sum(a.core.stats.handler_errors for a in running)
        last_errors = sorted({a.core.last_error for a in running if a.core.last_error})[:3]
        ctl = self.controller
        malformed = sum(a.core.stats.dropped_malformed for a in running) + ctl.dropped_malformed
        tables_ok = not bad
        ok = (tables_ok and not bad_ports and self.violations == 0 and agent_errors == 0
              and ctl.handler_errors == 0 and self.agree_ns is not None)
        return {
            "ok": ok,
            "tables_agree": tables_ok,
            "hosts_checked": len(running),
            "entries": len(expected),
            "mismatched_hosts": len(bad),
            "mismatch_examples": bad[:5],
            "vms_not_on_exactly_one_host": len(bad_ports),
            "vm_examples": bad_ports[:5],
            "running_but_dead_to_controller": not_live[:20],
            "safety_violations": self.violations,
            "safety_examples": self.violation_examples,
            "handler_errors": {"agents": agent_errors, "controller": ctl.handler_errors},
            "last_errors": last_errors + ([ctl.last_error] if ctl.last_error else []),
            "dropped_malformed": malformed,
        }

    def result(self) -> dict:
        cfg = self.cfg
        client = self.client
        checks = self.final_checks()
        bound = liveness_bound_ms(self.agent_config, len(self.hosts), self.ctl_config)
        summary = summarize_moves(client.records)
        k = max(1, len(client.records))
        msgs_moves = self.traffic_at_done[0] - self.traffic_at_f0[0]
        bytes_moves = self.traffic_at_done[1] - self.traffic_at_f0[1]
        after = None if self.agree_ns is None or self.f1_ns is None else ms(self.agree_ns - self.f1_ns)
        expected = len(client.records) if cfg.workload == "evacuate" else cfg.moves
        moves_ok = (summary["converged"] + client.interrupted == summary["moves"] == expected
                    and client.error is None)
        if cfg.workload == "evacuate":
            # The host must end empty, in maintenance.
            moves_ok = moves_ok and client.evacuated and not any(
                vm.host == "h1" and vm.state == "active" for vm in self.controller.inv.vms.values())
        out = {
            "config": {
                "hosts": cfg.hosts, "vms": cfg.vms, "moves": cfg.moves, "seed": cfg.seed,
                "loss": cfg.net.loss, "dup": cfg.net.dup, "reorder": cfg.net.reorder,
                "partitions": [p.spec() for p in cfg.partitions],
                "crashes": [c.spec() for c in cfg.crashes],
                "move_rate": cfg.move_rate, "fault_ms": cfg.fault_ms,
                "concurrency": None if cfg.move_rate is not None else concurrency_for(cfg),
                "base_latency_us": cfg.net.base_latency_us, "jitter_mean_us": cfg.net.jitter_mean_us,
                "rx_tick_ns": cfg.net.rx_tick_ns,
                "gossip_interval_ms": gossip_interval_ms(self.agent_config, cfg.hosts),
                "heartbeat_budget_per_s": self.agent_config.heartbeat_budget_per_s,
            },
            "replay": replay_command(cfg),
            "ready_ms": None if client.ready_ns is None else ms(client.ready_ns),
            "create": client.create_summary,
            "moves": {
                **summary,
                # In flight when the controller crashed: done or rolled back, as the final
                # checks (tables, one active port per VM) judge; not counted as failed.
                "interrupted": client.interrupted,
                "failed": [r for r in client.records if not r["converged"] and not r.get("interrupted")][:20],
            },
            "traffic": {
                "messages": self.msgs,
                "bytes": self.bytes,
                "messages_per_move": round(msgs_moves / k, 1),
                "bytes_per_move": round(bytes_moves / k, 1),
                "lost": self.lost,
                "duplicated": self.duplicated,
                "cut_by_partition": self.cut,
                "undeliverable": self.undeliverable,
                "by_type": {MSG_NAMES.get(t, str(t)): {"messages": c[0], "bytes": c[1]}
                            for t, c in sorted(self.by_type.items())},
            },
            "faults": {
                "start_ms": None if self.f0_ns is None else ms(self.f0_ns),
                "stop_ms": None if self.f1_ns is None else ms(self.f1_ns),
                "crashes": self.crash_log,
            },
            "agreement": {
                "reached": self.agree_ns is not None,
                "at_ms": None if self.agree_ns is None else ms(self.agree_ns),
                "after_faults_ms": after,
                "bound_ms": bound,
                "within_bound": after is not None and after <= bound,
            },
            "checks": checks,
            "error": client.error,
            "client_warnings": client.warnings,
            "end_ms": ms(self.now),
            "events": self.events,
            "ok": bool(moves_ok and checks["ok"]),
        }
        if self.wrappers:  # (only when a rule narrowed to hosts, peers or types was in force)
            out["faults"]["receivers"] = self.receivers_report()
        if cfg.workload != "moves":  # (only then: every other run's output stays as it was)
            out["config"]["workload"] = cfg.workload
            out["evacuate"] = {"host": "h1", "answered": client.evacuated, "max_concurrent": concurrency_for(cfg),
                               "elapsed_ms": client.evac_elapsed_ms,
                               "vms_left": sum(1 for vm in self.controller.inv.vms.values()
                                               if vm.host == "h1" and vm.state == "active")}
        return out


def _recomputed_digest(table: MacTable) -> int:
    d = 0
    for (vlan, mac), e in table.items():
        d ^= entry_hash(vlan, mac, e)
    return d
