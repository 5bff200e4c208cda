"""Multi-process runs whose blocks stream (sliced transfers over the node's shared store) finish under torchrun in
every end-of-run configuration: every rank enters the same collectives in the same order (snapshots, evaluation,
final weights, plots, PEFT, each optimizer, a MeZO task), the PertP run equals one process bit for bit, and a rank
that leaves early makes the others stop with a clear error instead of hanging."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from zo2.config import load_config
from zo2.train.checkpoint import load_snapshot, read_log, snapshot_path
from zo2.train.trainer import train_job

HERE = Path(__file__).resolve().parent
SCRIPT = HERE / "torchrun_jobs.py"
FIXTURES = HERE.parent / "fixtures" / "tasks"
STEPS = 4
BASE = [f"train.steps={STEPS}", "data.batch_size=4", "data.max_length=32", "checkpoint.fsync=false",
        "train.log_every=2", "optim.offload=true", "checkpoint.save_every=0", "train.eval_batches=0",
        "run.plot=false", "run.save_final=false"]
"""The issue's command (streamed blocks, no snapshots, no evaluation, no plot), shortened; cases add to it."""

CASES = {
    "plain": [],
    "snapshots-eval-plot-final": ["checkpoint.save_every=2", "train.eval_batches=1", "train.eval_every=2",
                                  "run.plot=true", "run.save_final=true"],
    "snapshot-off-boundary": ["checkpoint.save_every=3", "train.eval_batches=1", "checkpoint.keep_last=1"],
    "checksums": ["parallel.checksum_every=1", "checkpoint.save_every=1"],
    "resident": ["optim.offload=false", "checkpoint.save_every=2", "train.eval_batches=1", "run.save_final=true"],
    "zo-sgd-momentum": ["optim.optimizer=zo-sgd-momentum", "checkpoint.save_every=2"],
    "zo-adam": ["optim.optimizer=zo-adam", "train.eval_batches=1", "run.save_final=true"],
    "zo-sgd-sign": ["optim.optimizer=zo-sgd-sign", "checkpoint.save_every=3"],
    "lora": ["peft.method=lora", "checkpoint.save_every=2", "train.eval_batches=1", "run.save_final=true"],
    "task": ["task.name=sst2", f"task.path={FIXTURES / 'sst2'}", "task.num_dev=2", "data.batch_size=2",
             "train.eval_every=2", "run.save_final=true"],
}
"""End-of-run options crossed with optimizers, PEFT and a task: each case is a short run, all in one process group.
(zo-sgd-conservative evaluates an odd number of points, which PertP refuses: it runs in the data-parallel matrix.)"""


def _env(**extra: str) -> dict[str, str]:
    return {**os.environ, "GLOO_SOCKET_IFNAME": "lo", "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
            "ZO2_TEST_TIMEOUT_S": "120", **extra}


def _run_cases(tmp_path: Path, nproc: int, cases: dict[str, list[str]], *extra: str) -> dict[str, dict]:
    """Run ``cases`` under torchrun with ``nproc`` processes; rank 0's result per case (a hang fails the test)."""
    spec = [{"name": name, "sets": [*BASE, *sets, *extra]} for name, sets in cases.items()]
    tmp_path.mkdir(parents=True, exist_ok=True)
    cases_file = tmp_path / "cases.json"
    cases_file.write_text(json.dumps(spec))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
           str(SCRIPT), str(cases_file), str(tmp_path / "runs")]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=240 + 40 * len(cases), env=_env())
    except subprocess.TimeoutExpired as exc:
        raise AssertionError(f"the torchrun job hung: {(exc.stdout or b'')[-3000:]!r}") from None
    results = {}
    for line in proc.stdout.splitlines():
        if line.startswith("{"):
            r = json.loads(line)
            results.setdefault(r["case"], r)
    failed = {k: v for k, v in results.items() if not v["ok"]}
    assert proc.returncode == 0 and not failed, (failed, proc.stderr[-4000:])
    assert set(results) == set(cases), proc.stderr[-3000:]
    return results


def _final(run_dir: Path) -> dict[str, torch.Tensor]:
    tensors, _ = load_snapshot(snapshot_path(run_dir, STEPS))
    return tensors


def _single(tmp_path: Path, name: str, sets: list[str]) -> Path:
    run_dir = tmp_path / "single" / name
    train_job(load_config(overrides=[*BASE, *sets, f"run.out_dir={run_dir}"]), quiet=True)
    return run_dir


def test_perturbation_parallel_matrix_finishes_and_equals_one_process(tmp_path):
    _run_cases(tmp_path, 2, CASES, "parallel.pp=2")
    for name, sets in CASES.items():
        got, ref = tmp_path / "runs" / name, _single(tmp_path, name, sets)
        assert read_log(got / "trajectory.jsonl") == read_log(ref / "trajectory.jsonl"), name
        a, b = _final(ref), _final(got)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
        if "run.save_final=true" in sets:
            assert (got / "final").is_dir(), name
        if "run.plot=true" in sets:
            assert (got / "loss.png").is_file(), name


DP_CASES = {**{k: CASES[k] for k in ("plain", "snapshots-eval-plot-final", "zo-adam", "lora")},
            "zo-sgd-conservative": ["optim.optimizer=zo-sgd-conservative", "train.eval_batches=1"]}


def test_data_parallel_matrix_finishes(tmp_path):
    _run_cases(tmp_path, 2, DP_CASES, "parallel.dp=2")
    for name in DP_CASES:
        assert len(read_log(tmp_path / "runs" / name / "trajectory.jsonl")) == STEPS
        assert set(_final(tmp_path / "runs" / name))


@pytest.mark.slow  # the pp and dp matrices stay in the default run
def test_two_dimensional_matrix_finishes_on_four_processes(tmp_path):
    cases = {k: CASES[k] for k in ("plain", "snapshots-eval-plot-final", "zo-sgd-momentum", "lora")}
    _run_cases(tmp_path, 4, cases, "parallel.dp=2", "parallel.pp=2")
    for name in cases:
        assert len(read_log(tmp_path / "runs" / name / "trajectory.jsonl")) == STEPS


def test_the_issue_command_finishes(tmp_path):
    """The command line as a user types it: torchrun -m zo2 train with streamed blocks and PertP."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", "-m", "zo2", "train",
           "--quiet", "--out", str(tmp_path / "run"), "--set", "train.steps=20", "--set", "parallel.pp=2", "--set",
           "optim.offload=true", "--set", "checkpoint.save_every=0", "--set", "train.eval_batches=0", "--set",
           "run.plot=false", "--set", "data.max_length=32"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=_env(), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert len(read_log(tmp_path / "run" / "trajectory.jsonl")) == 20


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start_ranks(tmp_path: Path, world: int, case: dict, timeout_s: int) -> list[subprocess.Popen]:
    """The ranks as separate processes with no torchrun agent, so nothing but zo2 itself stops the survivors."""
    tmp_path.mkdir(parents=True, exist_ok=True)
    cases_file = tmp_path / "cases.json"
    cases_file.write_text(json.dumps([case]))
    port = _free_port()
    procs = []
    for rank in range(world):
        env = _env(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world),
                   MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), ZO2_TEST_TIMEOUT_S=str(timeout_s))
        procs.append(subprocess.Popen([sys.executable, str(SCRIPT), str(cases_file), str(tmp_path / "runs")],
                                      env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    return procs


def _finish(procs: list[subprocess.Popen], limit: float) -> list[tuple[int, str]]:
    end = time.monotonic() + limit
    out = []
    for p in procs:
        try:
            stdout, _ = p.communicate(timeout=max(end - time.monotonic(), 1))
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            raise AssertionError("a rank hung after another left the run") from None
        out.append((p.returncode, stdout))
    return out


def _errors(stdout: str) -> list[str]:
    return [json.loads(line)["error"] for line in stdout.splitlines() if line.startswith("{")]


@pytest.mark.parametrize("mode", ["pp", "dp"])
def test_a_rank_that_leaves_early_stops_every_rank_with_a_clear_error(tmp_path, mode):
    case = {"name": "early", "sets": [*BASE, f"parallel.{mode}=2", "checkpoint.save_every=1"],
            "fail_rank": 1, "fail_step": 2}
    (rc0, out0), (rc1, out1) = _finish(_start_ranks(tmp_path, 2, case, timeout_s=60), limit=180)
    assert rc1 != 0 and any("InjectedFailure" in e for e in _errors(out1))
    assert rc0 != 0
    errors = _errors(out0)
    assert errors and errors[0].startswith("RankFailure") and "lost contact with another rank" in errors[0], out0


def test_a_rank_stopped_by_a_signal_stops_every_rank(tmp_path):
    """SIGTERM to one rank mid-run (a scheduler's stop, a preempted node): the other stops with RankFailure."""
    case = {"name": "signal", "sets": [*BASE, "parallel.pp=2", "train.steps=400", "checkpoint.save_every=5"]}
    procs = _start_ranks(tmp_path, 2, case, timeout_s=60)
    log = tmp_path / "runs" / "signal" / "trajectory.jsonl"
    end = time.monotonic() + 180
    while time.monotonic() < end and not (log.exists() and len(read_log(log)) >= 3):
        time.sleep(0.1)
    procs[1].send_signal(signal.SIGTERM)
    (rc0, out0), (rc1, _) = _finish(procs, limit=150)
    assert rc1 == -signal.SIGTERM
    assert rc0 != 0 and any(e.startswith("RankFailure") for e in _errors(out0)), out0


def test_a_killed_jobs_shared_store_is_removed_by_the_next_run(tmp_path):
    """A torchrun job with sliced transfers killed mid-run (as a hung job's SIGTERM/SIGKILL leaves it) leaves its
    /dev/shm store; it is named after the node's first process, so the next such run sees it is stale and removes
    it."""
    case = {"name": "killed", "sets": [*BASE, "parallel.pp=2", "train.steps=400", "optim.optimizer=zo-adam"]}
    procs = _start_ranks(tmp_path / "first", 2, case, timeout_s=60)
    log = tmp_path / "first" / "runs" / "killed" / "trajectory.jsonl"
    end = time.monotonic() + 180
    while time.monotonic() < end and not (log.exists() and len(read_log(log)) >= 2):
        time.sleep(0.1)
    left = sorted(Path("/dev/shm").glob(f"zo2-node-{procs[0].pid}-*"))
    for p in procs:
        p.send_signal(signal.SIGKILL)
        p.communicate(timeout=60)
    assert left and all(p.exists() for p in left)  # weights and the Adam state area
    _run_cases(tmp_path / "second", 2, {"plain": []}, "parallel.pp=2")
    assert not [p for p in left if p.exists()]
