"""Upscale speed and quality against the reference pipeline, same model, same planes, same job.

Reference: what MONAI's 2D super-resolution latent diffusion tutorial does: MONAI's ``DDPMScheduler`` with all
1000 timesteps, one slice per network call, no data consistency (``clip_sample`` off, since the latents are
scaled to unit variance rather than to [-1, 1]). medldm: ``Upscaler`` with its defaults (sampler, steps, slice
batches, data consistency). Both run on the same contiguous block of central planes of a real 1 mm brain with
simulated x4 thick slices along z (the reference is too slow on a CPU for the whole volume), each in a fresh
process so that peak memory is its own. Stated subset: ``--planes`` planes across the shorter in-plane axis.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from benchmarks.common import SHARED, emit, peak_rss_mb, reset_peak_rss, rss_mb, run_worker, save, table

SCAN = "data/mri/colin27-mricron/ch2.nii.gz"  # Colin27 T1, 1 mm, skull on (held in: part of the training data)


def _case(planes: int):
    """LR, truth and head mask of the benchmark subset, and the voxel axes: the upscaled one and the plane axis."""
    import numpy as np
    from medldm.evaluation.metrics import foreground_mask

    from medldm.degrade import degrade_volume, make_operator
    from medldm.volume import crop, load

    lr, truth = degrade_volume(load(SHARED / SCAN), kind="slice-profile", axis="z", scale=4)
    a = lr.meta["degrade"]["axis"]
    op = make_operator("slice-profile", axis=a, scale=4)
    free = sorted((d for d in range(3) if d not in op.axes), key=lambda d: truth.shape[d])
    cut = free[0]  # the Upscaler's plane axis with planes="one"
    mid = truth.shape[cut] // 2
    box = [slice(None)] * 3
    box[cut] = slice(mid - planes // 2, mid - planes // 2 + planes)
    mask = foreground_mask(truth.data)[tuple(box)]  # the head mask of the whole volume, on the subset
    return crop(lr, tuple(box)), crop(truth, tuple(box)), np.ascontiguousarray(mask), a, cut


def _reference(model, lr, a: int, cut: int, device: str, bf16: bool):
    """The tutorial's loop on every plane, one at a time: encode the interpolated LR, 1000 DDPM steps, decode."""
    import numpy as np
    import torch
    import torch.nn.functional as F
    from monai.networks.schedulers import DDPMScheduler

    from medldm.degrade import make_operator
    from medldm.intensity import guess_modality, normaliser
    from medldm.nets import MODALITIES
    from medldm.resample import upsample

    cfg = model.config
    d = cfg.diffusion
    op = make_operator("slice-profile", axis=a, scale=4)
    hr_shape = op.input_shape(lr.shape)
    norm = normaliser(cfg.data.intensity, lr.data)
    cond = upsample(torch.from_numpy(norm.forward(lr.data.astype(np.float32)))[None, None], hr_shape)[0, 0]
    task = next(t for t in cfg.data.tasks if t.kind == "slice-profile" and t.scale == 4)
    modality = MODALITIES.index(guess_modality(lr.data, lr.meta.get("modality")))
    label = model.codec.label(
        torch.tensor([cfg.data.tasks.index(task)]), torch.tensor([modality]), torch.tensor([0])
    ).to(device)
    scale = float(model.info["latent_scale"])
    multiple = cfg.autoencoder.factor * 2 ** (len(d.channels) - 1)
    scheduler = DDPMScheduler(
        num_train_timesteps=d.timesteps,
        schedule=d.schedule,
        beta_start=d.beta_start,
        beta_end=d.beta_end,
        prediction_type=d.prediction,
        clip_sample=False,
    )
    scheduler.set_timesteps(d.timesteps)
    planes = cond.movedim(cut, 0)
    out = torch.empty_like(planes)
    g = torch.Generator().manual_seed(0)
    for i in range(planes.shape[0]):
        image = planes[i][None, None]
        size = image.shape[2:]
        pad = [p for n in reversed(size) for p in (0, (-n) % multiple)]
        image = F.pad(image, pad, mode="replicate").to(device)
        with torch.no_grad(), torch.autocast(torch.device(device).type, dtype=torch.bfloat16, enabled=bf16):
            c = model.autoencoder.encode(image).float() * scale
            z = torch.randn(c.shape, generator=g).to(device)
            for t in scheduler.timesteps:
                v = model.denoiser(z, torch.full((1,), int(t), device=device), c, label).float()
                z, _ = scheduler.step(v, int(t), z)
            x = model.autoencoder.decode(z / scale).float()
        out[i] = x[0, 0, : size[0], : size[1]].cpu()
    return norm.inverse(out.movedim(0, cut).numpy())


def worker(pipeline: str, planes: int, device: str, bf16: bool) -> None:
    import numpy as np
    import torch
    from medldm.evaluation.metrics import lpips, psnr, ssim

    from medldm.model import load_model
    from medldm.pipeline import Upscaler

    lr, truth, mask, a, cut = _case(planes)
    model = load_model("default", device=device)
    base_rss = rss_mb()
    reset_peak_rss()
    tic = time.perf_counter()
    if pipeline == "reference":
        sr = _reference(model, lr, a, cut, device, bf16)
        settings = f"MONAI DDPM, {model.config.diffusion.timesteps} steps, batch 1"
    elif pipeline == "medldm-ddpm":  # the reference's sampler inside medldm: separates the sampler from the loop
        up = Upscaler(
            model,
            device=device,
            planes="one",
            bf16=bf16,
            sampler="ddpm",
            steps=model.config.diffusion.timesteps,
            consistency=0.0,
        )
        sr = up.upscale(lr, axis=a, scale=4, kind="slice-profile").sr.data
        settings = f"medldm ddpm, {up.steps} steps, batch {up.batch_size}, no consistency"
    else:
        up = Upscaler(model, device=device, planes="one", bf16=bf16)
        sr = up.upscale(lr, axis=a, scale=4, kind="slice-profile").sr.data
        settings = f"{up.sampler}, {up.steps} step(s), batch {up.batch_size}, consistency"
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    wall = time.perf_counter() - tic
    rss = peak_rss_mb()
    t = truth.data
    r = float(t.max())
    lp = [
        lpips(np.clip(np.take(sr, k, axis=cut) / r, 0, 1), np.clip(np.take(t, k, axis=cut) / r, 0, 1))
        for k in range(t.shape[cut])
    ]
    emit(
        {
            "pipeline": pipeline,
            "device": device,
            "bf16": bf16,
            "settings": settings,
            "wall_s": wall,
            "peak_rss_mb": rss,
            "rss_before_run_mb": base_rss,
            "planes": planes,
            "plane_shape": [int(n) for n in np.delete(t.shape, cut)],
            "psnr": psnr(sr, t, data_range=r, mask=mask),
            "ssim": ssim(sr, t, data_range=r, axis=cut, mask=mask),
            "lpips": float(np.mean(lp)),
        }
    )


def main(quick: bool, out: Path) -> dict:
    import torch

    from medldm.nets import native_bf16

    planes = 2 if quick else 6
    devices = [("cpu", False)] + ([("cuda", False), ("cuda", True)] if torch.cuda.is_available() else [])
    rows, results = [], []

    def add(r, device, bf16):
        rows.append(
            [
                r["pipeline"],
                f"{device}{' bf16' if bf16 else ''}",
                r["settings"],
                r["wall_s"],
                r["wall_s"] / planes,
                r["peak_rss_mb"],
                r["psnr"],
                r["ssim"],
                r["lpips"],
            ]
        )

    for device, bf16 in devices:
        ref = run_worker("upscale_reference", "reference", planes, device, int(bf16))
        ours = run_worker("upscale_reference", "medldm", planes, device, int(bf16))
        ratio = ref["wall_s"] / ours["wall_s"]
        entry = {"device": device, "bf16": bf16, "reference": ref, "medldm": ours, "speedup": ratio}
        add(ref, device, bf16)
        if device == "cpu" and not quick:  # the same 1000-step DDPM in medldm's batched loop
            entry["medldm_ddpm"] = run_worker("upscale_reference", "medldm-ddpm", planes, device, 0)
            add(entry["medldm_ddpm"], device, False)
        add(ours, device, bf16)
        rows.append(["speed ratio", device, "reference / medldm", ratio, "", "", "", "", ""])
        if device == "cpu" and native_bf16(torch.device("cpu")):  # bf16 autocast where the CPU has it natively
            entry["medldm_bf16"] = run_worker("upscale_reference", "medldm", planes, device, 1)
            add(entry["medldm_bf16"], device, True)
        results.append(entry)
    table(
        f"upscale vs the reference: {SCAN}, x4 thick slices along z, {planes} central planes",
        ["pipeline", "device", "settings", "wall s", "s / plane", "peak RSS MiB", "PSNR", "SSIM", "LPIPS"],
        rows,
    )
    data = {"scan": SCAN, "task": "slice-profile x4 along z", "planes": planes, "results": results}
    save(out, "upscale_reference", data)
    return data


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--worker", nargs=4, metavar=("PIPELINE", "PLANES", "DEVICE", "BF16"))
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--out", type=Path, default=Path("bench_output"))
    args = parser.parse_args()
    if args.worker:
        p, n, dev, bf = args.worker
        worker(p, int(n), dev, bool(int(bf)))
    else:
        main(args.quick, args.out)
