"""One matrix at a time from the NVMe tier (zo2.offload.nvme_pieces): bit-exactness against resident units and the
block-streamed host tier, host and NVMe blocks side by side, snapshots and resume through the files, a device
ring of matrices (not blocks), and the refusal where several processes share a node's files. CPU only: the
"device" is the CPU and the files live in a temporary folder."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from zo2 import ZOEngine
from zo2.config import ZOConfig
from zo2.config.offload import OffloadConfig
from zo2.offload.nvme import PAGE, round_up
from zo2.offload.nvme_pieces import NvmePieceResidence, NvmePieceStreamer
from zo2.offload.pieces import PiecewiseResidence
from zo2.offload.planner import Plan
from zo2.offload.tiers import place_tiers_for, staging_buffers
from test_nvme_residence import CFG, assert_same_state, block_bytes, resume_from, run, same_three_ways
from zo2_testing import clone_model, padded_batch, tiny_model

LAYERS = 6


def matrix_engine(model, folder, *, host_blocks: int = 0, prefetch: int = 1, **cfg) -> ZOEngine:
    """An engine streaming every block one matrix at a time, the blocks past ``host_blocks`` homed in files (the
    host budget holds the staging buffers and ``host_blocks`` blocks, no more)."""
    budget = staging_buffers(prefetch) * round_up(block_bytes(model)) + host_blocks * block_bytes(model) + 64
    tiers = OffloadConfig(nvme_path=str(folder), host_memory_budget=budget,
                          nvme_engine="threads", nvme_queue_depth=3, nvme_block_size=PAGE)
    config = ZOConfig(offload=True, stream_granularity="matrix", prefetch=prefetch, **CFG, **cfg)
    return ZOEngine(model, config, offload_config=tiers)


def nvme_residence(engine: ZOEngine) -> NvmePieceResidence:
    return next(r for r in engine.residences if isinstance(r, NvmePieceResidence))


@pytest.mark.parametrize("prefetch", [1, 3])
@pytest.mark.parametrize("writeback_every", [1, 3])
@pytest.mark.parametrize("family", ["opt", "llama"])
def test_matrix_on_nvme_matches_resident_and_block_streamed_host_tier_bit_for_bit(tmp_path, family, writeback_every,
                                                                                 prefetch):
    base = tiny_model(family, seed=3, num_hidden_layers=LAYERS)
    cfg = dict(writeback_every=writeback_every)
    resident = ZOEngine(clone_model(base), ZOConfig(offload=False, **CFG, **cfg))
    host = ZOEngine(clone_model(base), ZOConfig(offload=True, stream_granularity="block", **CFG, **cfg))
    on_disk = matrix_engine(clone_model(base), tmp_path, prefetch=prefetch, **cfg)
    assert on_disk.plan.nvme == list(range(LAYERS)) and on_disk.plan.granularity == "matrix"
    same_three_ways(resident, host, on_disk, nvme_residence(on_disk).store.file_bytes(0), writeback_every)


def test_the_device_holds_a_ring_of_matrices_and_the_host_the_staging_buffers(tmp_path):
    base = tiny_model("opt", seed=4, num_hidden_layers=LAYERS)
    engine = matrix_engine(clone_model(base), tmp_path, prefetch=1)
    streamer = nvme_residence(engine).streamer
    assert isinstance(streamer, NvmePieceStreamer)
    largest_piece = max(hi - lo for _, lo, hi in streamer.store.pieces) * 4
    assert streamer.device_bytes == 3 * largest_piece  # prefetch + 2 matrices
    assert streamer.device_bytes < block_bytes(base)  # less than one block
    assert len(streamer.staging) == staging_buffers(1)
    run(engine, 2)
    assert len(streamer._buffer_of) <= staging_buffers(1)
    run(engine, 1, first=2)  # each unit's file is read once a step, not once per piece
    assert engine.last_transfer.bytes_disk_read == LAYERS * streamer.nvme.file_bytes(0)


@pytest.mark.parametrize("prefetch", [1, 3])
def test_host_and_nvme_blocks_side_by_side_one_matrix_at_a_time(tmp_path, prefetch):
    """The two tiers' pieces share one device ring (the plan counts one), and the values equal the resident run."""
    base = tiny_model("opt", seed=5, num_hidden_layers=8)
    resident = ZOEngine(clone_model(base), ZOConfig(offload=False, writeback_every=2, **CFG))
    mixed = matrix_engine(clone_model(base), tmp_path, host_blocks=2, writeback_every=2, prefetch=prefetch)
    assert mixed.plan.host == [0, 1] and mixed.plan.nvme == [2, 3, 4, 5, 6, 7]
    kinds = {type(r) for r in mixed.residences}
    assert PiecewiseResidence in kinds and NvmePieceResidence in kinds
    host, on_disk = mixed.streamer, nvme_residence(mixed).streamer
    assert on_disk.ring is host.ring and on_disk.device_bytes == 0
    assert host.device_bytes == mixed.plan.slot_bytes
    for s in range(4):
        assert resident.step(padded_batch(seed=s)).loss == mixed.step(padded_batch(seed=s)).loss
    assert mixed.last_transfer.bytes_disk_read > 0
    assert_same_state(resident.trainable_state(), mixed.trainable_state())
    assert mixed.checksum() == resident.checksum()


def test_snapshot_and_resume_one_matrix_at_a_time_from_nvme(tmp_path, monkeypatch):
    """The snapshot writer reads each unit's file once (deferred), and a lazy resume writes the files back."""
    from zo2.offload.nvme import NvmeStore
    from zo2.train.checkpoint import latest_good_snapshot, save_snapshot

    base = tiny_model("llama", seed=7, num_hidden_layers=LAYERS)
    straight = matrix_engine(clone_model(base), tmp_path / "a", writeback_every=2)
    run(straight, 3)
    tensors = straight.snapshot_tensors()  # flushes: the lagging units' files are written
    reads, original = [], NvmeStore.read
    monkeypatch.setattr(NvmeStore, "read", lambda self, k, out: reads.append(k) or original(self, k, out))
    save_snapshot(tmp_path / "run", 3, tensors, {"data": 3})
    assert sorted(reads) == list(range(LAYERS))  # one read per unit, whatever the number of its tensors
    monkeypatch.undo()
    snapshot = straight.trainable_state()
    run(straight, 3, first=3)
    final = straight.trainable_state()

    snap = latest_good_snapshot(tmp_path / "run")
    assert snap.step == 3
    resume_from(matrix_engine(clone_model(base), tmp_path / "b", writeback_every=2), base, snap.tensors, snapshot,
                final)


def test_init_random_fills_the_files_one_matrix_at_a_time(tmp_path):
    from zo2.offload.loading import init_random

    host = ZOEngine(tiny_model("opt", seed=11, num_hidden_layers=LAYERS), ZOConfig(offload=True, **CFG))
    fresh = matrix_engine(tiny_model("opt", seed=12, num_hidden_layers=LAYERS), tmp_path)
    init_random(host, seed=4)
    init_random(fresh, seed=4)
    assert_same_state(host.trainable_state(), fresh.trainable_state())
    for s in range(2):
        assert host.step(padded_batch(seed=s)).loss == fresh.step(padded_batch(seed=s)).loss


def _inputs(**fields) -> SimpleNamespace:
    config = SimpleNamespace(sliced_transfers=True, prefetch=1, stream_granularity="matrix")
    base = dict(tiers=OffloadConfig(nvme_path="/nvme", host_memory_budget=4 * 8192 + 100), store_spec=None,
                comm=None, config=config, optimizer=SimpleNamespace(state_names=()),
                units=[SimpleNamespace(kind="block", owned=["weight"])] * 5)
    return SimpleNamespace(**{**base, **fields})


def _plan() -> Plan:
    """Five streamed blocks: one fits the host budget beside the staging buffers, four go to NVMe."""
    return Plan([], [0, 1, 2, 3, 4], [8192] * 5, 100, 3 * 8192, 10, None, 1, granularity="matrix")


def test_several_processes_per_node_place_matrix_on_nvme():
    """torchrun: the node's processes stream the NVMe-homed blocks one matrix at a time, each its share of every
    piece (the files are cut by piece); placed as for one process."""
    plan = place_tiers_for(_inputs(comm=SimpleNamespace(local_size=2, local_share=lambda v, why: v)), _plan(),
                           [[]] * 5, creates_store=True)
    assert plan.nvme == [1, 2, 3, 4] and plan.host == [0] and plan.granularity == "matrix"


def test_the_scheduler_cuts_its_files_by_piece_for_the_granularities_that_stream_matrices():
    """zo2 launch: the scheduler cuts its NVMe files by piece for several workers under 'matrix', and under 'auto'
    where pieces split evenly over the writers (its workers then stream one matrix at a time); never for 'block'.
    A worker places the spec's NVMe-homed blocks whatever the cuts."""
    from zo2.control.store import nvme_by_piece

    for granularity, writers, cut in [("matrix", 2, True), ("auto", 2, True), ("auto", 8, True),
                                      ("auto", 3, False), ("block", 2, False)]:
        assert nvme_by_piece(SimpleNamespace(stream_granularity=granularity), writers) == cut, (granularity, writers)
    units = [SimpleNamespace(kind="embed")] + [SimpleNamespace(kind="block")] * 5 + [SimpleNamespace(kind="head")]
    spec = SimpleNamespace(nvme_units=(2, 3), nvme_path="/nvme", writers=2, nvme_cuts="0123456789abcdef")
    for fields in ({"writers": 1, "nvme_cuts": ""}, {"writers": 2, "nvme_cuts": "0123456789abcdef"}):
        spec.__dict__.update(fields)
        plan = place_tiers_for(_inputs(store_spec=spec, units=units), _plan(), [[]] * 5, creates_store=False)
        assert plan.nvme == [1, 2] and plan.granularity == "matrix"


def test_a_full_disk_between_units_keeps_the_previous_versions(tmp_path, monkeypatch):
    import errno

    from zo2.errors import ResourceError
    from zo2.offload.nvme import NvmeStore
    from zo2.offload.nvme_io import ThreadPoolEngine

    engine = matrix_engine(tiny_model("opt", seed=2, num_hidden_layers=LAYERS), tmp_path)
    run(engine, 2)
    before = engine.trainable_state()  # flushed: the files hold these weights
    store = nvme_residence(engine).store
    held = [store.held(k) for k in range(LAYERS)]

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(store.engine, "submit_write", full)
    with pytest.raises(ResourceError, match="intact"):
        run(engine, 3, first=2)
        engine.flush()
    monkeypatch.undo()
    reopened = NvmeStore(tmp_path, store.layouts, torch.float32, engine=ThreadPoolEngine())
    for k in range(LAYERS):
        assert reopened.held(k) == held[k]
        flat = torch.empty(reopened.numels[k])
        reopened.read(k, flat)
        for seg in reopened.layouts[k]:
            assert torch.equal(flat[seg.offset : seg.offset + seg.numel].view(seg.shape), before[seg.name])


def test_a_training_run_one_matrix_at_a_time_from_nvme_saves_the_same_model(tmp_path):
    """zo2 train with snapshots (written from the files, a unit at a time), evaluations and the final export."""
    from safetensors.torch import load_file

    from zo2.config import load_config
    from zo2.train.trainer import train_job

    common = ["train.steps=6", "train.eval_every=3", "optim.offload=true", "checkpoint.save_every=3",
              "train.device=cpu", "optim.writeback_every=2"]
    train_job(load_config("tiny-opt", overrides=common + [f"run.out_dir={tmp_path / 'host'}"]), quiet=True)
    job = load_config("tiny-opt", overrides=common + [f"run.out_dir={tmp_path / 'nvme'}",
                                                       f"offload.nvme_path={tmp_path / 'files'}",
                                                       "offload.host_memory_budget=650000",
                                                       "optim.stream_granularity=matrix"])
    train_job(job, quiet=True)
    assert len(list((tmp_path / "files").glob("unit-*.json"))) == 4  # every block lived on NVMe
    a = load_file(str(tmp_path / "host" / "final" / "model.safetensors"))
    b = load_file(str(tmp_path / "nvme" / "final" / "model.safetensors"))
    assert_same_state(a, b)
