"""Fused Triton kernels for MeZO perturbation and (deferred) update on flat, segmented parameter buffers.

One launch covers a whole block: the grid has one program per *tile* of ``BLOCK`` elements of some segment,
and each program finds its segment in the (tiny) segment table. Every kernel is the same generic kernel
(:func:`_zo_kernel`) specialised by constexpr flags, so there is one implementation of the tile walk, of the
element -> counter mapping and of the arithmetic.

**Element -> counter mapping** (the definition in :mod:`zo2.optim.rng`, independent of ``BLOCK``): a tile is
viewed as a ``[C, 16, 8]`` tensor, ``C = BLOCK // 128``; element ``(c, q, i)`` is parameter element
``k = base + 128c + 8q + i`` where ``base`` (a multiple of 128) is the tile's first parameter element.

* gaussian: ``k // 4 = base/4 + 32c + 2q + i//4``: two ``randn4x``-style calls on the ``[C, 16]`` counters
  ``base/4 + 32c + 2q`` and ``... + 1`` give the 8 normals of a row, 4 per Philox call, none wasted;
* rademacher: ``k // 128 = base/128 + c``: one Philox call on ``[C]`` counters; word ``q // 4``, bit
  ``8(q % 4) + i`` — one 32-bit word feeds 32 elements;
* stochastic rounding: word ``k % 4`` at counter ``k // 4 + 2**62`` (see :mod:`zo2_kernels.reference`), two
  Philox calls per row like the gaussian layout.

**Arithmetic.** Identical to :mod:`zo2.optim.update`, operation for operation, in float32; kernels are
compiled with ``enable_fp_fusion=False`` so no multiply-add is contracted into an FMA and the roundings are the
torch reference's (Rademacher results are bit-identical to the reference; Gaussian ones differ only through
the last bits of log/sin/cos). Low-precision inputs are widened to float32 before any arithmetic (also
required by the Triton interpreter, whose bfloat16 arithmetic is wrong) and rounded once on store.
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
# Chosen with `benchmarks/kernels.py --sweep` on an H200 (OPT-30B block, bf16): 2048 / 4 warps was the fastest
# or within 5% of it for every kernel; 4096 was 1.3-2.4x slower.
DEFAULT_BLOCK = 2048
DEFAULT_NUM_WARPS = 4
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


@triton.jit
def _philox(seed_lo, seed_hi, m):
    """Philox4x32-10 of counters ``(m_lo, m_hi, 0, 0)`` (int64 tensor ``m``) under key ``(seed_lo, seed_hi)``.

    Returns the four uint32 output words, as ``rng.philox4x32``.
    """
    c0 = m.to(tl.uint32)  # truncation keeps the low 32 bits
    c1 = (m >> 32).to(tl.uint32)
    c2 = c0 * 0
    c3 = c0 * 0
    k0 = seed_lo
    k1 = seed_hi
    for _ in tl.static_range(10):
        p0, p2 = c0, c2
        c0 = tl.math.umulhi(p2, _PHILOX_B) ^ c1 ^ k0
        c2 = tl.math.umulhi(p0, _PHILOX_A) ^ c3 ^ k1
        c1 = p2 * _PHILOX_B  # uint32: wraps modulo 2**32 (the low half of the product)
        c3 = p0 * _PHILOX_A
        k0 = k0 + _KEY_A
        k1 = k1 + _KEY_B
    return c0, c1, c2, c3


@triton.jit
def _uniform(x):
    """uint32 -> float32 in [0, 1): |int32(x)| * 2**-31 with negatives folded as -x-1 (rng._uniform)."""
    xi = x.to(tl.int32, bitcast=True)
    xi = tl.where(xi < 0, ~xi, xi)
    return xi.to(tl.float32) * _U32_TO_UNIFORM


@triton.jit
def _box_muller(u1, u2):
    """Two normals from two uniforms (rng._box_muller; tl.randn4x's pair_uniform_to_normal)."""
    u1 = tl.maximum(1.0e-7, u1)
    th = _TWO_PI * u2
    r = tl.sqrt(-2.0 * tl.log(u1))
    return r * tl.cos(th), r * tl.sin(th)


@triton.jit
def _randn4(seed_lo, seed_hi, m):
    """The four normals of counter ``m``: elements 4m .. 4m+3 of a gaussian direction."""
    x0, x1, x2, x3 = _philox(seed_lo, seed_hi, m)
    n0, n1 = _box_muller(_uniform(x0), _uniform(x1))
    n2, n3 = _box_muller(_uniform(x2), _uniform(x3))
    return n0, n1, n2, n3


@triton.jit
def _add(a, b):
    """Combine function of a sum (``tl.sum`` itself is a jit'd library function; see ``_philox``)."""
    return a + b


@triton.jit
def _select8(i, v0, v1, v2, v3, v4, v5, v6, v7):
    """Element-wise ``v_i`` for ``i`` in 0..7 (``i`` broadcasts along the last, in-thread, axis)."""
    return tl.where(i < 4,
                    tl.where(i < 2, tl.where(i == 0, v0, v1), tl.where(i == 2, v2, v3)),
                    tl.where(i < 6, tl.where(i == 4, v4, v5), tl.where(i == 6, v6, v7)))


@triton.jit
def _z_tile(seed_lo, seed_hi, base, GAUSSIAN: tl.constexpr, C: tl.constexpr):
    """Direction values, float32 ``[C, 16, 8]``, of parameter elements ``base + 128c + 8q + i``."""
    c2 = tl.arange(0, C)[:, None]
    q2 = tl.arange(0, 16)[None, :]
    i3 = tl.arange(0, 8)[None, None, :]
    if GAUSSIAN:
        # Counter of elements 8q..8q+3 of row (c, q); the next counter holds 8q+4..8q+7.
        m = base // 4 + 32 * c2 + 2 * q2
        a0, a1, a2, a3 = _randn4(seed_lo, seed_hi, m)
        b0, b1, b2, b3 = _randn4(seed_lo, seed_hi, m + 1)
        z = _select8(i3, a0[:, :, None], a1[:, :, None], a2[:, :, None], a3[:, :, None],
                     b0[:, :, None], b1[:, :, None], b2[:, :, None], b3[:, :, None])
    else:
        m = base // 128 + tl.arange(0, C)
        w0, w1, w2, w3 = _philox(seed_lo, seed_hi, m)
        q3 = q2[:, :, None]
        word = tl.where(q3 < 8,
                        tl.where(q3 < 4, w0[:, None, None], w1[:, None, None]),
                        tl.where(q3 < 12, w2[:, None, None], w3[:, None, None]))
        shift = (8 * (q3 % 4) + i3).to(tl.uint32)
        bit = (word >> shift) & 1
        z = bit.to(tl.float32) * 2.0 - 1.0
    return z


@triton.jit
def _stochastic_round(x, sr_lo, key, base, SR: tl.constexpr, C: tl.constexpr):
    """float32 ``x`` ``[C, 16, 8]`` rounded stochastically onto the bf16 (SR=1) / fp16 (SR=2) grid.

    Returns float32 values exactly representable in the target dtype; see ``reference.stochastic_round``.
    """
    c2 = tl.arange(0, C)[:, None]
    q2 = tl.arange(0, 16)[None, :]
    i3 = tl.arange(0, 8)[None, None, :]
    m = base // 4 + 32 * c2 + 2 * q2 + _SR_TAG
    a0, a1, a2, a3 = _philox(sr_lo, key, m)
    b0, b1, b2, b3 = _philox(sr_lo, key, m + 1)
    word = _select8(i3, a0[:, :, None], a1[:, :, None], a2[:, :, None], a3[:, :, None],
                    b0[:, :, None], b1[:, :, None], b2[:, :, None], b3[:, :, None])
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
def _round_nearest(x, DTYPE: tl.constexpr):
    """float32 ``x`` rounded to nearest-even onto ``DTYPE``'s grid, returned as float32 (exactly representable).

    bfloat16 in integer arithmetic (torch's own rule: add 0x7FFF plus the lowest kept bit, truncate; NaN stays
    NaN), for the interpreter's sake as in :func:`_widen`.
    """
    if DTYPE == tl.bfloat16:
        bits = x.to(tl.uint32, bitcast=True)
        r = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
        return tl.where(x != x, x, r.to(tl.float32, bitcast=True))
    elif DTYPE == tl.float16:
        return x.to(tl.float16).to(tl.float32)
    else:
        return x


@triton.jit
def _narrow(x, DTYPE: tl.constexpr):
    """float32 ``x`` already on ``DTYPE``'s grid, as ``DTYPE`` (for bfloat16: its top 16 bits)."""
    if DTYPE == tl.bfloat16:
        hi = (x.to(tl.uint32, bitcast=True) >> 16).to(tl.uint16)
        return hi.to(tl.bfloat16, bitcast=True)
    else:
        return x.to(DTYPE)


# Seeds and coefficients change every step: do not specialise on their values (Triton would otherwise compile
# variants for integers equal to 1 or divisible by 16).
@triton.jit(do_not_specialize=["seed0", "coef0", "lr", "wd", "seed", "eps", "sr_seed"])
def _zo_kernel(
    theta_ptr, new_ptr, plus_ptr, minus_ptr,
    table_ptr, tile_starts_ptr,
    seed0, coef0, seeds_ptr, coeffs_ptr,
    lr, wd,
    seed, eps,
    sr_seed,
    N_SEG: tl.constexpr, N_SEG_P2: tl.constexpr,
    MODE: tl.constexpr, GAUSSIAN: tl.constexpr,
    Q: tl.constexpr, SEEDS_FROM_PTR: tl.constexpr, COEFFS_FROM_PTR: tl.constexpr, HAS_WD: tl.constexpr,
    SR: tl.constexpr, ALIGNED8: tl.constexpr, C: tl.constexpr,
):
    """One tile of one segment. MODE: 0 direction (z -> plus_ptr, float32), 1 perturb pair, 2 update,
    3 update then perturb pair. See the module docstring for the layout."""
    pid = tl.program_id(0).to(tl.int64)
    # ---- which segment: the last whose first tile is <= pid (tile_starts is sorted, starts at 0)
    sidx = tl.arange(0, N_SEG_P2)
    starts = tl.load(tile_starts_ptr + sidx, mask=sidx < N_SEG, other=0x7FFFFFFFFFFFFFFF)
    s = tl.reduce((starts <= pid).to(tl.int32), 0, _add) - 1
    row = table_ptr + s.to(tl.int64) * 8
    offset = tl.load(row + _C_OFFSET)
    numel = tl.load(row + _C_NUMEL)
    key = tl.load(row + _C_KEY)
    start = tl.load(row + _C_START)
    seg_base = tl.load(row + _C_BASE)
    tile_first = tl.load(tile_starts_ptr + s)

    # ---- element indices of the tile: parameter index k, index j inside the segment, buffer index
    if ALIGNED8:
        # Host-checked: offset, start and numel are multiples of 8. Telling the compiler lets it prove that
        # the mask is constant over runs of 8 elements and use 16-byte vector loads and stores; without it
        # every element is a separate 2-byte access (measured: ~10x slower).
        offset = tl.multiple_of(offset, 8)
        start = tl.multiple_of(start, 8)
        numel = tl.multiple_of(numel, 8)
    seg_base = tl.multiple_of(seg_base, 128)  # always: start rounded down to a multiple of 128
    base = seg_base + (pid - tile_first) * (C * 128)
    c = tl.arange(0, C)[:, None, None]
    q = tl.arange(0, 16)[None, :, None]
    i = tl.arange(0, 8)[None, None, :]
    local = 128 * c + 8 * q + i  # int32 [C, 16, 8]
    j = (base - start) + local
    mask = (j >= 0) & (j < numel)
    idx = offset + j

    # Philox key (k0, k1) = (seed, param key), both uint32 (rng: key = (seed, param_key)).
    key32 = key.to(tl.uint32)
    seed32 = seed.to(tl.uint32)

    if MODE == 0:
        z = _z_tile(seed32, key32, base, GAUSSIAN, C)
        tl.store(plus_ptr + idx, z, mask=mask)
    else:
        t = _widen(tl.load(theta_ptr + idx, mask=mask, other=0.0))
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
                    zj = _z_tile(sj.to(tl.uint32), key32, base, GAUSSIAN, C)
                    if u == 0:
                        d = zj * cj
                    else:
                        d = d + zj * cj
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
            else:
                t = _round_nearest(t, new_ptr.dtype.element_ty)
            tl.store(new_ptr + idx, _narrow(t, new_ptr.dtype.element_ty), mask=mask)
        if MODE == 1 or MODE == 3:
            ze = _z_tile(seed32, key32, base, GAUSSIAN, C) * eps
            out_ty = plus_ptr.dtype.element_ty
            tl.store(plus_ptr + idx, _narrow(_round_nearest(t + ze, out_ty), out_ty), mask=mask)
            out_ty = minus_ptr.dtype.element_ty
            tl.store(minus_ptr + idx, _narrow(_round_nearest(t - ze, out_ty), out_ty), mask=mask)


# ================================================================================================== host
def _check_block(block: int) -> int:
    if block < 128 or block % 128 or block & (block - 1):
        raise ValueError(f"block must be a power-of-two multiple of 128, got {block}")
    return block


def _launch(mode, table: SegmentTable, *, theta, new, plus, minus, distribution, seed=0, eps=0.0,
            seeds=(), coeffs=(), lr=0.0, weight_decay=0.0, sr_seed=None, block, num_warps, device):
    """Build the constexpr specialisation and launch one grid over every tile of ``table``."""
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
            seed0 = int(seeds[0]) & 0xFFFFFFFF
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

    dummy = dev_table
    _zo_kernel[(n_tiles,)](
        theta if theta is not None else dummy,
        new if new is not None else dummy,
        plus if plus is not None else dummy,
        minus if minus is not None else dummy,
        dev_table, tile_starts,
        seed0, coef0, seeds_t, coeffs_t,
        float(lr), float(weight_decay),
        int(seed) & 0xFFFFFFFF, float(eps),
        int(sr_seed or 0) & 0xFFFFFFFF,
        N_SEG=n_seg, N_SEG_P2=max(2, triton.next_power_of_2(n_seg)),
        MODE=mode, GAUSSIAN=distribution == "gaussian",
        Q=q, SEEDS_FROM_PTR=seeds_from_ptr, COEFFS_FROM_PTR=coeffs_from_ptr,
        HAS_WD=float(weight_decay) != 0.0,
        SR=sr, ALIGNED8=table.aligned8, C=block // 128,
        num_warps=num_warps,
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
            seed=seed, block=block, num_warps=num_warps, device=device)
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
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(θ + εz, θ − εz)`` from one read of θ; see ``reference.perturb_pair``."""
    table = SegmentTable.coerce(segments)
    flat = _flat(theta, table)
    plus = _out_like(theta, out_plus, "out_plus")
    minus = _out_like(theta, out_minus, "out_minus")
    _launch(_MODE_PERTURB, table, theta=flat, new=None, plus=plus.view(-1), minus=minus.view(-1),
            distribution=distribution, seed=seed, eps=eps, block=block, num_warps=num_warps,
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
) -> torch.Tensor:
    """θ − lr (Σ cᵢ z(seedᵢ) + λ·decay·θ) per segment; see ``reference.update``. ``out=theta``: in place."""
    table = SegmentTable.coerce(segments)
    flat = _flat(theta, table)
    new = _out_like(theta, out, "out")
    _launch(_MODE_UPDATE, table, theta=flat, new=new.view(-1), plus=None, minus=None,
            distribution=distribution, seeds=seeds, coeffs=coeffs, lr=lr, weight_decay=weight_decay,
            sr_seed=stochastic_rounding_seed, block=block, num_warps=num_warps, device=theta.device)
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
    block: int = DEFAULT_BLOCK,
    num_warps: int = DEFAULT_NUM_WARPS,
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
            block=block, num_warps=num_warps, device=theta.device)
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
