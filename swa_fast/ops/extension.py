"""The compiled extension `swa_fast._C`, loaded once, and when it does not load the one line that
says why: which swa_fast was imported from where, and the one command that fixes it. Python's own
message for a missing `_C` blames "most likely a circular import", which it never is here.

Also the build's record (`BUILD_INFO`, written by setup.py into the extension) in words: why the
CUDA kernels were built or not, and for which architectures."""

from __future__ import annotations

import importlib.util
import json
from importlib import metadata
from pathlib import Path

import torch

PACKAGE_DIR = Path(__file__).resolve().parent.parent  # the swa_fast that was imported
# What BUILD_INFO holds when there is no extension to ask (or one built before a key was added).
NO_BUILD_INFO = {
    "cuda": False,
    "cuda_archs": "",
    "cuda_archs_from": "",
    "cuda_reason": "",
    "cuda_version": "",
    "torch_version": "",
}
# setup.py's words for why the CUDA kernels were (not) built, and where their architectures came from.
CUDA_REASONS = {
    "asked": "not built: asked for (SWA_FAST_NO_CUDA=1)",
    "no_toolkit": "not built: no CUDA toolkit was found at build time",
    "cpu_torch": "not built: the torch built against was a CPU-only build",
    "forced": "built (asked for with SWA_FAST_FORCE_CUDA=1)",
    "detected": "built (a CUDA toolkit and a CUDA torch were found)",
}
ARCHS_FROM = {
    "TORCH_CUDA_ARCH_LIST": "TORCH_CUDA_ARCH_LIST",
    "visible_gpus": "the GPUs visible at build time",
    "torch_arch_list": "every architecture the installed torch supports",
}


def checkout_root(package_dir: Path = PACKAGE_DIR) -> Path | None:
    """The source checkout `package_dir` sits in (setup.py and csrc/ beside it), or None."""
    root = package_dir.parent
    return root if (root / "setup.py").is_file() and (root / "csrc").is_dir() else None


def _compiled(package_dir: Path) -> Path | None:
    """The extension's file in `package_dir`, if one is there."""
    return next(iter(sorted(package_dir.glob("_C.*.so")) + sorted(package_dir.glob("_C.*.pyd"))), None)


def _installed_copy(package_dir: Path) -> Path | None:
    """A swa_fast that pip installed with its extension somewhere other than `package_dir` (which
    python's path put ahead of it: a checkout run from its own folder)."""
    try:
        dist = metadata.distribution("swa_fast")
    except metadata.PackageNotFoundError:
        return None
    installed = Path(str(dist.locate_file("swa_fast/__init__.py"))).resolve().parent
    if installed != package_dir and _compiled(installed) is not None:
        return installed
    return None


def _reinstall() -> str:
    """The command that reinstalls swa_fast from where pip installed it (its direct_url.json)."""
    try:
        recorded = metadata.distribution("swa_fast").read_text("direct_url.json") or "{}"
        source = json.loads(recorded).get("url", "").removeprefix("file://")
    except (metadata.PackageNotFoundError, ValueError):
        source = ""
    return f"pip install --no-build-isolation --force-reinstall --no-deps {source or '<its source folder>'}"


def diagnose(error: BaseException | None, package_dir: Path = PACKAGE_DIR) -> str:
    """One line: why `_C` did not load from the swa_fast at `package_dir` (`error`: what importing
    it raised, None where there was no file to import), and the fix."""
    root = checkout_root(package_dir)
    so = _compiled(package_dir)
    rebuild = f"pip install --no-build-isolation -e {root}" if root else None
    if so is not None:  # there, but it does not load: most often built against another torch
        rebuild = rebuild or _reinstall()
        return (
            f"swa_fast._C at {so} did not load ({error}); this is torch {torch.__version__}, and the "
            f"extension must be built against it: rebuild with `{rebuild}`"
        )
    if root is not None:
        installed = _installed_copy(package_dir)
        if installed is not None:
            return (
                f"swa_fast was imported from the source checkout {package_dir}, which has no compiled _C: "
                f"python's path put it ahead of the swa_fast installed at {installed}; "
                f"run from another directory (`cd ~`), or build the checkout in place with `{rebuild}`"
            )
        return (
            f"swa_fast was imported from the source checkout {package_dir}, which has no compiled _C; "
            f"build it in place with `{rebuild}`"
        )
    return (
        f"swa_fast at {package_dir} was installed without its compiled _C (SWA_FAST_NO_EXT=1, or its build "
        f"failed); reinstall with `{_reinstall()}` (add -v to see the build)"
    )


def load():
    """(the extension module or None, why it did not load or None, its build info)."""
    # Looked up first so that a missing file is told from one that fails to load.
    if importlib.util.find_spec("swa_fast._C") is None:
        return None, diagnose(None), dict(NO_BUILD_INFO)
    try:
        from .. import _C  # defines the swa_fast ops of csrc/ops.cpp in torch.ops.swa_fast
    except ImportError as error:
        return None, diagnose(error), dict(NO_BUILD_INFO)
    return _C, None, {**NO_BUILD_INFO, **_C.build_info()}


def cuda_summary(info: dict) -> str:
    """The CUDA kernels of a build in words: for which architectures and why, or why not."""
    if info["cuda"]:
        archs_from = ARCHS_FROM.get(info["cuda_archs_from"])
        source = f", {archs_from}" if archs_from else ""
        return f"built for {info['cuda_archs']} (CUDA {info['cuda_version']}{source})"
    return CUDA_REASONS.get(info["cuda_reason"], "not built")
