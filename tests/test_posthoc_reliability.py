"""PostHocEMA and its snapshots when things go wrong (issue 25): refused and interrupted updates, a
snapshot before the first update, one training run per directory, progress that does not grow,
values beyond the snapshot dtype, a failed write, checks before a synthesis writes, fp64
accumulation and the snapshot of the final state."""

from __future__ import annotations

import copy
import dataclasses
import re
import sys

import pytest
import torch
from test_posthoc import random_walk, set_to, vector_model
from torch import nn

import swa_fast
from swa_fast.ops import backends
from swa_fast.posthoc import PostHocEMA, synthesize
from swa_fast.posthoc.snapshots import (
    list_snapshots,
    load_snapshot,
    named_averages,
    save_snapshot,
    snapshot_path,
)

SIGMA_RELS = (0.05, 0.10)


def averages(ema: PostHocEMA) -> list[torch.Tensor]:
    """Every tracked average of a one-vector model, copied."""
    return [named["w"].clone() for named in ema.state_dict()["averages"]]


def counters(ema: PostHocEMA) -> tuple:
    return ema.calls, ema.updates, int(ema.n_averaged), ema.progress


def assert_same_state(ema: PostHocEMA, other: PostHocEMA) -> None:
    assert counters(ema) == counters(other)
    for mine, theirs in zip(averages(ema), averages(other)):
        assert torch.equal(mine, theirs)


def with_snapshots(directory, steps: int, every: int, dtype=torch.float32, progress=None, **options):
    """A PostHocEMA of a 4-vector model over a random walk, a snapshot every `every` updates,
    flushed; the model and the manager."""
    model = vector_model(4)
    ema = PostHocEMA(
        model, SIGMA_RELS, snapshot_every=every, snapshot_dir=directory, snapshot_dtype=dtype, **options
    )
    for i, x in enumerate(random_walk(steps, 4)):
        set_to(model, x)
        ema.update(model, progress=None if progress is None else progress[i])
    ema.flush()
    return model, ema


# --- 1. a refused update changes nothing ----------------------------------------------------------


def refuse_another_model(ema, model, t):
    ema.update(vector_model(5), progress=t)  # the same names, another shape


def refuse_a_replaced_parameter(ema, model, t):
    kept = model.w
    model.w = nn.Parameter(kept.detach().clone())
    try:
        ema.update(model, progress=t)
    finally:
        model.w = kept


def refuse_too_few_tensors(ema, model, t):
    ema.update_from([], progress=t)


def refuse_a_tensor_of_another_shape(ema, model, t):
    ema.update_from([torch.zeros(5, dtype=torch.float64)], progress=t)


REFUSALS = {
    "another model's shapes": refuse_another_model,
    "a replaced parameter": refuse_a_replaced_parameter,
    "update_from with too few tensors": refuse_too_few_tensors,
    "update_from with another shape": refuse_a_tensor_of_another_shape,
}


@pytest.mark.parametrize("refusal", REFUSALS)
def test_a_refused_update_changes_nothing_and_retrying_it_gives_the_clean_run(refusal):
    trajectory, progress = random_walk(6, 4), [3, 7, 8, 15, 16, 30]
    model = vector_model(4)
    ema = PostHocEMA(model, SIGMA_RELS, dtype=torch.float64)
    clean = PostHocEMA(model, SIGMA_RELS, dtype=torch.float64)
    for i, (x, t) in enumerate(zip(trajectory, progress)):
        set_to(model, x)
        if i == 3:
            before = copy.deepcopy(ema)
            with pytest.raises(ValueError):
                REFUSALS[refusal](ema, model, t)
            assert_same_state(ema, before)
        ema.update(model, progress=t)  # the retry, with the same progress
        clean.update(model, progress=t)
    assert_same_state(ema, clean)


@pytest.mark.parametrize("make", [swa_fast.SWA, lambda m: swa_fast.EMA(m, decay=0.5)], ids=["SWA", "EMA"])
def test_a_refused_update_of_swa_and_ema_counts_nothing(make):
    model = nn.Linear(3, 2)
    manager = make(model)
    manager.update(model)
    with pytest.raises(ValueError, match=r"'weight' has shape \[3, 3\]"):
        manager.update(nn.Linear(3, 3))  # the same names, other shapes: refused by the op's check
    assert (manager.calls, manager.updates, int(manager.n_averaged)) == (1, 1, 1)


def interrupt(event: str, name: str):
    """A trace or profile function raising KeyboardInterrupt at the first `event` of the function
    called `name` (as a Ctrl-C would be raised there), then removing itself."""

    def hook(frame, what, arg):
        called = frame.f_code.co_name if what == "call" else getattr(arg, "__name__", None)
        if what == event and called == name:
            sys.settrace(None)
            sys.setprofile(None)
            raise KeyboardInterrupt
        return None

    return hook


def interrupted_update(ema: PostHocEMA, model: nn.Module, hook, profile: bool) -> None:
    (sys.setprofile if profile else sys.settrace)(hook)
    try:
        with pytest.raises(KeyboardInterrupt):
            ema.update(model)
    finally:
        sys.settrace(None)
        sys.setprofile(None)


@pytest.mark.skipif(backends.EXTENSION_ERROR is not None, reason="the op is the extension's C function here")
def test_a_ctrl_c_during_the_op_counts_the_update_it_wrote():
    # Python raises a Ctrl-C that arrives while a C function runs as that function returns: here
    # raised at the return of the fused op, which has written the averages.
    trajectory = random_walk(4, 4)
    model = vector_model(4)
    ema, clean = (PostHocEMA(model, SIGMA_RELS, dtype=torch.float64) for _ in range(2))
    for i, x in enumerate(trajectory):
        set_to(model, x)
        if i == 2:
            interrupted_update(ema, model, interrupt("c_return", "multi_lerp_"), profile=True)
        else:
            ema.update(model)
        clean.update(model)
        assert_same_state(ema, clean)


def test_an_interrupt_before_the_update_changes_nothing():
    model = vector_model(4)
    ema, clean = (PostHocEMA(model, SIGMA_RELS, dtype=torch.float64) for _ in range(2))
    for x in random_walk(3, 4):
        set_to(model, x)
        ema.update(model)
        clean.update(model)
    interrupted_update(ema, model, interrupt("call", "tensors"), profile=False)  # reading the model
    assert_same_state(ema, clean)
    ema.update(model)
    clean.update(model)
    assert_same_state(ema, clean)


def test_an_interrupt_in_the_snapshot_keeps_the_update_and_flush_writes_it(tmp_path):
    model = vector_model(4)
    ema = PostHocEMA(model, SIGMA_RELS, snapshot_every=2, snapshot_dir=tmp_path, snapshot_dtype=torch.float64)
    clean = PostHocEMA(model, SIGMA_RELS, dtype=torch.float32)
    set_to(model, torch.ones(4, dtype=torch.float64))
    ema.update(model)
    interrupted_update(ema, model, interrupt("call", "copy_from"), profile=False)  # the snapshot's copy
    clean.update(model)
    clean.update(model)
    assert counters(ema) == counters(clean)
    ema.flush()  # the final state, whose snapshot was interrupted
    assert sorted(list_snapshots(tmp_path)) == [2]
    for saved, expected in zip(named_averages(load_snapshot(snapshot_path(tmp_path, 2))), averages(clean)):
        assert torch.equal(saved["w"], expected.double())


# --- 2. a snapshot at progress 0 ------------------------------------------------------------------


def test_a_snapshot_before_the_first_update_is_refused(tmp_path):
    model = vector_model(4)
    ema = PostHocEMA(model, snapshot_every=10, snapshot_dir=tmp_path)
    with pytest.raises(ValueError, match="before the first update"):
        ema.snapshot()
    assert not list_snapshots(tmp_path)
    ema.update(model)
    assert ema.snapshot() == snapshot_path(tmp_path, 1)
    ema.flush()
    assert synthesize(tmp_path, vector_model(4), 0.07).step == 1


@pytest.mark.parametrize("progress", [0.0, 1e-320])
def test_a_snapshot_without_a_usable_progress_is_refused_by_name(tmp_path, progress):
    # What snapshot() before the first update wrote (progress 0), or a progress so small that its
    # profile's inner products overflow: a ValueError naming the file, never a LAPACK failure.
    model, _ = with_snapshots(tmp_path, 10, 5)
    early = dataclasses.replace(
        load_snapshot(snapshot_path(tmp_path, 5), mmap=False), step=1, progress=progress
    )
    save_snapshot(snapshot_path(tmp_path, 1), early)
    before = model.w.detach().clone()
    with pytest.raises(ValueError, match=re.escape(repr(str(snapshot_path(tmp_path, 1))))):
        synthesize(tmp_path, model, 0.07)
    assert torch.equal(model.w, before)


# --- 3. one run per directory -----------------------------------------------------------------------


def file_bytes(directory) -> dict[int, bytes]:
    return {step: path.read_bytes() for step, path in list_snapshots(directory).items()}


def test_a_new_manager_refuses_a_directory_of_another_run(tmp_path):
    model, first = with_snapshots(tmp_path, 10, 5)
    written = file_bytes(tmp_path)
    second = PostHocEMA(model, SIGMA_RELS, snapshot_every=5, snapshot_dir=tmp_path)
    for _ in range(2):  # refused every time, before anything changes
        with pytest.raises(ValueError, match=r"another training run.*new snapshot_dir.*load_state_dict"):
            second.update(model)
    assert second.calls == 0 and second.progress == 0
    assert file_bytes(tmp_path) == written
    assert {load_snapshot(path).run for path in list_snapshots(tmp_path).values()} == {first.run_id}


def test_a_resumed_manager_continues_its_own_run(tmp_path):
    trajectory = random_walk(12, 4)
    model = vector_model(4)
    first = PostHocEMA(
        model, SIGMA_RELS, snapshot_every=3, snapshot_dir=tmp_path, snapshot_dtype=torch.float64
    )
    straight = PostHocEMA(
        model, SIGMA_RELS, snapshot_every=3, snapshot_dir=tmp_path / "straight", snapshot_dtype=torch.float64
    )
    for i, x in enumerate(trajectory):
        set_to(model, x)
        straight.update(model)
        if i < 9:  # the first run stops (a crash) after 9 updates; it saved its state after 6
            first.update(model)
        if i == 5:
            state = copy.deepcopy(first.state_dict())
        if i == 8:
            resumed = PostHocEMA(
                model, SIGMA_RELS, snapshot_every=3, snapshot_dir=tmp_path, snapshot_dtype=torch.float64
            )
            resumed.load_state_dict(state)
            for x_again in trajectory[6:9]:  # the updates after the saved state, again
                set_to(model, x_again)
                resumed.update(model)
        if i >= 9:
            resumed.update(model)
    resumed.flush()
    straight.flush()
    assert resumed.run_id == first.run_id != straight.run_id
    assert sorted(list_snapshots(tmp_path)) == [3, 6, 9, 12]
    assert {load_snapshot(p).run for p in list_snapshots(tmp_path).values()} == {first.run_id}
    for step in (3, 12):
        mine = named_averages(load_snapshot(snapshot_path(tmp_path, step)))
        theirs = named_averages(load_snapshot(snapshot_path(tmp_path / "straight", step)))
        for a, b in zip(mine, theirs):
            assert torch.equal(a["w"], b["w"])


def test_synthesize_refuses_snapshots_of_two_runs(tmp_path):
    model, _ = with_snapshots(tmp_path / "one", 10, 5)
    with_snapshots(tmp_path / "other", 15, 15)
    stray = snapshot_path(tmp_path / "one", 15)
    stray.write_bytes(snapshot_path(tmp_path / "other", 15).read_bytes())
    before = model.w.detach().clone()
    with pytest.raises(ValueError, match=re.escape(repr(str(stray))) + ".* another training run"):
        synthesize(tmp_path / "one", model, 0.07)
    assert torch.equal(model.w, before)
    assert synthesize(tmp_path / "one", model, 0.07, step=10).step == 10


def test_the_writer_never_replaces_a_snapshot_of_another_run(tmp_path):
    # Two managers that both took the directory while it was empty: the second one's write of a
    # step the first one wrote is refused, reported once, and the file stays the first run's.
    model = vector_model(4)
    first, second = (PostHocEMA(model, snapshot_every=2, snapshot_dir=tmp_path) for _ in range(2))
    first.update(model)
    second.update(model)
    first.update(model)
    first.flush()
    second.update(model)
    with pytest.raises(RuntimeError, match="of another training run"):
        second.flush()
    second.update(model)  # reported once: the next update goes on
    assert second.calls == 3
    assert load_snapshot(snapshot_path(tmp_path, 2)).run == first.run_id


def save_version_1(path, snapshot) -> None:
    """`snapshot` in version 1's layout (before snapshots recorded their run), key by key."""
    fields = dataclasses.asdict(snapshot)
    fields.pop("run")
    torch.save({"format": "swa_fast.PostHocEMA snapshot", "version": 1, **fields}, path)


def test_version_1_snapshots_read_as_an_unknown_run(tmp_path):
    model, ema = with_snapshots(tmp_path / "new", 20, 5)
    (tmp_path / "old").mkdir()
    for step, path in list_snapshots(tmp_path / "new").items():
        save_version_1(snapshot_path(tmp_path / "old", step), load_snapshot(path, mmap=False))
    assert {load_snapshot(p).run for p in list_snapshots(tmp_path / "old").values()} == {None}
    from_old, from_new = vector_model(4), vector_model(4)
    synthesize(tmp_path / "old", from_old, 0.07)
    synthesize(tmp_path / "new", from_new, 0.07)
    assert from_old.w.any() and torch.equal(from_old.w, from_new.w)
    fresh = PostHocEMA(model, SIGMA_RELS, snapshot_every=5, snapshot_dir=tmp_path / "old")
    with pytest.raises(ValueError, match="another training run"):
        fresh.update(model)
    # A state_dict of a swa_fast before runs were recorded continues that unknown run.
    older_state = {key: value for key, value in ema.state_dict().items() if key != "run"}
    fresh.load_state_dict(older_state)
    fresh.update(model)
    fresh.flush()
    assert fresh.run_id is None and load_snapshot(snapshot_path(tmp_path / "old", 21)).run is None
    assert synthesize(tmp_path / "old", from_old, 0.07).step == 21


# --- 4. progress that does not grow -----------------------------------------------------------------


def test_progress_that_does_not_grow_with_the_step_is_refused(tmp_path):
    model, _ = with_snapshots(tmp_path, 10, 5, progress=[10 * (i + 1) for i in range(10)])
    later = load_snapshot(snapshot_path(tmp_path, 10), mmap=False)
    save_snapshot(snapshot_path(tmp_path, 10), dataclasses.replace(later, progress=40.0))  # step 5 has 50
    before = model.w.detach().clone()
    names = [re.escape(repr(str(snapshot_path(tmp_path, s)))) for s in (5, 10)]
    with pytest.raises(ValueError, match=f"{names[1]}.*progress 40.0.*{names[0]}.*progress 50.0"):
        synthesize(tmp_path, model, 0.07)
    assert torch.equal(model.w, before)


# --- 5. values beyond the snapshot dtype --------------------------------------------------------------


DEVICES = [
    "cpu",
    pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no GPU")),
]


@pytest.mark.parametrize("device", DEVICES)
def test_a_value_beyond_float16_is_saved_in_a_dtype_that_fits(tmp_path, device):
    # Two groups (dtype=None): the bf16 layer's fits float16 and stays so; the float32 BatchNorm's
    # holds a running_var beyond float16's 65504 and is saved in float32.
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4).to(torch.bfloat16), nn.BatchNorm1d(4)).to(device)
    ema = PostHocEMA(model, SIGMA_RELS, snapshot_every=2, snapshot_dir=tmp_path, use_buffers=True, dtype=None)
    with torch.no_grad():
        model[1].running_var.fill_(8.7e9)
    beyond = r"'1.running_var' reaches 8.7e\+09, beyond torch.float16.*saved in torch.float32"
    with pytest.warns(UserWarning, match=beyond):
        for _ in range(4):
            ema.update(model)
    ema.flush()
    for step in (2, 4):
        saved = load_snapshot(snapshot_path(tmp_path, step))
        assert [flat.dtype for flat in saved.flats[0]] == [torch.float16, torch.float32]
    target = copy.deepcopy(model)
    synthesize(tmp_path, target, 0.10)  # a tracked profile: the average itself
    torch.testing.assert_close(target[1].running_var, torch.full((4,), 8.7e9, device=device))
    ema.copy_to(model, sigma_rel=0.10)
    for a, b in zip(target.state_dict().values(), model.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-3)  # the bf16 layer through float16


def test_synthesize_refuses_non_finite_values_naming_the_tensor_and_the_file(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2))
    ema = PostHocEMA(model, SIGMA_RELS, snapshot_every=5, snapshot_dir=tmp_path, snapshot_dtype=torch.float32)
    for _ in range(10):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p))
        ema.update(model)
    ema.flush()
    damaged = snapshot_path(tmp_path, 5)
    snapshot = load_snapshot(damaged, mmap=False)
    named_averages(snapshot)[1]["1.weight"][0, 1] = float("nan")  # a view of the file's flat tensor
    save_snapshot(damaged, snapshot)
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError, match=re.escape(repr(str(damaged))) + r".*non-finite.*'1.weight'"):
        synthesize(tmp_path, model, 0.07)
    for name, value in model.state_dict().items():
        assert torch.equal(value, before[name]), name


# --- 6. a failed write ------------------------------------------------------------------------------


def test_a_failed_write_is_reported_once_and_the_next_snapshot_is_written(tmp_path):
    directory = tmp_path / "snapshots"
    model = vector_model(4)
    ema = PostHocEMA(model, snapshot_every=1, snapshot_dir=directory)
    ema.update(model)
    ema.flush()
    snapshot_path(directory, 1).unlink()
    directory.rmdir()  # the next write cannot create its file
    ema.update(model)
    copy.deepcopy(ema)  # waits for the write, which fails; pickling does not raise it
    directory.mkdir()  # the space is back
    failed = re.escape(f"writing the snapshot {str(snapshot_path(directory, 2))!r} failed")
    with pytest.raises(RuntimeError, match=f"{failed}.*this update was not applied: call it again"):
        ema.update(model)
    assert ema.calls == 2
    ema.update(model)  # the retry
    ema.load_state_dict(copy.deepcopy(ema.state_dict()))
    ema.flush()
    assert ema.calls == 3 and sorted(list_snapshots(directory)) == [3]


# --- 7. everything checked before a synthesis writes ----------------------------------------------------


def test_synthesize_checks_the_integer_buffers_before_writing(tmp_path):
    model = vector_model(4)
    model.register_buffer("seen", torch.arange(2))
    ema = PostHocEMA(model, snapshot_every=2, snapshot_dir=tmp_path, use_buffers=True)
    for x in random_walk(4, 4):
        set_to(model, x)
        ema.update(model)
    ema.flush()
    other = vector_model(4)
    other.register_buffer("seen", torch.zeros(3, dtype=torch.long))
    with pytest.raises(
        ValueError, match=r"'seen' is torch.int64 of shape \[2\] there and torch.int64 of shape \[3\]"
    ):
        synthesize(tmp_path, other, 0.07)
    assert not other.w.any() and not other.seen.any()


# --- 8. fp64 accumulation ---------------------------------------------------------------------------------


def test_fp64_snapshots_of_an_fp64_model_synthesize_in_fp64(tmp_path):
    # Values near 1 with small moves: an fp32 accumulator rounds them to about 6e-8.
    trajectory = 1 + 1e-3 * random_walk(60, 8)
    model = vector_model(8)
    ema = PostHocEMA(
        model,
        SIGMA_RELS,
        snapshot_every=10,
        snapshot_dir=tmp_path,
        snapshot_dtype=torch.float64,
        dtype=torch.float64,
    )
    for x in trajectory:
        set_to(model, x)
        ema.update(model)
    ema.flush()
    tracked, synthesized = vector_model(8), vector_model(8)
    ema.copy_to(tracked, sigma_rel=0.10)
    assert synthesize(tmp_path, synthesized, 0.10).profile_error < 1e-6
    torch.testing.assert_close(synthesized.w, tracked.w, rtol=1e-13, atol=0)


# --- 9. the final state ---------------------------------------------------------------------------------


def test_flush_snapshots_the_final_state_as_the_readme_uses_it(tmp_path):
    torch.manual_seed(0)
    model = nn.Linear(4, 3)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    ema = swa_fast.PostHocEMA(
        model, sigma_rels=(0.05, 0.10), snapshot_every=1000, snapshot_dir=tmp_path / "phema"
    )
    ema.attach(optimizer)
    for _ in range(30):  # far fewer steps than snapshot_every
        optimizer.zero_grad()
        model(torch.randn(8, 4)).square().mean().backward()
        optimizer.step()
    ema.flush()
    ema.flush()  # the final state is snapshotted once
    result = swa_fast.posthoc.synthesize(tmp_path / "phema", model, sigma_rel=0.07)
    assert sorted(list_snapshots(tmp_path / "phema")) == [30]
    assert (result.step, result.progress) == (30, 30.0)


def test_close_snapshots_the_final_state_and_results_say_their_step(tmp_path):
    model, ema = with_snapshots(tmp_path, 12, 5)  # flushed: snapshots 5, 10 and the final 12
    assert sorted(list_snapshots(tmp_path)) == [5, 10, 12]
    set_to(model, torch.ones(4, dtype=torch.float64))
    ema.update(model)
    thread = ema._writer.thread
    ema.close()
    assert not thread.is_alive() and sorted(list_snapshots(tmp_path)) == [5, 10, 12, 13]
    assert synthesize(tmp_path, model, 0.07, step=10).step == 10
    assert ema.synthesize(model, 0.07).step == 13
    ema.update(model)  # a closed manager goes on, with a new writer
    ema.flush()
    assert max(list_snapshots(tmp_path)) == 14


def test_flush_takes_the_final_snapshot_again_after_its_write_failed(tmp_path):
    directory = tmp_path / "snapshots"
    model = vector_model(4)
    ema = PostHocEMA(model, snapshot_every=10, snapshot_dir=directory)
    ema.update(model)
    ema.update(model)
    directory.rmdir()
    with pytest.raises(RuntimeError, match="failed.*every other snapshot taken so far is on disk"):
        ema.flush()  # its snapshot of the final state cannot be written
    directory.mkdir()
    ema.flush()
    assert sorted(list_snapshots(directory)) == [2]
