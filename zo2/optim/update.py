"""The arithmetic of a step on one tensor, shared by every engine mode so they agree bit for bit.

Every mode (immediate or deferred update, resident or streamed, replay) calls these functions on the same
values in the same order; that is what makes their results bit-identical.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch

DirectionFn = Callable[[int], torch.Tensor]  # seed -> flat float32 z for this tensor (or slice)


def math_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype the step arithmetic runs in: float32, or float64 for float64 tensors."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def combined_direction(seeds: Sequence[int], coeffs: Sequence[float], z_of: DirectionFn,
                       dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Σ coeff_i z(seed_i), accumulated in ``dtype`` (the :func:`math_dtype` of θ) in the given order."""
    acc = None
    for seed, c in zip(seeds, coeffs):
        term = z_of(seed).to(dtype) * c
        acc = term if acc is None else acc.add_(term)
    return acc


def updated(theta: torch.Tensor, direction: torch.Tensor, lr: float, weight_decay: float) -> torch.Tensor:
    """θ − lr (d + λθ) for a flat θ and the combined direction d, in :func:`math_dtype` of θ."""
    t = theta.reshape(-1).to(math_dtype(theta.dtype))
    step = direction + t * weight_decay if weight_decay else direction
    return t - step * lr


def perturbed(theta: torch.Tensor, terms: Sequence[tuple[int, float]], eps: float, z_of: DirectionFn,
              out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """θ + ε Σ sign_i z(seed_i), out of place in :func:`math_dtype`, cast to ``out_dtype`` (default θ's dtype)."""
    out_dtype = out_dtype or theta.dtype
    if not terms:
        return theta if theta.dtype == out_dtype else theta.to(out_dtype)
    t = theta.reshape(-1).to(math_dtype(theta.dtype))
    acc = None
    for seed, sign in terms:
        term = z_of(seed).to(t.dtype) * (sign * eps)
        acc = term if acc is None else acc.add_(term)
    return (t + acc).to(out_dtype).reshape(theta.shape)
