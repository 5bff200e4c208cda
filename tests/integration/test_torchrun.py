"""`torchrun -m zo2 train` with perturbation and data parallelism: one run folder, the single-process result."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from zo2.config import load_config
from zo2.train.checkpoint import read_log
from zo2.train.trainer import train_job

JOB = ["train.steps=6", "train.log_every=2", "train.eval_every=0", "train.eval_batches=1",
       "checkpoint.save_every=3", "checkpoint.fsync=false", "run.plot=false", "data.batch_size=8"]


def _torchrun(run_dir: Path, nproc: int, *extra: str) -> subprocess.CompletedProcess:
    sets = [a for kv in [*JOB, *extra] for a in ("--set", kv)]
    env = {**os.environ, "GLOO_SOCKET_IFNAME": "lo", "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
           "-m", "zo2", "train", "--out", str(run_dir), "--quiet", *sets]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("single") / "run"
    train_job(load_config(overrides=[*JOB, f"run.out_dir={run_dir}"]), quiet=True)
    return run_dir


def _weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run_dir / "final" / "model.safetensors"))


def test_perturbation_parallel_torchrun_equals_one_process(single, tmp_path):
    run_dir = tmp_path / "run"
    proc = _torchrun(run_dir, 2, "parallel.pp=2")
    assert proc.returncode == 0, proc.stderr[-3000:]
    a, b = _weights(single), _weights(run_dir)
    assert all(torch.equal(a[n], b[n]) for n in a)
    assert read_log(single / "trajectory.jsonl") == read_log(run_dir / "trajectory.jsonl")
    assert proc.stderr.count("done: 6 steps") == 1  # only rank 0 reports (progress and logs go to stderr)


def test_data_parallel_torchrun_follows_one_process(single, tmp_path):
    run_dir = tmp_path / "run"
    proc = _torchrun(run_dir, 2, "parallel.dp=2")
    assert proc.returncode == 0, proc.stderr[-3000:]
    ref, got = read_log(single / "trajectory.jsonl"), read_log(run_dir / "trajectory.jsonl")
    assert len(got) == len(ref) == 6
    for r, g in zip(ref, got):
        assert g["loss"] == pytest.approx(r["loss"], rel=1e-5)  # per-shard forwards round differently


def test_wrong_sizes_exit_2_with_the_sizes(tmp_path):
    proc = _torchrun(tmp_path / "run", 2, "parallel.pp=2", "parallel.dp=2")
    assert proc.returncode != 0
    assert "parallel.dp × parallel.pp = 2 × 2 = 4, but the job has 2 processes" in proc.stderr


@pytest.mark.parametrize("mode", [[], ["--torchrun"]], ids=["scheduler", "torchrun"])
def test_zo2_launch_runs_the_job_on_n_processes(single, tmp_path, mode):
    run_dir = tmp_path / "run"
    sets = [a for kv in [*JOB, "parallel.pp=2"] for a in ("--set", kv)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-m", "zo2", "launch", *mode, "--nproc-per-node", "2", "--", "--out",
                           str(run_dir), "--quiet", *sets], capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    a, b = _weights(single), _weights(run_dir)
    assert all(torch.equal(a[n], b[n]) for n in a)


def test_data_parallel_resume_is_bit_identical(tmp_path):
    full, part = tmp_path / "full", tmp_path / "part"
    assert _torchrun(full, 2, "parallel.dp=2").returncode == 0
    assert _torchrun(part, 2, "parallel.dp=2", "train.steps=4").returncode == 0
    env = {**os.environ, "GLOO_SOCKET_IFNAME": "lo", "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
                           "-m", "zo2", "train", "--resume", str(part), "--quiet", "--set", "train.steps=6"],
                          capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    a, b = _weights(full), _weights(part)
    assert all(torch.equal(a[n], b[n]) for n in a)
    assert read_log(full / "trajectory.jsonl") == read_log(part / "trajectory.jsonl")
