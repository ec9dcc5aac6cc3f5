"""The autoencoder's reconstruction ceiling: how much of the true image survives the latent bottleneck.

The default output does not pass through the autoencoder: the refinement adds ``decode(z_0) - decode(z_estimate)``
to the regression estimate. The autoencoder therefore bounds only the detail a refinement can add, and its
reconstruction of the *true* image says how far a model that went through the bottleneck could get. Each truth is
encoded and decoded plane by plane on the stack the refinement uses, normalised as an upscale normalises its input
(:meth:`medldm.pipeline.Upscaler.autoencode`), and scored as ``medldm evaluate`` scores (PSNR inside the head,
data range = the truth's maximum), as it is and after the acquisition's data-consistency projection.

    python -m medldm.evaluation.ceiling SCAN [SCAN ...] [--model default] [--kind slice-profile] [--axis z]
        [--scale 4] [--csv ceiling.csv]
"""

from __future__ import annotations

import argparse
import csv
import sys
from pathlib import Path

import numpy as np
import torch
from medldm.evaluation.metrics import foreground_mask, psnr

from medldm.choices import Kind
from medldm.degrade import acquisition_operator, degrade_volume, enforce_consistency
from medldm.errors import MedldmError
from medldm.pipeline import Upscaler
from medldm.volume import Volume, load

__all__ = ["ceiling", "main"]


def ceiling(upscaler: Upscaler, lr: Volume, truth: Volume) -> dict[str, float]:
    """PSNR (dB) of the autoencoder's reconstruction of ``truth``, as it is (``psnr``) and projected onto the
    volumes consistent with ``lr`` (``psnr_projected``); ``lr`` is ``truth`` degraded by
    medldm.degrade.degrade_volume, whose record gives the acquisition's forward model."""
    op = acquisition_operator(lr)
    rec = upscaler.autoencode(lr, truth, op)
    projected = enforce_consistency(
        torch.from_numpy(rec.data.astype(np.float64)), torch.from_numpy(lr.data.astype(np.float64)), op
    ).numpy()
    mask = foreground_mask(truth.data)
    return {"psnr": psnr(rec.data, truth.data, mask=mask), "psnr_projected": psnr(projected, truth.data, mask=mask)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m medldm.evaluation.ceiling", description=__doc__.split("\n")[0])
    parser.add_argument("scans", nargs="+", type=Path, help="high-resolution scans (the truth)")
    parser.add_argument("--model", default="default", help="a model folder, or 'default'")
    parser.add_argument("--kind", default="slice-profile", choices=Kind.values(), help="the simulated acquisition")
    parser.add_argument("--axis", default="z", help="its axis (x, y, z or a voxel index)")
    parser.add_argument("--scale", type=float, default=4, help="its factor")
    parser.add_argument("--csv", type=Path, help="also write the table here")
    args = parser.parse_args(argv)
    try:
        upscaler = Upscaler(args.model, device="cpu")
        rows = []
        for path in args.scans:
            lr, truth = degrade_volume(load(path), kind=args.kind, axis=args.axis, scale=args.scale)
            rows.append({"volume": path.name, **{k: round(v, 4) for k, v in ceiling(upscaler, lr, truth).items()}})
            print(f"{path.name}: {rows[-1]['psnr']:.2f} dB, {rows[-1]['psnr_projected']:.2f} dB projected", flush=True)
    except MedldmError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(
        f"mean over {len(rows)}: {np.mean([r['psnr'] for r in rows]):.2f} dB, "
        f"{np.mean([r['psnr_projected'] for r in rows]):.2f} dB projected"
    )
    if args.csv:
        with open(args.csv, "w", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
