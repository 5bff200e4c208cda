"""The loss guard: stop a run whose loss went bad, and say exactly where to continue from.

Two ways a run goes bad: the loss comes out NaN/inf step after step (``train.max_nonfinite_steps`` in a row; such
steps make no update), or one update too large for the weights blows them up — its step still has a finite loss,
and the next one jumps far past the recent average (``train.divergence_factor`` times its moving average). Either
way the weights after the last step whose loss was in range are the ones to continue from, with a lower learning
rate: the error names that step for ``--resume-from-step`` (a resume that only lowers the learning rate would build
on the blown-up weights). Records are counted as steps done: record ``j`` (0-based) is step ``j + 1``.

The trainer (``zo2 train``) and the scheduler's workers (``zo2 launch``) use the same guard.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterable, Mapping

from zo2.errors import DivergedError, NonFiniteLossError

SMOOTHING = 0.9
"""Weight of the past in the loss's exponential moving average."""


@dataclass
class LossGuard:
    """Watches each step's loss; raises NonFiniteLossError or DivergedError with advice that works."""

    max_nonfinite: int
    divergence_factor: float
    resume_command: str
    """How this run continues, e.g. ``zo2 train --resume runs/x`` (the advice appends its options)."""
    lr: float
    run_dir: str = "RUN_DIR"
    streak: int = 0
    average: float | None = None
    """Moving average of the in-range losses so far; a jump is judged from the first one on (one is enough: an update
    that blows the weights up moves the loss by orders of magnitude, and the first update may be the one)."""
    last_good: int = -1
    """Record index of the last step whose loss was finite and in range (-1: none yet)."""

    def replay(self, records: Iterable[Mapping]) -> None:
        """Bring the guard to the end of ``records`` (a resumed run), raising nothing."""
        for r in records:
            self._observe(int(r["step"]), float(r["loss"]), bool(r["skipped"]))

    def check(self, step: int, loss: float, skipped: bool) -> str | None:
        """Observe record ``step``'s loss. Raises when the run must stop; returns a warning line for a NaN/inf step
        that is tolerated, else None."""
        verdict = self._observe(step, loss, skipped)
        if verdict == "diverged":
            raise DivergedError(self._diverged_message(step, loss))
        if verdict == "nonfinite":
            if self.streak >= self.max_nonfinite:
                raise NonFiniteLossError(self._streak_message(step))
            return (f"step {step + 1}: the loss is NaN/inf; no update was made ({self.streak} in a row, stopping "
                    f"at {self.max_nonfinite})")
        return None

    def _observe(self, step: int, loss: float, skipped: bool) -> str | None:
        if skipped or not math.isfinite(loss):
            self.streak += 1
            return "nonfinite"
        self.streak = 0
        if self.divergence_factor and self.average is not None and loss > self.divergence_factor * self.average:
            return "diverged"
        self.average = loss if self.average is None else SMOOTHING * self.average + (1 - SMOOTHING) * loss
        self.last_good = step
        return None

    @property
    def safe_step(self) -> int:
        """Steps done before the update that is suspect: the weights to continue from."""
        return max(self.last_good, 0)

    def _advice(self) -> str:
        safe = self.safe_step
        return (f"Continue from the weights after step {safe}, before that update, with a lower learning rate: "
                f"`{self.resume_command} --resume-from-step {safe} --set optim.lr={self.lr / 10:g}` (optim.lr is "
                f"now {self.lr:g}; --resume-from-step keeps the later log lines and snapshots in the run folder, "
                f"set aside). `zo2 replay {self.run_dir} --to {safe}` writes those weights out.")

    def _diverged_message(self, step: int, loss: float) -> str:
        return (f"The loss of step {step + 1} jumped to {loss:.4g}, more than train.divergence_factor = "
                f"{self.divergence_factor:g} times its recent average {self.average:.4g}: the update of step "
                f"{self.safe_step + 1} blew the weights up, and every later step would build on them, so zo2 stopped "
                f"the run. {self._advice()}")

    def _streak_message(self, step: int) -> str:
        first = step + 2 - self.streak
        return (f"The loss was NaN or inf for {self.streak} steps in a row (steps {first} to {step + 1}), so zo2 "
                "stopped the run; those steps made no update and no NaN weights were written. If the update of "
                f"step {self.safe_step + 1} (the last with a finite loss) blew the weights up, resuming as they are "
                f"fails again. {self._advice()} Lowering optim.eps or training in fp32 may help too; check the data "
                "for broken examples.")
