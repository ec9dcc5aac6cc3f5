"""Networks from config: MONAI autoencoders (KL or VQ) and denoisers (MONAI DiffusionModelUNet, or a small
DiT-style transformer), for any ``spatial_dims``.

The denoiser sees the noisy HR latent concatenated with the (noise-augmented) latent of the interpolated LR scan
(for 2D slabs, ``data.slab``: the latents of the slab's LR planes, one after another), and one class label that
encodes the task (degradation kind and scale), the modality and the noise level actually added to the condition,
so the network knows how much to trust it.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import cast

import torch
import torch.nn.functional as F
from monai.networks.nets import VQVAE, AutoencoderKL, DiffusionModelUNet, PatchDiscriminator
from monai.networks.nets.diffusion_model_unet import get_timestep_embedding
from torch import nn

from medldm.diffusion import NoiseSchedule
from medldm.errors import MedldmError
from medldm.spec import ModelSpec

__all__ = [
    "Autoencoder",
    "Denoiser",
    "DiT",
    "Estimator",
    "ErrorModel",
    "ConditionCodec",
    "build_autoencoder",
    "build_denoiser",
    "build_estimator",
    "build_discriminator",
    "build_error_model",
    "build_schedule",
    "channels_last_format",
    "geometry_features",
    "MODALITIES",
]

MODALITIES = ("MR", "CT")


def native_bf16(device: torch.device) -> bool:
    """Whether ``device`` runs bfloat16 natively (CUDA; a CPU with AVX512-BF16 or AMX), where bf16 autocast is
    faster; emulated on other CPUs it was measured 30x slower (docs/performance.md)."""
    if device.type == "cuda":
        return True
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


class Autoencoder(nn.Module):
    """Perceptual compression: ``encode`` gives a deterministic latent (the KL posterior mean, or the VQ
    quantised code), ``decode`` maps back; ``forward`` returns (reconstruction, regularisation loss)."""

    def __init__(self, cfg, spatial_dims: int):
        super().__init__()
        self.kind = cfg.kind
        levels = len(cfg.channels)
        self.net: AutoencoderKL | VQVAE
        if cfg.kind == "kl":
            self.net = AutoencoderKL(
                spatial_dims=spatial_dims,
                in_channels=1,
                out_channels=1,
                channels=tuple(cfg.channels),
                latent_channels=cfg.latent_channels,
                num_res_blocks=cfg.num_res_blocks,
                norm_num_groups=cfg.norm_num_groups,
                attention_levels=(False,) * levels,
                with_encoder_nonlocal_attn=cfg.attention,
                with_decoder_nonlocal_attn=cfg.attention,
            )
        else:
            down = levels - 1
            self.net = VQVAE(
                spatial_dims=spatial_dims,
                in_channels=1,
                out_channels=1,
                channels=tuple(cfg.channels[1:]),
                num_res_layers=cfg.num_res_blocks,
                num_res_channels=tuple(cfg.channels[1:]),
                downsample_parameters=((2, 4, 1, 1),) * down,
                upsample_parameters=((2, 4, 1, 1, 0),) * down,
                num_embeddings=cfg.num_embeddings,
                embedding_dim=cfg.latent_channels,
            )

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.kind == "kl":
            recon, mu, sigma = self.net(x)
            kl = 0.5 * (mu.pow(2) + sigma.pow(2) - torch.log(sigma.pow(2) + 1e-12) - 1)
            return recon, kl.flatten(1).sum(1).mean()
        recon, vq_loss = self.net(x)
        return recon, vq_loss

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        if self.kind == "kl":
            return self.net.encode(x)[0]
        return self.net.encode_stage_2_inputs(x)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        if self.kind == "kl":
            return self.net.decode(z)
        return self.net.decode_stage_2_outputs(z)


class ConditionCodec:
    """One integer class label for (task, modality, condition noise level), and the level -> timestep map."""

    def __init__(self, config: ModelSpec):
        self.tasks = len(config.data.tasks)
        self.levels = config.diffusion.condition_levels
        self.max_t = config.diffusion.condition_max_t

    @property
    def num_task_labels(self) -> int:
        return len(MODALITIES) * self.tasks

    @property
    def num_labels(self) -> int:
        return self.num_task_labels * self.levels

    def task_label(self, task, modality):
        """The (task, modality) part of the label: the estimator's whole label."""
        return modality * self.tasks + task

    def label(self, task: torch.Tensor, modality: torch.Tensor, level: torch.Tensor) -> torch.Tensor:
        return self.task_label(task, modality) * self.levels + level

    def timestep(self, level: torch.Tensor) -> torch.Tensor:
        """Diffusion timestep of the noise added to the condition at each level (level 0: none)."""
        if self.levels == 1:
            return torch.zeros_like(level)
        return torch.round(level.double() * self.max_t / (self.levels - 1)).long()


class Denoiser(nn.Module):
    """Wraps a backbone so that ``forward(x_t, t, cond, label)`` concatenates the condition channels."""

    def __init__(self, backbone: nn.Module):
        super().__init__()
        self.backbone = backbone

    def forward(self, x_t: torch.Tensor, t: torch.Tensor, cond: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
        return self.backbone(torch.cat([x_t, cond], dim=1), timesteps=t, class_labels=label)


class _DiTBlock(nn.Module):
    """Transformer block with adaLN-Zero modulation (Peebles & Xie 2023)."""

    def __init__(self, width: int, heads: int):
        super().__init__()
        self.norm1 = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        self.attn = nn.MultiheadAttention(width, heads, batch_first=True)
        self.norm2 = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        self.mlp = nn.Sequential(nn.Linear(width, 4 * width), nn.GELU(approximate="tanh"), nn.Linear(4 * width, width))
        self.modulation = nn.Sequential(nn.SiLU(), nn.Linear(width, 6 * width))
        last = cast(nn.Linear, self.modulation[1])
        nn.init.zeros_(last.weight)
        nn.init.zeros_(last.bias)

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        shift1, scale1, gate1, shift2, scale2, gate2 = self.modulation(emb)[:, None].chunk(6, dim=-1)
        h = self.norm1(x) * (1 + scale1) + shift1
        x = x + gate1 * self.attn(h, h, h, need_weights=False)[0]
        h = self.norm2(x) * (1 + scale2) + shift2
        return x + gate2 * self.mlp(h)


def _sincos_positions(grid: tuple[int, ...], width: int, device) -> torch.Tensor:
    """Fixed sine-cosine position embedding for any grid size (tokens x width)."""
    per_axis = 2 * (width // (2 * len(grid)))
    coords = torch.meshgrid(*[torch.arange(n, device=device, dtype=torch.float32) for n in grid], indexing="ij")
    freqs = torch.exp(-math.log(10000.0) * torch.arange(per_axis // 2, device=device) / (per_axis // 2))
    parts = []
    for c in coords:
        angles = c.reshape(-1, 1) * freqs
        parts += [angles.sin(), angles.cos()]
    emb = torch.cat(parts, dim=1)
    return nn.functional.pad(emb, (0, width - emb.shape[1]))


class DiT(nn.Module):
    """A small diffusion transformer over latent patches, 2D or 3D, conditioned on timestep and class label
    through adaLN-Zero. Same call signature as MONAI's DiffusionModelUNet."""

    def __init__(
        self,
        *,
        spatial_dims: int,
        in_channels: int,
        out_channels: int,
        patch: int,
        width: int,
        depth: int,
        heads: int,
        num_class_embeds: int,
    ):
        super().__init__()
        conv = nn.Conv2d if spatial_dims == 2 else nn.Conv3d
        self.spatial_dims, self.patch, self.width, self.out_channels = spatial_dims, patch, width, out_channels
        self.embed = conv(in_channels, width, kernel_size=patch, stride=patch)
        self.time = nn.Sequential(nn.Linear(width, width), nn.SiLU(), nn.Linear(width, width))
        self.classes = nn.Embedding(num_class_embeds, width)
        self.blocks = nn.ModuleList(_DiTBlock(width, heads) for _ in range(depth))
        self.norm = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        self.final_mod = nn.Sequential(nn.SiLU(), nn.Linear(width, 2 * width))
        self.out = nn.Linear(width, out_channels * patch**spatial_dims)
        for layer in (cast(nn.Linear, self.final_mod[1]), self.out):
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    def forward(self, x: torch.Tensor, timesteps: torch.Tensor, class_labels: torch.Tensor) -> torch.Tensor:
        tokens = self.embed(x)
        grid = tokens.shape[2:]
        tokens = tokens.flatten(2).transpose(1, 2) + _sincos_positions(grid, self.width, x.device)
        emb = self.time(get_timestep_embedding(timesteps, self.width).to(x.dtype)) + self.classes(class_labels)
        for block in self.blocks:
            tokens = block(tokens, emb)
        shift, scale = self.final_mod(emb)[:, None].chunk(2, dim=-1)
        out = self.out(self.norm(tokens) * (1 + scale) + shift)  # B x N x (C * p^d)
        b, p, d, c = x.shape[0], self.patch, self.spatial_dims, self.out_channels
        out = out.reshape(b, *grid, c, *([p] * d))
        if d == 2:
            return out.permute(0, 3, 1, 4, 2, 5).reshape(b, c, grid[0] * p, grid[1] * p)
        return out.permute(0, 4, 1, 5, 2, 6, 3, 7).reshape(b, c, *(g * p for g in grid))


class _ResBlock(nn.Module):
    """conv-ReLU-conv with an identity skip and no normalisation (as in EDSR: normalisation layers shift the
    intensities a regression network must reproduce exactly)."""

    def __init__(self, channels: int, spatial_dims: int = 2):
        super().__init__()
        conv = _CONV[spatial_dims]
        self.body = nn.Sequential(
            conv(channels, channels, 3, padding=1),
            nn.ReLU(inplace=True),
            conv(channels, channels, 3, padding=1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.body(x)


_CONV: dict[int, type[nn.Conv2d] | type[nn.Conv3d]] = {2: nn.Conv2d, 3: nn.Conv3d}


def _unshuffle(x: torch.Tensor) -> torch.Tensor:
    """Space-to-depth by 2 on every spatial axis, (B, C, *n) -> (B, C * 2^dims, *n / 2): 2D as nn.PixelUnshuffle;
    3D the same channel order (torch has no 3D pixel unshuffle)."""
    if x.dim() == 4:
        return F.pixel_unshuffle(x, 2)
    b, c, d, h, w = x.shape
    x = x.reshape(b, c, d // 2, 2, h // 2, 2, w // 2, 2)
    return x.permute(0, 1, 3, 5, 7, 2, 4, 6).reshape(b, c * 8, d // 2, h // 2, w // 2)


def _shuffle(x: torch.Tensor) -> torch.Tensor:
    """The inverse of :func:`_unshuffle`."""
    if x.dim() == 4:
        return F.pixel_shuffle(x, 2)
    b, c, d, h, w = x.shape
    x = x.reshape(b, c // 8, 2, 2, 2, d, h, w)
    return x.permute(0, 1, 5, 2, 6, 3, 7, 4).reshape(b, c // 8, 2 * d, 2 * h, 2 * w)


class _Unshuffle(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _unshuffle(x)


class Estimator(nn.Module):
    """The fidelity stage: a residual U-Net in pixel space from the interpolated LR slab (B, slab, H, W) to the
    HR centre plane (B, 1, H, W), the centre LR plane plus a learned correction; with ``spatial_dims`` 3, from the
    interpolated LR patch (B, 1, D, H, W) to the HR patch (slab 1). It works at half resolution (pixel unshuffle
    in, pixel shuffle out: no information is lost, and full-resolution convolutions, most of the cost, are
    avoided). A per-label bias after the first convolution tells it the task and modality.
    Spatial sizes must be multiples of ``multiple``. With ``geometry``, the factor and the slice thickness (as
    :func:`geometry_features`) add a second bias through a small MLP, zero at initialisation (so a network
    fine-tuned to take them starts as the one it came from)."""

    def __init__(
        self,
        *,
        slab: int,
        channels: list[int],
        num_res_blocks: int,
        num_labels: int,
        geometry: bool = False,
        spatial_dims: int = 2,
    ):
        super().__init__()
        if spatial_dims == 3 and slab != 1:
            raise MedldmError(f"a 3D estimator sees whole patches: slab must be 1, not {slab}")
        self.slab, self.spatial_dims = slab, spatial_dims
        self.multiple = 2 ** len(channels)
        conv, cells = _CONV[spatial_dims], 2**spatial_dims  # voxels per half-resolution cell
        unshuffle = nn.PixelUnshuffle(2) if spatial_dims == 2 else _Unshuffle()  # 2D: the weights' names as shipped
        self.inp = nn.Sequential(unshuffle, conv(cells * slab, channels[0], 3, padding=1))
        self.labels = nn.Embedding(num_labels, channels[0])
        nn.init.zeros_(self.labels.weight)
        self.geometry: nn.Sequential | None = None
        if geometry:
            self.geometry = nn.Sequential(nn.Linear(2, channels[0]), nn.SiLU(), nn.Linear(channels[0], channels[0]))
            last = cast(nn.Linear, self.geometry[2])
            nn.init.zeros_(last.weight)
            nn.init.zeros_(last.bias)

        def blocks(c: int) -> nn.Sequential:
            return nn.Sequential(*[_ResBlock(c, spatial_dims) for _ in range(num_res_blocks)])

        self.down_blocks = nn.ModuleList(blocks(c) for c in channels[:-1])
        pairs = list(zip(channels, channels[1:], strict=False))
        self.downs = nn.ModuleList(conv(a, b, 3, stride=2, padding=1) for a, b in pairs)
        self.middle = blocks(channels[-1])
        self.ups = nn.ModuleList(conv(b, a, 3, padding=1) for a, b in pairs)
        self.up_blocks = nn.ModuleList(blocks(c) for c in channels[:-1])
        self.out = conv(channels[0], cells, 3, padding=1)
        nn.init.zeros_(self.out.weight)  # starts as the identity on the centre plane
        nn.init.zeros_(cast(torch.Tensor, self.out.bias))  # built with a bias (Conv2d's default)

    def forward(self, lr: torch.Tensor, label: torch.Tensor, geometry: torch.Tensor | None = None) -> torch.Tensor:
        centre = lr[:, self.slab // 2 : self.slab // 2 + 1]
        return centre + _shuffle(self.out(self._features(lr, label, geometry)))

    def _features(self, lr: torch.Tensor, label: torch.Tensor, geometry: torch.Tensor | None) -> torch.Tensor:
        """The U-Net's last feature map, at half resolution."""
        spatial = (1,) * self.spatial_dims  # a bias per channel, broadcast over space
        h = self.inp(lr) + self.labels(label).view(*label.shape, -1, *spatial)
        if self.geometry is not None and geometry is not None:
            h = h + self.geometry(geometry.to(h.dtype)).view(len(geometry), -1, *spatial)
        skips = []
        for block, down in zip(self.down_blocks, self.downs, strict=True):
            h = block(h)
            skips.append(h)
            h = down(h)
        h = self.middle(h)
        for block, up in zip(reversed(self.up_blocks), reversed(self.ups), strict=True):
            h = up(F.interpolate(h, scale_factor=2.0, mode="nearest")) + skips.pop()
            h = block(h)
        return h


class ErrorModel(Estimator):
    """The error model (spec ``uncertainty``): the estimator's design on the same input, predicting per voxel the
    log of the Laplace scale b of the consistent estimate's error; it starts at a constant ``log(INITIAL_SCALE)``."""

    INITIAL_SCALE = 0.02  # about the estimator's mean absolute error, in normalised intensities

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        nn.init.constant_(cast(torch.Tensor, self.out.bias), math.log(self.INITIAL_SCALE))

    def forward(self, lr: torch.Tensor, label: torch.Tensor, geometry: torch.Tensor | None = None) -> torch.Tensor:
        return _shuffle(self.out(self._features(lr, label, geometry)))


def channels_last_format(spatial_dims: int) -> torch.memory_format:
    """The channels-last memory format of 2D (NHWC) or 3D (NDHWC) tensors."""
    return torch.channels_last if spatial_dims == 2 else torch.channels_last_3d


def build_autoencoder(config: ModelSpec) -> Autoencoder:
    return Autoencoder(config.autoencoder, config.data.spatial_dims)


def build_discriminator(config: ModelSpec) -> PatchDiscriminator:
    # each layer halves the patch; keep the last feature map at least 4 voxels wide (3 layers from 64 voxels)
    smallest = min(config.data.patch_size)
    layers = max(1, min(3, int(math.log2(smallest)) - 3))
    return PatchDiscriminator(spatial_dims=config.data.spatial_dims, channels=32, in_channels=1, num_layers_d=layers)


def build_denoiser(config: ModelSpec) -> Denoiser:
    cfg, dims, latent = config.diffusion, config.data.spatial_dims, config.autoencoder.latent_channels
    labels = ConditionCodec(config).num_labels
    in_channels = latent * (1 + config.data.slab)  # the noisy latent, then one condition latent per plane
    backbone: nn.Module
    if cfg.denoiser == "dit":
        backbone = DiT(
            spatial_dims=dims,
            in_channels=in_channels,
            out_channels=latent,
            patch=cfg.patch,
            width=cfg.width,
            depth=cfg.depth,
            heads=cfg.heads,
            num_class_embeds=labels,
        )
    else:
        backbone = DiffusionModelUNet(
            spatial_dims=dims,
            in_channels=in_channels,
            out_channels=latent,
            channels=tuple(cfg.channels),
            attention_levels=tuple(cfg.attention_levels),
            num_res_blocks=cfg.num_res_blocks,
            num_head_channels=cfg.num_head_channels,
            norm_num_groups=cfg.norm_num_groups,
            num_class_embeds=labels,
        )
    return Denoiser(backbone)


def build_estimator(config: ModelSpec) -> Estimator:
    cfg = config.estimator
    if cfg is None:
        raise MedldmError("the config has no estimator section, so there is no estimator stage")
    return Estimator(
        slab=cfg.slab,
        channels=list(cfg.channels),
        num_res_blocks=cfg.num_res_blocks,
        num_labels=ConditionCodec(config).num_task_labels,
        geometry=cfg.geometry,
        spatial_dims=cfg.spatial_dims,
    )


def build_error_model(config: ModelSpec) -> ErrorModel:
    """The uncertainty section's error model, on the estimator's input (its slab, labels and geometry)."""
    est, cfg = config.estimator, config.uncertainty
    if est is None or cfg is None:
        raise MedldmError("the config has no uncertainty section (or no estimator), so there is no error model")
    return ErrorModel(
        slab=est.slab,
        channels=list(cfg.channels),
        num_res_blocks=cfg.num_res_blocks,
        num_labels=ConditionCodec(config).num_task_labels,
        geometry=est.geometry,
    )


def geometry_features(scale, thickness) -> torch.Tensor:
    """What an estimator with ``geometry`` is told, (B, 2): log2 of the factor, and the slice thickness / spacing
    minus 1 (0 for contiguous slices)."""
    scale = torch.as_tensor(scale, dtype=torch.float32)
    thickness = torch.as_tensor(thickness, dtype=torch.float32)
    return torch.stack(torch.broadcast_tensors(torch.log2(scale), thickness - 1), dim=-1).reshape(-1, 2)


def build_schedule(config: ModelSpec) -> NoiseSchedule:
    """The noise schedule the denoiser is trained and sampled with."""
    d = config.diffusion
    return NoiseSchedule.from_monai(
        num_train_timesteps=d.timesteps, schedule=d.schedule, beta_start=d.beta_start, beta_end=d.beta_end
    )
