"""swa_fast: fused, in-place weight averaging for PyTorch."""

from . import distributed, ops, optim, posthoc, schedules, swa_utils
from ._version import __version__ as __version__
from .averaging import EMA, SWA
from .bema import BEMA
from .bn import update_bn
from .fge import FGE
from .flat import FlatBuffer
from .merging import greedy_soup, merge
from .ops import *  # noqa: F403  (ops.__all__: the backend choice and one public function per op)
from .posthoc import PostHocEMA
from .schedules import SWALR, FGECyclicLR
from .swag import SWAG

__all__ = [
    "BEMA",
    "EMA",
    "FGE",
    "SWA",
    "SWAG",
    "SWALR",
    "FGECyclicLR",
    "FlatBuffer",
    "PostHocEMA",
    "distributed",
    "greedy_soup",
    "merge",
    "optim",
    "posthoc",
    "schedules",
    "swa_utils",
    "update_bn",
]
__all__ += ops.__all__
