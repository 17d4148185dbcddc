"""The engine (engine.UpdatePlan) and the one "same tensors?" test (model_tensors.same_tensors,
ModuleWalk.holds, ModulesWatch) that every manager, drop-in and integration updates through."""

import pytest
import torch

import swa_fast
from swa_fast.engine import UpdatePlan
from swa_fast.model_tensors import ModulesWatch, ModuleWalk, same_tensors


def bn_model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.BatchNorm1d(6), torch.nn.Linear(6, 2))


def test_a_walk_holds_exactly_the_tensors_it_gives():
    model = bn_model()
    walk = ModuleWalk(model, True, True)
    tensors = walk.tensors()
    assert walk.holds(tensors) and same_tensors(tensors, list(model.parameters()) + list(model.buffers()))
    assert not walk.holds(tensors[:-1])
    assert not walk.holds(tensors + [tensors[0]])
    assert not walk.holds([tensors[1], tensors[0], *tensors[2:]])
    assert not walk.holds([t.clone() for t in tensors])  # equal values, other objects
    model[2]._parameters["weight"] = torch.nn.Parameter(model[2].weight.detach().clone())  # no hook runs
    assert not walk.holds(tensors) and walk.holds(walk.tensors())
    tensors = walk.tensors()
    model.double()  # Module.to swaps the buffers without a hook, the parameters' storage in place
    assert not walk.holds(tensors) and walk.holds(walk.tensors())


def test_a_walk_with_a_shared_or_missing_tensor_holds_what_it_gives():
    model = torch.nn.Sequential(torch.nn.Linear(3, 3, bias=False), torch.nn.Linear(3, 3))
    model[1].weight = model[0].weight  # shared: listed once, as nn.Module does
    walk = ModuleWalk(model, True, True)
    assert walk.holds(list(model.parameters()))
    assert not walk.holds([model[0].weight, model[0].weight, model[1].bias])
    unshared = torch.nn.Sequential(torch.nn.Linear(3, 3, bias=False), torch.nn.Linear(3, 3))
    walk = ModuleWalk(unshared, True, True)  # the first bias is None: no tensor
    tensors = list(unshared.parameters())
    assert walk.holds(tensors) and not walk.holds([None, *tensors])
    unshared[0].bias = torch.nn.Parameter(torch.zeros(3))
    assert not walk.holds(tensors) and walk.holds(list(unshared.parameters()))


def test_a_watch_sees_a_replaced_tensor_of_either_module_once():
    average, model = bn_model(), bn_model()
    watch = ModulesWatch(average, model)
    assert not watch.changed()
    model[1].running_mean = torch.zeros(6)
    assert watch.changed()
    assert not watch.changed()


def test_an_update_reads_a_parameter_given_new_storage_in_place():
    """The plan keeps tensor objects: after `p.data = ...` (same shape, other memory, strides or
    dtype) the op reads the tensor where it now lives; a new shape is refused and writes nothing."""
    model = torch.nn.Linear(4, 3)
    ema = swa_fast.EMA(model, decay=0.5)
    ema.update(model)
    start = ema.average.views[0].clone()
    for value in (
        torch.full((3, 4), 7.0),
        torch.full((4, 3), 2.0).t(),
        torch.full((3, 4), -1.0, dtype=torch.float64),
    ):
        model.weight.data = value
        before = ema.average.views[0].clone()
        ema.update(model)
        torch.testing.assert_close(ema.average.views[0], 0.5 * before + 0.5 * value.float())
    assert not torch.equal(ema.average.views[0], start)
    model.weight.data = torch.zeros(5, 4)
    kept = [v.clone() for v in ema.average.views]
    with pytest.raises(ValueError, match=r"'weight' has shape \[5, 4\]"):
        ema.update(model)
    assert all(torch.equal(v, k) for v, k in zip(ema.average.views, kept))


def test_a_plan_checks_every_group_before_writing_any():
    """Two devices' worth of groups stand in as two dtypes and an integer pair: a mismatch in the
    last group leaves the first as it was."""
    targets = [torch.zeros(3), torch.zeros(2, dtype=torch.bfloat16), torch.zeros((), dtype=torch.long)]
    sources = [torch.ones(3), torch.ones(2, dtype=torch.bfloat16), torch.tensor(5)]
    plan = UpdatePlan("lerp_", [targets], sources, owner="test", names=["a", "b", "count"])
    plan.run(sources, 0.5)
    assert torch.equal(targets[0], torch.full((3,), 0.5)) and int(targets[2]) == 5
    bad = [torch.ones(3), torch.ones(4, dtype=torch.bfloat16), torch.tensor(6)]
    with pytest.raises(ValueError, match=r"'b' has shape \[4\]"):
        plan.run(bad, 0.5)
    assert torch.equal(targets[0], torch.full((3,), 0.5)) and int(targets[2]) == 5


def test_a_plan_copies_integer_pairs_only_where_the_update_counts():
    targets = [torch.zeros(2), torch.tensor(1)]
    sources = [torch.ones(2), torch.tensor(9)]
    plan = UpdatePlan("lerp_", [targets], sources, owner="test")
    plan.run(sources, 0.0, counted=torch.tensor(False))
    assert int(targets[1]) == 1
    plan.run(sources, 0.0, counted=torch.tensor(True))
    assert int(targets[1]) == 9


def test_a_plan_refuses_sources_elsewhere_unless_moving_them():
    meta = [torch.empty(2, device="meta")]
    with pytest.raises(ValueError, match="expected one device, or allow_it=True"):
        UpdatePlan("lerp_", [[torch.zeros(2)]], meta, owner="test", move_option="allow_it=True")


def test_the_extensions_identity_test_agrees_with_the_lists_and_refuses_what_is_not_dicts():
    from swa_fast.ops import _C

    if _C is None:
        pytest.skip("built without the extension (SWA_FAST_NO_EXT=1): ModuleWalk.holds compares lists")
    a, b = torch.zeros(1), torch.zeros(1)
    assert _C.same_values([{"x": a}, {"y": b}], [a, b])
    assert not _C.same_values([{"x": a}, {"y": b}], [b, a])
    assert not _C.same_values([{"x": a}], [a, b]) and not _C.same_values([{"x": a}, {"y": b}], [a])
    assert _C.same_values([], [])
    assert _C.same_values([{"weight": a, "bias": None}], [a])  # an unset bias is no tensor
    with pytest.raises(TypeError, match=r"dicts\[0\] is a list, expected a dict"):
        _C.same_values([[a]], [a])
    with pytest.raises(TypeError, match="same_values"):
        _C.same_values({"x": a}, [a])


def test_a_tensor_written_into_a_dict_that_was_empty_is_seen():
    """named_parameters() shows a parameter written straight into a module's empty `_parameters`
    (no registration hook runs): the walk's identity test sees it too, and a manager refuses."""
    model = torch.nn.Sequential(torch.nn.Linear(3, 3), torch.nn.ReLU(), torch.nn.Linear(3, 1))
    walk = ModuleWalk(model, True, False)
    tensors = walk.tensors()
    ema = swa_fast.EMA(model)
    model[1]._parameters["scale"] = torch.nn.Parameter(torch.ones(1))
    assert not walk.holds(tensors)
    assert same_tensors(walk.tensors(), list(model.parameters()))
    with pytest.raises(ValueError, match="expected '2.weight', found '1.scale'"):
        ema.update(model)
    del model[1]._parameters["scale"]
    assert walk.holds(tensors)
    ema.update(model)


@pytest.mark.parametrize("groups", [1, 2])
def test_a_plan_goes_on_after_its_target_became_strided(groups):
    """An averaged copy converted after its plan was made (`.to(memory_format=channels_last)` keeps
    the parameter object and makes its storage strided): the op refuses the stale plan before
    writing, and `run` and `check` plan anew and write through the strides, with an integer pair
    (two groups, checked together first) too."""
    weight = torch.zeros(2, 3, 4, 4)
    targets, sources = [weight], [torch.ones(2, 3, 4, 4)]
    if groups == 2:
        targets.append(torch.zeros((), dtype=torch.long))
        sources.append(torch.tensor(5))
    lerp = UpdatePlan("lerp_", [targets], sources, owner="test")
    copy = UpdatePlan("copy_", [targets], sources, owner="test")
    weight.data = weight.to(memory_format=torch.channels_last)
    copy.check(sources)
    lerp.run(sources, 0.5)
    assert weight.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(weight, torch.full_like(weight, 0.5))
    copy.run(sources)
    assert torch.equal(weight, torch.ones_like(weight)) and all(int(t) == 5 for t in targets[1:])


@pytest.mark.parametrize("where", ["a parent's children", "a leaf's empty _modules"])
def test_a_module_written_straight_into_modules_is_seen(where):
    """`model._modules["1"] = head` runs no hook (and the head was made before the walk, so no
    registration happened since): named_parameters() shows the head's tensors, and so do the walk
    and a manager, which refuses to average the old ones on."""
    model = torch.nn.Sequential(torch.nn.Linear(3, 3), torch.nn.Linear(3, 2))
    head = torch.nn.Linear(3, 2)
    walk = ModuleWalk(model, True, False)
    tensors = walk.tensors()
    swa = swa_fast.SWA(model)
    swa.update(model)
    if where == "a parent's children":
        model._modules["1"] = head
        message = "'1.weight' was replaced"
    else:
        model[1]._modules["extra"] = head
        message = "it had 4 tensors, it has 6"
    assert not walk.holds(tensors)
    assert same_tensors(walk.tensors(), list(model.parameters()))
    kept = [v.clone() for v in swa.average.views]
    with pytest.raises(ValueError, match=message):
        swa.update(model)
    assert all(torch.equal(v, k) for v, k in zip(swa.average.views, kept))


def test_an_unnamed_plan_checks_every_group_before_writing_any():
    """Without names too: an integer pair whose shape changed is found before the floating group
    is written."""
    targets = [torch.zeros(3), torch.zeros((), dtype=torch.long)]
    plan = UpdatePlan("lerp_", [targets], [torch.ones(3), torch.tensor(4)], owner="test")
    with pytest.raises(ValueError, match=r"'tensor 1' has shape \[2\]"):
        plan.run([torch.ones(3), torch.tensor([4, 5])], 0.5)
    assert torch.equal(targets[0], torch.zeros(3)) and int(targets[1]) == 0


NEEDS_EXTENSION = pytest.mark.skipif(
    swa_fast.backend_status("cpu")["cpu"] is not None, reason="needs the extension"
)


def _lerp_twice_then(change, avg, src):
    """lerp_ the lists once (a launch plan is kept), apply `change`, and lerp_ them again."""
    swa_fast.lerp_(avg, src, 0.5, backend="cpu")
    change()
    swa_fast.lerp_(avg, src, 0.5, backend="cpu")


@NEEDS_EXTENSION
def test_a_launch_plan_is_not_reused_for_a_tensor_given_new_storage_dtype_or_strides():
    """The extension reuses a checked call's gathered pointers while the call's tensors are
    unchanged; after `.data = ...` of the same shape it reads the new memory, of a new dtype it
    converts from it (the checks that refuse a changed call: the test below)."""
    avg, src = [torch.zeros(4, 3), torch.zeros(5)], [torch.ones(4, 3), torch.ones(5)]
    old = src[0].data
    _lerp_twice_then(lambda: setattr(src[0], "data", torch.full((4, 3), 3.0)), avg, src)
    assert torch.equal(avg[0], torch.full((4, 3), 1.75)) and torch.equal(old, torch.ones(4, 3))
    _lerp_twice_then(lambda: setattr(src[1], "data", torch.full((5,), 2.0, dtype=torch.float64)), avg, src)
    assert torch.equal(avg[1], torch.full((5,), 1.4375))


@NEEDS_EXTENSION
@pytest.mark.parametrize(
    "change, message",
    [
        (lambda avg, src: setattr(avg[0], "data", torch.zeros(3, 4).t()), "must be contiguous"),
        (lambda avg, src: setattr(avg[1], "data", torch.zeros(6)), r"has shape \[6\]"),
        (lambda avg, src: setattr(src[0], "data", avg[1].view(5, 1).expand(5, 3)[:4]), "overlap"),
    ],
    ids=["written tensor made strided", "written tensor resized", "source made to overlap"],
)
def test_a_launch_plan_is_not_reused_for_a_changed_call_that_the_checks_refuse(change, message):
    avg, src = [torch.zeros(4, 3), torch.zeros(5)], [torch.ones(4, 3), torch.ones(5)]
    swa_fast.lerp_(avg, src, 0.5, backend="cpu")
    swa_fast.lerp_(avg, src, 0.5, backend="cpu")
    change(avg, src)
    kept = [a.clone() for a in avg]
    with pytest.raises(ValueError, match=message):
        swa_fast.lerp_(avg, src, 0.5, backend="cpu")
    assert all(torch.equal(a, k) for a, k in zip(avg, kept))
