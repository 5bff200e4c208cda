"""MeZO's task suite: SST-2, RTE, CB, BoolQ, WSC, WiC, MultiRC, Copa, ReCoRD, SQuAD and DROP.

Tasks read local files (SuperGLUE/GLUE files or Hugging Face ``datasets`` layouts), format examples with MeZO's
prompt templates, sample few-shot splits as MeZO does, train with MeZO's losses (the candidate-scoring
``train_as_classification`` loss, or the gold answer's tokens) and evaluate through ``engine.evaluate`` only:
accuracy by candidate scoring, SQuAD F1/EM of greedily generated answers. ``README.md`` in this folder has more.
"""

from zo2.tasks.base import CLASSIFICATION, GENERATION, Task, TaskExample
from zo2.tasks.encoding import (EncodedExample, TaskLoader, candidate_texts, collate_examples, decode,
                                encode_example, encode_prompt, prompt_text, stop_ids)
from zo2.tasks.evaluate import evaluate_task, evaluate_with
from zo2.tasks.generation import greedy_generate
from zo2.tasks.io import find_split, load_split, split_sources
from zo2.tasks.metrics import accuracy, exact_match, f1_score, normalize_answer, qa_scores, token_f1
from zo2.tasks.registry import TASKS, get_task, task_names
from zo2.tasks.scoring import (answer_loss, candidate_loss, candidate_scores, grouped_cross_entropy, predict,
                               task_loss_fn)
from zo2.tasks.splits import (TaskData, dev_size, load_task, metric_name, permutation, sample_eval,
                              sample_train_dev, trains_as_classification)

__all__ = [
    "CLASSIFICATION", "GENERATION", "TASKS", "EncodedExample", "Task", "TaskData", "TaskExample", "TaskLoader",
    "accuracy", "answer_loss", "candidate_loss", "candidate_scores", "candidate_texts", "collate_examples",
    "decode", "dev_size", "encode_example", "encode_prompt", "evaluate_task", "evaluate_with", "exact_match",
    "f1_score", "find_split", "get_task", "greedy_generate", "grouped_cross_entropy", "load_split", "load_task",
    "metric_name", "normalize_answer", "permutation", "predict", "prompt_text", "qa_scores", "sample_eval",
    "sample_train_dev", "split_sources", "stop_ids", "task_loss_fn", "task_names", "token_f1",
    "trains_as_classification",
]
