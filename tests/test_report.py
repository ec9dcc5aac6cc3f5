"""The self-contained HTML report of per-volume metrics (opened in headless Chromium)."""

from __future__ import annotations

import base64
import csv
import html
import io
import json
import os
import re
import subprocess
from pathlib import Path

import numpy as np
import pytest
from matplotlib import image as mpimg
from medldm.evaluation.report import write_report

from medldm import MedldmError

CHROMIUM = Path("/usr/bin/chromium")
# Flags that work with Debian's chromium (156) as root in a container without a display or D-Bus.
CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--enable-logging=stderr",
    "--v=0",
]
METHODS = ("nearest", "trilinear", "model")
DIRECTIONS = {"psnr": True, "ssim": True, "lpips": False, "nrmse": False}
PROTOCOL = {
    "degradation": "slice-profile x4 along z (gaussian profile)",
    "scales": [2, 4],
    "data range": "per-volume maximum of the truth",
    "mask": "Otsu <foreground> & holes filled",
    "seeds": {"bootstrap": 0, "sampling": 1234},
    "software": {"medldm": "0.1.0", "numpy": np.__version__},
    "config hash": "deadbeefcafe0042",
}


def _rows(n_volumes: int = 8, seed: int = 0) -> list[dict]:
    """Nearest < trilinear < model on every metric, per volume, with noise."""
    rng = np.random.default_rng(seed)
    rows = []
    for v in range(n_volumes):
        psnr0, ssim0 = rng.normal(28, 1.5), rng.normal(0.82, 0.02)
        for j, method in enumerate(METHODS):
            rows.append(
                {
                    "volume": f"sub-{v:02d}.nii.gz",
                    "method": method,
                    "psnr": psnr0 + 1.5 * j + rng.normal(0, 0.2),
                    "ssim": ssim0 + 0.03 * j + rng.normal(0, 0.004),
                    "lpips": 0.30 - 0.05 * j + rng.normal(0, 0.01),
                    "nrmse": 0.20 - 0.03 * j + rng.normal(0, 0.005),
                    "seconds": 0.01 if method != "model" else 12.5,
                    **{f"dice_{c}": 0.7 + 0.05 * j + rng.normal(0, 0.01) for c in (1, 2, 3)},
                    **{f"volume_error_{c}": 12 - 3 * j + rng.normal(0, 0.5) for c in (1, 2, 3)},
                }
            )
    return rows


# ------------------------------------------------------------------------------------------ the report


@pytest.fixture(scope="module")
def report(tmp_path_factory) -> Path:
    rng = np.random.default_rng(2)
    truth = rng.random((24, 32))
    model = truth + rng.normal(0, 0.05, truth.shape)
    example = {
        "title": "sub-00 <axial> slice 12",
        "images": {
            "LR (nearest)": np.repeat(truth[::4], 4, axis=0),
            "trilinear": truth * 0.9,
            "model": model,
            "truth": truth,
            "error model": np.abs(model - truth),
            "uncertainty (std)": rng.random((24, 32)) * 0.05,
        },
        "cmap": {"error model": "inferno"},
    }
    rd = {
        "autoencoder": [
            {"label": f"q={q}", "bits_per_voxel": b, "psnr": p, "rmse": r}
            for q, b, p, r in ((0.1, 0.9, 36.0, 0.016), (0.5, 0.4, 33.0, 0.022), (1.0, 0.2, 30.0, 0.03))
        ],
        "diffusion": [
            {"t": t, "bits_per_dim": b * 4, "bits_per_voxel": b, "psnr": p, "rmse": r}
            for t, b, p, r in ((999, 0.001, 12.0, 0.25), (500, 0.05, 22.0, 0.08), (0, 0.6, 35.0, 0.018))
        ],
    }
    out = tmp_path_factory.mktemp("report") / "out"
    path = write_report(
        out,
        rows=_rows(),
        protocol=PROTOCOL,
        examples=[example],
        rd=rd,
        timings={"nearest": 0.01, "trilinear": 0.05, "model": 12.5},
        higher_is_better=DIRECTIONS,
        rd_sample="4 central slices of <one> volume",
    )
    assert path == out / "report.html"
    return path


def test_report_files(report):
    out = report.parent
    assert sorted(p.name for p in out.iterdir()) == ["figures", "metrics.csv", "report.html", "summary.json"]
    figures = sorted(p.name for p in (out / "figures").iterdir())  # every figure of the page, as PNG and SVG
    assert len(figures) == 2 * (4 + 1 + 1) and not [f for f in figures if f.startswith(".")]
    for name in (f for f in figures if f.endswith(".png")):
        assert name[:-4] + ".svg" in figures
        assert mpimg.imread(out / "figures" / name).shape[1] > 200
        assert (out / "figures" / (name[:-4] + ".svg")).read_text().lstrip().startswith("<?xml")
    with open(out / "metrics.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == 24
    assert list(rows[0])[:7] == ["volume", "method", "psnr", "ssim", "lpips", "nrmse", "seconds"]
    assert {f"dice_{c}" for c in (1, 2, 3)} | {f"volume_error_{c}" for c in (1, 2, 3)} <= set(rows[0])
    assert float(rows[0]["psnr"]) == _rows()[0]["psnr"]  # full precision
    summary = json.loads((out / "summary.json").read_text())
    assert summary["protocol"] == PROTOCOL
    assert len(summary["summary"]) == 3 * 4
    assert summary["timings"]["model"] == 12.5
    assert summary["rate_distortion"]["diffusion"][0]["t"] == 999
    assert summary["statistics"]["bootstrap_resamples"] == 10000
    assert {r["best_baseline"] for r in summary["summary"]} == {"trilinear"}
    assert all(r["p_value"] < 0.01 for r in summary["summary"] if r["method"] == "model")


def test_report_html_is_self_contained_and_complete(report):
    text = report.read_text()
    for key, value in PROTOCOL.items():
        assert html.escape(key) in text
        for leaf in value.values() if isinstance(value, dict) else [value]:
            shown = ", ".join(map(str, leaf)) if isinstance(leaf, list) else str(leaf)
            assert html.escape(shown) in text, shown
    assert "Otsu &lt;foreground&gt; &amp; holes filled" in text and "<foreground>" not in text
    for method in METHODS:
        assert f"<td>{method}" in text
    assert "Higher is better for PSNR (dB), SSIM." in text and "Lower is better for LPIPS, NRMSE." in text
    assert text.count("<strong>") >= 4  # the best mean of each metric
    assert re.search(r"p (=|&lt;) 0\.\d{3}", text)
    assert "<script" not in text.lower() and "url(" not in text and "@import" not in text
    links = re.findall(r"""\b(?:src|href)\s*=\s*["']([^"']*)["']""", text)
    assert not [u for u in links if "http" in u.lower()]
    sources = re.findall(r"""<img\b[^>]*\bsrc\s*=\s*["']([^"']*)["']""", text)
    assert len(sources) == 4 + 1 + 1  # per-metric plots, one example, rate-distortion
    for src in sources:
        assert src.startswith("data:image/png;base64,")
        pixels = mpimg.imread(io.BytesIO(base64.b64decode(src.split(",", 1)[1])), format="png")
        assert pixels.shape[0] > 100 and pixels.shape[1] > 200 and pixels[..., :3].std() > 0.05
    assert all(h.startswith("#") for h in re.findall(r'href="([^"]*)"', text))
    assert "4 central slices of &lt;one&gt; volume" in text  # what the rate-distortion curves were measured on
    assert 'id="volumetry-table"' in text and "A proxy, not a clinical segmentation" in text
    assert 'id="small-sample"' not in text  # 8 volumes: no caveat


def test_a_report_on_few_volumes_says_its_statistics_are_rough(tmp_path):
    rows = _rows(n_volumes=2)
    text = write_report(tmp_path / "out", rows=rows, protocol=PROTOCOL, higher_is_better=DIRECTIONS).read_text()
    caveat = re.search(r'<p class="warn" id="small-sample">(.*?)</p>', text, re.S)
    assert caveat and "Small sample: 2 volume(s)" in caveat.group(1) and "0.5" in caveat.group(1)
    assert text.count('id="small-sample"') == 1 and 'id="volumetry-table"' in text  # once, not per table


def test_report_rejects_bad_input(tmp_path):
    with pytest.raises(MedldmError, match="no metrics rows"):
        write_report(tmp_path / "a", rows=[], protocol=PROTOCOL)
    with pytest.raises(MedldmError, match="2D array"):
        write_report(
            tmp_path / "b",
            rows=_rows(2),
            protocol=PROTOCOL,
            examples=[{"title": "x", "images": {"truth": np.zeros((2, 3, 4))}}],
        )
    assert not (tmp_path / "b").exists()  # nothing written when rendering fails


# ------------------------------------------------------------------------------------------ in a browser


def _chromium(page: Path, profile: Path, *extra: str) -> subprocess.CompletedProcess:
    """Run headless Chromium on ``page`` with a fresh profile folder; fail in CI (skip elsewhere) without it."""
    if not CHROMIUM.exists():
        message = f"{CHROMIUM} is missing; run `make test` (it installs chromium) or apt-get install chromium"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(message)
        pytest.skip(message)
    cmd = [str(CHROMIUM), *CHROMIUM_FLAGS, f"--user-data-dir={profile}", *extra, page.resolve().as_uri()]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=90, check=False)


def _console_errors(stderr: str) -> list[str]:
    # Chromium logs page console messages as "...:CONSOLE(line)]" (INFO or ERROR level by version). The report
    # has no scripts, so any console message is a fault.
    return [line for line in stderr.splitlines() if ":CONSOLE" in line or "Uncaught" in line]


def test_console_check_catches_a_broken_page(tmp_path):
    page = tmp_path / "broken.html"
    page.write_text("<!DOCTYPE html><html><body><p>x</p><script>undefinedFunction();</script></body></html>")
    run = _chromium(page, tmp_path / "profile", "--dump-dom")
    assert any("Uncaught" in line for line in _console_errors(run.stderr)), run.stderr[-2000:]


def test_report_opens_in_headless_chromium(report, tmp_path):
    shot = tmp_path / "shot.png"
    run = _chromium(report, tmp_path / "profile-shot", f"--screenshot={shot}", "--window-size=1200,2000")
    assert run.returncode == 0, run.stderr[-2000:]
    assert not _console_errors(run.stderr)
    pixels = mpimg.imread(shot)[..., :3]
    assert pixels.shape[:2] == (2000, 1200)
    assert pixels.std() > 0.05 and pixels.mean() < 0.98  # not blank, not all white
    dom = _chromium(report, tmp_path / "profile-dom", "--dump-dom")
    assert dom.returncode == 0 and not _console_errors(dom.stderr)
    assert 'id="results-table"' in dom.stdout and all(f"<td>{m}" in dom.stdout for m in METHODS)
    assert 'id="volumetry-table"' in dom.stdout and "Dice class 2 (T1: GM)" in dom.stdout
    if os.environ.get("MEDLDM_KEEP_SCREENSHOT"):  # a path to copy the screenshot to, for a person to look at
        Path(os.environ["MEDLDM_KEEP_SCREENSHOT"]).write_bytes(shot.read_bytes())
