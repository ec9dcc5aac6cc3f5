"""Cohort runs (issue 22): `torchrun --nproc_per_node N -m medldm.cli upscale IN_DIR -o OUT_DIR` shares a batch
between processes; each scan is done exactly once, with the result a single process gives, and one summary is
merged at the end."""

from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys

import nibabel as nib
import numpy as np
import pytest

from tests.helpers import LPIPS, _free_port, _ixi, _small_scan, medldm


def test_two_processes_share_a_batch_and_match_one_process(tmp_path, tiny_model):
    batch = tmp_path / "scans"
    batch.mkdir()
    names = [f"s{i}.nii.gz" for i in range(5)]
    for name in names:
        _small_scan(batch, name)
    model = tiny_model / "model"
    one = medldm("upscale", batch, "-o", tmp_path / "one", "--model", model, "--device", "cpu", "--kind", "kspace")
    assert one.returncode == 0, one.stderr
    # one scan is already done in the cohort's folder (as after an interrupted run): some rank skips it
    done_before = names[0].replace(".nii.gz", "_sr.nii.gz")
    (tmp_path / "two").mkdir()
    shutil.copy(tmp_path / "one" / done_before, tmp_path / "two" / done_before)
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1"}
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "--master_addr",
        "127.0.0.1",
        "--master_port",
        str(_free_port()),
        "-m",
        "medldm.cli",
        "upscale",
        str(batch),
        "-o",
        str(tmp_path / "two"),
        "--model",
        str(model),
        "--device",
        "cpu",
        "--kind",
        "kspace",
        "--json",
    ]
    two = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert two.returncode == 0, two.stderr[-3000:]
    lines = [json.loads(line) for line in two.stdout.splitlines() if line.startswith("{")]
    status = {os.path.basename(x["input"]): x["status"] for x in lines}
    assert len(lines) == len(names)  # each scan once, by one process or the other
    assert status == {name: "skipped" if name == names[0] else "written" for name in names}
    with open(tmp_path / "two" / "medldm_upscale.csv", newline="") as fh:
        summary = {os.path.basename(r["input"]): r["status"] for r in csv.DictReader(fh)}
    assert summary == status  # one summary, merged over both processes

    for name in names[1:]:
        out = name.replace(".nii.gz", "_sr.nii.gz")
        one_out, two_out = nib.load(tmp_path / "one" / out), nib.load(tmp_path / "two" / out)
        assert np.array_equal(one_out.get_fdata(), two_out.get_fdata())


def test_two_processes_share_an_evaluation_and_report_what_one_process_reports(tmp_path):

    data, affine = _ixi()
    scans = []
    for i, start in enumerate((20, 40, 56)):  # three 64^3 blocks of one scan: distinct volumes, LPIPS-sized
        path = tmp_path / f"v{i}.nii.gz"
        nib.save(nib.Nifti1Image(data[start : start + 64, 30:94, 10:74].astype(np.float32), affine), str(path))
        scans.append(str(path))
    (tmp_path / "list.txt").write_text("\n".join(scans) + "\n")
    options = [
        "--data",
        str(tmp_path / "list.txt"),
        "--baseline",
        "trilinear",
        "--baseline",
        "bspline-dc",
        "--lpips-weights",
        str(LPIPS),
        "--device",
        "cpu",
    ]
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1"}
    two = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc_per_node",
            "2",
            "--master_addr",
            "127.0.0.1",
            "--master_port",
            str(_free_port()),
            "-m",
            "medldm.cli",
            "evaluate",
            "--out",
            str(tmp_path / "two"),
            *options,
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert two.returncode == 0, two.stderr[-3000:]
    one = medldm("evaluate", "--out", tmp_path / "one", *options)
    assert one.returncode == 0, one.stderr

    def table(folder):
        with open(folder / "metrics.csv", newline="") as fh:
            return [{k: v for k, v in row.items() if k != "seconds"} for row in csv.DictReader(fh)]

    two_rows, one_rows = table(tmp_path / "two"), table(tmp_path / "one")
    assert [(r["volume"], r["method"]) for r in two_rows] == [(r["volume"], r["method"]) for r in one_rows]
    for a, b in zip(two_rows, one_rows, strict=True):  # equal up to the order of threaded float sums
        assert {k: float(v) for k, v in a.items() if k not in ("volume", "method") and v} == pytest.approx(
            {k: float(v) for k, v in b.items() if k not in ("volume", "method") and v}, rel=1e-9
        )
    assert [r["volume"] for r in table(tmp_path / "two")][::2] == ["v0.nii.gz", "v1.nii.gz", "v2.nii.gz"]
