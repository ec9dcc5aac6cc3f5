"""Statistics for per-volume metrics: bootstrap confidence intervals, paired tests, a summary table.

Conventions (stated in every report):
- Confidence intervals are percentile bootstrap intervals of the mean over volumes (``scipy.stats.bootstrap``,
  resampling volumes with replacement, ``n_boot`` resamples, a fixed seed). With few volumes they understate
  the uncertainty; the report says so below 8 volumes.
- p-values are two-sided Wilcoxon signed-rank tests on the per-volume values of a method paired, by volume,
  with the best baseline for that metric (scipy defaults: zero differences discarded, exact null distribution
  for up to 50 pairs, normal approximation above). They are not adjusted for multiple comparisons.
- Missing values (``None`` or NaN) are left out; a volume missing from either method is left out of the pairs.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np

from medldm.errors import MedldmError

__all__ = ["bootstrap_ci", "paired_wilcoxon", "summarise"]

# Resampled values held at once by bootstrap_ci (bounds memory for large n).
_BOOT_CHUNK_VALUES = 1 << 22


def bootstrap_ci(
    values: Iterable[float], *, confidence: float = 0.95, n_boot: int = 10000, seed: int = 0
) -> tuple[float, float, float]:
    """Mean and percentile-bootstrap confidence interval of the mean.

    Args:
        values: finite numbers (one per volume).
        confidence: coverage of the interval, in (0, 1).
        n_boot: number of bootstrap resamples.
        seed: seed of the resampling; the same seed gives the same interval.

    Returns:
        ``(mean, low, high)``; a single value ``v`` gives ``(v, v, v)``.

    Raises:
        ValueError: no values, a non-finite value, or a bad ``confidence`` / ``n_boot``.
    """
    x = np.asarray(list(values) if not isinstance(values, np.ndarray) else values, dtype=np.float64).ravel()
    if x.size == 0:
        raise ValueError("bootstrap_ci needs at least one value")
    if not np.all(np.isfinite(x)):
        raise ValueError("bootstrap_ci needs finite values")
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    if n_boot < 1:
        raise ValueError(f"n_boot must be positive, got {n_boot}")
    mean = float(x.mean())
    if x.size == 1:
        return mean, mean, mean
    from scipy import stats

    result = stats.bootstrap(
        (x,),
        np.mean,
        confidence_level=confidence,
        n_resamples=n_boot,
        method="percentile",
        vectorized=True,
        batch=max(1, _BOOT_CHUNK_VALUES // x.size),
        rng=np.random.default_rng(seed),
    )
    return mean, float(result.confidence_interval.low), float(result.confidence_interval.high)


def paired_wilcoxon(a: Sequence[float], b: Sequence[float]) -> float | None:
    """Two-sided p-value of the Wilcoxon signed-rank test on paired values ``a[i]`` vs ``b[i]``.

    Uses ``scipy.stats.wilcoxon`` with its defaults (``zero_method="wilcox"``: zero differences are
    discarded; ``method="auto"``: exact null distribution up to 50 pairs, normal approximation above).

    Args:
        a: values of one method, one per volume.
        b: values of the other method for the same volumes, in the same order.

    Returns:
        The p-value, or ``None`` when there are fewer than 2 pairs or every difference is zero (the test is
        undefined there).

    Raises:
        ValueError: ``a`` and ``b`` differ in length or hold non-finite values.
    """
    from scipy import stats

    x = np.asarray(a, dtype=np.float64).ravel()
    y = np.asarray(b, dtype=np.float64).ravel()
    if x.shape != y.shape:
        raise ValueError(f"paired values differ in length: {x.size} vs {y.size}")
    if not (np.all(np.isfinite(x)) and np.all(np.isfinite(y))):
        raise ValueError("paired_wilcoxon needs finite values")
    if x.size < 2 or np.all(x - y == 0):
        return None
    return float(stats.wilcoxon(x, y, alternative="two-sided").pvalue)


def _value(row: Mapping, metric: str, where: str) -> float | None:
    v = row.get(metric)
    if v is None:
        return None
    try:
        v = float(v)
    except (TypeError, ValueError):
        raise MedldmError(f"{where}: {metric} is not a number: {v!r}") from None
    if math.isnan(v):
        return None
    if math.isinf(v):
        raise MedldmError(f"{where}: {metric} is infinite; an identical reconstruction? Leave it out or cap it")
    return v


def _method_order(rows: Sequence[Mapping], baselines: Sequence[str]) -> list[str]:
    seen = list(dict.fromkeys(str(r["method"]) for r in rows))
    return [m for m in baselines if m in seen] + [m for m in seen if m not in baselines]


def _values_by_method(rows: Sequence[Mapping], metrics: Sequence[str]):
    """{(method, metric): {volume: value}} over the rows, and the (volume, method) pairs seen; refuses rows
    without a volume or method, repeated pairs and values that are not finite numbers."""
    per: dict[tuple[str, str], dict[str, float]] = {}
    seen: set[tuple[str, str]] = set()
    for i, row in enumerate(rows):
        for key in ("volume", "method"):
            if row.get(key) is None:
                raise MedldmError(f"metrics row {i} has no {key!r}")
        volume, method = str(row["volume"]), str(row["method"])
        if (volume, method) in seen:
            raise MedldmError(f"metrics row {i}: volume {volume!r} appears twice for method {method!r}")
        seen.add((volume, method))
        for metric in metrics:
            v = _value(row, metric, f"metrics row {i} ({volume}, {method})")
            if v is not None:
                per.setdefault((method, metric), {})[volume] = v
    return per, seen


def summarise(
    rows: Sequence[Mapping],
    *,
    metrics: Sequence[str],
    higher_is_better: Mapping[str, bool],
    baselines: Sequence[str],
    confidence: float = 0.95,
    n_boot: int = 10000,
    seed: int = 0,
) -> list[dict]:
    """Per method and metric: n, mean, std, bootstrap CI, and the paired Wilcoxon p against the best baseline.

    Args:
        rows: one dict per (volume, method) with keys ``volume``, ``method`` and metric values (float or None).
        metrics: the metric keys to summarise.
        higher_is_better: direction of each metric.
        baselines: method names that are baselines; the best of them (best mean for the metric, in its
            direction) is the reference of the paired tests. Baselines get no p-value.
        confidence: coverage of the bootstrap intervals.
        n_boot: bootstrap resamples.
        seed: bootstrap seed.

    Returns:
        A flat list of dicts, baselines first (in ``baselines`` order), then the other methods in order of
        appearance; metrics in ``metrics`` order within a method. Keys: ``method``, ``metric``,
        ``higher_is_better``, ``is_baseline``, ``n``, ``n_missing``, ``mean``, ``std``, ``ci_low``, ``ci_high``,
        ``confidence``, ``best_baseline`` (None when no baseline has values), ``n_pairs`` and ``p_value``
        (against ``best_baseline``; None for baselines and where the test is undefined). Numbers are plain
        floats or None, ready for JSON.

    Raises:
        MedldmError: a row without ``volume``/``method``, a repeated (volume, method), a metric without a
            direction, or a value that is not a finite number.
    """
    for metric in metrics:
        if metric not in higher_is_better:
            raise MedldmError(f"no direction (higher or lower is better) given for metric {metric!r}")
    per, seen = _values_by_method(rows, metrics)

    methods = _method_order(rows, baselines)
    n_rows = {m: sum(1 for _, meth in seen if meth == m) for m in methods}
    table: list[dict[str, Any]] = []
    for metric in metrics:
        hib = bool(higher_is_better[metric])
        stats: dict[str, tuple[float, float, float] | None] = {}
        for method in methods:
            values = list(per.get((method, metric), {}).values())
            stats[method] = bootstrap_ci(values, confidence=confidence, n_boot=n_boot, seed=seed) if values else None
        scored = [(st[0], m) for m in baselines if (st := stats.get(m)) is not None]
        best = None
        if scored:
            best = (max if hib else min)(scored, key=lambda t: t[0])[1]
        for method in methods:
            vals_by_vol = per.get((method, metric), {})
            vals = np.array(list(vals_by_vol.values()))
            is_baseline = method in baselines
            p, n_pairs = None, None
            if not is_baseline and best is not None:
                ref = per.get((best, metric), {})
                common = [v for v in vals_by_vol if v in ref]
                n_pairs = len(common)
                p = paired_wilcoxon([vals_by_vol[v] for v in common], [ref[v] for v in common])
            s = stats[method]
            table.append(
                {
                    "method": method,
                    "metric": metric,
                    "higher_is_better": hib,
                    "is_baseline": is_baseline,
                    "n": int(vals.size),
                    "n_missing": n_rows[method] - int(vals.size),
                    "mean": None if s is None else s[0],
                    "std": float(vals.std(ddof=1)) if vals.size > 1 else None,
                    "ci_low": None if s is None else s[1],
                    "ci_high": None if s is None else s[2],
                    "confidence": confidence,
                    "best_baseline": best,
                    "n_pairs": n_pairs,
                    "p_value": p,
                }
            )
    order = {m: i for i, m in enumerate(methods)}
    table.sort(key=lambda r: order[r["method"]])  # stable: metrics keep their order within a method
    return table
