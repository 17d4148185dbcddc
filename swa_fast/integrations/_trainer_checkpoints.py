"""A `transformers.Trainer` callback's state in the Trainer's checkpoints: the folder a save has just
written, the file of the checkpoint a resumed run starts from, and the file itself (written whole
or not at all, read back checked). Shared by the callbacks of `integrations.transformers` and
`integrations.trl`; imports neither library."""

from __future__ import annotations

import os

import torch

from ..atomic_files import replacing

FORMAT = 1  # of the files written into the checkpoints


def checkpoint_folder(args, state) -> str:
    """The folder the Trainer saves its checkpoint of this step into (its `_save_checkpoint`'s name)."""
    return os.path.join(args.output_dir, f"checkpoint-{state.global_step}")


def saved_checkpoint_folder(args, state, who: str) -> str:
    """checkpoint_folder, which the Trainer must have written by its `on_save`."""
    folder = checkpoint_folder(args, state)
    if not os.path.isdir(folder):
        raise ValueError(
            f"{who}: expected the Trainer's checkpoint folder {folder!r} after its save, found none "
            "(a hyperparameter search's trial folders are not supported)"
        )
    return folder


def resumed_file(args, state, name: str, who: str, what: str, otherwise: str) -> str:
    """The file `name` of the checkpoint being resumed: in `args.resume_from_checkpoint` when that
    names a folder (what the example scripts pass to `train`), else in
    `<output_dir>/checkpoint-<global_step>` (where `train(resume_from_checkpoint=True)` leads).
    Raises, saying `what` was expected and `otherwise` (the option that starts anew), when neither
    holds it."""
    folders = []
    given = args.resume_from_checkpoint
    if isinstance(given, (str, os.PathLike)) and os.path.isdir(given):
        folders.append(os.fspath(given))
    folders.append(checkpoint_folder(args, state))
    for folder in folders:
        if os.path.isfile(os.path.join(folder, name)):
            return os.path.join(folder, name)
    raise ValueError(
        f"{who}: resuming at step {state.global_step}, expected {what} saved as {name!r} in "
        f"{' or '.join(map(repr, folders))}, found none. Name the checkpoint in "
        f"TrainingArguments(resume_from_checkpoint=...) as well, or pass {otherwise}"
    )


def save_state(path: str, callback: str, state, manager_state: dict) -> None:
    """Write a callback's manager state for the checkpoint of `state.global_step` into `path`, whole
    or not at all (a temporary name, then a rename)."""
    saved = {
        "format": FORMAT,
        "callback": callback,
        "global_step": state.global_step,
        "manager": manager_state,
    }
    with replacing(path) as temporary:
        torch.save(saved, temporary)


def load_state(path: str, callback: str, state, who: str, sharded: bool = False) -> dict:
    """The manager state `save_state` wrote into `path`, refused unless it is `callback`'s of the
    checkpoint of `state.global_step`. `sharded`: it holds DTensors, loaded where they were saved."""
    saved = torch.load(path, map_location=None if sharded else "cpu", weights_only=not sharded)
    expected = (FORMAT, callback, state.global_step)
    got = (saved.get("format"), saved.get("callback"), saved.get("global_step"))
    if got != expected:
        raise ValueError(f"{who}: {path!r} holds (format, callback, step) {got}, expected {expected}")
    return saved["manager"]
