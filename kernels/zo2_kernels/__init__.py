"""zo2_kernels: fused perturbation / update kernels on flat, segmented parameter buffers.

Two backends with identical function signatures:

* ``"triton"`` (:mod:`zo2_kernels.triton_ops`): one launch per block, θ read once, z regenerated in
  registers; needs Triton and a CUDA device, or ``TRITON_INTERPRET=1`` (CPU tensors, slow; tests only);
* ``"torch"`` (:mod:`zo2_kernels.reference`): the reference, built on :mod:`zo2.optim.rng` and
  :mod:`zo2.optim.update`; any device.

Each backend exposes::

    direction(seed, key, start, count, distribution="gaussian", *, device=None) -> float32 [count]
    perturb_pair(theta, segments, seed, eps, distribution="gaussian", *, out_plus=None, out_minus=None)
        -> (theta_plus, theta_minus)
    update(theta, segments, seeds, coeffs, lr, weight_decay, distribution="gaussian", *,
           stochastic_rounding_seed=None, out=None) -> theta_new
    update_and_perturb(theta, segments, prev_seeds, prev_coeffs, lr, weight_decay, seed, eps,
                       distribution="gaussian", *, stochastic_rounding_seed=None, out=None, out_plus=None,
                       out_minus=None) -> (theta_new, theta_plus, theta_minus)
    stochastic_round(x_fp32, dtype, seed, key, offset=0) -> dtype [n]

Pick one with :func:`get_backend`; describe a block's buffer with a :class:`SegmentTable` built once and reused
(the Triton backend caches its device copy on the table).
"""

from __future__ import annotations

import importlib
import importlib.util
import os
from types import ModuleType

import torch

from . import reference
from .segments import Segment, SegmentTable

__all__ = ["Segment", "SegmentTable", "available", "get_backend", "reference", "BACKENDS"]

BACKENDS = ("auto", "triton", "torch")


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _triton_importable() -> bool:
    return importlib.util.find_spec("triton") is not None


def available() -> bool:
    """Whether the Triton backend can run here: Triton importable and a CUDA device, or TRITON_INTERPRET=1."""
    if not _triton_importable():
        return False
    return _interpreting() or torch.cuda.is_available()


def _why_unavailable(device: torch.device | None) -> str | None:
    """None when the Triton backend can run on ``device``, else the reason."""
    if not _triton_importable():
        return "triton is not installed (pip install 'zo2[kernels]')"
    if _interpreting():
        if device is not None and device.type != "cpu":
            return "TRITON_INTERPRET=1 runs kernels on CPU tensors only"
        return None
    if not torch.cuda.is_available():
        return "no CUDA device (set TRITON_INTERPRET=1 to run the kernels on CPU, slowly, for tests)"
    if device is not None and device.type != "cuda":
        return f"the Triton kernels run on CUDA tensors, not on {device}"
    return None


def get_backend(name: str = "auto", device: torch.device | str | None = None) -> ModuleType:
    """The module implementing the kernels: ``"triton"``, ``"torch"``, or ``"auto"``.

    ``"auto"`` picks Triton for a CUDA ``device`` (or no device given, when CUDA is available) if it can run,
    else the torch reference; it never picks the (slow) interpreter. ``"triton"`` raises ``RuntimeError``
    saying why when the Triton backend cannot run on ``device``.
    """
    if name not in BACKENDS:
        raise ValueError(f"unknown kernel backend {name!r}; expected one of {BACKENDS}")
    dev = torch.device(device) if device is not None else None
    if name == "torch":
        return reference
    if name == "auto":
        on_cuda = dev.type == "cuda" if dev is not None else torch.cuda.is_available()
        if on_cuda and not _interpreting() and _why_unavailable(dev) is None:
            return importlib.import_module(".triton_ops", __name__)
        return reference
    reason = _why_unavailable(dev)
    if reason is not None:
        raise RuntimeError(f"kernel backend 'triton' requested but unavailable: {reason}")
    return importlib.import_module(".triton_ops", __name__)
