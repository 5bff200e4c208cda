"""Evaluating a model on a task through ``engine.evaluate`` only, so a streamed model evaluates on one GPU.

Classification: every candidate of an example is scored (the log-likelihood of its answer tokens, MeZO's
length-normalized score by default) and the best one is the prediction; the metric is accuracy. Generation
(SQuAD, DROP): the answer is decoded greedily until a newline, EOS or ``max_new_tokens``, stripped, and scored
with SQuAD F1 and exact match against the references.
"""

from __future__ import annotations

from typing import Any, Iterator, Sequence

from zo2.tasks.base import Task, TaskExample
from zo2.tasks.encoding import collate_examples, decode, encode_example, encode_prompt, stop_ids
from zo2.tasks.generation import LogitsFn, greedy_generate
from zo2.tasks.metrics import accuracy, qa_scores
from zo2.tasks.registry import get_task
from zo2.tasks.scoring import candidate_scores, predict
from zo2.train.tokenizer import special_ids


def evaluate_task(engine: Any, task: Task | str, examples: Sequence[TaskExample], tokenizer: Any, *,
                  batch_size: int = 8, max_length: int = 2048, max_new_tokens: int = 50,
                  length_normalize: bool = True, demonstrations: Sequence[TaskExample] = (),
                  progress: bool = True, desc: str | None = None,
                  return_predictions: bool = False) -> dict[str, Any]:
    """Score ``engine``'s current weights on ``examples`` of ``task`` with ``engine.evaluate`` only.

    Returns ``{"accuracy", "examples"}`` for classification tasks and ``{"f1", "em", "examples"}`` for SQuAD and
    DROP, plus ``"predictions"`` (candidate indices, or generated answers) when ``return_predictions``.
    ``progress=False`` silences the progress bar.
    """
    def logits_fn(batch):
        return engine.evaluate(batch).logits

    return evaluate_with(logits_fn, task, examples, tokenizer, batch_size=batch_size, max_length=max_length,
                         max_new_tokens=max_new_tokens, length_normalize=length_normalize,
                         demonstrations=demonstrations, progress=progress, desc=desc,
                         return_predictions=return_predictions)


def evaluate_with(logits_fn: LogitsFn, task: Task | str, examples: Sequence[TaskExample], tokenizer: Any, *,
                  batch_size: int = 8, max_length: int = 2048, max_new_tokens: int = 50,
                  length_normalize: bool = True, demonstrations: Sequence[TaskExample] = (),
                  progress: bool = True, desc: str | None = None,
                  return_predictions: bool = False) -> dict[str, Any]:
    """:func:`evaluate_task` with any ``logits_fn(batch) -> logits`` (e.g. ``lambda b: model(**b).logits``)."""
    task = get_task(task)
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    bar = _progress(len(examples), progress, desc or f"eval {task.name}")
    try:
        if task.generation:
            answers = _generate(logits_fn, task, examples, tokenizer, bar, batch_size, max_length,
                                max_new_tokens, demonstrations)
            result: dict[str, Any] = qa_scores(answers, [ex.answers for ex in examples])
            predictions: list[Any] = answers
        else:
            predictions, right = _classify(logits_fn, task, examples, tokenizer, bar, batch_size, max_length,
                                           length_normalize, demonstrations)
            result = {"accuracy": accuracy(predictions, right)}
    finally:
        bar.close()
    result["examples"] = len(examples)
    if return_predictions:
        result["predictions"] = predictions
    return result


def _chunks(examples: Sequence[TaskExample], size: int) -> Iterator[Sequence[TaskExample]]:
    for start in range(0, len(examples), size):
        yield examples[start: start + size]


def _classify(logits_fn: LogitsFn, task: Task, examples: Sequence[TaskExample], tokenizer: Any, bar: Any,
              batch_size: int, max_length: int, length_normalize: bool,
              demonstrations: Sequence[TaskExample]) -> tuple[list[int], list[tuple[int, ...]]]:
    """Predicted candidate per example, and the correct candidates of each."""
    pad, _ = special_ids(tokenizer)
    predictions, right = [], []
    for chunk in _chunks(examples, batch_size):
        encoded = [encode_example(task, ex, tokenizer, max_length=max_length, demonstrations=demonstrations)
                   for ex in chunk]
        batch = collate_examples(encoded, pad)
        scores = candidate_scores(logits_fn(batch), batch, length_normalize=length_normalize)
        predictions += predict(scores.tolist(), encoded)  # host sync: one per batch, the rows' scores
        right += [ex.correct for ex in encoded]
        bar.update(len(chunk))
    return predictions, right


def _generate(logits_fn: LogitsFn, task: Task, examples: Sequence[TaskExample], tokenizer: Any, bar: Any,
              batch_size: int, max_length: int, max_new_tokens: int,
              demonstrations: Sequence[TaskExample]) -> list[str]:
    """The generated answer of each example, stripped."""
    pad, _ = special_ids(tokenizer)
    stops = stop_ids(tokenizer)
    answers = []
    for chunk in _chunks(examples, batch_size):
        prompts = [encode_prompt(task, ex, tokenizer, max_length=max_length, max_new_tokens=max_new_tokens,
                                 demonstrations=demonstrations) for ex in chunk]
        generated = greedy_generate(logits_fn, prompts, max_new_tokens=max_new_tokens, stop_ids=stops, pad_id=pad)
        answers += [decode(tokenizer, ids).strip() for ids in generated]
        bar.update(len(chunk))
    return answers


class _NoBar:
    def update(self, n: int) -> None:
        pass

    def close(self) -> None:
        pass


def _progress(total: int, enabled: bool, desc: str) -> Any:
    """A tqdm bar over the examples, or a silent stand-in."""
    if not enabled:
        return _NoBar()
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="ex", dynamic_ncols=True, leave=False)
