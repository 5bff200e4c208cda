"""Set a model up for the engine: plan residency, build the stores, give every unit its residence
(zo2.offload.residence), place the rest on the device, build the optimizer state beside the weights.

:func:`build_offload` takes what the engine knows about the model (:class:`OffloadInputs`) and returns what the
engine's visits use (:class:`Offload`); it is the one place that decides where each unit's weights live.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from zo2.errors import ConfigError, ModelError, ResourceError
from zo2.offload.markers import StoreMarkers, layout_digest
from zo2.offload.cuda_time import cuda_timed
from zo2.offload.frozen import FrozenSlot
from zo2.offload.frozen_setup import attach_frozen, frozen_by_block, frozen_nbytes, frozen_of, frozen_store
from zo2.offload.piece_frozen import FrozenPieces, frozen_readers, reader_bytes
from zo2.offload.pieces import PieceMarkers, PieceStore, RingStreamer, piece_store, piecewise_residence
from zo2.offload.planner import WRITEBACK_LIMIT, Plan, WritebackProbe, auto_writeback, make_plan, parse_budget
from zo2.offload.store import (ALIGN, ParameterStore, layout_numel, made_by_first, node_writers, pack_layout,
                               remove_stale_stores, repoint, shared_store_name)
from zo2.models.units import shared_names
from zo2.offload.arith import formed_numel, materializes_directions, point_bytes, segment_table, select_kernels
from zo2.offload.residence import DeviceResidence, Residence, StreamedResidence, set_writeback_every
from zo2.offload.state import OptimizerState, StateArea, build_optimizer_state
from zo2.offload.streamer import BlockStreamer
from zo2.offload.nvme_homes import nvme_residence_for
from zo2.offload.nvme_state import nvme_state_for
from zo2.offload.tiered import FileHome, host_blocks
from zo2.offload.tiers import place_tiers_for
from zo2.optim.update import math_dtype

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


def _pack_resident(inputs: "OffloadInputs", unit, device: torch.device) -> tuple[list, torch.Tensor | None]:
    """One flat device buffer for a resident unit's parameters (they become views of it): one kernel launch
    then covers the whole unit."""
    params = [(n, inputs.params[n]) for n in unit.owned]
    if not params:
        return [], torch.empty(0, dtype=inputs.compute_dtype, device=device)
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


def _sliced(inputs: "OffloadInputs") -> bool:
    """Several processes of this node stream blocks: share one store and split every transfer."""
    comm = inputs.comm
    return comm is not None and comm.local_size > 1 and inputs.config.sliced_transfers


def _build_store(inputs: "OffloadInputs", blocks: list, dtype: torch.dtype, device: torch.device) -> ParameterStore:
    """The parameter store: private pinned memory, or with sliced transfers one shared store per node that
    the node's first process creates and fills and the others map."""
    pin = device.type == "cuda"
    if not _sliced(inputs):
        return ParameterStore.from_blocks(blocks, dtype, pin=pin, shared=inputs.config.shared_store)
    comm = inputs.comm
    kwargs = dict(pin=pin, shared=True, name=shared_store_name(comm), pad_to=comm.local_size * ALIGN)

    def make() -> ParameterStore:
        remove_stale_stores()  # what killed jobs left in /dev/shm
        return ParameterStore.from_blocks(blocks, dtype, create=True, **kwargs)

    return made_by_first(comm, make, "making the node's shared parameter store",  # filled: the others map it
                         lambda: ParameterStore.from_blocks(blocks, dtype, create=False, **kwargs))


def _map_node_store(inputs: "OffloadInputs", device: torch.device) -> tuple[ParameterStore, StoreMarkers]:
    """Map the scheduler's node store (every unit, in unit order) and its markers; the parameters become views
    of it."""
    spec = inputs.store_spec
    units = inputs.units
    if spec.units != len(units):
        raise ModelError(f"The node store holds {spec.units} units but this model has {len(units)}: the scheduler "
                         "and the workers built different models. Run them from the same config.")
    _, writers = node_writers(inputs.comm)
    if writers > 1 and not _sliced(inputs):
        raise ModelError("Several workers of one node share the scheduler's store only with sliced transfers; set "
                         "optim.sliced_transfers = true.")
    if spec.writers != writers:
        raise ModelError(f"The node store was made for {spec.writers} writers, but this node runs {writers} "
                         "workers; start the workers from the scheduler that made the store.")
    dtypes = {inputs.params[n].dtype for u in units for n in u.owned}
    if dtypes != {spec.torch_dtype}:
        raise ModelError(f"The node store holds {spec.dtype} but the model's trainable weights are "
                         f"{sorted(map(str, dtypes))}; build both from the same config (model.dtype, "
                         "optim.storage_dtype).")
    blocks = [[(n, inputs.params[n]) for n in u.owned] for u in units]  # the NVMe-homed ones map their files
    store = ParameterStore.from_blocks(host_blocks(blocks, spec.nvme_units), spec.torch_dtype, pin=device.type ==
                                       "cuda", shared=True, name=spec.name, create=False, pad_to=spec.pad_to)
    if layout_digest([pack_layout(b) for b in blocks]) != spec.digest:
        raise ModelError("The node store's layout differs from this model's (parameter names, shapes or order); "
                         "the scheduler and the workers built different models. Run them from the same config.")
    for k, u in enumerate(units):
        u.home = k
    return store, StoreMarkers(spec.name, spec.units, spec.writers, create=False)


@dataclass
class OffloadInputs:
    """What the engine knows about the model when it sets it up."""

    model: nn.Module
    adapter: Any
    params: dict[str, nn.Parameter]
    """The trainable parameters, by name (already in the storage dtype)."""
    units: list
    """The model's units in visit order (zo2.models.units.Unit)."""
    config: Any
    """The engine's ZOConfig."""
    compute_dtype: torch.dtype
    optimizer: Any
    """The engine's ZOOptimizer: its state sits (and streams) beside each unit's weights."""
    comm: Any = None
    """Under torchrun: the ZOComm (sliced transfers split every transfer across the node's processes)."""
    store_spec: Any = None
    """The scheduler's node store to map (zo2.control.store.StoreSpec), or None."""
    tiers: Any = None
    """The job's ``[offload]`` section (zo2.config.offload.OffloadConfig): the host memory budget and the NVMe
    tier; None: the default host budget and no NVMe tier."""

    def unit_dtype(self, unit: Any) -> torch.dtype:
        return self.params[unit.owned[0]].dtype if unit.owned else self.compute_dtype


@dataclass
class Offload:
    """What :func:`build_offload` set up: the plan, the stores and every unit's residence."""

    plan: Plan
    store: ParameterStore | None
    """The host store of the streamed blocks (the whole node store under the scheduler), or None."""
    streamer: BlockStreamer | None
    residences: list[Residence]
    """The distinct residences of the units (each unit's is ``unit.residence``)."""
    opt_state: OptimizerState
    """The optimizer's per-unit state (empty for stateless optimizers)."""
    kernels: Any
    """The perturbation/update backend every visit uses (zo2_kernels' Triton kernels or the torch reference)."""
    state_area: StateArea | None = None
    """With a node store and a stateful optimizer: the scheduler's state area."""
    markers: StoreMarkers | None = None
    """With a node store: its per-unit markers, kept current on write-back."""
    writeback_probe: WritebackProbe | None = None
    """``optim.writeback_every = 'auto'`` on a GPU: K stays 1 until the first steps show the link is the bottleneck
    (the engine feeds it each step's time and upload waits)."""


def build_offload(inputs: OffloadInputs, device: torch.device) -> Offload:
    """Plan where every unit lives under the budget, build the stores and residences, move the rest onto
    ``device``, and build the optimizer state beside the weights."""
    cfg = inputs.config
    _check_writeback(inputs)
    blocks = [u for u in inputs.units if u.kind == "block"]
    frozen = frozen_by_block(inputs, blocks)  # e.g. base weights under LoRA: on the device or streamed too
    _check_granularity(inputs)
    kernels = select_kernels(cfg.kernels, device, {inputs.unit_dtype(u) for u in inputs.units})
    plan = _plan(inputs, blocks, frozen, device, materializes_z=materializes_directions(kernels))
    plan = place_tiers_for(inputs, plan, frozen, creates_store=not _sliced(inputs) or inputs.comm.local_rank == 0)
    markers = None
    # blocks without a trainable parameter (prompt, prefix tuning) past the host budget keep their frozen weights
    # in files and stream with the host-homed blocks (nothing of theirs is written back)
    on_files = [i for i in plan.nvme if not blocks[i].owned]
    on_nvme = [i for i in plan.nvme if blocks[i].owned]
    if inputs.store_spec is not None:  # the scheduler's node store: every unit is already in it
        store, markers = _map_node_store(inputs, device)
        streamer = _stream_from_node_store(inputs, store, [blocks[i] for i in sorted(plan.host + on_files)],
                                           device, markers, plan.granularity == "matrix")
    else:
        store, streamer = _stream_from_own_store(inputs, [blocks[i] for i in sorted(plan.host + on_files)], device,
                                                 plan.granularity == "matrix")
    host_frozen = frozen_store(inputs, blocks, frozen, device, on_files)
    frozen_ring = attach_frozen(inputs, streamer, host_frozen, device)
    nvme = nvme_residence_for(inputs, [blocks[i] for i in on_nvme], device, plan.granularity == "matrix",
                              beside=streamer, frozen=[frozen[i] for i in on_nvme], beside_frozen=frozen_ring)
    keep = {id(m) for u in blocks if u.store_index is not None or u.index in set(plan.nvme)
            for m in inputs.adapter.blocks()[u.index].modules()}
    _place(inputs.model, device, keep)
    residences = _settle_units(inputs, store, streamer, markers, device, nvme, frozen_ring)
    streamed = next((r for r in residences if isinstance(r, StreamedResidence) and r is not nvme), None)
    if streamed is not None:
        streamed.frozen_files = getattr(host_frozen, "files", None)  # filled by the loaders, deleted at close
    plan.writeback_every = _writeback_every(inputs, streamed or nvme, kernels, device)
    probe = None
    if inputs.config.writeback_every == "auto" and plan.writeback_every > 1 and streamed is not None:
        probe, plan.writeback_every = WritebackProbe(plan.writeback_every), 1  # measured before it changes
    set_writeback_every(plan, residences, plan.writeback_every)
    state_area = _map_state_area(inputs, store, device)
    opt_state = build_optimizer_state(inputs.optimizer, inputs.units, inputs.unit_dtype, device, cfg.prefetch,
                                      streamer=streamer, store=store, comm=inputs.comm, area=state_area,
                                      from_area=inputs.store_spec is not None, nvme=nvme_state_for(inputs, nvme, device))
    if plan.streamed or cfg.offload is not False:
        log.info(plan.describe())

    return Offload(plan, store, streamer, residences, opt_state, kernels, state_area, markers, probe)


def _plan(inputs: OffloadInputs, blocks: list, frozen: list[list[FrozenSlot]], device: torch.device,
          materializes_z: bool) -> Plan:
    """The residency plan: each block's bytes (trainable, frozen and optimizer state) against the budget;
    ``materializes_z``: the kernels are the torch reference, which holds a parameter's direction in float32."""
    cfg, params, opt = inputs.config, inputs.params, inputs.optimizer
    block_params = [[params[n] for n in u.owned] for u in blocks]
    block_bytes = [_nbytes(ps) + frozen_nbytes(fs) for ps, fs in zip(block_params, frozen)]
    fixed = _nbytes([params[n] for u in inputs.units if u.kind != "block" for n in u.owned])
    fixed += frozen_nbytes(frozen_of(inputs, inputs.adapter.embed_modules() + inputs.adapter.head_modules()))
    # the optimizer's state (momentum, Adam's moments) sits and streams with each unit's weights
    block_bytes = [b + sum(p.numel() * opt.state_bytes(p.dtype) for p in ps)
                   for b, ps in zip(block_bytes, block_params)]
    fixed += sum(params[n].numel() * opt.state_bytes(params[n].dtype)
                 for u in inputs.units if u.kind != "block" for n in u.owned)
    # one module's parameters at one point in the compute dtype (zo2.points forms them just in time), plus the
    # float32 direction of a block's largest parameter where the torch reference runs (it materializes z one
    # parameter at a time; the Triton kernels never do)
    largest = max((p.numel() for ps in block_params for p in ps), default=0)
    compute_size = torch.empty((), dtype=inputs.compute_dtype).element_size()
    z = 4 * largest if materializes_z else 0
    reserve = point_bytes(_largest_module(inputs, formed=compute_size) * compute_size) + z
    block_reserve = point_bytes(_largest_module(inputs, blocks, compute_size) * compute_size) + z  # a block runs
    budget = parse_budget(cfg.gpu_memory_budget, device) if (cfg.gpu_memory_budget is not None or
                                                            device.type == "cuda") else None
    piece = _piece_bytes(inputs, blocks, frozen)  # one matrix at a time: what one slot of the rings holds
    if cfg.stream_granularity == "matrix" or _cut_by_piece(inputs):
        plan = make_plan(cfg.offload, block_bytes, fixed, reserve, budget, cfg.prefetch, piece)
    else:
        try:
            plan = make_plan(cfg.offload, block_bytes, fixed, reserve, budget, cfg.prefetch)
        except ResourceError:  # 'auto': block streaming does not fit the budget; one matrix at a time may
            if cfg.stream_granularity == "block" or _matrix_blocker(inputs) is not None:
                raise
            plan = make_plan(cfg.offload, block_bytes, fixed, reserve, budget, cfg.prefetch, piece)
    plan.block_reserve_bytes = block_reserve
    plan.frozen_bytes = [frozen_nbytes(fs) for fs in frozen]
    return plan


def _cut_by_piece(inputs: OffloadInputs) -> bool:
    """Under the scheduler with ``optim.stream_granularity = 'auto'``: whether it cut its NVMe files by piece for
    several workers (zo2.control.store.nvme_by_piece), which then stream one matrix at a time."""
    cut = inputs.config.stream_granularity == "auto" and bool(getattr(inputs.store_spec, "nvme_cuts", ""))
    if cut:
        log.info("optim.stream_granularity = 'auto': one matrix at a time, as the scheduler cut its NVMe files for "
                 "%d workers", inputs.store_spec.writers)
    return cut


def _largest_module(inputs: OffloadInputs, units: list | None = None, formed: int = 0) -> int:
    """The most trainable elements one module (of ``units``, default all) holds directly; with ``formed`` (the
    compute dtype's itemsize), the most zo2.points forms at a point at once (a large linear layer or embedding: a
    chunk of rows, zo2.offload.arith.formed_numel)."""
    per_module: dict[int, int] = {}
    modules, shapes = {}, {}
    for u in inputs.units if units is None else units:
        for s in u.slots:
            per_module[id(s.reader)] = per_module.get(id(s.reader), 0) + inputs.params[s.name].numel()
            modules[id(s.reader)] = s.reader
            if s.attr == "weight":
                shapes[id(s.reader)] = tuple(inputs.params[s.name].shape)
    if formed:
        per_module = {k: formed_numel(modules[k], n, shapes.get(k), formed) for k, n in per_module.items()}
    return max(per_module.values(), default=0)


def _piece_bytes(inputs: OffloadInputs, blocks: list, frozen: list[list[FrozenSlot]]) -> int:
    """One slot of every ring one matrix at a time takes (each ring has prefetch + 2): the largest trainable
    module of a block with its optimizer state (the state's rings, zo2.offload.state.PiecewiseState), plus the
    largest frozen reader (their own ring, zo2.offload.piece_frozen)."""
    params = [inputs.params[n] for u in blocks for n in u.owned]
    per_element = max((p.element_size() + inputs.optimizer.state_bytes(p.dtype) for p in params), default=0)
    roots = inputs.adapter.blocks()
    frozen_piece = max((reader_bytes(slots) for u, fs in zip(blocks, frozen)
                        for _, slots in frozen_readers(roots[u.index], fs)), default=0)
    return _largest_module(inputs, blocks) * per_element + frozen_piece


def _matrix_blocker(inputs: OffloadInputs) -> str | None:
    """Why this run cannot stream one matrix at a time (zo2.offload.pieces), or None."""
    if _sliced(inputs) and ALIGN % inputs.comm.local_size:
        return (f"sliced transfers over {inputs.comm.local_size} processes per node (pieces split evenly over 1, "
                "2, 4 or 8)")
    return None


def _check_granularity(inputs: OffloadInputs) -> None:
    """``optim.stream_granularity = 'matrix'`` needs what zo2.offload.pieces supports (ConfigError otherwise)."""
    why = _matrix_blocker(inputs) if inputs.config.stream_granularity == "matrix" else None
    if why is not None:
        raise ConfigError(f"optim.stream_granularity = 'matrix' does not yet work with {why}. Set "
                          "optim.stream_granularity = 'block' (or 'auto').")


def _check_writeback(inputs: OffloadInputs) -> None:
    """``optim.writeback_every`` > 1 needs a stateless optimizer (a ConfigError saying what to set otherwise).

    Under the scheduler a lagging unit is one whose markers hold an older step, which its repair already catches
    up from the log; with sliced transfers every process makes the same write-back decisions, each for its slice."""
    k = inputs.config.writeback_every
    if k == 1 or k == "auto":
        return
    if inputs.optimizer.state_names:
        raise ConfigError(f"optim.writeback_every = {k} needs a stateless optimizer, but {inputs.optimizer.name} "
                          f"keeps state ({', '.join(inputs.optimizer.state_names)}) that would have to be replayed "
                          "with the weights. Set optim.writeback_every = 1, or use zo-sgd, zo-sgd-sign or "
                          "zo-sgd-conservative.")


def _writeback_every(inputs: OffloadInputs, residence: StreamedResidence | None, kernels: Any,
                     device: torch.device) -> int:
    """``optim.writeback_every`` as a number: 'auto' measures an update pass over the first streamed block on the
    device and its upload (:func:`~zo2.offload.planner.auto_writeback`); 1 where nothing streams, on a CPU, with a
    stateful optimizer, or where the node's processes share one store (they must all choose the same K)."""
    k = inputs.config.writeback_every
    if residence is None:
        return 1
    if k != "auto":
        return k
    if (device.type != "cuda" or inputs.optimizer.state_names
            or inputs.store_spec is not None or _sliced(inputs)):
        return 1
    if isinstance(residence, FileHome):  # only an NVMe tier: its reads are far slower than the host link
        return WRITEBACK_LIMIT
    unit = next(u for u in inputs.units if u.residence is residence)
    kernel_rate, link_rate = _measure_rates(residence.streamer, unit, kernels, inputs.config)
    chosen = auto_writeback(kernel_rate, link_rate)
    log.info("optim.writeback_every = 'auto': an update pass runs at %.0f GB/s and uploads at %.1f GB/s, so blocks "
             "are written back every %d steps", kernel_rate / 1e9, link_rate / 1e9, chosen)
    return chosen


def _measure_rates(streamer: BlockStreamer, unit: Any, kernels: Any, config: Any) -> tuple[float, float]:
    """Bytes/s of one update pass over ``unit``'s buffer in a free slot of the streamer, and of its upload from the
    store (median of 5 each, CUDA events). The slot is scratch: nothing has been uploaded yet."""
    if isinstance(streamer.store, PieceStore):  # one matrix at a time: the first piece (of the first block)
        if not streamer.store.pieces:  # nothing trainable streams (prompt tuning): nothing to replay
            return 0.0, 0.0
        block, lo, hi = streamer.store.pieces[0]
        src, table = streamer.store.flat(0), unit.table.slice(lo, hi)
    else:
        src, table = streamer.store.flat(unit.store_index), unit.table
    slot = streamer.slots[0][: src.numel()]
    nbytes = src.numel() * src.element_size()
    upload = cuda_timed(lambda: slot.copy_(src, non_blocking=True), warmup=1, repeat=5)
    replay = cuda_timed(lambda: kernels.update(slot, table, [0], [0.0], 0.0, 0.0, config.distribution, out=slot),
                        warmup=1, repeat=5)
    return nbytes / max(replay, 1e-9), nbytes / max(upload, 1e-9)


def _stream_from_node_store(inputs: OffloadInputs, store: ParameterStore, streamed: list, device: torch.device,
                            markers: StoreMarkers, matrix: bool = False) -> BlockStreamer | None:
    """Under the scheduler: the streamed blocks move between the node store and the device (``matrix``: a piece at
    a time, each unit's markers in flight from its first piece's write-back to its last landed)."""
    for u in streamed:
        u.store_index = u.home
    if not streamed:
        return None
    streamer = _streamer(inputs, store, streamed, device, matrix)
    streamer.markers = PieceMarkers(markers, streamer.store) if matrix else markers
    streamer.writer = node_writers(inputs.comm)[0]
    return streamer


def _streamer(inputs: OffloadInputs, store: ParameterStore, streamed: list, device: torch.device,
              matrix: bool) -> BlockStreamer:
    """The streamer of ``streamed`` (their ``store_index`` set): block by block, or a ring over their pieces; with
    sliced transfers, this process's part of each block (piece)."""
    if matrix:
        streamer = RingStreamer(piece_store(store, streamed), device, inputs.config.prefetch)
    else:
        streamer = BlockStreamer(store, device, inputs.config.prefetch, blocks=[u.store_index for u in streamed])
    if _sliced(inputs):
        indices = range(len(streamer.store)) if matrix else [u.store_index for u in streamed]
        streamer.ranges = {k: inputs.comm.slice_bounds(streamer.store.flat(k).numel()) for k in indices}
    return streamer


def _stream_from_own_store(inputs: OffloadInputs, streamed: list, device: torch.device, matrix: bool = False
                           ) -> tuple[ParameterStore | None, BlockStreamer | None]:
    """The streamed blocks in a host store of this job (private, or shared by the node's processes)."""
    if not streamed:
        return None, None
    shared = shared_names(inputs.units)
    for u in streamed:
        if any(n in shared for n in u.owned):
            raise ModelError(f"{u.name} shares parameters with another unit and cannot be streamed.")
    dtypes = {inputs.params[n].dtype for u in streamed for n in u.owned}
    if len(dtypes) > 1:
        raise ModelError(f"Streamed blocks mix parameter dtypes {sorted(map(str, dtypes))}; cast the model to "
                         "one dtype (model.dtype) before building the engine.")
    blocks_params = [[(n, inputs.params[n]) for n in u.owned] for u in streamed]
    # no dtype when no streamed block has a trainable parameter (prompt tuning: only their frozen ones stream)
    store = _build_store(inputs, blocks_params, dtypes.pop() if dtypes else inputs.compute_dtype, device)
    for k, u in enumerate(streamed):
        u.store_index = k
    return store, _streamer(inputs, store, streamed, device, matrix)


def _streamed_residence(inputs: OffloadInputs, streamer: BlockStreamer, units: list,
                        frozen: FrozenPieces | None) -> StreamedResidence:
    """The residence of the streamed units: block by block, or a piece at a time over a PieceStore."""
    gather = inputs.comm.gather_slices if streamer.ranges else None
    if isinstance(streamer.store, PieceStore):
        return piecewise_residence(streamer, units, gather, frozen)
    return StreamedResidence(streamer, units, gather, 1)  # K is set once the kernels are known (_writeback_every)


def _settle_units(inputs: OffloadInputs, store: ParameterStore | None, streamer: BlockStreamer | None,
                  markers: StoreMarkers | None, device: torch.device, nvme: FileHome | None = None,
                  frozen: FrozenPieces | None = None) -> list[Residence]:
    """Give every unit its residence, layout and segment tables (resident units are packed on the device)."""
    writer, writers = node_writers(inputs.comm)
    resident = DeviceResidence(device, store if inputs.store_spec is not None else None, markers, writer, writers)
    streamed = None
    if streamer is not None:
        streamed = _streamed_residence(inputs, streamer, [u for u in inputs.units if u.store_index is not None],
                                       frozen)
    for u in inputs.units:
        if u.store_index is not None:
            u.residence, u.layout = streamed, store.layout(u.store_index)
        elif nvme is not None and nvme.holds(u):
            u.residence, u.layout = nvme, nvme.layout(u)
        else:
            u.residence = resident
            u.layout, u.flat = _pack_resident(inputs, u, device)
        u.table = segment_table(u.layout, inputs.params, inputs.config.no_decay)
        if u.store_index is not None and streamer.ranges:
            u.slice_table = u.table.slice(*streamer.ranges[u.store_index])
    return [resident] + ([streamed] if streamed is not None else []) + ([nvme] if nvme is not None else [])


def _map_state_area(inputs: OffloadInputs, store: ParameterStore | None, device: torch.device) -> StateArea | None:
    """Map the node's optimizer-state area (the scheduler created and filled it)."""
    spec, optimizer = inputs.store_spec, inputs.optimizer
    if spec is None:
        return None
    if tuple(spec.state_names) != tuple(optimizer.state_names):
        raise ModelError(f"The node store was made for optimizer state {list(spec.state_names)} but this "
                         f"worker's optimizer ({optimizer.name}) keeps {list(optimizer.state_names)}: "
                         "start the workers from the scheduler of the same config.")
    if not spec.state_names:
        return None
    return StateArea(spec.name, store.layouts, spec.state_names, math_dtype(spec.torch_dtype),
                     pad_to=spec.pad_to, create=False, pin=device.type == "cuda")
