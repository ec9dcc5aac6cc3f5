"""Statistics of per-volume metrics: bootstrap confidence intervals, the paired Wilcoxon test, the summary table."""

from __future__ import annotations

import json

import numpy as np
import pytest
from medldm.evaluation.stats import bootstrap_ci, paired_wilcoxon, summarise
from scipy import stats

from medldm import MedldmError


def test_bootstrap_ci_contains_mean_narrows_and_is_seeded():
    rng = np.random.default_rng(0)
    small, large = rng.normal(10, 2, size=10), rng.normal(10, 2, size=400)
    mean, low, high = bootstrap_ci(small)
    assert mean == pytest.approx(small.mean())
    assert low < mean < high
    _, low_l, high_l = bootstrap_ci(large)
    assert high_l - low_l < (high - low) / 3  # ~ 1/sqrt(n): 40x the volumes, about 6x narrower
    assert bootstrap_ci(small, seed=3) == bootstrap_ci(small, seed=3)
    assert bootstrap_ci(small, seed=3) != bootstrap_ci(small, seed=4)
    _, low90, high90 = bootstrap_ci(small, confidence=0.90)
    assert low < low90 < high90 < high
    assert bootstrap_ci([2.5]) == (2.5, 2.5, 2.5)
    with pytest.raises(ValueError):
        bootstrap_ci([])
    with pytest.raises(ValueError):
        bootstrap_ci([1.0, float("nan")])


def test_paired_wilcoxon_matches_scipy_and_its_edge_cases():
    rng = np.random.default_rng(1)
    a, b = rng.normal(size=12), rng.normal(size=12)
    assert paired_wilcoxon(a, b) == stats.wilcoxon(a, b).pvalue
    # 10 volumes all improved (distinct differences): exact two-sided p = 2 / 2**10
    base = rng.normal(30, 2, size=10)
    better = base + 0.5 + np.linspace(0.0, 0.09, 10)
    assert paired_wilcoxon(better, base) == pytest.approx(2 / 2**10)
    assert paired_wilcoxon(base, base.copy()) is None
    assert paired_wilcoxon([1.0], [2.0]) is None
    with pytest.raises(ValueError):
        paired_wilcoxon([1.0, 2.0], [1.0])


def test_summarise_picks_the_best_baseline_in_each_direction():
    rows = []
    for v in range(8):
        d = 0.01 * v  # distinct paired differences
        rows += [
            {"volume": f"v{v}", "method": "nearest", "psnr": 28.0 + d, "nrmse": 0.20 + d},
            {"volume": f"v{v}", "method": "trilinear", "psnr": 30.0 + d, "nrmse": 0.15 + d},
            {"volume": f"v{v}", "method": "bspline", "psnr": 29.0 + d, "nrmse": 0.10 + d},
            {"volume": f"v{v}", "method": "model", "psnr": 31.0 + 2 * d, "nrmse": None if v == 0 else 0.05 + d / 2},
        ]
    table = summarise(
        rows,
        metrics=["psnr", "nrmse"],
        higher_is_better={"psnr": True, "nrmse": False},
        baselines=["nearest", "trilinear", "bspline"],
    )
    cell = {(r["method"], r["metric"]): r for r in table}
    assert len(table) == 8
    assert [r["method"] for r in table[::2]] == ["nearest", "trilinear", "bspline", "model"]
    assert {r["best_baseline"] for r in table if r["metric"] == "psnr"} == {"trilinear"}
    assert {r["best_baseline"] for r in table if r["metric"] == "nrmse"} == {"bspline"}
    assert cell[("nearest", "psnr")]["p_value"] is None and cell[("nearest", "psnr")]["is_baseline"]
    model_psnr, model_nrmse = cell[("model", "psnr")], cell[("model", "nrmse")]
    assert model_psnr["p_value"] == pytest.approx(2 / 2**8) and model_psnr["n_pairs"] == 8
    assert model_psnr["mean"] == pytest.approx(31.07)
    assert model_psnr["ci_low"] < model_psnr["mean"] < model_psnr["ci_high"]
    assert (model_nrmse["n"], model_nrmse["n_missing"], model_nrmse["n_pairs"]) == (7, 1, 7)
    assert model_nrmse["p_value"] == pytest.approx(2 / 2**7)
    json.dumps(table, allow_nan=False)  # plain JSON
    with pytest.raises(MedldmError, match="appears twice"):
        summarise(rows + rows[:1], metrics=["psnr"], higher_is_better={"psnr": True}, baselines=["nearest"])
    with pytest.raises(MedldmError, match="direction"):
        summarise(rows, metrics=["ssim"], higher_is_better={}, baselines=["nearest"])
