"""DeepSpeed ZeRO-3: one EMA update of a model whose parameters ZeRO-3 partitions over two ranks,
timed three ways in the same run, on two CPU ranks (gloo, DeepSpeed's CPU accelerator, fp32,
AdamW, one thread each) that this file starts itself:

- the gather baselines, what people write today (diffusers' `EMAModel.step` under ZeRO-3, DeepSpeed
  issue #2056): a full-size EMA copy on every rank, updated inside
  `deepspeed.zero.GatheredParameters` (modifier_rank=None), one parameter at a time (diffusers'
  default, `foreach=False`) or all parameters at once (diffusers' `foreach=True`), each update a
  `lerp_` (diffusers' own arithmetic, a subtraction through a temporary, is slower still);
- ours: `swa_fast.integrations.deepspeed.EMA(engine, decay=0.999)` and its `.update(engine)`, which
  averages each rank's own partitions, with no communication;
- the floor: the bare `swa_fast.lerp_` over the same partitions (the fp32 master partitions,
  `deepspeed.utils.safe_get_local_fp32_param`), with no manager around it.

Both ranks run every method in lockstep: a barrier before each block of calls; each block's time is
the slower rank's, and a method's figure is the median over its blocks.

    python -m swa_fast.benchmarks.deepspeed --min-run-time 0.2   # alone; `swa_fast bench` runs it too
"""

from __future__ import annotations

import importlib.util
import os
import queue
import socket
import tempfile
import time
import traceback
from datetime import timedelta
from pathlib import Path

import torch

import swa_fast
from swa_fast.benchmarks.shapes import SHAPE_SETS, numel
from swa_fast.benchmarks.targets import (
    DEEPSPEED_BARE,
    DEEPSPEED_BASELINE,
    DEEPSPEED_METHOD,
    DEEPSPEED_WORKLOAD,
)

WORLD = 2
DECAY = 0.999
SOURCE = "master"  # what our EMA and the bare op average: the optimizer's fp32 master partitions
GATHER_ALL = "GatheredParameters over all params + _foreach_lerp_"
ROUNDS = 3  # rounds in which the methods take turns, as in timing.time_methods
MAX_BLOCKS = 50  # per method and round: a barrier before each block costs time the figure leaves out
# Seconds of blocks per method and round at the least, whatever --min-run-time: the updates that the
# overhead target compares (about 0.1 s on GPT-2 small) get several blocks a round, for a median
# that a loaded VM moves less, while a gather of a second or two still gets one.
MIN_ROUND_SECONDS = 0.3
DS_CONFIG = {
    "train_micro_batch_size_per_gpu": 1,
    "optimizer": {"type": "AdamW", "params": {"lr": 1e-3, "torch_adam": True}},
    "zero_optimization": {"stage": 3},
    "steps_per_print": 10**9,
}


def deepspeed_missing() -> str | None:
    """Why this benchmark cannot run here (deepspeed not installed), or None."""
    if importlib.util.find_spec("deepspeed") is None:
        return "deepspeed is not installed"
    return None


# --- the model --------------------------------------------------------------------------------------


class _Leaf(torch.nn.Module):
    """One parameter in a module of its own: ZeRO-3 gathers a parameter around its module's forward,
    so each one needs a module that uses it."""

    def __init__(self, shape):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.randn(shape) * 0.02)

    def forward(self, x):
        return x + self.weight.mean()


class LeafModel(torch.nn.Module):
    """A model whose parameters have the given shapes, each used in the forward (a training step
    gives every parameter a gradient)."""

    def __init__(self, shapes):
        super().__init__()
        self.leaves = torch.nn.ModuleList(_Leaf(s) for s in shapes)

    def forward(self, x):
        for leaf in self.leaves:
            x = leaf(x)
        return x


def _engine(shapes):
    """A ZeRO-3 engine of a LeafModel, after one training step (so that the fp32 master partitions
    and AdamW's moments exist and hold trained values, as in training)."""
    import deepspeed

    model = LeafModel(shapes)
    engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=DS_CONFIG)
    loss = engine(torch.zeros(1)).sum()
    engine.backward(loss)
    engine.step()
    return engine


# --- the methods, on each rank -----------------------------------------------------------------------


def _full_ema(params):
    """A full-size EMA copy of the parameters on this rank, as the gather baselines keep it."""
    import deepspeed

    with deepspeed.zero.GatheredParameters(params):
        return [p.detach().clone() for p in params]


def _gather_each(params, ema, weight):
    import deepspeed

    def update():
        for p, e in zip(params, ema):
            with deepspeed.zero.GatheredParameters([p]):
                e.lerp_(p.data, weight)

    return update


def _gather_all(params, ema, weight):
    import deepspeed

    def update():
        with deepspeed.zero.GatheredParameters(params):
            torch._foreach_lerp_(ema, [p.data for p in params], weight)

    return update


def _partitions(params):
    """This rank's partitions of the parameters, from SOURCE."""
    if SOURCE == "master":
        from deepspeed.utils import safe_get_local_fp32_param

        return [safe_get_local_fp32_param(p) for p in params]
    return [p.ds_tensor for p in params]


def _ours(engine, notes):
    """(our update, the bytes its average holds on this rank), or None (said in `notes`) where
    swa_fast.integrations.deepspeed is missing."""
    try:
        from swa_fast.integrations.deepspeed import EMA
    except ImportError as e:
        notes.append(f"swa_fast.integrations.deepspeed did not import ({e}): its row is left out")
        return None
    ema = EMA(engine, decay=DECAY, source=SOURCE)
    return (lambda: ema.update(engine)), _bytes(ema.state_dict()["average"].values())


def _bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def candidates(engine, notes):
    """name -> (one EMA update on this rank, the bytes of the EMA it keeps there), the baseline
    first."""
    params = list(engine.module.parameters())
    weight = 1 - DECAY
    ema = _full_ema(params)
    parts = _partitions(params)
    avg = [t.detach().clone() for t in parts]
    out = {
        DEEPSPEED_BASELINE: (_gather_each(params, ema, weight), _bytes(ema)),
        GATHER_ALL: (_gather_all(params, ema, weight), _bytes(ema)),
    }
    ours = _ours(engine, notes)
    if ours is not None:
        out[DEEPSPEED_METHOD] = ours
    out[DEEPSPEED_BARE] = (lambda: swa_fast.lerp_(avg, parts, weight), _bytes(avg))
    return out


# --- timing in lockstep ------------------------------------------------------------------------------


def _slowest(values: list[float]) -> list[float]:
    """Each value's maximum over the ranks (the same list on every rank)."""
    import torch.distributed as dist

    t = torch.tensor(values, dtype=torch.float64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.tolist()


def _block_seconds(fn, calls: int) -> float:
    """Seconds per call over a block of `calls` calls, started after a barrier."""
    import torch.distributed as dist

    dist.barrier()
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    return (time.perf_counter() - start) / calls


def _plan(fn, min_run_time: float) -> tuple[int, int]:
    """(calls per block, blocks per round) for `fn`, the same on both ranks since they come from
    the slower rank's time of one call: blocks of about a millisecond, as timing.median_seconds."""
    fn()  # warm: first-call caches (our manager's plan, the gathers' buffers) are not a call's cost
    (one,) = _slowest([_block_seconds(fn, 1)])
    calls = max(1, int(1e-3 / max(one, 1e-9)))
    seconds = max(min_run_time / ROUNDS, MIN_ROUND_SECONDS)
    blocks = max(1, min(MAX_BLOCKS, int(seconds / (calls * one))))
    return calls, blocks


def time_in_lockstep(methods: dict, min_run_time: float) -> dict[str, float]:
    """method -> median seconds per call, the methods taking turns over ROUNDS rounds, every block's
    time the slower rank's."""
    plans = {m: _plan(fn, min_run_time) for m, fn in methods.items()}
    samples = {m: [] for m in methods}
    for _ in range(ROUNDS):
        for m, fn in methods.items():
            calls, blocks = plans[m]
            samples[m] += [_block_seconds(fn, calls) for _ in range(blocks)]
    out = {}
    for m, times in samples.items():
        slowest = sorted(_slowest(times))
        out[m] = slowest[len(slowest) // 2]
    return out


def rows(seconds: dict, state_bytes: dict, shapes, name) -> list[dict]:
    labels = {
        "workload": f"{name} {DEEPSPEED_WORKLOAD}",
        "params": "float32",
        "tensors": len(shapes),
        "elements": numel(shapes),
        "ranks": WORLD,
    }
    baseline = next(iter(seconds.values()))
    return [
        {
            **labels,
            "method": m,
            "median_ms": t * 1e3,
            "x_vs_naive": baseline / t,
            "ema_MB_per_rank": state_bytes[m] / 2**20,
        }
        for m, t in seconds.items()
    ]


# --- the two ranks -----------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _quiet(log: str) -> None:
    """This rank's stdout and stderr into its log file: DeepSpeed's build and info lines and gloo's
    deprecation warnings would otherwise fill the suite's terminal; the log is shown on failure."""
    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)


def _rank(rank, port, shapes, name, min_run_time, log, results) -> None:
    """One rank: DeepSpeed's process group, the engine, the methods timed; rank 0 sends the rows."""
    _quiet(log)
    env = {"RANK": rank, "LOCAL_RANK": rank, "WORLD_SIZE": WORLD, "MASTER_PORT": port}
    os.environ.update({k: str(v) for k, v in env.items()}, MASTER_ADDR="127.0.0.1", DS_ACCELERATOR="cpu")
    try:
        import deepspeed

        torch.set_num_threads(1)  # two ranks on a small machine: one core each
        deepspeed.init_distributed(dist_backend="gloo", verbose=False, timeout=timedelta(seconds=300))
        engine, notes = _engine(shapes), []
        methods = candidates(engine, notes)
        seconds = time_in_lockstep({m: fn for m, (fn, _) in methods.items()}, min_run_time)
        if rank == 0:
            results.put(("rows", rows(seconds, {m: b for m, (_, b) in methods.items()}, shapes, name), notes))
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
    except BaseException:
        results.put(("error", rank, traceback.format_exc()))


def _start(shapes, name, min_run_time, logs):
    ctx = torch.multiprocessing.get_context("spawn")
    results, port = ctx.Queue(), _free_port()
    procs = [
        ctx.Process(target=_rank, args=(r, port, shapes, name, min_run_time, str(logs[r]), results))
        for r in range(WORLD)
    ]
    for p in procs:
        p.start()
    return procs, results


def _answer(procs, results, timeout: float) -> tuple:
    """The first answer of a rank: ("rows", rows, notes) from rank 0, or ("error", rank, text), also
    when a rank died without a word (a crash) or none answered within `timeout`."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            return results.get(timeout=1.0)
        except queue.Empty:
            dead = [r for r, p in enumerate(procs) if p.exitcode not in (None, 0)]
            if dead:
                return ("error", dead[0], f"exited with status {procs[dead[0]].exitcode} without an answer")
    return ("error", 0, f"no answer within {timeout:.0f} s")


def _wait(procs, results, logs, timeout: float) -> tuple[list, list]:
    """Rank 0's rows and notes; raises with a failing rank's traceback and the end of its log."""
    answer = _answer(procs, results, timeout)
    if answer[0] == "error":
        for p in procs:
            p.kill()
        log = logs[answer[1]].read_text()[-4000:] if logs[answer[1]].exists() else ""
        raise RuntimeError(f"DeepSpeed benchmark, rank {answer[1]} failed:\n{answer[2]}\n{log}")
    for p in procs:
        p.join(timeout=60)
    return answer[1], answer[2]


def bench_deepspeed(shapes, name, device, min_run_time, timeout: float = 1200) -> list[dict]:
    """One EMA update of a ZeRO-3 model on two CPU ranks, each way (see the module's docstring);
    `device` is not used: DeepSpeed runs on the CPU here, whatever the suite's device. Without
    deepspeed, no rows (said on the terminal)."""
    del device
    missing = deepspeed_missing()
    if missing:
        print(f"{missing}: the DeepSpeed ZeRO-3 rows are left out")
        return []
    with tempfile.TemporaryDirectory() as tmp:
        logs = [Path(tmp) / f"rank{r}.log" for r in range(WORLD)]
        procs, results = _start(shapes, name, min_run_time, logs)
        out, notes = _wait(procs, results, logs, timeout)
    for note in notes:
        print(note)
    return out


def main(argv=None):
    from swa_fast.benchmarks.report import print_table
    from swa_fast.benchmarks.standalone import standalone_args

    args, _ = standalone_args(__doc__, argv)
    print(f"EMA update of a DeepSpeed ZeRO-3 model, {WORLD} CPU ranks (gloo), 1 thread each")
    out = bench_deepspeed(SHAPE_SETS[args.set](), args.set, None, args.min_run_time)
    print_table(out)
    for r in out:
        print(f"  {r['method']:<52} EMA held per rank {r['ema_MB_per_rank']:8.1f} MB")


if __name__ == "__main__":
    main()
