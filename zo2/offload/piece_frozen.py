"""Frozen weights of blocks streamed one matrix at a time: read-only pieces, each uploaded just before the module
that reads it runs.

Under ``optim.stream_granularity = "matrix"`` a streamed block's frozen parameters (a PEFT model's base weights;
under prompt tuning every parameter of the block) stay in the :class:`~zo2.offload.frozen.FrozenStore`, one flat
pinned host buffer per block as with block granularity, but move one *reader* at a time. A reader is the module
whose forward reads them (:func:`frozen_readers`): the module holding them, or a PEFT tuner layer (a module with
``get_base_layer``: LoRA, DoRA, IA3, ...), whose forward reads its base layer's weight directly as well as through
the base layer's call (DoRA's weight norm, LoRA's variants). Each reader's frozen parameters are one piece of the
block's frozen buffer (:func:`~zo2.offload.pieces.piece_bounds` over the readers' ranges).

While a unit's forwards run (:meth:`FrozenPieces.reading`) every reader's ``forward`` is wrapped: the call
acquires the reader's piece (uploaded ahead by the prefetch, or now), points the reader's parameters
(``module._parameters[attr]``) at device views of it, runs, and points them back at the host store. The piece
stays held until the forwards need another one and no active reader call reads it; then it is released. It is never
perturbed (zo2.points forms only trainable parameters), never updated and never written back.

The pieces move through a second :class:`~zo2.offload.pieces.RingStreamer` of ``prefetch + 2`` × the largest
frozen piece, not through the trainable weights' ring:

* one ring holds one dtype, and frozen weights are kept in the compute dtype, trainable ones in the storage dtype;
* under PEFT, where frozen weights exist, the trainable pieces are a few small adapter factors and the frozen ones
  the base matrices: each ring sized by its own largest piece adds only the tiny trainable ring to what one shared
  ring would take, and the base matrices never evict the adapters' pieces (or the other way round);
* a frozen piece's home never changes, so its device copy needs none of the trainable ring's bookkeeping (bringing
  it to the unit's step, writing it back, dropping it at the end of the visit): a copy stays acquirable, in this
  pass and the next ones, until an upload takes its room.

Uploads follow the order the previous pass read the pieces in (the layout order before the first pass) and run
``prefetch`` matrices ahead, across block boundaries; when a pass ends the next pass's first pieces start
uploading, as for the trainable ring. With sliced transfers each process uploads whole frozen pieces (as it
uploads whole frozen blocks with block granularity): they are read, never written, so nothing is assembled.

A module that reads another module's frozen parameter outside both modules' calls would read the host store (on a
GPU, a device-mismatch error from torch, never wrong values); such a model streams by block.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Sequence

import torch
from torch import nn

from zo2.offload.frozen import FrozenSlot, FrozenStore
from zo2.offload.pieces import PieceStore, RingStreamer, piece_bounds
from zo2.offload.store import ALIGN
from zo2.offload.streamer import TransferStats


def frozen_readers(root: nn.Module, slots: Sequence[FrozenSlot]) -> list[tuple[nn.Module, list[FrozenSlot]]]:
    """The modules under ``root`` whose forward reads the frozen parameters of ``slots``, each with the slots it
    reads, in module order: a PEFT tuner layer (``get_base_layer``) reads every frozen parameter under it; any other
    module reads those it holds."""
    by_module: dict[int, list[FrozenSlot]] = {}
    for s in slots:
        by_module.setdefault(id(s.module), []).append(s)
    out: list[tuple[nn.Module, list[FrozenSlot]]] = []
    seen: set[int] = set()

    def walk(module: nn.Module) -> None:
        if id(module) in seen:
            return
        seen.add(id(module))
        if callable(getattr(module, "get_base_layer", None)):
            under = [s for m in module.modules() for s in by_module.get(id(m), [])]
            seen.update(id(m) for m in module.modules())
            if under:
                out.append((module, under))
            return
        if id(module) in by_module:
            out.append((module, by_module[id(module)]))
        for child in module.children():
            walk(child)

    walk(root)
    return out


def reader_bytes(slots: Sequence[FrozenSlot]) -> int:
    """The bytes a reader's piece takes at most: its distinct parameters, each rounded up to the store's alignment."""
    params = {s.name: s.module._parameters[s.attr] for s in slots}
    return sum(-(-p.numel() // ALIGN) * ALIGN * p.element_size() for p in params.values())


@dataclass
class _Reader:
    """A module reading a piece: the piece's streamer index and where each of its frozen parameters sits in it."""

    module: nn.Module
    piece: int
    views: list[tuple[FrozenSlot, int, int, tuple[int, ...]]]
    """(slot, offset in the piece, numel, shape) of each frozen parameter it reads."""


class FrozenPieces:
    """The frozen weights of piecewise-streamed blocks (see the module docstring): ``store``'s blocks cut at their
    readers (``roots[i]``: the module of store block ``i``), moved through a :class:`RingStreamer` on ``device``."""

    def __init__(self, store: FrozenStore, roots: dict[int, nn.Module], device: torch.device, prefetch: int,
                 ring: Any = None):
        self.store = store
        pieces: list[tuple[int, int, int]] = []
        self._readers: dict[int, list[_Reader]] = {}
        """Store block → its readers."""
        self._pieces: dict[int, list[int]] = {}
        """Store block → its pieces (streamer indices), in layout order."""
        for block in range(len(store)):
            first = len(pieces)
            readers = self._cut(block, roots.get(block), pieces)
            self._readers[block], self._pieces[block] = readers, list(range(first, len(pieces)))
        self.streamer = RingStreamer(PieceStore(store, pieces), device, prefetch, ring=ring)
        self._order: dict[int, list[int]] = {}
        """Store block → the order its pieces were first read in during its last visit (prefetch follows it)."""
        self.last: int | None = None

    def _cut(self, block: int, root: nn.Module | None, pieces: list[tuple[int, int, int]]) -> list[_Reader]:
        """Append block ``block``'s pieces to ``pieces``; its readers, with their pieces and views."""
        slots = self.store.slots[block] if block < len(self.store.slots) else []
        if root is None or not slots:
            return []
        seg = {s.name: s for s in self.store.layout(block)}
        found = frozen_readers(root, slots)
        spans = [(min(seg[s.name].offset for s in ss), max(seg[s.name].offset + seg[s.name].numel for s in ss))
                 for _, ss in found]
        bounds = piece_bounds(spans, self.store.numel(block))
        first = len(pieces)
        pieces += [(block, lo, hi) for lo, hi in bounds]
        readers = []
        for (module, ss), (lo, hi) in zip(found, spans):
            k = next(k for k, (p_lo, p_hi) in enumerate(bounds) if p_lo <= lo and hi <= p_hi)
            p_lo = bounds[k][0]
            views = [(s, seg[s.name].offset - p_lo, seg[s.name].numel, tuple(seg[s.name].shape)) for s in ss]
            readers.append(_Reader(module, first + k, views))
        return readers

    @property
    def device_bytes(self) -> int:
        return self.streamer.device_bytes

    def begin(self, blocks: Sequence[int]) -> None:
        """A pass over the store blocks ``blocks`` (visit order) starts: upload the first pieces, in the order the
        last pass read them."""
        order: list[int] = []
        for b in blocks:
            seen = self._order.get(b, [])
            order += seen + [p for p in self._pieces.get(b, []) if p not in seen]
        self.last = blocks[-1] if blocks else None
        self.streamer.begin(order)

    @contextlib.contextmanager
    def reading(self, block: int) -> Iterator[None]:
        """While active, the readers of store block ``block`` read their frozen parameters from the ring, each
        piece acquired when its reader is called."""
        readers = self._readers.get(block)
        if not readers:
            yield
            return
        visit = _Visit(self.streamer)
        saved = []
        try:
            for r in readers:
                saved.append((r.module, r.module.__dict__.get("forward")))
                r.module.forward = visit.wrapped(r, r.module.forward)
            yield
        finally:
            for module, previous in reversed(saved):
                if previous is None:
                    del module.__dict__["forward"]
                else:
                    module.forward = previous
            visit.close()
            if visit.used:
                self._order[block] = visit.used

    def after_visit(self, block: int) -> None:
        """The pass's last streamed block was visited: start uploading the next pass's first pieces."""
        if block == self.last:
            self.streamer.prefetch_next_pass()

    def invalidate(self) -> None:
        """Forget the device copies: the frozen store was written from the host (a loader)."""
        self.streamer.invalidate()

    def collect_stats(self) -> TransferStats:
        return self.streamer.collect_stats()


class _Visit:
    """The frozen pieces one unit's visit holds: a piece stays held until another one is needed and no active
    reader call reads it (a reader called once per point acquires its piece once)."""

    def __init__(self, streamer: RingStreamer):
        self.streamer = streamer
        self.held: dict[int, torch.Tensor] = {}
        self.calls: list[int] = []
        """The pieces of the active reader calls, outermost first."""
        self.used: list[int] = []
        """The pieces in the order this visit first read them."""

    def acquire(self, piece: int) -> torch.Tensor:
        buf = self.held.get(piece)
        if buf is None:
            for p in [p for p in self.held if p not in self.calls]:  # moving on: what no active call reads
                self.streamer.release(p, keep=True)  # stays acquirable until its room is needed
                del self.held[p]
            buf = self.held[piece] = self.streamer.acquire(piece)
            if piece not in self.used:
                self.used.append(piece)
        return buf

    def wrapped(self, reader: _Reader, forward: Callable) -> Callable:
        def call(*args: Any, **kwargs: Any) -> Any:
            buf = self.acquire(reader.piece)
            saved = [(s, s.module._parameters[s.attr]) for s, *_ in reader.views]
            self.calls.append(reader.piece)
            try:
                for s, offset, numel, shape in reader.views:
                    s.module._parameters[s.attr] = buf[offset : offset + numel].view(shape)
                return forward(*args, **kwargs)
            finally:
                self.calls.pop()
                for s, p in saved:
                    s.module._parameters[s.attr] = p
        return call

    def close(self) -> None:
        for p in self.held:
            self.streamer.release(p, keep=True)
        self.held = {}
