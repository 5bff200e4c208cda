"""The memory side of the cost model (:mod:`zo2.parallel.plan`): which blocks stay resident on a GPU, the peak GPU
memory that implies (the residency planner's accounting, zo2/offload/planner.py, plus activations), and the pinned
host store of a node."""

from __future__ import annotations

from dataclasses import dataclass

from zo2.models.base import LOSS_CHUNK_BYTES
from zo2.offload.arith import point_bytes
from zo2.offload.nvme import round_up
from zo2.offload.planner import stream_slots
from zo2.offload.tiers import staging_buffers
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


def activation_bytes(hidden: int, ffn: int, vocab: int, tokens: int, copies: int, compute_bytes: int,
                     loss_chunk_bytes: float = LOSS_CHUNK_BYTES, head_points: int = 1
                     ) -> tuple[float, float, float]:
    """(a block's activations, the head's logits, the loss's temporaries) for ``copies`` points of ``tokens``
    tokens run as one batch: a block
    holds its hidden states in and out and a feed-forward intermediate with its per-point parts joined; the head
    runs one point at a time (``head_points``: how many points' logits exist at once, 1 since the head went point
    by point) and holds the loss's float32 chunk (zo2.models.base.LOSS_CHUNK_BYTES). The start-of-run plan
    (zo2.engine) and ``zo2 plan`` both use it."""
    act_block = copies * tokens * (2 * hidden + 2 * ffn) * compute_bytes
    logits = tokens * vocab * head_points * compute_bytes
    return act_block, logits, min(tokens * vocab * 8, loss_chunk_bytes)


def working_bytes(block_reserve: float, reserve: float, act_block: float, logits: float, loss: float) -> float:
    """The working memory on top of the weights and stream slots: while a block runs, its largest module at a
    point and its activations; while the head runs, its weight at a point and the logits it writes, then the
    logits and the loss's temporaries (the weight is dropped after its call) — whichever is largest."""
    return max(block_reserve + act_block, reserve + logits, logits + loss)


def residency(shape: ModelShape, work: Workload, layout: Layout, rates: Rates, tier_slots: bool = False
              ) -> Residency:
    """The planner's choice of resident blocks, and the peak GPU memory it implies. ``tier_slots``: block
    streaming from both the host and the NVMe tier, whose streamers have a set of slots each (the engine's
    zo2.offload.tiers.count_tier_slots).

    The rank's points run as one batch (zo2.points): a block's activations hold ``copies`` × the rank's tokens
    (its hidden states in and out, and a feed-forward intermediate with its per-point parts joined); one module's
    parameters at a point are formed at a time. A stateful optimizer's state (``work.state_bytes`` per element)
    sits with each resident unit's weights and streams with each streamed one's (one matrix at a time, the state
    of the largest weight beside it in rings of its own)."""
    s, c = DTYPE_BYTES[work.dtype] + work.state_bytes, DTYPE_BYTES[work.compute_dtype]
    block, fixed = shape.block_params * s, shape.fixed_params * s
    copies = 2 // layout.pp
    rank_tokens = work.tokens // layout.dp
    act_block, logits, loss = activation_bytes(shape.hidden, shape.ffn, shape.vocab, rank_tokens, copies, c,
                                           rates.loss_chunk_mb * 2**20,
                                           copies if rates.head_points_at_once > 1 else 1)
    budget = rates.gpu_mem_gb * GB - max(rates.margin_fraction * rates.gpu_mem_gb * GB, rates.margin_min_gb * GB)
    # one module's parameters at a point (the Triton kernels form it without holding z): a block's largest matrix
    # while the blocks run; the embedding-sized head weight (or a larger block matrix) while the head runs; a chunk
    # of rows of either with its output columns where it is larger than that (zo2.offload.arith.chunk_rows)
    chunk = rates.form_chunk_mb * 2**20
    block_reserve = point_bytes(min(shape.largest_weight * c, chunk))
    reserve = point_bytes(min(max(shape.largest_weight, shape.vocab * shape.embed_width) * c, chunk))

    def peak(resident: int, slots: float) -> float:
        return fixed + resident * block + slots + working_bytes(block_reserve, reserve, act_block, logits, loss)

    everything = peak(shape.layers, 0)
    if work.offload == "resident" or (work.offload == "auto" and everything <= budget):
        fits = everything <= budget
        note = "" if fits else "all-resident does not fit the GPU budget"
        return Residency("resident", shape.layers, 0, everything, fits, note)
    slots = stream_slots(work.prefetch) * (block if work.granularity == "block" else shape.largest_weight * s)
    slots *= 2 if tier_slots and work.granularity == "block" else 1
    room = budget - peak(0, slots)
    if room >= 0:
        resident = 0 if work.offload == "stream" else min(shape.layers - 1, int(room // block))
        return Residency("streamed", resident, shape.layers - resident, peak(resident, slots), True)
    return Residency("streamed", 0, shape.layers, peak(0, slots), False,
                     "does not fit the GPU budget even fully streamed")


def host_store_bytes(shape: ModelShape, work: Workload, layout: Layout, streamed: int) -> int:
    """Pinned host bytes per node holding the ``streamed`` blocks (with their optimizer state): one store per rank,
    or one per node sliced."""
    store = streamed * shape.block_params * (DTYPE_BYTES[work.dtype] + work.state_bytes)
    return store * (1 if layout.sliced else layout.gpus_per_node)


@dataclass
class Tiers:
    """Where a rank's streamed blocks keep their home (zo2.offload.tiers.place_tiers): pinned host memory while
    the node's host budget holds them, the rest on the node's NVMe drive (with ``--nvme``)."""

    host: int
    """Streamed blocks homed in pinned host memory."""
    nvme: int
    """Streamed blocks homed on NVMe."""
    host_bytes: float
    """Pinned host bytes per node: the host-homed blocks and, with NVMe blocks, the staging buffers."""
    budget: float
    """The node's host budget in bytes (``--host-budget``, or ``rate.host_capacity_gb``)."""
    note: str = ""
    """Why the placement does not fit (empty when it does)."""


def place_tiers(shape: ModelShape, work: Workload, layout: Layout, rates: Rates, streamed: int) -> Tiers:
    """Home ``streamed`` blocks in host memory while they fit the budget, the rest on NVMe: the order and the
    staging buffers (``prefetch`` + 2 of a block, per store) of the engine's placement. A node keeps one store per
    rank, or one per node with sliced transfers."""
    copies = 1 if layout.sliced else layout.gpus_per_node
    block = shape.block_params * (DTYPE_BYTES[work.dtype] + work.state_bytes)
    budget = (work.host_budget_gb if work.host_budget_gb is not None else rates.host_capacity_gb) * GB
    everything = host_store_bytes(shape, work, layout, streamed)
    if everything <= budget:
        return Tiers(streamed, 0, everything, budget)
    if not work.nvme:
        return Tiers(streamed, 0, everything, budget,
                     f"host store {everything / GB:.0f} GB > {budget / GB:.0f} GB (--nvme homes the rest on NVMe)")
    staging = staging_buffers(work.prefetch) * round_up(block) * copies  # page-aligned for O_DIRECT
    if staging > budget:
        return Tiers(0, streamed, staging, budget, f"NVMe staging {staging / GB:.1f} GB > host budget "
                                                   f"{budget / GB:.1f} GB")
    host = min(streamed, int((budget - staging) // (block * copies)))
    return Tiers(host, streamed - host, staging + host * block * copies, budget)
