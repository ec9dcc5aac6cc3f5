"""medldm: latent diffusion super-resolution for MRI and CT volumes."""

from medldm.errors import MedldmError

__all__ = ["MedldmError", "__version__"]
__version__ = "0.1.0"
