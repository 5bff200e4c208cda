"""One matrix at a time from the NVMe tier: blocks homed in files (zo2.offload.tiered) streamed to the device a piece
(one module's parameters, zo2.offload.pieces) at a time.

The two halves already exist and keep their roles: the NVMe tier moves *units* between the files and pinned host
memory, the ring moves *pieces* between host memory and the device. Here they meet in the staging buffers:

* **reads** — a unit's file is read whole through the I/O engine into one of ``prefetch + 2`` PAGE-aligned pinned
  staging buffers (the NVMe tier's count, already in ``offload.host_memory_budget``), the current unit and the
  ``prefetch + 1`` after it in the pass, ahead of the compute. :class:`StagedPieces` shows the ring each piece
  as a view of its unit's staging buffer, so an upload of a piece copies from there into the device ring
  (:class:`~zo2.offload.pieces.RingStreamer`: ``prefetch + 2`` of the largest matrix, never a block; the ring of the
  host-homed blocks' pieces where there are some, :class:`~zo2.offload.pieces.Ring`). A piece
  uploaded ahead waits for its unit's read to land (the compute is never queued behind a read).
* **writes** — a piece's write-back (when the lagging write-back asks, ``optim.writeback_every``, and at sync
  points) copies it from the ring into its unit's staging buffer; once every piece of the unit holds the step
  (:meth:`NvmePieceResidence.write_piece`), the buffer is written to the unit's file crash-safely
  (:meth:`~zo2.offload.nvme.NvmeStore.write`: the other version, fsync, the marker). A unit whose staging buffer
  holds pieces its file lacks is never evicted, so no written-back piece is lost.

The staging buffers are a cache of the files: a unit stays staged until its buffer is needed for a unit nearer in
the pass (a unit read again returns what its file holds, which is what the buffer held). One I/O thread runs every
read and write in submission order, so a read issued after a write of the same buffer or unit sees it. On CUDA a
read into a buffer first waits for the uploads out of it, and a file write for the write-backs into it.

Under ``zo2 launch`` the streamer reads the scheduler's files and marks each unit's write in the node store's
markers as the block streamer does, so the scheduler's repair covers them. With several processes per node
(``zo2 launch`` workers, torchrun) each process's file holds its share of every piece, one after the other
(zo2.offload.nvme_slices, cut by piece): it uploads, updates and writes back that share — one range of its staging
buffer — and an all-gather assembles the piece in the ring (zo2.offload.nvme_homes builds it).
"""

from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Callable, Sequence

import torch

from zo2.offload.file_writes import QueuedWrites
from zo2.offload.nvme import NvmeStore, aligned_empty
from zo2.offload.nvme_slices import NodeFiles
from zo2.offload.pieces import PiecewiseResidence, Ring, RingStreamer, unit_pieces
from zo2.offload.store import share_bounds
from zo2.offload.tiered import FileHome
from zo2.offload.tiers import staging_buffers


def nvme_piece_residence(store: NvmeStore, units: Sequence[Any], device: torch.device,
                         prefetch: int, ring: Ring | None = None, frozen: Any = None,
                         node: NodeFiles | None = None, comm: Any = None) -> "NvmePieceResidence":
    """``units`` (unit k is ``store``'s unit k) streamed a piece at a time through a ring of their own, or
    ``ring`` where it holds theirs; ``frozen``: their frozen weights (zo2.offload.piece_frozen.FrozenPieces).
    ``node``: a node's files (``store`` is this process's slices): with several writers each process moves its
    share of every piece, which its file holds in one range, and ``comm`` assembles the piece."""
    layouts = [list(x) for x in node.layouts] if node is not None else store.layouts
    numels = node.numels if node is not None else store.numels
    writers, writer = (node.mine.writers, node.writer) if node is not None else (1, 0)
    pieces, first, bounds = [], {}, {}
    for k, u in enumerate(units):
        first[u.name] = len(pieces)
        bounds[u.name] = unit_pieces(u.slots, layouts[k], numels[k])
        pieces += [(k, lo, hi) for lo, hi in bounds[u.name]]
    streamer = NvmePieceStreamer(StagedPieces(store, pieces, writers), device, prefetch, ring=ring)
    if writers == 1:
        return NvmePieceResidence(streamer, units, bounds, first, frozen=frozen, layouts=layouts)
    streamer.ranges = {i: share_bounds(hi - lo, writer, writers) for i, (_, lo, hi) in enumerate(pieces)}
    residence = NvmePieceResidence(streamer, units, bounds, first, frozen=frozen, layouts=layouts,
                                   gather=comm.gather_slices)
    residence.whole, residence.barrier, residence.writer = node.whole, comm.local_barrier, writer
    return residence


class StagedPieces:
    """The pieces of an :class:`NvmeStore`'s units, shown to a ring as blocks: ``flat(piece)`` is the piece's view
    of the staging buffer its unit is read into (a meta tensor of its size while the unit is not staged: the ring
    asks only its size then). With ``writers`` > 1 the store holds this process's slice of each unit — its share
    of every piece, one after the other (zo2.offload.nvme_slices) — and ``flat(piece)`` is that share;
    ``numel(piece)`` is always the whole piece's (the ring's slot)."""

    def __init__(self, nvme: NvmeStore, pieces: Sequence[tuple[int, int, int]], writers: int = 1):
        self.nvme = nvme
        self.pieces = list(pieces)
        """(unit, lo, hi) of each piece."""
        self.writers = writers
        self.dtype = nvme.dtype
        self.staged: dict[int, torch.Tensor] = {}
        """Unit → the flat view (store dtype) of the staging buffer holding it, or being read into."""
        self._share: list[tuple[int, int]] = []
        """Each piece's [lo, hi) in its unit's staged slice."""
        at: dict[int, int] = {}
        for unit, lo, hi in self.pieces:
            start = at.get(unit, 0)
            at[unit] = start + (hi - lo) // writers
            self._share.append((start, at[unit]))

    def __len__(self) -> int:
        return len(self.pieces)

    def flat(self, index: int) -> torch.Tensor:
        lo, hi = self._share[index]
        flat = self.staged.get(self.pieces[index][0])
        return torch.empty(hi - lo, dtype=self.dtype, device="meta") if flat is None else flat[lo:hi]

    def numel(self, index: int) -> int:
        _, lo, hi = self.pieces[index]
        return hi - lo


class NvmePieceStreamer(QueuedWrites, RingStreamer):
    """A :class:`RingStreamer` over :class:`StagedPieces`: units read ahead from the files into staging buffers,
    pieces uploaded from there into the ring, written back into them, and units written to their files when
    :meth:`write_unit` says every piece is there (see the module docstring)."""

    def __init__(self, store: StagedPieces, device: torch.device, prefetch: int = 1, measure: bool = True,
                 ring: Ring | None = None):
        self.nvme = store.nvme
        self.marks: Any = None
        """Under zo2 launch: the node store's markers (zo2.offload.tiered.SliceMarks), set around each unit write."""
        self.io = ThreadPoolExecutor(max_workers=1, thread_name_prefix="zo2-nvme-io")
        """Every read and write of the files, in FIFO order."""
        size = max((self.nvme.file_bytes(k) for k in range(len(self.nvme))), default=0)
        self.staging = [aligned_empty(size, pin=self.nvme.pin) for _ in range(staging_buffers(prefetch))]
        self._unit = [k for k, _, _ in store.pieces]
        self._buffer_of: dict[int, int] = {}
        """Unit → the staging buffer holding it (or being read into)."""
        self._reads: dict[int, Future] = {}
        """Reads not yet waited for: unit → future."""
        self._uploads: list[list] = [[] for _ in self.staging]
        """CUDA: the events of the uploads out of each buffer since its last read (a read into it waits)."""
        self._d2h: dict[int, list] = {}
        """CUDA: unit → the events of its pieces' write-backs into its buffer (its file write waits)."""
        self._dirty: set[int] = set()
        """Units whose buffer holds pieces their file lacks: never evicted before :meth:`write_unit`."""
        self._writes: list[Future] = []
        self._units: list[int] = []
        self._unit_pos: dict[int, int] = {}
        self._current: int | None = None
        self._wanted: int | None = None
        self._taken: int | None = None
        super().__init__(store, device, prefetch, measure, ring)

    # ------------------------------------------------------------------ the pass, by unit
    def begin(self, order: list[int]) -> None:
        units = list(dict.fromkeys(self._unit[p] for p in order))
        self._units, self._unit_pos = units, {k: i for i, k in enumerate(units)}
        super().begin(order)

    def _window(self) -> list[int]:
        """The current unit and the ``prefetch + 1`` after it in the pass: what the staging buffers are for."""
        pos = self._unit_pos.get(self._current, 0) if self._current is not None else 0
        return self._units[pos : pos + self.prefetch + 2]

    def _read_ahead(self, unit: int) -> None:
        pos = self._unit_pos.get(unit)
        ahead = [unit] if pos is None else self._units[pos : pos + self.prefetch + 1]
        for k in ahead:
            if k not in self._buffer_of and not self._issue_read(k):
                break

    def _issue_read(self, unit: int, force: bool = False) -> bool:
        """Queue a read of ``unit`` into a free staging buffer (``force``: evict one); False when none is free."""
        buf = self._free_buffer(force)
        if buf is None:
            return False
        after, self._uploads[buf] = self._uploads[buf], []
        self._reads[unit] = self.io.submit(self._read_job, unit, buf, after)
        self._buffer_of[unit] = buf
        self.store.staged[unit] = self.nvme.typed(unit, self.staging[buf])
        self.stats.bytes_disk_read += self.nvme.file_bytes(unit)
        return True

    def _read_job(self, unit: int, buf: int, after: list) -> None:
        for event in after:
            event.synchronize()  # the pieces uploaded out of this buffer have left it
        self._read_unit(unit, self.staging[buf][: self.nvme.file_bytes(unit)])

    def _free_buffer(self, force: bool) -> int | None:
        """A buffer no unit holds, else the buffer of a clean unit outside the window (``force``: the clean one
        furthest ahead in it); never the current unit's or a dirty one's."""
        taken = set(self._buffer_of.values())
        free = [b for b in range(len(self.staging)) if b not in taken]
        if free:
            return free[0]
        window = self._window()
        clean = [k for k in self._buffer_of if k not in self._dirty and k != self._current]
        victims = [k for k in clean if k not in window]
        if not victims and force:
            victims = sorted(clean, key=lambda k: -self._unit_pos.get(k, -1))[:1]
        if not victims:
            if force:
                raise RuntimeError("every NVMe staging buffer holds a unit in use; this is a bug in zo2.")
            return None
        victim = victims[0]
        self.store.staged.pop(victim)
        self._reads.pop(victim, None)  # a read still queued lands first (FIFO): the next one follows it
        return self._buffer_of.pop(victim)

    def _staged(self, unit: int) -> int:
        """The buffer holding ``unit``, read now if it is not staged; waits for its read (issued ahead)."""
        if unit not in self._buffer_of:
            self._issue_read(unit, force=True)
        future = self._reads.pop(unit, None)
        if future is not None:
            future.result()  # host wait: this unit's read, issued ahead and overlapped with earlier compute
        return self._buffer_of[unit]

    # ------------------------------------------------------------------ uploads
    def acquire(self, block: int) -> torch.Tensor:
        self._raise_failed_writes()
        self._wanted, self._current = block, self._unit[block]
        try:
            return super().acquire(block)
        finally:
            self._wanted = None

    def _upload(self, block: int, required: bool = True) -> None:
        unit = self._unit[block]
        self._read_ahead(unit)
        landed = unit in self._buffer_of and (unit not in self._reads or self._reads[unit].done())
        if block != self._wanted and not landed:
            return  # uploaded once its unit's read landed, at the latest when acquired
        self._taken = None
        super()._upload(block, required)
        if self._taken is not None and self.cuda and block in self._uploaded:
            self._uploads[self._taken].append(self._uploaded[block])

    def _source(self, block: int) -> torch.Tensor:
        self._taken = self._staged(self._unit[block])
        return self.store.flat(block)

    def _source_part(self, block: int, part: slice) -> torch.Tensor:
        return self._source(block) if self.store.writers > 1 else super()._source_part(block, part)

    def _home_part(self, block: int, part: slice) -> torch.Tensor:
        return self._home(block) if self.store.writers > 1 else super()._home_part(block, part)

    # ------------------------------------------------------------------ write-backs
    def _home(self, block: int) -> torch.Tensor:
        unit = self._unit[block]
        self._staged(unit)
        self._dirty.add(unit)  # before :meth:`write_unit`, its buffer holds what its file lacks
        return self.store.flat(block)

    def _landed(self, block: int, step: int, done: Any) -> None:
        if done is not None:
            self._d2h.setdefault(self._unit[block], []).append(done)

    def write_unit(self, unit: int, step: int) -> None:
        """Every piece of ``unit`` was written back into its staging buffer holding ``step``: write the buffer to
        the unit's file (on the I/O thread, after those write-backs landed)."""
        buf = self._buffer_of[unit]
        events = self._d2h.pop(unit, [])
        self._writes.append(self.io.submit(self._write_job, unit, buf, step, events))
        self._dirty.discard(unit)
        self.stats.bytes_disk_written += self.nvme.file_bytes(unit)

    def _write_job(self, unit: int, buf: int, step: int, events: list) -> None:
        for event in events:
            event.synchronize()  # the pieces' D2H copies into the staging buffer have landed
        if self.marks is not None:
            self.marks.begin(unit, step)  # in flight until the new version is durable and current
        self.nvme.write(unit, self.staging[buf][: self.nvme.file_bytes(unit)], step)
        if self.marks is not None:
            self.marks.done(unit, step)


    def drain(self) -> None:
        """Wait for every queued read and write."""
        for future in self._reads.values():
            future.result()
        self._reads.clear()
        self.synchronize()

    def invalidate(self) -> None:
        """The files were (or are about to be) written from the host: forget the staged units too."""
        self.drain()
        self._buffer_of.clear()
        self.store.staged.clear()
        self._dirty.clear()
        super().invalidate()


class NvmePieceResidence(FileHome, PiecewiseResidence):
    """NVMe-homed units streamed a piece at a time (:class:`PiecewiseResidence`: the same per-piece held steps,
    replays and write-back decisions), their weights reached through the files (:class:`FileHome`: snapshots,
    resume, the loaders). A unit's file is written once every piece of it holds the step written back."""

    def __init__(self, streamer: NvmePieceStreamer, units: Sequence[Any], bounds: dict[str, list[tuple[int, int]]],
                 first_piece: dict[str, int], writeback_every: int = 1, frozen: Any = None,
                 layouts: Sequence[list] | None = None, gather: Callable[[torch.Tensor], None] | None = None):
        self._index = {u.name: k for k, u in enumerate(units)}
        self.layouts = list(layouts) if layouts is not None else streamer.nvme.layouts
        self._pieces_of_unit: dict[int, list[int]] = {}
        for piece, (k, _, _) in enumerate(streamer.store.pieces):
            self._pieces_of_unit.setdefault(k, []).append(piece)
        super().__init__(streamer, units, bounds, first_piece, gather, writeback_every, frozen=frozen)

    def frozen_index(self, unit: Any) -> int:
        return self.index(unit)

    def write_piece(self, piece: int, step: int) -> None:
        super().write_piece(piece, step)
        unit = self.streamer.store.pieces[piece][0]
        if min(self._piece_held[p] for p in self._pieces_of_unit[unit]) == step:
            self.streamer.write_unit(unit, step)  # the staging buffer holds the whole unit at ``step``

    def fill_home(self, fill: Callable[[dict[str, torch.Tensor]], None]) -> None:
        super().fill_home(fill)
        self._piece_held = {p: u.applied for u in self.units() for p, _ in self.pieces_of(u)}
