"""BIDS (issue 22): `medldm upscale DATASET --bids` writes BIDS derivatives with desc-sr names and the
derivative's dataset_description.json; a rerun does nothing new."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from medldm.bids import derivative_path
from tests.helpers import _listing, _small_scan, assert_refused, medldm


def _dataset(tmp: Path) -> Path:
    root = tmp / "ds"
    for folder, name in (("sub-01/anat", "sub-01_T1w.nii.gz"), ("sub-02/ses-1/anat", "sub-02_ses-1_T1w.nii.gz")):
        (root / folder).mkdir(parents=True)
        _small_scan(root / folder, name)
    (root / "dataset_description.json").write_text(json.dumps({"Name": "tiny", "BIDSVersion": "1.9.0"}))
    (root / "participants.tsv").write_text("participant_id\nsub-01\nsub-02\n")
    return root


def test_a_bids_dataset_becomes_bids_derivatives(tmp_path, tiny_model):
    root = _dataset(tmp_path)
    first = medldm("upscale", root, "--bids", "--model", tiny_model / "model", "--device", "cpu", "--kind", "kspace")
    assert first.returncode == 0, first.stderr
    derivatives = root / "derivatives" / "medldm"
    assert _listing(derivatives) == [
        "dataset_description.json",
        "medldm_upscale.csv",
        "sub-01",
        "sub-01/anat",
        "sub-01/anat/sub-01_desc-sr_T1w.json",
        "sub-01/anat/sub-01_desc-sr_T1w.nii.gz",
        "sub-02",
        "sub-02/ses-1",
        "sub-02/ses-1/anat",
        "sub-02/ses-1/anat/sub-02_ses-1_desc-sr_T1w.json",
        "sub-02/ses-1/anat/sub-02_ses-1_desc-sr_T1w.nii.gz",
    ]
    description = json.loads((derivatives / "dataset_description.json").read_text())
    assert description["DatasetType"] == "derivative" and description["GeneratedBy"][0]["Name"] == "medldm"
    before = _listing(root)
    second = medldm("upscale", root, "--bids", "--model", tiny_model / "model", "--device", "cpu", "--kind", "kspace")
    assert second.returncode == 0 and "0 written, 2 skipped" in second.stdout and _listing(root) == before


def test_bids_names_keep_their_entities(tmp_path):
    root = tmp_path / "ds"
    scan = root / "sub-7" / "anat" / "sub-7_acq-thick_desc-raw_FLAIR.nii"
    assert derivative_path(scan, root) == root / "derivatives/medldm/sub-7/anat/sub-7_acq-thick_desc-rawsr_FLAIR.nii"


def test_bids_outside_a_dataset_is_refused(tmp_path):
    scan = _small_scan(tmp_path)
    assert_refused(medldm("upscale", scan, "--bids"), scan, "not inside a BIDS dataset")


@pytest.mark.parametrize("name", ["T1w.nii.gz", "scan_T1w.nii.gz"])
def test_a_name_that_is_not_bids_is_refused(tmp_path, name):
    from medldm.errors import MedldmError

    with pytest.raises(MedldmError, match="not a BIDS file name"):
        derivative_path(tmp_path / "sub-1" / name, tmp_path)


def test_a_bids_root_without_bids_says_to_pass_it(tmp_path):
    root = _dataset(tmp_path)
    assert_refused(medldm("upscale", root), root, "pass --bids")
