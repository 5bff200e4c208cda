"""Block adapter for GPT-2 (``model.transformer``).

``embed``: ``wte(input_ids) + wpe(arange(seq_len))`` then ``drop``; as in ``GPT2Model.forward`` the positions
ignore padding (and start after a prefix cache's tokens). ``head``: ``ln_f`` → ``lm_head``, whose weight is tied
to ``wte`` (so the embedding and head units share that parameter; ``named_parameters()`` lists it once).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from transformers.masking_utils import create_causal_mask

from zo2.models.base import BlockAdapter, register_adapter
from zo2.models.llama import build_attention_mask, prefix_length, require_causal_lm


@register_adapter
class GPT2Adapter(BlockAdapter):
    """GPT-2: learned absolute positions, one causal mask for all blocks."""

    model_types = ("gpt2",)
    supports_prefix = True

    def __init__(self, model: nn.Module):
        super().__init__(model)
        require_causal_lm(model, "transformer.wte", "transformer.wpe", "transformer.h", "lm_head")
        self.transformer = model.transformer

    def embed_modules(self) -> list[nn.Module]:
        return [self.transformer.wte, self.transformer.wpe]

    def blocks(self) -> list[nn.Module]:
        return list(self.transformer.h)

    def head_modules(self) -> list[nn.Module]:
        return [self.transformer.ln_f, self.model.lm_head]

    def embed(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None, cache: Any = None
    ) -> tuple[torch.Tensor, dict[str, Any]]:
        t = self.transformer
        inputs_embeds = t.wte(input_ids)
        ctx = self._context(inputs_embeds, attention_mask, cache)
        hidden = inputs_embeds + t.wpe(ctx["position_ids"]).to(inputs_embeds.device)
        return t.drop(hidden), ctx

    @torch.no_grad()
    def _context(self, inputs_embeds: torch.Tensor, attention_mask: torch.Tensor | None, cache: Any = None
                 ) -> dict[str, Any]:
        """Causal mask and position ids; the mask is built from the token embeddings' shape and dtype, as HF does."""
        batch, length = inputs_embeds.shape[:2]
        past = prefix_length(cache)
        position_ids = torch.arange(past, past + length, device=inputs_embeds.device).unsqueeze(0)
        if attention_mask is not None:
            attention_mask = attention_mask.to(inputs_embeds.device).view(batch, -1)
        causal_mask = build_attention_mask(create_causal_mask, self.config, inputs_embeds, attention_mask,
                                           position_ids, cache)
        return {"attention_mask": causal_mask, "position_ids": position_ids}

    def head(self, hidden: torch.Tensor, ctx: dict[str, Any]) -> torch.Tensor:
        return self.model.lm_head(self.transformer.ln_f(hidden))
