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


def _as_weight(weight: Tensor | float | Sequence[float] | None) -> Tensor | None:
    # A number becomes a CPU scalar, which the kernels read on the host: no device allocation;
    # multi_lerp_'s numbers a CPU vector. (The extension's eager entry points take the numbers
    # themselves, and do this faster.) The arguments after the weight pass as they are: `rounding`
    # (a tensor, or None when `stats` follows it) and `stats`.
    if weight is None or isinstance(weight, Tensor):
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
        try:
            if name in _COMPILED and not _is_compiling():
                eager(*lists, *weight)  # below autograd, so it needs no no_grad() either
                return
            with torch.no_grad():
                other(name, lists, weight)
        except RuntimeError as error:  # (what torch says of a tensor of a torch.func transform)
            refuse_transformed(spec.name, lists, error)
            raise

    def other(name: str, lists: list[Sequence[Tensor]], weight: tuple) -> None:
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


_is_wrapped = torch._C._functorch.is_functorch_wrapped_tensor


def refuse_transformed(op: str, lists: list[Sequence[Tensor]], error: RuntimeError) -> None:
    """After `error` from an op's call: raise a RuntimeError naming the op when a tensor given is a
    torch.func transform's (vmap's batched tensor, grad's wrapper), which has no storage the op
    could write (torch's own message, "Cannot access data pointer of Tensor that doesn't have
    storage", names neither); else return, for the caller to raise `error` itself."""
    if any(_is_wrapped(t) for tensors in lists for t in tensors if isinstance(t, Tensor)):
        raise RuntimeError(
            f"swa_fast.{op} is not batched: it was called under torch.func.vmap (or another torch.func "
            "transform), whose tensors have no storage the op could update in place. Call it outside "
            "the transform, on the tensors themselves (a batch of averages is one tensor with a "
            "leading dimension)"
        ) from error
