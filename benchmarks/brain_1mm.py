"""Upscaling a whole real 1 mm brain: wall time, peak memory and quality of the default model's sampling settings.

Colin27 (181 x 217 x 181 at 1 mm, skull on; held in: part of the training data) with simulated x4 thick slices
along z, upscaled whole with the default model in a fresh process per variant: its defaults (model.json: the
estimate refined by 1 step from 0.15, the detail from one stack of planes), the regression estimate alone (refine
0, both stacks of planes: the regression baseline), refine 0.3 with 2 steps and refine 0.3 with 8 steps (what an
uncertainty map uses per sample). PSNR / SSIM against
the truth inside the head, with cubic B-spline (plain, and with the model's data consistency) as the yardstick.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from benchmarks.common import SHARED, emit, peak_rss_mb, reset_peak_rss, rss_mb, run_worker, save, table, variant_cli

SCAN = "data/mri/colin27-mricron/ch2.nii.gz"
VARIANTS: dict[str, dict[str, Any]] = {  # Upscaler options
    "default": {},
    "estimate": {"refine": 0.0, "planes": "both"},
    "refine-0.3": {"refine": 0.3, "steps": 2},
    "8-steps": {"refine": 0.3, "steps": 8},
}
QUICK = ["default"]
FULL = list(VARIANTS)


def _case():
    from medldm.degrade import degrade_volume
    from medldm.volume import load

    lr, truth = degrade_volume(load(SHARED / SCAN), kind="slice-profile", axis="z", scale=4)
    return lr, truth, lr.meta["degrade"]["axis"]


def _scores(pred, truth, axis: int) -> dict:
    from medldm.evaluation.metrics import foreground_mask, psnr, ssim

    r, mask = float(truth.data.max()), foreground_mask(truth.data)
    return {
        "psnr": psnr(pred, truth.data, data_range=r, mask=mask),
        "ssim": ssim(pred, truth.data, data_range=r, axis=axis, mask=mask),
    }


def worker(variant: str, quick: bool = False) -> None:
    """One variant on the whole brain (``quick`` is main's: it runs fewer variants, each the same)."""
    from medldm.pipeline import Upscaler

    up = Upscaler("default", device="cpu", **VARIANTS[variant])
    lr, truth, a = _case()
    base = rss_mb()
    reset_peak_rss()
    tic = time.perf_counter()
    result = up.upscale(lr, axis=a, scale=4, kind="slice-profile")
    wall = time.perf_counter() - tic
    emit(
        {
            "variant": variant,
            "steps": up.steps,
            "refine": up.refine,
            "sampler": up.sampler,
            "planes": up.planes,
            "wall_s": wall,
            "peak_rss_mb": peak_rss_mb(),
            "rss_before_run_mb": base,
            "hr_shape": list(result.sr.shape),
            "residual": result.residual,
            **_scores(result.sr.data, truth, a),
        }
    )


def main(quick: bool, out: Path) -> dict:
    from medldm.evaluation.baselines import BSPLINE_DC, baseline

    from medldm.degrade import make_operator

    lr, truth, a = _case()
    op = make_operator("slice-profile", axis=a, scale=4)
    bspline, bspline_dc = (_scores(baseline(m, lr, op).data, truth, a) for m in ("bspline", BSPLINE_DC))
    results = [run_worker("brain_1mm", s) for s in (QUICK if quick else FULL)]
    rows = [
        ["cubic B-spline", "", "", "", bspline["psnr"], bspline["ssim"]],
        ["cubic B-spline + data consistency", "", "", "", bspline_dc["psnr"], bspline_dc["ssim"]],
    ]
    rows += [
        [
            f"{r['variant']}: refine {r['refine']}, planes {r['planes']}",
            r["steps"],
            r["wall_s"],
            r["peak_rss_mb"],
            r["psnr"],
            r["ssim"],
        ]
        for r in results
    ]
    table(
        f"whole 1 mm brain {SCAN} ({'x'.join(map(str, truth.shape))}), x4 thick slices along z",
        ["method", "steps", "wall s", "peak RSS MiB", "PSNR", "SSIM"],
        rows,
    )
    data = {"scan": SCAN, "shape": list(truth.shape), "bspline": bspline, "bspline_dc": bspline_dc, "results": results}
    save(out, "brain_1mm", data)
    return data


if __name__ == "__main__":
    variant_cli(VARIANTS, worker, main)
