"""The benchmark runner runs end to end (on a small workload, with short timings) and writes what
it promises; the figures themselves are for `make bench`, not for a test."""

import json

import torch

from swa_fast.benchmarks import run


def test_runner_writes_table_json_and_plot(tmp_path, capsys):
    run.main(["--device", "cpu", "--sets", "tiny-1000", "--min-run-time", "0.03", "--out", str(tmp_path)])
    out = capsys.readouterr().out
    result = json.loads((tmp_path / "results.json").read_text())
    methods = {r["method"] for r in result["rows"]}
    assert {"naive", "AveragedModel", "swa_fast AveragedModel", "swa_fast:foreach"} <= methods
    assert result["meta"]["torch"] == torch.__version__ and result["meta"]["copy_GBps"] > 0
    assert all(r["median_ms"] > 0 and r["x_vs_naive"] > 0 for r in result["rows"])
    assert "swa_fast AveragedModel" in out
    # Peak extra memory: torch's per-parameter loop makes temporaries, the fused op none.
    peak = {r["method"]: r["peak_extra_MB"] for r in result["rows"] if r["workload"] == "tiny-1000"}
    assert peak["swa_fast:cpu"] < 0.001 < peak["AveragedModel"] or "swa_fast:cpu" not in peak
    apis = {"swa_fast.lerp_", "AveragedModel", "swa_fast AveragedModel avg_fn", "swa_fast.EMA.update"}
    targets = {t[0]: t for t in result["targets"]}
    for workload in ("tiny MLP with BatchNorm", "500 modules, 1,000 tensors", "12 encoder layers, d=64"):
        one_update = {r["method"]: r for r in result["rows"] if r["workload"] == f"one update: {workload}"}
        assert apis <= set(one_update) and one_update["swa_fast.lerp_"]["x_bare_op"] == 1
        assert f"one update: {workload}: swa_fast.SWA.update <=" in " ".join(targets)
        assert f"one update: {workload} (" in out  # the per-call times and ratios, printed
    assert "tiny-1000 float32: x vs AveragedModel >= 100" in targets
    assert "targets, from ratios measured in this run:" in out
    assert (tmp_path / "lerp_bandwidth.png").stat().st_size > 0
