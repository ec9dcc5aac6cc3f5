"""Evaluation for radiology research: metrics, baselines, rate-distortion and the report.

Public metrics: ``psnr``, ``ssim``, ``nrmse`` (2D or 3D arrays), ``lpips`` (two 2D images in [0, 1]) and
``lpips_volume``; conventions are in :mod:`medldm.evaluation.metrics`.
"""

from medldm.evaluation.metrics import foreground_mask, lpips, lpips_volume, nrmse, psnr, ssim

__all__ = ["psnr", "ssim", "nrmse", "lpips", "lpips_volume", "foreground_mask"]
