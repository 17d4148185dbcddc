"""What was built: the CUDA kernels are in the extension (checked without a GPU), the pure-Python
install still works, and `python -m swa_fast info` tells the truth."""

import os
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import swa_fast
from swa_fast import ops

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


@pytest.mark.skipif(
    not EXPECT_CUDA, reason="SWA_FAST_EXPECT_CUDA=1 not set: this build was not asked for CUDA kernels"
)
def test_cuda_kernels_are_built():
    assert ops._C is not None, ops.EXTENSION_ERROR
    assert ops.BUILD_INFO["cuda"], ops.BUILD_INFO
    for op in ("lerp_", "moments_", "copy_", "swap_"):
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"swa_fast::{op}", "CUDA"), op
    archs = fatbin_archs(Path(ops._C.__file__))
    assert {(80, "cubin"), (90, "cubin")} <= archs, archs


def test_cpu_kernels_are_registered():
    if ops._C is None:
        pytest.skip(ops.EXTENSION_ERROR)
    for op in ("lerp_", "moments_", "copy_", "swap_"):
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"swa_fast::{op}", "CPU"), op


def test_import_without_extension(tmp_path):
    """A pure-Python copy of the package (what SWA_FAST_NO_EXT=1 installs) imports with one
    warning and averages through the fallbacks."""
    shutil.copytree(PACKAGE, tmp_path / "swa_fast", ignore=shutil.ignore_patterns("*.so", "__pycache__"))
    code = (
        "import warnings, torch\n"
        "with warnings.catch_warnings(record=True) as w:\n"
        "    warnings.simplefilter('always')\n"
        "    import swa_fast\n"
        "assert len(w) == 1 and 'did not load' in str(w[0].message), [str(x.message) for x in w]\n"
        "assert swa_fast.choose_backend('cpu') == 'foreach'\n"
        "a = [torch.zeros(3)]\n"
        "swa_fast.lerp_(a, [torch.ones(3)], 0.25)\n"
        "assert torch.equal(a[0], torch.full((3,), 0.25))\n"
        "print('ok')\n"
    )
    # -S skips site-packages' .pth files (an editable install's finder would find the real package);
    # torch's own folder is put back by hand.
    site_packages = Path(torch.__file__).parent.parent
    env = {**os.environ, "PYTHONPATH": f"{tmp_path}{os.pathsep}{site_packages}"}
    env.pop("TRITON_INTERPRET", None)
    out = subprocess.run(
        [sys.executable, "-S", "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True
    )
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr


def test_info_cli():
    out = subprocess.run(
        [sys.executable, "-m", "swa_fast", "info"], capture_output=True, text=True, check=True
    )
    text = out.stdout
    assert f"torch          {torch.__version__}" in text
    assert "cpu   -> " + swa_fast.choose_backend("cpu") in text
    assert "CPU threads" in text and "triton" in text
    if not torch.cuda.is_available():  # no GPU: no backend is claimed for CUDA tensors
        assert "cuda  -> none: no GPU is visible" in text
    if ops.BUILD_INFO["cuda"]:
        assert "built for " + ops.BUILD_INFO["cuda_archs"] in text
