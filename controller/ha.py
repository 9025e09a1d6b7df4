"""HA restarts: which VMs wait for a restart, when to try them again, and the restart budget.

The coordinator restarts a VM (it starts the op); this component keeps what decides whether
and when: VMs whose restart could not run yet (no live host, a refusal), VMs that must
re-claim even on a live host, the per-VM budget of restarts within a window, and the
registration burst during which VMs of hosts not back yet are left waiting for them.
No I/O, no clock.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Mapping

from controller.config import ControllerConfig
from controller.inventory import Inventory, Vm

NS_PER_MS = 1_000_000
# Restarts waiting for registrations to pause wait this many placement_settle_ms at most.
SETTLE_WINDOWS_MAX = 5


class Restarts:
    def __init__(self, config: ControllerConfig, inv: Inventory) -> None:
        self.config = config
        # VMs that need a restart we could not do yet (no live host, or the target refused),
        # by name -> earliest retry time (ns). Retried from the coordinator's timer.
        self.pending: dict[str, int] = {}
        self.needs_claim: dict[str, bool] = {}  # deferred restarts that must re-claim even on a live host
        self.budget_exhausted = 0  # VMs parked by the budget, counted for status
        self._times: dict[str, deque[int]] = {}  # VM -> its recent restart times (ns)
        self._parked: set[str] = set()  # VMs whose restart budget ran out (their event is out)
        self.unplaceable_noted: set[str] = set()  # VMs whose "cannot restart" event is out
        self._last_register_ns = -(1 << 62)
        self._burst_start_ns = -(1 << 62)
        self._settle_ns = config.placement_settle_ms * NS_PER_MS
        for vm in inv.vms.values():
            if vm.state == "lost":
                # Journaled when its host restarted under it; we crashed before it ran again.
                vm.state = "active"
                self.needs_claim[vm.name] = True
                self.pending[vm.name] = 0

    def registered(self, now_ns: int) -> None:
        """A host registered: a run of registrations (every agent back after an outage) holds
        back the restarts of VMs whose host may yet come back."""
        if now_ns - self._last_register_ns >= self._settle_ns:
            self._burst_start_ns = now_ns  # the first of a run of registrations
        self._last_register_ns = now_ns

    def defer(self, vm: Vm, now_ns: int) -> None:
        self.pending[vm.name] = now_ns + self.config.command_retry_ms * NS_PER_MS

    def due(self, now_ns: int, inv: Inventory, ops_by_key: Mapping, is_admitted: Callable[[str], bool]
            ) -> list[Vm]:
        """The VMs to restart now, in VM order (each off the pending list)."""
        due = [n for n, t in self.pending.items() if now_ns >= t]
        if not due:
            return []
        # Hosts still registering (every agent restarting after a full outage): a VM whose host
        # is not up may yet see it come back and go home. Place the others once registrations
        # have been quiet for a while, so they spread over every host that came back.
        # (For SETTLE_WINDOWS_MAX windows at most: hosts that keep registering must not starve them.)
        settling = (now_ns - self._last_register_ns < self._settle_ns
                    and now_ns - self._burst_start_ns < SETTLE_WINDOWS_MAX * self._settle_ns)
        out = []
        for name in sorted(due, key=lambda n: inv.vms[n].number if n in inv.vms else 0):
            vm = inv.vms.get(name)
            h = inv.hosts.get(vm.host) if vm is not None else None
            if vm is not None and settling and (h is None or h.state == "dead") and is_admitted(vm.host):
                continue  # stays pending: retried at a later tick
            del self.pending[name]
            if vm is None or vm.state != "active" or vm.key in ops_by_key:
                continue
            if h is None or h.state != "alive" or self.needs_claim.pop(name, False):
                out.append(vm)
        return out

    def allow(self, vm: Vm, now_ns: int) -> tuple[bool, int | None]:
        """The restart budget: at most `restart_budget` restarts of one VM within
        `restart_budget_window_ms`. Past it the VM is parked (one event, a counter): no restart
        until the oldest leaves the window, and meanwhile what agents report of it is adopted.
        Returns (allowed, ms until the next try when the VM was parked just now, else None)."""
        budget = self.config.restart_budget
        if budget <= 0:
            return True, None
        window_ns = self.config.restart_budget_window_ms * NS_PER_MS
        times = self._times.get(vm.name)
        if times is None:
            times = self._times[vm.name] = deque()
        while times and now_ns - times[0] >= window_ns:
            times.popleft()
        if len(times) < budget:
            times.append(now_ns)
            self._parked.discard(vm.name)
            return True, None
        parked_now = None
        if vm.name not in self._parked:
            self._parked.add(vm.name)
            self.budget_exhausted += 1
            parked_now = (times[0] + window_ns - now_ns) // NS_PER_MS
        self.needs_claim[vm.name] = True
        self.pending[vm.name] = times[0] + window_ns
        return False, parked_now

    def refund(self, vm: Vm) -> None:
        """The restart `allow` counted did not happen (nowhere to place it): it costs no budget."""
        if vm.name in self._times and self._times[vm.name]:
            self._times[vm.name].pop()
