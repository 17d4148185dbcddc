"""Two worker processes joined in a gloo process group, for the distributed tests, and the fixtures
that run a function on both. The functions run there are pickled by name: they must be module-level
functions of an importable module (a test module is one: the workers get the parent's sys.path)."""

import queue
import time
import traceback
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

WORLD = 2


def _serve(rank: int, store: str, tasks, results) -> None:
    """A rank of the worker pair: runs fn(rank, tmp) for each task until told to stop."""
    torch.set_num_threads(1)  # two processes on a small machine
    dist.init_process_group(
        "gloo", init_method=f"file://{store}", rank=rank, world_size=WORLD, timeout=timedelta(seconds=30)
    )
    try:
        while (task := tasks.get()) is not None:
            fn, tmp = task
            try:
                fn(rank, tmp)
                results.put((rank, None))
            except BaseException:  # reported to the test, which fails with it
                results.put((rank, traceback.format_exc()))
    finally:
        dist.destroy_process_group()


class TwoRanks:
    """Two processes joined in a gloo process group, kept for the whole module: starting them (and
    importing torch in them) costs far more than a test."""

    def __init__(self, tmp: Path) -> None:
        ctx = mp.get_context("spawn")
        self.tasks = [ctx.Queue() for _ in range(WORLD)]
        self.results = ctx.Queue()
        store = tmp / f"store-{time.monotonic_ns()}"
        self.procs = [
            ctx.Process(target=_serve, args=(r, str(store), self.tasks[r], self.results), daemon=True)
            for r in range(WORLD)
        ]
        for p in self.procs:
            p.start()

    def run(self, fn, tmp: Path, timeout: float = 120) -> None:
        """fn(rank, tmp) on both ranks; raises with each failing rank's traceback."""
        for q in self.tasks:
            q.put((fn, str(tmp)))
        deadline, errors, answered = time.monotonic() + timeout, {}, 0
        while answered < WORLD:
            try:
                rank, error = self.results.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                raise AssertionError(f"{fn.__name__} did not finish within {timeout} s") from None
            answered += 1
            if error is not None:
                errors[rank] = error
        if errors:
            raise AssertionError("\n".join(f"rank {r} failed:\n{tb}" for r, tb in sorted(errors.items())))

    def close(self) -> None:
        for q in self.tasks:
            q.put(None)
        for p in self.procs:
            p.join(timeout=10)
            if p.is_alive():
                p.kill()


@pytest.fixture(scope="module")
def pool(tmp_path_factory):
    holder = {"ranks": None}
    yield holder
    if holder["ranks"] is not None:
        holder["ranks"].close()


@pytest.fixture
def on_two_ranks(pool, tmp_path):
    """Runs fn(rank, tmp_path) on both ranks; after a failure the pair is replaced, since a rank may
    still be inside a collective."""

    def run(fn) -> None:
        if pool["ranks"] is None:
            pool["ranks"] = TwoRanks(tmp_path)
        try:
            pool["ranks"].run(fn, tmp_path)
        except BaseException:
            ranks, pool["ranks"] = pool["ranks"], None
            for p in ranks.procs:
                p.kill()
            raise

    return run
