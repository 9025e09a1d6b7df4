"""Repair hints: a converging op whose update some live agents still lack (PUB/SUB lost it)
gets a hint sent to them, naming the entry or its origin, so they take it or pull it now
instead of at the origin's next heartbeat. This component keeps when hosts last reported and
decides who gets which hint; the coordinator sends them.
"""

from __future__ import annotations

from collections.abc import Callable

from agent import wire
from agent.wire import MsgType
from controller.ops import Phase

NS_PER_MS = 1_000_000
# Repair hint frames sent per controller tick at most: a backlog of thousands of converging
# ops (a cold start) must not turn into hundreds of thousands of hints at once.
HINTS_PER_TICK_MAX = 2_000
# A busy host (its apply reports keep arriving) is spared hints for this many hint delays.
BUSY_GRACE = 4


class RepairHints:
    def __init__(self, repair_hint_after_ms: int, event: Callable[..., None]) -> None:
        self._event = event  # the coordinator's event log: one repair.hint per hint sent
        self._hint_ns = repair_hint_after_ms * NS_PER_MS  # 0: no hints
        self.repair_hints = 0  # hint frames sent, counted for status
        self._last_applied_ns: dict[str, int] = {}  # host -> when its last apply report arrived
        self._late_report_ns = -(1 << 62)  # when we last read an apply report late (see due)

    def report_arrived(self, host: str, oldest_ns: int, now_ns: int) -> None:
        """An apply report from `host` whose oldest apply is stamped `oldest_ns`."""
        self._last_applied_ns[host] = now_ns
        if now_ns - oldest_ns > self._hint_ns:
            # We read this report later than the hint delay after its oldest apply (rows and
            # ranges are in apply order): we, not PUB/SUB, are the laggard (see due).
            self._late_report_ns = now_ns

    def due(self, now_ns: int, ops, inv, applies, rank: dict[str, int]) -> list[tuple[list, bytes]]:
        """The hints to send now, `(route, frame)` in order: tell the agents a converging op
        still waits for what they lack. PUB/SUB lost their copy of the update, and they would
        only notice at its origin's next heartbeat. `rank`: host -> registration order."""
        out: list[tuple[list, bytes]] = []
        if now_ns - self._late_report_ns < 2 * self._hint_ns:
            # Lately we read apply reports later than the hint delay after the applies themselves:
            # the missing reports are most likely in our own queue. Hints would only add to it.
            return out
        max_every = 16 * self._hint_ns
        budget = HINTS_PER_TICK_MAX
        # A host whose apply reports keep arriving is likely not a laggard that PUB/SUB left
        # behind: it is busy (or we are behind on its reports, as in a cold start of thousands
        # of ports), and hints would only add load; it gets one once its reports pause, or once
        # the op has waited BUSY_GRACE hint delays (a host applying a steady stream of other
        # moves may never pause, and its lost update would wait for the op's timeout). Unless
        # its reports show it current: its latest apply of another move came within half a hint
        # delay of that move's switchover, so a backlog is not what keeps this one from it.
        quiet_since = now_ns - self._hint_ns
        grace_ns = BUSY_GRACE * self._hint_ns
        last_report = self._last_applied_ns
        lag = applies.lag_ns
        current_ns = self._hint_ns // 2
        hosts = inv.hosts
        for op in ops.values():
            if op.phase is not Phase.CONVERGING or not op.next_hint_ns or now_ns < op.next_hint_ns:
                continue
            if budget <= 0:
                break  # the rest wait for the next tick
            op.hint_every_ns = min(op.hint_every_ns * 3 // 2, max_every)
            op.next_hint_ns = now_ns + op.hint_every_ns
            origin = inv.hosts.get(op.target[0])
            vm = inv.vms.get(op.vm)
            if origin is None or origin.state == "dead" or vm is None:
                continue
            host, seq, tomb = op.target
            if tomb:
                # The tombstone's port name is the origin's to say: point to the origin instead.
                hint = {"origin": host, "incarnation": origin.incarnation}
            else:
                # The entry exactly as the target claimed it (ATTACH/SWITCHOVER carried vm.port):
                # one reliable message settles it, and the merge rule keeps it safe.
                hint = {"origin": host, "incarnation": origin.incarnation,
                        "entry": [vm.vlan, vm.mac, host, vm.port, seq, False]}
                if op.claim is not None and op.claim[0] == origin.incarnation:
                    # The origin's number for it: the agent marks it held and pulls no gap.
                    hint["n"] = op.claim[1]
            frame = wire.encode(MsgType.REQUEST, [0, "repair", hint])
            patient = now_ns - op.converging_ns < grace_ns
            # The live hosts that have not applied it, in registration order (a set difference,
            # not a pass over every host per op: at 1,000 hosts some 200 of them lack it).
            for name in sorted(applies.lacking(op), key=rank.__getitem__):
                if (name != host and (not patient or last_report.get(name, quiet_since) <= quiet_since
                                      or lag.get(name, current_ns + 1) <= current_ns)):
                    self.repair_hints += 1
                    n = op.claim[1] if op.claim is not None and op.claim[0] == origin.incarnation else 0
                    self._event("repair.hint", host=name, origin=host, lo=n, hi=n)
                    budget -= 1
                    out.append((hosts[name].route, frame))
        return out
