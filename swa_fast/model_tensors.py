"""Which tensors of a model a manager keeps, and the check that it is still the same model.

Every manager (SWA, EMA, SWAG, FGE snapshots) keeps copies of a model's floating parameters (and
buffers, when asked) and the integer buffers beside them. `TrackedModel` lists those tensors in
one fixed order, with their names, and refuses a model whose tensors changed: a parameter that was
replaced or added would otherwise be averaged with another parameter's history.

Distributed models (see distributed.py): a DDP wrapper is looked through; FSDP2 / DTensor
parameters are tracked by their local shards, which `tensors()` returns and `ModelCopy` stores, so
every manager averages, saves and loads shards without knowing about them; `ModelCopy.named()`
turns the stored shards back into DTensors laid out as the parameters. When the model is DDP or
FSDP2, every rank must build its manager from the same model, which is checked across ranks.
"""

from __future__ import annotations

import operator
import weakref
from collections.abc import Callable, Iterable, Sequence
from itertools import chain

import torch
from torch import Tensor
from torch.nn import Module

from . import distributed, zero
from .flat import FlatBuffer, copy_into_strided, copy_lists, own_bytes
from .ops import _C
from .wrappers import unwrap

# The extension's identity test over a module's dicts (None without the extension: the list's own).
_same_values = getattr(_C, "same_values", None)


def module_tensors(module: Module, buffers: bool) -> list[Tensor]:
    """`list(module.parameters())`, then `.buffers()` when asked: the same tensors in the same order,
    each once, read straight from the modules' dicts (faster than nn.Module's walk and much faster
    than its generators: docs/benchmarks.md). An update reads the model through a `ModuleWalk`
    instead, which does not walk the modules again until they change: for a model of a hundred
    modules the walk alone could cost more than the update itself."""
    return _each_once(_walk(module, True, buffers))


def module_buffers(module: Module) -> list[Tensor]:
    """`list(module.buffers())`, as fast as `module_tensors`."""
    return _each_once(_walk(module, False, True))


def _walk(module: Module, parameters: bool, buffers: bool) -> list[Tensor]:
    """The parameters of `module` and its submodules, then their buffers (each when asked), in
    nn.Module's depth-first order, read from the modules' own dicts. A module reached twice (shared)
    gives its tensors twice: `_each_once` keeps their first places, which are nn.Module's."""
    params = list(module._parameters.values()) if parameters else []
    bufs = list(module._buffers.values()) if buffers else []

    def visit(parent: Module) -> None:
        for child in parent._modules.values():
            if child is not None:
                if parameters:
                    params.extend(child._parameters.values())
                if buffers:
                    bufs.extend(child._buffers.values())
                if child._modules:
                    visit(child)

    visit(module)
    return [t for t in params + bufs if t is not None]


def _first_places(ids: list[int]) -> list[int] | None:
    """The position of each id's first occurrence, in order; None when every id occurs once."""
    if len(set(ids)) == len(ids):
        return None
    first: dict[int, int] = {}
    for i, key in enumerate(ids):
        first.setdefault(key, i)
    return sorted(first.values())


def _each_once(tensors: list[Tensor]) -> list[Tensor]:
    """Shared tensors keep their first place only, as nn.Module's generators do."""
    keep = _first_places(list(map(id, tensors)))
    return tensors if keep is None else [tensors[i] for i in keep]


class _Registrations:
    """How many modules, parameters and buffers were registered anywhere since import (torch's
    global registration hooks count them): a `ModuleWalk` made at one count knows that no module
    gained or swapped one through `setattr`, `register_*` or `add_module` while it is unchanged."""

    count = 0

    @classmethod
    def seen(cls, *_args) -> None:
        cls.count += 1


torch.nn.modules.module.register_module_module_registration_hook(_Registrations.seen)
torch.nn.modules.module.register_module_parameter_registration_hook(_Registrations.seen)
torch.nn.modules.module.register_module_buffer_registration_hook(_Registrations.seen)


class ModuleWalk:
    """`module_tensors(module, buffers)` (or `module_buffers(module)` with `parameters=False`) for
    every update, without walking the modules each time. The walk's modules are remembered, and
    their tensors are read from those modules' own dicts on every call, so a tensor replaced in
    place of another, however it was replaced (`Module.to` swaps buffers without any hook), is seen
    at once. The list of modules is walked again when it may be stale: after any registration
    (torch's global hooks: a module set or added) or when the modules' children are not the very
    modules seen at the walk (a `del`, or a module written straight into a `_modules` dict, which
    runs no hook: `model._modules["1"] = head`), compared by identity over every module's
    `_modules` dict, empty ones too, by the extension.

    `tensors()` reads only the dicts that held something at the walk (most modules hold no
    buffers); `holds()` reads them all, so a tensor written straight into an empty `_parameters` /
    `_buffers` dict without `register_*` is seen there (and the modules walked again). A module's
    whole dict replaced by another object (`m._parameters = {...}`) is not seen. The module is held
    weakly; its dicts strongly, until it is freed."""

    def __init__(self, module: Module, parameters: bool = True, buffers: bool = False) -> None:
        self.kinds = [kind for kind, asked in (("_parameters", parameters), ("_buffers", buffers)) if asked]
        me = weakref.ref(self)

        def forget(_ref: weakref.ref) -> None:  # the model is gone: hold none of its tensors
            if (walk := me()) is not None:
                walk._values = walk._parents = walk._children = walk._dicts = []
                walk._parts = [([], None) for _ in walk.kinds]

        self._module = weakref.ref(module, forget)
        self.walks = 0  # times the modules were walked: what was derived from a walk is stale once it grows
        self._walk(module)

    def _walk(self, module: Module) -> None:
        order, stack, seen = [], [module], set()
        while stack:  # depth first, each module once, children in registration order
            m = stack.pop()
            if id(m) not in seen:
                seen.add(id(m))
                order.append(m)
                stack.extend(c for c in reversed(m._modules.values()) if c is not None)
        self._registrations = _Registrations.count
        # every module's children, in order: a module written straight into a `_modules` dict (no
        # hook runs) is seen by identity, in a leaf's empty dict too
        self._parents = [m._modules for m in order]
        self._children = [c for d in self._parents for c in d.values() if c is not None]
        # Per kind: the values of its non-empty dicts (live views: what the dicts hold when read),
        # and what to keep of them.
        self._parts = []
        self._dicts = []  # every module's dicts of the kinds, empty ones too (for `holds`)
        for kind in self.kinds:
            dicts = [getattr(m, kind) for m in order]
            values = [d.values() for d in dicts if d]
            self._dicts += dicts
            self._parts.append((values, _keeper(list(chain.from_iterable(values)))))
        self._values = [v for values, _ in self._parts for v in values]
        self._length = sum(map(len, self._values))  # entries at the walk, None and shared ones included
        walked = list(chain.from_iterable(self._values))
        self._pick = _keeper(walked)
        # a tensor listed twice (shared by two modules): `holds` then compares the kept list
        self._shared = _first_places([id(t) for t in walked if t is not None]) is not None
        self.walks += 1

    def holds(self, expected: list[Tensor]) -> bool:
        """Whether the module holds the very objects of `expected`, in order (what `tensors()`
        gives): the identity test of `same_tensors`, over every module's dicts, those empty at the
        walk included, by the extension where it can (without building the list). When not, the
        modules are walked again, so that `tensors()` sees what changed (an entry written straight
        into a dict that was empty)."""
        self._check()
        if not self._shared and _same_values is not None:  # (it leaves out None entries itself)
            if _same_values(self._dicts, expected):
                return True
        else:
            walked = list(chain.from_iterable(d.values() for d in self._dicts))
            if len(walked) == self._length and same_tensors(self._keep(walked), expected):
                return True
        if (module := self._module()) is not None:
            self._walk(module)
        return False

    def _keep(self, walked: list) -> list:
        return walked if self._pick is None else self._pick(walked)

    def _check(self) -> None:
        """Walk again if the walk may be stale: a registration anywhere, or other children."""
        if _Registrations.count != self._registrations or not self._same_children():
            if (module := self._module()) is not None:
                self._walk(module)

    def _same_children(self) -> bool:
        """Whether every module walked holds the very children it held at the walk, in order."""
        if _same_values is not None:  # (it leaves out None entries, as `_children` does)
            return _same_values(self._parents, self._children)
        now = [c for d in self._parents for c in d.values() if c is not None]
        return same_tensors(now, self._children)

    def tensors(self) -> list[Tensor]:
        """The module's tensors now (its parameters, then its buffers, as asked), each once."""
        self._check()
        walked = list(chain.from_iterable(self._values))
        return walked if self._pick is None else self._pick(walked)

    def parts(self) -> tuple[list[Tensor], list[Tensor]]:
        """The module's parameters and its buffers now, each list's tensors once (a walk of both,
        written out for two rather than looped over the kinds: it runs on every update)."""
        self._check()
        (params, keep_params), (buffers, keep_buffers) = self._parts
        params, buffers = list(chain.from_iterable(params)), list(chain.from_iterable(buffers))
        return (
            params if keep_params is None else keep_params(params),
            buffers if keep_buffers is None else keep_buffers(buffers),
        )


def _keeper(walked: list) -> Callable[[list], list] | None:
    """What `pick` keeps of a list laid out as `walked`: each tensor once (shared ones at their
    first place), no None (an unset bias); None when that is all of it."""
    first = _first_places([id(t) for t in walked])
    keep = [i for i in (range(len(walked)) if first is None else first) if walked[i] is not None]
    return None if len(keep) == len(walked) else pick(keep)


def pick(keep: list[int]) -> Callable[[list], list]:
    """A function giving `[items[i] for i in keep]` of a list `items`, in C where it can."""
    if len(keep) < 2:
        return lambda items: [items[i] for i in keep]
    get = operator.itemgetter(*keep)
    return lambda items: list(get(items))


def same_tensors(a: Sequence, b: Sequence) -> bool:
    """Whether the lists hold the very same objects, in order (identity: a tensor's == compares
    values): the one answer to "same tensors?" of every tracked model and plan."""
    return len(a) == len(b) and all(map(operator.is_, a, b))


class ModulesWatch:
    """Whether modules still hold the tensors they held at the last look: their parameters and
    buffers, read live by a `ModuleWalk` each (no walk of the modules unless they changed), and
    compared by identity with what the last call saw. For a caller that keeps a plan of those
    tensors (an integration's EMA copy and model) and makes a new one when they changed."""

    def __init__(self, *modules: Module) -> None:
        self._walks = [ModuleWalk(m, True, True) for m in modules]
        self._seen = [walk.tensors() for walk in self._walks]

    def changed(self) -> bool:
        """Whether any tensor is another object than at the last call (or construction)."""
        if all(walk.holds(seen) for walk, seen in zip(self._walks, self._seen)):
            return False
        self._seen = [walk.tensors() for walk in self._walks]
        return True


def save_own_bytes(module: Module) -> None:
    """Make every state_dict of `module` or of any of its submodules give its tensors through
    `flat.own_bytes` (a state_dict post-hook on each): for a module whose tensors view flat buffers
    (an averaged copy), so that a saved state, or any part of one, holds only its own bytes, as a
    plain module's does. `keep_vars=True` still gives the tensors themselves."""
    for m in module.modules():
        m.register_state_dict_post_hook(_own_bytes_entries)


def _own_bytes_entries(module: Module, state: dict, prefix: str, _metadata: dict) -> None:
    """The post-hook of `save_own_bytes`: this module's own entries (its submodules' have theirs),
    but for the tensors themselves (`keep_vars=True`)."""
    for name, tensor in chain(module._parameters.items(), module._buffers.items()):
        value = state.get(prefix + name)
        if value is not None and value is not tensor:
            state[prefix + name] = own_bytes(value)


def module_names(module: Module, buffers: bool) -> list[str]:
    """Names of `module_tensors(module, buffers)`, in its order."""
    names = [name for name, _ in module.named_parameters()]
    if buffers:
        names += [name for name, _ in module.named_buffers()]
    return names


def _no_model() -> None:
    """The tracked model's weak reference while there is none (after unpickling)."""
    return None


class TrackedModel:
    """The tensors of `model` a manager keeps: its parameters, then its buffers with
    `buffers=True`, split into floating ones (averaged, snapshotted) and integer ones (copied).

    `owner` names the manager in error messages. A manager passes `options`, its settings as a
    list of (name, value) pairs (maybe empty), to have them and the model checked to be the same on
    every rank of a DDP / FSDP2 model: a collective, so every rank must create it. None (a helper's
    passing use, which rank 0 may make alone) checks nothing across ranks. `source` says what an
    average of a DeepSpeed ZeRO parameter follows: its own partition ("params") or the optimizer's
    fp32 copy of it ("master"); see zero.py.
    """

    def __init__(
        self, model: Module, buffers: bool, owner: str, options: list | None = None, source: str = "params"
    ) -> None:
        check_model(model, owner)
        wrapper, model = model, unwrap(model)[0]
        distributed.reshard(model)  # track the sharded FSDP2 parameters, not gathered ones
        self.buffers = buffers
        tensors = self._attach(model, _walk(model, True, buffers))
        # a DTensor's layout, a ZeRO parameter's partition, or None
        self.layouts = [distributed.layout_of(t, source) for t in tensors]
        self.sharded = any(s is not None for s in self.layouts)
        self.owner = owner
        self.names = module_names(model, buffers)
        self.shapes = [t.shape if s is None else s.shape for t, s in zip(tensors, self.layouts)]  # global
        self.floating = [i for i, t in enumerate(tensors) if t.is_floating_point()]
        self.integer = [i for i, t in enumerate(tensors) if not t.is_floating_point()]
        if options is None:
            return
        # A model that differs between ranks must raise on every rank, not leave some waiting in a
        # later collective (a DCP save, a full-state-dict gather) or silently average other tensors.
        fingerprint = [("option " + k, v) for k, v in options] + [("use_buffers", buffers)]
        fingerprint += [
            (f"'{n}'", (str(t.dtype), *((list(t.shape),) if s is None else (s.describe(),))))
            for n, t, s in zip(self.names, tensors, self.layouts)
        ]
        distributed.check_same_on_all_ranks(fingerprint, distributed.groups_of(wrapper, self.layouts), owner)

    def _attach(self, model: Module, walked: list[Tensor]) -> list[Tensor]:
        """Track `model` (unwrapped), whose walk gave `walked`; give its tensors, each once."""
        tensors = _each_once(walked)
        # Every update checks that the model still holds these very tensors (an identity check:
        # a replaced one is refused even when it got the old one's id). They are held until the
        # model is freed, not after: a manager must not keep a dropped model's memory alive.
        self._tracked = tensors
        self._walk = ModuleWalk(model, True, self.buffers)
        me = weakref.ref(self)

        def freed(_ref: weakref.ref) -> None:
            if (tracked := me()) is not None:
                tracked._tracked = []

        self._model = weakref.ref(model, freed)
        self._sharded_model = self._model  # the model whose shards `tensors()` gave last
        self._whole: list[Tensor] = []  # the tensors whose pieces `tensors()` gave last
        return tensors

    # Pickling (a manager saved whole with torch.save, or deep-copied) keeps what was tracked, not
    # the model, which is only referenced weakly: an unpickled one tracks the first model it is
    # given with the same names (as after the tracked model was freed, see `tensors()`).
    _MODEL_REFERENCES = ("_tracked", "_walk", "_model", "_sharded_model", "_whole")

    def __getstate__(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if k not in self._MODEL_REFERENCES}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._tracked, self._walk, self._whole = [], None, []
        self._model = self._sharded_model = _no_model

    def tensors(self, model: Module) -> list[Tensor]:
        """The model's tensors, in the tracked order (a DTensor's local shard or a ZeRO parameter's
        partition in its place): what an update reads. The
        model it was made from must still hold the very same tensors; another model (say a deepcopy
        for evaluation) must have the same names and the same DTensor layouts. Once the tracked
        model is gone (freed, or this was unpickled), the next model given is tracked instead."""
        if torch.compiler.is_compiling() and not self.sharded:
            # Traced by torch.compile, which cannot read the walk's dict views: nn.Module's own
            # walk, which it follows (and guards, so this check costs nothing once compiled).
            inner = unwrap(model)[0]
            tensors = list(inner.parameters()) + (list(inner.buffers()) if self.buffers else [])
            if same_tensors(tensors, self._tracked):
                return tensors
        tracked = self._model()
        if model is not tracked:  # (the model itself, the usual case, needs no unwrapping)
            check_model(model, self.owner)
            model = unwrap(model)[0]
        tensors = self._tracked_tensors(model) if model is tracked else self._other_tensors(model)
        if not self.sharded:
            return tensors
        self._sharded_model, self._whole = weakref.ref(model), tensors
        return distributed.local_tensors(tensors, self.layouts)

    def targets(self, model: Module) -> list[Tensor]:
        """The tensors a read of the average writes, in the tracked order: `tensors(model)`, but
        for a ZeRO average of the optimizer's master partitions, the parameters' own pieces. After
        writing them, call `after_write()`."""
        if not self.sharded:
            return self.tensors(model)
        self.tensors(model)  # checks it is the model (or one like it)
        return distributed.local_targets(self._whole, self.layouts)

    def _tracked_tensors(self, model: Module) -> list[Tensor]:
        """The tracked model's tensors, read through the walk; raise unless they are the very ones
        tracked."""
        if self._walk.holds(self._tracked):  # the usual update: the very tensors tracked
            return self._tracked
        tensors = self._walk.tensors()
        if not same_tensors(tensors, self._tracked):
            # After a forward without backward the FSDP2 root holds gathered parameters.
            if distributed.reshard(model):
                tensors = self._walk.tensors()
            if not same_tensors(tensors, self._tracked):
                found = module_tensors(model, self.buffers)  # (a walk's list may hold a None)
                raise ValueError(self._describe_change(module_names(model, self.buffers), found))
        return tensors

    def _other_tensors(self, model: Module) -> list[Tensor]:
        """Another model's tensors (a deepcopy, or the next model once the tracked one is gone):
        the same names and layouts, else raise."""
        tensors = module_tensors(model, self.buffers)
        if (names := module_names(model, self.buffers)) != self.names:
            raise ValueError(self._describe_change(names, None))
        if self.sharded and distributed.reshard(model):
            tensors = module_tensors(model, self.buffers)
        distributed.check_layouts(self.names, tensors, self.layouts, self.owner)
        if self._model() is None:  # freed, or never here (unpickled): track this one from now on
            self._attach(model, _walk(model, True, self.buffers))
        return tensors

    def before_write(self) -> None:
        """Call before writing into the shards that `tensors()` gave. After a forward pass FSDP2
        and FSDP1 keep some modules' gathered parameters (the root's always) and reuse them in the
        next forward, which would then not see the written values: drop them (no communication).
        (FSDP1's parameters are plain tensors, views of each rank's shard: not `sharded` here.)"""
        if (model := self._sharded_model()) is not None:
            distributed.reshard(model)

    def after_write(self) -> None:
        """Call after writing into what `targets()` gave: the whole parameters a forward uses are
        made to agree with the pieces written (ZeRO's gathered copies; a collective then)."""
        partitions = [(t, s) for t, s in zip(self._whole, self.layouts) if isinstance(s, zero.Partition)]
        if partitions:
            zero.after_write(*map(list, zip(*partitions)))

    @property
    def model(self) -> Module | None:
        """The model this was made from, while it lives."""
        return self._model()

    def split(self, tensors: list[Tensor]) -> tuple[list[Tensor], list[Tensor]]:
        """(floating, integer) tensors of a `tensors()` list."""
        if not self.integer:
            return tensors, []
        return [tensors[i] for i in self.floating], [tensors[i] for i in self.integer]

    @property
    def floating_names(self) -> list[str]:
        return [self.names[i] for i in self.floating]

    @property
    def integer_names(self) -> list[str]:
        return [self.names[i] for i in self.integer]

    def check_state(self, saved: dict, mine: dict[str, Tensor]) -> None:
        """Raise, naming the first mismatch, unless `saved` holds exactly `mine`'s names with their
        shapes (a state_dict of this model)."""
        for name, tensor in mine.items():
            if name not in saved:
                raise ValueError(f"swa_fast: the state_dict has no '{name}' (is it of another model?)")
            value = saved[name]
            if not isinstance(value, Tensor) or value.shape != tensor.shape:
                got = list(value.shape) if isinstance(value, Tensor) else type(value).__name__
                raise ValueError(
                    f"swa_fast: '{name}' has shape {got} in the state_dict but {list(tensor.shape)} here"
                )
        extra = sorted(set(saved) - set(mine))
        if extra:
            raise ValueError(f"swa_fast: the state_dict has entries this model lacks, first '{extra[0]}'")

    def local_state(self, saved: dict, names: list[str] | None = None, lead: tuple = ()) -> dict[str, Tensor]:
        """Check that `saved` holds exactly `names` (default: all) with this model's (global) shapes,
        each behind `lead` extra leading dims, then give name -> this rank's part: a DTensor's local
        shard, or the slice of a full tensor that this rank holds (no communication); plain tensors
        pass through. Loads a manager's own per-tensor state kept beside a ModelCopy (say SWAG's)."""
        names = self.names if names is None else names
        where = {name: i for i, name in enumerate(self.names)}
        shapes = {n: torch.empty((*lead, *self.shapes[where[n]]), device="meta") for n in names}
        for n in names:  # a ZeRO partition's saved piece
            layout, value = self.layouts[where[n]], saved.get(n)
            if isinstance(layout, zero.Partition) and isinstance(value, Tensor) and not lead:
                if value.shape in layout.saved_shapes():
                    shapes[n] = torch.empty(value.shape, device="meta")
        self.check_state(saved, shapes)
        layouts = {n: distributed.with_lead(self.layouts[where[n]], lead) for n in names}
        return {n: distributed.local_part(saved[n], layouts[n], n) for n in names}

    def shard_state(self, local: dict[str, Tensor], lead: tuple = ()) -> dict[str, Tensor]:
        """name -> this rank's part (as `tensors()` gives, behind `lead` extra leading dims) made
        DTensors laid out as the model's tensors, so torch.distributed.checkpoint saves it sharded
        and loads into it in place; as is for a model without DTensors. The inverse of
        `local_state`."""
        if not self.sharded:
            return local
        where = {name: i for i, name in enumerate(self.names)}
        layouts = {n: distributed.with_lead(self.layouts[where[n]], lead) for n in local}
        return {n: distributed.as_dtensor(t, layouts[n]) for n, t in local.items()}

    def _describe_change(self, names: list[str], tensors: list[Tensor] | None) -> str:
        for i, (expected, got) in enumerate(zip(self.names, names)):
            if expected != got:
                what = f"expected '{expected}', found '{got}'"
                break
            if tensors is not None and self._tracked[i] is not tensors[i]:
                what = f"'{expected}' was replaced"
                break
        else:
            what = f"it had {len(self.names)} tensors, it has {len(names)}"
        return (
            f"swa_fast: the model is not the one this {self.owner} was made for ({what}); "
            "going on would mix different tensors. Create a new one for the new model."
        )


def check_model(model, owner: str) -> None:
    """Refuse anything but an nn.Module where a manager takes the model, saying what came. Passing
    `model.parameters()` is the habit of torch-ema and diffusers, whose classes take parameters."""
    if isinstance(model, Module):
        return
    what = type(model).__name__
    if isinstance(model, Tensor):
        what = "a tensor"
    elif isinstance(model, Iterable):
        what = f"a {what} (such as model.parameters(), what torch-ema and diffusers take)"
    raise ValueError(
        f"swa_fast.{owner}: expected the model itself (a torch.nn.Module), got {what}; pass the module "
        "whose parameters these are. (swa_fast.integrations.torch_ema.ExponentialMovingAverage and "
        "swa_fast.integrations.diffusers.EMAModel take parameters, as the originals do.)"
    )


class ModelCopy:
    """A copy of a tracked model's tensors: the floating ones in a FlatBuffer (`dtype` and `device`
    are choices, e.g. an fp32 average of a bf16 model, or a bf16 snapshot), the integer ones cloned.
    Moving values in and out of the model is one fused copy per flat group.

    Kept on the CPU for a GPU model (`device="cpu"`, best with `pin_memory=True`), a `save` is
    asynchronous: it returns before the copy lands, and `wait()` (which every CPU-side reader here
    calls) blocks until it has. Loads back to the GPU are synchronous, so the CPU may write the
    copy again as soon as a load returns."""

    def __init__(
        self,
        tracked: TrackedModel,
        tensors: list[Tensor],
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
        pin_memory: bool = False,
        backend: str | None = None,
    ) -> None:
        floating, integer = tracked.split(tensors)
        self.tracked = tracked
        self.backend = backend
        self.flat = FlatBuffer(
            floating, dtype=dtype, device=device, pin_memory=pin_memory, names=tracked.floating_names
        )
        self.integers = [t.detach().to(device or t.device, copy=True) for t in integer]
        if pin_memory:
            self.integers = [t.pin_memory() for t in self.integers]
        # The GPUs whose tensors a save copies to host memory, asynchronously.
        on_host = device is not None and torch.device(device).type == "cpu"
        self._gpus_to_host = sorted({t.device for t in tensors if t.is_cuda}, key=str) if on_host else []
        self._saved: list[torch.cuda.Event] = []  # one per GPU, at the end of an asynchronous save

    def wait(self) -> None:
        """Block until the last `save` has landed (a no-op unless it copied from a GPU)."""
        for event in self._saved:
            event.synchronize()
        self._saved = []

    def stored(self) -> list[Tensor]:
        """The stored tensors, in the order of `tracked.tensors()` (complete once `wait()`ed)."""
        out: list[Tensor] = [torch.empty(0)] * len(self.tracked.names)
        for i, v in zip(self.tracked.floating, self.flat.views):
            out[i] = v
        for i, t in zip(self.tracked.integer, self.integers):
            out[i] = t
        return out

    def nbytes(self) -> int:
        return self.flat.nbytes() + sum(t.numel() * t.element_size() for t in self.integers)

    def named(self) -> dict[str, Tensor]:
        """name -> stored tensor (the flat buffers' memory, each entry a storage of its own bytes:
        `flat.own_bytes`), in the model's order. A DTensor parameter's entry is a DTensor over the
        stored shard, laid out as the parameter, so torch.distributed.checkpoint saves it sharded
        and loads straight into the flat buffer."""
        self.wait()
        if self.tracked.sharded:
            out = dict(zip(self.tracked.floating_names, self.flat.views))
            out.update(zip(self.tracked.integer_names, self.integers))
            layouts = zip(self.tracked.names, self.tracked.layouts)
            return {name: distributed.as_dtensor(out[name], layout) for name, layout in layouts}
        # each a tensor of its own bytes (flat.own_bytes): a part of the state saves only its own
        out = dict(zip(self.tracked.floating_names, map(own_bytes, self.flat.views)))
        out.update(zip(self.tracked.integer_names, self.integers))
        return {name: out[name] for name in self.tracked.names}

    @torch.no_grad()
    def save(self, tensors: list[Tensor]) -> None:
        """Store the model's `tensors` (from `tracked.tensors(model)`) here."""
        floating, integer = self.tracked.split(tensors)
        if len(self.flat.groups) > 1:
            self.flat.check_shapes(floating)
        self.wait()
        for _, views, src in self.flat.pairs(floating):
            copy_lists(views, src, non_blocking=True, backend=self.backend)
        copy_lists(self.integers, integer, non_blocking=True)
        for gpu in self._gpus_to_host:  # each GPU's copies run on its own current stream
            self._saved.append(torch.cuda.Event())
            self._saved[-1].record(torch.cuda.current_stream(gpu))

    @torch.no_grad()
    def load(self, tensors: list[Tensor]) -> None:
        """Write the stored values into the model's `tensors`, cast to their dtypes, through each
        tensor's own strides (a channels_last or transposed parameter receives them too)."""
        floating, integer = self.tracked.split(tensors)
        self.flat.check_shapes(floating)  # every group, before any is written
        self.tracked.before_write()
        self.wait()
        for _, views, dst in self.flat.pairs(floating):
            copy_into_strided(dst, views, backend=self.backend)
        copy_lists(integer, self.integers)
        self.tracked.after_write()

    @torch.no_grad()
    def load_named(self, saved: dict) -> None:
        """Restore from a `named()` dict (say from a state_dict); checks everything before writing
        anything. For a DTensor parameter, the entry may be a DTensor laid out alike or a full
        tensor (from `distributed.full_state_dict`), of which this rank keeps its part."""
        saved = self.tracked.local_state(saved)  # checks every entry, then this rank's parts
        self.wait()  # a save in flight lands before it is overwritten
        for _, views, names in self.flat.pairs(self.tracked.floating_names):
            values = [saved[name].to(v.device) for name, v in zip(names, views)]
            copy_lists(views, values, backend=self.backend)
        for kept, name in zip(self.integers, self.tracked.integer_names):
            kept.copy_(saved[name])
