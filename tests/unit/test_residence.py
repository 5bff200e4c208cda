"""Residences: the one interface between a unit's visit and where its weights live (zo2.offload.residence)."""

from __future__ import annotations

import pytest
import torch

from zo2 import ZOConfig, ZOEngine
from zo2.offload.residence import DeviceResidence, Residence, StreamedResidence
from zo2_testing import assert_same_params, clone_model, padded_batch, tiny_model

CFG = dict(lr=1e-2, eps=1e-3, weight_decay=0.01, seed=3)


class HomeCopyResidence(Residence):
    """A residence of this test's own: each unit's home is a separate CPU tensor; a visit gets a fresh copy of it,
    the update goes home on write-back (and into the unit's parameters, which the engine's snapshots read).
    Counts the calls, so the test sees the visit talk to it and to nothing else."""

    def __init__(self, units):
        self.home = {u.name: u.flat.detach().clone() for u in units}
        self.steps = {u.name: -1 for u in units}
        self.calls = {"acquire": 0, "write_back": 0, "release": 0, "begin_pass": 0}

    def begin_pass(self, units):
        self.calls["begin_pass"] += 1

    def acquire(self, unit):
        self.calls["acquire"] += 1
        return self.home[unit.name].clone()

    def write_back(self, unit, step):
        self.calls["write_back"] += 1
        self.steps[unit.name] = step
        self._written = unit.name

    def assemble(self, unit, flat):
        if getattr(self, "_written", None) == unit.name:  # the update landed in this visit's copy: keep it
            self.home[unit.name].copy_(flat)
            unit.flat.copy_(flat)
            self._written = None

    def release(self, unit):
        self.calls["release"] += 1

    def held(self, unit):
        return self.steps[unit.name]


def run(engine, steps=4):
    losses = [engine.step(padded_batch(seed=s)).losses for s in range(steps)]
    engine.flush()
    return losses


def test_build_offload_gives_every_unit_its_residence_from_the_plan():
    base = tiny_model("opt", seed=2, num_hidden_layers=4)
    resident = ZOEngine(clone_model(base), ZOConfig(offload=False, **CFG))
    assert {type(u.residence) for u in resident.units} == {DeviceResidence}
    assert [type(r) for r in resident.residences] == [DeviceResidence]
    streamed = ZOEngine(clone_model(base), ZOConfig(offload=True, **CFG))
    kinds = {u.name: type(u.residence) for u in streamed.units}
    assert kinds["embed"] is DeviceResidence and kinds["head"] is DeviceResidence
    assert all(kinds[f"block.{i}"] is StreamedResidence for i in streamed.plan.streamed)
    assert [type(r) for r in streamed.residences] == [DeviceResidence, StreamedResidence]


@pytest.mark.parametrize("offload", [False, True])
def test_held_reports_the_step_home_holds(offload):
    engine = ZOEngine(tiny_model("llama", seed=4), ZOConfig(offload=offload, **CFG))
    assert all(u.residence.held(u) == -1 for u in engine.units)
    engine.step(padded_batch(seed=0))
    engine.step(padded_batch(seed=1))  # applies step 0's deferred update on every visit
    assert all(u.residence.held(u) == 0 for u in engine.units)
    engine.flush()
    assert all(u.residence.held(u) == 1 for u in engine.units)


@pytest.mark.parametrize("optimizer", ["zo-sgd", "zo-adam"])
def test_a_new_residence_plugs_into_the_visit_unchanged(optimizer):
    """Blocks moved to a residence the engine has never seen give the same losses and weights bit for bit."""
    base = tiny_model("opt", seed=7, num_hidden_layers=3)
    reference = ZOEngine(clone_model(base), ZOConfig(offload=False, optimizer=optimizer, **CFG))
    engine = ZOEngine(clone_model(base), ZOConfig(offload=False, optimizer=optimizer, **CFG))
    blocks = [u for u in engine.units if u.kind == "block"]
    custom = HomeCopyResidence(blocks)
    for u in blocks:
        u.residence = custom
    engine.residences.append(custom)
    assert run(engine) == run(reference)
    assert_same_params(engine.model, reference.model)
    passes = custom.calls["begin_pass"]
    assert passes >= 4 and custom.calls["acquire"] == custom.calls["release"] >= 4 * len(blocks)
    assert custom.calls["write_back"] == 4 * len(blocks)  # one per applied update: steps 0..3, the last on flush
    assert all(custom.held(u) == 3 for u in blocks)
    assert all(torch.equal(custom.home[u.name], u.flat) for u in blocks)


@pytest.mark.parametrize("offload", [False, True])
def test_dropping_the_engine_frees_its_buffers_without_the_cycle_collector(offload):
    """Units hold their residence; a residence that held its units back would form a cycle, and the streamer's
    device slots would stay allocated after ``del engine`` until Python's cycle collector happened to run."""
    import gc
    import weakref

    engine = ZOEngine(tiny_model("opt", seed=1), ZOConfig(offload=offload, **CFG))
    engine.step(padded_batch(seed=0))
    refs = [weakref.ref(engine), *(weakref.ref(r) for r in engine.residences), weakref.ref(engine.units[1])]
    if engine.streamer is not None:
        refs.append(weakref.ref(engine.streamer))
    enabled = gc.isenabled()
    gc.disable()
    try:
        del engine
        assert [r() is None for r in refs] == [True] * len(refs)
    finally:
        if enabled:
            gc.enable()
