"""Statistics every report uses: the one percentile definition and the move summary (pure).

Percentiles are nearest-rank (the value at rank ceil(q/100 * n) of the sorted values): always a
value that was measured, never an interpolation, so a p99 of 100 moves is the 99th slowest of
them and a p50 of an even count is the lower of the two middle values.
"""

from __future__ import annotations

from collections.abc import Iterable


def percentile(values: Iterable[float], q: float) -> float | None:
    """Nearest-rank percentile, q in 0..100 (0 gives the smallest value); None for no values."""
    s = sorted(values)
    if not s:
        return None
    rank = max(1, min(len(s), int(-(-q * len(s) // 100))))
    return s[rank - 1]


def summarize_moves(records: list[dict]) -> dict:
    """Counts and convergence latency over move records (`converged`, `latency_ms` in ms):
    moves, converged, latency_ms_p50, latency_ms_p99, latency_ms_max (None without a converged one)."""
    lat = [r["latency_ms"] for r in records if r["converged"] and r["latency_ms"] is not None]
    return {
        "moves": len(records),
        "converged": sum(1 for r in records if r["converged"]),
        "latency_ms_p50": percentile(lat, 50),
        "latency_ms_p99": percentile(lat, 99),
        "latency_ms_max": max(lat) if lat else None,
    }


def distribution(values: list[float]) -> dict:
    """count, p50, p90, p99, max and mean of `values` (None for each without values)."""
    return {
        "count": len(values),
        "p50": percentile(values, 50),
        "p90": percentile(values, 90),
        "p99": percentile(values, 99),
        "max": max(values) if values else None,
        "mean": sum(values) / len(values) if values else None,
    }
