"""A `transformers.Trainer` step with swa_fast's `EMACallback` against the same step without it, on a
small GPT-2 built from a local config (no download): the callback's overhead in percent of the
step, reported (no target).

Each run is a fresh Trainer over the same model and batches; a step's time is the interval between
consecutive `on_step_end`s (data, forward, backward, optimizer step and every callback: the EMA's
update runs in its `on_step_end`), the first steps left out as warm-up. Runs with and without the
callback alternate, so a slow drift of the machine hits both alike; the callback's own time is also
read inside its steps (clocks on either side of it), which a busy machine moves far less.

    python -m swa_fast.benchmarks.transformers_trainer --min-run-time 0.5   # alone; `swa_fast bench` too
"""

from __future__ import annotations

import statistics
import tempfile
import time

import torch

WARMUP = 3  # steps left out of each run
ROUNDS = 3  # runs of each kind, alternating
BATCH, LENGTH, VOCAB = 8, 32, 512


def _small_gpt2(transformers):
    torch.manual_seed(0)
    config = transformers.GPT2Config(n_layer=2, n_embd=128, n_head=4, vocab_size=VOCAB, n_positions=LENGTH)
    config.resid_pdrop = config.embd_pdrop = config.attn_pdrop = 0.0
    return transformers.GPT2LMHeadModel(config)


class _Clock:
    """A TrainerCallback (made on first use: transformers is imported only when the bench runs) that
    stamps the time at each `on_step_end`."""

    def __new__(cls, transformers, device):
        class Clock(transformers.TrainerCallback):
            def __init__(self) -> None:
                self.stamps: list[float] = []

            def on_step_end(self, args, state, control, **kwargs):
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                self.stamps.append(time.perf_counter())

        return Clock()


def _step_times(transformers, device, steps: int, callbacks: list) -> tuple[list[float], list[float]]:
    """One Trainer run of WARMUP + `steps` steps: the seconds of each optimizer step, and of the
    `on_step_end`s of `callbacks` within it (clocks on either side of them)."""
    g = torch.Generator().manual_seed(1)
    rows = torch.randint(0, VOCAB, (BATCH * (WARMUP + steps + 1), LENGTH), generator=g)
    data = [{"input_ids": x, "labels": x} for x in rows]
    before, after = _Clock(transformers, device), _Clock(transformers, device)
    with tempfile.TemporaryDirectory(prefix="swa_fast_trainer_bench_") as out:
        args = transformers.TrainingArguments(
            out,
            max_steps=WARMUP + 1 + steps,
            per_device_train_batch_size=BATCH,
            use_cpu=device.type == "cpu",
            report_to=[],
            save_strategy="no",
            logging_strategy="no",
            dataloader_num_workers=0,
            train_sampling_strategy="sequential",
            disable_tqdm=True,
        )
        trainer = transformers.Trainer(
            model=_small_gpt2(transformers).to(device),
            args=args,
            train_dataset=data,
            callbacks=[before, *callbacks, after],
        )
        trainer.train()
    ends, starts = after.stamps[WARMUP:], before.stamps[WARMUP:]
    return [b - a for a, b in zip(ends, ends[1:])], [b - a for a, b in zip(starts[1:], ends[1:])]


def bench_trainer_step(device, min_run_time):
    """Rows: the median Trainer step without a callback and with `EMACallback(decay=0.999)`, each
    with `overhead_pct`: the step's time against the one without, in percent; and the EMA
    callback's `on_step_end` within its steps, in percent of those steps (`in_step_pct`: measured
    in the same steps, so the machine's drift between runs does not enter it)."""
    try:
        import transformers

        from swa_fast.integrations.transformers import EMACallback
    except ImportError:
        print("transformers is not installed: the Trainer step rows are left out")
        return []
    transformers.logging.set_verbosity_error()
    steps = max(5, round(min_run_time * 20))
    plain, with_ema, inside = [], [], []
    for _ in range(ROUNDS):
        plain += _step_times(transformers, device, steps, [])[0]
        step, callback = _step_times(transformers, device, steps, [EMACallback(0.999)])
        with_ema, inside = with_ema + step, inside + callback
    model = _small_gpt2(transformers)
    labels = {
        "workload": "HF Trainer step, GPT-2 2x128",
        "params": "float32",
        "tensors": len(list(model.parameters())),
        "elements": sum(p.numel() for p in model.parameters()),
    }
    base, ema = statistics.median(plain) * 1e3, statistics.median(with_ema) * 1e3
    in_step = statistics.median(c / s for c, s in zip(inside, with_ema)) * 100
    return [
        {
            **labels,
            "method": "Trainer step, no callback",
            "median_ms": base,
            "x_vs_naive": 1.0,
            "overhead_pct": 0.0,
        },
        {
            **labels,
            "method": "Trainer step + EMACallback",
            "median_ms": ema,
            "x_vs_naive": base / ema,
            "overhead_pct": (ema / base - 1) * 100,
            "in_step_pct": in_step,
            "callback_ms": statistics.median(inside) * 1e3,
        },
    ]


def print_trainer_overhead(rows) -> None:
    """The EMA callback's overhead in percent of a Trainer step, when the rows hold it."""
    for r in rows:
        if r.get("method") == "Trainer step + EMACallback":
            print(
                f"\n{r['workload']} ({r['elements']:,} parameters), EMACallback (reported, no target): its "
                f"on_step_end takes {r['callback_ms']:.2f} ms, {r['in_step_pct']:.1f}% of the step; the step "
                f"{r['median_ms']:.1f} ms against {r['median_ms'] * r['x_vs_naive']:.1f} ms without it "
                f"({r['overhead_pct']:+.1f}%, across runs: the machine's drift included)"
            )


def main(argv=None):
    from swa_fast.benchmarks.report import print_table
    from swa_fast.benchmarks.standalone import standalone_args

    args, device = standalone_args(__doc__, argv)
    print(f"transformers.Trainer step on {device} ({torch.get_num_threads()} threads)")
    rows = bench_trainer_step(device, args.min_run_time)
    print_table(rows)
    print_trainer_overhead(rows)


if __name__ == "__main__":
    main()
