"""swa_fast's version, in one place: `swa_fast.__version__` imports it and pyproject.toml reads it
(setuptools' `attr:`, without importing the package). A release moves it and CHANGELOG.md together."""

__version__ = "0.1.0"
