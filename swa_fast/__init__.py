"""swa_fast: fused, in-place weight averaging for PyTorch."""

from .averaging import EMA, SWA
from .bn import update_bn
from .flat import FlatBuffer
from .ops import BACKENDS, backend_status, choose_backend, copy_, lerp_, moments_, swap_

__all__ = [
    "BACKENDS",
    "EMA",
    "SWA",
    "FlatBuffer",
    "backend_status",
    "choose_backend",
    "copy_",
    "lerp_",
    "moments_",
    "swap_",
    "update_bn",
]
__version__ = "0.1.0"
