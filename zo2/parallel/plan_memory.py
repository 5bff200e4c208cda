"""The memory side of the cost model (:mod:`zo2.parallel.plan`): which blocks stay resident on a GPU, the peak GPU
memory that implies (the residency planner's accounting, zo2/offload/planner.py, plus activations), and the pinned
host store of a node."""

from __future__ import annotations

from dataclasses import dataclass

from zo2.parallel.plan_inputs import DTYPE_BYTES, GB, Layout, ModelShape, Rates, Workload


@dataclass
class Residency:
    """The planner's choice for one rank: blocks resident and streamed, peak GPU bytes, whether it fits the budget."""

    mode: str
    resident: int
    streamed: int
    peak: float
    fits: bool
    note: str = ""


def residency(shape: ModelShape, work: Workload, layout: Layout, rates: Rates) -> Residency:
    """The planner's choice of resident blocks, and the peak GPU memory it implies.

    The rank's points run as one batch (zo2.points): a block's activations hold ``copies`` × the rank's tokens
    (its hidden states in and out, and a feed-forward intermediate with its per-point parts joined); one module's
    parameters at a point are formed at a time."""
    s, c = DTYPE_BYTES[work.dtype], DTYPE_BYTES[work.compute_dtype]
    block, fixed = shape.block_params * s, shape.fixed_params * s
    copies = 2 // layout.pp
    rank_tokens = work.tokens // layout.dp
    act_block = copies * rank_tokens * (2 * shape.hidden + 2 * shape.ffn) * c
    act_head = rank_tokens * shape.vocab * (copies * c + 8)
    budget = rates.gpu_mem_gb * GB - max(rates.margin_fraction * rates.gpu_mem_gb * GB, rates.margin_min_gb * GB)
    reserve = shape.largest_weight * c  # the Triton kernels form it without holding z

    def peak(resident: int, slots: float) -> float:
        return fixed + resident * block + slots + max(reserve + act_block, act_head)

    everything = peak(shape.layers, 0)
    if work.offload == "resident" or (work.offload == "auto" and everything <= budget):
        fits = everything <= budget
        note = "" if fits else "all-resident does not fit the GPU budget"
        return Residency("resident", shape.layers, 0, everything, fits, note)
    slots = (work.prefetch + 2) * (block if work.granularity == "block" else shape.largest_weight * s)
    room = budget - peak(0, slots)
    if room >= 0:
        resident = 0 if work.offload == "stream" else min(shape.layers - 1, int(room // block))
        return Residency("streamed", resident, shape.layers - resident, peak(resident, slots), True)
    return Residency("streamed", 0, shape.layers, peak(0, slots), False,
                     "does not fit the GPU budget even fully streamed")


def host_store_bytes(shape: ModelShape, work: Workload, layout: Layout, streamed: int) -> int:
    """Pinned host bytes per node holding the ``streamed`` blocks: one store per rank, or one per node sliced."""
    store = streamed * shape.block_params * DTYPE_BYTES[work.dtype]
    return store * (1 if layout.sliced else layout.gpus_per_node)
