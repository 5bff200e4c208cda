"""The scheduler and its workers (zo2.control): runs under the scheduler equal the single-process run, and
killed, torn, hung or interrupted workers lose nothing."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from zo2.config import load_config
from zo2.control.protocol import SchedulerChannel, WorkerLink, new_token
from zo2.control.scheduler import Scheduler
from zo2.errors import CheckpointError
from zo2.train.checkpoint import list_snapshots, load_snapshot, read_log, snapshot_path
from zo2.train.trainer import read_metrics, train_job
from zo2_testing import assert_same_tensors as assert_same, logged

STEPS = 6
BASE = [f"train.steps={STEPS}", "data.batch_size=2", "data.max_length=48", "optim.offload=true",
        "checkpoint.save_every=3", "checkpoint.keep_last=5", "train.eval_batches=0", "run.plot=false",
        "run.save_final=false", "train.log_every=1", "checkpoint.fsync=false", "control.heartbeat_s=0.2",
        "control.heartbeat_timeout_s=30"]


def job(run_dir: Path, *extra: str):
    return load_config(overrides=[*BASE, f"run.out_dir={run_dir}", *extra])


def final_weights(run_dir: Path, step: int = STEPS) -> dict[str, torch.Tensor]:
    tensors, _ = load_snapshot(snapshot_path(run_dir, step))
    return tensors


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The uninterrupted single-process run (zo2 train) of the same job."""
    run_dir = tmp_path_factory.mktemp("reference") / "run"
    train_job(job(run_dir), quiet=True)
    return run_dir


LONG = 60
"""Steps of the runs a test interrupts at a moment it does not control (a signal, a kill after some steps): a
tiny-model step takes a few hundredths of a second on the CPU, so a six-step run can end before the signal lands."""


@pytest.fixture(scope="module")
def long_reference(tmp_path_factory):
    """The uninterrupted single-process run of the job with LONG steps."""
    run_dir = tmp_path_factory.mktemp("long_reference") / "run"
    train_job(job(run_dir, f"train.steps={LONG}"), quiet=True)
    return run_dir


def run_scheduler(run_dir: Path, *extra: str, workers: int = 1, fault: str | None = None,
                  action=None) -> Scheduler:
    sched = Scheduler(job(run_dir, *extra), workers=workers, quiet=True, fault=fault)
    if action is not None:
        threading.Thread(target=action, args=(sched,), daemon=True).start()
    assert sched.run() == 0
    return sched


def wait_for_steps(run_dir: Path, n: int, timeout: float = 120, proc: subprocess.Popen | None = None) -> None:
    log = run_dir / "trajectory.jsonl"
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"zo2 launch exited early ({proc.returncode}): {proc.stdout.read()}")
        if log.exists() and len(read_log(log)) >= n:
            return
        time.sleep(0.05)
    raise TimeoutError(f"the run did not reach step {n}")


def test_one_worker_equals_the_single_process_run(tmp_path, reference):
    run_dir = tmp_path / "run"
    sched = run_scheduler(run_dir)
    assert sched.restarts == 0
    assert logged(run_dir) == logged(reference)
    assert_same(final_weights(run_dir), final_weights(reference))
    assert [p.name for p in list_snapshots(run_dir)] == [p.name for p in list_snapshots(reference)]
    assert not list(Path("/dev/shm").glob(f"{sched.token[:0]}zo2-node-{os.getpid()}-*"))  # shared files removed


@pytest.mark.slow
def test_two_workers_with_perturbation_parallelism_equal_the_single_process_run(tmp_path, reference):
    run_dir = tmp_path / "run"
    run_scheduler(run_dir, "parallel.pp=2", workers=2)
    assert logged(run_dir) == logged(reference)
    assert_same(final_weights(run_dir), final_weights(reference))


@pytest.mark.parametrize("granularity", ["block", "matrix"])
def test_a_worker_killed_mid_write_back_is_repaired_from_the_log(tmp_path, reference, granularity):
    """Rank 0 dies in step 4 (0-based) while writing block 1 (unit 2) back: half of it landed. One matrix at a
    time (from the node store) it dies after one piece of the unit was written back and while half of the next
    landed: the unit's marker stayed in flight from its first piece, so it is rebuilt too; equal to zo2 train's
    run (by block) bit for bit."""
    run_dir = tmp_path / "run"
    sched = run_scheduler(run_dir, f"optim.stream_granularity={granularity}", fault="0:4:2")
    assert sched.restarts == 1
    (repair,) = sched.recoveries  # it died of the SIGKILL after tearing the block, and the block was rebuilt
    assert "signal 9" in repair["why"] and repair["rebuilt"] == 1 and repair["step"] == 4, repair
    assert logged(run_dir) == logged(reference)
    assert_same(final_weights(run_dir), final_weights(reference))


@pytest.mark.slow
def test_a_torn_slice_with_two_workers_is_repaired(tmp_path, reference):
    run_dir = tmp_path / "run"
    sched = run_scheduler(run_dir, "parallel.pp=2", workers=2, fault="1:2:3")
    assert sched.restarts == 1
    (repair,) = sched.recoveries
    assert "signal 9" in repair["why"] and repair["rebuilt"] >= 1, repair  # the other worker may be mid-write too
    assert_same(final_weights(run_dir), final_weights(reference))


def _kill_worker_after(steps: int, sig: int = signal.SIGKILL):
    def action(sched: Scheduler) -> None:
        wait_for_steps(sched.run_dir, steps)
        time.sleep(0.05 * steps)  # somewhere inside the next step
        os.kill(sched.procs[0].popen.pid, sig)
    return action


@pytest.mark.parametrize("method", ["lora", pytest.param("prompt", marks=pytest.mark.slow),
                                    pytest.param("lora-streamed", marks=pytest.mark.slow)])
def test_adapters_train_under_the_scheduler_as_in_one_process_and_torn_adapter_blocks_are_repaired(tmp_path, method):
    """[peft]: the node store holds the adapter (seeded init), the worker its own frozen base; equal to zo2 train,
    and (LoRA: adapters in every streamed block) a block torn mid-write-back is rebuilt exactly. lora-streamed: the
    base built on the meta device (model.stream_load = 'always') and filled by each worker on its own."""
    pytest.importorskip("peft", reason="peft is not installed (pip install -e '.[test]')")
    streamed = method == "lora-streamed"
    method = "lora" if streamed else method
    extra = (f"peft.method={method}",) + (("model.stream_load=always",) if streamed else ())
    single = tmp_path / "single"
    train_job(job(single, *extra), quiet=True)
    run_dir = tmp_path / "run"
    sched = run_scheduler(run_dir, *extra, fault="0:4:2" if method == "lora" else None)
    assert logged(run_dir) == logged(single)
    weights = final_weights(run_dir)
    assert all(("lora_" in n) if method == "lora" else ("prompt_encoder" in n) for n in weights), sorted(weights)
    assert_same(weights, final_weights(single))
    if method == "lora":
        (repair,) = sched.recoveries
        assert "signal 9" in repair["why"] and repair["rebuilt"] == 1, repair


@pytest.mark.parametrize("fault", [None, pytest.param("0:4:3", marks=pytest.mark.slow)])
def test_two_workers_share_one_copy_of_the_lora_base_and_equal_one_process(tmp_path, fault):
    """[peft] with two workers (perturbation parallelism, sliced transfers): the streamed blocks' base weights live
    once on the node, in shared memory the first worker made (zo2.offload.frozen_setup), and the run equals zo2
    train's; nothing is left in /dev/shm, also when the first worker (the store's maker) was killed and the next
    generation made a store of its own."""
    pytest.importorskip("peft", reason="peft is not installed (pip install -e '.[test]')")
    before = {p.name for p in Path("/dev/shm").glob("zo2-node-*-frozen-*")}
    single = tmp_path / "single"
    train_job(job(single, "peft.method=lora"), quiet=True)
    run_dir = tmp_path / "run"
    seen: set[str] = set()

    def look(sched: Scheduler) -> None:  # the shared base's files while the workers train
        wait_for_steps(sched.run_dir, 2)
        seen.update(p.name for p in Path("/dev/shm").glob("zo2-node-*-frozen-*"))

    sched = run_scheduler(run_dir, "peft.method=lora", "parallel.pp=2", workers=2, action=look, fault=fault)
    assert sched.restarts == (fault is not None)
    made = seen - before
    assert made and len({n.split("-frozen-")[0] for n in made}) == 1  # one store for the node's two workers
    assert logged(run_dir) == logged(single)
    assert_same(final_weights(run_dir), final_weights(single))
    assert {p.name for p in Path("/dev/shm").glob("zo2-node-*-frozen-*")} <= before


@pytest.mark.slow
def test_one_matrix_at_a_time_with_two_sliced_workers_survives_kill_9(tmp_path, long_reference):
    run_dir = tmp_path / "run"
    sched = run_scheduler(run_dir, "parallel.pp=2", "optim.stream_granularity=matrix", f"train.steps={LONG}",
                          workers=2, action=_kill_worker_after(2))
    assert sched.restarts == 1
    assert logged(run_dir) == logged(long_reference)
    assert_same(final_weights(run_dir, LONG), final_weights(long_reference, LONG))


@pytest.mark.parametrize("at", [1, pytest.param(4, marks=pytest.mark.slow)])
def test_kill_9_at_a_random_step_loses_nothing(tmp_path, long_reference, at):
    run_dir = tmp_path / "run"
    sched = run_scheduler(run_dir, f"train.steps={LONG}", action=_kill_worker_after(at))
    assert sched.restarts == 1
    assert logged(run_dir) == logged(long_reference)
    assert_same(final_weights(run_dir, LONG), final_weights(long_reference, LONG))


def test_a_lagging_write_back_torn_by_a_kill_is_repaired_from_the_log(tmp_path, reference):
    """optim.writeback_every = 2: blocks go home every other step (and at each snapshot); rank 0 dies tearing
    block 1's write-back in step 5. The torn block is rebuilt, the blocks whose home lags are caught up from the
    log like any clean slice holding an older step, and the run ends equal to zo2 train's (K = 1)."""
    run_dir = tmp_path / "run"
    sched = run_scheduler(run_dir, "optim.writeback_every=2", fault="0:5:2")
    assert sched.restarts == 1
    (repair,) = sched.recoveries
    assert "signal 9" in repair["why"] and repair["rebuilt"] == 1 and repair["step"] == 5, repair
    assert logged(run_dir) == logged(reference)
    assert_same(final_weights(run_dir), final_weights(reference))
    lines = [m for m in read_metrics(run_dir) if m["kind"] == "train"]
    assert any(m["d2h_gb"] == 0 for m in lines[1:]) and any(m["replays"] > 0 for m in lines), lines


@pytest.mark.slow
def test_a_lagging_write_back_with_two_sliced_workers_survives_kill_9(tmp_path, long_reference):
    run_dir = tmp_path / "run"
    sched = run_scheduler(run_dir, "parallel.pp=2", "optim.writeback_every=3", f"train.steps={LONG}", workers=2,
                          action=_kill_worker_after(2))
    assert sched.restarts == 1
    assert logged(run_dir) == logged(long_reference)
    assert_same(final_weights(run_dir, LONG), final_weights(long_reference, LONG))


@pytest.mark.slow
def test_a_hung_worker_is_detected_by_its_missing_heartbeats(tmp_path, long_reference):
    run_dir = tmp_path / "run"
    sched = run_scheduler(run_dir, "control.heartbeat_timeout_s=3", f"train.steps={LONG}",
                          action=_kill_worker_after(2, signal.SIGSTOP))
    assert sched.restarts == 1
    assert_same(final_weights(run_dir, LONG), final_weights(long_reference, LONG))


@pytest.fixture(scope="module")
def adam_reference(tmp_path_factory):
    """The uninterrupted single-process run with zo-adam."""
    run_dir = tmp_path_factory.mktemp("adam") / "run"
    train_job(job(run_dir, "optim.optimizer=zo-adam"), quiet=True)
    return run_dir


@pytest.mark.parametrize("optimizer, granularity", [("zo-adam", "block"),
                                                    pytest.param("zo-adam", "matrix", marks=pytest.mark.slow),
                                                    pytest.param("zo-sgd-momentum", "block", marks=pytest.mark.slow),
                                                    pytest.param("zo-sgd-sign", "block", marks=pytest.mark.slow)])
def test_other_optimizers_run_and_are_repaired_under_the_scheduler(tmp_path, optimizer, granularity):
    """Momentum and Adam: the state is snapshotted from the scheduler's state area and, after a failure, rebuilt
    with the weights from the snapshot and the log; sign: its own rule replays the log. Equal to zo2 train (by
    block), optimizer state included, also when the workers stream one matrix at a time (Adam's state piece by
    piece from the state area)."""
    extra = (f"optim.optimizer={optimizer}", f"optim.stream_granularity={granularity}")
    single = tmp_path / "single"
    train_job(job(single, extra[0]), quiet=True)
    expected = final_weights(single)
    assert any(n.startswith("optimizer/") for n in expected) == (optimizer != "zo-sgd-sign")
    plain = tmp_path / "plain"
    run_scheduler(plain, *extra)
    assert logged(plain) == logged(single)
    assert_same(final_weights(plain), expected)
    torn = tmp_path / "torn"
    sched = run_scheduler(torn, *extra, fault="0:4:2")
    (repair,) = sched.recoveries
    assert "signal 9" in repair["why"] and repair["rebuilt"] >= 1, repair
    assert logged(torn) == logged(single)
    assert_same(final_weights(torn), expected)


def test_a_killed_scheduler_resumes_adam_from_its_snapshot_and_the_log(tmp_path, adam_reference):
    """The state after the snapshot exists nowhere but in the dead worker: the resumed scheduler replays the log's
    tail on the snapshot's weights and state."""
    run_dir = tmp_path / "run"
    proc = _launch(run_dir, "optim.optimizer=zo-adam")
    wait_for_steps(run_dir, 5, proc=proc)  # past the snapshot at step 3
    proc.kill()
    proc.communicate(timeout=60)
    assert len(read_log(run_dir / "trajectory.jsonl")) > 3 and snapshot_path(run_dir, 3).is_file()
    proc = _launch(run_dir, "optim.optimizer=zo-adam")
    out, _ = proc.communicate(timeout=180)
    assert proc.returncode == 0, out
    assert logged(run_dir) == logged(adam_reference)
    assert_same(final_weights(run_dir), final_weights(adam_reference))


@pytest.mark.slow
@pytest.mark.parametrize("granularity", ["block", "matrix"])
def test_two_workers_split_adams_state_like_the_weights_and_a_torn_slice_is_repaired(tmp_path, adam_reference,
                                                                                     granularity):
    """Each worker streams its slice of a block's (a piece's) Adam state from the node's state area beside its
    slice of the weights; equal to the single-process run, also after a worker dies mid-write-back."""
    extra = ("optim.optimizer=zo-adam", "parallel.pp=2", f"optim.stream_granularity={granularity}")
    plain = tmp_path / "plain"
    run_scheduler(plain, *extra, workers=2)
    assert logged(plain) == logged(adam_reference)
    assert_same(final_weights(plain), final_weights(adam_reference))
    torn = tmp_path / "torn"
    sched = run_scheduler(torn, *extra, workers=2, fault="1:2:3")
    (repair,) = sched.recoveries
    assert "signal 9" in repair["why"], repair
    assert_same(final_weights(torn), final_weights(adam_reference))


def test_restarts_are_bounded(tmp_path):
    sched = Scheduler(job(tmp_path / "run", "control.max_restarts=0"), workers=1, quiet=True, fault="0:1:1")
    from zo2.control.scheduler import WorkerFailure
    with pytest.raises(WorkerFailure, match="max_restarts"):
        sched.run()
    assert len(read_log(tmp_path / "run" / "trajectory.jsonl")) == 1  # step 0 stays logged


def _launch(run_dir: Path, *extra: str) -> subprocess.Popen:
    sets = [a for s in [*BASE, f"run.out_dir={run_dir}", *extra] for a in ("--set", s)]
    return subprocess.Popen([sys.executable, "-m", "zo2", "launch", "--nproc-per-node", "1", "--", "--quiet", *sets],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def test_sigterm_writes_a_consistent_snapshot_and_the_same_command_resumes(tmp_path, long_reference):
    steps, reference = LONG, long_reference
    run_dir = tmp_path / "run"
    proc = _launch(run_dir, f"train.steps={steps}")
    wait_for_steps(run_dir, 2, proc=proc)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, out
    stopped = len(read_log(run_dir / "trajectory.jsonl"))
    assert 2 <= stopped < steps, out
    assert snapshot_path(run_dir, stopped).is_file(), out
    assert "resume" in out
    proc = _launch(run_dir, f"train.steps={steps}")  # the same command again
    out, _ = proc.communicate(timeout=180)
    assert proc.returncode == 0, out
    assert f"resuming at step {stopped}" in out
    assert logged(run_dir) == logged(reference)
    assert_same(final_weights(run_dir, steps), final_weights(reference, steps))


def test_a_corrupt_latest_snapshot_falls_back_to_the_previous_one(tmp_path, reference):
    run_dir = tmp_path / "run"
    run_scheduler(run_dir, "train.steps=4")
    latest = snapshot_path(run_dir, 4)
    latest.write_bytes(latest.read_bytes()[:200])  # truncated
    with pytest.warns(Warning, match="step_00000004"):
        run_scheduler(run_dir)  # resumes from snapshot 3 + the log
    assert_same(final_weights(run_dir), final_weights(reference))


def test_a_corrupt_trajectory_log_stops_with_a_clear_error(tmp_path):
    run_dir = tmp_path / "run"
    run_scheduler(run_dir, "train.steps=3")
    log = run_dir / "trajectory.jsonl"
    lines = log.read_bytes().splitlines(keepends=True)
    log.write_bytes(lines[0] + lines[1].replace(b'"loss"', b'"lOss"') + lines[2])
    from zo2.errors import CheckpointError
    with pytest.raises(CheckpointError, match="trajectory"):
        Scheduler(job(run_dir), workers=1, quiet=True).run()


# ----------------------------------------------------------------------------------------------------------
# The endpoint accepts only the run's workers
# ----------------------------------------------------------------------------------------------------------

def test_the_endpoint_binds_to_loopback_and_rejects_a_wrong_token(caplog):
    token = new_token()
    channel = SchedulerChannel("127.0.0.1", token)
    try:
        assert channel.endpoint.startswith("tcp://127.0.0.1:")
        stray = WorkerLink(channel.endpoint, "0" * 32, rank=0)
        good = WorkerLink(channel.endpoint, token, rank=0)
        stray.send({"type": "register", "pid": 1})
        good.send({"type": "register", "pid": 2})
        got = None
        for _ in range(50):  # the two messages may arrive in either order: wait for both to be handled
            got = channel.receive(100) or got
            if got is not None and channel.rejected:
                break
        assert got is not None and got[1]["pid"] == 2  # only the run's worker gets through
        assert channel.rejected == 1
        assert "rejected" in caplog.text
        assert stray.receive(2000)["type"] == "rejected"
        stray.socket.send(b"not json")
        assert channel.receive(1000) is None and channel.rejected == 2
        stray.close()
        good.close()
    finally:
        channel.close()


def test_a_stray_connection_during_a_run_is_rejected_and_the_run_finishes(tmp_path, reference):
    def intrude(sched: Scheduler) -> None:
        wait_for_steps(sched.run_dir, 1)
        link = WorkerLink(sched.channel.endpoint, "f" * 32, rank=0)
        link.send({"type": "step", "record": {"step": 99}, "result": {}})
        link.send({"type": "register", "pid": 123})
        link.close()
    run_dir = tmp_path / "run"
    sched = run_scheduler(run_dir, action=intrude)
    assert sched.channel is None  # closed
    assert sched.rejected == 2  # both messages of the stray connection were dropped
    assert logged(run_dir) == logged(reference)


def test_malformed_floods_and_oversized_messages_cannot_stop_or_flood_the_scheduler(tmp_path, reference, caplog):
    """A message that makes the JSON decoder recurse too deep, 300 junk messages and one over the size limit: the
    run finishes as if nothing happened, the log holds a few lines about them, not 300."""
    import zmq

    from zo2.control.protocol import MAX_MESSAGE_BYTES, WARN_FIRST

    def intrude(sched: Scheduler) -> None:
        wait_for_steps(sched.run_dir, 1)
        ctx = zmq.Context()
        sock = ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 1000)
        sock.connect(sched.channel.endpoint)
        sock.send(b"[" * 2000)  # RecursionError inside json.loads
        for i in range(300):
            sock.send(b"junk %d" % i)
        sock.send(b"x" * (2 * MAX_MESSAGE_BYTES))  # the connection is dropped, nothing buffered
        sock.close()
        ctx.term()
    run_dir = tmp_path / "run"
    with caplog.at_level("WARNING", logger="zo2.control"):
        sched = run_scheduler(run_dir, action=intrude)
    assert sched.rejected >= 301
    lines = [r for r in caplog.records if "rejected" in r.getMessage()]
    assert WARN_FIRST <= len(lines) <= WARN_FIRST + 2, [r.getMessage() for r in lines]
    assert any(f"({sched.rejected} in all)" in r.getMessage() for r in lines)  # the summary at the end
    assert logged(run_dir) == logged(reference)


def test_a_full_disk_under_zo2_launch_is_one_error_and_cleans_up(tmp_path, mounts):
    """The run folder's disk fills while the scheduler appends the log: one CheckpointError naming the folder and
    its free space, the steps before it kept, and no /dev/shm store or config file of this scheduler left."""
    from zo2_testing import fill_disk_after

    disk = mounts.small_disk(8)
    run_dir = disk / "run"
    sched = Scheduler(job(run_dir, "train.steps=40", "checkpoint.save_every=0"), workers=1, quiet=True)
    filler = fill_disk_after(run_dir, 2, disk)
    with pytest.raises(CheckpointError, match=r"No space left on device while .* GB free there"):
        sched.run()
    filler.join(timeout=60)
    assert 2 <= len(read_log(run_dir / "trajectory.jsonl")) < 40
    assert not sched.config_path.exists()
    assert not list(Path("/dev/shm").glob(f"zo2-node-{os.getpid()}-*"))


def test_a_deleted_log_is_refused_not_restarted_from_step_zero(tmp_path):
    """The same command after the trajectory log was deleted: refused (as zo2 train --resume refuses), instead of a
    new run from step 0 beside the newer snapshots with every step logged twice in metrics.jsonl."""
    from zo2_launcher.cli import main

    run_dir = tmp_path / "run"
    run_scheduler(run_dir)
    (run_dir / "trajectory.jsonl").unlink()
    metrics = (run_dir / "metrics.jsonl").read_text()
    with pytest.raises(CheckpointError, match="trajectory log is missing"):
        Scheduler(job(run_dir), workers=1, quiet=True).run()
    assert (run_dir / "metrics.jsonl").read_text() == metrics
    assert main(["train", "--quiet", "--resume", str(run_dir)]) == 2


def test_the_workers_listen_on_loopback_only(tmp_path, reference):
    """A single-node zo2 launch: no socket of a worker (the rendezvous store on rank 0, gloo's pairs) nor of the
    scheduler listens on a non-loopback address."""
    import ipaddress

    import psutil

    listening: dict[int, list[str]] = {}

    def inspect(sched: Scheduler) -> None:
        wait_for_steps(sched.run_dir, 2)
        for pid in [os.getpid(), *(p.popen.pid for p in sched.procs)]:
            conns = psutil.Process(pid).net_connections(kind="inet")
            listening[pid] = [c.laddr.ip for c in conns if c.status == psutil.CONN_LISTEN]
    run_dir = tmp_path / "run"
    run_scheduler(run_dir, "parallel.pp=2", workers=2, action=inspect)
    assert len(listening) == 3 and any(listening.values()), listening  # the store did listen somewhere
    wide = {pid: ips for pid, ips in listening.items() if not all(ipaddress.ip_address(ip).is_loopback for ip in ips)}
    assert not wide, f"listening beyond loopback: {wide}"


def test_sigusr1_writes_a_snapshot_between_the_regular_ones(tmp_path, long_reference):
    def ask(sched: Scheduler) -> None:
        wait_for_steps(sched.run_dir, 1)
        os.kill(os.getpid(), signal.SIGUSR1)  # the scheduler runs in this process's main thread
    run_dir = tmp_path / "run"
    # regular snapshots: only the final one
    run_scheduler(run_dir, "checkpoint.save_every=0", f"train.steps={LONG}", action=ask)
    steps = {int(p.stem.split("_")[1]) for p in list_snapshots(run_dir)}
    assert LONG in steps and len(steps) == 2 and min(steps) >= 2, steps  # one more, where the signal arrived
    assert_same(final_weights(run_dir, LONG), final_weights(long_reference, LONG))


def test_a_configuration_error_in_a_worker_stops_the_run_with_its_message(tmp_path):
    from zo2.control.scheduler import WorkerFailure

    sched = Scheduler(job(tmp_path / "run", "data.path=/no/such/file.jsonl"), workers=1, quiet=True)
    with pytest.raises(WorkerFailure, match="does not exist"):
        sched.run()
    assert sched.restarts == 0  # not retried: a restart would only repeat it


def test_a_start_up_failure_stops_at_once_and_the_corrected_command_starts_the_run(tmp_path, monkeypatch):
    """Every worker dies of an ImportError before its first step: no restarts (a restart would repeat it), one
    clear error; the run folder holds no steps, so the corrected command — with other settings — starts the run
    without --overwrite."""
    from zo2.control.scheduler import WorkerFailure
    from zo2_launcher.cli import main

    broken = tmp_path / "broken" / "zo2_kernels"
    broken.mkdir(parents=True)
    (broken / "__init__.py").write_text("raise ImportError('zo2_kernels is broken in this environment')\n")
    monkeypatch.setenv("PYTHONPATH", str(broken.parent))  # the workers import this one first
    run_dir = tmp_path / "run"
    sched = Scheduler(job(run_dir, "control.max_restarts=3", "parallel.pp=2"), workers=2, quiet=True)
    started = time.monotonic()
    with pytest.raises(WorkerFailure, match="before its first step"):
        sched.run()
    assert sched.restarts == 0 and time.monotonic() - started < 120
    monkeypatch.delenv("PYTHONPATH")
    sets = [a for kv in [*BASE, "optim.lr=2e-3"] for a in ("--set", kv)]
    assert main(["launch", "--nproc-per-node", "1", "--", "--out", str(run_dir), "--quiet", *sets]) == 0
    assert len(read_log(run_dir / "trajectory.jsonl")) == STEPS
    assert "lr = 0.002" in (run_dir / "config.toml").read_text()


def test_the_conservative_optimizer_runs_under_the_scheduler_and_survives_a_kill(tmp_path):
    extra = ("optim.optimizer=zo-sgd-conservative", f"train.steps={LONG}")
    reference = tmp_path / "reference"
    train_job(job(reference, *extra), quiet=True)
    run_dir = tmp_path / "run"
    sched = run_scheduler(run_dir, *extra, action=_kill_worker_after(3))
    assert sched.restarts == 1
    assert logged(run_dir) == logged(reference)
    assert_same(final_weights(run_dir, LONG), final_weights(reference, LONG))


def _children(pid: int) -> list[int]:
    kids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            kids.append(int(stat.parent.name))
    return kids


def test_a_scheduler_killed_while_its_workers_start_leaves_no_worker_behind(tmp_path):
    """SIGKILL to the scheduler as soon as its workers exist (they are still importing torch): they go too, within
    seconds, instead of waiting control.start_timeout_s for a registration answer."""
    proc = _launch(tmp_path / "run")
    end = time.monotonic() + 120
    while not (workers := _children(proc.pid)) and time.monotonic() < end:
        time.sleep(0.02)
    assert workers, "the scheduler started no worker"
    time.sleep(0.5)
    proc.kill()
    proc.communicate(timeout=60)
    end = time.monotonic() + 20
    alive = workers
    while alive and time.monotonic() < end:
        alive = [w for w in workers if Path(f"/proc/{w}").exists()
                 and "zombie" not in Path(f"/proc/{w}/status").read_text().lower()]
        time.sleep(0.1)
    assert not alive, "workers outlived a scheduler killed while they started"


def test_a_killed_scheduler_takes_its_workers_along_and_the_same_command_resumes(tmp_path, reference):
    run_dir = tmp_path / "run"
    proc = _launch(run_dir)
    wait_for_steps(run_dir, 2, proc=proc)
    workers = _children(proc.pid)
    assert workers
    proc.kill()  # SIGKILL: no snapshot, no cleanup
    proc.communicate(timeout=60)
    end = time.monotonic() + 15
    while any(Path(f"/proc/{w}").exists() and "zombie" not in Path(f"/proc/{w}/status").read_text().lower()
              for w in workers) and time.monotonic() < end:
        time.sleep(0.1)
    assert not [w for w in workers if Path(f"/proc/{w}").exists()
                and "zombie" not in Path(f"/proc/{w}/status").read_text().lower()], "workers outlived the scheduler"
    leftovers = list(Path("/dev/shm").glob(f"zo2-node-{proc.pid}-*"))
    assert leftovers  # the dead scheduler's store is still in shared memory...
    proc = _launch(run_dir)  # ...until the same command runs again: it resumes from the log and removes them
    out, _ = proc.communicate(timeout=180)
    assert proc.returncode == 0, out
    assert not [p for p in leftovers if p.exists()]
    assert logged(run_dir) == logged(reference)
    assert_same(final_weights(run_dir), final_weights(reference))


@pytest.mark.slow
def test_the_fault_trial_script_runs_and_finds_every_trial_identical(tmp_path):
    """benchmarks/bench_chaos.py, one trial of each fault kind: every trial ends bit-identical to the uninterrupted
    run (or with a clear error), none different."""
    import json

    repo = Path(__file__).resolve().parents[2]
    out = tmp_path / "chaos.json"
    proc = subprocess.run([sys.executable, str(repo / "benchmarks" / "bench_chaos.py"), "--trials", "1", "--out",
                           str(out)], capture_output=True, text=True, timeout=1200,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = json.loads(out.read_text())["summary"]
    assert len(summary) == 7 and all(r["different"] == 0 and r["identical"] + r["clear error"] == 1 for r in summary)
