"""A stateful optimizer's state on the NVMe tier (zo2.offload.nvme_state): zo-adam's moments and zo-sgd-momentum's
buffer of the NVMe-homed blocks live in files beside their weights and stream with them; runs equal the host tier
and all-resident runs bit for bit (weights and state), snapshots read the state from the files and a resume
writes it back, and what the tier cannot serve yet is refused before any file is made. CPU only: the "device" is
the CPU and the files live in a temporary folder."""

from __future__ import annotations

import pytest
import torch

from zo2 import ZOEngine
from zo2.config import ZOConfig
from zo2.config.offload import OffloadConfig
from zo2.offload.nvme import PAGE, round_up
from zo2.offload.nvme_state import STATE_STEM
from zo2.offload.state import STEP_KEY
from zo2.offload.store import Deferred
from zo2.offload.tiers import staging_buffers
from test_nvme_residence import CFG, assert_same_state, block_bytes, run
from zo2_testing import clone_model, padded_batch, tiny_model

LAYERS = 6
STATE = {"zo-adam": 2, "zo-sgd-momentum": 1}
"""float32 state buffers per weight element."""


def nvme_engine(model, folder, *, optimizer: str, host_blocks: int = 0, **cfg) -> ZOEngine:
    """Every block streamed, those past ``host_blocks`` homed on NVMe with their state (the host budget holds the
    staging buffers of a block with its state and ``host_blocks`` such blocks, no more)."""
    b = block_bytes(model) * (1 + STATE[optimizer])  # fp32 weights
    tiers = OffloadConfig(nvme_path=str(folder), host_memory_budget=staging_buffers(1) * round_up(b) +
                          host_blocks * b + b // 2, nvme_engine="threads", nvme_queue_depth=3, nvme_block_size=PAGE)
    return ZOEngine(model, ZOConfig(offload=True, optimizer=optimizer, **CFG, **cfg), offload_config=tiers)


@pytest.mark.parametrize("optimizer, host_blocks, granularity", [
    ("zo-adam", 0, "block"), ("zo-sgd-momentum", 2, "block"), ("zo-adam", 2, "matrix"),
    ("zo-sgd-momentum", 0, "matrix")])
def test_optimizer_state_on_nvme_matches_the_host_tier_and_resident_bit_for_bit(tmp_path, optimizer, host_blocks,
                                                                               granularity):
    """Five steps (four updates): the same losses, weights and state all-resident, in pinned host memory and with
    the blocks past the host budget on NVMe, their state in files of its own, read and written every update (one
    matrix at a time: a piece's state with the piece, a block's files once all its pieces hold the update); the
    state's files go when the engine closes, the weights' stay."""
    base = tiny_model("opt", seed=3, num_hidden_layers=LAYERS)
    cfg = dict(optimizer=optimizer)
    resident = ZOEngine(clone_model(base), ZOConfig(offload=False, **CFG, **cfg))
    host = ZOEngine(clone_model(base), ZOConfig(offload=True, **CFG, **cfg))
    on_disk = nvme_engine(clone_model(base), tmp_path, host_blocks=host_blocks, optimizer=optimizer,
                          stream_granularity=granularity)
    nvme = list(range(host_blocks, LAYERS))
    assert on_disk.plan.nvme == nvme
    names = on_disk.optimizer.state_names
    assert sorted(p.name for p in tmp_path.glob(f"{STATE_STEM}*.a")) == sorted(
        f"{STATE_STEM}{s}-{k}.a" for s in names for k in range(len(nvme)))
    written = []
    for s in range(5):
        batch = padded_batch(seed=s)
        losses = {resident.step(batch).loss, host.step(batch).loss, on_disk.step(batch).loss}
        assert len(losses) == 1, (s, losses)
        written.append(on_disk.last_transfer.bytes_disk_written)
    state = resident.trainable_state()
    assert any(k.startswith("optimizer/") for k in state) and int(state[STEP_KEY]) == 5  # the flush applies the fifth
    assert_same_state(state, host.trainable_state())
    assert_same_state(state, on_disk.trainable_state())
    weights, states = on_disk.residences[-1].store, on_disk.opt_state.nvme.stores
    assert len(states) == STATE[optimizer] and all(  # float32 buffers of every element
        s.data_bytes(k) == weights.data_bytes(k) for s in states.values() for k in range(len(nvme)))
    files = sum(s.file_bytes(k) for s in [weights, *states.values()] for k in range(len(nvme)))
    assert written == [0] + [files] * 4  # every update writes the weights' files and the state's
    on_disk.close()
    assert not list(tmp_path.glob(f"{STATE_STEM}*")) and list(tmp_path.glob("unit-*"))


@pytest.mark.parametrize("granularity", ["block", "matrix"])
def test_snapshots_read_the_state_from_the_files_and_a_resume_writes_it_back(tmp_path, monkeypatch, granularity):
    """A snapshot holds the NVMe-homed blocks' weights and Adam's moments as deferred reads of their files (each
    file read once, one block in host memory at a time); a fresh engine that ran other steps resumes from it
    (lazily) and ends where the uninterrupted run and the all-resident run end."""
    from zo2.offload.nvme import NvmeStore
    from zo2.train.checkpoint import latest_good_snapshot, save_snapshot

    base = tiny_model("llama", seed=7, num_hidden_layers=LAYERS)
    straight = nvme_engine(clone_model(base), tmp_path / "a", optimizer="zo-adam", stream_granularity=granularity)
    run(straight, 3)
    tensors = straight.snapshot_tensors()
    state = [k for k in tensors if k.startswith("optimizer/") and ".layers." in k]
    assert state and all(isinstance(tensors[k], Deferred) for k in state)  # every block's state is on NVMe
    assert not any(isinstance(v, Deferred) for k, v in tensors.items() if ".layers." not in k)  # the rest: views
    reads, original = [], NvmeStore.read
    monkeypatch.setattr(NvmeStore, "read", lambda self, k, out: reads.append((self.names[k], k)) or
                        original(self, k, out))
    save_snapshot(tmp_path / "run", 3, tensors, {"data": 3})
    assert sorted(reads) == sorted({*reads}) and len(reads) == 3 * LAYERS  # each file once: weights, two moments
    monkeypatch.undo()
    snapshot = straight.trainable_state()
    run(straight, 3, first=3)
    final = straight.trainable_state()

    resumed = nvme_engine(clone_model(base), tmp_path / "b", optimizer="zo-adam", stream_granularity=granularity)
    run(resumed, 2, first=50)  # other weights and another state: all overwritten by the snapshot
    snap = latest_good_snapshot(tmp_path / "run")
    resumed.load_trainable_state(snap.tensors)
    resumed.load_state_dict({"step": 3})
    assert_same_state(snapshot, resumed.trainable_state())
    run(resumed, 3, first=3)
    assert_same_state(final, resumed.trainable_state())
    reference = ZOEngine(clone_model(base), ZOConfig(offload=False, optimizer="zo-adam", **CFG))
    run(reference, 6)
    assert_same_state(final, reference.trainable_state())


def test_a_snapshot_before_any_update_holds_zero_state_and_the_fresh_files_are_not_written(tmp_path):
    """A run starts from zero state without writing it: a second engine over the folder a first one left (its state
    files removed at close, the weights' kept) starts from zero again."""
    base = tiny_model("opt", seed=2, num_hidden_layers=LAYERS)
    first = nvme_engine(clone_model(base), tmp_path, optimizer="zo-sgd-momentum")
    run(first, 3)
    first.close()
    again = nvme_engine(clone_model(base), tmp_path, optimizer="zo-sgd-momentum")
    assert not list(tmp_path.glob(f"{STATE_STEM}*.json"))  # nothing written: every block reads as zeros
    state = {k: v for k, v in again.trainable_state().items() if k.startswith("optimizer/") and k != STEP_KEY}
    assert state and all(not v.any() for v in state.values())


@pytest.mark.parametrize("method, granularity", [("lora", "matrix"), ("prompt", "block")])
def test_peft_with_adam_on_nvme_trains_as_resident(tmp_path, method, granularity):
    """LoRA's adapters on NVMe keep their moments beside them (their base weights in files of their own); prompt
    tuning's NVMe-homed blocks have no trainable weight and no state there. Bit for bit as resident."""
    pytest.importorskip("peft", reason="peft is not installed (pip install -e '.[test]')")
    from test_nvme_frozen import adapters, lora, tiered, whole_frozen

    base = tiny_model("opt", seed=3, num_hidden_layers=8)
    make = (lambda: lora(clone_model(base))) if method == "lora" else (lambda: whole_frozen(clone_model(base), method))
    resident = ZOEngine(make(), ZOConfig(offload=False, optimizer="zo-adam", **CFG))
    on_disk = tiered(make(), tmp_path, host_blocks=2, stream_granularity=granularity, optimizer="zo-adam")
    assert on_disk.plan.nvme and (on_disk.opt_state.nvme is not None) == (method == "lora")
    for s in range(4):
        batch = padded_batch(seed=s)
        assert resident.step(batch).losses == on_disk.step(batch).losses, s
    a, b = resident.trainable_state(), on_disk.trainable_state()
    assert int(a[STEP_KEY]) == 4 and a.keys() == b.keys() and all(torch.equal(a[n], b[n]) for n in a)
    assert adapters(on_disk)
    on_disk.close()
    assert not list(tmp_path.glob(f"{STATE_STEM}*")) and not list(tmp_path.glob("frozen-*"))


def test_zo2_train_with_adam_on_nvme_saves_and_resumes_the_same_run(tmp_path):
    """zo2 train with zo-adam and every block on NVMe: snapshots (weights and moments read from the files) and
    final/ equal the run in host memory; a resume from step 3 (the moments written back into the files) too."""
    from safetensors.torch import load_file

    from zo2_launcher.cli import main
    from zo2.config import load_config
    from zo2.train.checkpoint import load_snapshot, snapshot_path
    from zo2.train.trainer import train_job

    common = ["optim.optimizer=zo-adam", "train.steps=6", "optim.offload=true", "checkpoint.save_every=3",
              "train.device=cpu", "train.eval_batches=0"]
    nvme = [f"offload.nvme_path={tmp_path / 'files'}", "offload.host_memory_budget=1900000"]
    train_job(load_config("tiny-opt", overrides=common + [f"run.out_dir={tmp_path / 'host'}"]), quiet=True)
    train_job(load_config("tiny-opt", overrides=common + nvme + [f"run.out_dir={tmp_path / 'nvme'}",
                                                                 "train.steps=3"]), quiet=True)
    assert len(list((tmp_path / "files").glob("unit-*.json"))) == 4  # every block lived on NVMe
    assert not list((tmp_path / "files").glob(f"{STATE_STEM}*"))  # the state's files, removed at the end
    assert main(["train", "--resume", str(tmp_path / "nvme"), "--set", "train.steps=6", "--quiet"]) == 0
    for step in (3, 6):
        (a, _), (b, _) = (load_snapshot(snapshot_path(tmp_path / n, step)) for n in ("host", "nvme"))
        assert any(k.startswith("optimizer/") for k in a)
        assert_same_state(a, b)
    a = load_file(str(tmp_path / "host" / "final" / "model.safetensors"))
    b = load_file(str(tmp_path / "nvme" / "final" / "model.safetensors"))
    assert_same_state(a, b)


@pytest.mark.slow
def test_host_memory_stays_under_the_budget_with_adams_state_larger_than_it(tmp_path):
    """48 fp32 blocks of ~12.6 MB with zo-adam (their moments twice that: 1.2 GB), a host budget of 5 blocks with
    their state: building, filling, two steps and a snapshot never hold the moments (a copy of them would pass the
    bound by 40 % and more; the snapshot used to make one, and grew 1.6 GB). The weights' bound is test_nvme_residence's."""
    from transformers import AutoConfig

    from test_snapshot_stream import peak_growth
    from zo2.offload.loading import empty_model, init_random
    from zo2.train.checkpoint import save_snapshot

    config = AutoConfig.for_model("opt", vocab_size=128, hidden_size=512, num_hidden_layers=48, ffn_dim=2048,
                                  num_attention_heads=8, max_position_embeddings=64, word_embed_proj_dim=512,
                                  pad_token_id=0)
    block = (4 * 512 * 512 + 2 * 512 * 2048 + 10 * 512) * 4 * 3  # a block's weights and moments, roughly
    warm = nvme_engine(tiny_model("opt", seed=1, num_hidden_layers=LAYERS), tmp_path / "warm-up", optimizer="zo-adam")
    run(warm, 2)  # torch's CPU runtime, the I/O threads: allocated once, before the baseline
    warm.close()
    del warm
    tiers = OffloadConfig(nvme_path=str(tmp_path / "nvme"), host_memory_budget=5 * block, nvme_engine="threads")
    grown: list[int] = []
    with peak_growth(grown):
        engine = ZOEngine(empty_model(config, dtype=torch.float32),
                          ZOConfig(offload=True, device="cpu", optimizer="zo-adam", **CFG), offload_config=tiers)
        init_random(engine, seed=1)
        for s in range(2):
            engine.step(padded_batch(seed=s, batch=2, length=8))
        save_snapshot(tmp_path / "run", 2, engine.snapshot_tensors(), {"data": 2})
    assert len(engine.plan.nvme) >= 46
    p = engine.plan
    # on a CPU the device's slots and working reserve are host memory too; the snapshot holds one block's buffer of
    # each moment and a bounce buffer per file store; and the I/O threads' allocator arenas vary by ±60 MB
    bound = p.host_budget + p.slot_bytes + p.reserve_bytes + p.fixed_bytes + 2 * block + (192 << 20)
    assert bound < 0.7 * 48 * block * 2 / 3, "a copy of the moments must pass what the test allows by far"
    assert grown[0] < bound, f"grew anonymous memory by {grown[0] / 1e6:.0f} MB; the bound is {bound / 1e6:.0f} MB"
    engine.close()
