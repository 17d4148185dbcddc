"""The benchmark shape sets add up to the architectures' published parameter counts."""

from swa_fast.benchmarks.shapes import gpt2_small, numel, resnet50, tiny, vit_b16


def test_parameter_counts():
    resnet_stats = 2 * (
        64
        + 3 * (64 + 64 + 256)
        + 256
        + 4 * (128 + 128 + 512)
        + 512
        + 6 * (256 + 256 + 1024)
        + 1024
        + 3 * (512 + 512 + 2048)
        + 2048
    )
    assert numel(resnet50()) - resnet_stats == 25_557_032  # torchvision resnet50
    assert numel(gpt2_small()) == 124_439_808  # Hugging Face gpt2
    assert numel(vit_b16()) == 86_567_656  # torchvision vit_b_16
    assert len(tiny()) == 1000
