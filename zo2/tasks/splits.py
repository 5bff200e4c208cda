"""Few-shot train/dev/eval splits, sampled as MeZO samples them.

* ``num_train`` (MeZO's large-model runs): the first ``num_train + num_dev`` indices of a permutation of the
  training split seeded by ``train_set_seed`` (numpy's legacy ``RandomState``, as MeZO's ``temp_seed``); the
  last ``num_dev`` of them are the dev set. With fewer training examples than that, the dev set keeps its size
  and the training set gets the rest (MeZO's CB and Copa runs: 150/100 and 300/100).
* ``k_shot`` (MeZO's per-class few-shot setting): walking the same permutation, the first ``k`` examples of each
  class train and the next ``num_dev`` of each class are the dev set. Tasks whose candidates differ per example
  (ReCoRD) and generation tasks take ``k`` examples in total.
* ``num_eval``: the first ``num_eval`` indices of a permutation of the evaluation split seeded by the same seed.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import TYPE_CHECKING, Sequence

import numpy as np

from zo2.errors import ConfigError, DataError
from zo2.tasks.base import Task, TaskExample
from zo2.tasks.io import load_split, split_sources
from zo2.tasks.registry import get_task

if TYPE_CHECKING:
    from zo2.config.task import TaskConfig


@dataclass
class TaskData:
    """A task with its sampled splits."""

    task: Task
    train: list[TaskExample]
    dev: list[TaskExample]
    eval: list[TaskExample]


def permutation(n: int, seed: int) -> list[int]:
    """MeZO's sampling order: ``np.random.permutation(n)`` under ``np.random.seed(seed)``."""
    return np.random.RandomState(seed).permutation(n).tolist()


def sample_train_dev(task: Task, examples: Sequence[TaskExample], *, num_train: int | None = None,
                     k_shot: int | None = None, num_dev: int = 0, seed: int = 0
                     ) -> tuple[list[TaskExample], list[TaskExample]]:
    """``(train, dev)`` drawn from the training split: ``k_shot`` per class when set (and the task has classes),
    else ``num_train`` in total (None: every example not in the dev set)."""
    if not examples:
        raise DataError(f"The {task.name} training split holds no examples. Point task.path at a split with records.")
    order = permutation(len(examples), seed)
    if k_shot is not None and all(ex.label is not None for ex in examples):
        return _per_class(task, examples, order, k_shot, num_dev)
    total = k_shot if k_shot is not None else num_train
    return _in_total(task, examples, order, total, num_dev)


def _in_total(task: Task, examples: Sequence[TaskExample], order: list[int], num_train: int | None,
              num_dev: int) -> tuple[list[TaskExample], list[TaskExample]]:
    wanted = len(order) if num_train is None else num_train + num_dev
    if len(order) <= num_dev:
        raise DataError(f"The {task.name} training split has {len(order)} examples, not more than the {num_dev} the "
                        "dev set takes, so none are left to train on. Lower task.num_dev or add examples.")
    if wanted > len(order):
        warnings.warn(f"{task.name}: {num_train} training + {num_dev} dev examples were asked for but the training "
                      f"split has {len(order)}; training on {len(order) - num_dev}.", stacklevel=3)
    chosen = [examples[i] for i in order[:wanted]]
    cut = len(chosen) - num_dev
    return chosen[:cut], chosen[cut:]


def _per_class(task: Task, examples: Sequence[TaskExample], order: list[int], k: int, num_dev: int
               ) -> tuple[list[TaskExample], list[TaskExample]]:
    counts: dict[int, int] = {}
    train, dev = [], []
    for i in order:
        ex = examples[i]
        seen = counts.get(ex.label, 0)
        if seen < k:
            train.append(ex)
        elif seen < k + num_dev:
            dev.append(ex)
        counts[ex.label] = seen + 1
    classes = range(max(len(examples[0].candidates), max(counts) + 1))
    short = [label for label in classes if counts.get(label, 0) < k + num_dev]
    if short:
        label = short[0]
        raise DataError(f"{task.name}: k_shot = {k} training + {num_dev} dev examples per class were asked for, but "
                        f"class {label} has only {counts.get(label, 0)} examples in the training split. Lower "
                        "task.k_shot or task.num_dev, or add examples.")
    return train, dev


def sample_eval(examples: Sequence[TaskExample], num_eval: int | None, seed: int = 0) -> list[TaskExample]:
    """``num_eval`` examples of the evaluation split (all of them when None or more than there are)."""
    if num_eval is None:
        return list(examples)
    return [examples[i] for i in permutation(len(examples), seed)[:num_eval]]


def dev_size(cfg: "TaskConfig", task: Task) -> int:
    """``task.num_dev``, or its default: ``k_shot`` per class with k-shot sampling, else mezo.sh's (500; 100
    for CB and Copa)."""
    if cfg.num_dev is not None:
        return cfg.num_dev
    return cfg.k_shot if cfg.k_shot is not None else task.default_num_dev


def trains_as_classification(cfg: "TaskConfig", task: Task) -> bool:
    """``task.train_as_classification``, or MeZO's choice for the task when unset."""
    value = task.train_as_classification if cfg.train_as_classification is None else cfg.train_as_classification
    if value and task.generation:
        raise ConfigError(f"task.train_as_classification = true, but {task.name} is a generation task with no "
                          "candidates to score. Set it to false (or unset it).")
    return value


def metric_name(cfg: "TaskConfig", task: Task) -> str:
    """``task.metric``, or the task's own ('accuracy'; 'f1' for SQuAD and DROP) for 'auto'."""
    if cfg.metric == "auto":
        return task.metric
    if (cfg.metric == "accuracy") == task.generation:
        options = "'f1' or 'em'" if task.generation else "'accuracy'"
        raise ConfigError(f"task.metric = {cfg.metric!r} does not apply to {task.name}; use {options} (or 'auto').")
    return cfg.metric


def load_task(cfg: "TaskConfig") -> TaskData:
    """Read ``cfg``'s task files and sample its train, dev and eval splits."""
    task = get_task(cfg.name)
    train_source, eval_source = split_sources(cfg.path, cfg.eval_path)
    evals = sample_eval(load_split(task, eval_source), cfg.num_eval, cfg.train_set_seed)
    if train_source is None:
        return TaskData(task, [], [], evals)
    train, dev = sample_train_dev(task, load_split(task, train_source), num_train=cfg.num_train, k_shot=cfg.k_shot,
                                  num_dev=dev_size(cfg, task), seed=cfg.train_set_seed)
    return TaskData(task, train, dev, evals)
