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

import triton
import triton.language as tl

from .reference import SR_COUNTER_TAG
from .segments import COL_BASE, COL_DECAY, COL_KEY, COL_NUMEL, COL_OFFSET, COL_START
from .triton_rng import COMPILED, counter, philox, randn4

# MODE of _zo_kernel: what it computes; SR: stochastic rounding of the updated θ onto bfloat16 / float16.
MODE_DIRECTION, MODE_PERTURB, MODE_UPDATE, MODE_UPDATE_PERTURB = 0, 1, 2, 3
SR_NONE, SR_BF16, SR_FP16 = 0, 1, 2

# Globals read inside @triton.jit functions must be constexpr.
_SR_TAG = tl.constexpr(SR_COUNTER_TAG)
_C_OFFSET = tl.constexpr(COL_OFFSET)
_C_NUMEL = tl.constexpr(COL_NUMEL)
_C_KEY = tl.constexpr(COL_KEY)
_C_DECAY = tl.constexpr(COL_DECAY)
_C_START = tl.constexpr(COL_START)
_C_BASE = tl.constexpr(COL_BASE)


@triton.jit
def _add(a, b):
    """Combine function of a sum (``tl.sum`` itself is a jit'd library function; see :mod:`.triton_rng`)."""
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
    float32 scalar). Rademacher: exactly ``z * scale``; gaussian: the radius is scaled (see triton_rng._box_muller), so
    the product is ``z * scale`` to float rounding, and exactly ``z`` for ``scale = 1``."""
    if GAUSSIAN:
        # Row (c, q) holds counters m (its elements 0..3) and m + 1 (4..7).
        c2 = tl.arange(0, C)[:, None]
        q2 = tl.arange(0, 16)[None, :]
        off = 32 * c2 + 2 * q2
        m_lo, m_hi = counter(base // 4, off)
        a0, a1, a2, a3 = randn4(seed_lo, seed_hi, m_lo, m_hi, scale)
        m_lo, m_hi = counter(base // 4, off + 1)
        b0, b1, b2, b3 = randn4(seed_lo, seed_hi, m_lo, m_hi, scale)
        z = _row8(a0, a1, a2, a3, b0, b1, b2, b3, C)
    else:
        # One counter per 128 elements (row c): word q // 4, bits 8(q % 4) .. 8(q % 4) + 7 for the row's 8.
        m_lo, m_hi = counter(base // 128, tl.arange(0, C))
        w0, w1, w2, w3 = philox(seed_lo, seed_hi, m_lo, m_hi)
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
    m_lo, m_hi = counter(base // 4 + _SR_TAG, off)
    a0, a1, a2, a3 = philox(sr_lo, key, m_lo, m_hi)
    m_lo, m_hi = counter(base // 4 + _SR_TAG, off + 1)
    b0, b1, b2, b3 = philox(sr_lo, key, m_lo, m_hi)
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
        if COMPILED:
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
