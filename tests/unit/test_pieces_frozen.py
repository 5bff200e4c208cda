"""Frozen weights streamed one matrix at a time (zo2.offload.piece_frozen): PEFT base weights and prompt-tuned
blocks move read-only, a module at a time, through a ring of their own."""

from __future__ import annotations

import pytest
import torch

peft = pytest.importorskip("peft", reason="peft is not installed (pip install -e '.[test]' or '.[peft]')")

from zo2 import ZOConfig, ZOEngine  # noqa: E402
from zo2_testing import assert_same_params, padded_batch, tiny_model  # noqa: E402

CFG = dict(lr=1e-2, eps=1e-3, weight_decay=0.01, seed=3)
LORA_TARGETS = {"opt": ["q_proj", "v_proj", "fc1"], "llama": ["q_proj", "v_proj", "down_proj"], "gpt2": ["c_attn"]}


def lora_model(family: str = "opt", seed: int = 0):
    """A tiny model wrapped in LoRA with random adapter weights (B ≠ 0, so A's perturbation shows in the loss)."""
    base = tiny_model(family, seed=seed)
    torch.manual_seed(seed + 100)
    config = peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.1, target_modules=LORA_TARGETS[family],
                             init_lora_weights="gaussian", fan_in_fan_out=family == "gpt2")
    model = peft.get_peft_model(base, config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.02)
    return model


def prompt_model(family: str, method: str = "prompt"):
    """A tiny model with PEFT prompt tuning (or prefix tuning): every block parameter is frozen."""
    torch.manual_seed(7)
    if method == "prompt":
        config = peft.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3)
    else:
        config = peft.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4, encoder_hidden_size=16)
    return peft.get_peft_model(tiny_model(family, seed=1), config)


def frozen_state(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}


def _run(model, steps=4, **kw):
    engine = ZOEngine(model, ZOConfig(**{**CFG, **kw}))
    results = [engine.step(padded_batch(seed=s)) for s in range(steps)]
    engine.flush()
    return engine, results


def _same_runs(make, **extra):
    """Resident, block-streamed and matrix-streamed runs of ``make()``: the same losses and parameters bit for bit,
    and frozen weights that never changed. Returns the matrix run."""
    runs = []
    for kw in (dict(offload=False), dict(offload=True), dict(offload=True, stream_granularity="matrix")):
        model = make()
        before = frozen_state(model)
        engine, results = _run(model, **kw, **extra)
        assert all(torch.equal(p, before[n]) for n, p in model.named_parameters() if not p.requires_grad)
        runs.append((engine, [r.losses for r in results]))
    (resident, lr_), (block, lb), (matrix, lm) = runs
    assert lr_ == lb == lm
    assert_same_params(resident.model, block.model)
    assert_same_params(resident.model, matrix.model)
    assert matrix.plan.granularity == "matrix"
    return matrix


@pytest.mark.parametrize("family", ["opt", "llama", "gpt2"])
@pytest.mark.parametrize("extra", [dict(), dict(prefetch=3), dict(writeback_every=3), dict(optimizer="zo-adam")])
def test_lora_one_matrix_at_a_time_equals_resident_and_block_streaming_bit_for_bit(family, extra):
    matrix = _same_runs(lambda: lora_model(family), **extra)
    frozen = matrix.units[1].residence.frozen
    assert frozen is not None and matrix.streamer.frozen is None  # the base weights take a ring of their own


@pytest.mark.parametrize("family, method", [("opt", "prompt"), ("llama", "prompt"), ("opt", "prefix"),
                                            ("llama", "prefix")])
@pytest.mark.parametrize("prefetch", [1, 3])
def test_prompt_tuned_blocks_stream_one_matrix_at_a_time_bit_for_bit(family, method, prefetch):
    matrix = _same_runs(lambda: prompt_model(family, method), prefetch=prefetch)
    assert len(matrix.streamer.store) == 0  # the blocks hold nothing trainable: only frozen pieces move
    assert matrix.units[1].residence.frozen.collect_stats().write_backs == 0


def _device_views(engine):
    """(frozen ring, whether a tensor is a view of its device pool)."""
    ring = engine.units[1].residence.frozen.streamer
    lo = ring.pool.data_ptr()
    hi = lo + ring.pool.numel() * ring.pool.element_size()
    return ring, lambda t: lo <= t.data_ptr() < hi


def test_base_weights_are_read_from_the_ring_a_module_at_a_time_never_perturbed_or_written_back():
    """While a LoRA layer runs, its base weight is a view of the frozen ring holding exactly the stored values
    (never perturbed); at most one module's frozen weights point at the device then; at rest they are views of
    the host store again; a step writes back the trainable bytes only, and the store keeps the original values."""
    model = lora_model("opt")
    before = frozen_state(model)
    engine = ZOEngine(model, ZOConfig(offload=True, stream_granularity="matrix", **CFG))
    ring, on_device = _device_views(engine)
    frozen = engine.units[1].residence.frozen
    params = [p for p in model.parameters() if not p.requires_grad]
    weight_of = {id(m): f"{n}.weight" for n, m in model.named_modules() if n.endswith("base_layer")}
    streamed = {id(m) for u in engine.units if u.store_index is not None
                for m in engine.adapter.blocks()[u.index].modules()}
    seen = []

    def check(module, args):
        if id(module) not in streamed:
            return
        seen.append(on_device(module.weight))
        assert torch.equal(module.weight, before[weight_of[id(module)]])  # the stored values, not a point's
        # the frozen weights pointing at the device now: this module's, never its block's
        live = {id(m) for m in model.modules() for p in m._parameters.values()
                if p is not None and not p.requires_grad and on_device(p)}
        assert live == {id(module)}

    handles = [m.register_forward_pre_hook(check) for m in model.modules() if id(m) in weight_of]
    try:
        moved = [engine.step(padded_batch(seed=s)) for s in range(4)]
    finally:
        for h in handles:
            h.remove()
    assert seen and all(seen)
    assert not any(on_device(p) for p in params)  # at rest: the host store
    engine.flush()
    # the frozen parameters are views of the store: the store holds the original values
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters() if not p.requires_grad)
    assert [r.bytes_d2h for r in moved[1:]] == [engine.store.nbytes] * 3  # trainable bytes only
    assert [r.bytes_h2d for r in moved[2:]] == [engine.store.nbytes + frozen.store.nbytes] * 2
    assert ring.collect_stats().write_backs == 0


@pytest.mark.parametrize("prefetch", [1, 3])
def test_the_device_holds_rings_of_a_few_matrices_not_a_blocks_frozen_weights(prefetch):
    """The frozen ring is prefetch + 2 of the largest frozen module, a fraction of a block's frozen bytes; the plan
    counts both rings; prefetch counts the frozen matrices ahead, not the norms between them."""
    model = lora_model("llama")
    engine = ZOEngine(model, ZOConfig(offload=True, stream_granularity="matrix", prefetch=prefetch, **CFG))
    frozen = engine.units[1].residence.frozen
    pieces = frozen.streamer.store
    largest = max(pieces.flat(i).numel() for i in range(len(pieces)))
    block = max(frozen.store.flat(i).numel() for i in range(len(frozen.store)))
    assert frozen.streamer.pool.numel() == (prefetch + 2) * largest
    assert largest * 4 < block  # a matrix, not a block
    assert engine.plan.slot_bytes == engine.streamer.device_bytes + frozen.device_bytes
    ordinary = ZOEngine(lora_model("llama"), ZOConfig(offload=True, prefetch=prefetch, **CFG))
    assert engine.plan.slot_bytes * 3 < ordinary.plan.slot_bytes
    for s in range(2):  # the first pass learns the order the forwards read the pieces in; the second uses it
        engine.step(padded_batch(seed=s))
    ring = frozen.streamer
    big = [ring.store.flat(b).numel() * 16 >= ring._largest for b in ring._ahead(0)]
    assert big.count(True) == prefetch and big[-1]


def test_a_module_holding_trainable_and_frozen_parameters_gets_both_just_in_time():
    """Frozen biases beside trainable weights in the same modules (and frozen norms): the trainable ring and the
    frozen ring both serve one module call, bit for bit as resident."""
    def make():
        model = tiny_model("opt", seed=5)
        for name, p in model.named_parameters():
            if "layer_norm" in name or "k_proj" in name or name.endswith("fc1.bias"):
                p.requires_grad_(False)
        return model

    _same_runs(make, prefetch=2)
