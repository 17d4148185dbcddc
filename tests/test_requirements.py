"""scripts/requirements.py, which turns pyproject.toml's lists into what the Makefile installs."""

import importlib.util
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "requirements.py"
spec = importlib.util.spec_from_file_location("requirements_script", SCRIPT)
requirements_script = importlib.util.module_from_spec(spec)
spec.loader.exec_module(requirements_script)


def pyproject(**extras):
    return {
        "build-system": {"requires": ["setuptools>=64", "torch"]},
        "project": {"name": "Swa.Fast", "dependencies": ["torch>=2.4"], "optional-dependencies": extras},
    }


def test_build_and_own_requirements_come_first_and_this_projects_extras_are_expanded():
    project = pyproject(
        a=["x", "swa_fast[b, c]"],  # another spelling of the project's name
        b=["y", "swa-fast[a]"],  # a cycle back to `a`
        c=["z>=1; python_version < '3.12'", "other[b]"],  # another project's extra stays as it is
    )
    got = requirements_script.requirements(project, ["a", "c"])
    assert got == [
        "setuptools>=64",
        "torch",
        "torch>=2.4",
        "x",
        "y",
        "z>=1; python_version < '3.12'",
        "other[b]",
    ]


def test_an_unknown_extra_is_refused_with_the_ones_there_are():
    with pytest.raises(SystemExit, match="no extra 'bench'; it has a, b"):
        requirements_script.requirements(pyproject(a=[], b=[]), ["bench"])


def test_the_makefiles_list_is_pyprojects_test_and_bench_extras_with_the_build_tools():
    ours = requirements_script.tomllib.loads(requirements_script.PYPROJECT.read_text())
    got = requirements_script.requirements(ours, ["test", "bench"])
    build_and_tests = {"setuptools>=77", "wheel", "ninja", "torch>=2.4", "pytest", "pytest-benchmark", "ruff"}
    libraries = {"timm", "diffusers", "ema-pytorch", "torch-ema", "lightning", "scikit-learn"}
    assert build_and_tests | libraries <= set(got)
    # every reference to swa_fast's own extras expanded
    assert not [r for r in got if "swa" in r.lower()], got
