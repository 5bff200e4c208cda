"""ZOEngine: the MeZO math, deferred updates, exactness between modes, the public API."""

from __future__ import annotations

import math

import pytest
import torch
from torch.func import functional_call

from zo2 import ZOConfig, ZOEngine
from zo2.engine import default_no_decay
from zo2.optim.estimators import Update
from zo2_testing import assert_same_params, clone_model, padded_batch, tiny_model

FAMILIES = ["opt", "llama", "qwen3", "gpt2"]


def reference_loss(model, params: dict, batch) -> torch.Tensor:
    """An independent loss: the HF model's own forward with parameters replaced, cross-entropy in its dtype."""
    logits = functional_call(model, params, (), {"input_ids": batch["input_ids"],
                                                  "attention_mask": batch["attention_mask"]}).logits
    logits = logits[:, :-1]
    labels = batch["labels"][:, 1:]
    return torch.nn.functional.cross_entropy(logits.reshape(-1, logits.size(-1)), labels.reshape(-1),
                                             ignore_index=-100)


def test_projected_grad_is_the_finite_difference_and_tends_to_the_directional_derivative():
    # GPT-2 is smooth (GELU) and computes everything in float64; OPT's ReLU kinks and Llama's float32
    # RMSNorm would put a floor under the ε→0 error.
    model = tiny_model("gpt2", dtype=torch.float64).eval()
    batch = padded_batch()
    theta = {n: p.detach().clone() for n, p in model.named_parameters()}
    # autograd directional derivative ∇L·z at θ
    params = {n: t.clone().requires_grad_(True) for n, t in theta.items()}
    loss = reference_loss(model, params, batch)
    grads = torch.autograd.grad(loss, list(params.values()))
    errors = []
    for eps in (1e-3, 1e-5, 1e-6):
        engine = ZOEngine(clone_model(model), ZOConfig(lr=0.0, eps=eps, seed=7))
        r = engine.step(batch)
        z = engine.perturbation(0)
        assert set(z) == set(theta)
        lp = reference_loss(model, {n: theta[n] + eps * z[n].double() for n in theta}, batch).item()
        lm = reference_loss(model, {n: theta[n] - eps * z[n].double() for n in theta}, batch).item()
        assert r.projected_grad == pytest.approx((lp - lm) / (2 * eps), rel=1e-9, abs=1e-12)
        assert r.loss_plus == pytest.approx(lp, rel=1e-12) and r.loss_minus == pytest.approx(lm, rel=1e-12)
        dd = sum((g * z[n].double()).sum() for g, n in zip(grads, params)).item()
        errors.append(abs(r.projected_grad - dd))
    assert errors[0] > errors[1] > errors[2]  # O(eps²) truncation error
    assert errors[2] < 1e-5 * max(1.0, abs(dd))


@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
def test_update_is_exactly_theta_minus_lr_times_gz_plus_lambda_theta(weight_decay):
    model = tiny_model("opt")
    theta0 = {n: p.detach().clone() for n, p in model.named_parameters()}
    lr = 1e-3
    engine = ZOEngine(model, ZOConfig(lr=lr, eps=1e-3, weight_decay=weight_decay, seed=3, deferred_update=False))
    r = engine.step(padded_batch())
    z = engine.perturbation(0)
    g = r.projected_grad
    for n, p in model.named_parameters():
        lam = weight_decay if not default_no_decay(n, p) else 0.0
        expected = theta0[n] - lr * (g * z[n] + lam * theta0[n])
        assert torch.equal(p.detach(), expected), n
    decayed = [n for n, p in model.named_parameters() if not default_no_decay(n, p)]
    assert decayed and not any("bias" in n or "layer_norm" in n for n in decayed)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("estimator,q", [("central", 1), ("central", 3), ("forward", 2)])
def test_deferred_update_equals_immediate_bit_for_bit(family, estimator, q):
    base = tiny_model(family, seed=1)
    runs = []
    for deferred in (True, False):
        model = clone_model(base)
        cfg = ZOConfig(lr=1e-2, eps=1e-3, weight_decay=0.01, seed=11, estimator=estimator, q=q,
                       deferred_update=deferred)
        engine = ZOEngine(model, cfg)
        losses = [engine.step(padded_batch(seed=s)).losses for s in range(4)]
        engine.flush()
        runs.append((model, losses))
    assert runs[0][1] == runs[1][1]
    assert_same_params(runs[0][0], runs[1][0])
    moved = [n for n, p in base.named_parameters() if not torch.equal(p, dict(runs[0][0].named_parameters())[n])]
    assert len(moved) == len(list(base.parameters()))  # every parameter was updated


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_perturbation_is_out_of_place_so_theta_never_drifts(dtype):
    model = tiny_model("llama", dtype=dtype)
    theta0 = {n: p.detach().clone() for n, p in model.named_parameters()}
    engine = ZOEngine(model, ZOConfig(lr=0.0, eps=1e-2, seed=5))
    for s in range(3):
        engine.step(padded_batch(seed=s))
    engine.flush()
    for n, p in model.named_parameters():
        assert torch.equal(p.detach(), theta0[n]), n


def test_forwards_run_with_dropout_off():
    model = tiny_model("opt").train()  # HF builds models in train mode with dropout on
    engine = ZOEngine(model, ZOConfig(lr=0.0, eps=1e-3))
    assert not model.training
    batch = padded_batch()
    assert engine.evaluate(batch).loss == engine.evaluate(batch).loss
    r = engine.step(batch)
    r2 = engine.step(batch)  # lr 0: the same step twice gives the same losses only without dropout noise
    assert r.loss == r2.loss or engine.estimator.seeds(0) != engine.estimator.seeds(1)
    ev = engine.evaluate(batch)
    ref = reference_loss(model, dict(model.named_parameters()), batch).item()
    assert ev.loss == pytest.approx(ref, rel=1e-6)


def test_tied_weights_are_perturbed_and_updated_once():
    model = tiny_model("qwen3")  # tie_word_embeddings=True
    assert model.lm_head.weight is model.model.embed_tokens.weight
    engine = ZOEngine(model, ZOConfig(lr=1e-2, seed=2, deferred_update=False))
    z = engine.perturbation(0)
    assert "lm_head.weight" not in z and "model.embed_tokens.weight" in z
    w0 = model.model.embed_tokens.weight.detach().clone()
    r = engine.step(padded_batch())
    expected = w0 - 1e-2 * (r.projected_grad * z["model.embed_tokens.weight"])
    assert torch.equal(model.model.embed_tokens.weight.detach(), expected)
    assert model.lm_head.weight is model.model.embed_tokens.weight


def test_q_directions_average_the_per_direction_differences():
    model = tiny_model("opt", dtype=torch.float64).eval()
    batch = padded_batch()
    theta = {n: p.detach().clone() for n, p in model.named_parameters()}
    eps = 1e-3
    engine = ZOEngine(clone_model(model), ZOConfig(lr=0.0, eps=eps, q=3, seed=9))
    r = engine.step(batch)
    gs = []
    for d in range(3):
        z = engine.perturbation(0, d)
        lp = reference_loss(model, {n: theta[n] + eps * z[n].double() for n in theta}, batch).item()
        lm = reference_loss(model, {n: theta[n] - eps * z[n].double() for n in theta}, batch).item()
        gs.append((lp - lm) / (2 * eps))
    assert r.projected_grad == pytest.approx(sum(gs) / 3, rel=1e-9)
    assert r.update.coeffs == pytest.approx(tuple(g / 3 for g in gs), rel=1e-9)
    assert len(set(r.update.seeds)) == 3


def test_one_sided_estimator():
    model = tiny_model("gpt2", dtype=torch.float64).eval()
    batch = padded_batch()
    theta = {n: p.detach().clone() for n, p in model.named_parameters()}
    eps = 1e-3
    engine = ZOEngine(clone_model(model), ZOConfig(lr=0.0, eps=eps, estimator="forward", seed=4))
    r = engine.step(batch)
    z = engine.perturbation(0)
    l0 = reference_loss(model, theta, batch).item()
    lp = reference_loss(model, {n: theta[n] + eps * z[n].double() for n in theta}, batch).item()
    assert len(r.losses) == 2
    assert r.projected_grad == pytest.approx((lp - l0) / eps, rel=1e-8)
    assert r.loss == pytest.approx(l0, rel=1e-12)


def test_nonfinite_loss_skips_the_step_and_leaves_weights_alone():
    model = tiny_model("opt")
    theta0 = {n: p.detach().clone() for n, p in model.named_parameters()}
    engine = ZOEngine(model, ZOConfig(lr=1.0), loss_fn=lambda logits, batch: logits.sum() * float("nan"))
    r = engine.step(padded_batch())
    assert r.skipped and r.update is None and math.isnan(r.loss)
    assert engine.pending is None and engine.step_count == 1
    engine.flush()
    for n, p in model.named_parameters():
        assert torch.equal(p.detach(), theta0[n])


def test_replaying_updates_reproduces_the_weights_bit_for_bit():
    base = tiny_model("llama", seed=3)
    trained = clone_model(base)
    engine = ZOEngine(trained, ZOConfig(lr=1e-2, weight_decay=0.05, seed=1, q=2))
    updates = [engine.step(padded_batch(seed=s)).update for s in range(5)]
    engine.flush()
    replayed = clone_model(base)
    engine2 = ZOEngine(replayed, ZOConfig(lr=1e-2, weight_decay=0.05, seed=1, q=2))
    for u in updates:
        engine2.apply_update(Update.from_dict(u.to_dict()))
    assert_same_params(trained, replayed)


def test_save_and_load_continue_bit_exactly(tmp_path):
    base = tiny_model("opt", seed=4)
    cfg = ZOConfig(lr=1e-2, seed=8)
    a = ZOEngine(clone_model(base), cfg)
    for s in range(3):
        a.step(padded_batch(seed=s))
    a.save(tmp_path / "ckpt")
    b = ZOEngine.load(tmp_path / "ckpt", clone_model(base))
    assert b.step_count == 3
    for s in range(3, 6):
        assert a.step(padded_batch(seed=s)).losses == b.step(padded_batch(seed=s)).losses
    a.flush(), b.flush()
    assert_same_params(a.model, b.model)


def test_lr_schedule_is_used_per_step():
    engine = ZOEngine(tiny_model("opt"), ZOConfig(lr=1.0, lr_schedule="linear", warmup_steps=2, total_steps=6))
    lrs = [engine.step(padded_batch()).lr for _ in range(6)]
    assert lrs == pytest.approx([0.5, 1.0, 1.0, 0.75, 0.5, 0.25])
