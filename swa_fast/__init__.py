"""swa_fast: fused, in-place weight averaging for PyTorch."""

from .ops import BACKENDS, backend_status, choose_backend, copy_, lerp_, moments_, swap_

__all__ = ["BACKENDS", "backend_status", "choose_backend", "copy_", "lerp_", "moments_", "swap_"]
__version__ = "0.1.0"
