"""What the engine reports: one step (:class:`StepResult`) and one evaluation (:class:`EvalResult`)."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from zo2.optim.estimators import Update


@dataclass
class StepResult:
    """What one ``ZOEngine.step`` reports."""

    step: int
    loss: float
    loss_plus: float
    loss_minus: float
    projected_grad: float
    lr: float
    skipped: bool
    update: Update | None
    tokens: int
    seconds: float
    losses: list[float] = field(default_factory=list)
    """The loss of every evaluated point, in the estimator's order; zo-sgd-conservative appends L(θ) (unless the
    estimator has it) and its two candidates' losses, L(θ − lr(ĝ + λθ)) and L(θ + lr(ĝ + λθ))."""
    bytes_h2d: int = 0
    """Bytes uploaded from the parameter store this step (0 when nothing streams)."""
    bytes_d2h: int = 0
    """Bytes written back to the parameter store this step."""
    bytes_disk_read: int = 0
    bytes_disk_written: int = 0
    """Bytes read from and written to the NVMe tier's files this step (``offload.nvme_path``; 0 without it)."""
    transfer_wait_ms: float = 0.0
    """Time the compute stream waited for uploads (CUDA only)."""
    replays: int = 0
    """Logged updates replayed on uploaded blocks whose host copy lagged (``optim.writeback_every`` > 1); streaming
    one matrix at a time, on uploaded pieces (each piece's replays count)."""
    peak_device_bytes: int = 0
    """Peak memory allocated on the compute device during the step (CUDA only)."""


@dataclass
class EvalResult:
    loss: float
    logits: torch.Tensor
