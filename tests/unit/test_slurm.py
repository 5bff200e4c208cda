"""``zo2 slurm``: the rendered sbatch script, the layout check, submission through sbatch, the deploy configs."""

from __future__ import annotations

import os
import re
import stat
import subprocess
from pathlib import Path

import pytest

from zo2.config.loader import load_config
from zo2_launcher.cli import main
from zo2_launcher.slurm import SlurmOptions, render

REPO = Path(__file__).resolve().parents[2]
CONFIG_2D = "deploy/configs/opt66b-1node-8gpu-2d.toml"
CONFIGS = sorted((REPO / "deploy" / "configs").glob("*.toml"))


def run(capsys, *argv: str) -> tuple[int, str, str]:
    """``zo2 argv`` in this process: (exit status, stdout, stderr)."""
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture
def in_repo(monkeypatch) -> Path:
    monkeypatch.chdir(REPO)
    return REPO


def test_dry_run_prints_a_valid_script(capsys, in_repo, tmp_path):
    code, out, err = run(capsys, "slurm", CONFIG_2D, "--nodes", "1", "--gpus-per-node", "8", "--dry-run")
    assert code == 0, err
    script = tmp_path / "job.sbatch"
    script.write_text(out)
    check = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
    assert check.returncode == 0, check.stderr
    assert out.startswith("#!/bin/bash\n")
    for line in ("#SBATCH --nodes=1", "#SBATCH --ntasks-per-node=1", "#SBATCH --gpus-per-node=8",
                 "#SBATCH --requeue", "#SBATCH --signal=B:TERM@120", "#SBATCH --cpus-per-task=64"):
        assert line in out.splitlines(), line
    assert "#SBATCH --partition" not in out and "#SBATCH --account" not in out
    assert 'scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1' in out
    assert ("srun --ntasks-per-node=1 --kill-on-bad-exit=1 bash -c 'exec python -m zo2 launch --nnodes "
            '"$SLURM_NNODES"') in out
    assert '--node-rank "$SLURM_NODEID" --master-addr "$0" --master-port 29500 --nproc-per-node 8' in out
    assert """-- "$@" --quiet' "$HEAD" "${TRAIN_ARGS[@]}" &""" in out
    config = REPO / CONFIG_2D
    assert f"CONFIG={config}" in out and f"RUN_DIR={REPO / 'runs' / 'opt66b-2d'}" in out
    assert 'TRAIN_ARGS=(--config "$CONFIG" --out "$RUN_DIR")' in out
    assert 'if [[ -f "$RUN_DIR/trajectory.jsonl" ]]' in out and 'TRAIN_ARGS=(--resume "$RUN_DIR")' in out
    # #SBATCH lines must come before the first command, or sbatch ignores them
    first_command = next(i for i, line in enumerate(out.splitlines()) if line and not line.startswith("#"))
    assert all(i < first_command for i, line in enumerate(out.splitlines()) if line.startswith("#SBATCH"))


def test_overrides_are_quoted_and_resume_drops_locked_ones(capsys, in_repo):
    code, out, err = run(capsys, "slurm", CONFIG_2D, "--nodes", "2", "--gpus-per-node", "8", "--dry-run",
                         "--set", "parallel.dp=8", "--set", "model.path=/models/my opt", "--set", "optim.lr=2e-7",
                         "--partition", "gpu", "--account", "proj1", "--time", "2-00:00:00")
    assert code == 0, err
    lines = out.splitlines()
    assert {"#SBATCH --nodes=2", "#SBATCH --partition=gpu", "#SBATCH --account=proj1",
            "#SBATCH --time=2-00:00:00"} <= set(lines)
    fresh = "--set parallel.dp=8 --set 'model.path=/models/my opt' --set optim.lr=2e-7"
    assert f'TRAIN_ARGS=(--config "$CONFIG" --out "$RUN_DIR"{" " + fresh})' in out
    assert 'TRAIN_ARGS=(--resume "$RUN_DIR" --set parallel.dp=8 --set optim.lr=2e-7)' in out  # model.* is locked


def test_wrong_sizes_exit_2_with_the_numbers(capsys, in_repo):
    code, out, err = run(capsys, "slurm", CONFIG_2D, "--nodes", "2", "--gpus-per-node", "8", "--dry-run")
    assert code == 2 and out == ""
    message = err.strip().splitlines()[-1]
    assert message.startswith("zo2: error: ") and "Traceback" not in err
    for needle in ("4 × 2 = 8", "--nodes 2", "--gpus-per-node 8", "16 processes", "--set parallel.dp=8"):
        assert needle in message, message


def test_bad_config_key_is_the_config_error(capsys, in_repo):
    code, _, err = run(capsys, "slurm", CONFIG_2D, "--nodes", "1", "--gpus-per-node", "8", "--dry-run",
                       "--set", "optim.lrr=1e-3")
    assert code == 2
    assert "Unknown config key optim.lrr" in err and "Did you mean 'lr'" in err


def test_bad_time_is_refused(capsys, in_repo):
    code, _, err = run(capsys, "slurm", CONFIG_2D, "--nodes", "1", "--gpus-per-node", "8", "--dry-run",
                       "--time", "one day")
    assert code == 2 and "--time 'one day'" in err


FAKE_SBATCH = """#!/bin/bash
printf '%s\\n' "$@" > "{record}/argv"
cat "$1" > "{record}/content"
echo "Submitted batch job 123"
"""


def _fake_sbatch(bin_dir: Path, record: Path) -> None:
    bin_dir.mkdir()
    record.mkdir()
    sbatch = bin_dir / "sbatch"
    sbatch.write_text(FAKE_SBATCH.format(record=record))
    sbatch.chmod(sbatch.stat().st_mode | stat.S_IXUSR)


def test_submits_the_rendered_script_with_sbatch(capsys, monkeypatch, tmp_path):
    _fake_sbatch(tmp_path / "bin", tmp_path / "record")
    monkeypatch.setenv("PATH", f"{tmp_path / 'bin'}{os.pathsep}{os.environ.get('PATH', '')}")
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    config = str(REPO / CONFIG_2D)
    args = ["--nodes", "1", "--gpus-per-node", "8", "--set", "run.out_dir=runs/job1"]
    code, out, err = run(capsys, "slurm", config, *args)
    assert code == 0, err
    script_path = work / "runs" / "job1.slurm" / "zo2.sbatch"
    argv = (tmp_path / "record" / "argv").read_text().splitlines()
    assert argv == [str(script_path)]
    content = (tmp_path / "record" / "content").read_text()
    expected = render(config, ["run.out_dir=runs/job1"], SlurmOptions(nodes=1, gpus_per_node=8), workdir=work)
    assert content == expected.script == script_path.read_text()
    assert "Submitted batch job 123" in out.splitlines()
    assert not (work / "runs" / "job1").exists()  # the run folder stays empty for zo2 train
    assert f"#SBATCH --output={work / 'runs' / 'job1.slurm'}/%x-%j.out" in content

    # the dry run prints the same script
    code, dry, err = run(capsys, "slurm", config, *args, "--dry-run")
    assert code == 0 and dry == content


def test_out_script_puts_script_and_logs_there(capsys, monkeypatch, tmp_path):
    _fake_sbatch(tmp_path / "bin", tmp_path / "record")
    monkeypatch.setenv("PATH", f"{tmp_path / 'bin'}{os.pathsep}{os.environ.get('PATH', '')}")
    monkeypatch.chdir(tmp_path)
    code, out, err = run(capsys, "slurm", str(REPO / CONFIG_2D), "--nodes", "1", "--gpus-per-node", "8",
                         "--out-script", "jobs/a.sbatch", "--job-name", "mine")
    assert code == 0, err
    content = (tmp_path / "jobs" / "a.sbatch").read_text()
    assert (tmp_path / "record" / "content").read_text() == content
    assert "#SBATCH --job-name=mine" in content and f"#SBATCH --error={tmp_path / 'jobs'}/%x-%j.err" in content


def test_no_sbatch_on_path_names_the_script(capsys, monkeypatch, tmp_path):
    empty = tmp_path / "empty-bin"
    empty.mkdir()
    monkeypatch.setenv("PATH", str(empty))
    monkeypatch.chdir(tmp_path)
    code, _, err = run(capsys, "slurm", str(REPO / CONFIG_2D), "--nodes", "1", "--gpus-per-node", "8")
    assert code == 2 and "Traceback" not in err
    script_path = tmp_path / "runs" / "opt66b-2d.slurm" / "zo2.sbatch"
    message = err.strip().splitlines()[-1]
    assert "`sbatch` is not on PATH" in message and f"sbatch {script_path}" in message
    assert script_path.is_file()


def test_existing_run_is_continued_and_foreign_folder_refused(capsys, monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    run_dir = tmp_path / "runs" / "opt66b-2d"
    run_dir.mkdir(parents=True)
    (run_dir / "notes.txt").write_text("not a run")
    argv = ["slurm", str(REPO / CONFIG_2D), "--nodes", "1", "--gpus-per-node", "8", "--dry-run"]
    code, _, err = run(capsys, *argv)
    assert code == 2 and "is not empty and is not a zo2 run folder" in err
    (run_dir / "config.toml").write_text("")
    (run_dir / "trajectory.jsonl").write_text("")
    code, out, err = run(capsys, *argv)
    assert code == 0 and "continues it (zo2 train --resume)" in err and out.startswith("#!/bin/bash")


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_deploy_configs_load(path):
    job = load_config(path=path)
    assert job.model.dtype == "bf16" and job.model.name.startswith("opt-")
    assert job.data.batch_size % job.parallel.dp == 0


def test_deploy_configs_present_with_their_layouts():
    names = {p.name: load_config(path=p) for p in CONFIGS}
    assert {"opt175b-1gpu.toml", "opt66b-1node-8gpu-2d.toml", "opt175b-4node.toml"} <= set(names)
    one = names["opt175b-1gpu.toml"]
    assert (one.parallel.dp, one.parallel.pp) == (1, 1) and one.optim.offload is True
    assert one.optim.gpu_memory_budget is not None and one.optim.prefetch >= 1
    assert (names["opt66b-1node-8gpu-2d.toml"].parallel.dp, names["opt66b-1node-8gpu-2d.toml"].parallel.pp) == (4, 2)
    multi = names["opt175b-4node.toml"]
    assert multi.parallel.dp * multi.parallel.pp == 32 and multi.parallel.pp == 2


def test_template_placeholders_are_all_filled():
    text = (REPO / "deploy" / "slurm" / "zo2.sbatch.template").read_text()
    names = set(re.findall(r"(?<!\$)\$\{(\w+)\}", text))
    assert {"nodes", "gpus_per_node", "config", "run_dir", "log_dir"} <= names
    script = render(REPO / CONFIG_2D, [], SlurmOptions(nodes=1, gpus_per_node=8), workdir=REPO).script
    assert not any("${" + name + "}" in script for name in names)
