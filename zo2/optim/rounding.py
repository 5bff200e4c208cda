"""Stochastic rounding of updated weights to bfloat16/float16: unbiased, and a pure function of (rounding seed,
parameter key, element index), so replays, offloaded runs and every kernels backend round alike.

The random word of element ``k`` of parameter ``key`` under rounding seed ``sr_seed`` is word ``k % 4`` of
Philox4x32-10 with key ``(sr_seed, key)`` at counter ``k // 4 + 2**62``. The ``2**62`` tag puts the rounding
stream in a counter range direction counters never reach (they would need ``k >= 2**64``), so rounding bits are
independent of every direction even when ``sr_seed`` equals a direction seed. zo2_kernels' backends expose these
functions (the torch reference calls them; the Triton kernels compute the same bits).
"""

from __future__ import annotations

import torch

from zo2.optim.rng import philox4x32

SR_COUNTER_TAG = 1 << 62
LOW_PRECISION = (torch.bfloat16, torch.float16)
_MASK32 = 0xFFFFFFFF


def _int64_bits_to_float(bits: torch.Tensor) -> torch.Tensor:
    """float32 whose bit pattern is the uint32 held in an int64 tensor."""
    signed = torch.where(bits >= 1 << 31, bits - (1 << 32), bits)
    return signed.to(torch.int32).view(torch.float32)


def sr_words(seed: int, key: int, offset: int, count: int, device=None) -> torch.Tensor:
    """The 32-bit random words (int64 tensor) that round elements ``offset .. offset+count`` of ``key``."""
    device = torch.device(device) if device is not None else torch.device("cpu")
    if count == 0:
        return torch.empty(0, dtype=torch.int64, device=device)
    m0, m1 = offset // 4, (offset + count + 3) // 4
    counters = torch.arange(m0, m1, dtype=torch.int64, device=device) + SR_COUNTER_TAG
    words = torch.stack(philox4x32(counters, seed, key), dim=1).reshape(-1)  # index 4(m-m0)+j
    return words[offset - 4 * m0 : offset - 4 * m0 + count]


def stochastic_round(
    x: torch.Tensor, dtype: torch.dtype, seed: int, key: int, offset: int = 0
) -> torch.Tensor:
    """Round float32 ``x`` (elements ``offset..`` of parameter ``key``) to ``dtype``, unbiased and seeded.

    Each element becomes one of the two ``dtype`` values bracketing it, the upper one with probability equal
    to its distance from the lower one in units of their spacing, so ``E[round(x)] = x``:

    * bfloat16: add the top 16 bits of the element's random word to the float32 bit pattern and truncate the
      low 16 bits (bfloat16 is the top half of float32, so this is exact, subnormals included);
    * float16: with ``ulp`` the float16 spacing at ``|x|`` (``2**-24`` below the normal range),
      ``s = |x|/ulp``, round ``|x|`` up iff ``u < s - floor(s)`` with ``u`` the top 24 bits of the word times
      ``2**-24``; every operation is exact in float32.

    NaN stays NaN, ±inf stays ±inf; values beyond the float16 range become ±inf as with a plain cast.
    float32 ``dtype`` returns ``x`` unchanged. Returns a flat tensor of ``dtype``.
    """
    x = x.reshape(-1).to(torch.float32)
    if dtype == torch.float32:
        return x.clone()
    if dtype not in LOW_PRECISION:
        raise ValueError(f"stochastic rounding targets bfloat16 or float16, not {dtype}")
    words = sr_words(seed, key, offset, x.numel(), x.device)
    bits = x.view(torch.int32).to(torch.int64) & _MASK32
    if dtype == torch.bfloat16:
        y = _int64_bits_to_float((bits + (words >> 16)) & 0xFFFF0000)
        # A NaN with only low mantissa bits set would truncate to inf: keep NaNs as they are.
        y = torch.where(torch.isnan(x), x, y)
    else:
        u = (words >> 8).to(torch.float32) * (2.0**-24)
        exp = (bits >> 23) & 0xFF
        ulp_exp = torch.clamp(exp - 127, min=-14) - 10  # float16: 10 mantissa bits, min normal 2**-14
        ulp = _int64_bits_to_float((ulp_exp + 127) << 23)
        inv_ulp = _int64_bits_to_float((127 - ulp_exp) << 23)
        s = x.abs() * inv_ulp
        fl = torch.floor(s)
        mag = (fl + (u < s - fl).to(torch.float32)) * ulp
        mag_bits = mag.view(torch.int32).to(torch.int64) & _MASK32
        y = _int64_bits_to_float(mag_bits | (bits & 0x80000000))
    return y.to(dtype)
