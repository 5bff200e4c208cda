"""The residency planner: which blocks stay on the device and which stream from the store.

Under a device-memory budget (default: what NVML reports free on the GPU, minus a margin), keep as many blocks
resident as fit after the embedding, the head, the streaming slots and a working reserve; stream the rest. A
model that fits runs with no offloading at all. Resident blocks are the first ones, so the uploads of the
first streamed blocks overlap the compute of the resident ones.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Callable

import torch

from zo2.errors import ResourceError

MARGIN_FRACTION = 0.05
MARGIN_MIN_BYTES = 1 << 30

SPARE_SLOTS = 1
"""Device slots of a streamer beyond the one computing and the ``prefetch`` uploading: one whose write-back may
still be in flight, so the next upload need not wait for it. With none, an upload into a slot waits for that
slot's write-back event (values are the same either way); ``benchmarks/bench_offload.py --spare-slots 0`` measures
what the spare one buys."""


def stream_slots(prefetch: int) -> int:
    """Device slots of a streamer (block slots, or largest pieces of a ring): computing + ``prefetch`` uploading
    + :data:`SPARE_SLOTS`."""
    return prefetch + 1 + SPARE_SLOTS


def _gb(n: float) -> str:
    return f"{n / 1e9:.2f} GB"


def device_free_bytes(device: torch.device) -> int | None:
    """Free memory of ``device`` from NVML (CUDA), or None where it cannot be read."""
    if device.type != "cuda":
        return None
    try:
        import pynvml

        pynvml.nvmlInit()
        index = device.index if device.index is not None else torch.cuda.current_device()
        handle = pynvml.nvmlDeviceGetHandleByIndex(index)
        return int(pynvml.nvmlDeviceGetMemoryInfo(handle).free)
    except Exception:  # no NVML library / driver: fall back to torch's view
        try:
            return int(torch.cuda.mem_get_info(device)[0])
        except Exception:
            return None


def parse_budget(budget: int | float | str | None, device: torch.device) -> int | None:
    """Bytes from a budget given as bytes (int or '18GB'/'512MiB'), a fraction of free memory, or None (auto)."""
    free = device_free_bytes(device)
    if budget is None:
        if free is None:
            return None
        return int(free - max(MARGIN_MIN_BYTES, MARGIN_FRACTION * free))
    if isinstance(budget, str):
        text = budget.strip().upper().replace(" ", "")
        units = {"TIB": 1 << 40, "GIB": 1 << 30, "MIB": 1 << 20, "KIB": 1 << 10, "TB": 10**12, "GB": 10**9,
                 "MB": 10**6, "KB": 10**3, "B": 1}
        for suffix, scale in units.items():
            if text.endswith(suffix):
                return int(float(text[: -len(suffix)]) * scale)
        return int(float(text))
    if isinstance(budget, float) and 0 < budget <= 1:
        if free is None:
            raise ResourceError("optim.gpu_memory_budget is a fraction of free device memory, but the free memory "
                                f"of {device} cannot be read; give the budget in bytes (e.g. '18GB').")
        return int(budget * free)
    return int(budget)


@dataclass
class Plan:
    """The outcome of planning: block indices resident on the device and streamed from the store."""

    resident: list[int]
    streamed: list[int]
    block_bytes: list[int]
    fixed_bytes: int
    """Embedding + head (always resident)."""
    slot_bytes: int
    """Device buffers of the streamers: :func:`stream_slots` (prefetch + 2) × the largest streamed block; one
    matrix at a time, that many × (the largest trainable module with its optimizer state + the largest frozen module): the rings
    of the trainable pieces, of their state and of the frozen pieces."""
    reserve_bytes: int
    """Working memory kept free for one module's parameters at a point (zo2.points) and directions."""
    budget: int | None
    prefetch: int
    writeback_every: int = 1
    """A streamed block is written back every this many steps (``optim.writeback_every``)."""
    granularity: str = "block"
    """What one upload moves: a whole block, or one matrix (``optim.stream_granularity``)."""
    block_reserve_bytes: int | None = None
    """The working reserve while a block runs (its largest module at a point); ``reserve_bytes`` is the largest
    of every unit's (the embedding's or the head's, in most models)."""
    nvme: list[int] = field(default_factory=list)
    """Streamed blocks homed in files on NVMe (``offload.nvme_path``) rather than pinned host memory
    (zo2.offload.tiers): the ones that do not fit ``offload.host_memory_budget``."""
    host_budget: int | None = None
    """Host memory the streamed blocks may occupy (None: not checked here)."""
    staging_bytes: int = 0
    """The NVMe tier's pinned staging buffers (host memory, within ``host_budget``)."""
    nvme_path: str | None = None
    frozen_bytes: list[int] = field(default_factory=list)
    """Each block's frozen bytes (a PEFT base's; all of a prompt-tuned block's), within ``block_bytes``: read,
    never written back. Empty: none."""

    def _written(self, blocks: list[int]) -> int:
        """What a write-back of ``blocks`` moves: their bytes but the frozen ones."""
        return sum(self.block_bytes[i] - (self.frozen_bytes[i] if self.frozen_bytes else 0) for i in blocks)

    @property
    def host(self) -> list[int]:
        """Streamed blocks homed in pinned host memory."""
        nvme = set(self.nvme)
        return [i for i in self.streamed if i not in nvme]

    @property
    def bytes_per_step_disk_read(self) -> int:
        """Read from the NVMe files per step (every NVMe-homed block once)."""
        return sum(self.block_bytes[i] for i in self.nvme)

    @property
    def bytes_per_step_disk_written(self) -> int:
        """Written to the NVMe files per step, on average over ``writeback_every`` steps."""
        return self._written(self.nvme) // self.writeback_every

    @property
    def bytes_per_step_h2d(self) -> int:
        return sum(self.block_bytes[i] for i in self.streamed)

    @property
    def bytes_per_step_d2h(self) -> int:
        """Written back per step, on average over ``writeback_every`` steps."""
        return self._written(self.streamed) // self.writeback_every

    @property
    def expected_peak(self) -> int:
        resident = sum(self.block_bytes[i] for i in self.resident)
        return self.fixed_bytes + resident + self.slot_bytes + self.reserve_bytes

    def peak_with(self, working: Callable[[float, float], float]) -> int:
        """The expected peak with activations: ``working(block_reserve, reserve)`` adds them to the working
        reserves (zo2.parallel.plan_memory.working_bytes for a batch)."""
        resident = sum(self.block_bytes[i] for i in self.resident)
        block = self.reserve_bytes if self.block_reserve_bytes is None else self.block_reserve_bytes
        return int(self.fixed_bytes + resident + self.slot_bytes + working(block, self.reserve_bytes))

    def describe(self, activations: tuple[str, Callable[[float, float], float]] | None = None) -> str:
        """The plan as text; ``activations`` = (batch, ``working`` as :meth:`peak_with` takes it) adds the peak
        with that batch's activations (the same number ``zo2 plan`` predicts for this residency)."""
        n = len(self.block_bytes)
        lines = [
            f"residency plan: {len(self.resident)}/{n} blocks resident, {len(self.streamed)}/{n} streamed "
            f"(prefetch {self.prefetch}" + (", one matrix at a time)" if self.granularity == "matrix" else ")"),
            f"  embed+head {_gb(self.fixed_bytes)}, resident blocks {_gb(sum(self.block_bytes[i] for i in self.resident))}, "
            f"stream buffers {_gb(self.slot_bytes)}, working reserve {_gb(self.reserve_bytes)}",
            f"  per step: {_gb(self.bytes_per_step_h2d)} host→device, up to {_gb(self.bytes_per_step_d2h)} device→host",
            f"  expected peak device memory {_gb(self.expected_peak)}"
            + (f" of a {_gb(self.budget)} budget" if self.budget is not None else ""),
        ]
        if activations is not None:
            batch, working = activations
            lines[-1] += f"; with the activations of a {batch} batch {_gb(self.peak_with(working))}"
        if self.writeback_every > 1:
            lines.append(f"  streamed blocks written back every {self.writeback_every} steps (and at every sync "
                         "point); an upload replays the updates its host copy lacks")
        if self.nvme:
            lines += self._describe_tiers()
        return "\n".join(lines)

    def _describe_tiers(self) -> list[str]:
        host = sum(self.block_bytes[i] for i in self.host)
        budget = f" of a {_gb(self.host_budget)} host budget" if self.host_budget is not None else ""
        return [
            f"  tiers: {len(self.resident)} blocks on the device, {len(self.host)} in pinned host memory "
            f"({_gb(host)} + NVMe staging {_gb(self.staging_bytes)}{budget}), {len(self.nvme)} on NVMe in "
            f"{self.nvme_path} ({_gb(self.bytes_per_step_disk_read)})",
            f"  per step: {_gb(self.bytes_per_step_disk_read)} NVMe→host, up to "
            f"{_gb(self.bytes_per_step_disk_written)} host→NVMe (written back every {self.writeback_every} steps "
            "and at every sync point)",
        ]

    def to_dict(self) -> dict:
        """The plan as JSON-ready values, with the tiers and the bytes each moves per step."""
        out = asdict(self)
        out.update(host=self.host, bytes_per_step_h2d=self.bytes_per_step_h2d,
                   bytes_per_step_d2h=self.bytes_per_step_d2h, expected_peak=self.expected_peak,
                   bytes_per_step_disk_read=self.bytes_per_step_disk_read,
                   bytes_per_step_disk_written=self.bytes_per_step_disk_written)
        return out


def make_plan(offload: bool | str, block_bytes: list[int], fixed_bytes: int, reserve_bytes: int,
              budget: int | None, prefetch: int, piece_bytes: int | None = None) -> Plan:
    """Choose the resident blocks. ``offload``: False (all resident), True (all streamed) or 'auto';
    ``piece_bytes``: streaming one matrix at a time, what one slot of the rings holds (the largest trainable module
    with its optimizer state plus the largest frozen one; default: block streaming, the largest block)."""
    n = len(block_bytes)
    slot = stream_slots(prefetch) * (max(block_bytes, default=0) if piece_bytes is None else piece_bytes)
    if offload is False or (offload == "auto" and (budget is None or fixed_bytes + sum(block_bytes) + reserve_bytes <= budget)):
        return Plan(list(range(n)), [], block_bytes, fixed_bytes, 0, reserve_bytes, budget, prefetch)
    if offload is True:
        return Plan([], list(range(n)), block_bytes, fixed_bytes, slot, reserve_bytes, budget, prefetch,
                    granularity="block" if piece_bytes is None else "matrix")
    room = budget - fixed_bytes - slot - reserve_bytes
    if room < 0:
        raise ResourceError(
            f"The model does not fit the device budget even fully streamed: embedding+head {_gb(fixed_bytes)} + "
            f"{stream_slots(prefetch)} stream buffers {_gb(slot)} + working reserve {_gb(reserve_bytes)} > budget "
            f"{_gb(budget)}. Lower optim.prefetch, raise optim.gpu_memory_budget, or use a smaller storage dtype."
        )
    resident: list[int] = []
    for i, b in enumerate(block_bytes):
        if b > room:
            break
        room -= b
        resident.append(i)
    streamed = [i for i in range(n) if i not in resident]
    if not streamed:
        slot = 0
    return Plan(resident, streamed, block_bytes, fixed_bytes, slot, reserve_bytes, budget, prefetch,
                granularity="block" if piece_bytes is None or not streamed else "matrix")


WRITEBACK_LIMIT = 16
"""The most steps ``optim.writeback_every = 'auto'`` lets a host copy lag."""


def auto_writeback(kernel_rate: float, link_rate: float, limit: int = WRITEBACK_LIMIT) -> int:
    """K for ``optim.writeback_every = 'auto'`` from the rate of one update pass over a block on the device and the
    host link's rate (both bytes/s).

    With home copies written back every K steps, an upload finds home 0..K-1 updates behind, (K-1)/2 on average,
    each replayed as one update pass; the write-backs move bytes/K per step instead of bytes. Per block and step
    the cost is bytes × ((K-1) / (2 kernel_rate) + 1 / (K link_rate)), smallest at K = √(2 kernel_rate /
    link_rate): about 11 for an H100's fused update (~3.5 TB/s) over PCIe 5 (~55 GB/s), 1 on a CPU, where
    regenerating z costs more than copying the block."""
    if kernel_rate <= 0 or link_rate <= 0:
        return 1
    return max(1, min(limit, round(math.sqrt(2 * kernel_rate / link_rate))))


class WritebackProbe:
    """``optim.writeback_every = 'auto'`` on a GPU: the first steps run with K = 1 while the compute stream's
    waits for uploads are measured; where the forwards outlast the transfers (the step waited less than
    ``WAIT_SHARE`` of its time), writing back every step costs nothing and replays would only add compute, so K
    stays 1; otherwise the link is the bottleneck and K becomes ``chosen`` (:func:`auto_writeback`). K changes
    only when home copies are written, never a step's values."""

    SKIP = 1
    """Steps not measured (the first one compiles kernels and fills the pipeline)."""
    STEPS = 3
    """Steps measured before deciding."""
    WAIT_SHARE = 0.05
    """The share of a step spent waiting for uploads above which the step is transfer-bound."""

    def __init__(self, chosen: int):
        self.chosen = chosen
        self.seen = 0
        self.step_s = 0.0
        self.wait_ms = 0.0

    def observe(self, step_s: float, wait_ms: float) -> int | None:
        """Record one step (its wall time and the ms its compute stream waited for uploads); K once decided."""
        self.seen += 1
        if self.seen <= self.SKIP:
            return None
        self.step_s += step_s
        self.wait_ms += wait_ms
        if self.seen < self.SKIP + self.STEPS:
            return None
        return self.chosen if self.share >= self.WAIT_SHARE else 1

    @property
    def share(self) -> float:
        return self.wait_ms / 1e3 / self.step_s if self.step_s > 0 else 0.0
