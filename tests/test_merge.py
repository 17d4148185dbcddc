"""swa_fast.merge: every method against a float64 oracle written here, every input format, the
output (one file, shards with an index), chunked reads, refusals that leave no output, and the
command line, and a merge killed half way."""

from __future__ import annotations

import copy
import json
import math
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import swa_fast
from swa_fast.merging import methods, streaming
from swa_fast.merging.output import AppendingFile

SHAPES = {"embed.weight": (50, 16), "block.0.weight": (16, 16), "block.0.bias": (16,), "head.weight": (7, 16)}


def state(seed: int, dtype=torch.float32, integers: bool = True) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    sd = {name: torch.randn(shape, generator=g).to(dtype) for name, shape in SHAPES.items()}
    if integers:
        sd["bn.num_batches_tracked"] = torch.tensor(100 + seed)
    return sd


def save_all(tmp_path: Path, states, suffix=".safetensors", names=None) -> list[Path]:
    paths = []
    for i, sd in enumerate(states):
        path = tmp_path / ((names[i] if names else f"ckpt-{i}") + suffix)
        save_file(sd, path) if suffix == ".safetensors" else torch.save(sd, path)
        paths.append(path)
    return paths


def oracle(states, weights) -> dict[str, torch.Tensor]:
    """sum_k weights[k] * states[k], in float64."""
    return {
        name: sum(w * sd[name].double() for w, sd in zip(weights, states))
        for name in states[0]
        if states[0][name].is_floating_point()
    }


def assert_close_to(result: dict, expected: dict, dtype=torch.float32) -> None:
    for name, want in expected.items():
        got = result[name]
        assert got.dtype == dtype and got.shape == want.shape, name
        # one rounding of the float64 value into `dtype` (fp32 accumulation: a few ulps)
        tol = {torch.float32: 1e-6, torch.bfloat16: 1e-2, torch.float16: 2e-3, torch.float64: 1e-12}[dtype]
        torch.testing.assert_close(got.double(), want, rtol=tol, atol=tol * max(1.0, want.abs().max().item()))


# --- methods ----------------------------------------------------------------------------------------


def test_mean_of_safetensors_files(tmp_path):
    states = [state(i) for i in range(5)]
    paths = save_all(tmp_path, states)
    result = swa_fast.merge(paths, tmp_path / "out.safetensors")
    merged = load_file(tmp_path / "out.safetensors")
    umask = os.umask(0o022)
    os.umask(umask)
    assert (tmp_path / "out.safetensors").stat().st_mode & 0o777 == 0o666 & ~umask  # as any new file
    assert_close_to(merged, oracle(states, [0.2] * 5))
    assert merged["bn.num_batches_tracked"].item() == 104  # taken from the last input, as it is
    assert result.taken == {"bn.num_batches_tracked": os.fspath(paths[-1])}
    assert result.averaged == 4 and result.weights == pytest.approx([0.2] * 5)


def test_explicit_weights_are_normalised(tmp_path):
    states = [state(i) for i in range(3)]
    result = swa_fast.merge(save_all(tmp_path, states), weights=[1, 2, 5])
    assert_close_to(result.tensors, oracle(states, [1 / 8, 2 / 8, 5 / 8]))


def test_ema_over_ordered_checkpoints(tmp_path):
    states = [state(i) for i in range(4)]
    result = swa_fast.merge(save_all(tmp_path, states), method="ema", decay=0.7)
    expected = {n: states[0][n].double() for n in SHAPES}  # the recurrence itself, in float64
    for sd in states[1:]:
        expected = {n: 0.7 * expected[n] + 0.3 * sd[n].double() for n in SHAPES}
    assert_close_to(result.tensors, expected)


def test_lawa_takes_the_last_k_of_a_folder_in_step_order(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    steps = [100, 200, 300, 400, 500, 600, 700]
    states = {s: state(s) for s in steps}
    for s in reversed(steps):  # written out of order: the step in the name orders them
        (run / f"checkpoint-{s}").mkdir()
        save_file(states[s], run / f"checkpoint-{s}" / "model.safetensors")
    save_file(state(0), run / "model.safetensors")  # a Trainer's final save beside its checkpoints
    (run / "training_args.bin").write_bytes(b"not a checkpoint")
    result = swa_fast.merge([run], method="lawa", last=3, every=2)
    assert [Path(p).parent.name for p in result.inputs] == [
        "checkpoint-300",
        "checkpoint-500",
        "checkpoint-700",
    ]
    assert_close_to(result.tensors, oracle([states[300], states[500], states[700]], [1 / 3] * 3))
    with pytest.raises(ValueError, match="give last=k"):
        swa_fast.merge([run], method="lawa")
    with pytest.raises(ValueError, match="only 4 of the 7"):
        swa_fast.merge([run], method="lawa", last=5, every=2)


@pytest.mark.parametrize("schedule", ["linear", "cosine", "1-sqrt"])
def test_wsm_weights_emulate_the_decay(tmp_path, schedule):
    shape = {
        "linear": lambda x: 1 - x,
        "cosine": lambda x: (1 + math.cos(math.pi * x)) / 2,
        "1-sqrt": lambda x: 1 - x**0.5,
    }
    k = 5  # six checkpoints theta_0..theta_5
    w = [shape[schedule](i / (k + 1)) for i in range(1, k + 1)]
    # WSM's inverse mapping: w_i = sum_{j >= i} c_j, sum_j c_j = 1
    c = methods.wsm_weights(k + 1, schedule)
    assert sum(c) == pytest.approx(1.0)
    assert [sum(c[i:]) for i in range(1, k + 1)] == pytest.approx(w)
    assert all(x >= 0 for x in c)
    if schedule == "linear":
        assert c == pytest.approx([1 / 6] * 6)  # a linear decay is the uniform mean
    states = [state(i) for i in range(k + 1)]
    result = swa_fast.merge(save_all(tmp_path, states), method="wsm", schedule=schedule)
    assert_close_to(result.tensors, oracle(states, c))


def test_task_arithmetic(tmp_path):
    base, fts = state(0), [state(i) for i in (1, 2, 3)]
    paths = save_all(tmp_path, fts)
    save_file(base, tmp_path / "base.safetensors")
    result = swa_fast.merge(paths, method="task-arithmetic", base=tmp_path / "base.safetensors", scale=0.4,
                            weights=[1.0, 0.5, 2.0])  # fmt: skip
    expected = {
        n: base[n].double()
        + 0.4 * sum(w * (ft[n].double() - base[n].double()) for w, ft in zip([1, 0.5, 2], fts))
        for n in SHAPES
    }
    assert_close_to(result.tensors, expected)
    assert result.inputs[0].endswith("base.safetensors")


def ties_oracle(base, fts, density, scale):
    out = {}
    for n in SHAPES:
        b = base[n].double().flatten()
        trimmed = []
        for ft in fts:
            tau = ft[n].double().flatten() - b
            keep = max(1, math.ceil(density * tau.numel()))
            threshold = sorted(tau.abs().tolist(), reverse=True)[keep - 1]
            trimmed.append([t if abs(t) >= threshold else 0.0 for t in tau.tolist()])
        merged = []
        for j in range(b.numel()):
            values = [t[j] for t in trimmed]
            total = sum(values)
            sign = (total > 0) - (total < 0)
            chosen = [v for v in values if v != 0 and ((v > 0) - (v < 0)) == sign]
            merged.append(sum(chosen) / len(chosen) if chosen else 0.0)
        out[n] = (b + scale * torch.tensor(merged, dtype=torch.float64)).view(base[n].shape)
    return out


def test_ties(tmp_path):
    base, fts = state(0), [state(i) for i in (1, 2, 3)]
    save_file(base, tmp_path / "base.safetensors")
    result = swa_fast.merge(save_all(tmp_path, fts), method="ties", base=tmp_path / "base.safetensors",
                            density=0.3, scale=0.8)  # fmt: skip
    assert_close_to(result.tensors, ties_oracle(base, fts, 0.3, 0.8))


def test_dare(tmp_path):
    base, fts = state(0), [state(i) for i in (1, 2)]
    save_file(base, tmp_path / "base.safetensors")
    paths = save_all(tmp_path, fts)
    basefile = tmp_path / "base.safetensors"
    # no drop: task arithmetic
    plain = swa_fast.merge(paths, method="dare", base=basefile, drop=0.0).tensors
    assert_close_to(
        plain, {n: base[n].double() + sum(ft[n].double() - base[n].double() for ft in fts) for n in SHAPES}
    )
    # one model: each element is the base's or base + (ft - base) / (1 - p), about 1 - p of them the latter
    one = swa_fast.merge(paths[:1], method="dare", base=basefile, drop=0.75, seed=3).tensors
    kept = total = 0
    for n in SHAPES:
        b, tau = base[n].double(), fts[0][n].double() - base[n].double()
        rescaled = b + tau / 0.25
        got = one[n].double()
        is_base = torch.isclose(got, b, rtol=0, atol=1e-6)
        is_kept = torch.isclose(got, rescaled, rtol=1e-6, atol=1e-5)
        assert bool((is_base | is_kept).all()), n
        kept += int((is_kept & ~is_base).sum())
        total += b.numel()
    assert abs(kept / total - 0.25) < 0.05
    again = swa_fast.merge(paths[:1], method="dare", base=basefile, drop=0.75, seed=3).tensors
    other = swa_fast.merge(paths[:1], method="dare", base=basefile, drop=0.75, seed=4).tensors
    assert all(torch.equal(one[n], again[n]) for n in SHAPES)
    assert not all(torch.equal(one[n], other[n]) for n in SHAPES)


def test_greedy_soup(tmp_path):
    target = state(99, integers=False)
    offsets = [0.1, 0.2, -0.25, -0.3]  # each candidate: the target moved by its offset
    states = [{n: target[n] + offset for n in SHAPES} for offset in offsets]
    paths = save_all(tmp_path, states)

    def score(sd):
        return -sum(float((sd[n].double() - target[n].double()).pow(2).sum()) for n in SHAPES)

    result, kept = swa_fast.greedy_soup(paths, score)
    # the best alone (0.1); with 0.2 the mean is 0.15 (worse: left out); with -0.25 it is -0.075
    # (better: kept); with -0.3 too it would be -0.15 (worse)
    assert kept == [0, 2]
    assert_close_to(result.tensors, oracle([states[0], states[2]], [0.5, 0.5]))


# --- dtypes and chunks --------------------------------------------------------------------------------


def test_bf16_inputs_and_output_dtype(tmp_path):
    states = [state(i, torch.bfloat16) for i in range(3)]
    paths = save_all(tmp_path, states)
    own = swa_fast.merge(paths).tensors
    assert_close_to(own, oracle(states, [1 / 3] * 3), torch.bfloat16)
    widened = swa_fast.merge(paths, dtype=torch.float32).tensors
    assert_close_to(widened, oracle(states, [1 / 3] * 3), torch.float32)
    assert widened["bn.num_batches_tracked"].dtype == torch.int64  # integers keep their dtype


def test_large_tensors_are_read_in_chunks(tmp_path):
    g = torch.Generator().manual_seed(0)
    states = [
        {"big": torch.randn(3_000_000, generator=g), "small": torch.randn(5, generator=g)} for _ in range(3)
    ]
    paths = save_all(tmp_path, states)
    result = swa_fast.merge(paths, tmp_path / "out.safetensors", memory_limit=1 << 20)
    # 1 MiB chunks (the least): SLOTS per input, 1 out; and the output's two staging blocks
    assert result.memory_bound == (1 << 20) * (streaming.SLOTS * 3 + 1) + 2 * AppendingFile.STAGE
    assert_close_to(load_file(tmp_path / "out.safetensors"), oracle(states, [1 / 3] * 3))


# --- formats --------------------------------------------------------------------------------------------


def test_torch_files_pt_bin_and_lightning(tmp_path):
    states = [state(i) for i in range(3)]
    pt = save_all(tmp_path, states[:1], ".pt")
    binary = save_all(tmp_path, states[1:2], ".bin", names=["pytorch_model"])
    lightning = tmp_path / "epoch=3-step=30.ckpt"
    torch.save({"epoch": 3, "global_step": 30, "state_dict": states[2]}, lightning)
    result = swa_fast.merge([*pt, *binary, lightning])
    assert_close_to(result.tensors, oracle(states, [1 / 3] * 3))
    # tensors saved as strided views (read through a contiguous copy, never by dropping its pages)
    strided = [{"t": torch.randn(600, 500, generator=torch.Generator().manual_seed(i)).t()} for i in range(2)]
    paths = save_all(tmp_path, strided, ".pt", names=["s0", "s1"])
    assert_close_to(swa_fast.merge(paths, memory_limit=1).tensors, oracle(strided, [0.5, 0.5]))


def test_hugging_face_sharded_folders_in_and_out(tmp_path):
    states = [state(i) for i in range(2)]
    folders = []
    for i, sd in enumerate(states):  # as save_pretrained shards: two files and an index
        folder = tmp_path / f"model-{i}"
        folder.mkdir()
        names = list(sd)
        parts = {"model-00001-of-00002.safetensors": names[:2], "model-00002-of-00002.safetensors": names[2:]}
        for file, part in parts.items():
            save_file({n: sd[n] for n in part}, folder / file)
        index = {"metadata": {}, "weight_map": {n: f for f, part in parts.items() for n in part}}
        (folder / "model.safetensors.index.json").write_text(json.dumps(index))
        folders.append(folder)
    out = tmp_path / "merged"
    result = swa_fast.merge(folders, out, max_shard_size=1500)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    files = sorted(p.name for p in out.iterdir())
    assert len(result.outputs) > 1 and files == sorted(
        [Path(p).name for p in result.outputs] + [index_name()]
    )
    merged = {}
    for file in set(index["weight_map"].values()):
        merged.update(load_file(out / file))
    assert set(merged) == set(states[0])
    assert_close_to(merged, oracle(states, [0.5, 0.5]))
    again = swa_fast.merge([out, out]).tensors  # our output read back as an input
    assert all(torch.equal(again[n], merged[n]) for n in merged)


def index_name():
    return "model.safetensors.index.json"


def test_distributed_checkpoint_folders(tmp_path):
    import torch.distributed.checkpoint as dcp

    states = [state(i) for i in range(2)]
    folders = []
    for i, sd in enumerate(states):
        folder = tmp_path / f"dcp-{i}"
        dcp.save(sd, checkpoint_id=folder, no_dist=True)
        folders.append(folder)
    result = swa_fast.merge(folders)
    assert_close_to(result.tensors, oracle(states, [0.5, 0.5]))
    assert result.tensors["bn.num_batches_tracked"].item() == 101


def test_posthoc_snapshot_files(tmp_path):
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.BatchNorm1d(3))
    ema = swa_fast.PostHocEMA(
        model, sigma_rels=(0.05, 0.28), snapshot_every=2, snapshot_dir=tmp_path / "snaps"
    )
    for _ in range(4):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p))
        model.train()(torch.randn(8, 4))
        ema.update(model)
    ema.flush()
    final = copy.deepcopy(model)
    ema.copy_to(final, sigma_rel=0.05)  # the first profile's average, which the last snapshot holds
    snapshot_files = sorted((tmp_path / "snaps").iterdir())
    assert len(snapshot_files) == 2
    result = swa_fast.merge([tmp_path / "snaps"])  # a folder of snapshots, in step order
    from swa_fast.merging.inputs import snapshot_tensors
    from swa_fast.posthoc.snapshots import load_snapshot

    expected = [snapshot_tensors(load_snapshot(p)) for p in snapshot_files]
    for name, t in final.named_parameters():  # the snapshot reader against the manager itself
        assert_close_to({name: expected[1][name]}, {name: t.detach().double()}, dtype=expected[1][name].dtype)
    for name, got in result.tensors.items():
        if got.is_floating_point():
            mean = (expected[0][name].double() + expected[1][name].double()) / 2
            assert_close_to({name: got}, {name: mean}, dtype=expected[0][name].dtype)


# --- refusals: nothing written --------------------------------------------------------------------------


def refused(tmp_path, match, *args, **kwargs):
    out = tmp_path / "out.safetensors"
    with pytest.raises(ValueError, match=match):
        swa_fast.merge(*args, output=out, **kwargs)
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith((".out", "out"))] == []


def test_missing_and_extra_keys_are_listed(tmp_path):
    a, b = state(0), state(1)
    b["extra.weight"] = b.pop("head.weight")
    refused(tmp_path, r"missing \['head.weight'\].*extra \['extra.weight'\]", save_all(tmp_path, [a, b]))


def test_shape_and_dtype_mismatches_name_the_tensor_and_files(tmp_path):
    a, b = state(0), state(1)
    b["head.weight"] = torch.zeros(8, 16)
    refused(tmp_path, r"'head.weight' is float32 \[7, 16\] in .*ckpt-0.* but float32 \[8, 16\] in .*ckpt-1",
            save_all(tmp_path, [a, b]))  # fmt: skip
    c = state(2)
    c["head.weight"] = c["head.weight"].half()
    refused(tmp_path, "'head.weight' is float32 .* but float16", save_all(tmp_path, [a, c], names=["a", "c"]))


def test_weights_of_the_wrong_count(tmp_path):
    refused(
        tmp_path,
        "2 weights given for 3 inputs",
        save_all(tmp_path, [state(i) for i in range(3)]),
        weights=[1, 2],
    )


def test_non_finite_values_refused_unless_allowed(tmp_path):
    a, b = state(0), state(1)
    b["block.0.bias"][3] = float("nan")
    paths = save_all(tmp_path, [a, b])
    refused(tmp_path, r"'block.0.bias' is not finite \(inf or NaN in .*ckpt-1", paths)
    out = tmp_path / "allowed.safetensors"
    swa_fast.merge(paths, out, allow_non_finite=True)
    assert torch.isnan(load_file(out)["block.0.bias"][3])


def test_corrupt_files_are_named(tmp_path):
    good = save_all(tmp_path, [state(0)])[0]
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(good.read_bytes()[:-100])
    refused(tmp_path, "truncated.safetensors.*truncated", [good, truncated])
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not json at all!")
    refused(tmp_path, "garbage.safetensors.*not JSON", [good, garbage])
    bad_pt = tmp_path / "bad.pt"
    bad_pt.write_bytes(b"this is no zip file")
    refused(tmp_path, "bad.pt.*not a readable torch checkpoint", [good, bad_pt])
    refused(tmp_path, "nowhere.safetensors.* does not exist", [good, tmp_path / "nowhere.safetensors"])


def test_settings_refused(tmp_path):
    paths = save_all(tmp_path, [state(0), state(1)])
    refused(tmp_path, "method must be one of", paths, method="median")
    refused(tmp_path, "needs a decay in", paths, method="ema")
    refused(tmp_path, "needs a base model", paths, method="ties")
    refused(tmp_path, "takes no base model", paths, base=paths[0])
    refused(tmp_path, "sets its own weights", paths, method="wsm", weights=[1, 2])
    refused(tmp_path, "must not sum to 0", paths, weights=[1, -1])


def test_an_existing_output_folder_is_refused(tmp_path):
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "keep.txt").write_text("mine")
    with pytest.raises(ValueError, match="exists and is not empty"):
        swa_fast.merge(save_all(tmp_path, [state(0)]), tmp_path / "taken")
    assert (tmp_path / "taken" / "keep.txt").read_text() == "mine"


def test_a_failure_half_way_leaves_nothing(tmp_path):
    a, b = state(0), state(1)
    b["head.weight"][0, 0] = float("inf")  # the last tensor: the others were written by then
    out = tmp_path / "merged"
    with pytest.raises(ValueError, match="not finite"):
        swa_fast.merge(save_all(tmp_path, [a, b]), out, max_shard_size=1000)
    assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".merged")]


# --- command line ---------------------------------------------------------------------------------------


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "swa_fast", "merge", *map(str, args)], capture_output=True,
                          text=True, timeout=120)  # fmt: skip


def test_cli_dry_run_and_merge(tmp_path):
    states = [state(i) for i in range(3)]
    paths = save_all(tmp_path, states)
    out = tmp_path / "out.safetensors"
    dry = run_cli(*paths, "--output", out, "--dry-run")
    assert dry.returncode == 0, dry.stderr
    assert "weight 0.333333" in dry.stdout and "memory     at most" in dry.stdout and not out.exists()
    done = run_cli(*paths, "-o", out, "--weights", "1", "1", "2")
    assert done.returncode == 0, done.stderr
    assert "merge" in done.stderr  # the progress bar
    assert_close_to(load_file(out), oracle(states, [0.25, 0.25, 0.5]))
    bad = run_cli(*paths, "-o", tmp_path / "x.safetensors", "--weights", "1")
    assert bad.returncode == 2 and "1 weights given for 3 inputs" in bad.stderr


# --- a merge killed half way ----------------------------------------------------------------------------

KILLED_MERGE = """
import sys, time
import swa_fast
from swa_fast.merging import output

write = output.SafetensorsOutput.commit

def commit_then_wait(self, name, start, chunk):  # the real write, then a pause to be killed in
    write(self, name, start, chunk)
    open(sys.argv[1], "w").close()
    time.sleep(120)

output.SafetensorsOutput.commit = commit_then_wait
one_file = sys.argv[2].endswith(".safetensors")
swa_fast.merge(sys.argv[3:], sys.argv[2], max_shard_size=None if one_file else 1000)
"""


@pytest.mark.parametrize("name", ["out.safetensors", "out_folder"])
def test_a_killed_merge_leaves_nothing_under_the_output_name(tmp_path, name):
    paths = save_all(tmp_path, [state(0), state(1)])
    flag, out = tmp_path / "written", tmp_path / name
    process = subprocess.Popen([sys.executable, "-c", textwrap.dedent(KILLED_MERGE), flag, out, *paths])
    deadline = time.monotonic() + 60
    while not flag.exists() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert flag.exists(), "the merge wrote nothing"
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert not out.exists()
    partial = [p for p in tmp_path.iterdir() if p.name.startswith(f".{name}.")]
    assert len(partial) == 1  # the temporary it was writing, under its own name


# --- every format, one input: read back bit for bit -----------------------------------------------------


def write_format(fmt: str, sd: dict, folder: Path) -> Path:
    """`sd` saved in format `fmt` under `folder`; the path a user would give."""
    import torch.distributed.checkpoint as dcp

    folder.mkdir()
    if fmt == "safetensors":
        save_file(sd, folder / "m.safetensors")
        return folder / "m.safetensors"
    if fmt in ("pt", "bin"):
        torch.save(sd, folder / f"m.{fmt}")
        return folder / f"m.{fmt}"
    if fmt == "lightning":
        torch.save({"state_dict": sd, "epoch": 1}, folder / "m.ckpt")
        return folder / "m.ckpt"
    if fmt == "dcp":
        dcp.save(sd, checkpoint_id=folder / "dcp", no_dist=True)
        return folder / "dcp"
    names = list(sd)  # sharded Hugging Face folder
    save_file({n: sd[n] for n in names[:2]}, folder / "a.safetensors")
    save_file({n: sd[n] for n in names[2:]}, folder / "b.safetensors")
    weight_map = {n: "a.safetensors" if i < 2 else "b.safetensors" for i, n in enumerate(names)}
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    return folder


@pytest.mark.filterwarnings("ignore:.*single process")
@pytest.mark.parametrize("fmt", ["safetensors", "sharded", "pt", "bin", "lightning", "dcp"])
def test_every_format_round_trips(tmp_path, fmt):
    sd = {
        **state(7),
        "half": torch.randn(3, 5).half(),
        "bf": torch.randn(9).bfloat16(),
        "mask": torch.rand(4) > 0.5,
    }
    path = write_format(fmt, sd, tmp_path / "in")
    swa_fast.merge([path], tmp_path / "out.safetensors")
    back = load_file(tmp_path / "out.safetensors")
    assert set(back) == set(sd)
    for name, t in sd.items():
        assert back[name].dtype == t.dtype and torch.equal(back[name], t), name


def test_a_sharded_output_loads_with_from_pretrained(tmp_path):
    transformers = pytest.importorskip("transformers")
    config = transformers.GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=100, n_positions=16)
    models = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        model = transformers.GPT2LMHeadModel(config)
        model.save_pretrained(tmp_path / f"m{seed}", max_shard_size="20KB")
        models.append(model)
    assert (tmp_path / "m0" / "model.safetensors.index.json").exists()
    out = tmp_path / "soup"
    swa_fast.merge([tmp_path / "m0", tmp_path / "m1"], out, max_shard_size=30_000)
    config.save_pretrained(out)
    soup = transformers.GPT2LMHeadModel.from_pretrained(out)
    for (name, got), a, b in zip(
        soup.state_dict().items(), models[0].state_dict().values(), models[1].state_dict().values()
    ):
        if got.is_floating_point():
            torch.testing.assert_close(got, (a + b) / 2, msg=name)


@pytest.mark.parametrize("direct", [True, False])
def test_appending_file_direct_and_plain(tmp_path, direct):
    """The output's writer: bytes gathered into aligned blocks written with O_DIRECT, or written
    plainly (where a file system refuses O_DIRECT)."""
    from swa_fast.merging.output import AppendingFile

    path = tmp_path / "appended"

    class Small(AppendingFile):
        STAGE = 3 * AppendingFile.BLOCK  # several stage writes for a few kilobytes

    pieces = [os.urandom(n) for n in (1, 4095, 4096, 5000, 13000, 7, 0, 12288)]
    try:
        file = Small(path, direct=direct)
        assert (file._direct is not None) == direct  # (this file system takes O_DIRECT)
        for piece in pieces:
            file.write(piece)
        file.close()
        assert path.read_bytes() == b"".join(pieces)
    finally:
        path.unlink(missing_ok=True)


def test_a_tensor_misaligned_in_its_file_is_copied(tmp_path):
    """A float32 tensor after an odd-sized bf16 one starts 2 bytes off its alignment: no memory-mapped
    view of it, so it is read with preadv into a buffer."""
    from swa_fast.merging import inputs, safetensors_format

    states = []
    for i in range(2):
        g = torch.Generator().manual_seed(i)
        sd = {"odd": torch.randn(3, generator=g).bfloat16(), "f": torch.randn(5, generator=g)}
        header = safetensors_format.header_bytes({n: (t.dtype, tuple(t.shape)) for n, t in sd.items()}, {})
        data = b"".join(t.view(torch.uint8).numpy().tobytes() for t in sd.values())
        (tmp_path / f"m{i}.safetensors").write_bytes(header + data)
        states.append(sd)
    opened = inputs.SafetensorsFile(tmp_path / "m0.safetensors")
    assert opened.view("f", 0, 5) is None and opened.view("odd", 0, 3) is not None
    opened.close()
    result = swa_fast.merge([tmp_path / "m0.safetensors", tmp_path / "m1.safetensors"]).tensors
    assert_close_to({"f": result["f"]}, {"f": (states[0]["f"].double() + states[1]["f"].double()) / 2})
