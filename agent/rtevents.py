"""AgentRuntime's event log (dvswitch/events.py): where the core's events go (some rate-limited),
frame.dropped from the growth of the core's drop counters, fault.applied/cleared from the
`faults` API call, membership.epoch when the peer set changes, and a log line per MAC that
starts flapping.

A mixin of AgentRuntime (agent/runtime.py), so the code moved here unchanged; the attributes
it reads from the runtime are declared below."""

from __future__ import annotations

import logging

from agent.config import AgentConfig
from agent.core import AgentCore
from agent.faults import CONTROLLER, NetFaults, host_of_identity
from dvswitch.events import EventLog

log = logging.getLogger("agent")

# Core events written at most once a second per peer (dvswitch/events.py: EventLog.limited).
RATE_LIMITED = {"repair.pull"}

# The core's counters of frames (or parts of frames) it dropped: frame.dropped's `reason`.
DROP_COUNTERS = ("dropped_malformed", "dropped_unexpected", "forged_claims", "non_member_claims",
                 "non_member_messages")


def drops_total(s) -> int:
    """The sum of DROP_COUNTERS in the core's Stats `s`, spelled out: it runs after every frame the
    agent takes (tests/test_agent_events.py holds the two together)."""
    return s.dropped_malformed + s.dropped_unexpected + s.forged_claims + s.non_member_claims + s.non_member_messages


class RuntimeEvents:
    # Set by AgentRuntime: its host, config, core, faults and event log (NoEventLog until
    # _open_events, and when the agent runs without one), and what was last told.
    host: str
    config: AgentConfig
    core: AgentCore
    faults: NetFaults
    events: EventLog
    events_path: str | None

    def _open_events(self) -> None:
        if self.events_path:
            self.events = EventLog(self.events_path, self.host)
            if self.guard is not None:
                self.guard.events = self.events  # auth.failed / auth.forbidden
        self._drops_seen = 0  # the sum of the core's DROP_COUNTERS when last told
        self._drop_counts = dict.fromkeys(DROP_COUNTERS, 0)
        self._epoch_seen = 0

    def _dropped(self, channel: str, envelope, drops: int) -> None:
        """The core dropped (part of) a frame: say which counter grew and whose frame it was, at
        most once a second per (reason, peer) (dvswitch/events.py)."""
        s = self.core.stats
        now = {n: getattr(s, n) for n in DROP_COUNTERS}
        before = self._drop_counts
        self._drop_counts, self._drops_seen = now, drops
        if channel == "ctl":
            peer = CONTROLLER
        elif channel == "rpc":
            peer = host_of_identity(envelope[0]) if envelope else None
            peer = peer or "client"
        else:
            peer = envelope if isinstance(envelope, str) else "?"
        for reason in DROP_COUNTERS:
            if now[reason] != before[reason]:
                self.events.limited("frame.dropped", peer, reason=reason, channel=channel,
                                    count=now[reason] - before[reason], total=now[reason],
                                    message=f"dropped from {peer} on {channel}: {reason} "
                                            f"(+{now[reason] - before[reason]}, {now[reason]} so far)")

    def _configure_faults(self, args: dict) -> dict:
        """The `faults` API call (agent/faults.py), and an event per rule it adds or removes."""
        f = self.faults
        rules, blocked = dict(f.rules), set(f.blocked)
        out = f.configure(args)
        for rid, r in f.rules.items():
            if rules.get(rid) != r:
                self.events.emit("fault.applied", rule=r.to_json(), replaced=rid in rules,
                                 message=f"fault {rid} on what {self.host} receives: {_rule_text(r)}")
        for rid in rules.keys() - f.rules.keys():
            self.events.emit("fault.cleared", rule=rid, message=f"fault {rid} healed")
        if f.blocked != blocked:
            if f.blocked:
                self.events.emit("fault.applied", rule={"kind": "partition", "blocked": sorted(f.blocked)},
                                 message=f"partition: {self.host} hears nothing from {', '.join(sorted(f.blocked))}")
            else:
                self.events.emit("fault.cleared", rule="partition", message="partition healed")
        return out

    def _emit_core_event(self, event: dict) -> None:
        """An Emit effect: one event of the core's, stamped and written."""
        if event.get("kind") == "flap.suppressed":
            # Once per MAC as it starts flapping (the core tells nothing more while it flaps).
            # Logging every flapping MAC at each new flap, as this once did, made a long run of
            # moves write a quadratic log: 61,000 lines per agent after 4,000 moves of 1,280 VMs.
            log.warning("%s", event["message"])
        if event.get("kind") in RATE_LIMITED:  # (under heavy loss: many a second)
            fields = {k: v for k, v in event.items() if k not in ("kind", "peer")}
            self.events.limited(event["kind"], event.get("peer"), **fields)
        else:
            self.events.emit_many([event])

    def _tell_changes(self) -> None:
        """After the core's output: tell a new membership epoch."""
        core = self.core
        if core.peers_epoch != self._epoch_seen:
            self._epoch_seen = core.peers_epoch
            self.events.emit("membership.epoch", epoch=core.peers_epoch, hosts=len(core.peers) + 1,
                             message=f"membership epoch {core.peers_epoch}: {len(core.peers) + 1} hosts")


def _rule_text(r) -> str:
    what = f"delay {r.delay_ms:g} ms + up to {r.jitter_ms:g} ms" if r.kind == "delay" else f"{r.kind} p={r.p:g}"
    return what + (f" from {','.join(sorted(r.peers))}" if r.peers else "") + \
        (f" types {','.join(map(str, sorted(r.types)))}" if r.types else "")
