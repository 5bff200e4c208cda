"""The node store's NVMe tier: the blocks of the scheduler's node store that do not fit the host memory budget, in
files under ``offload.nvme_path`` that the scheduler owns as it owns the ``/dev/shm`` files.

The scheduler (:class:`~zo2.control.store.NodeStore`) keeps the embedding, the head and the first blocks in shared
memory while they fit ``offload.host_memory_budget`` (the workers' NVMe staging buffers counted in it) and homes
the rest here (:func:`place_units`). :class:`NodeNvme` makes the files — one file pair and marker per unit ×
writer slice (:class:`~zo2.offload.nvme_slices.SlicedNvme`), so every worker writes its slice back crash-safely
on its own — fills them, reads whole units from them for snapshots and repairs, and writes repaired units back.
It holds the folder's lock (a second run or scheduler on the same folder is refused, naming the pid), deletes the
files that schedulers which died left there, and deletes its own files when it closes: the run resumes from its
snapshots and log, as it does from the shared memory.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import torch

from zo2.errors import ResourceError
from zo2.offload.nvme import open_engine, round_up
from zo2.offload.nvme_frozen import remove_frozen_files
from zo2.offload.nvme_slices import SlicedNvme, slice_numels
from zo2.offload.nvme_state import state_stem
from zo2.offload.pieces import unit_pieces
from zo2.offload.store import Deferred, ParameterStore, Segment, deferred_units, repoint
from zo2.offload.tiers import default_host_budget, refuse_base_on_nvme, staging_buffers


def _gb(n: float) -> str:
    return f"{n / 1e9:.2f} GB"


def place_units(units: Sequence[Any], unit_bytes: Sequence[int], tiers: Any, prefetch: int, writers: int
                ) -> list[int]:
    """The units of a node store to home on NVMe: none when every unit fits ``tiers.host_memory_budget`` (default:
    what psutil reports available minus a margin); else the embedding, the head and the blocks in order stay in
    host memory while they fit beside the workers' staging buffers (``prefetch`` + 2 of each one's slice of the
    largest block), and the later blocks go to ``tiers.nvme_path``. ``unit_bytes``: each unit's padded bytes."""
    explicit = tiers.host_budget_bytes is not None
    budget = tiers.host_budget_bytes if explicit else default_host_budget()
    if sum(unit_bytes) <= budget:
        return []
    blocks = [k for k, u in enumerate(units) if u.kind == "block"]
    fixed = sum(b for k, b in enumerate(unit_bytes) if k not in set(blocks))
    largest = max((unit_bytes[k] for k in blocks), default=0)
    staging = staging_buffers(prefetch) * writers * round_up(-(-largest // writers))
    room = budget - fixed - staging
    if room < 0:
        where = "offload.host_memory_budget" if explicit else "what psutil reports available, minus a margin"
        raise ResourceError(
            f"The host budget of {_gb(budget)} ({where}) cannot hold the node store's embedding and head "
            f"({_gb(fixed)}) and the workers' NVMe staging buffers ({_gb(staging)}: {staging_buffers(prefetch)} per "
            f"worker of its slice of the largest block). Raise offload.host_memory_budget or lower optim.prefetch.")
    host = 0
    for k in blocks:
        if unit_bytes[k] > room:
            break
        room -= unit_bytes[k]
        host += 1
    return blocks[host:]


def check_nvme_job(on_nvme: Sequence[int], frozen_base: bool, writers: int = 1) -> None:
    """ConfigError for what the NVMe tier cannot hold yet, when ``on_nvme`` units were placed there (before any
    file is made); ``frozen_base``: some of them have frozen base weights (the workers' own, [peft]);
    ``writers``: the workers per node."""
    if not on_nvme:
        return
    if frozen_base and writers > 1:
        refuse_base_on_nvme(f"{writers} workers per node")


class NodeNvme:
    """The NVMe-homed units of the node store ``name`` (unit index → its layout), each padded to ``pad_to`` and cut
    into one slice per writer, in ``tiers.nvme_path`` (read and written with ``tiers``' I/O engine); a stateful
    optimizer's state buffers ``state_names`` (``state_dtype``) of them in node files cut the same way
    (``state[name]``, zo2.offload.nvme_state: the workers stream their slices as they do the weights')."""

    def __init__(self, tiers: Any, name: str, layouts: Mapping[int, Sequence[Segment]], dtype: torch.dtype,
                 writers: int, pad_to: int, slots: Mapping[int, Sequence[Any]] | None = None,
                 state_names: Sequence[str] = (), state_dtype: torch.dtype = torch.float32):
        self.folder = Path(tiers.nvme_path)
        self.layouts = {k: list(v) for k, v in layouts.items()}
        self.numels = slice_numels(self.layouts, pad_to)
        self.cuts = {k: unit_pieces(slots[k], self.layouts[k], n) for k, n in self.numels.items()} \
            if slots is not None and writers > 1 else None
        """Each unit's pieces where the workers stream them one matrix at a time (a writer's slice is then its
        share of every piece, zo2.offload.nvme_slices); None: sliced contiguously."""
        self.dtype = dtype
        engine = open_engine(tiers.nvme_engine, tiers.nvme_queue_depth, tiers.block_size_bytes)
        self.files = SlicedNvme(self.folder, name, self.numels, dtype, writers, engine=engine, pin=False,
                                create=True, cuts=self.cuts)
        self.state = {s: SlicedNvme(self.folder, state_stem(name, s), self.numels, state_dtype, writers,
                                    engine=engine, pin=False, create=True, cuts=self.cuts, lock=False)
                      for s in state_names} if self.numels else {}
        """A stateful optimizer's state files, never written yet (every unit's state reads as zeros)."""

    def read_state(self, name: str, unit: int) -> torch.Tensor:
        """State buffer ``name`` of ``unit`` (every writer's slice; zeros where none was written), in a new host
        buffer."""
        return self.state[name].read_whole(unit, unwritten_zero=True)

    def state_tensors(self, prefix: str) -> dict[str, Deferred]:
        """Every NVMe-homed unit's state by its snapshot name (``prefix`` + ``<buffer>/<parameter>``), each read
        when loaded: one unit's buffer in host memory at a time."""
        out: dict[str, Deferred] = {}
        for s, files in self.state.items():
            deferred = deferred_units({k: self.layouts[k] for k in self.units}, files.store.dtype,
                                      lambda k, s=s: self.read_state(s, k))
            out.update({f"{prefix}{s}/{n}": d for n, d in deferred.items()})
        return out

    @property
    def units(self) -> list[int]:
        return self.files.units

    def holds(self, unit: int) -> bool:
        return unit in self.numels

    @property
    def nbytes(self) -> int:
        """The units' bytes (one version of each; the disk holds two)."""
        return sum(self.numels.values()) * torch.empty((), dtype=self.dtype).element_size()

    def buffer(self, unit: int) -> torch.Tensor:
        """A zeroed host buffer of the unit's padded numel (alignment gaps and padding stay zero)."""
        return torch.zeros(self.numels[unit], dtype=self.dtype)

    def views(self, unit: int, flat: torch.Tensor) -> dict[str, torch.Tensor]:
        return ParameterStore.views(flat, self.layouts[unit])

    def read(self, unit: int) -> torch.Tensor:
        """The unit's current weights (every writer's slice, as its marker names it), in a new host buffer."""
        return self.files.read_whole(unit)

    def write(self, unit: int, flat: torch.Tensor, step: int) -> None:
        """Store ``flat`` as the unit's weights after ``step`` (every slice, crash-safely)."""
        self.files.write(unit, flat, step)

    def adopt(self, blocks: Sequence[Sequence[tuple[str, torch.nn.Parameter]]]) -> None:
        """Write the NVMe-homed units' parameters (``blocks[k]``: unit k's (name, parameter) pairs) to the files
        as the base weights, where they hold values; then move them to the meta device (no host copy is kept)."""
        for k in self.units:
            params = [p for _, p in blocks[k]]
            if params and not any(p.is_meta for p in params):
                flat = self.buffer(k)
                views = self.views(k, flat)
                for name, p in blocks[k]:
                    views[name].copy_(p.detach())
                self.write(k, flat, -1)
            for p in params:
                repoint(p, torch.empty(p.shape, dtype=p.dtype, device="meta"))

    def fill(self, fill: Callable[[dict[str, torch.Tensor]], None], step: int = -1) -> None:
        """Let ``fill`` write each unit's views (name → host tensor) in turn, each unit then written to its files:
        a unit at a time, never the whole tier in host memory."""
        for k in self.units:
            flat = self.buffer(k)
            fill(self.views(k, flat))
            self.write(k, flat, step)

    def deferred_weights(self) -> dict[str, Deferred]:
        """Every NVMe-homed parameter by name, each read from the files when loaded; the last unit read is kept,
        so a snapshot that asks for a unit's parameters together reads it once and holds one unit at a time."""
        return deferred_units({k: self.layouts[k] for k in self.units}, self.dtype, self.read)

    def close(self) -> None:
        """Delete the files (and the base weights' files a worker killed last left, [peft]) and release the
        folder."""
        try:
            remove_frozen_files(self.folder)
            for files in self.state.values():
                files.close(remove=True)
        finally:
            self.files.close(remove=True)
