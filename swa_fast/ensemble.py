"""Ensemble prediction over weights loaded one after another into the same model.

FGE averages the predictions of its snapshots (Garipov et al. 2018), SWAG those of weights sampled
from its Gaussian (Maddox et al. 2019, Bayesian model averaging). Both load each member's weights
into the user's model, run it, and put the model's own weights back exactly at the end.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch
from torch import Tensor
from torch.nn import Module

from .model_tensors import ModelCopy, TrackedModel

OUTPUTS = ("probs", "logits")


class PredictsOnBatches:
    """What FGE and SWAG share: `predict` on one batch is `predict_loader` on a one-batch loader."""

    def predict(self, model: Module, inputs: Any, **kwargs) -> Tensor:
        """The ensemble's mean prediction on one batch: see `predict_loader`."""
        return self.predict_loader(model, [inputs], **kwargs)


def default_forward(model: Module, batch: Any) -> Tensor:
    """`model(batch)`, or `model(batch[0])` for (inputs, targets) pairs, as update_bn feeds them."""
    return model(batch[0] if isinstance(batch, (list, tuple)) else batch)


@torch.no_grad()
def ensemble_predict(
    model: Module,
    members: Iterator[None],
    batches: Iterable[Any],
    output: str = "probs",
    forward_fn: Callable[[Module, Any], Tensor] | None = None,
) -> Tensor:
    """The mean over ensemble members of the model's outputs on every batch, concatenated along
    dim 0: softmax probabilities over the last dim (`output="probs"`) or raw logits ("logits").

    Iterating `members` loads the next member's weights into the model (and may recompute its
    BatchNorm statistics); `batches` is iterated once per member, so each member is loaded once.
    The model runs in eval mode; its weights, buffers and mode are restored exactly afterwards.
    """
    if output not in OUTPUTS:
        raise ValueError(f"swa_fast: output must be one of {OUTPUTS}, got {output!r}")
    forward = forward_fn or default_forward
    # Everything, buffers included (a member may recompute BatchNorm statistics), in the model's
    # own dtypes: the restore is exact.
    everything = TrackedModel(model, buffers=True, owner="ensemble prediction")
    tensors = everything.tensors(model)
    live = ModelCopy(everything, tensors)
    modes = [m.training for m in model.modules()]
    sums: list[Tensor] = []
    count = 0
    try:
        for _ in members:
            model.eval()
            seen = 0
            for batch in batches:
                out = forward(model, batch).float()
                out = out.softmax(-1) if output == "probs" else out
                if count == 0:
                    sums.append(out.clone())
                elif seen < len(sums) and sums[seen].shape == out.shape:
                    sums[seen] += out
                else:
                    raise ValueError(
                        "swa_fast: the batches changed between ensemble members (a loader must give "
                        "the same batches in the same order every pass: use shuffle=False)"
                    )
                seen += 1
            if not sums:
                raise ValueError("swa_fast: the loader gave no batches to predict on")
            if seen < len(sums):
                # A one-shot iterable (a generator) is empty from the second pass on; averaging
                # over members that saw nothing would scale every prediction down.
                raise ValueError(
                    f"swa_fast: the loader gave {len(sums)} batches for the first ensemble member and "
                    f"{seen} for member {count + 1}; it must give the same batches on every pass (a "
                    "generator or other iterator can be run only once: pass a list or a DataLoader)"
                )
            count += 1
    finally:
        live.load(tensors)
        for m, mode in zip(model.modules(), modes):
            m.training = mode
    if count == 0:
        raise ValueError("swa_fast: the ensemble has no members to predict with")
    return torch.cat([s / count for s in sums])
