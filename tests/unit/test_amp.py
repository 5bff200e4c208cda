"""Low-bit AMP: storage dtype × compute dtype, stochastic rounding of low-precision updates."""

from __future__ import annotations

import pytest
import torch

from zo2 import ZOConfig, ZOEngine
from zo2.optim.estimators import Update
from zo2_testing import assert_same_params, clone_model, padded_batch, tiny_model


def displacement(engine, theta0):
    engine.flush()
    return torch.cat([(p.detach().float() - theta0[n]).reshape(-1) for n, p in engine.params.items()])


def test_bf16_store_with_stochastic_rounding_tracks_fp32_where_round_to_nearest_stalls():
    base = tiny_model("llama", seed=1).to(torch.bfloat16).to(torch.float32)  # bf16-representable start
    theta0 = {n: p.detach().float().clone() for n, p in base.named_parameters()}
    # 150 identical tiny updates, ~2e-5 per element: below half of bf16's resolution (~1.2e-4 at |θ| ~ 0.02)
    updates = [Update(t, (12345,), (1.0,), 2e-5) for t in range(150)]
    moved = {}
    for label, cfg in {"fp32": dict(), "sr": dict(storage_dtype="bf16"),
                       "nearest": dict(storage_dtype="bf16", stochastic_rounding=False)}.items():
        engine = ZOEngine(clone_model(base), ZOConfig(seed=3, **cfg))
        for u in updates:
            engine.apply_update(u)
        moved[label] = displacement(engine, theta0)
    truth = moved["fp32"]
    rel_sr = ((moved["sr"] - truth).norm() / truth.norm()).item()
    rel_nearest = ((moved["nearest"] - truth).norm() / truth.norm()).item()
    assert rel_sr < 0.25, rel_sr
    # round-to-nearest swallows the updates of all but the smallest weights
    assert rel_nearest > 0.6 and rel_nearest > 3 * rel_sr, (rel_nearest, rel_sr)
    assert torch.nn.functional.cosine_similarity(moved["sr"], truth, dim=0) > 0.95


def test_stochastic_rounding_is_reproducible_and_offload_exact_in_bf16():
    base = tiny_model("opt", seed=2)
    runs = []
    for offload in (False, True, True):
        engine = ZOEngine(clone_model(base), ZOConfig(lr=1e-3, seed=5, storage_dtype="bf16", offload=offload))
        for s in range(3):
            engine.step(padded_batch(seed=s))
        engine.flush()
        assert all(p.dtype == torch.bfloat16 for p in engine.params.values())
        runs.append(engine.model)
    assert_same_params(runs[0], runs[1])
    assert_same_params(runs[1], runs[2])


def test_fp32_storage_with_bf16_compute():
    base = tiny_model("llama", seed=4)
    ref = ZOEngine(clone_model(base), ZOConfig(lr=1e-3, seed=6))
    amp = ZOEngine(clone_model(base), ZOConfig(lr=1e-3, seed=6, compute_dtype="bf16", offload=True))
    batch = padded_batch()
    r_ref, r_amp = ref.step(batch), amp.step(batch)
    assert r_amp.loss == pytest.approx(r_ref.loss, rel=2e-2)
    assert r_amp.losses != r_ref.losses  # the forwards really ran in bf16
    assert all(p.dtype == torch.float32 for p in amp.params.values())
    ev = amp.evaluate(batch)
    assert ev.logits.dtype == torch.bfloat16
