"""The body of each op's public function: the backend chosen per call by the tensors' device,
then the op run there (compiled: the extension checks in C++; the Python backends: the row's check
first)."""

from __future__ import annotations

import numbers
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from .backends import _C, _CHOICES, choose_backend

if TYPE_CHECKING:
    from .table import OpSpec


def _as_weight(weight: Tensor | float | Sequence[float]) -> Tensor:
    # A number becomes a CPU scalar, which the kernels read on the host: no device allocation;
    # multi_lerp_'s numbers a CPU vector. (The extension's eager entry points take the numbers
    # themselves, and do this faster.)
    if isinstance(weight, Tensor):
        return weight
    if isinstance(weight, numbers.Real):
        return torch.tensor(float(weight), dtype=torch.float64)
    return torch.tensor([float(w) for w in weight], dtype=torch.float64)


_SEQUENCES = (list, tuple)
_COMPILED = frozenset(("cpu", "cuda"))  # the extension's backends
_is_compiling = torch.compiler.is_compiling  # (bound once: the attribute lookups cost per call)


def as_list(tensors: Sequence[Tensor]) -> list[Tensor] | tuple[Tensor, ...]:
    # Lists and tuples pass as they are (a copy of a long list would cost more than the rest of
    # the call); anything else, such as model.parameters(), is gathered once.
    return tensors if type(tensors) in _SEQUENCES else list(tensors)


def runner(spec: OpSpec) -> Callable[[list[Sequence[Tensor]], tuple, str | None], None]:
    """The body of spec's public function: choose the backend, run the op there. Everything it
    looks up is bound here, once: the managers call it on every update."""
    eager = getattr(_C, spec.name, None)  # the extension's eager fast path
    traced = getattr(torch.ops.swa_fast, spec.name) if _C is not None else None
    triton_op = getattr(torch.ops.swa_fast, spec.triton_op)
    check = spec.check
    python_impls = {"foreach": spec.foreach, "reference": spec.reference}

    # Whatever this costs, each update of every manager pays: no os.environ, no device.type (a
    # new string each time), no list copies of what is already a list or a tuple.
    def run(lists: list[Sequence[Tensor]], weight: tuple, backend: str | None) -> None:
        for tensors in lists:
            if type(tensors) not in _SEQUENCES:
                lists = [as_list(t) for t in lists]
                break
        if lists[0]:
            device = lists[0][0].device
            name = _CHOICES.get((device, backend)) or choose_backend(device, backend)
        else:
            name = "reference"
        if name in _COMPILED and not _is_compiling():
            eager(*lists, *weight)  # below autograd, so it needs no no_grad() either
            return
        with torch.no_grad():
            if name in ("cpu", "cuda"):  # traced code needs the registered op
                traced(*lists, *map(_as_weight, weight))
                return
            # Before the Triton op too: its schema would reject a non-tensor less clearly.
            check(*lists, *weight)
            if name == "triton":
                triton_op(*lists, *map(_as_weight, weight))
            else:
                python_impls[name](*lists, *weight)

    return run
