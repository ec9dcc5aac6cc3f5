"""`make demo`: the main job on a real scan that a package ships, so nothing is downloaded.

The example is the MNI152 2009 T1 template at 1 mm that nilearn's wheel carries. The demo simulates a
thick-slice acquisition of it (x4 along z), upscales that with the shipped default model, compares the result
with trilinear and cubic B-spline interpolation (plain, and made data-consistent like the model) against the
truth, and writes everything to demo_output/.
"""

from __future__ import annotations

import importlib.util
import time
from pathlib import Path
from typing import cast

from medldm.errors import MedldmError

OUT = Path("demo_output")
TEMPLATE = "datasets/data/mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz"


def example_scan() -> Path:
    """The MNI152 T1 template file inside the installed nilearn package (found without importing it)."""
    spec = importlib.util.find_spec("nilearn")
    if spec is None or not spec.submodule_search_locations:
        raise MedldmError("nilearn is not installed; it ships the demo scan (pip install nilearn)")
    path = Path(next(iter(spec.submodule_search_locations))) / TEMPLATE
    if not path.exists():
        raise MedldmError("this nilearn version does not ship the MNI152 template", path)
    return path


def main() -> None:
    from medldm.evaluation.baselines import BSPLINE_DC, baseline
    from rich.console import Console

    from medldm.degrade import acquisition_operator, degrade_volume
    from medldm.figures import before_after
    from medldm.model import DEFAULT_MODEL
    from medldm.volume import load, save_nifti

    console = Console()
    scan = example_scan()
    OUT.mkdir(exist_ok=True)
    console.print(f"[bold]medldm demo[/]: {scan.name} (MNI152 2009 T1, 1 mm, shipped with nilearn)")
    lr, truth = degrade_volume(load(scan), kind="slice-profile", axis="z", scale=4)
    axis = lr.meta["degrade"]["axis"]
    op = acquisition_operator(lr)
    console.print(
        f"simulated thick slices: {truth.shape} at {truth.spacing[axis]:.1f} mm -> {lr.shape} at "
        f"{lr.spacing[axis]:.1f} mm along z (voxel axis {axis})"
    )
    # bspline-dc: B-spline with the model's data-consistency projection, to show what the network itself adds
    outputs = {m: baseline(m, lr, op) for m in ("trilinear", "bspline", BSPLINE_DC)}
    paths = {"lr": OUT / "mni152_lr_z4.nii.gz", "truth": OUT / "mni152_truth.nii.gz"}
    if not DEFAULT_MODEL.is_dir():
        console.print("[yellow]no default model is installed in this copy; showing the baselines only[/]")
    else:
        outputs["model"] = _upscale_with_uncertainty(lr, paths, console)
    save_nifti(lr, paths["lr"], overwrite=True)
    save_nifti(truth, paths["truth"], overwrite=True)
    _print_scores(outputs, truth, axis, console)
    figure = before_after(
        lr,
        outputs.get("model", outputs["bspline"]),
        OUT / "mni152_comparison.png",
        titles=("thick-slice input", "model" if "model" in outputs else "bspline"),
        extra={"bspline": outputs["bspline"], "truth": truth},
    )
    for name, path in {**paths, "figure": figure}.items():
        console.print(f"  {name:12s} {path.resolve()}")
    console.print("Open the NIfTI files over each other in ITK-SNAP or 3D Slicer: they share one field of view.")


def _upscale_with_uncertainty(lr, paths: dict, console):
    """The default model's upscale of ``lr`` and an uncertainty map from two posterior samples, both written
    (their paths added to ``paths``); returns the upscaled volume."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    from medldm.pipeline import Upscaler
    from medldm.provenance import sampling_summary
    from medldm.volume import Volume, save_nifti

    upscaler = Upscaler("default", device="auto")
    # the uncertainty map needs real posterior samples: a few of them at 8 steps on one stack of planes (a model
    # whose default returns its estimate alone, refine 0, would give identical samples: refine those from 0.3)
    refine = 0.3 if upscaler.model.estimator is not None and upscaler.refine == 0 else None
    sampler = Upscaler(upscaler.model, device="auto", steps=8, planes="one", refine=refine)
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
    tic = time.perf_counter()
    with Progress(*columns, console=console) as bar:
        task = bar.add_task("upscaling", total=None)
        result = upscaler.upscale(
            lr, axis="z", scale=4, seed=0, progress=lambda d, t: bar.update(task, completed=d, total=t)
        )
        took = time.perf_counter() - tic
        task = bar.add_task("uncertainty (2 samples, 8 steps)", total=None)
        spread = sampler.upscale(
            lr, axis="z", scale=4, samples=2, seed=0, progress=lambda d, t: bar.update(task, completed=d, total=t)
        )
    console.print(
        f"upscaled in {took:.0f} s ({sampling_summary(upscaler)}, planes {upscaler.planes}); consistency residual "
        f"{100 * result.residual:.4f}% of the intensity range; "
        f"uncertainty from 2 posterior samples at 8 steps in {time.perf_counter() - tic - took:.0f} s"
    )
    paths.update(sr=OUT / "mni152_sr.nii.gz", uncertainty=OUT / "mni152_sr_uncertainty.nii.gz")
    save_nifti(result.sr, paths["sr"], overwrite=True)
    save_nifti(cast(Volume, spread.uncertainty), paths["uncertainty"], overwrite=True)  # set: 2 samples
    return result.sr


def _print_scores(outputs: dict, truth, axis: int, console) -> None:
    from medldm.evaluation.evaluate import score
    from medldm.evaluation.metrics import foreground_mask
    from rich.table import Table

    mask = foreground_mask(truth.data)
    table = Table(title="against the truth, inside the head (data range: truth maximum)")
    for col in ("method", "PSNR (dB)", "SSIM", "LPIPS"):
        table.add_column(col)
    for name, vol in outputs.items():
        s = score(vol, truth, mask=mask, axis=axis)
        table.add_row(name, f"{s['psnr']:.2f}", f"{s['ssim']:.4f}", f"{s['lpips']:.4f}")
    console.print(table)


if __name__ == "__main__":
    main()
