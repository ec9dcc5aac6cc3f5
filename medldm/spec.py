"""What a model is, apart from how it was trained: the tasks it inverts, its dimensions and intensity scaling, and
its networks (autoencoder, denoiser, estimator). Inference (medldm.nets, medldm.pipeline) reads only this; the
training config (medldm.config.Config) extends it with the data sources, caches and the schedule. Pydantic models;
unknown keys are errors.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator

from medldm.choices import Kind, Profile

__all__ = ["Autoencoder", "DataSpec", "Diffusion", "Estimator", "Intensity", "ModelSpec", "Task"]

MAX_PATCH = 512  # voxels per patch axis: beyond it one batch would not fit in memory on any machine
Channels = Annotated[int, Field(ge=1, le=2048)]  # per network level: bounded before anything is allocated
NAME_PATTERN = r"^[A-Za-z0-9_][A-Za-z0-9_.-]*$"  # names that become file names: no folders, nothing hidden


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)  # .inf/.nan in YAML: refused


class Task(_Strict):
    """One degradation the model learns to invert. ``slice-profile``: thick slices along one axis (the axis is
    chosen per sample among the planes' axes, so the model sees every orientation); ``kspace``/``blur``: in-plane
    loss of resolution."""

    kind: Kind
    scale: int = Field(ge=2, le=8)
    profile: Profile = Profile.gaussian
    # thick slices at any factor (docs/grids.md): a share of this task's samples draw their factor log-uniformly
    # from scale_range and their slice thickness / spacing uniformly from thickness_range; the estimator is told
    # both (estimator.geometry), the networks' label stays this task's
    scale_range: tuple[float, float] | None = None
    thickness_range: tuple[float, float] | None = None
    range_share: float = Field(0.5, gt=0, le=1)

    @model_validator(mode="after")
    def _ranges_are_thick_slices(self):
        for name, (lo, hi), bounds in (
            ("scale_range", self.scale_range or (2, 2), (1.05, 16)),
            ("thickness_range", self.thickness_range or (1, 1), (0.05, 8)),
        ):
            if not bounds[0] <= lo <= hi <= bounds[1]:
                raise ValueError(f"{name} must be [low, high] within {bounds[0]}..{bounds[1]}")
        if (self.scale_range or self.thickness_range) and self.kind != "slice-profile":
            raise ValueError("scale_range and thickness_range apply to slice-profile tasks")
        return self


class Intensity(_Strict):
    kind: Literal["percentile", "window"] = "percentile"
    lower: float = Field(0.5, ge=0, lt=50)
    upper: float = Field(99.5, gt=50, le=100)
    window: str | None = None  # CT preset name from medldm.intensity.CT_WINDOWS

    @model_validator(mode="after")
    def _window_is_known(self):
        from medldm.intensity import CT_WINDOWS

        if self.kind == "window" and self.window not in CT_WINDOWS:
            raise ValueError(f"kind window needs window: one of {', '.join(CT_WINDOWS)} (got {self.window!r})")
        return self


class DataSpec(_Strict):
    """What the networks take: the tasks, 2D or 3D, the patch size they were built for, the intensity scaling and
    the slab; and what the training data held (for the out-of-distribution warnings)."""

    tasks: list[Task] = Field(min_length=1)
    spatial_dims: Literal[2, 3] = 2
    patch_size: list[int] = Field(min_length=2, max_length=3)  # each at most MAX_PATCH (memory)
    intensity: Intensity = Intensity()
    # 2.5D: 2D models see the LR planes of `slab` adjacent planes (the target in the middle) as the condition
    slab: int = Field(1, ge=1)
    # what the sources hold, for the model's out-of-distribution warnings (medldm.scope): e.g. [T1], brain
    contrasts: list[str] | None = None
    region: str | None = None

    @field_validator("slab")
    @classmethod
    def _slab_is_odd_and_2d(cls, slab: int, info: ValidationInfo) -> int:
        # a field validator (not a model validator) so that the error names data.slab; spatial_dims is declared
        # above, so it is already in info.data (absent only when it was itself invalid)
        if slab % 2 == 0:
            raise ValueError(f"slab must be odd (the target plane in the middle), got {slab}")
        dims = info.data.get("spatial_dims")
        if slab > 1 and dims is not None and dims != 2:
            raise ValueError(f"slab {slab} needs spatial_dims 2 (3D models see whole patches), not {dims}")
        return slab

    @model_validator(mode="after")
    def _patch_matches_dims(self):
        if len(self.patch_size) != self.spatial_dims:
            raise ValueError(f"patch_size has {len(self.patch_size)} entries but spatial_dims is {self.spatial_dims}")
        if any(p < 8 or p > MAX_PATCH for p in self.patch_size):
            raise ValueError(f"patch_size entries must lie in 8..{MAX_PATCH}")
        return self


class Autoencoder(_Strict):
    kind: Literal["kl", "vq"] = "kl"
    channels: list[Channels] = Field([32, 64, 64], min_length=2, max_length=4)  # f = 2 ** (len(channels) - 1)
    latent_channels: int = Field(4, ge=1, le=16)
    num_res_blocks: int = Field(1, ge=1, le=4)
    norm_num_groups: int = Field(16, ge=1)
    attention: bool = False
    num_embeddings: int = Field(256, ge=2)  # VQ codebook size
    # losses
    perceptual_weight: float = Field(0.3, ge=0)
    kl_weight: float = Field(1e-6, ge=0)
    adversarial_weight: float = Field(0.01, ge=0)
    # step at which the discriminator joins; None when adversarial_weight is 0 (no discriminator)
    adversarial_start: int | None = Field(2000, ge=0)
    lpips_weights: str | None = None  # folder with the real LPIPS weights; default: see medldm.perceptual

    @property
    def factor(self) -> int:
        return 2 ** (len(self.channels) - 1)

    @model_validator(mode="before")
    @classmethod
    def _no_start_without_adversary(cls, data):
        """A start step means nothing without the adversarial loss: it is dropped, so that it neither changes the
        digest nor makes two otherwise equal autoencoders differ (older folders wrote one)."""
        if isinstance(data, dict) and data.get("adversarial_weight") == 0:
            data = {**data, "adversarial_start": None}
        return data

    @model_validator(mode="after")
    def _groups_divide(self):
        bad = [c for c in self.channels if c % self.norm_num_groups]
        if bad:
            raise ValueError(f"norm_num_groups {self.norm_num_groups} must divide every channel count, not {bad}")
        return self


class Diffusion(_Strict):
    denoiser: Literal["unet", "dit"] = "unet"
    channels: list[Channels] = Field([64, 128, 128], min_length=1, max_length=4)
    attention_levels: list[bool] = [False, False, True]
    num_res_blocks: int = Field(1, ge=1, le=4)
    num_head_channels: int = Field(32, ge=8)
    norm_num_groups: int = Field(32, ge=1)
    # DiT option
    patch: int = Field(2, ge=1)
    depth: int = Field(6, ge=1, le=64)
    width: int = Field(192, ge=32, le=4096)
    heads: int = Field(6, ge=1)
    # process
    timesteps: int = Field(1000, ge=10, le=10000)
    schedule: Literal["linear_beta", "scaled_linear_beta", "sigmoid_beta", "cosine"] = "scaled_linear_beta"
    beta_start: float = Field(0.0015, gt=0, lt=1)
    beta_end: float = Field(0.0195, gt=0, lt=1)
    prediction: Literal["epsilon", "v_prediction", "sample"] = "v_prediction"
    # noise augmentation of the condition: levels 0..condition_levels-1 spread over [0, condition_max_t]
    condition_levels: int = Field(8, ge=1)
    condition_max_t: int = Field(250, ge=0)
    # what the denoiser is conditioned on: "lr", the latent(s) of the interpolated LR planes; "estimate", the latent
    # of the estimator's regression estimate (refinement models: needs an estimator section)
    condition: Literal["lr", "estimate"] = "lr"
    # None: trained on the whole schedule (sampling may start from pure noise). R: trained only on the timesteps up
    # to R of the schedule, the ones a refinement from the estimate at refine <= R meets (and R is its default)
    refine: float | None = Field(None, gt=0, lt=1)
    # refinement models: the share of training steps whose condition is the consistent estimate after all of the
    # estimator's passes (what upscale refines; thick slices, computed once and cached), instead of the first
    # pass's raw estimate of the patch (every task)
    final_estimate_share: float = Field(0.0, ge=0, le=1)

    @model_validator(mode="after")
    def _levels_match(self):
        if self.denoiser == "unet" and len(self.attention_levels) != len(self.channels):
            raise ValueError("attention_levels needs one entry per channels entry")
        if self.condition_max_t >= self.timesteps:
            raise ValueError("condition_max_t must be below timesteps")
        if self.beta_start >= self.beta_end:
            raise ValueError(f"beta_start ({self.beta_start}) must be below beta_end ({self.beta_end})")
        return self


class Estimator(_Strict):
    """The fidelity stage: a pixel-space residual U-Net that maps the interpolated LR planes (``slab`` adjacent
    planes, the target in the middle) to the HR plane, trained with L1 to give the posterior mean. The diffusion
    model then adds only the detail this estimate lacks (medldm.pipeline)."""

    channels: list[Channels] = Field([32, 64, 128], min_length=1, max_length=4)  # one resolution level each
    num_res_blocks: int = Field(2, ge=1, le=4)
    slab: int = Field(5, ge=1)
    geometry: bool = False  # tell the network the factor and slice thickness (continuous, for any factor)
    # 3: a 3D network on whole patches (slab 1) of patch_size; 2: planes (2.5D slabs) of data.patch_size
    spatial_dims: Literal[2, 3] = 2
    patch_size: list[int] | None = None  # 3D: the training patch (each a multiple of 2^len(channels))

    @field_validator("slab")
    @classmethod
    def _odd(cls, slab: int) -> int:
        if slab % 2 == 0:
            raise ValueError(f"slab must be odd (the target plane in the middle), got {slab}")
        return slab

    @model_validator(mode="after")
    def _patches_fit(self):
        if self.spatial_dims == 3 and (self.slab != 1 or self.patch_size is None):
            raise ValueError("a 3D estimator sees whole patches: it needs slab 1 and a patch_size")
        if self.spatial_dims == 2 and self.patch_size is not None:
            raise ValueError("a 2D estimator trains on data.patch_size; patch_size is for spatial_dims 3")
        multiple = 2 ** len(self.channels)
        if self.patch_size is not None and (
            len(self.patch_size) != 3 or any(n % multiple or n > MAX_PATCH for n in self.patch_size)
        ):
            raise ValueError(f"patch_size needs 3 sizes, each a multiple of {multiple} and <= {MAX_PATCH}")
        return self


class Uncertainty(_Strict):
    """The error model: a small network of the estimator's design, on the same interpolated LR slab, that predicts
    per voxel the scale of the error the consistent estimate makes (a Laplace scale b; standard deviation
    sqrt(2) b), trained with the Laplace negative log-likelihood of the estimator's error, the estimator frozen.
    ``upscale`` returns it as the uncertainty map, also for one sample."""

    channels: list[Channels] = Field([16, 32, 64], min_length=1, max_length=4)
    num_res_blocks: int = Field(1, ge=1, le=4)


# the task kinds a later pass can learn: those whose estimate the passes before it make on whole volumes
LaterPassKind = Literal["slice-profile", "kspace"]
THICK_ONLY: tuple[LaterPassKind, ...] = ("slice-profile",)  # a later pass's kinds unless its section says otherwise
LATER_PASSES = ("second_pass", "third_pass")  # in the order they run


class SecondPass(_Strict):
    """A second pass of the estimator (thick slices): a network of the estimator's design, initialised from its
    trained weights, that maps the slab of the first pass's consistent estimate (both stacks of planes averaged and
    projected) to the HR plane; inference runs it on both stacks of that estimate and projects again. The first
    pass's output carries what the other stack of planes saw, so the second pass sees beyond one plane's stack.
    ``kinds``: the tasks it learns and runs on (k-space: on the acquired planes, as the first pass does)."""

    kinds: tuple[LaterPassKind, ...] = Field(default=THICK_ONLY, min_length=1)


class ThirdPass(_Strict):
    """A third pass (thick slices): a network of the estimator's design, initialised from the trained second pass,
    that maps the slab of the *two-pass* consistent estimate to the HR plane; inference runs it on both stacks of
    planes of that estimate and projects again. The second pass is not a fixed point of itself (run twice, it
    barely helps), so the third pass learns the second pass's own remaining error."""

    kinds: tuple[LaterPassKind, ...] = Field(default=THICK_ONLY, min_length=1)


class ModelSpec(_Strict):
    """A model: its name, what it takes (``data``) and its networks."""

    name: str = Field(pattern=NAME_PATTERN, max_length=128)  # names the run folder: no paths
    data: DataSpec
    autoencoder: Autoencoder = Autoencoder()
    diffusion: Diffusion = Diffusion()
    estimator: Estimator | None = None  # None: the diffusion model alone, sampling from noise
    uncertainty: Uncertainty | None = None  # the error model, for 2D estimators
    second_pass: SecondPass | None = None  # a second estimator on the first one's estimate, for thick slices
    third_pass: ThirdPass | None = None  # a third on the second pass's estimate

    def passes_for(self, kind: str) -> list[str]:
        """The later passes (LATER_PASSES) whose sections say they run on ``kind``, in order."""
        return [name for name in LATER_PASSES if (s := getattr(self, name)) is not None and kind in s.kinds]

    @model_validator(mode="after")
    def _stages_fit(self):
        if self.uncertainty is not None and (self.estimator is None or self.estimator.spatial_dims != 2):
            raise ValueError("the uncertainty (error model) section needs a 2D estimator section: it models its error")
        if self.second_pass is not None and (self.estimator is None or self.estimator.spatial_dims != 2):
            raise ValueError("the second_pass section needs a 2D estimator section: it is a second pass of it")
        if self.third_pass is not None and self.second_pass is None:
            raise ValueError("the third_pass section needs a second_pass section: it starts from its weights")
        for section in (self.second_pass, self.third_pass):
            if section is not None and not set(section.kinds) <= {t.kind for t in self.data.tasks}:
                raise ValueError(f"a later pass learns the config's tasks, and {section.kinds} are not all among them")
        if self.third_pass and self.second_pass and not set(self.third_pass.kinds) <= set(self.second_pass.kinds):
            raise ValueError("the third_pass runs on the second pass's estimate: its kinds must be the second's too")
        if self.estimator is not None and self.data.spatial_dims != 2:
            raise ValueError("the estimator is a 2D (2.5D slab) network: it needs data.spatial_dims 2")
        if self.diffusion.condition == "estimate" and (self.estimator is None or self.data.slab != 1):
            raise ValueError(
                "diffusion.condition 'estimate' needs an estimator section and data.slab 1 "
                "(the estimate already sees the slab)"
            )
        if self.diffusion.refine is not None and self.estimator is None:
            raise ValueError("diffusion.refine needs an estimator section (it refines the estimate)")
        if self.diffusion.final_estimate_share > 0 and (
            self.diffusion.condition != "estimate" or all(t.kind != "slice-profile" for t in self.data.tasks)
        ):
            raise ValueError(
                "diffusion.final_estimate_share needs diffusion.condition 'estimate' and a slice-profile task "
                "(the final estimates are those of thick slices)"
            )
        return self
