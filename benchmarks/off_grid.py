"""A whole real 1 mm brain at a factor the model was not trained at: the estimate made on the grid of the nearest
trained factor (the default since 2026-12-06, ``medldm.pipeline.ESTIMATE_GRID = "trained"``) against the estimate
made on the output grid with the networks told that factor (``"output"``, before): wall time, peak memory, PSNR.

Colin27 (181 x 217 x 181 at 1 mm, skull on; held in: part of the training data, so a timing case, not a score)
with simulated x5.5 thick slices along z, upscaled whole with the default model's sampling, each variant in a
fresh process. ``--quick``: the same at x2.5 on a 2 mm IXI scan.
"""

from __future__ import annotations

import time
from pathlib import Path

from benchmarks.common import SHARED, emit, peak_rss_mb, reset_peak_rss, rss_mb, run_worker, save, table, variant_cli

FULL = ("data/mri/colin27-mricron/ch2.nii.gz", 5.5)
QUICK = ("data/mri/ixi-t1-2mm/IXI012-HH-1211_T1.nii.gz", 2.5)
GRIDS = ("trained", "output")


def _case(quick: bool):
    from medldm.degrade import degrade_volume
    from medldm.volume import load

    scan, scale = QUICK if quick else FULL
    lr, truth = degrade_volume(load(SHARED / scan), kind="slice-profile", axis="z", scale=scale)
    return lr, truth, lr.meta["degrade"]["axis"], lr.meta["degrade"]["scale"]


def worker(grid: str, quick: bool) -> None:
    import medldm.pipeline as pipeline
    from benchmarks.brain_1mm import _scores

    pipeline.ESTIMATE_GRID = grid
    up = pipeline.Upscaler("default", device="cpu")
    lr, truth, a, scale = _case(quick)
    base = rss_mb()
    reset_peak_rss()
    tic = time.perf_counter()
    result = up.upscale(lr, axis=a, scale=scale, kind="slice-profile")
    wall = time.perf_counter() - tic
    emit(
        {
            "grid": grid,
            "wall_s": wall,
            "peak_rss_mb": peak_rss_mb(),
            "rss_before_run_mb": base,
            "estimate_scale": result.sr.meta["upscale"]["estimate_scale"],
            **_scores(result.sr.data, truth, a),
        }
    )


def main(quick: bool, out: Path) -> dict:
    scan, scale = QUICK if quick else FULL
    results = [run_worker("off_grid", g, *(["--quick"] if quick else [])) for g in GRIDS]
    reference = results[GRIDS.index("output")]["wall_s"]
    rows = [
        [f"estimate on the {r['grid']} grid (x{r['estimate_scale']:g})", r["wall_s"], r["wall_s"] / reference]
        + [r["peak_rss_mb"], r["psnr"], r["ssim"]]
        for r in results
    ]
    table(
        f"{scan}, x{scale} thick slices along z (a factor the model was not trained at), default sampling",
        ["estimate", "wall s", "time / output grid's", "peak RSS MiB", "PSNR", "SSIM"],
        rows,
    )
    data = {"scan": scan, "scale": scale, "results": results}
    save(out, "off_grid", data)
    return data


if __name__ == "__main__":
    variant_cli(GRIDS, worker, main)
