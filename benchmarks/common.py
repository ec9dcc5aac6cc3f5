"""Shared pieces of the benchmarks: peak memory, fresh worker processes, the machine, tables and JSON."""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("MEDLDM_SHARED", REPO.parent / "shared"))


def _status_mb(field: str) -> float | None:
    """A memory field of /proc/self/status (reported in KiB) in MiB, or None where there is no such file."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(f"{field}:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def peak_rss_mb() -> float:
    """Peak resident memory of this process (since :func:`reset_peak_rss`, where Linux allows it), in MiB."""
    peak = _status_mb("VmHWM")
    return peak if peak is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def rss_mb() -> float:
    """Resident memory of this process now, in MiB."""
    now = _status_mb("VmRSS")
    return now if now is not None else float("nan")


def reset_peak_rss() -> None:
    """Restart the peak-memory count from the current resident size (Linux: ``/proc/self/clear_refs``), so a
    measurement excludes the set-up before it (loading the scan and the model)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def machine() -> dict:
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info = {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
    }
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def run_worker(module: str, *args, timeout: float = 3600) -> dict:
    """Run ``python -m benchmarks.<module> --worker ARGS`` in a fresh process (so its peak memory is its own)
    and return the JSON object it prints on its last line of stdout."""
    cmd = [sys.executable, "-m", f"benchmarks.{module}", "--worker", *map(str, args)]
    tic = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=REPO)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stderr[-3000:]}")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    result["process_s"] = time.perf_counter() - tic
    return result


def emit(result: dict) -> None:
    """A worker's result: one JSON line on stdout."""
    print(json.dumps(result), flush=True)


def table(title: str, columns: list[str], rows: list[list]) -> None:
    from rich.console import Console
    from rich.table import Table

    t = Table(title=title)
    for c in columns:
        t.add_column(c)
    for r in rows:
        t.add_row(*[f"{v:.4g}" if isinstance(v, float) else str(v) for v in r])
    Console(width=200).print(t)


def save(out: Path, name: str, data: dict) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{name}.json"
    path.write_text(
        json.dumps(
            {
                "benchmark": name,
                "machine": machine(),
                "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                **data,
            },
            indent=1,
        )
    )
    return path


def variant_cli(variants, worker, main) -> None:
    """The command line of a benchmark whose workers take (variant, quick): ``--worker VARIANT [--quick]`` runs one
    variant in this process, otherwise ``main(quick, out)`` runs them all."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--worker", choices=list(variants))
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--out", type=Path, default=Path("bench_output"))
    args = parser.parse_args()
    if args.worker:
        worker(args.worker, args.quick)
    else:
        main(args.quick, args.out)
