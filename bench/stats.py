"""Latency statistics: percentiles, summaries, and medians over repeats."""

from __future__ import annotations

import math
import statistics
from collections.abc import Iterable, Sequence

# Percentiles kept for every latency set (the plot's "spectrum" uses all of them).
SPECTRUM_PERCENTILES = (0.0, 50.0, 75.0, 90.0, 95.0, 99.0, 99.9, 99.99, 100.0)


def percentile(sorted_values: Sequence[float], pct: float) -> float:
    """Nearest-rank percentile of already sorted values (NaN for none)."""
    if not sorted_values:
        return math.nan
    if pct <= 0:
        return sorted_values[0]
    rank = math.ceil(pct / 100.0 * len(sorted_values))
    return sorted_values[min(len(sorted_values), max(1, rank)) - 1]


def summarize(values: Iterable[float]) -> dict[str, float]:
    """count, mean, p50, p90, p99, p99.9 and max of ``values`` (same unit as given)."""
    ordered = sorted(values)
    if not ordered:
        return {"count": 0, "mean": math.nan, "p50": math.nan, "p90": math.nan,
                "p99": math.nan, "p999": math.nan, "max": math.nan}
    return {
        "count": len(ordered),
        "mean": statistics.fmean(ordered),
        "p50": percentile(ordered, 50),
        "p90": percentile(ordered, 90),
        "p99": percentile(ordered, 99),
        "p999": percentile(ordered, 99.9),
        "max": ordered[-1],
    }


def spectrum(values: Iterable[float]) -> list[tuple[float, float]]:
    """(percentile, value) pairs at SPECTRUM_PERCENTILES, for plots and the JSON."""
    ordered = sorted(values)
    return [(p, percentile(ordered, p)) for p in SPECTRUM_PERCENTILES]


def median(values: Iterable[float]) -> float:
    """Median ignoring NaNs; NaN when nothing is left."""
    kept = [v for v in values if not math.isnan(v)]
    return statistics.median(kept) if kept else math.nan


def ratio(numerator: float, denominator: float) -> float:
    """numerator / denominator, NaN when undefined."""
    if math.isnan(numerator) or math.isnan(denominator) or denominator <= 0:
        return math.nan
    return numerator / denominator
