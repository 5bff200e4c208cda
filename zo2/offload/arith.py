"""The arithmetic on a unit's flat buffer, shared by the engine's visits and the scheduler's store repair: the
kernels' segment table of a layout, the update θ ← θ − lr (D + λθ), its stochastic-rounding seed, and the choice
of kernels backend."""

from __future__ import annotations

from typing import Any, Sequence

import torch

import zo2_kernels
from zo2.errors import ConfigError
from zo2.optim.decay import skips_decay
from zo2.optim.estimators import Update
from zo2.optim.rng import direction_seed, param_key

ROUNDING_STREAM = 0x5352_0000_0000
"""Separates the rounding seeds from the direction seeds."""


def select_kernels(name: str, device: torch.device, dtypes: set[torch.dtype]):
    """The perturbation/update backend: zo2_kernels' Triton kernels or the torch reference."""
    if torch.float64 in dtypes and name != "triton":
        return zo2_kernels.reference  # the Triton kernels take 16- and 32-bit floats only
    try:
        return zo2_kernels.get_backend(name, device)
    except RuntimeError as err:
        raise ConfigError(f"optim.kernels = 'triton' cannot be used: {err}. Use 'auto' or 'torch'.") from None


PAIR_BYTES = 64 << 20
"""Modules whose parameters at a point take at most this many bytes have θ + εz and θ − εz formed by one kernel
launch (zo2.points): both are alive at once."""


FORM_CHUNK_BYTES = 64 << 20
"""A linear layer or an embedding whose weight at a point takes more bytes is formed and used a chunk of rows at a
time (zo2.points): a chunk and (a linear layer's) its output columns take at most this many bytes together."""


def chunk_rows(module: Any, shape: tuple[int, ...], itemsize: int, tokens: int = 0) -> int | None:
    """Rows of ``module``'s weight (of ``shape``) formed at once at a point, or None when it is formed whole: a
    plain ``nn.Linear`` or ``nn.Embedding`` (no max_norm) whose weight takes more than :data:`FORM_CHUNK_BYTES`.
    A linear layer's chunk of rows and its output columns for ``tokens`` input rows fit the chunk together."""
    linear = type(module) is torch.nn.Linear
    embedding = type(module) is torch.nn.Embedding and module.max_norm is None
    if not (linear or embedding) or len(shape) != 2 or shape[0] * shape[1] * itemsize <= FORM_CHUNK_BYTES:
        return None
    return max(1, FORM_CHUNK_BYTES // ((shape[1] + (tokens if linear else 0)) * itemsize))


def formed_numel(module: Any, numel: int, shape: tuple[int, ...] | None, itemsize: int) -> int:
    """Elements of ``module``'s parameters (``numel`` in all; ``shape``: its weight's) formed at one point at once:
    all, or for a chunked weight the chunk's bound (with its output columns), :data:`FORM_CHUNK_BYTES`."""
    rows = chunk_rows(module, shape, itemsize) if shape is not None else None
    return numel if rows is None else FORM_CHUNK_BYTES // itemsize


def point_bytes(module_bytes: float) -> float:
    """The most the points of one module hold at once: its parameters at one point, or at two where they are small
    enough to be formed by one launch."""
    return max(module_bytes, 2 * min(module_bytes, PAIR_BYTES))


def materializes_directions(kernels: Any) -> bool:
    """Whether ``kernels`` hold a parameter's direction z in float32 while they run (the torch reference does,
    one parameter at a time; the Triton kernels generate z in registers)."""
    return kernels is zo2_kernels.reference


def segment_table(layout: Sequence[Any], params: Any, no_decay: str) -> Any:
    """The kernels' segment table of a flat buffer laid out as ``layout``: each parameter's perturbation key
    and whether weight decay applies to it (the ``no_decay`` rule, zo2.optim.decay)."""
    return zo2_kernels.SegmentTable([(seg.offset, seg.numel, param_key(seg.name),
                                      not skips_decay(seg.name, params[seg.name], no_decay)) for seg in layout])


def rounding_seed(config: Any, update: Update, dtype: torch.dtype) -> int | None:
    """Seed of the stochastic rounding of ``update`` (a pure function of base seed and step, so replays and
    offloaded runs round alike); None when the weights are not low precision or rounding is off."""
    if dtype not in (torch.bfloat16, torch.float16) or not config.stochastic_rounding:
        return None
    return direction_seed(config.seed ^ ROUNDING_STREAM, update.step)


def update_flat(kernels: Any, config: Any, target: torch.Tensor, table: Any, update: Update,
                optimizer: Any = None, state: Any = None) -> None:
    """θ ← θ − lr (D + λθ) in place on a flat buffer (or a slice of one) described by ``table``: the
    arithmetic of every update the engine applies, also used to repair a store from the trajectory log.

    D = Σ c z (MeZO-SGD, the fused kernels) unless ``optimizer`` (a :class:`~zo2.optim.optimizers.ZOOptimizer`)
    is not plain SGD: then its rule, with ``state`` (a UnitState: its buffers laid out like ``target``) updated
    in place."""
    if optimizer is None or optimizer.fused:
        kernels.update(target, table, update.seeds, update.coeffs, update.lr, config.weight_decay,
                       config.distribution, stochastic_rounding_seed=rounding_seed(config, update, target.dtype),
                       out=target)
        return
    optimizer.apply(target, table, state, update, config.weight_decay, config.distribution,
                    rounding_seed(config, update, target.dtype), kernels=kernels)
