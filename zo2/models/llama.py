"""Block adapters for the Llama family of decoders: Llama, Mistral, Qwen2, Qwen3 and look-alikes.

These models share one layout, ``model.embed_tokens → model.layers[i] → model.norm → lm_head``, with rotary
position embeddings computed once per batch by ``model.rotary_emb`` (a module without trainable parameters).
They differ only in which attention mask each layer gets:

* Llama (and families whose ``forward`` is Llama's): one causal mask for every layer;
* Mistral: one mask for every layer, sliding-window when ``config.sliding_window`` is set;
* Qwen2 / Qwen3 (and SmolLM3): a mask per ``config.layer_types[i]`` (``full_attention`` or
  ``sliding_attention``).

Like the Hugging Face ``forward``, position ids are ``arange(seq_len)`` whatever the padding (the models do not
derive them from ``attention_mask``), shifted by the length of a prefix cache when there is one.

This module also holds :func:`build_attention_mask`, the version shim over ``transformers.masking_utils`` that
the OPT and GPT-2 adapters use too.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask

from zo2.errors import ModelError
from zo2.models.base import BlockAdapter, layer_cache_kwargs, register_adapter

FULL_ATTENTION = "full_attention"
SLIDING_ATTENTION = "sliding_attention"

_MASK_BUILDERS: dict[str, Callable[..., Any]] = {
    FULL_ATTENTION: create_causal_mask,
    SLIDING_ATTENTION: create_sliding_window_causal_mask,
}


# ----------------------------------------------------------------------------------------------------------------
# transformers compatibility
# ----------------------------------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=None)
def _parameter_names(function: Callable[..., Any]) -> frozenset[str]:
    """Names of ``function``'s parameters (``inspect.signature`` follows ``functools.wraps`` decorators)."""
    return frozenset(inspect.signature(function).parameters)


def build_attention_mask(
    builder: Callable[..., Any],
    config: Any,
    inputs_embeds: torch.Tensor,
    attention_mask: torch.Tensor | None,
    position_ids: torch.Tensor | None,
    cache: Any = None,
) -> Any:
    """Call a ``transformers.masking_utils`` mask builder for a forward without a KV cache, or with ``cache``
    holding a key/value prefix (then ``attention_mask`` covers the prefix too, as the model's own does).

    The builders' signatures moved between releases: the cache argument is ``past_key_values`` up to 5.2x and
    ``cache`` after; older 4.x releases spelled ``input_embeds`` and required ``cache_position``. The arguments
    are matched by name, so the call is the one the installed version's own modeling code makes.
    ``inputs_embeds`` is only read for its batch size, length, dtype and device, never its values.
    """
    names = _parameter_names(builder)
    kwargs: dict[str, Any] = {"config": config, "attention_mask": attention_mask}
    kwargs["inputs_embeds" if "inputs_embeds" in names else "input_embeds"] = inputs_embeds
    for cache_name in ("cache", "past_key_values"):  # the current name first: a release that still accepts the
        if cache_name in names:                      # deprecated one warns when both are passed
            kwargs[cache_name] = cache  # None for a training forward
            break
    if "cache_position" in names:
        past = prefix_length(cache)
        kwargs["cache_position"] = torch.arange(past, past + inputs_embeds.shape[1], device=inputs_embeds.device)
    if "position_ids" in names:
        kwargs["position_ids"] = position_ids
    return builder(**kwargs)


def prefix_length(cache: Any) -> int:
    """Tokens held by a prefix cache (0 without one)."""
    return 0 if cache is None else int(cache.get_seq_length())


def require_causal_lm(model: nn.Module, *attributes: str) -> None:
    """Raise :class:`ModelError` unless ``model`` has every (dotted) attribute a family's adapter reads."""
    for dotted in attributes:
        obj: Any = model
        for part in dotted.split("."):
            obj = getattr(obj, part, None)
        if obj is None:
            raise ModelError(
                f"{type(model).__name__} has no '{dotted}', so it is not the causal-LM class zo2 expects for "
                f"model type '{model.config.model_type}'. Load it with AutoModelForCausalLM."
            )


# ----------------------------------------------------------------------------------------------------------------
# adapters
# ----------------------------------------------------------------------------------------------------------------
@register_adapter
class LlamaAdapter(BlockAdapter):
    """Llama layout; every layer gets the same causal mask (subclasses change :meth:`layer_types`)."""

    model_types = ("llama", "olmo", "olmo2", "helium")
    supports_prefix = True

    def __init__(self, model: nn.Module):
        super().__init__(model)
        require_causal_lm(model, "model.embed_tokens", "model.layers", "model.norm", "model.rotary_emb", "lm_head")
        self._layer_types = self.layer_types()
        unknown = sorted(set(self._layer_types) - set(_MASK_BUILDERS))
        if unknown:
            raise ModelError(
                f"Model type '{self.config.model_type}' uses attention types {unknown} that zo2's adapter does not "
                f"know (known: {', '.join(sorted(_MASK_BUILDERS))})."
            )

    def layer_types(self) -> list[str]:
        """The attention type (a key of the mask mapping) of each layer, as the model's ``forward`` picks it."""
        return [FULL_ATTENTION] * len(self.blocks())

    def embed_modules(self) -> list[nn.Module]:
        return [self.model.model.embed_tokens]

    def blocks(self) -> list[nn.Module]:
        # The HF forward runs ``layers[: num_hidden_layers]``.
        return list(self.model.model.layers[: self.config.num_hidden_layers])

    def head_modules(self) -> list[nn.Module]:
        return [self.model.model.norm, self.model.lm_head]

    def embed(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None, cache: Any = None
    ) -> tuple[torch.Tensor, dict[str, Any]]:
        hidden = self.model.model.embed_tokens(input_ids)
        return hidden, self._context(hidden, attention_mask, cache)

    @torch.no_grad()
    def _context(self, hidden: torch.Tensor, attention_mask: torch.Tensor | None, cache: Any = None
                 ) -> dict[str, Any]:
        """Masks per attention type, position ids and rotary (cos, sin): nothing that depends on parameters
        (a prefix ``cache`` counts only by its length)."""
        past = prefix_length(cache)
        position_ids = torch.arange(past, past + hidden.shape[1], device=hidden.device).unsqueeze(0)
        if attention_mask is not None:
            attention_mask = attention_mask.to(hidden.device)
        masks = {
            kind: build_attention_mask(_MASK_BUILDERS[kind], self.config, hidden, attention_mask, position_ids, cache)
            for kind in sorted(set(self._layer_types))
        }
        position_embeddings = self.model.model.rotary_emb(hidden, position_ids)
        return {"masks": masks, "position_ids": position_ids, "position_embeddings": position_embeddings}

    def block(self, index: int, hidden: torch.Tensor, ctx: dict[str, Any], cache: Any = None) -> torch.Tensor:
        layer = self.blocks()[index]
        out = layer(
            hidden,
            attention_mask=ctx["masks"][self._layer_types[index]],
            position_ids=ctx["position_ids"],
            position_embeddings=ctx["position_embeddings"],
            **layer_cache_kwargs(layer, cache),
        )
        return out[0] if isinstance(out, tuple) else out

    def head(self, hidden: torch.Tensor, ctx: dict[str, Any]) -> torch.Tensor:
        return self.model.lm_head(self.model.model.norm(hidden))


@register_adapter
class MistralAdapter(LlamaAdapter):
    """Mistral: one mask for all layers, sliding-window iff ``config.sliding_window`` is set.

    ``MistralModel.forward`` ignores ``layer_types`` even when a config carries them, so this does too.
    """

    model_types = ("mistral",)

    def layer_types(self) -> list[str]:
        kind = SLIDING_ATTENTION if getattr(self.config, "sliding_window", None) is not None else FULL_ATTENTION
        return [kind] * len(self.blocks())


@register_adapter
class Qwen2Adapter(LlamaAdapter):
    """Qwen2 / Qwen3 / SmolLM3: the mask of layer ``i`` is the one for ``config.layer_types[i]``."""

    model_types = ("qwen2", "qwen3", "smollm3")

    def layer_types(self) -> list[str]:
        return list(self.config.layer_types[: len(self.blocks())])
