"""The machine code of the built CUDA kernels, read without a GPU: the cuobjdump that ships with
Triton disassembles the extension's cubins. For every architecture the build was asked for
(BUILD_INFO's cuda_archs: by default every one the installed torch supports), a cubin must be there
(not only PTX), lerp_ and bema_ must move 128 bits per global load and store on their vector
paths (fp32 and bf16 sources), and so must weighted_sum_ (fp32, bf16 and mixed sources), no
kernel may spill to local memory, and moments_ must round its square on its own (nothing fused but
the lerp); registers per thread are printed (pytest -s)."""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

import pytest

from swa_fast import ops

EXPECT_CUDA = os.environ.get("SWA_FAST_EXPECT_CUDA") == "1"


def built_archs(arch_list: str) -> list[int]:
    """The sm numbers of a TORCH_CUDA_ARCH_LIST as the build recorded it ('7.5;8.0;12.0+PTX' ->
    [75, 80, 120])."""
    found = re.findall(r"(\d+)\.(\d+)", arch_list)
    return sorted({int(major) * 10 + int(minor) for major, minor in found})


# Where there are no CUDA kernels every test below skips (or fails, under SWA_FAST_EXPECT_CUDA=1)
ARCHS = built_archs(ops.BUILD_INFO.get("cuda_archs", "")) or [80, 90]


def _cuobjdump() -> Path | None:
    try:
        import triton
    except ImportError:
        return None
    tool = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    return tool if tool.is_file() else None


def _library() -> Path:
    if ops._C is None or not ops.BUILD_INFO.get("cuda"):
        reason = "the extension has no CUDA kernels (" + (ops.EXTENSION_ERROR or "built without CUDA") + ")"
        if EXPECT_CUDA:
            pytest.fail(reason + ", but SWA_FAST_EXPECT_CUDA=1")
        pytest.skip(reason)
    if _cuobjdump() is None:
        pytest.skip("no cuobjdump: triton (which ships it) is not installed")
    return Path(ops._C.__file__)


def _run(*args: str) -> str:
    return subprocess.run([str(_cuobjdump()), *args], capture_output=True, text=True, check=True).stdout


@pytest.fixture(scope="module", params=ARCHS, ids=lambda a: f"sm_{a}")
def sass(request) -> dict[str, str]:
    """Kernel (mangled name) -> its SASS, for one architecture."""
    text = _run("-sass", "-arch", f"sm_{request.param}", str(_library()))
    parts = re.split(r"^\s*Function : (\S+)\s*$", text, flags=re.M)
    kernels = dict(zip(parts[1::2], parts[2::2]))
    assert kernels, f"no sm_{request.param} SASS in the extension"
    return kernels


NEAREST, ROUNDING = "multi_tensor_kernel", "multi_tensor_rounding_kernel"
COUNTING = "multi_tensor_counting_kernel"  # a call with `stats`: <K, F, R, S>, R NoRounding or a RoundingKey


def _kernel(
    kernels: dict[str, str],
    functor: str,
    dst: str,
    src: str,
    more: str = "",
    kernel: str = NEAREST,
    also: str = "",
) -> str:
    # kernel<K, Functor<dst, src, more...>...>, mangled (Functor: its length, then its name);
    # multi_tensor_rounding_kernel: the stochastic rounding of bf16 / fp16 averages; `also`: a further
    # part of the name (a counting kernel's R)
    found = [
        code
        for name, code in kernels.items()
        if f"{len(kernel)}{kernel}I" in name
        and f"{len(functor)}{functor}I{dst}{src}{more}E" in name
        and also in name
    ]
    assert len(found) == 1, [n for n in kernels if functor in n]
    return found[0]


def _assert_vector_and_tail(code: str, loads: int, stores: int) -> None:
    """At least `loads` / `stores` 128-bit global accesses (the vector path), and the scalar tail's
    global 32-bit ones."""
    assert len(re.findall(r"\bLDG\.E\.128\b", code)) >= loads, code
    assert len(re.findall(r"\bSTG\.E\.128\b", code)) >= stores, code
    assert re.search(r"\bLDG\.E\b", code) and re.search(r"\bSTG\.E\b", code)
    assert not re.search(r"\bLD\.E", code), "generic loads: the compiler lost track of global memory"


@pytest.mark.parametrize("src", ["f", "N3c108BFloat16E"], ids=["fp32", "bf16"])
def test_lerp_moves_128_bits(sass, src):
    # fp32 <- fp32: a 128-bit word of each list; fp32 <- bf16: one of bf16, two of the average
    loads, stores = (2, 1) if src == "f" else (3, 2)
    _assert_vector_and_tail(_kernel(sass, "Lerp", "f", src), loads, stores)


@pytest.mark.parametrize("src", ["f", "N3c108BFloat16E"], ids=["fp32", "bf16"])
def test_bema_moves_128_bits(sass, src):
    # fp32 EMA, out and start: a word each read (EMA, start) and written (EMA, out), and the
    # source's; from bf16, one bf16 word covers two fp32 words of each of the others. (The usual
    # kernel: a host weight that is not 0, kKeepsAtZero false, `Lb0E` in the mangled name.)
    loads, stores = (3, 2) if src == "f" else (5, 4)
    _assert_vector_and_tail(_kernel(sass, "Bema", "f", src, more="Lb0E"), loads, stores)


def test_moments_rounds_its_square_on_its_own(sass):
    """Built with --fmad=false (setup.py), the device code fuses only what the code fuses: moments_'
    src * src is a multiply of its own (FMUL Rd, Rx, Rx), never folded into the lerp's subtraction
    (an FFMA of a register by itself, which nvcc's default makes of some of them), as on the CPU."""
    code = _kernel(sass, "Moments", "f", "f")
    operands = re.findall(r"\b(FMUL|FFMA)\S* R\d+, -?(R\d+), -?(R\d+)\b", code)
    squares = [op for op, a, b in operands if a == b]
    assert "FMUL" in squares and "FFMA" not in squares, code


BF16, FP16 = "N3c108BFloat16E", "N3c104HalfE"


@pytest.mark.parametrize(
    "functor,dst,more,loads,stores",
    [
        ("Lerp", BF16, "", 3, 1),
        ("Lerp", FP16, "", 3, 1),
        ("Moments", BF16, "", 4, 2),
        ("MultiLerp", BF16, "Lb1E", 6, 4),
    ],
    ids=["lerp_bf16", "lerp_fp16", "moments_bf16", "multi_lerp_4_bf16"],
)
def test_stochastic_rounding_moves_128_bits(sass, functor, dst, more, loads, stores):
    # bf16 / fp16 averages of an fp32 source, rounded stochastically (the Philox bits in registers):
    # still a 128-bit word of each average (8 elements) and two of the source per vector, loaded and
    # stored whole. (MultiLerp<4, ...>: its K comes first in the mangled name.)
    name_dst = f"Li4E{dst}" if functor == "MultiLerp" else dst
    code = _kernel(sass, functor, name_dst, "f", more=more, kernel=ROUNDING)
    _assert_vector_and_tail(code, loads, stores)


@pytest.mark.parametrize(
    "functor,dst,src,rounding,loads,stores",
    [
        ("Lerp", "f", "f", "NoRounding", 2, 1),
        ("Lerp", "f", BF16, "NoRounding", 3, 2),
        ("Lerp", BF16, "f", "NoRounding", 3, 1),
        ("Lerp", BF16, "f", "RoundingKey", 3, 1),
        ("Lerp", FP16, "f", "RoundingKey", 3, 1),
        ("Moments", BF16, "f", "RoundingKey", 4, 2),
        ("MultiLerp", f"Li4E{BF16}", "f", "RoundingKey", 6, 4),
    ],
    ids=[
        "lerp_fp32",
        "lerp_fp32_bf16_src",
        "lerp_bf16",
        "lerp_bf16_sr",
        "lerp_fp16_sr",
        "moments_bf16_sr",
        "multi_lerp_4_bf16_sr",
    ],
)
def test_stats_kernels_move_128_bits(sass, functor, dst, src, rounding, loads, stores):
    # A call with `stats` (multi_tensor_counting_kernel, to nearest or rounding stochastically): the
    # counts kept in registers beside the elements, the vectors still moved whole.
    more = "Lb1E" if functor == "MultiLerp" else ""
    code = _kernel(sass, functor, dst, src, more=more, kernel=COUNTING, also=f"{len(rounding)}{rounding}")
    _assert_vector_and_tail(code, loads, stores)


def _sum_kernel(kernels: dict[str, str], sources: str, dst_and_acc: str) -> str:
    # weighted_sum_kernel<S, WeightedSum<D, A>>, mangled
    found = [
        code
        for name, code in kernels.items()
        if f"weighted_sum_kernelI{sources}NS_11WeightedSumI{dst_and_acc}EE" in name
    ]
    assert len(found) == 1, [n for n in kernels if "weighted_sum_kernel" in n]
    return found[0]


@pytest.mark.parametrize(
    "sources,loads,stores",
    [("f", 8, 1), ("N3c108BFloat16E", 8, 2), ("NS_12MixedSourcesE", 8, 2)],
    ids=["fp32", "bf16", "mixed"],
)
def test_weighted_sum_moves_128_bits(sass, sources, loads, stores):
    # Into an fp32 dst, a step a thread: each of the 8 sources of the unrolled loop by 128-bit words
    # (mixed sources: by the words of each dtype's branch), dst by 128-bit words (a bf16 source's
    # word covers two fp32 words of dst).
    _assert_vector_and_tail(_sum_kernel(sass, sources, "ff"), loads, stores)


def test_no_local_memory(sass):
    spilled = [name for name, code in sass.items() if re.search(r"\b(LDL|STL)\b", code)]
    assert not spilled


def test_registers_and_spills():
    usage = _run("-res-usage", str(_library()))
    rows = re.findall(r"Function (\S+):\s*\n\s*REG:(\d+) STACK:(\d+) SHARED:\d+ LOCAL:(\d+)", usage)
    assert rows, usage[:2000]
    assert all(local == "0" and stack == "0" for _, _, stack, local in rows), [r for r in rows if r[3] != "0"]
    print("\nregisters per thread (all architectures in the extension):")
    for name, regs, _, _ in sorted(rows, key=lambda r: r[0]):
        print(f"  {int(regs):3d}  {name}")


def test_a_cubin_for_every_architecture_built():
    listed = _run("-lelf", str(_library()))
    archs = {int(a) for a in re.findall(r"\.sm_(\d+)\.cubin", listed)}
    assert set(ARCHS) <= archs, listed


def test_built_archs_reads_the_recorded_list():
    assert built_archs("7.5;8.0;8.6;9.0;10.0;12.0+PTX") == [75, 80, 86, 90, 100, 120]
    assert built_archs("8.0 9.0+PTX") == [80, 90]
    assert built_archs("") == []
