"""Upscale time and peak memory against volume size: linear time, bounded memory.

The volumes are a real 1 mm brain (Colin27) resampled to each HR size, then given x4 thick slices along z and
written as NIfTI; each size is upscaled in a fresh process that loads that file (as ``medldm upscale`` would),
so the peak resident memory is that of one upscale. Writing the result is not timed. One size is also run with
the settings before the CPU defaults changed (contiguous memory layout, up to 2^20 pixels per network call), so
the gain of channels-last and cache-sized calls is measured as a ratio in the same job.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from benchmarks.common import SHARED, emit, peak_rss_mb, reset_peak_rss, rss_mb, run_worker, save, table

SCAN = "data/mri/colin27-mricron/ch2.nii.gz"
QUICK = [(128, 128, 92), (192, 192, 136)]
FULL = [(128, 128, 92), (256, 256, 184), (512, 512, 400)]


def make_inputs(sizes, folder: Path) -> list[Path]:
    import numpy as np
    import torch
    import torch.nn.functional as F

    from medldm.degrade import degrade_volume
    from medldm.volume import load, rescaled_affine, save_nifti

    brain = load(SHARED / SCAN).to_canonical()
    paths = []
    for size in sizes:
        data = F.interpolate(
            torch.from_numpy(brain.data)[None, None], size=size, mode="trilinear", align_corners=False
        )[0, 0].numpy()
        factors = [n / m for n, m in zip(brain.shape, size, strict=True)]
        hr = brain.with_data(np.ascontiguousarray(data), rescaled_affine(brain.affine, factors))
        lr, _ = degrade_volume(hr, kind="slice-profile", axis="z", scale=4)
        path = folder / f"brain_{'x'.join(map(str, size))}_lr.nii.gz"
        save_nifti(lr, path, overwrite=True)
        paths.append(path)
    return paths


def worker(path: str, planes: str, variant: str = "default") -> None:
    import torch

    from medldm.pipeline import Upscaler
    from medldm.volume import load

    previous = variant == "previous"  # the CPU settings before channels-last and cache-sized calls
    if previous:
        Upscaler.BATCH_PIXELS["cpu"] = 1 << 20  # this worker process only
    up = Upscaler("default", device="cpu", planes=planes, channels_last=not previous)
    base = rss_mb()  # torch, MONAI and the model, before the scan is read
    reset_peak_rss()
    lr = load(path)
    tic = time.perf_counter()
    result = up.upscale(lr, axis="z", scale=4, kind="slice-profile")
    wall = time.perf_counter() - tic
    emit(
        {
            "lr_shape": list(lr.shape),
            "hr_shape": list(result.sr.shape),
            "voxels": int(result.sr.data.size),
            "wall_s": wall,
            "peak_rss_mb": peak_rss_mb(),
            "rss_before_run_mb": base,
            "steps": up.steps,
            "sampler": up.sampler,
            "planes": planes,
            "variant": variant,
            "channels_last": up.channels_last,
            "batch_pixels": Upscaler.BATCH_PIXELS["cpu"],
            "threads": torch.get_num_threads(),
        }
    )


def main(quick: bool, out: Path, planes: str = "one") -> dict:
    sizes = QUICK if quick else FULL
    with tempfile.TemporaryDirectory() as tmp:
        paths = make_inputs(sizes, Path(tmp))
        results = [run_worker("scaling", p, planes) for p in paths]
        middle = len(paths) // 2
        previous = run_worker("scaling", paths[middle], planes, "previous")
    first = results[0]
    rows = []
    for r in results:
        r["us_per_voxel"] = 1e6 * r["wall_s"] / r["voxels"]
        r["time_ratio_vs_smallest_per_voxel"] = r["us_per_voxel"] / (1e6 * first["wall_s"] / first["voxels"])
        rows.append(
            [
                "x".join(map(str, r["hr_shape"])),
                r["voxels"] / 1e6,
                r["wall_s"],
                r["us_per_voxel"],
                r["time_ratio_vs_smallest_per_voxel"],
                r["peak_rss_mb"],
            ]
        )
    table(
        f"scaling: x4 thick slices along z, default sampler, planes={planes}",
        ["HR shape", "Mvoxels", "wall s", "us / voxel", "per-voxel time vs smallest", "peak RSS MiB"],
        rows,
    )
    previous["speedup_of_default"] = previous["wall_s"] / results[middle]["wall_s"]
    table(
        "the same upscale with the previous CPU settings",
        ["HR shape", "settings", "wall s", "peak RSS MiB", "default's speed-up"],
        [
            [
                "x".join(map(str, previous["hr_shape"])),
                "contiguous, 2^20 pixels per call",
                previous["wall_s"],
                previous["peak_rss_mb"],
                previous["speedup_of_default"],
            ]
        ],
    )
    data = {"scan": SCAN, "planes": planes, "results": results, "previous_settings": previous}
    save(out, "scaling", data)
    return data


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--worker", nargs="+", metavar="LR_PATH PLANES [VARIANT]")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--planes", default="one")
    parser.add_argument("--out", type=Path, default=Path("bench_output"))
    args = parser.parse_args()
    if args.worker:
        worker(*args.worker)
    else:
        main(args.quick, args.out, args.planes)
