"""Prints what the Makefile's .venv installs, one requirement a line, all read from pyproject.toml
so that it is the one list: the build's requirements (the extension is built without build
isolation, so they must be in .venv), swa_fast's own dependencies, then the extras named.

    python scripts/requirements.py test bench > requirements.txt

An extra may name others of this project (`swa_fast[examples]`); they are expanded here, since pip
given that line alone would look for swa_fast in the package index.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10: the Makefile installs tomli there
    import tomli as tomllib

PYPROJECT = Path(__file__).resolve().parents[1] / "pyproject.toml"
EXTRAS_OF = re.compile(r"([A-Za-z0-9._-]+)\s*\[([^\]]*)\]$")  # name[extra, ...], nothing after


def normalized(name: str) -> str:
    """A distribution name as pip compares them (PEP 503)."""
    return re.sub(r"[-_.]+", "-", name).lower()


def requirements(pyproject: dict, extras: list[str]) -> list[str]:
    """The build's and the project's requirements and those of `extras`, each once, in that order."""
    project = pyproject["project"]
    found = [*pyproject["build-system"]["requires"], *project.get("dependencies", [])]
    for extra in extras:
        found += extra_requirements(project, extra, seen=set())
    return list(dict.fromkeys(found))


def extra_requirements(project: dict, extra: str, seen: set[str]) -> list[str]:
    """The requirements of one extra, with the extras of this project it names expanded in place."""
    lists = project.get("optional-dependencies", {})
    if extra not in lists:
        raise SystemExit(f"pyproject.toml has no extra {extra!r}; it has {', '.join(sorted(lists))}")
    seen.add(extra)
    out = []
    for requirement in lists[extra]:
        own = EXTRAS_OF.fullmatch(requirement.strip())
        if own and normalized(own[1]) == normalized(project["name"]):
            for inner in (e.strip() for e in own[2].split(",")):
                if inner not in seen:
                    out += extra_requirements(project, inner, seen)
        else:
            out.append(requirement)
    return out


def main(argv: list[str]) -> None:
    pyproject = tomllib.loads(PYPROJECT.read_text())
    print("\n".join(requirements(pyproject, argv)))


if __name__ == "__main__":
    main(sys.argv[1:])
