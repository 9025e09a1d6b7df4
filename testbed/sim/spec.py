"""Fault schedules of the simulator and their command-line syntax.

All times are virtual milliseconds counted from the moment the fault window opens (the
first VM move is sent, after the cluster is ready and the VMs are created).

Partitions, `START-END:GROUP/GROUP[/GROUP...]`:
    `1000-4000:h1-h3/h4,h5`   from 1 s to 4 s, agents {h1,h2,h3} | {h4,h5} | everyone else
    `500-2500:h2`              h2 cut off from the other agents
    `0-3000:h1-h4,ctl`         the controller (`ctl`) is in h1..h4's group: the others lose it too
A group lists hosts and host ranges separated by commas. Hosts named in no group form one more
group together. Messages between two groups are dropped; the partition heals at END. The
controller reaches every group (a separate management network) unless a group names `ctl`.
Several partitions: separate them with `;` or repeat the option; they must not overlap in time.

Crashes, `HOST@AT[-RESTART]`:
    `h3@1000-2500`    h3 crashes at 1 s and restarts at 2.5 s (a new incarnation)
    `h3@1000`         h3 crashes at 1 s and stays down
    `ctl@1000-2500`   the controller crashes at 1 s and restarts at 2.5 s from its journal
                      (it must restart: without it no move can finish)
Several crashes: separate them with `,` or `;`, or repeat the option. A host may crash again
only after it restarted.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from dvswitch.naming import host_name, host_number

CTL = "ctl"
_RANGE_RE = re.compile(r"^h(\d+)-h(\d+)$")
_TIMES_RE = re.compile(r"^(\d+)-(\d+)$")
_CRASH_RE = re.compile(r"^(h\d+|ctl)@(\d+)(?:-(\d+))?$")


class SpecError(ValueError):
    """A fault spec that does not parse or does not fit the cluster: one line saying why."""


@dataclass(frozen=True)
class Partition:
    start_ms: int
    end_ms: int
    groups: tuple[tuple[str, ...], ...]  # each group: host names and possibly "ctl"

    def spec(self) -> str:
        return f"{self.start_ms}-{self.end_ms}:" + "/".join(_compress(g) for g in self.groups)


@dataclass(frozen=True)
class Crash:
    host: str
    at_ms: int
    restart_ms: int | None = None

    def spec(self) -> str:
        return f"{self.host}@{self.at_ms}" + ("" if self.restart_ms is None else f"-{self.restart_ms}")


def _host_number(name: str, n_hosts: int, what: str) -> int:
    i = host_number(name)
    if i is None:
        raise SpecError(f"{what}: {name!r} is not a host name like h3")
    if not 1 <= i <= n_hosts:
        raise SpecError(f"{what}: host {name} does not exist (hosts are h1..h{n_hosts})")
    return i


def _group(text: str, n_hosts: int, what: str) -> tuple[str, ...]:
    out: list[str] = []
    for item in text.split(","):
        item = item.strip()
        if not item:
            raise SpecError(f"{what}: empty host name in group {text!r}")
        if item == CTL:
            out.append(CTL)
            continue
        m = _RANGE_RE.match(item)
        if m:
            lo, hi = int(m.group(1)), int(m.group(2))
            if lo > hi:
                raise SpecError(f"{what}: range {item} runs backwards")
            _host_number(host_name(lo), n_hosts, what)
            _host_number(host_name(hi), n_hosts, what)
            out.extend(host_name(i) for i in range(lo, hi + 1))
        else:
            _host_number(item, n_hosts, what)
            out.append(item)
    # Canonical order (hosts by number, then ctl): a group is a set, and its spec() prints it so.
    return tuple(sorted(out, key=lambda h: (h == CTL, host_number(h) or 0)))


def _pieces(specs: tuple[str, ...] | list[str], seps: str) -> list[str]:
    out = []
    for s in specs:
        for sep in seps[1:]:
            s = s.replace(sep, seps[0])
        out.extend(p.strip() for p in s.split(seps[0]) if p.strip())
    return out


def parse_partitions(specs: tuple[str, ...] | list[str], n_hosts: int) -> tuple[Partition, ...]:
    parts = []
    for text in _pieces(specs, ";"):
        what = f"partition {text!r}"
        if ":" not in text:
            raise SpecError(f"{what}: expected START-END:GROUP/GROUP, e.g. 1000-4000:h1-h3/h4-h6")
        times, groups_text = text.split(":", 1)
        m = _TIMES_RE.match(times.strip())
        if not m:
            raise SpecError(f"{what}: {times!r} is not START-END in virtual ms, e.g. 1000-4000")
        start, end = int(m.group(1)), int(m.group(2))
        if end <= start:
            raise SpecError(f"{what}: it must heal after it starts (END > START)")
        groups = tuple(_group(g, n_hosts, what) for g in groups_text.split("/"))
        seen: set[str] = set()
        for g in groups:
            for h in g:
                if h in seen:
                    raise SpecError(f"{what}: {h} is in two groups")
                seen.add(h)
        parts.append(Partition(start, end, groups))
    parts.sort(key=lambda p: p.start_ms)
    for a, b in zip(parts, parts[1:], strict=False):
        if b.start_ms < a.end_ms:
            raise SpecError(f"partitions {a.spec()!r} and {b.spec()!r} overlap in time; heal one first")
    return tuple(parts)


def _crash_order(c: Crash) -> int:
    return 0 if c.host == CTL else host_number(c.host)


def parse_crashes(specs: tuple[str, ...] | list[str], n_hosts: int) -> tuple[Crash, ...]:
    crashes = []
    for text in _pieces(specs, ",;"):
        m = _CRASH_RE.match(text)
        if not m:
            raise SpecError(f"crash {text!r}: expected HOST@AT or HOST@AT-RESTART in virtual ms, e.g. h3@1000-2500")
        host, at = m.group(1), int(m.group(2))
        restart = None if m.group(3) is None else int(m.group(3))
        if host == CTL:
            if restart is None:
                raise SpecError(f"crash {text!r}: the controller must restart (ctl@AT-RESTART), "
                                f"or no move could ever finish")
        else:
            _host_number(host, n_hosts, f"crash {text!r}")
        if restart is not None and restart <= at:
            raise SpecError(f"crash {text!r}: the restart must come after the crash")
        crashes.append(Crash(host, at, restart))
    crashes.sort(key=lambda c: (_crash_order(c), c.at_ms))
    for a, b in zip(crashes, crashes[1:], strict=False):
        if a.host == b.host and (a.restart_ms is None or b.at_ms <= a.restart_ms):
            raise SpecError(f"crashes {a.spec()!r} and {b.spec()!r}: {a.host} must restart before it crashes again")
    crashes.sort(key=lambda c: (c.at_ms, _crash_order(c)))
    return tuple(crashes)


def faults_end_ms(partitions: tuple[Partition, ...], crashes: tuple[Crash, ...]) -> int:
    """When the last scheduled partition heals or crash happens / restarts, in ms after the window opens."""
    t = 0
    for p in partitions:
        t = max(t, p.end_ms)
    for c in crashes:
        t = max(t, c.at_ms if c.restart_ms is None else c.restart_ms)
    return t


def _compress(group: tuple[str, ...]) -> str:
    """h1,h2,h3,h5,ctl -> h1-h3,h5,ctl (the canonical form printed in replay commands)."""
    nums = [host_number(h) for h in group if h != CTL]
    out = []
    i = 0
    while i < len(nums):
        j = i
        while j + 1 < len(nums) and nums[j + 1] == nums[j] + 1:
            j += 1
        out.append(host_name(nums[i]) if i == j else f"{host_name(nums[i])}-{host_name(nums[j])}")
        i = j + 1
    if CTL in group:
        out.append(CTL)
    return ",".join(out)
