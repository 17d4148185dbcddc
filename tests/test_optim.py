"""swa_fast.optim.SWA against torchcontrib.optim.SWA's documented behaviour."""

import copy

import pytest
import torch
from conftest import mlp, random_batch, train_step, weights

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
