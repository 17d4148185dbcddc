"""torch.distributed: DDP and FSDP2 (DTensor) managers, update_bn across ranks, DCP round trips.

Each test runs on two real processes joined by the gloo backend (CPU) and checks their results
against one process that sees all the data. Every collective has a 30 s timeout and every test a
deadline, so a failure ends the test instead of hanging it.
"""

import copy

import pytest
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from conftest import fc_linear, mlp, random_batch, train_step
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor, init_device_mesh
from torch.nn.parallel import DistributedDataParallel as DDP
from two_ranks import WORLD

import swa_fast
from swa_fast.distributed import full_state_dict, reshard, shared_draw
from swa_fast.model_tensors import TrackedModel

STEPS = 4
# Linear(3, 1) has one row: under FSDP2 rank 1 holds empty shards of it.
WIDTHS = (6, 8, 3, 1)


# --- what both sides compute -------------------------------------------------------------------------


def batches(rank: int | None):
    """STEPS batches of 8 rows; a rank gets its half of each (None: all of it)."""
    g = torch.Generator().manual_seed(1)
    for _ in range(STEPS):
        x, y = random_batch(8, (WIDTHS[0],), generator=g)
        yield (x, y) if rank is None else (x[4 * rank : 4 * rank + 4], y[4 * rank : 4 * rank + 4])


def train(model, rank, updates, eval_between=False):
    """SGD on the rank's data (mean loss: DDP and FSDP2 average the ranks' gradients, which gives
    the full batch's), each of `updates` (say `swa.update`) called after every step."""
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for x, y in batches(rank):
        train_step(model, opt, x, y)
        if eval_between:  # leaves the FSDP2 root's parameters gathered: managers must cope
            with torch.no_grad():
                model(x)
        for update in updates:
            update(model)


def single_process_averages():
    model = mlp(*WIDTHS, activation=torch.nn.Tanh)
    swa, ema = swa_fast.SWA(model), swa_fast.EMA(model, decay=0.8)
    train(model, None, [swa.update, ema.update])
    return swa.state_dict()["average"], ema.state_dict()["average"]


def assert_same_on_every_rank(tensors: dict) -> None:
    for name, t in tensors.items():
        gathered = [torch.empty_like(t) for _ in range(WORLD)]
        dist.all_gather(gathered, t.contiguous())
        assert all(torch.equal(gathered[0], other) for other in gathered), name


def assert_close_dicts(got: dict, expected: dict) -> None:
    assert list(got) == list(expected)
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=1e-5, atol=1e-6, msg=name)


def fsdp_mlp():
    mesh = init_device_mesh("cpu", (WORLD,))
    model = mlp(*WIDTHS, activation=torch.nn.Tanh)
    fully_shard(model[0], mesh=mesh)
    fully_shard(model[2], mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def full_weights(model) -> dict:
    reshard(model)  # after a forward the FSDP2 root holds gathered plain tensors
    return {n: p.full_tensor() if isinstance(p, DTensor) else p.detach() for n, p in model.named_parameters()}


def local_weights(model) -> dict:
    reshard(model)
    return {
        n: (p.to_local() if isinstance(p, DTensor) else p).detach().clone()
        for n, p in model.named_parameters()
    }


# --- DDP -------------------------------------------------------------------------------------------


def _ddp_averages(rank, tmp):
    model = DDP(mlp(*WIDTHS, activation=torch.nn.Tanh))
    swa, ema = swa_fast.SWA(model), swa_fast.EMA(model, decay=0.8)
    swa0 = swa_fast.SWA(model, rank0_only=True)
    train(model, rank, [swa.update, ema.update, swa0.update])
    swa_avg, ema_avg = swa.state_dict()["average"], ema.state_dict()["average"]
    assert_same_on_every_rank(swa_avg)
    assert_same_on_every_rank(ema_avg)
    expected_swa, expected_ema = single_process_averages()
    assert_close_dicts(swa_avg, expected_swa)
    assert_close_dicts(ema_avg, expected_ema)

    live = local_weights(model.module)
    with swa.average_applied(model):
        assert_close_dicts(local_weights(model.module), swa_avg)
    assert all(torch.equal(live[n], p) for n, p in model.module.named_parameters())

    # DCP: the replicated average is written once and read back on every rank.
    dcp.save({"ema": ema.state_dict()}, checkpoint_id=f"{tmp}/ckpt")
    resumed = swa_fast.EMA(model, decay=0.8)
    state = {"ema": resumed.state_dict()}
    dcp.load(state, checkpoint_id=f"{tmp}/ckpt")
    resumed.load_state_dict(state["ema"])
    for m in (ema, resumed):
        m.update(model)
    after = resumed.state_dict()["average"]
    assert all(torch.equal(t, after[n]) for n, t in ema.state_dict()["average"].items())
    assert resumed.calls == ema.calls == STEPS + 1

    if rank == 0:
        assert all(torch.equal(swa0.state_dict()["average"][n], t) for n, t in swa_avg.items())
    else:  # rank0_only: nothing kept, nothing allocated, and a clear error when asked for it
        assert swa0.state_dict() == {}
        assert all(g.buffer.device.type == "meta" for g in swa0.average.groups)
        with pytest.raises(ValueError, match="rank0_only=True the average lives on rank 0"):
            swa0.copy_to(model)
        assert all(torch.equal(live[n], p) for n, p in model.module.named_parameters())


def test_ddp_average_equals_one_process_on_every_rank(on_two_ranks):
    on_two_ranks(_ddp_averages)


def bn_batches():
    g = torch.Generator().manual_seed(2)
    return [torch.randn(5, 4, generator=g) * (i + 1) for i in range(5)]


def _update_bn_across_ranks(rank, tmp):
    data = bn_batches()
    mine = data[0::2] if rank == 0 else data[1::2]  # 3 batches and 2: the weighting matters
    model = DDP(mlp(4, 6, 1, batch_norm=True))
    swa_fast.update_bn(mine, model)
    stats = dict(model.module[1].named_buffers())
    assert_same_on_every_rank(stats)
    one = mlp(4, 6, 1, batch_norm=True)
    swa_fast.update_bn(data, one)
    expected = dict(one[1].named_buffers())
    assert_close_dicts(stats, expected)
    assert stats["num_batches_tracked"].item() == 5

    # A plain model is left alone by default: rank 0 may be alone here.
    local = mlp(4, 6, 1, batch_norm=True)
    swa_fast.update_bn(mine, local)
    assert local[1].num_batches_tracked.item() == len(mine)
    swa_fast.update_bn(mine, local, sync=True)  # ... unless asked
    assert_close_dicts(dict(local[1].named_buffers()), expected)

    sharded = mlp(4, 6, 1, batch_norm=True)  # FSDP2: synced over the mesh by default
    fully_shard(sharded, mesh=init_device_mesh("cpu", (WORLD,)))
    swa_fast.update_bn(mine, sharded)
    assert_close_dicts(dict(sharded[1].named_buffers()), expected)


def test_update_bn_gives_every_rank_the_statistics_of_all_data(on_two_ranks):
    on_two_ranks(_update_bn_across_ranks)


# --- FSDP1 -----------------------------------------------------------------------------------------


def _fsdp1_average_applied(rank, tmp):
    """FSDP1 (`FullyShardedDataParallel`, what Lightning's FSDPStrategy wraps with): its parameters
    are plain views of each rank's shard, averaged where they are. After a forward without backward
    FSDP1 keeps the gathered weights and its next forward reuses them: a written average must still
    be what that forward sees, and the live weights after."""
    from torch.distributed.fsdp import FullyShardedDataParallel

    model = FullyShardedDataParallel(
        mlp(*WIDTHS, activation=torch.nn.Tanh), use_orig_params=True, device_id=torch.device("cpu")
    )
    swa = swa_fast.SWA(model)
    train(model, rank, [swa.update])
    expected = single_process_averages()[0]
    one = mlp(*WIDTHS, activation=torch.nn.Tanh)
    one.load_state_dict(expected)
    x = torch.randn(3, 6, generator=torch.Generator().manual_seed(3))
    live = {n: p.detach().clone() for n, p in model.named_parameters()}
    with torch.no_grad():
        before = model(x)  # leaves the root's weights gathered
        with swa.average_applied(model):
            torch.testing.assert_close(model(x), one(x), rtol=1e-5, atol=1e-6)
        assert torch.equal(model(x), before)
    assert all(torch.equal(live[n], p) for n, p in model.named_parameters())


def test_fsdp1_average_applied_reaches_the_next_forward(on_two_ranks):
    on_two_ranks(_fsdp1_average_applied)


# --- FSDP2 -----------------------------------------------------------------------------------------


def _fsdp_averages(rank, tmp):
    model = fsdp_mlp()
    swa, ema = swa_fast.SWA(model), swa_fast.EMA(model, decay=0.8)
    train(model, rank, [swa.update, ema.update], eval_between=True)

    state = swa.state_dict()
    for name, p in model.named_parameters():  # laid out as the parameters
        avg = state["average"][name]
        assert isinstance(avg, DTensor)
        assert (avg.shape, avg.placements, avg.device_mesh) == (p.shape, p.placements, p.device_mesh)
    if rank == 1:
        assert state["average"]["4.weight"].to_local().numel() == 0  # an empty shard works too

    expected_swa, expected_ema = single_process_averages()
    full_swa, full_ema = full_state_dict(state), full_state_dict(ema.state_dict())
    if rank == 0:
        assert_close_dicts(full_swa["average"], expected_swa)
        assert_close_dicts(full_ema["average"], expected_ema)
        assert full_swa["n_averaged"].item() == STEPS
    else:
        assert full_swa == {} and full_ema == {}

    # Applying the average to the sharded model, and restoring it exactly. Forward passes inside
    # and after: FSDP2 keeps the root's gathered weights after a forward, which must not outlive
    # the writes into the shards.
    live = local_weights(model)
    x = torch.randn(3, 6, generator=torch.Generator().manual_seed(3))
    one = mlp(*WIDTHS, activation=torch.nn.Tanh)
    one.load_state_dict(expected_swa)
    with torch.no_grad():
        before = model(x)
        with swa.average_applied(model):
            assert_close_dicts(full_weights(model), expected_swa)
            torch.testing.assert_close(model(x), one(x), rtol=1e-5, atol=1e-6)
        assert torch.equal(model(x), before)
    assert all(torch.equal(live[n], t) for n, t in local_weights(model).items())
    swa.swap(model)
    assert_close_dicts(full_weights(model), expected_swa)
    with torch.no_grad():
        torch.testing.assert_close(model(x), one(x), rtol=1e-5, atol=1e-6)
    swa.swap(model)
    with torch.no_grad():
        assert torch.equal(model(x), before)
    assert all(torch.equal(live[n], t) for n, t in local_weights(model).items())
    other = fsdp_mlp()  # another model sharded alike
    swa.copy_to(other)
    assert_close_dicts(full_weights(other), expected_swa)

    # An unsharded model cannot take the shards; nothing is written.
    plain = mlp(*WIDTHS, activation=torch.nn.Tanh)
    before = local_weights(plain)
    with pytest.raises(ValueError, match="is a plain tensor in this model but was a DTensor"):
        swa.copy_to(plain)
    assert all(torch.equal(before[n], t) for n, t in local_weights(plain).items())
    with pytest.raises(ValueError, match="rank0_only=True needs the whole model on rank 0"):
        swa_fast.SWA(model, rank0_only=True)

    # A full state dict (say from a single-process run) loads into a sharded manager: each rank
    # keeps its part.
    fresh = swa_fast.SWA(model)
    fresh.load_state_dict(full_state_dict(state, rank0_only=False))
    for name, t in fresh.state_dict()["average"].items():
        assert torch.equal(t.to_local(), state["average"][name].to_local()), name
    assert fresh.n_averaged.item() == STEPS


def test_fsdp2_average_equals_one_process_and_applies_to_shards(on_two_ranks):
    on_two_ranks(_fsdp_averages)


def _dcp_round_trip(rank, tmp):
    model = fsdp_mlp()
    ema = swa_fast.EMA(model, decay=0.8)
    swa = swa_fast.SWA(model)
    train(model, rank, [ema.update, swa.update])
    saved = {n: t.to_local().clone() for n, t in ema.state_dict()["average"].items()}
    dcp.save({"ema": ema.state_dict(), "swa": swa.state_dict()}, checkpoint_id=f"{tmp}/ckpt")

    ema2, swa2 = swa_fast.EMA(model, decay=0.8), swa_fast.SWA(model)  # what a resumed job builds
    train(model, rank, [ema2.update, swa2.update])  # ... and whatever they held is overwritten by the load
    state = {"ema": ema2.state_dict(), "swa": swa2.state_dict()}
    dcp.load(state, checkpoint_id=f"{tmp}/ckpt")
    ema2.load_state_dict(state["ema"])
    swa2.load_state_dict(state["swa"])
    for name, t in ema2.state_dict()["average"].items():
        assert torch.equal(t.to_local(), saved[name]), name
    assert (ema2.calls, swa2.n_averaged.item()) == (STEPS, STEPS)

    # Going on from there: the resumed managers follow the originals bit for bit.
    for m in (ema, swa):  # the same updates the resumed ones missed out on
        for _ in range(STEPS):
            m.update(model)
    for original, resumed in ((ema, ema2), (swa, swa2)):
        for _ in range(STEPS):
            resumed.update(model)
        a, b = original.state_dict(), resumed.state_dict()
        assert a["calls"] == b["calls"] and torch.equal(a["n_averaged"], b["n_averaged"])
        for name in a["average"]:
            assert torch.equal(a["average"][name].to_local(), b["average"][name].to_local()), name


def _scaled(model, step: int) -> None:
    """The same new weights on a shard as on the whole tensor: each scaled in place, no training
    (whose reductions would differ between one process and two ranks in the last bits)."""
    with torch.no_grad():
        for p in model.parameters():
            (p.to_local() if isinstance(p, DTensor) else p).mul_(1.0 + 0.013 * (step + 1))


def _stochastic_emas(model, updates: int):
    emas = [
        swa_fast.EMA(model, decay=0.7, dtype=torch.bfloat16, rounding="stochastic", seed=5, stats=True),
        swa_fast.SWAG(model, 2, dtype=torch.float16, rounding="stochastic", seed=6, stats=True),
    ]
    for step in range(updates):
        _scaled(model, step)
        for ema in emas:
            ema.update(model)
    return emas


def _fsdp2_stochastic_rounding(rank, tmp):
    """An FSDP2 model's shards (rank 1's bias halves start off the 8-element grid, Linear(3, 1)'s
    shard is empty there) round as the same elements of the whole model: the gathered averages
    equal one process's bit for bit, and both ranks of a DDP model agree with no communication.
    What the ranks' passes saw (`stats=True`) adds up to what the one process's saw."""
    sharded = _stochastic_emas(fsdp_mlp(), 5)
    whole = _stochastic_emas(mlp(*WIDTHS, activation=torch.nn.Tanh), 5)
    for ours, one in zip(sharded, whole):
        gathered = full_state_dict(ours.state_dict(), rank0_only=False)
        expected = one.state_dict()
        for name in expected["average"]:
            assert torch.equal(
                gathered["average"][name].view(torch.int16), expected["average"][name].view(torch.int16)
            ), name
        for row, seen in one.last_stats().items():
            mine = ours.last_stats()[row]
            counts = torch.tensor([mine.written, mine.unchanged, mine.non_finite])
            largest = torch.tensor([mine.max_update])
            dist.all_reduce(counts)
            dist.all_reduce(largest, op=dist.ReduceOp.MAX)
            assert counts.tolist() == [seen.written, seen.unchanged, seen.non_finite], row
            assert largest.item() == seen.max_update, row
    replicated = _stochastic_emas(DDP(mlp(*WIDTHS, activation=torch.nn.Tanh)), 5)
    for ema in replicated:
        assert_same_on_every_rank(
            {n: t.view(torch.int16).int() for n, t in ema.state_dict()["average"].items()}
        )


def test_stochastic_rounding_of_shards_equals_one_process_bit_for_bit(on_two_ranks):
    on_two_ranks(_fsdp2_stochastic_rounding)


def test_dcp_round_trip_of_sharded_managers_resumes_exactly(on_two_ranks):
    on_two_ranks(_dcp_round_trip)


def _fge_snapshots(rank, tmp):
    model = fsdp_mlp()
    fge = swa_fast.FGE(model)
    train(model, rank, [fge.snapshot])
    one = mlp(*WIDTHS, activation=torch.nn.Tanh)
    expected = swa_fast.FGE(one)
    train(one, None, [expected.snapshot])

    state = fge.state_dict()
    assert all(isinstance(t, DTensor) for snapshot in state["snapshots"] for t in snapshot.values())
    full = full_state_dict(state)
    if rank == 0:
        for got, want in zip(full["snapshots"], expected.state_dict()["snapshots"], strict=True):
            assert_close_dicts(got, want)

    x = torch.randn(5, 6, generator=torch.Generator().manual_seed(3))
    live = local_weights(model)
    got = fge.predict(model, x, output="logits")  # each snapshot loaded into the shards in turn
    torch.testing.assert_close(got, expected.predict(one, x, output="logits"), rtol=1e-5, atol=1e-6)
    assert all(torch.equal(live[n], t) for n, t in local_weights(model).items())


def test_fge_snapshots_of_a_sharded_model(on_two_ranks):
    on_two_ranks(_fge_snapshots)


def _stacked_state(rank, tmp):
    """A manager's own per-tensor state with leading dims (SWAG's deviation rows), saved as DTensors
    and read back from them or from full tensors."""
    model = fsdp_mlp()
    tracked = TrackedModel(model, buffers=False, owner="test")
    local = dict(zip(tracked.names, tracked.tensors(model)))
    stacked = {n: torch.stack([t * k for k in range(3)]) for n, t in local.items()}
    sharded = tracked.shard_state(stacked, lead=(3,))
    full = full_state_dict(sharded, rank0_only=False)
    for name, w in full_weights(model).items():
        assert torch.equal(full[name], torch.stack([w * k for k in range(3)])), name
    for saved in (full, sharded):
        back = tracked.local_state(saved, lead=(3,))
        assert all(torch.equal(back[n], stacked[n]) for n in stacked)
    with pytest.raises(ValueError, match=r"'0.weight' has shape \[3, 8, 6\] in the state_dict but \[8, 6\]"):
        tracked.local_state(full)


def test_per_tensor_state_with_leading_dims_of_a_sharded_model(on_two_ranks):
    on_two_ranks(_stacked_state)


# --- models that differ between ranks ----------------------------------------------------------------


def _mismatches(rank, tmp):
    mesh = init_device_mesh("cpu", (WORLD,))
    sharded = torch.nn.Linear(4, 6 if rank == 0 else 8)
    fully_shard(sharded, mesh=mesh)
    with pytest.raises(ValueError, match=r"rank 0 and on rank 1 were given different models \('weight'"):
        swa_fast.SWA(sharded)

    # Same shapes (DDP's own check passes), other names.
    model = DDP(mlp(4, 4) if rank == 0 else fc_linear())
    with pytest.raises(ValueError, match="different models .'0.weight': .* vs 'fc.weight'"):
        swa_fast.EMA(model)

    same = DDP(fc_linear())
    with pytest.raises(ValueError, match="option rank0_only: True vs False"):
        swa_fast.SWA(same, rank0_only=rank == 0)
    swa_fast.SWA(same).update(same)  # and a matching one still works after all that
    dist.barrier()


def test_a_rank_with_another_model_gets_a_clear_error_on_every_rank(on_two_ranks):
    on_two_ranks(_mismatches)


def _fge_swag_checkpoints(rank, tmp):
    model = fsdp_mlp()
    fge, swag = swa_fast.FGE(model), swa_fast.SWAG(model, max_rank=3)
    train(model, rank, [fge.snapshot, swag.update])
    one = mlp(*WIDTHS, activation=torch.nn.Tanh)
    fge1, swag1 = swa_fast.FGE(one), swa_fast.SWAG(one, max_rank=3)
    train(one, None, [fge1.snapshot, swag1.update])
    full = full_state_dict(swag.state_dict())
    if rank == 0:
        expected = swag1.state_dict()
        for k in ("average", "sq", "deviation"):
            assert_close_dicts(full[k], expected[k])
    dcp.save({"fge": fge.state_dict(), "swag": swag.state_dict()}, checkpoint_id=f"{tmp}/ckpt")
    fge2, swag2 = swa_fast.FGE(model), swa_fast.SWAG(model, max_rank=3)
    train(model, rank, [fge2.snapshot, swag2.update])
    state = {"fge": fge2.state_dict(), "swag": swag2.state_dict()}
    dcp.load(state, checkpoint_id=f"{tmp}/ckpt")
    fge2.load_state_dict(state["fge"])
    swag2.load_state_dict(state["swag"])
    for a, b in zip(fge.state_dict()["snapshots"], fge2.state_dict()["snapshots"], strict=True):
        assert all(torch.equal(a[n].to_local(), b[n].to_local()) for n in a)
    a, b = swag.state_dict(), swag2.state_dict()
    for k in ("average", "sq", "deviation"):
        assert all(torch.equal(a[k][n].to_local(), b[k][n].to_local()) for n in a[k]), k
    fge3, swag3 = swa_fast.FGE(model), swa_fast.SWAG(model, max_rank=3)  # from full state dicts
    fge3.load_state_dict(full_state_dict(fge.state_dict(), rank0_only=False))
    swag3.load_state_dict(full_state_dict(swag.state_dict(), rank0_only=False))
    c = swag3.state_dict()
    for k in ("average", "sq", "deviation"):
        assert all(torch.equal(a[k][n].to_local(), c[k][n].to_local()) for n in a[k]), k
    assert len(fge3.snapshots) == STEPS


def test_fge_and_swag_checkpoints_of_a_sharded_model(on_two_ranks):
    on_two_ranks(_fge_swag_checkpoints)


def _swag_sample_on_shards(rank, tmp):
    # The low-rank noise is drawn from differently seeded generators on the two ranks, then made
    # the first rank's everywhere: checked on the helper, then through a whole sample.
    draw = shared_draw(torch.randn(5, generator=torch.Generator().manual_seed(rank)), [])
    assert torch.equal(draw, torch.randn(5, generator=torch.Generator().manual_seed(rank)))  # no mesh
    model = fsdp_mlp()
    layouts = swa_fast.SWAG(model, max_rank=2).tracked.layouts
    draw = shared_draw(torch.randn(5, generator=torch.Generator().manual_seed(rank)), layouts)
    gathered = [torch.empty(5) for _ in range(WORLD)]
    dist.all_gather(gathered, draw)
    assert torch.equal(gathered[0], gathered[1])
    assert torch.equal(draw, torch.randn(5, generator=torch.Generator().manual_seed(0)))
    swag = swa_fast.SWAG(model, max_rank=3)
    train(model, rank, [swag.update])
    swag.copy_to(model)
    mean = full_weights(model)
    swag.sample(model, generator=torch.Generator().manual_seed(10 + rank))
    drawn = full_weights(model)
    assert all(torch.isfinite(t).all() for t in drawn.values())
    assert any(not torch.equal(drawn[n], mean[n]) for n in mean)


def test_swag_samples_share_their_low_rank_noise_across_shards(on_two_ranks):
    on_two_ranks(_swag_sample_on_shards)


# --- without torch.distributed ---------------------------------------------------------------------


def test_update_bn_sync_without_torch_distributed_raises_and_leaves_the_model():
    model = mlp(4, 6, 1, batch_norm=True)
    swa_fast.update_bn(bn_batches(), model)
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError, match="sync=True needs torch.distributed"):
        swa_fast.update_bn(bn_batches()[:1], model, sync=True)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_rank0_only_and_full_state_dict_in_one_process():
    model = mlp(*WIDTHS, activation=torch.nn.Tanh)
    swa = swa_fast.SWA(model, rank0_only=True)  # one process is rank 0: it keeps the average
    train(model, None, [swa.update])
    full = full_state_dict(swa.state_dict())
    expected, _ = single_process_averages()
    assert all(torch.equal(full["average"][n], expected[n]) for n in expected)
    assert full["average"]["0.weight"].data_ptr() != swa.state_dict()["average"]["0.weight"].data_ptr()
