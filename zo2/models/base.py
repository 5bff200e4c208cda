"""Block adapters: a Hugging Face causal LM seen as ``embed → blocks[0..L) → head``.

An adapter never copies the model's code: it calls the model's own submodules (embeddings, decoder layers,
final norm, lm_head) and the library's own helpers (causal-mask construction, rotary embeddings) in the order
the model's ``forward`` does, so the loss it computes equals the model's own ``forward(..., labels=...)`` loss.

The engine treats the three parts as *units* whose parameters it perturbs and updates; a unit's parameters
are found from the modules the adapter names (``embed_modules``, ``blocks``, ``head_modules``). Everything the
blocks need besides the hidden states (attention mask, position ids, rotary cos/sin) goes in a ``ctx`` dict
computed once per batch by ``embed``; it must not depend on trainable parameters, so the perturbed forwards
of one step share it.

Adding a family is one small file: subclass :class:`BlockAdapter`, set ``model_types``, decorate it with
:func:`register_adapter` and import it in ``zo2/models/__init__.py``.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any, ClassVar

import torch
from torch import nn

from zo2.errors import ModelError

_REGISTRY: dict[str, type["BlockAdapter"]] = {}


class BlockAdapter(ABC):
    """``embed → blocks → head`` view of one causal-LM family."""

    model_types: ClassVar[tuple[str, ...]] = ()
    """The ``config.model_type`` values this adapter handles."""

    def __init__(self, model: nn.Module):
        self.model = model
        self.config = model.config

    @abstractmethod
    def embed_modules(self) -> list[nn.Module]:
        """Modules holding the embedding unit's parameters (token/position embeddings, input projection)."""

    @abstractmethod
    def blocks(self) -> list[nn.Module]:
        """The decoder layers, in order."""

    @abstractmethod
    def head_modules(self) -> list[nn.Module]:
        """Modules holding the head unit's parameters (final norm, output projection, lm_head)."""

    @abstractmethod
    def embed(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> tuple[torch.Tensor, dict[str, Any]]:
        """Hidden states entering block 0, and the per-batch context every block needs."""

    def block(self, index: int, hidden: torch.Tensor, ctx: dict[str, Any]) -> torch.Tensor:
        """Run decoder layer ``index``; the default calls it with ``ctx`` as keyword arguments."""
        out = self.blocks()[index](hidden, **ctx)
        return out[0] if isinstance(out, tuple) else out

    @abstractmethod
    def head(self, hidden: torch.Tensor, ctx: dict[str, Any]) -> torch.Tensor:
        """Logits ``[batch, seq, vocab]`` from the hidden states leaving the last block."""


def register_adapter(cls: type[BlockAdapter]) -> type[BlockAdapter]:
    """Class decorator: make ``cls`` the adapter for each of its ``model_types``."""
    for model_type in cls.model_types:
        _REGISTRY[model_type] = cls
    return cls


def supported_model_types() -> list[str]:
    return sorted(_REGISTRY)


def adapter_for(model: nn.Module) -> BlockAdapter:
    """The registered adapter for ``model`` (by ``model.config.model_type``)."""
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    if model_type is None:
        raise ModelError(
            f"{type(model).__name__} has no Hugging Face config with a model_type, so zo2 cannot split it into "
            "embed, blocks and head. Pass a transformers causal-LM model (e.g. AutoModelForCausalLM)."
        )
    if model_type not in _REGISTRY:
        raise ModelError(
            f"Model type '{model_type}' ({type(model).__name__}) has no zo2 block adapter. Supported: "
            f"{', '.join(supported_model_types())}. Adding a family is one file in zo2/models/ (see base.py)."
        )
    return _REGISTRY[model_type](model)


def causal_lm_loss(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = -100) -> torch.Tensor:
    """Mean next-token cross-entropy, as Hugging Face's causal-LM loss (labels shifted by one).

    Computed in float32 (float64 for float64 logits, so finite-difference checks can run in double precision).
    """
    logits = logits[..., :-1, :]
    logits = logits.double() if logits.dtype == torch.float64 else logits.float()
    target = labels[..., 1:].to(logits.device)
    return nn.functional.cross_entropy(
        logits.reshape(-1, logits.size(-1)), target.reshape(-1), ignore_index=ignore_index, reduction="mean"
    )
