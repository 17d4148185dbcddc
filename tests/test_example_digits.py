"""examples/digits.py end to end at a tiny budget: every method runs, the outputs are written and
sane. Accuracy gains are not asserted (a few epochs on a subsample prove nothing about them)."""

import importlib.util
import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "digits.py"
METHODS = ("sgd", "swa", "fge", "swag", "ema")


@pytest.fixture(scope="module")
def digits():
    spec = importlib.util.spec_from_file_location("digits_example", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def check_outputs(report: dict, out: Path, name: str, seeds: int) -> None:
    check_files(report, out, name)
    saved = json.loads((out / f"{name}_results.json").read_text())
    assert set(saved["summary"]) == set(METHODS)
    table = (out / f"{name}_results.md").read_text()
    for label in ("SGD", "SWA", "FGE", "SWAG", "EMA"):
        assert f"| {label}" in table
    check_runs(saved["runs"], seeds)
    check_last_iterates(saved["runs"])
    for method in METHODS:  # paired differences with SGD, seed by seed
        row = saved["summary"][method]
        assert math.isfinite(row["acc_vs_sgd"]) and math.isfinite(row["nll_vs_sgd"])
    assert saved["summary"]["sgd"]["acc_vs_sgd"] == 0.0
    check_lines(saved["line"])


def check_files(report: dict, out: Path, name: str) -> None:
    for key in ("table", "json", "accuracy_plot", "vs_sgd_plot", "line_plot"):
        path = Path(report["files"][key])
        assert path.parent == out and path.name.startswith(name) and path.stat().st_size > 0, key
    for key in ("accuracy_plot", "vs_sgd_plot", "line_plot"):
        assert Path(report["files"][key]).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def check_runs(runs: dict, seeds: int) -> None:
    for method in METHODS:
        assert len(runs[method]) == seeds
        for run in runs[method]:
            assert 0.0 <= run["acc"] <= 1.0
            assert math.isfinite(run["nll"]) and run["nll"] >= 0.0
            assert run["train_s"] > 0 and run["averaging_s"] >= 0 and run["predict_s"] > 0
    for method in ("swa", "fge", "swag", "ema"):  # the averaging calls were timed
        assert all(r["averaging_s"] > 0 for r in runs[method])
    assert all(r["snapshots"] >= 1 for r in runs["fge"])


def check_last_iterates(runs: dict) -> None:
    """The last iterate of each run is scored too; on the SGD run it is SGD's model."""
    for sgd, ema in zip(runs["sgd"], runs["ema"]):
        assert sgd["last_iterate_acc"] == sgd["acc"] == ema["last_iterate_acc"]
        assert sgd["last_iterate_nll"] == sgd["nll"]
    for swa, swag in zip(runs["swa"], runs["swag"]):
        assert 0.0 <= swa["last_iterate_acc"] <= 1.0 and swa["last_iterate_nll"] == swag["last_iterate_nll"]


def check_lines(lines: dict) -> None:
    for line in lines.values():
        assert len(line["t"]) == len(line["train_loss"]) == len(line["test_error"])
        assert all(math.isfinite(v) for v in line["train_loss"])
        assert all(0.0 <= v <= 1.0 for v in line["test_error"])


def test_digits_end_to_end(digits, tmp_path):
    # 4 epochs with SWA from the middle: two collected models, so SWAG's low-rank part is used.
    argv = ["--epochs", "4", "--seeds", "0", "1", "--subsample", "300", "--swa-start", "0.5"]
    argv += ["--swag-samples", "3", "--line-points", "4", "--width", "8", "--out", str(tmp_path)]
    report = digits.main([*argv, "--device", "cpu"])
    check_outputs(report, tmp_path, "digits", seeds=2)
    assert "1x8x8" in report["data"]
    assert all(not r["diag_only"] and r["rank"] == 2 for r in report["runs"]["swag"])
    # Both lines of the paper's picture: from the SGD run's solution and from the SWA run's iterate.
    assert len(report["line"]) == 2


def write_fake_folder(root: Path, classes=("cat", "dog", "ship"), per_split=None) -> None:
    from PIL import Image

    rng = np.random.default_rng(0)
    for split, count in (per_split or {"train": 6, "test": 2}).items():
        for k, name in enumerate(classes):
            folder = root / split / name
            folder.mkdir(parents=True)
            for i in range(count):
                pixels = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
                pixels[..., k] = 255  # a colour per class, so there is something to learn
                Image.fromarray(pixels).save(folder / f"{i}.png")


def test_image_folder_without_torchvision(digits, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "torchvision", None)  # any import of it would fail
    data_dir = tmp_path / "fake_cifar"
    write_fake_folder(data_dir)
    out = tmp_path / "out"
    argv = ["--data", str(data_dir), "--epochs", "2", "--seeds", "0", "--batch-size", "6", "--width", "4"]
    argv += ["--swag-samples", "2", "--line-points", "3", "--out", str(out), "--device", "cpu"]
    report = digits.main(argv)
    check_outputs(report, out, "fake_cifar", seeds=1)
    assert report["data"].startswith("fake_cifar: 18 train / 6 test images, 3x32x32")
    # One collected model in a 2-epoch budget: SWAG falls back to its diagonal part.
    assert report["runs"]["swag"][0]["diag_only"]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_digits_on_cuda(digits, tmp_path):
    # The image-folder path too: its augmentation draws on the CPU for CUDA batches.
    data_dir = tmp_path / "fake_cifar"
    write_fake_folder(data_dir)
    argv = ["--data", str(data_dir), "--epochs", "4", "--seeds", "0", "--batch-size", "6", "--width", "4"]
    argv += [
        "--swa-start",
        "0.5",
        "--swag-samples",
        "2",
        "--line-points",
        "3",
        "--out",
        str(tmp_path / "out"),
    ]
    report = digits.main([*argv, "--device", "cuda"])
    check_outputs(report, tmp_path / "out", "fake_cifar", seeds=1)
    assert report["device"] == "cuda"


def test_cnn_adapts_to_the_input(digits):
    for channels, size, stages in ((1, 8, 1), (3, 32, 3)):
        model = digits.make_cnn(channels, size, num_classes=7, width=4)
        assert model(torch.zeros(2, channels, size, size)).shape == (2, 7)
        assert sum(isinstance(m, torch.nn.MaxPool2d) for m in model) == stages


def test_bad_folder_is_refused(digits, tmp_path):
    with pytest.raises(SystemExit, match="train/<class>"):
        digits.load_image_folder(tmp_path)


def test_label_noise_flips_an_exact_fraction(digits):
    clean = digits.load_digits_data()
    noisy = digits.load_digits_data().flip_train_labels(0.3)
    changed = noisy.y_train != clean.y_train
    assert changed.sum().item() == round(0.3 * len(clean.y_train))  # each pick moves to another class
    assert noisy.y_train.min() >= 0 and noisy.y_train.max() < clean.num_classes
    assert torch.equal(noisy.y_test, clean.y_test) and torch.equal(noisy.x_train, clean.x_train)
    assert "30% of their labels flipped" in noisy.describe()


def test_label_noise_goes_to_every_other_class(digits):
    # All labels 0 and every one flipped: the new labels spread over classes 1-9, none stays 0.
    y = torch.zeros(9000, dtype=torch.long)
    noisy = digits.flip_labels(y, 1.0, num_classes=10)
    counts = torch.bincount(noisy, minlength=10)
    assert counts[0] == 0
    assert counts[1:].min() > 850 and counts[1:].max() < 1150  # 1000 each expected; ~3 std of room


def test_label_noise_depends_on_its_seed_only(digits):
    y = digits.load_digits_data().y_train
    torch.manual_seed(1)  # the training seed must not matter
    first = digits.flip_labels(y, 0.2, num_classes=10)
    torch.manual_seed(2)
    assert torch.equal(digits.flip_labels(y, 0.2, num_classes=10), first)
    assert not torch.equal(digits.flip_labels(y, 0.2, num_classes=10, seed=1), first)
    assert torch.equal(digits.flip_labels(y, 0.0, num_classes=10), y)


def test_label_noise_option_reaches_training(digits, tmp_path, monkeypatch):
    trained_on = []
    train_all = digits.train_all

    def spy(data, args):
        trained_on.append((data.y_train.clone(), data.y_test.clone()))
        return train_all(data, args)

    monkeypatch.setattr(digits, "train_all", spy)
    argv = ["--epochs", "2", "--seeds", "0", "--subsample", "200", "--methods", "sgd,ema", "--width", "4"]
    report = digits.main([*argv, "--label-noise", "0.25", "--out", str(tmp_path), "--device", "cpu"])
    clean = digits.load_digits_data(subsample=200)
    ((y_train, y_test),) = trained_on
    assert torch.equal(y_train, digits.flip_labels(clean.y_train, 0.25, clean.num_classes))
    assert (y_train != clean.y_train).sum().item() == round(0.25 * len(y_train))
    assert torch.equal(y_test, clean.y_test)
    assert report["args"]["label_noise"] == 0.25
    assert "25% of their labels flipped" in report["data"]
    with pytest.raises(SystemExit):
        digits.parse_args(["--label-noise", "1.5"])


def test_every_option_has_help(digits):
    parser = digits.parser()
    missing = [a.option_strings for a in parser._actions if a.option_strings and not a.help]
    assert not missing, missing
    assert "(default:" in parser.format_help()  # the defaults shown beside the help
