"""A stateful optimizer's state on the NVMe tier: the momentum or Adam's moments of the NVMe-homed blocks, in
files beside their weights (blocks streamed whole or one matrix at a time; one process, or a node's processes
each moving its slice: torchrun, zo2 launch).

zo-sgd-momentum keeps one float32 buffer per parameter element and zo-adam two: for a model whose weights pass
host memory the state passes it two to four times over, so the blocks whose weights live on NVMe keep their state
there too. :class:`NvmeState` holds per state buffer one file pair per block (``state-<buffer>-<k>.a/.b`` and a
marker, written crash-safely as the weights' are; laid out as the block's weights) and a streamer that moves it in
lockstep with the block's weights, as the node state area's streamers do:

* by block (:class:`~zo2.offload.tiered.NvmeStreamer`): a pass that applies an update begins them in the weights'
  order (the disk reads the state ahead into a few pinned staging buffers); the visit that applies a block's
  update uploads its state, updates it beside the weights, writes it back (from a staging buffer, on the
  streamer's I/O thread) and releases it;
* one matrix at a time (:class:`~zo2.offload.nvme_pieces.NvmePieceStreamer` over the weights' pieces: the state is
  laid out as the weights, so the bounds are theirs): a piece's state is uploaded when the piece is updated,
  written back into its block's staging buffer and released, and once every piece of the block holds the update
  the buffer goes to the file, as the weights' do.

One file per buffer, not the buffers back to back: a snapshot writes the state by name (every block's ``exp_avg``,
then every block's ``exp_avg_sq``), so each file is read once.

With several processes per node (torchrun, sliced transfers) and under zo2 launch the files are the node's, cut as
the weights' node files are (zo2.offload.nvme_slices.SlicedNvme: one file pair per block and writer, the same
ranges): the node's first process makes them (:func:`node_state_files`), or the scheduler
(zo2.control.nvme_store.NodeNvme, which rebuilds them with the weights after a failure); each process streams,
updates and writes back its slice of every block's state (the update of a slice needs only that slice's state:
nothing is gathered), snapshots read every writer's slices and a resume writes each process's own.

A run starts from zero state: the markers a previous run left are removed (new node files have none) and a block
never written reads as zeros, so nothing is written at the start. Snapshots read each block's state from its file when the writer asks for
it (one block's buffer in host memory at a time); a resume writes the snapshot's state into the files a block at a
time. The files are deleted when the engine closes: no run starts from them (a resume starts from a snapshot).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch

from zo2.offload.nvme import NvmeStore
from zo2.offload.nvme_slices import SlicedNvme
from zo2.offload.pieces import PiecewiseResidence
from zo2.offload.store import layout_numel, made_by_first, shared_store_name
from zo2.optim.update import math_dtype
from zo2.offload.store import Deferred, ParameterStore, Segment, deferred_units
from zo2.offload.nvme_pieces import NvmePieceStreamer, StagedPieces
from zo2.offload.tiered import NvmeStreamer, tier_engine

STATE_STEM = "state-"
"""One process's files: ``state-<buffer>-<k>.a``, ``.b`` and ``.json``, block k of the NVMe-homed ones (a node's:
``<the weights' node name>-state-<buffer>-unit<k>-w<writer>``)."""


def state_stem(name: str, buffer: str) -> str:
    """The node files' name of state buffer ``buffer`` beside the weights' node files ``name``."""
    return f"{name}-state-{buffer}"


@dataclass
class StateFiles:
    """One state buffer's files: ``store`` is what the streamer moves (this process's slices where the node's
    processes share the files: its entry k is block k's slice), ``whole`` reads every writer's slices (None: the
    store holds whole blocks), ``owner``: the node's first process's handle on the files it made (deleted at the
    end)."""

    store: NvmeStore
    whole: SlicedNvme | None = None
    mine: SlicedNvme | None = None
    owner: SlicedNvme | None = None
    homes: Sequence[int] = ()
    """With node files: block k's unit index in them."""

    def read(self, k: int, numel: int) -> torch.Tensor:
        """Block ``k``'s whole state buffer (``numel``, zeros where nothing was written yet)."""
        if self.whole is not None:  # every writer's slices
            return self.whole.read_whole(self.homes[k], unwritten_zero=True)
        flat = torch.zeros(numel, dtype=self.store.dtype)
        if self.store.current(k) is not None:
            self.store.read(k, flat)
        return flat

    def write(self, k: int, flat: torch.Tensor, step: int) -> None:
        """Store ``flat`` (block ``k``'s whole buffer): all of it, or this process's slice of the node's files."""
        if self.mine is None:
            self.store.write(k, flat, step)
        else:
            self.mine.write(self.homes[k], flat, step, writers=[self.mine.entries[0][1]])

    def close(self) -> None:
        """Delete the files (no run starts from them): one process's, or the node's by the process that made them."""
        engines = {id(x.engine): x.engine for x in [self.store] + [f.store for f in (self.whole, self.owner) if f]}
        if self.mine is None:
            self.store.remove_files()
        for files in (self.whole, self.mine):
            if files is not None:
                files.close()
        if self.owner is not None:
            self.owner.close(remove=True)
        for engine in engines.values():
            if hasattr(engine, "close"):
                engine.close()


def own_state_files(names: Sequence[str], layouts: Sequence[Sequence[Segment]], dtype: torch.dtype, folder: str,
                    engine: Callable[[], Any], pin: bool) -> dict[str, StateFiles]:
    """One process's state files: per buffer an :class:`NvmeStore` of whole blocks (``state-<buffer>-<k>``), its
    markers from an earlier run removed."""
    files = {}
    for s in names:
        store = NvmeStore(folder, layouts, dtype, engine=engine(), pin=pin,
                          names=[f"{STATE_STEM}{s}-{k}" for k in range(len(layouts))])
        store.forget()  # a fresh start: every block's state is zero until its first write
        files[s] = StateFiles(store)
    return files


def node_state_files(names: Sequence[str], weights: SlicedNvme, name: str, writer: int, homes: Sequence[int],
                     dtype: torch.dtype, engine: Callable[[], Any], pin: bool, comm: Any, make: bool
                     ) -> dict[str, StateFiles]:
    """A node's state files: per buffer the node's files cut as the weights' (``weights``: this process's slices of
    them, named ``name``), each process streaming slice ``writer`` of the blocks ``homes``; made here by a torchrun
    node's first process (``make``: the folder's lock is the weights'), else by the scheduler (zo2 launch)."""
    files = {}
    for s in names:
        stem = state_stem(name, s)
        args = (weights.folder, stem, weights.numels, dtype, weights.writers)
        cut = dict(cuts=weights.cuts)
        owner = made_by_first(comm, lambda: SlicedNvme(*args, engine=engine(), pin=False, create=True, lock=False,
                                                       **cut), f"making the optimizer state's NVMe files ({s})") \
            if make else None
        mine = SlicedNvme(*args, engine=engine(), pin=pin, writer=writer, **cut)
        whole = SlicedNvme(*args, engine=mine.store.engine, pin=False, **cut)
        files[s] = StateFiles(mine.store, whole=whole, mine=mine, owner=owner, homes=list(homes))
    return files


class NvmeState:
    """The state buffers ``names`` of the NVMe-homed ``units`` (``units[k]``: laid out as ``layouts[k]``, of
    ``numels[k]`` elements padded as their weights' files), in ``files`` (per buffer), streamed to ``device`` in
    lockstep with the weights (see the module docstring): by block, or the weights' ``pieces`` one matrix at a time
    (``pass_order(units)``: a pass's pieces in upload order). ``ranges``: with node files, this process's part of
    each block (or piece), as the weights' streamer has them; ``writers``: the node's processes; ``barrier``: waits
    for them."""

    def __init__(self, names: Sequence[str], units: Sequence[Any], layouts: Sequence[Sequence[Segment]],
                 numels: Sequence[int], files: dict[str, StateFiles], device: torch.device, prefetch: int, *,
                 pieces: Sequence[tuple[int, int, int]] | None = None,
                 pass_order: Callable[[Sequence[Any]], list[int]] | None = None,
                 ranges: dict[int, tuple[int, int]] | None = None, writers: int = 1,
                 barrier: Callable[[], None] | None = None):
        self.names = tuple(names)
        self._index = {u.name: k for k, u in enumerate(units)}
        self.layouts = [list(layout) for layout in layouts]
        self.numels = list(numels)
        self.files = files
        self.barrier = barrier
        self.pieces = list(pieces) if pieces is not None else None
        """One matrix at a time: the weights' pieces, (unit k, lo, hi) each, as their residence's streamer numbers
        them."""
        self._pass_order = pass_order
        self._pieces_of = Counter(k for k, _, _ in self.pieces or ())
        """One matrix at a time: block → its number of pieces."""
        self._left: dict[int, int] = {}
        """One matrix at a time: block → its pieces not yet updated in this visit."""
        self.streamers: dict[str, Any] = {}
        for s, f in files.items():
            if pieces is None:
                streamer = NvmeStreamer(f.store, device, prefetch, numels=self.numels)
            else:
                streamer = NvmePieceStreamer(StagedPieces(f.store, self.pieces, writers), device, prefetch)
            streamer.ranges = dict(ranges or {})
            streamer.zero_unwritten = True
            self.streamers[s] = streamer

    @property
    def stores(self) -> dict[str, NvmeStore]:
        return {s: f.store for s, f in self.files.items()}

    def holds(self, unit: Any) -> bool:
        return unit.name in self._index

    # ------------------------------------------------------------------ the streaming schedule
    def begin(self, units: Sequence[Any]) -> None:
        """A pass that applies an update visits ``units`` in this order: read their state ahead."""
        order = [self._index[u.name] for u in units if u.name in self._index] if self.pieces is None else \
            self._pass_order(units)
        for streamer in self.streamers.values():
            streamer.begin(order)

    def acquire(self, unit: Any) -> dict[str, torch.Tensor]:
        """``unit``'s state buffers on the device (uploaded from staging buffers its files were read into; with node
        files this process's part of each)."""
        return {s: streamer.acquire(self._index[unit.name]) for s, streamer in self.streamers.items()}

    def updated(self, unit: Any) -> None:
        """The device copies hold the unit's updated state: write them to its files (queued on the I/O threads)."""
        for streamer in self.streamers.values():
            streamer.write_back(self._index[unit.name], unit.applied)

    def release(self, unit: Any) -> None:
        for streamer in self.streamers.values():
            streamer.release(self._index[unit.name])

    def acquire_piece(self, piece: int) -> dict[str, torch.Tensor]:
        """One matrix at a time: the state buffers of the weights' piece ``piece`` on the device."""
        return {s: streamer.acquire(piece) for s, streamer in self.streamers.items()}

    def piece_updated(self, piece: int, step: int) -> None:
        """The piece's state holds the update of ``step``: written back into its block's staging buffers and
        released; the block's files are written once every piece of it is."""
        k = self.pieces[piece][0]
        for streamer in self.streamers.values():
            streamer.write_back(piece, step)
            streamer.release(piece)
        left = self._left.get(k, self._pieces_of[k]) - 1
        self._left[k] = left
        if left == 0:
            del self._left[k]
            for streamer in self.streamers.values():
                streamer.write_unit(k, step)

    # ------------------------------------------------------------------ snapshots and resumes
    def tensors(self, prefix: str) -> dict[str, Deferred]:
        """Every state tensor by its snapshot name (``prefix`` + ``<buffer>/<parameter>``), each read from its
        block's files when loaded (call after a flush): one block's buffer in host memory at a time."""
        out: dict[str, Deferred] = {}
        for s, streamer in self.streamers.items():
            streamer.drain()
            f = self.files[s]

            def read(k: int, f: StateFiles = f, streamer: Any = streamer) -> torch.Tensor:
                return streamer.run(lambda: f.read(k, self.numels[k]))

            deferred = deferred_units(dict(enumerate(self.layouts)), f.store.dtype, read)
            out.update({f"{prefix}{s}/{name}": d for name, d in deferred.items()})
        return out

    @torch.no_grad()
    def load(self, tensors: Any, prefix: str, step: int) -> None:
        """Write every block's state from ``tensors`` (named as :meth:`tensors` names them; checked by the
        caller) into its files, one block's buffer at a time, as holding ``step`` (with node files each process
        writes its slices, then waits for the others)."""
        for s, streamer in self.streamers.items():
            f = self.files[s]
            streamer.drain()
            for k, layout in enumerate(self.layouts):
                flat = torch.zeros(self.numels[k], dtype=f.store.dtype)
                for name, view in ParameterStore.views(flat, layout).items():
                    view.copy_(tensors[f"{prefix}{s}/{name}"])
                streamer.run(lambda: f.write(k, flat, step))
            streamer.invalidate()
        if self.barrier is not None:
            self.barrier()  # every process's slices are written before anyone reads whole blocks

    def close(self) -> None:
        """Finish the I/O and delete the files (no run starts from them)."""
        for s, streamer in self.streamers.items():
            streamer.close()
            self.files[s].close()


def nvme_state_for(inputs: Any, nvme: Any, device: torch.device) -> "NvmeState | None":
    """A stateful optimizer's state of the NVMe-homed blocks (``nvme``: their residence; ``inputs``: an engine's
    zo2.offload.build.OffloadInputs), in files beside their weights (one process's, or a torchrun node's cut as the
    weights' are), streamed as the weights are (by block, or their pieces); None without a stateful optimizer or
    NVMe-homed blocks."""
    names = inputs.optimizer.state_names
    if nvme is None or not names:
        return None
    units = nvme.units()
    layouts = [u.layout for u in units]
    dtype, pin = math_dtype(inputs.unit_dtype(units[0])), device.type == "cuda"

    def engine() -> Any:  # one I/O engine per state buffer's I/O thread
        return tier_engine(inputs, [])

    piecewise = isinstance(nvme, PiecewiseResidence)
    pieces = dict(pieces=nvme.streamer.store.pieces, pass_order=nvme.pass_order) if piecewise else {}
    node, spec = nvme.node, inputs.store_spec
    if node is None:  # one process's files of whole blocks
        files = own_state_files(names, layouts, dtype, inputs.tiers.nvme_path, engine, pin)
        return NvmeState(names, units, layouts, [layout_numel(x) for x in layouts], files, device,
                         inputs.config.prefetch, **pieces)
    name = spec.name if spec is not None else shared_store_name(inputs.comm)  # as the weights' node files
    files = node_state_files(names, node.mine, name, node.writer, node.homes, dtype, engine, pin, inputs.comm,
                             make=spec is None)
    return NvmeState(names, units, layouts, node.numels, files, device, inputs.config.prefetch,
                     ranges=nvme.streamer.ranges, writers=node.mine.writers, barrier=nvme.barrier, **pieces)
