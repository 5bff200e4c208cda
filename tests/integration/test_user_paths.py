"""What a new user meets around a run: read-only folders, interrupted commands, long replays, rotated snapshots,
warnings and messages. Each path ends in one clear line or does the job; none shows a traceback."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest

from zo2.config import load_config
from zo2.train.checkpoint import CheckpointWarning, list_snapshots, read_log
from zo2.train.trainer import train_job
from zo2_launcher.cli import main

FAST = ["train.steps=6", "train.eval_batches=1", "train.eval_every=0", "checkpoint.fsync=false", "run.plot=false",
        "checkpoint.save_every=2", "checkpoint.keep_last=1", "data.max_length=32"]


def sets(*extra: str) -> list[str]:
    return [a for kv in [*FAST, *extra] for a in ("--set", kv)]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("user") / "run"
    train_job(load_config(overrides=[*FAST, f"run.out_dir={out}"]), quiet=True)
    return out


def one_line_error(capsys, code: int, *needles: str) -> str:
    err = capsys.readouterr().err
    assert code == 2, err
    assert "Traceback" not in err
    line = err.strip().splitlines()[-1]
    assert line.startswith("zo2: error: "), err
    for needle in needles:
        assert needle in line, line
    return line


# ------------------------------------------------------------------------------------------- read-only folders

def test_a_new_run_under_a_read_only_folder_is_refused_before_any_work(tmp_path, mounts, capsys):
    src = tmp_path / "src"
    src.mkdir()
    ro = mounts.read_only(src)
    code = main(["train", "--quiet", "--out", str(ro / "new"), *sets()])
    one_line_error(capsys, code, "cannot be written", str(ro / "new"))


def test_resume_overwrite_and_replay_of_a_read_only_run_are_one_line_errors(run_dir, mounts, capsys):
    ro = mounts.read_only(run_dir)
    one_line_error(capsys, main(["train", "--quiet", "--resume", str(ro), "--set", "train.steps=8"]),
                   "cannot be written", str(ro))
    one_line_error(capsys, main(["train", "--quiet", "--overwrite", "--out", str(ro), *sets()]),
                   "cannot be written")
    one_line_error(capsys, main(["replay", str(ro), "--quiet"]), "The replay's output folder", "cannot be written")


def test_an_os_error_while_writing_is_one_line(tmp_path, capsys, monkeypatch):
    """A failure of the disk itself mid-run (here: a full disk at the final save) is one line, not a traceback."""
    import zo2.train.trainer as trainer

    def full(*args, **kwargs):
        raise OSError(28, "No space left on device", str(tmp_path / "run" / "final"))

    monkeypatch.setattr(trainer, "save_model", full)
    code = main(["train", "--quiet", "--out", str(tmp_path / "run"), *sets()])
    err = capsys.readouterr().err
    assert code == 1 and "Traceback" not in err
    assert err.strip().splitlines()[-1].startswith("zo2: error: No space left on device (")
    assert len(read_log(tmp_path / "run" / "trajectory.jsonl")) == 6  # the steps are kept


def test_a_full_disk_while_training_is_one_line_and_the_run_resumes_after(mounts, capsys):
    """The disk fills mid-run: one line naming the folder and its free space; the log keeps every step before it,
    with no torn line; once there is space again the same run resumes to the end."""
    from zo2_testing import fill_disk_after

    disk = mounts.small_disk(8)
    run = disk / "run"
    filler = fill_disk_after(run, 2, disk)
    code = main(["train", "--quiet", "--out", str(run), *sets("train.steps=30", "checkpoint.save_every=0",
                                                            "train.log_every=1", "run.save_final=false")])
    filler.join(timeout=60)
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err, err
    line = err.strip().splitlines()[-1]
    assert "No space left on device while" in line and str(run) in line and "GB free there" in line, line
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no torn line to repair
        done = len(read_log(run / "trajectory.jsonl"))
    assert 2 <= done < 30
    (disk / "filler").unlink()
    assert main(["train", "--quiet", "--resume", str(run)]) == 0
    assert len(read_log(run / "trajectory.jsonl")) == 30


# ------------------------------------------------------------------------------------------- messages

def test_ctrl_c_names_the_run_folder(tmp_path, capsys, monkeypatch):
    import zo2.train.trainer as trainer

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(trainer, "train_job", interrupted)
    code = main(["train", "--quiet", "--out", str(tmp_path / "run"), *sets()])
    err = capsys.readouterr().err
    assert code == 130
    assert f"zo2 train --resume {tmp_path / 'run'}" in err and "RUN_DIR" not in err


def test_replay_of_a_folder_without_a_run_speaks_of_replay(tmp_path, capsys):
    line = one_line_error(capsys, main(["replay", str(tmp_path)]), "nothing to replay")
    assert "--resume" not in line


def test_a_torn_log_counts_steps_as_done(run_dir, tmp_path):
    log = tmp_path / "trajectory.jsonl"
    log.write_bytes((run_dir / "trajectory.jsonl").read_bytes() + b'{"crc":1,"r":{"step":6')
    with pytest.warns(CheckpointWarning, match="the log holds 6 steps"):
        assert len(read_log(log)) == 6


def test_completion_help_names_the_shell(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    assert "zo2 completion bash" in capsys.readouterr().out


# ------------------------------------------------------------------------------------------- replay and eval

def test_replay_shows_progress(run_dir, tmp_path, capsys):
    assert main(["replay", str(run_dir), "--to", "5", "--from-base", "--out", str(tmp_path / "r5")]) == 0
    captured = capsys.readouterr()
    assert "replay" in captured.err and "5/5" in captured.err
    assert "wrote the replayed weights" in captured.out


def test_eval_of_a_step_whose_snapshot_was_rotated_away_replays_to_it(run_dir, capsys):
    """keep_last=1 left only step 6: --step 3 rebuilds step 3 from the base weights and the log; its loss equals
    that of `zo2 replay --to 3`'s model folder evaluated on the same batches."""
    import json

    assert [p.name for p in list_snapshots(run_dir)] == ["step_00000006.safetensors"]
    assert main(["eval", str(run_dir), "--step", "3", "--quiet"]) == 0
    at3 = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert at3["target"].endswith("at step 3")
    assert main(["eval", str(run_dir), "--step", "6", "--quiet"]) == 0
    at6 = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert at6["eval_loss"] != at3["eval_loss"]
    out = run_dir.parent / "replayed3"
    assert main(["replay", str(run_dir), "--to", "3", "--out", str(out), "--quiet"]) == 0
    capsys.readouterr()
    assert main(["eval", str(out), "--quiet", "--set", "data.max_length=32", "--set", "train.eval_batches=1"]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["eval_loss"] == pytest.approx(
        at3["eval_loss"], rel=1e-6)


# ------------------------------------------------------------------------------------------- noise

def test_runs_emit_no_deprecation_warnings_and_log_to_one_stream(tmp_path, capsys):
    """A Llama-family run with LoRA (the mask builder and peft's wrapping) warns of nothing deprecated; with
    --quiet every log line goes to stderr, as the progress bar's do."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        code = main(["train", "--quiet", "--preset", "tiny-llama", "--out", str(tmp_path / "run"),
                     *sets("peft.method=lora")])
    assert code == 0
    deprecated = [str(w.message) for w in caught if issubclass(w.category, (DeprecationWarning, FutureWarning))]
    assert not deprecated, deprecated
    captured = capsys.readouterr()
    assert captured.out == "" and "done: 6 steps" in captured.err
