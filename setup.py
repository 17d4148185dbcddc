"""Build swa_fast: C++ CPU kernels always, CUDA kernels when a toolkit and a CUDA torch are present.

Environment switches:
  SWA_FAST_NO_EXT=1      pure-Python install (the ops fall back to Triton / torch._foreach_*)
  SWA_FAST_FORCE_CUDA=1  build the CUDA kernels even when the auto-detection says no
  SWA_FAST_NO_CUDA=1     never build the CUDA kernels
  TORCH_CUDA_ARCH_LIST   GPU architectures; without it, those of the visible GPUs, or with none
                         visible every architecture the installed torch was built for (default_archs)

The version is read from swa_fast/_version.py (pyproject.toml declares it dynamic), its one place.
"""

import os
import re
import shutil
import sys
from pathlib import Path

from setuptools import setup

# Only if torch lists no architecture (an old or unusual build): A100, H100/H200, newer by PTX.
FALLBACK_ARCHS = "8.0;9.0+PTX"
ROOT = Path(__file__).parent

# Why the CUDA kernels were or were not built, as recorded in the build info (a word: it becomes a
# C string macro); swa_fast/ops/backends.py says each in words.
NO_CUDA_ASKED, NO_TOOLKIT, CPU_TORCH = "asked", "no_toolkit", "cpu_torch"
FORCED, DETECTED = "forced", "detected"

TORCH_MISSING = """
swa_fast: torch is not importable from {python}.
swa_fast compiles its kernels against the torch you will run it with, so install torch first,
into this same environment, then swa_fast without build isolation:

    pip install torch
    pip install --no-build-isolation .

(SWA_FAST_NO_EXT=1 installs swa_fast without compiled kernels, and needs no torch to build.)
"""


def flag(name: str) -> bool:
    return os.environ.get(name, "0").lower() in ("1", "true", "yes", "on")


def find_cuda_home() -> str | None:
    """The real toolkit folder: nvcc on PATH may be a wrapper script in /usr/local/bin, from which
    torch would guess /usr/local and then fail to link -lcudart."""
    candidates = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH")]
    nvcc = shutil.which("nvcc")
    if nvcc:
        real = Path(nvcc).resolve()
        candidates.append(str(real.parent.parent))
        # A wrapper script: read the path it execs.
        try:
            for word in real.read_text(errors="ignore").split():
                if word.endswith("/bin/nvcc"):
                    candidates.append(str(Path(word).parent.parent))
        except OSError:
            pass
    candidates += sorted((str(p) for p in Path("/usr/local").glob("cuda-*")), reverse=True)
    candidates.append("/usr/local/cuda")
    for c in candidates:
        if c and (Path(c) / "bin" / "nvcc").is_file() and (Path(c) / "include" / "cuda_runtime.h").is_file():
            return c
    return None


def import_torch():
    """torch, or a message saying how to install it first (pip's own would be a bare traceback)."""
    try:
        import torch
    except ImportError:
        sys.exit(TORCH_MISSING.format(python=sys.executable))
    return torch


def cuda_decision(torch, cuda_home: str | None) -> str:
    """Whether to build the CUDA kernels, as the word recorded in the build info: FORCED or
    DETECTED build them, the others say why not."""
    if flag("SWA_FAST_NO_CUDA"):
        return NO_CUDA_ASKED
    if flag("SWA_FAST_FORCE_CUDA"):
        if cuda_home is None:
            raise RuntimeError("SWA_FAST_FORCE_CUDA=1 but no CUDA toolkit was found; set CUDA_HOME")
        return FORCED
    if cuda_home is None:
        return NO_TOOLKIT
    return DETECTED if torch.version.cuda is not None else CPU_TORCH


def default_archs(arch_list: list[str]) -> str:
    """TORCH_CUDA_ARCH_LIST for every real architecture in `arch_list` (torch.cuda.get_arch_list():
    'sm_75', ..., 'sm_120'), with PTX of the newest, so that a GPU newer than all of them still
    runs, compiled at its first use."""
    real = (re.fullmatch(r"sm_(\d+)(\d)", arch) for arch in arch_list)  # not compute_90, sm_90a
    found = sorted({(int(m[1]), int(m[2])) for m in real if m})
    if not found:
        return FALLBACK_ARCHS
    return ";".join(f"{major}.{minor}" for major, minor in found) + "+PTX"


def choose_archs(torch) -> str:
    """Where the architecture list comes from (recorded in the build info), after setting
    TORCH_CUDA_ARCH_LIST when it is ours to choose. A visible GPU: torch builds for it."""
    if os.environ.get("TORCH_CUDA_ARCH_LIST"):
        return "TORCH_CUDA_ARCH_LIST"
    if torch.cuda.is_available():
        return "visible_gpus"
    # Without a GPU torch would compile for no architecture: build for all it supports.
    os.environ["TORCH_CUDA_ARCH_LIST"] = default_archs(torch.cuda.get_arch_list())
    return "torch_arch_list"


def extensions():
    if flag("SWA_FAST_NO_EXT"):
        return [], {}
    cuda_home = find_cuda_home()
    if cuda_home:
        # torch.utils.cpp_extension reads CUDA_HOME when imported: set it first.
        os.environ["CUDA_HOME"] = cuda_home
    torch = import_torch()
    from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension

    decision = cuda_decision(torch, cuda_home)
    with_cuda = decision in (FORCED, DETECTED)
    archs_from = choose_archs(torch) if with_cuda else ""

    sources = ["csrc/ops.cpp", *sorted(str(p) for p in Path("csrc/cpu").glob("*.cpp"))]
    info = {
        "cuda": with_cuda,
        "cuda_archs": os.environ.get("TORCH_CUDA_ARCH_LIST", "") if with_cuda else "",
        "cuda_archs_from": archs_from,
        "cuda_reason": decision,
        "cuda_version": torch.version.cuda or "",
        "torch_version": torch.__version__,
    }
    macros = [(f"SWA_FAST_BUILD_{k.upper()}", f'"{v}"') for k, v in info.items() if k != "cuda"]
    # -ffp-contract=off, --fmad=false: the kernels fuse a multiply and an add only where the code
    # says so (functors.h), so a loop's bits do not depend on how the compiler shaped it, and the
    # CPU's and the GPU's are the same.
    cxx = ["-O3", "-Wall", "-fopenmp", "-ffp-contract=off"]
    if with_cuda:
        sources += sorted(str(p) for p in Path("csrc/cuda").glob("*.cu"))
        macros.append(("SWA_FAST_WITH_CUDA", "1"))
        ext = CUDAExtension(
            "swa_fast._C",
            sources,
            define_macros=macros,
            extra_compile_args={"cxx": cxx, "nvcc": ["-O3", "--expt-relaxed-constexpr", "--fmad=false"]},
            extra_link_args=["-fopenmp"],
            py_limited_api=False,
        )
    else:
        ext = CppExtension(
            "swa_fast._C", sources, define_macros=macros, extra_compile_args=cxx, extra_link_args=["-fopenmp"]
        )
    return [ext], {"build_ext": BuildExtension.with_options(use_ninja=True)}


if __name__ == "__main__":  # (setuptools runs this file as __main__; tests import its functions)
    ext_modules, cmdclass = extensions()
    setup(ext_modules=ext_modules, cmdclass=cmdclass)
