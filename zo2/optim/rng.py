"""Counter-based perturbation directions: the pure-torch reference.

The direction ``z`` used at a step is never stored. Element ``k`` of the parameter whose key is ``key``
(``param_key(name)``), under the step's direction seed ``seed``, is a pure function of ``(seed, key, k)``:

* Philox4x32-10 with key ``(k0, k1) = (seed, key)`` (32 bits each) and counter ``(m_lo, m_hi, 0, 0)``;
* **gaussian** (default): ``m = k // 4``; the four 32-bit outputs become uniforms
  ``u = |int32(x)| * 2**-31`` (negatives folded as ``-x-1``), clamped below at 1e-7, and two Box-Muller pairs
  ``(r cos 2πu₂, r sin 2πu₂)``, ``r = sqrt(-2 ln u₁)``, give elements ``4m .. 4m+3``;
* **rademacher**: ``m = k // 128``; output word ``(k // 32) % 4``, bit ``k % 32`` set gives +1, clear gives -1.

The mapping is fixed by this definition, not by a kernel's block size, so any slice of any parameter can be
regenerated alone on any device. It is the same function Triton's ``tl.randn4x(seed64, offset)`` computes
with ``seed64 = seed | key << 32`` and ``offset = m``, so the fused kernels in ``zo2_kernels`` agree with this
reference to float rounding (the transcendental functions differ in their last bits).
"""

from __future__ import annotations

import math
import zlib

import torch

from zo2.optim import native

DISTRIBUTIONS = ("gaussian", "rademacher")

_MASK32 = 0xFFFFFFFF
_PHILOX_A = 0xD2511F53
_PHILOX_B = 0xCD9E8D57
_KEY_A = 0x9E3779B9
_KEY_B = 0xBB67AE85
_ROUNDS = 10
_U32_TO_UNIFORM = 4.6566127342e-10  # 2**-31, as float32
_CHUNK = 1 << 16  # counters per pass: the int64 temporaries stay in cache (4x faster than 1 << 22 on CPU)


def param_key(name: str) -> int:
    """The 32-bit key of a parameter, from its name in ``model.named_parameters()``."""
    return zlib.crc32(name.encode("utf-8")) & _MASK32


def _splitmix64(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & 0xFFFFFFFFFFFFFFFF
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & 0xFFFFFFFFFFFFFFFF
    return x ^ (x >> 31)


def direction_seed(base_seed: int, step: int, direction: int = 0) -> int:
    """The 32-bit seed of direction ``direction`` at step ``step`` of a run seeded with ``base_seed``."""
    x = _splitmix64(int(base_seed) & 0xFFFFFFFFFFFFFFFF)
    x = _splitmix64(x ^ (int(step) & 0xFFFFFFFFFFFFFFFF))
    x = _splitmix64(x ^ (int(direction) & 0xFFFFFFFF))
    return x & _MASK32


def _mulhilo(a: int, c: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(hi, lo) 32-bit halves of a * c for a 32-bit constant ``a`` and int64 tensor ``c`` of uint32 values.

    The product needs 64 unsigned bits; int64 multiplication wraps modulo 2**64, so the bit pattern is the
    exact product and the halves are read off with a shift and masks (the known-answer test pins this).
    """
    p = c * a
    return (p >> 32) & _MASK32, p & _MASK32


def philox4x32(counters: torch.Tensor, k0: int, k1: int) -> tuple[torch.Tensor, ...]:
    """Philox4x32-10 of counters ``(m_lo, m_hi, 0, 0)`` for an int64 tensor ``counters`` of m >= 0.

    Returns the four output words as int64 tensors holding uint32 values.
    """
    c0 = counters & _MASK32
    c1 = counters >> 32
    c2 = torch.zeros_like(c0)
    c3 = torch.zeros_like(c0)
    k0 &= _MASK32
    k1 &= _MASK32
    for _ in range(_ROUNDS):
        hi_b, lo_b = _mulhilo(_PHILOX_B, c2)
        hi_a, lo_a = _mulhilo(_PHILOX_A, c0)
        c0, c1, c2, c3 = hi_b ^ c1 ^ k0, lo_b, hi_a ^ c3 ^ k1, lo_a
        k0 = (k0 + _KEY_A) & _MASK32
        k1 = (k1 + _KEY_B) & _MASK32
    return c0, c1, c2, c3


def _uniform(x: torch.Tensor) -> torch.Tensor:
    """uint32 (in int64) -> float32 uniform in [0, 1), as Triton's ``uint_to_uniform_float``."""
    # int32(x) < 0 folds to -int32(x) - 1 = 0xFFFFFFFF - x = x ^ 0xFFFFFFFF
    folded = torch.where(x >= 1 << 31, x ^ _MASK32, x)
    return folded.to(torch.float32) * torch.tensor(_U32_TO_UNIFORM, dtype=torch.float32)


def _box_muller(u1: torch.Tensor, u2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    u1 = torch.clamp(u1, min=1.0e-7)
    theta = u2 * torch.tensor(2.0 * math.pi, dtype=torch.float32)
    r = torch.sqrt(-2.0 * torch.log(u1))
    return r * torch.cos(theta), r * torch.sin(theta)


def _philox_range(m0: int, m1: int, seed: int, key: int, device) -> tuple[torch.Tensor, ...]:
    """The words of counters m0..m1: on the CPU from the compiled generator (zo2.optim.native; the same integers),
    else from :func:`philox4x32`."""
    if torch.device(device).type == "cpu":
        words = native.philox_range(m0, m1, seed, key)
        if words is not None:
            return words
    return philox4x32(torch.arange(m0, m1, dtype=torch.int64, device=device), seed, key)


def _gaussian_counters(m0: int, m1: int, seed: int, key: int, device) -> torch.Tensor:
    if torch.device(device).type == "cpu":
        vals = native.gaussian(m0, m1, seed, key)  # the same bits, from the compiled generator
        if vals is not None:
            return vals
    x0, x1, x2, x3 = _philox_range(m0, m1, seed, key, device)
    n0, n1 = _box_muller(_uniform(x0), _uniform(x1))
    n2, n3 = _box_muller(_uniform(x2), _uniform(x3))
    return torch.stack((n0, n1, n2, n3), dim=1).reshape(-1)


def _rademacher_counters(m0: int, m1: int, seed: int, key: int, device) -> torch.Tensor:
    if torch.device(device).type == "cpu":
        vals = native.rademacher(m0, m1, seed, key)
        if vals is not None:
            return vals
    words = torch.stack(_philox_range(m0, m1, seed, key, device), dim=1)  # [m, 4]
    bits = torch.arange(32, dtype=torch.int64, device=device)
    signs = (words.unsqueeze(-1) >> bits) & 1  # [m, 4, 32]
    return (signs.reshape(-1).to(torch.float32) * 2.0) - 1.0


_PER_COUNTER = {"gaussian": (4, _gaussian_counters), "rademacher": (128, _rademacher_counters)}


def direction(
    seed: int,
    key: int,
    numel: int,
    *,
    start: int = 0,
    count: int | None = None,
    distribution: str = "gaussian",
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Elements ``start .. start+count`` of the direction of parameter ``key`` (numel ``numel``) at ``seed``.

    Returns a flat float32 tensor. ``count`` defaults to the rest of the parameter.
    """
    if distribution not in _PER_COUNTER:
        raise ValueError(f"unknown distribution {distribution!r}; expected one of {DISTRIBUTIONS}")
    if count is None:
        count = numel - start
    if start < 0 or count < 0 or start + count > numel:
        raise ValueError(f"slice [{start}, {start + count}) is outside a parameter of {numel} elements")
    per, gen = _PER_COUNTER[distribution]
    device = torch.device(device) if device is not None else torch.device("cpu")
    out = torch.empty(count, dtype=torch.float32, device=device)
    first, last = start // per, (start + count + per - 1) // per
    pos = 0
    for m0 in range(first, last, _CHUNK):
        m1 = min(last, m0 + _CHUNK)
        vals = gen(m0, m1, seed, key, device)
        lo = max(start - m0 * per, 0)
        hi = min(start + count - m0 * per, vals.numel())
        out[pos : pos + hi - lo] = vals[lo:hi]
        pos += hi - lo
    return out
