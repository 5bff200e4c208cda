"""The ZO optimizers behind the engine: update rules against independent implementations, convergence on a
convex problem, exactness between modes (deferred/immediate, streamed/resident, saved/resumed, replayed), and a
non-differentiable objective."""

from __future__ import annotations

import math

import copy
from dataclasses import replace

import pytest
import torch

from zo2 import ZOConfig, ZOEngine
from zo2.engine import default_no_decay
from zo2.errors import CheckpointError, ConfigError
from zo2.optim.estimators import build_estimator
from zo2.optim.optimizers import (OPTIMIZERS, UnitState, build_optimizer, check_supported, conservative_scale)
from zo2.optim.rng import direction, param_key
from zo2.optim.schedule import lr_at
from zo2_kernels import SegmentTable, reference
from zo2_testing import assert_same_params, clone_model, gpu_test, padded_batch, tiny_model

STATEFUL = ["zo-sgd-momentum", "zo-adam"]
FAST = dict(distribution="rademacher")  # Rademacher directions are cheap to generate on CPU


def small_model(family: str = "opt", seed: int = 1):
    return tiny_model(family, seed=seed, num_hidden_layers=1)


def cfg(optimizer: str, **kw) -> ZOConfig:
    base = dict(lr=1e-2, eps=1e-3, weight_decay=0.05, seed=11, q=2, optimizer=optimizer, **FAST)
    base.update(kw)
    return ZOConfig(**base)


def run(model, config: ZOConfig, steps: int = 3, loss_fn=None):
    engine = ZOEngine(model, config, loss_fn=loss_fn)
    results = [engine.step(padded_batch(seed=s)) for s in range(steps)]
    engine.flush()
    return engine, results


def estimate(update, name: str, numel: int, distribution: str) -> torch.Tensor:
    """ĝ = Σ cᵢ z(seedᵢ) of one parameter, from the directions' definition."""
    g = None
    for seed, c in zip(update.seeds, update.coeffs):
        term = direction(seed, param_key(name), numel, distribution=distribution) * c
        g = term if g is None else g + term
    return g


# ---------------------------------------------------------------------------------------------- update rules
@pytest.mark.parametrize("optimizer", ["zo-sgd", "zo-sgd-momentum", "zo-sgd-sign", "zo-sgd-sign:projected",
                                       "zo-adam"])
def test_update_rule_matches_the_textbook_formula(optimizer):
    model = small_model()
    optimizer, _, sign_mode = optimizer.partition(":")
    config = cfg(optimizer, deferred_update=False, momentum=0.8, beta1=0.8, beta2=0.9, adam_eps=1e-6,
                 sign_mode=sign_mode or "elementwise")
    engine = ZOEngine(model, config)
    theta = {n: p.detach().clone() for n, p in model.named_parameters()}
    m = {n: torch.zeros_like(t) for n, t in theta.items()}
    v = {n: torch.zeros_like(t) for n, t in theta.items()}
    for t in range(1, 4):
        update = engine.step(padded_batch(seed=t)).update
        assert len(update.seeds) == 2  # q = 2: the estimate averages two directions
        for n, p in model.named_parameters():
            g = estimate(update, n, p.numel(), config.distribution).view(p.shape)
            lam = 0.0 if default_no_decay(n, p) else config.weight_decay
            if optimizer == "zo-sgd":
                d = g
            elif optimizer == "zo-sgd-momentum":
                m[n] = config.momentum * m[n] + g
                d = m[n]
            elif optimizer == "zo-sgd-sign" and sign_mode == "projected":  # ZO-Bench: sign(gᵢ)·zᵢ, averaged
                d = sum(direction(seed, param_key(n), p.numel(), distribution=config.distribution)
                        * math.copysign(1.0, c) for seed, c in zip(update.seeds, update.coeffs)).view(p.shape) / 2
            elif optimizer == "zo-sgd-sign":
                d = torch.sign(g)
            else:
                m[n] = config.beta1 * m[n] + (1 - config.beta1) * g
                v[n] = config.beta2 * v[n] + (1 - config.beta2) * g * g
                m_hat, v_hat = m[n] / (1 - config.beta1**t), v[n] / (1 - config.beta2**t)
                d = m_hat / (v_hat.sqrt() + config.adam_eps)
            theta[n] = theta[n] - update.lr * (d + lam * theta[n])
            torch.testing.assert_close(p.detach(), theta[n], rtol=1e-5, atol=1e-6, msg=f"{optimizer} {n} step {t}")
    state = engine.optimizer_state()
    if optimizer == "zo-sgd-momentum":
        for n in theta:
            torch.testing.assert_close(state[f"optimizer/momentum/{n}"], m[n], rtol=1e-5, atol=1e-7)
    if optimizer == "zo-adam":
        assert int(state["optimizer/step"]) == 3
        for n in theta:
            torch.testing.assert_close(state[f"optimizer/exp_avg/{n}"], m[n], rtol=1e-5, atol=1e-7)
            torch.testing.assert_close(state[f"optimizer/exp_avg_sq/{n}"], v[n], rtol=1e-5, atol=1e-9)


@pytest.mark.parametrize("optimizer", STATEFUL)
def test_stateful_optimizers_match_torch_optimizers_fed_the_estimate(optimizer):
    model = small_model()
    reference_model = clone_model(model)
    config = cfg(optimizer, weight_decay=0.0, deferred_update=False, distribution="gaussian", q=1)
    engine = ZOEngine(model, config)
    params = dict(reference_model.named_parameters())
    if optimizer == "zo-adam":
        torch_opt = torch.optim.Adam(params.values(), lr=config.lr, betas=(config.beta1, config.beta2),
                                     eps=config.adam_eps)
    else:
        torch_opt = torch.optim.SGD(params.values(), lr=config.lr, momentum=config.momentum)
    for s in range(2):
        update = engine.step(padded_batch(seed=s)).update
        for n, p in params.items():
            p.grad = estimate(update, n, p.numel(), config.distribution).view(p.shape)
        torch_opt.step()
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.detach(), params[n].detach(), rtol=1e-5, atol=1e-6, msg=n)


def test_conservative_step_keeps_the_best_of_the_three_candidates():
    model = small_model()
    config = cfg("zo-sgd-conservative", lr=0.03, deferred_update=False, q=1)  # steps big enough to be rejected
    engine = ZOEngine(model, config)
    batch = padded_batch(seed=0)
    scales = []
    for _ in range(6):
        theta = {n: p.detach().clone() for n, p in model.named_parameters()}
        r = engine.step(batch)
        # central q=1: L+, L-, then L(θ), then the candidates θ − lr(ĝ + λθ) and θ + lr(ĝ + λθ)
        assert len(r.losses) == 5
        base, descent, ascent = r.losses[2:]
        scale = r.update.lr / r.lr
        assert scale == conservative_scale(base, descent, ascent)
        scales.append(scale)
        chosen = {0.0: base, 1.0: descent, -1.0: ascent}[scale]
        assert chosen == min(base, descent, ascent)
        # the weights are the chosen candidate, and evaluating them gives its loss: the loss never goes up
        assert engine.evaluate(batch).loss == chosen <= base
        for n, p in model.named_parameters():
            g = estimate(r.update, n, p.numel(), config.distribution).view(p.shape)
            lam = 0.0 if default_no_decay(n, p) else config.weight_decay
            expected = theta[n] - r.update.lr * (g + lam * theta[n])
            torch.testing.assert_close(p.detach(), expected, rtol=1e-5, atol=1e-6)
    assert {0.0, 1.0} <= set(scales)  # both accepted and rejected steps happened


def test_conservative_scale_prefers_the_descent_step_and_ignores_nonfinite_losses():
    assert conservative_scale(1.0, 0.5, 0.7) == 1.0
    assert conservative_scale(1.0, 1.5, 0.7) == -1.0
    assert conservative_scale(1.0, 1.5, 1.2) == 0.0
    assert conservative_scale(1.0, 1.0, 1.0) == 1.0  # ties: the plain step, then θ
    assert conservative_scale(1.0, 1.2, 1.0) == 0.0
    assert conservative_scale(2.0, 1.0, 1.0) == 1.0  # descent and ascent tie below θ: descent
    assert conservative_scale(1.0, float("nan"), 0.9) == -1.0
    assert conservative_scale(1.0, float("inf"), float("nan")) == 0.0


# ------------------------------------------------------------------------------------------- convergence
D = 8


def least_squares():
    """f(θ) = ½‖Aθ − b‖², A symmetric with eigenvalues in [1, 2]: the optimum is A⁻¹b."""
    g = torch.Generator().manual_seed(0)
    q, _ = torch.linalg.qr(torch.randn(D, D, generator=g, dtype=torch.float64))
    a = q @ torch.diag(torch.linspace(1.0, 2.0, D, dtype=torch.float64)) @ q.T
    b = torch.randn(D, generator=g, dtype=torch.float64)
    return a, b, torch.linalg.solve(a, b)


def minimize(config: ZOConfig, steps: int, f) -> torch.Tensor:
    """The engine's step on a model-free objective over one flat float32 buffer: the estimator's points and
    combine, the conservative choice, then the fused MeZO-SGD update or the optimizer's rule."""
    opt, est = build_optimizer(config), build_estimator(config.estimator, config.seed, config.eps, config.q)
    key, dist = 12345, config.distribution
    table = SegmentTable([(0, D, key, True)])
    theta = torch.zeros(D)
    state = UnitState({name: torch.zeros(D) for name in opt.state_names})
    for t in range(steps):
        lr = lr_at(t, config.lr, config.lr_schedule, config.warmup_steps, config.total_steps)
        losses = []
        for point in est.points(t):
            x = theta.double()
            for seed, sign in point.terms:
                x = x + config.eps * sign * reference.direction(seed, key, 0, D, dist).double()
            losses.append(f(x))
        update = est.combine(t, losses, lr).update
        if opt.conservative:
            descent, ascent = (reference.update(theta, table, update.seeds, update.coeffs, s * lr, config.weight_decay,
                                                dist) for s in (1.0, -1.0))
            update = replace(update, lr=lr * conservative_scale(f(theta.double()), f(descent.double()),
                                                                f(ascent.double())))
        if opt.fused:
            reference.update(theta, table, update.seeds, update.coeffs, update.lr, config.weight_decay, dist, out=theta)
        else:
            opt.apply(theta, table, state, update, config.weight_decay, dist)
    return theta


@pytest.mark.parametrize("optimizer,lr", [("zo-sgd", 0.1), ("zo-sgd-momentum", 0.01), ("zo-sgd-sign", 0.02),
                                          ("zo-sgd-conservative", 0.1), ("zo-adam", 0.05)])
def test_every_optimizer_reaches_the_least_squares_optimum(optimizer, lr):
    a, b, optimum = least_squares()

    def f(x: torch.Tensor) -> float:
        r = a @ x - b
        return 0.5 * float(r @ r)

    steps = 300
    config = ZOConfig(optimizer=optimizer, lr=lr, eps=1e-4, q=2, weight_decay=0.0, seed=1, lr_schedule="linear",
                      total_steps=steps, **FAST)
    theta = minimize(config, steps, f).double()
    # stated tolerance: within 1% of ‖θ*‖ (sign descent, the coarsest, lands at ~0.1%; the others far closer)
    assert (theta - optimum).norm() < 1e-2 * optimum.norm(), f"{optimizer}: {theta} vs {optimum}"


# --------------------------------------------------------------------------------------- exactness between modes
@pytest.mark.parametrize("optimizer", OPTIMIZERS)
def test_deferred_update_equals_immediate_bit_for_bit(optimizer):
    base = small_model("llama")
    runs = [run(clone_model(base), cfg(optimizer, deferred_update=d)) for d in (True, False)]
    assert [r.losses for r in runs[0][1]] == [r.losses for r in runs[1][1]]
    assert [r.update for r in runs[0][1]] == [r.update for r in runs[1][1]]
    assert_same_params(runs[0][0].model, runs[1][0].model)
    a, b = runs[0][0].optimizer_state(), runs[1][0].optimizer_state()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert bool(a) == (optimizer in STATEFUL)


@pytest.mark.parametrize("optimizer", STATEFUL + ["zo-sgd-sign", "zo-sgd-conservative"])
def test_streamed_equals_resident_bit_for_bit(optimizer):
    base = tiny_model("opt", seed=2)  # three blocks through three stream slots
    resident, r_res = run(clone_model(base), cfg(optimizer, offload=False))
    streamed, r_str = run(clone_model(base), cfg(optimizer, offload=True, prefetch=1))
    assert streamed.plan.streamed and not resident.plan.streamed
    assert [r.losses for r in r_res] == [r.losses for r in r_str]
    assert_same_params(resident.model, streamed.model)
    a, b = resident.optimizer_state(), streamed.optimizer_state()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    state_store = streamed.opt_state.store
    if optimizer in STATEFUL:  # the blocks' state lives in a host store and moves with the blocks
        assert state_store is not None and len(state_store) == len(streamed.store)
        per_block = len(streamed.optimizer.state_names) * 4
        assert state_store.nbytes == sum(streamed.store.flat(i).numel() * per_block for i in range(len(state_store)))
        moved = r_str[1].bytes_h2d  # step 1 applies step 0's update: every block and its state go up and back
        assert moved == streamed.store.nbytes + state_store.nbytes == r_str[1].bytes_d2h
    else:
        assert state_store is None


@pytest.mark.parametrize("optimizer", ["zo-adam", "zo-sgd-sign"])
def test_bf16_weights_agree_across_modes(optimizer):
    """Low-precision weights round the new rules' updates stochastically, alike in every mode (fp32 state)."""
    base = small_model("llama", seed=5)
    runs = [run(clone_model(base), cfg(optimizer, storage_dtype="bf16", lr=1e-4, **mode))
            for mode in (dict(), dict(deferred_update=False), dict(offload=True))]
    for engine, results in runs[1:]:
        assert [r.losses for r in results] == [r.losses for r in runs[0][1]]
        assert_same_params(engine.model, runs[0][0].model)
    assert all(p.dtype == torch.bfloat16 for p in runs[0][0].model.parameters())
    trained = runs[0][0].model.parameters()
    moved = sum(not torch.equal(p.to(torch.bfloat16), q) for p, q in zip(base.parameters(), trained))
    assert moved >= len(list(base.parameters())) - 2  # norm weights at 1.0 may round back to 1.0 at lr 1e-4
    state = runs[0][0].optimizer_state()
    assert all(t.dtype == torch.float32 for k, t in state.items() if k != "optimizer/step")


@gpu_test
@pytest.mark.parametrize("optimizer", STATEFUL)
def test_streamed_equals_resident_bit_for_bit_on_cuda(optimizer):
    base = tiny_model("llama", seed=2)
    resident, r_res = run(clone_model(base), cfg(optimizer, offload=False, device="cuda", distribution="gaussian"))
    streamed, r_str = run(clone_model(base), cfg(optimizer, offload=True, device="cuda", distribution="gaussian"))
    assert [r.losses for r in r_res] == [r.losses for r in r_str]
    assert_same_params(resident.model, streamed.model)
    a, b = resident.optimizer_state(), streamed.optimizer_state()
    assert all(torch.equal(a[k].cpu(), b[k].cpu()) for k in a)


@pytest.mark.parametrize("optimizer", STATEFUL)
def test_save_and_load_continue_bit_exactly(optimizer, tmp_path):
    base = small_model("opt", seed=4)
    config = cfg(optimizer, offload=True)
    a = ZOEngine(clone_model(base), config)
    for s in range(2):
        a.step(padded_batch(seed=s))
    a.save(tmp_path / "ckpt")
    b = ZOEngine.load(tmp_path / "ckpt", clone_model(base))
    assert b.config.optimizer == optimizer
    for s in range(2, 4):
        assert a.step(padded_batch(seed=s)).losses == b.step(padded_batch(seed=s)).losses
    assert_same_params(a.model, b.model)
    sa, sb = a.optimizer_state(), b.optimizer_state()
    assert sa.keys() == sb.keys() and int(sa["optimizer/step"]) == 4
    assert all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.mark.parametrize("optimizer", STATEFUL)
def test_replay_from_a_snapshot_with_the_state_is_bit_exact(optimizer):
    base = small_model("llama", seed=3)
    trained = ZOEngine(clone_model(base), cfg(optimizer))
    updates = [trained.step(padded_batch(seed=s)).update for s in range(2)]
    snapshot = trained.trainable_state()  # weights and optimizer state after 2 steps
    assert any(k.startswith("optimizer/") for k in snapshot)
    updates += [trained.step(padded_batch(seed=s)).update for s in range(2, 4)]
    trained.flush()

    replayed = ZOEngine(clone_model(base), cfg(optimizer, offload=True))  # another placement, same arithmetic
    replayed.load_trainable_state(snapshot)
    for u in updates[2:]:
        replayed.apply_update(u)
    assert_same_params(trained.model, replayed.model)

    from_base = ZOEngine(clone_model(base), cfg(optimizer))  # no snapshot: the base weights and zero state
    for u in updates:
        from_base.apply_update(u)
    assert_same_params(trained.model, from_base.model)

    weights_only = {k: t for k, t in snapshot.items() if not k.startswith("optimizer/")}
    with pytest.raises(CheckpointError, match="optimizer"):
        ZOEngine(clone_model(base), cfg(optimizer)).load_trainable_state(weights_only)


def test_stateless_optimizers_keep_no_state_and_snapshots_hold_only_weights():
    model = small_model()
    engine = ZOEngine(model, cfg("zo-sgd-sign"))
    engine.step(padded_batch())
    assert engine.optimizer_state() == {}
    assert set(engine.trainable_state()) == {n for n, _ in model.named_parameters()}


# ------------------------------------------------------------------------------------------ non-differentiable
LABELS = (5, 6)


def accuracy(logits: torch.Tensor, batch) -> torch.Tensor:
    """Share of sequences whose last position ranks the right one of two label tokens first."""
    pair = logits[:, -1, list(LABELS)]
    return (pair.argmax(-1) == batch["label"]).double().mean()


def test_training_on_negative_accuracy_raises_accuracy():
    """A non-differentiable objective: only the loss values matter to a ZO step."""
    model = small_model(seed=0)
    for n, p in model.named_parameters():  # a linear classifier's worth of trainable weights: a short test
        p.requires_grad_(n.startswith("model.decoder.final_layer_norm"))
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 128, (64, 6), generator=g)
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    teacher = copy.deepcopy(model)  # labels the trainable weights can fit: another final norm's, balanced
    with torch.no_grad():
        norm = teacher.model.decoder.final_layer_norm
        norm.weight.add_(torch.randn(norm.weight.shape, generator=g))
        norm.bias.add_(torch.randn(norm.bias.shape, generator=g))
        pair = teacher(**batch).logits[:, -1, list(LABELS)]
        margin = pair[:, 1] - pair[:, 0]
        batch["label"] = (margin > margin.median()).long()

    engine = ZOEngine(model, ZOConfig(lr=1.0, eps=0.3, seed=0, q=1, **FAST),
                      loss_fn=lambda logits, b: -accuracy(logits, b))
    before = -engine.evaluate(batch).loss
    results = [engine.step(batch) for _ in range(60)]
    after = -engine.evaluate(batch).loss
    assert any(r.projected_grad == 0.0 for r in results)  # a piecewise-constant loss: many steps see no change
    assert after >= before + 0.125, (before, after)  # 0.625 -> 0.86 here


# ----------------------------------------------------------------------------------------------- config
def test_config_names_the_fix_for_bad_optimizer_settings():
    with pytest.raises(ConfigError, match="optim.optimizer.*Did you mean 'zo-adam'"):
        ZOConfig(optimizer="zo-adamw")
    with pytest.raises(ConfigError, match=r"optim.momentum.*\[0, 1\)"):
        ZOConfig(optimizer="zo-sgd-momentum", momentum=1.0)
    with pytest.raises(ConfigError, match="optim.beta2"):
        ZOConfig(optimizer="zo-adam", beta2=1.5)
    with pytest.raises(ConfigError, match="optim.adam_eps"):
        ZOConfig(optimizer="zo-adam", adam_eps=0.0)


def test_unsupported_modes_are_refused_with_the_fix():
    class Comm:
        class dims:
            pp = 2

    with pytest.raises(ConfigError, match="parallel.pp = 1"):
        check_supported(build_optimizer(ZOConfig(optimizer="zo-sgd-conservative")), comm=Comm())



# ---------------------------------------------------------------------------------------------- weight decay
def _olmo2():
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model("olmo2", vocab_size=64, hidden_size=32, num_hidden_layers=1, intermediate_size=64,
                                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config)


# per family: parameters MeZO's name rule decays although they are norms (zo2's default skips them), and norms both
# rules skip -- written out by hand from each family's parameter names
MEZO_DECAYS_NORMS = {
    "opt": ([], ["model.decoder.layers.0.self_attn_layer_norm.weight", "model.decoder.final_layer_norm.bias"]),
    "llama": (["model.norm.weight"], ["model.layers.0.input_layernorm.weight",
                                      "model.layers.0.post_attention_layernorm.weight"]),
    "qwen3": (["model.norm.weight", "model.layers.0.self_attn.q_norm.weight", "model.layers.0.self_attn.k_norm.weight"],
              ["model.layers.0.input_layernorm.weight"]),
    "gpt2": (["transformer.ln_f.weight", "transformer.h.0.ln_1.weight", "transformer.h.0.ln_2.weight"],
             ["transformer.ln_f.bias", "transformer.h.0.attn.c_attn.bias"]),
    "olmo2": (["model.norm.weight", "model.layers.0.self_attn.q_norm.weight", "model.layers.0.self_attn.k_norm.weight"],
              ["model.layers.0.post_attention_layernorm.weight", "model.layers.0.post_feedforward_layernorm.weight"]),
}


@pytest.mark.parametrize("family", sorted(MEZO_DECAYS_NORMS))
def test_no_decay_rules_per_family(family):
    model = _olmo2() if family == "olmo2" else small_model(family)
    decay = {rule: ZOEngine(model, ZOConfig(weight_decay=0.1, no_decay=rule, **FAST)).decay
             for rule in ("norms_and_biases", "mezo_names")}
    params = dict(model.named_parameters())
    mezo_only, both_skip = MEZO_DECAYS_NORMS[family]
    for name in mezo_only:
        assert decay["mezo_names"][name] and not decay["norms_and_biases"][name], name
    for name in both_skip:
        assert not decay["mezo_names"][name] and not decay["norms_and_biases"][name], name
    for name, p in params.items():  # zo2's rule: exactly the matrices that are not norms
        is_norm = any(m in name.lower() for m in ("norm", "ln_", "bias"))
        assert decay["norms_and_biases"][name] == (p.dim() >= 2 and not is_norm), name
        if decay["norms_and_biases"][name]:
            assert decay["mezo_names"][name], name  # MeZO decays every matrix zo2 decays


def test_the_rule_reaches_the_update():
    """One step at weight decay 0.1 (its g is the same under both rules): Qwen3's q_norm moves differently under the two rules, every weight both rules
    treat alike ends bit-identical."""
    out = {}
    for rule in ("norms_and_biases", "mezo_names"):
        model = small_model("qwen3")
        run(model, cfg("zo-sgd", weight_decay=0.1, no_decay=rule, q=1), steps=1)
        out[rule] = dict(model.named_parameters())
    a, b = out["norms_and_biases"], out["mezo_names"]
    assert not torch.equal(a["model.layers.0.self_attn.q_norm.weight"], b["model.layers.0.self_attn.q_norm.weight"])
    same = [n for n in a if "norm" not in n]
    assert same and all(torch.equal(a[n], b[n]) for n in same)


def test_a_bad_rule_or_sign_mode_names_the_choices():
    from zo2.errors import ConfigError

    with pytest.raises(ConfigError, match="optim.no_decay"):
        ZOConfig(no_decay="all")
    with pytest.raises(ConfigError, match="optim.sign_mode"):
        ZOConfig(sign_mode="both")
