"""What the cost model (:mod:`zo2.parallel.plan`) is asked about: the hardware rates, the model's shape, one step's
work and the layout of GPUs, each checked on construction (ConfigError names the flag to fix)."""

from __future__ import annotations

import math
from dataclasses import dataclass, fields, replace
from typing import Iterable

from zo2.config.base import did_you_mean
from zo2.errors import ConfigError
from zo2.optim.optimizers import OPTIMIZERS, state_names_of

GB = 1e9
DTYPE_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}
COMPUTE_DTYPES = ("bf16", "fp16")
DIRECTIONS = ("gaussian", "rademacher")
OFFLOAD_MODES = ("auto", "stream", "resident")


@dataclass(frozen=True)
class Rates:
    """Hardware rates. Defaults: one H100 80GB SXM (DESIGN.md §7) in an 8-GPU NVLink4 node; every one
    overridable (``--set rate.KEY=VALUE``) or calibrated from a benchmark JSON
    (:func:`zo2.parallel.plan_calibration.calibrate`)."""

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
    nvme_read_gbs: float = 6.0
    """Read GB/s of the node's NVMe drive through the tier (assumption: one PCIe 4.0 x4 drive; ``--calibrate``
    takes the store's read rate from a ``nvme.json`` of benchmarks/bench_nvme.py beside the file)."""
    nvme_write_gbs: float = 4.0
    """Write GB/s of the node's NVMe drive (data, fsync and marker), as ``nvme_read_gbs``."""
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
    loss_chunk_mb: float = 64.0
    """The loss's float32 chunk of logits in MiB (zo2.models.base.LOSS_CHUNK_BYTES); ``inf`` for a measurement
    taken before the loss was chunked (calibrating from a file that does not record it)."""
    head_points_at_once: float = 1.0
    """Points whose logits exist at once (1: the head runs point by point; a measurement from before, read by
    ``--calibrate`` from a file that does not record it, had every point's)."""
    form_chunk_mb: float = 64.0
    """A linear layer or embedding larger than this (MiB at a point) is formed a chunk of rows at a time
    (zo2.offload.arith.FORM_CHUNK_BYTES); ``inf`` for a measurement taken before (calibrating from a file that does
    not record ``form_chunk_bytes``)."""
    loss_passes: float = 4.0
    """Passes over float32 logits per forward in the loss (upcast, softmax, gather)."""
    point_overhead_ms: float = 1.0
    """Engine time per block and point beyond its forward and kernels: launching the kernels that form each
    module's parameters at the point, splitting and joining the batch (zo2.points). Fitted by ``--calibrate``
    to the smallest shape's resident steps (2026-12-04 H200: about 1 ms for an OPT block's 8 modules)."""
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
            if f.name in ("exposed_uploads", "fwd_floor_ms", "loss_passes", "point_overhead_ms"):
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
    granularity: str = "block"
    """What one upload moves: 'block' or 'matrix' (``optim.stream_granularity``): the device slots' size."""
    host_budget_gb: float | None = None
    """Pinned host memory per node for the streamed blocks (``offload.host_memory_budget``); None: the node's
    ``rate.host_capacity_gb``."""
    nvme: bool = False
    """Blocks beyond the host budget live on the node's NVMe drive (``offload.nvme_path`` set); without it they
    do not fit."""
    writeback_every: int = 1
    """Streamed blocks written back every K steps (``optim.writeback_every``): the write-backs move 1/K of the
    bytes, and an upload replays the (K-1)/2 updates its home copy lacks on average."""
    optimizer: str = "zo-sgd"
    """``optim.optimizer``: zo-sgd-momentum keeps one float32 buffer per weight element, zo-adam two; the state
    sits, streams and is homed with its block's weights (read and written back every step)."""

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
        _choice("--granularity", self.granularity, ("block", "matrix"))
        _require_int("--writeback-every", self.writeback_every, 1)
        _choice("--optimizer", self.optimizer, OPTIMIZERS)
        if self.state_bytes and self.writeback_every > 1:
            raise ConfigError(f"--writeback-every {self.writeback_every} needs a stateless optimizer; {self.optimizer} "
                              "writes its state back every step (the engine refuses it too). Use 1.")
        if self.host_budget_gb is not None and not (isinstance(self.host_budget_gb, (int, float))
                                                    and 0 < self.host_budget_gb < math.inf):
            raise ConfigError(f"--host-budget {self.host_budget_gb}: give the pinned host memory per node in GB, a "
                              "positive number (e.g. --host-budget 96).")

    @property
    def batch(self) -> int:
        return self.tokens // self.seq

    @property
    def state_bytes(self) -> int:
        """Optimizer-state bytes per weight element (float32 buffers)."""
        return 4 * len(state_names_of(self.optimizer))


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


def _require_int(flag: str, value: object, low: int, high: int | None = None) -> None:
    ok = isinstance(value, int) and not isinstance(value, bool) and value >= low and (high is None or value <= high)
    if not ok:
        span = f"between {low} and {high}" if high is not None else f">= {low}"
        raise ConfigError(f"{flag} {value!r}: it must be an integer {span}.")


def _choice(flag: str, value: str, options: Iterable[str]) -> None:
    options = list(options)
    if value not in options:
        raise ConfigError(f"{flag} {value!r}: it must be one of {', '.join(options)}.{did_you_mean(value, options)}")
