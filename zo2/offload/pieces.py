"""Streaming a block one weight matrix at a time (``optim.stream_granularity = "matrix"``).

A streamed block's flat buffer is cut into *pieces* at the boundaries between the modules holding its parameters
(a linear layer's weight and bias, a norm's): one piece per module (:func:`piece_bounds`). The :class:`~zo2.offload.streamer.BlockStreamer`
moves pieces instead of blocks (:class:`PieceStore` shows it each piece as a "block"), through a ring of
``prefetch + 2`` piece-sized slots: the device holds a few matrices of a block, never the block.

A visit gets a :class:`PieceSource` instead of the flat buffer. The forwards read a module's range of it just
in time (zo2.points): the piece holding that range is acquired, brought to the unit's step when it arrives — the
updates its home copy lacks replayed and the pending one applied, with the sliced segment table, so the values are
bit for bit a whole-buffer pass's — written back when the lagging write-back wants it, and released when the
forwards move on to another piece (not while a module call that reads it is still running). Pieces the forwards never touched are brought up to date when the
visit ends, so every parameter always receives every update. Uploads run in the order the previous pass used
the pieces (the layout order before the first pass).

A stateful optimizer's state moves with the pieces (zo2.offload.state.PiecewiseState): one host store per state
buffer laid out like the weights' store, cut at the same bounds, each through a ring of its own; a piece's state
is uploaded when the piece is brought to the unit's step, updated with it, written back and released. Frozen
weights (a PEFT model's base weights, a prompt-tuned model's blocks) move one module at a time too, read-only,
through a ring of their own (zo2.offload.piece_frozen). The device then holds a few matrices of a block — its
trainable pieces, their state and the frozen pieces read beside them — never a whole block of any of them.

With sliced transfers each process uploads, updates and writes back its part of every piece (and of its state),
and an all-gather assembles the piece when it arrives (every process acquires the same pieces in the same order).
From the scheduler's node store (zo2 launch) a unit's marker is in flight from its first piece's write-back to its
last landed (:class:`PieceMarkers`), so a crash between its pieces leaves it torn and the repair rebuilds it; a
stateful optimizer's state streams piece by piece from the node's state area (and, as in block streaming, a
repair rebuilds weights and state from the snapshot and the log).
"""

from __future__ import annotations

import contextlib
from typing import Any, Callable, Sequence

import torch

from zo2.offload.planner import stream_slots
from zo2.offload.residence import StreamedResidence
from zo2.offload.streamer import BlockStreamer, TransferStats
from zo2.offload.store import ParameterStore

def module_ranges(slots: Sequence[Any], layout: Sequence[Any]) -> list[tuple[int, int]]:
    """The [lo, hi) range of the flat buffer each module holding owned parameters spans, in layout order."""
    offsets = {seg.name: (seg.offset, seg.offset + seg.numel) for seg in layout}
    by_module: dict[int, list[tuple[int, int]]] = {}
    for s in slots:
        if s.name in offsets:
            by_module.setdefault(id(s.reader), []).append(offsets[s.name])
    spans = [(min(lo for lo, _ in r), max(hi for _, hi in r)) for r in by_module.values()]
    return sorted(spans)


def piece_bounds(ranges: Sequence[tuple[int, int]], numel: int) -> list[tuple[int, int]]:
    """Cut ``[0, numel)`` at module boundaries: one piece per module (padding after a module stays with it), so
    every element belongs to exactly one piece and no module's range is split. Small modules are not merged with
    their neighbours: a norm read at the start of a block and a matrix read at its end would then move twice."""
    cuts = sorted({0, numel, *(lo for lo, _ in ranges)})
    cuts = [c for c in cuts if not any(lo < c < hi for lo, hi in ranges)]  # never inside a module's range
    return list(zip(cuts, cuts[1:]))


def unit_pieces(slots: Sequence[Any], layout: Sequence[Any], numel: int) -> list[tuple[int, int]]:
    """The pieces of a unit whose parameters ``slots`` read, laid out by ``layout`` in a buffer of ``numel``."""
    return piece_bounds(module_ranges(slots, layout), numel)


def piece_store(store: ParameterStore, units: Sequence[Any]) -> "PieceStore":
    """The pieces of every streamed unit's block of ``store`` (one per module holding its parameters, plus the
    padding after it), numbered block after block in ``units``' order."""
    pieces = []
    for u in units:
        layout = store.layout(u.store_index)
        bounds = unit_pieces(u.slots, layout, store.flat(u.store_index).numel())
        pieces += [(u.store_index, lo, hi) for lo, hi in bounds]
    return PieceStore(store, pieces)


def piecewise_residence(streamer: "RingStreamer", units: Sequence[Any], gather: Callable | None,
                        frozen: Any = None) -> "PiecewiseResidence":
    """The residence of ``units`` streamed through ``streamer`` (a ring over a :func:`piece_store`); ``frozen``:
    their frozen weights (zo2.offload.piece_frozen.FrozenPieces), or None."""
    bounds: dict[str, list[tuple[int, int]]] = {}
    first: dict[str, int] = {}
    for k, (block, lo, hi) in enumerate(streamer.store.pieces):
        name = next(u.name for u in units if u.store_index == block)
        first.setdefault(name, k)
        bounds.setdefault(name, []).append((lo, hi))
    return PiecewiseResidence(streamer, units, bounds, first, gather, frozen=frozen)


class PieceStore:
    """The pieces of a :class:`ParameterStore`'s blocks, shown to a BlockStreamer as blocks of their own."""

    def __init__(self, store: ParameterStore, pieces: Sequence[tuple[int, int, int]]):
        self.store = store
        self.pieces = list(pieces)
        """(block, lo, hi) of each piece."""
        self.dtype = store.dtype

    def __len__(self) -> int:
        return len(self.pieces)

    def flat(self, index: int) -> torch.Tensor:
        block, lo, hi = self.pieces[index]
        return self.store.flat(block)[lo:hi]

    def numel(self, index: int) -> int:
        _, lo, hi = self.pieces[index]
        return hi - lo

    def uploaded(self, index: int, event: Any) -> None:
        """An upload of piece ``index`` was issued (``event``: its H2D event; None on a CPU): the store behind
        it may need to know when its bytes have left (zo2.offload.nvme_frozen's staging buffers)."""
        hook = getattr(self.store, "uploaded", None)
        if hook is not None:
            hook(self.pieces[index][0], event)


class PieceMarkers:
    """A node store's markers (zo2.offload.markers.StoreMarkers: per unit and writer) seen by a streamer that
    writes pieces back: a unit's write is marked in flight when its first piece's write-back starts and done when
    the last of its pieces written for that step has landed, so a crash between its pieces leaves it torn (the
    scheduler rebuilds it) and never marked as holding a step only some pieces hold."""

    def __init__(self, markers: Any, store: PieceStore):
        self.markers = markers
        self._unit = [block for block, _, _ in store.pieces]
        self._count = {b: self._unit.count(b) for b in set(self._unit)}
        self._open: dict[tuple[int, int, int], int] = {}
        """(unit, writer, step) → pieces of it not yet landed."""

    def begin(self, piece: int, writer: int, step: int) -> None:
        key = (self._unit[piece], writer, step)
        if key not in self._open:
            self._open[key] = self._count[key[0]]
            self.markers.begin(key[0], writer, step)

    def done(self, piece: int, writer: int, step: int) -> None:
        key = (self._unit[piece], writer, step)
        self._open[key] -= 1
        if not self._open[key]:
            del self._open[key]
            self.markers.done(key[0], writer, step)


class Ring:
    """The device memory of one or more :class:`RingStreamer`: one buffer, allocated piece by piece in upload
    order, each allocation owned by the streamer that made it. Streamers sharing a ring (the host-homed blocks' and
    the NVMe-homed blocks', which a pass visits one after the other) take one ring of device memory, not one each:
    an upload never overwrites an allocation its owner's forwards still read, and waits for the busy events (the
    forwards that read it, its write-back) of every allocation it overwrites, whoever owns it."""

    def __init__(self, numel: int, dtype: torch.dtype, device: torch.device):
        self.pool = torch.empty(numel, dtype=dtype, device=device)
        self.live: dict[int, tuple[int, int, "RingStreamer"]] = {}
        """Allocation id → its [lo, hi) of the pool and its owner, for every allocation not yet overwritten."""
        self.head = 0
        self.ids = 0

    def fits(self, largest: int, slots: int, dtype: torch.dtype) -> bool:
        """Whether ``slots`` allocations of ``largest`` elements of ``dtype`` fit this ring."""
        return self.pool.dtype == dtype and slots * largest <= self.pool.numel()


class RingStreamer(BlockStreamer):
    """A :class:`BlockStreamer` whose device memory is a :class:`Ring` of ``(prefetch + 2)`` × the largest piece,
    allocated piece by piece in upload order, instead of fixed slots: a norm's few KB take a few KB, so the large
    matrices around it keep the room, and a matrix's slot is reused only after the pieces uploaded since have
    filled the ring (by then its write-back has long landed). Each allocation is a "slot" of the base class
    (its own id, view, busy events and in-use mark); an upload waits for the busy events of every allocation it
    overwrites and never overwrites one a forward still reads. ``ring``: share another streamer's ring where it
    holds this one's slots (same dtype); a new ring otherwise."""

    def __init__(self, store: Any, device: torch.device, prefetch: int = 1, measure: bool = True,
                 ring: Ring | None = None):
        self._shared = ring
        super().__init__(store, device, prefetch, measure)

    def _make_slots(self, largest: int) -> dict[int, torch.Tensor]:
        slots = stream_slots(self.prefetch)
        shared = self._shared
        self.owns_ring = shared is None or not shared.fits(largest, slots, self.store.dtype)
        self.ring = Ring(slots * largest, self.store.dtype, self.device) if self.owns_ring else shared
        self.pool = self.ring.pool
        return {0: self.pool}  # id 0: the whole ring (scratch for measurements before any upload)

    @property
    def device_bytes(self) -> int:
        """The ring's bytes where this streamer made it (a shared ring counts once, for its maker)."""
        return self.pool.numel() * self.pool.element_size() if self.owns_ring else 0

    def attach_frozen(self, frozen: Any) -> None:
        if frozen is not None:
            raise ValueError("a ring streamer moves pieces of one store (frozen weights take a ring of their own: "
                             "zo2.offload.piece_frozen)")

    def _choose_slot(self, block: int, required: bool) -> int | None:
        ring = self.ring
        n = self._numel(block)
        lo = ring.head
        for _ in range(len(ring.live) + 2):
            if lo + n > ring.pool.numel():
                lo = 0
            busy = [a for a, (x, y, owner) in ring.live.items() if x < lo + n and lo < y and a in owner._in_use]
            if not busy:
                break
            lo = max(ring.live[a][1] for a in busy)  # past what a forward still reads
        else:
            if not required:
                return None
            raise RuntimeError("the streamer's ring is taken by weights forwards still read; this is a bug in zo2.")
        victims = [(a, owner) for a, (x, y, owner) in ring.live.items() if x < lo + n and lo < y]
        ring.ids += 1
        slot = ring.ids
        self._slot_busy[slot] = [e for a, owner in victims for e in owner._evict(a)]
        ring.live[slot] = (lo, lo + n, self)
        self.slots[slot] = ring.pool[lo : lo + n]
        ring.head = lo + n
        return slot

    def _evict(self, slot: int) -> list:
        """Allocation ``slot`` is being overwritten: forget it and the copy in it; its busy events (which the
        upload overwriting it waits for)."""
        del self.ring.live[slot]
        self.slots.pop(slot)
        for b in [b for b, s in self._slot_of.items() if s == slot]:
            self._uploaded.pop(b, None)  # its copy is overwritten now
            del self._slot_of[b]
        return self._slot_busy.pop(slot)


class PieceSource:
    """What a visit of a piecewise-streamed unit gets instead of its flat buffer: ``source[lo:hi]`` is the device
    copy of that range (within one piece), brought to the unit's step on first use (``prepare``)."""

    def __init__(self, residence: "PiecewiseResidence", unit: Any):
        self.residence = residence
        self.unit = unit
        self.prepare: Callable[[int, torch.Tensor, int, int], None] | None = None
        """``prepare(piece, buffer, lo, hi)``: bring an acquired piece up to date (set by the visit)."""
        self.ready: set[int] = set()
        """Pieces brought up to date during this visit (one needed again after its slot was reused is uploaded
        and prepared again: its home may lag)."""
        self.held_now: list[int] = []
        """Pieces acquired and not yet released: the one in use stays held until another is needed."""
        self.calls: list[set[int]] = []
        """The pieces each active module call (outermost first) reads."""

    def __getitem__(self, index: slice) -> torch.Tensor:
        lo, hi = index.start, index.stop
        piece, (p_lo, p_hi) = self.residence.piece_of(self.unit, lo, hi)
        buf = self.piece(piece, p_lo, p_hi)
        return buf[lo - p_lo : hi - p_lo]

    def piece(self, piece: int, lo: int, hi: int) -> torch.Tensor:
        res = self.residence
        fresh = piece not in self.held_now
        if fresh:  # moving on: let go of the pieces no active module call reads
            self.release_held(keep=set().union(*self.calls))
            kept = piece in self.ready and res.streamer.has(piece)  # still in its slot, as this visit left it
        buf = res.streamer.acquire(piece)
        if fresh:
            self.held_now.append(piece)
            res.used(self.unit, piece)
            if not kept:  # freshly uploaded: it holds what its home holds
                self.prepare(piece, buf, lo, hi)
                self.ready.add(piece)
        if self.calls:
            self.calls[-1].add(piece)
        return buf

    @contextlib.contextmanager
    def call(self):
        """Around a module call: the pieces it reads stay held until it returns (a module inside it may need
        another piece meanwhile)."""
        self.calls.append(set())
        try:
            yield
        finally:
            self.calls.pop()

    def release_held(self, keep: set[int] = frozenset()) -> None:
        """Release the held pieces except ``keep`` (their forwards are queued: a slot is reused only after).
        Their device copies stay acquirable until an upload takes the slot, so a piece needed again in this
        visit (a norm read before and after another piece) moves only if its slot was reused."""
        for piece in [p for p in self.held_now if p not in keep]:
            self.residence.streamer.release(piece, keep=True)
        self.held_now = [p for p in self.held_now if p in keep]

    def close(self) -> None:
        """End of the visit: release everything and forget the kept copies (the next visit uploads afresh)."""
        self.release_held()
        for piece in self.ready:
            self.residence.streamer.drop(piece)

    def finish(self) -> None:
        """Bring every piece the forwards did not touch up to date, and release what is held."""
        for piece, (lo, hi) in self.residence.pieces_of(self.unit):
            if piece not in self.ready:
                self.piece(piece, lo, hi)
        self.close()


class PiecewiseResidence(StreamedResidence):
    """Streamed units moved one piece (a module's parameters) at a time; see the module docstring."""

    def __init__(self, streamer: Any, units: Sequence[Any], bounds: dict[str, list[tuple[int, int]]],
                 first_piece: dict[str, int], gather: Callable[[torch.Tensor], None] | None = None,
                 writeback_every: int = 1, frozen: Any = None):
        super().__init__(streamer, units, gather, writeback_every)
        self._bounds = bounds
        """Unit name → the [lo, hi) of each of its pieces, in layout order (none: no trainable parameter)."""
        self._first = first_piece
        """Unit name → the streamer index of its first piece (its pieces are numbered consecutively)."""
        self.frozen = frozen
        """The units' frozen weights, a module at a time through their own ring
        (zo2.offload.piece_frozen.FrozenPieces), or None."""
        self._piece_held = {p: u.applied for u in units for p, _ in self.pieces_of(u)}
        """The step each piece's home copy holds."""
        self._order: dict[str, list[int]] = {}
        """Unit name → the order its pieces were first used in the last pass (prefetch follows it)."""
        self._using: dict[str, list[int]] = {}
        self._tables: dict[int, Any] = {}

    def pieces_of(self, unit: Any) -> list[tuple[int, tuple[int, int]]]:
        first = self._first.get(unit.name, 0)
        return [(first + i, b) for i, b in enumerate(self._bounds.get(unit.name, []))]

    def piece_of(self, unit: Any, lo: int, hi: int) -> tuple[int, tuple[int, int]]:
        for piece, (p_lo, p_hi) in self.pieces_of(unit):
            if p_lo <= lo and hi <= p_hi:
                return piece, (p_lo, p_hi)
        raise RuntimeError(f"{unit.name}: range [{lo}, {hi}) lies in no single piece; this is a bug in zo2.")

    def used(self, unit: Any, piece: int) -> None:
        order = self._using.setdefault(unit.name, [])
        if piece not in order:
            order.append(piece)

    # ------------------------------------------------------------------ the Residence interface
    def pass_order(self, units: Sequence[Any]) -> list[int]:
        """The pieces of a pass over ``units`` in upload order: each unit's in the order its last visit used them
        (the optimizer's state streams in the same order: zo2.offload.state.PiecewiseState)."""
        order: list[int] = []
        for u in units:
            if u.residence is self:
                seen = self._order.get(u.name, [])
                order += seen + [p for p, _ in self.pieces_of(u) if p not in seen]
        return order

    def begin_pass(self, units: Sequence[Any]) -> None:
        mine = [u for u in units if u.residence is self]
        self.last = mine[-1].name if mine else None
        self._using = {}
        self.streamer.begin(self.pass_order(mine))
        if self.frozen is not None:
            self.frozen.begin([self.frozen_index(u) for u in mine])

    def acquire(self, unit: Any) -> PieceSource:
        return PieceSource(self, unit)

    def part(self, unit: Any) -> None:
        return None

    def piece_wants_write_back(self, piece: int, step: int) -> bool:
        return step - self._piece_held[piece] >= self.writeback_every

    def piece_held(self, piece: int) -> int:
        return self._piece_held[piece]

    def piece_part(self, piece: int) -> slice | None:
        """With sliced transfers, the part of the piece this process uploads, updates and writes back."""
        bounds = self.streamer.ranges.get(piece)
        return None if bounds is None else slice(*bounds)

    def piece_table(self, unit: Any, piece: int, bounds: tuple[int, int]) -> Any:
        """The segment table of the piece's range, or of this process's part of it with sliced transfers (kept:
        the kernels cache its device copy per table)."""
        table = self._tables.get(piece)
        if table is None:
            part = self.piece_part(piece)
            lo, hi = bounds if part is None else (bounds[0] + part.start, bounds[0] + part.stop)
            table = self._tables[piece] = unit.table.slice(lo, hi)
        return table

    def write_piece(self, piece: int, step: int) -> None:
        self.streamer.write_back(piece, step)
        self._piece_held[piece] = step

    def held(self, unit: Any) -> int:
        return min((self._piece_held[p] for p, _ in self.pieces_of(unit)), default=unit.applied)

    def release(self, unit: Any) -> None:
        order = self._using.get(unit.name)
        if order:
            self._order[unit.name] = order

    def frozen_weights(self, unit: Any) -> contextlib.AbstractContextManager:
        if self.frozen is None:
            return contextlib.nullcontext()
        return self.frozen.reading(self.frozen_index(unit))

    def frozen_index(self, unit: Any) -> int:
        """``unit``'s block in the frozen weights' store (indexed like the weights' store)."""
        return unit.store_index

    def after_visit(self, unit: Any) -> None:
        super().after_visit(unit)
        if self.frozen is not None:
            self.frozen.after_visit(unit.store_index)

    def invalidate(self) -> None:
        self.streamer.invalidate()
        if self.frozen is not None:
            self.frozen.invalidate()
        self._piece_held = {p: u.applied for u in self.units() for p, _ in self.pieces_of(u)}

    def collect_stats(self) -> TransferStats:
        stats = self.streamer.collect_stats()
        return stats if self.frozen is None else stats.add(self.frozen.collect_stats())
