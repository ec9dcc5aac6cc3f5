"""The base of every closed set of options (degradation kinds, slice profiles, plane stacks, fusion priors): one
enum per choice, which the configs (pydantic), the command line (typer) and the library all use."""

from __future__ import annotations

from enum import Enum

__all__ = ["Choice", "Format", "Kind", "Planes", "Prior", "Profile", "Sampler", "StageName"]


class Choice(str, Enum):
    """An option that is its own string value everywhere: equal to, hashed like, printed and formatted as the
    value (``"slice-profile"``), so it can key and look up dicts read from JSON, and a plain string may be passed
    wherever a member is expected."""

    def __str__(self) -> str:
        return self.value

    def __format__(self, spec: str) -> str:
        return format(self.value, spec)

    __hash__ = str.__hash__

    @classmethod
    def values(cls) -> tuple[str, ...]:
        return tuple(member.value for member in cls)


class Kind(Choice):
    """How an acquisition lost resolution: thick slices along one axis, or in-plane k-space truncation or blur."""

    slice_profile = "slice-profile"
    kspace = "kspace"
    blur = "blur"


class Profile(Choice):
    """The shape of a thick slice's sensitivity along its normal."""

    gaussian = "gaussian"
    boxcar = "boxcar"


class Planes(Choice):
    """2D models on thick slices: the planes of one stack (across the free axis with the fewest voxels), or of
    both stacks averaged."""

    one = "one"
    both = "both"


class Prior(Choice):
    """What the fused estimate starts from before the joint consistency step."""

    model = "model"
    bspline = "bspline"


class Sampler(Choice):
    """The diffusion samplers of medldm.diffusion.SAMPLERS (tests/test_choices.py keeps the two lists equal)."""

    ddpm = "ddpm"
    ddim = "ddim"
    dpmpp_2m = "dpmpp-2m"
    sde = "sde"
    ode = "ode"


class Format(Choice):
    """How a scan is written: a NIfTI file, or a folder holding a derived DICOM series."""

    nifti = "nifti"
    dicom = "dicom"


class StageName(Choice):
    """What ``medldm train`` trains: every stage of the config in order, or one (medldm.train.STAGES)."""

    all = "all"
    autoencoder = "autoencoder"
    estimator = "estimator"
    second_pass = "second_pass"
    third_pass = "third_pass"
    uncertainty = "uncertainty"
    diffusion = "diffusion"
