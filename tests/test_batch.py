"""medldm.batch, the library side of `medldm upscale`: a batch skips finished outputs, collects refusals and goes
on; one scan raises. (The command line's batches, with real models: test_pipeline, test_hostile, test_bids.)"""

from __future__ import annotations

import csv
from pathlib import Path

import pytest

from medldm.batch import Listener, Row, outputs_of, run_batch, uncertainty_path, write_batch_summary
from medldm.choices import Format
from medldm.errors import MedldmError


class _Seen(Listener):
    def __init__(self):
        self.rows: list[Row] = []

    def done(self, row, result=None):
        self.rows.append(row)


def _jobs(tmp_path, names):
    return [(tmp_path / f"{n}.nii.gz", tmp_path / "out" / f"{n}_sr.nii.gz") for n in names]


def test_a_batch_skips_finished_outputs_and_collects_failures(tmp_path):
    jobs = _jobs(tmp_path, ["a", "b", "c"])
    (tmp_path / "out").mkdir()
    jobs[0][1].write_text("done before")  # an interrupted batch finished this one

    def work(source, target):
        if source.name.startswith("b"):
            raise MedldmError("not a scan", source)
        target.write_text("new")
        return {"medldm": {"wall_time_s": 1.5, "consistency_residual": 1e-7}}, None

    seen = _Seen()
    rows = run_batch(jobs, work, overwrite=False, single=False, listener=seen)
    assert [r.status for r in rows] == ["skipped", "failed", "written"] and seen.rows == rows
    assert "not a scan" in rows[1].error and jobs[0][1].read_text() == "done before"
    summary = write_batch_summary(tmp_path / "out", rows)
    table = list(csv.DictReader(summary.open()))
    assert [(r["status"], r["seconds"]) for r in table] == [("skipped", ""), ("failed", ""), ("written", "1.5")]


def test_one_scan_raises_instead_of_skipping_or_collecting(tmp_path):
    (job,) = _jobs(tmp_path, ["a"])
    job[1].parent.mkdir()
    job[1].write_text("there")
    with pytest.raises(MedldmError, match="already exists"):
        run_batch([job], lambda s, t: ({}, None), overwrite=False, single=True, listener=Listener())

    def refuse(source, target):
        raise MedldmError("bad", source)

    with pytest.raises(MedldmError, match="bad"):
        run_batch([job], refuse, overwrite=True, single=True, listener=Listener())


def test_output_names():
    target, unc = outputs_of(Path("/data/scan.nii.gz"), None)
    assert target.name == "scan_sr.nii.gz" and unc.name == "scan_sr_uncertainty.nii.gz"
    assert uncertainty_path(target) == unc
    folder, _ = outputs_of(Path("/data/series"), None, Format.dicom)
    assert folder.name == "series_sr"
