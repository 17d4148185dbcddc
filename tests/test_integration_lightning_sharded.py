"""swa_fast.integrations.lightning under Lightning's sharded strategies, in real Trainer runs on two
CPU processes joined by gloo (tests/two_ranks.py): each rank averages its own FSDP2 shards.

What is checked against what:
- the average, gathered, against a float64 replay on one process of the same updates over the
  full weights recorded (gathered) after every training step;
- validation runs on the average, and the live weights come back bit for bit after it;
- a run resumed from a mid-training checkpoint ends bit for bit as the uninterrupted run.

DeepSpeedStrategy and FSDPStrategy refuse the CPU (Lightning: "The DeepSpeed strategy is only
supported on CUDA GPUs", "The strategy `fsdp` requires a GPU accelerator"): their tests need GPUs.
"""

from __future__ import annotations

import os
import warnings

import pytest
import torch
from conftest import mlp
from torch.distributed.tensor import DTensor
from two_ranks import WORLD

L = pytest.importorskip("lightning.pytorch")
from lightning.pytorch.strategies import ModelParallelStrategy  # noqa: E402
from torch.distributed.fsdp import FSDPModule, fully_shard  # noqa: E402

from swa_fast.distributed import full_state_dict, reshard  # noqa: E402
from swa_fast.integrations import lightning as ours  # noqa: E402

WIDTHS = (6, 8, 3, 1)  # Linear(3, 1) has one row: rank 1 holds empty shards of it
ROWS, BATCH = 32, 4  # per rank: 16 rows, 4 steps an epoch
CLOSE = dict(rtol=1e-5, atol=1e-6)  # fp32 rounding over a few updates


class ShardedModule(L.LightningModule):
    """An MLP that `configure_model` shards with FSDP2 over the strategy's data-parallel mesh."""

    def __init__(self) -> None:
        super().__init__()
        self.net = mlp(*WIDTHS, activation=torch.nn.Tanh)
        g = torch.Generator().manual_seed(5)
        self.data = torch.randn(ROWS, WIDTHS[0], generator=g), torch.randn(ROWS, 1, generator=g)
        self.seen_in_validation: list[tuple[torch.Tensor, torch.Tensor]] = []

    def configure_model(self) -> None:
        if isinstance(self.net, FSDPModule):
            return
        mesh = self.device_mesh["data_parallel"]
        for layer in (self.net[0], self.net[2], self.net):
            fully_shard(layer, mesh=mesh)

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, _index):
        x, y = batch
        return torch.nn.functional.mse_loss(self(x), y)

    def validation_step(self, batch, _index):
        x, _ = batch
        self.seen_in_validation.append((x, self(x).detach()))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1, momentum=0.9)

    def train_dataloader(self):
        return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(*self.data), batch_size=BATCH)

    def val_dataloader(self):
        return self.train_dataloader()


def full_weights(module) -> dict:
    """The model's full weights, gathered on every rank (a collective)."""
    reshard(module)  # after a forward without backward the FSDP2 root holds gathered tensors
    return {
        n: (p.full_tensor() if isinstance(p, DTensor) else p).detach().clone()
        for n, p in module.named_parameters()
    }


def full_average(callback) -> dict:
    """The callback's average, gathered, on every rank (names as the model's)."""
    state = full_state_dict(callback._average_model.manager.state_dict(), rank0_only=False)
    return state["average"]


class Recorder(L.Callback):
    """The full weights after every training step and around validation, gathered outside the
    averaging callback's own hooks (it runs after the averaging callback in the list)."""

    def __init__(self, averaging) -> None:
        self.averaging = averaging
        self.steps: list[dict] = []  # (step_idx, weights) after every optimizer step
        self.validations: list[dict] = []

    def on_train_batch_end(self, trainer, pl_module, *_args) -> None:
        self.steps.append({"step": trainer.global_step - 1, "weights": full_weights(pl_module)})

    def on_validation_epoch_start(self, trainer, pl_module) -> None:
        self.validations.append({"applied": full_weights(pl_module), "average": full_average(self.averaging)})

    def on_validation_epoch_end(self, trainer, pl_module) -> None:
        self.validations[-1]["after"] = full_weights(pl_module)


def lightning_env(rank: int) -> None:
    """What Lightning reads to join processes started outside it (the harness's, whose gloo group
    is already initialised, which Lightning then uses)."""
    os.environ.update(
        LOCAL_RANK=str(rank), NODE_RANK="0", WORLD_SIZE=str(WORLD), MASTER_ADDR="127.0.0.1", MASTER_PORT="1"
    )


def fit(rank, callback, root, epochs, ckpt_path=None, save=False, validate=False, sharded_checkpoint=True):
    lightning_env(rank)
    model, recorder = ShardedModule(), Recorder(callback)
    extra = (
        [L.callbacks.ModelCheckpoint(dirpath=f"{root}/ckpt", filename="{epoch}", save_top_k=-1)]
        if save
        else []
    )
    trainer = L.Trainer(
        accelerator="cpu",
        devices=WORLD,
        strategy=ModelParallelStrategy(
            data_parallel_size=WORLD, tensor_parallel_size=1, save_distributed_checkpoint=sharded_checkpoint
        ),
        max_epochs=epochs,
        callbacks=[callback, recorder, *extra],
        enable_progress_bar=False,
        enable_model_summary=False,
        logger=False,
        enable_checkpointing=save,
        num_sanity_val_steps=0,
        limit_val_batches=1 if validate else 0,
        default_root_dir=root,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Lightning's advice on workers
        trainer.fit(model, ckpt_path=ckpt_path)
    return model, recorder


def replay(steps: list[dict], should_update, rule) -> dict:
    """The average, in float64 on this process, of the recorded full weights at the steps the
    callback's schedule updates at: the first update copies, then SWA's 1/(n+1) or EMA's 1 - decay."""
    average, n = None, 0
    for step in steps:
        if not should_update(step_idx=step["step"]):
            continue
        weights = {k: v.double() for k, v in step["weights"].items()}
        weight = 1.0 if n == 0 else (1.0 / (n + 1) if rule[0] == "swa" else 1.0 - rule[1])
        average = (
            weights if average is None else {k: a + weight * (weights[k] - a) for k, a in average.items()}
        )
        n += 1
    return average


def assert_close(got: dict, expected: dict) -> None:
    assert list(got) == list(expected)
    for name in expected:
        torch.testing.assert_close(got[name].double(), expected[name], **CLOSE, msg=name)


def assert_equal(got: dict, expected: dict) -> None:
    assert list(got) == list(expected)
    for name in expected:
        assert torch.equal(got[name], expected[name]), name


# --- ModelParallelStrategy (FSDP2) ------------------------------------------------------------------


def _ema_average_and_validation(rank, tmp):
    callback = ours.EMAWeightAveraging(decay=0.8, update_starting_at_step=2)
    model, recorder = fit(rank, callback, tmp, epochs=2, validate=True)
    manager = callback._average_model.manager
    assert all(isinstance(t, DTensor) for t in manager.state_dict()["average"].values())  # shard-local
    assert int(callback._average_model.n_averaged) == 6  # steps 2..7 of 8
    expected = replay(recorder.steps, callback.should_update, ("ema", 0.8))
    average = full_average(callback)
    assert_close(average, expected)
    # the model holds the average after training, as with Lightning's callback
    assert_equal(full_weights(model), average)

    # validation (after each epoch) ran on the average; the live weights came back bit for bit
    assert len(recorder.validations) == 2
    for epoch, seen in enumerate(recorder.validations):
        assert_equal(seen["applied"], seen["average"])
        assert_equal(seen["after"], recorder.steps[4 * epoch + 3]["weights"])
    # ... and its forward passes computed with the average, this rank's rows
    x, out = model.seen_in_validation[-1]
    single = mlp(*WIDTHS, activation=torch.nn.Tanh)
    single.load_state_dict(
        {k.removeprefix("net."): v for k, v in recorder.validations[-1]["average"].items()}
    )
    torch.testing.assert_close(out, single(x).detach(), **CLOSE)


def test_ema_under_model_parallel_averages_shards_and_validates_on_the_average(on_two_ranks):
    on_two_ranks(_ema_average_and_validation)


def _swa_average(rank, tmp):
    callback = ours.WeightAveraging()  # the equal-weight average, every step
    _, recorder = fit(rank, callback, tmp, epochs=1)
    assert int(callback._average_model.n_averaged) == 4
    assert_close(full_average(callback), replay(recorder.steps, callback.should_update, ("swa", None)))


def test_weight_averaging_under_model_parallel_is_the_equal_weight_average(on_two_ranks):
    on_two_ranks(_swa_average)


def resume_exactly(rank, tmp, sharded_checkpoint):
    def ema():
        return ours.EMAWeightAveraging(decay=0.7, update_starting_at_step=1)

    def run(root, **kwargs):
        return fit(
            rank, ema_callback, root, 3, validate=True, sharded_checkpoint=sharded_checkpoint, **kwargs
        )

    whole = ema_callback = ema()
    whole_model, whole_recorder = run(f"{tmp}/whole", save=True)
    checkpoint = f"{tmp}/whole/ckpt/epoch=0.ckpt"
    # a torch.distributed.checkpoint directory written by both ranks, or one file with the average
    # gathered on rank 0
    assert os.path.isdir(checkpoint) if sharded_checkpoint else os.path.isfile(checkpoint)
    resumed = ema_callback = ema()
    resumed_model, resumed_recorder = run(f"{tmp}/resumed", ckpt_path=checkpoint)
    assert resumed_recorder.steps[0]["step"] == 4  # it went on from the checkpoint
    assert_equal(resumed_recorder.steps[-1]["weights"], whole_recorder.steps[-1]["weights"])
    assert_equal(full_average(resumed), full_average(whole))
    assert_equal(full_weights(resumed_model), full_weights(whole_model))
    theirs, mine = whole._average_model.manager, resumed._average_model.manager
    assert (mine.calls, int(mine.n_averaged)) == (theirs.calls, int(theirs.n_averaged)) == (11, 11)


def _resume_from_sharded_checkpoint(rank, tmp):
    resume_exactly(rank, tmp, sharded_checkpoint=True)


def _resume_from_full_checkpoint(rank, tmp):
    resume_exactly(rank, tmp, sharded_checkpoint=False)


def test_model_parallel_sharded_checkpoint_resumes_bit_exactly(on_two_ranks):
    on_two_ranks(_resume_from_sharded_checkpoint)


def test_model_parallel_full_checkpoint_resumes_bit_exactly(on_two_ranks):
    on_two_ranks(_resume_from_full_checkpoint)


def _swa_callback_and_resume(rank, tmp):
    def swa():
        return ours.StochasticWeightAveraging(swa_lrs=0.05, swa_epoch_start=2, annealing_epochs=1)

    whole = swa()
    whole_model, recorder = fit(rank, whole, f"{tmp}/whole", epochs=4, save=True)
    assert isinstance(whole._average_model, ours.ShardLocalAverage)
    assert int(whole.n_averaged) == 3  # at the starts of epochs 1, 2, 3 (0-based): after epochs 0, 1, 2
    expected = replay(recorder.steps, lambda step_idx: step_idx in (3, 7, 11), ("swa", None))
    average = full_average(whole)
    assert_close(average, expected)
    assert_equal(full_weights(whole_model), average)  # the average in the model at the end
    # resumed from after epoch 1 (one update made, SWALR running): the same run, bit for bit
    resumed = swa()
    resumed_model, resumed_recorder = fit(
        rank, resumed, f"{tmp}/resumed", epochs=4, ckpt_path=f"{tmp}/whole/ckpt/epoch=1.ckpt"
    )
    assert resumed_recorder.steps[0]["step"] == 8
    assert_equal(resumed_recorder.steps[-1]["weights"], recorder.steps[-1]["weights"])
    assert_equal(full_weights(resumed_model), full_weights(whole_model))
    assert int(resumed.n_averaged) == 3


def test_stochastic_weight_averaging_under_model_parallel_and_resume(on_two_ranks):
    on_two_ranks(_swa_callback_and_resume)


# --- DeepSpeedStrategy (ZeRO-3) and FSDPStrategy: CUDA only ----------------------------------------
#
# Lightning refuses both on the CPU (DeepSpeedStrategy.setup_environment raises unless the
# accelerator is CUDA's; the accelerator connector refuses FSDP without a GPU). On one GPU these
# runs shard over one rank, which still takes the paths of the strategy: ZeRO-3's partitioned
# parameters, FSDP's flat-parameter views, and each strategy's own checkpoint.

gpu_only = pytest.mark.skipif(
    not torch.cuda.is_available(),
    reason="Lightning's DeepSpeedStrategy and FSDPStrategy run on CUDA GPUs only",
)


class PlainModule(ShardedModule):
    """The same module, left for the strategy to shard."""

    configure_model = L.LightningModule.configure_model


class WholeRecorder(L.Callback):
    """The whole weights after every step and around validation, gathered the strategy's way."""

    def __init__(self) -> None:
        self.steps, self.validations = [], []

    def on_train_batch_end(self, trainer, pl_module, *_args) -> None:
        self.steps.append({"step": trainer.global_step - 1, "weights": whole_weights(trainer, pl_module)})

    def on_validation_epoch_start(self, trainer, pl_module) -> None:
        self.validations.append({"applied": whole_weights(trainer, pl_module)})

    def on_validation_epoch_end(self, trainer, pl_module) -> None:
        self.validations[-1]["after"] = whole_weights(trainer, pl_module)


def whole_weights(trainer, pl_module) -> dict:
    from lightning.pytorch.strategies import DeepSpeedStrategy

    if isinstance(trainer.strategy, DeepSpeedStrategy):
        import deepspeed

        with deepspeed.zero.GatheredParameters(list(pl_module.parameters())):
            return {n: p.detach().cpu().clone() for n, p in pl_module.named_parameters()}
    from torch.distributed.fsdp import FullyShardedDataParallel

    with FullyShardedDataParallel.summon_full_params(trainer.model, writeback=False):
        return {
            n.replace("_fsdp_wrapped_module.", ""): p.detach().cpu().clone()
            for n, p in pl_module.named_parameters()
        }


def fit_on_gpu(strategy, callback, root, ckpt_path=None):
    model, recorder = PlainModule(), WholeRecorder()
    trainer = L.Trainer(
        accelerator="gpu",
        devices=1,
        strategy=strategy,
        max_epochs=2,
        callbacks=[
            callback,
            recorder,
            L.callbacks.ModelCheckpoint(dirpath=f"{root}/ckpt", filename="{epoch}", save_top_k=-1),
        ],
        enable_progress_bar=False,
        enable_model_summary=False,
        logger=False,
        num_sanity_val_steps=0,
        limit_val_batches=1,
        default_root_dir=root,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(model, ckpt_path=ckpt_path)
    return recorder


def gpu_strategies():
    from lightning.pytorch.strategies import DeepSpeedStrategy, FSDPStrategy

    return {
        "deepspeed_stage_3": lambda: DeepSpeedStrategy(stage=3),
        "fsdp": lambda: FSDPStrategy(auto_wrap_policy={torch.nn.Linear}),
    }


@gpu_only
@pytest.mark.parametrize("name", ["deepspeed_stage_3", "fsdp"])
def test_ema_under_gpu_sharded_strategies_averages_validates_and_resumes(name, tmp_path):
    if name.startswith("deepspeed"):
        pytest.importorskip("deepspeed")
    make = gpu_strategies()[name]

    def ema():
        return ours.EMAWeightAveraging(decay=0.8, update_starting_at_step=2)

    callback = ema()
    recorder = fit_on_gpu(make(), callback, tmp_path / "whole")
    assert isinstance(callback._average_model, ours.ShardLocalAverage)
    steps = ROWS // BATCH  # an epoch on one rank
    assert int(callback._average_model.n_averaged) == 2 * steps - 2  # every step from step 2
    expected = replay(recorder.steps, callback.should_update, ("ema", 0.8))
    for seen, live in zip(recorder.validations, (recorder.steps[steps - 1], recorder.steps[-1])):
        assert_equal(seen["after"], live["weights"])  # the live weights back, bit for bit
        assert any(not torch.equal(seen["applied"][n], t) for n, t in live["weights"].items())
    assert_close(recorder.validations[-1]["applied"], expected)  # validation ran on the average

    resumed_recorder = fit_on_gpu(
        make(), ema(), tmp_path / "resumed", ckpt_path=tmp_path / "whole/ckpt/epoch=0.ckpt"
    )
    assert resumed_recorder.steps[0]["step"] == steps
    assert_equal(resumed_recorder.steps[-1]["weights"], recorder.steps[-1]["weights"])
    assert_equal(resumed_recorder.validations[-1]["applied"], recorder.validations[-1]["applied"])


def _deepspeed_checkpoint_round_trip(rank, tmp):
    """The callback's DeepSpeed path without Lightning's Trainer (which refuses the CPU): the
    shard-local average of a real ZeRO-3 engine on two gloo ranks, saved in the client state of
    `engine.save_checkpoint(path, client_state=..., tag="checkpoint")` and read back from
    `engine.load_checkpoint`, the calls DeepSpeedStrategy makes. Every rank writes and reads its
    own file, so each keeps its part, and the resumed average goes on bit for bit."""
    from lightning.pytorch.strategies import DeepSpeedStrategy
    from test_integration_deepspeed import _engine, _step

    from swa_fast.integrations import deepspeed as on_engine

    def averaged_run(load_from=None):
        engine = _engine(3)
        average = ours.ShardLocalAverage(on_engine.EMA(engine, decay=0.75), engine, "unused.")
        if load_from is not None:
            _, client_state = engine.load_checkpoint(
                load_from, tag="checkpoint", load_lr_scheduler_states=False
            )
            average.load(client_state[ours.CHECKPOINT_KEY]["EMAWeightAveraging"], None)
        return engine, average

    engine, average = averaged_run()
    for step in range(2):
        _step(engine, step)
        average.update_parameters(None)
    saved = average.save(DeepSpeedStrategy(stage=3), {})
    assert saved["saved"] == "local" and saved["calls"] == 2
    client_state = {ours.CHECKPOINT_KEY: {"EMAWeightAveraging": saved}}
    engine.save_checkpoint(f"{tmp}/ckpt", client_state=client_state, tag="checkpoint")
    assert os.path.isfile(f"{tmp}/ckpt/checkpoint/zero_pp_rank_{rank}_mp_rank_00_model_states.pt")  # its own
    live = {n: p.ds_tensor.clone() for n, p in engine.module.named_parameters()}
    average.swap()  # validation: the average in, then the live partitions back exactly
    average.swap()
    assert all(torch.equal(p.ds_tensor, live[n]) for n, p in engine.module.named_parameters())
    resumed_engine, resumed = averaged_run(load_from=f"{tmp}/ckpt")
    for step in range(2, 4):
        for e, a in ((engine, average), (resumed_engine, resumed)):
            _step(e, step)
            a.update_parameters(None)
    assert_equal(resumed.manager.export(), average.manager.export())  # rank 0 gets it, others {}


def test_deepspeed_zero3_average_survives_the_engines_checkpoint(on_two_ranks):
    pytest.importorskip("deepspeed")
    on_two_ranks(_deepspeed_checkpoint_round_trip)


def test_what_sharded_strategies_cannot_run_is_refused_by_name():
    """A function of one's own cannot run through a shard-local manager: refused, saying what to pass."""
    from torch.optim.swa_utils import get_ema_avg_fn as torchs_ema_avg_fn

    strategy = ModelParallelStrategy()
    with pytest.raises(ValueError, match="ModelParallelStrategy.*get_ema_avg_fn"):
        ours.averaging_rule({"avg_fn": torchs_ema_avg_fn(0.9)}, "WeightAveraging", strategy)
    with pytest.raises(ValueError, match=r"takes none of \['source'\]"):
        ours.averaging_rule({"source": "master"}, "WeightAveraging", strategy)  # DeepSpeed's only
    assert ours.averaging_rule({}, "WeightAveraging", strategy) == ("swa", None)
    assert ours.averaging_rule(ours.EMAWeightAveraging(decay=0.8)._kwargs, "EMA", strategy) == ("ema", 0.8)
    swa = ours.StochasticWeightAveraging(swa_lrs=0.1, avg_fn=lambda a, p, n: p)
    with pytest.raises(ValueError, match="StochasticWeightAveraging: under ModelParallelStrategy"):
        swa._sharded_rule(L.Trainer(strategy=strategy, accelerator="cpu", devices=1, logger=False))
