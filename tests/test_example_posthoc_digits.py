"""examples/posthoc_digits.py end to end at a tiny budget: it trains with snapshots, synthesizes
every sigma_rel of its grid, picks the best by validation loss and writes its outputs. Which
sigma_rel wins is not asserted (a couple of epochs on a subsample prove nothing about it)."""

import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest

from swa_fast.posthoc.profiles import Reconstruction, profile_weights, sigma_rel_to_gamma

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "posthoc_digits.py"


@pytest.fixture(scope="module")
def example():
    sys.path.insert(0, str(EXAMPLE.parent))  # it imports examples/digits.py by name
    spec = importlib.util.spec_from_file_location("posthoc_digits_example", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_posthoc_digits_end_to_end(example, tmp_path):
    argv = ["--epochs", "2", "--subsample", "300", "--width", "4", "--snapshot-every", "5"]
    argv += ["--grid", "0.03", "0.05", "0.15", "--out", str(tmp_path)]
    report = example.main(argv)
    for key in ("table", "json", "grid_plot", "profile_plot"):
        path = Path(report["files"][key])
        assert path.parent == tmp_path and path.stat().st_size > 0, key
    for key in ("grid_plot", "profile_plot"):
        assert Path(report["files"][key]).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    saved = json.loads((tmp_path / "posthoc_results.json").read_text())
    assert saved["steps"] % 5 and saved["snapshots"] == math.ceil(saved["steps"] / 5) >= 2  # and the last
    # Every row stands for the last step: the tracked averages' and the synthesized ones'.
    assert {row["step"] for row in [*saved["grid"], *saved["rows"].values()]} == {saved["steps"]}
    grid = {row["sigma_rel"]: row for row in saved["grid"]}
    assert sorted(grid) == [0.03, 0.05, 0.15]
    assert saved["chosen_sigma_rel"] == min(grid, key=lambda s: grid[s]["val_nll"])
    assert grid[0.05]["profile_error"] < 1e-6  # a tracked profile: reproduced exactly
    for row in grid.values():
        assert math.isfinite(row["val_nll"]) and 0.0 <= row["test_acc"] <= 1.0
    assert {"last iterate", "tracked 0.05", "tracked 0.1"} <= set(saved["rows"])
    assert saved["averaging_s"] > 0
    assert "| sigma_rel |" in (tmp_path / "posthoc_results.md").read_text()


def test_step_weights_of_a_tracked_profile_are_its_own(example):
    # Reproducing a tracked profile exactly: the per-step weights are that profile's.
    gamma = sigma_rel_to_gamma(0.05)
    gammas = {10: [gamma], 20: [gamma]}
    reconstruction = Reconstruction([0.0, 1.0], [(10, 0), (20, 0)], 0.0)
    weights = example.step_weights(reconstruction, gammas, 20)
    expected = profile_weights(gamma, range(1, 21))
    assert weights.tolist() == pytest.approx(expected, rel=1e-12)
    assert float(weights.sum()) == pytest.approx(1.0, rel=1e-12)


def test_every_option_has_help(example):
    parser = example.parser()
    missing = [a.option_strings for a in parser._actions if a.option_strings and not a.help]
    assert not missing, missing
    assert "(default:" in parser.format_help()  # the defaults shown beside the help
