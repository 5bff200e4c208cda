"""Rebuilding a run's weights at a step: the newest good snapshot at or before it, then the trajectory log's
updates up to it (DESIGN.md §5). A resumed :class:`~zo2.train.trainer.Trainer`, ``zo2 eval`` of a step and
``zo2 replay`` all restore weights through :func:`restore_weights`."""

from __future__ import annotations

from pathlib import Path

from zo2.engine import ZOEngine
from zo2.errors import CheckpointError
from zo2.train.build import build_engine, build_job_model, build_tokenizer
from zo2.train.checkpoint import LOG_FILE, Snapshot, latest_good_snapshot, read_log, replay_updates
from zo2.train.run_dir import check_step_in_log, check_writable, load_resume_config, save_model


def restore_weights(engine: ZOEngine, run_dir: Path, records: list[dict], to_step: int, *, from_base: bool = False,
                    set_aside_corrupt: bool = False, progress: bool = False) -> Snapshot | None:
    """Put the weights after ``to_step`` steps of the run in ``run_dir`` into ``engine``: the newest good snapshot
    at or before it (unless ``from_base``; ``set_aside_corrupt``: move unreadable ones to ``snapshots/corrupt/``),
    then the updates of ``records`` (its trajectory log) up to it. Returns the snapshot used (None: the base
    weights). A deferred update may remain: flush the engine before reading its weights."""
    snap = None if from_base else latest_good_snapshot(run_dir, to_step, set_aside_corrupt=set_aside_corrupt)
    if snap is not None:
        if snap.step > len(records):
            raise CheckpointError(f"Snapshot {snap.path.name} is at step {snap.step} but the trajectory log ends "
                                  f"after step {len(records)}: the log lost records. Restore the log, or delete the "
                                  "newer snapshots to resume from an older point.")
        engine.load_trainable_state(snap.tensors)
    replay_updates(engine.apply_update, records, snap.step if snap else 0, to_step, progress=progress)
    return snap


def restore_step(engine: ZOEngine, run_dir: Path, to_step: int | None, *, from_base: bool = False,
                 progress: bool = False, option: str = "--step") -> int:
    """Put the weights after ``to_step`` steps of the run in ``run_dir`` (default: all the log holds) into
    ``engine`` with :func:`restore_weights`, flushed. Returns the step reached. CheckpointError (naming
    ``option``) when the log does not hold ``to_step`` steps."""
    records = read_log(run_dir / LOG_FILE)
    to_step = len(records) if to_step is None else to_step
    check_step_in_log(to_step, len(records), run_dir, option)
    restore_weights(engine, run_dir, records, to_step, from_base=from_base, progress=progress)
    engine.flush()
    return to_step


def replay_run(run_dir: str | Path, to_step: int | None = None, out_dir: str | Path | None = None,
               from_base: bool = False, progress: bool = False) -> Path:
    """Rebuild the weights after ``to_step`` steps of the run in ``run_dir`` (default: all of them) from the
    base weights (or the newest snapshot at or before it, unless ``from_base``) and the trajectory log; write
    them with ``save_pretrained`` to ``out_dir`` (default ``run_dir/replay/step_XXXXXXXX``)."""
    run_dir = Path(run_dir)
    job = load_resume_config(run_dir, purpose="replay")
    records = read_log(run_dir / LOG_FILE)
    to_step = len(records) if to_step is None else to_step
    check_step_in_log(to_step, len(records), run_dir, "--to")
    out = Path(out_dir) if out_dir is not None else run_dir / "replay" / f"step_{to_step:08d}"
    check_writable(out, "The replay's output folder")
    tokenizer = build_tokenizer(job)
    model = build_job_model(job, tokenizer)
    engine = build_engine(job, model)
    restore_step(engine, run_dir, to_step, from_base=from_base, progress=progress)
    out.parent.mkdir(parents=True, exist_ok=True)
    return save_model(model, tokenizer, out)

