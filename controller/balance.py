"""Rebalance planning (DRS-like): pure functions over a snapshot of who runs where.

A plan is a list of moves `(vm, src, dst)` that brings the spread of per-host load (the most
loaded host's minus the least loaded one's) down to a threshold. Each step takes a unit (one
VM, or a `together` group that sits on one host) from the most loaded host and puts it on the
least loaded host it may go to under the anti-affinity rules, picking the unit whose weight is
closest to half the spread (the step that shrinks it most). With every VM weighing 1 (metric
`vms`) each step lowers the excess above the target by one VM, which no single move can beat,
so the plan has the fewest moves possible; with frame rates as weights (metric `traffic`) it
is the usual greedy heuristic (the exact problem is bin packing).
"""

from __future__ import annotations

from collections.abc import Callable

# Plans longer than this are cut (a cluster of thousands of VMs piled on one host still gets a
# plan in bounded time; run rebalance again for the rest).
PLAN_MOVES_MAX = 10_000


def spread(load: dict[str, float]) -> float:
    return max(load.values()) - min(load.values()) if load else 0.0


def plan(load: dict[str, float], units: list[tuple[str, list[str], float]], limit: float,
         allowed: Callable[[list[str], str, dict[str, str]], bool], order: Callable[[str], tuple]
         ) -> list[tuple[str, str, str]]:
    """Moves (vm, src, dst) that bring `spread(load)` to `limit` or as close as single steps get.

    `load`: host -> load, for every host that may take VMs (changed in place: the planned
    state). `units`: (host, vms, weight) that may move as one. `allowed(vms, dst, planned)`:
    may `vms` go to `dst`, given the planned hosts so far (vm -> host). `order`: host sort key."""
    by_host: dict[str, list[tuple[list[str], float]]] = {}
    for host, vms, w in units:
        if host in load and w > 0:
            by_host.setdefault(host, []).append((vms, w))
    planned: dict[str, str] = {}
    moves: list[tuple[str, str, str]] = []
    while len(moves) < PLAN_MOVES_MAX and load:
        src = min(load, key=lambda h: (-load[h], order(h)))  # the most loaded (ties: h2 before h10)
        gap = load[src] - min(load.values())
        if gap <= limit:
            break
        best = None
        for dst in sorted(load, key=lambda h: (load[h], order(h))):
            room = load[src] - load[dst]
            if room <= 0:
                break
            for i, (vms, w) in enumerate(by_host.get(src, ())):
                # Only a unit lighter than the room lowers the top without making dst the new top.
                if w >= room or not allowed(vms, dst, planned):
                    continue
                score = abs(room / 2 - w)
                if best is None or score < best[0]:
                    best = (score, i, dst)
            if best is not None:
                break  # the least loaded host that can take something: go there
        if best is None:
            break  # nothing on the top host can go anywhere that helps
        _, i, dst = best
        vms, w = by_host[src].pop(i)
        by_host.setdefault(dst, []).append((vms, w))
        load[src] -= w
        load[dst] += w
        for v in vms:
            planned[v] = dst
            moves.append((v, src, dst))
    return moves
