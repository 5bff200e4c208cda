"""Training on a MeZO task (the ``[task]`` section): its sampled splits, loader, loss and periodic metric.

With ``task.name`` set, ``zo2 train`` (and ``zo2 launch``) train on the task's training examples with MeZO's loss
for it (candidate scoring, or the gold answer's tokens), and every ``train.eval_every`` steps score the dev set
(the eval set when there is no dev set) with the task's metric; the run folder keeps the best weights so far in
``best/`` (``best.json`` says the step and score).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from zo2.config.job import JobConfig
from zo2.errors import ConfigError

BEST_DIR = "best"
BEST_FILE = "best.json"


@dataclass
class TaskRun:
    """A job's task: its data, MeZO's loss for it, the training loader and the evaluation set."""

    job: JobConfig
    data: Any
    classify: bool
    loss_fn: Any
    loader: Any

    @property
    def metric(self) -> str:
        from zo2.tasks import metric_name

        return metric_name(self.job.task, self.data.task)

    @property
    def eval_examples(self) -> list:
        """The dev set, or the eval set when no dev set was sampled."""
        return list(self.data.dev) or list(self.data.eval)

    def evaluate(self, engine: Any, tokenizer: Any, progress: bool = False) -> dict[str, Any]:
        """The task's metrics of the engine's current weights on :attr:`eval_examples`."""
        from zo2.tasks import evaluate_task

        cfg = self.job.task
        return evaluate_task(engine, self.data.task, self.eval_examples, tokenizer, batch_size=cfg.eval_batch_size,
                             max_length=min(cfg.max_length, self.job.data.max_length),
                             max_new_tokens=cfg.max_new_tokens, length_normalize=cfg.length_normalize,
                             progress=progress, desc=f"eval {self.data.task.name}")


def build_task_run(job: JobConfig, tokenizer: Any, comm: Any = None) -> TaskRun | None:
    """The job's :class:`TaskRun`, or None when ``task.name`` is unset (train on ``[data]``)."""
    if job.task.name is None:
        return None
    from zo2.tasks import TaskLoader, encode_example, load_task, task_loss_fn, trains_as_classification

    cfg = job.task
    data = load_task(cfg)
    classify = trains_as_classification(cfg, data.task)
    max_length = training_length(cfg, data.task, job.data.max_length)
    encoded = [encode_example(data.task, ex, tokenizer, max_length=max_length, all_candidates=classify)
               for ex in data.train]
    shard = dict(rank=comm.dp_rank, world_size=comm.dims.dp) if comm is not None else {}
    loader = TaskLoader(job.data, tokenizer, encoded, **shard)
    return TaskRun(job, data, classify, task_loss_fn(classify, length_normalize=cfg.length_normalize), loader)


def training_length(cfg, task, data_max_length: int) -> int:
    """Tokens a training row keeps: ``task.max_length`` (capped by ``data.max_length``), less
    ``task.max_new_tokens`` for a generation task (SQuAD, DROP) — MeZO encodes those rows as generation prompts with
    the gold answer, cut to leave room for the answer it would generate."""
    length = min(cfg.max_length, data_max_length)
    if task.generation:
        length -= cfg.max_new_tokens
        if length < 2:
            raise ConfigError(f"task.max_length = {cfg.max_length} (or data.max_length = {data_max_length}) leaves "
                              f"no room for a {task.name} training row after task.max_new_tokens = "
                              f"{cfg.max_new_tokens}; raise the length or lower max_new_tokens.")
    return length


def read_best(run_dir: Path) -> dict | None:
    path = Path(run_dir) / BEST_FILE
    return json.loads(path.read_text()) if path.is_file() else None


def write_best(run_dir: Path, record: dict) -> None:
    path = Path(run_dir) / BEST_FILE
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(record, indent=2))
    tmp.replace(path)
