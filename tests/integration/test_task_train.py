"""Training on a MeZO task (the [task] section): its loss, periodic metric and best checkpoint, also under the
scheduler."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from safetensors.torch import load_file

from zo2.config import load_config
from zo2.control.scheduler import Scheduler
from zo2.train.checkpoint import read_log
from zo2.train.trainer import train_job

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "tasks"
TASK = ["task.name=sst2", f"task.path={FIXTURES / 'sst2'}", "task.num_dev=2", "data.batch_size=2",
        "train.steps=4", "train.eval_every=2", "train.log_every=2", "checkpoint.save_every=2", "run.plot=false",
        "checkpoint.fsync=false", "control.heartbeat_s=0.2"]


def job(run_dir: Path, *extra: str):
    return load_config(overrides=[*TASK, f"run.out_dir={run_dir}", *extra])


@pytest.fixture(scope="module")
def task_run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("task") / "run"
    summary = train_job(job(run_dir), quiet=True)
    return run_dir, summary


def test_a_task_run_logs_its_metric_and_keeps_the_best_weights(task_run):
    run_dir, summary = task_run
    evals = [json.loads(l) for l in (run_dir / "metrics.jsonl").read_text().splitlines()]
    evals = [e for e in evals if e["kind"] == "eval"]
    assert [e["step"] for e in evals] == [0, 2, 4]
    assert all(e["metric"] == "accuracy" and 0 <= e["eval_accuracy"] <= 1 and e["eval_examples"] == 2
               for e in evals)
    best = json.loads((run_dir / "best.json").read_text())
    top = max(evals, key=lambda e: (e["eval_accuracy"], -e["step"]))  # the first of the best
    assert best == {"step": top["step"], "metric": "accuracy", "value": top["eval_accuracy"]}
    assert summary.best == best
    assert load_file(str(run_dir / "best" / "model.safetensors"))  # a loadable model folder
    # the candidate-scoring loss of two candidates starts near log 2
    assert abs(read_log(run_dir / "trajectory.jsonl")[0]["loss"] - 0.693) < 0.05


def test_a_task_run_under_the_scheduler_takes_the_same_steps(task_run, tmp_path):
    reference, _ = task_run
    run_dir = tmp_path / "run"
    assert Scheduler(job(run_dir, "run.save_final=false"), workers=1, quiet=True).run() == 0
    assert read_log(run_dir / "trajectory.jsonl") == read_log(reference / "trajectory.jsonl")
    evals = [json.loads(l) for l in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [e["step"] for e in evals if e["kind"] == "eval"] == [0, 2, 4]
    assert json.loads((run_dir / "best.json").read_text()) == json.loads((reference / "best.json").read_text())
    best = load_file(str(run_dir / "best" / "model.safetensors"))
    ref = load_file(str(reference / "best" / "model.safetensors"))
    assert best.keys() == ref.keys() and all((best[k] == ref[k]).all() for k in best)
