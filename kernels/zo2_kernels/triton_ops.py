"""Fused Triton kernels for MeZO perturbation and (deferred) update on flat, segmented parameter buffers.

One launch covers a whole block: the grid has one program per *tile* of ``BLOCK`` elements of some segment,
and each program finds its segment in the (tiny) segment table. With ``programs_per_sm=k`` (perturb / update
kernels) the grid is instead ``k`` programs per multiprocessor that walk the tiles, each loading its next tile
while working on the current one (results are the same bit for bit). Every kernel is the same generic kernel
(:func:`_zo_kernel`) specialised by constexpr flags, so there is one implementation of the tile walk, of the
element -> counter mapping and of the arithmetic.

**Element -> counter mapping** (the definition in :mod:`zo2.optim.rng`, independent of ``BLOCK``): a tile is
viewed as a ``[C, 16, 8]`` tensor, ``C = BLOCK // 128``; element ``(c, q, i)`` is parameter element
``k = base + 128c + 8q + i`` where ``base`` (a multiple of 128) is the tile's first parameter element.

* gaussian: ``k // 4 = base/4 + 32c + 2q + i//4``: two ``randn4x``-style calls on the ``[C, 16]`` counters
  ``base/4 + 32c + 2q`` and ``... + 1`` give the 8 normals of a row, 4 per Philox call, none wasted; the eight
  ``[C, 16]`` results become the row by ``tl.join`` (each join adds a trailing in-register axis), so each
  thread's 16-byte vector is filled from its own registers with no selects or data movement;
* rademacher: ``k // 128 = base/128 + c``: one Philox call on ``[C]`` counters; word ``q // 4``, bit
  ``8(q % 4) + i`` — one 32-bit word feeds 32 elements;
* stochastic rounding: word ``k % 4`` at counter ``k // 4 + 2**62`` (see :mod:`zo2_kernels.reference`), two
  Philox calls per row like the gaussian layout.

**Arithmetic.** Identical to :mod:`zo2.optim.update`, operation for operation, in float32; kernels are
compiled with ``enable_fp_fusion=False`` so no multiply-add is contracted into an FMA and the roundings are the
torch reference's. Rademacher results are bit-identical to the reference (``z·s`` is formed as ``±s`` by a
sign-bit flip, which is exactly the product). Gaussian ones differ only through the last bits of log/sin/cos:
the kernels evaluate Box–Muller with their own short routines (``-2·ln u`` by exponent split and a polynomial;
``cos``/``sin`` of ``2πu`` from one quarter-turn reduction shared by both; about one ulp each, so ``z`` stays
within ~5e-7 of the reference, as close as libdevice's functions were) in about half the instructions of the
library calls. Low-precision inputs are widened to float32 before any arithmetic (also required by the Triton
interpreter, whose bfloat16 arithmetic is wrong) and rounded once on store (round to nearest even: the
hardware conversion when compiled, integer arithmetic under the interpreter).

**Cost** (static count of sm_90 instructions per element, bf16, one tile of 2048 per 4 warps; the kernels
have no branches, so it is also the executed count): gaussian ``perturb_pair`` ~50, rademacher ~19,
``update_and_perturb`` (q = 1) ~92 / ~33 — against ~103 (gaussian, fast paths only) and ~36 before the
routines above, the hardware bf16 rounding and the 64-bit Philox products (``_mulhilo``). See
``benchmarks/kernel_sass.py``.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from .reference import LOW_PRECISION, SR_COUNTER_TAG, Coeffs, Seeds, Segments, _check_distribution, _out_like
from .segments import COL_BASE, COL_DECAY, COL_KEY, COL_NUMEL, COL_OFFSET, COL_START, SegmentTable

BACKEND = "triton"

# Tile size (elements) and warps per program; a power-of-two multiple of 128 (a tile holds whole counters).
# Chosen from `benchmarks/bench_kernels.py --sweep` on an H200 (benchmarks/results/2026-11-26b-h200/sweep2.log): 2 warps
# per program beat 4, 8 and 16 for every kernel; perturb_pair and update are fastest at 2048 elements per program
# (32 per thread), update_and_perturb (one more stream) at 1024; tiles of 4096 and more run about 2x slower.
DEFAULT_BLOCK = 2048
DEFAULT_NUM_WARPS = 2
UPDATE_PERTURB_BLOCK = 1024
# 0: one program per tile. k > 0: k persistent programs per multiprocessor, each prefetching its next tile's θ
# while it works on the current one (perturb / update kernels). Chosen by `benchmarks/bench_kernels.py --sweep`.
DEFAULT_PROGRAMS_PER_SM = 0
MAX_SEEDS = 64  # q directions per update; bounds the static unroll of the seed loop

_MODE_DIRECTION, _MODE_PERTURB, _MODE_UPDATE, _MODE_UPDATE_PERTURB = 0, 1, 2, 3
_SR_NONE, _SR_BF16, _SR_FP16 = 0, 1, 2

_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
# Storage dtypes the kernels read and write (math is float32: float64 stays with the torch reference).
_KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)

# Globals read inside @triton.jit functions must be constexpr.
_SR_TAG = tl.constexpr(SR_COUNTER_TAG)
_C_OFFSET = tl.constexpr(COL_OFFSET)
_C_NUMEL = tl.constexpr(COL_NUMEL)
_C_KEY = tl.constexpr(COL_KEY)
_C_DECAY = tl.constexpr(COL_DECAY)
_C_START = tl.constexpr(COL_START)
_C_BASE = tl.constexpr(COL_BASE)


# ===================================================================================================== jit
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
_COMPILED = tl.constexpr(not _INTERPRET)

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
    if _COMPILED:
        return tl.inline_asm_elementwise(PTX, "=r,=r,r", [a], dtype=(tl.uint32, tl.uint32), is_pure=True,
                                         pack=1)
    else:
        p = a.to(tl.uint64) * B
        return (p >> 32).to(tl.uint32), p.to(tl.uint32)


@triton.jit
def _counter(b, off):
    """``(low, high)`` uint32 words of the 64-bit counter ``b + off`` (int64 scalar ``b``, int32 tensor
    ``off`` >= 0), in 32-bit arithmetic per element (an add and a carry instead of 64-bit adds and shifts)."""
    off32 = off.to(tl.uint32)
    lo = b.to(tl.uint32) + off32  # wraps modulo 2**32
    hi = (b >> 32).to(tl.uint32) + (lo < off32).to(tl.uint32)  # + carry
    return lo, hi


@triton.jit
def _philox(seed_lo, seed_hi, m_lo, m_hi):
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
def _randn4(seed_lo, seed_hi, m_lo, m_hi, scale):
    """The four normals of counter ``m`` (elements 4m .. 4m+3 of a gaussian direction), times ``scale``."""
    x0, x1, x2, x3 = _philox(seed_lo, seed_hi, m_lo, m_hi)
    n0, n1 = _box_muller(x0, x1, scale)
    n2, n3 = _box_muller(x2, x3, scale)
    return n0, n1, n2, n3


@triton.jit
def _add(a, b):
    """Combine function of a sum (``tl.sum`` itself is a jit'd library function; see ``_philox``)."""
    return a + b


@triton.jit
def _row8(a0, a1, a2, a3, b0, b1, b2, b3, C: tl.constexpr):
    """``[C, 16, 8]`` rows ``(a0, a1, a2, a3, b0, b1, b2, b3)`` from eight ``[C, 16]`` tensors.

    Joins only (each adds a trailing in-register axis): element ``4h + 2j + k`` is built as index
    ``[h, j, k]``, so the values land where the rows' 16-byte vectors are, with no data movement.
    """
    x00 = tl.join(a0, b0)  # [.., h] of w = 0 (j = 0, k = 0)
    x01 = tl.join(a2, b2)  # w = 2 (j = 1, k = 0)
    x10 = tl.join(a1, b1)  # w = 1 (j = 0, k = 1)
    x11 = tl.join(a3, b3)  # w = 3 (j = 1, k = 1)
    z = tl.join(tl.join(x00, x01), tl.join(x10, x11))  # [.., h, j, k]
    return tl.reshape(z, (C, 16, 8))


@triton.jit
def _z_tile(seed_lo, seed_hi, base, scale, GAUSSIAN: tl.constexpr, C: tl.constexpr):
    """``z · scale``, float32 ``[C, 16, 8]``, for parameter elements ``base + 128c + 8q + i`` (``scale``: a
    float32 scalar). Rademacher: exactly ``z * scale``; gaussian: the radius is scaled (see _box_muller), so
    the product is ``z * scale`` to float rounding, and exactly ``z`` for ``scale = 1``."""
    if GAUSSIAN:
        # Row (c, q) holds counters m (its elements 0..3) and m + 1 (4..7).
        c2 = tl.arange(0, C)[:, None]
        q2 = tl.arange(0, 16)[None, :]
        off = 32 * c2 + 2 * q2
        m_lo, m_hi = _counter(base // 4, off)
        a0, a1, a2, a3 = _randn4(seed_lo, seed_hi, m_lo, m_hi, scale)
        m_lo, m_hi = _counter(base // 4, off + 1)
        b0, b1, b2, b3 = _randn4(seed_lo, seed_hi, m_lo, m_hi, scale)
        z = _row8(a0, a1, a2, a3, b0, b1, b2, b3, C)
    else:
        # One counter per 128 elements (row c): word q // 4, bits 8(q % 4) .. 8(q % 4) + 7 for the row's 8.
        m_lo, m_hi = _counter(base // 128, tl.arange(0, C))
        w0, w1, w2, w3 = _philox(seed_lo, seed_hi, m_lo, m_hi)
        q3 = tl.arange(0, 16)[None, :, None]
        word = tl.where(q3 < 8,
                        tl.where(q3 < 4, w0[:, None, None], w1[:, None, None]),
                        tl.where(q3 < 12, w2[:, None, None], w3[:, None, None]))
        byte = word >> (8 * (q3 % 4)).to(tl.uint32)
        i3 = tl.arange(0, 8)[None, None, :]
        top = byte << (31 - i3).to(tl.uint32)  # bit i at the sign position
        # ±1 · scale is ±scale exactly: bit set -> scale, clear -> -scale (a sign flip; one LOP3 per element)
        neg = tl.cast(scale, tl.float32).to(tl.uint32, bitcast=True) ^ 0x80000000
        z = ((top & 0x80000000) ^ neg).to(tl.float32, bitcast=True)
    return z


@triton.jit
def _stochastic_round(x, sr_lo, key, base, SR: tl.constexpr, C: tl.constexpr):
    """float32 ``x`` ``[C, 16, 8]`` rounded stochastically onto the bf16 (SR=1) / fp16 (SR=2) grid.

    Returns float32 values exactly representable in the target dtype; see ``reference.stochastic_round``.
    """
    c2 = tl.arange(0, C)[:, None]
    q2 = tl.arange(0, 16)[None, :]
    off = 32 * c2 + 2 * q2
    m_lo, m_hi = _counter(base // 4 + _SR_TAG, off)
    a0, a1, a2, a3 = _philox(sr_lo, key, m_lo, m_hi)
    m_lo, m_hi = _counter(base // 4 + _SR_TAG, off + 1)
    b0, b1, b2, b3 = _philox(sr_lo, key, m_lo, m_hi)
    word = _row8(a0, a1, a2, a3, b0, b1, b2, b3, C)
    bits = x.to(tl.uint32, bitcast=True)
    if SR == 1:
        y = ((bits + (word >> 16)) & 0xFFFF0000).to(tl.float32, bitcast=True)
        y = tl.where(x != x, x, y)  # a NaN with only low mantissa bits would otherwise truncate to inf
    else:
        u = (word >> 8).to(tl.float32) * (1.0 / 16777216.0)
        exp = ((bits >> 23) & 0xFF).to(tl.int32)
        ulp_exp = tl.maximum(exp - 127, -14) - 10
        ulp = ((ulp_exp + 127) << 23).to(tl.float32, bitcast=True)
        inv_ulp = ((127 - ulp_exp) << 23).to(tl.float32, bitcast=True)
        s = tl.abs(x) * inv_ulp
        fl = tl.floor(s)
        mag = (fl + (u < s - fl).to(tl.float32)) * ulp
        y = (mag.to(tl.uint32, bitcast=True) | (bits & 0x80000000)).to(tl.float32, bitcast=True)
    return y


@triton.jit
def _widen(v):
    """A loaded value as float32. bfloat16 is widened by a bit shift (exact, subnormals included): the Triton
    interpreter's own bfloat16 conversion is inexact, and on the GPU the shift costs the same."""
    if v.dtype == tl.bfloat16:
        return (v.to(tl.uint16, bitcast=True).to(tl.uint32) << 16).to(tl.float32, bitcast=True)
    else:
        return v.to(tl.float32)


@triton.jit
def _narrow(x, DTYPE: tl.constexpr):
    """float32 ``x`` as ``DTYPE``, rounded to nearest-even (exact when ``x`` is on ``DTYPE``'s grid).

    bfloat16 under the interpreter in integer arithmetic (torch's own rule: add 0x7FFF plus the lowest kept
    bit, truncate; NaN stays NaN), compiled with the hardware conversion (same rounding, one instruction per
    two elements).
    """
    if DTYPE == tl.bfloat16:
        if _COMPILED:
            return x.to(tl.bfloat16)
        else:
            bits = x.to(tl.uint32, bitcast=True)
            r = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
            r = tl.where(x != x, bits, r)
            return (r >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)
    else:
        return x.to(DTYPE)


@triton.jit
def _tile_info(tile, table_ptr, tile_starts_ptr, N_SEG: tl.constexpr, N_SEG_P2: tl.constexpr,
               ALIGNED8: tl.constexpr, C: tl.constexpr):
    """Segment of tile ``tile`` (int64 scalar): ``(offset, numel, start, base, key32, row, tile_end)``,
    ``base`` the parameter index of the tile's first element, ``row`` the segment's table row, ``tile_end``
    one past the segment's last tile."""
    # which segment: the last whose first tile is <= tile (tile_starts is sorted, starts at 0)
    sidx = tl.arange(0, N_SEG_P2)
    starts = tl.load(tile_starts_ptr + sidx, mask=sidx < N_SEG, other=0x7FFFFFFFFFFFFFFF)
    s = tl.reduce((starts <= tile).to(tl.int32), 0, _add) - 1
    row = table_ptr + s.to(tl.int64) * 8
    offset = tl.load(row + _C_OFFSET)
    numel = tl.load(row + _C_NUMEL)
    key = tl.load(row + _C_KEY)
    start = tl.load(row + _C_START)
    if ALIGNED8:
        # Host-checked: offset, start and numel are multiples of 8. Telling the compiler lets it prove that
        # the mask is constant over runs of 8 elements and use 16-byte vector loads and stores; without it
        # every element is a separate 2-byte access (measured: ~10x slower). The hints attach to the loads:
        # they must stay here, next to them (on a function argument they would be dropped).
        offset = tl.multiple_of(offset, 8)
        start = tl.multiple_of(start, 8)
        numel = tl.multiple_of(numel, 8)
    seg_base = tl.multiple_of(tl.load(row + _C_BASE), 128)  # always: start rounded down to a multiple of 128
    tile_first = tl.load(tile_starts_ptr + s)
    base = seg_base + (tile - tile_first) * (C * 128)
    tile_end = tile_first + (start + numel - seg_base + (C * 128 - 1)) // (C * 128)  # as device_tables counts
    # Philox key (k0, k1) = (seed, param key), both uint32 (rng: key = (seed, param_key))
    return offset, numel, start, base, key.to(tl.uint32), row, tile_end


@triton.jit
def _tile_index(offset, numel, start, base, C: tl.constexpr):
    """Buffer indices and mask, ``[C, 16, 8]``, of the tile's elements (parameter index ``base + local``)."""
    c = tl.arange(0, C)[:, None, None]
    q = tl.arange(0, 16)[None, :, None]
    i = tl.arange(0, 8)[None, None, :]
    local = 128 * c + 8 * q + i  # int32 [C, 16, 8]
    j = (base - start) + local  # index inside the segment
    return offset + j, (j >= 0) & (j < numel)


@triton.jit
def _tile_work(t, idx, mask, key32, base, row, new_ptr, plus_ptr, minus_ptr,
               seed0, coef0, seeds_ptr, coeffs_ptr, lr, wd, seed32, eps, sr_seed,
               MODE: tl.constexpr, GAUSSIAN: tl.constexpr, Q: tl.constexpr, SEEDS_FROM_PTR: tl.constexpr,
               COEFFS_FROM_PTR: tl.constexpr, HAS_WD: tl.constexpr, SR: tl.constexpr, C: tl.constexpr):
    """Modes 1-3 on one tile whose θ (float32 ``t``) is loaded: update, store, perturb, store."""
    if MODE >= 2:
        if Q > 0:
            # d = Σ c_j z(seed_j), accumulated in float32 in the given order (update.combined_direction)
            d = tl.full([C, 16, 8], 0.0, tl.float32)
            for u in tl.static_range(Q):
                if SEEDS_FROM_PTR:
                    sj = tl.load(seeds_ptr + u)
                else:
                    sj = seed0
                if COEFFS_FROM_PTR:
                    cj = tl.load(coeffs_ptr + u).to(tl.float32)
                else:
                    cj = coef0
                zc = _z_tile(sj.to(tl.uint32), key32, base, cj, GAUSSIAN, C)  # z_j * c_j
                if u == 0:
                    d = zc
                else:
                    d = d + zc
            # θ − lr (d + λθ) (update.updated); decay-free segments take the λ = 0 branch exactly
            if HAS_WD:
                decay = tl.load(row + _C_DECAY)
                step = tl.where(decay != 0, d + t * wd, d)
            else:
                step = d
            t = t - step * lr
        # Round onto the store's grid (stochastically if asked) and perturb the value *as stored*: exactly
        # what perturbing the store afterwards would see.
        if SR != 0:
            t = _stochastic_round(t, sr_seed.to(tl.uint32), key32, base, SR, C)
        t_store = _narrow(t, new_ptr.dtype.element_ty)
        tl.store(new_ptr + idx, t_store, mask=mask)
        t = _widen(t_store)
    if MODE == 1 or MODE == 3:
        ze = _z_tile(seed32, key32, base, eps, GAUSSIAN, C)
        tl.store(plus_ptr + idx, _narrow(t + ze, plus_ptr.dtype.element_ty), mask=mask)
        tl.store(minus_ptr + idx, _narrow(t - ze, minus_ptr.dtype.element_ty), mask=mask)


# Seeds and coefficients change every step: do not specialise on their values (Triton would otherwise compile
# variants for integers equal to 1 or divisible by 16); nor on the tile count.
@triton.jit(do_not_specialize=["seed0", "coef0", "lr", "wd", "seed", "eps", "sr_seed", "n_tiles"])
def _zo_kernel(
    theta_ptr, new_ptr, plus_ptr, minus_ptr,
    table_ptr, tile_starts_ptr,
    seed0, coef0, seeds_ptr, coeffs_ptr,
    lr, wd,
    seed, eps,
    sr_seed,
    n_tiles,
    N_SEG: tl.constexpr, N_SEG_P2: tl.constexpr,
    MODE: tl.constexpr, GAUSSIAN: tl.constexpr,
    Q: tl.constexpr, SEEDS_FROM_PTR: tl.constexpr, COEFFS_FROM_PTR: tl.constexpr, HAS_WD: tl.constexpr,
    SR: tl.constexpr, ALIGNED8: tl.constexpr, C: tl.constexpr, PERSISTENT: tl.constexpr,
):
    """Tiles of segments. MODE: 0 direction (z -> plus_ptr, float32), 1 perturb pair, 2 update, 3 update then
    perturb pair. See the module docstring for the layout.

    One tile per program, or (PERSISTENT, modes 1-3) tiles ``pid, pid + P, pid + 2P, ...`` for ``P`` programs,
    each loading the next tile's θ before working on the current one, so a load is in flight during the work.
    """
    pid = tl.program_id(0).to(tl.int64)
    seed32 = seed.to(tl.uint32)  # seeds arrive as int32 arguments holding the 32-bit pattern
    offset, numel, start, base, key32, row, tile_end = _tile_info(pid, table_ptr, tile_starts_ptr, N_SEG, N_SEG_P2,
                                                                  ALIGNED8, C)
    idx, mask = _tile_index(offset, numel, start, base, C)
    if MODE == 0:
        z = _z_tile(seed32, key32, base, eps, GAUSSIAN, C)  # the host passes eps = 1
        tl.store(plus_ptr + idx, z, mask=mask)
    elif PERSISTENT:
        # Only scalars and the loaded tile travel between iterations (index tensors are recomputed: cheaper
        # than keeping them in registers). The next tile is nearly always in the same segment (segments span
        # many times more tiles than there are programs): then its description follows from the current one
        # with no table lookup, so its θ load issues at once.
        n_programs = tl.num_programs(0).to(tl.int64)
        last = tl.cast(n_tiles, tl.int64) - 1
        t_raw = tl.load(theta_ptr + idx, mask=mask, other=0.0)
        for tile in range(pid, last + 1, n_programs):
            nxt = tile + n_programs
            if nxt < tile_end:
                offset_n, numel_n, start_n, key_n, row_n, end_n = offset, numel, start, key32, row, tile_end
                base_n = base + n_programs * (C * 128)
            else:
                offset_n, numel_n, start_n, base_n, key_n, row_n, end_n = _tile_info(
                    tl.minimum(nxt, last), table_ptr, tile_starts_ptr, N_SEG, N_SEG_P2, ALIGNED8, C)
            idx_n, mask_n = _tile_index(offset_n, numel_n, start_n, base_n, C)
            t_next = tl.load(theta_ptr + idx_n, mask=mask_n & (nxt <= last), other=0.0)
            idx, mask = _tile_index(offset, numel, start, base, C)
            _tile_work(_widen(t_raw), idx, mask, key32, base, row, new_ptr, plus_ptr, minus_ptr,
                       seed0, coef0, seeds_ptr, coeffs_ptr, lr, wd, seed32, eps, sr_seed,
                       MODE, GAUSSIAN, Q, SEEDS_FROM_PTR, COEFFS_FROM_PTR, HAS_WD, SR, C)
            t_raw = t_next
            offset, numel, start, base, key32, row, tile_end = offset_n, numel_n, start_n, base_n, key_n, row_n, end_n
    else:
        t = _widen(tl.load(theta_ptr + idx, mask=mask, other=0.0))
        _tile_work(t, idx, mask, key32, base, row, new_ptr, plus_ptr, minus_ptr,
                   seed0, coef0, seeds_ptr, coeffs_ptr, lr, wd, seed32, eps, sr_seed,
                   MODE, GAUSSIAN, Q, SEEDS_FROM_PTR, COEFFS_FROM_PTR, HAS_WD, SR, C)


# ================================================================================================== host
def _check_block(block: int) -> int:
    if block < 128 or block % 128 or block & (block - 1):
        raise ValueError(f"block must be a power-of-two multiple of 128, got {block}")
    return block


def _check_registers(n: int) -> int:
    if not 24 <= int(n) <= 255 or int(n) % 8:
        raise ValueError(f"max_registers must be a multiple of 8 in [24, 255] (registers per thread), got {n}")
    return int(n)


def _as_int32(x) -> int:
    """The low 32 bits of ``x`` as a signed int32 value: seeds travel as 32-bit kernel arguments (Triton types
    an int argument by its value, so a seed >= 2**31 would otherwise be an int64 and a second compiled kernel)."""
    x = int(x) & 0xFFFFFFFF
    return x - (1 << 32) if x >= 1 << 31 else x


_SM_COUNT: dict[str, int] = {}


def _sm_count(device: torch.device) -> int:
    """Multiprocessors of ``device`` (1 for the interpreter's CPU tensors), cached."""
    key = str(device)
    if key not in _SM_COUNT:
        _SM_COUNT[key] = (torch.cuda.get_device_properties(device).multi_processor_count
                          if device.type == "cuda" else 1)
    return _SM_COUNT[key]


def _launch(mode, table: SegmentTable, *, theta, new, plus, minus, distribution, seed=0, eps=0.0,
            seeds=(), coeffs=(), lr=0.0, weight_decay=0.0, sr_seed=None, block, num_warps, device,
            programs_per_sm=0, max_registers=None):
    """Build the constexpr specialisation and launch one grid over every tile of ``table``: one program per
    tile, or with ``programs_per_sm > 0`` (modes 1-3) that many persistent programs per multiprocessor.
    ``max_registers``: a cap on registers per thread (ptxas ``maxnreg``; None: the compiler's choice)."""
    _check_distribution(distribution)
    for name, t in (("out", new), ("out_plus", plus), ("out_minus", minus)):
        if t is not None and mode != _MODE_DIRECTION and t.dtype not in _KERNEL_DTYPES:
            raise ValueError(f"{name} must be one of {_KERNEL_DTYPES}, not {t.dtype}")
    block = _check_block(block)
    dev_table, tile_starts, n_tiles = table.device_tables(device, block)
    if n_tiles == 0:
        return
    n_seg = len(table)

    # Update terms: device tensors stay on the device (no host sync, e.g. g_t computed on the GPU); a single
    # Python seed/coefficient travels as a scalar argument (no host->device copy), more go in one small tensor.
    q = 0
    seed0, coef0 = 0, 0.0
    seeds_t = coeffs_t = dev_table  # placeholders for unused pointer arguments
    seeds_from_ptr = coeffs_from_ptr = False
    if mode >= _MODE_UPDATE:
        q = seeds.numel() if isinstance(seeds, torch.Tensor) else len(seeds)
        nc = coeffs.numel() if isinstance(coeffs, torch.Tensor) else len(coeffs)
        if q != nc:
            raise ValueError(f"{q} seeds but {nc} coefficients")
        if q > MAX_SEEDS:
            raise ValueError(f"at most {MAX_SEEDS} seeds per update kernel, got {q}; split the update")
        if isinstance(seeds, torch.Tensor):
            seeds_t, seeds_from_ptr = seeds.reshape(-1).to(device=device, dtype=torch.int64), True
        elif q == 1:
            seed0 = _as_int32(seeds[0])
        elif q > 1:
            seeds_t = torch.tensor([int(s) & 0xFFFFFFFF for s in seeds], dtype=torch.int64).to(device)
            seeds_from_ptr = True
        if isinstance(coeffs, torch.Tensor):
            coeffs_t, coeffs_from_ptr = coeffs.reshape(-1).to(device=device, dtype=torch.float32), True
        elif q == 1:
            coef0 = float(coeffs[0])
        elif q > 1:
            coeffs_t = torch.tensor([float(x) for x in coeffs], dtype=torch.float32).to(device)
            coeffs_from_ptr = True

    sr = _SR_NONE
    if sr_seed is not None and new is not None and new.dtype in LOW_PRECISION:
        sr = _SR_BF16 if new.dtype == torch.bfloat16 else _SR_FP16

    persistent = mode != _MODE_DIRECTION and programs_per_sm > 0
    options = {} if not max_registers else {"maxnreg": _check_registers(max_registers)}
    n_programs = min(n_tiles, programs_per_sm * _sm_count(torch.device(device))) if persistent else n_tiles
    dummy = dev_table
    _zo_kernel[(n_programs,)](
        theta if theta is not None else dummy,
        new if new is not None else dummy,
        plus if plus is not None else dummy,
        minus if minus is not None else dummy,
        dev_table, tile_starts,
        seed0, coef0, seeds_t, coeffs_t,
        float(lr), float(weight_decay),
        _as_int32(seed), float(eps),
        _as_int32(sr_seed or 0),
        n_tiles,
        N_SEG=n_seg, N_SEG_P2=max(2, triton.next_power_of_2(n_seg)),
        MODE=mode, GAUSSIAN=distribution == "gaussian",
        Q=q, SEEDS_FROM_PTR=seeds_from_ptr, COEFFS_FROM_PTR=coeffs_from_ptr,
        HAS_WD=float(weight_decay) != 0.0,
        SR=sr, ALIGNED8=table.aligned8, C=block // 128, PERSISTENT=persistent,
        num_warps=num_warps, **options,
        # No FMA contraction: keep the torch reference's roundings (see the module docstring).
        enable_fp_fusion=False,
    )


def _flat(theta: torch.Tensor, table: SegmentTable) -> torch.Tensor:
    if not theta.is_contiguous():
        raise ValueError("theta must be contiguous (a flat parameter buffer)")
    if theta.dtype not in _KERNEL_DTYPES:
        raise ValueError(f"the Triton kernels take {_KERNEL_DTYPES}, not {theta.dtype} (use the torch backend)")
    if table.end > theta.numel():
        raise ValueError(f"segments reach element {table.end} but theta has {theta.numel()}")
    if not _INTERPRET and theta.device.type != "cuda":
        raise ValueError("the Triton kernels need CUDA tensors (or TRITON_INTERPRET=1 for CPU tensors)")
    return theta.view(-1)


def direction(
    seed: int, key: int, start: int, count: int, distribution: str = "gaussian", *, device=None,
    block: int = DEFAULT_BLOCK, num_warps: int = DEFAULT_NUM_WARPS,
) -> torch.Tensor:
    """Elements ``start .. start+count`` of the direction of parameter ``key`` at ``seed`` (float32)."""
    if start < 0 or count < 0:
        raise ValueError(f"bad slice start={start} count={count}")
    if device is None:
        device = "cpu" if _INTERPRET else "cuda"
    device = torch.device(device)
    out = torch.empty(count, dtype=torch.float32, device=device)
    table = SegmentTable([(0, count, key, False, start)])
    _launch(_MODE_DIRECTION, table, theta=None, new=None, plus=out, minus=None, distribution=distribution,
            seed=seed, eps=1.0, block=block, num_warps=num_warps, device=device)
    return out


def perturb_pair(
    theta: torch.Tensor,
    segments: Segments,
    seed: int,
    eps: float,
    distribution: str = "gaussian",
    *,
    out_plus: torch.Tensor | None = None,
    out_minus: torch.Tensor | None = None,
    block: int = DEFAULT_BLOCK,
    num_warps: int = DEFAULT_NUM_WARPS,
    programs_per_sm: int = DEFAULT_PROGRAMS_PER_SM,
    max_registers: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(θ + εz, θ − εz)`` from one read of θ; see ``reference.perturb_pair``."""
    table = SegmentTable.coerce(segments)
    flat = _flat(theta, table)
    plus = _out_like(theta, out_plus, "out_plus")
    minus = _out_like(theta, out_minus, "out_minus")
    _launch(_MODE_PERTURB, table, theta=flat, new=None, plus=plus.view(-1), minus=minus.view(-1),
            distribution=distribution, seed=seed, eps=eps, block=block, num_warps=num_warps,
            programs_per_sm=programs_per_sm, max_registers=max_registers,
            device=theta.device)
    return plus, minus


def update(
    theta: torch.Tensor,
    segments: Segments,
    seeds: Seeds,
    coeffs: Coeffs,
    lr: float,
    weight_decay: float,
    distribution: str = "gaussian",
    *,
    stochastic_rounding_seed: int | None = None,
    out: torch.Tensor | None = None,
    block: int = DEFAULT_BLOCK,
    num_warps: int = DEFAULT_NUM_WARPS,
    programs_per_sm: int = DEFAULT_PROGRAMS_PER_SM,
    max_registers: int | None = None,
) -> torch.Tensor:
    """θ − lr (Σ cᵢ z(seedᵢ) + λ·decay·θ) per segment; see ``reference.update``. ``out=theta``: in place."""
    table = SegmentTable.coerce(segments)
    flat = _flat(theta, table)
    new = _out_like(theta, out, "out")
    _launch(_MODE_UPDATE, table, theta=flat, new=new.view(-1), plus=None, minus=None,
            distribution=distribution, seeds=seeds, coeffs=coeffs, lr=lr, weight_decay=weight_decay,
            sr_seed=stochastic_rounding_seed, block=block, num_warps=num_warps, device=theta.device,
            programs_per_sm=programs_per_sm, max_registers=max_registers)
    return new


def update_and_perturb(
    theta: torch.Tensor,
    segments: Segments,
    prev_seeds: Seeds,
    prev_coeffs: Coeffs,
    lr: float,
    weight_decay: float,
    seed: int,
    eps: float,
    distribution: str = "gaussian",
    *,
    stochastic_rounding_seed: int | None = None,
    out: torch.Tensor | None = None,
    out_plus: torch.Tensor | None = None,
    out_minus: torch.Tensor | None = None,
    block: int = UPDATE_PERTURB_BLOCK,
    num_warps: int = DEFAULT_NUM_WARPS,
    programs_per_sm: int = DEFAULT_PROGRAMS_PER_SM,
    max_registers: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Deferred update then dual perturbation in one pass; see ``reference.update_and_perturb``."""
    table = SegmentTable.coerce(segments)
    flat = _flat(theta, table)
    new = _out_like(theta, out, "out")
    plus = _out_like(theta, out_plus, "out_plus")
    minus = _out_like(theta, out_minus, "out_minus")
    _launch(_MODE_UPDATE_PERTURB, table, theta=flat, new=new.view(-1), plus=plus.view(-1),
            minus=minus.view(-1), distribution=distribution, seed=seed, eps=eps, seeds=prev_seeds,
            coeffs=prev_coeffs, lr=lr, weight_decay=weight_decay, sr_seed=stochastic_rounding_seed,
            block=block, num_warps=num_warps, device=theta.device, programs_per_sm=programs_per_sm,
            max_registers=max_registers)
    return new, plus, minus


def stochastic_round(
    x: torch.Tensor, dtype: torch.dtype, seed: int, key: int, offset: int = 0, *,
    block: int = DEFAULT_BLOCK, num_warps: int = DEFAULT_NUM_WARPS,
) -> torch.Tensor:
    """Kernel form of ``reference.stochastic_round``: an update with no step, stored with stochastic rounding."""
    x = x.reshape(-1).to(torch.float32).contiguous()
    if dtype == torch.float32:
        return x.clone()
    if dtype not in LOW_PRECISION:
        raise ValueError(f"stochastic rounding targets bfloat16 or float16, not {dtype}")
    out = torch.empty(x.numel(), dtype=dtype, device=x.device)
    table = SegmentTable([(0, x.numel(), key, False, offset)])
    return update(x, table, [], [], 0.0, 0.0, stochastic_rounding_seed=seed, out=out, block=block,
                  num_warps=num_warps)
