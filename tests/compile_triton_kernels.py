"""Compiles swa_fast's Triton kernels ahead of time for real GPU targets, no GPU needed.

Run by tests/test_triton_compiled.py in a process without TRITON_INTERPRET (with it, @triton.jit
makes interpreted functions, which triton.compile does not take):

    python tests/compile_triton_kernels.py VARIANTS.json RESULTS.json

VARIANTS.json lists the launches the launchers make: {"op", "signature" (argument -> Triton type),
"constexprs" (name -> value; dtypes by name, "fp32")}. Each is compiled for sm_80 and sm_90;
RESULTS.json gets, per variant and target, the error (None when it compiled), the PTX's 128-bit
global loads and stores, its shared-memory accesses, 32-bit high multiplies (Philox's), global
atomics (the stats'), its fmas and the multiplies and adds ptxas could fuse, whether it uses local
memory, and its registers per thread (from the cubin, through the cuobjdump that ships with Triton).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

TARGETS = (80, 90)


def _tool(name: str) -> Path:
    import triton

    return Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / name


def _constexpr(value):
    import triton.language as tl

    if isinstance(value, list):
        return tuple(_constexpr(v) for v in value)
    if isinstance(value, str):
        return (
            tl.str_to_ty(value, None) if value.startswith("*") else getattr(tl, _TL_NAMES.get(value, value))
        )
    return value


_TL_NAMES = {"fp32": "float32", "fp64": "float64", "fp16": "float16", "bf16": "bfloat16"}  # others: their own


def resources(cubin: bytes) -> tuple[int, int, int]:
    """(registers per thread, stack bytes, local-memory bytes: spills) of the (one) kernel in
    `cubin`, as cuobjdump -res-usage reports them."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run([str(_tool("cuobjdump")), "-res-usage", f.name], capture_output=True, text=True)
    found = re.search(r"REG:(\d+) STACK:(\d+) SHARED:\d+ LOCAL:(\d+)", out.stdout)
    assert found, out.stdout + out.stderr
    return int(found.group(1)), int(found.group(2)), int(found.group(3))


def compile_one(job: tuple[dict, int]) -> dict:
    variant, arch = job
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from swa_fast.ops import triton_kernels

    kernel = triton_kernels.KERNELS[variant["op"]]
    constexprs = {k: _constexpr(v) for k, v in variant["constexprs"].items()}
    if isinstance(kernel, triton_kernels.Blockwise):  # the shared kernel, given the op's block
        kernel, constexprs["OP"] = kernel.kernel, kernel.block
    signature = {**variant["signature"], **{k: "constexpr" for k in constexprs}}
    # As the runtime specialises them: torch's allocations are 16-byte aligned.
    attrs = {
        (kernel.arg_names.index(k),): [["tt.divisibility", 16]] for k, v in signature.items() if v[0] == "*"
    }
    result = {**variant, "arch": arch, "error": None}
    try:
        compiled = triton.compile(
            ASTSource(kernel, signature, constexprs, attrs),
            target=GPUTarget("cuda", arch, 32),
            options=variant.get("options") or None,
        )
    except Exception as e:  # noqa: BLE001 - reported, and the test fails on it
        result["error"] = f"{type(e).__name__}: {e}"[:2000]
        return result
    ptx = compiled.asm["ptx"]
    result["ld_v4"] = len(re.findall(r"\bld\.global(?:\.[a-z0-9]+)*\.v4\.", ptx))
    result["st_v4"] = len(re.findall(r"\bst\.global(?:\.[a-z0-9]+)*\.v4\.", ptx))
    result["ld_global"] = len(re.findall(r"\bld\.global\.", ptx))
    # shared memory (a layout conversion through it), and the 32-bit high multiplies: Philox's,
    # 20 per call, so the stochastic kernels' calls per thread are counted
    result["shared"] = len(re.findall(r"\b(?:ld|st)\.shared\b", ptx))
    result["mul_hi"] = len(re.findall(r"\bmul\.hi\.u32\b", ptx))
    # global atomics (the stats' counts: atom, or red where the old value is not used)
    result["atomics"] = len(re.findall(r"\b(?:atom|red)\.global\b", ptx))
    # floating-point multiplies and adds without a rounding modifier, which ptxas may fuse into an
    # fma (with .rn it may not); and the fmas themselves
    result["fusable"] = len(re.findall(r"\b(?:mul|add|sub)(?:\.ftz)?\.f(?:32|64)\b", ptx))
    result["fma"] = len(re.findall(r"\bfma\.rn(?:\.ftz)?\.f(?:32|64)\b", ptx))
    result["registers"], stack, local = resources(compiled.asm["cubin"])
    # local memory asked for in the PTX, or spilled to by ptxas
    result["local"] = bool(re.search(r"\.local\b", ptx)) or stack > 0 or local > 0
    return result


def main(variants_path: str, results_path: str) -> None:
    assert os.environ.get("TRITON_INTERPRET", "0") != "1", "run without TRITON_INTERPRET"
    variants = json.loads(Path(variants_path).read_text())
    jobs = [(v, arch) for v in variants for arch in TARGETS]
    with ProcessPoolExecutor(max_workers=min(len(jobs), os.cpu_count() or 1)) as pool:
        results = list(pool.map(compile_one, jobs))
    Path(results_path).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main(*sys.argv[1:3])
