"""The machine code of the built CUDA kernels, read without a GPU: the cuobjdump that ships with
Triton disassembles the extension's cubins. lerp_ must move 128 bits per global load and store on
its vector path (fp32 and bf16 sources), no kernel may spill to local memory, the cubins must be
there for sm_80 and sm_90 (not only PTX), and registers per thread are printed (pytest -s)."""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

import pytest

from swa_fast import ops

EXPECT_CUDA = os.environ.get("SWA_FAST_EXPECT_CUDA") == "1"


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


@pytest.fixture(scope="module", params=[80, 90], ids=lambda a: f"sm_{a}")
def sass(request) -> dict[str, str]:
    """Kernel (mangled name) -> its SASS, for one architecture."""
    text = _run("-sass", "-arch", f"sm_{request.param}", str(_library()))
    parts = re.split(r"^\s*Function : (\S+)\s*$", text, flags=re.M)
    kernels = dict(zip(parts[1::2], parts[2::2]))
    assert kernels, f"no sm_{request.param} SASS in the extension"
    return kernels


def _lerp(kernels: dict[str, str], dst: str, src: str) -> str:
    # multi_tensor_kernel<2, Lerp<dst, src>>, mangled
    found = [
        code
        for name, code in kernels.items()
        if "multi_tensor_kernel" in name and f"4LerpI{dst}{src}E" in name
    ]
    assert len(found) == 1, [n for n in kernels if "Lerp" in n]
    return found[0]


@pytest.mark.parametrize("src", ["f", "N3c108BFloat16E"], ids=["fp32", "bf16"])
def test_lerp_moves_128_bits(sass, src):
    code = _lerp(sass, "f", src)
    loads = re.findall(r"\bLDG\.E\.128\b", code)
    stores = re.findall(r"\bSTG\.E\.128\b", code)
    # fp32 <- fp32: a 128-bit word of each list; fp32 <- bf16: one of bf16, two of the average
    assert len(loads) >= (2 if src == "f" else 3), code
    assert len(stores) >= (1 if src == "f" else 2), code
    # the scalar tail keeps global (not generic) 32-bit accesses
    assert re.search(r"\bLDG\.E\b", code) and re.search(r"\bSTG\.E\b", code)
    assert not re.search(r"\bLD\.E", code), "generic loads: the compiler lost track of global memory"


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


def test_cubins_for_sm80_and_sm90():
    listed = _run("-lelf", str(_library()))
    archs = set(re.findall(r"\.sm_(\d+)\.cubin", listed))
    assert {"80", "90"} <= archs, listed
