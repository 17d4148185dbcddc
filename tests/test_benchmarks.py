"""The benchmark runner runs end to end (on a small workload, with short timings) and writes what
it promises; the figures themselves are for `make bench`, not for a test."""

import importlib.util
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import swa_fast
from swa_fast.benchmarks import deepspeed as ds_bench
from swa_fast.benchmarks import merge as merge_bench
from swa_fast.benchmarks import merge_probe, report, run, targets
from swa_fast.benchmarks.shapes import gpt2_small
from swa_fast.benchmarks.timing import COPY


def test_runner_writes_table_json_and_plot(tmp_path, capsys):
    argv = ["--device", "cpu", "--sets", "tiny-1000", "--min-run-time", "0.03", "--out", str(tmp_path)]
    status = run.main(argv)
    captured = capsys.readouterr()
    out = captured.out
    result = json.loads((tmp_path / "results.json").read_text())
    # A missed target (likely with timings this short) makes the exit status 1, and only then.
    missed = [t for t in result["targets"] if not t[2]]
    assert status == (1 if missed else 0), (status, missed)
    assert f"{len(missed)} MISSED" in out and all(f"MISSED {t[0]}: {t[1]}" in out for t in missed)
    # Progress on stderr, one line per step, and none of the profiler's or the driver's own lines.
    assert "1/" in captured.err and "done in" in captured.err
    assert "USDT" not in captured.err and "gpuGetDeviceCount" not in captured.err, captured.err
    methods = {r["method"] for r in result["rows"]}
    assert {"naive", "AveragedModel", "swa_fast AveragedModel", "swa_fast:foreach", COPY} <= methods
    assert {"swa_fast BEMA.update", "TRL BEMACallback._update_bema_weights"} <= methods
    assert result["meta"]["torch"] == torch.__version__ and result["meta"]["copy_GBps"] > 0
    assert all(r["median_ms"] > 0 and r["x_vs_naive"] > 0 for r in result["rows"])
    assert "swa_fast AveragedModel" in out
    # Every workload timed with its own copy of the same bytes, the baseline of its fractions.
    for workload in {(r["workload"], r["params"]) for r in result["rows"] if "of_copy_bw" in r}:
        mine = {r["method"]: r for r in result["rows"] if (r["workload"], r["params"]) == workload}
        assert mine[COPY]["of_copy_bw"] == 1.0, workload
        for r in mine.values():
            assert r["of_copy_bw"] == pytest.approx(mine[COPY]["median_ms"] / r["median_ms"]), r["method"]
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
    # The Trainer step with the EMA callback against none: reported in percent, no target.
    trainer = {r["method"]: r for r in result["rows"] if r["workload"].startswith("HF Trainer step")}
    assert set(trainer) == {"Trainer step, no callback", "Trainer step + EMACallback"}, set(trainer)
    assert 0 < trainer["Trainer step + EMACallback"]["in_step_pct"] < 100
    assert "EMACallback (reported, no target): its on_step_end takes" in out
    # The DeepSpeed ZeRO-3 rows (two ranks of their own), where deepspeed is installed.
    zero3 = {r["method"] for r in result["rows"] if r["workload"] == "tiny-1000 ZeRO-3 EMA update"}
    assert ds_bench.deepspeed_missing() is not None or ds_bench.DEEPSPEED_BARE in zero3, zero3
    overhead = f"tiny-1000 ZeRO-3 EMA update: {ds_bench.DEEPSPEED_METHOD} <= 1.5x the bare op"
    assert ds_bench.DEEPSPEED_METHOD not in zero3 or overhead in targets  # checked, whatever the figure
    # The merge of checkpoints of the first set's shapes (no mergekit: the tiny set is no model it knows).
    merged = {(r["K"], r["method"]) for r in result["rows"] if r["workload"].startswith("tiny-1000 merge K=")}
    assert merged == {(k, m) for k in (2, 10) for m in MERGE_ROWS}, merged
    assert "tiny-1000 merge K=10 float32: swa_fast.merge peak memory above imports <= 512 MiB" in targets
    assert "merging checkpoints (swa_fast.merge with" in out
    assert (tmp_path / "lerp_bandwidth.png").stat().st_size > 0


MERGE_ROWS = {targets.MERGE_RAW, targets.MERGE_METHOD, targets.MERGE_NAIVE}


def test_summary_names_each_missed_target_and_the_exit_status(capsys):
    targets = [("a >= 1", 2.0, True), ("b >= 5", 3.5, False)]
    assert report.print_summary(targets, Path("out"), "1m05s", allow_missed=False) == [targets[1]]
    out = capsys.readouterr().out
    assert "summary: 1 of 2 targets met, 1 MISSED; took 1m05s" in out
    assert "MISSED b >= 5: 3.5" in out and "exit status 1 (--allow-missed exits 0)" in out
    assert report.print_summary(targets[:1], Path("out"), "5s", allow_missed=False) == []
    assert "exit status" not in capsys.readouterr().out


def test_the_bema_target_is_the_speed_up_over_trls_update_on_gpt2():
    def row(workload, method, ms):
        return {"workload": workload, "method": method, "median_ms": ms}

    rows = [row("gpt2-small BEMA update", "TRL BEMACallback._update_bema_weights", 90.0)]
    rows += [row("gpt2-small BEMA update", "swa_fast BEMA.update", 10.0), row("tiny BEMA update", "x", 1.0)]
    assert targets.bema_targets(rows) == [
        ("gpt2-small BEMA update: swa_fast BEMA.update >= 10x TRL's BEMACallback update", 9.0, False)
    ]
    assert targets.bema_targets(rows[1:]) == []  # TRL's row missing (not installed): nothing checked


@pytest.mark.skipif(ds_bench.deepspeed_missing() is not None, reason="deepspeed is not installed")
def test_the_deepspeed_benchmark_times_each_update_on_two_ranks(capsys):
    rows = ds_bench.bench_deepspeed([(64, 32), (32,), (7,)], "tiny", None, 0.01)
    by_method = {r["method"]: r for r in rows}
    expected = {targets.DEEPSPEED_BASELINE, ds_bench.GATHER_ALL, targets.DEEPSPEED_BARE}
    if importlib.util.find_spec("swa_fast.integrations.deepspeed") is not None:
        expected.add(targets.DEEPSPEED_METHOD)
    else:  # the lead's module not there yet: the row is left out, and said so
        assert "swa_fast.integrations.deepspeed did not import" in capsys.readouterr().out
    assert set(by_method) == expected
    assert all(r["workload"] == "tiny ZeRO-3 EMA update" and r["median_ms"] > 0 for r in rows)
    # the gathers keep a full-size EMA on each rank (2,087 fp32 elements), the bare op its half
    elements = {m: round(r["ema_MB_per_rank"] * 2**20 / 4) for m, r in by_method.items()}
    assert elements[targets.DEEPSPEED_BASELINE] == elements[ds_bench.GATHER_ALL] == 2087
    for local in {targets.DEEPSPEED_BARE, targets.DEEPSPEED_METHOD} & set(elements):  # shard-local
        assert 2087 // 2 <= elements[local] <= 2087 // 2 + 3, elements


def test_the_deepspeed_targets_are_the_speed_up_over_the_gather_and_the_multiple_of_the_bare_op():
    def row(method, ms, workload="gpt2-small ZeRO-3 EMA update"):
        return {"workload": workload, "method": method, "median_ms": ms}

    rows = [row(targets.DEEPSPEED_BASELINE, 1200.0), row(targets.DEEPSPEED_METHOD, 100.0)]
    rows += [row(targets.DEEPSPEED_BARE, 80.0), row(targets.DEEPSPEED_METHOD, 1.0, workload="other")]
    ours = f"gpt2-small ZeRO-3 EMA update: {targets.DEEPSPEED_METHOD}"
    assert targets.deepspeed_targets(rows) == [
        (f"{ours} >= 10x the per-parameter gather", 12.0, True),
        (f"{ours} <= 1.5x the bare op", 1.25, True),
    ]
    assert targets.deepspeed_targets([rows[0], rows[2]]) == []  # our row missing: nothing checked


def test_the_merge_benchmarks_checkpoints_are_gpt2_smalls_tensors():
    model = merge_bench.gpt2()
    assert [s for _, s in model.tensors] == gpt2_small() and model.name == "gpt2-small"
    assert model.nbytes(torch.float32) == 124_439_808 * 4
    assert merge_bench.model_of_set(gpt2_small(), "gpt2-small").config["model_type"] == "gpt2"
    assert merge_bench.model_of_set([(3,)], "tiny").config is None


def test_the_merge_benchmarks_naive_baseline_computes_the_same_mean(tmp_path):
    model = merge_bench.gpt2(d=16, layers=1, heads=2, vocab=50, ctx=8)
    files = merge_bench.write_checkpoints(tmp_path, model, ["bfloat16"], count=3)["bfloat16"]
    merge_probe.naive_merge([str(f) for f in files], str(tmp_path / "naive.safetensors"))
    swa_fast.merge(files, tmp_path / "ours.safetensors")
    naive, ours = load_file(tmp_path / "naive.safetensors"), load_file(tmp_path / "ours.safetensors")
    assert set(naive) == {n for n, _ in model.tensors} == set(ours)
    for name, t in naive.items():
        assert t.dtype == torch.bfloat16 and torch.allclose(t.float(), ours[name].float(), atol=1e-2), name
    assert (files[0].parent / "config.json").is_file()  # a model folder, for mergekit


def test_the_merge_benchmark_times_each_merge_and_its_peak_memory(tmp_path, capsys):
    model = merge_bench.gpt2(d=32, layers=2, heads=2, vocab=100, ctx=16)
    settings = merge_bench.Settings(ks=(2, 3), dtypes=("float32",), rounds=1, folder=str(tmp_path))
    rows = merge_bench.bench_merge(model, settings)
    assert not any(tmp_path.iterdir())  # the checkpoints and outputs removed
    expected = set(MERGE_ROWS)
    python, why = merge_bench.mergekit_python(None)
    if python is not None:
        expected.add(targets.MERGE_MERGEKIT)
    else:
        assert f"{why}: the mergekit rows are left out" in capsys.readouterr().out
    assert {(r["K"], r["method"]) for r in rows} == {(k, m) for k in (2, 3) for m in expected}
    for r in rows:
        assert r["median_ms"] > 0 and r["GB/s"] > 0 and r["params"] == "float32"
        if r["method"] == targets.MERGE_RAW:
            assert r["of_raw_read"] == 1.0 and "peak_rss_above_imports_MiB" not in r
        else:  # each merge again in a fresh process: its peak above its imports, a few MiB here
            assert 0 <= r["peak_rss_above_imports_MiB"] < 256 and r["fresh_process_ms"] > 0, r
    assert {t[0].split(": ")[1] for t in targets.merge_targets(rows)} == {
        "swa_fast.merge peak memory above imports <= 512 MiB"
    }


def test_the_merge_benchmark_says_why_mergekit_is_left_out(tmp_path):
    python, why = merge_bench.mergekit_python(str(tmp_path / "no-python"))
    assert python is None and "no-python" in why
    python, why = merge_bench.mergekit_python(None)
    assert (python is None) == (importlib.util.find_spec("mergekit") is None)


def test_the_merge_targets_are_read_fraction_peak_memory_and_the_speed_up_at_k10():
    def row(k, method, ms, **more):
        return {"workload": f"gpt2-small merge K={k}", "params": "float32", "K": k, "method": method,
                "median_ms": ms, **more}  # fmt: skip

    peak = {"peak_rss_above_imports_MiB": 300}
    k10 = row(10, targets.MERGE_METHOD, 100.0, of_raw_read=0.9, x_vs_naive=2.5, **peak)
    k2 = row(2, targets.MERGE_METHOD, 30.0, of_raw_read=0.5, x_vs_naive=1.5)
    rows = [k10, k2, row(10, targets.MERGE_RAW, 90.0)]
    ours = "gpt2-small merge K=10 float32: swa_fast.merge"
    assert targets.merge_targets(rows) == [
        (f"{ours} >= 0.8 of the raw read", 0.9, True),
        (f"{ours} >= 3x naive", 2.5, False),
        (f"{ours} peak memory above imports <= 512 MiB", 300.0, True),
        ("gpt2-small merge K=2 float32: swa_fast.merge >= 0.8 of the raw read", 0.5, False),
    ]
