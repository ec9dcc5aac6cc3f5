"""medldm: latent diffusion super-resolution for MRI and CT volumes.

From Python: ``medldm.load``, ``medldm.upscale``, ``medldm.fuse``, ``medldm.save`` and ``medldm.evaluate`` (see
medldm.api).
They are imported on first use, so ``import medldm`` (and the command line's start) stays fast."""

from medldm.errors import MedldmError

__all__ = ["MedldmError", "__version__", "load", "save", "upscale", "fuse", "evaluate", "Volume"]
__version__ = "0.1.0"

_LAZY = {
    "load": "medldm.api",
    "save": "medldm.api",
    "upscale": "medldm.api",
    "fuse": "medldm.api",
    "evaluate": "medldm.api",
    "Volume": "medldm.volume",
}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'medldm' has no attribute {name!r}")
