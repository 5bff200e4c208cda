"""A lagging write-back (optim.writeback_every = K): streamed blocks go home every K steps, an upload replays the
updates its home copy lacks, and every K gives the same bits as writing back every step (and as all-resident)."""

from __future__ import annotations

import pytest
import torch

from zo2 import ZOConfig, ZOEngine
from zo2.errors import ConfigError
from zo2_testing import assert_same_params, clone_model, padded_batch, tiny_model

STEPS = 7


def run(model, steps=STEPS, **cfg):
    config = dict(lr=1e-2, eps=1e-3, weight_decay=0.01, seed=11)
    config.update(cfg)
    engine = ZOEngine(model, ZOConfig(**config))
    results = [engine.step(padded_batch(seed=s)) for s in range(steps)]
    engine.flush()
    return engine, results


@pytest.mark.parametrize("family", ["opt", "llama"])
@pytest.mark.parametrize("optimizer", ["zo-sgd", "zo-sgd-sign", "zo-sgd-conservative"])
def test_every_k_gives_the_same_bits(family, optimizer):
    base = tiny_model(family, seed=3)
    resident, expected = run(clone_model(base), offload=False, optimizer=optimizer)
    for k in (1, 2, 3, 8):
        engine, results = run(clone_model(base), offload=True, writeback_every=k, optimizer=optimizer)
        assert [r.losses for r in results] == [r.losses for r in expected], f"K={k}"
        assert_same_params(engine.model, resident.model)


@pytest.mark.parametrize("q, prefetch", [(2, 1), (1, 3)])
def test_low_precision_several_directions_and_deeper_prefetch(q, prefetch):
    """bf16 weights round stochastically with per-step seeds: a replayed update must round as the first time."""
    base = tiny_model("llama", seed=5, num_hidden_layers=4)
    cfg = dict(storage_dtype="bf16", compute_dtype="fp32", q=q, prefetch=prefetch)
    every, expected = run(clone_model(base), offload=True, writeback_every=1, **cfg)
    lagging, results = run(clone_model(base), offload=True, writeback_every=3, **cfg)
    assert [r.losses for r in results] == [r.losses for r in expected]
    assert_same_params(lagging.model, every.model)


def test_d2h_bytes_fall_k_fold_and_replays_are_counted():
    base = tiny_model("opt", seed=2, num_hidden_layers=4)
    _, every = run(clone_model(base), steps=8, offload=True, writeback_every=1)
    engine, lagging = run(clone_model(base), steps=8, offload=True, writeback_every=4)
    store = engine.store.nbytes
    # step t applies step t-1's update: steps 1..7 write back every block when K = 1
    assert sum(r.bytes_d2h for r in every) == 7 * store
    # K = 4: only step 4 (applying update 3, four updates after the initial weights) writes back; the last
    # three updates go home at the final flush, which is not a step
    assert [r.bytes_d2h for r in lagging] == [0, 0, 0, 0, store, 0, 0, 0]
    assert sum(r.bytes_h2d for r in lagging) == sum(r.bytes_h2d for r in every)
    blocks = len(engine.plan.streamed)
    # a block's home lags 0..3 updates when it is uploaded; each missing update is replayed once per upload
    assert [r.replays for r in lagging] == [0, 0, blocks, 2 * blocks, 3 * blocks, 0, blocks, 2 * blocks]
    assert all(r.replays == 0 for r in every)
    assert "written back every 4 steps" in engine.plan.describe()


def test_evaluate_snapshot_and_resume_in_the_middle_of_a_lag():
    base = tiny_model("opt", seed=8, num_hidden_layers=3)
    reference, expected = run(clone_model(base), offload=False)
    engine = ZOEngine(clone_model(base), ZOConfig(lr=1e-2, eps=1e-3, weight_decay=0.01, seed=11, offload=True,
                                                  writeback_every=5))
    resident = ZOEngine(clone_model(base), ZOConfig(lr=1e-2, eps=1e-3, weight_decay=0.01, seed=11, offload=False))
    for s in range(3):
        assert engine.step(padded_batch(seed=s)).losses == resident.step(padded_batch(seed=s)).losses
    batch = padded_batch(seed=99)
    assert engine.evaluate(batch).loss == resident.evaluate(batch).loss  # a flush: every lagging block goes home
    engine.step(padded_batch(seed=3))
    snapshot, state = engine.trainable_state(), engine.state_dict()
    resumed = ZOEngine(clone_model(base), ZOConfig(lr=1e-2, eps=1e-3, weight_decay=0.01, seed=11, offload=True,
                                                   writeback_every=5))
    resumed.load_trainable_state(snapshot)
    resumed.load_state_dict(state)
    for s in range(4, STEPS):
        assert resumed.step(padded_batch(seed=s)).losses == expected[s].losses
    resumed.flush()
    assert_same_params(resumed.model, reference.model)


def test_lora_base_weights_stream_read_only_with_a_lagging_adapter():
    peft = pytest.importorskip("peft")
    torch.manual_seed(0)
    base = tiny_model("opt", seed=4)
    model = peft.get_peft_model(base, peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                                      init_lora_weights="gaussian"))
    every, expected = run(clone_model(model), offload=True, writeback_every=1)
    lagging, results = run(clone_model(model), offload=True, writeback_every=3)
    assert [r.losses for r in results] == [r.losses for r in expected]
    assert_same_params(lagging.model, every.model)


@pytest.mark.parametrize("optimizer", ["zo-sgd-momentum", "zo-adam"])
def test_a_stateful_optimizer_is_refused_with_the_fix(optimizer):
    with pytest.raises(ConfigError, match=f"writeback_every = 2 needs a stateless optimizer, but {optimizer}"):
        ZOEngine(tiny_model("opt"), ZOConfig(offload=True, writeback_every=2, optimizer=optimizer))


@pytest.mark.parametrize("bad", [0, -1, 1.5, True, "2"])
def test_bad_values_are_refused(bad):
    with pytest.raises(ConfigError, match="optim.writeback_every"):
        ZOConfig(writeback_every=bad)


def test_auto_is_the_cost_models_optimum():
    from zo2.offload.planner import WRITEBACK_LIMIT, auto_writeback

    # per block and step: (K-1)/2 replays at the kernel's rate against bytes/K over the link
    def cost(k, kernel, link):
        return (k - 1) / (2 * kernel) + 1 / (k * link)

    for kernel, link in [(3.5e12, 55e9), (1e12, 25e9), (2e11, 50e9), (5e9, 20e9)]:
        k = auto_writeback(kernel, link)
        best = min(range(1, WRITEBACK_LIMIT + 1), key=lambda j: cost(j, kernel, link))
        assert cost(k, kernel, link) <= cost(best, kernel, link) * 1.02, (kernel, link, k, best)
    assert auto_writeback(3.5e12, 55e9) == 11  # an H100's update pass over PCIe 5
    assert auto_writeback(5e9, 20e9) == 1  # a CPU: regenerating z costs more than copying
    assert auto_writeback(1e15, 1e9) == WRITEBACK_LIMIT
    assert auto_writeback(0.0, 1e9) == 1


def test_auto_writes_back_every_step_on_a_cpu():
    engine, results = run(tiny_model("opt", seed=1), steps=3, offload=True, writeback_every="auto")
    assert engine.plan.writeback_every == 1 and all(r.replays == 0 for r in results)
    assert "written back every" not in engine.plan.describe()


def test_the_auto_probe_keeps_one_where_the_forwards_outlast_the_transfers():
    from zo2.offload.planner import WritebackProbe

    waits = WritebackProbe(8)
    assert waits.observe(1.0, 900.0) is None  # the first step (compiling, filling the pipeline) is not measured
    assert [waits.observe(0.1, 20.0) for _ in range(3)] == [None, None, 8]  # 20 % of each step waiting: the link
    busy = WritebackProbe(8)
    assert [busy.observe(0.1, w) for w in (500.0, 1.0, 2.0, 1.0)] == [None, None, None, 1]  # 1.3 %: compute
    assert busy.share == pytest.approx(4e-3 / 0.3)


@pytest.mark.parametrize("wait_ms, chosen", [(1e4, 3), (0.0, 1)])
def test_the_auto_probe_sets_k_for_the_rest_of_the_run_without_changing_a_bit(monkeypatch, wait_ms, chosen):
    """K decided after the probe's steps (the upload waits faked: a CPU has no CUDA events) applies to every
    streamed residence from then on, and the weights equal a run that wrote back every step."""
    from zo2.offload.planner import WritebackProbe
    from zo2.offload.residence import StreamedResidence

    collect = StreamedResidence.collect_stats

    def waited(self):
        stats = collect(self)
        stats.wait_ms += wait_ms
        return stats

    monkeypatch.setattr(StreamedResidence, "collect_stats", waited)
    base = tiny_model("opt", seed=2, num_hidden_layers=4)
    engine = ZOEngine(clone_model(base), ZOConfig(lr=1e-2, eps=1e-3, weight_decay=0.01, seed=11, offload=True))
    engine.writeback_probe = WritebackProbe(3)
    streamed = next(r for r in engine.residences if isinstance(r, StreamedResidence))
    for s in range(STEPS):
        engine.step(padded_batch(seed=s))
        assert streamed.writeback_every == (1 if s < WritebackProbe.SKIP + WritebackProbe.STEPS - 1 else chosen)
    assert engine.writeback_probe is None and engine.plan.writeback_every == chosen
    engine.flush()
    reference, _ = run(clone_model(base), offload=True)
    assert_same_params(engine.model, reference.model)
