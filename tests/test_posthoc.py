"""PostHocEMA (EDM2's power-function EMAs, snapshots and post-hoc synthesis) and `attach` for every
manager: against EDM2's closed form in float64, against ema-pytorch's PostHocEMA, through a writer
killed mid-write, and the error contract."""

from __future__ import annotations

import copy
import dataclasses
import gc
import math
import re
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import swa_fast
from swa_fast.posthoc import PostHocEMA, snapshots, synthesize
from swa_fast.posthoc.profiles import gamma_to_sigma_rel, profile_inner, sigma_rel_to_gamma
from swa_fast.posthoc.snapshots import (
    list_snapshots,
    load_snapshot,
    named_averages,
    save_snapshot,
    snapshot_path,
)

torch.set_default_dtype(torch.float32)


def vector_model(n: int = 6, dtype=torch.float64) -> nn.Module:
    """A model of one parameter vector, which the tests set to a trajectory's points."""
    model = nn.Module()
    model.w = nn.Parameter(torch.zeros(n, dtype=dtype))
    return model


def set_to(model: nn.Module, value: torch.Tensor) -> None:
    with torch.no_grad():
        model.w.copy_(value)


def gamma_by_numpy(sigma_rel: float) -> float:
    """EDM2's own recipe, independent of ours: the largest real root of the cubic."""
    t = sigma_rel**-2
    return float(np.roots([1, 7, 16 - t, 12 - t]).real.max())


def random_walk(steps: int, n: int, seed: int = 0) -> torch.Tensor:
    """A trajectory like a training run's: drift plus accumulated noise, float64, (steps, n)."""
    g = torch.Generator().manual_seed(seed)
    drift = torch.linspace(0, 1, steps, dtype=torch.float64)[:, None] * torch.randn(
        n, generator=g, dtype=torch.float64
    )
    return drift + 0.05 * torch.randn(steps, n, generator=g, dtype=torch.float64).cumsum(0)


# --- the math ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("sigma_rel", [0.01, 0.05, 0.07, 0.10, 0.2, 0.29])
def test_gamma_is_the_largest_root_of_the_cubic(sigma_rel):
    gamma = sigma_rel_to_gamma(sigma_rel)
    assert gamma == pytest.approx(gamma_by_numpy(sigma_rel), rel=1e-12)
    assert gamma_to_sigma_rel(gamma) == pytest.approx(sigma_rel, rel=1e-14)


def test_profile_inner_products_against_quadrature():
    # <p_a, p_b> by a fine midpoint rule on [0, min(T_a, T_b)] against the closed form.
    for t_a, g_a, t_b, g_b in (
        (300.0, 6.9, 1000.0, 17.0),
        (1000.0, 6.9, 400.0, 2.5),
        (500.0, 3.0, 500.0, 3.0),
    ):
        n = 400_000
        t = (torch.arange(n, dtype=torch.float64) + 0.5) * min(t_a, t_b) / n
        p_a = (g_a + 1) * t**g_a / t_a ** (g_a + 1)
        p_b = (g_b + 1) * t**g_b / t_b ** (g_b + 1)
        numeric = float((p_a * p_b).sum() * min(t_a, t_b) / n)
        closed = profile_inner(*(torch.tensor(v, dtype=torch.float64) for v in (t_a, g_a, t_b, g_b)))
        assert float(closed) == pytest.approx(numeric, rel=1e-6)


# --- the tracked averages -----------------------------------------------------------------------------


def test_tracked_averages_match_edm2_closed_form():
    # Irregular progress (batches of different sizes, passed as progress=): the average after
    # updates at t_1 < ... < t_n weighs the i-th model by (t_i^(g+1) - t_(i-1)^(g+1)) / t_n^(g+1).
    steps, n = 300, 5
    trajectory = random_walk(steps, n)
    g = torch.Generator().manual_seed(1)
    progress = torch.randint(1, 64, (steps,), generator=g).cumsum(0).tolist()
    sigma_rels = (0.05, 0.10, 0.2)
    model = vector_model(n)
    ema = PostHocEMA(model, sigma_rels, dtype=torch.float64)
    for x, t in zip(trajectory, progress):
        set_to(model, x)
        ema.update(model, progress=t)
    times = torch.tensor([0.0] + progress, dtype=torch.float64)
    for sigma_rel in sigma_rels:
        gamma = gamma_by_numpy(sigma_rel)
        weights = torch.diff((times / times[-1]) ** (gamma + 1))
        expected = weights @ trajectory
        model_copy = vector_model(n)
        ema.copy_to(model_copy, sigma_rel=sigma_rel)
        torch.testing.assert_close(model_copy.w.detach(), expected, rtol=1e-12, atol=1e-12)


def effective_sigma_rel(first: float, second: float, steps: int) -> float:
    """The relative width of the weights an average gave to the steps 1..steps, from the averages
    of x = step and x = step^2 (the trajectory the two coordinates follow)."""
    return math.sqrt(max(second - first**2, 0.0)) / steps


def test_every_k_steps_gives_the_requested_profile_unlike_ema_pytorch():
    from ema_pytorch import PostHocEMA as TheirPostHocEMA

    steps, every, sigma_rel = 2000, 10, 0.10
    model = vector_model(2)
    ours_every_step = PostHocEMA(model, (sigma_rel,), dtype=torch.float64)
    ours_every_k = PostHocEMA(model, (sigma_rel,), dtype=torch.float64)
    theirs = TheirPostHocEMA(
        model, sigma_rels=(sigma_rel, 0.2), update_every=every, checkpoint_every_num_steps="manual"
    )
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)  # the hook's clock; it changes nothing
    ours_every_k.attach(optimizer, every=every)
    for step in range(1, steps + 1):
        set_to(model, torch.tensor([step, step**2], dtype=torch.float64))
        optimizer.step()
        ours_every_step.update(model)
        theirs.update()
    measured = {}
    for name, ema in (("every step", ours_every_step), ("every k", ours_every_k)):
        ema.copy_to(model)
        measured[name] = effective_sigma_rel(*model.w.tolist(), steps)
    their_average = theirs.ema_models[0].ema_model.w.detach()
    measured["ema_pytorch every k"] = effective_sigma_rel(*their_average.tolist(), steps)
    # The discretisation: measured 0.0999999 every step and 0.099992 every 10 of 2000 steps (each
    # update's weight is its stretch of the continuous profile); ema-pytorch's update_every=10 0.297.
    assert measured["every step"] == pytest.approx(sigma_rel, rel=0.001)
    assert measured["every k"] == pytest.approx(sigma_rel, rel=0.001)
    assert measured["ema_pytorch every k"] > 1.5 * sigma_rel


# --- snapshots and synthesis --------------------------------------------------------------------------


def run_with_snapshots(directory, trajectory, sigma_rels, every, snapshot_dtype, extra=(), **options):
    """A PostHocEMA over `trajectory` writing snapshots every `every` updates, and one EMA tracked
    directly for each of `extra` (the reference for a synthesized profile)."""
    model = vector_model(trajectory.shape[1])
    ema = PostHocEMA(
        model,
        sigma_rels,
        snapshot_every=every,
        snapshot_dir=directory,
        snapshot_dtype=snapshot_dtype,
        **options,
    )
    direct = PostHocEMA(model, extra, **options) if extra else None
    for x in trajectory:
        set_to(model, x)
        ema.update(model)
        if direct is not None:
            direct.update(model)
    ema.flush()
    return model, ema, direct


def test_a_tracked_profile_is_reproduced_from_the_snapshots(tmp_path):
    trajectory = random_walk(400, 7)
    model, ema, _ = run_with_snapshots(
        tmp_path, trajectory, (0.05, 0.10), 40, torch.float64, dtype=torch.float64
    )
    assert sorted(list_snapshots(tmp_path)) == list(range(40, 401, 40))
    for sigma_rel in (0.05, 0.10):
        for step in (200, 400):
            reconstruction = synthesize(tmp_path, model, sigma_rel, step=step)
            assert reconstruction.profile_error < 1e-6
            direct = vector_model(7)
            tracked = PostHocEMA(direct, (sigma_rel,), dtype=torch.float64)
            for x in trajectory[:step]:
                set_to(direct, x)
                tracked.update(direct)
            tracked.copy_to(direct)
            # float64 snapshots accumulate in float64: measured 6.0e-15 on values up to 3.4.
            torch.testing.assert_close(model.w, direct.w, rtol=0, atol=1e-13 * trajectory.abs().max())


def test_a_profile_between_the_tracked_ones_matches_the_direct_ema(tmp_path):
    trajectory = random_walk(1000, 64)
    model, ema, direct = run_with_snapshots(
        tmp_path, trajectory, (0.05, 0.10), 50, torch.float16, extra=(0.07,)
    )
    reconstruction = ema.synthesize(model, 0.07)
    reference = vector_model(64)
    direct.copy_to(reference)
    # Measured: profile error 0.0025; the weights' error 0.0014 of how far the average is from the
    # last model (0.00023 of the weights' norm). Asserted with margin.
    assert reconstruction.profile_error < 0.01
    scale = (reference.w - trajectory[-1]).norm()
    error = (model.w - reference.w).norm() / scale
    assert error < 0.007, float(error)
    assert len(reconstruction.coefficients) == 2 * 20


def test_snapshot_holds_every_profile_and_its_metadata(tmp_path):
    trajectory = random_walk(20, 3)
    progress = [8 * (i + 1) for i in range(20)]
    model = vector_model(3)
    ema = PostHocEMA(
        model, (0.05, 0.15), snapshot_every=10, snapshot_dir=tmp_path, snapshot_dtype=torch.float32
    )
    for x, t in zip(trajectory, progress):
        set_to(model, x)
        ema.update(model, progress=t)
    ema.flush()
    saved = load_snapshot(snapshot_path(tmp_path, 20))
    assert saved.step == 20 and saved.progress == 160.0
    assert saved.sigma_rels == [0.05, 0.15]
    assert saved.gammas == pytest.approx([gamma_by_numpy(0.05), gamma_by_numpy(0.15)], rel=1e-12)
    for k, sigma_rel in enumerate((0.05, 0.15)):
        ema.copy_to(model, sigma_rel=sigma_rel)
        named = named_averages(saved)[k]
        assert list(named) == ["w"] and named["w"].dtype == torch.float32
        assert torch.equal(named["w"], model.w.detach().float())
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def test_synthesis_writes_through_strides_and_buffers(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)).to(memory_format=torch.channels_last)
    ema = PostHocEMA(
        model, snapshot_every=5, snapshot_dir=tmp_path, snapshot_dtype=torch.float32, use_buffers=True
    )
    for _ in range(10):
        model(torch.randn(2, 3, 6, 6))  # BatchNorm statistics and num_batches_tracked move
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p))
        ema.update(model)
    ema.flush()
    target = copy.deepcopy(model)
    ema.synthesize(target, 0.10)
    tracked = copy.deepcopy(model)
    ema.copy_to(tracked, sigma_rel=0.10)
    assert target[0].weight.is_contiguous(memory_format=torch.channels_last)
    for (name, a), b in zip(target.state_dict().items(), tracked.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5, msg=name)
    assert int(target[1].num_batches_tracked) == 10


def test_two_dtype_groups_update_snapshot_and_synthesize(tmp_path):
    # A bf16 layer and an fp32 one with dtype=None: two flat groups, each one multi_lerp_, each
    # saved in its own dtype (snapshot_dtype=None); update_from gives what update gives.
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 5).to(torch.bfloat16), nn.LayerNorm(5))
    ema = PostHocEMA(model, dtype=None, snapshot_every=4, snapshot_dir=tmp_path, snapshot_dtype=None)
    twin = PostHocEMA(model, dtype=None)
    assert [g.dtype for g in ema.average.groups] == [torch.bfloat16, torch.float32]
    for _ in range(8):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p))
        ema.update(model)
        twin.update_from([t.detach().clone() for t in model.parameters()])
    ema.flush()
    saved = load_snapshot(snapshot_path(tmp_path, 8))
    assert [f.dtype for f in saved.flats[0]] == [torch.bfloat16, torch.float32]
    for sigma_rel in (0.05, 0.10):
        a, b, c = (copy.deepcopy(model) for _ in range(3))
        ema.copy_to(a, sigma_rel=sigma_rel)
        twin.copy_to(b, sigma_rel=sigma_rel)
        ema.synthesize(c, sigma_rel)
        for x, y, z in zip(a.parameters(), b.parameters(), c.parameters()):
            assert torch.equal(x, y)
            torch.testing.assert_close(z, x)  # a tracked profile, to the rounding of each dtype


def test_a_collected_manager_writes_what_is_pending_and_stops_its_writer(tmp_path):
    model = vector_model(4)
    ema = PostHocEMA(model, snapshot_every=1, snapshot_dir=tmp_path)
    ema.update(model)
    ema.update(model)
    thread = ema._writer.thread
    del ema
    gc.collect()
    thread.join(timeout=60)
    assert not thread.is_alive()
    assert sorted(list_snapshots(tmp_path)) == [1, 2]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
@pytest.mark.parametrize(
    "options", [{}, {"side_stream": True}, {"device": "cpu"}], ids=["same", "side", "host"]
)
def test_snapshots_from_a_gpu_hold_the_averages_of_their_step(tmp_path, options):
    # The side-stream copy must read the averages before the next updates change them.
    torch.manual_seed(0)
    model = nn.Linear(256, 128).cuda()
    ema = PostHocEMA(model, snapshot_every=3, snapshot_dir=tmp_path, snapshot_dtype=torch.float32, **options)
    reference = PostHocEMA(model, **options)
    expected = {}
    for step in range(1, 13):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p))
        ema.update(model)
        reference.update(model)
        if step % 3 == 0:
            copies = [copy.deepcopy(model) for _ in (0.05, 0.10)]
            for target, sigma_rel in zip(copies, (0.05, 0.10)):
                reference.copy_to(target, sigma_rel=sigma_rel)
            expected[step] = [target.weight.detach().cpu() for target in copies]
    ema.flush()
    for step, weights in expected.items():
        saved = named_averages(load_snapshot(snapshot_path(tmp_path, step)))
        for named, weight in zip(saved, weights):
            assert torch.equal(named["weight"], weight), step
    target = copy.deepcopy(model)
    ema.synthesize(target, 0.10)
    torch.testing.assert_close(target.weight.detach().cpu(), expected[12][1], rtol=1e-5, atol=1e-5)


# --- crash safety -----------------------------------------------------------------------------------

WRITER = textwrap.dedent(
    """
    import sys, torch
    from swa_fast.posthoc import PostHocEMA

    directory, state_file, last = sys.argv[1], sys.argv[2], int(sys.argv[3])
    start = int(sys.argv[4]) if len(sys.argv) > 4 else 0
    g = torch.Generator().manual_seed(0)
    base, direction = torch.randn(2, 1024, 1024, generator=g)
    model = torch.nn.Linear(1024, 1024, bias=False)
    ema = PostHocEMA(
        model, (0.05, 0.10), snapshot_every=1, snapshot_dir=directory, snapshot_dtype=torch.float32
    )
    if start:
        ema.load_state_dict(torch.load(state_file, weights_only=True))
    for step in range(start + 1, last + 1):
        with torch.no_grad():
            model.weight.copy_(base + 0.01 * step * direction)
        ema.update(model)
        if step == 3 and not start:
            ema.flush()
            torch.save(ema.state_dict(), state_file)
            print("saved", flush=True)
    ema.flush()
    print("done", flush=True)
    """
)


def writer_script(tmp_path: Path) -> Path:
    script = tmp_path / "writer.py"
    script.write_text(WRITER)
    return script


def test_a_killed_writer_leaves_only_whole_snapshots_and_resume_continues(tmp_path):
    script = writer_script(tmp_path)
    directory, state_file = tmp_path / "snapshots", tmp_path / "state.pt"
    for _attempt in range(5):  # kill while a snapshot is half written (a temporary file is there)
        for p in directory.glob("*") if directory.exists() else []:
            p.unlink()
        process = subprocess.Popen(
            [sys.executable, str(script), str(directory), str(state_file), "1000"],
            stdout=subprocess.PIPE,
            text=True,
        )
        assert process.stdout.readline().strip() == "saved"
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not any(p.name.endswith(".tmp") for p in directory.iterdir()):
            time.sleep(0.0005)
        process.send_signal(signal.SIGKILL)
        process.wait()
        if [p for p in directory.iterdir() if p.name.endswith(".tmp")]:
            break
    left_partial = [p for p in directory.iterdir() if p.name.endswith(".tmp")]
    assert left_partial, "no attempt was killed mid-write"
    snapshots = list_snapshots(directory)
    last = max(snapshots)
    assert sorted(snapshots) == list(range(1, last + 1))
    for path in snapshots.values():
        assert load_snapshot(path, mmap=False).step >= 1  # every one loads whole
    # Resume from the state saved at step 3 and continue past the crash.
    end = last + 3
    resumed = subprocess.run(
        [sys.executable, str(script), str(directory), str(state_file), str(end), "3"],
        capture_output=True,
        text=True,
    )
    assert resumed.returncode == 0, resumed.stderr
    uninterrupted = tmp_path / "uninterrupted"
    straight = subprocess.run(
        [sys.executable, str(script), str(uninterrupted), str(tmp_path / "other.pt"), str(end)],
        capture_output=True,
        text=True,
    )
    assert straight.returncode == 0, straight.stderr
    assert sorted(list_snapshots(directory)) == list(range(1, end + 1))
    for step in (1, last, end):
        a = load_snapshot(snapshot_path(directory, step))
        b = load_snapshot(snapshot_path(uninterrupted, step))
        assert a.progress == b.progress
        for x, y in zip(named_averages(a), named_averages(b)):
            assert torch.equal(x["weight"], y["weight"]), step
    model = torch.nn.Linear(1024, 1024, bias=False)
    assert synthesize(directory, model, 0.07).profile_error < 0.05


# --- resuming, pickling, reading ---------------------------------------------------------------------


def test_state_dict_resumes_bit_exactly(tmp_path):
    trajectory = random_walk(60, 9).float()
    model = vector_model(9, torch.float32)
    straight = PostHocEMA(model, (0.05, 0.1, 0.2))
    first = PostHocEMA(model, (0.05, 0.1, 0.2))
    progress = torch.randint(1, 100, (60,), generator=torch.Generator().manual_seed(3)).cumsum(0).tolist()
    for i, (x, t) in enumerate(zip(trajectory, progress)):
        set_to(model, x)
        straight.update(model, progress=t)
        if i < 30:
            first.update(model, progress=t)
        if i == 29:
            torch.save(first.state_dict(), tmp_path / "state.pt")
            resumed = PostHocEMA(vector_model(9, torch.float32), (0.05, 0.1, 0.2))
            resumed.load_state_dict(torch.load(tmp_path / "state.pt", weights_only=True))
        if i >= 30:
            resumed.update(model, progress=t)
    for sigma_rel in (0.05, 0.1, 0.2):
        a, b = vector_model(9, torch.float32), vector_model(9, torch.float32)
        straight.copy_to(a, sigma_rel=sigma_rel)
        resumed.copy_to(b, sigma_rel=sigma_rel)
        assert torch.equal(a.w, b.w)
    assert resumed.progress == straight.progress and resumed.calls == straight.calls == 60


def test_pickled_manager_keeps_averages_and_drops_the_writer(tmp_path):
    model = vector_model(4)
    ema = PostHocEMA(model, snapshot_every=2, snapshot_dir=tmp_path)
    for x in random_walk(5, 4):
        set_to(model, x)
        ema.update(model)
    clone = copy.deepcopy(ema)
    assert clone._writer is None
    torch.save(ema, tmp_path / "manager.pt")
    loaded = torch.load(tmp_path / "manager.pt", weights_only=False)
    other_model = vector_model(4)  # an unpickled manager tracks the next model it is given
    set_to(model, torch.ones(4, dtype=torch.float64))
    set_to(other_model, torch.ones(4, dtype=torch.float64))
    ema.update(model)
    clone.update(model)
    loaded.update(other_model)
    for sigma_rel in (0.05, 0.10):  # every profile: the updates reach the rebuilt views
        a, b, c = vector_model(4), vector_model(4), vector_model(4)
        ema.copy_to(a, sigma_rel=sigma_rel)
        clone.copy_to(b, sigma_rel=sigma_rel)
        loaded.copy_to(c, sigma_rel=sigma_rel)
        assert torch.equal(a.w, b.w) and torch.equal(a.w, c.w)
    clone.flush()
    loaded.flush()
    assert sorted(list_snapshots(tmp_path)) == [2, 4, 6]


def test_average_applied_and_swap_pick_the_profile():
    model = vector_model(3)
    ema = PostHocEMA(model, (0.05, 0.2), dtype=torch.float64)
    for x in random_walk(30, 3):
        set_to(model, x)
        ema.update(model)
    live = model.w.detach().clone()
    expected = {}
    for sigma_rel in (0.05, 0.2):
        target = vector_model(3)
        ema.copy_to(target, sigma_rel=sigma_rel)
        expected[sigma_rel] = target.w.detach().clone()
    assert not torch.equal(expected[0.05], expected[0.2])
    for sigma_rel in (0.05, 0.2):
        with ema.average_applied(model, sigma_rel=sigma_rel):
            assert torch.equal(model.w, expected[sigma_rel])
        assert torch.equal(model.w, live)
    ema.swap(model, sigma_rel=0.2)
    assert torch.equal(model.w, expected[0.2])
    ema.swap(model, sigma_rel=0.2)
    assert torch.equal(model.w, live)


# --- attach ---------------------------------------------------------------------------------------------


def train_steps(model, optimizer, steps, seed=0):
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        optimizer.zero_grad()
        model(torch.randn(4, 5, generator=g)).square().mean().backward()
        optimizer.step()


@pytest.mark.parametrize(
    "make",
    [
        lambda m: swa_fast.SWA(m),
        lambda m: swa_fast.EMA(m, decay=0.9),
        lambda m: swa_fast.SWAG(m, max_rank=3),
        lambda m: PostHocEMA(m, (0.05, 0.1)),
    ],
    ids=["SWA", "EMA", "SWAG", "PostHocEMA"],
)
def test_attach_updates_from_the_optimizer_step(make):
    torch.manual_seed(0)
    model = nn.Linear(5, 3)
    twin = copy.deepcopy(model)
    hooked, manual = make(model), make(twin)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    twin_optimizer = torch.optim.SGD(twin.parameters(), lr=0.1)
    handle = hooked.attach(optimizer, every=3)
    g = torch.Generator().manual_seed(0)
    for step in range(1, 13):
        x = torch.randn(4, 5, generator=g)
        for m, opt in ((model, optimizer), (twin, twin_optimizer)):
            opt.zero_grad()
            m(x).square().mean().backward()
            opt.step()
        if step % 3 == 0:
            manual.update(twin)
    assert hooked.calls == manual.calls == 4
    for key in ("weight", "bias"):
        assert torch.equal(hooked.state_dict()["average"][key], manual.state_dict()["average"][key])
    handle.remove()
    train_steps(model, optimizer, 3)
    assert hooked.calls == 4


def test_attach_with_an_explicit_model_and_after_unpickling(tmp_path):
    model = nn.Linear(5, 3)
    ema = swa_fast.EMA(model, decay=0.5)
    torch.save(ema, tmp_path / "ema.pt")
    restored = torch.load(tmp_path / "ema.pt", weights_only=False)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(ValueError, match="pass model="):
        restored.attach(optimizer)
    restored.attach(optimizer, model=model)
    train_steps(model, optimizer, 2)
    assert restored.calls == 2


def test_attach_refuses_bad_arguments():
    model = nn.Linear(5, 3)
    ema = swa_fast.EMA(model)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    for every in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match="every must be an int >= 1"):
            ema.attach(optimizer, every=every)
    with pytest.raises(ValueError, match="expected a torch.optim.Optimizer"):
        ema.attach(model)
    with pytest.raises(ValueError, match="'weight' has shape"):
        ema.attach(optimizer, model=nn.Linear(5, 4))
    with pytest.raises(ValueError, match="not the one"):
        ema.attach(optimizer, model=nn.Sequential(nn.Linear(5, 3)))


# --- bad input ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "sigma_rels", [(), (0.0,), (-0.1,), (0.31,), (0.05, 0.05), ("a",), 0.05, "0.05", (float("nan"),)]
)
def test_bad_sigma_rels_are_refused(sigma_rels):
    with pytest.raises(ValueError, match="sigma_rel"):
        PostHocEMA(vector_model(), sigma_rels)


def test_bad_settings_are_refused(tmp_path):
    model = vector_model()
    with pytest.raises(ValueError, match="snapshot_every must be an int >= 1"):
        PostHocEMA(model, snapshot_every=0, snapshot_dir=tmp_path)
    with pytest.raises(ValueError, match="go together"):
        PostHocEMA(model, snapshot_every=5)
    with pytest.raises(ValueError, match="snapshot_dtype"):
        PostHocEMA(model, snapshot_every=5, snapshot_dir=tmp_path, snapshot_dtype=torch.int32)
    with pytest.raises(ValueError, match="check_finite"):
        PostHocEMA(model, check_finite=True)
    ema = PostHocEMA(model)
    with pytest.raises(ValueError, match="pass sigma_rel="):
        ema.copy_to(model)
    with pytest.raises(ValueError, match="not tracked"):
        ema.copy_to(model, sigma_rel=0.07)
    with pytest.raises(ValueError, match="without snapshot_dir"):
        ema.snapshot()


def test_bad_progress_is_refused_before_anything_changes():
    model = vector_model(3)
    ema = PostHocEMA(model, dtype=torch.float64)
    set_to(model, torch.ones(3, dtype=torch.float64))
    ema.update(model, progress=10)
    before = ema.state_dict()["averages"][1]["w"].clone()
    set_to(model, torch.zeros(3, dtype=torch.float64))
    for bad in (10, 5, float("inf"), "12", None):
        with pytest.raises(ValueError, match="progress"):
            ema.update(model, progress=bad)
    assert torch.equal(ema.state_dict()["averages"][1]["w"], before) and ema.calls == 1 and ema.progress == 10
    plain = PostHocEMA(model)
    plain.update(model)
    with pytest.raises(ValueError, match="on every update or on none"):
        plain.update(model, progress=5)


def test_corrupt_snapshot_dirs_are_refused(tmp_path):
    model = vector_model(4)
    with pytest.raises(ValueError, match="expected a directory"):
        synthesize(tmp_path / "missing", model, 0.1)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match="no snapshots"):
        synthesize(empty, model, 0.1)
    good = tmp_path / "good"
    run_with_snapshots(good, random_walk(20, 4), (0.05, 0.1), 5, torch.float16)
    with pytest.raises(ValueError, match="no snapshot at step 7"):
        synthesize(good, model, 0.1, step=7)
    with pytest.raises(ValueError, match="sigma_rel"):
        synthesize(good, model, 0.5)
    with pytest.raises(ValueError, match="another model"):
        synthesize(good, vector_model(5), 0.1)
    truncated = tmp_path / "truncated"
    truncated.mkdir()
    for path in good.iterdir():
        (truncated / path.name).write_bytes(path.read_bytes())
    damaged = snapshot_path(truncated, 10)
    damaged.write_bytes(damaged.read_bytes()[:200])
    with pytest.raises(ValueError, match=re.escape(f"{str(damaged)!r} is not a readable snapshot")):
        synthesize(truncated, model, 0.1)
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    torch.save({"weights": torch.zeros(3)}, snapshot_path(foreign, 1))
    with pytest.raises(ValueError, match="is not a PostHocEMA snapshot"):
        synthesize(foreign, model, 0.1)
    mixed = tmp_path / "mixed"
    run_with_snapshots(mixed, random_walk(10, 4), (0.05, 0.1), 5, torch.float16)
    other = tmp_path / "other"
    run_with_snapshots(other, random_walk(15, 5), (0.05, 0.1), 15, torch.float16)
    snapshot_path(mixed, 15).write_bytes(snapshot_path(other, 15).read_bytes())
    with pytest.raises(ValueError, match="another model"):
        synthesize(mixed, model, 0.1)


def test_snapshots_of_other_integer_buffers_are_refused_before_anything_is_written(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))
    ema = PostHocEMA(model, snapshot_every=2, snapshot_dir=tmp_path, use_buffers=True)
    for _ in range(4):
        model(torch.randn(5, 3))
        ema.update(model)
    ema.flush()
    other = copy.deepcopy(model)
    other[1].num_batches_tracked = None  # the same floating tensors, no integer buffer
    before = copy.deepcopy(other.state_dict())
    with pytest.raises(ValueError, match=r"integer buffers are not the model's: they hold \['1.num_batches"):
        synthesize(tmp_path, other, 0.1)
    for name, value in other.state_dict().items():
        assert torch.equal(value, before[name]), name


def test_a_snapshot_whose_parts_do_not_fit_is_refused(tmp_path):
    run_with_snapshots(tmp_path, random_walk(10, 4), (0.05, 0.1), 10, torch.float32)
    whole = load_snapshot(snapshot_path(tmp_path, 10), mmap=False)
    damaged = tmp_path / "damaged"
    damaged.mkdir()
    cases = {
        "1 averages": dataclasses.replace(whole, flats=whole.flats[:1]),
        "groups positions []": dataclasses.replace(whole, groups=[[]]),
        "do not hold their groups": dataclasses.replace(whole, flats=[[f[:2]] for (f,) in whole.flats]),
        "wrong sizes": dataclasses.replace(whole, flats=[whole.flats[0], [whole.flats[1][0][:2]]]),
    }
    for problem, snapshot in cases.items():
        save_snapshot(snapshot_path(damaged, 10), snapshot)
        with pytest.raises(ValueError, match=f"is damaged: .*{re.escape(problem)}"):
            load_snapshot(snapshot_path(damaged, 10))
        with pytest.raises(ValueError, match="is damaged"):
            synthesize(damaged, vector_model(4), 0.1)


# --- the format version -----------------------------------------------------------------------------


def test_a_snapshot_of_an_unknown_version_is_refused(tmp_path, monkeypatch):
    current = snapshots.SNAPSHOT_VERSION
    newer = current + 1
    with monkeypatch.context() as patch:  # what a later swa_fast, with another layout, writes
        patch.setattr(snapshots, "SNAPSHOT_VERSION", newer)
        patch.setitem(snapshots._KEYS_OF, newer, snapshots._KEYS_OF[current])
        run_with_snapshots(tmp_path, random_walk(10, 4), (0.05, 0.1), 5, torch.float32)
    readable = ", ".join(str(v) for v in range(1, current + 1))
    refused = re.escape(
        f"{str(snapshot_path(tmp_path, 5))!r} is a snapshot of format version {newer}; this swa_fast "
        f"reads versions {readable}"
    )
    with pytest.raises(ValueError, match=refused):
        load_snapshot(snapshot_path(tmp_path, 5))
    model = vector_model(4)
    with pytest.raises(ValueError, match=refused):
        synthesize(tmp_path, model, 0.1)
    assert not model.w.any()  # refused before anything was written


def save_unversioned(path: Path, snapshot) -> None:
    """`snapshot` in the layout PostHocEMA wrote before snapshot files carried a format version,
    written here key by key so that this test keeps that layout whatever the writer does now."""
    torch.save(
        {
            "format": "swa_fast.PostHocEMA snapshot",
            "sigma_rels": snapshot.sigma_rels,
            "gammas": snapshot.gammas,
            "use_buffers": snapshot.use_buffers,
            "names": snapshot.names,
            "shapes": snapshot.shapes,
            "groups": snapshot.groups,
            "flats": snapshot.flats,
            "integers": snapshot.integers,
            "step": snapshot.step,
            "progress": snapshot.progress,
        },
        path,
    )


def test_an_unversioned_snapshot_still_reads_as_version_1(tmp_path):
    written, unversioned = tmp_path / "written", tmp_path / "unversioned"
    run_with_snapshots(written, random_walk(40, 5), (0.05, 0.1), 10, torch.float32)
    unversioned.mkdir()
    for step, path in list_snapshots(written).items():
        save_unversioned(snapshot_path(unversioned, step), load_snapshot(path, mmap=False))
    assert sorted(list_snapshots(unversioned)) == [10, 20, 30, 40]
    for step in (10, 40):
        new = load_snapshot(snapshot_path(written, step))
        old = load_snapshot(snapshot_path(unversioned, step))
        for field in ("step", "progress", "sigma_rels", "gammas", "use_buffers", "names", "shapes", "groups"):
            assert getattr(old, field) == getattr(new, field), field
        for a, b in zip(named_averages(old), named_averages(new)):
            assert torch.equal(a["w"], b["w"])
    from_new, from_old = vector_model(5), vector_model(5)
    synthesize(written, from_new, 0.07)
    synthesize(unversioned, from_old, 0.07)
    assert from_old.w.any() and torch.equal(from_old.w, from_new.w)
