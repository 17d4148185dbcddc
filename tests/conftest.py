"""Shared test set-up. TRITON_INTERPRET must be set before anything imports Triton, so that the
Triton kernels run on CPU tensors through the interpreter."""

import os
from collections import OrderedDict

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

# The two-process fixtures of the distributed tests, found here by pytest.
from two_ranks import on_two_ranks, pool  # noqa: E402, F401

import swa_fast  # noqa: E402
from swa_fast import ops  # noqa: E402
from swa_fast.ops import reference  # noqa: E402

FLOATS = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
LOW_PRECISION = (torch.float16, torch.bfloat16)
# From swa_fast's op table: how many lists each op writes (the first ones), whether it takes a weight.
WRITTEN = {name: spec.written for name, spec in ops.OP_TABLE.items()}
WEIGHTED = {name: spec.weighted for name, spec in ops.OP_TABLE.items()}
OPS = tuple(ops.OP_TABLE)
# The weights of make_case's calls: one weight, or one per list (two lists of averages).
WEIGHT = 0.3
PER_LIST_WEIGHTS = (0.3, 0.7)


def cnn_with_bn(image_side: int, in_channels: int = 1, filters: int = 4, classes: int = 3) -> torch.nn.Module:
    """A small CNN with BatchNorm (and so an integer buffer) for square images, seeded."""
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Conv2d(in_channels, filters, 3),
        torch.nn.BatchNorm2d(filters),
        torch.nn.ReLU(),
        torch.nn.Flatten(),
        torch.nn.Linear(filters * (image_side - 2) ** 2, classes),
    )


def mlp(*widths: int, batch_norm=False, activation=None, seed: int | None = 0, dtype=torch.float32):
    """Linear layers from widths[0] inputs to widths[-1] outputs; each hidden layer followed by
    BatchNorm1d (batch_norm=True) then `activation` (a module class). Seeded, unless seed=None: then
    the weights are the global generator's next draws."""
    if seed is not None:
        torch.manual_seed(seed)
    layers = []
    for i, (n_in, n_out) in enumerate(zip(widths[:-1], widths[1:])):
        layers.append(torch.nn.Linear(n_in, n_out))
        if i < len(widths) - 2:
            layers += [torch.nn.BatchNorm1d(n_out)] if batch_norm else []
            layers += [activation()] if activation is not None else []
    return torch.nn.Sequential(*layers).to(dtype)


def fc_linear(features: int = 4) -> torch.nn.Module:
    """One seeded Linear(features, features) named `fc`: mlp(features, features)'s shapes and
    values under other names."""
    torch.manual_seed(0)
    return torch.nn.Sequential(OrderedDict(fc=torch.nn.Linear(features, features)))


class BF16WithFP32Norm(torch.nn.Module):
    """bf16 linear layers around an fp32 LayerNorm, as mixed-precision training keeps its norms:
    with dtype=None a manager keeps two flat groups (bf16 and fp32). Seeded."""

    def __init__(self, features: int = 3, outputs: int = 2, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.inner = torch.nn.Linear(features, features).to(torch.bfloat16)
        self.norm = torch.nn.LayerNorm(features)
        self.head = torch.nn.Linear(features, outputs).to(torch.bfloat16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        hidden = self.norm(self.inner(x.to(torch.bfloat16)).float())
        return self.head(hidden.to(torch.bfloat16)).float()


def perturb_(model: torch.nn.Module, seed: int, input_shape=None) -> None:
    """A training step's worth of change, reproducible from `seed`: a random step added to every
    parameter and, given `input_shape`, a forward pass in train mode on a random batch of that shape
    (which moves the BatchNorm statistics)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g).to(p.dtype))
        if input_shape is not None:
            model.train()
            model(torch.randn(input_shape, generator=g).to(next(model.parameters()).dtype))


def random_batch(rows: int, input_shape, *, classes=None, outputs=1, seed=0, generator=None, device="cpu"):
    """(inputs, targets): `rows` random inputs of `input_shape`, with class labels below `classes`,
    or without classes `outputs` real targets per row. Drawn from `generator`, else from a new one
    seeded with `seed`."""
    g = torch.Generator().manual_seed(seed) if generator is None else generator
    x = torch.randn(rows, *input_shape, generator=g, device=device)
    if classes is not None:
        return x, torch.randint(0, classes, (rows,), generator=g, device=device)
    return x, torch.randn(rows, outputs, generator=g, device=device)


def train_step(model: torch.nn.Module, optimizer, x, y) -> None:
    """One optimizer step on (x, y) in train mode: cross-entropy for class labels, mean squared
    error for real targets."""
    model.train()
    optimizer.zero_grad()
    loss = torch.nn.functional.mse_loss if y.is_floating_point() else torch.nn.functional.cross_entropy
    loss(model(x), y).backward()
    optimizer.step()


def weights(model: torch.nn.Module, buffers: bool = True) -> list[torch.Tensor]:
    """Copies of the parameters (then the buffers), in nn.Module order."""
    return [t.detach().clone() for t in [*model.parameters(), *(model.buffers() if buffers else ())]]


def state_copy(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """A copy of the model's state_dict."""
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_same_manager(got, expected, step) -> None:
    """Two managers hold the same average bit for bit and the same counts (`step` names the moment)."""
    state, want = got.state_dict(), expected.state_dict()
    for name in want["average"]:
        assert torch.equal(state["average"][name], want["average"][name]), (step, name)
    for key in ("n_averaged", "n_skipped", "calls", "updates"):
        assert int(state[key]) == int(want[key]), (step, key, state[key], want[key])


def integer_copy_case(dtype: torch.dtype, device="cpu", seed: int = 0) -> tuple[list, list]:
    """(dst, src) for copy_ of integer or bool tensors of `dtype`: random bits (every bit pattern is a
    value: the extremes, the sign bit), a 0-dim tensor (num_batches_tracked), sizes around the
    backends' chunks, a source that starts one element in (not 16-byte aligned)."""
    g = torch.Generator().manual_seed(seed)

    def values(n: int) -> torch.Tensor:
        if dtype == torch.bool:
            return torch.randint(0, 2, (n,), generator=g) == 1
        return torch.randint(0, 256, (n * dtype.itemsize,), dtype=torch.uint8, generator=g).view(dtype)

    sizes = [1, 7, 4097, 16385, 65537]
    src = [values(1).reshape(())] + [values(n) for n in sizes[:-1]] + [values(sizes[-1] + 1)[1:]]
    dst = [values(s.numel()).reshape(s.shape) for s in src]
    return [d.to(device) for d in dst], [s.to(device) for s in src]


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether two tensors of one dtype hold the same bytes (torch.equal lacks the uint32/uint64 kernels)."""
    return a.dtype == b.dtype and torch.equal(
        a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8)
    )


def cpu_backends() -> list[str]:
    """Every backend that can run CPU tensors here, bar the reference (the oracle)."""
    return ops.usable_backends("cpu")


def cuda_backends() -> list[str]:
    return ops.usable_backends("cuda")


def make_case(op: str, shapes, dst_dtype, src_dtype, seed: int = 0, device="cpu"):
    """The op's tensor lists (random values, reproducible) and its extra arguments, from its row in
    the op table: the lists it writes (and those read in their dtype) in dst_dtype, those it only
    reads in src_dtype, a list per weight twice (two averages, concatenated as the op takes them),
    1-D weights PER_LIST_WEIGHTS (multi_lerp_'s two, bema_'s pair), a single weight WEIGHT."""
    spec = ops.OP_TABLE[op]
    g = torch.Generator().manual_seed(seed)

    def rand(dtype):
        return [
            torch.randn(s, generator=g, dtype=torch.float64).to(device=device, dtype=dtype) for s in shapes
        ]

    lists = []
    for param in spec.params:
        dtype = dst_dtype if param.written or param.same_dtype else src_dtype  # (bema_'s start)
        copies = len(PER_LIST_WEIGHTS) if param.per_weight else 1
        lists.append([t for _ in range(copies) for t in rand(dtype)])
    if spec.weight is None:
        return lists, ()
    return lists, (PER_LIST_WEIGHTS if spec.weight_name == "weights" else WEIGHT,)  # 1-D: two


def clone_lists(lists, dtype=None):
    return [[t.clone() if dtype is None else t.to(dtype) for t in lst] for lst in lists]


def assert_matches_reference(op: str, lists_before, lists_after, extra) -> None:
    """Compare an op's result with reference.py run on the same inputs.

    fp32/fp64 destinations: within 1e-6 relative (1e-12 for fp64). bf16/fp16: the error against an
    fp64 computation is at most twice the error of the reference (PyTorch's own ops), with a floor
    of half an ulp of the largest value (a correctly rounded result may differ from another one).
    copy_ and swap_ are exact.
    """
    expected = clone_lists(lists_before)
    getattr(reference, op)(*expected, *extra)
    exact64 = clone_lists(lists_before, torch.float64)
    getattr(reference, op)(*exact64, *extra)
    for k in range(WRITTEN[op]):
        for i, (got, want, want64) in enumerate(zip(lists_after[k], expected[k], exact64[k])):
            where = f"{op} list {k} tensor {i} ({got.dtype}, shape {tuple(got.shape)})"
            assert got.dtype == want.dtype and got.shape == want.shape, where
            if not WEIGHTED[op]:  # copies and swaps are exact
                assert torch.equal(got, want), where
            elif got.dtype in LOW_PRECISION:
                if got.numel() == 0:
                    continue
                ours = (got.double() - want64).abs().max().item()
                torch_err = (want.double() - want64).abs().max().item()
                half_ulp = torch.finfo(got.dtype).eps / 2 * want64.abs().max().item()
                assert ours <= 2 * max(torch_err, half_ulp), f"{where}: error {ours} vs torch {torch_err}"
            else:
                tol = 1e-12 if got.dtype == torch.float64 else 1e-6
                torch.testing.assert_close(got, want, rtol=tol, atol=tol, msg=lambda m, w=where: f"{w}: {m}")


def run_and_check(op: str, backend: str, shapes, dst_dtype, src_dtype, seed: int = 0, device="cpu") -> None:
    lists, extra = make_case(op, shapes, dst_dtype, src_dtype, seed, device)
    before = clone_lists(lists)
    getattr(swa_fast, op)(*lists, *extra, backend=backend)
    assert_matches_reference(op, before, lists, extra)


@pytest.fixture(params=cpu_backends())
def backend(request):
    return request.param


@pytest.fixture(params=ops.usable_backends("cpu", reference=True))
def any_backend(request):
    """Every backend that can run CPU tensors here, the reference included."""
    return request.param
