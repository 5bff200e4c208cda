"""Greedy decoding through any ``logits_fn(batch) -> logits``.

``logits_fn`` takes a right-padded ``{"input_ids", "attention_mask"}`` batch and returns its logits (rows ×
length × vocabulary): ``lambda b: engine.evaluate(b).logits`` streams the blocks through the device, so a model
that does not fit on the GPU can answer; ``lambda b: model(**b).logits`` is the plain model. There is no KV
cache: every new token is one full forward of the rows still generating.
"""

from __future__ import annotations

from typing import Callable, Collection, Mapping, Sequence

import torch

LogitsFn = Callable[[Mapping[str, torch.Tensor]], torch.Tensor]


def _batch(rows: Sequence[Sequence[int]], pad_id: int) -> dict[str, torch.Tensor]:
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.int64)
    mask = torch.zeros((len(rows), width), dtype=torch.int64)
    for n, row in enumerate(rows):
        ids[n, : len(row)] = torch.tensor(row, dtype=torch.int64)
        mask[n, : len(row)] = 1
    return {"input_ids": ids, "attention_mask": mask}


@torch.no_grad()
def greedy_generate(logits_fn: LogitsFn, prompts: Sequence[Sequence[int]], *, max_new_tokens: int,
                    stop_ids: Collection[int] = (), pad_id: int = 0) -> list[list[int]]:
    """The greedily generated tokens after each prompt, stopping at a token of ``stop_ids`` (not included) or
    after ``max_new_tokens``. Prompts of different lengths are batched together (right-padded)."""
    if any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token (e.g. BOS)")
    seqs = [list(p) for p in prompts]
    out: list[list[int]] = [[] for _ in prompts]
    active = list(range(len(prompts)))
    stops = set(stop_ids)
    for _ in range(max_new_tokens):
        if not active:
            break
        batch = _batch([seqs[i] for i in active], pad_id)
        logits = logits_fn(batch)
        last = torch.tensor([len(seqs[i]) - 1 for i in active], device=logits.device)
        rows = torch.arange(len(active), device=logits.device)
        chosen = logits[rows, last].argmax(-1).tolist()  # host sync: one per generated token
        still = []
        for i, token in zip(active, chosen):
            if token in stops:
                continue
            seqs[i].append(token)
            out[i].append(token)
            still.append(i)
        active = still
    return out
