"""OffloadConfig: the ``[offload]`` section — where streamed blocks live beyond the GPU (pinned host memory, then
files on a local NVMe disk), and how the disk's bytes move."""

from __future__ import annotations

from dataclasses import dataclass

from zo2.config.base import require, require_choice
from zo2.errors import ConfigError

NVME_ENGINES = ("auto", "aio", "threads")
SIZE_UNITS = {"TIB": 1 << 40, "GIB": 1 << 30, "MIB": 1 << 20, "KIB": 1 << 10, "TB": 10**12, "GB": 10**9,
              "MB": 10**6, "KB": 10**3, "B": 1}
"""The suffixes a size may carry ('8GB', '512MiB'; GB = 10⁹ bytes, GiB = 2³⁰)."""


def parse_size(value: int | str) -> int:
    """Bytes from an int or a text like '8GB', '512MiB', '1e9' (ValueError when it is none of these)."""
    if isinstance(value, bool):
        raise ValueError(f"{value!r} is not a size")
    if isinstance(value, int):
        return value
    text = str(value).strip().upper().replace(" ", "")
    for suffix, scale in SIZE_UNITS.items():
        if text.endswith(suffix) and text[: -len(suffix)]:
            return int(float(text[: -len(suffix)]) * scale)
    return int(float(text))


def _size(key: str, value: int | str, minimum: int, example: str) -> int:
    """``value`` as bytes, or a ConfigError naming ``offload.<key>`` and how to write it."""
    try:
        size = parse_size(value)
    except (ValueError, OverflowError):
        raise ConfigError(f"Invalid config value offload.{key} = {value!r}: it must be a number of bytes or a size "
                          f"such as {example!r} (suffixes B, KB, MB, GB, TB, KiB, MiB, GiB, TiB).") from None
    require(size >= minimum, f"offload.{key}", value, f"it must be at least {minimum} bytes (e.g. {example!r}).")
    return size


@dataclass(kw_only=True)
class OffloadConfig:
    """The tiers of streamed blocks (DESIGN.md §2b): GPU-resident under ``optim.gpu_memory_budget``, then pinned
    host memory under ``host_memory_budget``, then files under ``nvme_path`` for the rest."""

    nvme_path: str | None = None
    """Folder on a local (NVMe) disk for the blocks that do not fit ``host_memory_budget``: one file pair per block
    (per block and worker slice under ``zo2 launch`` and torchrun, where the scheduler or the node's first process
    makes them and each process streams its slice), written crash-safely, read back through ``nvme_engine`` into a
    few pinned staging buffers every step and written every ``optim.writeback_every`` steps; a stateful
    optimizer's state (zo-sgd-momentum, zo-adam) of those blocks in more file pairs beside them, and (one process
    per node) a PEFT model's frozen weights of them in files of one version. One run at a time: the
    owner holds a lock on the folder (``.zo2-nvme.lock``) and a second run is refused, naming the pid that holds
    it. Unset: no NVMe tier (a model too large for host memory is refused with the numbers)."""
    host_memory_budget: int | str | None = None
    """Host memory the streamed blocks may occupy (bytes, or '64GB'/'512GiB'), including the NVMe tier's staging
    buffers; under ``zo2 launch`` the whole node store (embedding and head too) and every worker's staging
    buffers. Unset: what psutil reports available minus 2 GiB (the host store's own check)."""
    nvme_engine: str = "auto"
    """How the NVMe files are read and written: 'aio' (DeepSpeed's async I/O op on libaio: the deepspeed extra,
    see the README's NVMe tier), 'threads' (a pool of O_DIRECT preadv/pwritev threads) or 'auto' (aio where it
    loads, else threads; the log says which and why)."""
    nvme_queue_depth: int = 8
    """Requests in flight at once (threads of the thread pool; the aio handle's queue depth)."""
    nvme_block_size: int | str = "1MiB"
    """Size of each request a block's transfer is cut into (bytes or '1MiB'; a multiple of 4096 is used)."""

    def __post_init__(self) -> None:
        require(self.nvme_path is None or (isinstance(self.nvme_path, str) and self.nvme_path.strip() != ""),
                "offload.nvme_path", self.nvme_path, "it must be a folder on a local disk, or unset for no NVMe tier.")
        if self.host_memory_budget is not None:
            _size("host_memory_budget", self.host_memory_budget, 1, "64GB")
        require_choice("offload.nvme_engine", self.nvme_engine, NVME_ENGINES)
        require(isinstance(self.nvme_queue_depth, int) and not isinstance(self.nvme_queue_depth, bool)
                and 1 <= self.nvme_queue_depth <= 1024, "offload.nvme_queue_depth", self.nvme_queue_depth,
                "it must be an integer from 1 to 1024 (8 to 32 suit NVMe drives).")
        _size("nvme_block_size", self.nvme_block_size, 4096, "1MiB")

    @property
    def host_budget_bytes(self) -> int | None:
        """``host_memory_budget`` in bytes (None: unset)."""
        return None if self.host_memory_budget is None else parse_size(self.host_memory_budget)

    @property
    def block_size_bytes(self) -> int:
        return parse_size(self.nvme_block_size)
