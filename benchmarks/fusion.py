"""Fusing three orthogonal thick-slice stacks of a whole 1 mm brain (``medldm fuse``): wall time and peak memory.

Colin27 (held in: part of the training data), cropped to hold whole x4 slices along every axis, thickened x4 along
each voxel axis in turn. Each variant runs in a fresh process, so its peak memory is its own: the classical fusion
(B-spline prior, joint consistency), the default (each stack upscaled by the model, then the joint consistency),
and as the reference one stack's default ``medldm upscale`` in the same process (the ratio says what fusing three
costs against upscaling one). PSNR / SSIM against the truth inside the head.
"""

from __future__ import annotations

import time
from pathlib import Path

from benchmarks.common import SHARED, emit, peak_rss_mb, reset_peak_rss, rss_mb, run_worker, save, table, variant_cli

SCAN = "data/mri/colin27-mricron/ch2.nii.gz"
VARIANTS = ("upscale-one-stack", "fuse-bspline", "fuse-model")


def _case(quick: bool):
    from medldm.degrade import degrade_volume
    from medldm.volume import crop, crop_to_multiple, load

    truth = load(SHARED / SCAN)
    if quick:  # a central 96^3 block
        truth = crop(truth, tuple(slice(n // 2 - 48, n // 2 + 48) for n in truth.shape))
    for a in range(3):
        truth = crop_to_multiple(truth, a, 4)
    stacks = []
    for a in range(3):
        lr = degrade_volume(truth, kind="slice-profile", axis=a, scale=4).lr
        lr.meta["path"] = f"stack {'ijk'[a]}"
        stacks.append(lr)
    return truth, stacks


def worker(variant: str, quick: bool) -> None:
    from medldm.evaluation.metrics import foreground_mask, psnr, ssim

    from medldm.fusion import fuse
    from medldm.pipeline import Upscaler

    up = Upscaler("default", device="cpu")
    truth, stacks = _case(quick)
    base = rss_mb()
    reset_peak_rss()
    tic = time.perf_counter()
    if variant == "upscale-one-stack":
        out = up.upscale(stacks[2], axis=2, scale=4, kind="slice-profile").sr
        residual = None
    else:
        prior = variant.split("-")[1]
        result = fuse(stacks, like=truth, prior=prior, upscaler=up if prior == "model" else None)
        out, residual = result.volume, max(result.residuals.values())
    wall = time.perf_counter() - tic
    r, mask = float(truth.data.max()), foreground_mask(truth.data)
    emit(
        {
            "variant": variant,
            "wall_s": wall,
            "peak_rss_mb": peak_rss_mb(),
            "rss_before_run_mb": base,
            "shape": list(truth.shape),
            "residual": residual,
            "psnr": psnr(out.data, truth.data, data_range=r, mask=mask),
            "ssim": ssim(out.data, truth.data, data_range=r, axis=2, mask=mask),
        }
    )


def main(quick: bool, out: Path) -> dict:
    results = [run_worker("fusion", v, *(["--quick"] if quick else [])) for v in VARIANTS]
    reference = results[0]["wall_s"]
    rows = [
        [r["variant"], r["wall_s"], r["wall_s"] / reference, r["peak_rss_mb"], r["psnr"], r["ssim"]] for r in results
    ]
    table(
        f"three x4 stacks of {SCAN} ({'x'.join(map(str, results[0]['shape']))}), fused on the truth's grid",
        ["variant", "wall s", "x one upscale", "peak RSS MiB", "PSNR", "SSIM"],
        rows,
    )
    data = {"scan": SCAN, "quick": quick, "results": results}
    save(out, "fusion", data)
    return data


if __name__ == "__main__":
    variant_cli(VARIANTS, worker, main)
