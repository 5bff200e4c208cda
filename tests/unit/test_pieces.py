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
                                   dict(optimizer="zo-sgd-conservative")])
def test_one_matrix_at_a_time_equals_resident_and_block_streaming_bit_for_bit(family, extra):
    base = tiny_model(family, seed=1)
    resident, lr_ = _run(clone_model(base), offload=False, **extra)
    block, lb = _run(clone_model(base), offload=True, **extra)
    matrix, lm = _run(clone_model(base), offload=True, stream_granularity="matrix", **extra)
    assert lr_ == lb == lm
    assert_same_params(resident.model, matrix.model)
    assert matrix.plan.granularity == "matrix" and "one matrix at a time" in matrix.plan.describe()


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
    slot_elems = engine.streamer.slots[0].numel()
    assert slot_elems < block_elems / 2
    assert len(engine.streamer.slots) == engine.config.prefetch + 2
    itemsize = engine.store.flat(0).element_size()
    assert engine.plan.slot_bytes >= len(engine.streamer.slots) * slot_elems * itemsize
    store_bytes = sum(engine.store.flat(i).numel() for i in range(len(engine.store))) * itemsize
    moved = [engine.step(padded_batch(seed=s)) for s in range(4)]
    # once the first pass has shown the order the forwards read the pieces in (the next step's first pieces
    # upload at the end of each step, in that order), each piece moves up once and back once per step
    assert [r.bytes_h2d for r in moved[2:]] == [store_bytes] * 2
    assert [r.bytes_d2h for r in moved[1:]] == [store_bytes] * 3


def test_snapshot_and_resume_in_matrix_mode(tmp_path):
    base = tiny_model("opt", seed=4)
    a = ZOEngine(clone_model(base), ZOConfig(offload=True, stream_granularity="matrix", writeback_every=2, **CFG))
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


def test_pieces_are_the_modules_cover_the_buffer_and_never_split_a_module():
    ranges = [(0, 10), (10, 20), (20, 21), (21, 50), (52, 60)]  # a gap of padding at 50..52
    pieces = piece_bounds(ranges, 64)
    assert pieces[0][0] == 0 and pieces[-1][1] == 64
    assert all(a[1] == b[0] for a, b in zip(pieces, pieces[1:]))
    assert pieces == [(0, 10), (10, 20), (20, 21), (21, 52), (52, 64)]  # padding stays with the module before it
    assert piece_bounds([(0, 100), (50, 60)], 100) == [(0, 100)]  # a cut inside a module's range is dropped


@pytest.mark.parametrize("case", ["stateful", "peft"])
def test_what_matrix_mode_does_not_support_yet_is_refused_with_the_fix(case):
    if case == "stateful":
        model, kw = tiny_model("opt"), dict(optimizer="zo-adam")
    else:
        peft = pytest.importorskip("peft")
        model = peft.get_peft_model(tiny_model("llama"), peft.LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))
        kw = {}
    with pytest.raises(ConfigError, match="stream_granularity = 'block'"):
        ZOEngine(model, ZOConfig(offload=True, stream_granularity="matrix", **{**CFG, **kw}))


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
