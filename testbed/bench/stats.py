"""Small statistics helpers shared by the bench phases (no I/O)."""

from __future__ import annotations

from dvswitch.stats import distribution


def dist(values: list[float]) -> dict:
    """count, p50, p90, p99 (nearest rank: dvswitch.stats), max and mean of `values`."""
    return distribution(values)


def ratio(value: float | None, floor: float | None) -> float | None:
    """value / floor, or None when either is missing (or the floor is zero)."""
    if value is None or not floor:
        return None
    return value / floor


def ratios(d: dict, floor: dict, keys: tuple[str, ...] = ("p50", "p90", "p99", "max")) -> dict:
    return {k: ratio(d.get(k), floor.get(k)) for k in keys}


def mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None
