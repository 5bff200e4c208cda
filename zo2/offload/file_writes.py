"""The file writes an NVMe streamer queues on its I/O thread (zo2.offload.tiered, zo2.offload.nvme_pieces)."""

from __future__ import annotations

from typing import Any, Callable


class QueuedWrites:
    """A streamer's queued file writes (``_writes``: futures of its I/O threads, oldest first): a failed one
    raises at the next check (a full disk: the ResourceError saying the previous version is intact), and every
    sync point waits for all of them; ``run`` puts a job on the I/O thread (``io``) and ``close`` drains it and
    closes the files (``nvme``). Mixed in before the streamer class, whose ``synchronize`` it extends."""

    _writes: list
    io: Any
    nvme: Any
    zero_unwritten = False
    """A unit never written reads as zeros (zo2.offload.nvme_state: a fresh optimizer state), not as an error."""

    def _read_unit(self, unit: int, buf: Any) -> None:
        """Read ``unit``'s current version into ``buf`` (its file's bytes; on the I/O thread)."""
        if self.zero_unwritten and self.nvme.current(unit) is None:
            buf.zero_()
            return
        self.nvme.read(unit, buf)

    def _raise_failed_writes(self, wait: bool = False) -> None:
        """Raise the first failed write; drop the finished ones (``wait``: wait for every one first)."""
        pending = []
        for future in self._writes:
            if wait or future.done():
                future.result()
            else:
                pending.append(future)
        self._writes = pending

    def synchronize(self) -> None:
        super().synchronize()
        self._raise_failed_writes(wait=True)

    def run(self, job: Callable[[], Any]) -> Any:
        """Run ``job`` on the I/O thread after everything queued, and wait for it."""
        return self.io.submit(job).result()

    def close(self) -> None:
        self.drain()
        self.io.shutdown()
        self.nvme.close()
