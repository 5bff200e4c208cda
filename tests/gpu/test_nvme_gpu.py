"""The NVMe tier on CUDA: pinned staging buffers, async uploads and write-backs ordered by events, reads and writes on
the I/O thread — bit-identical to the host tier and to all-resident, with a lagging write-back too."""

from __future__ import annotations

import pytest
import torch

from zo2 import ZOConfig, ZOEngine
from zo2.config.offload import OffloadConfig
from zo2.offload.nvme import round_up
from zo2.offload.tiers import staging_buffers
from zo2_testing import clone_model, gpu_test, padded_batch, tiny_model

pytestmark = [pytest.mark.gpu, gpu_test]

CFG = dict(lr=1e-2, eps=1e-3, weight_decay=0.01, seed=21, device="cuda")


def _engine(model, tiers=None, **cfg):
    return ZOEngine(model, ZOConfig(**CFG, **cfg), offload_config=tiers)


def _same_steps(resident: ZOEngine, other: ZOEngine, steps: int) -> None:
    """The same losses at every step and the same trainable state after them, bit for bit."""
    for s in range(steps):
        batch = padded_batch(seed=s)
        assert resident.step(batch).losses == other.step(batch).losses, s
    states = [e.trainable_state() for e in (resident, other)]
    for name, value in states[0].items():
        assert torch.equal(value.cpu(), states[1][name].cpu()), name


@pytest.mark.parametrize("k", [1, 3])
@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_nvme_tier_equals_host_tier_and_resident_on_cuda(tmp_path, k, dtype):
    base = tiny_model("llama", seed=7, num_hidden_layers=8)
    cfg = dict(writeback_every=k, storage_dtype=dtype, compute_dtype=dtype)
    resident = _engine(clone_model(base), offload=False, **cfg)
    host = _engine(clone_model(base), offload=True, **cfg)
    block = max(host.plan.block_bytes)
    tiers = OffloadConfig(nvme_path=str(tmp_path), host_memory_budget=staging_buffers(1) * round_up(block) + 2 * block,
                          nvme_engine="auto")
    nvme = _engine(clone_model(base), tiers, offload=True, **cfg)
    assert nvme.plan.host == [0, 1] and nvme.plan.nvme == list(range(2, 8))
    assert nvme.residences[-1].streamer.staging[0].is_pinned()
    for s in range(7):
        batch = padded_batch(seed=s)
        losses = [e.step(batch).losses for e in (resident, host, nvme)]
        assert losses[0] == losses[1] == losses[2], (s, losses)
    states = [e.trainable_state() for e in (resident, host, nvme)]
    for name, value in states[0].items():
        assert torch.equal(value.cpu(), states[1][name].cpu()) and torch.equal(value.cpu(), states[2][name].cpu()), name


@pytest.mark.parametrize("k", [1, 3])
def test_one_matrix_at_a_time_from_nvme_equals_resident_on_cuda(tmp_path, k):
    """A unit's file read into a pinned staging buffer, its matrices uploaded from there into the ring (the H2D
    stream), written back into it (the D2H stream) and the file written after those copies landed; the host-homed
    blocks' pieces share that ring (an upload of either tier waits for the other's events where it overwrites)."""
    base = tiny_model("llama", seed=7, num_hidden_layers=8)
    cfg = dict(writeback_every=k, storage_dtype="bf16", compute_dtype="bf16")
    resident = _engine(clone_model(base), offload=False, **cfg)
    host = _engine(clone_model(base), offload=True, **cfg)
    block = max(host.plan.block_bytes)
    tiers = OffloadConfig(nvme_path=str(tmp_path), host_memory_budget=staging_buffers(1) * round_up(block) + 2 * block,
                          nvme_engine="auto")
    nvme = _engine(clone_model(base), tiers, offload=True, stream_granularity="matrix", **cfg)
    assert nvme.plan.host == [0, 1] and nvme.plan.nvme == list(range(2, 8))
    streamer = nvme.residences[-1].streamer
    assert streamer.staging[0].is_pinned() and streamer.ring is nvme.streamer.ring
    assert nvme.streamer.device_bytes == nvme.plan.slot_bytes < block
    _same_steps(resident, nvme, 7)


@pytest.mark.parametrize("granularity", ["block", "matrix"])
@pytest.mark.parametrize("method", ["lora", "prompt"])
def test_a_peft_base_on_nvme_equals_resident_on_cuda(tmp_path, method, granularity):
    """The NVMe-homed blocks' base weights read into pinned staging buffers and uploaded on the H2D stream (a buffer
    read into again only after the H2D events of the uploads out of it), with the block or a reader at a time;
    prompt-tuned (whole-frozen) blocks stream with the host-homed ones, their weights read through
    zo2.offload.nvme_frozen.TieredFrozen."""
    pytest.importorskip("peft", reason="peft is not installed")
    from zo2.config.peft import PeftConfig
    from zo2.models.peft_adapter import apply_peft

    base = tiny_model("llama", seed=7, num_hidden_layers=8).to(torch.bfloat16)
    peft = PeftConfig(method="lora", r=4) if method == "lora" else PeftConfig(method=method, num_virtual_tokens=4)
    cfg = dict(storage_dtype="bf16", compute_dtype="bf16")
    resident = _engine(apply_peft(clone_model(base), peft, "llama", seed=3), offload=False, **cfg)
    host = _engine(apply_peft(clone_model(base), peft, "llama", seed=3), offload=True, **cfg)
    block = max(host.plan.block_bytes)
    tiers = OffloadConfig(nvme_path=str(tmp_path), host_memory_budget=staging_buffers(1) * round_up(block) + 2 * block,
                          nvme_engine="auto")
    nvme = _engine(apply_peft(clone_model(base), peft, "llama", seed=3), tiers, offload=True,
                   stream_granularity=granularity, **cfg)
    assert nvme.plan.nvme == list(range(2, 8))
    files = next(r.frozen_files for r in nvme.residences if getattr(r, "frozen_files", None) is not None)
    assert files.staging[0].is_pinned()
    _same_steps(resident, nvme, 6)
    assert files.bytes_read >= 6 * files.nbytes


@pytest.mark.parametrize("optimizer, granularity", [("zo-adam", "block"), ("zo-sgd-momentum", "block"),
                                                    ("zo-adam", "matrix")])
def test_optimizer_state_on_nvme_equals_resident_on_cuda(tmp_path, optimizer, granularity):
    """zo-adam's moments and zo-sgd-momentum's buffer of the NVMe-homed blocks read into pinned staging buffers,
    uploaded and written back on the H2D and D2H streams in lockstep with the weights, by block or a piece at a
    time (zo2.offload.nvme_state)."""
    base = tiny_model("llama", seed=7, num_hidden_layers=8)
    resident = _engine(clone_model(base), offload=False, optimizer=optimizer)
    host = _engine(clone_model(base), offload=True, optimizer=optimizer)
    block = max(host.plan.block_bytes)  # weights and state
    tiers = OffloadConfig(nvme_path=str(tmp_path), host_memory_budget=staging_buffers(1) * round_up(block) + 2 * block,
                          nvme_engine="auto")
    nvme = _engine(clone_model(base), tiers, offload=True, optimizer=optimizer, stream_granularity=granularity)
    assert nvme.plan.nvme == list(range(2, 8))
    assert all(s.staging[0].is_pinned() for s in nvme.opt_state.nvme.streamers.values())
    _same_steps(resident, nvme, 6)
    nvme.close()
    assert not list(tmp_path.glob("state-*"))
