"""Argument checks for the Python backends (Triton, foreach, reference).

They mirror csrc/multi_tensor.h word for word, so every backend rejects the same calls with the
same message, before anything is written.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

FLOAT_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


def check_lists(
    op: str, lists: Sequence[tuple[str, Sequence[Tensor], bool]], same_dtype: bool = False
) -> None:
    """`lists` holds (name, tensors, written) triples; written lists must be contiguous."""
    first_name, first, _ = lists[0]
    for name, tensors, _ in lists:
        if len(tensors) != len(first):
            raise ValueError(
                f"swa_fast.{op}: `{name}` has {len(tensors)} tensors but `{first_name}` has {len(first)}; "
                "the lists must have equal lengths"
            )
    if not first:
        return
    device = first[0].device
    for i, ref in enumerate(first):
        for name, tensors, written in lists:
            t = tensors[i]
            if not isinstance(t, Tensor):
                raise ValueError(f"swa_fast.{op}: `{name}[{i}]` is a {type(t).__name__}, expected a Tensor")
            if t.dtype not in FLOAT_DTYPES:
                raise ValueError(
                    f"swa_fast.{op}: `{name}[{i}]` has dtype {t.dtype}; "
                    "expected float32, float64, float16 or bfloat16"
                )
            if t.device != device:
                raise ValueError(
                    f"swa_fast.{op}: `{name}[{i}]` is on {t.device} but `{first_name}[0]` is on {device}; "
                    "all tensors of one call must be on one device"
                )
            if t.shape != ref.shape:
                raise ValueError(
                    f"swa_fast.{op}: `{name}[{i}]` has shape {list(t.shape)} but `{first_name}[{i}]` "
                    f"has shape {list(ref.shape)}"
                )
            if written and not t.is_contiguous():
                raise ValueError(
                    f"swa_fast.{op}: `{name}[{i}]` is written in place and must be contiguous "
                    f"(got strides {list(t.stride())} for shape {list(t.shape)})"
                )
            if same_dtype and t.dtype != ref.dtype:
                raise ValueError(
                    f"swa_fast.{op}: `{name}[{i}]` has dtype {t.dtype} but `{first_name}[{i}]` has dtype "
                    f"{ref.dtype}; both sides must have the same dtype"
                )


def check_weight(op: str, weight: Tensor | float, device: torch.device) -> None:
    if not isinstance(weight, Tensor):
        if not isinstance(weight, (int, float)):
            raise ValueError(f"swa_fast.{op}: `weight` must be a float or a 0-dim tensor, got {type(weight)}")
        return
    if weight.dim() != 0:
        raise ValueError(f"swa_fast.{op}: `weight` must be a 0-dim tensor, got shape {list(weight.shape)}")
    if weight.dtype not in (torch.float32, torch.float64):
        raise ValueError(f"swa_fast.{op}: `weight` must be float32 or float64, got {weight.dtype}")
    if weight.device != device and weight.device.type != "cpu":
        raise ValueError(
            f"swa_fast.{op}: `weight` is on {weight.device} but the tensors are on {device}; "
            f"pass it on {device} (or on the CPU)"
        )


def check_lerp(avg, src, weight) -> None:
    check_lists("lerp_", [("avg", avg, True), ("src", src, False)])
    if avg:
        check_weight("lerp_", weight, avg[0].device)


def check_moments(mean, sq, src, weight) -> None:
    check_lists("moments_", [("mean", mean, True), ("sq", sq, True)], same_dtype=True)
    check_lists("moments_", [("mean", mean, True), ("src", src, False)])
    if mean:
        check_weight("moments_", weight, mean[0].device)


def check_copy(dst, src) -> None:
    check_lists("copy_", [("dst", dst, True), ("src", src, False)])


def check_swap(a, b) -> None:
    check_lists("swap_", [("a", a, True), ("b", b, True)], same_dtype=True)
