"""The `medldm` command line. Heavy libraries (torch, MONAI) are imported inside the commands that need them,
so `medldm --help` and `medldm info` start fast. User mistakes (MedldmError) print one line and exit 1."""

from __future__ import annotations

import functools
import json
import signal
import sys
import time
from collections.abc import Sequence
from enum import Enum
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, cast

import typer

from medldm.choices import Format, Kind, Planes, Prior, Profile, Sampler, StageName
from medldm.errors import MedldmError
from medldm.intensity import CT_WINDOWS

if TYPE_CHECKING:
    from rich.progress import TaskID

__all__ = ["app"]


def _terminated(signum, frame):
    raise SystemExit(128 + signum)


class _App(typer.Typer):
    """A Typer app whose commands turn MedldmError into one line on stderr and exit code 1."""

    def command(self, *args, **kwargs):
        register = super().command(*args, **kwargs)

        def decorator(fn):
            @functools.wraps(fn)
            def wrapped(*a, **k):
                # SIGTERM unwinds like Ctrl-C, so temporary files are removed on the way out (exit 143 = 128 + 15)
                signal.signal(signal.SIGTERM, _terminated)
                try:
                    return fn(*a, **k)
                except MedldmError as err:
                    print("error: " + " ".join(str(err).split()), file=sys.stderr)  # one line, always
                    raise typer.Exit(1) from None

            return register(wrapped)

        return decorator


app = _App(
    name="medldm",
    help="Latent diffusion super-resolution for MRI and CT volumes.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_show_locals=False,
)


def _print_version(value: bool) -> None:
    if value:
        from medldm import __version__

        print(f"medldm {__version__}")
        raise typer.Exit()


@app.callback()
def _main(
    version: Annotated[
        bool, typer.Option("--version", callback=_print_version, is_eager=True, help="print the version and exit")
    ] = False,
) -> None:
    """Latent diffusion super-resolution for MRI and CT volumes."""


# members from medldm.intensity.CT_WINDOWS; mypy reads the members of an Enum() call only from a literal
Window = Enum("Window", {name.replace("-", "_"): name for name in CT_WINDOWS}, type=str)  # type: ignore[misc]


REFINE_PLANES_HELP = (
    "models with an estimator stage: the stacks of planes the refinement adds detail from "
    "(default: the model's, else as --planes)"
)
SEED_MAX = 2**63 - 1  # seeds are mixed and reduced modulo 2^64: larger ones would repeat smaller ones
REFINE_HELP = (
    "models with an estimator stage: how far into the noise schedule the diffusion model starts from "
    "the regression estimate (0: the estimate alone; default: the model's)"
)
AXIS_HELP = "x, y, z (world L-R, P-A, I-S), i, j, k (voxel axes) or auto (largest spacing, else z)"
Scan = Annotated[Path, typer.Argument(help="NIfTI, NRRD, DICOM file, or a folder holding a DICOM series")]
Series = Annotated[str | None, typer.Option("--series", help="DICOM SeriesInstanceUID when a folder holds several")]
Overwrite = Annotated[bool, typer.Option("--overwrite", help="replace an existing output file")]
OutFormat = Annotated[
    Format,
    typer.Option(
        "--format",
        help="nifti (a .nii/.nii.gz file) or dicom (a folder holding a derived CT/MR series, int16 with rescale)",
    ),
]
JsonLines = Annotated[bool, typer.Option("--json", help="machine-readable: one JSON object per scan on stdout")]
Quiet = Annotated[bool, typer.Option("--quiet", "-q", help="print errors only")]


def _check_outputs(
    scans: list[Path],
    overwrite: bool,
    previews: Sequence[Path] = (),
    sidecars: Sequence[Path] = (),
    fmt: Format = Format.nifti,
) -> None:
    """Refuse bad output paths (NIfTI scans or DICOM series folders, PNG previews, JSON sidecars) before any work
    is done, so a failure writes nothing (medldm.outputs). A sidecar belongs to its scan: it is replaced whenever
    its scan is written."""
    from medldm.outputs import check_distinct, check_output, check_output_folder

    check_distinct([*scans, *previews, *sidecars])
    for path in scans:
        if fmt == Format.dicom:
            check_output_folder(path, overwrite=overwrite)
        else:
            check_output(path, overwrite=overwrite)
    for path in previews:
        check_output(path, overwrite=overwrite, suffixes=(".png",), what="preview")
    for path in sidecars:
        check_output(path, overwrite=True, suffixes=(".json",), what="sidecar")


def _load(scan: Path, series: str | None = None):
    from rich.console import Console
    from rich.markup import escape

    from medldm.volume import load

    with Console(stderr=True).status(f"reading {escape(str(scan))}"):
        volume = load(scan, series_uid=series)
    for warning in volume.meta.get("warnings", []):
        print(f"warning: {scan}: {warning}", file=sys.stderr)
    return volume


@app.command()
def info(
    scan: Scan,
    series: Series = None,
    json_lines: JsonLines = False,
    quiet: Annotated[
        bool, typer.Option("--quiet", "-q", help="print nothing: the exit code says whether the scan reads")
    ] = False,
):
    """Shape, spacing, orientation, intensity range and modality of a scan."""
    import numpy as np
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    from medldm.figures import display_window
    from medldm.intensity import guess_modality

    vol = _load(scan, series)
    p1, p99 = np.percentile(vol.data, [1, 99])
    table = Table(title=escape(str(scan)), show_header=False, title_justify="left")
    rows = {
        "format": vol.meta.get("format", "?"),
        "shape": " x ".join(str(n) for n in vol.shape),
        "spacing (mm)": " x ".join(f"{s:.4g}" for s in vol.spacing),
        "orientation": vol.orientation,
        "field of view (mm)": " x ".join(f"{n * s:.1f}" for n, s in zip(vol.shape, vol.spacing, strict=True)),
        "stored type": vol.meta.get("dtype", "?"),
        "intensity": f"min {vol.data.min():.6g}, max {vol.data.max():.6g}, p1 {p1:.6g}, p99 {p99:.6g}",
        "modality (guess)": guess_modality(vol.data, vol.meta.get("modality")),
        "display window": display_window(vol)[2],  # what --preview uses
    }
    if "series_uid" in vol.meta:
        rows["series"] = f"{vol.meta['series_uid']} {vol.meta.get('series_description', '')}".strip()
    if quiet:
        return
    if json_lines:
        intensity = {"min": float(vol.data.min()), "max": float(vol.data.max()), "p1": float(p1), "p99": float(p99)}
        print(
            json.dumps(
                {
                    "path": str(scan),
                    "format": rows["format"],
                    "shape": list(vol.shape),
                    "spacing_mm": list(vol.spacing),
                    "orientation": vol.orientation,
                    "stored_type": rows["stored type"],
                    "intensity": intensity,
                    "modality": rows["modality (guess)"],
                    "series": rows.get("series"),
                    "display_window": rows["display window"],
                    "affine": vol.affine.tolist(),
                }
            )
        )
        return
    for key, value in rows.items():
        table.add_row(key, escape(value))  # file names and DICOM text may hold rich markup such as "[/]"
    table.add_row("affine", "\n".join("  ".join(f"{v:9.4f}" for v in row) for row in vol.affine))
    Console().print(table)


@app.command()
def convert(
    scan: Scan,
    out: Annotated[Path, typer.Argument(help="output .nii or .nii.gz (a folder with --format dicom)")],
    series: Series = None,
    overwrite: Overwrite = False,
    fmt: OutFormat = Format.nifti,
):
    """Convert a DICOM series (folder or enhanced multi-frame file) or NRRD to NIfTI, geometry exact; or any scan to
    a DICOM series (--format dicom)."""
    _check_outputs([out], overwrite, fmt=fmt)
    vol = _load(scan, series)
    from medldm.batch import save_volume

    save_volume(vol, out, fmt, overwrite=overwrite, description="medldm convert")
    print(
        f"wrote {out}: {' x '.join(map(str, vol.shape))} voxels, {vol.orientation}, "
        f"spacing {' x '.join(f'{s:.4g}' for s in vol.spacing)} mm"
    )


@app.command()
def degrade(
    scan: Scan,
    out: Annotated[Path, typer.Argument(help="output .nii or .nii.gz (the low-resolution scan)")],
    axis: Annotated[str, typer.Option(help=AXIS_HELP)] = "z",
    scale: Annotated[float, typer.Option(min=1.05, max=16, help="factor (thick slices: need not be an integer)")] = 4,
    kind: Annotated[
        Kind, typer.Option(help="thick slices along AXIS, or in-plane k-space truncation / blur")
    ] = Kind.slice_profile,
    thickness: Annotated[
        float | None,
        typer.Option(
            min=0.01, help="thick slices: slice thickness in mm (default: the new slice spacing; less leaves gaps)"
        ),
    ] = None,
    profile: Annotated[Profile, typer.Option(help="slice profile (slice-profile and blur kinds)")] = Profile.gaussian,
    noise: Annotated[float, typer.Option(min=0.0, help="Rician noise, fraction of the 99th percentile")] = 0.0,
    seed: Annotated[int, typer.Option(min=0, max=SEED_MAX, help="noise seed")] = 0,
    hr_out: Annotated[Path | None, typer.Option(help="also write the (cropped) high-resolution reference")] = None,
    series: Series = None,
    overwrite: Overwrite = False,
):
    """Simulate a low-resolution acquisition with the same forward model training and evaluation use."""
    _check_outputs([out, *([hr_out] if hr_out is not None else [])], overwrite)
    vol = _load(scan, series)
    from medldm.degrade import degrade_volume
    from medldm.volume import save_nifti

    ratio = 1.0
    if thickness is not None:
        from medldm.degrade import grid_for_factor
        from medldm.volume import resolve_axis

        a = resolve_axis(vol, axis)
        ratio = thickness / (vol.spacing[a] * grid_for_factor(vol.shape[a], scale)[2])
    result = degrade_volume(
        vol, kind=kind.value, axis=axis, scale=scale, profile=profile.value, noise=noise, seed=seed, thickness=ratio
    )
    save_nifti(result.lr, out, overwrite=overwrite)
    if hr_out is not None:
        save_nifti(result.hr, hr_out, overwrite=overwrite)
    lr = result.lr
    print(
        f"wrote {out}: {' x '.join(map(str, lr.shape))} voxels, spacing "
        f"{' x '.join(f'{s:.4g}' for s in lr.spacing)} mm ({kind.value}, x{lr.meta['degrade']['scale']:.4g} "
        f"along voxel axis {lr.meta['degrade']['axis']})"
    )
    if ratio != 1.0:
        a = lr.meta["degrade"]["axis"]
        print(
            f"note: slice thickness {ratio * lr.spacing[a]:.4g} mm; NIfTI does not record it, so pass --thickness "
            f"{ratio * lr.spacing[a]:.4g} to medldm upscale"
        )
    if result.hr.shape != vol.shape:
        print(f"note: the scan was cropped from {vol.shape} to {result.hr.shape} to hold whole thick voxels")


@app.command()
def fuse(
    stacks: Annotated[
        list[Path], typer.Argument(help="two or more thick-slice stacks of one session (NIfTI, NRRD, DICOM)")
    ],
    out: Annotated[Path, typer.Option("--out", "-o", help="output .nii or .nii.gz")],
    spacing: Annotated[
        float | None,
        typer.Option(min=0.05, help="isotropic output spacing in mm (default: the finest spacing of any stack)"),
    ] = None,
    like: Annotated[
        Path | None, typer.Option(help="write on exactly this NIfTI's grid (its voxels are not used)")
    ] = None,
    register: Annotated[
        bool, typer.Option("--register", help="first align every stack rigidly to the first (SimpleITK)")
    ] = False,
    prior: Annotated[
        Prior,
        typer.Option(
            help="what the fusion starts from: each stack upscaled by the model, or by B-spline (the classical fusion)"
        ),
    ] = Prior.model,
    model: Annotated[str, typer.Option(help="model folder or 'default'")] = "default",
    device: Annotated[str, typer.Option()] = "auto",
    overwrite: Overwrite = False,
    json_lines: Annotated[bool, typer.Option("--json", help="machine-readable: one JSON object on stdout")] = False,
    quiet: Quiet = False,
):
    """Fuse thick-slice stacks (e.g. axial, coronal, sagittal) into one volume that agrees with every stack."""
    from rich.console import Console
    from rich.markup import escape

    if len(stacks) < 2:
        raise MedldmError("fusion needs at least two stacks")
    _check_outputs([out], overwrite)
    volumes = [_load(s) for s in stacks]
    grid = _load(like) if like is not None else None
    from medldm.fusion import fuse as run_fusion
    from medldm.volume import save_nifti

    upscaler = None
    if prior == Prior.model:
        from medldm.pipeline import Upscaler

        upscaler = Upscaler(model, device=device)
    tic = time.perf_counter()
    with Console(stderr=True).status("fusing") as status:
        result = run_fusion(
            volumes,
            spacing=spacing,
            like=grid,
            prior=prior.value,
            upscaler=upscaler,
            register=register,
            progress=lambda what: status.update(escape(what)),
        )
    save_nifti(result.volume, out, overwrite=overwrite, description=f"medldm fuse ({prior.value})")
    seconds = time.perf_counter() - tic
    if json_lines:
        print(
            json.dumps(
                {
                    "output": str(out),
                    "shape": result.volume.shape,
                    "spacing": result.volume.spacing,
                    "prior": result.prior,
                    "residuals": result.residuals,
                    "transforms": result.transforms,
                    "seconds": round(seconds, 2),
                }
            )
        )
        return
    if quiet:
        return
    for name, t in result.transforms.items():
        print(
            f"registered {name}: rotation {t['rotation_deg']:.2f} deg, translation "
            f"{', '.join(f'{v:.2f}' for v in t['translation_mm'])} mm"
        )
    for name, r in result.residuals.items():
        print(f"residual {name}: {100 * r:.2g} % of its range")
    vol = result.volume
    print(
        f"wrote {out}: {' x '.join(map(str, vol.shape))} voxels, spacing "
        f"{' x '.join(f'{s:.4g}' for s in vol.spacing)} mm, from {len(stacks)} stacks in {seconds:.0f} s"
    )


@app.command()
def train(
    config: Annotated[Path, typer.Option("--config", "-c", help="YAML config, e.g. configs/brain_mri.yaml")],
    stage: Annotated[StageName, typer.Option(help="which stage to train")] = StageName.all,
    run_dir: Annotated[Path | None, typer.Option(help="output folder (default: runs/<config name>)")] = None,
    resume: Annotated[
        Path | None, typer.Option(help="continue the run in this folder from its last checkpoint")
    ] = None,
    max_steps: Annotated[
        int | None, typer.Option(min=1, help="stop each stage at this step (for chunked runs)")
    ] = None,
    data_root: Annotated[
        Path | None, typer.Option(help="folder the config's data globs are relative to (default: $MEDLDM_DATA_ROOT)")
    ] = None,
    lpips_weights: Annotated[Path | None, typer.Option(help="folder of the real LPIPS weights")] = None,
    init: Annotated[
        Path | None,
        typer.Option(
            help="start a new run from this model folder (fine-tuning): stages "
            "whose settings equal the folder's are taken as finished; an estimator "
            "pass or denoiser of the same shape is fine-tuned from its weights"
        ),
    ] = None,
):
    """Train the autoencoder, the fidelity estimator (when the config has one), then the conditional latent diffusion
    model (over accelerate: CPU, GPUs, nodes)."""
    from medldm.config import load_config

    cfg, root = load_config(config, data_root=data_root)
    folder = resume or run_dir or Path("runs") / cfg.name
    if resume is None and folder.exists() and any(folder.glob("*/step_*")):
        raise MedldmError("already holds checkpoints; pass --resume to continue it or choose another --run-dir", folder)
    if resume is not None and not folder.is_dir():
        raise MedldmError("no run to resume here", folder)
    if resume is not None and init is not None:
        raise MedldmError("--init starts a new run; a resumed run already has its weights", folder)
    from medldm.train import Trainer

    trainer = Trainer(cfg, root, folder, lpips_weights=str(lpips_weights) if lpips_weights else None)
    if init is not None and trainer.acc.is_main_process:
        from medldm.model import DEFAULT_MODEL

        model = DEFAULT_MODEL if str(init) == "default" else init
        for name, what in trainer.init_from(model).items():
            print(f"{name}: {what}")
    trainer.acc.wait_for_everyone()
    if trainer.acc.is_main_process:
        print(
            f"training {cfg.name} ({stage.value}) in {folder} on {trainer.acc.device} "
            f"with {trainer.acc.num_processes} process(es), mixed precision {trainer.acc.mixed_precision}"
        )
    trainer.run(stage.value, max_steps)
    if trainer.acc.is_main_process and (folder / "model").is_dir():
        print(f"model written to {folder / 'model'}")


# options of upscale, and those evaluate shares with it
OutScan = Annotated[
    Path | None,
    typer.Option(
        "-o",
        "--out",
        help="output .nii.gz, or an existing folder that takes <name>_sr.nii.gz (in batch mode a folder); "
        "default: <name>_sr.nii.gz beside the input",
    ),
]
ModelFolder = Annotated[str, typer.Option(help="model folder, or 'default' for the shipped model")]
Factor = Annotated[
    float | None,
    typer.Option(min=1.05, max=16, help="factor, need not be an integer (default: the spacing ratio or the model's)"),
]
TargetSpacing = Annotated[
    float | None,
    typer.Option(
        min=0.01,
        help="output spacing in mm along the upscaled axis (e.g. 1: 5.5 mm slices become 1 mm), instead of --scale",
    ),
]
Thickness = Annotated[
    float | None,
    typer.Option(
        min=0.01,
        help="slice thickness in mm when it differs from the slice spacing (default: DICOM SliceThickness, else the "
        "spacing)",
    ),
]
Strict = Annotated[
    bool,
    typer.Option("--strict", help="refuse scans outside what the model was trained on (exit 1 instead of a warning)"),
]
Adapt = Annotated[
    bool,
    typer.Option(
        "--adapt",
        help="first fine-tune the model's estimator passes on the scan's own slices (self-supervised; thick "
        "slices); the output is then the adapted estimate (add --refine for the diffusion detail)",
    ),
]
AdaptSteps = Annotated[int | None, typer.Option(min=1, help="--adapt: at most this many steps per estimator pass")]
AdaptMinutes = Annotated[
    float | None,
    typer.Option(min=0.05, help="--adapt: at most this many minutes in all (default: 400 steps per pass within 4)"),
]
SaveAdapted = Annotated[Path | None, typer.Option(help="--adapt: also write the adapted model folder here")]
Axis = Annotated[str, typer.Option(help=AXIS_HELP)]
KindToUndo = Annotated[
    Kind | None,
    typer.Option(help="degradation to undo (default: thick slices for anisotropic scans, in-plane otherwise)"),
]
Steps = Annotated[
    int | None,
    typer.Option(
        min=1,
        max=1000,
        help="sampler steps (default: the model's; 1 from noise is close to the posterior mean, 8 or more draw "
        "sharper posterior samples)",
    ),
]
Refine = Annotated[float | None, typer.Option(min=0.0, max=0.999, help=REFINE_HELP)]
SamplerName = Annotated[Sampler, typer.Option(help="diffusion sampler")]
Samples = Annotated[int, typer.Option(min=1, help="posterior samples: mean written, std as *_uncertainty")]
UncertaintyMap = Annotated[
    bool,
    typer.Option(
        "--uncertainty",
        help="also write the uncertainty map (*_uncertainty) for one sample: the error model's predicted standard "
        "deviation (models with an error model; with --samples N it is always written)",
    ),
]
Seed = Annotated[int, typer.Option(min=0, max=SEED_MAX, help="random seed; the same seed gives the same output")]
Device = Annotated[str, typer.Option(help="auto, cpu or cuda")]
Consistency = Annotated[float, typer.Option(min=0.0, max=1.0, help="data-consistency strength")]
PlaneStacks = Annotated[
    Planes | None,
    typer.Option(
        help="2D models, thick slices: sample one stack of planes containing the upscaled axis, or both and average "
        "them (default: the model's)"
    ),
]
RefinePlanes = Annotated[Planes | None, typer.Option(help=REFINE_PLANES_HELP)]
BatchSize = Annotated[int, typer.Option(min=1, help="slices or patches per network call")]
Bf16 = Annotated[
    bool | None,
    typer.Option(
        "--bf16/--float32",
        help="bfloat16 autocast for every network, or none (default: the diffusion refinement only, where the "
        "device runs bf16 natively; the estimate stays float32)",
        show_default=False,
    ),
]
ChannelsLast = Annotated[
    bool,
    typer.Option(
        "--channels-last/--no-channels-last",
        help="channels-last autoencoder (faster on the CPUs measured; see docs/performance.md)",
    ),
]
Preview = Annotated[Path | None, typer.Option(help="write a three-plane before/after PNG here")]
CtWindow = Annotated[
    Window | None,
    typer.Option(help="CT preview window (default soft-tissue); MR previews use the 0.5-99.5th percentiles"),
]
Bids = Annotated[
    bool,
    typer.Option(
        "--bids",
        help="SCAN is (in) a BIDS dataset: upscale its NIfTI scans into derivatives/medldm/ (or -o DIR) with a "
        "desc-sr entity",
    ),
]
LpipsWeights = Annotated[Path | None, typer.Option(help="folder of the real LPIPS weights")]


@app.command()
def upscale(
    scan: Scan,
    out: OutScan = None,
    model: ModelFolder = "default",
    scale: Factor = None,
    spacing: TargetSpacing = None,
    thickness: Thickness = None,
    strict: Strict = False,
    adapt: Adapt = False,
    adapt_steps: AdaptSteps = None,
    adapt_minutes: AdaptMinutes = None,
    save_adapted: SaveAdapted = None,
    axis: Axis = "auto",
    kind: KindToUndo = None,
    steps: Steps = None,
    refine: Refine = None,
    sampler: SamplerName = Sampler.dpmpp_2m,
    samples: Samples = 1,
    uncertainty: UncertaintyMap = False,
    seed: Seed = 0,
    device: Device = "auto",
    consistency: Consistency = 1.0,
    planes: PlaneStacks = None,
    refine_planes: RefinePlanes = None,
    batch_size: BatchSize = 16,
    bf16: Bf16 = None,
    channels_last: ChannelsLast = True,
    preview: Preview = None,
    window: CtWindow = None,
    series: Series = None,
    overwrite: Overwrite = False,
    fmt: OutFormat = Format.nifti,
    bids: Bids = False,
    json_lines: JsonLines = False,
    quiet: Quiet = False,
):
    """Upscale a scan (or every scan in a folder) with the latent diffusion model. Beside every output goes its
    provenance sidecar (<name>.json: command, input SHA-256, model digest, every setting, residual, time)."""
    from medldm import batch as runs

    _check_upscale_options(scan, spacing, scale, adapt, adapt_steps, adapt_minutes, save_adapted, overwrite, bids)
    batch, jobs, summary_dir = _upscale_jobs(scan, out, fmt, bids)
    if preview is not None and batch is not None:
        raise MedldmError("--preview takes one scan, not a batch folder", preview)
    shared = _share_jobs(jobs, batch is not None, device)
    if shared is None:
        return  # one scan: another process of the cohort does it
    jobs, cohort, device = shared
    # every output of the run is checked before any work (a batch skips finished scans, so it checks the others)
    todo = [t for _, t in jobs] if batch is None or overwrite else [t for _, t in jobs if not t.exists()]
    _check_upscale_outputs(todo, overwrite, samples > 1 or uncertainty, preview, fmt)
    from medldm.pipeline import Upscaler

    upscaler = Upscaler(
        model,
        device=device,
        steps=steps,
        sampler=sampler,
        batch_size=batch_size,
        consistency=consistency,
        bf16=bf16,
        planes=planes.value if planes else None,
        channels_last=channels_last,
        refine=refine,
        refine_planes=refine_planes.value if refine_planes else None,
    )
    if uncertainty and samples == 1 and upscaler.model.error_model is None:
        raise MedldmError("this model has no error model: draw several samples (--samples 4 --steps 8) instead")
    if samples > 1 and not quiet:
        _note_spread(upscaler)
    request = runs.Request(
        axis=axis,
        scale=scale,
        kind=kind.value if kind else None,
        spacing=spacing,
        thickness=thickness,
        strict=strict,
        samples=samples,
        uncertainty=uncertainty or samples > 1,
        seed=seed,
        fmt=fmt,
        overwrite=overwrite,
        preview=preview,
        window=window.value if window else None,
        adapt=runs.AdaptSettings(adapt_steps, adapt_minutes, save_adapted) if adapt else None,
    )
    with _UpscaleListener(quiet=quiet, json_lines=json_lines, scans=len(jobs)) as listener:
        rows = runs.run_batch(
            jobs,
            lambda source, target: runs.upscale_to_files(
                upscaler, _load(source, series), source, target, request, listener
            ),
            overwrite=overwrite,
            single=batch is None,
            listener=listener,
        )
    if batch is not None:
        _finish_batch(rows, cohort, summary_dir, scan if bids else None, quiet=quiet, json_lines=json_lines)


def _check_upscale_outputs(todo: list[Path], overwrite: bool, uncertainty: bool, preview, fmt: Format) -> None:
    from medldm.batch import uncertainty_path
    from medldm.provenance import sidecar_path

    _check_outputs(
        [*todo, *([uncertainty_path(t) for t in todo] if uncertainty else [])],
        overwrite,
        previews=[preview] if preview is not None else [],
        sidecars=[sidecar_path(t) for t in todo],
        fmt=fmt,
    )


def _note_spread(upscaler) -> None:
    """Several samples drawn close to the posterior mean: say that their spread is no uncertainty map."""
    if upscaler.steps < 8 or upscaler.model.estimator is not None and upscaler.refine == 0:
        print(
            f"note: with {upscaler.steps} step(s) (refine {upscaler.refine}) the samples stay close to the "
            "posterior mean, so their spread understates the uncertainty; use --steps 8 or more for an "
            "uncertainty map",
            file=sys.stderr,
        )


def _share_jobs(jobs: list, batch: bool, device: str):
    """Under torchrun / accelerate launch, this process's share of the jobs (every n-th scan of a batch; one scan
    goes to the first process, and the others get None), the cohort and the process's device."""
    from medldm import cohort as cohorts

    cohort = cohorts.current(device)
    if cohort is None:
        return jobs, None, device
    if not batch and not cohort.is_main_process:
        return None
    jobs = cohorts.share(jobs, cohort) if batch else jobs
    return jobs, cohort, str(cohort.device) if device == "auto" else device


def _check_upscale_options(scan, spacing, scale, adapt, adapt_steps, adapt_minutes, save_adapted, overwrite, bids):
    """Refuse option combinations that cannot work, before anything is read."""
    if not scan.exists():
        raise MedldmError("no such file or folder", scan)
    if spacing is not None and scale is not None:
        raise MedldmError("pass --spacing or --scale, not both")
    if not adapt and (adapt_steps or adapt_minutes or save_adapted):
        raise MedldmError("--adapt-steps, --adapt-minutes and --save-adapted go with --adapt")
    if save_adapted is not None and scan.is_dir():
        raise MedldmError("--save-adapted takes one scan, not a batch folder", save_adapted)
    if save_adapted is not None and save_adapted.exists() and not overwrite:
        raise MedldmError("already exists; pass --overwrite to replace it", save_adapted)
    if not bids and scan.is_dir() and (scan / "dataset_description.json").is_file():
        raise MedldmError("is a BIDS dataset: pass --bids to upscale its scans into derivatives/medldm", scan)


def _upscale_jobs(scan: Path, out: Path | None, fmt: Format, bids: bool):
    """(the batch's scans or None for one scan, the (source, target) jobs, the folder of the batch summary)."""
    from medldm import batch as runs

    if bids:
        return runs.bids_jobs(scan, out, fmt)
    batch = runs.batch_inputs(scan, out) if scan.is_dir() else None
    if batch is None:
        if out is None or (out.is_dir() and fmt == Format.nifti):  # like cp: a folder takes <name>_sr.nii.gz
            return None, [(scan, runs.outputs_of(scan, out, fmt)[0])], out or scan
        return None, [(scan, out)], out
    if out is not None and out.name.lower().endswith((".nii", ".nii.gz")):
        raise MedldmError("in batch mode --out is a folder", out)
    return batch, [(s, runs.outputs_of(s, out, fmt)[0]) for s in batch], out or scan


class _UpscaleListener:
    """medldm.batch's listener for the terminal: a bar per piece of work (none outside a terminal), warnings and
    one line per written scan on stderr, or with --json one JSON object per scan on stdout."""

    def __init__(self, *, quiet: bool, json_lines: bool, scans: int):
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        console = Console(stderr=True)
        columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
        # no bars outside a terminal (logs, pipes): rich would print the last frame and a blank line to stderr
        self.bar = Progress(*columns, console=console, disable=not console.is_terminal)
        self.quiet, self.json_lines = quiet, json_lines
        self.overall = self.bar.add_task("all scans", total=scans) if scans > 1 else None
        self.latest: TaskID | None = None  # the bar of the work under way

    def __enter__(self):
        self.bar.__enter__()
        return self

    def __exit__(self, *exc):
        self.bar.__exit__(*exc)

    def _line(self, text: str) -> None:
        self.bar.console.print(text, markup=False, highlight=False, soft_wrap=True)

    def warn(self, source: Path, line: str) -> None:
        self._line(f"warning: {source.name}: {line}")

    def progress(self, label: str):
        from rich.markup import escape

        task = self.latest = self.bar.add_task(escape(label), total=None)
        return lambda done, total: self.bar.update(task, completed=done, total=total)

    def adapted(self, source: Path, adaptation) -> None:
        if self.latest is not None:  # the adaptation's bar: done
            self.bar.update(self.latest, visible=False)
        if not (self.quiet or self.json_lines):
            last = adaptation.losses[-20:]
            self._line(
                f"adapted to {source.name}: {adaptation.steps} steps in {adaptation.seconds:.0f} s, L1 "
                f"{adaptation.losses[0]:.4f} -> {sum(last) / len(last):.4f}"
            )
            if adaptation.cut_short:  # say so: the result is a shorter adaptation than the one asked for
                done = "/".join(str(len(r)) for r in (adaptation.losses, *adaptation.later_losses))
                self._line(
                    f"note: {source.name}: the {adaptation.minutes:g}-minute bound stopped the adaptation at {done} "
                    f"of {adaptation.steps_asked} steps per pass; a larger --adapt-minutes lets it finish"
                )

    def done(self, row, result=None) -> None:
        from rich.markup import escape

        if self.json_lines:  # one object per scan on stdout, nothing else there
            extra = {"provenance": row.record} if row.record is not None else {"error": row.error} if row.error else {}
            # one write per line: the processes of a cohort run share stdout, and print() writes the text and its
            # newline separately, so two processes' lines could interleave
            line = {"status": row.status, "input": row.input, "output": row.output, **extra}
            sys.stdout.write(json.dumps(line) + "\n")
            sys.stdout.flush()
        if row.status == "failed":
            self.bar.console.print(f"[red]failed[/]: {escape(row.error)}", soft_wrap=True)
        elif row.status == "written" and not (self.quiet or self.json_lines):
            sr, plan_scale = result.sr, result.plan.scale
            self._line(  # plain text, one line whatever the width (scripts parse it)
                f"wrote {row.output}: {' x '.join(map(str, sr.shape))} voxels, "
                f"{' x '.join(f'{v:.4g}' for v in sr.spacing)} mm, {result.task.kind} "
                f"x{plan_scale:.4g} along voxel axis {result.axis}, consistency residual "
                f"{100 * result.residual:.3f}% of range"
            )
        if self.overall is not None:
            self.bar.update(self.overall, advance=1)


def _finish_batch(rows, cohort, summary_dir: Path, bids_scan: Path | None, *, quiet: bool, json_lines: bool) -> None:
    """After a batch: its failures on stderr, the summary CSV (every process's scans, written by the first) and
    its counts, exit 1 when a scan failed."""
    from medldm import cohort as cohorts
    from medldm.batch import write_batch_summary

    for row in rows:
        if row.status == "failed":
            print(f"failed: {row.error}", file=sys.stderr)
    rows = sorted(cohorts.gather(rows, cohort), key=lambda r: r.input)
    if cohort is None or cohort.is_main_process:
        if bids_scan is not None:
            from medldm.bids import bids_root, write_dataset_description

            # bids_jobs refused a scan outside a BIDS dataset
            write_dataset_description(summary_dir, cast(Path, bids_root(bids_scan)))
        summary = write_batch_summary(summary_dir, rows)
        counts = {k: sum(r.status == k for r in rows) for k in ("written", "skipped", "failed")}
        if not quiet:
            print(
                f"{counts['written']} written, {counts['skipped']} skipped (already done), {counts['failed']} "
                f"failed; summary: {summary}",
                file=sys.stderr if json_lines else sys.stdout,
            )
    if any(r.status == "failed" for r in rows):
        raise typer.Exit(1)


@app.command()
def evaluate(
    data: Annotated[Path, typer.Option(help="HR scans: a folder, a .txt list of paths, or one scan")],
    out: Annotated[Path, typer.Option(help="report folder (report.html, metrics.csv, summary.json)")],
    model: Annotated[str | None, typer.Option(help="model folder or 'default'; omit to score baselines only")] = None,
    scale: Annotated[float, typer.Option(min=1.05, max=16, help="factor (thick slices: need not be an integer)")] = 4,
    axis: Annotated[str, typer.Option(help=AXIS_HELP)] = "z",
    kind: Annotated[Kind, typer.Option(help="simulated acquisition")] = Kind.slice_profile,
    thickness: Annotated[
        float,
        typer.Option(
            min=0.05, max=8, help="thick slices: slice thickness as a fraction of the slice spacing (below 1: gaps)"
        ),
    ] = 1.0,
    steps: Annotated[int | None, typer.Option(min=1, help="sampler steps (default: the model's)")] = None,
    refine: Refine = None,
    sampler: SamplerName = Sampler.dpmpp_2m,
    planes: Annotated[
        Planes | None, typer.Option(help="2D models, thick slices: one or both stacks of planes (default: the model's)")
    ] = None,
    refine_planes: RefinePlanes = None,
    samples: Annotated[int, typer.Option(min=1)] = 1,
    seed: Annotated[int, typer.Option(min=0, max=SEED_MAX)] = 0,
    baseline: Annotated[
        list[str] | None,
        typer.Option(
            "--baseline",
            help="score only these baselines (repeat the option): nearest, trilinear, bspline, bspline-dc, "
            "zero-fill (k-space), regression (models with an estimator); default: all that apply",
        ),
    ] = None,
    limit: Annotated[int | None, typer.Option(min=1, help="first N scans only")] = None,
    adapt: Annotated[
        bool,
        typer.Option(
            "--adapt", help="fine-tune the model on each degraded scan's own slices first (also scores it unadapted)"
        ),
    ] = False,
    adapt_steps: AdaptSteps = None,
    adapt_minutes: AdaptMinutes = None,
    stacks: Annotated[
        bool,
        typer.Option(
            "--stacks",
            help="score fusion: three orthogonal thick-slice stacks per scan "
            "(x --scale), fused (medldm fuse) and upscaled alone",
        ),
    ] = False,
    motion: Annotated[
        tuple[float, float] | None,
        typer.Option(
            "--motion",
            metavar="DEG MM",
            help="with --stacks: the patient moved before the second stack (DEG degrees about world z, MM mm along "
            "world x); the fusions register the stacks first and the report says how well the motion was recovered",
        ),
    ] = None,
    no_mask: Annotated[bool, typer.Option("--no-mask", help="score whole volumes, not the foreground")] = False,
    rd: Annotated[bool, typer.Option("--rd", help="the model's rate-distortion curves alone")] = False,
    with_rd: Annotated[bool, typer.Option("--with-rd", help="metrics and rate-distortion curves")] = False,
    device: Device = "auto",
    lpips_weights: LpipsWeights = None,
    overwrite: Overwrite = False,
    json_lines: Annotated[bool, typer.Option("--json", help="machine-readable: summary.json on stdout")] = False,
    quiet: Quiet = False,
):
    """Score the model against nearest, trilinear and B-spline baselines and write a browser report."""
    from rich.console import Console

    if (out / "report.html").exists() and not overwrite:
        raise MedldmError("already holds a report; pass --overwrite to replace it", out)
    from medldm.evaluation.evaluate import evaluate as run_evaluation
    from rich.markup import escape

    from medldm.batch import AdaptSettings

    console = Console(stderr=True)
    if motion is not None and not stacks:
        raise MedldmError("--motion moves one of the --stacks: pass --stacks")
    if stacks:
        if model is None:
            raise MedldmError("--stacks scores the model's fusion: pass --model")
        fusion = {"scale": scale, "seed": seed, "device": device, "use_mask": not no_mask, "limit": limit}
        fusion["motion"] = motion
        report = _evaluate_fusion(data, out, model, fusion, lpips_weights, console)
    else:
        with console.status("evaluating") as status:
            report = run_evaluation(
                data,
                out,
                model=model,
                kind=kind.value,
                axis=axis,
                scale=scale,
                thickness=thickness,
                steps=steps,
                sampler=sampler,
                planes=planes.value if planes else None,
                refine=refine,
                baselines=baseline or None,
                refine_planes=refine_planes.value if refine_planes else None,
                adapt=AdaptSettings(adapt_steps, adapt_minutes).bounds() if adapt else None,
                samples=samples,
                seed=seed,
                use_mask=not no_mask,
                limit=limit,
                device=device,
                lpips_weights=str(lpips_weights) if lpips_weights else None,
                rd=with_rd,
                rd_only=rd,
                command=["medldm", *sys.argv[1:]],
                progress=lambda name, i, n: status.update(f"evaluating {escape(name)} ({i + 1}/{n})"),
            )
    if report is None:
        return  # another process of a cohort run writes the report
    summary = json.loads((out / "summary.json").read_text())
    if json_lines:
        print(json.dumps({"report": str(report), **summary}))
    elif not quiet:
        _print_summary(summary)
        print(f"report: {report}")


def _evaluate_fusion(data: Path, out: Path, model: str, options: dict, lpips_weights: Path | None, console):
    """medldm evaluate --stacks: the fusion report, with a status line per scan."""
    from medldm.evaluation.fusion import evaluate_fusion
    from rich.markup import escape

    with console.status("evaluating fusion") as status:
        return evaluate_fusion(
            data,
            out,
            model=model,
            **options,
            lpips_weights=str(lpips_weights) if lpips_weights else None,
            command=["medldm", *sys.argv[1:]],
            progress=lambda name, i, n: status.update(f"fusing {escape(name)} ({i + 1}/{n})"),
        )


def _print_summary(summary: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title="mean [95% CI]; p: paired Wilcoxon vs the best baseline")
    rows = summary["summary"]
    metrics = list(dict.fromkeys(r["metric"] for r in rows))
    table.add_column("method")
    for m in metrics:
        table.add_column(m)
    for method in dict.fromkeys(r["method"] for r in rows):
        cells = []
        for m in metrics:
            r = next((x for x in rows if x["method"] == method and x["metric"] == m), None)
            if r is None or r.get("mean") is None:
                cells.append("-")
                continue
            p = f" p={r['p_value']:.2g}" if r.get("p_value") is not None else ""
            cells.append(f"{r['mean']:.4g} [{r['ci_low']:.4g}, {r['ci_high']:.4g}]{p}")
        table.add_row(method, *cells)
    Console().print(table)
