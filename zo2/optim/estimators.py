"""Zeroth-order gradient estimators behind one interface.

An estimator says which perturbed points a step evaluates (``points``) and turns their losses into an
:class:`Update` (``combine``). A point is ``θ + ε Σ sign_i z(seed_i)``; an update is
``θ ← θ − lr (Σ coeff_i z(seed_i) + λ θ)``. Everything a step must communicate or save is the update's
(step, seeds, coeffs, lr): a few bytes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

from zo2.optim.rng import direction_seed

ESTIMATORS = ("central", "forward")


@dataclass(frozen=True)
class Point:
    """The parameters ``θ + eps * Σ sign * z(seed)`` over ``terms = ((seed, sign), ...)``; no terms is θ itself.

    With ``after`` set (and no terms): θ after that update, as applying it would store it (the candidates a
    conservative step compares).
    """

    terms: tuple[tuple[int, float], ...]
    after: "Update | None" = None


@dataclass(frozen=True)
class Update:
    """``θ ← θ − lr (Σ coeff_i z(seed_i) + weight_decay · θ)``: the step-``step`` update."""

    step: int
    seeds: tuple[int, ...]
    coeffs: tuple[float, ...]
    lr: float

    def to_dict(self) -> dict:
        return {"step": self.step, "seeds": list(self.seeds), "coeffs": list(self.coeffs), "lr": self.lr}

    @classmethod
    def from_dict(cls, d: dict) -> "Update":
        return cls(int(d["step"]), tuple(int(s) for s in d["seeds"]), tuple(float(c) for c in d["coeffs"]),
                   float(d["lr"]))


@dataclass(frozen=True)
class Estimate:
    """What ``combine`` returns: the update and the scalars a step reports."""

    update: Update
    projected_grad: float
    loss: float
    loss_plus: float
    loss_minus: float


class Estimator:
    """Base class: ``q`` directions per step, seeds derived from (base seed, step, direction index)."""

    name = ""

    def __init__(self, base_seed: int, eps: float, q: int = 1):
        self.base_seed = base_seed
        self.eps = eps
        self.q = q

    def seeds(self, step: int) -> list[int]:
        return [direction_seed(self.base_seed, step, i) for i in range(self.q)]

    def points(self, step: int) -> list[Point]:
        raise NotImplementedError

    def combine(self, step: int, losses: Sequence[float], lr: float) -> Estimate:
        raise NotImplementedError


class CentralEstimator(Estimator):
    """Two-sided SPSA (MeZO): L± = L(θ ± εz), g = (L+ − L-)/2ε, averaged over q directions."""

    name = "central"

    def points(self, step: int) -> list[Point]:
        return [Point(((s, sign),)) for s in self.seeds(step) for sign in (1.0, -1.0)]

    def combine(self, step: int, losses: Sequence[float], lr: float) -> Estimate:
        plus, minus = losses[0::2], losses[1::2]
        grads = [(lp - lm) / (2.0 * self.eps) for lp, lm in zip(plus, minus)]
        update = Update(step, tuple(self.seeds(step)), tuple(g / self.q for g in grads), lr)
        lp, lm = math.fsum(plus) / self.q, math.fsum(minus) / self.q
        return Estimate(update, math.fsum(grads) / self.q, (lp + lm) / 2.0, lp, lm)


class ForwardEstimator(Estimator):
    """One-sided differences: L0 = L(θ), L_i = L(θ + εz_i), g_i = (L_i − L0)/ε, averaged over q directions."""

    name = "forward"

    def points(self, step: int) -> list[Point]:
        return [Point(())] + [Point(((s, 1.0),)) for s in self.seeds(step)]

    def combine(self, step: int, losses: Sequence[float], lr: float) -> Estimate:
        base, plus = losses[0], losses[1:]
        grads = [(lp - base) / self.eps for lp in plus]
        update = Update(step, tuple(self.seeds(step)), tuple(g / self.q for g in grads), lr)
        return Estimate(update, math.fsum(grads) / self.q, base, math.fsum(plus) / self.q, base)


def build_estimator(name: str, base_seed: int, eps: float, q: int = 1) -> Estimator:
    classes = {"central": CentralEstimator, "forward": ForwardEstimator}
    if name not in classes:
        raise ValueError(f"unknown estimator {name!r}; expected one of {ESTIMATORS}")
    return classes[name](base_seed, eps, q)
