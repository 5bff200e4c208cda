"""Bad inputs to the command line: exit status 2, one paragraph naming the problem and the fix, no traceback."""

from __future__ import annotations

import os
import subprocess
import sys

from zo2_launcher.cli import main

FAST = ["--quiet", "--set", "train.steps=3", "--set", "train.eval_batches=0", "--set", "checkpoint.fsync=false",
        "--set", "run.plot=false"]


def run_cli(capsys, *argv: str) -> tuple[int, str]:
    """Run ``zo2 argv`` in this process; return (exit status, stderr)."""
    code = main(list(argv))
    err = capsys.readouterr().err
    return code, err


def assert_user_error(code: int, err: str, *needles: str) -> None:
    assert code == 2, err
    assert "Traceback" not in err
    message = err.strip().splitlines()[-1]
    assert message.startswith("zo2: error: ")
    for needle in needles:
        assert needle in message, message


def test_unknown_config_key_did_you_mean(capsys, tmp_path):
    code, err = run_cli(capsys, "train", "--out", str(tmp_path / "run"), "--set", "optim.lrr=1e-3")
    assert_user_error(code, err, "optim.lrr", "Did you mean 'lr'", "--help-config")
    assert not (tmp_path / "run").exists()


def test_negative_lr(capsys, tmp_path):
    code, err = run_cli(capsys, "train", "--out", str(tmp_path / "run"), "--set", "optim.lr=-1")
    assert_user_error(code, err, "optim.lr = -1", ">= 0")


def test_zero_eps(capsys, tmp_path):
    code, err = run_cli(capsys, "train", "--out", str(tmp_path / "run"), "--set", "optim.eps=0")
    assert_user_error(code, err, "optim.eps = 0", "> 0")


def test_type_mismatch(capsys, tmp_path):
    code, err = run_cli(capsys, "train", "--out", str(tmp_path / "run"), "--set", "train.steps=many")
    assert_user_error(code, err, "train.steps expects an integer", "'many'")


def test_missing_model_path(capsys, tmp_path):
    code, err = run_cli(capsys, "train", "--out", str(tmp_path / "run"), "--set", f"model.path={tmp_path}/nope")
    assert_user_error(code, err, "does not exist", "model.path")
    assert not (tmp_path / "run").exists()


def test_model_path_is_not_a_causal_lm(capsys, tmp_path):
    from transformers import BertConfig, BertModel

    BertModel(BertConfig(vocab_size=300, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                         intermediate_size=37)).save_pretrained(tmp_path / "bert")
    code, err = run_cli(capsys, "train", "--out", str(tmp_path / "run"), "--set", f"model.path={tmp_path}/bert")
    assert_user_error(code, err, "'bert'", "not a decoder-only causal LM", "Supported model types")


def test_missing_data_file(capsys, tmp_path):
    code, err = run_cli(capsys, "train", "--out", str(tmp_path / "run"), "--set",
                        f"data.path={tmp_path}/missing.jsonl")
    assert_user_error(code, err, "missing.jsonl", "does not exist", "data.path")
    assert not (tmp_path / "run").exists()


def test_empty_data_file(capsys, tmp_path):
    (tmp_path / "empty.jsonl").write_text("\n")
    code, err = run_cli(capsys, "train", "--out", str(tmp_path / "run"), "--set", f"data.path={tmp_path}/empty.jsonl")
    assert_user_error(code, err, "empty.jsonl", "no examples")


def test_nan_loss_streak(capsys, tmp_path):
    run = tmp_path / "run"
    code, err = run_cli(capsys, "train", "--out", str(run), *FAST, "--set", "train.steps=30", "--set",
                        "optim.lr=1e30", "--set", "checkpoint.save_every=1")
    assert_user_error(code, err, "NaN or inf for 5 steps in a row", "optim.lr", f"zo2 train --resume {run} "
                      "--resume-from-step 0", f"zo2 replay {run} --to 0")
    assert (run / "trajectory.jsonl").is_file() and not (run / "final").exists()


def test_existing_run_folder_is_left_untouched(capsys, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "notes.txt").write_text("mine")
    code, err = run_cli(capsys, "train", "--out", str(run), *FAST)
    assert_user_error(code, err, "already exists", "--resume", "--overwrite")
    assert [p.name for p in run.iterdir()] == ["notes.txt"] and (run / "notes.txt").read_text() == "mine"


def test_overwrite_refuses_a_folder_that_is_not_a_run(capsys, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "notes.txt").write_text("mine")
    code, err = run_cli(capsys, "train", "--out", str(run), "--overwrite", *FAST)
    assert_user_error(code, err, "not a zo2 run folder")
    assert (run / "notes.txt").read_text() == "mine"


def test_resume_of_a_folder_that_is_not_a_run(capsys, tmp_path):
    code, err = run_cli(capsys, "train", "--resume", str(tmp_path))
    assert_user_error(code, err, "nothing to resume")


def test_resume_refuses_model_changes(capsys, tmp_path):
    run = tmp_path / "run"
    assert main(["train", "--out", str(run), *FAST]) == 0
    code, err = run_cli(capsys, "train", "--resume", str(run), "--set", "model.num_layers=2")
    assert_user_error(code, err, "model.num_layers cannot change on --resume")


def test_replay_past_the_end(capsys, tmp_path):
    run = tmp_path / "run"
    assert main(["train", "--out", str(run), *FAST]) == 0
    code, err = run_cli(capsys, "replay", str(run), "--to", "99")
    assert_user_error(code, err, "--to 99", "0 (the base weights) to 3")


def test_list_presets_and_help_config(capsys):
    assert main(["train", "--list-presets"]) == 0
    out = capsys.readouterr().out
    assert "tiny-opt" in out and "opt-175b" in out and "175B" in out
    assert main(["train", "--help-config"]) == 0
    assert "`optim.lr`" in capsys.readouterr().out


def test_console_script_exit_code_and_debug(tmp_path):
    """The real process: exit 2 and no traceback; --debug shows it."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "zo2", "train", "--out", str(tmp_path / "run"), "--set", "optim.eps=0"]
    quiet = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=tmp_path)
    assert quiet.returncode == 2 and "Traceback" not in quiet.stderr and "optim.eps" in quiet.stderr
    loud = subprocess.run(cmd + ["--debug"], capture_output=True, text=True, env=env, cwd=tmp_path)
    assert loud.returncode != 0 and "Traceback" in loud.stderr and "ConfigError" in loud.stderr


def test_resume_with_fewer_steps_leaves_the_run_alone(capsys, tmp_path):
    run = tmp_path / "run"
    assert main(["train", "--out", str(run), *FAST]) == 0
    before = {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()}
    code, err = run_cli(capsys, "train", "--resume", str(run), "--set", "train.steps=2")
    assert_user_error(code, err, "already took 3 steps", "zo2 replay")
    assert {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()} == before


def test_resume_and_overwrite_together(capsys, tmp_path):
    run = tmp_path / "run"
    assert main(["train", "--out", str(run), *FAST]) == 0
    code, err = run_cli(capsys, "train", "--resume", str(run), "--overwrite")
    assert_user_error(code, err, "--resume and --overwrite")


def test_bash_completion_completes_commands_and_options(capsys, tmp_path):
    import subprocess

    assert main(["completion", "bash"]) == 0
    script = tmp_path / "zo2.bash"
    script.write_text(capsys.readouterr().out)
    probe = ('source "$1"; COMP_WORDS=(zo2 la); COMP_CWORD=1; _zo2; echo "${COMPREPLY[@]}"; '
             'COMP_WORDS=(zo2 launch --nn); COMP_CWORD=2; _zo2; echo "${COMPREPLY[@]}"')
    out = subprocess.run(["bash", "-c", probe, "_", str(script)], capture_output=True, text=True, check=True).stdout
    assert out.split("\n")[:2] == ["launch", "--nnodes"]


def test_launch_counts_its_workers(capsys, monkeypatch):
    import torch

    from zo2_launcher.launch import _nproc

    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    assert _nproc("auto") == 1 and _nproc("3") == 3
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 8)
    assert _nproc("auto") == 8
    assert main(["launch", "--nproc-per-node", "0", "--", "--quiet"]) == 2
    assert "--nproc-per-node 0" in capsys.readouterr().err
