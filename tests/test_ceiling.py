"""The autoencoder's reconstruction ceiling (`python -m medldm.evaluation.ceiling`), the model card's figure."""

from __future__ import annotations

import csv

import numpy as np
import pytest
from medldm.evaluation.baselines import baseline
from medldm.evaluation.ceiling import ceiling, main
from medldm.evaluation.metrics import foreground_mask, psnr

from medldm import MedldmError
from medldm.degrade import acquisition_operator, degrade_volume
from medldm.pipeline import Upscaler
from medldm.volume import crop, save_nifti
from tests.helpers import ixi_block


def test_the_ceiling_scores_the_autoencoders_reconstruction_of_the_truth(ixi_path):
    lr, truth = degrade_volume(ixi_block(ixi_path), kind="slice-profile", axis="z", scale=4)
    up, op = Upscaler("default", device="cpu"), acquisition_operator(lr)
    rec = up.autoencode(lr, truth, op)
    assert rec.shape == truth.shape and np.array_equal(rec.affine, truth.affine)
    mask = foreground_mask(truth.data)
    scores = ceiling(up, lr, truth)
    assert scores["psnr"] == pytest.approx(psnr(rec.data, truth.data, mask=mask))
    # the bottleneck keeps much more of the truth than B-spline recovers from the thick slices (a wrong plane
    # axis, normalisation or crop would not), but not all of it
    bspline_dc = psnr(baseline("bspline-dc", lr, op).data, truth.data, mask=mask)
    assert bspline_dc + 2 < scores["psnr"] < 45
    assert scores["psnr_projected"] > scores["psnr"]  # the acquired slices put back what the bottleneck lost of them
    with pytest.raises(MedldmError, match="comes from"):
        up.autoencode(lr, crop(truth, (slice(0, 40), slice(None), slice(None))), op)


def test_the_ceiling_command_writes_its_table_and_names_a_bad_file(ixi_path, tmp_path, capsys):
    scan = tmp_path / "block.nii.gz"
    save_nifti(ixi_block(ixi_path), scan)
    table = tmp_path / "ceiling.csv"
    assert main([str(scan), "--csv", str(table)]) == 0
    with open(table, newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert [r["volume"] for r in rows] == ["block.nii.gz"] and float(rows[0]["psnr_projected"]) > float(rows[0]["psnr"])
    assert main([str(tmp_path / "missing.nii.gz")]) == 1
    assert "missing.nii.gz" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # the kinds are medldm.choices.Kind's, refused before any model is loaded
        main([str(scan), "--kind", "thick"])
    assert "invalid choice: 'thick'" in capsys.readouterr().err
