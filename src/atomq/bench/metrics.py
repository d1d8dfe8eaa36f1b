"""Latency summaries shared by the throughput and serving benchmarks."""

from __future__ import annotations

from typing import Iterable

import numpy as np


def summarize(values: Iterable[float | None]) -> dict[str, float] | None:
    """{"mean", "p50", "p90", "p99", "max"} of the values that are not None (numpy's linear
    interpolation between order statistics), in the values' unit; None when there are none."""
    xs = np.array([v for v in values if v is not None], dtype=np.float64)
    if xs.size == 0:
        return None
    p50, p90, p99 = np.percentile(xs, [50, 90, 99])
    return {"mean": float(xs.mean()), "p50": float(p50), "p90": float(p90), "p99": float(p99),
            "max": float(xs.max())}
