"""Process-level guards that keep CPU results reproducible bit for bit.

**oneMKL's first-call race.** On x86 CPUs, ATen computes float unary ops (``sqrt``, ``log``, ``sin``, ``cos``,
``tanh``, ``erf``, ...) with MKL's vector math library, one call per intra-op thread on its chunk (the ops split
from 2048 elements). oneMKL picks each function's kernel (ISA and accuracy) lazily on that function's first call;
when the first call of a fresh process runs on several threads at once, one thread can run a low-accuracy kernel
for its whole chunk of that single call (errors of 1 ulp to ~1e-4 relative), while every later call is right
(pytorch/pytorch#188792, oneMKL 2024.2 as bundled in the torch wheels). For zo2 that silently broke determinism:
a direction ``z`` generated on CPU by a freshly started worker could differ from the same ``z`` generated
anywhere else, so a resumed or repaired run drifted from the uninterrupted one by a few ulps.

:func:`settle_cpu_math` calls every such op once on a one-element tensor (one thread, so the pick happens
without a race) for float32 and float64. ``import zo2`` runs it, before zo2 computes anything; a program that
runs these ops on many threads *before* importing zo2 can still hit the race in those calls.
"""

from __future__ import annotations

import torch

_UNARY_OPS = ("sqrt", "rsqrt", "reciprocal", "log", "log2", "log10", "log1p", "exp", "exp2", "expm1", "sin", "cos",
              "tan", "asin", "acos", "atan", "sinh", "cosh", "tanh", "asinh", "acosh", "atanh", "erf", "erfc",
              "erfinv", "lgamma", "digamma", "sigmoid", "trunc", "ceil", "floor", "round", "i0", "abs", "neg")
"""Float unary ops whose CPU kernels may call a lazily dispatched MKL vector-math function."""

_settled = False


def settle_cpu_math() -> list[str]:
    """Resolve the CPU math library's kernel choice for every float unary op, on this thread (idempotent).

    Returns the ops that were called (empty after the first call). Costs well under a millisecond.
    """
    global _settled
    if _settled:
        return []
    called = []
    with torch.no_grad():
        for dtype in (torch.float32, torch.float64):
            x = torch.full((1,), 0.5, dtype=dtype)  # inside every op's domain (acosh: see below)
            for name in _UNARY_OPS:
                op = getattr(torch, name, None)
                if op is None:
                    continue
                op(x + 1.0 if name == "acosh" else x)
                called.append(name)
    _settled = True
    return called
