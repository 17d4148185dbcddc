"""What the integration parity tests share: one seeded training trajectory of a small model, and
the comparisons of an original library's averages with ours."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch
from conftest import cnn_with_bn, random_batch, train_step

IMAGE_SIDE = 6


def trajectory(model: torch.nn.Module, steps: int, seed: int = 0) -> Iterator[int]:
    """Train `model` (a conftest.cnn_with_bn(IMAGE_SIDE) or a model taking 3 features) with SGD on
    seeded random batches, yielding the step number after each optimizer step (BatchNorm statistics
    and its integer count move too)."""
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(trainable, lr=0.2, momentum=0.9)
    dtype = next(model.parameters()).dtype
    g = torch.Generator().manual_seed(seed)
    conv = isinstance(model, torch.nn.Sequential) and isinstance(model[0], torch.nn.Conv2d)
    shape = (1, IMAGE_SIDE, IMAGE_SIDE) if conv else (3,)
    for step in range(steps):
        x, y = random_batch(8, shape, classes=3 if conv else None, outputs=2, generator=g)
        train_step(model, optimizer, x.to(dtype), y)
        yield step


def assert_same(theirs: list[torch.Tensor], ours: list[torch.Tensor], exact: bool, what: str = "") -> None:
    """Equal dtypes and shapes, and values equal bit for bit (`exact`) or, where the two round
    differently, each step's rounding apart as it accumulates over the steps (fp32: a few ulps;
    bf16: a few ulps of the values, and of the largest near zero)."""
    assert len(theirs) == len(ours), what
    for i, (a, b) in enumerate(zip(theirs, ours)):
        assert a.dtype == b.dtype and a.shape == b.shape, f"{what} tensor {i}"
        if exact or not a.is_floating_point():
            assert torch.equal(a, b), f"{what} tensor {i}: {(a.double() - b.double()).abs().max()}"
        else:
            rtol, atol = {torch.float32: (1e-5, 1e-6), torch.bfloat16: (2**-6, 2**-9)}[a.dtype]
            torch.testing.assert_close(b, a, rtol=rtol, atol=atol, msg=f"{what} tensor {i}")


def assert_refuses_other_models(update, shadow: list[torch.Tensor], too_few: str) -> None:
    """`update(parameters)` of an EMA of a conftest.cnn_with_bn(IMAGE_SIDE) raises a ValueError
    matching `too_few` when given four of its six parameters, and one naming a shape when given a
    model whose shapes differ; `shadow` (the average) stays as it was."""
    model = cnn_with_bn(IMAGE_SIDE)
    before = [s.clone() for s in shadow]
    with pytest.raises(ValueError, match=too_few):
        update(list(model.parameters())[:4])
    with pytest.raises(ValueError, match="shape"):
        update(cnn_with_bn(IMAGE_SIDE + 1).parameters())
    assert_same(before, shadow, True)
