"""The counter-based generator of the fused Triton kernels (:mod:`zo2_kernels.triton_kernels`), as @triton.jit
functions: Philox4x32-10 on 64-bit counters and its normals (Box–Muller with short float32 routines for
``-2·ln u`` and ``cos``/``sin`` of ``2πu``). The same functions as :mod:`zo2.optim.rng`; the kernels' module
docstring gives the element -> counter mapping and the accuracy of the routines.
"""

from __future__ import annotations

import os

import triton
import triton.language as tl

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
"""Whether the jit functions of this module (and of the kernels built on them) were created for the Triton
interpreter: read once, at import."""

# Philox4x32-10 constants (zo2.optim.rng). The generator is written out here rather than taken from
# triton.language.random, and tl.sum / tl.zeros are avoided, so the kernels call no jit'd *library* function:
# the interpreter only runs jit functions created while TRITON_INTERPRET=1 was set, and triton's own are created
# when triton is first imported, which a test cannot always precede. It is the same function as
# tl.randint4x / tl.randn4x, so results match either way.
_PHILOX_A = tl.constexpr(0xD2511F53)
_PHILOX_B = tl.constexpr(0xCD9E8D57)
_KEY_A = tl.constexpr(0x9E3779B9)
_KEY_B = tl.constexpr(0xBB67AE85)
_U32_TO_UNIFORM = tl.constexpr(4.6566127342e-10)  # 2**-31 as float32, as rng._uniform
_TWO_PI = tl.constexpr(6.283185307179586)

# Compiled (not interpreted) kernels use what the interpreter lacks or gets wrong: PTX inline assembly
# (_mulhilo) and the hardware float32 -> bfloat16 round-to-nearest-even conversion (the interpreter's own is
# inexact, so there _narrow rounds in integer arithmetic: the same function, torch's rule).
COMPILED = tl.constexpr(not INTERPRET)

# sin / cos of 2πu (u in [0, 1]) after reduction by quarter turns, r in [-π/4, π/4] (minimax fits, float32):
# sin r = r + r·s·(S1 + s(S2 + s·S3)), cos r = 1 + s(C1 + s(C2 + s(C3 + s·C4))), s = r².
_SIN1 = tl.constexpr(-0.16666655242443085)
_SIN2 = tl.constexpr(0.008332155644893646)
_SIN3 = tl.constexpr(-0.00019514630548655987)
_COS1 = tl.constexpr(-0.5)
_COS2 = tl.constexpr(0.04166662320494652)
_COS3 = tl.constexpr(-0.001388675533235073)
_COS4 = tl.constexpr(2.438963383610826e-05)
# π/2 in two parts (Cody-Waite): _PIO2_A has 21 significant bits, so j·_PIO2_A is exact for the quadrants
# j <= 4 used here with or without FMA (the interpreter has none), and θ − j·_PIO2_A is exact (Sterbenz);
# |π/2 − A − B| < 6e-15.
_PIO2_A = tl.constexpr(1.570796012878418)
_PIO2_B = tl.constexpr(3.1391647326017846e-07)
_ROUND_MAGIC = tl.constexpr(12582912.0)  # 1.5·2**23: x + M − M rounds x (|x| < 2**22) to an integer
# -2·ln(1 + f), f in [√½ − 1, √2 − 1], written in n = −2f: n + n²·P(n), P(n) = Σ L_k n^k; L_k is the minimax
# coefficient of f^(k+2) in ln(1 + f) scaled by (−½)^(k+1) (exact: a power of two).
_LN0 = tl.constexpr(0.24999994039535522)
_LN1 = tl.constexpr(0.08333331346511841)
_LN2 = tl.constexpr(0.03125197812914848)
_LN3 = tl.constexpr(0.012501236982643604)
_LN4 = tl.constexpr(0.005190339870750904)
_LN5 = tl.constexpr(0.0022158976644277573)
_LN6 = tl.constexpr(0.0010345963528379798)
_LN7 = tl.constexpr(0.0005040917894802988)
_LN8 = tl.constexpr(0.00014887710858602077)
_MINUS_2_LN2_2M23 = tl.constexpr(-1.3862943611198906 / 8388608)  # −2·ln 2 · 2**-23


# PTX of _mulhilo: the high and low words of a 32x32 -> 64-bit product by each Philox multiplier.
_MULWIDE_A = tl.constexpr("{ .reg .b64 p; mul.wide.u32 p, $2, 3528531795; mov.b64 {$1, $0}, p; }")
_MULWIDE_B = tl.constexpr("{ .reg .b64 p; mul.wide.u32 p, $2, 3449720151; mov.b64 {$1, $0}, p; }")


@triton.jit
def _mulhilo(a, B: tl.constexpr, PTX: tl.constexpr):
    """(high, low) 32-bit halves of the 64-bit product ``a·B`` (uint32 ``a``; ``PTX`` computes the same).

    Compiled: one ``mul.wide.u32`` (one IMAD.WIDE.U32). Written as a uint64 product instead, the compiler merges
    the surrounding 32-bit xors into 64-bit ones and multiplies in 64 bits (more instructions).
    """
    if COMPILED:
        return tl.inline_asm_elementwise(PTX, "=r,=r,r", [a], dtype=(tl.uint32, tl.uint32), is_pure=True,
                                         pack=1)
    else:
        p = a.to(tl.uint64) * B
        return (p >> 32).to(tl.uint32), p.to(tl.uint32)


@triton.jit
def counter(b, off):
    """``(low, high)`` uint32 words of the 64-bit counter ``b + off`` (int64 scalar ``b``, int32 tensor
    ``off`` >= 0), in 32-bit arithmetic per element (an add and a carry instead of 64-bit adds and shifts)."""
    off32 = off.to(tl.uint32)
    lo = b.to(tl.uint32) + off32  # wraps modulo 2**32
    hi = (b >> 32).to(tl.uint32) + (lo < off32).to(tl.uint32)  # + carry
    return lo, hi


@triton.jit
def philox(seed_lo, seed_hi, m_lo, m_hi):
    """Philox4x32-10 of counters ``(m_lo, m_hi, 0, 0)`` (uint32 tensors) under key ``(seed_lo, seed_hi)``.

    Returns the four uint32 output words, as ``rng.philox4x32``.
    """
    c0 = m_lo
    c1 = m_hi
    c2 = c0 * 0
    c3 = c0 * 0
    k0 = seed_lo
    k1 = seed_hi
    for _ in tl.static_range(10):
        hi_b, lo_b = _mulhilo(c2, _PHILOX_B, _MULWIDE_B)
        hi_a, lo_a = _mulhilo(c0, _PHILOX_A, _MULWIDE_A)
        c0 = hi_b ^ c1 ^ k0
        c2 = hi_a ^ c3 ^ k1
        c1 = lo_b
        c3 = lo_a
        k0 = k0 + _KEY_A
        k1 = k1 + _KEY_B
    return c0, c1, c2, c3


@triton.jit
def _uniform(x):
    """uint32 -> float32 in [0, 1]: |int32(x)| * 2**-31 with negatives folded as -x-1 (rng._uniform)."""
    xi = x.to(tl.int32, bitcast=True)
    xi = xi ^ (xi >> 31)  # arithmetic shift: ~xi for negatives
    return xi.to(tl.float32) * _U32_TO_UNIFORM


@triton.jit
def _minus_2_log(u):
    """-2·ln(u) for float32 ``u`` in [1e-7, 1] (normal, positive: no special cases), to about one ulp."""
    bits = u.to(tl.int32, bitcast=True)
    t = bits - 0x3F3504F3  # u = 2**e · m with m in [√½, √2)
    e_bits = t & -8388608  # e << 23
    m = (bits - e_bits).to(tl.float32, bitcast=True)
    e = e_bits.to(tl.float32)  # 2**23 · e, exact (few significant bits): scaled back in the constant below
    n = tl.fma(m, -2.0, 2.0)  # −2(m − 1), exact
    p = tl.fma(n, _LN8, _LN7)
    p = tl.fma(n, p, _LN6)
    p = tl.fma(n, p, _LN5)
    p = tl.fma(n, p, _LN4)
    p = tl.fma(n, p, _LN3)
    p = tl.fma(n, p, _LN2)
    p = tl.fma(n, p, _LN1)
    p = tl.fma(n, p, _LN0)
    return tl.fma(e, _MINUS_2_LN2_2M23, tl.fma(n, n * p, n))


@triton.jit
def _cos_sin_2pi(u):
    """``(cos θ, sin θ)`` of ``θ = float32(2π·u)`` (rng._box_muller's angle), ``u`` in [0, 1].

    One reduction by quarter turns for both values: the quadrant is ``j = rint(4u)`` and ``r = θ − j·π/2``
    (|r| <= π/4 up to rounding), then short polynomials; within about one ulp of the correctly rounded values.
    """
    th = _TWO_PI * u
    t = tl.fma(u, 4.0, _ROUND_MAGIC)  # low mantissa bits of t: j
    j = t - _ROUND_MAGIC
    r = tl.fma(j, -_PIO2_A, th)
    r = tl.fma(j, -_PIO2_B, r)
    s = r * r
    ps = tl.fma(s, _SIN3, _SIN2)
    ps = tl.fma(s, ps, _SIN1)
    sin_r = tl.fma(r * s, ps, r)
    pc = tl.fma(s, _COS4, _COS3)
    pc = tl.fma(s, pc, _COS2)
    pc = tl.fma(s, pc, _COS1)
    cos_r = tl.fma(s, pc, 1.0)
    # quadrant j mod 4: (cos θ, sin θ) = (c, s), (−s, c), (−c, −s), (s, −c)
    q = t.to(tl.int32, bitcast=True)
    odd = (q & 1) != 0
    c = tl.where(odd, sin_r, cos_r).to(tl.int32, bitcast=True)
    sn = tl.where(odd, cos_r, sin_r).to(tl.int32, bitcast=True)
    c = c ^ (((q << 30) ^ (q << 31)) & -2147483648)  # negative in quadrants 1, 2
    sn = sn ^ ((q << 30) & -2147483648)  # negative in quadrants 2, 3
    return c.to(tl.float32, bitcast=True), sn.to(tl.float32, bitcast=True)


@triton.jit
def _box_muller(x1, x2, scale):
    """Two normals from two uint32 words (rng._uniform then rng._box_muller), times ``scale``.

    ``scale`` multiplies the radius (one product per pair instead of one per normal): ``(r·scale)·cos θ``
    differs from ``(r·cos θ)·scale`` by rounding only, and is exactly ``r·cos θ`` for ``scale = 1``.
    """
    u1 = tl.maximum(1.0e-7, _uniform(x1))
    r = tl.sqrt(_minus_2_log(u1)) * scale
    c, s = _cos_sin_2pi(_uniform(x2))
    return r * c, r * s


@triton.jit
def randn4(seed_lo, seed_hi, m_lo, m_hi, scale):
    """The four normals of counter ``m`` (elements 4m .. 4m+3 of a gaussian direction), times ``scale``."""
    x0, x1, x2, x3 = philox(seed_lo, seed_hi, m_lo, m_hi)
    n0, n1 = _box_muller(x0, x1, scale)
    n2, n3 = _box_muller(x2, x3, scale)
    return n0, n1, n2, n3
