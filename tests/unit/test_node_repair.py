"""The scheduler's repair of a node store whose writers hold different steps (zo2.control.store.NodeStore.bring_to).

With several workers each one writes back its part of every unit: one range by block, its share of every piece
one matrix at a time. A worker killed between its write-backs leaves the writers of a unit at different steps;
each part is caught up from its own step, so the repair must replay exactly the ranges that writer wrote. The
reference is an uninterrupted zo2 train run's snapshot of the same job."""

from __future__ import annotations

import pytest
import torch

from zo2.config import load_config
from zo2.control.store import NodeStore
from zo2.offload.pieces import unit_pieces
from zo2.offload.store import share_bounds
from zo2.train.build import build_job_model, build_tokenizer
from zo2.train.checkpoint import LOG_FILE, load_snapshot, read_log, snapshot_path
from zo2.train.trainer import train_job

STEPS = 3
OVERRIDES = ["model.num_layers=2", f"train.steps={STEPS}", "data.batch_size=2", "data.max_length=32",
             "optim.offload=true", "optim.stream_granularity=matrix", f"checkpoint.save_every={STEPS}",
             "train.eval_batches=0", "run.plot=false", "run.save_final=false", "checkpoint.fsync=false"]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The log and the snapshot after every step of an uninterrupted zo2 train run."""
    run_dir = tmp_path_factory.mktemp("repair_reference") / "run"
    job = load_config("tiny-opt", overrides=[*OVERRIDES, f"run.out_dir={run_dir}"])
    train_job(job, quiet=True)
    return job, read_log(run_dir / LOG_FILE), load_snapshot(snapshot_path(run_dir, STEPS))[0]


def _node(job) -> tuple[NodeStore, dict]:
    model = build_job_model(job, build_tokenizer(job))
    base = {n: p.detach().clone() for n, p in model.named_parameters()}
    node = NodeStore(model, job.optim, 2, job.offload)
    node.markers.set_all(-1)
    return node, base


def _fill(base: dict):
    def fill(views: dict) -> None:
        for name, view in views.items():
            view.copy_(base[name])
    return fill


@pytest.mark.parametrize("reported", [True, False])
def test_writers_at_different_steps_are_caught_up_each_from_its_own(reference, reported):
    """Block 1 of a two-writer node store: writer 0's shares of every piece hold the last step, writer 1's the
    first. Reported by the workers (one matrix at a time), each writer's shares are caught up from its own step;
    unreported, the unit is rebuilt from the base weights and the log. Either way it equals the uninterrupted
    run; replaying one contiguous half per writer (the slicing of block streaming) would apply steps twice."""
    job, records, final = reference
    node, base = _node(job)
    try:
        k = next(i for i, u in enumerate(node.units) if u.kind == "block" and u.index == 1)
        last = STEPS - 1
        node.bring_to(0, records, None, _fill(base), torch.device("cpu"))  # every unit after step 0's update
        early = node.store.flat(k).clone()
        node.bring_to(last, records, None, _fill(base), torch.device("cpu"))
        whole = node.store.flat(k).clone()
        for name, view in node.views[k].items():
            assert torch.equal(view, final[name]), name  # the catch-up of whole units is the reference's
        flat, numel = node.store.flat(k), node.numel(k)
        pieces = unit_pieces(node.units[k].slots, node.store.layout(k), numel)
        assert len(pieces) > 2
        writer1 = torch.zeros(numel, dtype=torch.bool)
        for lo, hi in pieces:
            a, b = share_bounds(hi - lo, 1, 2)
            writer1[lo + a : lo + b] = True
        flat[writer1] = early[writer1]  # writer 1 never wrote steps 1 and 2 back
        node.markers.table[k, :, 0] = torch.tensor([last, 0])
        if reported:
            node.note_pieces([k])
            assert node.writer_parts(k, 1) == [(lo + a, lo + b) for lo, hi in pieces
                                              for a, b in [share_bounds(hi - lo, 1, 2)]]
        else:
            assert node.writer_parts(k, 1) is None
        counts = node.bring_to(last, records, None, _fill(base), torch.device("cpu"))
        assert counts == ({"caught_up": 1, "rebuilt": 0} if reported else {"caught_up": 0, "rebuilt": 1})
        assert torch.equal(node.store.flat(k), whole)
        for name, view in node.views[k].items():
            assert torch.equal(view, final[name]), name
    finally:
        node.close()


def test_block_streaming_writers_write_one_range_each(reference):
    """optim.stream_granularity = 'block': each writer's part is one range of the unit, known without a report."""
    job, _, _ = reference
    job = load_config("tiny-opt", overrides=[*OVERRIDES, "optim.stream_granularity=block"])
    node, _ = _node(job)
    try:
        n = node.numel(1)
        assert node.writer_parts(1, 0) == [(0, n // 2)] and node.writer_parts(1, 1) == [(n // 2, n)]
        node.note_pieces([])
        assert node.writer_parts(1, 1) == [(n // 2, n)]
    finally:
        node.close()
