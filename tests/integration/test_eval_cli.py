"""``zo2 eval``: a run folder's snapshot on its held-out batches and on a MeZO task."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from zo2.config import load_config
from zo2.train.trainer import train_job
from zo2_launcher.cli import main

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "tasks"


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("eval") / "run"
    job = load_config(overrides=["train.steps=4", "checkpoint.save_every=2", "checkpoint.keep_last=3",
                                 "train.eval_every=2", "run.plot=false", "checkpoint.fsync=false",
                                 f"run.out_dir={run_dir}"])
    train_job(job, quiet=True)
    return run_dir


def _eval(capsys, *argv: str) -> dict:
    assert main(["eval", *argv, "--quiet"]) == 0
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def test_held_out_loss_equals_the_one_logged_during_training(run_dir, capsys):
    logged = {r["step"]: r["eval_loss"] for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())
              if r["kind"] == "eval"}
    assert _eval(capsys, str(run_dir))["eval_loss"] == pytest.approx(logged[4], rel=1e-6)
    assert _eval(capsys, str(run_dir), "--step", "2")["eval_loss"] == pytest.approx(logged[2], rel=1e-6)


@pytest.mark.parametrize("task, metric", [("SST2", "accuracy"), ("SQuAD", "f1")])
def test_a_task_reports_its_metric(run_dir, capsys, task, metric):
    result = _eval(capsys, str(run_dir), "--task", task, "--task-path", str(FIXTURES / task.lower()))
    assert result["metric"] == metric and 0.0 <= result[metric] <= 1.0 and result["examples"] >= 2


def test_a_folder_that_is_neither_a_run_nor_a_model_is_refused(tmp_path, capsys):
    assert main(["eval", str(tmp_path)]) == 2
    assert "neither a zo2 run folder" in capsys.readouterr().err


def test_a_model_folder_evaluates_with_the_model_s_own_length(run_dir, capsys):
    """final/ is a Hugging Face model folder (here without tokenizer files: the byte tokenizer is used)."""
    result = _eval(capsys, str(run_dir / "final"), "--task", "SST2", "--task-path", str(FIXTURES / "sst2"))
    assert result["target"] == str(run_dir / "final") and result["examples"] >= 2
    from_run = _eval(capsys, str(run_dir), "--task", "SST2", "--task-path", str(FIXTURES / "sst2"))
    assert result["accuracy"] == from_run["accuracy"]  # the same weights: final/ is the last snapshot's
