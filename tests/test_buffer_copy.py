"""swa_fast.buffer_copy.BufferCopy against torch's per-tensor `copy_`: the same values after every
call, however the lists' tensors were changed between calls."""

import pytest
import torch

from swa_fast.buffer_copy import BufferCopy

CPU = torch.device("cpu")


def buffers(seed):
    """A model's buffers of every kind: floating (two dtypes), 0-dim integer and bool scalars, and
    a 1-D integer buffer."""
    g = torch.Generator().manual_seed(seed)
    return [
        torch.randn(5, generator=g),
        torch.randint(0, 100, (), generator=g),  # num_batches_tracked
        torch.randn(3, generator=g, dtype=torch.float64),
        torch.tensor(bool(seed % 2)),
        torch.randint(0, 100, (4,), generator=g),
    ]


def assert_copied(dst, src):
    for i, (d, s) in enumerate(zip(dst, src)):
        assert torch.equal(d, s.to(d.dtype)), i


def test_every_kind_is_copied_by_the_op():
    dst, copy = buffers(0), BufferCopy(CPU)
    for step in range(1, 4):
        src = buffers(step)
        copy(dst, src, eager=step % 2 == 0)
        assert_copied(dst, src)
    assert copy.by_op  # the op took every pair


def test_the_copy_reads_the_source_tensors_it_is_given_each_call():
    """The lists may hold other tensors, or the same tensors with new memory, from call to call."""
    dst, src, copy = buffers(0), buffers(1), BufferCopy(CPU)
    copy(dst, src)
    changes = [
        lambda: src.__setitem__(1, torch.tensor(1234)),  # a replaced num_batches_tracked (a `.to()`)
        lambda: setattr(src[1], "data", torch.tensor(-5)),  # its memory moved
        lambda: setattr(dst[1], "data", torch.tensor(77)),  # the destination's too
        lambda: src[1].fill_(9),  # written in place
        lambda: src.__setitem__(0, torch.randn(5, dtype=torch.float64)),  # another dtype: cast
        lambda: src.__setitem__(3, torch.tensor(True)),
    ]
    for change in changes:
        change()
        copy(dst, src)
        assert_copied(dst, src)


def test_what_the_op_refuses_is_copied_by_torch_from_then_on():
    """Destinations that share memory, a strided one, an integer of another dtype: the op
    refuses; torch's copy writes them, index by index, as `Tensor.copy_` would."""
    storage = torch.zeros(8)
    dst = [storage[:5], torch.tensor(0), storage[3:]]  # overlapping
    src = [torch.arange(5.0), torch.tensor(3), torch.arange(10.0, 15.0)]
    copy = BufferCopy(CPU)
    for _ in range(2):
        copy(dst, src)
        expected = torch.zeros(8)
        expected[:5] = src[0]
        expected[3:] = src[2]
        assert torch.equal(storage, expected) and dst[1].item() == 3
    assert not copy.by_op  # refused once: torch's from then on
    strided = [torch.zeros(10)[::2]]
    BufferCopy(CPU)(strided, [torch.arange(5.0)])
    assert torch.equal(strided[0], torch.arange(5.0))
    count = [torch.tensor(0)]
    BufferCopy(CPU)(count, [torch.tensor(2**31 - 1, dtype=torch.int32)])  # torch casts int32 to int64
    assert count[0].dtype == torch.int64 and count[0].item() == 2**31 - 1


def test_shapes_that_torch_broadcasts_are_broadcast_and_mismatches_raise_torchs_error():
    dst, copy = [torch.zeros(4), torch.tensor(0)], BufferCopy(CPU)
    copy(dst, [torch.tensor([2.0]), torch.tensor(1)])  # torch's copy_ broadcasts
    assert torch.equal(dst[0], torch.full((4,), 2.0)) and dst[1].item() == 1
    with pytest.raises(RuntimeError):
        copy(dst, [torch.zeros(3), torch.tensor(1)])
