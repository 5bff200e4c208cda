"""The NVMe tier under `zo2 launch` (zo2.control.nvme_store, zo2.offload.nvme_slices): the scheduler keeps the
blocks that do not fit the host budget in files it owns, the workers stream their slices of them; runs equal the
single-process run without NVMe bit for bit, and a worker killed mid NVMe write-back, or a killed scheduler, loses
nothing. CPU workers; the files live in a temporary folder."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from zo2.config import load_config
from zo2.control.scheduler import Scheduler
from zo2.errors import ResourceError
from zo2.offload.nvme import LOCK_FILE, FolderLock
from zo2.train.checkpoint import load_snapshot, read_log, snapshot_path
from zo2.train.trainer import train_job
from zo2_testing import assert_same_tensors as assert_same, logged

STEPS = 6
LAYERS = 8
BLOCK = 199_936
"""Bytes of one block of the 8-layer tiny OPT model below (fp32)."""
BASE = [f"model.num_layers={LAYERS}", f"train.steps={STEPS}", "data.batch_size=2", "data.max_length=48",
        "optim.offload=true", "checkpoint.save_every=3", "checkpoint.keep_last=5", "train.eval_batches=0",
        "run.plot=false", "run.save_final=false", "train.log_every=1", "checkpoint.fsync=false",
        "control.heartbeat_s=0.2", "control.heartbeat_timeout_s=30"]
HOST_BLOCKS = 2
"""Blocks the host budget below holds beside the embedding, the head and the workers' NVMe staging buffers."""
BUDGET = 132_864 + 3 * 200_704 + HOST_BLOCKS * BLOCK + BLOCK // 2
"""Embedding and head, 3 staging buffers (prefetch 1) of the largest block rounded to a page, two blocks and a
half: with 1 or 2 workers (two half-block slices round to one more page each) the first two blocks stay in shared
memory and the last six go to NVMe."""


def job(run_dir: Path, *extra: str):
    return load_config(overrides=[*BASE, f"run.out_dir={run_dir}", *extra])


def nvme(folder: Path) -> list[str]:
    return [f"offload.nvme_path={folder}", f"offload.host_memory_budget={BUDGET}", "offload.nvme_engine=threads"]


def final_weights(run_dir: Path, step: int = STEPS) -> dict[str, torch.Tensor]:
    return load_snapshot(snapshot_path(run_dir, step))[0]


def scheduler_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.name.startswith("zo2-node-")) if folder.is_dir() else []


LONG = 40
"""Steps of a run killed at a moment the test does not control (a six-step run may end before the kill)."""


@pytest.fixture(scope="module")
def long_reference(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("long_reference") / "run"
    train_job(job(run_dir, f"train.steps={LONG}"), quiet=True)
    return run_dir


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The uninterrupted single-process run (zo2 train) of the same job, every block in host memory."""
    run_dir = tmp_path_factory.mktemp("reference") / "run"
    train_job(job(run_dir), quiet=True)
    return run_dir


def run_scheduler(run_dir: Path, *extra: str, workers: int = 1, fault: str | None = None) -> tuple[Scheduler, dict]:
    """Run the job under the scheduler; returns it and what its node store looked like (spec, NVMe files)."""
    seen: dict = {}
    sched = Scheduler(job(run_dir, *extra), workers=workers, quiet=True, fault=fault)
    spawn = sched._spawn

    def spawn_and_look() -> None:  # the store is complete once the workers start
        if not seen:
            seen.update(spec=sched.node.spec, files=scheduler_files(Path(sched.node.spec.nvme_path)),
                        base=sched.node.base_on_nvme)
        spawn()

    sched._spawn = spawn_and_look
    assert sched.run() == 0
    return sched, seen


@pytest.mark.parametrize("workers, offload", [(1, "true"), pytest.param(2, "true", marks=pytest.mark.slow),
                                             pytest.param(1, "false", marks=pytest.mark.slow)])
def test_nvme_under_zo2_launch_equals_zo2_train_without_nvme(tmp_path, reference, workers, offload):
    """Mixed placement: the embedding, the head and blocks 0-1 in shared memory, blocks 2-7 in NVMe files, one file
    pair per unit × worker slice; every worker streams its slice (two workers: sliced transfers and an
    all-gather). With optim.offload = false the worker's plan keeps every block on the device, except those whose
    home is a file: they stream. Logs and weights equal zo2 train's without NVMe; the scheduler deletes its files
    at the end."""
    folder = tmp_path / "nvme"
    extra = nvme(folder) + (["parallel.pp=2"] if workers == 2 else []) + [f"optim.offload={offload}"]
    sched, seen = run_scheduler(tmp_path / "run", *extra, workers=workers)
    spec = seen["spec"]
    assert spec.nvme_path == str(folder) and spec.nvme_units == tuple(range(1 + HOST_BLOCKS, 1 + LAYERS))
    assert len(seen["files"]) == (LAYERS - HOST_BLOCKS) * workers * 3  # versions a and b and a marker per slice
    assert sched.restarts == 0
    assert logged(tmp_path / "run") == logged(reference)
    assert_same(final_weights(tmp_path / "run"), final_weights(reference))
    assert_same(final_weights(tmp_path / "run", 3), final_weights(reference, 3))  # a snapshot read from the files
    assert scheduler_files(folder) == [] and (folder / LOCK_FILE).exists()


@pytest.mark.parametrize("workers", [1, pytest.param(2, marks=pytest.mark.slow)])
def test_a_worker_killed_mid_nvme_write_back_is_repaired_bit_for_bit(tmp_path, reference, workers):
    """Rank 0 dies (SIGKILL) in step 4 while writing its slice of block 3 (unit 4, NVMe-homed) into the file
    version that would replace the current one: half of it landed, the marker still names the previous version and
    the node store's marker says the write was in flight. The scheduler catches that unit up from its file's current
    version (whole) and the log, as it does the lagging ones (no rebuild from a snapshot), and the run ends equal to
    zo2 train's."""
    folder = tmp_path / "nvme"
    extra = nvme(folder) + (["parallel.pp=2"] if workers == 2 else [])
    sched, seen = run_scheduler(tmp_path / "run", *extra, workers=workers, fault="0:4:4")
    assert 4 in seen["spec"].nvme_units
    (repair,) = sched.recoveries
    assert "signal 9" in repair["why"] and repair["step"] == 4, repair
    assert repair["caught_up"] >= 1, repair
    assert repair["rebuilt"] == 0 if workers == 1 else True, repair  # the other worker may tear a host-memory unit
    assert logged(tmp_path / "run") == logged(reference)
    assert_same(final_weights(tmp_path / "run"), final_weights(reference))


@pytest.mark.slow
def test_a_lagging_nvme_write_back_torn_by_a_kill_is_repaired(tmp_path):
    """optim.writeback_every = 2: NVMe-homed blocks go to their files every other step; a kill tears one such
    write; it and the blocks whose files lag are caught up from their files and the log. Equal to zo2 train with
    K = 2 (no NVMe)."""
    single = tmp_path / "single"
    train_job(job(single, "optim.writeback_every=2"), quiet=True)
    sched, _ = run_scheduler(tmp_path / "run", "optim.writeback_every=2", *nvme(tmp_path / "nvme"), fault="0:5:6")
    (repair,) = sched.recoveries
    assert "signal 9" in repair["why"] and repair["rebuilt"] == 0 and repair["caught_up"] >= 1, repair
    assert logged(tmp_path / "run") == logged(single)
    assert_same(final_weights(tmp_path / "run"), final_weights(single))


def _launch(run_dir: Path, *extra: str) -> subprocess.Popen:
    sets = [a for s in [*BASE, f"run.out_dir={run_dir}", *extra] for a in ("--set", s)]
    return subprocess.Popen([sys.executable, "-m", "zo2", "launch", "--nproc-per-node", "1", "--", "--quiet", *sets],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _wait_for_steps(run_dir: Path, n: int, proc: subprocess.Popen, timeout: float = 120) -> None:
    log = run_dir / "trajectory.jsonl"
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if proc.poll() is not None:
            raise AssertionError(f"zo2 launch exited early ({proc.returncode}): {proc.stdout.read()}")
        if log.exists() and len(read_log(log)) >= n:
            return
        time.sleep(0.05)
    raise TimeoutError(f"the run did not reach step {n}")


@pytest.mark.slow
def test_a_killed_scheduler_leaves_its_nvme_files_until_the_same_command_resumes(tmp_path, long_reference):
    """SIGKILL to the scheduler after step 5 (past the snapshot at step 3): its NVMe files stay in the folder (no
    clean-up ran) and the folder is not locked any more (the kernel dropped the dead process's lock); the same
    command resumes from the newest snapshot and the log, deletes the dead scheduler's files and ends equal to
    zo2 train's run."""
    run_dir, folder = tmp_path / "run", tmp_path / "nvme"
    proc = _launch(run_dir, *nvme(folder), f"train.steps={LONG}")
    _wait_for_steps(run_dir, 5, proc)
    proc.kill()
    proc.communicate(timeout=60)
    left = scheduler_files(folder)
    assert left and all(p.name.startswith(f"zo2-node-{proc.pid}-") for p in left)
    FolderLock(folder).release()  # free: its holder is gone
    proc = _launch(run_dir, *nvme(folder), f"train.steps={LONG}")  # the same command again
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out
    assert "resuming at step" in out
    assert not [p for p in left if p.exists()] and scheduler_files(folder) == []
    assert logged(run_dir) == logged(long_reference)
    assert_same(final_weights(run_dir, LONG), final_weights(long_reference, LONG))


def test_a_second_user_of_the_nvme_folder_is_refused_with_the_holders_pid(tmp_path):
    """Another process holds the folder's lock (a running zo2 train or scheduler): the scheduler stops before it
    builds anything, naming the folder and that process; once the holder is gone the folder is free."""
    folder = tmp_path / "nvme"
    folder.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from zo2.offload.nvme import FolderLock; "
                               f"lock = FolderLock({str(folder)!r}); print('locked', flush=True); time.sleep(600)"],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        sched = Scheduler(job(tmp_path / "run", *nvme(folder)), workers=1, quiet=True)
        with pytest.raises(ResourceError) as err:
            sched.run()
        assert str(folder) in str(err.value) and f"process {holder.pid}" in str(err.value)
        assert not [p for p in Path("/dev/shm").glob(f"zo2-node-{os.getpid()}-*")]  # nothing left behind
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait(timeout=60)
    FolderLock(folder).release()


@pytest.fixture(scope="module")
def matrix_reference(tmp_path_factory):
    """zo2 train of the same job streaming one matrix at a time, every block in host memory."""
    run_dir = tmp_path_factory.mktemp("matrix_reference") / "run"
    train_job(job(run_dir, "optim.stream_granularity=matrix"), quiet=True)
    return run_dir


def test_one_matrix_at_a_time_from_nvme_under_zo2_launch_equals_zo2_train(tmp_path, matrix_reference):
    """One worker streams the scheduler's NVMe files a matrix at a time (the host-homed blocks' pieces and the
    NVMe-homed ones' through one ring); a worker killed (SIGKILL) while writing an NVMe-homed unit's file in
    step 4 is repaired from that file's current version and the log. Logs and weights equal zo2 train's, one
    matrix at a time without NVMe."""
    folder = tmp_path / "nvme"
    sched, seen = run_scheduler(tmp_path / "run", *nvme(folder), "optim.stream_granularity=matrix", fault="0:4:4")
    assert seen["spec"].nvme_units == tuple(range(1 + HOST_BLOCKS, 1 + LAYERS))
    (repair,) = sched.recoveries
    assert "signal 9" in repair["why"] and repair["step"] == 4 and repair["rebuilt"] == 0, repair
    assert repair["caught_up"] >= 1, repair
    assert logged(tmp_path / "run") == logged(matrix_reference)
    assert_same(final_weights(tmp_path / "run"), final_weights(matrix_reference))
    assert_same(final_weights(tmp_path / "run", 3), final_weights(matrix_reference, 3))
    assert scheduler_files(folder) == []


@pytest.mark.parametrize("granularity,fault", [("auto", None),
                                               pytest.param("matrix", "1:4:4", marks=pytest.mark.slow)])
def test_two_workers_stream_their_share_of_every_nvme_matrix_and_equal_zo2_train(tmp_path, matrix_reference,
                                                                                  granularity, fault):
    """Two workers, one matrix at a time (sliced transfers, perturbation parallelism): the scheduler cuts its NVMe
    files by piece, each worker's file its share of every matrix; each worker uploads, updates and writes back its
    share and an all-gather assembles the matrix. Under the default 'auto' too: the workers of a node with NVMe
    files cut by piece stream one matrix at a time. Logs, weights and a snapshot read from the files equal zo2
    train's one matrix at a time; with a kill of worker 1 mid-write of an NVMe-homed unit in step 4, too."""
    folder = tmp_path / "nvme"
    sched, seen = run_scheduler(tmp_path / "run", *nvme(folder), f"optim.stream_granularity={granularity}",
                                "parallel.pp=2", workers=2, fault=fault)
    spec = seen["spec"]
    assert spec.nvme_cuts and spec.writers == 2 and len(seen["files"]) == (LAYERS - HOST_BLOCKS) * 2 * 3
    if fault is None:
        assert sched.restarts == 0
    else:
        (repair,) = sched.recoveries
        assert "signal 9" in repair["why"] and repair["step"] == 4 and repair["caught_up"] >= 1, repair
    assert logged(tmp_path / "run") == logged(matrix_reference)
    assert_same(final_weights(tmp_path / "run"), final_weights(matrix_reference))
    assert_same(final_weights(tmp_path / "run", 3), final_weights(matrix_reference, 3))
    assert scheduler_files(folder) == []


@pytest.fixture(scope="module")
def peft_references(tmp_path_factory):
    """zo2 train of the same job with a [peft] method, every block in host memory (each made once)."""
    pytest.importorskip("peft", reason="peft is not installed (pip install -e '.[test]')")
    made: dict[str, Path] = {}

    def reference(method: str) -> Path:
        if method not in made:
            made[method] = tmp_path_factory.mktemp(f"{method}_reference") / "run"
            train_job(job(made[method], f"peft.method={method}"), quiet=True)
        return made[method]

    return reference


@pytest.mark.parametrize("method, granularity, fault", [
    ("lora", "block", "0:4:7"), pytest.param("lora", "matrix", "0:4:7", marks=pytest.mark.slow),
    ("prompt", "block", None)])
def test_peft_under_zo2_launch_keeps_the_workers_base_on_nvme_and_equals_zo2_train(tmp_path, peft_references,
                                                                                   method, granularity, fault):
    """[peft] under zo2 launch with one worker: the scheduler places blocks by their adapters and base weights
    together, homes the adapters of those past the host budget in its files (LoRA; prompt tuning's blocks have
    none), and the worker keeps their base weights in files of its own (frozen-<k>) beside them; a kill of the
    worker mid-write of an NVMe-homed block is repaired, the next worker writes its base files again. Logs and
    adapters equal zo2 train's without NVMe; no file is left in the folder at the end."""
    folder = tmp_path / "nvme"
    reference = peft_references(method)
    sched, seen = run_scheduler(tmp_path / "run", *nvme(folder), f"peft.method={method}",
                                f"optim.stream_granularity={granularity}", fault=fault)
    on_nvme = seen["spec"].nvme_units
    assert on_nvme and 7 in on_nvme and min(on_nvme) > 1, on_nvme  # some blocks in shared memory, some on NVMe
    assert seen["base"] >= len(on_nvme) * BLOCK * 0.9  # their base weights, in the worker's files
    assert len(seen["files"]) == (3 * len(on_nvme) if method == "lora" else 0)  # the adapters' files
    disk = [r["disk_read_gb"] for r in map(json.loads, (tmp_path / "run" / "metrics.jsonl").read_text().splitlines())
            if r["kind"] == "train"]
    assert len(disk) == STEPS and min(disk) * 1e9 >= len(on_nvme) * BLOCK * 0.9  # every step read the base files
    if fault is None:
        assert sched.restarts == 0
    else:
        (repair,) = sched.recoveries
        assert "signal 9" in repair["why"] and repair["step"] == 4, repair
    assert logged(tmp_path / "run") == logged(reference)
    weights = final_weights(tmp_path / "run")
    assert weights and all(("lora_" if method == "lora" else "prompt_encoder") in n for n in weights), list(weights)
    assert_same(weights, final_weights(reference))
    assert sorted(p.name for p in folder.iterdir()) == [LOCK_FILE]


def test_lora_with_two_workers_and_its_base_past_the_host_budget_is_refused_before_any_file_is_made(tmp_path):
    from zo2.errors import ConfigError

    pytest.importorskip("peft", reason="peft is not installed (pip install -e '.[test]')")
    folder = tmp_path / "nvme"
    sched = Scheduler(job(tmp_path / "run", *nvme(folder), "peft.method=lora", "parallel.pp=2"), workers=2,
                      quiet=True)
    with pytest.raises(ConfigError, match="2 workers per node.*one worker per node"):
        sched.run()
    assert not [p for p in folder.glob("zo2-node-*")] and not [p for p in Path("/dev/shm").glob(
        f"zo2-node-{os.getpid()}-*")]


# ----------------------------------------------------------------------------------------------------------
# torchrun: several processes on one node, no scheduler
# ----------------------------------------------------------------------------------------------------------

def _torchrun(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "GLOO_SOCKET_IFNAME": "lo", "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
                           "-m", "zo2", "train", "--quiet", *args], capture_output=True, text=True, timeout=300, env=env)


def _sets(*items: str) -> list[str]:
    return [a for kv in items for a in ("--set", kv)]


@pytest.mark.slow
@pytest.mark.parametrize("granularity", ["block", "matrix"])
def test_torchrun_processes_share_the_nodes_nvme_files_and_equal_one_process(tmp_path, request, granularity):
    """Two torchrun processes (perturbation parallelism, sliced transfers): the first makes the NVMe files, each
    writes and streams its slice of the blocks beyond the host budget (by block one range of each, one matrix at a
    time its share of every matrix); the run equals the single process without NVMe bit for bit, and the first
    process deletes the files at the end."""
    reference = request.getfixturevalue("reference" if granularity == "block" else "matrix_reference")
    folder, run_dir = tmp_path / "nvme", tmp_path / "run"
    proc = _torchrun("--out", str(run_dir), *_sets(*BASE, "parallel.pp=2", *nvme(folder),
                                                   f"optim.stream_granularity={granularity}"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "on NVMe in" in proc.stderr  # the plan: some blocks on NVMe
    assert logged(run_dir) == logged(reference)
    assert_same(final_weights(run_dir), final_weights(reference))
    assert scheduler_files(folder) == [] and (folder / LOCK_FILE).exists()


@pytest.mark.slow
@pytest.mark.parametrize("granularity", ["block", "matrix"])
def test_a_torchrun_run_on_nvme_resumes_bit_for_bit(tmp_path, request, granularity):
    """A resumed torchrun run writes the snapshot's weights into the node's NVMe files slice by slice (every
    process its own: one range, or its share of every matrix) and ends equal to the uninterrupted single
    process."""
    reference = request.getfixturevalue("reference" if granularity == "block" else "matrix_reference")
    folder, run_dir = tmp_path / "nvme", tmp_path / "run"
    part = _torchrun("--out", str(run_dir), *_sets(*BASE, "parallel.pp=2", *nvme(folder), "train.steps=4",
                                                   f"optim.stream_granularity={granularity}"))
    assert part.returncode == 0, part.stderr[-3000:]
    rest = _torchrun("--resume", str(run_dir), *_sets(f"train.steps={STEPS}"))
    assert rest.returncode == 0, rest.stderr[-3000:]
    assert logged(run_dir) == logged(reference)
    assert_same(final_weights(run_dir), final_weights(reference))


@pytest.fixture(scope="module")
def adam_references(tmp_path_factory):
    """zo2 train with zo-adam, every block in host memory, by block and one matrix at a time (each made once)."""
    made: dict[str, Path] = {}

    def reference(granularity: str) -> Path:
        if granularity not in made:
            made[granularity] = tmp_path_factory.mktemp(f"adam_{granularity}") / "run"
            train_job(job(made[granularity], "optim.optimizer=zo-adam", f"optim.stream_granularity={granularity}"),
                      quiet=True)
        return made[granularity]

    return reference


ADAM_BUDGET = 132_864 + 3 * 602_112 + 2 * 3 * BLOCK + 3 * BLOCK // 2
"""With zo-adam a block is its weights and two moments (3 x BLOCK): the embedding and head, 3 staging buffers of
such a block, two blocks and a half: the first two blocks stay in host memory, the last six go to NVMe."""


@pytest.mark.slow
@pytest.mark.parametrize("granularity", ["block", "matrix"])
def test_torchrun_processes_keep_adams_state_in_the_nodes_nvme_files(tmp_path, adam_references, granularity):
    """Two torchrun processes with zo-adam: the NVMe-homed blocks' moments live in node files cut as the weights'
    (the first process makes them), each process streams, updates and writes back its slice of them; snapshots
    read every slice, a resume writes each process's own. Logs, weights and moments (snapshots) equal zo2 train
    without NVMe bit for bit; the first process deletes the files at the end."""
    reference = adam_references(granularity)
    folder, run_dir = tmp_path / "nvme", tmp_path / "run"
    extra = ("parallel.pp=2", "optim.optimizer=zo-adam", f"optim.stream_granularity={granularity}",
             f"offload.nvme_path={folder}", f"offload.host_memory_budget={ADAM_BUDGET}", "offload.nvme_engine=threads")
    part = _torchrun("--out", str(run_dir), *_sets(*BASE, *extra, "train.steps=4"))
    assert part.returncode == 0, part.stderr[-3000:]
    assert "6 on NVMe in" in part.stderr  # the plan: the last six blocks (with their moments) on NVMe
    rest = _torchrun("--resume", str(run_dir), *_sets(f"train.steps={STEPS}"))
    assert rest.returncode == 0, rest.stderr[-3000:]
    assert logged(run_dir) == logged(reference)
    for step in (3, STEPS):
        ours, theirs = final_weights(run_dir, step), final_weights(reference, step)
        assert any(k.startswith("optimizer/") for k in theirs)
        assert_same(ours, theirs)
    assert scheduler_files(folder) == [] and (folder / LOCK_FILE).exists()


@pytest.mark.parametrize("workers, fault", [(1, "0:4:4"), pytest.param(2, "1:4:4", marks=pytest.mark.slow)])
def test_adams_state_on_nvme_under_zo2_launch_is_repaired_and_equals_zo2_train(tmp_path, adam_references, workers,
                                                                              fault):
    """zo2 launch with zo-adam: the scheduler homes the NVMe-homed units' moments in node files beside their
    weights (units placed by weights and moments together), the workers stream their slices of them; a worker
    killed mid NVMe write in step 4 is repaired by rebuilding weights and moments from the snapshot and the log
    (into the files). Logs, weights and moments equal zo2 train without NVMe."""
    folder = tmp_path / "nvme"
    extra = [f"offload.nvme_path={folder}", f"offload.host_memory_budget={3 * BUDGET}", "offload.nvme_engine=threads",
             "optim.optimizer=zo-adam"] + (["parallel.pp=2"] if workers == 2 else [])
    sched, seen = run_scheduler(tmp_path / "run", *extra, workers=workers, fault=fault)
    spec = seen["spec"]
    assert spec.nvme_units == tuple(range(1 + HOST_BLOCKS, 1 + LAYERS)), spec.nvme_units
    # per unit and worker slice the weights' versions a and b and marker, each moment's a and b (no marker: unwritten)
    assert len(seen["files"]) == (LAYERS - HOST_BLOCKS) * workers * (3 + 2 * 2)
    (repair,) = sched.recoveries
    assert "signal 9" in repair["why"] and repair["step"] == 4 and repair["rebuilt"] >= LAYERS, repair
    reference = adam_references("block")
    assert logged(tmp_path / "run") == logged(reference)
    for step in (3, STEPS):
        ours, theirs = final_weights(tmp_path / "run", step), final_weights(reference, step)
        assert any(k.startswith("optimizer/") for k in theirs)
        assert_same(ours, theirs)
    assert scheduler_files(folder) == []
