"""Which residence the NVMe-homed blocks get (zo2.offload.build): one process's files or a node's, streamed by
block (zo2.offload.tiered) or one matrix at a time (zo2.offload.nvme_pieces), with a PEFT base's frozen weights
in files of their own (zo2.offload.nvme_frozen).

* ``zo2 train``: the process's own files (:func:`~zo2.offload.tiered.nvme_files`), one per unit.
* ``zo2 launch`` (:func:`node_files`): the scheduler made and filled the files, one per unit × worker slice
  (zo2.offload.nvme_slices); every worker streams its slice and marks each write in the node store's markers,
  so the scheduler's repair covers them.
* torchrun with several processes per node (:func:`node_files`): the node's first process makes the files,
  every process writes and streams its slice.

By block a process's slice is one range of each unit, uploaded, updated and written back as such, and an
all-gather assembles the block; one matrix at a time it is the process's share of every piece (the files are cut
by piece), and an all-gather assembles each piece.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch

from zo2.errors import ModelError
from zo2.offload.markers import StoreMarkers
from zo2.offload.nvme_frozen import frozen_files_for
from zo2.offload.nvme_pieces import nvme_piece_residence
from zo2.offload.nvme_slices import NodeFiles, SlicedNvme, cuts_digest, slice_numels
from zo2.offload.piece_frozen import FrozenPieces
from zo2.offload.pieces import RingStreamer, unit_pieces
from zo2.offload.store import ALIGN, made_by_first, node_writers, pack_layout, repoint, shared_store_name
from zo2.offload.tiered import NvmeResidence, NvmeStreamer, SliceMarks, build_nvme_tier, nvme_files, tier_engine


def nvme_residence_for(inputs: Any, units: Sequence[Any], device: torch.device, matrix: bool,
                       beside: Any = None, frozen: Sequence[list] | None = None, beside_frozen: Any = None) -> Any:
    """The residence of the NVMe-homed ``units``, their files written and their parameters moved to the meta
    device, streamed one matrix at a time where ``matrix`` (the plan's granularity); None when there are none.
    ``beside``: the host-homed blocks' streamer, whose device ring the NVMe-homed pieces share (a pass visits the
    two tiers' blocks one after the other: one ring of device memory, not two). ``frozen``: each unit's frozen
    slots (a PEFT model's base weights), homed in files of their own (zo2.offload.nvme_frozen) and streamed with
    their blocks; one matrix at a time through the ring of the host-homed blocks' frozen pieces,
    ``beside_frozen``, where there is one."""
    if not units:
        return None
    spec, comm = inputs.store_spec, inputs.comm
    single = spec is None and (comm is None or comm.local_size == 1)
    one_writer = single or (spec is not None and spec.writers == 1)  # a PEFT base in files of its own
    engine, prefetch = tier_engine(inputs, units), inputs.config.prefetch
    node = None if single else node_files(inputs, units, device, engine, matrix)
    if not matrix:
        if node is None:
            residence = build_nvme_tier(units, inputs.params, inputs.tiers.nvme_path, device, prefetch, engine)
        else:
            residence = _node_blocks(inputs, node, units, device)
        residence.frozen_files = frozen_files_for(inputs, frozen, device, one_writer)
        residence.streamer.attach_frozen(residence.frozen_files)
        residence.node = node
        return residence
    ring = beside.ring if isinstance(beside, RingStreamer) else None
    if node is None:
        store, extra = nvme_files(units, inputs.params, inputs.tiers.nvme_path, device, engine), {}
    else:
        store, extra = node.mine.store, {"node": node, "comm": comm}
    files = frozen_files_for(inputs, frozen, device, one_writer)
    pieces = None
    if files is not None:
        roots = {k: inputs.adapter.blocks()[u.index] for k, u in enumerate(units)}
        shared = beside_frozen.streamer.ring if beside_frozen is not None else None
        pieces = FrozenPieces(files, roots, device, prefetch, ring=shared)
    residence = nvme_piece_residence(store, units, device, prefetch, ring, pieces, **extra)
    residence.frozen_files, residence.node = files, node
    if node is not None:
        residence.streamer.marks, residence.owner = node.marks, node.owner
    return residence


def _node_blocks(inputs: Any, node: NodeFiles, units: Sequence[Any], device: torch.device) -> NvmeResidence:
    """The node's NVMe-homed ``units`` streamed by block: this process uploads, updates and writes back its slice
    of each (one range of the unit), an all-gather assembles the block; under the scheduler each write is marked
    in the node store's markers."""
    streamer = NvmeStreamer(node.mine.store, device, inputs.config.prefetch, numels=node.numels)
    streamer.marks = node.marks
    if node.mine.writers == 1:
        residence = NvmeResidence(streamer, units, layouts=node.layouts)
    else:
        streamer.ranges = {j: node.mine.bounds(h, node.writer) for j, h in enumerate(node.homes)}
        residence = NvmeResidence(streamer, units, layouts=node.layouts, gather=inputs.comm.gather_slices,
                                  whole=node.whole, barrier=inputs.comm.local_barrier)
        residence.writer = node.writer
    residence.owner = node.owner
    return residence


def node_files(inputs: Any, units: Sequence[Any], device: torch.device, engine: Any, matrix: bool) -> NodeFiles:
    """This process's view of the node's NVMe files of ``units``: under the scheduler the files it made and filled
    (``inputs.store_spec`` names the folder; ``unit.home`` is each unit's index in the node store), with torchrun
    the files the node's first process makes here (the folder's lock, the stale files of dead jobs removed, the
    disk checked; it deletes them when its engine goes), each process then writing its slice of the weights it
    holds. One matrix at a time (``matrix``) with several writers, a writer's slice is its share of every piece
    (zo2.offload.nvme_slices); the scheduler cut its files the same way (``spec.nvme_cuts``, their digest)."""
    spec, comm = inputs.store_spec, inputs.comm
    layouts = [pack_layout([(n, inputs.params[n]) for n in u.owned]) for u in units]
    if spec is not None:
        homes, writers, pad_to = [u.home for u in units], spec.writers, spec.pad_to
        dtype, name, folder = spec.torch_dtype, spec.name, spec.nvme_path
    else:
        dtypes = {inputs.params[n].dtype for u in units for n in u.owned}
        if len(dtypes) != 1:
            raise ModelError(f"NVMe-homed blocks mix parameter dtypes {sorted(map(str, dtypes))}; cast the model to "
                             "one dtype (model.dtype or optim.storage_dtype).")
        homes = [next(k for k, v in enumerate(inputs.units) if v is u) for u in units]
        writers, dtype, name = comm.local_size, dtypes.pop(), shared_store_name(comm)
        pad_to, folder = writers * ALIGN, inputs.tiers.nvme_path
    numels = slice_numels(dict(zip(homes, layouts)), pad_to)
    cuts = {h: unit_pieces(u.slots, layout, numels[h]) for u, h, layout in zip(units, homes, layouts)} \
        if matrix and writers > 1 else None
    if spec is not None and cuts_digest(cuts) != getattr(spec, "nvme_cuts", ""):
        raise ModelError("This worker cuts the node's NVMe files by matrix differently from the scheduler (its model "
                         "or optim.stream_granularity differs): start the workers from the scheduler of the same "
                         "config.")
    writer = node_writers(comm)[0]
    owner = None if spec is not None else _make_shared_files(inputs, folder, name, numels, dtype, engine, cuts)
    mine = SlicedNvme(folder, name, numels, dtype, writers, engine=engine, pin=device.type == "cuda", writer=writer,
                      cuts=cuts)
    node = NodeFiles(mine, layouts, homes, writer, owner=owner)
    if spec is not None:
        node.marks = SliceMarks(StoreMarkers(spec.name, spec.units, writers, create=False), writer, homes)
    else:
        _write_own_slices(mine, units, homes, layouts, inputs.params, writer)
        comm.local_barrier()  # every slice is written before anyone reads a whole unit
    if writers > 1:
        node.whole = SlicedNvme(folder, name, numels, dtype, writers, engine=engine, pin=False, cuts=cuts)
    return node


def _make_shared_files(inputs: Any, folder: str, name: str, numels: dict, dtype: torch.dtype, engine: Any,
                       cuts: dict | None) -> SlicedNvme | None:
    """torchrun: the node's first process makes the files (the others wait for the outcome); returns them there."""
    comm = inputs.comm
    return made_by_first(comm, lambda: SlicedNvme(folder, name, numels, dtype, comm.local_size, engine=engine,
                                                  pin=False, create=True, cuts=cuts),
                         f"making the NVMe files in {folder}")


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
