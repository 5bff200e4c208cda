"""Snapshots written and read one tensor at a time (zo2.train.durable, zo2.train.checkpoint,
``ZOEngine.snapshot_tensors``): deferred tensors, the header written after the data, an abandoned snapshot, and a
model larger than its host budget (the NVMe tier) saved and resumed without holding it in memory."""

from __future__ import annotations

import contextlib
import json
import threading
import time
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from zo2 import ZOEngine
from zo2.config import ZOConfig
from zo2.config.offload import OffloadConfig
from zo2.errors import NonFiniteLossError
from zo2.offload.nvme import NvmeStore, round_up
from zo2.offload.store import Deferred
from zo2.offload.tiers import staging_buffers
from zo2.train.checkpoint import (latest_good_snapshot, list_snapshots, load_snapshot,
                                  save_snapshot)
from zo2.train.durable import SnapshotTensors, tensor_crc, write_safetensors
from zo2.train.run_dir import check_finite_weights
from zo2_testing import clone_model, padded_batch, tiny_model

CFG = dict(lr=1e-2, eps=1e-3, weight_decay=0.01, seed=21)


def _tensors() -> dict:
    g = torch.Generator().manual_seed(0)
    late = torch.randn(5, 7, generator=g)
    return {"b.weight": torch.randn(3, 4, generator=g).to(torch.bfloat16), "a.mask": torch.rand(6, generator=g) > .5,
            "c.empty": torch.zeros(0, 3), "d.late": Deferred((5, 7), torch.float32, lambda: late),
            "e.view": torch.arange(20, dtype=torch.int64)[::2]}


def test_deferred_tensors_and_a_header_written_after_the_data(tmp_path):
    """The file is safetensors (its own reader loads it), the late header holds the CRCs of what was written,
    and each Deferred tensor is loaded exactly once."""
    tensors = _tensors()
    loads = []
    late = tensors["d.late"]
    tensors["d.late"] = Deferred(late.shape, late.dtype, lambda: loads.append(1) or late.load())
    crcs = write_safetensors(tmp_path / "f.safetensors", tensors, lambda c: {"crcs": json.dumps(c)})
    assert loads == [1]
    back = load_file(str(tmp_path / "f.safetensors"))
    for name, t in tensors.items():
        want = t.load() if isinstance(t, Deferred) else t
        assert back[name].dtype == want.dtype and torch.equal(back[name], want.contiguous()), name
        assert crcs[name] == tensor_crc(want)
    with safe_open(str(tmp_path / "f.safetensors"), framework="pt") as f:
        assert json.loads(f.metadata()["crcs"]) == crcs
    size = int.from_bytes((tmp_path / "f.safetensors").read_bytes()[:8], "little")
    assert size % 8 == 0


def test_an_abandoned_snapshot_leaves_the_previous_ones(tmp_path):
    good = {"w": torch.ones(4)}
    save_snapshot(tmp_path, 1, good, {"data": 0})
    bad = {"a": torch.ones(3), "w": torch.tensor([1.0, float("nan")])}
    with pytest.raises(NonFiniteLossError, match="NaN"):
        save_snapshot(tmp_path, 2, bad, {"data": 0}, check=lambda n, t: check_finite_weights({n: t}, 2))
    assert [p.name for p in list_snapshots(tmp_path)] == ["step_00000001.safetensors"]
    assert list(Path(tmp_path, "snapshots").iterdir()) == list_snapshots(tmp_path)  # no temporary file left
    tensors, meta = load_snapshot(list_snapshots(tmp_path)[0])
    assert torch.equal(tensors["w"], good["w"]) and meta["step"] == 1


def test_a_lazy_snapshot_reads_shapes_without_data_and_checks_every_tensor(tmp_path):
    tensors = {"x": torch.randn(3, 2), "y": torch.randn(4)}
    path = save_snapshot(tmp_path, 5, tensors, {"data": 1})
    lazy, meta = load_snapshot(path, lazy=True)
    assert isinstance(lazy, SnapshotTensors) and meta["step"] == 5
    assert lazy.shape_of("x") == (3, 2) and sorted(lazy) == ["x", "y"] and len(lazy) == 2
    assert torch.equal(lazy["y"], tensors["y"])
    with pytest.raises(KeyError):
        lazy["z"]
    raw = bytearray(path.read_bytes())
    raw[-1] ^= 0xFF  # the last byte of y
    path.write_bytes(bytes(raw))
    with pytest.warns(Warning, match="fails its checksum"):
        assert latest_good_snapshot(tmp_path) is None


def _nvme_engine(model, folder: Path, host_blocks: int = 0) -> ZOEngine:
    layers = model.model.decoder.layers
    block = max(sum(p.numel() * p.element_size() for p in layer.parameters()) for layer in layers)
    tiers = OffloadConfig(nvme_path=str(folder), host_memory_budget=staging_buffers(1) * round_up(block)
                          + host_blocks * block + block // 2, nvme_engine="threads")
    return ZOEngine(model, ZOConfig(offload=True, device="cpu", **CFG), offload_config=tiers)


def test_an_nvme_snapshot_reads_each_unit_once_and_resumes_bit_for_bit(tmp_path, monkeypatch):
    base = tiny_model("opt", seed=3, num_hidden_layers=5)
    straight = _nvme_engine(clone_model(base), tmp_path / "a", host_blocks=1)
    units = len(straight.plan.nvme)
    assert units >= 3
    for s in range(3):
        straight.step(padded_batch(seed=s))
    reads = []
    original = NvmeStore.read
    monkeypatch.setattr(NvmeStore, "read", lambda self, k, out: reads.append(k) or original(self, k, out))
    tensors = straight.snapshot_tensors()  # flushes: the pending update's visits read units too
    reads.clear()
    save_snapshot(tmp_path / "run", 3, tensors, {"data": 3})
    assert sorted(reads) == list(range(units))  # one read per NVMe unit, whatever the number of its tensors
    monkeypatch.setattr(NvmeStore, "read", original)
    state = straight.trainable_state()
    for s in range(3, 5):
        straight.step(padded_batch(seed=s))

    resumed = _nvme_engine(clone_model(base), tmp_path / "b", host_blocks=1)
    snap = latest_good_snapshot(tmp_path / "run")
    assert isinstance(snap.tensors, SnapshotTensors) and snap.step == 3
    resumed.load_trainable_state(snap.tensors)
    resumed.load_state_dict({"step": 3})
    got = resumed.trainable_state()
    assert all(torch.equal(got[n], state[n]) for n in state)
    for s in range(3, 5):
        resumed.step(padded_batch(seed=s))
    final, again = straight.trainable_state(), resumed.trainable_state()
    assert all(torch.equal(final[n], again[n]) for n in final)


def _anon_rss() -> int:
    """Anonymous resident memory (heap and anonymous maps): what the process holds, not the file pages a read
    through mmap maps in (the kernel drops those at will)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("RssAnon:"):
            return int(line.split()[1]) * 1024
    pytest.skip("no RssAnon in /proc/self/status")


@contextlib.contextmanager
def peak_growth(out: list):
    """Samples anonymous resident memory every millisecond while the block runs; appends its peak growth."""
    before, peak, done = _anon_rss(), [0], threading.Event()

    def sample():
        while not done.is_set():
            peak[0] = max(peak[0], _anon_rss() - before)
            time.sleep(0.001)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    try:
        yield
    finally:
        done.set()
        thread.join()
        out.append(max(peak[0], _anon_rss() - before))


def test_a_model_larger_than_its_host_budget_is_saved_and_resumed_in_bounded_memory(tmp_path):
    """24 fp32 blocks of ~12 MB, a host budget of 5: a snapshot and its lazy resume never hold the model (a copy of
    every weight would exceed the bound by more than half)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from zo2.offload.loading import empty_model, init_random
    from zo2.train.run_dir import save_model

    config = AutoConfig.for_model("opt", vocab_size=128, hidden_size=512, num_hidden_layers=24, ffn_dim=2048,
                                  num_attention_heads=8, max_position_embeddings=64, word_embed_proj_dim=512,
                                  pad_token_id=0)
    block = (4 * 512 * 512 + 2 * 512 * 2048) * 4
    model_bytes = 24 * block
    tiers = OffloadConfig(nvme_path=str(tmp_path / "nvme"), host_memory_budget=5 * block, nvme_engine="threads")
    engine = ZOEngine(empty_model(config, dtype=torch.float32), ZOConfig(offload=True, device="cpu", **CFG),
                      offload_config=tiers)
    assert len(engine.plan.nvme) >= 22
    init_random(engine, seed=1)
    engine.step(padded_batch(seed=0, batch=2, length=8))
    engine.flush()
    checksum = engine.checksum()
    bound = 2 * block + (48 << 20)  # the scratch unit, one tensor being written, allocator slack
    assert bound < model_bytes * 0.5
    grown: list[int] = []
    with peak_growth(grown):
        save_snapshot(tmp_path / "run", 1, engine.snapshot_tensors(), {"data": 1}, fsync=False)
    engine.step(padded_batch(seed=1, batch=2, length=8))  # other weights: the resume must bring step 1 back
    with peak_growth(grown):
        engine.load_trainable_state(latest_good_snapshot(tmp_path / "run").tensors)
    with peak_growth(grown):
        save_model(engine.model, None, tmp_path / "final", engine=engine)  # the export zo2 train writes at the end
    for what, g in zip(("saving", "resuming", "exporting"), grown):
        assert g < bound, f"{what} grew anonymous memory by {g / 1e6:.0f} MB at its peak; the bound is {bound / 1e6:.0f} MB"
    assert engine.checksum() == checksum
    exported = AutoModelForCausalLM.from_pretrained(str(tmp_path / "final"))
    state = engine.trainable_state()
    compared = [name for name, p in exported.named_parameters() if name in state]
    assert len(compared) == len(state)  # every trainable weight came back under its name
    for name, p in exported.named_parameters():
        if name in state:
            assert torch.equal(p.detach(), state[name]), name


def test_the_schedulers_nvme_units_are_read_once_each_for_a_snapshot(tmp_path, monkeypatch):
    """zo2 launch's NVMe-homed units (zo2.control.nvme_store.NodeNvme) give a snapshot deferred reads: one read
    of each unit whatever its number of tensors, and the snapshot holds what the files hold."""
    from zo2.config.offload import OffloadConfig
    from zo2.control.nvme_store import NodeNvme
    from zo2.offload.store import pack_layout

    g = torch.Generator().manual_seed(0)
    blocks = {k: [(f"layers.{k}.{n}", torch.nn.Parameter(torch.randn(shape, generator=g)))
                  for n, shape in (("a", (4, 8)), ("b", (8,)), ("c", (3, 5)))] for k in (1, 2, 4)}
    tiers = OffloadConfig(nvme_path=str(tmp_path / "nvme"), nvme_engine="threads")
    node = NodeNvme(tiers, "zo2-node-1-0123abcd", {k: pack_layout(b) for k, b in blocks.items()}, torch.float32,
                    writers=2, pad_to=64)
    node.fill(lambda views: [views[n].copy_(p.detach()) for k in blocks for n, p in blocks[k] if n in views])
    reads = []
    original = NodeNvme.read
    monkeypatch.setattr(NodeNvme, "read", lambda self, k: reads.append(k) or original(self, k))
    path = save_snapshot(tmp_path / "run", 1, node.deferred_weights(), {"data": 0})
    assert sorted(reads) == [1, 2, 4]
    saved, _ = load_snapshot(path)
    for k, params in blocks.items():
        for name, p in params:
            assert torch.equal(saved[name], p.detach()), name
    node.close()
