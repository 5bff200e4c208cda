"""The time side of the cost model (:mod:`zo2.parallel.plan`): the busy time of compute, PCIe, NVLink, host DRAM and
network for one streamed block, the head and the loss all-reduce, and from them the predicted step of one layout."""

from __future__ import annotations

import math

from zo2.errors import ConfigError
from zo2.parallel.plan_inputs import DTYPE_BYTES, GB, Layout, ModelShape, Rates, Workload
from zo2.parallel.plan_memory import Tiers, place_tiers, residency
from zo2.parallel.plan_results import Breakdown, Prediction


def block_flops(shape: ModelShape, tokens: int, seq: int) -> float:
    """FLOPs of one block forward over ``tokens`` tokens in sequences of ``seq`` (causal attention)."""
    return tokens * (2.0 * shape.block_params + 2.0 * seq * shape.attn_width)


def forward_s(flops: float, rates: Rates) -> float:
    """Time of a forward of ``flops``: roofline at the fitted efficiency, never below the fitted floor."""
    return max(flops / (rates.matmul_tflops * rates.matmul_efficiency * 1e12), rates.fwd_floor_ms / 1e3)


def _fractions(rates: Rates, direction: str) -> tuple[float, float, float]:
    """(update_and_perturb, perturb_pair, update) fractions of copy bandwidth for ``direction``."""
    if direction == "rademacher":
        return rates.rad_update_perturb, rates.rad_pair, rates.rad_update
    return rates.gauss_update_perturb, rates.gauss_pair, rates.gauss_update


def _kernel_s(nbytes: float, fraction: float, rates: Rates) -> float:
    return nbytes / (rates.copy_tbs * 1e12 * fraction)


def _collective_s(layout: Layout, rates: Rates) -> float:
    """One all-reduce of 2 floats over every rank (or the exchange of 2 scalars of PertP)."""
    if layout.world == 1:
        return 0.0
    t = rates.collective_latency_us * 1e-6
    if layout.nodes > 1:
        hops = 2 * math.ceil(math.log2(layout.nodes))
        t += hops * (rates.network_latency_us * 1e-6 + 8 / (rates.network_gbps * 1e9 / 8))
    return t



def _block_resources(shape: ModelShape, work: Workload, layout: Layout, rates: Rates
                     ) -> tuple[float, dict[str, float], float, float]:
    """(compute time of a resident block, busy time of each resource for one streamed block, time to bring one
    block in when nothing overlaps it: its upload, plus the all-gather when sliced; the NVMe drive's busy time
    for one NVMe-homed block). A stateful optimizer's state (``work.state_bytes`` per element) is read and
    written by every update and moves with its block both ways every step."""
    s, c = DTYPE_BYTES[work.dtype], DTYPE_BYTES[work.compute_dtype]
    block_s = shape.block_params * s
    state_s = shape.block_params * work.state_bytes
    copies = 2 // layout.pp
    n = layout.gpus_per_node if layout.sliced else 1
    k = work.writeback_every
    _, _, upd_frac = _fractions(rates, work.direction)
    fwd = copies * forward_s(block_flops(shape, work.tokens // layout.dp, work.seq), rates)
    # the update (read and write θ, this rank's slice when sliced), then each point's parameters formed module by
    # module (zo2.points: read θ, write the point) with the update's kernel
    points = _kernel_s(copies * (block_s + shape.block_params * c), upd_frac, rates)
    points += copies * rates.point_overhead_ms / 1e3
    resident = fwd + _kernel_s(2 * (block_s + state_s), upd_frac, rates) + points
    # a lagging home (written back every K steps) is (K-1)/2 updates behind on average, each replayed on upload
    replays = (k - 1) / 2 * _kernel_s(2 * block_s / n, upd_frac, rates)
    if n == 1:
        streamed_compute = resident + replays
        nvlink = 0.0
    else:
        streamed_compute = fwd + _kernel_s(2 * (block_s + state_s) / n, upd_frac, rates) + points + replays
        nvlink = block_s * (n - 1) / n / (rates.nvlink_gbs * GB) + rates.collective_latency_us * 1e-6
    up, down = (block_s + state_s) / n, (block_s / k + state_s) / n  # the state goes back every step
    pcie = max(up / (rates.h2d_gbs * GB), down / (rates.d2h_gbs * GB), (up + down) / (rates.bidir_gbs * GB))
    per_node = 1 if layout.sliced else layout.gpus_per_node
    host = (up + down) * n * per_node / (rates.host_mem_gbs * GB)
    # one drive per node: every rank's store reads the block and writes it back every K steps
    nvme = per_node * ((block_s + state_s) / (rates.nvme_read_gbs * GB)
                       + (block_s / k + state_s) / (rates.nvme_write_gbs * GB))
    return (resident, {"compute": streamed_compute, "pcie": pcie, "nvlink": nvlink, "host-dram": host},
            up / (rates.h2d_gbs * GB) + nvlink, nvme)


def _head_s(shape: ModelShape, work: Workload, layout: Layout, rates: Rates) -> float:
    """The head (2/pp forwards + loss) and the update and points of embed/head, per step."""
    s, c = DTYPE_BYTES[work.dtype], DTYPE_BYTES[work.compute_dtype]
    tokens = work.tokens // layout.dp
    copies = 2 // layout.pp
    flops = 2.0 * tokens * shape.vocab * shape.embed_width
    loss = tokens * shape.vocab * 4 * rates.loss_passes / (rates.copy_tbs * 1e12)
    fwd = copies * max(flops / (rates.matmul_tflops * rates.matmul_efficiency * 1e12) + loss, rates.fwd_floor_ms / 1e3)
    kernel = _kernel_s(2 * shape.fixed_params * s + copies * shape.fixed_params * (s + c),
                       _fractions(rates, work.direction)[2], rates)
    return fwd + kernel


def predict_layout(shape: ModelShape, layout: Layout, work: Workload | None = None, rates: Rates | None = None,
                   baseline_step_s: float | None = None) -> Prediction:
    """The predicted step of ``shape`` on ``layout``. ConfigError when the layout cannot run the batch."""
    work = work or Workload()
    rates = rates or Rates()
    if work.batch % layout.dp:
        raise ConfigError(f"{layout.name} on {layout.world} GPUs has dp = {layout.dp}, which does not divide the "
                          f"global batch of {work.batch} sequences ({work.tokens} tokens / seq {work.seq}): "
                          f"raise --tokens or lower --seq.")
    mem = residency(shape, work, layout, rates)
    tiers = place_tiers(shape, work, layout, rates, mem.streamed)
    if work.granularity == "block" and tiers.host and tiers.nvme:  # two sets of block slots: fewer resident
        mem = residency(shape, work, layout, rates, tier_slots=True)
        tiers = place_tiers(shape, work, layout, rates, mem.streamed)
    res_compute, per_block, bring_in, nvme = _block_resources(shape, work, layout, rates)
    # an NVMe-homed block also waits for its read (and its share of the write-backs) on the node's drive
    on_nvme = {**per_block, "nvme": nvme}
    head = _head_s(shape, work, layout, rates)
    fill = rates.exposed_uploads * bring_in if mem.streamed else 0.0
    comm = _collective_s(layout, rates)
    step = (mem.resident * res_compute + tiers.host * max(per_block.values()) + tiers.nvme * max(on_nvme.values())
            + head + fill + comm)
    busy = Breakdown(compute_s=mem.resident * res_compute + mem.streamed * per_block["compute"] + head,
                     pcie_s=mem.streamed * per_block["pcie"] + fill, nvlink_s=mem.streamed * per_block["nvlink"],
                     host_mem_s=mem.streamed * per_block["host-dram"], network_s=comm, nvme_s=tiers.nvme * nvme)
    bound = _bound(per_block, tiers, nvme, mem.resident * res_compute + head, fill, comm)
    notes = [n for n in (mem.note, tiers.note) if n]
    per_node = 1 if layout.sliced else layout.gpus_per_node
    weights = shape.block_params * DTYPE_BYTES[work.dtype] * per_node
    state = shape.block_params * work.state_bytes * per_node
    speedup = (baseline_step_s / step) if baseline_step_s else 1.0
    return Prediction(name=layout.name, strategy=layout.strategy, gpus_per_node=layout.gpus_per_node,
                      nodes=layout.nodes, dp=layout.dp, pp=layout.pp, sliced=layout.sliced, mode=mem.mode,
                      resident_blocks=mem.resident, streamed_blocks=mem.streamed, step_s=step,
                      tokens_per_s=work.tokens / step, speedup=speedup, bound=bound, gpu_mem_gb=mem.peak / GB,
                      host_mem_gb=tiers.host_bytes / GB, breakdown=busy,
                      fits=mem.fits and not tiers.note, notes=notes, nvme_blocks=tiers.nvme,
                      nvme_read_gb=tiers.nvme * (weights + state) / GB,
                      nvme_written_gb=tiers.nvme * (weights / work.writeback_every + state) / GB)



def _bound(per_block: dict[str, float], tiers: Tiers, nvme: float, compute_only: float, fill: float,
           comm: float) -> str:
    """The resource on the longest share of the critical path: each streamed block's slowest resource (the NVMe
    drive among them for an NVMe-homed block), against the resident blocks and head (compute), the pipeline fill
    (pcie) and the all-reduce (network)."""
    path = {"compute": compute_only, "pcie": fill, "nvlink": 0.0, "host-dram": 0.0, "network": comm, "nvme": 0.0}
    for count, resources in ((tiers.host, per_block), (tiers.nvme, {**per_block, "nvme": nvme})):
        if count:
            slowest = max(resources, key=lambda k: resources[k])
            path[slowest] += count * resources[slowest]
    return max(path, key=lambda k: path[k])


def layouts(gpus_per_node: int, nodes: int) -> list[Layout]:
    """Every layout of N·M GPUs: ZO-DDP (pp 1), PertP or 2D (pp 2), each unsliced and (N > 1) sliced."""
    out = []
    world = gpus_per_node * nodes
    for pp in (1, 2):
        if world % pp or world == 1:
            continue
        for sliced in ((False, True) if gpus_per_node > 1 else (False,)):
            out.append(Layout(gpus_per_node, nodes, pp, sliced))
    return out or [Layout(1, 1)]
