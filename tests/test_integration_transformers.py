"""swa_fast.integrations.transformers: the averaging callbacks in real `transformers.Trainer` and
TRL `SFTTrainer` runs on the CPU, with a tiny GPT-2 built from a local config (no downloads).

What is checked: the average against one worked out here from the weights each optimizer step left
(gradient accumulation included), runs resumed from a checkpoint against runs that were not (bit
for bit), evaluations with the average (which leave the training bit for bit as without them),
`save_pretrained` of the average, the set-ups refused, and two DDP ranks over gloo.
"""

from __future__ import annotations

import functools
import os
import shutil

import pytest
import torch

transformers = pytest.importorskip("transformers")
from hf_tiny import arguments, text_data, tiny_gpt2, tiny_tokenizer, token_data  # noqa: E402
from transformers import (  # noqa: E402
    GPT2LMHeadModel,
    Trainer,
    TrainerCallback,
    TrainerControl,
    TrainerState,
)

import swa_fast  # noqa: E402
from swa_fast.integrations.transformers import (  # noqa: E402
    EMACallback,
    PostHocEMACallback,
    SWACallback,
)

CLOSE = dict(rtol=1e-5, atol=1e-6)  # fp32 against a float64 reference, over a few updates


def train(out, callbacks, resume=None, eval_dataset=None, **changes) -> Trainer:
    trainer = Trainer(
        model=tiny_gpt2(),
        args=arguments(out, **changes),
        train_dataset=token_data(),
        eval_dataset=eval_dataset,
        callbacks=callbacks,
    )
    trainer.train(resume_from_checkpoint=resume)
    return trainer


class WeightsSeen(TrainerCallback):
    """The model's parameters after each optimizer step, in float64 (read at on_optimizer_step,
    before any callback's on_step_end)."""

    def __init__(self) -> None:
        self.steps: list[dict[str, torch.Tensor]] = []

    def on_optimizer_step(self, args, state, control, model=None, **kwargs):
        self.steps.append({n: p.detach().double().clone() for n, p in model.named_parameters()})


def average_of(callback) -> dict[str, torch.Tensor]:
    return dict(callback.manager.state_dict()["average"])


def assert_equal_dicts(got: dict, expected: dict) -> None:
    assert got.keys() == expected.keys()
    for name in expected:
        assert torch.equal(got[name], expected[name]), name


def reference_ema(steps: list[dict], decay: float) -> dict[str, torch.Tensor]:
    average = dict(steps[0])  # swa_fast.EMA's first update copies the model
    for weights in steps[1:]:
        average = {n: a + (1 - decay) * (weights[n] - a) for n, a in average.items()}
    return average


# --- the average -------------------------------------------------------------------------------------


def test_ema_callback_follows_each_optimizer_step_with_gradient_accumulation(tmp_path):
    seen, ema = WeightsSeen(), EMACallback(decay=0.8)
    train(tmp_path, [seen, ema], max_steps=5, gradient_accumulation_steps=2, per_device_train_batch_size=2)
    assert len(seen.steps) == 5 and ema.manager.calls == 5, (len(seen.steps), ema.manager.calls)
    expected = reference_ema(seen.steps, 0.8)
    got = average_of(ema)
    assert got.keys() == expected.keys()
    for name, value in expected.items():
        torch.testing.assert_close(got[name].double(), value, **CLOSE, msg=name)


def test_ema_callback_takes_a_half_life_for_its_ema(tmp_path):
    ema = EMACallback(half_life_fraction=0.5)
    train(tmp_path, [ema], max_steps=3)
    assert ema.manager.decay is None and ema.manager.half_life_fraction == 0.5
    assert ema.manager.decay_at(3) == 2.0 ** (-1 / (0.5 * 2))  # the 2nd averaging update after the copy
    with pytest.raises(ValueError, match="expected no decay= beside it"):
        train(tmp_path, [EMACallback(0.9, half_life=10)], max_steps=1)


def test_swa_callback_averages_the_steps_from_start_step_every_k(tmp_path):
    seen, swa = WeightsSeen(), SWACallback(start_step=2, every=2)
    train(tmp_path, [seen, swa], max_steps=7)
    chosen = [seen.steps[s - 1] for s in (2, 4, 6)]  # global steps 2, 4 and 6
    assert swa.manager.n_averaged == 3, swa.manager.n_averaged
    got = average_of(swa)
    for name in chosen[0]:
        expected = sum(w[name] for w in chosen) / 3
        torch.testing.assert_close(got[name].double(), expected, **CLOSE, msg=name)


# --- checkpoints -------------------------------------------------------------------------------------


def every_kind() -> list:
    return [
        EMACallback(decay=0.9, warmup_gamma=1.0),
        SWACallback(start_step=2, every=2),
        PostHocEMACallback(snapshot_every=2),
    ]


def test_a_resumed_run_continues_every_average_bit_for_bit(tmp_path):
    """A run of 6 steps saving at step 3, and a new Trainer resumed from that checkpoint (copied
    into a fresh output_dir, with the post-hoc EMA's snapshots up to it, and found by
    resume_from_checkpoint=True) to step 6."""
    a, b = tmp_path / "a", tmp_path / "b"
    saving = dict(max_steps=6, save_strategy="steps", save_steps=3)
    straight = every_kind()
    first = train(a, straight, **saving)
    for callback in straight:
        assert os.path.isfile(a / "checkpoint-3" / f"swa_fast_{callback.name}.pt"), callback.name
    shutil.copytree(a / "checkpoint-3", b / "checkpoint-3")
    (b / "posthoc_ema_snapshots").mkdir()  # they live beside the checkpoints: those up to it go with it
    for step, path in swa_fast.posthoc.list_snapshots(a / "posthoc_ema_snapshots").items():
        if step <= 3:
            shutil.copy(path, b / "posthoc_ema_snapshots" / path.name)
    resumed = every_kind()
    second = train(b, resumed, resume=True, **saving)
    for p, q in zip(first.model.parameters(), second.model.parameters()):
        assert torch.equal(p, q)  # the training itself resumed exactly
    for ours, theirs in zip(resumed, straight):
        state, expected = ours.manager.state_dict(), theirs.manager.state_dict()
        assert_equal_dicts(dict(state["average"]), dict(expected["average"]))
        assert (state["calls"], state["n_averaged"]) == (expected["calls"], expected["n_averaged"]), ours.name
    posthoc, expected = resumed[2].manager, straight[2].manager
    for mine, theirs in zip(posthoc.state_dict()["averages"], expected.state_dict()["averages"]):
        assert_equal_dicts(dict(mine), dict(theirs))
    assert posthoc.progress == expected.progress
    # Both runs' snapshots (default directory under output_dir), the final one included, synthesize alike.
    model_a, model_b = tiny_gpt2(), tiny_gpt2()
    swa_fast.posthoc.synthesize(a / "posthoc_ema_snapshots", model_a, sigma_rel=0.07)
    swa_fast.posthoc.synthesize(b / "posthoc_ema_snapshots", model_b, sigma_rel=0.07)
    for p, q in zip(model_a.parameters(), model_b.parameters()):
        assert torch.equal(p, q)


def test_a_resumed_run_finds_a_checkpoint_named_in_the_arguments(tmp_path):
    straight = EMACallback(decay=0.9)
    train(tmp_path / "a", [straight], max_steps=4, save_strategy="steps", save_steps=2)
    checkpoint = str(tmp_path / "a" / "checkpoint-2")
    resumed = EMACallback(decay=0.9)  # another output_dir: found through args.resume_from_checkpoint
    train(tmp_path / "b", [resumed], resume=checkpoint, max_steps=4, resume_from_checkpoint=checkpoint)
    assert_equal_dicts(average_of(resumed), average_of(straight))


def test_a_resumed_run_without_the_average_is_refused_unless_resume_false(tmp_path):
    train(tmp_path, [], max_steps=2, save_strategy="steps", save_steps=2)  # a checkpoint without one
    with pytest.raises(
        ValueError, match=r"resuming at step 2, expected the average saved as 'swa_fast_ema.pt'"
    ):
        train(tmp_path, [EMACallback()], resume=True, max_steps=4)
    fresh = EMACallback(resume=False)
    train(tmp_path, [fresh], resume=True, max_steps=4)
    assert fresh.manager.calls == 2  # steps 3 and 4: a new average


# --- evaluation, the averaged model -------------------------------------------------------------------


class AtEvaluation(TrainerCallback):
    """Put after the averaging callback: records the live weights after each optimizer step, checks
    the model holds the average at the evaluation's first batch and the live weights, bit for bit,
    once it ended."""

    def __init__(self, averaging) -> None:
        self.averaging, self.live, self.checked, self.evaluations = averaging, None, False, 0

    def on_optimizer_step(self, args, state, control, model=None, **kwargs):
        self.live = {n: p.detach().clone() for n, p in model.named_parameters()}

    def on_prediction_step(self, args, state, control, model=None, **kwargs):
        if not self.checked:
            assert_equal_dicts(dict(model.named_parameters()), average_of(self.averaging))
            self.checked = True

    def on_evaluate(self, args, state, control, model=None, **kwargs):
        assert self.checked, "no prediction step ran"
        assert_equal_dicts({n: p.detach() for n, p in model.named_parameters()}, self.live)
        self.checked, self.evaluations = False, self.evaluations + 1


def test_evaluation_with_the_average_restores_the_live_weights_exactly(tmp_path):
    evaluated = dict(eval_dataset=token_data(8, seed=2), eval_strategy="steps", eval_steps=2)
    plain = train(tmp_path / "plain", [EMACallback(decay=0.5)], max_steps=4, **evaluated)
    ema = EMACallback(decay=0.5, eval_with_average=True)
    probe = AtEvaluation(ema)
    with_average = train(tmp_path / "avg", [ema, probe], max_steps=4, **evaluated)
    assert probe.evaluations == 2, probe.evaluations
    for p, q in zip(plain.model.parameters(), with_average.model.parameters()):
        assert torch.equal(p, q)  # evaluating with the average left the training as it was
    losses = [
        [log["eval_loss"] for log in t.state.log_history if "eval_loss" in log] for t in (plain, with_average)
    ]
    assert losses[0] != losses[1], losses  # ... and the evaluations saw other weights

    # After training: the average for a block, the live weights back after.
    with_average.remove_callback(probe)
    live = {n: p.detach().clone() for n, p in with_average.model.named_parameters()}
    with ema.average_applied():
        metrics = with_average.evaluate()
    assert_equal_dicts({n: p.detach() for n, p in with_average.model.named_parameters()}, live)
    assert metrics["eval_loss"] == losses[1][-1]  # the average at the last step, as evaluated then
    assert with_average.evaluate()["eval_loss"] == losses[0][-1]  # the live weights, as the plain run's


def test_a_dict_of_eval_datasets_is_refused_with_the_live_weights_restored(tmp_path):
    ema = EMACallback(decay=0.5, eval_with_average=True)
    evaluated = dict(eval_strategy="steps", eval_steps=2)
    data = {"one": token_data(4, seed=2), "two": token_data(4, seed=3)}
    trainer = Trainer(
        model=tiny_gpt2(),
        args=arguments(tmp_path, max_steps=2, **evaluated),
        train_dataset=token_data(),
        eval_dataset=data,
        callbacks=[ema, seen := WeightsSeen()],
    )
    with pytest.raises(
        ValueError,
        match="eval_with_average=True expects one eval dataset, got an evaluation prefixed 'eval_one'",
    ):
        trainer.train()
    last = seen.steps[-1]
    for name, p in trainer.model.named_parameters():
        assert torch.equal(p.double(), last[name]), name


def test_the_averaged_model_is_saved_with_save_pretrained_and_loaded_at_the_end(tmp_path):
    ema = EMACallback(decay=0.7, save_averaged_model=True, load_average_at_end=True)
    trainer = train(tmp_path, [ema], max_steps=3)
    average = average_of(ema)
    loaded = GPT2LMHeadModel.from_pretrained(tmp_path / "ema")
    assert_equal_dicts({n: p.detach() for n, p in loaded.named_parameters()}, average)
    assert_equal_dicts({n: p.detach() for n, p in trainer.model.named_parameters()}, average)


# --- what is refused -----------------------------------------------------------------------------------


class GatheredWeightsSeen(TrainerCallback):
    """WeightsSeen under ZeRO-3, whose modules hold placeholders: each step's parameters gathered
    whole with DeepSpeed's own gather (every rank takes part), in float64."""

    def __init__(self) -> None:
        self.steps: list[dict[str, torch.Tensor]] = []

    def on_optimizer_step(self, args, state, control, model=None, **kwargs):
        import deepspeed

        with deepspeed.zero.GatheredParameters(list(model.parameters())):
            self.steps.append({n: p.detach().double().clone() for n, p in model.named_parameters()})


def _deepspeed_ema_run(rank, tmp, stage):
    """On each of two gloo ranks: the Trainer's DeepSpeed (DeepSpeed's CPU accelerator, torch's
    AdamW) with the EMA callback. Under ZeRO-3 each rank averages its own partitions, saves them
    into its own file, resumes them bit for bit, and `save_averaged_model` gathers the whole average
    once; under ZeRO-2 every rank holds the whole parameters and averages them, as under DDP."""
    import deepspeed

    os.environ.update(
        WORLD_SIZE="2", RANK=str(rank), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE="2", DS_ACCELERATOR="cpu"
    )
    deepspeed.init_distributed(dist_backend="gloo")
    settings = {
        "zero_optimization": {"stage": stage, "stage3_param_persistence_threshold": 100},
        "optimizer": {"type": "AdamW", "params": {"lr": "auto", "torch_adam": True}},
        "train_micro_batch_size_per_gpu": "auto",
        "gradient_accumulation_steps": "auto",
    }
    out = os.path.join(tmp, f"zero{stage}")
    try:
        _deepspeed_runs(rank, out, settings, stage)
    finally:  # the Trainer leaves DeepSpeed set for the whole process: in its settings and accelerate's
        from accelerate.state import AcceleratorState
        from transformers.integrations.deepspeed import unset_hf_deepspeed_config

        unset_hf_deepspeed_config()
        os.environ.pop("ACCELERATE_USE_DEEPSPEED", None)  # (accelerate's Accelerator sets it for good)
        AcceleratorState._reset_state(reset_partial_state=True)  # (the next Trainer sets it up anew)


def _deepspeed_runs(rank, out, settings, stage):
    saving = dict(max_steps=4, per_device_train_batch_size=2, save_strategy="steps", save_steps=2)
    seen, ema = GatheredWeightsSeen(), EMACallback(decay=0.8, save_averaged_model=True)
    trainer = train(out, [seen, ema], deepspeed=settings, **saving)
    assert type(trainer.model_wrapped).__name__ == "DeepSpeedEngine"
    assert ema.manager.tracked.sharded == (stage == 3)  # ZeRO-3: each rank holds its partitions only
    files = sorted(p for p in os.listdir(os.path.join(out, "checkpoint-2")) if p.startswith("swa_fast"))
    per_rank = ["swa_fast_ema-rank0-of-2.pt", "swa_fast_ema-rank1-of-2.pt"]
    expected = per_rank if stage == 3 else ["swa_fast_ema.pt"]  # (ZeRO-2: rank 0 writes it)
    assert files == expected, files
    resumed = EMACallback(decay=0.8)
    train(out, [resumed], resume=os.path.join(out, "checkpoint-2"), deepspeed=settings, **saving)
    assert_equal_dicts(average_of(resumed), average_of(ema))
    if rank == 0:  # the whole average, written once (read as saved: from_pretrained would partition)
        from safetensors.torch import load_file

        weights = load_file(os.path.join(out, "ema", "model.safetensors"))
        for name, value in reference_ema(seen.steps, 0.8).items():
            torch.testing.assert_close(weights[name].double(), value, **CLOSE, msg=name)


@pytest.mark.parametrize("stage", [2, 3])
def test_deepspeed_ranks_average_what_they_hold_and_resume_exactly(on_two_ranks, stage):
    pytest.importorskip("deepspeed", reason="DeepSpeed is not installed (the test extra installs it)")
    on_two_ranks(functools.partial(_deepspeed_ema_run, stage=stage))


def test_settings_are_checked_where_they_are_given(tmp_path):
    with pytest.raises(ValueError, match="every"):
        EMACallback(every=0)
    with pytest.raises(ValueError, match="start_step"):
        SWACallback(start_step=1.5)
    with pytest.raises(
        ValueError, match=r"sigma_rel must be one of the tracked sigma_rels \(0.05, 0.1\), got 0.2"
    ):
        PostHocEMACallback(sigma_rel=0.2)
    best = arguments(
        tmp_path,
        load_best_model_at_end=True,
        eval_strategy="steps",
        save_strategy="steps",
        eval_steps=2,
        save_steps=2,
    )
    with pytest.raises(ValueError, match="load_average_at_end=True would overwrite the best checkpoint"):
        EMACallback(load_average_at_end=True).on_train_begin(
            best, TrainerState(), TrainerControl(), model=tiny_gpt2()
        )
    with pytest.raises(ValueError, match="rank0_only=True keeps it on rank 0 only"):
        EMACallback(eval_with_average=True, rank0_only=True)
    with pytest.raises(ValueError, match="expected a callback whose Trainer has started training"):
        with EMACallback().average_applied(tiny_gpt2()):
            pass


# --- TRL ------------------------------------------------------------------------------------------------


def sft_run(out, callbacks, resume=None):
    """TRL's SFTTrainer on a text dataset it tokenizes itself: 4 steps, a checkpoint at step 2."""
    trl = pytest.importorskip("trl")
    datasets = pytest.importorskip("datasets")
    config = arguments(out, 4, trl.SFTConfig, save_strategy="steps", save_steps=2, max_length=16)
    trainer = trl.SFTTrainer(
        model=tiny_gpt2(),
        args=config,
        train_dataset=datasets.Dataset.from_dict({"text": text_data()}),
        processing_class=tiny_tokenizer(),
        callbacks=callbacks,
    )
    trainer.train(resume_from_checkpoint=resume)
    return trainer


def test_trl_sft_trainer_keeps_the_ema_and_resumes_it_bit_for_bit(tmp_path):
    seen, ema = WeightsSeen(), EMACallback(decay=0.8)
    sft_run(tmp_path, [seen, ema])
    assert len(seen.steps) == 4 and ema.manager.calls == 4, (len(seen.steps), ema.manager.calls)
    expected, got = reference_ema(seen.steps, 0.8), average_of(ema)
    for name, value in expected.items():
        torch.testing.assert_close(got[name].double(), value, **CLOSE, msg=name)
    resumed = EMACallback(decay=0.8)
    sft_run(tmp_path, [resumed], resume=str(tmp_path / "checkpoint-2"))
    assert resumed.manager.calls == 4
    assert_equal_dicts(average_of(resumed), got)


# --- DDP ------------------------------------------------------------------------------------------------


def _ddp_ema_run(rank, tmp):
    """On each of two gloo ranks: the Trainer's own DDP (accelerate's MULTI_CPU, joining the
    harness's process group) with the EMA callback, 2 rows per rank and step; then every rank
    resumes from the step-2 checkpoint rank 0 wrote."""
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    os.environ.update(
        WORLD_SIZE="2", RANK=str(rank), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE="2", OMP_NUM_THREADS="1"
    )
    out = os.path.join(tmp, "ddp")
    saving = dict(max_steps=4, per_device_train_batch_size=2, save_strategy="steps", save_steps=2)
    seen, ema = WeightsSeen(), EMACallback(decay=0.8)
    trainer = train(out, [seen, ema], **saving)
    assert isinstance(trainer.model_wrapped, DistributedDataParallel), type(trainer.model_wrapped)
    average = average_of(ema)
    for name, value in reference_ema(seen.steps, 0.8).items():
        torch.testing.assert_close(average[name].double(), value, **CLOSE, msg=name)
    others = [None, None]
    dist.all_gather_object(others, average)
    assert_equal_dicts(others[1 - rank], average)  # every rank keeps the same average
    files = sorted(p for p in os.listdir(os.path.join(out, "checkpoint-2")) if p.startswith("swa_fast"))
    assert files == ["swa_fast_ema.pt"], files  # written once, by rank 0
    resumed = EMACallback(decay=0.8)
    train(out, [resumed], resume=os.path.join(out, "checkpoint-2"), **saving)
    assert_equal_dicts(average_of(resumed), average)
    if rank == 0:
        torch.save(average, os.path.join(tmp, "ddp_average.pt"))


def test_ddp_ranks_keep_one_average_that_resumes_exactly(on_two_ranks, tmp_path):
    on_two_ranks(_ddp_ema_run)
    # Two ranks of 2 rows a step average to the gradients of one process's 4 rows (to fp32 rounding).
    ema = EMACallback(decay=0.8)
    train(tmp_path / "one", [ema], max_steps=4)
    expected = torch.load(tmp_path / "ddp_average.pt")
    for name, value in average_of(ema).items():
        torch.testing.assert_close(value, expected[name], rtol=1e-4, atol=1e-5, msg=name)


# --- FSDP2 (GPU only) -------------------------------------------------------------------------------------


def _fsdp2_run(out: str) -> None:
    """One rank of `torchrun --nproc_per_node 2` of this file: the Trainer's FSDP2 with the EMA
    callback, each rank averaging its shards, saving them into its own file, resuming them."""
    import torch.distributed as dist

    rank = int(os.environ["RANK"])
    sharding = {"fsdp_version": 2, "transformer_layer_cls_to_wrap": ["GPT2Block"]}
    saving = dict(max_steps=4, per_device_train_batch_size=2, save_strategy="steps", save_steps=2)
    setup = dict(use_cpu=False, fsdp=True, fsdp_config=sharding, **saving)
    ema = EMACallback(decay=0.8)
    train(out, [ema], **setup)
    assert ema.manager.tracked.sharded, "expected FSDP2's DTensor parameters"
    dist.barrier()
    files = sorted(p for p in os.listdir(os.path.join(out, "checkpoint-2")) if p.startswith("swa_fast"))
    assert files == ["swa_fast_ema-rank0-of-2.pt", "swa_fast_ema-rank1-of-2.pt"], files
    resumed = EMACallback(decay=0.8)
    train(out, [resumed], resume=os.path.join(out, "checkpoint-2"), **setup)
    got, expected = average_of(resumed), average_of(ema)
    for name, value in expected.items():
        assert torch.equal(got[name].to_local(), value.to_local()), (rank, name)
    print(f"rank {rank}: FSDP2 average resumed exactly", flush=True)


@pytest.mark.skipif(
    torch.cuda.device_count() < 2,
    reason="GPU only: accelerate runs FSDP on accelerators only, and the Trainer refuses fsdp on the CPU "
    "('Using fsdp only works in distributed training'); needs 2 CUDA GPUs",
)
def test_fsdp2_ranks_average_their_shards_and_resume_them_exactly(tmp_path):
    import subprocess
    import sys

    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        __file__,
        str(tmp_path),
    ]
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # this checkout's swa_fast
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))}
    done = subprocess.run(command, capture_output=True, text=True, timeout=600, env=env)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    assert done.stdout.count("FSDP2 average resumed exactly") == 2, done.stdout[-4000:]


if __name__ == "__main__":  # a rank of the FSDP2 test, under torchrun
    import sys

    _fsdp2_run(sys.argv[1])
