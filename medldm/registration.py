"""Rigid alignment of thick-slice stacks to the first one (``medldm fuse --register``), with SimpleITK.

Patients move between acquisitions. Each stack is B-spline upsampled along its slice axis (registration of
isotropic images is better conditioned than of thick slices), then registered to the first stack with a rigid
(Euler) transform, Mattes mutual information and a three-level pyramid. The stack's voxels are not resampled:
its affine is corrected, so the fusion's forward model sees it where the anatomy was.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np

from medldm.errors import MedldmError
from medldm.volume import Volume

__all__ = ["register_stacks", "rigid_parameters"]

LPS = np.diag([-1.0, -1.0, 1.0, 1.0])  # RAS+ <-> LPS (ITK's physical space); its own inverse
MIN_METRIC_IMPROVEMENT = 0.0  # a registration that ends above its start (worse) is refused


def _sitk():
    try:
        import SimpleITK as sitk
    except ImportError as exc:  # an optional dependency: medldm[register]
        raise MedldmError("--register needs SimpleITK: pip install 'medldm[register]'") from exc
    return sitk


def _image(volume: Volume):
    """A SimpleITK image of ``volume`` (voxel axes i, j, k; LPS physical space)."""
    sitk = _sitk()
    img = sitk.GetImageFromArray(np.ascontiguousarray(volume.data.transpose(2, 1, 0)).astype(np.float32))
    lps = LPS @ volume.affine
    spacing = np.sqrt((lps[:3, :3] ** 2).sum(0))
    img.SetSpacing([float(s) for s in spacing])
    img.SetDirection([float(v) for v in (lps[:3, :3] / spacing).flatten()])
    img.SetOrigin([float(v) for v in lps[:3, 3]])
    return img


def _isotropic(stack) -> Volume:
    """The stack upsampled along its slice axis to its in-plane spacing (B-spline), same field of view."""
    from medldm.resample import interpolate

    vol = stack.volume
    if stack.axis is None:
        return vol
    factors = [1.0, 1.0, 1.0]
    factors[stack.axis] = max(1, round(vol.spacing[stack.axis] / min(vol.spacing)))
    return interpolate(vol, factors, method="bspline")


def _matrix(transform) -> np.ndarray:
    """The 4 x 4 RAS+ matrix of an ITK rigid transform (which maps fixed points to moving points, in LPS)."""
    r = np.asarray(transform.GetMatrix()).reshape(3, 3)
    c = np.asarray(transform.GetCenter())
    t = np.asarray(transform.GetTranslation())
    h = np.eye(4)
    h[:3, :3], h[:3, 3] = r, c + t - r @ c
    return LPS @ h @ LPS


def rigid_parameters(matrix: np.ndarray) -> dict:
    """Rotation (total angle in degrees, and the matrix) and translation (mm) of a 4 x 4 rigid transform."""
    r = matrix[:3, :3]
    angle = float(np.degrees(np.arccos(np.clip((np.trace(r) - 1) / 2, -1.0, 1.0))))
    return {
        "rotation_deg": round(angle, 4),
        "translation_mm": [round(float(v), 4) for v in matrix[:3, 3]],
        "matrix": [[round(float(v), 6) for v in row] for row in matrix],
    }


def register_stacks(stacks: list, *, seed: int = 0) -> tuple[list, dict[str, dict]]:
    """Align stacks 2.. to the first. Returns the stacks with corrected affines and, per moved stack, the rigid
    transform applied to its world coordinates (:func:`rigid_parameters`)."""
    sitk = _sitk()
    fixed = _image(_isotropic(stacks[0]))
    out, transforms = [stacks[0]], {}
    for stack in stacks[1:]:
        moving = _image(_isotropic(stack))
        reg = sitk.ImageRegistrationMethod()
        reg.SetMetricAsMattesMutualInformation(numberOfHistogramBins=50)
        reg.SetMetricSamplingStrategy(reg.RANDOM)
        reg.SetMetricSamplingPercentage(0.2, seed)
        reg.SetInterpolator(sitk.sitkLinear)
        reg.SetOptimizerAsRegularStepGradientDescent(
            learningRate=1.0,
            minStep=1e-4,
            numberOfIterations=300,
            relaxationFactor=0.5,
            gradientMagnitudeTolerance=1e-8,
        )
        reg.SetOptimizerScalesFromPhysicalShift()
        reg.SetShrinkFactorsPerLevel([4, 2, 1])
        reg.SetSmoothingSigmasPerLevel([2.0, 1.0, 0.0])
        reg.SmoothingSigmasAreSpecifiedInPhysicalUnitsOn()
        initial = sitk.CenteredTransformInitializer(
            fixed, moving, sitk.Euler3DTransform(), sitk.CenteredTransformInitializerFilter.GEOMETRY
        )
        reg.SetInitialTransform(initial, inPlace=True)  # optimised in place: an Euler3DTransform
        try:
            start = reg.MetricEvaluate(fixed, moving)
            reg.Execute(fixed, moving)
        except RuntimeError as exc:
            raise MedldmError(
                f"could not be registered to {stacks[0].name}: {str(exc).splitlines()[-1]}", stack.name
            ) from exc
        end = reg.GetMetricValue()
        if not np.isfinite(end) or end > start + MIN_METRIC_IMPROVEMENT:
            raise MedldmError(
                f"could not be registered to {stacks[0].name} (mutual information did not improve)", stack.name
            )
        h = _matrix(initial)  # first stack's world -> this stack's world
        correction = np.linalg.inv(h)  # where this stack's recorded positions are in the first stack's world
        moved = replace(stack, volume=stack.volume.with_data(stack.volume.data, correction @ stack.volume.affine))
        out.append(moved)
        transforms[stack.name] = rigid_parameters(correction)
    return out, transforms
