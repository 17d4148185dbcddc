"""swa_fast.integrations.lightning against Lightning's own callbacks, in real Trainer runs on the
CPU: the same final weights, and checkpoints written by either resuming the other.

Weights agree to fp32 rounding, not exactly: Lightning's SWA divides, (p - avg) / (n + 1), where
the fused op multiplies by the weight 1 / (n + 1); Lightning's EMA computes decay * ema +
(1 - decay) * p where the fused op computes ema + (1 - decay) * (p - ema). Copies are exact.
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from conftest import cnn_with_bn, random_batch

L = pytest.importorskip("lightning.pytorch")
from lightning.pytorch import callbacks as lightning_callbacks  # noqa: E402

from swa_fast.integrations import lightning as ours  # noqa: E402
from swa_fast.swa_utils import SWALR, get_ema_avg_fn  # noqa: E402

IMAGE = (1, 6, 6)
# Equal to fp32 rounding, accumulated over a few updates and a BatchNorm pass.
CLOSE = dict(rtol=1e-5, atol=1e-6)


class TinyModule(L.LightningModule):
    def __init__(self, validate: bool = False) -> None:
        super().__init__()
        self.net = cnn_with_bn(IMAGE[-1])
        self.validate = validate
        self.batches = random_batch(32, IMAGE, classes=3, seed=3)

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, _index):
        x, y = batch
        return torch.nn.functional.cross_entropy(self(x), y)

    def validation_step(self, batch, _index):
        x, y = batch
        self.log("val_loss", torch.nn.functional.cross_entropy(self(x), y))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1, momentum=0.9)

    def train_dataloader(self):
        return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(*self.batches), batch_size=8)

    def val_dataloader(self):
        return self.train_dataloader() if self.validate else []


def _fit(callback, root, epochs: int, ckpt_path=None, save=False, validate=False):
    """A Trainer run; with `save`, a checkpoint after every epoch under root/ckpt as epoch=N.ckpt."""
    model = TinyModule(validate)
    extra = []
    if save:
        extra = [L.callbacks.ModelCheckpoint(dirpath=root / "ckpt", filename="{epoch}", save_top_k=-1)]
    trainer = L.Trainer(
        accelerator="cpu",
        devices=1,
        max_epochs=epochs,
        callbacks=[callback, *extra],
        enable_progress_bar=False,
        enable_model_summary=False,
        logger=False,
        enable_checkpointing=save,
        num_sanity_val_steps=0,
        limit_val_batches=2 if validate else 0,
        default_root_dir=root,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Lightning's advice on workers and on its SWA resuming
        trainer.fit(model, ckpt_path=ckpt_path)
    return model, trainer


def _assert_close_states(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert list(sa) == list(sb)
    for name in sa:
        torch.testing.assert_close(sa[name], sb[name], **CLOSE, msg=name)


def _swa(cls):
    return cls(swa_lrs=0.05, swa_epoch_start=2, annealing_epochs=1)


def test_swa_callback_matches_lightning_and_resumes_both_ways(tmp_path):
    lightning_callback = _swa(lightning_callbacks.StochasticWeightAveraging)
    lightning_model, _ = _fit(lightning_callback, tmp_path / "l", 4, save=True)
    our_callback = _swa(ours.StochasticWeightAveraging)
    our_model, _ = _fit(our_callback, tmp_path / "o", 4, save=True)
    assert isinstance(our_callback, lightning_callbacks.StochasticWeightAveraging)
    assert isinstance(our_callback._swa_scheduler, SWALR)
    assert int(our_callback.n_averaged) == 3  # epochs 1, 2, 3 (0-based), then the BatchNorm epoch
    _assert_close_states(our_model, lightning_model)
    _assert_close_states(our_callback._average_model, lightning_callback._average_model)
    # mid-SWA checkpoints (after epoch 1: one update made), each resumed by the other's callback
    assert our_callback.state_key == lightning_callback.state_key  # where the callback state is saved
    from_lightning, from_ours = tmp_path / "l/ckpt/epoch=1.ckpt", tmp_path / "o/ckpt/epoch=1.ckpt"
    resumed_ours, _ = _fit(_swa(ours.StochasticWeightAveraging), tmp_path / "ro", 4, from_lightning)
    resumed_lightning, _ = _fit(
        _swa(lightning_callbacks.StochasticWeightAveraging), tmp_path / "rl", 4, from_ours
    )
    _assert_close_states(resumed_ours, lightning_model)
    _assert_close_states(resumed_lightning, our_model)


def _ema(cls):
    return cls(decay=0.8, update_starting_at_step=2)


def test_ema_callback_matches_lightning_and_resumes_both_ways(tmp_path):
    lightning_callback = _ema(lightning_callbacks.EMAWeightAveraging)
    lightning_model, _ = _fit(lightning_callback, tmp_path / "l", 3, save=True, validate=True)
    our_callback = _ema(ours.EMAWeightAveraging)
    our_model, _ = _fit(our_callback, tmp_path / "o", 3, save=True, validate=True)
    assert isinstance(our_callback, lightning_callbacks.EMAWeightAveraging)
    assert our_callback.state_key == lightning_callback.state_key
    assert int(our_callback._average_model.n_averaged) == 10  # steps 2..11 of 12
    _assert_close_states(our_model, lightning_model)
    checkpoint = torch.load(tmp_path / "o/ckpt/epoch=0.ckpt", weights_only=False)
    assert {"state_dict", "current_model_state", "averaging_state"} <= set(checkpoint)
    from_lightning, from_ours = tmp_path / "l/ckpt/epoch=0.ckpt", tmp_path / "o/ckpt/epoch=0.ckpt"
    resumed_ours, _ = _fit(_ema(ours.EMAWeightAveraging), tmp_path / "ro", 3, from_lightning, validate=True)
    resumed_lightning, _ = _fit(
        _ema(lightning_callbacks.EMAWeightAveraging), tmp_path / "rl", 3, from_ours, validate=True
    )
    _assert_close_states(resumed_ours, lightning_model)
    _assert_close_states(resumed_lightning, our_model)


def test_weight_averaging_callback_matches_lightning(tmp_path):
    lightning_model, _ = _fit(lightning_callbacks.WeightAveraging(), tmp_path / "l", 2, validate=True)
    our_callback = ours.WeightAveraging()
    our_model, _ = _fit(our_callback, tmp_path / "o", 2, validate=True)
    assert type(our_callback._average_model).__module__ == "swa_fast.swa_utils"
    _assert_close_states(our_model, lightning_model)


def _halfway(averaged, current, _n_averaged):
    return averaged + 0.5 * (current - averaged)


@pytest.mark.parametrize(
    "avg_fn, exact",
    [
        (lightning_callbacks.StochasticWeightAveraging.avg_fn, False),
        (get_ema_avg_fn(0.7), False),
        (_halfway, True),
    ],
    ids=["lightnings_avg_fn", "swa_fast_ema_avg_fn", "users_own"],
)
def test_swa_update_parameters_like_lightnings(avg_fn, exact):
    """The static helper against Lightning's: Lightning's avg_fn and swa_fast's functions run fused
    (equal to fp32 rounding), a user's own runs per parameter as in Lightning (equal bits)."""
    model = cnn_with_bn(IMAGE[-1])
    theirs, mine = copy.deepcopy(model), copy.deepcopy(model)
    n_theirs, n_mine = torch.tensor(0), torch.tensor(0)
    for step in range(4):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(step)))
        lightning_callbacks.StochasticWeightAveraging.update_parameters(theirs, model, n_theirs, avg_fn)
        ours.StochasticWeightAveraging.update_parameters(mine, model, n_mine, avg_fn)
        assert int(n_mine) == int(n_theirs) == step + 1
        if step == 0 or exact:  # the first update copies
            assert all(torch.equal(a, b) for a, b in zip(mine.parameters(), theirs.parameters()))
        _assert_close_states(mine, theirs)


def test_fp32_average_of_bf16_model_survives_validation_swaps():
    """dtype=float32 through the callback's kwargs: the swap for validation puts the (rounded)
    average into the bf16 model and restores the model exactly, leaving the fp32 average as it was."""
    module = TinyModule().to(torch.bfloat16)
    callback = ours.EMAWeightAveraging(decay=0.5, dtype=torch.float32)
    callback.setup(None, module, "fit")
    for step in range(3):
        with torch.no_grad():
            for p in module.parameters():
                p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(step)).to(p.dtype))
        callback._average_model.update_parameters(module)
    average = copy.deepcopy(callback._average_model.state_dict())
    before = copy.deepcopy(module.state_dict())
    callback._swap_models(module)
    for name, value in module.state_dict().items():
        assert torch.equal(value, average["module." + name].to(value.dtype)), name
    callback._swap_models(module)
    for name, value in module.state_dict().items():
        assert torch.equal(value, before[name]), name
    for name, value in callback._average_model.state_dict().items():
        assert value.dtype == average[name].dtype and torch.equal(value, average[name]), name
    assert callback._average_model.module.net[0].weight.dtype == torch.float32


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_cuda_updates_without_host_syncs():
    """Lightning's SWA update compares n_averaged == 0 on the host for each parameter; ours, and
    the AveragedModel update of EMAWeightAveraging, run without a host synchronisation."""
    module = TinyModule().cuda()
    average, n_averaged = copy.deepcopy(module), torch.tensor(0, device="cuda")
    swa = ours.StochasticWeightAveraging
    callback = ours.EMAWeightAveraging(decay=0.9)
    callback.setup(None, module, "fit")
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(3):
            swa.update_parameters(average, module, n_averaged, swa.avg_fn)
            callback._average_model.update_parameters(module)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert int(n_averaged) == 3 and int(callback._average_model.n_averaged) == 3
