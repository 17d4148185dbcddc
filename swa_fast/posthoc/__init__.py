"""Post-hoc EMA (EDM2): `PostHocEMA` tracks power-function EMAs and writes snapshots of them;
`synthesize` reconstructs an EMA of any other length from the snapshots after training.

manager.py holds the manager and the synthesis, profiles.py the power-function math, snapshots.py
the snapshot files (their names, their versioned format, the one reader) and the background writer.
"""

from .manager import PostHocEMA, synthesize
from .profiles import (
    SIGMA_REL_MAX,
    Reconstruction,
    gamma_to_sigma_rel,
    profile_inner,
    profile_weights,
    sigma_rel_to_gamma,
    solve_coefficients,
    update_weight,
)
from .snapshots import (
    Snapshot,
    list_snapshots,
    load_snapshot,
    named_averages,
    save_snapshot,
    snapshot_path,
    snapshot_runs,
)

__all__ = [
    "SIGMA_REL_MAX",
    "PostHocEMA",
    "Reconstruction",
    "Snapshot",
    "gamma_to_sigma_rel",
    "list_snapshots",
    "load_snapshot",
    "named_averages",
    "profile_inner",
    "profile_weights",
    "save_snapshot",
    "sigma_rel_to_gamma",
    "snapshot_path",
    "snapshot_runs",
    "solve_coefficients",
    "synthesize",
    "update_weight",
]
