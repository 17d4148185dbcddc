"""SWAG (Maddox et al., "A Simple Baseline for Bayesian Uncertainty in Deep Learning", 2019): an
SWA whose updates also keep the second moment and the last deviations, for a Gaussian over the
weights to sample and ensemble from."""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch
from torch import Tensor
from torch.nn import Module

from . import distributed, ops
from .averaging import AT_LEAST_FLOAT32, SWA
from .bn import update_bn
from .ensemble import PredictsOnBatches, ensemble_predict
from .flat import FlatBuffer, copy_into_strided, copy_lists, own_bytes, padded_numel
from .weighting import count, real_number


class SWAG(SWA, PredictsOnBatches):
    """SWA-Gaussian (Maddox et al., "A Simple Baseline for Bayesian Uncertainty in Deep Learning",
    2019): a Gaussian over the weights with the SWA mean, a diagonal covariance from the running
    second moment, and a low-rank part from the last `max_rank` deviations:

        mean  += (w - mean) / (n + 1);   sq += (w^2 - sq) / (n + 1)     (one fused `moments_` pass)
        D[(n mod K)] = w - mean                                        (a ring of K rows, one flat
                                                                         tensor, no concatenation)
        sample = mean + sqrt(scale) * (sqrt(max(sq - mean^2, 1e-30)) * z1 + D^T z2 / sqrt(K - 1))

    with z1, z2 standard normal and K the rows collected so far. `scale=0.5` is the paper's
    sample (its 1/sqrt(2) factors); `diag_only=True` drops the low-rank part (SWAG-Diagonal).
    It is an SWA whose `average` holds the mean (the SWA solution), so `copy_to` /
    `average_applied` apply that.

    Args:
        model: the model to collect.
        max_rank: K, the deviation rows kept (0: SWAG-Diagonal only).
        dtype: the dtype of the mean, second moment and deviations (default fp32, fp64 for an fp64
            model: see the `Averager`).
        use_buffers: collect floating buffers too (BatchNorm statistics; `update_bn` after a
            sample recomputes them for the sampled weights anyway).
        check_finite: refused: a skipped update would still write its non-finite deviation row.
        rank0_only, device, side_stream, backend, rounding, seed, stats: as the `Averager`'s (capturable
            is refused: each update chooses its deviation row on the host).
    """

    _CAPTURABLE = False  # a deviation row per update, chosen on the host

    def __init__(
        self,
        model: Module,
        max_rank: int = 20,
        *,
        dtype: torch.dtype | str | None = AT_LEAST_FLOAT32,
        use_buffers: bool = False,
        check_finite: bool = False,
        rank0_only: bool = False,
        device: torch.device | str | None = None,
        side_stream: bool = False,
        backend: str | None = None,
        capturable: bool = False,
        rounding: str = "nearest",
        seed: int = 0,
        stats: bool = False,
    ) -> None:
        max_rank = count(max_rank, "SWAG: max_rank", 0)
        if check_finite:
            # A skipped update would still write its (non-finite) deviation row.
            raise ValueError("swa_fast.SWAG: check_finite is not supported (SWA and EMA have it)")
        super().__init__(
            model,
            dtype=dtype,
            use_buffers=use_buffers,
            rank0_only=rank0_only,
            device=device,
            side_stream=side_stream,
            backend=backend,
            capturable=capturable,  # (refused: its update decides on the host)
            rounding=rounding,  # (the mean's and the second moment's, each with its own bits)
            seed=seed,
            stats=stats,
        )
        self._stats.rows = ("mean", "sq")
        self.max_rank = max_rank
        self.sq = FlatBuffer(self.average.views)  # the first update overwrites it exactly
        # One (max_rank, group length) matrix per flat group, written a row per update.
        self.deviations = [g.buffer.new_zeros(max_rank, g.buffer.numel()) for g in self.average.groups]
        self._plan = self._new_plan()  # over the mean and sq

    @property
    def rank(self) -> int:
        """Deviation rows collected so far (at most max_rank)."""
        return min(self.updates, self.max_rank)

    _OP = "moments_"
    _ADDS_COPIES = True

    def _plan_targets(self) -> list[list[Tensor]]:
        """moments_'s [mean, sq], laid out as the model's tensors (the second list's integer
        positions are never read: integer buffers are copied into the first's)."""
        sq = list(self._copy.stored())
        for i, view in zip(self.tracked.floating, self.sq.views):
            sq[i] = view
        return [self._copy.stored(), sq]

    def _run_update(self, tensors: list[Tensor], weight, counted_on_device: Tensor | None) -> None:
        super()._run_update(tensors, weight, counted_on_device)
        if self.max_rank:  # each group's deviation row of this update (not counted yet)
            slot = self.updates % self.max_rank
            floating = self.tracked.split(tensors)[0]
            for (g, _, src), rows in zip(self.average.pairs(floating), self.deviations):
                ops.copy_(self.average.views_of(g, rows[slot]), src, backend=self.backend)
                rows[slot].sub_(g.buffer)  # the deviation from the updated mean, as in the paper

    def variance(self) -> list[Tensor]:
        """The diagonal variance sq - mean^2 (clamped at 1e-30), a tensor per averaged tensor."""
        self._ready("variance")
        return [(q - m * m).clamp_min_(1e-30) for m, q in zip(self.average.views, self.sq.views)]

    @torch.no_grad()
    def sample(
        self,
        model: Module,
        scale: float = 0.5,
        diag_only: bool = False,
        generator: torch.Generator | None = None,
    ) -> None:
        """Draw weights from the SWAG Gaussian into `model`, on the average's device, with one fused
        copy per group. Recompute BatchNorm statistics afterwards (`swa_fast.update_bn`). A model
        without floating tensors gets its integer buffers (with `use_buffers`) and nothing else."""
        scale = real_number(scale, "SWAG.sample: scale", low=0.0)
        self._ready("sample")
        if self.updates == 0:
            raise ValueError("swa_fast.SWAG: no model has been collected yet; call update() first")
        if not diag_only and self.max_rank < 2:
            raise ValueError(
                f"swa_fast.SWAG: the low-rank part needs at least 2 deviations, and this SWAG keeps at "
                f"most max_rank={self.max_rank}; pass diag_only=True (or collect with max_rank >= 2)"
            )
        if not diag_only and self.rank < 2:
            raise ValueError(
                f"swa_fast.SWAG: the low-rank part needs at least 2 collected models, there are "
                f"{self.rank} (max_rank={self.max_rank}); collect more or pass diag_only=True"
            )
        tensors = self.tracked.tensors(model)
        floating, integer = self.tracked.split(tensors)
        self.average.check_shapes(floating)  # every group, before any is written
        # The low-rank noise multiplies whole deviation vectors: one draw for every flat group, in
        # a dtype that holds each group's (cast to each), so that the covariance across groups is
        # the low-rank one too; under FSDP2 one for every rank's shards (the first rank's is sent
        # to the others).
        if not diag_only and self.deviations:
            dtype = functools.reduce(torch.promote_types, [d.dtype for d in self.deviations])
            shared = self._normal(self.rank, dtype, self.deviations[0].device, generator)
            shared = distributed.shared_draw(shared, self.tracked.layouts)
        for k, (g, _, dst) in enumerate(self.average.pairs(floating)):
            sq = self.sq.groups[k].buffer
            drawn = torch.addcmul(sq, g.buffer, g.buffer, value=-1).clamp_min_(1e-30).sqrt_()
            drawn.mul_(self._normal(drawn.numel(), drawn.dtype, drawn.device, generator))
            if not diag_only:
                rows = self.deviations[k][: self.rank]
                drawn.addmv_(rows.t(), shared.to(rows.device, rows.dtype), alpha=(self.rank - 1) ** -0.5)
            drawn.mul_(scale**0.5).add_(g.buffer)
            copy_into_strided(dst, self.average.views_of(g, drawn), backend=self.backend)
        copy_lists(integer, self._integers)

    @staticmethod
    def _normal(
        n: int, dtype: torch.dtype, device: torch.device, generator: torch.Generator | None
    ) -> Tensor:
        """n standard normal numbers for `device`, drawn where `generator` lives (a CPU generator
        serves a GPU model too, at the cost of a copy)."""
        drawn_on = generator.device if generator is not None else device
        return torch.randn(n, dtype=dtype, device=drawn_on, generator=generator).to(device)

    def predict_loader(
        self,
        model: Module,
        loader: Iterable[Any],
        n_samples: int = 30,
        scale: float = 0.5,
        diag_only: bool = False,
        bn_loader: Iterable[Any] | None = None,
        forward_fn: Callable[[Module, Any], Tensor] | None = None,
        output: str = "probs",
        generator: torch.Generator | None = None,
    ) -> Tensor:
        """The mean over `n_samples` SWAG samples of the model's softmax probabilities (or logits)
        on every batch of `loader` (which must give the same batches each pass), concatenated.
        With `bn_loader`, BatchNorm statistics are recomputed for every sample (as the paper
        does). The model's own weights, buffers and mode are restored exactly afterwards."""
        n_samples = count(n_samples, "SWAG.predict_loader: n_samples", 1)

        def samples() -> Iterator[None]:
            for _ in range(n_samples):
                self.sample(model, scale, diag_only, generator)
                if bn_loader is not None:
                    update_bn(bn_loader, model, forward_fn=forward_fn, require_batches=True)
                yield

        return ensemble_predict(model, samples(), loader, output, forward_fn)

    def _deviation_views(self) -> dict[str, Tensor]:
        """name -> its (max_rank, *shape) columns of the deviation matrices."""
        out: list[Tensor] = [torch.empty(0)] * len(self.average)
        for g, rows in zip(self.average.groups, self.deviations):
            numels = [self.average.views[i].numel() for i in g.indices]
            columns = rows.split([padded_numel(n) for n in numels], dim=1)  # laid out as the buffer
            for i, part, n in zip(g.indices, columns, numels):
                out[i] = part[:, :n].view(self.max_rank, *self.average.views[i].shape)
        return dict(zip(self.tracked.floating_names, out))

    def _extra_state(self) -> dict:
        return {
            "sq": self.tracked.shard_state(dict(zip(self.tracked.floating_names, self._sq_entries()))),
            "deviation": self.tracked.shard_state(self._deviation_views(), lead=(self.max_rank,)),
            "max_rank": self.max_rank,
        }

    def _sq_entries(self) -> list[Tensor]:
        """The second moments for a state dict: as the average's (`ModelCopy.named`), each a tensor
        of its own bytes unless sharded (then DTensors over the views)."""
        return self.sq.views if self.tracked.sharded else list(map(own_bytes, self.sq.views))

    def _check_extra_state(self, state: dict) -> tuple[dict, dict]:
        if state.get("max_rank") != self.max_rank or "sq" not in state or "deviation" not in state:
            raise ValueError(
                f"swa_fast.SWAG: expected a SWAG state_dict with max_rank {self.max_rank}, got one with "
                f"max_rank {state.get('max_rank')} and keys {sorted(state)}"
            )
        names = self.tracked.floating_names
        return (
            self.tracked.local_state(state["sq"], names),
            self.tracked.local_state(state["deviation"], names, lead=(self.max_rank,)),
        )

    def _load_extra_state(self, checked: tuple[dict, dict]) -> None:
        sq_parts, deviation_parts = checked
        for name, sq in zip(self.tracked.floating_names, self.sq.views):
            sq.copy_(sq_parts[name])
        for name, columns in self._deviation_views().items():
            columns.copy_(deviation_parts[name])
