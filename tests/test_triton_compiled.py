"""Every Triton kernel the ops launch, compiled for sm_80 and sm_90 as the GPU would compile it:
the interpreter the other tests use accepts things the compiler rejects.

The variants are the launchers' own: each op of ops.OP_TABLE with a Triton kernel is launched
(launch recorded, not run) on conftest.make_case's arguments for every pair of float dtypes, with
16-byte aligned tensors and with misaligned ones, and every distinct (signature, constexprs) seen is
compiled by tests/compile_triton_kernels.py in a process without TRITON_INTERPRET; lerp_, moments_
and multi_lerp_ are launched again with stochastic rounding into bf16 and fp16, and with stats (the
STATS variants: as wide as those without, their counts added by atomics). The PTX of the
lerp_ and weighted_sum_ kernels on aligned tensors must move 128 bits per access (fp32 and bf16
sources), so must the stochastic lerp_ and moments_ ones, with one Philox call per 8 elements and
no shared memory; no kernel may use local memory, or leave a multiply and an add for the
compiler to fuse (the lerp's one fma is written). Registers per thread are printed (pytest -s).
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import PER_LIST_WEIGHTS, make_case

from swa_fast import ops
from swa_fast.ops import triton_kernels
from swa_fast.ops.rounding import rounding_tensor
from swa_fast.ops.triton_kernels import ROUNDING_SCALARS

FLOATS = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
POINTER_TYPES = {torch.int64: "*i64", torch.float32: "*fp32", torch.float64: "*fp64"}
SHAPES = [(triton_kernels.BLOCK + 100,), (3,)]  # a full block and a partial one
# copy_'s integer dtypes compiled here: 8, 4 and 1 bytes (bool is moved as uint8)
COPIED_INTEGERS = (torch.int64, torch.int32, torch.bool)
ROUNDING_OPS = ("lerp_", "moments_", "multi_lerp_")
ROUNDED = (torch.bfloat16, torch.float16)
LAUNCH_OPTIONS = (
    "num_warps",
    "num_stages",
    "num_ctas",
    "enable_fp_fusion",
)  # launch keywords that are not kernel arguments

pytestmark = pytest.mark.skipif(triton_kernels.triton is None, reason=str(triton_kernels.TRITON_ERROR))


def _name(value):
    if isinstance(value, tuple):
        return [_name(v) for v in value]
    dtype_name = getattr(value, "name", None)  # a Triton dtype
    return dtype_name if isinstance(dtype_name, str) else value


def _misaligned(t: torch.Tensor) -> torch.Tensor:
    """t's values in a tensor that starts one element past a 16-byte boundary."""
    out = torch.empty(t.numel() + 1, dtype=t.dtype)[1:].view(t.shape)
    return out.copy_(t)


def launch_variants() -> list[dict]:
    """Each distinct launch the Triton launchers make for the op cases, as compile_triton_kernels
    takes them."""
    seen: dict[str, dict] = {}
    with recording_launches(seen):
        launch_float_cases()
        launch_integer_copies()
        launch_rounding_cases()
        launch_stats_cases()
    return list(seen.values())


@contextlib.contextmanager
def recording_launches(seen: dict[str, dict]):
    """Inside, the launchers' kernels are recorded into `seen` (by their JSON), not run."""
    ops_of = {id(k): op for op, k in triton_kernels.KERNELS.items()}
    launch = triton_kernels._launch
    try:
        triton_kernels._launch = lambda kernel, *a, **k: launch(
            Recorder(ops_of[id(kernel)], kernel.arg_names, seen), *a, **k
        )
        yield
    finally:
        triton_kernels._launch = launch


class Recorder:
    """Stands for a kernel: `recorder[grid](*args, **constexprs)` records the variant it would
    compile."""

    def __init__(self, op: str, arg_names: list[str], seen: dict[str, dict]) -> None:
        self.op, self.arg_names, self.seen = op, arg_names, seen

    def __getitem__(self, grid):
        return self.record

    def record(self, *args, **constexprs) -> None:
        options = {k: constexprs.pop(k) for k in LAUNCH_OPTIONS if k in constexprs}
        signature = {n: POINTER_TYPES[a.dtype] for n, a in zip(self.arg_names, args)}
        # the rounding's and the stats' arguments, given by name: the firsts' table and the stats
        # (pointers) and the rounding's int32 scalars
        for name in ["firsts", *ROUNDING_SCALARS, "stats"]:
            if name in constexprs:
                value = constexprs.pop(name)
                signature[name] = POINTER_TYPES[value.dtype] if name in ("firsts", "stats") else "i32"
        variant = {
            "op": self.op,
            "signature": signature,
            "constexprs": {k: _name(v) for k, v in constexprs.items()},
            "options": options,
        }
        self.seen.setdefault(json.dumps(variant, sort_keys=True), variant)


def launch_float_cases() -> None:
    """Each op with a Triton kernel on make_case's tensors, every pair of float dtypes, aligned and
    not."""
    for op, spec in ops.OP_TABLE.items():
        if op not in triton_kernels.KERNELS:
            continue
        for dst, src in itertools.product(FLOATS, FLOATS):
            lists, extra = make_case(op, SHAPES, dst, src)
            for shift in (False, True):
                try:
                    spec.triton(*placed(lists, shift), *extra)
                except ValueError:
                    continue  # a dtype pair the op refuses


def launch_integer_copies() -> None:
    """copy_'s integer and bool tensors, in their own dtype, aligned and not."""
    for dtype in COPIED_INTEGERS:
        lists = [[torch.zeros(s, dtype=dtype) for s in SHAPES] for _ in range(2)]
        for shift in (False, True):
            ops.OP_TABLE["copy_"].triton(*placed(lists, shift))


def launch_rounding_cases() -> None:
    """The ops that round stochastically, into bf16 and fp16 from fp32 and bf16 sources: aligned
    (firsts multiples of 8: one Philox call per 8 elements), misaligned pointers and aligned
    pointers with a first that is not a multiple of 8 (one call per element)."""
    for op in ROUNDING_OPS:
        spec = ops.OP_TABLE[op]
        for dst, src in itertools.product(ROUNDED, (torch.float32, torch.bfloat16)):
            lists, extra = make_case(op, SHAPES, dst, src)
            for shift, first in ((False, 0), (True, 0), (False, 1)):
                firsts = [first + 8 * triton_kernels.BLOCK * i for i in range(len(lists[-1]))]
                spec.triton(*placed(lists, shift), *extra, rounding_tensor(1, 2, firsts))


def launch_stats_cases() -> None:
    """The ops that count (stats=), each float average dtype from an fp32 source (and from bf16 into
    bf16), aligned and not, to nearest; into bf16 and fp16 stochastically too, on aligned tensors."""
    for op in ROUNDING_OPS:
        spec = ops.OP_TABLE[op]
        pairs = [(dst, torch.float32) for dst in FLOATS] + [(torch.bfloat16, torch.bfloat16)]
        for dst, src in pairs:
            lists, extra = make_case(op, SHAPES, dst, src)
            stats = torch.zeros(spec.kernel_written(*lists, *extra), 4, dtype=torch.int64)
            for shift in (False, True):
                spec.triton(*placed(lists, shift), *extra, None, stats)
            if dst in ROUNDED:
                firsts = [8 * triton_kernels.BLOCK * i for i in range(len(lists[-1]))]
                spec.triton(*lists, *extra, rounding_tensor(1, 2, firsts), stats)


def placed(lists: list[list[torch.Tensor]], misaligned: bool) -> list[list[torch.Tensor]]:
    return [[_misaligned(t) for t in lst] for lst in lists] if misaligned else lists


@pytest.fixture(scope="module")
def compiled(tmp_path_factory) -> list[dict]:
    variants = launch_variants()
    ops_launched = {v["op"] for v in variants}
    assert ops_launched == set(triton_kernels.KERNELS) & set(ops.OP_TABLE), ops_launched
    assert {v["constexprs"].get("ALIGNED") for v in variants} == {True, False}
    tmp = tmp_path_factory.mktemp("triton_compiled")
    (tmp / "variants.json").write_text(json.dumps(variants))
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp / "cache")  # nothing cached in the checkout or the home folder
    script = Path(__file__).with_name("compile_triton_kernels.py")
    out = subprocess.run(
        [sys.executable, str(script), str(tmp / "variants.json"), str(tmp / "results.json")],
        env=env,
        capture_output=True,
        text=True,
        timeout=1200,
    )
    assert out.returncode == 0, out.stderr[-4000:]
    return json.loads((tmp / "results.json").read_text())


def _label(r: dict) -> str:
    c = r["constexprs"]
    dtypes = "/".join(map(str, c.get("DTYPES") or (c["DST"], c["SRC"])))
    stochastic = " stochastic" if c.get("STOCHASTIC") else ""
    stats = " stats" if c.get("STATS") else ""
    return f"{r['op']} {dtypes} aligned={c['ALIGNED']}{stochastic}{stats} sm_{r['arch']}"


def test_every_variant_compiles(compiled):
    failed = [f"{_label(r)}: {r['error']}" for r in compiled if r["error"]]
    assert not failed, "\n".join(failed)
    print(f"\n{len(compiled)} Triton kernels compiled (sm_80 and sm_90); registers per thread:")
    for r in compiled:
        wide = f"{r['ld_v4']} ld.global.v4, {r['st_v4']} st.global.v4"
        print(f"  {_label(r):61s} {r['registers']} registers, {wide}")


def test_a_multiply_and_an_add_are_fused_only_where_a_kernel_says_so(compiled):
    """The launches turn the compiler's fusing off: every multiply and add is rounded on its own
    (.rn, which ptxas does not fuse), as the C++ kernels' are, and the lerp's one fma is there."""
    fusable = [_label(r) for r in compiled if not r["error"] and r["fusable"]]
    assert not fusable
    lerps = [r for r in compiled if r["op"] in ROUNDING_OPS and not r["error"]]
    assert lerps and all(r["fma"] > 0 for r in lerps)


def test_no_local_memory(compiled):
    spilled = [_label(r) for r in compiled if not r["error"] and r["local"]]
    assert not spilled


@pytest.mark.parametrize("src", ["fp32", "bf16"])
@pytest.mark.parametrize("op", ["lerp_", "weighted_sum_"])
def test_aligned_lerp_and_weighted_sum_move_128_bits(compiled, op, src):
    variants = [
        r
        for r in compiled
        if r["op"] == op
        and r["constexprs"]["DST"] == "fp32"
        and r["constexprs"]["SRC"] == src
        and not r["error"]
    ]
    assert {r["arch"] for r in variants} == {80, 90}
    for r in variants:
        if r["constexprs"]["ALIGNED"]:
            # the full blocks: two lists loaded (lerp_'s average and source, weighted_sum_'s two
            # sources), one stored, 16 bytes at a time
            assert r["ld_v4"] >= 2 and r["st_v4"] >= 1, _label(r)
        else:
            assert r["ld_v4"] == 0 and r["st_v4"] == 0, _label(r)  # misaligned: no wide access


def _stochastic(compiled, op: str, aligned: bool) -> list[dict]:
    return [
        r
        for r in compiled
        if r["op"] == op
        and r["constexprs"].get("STOCHASTIC")
        and not r["constexprs"].get("STATS")
        and r["constexprs"]["ALIGNED"] == aligned
    ]


@pytest.mark.parametrize("op", ["lerp_", "moments_"])
def test_aligned_stochastic_rounding_moves_128_bits_with_a_philox_call_per_8_elements(compiled, op):
    """The stochastic variants of lerp_ and moments_ on aligned tensors with firsts multiples of 8:
    as wide as the nearest ones (every list loaded 16 bytes at a time, each written list stored so),
    the random bits spread over a thread's 8 elements in registers (no shared memory), one Philox
    call (20 high multiplies) per 8 elements and written list in each of the full and the masked
    block's paths; the unaligned variants call Philox per element, 8 times as often."""
    written = 2 if op == "moments_" else 1
    aligned = _stochastic(compiled, op, True)
    assert {r["arch"] for r in aligned} == {80, 90} and len(aligned) == 8
    for r in aligned:
        twin = {**r["constexprs"], "STOCHASTIC": False}
        nearest = [n for n in compiled if (n["op"], n["arch"], n["constexprs"]) == (op, r["arch"], twin)]
        assert len(nearest) == 1, _label(r)
        assert r["ld_v4"] >= nearest[0]["ld_v4"] >= written + 1 and r["st_v4"] >= written, _label(r)
        assert r["shared"] == 0 and 0 < r["mul_hi"] <= 2 * 20 * written, _label(r)
    for r in _stochastic(compiled, op, False):
        assert r["mul_hi"] > 6 * 2 * 20 * written, _label(r)


def _twin(compiled, r: dict, **constexprs) -> dict:
    """The variant compiled for r's op and target with r's constexprs but `constexprs`."""
    twin = {**r["constexprs"], **constexprs}
    found = [n for n in compiled if (n["op"], n["arch"], n["constexprs"]) == (r["op"], r["arch"], twin)]
    assert len(found) == 1, _label(r)
    return found[0]


@pytest.mark.parametrize("op", ROUNDING_OPS)
def test_stats_variants_are_as_wide_as_those_without_and_count_with_atomics(compiled, op):
    """Every STATS variant (stats=) moves as many 128-bit words as its twin without stats (aligned
    lerp_ and moments_: every list loaded 16 bytes at a time, each written list stored so), and adds
    its counts with 4 atomics per written list in each of the full and the masked block's paths
    (multi_lerp_: one path); the variants without stats have no atomic."""
    counting = [r for r in compiled if r["op"] == op and r["constexprs"].get("STATS")]
    # fp32, fp64, fp16, bf16 averages (bf16 also from bf16) aligned and not, and the three bf16 and
    # fp16 ones rounded stochastically
    assert {r["arch"] for r in counting} == {80, 90} and len(counting) == 2 * (2 * 5 + 3), len(counting)
    written = {"lerp_": 1, "moments_": 2, "multi_lerp_": len(PER_LIST_WEIGHTS)}[op]
    paths = 1 if op == "multi_lerp_" else 2
    for r in counting:
        twin = _twin(compiled, r, STATS=False)
        assert r["ld_v4"] >= twin["ld_v4"] and r["st_v4"] >= twin["st_v4"], _label(r)
        assert 0 < r["atomics"] <= 4 * written * paths, _label(r)
        if op != "multi_lerp_" and r["constexprs"]["ALIGNED"] and r["constexprs"]["DST"] != "fp64":
            assert r["ld_v4"] >= written + 1 and r["st_v4"] >= written, _label(r)
    assert all(r["atomics"] == 0 for r in compiled if not r["constexprs"].get("STATS")), op
