"""What a hostile or unlucky user still broke (issue 23), each through the real CLI where it can be: wrong results
with exit 0 (non-finite voxels, one output written over another, a batch eating its own outputs, a DICOM slice
dropped) and output problems found only after the computation. Every refusal is one ``error:`` line, exit 1, no
traceback, and nothing written."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
import torch
from safetensors.torch import load_file, save_file

from medldm.errors import MedldmError
from medldm.outputs import check_output, write_atomically
from tests.helpers import (
    TINY_CONFIG,
    _edit_dicom,
    _ixi,
    _listing,
    _patched_ixi,
    _reseal,
    _series,
    _set_pixdim,
    _small_scan,
    assert_refused,
    medldm,
    tiny,
    trainer,
)


def _upscale(*args) -> object:
    # the small scans are isotropic blocks: in-plane upscaling is asked for (isotropic scans need --kind or --axis)
    return medldm("upscale", *args, "--device", "cpu", "--kind", "kspace")


# ------------------------------------------------------------------------------------ 1. non-finite
def test_a_config_with_an_infinite_learning_rate_is_refused(tmp_path):

    config = tmp_path / "inf.yaml"
    config.write_text(TINY_CONFIG.read_text().replace("lr: 1.0e-3}", "lr: .inf}", 1))
    result = medldm("train", "--config", config, "--run-dir", tmp_path / "run")
    assert_refused(result, config, "training.autoencoder.lr")
    assert not (tmp_path / "run").exists()


def test_a_diverged_training_stops_with_one_line_and_exports_nothing(tmp_path, monkeypatch):
    from medldm.data import PairSampler

    real = PairSampler.batch

    def poisoned(self, *a, **k):
        batch = real(self, *a, **k)
        batch["hr"] = torch.full_like(batch["hr"], float("nan"))
        return batch

    monkeypatch.setattr(PairSampler, "batch", poisoned)
    config, root = tiny()
    with pytest.raises(MedldmError, match="loss became nan at step 1: training diverged"):
        trainer(config, root, tmp_path / "run").run("all")
    assert not (tmp_path / "run" / "model").exists()


def test_a_model_that_outputs_nan_writes_nothing(tmp_path, out_dir, tiny_model):
    model = Path(shutil.copytree(tiny_model / "model", tmp_path / "model"))
    weights = load_file(model / "denoiser.safetensors")
    save_file(
        {k: torch.full_like(v, float("nan")) if v.is_floating_point() else v for k, v in weights.items()},
        str(model / "denoiser.safetensors"),
    )

    _reseal(model)
    out = out_dir / "sr.nii.gz"
    assert_refused(
        _upscale(_small_scan(tmp_path), "--model", model, "-o", out), out, "non-finite voxels", out_dir=out_dir
    )


def test_input_values_near_the_float32_limit_are_refused_not_written_as_inf(tmp_path, out_dir, tiny_model):
    scan = _small_scan(tmp_path, peak=3e38)
    assert np.isfinite(nib.load(scan).get_fdata(dtype=np.float32)).all()
    out = out_dir / "sr.nii.gz"
    result = _upscale(scan, "--model", tiny_model / "model", "-o", out)
    assert_refused(result, scan, "beyond the 1e+30 float32 arithmetic can upscale safely", out_dir=out_dir)


def test_infinite_noise_is_refused(tmp_path, out_dir):
    result = medldm("degrade", _small_scan(tmp_path), out_dir / "lr.nii.gz", "--scale", "2", "--noise", "inf")
    assert_refused(result, "noise must be a finite number", out_dir=out_dir)


# ----------------------------------------------------------------------- 2. one output over another
def test_the_uncertainty_map_never_replaces_the_scan(tmp_path, out_dir, tiny_model):
    out = out_dir / "UP.NII.GZ"
    result = _upscale(_small_scan(tmp_path), "--model", tiny_model / "model", "-o", out, "--samples", "2")
    assert result.returncode == 0, result.stderr
    assert _listing(out_dir) == ["UP.NII.GZ", "UP.json", "UP_uncertainty.NII.GZ"]  # the scan, its sidecar, its map
    assert not np.array_equal(nib.load(out).get_fdata(), nib.load(out_dir / "UP_uncertainty.NII.GZ").get_fdata())


def test_degrade_refuses_one_path_for_both_of_its_outputs(tmp_path, out_dir):
    same = out_dir / "same.nii.gz"
    result = medldm("degrade", _small_scan(tmp_path), same, "--hr-out", same, "--overwrite")
    assert_refused(result, "two outputs of this command would share one file", out_dir=out_dir)


# --------------------------------------------------------------------- 3. a batch and its own outputs
def test_a_second_batch_run_writes_nothing_and_ignores_its_own_files(tmp_path, tiny_model):
    batch = tmp_path / "b"
    batch.mkdir()
    _small_scan(batch, "a.nii.gz")
    (batch / ".a_sr.nii.gz.0123abcd.partial.nii.gz").write_bytes(b"left by a killed run")
    first = _upscale(batch, "--model", tiny_model / "model")
    assert first.returncode == 0, first.stderr
    assert "1 written, 0 skipped" in first.stdout
    before = _listing(batch)
    second = _upscale(batch, "--model", tiny_model / "model")
    assert second.returncode == 0, second.stderr
    assert "0 written, 1 skipped" in second.stdout and _listing(batch) == before  # no a_sr_sr.nii.gz
    inside = batch / "out"  # an output folder inside the input folder is not an input
    third = _upscale(batch, "--model", tiny_model / "model", "-o", inside)
    assert third.returncode == 0, third.stderr
    assert "1 written" in third.stdout and _listing(inside) == ["a_sr.json", "a_sr.nii.gz", "medldm_upscale.csv"]


# ------------------------------------------------------------------------------- 4. DICOM slices
def test_a_dicom_edge_slice_without_a_position_is_refused(tmp_path, out_dir):
    folder, files = _series(tmp_path)
    _edit_dicom(files[0], lambda ds: delattr(ds, "ImagePositionPatient"))
    result = medldm("convert", folder, out_dir / "x.nii.gz")
    assert_refused(result, files[0].name, "ImagePositionPatient", out_dir=out_dir)
    assert pydicom.dcmread(files[0]).SeriesInstanceUID  # the file itself is a readable image of the series


# --------------------------------------------------------------- 5. output problems before computing
@pytest.mark.parametrize("case", ["parent-is-a-file", "temporary-name-too-long", "preview-suffix", "read-only"])
def test_output_problems_are_found_before_any_work(tmp_path, out_dir, tiny_model, case):
    scan = _small_scan(tmp_path)
    args, phrase = {
        "parent-is-a-file": (["-o", scan / "x.nii.gz"], "is not a folder"),
        "temporary-name-too-long": (["-o", out_dir / ("n" * 230 + ".nii.gz")], "temporary file would pass 255"),
        "preview-suffix": (["-o", out_dir / "x.nii.gz", "--preview", out_dir / "p.txtx"], "preview must end in .png"),
        "read-only": (["-o", out_dir / "x.nii.gz"], "is not writable"),
    }[case]
    if case == "read-only":
        if os.geteuid() == 0:
            pytest.skip("root writes into read-only folders")
        out_dir.chmod(0o555)
    try:
        result = _upscale(scan, "--model", tiny_model / "model", *args)
    finally:
        out_dir.chmod(0o755)
    assert_refused(result, phrase, out_dir=out_dir)


def test_a_full_disk_gives_one_line_and_no_partial_file(tmp_path):
    def full(tmp: Path) -> None:
        tmp.write_bytes(b"half a volume")
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(MedldmError, match="no space left on the device; nothing was written"):
        write_atomically(tmp_path / "x.nii.gz", full)
    assert _listing(tmp_path) == []


def test_sigterm_during_a_save_leaves_no_temporary_file(tmp_path):
    def killed(tmp: Path) -> None:
        tmp.write_bytes(b"half a volume")
        raise SystemExit(143)  # what the CLI's SIGTERM handler raises

    with pytest.raises(SystemExit):
        write_atomically(tmp_path / "x.nii.gz", killed)
    assert _listing(tmp_path) == []


def test_of_two_runs_racing_for_one_name_exactly_one_writes_it(tmp_path):
    target = tmp_path / "x.nii.gz"
    check_output(target)  # both runs pass the check ...

    def meanwhile(tmp: Path) -> None:  # ... then the other run finishes first
        tmp.write_bytes(b"ours")
        target.write_bytes(b"theirs")

    with pytest.raises(MedldmError, match="already exists"):
        write_atomically(target, meanwhile)
    assert target.read_bytes() == b"theirs" and _listing(tmp_path) == ["x.nii.gz"]


# ------------------------------------------------------------------------------ 6. rich markup in paths
def test_paths_that_look_like_rich_markup_are_printed_as_they_are(tmp_path, tiny_model):
    (tmp_path / "scan[").mkdir()
    scan = _small_scan(tmp_path / "scan[", "]x.nii.gz")  # the path reads ".../scan[/]x.nii.gz": a closing tag
    assert str(scan).endswith("scan[/]x.nii.gz")
    shown = medldm("info", scan)
    assert shown.returncode == 0 and "Traceback" not in shown.stderr, shown.stderr
    (tmp_path / "o[bold").mkdir()
    out = tmp_path / "o[bold" / "]r[/].nii.gz"
    result = _upscale(scan, "--model", tiny_model / "model", "-o", out)
    assert result.returncode == 0 and "Traceback" not in result.stderr, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.startswith("wrote")]
    assert len(lines) == 1 and lines[0].startswith(f"wrote {out}:") and lines[0].endswith("% of range")  # unwrapped


# ------------------------------------------------------------------------------------ 9. model folders
def _tamper_sums(model: Path, edit) -> None:
    sums = model / "SHA256SUMS"
    sums.write_text(edit(sums.read_text()))


def _secret_outside(model: Path) -> str:
    secret = model.parent / "secret.txt"
    secret.write_text("not for medldm")
    return f"{hashlib.sha256(secret.read_bytes()).hexdigest()}  ../secret.txt\n"


MODEL_CASES = {
    "empty-sums": (lambda m: _tamper_sums(m, lambda t: ""), "SHA256SUMS does not list"),
    "partial-sums": (lambda m: _tamper_sums(m, lambda t: "".join(t.splitlines(True)[:2])), "SHA256SUMS does not list"),
    "name-outside": (lambda m: _tamper_sums(m, lambda t: t + _secret_outside(m)), "not a file of this folder"),
    "malformed-line": (lambda m: _tamper_sums(m, lambda t: t + "nonsense\n"), "SHA256SUMS line"),
    "scale-is-text": (lambda m: _set_info(m, latent_scale="big"), "positive number latent_scale"),
    "scale-missing": (lambda m: _set_info(m, latent_scale=None), "positive number latent_scale"),
    "info-is-a-list": (lambda m: _set_info(m, whole=[1, 2]), "positive number latent_scale"),
    "bad-sampling": (lambda m: _set_info(m, sampling={"steps": "many"}), "model.json sampling"),
    # within the config's bounds, but ~1.5 GB of parameters: refused from the weights' header, before allocating
    "huge-claimed-network": (
        lambda m: _set_config(m, "diffusion", channels=lambda c: [2048] * len(c)),
        "weights do not fit the model in its config",
    ),
}


def _set_config(model: Path, section: str, **changes) -> None:
    """Rewrite config entries from their current values (``key=function(old)``) and reseal the folder."""

    config = json.loads((model / "config.json").read_text())
    config[section].update({key: change(config[section][key]) for key, change in changes.items()})
    (model / "config.json").write_text(json.dumps(config))
    _reseal(model)


def _set_info(model: Path, whole=None, **changes) -> None:

    info = json.loads((model / "model.json").read_text())
    info.update(changes)
    info = {k: v for k, v in info.items() if v is not None} if whole is None else whole
    (model / "model.json").write_text(json.dumps(info))
    _reseal(model)


@pytest.mark.parametrize("case", list(MODEL_CASES))
def test_a_tampered_model_folder_is_refused_with_one_line(tmp_path, out_dir, tiny_model, case):
    model = Path(shutil.copytree(tiny_model / "model", tmp_path / "model"))
    damage, phrase = MODEL_CASES[case]
    damage(model)
    result = _upscale(_small_scan(tmp_path), "--model", model, "-o", out_dir / "sr.nii.gz")
    assert_refused(result, model, phrase, out_dir=out_dir)


# --------------------------------------------------------------------------------- 11. training configs
CONFIG_ESCAPES = {
    "name-climbs-out": ("name: tiny_2d", "name: ../../escaped", "name"),
    "cache-climbs-out": ("  patch_size: [32, 32]", "  patch_size: [32, 32]\n  cache: ../../escaped.h5", "data.cache"),
    "cache-absolute": ("  patch_size: [32, 32]", "  patch_size: [32, 32]\n  cache: /tmp/escaped.h5", "data.cache"),
    "huge-patch": ("  patch_size: [32, 32]", "  patch_size: [100000, 100000]", "patch_size entries must lie in"),
    "huge-progressive": ("lr: 1.0e-3}", "lr: 1.0e-3, progressive: [[2, 99999, 99999]]}", "progressive"),
    "beta-end-above-one": ("  condition_levels: 4", "  condition_levels: 4\n  beta_end: 2.0", "beta_end"),
    "unknown-ct-window": (
        "  patch_size: [32, 32]",
        "  patch_size: [32, 32]\n  intensity: {kind: window, window: liver}",
        "window: one of brain",
    ),
}


@pytest.mark.parametrize("case", list(CONFIG_ESCAPES))
def test_a_training_config_cannot_write_outside_its_run_or_exhaust_memory(tmp_path, case):

    old, new, phrase = CONFIG_ESCAPES[case]
    work = tmp_path / "a" / "b"
    work.mkdir(parents=True)
    config = work / "bad.yaml"
    text = TINY_CONFIG.read_text()
    assert old in text
    config.write_text(text.replace(old, new, 1))
    before = _listing(tmp_path)
    result = medldm("train", "--config", config, "--run-dir", work / "run")
    assert_refused(result, config, phrase)
    assert _listing(tmp_path) == before and not Path("/tmp/escaped.h5").exists()  # nothing written anywhere


# ---------------------------------------------------------------------------------- 10. output size
def test_an_output_too_large_for_memory_is_refused_before_any_work(tmp_path, out_dir, tiny_model, monkeypatch):
    """The scan fits, its x4 upscaled grid would not: refused with the estimate before the networks run."""
    from medldm.pipeline import Upscaler
    from medldm.volume import load

    scan = load(_small_scan(tmp_path))
    upscaler = Upscaler(tiny_model / "model", device="cpu")
    pages = 4 * 48 * 48 * 24 * 4 * 3 // os.sysconf("SC_PAGE_SIZE")  # memory for about 3 upscaled volumes
    monkeypatch.setattr(os, "sysconf", lambda name: pages if name == "SC_PHYS_PAGES" else 4096)
    ran = []
    monkeypatch.setattr(Upscaler, "_sample_volume", lambda *a, **k: ran.append(1))
    with pytest.raises(MedldmError, match=r"the upscaled grid \(48, 192, 24\) needs .* GiB as float32, more than 80%"):
        upscaler.upscale(scan, axis="z", scale=4, kind="slice-profile")
    assert not ran


# ------------------------------------------------------------------------------ 8. geometry invented
def _nifti_with(
    tmp: Path,
    name: str,
    *,
    image=nib.Nifti1Image,
    sform: int,
    qform: int,
    qform_shift: float = 0.0,
    zero_pixdim: bool = False,
) -> Path:
    data, affine = _ixi()
    img = image(data[36:84, 36:84, 33:57].astype(np.float32), None)
    img.set_sform(affine, code=sform)
    shifted = affine.copy()
    shifted[:3, 3] += qform_shift
    img.set_qform(shifted, code=qform)
    path = tmp / name
    nib.save(img, path)
    if zero_pixdim:  # edited in the bytes: nibabel's save would rewrite the voxel sizes from the affine
        raw = bytearray(path.read_bytes())
        raw[120:128] = np.float64(0.0).tobytes()  # NIfTI-2: pixdim is float64[8] at byte 104; pixdim[2]
        path.write_bytes(bytes(raw))
        assert nib.Nifti2Header(bytes(raw[:540]), check=False)["pixdim"][2] == 0
    return path


@pytest.mark.parametrize("case", ["no-sform-no-qform", "qform-disagrees", "nifti2-zero-pixdim"])
def test_invented_geometry_is_said_or_refused(tmp_path, case):
    if case == "no-sform-no-qform":
        scan = _nifti_with(tmp_path, "s.nii.gz", sform=0, qform=0)
        result = medldm("info", scan)
        assert result.returncode == 0 and "Traceback" not in result.stderr
        assert result.stderr.startswith(f"warning: {scan}: neither sform nor qform is set"), result.stderr
    elif case == "qform-disagrees":
        scan = _nifti_with(tmp_path, "s.nii.gz", sform=1, qform=1, qform_shift=5.0)
        result = medldm("info", scan)
        assert result.returncode == 0 and "the qform and the sform disagree (by up to 5" in result.stderr
    else:  # NIfTI-2 with a zero voxel size and no sform: the geometry is unknowable
        scan = _nifti_with(tmp_path, "s.nii", image=nib.Nifti2Image, sform=0, qform=0, zero_pixdim=True)
        assert_refused(medldm("info", scan), scan, "zero entry and no sform")


# ---------------------------------------------------------------------------- 7. one folder, one meaning
def test_a_folder_means_the_same_to_every_command(tmp_path):
    from medldm.batch import batch_inputs

    series, _ = _series(tmp_path)  # DICOM slices, plus a NIfTI and a sub-folder beside them
    _small_scan(series, "extra.nii.gz")
    (series / "notes").mkdir()
    assert batch_inputs(series, None) is None  # upscale: the DICOM series, as for info and convert
    shown = medldm("info", series)
    assert shown.returncode == 0 and "dicom" in shown.stdout, shown.stderr
    scans = tmp_path / "scans"  # NIfTI files and no DICOM files: a batch for upscale, refused by info by name
    scans.mkdir()
    _small_scan(scans, "a.nii.gz")
    assert batch_inputs(scans, None) == [scans / "a.nii.gz"]
    assert_refused(medldm("info", scans), scans, "a folder of scans is a batch for 'medldm upscale'")


# ------------------------------------------------------------------------------------------- low
def test_spacings_equal_up_to_float_noise_do_not_pick_the_thick_axis_by_chance(tmp_path):
    from medldm.volume import Volume, resolve_axis

    data = np.zeros((8, 8, 8), np.float32)
    for noise in ((0, 1e-7), (1e-7, 0)):  # either of two 3 mm axes a hair larger
        affine = np.diag([3.0 + noise[0], 1.0, 3.0 + noise[1], 1.0])
        assert resolve_axis(Volume(data, affine), "auto") == 2  # the world-z one, whatever the noise


def test_seeds_beyond_the_mixed_range_are_refused(tmp_path, out_dir):
    result = medldm("degrade", _small_scan(tmp_path), out_dir / "lr.nii.gz", "--noise", "0.01", "--seed", str(2**64))
    assert result.returncode == 2 and "Traceback" not in result.stderr and "--seed" in result.stderr
    assert _listing(out_dir) == []


def test_what_nibabel_says_becomes_warning_lines(tmp_path):

    scan = _patched_ixi(tmp_path, "qfac.nii", lambda hdr: _set_pixdim(hdr, 0, 0.5))  # an invalid qfac
    result = medldm("info", scan)
    assert result.returncode == 0, result.stderr
    lines = result.stderr.splitlines()
    assert lines and all(line.startswith(f"warning: {scan}: ") for line in lines), result.stderr
    assert any("qfac" in line for line in lines)


def test_a_model_folder_is_readable_as_a_whole(tiny_model):
    """safetensors writes its files 0600; an exported folder gives every file the JSON files' mode (the umask's),
    so a model shared with colleagues is not half unreadable."""
    modes = {p.name: p.stat().st_mode & 0o777 for p in (tiny_model / "model").iterdir()}
    assert len(set(modes.values())) == 1, modes
