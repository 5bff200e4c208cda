"""The cost model of zo2's layouts: predicted step time, its breakdown and memory, before buying GPU hours.

``predict(...)`` and ``zo2 plan`` estimate, for a model shape, a global batch (tokens per step), N GPUs per node
and M nodes, the step time of

- **zo2**: one GPU, the offload engine of DESIGN.md §2 (or all-resident when the model fits);
- **pertp**: perturbation parallelism, pp = 2 (each rank runs one of the two forwards; 2 scalars exchanged);
- **zo-ddp**: ZO data parallelism, dp = N·M (each rank a batch shard; all-reduce of 2 floats);
- **2d**: dp × pp = N·M with pp = 2;

each with and without **sliced transfers** (DESIGN.md §3: one shared host store per node, local rank r uploads and
writes back 1/N of each block over its own PCIe link, an NVLink all-gather assembles the block).

What is modelled
----------------
Per streamed block and rank, four resources work in parallel and the slowest one sets the pace (DESIGN.md §7's
floor, generalised)::

    block = max( compute = (2/pp)·fwd(tokens/dp) + perturbation kernels,
                 pcie    = max(up/H2D, down/D2H, (up+down)/both-directions),   up = down = block bytes (/N sliced)
                 nvlink  = block bytes·(N-1)/N / NVLink bus bandwidth + one collective latency   (sliced only)
                 host    = host bytes moved by the whole node / host DRAM bandwidth )

    step  = resident blocks · compute + streamed blocks · block + head (2/pp forwards, loss, its kernels)
            + exposed uploads (pipeline fill; 0 for the current engine) + all-reduce of the 2 losses

- Forward time of a block: ``max(flops / (matmul TFLOP/s · efficiency), floor)`` with
  flops = tokens · (2 · block parameters + 2 · seq · attention width) (causal attention); the efficiency and the
  floor (launch-bound small blocks) are fitted to measured forward times (DESIGN.md §7 for the H100 defaults, or
  a benchmark JSON with ``--calibrate``).
- Perturbation kernels: bytes moved / (device copy rate · the kernel's measured fraction of copy):
  unsliced ``update_and_perturb`` (read θ, write θ and the 2/pp perturbed copies); sliced: ``update`` of the own
  slice, then ``perturb_pair`` of the assembled block.
- The residency planner of DESIGN.md §2 (zo2/offload/planner.py): all resident when embed+head, every block,
  θ± of one block and the activations fit the GPU budget (GPU memory minus max(5%, 1 GiB)); otherwise as many
  blocks as fit stay resident and the rest stream through (prefetch + 2) block buffers.
- Peak GPU memory per GPU: embed+head + resident blocks + stream buffers + θ± of one block (one copy under pp = 2)
  + the float32 direction of the largest weight (as the planner reserves) + activations (hidden streams and FFN
  of one block, or bf16 + 2 float32 copies of the logits, whichever is larger).
- Host memory per node: the pinned parameter store (the streamed blocks), one per rank unsliced, one per node
  sliced.
- Host DRAM bandwidth per node (an assumption, default 480 GB/s ≈ 78% of two DDR5-4800 sockets): every byte
  uploaded or written back by any GPU of the node crosses it; unsliced N GPUs move N× the bytes of sliced ones.

What is not modelled
--------------------
Kernel launch and Python overheads beyond the fitted forward floor; stragglers and jitter between ranks; NCCL
kernels competing with the forwards for SMs; PCIe switches shared by two GPUs (set lower rates); NUMA placement;
the periodic checksum all-reduce; data loading and tokenisation; evaluation and checkpoint steps; q > 1
directions; sharding blocks across GPU memories (not a zo2 mode). ZO-DDP needs whole sequences per rank: a layout
whose dp does not divide the global batch (in sequences) is reported as not applicable.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from statistics import median
from typing import Iterable, Sequence

from zo2.config.base import did_you_mean
from zo2.errors import ConfigError

GB = 1e9
DTYPE_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}
COMPUTE_DTYPES = ("bf16", "fp16")
DIRECTIONS = ("gaussian", "rademacher")
OFFLOAD_MODES = ("auto", "stream", "resident")

PUBLISHED_DISTZO2 = ("DistZO2 (L. Wang, H. Xie, D. Wang, arXiv:2507.03211, 2025) reports a 3x speed-up over "
                     "single-GPU ZO2 on OPT-175B. That is the paper's published figure, cited here, not "
                     "measured in this repository; its hardware and batch are not the assumptions above.")

H100_FORWARD_MS = {
    # DESIGN.md §7: one OPT block forward on one H100 80GB SXM, bf16: (1x2048, 16x256) in milliseconds
    "opt-1.3b": (0.42, 0.72), "opt-6.7b": (1.24, 2.33), "opt-13b": (1.92, 3.53),
    "opt-30b": (3.53, 7.07), "opt-66b": (5.58, 11.3), "opt-175b": (10.4, 20.8),
}
"""Measured per-block forward times the default efficiency and floor are fitted to."""

GPU_MEMORY_GB = {"H200": 141.0, "H100": 80.0, "A100": 80.0}
"""Device memory by name, used when a calibration file names its GPU."""


# ----------------------------------------------------------------------------------------------------------
# Inputs
# ----------------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Rates:
    """Hardware rates. Defaults: one H100 80GB SXM (DESIGN.md §7) in an 8-GPU NVLink4 node; every one
    overridable (``--set rate.KEY=VALUE``) or calibrated from a benchmark JSON (:func:`calibrate`)."""

    h2d_gbs: float = 53.9
    """Pinned host→device GB/s of one GPU's PCIe link."""
    d2h_gbs: float = 55.1
    """Pinned device→host GB/s of one GPU's PCIe link."""
    bidir_gbs: float = 91.0
    """Total GB/s of one link with both directions busy."""
    matmul_tflops: float = 798.0
    """Measured bf16 matmul TFLOP/s."""
    matmul_efficiency: float = 0.887
    """Fraction of matmul_tflops a block forward reaches (fitted to DESIGN.md §7's forward times)."""
    fwd_floor_ms: float = 0.42
    """Shortest block forward (launch-bound small blocks; fitted with the efficiency)."""
    copy_tbs: float = 3.0
    """Device-to-device copy TB/s (bytes read + written)."""
    nvlink_gbs: float = 450.0
    """All-gather bus bandwidth per GPU in GB/s (H100 SXM NVLink4: 900 GB/s bidirectional, ~450 one way)."""
    network_gbps: float = 400.0
    """Inter-node network per node in Gb/s (bits)."""
    collective_latency_us: float = 20.0
    """Latency of one small collective among the GPUs of a node (each all-gather, the loss all-reduce)."""
    network_latency_us: float = 10.0
    """Latency of one inter-node hop; a small all-reduce over M nodes takes 2·ceil(log2 M) hops."""
    host_mem_gbs: float = 480.0
    """Host DRAM bandwidth per node usable by GPU DMA (assumption: ~78% of 2 × DDR5-4800 × 8 channels)."""
    gpu_mem_gb: float = 80.0
    """Device memory per GPU."""
    host_capacity_gb: float = 2048.0
    """Host memory per node (DGX H100: 2 TB)."""
    gauss_update_perturb: float = 0.32
    """Gaussian update_and_perturb, fraction of copy bandwidth (RESULTS.md)."""
    gauss_pair: float = 0.48
    """Gaussian perturb_pair, fraction of copy bandwidth."""
    gauss_update: float = 0.32
    """Gaussian update alone (assumed Philox-bound like update_and_perturb, on its 2 bytes per element)."""
    rad_update_perturb: float = 0.70
    """Rademacher update_and_perturb, fraction of copy bandwidth."""
    rad_pair: float = 0.75
    """Rademacher perturb_pair, fraction of copy bandwidth."""
    rad_update: float = 0.70
    """Rademacher update alone (assumed as update_and_perturb)."""
    loss_passes: float = 4.0
    """Passes over float32 logits per forward in the loss (upcast, softmax, gather)."""
    exposed_uploads: float = 0.0
    """Uploads per step not hidden behind compute (pipeline fill). 0: the engine prefetches across the step
    boundary; the 2026-11-26 H200 measurement predates that and had 1."""
    margin_fraction: float = 0.05
    """GPU memory kept free: max(margin_fraction · memory, margin_min_gb), as the planner does."""
    margin_min_gb: float = 1.073741824
    """Minimum free margin (1 GiB)."""
    source: str = "defaults: DESIGN.md §7 (one H100 80GB SXM) + stated assumptions"

    def updated(self, overrides: Iterable[str]) -> "Rates":
        """A copy with ``KEY=VALUE`` (or ``rate.KEY=VALUE``) overrides applied; ConfigError names a bad one."""
        rates = self
        for item in overrides:
            key, value = _parse_override(item)
            rates = replace(rates, **{key: value})
        rates.check()
        return rates

    def check(self) -> None:
        """ConfigError unless every rate is a positive number (fractions in (0, 1])."""
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name in ("source",):
                continue
            if f.name in ("exposed_uploads", "fwd_floor_ms", "loss_passes"):
                if not (isinstance(value, (int, float)) and 0 <= value < math.inf):
                    raise ConfigError(f"rate.{f.name} = {value}: it must be a number >= 0 (--set rate.{f.name}=...).")
                continue
            if not (isinstance(value, (int, float)) and value > 0 and not math.isnan(value)):
                raise ConfigError(f"rate.{f.name} = {value}: it must be a positive number (--set rate.{f.name}=...).")
            if f.name.startswith(("gauss_", "rad_")) or f.name in ("matmul_efficiency", "margin_fraction"):
                if value > 1:
                    raise ConfigError(f"rate.{f.name} = {value}: it is a fraction, in (0, 1] "
                                      f"(--set rate.{f.name}=...).")


def _parse_override(item: str) -> tuple[str, float]:
    names = [f.name for f in fields(Rates) if f.name != "source"]
    if "=" not in item:
        raise ConfigError(f"--set {item!r}: expected rate.KEY=VALUE, e.g. --set rate.nvlink_gbs=300.")
    key, text = (s.strip() for s in item.split("=", 1))
    key = key.removeprefix("rate.").removeprefix("rates.")
    if key not in names:
        raise ConfigError(f"--set {item!r}: unknown rate {key!r}.{did_you_mean(key, names)} "
                          f"Known rates: {', '.join(names)}.")
    try:
        return key, float(text)
    except ValueError:
        raise ConfigError(f"--set {item!r}: rate.{key} expects a number, got {text!r}.") from None


@dataclass(frozen=True)
class ModelShape:
    """What the cost model needs of a model: sizes, not weights."""

    name: str
    hidden: int
    ffn: int
    layers: int
    vocab: int
    attn_width: int
    """num_heads × head width (the width of Q)."""
    block_params: int
    """Parameters of one decoder block."""
    fixed_params: int
    """Embedding, positions, final norm and untied head: always resident."""
    embed_width: int
    largest_weight: int
    """Elements of the largest single weight of a block (the planner reserves its float32 direction)."""

    @property
    def params(self) -> int:
        return self.fixed_params + self.layers * self.block_params


def shape_from_config(m) -> ModelShape:
    """The :class:`ModelShape` of a :class:`~zo2.config.job.ModelConfig` (counts from ``parameter_count``)."""
    from zo2.config.presets import parameter_count

    fixed = parameter_count(replace(m, num_layers=1)) - _block_count(m)
    attn = m.num_heads * m.head_width
    return ModelShape(name=m.name, hidden=m.hidden_size, ffn=m.ffn_size, layers=m.num_layers, vocab=m.vocab_size,
                      attn_width=attn, block_params=_block_count(m), fixed_params=fixed,
                      embed_width=m.embed_dim or m.hidden_size,
                      largest_weight=max(m.hidden_size * m.ffn_size, m.hidden_size * attn))


def _block_count(m) -> int:
    from zo2.config.presets import parameter_count

    return parameter_count(replace(m, num_layers=2)) - parameter_count(replace(m, num_layers=1))


def shape_from_preset(name: str, layers: int | None = None) -> ModelShape:
    """The shape of preset ``name`` (e.g. 'opt-175b'), optionally with ``layers`` blocks instead."""
    from zo2.config.presets import get_preset, preset_names

    if name not in preset_names():
        raise ConfigError(f"--preset {name!r}: no such preset.{did_you_mean(name, preset_names())} "
                          "Run `zo2 train --list-presets`, or give --hidden/--ffn/--layers/--vocab.")
    m = get_preset(name).model
    if layers is not None:
        _require_int("--layers", layers, 1)
        m = replace(m, num_layers=layers)
    return shape_from_config(m)


def shape_from_dims(hidden: int, ffn: int, layers: int, vocab: int, heads: int | None = None,
                    family: str = "opt", name: str = "custom") -> ModelShape:
    """An explicit shape (``--hidden --ffn --layers --vocab [--heads --family]``)."""
    from zo2.config.job import ModelConfig

    for flag, value in (("--hidden", hidden), ("--ffn", ffn), ("--layers", layers), ("--vocab", vocab)):
        _require_int(flag, value, 1)
    heads = heads if heads is not None else max(1, hidden // 128)
    _require_int("--heads", heads, 1)
    if hidden % heads:
        raise ConfigError(f"--heads {heads}: it must divide --hidden {hidden}.")
    m = ModelConfig(name=name, family=family, hidden_size=hidden, ffn_size=ffn, num_layers=layers, vocab_size=vocab,
                    num_heads=heads, max_positions=2048, dtype="bf16")
    return shape_from_config(m)


@dataclass(frozen=True)
class Workload:
    """One step's work: the global batch and how the engine runs it."""

    tokens: int = 2048
    """Global tokens per step (batch × seq)."""
    seq: int = 2048
    """Sequence length (attention cost; data parallelism splits whole sequences)."""
    dtype: str = "bf16"
    """Storage dtype of the weights (what crosses PCIe)."""
    compute_dtype: str = "bf16"
    direction: str = "gaussian"
    prefetch: int = 1
    offload: str = "auto"
    """'auto' (the planner decides), 'stream' (every block streamed) or 'resident' (none streamed)."""

    def __post_init__(self) -> None:
        _require_int("--tokens", self.tokens, 1)
        _require_int("--seq", self.seq, 1)
        if self.tokens % self.seq:
            raise ConfigError(f"--tokens {self.tokens} is not a whole number of --seq {self.seq} sequences; "
                              f"give a multiple of {self.seq} (tokens = batch × seq).")
        _choice("--dtype", self.dtype, DTYPE_BYTES)
        _choice("--compute-dtype", self.compute_dtype, COMPUTE_DTYPES)
        _choice("--direction", self.direction, DIRECTIONS)
        _choice("--offload", self.offload, OFFLOAD_MODES)
        _require_int("--prefetch", self.prefetch, 0)

    @property
    def batch(self) -> int:
        return self.tokens // self.seq


@dataclass(frozen=True)
class Layout:
    """Where it runs: N GPUs per node, M nodes, pp ∈ {1, 2}, sliced transfers or not."""

    gpus_per_node: int = 1
    nodes: int = 1
    pp: int = 1
    sliced: bool = False

    def __post_init__(self) -> None:
        _require_int("--gpus-per-node", self.gpus_per_node, 1, 8)
        _require_int("--nodes", self.nodes, 1, 1024)
        if self.pp not in (1, 2):
            raise ConfigError(f"pp = {self.pp}: perturbation parallelism uses pp = 1 or 2.")
        if self.world % self.pp:
            raise ConfigError(f"pp = 2 needs an even number of GPUs; have {self.world}.")

    @property
    def world(self) -> int:
        return self.gpus_per_node * self.nodes

    @property
    def dp(self) -> int:
        return self.world // self.pp

    @property
    def strategy(self) -> str:
        if self.world == 1:
            return "zo2"
        if self.pp == 1:
            return "zo-ddp"
        return "pertp" if self.dp == 1 else "2d"

    @property
    def name(self) -> str:
        return self.strategy + ("+sliced" if self.sliced else "")


# ----------------------------------------------------------------------------------------------------------
# Outputs
# ----------------------------------------------------------------------------------------------------------

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
    """The resource on the longest share of the critical path: compute, pcie, nvlink, host-dram or network."""
    gpu_mem_gb: float
    """Predicted peak memory per GPU."""
    host_mem_gb: float
    """Pinned parameter store per node."""
    breakdown: Breakdown
    fits: bool = True
    notes: list[str] = field(default_factory=list)


@dataclass
class PlanReport:
    """Everything ``predict`` computed, printable with :func:`format_report`."""

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


# ----------------------------------------------------------------------------------------------------------
# The model
# ----------------------------------------------------------------------------------------------------------

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


@dataclass
class _Memory:
    mode: str
    resident: int
    streamed: int
    peak: float
    fits: bool
    one_copy: bool
    note: str = ""


def _residency(shape: ModelShape, work: Workload, layout: Layout, rates: Rates) -> _Memory:
    """The planner's choice of resident blocks, and the peak GPU memory it implies."""
    s, c = DTYPE_BYTES[work.dtype], DTYPE_BYTES[work.compute_dtype]
    block, fixed = shape.block_params * s, shape.fixed_params * s
    copies = 2 // layout.pp
    rank_tokens = work.tokens // layout.dp
    act_block = rank_tokens * (copies * 2 * shape.hidden + shape.ffn) * c
    act_head = rank_tokens * shape.vocab * (c + 8)
    budget = rates.gpu_mem_gb * GB - max(rates.margin_fraction * rates.gpu_mem_gb * GB, rates.margin_min_gb * GB)

    def peak(resident: int, slots: float, n_copies: int) -> float:
        reserve = n_copies * shape.block_params * c + 4 * shape.largest_weight
        return fixed + resident * block + slots + max(reserve + act_block, act_head)

    everything = peak(shape.layers, 0, copies)
    if work.offload == "resident" or (work.offload == "auto" and everything <= budget):
        fits = everything <= budget
        note = "" if fits else "all-resident does not fit the GPU budget"
        return _Memory("resident", shape.layers, 0, everything, fits, False, note)
    slots = (work.prefetch + 2) * block
    for n_copies in sorted({copies, 1}, reverse=True):
        room = budget - peak(0, slots, n_copies)
        if room >= 0:
            resident = 0 if work.offload == "stream" else min(shape.layers - 1, int(room // block))
            return _Memory("streamed", resident, shape.layers - resident, peak(resident, slots, n_copies), True,
                           n_copies < copies)
    return _Memory("streamed", 0, shape.layers, peak(0, slots, 1), False, True,
                   "does not fit the GPU budget even fully streamed with one perturbed copy at a time")


def _block_resources(shape: ModelShape, work: Workload, layout: Layout, rates: Rates, one_copy: bool
                     ) -> tuple[float, dict[str, float], float]:
    """(compute time of a resident block, busy time of each resource for one streamed block, time to bring one
    block in when nothing overlaps it: its upload, plus the all-gather when sliced)."""
    s, c = DTYPE_BYTES[work.dtype], DTYPE_BYTES[work.compute_dtype]
    block_s, block_c = shape.block_params * s, shape.block_params * c
    copies = 2 // layout.pp
    n = layout.gpus_per_node if layout.sliced else 1
    up_frac, pair_frac, upd_frac = _fractions(rates, work.direction)
    fwd = copies * forward_s(block_flops(shape, work.tokens // layout.dp, work.seq), rates)
    extra_pass = _kernel_s(block_s, pair_frac, rates) if one_copy else 0.0
    resident = fwd + _kernel_s(2 * block_s + copies * block_c, up_frac, rates) + extra_pass
    if n == 1:
        streamed_compute = resident
        nvlink = 0.0
    else:
        streamed_compute = (fwd + _kernel_s(2 * block_s / n, upd_frac, rates)
                            + _kernel_s(block_s + copies * block_c, pair_frac, rates) + extra_pass)
        nvlink = block_s * (n - 1) / n / (rates.nvlink_gbs * GB) + rates.collective_latency_us * 1e-6
    moved = block_s / n
    pcie = max(moved / (rates.h2d_gbs * GB), moved / (rates.d2h_gbs * GB), 2 * moved / (rates.bidir_gbs * GB))
    node_bytes = 2 * block_s * (1 if layout.sliced else layout.gpus_per_node)
    host = node_bytes / (rates.host_mem_gbs * GB)
    return (resident, {"compute": streamed_compute, "pcie": pcie, "nvlink": nvlink, "host-dram": host},
            moved / (rates.h2d_gbs * GB) + nvlink)


def _head_s(shape: ModelShape, work: Workload, layout: Layout, rates: Rates) -> float:
    """The head (2/pp forwards + loss) and the update+perturbation of embed/head, per step."""
    s, c = DTYPE_BYTES[work.dtype], DTYPE_BYTES[work.compute_dtype]
    tokens = work.tokens // layout.dp
    copies = 2 // layout.pp
    flops = 2.0 * tokens * shape.vocab * shape.embed_width
    loss = tokens * shape.vocab * 4 * rates.loss_passes / (rates.copy_tbs * 1e12)
    fwd = copies * max(flops / (rates.matmul_tflops * rates.matmul_efficiency * 1e12) + loss, rates.fwd_floor_ms / 1e3)
    kernel = _kernel_s(2 * shape.fixed_params * s + copies * shape.fixed_params * c,
                       _fractions(rates, work.direction)[0], rates)
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
    mem = _residency(shape, work, layout, rates)
    res_compute, per_block, bring_in = _block_resources(shape, work, layout, rates, mem.one_copy)
    head = _head_s(shape, work, layout, rates)
    fill = rates.exposed_uploads * bring_in if mem.streamed else 0.0
    comm = _collective_s(layout, rates)
    step = mem.resident * res_compute + mem.streamed * max(per_block.values()) + head + fill + comm
    busy = Breakdown(compute_s=mem.resident * res_compute + mem.streamed * per_block["compute"] + head,
                     pcie_s=mem.streamed * per_block["pcie"] + fill, nvlink_s=mem.streamed * per_block["nvlink"],
                     host_mem_s=mem.streamed * per_block["host-dram"], network_s=comm)
    bound = _bound(per_block, mem.streamed, mem.resident * res_compute + head, fill, comm)
    store = mem.streamed * shape.block_params * DTYPE_BYTES[work.dtype]
    host = store * (1 if layout.sliced else layout.gpus_per_node)
    notes = [mem.note] if mem.note else []
    if mem.one_copy:
        notes.append("one perturbed copy at a time (budget)")
    if host > rates.host_capacity_gb * GB:
        notes.append(f"host store {host / GB:.0f} GB > {rates.host_capacity_gb:.0f} GB")
    speedup = (baseline_step_s / step) if baseline_step_s else 1.0
    return Prediction(name=layout.name, strategy=layout.strategy, gpus_per_node=layout.gpus_per_node,
                      nodes=layout.nodes, dp=layout.dp, pp=layout.pp, sliced=layout.sliced, mode=mem.mode,
                      resident_blocks=mem.resident, streamed_blocks=mem.streamed, step_s=step,
                      tokens_per_s=work.tokens / step, speedup=speedup, bound=bound, gpu_mem_gb=mem.peak / GB,
                      host_mem_gb=host / GB, breakdown=busy, fits=mem.fits and host <= rates.host_capacity_gb * GB,
                      notes=notes)


def _bound(per_block: dict[str, float], streamed: int, compute_only: float, fill: float, comm: float) -> str:
    """The resource on the longest share of the critical path: the streamed blocks' slowest resource, against the
    resident blocks and head (compute), the pipeline fill (pcie) and the all-reduce (network)."""
    path = {"compute": compute_only, "pcie": fill, "nvlink": 0.0, "host-dram": 0.0, "network": comm}
    if streamed:
        slowest = max(per_block, key=lambda k: per_block[k])
        path[slowest] += streamed * per_block[slowest]
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


def resolve_model(model: str | ModelShape) -> ModelShape:
    return model if isinstance(model, ModelShape) else shape_from_preset(model)


def predict(model: str | ModelShape, *, tokens: int = 2048, seq: int | None = None, dtype: str = "bf16",
            compute_dtype: str = "bf16", gpus_per_node: int = 1, nodes: int = 1, rates: Rates | None = None,
            direction: str = "gaussian", prefetch: int = 1, offload: str = "auto") -> PlanReport:
    """Predict single-GPU ZO2 and every layout of ``gpus_per_node`` × ``nodes`` GPUs for ``model`` (a preset name
    or a :class:`ModelShape`) at ``tokens`` global tokens per step (sequences of ``seq``, default
    min(tokens, 2048))."""
    shape = resolve_model(model)
    work = Workload(tokens=tokens, seq=seq if seq is not None else min(tokens, 2048), dtype=dtype,
                    compute_dtype=compute_dtype, direction=direction, prefetch=prefetch, offload=offload)
    rates = rates or Rates()
    rates.check()
    Layout(gpus_per_node, nodes)  # validates the flags
    base = predict_layout(shape, Layout(), work, rates)
    base.speedup = 1.0
    rows, skipped = [], []
    if gpus_per_node * nodes > 1:
        for layout in layouts(gpus_per_node, nodes):
            try:
                rows.append(predict_layout(shape, layout, work, rates, base.step_s))
            except ConfigError as err:
                skipped.append((layout.name, str(err)))
    return PlanReport(shape, work, rates, gpus_per_node, nodes, base, rows, skipped)


# ----------------------------------------------------------------------------------------------------------
# Calibration
# ----------------------------------------------------------------------------------------------------------

def fit_forward(points: Sequence[tuple[float, float]], peak_tflops: float) -> tuple[float, float]:
    """Fit ``t = max(flops / (peak · eff), floor)`` to (flops, seconds) points in log space; (eff, floor_s)."""
    if not points:
        raise ConfigError("--calibrate: the file has no forward times to fit (rows need shape, batch, fwd2_ms).")
    best = (math.inf, 1.0, 0.0)
    for i in range(1200):
        rate = peak_tflops * 1e12 * 0.02 * (1.5 / 0.02) ** (i / 1199)
        xs = sorted((f / rate, t) for f, t in points)
        for k in range(len(xs) + 1):
            floor = 0.0
            if k:
                floor = math.exp(sum(math.log(t) for _, t in xs[:k]) / k)
                upper = xs[k][0] if k < len(xs) else math.inf
                floor = min(max(floor, xs[k - 1][0]), upper)
            err = sum((math.log(max(x, floor)) - math.log(t)) ** 2 for x, t in xs)
            if err < best[0] - 1e-12:
                best = (err, rate / (peak_tflops * 1e12), floor)
    return best[1], best[2]


def h100_forward_points() -> list[tuple[float, float]]:
    """(flops, seconds) of DESIGN.md §7's per-block forward times."""
    points = []
    for name, (t_long, t_short) in H100_FORWARD_MS.items():
        shape = shape_from_preset(name)
        points.append((block_flops(shape, 2048, 2048), t_long / 1e3))
        points.append((block_flops(shape, 4096, 256), t_short / 1e3))
    return points


def _parse_batch(text: str) -> tuple[int, int]:
    b, s = (int(x) for x in str(text).lower().split("x"))
    return b, s


def _load_json(path: str | Path) -> dict:
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"--calibrate {path}: no such file; give a benchmark JSON such as "
                          "benchmarks/results/2026-11-26-h200/offload.json.")
    try:
        return json.loads(p.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ConfigError(f"--calibrate {path}: not valid JSON ({err}).") from None


def calibrate(path: str | Path, base: Rates | None = None) -> Rates:
    """Rates fitted to a ``benchmarks/bench_offload.py`` JSON: the median measured H2D/D2H bandwidths and the forward
    model fitted to its per-block forward times; a ``kernels.json`` in the same folder also sets the copy rate and
    the kernels' fractions of it. What the files do not measure keeps ``base`` (default :class:`Rates`)."""
    base = base or Rates()
    data = _load_json(path)
    rows = [r for r in data.get("rows", []) if isinstance(r, dict) and "error" not in r]
    up = [r["bw_h2d"] for r in rows if r.get("bw_h2d")]
    down = [r["bw_d2h"] for r in rows if r.get("bw_d2h")]
    points = []
    for r in rows:
        if r.get("fwd2_ms") and r.get("shape") and r.get("batch"):
            b, s = _parse_batch(r["batch"])
            points.append((block_flops(shape_from_preset(r["shape"]), b * s, s), r["fwd2_ms"] / 2e3))
    eff, floor = fit_forward(points, base.matmul_tflops)
    changes: dict = {"matmul_efficiency": eff, "fwd_floor_ms": floor * 1e3}
    if up:
        changes["h2d_gbs"] = median(up)
    if down:
        changes["d2h_gbs"] = median(down)
    device = str(data.get("env", {}).get("device", ""))
    for key, mem in GPU_MEMORY_GB.items():
        if key in device:
            changes["gpu_mem_gb"] = mem
            break
    sources = [str(path)]
    kernels = Path(path).with_name("kernels.json")
    if kernels.is_file() and kernels != Path(path):
        changes.update(_kernel_rates(_load_json(kernels)))
        sources.append(str(kernels))
    changes["source"] = f"calibrated from {' + '.join(sources)} ({device or 'device not recorded'}); rest: defaults"
    rates = replace(base, **changes)
    rates.check()
    return rates


def _kernel_rates(data: dict) -> dict:
    """Copy TB/s and kernel fractions from a ``benchmarks/bench_kernels.py`` JSON."""
    rows = [r for r in data.get("rows", []) if isinstance(r, dict)]
    out = {}
    copy = [r["GBps"] for r in rows if r.get("kernel") == "copy" and r.get("GBps")]
    if copy:
        out["copy_tbs"] = median(copy) / 1e3
    names = {"upd_pair_gauss": "gauss_update_perturb", "pair_gauss": "gauss_pair", "upd_pair_rad": "rad_update_perturb",
             "pair_rad": "rad_pair"}
    for kernel, key in names.items():
        pct = [r["pct_copy"] for r in rows if r.get("kernel") == kernel and r.get("pct_copy")]
        if pct:
            out[key] = median(pct) / 100
    if "gauss_update_perturb" in out:
        out["gauss_update"] = out["gauss_update_perturb"]
    if "rad_update_perturb" in out:
        out["rad_update"] = out["rad_update_perturb"]
    return out


def compare_with_benchmark(path: str | Path, rates: Rates | None = None) -> list[dict]:
    """Predicted vs measured streamed and resident step times for every row of an offload.json.

    ``rates`` default: :func:`calibrate` of the file with ``exposed_uploads = 1`` (the engine the 2026-11-26
    measurement ran had one un-overlapped upload per step)."""
    rates = rates or replace(calibrate(path), exposed_uploads=1.0)
    out = []
    for r in _load_json(path).get("rows", []):
        if "error" in r or not r.get("streamed_ms") or r.get("budget"):
            continue
        b, s = _parse_batch(r["batch"])
        shape = shape_from_preset(r["shape"], layers=int(r.get("layers", 4)))
        row = {"shape": r["shape"], "batch": r["batch"]}
        for kind, offload in (("streamed", "stream"), ("resident", "resident")):
            work = Workload(tokens=b * s, seq=s, offload=offload)
            pred = predict_layout(shape, Layout(), work, rates)
            measured = r.get(f"{kind}_ms")
            row[f"{kind}_ms"] = measured
            row[f"{kind}_pred_ms"] = pred.step_s * 1e3
            row[f"{kind}_ratio"] = pred.step_s * 1e3 / measured if measured else None
        row["peak_gb"] = r.get("peak_gb")
        row["peak_pred_gb"] = predict_layout(shape, Layout(), Workload(tokens=b * s, seq=s, offload="stream"),
                                             rates).gpu_mem_gb
        out.append(row)
    return out


# ----------------------------------------------------------------------------------------------------------
# The scaling table
# ----------------------------------------------------------------------------------------------------------

SCALING_MODELS = ("opt-13b", "opt-30b", "opt-66b", "opt-175b")
SCALING_BATCH, SCALING_SEQ = 96, 256


def scaling_table(models: Sequence[str] = SCALING_MODELS, gpus_per_node: Sequence[int] = (2, 4, 8),
                  nodes: Sequence[int] = (1, 2, 3, 4), tokens: int = SCALING_BATCH * SCALING_SEQ,
                  seq: int = SCALING_SEQ, rates: Rates | None = None, **kw) -> list[dict]:
    """One row per (model, N, M): single-GPU ZO2 step and the speed-up of each strategy, and the best layout
    among those that fit (GPU budget and host memory).

    Default batch: 96 sequences of 256 tokens (96: every dp of 2..32 GPUs, 3 nodes included, gets whole
    sequences)."""
    rates = rates or Rates()
    rows = []
    for model in models:
        for n in gpus_per_node:
            for m in nodes:
                report = predict(model, tokens=tokens, seq=seq, gpus_per_node=n, nodes=m, rates=rates, **kw)
                rows.append(_scaling_row(model, report))
    return rows


def _scaling_row(model: str, report: PlanReport) -> dict:
    by_name = {p.name: p for p in report.rows}
    fitting = [p for p in report.rows if p.fits]
    best = min(fitting, key=lambda p: p.step_s) if fitting else report.baseline
    row = {"model": model, "gpus_per_node": report.gpus_per_node, "nodes": report.nodes,
           "gpus": report.gpus_per_node * report.nodes, "zo2_ms": report.baseline.step_s * 1e3}
    for strategy in ("zo-ddp", "zo-ddp+sliced", "2d", "2d+sliced"):
        alias = strategy.replace("2d", "pertp") if report.gpus_per_node * report.nodes == 2 else strategy
        p = by_name.get(strategy) or by_name.get(alias)
        row[strategy] = p.speedup if p else None
    row.update(best=best.name, step_ms=best.step_s * 1e3, tokens_per_s=best.tokens_per_s, speedup=best.speedup,
               bound=best.bound, gpu_gb=best.gpu_mem_gb, host_gb=best.host_mem_gb,
               notes=", ".join(p.name for p in report.rows if not p.fits))
    return row


# ----------------------------------------------------------------------------------------------------------
# Printing
# ----------------------------------------------------------------------------------------------------------

FOOTER = (
    "Model: per streamed block, max(compute = (2/pp)·forward + perturbation kernels, PCIe = max(up/H2D, down/D2H, "
    "(up+down)/both), NVLink all-gather (sliced), host DRAM of the node); plus resident blocks, head and loss, "
    "pipeline fill (rate.exposed_uploads) and the 2-float all-reduce. Forward = max(flops/(TFLOP/s·efficiency), "
    "floor), fitted to measured forward times. Memory: the residency planner's accounting (zo2/offload/planner.py) "
    "plus activations; host = pinned store per node. Not modelled: kernel launch and Python overhead beyond the "
    "fitted floor, stragglers and jitter, NCCL/compute SM contention, shared PCIe switches, NUMA, checksum "
    "all-reduces, data loading, eval and checkpoints. Predictions, not measurements."
)

PLAN_COLUMNS = [("name", "layout", "s"), ("gpus", "GPUs", "s"), ("dp", "dp", "d"), ("pp", "pp", "d"),
                ("mode", "mode", "s"), ("step_ms", "step ms", ".1f"), ("tokens_per_s", "tok/s", ",.0f"),
                ("speedup", "speed-up", ".2f"), ("compute_ms", "compute", ".1f"), ("pcie_ms", "pcie", ".1f"),
                ("nvlink_ms", "nvlink", ".1f"), ("host_ms", "host", ".1f"), ("net_ms", "net", ".2f"),
                ("bound", "bound", "s"), ("gpu_gb", "GPU GB", ".1f"), ("host_gb", "host GB/node", ".0f"),
                ("flags", "notes", "s")]

SCALING_COLUMNS = [("model", "model", "s"), ("gpus_per_node", "N", "d"), ("nodes", "M", "d"), ("gpus", "GPUs", "d"),
                   ("zo2_ms", "ZO2 ms", ".0f"), ("zo-ddp", "ddp x", ".2f"), ("zo-ddp+sliced", "ddp+sl x", ".2f"),
                   ("2d", "2d x", ".2f"), ("2d+sliced", "2d+sl x", ".2f"), ("best", "best", "s"),
                   ("step_ms", "step ms", ".1f"), ("tokens_per_s", "tok/s", ",.0f"), ("speedup", "speed-up", ".2f"),
                   ("bound", "bound", "s"), ("gpu_gb", "GPU GB", ".1f"), ("host_gb", "host GB/node", ".0f"),
                   ("notes", "does not fit (GPU/host memory)", "s")]


def format_table(rows: list[dict], columns: list[tuple[str, str, str]]) -> str:
    """``rows`` as an aligned text table (first column left-aligned, the rest right-aligned)."""
    cells = [[h for _, h, _ in columns]]
    for r in rows:
        cells.append(["-" if r.get(k) is None else format(r[k], f) for k, _, f in columns])
    widths = [max(len(row[i]) for row in cells) for i in range(len(columns))]
    lines = []
    for j, row in enumerate(cells):
        lines.append("  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths))))
        if j == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(line.rstrip() for line in lines)


def _plan_row(p: Prediction) -> dict:
    b = p.breakdown
    mode = p.mode if p.mode == "resident" else f"{p.resident_blocks} res/{p.streamed_blocks} str"
    return {"name": p.name, "gpus": f"{p.gpus_per_node}x{p.nodes}", "dp": p.dp, "pp": p.pp, "mode": mode,
            "step_ms": p.step_s * 1e3, "tokens_per_s": p.tokens_per_s, "speedup": p.speedup,
            "compute_ms": b.compute_s * 1e3, "pcie_ms": b.pcie_s * 1e3, "nvlink_ms": b.nvlink_s * 1e3,
            "host_ms": b.host_mem_s * 1e3, "net_ms": b.network_s * 1e3, "bound": p.bound, "gpu_gb": p.gpu_mem_gb,
            "host_gb": p.host_mem_gb, "flags": "; ".join(p.notes)}


def format_report(report: PlanReport) -> str:
    """The ``zo2 plan`` output: header, table, skipped layouts, rates and the assumptions footer."""
    s, w = report.model, report.workload
    head = (f"{s.name}: {s.params / 1e9:.1f} B parameters, {s.layers} blocks of {s.block_params / 1e6:.0f} M "
            f"({s.block_params * DTYPE_BYTES[w.dtype] / GB:.2f} GB {w.dtype}); {w.tokens} tokens per step "
            f"({w.batch} x {w.seq}), {w.direction} directions, prefetch {w.prefetch}, offload {w.offload}; "
            f"{report.gpus_per_node} GPU(s) per node x {report.nodes} node(s)")
    rows = [report.baseline] + report.rows
    lines = [head, "", format_table([_plan_row(p) for p in rows], PLAN_COLUMNS)]
    for name, reason in report.skipped:
        lines.append(f"  {name}: not applicable: {reason}")
    lines += ["", "Columns compute/pcie/nvlink/host/net: busy ms per step of each resource (they overlap); "
                  "bound: the resource on most of the critical path; speed-up: over single-GPU ZO2 at the same global batch.",
              f"Rates: {_rates_line(report.rates)}", "", FOOTER]
    return "\n".join(lines)


def _rates_line(r: Rates) -> str:
    return (f"{r.source}. H2D {r.h2d_gbs:.1f}, D2H {r.d2h_gbs:.1f}, both {r.bidir_gbs:.0f} GB/s; matmul "
            f"{r.matmul_tflops:.0f} TFLOP/s x {r.matmul_efficiency:.3f}, forward floor {r.fwd_floor_ms:.2f} ms; "
            f"copy {r.copy_tbs:.2f} TB/s; NVLink {r.nvlink_gbs:.0f} GB/s; network {r.network_gbps:.0f} Gb/s; "
            f"host DRAM {r.host_mem_gbs:.0f} GB/s; GPU {r.gpu_mem_gb:.0f} GB; exposed uploads {r.exposed_uploads:g}")


def format_scaling(rows: list[dict], rates: Rates, tokens: int, seq: int) -> str:
    """The scaling table with its header and the published DistZO2 figure beside it."""
    lines = [f"Scaling: global batch {tokens} tokens ({tokens // seq} x {seq}) per step; speed-ups over "
             "single-GPU ZO2 at the same batch ('x' columns: each strategy, 2d = pertp on 2 GPUs; best: the fastest "
             "layout that fits; bound: the resource on most of its critical path).", "",
             format_table(rows, SCALING_COLUMNS), "", f"Published: {PUBLISHED_DISTZO2}",
             f"Rates: {_rates_line(rates)}", "", FOOTER]
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------------------
# Small helpers
# ----------------------------------------------------------------------------------------------------------

def _require_int(flag: str, value: object, low: int, high: int | None = None) -> None:
    ok = isinstance(value, int) and not isinstance(value, bool) and value >= low and (high is None or value <= high)
    if not ok:
        span = f"between {low} and {high}" if high is not None else f">= {low}"
        raise ConfigError(f"{flag} {value!r}: it must be an integer {span}.")


def _choice(flag: str, value: str, options: Iterable[str]) -> None:
    options = list(options)
    if value not in options:
        raise ConfigError(f"{flag} {value!r}: it must be one of {', '.join(options)}.{did_you_mean(value, options)}")
