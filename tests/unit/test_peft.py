"""PEFT models under the ZO engine: only the adapter's parameters move; the base weights stream read-only."""

from __future__ import annotations

import pytest
import torch

peft = pytest.importorskip("peft", reason="peft is not installed (pip install -e '.[test]' or '.[peft]')")

from zo2 import ZOConfig, ZOEngine  # noqa: E402
from zo2.errors import ModelError  # noqa: E402
from zo2.models import adapter_for  # noqa: E402
from zo2.models.opt import OPTAdapter  # noqa: E402
from zo2_testing import assert_same_params, clone_model, padded_batch, tiny_model  # noqa: E402

LORA_TARGETS = {"opt": ["q_proj", "v_proj"], "llama": ["q_proj", "v_proj"], "gpt2": ["c_attn"]}


def lora_model(family: str = "opt", seed: int = 0, **lora):
    """A tiny model wrapped in LoRA; the adapter weights are random (not B = 0) so every path matters."""
    base = tiny_model(family, seed=seed)
    torch.manual_seed(seed + 100)
    config = peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.1, target_modules=LORA_TARGETS[family],
                             init_lora_weights="gaussian", fan_in_fan_out=family == "gpt2", **lora)
    model = peft.get_peft_model(base, config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.02)  # LoRA starts with B = 0: give B values so A's perturbation shows in the loss
    return model


def frozen_state(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}


def run(model, steps: int = 3, **cfg) -> ZOEngine:
    engine = ZOEngine(model, ZOConfig(lr=1e-2, eps=1e-3, seed=4, weight_decay=0.01, **cfg))
    for s in range(steps):
        r = engine.step(padded_batch(seed=s))
        assert not r.skipped
    engine.flush()
    return engine


def test_adapter_for_sees_through_a_peft_model():
    model = lora_model("opt")
    adapter = adapter_for(model)
    assert isinstance(adapter, OPTAdapter) and adapter.model is model.get_base_model()


@pytest.mark.parametrize("offload", [False, True])
def test_lora_zo_moves_only_the_lora_parameters_and_never_the_base_weights(offload):
    model = lora_model("opt")
    before = frozen_state(model)
    trainable0 = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    engine = run(model, offload=offload)
    assert set(engine.params) == set(trainable0) and all("lora_" in n for n in engine.params)
    assert (engine.streamer is not None) == offload
    for name, p in model.named_parameters():
        if p.requires_grad:
            assert not torch.equal(p, trainable0[name]), f"{name} did not move"
        else:
            assert torch.equal(p, before[name]), f"base weight {name} changed"
    assert sum(p.numel() for p in engine.params.values()) < 0.1 * sum(t.numel() for t in before.values())


@pytest.mark.parametrize("family", ["opt", "llama", "gpt2"])
def test_lora_zo_offload_equals_resident_bit_for_bit(family):
    runs = []
    for offload in (False, True):
        model = lora_model(family)
        before = frozen_state(model)
        engine = run(model, offload=offload)
        assert (engine.streamer is not None and engine.streamer.frozen is not None) == offload
        assert all(torch.equal(p, before[n]) for n, p in model.named_parameters() if not p.requires_grad)
        runs.append(model)
    assert_same_params(*runs)


def test_lora_adapters_stored_in_fp32_under_a_bf16_compute_run_in_every_mode():
    """peft casts a LoRA layer's input to ``lora_A.weight.dtype`` (the stored fp32 adapter) while zo2 forms the
    adapter in the compute dtype (bf16): the layer still runs, its loss is the bf16 model's own, the adapters stay
    fp32 and move, and resident, block-streamed and matrix-streamed runs agree bit for bit."""
    batch = padded_batch(seed=7)
    reference = lora_model("opt").to(torch.bfloat16).eval()
    with torch.no_grad():
        logits = reference(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
    want = torch.nn.functional.cross_entropy(logits.float().reshape(-1, logits.size(-1)),
                                             batch["labels"][:, 1:].reshape(-1), ignore_index=-100).item()
    runs = []
    for offload, granularity in ((False, "block"), (True, "block"), (True, "matrix")):
        model = lora_model("opt")
        engine = ZOEngine(model, ZOConfig(lr=1e-2, eps=1e-3, seed=4, offload=offload, compute_dtype="bf16",
                                          storage_dtype="fp32", stream_granularity=granularity))
        assert engine.evaluate(batch).loss == pytest.approx(want, rel=2e-3)
        before = {n: p.detach().clone() for n, p in engine.params.items()}
        for s in range(3):
            assert all(torch.isfinite(torch.tensor(engine.step(padded_batch(seed=s)).losses)))
        engine.flush()
        assert all(p.dtype == torch.float32 and not torch.equal(p.cpu(), before[n]) for n, p in engine.params.items())
        runs.append(model)
    assert_same_params(runs[0], runs[1])
    assert_same_params(runs[0], runs[2])


IA3_TARGETS = {"opt": (["k_proj", "v_proj", "fc2"], ["fc2"]), "llama": (["k_proj", "v_proj", "down_proj"], ["down_proj"])}


def ia3_model(family: str, dtype: torch.dtype = torch.float32):
    """A tiny model wrapped in IA3: its scaling vectors live in an ``nn.ParameterDict`` of each tuner layer (no
    forward of their own: the tuner layer reads them), set away from 1 so every path matters."""
    targets, feedforward = IA3_TARGETS[family]
    model = peft.get_peft_model(tiny_model(family, seed=0), peft.IA3Config(target_modules=targets,
                                                                          feedforward_modules=feedforward))
    torch.manual_seed(7)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "ia3_l" in name:
                p.uniform_(0.5, 1.5)
    return model.to(dtype)


@pytest.mark.parametrize("family", ["opt", "llama"])
def test_ia3_scaling_vectors_get_each_points_values(family):
    """A point's loss is peft's own forward with the scaling vectors at θ ± εz (float64): the vectors, held in a
    ParameterDict and read by the tuner layer's forward, are formed around that forward's call."""
    from torch.func import functional_call

    model = ia3_model(family, torch.float64).eval()
    batch = padded_batch(seed=2)
    theta = {n: p.detach().clone() for n, p in model.named_parameters()}
    engine = ZOEngine(clone_model(model), ZOConfig(lr=0.0, eps=1e-2, seed=5))
    assert engine.params and all("ia3_l" in n for n in engine.params)
    r = engine.step(batch)
    z = engine.perturbation(0)
    for sign, got in ((1, r.losses[0]), (-1, r.losses[1])):
        point = {n: t + sign * 1e-2 * z[n].double() if n in z else t for n, t in theta.items()}
        logits = functional_call(model, point, (), {"input_ids": batch["input_ids"],
                                                    "attention_mask": batch["attention_mask"]}).logits[:, :-1]
        want = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.size(-1)), batch["labels"][:, 1:].reshape(-1),
                                                 ignore_index=-100).item()
        assert got == pytest.approx(want, rel=1e-12)
    assert r.losses[0] != r.losses[1]


def test_ia3_trains_only_its_vectors_and_every_mode_agrees_bit_for_bit():
    runs = []
    for offload, granularity in ((False, "block"), (True, "block"), (True, "matrix")):
        model = ia3_model("opt")
        before = frozen_state(model)
        vectors = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
        run(model, offload=offload, stream_granularity=granularity)
        for name, p in model.named_parameters():
            assert torch.equal(p, before[name]) if name in before else not torch.equal(p, vectors[name]), name
        runs.append(model)
    assert_same_params(runs[0], runs[1])
    assert_same_params(runs[0], runs[2])


def test_a_parameter_read_without_its_modules_call_is_refused_not_left_untrained(monkeypatch):
    """A LoRA layer patched to read lora_A's weight directly (F.linear) instead of calling lora_A: the weight would
    stay at θ at every point; the first step says which parameter and why."""
    model = lora_model("opt")
    layer = model.get_base_model().model.decoder.layers[0].self_attn.q_proj

    def forward(x, *args, **kwargs):
        a, b = layer.lora_A["default"], layer.lora_B["default"]
        return layer.base_layer(x) + b(torch.nn.functional.linear(x, a.weight)) * layer.scaling["default"]

    monkeypatch.setattr(layer, "forward", forward)
    engine = ZOEngine(model, ZOConfig(lr=1e-2, eps=1e-3, seed=4))
    with pytest.raises(ModelError, match="lora_A.default.weight.*never train"):
        engine.step(padded_batch())


def test_streamed_blocks_read_their_base_weights_from_the_upload_never_from_pageable_memory():
    model = lora_model("opt")
    engine = ZOEngine(model, ZOConfig(lr=1e-2, offload=True))
    streamer, frozen = engine.streamer, engine.streamer.frozen
    layer = model.get_base_model().model.decoder.layers[1].self_attn.q_proj.base_layer
    weight = layer.weight

    def spans(tensors):
        return [(t.data_ptr(), t.data_ptr() + t.numel() * t.element_size()) for t in tensors]

    def inside(ptr, ranges):
        return any(lo <= ptr < hi for lo, hi in ranges)

    # at rest the base weights are views of the frozen store (pinned where CUDA exists), not separate tensors
    assert inside(weight.data_ptr(), spans(frozen.buffers))
    seen = []
    handle = layer.register_forward_pre_hook(lambda m, args: seen.append(m.weight.data_ptr()))
    try:
        engine.step(padded_batch())
        r = engine.step(padded_batch(seed=1))  # the first step applies no update: nothing to write back
    finally:
        handle.remove()
    assert seen and all(inside(ptr, spans(streamer.frozen_slots)) for ptr in seen)  # the device copy
    assert layer._parameters["weight"] is weight  # restored after the forward
    # a step uploads the trainable and the frozen bytes of each block and writes back only the trainable ones
    assert r.bytes_h2d == engine.store.nbytes + frozen.nbytes
    assert r.bytes_d2h == engine.store.nbytes
    assert frozen.nbytes > 10 * engine.store.nbytes


def test_a_fully_trainable_model_streams_exactly_as_before():
    engine = ZOEngine(tiny_model("opt"), ZOConfig(lr=1e-3, offload=True))
    assert engine.streamer.frozen is None and engine.streamer.frozen_slots == ()
    engine.step(padded_batch())
    r = engine.step(padded_batch(seed=1))
    assert r.bytes_h2d == r.bytes_d2h == engine.store.nbytes


@pytest.mark.parametrize("method", ["prompt_tuning", "p_tuning"])
def test_prompt_tuning_trains_only_the_prompt_and_matches_peft_logits(method):
    base = tiny_model("llama" if method == "p_tuning" else "opt")
    if method == "prompt_tuning":
        config = peft.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3)
    else:
        config = peft.PromptEncoderConfig(task_type="CAUSAL_LM", num_virtual_tokens=3, encoder_hidden_size=16)
    batch = padded_batch()
    runs = []
    for offload in (False, True):
        torch.manual_seed(7)
        model = peft.get_peft_model(clone_model(base), config)
        before = frozen_state(model)
        engine = ZOEngine(model, ZOConfig(lr=1e-2, eps=1e-3, seed=2, offload=offload))
        assert all(n.startswith("prompt_encoder.") for n in engine.params)
        with torch.no_grad():
            expected = model(**batch).logits[:, config.num_virtual_tokens :]  # PEFT's own forward
        assert torch.allclose(engine.evaluate(batch).logits, expected, atol=1e-5)
        for s in range(2):
            engine.step(padded_batch(seed=s))
        engine.flush()
        assert all(torch.equal(p, before[n]) for n, p in model.named_parameters() if not p.requires_grad)
        runs.append(model)
    assert_same_params(*runs)


def prefix_model(family: str, projection: bool = False, seed: int = 0):
    """A tiny model with PEFT prefix tuning (4 virtual tokens; the MLP encoder with ``projection``)."""
    torch.manual_seed(seed + 200)
    config = peft.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4, prefix_projection=projection,
                                     encoder_hidden_size=16)
    return peft.get_peft_model(tiny_model(family, seed=seed), config)


def left_padded(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``batch`` with each row's padding moved to the left."""
    out = {k: v.clone() for k, v in batch.items()}
    for row, length in enumerate(batch["attention_mask"].sum(dim=1).tolist()):
        for key in out:
            out[key][row] = torch.roll(batch[key][row], batch[key].shape[1] - length)
    return out


@pytest.mark.parametrize("family, projection", [("opt", False), ("opt", True), ("llama", False), ("llama", True),
                                                ("gpt2", False)])
def test_prefix_tuning_logits_equal_peft_forward(family, projection):
    model = prefix_model(family, projection)
    engine = ZOEngine(model, ZOConfig())
    assert all(n.startswith("prompt_encoder.") for n in engine.params)
    assert any("transform" in n for n in engine.params) == projection  # the MLP is trained too
    right = padded_batch()
    unpadded = {"input_ids": right["input_ids"].clamp(min=3)}
    for batch in (right, left_padded(right), unpadded):
        inputs = {k: v for k, v in batch.items() if k != "labels"}
        with torch.no_grad():
            expected = model(**inputs).logits  # PEFT's own forward: past_key_values from get_prompt
        torch.testing.assert_close(engine.evaluate(batch).logits, expected, atol=1e-5, rtol=0)


def test_prefix_tuning_each_point_runs_with_its_own_prefix():
    """L(θ ± εz) of a step are PEFT's losses with the prompt encoder at θ ± εz (a shared prefix would not be)."""
    model = prefix_model("llama", projection=True)
    engine = ZOEngine(model, ZOConfig(lr=1e-2, eps=1e-2, seed=5))
    batch = padded_batch()
    theta = {n: p.detach().clone() for n, p in engine.params.items()}
    z = engine.perturbation(0)
    r = engine.step(batch)
    with torch.no_grad():
        for sign, loss in ((1, r.loss_plus), (-1, r.loss_minus)):
            for n, p in engine.params.items():
                p.copy_(theta[n] + sign * engine.config.eps * z[n])
            assert abs(model(**batch).loss.item() - loss) < 1e-5
    assert r.loss_plus != r.loss_minus


@pytest.mark.parametrize("family", ["opt", "llama"])
def test_prefix_zo_moves_only_the_prefix_and_offload_equals_resident(family):
    runs = []
    for offload in (False, True):
        model = prefix_model(family, projection=family == "llama")
        base = frozen_state(model)
        checksums = {n: t.double().sum().item() for n, t in base.items()}
        trainable0 = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
        engine = run(model, offload=offload)
        assert (engine.streamer is not None) == offload
        assert set(engine.params) == set(trainable0) and all(n.startswith("prompt_encoder.") for n in trainable0)
        for name, p in model.named_parameters():
            if p.requires_grad:
                assert not torch.equal(p, trainable0[name]), f"{name} did not move"
            else:
                assert torch.equal(p, base[name]) and p.double().sum().item() == checksums[name], name
        runs.append(model)
    assert_same_params(*runs)


def test_prefix_tuning_is_refused_for_an_adapter_without_prefix_support(monkeypatch):
    monkeypatch.setattr(OPTAdapter, "supports_prefix", False)
    with pytest.raises(ModelError, match="prefix tuning is not supported for model type 'opt'.*Supported: .*llama"):
        ZOEngine(prefix_model("opt"), ZOConfig())


def test_other_prompt_learning_methods_are_refused_with_a_reason():
    config = peft.MultitaskPromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3, num_tasks=2)
    model = peft.get_peft_model(tiny_model("opt"), config)
    with pytest.raises(ModelError, match="MULTITASK_PROMPT_TUNING is not supported.*PREFIX_TUNING"):
        ZOEngine(model, ZOConfig())


def test_saved_engine_weights_are_the_adapter_only(tmp_path):
    model = lora_model("opt")
    engine = run(model, steps=1)
    engine.save(tmp_path)
    from safetensors.torch import load_file

    saved = load_file(str(tmp_path / "weights.safetensors"))
    assert set(saved) == set(engine.params)
    assert all(torch.equal(saved[n], p) for n, p in engine.params.items())
