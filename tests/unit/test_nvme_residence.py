"""The NVMe tier as a residence (zo2.offload.tiered, zo2.offload.tiers): the planner's tier choice, bit-exactness
against the host tier and resident units, snapshots through the files, a full disk, and host memory kept under
the budget for a model larger than it. CPU only: the "device" is the CPU and the files live in a temporary
folder."""

from __future__ import annotations

import ctypes
import errno
import os
import shutil
import threading
import time
from collections import namedtuple
from pathlib import Path

import psutil
import pytest
import torch

from zo2 import ZOEngine
from zo2.config import ZOConfig
from zo2.config.offload import OffloadConfig
from zo2.errors import ConfigError, ResourceError
from zo2.offload import nvme_io
from zo2.offload.nvme import LOCK_FILE, NvmeStore
from zo2.offload.nvme_io import PAGE, ThreadPoolEngine, round_up
from zo2.offload.planner import Plan
from zo2.offload.tiered import NvmeResidence, NvmeStreamer
from zo2.offload.tiers import place_tiers, staging_buffers
from zo2_testing import clone_model, padded_batch, tiny_model

CFG = dict(lr=1e-2, eps=1e-3, weight_decay=0.01, seed=21)
LAYERS = 6


def engines():
    """The I/O engines the tier runs on: the thread pool always, DeepSpeed's AIO only where its op loads."""
    return [pytest.param("threads", id="threads"), pytest.param("aio", id="aio")]


def need_engine(name: str) -> None:
    if name == "aio":
        op, reason = nvme_io.load_aio()
        if op is None:
            pytest.skip(f"AIO engine unavailable: {reason}")


def block_bytes(model) -> int:
    """Bytes of the largest block of ``model`` (fp32: its trainable weights)."""
    layers = model.model.decoder.layers if hasattr(model.model, "decoder") else model.model.layers
    return max(sum(p.numel() * p.element_size() for p in layer.parameters()) for layer in layers)


def host_budget(model, host_blocks: int, prefetch: int = 1) -> int:
    """A host budget that holds the NVMe tier's staging buffers and ``host_blocks`` blocks, no more."""
    b = block_bytes(model)
    return staging_buffers(prefetch) * round_up(b) + host_blocks * b + b // 2


def nvme_engine(model, folder, *, host_blocks: int = 0, engine: str = "threads", **cfg) -> ZOEngine:
    tiers = OffloadConfig(nvme_path=str(folder), host_memory_budget=host_budget(model, host_blocks),
                          nvme_engine=engine, nvme_queue_depth=3, nvme_block_size=PAGE)
    return ZOEngine(model, ZOConfig(offload=cfg.pop("offload", True), **CFG, **cfg), offload_config=tiers)


def assert_same_state(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), f"{name} differs (max {(a[name] - b[name]).abs().max()})"


def run(engine: ZOEngine, steps: int, first: int = 0) -> list[float]:
    return [engine.step(padded_batch(seed=first + s)).loss for s in range(steps)]


# ------------------------------------------------------------------------------------------------ the planner
def plan(block_bytes: list[int], streamed: list[int]) -> Plan:
    resident = [i for i in range(len(block_bytes)) if i not in streamed]
    return Plan(resident, streamed, block_bytes, 100, 3 * max(block_bytes), 10, None, 1)


def test_planner_fills_host_memory_in_order_then_nvme():
    p = place_tiers(plan([8192] * 7, [1, 2, 3, 4, 5, 6]), host_budget=3 * 8192 + 2 * 8192, nvme_path="/nvme",
                    prefetch=1)
    assert p.host == [1, 2] and p.nvme == [3, 4, 5, 6] and p.staging_bytes == 3 * 8192
    assert p.bytes_per_step_disk_read == 4 * 8192 and p.bytes_per_step_h2d == 6 * 8192
    p.writeback_every = 2
    assert p.bytes_per_step_disk_written == 2 * 8192
    text = p.describe()
    assert "2 in pinned host memory" in text and "4 on NVMe in /nvme" in text and "NVMe→host" in text
    assert p.to_dict()["nvme"] == [3, 4, 5, 6] and p.to_dict()["host"] == [1, 2]


def test_planner_keeps_everything_on_the_host_when_it_fits_and_the_plan_reads_as_before():
    before = plan([8192] * 4, [2, 3])
    text = before.describe()
    after = place_tiers(plan([8192] * 4, [2, 3]), host_budget=2 * 8192, nvme_path="/nvme", prefetch=1)
    assert after.nvme == [] and after.host == [2, 3] and after.describe() == text
    assert "NVMe" not in text


def test_planner_without_nvme_path_names_the_numbers_and_the_fix():
    with pytest.raises(ResourceError) as err:
        place_tiers(plan([10**9] * 4, [1, 2, 3]), host_budget=2 * 10**9, nvme_path=None, prefetch=1)
    message = str(err.value)
    assert "3.00 GB" in message and "2.00 GB" in message and "nvme_path" in message
    with pytest.raises(ResourceError, match="staging buffers"):
        place_tiers(plan([10**9] * 4, [1, 2, 3]), host_budget=2 * 10**9, nvme_path="/nvme", prefetch=1)


def test_the_node_store_keeps_its_first_blocks_in_host_memory_and_homes_the_rest_on_nvme():
    """zo2 launch: the scheduler's placement counts the embedding, the head and every worker's staging buffers (of
    its slice of the largest block) against the host budget, then the blocks in order."""
    from zo2.control.nvme_store import place_units

    Unit = namedtuple("Unit", "kind")
    units = [Unit("embed")] + [Unit("block")] * 6 + [Unit("head")]
    sizes = [4096] + [8192] * 6 + [512]
    staging = staging_buffers(1) * 8192  # one worker: its slice is the block; two: two half-block slices

    def place(budget: int, writers: int = 1) -> list[int]:
        return place_units(units, sizes, OffloadConfig(nvme_path="/nvme", host_memory_budget=budget), 1, writers)

    assert place(4608 + staging + 2 * 8192 + 100) == [3, 4, 5, 6]
    assert place(4608 + staging + 2 * 8192 + 100, writers=2) == [3, 4, 5, 6]
    assert place(sum(sizes)) == []  # everything fits: nothing on NVMe
    with pytest.raises(ResourceError, match=r"cannot hold the node store's embedding and head \(0.00 GB\) and the "
                                            r"workers' NVMe staging buffers"):
        place(4608 + staging - 1)


def test_several_processes_per_node_need_sliced_transfers_for_nvme():
    """torchrun without sliced transfers: each process would make its own files in the one folder."""
    from types import SimpleNamespace

    from zo2.offload.tiers import place_tiers_for

    inputs = SimpleNamespace(tiers=OffloadConfig(nvme_path="/nvme"), store_spec=None,
                             comm=SimpleNamespace(local_size=2), config=SimpleNamespace(sliced_transfers=False))
    with pytest.raises(ConfigError, match="2 processes per node needs optim.sliced_transfers = true"):
        place_tiers_for(inputs, plan([8192] * 4, [1, 2, 3]), [[]] * 4, creates_store=True)


def test_engine_refuses_a_model_larger_than_the_host_budget_without_nvme(tmp_path):
    model = tiny_model("opt", seed=1, num_hidden_layers=LAYERS)
    tiers = OffloadConfig(host_memory_budget=2 * block_bytes(model))
    with pytest.raises(ResourceError, match=r"Set \[offload\] nvme_path"):
        ZOEngine(model, ZOConfig(offload=True), offload_config=tiers)


# ------------------------------------------------------------------------------------------------ the streamer
class GatedEngine(ThreadPoolEngine):
    """A thread-pool engine whose reads of one unit wait until the test opens the gate; it records every read."""

    def __init__(self, gated: str):
        super().__init__(queue_depth=2, block_size=PAGE)
        self.gated, self.seen, self.gate = gated, [], threading.Event()

    def submit_read(self, path, offset, tensor):
        self.seen.append(Path(path).name.split(".")[0])
        if self.seen[-1] == self.gated:
            assert self.gate.wait(20), "the gate was never opened"
        super().submit_read(path, offset, tensor)


def test_reads_run_ahead_and_never_hold_up_an_earlier_block(tmp_path):
    engine = GatedEngine("unit-1")
    store = NvmeStore.from_numels(tmp_path, [1000] * 4, torch.float32, engine=engine)
    values = [torch.randn(1000, generator=torch.Generator().manual_seed(k)) for k in range(4)]
    for k, v in enumerate(values):
        store.write(k, v, step=-1)
    streamer = NvmeStreamer(store, torch.device("cpu"), prefetch=1)
    streamer.begin([0, 1, 2, 3])
    assert torch.equal(streamer.acquire(0), values[0])  # returns while unit 1's read is still held at the gate
    deadline = time.monotonic() + 10
    while "unit-1" not in engine.seen and time.monotonic() < deadline:
        time.sleep(0.01)
    assert "unit-1" in engine.seen  # the next block's read was issued ahead of its visit
    streamer.release(0)
    engine.gate.set()
    flat = streamer.acquire(1)
    assert torch.equal(flat, values[1])
    reads = len(engine.seen)
    flat.add_(1.0)
    streamer.write_back(1, step=5)
    streamer.release(1)
    streamer.synchronize()
    assert store.held(1) == 5 and store.held(0) == -1  # written only when asked
    out = torch.empty(1000)
    store.read(1, out)
    assert torch.equal(out, values[1] + 1.0)
    assert len(engine.seen) >= reads  # a write-back reads nothing back
    streamer.close()


# ------------------------------------------------------------------------------------------------ bit-exactness
@pytest.mark.parametrize("engine_name", engines())
@pytest.mark.parametrize("writeback_every", [1, 3])
@pytest.mark.parametrize("family", ["opt", "llama"])
def test_nvme_tier_matches_host_tier_and_resident_bit_for_bit(tmp_path, family, writeback_every, engine_name):
    need_engine(engine_name)
    base = tiny_model(family, seed=3, num_hidden_layers=LAYERS)
    cfg = dict(writeback_every=writeback_every)
    resident = ZOEngine(clone_model(base), ZOConfig(offload=False, **CFG, **cfg))
    host = ZOEngine(clone_model(base), ZOConfig(offload=True, **CFG, **cfg))
    on_disk = nvme_engine(clone_model(base), tmp_path, engine=engine_name, **cfg)
    assert on_disk.plan.nvme == list(range(LAYERS)) and on_disk.plan.host == []
    assert any(isinstance(r, NvmeResidence) for r in on_disk.residences)
    same_three_ways(resident, host, on_disk, on_disk.residences[-1].store.file_bytes(0), writeback_every)


def same_three_ways(resident: ZOEngine, host: ZOEngine, on_disk: ZOEngine, file_bytes: int, k: int) -> None:
    """Five steps give the same losses and weights all-resident, in pinned host memory and on NVMe (whose
    parameters are never on the host); steps 1..4 apply updates 0..3: K = 1 writes every unit's file each time, K =
    3 once (update 2: home lags 3), and only K > 1 replays."""
    assert all(p.is_meta for u in on_disk.units if u.kind == "block" for n in u.owned
               for p in [on_disk.params[n]])  # no host copy of an NVMe-homed block
    written, replays = 0, 0
    for s in range(5):
        batch = padded_batch(seed=s)
        losses = {resident.step(batch).loss, host.step(batch).loss, on_disk.step(batch).loss}
        assert len(losses) == 1, losses
        written += on_disk.last_transfer.bytes_disk_written
        replays += on_disk.last_transfer.replays
    assert written == LAYERS * file_bytes * (4 if k == 1 else 1)
    assert (replays > 0) == (k > 1)
    state = resident.trainable_state()
    assert_same_state(state, host.trainable_state())
    assert_same_state(state, on_disk.trainable_state())
    assert on_disk.checksum() == resident.checksum()


def test_mixed_placement_device_host_and_nvme(tmp_path):
    """Block streaming from both tiers takes two sets of device slots (the host store's streamer's and the NVMe
    tier's): the plan counts both, and streams resident blocks instead where they would pass the budget."""
    base = tiny_model("opt", seed=5, num_hidden_layers=12)  # host budget: 3 staging buffers + 2.5 blocks
    probe = ZOEngine(clone_model(base), ZOConfig(offload=True))
    p = probe.plan
    # one set of slots would leave room for 4 resident blocks; with 8 streamed, 6 go to NVMe, and two sets leave
    # room for 1
    gpu_budget = p.fixed_bytes + 2 * p.slot_bytes + p.reserve_bytes + p.block_bytes[0] + 64
    with pytest.raises(ResourceError, match="two sets of device slots") as err:  # none fits two sets
        nvme_engine(clone_model(base), tmp_path / "small", host_blocks=2, offload="auto",
                    gpu_memory_budget=gpu_budget - 2 * p.block_bytes[0])
    assert "stream_granularity = 'matrix'" in str(err.value)
    resident = ZOEngine(clone_model(base), ZOConfig(offload=False, **CFG))
    mixed = nvme_engine(clone_model(base), tmp_path, host_blocks=2, offload="auto", gpu_memory_budget=gpu_budget)
    assert mixed.plan.resident == [0] and mixed.plan.host == [1, 2] and mixed.plan.nvme == list(range(3, 12))
    on_disk = next(r for r in mixed.residences if isinstance(r, NvmeResidence)).streamer
    assert mixed.plan.slot_bytes == mixed.streamer.device_bytes + on_disk.device_bytes == 2 * p.slot_bytes
    assert mixed.plan.expected_peak <= gpu_budget
    text = mixed.plan.describe()
    assert "1 blocks on the device, 2 in pinned host memory" in text and "9 on NVMe" in text
    for s in range(4):
        assert resident.step(padded_batch(seed=s)).loss == mixed.step(padded_batch(seed=s)).loss
    transfer = mixed.last_transfer
    assert transfer.bytes_disk_read >= 9 * round_up(p.block_bytes[0])
    assert_same_state(resident.trainable_state(), mixed.trainable_state())
    assert mixed.checksum() == resident.checksum()


# ------------------------------------------------------------------------------------------------ snapshots
def test_snapshot_and_resume_through_the_nvme_tier(tmp_path):
    base = tiny_model("llama", seed=7, num_hidden_layers=LAYERS)
    straight = nvme_engine(clone_model(base), tmp_path / "a", writeback_every=2)
    run(straight, 3)
    snapshot = straight.trainable_state()
    run(straight, 3, first=3)
    final = straight.trainable_state()

    resume_from(nvme_engine(clone_model(base), tmp_path / "b", writeback_every=2), base, snapshot, snapshot, final)


def resume_from(resumed: ZOEngine, base, tensors, snapshot: dict, final: dict) -> None:
    """``resumed`` (a fresh engine, K = 2) runs other steps, then loads ``tensors`` (the weights after step 3):
    it holds ``snapshot``, and three more steps end at ``final``, which the all-resident run reaches too."""
    run(resumed, 2, first=50)  # other weights, other steps: all overwritten by the snapshot
    resumed.load_trainable_state(tensors)
    resumed.load_state_dict({"step": 3})
    assert_same_state(snapshot, resumed.trainable_state())
    run(resumed, 3, first=3)
    assert_same_state(final, resumed.trainable_state())
    reference = ZOEngine(clone_model(base), ZOConfig(offload=False, writeback_every=2, **CFG))
    run(reference, 6)
    assert_same_state(final, reference.trainable_state())


def test_load_safetensors_and_init_random_fill_the_files(tmp_path):
    from safetensors.torch import save_file

    from zo2.offload.loading import init_random, load_safetensors

    base = tiny_model("opt", seed=9, num_hidden_layers=LAYERS)
    save_file({n: p.detach().contiguous() for n, p in base.named_parameters() if n != "lm_head.weight"},
              str(tmp_path / "model.safetensors"))
    target = nvme_engine(tiny_model("opt", seed=10, num_hidden_layers=LAYERS), tmp_path / "nvme")
    load_safetensors(target, tmp_path)
    reference = ZOEngine(clone_model(base), ZOConfig(offload=False, **CFG))
    assert_same_state(reference.trainable_state(), target.trainable_state())
    for s in range(2):
        assert reference.step(padded_batch(seed=s)).loss == target.step(padded_batch(seed=s)).loss

    host = ZOEngine(tiny_model("opt", seed=11, num_hidden_layers=LAYERS), ZOConfig(offload=True, **CFG))
    fresh = nvme_engine(tiny_model("opt", seed=12, num_hidden_layers=LAYERS), tmp_path / "fresh")
    init_random(host, seed=4)
    init_random(fresh, seed=4)
    assert_same_state(host.trainable_state(), fresh.trainable_state())


# ------------------------------------------------------------------------------------------------ a full disk
def test_full_disk_at_build_is_a_clear_error_and_makes_no_file(tmp_path, monkeypatch):
    Usage = namedtuple("Usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: Usage(10**12, 10**12 - 10**6, 10**6))
    with pytest.raises(ResourceError, match=str(tmp_path).replace("/", ".")):
        nvme_engine(tiny_model("opt", seed=1, num_hidden_layers=LAYERS), tmp_path)
    assert not [p for p in tmp_path.iterdir() if p.is_file() and p.name != LOCK_FILE]  # the folder's lock stays


def test_full_disk_during_training_keeps_the_previous_version(tmp_path, monkeypatch):
    engine = nvme_engine(tiny_model("opt", seed=2, num_hidden_layers=LAYERS), tmp_path)
    run(engine, 2)
    before = engine.trainable_state()  # flushed: the files hold these weights
    held = [engine.residences[-1].store.held(k) for k in range(LAYERS)]

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    store = engine.residences[-1].store
    monkeypatch.setattr(store.engine, "submit_write", full)
    with pytest.raises(ResourceError, match="intact"):
        run(engine, 3, first=2)
        engine.flush()
    monkeypatch.undo()
    reopened = NvmeStore(tmp_path, store.layouts, torch.float32, engine=ThreadPoolEngine())
    for k, unit in enumerate(u for u in engine.units if u.kind == "block"):
        assert reopened.held(k) == held[k]
        flat = torch.empty(reopened.numels[k])
        reopened.read(k, flat)
        for seg in reopened.layouts[k]:
            assert torch.equal(flat[seg.offset : seg.offset + seg.numel].view(seg.shape), before[seg.name])


def test_two_engines_cannot_share_an_nvme_folder(tmp_path):
    """The second run on the folder stops with the folder and the pid that holds it; once the first run's engine
    is gone the folder is free again."""
    first = nvme_engine(tiny_model("opt", seed=1, num_hidden_layers=LAYERS), tmp_path)
    with pytest.raises(ResourceError, match=f"{tmp_path}.*in use by process {os.getpid()}"):
        nvme_engine(tiny_model("opt", seed=2, num_hidden_layers=LAYERS), tmp_path)
    run(first, 1)  # unharmed
    del first
    second = nvme_engine(tiny_model("opt", seed=2, num_hidden_layers=LAYERS), tmp_path)
    run(second, 1)


# ------------------------------------------------------------------------------------------------ host memory
def live_rss() -> int:
    """The process's resident memory after glibc returned its free heap pages (malloc_trim): what is live, not what
    the allocator kept after earlier frees."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
    return psutil.Process().memory_info().rss


def test_host_memory_stays_under_the_budget_for_a_model_larger_than_it(tmp_path):
    from transformers import AutoConfig

    from zo2.offload.loading import empty_model, init_random

    config = AutoConfig.for_model("opt", vocab_size=128, hidden_size=512, num_hidden_layers=24, ffn_dim=2048,
                                  num_attention_heads=8, max_position_embeddings=64, word_embed_proj_dim=512,
                                  pad_token_id=0)
    model = empty_model(config, dtype=torch.float32)
    block = 4 * 512 * 512 + 2 * 512 * 2048 + 10 * 512  # weights of one block, biases and norms roughly
    model_bytes = 24 * block * 4
    warm = nvme_engine(tiny_model("opt", seed=1, num_hidden_layers=LAYERS), tmp_path / "warm-up")
    run(warm, 1)  # torch's CPU runtime, the I/O threads: allocated once, before the baseline
    del warm
    rss = live_rss()
    tiers = OffloadConfig(nvme_path=str(tmp_path / "nvme"), host_memory_budget=5 * block * 4,
                          nvme_engine="threads")
    engine = ZOEngine(model, ZOConfig(offload=True, device="cpu", **CFG), offload_config=tiers)
    assert len(engine.plan.nvme) >= 22 and engine.plan.host_budget == 5 * block * 4
    init_random(engine, seed=1)
    grown = live_rss() - rss
    for s in range(3):
        engine.step(padded_batch(seed=s, batch=2, length=8))
        grown = max(grown, live_rss() - rss)
    engine.flush()
    grown = max(grown, live_rss() - rss)
    p = engine.plan
    # on a CPU the device's slots and working reserve are host memory too
    bound = p.host_budget + p.slot_bytes + p.reserve_bytes + p.fixed_bytes + (64 << 20)
    assert bound < model_bytes * 0.8, "the model must be clearly larger than what the test allows to grow"
    assert grown < bound, f"RSS grew {grown / 1e6:.0f} MB; the bound is {bound / 1e6:.0f} MB"


# ------------------------------------------------------------------------------------------------ a whole run
def test_a_training_run_on_the_nvme_tier_saves_the_same_model(tmp_path):
    from safetensors.torch import load_file

    from zo2.config import load_config
    from zo2.train.metrics import format_metrics
    from zo2.train.run_dir import read_metrics
    from zo2.train.trainer import train_job

    common = ["train.steps=6", "train.eval_every=3", "optim.offload=true", "checkpoint.save_every=3",
              "train.device=cpu"]
    train_job(load_config("tiny-opt", overrides=common + [f"run.out_dir={tmp_path / 'host'}"]), quiet=True)
    job = load_config("tiny-opt", overrides=common + [f"run.out_dir={tmp_path / 'nvme'}",
                                                       f"offload.nvme_path={tmp_path / 'files'}",
                                                       "offload.host_memory_budget=650000"])
    train_job(job, quiet=True)
    assert len(list((tmp_path / "files").glob("unit-*.json"))) == 4  # every block lived on NVMe
    block = max(u.stat().st_size for u in (tmp_path / "files").glob("unit-*.a"))
    for name, least in (("host", 0), ("nvme", 4 * block)):  # the files' traffic is in metrics.jsonl and the log
        lines = [r for r in read_metrics(tmp_path / name) if r["kind"] == "train"]
        assert lines and all(r["disk_read_gb"] * 1e9 >= least and bool(r["disk_read_gb"]) == bool(least)
                             for r in lines), lines
        assert all(bool(r["disk_written_gb"]) == bool(least) for r in lines)
        assert ("NVMe read" in format_metrics(lines[-1], 6)) == bool(least)
    a = load_file(str(tmp_path / "host" / "final" / "model.safetensors"))
    b = load_file(str(tmp_path / "nvme" / "final" / "model.safetensors"))
    assert_same_state(a, b)


def test_the_node_store_homes_the_optimizer_state_with_its_nvme_homed_units(tmp_path):
    """zo2 launch with zo-adam: the node store places units by their weights and moments together and makes the
    moments' node files beside the NVMe-homed units' (never written: they read as zeros); the state area holds the
    host-homed units' moments only."""
    from zo2.config import load_config
    from zo2.control.store import NodeStore
    from zo2.train.build import build_job_model, build_tokenizer

    job = load_config("tiny-opt", overrides=["optim.optimizer=zo-adam", f"offload.nvme_path={tmp_path / 'nvme'}",
                                             "offload.host_memory_budget=2400000"])
    store = NodeStore(build_job_model(job, build_tokenizer(job)), job.optim, 1, job.offload)
    try:
        on_nvme = store.nvme.units
        assert on_nvme and set(store.nvme.state) == {"exp_avg", "exp_avg_sq"}
        assert all(store.state.buffers(k)["exp_avg"].numel() == 0 for k in on_nvme)
        state = store.state_tensors()
        block = [n for n in state if ".layers.3." in n and n.startswith("optimizer/exp_avg_sq/")]
        assert block and all(not state[n].load().any() for n in block)  # read from the files: zeros
        files = sorted(p.name for p in (tmp_path / "nvme").glob(f"{store.name}-state-exp_avg-*.a"))
        assert len(files) == len(on_nvme)
    finally:
        store.close()
    assert not list((tmp_path / "nvme").glob(f"{store.name}*"))


@pytest.mark.parametrize("method, workers", [("prompt", 2), ("lora", 2)])
def test_the_node_store_refuses_a_base_on_nvme_it_cannot_stream_before_making_files(tmp_path, method, workers):
    """zo2 launch with [peft]: blocks are placed by their adapters and base weights together; a base past the host
    budget with several workers per node (whole-frozen prompt-tuned blocks, or LoRA's) is refused."""
    pytest.importorskip("peft", reason="peft is not installed (pip install -e '.[test]')")
    from zo2.config import load_config
    from zo2.control.store import NodeStore
    from zo2.train.build import build_job_model, build_tokenizer

    job = load_config("tiny-opt", overrides=[f"peft.method={method}", f"offload.nvme_path={tmp_path / 'nvme'}",
                                             "offload.host_memory_budget=1000000", "model.num_layers=6"])
    model = build_job_model(job, build_tokenizer(job))
    with pytest.raises(ConfigError, match=f"{workers} workers per node.*one worker per node"):
        NodeStore(model, job.optim, workers, job.offload, frozen_base=True)
    assert not (tmp_path / "nvme").exists()
