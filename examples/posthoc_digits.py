"""Post-hoc EMA on the digits data: train once with `swa_fast.PostHocEMA` snapshots, then choose the
EMA length (sigma_rel) after training by validation loss, and score that choice on the test set.

    python examples/posthoc_digits.py                       # scikit-learn's digits, no download
    python examples/posthoc_digits.py --label-noise 0.3     # 30% of the training labels wrong

The training set of examples/digits.py is split into training and validation images (the test
set stays untouched until the end). One SGD run (constant learning rate by default) updates a
PostHocEMA (sigma_rel 0.05 and 0.10 tracked, BatchNorm statistics averaged too) from the
optimizer's step hook (`attach`), with a snapshot every --snapshot-every steps. After training,
every sigma_rel of a grid is synthesized from the snapshots and scored on the validation set; the
best is scored on the test set, beside the last iterate and the two tracked averages. `flush()`
snapshots the final state, so every row stands for the last training step (the tables say which).

Outputs in --out: `posthoc_results.json`, `posthoc_results.md` (the table), `posthoc_sigma_rel.png`
(validation and test loss against sigma_rel) and `posthoc_profiles.png` (the weight each step of
training has in the tracked averages and in the chosen synthesized one).
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))  # examples/ is not a package

import digits  # noqa: E402  (examples/digits.py: its data, model and scoring pieces)

import swa_fast  # noqa: E402
from swa_fast.posthoc.profiles import Reconstruction, profile_weights, sigma_rel_to_gamma  # noqa: E402
from swa_fast.posthoc.snapshots import list_snapshots, load_snapshot  # noqa: E402

TRACKED = (0.05, 0.10)
DEFAULT_GRID = (0.01, 0.02, 0.03, 0.05, 0.07, 0.10, 0.13, 0.16, 0.20)


def split_validation(data: digits.Data, fraction: float, seed: int = 0) -> tuple[digits.Data, tuple]:
    """Move a fixed random `fraction` of the training images to a validation set (returned as
    (x, y)); the test set is left alone."""
    order = torch.randperm(len(data.x_train), generator=torch.Generator().manual_seed(seed))
    n_val = max(1, round(fraction * len(order)))
    val, train = order[:n_val], order[n_val:]
    validation = (data.x_train[val], data.y_train[val])
    data.x_train, data.y_train = data.x_train[train], data.y_train[train]
    return data, validation


def train(model, data: digits.Data, args) -> tuple[swa_fast.PostHocEMA, int, float]:
    """One SGD run with a PostHocEMA updated from the optimizer's step hook; returns it, the number
    of steps and the seconds spent in its updates and snapshots."""
    optimizer = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9, weight_decay=args.wd)
    batches = digits.Batches(data.x_train, data.y_train, args.batch_size, seed=args.seed)
    steps = args.epochs * len(batches)
    if args.schedule == "cosine":
        schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=steps, eta_min=0.01 * args.lr)
    else:  # a constant rate, where averaging the iterates matters most
        schedule = torch.optim.lr_scheduler.ConstantLR(optimizer, factor=1.0)
    ema = swa_fast.PostHocEMA(
        model,
        TRACKED,
        snapshot_every=args.snapshot_every,
        snapshot_dir=args.out / "snapshots",
        use_buffers=True,
    )
    # Post-hooks run in the order they were registered: a clock on either side of attach's.
    started, spent = [0.0], [0.0]
    optimizer.register_step_post_hook(lambda *_: started.__setitem__(0, time.perf_counter()))
    ema.attach(optimizer)
    optimizer.register_step_post_hook(
        lambda *_: spent.__setitem__(0, spent[0] + time.perf_counter() - started[0])
    )
    for _ in range(args.epochs):
        model.train()
        for x, y in batches:
            optimizer.zero_grad(set_to_none=True)
            F.cross_entropy(model(x), y).backward()
            optimizer.step()  # the hook updates the averages, and writes a snapshot when one is due
            schedule.step()
    start = time.perf_counter()
    ema.flush()  # the last snapshots written, the final state's included
    spent[0] += time.perf_counter() - start
    return ema, steps, spent[0]


def evaluate(model, x, y) -> dict[str, float]:
    return digits.scores(digits.predict(model, digits.Batches(x, y, 512)), y)


def step_weights(reconstruction: Reconstruction, gammas: dict[int, list[float]], steps: int) -> torch.Tensor:
    """The weight each training step has in a synthesized average: its snapshots' per-step
    weights (one update per step: progress = step), combined with the solved coefficients.
    `gammas`: step -> the gammas of the snapshot of that step."""
    total = torch.zeros(steps, dtype=torch.float64)
    for c, (step, k) in zip(reconstruction.coefficients, reconstruction.sources):
        gamma = gammas[step][k]
        total[:step] += c * torch.tensor(profile_weights(gamma, range(1, step + 1)), dtype=torch.float64)
    return total


def save_figure(draw, xlabel: str, ylabel: str, title: str, path: Path) -> None:
    """One axes drawn by `draw(ax)`, labelled, saved to `path`."""
    plt = digits.pyplot()
    fig, ax = plt.subplots(figsize=(7, 4))
    draw(ax)
    ax.set(xlabel=xlabel, ylabel=ylabel)
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_profiles(profiles: dict[str, torch.Tensor], path: Path, title: str) -> None:
    def draw(ax) -> None:
        for label, weights in profiles.items():
            style = {"ls": "--", "color": "k", "lw": 1} if label.startswith("requested") else {"lw": 1.5}
            ax.plot(range(1, len(weights) + 1), weights.numpy(), label=label, **style)

    save_figure(draw, "training step", "weight in the average", title, path)


def plot_grid(grid: list[dict], best: float, path: Path, title: str) -> None:
    def draw(ax) -> None:
        sigma = [row["sigma_rel"] for row in grid]
        ax.plot(sigma, [row["val_nll"] for row in grid], "o-", label="validation NLL")
        ax.plot(sigma, [row["test_nll"] for row in grid], "s--", label="test NLL", alpha=0.7)
        ax.axvline(best, color="grey", lw=0.8, ls=":", label=f"chosen sigma_rel {best:g}")

    save_figure(draw, "sigma_rel (synthesized after training)", "negative log-likelihood", title, path)


def parser() -> argparse.ArgumentParser:
    """The command line's options, each with its help."""
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    p.add_argument("--epochs", type=int, default=15, help="training budget")
    p.add_argument("--seed", type=int, default=0, help="seed of the initialisation and the batches")
    p.add_argument("--out", type=Path, default=Path("posthoc_results"), help="folder for snapshots, results")
    p.add_argument("--subsample", type=int, help="keep only this many images (a quick try)")
    p.add_argument("--label-noise", type=float, default=0.0, help="fraction of training labels changed")
    p.add_argument("--validation", type=float, default=0.2, help="fraction of the training images")
    p.add_argument("--batch-size", type=int, default=32, help="images per SGD step")
    p.add_argument("--width", type=int, default=32, help="channels of the CNN's first stage")
    p.add_argument("--lr", type=float, default=0.05, help="SGD's learning rate (momentum 0.9)")
    p.add_argument("--schedule", choices=("constant", "cosine"), default="constant", help="learning rate")
    p.add_argument("--wd", type=float, default=5e-4, help="weight decay")
    p.add_argument("--snapshot-every", type=int, default=40, help="optimizer steps between snapshots")
    p.add_argument("--grid", type=float, nargs="+", default=list(DEFAULT_GRID), help="sigma_rels to try")
    p.add_argument("--threads", type=int, help="torch.set_num_threads")
    return p


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    return parser().parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    (args.out / "snapshots").mkdir(parents=True, exist_ok=True)
    for old in list_snapshots(args.out / "snapshots").values():  # one run per snapshot directory
        old.unlink()
    data = digits.load_digits_data(args.subsample)
    data, (x_val, y_val) = split_validation(data, args.validation)
    if args.label_noise:  # after the split: the validation labels stay clean, as the test labels
        data.flip_train_labels(args.label_noise)
    torch.manual_seed(args.seed)
    model = digits.make_cnn(data.x_train.shape[1], data.x_train.shape[2], data.num_classes, args.width)
    start = time.perf_counter()
    ema, steps, averaging_s = train(model, data, args)
    train_s = time.perf_counter() - start

    rows = {
        "last iterate": {
            "step": steps,
            **evaluate(model, x_val, y_val),
            **prefixed(evaluate(model, data.x_test, data.y_test)),
        }
    }
    candidate = copy.deepcopy(model)
    for sigma_rel in TRACKED:
        ema.copy_to(candidate, sigma_rel=sigma_rel)
        rows[f"tracked {sigma_rel:g}"] = {
            "step": ema.calls,  # the tracked averages are those of the last update
            **evaluate(candidate, x_val, y_val),
            **prefixed(evaluate(candidate, data.x_test, data.y_test)),
        }
    grid, reconstructions = [], {}
    start = time.perf_counter()
    for sigma_rel in args.grid:
        reconstructions[sigma_rel] = ema.synthesize(candidate, sigma_rel)
        val = evaluate(candidate, x_val, y_val)
        test = evaluate(candidate, data.x_test, data.y_test)
        grid.append(
            {
                "sigma_rel": sigma_rel,
                "step": reconstructions[sigma_rel].step,  # the snapshot it stands for
                "val_nll": val["nll"],
                "val_acc": val["acc"],
                "test_nll": test["nll"],
                "test_acc": test["acc"],
                "profile_error": reconstructions[sigma_rel].profile_error,
            }
        )
    synthesis_s = (time.perf_counter() - start) / len(args.grid)
    best = min(grid, key=lambda row: row["val_nll"])
    rows[f"chosen {best['sigma_rel']:g} (synthesized)"] = {
        "step": best["step"],
        "nll": best["val_nll"],
        "acc": best["val_acc"],
        "test_nll": best["test_nll"],
        "test_acc": best["test_acc"],
    }

    snapshot_gammas = {s: load_snapshot(p).gammas for s, p in list_snapshots(args.out / "snapshots").items()}
    profiles = {
        f"tracked sigma_rel {s:g}": torch.tensor(
            profile_weights(sigma_rel_to_gamma(s), range(1, steps + 1)), dtype=torch.float64
        )
        for s in TRACKED
    }
    chosen = best["sigma_rel"]
    profiles[f"synthesized sigma_rel {chosen:g}"] = step_weights(
        reconstructions[chosen], snapshot_gammas, max(snapshot_gammas)
    )
    profiles[f"requested sigma_rel {chosen:g} (exact)"] = torch.tensor(
        profile_weights(sigma_rel_to_gamma(chosen), range(1, max(snapshot_gammas) + 1)),
        dtype=torch.float64,
    )
    noise = f", {args.label_noise:.0%} of the training labels flipped" if args.label_noise else ""
    title = f"{data.name}: {steps} steps, a snapshot every {args.snapshot_every}{noise}"
    files = {
        "table": args.out / "posthoc_results.md",
        "json": args.out / "posthoc_results.json",
        "grid_plot": args.out / "posthoc_sigma_rel.png",
        "profile_plot": args.out / "posthoc_profiles.png",
    }
    plot_grid(grid, best["sigma_rel"], files["grid_plot"], title)
    plot_profiles(profiles, files["profile_plot"], title)
    table = markdown_table(rows, grid)
    files["table"].write_text(table)
    report = {
        "data": data.describe(),
        "validation_images": len(y_val),
        "steps": steps,
        "snapshots": len(snapshot_gammas),
        "chosen_sigma_rel": best["sigma_rel"],
        "rows": rows,
        "grid": grid,
        "train_s": train_s,
        "averaging_s": averaging_s,
        "synthesis_s_each": synthesis_s,
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "files": {k: str(v) for k, v in files.items()},
    }
    files["json"].write_text(json.dumps(report, indent=2))
    print(table)
    print(
        f"training {train_s:.1f} s, of which PostHocEMA updates and snapshots {averaging_s:.2f} s; "
        f"one synthesis {synthesis_s:.2f} s"
    )
    return report


def prefixed(scores: dict[str, float]) -> dict[str, float]:
    return {f"test_{k}": v for k, v in scores.items()}


def markdown_table(rows: dict[str, dict], grid: list[dict]) -> str:
    lines = [
        "| model | step | validation NLL | validation acc | test NLL | test acc |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for name, r in rows.items():
        lines.append(
            f"| {name} | {r['step']} | {r['nll']:.4f} | {r['acc']:.2%} | {r['test_nll']:.4f} | "
            f"{r['test_acc']:.2%} |"
        )
    lines += [
        "",
        "| sigma_rel | step | validation NLL | test NLL | test acc | profile error |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for row in grid:
        lines.append(
            f"| {row['sigma_rel']:g} | {row['step']} | {row['val_nll']:.4f} | {row['test_nll']:.4f} | "
            f"{row['test_acc']:.2%} | {row['profile_error']:.1e} |"
        )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
