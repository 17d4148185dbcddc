"""swa_fast.integrations.deepspeed on real DeepSpeed engines: ZeRO stages 1, 2 and 3 on two gloo
ranks on the CPU (DS_ACCELERATOR=cpu, torch's AdamW), each rank averaging its own partition.

The average every run ends with, exported whole, is compared with a float64 replay on one process
of the same updates (the sources each rank's manager read, gathered whole after every step with
DeepSpeed's own gathers, outside the manager): equal within fp32 rounding.
"""

from __future__ import annotations

import contextlib
import os
from functools import partial

import pytest
import torch

pytest.importorskip("deepspeed", reason="DeepSpeed is not installed (the test extra installs it)")

STEPS = 4
DECAY = 0.75
# Equal to fp32 rounding over a few updates (the replay is float64).
CLOSE = dict(rtol=1e-5, atol=1e-6)


def _net() -> torch.nn.Module:
    """The same weights on every rank; a bias of 3 elements pads ZeRO-3's last partition."""
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.ReLU(), torch.nn.Linear(32, 3))


def _engine(stage: int, bf16: bool = False):
    """A DeepSpeed engine over `_net` on the harness's two gloo ranks. Under ZeRO-3 the weights are
    partitioned between forwards and the biases (under 40 elements) persist gathered."""
    os.environ.update(DS_ACCELERATOR="cpu", LOCAL_RANK=str(torch.distributed.get_rank()))
    import deepspeed

    deepspeed.init_distributed(dist_backend="gloo")
    config = {
        "train_micro_batch_size_per_gpu": 4,
        "zero_optimization": {"stage": stage, "stage3_param_persistence_threshold": 40},
        "optimizer": {"type": "AdamW", "params": {"lr": 0.05, "torch_adam": True}},
    }
    if bf16:
        config["bf16"] = {"enabled": True}
    net = _net()
    engine, *_ = deepspeed.initialize(model=net, config=config, model_parameters=net.parameters())
    return engine


def _step(engine, step: int) -> None:
    """One training step on this rank's own batch of `step` (the same in every run)."""
    rank = torch.distributed.get_rank()
    torch.manual_seed(1000 * step + rank)
    dtype = next(engine.module.parameters()).dtype
    x, y = torch.randn(4, 8, dtype=dtype), torch.randn(4, 3)
    loss = (engine(x).float() - y).pow(2).mean()
    engine.backward(loss)
    engine.step()


def _whole(engine, source: str) -> dict[str, torch.Tensor]:
    """Every parameter whole, as the manager's source holds it (a collective): the fp32 master
    weights, or the parameters themselves."""
    import deepspeed
    from deepspeed.utils import safe_get_full_fp32_param

    out = {}
    for name, p in engine.module.named_parameters():
        if source == "master":
            out[name] = safe_get_full_fp32_param(p).detach().double()
        else:
            with deepspeed.zero.GatheredParameters([p]):
                out[name] = p.detach().clone().double()
    return out


@contextlib.contextmanager
def _no_collectives():
    """Within the block, any torch.distributed collective raises (an update must not communicate)."""
    names = [
        n
        for n in dir(torch.distributed)
        if n.startswith(("all_", "reduce", "broadcast", "gather", "scatter"))
    ]
    names += ["barrier", "send", "recv"]
    kept = {n: getattr(torch.distributed, n) for n in names if callable(getattr(torch.distributed, n, None))}

    def refuse(*_args, **_kwargs):
        raise AssertionError("a collective was called during an update")

    try:
        for name in kept:
            setattr(torch.distributed, name, refuse)
        yield
    finally:
        for name, fn in kept.items():
            setattr(torch.distributed, name, fn)


def _replay(seen: list[dict], kind: str) -> dict[str, torch.Tensor]:
    """The float64 average of `seen` (the sources at each update): the mean, or an EMA whose first
    update copies."""
    if kind == "swa":
        return {n: sum(s[n] for s in seen) / len(seen) for n in seen[0]}
    average = dict(seen[0])
    for s in seen[1:]:
        average = {n: DECAY * average[n] + (1 - DECAY) * s[n] for n in average}
    return average


def _averages_match_replay(rank, tmp, stage, source, bf16=False):
    from swa_fast.integrations.deepspeed import EMA, SWA

    engine = _engine(stage, bf16)
    ema, swa = EMA(engine, decay=DECAY, source=source), SWA(engine, source=source)
    seen = []
    for step in range(STEPS):
        _step(engine, step)
        with _no_collectives():
            ema.update(engine)
            swa.update(engine)
        seen.append(_whole(engine, source))
    held = sum(t.numel() for t in ema.state_dict()["average"].values())
    whole = sum(t.numel() for t in seen[0].values())
    if stage == 3 or source == "master":
        assert held < whole  # this rank's pieces only (ZeRO-3 pads each to a multiple of the ranks)
        with _no_collectives(), pytest.raises(AssertionError, match="a collective was called"):
            ema.export()  # (the check itself works: pieces are gathered; both ranks refuse before sending)
    for manager, kind in ((ema, "ema"), (swa, "swa")):
        exported = manager.export()
        if rank != 0:
            assert exported == {}
            continue
        expected = _replay(seen, kind)
        assert sorted(exported) == sorted(expected)
        for name, value in exported.items():
            # an fp32 average of the master weights; under bf16 the parameters' own are bf16
            dtype = torch.bfloat16 if bf16 and source == "params" else torch.float32
            assert value.dtype == dtype, name
            rounding = dict(rtol=1e-2, atol=1e-2) if dtype == torch.bfloat16 else CLOSE
            torch.testing.assert_close(value.double(), expected[name], **rounding, msg=name)


@pytest.mark.parametrize("source", ["master", "params"])
@pytest.mark.parametrize("stage", [1, 2, 3])
def test_each_rank_averages_its_partition_as_one_process_would(on_two_ranks, stage, source):
    on_two_ranks(partial(_averages_match_replay, stage=stage, source=source))


def test_bf16_training_keeps_an_fp32_average_of_the_master_weights(on_two_ranks):
    on_two_ranks(partial(_averages_match_replay, stage=3, source="master", bf16=True))


def _applied_then_restored(rank, tmp, stage):
    from swa_fast.integrations.deepspeed import EMA

    engine = _engine(stage)
    ema = EMA(engine, decay=DECAY)
    for step in range(STEPS):
        _step(engine, step)
        ema.update(engine)
    before = _whole(engine, "params")
    exported = ema.export(os.path.join(tmp, "ema.safetensors"))
    # every rank's forward sees the average: compare the whole parameters on rank 0
    with ema.average_applied(engine):
        applied = _whole(engine, "params")
        x = torch.randn(2, 8)
        out = engine(x)
    after = _whole(engine, "params")
    for name in before:
        assert torch.equal(after[name], before[name]), name  # restored exactly
    if rank == 0:
        from safetensors.torch import load_file

        net = _net()
        net.load_state_dict(load_file(os.path.join(tmp, "ema.safetensors")))  # into the unwrapped model
        torch.testing.assert_close(out, net(x), rtol=1e-6, atol=1e-6)
        for name in before:
            assert torch.equal(applied[name], exported[name].double()), name


@pytest.mark.parametrize("stage", [2, 3])
def test_average_applied_shows_the_average_and_restores_the_partitions(on_two_ranks, stage):
    on_two_ranks(partial(_applied_then_restored, stage=stage))


def _resumed_run_continues_bit_exactly(rank, tmp, stage):
    from swa_fast.integrations.deepspeed import EMA

    engine = _engine(stage)
    ema = EMA(engine, decay=DECAY)
    for step in range(STEPS):
        if step == 2:
            engine.save_checkpoint(tmp)
            ema.save_checkpoint(tmp)
        _step(engine, step)
        ema.update(engine)
    straight = ema.export()

    engine = _engine(stage)
    resumed = EMA(engine, decay=DECAY)  # made first, as a script sets everything up before loading
    engine.load_checkpoint(tmp)
    resumed.load_checkpoint(tmp)
    for step in range(2, STEPS):
        _step(engine, step)
        resumed.update(engine)
    again = resumed.export()
    assert sorted(again) == sorted(straight)
    for name in straight:
        assert torch.equal(again[name], straight[name]), name


@pytest.mark.parametrize("stage", [1, 3])
def test_checkpoints_go_with_the_engines_and_resume_bit_exactly(on_two_ranks, stage):
    on_two_ranks(partial(_resumed_run_continues_bit_exactly, stage=stage))


def _plain_managers_average_zero3_partitions(rank, tmp):
    import swa_fast

    engine = _engine(3)
    ema = swa_fast.EMA(engine, decay=DECAY)  # the parameters' partitions, no integration needed
    seen = []
    for step in range(STEPS):
        _step(engine, step)
        ema.update(engine)
        seen.append(_whole(engine, "params"))
    for p, average in zip(engine.module.parameters(), ema.state_dict()["average"].values()):
        assert average.shape == p.ds_tensor.shape  # this rank's piece only
    with ema.average_applied(engine):
        applied = _whole(engine, "params")
    for name, value in _replay(seen, "ema").items():
        torch.testing.assert_close(applied[name], value, **CLOSE, msg=name)


def test_swa_fast_managers_average_zero3_partitions_in_place(on_two_ranks):
    on_two_ranks(_plain_managers_average_zero3_partitions)


def _bad_input_is_refused(rank, tmp):
    from swa_fast.integrations.deepspeed import EMA

    engine = _engine(3)
    with pytest.raises(ValueError, match="source must be one of"):
        EMA(engine, source="gathered")
    ema = EMA(engine, decay=DECAY)
    _step(engine, 0)
    ema.update(engine)
    kept = {n: t.clone() for n, t in ema.state_dict()["average"].items()}
    with pytest.raises(ValueError, match="found none"):
        ema.load_checkpoint(tmp, tag="nothing-here")
    state = ema.state_dict()
    name = next(iter(state["average"]))
    state["average"] = {**state["average"], name: torch.zeros(5)}
    with pytest.raises(ValueError, match=f"'{name}' has shape"):
        ema.load_state_dict(state)
    for n, t in ema.state_dict()["average"].items():
        assert torch.equal(t, kept[n]), n  # nothing was written


def test_bad_input_is_refused_and_leaves_the_average(on_two_ranks):
    on_two_ranks(_bad_input_is_refused)


def _posthoc_profiles_kept_in_pieces(rank, tmp):
    import swa_fast
    from swa_fast.integrations.deepspeed import PostHocEMA

    engine = _engine(3)
    with pytest.raises(ValueError, match="snapshots of a sharded"):
        PostHocEMA(engine, snapshot_every=1, snapshot_dir=tmp)
    ours = PostHocEMA(engine, sigma_rels=(0.05, 0.2))
    seen = []
    for step in range(STEPS):
        _step(engine, step)
        ours.update(engine)
        seen.append(_whole(engine, "master"))
    exported = {s: ours.export(sigma_rel=s) for s in (0.05, 0.2)}
    if rank != 0:
        return
    # the same updates on one process: swa_fast's PostHocEMA of a plain model given each step's weights
    net = _net()
    alone = swa_fast.PostHocEMA(net, sigma_rels=(0.05, 0.2))
    for weights in seen:
        net.load_state_dict({n: w.float() for n, w in weights.items()})
        alone.update(net)
    for sigma_rel, state in exported.items():
        alone.copy_to(net, sigma_rel=sigma_rel)
        for name, value in net.state_dict().items():
            torch.testing.assert_close(state[name], value, **CLOSE, msg=f"{sigma_rel} {name}")


def test_posthoc_ema_keeps_its_profiles_in_pieces_and_exports_each(on_two_ranks):
    on_two_ranks(_posthoc_profiles_kept_in_pieces)


def _pickled_manager_goes_on(rank, tmp):
    import pickle

    from swa_fast.integrations.deepspeed import EMA

    engine = _engine(3, bf16=True)
    ema = EMA(engine, decay=DECAY)
    _step(engine, 0)
    ema.update(engine)
    again = pickle.loads(pickle.dumps(ema))  # without the engine, as without the model
    for step in (1, 2):
        _step(engine, step)
        ema.update(engine)
        again.update(engine)  # the master pieces found again from the parameters
    mine, theirs = ema.state_dict()["average"], again.state_dict()["average"]
    for name in mine:
        assert mine[name].dtype == torch.float32, name
        assert torch.equal(mine[name], theirs[name]), name
    with pytest.raises(ValueError, match="the engine it was made for is gone"):
        again.save_checkpoint(tmp)


def test_a_pickled_manager_follows_the_same_master_pieces(on_two_ranks):
    on_two_ranks(_pickled_manager_goes_on)
