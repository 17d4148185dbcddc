"""swa_fast's SWA, EMA and PostHocEMA over a DeepSpeed engine, ZeRO stages 1, 2 and 3, shard by shard.

    engine, *_ = deepspeed.initialize(model=model, config=config, model_parameters=model.parameters())
    ema = swa_fast.integrations.deepspeed.EMA(engine, decay=0.999)   # on every rank
    for batch in loader:
        engine.backward(engine(batch)); engine.step()
        ema.update(engine)                       # this rank's partition: no gather, no communication
    with ema.average_applied(engine):            # the average in the live partitions, restored after
        evaluate(engine)
    engine.save_checkpoint("ckpt"); ema.save_checkpoint("ckpt")   # each rank its part, beside DeepSpeed's
    ema.export("ema.safetensors")                # the whole averaged model, written by rank 0

Each rank averages its own piece of every parameter (`swa_fast.zero`), in one fused pass. What it
follows is `source`:
- "master" (the default): the optimizer's fp32 master partition. It is what the optimizer steps, in
  full precision even when the model trains in bf16 or fp16 (an fp32 average of it does not stall),
  and it is partitioned under every stage, so under ZeRO-1 and ZeRO-2 too each rank keeps only its
  part: 4 bytes per parameter over the ranks. A parameter the optimizer does not step (a frozen one)
  is averaged from its own partition.
- "params": the parameters' own partitions (ZeRO-3's `ds_tensor`, in the model's dtype); under
  ZeRO-1/2, whose parameters every rank holds whole, the whole parameters, as under DDP. This is
  also what `swa_fast.EMA(engine)` does.

Reads of the average (`copy_to`, `swap`, `average_applied`) write the parameters' own partitions,
then make the whole parameters agree (ZeRO-3's gathered persistent parameters, ZeRO-1/2's whole
parameters from every rank's slice): a collective, so call them on every rank.
"""

from __future__ import annotations

import os
import weakref
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.distributed as dist
from torch import Tensor
from torch.nn import Module

from .. import averaging, posthoc, zero
from ..flat import own_bytes
from ._trainer_checkpoints import load_state, save_state

__all__ = ["EMA", "PostHocEMA", "SWA"]


class _OnEngine:
    """What the DeepSpeed managers add to swa_fast's: the source of a ZeRO average, checkpoints
    beside the engine's, and the export of the whole average."""

    def __init__(self, engine: Module, *args, source: str = "master", **kwargs) -> None:
        if source not in zero.SOURCES:
            raise ValueError(
                f"swa_fast.integrations.deepspeed.{type(self).__name__}: source must be one of "
                f"{zero.SOURCES}, got {source!r}"
            )
        self._SOURCE = source
        self._engine = weakref.ref(engine)  # (a manager must not keep a dropped engine alive)
        super().__init__(engine, *args, **kwargs)

    @property
    def source(self) -> str:
        """What each rank's average follows: "master" or "params" (see this module's docstring)."""
        return self._SOURCE

    def __getstate__(self) -> dict:
        # pickled without the engine, as without the model: its checkpoints then need a new one
        return {**super().__getstate__(), "_engine": _no_engine}

    def _global_steps(self) -> int:
        engine = self._engine()
        if engine is None:
            raise ValueError(
                f"swa_fast.integrations.deepspeed.{type(self).__name__}: the engine it was made for is gone "
                "(or this manager was unpickled); make a manager for the new engine and load_state_dict"
            )
        return engine.global_steps

    # --- checkpoints --------------------------------------------------------------------------------

    def _checkpoint_file(self, directory: str | os.PathLike, tag: str | None, name: str | None) -> Path:
        rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
        name = name or type(self).__name__.lower()
        return Path(directory) / str(tag) / f"swa_fast_{name}_rank{rank}_of_{world}.pt"

    def _checked(self, name: str | None) -> str:
        rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
        return f"swa_fast {name or type(self).__name__} of rank {rank} of {world}"

    def save_checkpoint(
        self, save_dir: str | os.PathLike, tag: str | None = None, name: str | None = None
    ) -> Path:
        """Write this rank's part of the manager's state into DeepSpeed's checkpoint folder of `tag`
        (default: the engine's, `global_step<N>`), as `swa_fast_<name>_rank<r>_of_<world>.pt`, whole
        or not at all. Call it on every rank, after `engine.save_checkpoint(save_dir, tag)`; `name`
        (default: the class name) tells several managers apart."""
        tag = tag if tag is not None else f"global_step{self._global_steps()}"
        path = self._checkpoint_file(save_dir, tag, name)
        path.parent.mkdir(parents=True, exist_ok=True)
        step = SimpleNamespace(global_step=self._global_steps())
        save_state(os.fspath(path), self._checked(name), step, self.state_dict())
        return path

    def load_checkpoint(
        self, load_dir: str | os.PathLike, tag: str | None = None, name: str | None = None
    ) -> None:
        """Load what `save_checkpoint` wrote for this rank into the checkpoint of `tag` (default: the
        one DeepSpeed's `latest` file names, as `engine.load_checkpoint` does). Call it after
        `engine.load_checkpoint`: the file must be of the engine's step, and of this rank of as
        many ranks; a resumed run then continues bit for bit."""
        if tag is None:
            latest = Path(load_dir) / "latest"
            if not latest.is_file():
                raise ValueError(
                    f"swa_fast: no tag given and no {os.fspath(latest)!r} naming the latest checkpoint"
                )
            tag = latest.read_text().strip()
        path = self._checkpoint_file(load_dir, tag, name)
        if not path.is_file():
            raise ValueError(
                f"swa_fast: expected {os.fspath(path)!r} (this rank's part, written by save_checkpoint with "
                "as many ranks), found none"
            )
        step = SimpleNamespace(global_step=self._global_steps())
        self.load_state_dict(load_state(os.fspath(path), self._checked(name), step, "swa_fast"))

    # --- the whole average ----------------------------------------------------------------------------

    def _exported(self) -> dict[str, Tensor]:
        return self._copy.named()

    @torch.no_grad()
    def export(self, path: str | os.PathLike | None = None, **which) -> dict[str, Tensor]:
        """The whole average as the unwrapped model's state_dict (names without the engine's
        prefix; each tensor in the average's dtype, on the CPU), gathered from every rank's part:
        a collective, call it on every rank. Rank 0 gets it (and with `path` writes it, a
        `.safetensors` file or else `torch.save`'s); the other ranks get an empty dict."""
        self.wait()
        whole = zero.whole_state(self._exported(**which), dict(zip(self.tracked.names, self.tracked.layouts)))
        if dist.is_initialized() and dist.get_rank() != 0:
            return {}
        out = {n: own_bytes(t.detach().cpu()) for n, t in whole.items()}
        if path is not None:
            _write(out, Path(path))
        return out


def _no_engine() -> None:
    """The engine's weak reference in a manager unpickled without it."""
    return None


def _write(state: dict[str, Tensor], path: Path) -> None:
    """`state` into `path`, whole or not at all (a temporary name, then a rename)."""
    temporary = path.with_name(path.name + ".tmp")
    if path.suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file({n: t.contiguous() for n, t in state.items()}, os.fspath(temporary))
    else:
        torch.save(state, temporary)
    os.replace(temporary, path)


class SWA(_OnEngine, averaging.SWA):
    """`swa_fast.SWA` over a DeepSpeed engine: `SWA(engine, source="master", **swa_options)`."""


class EMA(_OnEngine, averaging.EMA):
    """`swa_fast.EMA` over a DeepSpeed engine: `EMA(engine, decay=..., source="master", **ema_options)`."""


class PostHocEMA(_OnEngine, posthoc.PostHocEMA):
    """`swa_fast.PostHocEMA` over a DeepSpeed engine, its K averages kept shard by shard (snapshots of
    a sharded model are not written: `snapshot_every` is refused, as under FSDP2).
    `export(path, sigma_rel=...)` writes the tracked average of one profile."""

    def _exported(self, sigma_rel: float | None = None) -> dict[str, Tensor]:
        return self._profiles[self._profile_index(sigma_rel, "export")].named()
