"""Learning-rate schedules: constant, linear and cosine decay, each after an optional linear warm-up."""

from __future__ import annotations

import math

SCHEDULES = ("constant", "linear", "cosine")


def lr_at(step: int, lr: float, schedule: str = "constant", warmup_steps: int = 0,
          total_steps: int | None = None, min_lr_ratio: float = 0.0) -> float:
    """The learning rate of 0-based step ``step``.

    Warm-up rises linearly to ``lr`` over ``warmup_steps`` steps (step 0 already moves: lr·1/warmup).
    After it, ``linear`` and ``cosine`` decay to ``min_lr_ratio · lr`` at ``total_steps``.
    """
    if schedule not in SCHEDULES:
        raise ValueError(f"unknown lr schedule {schedule!r}; expected one of {SCHEDULES}")
    if warmup_steps > 0 and step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    if schedule == "constant":
        return lr
    if total_steps is None:
        raise ValueError(f"the {schedule!r} schedule needs total_steps")
    span = max(total_steps - warmup_steps, 1)
    progress = min(max(step - warmup_steps, 0) / span, 1.0)
    floor = lr * min_lr_ratio
    if schedule == "linear":
        return floor + (lr - floor) * (1.0 - progress)
    return floor + (lr - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))
