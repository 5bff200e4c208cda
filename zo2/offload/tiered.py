"""The NVMe tier's residence: blocks whose home is a file pair of an :class:`~zo2.offload.nvme.NvmeStore`.

A visit of an NVMe-homed block runs as a host-streamed one (:class:`~zo2.offload.residence.StreamedResidence`:
the same held / lagging write-back decisions, the same device slots and events of the
:class:`~zo2.offload.streamer.BlockStreamer`), except where the host copy comes from and goes to:

* **reads** — the store's current version is read through the I/O engine into one of a small ring of PAGE-aligned
  pinned staging buffers, ``prefetch`` + 1 blocks ahead of the compute (issued when a pass begins, as each block
  is acquired, and for the next pass's first blocks when a pass ends), so the disk works while the GPU computes.
  An upload copies a staging buffer to the block's device slot (an upload ahead starts only once its read
  landed: the compute is never queued behind a read of a later block).
* **writes** — only when the lagging write-back asks (``optim.writeback_every``) and at flush / sync points: the
  device slot is copied into a free staging buffer, then written crash-safely (:meth:`NvmeStore.write`: the other
  version, fsync, then the marker).

Reads and writes run in FIFO order on one I/O thread (the engine inside it keeps the disk's queue full), so a
read issued after a write of the same block returns what was written. The main thread waits only for the read of
the block it acquires (issued long before), and, rarely, for a staging buffer.

The NVMe-homed blocks' module parameters live on the meta device: there is no host copy. Snapshots and loaders
reach their values through :meth:`NvmeResidence.weights`, :meth:`~NvmeResidence.load_weights` and
:meth:`~NvmeResidence.fill_home`.

With several processes per node (the scheduler's workers, sliced transfers) the files are the node's
(:mod:`zo2.offload.nvme_slices`: one file pair per unit × writer slice): each process reads, uploads, updates and
writes back its slice, an all-gather assembles the block as for host-streamed ones, and under the scheduler every
slice's write-back is marked in the node store's markers (in flight from just before its file is written until
its marker switched), so the scheduler's repair covers these blocks as it covers the node store's.
"""

from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch

from zo2.errors import ModelError
from zo2.models.units import shared_names
from zo2.offload.markers import StoreMarkers
from zo2.offload.file_writes import QueuedWrites
from zo2.offload.nvme import NvmeStore, aligned_empty, open_engine
from zo2.offload.nvme_slices import SlicedNvme
from zo2.offload.residence import StreamedResidence
from zo2.offload.store import Deferred, ParameterStore, deferred_units, pack_layout, repoint
from zo2.offload.streamer import BlockStreamer
from zo2.offload.tiers import staging_buffers


@dataclass
class SliceMarks:
    """The node store's markers of the blocks an :class:`NvmeStreamer` writes: its block ``j`` is the node store's
    unit ``homes[j]``, and this process writes slice ``writer`` of each."""

    markers: StoreMarkers
    writer: int
    homes: list[int]

    def begin(self, block: int, step: int) -> None:
        self.markers.begin(self.homes[block], self.writer, step)

    def done(self, block: int, step: int) -> None:
        self.markers.done(self.homes[block], self.writer, step)


class NvmeStreamer(QueuedWrites, BlockStreamer):
    """A :class:`BlockStreamer` whose blocks' home is ``store`` (files): block k is the store's unit k, which holds
    the whole block or, with sliced transfers (``ranges``), this process's slice of it. ``numels``: each block's
    whole (padded) numel where the store holds slices."""

    def __init__(self, store: NvmeStore, device: torch.device, prefetch: int = 1, measure: bool = True,
                 numels: Sequence[int] | None = None):
        self.nvme = store
        self.whole = list(numels) if numels is not None else list(store.numels)
        self.marks: SliceMarks | None = None
        """Under the scheduler: the node store's markers, set around each write of a block's file."""
        self.io = ThreadPoolExecutor(max_workers=1, thread_name_prefix="zo2-nvme-io")
        """Every read and write of the store, in FIFO order."""
        size = max((store.file_bytes(k) for k in range(len(store))), default=0)
        self.staging = [aligned_empty(size, pin=store.pin) for _ in range(staging_buffers(prefetch))]
        self._last_job: list[Future | None] = [None] * len(self.staging)
        """The last read or write of each staging buffer."""
        self._uploaded_from: list[Any] = [None] * len(self.staging)
        """CUDA: the event of the last upload out of each buffer (a later read into it waits for it)."""
        self._reads: dict[int, tuple[int, Future]] = {}
        """Reads issued and not yet uploaded: block → (staging buffer, future)."""
        self._writes: list[Future] = []
        self._wanted: int | None = None
        self._taken: int | None = None
        super().__init__(store, device, prefetch, measure)

    def _numel(self, block: int) -> int:
        return self.whole[block]

    def _source_part(self, block: int, part: slice) -> torch.Tensor:
        return self._source(block)[: part.stop - part.start]  # the staging buffer holds just this part

    def _home_part(self, block: int, part: slice) -> torch.Tensor:
        return self._home(block)[: part.stop - part.start]

    # ------------------------------------------------------------------ reads
    def acquire(self, block: int) -> torch.Tensor:
        self._raise_failed_writes()
        self._wanted = block
        try:
            return super().acquire(block)
        finally:
            self._wanted = None

    def _upload(self, block: int, required: bool = True) -> None:
        self._read_ahead(block)
        ready = block in self._reads and self._reads[block][1].done()
        if block != self._wanted and not ready:
            return  # uploaded once its read landed, at the latest when acquired
        self._taken = None
        super()._upload(block, required)
        if self._taken is not None:  # the upload ran (a prefetch finding every slot in use does not)
            self._uploaded_from[self._taken] = self._uploaded.get(block)

    def _source(self, block: int) -> torch.Tensor:
        if block not in self._reads:
            self._issue_read(block, force=True)
        self._taken, future = self._reads.pop(block)
        future.result()  # host wait: this block's read, issued ahead and overlapped with earlier compute
        return self.nvme.typed(block, self.staging[self._taken])

    def _read_ahead(self, block: int) -> None:
        """Issue the reads of ``block`` and the ``prefetch`` blocks after it in the pass, while buffers are free."""
        pos = self._position.get(block)
        ahead = [block] if pos is None else self._order[pos : pos + self.prefetch + 1]
        for b in ahead:
            if b not in self._reads and b not in self._uploaded and not self._issue_read(b):
                break

    def _issue_read(self, block: int, force: bool = False) -> bool:
        """Queue a read of ``block`` into a free staging buffer (``force``: free one); False when none is free."""
        buf = self._free_buffer(force)
        if buf is None:
            return False
        after = self._uploaded_from[buf]
        self._uploaded_from[buf] = None
        future = self.io.submit(self._read_job, block, buf, after)
        self._last_job[buf] = future
        self._reads[block] = (buf, future)
        self.stats.bytes_disk_read += self.nvme.file_bytes(block)
        return True

    def _read_job(self, block: int, buf: int, after: Any) -> None:
        if after is not None:
            after.synchronize()  # the buffer's previous block has been uploaded out of it
        self._read_unit(block, self.staging[buf][: self.nvme.file_bytes(block)])

    def _free_buffer(self, force: bool) -> int | None:
        """A staging buffer no pending read holds (``force``: drop the read furthest ahead to get one)."""
        held = {buf for buf, _ in self._reads.values()}
        free = [b for b in range(len(self.staging)) if b not in held]
        if free:
            return min(free, key=lambda b: self._last_job[b] is not None and not self._last_job[b].done())
        if not force:
            return None
        furthest = max(self._reads, key=lambda b: self._position.get(b, -1))
        buf, future = self._reads.pop(furthest)
        future.result()  # its bytes are about to be overwritten
        return buf

    # ------------------------------------------------------------------ writes
    def _home(self, block: int) -> torch.Tensor:
        buf = self._free_buffer(force=True)
        if self._last_job[buf] is not None:
            self._last_job[buf].result()  # a write out of this buffer may still be running
        if self.cuda and self._uploaded_from[buf] is not None:
            self.d2h.wait_event(self._uploaded_from[buf])  # the copy in must follow the upload out of it
            self._uploaded_from[buf] = None
        self._taken = buf
        self._last_job[buf] = None
        return self.nvme.typed(block, self.staging[buf])

    def _landed(self, block: int, step: int, done: Any) -> None:
        buf = self._taken
        future = self.io.submit(self._write_job, block, buf, step, done)
        self._last_job[buf] = future
        self._writes.append(future)
        self.stats.bytes_disk_written += self.nvme.file_bytes(block)

    def _write_job(self, block: int, buf: int, step: int, done: Any) -> None:
        if done is not None:
            done.synchronize()  # the D2H copy into the staging buffer has landed
        if self.marks is not None:
            self.marks.begin(block, step)  # in flight until the new version is durable and current
        self.nvme.write(block, self.staging[buf][: self.nvme.file_bytes(block)], step)
        if self.marks is not None:
            self.marks.done(block, step)


    def drain(self) -> None:
        """Wait for every queued read and write; forget the reads ahead."""
        for _, future in self._reads.values():
            future.result()
        self._reads.clear()
        self.synchronize()

    def invalidate(self) -> None:
        self.drain()
        super().invalidate()


class FileHome:
    """What a residence whose units are homed in an :class:`NvmeStore` (``self.streamer.nvme``; unit k of its units
    is the store's unit k) shares, however it streams them: the weights read from and written to the files
    (snapshots, resume, the loaders) and the files' end. The residence sets ``_index`` (unit name → k),
    ``layouts``, ``whole`` and ``barrier`` (see :class:`NvmeResidence`); its streamer has ``drain``, ``run``,
    ``invalidate`` and ``close``."""

    _index: dict[str, int]
    layouts: list
    whole: SlicedNvme | None = None
    barrier: Callable[[], None] | None = None
    writer: int = 0
    """This process's slice of the node's files (with ``whole``)."""

    @property
    def store(self) -> NvmeStore:
        return self.streamer.nvme

    def index(self, unit: Any) -> int:
        return self._index[unit.name]

    def holds(self, unit: Any) -> bool:
        return unit.name in self._index

    def _each(self) -> list[tuple[int, Any]]:
        return sorted((self._index[u.name], u) for u in self.units())

    def layout(self, unit: Any) -> list:
        """``unit``'s layout in its flat buffer (its home may hold only a slice of that buffer)."""
        return self.layouts[self.index(unit)]

    def deferred_weights(self) -> dict[str, Deferred]:
        """Each parameter read from its unit's file (with sliced files: every writer's slices) when loaded, into
        one buffer that keeps the last unit read (the parameters of a unit are asked for together: one read per
        unit)."""
        self.streamer.drain()
        if not self.layouts:
            return {}
        if self.whole is not None:
            self.whole.refresh()  # the other processes' slices were written since
        scratch = self.store.staging(self._largest()) if len(self.store) and self.whole is None else None

        def read(k: int) -> torch.Tensor:
            if self.whole is None:
                buf = scratch[: self.store.file_bytes(k)]
                self.streamer.run(lambda: self.store.read(k, buf))
                return self.store.typed(k, buf)
            flat = torch.empty(self.whole.numels[self.whole.units[k]], dtype=self.store.dtype)
            self.streamer.run(lambda: self.whole.read(self.whole.units[k], flat))
            return flat

        return deferred_units({k: self.layouts[k] for k, _ in self._each()}, self.store.dtype, read)

    def load_weights(self, tensors: Any) -> set[str]:
        names: set[str] = set()

        def fill(views: dict[str, torch.Tensor]) -> None:
            for n, v in views.items():
                v.copy_(tensors[n])
                names.add(n)

        self.fill_home(fill)
        return names

    def fill_home(self, fill: Callable[[dict[str, torch.Tensor]], None]) -> None:
        self.streamer.drain()
        scratch = self.store.staging(self._largest()) if len(self.store) and self.whole is None else None
        for k, unit in self._each():
            if self.whole is None:
                buf = scratch[: self.store.file_bytes(k)]
                flat = self.store.typed(k, buf)
            else:  # the whole unit is filled, this process's slice written
                flat = torch.empty(self.whole.numels[self.whole.units[k]], dtype=self.store.dtype)
            flat.zero_()  # the alignment gaps between parameters
            fill(ParameterStore.views(flat, self.layouts[k]))
            if self.whole is not None:
                buf = self.whole.slice_of(self.whole.units[k], self.writer, flat)
            self.streamer.run(lambda: self.store.write(k, buf, unit.applied))
            self._held[unit.name] = unit.applied
        self.streamer.invalidate()
        if self.barrier is not None:
            self.barrier()  # every process's slices are written before anyone reads whole units

    def _largest(self) -> int:
        return max(range(len(self.store)), key=self.store.file_bytes)

    owner: SlicedNvme | None = None
    """A torchrun node's first process: the node's files, whose folder it locks and which it deletes at the end."""
    node: Any = None
    """The node's files where its processes share them (zo2.offload.nvme_slices.NodeFiles: torchrun, zo2 launch),
    or None (one process's own files)."""
    def close(self) -> None:
        super().close()  # the residence's frozen files (a PEFT base's)
        self.streamer.close()
        if self.whole is not None:
            self.whole.close()
        if self.owner is not None:
            self.owner.close(remove=True)


class NvmeResidence(FileHome, StreamedResidence):
    """Units homed in an :class:`NvmeStore` (unit k of ``units`` is the store's unit k), streamed through an
    :class:`NvmeStreamer`; the lagging write-back is :class:`StreamedResidence`'s.

    With sliced transfers the store holds this process's slice of each unit: ``layouts`` are the units' own,
    ``gather`` assembles a block (the node's all-gather), ``whole`` reads every writer's slices
    (:class:`~zo2.offload.nvme_slices.SlicedNvme`) and ``barrier`` waits for the node's processes."""

    def __init__(self, streamer: NvmeStreamer, units: Sequence[Any], writeback_every: int = 1, *,
                 layouts: Sequence[Any] | None = None, gather: Callable[[torch.Tensor], None] | None = None,
                 whole: SlicedNvme | None = None, barrier: Callable[[], None] | None = None):
        self._index = {u.name: k for k, u in enumerate(units)}
        self.layouts = [list(x) for x in layouts] if layouts is not None else streamer.nvme.layouts
        self.whole, self.barrier = whole, barrier
        super().__init__(streamer, units, gather, writeback_every)

    def table(self, unit: Any) -> Any:
        bounds = self.streamer.ranges.get(self.index(unit))
        if bounds is None:
            return unit.table
        if unit.slice_table is None:
            unit.slice_table = unit.table.slice(*bounds)  # once: the kernels cache a table's device copy
        return unit.slice_table


def build_nvme_tier(units: Sequence[Any], params: dict[str, torch.nn.Parameter], folder: str, device: torch.device,
                    prefetch: int, engine: Any) -> NvmeResidence:
    """Home ``units`` in an :class:`NvmeStore` under ``folder`` (:func:`nvme_files`), streamed block by block."""
    return NvmeResidence(NvmeStreamer(nvme_files(units, params, folder, device, engine), device, prefetch), units)


def nvme_files(units: Sequence[Any], params: dict[str, torch.nn.Parameter], folder: str, device: torch.device,
               engine: Any) -> NvmeStore:
    """An :class:`NvmeStore` under ``folder`` homing ``units`` (the disk's room is checked before any file is
    made): units whose parameters hold values are written there as the step they hold; the parameters then move
    to the meta device (no host copy is kept). Units built on the meta device are filled later by the loaders."""
    dtypes = {params[n].dtype for u in units for n in u.owned}
    if len(dtypes) != 1:
        raise ModelError(f"NVMe-homed blocks mix parameter dtypes {sorted(map(str, dtypes))}; cast the model to "
                         "one dtype (model.dtype or optim.storage_dtype).")
    layouts = [pack_layout([(n, params[n]) for n in u.owned]) for u in units]
    store = NvmeStore(folder, layouts, dtypes.pop(), engine=engine, pin=device.type == "cuda", lock=True)
    scratch = store.staging(max(range(len(store)), key=store.file_bytes))
    for k, unit in enumerate(units):
        owned = [params[n] for n in unit.owned]
        if not any(p.is_meta for p in owned):
            buf = scratch[: store.file_bytes(k)]
            flat = store.typed(k, buf)
            flat.zero_()
            for seg, p in zip(layouts[k], owned):
                flat[seg.offset : seg.offset + seg.numel].view(seg.shape).copy_(p.detach())
            store.write(k, buf, unit.applied)
        for p in owned:
            repoint(p, torch.empty(p.shape, dtype=p.dtype, device="meta"))  # home is the file: no host copy
    return store


def tier_engine(inputs: Any, units: Sequence[Any]) -> Any:
    """The I/O engine of the ``[offload]`` section, once ``units`` are known to share no parameter with another
    unit (a ModelError otherwise: a file cannot be the home of a parameter another unit reads)."""
    shared = shared_names(inputs.units)
    if any(n in shared for u in units for n in u.owned):
        raise ModelError("A block that shares parameters with another unit cannot be homed on NVMe.")
    t = inputs.tiers
    return open_engine(getattr(t, "nvme_engine", "auto"), getattr(t, "nvme_queue_depth", 8),
                       getattr(t, "block_size_bytes", 1 << 20))


def host_blocks(blocks: Sequence[list], nvme_units: Sequence[int]) -> list[list]:
    """``blocks`` (per unit, its (name, parameter) pairs) with the NVMe-homed units emptied: the part of a node
    store that lives in host memory (an empty unit takes no shared file)."""
    on_nvme = set(nvme_units)
    return [[] if k in on_nvme else list(b) for k, b in enumerate(blocks)]


