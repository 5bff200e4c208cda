"""Streaming a block one matrix at a time (optim.stream_granularity = "matrix", zo2.offload.pieces)."""

from __future__ import annotations

import pytest
import torch

from zo2 import ZOConfig, ZOEngine
from zo2.errors import ConfigError
from zo2.offload.pieces import piece_bounds
from zo2_testing import assert_same_params, clone_model, padded_batch, tiny_model

CFG = dict(lr=1e-2, eps=1e-3, weight_decay=0.01, seed=3)


def _run(model, steps=5, **kw):
    engine = ZOEngine(model, ZOConfig(**{**CFG, **kw}))
    losses = [engine.step(padded_batch(seed=s)).losses for s in range(steps)]
    engine.flush()
    return engine, losses


@pytest.mark.parametrize("family", ["opt", "llama", "qwen3", "gpt2"])
@pytest.mark.parametrize("extra", [dict(), dict(prefetch=3), dict(writeback_every=3), dict(q=2),
                                   dict(optimizer="zo-sgd-conservative"), dict(optimizer="zo-adam"),
                                   dict(optimizer="zo-sgd-momentum", prefetch=3)])
def test_one_matrix_at_a_time_equals_resident_and_block_streaming_bit_for_bit(family, extra):
    base = tiny_model(family, seed=1)
    resident, lr_ = _run(clone_model(base), offload=False, **extra)
    block, lb = _run(clone_model(base), offload=True, **extra)
    matrix, lm = _run(clone_model(base), offload=True, stream_granularity="matrix", **extra)
    assert lr_ == lb == lm
    assert_same_params(resident.model, matrix.model)
    assert matrix.plan.granularity == "matrix" and "one matrix at a time" in matrix.plan.describe()


@pytest.mark.parametrize("extra", [dict(), dict(prefetch=2, writeback_every=2), dict(optimizer="zo-adam")])
def test_without_a_spare_slot_every_upload_waits_for_its_slot_and_values_stay_the_same(monkeypatch, extra):
    """planner.SPARE_SLOTS = 0 (what benchmarks/bench_offload.py --spare-slots 0 measures): the block slots and
    the rings hold computing + prefetch only, the planner counts that, and both granularities still equal the
    resident run bit for bit."""
    from zo2.offload import planner

    base = tiny_model("opt", seed=1)
    resident, lr_ = _run(clone_model(base), offload=False, **extra)
    monkeypatch.setattr(planner, "SPARE_SLOTS", 0)
    slots = extra.get("prefetch", 1) + 1
    for granularity in ("block", "matrix"):
        streamed, ls = _run(clone_model(base), offload=True, stream_granularity=granularity, **extra)
        assert ls == lr_
        assert_same_params(resident.model, streamed.model)
        if granularity == "block":
            assert len(streamed.streamer.slots) == slots
        else:
            largest = max(streamed.streamer.store.flat(i).numel() for i in range(len(streamed.streamer.store)))
            assert streamed.streamer.pool.numel() == slots * largest
        assert streamed.plan.slot_bytes >= streamed.streamer.device_bytes


def test_low_precision_with_stochastic_rounding_and_deferred_and_immediate_updates():
    base = tiny_model("llama", seed=2)
    for deferred in (True, False):
        kw = dict(storage_dtype="bf16", deferred_update=deferred)
        resident, lr_ = _run(clone_model(base), offload=False, **kw)
        matrix, lm = _run(clone_model(base), offload=True, stream_granularity="matrix", **kw)
        assert lr_ == lm
        assert_same_params(resident.model, matrix.model)


def test_slots_hold_a_matrix_not_a_block_and_every_byte_moves_once_per_step():
    engine = ZOEngine(tiny_model("llama", seed=1, num_hidden_layers=4),
                      ZOConfig(offload=True, stream_granularity="matrix", **CFG))
    block_elems = max(engine.store.flat(i).numel() for i in range(len(engine.store)))
    piece_elems = max(engine.streamer.store.flat(i).numel() for i in range(len(engine.streamer.store)))
    assert piece_elems < block_elems / 2
    ring = engine.streamer.pool.numel()
    assert ring == (engine.config.prefetch + 2) * piece_elems
    itemsize = engine.store.flat(0).element_size()
    assert engine.plan.slot_bytes == ring * itemsize == engine.streamer.device_bytes
    store_bytes = sum(engine.store.flat(i).numel() for i in range(len(engine.store))) * itemsize
    moved = [engine.step(padded_batch(seed=s)) for s in range(4)]
    # once the first pass has shown the order the forwards read the pieces in (the next step's first pieces
    # upload at the end of each step, in that order), each piece moves up once and back once per step
    assert [r.bytes_h2d for r in moved[2:]] == [store_bytes] * 2
    assert [r.bytes_d2h for r in moved[1:]] == [store_bytes] * 3


@pytest.mark.parametrize("extra", [dict(writeback_every=2), dict(optimizer="zo-adam")])
def test_snapshot_and_resume_in_matrix_mode(tmp_path, extra):
    base = tiny_model("opt", seed=4)
    a = ZOEngine(clone_model(base), ZOConfig(offload=True, stream_granularity="matrix", **extra, **CFG))
    for s in range(3):
        a.step(padded_batch(seed=s))
    a.save(tmp_path / "ckpt")
    b = ZOEngine.load(tmp_path / "ckpt", clone_model(base))
    assert b.config.stream_granularity == "matrix"
    for s in range(3, 5):
        assert a.step(padded_batch(seed=s)).losses == b.step(padded_batch(seed=s)).losses
    a.flush(), b.flush()
    assert_same_params(a.model, b.model)
    assert a.evaluate(padded_batch(seed=9)).loss == b.evaluate(padded_batch(seed=9)).loss
    state_a, state_b = a.optimizer_state(), b.optimizer_state()  # Adam's moments and t: streamed piece by piece
    assert state_a.keys() == state_b.keys() and all(torch.equal(state_a[k], state_b[k]) for k in state_a)
    assert bool(state_a) == ("optimizer" in extra)


def test_pieces_are_the_modules_cover_the_buffer_and_never_split_a_module():
    ranges = [(0, 10), (10, 20), (20, 21), (21, 50), (52, 60)]  # a gap of padding at 50..52
    pieces = piece_bounds(ranges, 64)
    assert pieces[0][0] == 0 and pieces[-1][1] == 64
    assert all(a[1] == b[0] for a, b in zip(pieces, pieces[1:]))
    assert pieces == [(0, 10), (10, 20), (20, 21), (21, 52), (52, 64)]  # padding stays with the module before it
    assert piece_bounds([(0, 100), (50, 60)], 100) == [(0, 100)]  # a cut inside a module's range is dropped


@pytest.mark.parametrize("optimizer", ["zo-adam", "zo-sgd-momentum"])
def test_a_stateful_optimizers_state_streams_one_piece_at_a_time_with_its_weights(optimizer):
    """The state of a piecewise-streamed block moves through rings of its own, a piece at a time: each ring holds
    prefetch + 2 of the largest piece, the plan counts them, and each byte of weights and state moves up once and
    back once per step (never a block's state at once)."""
    engine = ZOEngine(tiny_model("llama", seed=1, num_hidden_layers=4),
                      ZOConfig(offload=True, stream_granularity="matrix", optimizer=optimizer, **CFG))
    state = engine.opt_state
    assert set(state.streamers) == set(engine.optimizer.state_names)
    pieces = engine.streamer.store
    largest = max(pieces.flat(i).numel() for i in range(len(pieces)))
    block = max(engine.store.flat(i).numel() for i in range(len(engine.store)))
    for ring in state.streamers.values():
        assert ring.store.pieces == pieces.pieces  # the weights' piece bounds over the state's layout
        assert ring.pool.numel() == (engine.config.prefetch + 2) * largest < block
    rings = engine.streamer.device_bytes + sum(r.device_bytes for r in state.streamers.values())
    assert engine.plan.slot_bytes == rings
    weights = engine.store.nbytes
    states = sum(h.nbytes for h in state.hosts.values())
    assert states == weights * len(engine.optimizer.state_names)  # fp32 weights, fp32 state
    moved = [engine.step(padded_batch(seed=s)) for s in range(4)]
    assert [r.bytes_h2d for r in moved[2:]] == [weights + states] * 2
    assert [r.bytes_d2h for r in moved[1:]] == [weights + states] * 3


def test_a_bad_granularity_is_refused_by_the_config():
    with pytest.raises(ConfigError, match="stream_granularity"):
        ZOConfig(stream_granularity="layer")


def test_prefetch_counts_matrices_not_the_norms_between_them():
    engine = ZOEngine(tiny_model("llama", seed=1), ZOConfig(offload=True, stream_granularity="matrix", prefetch=1,
                                                             **CFG))
    for s in range(2):  # the first pass learns the order the forwards read the pieces in; the second uses it
        engine.step(padded_batch(seed=s))
    streamer = engine.streamer
    largest = max(streamer.store.flat(i).numel() for i in range(len(streamer.store)))
    sizes = [streamer.store.flat(b).numel() for b in streamer._order]
    assert sizes[0] * 16 < largest  # llama reads its input norm first
    ahead = streamer._ahead(0)
    assert [streamer.store.flat(b).numel() * 16 >= largest for b in ahead] == [False, True]


class _Pieces:
    """A store of pieces of the given sizes whose values say which piece they are."""

    def __init__(self, sizes):
        self.buffers = [torch.full((n,), float(i)) for i, n in enumerate(sizes)]
        self.dtype = torch.float32

    def __len__(self):
        return len(self.buffers)

    def flat(self, i):
        return self.buffers[i]

    def numel(self, i):
        return self.buffers[i].numel()


def test_the_ring_never_overwrites_a_piece_a_forward_reads_and_keeps_copies_until_their_room_is_needed():
    """Random acquire / release (kept or not) / drop sequences over pieces of mixed sizes: every acquired copy
    holds its piece, a held copy never changes while held, and a kept copy is reused only while intact."""
    import random

    from zo2.offload.pieces import RingStreamer

    rng = random.Random(0)
    sizes = [rng.choice([1, 2, 30, 100, 100]) for _ in range(40)]
    streamer = RingStreamer(_Pieces(sizes), torch.device("cpu"), prefetch=1)
    assert streamer.pool.numel() == 3 * 100
    streamer.begin(list(range(len(sizes))))
    held: dict[int, torch.Tensor] = {}
    for _ in range(2000):
        op = rng.random()
        if op < 0.5 and len(held) < 2:
            b = rng.randrange(len(sizes))
            kept = streamer.has(b)
            buf = streamer.acquire(b)
            assert torch.equal(buf, torch.full((sizes[b],), float(b))), (b, kept)
            held[b] = buf
        elif held:
            b = rng.choice(list(held))
            streamer.release(b, keep=rng.random() < 0.7)
            del held[b]
        for b, buf in held.items():
            assert torch.equal(buf, torch.full((sizes[b],), float(b)))
        if rng.random() < 0.05:
            victim = rng.randrange(len(sizes))
            if victim not in held:
                streamer.drop(victim)
                assert not streamer.has(victim)


def test_auto_streams_one_matrix_at_a_time_when_blocks_do_not_fit_the_budget():
    from zo2.errors import ResourceError

    base = tiny_model("llama", seed=3, num_hidden_layers=4)
    probe = ZOEngine(clone_model(base), ZOConfig(offload=True, stream_granularity="matrix", **CFG))
    budget = probe.plan.expected_peak + 1  # room for matrix slots, not for block slots
    assert probe.plan.expected_peak < probe.plan.fixed_bytes + 3 * max(probe.plan.block_bytes)
    with pytest.raises(ResourceError, match="does not fit the device budget"):
        ZOEngine(clone_model(base), ZOConfig(offload="auto", stream_granularity="block", gpu_memory_budget=budget,
                                             **CFG))
    resident, lr_ = _run(clone_model(base), offload=False)
    auto, la = _run(clone_model(base), offload="auto", gpu_memory_budget=budget)
    assert auto.plan.granularity == "matrix" and lr_ == la
    assert_same_params(resident.model, auto.model)
    roomy, _ = _run(clone_model(base), offload=True)  # no budget on a CPU: blocks fit
    assert roomy.plan.granularity == "block"
    adam = dict(optimizer="zo-adam")  # its state streams a piece at a time too
    probe = ZOEngine(clone_model(base), ZOConfig(offload=True, stream_granularity="matrix", **CFG, **adam))
    budget = probe.plan.expected_peak + 1
    resident, lr_ = _run(clone_model(base), offload=False, **adam)
    auto, la = _run(clone_model(base), offload="auto", gpu_memory_budget=budget, **adam)
    assert auto.plan.granularity == "matrix" and lr_ == la
    assert_same_params(resident.model, auto.model)
