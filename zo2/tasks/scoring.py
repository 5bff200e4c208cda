"""Candidate scoring: MeZO's ``train_as_classification`` loss and the argmax prediction.

A candidate's score is the log-likelihood of its answer tokens under the model (their mean, MeZO's
length-normalized score, or their sum). The loss is the cross-entropy of the gold candidate among its example's
candidates, averaged over the examples of the batch; the prediction is the candidate with the highest score.

Everything stays on the logits' device and needs no host synchronization: candidates are grouped with
scatter operations, so examples may have different numbers of candidates (ReCoRD).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Mapping, Sequence

import torch
from torch.nn import functional as F

from zo2.errors import DataError
from zo2.models.base import causal_lm_loss
from zo2.tasks.encoding import EncodedExample

if TYPE_CHECKING:
    from zo2.engine import LossFn

CANDIDATE_KEYS = ("input_ids", "option_mask", "candidate_group", "candidate_gold")


def _require(batch: Mapping[str, torch.Tensor]) -> None:
    missing = [k for k in CANDIDATE_KEYS if k not in batch]
    if missing:
        raise DataError(f"The candidate-scoring loss needs the batch tensors {missing}, which only "
                        "zo2.tasks.collate_examples makes: build the batches with zo2.tasks (TaskLoader). SQuAD and "
                        "DROP have no candidates; evaluate them on an engine whose loss is task_loss_fn(False), and "
                        "train without the candidate loss with task.train_as_classification = false.")


def candidate_scores(logits: torch.Tensor, batch: Mapping[str, torch.Tensor], *,
                     length_normalize: bool = True) -> torch.Tensor:
    """Per row: the log-likelihood of its answer tokens (float32; mean over them when ``length_normalize``)."""
    _require(batch)
    device = logits.device
    mask = batch["option_mask"].to(device)[:, 1:].bool()
    targets = batch["input_ids"].to(device)[:, 1:].masked_fill(~mask, -100)
    shifted = logits[:, :-1]
    shifted = shifted.double() if shifted.dtype == torch.float64 else shifted.float()
    nll = F.cross_entropy(shifted.reshape(-1, shifted.size(-1)), targets.reshape(-1), ignore_index=-100,
                          reduction="none").view(targets.shape)
    scores = -nll.sum(-1)
    return scores / mask.sum(-1).clamp(min=1) if length_normalize else scores


def grouped_cross_entropy(scores: torch.Tensor, group: torch.Tensor, gold: torch.Tensor) -> torch.Tensor:
    """Mean over groups of ``logsumexp(scores of the group) - score of its gold row``."""
    rows = scores.shape[0]
    group, gold = group.to(scores.device), gold.to(scores.device).bool()
    top = torch.full((rows,), float("-inf"), dtype=scores.dtype, device=scores.device)
    top = top.scatter_reduce(0, group, scores, reduce="amax")
    total = torch.zeros_like(top).index_add(0, group, torch.exp(scores - top[group]))
    gold_score = torch.zeros_like(top).index_add(0, group, torch.where(gold, scores, torch.zeros_like(scores)))
    has_gold = torch.zeros_like(top).index_add(0, group, gold.to(scores.dtype)) > 0
    losses = torch.where(has_gold, top + torch.log(total) - gold_score, torch.zeros_like(top))
    return losses.sum() / has_gold.sum().clamp(min=1)


def candidate_loss(logits: torch.Tensor, batch: Mapping[str, torch.Tensor], *,
                   length_normalize: bool = True) -> torch.Tensor:
    """MeZO's classification loss: cross-entropy over the candidates' answer log-likelihoods (a scalar)."""
    scores = candidate_scores(logits, batch, length_normalize=length_normalize)
    return grouped_cross_entropy(scores, batch["candidate_group"], batch["candidate_gold"])


def candidate_weight(batch: Mapping[str, torch.Tensor]) -> int:
    """Examples the candidate loss of ``batch`` averages over (groups with a gold row): the weight of a shard's
    loss when data-parallel ranks combine theirs."""
    group, gold = batch["candidate_group"], batch["candidate_gold"].bool()
    return int(torch.unique(group[gold]).numel())


candidate_loss.weight = candidate_weight  # type: ignore[attr-defined]


def answer_loss(logits: torch.Tensor, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """Cross-entropy of the gold answer's tokens (``labels``): MeZO's loss without ``train_as_classification``.
    A batch without labels (a generation prompt) scores all its non-padding tokens."""
    labels = batch.get("labels")
    if labels is None:
        mask = batch.get("attention_mask")
        labels = batch["input_ids"] if mask is None else batch["input_ids"].masked_fill(mask == 0, -100)
    return causal_lm_loss(logits, labels)


def task_loss_fn(train_as_classification: bool, *, length_normalize: bool = True) -> "LossFn":
    """The ``loss_fn(logits, batch)`` to give :class:`~zo2.engine.ZOEngine` for task batches."""
    if not train_as_classification:
        return answer_loss

    def loss_fn(logits: torch.Tensor, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        return candidate_loss(logits, batch, length_normalize=length_normalize)

    loss_fn.weight = candidate_weight  # type: ignore[attr-defined]

    return loss_fn


def predict(scores: Sequence[float], encoded: Sequence[EncodedExample]) -> list[int]:
    """Per example, the row of its highest-scoring candidate (the first on ties), given every row's score in
    batch order."""
    out, start = [], 0
    for ex in encoded:
        mine = list(scores[start: start + len(ex.rows)])
        out.append(max(range(len(mine)), key=mine.__getitem__))
        start += len(ex.rows)
    return out
