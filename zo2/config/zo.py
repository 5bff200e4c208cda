"""ZOConfig: the engine and optimizer settings (the ``[optim]`` section of a job config)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from zo2.config.base import require, require_choice
from zo2.optim.estimators import ESTIMATORS
from zo2.optim.decay import NO_DECAY_RULES
from zo2.optim.optimizers import OPTIMIZERS, SIGN_MODES
from zo2.optim.rng import DISTRIBUTIONS
from zo2.optim.schedule import SCHEDULES


DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
"""The dtype names configs accept."""


def torch_dtype(name: str | None) -> torch.dtype | None:
    """The torch dtype of a config dtype name ('fp32', 'bf16', 'fp16'), or None."""
    return None if name is None else DTYPES[name]


@dataclass(kw_only=True)
class ZOConfig:
    """Zeroth-order optimizer and engine settings."""

    lr: float = 1e-6
    """Peak learning rate η (MeZO uses 1e-6..1e-7 for OPT full fine-tuning)."""
    eps: float = 1e-3
    """Perturbation scale ε: the forwards run at θ ± εz."""
    weight_decay: float = 0.0
    """Decoupled weight decay λ in θ ← θ − η(D + λθ), D the optimizer's direction (g z for MeZO-SGD); skipped
    for the parameters ``no_decay`` names."""
    no_decay: str = "norms_and_biases"
    """Which parameters weight decay skips. 'norms_and_biases': every 1-D parameter and any name containing bias,
    norm, ln_, layernorm or layer_norm (every family's norms). 'mezo_names': MeZO's rule, names containing bias,
    layer_norm or layernorm (case-sensitive), so the final norm of Llama, Qwen and OLMo2, the q_norm/k_norm of
    Qwen3 and OLMo2 and GPT-2's ln_* weights are decayed (zo2/optim/decay.py lists both)."""
    seed: int = 0
    """Base seed: the direction of step t is a pure function of (seed, t, direction index)."""
    estimator: str = "central"
    """'central': two-sided SPSA as MeZO (L(θ+εz), L(θ−εz)); 'forward': one-sided (L(θ), L(θ+εz))."""
    q: int = 1
    """Directions per step; the projected gradients of the q directions are averaged."""
    optimizer: str = "zo-sgd"
    """How the estimate ĝ (the q directions averaged) moves θ, as θ ← θ − lr (D + weight_decay·θ):
    'zo-sgd' (MeZO-SGD, D = ĝ), 'zo-sgd-momentum' (D = m, m ← momentum·m + ĝ), 'zo-sgd-sign' (D = sign(ĝ)
    element-wise), 'zo-sgd-conservative' (2-3 more forwards a step: keep the best of θ − lr(ĝ + λθ), θ + lr(ĝ + λθ)
    and θ by loss on the step's batch), 'zo-adam' (Adam with bias correction on ĝ: beta1, beta2, adam_eps).
    zo-sgd-momentum and zo-adam keep 1 and 2 float32 buffers per weight (streamed with offloaded blocks) and
    snapshots include them."""
    sign_mode: str = "elementwise"
    """zo-sgd-sign's direction: 'elementwise' (D = sign(ĝ) per element, i.e. sign(g)·sign(z) for one direction) or
    'projected' (D = mean over the q directions of sign(gᵢ)·zᵢ: the sign of the projected gradient times z, as
    ZO-Bench's active zo_sign_opt steps). Ignored by the other optimizers."""
    momentum: float = 0.9
    """Momentum μ of 'zo-sgd-momentum' (ignored by the other optimizers)."""
    beta1: float = 0.9
    """Decay rate of zo-adam's first moment."""
    beta2: float = 0.999
    """Decay rate of zo-adam's second moment."""
    adam_eps: float = 1e-8
    """ε added to the square root of zo-adam's second moment."""
    distribution: str = "gaussian"
    """Direction distribution: 'gaussian' (N(0, I)) or 'rademacher' (±1, nearly free to generate)."""
    lr_schedule: str = "constant"
    """'constant', 'linear' or 'cosine' decay (after the warm-up) to min_lr_ratio·lr at total_steps."""
    warmup_steps: int = 0
    """Steps of linear warm-up from lr/warmup_steps to lr."""
    total_steps: int | None = None
    """Length of the decay for the linear and cosine schedules (the trainer fills it in from train.steps)."""
    min_lr_ratio: float = 0.0
    """Final learning rate of the linear/cosine schedules, as a fraction of lr."""
    deferred_update: bool = True
    """Apply step t's update at the start of step t+1, unit by unit, as the offload engine streams them.
    Bit-identical to the immediate update; flush() applies a pending update at once."""
    device: str | None = None
    """Compute device ('cpu', 'cuda', 'cuda:1'); None keeps the model's own device."""
    offload: bool | str = "auto"
    """'auto': keep every block on the device if the budget allows, else keep as many as fit and stream the
    rest from host memory; true: stream every block; false: no streaming."""
    prefetch: int = 1
    """Blocks uploaded ahead of the one being computed (device memory holds prefetch + 2 streamed blocks)."""
    stream_granularity: str = "auto"
    """What a streamed block moves as: 'block' (the whole block per upload; prefetch + 2 block-sized device
    slots), 'matrix' (one module's parameters at a time through a ring of prefetch + 2 of the largest matrix, a
    fraction of a block), or 'auto' (block, and matrix where block streaming does not fit the device budget).
    Same values bit for bit. With 'matrix' a stateful optimizer's state moves piece by piece with its weights, and
    frozen weights (PEFT base matrices, prompt-tuned blocks) move read-only one module at a time, each through a
    ring of its own. 'matrix' works with sliced transfers (1, 2, 4 or 8 processes per node) and from zo2 launch's
    node store, and from the NVMe tier (offload.nvme_path; under zo2 launch with several workers per node and
    NVMe-homed blocks, 'auto' streams one matrix at a time: the scheduler cuts its files by matrix before any
    worker plans)."""
    writeback_every: int | str = 1
    """Write a streamed block back to host memory every K steps instead of every step: the host copy lags, and an
    upload first replays the updates it lacks on the device (the same kernel calls, bit-identical), so K-1 of
    every K write-backs are saved. Every sync point (flush, snapshot, evaluation, the end) writes every lagging
    block. 1: every step. 'auto': the first steps write back every step while the compute stream's waits for
    uploads are measured; where they are under 5% of a step (the forwards outlast the transfers) K stays 1, else
    K comes from the measured rates of an update pass on the GPU and of the host link (the log says which and
    why; 1 on a CPU, with a stateful optimizer, or where several processes share the node's store; an NVMe-only
    tier takes the largest K at once). K > 1 needs a stateless optimizer (zo-sgd, zo-sgd-sign,
    zo-sgd-conservative)."""
    gpu_memory_budget: int | float | str | None = None
    """Device memory the engine may plan for: bytes (int or '18GB'), a fraction of free memory (0.9), or None
    for NVML's free memory minus a margin (on CPU, None means no limit)."""
    storage_dtype: str | None = None
    """dtype the trainable weights are kept (and streamed) in: 'fp32', 'bf16' or 'fp16'; None keeps the
    model's dtype. Updates of low-precision weights use stochastic rounding (see stochastic_rounding)."""
    compute_dtype: str | None = None
    """dtype the forwards run in ('fp32', 'bf16', 'fp16'); None computes in the storage dtype. The perturbed
    weights θ ± εz are formed in float32 from the stored θ and cast to this dtype."""
    stochastic_rounding: bool = True
    """Round updates of bf16/fp16 weights stochastically (unbiased, seeded, reproducible) so updates far
    below the dtype's resolution still move the weights on average; false rounds to nearest."""
    kernels: str = "auto"
    """Perturbation/update backend: 'triton' (fused kernels, one launch per unit; CUDA), 'torch' (the
    reference, any device), or 'auto' (Triton on CUDA when installed, else torch)."""
    sliced_transfers: bool = True
    """With several processes on a node (torchrun), keep one shared parameter store per node; each process
    uploads and writes back 1/N of every streamed block and an all-gather assembles it (N-fold less host
    traffic per GPU). Only used when blocks are streamed."""
    shared_store: bool = False
    """Allocate the parameter store as named files in /dev/shm (pinned with cudaHostRegister where CUDA exists)
    so other processes on the node can map it; otherwise private pinned memory."""

    def __post_init__(self) -> None:
        require(math.isfinite(self.lr) and self.lr >= 0, "optim.lr", self.lr, "it must be a finite number >= 0.")
        require(math.isfinite(self.eps) and self.eps > 0, "optim.eps", self.eps,
                "it must be a finite number > 0 (MeZO uses 1e-3).")
        require(math.isfinite(self.weight_decay) and self.weight_decay >= 0, "optim.weight_decay",
                self.weight_decay, "it must be >= 0.")
        require_choice("optim.no_decay", self.no_decay, NO_DECAY_RULES)
        require(isinstance(self.seed, int) and self.seed >= 0, "optim.seed", self.seed,
                "it must be a non-negative integer.")
        require_choice("optim.estimator", self.estimator, ESTIMATORS)
        require(isinstance(self.q, int) and self.q >= 1, "optim.q", self.q, "it must be an integer >= 1.")
        require_choice("optim.optimizer", self.optimizer, OPTIMIZERS)
        require_choice("optim.sign_mode", self.sign_mode, SIGN_MODES)
        require(math.isfinite(self.momentum) and 0.0 <= self.momentum < 1.0, "optim.momentum", self.momentum,
                "it must lie in [0, 1) (0.9 is usual; 0 makes zo-sgd-momentum plain zo-sgd).")
        for name in ("beta1", "beta2"):
            value = getattr(self, name)
            require(math.isfinite(value) and 0.0 <= value < 1.0, f"optim.{name}", value,
                    "it must lie in [0, 1) (Adam's defaults are beta1 = 0.9, beta2 = 0.999).")
        require(math.isfinite(self.adam_eps) and self.adam_eps > 0, "optim.adam_eps", self.adam_eps,
                "it must be a finite number > 0 (Adam's default is 1e-8).")
        require_choice("optim.distribution", self.distribution, DISTRIBUTIONS)
        require_choice("optim.lr_schedule", self.lr_schedule, SCHEDULES)
        require(isinstance(self.warmup_steps, int) and self.warmup_steps >= 0, "optim.warmup_steps",
                self.warmup_steps, "it must be an integer >= 0.")
        require(self.total_steps is None or (isinstance(self.total_steps, int) and self.total_steps >= 1),
                "optim.total_steps", self.total_steps, "it must be a positive integer or unset.")
        require(0.0 <= self.min_lr_ratio <= 1.0, "optim.min_lr_ratio", self.min_lr_ratio,
                "it must lie in [0, 1].")
        require(self.offload in (True, False, "auto"), "optim.offload", self.offload,
                "it must be true, false or 'auto'.")
        for name in ("storage_dtype", "compute_dtype"):
            value = getattr(self, name)
            if value is not None:
                require_choice(f"optim.{name}", value, DTYPES)
        require_choice("optim.kernels", self.kernels, ("auto", "triton", "torch"))
        require(isinstance(self.prefetch, int) and self.prefetch >= 1, "optim.prefetch", self.prefetch,
                "it must be an integer >= 1.")
        require_choice("optim.stream_granularity", self.stream_granularity, ("auto", "block", "matrix"))
        require(self.writeback_every == "auto" or (isinstance(self.writeback_every, int)
                and not isinstance(self.writeback_every, bool) and self.writeback_every >= 1),
                "optim.writeback_every", self.writeback_every,
                "it must be an integer >= 1 (1 writes back every step) or 'auto'.")
        require(self.lr_schedule == "constant" or self.total_steps is not None, "optim.total_steps",
                self.total_steps, f"the {self.lr_schedule!r} schedule needs the number of steps it decays over.")
