"""Set an engine up for offloading: plan residency, build the store, place the rest on the device."""

from __future__ import annotations

import hashlib
import logging
import os
from typing import TYPE_CHECKING

import torch
from torch import nn

from zo2.errors import ModelError
from zo2.offload.frozen import FrozenSlot, FrozenStore, frozen_slots
from zo2.offload.planner import Plan, parse_budget, plan_with_fallback
from zo2.offload.store import (ALIGN, ParameterStore, layout_numel, new_store_name, pack_layout, remove_stale_stores,
                               repoint)
from zo2_kernels import SegmentTable
from zo2.offload.streamer import BlockStreamer

if TYPE_CHECKING:
    from zo2.engine import ZOEngine

log = logging.getLogger("zo2.offload")


def _nbytes(params: list[torch.Tensor]) -> int:
    return sum(p.numel() * p.element_size() for p in params)


def _place(model: nn.Module, device: torch.device, keep_on_host: set[int]) -> None:
    """Move every parameter and buffer to ``device`` except the parameters of the modules in ``keep_on_host``."""
    for module in model.modules():
        if id(module) not in keep_on_host:
            for name, p in module._parameters.items():
                if p is not None and p.is_meta:
                    repoint(p, torch.empty(p.shape, dtype=p.dtype, device=device))  # filled by the loader
                elif p is not None and p.device != device:
                    p.data = p.data.to(device)
        for name, b in module._buffers.items():
            if b is not None and b.device != device:
                module._buffers[name] = b.to(device)


def _pack_resident(engine: "ZOEngine", unit, device: torch.device) -> tuple[list, torch.Tensor | None]:
    """One flat device buffer for a resident unit's parameters (they become views of it): one kernel launch
    then covers the whole unit."""
    params = [(n, engine.params[n]) for n in unit.owned]
    if not params:
        return [], torch.empty(0, dtype=engine.compute_dtype, device=device)
    dtypes = {p.dtype for _, p in params}
    if len(dtypes) != 1:
        raise ModelError(f"{unit.name} mixes parameter dtypes {sorted(map(str, dtypes))}; set optim.storage_dtype "
                         "or cast the model to one dtype.")
    layout = pack_layout(params)
    flat = torch.empty(layout_numel(layout), dtype=dtypes.pop(), device=device)
    for seg, (name, p) in zip(layout, params):
        view = flat[seg.offset : seg.offset + seg.numel].view(seg.shape)
        view.copy_(p.data)
        repoint(p, view)
    return layout, flat


def _sliced(engine: "ZOEngine") -> bool:
    """Several processes of this node stream blocks: share one store and split every transfer."""
    comm = engine.comm
    return comm is not None and comm.local_size > 1 and engine.config.sliced_transfers


def shared_store_name(comm) -> str:
    """The name of a torchrun job's shared store on this node, agreed on by its processes (call on each): the pid
    of the node's first process, which creates it — a store left behind by a killed or hung job is then stale
    once that process is gone, and the next run removes it — and a digest of the job's rendezvous."""
    parts = [os.environ.get(k, "") for k in ("TORCHELASTIC_RUN_ID", "MASTER_ADDR", "MASTER_PORT")]
    return new_store_name(comm.local_first_pid(), hashlib.sha1("-".join(parts).encode()).hexdigest()[:8])


def _build_store(engine: "ZOEngine", blocks: list, dtype: torch.dtype, device: torch.device) -> ParameterStore:
    """The parameter store: private pinned memory, or with sliced transfers one shared store per node that
    the node's first process creates and fills and the others map."""
    pin = device.type == "cuda"
    if not _sliced(engine):
        return ParameterStore.from_blocks(blocks, dtype, pin=pin, shared=engine.config.shared_store)
    comm = engine.comm
    kwargs = dict(pin=pin, shared=True, name=shared_store_name(comm), pad_to=comm.local_size * ALIGN)
    if comm.local_rank == 0:
        remove_stale_stores()  # what killed jobs left in /dev/shm
        store = ParameterStore.from_blocks(blocks, dtype, create=True, **kwargs)
        comm.local_barrier()  # filled: the others may map it
        return store
    comm.local_barrier()
    return ParameterStore.from_blocks(blocks, dtype, create=False, **kwargs)


def _writer(engine: "ZOEngine") -> tuple[int, int]:
    """(this process's index among the node's writers, their count)."""
    comm = engine.comm
    if comm is None or comm.local_size == 1:
        return 0, 1
    return comm.local_rank, comm.local_size


def _map_node_store(engine: "ZOEngine", device: torch.device) -> ParameterStore:
    """Map the scheduler's node store (every unit, in unit order); the parameters become views of it."""
    from zo2.offload.markers import StoreMarkers, layout_digest

    spec = engine.store_spec
    units = engine.units
    if spec.units != len(units):
        raise ModelError(f"The node store holds {spec.units} units but this model has {len(units)}: the scheduler "
                         "and the workers built different models. Run them from the same config.")
    _, writers = _writer(engine)
    if writers > 1 and not _sliced(engine):
        raise ModelError("Several workers of one node share the scheduler's store only with sliced transfers; set "
                         "optim.sliced_transfers = true.")
    if spec.writers != writers:
        raise ModelError(f"The node store was made for {spec.writers} writers, but this node runs {writers} "
                         "workers; start the workers from the scheduler that made the store.")
    dtypes = {engine.params[n].dtype for u in units for n in u.owned}
    if dtypes != {spec.torch_dtype}:
        raise ModelError(f"The node store holds {spec.dtype} but the model's trainable weights are "
                         f"{sorted(map(str, dtypes))}; build both from the same config (model.dtype, "
                         "optim.storage_dtype).")
    store = ParameterStore.from_blocks([[(n, engine.params[n]) for n in u.owned] for u in units], spec.torch_dtype,
                                       pin=device.type == "cuda", shared=True, name=spec.name, create=False,
                                       pad_to=spec.pad_to)
    if layout_digest(store.layouts) != spec.digest:
        raise ModelError("The node store's layout differs from this model's (parameter names, shapes or order); "
                         "the scheduler and the workers built different models. Run them from the same config.")
    engine.markers = StoreMarkers(spec.name, spec.units, spec.writers, create=False)
    engine.store_writer = _writer(engine)[0]
    for k, u in enumerate(units):
        u.home = k
    return store


def _frozen_of(engine: "ZOEngine", modules: list[nn.Module]) -> list[FrozenSlot]:
    """The slots of the frozen (requires_grad=False) parameters under ``modules``."""
    names = {id(p): n for n, p in engine.model.named_parameters()}
    trainable = {id(p) for p in engine.params.values()}
    return [s for m in modules for s in frozen_slots(m, names, trainable)]


def _frozen_by_block(engine: "ZOEngine", blocks: list) -> list[list[FrozenSlot]]:
    """The frozen slots of each block unit (empty lists when every parameter is trainable)."""
    return [_frozen_of(engine, [engine.adapter.blocks()[u.index]]) for u in blocks]


def _frozen_nbytes(slots: list[FrozenSlot]) -> int:
    unique = {s.name: s.module._parameters[s.attr] for s in slots}
    return _nbytes(list(unique.values()))


def _frozen_store(engine: "ZOEngine", blocks: list, frozen: list[list[FrozenSlot]],
                  device: torch.device) -> FrozenStore | None:
    """The frozen parameters of the streamed blocks in a pinned host store indexed like the streamer's blocks
    (a GPU forward must not read pageable host memory); None when the streamed blocks have none."""
    streamed = [(u, fs) for u, fs in zip(blocks, frozen) if u.store_index is not None and fs]
    if not streamed:
        return None
    outside = {id(s.module._parameters[s.attr]) for s in _frozen_of(engine, engine.adapter.embed_modules() +
                                                                     engine.adapter.head_modules())}
    outside |= {id(s.module._parameters[s.attr]) for u, fs in zip(blocks, frozen) if u.store_index is None
                for s in fs}
    for u, fs in streamed:
        if any(id(s.module._parameters[s.attr]) in outside for s in fs):
            raise ModelError(f"{u.name} shares frozen parameters with another unit and cannot be streamed.")
    by_index: list[list[FrozenSlot]] = [[] for _ in range(1 + max(u.store_index for u, _ in streamed))]
    for u, fs in streamed:
        by_index[u.store_index] = fs
    return FrozenStore.from_slots(by_index, pin=device.type == "cuda")


def build_offload(engine: "ZOEngine", device: torch.device) -> tuple[Plan, ParameterStore | None, BlockStreamer | None]:
    cfg = engine.config
    blocks = [u for u in engine.units if u.kind == "block"]
    block_params = [[engine.params[n] for n in u.owned] for u in blocks]
    frozen = _frozen_by_block(engine, blocks)  # e.g. base weights under LoRA: on the device or streamed too
    block_bytes = [_nbytes(ps) + _frozen_nbytes(fs) for ps, fs in zip(block_params, frozen)]
    fixed = _nbytes([engine.params[n] for u in engine.units if u.kind != "block" for n in u.owned])
    fixed += _frozen_nbytes(_frozen_of(engine, engine.adapter.embed_modules() + engine.adapter.head_modules()))
    opt = engine.optimizer  # its state (momentum, Adam's moments) sits and streams with each unit's weights
    block_bytes = [b + sum(p.numel() * opt.state_bytes(p.dtype) for p in ps)
                   for b, ps in zip(block_bytes, block_params)]
    fixed += sum(engine.params[n].numel() * opt.state_bytes(engine.params[n].dtype)
                 for u in engine.units if u.kind != "block" for n in u.owned)
    largest = max((p.numel() for ps in block_params for p in ps), default=0)
    largest_block = max((sum(p.numel() for p in ps) for ps in block_params), default=0)
    compute_size = torch.empty((), dtype=engine.compute_dtype).element_size()
    # θ+ and θ− of one block in the compute dtype, plus the float32 direction of its largest parameter
    # (the torch reference path materializes z one parameter at a time; the Triton kernels never do)
    reserve = 2 * largest_block * compute_size + 4 * largest
    one_copy_reserve = largest_block * compute_size + 4 * largest
    budget = parse_budget(cfg.gpu_memory_budget, device) if (cfg.gpu_memory_budget is not None or
                                                            device.type == "cuda") else None
    plan = plan_with_fallback(cfg.offload, block_bytes, fixed, reserve, one_copy_reserve, budget, cfg.prefetch)
    store = streamer = None
    if engine.store_spec is not None:  # the scheduler's node store: every unit is already in it
        store = _map_node_store(engine, device)
        streamed_units = [blocks[i] for i in plan.streamed]
        for u in streamed_units:
            u.store_index = u.home
        if streamed_units:
            streamer = BlockStreamer(store, device, cfg.prefetch, blocks=[u.home for u in streamed_units])
            streamer.markers, streamer.writer = engine.markers, engine.store_writer
            if _sliced(engine):
                streamer.ranges = {u.home: engine.comm.slice_bounds(store.flat(u.home).numel())
                                   for u in streamed_units}
    elif plan.streamed:
        streamed_units = [blocks[i] for i in plan.streamed]
        for u in streamed_units:
            if any(n in engine._shared_names for n in u.owned):
                raise ModelError(f"{u.name} shares parameters with another unit and cannot be streamed.")
        dtypes = {engine.params[n].dtype for u in streamed_units for n in u.owned}
        if len(dtypes) > 1:
            raise ModelError(f"Streamed blocks mix parameter dtypes {sorted(map(str, dtypes))}; cast the model to "
                             "one dtype (model.dtype) before building the engine.")
        blocks_params = [[(n, engine.params[n]) for n in u.owned] for u in streamed_units]
        # no dtype when no streamed block has a trainable parameter (prompt tuning: only their frozen ones stream)
        store = _build_store(engine, blocks_params, dtypes.pop() if dtypes else engine.compute_dtype, device)
        for k, u in enumerate(streamed_units):
            u.store_index = k
        streamer = BlockStreamer(store, device, cfg.prefetch)
        if _sliced(engine):
            streamer.ranges = {k: engine.comm.slice_bounds(store.flat(k).numel()) for k in range(len(store))}
    if streamer is not None:
        streamer.attach_frozen(_frozen_store(engine, blocks, frozen, device))
    keep = {id(m) for u in blocks if u.store_index is not None for m in engine.adapter.blocks()[u.index].modules()}
    _place(engine.model, device, keep)
    for u in engine.units:
        if u.store_index is not None:
            u.layout = store.layout(u.store_index)
        else:
            u.layout, u.flat = _pack_resident(engine, u, device)
        u.table = SegmentTable([(seg.offset, seg.numel, engine.keys[seg.name], engine.decay[seg.name])
                                for seg in u.layout])
        if u.store_index is not None and streamer.ranges:
            u.slice_table = u.table.slice(*streamer.ranges[u.store_index])
    if plan.streamed or cfg.offload is not False:
        log.info(plan.describe())
    return plan, store, streamer
