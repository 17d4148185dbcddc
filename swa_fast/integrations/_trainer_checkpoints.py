"""Where a `transformers.Trainer` callback's state lives in the Trainer's checkpoints: the folder a
save has just written, and the file of the checkpoint a resumed run starts from. Shared by the
callbacks of `integrations.transformers` and `integrations.trl`; imports neither library."""

from __future__ import annotations

import os


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
