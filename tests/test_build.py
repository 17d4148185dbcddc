"""What was built: the CUDA kernels are in the extension (checked without a GPU), the pure-Python
install still works, and `python -m swa_fast info` tells the truth."""

import importlib.util
import os
import re
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import swa_fast
from swa_fast import ops
from swa_fast.ops import extension

# `make test` and CI set this when a CUDA toolkit was found for the build: then the CUDA kernels
# must be there, and a build that silently dropped them fails here.
EXPECT_CUDA = os.environ.get("SWA_FAST_EXPECT_CUDA") == "1"
PACKAGE = Path(swa_fast.__file__).parent


def fatbin_archs(library: Path) -> set[tuple[int, str]]:
    """(sm number, 'cubin' or 'ptx') of every entry in the library's .nv_fatbin ELF section."""
    data = library.read_bytes()
    shoff = struct.unpack_from("<Q", data, 0x28)[0]
    shentsize, shnum, shstrndx = struct.unpack_from("<HHH", data, 0x3A)
    sections = [struct.unpack_from("<IIQQQQIIQQ", data, shoff + i * shentsize) for i in range(shnum)]
    names_at = sections[shstrndx][4]

    def name(sec):
        start = names_at + sec[0]
        return data[start : data.index(b"\0", start)].decode()

    found = set()
    for sec in sections:
        if name(sec) != ".nv_fatbin":
            continue
        blob, pos = data[sec[4] : sec[4] + sec[5]], 0
        while pos + 16 <= len(blob):
            magic, _, header_size, body_size = struct.unpack_from("<IHHQ", blob, pos)
            if magic != 0xBA55ED50:  # padding between fat binaries
                pos += 8
                continue
            entry, end = pos + header_size, pos + header_size + body_size
            while entry < end:
                kind, _, entry_header, entry_size = struct.unpack_from("<HHIQ", blob, entry)
                arch = struct.unpack_from("<I", blob, entry + 28)[0]
                found.add((arch, {1: "ptx", 2: "cubin"}.get(kind, str(kind))))
                entry += entry_header + entry_size
            pos = end
    return found


ROOT = Path(__file__).resolve().parent.parent
_setup_spec = importlib.util.spec_from_file_location("swa_fast_setup", ROOT / "setup.py")
setup_py = importlib.util.module_from_spec(_setup_spec)
_setup_spec.loader.exec_module(setup_py)  # its functions only: setup() runs under __main__


def expected_cubins(info: dict) -> set[int]:
    """The sm numbers the build must hold cubins for: every one torch supports when the list was
    ours to choose, else those it was given."""
    arch_list = info["cuda_archs"]
    if info["cuda_archs_from"] == "torch_arch_list":
        arch_list = setup_py.default_archs(torch.cuda.get_arch_list())
    return {int(major) * 10 + int(minor) for major, minor in re.findall(r"(\d+)\.(\d+)", arch_list)}


@pytest.mark.skipif(
    not EXPECT_CUDA, reason="SWA_FAST_EXPECT_CUDA=1 not set: this build was not asked for CUDA kernels"
)
def test_cuda_kernels_are_built():
    assert ops._C is not None, ops.EXTENSION_ERROR
    assert ops.BUILD_INFO["cuda"] and ops.BUILD_INFO["cuda_reason"] in ("detected", "forced"), ops.BUILD_INFO
    for op in ("lerp_", "moments_", "copy_", "swap_"):
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"swa_fast::{op}", "CUDA"), op
    archs = fatbin_archs(Path(ops._C.__file__))
    cubins = {arch for arch, kind in archs if kind == "cubin"}
    assert expected_cubins(ops.BUILD_INFO) <= cubins, archs
    assert any(kind == "ptx" for _, kind in archs), archs  # for GPUs newer than every cubin


def test_without_a_gpu_the_build_targets_every_architecture_torch_supports():
    listed = ["sm_75", "sm_80", "sm_86", "sm_90", "sm_100", "sm_120"]
    assert setup_py.default_archs(listed) == "7.5;8.0;8.6;9.0;10.0;12.0+PTX"
    assert setup_py.default_archs(["sm_90a", "compute_90", "sm_80"]) == "8.0+PTX"  # real ones only
    assert setup_py.default_archs([]) == setup_py.FALLBACK_ARCHS
    if ops.BUILD_INFO["cuda_archs_from"] == "torch_arch_list":  # this build made without a GPU
        assert ops.BUILD_INFO["cuda_archs"] == setup_py.default_archs(torch.cuda.get_arch_list())


def test_the_build_records_why_it_built_cuda_or_not(monkeypatch):
    for name in ("SWA_FAST_NO_CUDA", "SWA_FAST_FORCE_CUDA"):
        monkeypatch.delenv(name, raising=False)
    assert setup_py.cuda_decision(torch, None) == "no_toolkit"
    assert setup_py.cuda_decision(torch, "/a/toolkit") == ("detected" if torch.version.cuda else "cpu_torch")
    monkeypatch.setenv("SWA_FAST_NO_CUDA", "1")
    assert setup_py.cuda_decision(torch, "/a/toolkit") == "asked"

    # ... and `info` says each apart
    def said(reason: str) -> str:
        return extension.cuda_summary({**extension.NO_BUILD_INFO, "cuda_reason": reason})

    assert len({said(reason) for reason in extension.CUDA_REASONS}) == len(extension.CUDA_REASONS)
    assert said("asked") == "not built: asked for (SWA_FAST_NO_CUDA=1)"
    assert said("no_toolkit") == "not built: no CUDA toolkit was found at build time"


def test_setup_without_torch_says_to_install_torch_first():
    """Run by a Python that has setuptools but no torch (this venv's base interpreter, where it is
    so), setup.py stops with what to do instead of a ModuleNotFoundError traceback."""
    base = getattr(sys, "_base_executable", None)
    probe = "import importlib.util as u; print(bool(u.find_spec('setuptools')), not u.find_spec('torch'))"
    found = subprocess.run([base, "-c", probe], capture_output=True, text=True) if base else None
    if found is None or found.stdout.split() != ["True", "True"]:
        pytest.skip("no interpreter here with setuptools and without torch")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "SWA_FAST_NO_EXT")}
    out = subprocess.run([base, "setup.py", "--version"], cwd=ROOT, env=env, capture_output=True, text=True)
    assert out.returncode != 0
    assert "swa_fast: torch is not importable" in out.stderr and "pip install torch" in out.stderr, out.stderr
    assert "Traceback" not in out.stderr


def test_cpu_kernels_are_registered():
    if ops._C is None:
        pytest.skip(ops.EXTENSION_ERROR)
    for op in ("lerp_", "moments_", "copy_", "swap_"):
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"swa_fast::{op}", "CPU"), op


def without_extension(tmp_path: Path, checkout: bool):
    """A copy of the package without its compiled _C in `tmp_path`, as a source checkout (setup.py
    and csrc/ beside it) or as an installed package (SWA_FAST_NO_EXT=1); returns a function that
    runs `python ARGS` there, seeing that copy."""
    shutil.copytree(PACKAGE, tmp_path / "swa_fast", ignore=shutil.ignore_patterns("*.so", "__pycache__"))
    if checkout:
        shutil.copy(ROOT / "setup.py", tmp_path)
        shutil.copytree(ROOT / "csrc", tmp_path / "csrc")
    # -S skips site-packages' .pth files (an editable install's finder would find the real package);
    # torch's own folder is put back by hand.
    site_packages = Path(torch.__file__).parent.parent
    env = {**os.environ, "PYTHONPATH": f"{tmp_path}{os.pathsep}{site_packages}"}
    env.pop("TRITON_INTERPRET", None)

    def python(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, "-S", *args], cwd=tmp_path, env=env, capture_output=True, text=True
        )

    return python


def test_import_without_extension(tmp_path):
    """A pure-Python copy of the package (what SWA_FAST_NO_EXT=1 installs) imports with one
    warning, which says what is missing where and how to fix it, and averages through the
    fallbacks without importing Triton."""
    code = (
        "import sys, warnings, torch\n"
        "with warnings.catch_warnings(record=True) as w:\n"
        "    warnings.simplefilter('always')\n"
        "    import swa_fast\n"
        "assert len(w) == 1, [str(x.message) for x in w]\n"
        "print(w[0].message)\n"
        "assert swa_fast.choose_backend('cpu') == 'foreach'\n"
        "a = [torch.zeros(3)]\n"
        "swa_fast.lerp_(a, [torch.ones(3)], 0.25)\n"
        "assert torch.equal(a[0], torch.full((3,), 0.25))\n"
        "assert 'triton' not in sys.modules\n"
        "print('ok')\n"
    )
    out = without_extension(tmp_path, checkout=False)("-c", code)
    assert out.returncode == 0 and out.stdout.strip().endswith("ok"), out.stderr
    said = out.stdout.splitlines()[0]
    assert "did not load" in said and f"swa_fast at {tmp_path / 'swa_fast'} was installed without" in said
    assert "pip install --no-build-isolation --force-reinstall" in said


def test_cli_in_a_checkout_without_extension_says_where_from_and_the_fix(tmp_path):
    """`python -m swa_fast info` and `bench` in a source checkout whose _C was not built: one line
    naming the checkout and the command that builds it, no "circular import"; bench times nothing."""
    python = without_extension(tmp_path, checkout=True)
    info = python("-m", "swa_fast", "info")
    assert info.returncode == 0, info.stderr
    fix = f"build it in place with `pip install --no-build-isolation -e {tmp_path}`"
    line = next(x for x in info.stdout.splitlines() if x.startswith("extension"))
    assert f"imported from the source checkout {tmp_path / 'swa_fast'}, which has no compiled _C" in line
    assert line.endswith(fix), line
    assert f"(the source checkout {tmp_path})" in info.stdout.splitlines()[0]
    assert "circular" not in info.stdout + info.stderr
    bench = python("-m", "swa_fast", "bench")
    assert bench.returncode == 2 and fix in bench.stderr and "--allow-fallback" in bench.stderr, bench.stderr
    assert "swa_fast benchmark on" not in bench.stdout


def test_info_cli():
    out = subprocess.run(
        [sys.executable, "-m", "swa_fast", "info"], capture_output=True, text=True, check=True
    )
    text = out.stdout
    assert text.startswith(f"swa_fast       {swa_fast.__version__} from {PACKAGE}")
    assert f"torch          {torch.__version__}" in text
    assert "cpu   -> " + swa_fast.choose_backend("cpu") in text
    assert "CPU threads" in text and "triton" in text
    if not torch.cuda.is_available():  # no GPU: no backend is claimed for CUDA tensors
        assert "cuda  -> none: no GPU is visible" in text
    if ops.BUILD_INFO["cuda"]:
        assert "built for " + ops.BUILD_INFO["cuda_archs"] in text
    else:
        assert extension.cuda_summary(ops.BUILD_INFO) in text
