"""swa_fast.optim.SWA against torchcontrib.optim.SWA's documented behaviour."""

import copy
import subprocess
import sys

import pytest
import torch
from conftest import mlp, random_batch, train_step, weights

import swa_fast
from swa_fast.optim import SWA


def setup(seed=0, **swa_kwargs):
    model = mlp(4, 8, 1, batch_norm=True, seed=seed)
    opt = SWA(torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9), **swa_kwargs)
    return model, opt


def test_auto_mode_averages_every_swa_freq_steps_after_swa_start():
    model, opt = setup(swa_start=3, swa_freq=2, swa_lr=0.05)
    snapshots = []
    for i in range(1, 11):
        train_step(model, opt, *random_batch(16, (4,), seed=i))
        if i > 3 and i % 2 == 0:
            snapshots.append(weights(model, buffers=False))
        assert opt.param_groups[0]["lr"] == (0.05 if i > 3 else 0.1)
    assert opt.param_groups[0]["n_avg"] == len(snapshots) == 4
    opt.swap_swa_sgd()
    for i, p in enumerate(model.parameters()):
        torch.testing.assert_close(p, torch.stack([s[i] for s in snapshots]).mean(0))


def test_manual_mode_and_swap_twice_is_identity():
    model, opt = setup()
    for i in range(1, 6):
        train_step(model, opt, *random_batch(16, (4,), seed=i))
        opt.update_swa()
    live = weights(model, buffers=False)
    opt.swap_swa_sgd()
    assert not all(torch.equal(p, q) for p, q in zip(model.parameters(), live))
    opt.swap_swa_sgd()
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), live))
    for p in model.parameters():  # torchcontrib's state layout
        assert opt.state[p]["swa_buffer"].shape == p.shape


def test_state_dict_restores_the_averages_and_resumes_bit_exactly():
    def run(restart_at=None):
        model, opt = setup(swa_start=2, swa_freq=1)
        for i in range(1, 9):
            if i == restart_at:
                saved_model, saved_opt = copy.deepcopy(model.state_dict()), copy.deepcopy(opt.state_dict())
                model, opt = setup(seed=123, swa_start=2, swa_freq=1)  # a fresh process, other weights
                model.load_state_dict(saved_model)
                opt.load_state_dict(saved_opt)
            train_step(model, opt, *random_batch(16, (4,), seed=i))
        opt.swap_swa_sgd()
        return weights(model, buffers=False)

    straight, resumed = run(), run(restart_at=5)
    assert all(torch.equal(a, b) for a, b in zip(straight, resumed))


def test_bad_arguments_and_states_raise():
    with pytest.raises(ValueError, match="swa_start"):
        setup(swa_start=-1, swa_freq=2)
    with pytest.raises(ValueError, match="swa_freq"):
        setup(swa_start=1, swa_freq=0)
    with pytest.warns(UserWarning, match="ignoring"):
        setup(swa_start=1)
    model, opt = setup()
    opt.update_swa()
    state = opt.state_dict()
    state["swa_state"][0]["swa_buffer"] = torch.zeros(3, 3)
    before = weights(model, buffers=False)
    with pytest.raises(ValueError, match=r"parameter 0 has shape \[8, 4\], its saved average \[3, 3\]"):
        opt.load_state_dict(state)
    opt.swap_swa_sgd()  # the averages (a copy of `before`) are still there
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before))


def test_bn_update_and_param_groups_passthrough():
    model, opt = setup()
    assert opt.param_groups is opt.optimizer.param_groups and opt.defaults["lr"] == 0.1
    extra = torch.nn.Parameter(torch.zeros(3))
    opt.add_param_group({"params": [extra]})
    assert opt.param_groups[-1]["n_avg"] == 0
    SWA.bn_update([torch.randn(8, 4) for _ in range(2)], model)
    assert model[1].num_batches_tracked.item() == 2


def test_works_under_an_lr_scheduler():
    model, opt = setup()
    scheduler = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)
    for i in range(1, 5):
        train_step(model, opt, *random_batch(16, (4,), seed=i))
        scheduler.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(0.025)


class TorchcontribAverages:
    """torchcontrib.optim.SWA's averaging, parameter by parameter: a parameter's buffer starts at
    zeros at the first update of its group that sees it, and every update of a group weighs its
    parameters by the group's count n_avg: buf += (p - buf) / (n_avg + 1)."""

    def __init__(self):
        self.buffers = {}
        self.n_avg = {}

    def update_group(self, index, params):
        n = self.n_avg.get(index, 0)
        for p in params:
            buf = self.buffers.setdefault(p, torch.zeros_like(p))
            buf.add_((p.detach() - buf) * (1 / float(n + 1)))
        self.n_avg[index] = n + 1


def test_a_parameter_appended_to_a_group_keeps_every_average_as_torchcontrib():
    model = mlp(4, 8, 1, batch_norm=True)
    frozen = list(model[0].parameters())
    opt = SWA(torch.optim.SGD([*model[1].parameters(), *model[2].parameters()], lr=0.1))
    reference = TorchcontribAverages()
    for i in range(1, 9):
        train_step(model, opt, *random_batch(16, (4,), seed=i))
        if i == 4:  # unfreeze the first layer: torch's way to add parameters to a group
            opt.param_groups[0]["params"].extend(frozen)
        opt.update_swa()
        reference.update_group(0, opt.param_groups[0]["params"])
    assert opt.param_groups[0]["n_avg"] == 8
    for p in opt.param_groups[0]["params"]:
        torch.testing.assert_close(opt.state[p]["swa_buffer"], reference.buffers[p], rtol=1e-6, atol=1e-7)
    opt.swap_swa_sgd()
    for p in opt.param_groups[0]["params"]:
        torch.testing.assert_close(p.detach(), reference.buffers[p], rtol=1e-6, atol=1e-7)


def test_swap_before_an_appended_parameter_was_averaged_skips_it_as_torchcontrib():
    model = mlp(4, 8, 1)
    opt = SWA(torch.optim.SGD(model[1].parameters(), lr=0.1))
    train_step(model, opt, *random_batch(16, (4,), seed=1))
    opt.update_swa()
    averaged = weights(model[1], buffers=False)
    train_step(model, opt, *random_batch(16, (4,), seed=2))
    opt.param_groups[0]["params"].append(model[0].weight)
    live = weights(model, buffers=False)
    with pytest.warns(UserWarning, match="SWA wasn't applied to param"):
        opt.swap_swa_sgd()
    assert torch.equal(model[0].weight, live[0])  # not averaged yet: left alone
    assert all(torch.equal(p, a) for p, a in zip(model[1].parameters(), averaged))
    with pytest.warns(UserWarning, match="SWA wasn't applied to param"):
        opt.swap_swa_sgd()
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), live))


def test_swap_with_non_contiguous_parameters():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.Flatten(), torch.nn.Linear(16, 2))
    model = model.to(memory_format=torch.channels_last)
    model[2].weight = torch.nn.Parameter(torch.randn(2, 16).t().contiguous().t())  # a transposed layout
    assert not model[0].weight.is_contiguous() and not model[2].weight.is_contiguous()
    opt = SWA(torch.optim.SGD(model.parameters(), lr=0.1))
    snapshots = []
    for i in range(1, 4):
        train_step(model, opt, *random_batch(8, (3, 4, 4), outputs=2, seed=i))
        opt.update_swa()
        snapshots.append(weights(model, buffers=False))
    live = weights(model, buffers=False)
    opt.swap_swa_sgd()
    for i, p in enumerate(model.parameters()):
        torch.testing.assert_close(p.detach(), torch.stack([s[i] for s in snapshots]).mean(0))
    assert model[0].weight.is_contiguous(memory_format=torch.channels_last)  # layouts kept
    opt.swap_swa_sgd()
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), live))


def test_swa_fast_optim_is_an_attribute_after_import_swa_fast():
    # A fresh interpreter: this test module's own import of swa_fast.optim would hide the bug.
    code = "import swa_fast; assert swa_fast.optim.SWA.__name__ == 'SWA'"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_state_dict_between_an_append_and_its_first_update_resumes_as_torchcontrib():
    def start():
        model = mlp(4, 8, 1)
        return model, SWA(torch.optim.SGD(model[1].parameters(), lr=0.1))

    model, opt = start()
    reference = TorchcontribAverages()
    for i in range(1, 7):
        train_step(model, opt, *random_batch(16, (4,), seed=i))
        if i == 3:
            opt.param_groups[0]["params"].append(model[0].weight)
            saved_model, saved_opt = copy.deepcopy(model.state_dict()), copy.deepcopy(opt.state_dict())
            model, opt = start()  # a restart: the new process appends the same parameter first
            opt.param_groups[0]["params"].append(model[0].weight)
            model.load_state_dict(saved_model)
            opt.load_state_dict(saved_opt)
            reference.buffers = {
                new: reference.buffers[old]
                for old, new in zip(reference.buffers, opt.param_groups[0]["params"])
            }
        opt.update_swa()
        reference.update_group(0, opt.param_groups[0]["params"])
    for p in opt.param_groups[0]["params"]:
        torch.testing.assert_close(opt.state[p]["swa_buffer"], reference.buffers[p], rtol=1e-6, atol=1e-7)


def test_a_mismatch_in_one_dtype_writes_no_average_of_another():
    """A group of fp32 and bf16 parameters whose bf16 parameter changed shape raises before any
    average is written, the fp32 ones included (each dtype used to be updated by its own call)."""
    wide, narrow = torch.nn.Parameter(torch.randn(4)), torch.nn.Parameter(torch.randn(3).bfloat16())
    opt = SWA(torch.optim.SGD([wide, narrow], lr=0.1))
    opt.update_swa()
    with torch.no_grad():
        wide.add_(1.0)
    narrow.data = torch.randn(5).bfloat16()
    before = [opt.state[p]["swa_buffer"].clone() for p in (wide, narrow)]
    with pytest.raises(ValueError, match=r"'parameter 1 of its param group' has shape \[5\]"):
        opt.update_swa()
    for p, kept in zip((wide, narrow), before):
        assert torch.equal(opt.state[p]["swa_buffer"], kept)
    assert opt.param_groups[0]["n_avg"] == 1


def _steps(model, optimizer, n):
    g = torch.Generator().manual_seed(0)
    for _ in range(n):
        optimizer.zero_grad()
        model(torch.randn(4, 8, generator=g)).square().mean().backward()
        optimizer.step()


def test_a_manager_attached_to_the_swa_wrapper_updates_after_each_of_its_steps():
    """The wrapper does not run torch's Optimizer machinery (as torchcontrib's), so its own step runs
    no step hooks: `attach` (and FGE's scheduler) hook the optimizer it wraps, whose step its own
    calls once."""
    model = torch.nn.Linear(8, 4)
    twin = copy.deepcopy(model)
    opt = SWA(torch.optim.SGD(model.parameters(), lr=0.1))
    twin_opt = torch.optim.SGD(twin.parameters(), lr=0.1)
    hooked, manual = swa_fast.EMA(model, decay=0.5), swa_fast.EMA(twin, decay=0.5)
    handle = hooked.attach(opt, every=2)
    for step in range(1, 7):
        _steps(model, opt, 1)
        _steps(twin, twin_opt, 1)
        if step % 2 == 0:
            manual.update(twin)
    assert hooked.calls == manual.calls == 3
    assert all(torch.equal(a, b) for a, b in zip(hooked.average.views, manual.average.views))
    handle.remove()
    sched = swa_fast.FGECyclicLR(opt, lr_max=0.1, lr_min=0.01, cycle_length=2)
    fge = swa_fast.FGE(model, scheduler=sched)
    for _ in range(4):
        _steps(model, opt, 1)
        sched.step()
    assert len(fge) == 2
