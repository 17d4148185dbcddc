"""The user's install path, end to end: the source distribution of this checkout holds every source the
build needs (and the licence, the changelog, the typing marker), compiles (with the CUDA kernels
where a toolkit is present) into a fresh virtual environment, and the package installed there
imports, loads its extension, averages, carries its metadata, runs `python -m swa_fast info` and
`bench` from outside any checkout, and shows its types to a user's mypy.

This compiles the extension from scratch with the build's own flags, so it takes minutes."""

import json
import os
import shutil
import site
import subprocess
import sys
import sysconfig
import tarfile
import venv
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
EXPECT_CUDA = os.environ.get("SWA_FAST_EXPECT_CUDA") == "1"
# A build that hangs must not hold CI until its own time limit.
BUILD_TIMEOUT_S = 3600

# Run in the fresh environment, from a folder outside the checkout.
INSTALLED_CHECK = """
import json, sys, torch, swa_fast
from importlib import metadata
from pathlib import Path
from swa_fast import ops
avg = [torch.zeros(3), torch.full((2, 2), 4.0)]
swa_fast.lerp_(avg, [torch.tensor([1.0, 2.0, 3.0]), torch.zeros(2, 2)], 0.25)
print(json.dumps({
    "file": swa_fast.__file__,
    "extension_loaded": ops._C is not None,
    "extension_error": ops.EXTENSION_ERROR,
    "build_info": ops.BUILD_INFO,
    "cpu_backend": swa_fast.choose_backend("cpu"),
    "avg": [a.tolist() for a in avg],
    "typed": (Path(swa_fast.__file__).parent / "py.typed").is_file(),
    "version": [swa_fast.__version__, metadata.version("swa_fast")],
    "license": metadata.metadata("swa_fast")["License-Expression"],
    "license_file": any(f.name == "LICENSE" for f in metadata.files("swa_fast")),
}))
"""

# A user's code, checked by mypy against the installed package: without py.typed every swa_fast
# name would be Any ("module is installed, but missing library stubs or py.typed marker").
USER_SNIPPET = """
import torch
import swa_fast

ema = swa_fast.EMA(torch.nn.Linear(2, 2), decay=0.99)
reveal_type(ema)
reveal_type(ema.update)
reveal_type(swa_fast.lerp_)
"""
# torch itself is left out (its types would take minutes to read): swa_fast's own are the question.
MYPY_CONFIG = """
[mypy]
follow_imports = silent
[mypy-torch.*]
follow_imports = skip
"""


def run(args, **kwargs) -> subprocess.CompletedProcess:
    out = subprocess.run(args, capture_output=True, text=True, timeout=BUILD_TIMEOUT_S, **kwargs)
    # A compile log runs to thousands of lines: show the lines that name an error, then the end.
    log = out.stdout + out.stderr
    errors = "\n".join([line for line in log.splitlines() if "error" in line.lower()][:40])
    assert out.returncode == 0, f"{args} failed:\n{errors}\n...\n{log[-4000:]}"
    return out


def checkout_copy(dst: Path) -> Path:
    """The checkout without what .gitignore leaves out (the venv, build outputs, caches), so that
    building the sdist writes nothing into the checkout itself."""
    ignored = [line.strip().rstrip("/") for line in (ROOT / ".gitignore").read_text().splitlines()]
    patterns = [p for p in ignored if p and not p.startswith("#")]
    shutil.copytree(ROOT, dst, ignore=shutil.ignore_patterns(".git", *patterns))
    return dst


def fresh_venv(path: Path) -> Path:
    """A new virtual environment that sees this interpreter's packages (torch, setuptools, ninja,
    pip) through a .pth file, listed after its own, so nothing is downloaded. A path line in a .pth
    does not run the .pth files found there: an editable install of this checkout stays invisible."""
    venv.EnvBuilder(with_pip=False).create(path)
    python = path / "bin" / "python"
    purelib = run([python, "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"]).stdout.strip()
    (Path(purelib) / "outer_packages.pth").write_text("\n".join(site.getsitepackages()) + "\n")
    return python


def test_sdist_installs_and_runs(tmp_path):
    source = checkout_copy(tmp_path / "source")
    dist = tmp_path / "dist"
    # The PEP 517 hook that pip and `python -m build` call to make an sdist.
    build_sdist = "import sys; from setuptools import build_meta; print(build_meta.build_sdist(sys.argv[1]))"
    name = run([sys.executable, "-c", build_sdist, dist], cwd=source).stdout.strip().splitlines()[-1]
    sdist = dist / name

    with tarfile.open(sdist) as tar:
        shipped = {Path(*Path(m).parts[1:]) for m in tar.getnames()}
    needed = {p.relative_to(ROOT) for p in (ROOT / "csrc").rglob("*") if p.is_file()}
    also = ("LICENSE", "CHANGELOG.md", "swa_fast/py.typed", "swa_fast/benchmarks/run.py")
    needed |= {Path(p) for p in also}
    assert not needed - shipped, f"the sdist leaves out {sorted(map(str, needed - shipped))}"

    python = fresh_venv(tmp_path / "env")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "TRITON_INTERPRET")}
    # torch's build looks for the ninja executable on PATH; it sits next to this interpreter.
    env["PATH"] = os.pathsep.join([str(python.parent), sysconfig.get_path("scripts"), env.get("PATH", "")])
    # One architecture: the default list (every one torch supports) would take several times as
    # long, and tests/test_build.py checks it on the checkout's own build; this checks the override.
    env["TORCH_CUDA_ARCH_LIST"] = "8.0"
    pip = [python, "-m", "pip", "install", "--no-build-isolation", "--no-deps", "--no-cache-dir"]
    run([*pip, sdist], cwd=tmp_path, env=env)

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    out = run([python, "-c", INSTALLED_CHECK], cwd=elsewhere, env=env)
    facts = json.loads(out.stdout.strip().splitlines()[-1])
    assert Path(facts["file"]).resolve().is_relative_to((tmp_path / "env").resolve()), facts["file"]
    assert facts["extension_loaded"], facts["extension_error"]
    assert facts["cpu_backend"] == "cpu"
    assert facts["avg"] == [[0.25, 0.5, 0.75], [[3.0, 3.0], [3.0, 3.0]]]
    if EXPECT_CUDA:
        assert facts["build_info"]["cuda"], facts["build_info"]
        assert facts["build_info"]["cuda_archs"] == "8.0", facts["build_info"]
        assert facts["build_info"]["cuda_archs_from"] == "TORCH_CUDA_ARCH_LIST", facts["build_info"]
    assert facts["typed"] and facts["license"] == "BSD-3-Clause" and facts["license_file"], facts
    assert facts["version"][0] == facts["version"][1], facts["version"]
    check_cli(python, elsewhere, env)
    check_types(python, tmp_path)


def check_cli(python: Path, elsewhere: Path, env: dict) -> None:
    """`info` and `bench` of the installed package, run outside any checkout."""
    info = run([python, "-m", "swa_fast", "info"], cwd=elsewhere, env=env).stdout
    assert "(an installed package)" in info.splitlines()[0] and "extension      loaded" in info, info
    bench = run([python, "-m", "swa_fast", "bench", "--help"], cwd=elsewhere, env=env).stdout
    assert "--allow-missed" in bench and "python -m swa_fast bench" in bench, bench


def check_types(python: Path, tmp_path: Path) -> None:
    """mypy, run as a user would on their own file, sees swa_fast's annotations."""
    (tmp_path / "user.py").write_text(USER_SNIPPET)
    (tmp_path / "mypy.ini").write_text(MYPY_CONFIG)
    mypy = [sys.executable, "-m", "mypy", "--python-executable", str(python), "--config-file", "mypy.ini"]
    out = subprocess.run([*mypy, "user.py"], cwd=tmp_path, capture_output=True, text=True, timeout=600)
    said = out.stdout + out.stderr
    assert "missing library stubs or py.typed marker" not in said, said
    assert 'Revealed type is "swa_fast.averaging.EMA"' in said, said
    assert 'Revealed type is "def (model: Any)' in said, said  # EMA.update (torch's Module is Any)
    assert "def (avg: typing.Sequence[Any], src: typing.Sequence[Any], weight: Any" in said, said
