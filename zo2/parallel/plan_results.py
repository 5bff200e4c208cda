"""What the cost model (:mod:`zo2.parallel.plan`) answers: the busy time of each resource, the prediction for one
layout, the report over every layout, and the statement of what the predictions assume."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from zo2.parallel.plan_inputs import ModelShape, Rates, Workload

FOOTER = (
    "Model: per streamed block, max(compute = (2/pp)·forward + perturbation kernels (+ (K-1)/2 replayed updates "
    "when written back every K steps), PCIe = max(up/H2D, down/D2H, (up+down)/both) with down = up/K, NVLink "
    "all-gather (sliced), host DRAM of the node, and for an NVMe-homed block the node's drive: read + write/K); "
    "plus resident blocks, head and loss, "
    "pipeline fill (rate.exposed_uploads) and the 2-float all-reduce. Forward = max(flops/(TFLOP/s·efficiency), "
    "floor), fitted to measured forward times. Memory: the residency planner's accounting (zo2/offload/planner.py) "
    "plus activations; host = pinned store per node (and NVMe staging). Not modelled: kernel launch and Python "
    "overhead beyond the fitted floor, stragglers and jitter, NCCL/compute SM contention, shared PCIe switches, "
    "NUMA, checksum all-reduces, data loading, eval and checkpoints. Predictions, not measurements."
)
"""What the predictions model and what they leave out (printed under every table, stored in every JSON)."""


@dataclass
class Breakdown:
    """Busy time of each resource in one step, seconds (they overlap; the step is not their sum)."""

    compute_s: float
    """Forwards, perturbation kernels and the head."""
    pcie_s: float
    """Host↔device transfers of one GPU (incl. exposed pipeline fill)."""
    nvlink_s: float
    """All-gathers of sliced blocks."""
    host_mem_s: float
    """Host DRAM traffic of the node."""
    network_s: float
    """The loss all-reduce / scalar exchange."""
    nvme_s: float = 0.0
    """Reads and write-backs of the NVMe-homed blocks on the node's drive."""


@dataclass
class Prediction:
    """The predicted cost of one layout."""

    name: str
    strategy: str
    gpus_per_node: int
    nodes: int
    dp: int
    pp: int
    sliced: bool
    mode: str
    """'resident' (no streaming) or 'streamed' (some or all blocks stream)."""
    resident_blocks: int
    streamed_blocks: int
    step_s: float
    tokens_per_s: float
    speedup: float
    """Over single-GPU ZO2 with the same global batch and rates."""
    bound: str
    """The resource on the longest share of the critical path: compute, pcie, nvlink, host-dram, network or
    nvme."""
    gpu_mem_gb: float
    """Predicted peak memory per GPU."""
    host_mem_gb: float
    """Pinned host memory per node: the host-homed blocks' store (and the NVMe tier's staging buffers)."""
    breakdown: Breakdown
    fits: bool = True
    notes: list[str] = field(default_factory=list)
    nvme_blocks: int = 0
    """Streamed blocks homed on the NVMe drive (the rest of ``streamed_blocks`` in pinned host memory)."""
    nvme_read_gb: float = 0.0
    """GB read from the node's NVMe drive per step."""
    nvme_written_gb: float = 0.0
    """GB written to it per step, on average over the write-back period."""


@dataclass
class PlanReport:
    """Everything ``predict`` computed, printable with :func:`zo2.parallel.plan_format.format_report`."""

    model: ModelShape
    workload: Workload
    rates: Rates
    gpus_per_node: int
    nodes: int
    baseline: Prediction
    rows: list[Prediction]
    skipped: list[tuple[str, str]]
    """(layout name, reason) of layouts that do not apply (e.g. dp does not divide the batch)."""

    def to_dict(self) -> dict:
        return {"model": asdict(self.model), "workload": asdict(self.workload), "rates": asdict(self.rates),
                "gpus_per_node": self.gpus_per_node, "nodes": self.nodes, "baseline": asdict(self.baseline),
                "rows": [asdict(r) for r in self.rows], "skipped": [list(s) for s in self.skipped],
                "assumptions": FOOTER}
