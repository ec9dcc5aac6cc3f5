"""Provenance sidecars and machine-readable output (issue 22): every upscaled scan carries what made it, and that
record is enough to make it again."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import nibabel as nib
import numpy as np

from tests.helpers import LPIPS, _ixi, _small_scan, medldm


def test_the_sidecar_records_the_run_and_reruns_it_to_the_same_output(tmp_path, tiny_model, monkeypatch):
    scan, out = _small_scan(tmp_path), tmp_path / "out" / "up.nii.gz"
    out.parent.mkdir()
    model = tiny_model / "model"
    first = medldm(
        "upscale",
        scan,
        "--model",
        model,
        "-o",
        out,
        "--device",
        "cpu",
        "--steps",
        "2",
        "--seed",
        "7",
        "--axis",
        "k",
        "--kind",
        "slice-profile",
    )
    assert first.returncode == 0, first.stderr
    record = json.loads((out.parent / "up.json").read_text())
    run = record["medldm"]
    assert run["input"]["sha256"] == hashlib.sha256(scan.read_bytes()).hexdigest()
    assert run["model"]["sha256"] == hashlib.sha256((model / "SHA256SUMS").read_bytes()).hexdigest()
    assert run["sampling"]["steps"] == 2 and run["sampling"]["seed"] == 7
    assert run["task"] == {"kind": "slice-profile", "scale": 4, "axis": 2, "profile": "gaussian"}
    assert run["factor"] == {"exact": 4, "thickness_ratio": 1.0, "estimate_scale": 4}
    assert run["input"]["shape"] == list(nib.load(scan).shape) and run["output"]["shape"] == list(nib.load(out).shape)
    assert run["consistency_residual"] < 1e-4 and run["wall_time_s"] > 0
    assert record["Description"].startswith("Super-resolved by medldm") and record["Sources"] == [str(scan)]
    assert "2 diffusion sampler step(s) from noise" in record["Description"]  # the tiny model has no estimator
    descrip = nib.load(out).header["descrip"].item().decode()
    assert descrip.startswith("medldm ") and run["model"]["sha256"][:12] in descrip

    # the recorded command, run again from the recorded folder, makes the same volume (that a new process makes
    # the same output as this one, tests/test_cohort.py shows)
    out.rename(tmp_path / "first.nii.gz")
    assert run["command"][0] == "medldm"
    monkeypatch.chdir(run["cwd"])
    again = medldm(*run["command"][1:])
    assert again.returncode == 0, again.stderr
    assert np.array_equal(nib.load(out).get_fdata(), nib.load(tmp_path / "first.nii.gz").get_fdata())


def test_json_lines_report_each_scan_of_a_batch_and_quiet_prints_nothing(tmp_path, tiny_model):
    batch = tmp_path / "b"
    batch.mkdir()
    for name in ("a.nii.gz", "b.nii.gz"):
        _small_scan(batch, name)
    model = tiny_model / "model"
    # isotropic blocks: in-plane upscaling is asked for explicitly (an isotropic scan is refused without it)
    first = medldm("upscale", batch, "--model", model, "--device", "cpu", "--kind", "kspace", "--json")
    assert first.returncode == 0, first.stderr
    lines = [json.loads(line) for line in first.stdout.splitlines()]  # nothing but JSON on stdout
    assert [(x["status"], Path(x["output"]).name) for x in lines] == [
        ("written", "a_sr.nii.gz"),
        ("written", "b_sr.nii.gz"),
    ]
    assert lines[0]["provenance"] == json.loads((batch / "a_sr.json").read_text())
    second = medldm("upscale", batch, "--model", model, "--device", "cpu", "--kind", "kspace", "--json")
    assert [json.loads(line)["status"] for line in second.stdout.splitlines()] == ["skipped", "skipped"]
    quiet = medldm(
        "upscale",
        batch / "a.nii.gz",
        "--model",
        model,
        "--device",
        "cpu",
        "-o",
        tmp_path / "q.nii.gz",
        "--kind",
        "kspace",
        "--quiet",
    )
    assert quiet.returncode == 0 and quiet.stdout == "" and quiet.stderr == "", quiet.stderr
    assert (tmp_path / "q.nii.gz").is_file() and (tmp_path / "q.json").is_file()


def test_info_json_is_one_object_with_the_geometry(tmp_path):
    scan = _small_scan(tmp_path)
    result = medldm("info", scan, "--json")
    assert result.returncode == 0, result.stderr
    info = json.loads(result.stdout)
    img = nib.load(scan)
    assert info["shape"] == list(img.shape) and np.allclose(info["affine"], img.affine)
    assert np.allclose(info["spacing_mm"], img.header.get_zooms())


def test_an_evaluation_records_its_command_and_reruns_to_the_same_table(tmp_path, monkeypatch):
    import csv
    import shlex

    scan = tmp_path / "v.nii.gz"

    data, affine = _ixi()
    nib.save(nib.Nifti1Image(data[30:94, 30:94, 10:74].astype(np.float32), affine), str(scan))
    first = medldm(
        "evaluate",
        "--data",
        scan,
        "--out",
        tmp_path / "r",
        "--baseline",
        "bspline-dc",
        "--lpips-weights",
        LPIPS,
        "--device",
        "cpu",
    )
    assert first.returncode == 0, first.stderr
    provenance = json.loads((tmp_path / "r" / "summary.json").read_text())["protocol"]["provenance"]
    command = shlex.split(provenance["command line"])
    assert command[:2] == ["medldm", "evaluate"]
    (tmp_path / "r").rename(tmp_path / "first")
    monkeypatch.chdir(provenance["cwd"])
    again = medldm(*command[1:])
    assert again.returncode == 0, again.stderr

    def table(folder):
        with open(folder / "metrics.csv", newline="") as fh:
            return [{k: v for k, v in r.items() if k != "seconds"} for r in csv.DictReader(fh)]

    assert table(tmp_path / "r") == table(tmp_path / "first")
