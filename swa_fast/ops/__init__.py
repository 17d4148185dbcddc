"""The Python face of the ops: the op table (OP_TABLE, one row per op), backend choice, float
weights, fake kernels of the compiled ops.

    lerp_(avg, src, weight)          avg += weight * (src - avg)
    moments_(mean, sq, src, weight)  mean += w (src - mean); sq += w (src^2 - sq)
    multi_lerp_(avgs, src, weights)  avgs[k] += weights[k] * (src - avgs[k]), K averages in one pass
    copy_(dst, src)                  dst = src (cast; integer and bool tensors bit for bit, own dtype)
    swap_(a, b)                      a <-> b

Every op takes lists of tensors and updates them in place; each side may have its own dtype and
the arithmetic is done in fp32 (fp64 for fp64 destinations), with one rounding into the
destination. `weight` is any real number (numpy scalars included) or a 0-dim floating tensor on the
destination's device (no host synchronisation, CUDA-graph capturable) or on the CPU. A tensor
written in place must be contiguous and share no memory with another tensor of the call, except a
source that is its own destination (the same view at the same index); sources may be strided or
lazily negated views. Every backend follows this contract and raises the same ValueError before
writing anything when a call breaks it.
"""

from __future__ import annotations

import itertools
import numbers
import os
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from . import checks, reference
from .checks import ONE_WEIGHT, WEIGHT_PER_LIST, ListParam, OneWeight, WeightPerList, read, written

try:
    from .. import _C  # registers torch.ops.swa_fast.{lerp_, moments_, copy_, swap_}

    EXTENSION_ERROR: str | None = None
    BUILD_INFO: dict = _C.build_info()
except ImportError as e:
    _C = None
    EXTENSION_ERROR = f"the compiled extension swa_fast._C did not load ({e})"
    BUILD_INFO = {"cuda": False, "cuda_archs": "", "cuda_version": "", "torch_version": ""}
    warnings.warn(
        f"swa_fast: {EXTENSION_ERROR}; falling back to Triton / torch._foreach_* (slower). "
        "Reinstall with `pip install --no-build-isolation .` to build the kernels.",
        stacklevel=2,
    )

from . import triton_kernels  # noqa: E402  (after _C: it adds to the swa_fast op namespace)

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
    elif EXTENSION_ERROR or not BUILD_INFO["cuda"]:
        status["cuda"] = (
            EXTENSION_ERROR or "swa_fast was built without CUDA kernels (no toolkit at build time)"
        )
    if triton_kernels.TRITON_ERROR or not triton_kernels.runs_on(torch.device(device)):
        status["triton"] = triton_kernels.TRITON_ERROR or (
            f"Triton runs CUDA tensors (CPU tensors only with TRITON_INTERPRET=1), these are on {kind}"
        )
    if kind != "cpu":
        status["cpu"] = f"the cpu backend runs CPU tensors, these are on {kind}"
    elif EXTENSION_ERROR:
        status["cpu"] = EXTENSION_ERROR
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
# Read once, at import: os.environ costs most of a microsecond per lookup, more than the eager op's
# own fixed cost. Set it before swa_fast is imported (or pass `backend=`).
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


def _as_weight(weight: Tensor | float | Sequence[float]) -> Tensor:
    # A number becomes a CPU scalar, which the kernels read on the host: no device allocation;
    # multi_lerp_'s numbers a CPU vector. (The extension's eager entry points take the numbers
    # themselves, and do this faster.)
    if isinstance(weight, Tensor):
        return weight
    if isinstance(weight, numbers.Real):
        return torch.tensor(float(weight), dtype=torch.float64)
    return torch.tensor([float(w) for w in weight], dtype=torch.float64)


# --- torch._foreach_* fallbacks -------------------------------------------------------------------
# The same contract as the kernels: arithmetic in each destination's accumulation dtype (fp32,
# fp64 for fp64), the weight rounded to it first, one rounding into the destination.


def _in_acc(tensors: Sequence[Tensor], like: Sequence[Tensor]) -> list[Tensor]:
    """tensors[i] in like[i]'s accumulation dtype: itself where it already is, else a copy (which
    also resolves a lazily negated view)."""
    out = []
    for t, d in zip(tensors, like):
        acc = reference.acc_dtype(d.dtype)
        out.append(t if t.dtype == acc and not t.is_neg() else t.resolve_neg().to(acc))
    return out


def _by_dtype(dst: list[Tensor], end: list[Tensor]) -> list[tuple[torch.dtype, list[Tensor], list[Tensor]]]:
    """(dtype, dst part, end part) for each dtype of `end`: the lists themselves when there is one."""
    dtypes = {e.dtype for e in end}
    if len(dtypes) == 1:
        return [(dtypes.pop(), dst, end)]
    return [
        (dtype, [d for d, e in zip(dst, end) if e.dtype == dtype], [e for e in end if e.dtype == dtype])
        for dtype in dtypes
    ]


def _lerp_into(dst: list[Tensor], end: list[Tensor], weight: Tensor | float) -> None:
    """dst[i] = lerp(dst[i], end[i], weight), end in dst's accumulation dtype: weight 0 keeps dst and
    weight 1 writes end, whatever either holds."""
    if isinstance(weight, Tensor) and weight.device.type != "cpu":
        # A device weight decides on the device: no host synchronisation.
        weights = {dtype: weight.to(dtype) for dtype in {e.dtype for e in end}}
        for d, e in zip(dst, end):
            w, start = weights[e.dtype], d.to(e.dtype)
            d.copy_(torch.where(w == 0, start, torch.where(w == 1, e, torch.lerp(start, e, w))))
        return
    value = weight.item() if isinstance(weight, Tensor) else float(weight)
    for acc, dst_part, end_part in _by_dtype(dst, end):
        # The weight as the kernels see it: rounded to the accumulation dtype first (a subnormal
        # float64 weight is 0 in float32).
        w = value if acc == torch.float64 else torch.tensor(value, dtype=acc).item()
        if w == 1:
            torch._foreach_copy_(dst_part, end_part)
        elif w != 0:
            start = _in_acc(dst_part, dst_part)  # temporaries where dst is bf16/fp16
            torch._foreach_lerp_(start, end_part, w)
            rounded = [(d, s) for d, s in zip(dst_part, start) if s is not d]
            if rounded:
                torch._foreach_copy_([d for d, _ in rounded], [s for _, s in rounded])


def _foreach_lerp(avg: list[Tensor], src: list[Tensor], weight: Tensor | float) -> None:
    _lerp_into(avg, _in_acc(src, avg), weight)


def _foreach_moments(mean: list[Tensor], sq: list[Tensor], src: list[Tensor], weight: Tensor | float) -> None:
    x = _in_acc(src, mean)
    squares = torch._foreach_mul(x, x)  # in fp32: 300^2 overflows fp16; before x may change with mean
    _lerp_into(mean, x, weight)
    _lerp_into(sq, squares, weight)


def _foreach_multi_lerp(avgs: list[Tensor], src: list[Tensor], weights: Tensor | Sequence[float]) -> None:
    lists = _average_lists(avgs, src, weights)[:-1]
    # Every average reads src: one that is an average itself (its own destination) is read from a copy.
    written = {a.data_ptr() for a in avgs}
    src = [s.clone() if s.data_ptr() in written else s for s in src]
    in_acc = {}  # src in the averages' accumulation dtypes: cast once, whatever K
    for k, avg in enumerate(lists):
        key = tuple(reference.acc_dtype(a.dtype) for a in avg)
        if key not in in_acc:
            in_acc[key] = _in_acc(src, avg)
        _lerp_into(avg, in_acc[key], weights[k])


def _foreach_copy(dst: list[Tensor], src: list[Tensor]) -> None:
    torch._foreach_copy_(dst, [s.resolve_neg() for s in src])


def _foreach_swap(a: list[Tensor], b: list[Tensor]) -> None:
    tmp = [t.clone() for t in a]
    torch._foreach_copy_(a, b)
    torch._foreach_copy_(b, tmp)


# --- the op table ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class OpSpec:
    """One op, as every backend, registration and test sees it: its row in OP_TABLE. Its compiled
    kernels are the schema line of csrc/ops.cpp and a functor of csrc/functors.h; its Triton kernel
    is triton_kernels.KERNELS[name]. Its check, launcher and fake kernel follow from the row."""

    name: str  # as in torch.ops.swa_fast and swa_fast's public functions
    params: tuple[ListParam, ...]  # its tensor lists, in order: the written ones first
    weight: OneWeight | WeightPerList | None  # the weight that follows the lists, if any
    reference: Callable[..., None]  # reference.py: per-tensor PyTorch, the tests' oracle
    foreach: Callable[..., None]  # the torch._foreach_* fallback
    triton: Callable[..., None] = field(init=False, repr=False)  # check, then the Triton kernel

    def __post_init__(self) -> None:
        written = [p.written for p in self.params]
        if written != sorted(written, reverse=True):
            raise ValueError(f"OpSpec {self.name}: the written lists must come first, got {self.lists}")
        if any(p.per_weight for p in self.params) != isinstance(self.weight, WeightPerList):
            raise ValueError(f"OpSpec {self.name}: a list per weight and a weight per list go together")
        object.__setattr__(self, "triton", triton_kernels.launcher(self))

    @property
    def lists(self) -> tuple[str, ...]:
        """Its tensor lists' argument names, in order."""
        return tuple(p.name for p in self.params)

    @property
    def written(self) -> int:
        """How many of its lists, from the first, it writes in place."""
        return sum(p.written for p in self.params)

    @property
    def weighted(self) -> bool:
        """Whether a weight follows the lists."""
        return self.weight is not None

    @property
    def weight_name(self) -> str | None:
        """The weight argument's name: `weight`, or multi_lerp_'s 1-D `weights`."""
        return self.weight.name if self.weight is not None else None

    @property
    def lists_per_weight(self) -> bool:
        """Whether an argument holds one list per weight (multi_lerp_'s K lists of averages)."""
        return isinstance(self.weight, WeightPerList)

    def check(self, *args, max_count: int | None = checks.MAX_AVERAGES_PER_PASS) -> None:
        """Rejects what the C++ checks reject, with their messages, before anything is written."""
        checks.check_call(self, args, max_count)

    def kernel_lists(self, *args) -> list[Sequence[Tensor]]:
        """The lists of a call (lists..., weight) as the kernels see them, one dtype per list: the
        op's own, with a list per weight split apart (multi_lerp_'s K lists of averages)."""
        count = len(args[-1]) if self.lists_per_weight else None
        return [part for p, tensors in zip(self.params, args) for part in p.split(tensors, count)]

    @property
    def triton_op(self) -> str:
        """The name of its Triton custom op in torch.ops.swa_fast."""
        return self.name[:-1] + "_triton"

    @property
    def schema(self) -> str:
        """Its signature as csrc/ops.cpp declares it: each written list in an alias set of its own."""
        lists = [
            f"Tensor({chr(ord('a') + k)}!)[] {name}" if k < self.written else f"Tensor[] {name}"
            for k, name in enumerate(self.lists)
        ]
        return f"({', '.join(lists + [f'Tensor {self.weight_name}'] * self.weighted)}) -> ()"


def _average_lists(avgs: Sequence[Tensor], src: Sequence[Tensor], weights) -> list[Sequence[Tensor]]:
    """multi_lerp_'s K lists of averages (concatenated in `avgs`), then `src`."""
    return OP_TABLE["multi_lerp_"].kernel_lists(avgs, src, weights)


# One row per op: its name, its lists (what each admits), its weight, its reference and fallback.
# fmt: off
OP_TABLE: dict[str, OpSpec] = {spec.name: spec for spec in (
    OpSpec("lerp_",
           (written("avg"), read("src")),
           ONE_WEIGHT, reference.lerp_, _foreach_lerp),
    OpSpec("moments_",
           (written("mean"), written("sq", same_dtype=True), read("src")),
           ONE_WEIGHT, reference.moments_, _foreach_moments),
    OpSpec("multi_lerp_",
           (written("avgs", per_weight=True), read("src")),
           WEIGHT_PER_LIST, reference.multi_lerp_, _foreach_multi_lerp),
    OpSpec("copy_",
           (written("dst", integers=True), read("src", integers=True)),
           None, reference.copy_, _foreach_copy),
    OpSpec("swap_",
           (written("a"), written("b", same_dtype=True)),
           None, reference.swap_, _foreach_swap),
)}
# fmt: on

for _spec in OP_TABLE.values():
    triton_kernels.register_op(_spec)
    if _C is not None:
        # Fake kernels: shape/dtype checks only, so torch.compile and fake tensors can trace the ops.
        torch.library.register_fake(f"swa_fast::{_spec.name}")(_spec.check)


# --- the ops --------------------------------------------------------------------------------------
# Compiled backends check in C++ (no Python loop over tensors); the Python backends check here.


_SEQUENCES = (list, tuple)
_COMPILED = frozenset(("cpu", "cuda"))  # the extension's backends
_is_compiling = torch.compiler.is_compiling  # (bound once: the attribute lookups cost per call)


def _as_list(tensors: Sequence[Tensor]) -> list[Tensor] | tuple[Tensor, ...]:
    # Lists and tuples pass as they are (copying 1,000 items costs microseconds); anything else,
    # such as model.parameters(), is gathered once.
    return tensors if type(tensors) in _SEQUENCES else list(tensors)


def _runner(spec: OpSpec) -> Callable[[list[Sequence[Tensor]], tuple, str | None], None]:
    """The body of spec's public function: choose the backend, run the op there. Everything it
    looks up is bound here, once: the managers call it on every update."""
    eager = getattr(_C, spec.name, None)  # the extension's eager fast path
    traced = getattr(torch.ops.swa_fast, spec.name) if _C is not None else None
    triton_op = getattr(torch.ops.swa_fast, spec.triton_op)
    check = spec.check
    python_impls = {"foreach": spec.foreach, "reference": spec.reference}

    # Every microsecond here is paid by each update of every manager: no os.environ, no
    # device.type (a new string each time), no list copies of what is already a list or a tuple.
    def run(lists: list[Sequence[Tensor]], weight: tuple, backend: str | None) -> None:
        for tensors in lists:
            if type(tensors) not in _SEQUENCES:
                lists = [_as_list(t) for t in lists]
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


_run_lerp = _runner(OP_TABLE["lerp_"])
_run_moments = _runner(OP_TABLE["moments_"])
_run_multi_lerp = _runner(OP_TABLE["multi_lerp_"])
_run_copy = _runner(OP_TABLE["copy_"])
_run_swap = _runner(OP_TABLE["swap_"])


def lerp_(
    avg: Sequence[Tensor], src: Sequence[Tensor], weight: Tensor | float, *, backend: str | None = None
) -> None:
    """avg[i] += weight * (src[i] - avg[i]) for every i, in place: SWA with weight 1/(n+1)
    (Izmailov et al. 2018), EMA with weight 1 - decay. Computed as torch.lerp (exact at weights 0
    and 1); weight 0 leaves avg untouched even where src is inf or NaN, weight 1 writes src even
    where avg is."""
    _run_lerp([avg, src], (weight,), backend)


def moments_(
    mean: Sequence[Tensor],
    sq: Sequence[Tensor],
    src: Sequence[Tensor],
    weight: Tensor | float,
    *,
    backend: str | None = None,
) -> None:
    """SWAG's running moments in one pass (Maddox et al. 2019):
    mean += w (src - mean), sq += w (src^2 - sq), src^2 taken in the arithmetic dtype. Weights 0
    and 1 behave as in lerp_ (1 writes src and src^2)."""
    _run_moments([mean, sq, src], (weight,), backend)


def _weight_values(weights) -> Tensor | list:
    """multi_lerp_'s weights as a tensor or a list (a generator or a numpy array read once)."""
    if isinstance(weights, Tensor):
        return weights
    if isinstance(weights, (str, bytes)):
        return weights  # refused by the op's check, with its message
    try:
        return list(weights)
    except TypeError:
        return weights  # not iterable: refused likewise


def _concatenated(avgs, count: int | None) -> list[Tensor] | tuple[Tensor, ...]:
    """The K lists of averages as one list, k-major (as the op takes them); a list already
    concatenated passes as it is."""
    avgs = _as_list(avgs)
    if not avgs or isinstance(avgs[0], Tensor):
        return avgs
    lists = [_as_list(lst) for lst in avgs]
    if count is not None and len(lists) != count:
        raise ValueError(
            f"swa_fast.multi_lerp_: `avgs` has {len(lists)} lists but `weights` has {count} elements; "
            "expected one list of averages per weight"
        )
    for k, lst in enumerate(lists):
        if len(lst) != len(lists[0]):
            raise ValueError(
                f"swa_fast.multi_lerp_: `avgs[{k}]` has {len(lst)} tensors but `avgs[0]` has "
                f"{len(lists[0])}; the lists must have equal lengths"
            )
    return list(itertools.chain.from_iterable(lists))


def multi_lerp_(
    avgs: Sequence[Sequence[Tensor]],
    src: Sequence[Tensor],
    weights: Tensor | Sequence[float],
    *,
    backend: str | None = None,
) -> None:
    """avgs[k][i] += weights[k] * (src[i] - avgs[k][i]) for every average k and every i, in one pass
    that reads each source element once: K EMAs of one model (post-hoc EMA, Karras et al. 2024)
    for the memory traffic of K + 1 tensors read and K written, instead of 2K read and K written.

    Each k is exactly lerp_(avgs[k], src, weights[k]): fp32 arithmetic (fp64 for fp64 averages),
    one rounding, weight 0 leaves that average untouched, weight 1 writes src. Each average may have
    its own dtype per tensor; the averages at one index are updated in one pass when they share a
    dtype, else one pass each.

    Args:
        avgs: K lists of averages, each as long as `src` (or the K lists concatenated,
            avgs[k * len(src) + i], as torch.ops.swa_fast.multi_lerp_ takes them).
        src: the tensors averaged.
        weights: K real numbers, or a 1-D floating tensor of K elements on the CPU (read on the
            host) or on the tensors' device (read by the kernels: no host synchronisation, CUDA-graph
            capturable). The compiled op updates up to 4 averages per pass; more are split into
            passes of at most 4 (each reading src again), after checking the whole call.
        backend: as for lerp_.
    """
    weights = _weight_values(weights)
    if isinstance(weights, Tensor):
        count = weights.shape[0] if weights.dim() == 1 else None
    else:
        count = len(weights) if isinstance(weights, list) else None
    src = _as_list(src)
    flat = _concatenated(avgs, count)
    if count is None or count <= checks.MAX_AVERAGES_PER_PASS:
        _run_multi_lerp([flat, src], (weights,), backend)
        return
    # More averages than one pass holds: the whole call is checked first, so that a bad one writes
    # nothing; a source that is one of the averages is read from a copy by the later passes.
    OP_TABLE["multi_lerp_"].check(flat, src, weights, max_count=None)
    written = {a.data_ptr() for a in flat}
    src = [s.clone() if s.data_ptr() in written else s for s in src]
    n = len(src)
    for first in range(0, count, checks.MAX_AVERAGES_PER_PASS):
        last = min(first + checks.MAX_AVERAGES_PER_PASS, count)
        _run_multi_lerp([flat[first * n : last * n], src], (weights[first:last],), backend)


def copy_(dst: Sequence[Tensor], src: Sequence[Tensor], *, backend: str | None = None) -> None:
    """dst[i] = src[i], cast to dst[i]'s dtype: load or save a snapshot in one pass. Integer and
    bool tensors (a model's `num_batches_tracked`) are copied too, bit for bit, each from a tensor
    of its own dtype."""
    _run_copy([dst, src], (), backend)


def swap_(a: Sequence[Tensor], b: Sequence[Tensor], *, backend: str | None = None) -> None:
    """Exchange the contents of a[i] and b[i] (same dtypes): apply an average and restore."""
    _run_swap([a, b], (), backend)


def check(op: str, *args) -> None:
    """Raises the ValueError the op `op` (its name: "lerp_", ...) would raise for these arguments,
    the op's lists then its weight as it takes them, and returns None if it would run: for a
    caller that checks several calls before making any, so that a bad one writes nothing."""
    OP_TABLE[op].check(*args)


# The drop-in AveragedModel's eager update in one call to the extension (None without it):
# `eager_lerp_then_copy(avg, src, weight, dst, copy_src)` runs lerp_, then copy_ (the model's
# buffers), each checked before it writes, for a tenth of a microsecond less than two calls. A
# lerp_ refused raises; a copy_ refused returns False (the lerp_ done), True when both ran.
eager_lerp_then_copy = getattr(_C, "lerp_then_copy_", None)

_BINDABLE = {"lerp_": lerp_, "moments_": moments_, "copy_": copy_, "swap_": swap_}


class BoundOp:
    """`op` (lerp_, moments_, copy_ or swap_) for a caller that runs it on every update with lists
    of one device it already holds (a manager's flat buffers): the backend is chosen once, here,
    and each call goes straight to the extension's entry point, as the public function does after
    choosing it per call (0.6 us less per call: a third of a small model's op). Same contract, same
    checks before writing. Under torch.compile, or on a backend outside the extension, a call is
    the public function's. Takes lists or tuples. Pickles as its arguments.

    `eager` is the extension's entry point itself (None on a backend outside it): a caller that
    makes several calls in one update asks `torch.compiler.is_compiling()` once and, when it is
    False, calls `eager` straight (a call through the BoundOp costs a quarter of a microsecond more)."""

    __slots__ = ("op", "device", "backend", "eager", "_public")

    def __init__(self, op: str, device: torch.device | str, backend: str | None = None) -> None:
        self.op, self.device, self.backend = op, torch.device(device), backend
        self._public = _BINDABLE[op]
        try:
            chosen = choose_backend(self.device, backend)
        except (RuntimeError, ValueError):
            chosen = None  # the public function raises it at the call, as it always would
        self.eager = getattr(_C, op) if chosen in _COMPILED else None

    def __call__(self, *args) -> None:
        if self.eager is not None and not _is_compiling():
            self.eager(*args)
        else:
            self._public(*args, backend=self.backend)

    def __reduce__(self):
        return BoundOp, (self.op, self.device, self.backend)
