"""The CUDA launcher's index math on the host: tests/launch_plan_emulation.cpp compiles
csrc/cuda/launch_plan.h (the header the kernel runs) into a host program that runs it over an
emulated grid; here it is given lists of tensors and its element counts are compared with ones
worked out independently. Needs a C++ compiler and torch's headers, not a GPU."""

from __future__ import annotations

import os
import random
import shutil
import subprocess
import sysconfig
from pathlib import Path

import pytest
from torch.utils.cpp_extension import include_paths

ROOT = Path(__file__).resolve().parent.parent
CHUNK = 16 * 1024  # plan::kChunkElems
VEC_BYTES = 16
GRID = 132 * 8  # the launcher's grid on an H100 / H200: 8 blocks per multiprocessor


def _compiler() -> str | None:
    for name in (os.environ.get("CXX"), sysconfig.get_config_var("CXX"), "c++", "g++", "clang++"):
        if name and shutil.which(name.split()[0]):
            return name.split()[0]
    return None


@pytest.fixture(scope="module")
def emulator(tmp_path_factory) -> Path:
    cxx = _compiler()
    if cxx is None:
        pytest.skip("no C++ compiler on PATH")
    exe = tmp_path_factory.mktemp("launch_plan") / "emulate"
    source = ROOT / "tests" / "launch_plan_emulation.cpp"
    includes = [f"-I{p}" for p in include_paths()[:1]]  # c10/macros only
    subprocess.run(
        [cxx, "-std=c++17", "-O2", "-Wall", "-Wextra", "-Werror", *includes, str(source), "-o", str(exe)],
        check=True,
        capture_output=True,
    )
    return exe


def _vector_elems(elem_bytes: list[int]) -> int:
    return VEC_BYTES // min(elem_bytes)


def _expected(numels: list[int], addresses: list[list[int]], vec: int) -> tuple[int, int, int]:
    """(vector elements, scalar elements, chunks) as the plan promises them: a chunk of a tensor
    whose every list starts 16-byte aligned moves its whole vectors as vectors."""
    vectors = scalars = chunks = 0
    for numel, addr in zip(numels, addresses):
        aligned = all(a % VEC_BYTES == 0 for a in addr)
        for begin in range(0, numel, CHUNK):
            length = min(CHUNK, numel - begin)
            chunks += 1
            v = length // vec * vec if aligned else 0
            vectors += v
            scalars += length - v
    return vectors, scalars, chunks


def _aligned_addresses(numels: list[int], elem_bytes: list[int]) -> list[list[int]]:
    """Each list's tensors laid out one after another from 1 MiB, each starting 16-byte aligned."""
    out, at = [], [1 << 20] * len(elem_bytes)
    for n in numels:
        out.append(list(at))
        at = [a + (n * b + 255) // 256 * 256 + 256 for a, b in zip(at, elem_bytes)]
    return out


def _run(
    emulator: Path, cases: list[tuple[list[int], list[int], list[list[int]], int]], vec_unroll: int = 2
) -> list[str]:
    """Runs (element sizes, numels, addresses, blocks) cases, each thread taking `vec_unroll`
    vectors at a time; checks each against _expected."""
    lines = []
    for elem_bytes, numels, addresses, blocks in cases:
        lines.append(f"{len(elem_bytes)} {_vector_elems(elem_bytes)} {vec_unroll} {blocks}")
        lines.append(" ".join(map(str, elem_bytes)))
        lines.append(str(len(numels)))
        lines += [f"{n} {' '.join(map(str, a))}" for n, a in zip(numels, addresses)]
    out = subprocess.run(
        [str(emulator)], input="\n".join(lines) + "\n", capture_output=True, text=True, timeout=300
    )
    results = out.stdout.splitlines()
    assert out.returncode == 0, results[-1:] or out.stderr
    assert len(results) == len(cases)
    for (elem_bytes, numels, addresses, _), line in zip(cases, results):
        vectors, scalars, chunks = _expected(numels, addresses, _vector_elems(elem_bytes))
        assert line == f"ok vectors={vectors} scalars={scalars} chunks={chunks}", (elem_bytes, line)
    return results


FP32, BF16, FP64 = 4, 2, 8
LIST_KINDS = [
    [FP32, FP32],  # lerp_ fp32 <- fp32
    [FP32, BF16],  # lerp_ fp32 <- bf16: 8 elements a vector, two 128-bit words of the average
    [BF16, BF16],
    [FP64, FP32],
    [FP32, FP32, BF16],  # moments_
    [FP32, FP32, FP32, FP32, BF16],  # multi_lerp_ with four averages
]


def _grids(n_chunks: int) -> list[int]:
    # one block doing every chunk, a few striding, and the launcher's own grid
    return sorted({1, 3, max(1, min(n_chunks, GRID))})


@pytest.mark.parametrize("elem_bytes", LIST_KINDS, ids=lambda b: "-".join(map(str, b)))
def test_boundaries_and_empty_tensors(emulator, elem_bytes):
    vec = _vector_elems(elem_bytes)
    sizes = {0, 1, vec - 1, vec, vec + 1, 2 * vec - 1, CHUNK - 1, CHUNK, CHUNK + 1, CHUNK + vec - 1}
    sizes |= {CHUNK - vec, CHUNK - vec + 1, 2 * CHUNK - 1, 2 * CHUNK, 2 * CHUNK + 1, 3 * CHUNK + vec + 1}
    numels = []
    for s in sorted(sizes):
        numels += [s, 0, 0, s]  # empty tensors between, and in a row
    numels = [0, *numels, 0]
    addresses = _aligned_addresses(numels, elem_bytes)
    n_chunks = sum((n + CHUNK - 1) // CHUNK for n in numels)
    for vec_unroll in (1, 2):  # the kernel takes one vector at a time for wide lists
        results = _run(emulator, [(elem_bytes, numels, addresses, g) for g in _grids(n_chunks)], vec_unroll)
        assert "vectors=0 " not in results[0]  # aligned tensors take the vector path


@pytest.mark.parametrize("elem_bytes", LIST_KINDS, ids=lambda b: "-".join(map(str, b)))
def test_misaligned_and_mixed(emulator, elem_bytes):
    rng = random.Random(len(elem_bytes) * 100 + sum(elem_bytes))
    numels = [
        rng.choice([0, 1, 7, 8, 9, 100, CHUNK - 3, CHUNK, CHUNK + 5, 3 * CHUNK + 2]) for _ in range(120)
    ]
    aligned = _aligned_addresses(numels, elem_bytes)
    # every tensor of one list shifted by one element: all misaligned (scalar path only)
    last = len(elem_bytes) - 1
    shifted = [
        [a + (b if k == last else 0) for k, (a, b) in enumerate(zip(addr, elem_bytes))] for addr in aligned
    ]
    # mixed: a random list of a random third of the tensors shifted by one element (a view at an
    # odd offset, say); the others aligned
    mixed = []
    for addr in aligned:
        addr = list(addr)
        if rng.random() < 1 / 3:
            k = rng.randrange(len(addr))
            addr[k] += elem_bytes[k] * rng.choice([1, 2, 3]) if elem_bytes[k] < VEC_BYTES else 8
        mixed.append(addr)
    n_chunks = sum((n + CHUNK - 1) // CHUNK for n in numels)
    cases = [(elem_bytes, numels, shifted, g) for g in _grids(n_chunks)]
    cases += [(elem_bytes, numels, mixed, g) for g in _grids(n_chunks)]
    results = _run(emulator, cases)
    assert results[0].startswith("ok vectors=0 ")  # nothing misaligned goes by vectors


def test_hundred_thousand_tensors(emulator):
    rng = random.Random(0)
    numels = [rng.choice([0, 1, 3, 8, 17, 64, 100, 1000]) for _ in range(100_000)]
    for i in rng.sample(range(len(numels)), 20):
        numels[i] = rng.choice([CHUNK, CHUNK + 1, 5 * CHUNK - 1])
    elem_bytes = [FP32, BF16]
    addresses = _aligned_addresses(numels, elem_bytes)
    for i in rng.sample(range(len(numels)), 1000):
        addresses[i][1] += 2  # some bf16 sources at odd element offsets
    n_chunks = sum((n + CHUNK - 1) // CHUNK for n in numels)
    assert n_chunks > 80_000
    _run(emulator, [(elem_bytes, numels, addresses, GRID)])
