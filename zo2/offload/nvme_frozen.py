"""Frozen weights on the NVMe tier: a PEFT model's base weights of the NVMe-homed blocks, in files.

Under LoRA a block's frozen base weights are nearly all its bytes, so the blocks that do not fit
``offload.host_memory_budget`` keep them on the disk too: :class:`FrozenFiles` holds one file per block (one
version: the base weights are written once, at the start of every run, from the model in memory or from the
checkpoint's shards, and then only read) under ``offload.nvme_path``, beside the blocks' trainable files.

It stands in for the pinned :class:`~zo2.offload.frozen.FrozenStore` of the host tier, with the same indices as
the NVMe residence's units and the same interface (``slots``, ``layout``, ``numel``, ``flat``, ``swapped``), so the
streamers move its blocks as they move the host store's: with each block into a companion of its device slot
(block granularity), or a reader at a time through a ring of their own (zo2.offload.piece_frozen):

* ``flat(k)`` is block ``k``'s bytes in one of ``prefetch + 2`` PAGE-aligned pinned staging buffers, read there
  through the I/O engine (on one I/O thread). Asking for block ``k`` also reads the blocks after it (a pass visits
  the NVMe-homed blocks in order; after the last, the first ones of the next pass), so the disk works ahead of the
  compute, as for the trainable files.
* a buffer is read into again only once the uploads out of it have landed (``uploaded``: the streamer's H2D
  events, which the read waits for on the I/O thread), and never while it holds a block of the window being read.

Blocks with no trainable parameter (prompt, prefix tuning) past the host budget keep their weights here too; they
stream with the host-homed blocks, whose streamer reads their frozen weights through :class:`TieredFrozen` (the
pinned store's blocks and these files' side by side).

At rest the modules' frozen parameters of these blocks are on the meta device (there is no host copy); during a
block's forwards they are device views, as with the host store. Snapshots hold the adapters only, so nothing here
is ever saved: a resumed run fills the files again.
"""

from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from zo2.models.base import base_checkpoint_name
from zo2.offload.frozen import FrozenSlot, FrozenStore, frozen_params
from zo2.offload.nvme import NvmeStore
from zo2.offload.nvme_io import aligned_empty
from zo2.offload.store import ParameterStore, pack_layout, repoint
from zo2.offload.tiered import tier_engine
from zo2.offload.tiers import refuse_base_on_nvme, staging_buffers


FROZEN_STEM = "frozen-"
"""The files' names: ``frozen-<k>.a`` and its marker ``frozen-<k>.json``, block k of the NVMe-homed ones."""


def remove_frozen_files(folder: str | Path) -> None:
    """Delete the frozen weights' files a process left in ``folder`` (one killed before its clean-up): the
    folder's owner does it when it closes; a run fills them again at its start anyway."""
    for path in Path(folder).glob(f"{FROZEN_STEM}*"):
        if path.suffix in (".a", ".json"):
            path.unlink(missing_ok=True)


def frozen_files_for(inputs: Any, frozen: Sequence[list[FrozenSlot]] | None, device: torch.device,
                     single: bool = True) -> "FrozenFiles | None":
    """The frozen weights of NVMe-homed blocks (``frozen``: each one's slots) in files under the ``[offload]``
    section's folder (``inputs``: an engine's OffloadInputs), None when they have none; one process per node only
    (``single``: zo2 train, or zo2 launch with one worker)."""
    if not frozen or not any(frozen):
        return None
    if not single:
        refuse_base_on_nvme("several processes per node")
    return FrozenFiles(inputs.tiers.nvme_path, frozen, tier_engine(inputs, []), pin=device.type == "cuda",
                       prefetch=inputs.config.prefetch)


class FrozenFiles:
    """The frozen parameters of NVMe-homed blocks (``blocks[k]``: the slots of block ``k``) in files under
    ``folder`` (read with ``engine``, its own: one I/O engine serves one thread), staged ``prefetch + 2`` blocks at a time in pinned host buffers (see the
    module docstring). Parameters holding values are written to the files here; those on the meta device are
    written by the loaders (:meth:`fill`). Either way they are on the meta device afterwards."""

    def __init__(self, folder: str, blocks: Sequence[list[FrozenSlot]], engine: Any, *, pin: bool, prefetch: int):
        self.slots = [list(s) for s in blocks]
        params, self.dtype = frozen_params(self.slots, "homed on NVMe only in one floating-point dtype (set "
                                                        "optim.compute_dtype to cast them)")
        self.layouts = [pack_layout(block) for block in params]
        self.files = NvmeStore(folder, self.layouts, self.dtype, engine=engine, pin=pin, versions=1,
                               names=[f"{FROZEN_STEM}{k}" for k in range(len(self.layouts))])
        size = max((self.files.file_bytes(k) for k in range(len(self.files))), default=0)
        self.staging = [aligned_empty(size, pin=pin) for _ in range(staging_buffers(prefetch))]
        self.io = ThreadPoolExecutor(max_workers=1, thread_name_prefix="zo2-nvme-frozen")
        self._block_of: list[int | None] = [None] * len(self.staging)
        """The block each staging buffer holds (or is being read into)."""
        self._reads: dict[int, tuple[int, Future]] = {}
        """Block → (its staging buffer, the read into it)."""
        self._uploads: list[list] = [[] for _ in self.staging]
        """CUDA: the events of the uploads out of each buffer since it was read into (a new read waits for them)."""
        self.bytes_read = 0
        """Bytes read from the files since they were made."""
        self._reported = 0
        self._write_params(params)

    # ------------------------------------------------------------------ the store's interface
    def __len__(self) -> int:
        return len(self.layouts)

    def layout(self, index: int) -> list:
        return self.layouts[index]

    def numel(self, index: int) -> int:
        return self.files.numels[index]

    @property
    def nbytes(self) -> int:
        return sum(self.files.data_bytes(k) for k in range(len(self)))

    views = staticmethod(ParameterStore.views)
    swapped = FrozenStore.swapped

    def flat(self, index: int) -> torch.Tensor:
        """Block ``index``'s frozen weights in a staging buffer (read there if they are not), the blocks after it
        read ahead."""
        window = [(index + i) % len(self) for i in range(len(self.staging))][: len(self)]
        for k in window:
            if k not in self._reads and not self._issue(k, keep=window):
                break
        buf, future = self._reads[index]
        future.result()  # host wait: the read issued ahead, overlapped with earlier compute
        return self.files.typed(index, self.staging[buf])

    def take_read(self) -> int:
        """Bytes read from the files since the last call (a step's share, for its TransferStats)."""
        read, self._reported = self.bytes_read - self._reported, self.bytes_read
        return read

    def uploaded(self, index: int, event: Any) -> None:
        """An upload out of block ``index``'s staging buffer was issued (``event``: its H2D event, None on a CPU,
        where the copy is done): a later read into the buffer waits for it."""
        if event is not None and index in self._reads:
            self._uploads[self._reads[index][0]].append(event)

    # ------------------------------------------------------------------ reads
    def _issue(self, block: int, keep: Sequence[int]) -> bool:
        """Read ``block`` into a buffer holding no block of ``keep``; False when there is none."""
        free = [b for b, held in enumerate(self._block_of) if held is None or held not in keep]
        if not free:
            return False
        buf = free[0]
        old = self._block_of[buf]
        if old is not None:
            self._reads.pop(old)[1].result()  # its read has finished before the buffer is read into again
        events, self._uploads[buf] = self._uploads[buf], []
        self._block_of[buf] = block
        self._reads[block] = (buf, self.io.submit(self._read, block, buf, events))
        self.bytes_read += self.files.file_bytes(block)
        return True

    def _read(self, block: int, buf: int, events: list) -> None:
        for event in events:
            event.synchronize()  # the uploads out of this buffer have landed
        self.files.read(block, self.staging[buf][: self.files.file_bytes(block)])

    def drain(self) -> None:
        """Wait for every read; forget what the buffers hold."""
        for _, future in self._reads.values():
            future.result()
        for events in self._uploads:
            for event in events:
                event.synchronize()
        self._reads.clear()
        self._block_of = [None] * len(self.staging)
        self._uploads = [[] for _ in self.staging]

    # ------------------------------------------------------------------ writes
    def _write_params(self, params: list[list[tuple[str, torch.nn.Parameter]]]) -> None:
        """Write each block whose parameters hold values (the model built in memory); move every one of them to
        the meta device (the files are their home)."""
        for k, block in enumerate(params):
            if not any(p.is_meta for _, p in block):
                self._write(k, lambda views, block=block: [views[n].copy_(p.detach()) for n, p in block])
            for _, p in block:
                repoint(p, torch.empty(p.shape, dtype=p.dtype, device="meta"))

    def _write(self, k: int, fill: Callable[[dict[str, torch.Tensor]], Any]) -> None:
        buf = self.staging[0][: self.files.file_bytes(k)]
        flat = self.files.typed(k, buf)
        flat.zero_()  # the alignment gaps between parameters
        fill(self.views(flat, self.layouts[k]))
        self.files.write(k, buf, 0)

    def fill(self, fill: Callable[[dict[str, torch.Tensor]], None]) -> None:
        """The loaders: ``fill`` gets each block's frozen parameters (host views, named as the base model's
        checkpoint names them) one block at a time, which then go to the block's file."""
        self.drain()

        def named(views: dict[str, torch.Tensor]) -> None:
            fill({base_checkpoint_name(n): v for n, v in views.items()})

        for k in range(len(self)):
            self._write(k, named)

    def close(self) -> None:
        """Finish the reads, shut the I/O thread down, and delete the files (a run fills them at its start)."""
        self.drain()
        self.io.shutdown()
        self.files.remove_files()
        self.files.close()
        if hasattr(self.files.engine, "close"):
            self.files.engine.close()


class TieredFrozen:
    """The frozen weights of a host streamer's blocks split between two tiers, indexed like the streamer's blocks:
    block ``i`` in ``host`` (a pinned :class:`FrozenStore`) or in ``files`` (:class:`FrozenFiles`), at its index
    there (``where[i]``: (the store, its index), None where the block has no frozen weight). Blocks without a
    trainable parameter (prompt, prefix tuning) stream from the host store whichever tier holds their weights, so
    the NVMe-homed ones keep them in files and the streamer reads them through this (the interface both stores
    have: ``slots``, ``layout``, ``numel``, ``flat``, ``uploaded``, ``swapped``)."""

    def __init__(self, where: Sequence[tuple[Any, int] | None], files: FrozenFiles):
        self.where = list(where)
        self.files = files
        self.dtype = files.dtype
        self.slots = [[] if w is None else w[0].slots[w[1]] for w in self.where]

    def __len__(self) -> int:
        return len(self.where)

    def layout(self, index: int) -> list:
        w = self.where[index]
        return [] if w is None else w[0].layout(w[1])

    def numel(self, index: int) -> int:
        w = self.where[index]
        return 0 if w is None else w[0].numel(w[1])

    @property
    def nbytes(self) -> int:
        return sum({id(w[0]): w[0].nbytes for w in self.where if w is not None}.values())

    def flat(self, index: int) -> torch.Tensor:
        w = self.where[index]
        return torch.empty(0, dtype=self.dtype) if w is None else w[0].flat(w[1])

    def uploaded(self, index: int, event: Any) -> None:
        w = self.where[index]
        hook = None if w is None else getattr(w[0], "uploaded", None)
        if hook is not None:
            hook(w[1], event)

    def swapped(self, index: int, flat: torch.Tensor) -> Any:
        w = self.where[index]
        return w[0].swapped(w[1], flat)
