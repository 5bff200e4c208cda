"""Every point of a step as one batch, each module's parameters formed just in time (zo2.points)."""

from __future__ import annotations

import weakref

import pytest
import torch
from torch import nn
from torch.func import functional_call

from zo2 import ZOConfig, ZOEngine
from zo2.errors import ModelError
from zo2.models.units import Slot
from zo2.optim.estimators import Point
from zo2.offload.arith import PAIR_BYTES
from zo2.points import Group, PointsForward, PointValues
from zo2_testing import assert_same_params, clone_model, padded_batch, tiny_model

FAMILIES = ["opt", "llama", "qwen3", "gpt2"]


def reference_loss(model, params: dict, batch) -> float:
    """The HF model's own forward, one point at a time, with its parameters replaced."""
    logits = functional_call(model, params, (), {"input_ids": batch["input_ids"],
                                                  "attention_mask": batch["attention_mask"]}).logits[:, :-1]
    labels = batch["labels"][:, 1:]
    return torch.nn.functional.cross_entropy(logits.reshape(-1, logits.size(-1)).double(), labels.reshape(-1),
                                             ignore_index=-100).item()


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("q", [1, 2])
def test_points_in_one_batch_give_each_points_own_loss(family, q):
    """L(θ + εz_j) and L(θ − εz_j) of all q directions from one pass of 2q·B rows equal the model's own forward at
    each point separately (float64, so any mix-up of rows or points is far above the rounding)."""
    model = tiny_model(family, seed=1, dtype=torch.float64).eval()
    batch = padded_batch(seed=2)
    theta = {n: p.detach().clone() for n, p in model.named_parameters()}
    engine = ZOEngine(clone_model(model), ZOConfig(lr=0.0, eps=1e-2, seed=5, q=q))
    r = engine.step(batch)
    assert len(r.losses) == 2 * q
    for j in range(q):
        z = engine.perturbation(0, j)
        for sign, got in ((1, r.losses[2 * j]), (-1, r.losses[2 * j + 1])):
            point = {n: (t + sign * 1e-2 * z[n].double()) if n in z else t for n, t in theta.items()}
            assert got == pytest.approx(reference_loss(model, point, batch), rel=1e-12)
    assert r.losses[0] != r.losses[1]


def test_at_most_one_modules_parameters_are_formed_at_a_time(monkeypatch):
    """Never two perturbed copies of a block: the buffers formed for points are dropped after their module's call,
    so what is live is one module's points (a small module's θ + εz and θ − εz come from one launch and both
    live until its second point's call; in the head, which runs point by point, a norm's θ − εz waits there)."""
    live: dict[int, int] = {}
    peak = [0]
    original, original_pair = PointValues.form, PointValues.form_pair

    def track(out):
        key = id(out)
        live[key] = out.numel()
        weakref.finalize(out, live.pop, key, None)
        peak[0] = max(peak[0], sum(live.values()))

    def counting(self, flat, lo, hi, table, point):
        out = original(self, flat, lo, hi, table, point)
        if out.data_ptr() != flat[lo:hi].data_ptr():  # a formed buffer, not a view of θ
            track(out)
        return out

    def counting_pair(self, flat, lo, hi, table, seed):
        plus, minus = original_pair(self, flat, lo, hi, table, seed)
        track(plus), track(minus)
        return plus, minus

    monkeypatch.setattr(PointValues, "form", counting)
    monkeypatch.setattr(PointValues, "form_pair", counting_pair)
    model = tiny_model("llama", seed=3, num_hidden_layers=4)
    engine = ZOEngine(model, ZOConfig(lr=1e-3, seed=1, q=2))
    for s in range(2):
        engine.step(padded_batch(seed=s))
    per_module: dict[int, int] = {}
    for u in engine.units:
        for slot in u.slots:
            per_module[id(slot.module)] = per_module.get(id(slot.module), 0) + engine.params[slot.name].numel()
    largest_block = max(sum(engine.params[n].numel() for n in u.owned) for u in engine.units if u.kind == "block")
    largest = max(per_module.values())
    norm = max(n for n in per_module.values() if n * 16 <= largest)  # the head's norm: its θ − εz waits a point
    assert 0 < peak[0] <= 2 * largest + norm < 2 * largest_block


def test_a_small_modules_two_points_come_from_one_launch_with_the_same_values(monkeypatch):
    from zo2.points import PointValues as PV

    base = tiny_model("opt", seed=5)
    calls = {"pair": 0, "one": 0}
    real_pair, real_form = PV.form_pair, PV.form
    monkeypatch.setattr(PV, "form_pair", lambda self, *a: (calls.__setitem__("pair", calls["pair"] + 1),
                                                           real_pair(self, *a))[1])
    monkeypatch.setattr(PV, "form", lambda self, *a: (calls.__setitem__("one", calls["one"] + 1),
                                                      real_form(self, *a))[1])
    paired = ZOEngine(clone_model(base), ZOConfig(lr=1e-2, seed=2))
    rp = [paired.step(padded_batch(seed=s)).losses for s in range(3)]
    assert calls["pair"] > 0
    monkeypatch.setattr("zo2.points.PAIR_BYTES", 0)  # every module one point at a time
    single = ZOEngine(clone_model(base), ZOConfig(lr=1e-2, seed=2))
    calls["pair"] = 0
    rs = [single.step(padded_batch(seed=s)).losses for s in range(3)]
    assert calls["pair"] == 0
    assert rp == rs
    assert_same_params(paired.model, single.model)


class _ByPoint(PointValues):
    """θ + (i + 1) · 1000 at point i: which point a module was called at shows in its output."""

    def __init__(self, points):
        super().__init__(None, None, torch.float32)
        self.index = {id(p): i for i, p in enumerate(points)}
        self.itemsize = PAIR_BYTES + 1  # every module "large": one point at a time

    def form(self, flat, lo, hi, table, point):
        return flat[lo:hi] + 1000.0 * (self.index[id(point)] + 1)


def _linear_group():
    lin = nn.Linear(2, 1, bias=False)
    flat = torch.zeros(2)
    group = Group(lin, [Slot(lin, "weight", "w")], 0, 2, None, {"w": (0, 2, (1, 2))}, chunked=False)
    return lin, flat, group


def test_each_point_gets_its_rows_also_flattened_and_a_one_row_input_is_broadcast():
    points = [Point(((1, 1.0),)), Point(((1, -1.0),)), Point(((2, 1.0),))]
    lin, flat, group = _linear_group()
    fwd = PointsForward(_ByPoint(points), points, rows=2)
    x = torch.ones(6, 2)
    with fwd.installed([group], flat):
        out = lin(x)
        flat_tokens = lin(torch.ones(6 * 5, 2))  # (n·B·T, d): the tokens of each point's rows, flattened
        one_row = lin(torch.ones(1, 2))
    assert out[:, 0].tolist() == [2000.0, 2000.0, 4000.0, 4000.0, 6000.0, 6000.0]
    assert flat_tokens[:, 0].tolist() == [2000.0] * 10 + [4000.0] * 10 + [6000.0] * 10
    assert one_row[:, 0].tolist() == out[:, 0].tolist()
    assert "forward" not in lin.__dict__ and torch.equal(lin(x), x @ lin.weight.T)  # uninstalled afterwards


def test_an_input_without_the_batch_rows_is_refused_with_the_reason():
    points = [Point(((1, 1.0),)), Point(((1, -1.0),))]
    lin, flat, group = _linear_group()
    with PointsForward(_ByPoint(points), points, rows=3).installed([group], flat):
        with pytest.raises(ModelError, match=r"does not start with the batch's 2×3 rows"):
            lin(torch.ones(5, 2))


@pytest.mark.parametrize("optimizer", ["zo-sgd", "zo-adam", "zo-sgd-momentum"])
def test_the_start_of_run_plan_prints_zo2_plans_peak(optimizer):
    """The engine's plan with a batch's activations is the peak ``zo2 plan`` predicts for the same shape,
    residency, batch and optimizer (both use zo2.parallel.plan_memory.activation_bytes; a stateful optimizer's
    state sits with the resident units and streams with the blocks in both)."""
    from dataclasses import replace

    from zo2.config.presets import get_preset
    from zo2.parallel.plan_inputs import Layout, Rates, Workload, shape_from_config
    from zo2.parallel.plan_memory import working_bytes
    from zo2.parallel.plan_model import predict_layout
    from zo2.train.model import build_model

    m = replace(get_preset("opt-125m").model, num_layers=2, dtype="bf16")
    engine = ZOEngine(build_model(m), ZOConfig(offload=True, kernels="torch", optimizer=optimizer))
    engine.plan.reserve_bytes -= 4 * max(p.numel() for u in engine.units if u.kind == "block"
                                         for n in u.owned for p in [engine.params[n]])  # zo2 plan models Triton
    engine.plan.block_reserve_bytes -= 4 * max(p.numel() for u in engine.units if u.kind == "block"
                                               for n in u.owned for p in [engine.params[n]])
    text = engine.describe_plan(4, 128)
    assert "with the activations of a 4x128 batch" in text
    act_block, logits, loss = _act(m, 4 * 128)
    ours = engine.plan.peak_with(lambda block, reserve: working_bytes(block, reserve, act_block, logits, loss))
    shape = shape_from_config(m)
    work = Workload(tokens=4 * 128, seq=128, offload="stream", optimizer=optimizer)
    theirs = predict_layout(shape, Layout(), work, Rates()).gpu_mem_gb
    assert ours == pytest.approx(theirs * 1e9, rel=1e-6)
    assert f"with the activations of a 4x128 batch {ours / 1e9:.2f} GB" in text


def _act(m, tokens):
    from zo2.parallel.plan_memory import activation_bytes

    return activation_bytes(m.hidden_size, m.ffn_size, m.vocab_size, tokens, 2, 2)


@pytest.mark.parametrize("family", ["opt", "gpt2", pytest.param("llama", marks=pytest.mark.slow)])
def test_a_large_linear_layer_or_embedding_is_formed_a_chunk_of_rows_at_a_time(monkeypatch, family):
    """With the chunk at 512 bytes every linear layer and embedding of a tiny model is formed a few rows at a
    time: each point's loss is still the model's own forward at that point (float64), no formed buffer exceeds a
    chunk (the tied head of gpt2 and opt included), and streamed (by block and by matrix) ≡ resident bit for bit."""
    monkeypatch.setattr("zo2.offload.arith.FORM_CHUNK_BYTES", 512)
    sizes: list[int] = []
    original = PointValues.form

    def counting(self, flat, lo, hi, table, point):
        sizes.append(hi - lo)
        return original(self, flat, lo, hi, table, point)

    monkeypatch.setattr(PointValues, "form", counting)
    model = tiny_model(family, seed=1, dtype=torch.float64).eval()
    batch = padded_batch(seed=2)
    theta = {n: p.detach().clone() for n, p in model.named_parameters()}
    engine = ZOEngine(clone_model(model), ZOConfig(lr=0.0, eps=1e-2, seed=5))
    r = engine.step(batch)
    z = engine.perturbation(0, 0)
    for sign, got in ((1, r.losses[0]), (-1, r.losses[1])):
        point = {n: (t + sign * 1e-2 * z[n].double()) if n in z else t for n, t in theta.items()}
        assert got == pytest.approx(reference_loss(model, point, batch), rel=1e-12)
    chunked = [g for gs in engine._groups.values() for g in gs if g.chunked]
    assert any(type(g.module) is nn.Embedding for g in chunked) and any(type(g.module) is nn.Linear for g in chunked)
    widest = max(max(p.shape[-1] for p in g.module.parameters()) for g in chunked)
    assert max(sizes) <= 512 // 8 + widest  # a chunk of rows (a row may exceed the chunk alone), or a bias

    base = tiny_model(family, seed=4, num_hidden_layers=3)
    runs = {}
    for name, cfg in {"resident": dict(offload=False), "block": dict(offload=True),
                      "matrix": dict(offload=True, stream_granularity="matrix")}.items():
        e = ZOEngine(clone_model(base), ZOConfig(lr=1e-2, eps=1e-3, seed=7, **cfg))
        runs[name] = ([e.step(padded_batch(seed=s)).loss for s in range(3)], e)
    assert runs["resident"][0] == runs["block"][0] == runs["matrix"][0]
    assert_same_params(runs["resident"][1].model, runs["block"][1].model)
    assert_same_params(runs["resident"][1].model, runs["matrix"][1].model)
