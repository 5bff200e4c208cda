"""Pure-torch reference implementations of every fused kernel, with the same signatures.

These are built on :mod:`zo2.optim.rng` (the definition of ``z``) and :mod:`zo2.optim.update` (the definition
of the step arithmetic), so there is one definition of the math; the Triton kernels in
:mod:`zo2_kernels.triton_ops` must compute the same functions (bit for bit for Rademacher directions and for
stochastic rounding of equal inputs; to float rounding for Gaussian directions, whose sin/cos/log differ in
their last bits between libraries).

They run on any device (CPU or CUDA) and are the ``"torch"`` backend of :func:`zo2_kernels.get_backend`.
They favour clarity over speed, but on the CPU they are the engine's path: flat buffers are cut into pieces of
:data:`CPU_PIECE` elements run on torch's thread count of threads, ``z`` comes from the compiled generator
(:mod:`zo2.optim.native`, the same bits) and float32 ``update_and_perturb`` is one compiled pass per piece.

Stochastic rounding is defined in :mod:`zo2.optim.rounding` (:func:`stochastic_round`, :func:`sr_words`, exposed
here as this backend's functions): the random word of element
``k`` of parameter ``key`` under rounding seed ``sr_seed`` is word ``k % 4`` of Philox4x32-10 with key
``(sr_seed, key)`` at counter ``k // 4 + 2**62``. The ``2**62`` tag puts the rounding stream in a counter range
direction counters never reach (they would need ``k >= 2**64``), so rounding bits are independent of every
direction even when ``sr_seed`` equals a direction seed.
"""

from __future__ import annotations

from typing import Iterator, Sequence, Union

import torch

from .segments import Segment, SegmentTable, SegmentLike

BACKEND = "torch"

SR_COUNTER_TAG = 1 << 62  # zo2.optim.rounding's (tests/unit/test_layering.py checks they agree)
CPU_PIECE = 1 << 17
"""Parameter elements per piece of a segment on the CPU (a multiple of every distribution's counter span).

Measured on the 2-core machine (OPT-125m shape, fp32, 4×64, 2 threads; one run, the sizes interleaved): a step
took 2.9 s with pieces of 2**15, 2.3 s with 2**16, 1.9-2.0 s with 2**17 and 1.8 s with 2**18, and with two
other processes keeping both cores busy 5.2-5.7 s with 2**15 against 4.6-4.8 s with 2**17. Smaller pieces pay
Python's per-piece cost (some 25 torch calls each, serialized by the GIL) more often than they save."""
LOW_PRECISION = (torch.bfloat16, torch.float16)

Seeds = Union[Sequence[int], torch.Tensor]
Coeffs = Union[Sequence[float], torch.Tensor]
Segments = Union[SegmentTable, Sequence[SegmentLike]]


# ------------------------------------------------------------------------------------------------- helpers
def _rng():
    """:mod:`zo2.optim.rng`, imported on first use.

    Not at module import: ``zo2/__init__`` imports the engine, which imports this module, so a module-level
    ``from zo2.optim import rng`` would be circular whenever ``zo2_kernels`` is imported before ``zo2``.
    """
    from zo2.optim import rng

    return rng


def _upd():
    """:mod:`zo2.optim.update`, imported on first use (see :func:`_rng`)."""
    from zo2.optim import update

    return update


def _rounding():
    """:mod:`zo2.optim.rounding`, imported on first use (see :func:`_rng`)."""
    from zo2.optim import rounding

    return rounding


def _as_list(values, cast) -> list:
    """A Python list from a sequence or a (device) tensor. Tensors sync; fine for a reference."""
    if isinstance(values, torch.Tensor):
        return [cast(v) for v in values.reshape(-1).tolist()]
    return [cast(v) for v in values]


def _check_distribution(distribution: str) -> None:
    if distribution not in _rng().DISTRIBUTIONS:
        raise ValueError(f"unknown distribution {distribution!r}; expected one of {_rng().DISTRIBUTIONS}")


def _flat(theta: torch.Tensor, table: SegmentTable) -> torch.Tensor:
    if not theta.is_contiguous():
        raise ValueError("theta must be contiguous (a flat parameter buffer)")
    flat = theta.view(-1)
    if table.end > flat.numel():
        raise ValueError(f"segments reach element {table.end} but theta has {flat.numel()}")
    return flat


def _out_like(theta: torch.Tensor, out: torch.Tensor | None, name: str) -> torch.Tensor:
    """``out`` checked against ``theta``'s shape, or a new tensor like ``theta``."""
    if out is None:
        return torch.empty_like(theta)
    if out.numel() != theta.numel() or not out.is_contiguous() or out.device != theta.device:
        raise ValueError(f"{name} must be a contiguous tensor of {theta.numel()} elements on {theta.device}")
    if not out.is_floating_point():
        raise ValueError(f"{name} must be a floating-point tensor")
    return out


def _z_of(seg: Segment, distribution: str, device: torch.device):
    """seed -> the float32 direction of segment ``seg`` (a slice of parameter ``seg.key``)."""
    direction_fn = _rng().direction
    return lambda seed: direction_fn(
        int(seed), seg.key, seg.start + seg.numel, start=seg.start, count=seg.numel,
        distribution=distribution, device=device,
    )


def _pieces(table: SegmentTable, device: torch.device) -> Iterator[Segment]:
    """The segments of ``table``, on the CPU cut into pieces of at most :data:`CPU_PIECE` parameter elements.

    Every function here is elementwise in (parameter, element), so a piece gives the same bits as its share of
    the whole segment; the CPU's temporaries (z, the products) then stay in cache instead of costing one pass
    over memory each. Cuts fall on parameter indices that are multiples of ``CPU_PIECE`` (whole counters)."""
    for seg in table:
        if device.type != "cpu" or seg.numel <= CPU_PIECE:
            yield seg
            continue
        lo = seg.start
        while lo < seg.start + seg.numel:
            hi = min(seg.start + seg.numel, (lo // CPU_PIECE + 1) * CPU_PIECE)
            yield Segment(seg.offset + lo - seg.start, hi - lo, seg.key, seg.decay, lo)
            lo = hi


# ------------------------------------------------------------------------------------------ stochastic rounding
def sr_words(seed: int, key: int, offset: int, count: int, device=None) -> torch.Tensor:
    """The 32-bit random words (int64 tensor) that round elements ``offset .. offset+count`` of ``key``
    (defined in :mod:`zo2.optim.rounding`)."""
    return _rounding().sr_words(seed, key, offset, count, device)


def stochastic_round(
    x: torch.Tensor, dtype: torch.dtype, seed: int, key: int, offset: int = 0
) -> torch.Tensor:
    """Round float32 ``x`` (elements ``offset..`` of parameter ``key``) to ``dtype``, unbiased and seeded: the
    definition in :func:`zo2.optim.rounding.stochastic_round`. Returns a flat tensor of ``dtype``."""
    return _rounding().stochastic_round(x, dtype, seed, key, offset)


def _store_value(
    value: torch.Tensor, dtype: torch.dtype, sr_seed: int | None, key: int, start: int
) -> torch.Tensor:
    """The stored form of an updated segment: stochastically rounded when asked and low precision."""
    if sr_seed is not None and dtype in LOW_PRECISION:
        return stochastic_round(value, dtype, int(sr_seed), key, start)
    return value.to(dtype)


# ------------------------------------------------------------------------------------------------ kernels
def direction(
    seed: int, key: int, start: int, count: int, distribution: str = "gaussian", *, device=None
) -> torch.Tensor:
    """Elements ``start .. start+count`` of the direction of parameter ``key`` at ``seed`` (float32)."""
    _check_distribution(distribution)
    return _rng().direction(int(seed), int(key), start + count, start=start, count=count,
                         distribution=distribution, device=device)


def perturb_pair(
    theta: torch.Tensor,
    segments: Segments,
    seed: int,
    eps: float,
    distribution: str = "gaussian",
    *,
    out_plus: torch.Tensor | None = None,
    out_minus: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(θ + εz, θ − εz)`` for every segment of the flat buffer ``theta``; math in float32.

    Outputs have ``theta``'s dtype and shape unless ``out_plus`` / ``out_minus`` are given (any float dtype).
    """
    _check_distribution(distribution)
    table = SegmentTable.coerce(segments)
    flat = _flat(theta, table)
    plus = _out_like(theta, out_plus, "out_plus")
    minus = _out_like(theta, out_minus, "out_minus")
    _perturb_into(flat, table, int(seed), float(eps), distribution, plus.view(-1), minus.view(-1))
    return plus, minus


def _for_pieces(fn, table: SegmentTable, device: torch.device) -> None:
    """``fn(seg)`` for every piece of ``table`` (:func:`_pieces`); on the CPU on torch's thread count of threads,
    each piece on one (:func:`zo2.optim.native.map_pieces`). Pieces write disjoint slices."""
    if device.type != "cpu":
        for seg in table:
            fn(seg)
        return
    from zo2.optim import native

    native.map_pieces(fn, _pieces(table, device))


def _perturb_into(flat, table, seed, eps, distribution, plus, minus) -> None:
    upd = _upd()

    def piece(seg: Segment) -> None:
        # Math in update.math_dtype(θ) (float32 but for float64 θ), cast once, straight to each output's dtype.
        t = flat[seg.offset : seg.end]
        z = _z_of(seg, distribution, flat.device)(seed)  # generated once, used for both signs
        plus[seg.offset : seg.end] = upd.perturbed(t, [(seed, 1.0)], eps, lambda _: z, out_dtype=plus.dtype)
        minus[seg.offset : seg.end] = upd.perturbed(t, [(seed, -1.0)], eps, lambda _: z, out_dtype=minus.dtype)

    _for_pieces(piece, table, flat.device)


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
) -> torch.Tensor:
    """θ − lr (Σ cᵢ z(seedᵢ) + λ·decay·θ) per segment, math in float32, stored in ``out``'s dtype.

    (Math in float64 for a float64 θ, following :func:`zo2.optim.update.math_dtype`; the Triton backend takes
    16- and 32-bit floats only.)

    ``out`` defaults to a new tensor like ``theta``; ``out=theta`` updates in place. With no seeds there is
    no step: θ is copied (rounded to ``out``'s dtype). ``stochastic_rounding_seed`` turns on stochastic
    rounding when ``out`` is bfloat16/float16 (ignored for float32).
    """
    _check_distribution(distribution)
    table = SegmentTable.coerce(segments)
    flat = _flat(theta, table)
    seeds_l = _as_list(seeds, int)
    coeffs_l = _as_list(coeffs, float)
    if len(seeds_l) != len(coeffs_l):
        raise ValueError(f"{len(seeds_l)} seeds but {len(coeffs_l)} coefficients")
    new = _out_like(theta, out, "out")
    _update_into(flat, table, seeds_l, coeffs_l, float(lr), float(weight_decay), distribution,
                 stochastic_rounding_seed, new.view(-1))
    return new


def _update_into(flat, table, seeds, coeffs, lr, wd, distribution, sr_seed, new) -> None:
    upd = _upd()
    math = upd.math_dtype(flat.dtype)  # float32 (float64 for float64 θ, as the engine does)

    def piece(seg: Segment) -> None:
        t = flat[seg.offset : seg.end]
        if seeds:
            d = upd.combined_direction(seeds, coeffs, _z_of(seg, distribution, flat.device), math)
            value = upd.updated(t, d, lr, wd if seg.decay else 0.0)
        else:
            value = t.to(math)
        new[seg.offset : seg.end] = _store_value(value, new.dtype, sr_seed, seg.key, seg.start)

    _for_pieces(piece, table, flat.device)


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
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The deferred update then the dual perturbation: ``(θ_new, θ_new + εz, θ_new − εz)``.

    θ_new is :func:`update` stored in ``out``'s dtype (stochastically rounded if asked); θ± are computed from
    the *stored* θ_new, so they are exactly what perturbing the store afterwards would give.
    """
    outs = (_out_like(theta, out, "out"), _out_like(theta, out_plus, "out_plus"),
            _out_like(theta, out_minus, "out_minus"))
    if _fused_cpu(theta, segments, prev_seeds, prev_coeffs, lr, weight_decay, seed, eps, distribution, outs):
        return outs
    new = update(theta, segments, prev_seeds, prev_coeffs, lr, weight_decay, distribution,
                 stochastic_rounding_seed=stochastic_rounding_seed, out=outs[0])
    plus, minus = perturb_pair(new, segments, seed, eps, distribution,
                               out_plus=outs[1], out_minus=outs[2])
    return new, plus, minus


def _fused_cpu(theta, segments, prev_seeds, prev_coeffs, lr, wd, seed, eps, distribution, outs) -> bool:
    """:func:`update_and_perturb` in one pass per piece for float32 CPU buffers, with the compiled
    ``zo2_update_perturb`` (:func:`zo2.optim.native.update_perturb`): the same float operations in the same order
    as :func:`update` then :func:`perturb_pair` (float32 stores, so no stochastic rounding), the same bits.
    False, having done nothing, where it does not apply (another device or dtype, no seeds, no library)."""
    from zo2.optim import native

    seeds, coeffs = _as_list(prev_seeds, int), _as_list(prev_coeffs, float)
    if (theta.device.type != "cpu" or any(t.dtype != torch.float32 or t.device != theta.device for t in (theta, *outs))
            or not seeds or len(seeds) != len(coeffs) or native.library() is None):
        return False
    _check_distribution(distribution)
    table = SegmentTable.coerce(segments)
    flat = _flat(theta, table)
    new, plus, minus = (o.view(-1) for o in outs)
    upd = _upd()

    def piece(seg: Segment) -> None:
        z_of = _z_of(seg, distribution, flat.device)
        d = upd.combined_direction(seeds, coeffs, z_of, torch.float32)
        z = z_of(int(seed))
        sl = slice(seg.offset, seg.end)
        native.update_perturb(flat[sl], d, z, float(wd) if seg.decay else 0.0, float(lr), float(eps),
                              new[sl], plus[sl], minus[sl])

    _for_pieces(piece, table, flat.device)
    return True
