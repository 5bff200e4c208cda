"""Which residence the NVMe-homed blocks get (zo2.offload.build): one process's files or a node's, streamed by
block (zo2.offload.tiered) or one matrix at a time (zo2.offload.nvme_pieces), with a PEFT base's frozen weights
in files of their own (zo2.offload.nvme_frozen).

* ``zo2 train``: the process's own files (:func:`~zo2.offload.tiered.nvme_files`), one per unit.
* ``zo2 launch`` (:func:`node_nvme_tier`): the scheduler made and filled the files, one per unit × worker slice
  (zo2.offload.nvme_slices); every worker streams its slice and marks each write in the node store's markers,
  so the scheduler's repair covers them.
* torchrun with several processes per node (:func:`shared_nvme_tier`): the node's first process makes the files,
  every process writes and streams its slice.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch

from zo2.errors import ConfigError, ModelError, ResourceError
from zo2.offload.markers import StoreMarkers
from zo2.offload.nvme_frozen import FrozenFiles
from zo2.offload.nvme_pieces import nvme_piece_residence
from zo2.offload.nvme_slices import SlicedNvme, slice_numels
from zo2.offload.piece_frozen import FrozenPieces
from zo2.offload.pieces import RingStreamer
from zo2.offload.store import ALIGN, pack_layout, repoint, shared_store_name
from zo2.offload.tiered import (NvmeResidence, NvmeStreamer, SliceMarks, _writer, build_nvme_tier, nvme_files,
                                tier_engine)


def nvme_residence_for(inputs: Any, units: Sequence[Any], device: torch.device, matrix: bool,
                       beside: Any = None, frozen: Sequence[list] | None = None, beside_frozen: Any = None) -> Any:
    """The residence of the NVMe-homed ``units`` (zo2.offload.tiered.nvme_tier_for), streamed one matrix at a
    time where ``matrix`` (the plan's granularity); None when there are none. ``beside``: the host-homed blocks'
    streamer, whose device ring the NVMe-homed pieces share (a pass visits the two tiers' blocks one after the
    other: one ring of device memory, not two). ``frozen``: each unit's frozen slots (a PEFT model's base
    weights), homed in files of their own (zo2.offload.nvme_frozen) and streamed with their blocks; one matrix at
    a time through the ring of the host-homed blocks' frozen pieces, ``beside_frozen``, where there is one."""
    if not units:
        return None
    single = inputs.store_spec is None and (inputs.comm is None or inputs.comm.local_size == 1)
    if not matrix:
        residence = nvme_tier_for(inputs, units, device)
        residence.frozen_files = _frozen_files(inputs, frozen, device, single)
        residence.streamer.attach_frozen(residence.frozen_files)
        return residence
    spec = inputs.store_spec
    if not single and (spec is None or spec.writers > 1):
        raise ConfigError("One matrix at a time from the NVMe tier runs with one process per node (zo2 train, or "
                          "zo2 launch with one worker); set optim.stream_granularity = 'block'.")
    ring = beside.ring if isinstance(beside, RingStreamer) else None
    if spec is not None:  # zo2 launch, one worker: the scheduler's files, each write-back marked in its markers
        mine, layouts, marks = node_slices(inputs, units, device, tier_engine(inputs, units))
        residence = nvme_piece_residence(mine.store, units, device, inputs.config.prefetch, ring, layouts=layouts)
        residence.streamer.marks = marks
        return residence
    store = nvme_files(units, inputs.params, inputs.tiers.nvme_path, device, tier_engine(inputs, units))
    files = _frozen_files(inputs, frozen, device, single)
    pieces = None
    if files is not None:
        roots = {k: inputs.adapter.blocks()[u.index] for k, u in enumerate(units)}
        shared = beside_frozen.streamer.ring if beside_frozen is not None else None
        pieces = FrozenPieces(files, roots, device, inputs.config.prefetch, ring=shared)
    residence = nvme_piece_residence(store, units, device, inputs.config.prefetch, ring, pieces)
    residence.frozen_files = files
    return residence


def _frozen_files(inputs: Any, frozen: Sequence[list] | None, device: torch.device, single: bool
                  ) -> FrozenFiles | None:
    """The NVMe-homed blocks' frozen weights in files (None when they have none); a single process only."""
    if not frozen or not any(frozen):
        return None
    if not single:
        raise ConfigError("The NVMe tier holds a PEFT model's frozen base weights in a single process (zo2 train); "
                          "with several processes per node the blocks that do not fit offload.host_memory_budget "
                          "must have no frozen parameters. Raise offload.host_memory_budget, or run zo2 train.")
    return FrozenFiles(inputs.tiers.nvme_path, frozen, tier_engine(inputs, []), pin=device.type == "cuda",
                       prefetch=inputs.config.prefetch)


def nvme_tier_for(inputs: Any, units: Sequence[Any], device: torch.device) -> NvmeResidence | None:
    """The residence of the NVMe-homed ``units`` of an engine's offload inputs (zo2.offload.build.OffloadInputs),
    their files written and their parameters moved to the meta device; None when there are none."""
    if not units:
        return None
    engine = tier_engine(inputs, units)
    if inputs.store_spec is not None:
        return node_nvme_tier(inputs, units, device, engine)
    if inputs.comm is not None and inputs.comm.local_size > 1:
        return shared_nvme_tier(inputs, units, device, engine)
    return build_nvme_tier(units, inputs.params, inputs.tiers.nvme_path, device, inputs.config.prefetch, engine)


def node_nvme_tier(inputs: Any, units: Sequence[Any], device: torch.device, engine: Any) -> NvmeResidence:
    """The residence of the NVMe-homed ``units`` of the scheduler's node store (``inputs.store_spec`` names the
    folder and the units; ``unit.home`` is each one's index there): this process streams its slice of each from
    the files the scheduler made and filled, and marks each write-back in the node store's markers."""
    spec, comm = inputs.store_spec, inputs.comm
    mine, layouts, marks = node_slices(inputs, units, device, engine)
    homes, numels, writer = marks.homes, mine.numels, marks.writer
    streamer = NvmeStreamer(mine.store, device, inputs.config.prefetch, numels=[numels[h] for h in homes])
    streamer.marks = marks
    if spec.writers == 1:
        return NvmeResidence(streamer, units, layouts=layouts)
    streamer.ranges = {j: mine.bounds(h, writer) for j, h in enumerate(homes)}
    whole = SlicedNvme(spec.nvme_path, spec.name, numels, spec.torch_dtype, spec.writers, engine=engine, pin=False)
    return NvmeResidence(streamer, units, layouts=layouts, gather=comm.gather_slices, whole=whole,
                         barrier=comm.local_barrier)


def node_slices(inputs: Any, units: Sequence[Any], device: torch.device, engine: Any
                ) -> tuple[SlicedNvme, list, SliceMarks]:
    """This process's slices of the scheduler's NVMe files of ``units`` (``unit.home``: each one's index in the
    node store, ascending), the units' layouts, and the node store's markers of their write-backs."""
    spec = inputs.store_spec
    writer = _writer(inputs.comm)
    layouts = [pack_layout([(n, inputs.params[n]) for n in u.owned]) for u in units]
    homes = [u.home for u in units]
    mine = SlicedNvme(spec.nvme_path, spec.name, slice_numels(dict(zip(homes, layouts)), spec.pad_to),
                      spec.torch_dtype, spec.writers, engine=engine, pin=device.type == "cuda", writer=writer)
    return mine, layouts, SliceMarks(StoreMarkers(spec.name, spec.units, spec.writers, create=False), writer, homes)


def shared_nvme_tier(inputs: Any, units: Sequence[Any], device: torch.device, engine: Any) -> NvmeResidence:
    """The NVMe-homed ``units`` of a torchrun node's processes (sliced transfers, no scheduler): the node's first
    process makes the files (the folder's lock, the stale files of dead jobs removed, the disk checked) and deletes
    them when its engine goes; every process writes its slice of the weights it holds (its replica of the model)
    and streams that slice. Unit k's files are named after its index among the model's units."""
    comm = inputs.comm
    dtypes = {inputs.params[n].dtype for u in units for n in u.owned}
    if len(dtypes) != 1:
        raise ModelError(f"NVMe-homed blocks mix parameter dtypes {sorted(map(str, dtypes))}; cast the model to "
                         "one dtype (model.dtype or optim.storage_dtype).")
    dtype, name = dtypes.pop(), shared_store_name(comm)
    layouts = [pack_layout([(n, inputs.params[n]) for n in u.owned]) for u in units]
    homes = [next(k for k, v in enumerate(inputs.units) if v is u) for u in units]
    numels = slice_numels(dict(zip(homes, layouts)), comm.local_size * ALIGN)
    folder = inputs.tiers.nvme_path
    owner, failure = None, None
    if comm.local_rank == 0:
        try:
            owner = SlicedNvme(folder, name, numels, dtype, comm.local_size, engine=engine, pin=False, create=True)
        except Exception as exc:  # the others must not wait for files that never come
            failure = exc
    if not comm.local_share(failure is None, "making the NVMe files"):
        raise failure or ResourceError(f"The node's first process could not make the NVMe files in {folder} (its "
                                       "error says why).")
    mine = SlicedNvme(folder, name, numels, dtype, comm.local_size, engine=engine, pin=device.type == "cuda",
                      writer=comm.local_rank)
    _write_own_slices(mine, units, homes, layouts, inputs.params, comm.local_rank)
    comm.local_barrier()  # every slice is written before anyone reads a whole unit
    streamer = NvmeStreamer(mine.store, device, inputs.config.prefetch, numels=[numels[h] for h in homes])
    streamer.ranges = {j: mine.bounds(h, comm.local_rank) for j, h in enumerate(homes)}
    whole = SlicedNvme(folder, name, numels, dtype, comm.local_size, engine=engine, pin=False)
    residence = NvmeResidence(streamer, units, layouts=layouts, gather=comm.gather_slices, whole=whole,
                              barrier=comm.local_barrier)
    residence.owner = owner
    return residence


def _write_own_slices(files: SlicedNvme, units: Sequence[Any], homes: list[int], layouts: list, params: dict,
                      writer: int) -> None:
    """Write this process's slice of each unit whose parameters hold values (as the step the unit holds), then
    move the parameters to the meta device: the files are their home. Units built on the meta device are filled
    later by the loaders (:meth:`NvmeResidence.fill_home`)."""
    for u, home, layout in zip(units, homes, layouts):
        owned = [params[n] for n in u.owned]
        if not any(p.is_meta for p in owned):
            flat = torch.zeros(files.numels[home], dtype=owned[0].dtype)
            for seg, p in zip(layout, owned):
                flat[seg.offset : seg.offset + seg.numel].view(seg.shape).copy_(p.detach())
            files.write(home, flat, u.applied, writers=[writer])
        for p in owned:
            repoint(p, torch.empty(p.shape, dtype=p.dtype, device="meta"))
