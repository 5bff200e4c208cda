"""Examples → token rows → batches, as MeZO's ``encode_prompt`` builds them.

The text of an example is its template's text stripped of surrounding spaces, after the in-context
demonstrations (each the verbalized gold answer, joined by the task's separator, ``"\\n\\n"``). A candidate's
*answer tokens* are the last ``option_len`` tokens of its row, where ``option_len`` is how many tokens the
verbalized text has beyond the prompt text. Rows longer than ``max_length`` lose their beginning (after the BOS
token); the answer is kept.

A batch of classification examples has one row per candidate and carries, besides ``input_ids``,
``attention_mask`` and ``labels`` (the gold row's answer tokens, so the plain causal-LM loss is MeZO's
loss on the gold answer):

* ``option_mask`` (rows × length): 1 on each row's answer tokens;
* ``candidate_group`` (rows): which example of the batch the row belongs to;
* ``candidate_gold`` (rows): 1 on the row of the example's training target.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import torch

from zo2.config.data import DataConfig
from zo2.errors import DataError
from zo2.tasks.base import Task, TaskExample
from zo2.train.data import IGNORE_INDEX, BatchLoader, shard_bounds
from zo2.train.tokenizer import ByteTokenizer, encode, special_ids


@dataclass(frozen=True)
class EncodedExample:
    """The token rows of one example: one per candidate, or the gold answer's row alone."""

    rows: tuple[tuple[int, ...], ...]
    option_lens: tuple[int, ...]
    """How many tokens at the end of each row are the answer."""
    gold: int
    """Row of the training target."""
    correct: tuple[int, ...]
    """Rows of every correct candidate (accuracy counts a prediction among them as right)."""

    @property
    def width(self) -> int:
        return max(len(r) for r in self.rows)


# ----------------------------------------------------------------------------------------------------------
# Text
# ----------------------------------------------------------------------------------------------------------

def demonstrations_text(task: Task, demonstrations: Sequence[TaskExample]) -> str:
    """The in-context demonstrations: each verbalized with its gold answer, joined by the task's separator."""
    return task.separator.join(task.verbalize(d, d.target).strip() for d in demonstrations).strip()


def _after_demonstrations(task: Task, text: str, demonstrations: Sequence[TaskExample]) -> str:
    return (demonstrations_text(task, demonstrations) + task.separator + text).lstrip().strip(" ")


def prompt_text(task: Task, example: TaskExample, demonstrations: Sequence[TaskExample] = ()) -> str:
    """What the model reads before it answers (a generation task's prompt)."""
    return _after_demonstrations(task, task.prompt(example).strip(" "), demonstrations)


def candidate_texts(task: Task, example: TaskExample, demonstrations: Sequence[TaskExample] = ()) -> list[str]:
    """Each candidate's full text (classification), or the gold answer's (generation)."""
    options = example.candidates if example.candidates else (example.target,)
    return [_after_demonstrations(task, task.verbalize(example, c).strip(" "), demonstrations) for c in options]


# ----------------------------------------------------------------------------------------------------------
# Tokens
# ----------------------------------------------------------------------------------------------------------

def truncate(ids: list[int], max_length: int, keep_first: bool) -> list[int]:
    """The last ``max_length`` tokens, or the first (BOS) and the last ``max_length - 1`` when ``keep_first``."""
    if len(ids) <= max_length:
        return ids
    return ids[:1] + ids[1:][-(max_length - 1):] if keep_first else ids[-max_length:]


def _keeps_bos(tokenizer: Any) -> bool:
    return getattr(tokenizer, "bos_token_id", None) is not None


def encode_example(task: Task, example: TaskExample, tokenizer: Any, *, max_length: int = 2048,
                   all_candidates: bool = True, demonstrations: Sequence[TaskExample] = ()) -> EncodedExample:
    """Token rows of ``example``: every candidate's (``all_candidates``, classification tasks) or the gold
    answer's alone (training without the candidate loss, and generation tasks)."""
    if example.candidates and all_candidates:
        options, gold, correct = list(example.candidates), example.correct[0], tuple(example.correct)
    else:
        options, gold, correct = [example.target], 0, (0,)
    prompt_len = len(encode(tokenizer, task.prompt(example).strip(" "), add_bos=True))
    rows, lens = [], []
    for option in options:
        verbalized = task.verbalize(example, option).strip(" ")
        option_len = len(encode(tokenizer, verbalized, add_bos=True)) - prompt_len
        if option_len < 1:
            raise DataError(f"{task.name}: the answer {option!r} adds no tokens to the prompt "
                            f"{task.prompt(example)[-60:]!r}, so it cannot be scored. Check the record's fields.")
        ids = encode(tokenizer, _after_demonstrations(task, verbalized, demonstrations), add_bos=True)
        ids = truncate(ids, max_length, _keeps_bos(tokenizer))
        rows.append(tuple(ids))
        lens.append(min(option_len, len(ids) - 1))
    return EncodedExample(tuple(rows), tuple(lens), gold, correct)


def encode_prompt(task: Task, example: TaskExample, tokenizer: Any, *, max_length: int = 2048,
                  max_new_tokens: int = 50, demonstrations: Sequence[TaskExample] = ()) -> list[int]:
    """A generation prompt's tokens, cut to leave room for ``max_new_tokens``."""
    ids = encode(tokenizer, prompt_text(task, example, demonstrations), add_bos=True)
    return truncate(ids, max_length - max_new_tokens, _keeps_bos(tokenizer))


def stop_ids(tokenizer: Any) -> set[int]:
    """Tokens that end a generated answer: the newline's first token and EOS (MeZO's ``eos_token="\\n"``)."""
    _, eos = special_ids(tokenizer)
    newline = encode(tokenizer, "\n", add_bos=False)
    return {i for i in (newline[0] if newline else None, eos) if i is not None}


def decode(tokenizer: Any, ids: Sequence[int]) -> str:
    """The text of ``ids`` with special tokens skipped, either kind of tokenizer."""
    if isinstance(tokenizer, ByteTokenizer):
        return tokenizer.decode(ids)
    return tokenizer.decode(list(ids), skip_special_tokens=True)


# ----------------------------------------------------------------------------------------------------------
# Batches
# ----------------------------------------------------------------------------------------------------------

def collate_examples(encoded: Sequence[EncodedExample], pad_id: int, pad_to: int | None = None
                     ) -> dict[str, torch.Tensor]:
    """Right-padded int64 rows of every example (see the module docstring for the tensors)."""
    rows = [(g, r, ex) for g, ex in enumerate(encoded) for r in range(len(ex.rows))]
    width = max([ex.width for ex in encoded] + [pad_to or 0])
    shape = (len(rows), width)
    batch = {"input_ids": torch.full(shape, pad_id, dtype=torch.int64),
             "attention_mask": torch.zeros(shape, dtype=torch.int64),
             "labels": torch.full(shape, IGNORE_INDEX, dtype=torch.int64),
             "option_mask": torch.zeros(shape, dtype=torch.int64),
             "candidate_group": torch.zeros(len(rows), dtype=torch.int64),
             "candidate_gold": torch.zeros(len(rows), dtype=torch.int64)}
    for n, (g, r, ex) in enumerate(rows):
        ids, option = torch.tensor(ex.rows[r], dtype=torch.int64), ex.option_lens[r]
        length = len(ids)
        batch["input_ids"][n, :length] = ids
        batch["attention_mask"][n, :length] = 1
        batch["option_mask"][n, length - option: length] = 1
        batch["candidate_group"][n] = g
        if r == ex.gold:
            batch["candidate_gold"][n] = 1
            batch["labels"][n, length - option: length] = ids[length - option:]
    return batch


class TaskLoader(BatchLoader):
    """:class:`~zo2.train.data.BatchLoader` over encoded task examples: the same deterministic, resumable and
    sharded order; a global batch is ``batch_size`` examples, each with all its rows."""

    def __init__(self, cfg: DataConfig, tokenizer: Any, encoded: Sequence[EncodedExample], *, rank: int = 0,
                 world_size: int = 1):
        if len(encoded) < cfg.batch_size and cfg.drop_last:
            raise DataError(f"The task has {len(encoded)} training examples, fewer than one batch (data.batch_size = "
                            f"{cfg.batch_size}). Raise task.num_train or task.k_shot, lower data.batch_size, or set "
                            "data.drop_last = false.")
        super().__init__(cfg, tokenizer, rank=rank, world_size=world_size, examples=encoded)  # type: ignore[arg-type]

    def next_batch(self) -> dict[str, torch.Tensor]:
        """This rank's shard of the next global batch (every shard padded to the global batch's longest row)."""
        epoch, index = self._normalized(self._epoch, self._index)
        chosen = self._epoch_order(epoch)[index: index + self.cfg.batch_size].tolist()
        start, stop = shard_bounds(len(chosen), self.rank, self.world_size)
        width = max(self.examples[k].width for k in chosen)  # type: ignore[attr-defined]
        batch = collate_examples([self.examples[k] for k in chosen[start:stop]], self.pad_id,  # type: ignore[misc]
                                 pad_to=width)
        self._epoch, self._index = self._normalized(epoch, index + len(chosen))
        return batch
