"""Helpers shared by several test modules: paths to the shared data, the tiny configs, the CLI runner and small
scans made from real data. Fixtures live in conftest.py; no test module imports another."""

from __future__ import annotations

import copy
import csv
import functools
import gzip
import hashlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import traceback
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
import yaml

from medldm.config import parse_config
from medldm.data import PairSampler
from medldm.train import Trainer
from medldm.volume import Volume, crop, load

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("MEDLDM_SHARED", REPO.parent / "shared"))


def shared_path(relative: str) -> Path:
    """Path under the shared data folder; fails in CI (CI=true) and skips elsewhere when it is missing."""
    path = SHARED / relative
    if not path.exists():
        message = f"shared test data missing: {path} (set MEDLDM_SHARED)"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(message)
        pytest.skip(message)
    return path


IXI = "data/mri/ixi-t1-2mm"


TRIO = "data/mri/trio-b17-t1-mprage/dicom"


TINY_CONFIG = REPO / "configs" / "tiny_2d.yaml"


def medldm(*args: str | Path) -> subprocess.CompletedProcess:
    """``medldm ARGS`` run in this process, as a user's shell would see it: the exit code, stdout and stderr apart,
    and an exception other than the command line's own exits shown as a traceback on stderr. In-process because a
    new interpreter spends seconds importing torch and MONAI again (docs/performance.md, "Start-up"). Tests of
    process behaviour (signals, several processes, an installed copy) start real processes themselves."""
    from medldm.cli import app
    from typer.testing import CliRunner

    argv, on_sigterm = sys.argv, signal.getsignal(signal.SIGTERM)
    sys.argv = ["medldm", *map(str, args)]  # what provenance records as the command
    try:
        result = CliRunner().invoke(app, sys.argv[1:])
    finally:
        sys.argv = argv
        signal.signal(signal.SIGTERM, on_sigterm)  # the CLI installs its own
    stderr = result.stderr
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        stderr += "".join(traceback.format_exception(result.exception))
    return subprocess.CompletedProcess(["medldm", *map(str, args)], result.exit_code, result.stdout, stderr)


def assert_refused(result: subprocess.CompletedProcess, *phrases: str | Path, out_dir: Path | None = None) -> str:
    """Exit 1, exactly one stderr line ``error: ...`` holding every phrase, no traceback, nothing written."""
    assert result.returncode == 1, f"exit {result.returncode}\nstdout: {result.stdout}\nstderr: {result.stderr}"
    assert "Traceback" not in result.stderr, result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    for phrase in phrases:
        assert str(phrase) in lines[0], f"{phrase!r} not in {lines[0]!r}"
    if out_dir is not None:
        assert sorted(os.listdir(out_dir)) == [], "output or partial files left behind"
    return lines[0]


@functools.cache
def _ixi_path() -> Path:
    return sorted(shared_path(IXI).glob("*.nii.gz"))[0]


def ixi_block(path: Path) -> Volume:
    """A real IXI block, 48 x 120 x 40 of the scan's 120 x 120 x 90 (the whole extent along z, voxel axis 1): real
    anatomy for the thick-slice tests, small enough for short upscales."""
    return crop(load(path), (slice(36, 84), slice(None), slice(25, 65)))


@functools.cache
def _ixi_arrays() -> tuple[np.ndarray, np.ndarray]:
    img = nib.load(_ixi_path())
    data = np.asanyarray(img.dataobj)
    data.setflags(write=False)
    return data, img.affine


def _ixi() -> tuple[np.ndarray, np.ndarray]:
    """A real IXI T1 scan (120 x 120 x 90, 2 mm, PSR; uint8 on disk, scaled values here) and its affine."""
    data, affine = _ixi_arrays()
    return data.copy(), affine.copy()


def _save(tmp: Path, name: str, data: np.ndarray, affine: np.ndarray | None = None) -> Path:
    path = tmp / name
    nib.save(nib.Nifti1Image(data, _ixi()[1] if affine is None else affine), path)
    return path


def _patched_ixi(tmp: Path, name: str, edit) -> Path:
    """The IXI file with its NIfTI-1 header edited byte-exactly (nibabel's save would repair the fields)."""
    raw = gzip.decompress(_ixi_path().read_bytes())
    hdr = nib.Nifti1Header(raw[:348], check=False)
    edit(hdr)
    body = hdr.binaryblock + raw[348:]
    path = tmp / name
    path.write_bytes(gzip.compress(body, compresslevel=1) if name.endswith(".gz") else body)
    return path


def _set_pixdim(hdr, index: int, value: float) -> None:
    pixdim = hdr["pixdim"].copy()
    pixdim[index] = value
    hdr["pixdim"] = pixdim


@functools.cache
def _trio_slices() -> tuple[Path, ...]:
    """The Trio MPRAGE slice files sorted along the slice normal."""
    files = sorted(shared_path(TRIO).glob("*.dcm"))
    headers = [pydicom.dcmread(f, stop_before_pixels=True) for f in files]
    iop = np.asarray(headers[0].ImageOrientationPatient, float)
    normal = np.cross(iop[:3], iop[3:])
    depth = [float(np.dot(np.asarray(h.ImagePositionPatient, float), normal)) for h in headers]
    return tuple(f for _, f in sorted(zip(depth, files, strict=True)))


def _series(tmp: Path, n: int = 8) -> tuple[Path, list[Path]]:
    """A folder holding n contiguous real slices from the middle of the head."""
    dest = tmp / "series"
    dest.mkdir()
    return dest, [Path(shutil.copy(f, dest / f.name)) for f in _trio_slices()[80 : 80 + n]]


def _edit_dicom(path: Path, edit) -> None:
    ds = pydicom.dcmread(path)
    edit(ds)
    ds.save_as(path)


def _reseal(folder: Path) -> None:
    """Rewrite SHA256SUMS so the checksums pass and only the damage itself can be caught."""
    sums = [
        f"{hashlib.sha256(p.read_bytes()).hexdigest()}  {p.name}"
        for p in sorted(folder.iterdir())
        if p.name != "SHA256SUMS"
    ]
    (folder / "SHA256SUMS").write_text("\n".join(sums) + "\n")


def _small_scan(tmp: Path, name: str = "s.nii.gz", peak: float | None = None) -> Path:
    """A 48 x 48 x 24 block of the IXI scan (rescaled to reach ``peak``): small enough for the untrained tiny model
    to upscale in seconds."""
    data, affine = _ixi()
    block = data[36:84, 36:84, 33:57].astype(np.float64)
    if peak is not None:
        block *= peak / block.max()
    return _save(tmp, name, block.astype(np.float32), affine)


def _listing(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


DATA = SHARED / "data"


LPIPS = SHARED / "weights" / "lpips"


def tiny(name: str = "tiny_2d", **changes):
    """The tiny config with nested overrides such as training={"autoencoder": {"steps": 8}}."""
    shared_path("data/mri/ixi-t1-2mm")
    raw = yaml.safe_load((REPO / "configs" / f"{name}.yaml").read_text())

    def merge(into, new):
        for k, v in new.items():
            if isinstance(v, dict) and isinstance(into.get(k), dict):
                merge(into[k], v)
            else:
                into[k] = v

    merge(raw, copy.deepcopy(changes))
    config, root = parse_config(raw, data_root=DATA)
    return config, root


TINY_ESTIMATOR = {"channels": [8, 16], "num_res_blocks": 1, "slab": 3}
TINY_STAGE = {"steps": 4, "batch_size": 2, "lr": 1e-3}


def tiny_with_estimator(**training):
    """The tiny config with a tiny estimator stage (``training`` overrides its schedule)."""
    return tiny(estimator=TINY_ESTIMATOR, training={"estimator": {**TINY_STAGE, **training}})


def trainer(config, root, run_dir, **kw) -> Trainer:
    return Trainer(config, root, run_dir, lpips_weights=str(LPIPS), progress=False, **kw)


def rows(path: Path) -> list[dict]:
    with open(path) as fh:
        return list(csv.DictReader(fh))


def _one_batch(monkeypatch):
    """Make every step draw the same batch, for overfitting."""
    original = PairSampler.batch
    monkeypatch.setattr(PairSampler, "batch", lambda self, step, n, size=None, **kw: original(self, 0, n, size))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
