"""swa_fast: fused, in-place weight averaging for PyTorch."""

from . import distributed, optim, posthoc, schedules, swa_utils
from .averaging import EMA, SWA
from .bn import update_bn
from .fge import FGE
from .flat import FlatBuffer
from .ops import BACKENDS, backend_status, choose_backend, copy_, lerp_, moments_, multi_lerp_, swap_
from .posthoc import PostHocEMA
from .schedules import SWALR, FGECyclicLR
from .swag import SWAG

__all__ = [
    "BACKENDS",
    "EMA",
    "FGE",
    "SWA",
    "SWAG",
    "SWALR",
    "FGECyclicLR",
    "FlatBuffer",
    "PostHocEMA",
    "backend_status",
    "choose_backend",
    "distributed",
    "copy_",
    "lerp_",
    "moments_",
    "multi_lerp_",
    "optim",
    "posthoc",
    "schedules",
    "swa_utils",
    "swap_",
    "update_bn",
]
__version__ = "0.1.0"
