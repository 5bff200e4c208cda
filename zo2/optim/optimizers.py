"""Zeroth-order optimizers: how a step's estimate moves θ.

A step's :class:`~zo2.optim.estimators.Update` carries the gradient estimate ĝ = Σ cᵢ z(seedᵢ) (the q directions'
projected gradients already averaged into the cᵢ) and the learning rate η. Every optimizer applies

    θ ← θ − η (D + λθ)        (λ: optim.weight_decay, skipped for biases and norms; decoupled from D)

with its own direction D, computed per element in float32 (float64 for float64 weights):

==========================  ===================================================================  ====================
optimizer                   D                                                                    state per element
==========================  ===================================================================  ====================
``zo-sgd`` (MeZO-SGD)       ĝ                                                                    none
``zo-sgd-momentum``         m ← μ m + ĝ;  D = m                                                  ``momentum``
``zo-sgd-sign``             sign(ĝ), element-wise; or (sign_mode 'projected') Σᵢ sign(cᵢ) zᵢ / q    none
``zo-sgd-conservative``     ĝ, with η replaced by +η, −η or 0: the best of θ − η(ĝ + λθ),       none
                            θ + η(ĝ + λθ) and θ by loss on the step's batch
``zo-adam``                 m ← β₁ m + (1−β₁) ĝ;  v ← β₂ v + (1−β₂) ĝ²;                           ``exp_avg``,
                            D = (m / (1−β₁ᵗ)) / (√(v / (1−β₂ᵗ)) + ε_adam)                        ``exp_avg_sq``
==========================  ===================================================================  ====================

t is the number of updates applied to the state so far, this one included (skipped steps do not count). The
state starts at zero. ``zo-sgd`` and ``zo-sgd-conservative`` are plain SGD steps and run on the fused update
kernels of :mod:`zo2_kernels`; the others run the torch code here on a unit's flat buffer, segment by segment
(a :class:`~zo2_kernels.SegmentTable`), on any device. The same function on the same values in the same order is
what keeps immediate, deferred, resident, streamed and replayed updates bit-identical.

Updates stay a few bytes (step, seeds, coeffs, lr); a stateful optimizer's step also depends on its state, so
replaying a trajectory must start from a snapshot that holds the state (``ZOEngine.trainable_state``) and apply
the logged steps in order.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Mapping

import torch

from zo2.optim.estimators import Update
from zo2.optim.rng import direction
from zo2.optim.rounding import stochastic_round
from zo2.optim.update import combined_direction, math_dtype, updated

OPTIMIZERS = ("zo-sgd", "zo-sgd-momentum", "zo-sgd-sign", "zo-sgd-conservative", "zo-adam")
SIGN_MODES = ("elementwise", "projected")


@dataclass
class UnitState:
    """One unit's optimizer state: flat buffers laid out like the unit's parameter buffer, and the number of
    updates applied to them."""

    buffers: dict[str, torch.Tensor]
    count: int = 0


class ZOOptimizer:
    """Base class: the update rule on a flat buffer. Subclasses set the class attributes and :meth:`direction`."""

    name = ""
    state_names: tuple[str, ...] = ()
    """Names of the flat state buffers every unit keeps (empty: stateless)."""
    fused = False
    """The step is plain SGD: the fused update kernels apply it (and nothing here runs)."""
    conservative = False
    """The step evaluates θ − η(ĝ + λθ) and θ + η(ĝ + λθ) and keeps the best of those and θ."""

    def state_bytes(self, dtype: torch.dtype) -> int:
        """Bytes of state per parameter element of ``dtype``."""
        return len(self.state_names) * torch.empty((), dtype=math_dtype(dtype)).element_size()

    def direction(self, g: torch.Tensor, state: Mapping[str, torch.Tensor], t: int) -> torch.Tensor:
        """D for one segment from its estimate ``g``; updates the segment's ``state`` views in place."""
        raise NotImplementedError

    @torch.no_grad()
    def apply(self, theta: torch.Tensor, table, state: UnitState | None, update: Update, weight_decay: float,
              distribution: str = "gaussian", stochastic_rounding_seed: int | None = None, kernels=None) -> None:
        """θ ← θ − lr (D + λθ) in place on the flat buffer ``theta`` described by ``table`` (a SegmentTable).

        bf16/fp16 weights are rounded stochastically with ``stochastic_rounding_seed`` (as the update kernels do).
        ``kernels`` (a zo2_kernels backend; default: the definition in zo2.optim.rng, which the torch reference
        runs) generates z, so the update uses the very directions the perturbations of the same backend used.
        """
        buffers = state.buffers if state is not None else {}
        t = (state.count if state is not None else 0) + 1
        flat = theta.view(-1)
        dtype = math_dtype(flat.dtype)
        for seg in table:
            z_of = _segment_direction(kernels, seg, distribution, flat.device)
            g = combined_direction(update.seeds, update.coeffs, z_of, dtype)
            if g is None:  # no directions: no step
                continue
            views = {n: b[seg.offset : seg.end] for n, b in buffers.items()}
            d = self.direction(g, views, t)
            value = updated(flat[seg.offset : seg.end], d, update.lr, weight_decay if seg.decay else 0.0)
            if stochastic_rounding_seed is not None and flat.dtype in (torch.bfloat16, torch.float16):
                value = stochastic_round(value, flat.dtype, int(stochastic_rounding_seed), seg.key, seg.start)
            flat[seg.offset : seg.end] = value.to(flat.dtype)
        if state is not None:
            state.count = t


def _segment_direction(kernels, seg, distribution: str, device: torch.device):
    """seed -> the float32 direction over segment ``seg`` (elements start..start+numel of parameter seg.key)."""
    if kernels is None:
        return lambda seed: direction(int(seed), seg.key, seg.start + seg.numel, start=seg.start, count=seg.numel,
                                      distribution=distribution, device=device)
    return lambda seed: kernels.direction(int(seed), seg.key, seg.start, seg.numel, distribution, device=device)


class ZOSGD(ZOOptimizer):
    """MeZO-SGD: D = ĝ."""

    name = "zo-sgd"
    fused = True

    def direction(self, g, state, t):
        return g


class ZOSGDConservative(ZOSGD):
    """MeZO-SGD whose step is kept only where it lowers the loss (see :func:`conservative_scale`)."""

    name = "zo-sgd-conservative"
    conservative = True


class ZOSGDMomentum(ZOOptimizer):
    """Heavy-ball momentum on the estimate: m ← μ m + ĝ, D = m."""

    name = "zo-sgd-momentum"
    state_names = ("momentum",)

    def __init__(self, momentum: float):
        self.momentum = momentum

    def direction(self, g, state, t):
        m = state["momentum"]
        m.mul_(self.momentum).add_(g)
        return m


class ZOSGDSign(ZOOptimizer):
    """Sign descent. 'elementwise': D = sign(ĝ) per element (sign(g)·sign(z) for one direction). 'projected': the
    sign of each direction's projected gradient times that direction, averaged: D = Σᵢ sign(cᵢ) zᵢ / q (ZO-Bench's
    zo_sign_opt, sign(g)·z for one direction): a plain SGD step on the sign-transformed coefficients."""

    name = "zo-sgd-sign"

    def __init__(self, mode: str = "elementwise"):
        if mode not in SIGN_MODES:
            raise ValueError(f"unknown sign mode {mode!r}; expected one of {SIGN_MODES}")
        self.mode = mode

    def apply(self, theta, table, state, update, *args, **kwargs) -> None:
        if self.mode == "projected":
            q = len(update.coeffs)
            update = replace(update, coeffs=tuple(math.copysign(1.0, c) / q if c else 0.0 for c in update.coeffs))
        super().apply(theta, table, state, update, *args, **kwargs)

    def direction(self, g, state, t):
        return g if self.mode == "projected" else torch.sign(g)


class ZOAdam(ZOOptimizer):
    """Adam on the estimate, with bias correction; weight decay decoupled (θ ← θ − η(D + λθ))."""

    name = "zo-adam"
    state_names = ("exp_avg", "exp_avg_sq")

    def __init__(self, beta1: float, beta2: float, eps: float):
        self.beta1, self.beta2, self.eps = beta1, beta2, eps

    def direction(self, g, state, t):
        m, v = state["exp_avg"], state["exp_avg_sq"]
        m.mul_(self.beta1).add_(g, alpha=1.0 - self.beta1)
        v.mul_(self.beta2).addcmul_(g, g, value=1.0 - self.beta2)
        m_hat = m / (1.0 - self.beta1**t)
        v_hat = v / (1.0 - self.beta2**t)
        return m_hat / (torch.sqrt(v_hat) + self.eps)


def state_names_of(name: str) -> tuple[str, ...]:
    """The state buffers optimizer ``name`` keeps per weight element (float32, as a ZOOptimizer's ``state_names``)."""
    classes = {"zo-sgd": ZOSGD, "zo-sgd-conservative": ZOSGDConservative, "zo-sgd-momentum": ZOSGDMomentum,
               "zo-sgd-sign": ZOSGDSign, "zo-adam": ZOAdam}
    return classes[name].state_names


def build_optimizer(config) -> ZOOptimizer:
    """The optimizer named by ``config.optimizer`` (a ZOConfig), with its hyper-parameters."""
    name = config.optimizer
    if name == "zo-sgd":
        return ZOSGD()
    if name == "zo-sgd-conservative":
        return ZOSGDConservative()
    if name == "zo-sgd-momentum":
        return ZOSGDMomentum(config.momentum)
    if name == "zo-sgd-sign":
        return ZOSGDSign(getattr(config, "sign_mode", "elementwise"))
    if name == "zo-adam":
        return ZOAdam(config.beta1, config.beta2, config.adam_eps)
    raise ValueError(f"unknown optimizer {name!r}; expected one of {OPTIMIZERS}")


def conservative_scale(loss: float, loss_descent: float, loss_ascent: float) -> float:
    """The factor on η that ``zo-sgd-conservative`` keeps: 1.0 for θ − η(ĝ + λθ) (loss ``loss_descent``), -1.0 for
    θ + η(ĝ + λθ) (``loss_ascent``), 0.0 for θ itself (``loss``): the smallest loss, ties going to the descent step,
    then to θ. A non-finite candidate loss is never chosen."""
    def key(x: float) -> float:
        return x if math.isfinite(x) else math.inf

    best = min((key(loss_descent), 0, 1.0), (key(loss), 1, 0.0), (key(loss_ascent), 2, -1.0))
    return best[2]


def check_supported(optimizer: ZOOptimizer, *, comm=None) -> None:
    """ConfigError naming the fix when ``optimizer`` cannot run in the engine's mode."""
    from zo2.errors import ConfigError

    if optimizer.conservative and comm is not None and comm.dims.pp > 1:
        raise ConfigError("optim.optimizer = 'zo-sgd-conservative' evaluates an odd number of points per step, "
                          "which perturbation parallelism cannot split; set parallel.pp = 1 (data parallelism "
                          "works).")
