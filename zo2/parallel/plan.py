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
- Perturbation kernels: bytes moved / (device copy rate · the kernel's measured fraction of copy): ``update``
  of the block (of the own slice when sliced: read and write θ), then each of the 2/pp points' parameters formed
  module by module (zo2.points: read θ, write the point).
- The residency planner of DESIGN.md §2 (zo2/offload/planner.py): all resident when embed+head, every block,
  one module's parameters at a point and the activations fit the GPU budget (GPU memory minus max(5%, 1 GiB)); otherwise as many
  blocks as fit stay resident and the rest stream through (prefetch + 2) block buffers.
- Peak GPU memory per GPU: embed+head + resident blocks + stream buffers + the largest weight at a point (and its
  float32 direction, as the planner reserves) + activations of the 2/pp points run as one batch (hidden states in
  and out and the FFN intermediate with its per-point parts joined, of one block; or the points' logits plus two
  float32 copies of one point's, whichever is larger).
- Host memory per node: the pinned parameter store (the streamed blocks), one per rank unsliced, one per node
  sliced. Under a host budget (``--host-budget``, ``offload.host_memory_budget``) with ``--nvme``, the blocks
  that do not fit are homed on the node's NVMe drive (zo2.offload.tiers: host first, in order; ``prefetch`` + 2
  staging buffers of a block per store count against the budget). An NVMe-homed block also waits for the drive:
  its read, and its write-back every K steps (``--writeback-every``), at ``rate.nvme_read_gbs`` /
  ``rate.nvme_write_gbs``, one drive per node shared by its ranks.
- The lagging write-back (``--writeback-every K``): write-backs move 1/K of the bytes; an upload replays the
  (K-1)/2 updates its home lacks on average, one update pass each.
- A stateful optimizer (``--optimizer``: zo-sgd-momentum 4 bytes of float32 state per weight, zo-adam 8): the
  state sits with each resident unit, streams with each streamed block through the same slots (one matrix at a
  time: beside its weight, in rings of its own), is homed with it in host memory or on NVMe, and moves both ways
  every step (K = 1); the update reads and writes it once (Adam's element-wise passes are more: a floor).
- Host DRAM bandwidth per node (an assumption, default 480 GB/s ≈ 78% of two DDR5-4800 sockets): every byte
  uploaded or written back by any GPU of the node crosses it; unsliced N GPUs move N× the bytes of sliced ones.

What is not modelled
--------------------
Kernel launch and Python overheads beyond the fitted forward floor; stragglers and jitter between ranks; NCCL
kernels competing with the forwards for SMs; PCIe switches shared by two GPUs (set lower rates); NUMA placement;
the periodic checksum all-reduce; data loading and tokenisation; evaluation and checkpoint steps; q > 1
directions; sharding blocks across GPU memories (not a zo2 mode). ZO-DDP needs whole sequences per rank: a layout
whose dp does not divide the global batch (in sequences) is reported as not applicable.

Where it lives
--------------
This module is the planner (:func:`predict` over every layout, :func:`scaling_table` over a grid of models and
GPU counts) and the one import for callers: it re-exports the public names of

- :mod:`zo2.parallel.plan_inputs`: :class:`Rates`, :class:`ModelShape` and its constructors, :class:`Workload`,
  :class:`Layout`;
- :mod:`zo2.parallel.plan_memory`: residency and peak GPU memory, the host store;
- :mod:`zo2.parallel.plan_results`: :class:`Prediction`, :class:`Breakdown`, :class:`PlanReport`, ``FOOTER``;
- :mod:`zo2.parallel.plan_model`: the time of one layout (:func:`predict_layout`), :func:`block_flops`,
  :func:`forward_s`, :func:`layouts`;
- :mod:`zo2.parallel.plan_calibration`: :func:`calibrate`, :func:`fit_forward`, :func:`compare_with_benchmark`;
- :mod:`zo2.parallel.plan_format`: :func:`format_report`, :func:`format_scaling`, :func:`format_table`.

Each imports only modules listed before it, and this module imports them all: the imports form no cycle.
"""

from __future__ import annotations

from typing import Sequence

from zo2.errors import ConfigError
from zo2.parallel.plan_calibration import (GPU_MEMORY_GB, H100_FORWARD_MS, calibrate, compare_with_benchmark,
                                           fit_forward, h100_forward_points)
from zo2.parallel.plan_format import (PLAN_COLUMNS, PUBLISHED_DISTZO2, SCALING_COLUMNS, format_report,
                                      format_scaling, format_table)
from zo2.parallel.plan_inputs import (COMPUTE_DTYPES, DIRECTIONS, DTYPE_BYTES, GB, OFFLOAD_MODES, Layout,
                                      ModelShape, Rates, Workload, shape_from_config, shape_from_dims,
                                      shape_from_preset)
from zo2.parallel.plan_model import block_flops, forward_s, layouts, predict_layout
from zo2.parallel.plan_results import FOOTER, Breakdown, PlanReport, Prediction

__all__ = [
    "COMPUTE_DTYPES", "DIRECTIONS", "DTYPE_BYTES", "FOOTER", "GB", "GPU_MEMORY_GB", "H100_FORWARD_MS",
    "OFFLOAD_MODES", "PLAN_COLUMNS", "PUBLISHED_DISTZO2", "SCALING_BATCH", "SCALING_COLUMNS", "SCALING_MODELS",
    "SCALING_SEQ", "Breakdown", "Layout", "ModelShape", "PlanReport", "Prediction", "Rates", "Workload",
    "block_flops", "calibrate", "compare_with_benchmark", "fit_forward", "format_report", "format_scaling",
    "format_table", "forward_s", "h100_forward_points", "layouts", "predict", "predict_layout", "resolve_model",
    "scaling_table", "shape_from_config", "shape_from_dims", "shape_from_preset",
]


def resolve_model(model: str | ModelShape) -> ModelShape:
    return model if isinstance(model, ModelShape) else shape_from_preset(model)


def predict(model: str | ModelShape, *, tokens: int = 2048, seq: int | None = None, dtype: str = "bf16",
            compute_dtype: str = "bf16", gpus_per_node: int = 1, nodes: int = 1, rates: Rates | None = None,
            direction: str = "gaussian", prefetch: int = 1, offload: str = "auto",
            granularity: str = "block", host_budget_gb: float | None = None, nvme: bool = False,
            writeback_every: int = 1, optimizer: str = "zo-sgd") -> PlanReport:
    """Predict single-GPU ZO2 and every layout of ``gpus_per_node`` × ``nodes`` GPUs for ``model`` (a preset name
    or a :class:`ModelShape`) at ``tokens`` global tokens per step (sequences of ``seq``, default
    min(tokens, 2048)); the streamed blocks homed in ``host_budget_gb`` of pinned host memory per node and, with
    ``nvme``, the rest on the node's NVMe drive (:class:`Workload`)."""
    shape = resolve_model(model)
    work = Workload(tokens=tokens, seq=seq if seq is not None else min(tokens, 2048), dtype=dtype,
                    compute_dtype=compute_dtype, direction=direction, prefetch=prefetch, offload=offload,
                    granularity=granularity, host_budget_gb=host_budget_gb, nvme=nvme,
                    writeback_every=writeback_every, optimizer=optimizer)
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
