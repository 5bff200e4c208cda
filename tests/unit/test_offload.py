"""The offload engine on CPU: identical schedule with copies for transfers, bit-exact against all-resident."""

from __future__ import annotations

import pytest
import torch

from zo2 import ZOConfig, ZOEngine
from zo2.errors import ResourceError
from zo2.offload import store as store_mod
from zo2.offload.planner import make_plan, parse_budget
from zo2.offload.store import ParameterStore
from zo2_testing import assert_same_params, clone_model, padded_batch, tiny_model

FAMILIES = ["opt", "llama", "qwen3", "gpt2"]


def run(model, steps=4, **cfg):
    engine = ZOEngine(model, ZOConfig(lr=1e-2, eps=1e-3, weight_decay=0.01, seed=21, **cfg))
    losses = [engine.step(padded_batch(seed=s)).losses for s in range(steps)]
    engine.flush()
    return engine, losses


def block_budget(model, resident_blocks: int) -> int:
    """A device budget that leaves room for exactly ``resident_blocks`` resident blocks (prefetch 1)."""
    probe = ZOEngine(clone_model(model), ZOConfig(offload=True))
    plan = probe.plan
    slot = 3 * max(plan.block_bytes)
    return plan.fixed_bytes + slot + plan.reserve_bytes + sum(plan.block_bytes[:resident_blocks]) + 1


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("prefetch", [1, 3])
def test_streamed_equals_resident_bit_for_bit(family, prefetch):
    base = tiny_model(family, seed=5)
    resident, losses_r = run(clone_model(base), offload=False)
    streamed, losses_s = run(clone_model(base), offload=True, prefetch=prefetch)
    assert streamed.plan.streamed and not streamed.plan.resident
    assert losses_r == losses_s
    assert_same_params(resident.model, streamed.model)


@pytest.mark.parametrize("family", ["opt", "llama"])
def test_some_resident_some_streamed_equals_resident(family):
    base = tiny_model(family, seed=6, num_hidden_layers=8)  # deeper than the 3 stream buffers
    resident, losses_r = run(clone_model(base), offload=False)
    mixed, losses_m = run(clone_model(base), offload="auto", gpu_memory_budget=block_budget(base, 2))
    assert mixed.plan.resident == [0, 1] and mixed.plan.streamed == list(range(2, 8))
    assert losses_r == losses_m
    assert_same_params(resident.model, mixed.model)


def test_auto_keeps_everything_resident_when_it_fits():
    engine = ZOEngine(tiny_model("opt"), ZOConfig(offload="auto", gpu_memory_budget="1GB"))
    assert engine.streamer is None and engine.plan.streamed == []


def test_streamed_parameters_live_in_the_store_and_transfers_are_counted():
    model = tiny_model("llama")
    engine = ZOEngine(model, ZOConfig(offload=True, lr=1e-2))
    store = engine.store
    for k, unit in enumerate(u for u in engine.units if u.kind == "block"):
        flat = store.flat(k)
        for seg in store.layout(k):
            p = engine.params[seg.name]
            assert p.data_ptr() == flat.data_ptr() + seg.offset * flat.element_size()
    engine.step(padded_batch())
    first = engine.last_transfer
    # step 0 uploads every block, then block 0 again for step 1 (prefetched across the step boundary);
    # it writes nothing back: there is no deferred update yet
    assert first.bytes_h2d == store.nbytes + store.block_bytes(0) and first.bytes_d2h == 0
    engine.step(padded_batch(seed=1))
    second = engine.last_transfer
    assert second.bytes_h2d == store.nbytes and second.bytes_d2h == store.nbytes
    assert second.uploads == len(store) == second.write_backs


def test_prefetched_copies_are_dropped_when_the_store_is_written_from_the_host():
    base = tiny_model("opt", seed=8)
    a = ZOEngine(clone_model(base), ZOConfig(lr=1e-2, seed=1, offload=True))
    b = ZOEngine(clone_model(base), ZOConfig(lr=1e-2, seed=1, offload=True))
    a.step(padded_batch())  # leaves block 0 of the next step uploaded ahead
    other = {n: p.detach() + 0.01 for n, p in base.named_parameters()}  # (no flush: that would use the copy)
    a.load_trainable_state(other)  # must not be undone by the stale prefetched copy
    b.load_trainable_state(other)
    b.load_state_dict({"step": 1})
    assert a.step(padded_batch(seed=1)).losses == b.step(padded_batch(seed=1)).losses
    a.flush(), b.flush()
    assert_same_params(a.model, b.model)


def test_resume_and_replay_stay_bit_exact_with_offloading(tmp_path):
    base = tiny_model("opt", seed=2)
    full, _ = run(clone_model(base), steps=6, offload=True)
    a, _ = run(clone_model(base), steps=3, offload=True)
    a.save(tmp_path / "ck")
    b = ZOEngine.load(tmp_path / "ck", clone_model(base), ZOConfig(lr=1e-2, eps=1e-3, weight_decay=0.01, seed=21,
                                                                     offload=True))
    for s in range(3, 6):
        b.step(padded_batch(seed=s))
    b.flush()
    assert_same_params(full.model, b.model)
    # replay the same updates into a streamed engine from the base weights
    updates = []
    c = ZOEngine(clone_model(base), ZOConfig(lr=1e-2, eps=1e-3, weight_decay=0.01, seed=21, offload=False))
    for s in range(6):
        updates.append(c.step(padded_batch(seed=s)).update)
    replayed = ZOEngine(clone_model(base), ZOConfig(lr=1e-2, weight_decay=0.01, seed=21, offload=True))
    for u in updates:
        replayed.apply_update(u)
    assert_same_params(full.model, replayed.model)


def test_shared_store_lives_in_dev_shm_and_is_removed():
    model = tiny_model("gpt2")
    engine = ZOEngine(model, ZOConfig(offload=True, shared_store=True))
    paths = list(engine.store._paths)
    assert paths and all(p.exists() and str(p).startswith("/dev/shm/") for p in paths)
    engine.step(padded_batch())
    engine.store.close()
    assert not any(p.exists() for p in paths)


def test_store_refuses_to_allocate_beyond_host_memory(monkeypatch):
    class Tiny:
        available = 3 << 30

    monkeypatch.setattr(store_mod.psutil, "virtual_memory", lambda: Tiny)
    layout = [[store_mod.Segment("w", 0, 10**9, (10**9,))]]
    with pytest.raises(ResourceError, match=r"needs 2\.0 GB of host memory in bfloat16, but only 3\.2 GB"):
        ParameterStore(layout, torch.bfloat16, pin=False)


def test_plan_arithmetic_and_too_small_budget():
    plan = make_plan("auto", [100] * 8, fixed_bytes=50, reserve_bytes=20, budget=50 + 300 + 20 + 300, prefetch=1)
    assert plan.resident == [0, 1, 2] and plan.streamed == [3, 4, 5, 6, 7]
    assert plan.bytes_per_step_h2d == 500 and plan.expected_peak == 50 + 300 + 300 + 20
    assert "3/8 blocks resident" in plan.describe()
    with pytest.raises(ResourceError, match="does not fit the device budget even fully streamed"):
        make_plan("auto", [100] * 8, fixed_bytes=50, reserve_bytes=20, budget=200, prefetch=1)
    assert make_plan(False, [100] * 2, 0, 0, 10, 1).streamed == []
    assert make_plan(True, [100] * 2, 0, 0, None, 2).slot_bytes == 400


def test_budget_parsing():
    cpu = torch.device("cpu")
    assert parse_budget("18GB", cpu) == 18 * 10**9
    assert parse_budget("512MiB", cpu) == 512 << 20
    assert parse_budget(12345, cpu) == 12345
    assert parse_budget(None, cpu) is None
    with pytest.raises(ResourceError, match="fraction of free device memory"):
        parse_budget(0.5, cpu)


def test_what_the_nodes_first_process_fails_to_make_stops_every_process_with_a_clear_error():
    """A shared store the first process cannot make (full /dev/shm, a lock held) must not leave the others waiting
    for it: they learn it failed and stop with an error naming what was being made; the first raises its own."""
    from types import SimpleNamespace

    from zo2.errors import ResourceError
    from zo2.offload.store import made_by_first

    def comm(rank: int, first_ok: bool):
        return SimpleNamespace(local_rank=rank, local_share=lambda ok, what: ok if rank == 0 else first_ok)

    def fails():
        raise ResourceError("/dev/shm is full")

    with pytest.raises(ResourceError, match="/dev/shm is full"):
        made_by_first(comm(0, False), fails, "making the store")
    with pytest.raises(ResourceError, match="first process failed while making the store"):
        made_by_first(comm(1, False), lambda: pytest.fail("only the first process makes it"), "making the store")
    assert made_by_first(comm(0, True), lambda: "made", "making the store") == "made"
    assert made_by_first(comm(1, True), lambda: pytest.fail("only the first process makes it"), "x") is None
    assert made_by_first(comm(1, True), lambda: pytest.fail("only the first process makes it"), "x",
                         lambda: "mapped") == "mapped"
    assert made_by_first(comm(0, True), lambda: "made", "x", lambda: pytest.fail("the first maps nothing")) == "made"
    with pytest.raises(ResourceError, match="first process failed"):
        made_by_first(comm(1, False), lambda: None, "x", lambda: pytest.fail("nothing to map after a failure"))
