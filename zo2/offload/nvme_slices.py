"""The NVMe files of a store the processes of a node share: the scheduler's node store (:mod:`zo2.control`), or a
torchrun node's store.

Each unit's flat buffer, padded to a multiple of the node's writers (the processes that upload, update and write
back one slice of every unit with sliced transfers), is cut into equal slices, one per writer, and each slice is
one entry of an :class:`~zo2.offload.nvme.NvmeStore`: its own file pair and marker. Streamed by block a writer's
slice is one contiguous range of the unit; streamed one matrix at a time (``cuts``: the unit's pieces, one per
module, zo2.offload.pieces) it is the writer's share of every piece, one after the other, so each process's
part of a piece — what it uploads, updates and writes back — is one range of its file. A process therefore writes
its slice back crash-safely (the other version, fsync, then the marker) without waiting for the others, and a
crash tears at most the version being written, never the current one.

The files are named after the shared store, ``<store name>-unit<k>-w<r>.{a,b,json}`` with a store name
``zo2-node-<creator pid>-<8 hex>``: once the creator (the scheduler, or the node's first process) is gone they are
stale, and the next owner of the folder deletes them (:func:`~zo2.offload.store.remove_stale_stores`) after
taking the folder's lock (:class:`~zo2.offload.nvme.FolderLock`), which the owner holds while the files live.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch

from zo2.errors import ModelError
from zo2.offload.nvme import FolderLock, IOEngine, NvmeStore
from zo2.offload.store import Segment, layout_numel, remove_stale_stores, share_bounds

log = logging.getLogger("zo2.offload")


def share_parts(cuts: Sequence[tuple[int, int]], writer: int, writers: int) -> list[tuple[int, int]]:
    """Writer ``writer``'s share of each of ``cuts`` (ranges of a buffer, each a multiple of ``writers`` long), in
    order: what it moves of a unit streamed a piece at a time with sliced transfers."""
    return [(lo + a, lo + b) for lo, hi in cuts for a, b in [share_bounds(hi - lo, writer, writers)]]


def slice_stem(name: str, unit: int, writer: int) -> str:
    """The file stem of writer ``writer``'s slice of unit ``unit`` of the shared store ``name``."""
    return f"{name}-unit{unit}-w{writer}"


class SlicedNvme:
    """The slices of the units ``numels`` (unit index → its padded numel, a multiple of ``writers``) of the shared
    store ``name``, in ``folder``: every writer's (``writer=None``), or only ``writer``'s.

    ``create=True`` (the owner: the scheduler, or a torchrun node's first process) takes the folder's lock (unless
    ``lock`` is False: it holds it already, for the weights' files), deletes the files of owners that are gone,
    checks the disk and makes the files; otherwise the files must exist. ``store`` is the underlying :class:`NvmeStore`; its entry ``i`` is ``entries[i]`` = (unit, writer).
    ``cuts``: unit → its pieces' [lo, hi) ranges (each a multiple of ``writers`` long), whose shares make up each
    writer's slice; a unit without cuts is sliced contiguously."""

    def __init__(self, folder: str | Path, name: str, numels: Mapping[int, int], dtype: torch.dtype, writers: int,
                 *, engine: IOEngine, pin: bool, create: bool = False, writer: int | None = None,
                 cuts: Mapping[int, Sequence[tuple[int, int]]] | None = None, lock: bool = True):
        self.folder = Path(folder)
        self.units = sorted(numels)
        self.numels = dict(numels)
        self.writers = writers
        self.cuts = {k: list((cuts or {}).get(k) or [(0, n)]) for k, n in self.numels.items()}
        for k, pieces in self.cuts.items():
            if any((hi - lo) % writers for lo, hi in pieces) or sum(hi - lo for lo, hi in pieces) != self.numels[k]:
                raise ModelError(f"unit {k}: pieces {pieces} do not split its {self.numels[k]} elements into "
                                 f"{writers} equal shares each; this is a bug in zo2.")
        mine = range(writers) if writer is None else [writer]
        self.entries = [(k, w) for k in self.units for w in mine]
        self._entry = {e: i for i, e in enumerate(self.entries)}
        self.lock = None
        if create:
            self.folder.mkdir(parents=True, exist_ok=True)
            self.lock = FolderLock(self.folder) if lock else None
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

    def parts(self, unit: int, writer: int) -> list[tuple[int, int]]:
        """The ranges [lo, hi) of unit ``unit``'s flat buffer that writer ``writer``'s slice holds, in its file's
        order: its share of each cut."""
        return share_parts(self.cuts[unit], writer, self.writers)

    def bounds(self, unit: int, writer: int) -> tuple[int, int]:
        """The range [lo, hi) of unit ``unit``'s flat buffer that writer ``writer``'s slice holds (a unit sliced
        contiguously)."""
        (part,) = self.parts(unit, writer)
        return part

    def slice_of(self, unit: int, writer: int, flat: torch.Tensor) -> torch.Tensor:
        """Writer ``writer``'s slice of ``flat`` (the unit's padded buffer), as its file holds it (a view where the
        slice is one range)."""
        parts = self.parts(unit, writer)
        if len(parts) == 1:
            return flat[parts[0][0] : parts[0][1]]
        return torch.cat([flat[lo:hi] for lo, hi in parts])

    def entry(self, unit: int, writer: int) -> int:
        return self._entry[(unit, writer)]

    def held(self, unit: int) -> list[int | None]:
        """The step each writer's slice of ``unit`` holds (its current version's marker; None: never written)."""
        return [self.store.held(self.entry(unit, w)) for w in range(self.writers)]

    def refresh(self) -> None:
        """Read the markers again (the writers switch them as they write their slices back)."""
        self.store.refresh()

    def read(self, unit: int, out: torch.Tensor, unwritten_zero: bool = False) -> None:
        """Fill ``out`` (the unit's padded numel, the store's dtype) from every writer's slice (``unwritten_zero``:
        a slice never written gives zeros, not an error)."""
        for w in range(self.writers):
            parts = self.parts(unit, w)
            if unwritten_zero and self.store.current(self.entry(unit, w)) is None:
                for lo, hi in parts:
                    out[lo:hi].zero_()
                continue
            if len(parts) == 1:
                self.store.read(self.entry(unit, w), out[parts[0][0] : parts[0][1]])
                continue
            mine = torch.empty(self.numels[unit] // self.writers, dtype=out.dtype)
            self.store.read(self.entry(unit, w), mine)
            at = 0
            for lo, hi in parts:
                out[lo:hi].copy_(mine[at : at + hi - lo])
                at += hi - lo

    def read_whole(self, unit: int, unwritten_zero: bool = False) -> torch.Tensor:
        """The unit's current padded buffer in a new host tensor: the markers read again (the writers switch them as
        they write their slices back), then :meth:`read`."""
        self.refresh()
        flat = torch.zeros(self.numels[unit], dtype=self.store.dtype)
        self.read(unit, flat, unwritten_zero)
        return flat

    def write(self, unit: int, flat: torch.Tensor, step: int, writers: Sequence[int] | None = None) -> None:
        """Store the slices of ``flat`` (the unit's padded buffer) as holding ``step``: every writer's, or those of
        ``writers``; each crash-safely (:meth:`NvmeStore.write`)."""
        for w in range(self.writers) if writers is None else writers:
            self.store.write(self.entry(unit, w), self.slice_of(unit, w, flat), step)

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


@dataclass
class NodeFiles:
    """A node's NVMe files of some units, as one of its processes streams them (zo2.offload.nvme_homes): unit k of
    them is the files' unit ``homes[k]``, laid out by ``layouts[k]``."""

    mine: SlicedNvme
    """This process's slices (its store's entry k: unit k's slice)."""
    layouts: list
    homes: list[int]
    writer: int
    whole: SlicedNvme | None = None
    """Every writer's slices (whole units: snapshots, loaders), with several writers."""
    owner: SlicedNvme | None = None
    """A torchrun node's first process: the files it made, locks and deletes at the end."""
    marks: Any = None
    """Under the scheduler: the node store's markers of this process's writes (zo2.offload.tiered.SliceMarks)."""

    @property
    def numels(self) -> list[int]:
        """Each unit's whole padded numel."""
        return [self.mine.numels[h] for h in self.homes]


def cuts_digest(cuts: Mapping[int, Sequence[tuple[int, int]]] | None) -> str:
    """A short hash of files' cuts by piece ("" for files sliced contiguously): a worker streaming a node's files
    one matrix at a time checks it cuts them as the scheduler did."""
    if not cuts:
        return ""
    text = json.dumps(sorted((k, [list(c) for c in v]) for k, v in cuts.items()))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def slice_numels(layouts: Mapping[int, Sequence[Segment]], pad_to: int) -> dict[int, int]:
    """Each unit's numel padded to ``pad_to`` (equal slices for every writer), by unit index."""
    return {k: -(-layout_numel(list(layout)) // pad_to) * pad_to for k, layout in layouts.items()}
