"""A bf16 EMA that stalls, and the same EMA rounded stochastically (docs/low-precision.md).

An EMA of decay 0.9999 follows a stationary noisy signal for 10,000 updates from a start below the
signal's mean. Kept in fp32 it moves towards the mean; kept in bf16 and rounded to nearest, every
update's step is under half a unit in the last place and the average never moves; kept in bf16 and
rounded stochastically (`rounding="stochastic"`), it tracks the fp32 EMA at half the memory.

    python examples/low_precision_ema.py --out docs

writes `low_precision_ema.png` (the three averages' mean over the elements, and one element's) and
prints a table of the final errors in bf16 units in the last place (ulp) and of what the last
update's pass saw (`stats=True`: elements written, left unchanged, the largest |update|); the bf16
EMA rounded to nearest warns, once, that it is stalled.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

import torch

import swa_fast


def run(steps: int, elements: int, decay: float, start: float, mean: float, noise: float) -> dict:
    """The three EMAs of one signal, their mean over the elements (and element 0) every 10 updates."""
    signal = torch.nn.Parameter(torch.full((elements,), start))
    model = torch.nn.ParameterList([signal])
    emas = {
        "fp32": swa_fast.EMA(model, decay, stats=True),
        "bf16, nearest": swa_fast.EMA(model, decay, dtype=torch.bfloat16, stats=True),
        "bf16, stochastic": swa_fast.EMA(
            model, decay, dtype=torch.bfloat16, rounding="stochastic", stats=True
        ),
    }
    g = torch.Generator().manual_seed(0)
    curves: dict[str, list] = {name: [] for name in emas}
    one: dict[str, list] = {name: [] for name in emas}
    for step in range(steps):
        if step:  # the first update copies the start
            signal.data = mean + noise * torch.randn(elements, generator=g)
        for name, ema in emas.items():
            ema.update(model)
            if step % 10 == 0 or step == steps - 1:
                average = ema.average.views[0].double()
                curves[name].append(average.mean().item())
                one[name].append(average[0].item())
    fp32 = emas["fp32"].average.views[0].double()
    ulp = 2.0 ** (torch.floor(torch.log2(fp32.abs())) - 7)  # bf16's unit in the last place there
    errors = {
        name: {
            "error of the mean (ulp)": ((ema.average.views[0].double() - fp32) / ulp).mean().item(),
            "mean absolute error (ulp)": ((ema.average.views[0].double() - fp32) / ulp).abs().mean().item(),
        }
        for name, ema in emas.items()
    }
    last = {name: dataclasses.asdict(ema.last_stats()["average"]) for name, ema in emas.items()}
    return {"steps": steps, "curves": curves, "element_0": one, "errors": errors, "last_update": last}


def plot(result: dict, path: Path, decay: float) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    x = [min(i * 10, result["steps"] - 1) for i in range(len(result["curves"]["fp32"]))]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
    for ax, key, title in zip(axes, ("curves", "element_0"), ("mean over the elements", "one element")):
        for name, style in zip(result[key], ("-", "--", "-")):
            ax.plot(x, result[key][name], style, label=name, linewidth=1.2)
        ax.set_title(f"EMA, decay {decay}: {title}")
        ax.set_xlabel("update")
    axes[0].set_ylabel("average")
    axes[0].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=10_000)
    parser.add_argument("--elements", type=int, default=4096)
    parser.add_argument("--decay", type=float, default=0.9999)
    parser.add_argument("--out", type=Path, default=Path("."))
    args = parser.parse_args(argv)
    result = run(args.steps, args.elements, args.decay, start=0.9, mean=1.0, noise=0.01)
    args.out.mkdir(parents=True, exist_ok=True)
    plot(result, args.out / "low_precision_ema.png", args.decay)
    summary = {"errors": result["errors"], "last_update": result["last_update"]}
    (args.out / "low_precision_ema.json").write_text(json.dumps(summary, indent=2))
    print(f"{'average':<18} {'error of the mean (ulp)':>24} {'mean absolute error (ulp)':>26}")
    for name, row in result["errors"].items():
        print(f"{name:<18} {row['error of the mean (ulp)']:>24.2f} {row['mean absolute error (ulp)']:>26.2f}")
    print(f"\nthe last update's pass:\n{'average':<18} {'written':>8} {'unchanged':>10} {'max |update|':>13}")
    for name, row in result["last_update"].items():
        print(f"{name:<18} {row['written']:>8} {row['unchanged']:>10} {row['max_update']:>13.3g}")
    return result


if __name__ == "__main__":
    main()
