"""Meta-device model building and streaming safetensors shards into the store."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file, save_file

from zo2 import ZOConfig, ZOEngine
from zo2.errors import ModelError
from zo2.offload.loading import checkpoint_files, empty_model, init_random, load_safetensors
from zo2_testing import assert_same_params, clone_model, padded_batch, tiny_model


@pytest.fixture(params=["opt", "llama"])
def saved(request, tmp_path):
    model = tiny_model(request.param, seed=9)
    model.save_pretrained(tmp_path, max_shard_size="40KB")  # several shards
    return model, tmp_path


def test_empty_model_holds_no_parameter_memory():
    model = empty_model(tiny_model("llama").config, torch.float32)
    assert all(p.is_meta for p in model.parameters())
    assert not any(b.is_meta for b in model.buffers())  # rotary frequencies stay real


def test_shards_stream_into_the_store_and_train_like_the_materialized_model(saved):
    reference, folder = saved
    assert len(checkpoint_files(folder)) > 1
    cfg = ZOConfig(lr=1e-2, seed=4, offload=True, device="cpu")
    engine = ZOEngine(empty_model(reference.config, torch.float32), cfg)
    load_safetensors(engine, folder)
    assert_same_params(reference, engine.model)
    ref_engine = ZOEngine(clone_model(reference), ZOConfig(lr=1e-2, seed=4, offload=False))
    for s in range(3):
        assert engine.step(padded_batch(seed=s)).losses == ref_engine.step(padded_batch(seed=s)).losses
    engine.flush(), ref_engine.flush()
    assert_same_params(ref_engine.model, engine.model)


def test_missing_or_mismatched_tensors_are_named(saved, tmp_path):
    reference, folder = saved
    shards = checkpoint_files(folder)
    tensors = load_file(str(shards[0]))
    victim = next(iter(tensors))
    bad = tmp_path / "bad"
    bad.mkdir()
    save_file({k: v for k, v in tensors.items() if k != victim}, str(bad / "model.safetensors"))
    engine = ZOEngine(empty_model(reference.config, torch.float32), ZOConfig(offload=True, device="cpu"))
    with pytest.raises(ModelError, match="lacks"):
        load_safetensors(engine, bad)
    save_file({victim: torch.zeros(3, 3)}, str(bad / "model.safetensors"))
    with pytest.raises(ModelError, match=f"tensor {victim} has shape"):
        load_safetensors(engine, bad)
    with pytest.raises(ModelError, match="No \\*.safetensors files"):
        load_safetensors(engine, tmp_path / "nowhere")


def test_random_init_is_deterministic_and_finite():
    config = tiny_model("opt").config
    engines = [ZOEngine(empty_model(config, torch.float32), ZOConfig(offload=True, device="cpu")) for _ in range(2)]
    for e in engines:
        init_random(e, seed=3)
    assert_same_params(engines[0].model, engines[1].model)
    assert all(torch.isfinite(p).all() for p in engines[0].model.parameters())
    assert engines[0].step(padded_batch()).loss < 10


# ------------------------------------------------------------------ PEFT over a base built on the meta device
@pytest.mark.parametrize("method", ["lora", "prompt", "prefix"])
@pytest.mark.parametrize("offload, granularity", [(False, "block"), (True, "block"), (True, "matrix")])
def test_peft_over_a_meta_base_loads_its_frozen_weights_from_the_shards_and_trains_like_the_model_in_memory(
        saved, offload, granularity, method):
    """model.stream_load with [peft]: the base is built on the meta device, peft wraps it with the same seeded
    adapter as over the base in memory, the shards fill the frozen base weights (their frozen store when streamed,
    the device otherwise) and leave the adapter alone; the steps equal the in-memory run's."""
    pytest.importorskip("peft", reason="peft is not installed (pip install -e '.[test]' or '.[peft]')")
    from zo2.config.peft import PeftConfig
    from zo2.models.peft_adapter import apply_peft

    reference, folder = saved
    family = "opt" if reference.config.model_type == "opt" else "llama"
    lora = PeftConfig(method=method, r=4, num_virtual_tokens=4)
    cfg = dict(lr=1e-2, eps=1e-3, seed=4, offload=offload, stream_granularity=granularity, device="cpu")
    in_memory = ZOEngine(apply_peft(clone_model(reference), lora, family, seed=11), ZOConfig(**cfg))
    base = empty_model(reference.config, torch.float32)
    streamed = ZOEngine(apply_peft(base, lora, family, seed=11), ZOConfig(**cfg))
    assert not any(p.is_meta for p in streamed.model.parameters() if p.requires_grad)
    adapters = {n: p.detach().clone() for n, p in streamed.model.named_parameters() if p.requires_grad}
    load_safetensors(streamed, folder)
    assert_same_params(in_memory.model, streamed.model)  # base weights loaded, adapters as peft made them
    assert all(torch.equal(p, adapters[n]) for n, p in streamed.model.named_parameters() if p.requires_grad)
    for s in range(3):
        assert streamed.step(padded_batch(seed=s)).losses == in_memory.step(padded_batch(seed=s)).losses
    streamed.flush(), in_memory.flush()
    assert_same_params(in_memory.model, streamed.model)

