"""A stateful optimizer's state on the NVMe tier: the momentum or Adam's moments of the NVMe-homed blocks, in
files beside their weights (one process per node; blocks streamed whole or one matrix at a time).

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

A run starts from zero state: the markers a previous run left are removed and a block never written reads as
zeros, so nothing is written at the start. Snapshots read each block's state from its file when the writer asks for
it (one block's buffer in host memory at a time); a resume writes the snapshot's state into the files a block at a
time. The files are deleted when the engine closes: no run starts from them (a resume starts from a snapshot).
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import torch

from zo2.offload.nvme import NvmeStore
from zo2.offload.store import Deferred, ParameterStore, Segment, deferred_units
from zo2.offload.nvme_pieces import NvmePieceStreamer, StagedPieces
from zo2.offload.tiered import NvmeStreamer

STATE_STEM = "state-"
"""The files' names: ``state-<buffer>-<k>.a``, ``.b`` and ``.json``, block k of the NVMe-homed ones."""


class NvmeState:
    """The state buffers ``names`` (float32, or ``dtype``) of the NVMe-homed ``units`` (``units[k]``: laid out as
    ``layouts[k]``), in files under ``folder`` read and written with I/O engines ``engine()`` makes (one per
    buffer: an engine serves one thread), streamed to ``device`` in lockstep with the weights (see the module
    docstring)."""

    def __init__(self, names: Sequence[str], units: Sequence[Any], layouts: Sequence[Sequence[Segment]],
                 dtype: torch.dtype, device: torch.device, prefetch: int, folder: str, engine: Callable[[], Any],
                 pieces: Sequence[tuple[int, int, int]] | None = None,
                 pass_order: Callable[[Sequence[Any]], list[int]] | None = None):
        self.names = tuple(names)
        self._index = {u.name: k for k, u in enumerate(units)}
        self.layouts = [list(layout) for layout in layouts]
        self.stores = {s: NvmeStore(folder, self.layouts, dtype, engine=engine(), pin=device.type == "cuda",
                                    names=[f"{STATE_STEM}{s}-{k}" for k in range(len(units))]) for s in self.names}
        self.pieces = list(pieces) if pieces is not None else None
        """One matrix at a time: the weights' pieces, (unit k, lo, hi) each, as their residence's streamer numbers
        them; ``pass_order(units)`` gives a pass's pieces in upload order."""
        self._pass_order = pass_order
        self._left: dict[int, int] = {}
        """One matrix at a time: block → its pieces not yet updated in this visit."""
        self.streamers: dict[str, Any] = {}
        for s, store in self.stores.items():
            store.forget()  # a fresh start: every block's state is zero until its first write
            self.streamers[s] = NvmeStreamer(store, device, prefetch) if pieces is None else \
                NvmePieceStreamer(StagedPieces(store, self.pieces), device, prefetch)
            self.streamers[s].zero_unwritten = True

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
        """``unit``'s state buffers on the device (uploaded from staging buffers its files were read into)."""
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
        left = self._left.get(k, sum(1 for unit, _, _ in self.pieces if unit == k)) - 1
        self._left[k] = left
        if left == 0:
            del self._left[k]
            for streamer in self.streamers.values():
                streamer.write_unit(k, step)

    # ------------------------------------------------------------------ snapshots and resumes
    def _reader(self, name: str) -> Callable[[int], torch.Tensor]:
        store, streamer = self.stores[name], self.streamers[name]

        def read(k: int) -> torch.Tensor:
            flat = torch.zeros(store.numels[k], dtype=store.dtype)
            if store.current(k) is not None:
                streamer.run(lambda: store.read(k, flat))
            return flat

        return read

    def tensors(self, prefix: str) -> dict[str, Deferred]:
        """Every state tensor by its snapshot name (``prefix`` + ``<buffer>/<parameter>``), each read from its
        block's file when loaded (call after a synchronize): one block's buffer in host memory at a time."""
        out: dict[str, Deferred] = {}
        for s, streamer in self.streamers.items():
            streamer.drain()
            deferred = deferred_units(dict(enumerate(self.layouts)), self.stores[s].dtype, self._reader(s))
            out.update({f"{prefix}{s}/{name}": d for name, d in deferred.items()})
        return out

    @torch.no_grad()
    def load(self, tensors: Any, prefix: str, step: int) -> None:
        """Write every block's state from ``tensors`` (named as :meth:`tensors` names them; checked by the
        caller) into its files, one block's buffer at a time, as holding ``step``."""
        for s, streamer in self.streamers.items():
            store = self.stores[s]
            streamer.drain()
            for k, layout in enumerate(self.layouts):
                buf = store.staging(k)
                flat = store.typed(k, buf)
                flat.zero_()
                for name, view in ParameterStore.views(flat, layout).items():
                    view.copy_(tensors[f"{prefix}{s}/{name}"])
                streamer.run(lambda: store.write(k, buf, step))
            streamer.invalidate()

    def close(self) -> None:
        """Finish the I/O and delete the files (no run starts from them)."""
        for s, streamer in self.streamers.items():
            streamer.close()
            self.stores[s].remove_files()
            if hasattr(self.stores[s].engine, "close"):
                self.stores[s].engine.close()
