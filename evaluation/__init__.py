"""Evaluation for radiology research: metrics, baselines, rate-distortion and the report."""

__all__: list[str] = []
