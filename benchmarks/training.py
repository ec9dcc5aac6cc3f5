"""Training throughput of both stages of configs/brain_mri_from_noise.yaml: fp32, bf16 autocast, channels_last and
torch.compile, each in a fresh process on the same batches.

The networks, batch sizes and patch sizes are those of the config; the data are a few real IXI volumes (loading
all of them would time the disk, not the training). Throughput is measured over steps after a warm-up (so
torch.compile's compilation is not counted; its one-off cost is reported apart). The adversarial term of the
autoencoder joins at step 1500 of the config, after the measured steps.
"""

from __future__ import annotations

import argparse
import csv
import tempfile
import time
from pathlib import Path

from benchmarks.common import REPO, SHARED, emit, peak_rss_mb, run_worker, save, table

VARIANTS = {
    "fp32": {"mixed_precision": "no"},
    "bf16": {"mixed_precision": "bf16"},
    "channels_last": {"mixed_precision": "no", "channels_last": True},
    "compile": {"mixed_precision": "no", "compile": True},
}


def worker(variant: str, warmup: int, steps: int) -> None:
    import yaml

    from medldm.config import parse_config
    from medldm.train import Trainer

    raw = yaml.safe_load((REPO / "configs" / "brain_mri_from_noise.yaml").read_text())
    raw["data"]["sources"] = [{"glob": "mri/ixi-t1-2mm/IXI0[0-1]*.nii.gz"}]
    raw["data"]["cache"] = None
    total = warmup + steps
    raw["training"].update(VARIANTS[variant], log_every=1, checkpoint_every=10_000)
    for stage in ("autoencoder", "diffusion"):
        raw["training"][stage]["steps"] = total
        raw["training"][stage].pop("progressive", None)  # measure at the config's final patch size
    config, root = parse_config(raw, source="benchmark", data_root=SHARED / "data")
    result = {"variant": variant, "warmup": warmup, "steps": steps}
    with tempfile.TemporaryDirectory() as tmp:
        trainer = Trainer(config, root, Path(tmp), progress=False)
        for stage in ("autoencoder", "diffusion"):
            tic = time.perf_counter()
            getattr(trainer, f"train_{stage}")()
            with open(Path(tmp) / stage / "metrics.csv") as fh:
                rows = list(csv.DictReader(fh))
            first, last = float(rows[warmup - 1]["elapsed_s"]), float(rows[total - 1]["elapsed_s"])
            batch = getattr(config.training, stage).batch_size
            result[stage] = {
                "samples_per_s": steps * batch / (last - first),
                "steps_per_s": steps / (last - first),
                "first_steps_s": first,
                "stage_wall_s": time.perf_counter() - tic,
                "batch": batch,
                "patch": list(config.data.patch_size),
            }
    result["peak_rss_mb"] = peak_rss_mb()
    emit(result)


def main(quick: bool, out: Path) -> dict:
    import torch

    from medldm.nets import native_bf16

    variants = ["fp32", "bf16"] if quick else list(VARIANTS)
    results = []
    for v in variants:
        # emulated bf16 is far slower on CPUs without native support: fewer steps keep the run short
        slow = v == "bf16" and not native_bf16(torch.device("cpu"))
        warmup, steps = (3, 4) if slow else (3, 10) if quick else (5, 30)
        results.append(run_worker("training", v, warmup, steps))
    base = results[0]
    rows = []
    for r in results:
        for stage in ("autoencoder", "diffusion"):
            s = r[stage]
            s["ratio_vs_fp32"] = s["samples_per_s"] / base[stage]["samples_per_s"]
            rows.append(
                [
                    r["variant"],
                    stage,
                    s["samples_per_s"],
                    s["steps_per_s"],
                    s["ratio_vs_fp32"],
                    s["first_steps_s"],
                    r["peak_rss_mb"],
                ]
            )
    table(
        "training throughput, configs/brain_mri_from_noise.yaml networks (AE 8 x 64^2 with LPIPS; LDM 16 x 64^2)",
        ["variant", "stage", "samples/s", "steps/s", "vs fp32", "warm-up s", "peak RSS MiB"],
        rows,
    )
    data = {"config": "configs/brain_mri_from_noise.yaml", "results": results}
    save(out, "training", data)
    return data


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--worker", nargs=3, metavar=("VARIANT", "WARMUP", "STEPS"))
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--out", type=Path, default=Path("bench_output"))
    args = parser.parse_args()
    if args.worker:
        worker(args.worker[0], int(args.worker[1]), int(args.worker[2]))
    else:
        main(args.quick, args.out)
