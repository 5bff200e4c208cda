"""Block adapters: a Hugging Face causal LM seen as ``embed → blocks[0..L) → head``.

An adapter never copies the model's code: it calls the model's own submodules (embeddings, decoder layers,
final norm, lm_head) and the library's own helpers (causal-mask construction, rotary embeddings) in the order
the model's ``forward`` does, so the loss it computes equals the model's own ``forward(..., labels=...)`` loss.

The engine treats the three parts as *units* whose parameters it perturbs and updates; a unit's parameters
are found from the modules the adapter names (``embed_modules``, ``blocks``, ``head_modules``). Everything the
blocks need besides the hidden states (attention mask, position ids, rotary cos/sin) goes in a ``ctx`` dict
returned by ``embed``. The engine keeps the ``ctx`` of each perturbed point apart: a family adapter's does not
depend on trainable parameters, but a wrapper's may (PEFT prefix tuning puts each point's key/value prefixes in
it, zo2/models/peft_adapter.py).

An adapter with ``supports_prefix`` takes a ``cache`` (a transformers ``Cache``) in ``embed`` and ``block``: key/value
states in front of the input, counted by positions and the causal mask as the model's ``forward`` counts
``past_key_values``, and read by the layer's attention.

Adding a family is one small file: subclass :class:`BlockAdapter`, set ``model_types``, decorate it with
:func:`register_adapter` and import it in ``zo2/models/__init__.py``.
"""

from __future__ import annotations

import functools
import inspect
import sys
from abc import ABC, abstractmethod
from typing import Any, Callable, ClassVar

import torch
from torch import nn

from zo2.errors import ModelError

_REGISTRY: dict[str, type["BlockAdapter"]] = {}


class BlockAdapter(ABC):
    """``embed → blocks → head`` view of one causal-LM family."""

    model_types: ClassVar[tuple[str, ...]] = ()
    """The ``config.model_type`` values this adapter handles."""
    supports_prefix: ClassVar[bool] = False
    """Whether ``embed`` and ``block`` take a ``cache`` of key/value prefixes (PEFT prefix tuning)."""

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
        """Hidden states entering block 0, and the per-batch context every block needs. With ``supports_prefix``
        it also takes ``cache=``: the prefix cache, whose length shifts positions and widens the causal mask
        (``attention_mask`` then already covers the prefix)."""

    def block(self, index: int, hidden: torch.Tensor, ctx: dict[str, Any], cache: Any = None) -> torch.Tensor:
        """Run decoder layer ``index``; the default calls it with ``ctx`` (and ``cache``) as keyword arguments."""
        layer = self.blocks()[index]
        out = layer(hidden, **ctx, **layer_cache_kwargs(layer, cache))
        return out[0] if isinstance(out, tuple) else out

    @abstractmethod
    def head(self, hidden: torch.Tensor, ctx: dict[str, Any]) -> torch.Tensor:
        """Logits ``[batch, seq, vocab]`` from the hidden states leaving the last block."""


_CACHE_ARGUMENTS = ("cache", "past_key_values", "past_key_value", "layer_past")
"""What a decoder layer's ``forward`` calls its KV cache, newest transformers first."""


@functools.lru_cache(maxsize=None)
def _cache_argument(layer_class: type[nn.Module]) -> str | None:
    names = inspect.signature(layer_class.forward).parameters  # follows the deprecation decorators' wraps
    return next((name for name in _CACHE_ARGUMENTS if name in names), None)


def layer_cache_kwargs(layer: nn.Module, cache: Any) -> dict[str, Any]:
    """``{argument: cache}`` for ``layer``'s forward (the argument was renamed across transformers releases);
    ``{}`` when ``cache`` is None."""
    if cache is None:
        return {}
    name = _cache_argument(type(layer))
    if name is None:
        raise ModelError(f"{type(layer).__name__}.forward takes no KV cache (none of {', '.join(_CACHE_ARGUMENTS)}), "
                         "so key/value prefixes cannot reach its attention.")
    return {name: cache}


def register_adapter(cls: type[BlockAdapter]) -> type[BlockAdapter]:
    """Class decorator: make ``cls`` the adapter for each of its ``model_types``."""
    for model_type in cls.model_types:
        _REGISTRY[model_type] = cls
    return cls


def supported_model_types() -> list[str]:
    return sorted(_REGISTRY)


def prefix_model_types() -> list[str]:
    """The model types whose adapter takes key/value prefixes (``supports_prefix``)."""
    return sorted(t for t, cls in _REGISTRY.items() if cls.supports_prefix)


def base_checkpoint_name(name: str) -> str:
    """A PEFT model's name of a base-model parameter as the base model's own checkpoint names it, or names it
    without the base-model prefix that the loaders add back (LoRA: ``base_model.model.X.q_proj.base_layer.weight``
    → ``X.q_proj.weight``; prompt learning: ``base_model.lm_head.weight`` → ``lm_head.weight``)."""
    for wrapper in ("base_model.model.", "base_model."):
        if name.startswith(wrapper):
            name = name[len(wrapper):]
            break
    return name.replace(".base_layer.", ".")


def is_peft_model(model: nn.Module) -> bool:
    """Whether ``model`` is a ``peft`` PeftModel (without importing peft: a PeftModel exists only if it was)."""
    peft = sys.modules.get("peft")
    return peft is not None and isinstance(model, peft.PeftModel)


_WRAPPERS: list[tuple[Callable[[nn.Module], bool], Callable[[nn.Module], "BlockAdapter"]]] = []
"""(recognizes, adapter) pairs for models that wrap a causal LM (a peft PeftModel): checked before model_type."""


def register_wrapper(recognizes: Callable[[nn.Module], bool], adapter: Callable[[nn.Module], "BlockAdapter"]) -> None:
    """Let ``adapter(model)`` build the adapter of every model ``recognizes`` (:mod:`zo2.models.peft_adapter`
    registers the PeftModel case this way, so this module imports nothing above it)."""
    _WRAPPERS.append((recognizes, adapter))


def adapter_for(model: nn.Module) -> BlockAdapter:
    """The registered adapter for ``model`` (by ``model.config.model_type``). A ``peft`` PeftModel is seen through
    to its base causal LM (:mod:`zo2.models.peft_adapter`, registered with :func:`register_wrapper`)."""
    for recognizes, adapter in _WRAPPERS:
        if recognizes(model):
            return adapter(model)
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


LOSS_CHUNK_BYTES = 64 << 20
"""The float32 logits the loss holds at once: longer batches are scored in chunks of tokens (the logits of a
2048-token OPT batch in float32 are 412 MB, twice that with the log-softmax)."""


def causal_lm_loss(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = -100) -> torch.Tensor:
    """Mean next-token cross-entropy, as Hugging Face's causal-LM loss (labels shifted by one).

    Computed in float32 (float64 for float64 logits, so finite-difference checks can run in double precision),
    in chunks of tokens whose float32 logits fit :data:`LOSS_CHUNK_BYTES` (one piece when they all do: then the
    result is Hugging Face's to the bit; chunked, the per-token terms are summed chunk by chunk)."""
    dtype = torch.float64 if logits.dtype == torch.float64 else torch.float32
    vocab = logits.size(-1)
    target = labels[..., 1:].to(logits.device)
    per_chunk = max(1, LOSS_CHUNK_BYTES // (vocab * 8))
    if target.numel() <= per_chunk:
        flat = logits[..., :-1, :].to(dtype).reshape(-1, vocab)
        return nn.functional.cross_entropy(flat, target.reshape(-1), ignore_index=ignore_index, reduction="mean")
    rows = logits.reshape(-1, logits.size(-2), vocab)  # (sequences, tokens, vocab): each sequence's rows contiguous
    targets = target.reshape(rows.size(0), -1)
    total = torch.zeros((), dtype=dtype, device=logits.device)
    for seq, tgt in zip(rows, targets):
        for lo in range(0, tgt.numel(), per_chunk):  # token t's logits score label t + 1
            part = tgt[lo : lo + per_chunk]
            total += nn.functional.cross_entropy(seq[lo : lo + part.numel()].to(dtype), part,
                                                 ignore_index=ignore_index, reduction="sum")
    return total / (target != ignore_index).sum().to(dtype)