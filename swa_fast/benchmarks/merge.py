"""Merging checkpoints: `swa_fast.merge(files, out)` (the mean of K safetensors checkpoints, streamed
in chunks) against reading the same files raw, against the way people write it, and against
mergekit's linear merge, on GPT-2 small's tensors (148, 124M elements: 498 MB a checkpoint in fp32,
249 MB in bf16), K = 2, 5 and 10, with the files in the page cache:

- raw read: every byte of the K files read with `readinto` into one reused buffer (RAW_BUFFER), one
  file after the other: the most a merge's reads can reach here, the baseline of its read fraction;
- ours: `swa_fast.merge(files, out.safetensors)`, the output written whole (flushed to disk and
  renamed, as the merge always writes);
- naive: fairseq's scripts/average_checkpoints.py with safetensors (`merge_probe.naive_merge`):
  each file loaded whole, added into an fp32 accumulator, divided, saved;
- mergekit: `mergekit-yaml` with `merge_method: linear` and equal weights over the same files (as
  Hugging Face model folders), called in a process of its own after its imports, through the
  interpreter `--mergekit-python` names (one where `pip install mergekit` went), or this one where
  mergekit imports; left out, said why, otherwise.

Each in-process method's figure is the median of ROUNDS calls, the methods taking turns within
each round so that a drift of the machine hits them alike, after one call each to warm up;
mergekit's is the median of its runs, one fresh process per round. The output is removed before
every call. Peak resident memory: each merge once more in a fresh process (`merge_probe.py`), its
peak (VmHWM, mapped file pages included, as `top` counts them) above its resident size after its
imports.

The checkpoints are random values written once per dtype (10 files, with a GPT-2 config.json beside
each, so that mergekit reads them as models) into a folder under the system's temporary folder,
removed at the end; the first K serve each K.

    python -m swa_fast.benchmarks.merge --k 2 5 10 --dtype float32 bfloat16   # alone; `swa_fast bench`
    python -m swa_fast.benchmarks.merge --mergekit-python /tmp/mk-venv/bin/python
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

import swa_fast
from swa_fast.benchmarks import merge_probe
from swa_fast.benchmarks.shapes import SHAPE_SETS, gpt2_small
from swa_fast.benchmarks.targets import MERGE_MERGEKIT, MERGE_METHOD, MERGE_NAIVE, MERGE_RAW, MERGE_WORKLOAD

ROUNDS = 3
COUNT = 10  # checkpoints written per dtype; K takes the first K
RAW_BUFFER = 16 << 20  # the raw read's one buffer, as large as the merge's chunks at K = 5 to 10
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
QUICK = {"ks": (2, 10), "dtypes": ("float32",)}  # `swa_fast bench`; `--full`: every K and dtype
FULL = {"ks": (2, 5, 10), "dtypes": ("float32", "bfloat16")}
# mergekit's command line as its README shows it; no tokenizer to copy: these folders hold none
MERGEKIT_OPTIONS = ["--no-copy-tokenizer", "--quiet"]


@dataclass
class Model:
    """The checkpoints' tensors (name, shape), in order, and the Hugging Face config written beside
    each (None: not a model mergekit knows, so its row is left out)."""

    tensors: list[tuple[str, tuple[int, ...]]]
    config: dict | None = None
    name: str = "gpt2-small"

    def nbytes(self, dtype: torch.dtype) -> int:
        return sum(torch.Size(s).numel() for _, s in self.tensors) * dtype.itemsize


def gpt2(d: int = 768, layers: int = 12, heads: int = 12, vocab: int = 50257, ctx: int = 1024) -> Model:
    """GPT-2's tensors under Hugging Face's GPT2LMHeadModel names (the LM head tied to the
    embedding, so not saved), and its config; the defaults are GPT-2 small (shapes.gpt2_small)."""
    layer = [
        ("ln_1.weight", (d,)),
        ("ln_1.bias", (d,)),
        ("attn.c_attn.weight", (d, 3 * d)),
        ("attn.c_attn.bias", (3 * d,)),
        ("attn.c_proj.weight", (d, d)),
        ("attn.c_proj.bias", (d,)),
        ("ln_2.weight", (d,)),
        ("ln_2.bias", (d,)),
        ("mlp.c_fc.weight", (d, 4 * d)),
        ("mlp.c_fc.bias", (4 * d,)),
        ("mlp.c_proj.weight", (4 * d, d)),
        ("mlp.c_proj.bias", (d,)),
    ]
    tensors = [("transformer.wte.weight", (vocab, d)), ("transformer.wpe.weight", (ctx, d))]
    tensors += [(f"transformer.h.{i}.{n}", s) for i in range(layers) for n, s in layer]
    tensors += [("transformer.ln_f.weight", (d,)), ("transformer.ln_f.bias", (d,))]
    config = {
        "architectures": ["GPT2LMHeadModel"],
        "model_type": "gpt2",
        "n_embd": d,
        "n_layer": layers,
        "n_head": heads,
        "n_positions": ctx,
        "vocab_size": vocab,
        "tie_word_embeddings": True,
    }
    name = "gpt2-small" if (d, layers, vocab, ctx) == (768, 12, 50257, 1024) else f"gpt2 d={d} x{layers}"
    return Model(tensors, config, name)


def model_of_set(shapes, name: str) -> Model:
    """The suite's first shape set as checkpoints: GPT-2 small with its names and config, any other
    set with plain names and no config (mergekit then has no model to read)."""
    if name == "gpt2-small" and shapes == gpt2_small():
        return gpt2()
    return Model([(f"tensor.{i:04d}", tuple(s)) for i, s in enumerate(shapes)], None, name)


# --- the checkpoints ----------------------------------------------------------------------------------


def write_checkpoints(folder: Path, model: Model, dtypes, count: int = COUNT) -> dict[str, list[Path]]:
    """`count` checkpoints of random values per dtype, each a folder `<dtype>/step-<i>/` holding
    model.safetensors (and config.json with the model's config): dtype -> the safetensors files."""
    from safetensors.torch import save_file

    files = {dtype: [] for dtype in dtypes}
    for i in range(count):
        g = torch.Generator().manual_seed(i)
        values = {name: torch.randn(shape, generator=g) for name, shape in model.tensors}
        for dtype in dtypes:
            checkpoint = folder / dtype / f"step-{i}"
            checkpoint.mkdir(parents=True)
            save_file({n: t.to(DTYPES[dtype]) for n, t in values.items()}, checkpoint / "model.safetensors")
            if model.config is not None:
                config = {**model.config, "torch_dtype": dtype}
                (checkpoint / "config.json").write_text(json.dumps(config, indent=1))
            files[dtype].append(checkpoint / "model.safetensors")
    return files


def raw_read(paths, buffer: memoryview) -> int:
    """Every byte of the files, one after the other, into `buffer` (reused); the bytes read."""
    total = 0
    for path in paths:
        with open(path, "rb", buffering=0) as f:
            while n := f.readinto(buffer):
                total += n
    return total


def _remove(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path)
    elif path.exists():
        path.unlink()


# --- the methods --------------------------------------------------------------------------------------


def in_process(paths, out: Path, buffer: memoryview) -> dict:
    """name -> one call, for the methods timed in this process (the raw read first)."""
    strings = [os.fspath(p) for p in paths]
    return {
        MERGE_RAW: lambda: raw_read(paths, buffer),
        MERGE_METHOD: lambda: swa_fast.merge(strings, out / "ours.safetensors"),
        MERGE_NAIVE: lambda: merge_probe.naive_merge(strings, out / "naive.safetensors"),
    }


def _outputs(out: Path) -> list[Path]:
    return [out / "ours.safetensors", out / "naive.safetensors", out / "mergekit"]


def mergekit_config(paths, dtype: str, folder: Path) -> Path:
    """mergekit's YAML for the equal-weight linear merge of the models holding `paths`."""
    lines = ["merge_method: linear", f"dtype: {dtype}", "models:"]
    for p in paths:  # (a JSON string is a YAML string: the path quoted)
        lines += [f"  - model: {json.dumps(os.fspath(Path(p).parent))}", "    parameters: {weight: 1.0}"]
    config = folder / f"mergekit-{dtype}-{len(paths)}.yml"
    config.write_text("\n".join(lines) + "\n")
    return config


def probe(python: str, spec: dict, timeout: float = 3600) -> dict:
    """merge_probe.py's answer for `spec`, run by `python` in a fresh process; raises with its
    output on failure."""
    source = Path(merge_probe.__file__).read_text()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(_import_roots())}
    done = subprocess.run(
        [python, "-c", source, json.dumps(spec)],
        capture_output=True,
        text=True,
        env=env,
        cwd=tempfile.gettempdir(),
        timeout=timeout,
    )
    if done.returncode != 0:
        raise RuntimeError(f"{spec['method']} merge in a fresh process failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def _import_roots() -> list[str]:
    """The folder this swa_fast is imported from first, so that a fresh process imports the same one
    (a checkout's, not an installed copy), then the PYTHONPATH already set."""
    roots = [os.fspath(Path(swa_fast.__file__).resolve().parent.parent)]
    return roots + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]


def mergekit_python(given: str | None) -> tuple[str | None, str | None]:
    """(the interpreter that runs mergekit, None) or (None, why mergekit's row is left out)."""
    if given:
        try:
            found = subprocess.run([given, "-c", "import mergekit"], capture_output=True, text=True)
        except OSError as e:
            return None, f"{given} does not run ({e})"
        if found.returncode != 0:
            return None, f"mergekit does not import under {given}: {found.stderr.strip()[-300:]}"
        return given, None
    if importlib.util.find_spec("mergekit") is not None:
        return sys.executable, None
    return None, "mergekit is not installed here (pip install mergekit, or --mergekit-python PATH)"


# --- timing -------------------------------------------------------------------------------------------


@dataclass
class Timings:
    """Seconds per call of each method, and each fresh-process probe's answer."""

    seconds: dict[str, list[float]] = field(default_factory=dict)
    probes: dict[str, dict] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


def time_in_turns(methods: dict, out: Path, rounds: int, mergekit=None) -> Timings:
    """Each method called once to warm up, then `rounds` rounds in which they take turns, every
    output removed before each call; `mergekit` (a function running one merge in a fresh process,
    giving its probe's answer) takes its turn in each round too."""
    timings = Timings({m: [] for m in methods})
    for fn in methods.values():
        fn()
    for _ in range(rounds):
        for method, fn in methods.items():
            for path in _outputs(out):
                _remove(path)
            start = time.perf_counter()
            fn()
            timings.seconds[method].append(time.perf_counter() - start)
        if mergekit is not None:
            _mergekit_turn(timings, mergekit())
    return timings


def _above_imports(answer: dict) -> int:
    return answer["peak"] - answer["after_imports"]


def _mergekit_turn(timings: Timings, answer: dict) -> None:
    """One fresh process's mergekit run: its seconds, and its probe kept if its peak is the highest."""
    timings.seconds.setdefault(MERGE_MERGEKIT, []).extend(answer["seconds"])
    previous = timings.probes.get(MERGE_MERGEKIT, answer)
    timings.probes[MERGE_MERGEKIT] = max(previous, answer, key=_above_imports)


def peak_probes(python: str, paths, out: Path, timings: Timings) -> None:
    """Ours and naive once more each in a fresh process, for their peak resident memory."""
    strings = [os.fspath(p) for p in paths]
    for method, name, output in (
        (MERGE_METHOD, "swa_fast", out / "ours.safetensors"),
        (MERGE_NAIVE, "naive", out / "naive.safetensors"),
    ):
        spec = {"method": name, "inputs": strings, "output": os.fspath(output)}
        timings.probes[method] = probe(python, spec)


def rows(model: Model, k: int, dtype: str, timings: Timings) -> list[dict]:
    """A row per method: median seconds, GB/s of the K files' bytes, the fraction of the raw read's
    bandwidth, the speed-up over naive, peak memory above imports (MiB) and a fresh process's time."""
    read = k * model.nbytes(DTYPES[dtype])
    medians = {m: statistics.median(t) for m, t in timings.seconds.items() if t}
    labels = {
        "workload": f"{model.name} {MERGE_WORKLOAD}{k}",
        "params": dtype,
        "tensors": len(model.tensors),
        "elements": sum(torch.Size(s).numel() for _, s in model.tensors),
        "K": k,
        "read_MB": read / 1e6,
        "fused_sum": hasattr(swa_fast.ops, "weighted_sum_"),  # else the merge's torch stand-in
    }
    out = []
    for method, t in medians.items():
        row = {**labels, "method": method, "median_ms": t * 1e3, "GB/s": read / t / 1e9}
        row["runs_ms"] = [round(x * 1e3, 1) for x in timings.seconds[method]]  # the spread, on a busy machine
        row["of_raw_read"] = medians[MERGE_RAW] / t
        if MERGE_NAIVE in medians:
            row["x_vs_naive"] = medians[MERGE_NAIVE] / t
        answer = timings.probes.get(method)
        if answer is not None:
            row["peak_rss_above_imports_MiB"] = _above_imports(answer) / 2**20
            row["rss_after_imports_MiB"] = answer["after_imports"] / 2**20
            row["fresh_process_ms"] = statistics.median(answer["seconds"]) * 1e3
        out.append(row)
    return out


# --- the benchmark ------------------------------------------------------------------------------------


@dataclass
class Settings:
    ks: tuple[int, ...] = QUICK["ks"]
    dtypes: tuple[str, ...] = QUICK["dtypes"]
    rounds: int = ROUNDS
    mergekit_python: str | None = None
    folder: str | None = None  # where the checkpoints go (default: the system's temporary folder)


def bench_merge(model: Model, settings: Settings) -> list[dict]:
    """Rows for every K and dtype of `settings` (see the module's docstring); the checkpoints are
    written into a temporary folder, removed at the end."""
    python, why = mergekit_python(settings.mergekit_python)
    if model.config is None:
        python, why = None, f"mergekit reads models it knows: the {model.name} set has no architecture"
    if why:
        print(f"{why}: the mergekit rows are left out")
    buffer = memoryview(bytearray(RAW_BUFFER))
    out_rows = []
    with tempfile.TemporaryDirectory(prefix="swa_fast_merge_bench_", dir=settings.folder) as tmp:
        folder = Path(tmp)
        files = write_checkpoints(folder / "inputs", model, settings.dtypes, max(settings.ks))
        out = folder / "out"
        out.mkdir()
        for dtype in settings.dtypes:
            raw_read(files[dtype], buffer)  # the page cache warm: every file read once
            for k in settings.ks:
                print(f"  merging {k} {dtype} checkpoints", file=sys.stderr, flush=True)  # a long step
                paths = files[dtype][:k]
                mergekit = _mergekit_run(python, paths, dtype, folder) if python else None
                timings = time_in_turns(in_process(paths, out, buffer), out, settings.rounds, mergekit)
                peak_probes(sys.executable, paths, out, timings)
                out_rows += rows(model, k, dtype, timings)
    return out_rows


def _mergekit_run(python: str, paths, dtype: str, folder: Path):
    config = mergekit_config(paths, dtype, folder)
    spec = {
        "method": "mergekit",
        "config": os.fspath(config),
        "output": os.fspath(folder / "out" / "mergekit"),
        "options": MERGEKIT_OPTIONS,
    }
    return lambda: probe(python, spec)


def bench_merge_suite(shapes, name, device, min_run_time, full=False, mergekit_python=None) -> list[dict]:
    """The suite's step (`swa_fast bench`): the suite's first shape set as checkpoints, the quick
    or full K and dtypes; `device` and `min_run_time` are not used (a merge reads files on the CPU;
    each figure is a median of ROUNDS whole merges)."""
    del device, min_run_time
    chosen = FULL if full else QUICK
    settings = Settings(chosen["ks"], chosen["dtypes"], mergekit_python=mergekit_python)
    return bench_merge(model_of_set(shapes, name), settings)


def print_merge(rows) -> None:
    """The merge's figures in words: read fraction, speed-up over naive and mergekit (each timed in
    fresh processes too), peak memory above imports."""
    ours = [r for r in rows if r.get("method") == MERGE_METHOD]
    if ours:
        summed = "the fused weighted_sum_" if ours[0]["fused_sum"] else "its torch stand-in for weighted_sum_"
        print(f"\nmerging checkpoints (swa_fast.merge with {summed}):")
    for r in ours:
        same = {o["method"]: o for o in rows if (o["workload"], o["params"]) == (r["workload"], r["params"])}
        line = (
            f"{r['workload']} {r['params']}: {r['median_ms']:.0f} ms (runs {min(r['runs_ms']):.0f} to "
            f"{max(r['runs_ms']):.0f}), {r['GB/s']:.2f} GB/s read, "
            f"{r['of_raw_read']:.2f} of the raw read, {r['x_vs_naive']:.2f}x naive"
        )
        kit = same.get(MERGE_MERGEKIT)
        if kit is not None:  # mergekit runs in fresh processes only: against ours in both
            line += f", {kit['median_ms'] / r['median_ms']:.2f}x mergekit"
            line += f" ({kit['median_ms'] / r['fresh_process_ms']:.2f}x in fresh processes both)"
        peaks = ", ".join(
            f"{m.split(':')[0].split(' (')[0]} {o['peak_rss_above_imports_MiB']:.0f}"
            for m, o in same.items()
            if "peak_rss_above_imports_MiB" in o
        )
        print(f"  {line}; peak MiB above imports: {peaks}")


def main(argv=None) -> None:
    from swa_fast.benchmarks.report import print_table

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--k", type=int, nargs="+", default=list(FULL["ks"]), help="checkpoints per merge")
    p.add_argument("--dtype", nargs="+", default=list(FULL["dtypes"]), choices=list(DTYPES))
    p.add_argument("--set", default="gpt2-small", choices=list(SHAPE_SETS), help="the checkpoints' shapes")
    p.add_argument("--rounds", type=int, default=ROUNDS, help="timed calls per method (their median)")
    p.add_argument("--mergekit-python", help="an interpreter where mergekit is installed")
    p.add_argument("--dir", help="where to write the checkpoints (default: the system's temporary folder)")
    p.add_argument("--json", help="also write the rows to this file")
    args = p.parse_args(argv)
    settings = Settings(tuple(args.k), tuple(args.dtype), args.rounds, args.mergekit_python, args.dir)
    model = model_of_set(SHAPE_SETS[args.set](), args.set)
    print(f"merging {model.name} checkpoints ({torch.get_num_threads()} threads), K = {list(settings.ks)}")
    out = bench_merge(model, settings)
    print_table(out)
    print()
    print_merge(out)
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
