"""swa_fast.swa_utils against torch.optim.swa_utils: same results, same state_dicts, same API."""

import copy
import io
import pickle

import numpy as np
import pytest
import torch
from conftest import cnn_with_bn, mlp, perturb_, train_step, weights
from torch.optim import swa_utils as torch_swa

from swa_fast import swa_utils as fast_swa

# The batch perturb_ runs through cnn_with_bn(8): 5 one-channel 8x8 images.
IMAGES = (5, 1, 8, 8)


def assert_same_state(fast, ref, rtol=1e-6, atol=1e-6):
    fs, ts = fast.state_dict(), ref.state_dict()
    assert list(fs) == list(ts)
    for k in fs:
        torch.testing.assert_close(fs[k], ts[k], rtol=rtol, atol=atol, msg=lambda m, k=k: f"{k}: {m}")


def run_both(fast_kwargs=None, torch_kwargs=None, updates=6, model=None):
    model = model or cnn_with_bn(8)
    fast = fast_swa.AveragedModel(model, **(fast_kwargs or {}))
    ref = torch_swa.AveragedModel(model, **(torch_kwargs or fast_kwargs or {}))
    for step in range(updates):
        perturb_(model, step, IMAGES)
        fast.update_parameters(model)
        ref.update_parameters(model)
    return model, fast, ref


@pytest.mark.parametrize("use_buffers", [False, True])
def test_swa_matches_torch(use_buffers):
    _, fast, ref = run_both({"use_buffers": use_buffers})
    assert_same_state(fast, ref)
    assert fast.n_averaged.item() == 6


def test_swa_is_the_mean_of_the_snapshots():
    model = torch.nn.Linear(3, 2)
    averaged = fast_swa.AveragedModel(model)
    snapshots = []
    for step in range(4):
        perturb_(model, step)
        snapshots.append(weights(model, buffers=False))
        averaged.update_parameters(model)
    for i, p in enumerate(averaged.module.parameters()):
        torch.testing.assert_close(p, torch.stack([s[i] for s in snapshots]).mean(0))


def test_first_update_copies_exactly():
    model = cnn_with_bn(8)
    averaged = fast_swa.AveragedModel(model)
    perturb_(model, 1, IMAGES)
    averaged.update_parameters(model)
    for a, p in zip(averaged.module.parameters(), model.parameters()):
        assert torch.equal(a, p)


@pytest.mark.parametrize("use_buffers", [False, True])
def test_ema_matches_torch(use_buffers):
    _, fast, ref = run_both(
        {"multi_avg_fn": fast_swa.get_ema_multi_avg_fn(0.9), "use_buffers": use_buffers},
        {"multi_avg_fn": torch_swa.get_ema_multi_avg_fn(0.9), "use_buffers": use_buffers},
    )
    assert_same_state(fast, ref)


@pytest.mark.parametrize("kind", ["swa", "ema"])
def test_many_batchnorm_counters_match_torch(kind):
    """Integer buffers are averaged stacked: each keeps its own value, with torch's arithmetic."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        *[m for _ in range(3) for m in (torch.nn.Linear(4, 4), torch.nn.BatchNorm1d(4))]
    )
    fn = {"swa": None, "ema": "get_ema_multi_avg_fn"}[kind]
    fast = fast_swa.AveragedModel(model, use_buffers=True, multi_avg_fn=fn and getattr(fast_swa, fn)(0.7))
    ref = torch_swa.AveragedModel(model, use_buffers=True, multi_avg_fn=fn and getattr(torch_swa, fn)(0.7))
    for step in range(5):
        for layer, calls in [(model, 1), (model[3], 2 * step), (model[5], step * step)]:
            for _ in range(calls):
                layer(torch.randn(8, 4))  # each BatchNorm counts a different number of batches
        fast.update_parameters(model)
        ref.update_parameters(model)
    counts = [fast.module[i].num_batches_tracked.item() for i in (1, 3, 5)]
    assert len(set(counts)) == 3, counts
    assert_same_state(fast, ref)


@pytest.mark.parametrize("kind", ["swa", "ema"])
@pytest.mark.parametrize("count_on_host", [True, False])
def test_the_first_update_copies_integer_buffers_exactly_at_any_count(kind, count_on_host):
    """As torch's first update (a copy): a count past float32's integers (2^24) is not rounded,
    whether n_averaged is read on the host or stays a tensor (an int32 one has no host view)."""
    model = cnn_with_bn(8)
    model[1].num_batches_tracked.fill_(2**24 + 1)
    fn = {"swa": None, "ema": fast_swa.get_ema_multi_avg_fn(0.9)}[kind]
    fast = fast_swa.AveragedModel(model, use_buffers=True, multi_avg_fn=fn)
    if not count_on_host:
        fast.n_averaged = torch.tensor(0, dtype=torch.int32)
    fast.module[1].num_batches_tracked.fill_(0)
    fast.update_parameters(model)
    assert fast.module[1].num_batches_tracked.item() == 2**24 + 1
    assert (fast._prepared._count_view is not None) == count_on_host


def test_swa_multi_avg_fn_matches_torch():
    _, fast, ref = run_both(
        {"multi_avg_fn": fast_swa.get_swa_multi_avg_fn()}, {"multi_avg_fn": torch_swa.get_swa_multi_avg_fn()}
    )
    assert_same_state(fast, ref)


def test_users_own_avg_fn_runs_as_in_torch():
    calls = []

    def halfway(avg, cur, n):
        calls.append(avg.shape)
        return (avg + cur) / 2

    _, fast, ref = run_both({"avg_fn": halfway})
    assert_same_state(fast, ref, rtol=0, atol=0)
    # tensor by tensor, once per parameter per averaging update in each of the two models
    assert len(calls) == 2 * 5 * len(list(fast.module.parameters()))
    assert fast._flat is None  # no flat buffers: the user's function owns the arithmetic


@pytest.mark.parametrize("use_buffers", [False, True])
@pytest.mark.parametrize("factory", ["get_swa_avg_fn", "get_ema_avg_fn"])
def test_our_avg_fn_factories_take_the_fused_path_with_torchs_numbers(factory, use_buffers):
    """What Lightning's EMA callback passes (`avg_fn=get_ema_avg_fn(decay)`): the per-tensor math
    of torch's own function, run as one fused op over flat buffers."""
    args = (0.8,) if factory == "get_ema_avg_fn" else ()
    ours = getattr(fast_swa, factory)(*args)
    model, fast, ref = run_both(
        {"avg_fn": ours, "use_buffers": use_buffers},
        {"avg_fn": getattr(torch_swa, factory)(*args), "use_buffers": use_buffers},
    )
    assert_same_state(fast, ref)
    averaged = list(fast.module.parameters()) + (list(fast.module.buffers()) if use_buffers else [])
    floating = [t for t in averaged if t.is_floating_point()]
    storage = floating[0].untyped_storage().data_ptr()
    assert all(t.untyped_storage().data_ptr() == storage for t in floating)  # views of one flat buffer
    # and the function itself is torch's per-tensor math, usable in torch's AveragedModel
    a, c = torch.randn(5), torch.randn(5)
    torch.testing.assert_close(ours(a, c, 3), getattr(torch_swa, factory)(*args)(a, c, 3), rtol=0, atol=0)


def test_users_own_multi_avg_fn_runs_as_in_torch():
    def add_half(avg_list, cur_list, n):
        for a, c in zip(avg_list, cur_list):
            a.add_(0.5 * (c - a))

    _, fast, ref = run_both({"multi_avg_fn": add_half})
    assert_same_state(fast, ref, rtol=0, atol=0)


def test_our_multi_avg_fns_work_in_torchs_averaged_model():
    _, ours_in_torch, ref = run_both(
        {"multi_avg_fn": fast_swa.get_ema_multi_avg_fn(0.8)},
        {"multi_avg_fn": torch_swa.get_ema_multi_avg_fn(0.8)},
    )
    assert_same_state(ours_in_torch, ref)


def test_both_avg_fns_rejected_like_torch():
    with pytest.raises(AssertionError, match="Only one of avg_fn and multi_avg_fn"):
        fast_swa.AveragedModel(cnn_with_bn(8), avg_fn=lambda a, c, n: a, multi_avg_fn=lambda a, c, n: None)


def test_state_dicts_are_interchangeable_with_torch():
    model, fast, ref = run_both()
    from_torch = fast_swa.AveragedModel(model)
    from_torch.load_state_dict(ref.state_dict())
    assert_same_state(from_torch, ref, rtol=0, atol=0)
    into_torch = torch_swa.AveragedModel(model)
    into_torch.load_state_dict(fast.state_dict())
    assert_same_state(fast, into_torch, rtol=0, atol=0)
    # and the loaded average keeps averaging like torch's
    perturb_(model, 99, IMAGES)
    from_torch.update_parameters(model)
    ref.update_parameters(model)
    assert_same_state(from_torch, ref)


def test_the_next_update_reads_the_count_as_the_user_left_it():
    """The count is read and bumped through a host view of the n_averaged buffer: a count loaded,
    written in place or set anew is what the next update's weight comes from."""
    model, fast, ref = run_both(updates=3)
    changes = [
        lambda m: m.load_state_dict({**m.state_dict(), "n_averaged": torch.tensor(7)}),
        lambda m: m.n_averaged.fill_(2),
        lambda m: setattr(m, "n_averaged", torch.tensor(4)),  # a new buffer
    ]
    for step, change in enumerate(changes, start=10):
        change(fast)
        change(ref)
        perturb_(model, step, IMAGES)
        fast.update_parameters(model)
        ref.update_parameters(model)
        assert_same_state(fast, ref)
    assert fast.n_averaged.item() == 5


def test_pickle_deepcopy_and_save_round_trip():
    model, fast, _ = run_both()
    for clone in (pickle.loads(pickle.dumps(fast)), copy.deepcopy(fast)):
        assert_same_state(clone, fast, rtol=0, atol=0)
        perturb_(model, 50, IMAGES)
        clone.update_parameters(model)
        assert clone.n_averaged.item() == fast.n_averaged.item() + 1
    buffer = io.BytesIO()
    torch.save(fast.state_dict(), buffer)
    buffer.seek(0)
    restored = fast_swa.AveragedModel(cnn_with_bn(8))
    restored.load_state_dict(torch.load(buffer))
    assert_same_state(restored, fast, rtol=0, atol=0)


def test_moved_averaged_model_keeps_averaging_correctly():
    """`.to()` replaces the module's tensors: the next update notices and rebuilds its flat buffers."""
    model, fast, ref = run_both(updates=3)
    fast.to(torch.float64)
    ref.to(torch.float64)
    model.to(torch.float64)
    for step in range(3, 6):
        perturb_(model, step, IMAGES)
        fast.update_parameters(model)
        ref.update_parameters(model)
    assert_same_state(fast, ref)  # fp32-level differences from the first 3 updates remain


def test_tensors_replaced_without_hooks_are_seen_as_by_torch():
    """Between updates the walks over the model and the averaged copy are remembered; what torch's
    registration hooks do not see (p.data = ..., Module.to's new buffers, a tensor written into a
    module's dict) is read live all the same."""
    model, fast, ref = run_both(updates=3)
    for averaged in (fast, ref):
        averaged.module[0].weight.data = averaged.module[0].weight.data.clone()  # moved off the flat buffer
        averaged.module[4]._parameters["bias"] = torch.nn.Parameter(averaged.module[4].bias.detach() + 1)
    model[1]._buffers["running_mean"] = model[1].running_mean.clone()  # the model's too
    for step in range(3, 6):
        perturb_(model, step, IMAGES)
        fast.update_parameters(model)
        ref.update_parameters(model)
    assert_same_state(fast, ref)


def test_buffers_changed_between_updates_are_copied_as_by_torch():
    """The model's buffers are copied at every update (use_buffers=False) by one op, in the same
    call to the extension as the average, or by torch's copy where the op refuses them (a strided
    destination, an integer of another dtype): whatever happened to either side's buffers, or to
    n_averaged, since the last update, the next one leaves what torch's leaves."""
    model, fast, ref = run_both(updates=2)
    changes = [
        lambda m: None,  # only the model's BatchNorm buffers, changed in place by perturb_
        lambda m: setattr(model[1].num_batches_tracked, "data", torch.tensor(100)),
        lambda m: setattr(m.module[1].num_batches_tracked, "data", torch.tensor(-1)),
        lambda m: setattr(m.n_averaged, "data", torch.tensor(7)),
        lambda m: model[1]._buffers.__setitem__("num_batches_tracked", torch.tensor(5, dtype=torch.int32)),
        lambda m: m.module[1]._buffers.__setitem__("running_var", torch.ones(8)[::2]),  # strided
        lambda m: model[1]._buffers.__setitem__("running_mean", model[1].running_mean.clone()),  # a `.to()`
    ]
    for step, change in enumerate(changes, start=10):
        for averaged in (fast, ref):
            change(averaged)
        perturb_(model, step, IMAGES)
        fast.update_parameters(model)
        ref.update_parameters(model)
        assert_same_state(fast, ref)
        ours, theirs = fast.state_dict(), ref.state_dict()
        for name in ("running_mean", "running_var", "num_batches_tracked"):
            assert torch.equal(ours[f"module.1.{name}"], theirs[f"module.1.{name}"]), (step, name)
        assert torch.equal(ours["n_averaged"], theirs["n_averaged"])
    assert fast.n_averaged.item() == 7 + 4


def test_an_update_under_torch_compile_gives_torchs_average():
    model, fast, ref = run_both(
        {"multi_avg_fn": fast_swa.get_ema_multi_avg_fn(0.9)},
        {"multi_avg_fn": torch_swa.get_ema_multi_avg_fn(0.9)},
        updates=1,
    )
    update = torch.compile(fast.update_parameters)
    for step in range(3):
        perturb_(model, step, IMAGES)
        update(model)
        ref.update_parameters(model)
        assert_same_state(fast, ref, rtol=0, atol=0)


def test_mismatched_model_raises_and_leaves_average_untouched():
    model, fast, _ = run_both(updates=2)
    before = copy.deepcopy(fast.state_dict())
    other = cnn_with_bn(8, classes=5)
    with pytest.raises(ValueError, match=r"\[4\]` has shape \[5, 144\].*shape \[3, 144\]"):
        fast.update_parameters(other)
    with pytest.raises(ValueError, match="the model has 2 parameters, the averaged copy has 6"):
        fast.update_parameters(torch.nn.Linear(2, 2))
    after = fast.state_dict()
    for k in before:
        assert torch.equal(before[k], after[k]), k


def test_bf16_model_with_fp32_average():
    """dtype=torch.float32 averages a bf16 model in fp32: the mean of bf16 snapshots, computed
    exactly, rounded once; torch's bf16 average drifts by many bf16 steps."""
    model = torch.nn.Linear(64, 64).to(torch.bfloat16)
    fast = fast_swa.AveragedModel(model, dtype=torch.float32)
    snapshots = []
    for step in range(20):
        perturb_(model, step)
        snapshots.append(model.weight.detach().double().clone())
        fast.update_parameters(model)
    exact = torch.stack(snapshots).mean(0)
    assert fast.module.weight.dtype == torch.float32
    torch.testing.assert_close(fast.module.weight.double(), exact, rtol=1e-5, atol=1e-5)


def test_swalr_is_torchs():
    assert fast_swa.SWALR is torch_swa.SWALR


def test_update_bn_matches_torch():
    _, fast, ref = run_both()
    loader = [(torch.randn(8, 1, 8, 8), torch.zeros(8)) for _ in range(3)]
    fast.eval()
    fast_swa.update_bn(loader, fast)
    torch_swa.update_bn(loader, ref)
    assert_same_state(fast, ref, rtol=1e-6, atol=1e-6)
    assert not fast.training and fast.module[1].momentum == 0.1
    assert fast.module[1].num_batches_tracked.item() == 3


def test_update_bn_with_a_custom_forward():
    _, fast, ref = run_both()
    images = [torch.randn(8, 1, 8, 8) for _ in range(3)]
    fast_swa.update_bn([{"image": x} for x in images], fast, forward_fn=lambda m, batch: m(batch["image"]))
    torch_swa.update_bn(images, ref)
    assert_same_state(fast, ref, rtol=1e-6, atol=1e-6)


def test_short_training_run_matches_torch():
    """SGD on a small regression task; SWA from epoch 3 with SWALR; swa_fast vs torch, same seed."""
    results = []
    for swa in (fast_swa, torch_swa):
        torch.manual_seed(0)
        x, y = torch.randn(256, 8), torch.randn(256, 1)
        model = mlp(8, 16, 1, batch_norm=True, activation=torch.nn.Tanh, seed=None)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        averaged = swa.AveragedModel(model)
        scheduler = swa.SWALR(optimizer, swa_lr=0.05, anneal_epochs=2)
        for epoch in range(8):
            for i in range(0, 256, 32):
                train_step(model, optimizer, x[i : i + 32], y[i : i + 32])
            if epoch >= 3:
                averaged.update_parameters(model)
                scheduler.step()
        swa.update_bn([(x[i : i + 32],) for i in range(0, 256, 32)], averaged)
        results.append(averaged)
    assert_same_state(results[0], results[1], rtol=1e-5, atol=1e-6)


def test_module_tensors_match_nn_module_order_with_shared_weights():
    from swa_fast.model_tensors import module_tensors

    embedding = torch.nn.Embedding(10, 4)
    model = torch.nn.Sequential(embedding, torch.nn.BatchNorm1d(4), torch.nn.Linear(4, 10))
    model[2].weight = embedding.weight  # tied, as in language models
    assert list(map(id, module_tensors(model, False))) == list(map(id, model.parameters()))
    everything = [*model.parameters(), *model.buffers()]
    assert list(map(id, module_tensors(model, True))) == list(map(id, everything))


def test_module_walk_matches_nn_module_with_nested_and_shared_modules():
    from swa_fast.model_tensors import module_buffers, module_tensors

    block = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.BatchNorm1d(4))
    nested = torch.nn.Sequential(torch.nn.Sequential(block, torch.nn.ReLU()), torch.nn.LayerNorm(4))
    shared = torch.nn.Sequential(block, torch.nn.Linear(4, 4), block)  # one module in two places
    for model in (nested, shared, torch.nn.TransformerEncoderLayer(8, 2)):
        everything = [*model.parameters(), *model.buffers()]
        assert list(map(id, module_tensors(model, True))) == list(map(id, everything))
        assert list(map(id, module_tensors(model, False))) == list(map(id, model.parameters()))
        assert list(map(id, module_buffers(model))) == list(map(id, model.buffers()))


@pytest.mark.parametrize(
    "decay",
    [
        np.float32(0.99),
        np.float64(0.9),
        torch.tensor(0.99, dtype=torch.bfloat16),
        torch.tensor(0.9, dtype=torch.float16),
    ],
    ids=["np.float32", "np.float64", "bf16 tensor", "fp16 tensor"],
)
def test_ema_decays_torch_accepts_give_torchs_average(decay):
    _, fast, ref = run_both(
        {"multi_avg_fn": fast_swa.get_ema_multi_avg_fn(decay)},
        {"multi_avg_fn": torch_swa.get_ema_multi_avg_fn(decay)},
    )
    assert_same_state(fast, ref)


@pytest.mark.parametrize(
    "decay", [-0.1, 1.5, float("nan"), "0.9", None, 0.9j, torch.tensor([0.9, 0.9]), torch.tensor(0.9j)]
)
@pytest.mark.parametrize("factory", ["get_ema_multi_avg_fn", "get_ema_avg_fn"])
def test_bad_ema_decays_raise_at_construction(decay, factory):
    expected = rf"{factory}: decay must be a finite real number in \[0.0, 1.0\], got"
    with pytest.raises(ValueError, match=expected):
        getattr(fast_swa, factory)(decay)


def test_channels_last_model_averages_as_torch():
    model = cnn_with_bn(8, in_channels=3).to(memory_format=torch.channels_last)
    assert not model[0].weight.is_contiguous()
    images = (5, 3, 8, 8)
    fast = fast_swa.AveragedModel(model)
    ref = torch_swa.AveragedModel(model)
    for step in range(4):
        perturb_(model, step, images)
        fast.update_parameters(model)
        ref.update_parameters(model)
    assert_same_state(fast, ref)
    x = torch.randn(images).to(memory_format=torch.channels_last)
    torch.testing.assert_close(fast.eval()(x), ref.eval()(x), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("use_buffers", [False, True])
def test_an_average_converted_to_channels_last_after_it_started_goes_on_as_torch(use_buffers):
    """`averaged.to(memory_format=torch.channels_last)` between updates: the copy's parameters keep
    their objects, now strided, and the updates go on with torch's results."""
    model = cnn_with_bn(8, in_channels=3)
    fast, ref = fast_swa.AveragedModel(model, use_buffers=use_buffers), torch_swa.AveragedModel(model)
    for step in range(5):
        perturb_(model, step, (5, 3, 8, 8))
        if step == 2:
            fast.to(memory_format=torch.channels_last)
            ref.to(memory_format=torch.channels_last)
        fast.update_parameters(model)
        ref.update_parameters(model)
    assert fast.module[0].weight.is_contiguous(memory_format=torch.channels_last)
    for (name, p), q in zip(fast.module.named_parameters(), ref.module.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-6, msg=name)


def test_a_module_written_straight_into_modules_is_averaged_as_named_parameters_show_it():
    """`model._modules["1"] = head` runs no hook: the average follows `model.parameters()` as
    torch's does (the head's tensors from then on), not the detached old head. (The reference is
    the mean of what `parameters()` gave at each update: torch's AveragedModel, updated beside it,
    would set its `n_averaged` through a registration hook and so hide the change's silence.)"""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 2))
    head = torch.nn.Linear(4, 2)
    averaged = fast_swa.AveragedModel(model)
    snapshots = []
    for step in range(4):
        perturb_(model, step)
        if step == 2:
            model._modules["1"] = head
        averaged.update_parameters(model)
        snapshots.append(weights(model, buffers=False))
    for i, p in enumerate(averaged.module.parameters()):
        torch.testing.assert_close(p, torch.stack([s[i] for s in snapshots]).mean(0))


def saved_bytes(obj) -> int:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getbuffer().nbytes


def test_saving_one_layers_state_dict_saves_only_that_layer_as_torch():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(200, 200), torch.nn.Linear(10, 10))
    fast, ref = fast_swa.AveragedModel(model), torch_swa.AveragedModel(model)
    for step in range(3):
        perturb_(model, step)
        fast.update_parameters(model)
        ref.update_parameters(model)
    part, reference_part = fast.module[1].state_dict(), ref.module[1].state_dict()
    assert saved_bytes(part) == saved_bytes(reference_part) < 10_000
    restored = torch.nn.Linear(10, 10)
    restored.load_state_dict(torch.load(io.BytesIO(_saved(part))))
    assert all(torch.equal(a, b) for a, b in zip(restored.parameters(), fast.module[1].parameters()))
    # The whole state is the flat buffers' memory (no copy), saved in no more bytes than torch's.
    whole = fast.state_dict()
    assert whole["module.0.weight"].untyped_storage().data_ptr() == fast.module[0].weight.data_ptr()
    assert saved_bytes(whole) <= saved_bytes(ref.state_dict())
    # A part picked from the whole state holds only its own bytes too, as torch's.
    pick = [k for k in whole if k.startswith("module.1.")]
    assert saved_bytes({k: whole[k] for k in pick}) == saved_bytes({k: ref.state_dict()[k] for k in pick})
    # keep_vars=True gives the parameters and buffers themselves, as torch's.
    assert fast.module[1].state_dict(keep_vars=True)["weight"] is fast.module[1].weight
    with_buffers = fast_swa.AveragedModel(cnn_with_bn(8), use_buffers=True)
    with_buffers.update_parameters(with_buffers.module)
    kept = with_buffers.module[1].state_dict(keep_vars=True)
    assert kept["running_mean"] is with_buffers.module[1].running_mean
    # Nested in another module's state_dict, the entries are as torch's.
    holder = torch.nn.ModuleDict({"average": fast})
    assert holder.state_dict()["average.module.1.weight"].data_ptr() == fast.module[1].weight.data_ptr()


def _saved(obj) -> bytes:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


def test_update_bn_of_an_empty_loader_resets_as_torch_and_require_batches_raises_first():
    _, fast, ref = run_both()
    fast_swa.update_bn([], fast)
    torch_swa.update_bn([], ref)
    assert_same_state(fast, ref)
    assert fast.module[1].num_batches_tracked.item() == 0
    one_shot = (torch.randn(8, 1, 8, 8) for _ in range(3))
    fast_swa.update_bn(one_shot, fast, require_batches=True)
    before = copy.deepcopy(fast.state_dict())
    with pytest.raises(ValueError, match="the loader gave no batches"):
        fast_swa.update_bn(one_shot, fast, require_batches=True)  # exhausted
    after = fast.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert fast.module[1].num_batches_tracked.item() == 3
