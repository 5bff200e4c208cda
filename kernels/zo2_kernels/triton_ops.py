"""The Triton backend of zo2_kernels: its public functions check their inputs, pick the tile size and the
specialisation, and launch the fused kernel.

The kernels themselves are @triton.jit functions in :mod:`zo2_kernels.triton_kernels` (the tile walk, the
element -> counter mapping, the arithmetic; its docstring describes them) and :mod:`zo2_kernels.triton_rng` (the
Philox generator and its normals). This module launches them: one grid per call over every tile of a segment
table, one program per tile or ``programs_per_sm`` persistent programs per multiprocessor. Same signatures and
results as :mod:`zo2_kernels.reference`.
"""

from __future__ import annotations

import importlib
import os
from typing import NamedTuple

import torch
import triton

from . import triton_kernels, triton_rng
from .reference import LOW_PRECISION, Coeffs, Seeds, Segments, _check_distribution, _out_like
from .segments import SegmentTable
from .triton_kernels import MODE_DIRECTION, MODE_PERTURB, MODE_UPDATE, MODE_UPDATE_PERTURB, SR_BF16, SR_FP16, SR_NONE

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

_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
# Storage dtypes the kernels read and write (math is float32: float64 stays with the torch reference).
_KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)

if triton_rng.INTERPRET != _INTERPRET:
    # The jit functions were created under the other TRITON_INTERPRET setting (this module is being reloaded
    # after the flag changed): create them again, generator first, so the kernels call the new ones.
    importlib.reload(triton_rng)
    importlib.reload(triton_kernels)
_zo_kernel = triton_kernels._zo_kernel  # the one kernel every launch runs


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


class _UpdateTerms(NamedTuple):
    """The update's seeds and coefficients as kernel arguments: a single Python value travels as a scalar argument
    (no host->device copy), more go in one small tensor, and device tensors stay on the device (no host sync,
    e.g. g_t computed on the GPU)."""

    q: int
    seed0: int
    coef0: float
    seeds: torch.Tensor
    coeffs: torch.Tensor
    seeds_from_ptr: bool
    coeffs_from_ptr: bool


def _seed_args(seeds, q: int, device, placeholder: torch.Tensor) -> tuple[int, torch.Tensor, bool]:
    """(scalar seed, seed tensor, whether the kernel reads the tensor) for ``q`` seeds."""
    if isinstance(seeds, torch.Tensor):
        return 0, seeds.reshape(-1).to(device=device, dtype=torch.int64), True
    if q == 1:
        return _as_int32(seeds[0]), placeholder, False
    if q > 1:
        return 0, torch.tensor([int(s) & 0xFFFFFFFF for s in seeds], dtype=torch.int64).to(device), True
    return 0, placeholder, False


def _coeff_args(coeffs, q: int, device, placeholder: torch.Tensor) -> tuple[float, torch.Tensor, bool]:
    """(scalar coefficient, coefficient tensor, whether the kernel reads the tensor) for ``q`` coefficients."""
    if isinstance(coeffs, torch.Tensor):
        return 0.0, coeffs.reshape(-1).to(device=device, dtype=torch.float32), True
    if q == 1:
        return float(coeffs[0]), placeholder, False
    if q > 1:
        return 0.0, torch.tensor([float(x) for x in coeffs], dtype=torch.float32).to(device), True
    return 0.0, placeholder, False


def _update_terms(mode: int, seeds, coeffs, device, placeholder: torch.Tensor) -> _UpdateTerms:
    """The update terms of an update mode, checked (as many seeds as coefficients, at most MAX_SEEDS); none for
    the other modes. ``placeholder`` fills the pointer arguments the kernel does not read."""
    if mode < MODE_UPDATE:
        return _UpdateTerms(0, 0, 0.0, placeholder, placeholder, False, False)
    q = seeds.numel() if isinstance(seeds, torch.Tensor) else len(seeds)
    nc = coeffs.numel() if isinstance(coeffs, torch.Tensor) else len(coeffs)
    if q != nc:
        raise ValueError(f"{q} seeds but {nc} coefficients")
    if q > MAX_SEEDS:
        raise ValueError(f"at most {MAX_SEEDS} seeds per update kernel, got {q}; split the update")
    seed0, seeds_t, seeds_from_ptr = _seed_args(seeds, q, device, placeholder)
    coef0, coeffs_t, coeffs_from_ptr = _coeff_args(coeffs, q, device, placeholder)
    return _UpdateTerms(q, seed0, coef0, seeds_t, coeffs_t, seeds_from_ptr, coeffs_from_ptr)


def _check_outputs(mode: int, new, plus, minus) -> None:
    """ValueError unless every output the kernel stores in its storage dtype is one it can write."""
    for name, t in (("out", new), ("out_plus", plus), ("out_minus", minus)):
        if t is not None and mode != MODE_DIRECTION and t.dtype not in _KERNEL_DTYPES:
            raise ValueError(f"{name} must be one of {_KERNEL_DTYPES}, not {t.dtype}")


def _sr_mode(sr_seed, new) -> int:
    """The stochastic rounding of the updated θ: onto bfloat16 / float16 when asked and stored low-precision."""
    if sr_seed is not None and new is not None and new.dtype in LOW_PRECISION:
        return SR_BF16 if new.dtype == torch.bfloat16 else SR_FP16
    return SR_NONE


def _launch(mode, table: SegmentTable, *, theta, new, plus, minus, distribution, seed=0, eps=0.0,
            seeds=(), coeffs=(), lr=0.0, weight_decay=0.0, sr_seed=None, block, num_warps, device,
            programs_per_sm=0, max_registers=None):
    """Build the constexpr specialisation and launch one grid over every tile of ``table``: one program per
    tile, or with ``programs_per_sm > 0`` (modes 1-3) that many persistent programs per multiprocessor.
    ``max_registers``: a cap on registers per thread (ptxas ``maxnreg``; None: the compiler's choice)."""
    _check_distribution(distribution)
    _check_outputs(mode, new, plus, minus)
    block = _check_block(block)
    dev_table, tile_starts, n_tiles = table.device_tables(device, block)
    if n_tiles == 0:
        return
    n_seg = len(table)
    dummy = dev_table  # for unused pointer arguments
    terms = _update_terms(mode, seeds, coeffs, device, dummy)
    sr = _sr_mode(sr_seed, new)
    persistent = mode != MODE_DIRECTION and programs_per_sm > 0
    options = {} if not max_registers else {"maxnreg": _check_registers(max_registers)}
    n_programs = min(n_tiles, programs_per_sm * _sm_count(torch.device(device))) if persistent else n_tiles
    _zo_kernel[(n_programs,)](
        theta if theta is not None else dummy,
        new if new is not None else dummy,
        plus if plus is not None else dummy,
        minus if minus is not None else dummy,
        dev_table, tile_starts,
        terms.seed0, terms.coef0, terms.seeds, terms.coeffs,
        float(lr), float(weight_decay),
        _as_int32(seed), float(eps),
        _as_int32(sr_seed or 0),
        n_tiles,
        N_SEG=n_seg, N_SEG_P2=max(2, triton.next_power_of_2(n_seg)),
        MODE=mode, GAUSSIAN=distribution == "gaussian",
        Q=terms.q, SEEDS_FROM_PTR=terms.seeds_from_ptr, COEFFS_FROM_PTR=terms.coeffs_from_ptr,
        HAS_WD=float(weight_decay) != 0.0,
        SR=sr, ALIGNED8=table.aligned8, C=block // 128, PERSISTENT=persistent,
        num_warps=num_warps, **options,
        # No FMA contraction: keep the torch reference's roundings (see zo2_kernels.triton_kernels).
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
    _launch(MODE_DIRECTION, table, theta=None, new=None, plus=out, minus=None, distribution=distribution,
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
    _launch(MODE_PERTURB, table, theta=flat, new=None, plus=plus.view(-1), minus=minus.view(-1),
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
    _launch(MODE_UPDATE, table, theta=flat, new=new.view(-1), plus=None, minus=None,
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
    _launch(MODE_UPDATE_PERTURB, table, theta=flat, new=new.view(-1), plus=plus.view(-1),
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
