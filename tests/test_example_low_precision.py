"""examples/low_precision_ema.py at a small budget: it writes its plot and table, the bf16 average
rounded to nearest has not moved, and the stochastically rounded one has moved as the fp32 one did.
(The full run's figures are in docs/low-precision.md; tests/test_rounding.py holds them to a bound.)"""

import importlib.util
import json
from pathlib import Path

import pytest

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "low_precision_ema.py"


def test_low_precision_ema_example(tmp_path):
    spec = importlib.util.spec_from_file_location("low_precision_ema_example", EXAMPLE)
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    with pytest.warns(RuntimeWarning, match="stalled") as said:
        result = example.main(["--steps", "3000", "--elements", "256", "--out", str(tmp_path)])
    assert len([w for w in said if "stalled" in str(w.message)]) == 1  # the bf16 EMA rounded to nearest
    assert (tmp_path / "low_precision_ema.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    summary = json.loads((tmp_path / "low_precision_ema.json").read_text())
    assert summary == {"errors": result["errors"], "last_update": result["last_update"]}
    nearest, stochastic = result["last_update"]["bf16, nearest"], result["last_update"]["bf16, stochastic"]
    assert nearest["written"] == nearest["unchanged"] == 256 and nearest["max_update"] > 0
    assert stochastic["written"] == 256 and stochastic["max_update"] > 0
    curves = result["curves"]
    assert len(set(curves["bf16, nearest"])) == 1  # stalled at the start
    moved = curves["fp32"][-1] - curves["fp32"][0]
    assert moved > 0.02
    assert abs(curves["bf16, stochastic"][-1] - curves["fp32"][-1]) < 0.1 * moved
