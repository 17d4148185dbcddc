"""Which backend runs an op's call: the compiled extension (loaded here: the cpu and cuda
backends), Triton, the torch._foreach_* fallbacks or the reference; what each device can use, and
why the others cannot."""

from __future__ import annotations

import os
import warnings

import torch

from .extension import cuda_summary, load

_C, EXTENSION_ERROR, BUILD_INFO = load()
if EXTENSION_ERROR is not None:
    warnings.warn(
        "swa_fast: the compiled kernels (swa_fast._C) did not load, so the ops fall back to Triton / "
        f"torch._foreach_* (slower): {EXTENSION_ERROR}",
        stacklevel=2,
    )

from . import triton_kernels  # noqa: E402  (after _C: its ops join the namespace _C defines)

# A backend's reason (EXTENSION_ERROR, said once by `import swa_fast` and `swa_fast info`, has the rest)
_NOT_LOADED = "the compiled extension swa_fast._C did not load"

BACKENDS = ("cuda", "triton", "cpu", "foreach", "reference")
# Preference order per device type when no backend is forced. foreach runs everywhere, so Triton
# after it on the CPU (only there under its interpreter, a correctness tool) is never chosen.
_PREFERENCE = {"cuda": ("cuda", "triton", "foreach"), "cpu": ("cpu", "foreach", "triton")}
_OTHER_DEVICES = ("foreach", "triton")


def backend_status(device: torch.device | str) -> dict[str, str | None]:
    """For each backend: None when it can run tensors on `device`, else the reason it cannot."""
    kind = torch.device(device).type
    status: dict[str, str | None] = dict.fromkeys(BACKENDS)
    if kind != "cuda":
        status["cuda"] = f"the cuda backend runs CUDA tensors, these are on {kind}"
    elif EXTENSION_ERROR:
        status["cuda"] = _NOT_LOADED
    elif not BUILD_INFO["cuda"]:
        status["cuda"] = f"swa_fast's CUDA kernels were {cuda_summary(BUILD_INFO)}"
    if not triton_kernels.runs_on(torch.device(device)):  # (on the CPU, without importing Triton)
        status["triton"] = triton_kernels.TRITON_ERROR or (
            f"Triton runs CUDA tensors (CPU tensors only with TRITON_INTERPRET=1), these are on {kind}"
        )
    if kind != "cpu":
        status["cpu"] = f"the cpu backend runs CPU tensors, these are on {kind}"
    elif EXTENSION_ERROR:
        status["cpu"] = _NOT_LOADED
    return status


def usable_backends(
    device: torch.device | str, reference: bool = False, interpreted: bool = True
) -> list[str]:
    """The backends that can run tensors on `device`, fastest first (the first is what
    choose_backend picks when none is forced). `reference` adds the per-tensor oracle at the end;
    `interpreted=False` leaves out Triton run by its interpreter (TRITON_INTERPRET=1), which is
    right but no measure of speed."""
    device = torch.device(device)
    status = backend_status(device)
    names = [
        name
        for name in _PREFERENCE.get(device.type, _OTHER_DEVICES)
        if status[name] is None and (interpreted or name != "triton" or not triton_kernels.INTERPRETING)
    ]
    return names + ["reference"] if reference else names


_CHOICES: dict[tuple[torch.device, str | None], str] = {}
# Read once, at import: a lookup in os.environ costs more than the eager op's own fixed cost. Set
# it before swa_fast is imported (or pass `backend=`).
ENV_BACKEND = os.environ.get("SWA_FAST_BACKEND") or None


def _choose(device_type: str, forced: str | None) -> str:
    if forced is not None:
        status = backend_status(torch.device(device_type))
        if forced not in BACKENDS:
            raise ValueError(f"swa_fast: unknown backend {forced!r}; expected one of {', '.join(BACKENDS)}")
        if status[forced] is not None:
            raise RuntimeError(
                f"swa_fast: backend {forced!r} is unavailable for {device_type} tensors: {status[forced]}"
            )
        return forced
    return usable_backends(device_type)[0]


def choose_backend(device: torch.device | str, backend: str | None = None) -> str:
    """The backend for tensors on `device`: `backend` if given, else $SWA_FAST_BACKEND as it was
    when swa_fast was imported, else the fastest available (cuda > triton > foreach on CUDA; cpu >
    foreach on the CPU). A forced backend that cannot run raises a RuntimeError with the reason."""
    # Remembered per device (not per device type: a tensor's device.type costs more than a lookup)
    key = (device if isinstance(device, torch.device) else torch.device(device), backend)
    if key not in _CHOICES:  # only successful choices are remembered: a failing one raises each time
        _CHOICES[key] = _choose(key[0].type, backend or ENV_BACKEND)
    return _CHOICES[key]
