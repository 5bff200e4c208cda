"""Which parameters of a model are frozen, and where a streamed block's frozen ones live: the setup of
zo2.offload.frozen (block granularity) and zo2.offload.piece_frozen (one matrix at a time) for
:func:`~zo2.offload.build.build_offload` (``inputs``: its OffloadInputs)."""

from __future__ import annotations

from typing import Any, Sequence

import torch
from torch import nn

from zo2.errors import ModelError
from zo2.offload.frozen import FrozenSlot, FrozenStore, frozen_slots
from zo2.offload.nvme_frozen import TieredFrozen, frozen_files_for
from zo2.offload.piece_frozen import FrozenPieces
from zo2.offload.pieces import RingStreamer
from zo2.offload.store import made_by_first, remove_stale_stores, shared_store_name
from zo2.offload.streamer import BlockStreamer


def frozen_of(inputs: Any, modules: list[nn.Module]) -> list[FrozenSlot]:
    """The slots of the frozen (requires_grad=False) parameters under ``modules``."""
    names = {id(p): n for n, p in inputs.model.named_parameters()}
    trainable = {id(p) for p in inputs.params.values()}
    return [s for m in modules for s in frozen_slots(m, names, trainable)]


def frozen_by_block(inputs: Any, blocks: list) -> list[list[FrozenSlot]]:
    """The frozen slots of each block unit (empty lists when every parameter is trainable)."""
    return [frozen_of(inputs, [inputs.adapter.blocks()[u.index]]) for u in blocks]


def frozen_nbytes(slots: list[FrozenSlot]) -> int:
    unique = {s.name: s.module._parameters[s.attr] for s in slots}
    return sum(p.numel() * p.element_size() for p in unique.values())


def attach_frozen(inputs: Any, streamer: BlockStreamer | None, frozen: FrozenStore | None,
                  device: torch.device) -> FrozenPieces | None:
    """The streamed blocks' frozen weights: uploaded with each block (block granularity), or a module at a time
    through a ring of their own (one matrix at a time: returned, for the residence)."""
    if streamer is None or frozen is None:
        return None
    if not isinstance(streamer, RingStreamer):
        streamer.attach_frozen(frozen)
        return None
    roots = {u.store_index: inputs.adapter.blocks()[u.index] for u in inputs.units
             if u.kind == "block" and u.store_index is not None}
    return FrozenPieces(frozen, roots, device, inputs.config.prefetch)


def frozen_store(inputs: Any, blocks: list, frozen: list[list[FrozenSlot]], device: torch.device,
                 on_files: Sequence[int] = ()) -> FrozenStore | TieredFrozen | None:
    """The frozen parameters of the streamed blocks in a pinned host store indexed like the streamer's blocks
    (a GPU forward must not read pageable host memory); None when the streamed blocks have none. ``on_files``:
    the streamed blocks (positions in ``blocks``: whole-frozen ones past the host budget) whose frozen parameters
    live in files on the NVMe tier instead (zo2.offload.nvme_frozen.TieredFrozen; one process per node)."""
    streamed = [(u, fs) for u, fs in zip(blocks, frozen) if u.store_index is not None and fs]
    if not streamed:
        return None
    outside = {id(s.module._parameters[s.attr]) for s in frozen_of(inputs, inputs.adapter.embed_modules() +
                                                                    inputs.adapter.head_modules())}
    outside |= {id(s.module._parameters[s.attr]) for u, fs in zip(blocks, frozen) if u.store_index is None
                for s in fs}
    for u, fs in streamed:
        if any(id(s.module._parameters[s.attr]) in outside for s in fs):
            raise ModelError(f"{u.name} shares frozen parameters with another unit and cannot be streamed.")
    by_index: list[list[FrozenSlot]] = [[] for _ in range(1 + max(u.store_index for u, _ in streamed))]
    for u, fs in streamed:
        by_index[u.store_index] = fs
    comm, pin = inputs.comm, device.type == "cuda"
    if on_files:
        return _tiered_frozen(inputs, by_index, sorted(blocks[i].store_index for i in on_files), device)
    if comm is None or comm.local_size == 1 or not inputs.config.sliced_transfers:
        return FrozenStore.from_slots(by_index, pin=pin)
    return _node_frozen_store(by_index, comm, pin)


def _tiered_frozen(inputs: Any, by_index: list[list[FrozenSlot]], on_files: list[int], device: torch.device
                   ) -> TieredFrozen:
    """The streamed blocks' frozen parameters with those of the blocks ``on_files`` (streamer indices) in files,
    the others in a pinned host store."""
    files = frozen_files_for(inputs, [by_index[k] for k in on_files], device)
    host = FrozenStore.from_slots([[] if k in on_files else fs for k, fs in enumerate(by_index)],
                                  pin=device.type == "cuda")
    where = [(files, on_files.index(k)) if k in on_files else (host, k) if fs else None
             for k, fs in enumerate(by_index)]
    return TieredFrozen(where, files)


def _node_frozen_store(blocks: list[list[FrozenSlot]], comm: Any, pin: bool) -> FrozenStore | None:
    """The node's one copy of the streamed blocks' frozen weights in shared memory: its first process creates
    and fills it (its own parameters' values), the others wait for that and map it, their parameters re-pointed
    at it (their own copies are then dropped)."""
    shared = dict(shared=True, name=f"{shared_store_name(comm)}-frozen")

    def make() -> FrozenStore | None:
        remove_stale_stores()  # what killed jobs left in /dev/shm
        return FrozenStore.from_slots(blocks, pin=pin, create=True, **shared)

    return made_by_first(comm, make, "making the shared store of the frozen weights",
                         lambda: FrozenStore.from_slots(blocks, pin=pin, create=False, **shared))
