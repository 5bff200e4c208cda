"""The NVMe files of a store the processes of a node share: the scheduler's node store (:mod:`zo2.control`), or a
torchrun node's store.

Each unit's flat buffer, padded to a multiple of the node's writers (the processes that upload, update and write
back one slice of every unit with sliced transfers), is cut into equal slices, one per writer, and each slice is
one entry of an :class:`~zo2.offload.nvme.NvmeStore`: its own file pair and marker. A process therefore writes
its slice back crash-safely (the other version, fsync, then the marker) without waiting for the others, and a
crash tears at most the version being written, never the current one.

The files are named after the shared store, ``<store name>-unit<k>-w<r>.{a,b,json}`` with a store name
``zo2-node-<creator pid>-<8 hex>``: once the creator (the scheduler, or the node's first process) is gone they are
stale, and the next owner of the folder deletes them (:func:`~zo2.offload.store.remove_stale_stores`) after
taking the folder's lock (:class:`~zo2.offload.nvme.FolderLock`), which the owner holds while the files live.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Mapping, Sequence

import torch

from zo2.offload.nvme import FolderLock, IOEngine, NvmeStore
from zo2.offload.store import Segment, layout_numel, remove_stale_stores, share_bounds

log = logging.getLogger("zo2.offload")


def slice_stem(name: str, unit: int, writer: int) -> str:
    """The file stem of writer ``writer``'s slice of unit ``unit`` of the shared store ``name``."""
    return f"{name}-unit{unit}-w{writer}"


class SlicedNvme:
    """The slices of the units ``numels`` (unit index → its padded numel, a multiple of ``writers``) of the shared
    store ``name``, in ``folder``: every writer's (``writer=None``), or only ``writer``'s.

    ``create=True`` (the owner: the scheduler, or a torchrun node's first process) takes the folder's lock,
    deletes the files of owners that are gone, checks the disk and makes the files; otherwise the files must
    exist. ``store`` is the underlying :class:`NvmeStore`; its entry ``i`` is ``entries[i]`` = (unit, writer)."""

    def __init__(self, folder: str | Path, name: str, numels: Mapping[int, int], dtype: torch.dtype, writers: int,
                 *, engine: IOEngine, pin: bool, create: bool = False, writer: int | None = None):
        self.folder = Path(folder)
        self.units = sorted(numels)
        self.numels = dict(numels)
        self.writers = writers
        mine = range(writers) if writer is None else [writer]
        self.entries = [(k, w) for k in self.units for w in mine]
        self._entry = {e: i for i, e in enumerate(self.entries)}
        self.lock = None
        if create:
            self.folder.mkdir(parents=True, exist_ok=True)
            self.lock = FolderLock(self.folder)
            freed = remove_stale_stores(self.folder)  # the files of owners that died (their pid is in the name)
            if freed:
                log.warning("NVMe store: removed %.2f GB of files left in %s by a run that died", freed / 1e9,
                            self.folder)
        sizes = [self.numels[k] // writers for k, _ in self.entries]
        try:
            self.store = NvmeStore(self.folder, [[Segment("flat", 0, n, (n,))] for n in sizes], dtype, engine=engine,
                                   pin=pin, names=[slice_stem(name, k, w) for k, w in self.entries], create=create)
        except BaseException:
            self._unlock()
            raise

    def bounds(self, unit: int, writer: int) -> tuple[int, int]:
        """The range [lo, hi) of unit ``unit``'s flat buffer that writer ``writer``'s slice holds."""
        return share_bounds(self.numels[unit], writer, self.writers)

    def entry(self, unit: int, writer: int) -> int:
        return self._entry[(unit, writer)]

    def held(self, unit: int) -> list[int | None]:
        """The step each writer's slice of ``unit`` holds (its current version's marker; None: never written)."""
        return [self.store.held(self.entry(unit, w)) for w in range(self.writers)]

    def refresh(self) -> None:
        """Read the markers again (the writers switch them as they write their slices back)."""
        self.store.refresh()

    def read(self, unit: int, out: torch.Tensor) -> None:
        """Fill ``out`` (the unit's padded numel, the store's dtype) from every writer's slice."""
        for w in range(self.writers):
            lo, hi = self.bounds(unit, w)
            self.store.read(self.entry(unit, w), out[lo:hi])

    def write(self, unit: int, flat: torch.Tensor, step: int, writers: Sequence[int] | None = None) -> None:
        """Store the slices of ``flat`` (the unit's padded buffer) as holding ``step``: every writer's, or those of
        ``writers``; each crash-safely (:meth:`NvmeStore.write`)."""
        for w in range(self.writers) if writers is None else writers:
            lo, hi = self.bounds(unit, w)
            self.store.write(self.entry(unit, w), flat[lo:hi], step)

    @property
    def nbytes(self) -> int:
        """Disk bytes of these slices (both versions of each)."""
        return self.store.nbytes

    def close(self, remove: bool = False) -> None:
        """Finish pending I/O; ``remove``: delete the files (the owner, whose files no one resumes from); release
        the folder's lock."""
        try:
            self.store.close()
            if remove:
                self.store.remove_files()
        finally:
            self._unlock()

    def _unlock(self) -> None:
        if self.lock is not None:
            self.lock.release()
            self.lock = None

    def __del__(self) -> None:  # best effort: the owner's files go with it (a killed owner's, with the next owner)
        try:
            if self.lock is not None:
                self.close(remove=True)
        except Exception:
            pass


def slice_numels(layouts: Mapping[int, Sequence[Segment]], pad_to: int) -> dict[int, int]:
    """Each unit's numel padded to ``pad_to`` (equal slices for every writer), by unit index."""
    return {k: -(-layout_numel(list(layout)) // pad_to) * pad_to for k, layout in layouts.items()}
