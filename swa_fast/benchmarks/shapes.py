"""Parameter-shape sets of real architectures, written out from their definitions (no model zoo
download), plus many tiny tensors. tests/test_shapes.py checks the totals against the published
parameter counts."""

from __future__ import annotations


def resnet50() -> list[tuple[int, ...]]:
    """torchvision's ResNet-50: parameters, then BatchNorm running statistics (what use_buffers=True
    averages too)."""
    params, stats = [], []

    def conv(out_c, in_c, k):
        params.append((out_c, in_c, k, k))

    def bn(c):
        params.extend([(c,), (c,)])
        stats.extend([(c,), (c,)])

    conv(64, 3, 7)
    bn(64)
    in_c = 64
    for width, blocks in zip((64, 128, 256, 512), (3, 4, 6, 3)):
        for b in range(blocks):
            conv(width, in_c, 1)
            bn(width)
            conv(width, width, 3)
            bn(width)
            conv(width * 4, width, 1)
            bn(width * 4)
            if b == 0:  # downsample branch
                conv(width * 4, in_c, 1)
                bn(width * 4)
            in_c = width * 4
    params.extend([(1000, 2048), (1000,)])
    return params + stats


def gpt2_small() -> list[tuple[int, ...]]:
    """GPT-2 small (124M) as in Hugging Face's GPT2Model: tied embeddings, Conv1D weights."""
    d, vocab, ctx = 768, 50257, 1024
    shapes = [(vocab, d), (ctx, d)]
    for _ in range(12):
        shapes += [
            (d,),
            (d,),
            (d, 3 * d),
            (3 * d,),
            (d, d),
            (d,),
            (d,),
            (d,),
            (d, 4 * d),
            (4 * d,),
            (4 * d, d),
            (d,),
        ]
    return shapes + [(d,), (d,)]


def vit_b16() -> list[tuple[int, ...]]:
    """ViT-B/16 at 224x224 with a 1000-class head, as in torchvision's vit_b_16."""
    d = 768
    shapes = [(1, 1, d), (d, 3, 16, 16), (d,), (1, 197, d)]
    for _ in range(12):
        shapes += [
            (d,),
            (d,),
            (3 * d, d),
            (3 * d,),
            (d, d),
            (d,),
            (d,),
            (d,),
            (4 * d, d),
            (4 * d,),
            (d, 4 * d),
            (d,),
        ]
    return shapes + [(d,), (d,), (1000, d), (1000,)]


def tiny(n: int = 1000) -> list[tuple[int, ...]]:
    """n small tensors (64 to 511 elements): biases, norms, embeddings of a many-layer model."""
    return [(64 + (i * 37) % 448,) for i in range(n)]


SHAPE_SETS = {"resnet50": resnet50, "gpt2-small": gpt2_small, "vit-b16": vit_b16, "tiny-1000": tiny}


def numel(shapes: list[tuple[int, ...]]) -> int:
    total = 0
    for s in shapes:
        n = 1
        for d in s:
            n *= d
        total += n
    return total
