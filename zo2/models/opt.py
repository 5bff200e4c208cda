"""Block adapter for OPT (``model.model.decoder``).

``embed``: ``embed_tokens`` (+ ``project_in`` when the word-embedding width differs from the hidden size) plus
the learned positions ``embed_positions``. As in ``OPTDecoder.forward``, position ids come from the attention
mask, ``cumsum(mask) * mask - 1`` (so left padding shifts them and padded slots read position -1 + offset), and
from an all-ones mask when none is given; the causal mask itself is built from the caller's ``attention_mask``
as is (``None`` stays ``None``). With a prefix cache of P tokens the mask covers them too and the positions of
the input are the last ``seq_len`` of the ``P + seq_len`` derived from it, as ``OPTDecoder.forward`` cuts them.

``head``: ``final_layer_norm`` (absent in post-LN OPT-350m) → ``project_out`` (when present) → ``lm_head``.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from transformers.masking_utils import create_causal_mask

from zo2.models.base import BlockAdapter, register_adapter
from zo2.models.llama import build_attention_mask, prefix_length, require_causal_lm


def _present(*modules: nn.Module | None) -> list[nn.Module]:
    """The modules that exist (OPT sets optional projections and norms to ``None``)."""
    return [module for module in modules if module is not None]


@register_adapter
class OPTAdapter(BlockAdapter):
    """OPT: learned positions from the attention mask, one causal mask for all layers."""

    model_types = ("opt",)
    supports_prefix = True

    def __init__(self, model: nn.Module):
        super().__init__(model)
        require_causal_lm(model, "model.decoder.embed_tokens", "model.decoder.layers", "lm_head")
        self.decoder = model.model.decoder

    def embed_modules(self) -> list[nn.Module]:
        d = self.decoder
        return _present(d.embed_tokens, d.embed_positions, d.project_in)

    def blocks(self) -> list[nn.Module]:
        return list(self.decoder.layers)

    def head_modules(self) -> list[nn.Module]:
        return _present(self.decoder.final_layer_norm, self.decoder.project_out, self.model.lm_head)

    def embed(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None, cache: Any = None
    ) -> tuple[torch.Tensor, dict[str, Any]]:
        d = self.decoder
        inputs_embeds = d.embed_tokens(input_ids)
        ctx, position_mask = self._context(inputs_embeds, attention_mask, cache)
        pos_embeds = d.embed_positions(position_mask, prefix_length(cache), position_ids=ctx["position_ids"])
        if d.project_in is not None:
            inputs_embeds = d.project_in(inputs_embeds)
        return inputs_embeds + pos_embeds.to(inputs_embeds.device), ctx

    @torch.no_grad()
    def _context(
        self, inputs_embeds: torch.Tensor, attention_mask: torch.Tensor | None, cache: Any = None
    ) -> tuple[dict[str, Any], torch.Tensor]:
        """The blocks' context (causal mask, position ids) and the dense mask the positions were derived from."""
        batch, length = inputs_embeds.shape[:2]
        past = prefix_length(cache)
        if attention_mask is not None:
            attention_mask = attention_mask.to(inputs_embeds.device)
            position_mask = attention_mask
        else:
            position_mask = torch.ones(batch, past + length, device=inputs_embeds.device)
        position_ids = (torch.cumsum(position_mask, dim=1) * position_mask - 1).long()[:, past:]
        causal_mask = build_attention_mask(create_causal_mask, self.config, inputs_embeds, attention_mask, None, cache)
        return {"attention_mask": causal_mask, "position_ids": position_ids}, position_mask

    def head(self, hidden: torch.Tensor, ctx: dict[str, Any]) -> torch.Tensor:
        d = self.decoder
        if d.final_layer_norm is not None:
            hidden = d.final_layer_norm(hidden)
        if d.project_out is not None:
            hidden = d.project_out(hidden)
        return self.model.lm_head(hidden).contiguous()
