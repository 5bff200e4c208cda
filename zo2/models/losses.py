"""The engine's default loss and how a batch's loss is weighted across data-parallel ranks."""

from __future__ import annotations

from typing import Any, Callable, Mapping

import torch

from zo2.models.base import causal_lm_loss

LossFn = Callable[[torch.Tensor, Mapping[str, torch.Tensor]], torch.Tensor]
"""``loss_fn(logits, batch) -> scalar tensor``: any scalar function of the logits (need not be differentiable)."""


def default_labels(batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """``batch['labels']``, or the input ids with padding masked out when the batch has no labels."""
    if "labels" in batch:
        return batch["labels"]
    labels = batch["input_ids"].clone()
    if "attention_mask" in batch:
        labels[batch["attention_mask"] == 0] = -100
    return labels


def loss_tokens(batch: Mapping[str, torch.Tensor]) -> int:
    """Tokens the causal-LM loss of ``batch`` averages over (labels shifted by one, -100 ignored)."""
    return int((default_labels(batch)[..., 1:] != -100).sum())


def loss_weight(loss_fn: Any, batch: Mapping[str, torch.Tensor]) -> float:
    """What ``loss_fn``'s value on ``batch`` averages over — ``loss_fn.weight(batch)`` when it says, else the loss
    tokens: data-parallel ranks weight their shard's loss by it, so the combined loss is the full batch's."""
    return getattr(loss_fn, "weight", loss_tokens)(batch)


def default_loss(logits: torch.Tensor, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
    return causal_lm_loss(logits, default_labels(batch))
