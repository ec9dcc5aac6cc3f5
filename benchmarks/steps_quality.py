"""Quality and time against sampler steps, for every sampler: the curve that picks the default.

One held-out IXI T1 (never seen in training), a central block of it across voxel axis 2 (40 of 90 planes; 32 in
quick mode: the grid is 30 upscales, and the whole head would take the full run past 30 minutes), with simulated
x4 thick slices along z (voxel axis 1), upscaled with the default model at each (sampler, steps) from the same
seed; PSNR / SSIM / LPIPS against the truth inside the head, with trilinear and cubic B-spline interpolation
(plain, and with the model's data consistency) as the yardsticks. Network calls: ``steps`` for every sampler
but the Heun ODE (``2 steps - 1``).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import TypedDict

from benchmarks.common import SHARED, save, table


class Grid(TypedDict):
    samplers: list[str]
    steps: list[int]
    planes: int


QUICK: Grid = {"samplers": ["dpmpp-2m", "ddim"], "steps": [1, 2, 8], "planes": 32}
FULL: Grid = {"samplers": ["dpmpp-2m", "ddim", "ddpm", "sde", "ode"], "steps": [1, 2, 4, 8, 16, 50], "planes": 40}


def validation_scan() -> Path:
    """The first validation subject of configs/brain_mri.yaml (the last 20 IXI names sorted are held out)."""
    return sorted((SHARED / "data/mri/ixi-t1-2mm").glob("*.nii.gz"))[-20]


def main(quick: bool, out: Path) -> dict:
    from medldm.evaluation.baselines import BSPLINE_DC, baseline
    from medldm.evaluation.evaluate import score
    from medldm.evaluation.metrics import foreground_mask

    from medldm.degrade import degrade_volume, make_operator
    from medldm.model import load_model
    from medldm.pipeline import Upscaler
    from medldm.volume import crop, load

    grid = QUICK if quick else FULL
    scan = validation_scan()
    vol = load(scan)
    start = (vol.shape[2] - grid["planes"]) // 2
    vol = crop(vol, (slice(None), slice(None), slice(start, start + grid["planes"])))
    lr, truth = degrade_volume(vol, kind="slice-profile", axis="z", scale=4)
    a = lr.meta["degrade"]["axis"]
    op = make_operator("slice-profile", axis=a, scale=4)
    mask = foreground_mask(truth.data)

    def metrics(v):
        s = score(v, truth, mask=mask, axis=a)
        return {k: float(s[k]) for k in ("psnr", "ssim", "lpips")}

    baselines = {m: metrics(baseline(m, lr, op)) for m in ("trilinear", "bspline", BSPLINE_DC)}
    model = load_model("default")
    results = []
    for sampler in grid["samplers"]:
        for steps in grid["steps"]:
            up = Upscaler(model, device="cpu", steps=steps, sampler=sampler, planes="one")
            tic = time.perf_counter()
            sr = up.upscale(lr, axis=a, scale=4, kind="slice-profile", seed=0).sr
            wall = time.perf_counter() - tic
            results.append({"sampler": sampler, "steps": steps, "wall_s": wall, **metrics(sr)})
    rows = [[name, "", "", b["psnr"], b["ssim"], b["lpips"]] for name, b in baselines.items()]
    rows += [[r["sampler"], r["steps"], r["wall_s"], r["psnr"], r["ssim"], r["lpips"]] for r in results]
    table(
        f"steps vs quality: {scan.name} (held out), central {grid['planes']} planes across voxel axis 2, x4 thick "
        "slices along z, planes=one",
        ["sampler", "steps", "wall s", "PSNR", "SSIM", "LPIPS"],
        rows,
    )
    data = {
        "scan": scan.name,
        "block": f"voxel axis 2, {start}:{start + grid['planes']}",
        "shape": list(truth.shape),
        "baselines": baselines,
        "results": results,
    }
    save(out, "steps_quality", data)
    return data


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--out", type=Path, default=Path("bench_output"))
    args = parser.parse_args()
    main(args.quick, args.out)
