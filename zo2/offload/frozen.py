"""Frozen weights of streamed blocks: a read-only store, uploaded with its block, never perturbed or written back.

Under parameter-efficient fine-tuning (LoRA, IA3, ... through ``peft``) a block's trainable parameters are a few
small adapter matrices and its frozen base weights are most of its bytes. The engine perturbs and updates only
the trainable ones, which a streamed block keeps in the :class:`~zo2.offload.store.ParameterStore`. Its frozen
ones live in a :class:`FrozenStore` with the same block indices: one flat pinned host buffer per block, which the
:class:`~zo2.offload.streamer.BlockStreamer` uploads together with the block (same stream, same event, same
slot reuse rules) and never writes back. While the block's forwards run, its modules read device views of that
upload (:meth:`FrozenStore.swapped`); afterwards they point at the host buffer again, so ``model.state_dict()``
reads the (unchanged) base weights from the store. Streamed one matrix at a time (``optim.stream_granularity =
"matrix"``), the same store moves a module at a time instead, through a ring of its own
(zo2.offload.piece_frozen).

With several processes per node streaming with sliced transfers (torchrun, zo2 launch's workers) the store is
the node's: one copy in shared memory that the node's first process creates and fills and the others map, their
frozen parameters pointing at it (zo2.offload.frozen_setup), so the base weights take host memory once per node,
not once per process.

A model whose parameters are all trainable has no frozen store: nothing here runs for it.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, Iterable, Iterator, Mapping

import torch
from torch import nn

from zo2.errors import ModelError
from zo2.offload.store import ParameterStore


@dataclass(frozen=True)
class FrozenSlot:
    """One place a block's forward reads a frozen parameter: ``module._parameters[attr]``."""

    module: nn.Module
    attr: str
    name: str


def frozen_slots(root: nn.Module, names: Mapping[int, str], trainable: set[int]) -> list[FrozenSlot]:
    """Every place under ``root`` that holds a parameter not in ``trainable`` (ids), named by ``names`` (ids)."""
    slots, seen = [], set()
    for module in root.modules():
        for attr, p in module._parameters.items():
            if p is not None and id(p) not in trainable and (id(module), attr) not in seen:
                seen.add((id(module), attr))
                slots.append(FrozenSlot(module, attr, names[id(p)]))
    return slots


def frozen_params(blocks: list[list[FrozenSlot]], fix: str) -> tuple[list[list[tuple[str, nn.Parameter]]], torch.dtype]:
    """Each block's frozen parameters (name, parameter), once each, and their one floating-point dtype (a
    ModelError saying they can be ``fix`` otherwise)."""
    params = [list({s.name: s.module._parameters[s.attr] for s in slots}.items()) for slots in blocks]
    dtypes = {p.dtype for block in params for _, p in block}
    if len(dtypes) != 1 or not next(iter(dtypes)).is_floating_point:
        raise ModelError(f"The frozen parameters of the streamed blocks have dtypes {sorted(map(str, dtypes))}; they "
                         f"can be {fix}. Quantized base weights cannot be streamed.")
    return params, dtypes.pop()


class FrozenStore(ParameterStore):
    """Flat host buffers of the frozen parameters of streamed blocks (one per block, one dtype), read-only."""

    slots: list[list[FrozenSlot]]
    """The places each block's modules read its frozen parameters (swapped to device views for a forward)."""

    @classmethod
    def from_slots(cls, blocks: list[list[FrozenSlot]], *, pin: bool, **shared: Any) -> "FrozenStore | None":
        """Copy the frozen parameters of each block (``blocks[i]``: its slots) into the store and re-point them at
        it; None when no block has a frozen parameter. ``shared``: ParameterStore's ``shared``, ``name`` and
        ``create`` for one copy per node in shared memory (a process that maps it copies nothing)."""
        if not any(blocks):
            return None
        params, dtype = frozen_params(blocks, "streamed only in one floating-point dtype (set optim.compute_dtype to "
                                      "cast them, or keep every block resident with optim.offload = false)")
        store = cls.from_blocks(params, dtype, pin=pin, **shared)
        store.slots = blocks
        return store

    @contextlib.contextmanager
    def swapped(self, index: int, flat: torch.Tensor) -> Iterator[None]:
        """Make block ``index``'s modules read their frozen parameters from ``flat`` (its device copy)."""
        views = self.views(flat, self.layout(index))
        slots: Iterable[FrozenSlot] = self.slots[index]
        saved = [(s, s.module._parameters[s.attr]) for s in slots]
        try:
            for s in slots:
                s.module._parameters[s.attr] = views[s.name]
            yield
        finally:
            for s, p in saved:
                s.module._parameters[s.attr] = p
