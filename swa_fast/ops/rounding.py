"""Stochastic rounding of an fp32 result into a bf16 or fp16 average: the one definition every
backend follows bit for bit, written here in PyTorch (the reference and foreach backends use it; the
C++, CUDA and Triton kernels compute the same bits in registers).

The random bits come from Philox4x32-10 (Salmon et al., SC 2011; the generator of cuRAND and of
torch's CUDA generator), a counter-based generator: a pure function of a 128-bit counter and a
64-bit key, so every element's bits are computed where they are needed, with no state, the same for
any backend, thread count, chunking or sharding.

For element n of the whole model's flat average (its index there: `first` of its tensor plus its
index in the tensor), in written list `stream` of the call, at update `step`, with `seed`:

    g        = n >> 3                         (one Philox call serves 8 elements)
    counter  = (g mod 2^32, (g >> 32) xor (stream << 24), step mod 2^32, step >> 32)
    key      = (seed mod 2^32, (seed >> 32) mod 2^32)
    words    = philox4x32_10(counter, key)
    r        = 16 bits of words[(n >> 1) & 3]: the low half for even n, the high half for odd n

and the fp32 value x is rounded with r as follows (u: x's bits, f = u & 0x7fffffff, sign = u >> 31):

    x not finite:   bf16: (u >> 16) | 0x40 for NaN (inf stays inf; NaN keeps its sign and stays NaN)
                    fp16: 0x7c00 for inf, 0x7e00 for NaN, with the sign
    bf16:           (u + r) >> 16          the 16 dropped bits plus r, truncated: up with probability
                                           (dropped bits) / 2^16, exactly
    fp16, f >= 2^-14 (normal range):
                    t = (f + (r >> 3)) & ~0x1fff          the 13 dropped bits, likewise
                    bits = 0x7c00 if t >= 2^16 (as fp32 bits 0x47800000) else (t - 0x38000000) >> 13
    fp16, f <  2^-14 (subnormal range, steps of 2^-24):
                    q = |x| * 2^24 (exact), m = trunc(q), F = trunc((q - m) * 2^16) (exact)
                    bits = m + ((F + r) >> 16)            up with probability F / 2^16
    then the sign bit set from x.

x is the op's fp32 result, the same bits on every backend: torch.lerp's formula (weight or weight - 1,
by its side of 0.5) with one fused multiply-add, weight * (end - start) + start or (weight - 1) *
(end - start) + end, rounded once, every other operation rounded on its own (moments_' square
included). The C++ and CUDA kernels write the fma and are built to fuse nothing else (setup.py), the
Triton kernels likewise (compiled: fusing turned off at launch; interpreted: computed exactly in
fp64), the reference and foreach backends compute it exactly in fp64 (reference.fma). Where no
`rounding` is given, the reference and foreach backends use torch.lerp, which fuses or not by its
CPU kernel (fused in its AVX2 and AVX-512 code).

A value the format holds exactly is never changed (its dropped bits are zero). The expected rounded
value is x exactly for bf16 and for fp16's normal range, and within 2^-16 of a step (2^-40) in
fp16's subnormal range, whose bits below 2^-40 are not drawn.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor
from torch._subclasses.fake_tensor import FakeTensor

_MASK = 0xFFFFFFFF
_ROUND_A, _ROUND_B = 0xD2511F53, 0xCD9E8D57  # Philox4x32's multipliers
_KEY_A, _KEY_B = 0x9E3779B9, 0xBB67AE85  # its key increments (the golden ratio, sqrt(3) - 1)
ROUNDS = 10
# The written list's number (`stream`) goes in the top byte of the counter's second word.
MAX_STREAMS = 256
STOCHASTIC_DTYPES = (torch.bfloat16, torch.float16)


def _mulhilo(a: Tensor, b: int) -> tuple[Tensor, Tensor]:
    """The high and low 32 bits of a * b, a an int64 tensor of 32-bit values, b a 32-bit constant:
    in 16-bit pieces of b, so that no product leaves int64."""
    low_part = a * (b & 0xFFFF)  # < 2^48
    high_part = a * (b >> 16)  # < 2^48
    partial = low_part + ((high_part & 0xFFFF) << 16)  # < 2^49
    return ((high_part >> 16) + (partial >> 32)) & _MASK, partial & _MASK


def philox4x32_10(counter: Sequence[Tensor], key: tuple[int, int]) -> list[Tensor]:
    """Philox4x32-10 of each element's counter (four int64 tensors of 32-bit words) under one key:
    four int64 tensors of 32-bit words."""
    c0, c1, c2, c3 = counter
    k0, k1 = key
    for _ in range(ROUNDS):
        hi0, lo0 = _mulhilo(c0, _ROUND_A)
        hi1, lo1 = _mulhilo(c2, _ROUND_B)
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
        k0, k1 = (k0 + _KEY_A) & _MASK, (k1 + _KEY_B) & _MASK
    return [c0, c1, c2, c3]


def random_bits(index: Tensor, seed: int, step: int, stream: int) -> Tensor:
    """The 16 random bits of each element (int64, 0 to 65535) at the flat indices `index` (int64)."""
    seed &= (1 << 64) - 1  # a negative seed as its two's complement bits, as int64 holds it
    g = index >> 3
    zeros = torch.zeros_like(g)
    counter = [g & _MASK, (g >> 32) ^ (stream << 24), zeros + (step & _MASK), zeros + (step >> 32)]
    words = torch.stack(philox4x32_10(counter, (seed & _MASK, seed >> 32)), dim=-1)
    word = words.gather(-1, ((index >> 1) & 3).unsqueeze(-1)).squeeze(-1)
    return (word >> ((index & 1) * 16)) & 0xFFFF


def round_stochastically(x: Tensor, dtype: torch.dtype, r: Tensor) -> Tensor:
    """x (fp32) rounded into `dtype` (bf16 or fp16) with the random bits r (int64, as x's shape), as
    the module docstring defines it."""
    u = x.view(torch.int32).to(torch.int64) & _MASK
    f, negative = u & 0x7FFFFFFF, u >= 0x80000000
    if dtype == torch.bfloat16:
        bits = (u + r) >> 16
    else:
        t = (f + (r >> 3)) & ~0x1FFF
        normal = torch.where(t >= 0x47800000, 0x7C00, (t - 0x38000000) >> 13)
        q = x.abs() * 16777216.0
        m = q.trunc()
        small = m.to(torch.int64) + ((((q - m) * 65536.0).trunc().to(torch.int64) + r) >> 16)
        bits = torch.where(f >= 0x38800000, normal, small) | (negative.to(torch.int64) << 15)
    nan = (f > 0x7F800000).to(torch.int64)
    if dtype == torch.bfloat16:
        not_finite = (u >> 16) | (nan << 6)  # (a NaN whose payload is in the dropped bits stays NaN)
    else:
        not_finite = 0x7C00 | (nan << 9) | (negative.to(torch.int64) << 15)
    bits = torch.where(f >= 0x7F800000, not_finite, bits)
    return torch.where(bits >= 0x8000, bits - 0x10000, bits).to(torch.int16).view(dtype)


@dataclass(frozen=True)
class StochasticRounding:
    """Stochastic rounding for lerp_, moments_ and multi_lerp_ (their `rounding=`): the seed, the
    update's step (a new draw at every step), the stream of the call's first written list, and each
    index's `first`, its tensor's first element in the whole flat average (None: the call's tensors
    laid end to end, in order). The ops take it as a tensor (`tensor`); `of` parses one."""

    seed: int = 0
    step: int = 0
    stream: int = 0
    firsts: tuple[int, ...] | None = None

    @classmethod
    def of(cls, rounding: Tensor) -> StochasticRounding:
        values = rounding.tolist()
        return cls(values[0], values[1], values[2], tuple(values[3:]))

    def tensor(self, tensors: Sequence[Tensor]) -> Tensor:
        """The op's `rounding` argument for a call whose indices hold `tensors` (its source list)."""
        firsts = consecutive_firsts(tensors) if self.firsts is None else self.firsts
        return rounding_tensor(self.seed, self.step, firsts, self.stream)

    def store(self, dst: Tensor, value: Tensor, i: int, written_list: int = 0) -> None:
        """dst (index i of written list `written_list` of the call) set to value (its accumulation
        dtype), rounded stochastically where dst is bf16 or fp16, else as a copy rounds."""
        if dst.dtype not in STOCHASTIC_DTYPES or dst.numel() == 0:
            dst.copy_(value)
            return
        index = self.firsts[i] + torch.arange(dst.numel(), device=dst.device).view(dst.shape)
        r = random_bits(index, self.seed, self.step, self.stream + written_list)
        dst.copy_(round_stochastically(value.to(torch.float32), dst.dtype, r))


def rounding_tensor(seed: int, step: int, firsts: Sequence[int], stream: int = 0) -> Tensor:
    """The `rounding` argument of lerp_, moments_ and multi_lerp_ for stochastic rounding: a 1-D int64
    CPU tensor (seed, step, stream, then each index's first element in the flat average)."""
    return torch.tensor([seed, step, stream, *firsts], dtype=torch.int64)


def consecutive_firsts(tensors: Sequence[Tensor]) -> list[int]:
    """Each tensor's first element when the tensors are laid end to end, in order: the flat index a
    list that is a whole model numbers its elements by."""
    firsts, at = [], 0
    for t in tensors:
        firsts.append(at)
        at += t.numel()
    return firsts


def check_rounding(op: str, rounding, count: int, written_lists: int) -> None:
    """An op's `rounding` argument: None (round to nearest), or a 1-D int64 CPU tensor (seed, step,
    stream, then the first element index of each of the `count` indices); the C++ check's messages."""
    if rounding is None:
        return
    if not isinstance(rounding, Tensor):
        raise ValueError(
            f"swa_fast.{op}: `rounding` must be None or a 1-D int64 tensor on the CPU (seed, step, stream, "
            f"then each index's first element), got {type(rounding).__name__}"
        )
    if rounding.dtype != torch.int64 or rounding.device.type != "cpu":
        raise ValueError(
            f"swa_fast.{op}: `rounding` must be an int64 tensor on the CPU, got {rounding.dtype} on "
            f"{rounding.device}"
        )
    if rounding.dim() != 1 or rounding.shape[0] != 3 + count:
        raise ValueError(
            f"swa_fast.{op}: `rounding` must be a 1-D tensor of {3 + count} elements (seed, step, stream, "
            f"then the first element index of each of the {count} tensors), got shape {list(rounding.shape)}"
        )
    if not isinstance(rounding, FakeTensor):  # (a fake tensor, traced, has no values to read)
        _check_rounding_values(op, StochasticRounding.of(rounding), written_lists)


def _check_rounding_values(op: str, key: StochasticRounding, written_lists: int) -> None:
    if key.step < 0:
        raise ValueError(f"swa_fast.{op}: `rounding` holds step {key.step}; expected a step of at least 0")
    if not 0 <= key.stream <= MAX_STREAMS - written_lists:
        raise ValueError(
            f"swa_fast.{op}: `rounding` holds stream {key.stream}; expected 0 to "
            f"{MAX_STREAMS - written_lists} for a call that writes {written_lists} lists"
        )
    for i, first in enumerate(key.firsts):
        if first < 0:
            raise ValueError(
                f"swa_fast.{op}: `rounding` holds {first} as the first element index of tensor {i}; "
                "expected at least 0"
            )
