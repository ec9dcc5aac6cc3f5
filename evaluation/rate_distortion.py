"""Rate-distortion views of the two stages of a latent diffusion model.

Two kinds of compression happen in an LDM (Rombach et al. 2022, Fig. 2): the autoencoder does *perceptual*
compression (it throws away imperceptible detail, most of the bits), the diffusion model *semantic*
compression (the few bits that say what the image is). This module measures both as rate-distortion curves.

**Autoencoder** (:func:`autoencoder_rd`). The deterministic latent ``z = encode(x)`` (the KL posterior mean),
multiplied by ``latent_scale`` (so quantisation steps are in the unit-variance latent the diffusion model sees),
is uniformly quantised ``z_q = q round(z / q)`` and decoded from ``z_q / latent_scale``. The rate is the
*empirical* entropy of the integer symbols ``round(z / q)``: one histogram per latent channel over every
position of every image, the per-channel entropies averaged (``bits_per_latent``; what an ideal entropy coder
with a per-channel, position-independent static model would spend, ignoring the cost of sending the model). The
unquantised point (``step = None``) is charged 32 bits per latent value (float32 storage). For a VQ autoencoder
one point is reported: one code index per latent position, rate ``log2(codebook size)`` per code (fixed-length
coding, ``log2_codebook_bits_per_voxel``) and the empirical entropy of the code indices (the basis of
``bits_per_voxel``).

**Diffusion** (:func:`diffusion_rd`). Progressive lossy coding of Ho et al. (2020), Sec. 4.3 and Alg. 3/4: the
sender transmits ``x_{T-1} ~ q(x_{T-1} | x0)`` at a cost of ``KL(q(x_{T-1} | x0) || N(0, I))`` (the prior term),
then every ``x_{s-1} ~ q(x_{s-1} | x_s, x0)`` at a cost of ``KL(q(x_{s-1} | x_s, x0) || p(x_{s-1} | x_s))``, where
the receiver's ``p`` has the mean of the true posterior with ``x0`` replaced by the denoiser's ``x0_hat(x_s)`` and
the same variance ``beta_tilde``. With ``x_t`` in hand the receiver's best guess is ``x0_hat(x_t)``, so

    rate(t) = KL(q(x_{T-1} | x0) || N(0, I)) + sum_{s = t+1}^{T-1} KL(q(x_{s-1} | x_s, x0) || p(x_{s-1} | x_s))
    distortion(t) = RMSE(x0, x0_hat(x_t))

Timesteps are the schedule's ``t = 0 .. T-1`` (``t = 0`` least noisy, see :mod:`medldm.diffusion`); the paper's
``x_T`` is our ``x_{T-1}``. The rate at ``t = 0`` excludes the discrete decoder term ``L_0`` (sending ``x0``
given ``x_0``), as in the paper's progressive-coding table. Rates are ideal (relative-entropy coding) costs of
*one* random trajectory; they are reported in bits per latent value and converted to bits per image voxel.

Everything runs under ``torch.no_grad()``; randomness comes from an explicit ``seed``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import torch
from medldm.evaluation.metrics import psnr_from_mse
from torch import Tensor

from medldm.diffusion import (
    DenoiseFn,
    NoiseSchedule,
    gaussian_kl,
    make_denoiser,
    posterior_mean_var,
    prior_kl,
    randn,
    timesteps_for,
)
from medldm.errors import MedldmError

if TYPE_CHECKING:
    from medldm.nets import Autoencoder

__all__ = ["FLOAT_BITS", "empirical_entropy", "autoencoder_rd", "diffusion_rd", "model_rd"]

FLOAT_BITS = 32.0  # rate charged per latent value for the unquantised (float32) latent
_LN2 = math.log(2.0)


# ---------------------------------------------------------------------------------------------- helpers
def empirical_entropy(symbols: Tensor) -> float:
    """Entropy in bits of the empirical distribution of the values in ``symbols`` (all elements pooled).

    Args:
        symbols: a tensor of discrete symbols (integers, or floats compared exactly), at least one element.

    Returns:
        ``-sum_k p_k log2 p_k`` with ``p_k`` the relative frequency of each distinct value; 0 for a constant.
    """
    symbols = torch.as_tensor(symbols)
    if symbols.numel() == 0:
        raise MedldmError("cannot take the entropy of an empty set of symbols")
    _, counts = torch.unique(symbols.detach().flatten().cpu(), return_counts=True)
    p = counts.to(torch.float64) / symbols.numel()
    return max(0.0, float(-(p * torch.log2(p)).sum()))


def _check_images(images: Tensor) -> Tensor:
    images = torch.as_tensor(images)
    if images.ndim not in (4, 5) or images.shape[1] != 1 or images.numel() == 0:
        raise MedldmError(
            f"images must be a non-empty (N, 1, *spatial) tensor with 2 or 3 spatial dims, "
            f"got shape {tuple(images.shape)}"
        )
    if not images.dtype.is_floating_point:
        raise MedldmError(f"images must be floating point, got {images.dtype}")
    return images


def _module_device(module: torch.nn.Module) -> torch.device:
    param = next(module.parameters(), None)
    return param.device if param is not None else torch.device("cpu")


class _EvalMode:
    """Put a module in eval mode for the duration of a block (a VQ quantiser updates its codebook in train mode)."""

    def __init__(self, module: torch.nn.Module):
        self.module, self.was_training = module, module.training

    def __enter__(self):
        self.module.eval()

    def __exit__(self, *exc):
        self.module.train(self.was_training)


# ------------------------------------------------------------------------------------------ autoencoder
@torch.no_grad()
def _check_autoencoder_arguments(autoencoder, latent_scale: float, data_range: float, batch_size: int) -> str:
    """The autoencoder's kind, once the arguments are known to make sense."""
    kind = getattr(autoencoder, "kind", None)
    if kind not in ("kl", "vq"):
        raise MedldmError(f"autoencoder kind must be 'kl' or 'vq', got {kind!r}")
    if not latent_scale > 0 or not data_range > 0:
        raise MedldmError(f"latent_scale and data_range must be positive, got {latent_scale} and {data_range}")
    if isinstance(batch_size, bool) or int(batch_size) != batch_size or batch_size < 1:
        raise MedldmError(f"batch_size must be a positive integer, got {batch_size}")
    return kind


def autoencoder_rd(
    autoencoder: Autoencoder,
    images: Tensor,
    *,
    steps: Sequence[float | None] = (None, 0.5, 0.25, 0.1),
    label: str = "",
    latent_scale: float = 1.0,
    data_range: float = 1.0,
    batch_size: int = 16,
) -> list[dict]:
    """Rate-distortion points of an autoencoder's latent, uniformly quantised (KL) or code indices (VQ).

    Distortion is measured on all voxels of all images pooled: ``rmse`` and ``psnr = 10 log10(data_range^2 /
    MSE)`` (``data_range`` 1.0: the model's normalised intensity scale). ``compression_factor`` is voxels per
    symbol (a latent value for KL, a code index for VQ) and ``bits_per_voxel = bits_per_latent * symbols /
    voxels``.

    Args:
        autoencoder: a :class:`medldm.nets.Autoencoder` (``kind`` "kl" or "vq", ``encode``/``decode``); evaluated
            in eval mode (its mode is restored afterwards).
        images: ``(N, 1, *spatial)`` float images in the model's normalised intensity, spatial sizes divisible by
            the autoencoder's downsampling factor.
        steps: quantisation steps ``q > 0`` of the scaled latent for a KL autoencoder; ``None`` is the
            unquantised latent (32 bits per value). Ignored for a VQ autoencoder (one point).
        label: a free tag copied into every record (e.g. the model name).
        latent_scale: the model's latent scale factor; the latent is quantised after multiplying by it.
        data_range: intensity range for PSNR.
        batch_size: images per network call.

    Returns:
        One dict per point with ``label``, ``kind``, ``step``, ``bits_per_latent``, ``bits_per_voxel``,
        ``compression_factor``, ``rmse``, ``psnr``, ``symbols``, ``voxels``; VQ adds ``codebook_size``,
        ``bits_per_code`` (``log2`` of the codebook size), ``entropy_bits_per_code`` and
        ``log2_codebook_bits_per_voxel``.
    """
    images = _check_images(images)
    kind = _check_autoencoder_arguments(autoencoder, latent_scale, data_range, batch_size)
    device = _module_device(autoencoder)
    batches = [images[i : i + batch_size] for i in range(0, images.shape[0], batch_size)]
    voxels = images.numel()

    def distortion(decode_batch: Callable[[int], Tensor]) -> tuple[float, float]:
        sse = 0.0
        for i, x in enumerate(batches):
            recon = decode_batch(i).float().cpu()
            if recon.shape != x.shape:
                raise MedldmError(
                    f"the autoencoder gives back shape {tuple(recon.shape)} for images of shape "
                    f"{tuple(x.shape)}; spatial sizes must be divisible by its downsampling factor"
                )
            sse += float((recon.double() - x.double()).pow(2).sum())
        mse = sse / voxels
        return math.sqrt(mse), psnr_from_mse(mse, data_range)

    with _EvalMode(autoencoder), torch.no_grad():  # scoring only: no graph kept
        if kind == "vq":
            return [_vq_point(autoencoder, batches, device, voxels, label, distortion)]
        latents = [autoencoder.encode(x.to(device)).float().cpu() * latent_scale for x in batches]
        channels = latents[0].shape[1]
        symbols = sum(z.numel() for z in latents)
        records = []
        for q in steps:
            if q is None:
                bits = FLOAT_BITS
                rmse, psnr = distortion(lambda i: autoencoder.decode(latents[i].to(device) / latent_scale))
            else:
                if isinstance(q, bool) or not q > 0:
                    raise MedldmError(f"quantisation steps must be positive (or None), got {q!r}")
                q = float(q)
                codes = [torch.round(z.double() / q).long() for z in latents]
                bits = sum(empirical_entropy(torch.cat([c[:, k] for c in codes])) for k in range(channels)) / channels

                def decode_codes(i: int, codes: list[Tensor] = codes, q: float = q) -> Tensor:
                    return autoencoder.decode((codes[i].double() * q / latent_scale).float().to(device))

                rmse, psnr = distortion(decode_codes)
            records.append(
                {
                    "label": label,
                    "kind": kind,
                    "step": q,
                    "bits_per_latent": bits,
                    "bits_per_voxel": bits * symbols / voxels,
                    "compression_factor": voxels / symbols,
                    "rmse": rmse,
                    "psnr": psnr,
                    "symbols": symbols,
                    "voxels": voxels,
                }
            )
        return records


def _vq_point(autoencoder, batches, device, voxels, label, distortion) -> dict:
    net = autoencoder.net
    indices = [net.index_quantize(x.to(device)).cpu() for x in batches]  # (B, *latent spatial)
    rmse, psnr = distortion(lambda i: net.decode_samples(indices[i].to(device)))
    size = int(net.num_embeddings)
    codes = sum(c.numel() for c in indices)
    entropy = empirical_entropy(torch.cat([c.flatten() for c in indices]))
    fixed = math.log2(size)
    return {
        "label": label,
        "kind": "vq",
        "step": None,
        "bits_per_latent": entropy,
        "bits_per_voxel": entropy * codes / voxels,
        "compression_factor": voxels / codes,
        "rmse": rmse,
        "psnr": psnr,
        "symbols": codes,
        "voxels": voxels,
        "codebook_size": size,
        "bits_per_code": fixed,
        "entropy_bits_per_code": entropy,
        "log2_codebook_bits_per_voxel": fixed * codes / voxels,
    }


# -------------------------------------------------------------------------------------------- diffusion
def _report_timesteps(schedule: NoiseSchedule, timesteps) -> list[int]:
    T = schedule.num_train_timesteps
    ts = timesteps_for(schedule, 11).tolist() if timesteps is None else list(timesteps)
    if not ts:
        raise MedldmError("timesteps must name at least one timestep")
    out = []
    for t in ts:
        t = t.item() if isinstance(t, Tensor) else t
        if isinstance(t, bool) or int(t) != t or not 0 <= t < T:
            raise MedldmError(f"report timesteps must be integers in 0 .. {T - 1}, got {t!r}")
        out.append(int(t))
    return sorted(set(out), reverse=True)


@torch.no_grad()
def diffusion_rd(
    denoise: DenoiseFn,
    x0: Tensor,
    schedule: NoiseSchedule,
    *,
    timesteps: Sequence[int] | None = None,
    voxels_per_dim: float = 1.0,
    data_range: float = 1.0,
    seed: int = 0,
    decode: Callable[[Tensor], Tensor] | None = None,
    reference: Tensor | None = None,
    image_data_range: float = 1.0,
) -> list[dict]:
    """Progressive lossy coding rate and distortion of a diffusion model along one trajectory (Ho et al. 2020).

    See the module docstring for the definitions. The denoiser is called once per timestep from ``T - 1`` down
    to the smallest reported timestep, on the whole batch at a time; the KL sum includes every step.

    Args:
        denoise: ``denoise(x_t, t) -> (x0_hat, eps_hat)``, ``t`` a LongTensor ``(B,)`` (see
            :func:`medldm.diffusion.make_denoiser`).
        x0: the clean latents ``(B, C, *spatial)`` to code (in the scaled latent space the denoiser works in).
        schedule: the noise schedule the denoiser was trained with.
        timesteps: the timesteps to report, in ``0 .. T-1`` (default: 11 evenly spaced from ``T - 1`` to 0).
        voxels_per_dim: image voxels per latent value, ``f^d / C`` for an autoencoder with downsampling factor
            ``f`` per axis in ``d`` spatial dims and ``C`` latent channels; ``bits_per_voxel = bits_per_dim /
            voxels_per_dim``.
        data_range: range for the latent-space PSNR, ``10 log10(data_range^2 / MSE)``.
        seed: seed of the trajectory's noise (drawn on the CPU, so the same on every device).
        decode: optional map from a latent ``x0_hat`` to image space (e.g. ``lambda z: ae.decode(z / scale)``);
            with ``reference`` it adds the image-space distortion.
        reference: the images ``x0`` came from, shaped like ``decode``'s output.
        image_data_range: range for the image-space PSNR (1.0: the model's normalised intensity).

    Returns:
        One dict per reported timestep, in decreasing ``t`` (the order of transmission): ``t``, ``alpha_bar``,
        ``bits_per_dim`` (rate per latent value, averaged over the batch), ``bits_per_voxel``,
        ``prior_bits_per_dim``, ``rmse``, ``psnr`` (latent ``x0`` vs ``x0_hat(x_t)``, all elements pooled), and
        ``image_rmse``, ``image_psnr`` when ``decode`` and ``reference`` are given.
    """
    x0 = torch.as_tensor(x0)
    if x0.ndim < 2 or x0.numel() == 0 or not x0.dtype.is_floating_point:
        raise MedldmError(f"x0 must be a non-empty floating-point (B, C, *spatial) tensor, got {tuple(x0.shape)}")
    if not voxels_per_dim > 0 or not data_range > 0 or not image_data_range > 0:
        raise MedldmError("voxels_per_dim, data_range and image_data_range must be positive")
    if (decode is None) != (reference is None):
        raise MedldmError("decode and reference go together: give both or neither")
    report = _report_timesteps(schedule, timesteps)
    wanted, last = set(report), report[-1]
    T, batch = schedule.num_train_timesteps, x0.shape[0]
    dims = x0.numel()  # rates are averaged over every latent value of the batch
    g = torch.Generator().manual_seed(int(seed))

    prior = float(prior_kl(schedule, x0).double().sum()) / dims / _LN2
    rate = prior  # bits per latent value sent so far
    x = schedule.add_noise(x0, randn(x0.shape, g, device=x0.device, dtype=x0.dtype), T - 1)
    records = []
    for s in range(T - 1, last - 1, -1):
        t = torch.full((batch,), s, dtype=torch.long, device=x0.device)
        x0_hat = denoise(x, t)[0].to(x0.dtype)
        if s in wanted:
            mse = float((x0_hat.double() - x0.double()).pow(2).mean())
            rec = {
                "t": s,
                "alpha_bar": float(schedule.alphas_cumprod[s]),
                "bits_per_dim": rate,
                "bits_per_voxel": rate / voxels_per_dim,
                "prior_bits_per_dim": prior,
                "rmse": math.sqrt(mse),
                "psnr": psnr_from_mse(mse, data_range),
            }
            if decode is not None:
                image = decode(x0_hat).double().cpu()
                ref = torch.as_tensor(reference).double().cpu()
                if image.shape != ref.shape:
                    raise MedldmError(f"decode gives shape {tuple(image.shape)} but reference has {tuple(ref.shape)}")
                image_mse = float((image - ref).pow(2).mean())
                rec.update(image_rmse=math.sqrt(image_mse), image_psnr=psnr_from_mse(image_mse, image_data_range))
            records.append(rec)
        if s > last:  # send x_{s-1}: pay KL(q(x_{s-1} | x_s, x0) || p(x_{s-1} | x_s)), then step the trajectory
            mean_q, var = posterior_mean_var(schedule, x0, x, s, s - 1)
            mean_p, _ = posterior_mean_var(schedule, x0_hat, x, s, s - 1)
            rate += float(gaussian_kl(mean_q, var, mean_p, var).double().sum()) / dims / _LN2
            x = mean_q + var.sqrt() * randn(x0.shape, g, device=x0.device, dtype=x0.dtype)
    return records


# ---------------------------------------------------------------------------------------- a whole model
@torch.no_grad()
def model_rd(
    model,
    hr_images: Tensor,
    *,
    cond_images: Tensor,
    label: int | Sequence[int] | Tensor,
    timesteps: Sequence[int] | None = None,
    qsteps: Sequence[float | None] = (None, 0.5, 0.25, 0.1),
    seed: int = 0,
    data_range: float = 1.0,
) -> dict:
    """Both rate-distortion views of a loaded model, ready for a report.

    The diffusion part is conditioned as the model samples: the clean condition latent
    ``encode(cond_images) * latent_scale`` (pass class labels with condition level 0, as the Upscaler does) and
    the class ``label``; it codes ``encode(hr_images) * latent_scale`` and also reports the distortion of the
    decoded ``x0_hat`` against ``hr_images``.

    Args:
        model: a :class:`medldm.model.LoadedModel`.
        hr_images: ``(N, 1, *spatial)`` HR images in the model's normalised intensity, sizes divisible by the
            autoencoder's and the denoiser's downsampling.
        cond_images: the interpolated LR images on the HR grid, same shape.
        label: the class label(s) (one int, or one per image) from ``model.codec.label``.
        timesteps: diffusion timesteps to report (see :func:`diffusion_rd`).
        qsteps: quantisation steps of the autoencoder latent (see :func:`autoencoder_rd`).
        seed: seed of the diffusion trajectory.
        data_range: intensity range for image-space PSNR (and the latent PSNR of the diffusion part).

    Returns:
        ``{"autoencoder": [...], "diffusion": [...]}``, lists of records as the two functions return.
    """
    hr_images, cond_images = _check_images(hr_images), _check_images(cond_images)
    if hr_images.shape != cond_images.shape:
        raise MedldmError(f"hr_images {tuple(hr_images.shape)} and cond_images {tuple(cond_images.shape)} differ")
    ae, scale = model.autoencoder, float(model.info["latent_scale"])
    device = _module_device(model.denoiser)
    labels = torch.as_tensor(label, dtype=torch.long).flatten()
    if labels.numel() == 1:
        labels = labels.expand(hr_images.shape[0])
    if labels.numel() != hr_images.shape[0]:
        raise MedldmError(f"need one label or one per image ({hr_images.shape[0]}), got {labels.numel()}")
    labels = labels.to(device)
    name = getattr(model.config, "name", "") or ""
    ae_points = autoencoder_rd(ae, hr_images, steps=qsteps, label=name, latent_scale=scale, data_range=data_range)
    with _EvalMode(ae), _EvalMode(model.denoiser):
        z0 = ae.encode(hr_images.to(device)).float() * scale
        cond = ae.encode(cond_images.to(device)).float() * scale

        def model_fn(x_t: Tensor, t: Tensor) -> Tensor:
            return model.denoiser(x_t, t, cond, labels).float()

        denoise = make_denoiser(model_fn, model.schedule, model.config.diffusion.prediction)
        voxels_per_dim = hr_images[0].numel() / z0[0].numel()
        diffusion_points = diffusion_rd(
            denoise,
            z0,
            model.schedule,
            timesteps=timesteps,
            voxels_per_dim=voxels_per_dim,
            data_range=data_range,
            seed=seed,
            decode=lambda z: ae.decode(z / scale).float(),
            reference=hr_images,
            image_data_range=data_range,
        )
    for rec in diffusion_points:
        rec["label"] = name
    return {"autoencoder": ae_points, "diffusion": diffusion_points}
