"""Per-scan adaptation (``medldm upscale --adapt``): the fine-tuning in float32 against bf16 autocast (the default
where the CPU or GPU runs bf16 natively, ``medldm.adapt.PRECISION``): wall time of the adaptation, its losses, and
the adapted upscale's PSNR / SSIM against the truth.

The lesjak clinical 2D FLAIR (0.72 x 0.72 x 3 mm; an adapt tuning scan, in no report set) thickened x4 along x,
adapted with the default bounds (400 steps per pass), each variant in a fresh process. ``--quick``: 50 steps per
pass. Bf16 is timed only where the machine runs it natively (elsewhere both rows are float32).
"""

from __future__ import annotations

import time
from pathlib import Path

from benchmarks.common import SHARED, emit, run_worker, save, table, variant_cli

SCAN = "data/mri/lesjak-ms-clinical-2d/lesjak_patient12_study1_FLAIR.nii.gz"
PRECISIONS = ("no", "auto")


def worker(precision: str, quick: bool) -> None:
    import numpy as np
    import torch

    import medldm.adapt as adapt
    from benchmarks.brain_1mm import _scores
    from medldm.degrade import degrade_volume
    from medldm.pipeline import Upscaler
    from medldm.volume import load

    adapt.PRECISION = precision
    up = Upscaler("default", device="cpu")
    lr, truth = degrade_volume(load(SHARED / SCAN), kind="slice-profile", axis="x", scale=4)
    plan = up.plan(lr, axis="x", scale=4)
    tic = time.perf_counter()
    done = adapt.adapt(up.model, lr, plan, steps=50 if quick else adapt.DEFAULT_STEPS, minutes=None)
    wall = time.perf_counter() - tic
    result = up.with_model(done.model).upscale(lr, axis="x", scale=4, kind="slice-profile")
    emit(
        {
            "precision": "bf16" if adapt.in_bf16(torch.device("cpu")) else "float32",
            "adapt_s": wall,
            "steps": done.steps,
            "first_pass_loss_last_50": float(np.mean(done.losses[-50:])),
            **_scores(result.sr.data, truth, 0),
        }
    )


def main(quick: bool, out: Path) -> dict:
    results = [run_worker("adapt", p, *(["--quick"] if quick else [])) for p in PRECISIONS]
    reference = results[0]["adapt_s"]
    rows = [
        [r["precision"], r["steps"], r["adapt_s"], r["adapt_s"] / reference, r["first_pass_loss_last_50"]]
        + [r["psnr"], r["ssim"]]
        for r in results
    ]
    table(
        f"{SCAN} thickened x4 along x, --adapt ({results[0]['steps']} steps per pass)",
        ["fine-tuning in", "steps", "adaptation s", "time / float32's", "L1, last 50 steps", "PSNR", "SSIM"],
        rows,
    )
    data = {"scan": SCAN, "results": results}
    save(out, "adapt", data)
    return data


if __name__ == "__main__":
    variant_cli(PRECISIONS, worker, main)
