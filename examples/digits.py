"""SGD vs SWA vs FGE vs SWAG vs EMA on real data, with the SWA paper's pictures.

    python examples/digits.py                          # scikit-learn's digits, no download
    python examples/digits.py --data ~/cifar10         # a CIFAR-10 folder in ImageFolder layout
    python examples/digits.py --label-noise 0.3        # 30% of the training labels wrong

Every method gets the same budget of epochs, the same initial weights and the same batch order
(per seed). Three training runs per seed:

- `sgd`: SGD with momentum, cosine-decaying learning rate from --lr to 1% of it over the budget.
  EMA (`swa_fast.EMA`, per iteration, BatchNorm statistics averaged too) rides on this run, as an
  EMA does on a normal training run.
- `swa`: the same cosine, compressed into the first --swa-start of the budget and ending at
  --swa-lr, then `SWALR` holds --swa-lr and `AveragedModel` averages the end of every epoch
  (Izmailov et al. 2018); `update_bn` at the end. SWAG (`swa_fast.SWAG`, Maddox et al. 2019)
  collects its moments at the same points, and predicts by a Bayesian model average.
- `fge`: the same first phase, then `FGECyclicLR` cycles between --swa-lr and 1% of --lr, with a
  snapshot at each cycle's minimum (Garipov et al. 2018); the prediction is the snapshots' ensemble.

With --label-noise a fixed random part of the training labels (the same for every seed and
method) is changed to another class; the test labels stay clean.

Time spent in the averaging calls (update, snapshot) is measured apart from training. Outputs in
--out: `<name>_results.json`, `<name>_results.md` (the table), `<name>_accuracy.png`,
`<name>_vs_sgd.png` (each method minus SGD, seed by seed) and `<name>_line.png` (train loss and
test error along the lines from two SGD solutions, the SGD run's and the SWA run's last iterate,
through the SWA solution: the SWA paper's figure 5).
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

import swa_fast
from swa_fast.swa_utils import SWALR, AveragedModel, update_bn

try:
    from tqdm import tqdm
except ImportError:  # a plain progress line instead
    tqdm = None

METHODS = ("sgd", "swa", "fge", "swag", "ema")
RUN_OF = {"sgd": "sgd", "ema": "sgd", "swa": "swa", "swag": "swa", "fge": "fge"}  # training run per method
LABELS = {"sgd": "SGD", "swa": "SWA", "fge": "FGE", "swag": "SWAG", "ema": "EMA"}
LABEL_NOISE_SEED = 0  # not a training seed: the noise stays put while --seeds varies
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".ppm"}


# --- data ---------------------------------------------------------------------------------------


class Data:
    """Train and test tensors in memory, normalised with the training set's per-channel statistics."""

    def __init__(self, name: str, x_train, y_train, x_test, y_test, augment: bool) -> None:
        x_train = torch.as_tensor(x_train, dtype=torch.float32)
        x_test = torch.as_tensor(x_test, dtype=torch.float32)
        mean = x_train.mean(dim=(0, 2, 3), keepdim=True)
        std = x_train.std(dim=(0, 2, 3), keepdim=True).clamp_min(1e-6)
        self.name = name
        self.x_train, self.x_test = (x_train - mean) / std, (x_test - mean) / std
        self.y_train = torch.as_tensor(y_train, dtype=torch.long)
        self.y_test = torch.as_tensor(y_test, dtype=torch.long)
        self.num_classes = int(max(self.y_train.max(), self.y_test.max())) + 1
        self.augment = augment  # random flips and shifts: right for photos, wrong for digits
        self.label_noise = 0.0

    def flip_train_labels(self, fraction: float, seed: int = LABEL_NOISE_SEED) -> Data:
        """Noisy training labels (see `flip_labels`); the test labels stay clean."""
        self.y_train = flip_labels(self.y_train, fraction, self.num_classes, seed)
        self.label_noise = fraction
        return self

    def to(self, device: torch.device) -> Data:
        for key in ("x_train", "x_test", "y_train", "y_test"):
            setattr(self, key, getattr(self, key).to(device))
        return self

    def describe(self) -> str:
        shape = "x".join(map(str, self.x_train.shape[1:]))
        noise = f" ({self.label_noise:.0%} of their labels flipped)" if self.label_noise else ""
        return f"{self.name}: {len(self.x_train)} train{noise} / {len(self.x_test)} test images, {shape}"


def flip_labels(y: Tensor, fraction: float, num_classes: int, seed: int = LABEL_NOISE_SEED) -> Tensor:
    """A copy of `y` with round(fraction * len(y)) labels, picked at random, each changed to one of
    the other classes, picked uniformly. From its own generator, so that the noise depends on
    `seed` alone: every method and training seed sees the same noisy labels."""
    rng = np.random.default_rng(seed)
    flipped = torch.as_tensor(rng.permutation(len(y))[: round(fraction * len(y))], device=y.device)
    shift = torch.as_tensor(rng.integers(1, num_classes, size=len(flipped)), device=y.device)
    noisy = y.clone()
    noisy[flipped] = (y[flipped] + shift) % num_classes
    return noisy


def load_digits_data(subsample: int | None = None) -> Data:
    """scikit-learn's 8x8 handwritten digits (1,797 images), a fixed stratified 70/30 split."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    x = digits.images.astype(np.float32)[:, None] / 16.0
    y = digits.target
    if subsample is not None and subsample < len(x):
        keep = np.random.default_rng(0).permutation(len(x))[:subsample]
        x, y = x[keep], y[keep]
    x_train, x_test, y_train, y_test = train_test_split(x, y, test_size=0.3, random_state=0, stratify=y)
    return Data("digits", x_train, y_train, x_test, y_test, augment=False)


def load_image_folder(root: Path, subsample: int | None = None) -> Data:
    """root/train/<class>/*.png and root/test/<class>/*.png (torchvision's ImageFolder layout, as
    CIFAR-10 is often unpacked), read with Pillow, so torchvision is not needed. Classes are the
    sorted folder names of train/; every image must have the same size."""
    from PIL import Image

    root = Path(root).expanduser()
    if not (root / "train").is_dir() or not (root / "test").is_dir():
        raise SystemExit(f"--data {root}: expected {root}/train/<class>/*.png and {root}/test/<class>/*.png")
    classes = sorted(p.name for p in (root / "train").iterdir() if p.is_dir())

    def read(split: str) -> tuple[np.ndarray, np.ndarray]:
        images, labels = [], []
        for label, name in enumerate(classes):
            folder = root / split / name
            files = sorted(f for f in folder.iterdir() if f.suffix.lower() in IMAGE_SUFFIXES)
            if subsample is not None:
                files = files[: max(1, subsample // len(classes))]
            for f in files:
                with Image.open(f) as image:
                    images.append(np.asarray(image.convert("RGB"), dtype=np.uint8))
                labels.append(label)
        if not images:
            raise SystemExit(f"--data {root}: no images in {root / split}/<class>/")
        sizes = {im.shape for im in images}
        if len(sizes) > 1:
            raise SystemExit(f"--data {root}: images in {split}/ differ in size: {sorted(sizes)[:3]}")
        x = np.stack(images).transpose(0, 3, 1, 2).astype(np.float32) / 255.0
        return x, np.array(labels)

    x_train, y_train = read("train")
    x_test, y_test = read("test")
    return Data(root.name or "data", x_train, y_train, x_test, y_test, augment=True)


class Batches:
    """Mini-batches of in-memory tensors, reshuffled on each pass from a seeded generator, so that
    every run with the same seed sees the same batches. Iterable many times (update_bn needs that)."""

    def __init__(self, x: Tensor, y: Tensor, batch_size: int, seed: int | None = None, augment=False):
        self.x, self.y, self.batch_size, self.augment = x, y, batch_size, augment
        self.generator = None if seed is None else torch.Generator().manual_seed(seed)

    def __len__(self) -> int:
        return math.ceil(len(self.x) / self.batch_size)

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        n = len(self.x)
        order = torch.arange(n) if self.generator is None else torch.randperm(n, generator=self.generator)
        for start in range(0, n, self.batch_size):
            idx = order[start : start + self.batch_size].to(self.x.device)
            x = self.x[idx]
            if self.augment and self.generator is not None:
                x = random_flip_and_shift(x, self.generator)
            yield x, self.y[idx]


def random_flip_and_shift(x: Tensor, generator: torch.Generator, pad: int = 4) -> Tensor:
    """Standard CIFAR augmentation, cheaply: a random horizontal flip per image and one random
    shift (zero padding, crop) per batch."""
    flip = (torch.rand(len(x), generator=generator) < 0.5).to(x.device)
    x = torch.where(flip[:, None, None, None], x.flip(3), x)
    i, j = torch.randint(0, 2 * pad + 1, (2,), generator=generator).tolist()
    return F.pad(x, (pad, pad, pad, pad))[:, :, i : i + x.shape[2], j : j + x.shape[3]]


# --- the model ----------------------------------------------------------------------------------


def make_cnn(channels: int, size: int, num_classes: int, width: int = 32) -> nn.Sequential:
    """A small VGG-style CNN with BatchNorm: stages of two 3x3 convolutions, each stage halving
    the image and doubling the width until it is 4x4, then a linear layer. 8x8 digits get one
    stage, 3x32x32 CIFAR images three."""
    layers: list[nn.Module] = []
    c_in, c_out = channels, width
    while True:
        for c in (c_in, c_out):
            layers += [nn.Conv2d(c, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU()]
        layers.append(nn.MaxPool2d(2))
        size //= 2
        c_in = c_out
        if size <= 4:
            break
        c_out *= 2
    return nn.Sequential(*layers, nn.Flatten(), nn.Linear(c_in * size * size, num_classes))


# --- measuring ----------------------------------------------------------------------------------


def synchronize(data: Data) -> None:
    if data.x_train.is_cuda:
        torch.cuda.synchronize(data.x_train.device)


@torch.no_grad()
def predict(model: nn.Module, batches: Batches) -> Tensor:
    """Softmax probabilities (N, C) in eval mode, computed in fp64 so that NLL never sees a 0."""
    model.eval()
    return torch.cat([model(x).double().softmax(1) for x, _ in batches])


def scores(probs: Tensor, y: Tensor) -> dict[str, float]:
    """Accuracy and negative log-likelihood of predicted probabilities."""
    p_true = probs.double().gather(1, y[:, None]).clamp_min(1e-300)
    return {"acc": (probs.argmax(1) == y).double().mean().item(), "nll": -p_true.log().mean().item()}


# --- training -----------------------------------------------------------------------------------


class Progress:
    """tqdm when installed, else one printed line per epoch (this is a CLI)."""

    def __init__(self, total: int) -> None:
        self.total, self.done = total, 0
        self.bar = tqdm(total=total, unit="epoch", dynamic_ncols=True) if tqdm else None

    def step(self, what: str) -> None:
        self.done += 1
        if self.bar is not None:
            self.bar.set_description(what)
            self.bar.update()
        else:
            print(f"[{self.done}/{self.total}] {what}", flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def swa_start_epoch(args) -> int:
    """The first epoch of SWA's and FGE's second phase: at least one epoch in each phase."""
    return min(max(1, round(args.swa_start * args.epochs)), args.epochs - 1)


class LearningRate:
    """One run's learning rate. Per iteration, a cosine over the first phase: --lr down to 1% of it
    over the whole budget (sgd), or down to --swa-lr by the SWA start (swa, fge). Then the swa run
    holds --swa-lr (`SWALR`, stepped per epoch) and the fge run cycles (`FGECyclicLR`, per
    iteration)."""

    def __init__(self, run: str, optimizer: torch.optim.Optimizer, args, per_epoch: int) -> None:
        self.run, self.optimizer, self.args, self.per_epoch = run, optimizer, args, per_epoch
        self.swa_start = swa_start_epoch(args)
        self.first_phase = args.epochs if run == "sgd" else self.swa_start
        floor = 0.01 * args.lr if run == "sgd" else args.swa_lr
        self.cosine = torch.optim.lr_scheduler.CosineAnnealingLR(
            optimizer, T_max=self.first_phase * per_epoch, eta_min=floor
        )
        self.hold: SWALR | None = None
        self.cyclic: swa_fast.FGECyclicLR | None = None

    def in_second_phase(self, epoch: int) -> bool:
        return self.run != "sgd" and epoch >= self.swa_start

    def start_epoch(self, epoch: int) -> None:
        if self.run == "sgd" or epoch != self.swa_start:
            return
        args = self.args
        if self.run == "swa":
            self.hold = SWALR(self.optimizer, swa_lr=args.swa_lr, anneal_epochs=0)
        else:
            # At most what is left of the budget, and even (one iteration at the minimum).
            left = (args.epochs - self.swa_start) * self.per_epoch
            cycle = min(args.cycle * self.per_epoch, left) // 2 * 2
            self.cyclic = swa_fast.FGECyclicLR(self.optimizer, args.swa_lr, 0.01 * args.lr, max(2, cycle))

    def at_cycle_minimum(self) -> bool:
        """Whether the step just taken used the FGE cycle's lowest rate: a snapshot point."""
        return self.cyclic is not None and self.cyclic.at_minimum()

    def step_iteration(self, epoch: int) -> None:
        if self.cyclic is not None:
            self.cyclic.step()
        elif epoch < self.first_phase:
            self.cosine.step()

    def step_epoch(self) -> None:
        if self.hold is not None:
            self.hold.step()


class Averagers:
    """The averaging methods that ride on one run, and the seconds each spends in its calls."""

    def __init__(self, run: str, methods: set[str], model: nn.Module, data: Data, args) -> None:
        self.data = data
        self.ema = swa_fast.EMA(model, decay=args.ema_decay, use_buffers=True) if "ema" in methods else None
        self.swa_model = AveragedModel(model) if "swa" in methods else None
        self.swag = swa_fast.SWAG(model, max_rank=args.swag_rank) if "swag" in methods else None
        self.fge = swa_fast.FGE(model) if run == "fge" else None
        self.seconds = dict.fromkeys(methods, 0.0)

    def timed(self, method: str, fn, *a) -> None:
        synchronize(self.data)
        start = time.perf_counter()
        fn(*a)
        synchronize(self.data)  # on a GPU, the time of the work, not of its launch
        self.seconds[method] += time.perf_counter() - start

    def after_step(self, model: nn.Module, at_cycle_minimum: bool) -> None:
        if self.ema is not None:
            self.timed("ema", self.ema.update, model)
        if at_cycle_minimum:
            self.timed("fge", self.fge.snapshot, model)

    def after_epoch(self, model: nn.Module) -> None:
        """SWA and SWAG collect once per epoch of the second phase."""
        if self.swa_model is not None:
            self.timed("swa", self.swa_model.update_parameters, model)
        if self.swag is not None:
            self.timed("swag", self.swag.update, model)


def train_epoch(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    train: Batches,
    rate: LearningRate,
    averagers: Averagers,
    epoch: int,
) -> None:
    rate.start_epoch(epoch)
    model.train()
    for x, y in train:
        optimizer.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
        optimizer.step()
        averagers.after_step(model, rate.at_cycle_minimum())
        rate.step_iteration(epoch)
    if rate.in_second_phase(epoch):
        averagers.after_epoch(model)
        rate.step_epoch()


def predictors(
    model: nn.Module, averagers: Averagers, test: Batches, data: Data, args, seed: int
) -> dict[str, Callable[[], Tensor]]:
    """Per method that rode on the run, a function that returns its test-set probabilities, in the
    order they run: SWAG and FGE predict through `model`, so they come after SGD and EMA."""
    bn_loader = Batches(data.x_train, data.y_train, args.batch_size)  # update_bn: one plain pass
    ema, swa_model, swag, fge = averagers.ema, averagers.swa_model, averagers.swag, averagers.fge

    def ema_predict() -> Tensor:
        with ema.average_applied(model):  # BatchNorm statistics averaged too (use_buffers=True)
            return predict(model, test)

    def swa_predict() -> Tensor:
        update_bn(bn_loader, swa_model)  # averaged weights need their own BatchNorm statistics
        return predict(swa_model, test)

    def swag_predict() -> Tensor:
        return swag.predict_loader(
            model,
            test,
            n_samples=args.swag_samples,
            scale=0.5,
            diag_only=swag_diag_only(swag),
            bn_loader=bn_loader,
            generator=torch.Generator(data.x_train.device).manual_seed(seed),  # reproducible samples
        )

    out = {"sgd": lambda: predict(model, test)} if "sgd" in averagers.seconds else {}
    if ema is not None:
        out["ema"] = ema_predict
    if swa_model is not None:
        out["swa"] = swa_predict
    if swag is not None:
        out["swag"] = swag_predict
    if fge is not None:
        out["fge"] = lambda: fge.predict_loader(model, test)
    return out


def swag_diag_only(swag: swa_fast.SWAG) -> bool:
    """The low-rank part needs two collected models; a very short budget gets SWAG-Diagonal."""
    return swag.rank < 2


def evaluate(model: nn.Module, averagers: Averagers, data: Data, args, seed: int, train_s: float) -> dict:
    """Test scores and seconds of every method that rode on the run, and the scores of the run's
    last iterate: an averaging method's gain over it is what averaging itself brings, apart from
    the run's learning-rate schedule."""
    test = Batches(data.x_test, data.y_test, 512)
    last_iterate = scores(predict(model, test), data.y_test)
    out: dict = {}
    for method, probabilities in predictors(model, averagers, test, data, args, seed).items():
        start = time.perf_counter()
        probs = probabilities()
        synchronize(data)
        out[method] = {
            **scores(probs, data.y_test),
            "train_s": train_s,
            "averaging_s": averagers.seconds.get(method, 0.0),
            "predict_s": time.perf_counter() - start,
            "last_iterate_acc": last_iterate["acc"],
            "last_iterate_nll": last_iterate["nll"],
        }
    if averagers.swag is not None:
        out["swag"].update(rank=averagers.swag.rank, diag_only=swag_diag_only(averagers.swag))
    if averagers.fge is not None:
        out["fge"]["snapshots"] = len(averagers.fge)
    return out


def train_run(run: str, methods: set[str], data: Data, args, seed: int, progress: Progress) -> dict:
    """One training run; returns, per method that rides on it, its test scores and times,
    and the final models needed for the line plot."""
    torch.manual_seed(seed)  # the same initial weights for every run of this seed
    channels, size = data.x_train.shape[1], data.x_train.shape[2]
    model = make_cnn(channels, size, data.num_classes, args.width).to(data.x_train.device)
    train = Batches(data.x_train, data.y_train, args.batch_size, seed=seed, augment=data.augment)
    optimizer = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9, weight_decay=args.wd)
    rate = LearningRate(run, optimizer, args, per_epoch=len(train))
    averagers = Averagers(run, methods, model, data, args)

    loop_start = time.perf_counter()
    for epoch in range(args.epochs):
        train_epoch(model, optimizer, train, rate, averagers, epoch)
        progress.step(f"seed {seed} {run} epoch {epoch + 1}/{args.epochs}")
    synchronize(data)
    averaging = sum(averagers.seconds.values())
    train_s = time.perf_counter() - loop_start - averaging  # the training loop, averaging calls excluded

    out = evaluate(model, averagers, data, args, seed, train_s)
    swa_model = averagers.swa_model
    out["models"] = {"final": model, "swa": swa_model.module if swa_model is not None else None}
    return out


# --- the line through SGD and SWA -----------------------------------------------------------------


@torch.no_grad()
def line_through(w_sgd: nn.Module, w_swa: nn.Module, data: Data, args, ts: np.ndarray) -> dict:
    """Train loss and test error at w(t) = w_sgd + t (w_swa - w_sgd), each point with its own
    BatchNorm statistics (update_bn, over the same batches as the SWA model's), as in Izmailov et
    al. 2018, figure 5. The train loss is the plain cross-entropy (no weight-decay term), in eval
    mode."""
    probe = copy.deepcopy(w_sgd)
    train = Batches(data.x_train, data.y_train, args.batch_size)
    test = Batches(data.x_test, data.y_test, 512)
    loss, error = [], []
    for t in ts:
        for p, a, b in zip(probe.parameters(), w_sgd.parameters(), w_swa.parameters()):
            p.copy_(a + float(t) * (b - a))
        update_bn(train, probe)
        probs = predict(probe, train)
        loss.append(-probs.gather(1, data.y_train[:, None]).clamp_min(1e-300).log().mean().item())
        error.append(1.0 - scores(predict(probe, test), data.y_test)["acc"])
    gap = torch.cat([(b - a).flatten() for a, b in zip(w_sgd.parameters(), w_swa.parameters())])
    return {
        "t": [float(t) for t in ts],
        "distance": gap.norm().item(),
        "train_loss": loss,
        "test_error": error,
    }


# --- reporting ----------------------------------------------------------------------------------


def paired_with_sgd(results: dict[str, list[dict]], method: str, key: str) -> np.ndarray:
    """Per seed, `method`'s score minus SGD's. Paired by seed (same initial weights and batches):
    the seed-to-seed spread, often larger than the differences between methods, cancels out."""
    return np.array([r[key] - base[key] for r, base in zip(results[method], results["sgd"])])


def summarise(results: dict[str, list[dict]]) -> dict[str, dict[str, float]]:
    """Accuracy and NLL: mean and sample std over seeds. Seconds: the median over seeds, because
    on a shared machine one slow seed (another job running) would dominate a mean."""
    summary = {}
    for method, runs in results.items():
        row = {}
        for run in runs:
            run["total_s"] = run["train_s"] + run["averaging_s"] + run["predict_s"]
        for key in ("acc", "nll"):
            values = np.array([r[key] for r in runs])
            row[key] = float(values.mean())
            row[key + "_std"] = float(values.std(ddof=1)) if len(values) > 1 else 0.0
        for key in ("train_s", "averaging_s", "predict_s", "total_s"):
            row[key] = float(np.median([r[key] for r in runs]))
        if "sgd" in results:
            for key in ("acc", "nll"):
                diff = paired_with_sgd(results, method, key)
                row[key + "_vs_sgd"] = float(diff.mean())
                row[key + "_vs_sgd_std"] = float(diff.std(ddof=1)) if len(diff) > 1 else 0.0
        summary[method] = row
    return summary


def markdown_table(summary: dict, results: dict, data: Data, args) -> str:
    n = len(args.seeds)
    lines = [
        f"{data.describe()}; {args.epochs} epochs, seeds {', '.join(map(str, args.seeds))} "
        f"(accuracy, NLL: mean ± std over {n} seed{'s' * (n > 1)}; vs SGD: the same, of the per-seed "
        "difference; seconds: median over seeds of one seed's run)",
        "",
        "| method | test accuracy | vs SGD (points) | test NLL | vs SGD | train s | averaging s | predict s "
        "| total s |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for method, row in summary.items():
        label = LABELS[method] + {"ema": " (on the SGD run)", "swag": " (on the SWA run)"}.get(method, "")
        if method == "fge":
            label += f" ({results['fge'][0]['snapshots']} snapshots)"
        vs_acc = vs_nll = "-"
        if "acc_vs_sgd" in row and method != "sgd":
            vs_acc = f"{100 * row['acc_vs_sgd']:+.2f} ± {100 * row['acc_vs_sgd_std']:.2f}"
            vs_nll = f"{row['nll_vs_sgd']:+.4f} ± {row['nll_vs_sgd_std']:.4f}"
        lines.append(
            f"| {label} | {100 * row['acc']:.2f} ± {100 * row['acc_std']:.2f}% | {vs_acc} "
            f"| {row['nll']:.4f} ± {row['nll_std']:.4f} | {vs_nll} | {row['train_s']:.2f} "
            f"| {row['averaging_s']:.4f} | {row['predict_s']:.2f} | {row['total_s']:.2f} |"
        )
    return "\n".join(lines) + "\n"


def pyplot():
    """matplotlib's pyplot on the file-only backend: this runs without a display."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_accuracy(results: dict[str, list[dict]], path: Path, title: str) -> None:
    values = {
        m: {key: np.array([r[key] for r in runs]) for key in ("acc", "nll")} for m, runs in results.items()
    }
    for per_key in values.values():
        per_key["acc"] = per_key["acc"] * 100
    plot_seed_strips(
        values,
        {"acc": "test accuracy (%)", "nll": "test NLL"},
        spread=lambda v: v.std(ddof=1) if len(v) > 1 else 0.0,
        spread_name="mean ± std",
        colours=method_colours(results),
        path=path,
        title=title,
    )


def plot_vs_sgd(results: dict[str, list[dict]], path: Path, title: str) -> None:
    """Per seed, each method's test accuracy and NLL minus SGD's on that seed: the paired
    differences that the table's "vs SGD" columns summarise. Pairing removes the seed-to-seed
    spread that the accuracy plot shows, which can be larger than the differences."""
    values = {
        m: {"acc": 100 * paired_with_sgd(results, m, "acc"), "nll": paired_with_sgd(results, m, "nll")}
        for m in results
        if m != "sgd"
    }
    plot_seed_strips(
        values,
        {"acc": "test accuracy minus SGD's (points)", "nll": "test NLL minus SGD's"},
        spread=lambda v: 2 * v.std(ddof=1) / math.sqrt(len(v)) if len(v) > 1 else 0.0,
        spread_name="mean ± 2 standard errors",
        colours=method_colours(results),
        path=path,
        title=title,
        zero_line=True,
    )


def method_colours(results: dict[str, list[dict]]) -> dict[str, str]:
    """A method keeps its colour in every plot of a run."""
    return {m: f"C{i}" for i, m in enumerate(results)}


def plot_seed_strips(
    values: dict[str, dict[str, np.ndarray]],
    ylabels: dict[str, str],
    spread: Callable[[np.ndarray], float],
    spread_name: str,
    colours: dict[str, str],
    path: Path,
    title: str,
    zero_line: bool = False,
) -> None:
    """Accuracy and NLL side by side: per method a dot per seed, and beside them a diamond at the
    mean with an error bar of `spread`."""
    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    for ax, key in zip(axes, ("acc", "nll")):
        for i, (method, per_key) in enumerate(values.items()):
            v = per_key[key]
            ax.scatter(np.full(len(v), i), v, s=18, alpha=0.6, color=colours[method])
            ax.errorbar(i + 0.18, v.mean(), yerr=spread(v), fmt="D", color=colours[method], capsize=4)
        if zero_line:
            ax.axhline(0.0, color="k", lw=0.8)
        ax.set_xticks(range(len(values)), [LABELS[m] for m in values])
        ax.set_ylabel(ylabels[key])
        ax.grid(axis="y", alpha=0.3)
    axes[0].set_title(f"dots: seeds; diamond: {spread_name}")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_line(lines: dict[str, dict], path: Path, title: str) -> None:
    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, key, name in ((axes[0], "train_loss", "train loss"), (axes[1], "test_error", "test error (%)")):
        for i, (start, line) in enumerate(lines.items()):
            # x: signed distance from the SWA solution, so that lines of different lengths compare
            t = np.array(line["t"])
            x = (t - 1) * line["distance"]
            values = np.array(line[key]) * (100 if key == "test_error" else 1)
            ax.plot(
                x, values, "-", marker="os"[i % 2], ms=3, color=f"C{i}", label=f"from {start} (large marker)"
            )
            k0, k1 = int(np.argmin(np.abs(t))), int(np.argmin(np.abs(t - 1)))
            ax.plot(x[k0], values[k0], marker="os"[i % 2], ms=9, color=f"C{i}")
            ax.plot(x[k1], values[k1], "*", ms=14, color="k", label="SWA solution" if i == 0 else None)
        ax.set_xlabel("signed distance from the SWA solution (L2 norm of the weights)")
        ax.set_ylabel(name)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    losses = np.concatenate([line["train_loss"] for line in lines.values()])
    # Log for a loss spanning decades; a narrow range (noisy labels keep it near 1) reads better linear.
    if losses.max() > 5 * losses.min():
        axes[0].set_yscale("log")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# --- the command --------------------------------------------------------------------------------


def parser() -> argparse.ArgumentParser:
    """The command line's options, each with its help."""
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    p.add_argument(
        "--data",
        type=Path,
        help="a folder with train/<class>/*.png and test/<class>/*.png (CIFAR-10, say); default: digits",
    )
    p.add_argument("--epochs", type=int, default=40, help="training budget of every method")
    p.add_argument(
        "--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4], help="one run of every method per seed"
    )
    p.add_argument("--out", type=Path, default=Path("digits_results"), help="folder for the results")
    p.add_argument(
        "--methods", default=",".join(METHODS), help="comma-separated subset of " + ",".join(METHODS)
    )
    p.add_argument("--subsample", type=int, help="keep only this many images (a quick try)")
    p.add_argument(
        "--label-noise",
        type=float,
        default=0.0,
        help="fraction of the training labels changed to another class (the same for every seed)",
    )
    p.add_argument("--batch-size", type=int, default=64, help="images per SGD step")
    p.add_argument("--width", type=int, default=32, help="channels of the CNN's first stage")
    p.add_argument("--lr", type=float, default=0.1, help="SGD's learning rate (momentum 0.9)")
    p.add_argument("--wd", type=float, default=5e-4, help="weight decay")
    p.add_argument("--swa-start", type=float, default=0.75, help="fraction of the budget before SWA/FGE")
    p.add_argument("--swa-lr", type=float, default=0.05, help="SWA's held learning rate, FGE's peak")
    p.add_argument("--cycle", type=int, default=2, help="FGE cycle length in epochs")
    p.add_argument("--ema-decay", type=float, default=0.99, help="EMA decay per iteration")
    p.add_argument("--swag-rank", type=int, default=20, help="SWAG's deviation rows (max_rank)")
    p.add_argument("--swag-samples", type=int, default=30, help="models SWAG samples for its predictions")
    p.add_argument("--line-points", type=int, default=26, help="points on the line t in [-0.5, 2]")
    p.add_argument("--threads", type=int, help="torch.set_num_threads")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="where to train")
    return p


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = parser()
    args = p.parse_args(argv)
    asked = set(args.methods.split(","))
    if not asked or asked - set(METHODS):
        p.error(f"--methods: {sorted(asked - set(METHODS))} unknown; pick from {','.join(METHODS)}")
    args.methods = [m for m in METHODS if m in asked]
    if not 0.0 <= args.label_noise <= 1.0:
        p.error(f"--label-noise must be a fraction in [0, 1], not {args.label_noise}")
    if args.epochs < 2:
        p.error("--epochs must be at least 2 (SWA and FGE need a phase after the first)")
    return args


def train_all(data: Data, args) -> tuple[dict[str, list[dict]], dict | None]:
    """Every run of every seed. Returns per method its results seed by seed, and the lines of the
    paper's picture for the first seed that has an SWA solution."""
    methods = set(args.methods)
    runs = [r for r in ("sgd", "swa", "fge") if any(RUN_OF[m] == r for m in methods)]
    results: dict[str, list[dict]] = {m: [] for m in args.methods}
    line = None
    progress = Progress(len(args.seeds) * len(runs) * args.epochs)
    try:
        for seed in args.seeds:
            finals = {}
            for run in runs:
                out = train_run(run, {m for m in methods if RUN_OF[m] == run}, data, args, seed, progress)
                for m in methods:
                    if m in out:
                        results[m].append({"seed": seed, **out[m]})
                finals[run] = out["models"]
            if line is None and finals.get("swa", {}).get("swa") is not None:
                line = lines_to_swa(finals, data, args)
    finally:
        progress.close()
    return results, line


def lines_to_swa(finals: dict[str, dict], data: Data, args) -> dict[str, dict]:
    """The paper's picture, from two SGD solutions to the SWA one: the SGD run's (same initial
    weights and batches) and the last iterate of the SWA run itself (the point SWA's average ends
    at)."""
    ts = np.linspace(-0.5, 2.0, args.line_points)
    w_swa = finals["swa"]["swa"]
    starts = {"SGD run's solution": finals.get("sgd", {}).get("final")}
    starts["SWA run's last SGD iterate"] = finals["swa"]["final"]
    return {k: line_through(w, w_swa, data, args, ts) for k, w in starts.items() if w is not None}


def write_outputs(results: dict[str, list[dict]], line: dict | None, data: Data, args) -> dict:
    """The table, the plots and the JSON report in --out; returns the report."""
    summary = summarise(results)
    args.out.mkdir(parents=True, exist_ok=True)
    table = markdown_table(summary, results, data, args)
    files = {"table": args.out / f"{data.name}_results.md", "json": args.out / f"{data.name}_results.json"}
    files["table"].write_text(table)
    title = f"{data.describe()}, {args.epochs} epochs, {len(args.seeds)} seed(s)"
    files["accuracy_plot"] = args.out / f"{data.name}_accuracy.png"
    plot_accuracy(results, files["accuracy_plot"], title)
    if "sgd" in results and len(results) > 1:
        files["vs_sgd_plot"] = args.out / f"{data.name}_vs_sgd.png"
        plot_vs_sgd(results, files["vs_sgd_plot"], title)
    if line is not None:
        files["line_plot"] = args.out / f"{data.name}_line.png"
        title = f"{data.name}, seed {args.seeds[0]}: w_SGD + t (w_SWA - w_SGD), t in [-0.5, 2]"
        plot_line(line, files["line_plot"], title)
    report = {
        "data": data.describe(),
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "device": args.device,
        "summary": summary,
        "runs": results,
        "line": line,
        "files": {k: str(v) for k, v in files.items()},
    }
    files["json"].write_text(json.dumps(report, indent=1))
    print(table)
    return report


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    data = load_image_folder(args.data, args.subsample) if args.data else load_digits_data(args.subsample)
    if args.label_noise:
        data.flip_train_labels(args.label_noise)
    data.to(torch.device(args.device))  # the whole data set lives on the device: no loader needed
    print(data.describe(), file=sys.stderr)
    results, line = train_all(data, args)
    return write_outputs(results, line, data, args)


if __name__ == "__main__":
    main()
