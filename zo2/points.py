"""Every perturbed point through a unit as one batch, each module's parameters formed just in time.

A step evaluates n points (θ + εz and θ − εz, or 2q of them, or a conservative step's candidates) on a batch of B
rows. The engine runs them as one batch of n·B rows: point i owns rows [i·B, (i+1)·B). Modules without the unit's
parameters (attention arithmetic, activations, masks, rotary embeddings) run on all n·B rows at once; a module
that holds some of the unit's parameters (a linear layer, a norm, an embedding, a LoRA factor) is called once per
point on that point's rows, with its parameters at that point: formed from θ by the kernels into a scratch buffer
right before the call (``θ ± εz`` as the update ``θ − 1·(∓ε z)``, a candidate as the update itself), used, and
dropped. So a unit's weights are needed at one moment per step, never two perturbed copies of a block exist, and
at most one module's perturbed parameters do.

A small module (at most ``PAIR_BYTES`` a point) has θ + εz and θ − εz formed by one ``perturb_pair`` launch, the
second kept for its point's call: the same values, half the launches where launching costs more than the bytes.
A large linear layer or embedding (its weight over ``FORM_CHUNK_BYTES`` a point: an LM head, a vocabulary, a
175B model's feed-forward matrices) is formed a chunk of rows at a time, each chunk used at once (a linear layer's
output columns of those rows, an embedding's lookups of ids in those rows) and dropped: its whole weight at a point
never exists. The values are the same: a chunk is a range of the flat buffer, formed with the sliced table.

The kernels run on the module's range of the unit's flat buffer with the sliced segment table
(``SegmentTable.slice``), which gives exactly the values a pass over the whole buffer gives there: how the buffer is
cut does not change a bit. Every mode (resident, streamed, sliced) runs this same scheme.

A module's input may hold the batch's rows or its tokens flattened (``(n·B·T, d)``): either way point i's part is
the i-th of n equal parts of the first dimension. A module called with one row (a position table read with
``position_ids`` of shape ``(1, T)``) gives each point's output broadcast over that point's B rows.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from zo2.errors import ModelError
from zo2.offload.arith import PAIR_BYTES, chunk_rows, rounding_seed
from zo2.optim.estimators import Point


@dataclass
class Group:
    """A module holding some of a unit's parameters: its slots, and the range of the owner's flat buffer that
    covers the owned ones."""

    module: nn.Module
    slots: list[Any] = field(default_factory=list)
    lo: int = 0
    hi: int = 0
    table: Any = None
    """The kernels' segment table of ``flat[lo:hi]``."""
    offsets: dict[str, tuple[int, int, tuple[int, ...]]] = field(default_factory=dict)
    """Parameter name → (offset in ``flat[lo:hi]``, numel, shape)."""
    chunked: bool | None = None
    """Whether its weight is formed a chunk of rows at a time (zo2.offload.arith.chunk_rows: a large linear layer
    or embedding); None until its first call."""
    chunk_tables: dict[Any, Any] = field(default_factory=dict)
    """A chunk's rows (or a parameter's name) → the kernels' segment table of that chunk's (parameter's) range
    (kept: the kernels cache its device copy per table; the rows depend on the batch's tokens, which a run keeps)."""


def groups_of(unit: Any) -> list[Group]:
    """The modules of ``unit`` that hold its parameters (direct ones), each with the range of the unit's flat
    buffer its owned parameters span (a parameter it reads but another unit owns, a tied weight, is formed from
    that unit's buffer)."""
    by_module: dict[int, Group] = {}
    for slot in unit.slots:  # grouped by the module whose forward reads them (a ParameterDict's holder)
        by_module.setdefault(id(slot.reader), Group(slot.reader)).slots.append(slot)
    groups = list(by_module.values())
    for g in groups:
        _span(g, {s.name for s in g.slots}, unit)
    return groups


def check_called(unit: str, groups: Sequence[Group], called: set[int]) -> None:
    """After a unit's first pass: every module holding its trainable parameters was called (``called``: the
    groups' ids; their values at a point exist only inside that call). A parameter read some other way would stay
    at θ at every point and never train: a ModelError naming it, instead of a run that silently does not learn it."""
    missed = [g for g in groups if id(g) not in called]
    if missed:
        names = [s.name for g in missed for s in g.slots][:4]
        raise ModelError(
            f"{unit}: the trainable parameters {names} are read without a call of the module holding them "
            f"({', '.join(sorted({type(g.module).__name__ for g in missed}))}), so zo2 cannot give them their "
            "perturbed values and they would never train. Freeze them (requires_grad = False), or adapt the model "
            "so the module that reads them is the one that holds them.")


def _span(group: Group, names: set[str], unit: Any) -> None:
    segs = [seg for seg in unit.layout if seg.name in names]
    if not segs:
        return
    group.lo = min(seg.offset for seg in segs)
    group.hi = max(seg.offset + seg.numel for seg in segs)
    group.table = unit.table.slice(group.lo, group.hi)
    group.offsets = {seg.name: (seg.offset - group.lo, seg.numel, tuple(seg.shape)) for seg in segs}


class PointValues:
    """Forms a group's parameters at a point from a flat buffer (the kernels' arithmetic, out of place)."""

    def __init__(self, config: Any, kernels: Any, compute_dtype: torch.dtype):
        self.config = config
        self.kernels = kernels
        self.compute_dtype = compute_dtype
        self.itemsize = torch.empty((), dtype=compute_dtype).element_size()

    def form_pair(self, flat: Any, lo: int, hi: int, table: Any, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``flat[lo:hi]`` at θ + εz(seed) and θ − εz(seed), in the compute dtype, from one kernel launch."""
        src = flat[lo:hi]
        plus = torch.empty(hi - lo, dtype=self.compute_dtype, device=src.device)
        minus = torch.empty(hi - lo, dtype=self.compute_dtype, device=src.device)
        self.kernels.perturb_pair(src, table, seed, self.config.eps, self.config.distribution, out_plus=plus,
                                  out_minus=minus)
        return plus, minus

    def form(self, flat: torch.Tensor, lo: int, hi: int, table: Any, point: Point) -> torch.Tensor:
        """``flat[lo:hi]`` at ``point``, in the compute dtype (a view of ``flat`` for θ itself where the dtypes
        match). ``flat``: the unit's buffer, or a source giving its ranges (zo2.offload.pieces.PieceSource)."""
        src = flat[lo:hi]
        cfg, k = self.config, self.kernels
        if point.after is not None:
            upd = point.after
            out = torch.empty(hi - lo, dtype=src.dtype, device=src.device)
            k.update(src, table, upd.seeds, upd.coeffs, upd.lr, cfg.weight_decay, cfg.distribution,
                     stochastic_rounding_seed=rounding_seed(cfg, upd, src.dtype), out=out)
            return out if out.dtype == self.compute_dtype else out.to(self.compute_dtype)
        if not point.terms:
            return src if src.dtype == self.compute_dtype else src.to(self.compute_dtype)
        (seed, sign), = point.terms
        out = torch.empty(hi - lo, dtype=self.compute_dtype, device=src.device)
        # θ ± εz as the update θ − 1·((∓ε) z): one read of θ, one write of the point
        k.update(src, table, [seed], [-sign * cfg.eps], 1.0, 0.0, cfg.distribution, out=out)
        return out


class PointsForward:
    """Installs, for one unit's visit, the per-point calls on the modules holding its parameters (see the module
    docstring): ``installed(groups, flat, tied)`` with the unit's flat buffer on the compute device and, for
    parameters the unit reads but another unit owns, ``tied(name)`` → (that unit's buffer, the parameter's range
    lo, hi there, its segment table, its shape)."""

    def __init__(self, values: PointValues, points: Sequence[Point], rows: int):
        self.values = values
        self.points = list(points)
        self.rows = rows
        """B: the rows of one point (the batch has n·B)."""
        self.current: int | None = None
        """The point whose rows are running inside a per-point call (nested modules use it as it is)."""
        self._pairs: dict[tuple[int, int], torch.Tensor] = {}
        """θ − εz of a small module formed with its θ + εz, by (group, point), until that point's call."""
        self.called: set[int] = set()
        """The groups (ids) whose module was called."""

    @contextlib.contextmanager
    def at(self, i: int) -> Iterator[None]:
        """Run what follows at point ``i`` alone (its rows only, e.g. the head one point at a time)."""
        previous, self.current = self.current, i
        try:
            yield
        finally:
            self.current = previous

    @contextlib.contextmanager
    def installed(self, groups: Sequence[Group], flat: torch.Tensor | None,
                  tied: Callable[[str], tuple[torch.Tensor, int, int, Any, tuple[int, ...]]] | None = None
                  ) -> Iterator[None]:
        saved = []
        try:
            for g in groups:
                saved.append((g.module, g.module.__dict__.get("forward")))
                g.module.forward = self._wrapped(g, g.module.forward, flat, tied)
            yield
        finally:
            for module, previous in saved:
                if previous is None:
                    del module.__dict__["forward"]
                else:
                    module.forward = previous

    def _wrapped(self, group: Group, forward: Callable, flat: torch.Tensor | None, tied: Any) -> Callable:
        around = getattr(flat, "call", None)  # streamed a piece at a time: what a call reads stays held through it

        def call(*args: Any, **kwargs: Any) -> Any:
            self.called.add(id(group))
            args, kwargs = _in_dtype((args, kwargs), self.values.compute_dtype)
            with around() if around is not None else contextlib.nullcontext():
                if self.current is not None or len(self.points) == 1:
                    return self._at(group, forward, flat, tied, self.current or 0, args, kwargs)
                return self._per_point(group, forward, flat, tied, args, kwargs)
        return call

    def _at(self, group: Group, forward: Callable, flat: torch.Tensor | None, tied: Any, i: int,
            args: tuple, kwargs: dict) -> Any:
        """Call ``forward`` with the group's parameters at point ``i``."""
        point = self.points[i]
        if group.chunked is None:
            group.chunked = self._chunking(group, tied) is not None
        if group.chunked:
            return self._chunked(group, flat, tied, i, args, kwargs)
        views: dict[str, torch.Tensor] = {}
        if group.offsets:
            buf = self._formed(group, flat, i)
            views = {n: buf[o : o + k].view(shape) for n, (o, k, shape) in group.offsets.items()}
        for s in group.slots:
            if s.name not in views:
                src, lo, hi, table, shape = tied(s.name)
                views[s.name] = self.values.form(src, lo, hi, table, point).view(shape)
        saved = [(s, s.module._parameters[s.attr]) for s in group.slots]
        previous, self.current = self.current, i
        try:
            for s in group.slots:
                s.module._parameters[s.attr] = views[s.name]
            return forward(*args, **kwargs)
        finally:
            self.current = previous
            for s, p in saved:
                s.module._parameters[s.attr] = p

    def _chunking(self, group: Group, tied: Any) -> int | None:
        weight = next((s for s in group.slots if s.attr == "weight"), None)
        if weight is None or any(s.attr not in ("weight", "bias") for s in group.slots):
            return None
        shape = group.offsets[weight.name][2] if weight.name in group.offsets else tied(weight.name)[4]
        return chunk_rows(group.module, shape, self.values.itemsize)

    def _source(self, group: Group, name: str, flat: Any, tied: Any) -> tuple[Any, int, Any, tuple[int, ...]]:
        """(buffer, offset, segment table of [offset, offset + numel), shape) of a parameter a group reads."""
        if name in group.offsets:
            o, k, shape = group.offsets[name]
            table = group.chunk_tables.get(name)
            if table is None:
                table = group.chunk_tables[name] = group.table.slice(o, o + k)
            return flat, group.lo + o, table, shape
        src, lo, _, table, shape = tied(name)
        return src, lo, table, shape

    def _chunked(self, group: Group, flat: Any, tied: Any, i: int, args: tuple, kwargs: dict) -> torch.Tensor:
        """A linear layer's or an embedding's call at point ``i`` with its weight formed a chunk of rows at a time:
        a linear layer's output columns of those rows, an embedding's lookups of the ids in them. A linear layer's
        chunk shrinks as its input's tokens grow (rounded up to a power of two: few distinct chunkings, few
        cached tables), so the chunk and its output columns fit FORM_CHUNK_BYTES."""
        point = self.points[i]
        slots = {s.attr: s for s in group.slots}
        src, lo, table, (n, cols) = self._source(group, slots["weight"].name, flat, tied)
        x = args[0] if args else kwargs["input"]
        linear = type(group.module) is nn.Linear
        tokens = 1 << max(0, x.numel() // cols - 1).bit_length() if linear else 0
        rows = chunk_rows(group.module, (n, cols), self.values.itemsize, tokens)
        bias = None
        if "bias" in slots:
            b_src, b_lo, b_table, _ = self._source(group, slots["bias"].name, flat, tied)
            bias = self.values.form(b_src, b_lo, b_lo + n, b_table, point)
        out = None
        for r0 in range(0, n, rows):
            r1 = min(r0 + rows, n)
            chunk_table = group.chunk_tables.get((r0, r1))
            if chunk_table is None:
                chunk_table = group.chunk_tables[(r0, r1)] = table.slice(r0 * cols, r1 * cols)
            w = self.values.form(src, lo + r0 * cols, lo + r1 * cols, chunk_table, point).view(r1 - r0, cols)
            if linear:
                part = F.linear(x, w, None if bias is None else bias[r0:r1])
                if out is None:
                    out = part.new_empty(*part.shape[:-1], n)
                out[..., r0:r1] = part
            else:  # each id lies in one chunk: where it does, its row
                part = F.embedding((x - r0).clamp(0, r1 - r0 - 1), w)
                out = part if out is None else torch.where(((x >= r0) & (x < r1)).unsqueeze(-1), part, out)
        return out

    def _formed(self, group: Group, flat: Any, i: int) -> torch.Tensor:
        """The group's owned parameters at point ``i``. A small module (at most :data:`PAIR_BYTES` a point) at
        θ + εz whose next point is θ − εz gets both from one kernel launch (``perturb_pair``, the same values),
        the second kept for that point's call: half the launches where launching, not bytes, costs."""
        kept = self._pairs.pop((id(group), i), None)
        if kept is not None:
            return kept
        point = self.points[i]
        nxt = self.points[i + 1] if i + 1 < len(self.points) else None
        size = (group.hi - group.lo) * self.values.itemsize
        if (size <= PAIR_BYTES and nxt is not None and point.after is None and nxt.after is None
                and len(point.terms) == 1 and len(nxt.terms) == 1 and point.terms[0][1] == 1.0
                and nxt.terms[0] == (point.terms[0][0], -1.0)):
            plus, minus = self.values.form_pair(flat, group.lo, group.hi, group.table, point.terms[0][0])
            self._pairs[(id(group), i + 1)] = minus
            return plus
        return self.values.form(flat, group.lo, group.hi, group.table, point)

    def _per_point(self, group: Group, forward: Callable, flat: torch.Tensor | None, tied: Any,
                   args: tuple, kwargs: dict) -> Any:
        n, b = len(self.points), self.rows
        lead = next((a for a in list(args) + list(kwargs.values()) if torch.is_tensor(a)), None)
        total = None if lead is None or lead.dim() == 0 else lead.shape[0]
        if total == 1 and n * b != 1:  # one row: each point's output broadcast over its B rows
            return _cat([_expand(self._at(group, forward, flat, tied, i, args, kwargs), b) for i in range(n)])
        if total is None or total % (n * b) or (lead.dim() == 1 and total != n * b):
            raise ModelError(
                f"{type(group.module).__name__} holds trainable parameters but its input (shape "
                f"{None if lead is None else tuple(lead.shape)}) does not start with the batch's {n}×{b} rows (or "
                "its tokens, or one row): zo2 runs the perturbed points as one batch and cannot give each point its "
                "rows here. This module's family needs its own block adapter.")
        per = total // n  # point i's rows (or its rows' tokens, flattened) are [i·per, (i+1)·per)
        return _cat([self._at(group, forward, flat, tied, i, *_rows((args, kwargs), total, i * per, (i + 1) * per))
                     for i in range(n)])


def _in_dtype(call: tuple[tuple, dict], dtype: torch.dtype) -> tuple[tuple, dict]:
    """A group's call with its floating-point tensor arguments in ``dtype``, the dtype its parameters are formed in.
    Code around a module may cast its input to the stored parameter's dtype (peft's LoRA layers cast ``x`` to
    ``lora_A.weight.dtype``: fp32 adapters stored for a bf16 compute); the module then reads formed values."""
    args, kwargs = call

    def cast(t: Any) -> Any:
        return t.to(dtype) if torch.is_tensor(t) and t.is_floating_point() and t.dtype != dtype else t

    return tuple(cast(a) for a in args), {k: cast(v) for k, v in kwargs.items()}


def _rows(tree: Any, total: int, lo: int, hi: int) -> Any:
    """``tree`` with every tensor whose first dimension is the whole batch cut to rows [lo, hi)."""
    if torch.is_tensor(tree):
        return tree[lo:hi] if tree.dim() > 0 and tree.shape[0] == total else tree
    if isinstance(tree, tuple):
        return tuple(_rows(t, total, lo, hi) for t in tree)
    if isinstance(tree, list):
        return [_rows(t, total, lo, hi) for t in tree]
    if isinstance(tree, dict):
        return {k: _rows(v, total, lo, hi) for k, v in tree.items()}
    return tree


def _expand(out: Any, rows: int) -> Any:
    if torch.is_tensor(out):
        return out.expand(rows, *out.shape[1:]) if out.dim() > 0 and out.shape[0] == 1 else out
    if isinstance(out, tuple):
        return tuple(_expand(o, rows) for o in out)
    return out


def _cat(outs: list[Any]) -> Any:
    first = outs[0]
    if torch.is_tensor(first):
        return torch.cat(outs, dim=0)
    if isinstance(first, tuple):
        return tuple(_cat([o[j] for o in outs]) for j in range(len(first)))
    if first is None:
        return None
    raise ModelError(f"a module holding trainable parameters returned {type(first).__name__}; zo2 can join "
                     "per-point outputs only when they are tensors or tuples of tensors.")
