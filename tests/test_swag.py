"""SWAG: moments and deviations against the closed form, samples with the mean and covariance the
moments say, Bayesian model averaging, state_dict round trips and clear errors."""

import io

import pytest
import torch
from conftest import BF16WithFP32Norm, mlp, state_copy

import swa_fast


def collect(model, swag, n, seed=0):
    """Give the model `n` random weight vectors, updating `swag` after each; return them (flat)."""
    g = torch.Generator().manual_seed(seed)
    seen = []
    for _ in range(n):
        with torch.no_grad():
            for p in model.parameters():
                p.copy_(torch.randn(p.shape, generator=g).to(p.dtype) * 2 + 1)
        seen.append(torch.cat([p.detach().double().flatten() for p in model.parameters()]))
        swag.update(model)
    return torch.stack(seen)


def flat(tensors):
    return torch.cat([t.detach().double().flatten() for t in tensors])


def deviation_rows(swag, k):
    """Group k's deviation rows as its views lay them out, without the flat buffer's padding."""
    group = swag.average.groups[k]
    return torch.stack([flat(swag.average.views_of(group, row)) for row in swag.deviations[k]])


def test_moments_and_deviation_ring_match_the_closed_form():
    model = torch.nn.Linear(5, 3)
    swag = swa_fast.SWAG(model, max_rank=4)
    seen = collect(model, swag, 7)
    mean, sq = seen.mean(0), (seen**2).mean(0)
    torch.testing.assert_close(flat(swag.average.views), mean, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(flat(swag.sq.views), sq, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(flat(swag.variance()), (sq - mean**2).clamp_min(1e-30), rtol=1e-4, atol=1e-5)
    assert swag.rank == 4 and swag.n_averaged.item() == 7
    # Row (i mod 4) holds model i minus the running mean after update i; the ring kept i = 3..6.
    running = torch.cumsum(seen, 0) / torch.arange(1, 8, dtype=torch.float64)[:, None]
    for i in range(3, 7):
        row = deviation_rows(swag, 0)[i % 4]
        torch.testing.assert_close(row, seen[i] - running[i], rtol=1e-5, atol=1e-5)


def test_bf16_model_keeps_fp32_moments():
    model = torch.nn.Linear(4, 4).to(torch.bfloat16)
    swag = swa_fast.SWAG(model, max_rank=2)
    seen = collect(model, swag, 5)
    assert swag.average.views[0].dtype == torch.float32 and swag.deviations[0].dtype == torch.float32
    torch.testing.assert_close(flat(swag.average.views), seen.mean(0), rtol=1e-6, atol=1e-6)


def expected_covariance(swag, scale):
    diag = torch.diag(flat(swag.variance()))
    rows = deviation_rows(swag, 0)[: swag.rank]
    return scale * (diag + rows.t() @ rows / (swag.rank - 1))


@pytest.mark.parametrize("diag_only", [True, False])
def test_samples_have_the_mean_and_covariance_of_the_moments(diag_only):
    model = torch.nn.Linear(2, 2)  # 6 weights: the whole covariance matrix is checked
    swag = swa_fast.SWAG(model, max_rank=3)
    collect(model, swag, 6)
    scale = 0.5
    cov = scale * torch.diag(flat(swag.variance())) if diag_only else expected_covariance(swag, scale)
    g = torch.Generator().manual_seed(1234)
    n = 20000
    samples = torch.empty(n, 6, dtype=torch.float64)
    for s in range(n):
        swag.sample(model, scale=scale, diag_only=diag_only, generator=g)
        samples[s] = flat(model.parameters())
    mean = flat(swag.average.views)
    # The sample mean is within 5 standard errors of the SWA mean, for every weight.
    standard_error = (torch.diagonal(cov) / n).sqrt()
    assert ((samples.mean(0) - mean).abs() < 5 * standard_error).all()
    # The sample covariance is the SWAG covariance to within 5% (estimation error here is ~1%;
    # a missing sqrt(scale), a wrong 1/(K-1) or a dropped low-rank term is off by 20% or more).
    empirical = torch.cov(samples.t())
    assert torch.linalg.matrix_norm(empirical - cov) < 0.05 * torch.linalg.matrix_norm(cov)


def test_low_rank_term_changes_the_covariance():
    """Guard for the test above: with these moments the low-rank term is not negligible."""
    model = torch.nn.Linear(2, 2)
    swag = swa_fast.SWAG(model, max_rank=3)
    collect(model, swag, 6)
    full = expected_covariance(swag, 0.5)
    diag = 0.5 * torch.diag(flat(swag.variance()))
    assert torch.linalg.matrix_norm(full - diag) > 0.2 * torch.linalg.matrix_norm(full)


def test_predict_is_the_mean_over_samples_and_restores_the_model():
    model = mlp(4, 6, 3, batch_norm=True)
    swag = swa_fast.SWAG(model, max_rank=3)
    x = torch.randn(20, 4)
    for s in range(4):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn(p.shape) * 0.1)
        model.train()
        model(x + s)  # moves the BatchNorm statistics
        swag.update(model)
    live = state_copy(model)
    probs = swag.predict(model, x, n_samples=4, bn_loader=[x], generator=torch.Generator().manual_seed(5))
    for k, v in model.state_dict().items():
        assert torch.equal(v, live[k]), k
    assert model.training
    # The same samples by hand, with the same generator.
    g = torch.Generator().manual_seed(5)
    expected = []
    for _ in range(4):
        swag.sample(model, generator=g)
        swa_fast.update_bn([x], model)
        with torch.no_grad():
            expected.append(model.eval()(x).softmax(-1))
    torch.testing.assert_close(probs, torch.stack(expected).mean(0), rtol=1e-6, atol=1e-7)


def test_a_one_shot_bn_loader_raises_and_restores_the_model():
    model = mlp(4, 6, 3, batch_norm=True)
    swag = swa_fast.SWAG(model, max_rank=3)
    for _ in range(3):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn(p.shape) * 0.1)
        swag.update(model)
    live = state_copy(model)
    x = torch.randn(8, 4)
    one_shot = (batch for batch in [x])  # the second sample's BatchNorm pass would see nothing
    with pytest.raises(ValueError):
        swag.predict(model, x, n_samples=2, bn_loader=one_shot)
    for k, v in model.state_dict().items():
        assert torch.equal(v, live[k]), k


def test_state_dict_round_trip_then_identical_updates():
    model = torch.nn.Linear(3, 3)
    swag = swa_fast.SWAG(model, max_rank=3)
    collect(model, swag, 4)
    buffer = io.BytesIO()
    torch.save(swag.state_dict(), buffer)
    buffer.seek(0)
    resumed = swa_fast.SWAG(model, max_rank=3)
    resumed.load_state_dict(torch.load(buffer))
    collect(model, swag, 3, seed=1)
    collect(model, resumed, 3, seed=1)
    assert torch.equal(swag.average.groups[0].buffer, resumed.average.groups[0].buffer)
    assert torch.equal(swag.sq.groups[0].buffer, resumed.sq.groups[0].buffer)
    assert torch.equal(swag.deviations[0], resumed.deviations[0])
    assert swag.calls == resumed.calls == 7


def test_loading_a_state_of_another_rank_or_model_raises_and_changes_nothing():
    model = torch.nn.Linear(3, 3)
    swag = swa_fast.SWAG(model, max_rank=3)
    collect(model, swag, 2)
    before = swag.deviations[0].clone(), swag.sq.groups[0].buffer.clone()
    other_rank = swa_fast.SWAG(model, max_rank=2)
    collect(model, other_rank, 2, seed=3)
    with pytest.raises(ValueError, match="max_rank 3"):
        swag.load_state_dict(other_rank.state_dict())
    state = swa_fast.SWAG(model, max_rank=3).state_dict()
    state["deviation"]["weight"] = torch.zeros(3, 4, 4)
    with pytest.raises(ValueError, match="'weight' has shape"):
        swag.load_state_dict(state)
    assert torch.equal(swag.deviations[0], before[0]) and torch.equal(swag.sq.groups[0].buffer, before[1])


def test_sampling_needs_collected_models():
    model = torch.nn.Linear(2, 2)
    swag = swa_fast.SWAG(model, max_rank=3)
    with pytest.raises(ValueError, match="call update"):
        swag.sample(model)
    swag.update(model)
    with pytest.raises(ValueError, match="at least 2"):
        swag.sample(model)
    swag.sample(model, diag_only=True)  # the diagonal part needs one
    with pytest.raises(ValueError, match="n_samples"):
        swag.predict(model, torch.zeros(1, 2), n_samples=0)


def test_check_finite_is_refused():
    with pytest.raises(ValueError, match="check_finite"):
        swa_fast.SWAG(torch.nn.Linear(2, 2), check_finite=True)


def test_sampling_into_a_strided_parameter():
    model = torch.nn.Linear(3, 2)
    model.weight.data = model.weight.data.t().contiguous().t()  # a transposed view
    swag = swa_fast.SWAG(model, max_rank=3)
    collect(model, swag, 4)
    g = torch.Generator().manual_seed(0)
    swag.sample(model, generator=g)
    assert not model.weight.is_contiguous()
    contiguous = torch.nn.Linear(3, 2)
    swag.sample(contiguous, generator=torch.Generator().manual_seed(0))
    assert torch.equal(model.weight, contiguous.weight) and torch.equal(model.bias, contiguous.bias)


def test_two_dtype_groups_sample_with_the_low_rank_covariance_across_groups():
    """A bf16 model with an fp32 norm and dtype=None: two flat groups, one low-rank noise draw, so
    that weights of different groups covary as the deviations say."""
    model = BF16WithFP32Norm(features=2)  # 6 bf16, then 4 fp32, then 6 bf16 weights
    swag = swa_fast.SWAG(model, max_rank=3, dtype=None)
    assert [g.dtype for g in swag.average.groups] == [torch.bfloat16, torch.float32]
    collect(model, swag, 6)
    bf16, fp32 = swag.average.groups
    rows = [deviation_rows(swag, k)[: swag.rank] for k in range(2)]
    scale = 0.5
    across = scale * rows[0].t() @ rows[1] / (swag.rank - 1)  # the bf16 x fp32 block
    g = torch.Generator().manual_seed(1234)
    n = 15000
    n_bf16, n_fp32 = (sum(swag.average.views[i].numel() for i in g.indices) for g in (bf16, fp32))
    samples = torch.empty(n, n_bf16 + n_fp32, dtype=torch.float64)
    params = list(model.parameters())
    for s in range(n):
        swag.sample(model, scale=scale, generator=g)
        samples[s] = flat([params[i] for i in bf16.indices] + [params[i] for i in fp32.indices])
    empirical = torch.cov(samples.t())[:n_bf16, n_bf16:]
    assert torch.linalg.matrix_norm(across) > 0.1  # not a vanishing block
    assert torch.linalg.matrix_norm(empirical - across) < 0.05 * torch.linalg.matrix_norm(across)
    probs = swag.predict(model, torch.randn(5, 2), n_samples=2, generator=g)  # the low-rank part too
    assert probs.shape == (5, 2) and torch.allclose(probs.sum(-1), torch.ones(5))


def test_sampling_a_model_without_parameters_is_a_no_op():
    model = torch.nn.ReLU()
    swag = swa_fast.SWAG(model, max_rank=3)
    for _ in range(3):
        swag.update(model)
    swag.sample(model)
    swag.sample(model, diag_only=True)


def test_max_rank_below_two_cannot_sample_the_low_rank_part_and_says_so():
    model = torch.nn.Linear(2, 2)
    for max_rank in (0, 1):
        swag = swa_fast.SWAG(model, max_rank=max_rank)
        collect(model, swag, 3)
        with pytest.raises(ValueError, match=f"max_rank={max_rank}; pass diag_only=True") as raised:
            swag.sample(model)
        assert "collect more" not in str(raised.value)
        swag.sample(model, diag_only=True)


@pytest.mark.parametrize("scale", [-1, float("nan"), float("inf"), "1"])
def test_a_bad_scale_is_refused_before_anything_is_written(scale):
    model = torch.nn.Linear(2, 2)
    swag = swa_fast.SWAG(model, max_rank=3)
    collect(model, swag, 3)
    live = state_copy(model)
    with pytest.raises(ValueError, match="scale must be a finite real number >= 0"):
        swag.sample(model, scale=scale)
    assert all(torch.equal(v, live[k]) for k, v in model.state_dict().items())
