"""``zo2 eval``: evaluate a run's weights (or a model folder) on its held-out data or on a MeZO task.

The model is built and streamed exactly as for training (``optim.offload``, ``gpu_memory_budget``), so a model
that trains on one GPU evaluates there too; nothing is written to the run folder.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from zo2.errors import ConfigError

if TYPE_CHECKING:
    from zo2.config.job import JobConfig
    from zo2.engine import ZOEngine
    from zo2.train.checkpoint import Snapshot


def evaluate_run(target: str | Path, *, task: str | None = None, task_path: str | None = None,
                 task_eval_path: str | None = None, num_eval: int | None = None, step: int | None = None,
                 overrides: list[str] | None = None, progress: bool = True) -> dict[str, Any]:
    """Metrics of ``target`` on the held-out batches of its job, or on ``task`` (a MeZO task name) read from
    ``task_path``. ``target``: a Hugging Face model folder, or a run folder — its weights after ``step`` steps
    (the snapshot of that step, or the newest one before it and the trajectory log replayed up to ``step``), by
    default its newest snapshot (the whole log replayed when it has none)."""
    from zo2.train.build import build_data, build_engine, build_job_model, build_tokenizer
    from zo2.train.run_dir import CONFIG_FILE

    target = Path(target)
    job, snap, run_step, where = _target_job(target, list(overrides or []), step)
    tokenizer = build_tokenizer(job)
    model = build_job_model(job, tokenizer)
    engine = build_engine(job, model)
    if snap is not None:
        engine.load_trainable_state(snap.tensors)
    elif (target / CONFIG_FILE).is_file():
        from zo2.train.replay import restore_step

        run_step = restore_step(engine, target, run_step, progress=progress)
        where = f"{target} at step {run_step}"
    if task is None:
        if task_path is not None or task_eval_path is not None:
            raise ConfigError("--task-path needs --task NAME (which task's format and template to use).")
        _, evals = build_data(replace(job, train=replace(job.train, eval_batches=max(job.train.eval_batches, 1))),
                              tokenizer)
        losses = [engine.evaluate(batch).loss for batch in evals]
        return {"target": where, "eval_loss": sum(losses) / len(losses), "batches": len(losses)}
    return {"target": where, **_evaluate_task(engine, tokenizer, job, task, task_path, task_eval_path, num_eval,
                                              progress)}


def _target_job(target: Path, overrides: list[str], step: int | None
                ) -> tuple[JobConfig, Snapshot | None, int | None, str]:
    """(job, snapshot, step, description) of ``target``: a run folder's saved job with the snapshot to load (None:
    restore ``step`` from the log, the whole log when None), or the job of a Hugging Face model folder."""
    from zo2.config.loader import load_config
    from zo2.train.checkpoint import latest_good_snapshot
    from zo2.train.run_dir import CONFIG_FILE, load_resume_config

    run_step: int | None = None  # a run folder: the step whose weights are evaluated
    snap = None
    if (target / CONFIG_FILE).is_file():
        job = load_resume_config(target, [o for o in overrides if not o.startswith(("model.", "data."))],
                                 purpose="evaluate")
        if step is None:  # the newest snapshot, or with none the whole log replayed
            snap = latest_good_snapshot(target)
            run_step = snap.step if snap is not None else None
        else:  # exactly step S: its snapshot, or the newest one before it (or the base) and the log up to S
            run_step = step
        return job, snap, run_step, f"{target} at step {'(end of the log)' if run_step is None else run_step}"
    if (target / "config.json").is_file():
        from zo2.train.tokenizer import TOKENIZER_FILES

        # the folder's own tokenizer when it has one (a zo2 run's final/ of the byte tokenizer has none)
        own = ["data.tokenizer=model"] if any((target / f).is_file() for f in TOKENIZER_FILES) else []
        job = load_config(None, None, [f"model.path={target}", *own, *overrides])
        if not any(o.startswith("data.max_length=") for o in overrides):  # sequences as long as the model takes
            from zo2.train.model import check_model_folder

            longest = check_model_folder(target).get("max_position_embeddings")
            if longest:
                job = replace(job, data=replace(job.data, max_length=int(longest)))
        return job, None, None, str(target)
    raise ConfigError(f"{str(target)!r} is neither a zo2 run folder (config.toml) nor a Hugging Face model "
                      "folder (config.json). Pass the folder `zo2 train` wrote, or a model folder.")


def _evaluate_task(engine: ZOEngine, tokenizer: Any, job: JobConfig, task: str, task_path: str | None,
                   task_eval_path: str | None, num_eval: int | None, progress: bool) -> dict[str, Any]:
    """The task's name, metric and results on its evaluation split (``num_eval`` sampled examples)."""
    from zo2.config.task import TaskConfig
    from zo2.tasks import evaluate_task, load_task, metric_name

    cfg = TaskConfig(name=task, path=task_path, eval_path=task_eval_path, num_dev=0, num_train=None,  # evaluation only
                     **({"num_eval": num_eval} if num_eval is not None else {}))
    data = load_task(cfg)
    result = evaluate_task(engine, data.task, data.eval, tokenizer, batch_size=cfg.eval_batch_size,
                           max_length=min(cfg.max_length, job.data.max_length),
                           max_new_tokens=cfg.max_new_tokens, length_normalize=cfg.length_normalize,
                           progress=progress)
    return {"task": data.task.name, "metric": metric_name(cfg, data.task), **result}
