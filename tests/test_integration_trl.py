"""swa_fast.integrations.trl.BEMACallback against TRL's own BEMACallback, side by side in real
`transformers.Trainer` and TRL `SFTTrainer` runs on the CPU, with a tiny GPT-2 built from a local
config (no downloads).

What is checked: `running_model`, the EMA and theta_0 against TRL's after every optimizer step (a
few fp32 ulps of the values the update combines: one rounding in the fused pass, several in TRL's),
the models both save at the end, a run resumed from a checkpoint against the run that was not (bit
for bit), a resumed run without our state (`resume=False`) against TRL's resumed run, a bf16 model,
and the refusals.
"""

from __future__ import annotations

import os
import shutil

import pytest
import torch

trl = pytest.importorskip("trl")
transformers = pytest.importorskip("transformers")
from hf_tiny import arguments, text_data, tiny_gpt2, tiny_tokenizer, token_data  # noqa: E402
from safetensors.torch import load_file  # noqa: E402
from transformers import (  # noqa: E402
    Trainer,
    TrainerCallback,
    TrainerControl,
    TrainerState,
)

from swa_fast.integrations.trl import BEMACallback  # noqa: E402
from swa_fast.weighting import bema_weights  # noqa: E402

EPS = torch.finfo(torch.float32).eps
ULPS = 4  # one rounding here, several in TRL: up to 1.5 ulps seen


def train(out, callbacks, resume=None, max_steps=8, **changes) -> Trainer:
    trainer = Trainer(
        model=tiny_gpt2(),
        args=arguments(out, max_steps, **changes),
        train_dataset=token_data(),
        callbacks=callbacks,
    )
    trainer.train(resume_from_checkpoint=resume)
    return trainer


def assert_within_ulps(got, expected, scale, what: str) -> None:
    """|got - expected| <= ULPS fp32 ulps of `scale`."""
    error = (got.double() - expected.double()).abs()
    bound = ULPS * EPS * scale
    assert (error <= bound).all(), f"{what}: {(error / (EPS * scale)).max().item():.1f} ulps apart"


class Parity:
    """Ours against TRL's, step after step: theta_0 exactly, the EMA and running_model to a few fp32
    ulps of the values they were made from (elementwise, the largest |EMA| + |theta| + |theta_0| so
    far: an EMA that has come near 0 from larger values carries their rounding)."""

    def __init__(self, ours: BEMACallback, theirs) -> None:
        self.ours, self.theirs, self.scales = ours, theirs, {}

    def check(self) -> None:
        ours, theirs = self.ours, self.theirs
        assert ours.param_names == theirs.param_names
        rows = zip(
            ours.param_names,
            ours.running_model.parameters(),
            theirs.running_model.parameters(),
            ours.ema_params,
            theirs.ema_params,
            ours.theta0_params,
            theirs.theta0_params,
            theirs.thetat_params,
        )
        for name, bema, their_bema, ema, their_ema, start, their_start, theta in rows:
            assert torch.equal(start, their_start), name
            now = (their_ema.abs() + theta.abs() + their_start.abs()).detach().double()
            scale = self.scales[name] = torch.maximum(self.scales.get(name, now), now)
            assert_within_ulps(ema, their_ema, scale, f"{name} EMA")
            assert_within_ulps(bema, their_bema, scale, f"{name} running_model")


class Compare(TrainerCallback):
    """After both callbacks' on_step_end: ours against TRL's, at every step."""

    def __init__(self, ours: BEMACallback, theirs) -> None:
        self.parity, self.steps = Parity(ours, theirs), []

    def on_step_end(self, args, state, control, **kwargs):
        self.parity.check()
        self.steps.append(state.global_step)


class KeepTheirSave(TrainerCallback):
    """Between TRL's callback and ours at on_train_end: moves TRL's `<output_dir>/bema` aside, to
    `bema_trl`, before ours writes the same folder."""

    def on_train_end(self, args, state, control, **kwargs):
        os.rename(os.path.join(args.output_dir, "bema"), os.path.join(args.output_dir, "bema_trl"))


def side_by_side(settings: dict) -> tuple[BEMACallback, object, Compare]:
    ours, theirs = BEMACallback(**settings), trl.BEMACallback(**settings)
    return ours, theirs, Compare(ours, theirs)


def assert_saved_alike(out, ours: BEMACallback) -> None:
    """Both saved models: the same files and keys, ours holding running_model's weights."""
    mine, theirs = os.path.join(out, "bema"), os.path.join(out, "bema_trl")
    assert sorted(os.listdir(mine)) == sorted(os.listdir(theirs))
    saved, their_saved = (
        load_file(os.path.join(mine, "model.safetensors")),
        load_file(os.path.join(theirs, "model.safetensors")),
    )
    assert saved.keys() == their_saved.keys()
    for name, p in ours.running_model.named_parameters():
        assert torch.equal(saved[name], p.detach()), name
        torch.testing.assert_close(saved[name], their_saved[name], rtol=1e-5, atol=1e-7, msg=name)


# --- parity with TRL's callback --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "settings",
    [
        dict(update_freq=1),
        dict(update_freq=2, update_after=3, lag=1, ema_power=0.7, bias_power=0.3, min_ema_multiplier=0.2),
    ],
)
def test_every_step_matches_trls_callback_in_a_trainer_run(tmp_path, settings):
    ours, theirs, compare = side_by_side(settings)
    assert isinstance(ours, trl.BEMACallback)
    train(tmp_path, [theirs, KeepTheirSave(), ours, compare])
    assert compare.steps == list(range(1, 9))
    after, every = settings.get("update_after", 0), settings["update_freq"]
    assert ours.manager.updates == len(range(after + every, 9, every)) + (after > 0)
    assert_saved_alike(tmp_path, ours)
    # the update touched running_model: it is not the model as training started
    assert not torch.equal(next(ours.running_model.parameters()), next(tiny_gpt2().parameters()))


def test_trl_sft_trainer_runs_both_callbacks_alike(tmp_path):
    datasets = pytest.importorskip("datasets")
    ours, theirs, compare = side_by_side(dict(update_freq=1, lag=2))
    trainer = trl.SFTTrainer(
        model=tiny_gpt2(),
        args=arguments(tmp_path, 4, trl.SFTConfig, max_length=16),
        train_dataset=datasets.Dataset.from_dict({"text": text_data()}),
        processing_class=tiny_tokenizer(),
        callbacks=[theirs, KeepTheirSave(), ours, compare],
    )
    trainer.train()
    assert compare.steps == [1, 2, 3, 4] and ours.manager.updates == 4
    assert_saved_alike(tmp_path, ours)


def test_the_update_of_a_given_step_is_trls():
    """`_update_bema_weights(step)`, TRL's update outside its schedule (what the benchmark times)."""
    model = tiny_gpt2()
    ours, theirs = BEMACallback(lag=3), trl.BEMACallback(lag=3)
    for callback in (ours, theirs):
        callback.on_train_begin(None, TrainerState(), TrainerControl(), model=model)
    parity = Parity(ours, theirs)
    for step in (5, 6, 9):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p), alpha=0.01)
        ours._update_bema_weights(step)
        with torch.no_grad():  # (TRL's on_step_end enters it for its update)
            theirs._update_bema_weights(step)
        parity.check()
    assert ours.manager.updates == 3


# --- checkpoints ---------------------------------------------------------------------------------------


def bema_state(callback: BEMACallback) -> dict[str, torch.Tensor]:
    state = callback.manager.state_dict()
    out = {f"bema {k}": v.clone() for k, v in state["average"].items()}
    out.update({f"ema {k}": v.clone() for k, v in state["ema"].items()})
    out.update({f"start {k}": v.clone() for k, v in state["start"].items()})
    out.update({f"running {k}": p.detach().clone() for k, p in callback.running_model.named_parameters()})
    return out


def assert_equal_states(got: dict, expected: dict) -> None:
    assert got.keys() == expected.keys()
    for name in expected:
        assert torch.equal(got[name], expected[name]), name


def test_a_run_resumed_from_a_checkpoint_goes_on_bit_for_bit(tmp_path):
    settings = dict(update_freq=2, update_after=1, lag=2)
    saving = dict(save_strategy="steps", save_steps=3)
    whole = BEMACallback(**settings)
    train(tmp_path / "whole", [whole], **saving)
    assert os.path.isfile(tmp_path / "whole" / "checkpoint-3" / "swa_fast_bema.pt")
    expected = bema_state(whole)
    resumed = BEMACallback(**settings)
    train(tmp_path / "whole", [resumed], resume=str(tmp_path / "whole" / "checkpoint-3"), **saving)
    assert_equal_states(bema_state(resumed), expected)
    assert resumed.manager.calls == whole.manager.calls == 8
    # a checkpoint folder holding the state of another step is refused
    folder = tmp_path / "whole" / "checkpoint-3"
    shutil.copy(tmp_path / "whole" / "checkpoint-6" / "swa_fast_bema.pt", folder / "swa_fast_bema.pt")
    with pytest.raises(
        ValueError, match=r"holds \(format, callback, step\) \(1, 'BEMACallback', 6\), expected"
    ):
        train(tmp_path / "whole", [BEMACallback(**settings)], resume=str(folder), **saving)


def test_without_its_state_a_resumed_run_is_refused_or_with_resume_false_is_trls(tmp_path):
    saving = dict(max_steps=6, save_strategy="steps", save_steps=2)
    train(tmp_path, [trl.BEMACallback(update_freq=1)], **saving)  # checkpoints without our state
    with pytest.raises(
        ValueError, match=r"expected the BEMA state saved as 'swa_fast_bema.pt' in .*resume=False"
    ):
        train(tmp_path, [BEMACallback(update_freq=1)], resume=str(tmp_path / "checkpoint-2"), **saving)
    ours, theirs = BEMACallback(update_freq=1, resume=False), trl.BEMACallback(update_freq=1)
    compare = Compare(ours, theirs)
    train(tmp_path, [theirs, ours, compare], resume=str(tmp_path / "checkpoint-2"), **saving)
    assert compare.steps == [3, 4, 5, 6]


# --- dtypes and refusals --------------------------------------------------------------------------------


def test_a_bf16_model_keeps_an_fp32_ema_and_running_model():
    """TRL keeps the EMA and theta_0 in bf16; ours in fp32, closer to the float64 BEMA of the same
    bf16 weights."""
    model = tiny_gpt2(torch.bfloat16)
    ours, theirs = BEMACallback(update_freq=1, lag=1), trl.BEMACallback(update_freq=1, lag=1)
    for callback in (ours, theirs):
        callback.on_train_begin(None, TrainerState(), TrainerControl(), model=model)
    start = {n: p.detach().double() for n, p in model.named_parameters()}
    ema = dict(start)
    for step in range(1, 6):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p), alpha=0.01)
        for callback in (ours, theirs):
            callback.on_step_end(None, TrainerState(global_step=step), TrainerControl(), model=model)
        beta, alpha = bema_weights(step, lag=1)
        theta = {n: p.detach().double() for n, p in model.named_parameters()}
        ema = {n: e + beta * (theta[n] - e) for n, e in ema.items()}
    assert {p.dtype for p in ours.running_model.parameters()} == {torch.float32}
    assert {e.dtype for e in ours.ema_params} == {torch.float32} and theirs.ema_params[
        0
    ].dtype == torch.bfloat16
    worst = {"ours": 0.0, "TRL's": 0.0}
    for (name, bema), their_bema in zip(
        ours.running_model.named_parameters(), theirs.running_model.parameters()
    ):
        expected = ema[name] + alpha * (theta[name] - start[name])
        torch.testing.assert_close(bema.double(), expected, rtol=1e-6, atol=1e-7, msg=name)
        worst["ours"] = max(worst["ours"], (bema.double() - expected).abs().max().item())
        worst["TRL's"] = max(worst["TRL's"], (their_bema.double() - expected).abs().max().item())
    assert worst["ours"] * 100 < worst["TRL's"], worst


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(update_freq=0), r"BEMACallback: update_freq must be an int >= 1, got 0"),
        (dict(update_after=1.5), r"BEMACallback: update_after must be an int >= 0, got 1.5"),
        (dict(ema_power=-1), r"BEMACallback: ema_power must be a finite real number >= 0.0, got -1"),
        (
            dict(min_ema_multiplier=2),
            r"min_ema_multiplier must be a finite real number in \[0.0, 1.0\], got 2",
        ),
        (dict(lag=0, multiplier=0), r"expected lag \+ multiplier > 0 .*got lag 0 and multiplier 0"),
        (dict(dtype="bfloat16"), r"BEMACallback: dtype must be .*got the string 'bfloat16'"),
    ],
)
def test_settings_are_refused_where_they_are_given(kwargs, message):
    with pytest.raises(ValueError, match=message):
        BEMACallback(**kwargs)


def test_a_train_begin_without_the_model_is_refused(tmp_path):
    with pytest.raises(ValueError, match="expected the Trainer to pass the model, got none"):
        BEMACallback().on_train_begin(arguments(tmp_path), TrainerState(), TrainerControl())
