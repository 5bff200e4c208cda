"""TaskConfig: which MeZO task to train and evaluate on, how its few-shot splits are sampled and how it is scored
(the ``[task]`` section)."""

from __future__ import annotations

from dataclasses import dataclass

from zo2.config.base import require, require_choice

TASK_METRICS = ("auto", "accuracy", "f1", "em")


@dataclass(kw_only=True)
class TaskConfig:
    """A MeZO task (SST-2, SuperGLUE, SQuAD, DROP) read from local files, with MeZO's prompt templates.

    Splits are sampled as MeZO samples them: ``num_train`` + ``num_dev`` examples of the training split (or
    ``k_shot`` per class), and ``num_eval`` of the evaluation split, all seeded by ``train_set_seed``.
    ``zo2/tasks/README.md`` describes the tasks, file layouts and metrics.
    """

    name: str | None = None
    """Task: SST2, RTE, CB, BoolQ, WSC, WIC, MultiRC, Copa, ReCoRD, SQuAD or DROP (any case; '-' and '_' ignored).
    Unset (the default): no task; training reads the ``[data]`` section."""
    path: str | None = None
    """The task's data: a folder holding train.jsonl and val.jsonl (SuperGLUE jsonl, GLUE .tsv, or jsonl records
    of the Hugging Face datasets layout), or a datasets folder saved with save_to_disk with 'train' and
    'validation' splits. A single file or Dataset folder is the training split; set ``eval_path`` with it."""
    eval_path: str | None = None
    """The evaluation split (a file, or a folder as ``path``), when ``path`` does not hold it. Alone, without
    ``path``, it is enough for evaluation only."""
    k_shot: int | None = None
    """Training examples per class (in total for ReCoRD, SQuAD and DROP). When set, ``num_train`` is ignored."""
    num_train: int | None = 1000
    """Training examples in total (MeZO's 1000); unset: the whole training split minus the dev set."""
    num_dev: int | None = None
    """Dev examples, taken from the training split after the training ones (per class with ``k_shot``); 0: none.
    Unset: ``k_shot`` per class with ``k_shot``, else MeZO's 500 (100 for CB and Copa)."""
    num_eval: int | None = 1000
    """Evaluation examples sampled from the evaluation split (MeZO's 1000); unset: all of them."""
    train_set_seed: int = 0
    """Seed of the train/dev and eval sampling (MeZO's ``train_set_seed``)."""
    train_as_classification: bool | None = None
    """True: the loss is the cross-entropy over the candidates' answer log-likelihoods (MeZO's
    ``train_as_classification``); false: the cross-entropy of the gold answer's tokens. Unset: MeZO's choice
    (classification, except Copa, ReCoRD, SQuAD and DROP)."""
    length_normalize: bool = True
    """Score a candidate by the mean log-likelihood of its answer tokens (MeZO) rather than their sum, in the
    loss and in predictions."""
    max_length: int = 2048
    """Tokens per sequence, capped by ``data.max_length`` (raise that for long tasks: SQuAD, DROP, ReCoRD, MultiRC);
    longer prompts lose their beginning (after the BOS token), the answer is kept."""
    max_new_tokens: int = 50
    """Generation tasks: most tokens generated per answer (greedy; stops at a newline or EOS)."""
    eval_batch_size: int = 8
    """Examples per evaluation forward (a classification example brings one row per candidate)."""
    metric: str = "auto"
    """Metric that ranks checkpoints: 'accuracy', 'f1' or 'em'; 'auto': accuracy for classification, f1 for
    SQuAD and DROP."""

    def __post_init__(self) -> None:
        from zo2.tasks.registry import get_task  # the task package imports this module's neighbours

        if self.name is not None:
            self.name = get_task(self.name).name  # the canonical spelling, for logs and saved configs
        for key in ("path", "eval_path"):
            value = getattr(self, key)
            require(value is None or (isinstance(value, str) and value.strip() != ""), f"task.{key}", value,
                    "it must be a file or folder path, or unset.")
        for key in ("k_shot", "num_eval"):
            value = getattr(self, key)
            require(value is None or (_is_int(value) and value >= 1), f"task.{key}", value,
                    "it must be an integer >= 1, or unset.")
        for key in ("num_train", "num_dev"):
            value = getattr(self, key)
            require(value is None or (_is_int(value) and value >= 0), f"task.{key}", value,
                    "it must be an integer >= 0, or unset.")
        require(_is_int(self.train_set_seed) and self.train_set_seed >= 0, "task.train_set_seed",
                self.train_set_seed, "it must be a non-negative integer.")
        require(self.train_as_classification is None or isinstance(self.train_as_classification, bool),
                "task.train_as_classification", self.train_as_classification, "it must be true, false or unset.")
        require(isinstance(self.length_normalize, bool), "task.length_normalize", self.length_normalize,
                "it must be true or false.")
        require(_is_int(self.max_new_tokens) and self.max_new_tokens >= 1, "task.max_new_tokens",
                self.max_new_tokens, "it must be an integer >= 1.")
        require(_is_int(self.max_length) and self.max_length >= self.max_new_tokens + 2, "task.max_length",
                self.max_length, f"it must be an integer >= task.max_new_tokens + 2 = {self.max_new_tokens + 2} "
                "(room for a prompt and the generated answer).")
        require(_is_int(self.eval_batch_size) and self.eval_batch_size >= 1, "task.eval_batch_size",
                self.eval_batch_size, "it must be an integer >= 1.")
        require_choice("task.metric", self.metric, TASK_METRICS)


def _is_int(value: object) -> bool:
    """True for an int that is not a bool."""
    return isinstance(value, int) and not isinstance(value, bool)
