"""The Triton kernels themselves (`@triton.jit`), imported by triton_kernels.py at the first launch,
not at `import swa_fast`: importing Triton costs most of a second, which a run without a GPU need
not pay. Importing this module raises ImportError where Triton is not installed.

Whether the kernels are interpreted (TRITON_INTERPRET=1) is decided by Triton when they are defined
here; triton_kernels.INTERPRETING, read at `import swa_fast`, must agree, so set the variable before
importing swa_fast.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from .triton_kernels import INTERPRETING, ROUNDING_SCALARS

_INTERPRETED = tl.constexpr(INTERPRETING)

TL_DTYPES = {
    torch.float32: tl.float32,
    torch.float64: tl.float64,
    torch.float16: tl.float16,
    torch.bfloat16: tl.bfloat16,
    # copy_'s integer and bool tensors, moved as they are (a bool is a byte)
    torch.bool: tl.uint8,
    torch.uint8: tl.uint8,
    torch.int8: tl.int8,
    torch.int16: tl.int16,
    torch.int32: tl.int32,
    torch.int64: tl.int64,
    torch.uint16: tl.uint16,
    torch.uint32: tl.uint32,
    torch.uint64: tl.uint64,
}


@triton.jit
def _locate_block(block_tensor, block_start, numels, BLOCK: tl.constexpr):
    """(tensor, offsets, mask, whether the block is full, its first element). A block starts at a
    multiple of BLOCK (the hint lets the compiler vectorise); a full block needs no mask, and a
    masked access whose mask the compiler cannot prove constant over a vector is split into single
    elements."""
    pid = tl.program_id(0)
    t = tl.load(block_tensor + pid)
    start = tl.multiple_of(tl.load(block_start + pid), BLOCK)
    offs = start + tl.arange(0, BLOCK)
    n = tl.load(numels + t)
    return t, offs, offs < n, start + BLOCK <= n, start


@triton.jit
def _locate(block_tensor, block_start, numels, BLOCK: tl.constexpr):
    t, offs, mask, _, start = _locate_block(block_tensor, block_start, numels, BLOCK)
    return t, offs, mask, start


@triton.jit
def _ptr(ptrs, t, k: tl.constexpr, K: tl.constexpr, DTYPE: tl.constexpr, ALIGNED: tl.constexpr = False):
    """The k-th of K pointers of tensor t. ALIGNED: the launch found every pointer 16-byte
    aligned, and says so to the compiler, which then loads and stores 128 bits at a time."""
    p = tl.load(ptrs + t * K + k).to(tl.pointer_type(DTYPE))
    if ALIGNED:  # on the pointer: the compiler drops a hint on the integer at the cast
        p = tl.multiple_of(p, 16)
    return p


@triton.jit
def _widened(ptr, offs, mask, DTYPE: tl.constexpr, ACC: tl.constexpr):
    """Elements of the DTYPE tensor at ptr, exactly in ACC.

    bf16 is widened with integer ops on its bits: Triton's interpreter flushes bf16 subnormals
    to zero in its cast, and this gives the same values compiled and interpreted."""
    if DTYPE == tl.bfloat16:
        bits = tl.load(ptr.to(tl.pointer_type(tl.uint16), bitcast=True) + offs, mask=mask)
        return _from_bits(bits, DTYPE, ACC)
    else:
        return tl.load(ptr + offs, mask=mask).to(ACC)


@triton.jit
def _from_bits(bits, DTYPE: tl.constexpr, ACC: tl.constexpr):
    """The DTYPE values whose stored bits are `bits` (an integer of DTYPE's width), exactly in ACC."""
    if DTYPE == tl.bfloat16:
        return (bits.to(tl.uint32) << 16).to(tl.float32, bitcast=True).to(ACC)
    else:
        return bits.to(DTYPE, bitcast=True).to(ACC)


@triton.constexpr_function
def _bits_type(dtype):
    """The unsigned integer of dtype's width, which holds its stored bits."""
    return {8: tl.uint8, 16: tl.uint16, 32: tl.uint32, 64: tl.uint64}[dtype.primitive_bitwidth]


@triton.jit
def _loaded(ptr, offs, mask, DTYPE: tl.constexpr, ACC: tl.constexpr, seen):
    """(_widened's values, their stored bits when the pass counts (`seen` not None), else None).
    Counting loads the bits and widens them, one load as before: the stats compare stored bits,
    which a value's conversion need not keep (a NaN's payload)."""
    if seen is None:
        return _widened(ptr, offs, mask, DTYPE, ACC), None
    else:
        bits = tl.load(ptr.to(tl.pointer_type(_bits_type(DTYPE)), bitcast=True) + offs, mask=mask)
        return _from_bits(bits, DTYPE, ACC), bits


@triton.jit
def _lerp(start, end, w):
    # PyTorch's lerp: exact at both ends, accurate on either side of 0.5; weight 0 keeps start
    # even where end is not finite, weight 1 gives end even where start is not. One fused
    # multiply-add, as the C++ kernels compute it (functors.h: LerpWeight), so that the values, and
    # the bits stochastic rounding stores, are theirs.
    # (Both sides computed and one selected, as before the fma was explicit: selecting the fma's
    # operands instead, as the C++ does, needs more registers, and some variants spilled.)
    d = end - start
    lower = (w < 0.5) & (w > -0.5)  # torch.lerp's side of the weight (a NaN weight: the upper)
    mixed = tl.where(lower, _fma(w, d, start), _fma(w - 1, d, end))
    return tl.where(w == 0, start, tl.where(w == 1, end, mixed))


@triton.jit
def _fma(a, b, c):
    """a * b + c rounded once. Compiled, the instruction (and nothing else is fused: the launches
    turn the compiler's fusing off); interpreted, where Triton's fma rounds twice (numpy), fp32's
    is computed exactly as reference.fma does: in fp64 the product is exact, and the sum, rounded to
    odd by its Two-Sum error, rounds to fp32 correctly."""
    if _INTERPRETED and a.dtype == tl.float32:
        product = a.to(tl.float64) * b.to(tl.float64)
        addend = c.to(tl.float64)
        total = product + addend
        back = total - product
        error = (product - (total - back)) + (addend - back)
        bits = total.to(tl.int64, bitcast=True)
        to_odd = (error != 0) & ((bits & 1) == 0) & (tl.abs(total) < float("inf"))
        stepped = bits + tl.where((error > 0) == (total > 0), 1, -1)
        return tl.where(to_odd, stepped, bits).to(tl.float64, bitcast=True).to(tl.float32)
    else:
        return tl.fma(a, b, c)


@triton.jit
def _rounded(x, DST: tl.constexpr):
    """x (fp32, or fp64 for fp64 destinations) rounded to nearest even in DST, as PyTorch does.

    bf16 is rounded with integer ops on the fp32 bits: Triton's interpreter truncates in its
    fp32 -> bf16 cast, and this gives the same bits compiled and interpreted."""
    if DST == tl.bfloat16:
        bits = x.to(tl.uint32, bitcast=True)
        rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
        rounded = tl.where(x != x, 0x7FC0, rounded)  # NaN stays NaN (the carry could make it inf)
        return rounded.to(tl.uint16).to(tl.bfloat16, bitcast=True)
    else:
        return x.to(DST)


# Stochastic rounding (ops/rounding.py defines the bits; these compute the same ones). An op's
# `rng`: None to round to nearest, else its block's key, made by _rounding_key: (the global index of
# the block's first element, seed's two words, step's two words, the call's first stream).
@triton.jit
def _rounding_key(firsts, t, start, seed_lo, seed_hi, step_lo, step_hi, stream, STOCHASTIC: tl.constexpr):
    if STOCHASTIC:
        # (the scalars come as int32 words: one signature, whatever their values)
        base = tl.load(firsts + t) + start
        seed = seed_lo.to(tl.uint32, bitcast=True), seed_hi.to(tl.uint32, bitcast=True)
        step = step_lo.to(tl.uint32, bitcast=True), step_hi.to(tl.uint32, bitcast=True)
        return base, seed[0], seed[1], step[0], step[1], stream
    else:
        return None


@triton.jit
def _philox_words(g, rng, k: tl.constexpr):
    """Philox4x32-10's four words (Triton's own, the same generator) for the element groups g
    (int64: n >> 3) of written list k."""
    _, seed_lo, seed_hi, step_lo, step_hi, stream = rng
    c1 = (g >> 32).to(tl.uint32) ^ ((stream + k).to(tl.uint32) << 24)
    return tl.philox_impl(
        g.to(tl.uint32), c1, step_lo + tl.zeros_like(c1), step_hi + tl.zeros_like(c1), seed_lo, seed_hi
    )


@triton.jit
def _random_bits(rng, k: tl.constexpr, BLOCK: tl.constexpr, GROUPED: tl.constexpr):
    """The 16 random bits (uint32) of each element of the block, written list k.

    GROUPED (the block's first global index is a multiple of 8): one Philox call per 8 elements,
    its four words cut into eight halves laid out as the elements are (a thread's 8 consecutive
    elements from its one call, by joins, which stay in registers). Otherwise one call per element,
    which keeps the word and half its index selects: 8 times the integer work."""
    base = rng[0]
    if GROUPED:
        w0, w1, w2, w3 = _philox_words((base >> 3) + tl.arange(0, BLOCK // 8), rng, k)
        # element 8g + 4 a + 2 b + h takes the half h of word 2 a + b: join innermost-last
        low = tl.join(tl.join(w0 & 0xFFFF, w2 & 0xFFFF), tl.join(w1 & 0xFFFF, w3 & 0xFFFF))
        high = tl.join(tl.join(w0 >> 16, w2 >> 16), tl.join(w1 >> 16, w3 >> 16))
        return tl.reshape(tl.join(low, high), [BLOCK])
    else:
        n = base + tl.arange(0, BLOCK)
        w0, w1, w2, w3 = _philox_words(n >> 3, rng, k)
        e = (n >> 1) & 3
        word = tl.where(e < 2, tl.where(e == 0, w0, w1), tl.where(e == 2, w2, w3))
        return tl.where((n & 1) == 0, word & 0xFFFF, word >> 16)


@triton.jit
def _stochastic(x, r, DST: tl.constexpr):
    """x (fp32) rounded into DST (bf16 or fp16) with the random bits r, as rounding.py's
    round_stochastically (a non-finite x too: inf stays inf, NaN stays NaN with its sign)."""
    u = x.to(tl.uint32, bitcast=True)
    f = u & 0x7FFFFFFF
    if DST == tl.bfloat16:
        bits = (u + r) >> 16
    else:
        t = (f + (r >> 3)) & 0xFFFFE000
        normal = tl.where(t >= 0x47800000, 0x7C00, (t - 0x38000000) >> 13)
        # below 2^-14, in steps of 2^-24 (q, its whole part and 16 bits of its fraction are exact);
        # larger values are kept out so that no conversion overflows
        q = tl.where(f < 0x38800000, tl.abs(x), 0.0) * 16777216.0
        m = q.to(tl.int32)
        fraction = ((q - m.to(tl.float32)) * 65536.0).to(tl.int32).to(tl.uint32)
        small = m.to(tl.uint32) + ((fraction + r) >> 16)
        bits = tl.where(f >= 0x38800000, normal, small) | ((u >> 31) << 15)
    nan = (f > 0x7F800000).to(tl.uint32)
    if DST == tl.bfloat16:
        not_finite = (u >> 16) | (nan << 6)
    else:
        not_finite = 0x7C00 | (nan << 9) | ((u >> 31) << 15)
    bits = tl.where(f < 0x7F800000, bits, not_finite)
    return bits.to(tl.uint16).to(DST, bitcast=True)


@triton.jit
def _store(ptr, offs, mask, x, DST: tl.constexpr, rng, k: tl.constexpr, ALIGNED: tl.constexpr):
    """x stored into DST at ptr + offs: rounded stochastically as written list k of the call when
    rng is a key and DST is bf16 or fp16, else to nearest. The ALIGNED launch guarantees the
    block's first global index a multiple of 8 (every first is, and so BLOCK). Returns what it
    stored (for the stats)."""
    if rng is not None and (DST == tl.bfloat16 or DST == tl.float16):
        r = _random_bits(rng, k, offs.shape[0], ALIGNED)
        stored = _stochastic(x.to(tl.float32), r, DST)
    else:
        stored = _rounded(x, DST)
    tl.store(ptr + offs, stored, mask=mask)
    return stored


# The stats (pass_stats.py, the definition): `seen` is None where the launch does not count (its
# variant compiles as without stats), else the stats tensor's first row; _count adds one written
# list's block to row k of it.
@triton.jit
def _stats_rows(stats, STATS: tl.constexpr):
    if STATS:
        return stats
    else:
        return None


@triton.jit
def _count(seen, k: tl.constexpr, mask, w, value, old, old_bits, stored):
    """Adds to row k of the stats the block's write of `stored` (its dtype's values, the average's),
    `value` rounded (the accumulation dtype's), over `old` (that dtype's) whose bits were `old_bits`,
    with weight w: a block's counts summed in registers, then one atomic per counter, so that blocks,
    launches (dtype groups) and calls add up in the tensor."""
    if seen is not None:
        # The lanes written: those of the tensor (mask; None: all of the block) if the weight is not
        # 0, which writes nothing in the definition (a device weight decided here, not on the host).
        written = (tl.zeros_like(value) + w) != 0
        if mask is not None:
            written = written & mask
        bits = stored.to(old_bits.dtype, bitcast=True)
        after = _from_bits(bits, stored.dtype, value.dtype)
        # x - x is NaN where x is inf or NaN, else 0
        non_finite = written & ((after - after) != 0)
        update = tl.abs(value - old).to(tl.float32).to(tl.int32, bitcast=True)
        # non-negative fp32 values order as their bits; a NaN difference (bits above inf's) is left out
        update = tl.where(written & (update <= 0x7F800000), update, 0)
        row = seen + 4 * k
        # (relaxed: the counts order nothing; the stream orders the launches that read them)
        tl.atomic_add(row, _total(written), sem="relaxed")
        # unchanged: the same bits. (A deviation from pass_stats.py, which also counts a NaN kept
        # NaN with another payload as unchanged: the comparisons that cover it, on the values or on
        # the bits, made sm_80's and sm_90's bf16 lerp_, moments_ and multi_lerp_ variants spill.)
        tl.atomic_add(row + 1, _total(written & (bits == old_bits)), sem="relaxed")
        tl.atomic_add(row + 2, _total(non_finite), sem="relaxed")
        tl.atomic_max(row + 3, tl.max(update).to(tl.int64), sem="relaxed")


@triton.jit
def _total(flags):
    """How many of the block's flags are set, as the stats' int64 (summed in int32: BLOCK fits)."""
    return tl.sum(flags.to(tl.int32)).to(tl.int64)


# An op's block, given its mask (None: a full block) and the stats' rows (`seen`, None: not
# counting; those that do not count ignore them), all with one signature: _blockwise_kernel
# runs it unmasked on full blocks and masked on a tensor's last one.
# (their shared signature kept on two lines each)
# fmt: off
@triton.jit
def _lerp_block(ptrs, t, offs, mask, w_ptr, rng, seen, DST: tl.constexpr, SRC: tl.constexpr,
                ACC: tl.constexpr, ALIGNED: tl.constexpr):
    avg = _ptr(ptrs, t, 0, 2, DST, ALIGNED)
    a, a_bits = _loaded(avg, offs, mask, DST, ACC, seen)
    s = _widened(_ptr(ptrs, t, 1, 2, SRC, ALIGNED), offs, mask, SRC, ACC)
    w = tl.load(w_ptr).to(ACC)
    value = _lerp(a, s, w)
    _count(seen, 0, mask, w, value, a, a_bits, _store(avg, offs, mask, value, DST, rng, 0, ALIGNED))

@triton.jit
def _moments_block(ptrs, t, offs, mask, w_ptr, rng, seen, DST: tl.constexpr, SRC: tl.constexpr,
                   ACC: tl.constexpr, ALIGNED: tl.constexpr):
    mean = _ptr(ptrs, t, 0, 3, DST, ALIGNED)
    sq = _ptr(ptrs, t, 1, 3, DST, ALIGNED)
    x = _widened(_ptr(ptrs, t, 2, 3, SRC, ALIGNED), offs, mask, SRC, ACC)
    m, m_bits = _loaded(mean, offs, mask, DST, ACC, seen)
    q, q_bits = _loaded(sq, offs, mask, DST, ACC, seen)
    w = tl.load(w_ptr).to(ACC)
    new_mean = _lerp(m, x, w)
    _count(seen, 0, mask, w, new_mean, m, m_bits, _store(mean, offs, mask, new_mean, DST, rng, 0, ALIGNED))
    new_sq = _lerp(q, x * x, w)
    _count(seen, 1, mask, w, new_sq, q, q_bits, _store(sq, offs, mask, new_sq, DST, rng, 1, ALIGNED))

@triton.jit
def _bema_block(ptrs, t, offs, mask, w_ptr, rng, seen, DST: tl.constexpr, SRC: tl.constexpr,
                ACC: tl.constexpr, ALIGNED: tl.constexpr):
    ema = _ptr(ptrs, t, 0, 4, DST, ALIGNED)
    e = _widened(ema, offs, mask, DST, ACC)
    s0 = _widened(_ptr(ptrs, t, 2, 4, DST, ALIGNED), offs, mask, DST, ACC)
    x = _widened(_ptr(ptrs, t, 3, 4, SRC, ALIGNED), offs, mask, SRC, ACC)
    w = tl.load(w_ptr).to(ACC)
    c = tl.load(w_ptr + 1).to(ACC)
    moved = _lerp(e, x, w)
    tl.store(ema + offs, _rounded(moved, DST), mask=mask)
    tl.store(_ptr(ptrs, t, 1, 4, DST, ALIGNED) + offs, _rounded(moved + c * (x - s0), DST), mask=mask)

@triton.jit
def _copy_block(ptrs, t, offs, mask, w_ptr, rng, seen, DST: tl.constexpr, SRC: tl.constexpr,
                ACC: tl.constexpr, ALIGNED: tl.constexpr):
    s = _widened(_ptr(ptrs, t, 1, 2, SRC, ALIGNED), offs, mask, SRC, ACC)
    tl.store(_ptr(ptrs, t, 0, 2, DST, ALIGNED) + offs, _rounded(s, DST), mask=mask)

@triton.jit
def _swap_block(ptrs, t, offs, mask, w_ptr, rng, seen, DST: tl.constexpr, SRC: tl.constexpr,
                ACC: tl.constexpr, ALIGNED: tl.constexpr):
    a = _ptr(ptrs, t, 0, 2, DST, ALIGNED)
    b = _ptr(ptrs, t, 1, 2, SRC, ALIGNED)
    x = tl.load(a + offs, mask=mask)
    y = tl.load(b + offs, mask=mask)
    tl.store(a + offs, y, mask=mask)
    tl.store(b + offs, x, mask=mask)
# fmt: on


# The rounding's scalars are not specialised on their values: a step that changes at every update
# must not compile a kernel per value class.
_ROUNDING_SCALARS = list(ROUNDING_SCALARS)


# Signatures: the launch table's tensors, the rounding's scalars, then the dtypes and variants.
# fmt: off
@triton.jit(do_not_specialize=_ROUNDING_SCALARS)
def _blockwise_kernel(ptrs, block_tensor, block_start, numels, w_ptr, firsts,
                      seed_lo, seed_hi, step_lo, step_hi, stream, stats, OP: tl.constexpr,
                      DST: tl.constexpr, SRC: tl.constexpr, ACC: tl.constexpr, BLOCK: tl.constexpr,
                      ALIGNED: tl.constexpr, STOCHASTIC: tl.constexpr = False, STATS: tl.constexpr = False):
    # OP: an op's block function (_lerp_block, ...); w_ptr is unused by those without a weight, the
    # rounding's arguments by those that do not round, stats by those that do not count. STOCHASTIC:
    # the call asks for stochastic rounding (the launcher sets it only for a bf16 or fp16
    # destination); STATS: it passes a stats tensor (lerp_, moments_), whose rows the block adds to.
    t, offs, mask, full, start = _locate_block(block_tensor, block_start, numels, BLOCK)
    rng = _rounding_key(firsts, t, start, seed_lo, seed_hi, step_lo, step_hi, stream, STOCHASTIC)
    seen = _stats_rows(stats, STATS)
    if full:
        OP(ptrs, t, offs, None, w_ptr, rng, seen, DST, SRC, ACC, ALIGNED)
    else:
        OP(ptrs, t, offs, mask, w_ptr, rng, seen, DST, SRC, ACC, ALIGNED)

@triton.jit(do_not_specialize=_ROUNDING_SCALARS)
def _multi_lerp_kernel(ptrs, block_tensor, block_start, numels, w_ptr, firsts,
                       seed_lo, seed_hi, step_lo, step_hi, stream, stats,
                       DST: tl.constexpr, SRC: tl.constexpr, ACC: tl.constexpr, BLOCK: tl.constexpr,
                       DTYPES: tl.constexpr, ALIGNED: tl.constexpr = False, STOCHASTIC: tl.constexpr = False,
                       STATS: tl.constexpr = False):
    # DTYPES: each list's dtype, the K averages' then the source's. STOCHASTIC: the call asks for
    # stochastic rounding (averages of bf16 or fp16, stream + k, are rounded so). STATS: it passes
    # a stats tensor, row k for average k.
    K: tl.constexpr = len(DTYPES) - 1
    t, offs, mask, start = _locate(block_tensor, block_start, numels, BLOCK)
    rng = _rounding_key(firsts, t, start, seed_lo, seed_hi, step_lo, step_hi, stream, STOCHASTIC)
    seen = _stats_rows(stats, STATS)
    # The source read once, exactly (fp64 stays fp64), then rounded once per average's dtype.
    SRC_WIDE: tl.constexpr = tl.float64 if SRC == tl.float64 else tl.float32
    s = _widened(_ptr(ptrs, t, K, K + 1, SRC, ALIGNED), offs, mask, SRC, SRC_WIDE)
    for k in tl.static_range(K):
        # a function per average: the compiler refuses a constexpr assigned in each iteration
        _multi_lerp_average(ptrs, t, offs, mask, w_ptr, s, rng, seen, k, K, DTYPES[k], BLOCK, ALIGNED)

@triton.jit
def _multi_lerp_average(ptrs, t, offs, mask, w_ptr, s, rng, seen, k: tl.constexpr, K: tl.constexpr,
                        D: tl.constexpr, BLOCK: tl.constexpr, ALIGNED: tl.constexpr):
    A: tl.constexpr = tl.float64 if D == tl.float64 else tl.float32
    avg = _ptr(ptrs, t, k, K + 1, D, ALIGNED)
    w = tl.load(w_ptr + k).to(A)
    # Weight 0 writes nothing to that average, as the compiled kernels. (Broadcast first:
    # the interpreter cannot `and` a scalar with a block.)
    store = mask & ((tl.zeros([BLOCK], A) + w) != 0)
    a, a_bits = _loaded(avg, offs, store, D, A, seen)
    value = _lerp(a, s.to(A), w)
    _count(seen, k, store, w, value, a, a_bits, _store(avg, offs, store, value, D, rng, k, ALIGNED))

@triton.constexpr_function
def _sum_acc(dtypes):
    """weighted_sum_'s arithmetic dtype for lists of these dtypes: fp64 when any is, else fp32."""
    return tl.float64 if any(d == tl.float64 for d in dtypes) else tl.float32

@triton.jit
def _weighted_sum_kernel(ptrs, block_tensor, block_start, numels, w_ptr,
                         DST: tl.constexpr, SRC: tl.constexpr, ACC: tl.constexpr, BLOCK: tl.constexpr,
                         DTYPES: tl.constexpr, ALIGNED: tl.constexpr = False):
    # DTYPES: each list's dtype, dst's then the K sources'. Full blocks unmasked, as _blockwise_kernel.
    t, offs, mask, full, _ = _locate_block(block_tensor, block_start, numels, BLOCK)
    if full:
        _weighted_sum_block(ptrs, t, offs, None, w_ptr, DTYPES, ALIGNED)
    else:
        _weighted_sum_block(ptrs, t, offs, mask, w_ptr, DTYPES, ALIGNED)

@triton.jit
def _weighted_sum_block(ptrs, t, offs, mask, w_ptr, DTYPES: tl.constexpr, ALIGNED: tl.constexpr):
    N: tl.constexpr = len(DTYPES)
    A: tl.constexpr = _sum_acc(DTYPES)  # (ACC is dst's alone)
    # Added in the sources' order from the first term (from 0, -0 would become +0), rounded once.
    acc = tl.load(w_ptr).to(A) * _widened(_ptr(ptrs, t, 1, N, DTYPES[1], ALIGNED), offs, mask, DTYPES[1], A)
    for k in tl.static_range(2, N):
        x = _widened(_ptr(ptrs, t, k, N, DTYPES[k], ALIGNED), offs, mask, DTYPES[k], A)
        acc += tl.load(w_ptr + k - 1).to(A) * x
    dst = _ptr(ptrs, t, 0, N, DTYPES[0], ALIGNED)
    tl.store(dst + offs, _rounded(_once(acc, A, DTYPES[0]), DTYPES[0]), mask=mask)

@triton.jit
def _once(x, A: tl.constexpr, DST: tl.constexpr):
    """x of dtype A, to be rounded into DST by _rounded such that it is rounded once: an fp64 x
    bound for bf16 or fp16 first rounded to fp32 to odd (as csrc/functors.h's to_odd_float)."""
    if A == tl.float64 and (DST == tl.bfloat16 or DST == tl.float16):
        nearest = x.to(tl.float32)
        back = nearest.to(tl.float64)
        inexact = (back != x) & (x == x)
        away = tl.where(x > 0, back > x, back < x) & inexact  # rounded away from zero
        bits = nearest.to(tl.uint32, bitcast=True) - away.to(tl.uint32)
        return tl.where(inexact, bits | 1, bits).to(tl.float32, bitcast=True)
    else:
        return x

# fmt: on


class Blockwise:
    """_blockwise_kernel bound to one op's block function: launched as a kernel is,
    `Blockwise(block)[grid](...)`."""

    kernel = _blockwise_kernel
    arg_names = _blockwise_kernel.arg_names

    def __init__(self, block) -> None:
        self.block = block

    def __getitem__(self, grid):
        return functools.partial(_blockwise_kernel[grid], OP=self.block)


# Each op of ops.OP_TABLE by name.
KERNELS = {
    "lerp_": Blockwise(_lerp_block),
    "moments_": Blockwise(_moments_block),
    "multi_lerp_": _multi_lerp_kernel,
    "bema_": Blockwise(_bema_block),
    "weighted_sum_": _weighted_sum_kernel,
    "copy_": Blockwise(_copy_block),
    "swap_": Blockwise(_swap_block),
}
