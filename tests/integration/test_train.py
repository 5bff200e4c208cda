"""Real training runs: the default job learns, resume is bit-exact, replay rebuilds the weights, NaN streaks stop
the run without losing what was saved."""

from __future__ import annotations

import json
import math
import warnings
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from zo2.config import load_config
from zo2.engine import default_loss
from zo2.errors import NonFiniteLossError
from zo2.train.checkpoint import CheckpointWarning, list_snapshots, load_snapshot, read_log
from zo2.train.replay import replay_run
from zo2.train.run_dir import load_resume_config, read_metrics
from zo2.train.trainer import train_job
from zo2_launcher.cli import main

SMALL = ["train.steps=12", "train.log_every=2", "train.eval_every=4", "train.eval_batches=1",
         "checkpoint.save_every=5", "checkpoint.keep_last=5", "checkpoint.fsync=false", "run.plot=false"]


def small_job(run_dir: Path, *extra: str):
    return load_config(overrides=[*SMALL, f"run.out_dir={run_dir}", *extra])


def weights(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(str(folder / "model.safetensors"))


def assert_same_tensors(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name


def train_metrics(run_dir: Path, every: int = 2) -> list[tuple]:
    """The deterministic fields of the regular train lines (a run that stopped early also logged its last step;
    time and tokens/s differ between runs)."""
    keys = ("step", "loss", "loss_plus", "loss_minus", "projected_grad", "lr", "loss_avg", "skipped")
    return [tuple(r[k] for k in keys) for r in read_metrics(run_dir) if r["kind"] == "train" and r["step"] % every == 0]


def eval_metrics(run_dir: Path, every: int = 4) -> list[tuple]:
    """(step, loss) of the regular evaluations (every ``every`` steps, and at the end of the 12-step runs)."""
    return [(r["step"], r["eval_loss"]) for r in read_metrics(run_dir)
            if r["kind"] == "eval" and (r["step"] % every == 0 or r["step"] == 12)]


# ----------------------------------------------------------------------------------------------------------
# The default job
# ----------------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def default_run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("default") / "run"
    summary = train_job(load_config(overrides=[f"run.out_dir={run_dir}"]), quiet=True)
    return run_dir, summary


def test_default_job_lowers_the_loss(default_run):
    run_dir, summary = default_run
    losses = [r["loss"] for r in read_log(run_dir / "trajectory.jsonl")]
    assert len(losses) == load_config().train.steps and all(math.isfinite(x) for x in losses)
    k = len(losses) // 10
    first, last = sum(losses[:k]) / k, sum(losses[-k:]) / k
    assert last < first - 1.0, (first, last)
    (_, eval_first), (_, eval_last) = summary.eval_losses[0], summary.eval_losses[-1]
    assert eval_last < eval_first - 0.8, summary.eval_losses


def test_run_folder_contents(default_run):
    run_dir, summary = default_run
    names = {p.name for p in run_dir.iterdir()}
    assert {"config.toml", "metrics.jsonl", "trajectory.jsonl", "snapshots", "final", "loss.png"} <= names
    assert load_config(path=run_dir / "config.toml", overrides=[f"run.out_dir={run_dir}"]) == \
        load_config(overrides=[f"run.out_dir={run_dir}"])
    job = load_config()
    steps, every = job.train.steps, job.checkpoint.save_every
    lines = read_metrics(run_dir)
    train = [r for r in lines if r["kind"] == "train"]
    assert [r["step"] for r in train] == list(range(job.train.log_every, steps + 1, job.train.log_every))
    assert {"loss", "loss_plus", "loss_minus", "projected_grad", "lr", "tokens_per_s", "time", "skipped"} <= \
        set(train[0])
    assert any(r["kind"] == "eval" for r in lines)
    snaps = list_snapshots(run_dir)
    assert [int(p.stem.split("_")[1]) for p in snaps] == [(steps - 1) // every * every, steps]  # keep_last = 2
    _, meta = load_snapshot(snaps[-1])
    assert meta["step"] == steps and meta["log_records"] == steps and "epoch" in meta["data"]
    assert (run_dir / "final" / "config.json").is_file()
    assert (run_dir / "loss.png").stat().st_size > 1000 and summary.steps == steps


def test_replay_to_the_end_equals_the_final_weights(default_run, tmp_path):
    run_dir, _ = default_run
    final = weights(run_dir / "final")
    assert_same_tensors(weights(replay_run(run_dir, out_dir=tmp_path / "snap")), final)
    assert_same_tensors(weights(replay_run(run_dir, out_dir=tmp_path / "base", from_base=True)), final)


def test_replay_to_a_snapshot_step_equals_the_snapshot(default_run, tmp_path):
    run_dir, _ = default_run
    snap_tensors, meta = load_snapshot(list_snapshots(run_dir)[0])
    assert main(["replay", str(run_dir), "--to", str(meta["step"]), "--from-base", "--out", str(tmp_path / "r")]) == 0
    replayed = weights(tmp_path / "r")
    for name, tensor in snap_tensors.items():
        assert torch.equal(replayed[name], tensor), name


def test_replay_to_step_zero_is_the_base_model(default_run, tmp_path):
    run_dir, _ = default_run
    base = weights(replay_run(run_dir, 0, tmp_path / "zero"))
    from zo2.train.model import build_model
    from zo2.train.tokenizer import ByteTokenizer
    from zo2.train.build import special_token_ids

    model = build_model(load_config().model, special_token_ids(ByteTokenizer()))
    for name, tensor in model.state_dict().items():
        if name in base:
            assert torch.equal(base[name], tensor), name


@pytest.mark.parametrize("preset", ["tiny-llama", "tiny-qwen3", "tiny-gpt2"])
def test_other_tiny_presets_train(preset, tmp_path):
    job = load_config(preset, overrides=[*SMALL, "train.steps=3", f"run.out_dir={tmp_path / 'run'}"])
    summary = train_job(job, quiet=True)
    assert summary.steps == 3 and summary.skipped == 0 and all(math.isfinite(x) for x in summary.losses)
    assert (tmp_path / "run" / "final" / "model.safetensors").is_file()


def test_train_and_replay_a_local_model_folder(tmp_path):
    from zo2.train.model import build_model

    build_model(load_config("tiny-llama").model).save_pretrained(tmp_path / "base")
    run_dir = tmp_path / "run"
    job = load_config(overrides=[*SMALL, "train.steps=4", f"model.path={tmp_path / 'base'}",
                                 f"run.out_dir={run_dir}"])
    train_job(job, quiet=True)
    assert_same_tensors(weights(replay_run(run_dir, out_dir=tmp_path / "r", from_base=True)), weights(run_dir / "final"))


# ----------------------------------------------------------------------------------------------------------
# Resume
# ----------------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("full") / "run"
    train_job(small_job(run_dir), quiet=True)
    return run_dir


def assert_same_run(a: Path, b: Path) -> None:
    assert_same_tensors(weights(a / "final"), weights(b / "final"))
    assert read_log(a / "trajectory.jsonl") == read_log(b / "trajectory.jsonl")
    assert train_metrics(a) == train_metrics(b)
    assert eval_metrics(a) == eval_metrics(b)


def test_resume_is_bit_identical(uninterrupted, tmp_path):
    run_dir = tmp_path / "run"
    train_job(small_job(run_dir, "train.steps=7"), quiet=True)
    assert main(["train", "--resume", str(run_dir), "--set", "train.steps=12", "--quiet"]) == 0
    assert_same_run(uninterrupted, run_dir)


def test_offloaded_run_equals_the_resident_run_and_resumes_bit_exactly(uninterrupted, tmp_path):
    """Streaming every block from the store changes nothing in the trajectory, also across a resume."""
    run_dir = tmp_path / "run"
    train_job(small_job(run_dir, "train.steps=7", "optim.offload=true", "optim.prefetch=2"), quiet=True)
    assert main(["train", "--resume", str(run_dir), "--set", "train.steps=12", "--quiet"]) == 0
    assert_same_run(uninterrupted, run_dir)
    lines = [r for r in read_metrics(run_dir) if r["kind"] == "train"]
    assert all(r["h2d_gb"] > 0 for r in lines)  # the store's traffic is in metrics.jsonl
    # write-backs carry the deferred update: none before it exists (first step, first step after the resume)
    assert sum(r["d2h_gb"] > 0 for r in lines) >= len(lines) - 2


def test_resume_after_a_crash_replays_the_log_tail(uninterrupted, tmp_path):
    """Crash after step 8: the newest snapshot is corrupt and the log's last line is torn."""
    run_dir = tmp_path / "run"
    train_job(small_job(run_dir, "train.steps=8"), quiet=True)
    newest = list_snapshots(run_dir)[-1]
    data = bytearray(newest.read_bytes())
    data[-8:] = b"\xff" * 8
    newest.write_bytes(bytes(data))
    with open(run_dir / "trajectory.jsonl", "ab") as f:
        f.write(b'{"crc":123,"r":{"step":8')
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # CheckpointWarnings about the torn line and the corrupt snapshot
        train_job(load_resume_config(run_dir, ["train.steps=12"]), resume=True, quiet=True)
    assert_same_run(uninterrupted, run_dir)


def test_rotation_after_a_corrupt_snapshot_keeps_every_good_one(uninterrupted, tmp_path):
    """The newest snapshot is truncated; the resumed run sets it aside, and no rotation afterwards keeps it in place
    of a good one: every snapshot left loads, and the run equals the uninterrupted one."""
    run_dir = tmp_path / "run"
    rotating = ["checkpoint.save_every=2", "checkpoint.keep_last=2"]
    train_job(small_job(run_dir, "train.steps=6", *rotating), quiet=True)
    newest = list_snapshots(run_dir)[-1]
    assert newest.name == "step_00000006.safetensors"
    newest.write_bytes(newest.read_bytes()[:-10])
    with pytest.warns(CheckpointWarning, match="moved to"):
        train_job(load_resume_config(run_dir, ["train.steps=8"]), resume=True, quiet=True)
    assert [p.name for p in list_snapshots(run_dir)] == ["step_00000004.safetensors", "step_00000008.safetensors"]
    assert (run_dir / "snapshots" / "corrupt" / newest.name).is_file()
    train_job(load_resume_config(run_dir, ["train.steps=12"]), resume=True, quiet=True)
    snaps = list_snapshots(run_dir)
    assert [p.name for p in snaps] == ["step_00000010.safetensors", "step_00000012.safetensors"]
    for path in snaps:
        load_snapshot(path)  # CheckpointError if any is damaged
    assert_same_run(uninterrupted, run_dir)


def test_overwrite_starts_over(uninterrupted, tmp_path):
    run_dir = tmp_path / "run"
    train_job(small_job(run_dir, "train.steps=3"), quiet=True)
    train_job(small_job(run_dir), quiet=True, overwrite=True)
    assert_same_run(uninterrupted, run_dir)


# ----------------------------------------------------------------------------------------------------------
# NaN / inf
# ----------------------------------------------------------------------------------------------------------

def test_nan_streak_stops_without_losing_saved_state(tmp_path):
    run_dir = tmp_path / "run"
    calls = {"n": 0}

    def flaky_loss(logits, batch):
        calls["n"] += 1  # two forwards per step: NaN from step index 6 on
        loss = default_loss(logits, batch)
        return loss * float("nan") if calls["n"] > 12 else loss

    job = small_job(run_dir, "train.eval_batches=0", "train.max_nonfinite_steps=3")
    with pytest.raises(NonFiniteLossError, match="3 steps in a row"):
        train_job(job, quiet=True, loss_fn=flaky_loss)
    records = read_log(run_dir / "trajectory.jsonl")
    assert [r["skipped"] for r in records] == [False] * 6 + [True] * 3
    assert [int(p.stem.split("_")[1]) for p in list_snapshots(run_dir)] == [5]
    tensors, _ = load_snapshot(list_snapshots(run_dir)[0])
    assert all(bool(torch.isfinite(t).all()) for t in tensors.values())
    assert not (run_dir / "final").exists()
    last = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()][-1]
    assert last["step"] == 8 and last["skipped"] == 2


def test_a_blow_up_stops_the_run_and_its_advice_works(uninterrupted, tmp_path, capsys):
    """lr = 1e6 blows the weights up in one finite step: the run stops with DivergedError (or a NaN streak) naming
    the step to continue from; following the advice with a sane learning rate gives exactly the run that used that
    rate from the start, and what was cut is set aside, not deleted."""
    import re

    run_dir = tmp_path / "run"
    code = main(["train", "--quiet", *[a for kv in [*SMALL, f"run.out_dir={run_dir}", "optim.lr=1e6",
                                                       "checkpoint.save_every=2"] for a in ("--set", kv)]])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err
    advice = re.search(r"`zo2 train --resume (\S+) --resume-from-step (\d+) --set optim.lr=\S+`", err)
    assert advice, err
    step = int(advice.group(2))
    cut = len(read_log(run_dir / "trajectory.jsonl"))
    assert step < cut
    lr = load_config(overrides=SMALL).optim.lr  # the uninterrupted run's
    assert main(["train", "--quiet", "--resume", advice.group(1), "--resume-from-step", str(step), "--set",
                 f"optim.lr={lr!r}"]) == 0
    if step == 0:  # the whole run was retaken at the sane rate: it is the uninterrupted run
        assert_same_tensors(weights(uninterrupted / "final"), weights(run_dir / "final"))
        assert read_log(uninterrupted / "trajectory.jsonl") == read_log(run_dir / "trajectory.jsonl")
    aside = run_dir / f"after-step-{step:08d}"
    assert len(read_log(aside / "trajectory.jsonl")) == cut


def test_a_streamed_model_is_never_materialized_and_resumes_and_replays_bit_exactly(tmp_path):
    """model.stream_load = 'always': built on the meta device, weights initialised straight into the store."""
    import zo2.train.model as model_mod

    built = []
    original = model_mod.init_from_shape
    model_mod.init_from_shape = lambda *a, **k: built.append(1) or original(*a, **k)
    try:
        extra = ["model.stream_load=always", "optim.offload=true"]
        full, part = tmp_path / "full", tmp_path / "part"
        train_job(small_job(full, *extra), quiet=True)
        train_job(small_job(part, "train.steps=7", *extra), quiet=True)
        assert main(["train", "--resume", str(part), "--set", "train.steps=12", "--quiet"]) == 0
    finally:
        model_mod.init_from_shape = original
    assert built == []  # the full-size CPU init never ran
    assert_same_run(full, part)
    out = replay_run(full, out_dir=tmp_path / "replayed", from_base=True)
    assert_same_tensors(weights(full / "final"), weights(out))


def test_streaming_a_local_checkpoint_equals_loading_it(tmp_path):
    first = tmp_path / "first"
    train_job(small_job(first, "train.steps=2"), quiet=True)  # its final/ is a local HF folder
    folder = first / "final"
    runs = {}
    for mode in ("never", "always"):
        run_dir = tmp_path / mode
        train_job(small_job(run_dir, f"model.path={folder}", f"model.stream_load={mode}"), quiet=True)
        runs[mode] = run_dir
    assert read_log(runs["never"] / "trajectory.jsonl") == read_log(runs["always"] / "trajectory.jsonl")
    assert_same_tensors(weights(runs["never"] / "final"), weights(runs["always"] / "final"))
