"""The block streamer: moves streamed blocks between the store and reusable device buffers.

Per streamed block and step: upload (H2D stream) → deferred update on the compute stream → write-back of the
updated block (D2H stream, overlapping the forwards) → the forwards read the device copy → the slot is released.
Uploads run ``prefetch`` blocks ahead of the compute. CUDA events order the three streams; nothing in the hot
loop synchronizes with the host. On a CPU device the same schedule runs with plain copies.

Device memory: ``prefetch + 2`` slots of the largest block, allocated once: one computing, ``prefetch``
arriving, one whose write-back may still be in flight.

Frozen weights (``attach_frozen``; e.g. the base model under LoRA) ride along read-only: each slot has a
companion buffer that the same upload fills from the :class:`~zo2.offload.frozen.FrozenStore` and that is never
written back.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import torch

from zo2.offload.frozen import FrozenStore
from zo2.offload.planner import stream_slots
from zo2.offload.store import ParameterStore


@dataclass
class TransferStats:
    """Bytes moved and (CUDA only) milliseconds the compute stream waited for uploads, since the last reset."""

    bytes_h2d: int = 0
    bytes_d2h: int = 0
    wait_ms: float = 0.0
    uploads: int = 0
    write_backs: int = 0
    replays: int = 0
    """Updates replayed on device copies whose store copy lagged (a lagging write-back)."""
    bytes_disk_read: int = 0
    bytes_disk_written: int = 0
    """Bytes read from and written to the NVMe tier's files (zo2.offload.tiered)."""
    _pending_waits: list = field(default_factory=list)

    def add(self, other: "TransferStats") -> "TransferStats":
        """Add ``other``'s (resolved) counts to these; returns self."""
        self.bytes_h2d += other.bytes_h2d
        self.bytes_d2h += other.bytes_d2h
        self.wait_ms += other.wait_ms
        self.uploads += other.uploads
        self.write_backs += other.write_backs
        self.replays += other.replays
        self.bytes_disk_read += other.bytes_disk_read
        self.bytes_disk_written += other.bytes_disk_written
        return self


class BlockStreamer:
    """Streams the blocks of ``store`` through ``prefetch + 2`` device buffers on ``device``."""

    def __init__(self, store: ParameterStore, device: torch.device, prefetch: int = 1, measure: bool = True,
                 blocks: list[int] | None = None):
        """``blocks``: the store indices this streamer moves (default all; a node store also holds resident
        units, which the slots need not fit)."""
        self.store = store
        self.device = torch.device(device)
        self.prefetch = prefetch
        self.cuda = self.device.type == "cuda"
        indices = range(len(store)) if blocks is None else blocks
        largest = max((self._numel(i) for i in indices), default=0)
        self._largest = largest
        self.slots = self._make_slots(largest)
        self.stats = TransferStats()
        self.measure = measure and self.cuda
        self.ranges: dict[int, tuple[int, int]] = {}
        """Sliced transfers: the part [lo, hi) of each block this process uploads and writes back."""
        self._issued = 0
        """Write-backs issued since the last :meth:`take_issued`."""
        self._order: list[int] = []
        self._position: dict[int, int] = {}
        self._slot_of: dict[int, int] = {}
        self._next_slot = 0
        self._uploaded: dict[int, object] = {}
        self._written: dict[int, object] = {}  # block -> D2H-done event of its last write-back
        self._slot_busy: dict[int, list] = {k: [] for k in range(len(self.slots))}  # wait on before reusing a slot
        self._in_use: set[int] = set()  # slots acquired and not yet released
        self.markers = None
        """A node store's markers (zo2.offload.markers.StoreMarkers): each write-back is marked in flight before
        its bytes move and done once they landed, so a crash never leaves a torn block unnoticed."""
        self.writer = 0
        self._marks: list[tuple[object, int, int]] = []  # (D2H-done event or None, block, step) not yet marked done
        if self.cuda:
            self.h2d = torch.cuda.Stream(self.device)  # uploads run beside the compute
            self.d2h = torch.cuda.Stream(self.device)  # write-backs too, in the other direction

    def _make_slots(self, largest: int) -> list[torch.Tensor] | dict[int, torch.Tensor]:
        """The device buffers uploads go to, by slot id: :func:`~zo2.offload.planner.stream_slots` (``prefetch + 2``)
        of the largest block."""
        return [torch.empty(largest, dtype=self.store.dtype, device=self.device)
                for _ in range(stream_slots(self.prefetch))]

    @property
    def device_bytes(self) -> int:
        return sum(s.numel() * s.element_size() for s in [*self.slots, *self.frozen_slots])

    # ------------------------------------------------------------------ schedule
    def begin(self, order: list[int]) -> None:
        """Start a pass over the blocks ``order`` (store indices, visit order): prefetch the first ones.

        Blocks already uploaded by :meth:`prefetch_next_pass` at the end of the previous pass are kept.
        """
        self._order = list(order)
        self._position = {b: k for k, b in enumerate(self._order)}
        self._uploaded = {b: e for b, e in self._uploaded.items() if b in self._position}
        self._prefetch(0)

    def prefetch_next_pass(self) -> None:
        """At the end of a pass, start uploading the first blocks of the next one (same order), so their
        uploads overlap the head and the host work between steps instead of the next step's start.

        Safe with deferred updates: an upload waits for the block's last write-back, and the pending update
        is applied to the device copy when the block is visited. Call :meth:`invalidate` if the store is
        written from the host in between.
        """
        self._prefetch(0)

    def _ahead(self, start: int) -> list[int]:
        """The blocks from position ``start`` on that a prefetch covers: the next ``prefetch`` ones, where a small
        one (under 1/16 of the largest, a norm streamed one matrix at a time) does not count."""
        out, large = [], 0
        for b in self._order[start:]:
            if large == self.prefetch:
                break
            out.append(b)
            large += self._numel(b) * 16 >= self._largest
        return out

    def _prefetch(self, start: int) -> None:
        for b in self._ahead(start):
            if b not in self._uploaded:
                self._upload(b, required=False)

    def invalidate(self) -> None:
        """Forget device copies uploaded ahead: the store was (or is about to be) written from the host."""
        self.synchronize()
        self._uploaded.clear()

    def acquire(self, block: int) -> torch.Tensor:
        """The device copy of ``block``, ready for the compute stream; prefetches the following blocks."""
        if block not in self._position:
            self.begin([block])
        if block not in self._uploaded:
            self._upload(block)
        self._in_use.add(self._slot_of[block])  # before prefetching: no upload ahead may land in this slot
        self._prefetch(self._position[block] + 1)
        if self.cuda:
            compute = torch.cuda.current_stream(self.device)
            if self.measure:
                ready = torch.cuda.Event(enable_timing=True)
                ready.record(compute)
                self.stats._pending_waits.append((ready, self._uploaded[block]))
            compute.wait_event(self._uploaded[block])  # the forwards need the whole block
        n = self._numel(block)
        return self.slots[self._slot_of[block]][:n]

    def _range(self, block: int) -> slice:
        lo, hi = self.ranges.get(block, (0, self._numel(block)))
        return slice(lo, hi)

    # Where a block's home copy is read from and written to: the host store here; the NVMe tier's streamer
    # (zo2.offload.tiered) stages it through pinned buffers filled from and written to files instead.
    def _numel(self, block: int) -> int:
        return self.store.numel(block)

    def _source(self, block: int) -> torch.Tensor:
        """The host buffer an upload of ``block`` copies from."""
        return self.store.flat(block)

    def _home(self, block: int) -> torch.Tensor:
        """The host buffer a write-back of ``block`` copies into."""
        return self.store.flat(block)

    def _source_part(self, block: int, part: slice) -> torch.Tensor:
        """The host data of ``part`` of ``block`` an upload copies (a home holding only this process's slice gives
        all of it)."""
        return self._source(block)[part]

    def _home_part(self, block: int, part: slice) -> torch.Tensor:
        """The host buffer a write-back of ``part`` of ``block`` copies into."""
        return self._home(block)[part]

    def _landed(self, block: int, step: int, done: object) -> None:
        """A write-back of ``block`` (holding ``step``) was issued; ``done``: its D2H event (None on a CPU)."""

    def write_back(self, block: int, step: int = -1) -> None:
        """Copy the (updated) device copy of ``block`` (its slice, when sliced) back to the store, after the
        work queued so far; ``step``: the last update the copy holds (for the node store's markers)."""
        if self.markers is not None:
            self.markers.begin(block, self.writer, step)
        part = self._range(block)
        src = self.slots[self._slot_of[block]][part]
        dst = self._home_part(block, part)
        if self.cuda:
            updated = torch.cuda.Event()
            updated.record(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(self.d2h):
                self.d2h.wait_event(updated)  # the update kernels have written the slot
                dst.copy_(src, non_blocking=True)
                done = torch.cuda.Event()
                done.record(self.d2h)
            self._written[block] = done
            self._slot_busy[self._slot_of[block]].append(done)
        else:
            done = None
            dst.copy_(src)
        self._landed(block, step, done)
        if self.markers is not None:
            self._marks.append((done, block, step))
            self._settle_marks()
        self.stats.bytes_d2h += dst.numel() * dst.element_size()
        self.stats.write_backs += 1
        self._issued += 1

    def release(self, block: int, keep: bool = False) -> None:
        """The compute stream is done with ``block``'s slot once the work queued so far has run. ``keep``: the
        device copy may be acquired again (as it is now) until an upload reuses its slot or :meth:`drop`."""
        if self.cuda:
            done = torch.cuda.Event()
            done.record(torch.cuda.current_stream(self.device))
            self._slot_busy[self._slot_of[block]].append(done)
        self._in_use.discard(self._slot_of[block])
        if not keep:
            self._uploaded.pop(block, None)

    def has(self, block: int) -> bool:
        """Whether a device copy of ``block`` is there to acquire without an upload."""
        return block in self._uploaded

    def drop(self, block: int) -> None:
        """Forget a kept device copy of ``block`` (it holds changes its home does not: never acquire it again)."""
        if self._slot_of.get(block) not in self._in_use:
            self._uploaded.pop(block, None)

    def synchronize(self) -> None:
        """Wait for every write-back: afterwards the store (and the module parameters) are current."""
        if self.cuda:
            for event in self._written.values():
                event.synchronize()  # host sync: only at flush/save/evaluate, never inside a step
        self._written.clear()
        self._settle_marks()

    def take_issued(self) -> bool:
        """Whether any write-back was issued since the last call (and start counting anew): the same answer on
        every process of a node that visits the same units, so the caller can decide on a collective with it."""
        issued, self._issued = self._issued, 0
        return issued > 0

    def _settle_marks(self) -> None:
        """Mark done the write-backs that have landed (``event.query()`` never blocks)."""
        pending = []
        for event, block, step in self._marks:
            if event is None or event.query():
                self.markers.done(block, self.writer, step)
            else:
                pending.append((event, block, step))
        self._marks = pending

    def collect_stats(self) -> TransferStats:
        """Stats since the last call (resolves the wait timings: call it after the step's host sync)."""
        stats = self.stats
        for ready, uploaded in stats._pending_waits:
            stats.wait_ms += max(0.0, ready.elapsed_time(uploaded))
        stats._pending_waits = []
        self.stats = TransferStats()
        return stats

    # ------------------------------------------------------------------ internals
    def _choose_slot(self, block: int, required: bool) -> int | None:
        """The slot ``block`` is uploaded into: the next one no forward still reads (round robin); its
        ``_slot_busy`` events are what the upload waits for. None (a prefetch is skipped) when every slot is in
        use; a needed upload then raises."""
        free = [k % len(self.slots) for k in range(self._next_slot, self._next_slot + len(self.slots))
                if k % len(self.slots) not in self._in_use]
        if not free:
            if not required:
                return None
            raise RuntimeError(f"the streamer's {len(self.slots)} device slots are all in use: an upload would "
                               "overwrite weights a forward still reads; this is a bug in zo2.")
        slot = free[0]
        self._next_slot = (slot + 1) % len(self.slots)
        for other in [b for b, s in self._slot_of.items() if s == slot and b != block]:
            self._uploaded.pop(other, None)  # a copy uploaded ahead but never used is overwritten now
        return slot

    def _upload(self, block: int, required: bool = True) -> None:
        """Upload ``block`` into the slot :meth:`_choose_slot` gives (nothing if it gives none)."""
        slot = self._choose_slot(block, required)
        if slot is None:
            return
        self._slot_of[block] = slot
        part = self._range(block)
        src = self._source_part(block, part)
        dst = self.slots[slot][part]
        if self.cuda:
            with torch.cuda.stream(self.h2d):
                for event in self._slot_busy[slot]:
                    self.h2d.wait_event(event)  # the slot's previous block is computed and written back
                if block in self._written:
                    self.h2d.wait_event(self._written[block])  # the store holds this block's last update
                dst.copy_(src, non_blocking=True)
                self._upload_frozen(block, slot)
                done = torch.cuda.Event(enable_timing=self.measure)
                done.record(self.h2d)
            self._uploaded[block] = done
        else:
            dst.copy_(src)
            self._upload_frozen(block, slot)
            self._uploaded[block] = done = None
        # a store staging files in host buffers (zo2.offload.nvme_frozen) learns when the bytes have left them
        stores = [self.store] + ([self.frozen] if self.frozen is not None and block < len(self.frozen) else [])
        for hook in [getattr(s, "uploaded", None) for s in stores]:
            if hook is not None:
                hook(block, done)
        self._slot_busy[slot] = []
        self.stats.bytes_h2d += src.numel() * src.element_size()
        self.stats.uploads += 1

    # ------------------------------------------------------------------ frozen weights (read-only companion)
    frozen: FrozenStore | None = None
    """Frozen parameters of the same blocks (same indices), uploaded with each block and never written back."""
    frozen_slots: tuple[torch.Tensor, ...] = ()

    def attach_frozen(self, frozen: FrozenStore | None) -> None:
        """Upload ``frozen``'s buffer of a block together with the block, into a companion of its slot."""
        if frozen is None:
            return
        self.frozen = frozen
        largest = max((frozen.numel(i) for i in range(len(frozen))), default=0)
        self.frozen_slots = tuple(torch.empty(largest, dtype=frozen.dtype, device=self.device) for _ in self.slots)

    def frozen_weights(self, block: int) -> contextlib.AbstractContextManager:
        """While active, ``block``'s modules read their frozen parameters from the device copy uploaded with it
        (call between :meth:`acquire` and :meth:`release`)."""
        if self.frozen is None or block >= len(self.frozen) or not self.frozen.slots[block]:
            return contextlib.nullcontext()
        n = self.frozen.numel(block)
        return self.frozen.swapped(block, self.frozen_slots[self._slot_of[block]][:n])

    def _upload_frozen(self, block: int, slot: int) -> None:
        """Copy ``block``'s frozen weights into the slot's companion (on the current stream: the upload's)."""
        if self.frozen is None or block >= len(self.frozen):
            return
        src = self.frozen.flat(block)
        self.frozen_slots[slot][: src.numel()].copy_(src, non_blocking=self.cuda)
        self.stats.bytes_h2d += src.numel() * src.element_size()
