"""The engines that move the NVMe tier's bytes between files and host memory, and the O_DIRECT alignment they need.

An :class:`IOEngine` moves whole tensors: :class:`ThreadPoolEngine` (``os.preadv`` / ``os.pwritev`` in a pool of
threads, ``O_DIRECT`` where the file system accepts it) or :class:`AioEngine` (DeepSpeed's ``aio_handle``, libaio).
:func:`open_engine` picks one and logs which and why. Buffers for ``O_DIRECT`` start at multiples of :data:`PAGE`
and are padded to it (:func:`aligned_empty`). The file store itself is :mod:`zo2.offload.nvme`.
"""

from __future__ import annotations

import errno
import logging
import os
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any, Protocol

import torch

from zo2.errors import ConfigError

log = logging.getLogger("zo2.offload")

PAGE = 4096
"""Alignment of O_DIRECT transfers: buffer addresses, file offsets and lengths are multiples of it."""


def round_up(nbytes: int, to: int = PAGE) -> int:
    return -(-nbytes // to) * to


def aligned_empty(nbytes: int, *, pin: bool = False) -> torch.Tensor:
    """A uint8 tensor of ``nbytes`` rounded up to :data:`PAGE`, whose ``data_ptr()`` is a multiple of PAGE
    (allocated with a page of slack and sliced; the slice keeps the allocation alive). Pinned when asked."""
    size = round_up(max(nbytes, 1))
    base = torch.empty(size + PAGE, dtype=torch.uint8, pin_memory=pin)
    shift = (-base.data_ptr()) % PAGE
    return base[shift : shift + size]


def is_aligned(tensor: torch.Tensor) -> bool:
    return tensor.data_ptr() % PAGE == 0 and tensor_bytes(tensor) % PAGE == 0


def tensor_bytes(tensor: torch.Tensor) -> int:
    return tensor.numel() * tensor.element_size()


def as_bytes(tensor: torch.Tensor) -> torch.Tensor:
    """The bytes of a contiguous CPU tensor, as a flat uint8 view (bf16 included)."""
    if tensor.device.type != "cpu" or not tensor.is_contiguous():
        raise ValueError("NVMe transfers need a contiguous CPU tensor (pinned for fast uploads).")
    return tensor.reshape(-1).view(torch.uint8)


# ---------------------------------------------------------------------------------------------------- engines
class IOEngine(Protocol):
    """Moves whole tensors between files and host memory: submit any number of reads and writes, then
    :meth:`wait` for all of them (it raises the first failure). ``name`` says which engine runs."""

    name: str

    def submit_read(self, path: str | Path, offset: int, tensor: torch.Tensor) -> None: ...

    def submit_write(self, path: str | Path, offset: int, tensor: torch.Tensor) -> None: ...

    def wait(self) -> int: ...


class ThreadPoolEngine:
    """``os.preadv`` / ``os.pwritev`` in a pool of ``queue_depth`` threads, each request cut into chunks of
    ``block_size`` bytes. Files are opened with ``O_DIRECT`` when the buffer, offset and length are aligned and
    the file system accepts it; where it refuses (tmpfs, some network file systems) the engine falls back to
    buffered I/O and says so once in the log."""

    name = "threads"

    def __init__(self, queue_depth: int = 8, block_size: int = 1 << 20, *, direct: bool = True):
        self.block_size = max(round_up(block_size), PAGE)
        self.direct = direct and hasattr(os, "O_DIRECT")
        self.buffered_folders: set[str] = set()
        self._pool = ThreadPoolExecutor(max_workers=max(queue_depth, 1), thread_name_prefix="zo2-nvme")
        self._pending: list[tuple[int, list[Future]]] = []

    def submit_read(self, path: str | Path, offset: int, tensor: torch.Tensor) -> None:
        self._submit(path, offset, tensor, write=False)

    def submit_write(self, path: str | Path, offset: int, tensor: torch.Tensor) -> None:
        self._submit(path, offset, tensor, write=True)

    def _submit(self, path: str | Path, offset: int, tensor: torch.Tensor, *, write: bool) -> None:
        data = as_bytes(tensor)
        fd = self._open(Path(path), write, direct=is_aligned(data) and offset % PAGE == 0)
        view = memoryview(data.numpy())
        futures = [self._pool.submit(_transfer, fd, view[lo : lo + self.block_size], offset + lo, write)
                   for lo in range(0, len(view), self.block_size)]
        self._pending.append((fd, futures))

    def _open(self, path: Path, write: bool, *, direct: bool) -> int:
        flags = (os.O_WRONLY | os.O_CREAT) if write else os.O_RDONLY
        if direct and self.direct:
            try:
                return os.open(path, flags | os.O_DIRECT, 0o644)
            except OSError as exc:
                if exc.errno != errno.EINVAL:  # the file system refuses O_DIRECT
                    raise
                self._note_buffered(path.parent)
        return os.open(path, flags, 0o644)

    def _note_buffered(self, folder: Path) -> None:
        if str(folder) not in self.buffered_folders:
            self.buffered_folders.add(str(folder))
            log.info("NVMe store: the file system of %s refuses O_DIRECT; using buffered I/O there", folder)

    def wait(self) -> int:
        """Wait for every submitted request; raise the first error. Returns the number of requests."""
        pending, self._pending = self._pending, []
        error = None
        for fd, futures in pending:
            for future in futures:
                exc = future.exception()
                error = error or exc
            os.close(fd)
        if error is not None:
            raise error
        return len(pending)

    def close(self) -> None:
        self.wait()
        self._pool.shutdown()


def _transfer(fd: int, view: memoryview, offset: int, write: bool) -> None:
    """Move all of ``view`` at ``offset``, looping over short reads and writes."""
    done = 0
    while done < len(view):
        part = view[done:]
        n = os.pwritev(fd, [part], offset + done) if write else os.preadv(fd, [part], offset + done)
        if n <= 0:
            raise OSError(5, f"short {'write' if write else 'read'}: {done} of {len(view)} bytes at {offset}")
        done += n


class AioEngine:
    """DeepSpeed's asynchronous I/O handle (libaio): ``async_pread`` / ``async_pwrite`` queue requests, ``wait``
    returns when all landed. Buffers should be pinned and PAGE-aligned (the handle opens files with O_DIRECT)."""

    name = "aio"

    def __init__(self, aio_op: Any, queue_depth: int = 8, block_size: int = 1 << 20, threads: int = 1):
        self.handle = aio_op.aio_handle(block_size, queue_depth, False, True, threads)
        self._submitted = 0

    def submit_read(self, path: str | Path, offset: int, tensor: torch.Tensor) -> None:
        self._check(self.handle.async_pread(as_bytes(tensor), str(path), offset), "read", path)

    def submit_write(self, path: str | Path, offset: int, tensor: torch.Tensor) -> None:
        self._check(self.handle.async_pwrite(as_bytes(tensor), str(path), offset), "write", path)

    def _check(self, status: Any, what: str, path: str | Path) -> None:
        if status not in (None, 0):
            raise OSError(5, f"async {what} of {path} was refused by the aio handle (status {status})")
        self._submitted += 1

    def wait(self) -> int:
        submitted, self._submitted = self._submitted, 0
        if not submitted:
            return 0
        completed = self.handle.wait()
        if completed != submitted:
            raise OSError(5, f"the aio handle completed {completed} of {submitted} requests")
        return completed

    def close(self) -> None:
        self.wait()


def load_aio() -> tuple[Any, str]:
    """DeepSpeed's async_io op, or None and the reason it cannot run here."""
    try:
        from deepspeed.ops.op_builder import AsyncIOBuilder
    except ImportError:
        return None, "deepspeed not installed (pip install -e \".[nvme]\")"
    builder = AsyncIOBuilder()
    if not builder.is_compatible():
        return None, "libaio missing: AsyncIOBuilder not compatible (apt-get install libaio-dev; see ds_report)"
    try:
        return builder.load(), "deepspeed async_io op loaded"
    except Exception as exc:  # a failed JIT build, a missing compiler
        return None, f"AsyncIOBuilder.load() failed: {exc}"


def open_engine(prefer: str = "auto", queue_depth: int = 8, block_size: int = 1 << 20,
                threads: int = 1) -> IOEngine:
    """``auto``: DeepSpeed's AIO engine where the op loads, else the thread pool; ``aio`` insists on AIO
    (ConfigError with the reason when it cannot load); ``threads`` the thread pool. Logs which engine runs and
    why."""
    if prefer not in ("auto", "aio", "threads"):
        raise ConfigError(f"offload io engine must be 'auto', 'aio' or 'threads', not {prefer!r}.")
    if prefer == "threads":
        log.info("NVMe I/O engine: thread pool (chosen in the config)")
        return ThreadPoolEngine(queue_depth, block_size)
    op, reason = load_aio()
    if op is not None:
        log.info("NVMe I/O engine: DeepSpeed aio (%s)", reason)
        return AioEngine(op, queue_depth, block_size, threads)
    if prefer == "aio":
        raise ConfigError(f"The AIO engine cannot run: {reason}. Install it, or use the thread pool engine.")
    log.info("NVMe I/O engine: thread pool (%s)", reason)
    return ThreadPoolEngine(queue_depth, block_size)
