"""Build swa_fast: C++ CPU kernels always, CUDA kernels when a toolkit and a CUDA torch are present.

Environment switches:
  SWA_FAST_NO_EXT=1      pure-Python install (the ops fall back to Triton / torch._foreach_*)
  SWA_FAST_FORCE_CUDA=1  build the CUDA kernels even when the auto-detection says no
  SWA_FAST_NO_CUDA=1     never build the CUDA kernels
  TORCH_CUDA_ARCH_LIST   GPU architectures; defaults to DEFAULT_ARCHS when no GPU is visible
"""

import os
import shutil
from pathlib import Path

from setuptools import setup

# Without a visible GPU torch would compile for no architecture; these cover A100, H100/H200 and
# (through PTX) anything newer.
DEFAULT_ARCHS = "8.0;9.0+PTX"
ROOT = Path(__file__).parent


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


def extensions():
    if flag("SWA_FAST_NO_EXT"):
        return [], {}
    cuda_home = find_cuda_home()
    if cuda_home:
        # torch.utils.cpp_extension reads CUDA_HOME when imported: set it first.
        os.environ["CUDA_HOME"] = cuda_home
    import torch
    from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension

    with_cuda = not flag("SWA_FAST_NO_CUDA") and (
        flag("SWA_FAST_FORCE_CUDA") or (cuda_home is not None and torch.version.cuda is not None)
    )
    if with_cuda and cuda_home is None:
        raise RuntimeError("SWA_FAST_FORCE_CUDA=1 but no CUDA toolkit was found; set CUDA_HOME")
    if with_cuda and not os.environ.get("TORCH_CUDA_ARCH_LIST") and not torch.cuda.is_available():
        os.environ["TORCH_CUDA_ARCH_LIST"] = DEFAULT_ARCHS

    sources = ["csrc/ops.cpp", *sorted(str(p) for p in Path("csrc/cpu").glob("*.cpp"))]
    info = {
        "cuda": with_cuda,
        "cuda_archs": os.environ.get("TORCH_CUDA_ARCH_LIST", "") if with_cuda else "",
        "cuda_version": torch.version.cuda or "",
        "torch_version": torch.__version__,
    }
    macros = [(f"SWA_FAST_BUILD_{k.upper()}", f'"{v}"') for k, v in info.items() if k != "cuda"]
    cxx = ["-O3", "-Wall", "-fopenmp"]
    if with_cuda:
        sources += sorted(str(p) for p in Path("csrc/cuda").glob("*.cu"))
        macros.append(("SWA_FAST_WITH_CUDA", "1"))
        ext = CUDAExtension(
            "swa_fast._C",
            sources,
            define_macros=macros,
            extra_compile_args={"cxx": cxx, "nvcc": ["-O3", "--expt-relaxed-constexpr"]},
            extra_link_args=["-fopenmp"],
            py_limited_api=False,
        )
    else:
        ext = CppExtension(
            "swa_fast._C", sources, define_macros=macros, extra_compile_args=cxx, extra_link_args=["-fopenmp"]
        )
    return [ext], {"build_ext": BuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = extensions()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
