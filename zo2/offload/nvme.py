"""The NVMe tier's file store and the engines that move its bytes.

:class:`NvmeStore` keeps one flat buffer per unit in files under a folder on a local (NVMe) disk, laid out for
``O_DIRECT``: every unit's bytes are padded to a multiple of :data:`PAGE` and read or written whole, from and into
buffers whose address is a multiple of :data:`PAGE` (:func:`aligned_empty`). A unit has two versions,
``unit-<k>.a`` and ``unit-<k>.b``, and a marker ``unit-<k>.json`` naming the current one and the step it holds.
A write fills the other version, makes it durable (``fsync``), and only then replaces the marker (written to a
temporary file, ``fsync``-ed, renamed, the folder ``fsync``-ed): a crash at any point leaves the previous version
current and intact.

The bytes move through an I/O engine of :mod:`zo2.offload.nvme_io` (a thread pool of ``os.preadv`` / ``os.pwritev``,
or DeepSpeed's ``aio_handle``). The NVMe tier's residence
(:mod:`zo2.offload.tiered`) streams blocks homed here.
"""

from __future__ import annotations

import errno
import fcntl
import gc
import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any, Sequence

import torch

from zo2.errors import CheckpointError, ResourceError, write_failure
from zo2.fsync import fsync_dir, fsync_file
from zo2.offload.nvme_io import PAGE, IOEngine, aligned_empty, as_bytes, open_engine, round_up, tensor_bytes
from zo2.offload.store import Segment, layout_numel

log = logging.getLogger("zo2.offload")

DISK_MARGIN_BYTES = 256 << 20
"""Disk space left free in the store's folder when checking that the store fits."""
VERSIONS = ("a", "b")
LOCK_FILE = ".zo2-nvme.lock"
"""The lock file in an NVMe folder: held (``flock``) by the process that owns the files there, naming its pid."""


# ---------------------------------------------------------------------------------------------------- the store
def check_disk(folder: Path, needed: int, what: str) -> None:
    """Raise ResourceError with the numbers when ``needed`` more bytes do not fit on the disk of ``folder``."""
    if needed <= 0:
        return
    free = shutil.disk_usage(folder).free
    if needed + DISK_MARGIN_BYTES > free:
        raise ResourceError(
            f"{what} needs {needed / 1e9:.2f} GB more on the disk of {folder}, but only {free / 1e9:.2f} GB is "
            f"free (keeping {DISK_MARGIN_BYTES / 1e9:.2f} GB free). Nothing there was changed. Free space, point "
            "[offload] nvme_path at a larger disk, or use a smaller storage dtype (bf16 halves fp32).")


class FolderLock:
    """An advisory lock (``flock``) on :data:`LOCK_FILE` in ``folder``, held while this object lives (or until
    :meth:`release`): one run, or one scheduler, per NVMe folder. The kernel drops the lock when its holder dies,
    so a killed run never leaves the folder locked. A second holder gets a ResourceError naming the folder and the
    pid that holds it."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        self.path = self.folder / LOCK_FILE
        self._file = self._take()
        self._file.seek(0)
        self._file.truncate()
        self._file.write(f"{os.getpid()}\n")  # for the error a second holder gets
        self._file.flush()

    def _take(self) -> Any:
        for attempt in range(2):
            f = open(self.path, "a+")
            try:
                fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
                return f
            except OSError as exc:
                if exc.errno not in (errno.EAGAIN, errno.EACCES):
                    f.close()
                    raise
                f.seek(0)
                holder = f.read().strip() or "unknown"
                f.close()
            if holder != str(os.getpid()) or attempt:
                break
            gc.collect()  # this process's own earlier store, dropped but not yet collected, holds it
        raise ResourceError(
            f"The NVMe folder {self.folder} is in use by process {holder} (it holds {self.path}): two runs, or two "
            "schedulers, cannot share offload.nvme_path. Wait for that run to end, or set [offload] nvme_path to "
            "another folder.")

    def release(self) -> None:
        if self._file is not None:
            fcntl.flock(self._file.fileno(), fcntl.LOCK_UN)
            self._file.close()
            self._file = None

    def __del__(self) -> None:  # an engine dropped without close(): the folder goes with it, quietly
        try:
            self.release()
        except Exception:
            pass


class NvmeStore:
    """One file pair per unit under ``folder``: the unit's flat buffer (``dtype``, the numel of its layout)
    padded to :data:`PAGE`, in two versions and a marker. Files already there (a resumed run) are kept with their
    markers; missing ones are created at full size, after checking the disk has room for them.

    ``names``: the files' stems (default ``unit-<k>``). ``create=False`` maps files another process created (the
    scheduler, or a node's first process): they must exist, nothing is created. ``lock``: hold the folder's
    :class:`FolderLock` while the store lives (the process that owns the files). ``versions = 1``: one file per
    unit, for data written once and then only read (a PEFT model's frozen base weights, refilled from the
    checkpoint at every start): a write overwrites it, its marker removed first, so a crash leaves the unit
    unwritten, never torn."""

    def __init__(self, folder: str | Path, layouts: Sequence[Sequence[Segment]], dtype: torch.dtype, *,
                 engine: IOEngine | None = None, pin: bool | None = None, names: Sequence[str] | None = None,
                 create: bool = True, lock: bool = False, versions: int = 2):
        self.folder = Path(folder)
        self.versions = VERSIONS[:versions]
        self.layouts = [list(layout) for layout in layouts]
        self.names = list(names) if names is not None else [f"unit-{k}" for k in range(len(self.layouts))]
        self.dtype = dtype
        self.itemsize = torch.empty((), dtype=dtype).element_size()
        self.numels = [layout_numel(layout) for layout in self.layouts]
        self.pin = torch.cuda.is_available() if pin is None else pin
        if create:
            self.folder.mkdir(parents=True, exist_ok=True)
        self.lock = FolderLock(self.folder) if lock else None  # before any file is touched
        self._owns_engine = engine is None
        self.engine = engine if engine is not None else open_engine()
        self._markers = [self._read_marker(k) for k in range(len(self))]
        self._bounce: torch.Tensor | None = None
        if create:
            self._create_files()
        else:
            self._check_files()

    @classmethod
    def from_numels(cls, folder: str | Path, numels: Sequence[int], dtype: torch.dtype, **kwargs) -> "NvmeStore":
        """A store of plain flat buffers, one per unit, of the given sizes."""
        return cls(folder, [[Segment("flat", 0, n, (n,))] for n in numels], dtype, **kwargs)

    # ------------------------------------------------------------------ layout
    def __len__(self) -> int:
        return len(self.layouts)

    def data_bytes(self, k: int) -> int:
        return self.numels[k] * self.itemsize

    def file_bytes(self, k: int) -> int:
        """The unit's bytes on disk (and in a staging buffer): its data padded to a multiple of PAGE."""
        return round_up(self.data_bytes(k))

    @property
    def nbytes(self) -> int:
        """Disk bytes of the whole store (both versions of every unit)."""
        return sum(len(self.versions) * self.file_bytes(k) for k in range(len(self)))

    def path(self, k: int, version: str) -> Path:
        return self.folder / f"{self.names[k]}.{version}"

    def marker_path(self, k: int) -> Path:
        return self.folder / f"{self.names[k]}.json"

    def staging(self, k: int) -> torch.Tensor:
        """A PAGE-aligned uint8 buffer (pinned where CUDA exists) that :meth:`read` and :meth:`write` move without
        a copy; ``typed(k, buf)`` is its flat view in the store's dtype."""
        return aligned_empty(self.file_bytes(k), pin=self.pin)

    def typed(self, k: int, buf: torch.Tensor) -> torch.Tensor:
        return as_bytes(buf)[: self.data_bytes(k)].view(self.dtype)

    # ------------------------------------------------------------------ markers
    def held(self, k: int) -> int | None:
        """The step the current version of unit ``k`` holds; None before its first write."""
        marker = self._markers[k]
        return None if marker is None else marker["step"]

    def current(self, k: int) -> str | None:
        marker = self._markers[k]
        return None if marker is None else marker["version"]

    def refresh(self) -> None:
        """Read every marker again: another process (a worker writing its slice back) may have switched it."""
        self._markers = [self._read_marker(k) for k in range(len(self))]

    def _read_marker(self, k: int) -> dict | None:
        path = self.marker_path(k)
        if not path.exists():
            return None
        try:
            marker = json.loads(path.read_text())
            ok = marker["version"] in self.versions and isinstance(marker["step"], int)
        except (ValueError, KeyError, TypeError):
            ok = False
        if not ok:
            raise CheckpointError(f"The NVMe store marker {path} is unreadable. Delete the folder {self.folder} to "
                                  "start the store afresh from a snapshot.")
        if marker.get("bytes") != self.file_bytes(k):
            raise CheckpointError(
                f"The NVMe store marker {path} is for a unit of {marker.get('bytes')} bytes, but this model's unit "
                f"{k} has {self.file_bytes(k)}: the folder {self.folder} holds another model's store. Use another "
                "nvme_path, or delete the folder.")
        return marker

    def _switch(self, k: int, version: str, step: int) -> None:
        """Make ``version`` current, durably: temporary file, fsync, atomic rename, fsync of the folder."""
        marker = {"version": version, "step": int(step), "bytes": self.file_bytes(k)}
        tmp = self.marker_path(k).with_suffix(".json.tmp")
        with open(tmp, "w") as f:
            f.write(json.dumps(marker))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.marker_path(k))
        self._markers[k] = marker
        fsync_dir(self.folder)

    # ------------------------------------------------------------------ files
    def _create_files(self) -> None:
        """Check the disk first, then give every version file its full size (nothing written before the check)."""
        missing = []
        for k in range(len(self)):
            for version in self.versions:
                path = self.path(k, version)
                have = path.stat().st_size if path.exists() else 0
                if have < self.file_bytes(k):
                    missing.append((path, self.file_bytes(k), self.file_bytes(k) - have))
        check_disk(self.folder, sum(gap for _, _, gap in missing),
                   f"The NVMe store ({len(self)} units, {self.nbytes / 1e9:.2f} GB with {len(self.versions)} "
                   "version(s) of each)")
        for path, size, _ in missing:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o644)
            try:
                try:
                    os.posix_fallocate(fd, 0, size)  # reserve the blocks: a later write cannot run out of space
                except OSError:
                    os.ftruncate(fd, size)
            finally:
                os.close(fd)

    def _check_files(self) -> None:
        """A mapped store's files must be there at full size: the process that owns them made them first."""
        for k in range(len(self)):
            for version in self.versions:
                path = self.path(k, version)
                if not path.exists() or path.stat().st_size < self.file_bytes(k):
                    raise ResourceError(f"The NVMe file {path} does not exist or is short: the process that owns "
                                        "the folder (the scheduler, or the node's first process) creates the files "
                                        "before the others map them.")

    def forget(self) -> None:
        """Make every unit unwritten (its marker removed): a fresh start over files a previous run left."""
        for k in range(len(self)):
            self.marker_path(k).unlink(missing_ok=True)
            self._markers[k] = None
        fsync_dir(self.folder)

    def remove_files(self) -> None:
        """Delete every file of the store (versions, markers): the owner's clean-up of files no one resumes from."""
        for k in range(len(self)):
            for path in [self.path(k, v) for v in self.versions] + [self.marker_path(k)]:
                path.unlink(missing_ok=True)

    def _bounce_for(self, k: int) -> torch.Tensor:
        size = self.file_bytes(k)
        if self._bounce is None or tensor_bytes(self._bounce) < size:
            self._bounce = aligned_empty(max(self.file_bytes(i) for i in range(len(self))), pin=self.pin)
        return self._bounce[:size]

    # ------------------------------------------------------------------ read / write
    def read(self, k: int, out: torch.Tensor) -> int:
        """Fill ``out`` (a contiguous CPU tensor of at least the unit's data bytes, any dtype) with the current
        version of unit ``k``; returns the step it holds. An aligned buffer of :meth:`file_bytes` (as
        :meth:`staging` gives) is read into directly, any other through a bounce buffer."""
        version = self.current(k)
        if version is None:
            raise CheckpointError(f"Unit {k} of the NVMe store {self.folder} was never written: nothing to read.")
        data = as_bytes(out)
        if tensor_bytes(data) < self.data_bytes(k):
            raise ValueError(f"read buffer of {tensor_bytes(data)} bytes for unit {k} of {self.data_bytes(k)} bytes")
        path = self.path(k, version)
        if path.stat().st_size < self.file_bytes(k):
            raise CheckpointError(f"{path} (the current version of unit {k}) is shorter than the unit: the NVMe "
                                  "store was damaged outside the program. Restore the run from a snapshot.")
        direct = data.data_ptr() % PAGE == 0 and tensor_bytes(data) >= self.file_bytes(k)
        target = data[: self.file_bytes(k)] if direct else self._bounce_for(k)
        self.engine.submit_read(path, 0, target)
        self.engine.wait()
        if not direct:
            data[: self.data_bytes(k)].copy_(target[: self.data_bytes(k)])
        return self._markers[k]["step"]

    def write(self, k: int, src: torch.Tensor, step: int) -> None:
        """Store ``src`` (the unit's data, at least its bytes) as unit ``k`` after ``step``: into the version that
        is not current, durable before the marker names it. A failed write leaves the current version as it
        was and raises ResourceError saying so."""
        data = as_bytes(src)
        if tensor_bytes(data) < self.data_bytes(k):
            raise ValueError(f"write buffer of {tensor_bytes(data)} bytes for unit {k} of {self.data_bytes(k)} bytes")
        direct = data.data_ptr() % PAGE == 0 and tensor_bytes(data) >= self.file_bytes(k)
        if direct:
            source = data[: self.file_bytes(k)]
        else:
            source = self._bounce_for(k)
            source[: self.data_bytes(k)].copy_(data[: self.data_bytes(k)])
            source[self.data_bytes(k) :].zero_()
        version = self.versions[-1] if self.current(k) == self.versions[0] else self.versions[0]
        path = self.path(k, version)
        if len(self.versions) == 1 and self._markers[k] is not None:  # overwritten in place: unwritten until done
            self.marker_path(k).unlink()
            fsync_dir(self.folder)
            self._markers[k] = None
        try:
            self.engine.submit_write(path, 0, source)
            self.engine.wait()
            fsync_file(path)
            self._switch(k, version, step)
        except OSError as exc:
            kept = (f"The previous version of unit {k} (step {self.held(k)}) is intact" if self.held(k) is not None
                    else f"Unit {k} holds nothing yet")
            raise ResourceError(write_failure(path, exc, f"writing unit {k} of the NVMe store", kept)) from exc

    def close(self) -> None:
        """Finish pending I/O; shut the engine down if the store opened it; release the folder's lock."""
        self.engine.wait()
        if self._owns_engine and hasattr(self.engine, "close"):
            self.engine.close()
        if self.lock is not None:
            self.lock.release()
