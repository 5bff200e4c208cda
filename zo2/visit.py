"""A unit's visit: its weights fetched from their residence, the deferred update applied once, the perturbed
points formed out of place, the forwards run on them, the buffer released.

The engine (zo2.engine) runs the step; this module is what happens to one unit during it. The unit's residence
(zo2.offload.residence) says where its weights are and moves them; the arithmetic is zo2.offload.arith's and the
kernels' (zo2_kernels), the same for every residence, so resident and streamed runs are bit-identical.
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterator, Mapping, Sequence

import torch

from zo2.offload.arith import rounding_seed, update_flat
from zo2.optim.estimators import Point, Update
from zo2.optim.optimizers import UnitState

Pairs = dict[int, tuple[torch.Tensor, torch.Tensor]]
"""θ + εz and θ − εz of a unit's buffer, by direction seed."""


class Visitor:
    """Visits units for an engine with ``config`` (ZOConfig), the ``kernels`` backend, the ``optimizer`` and its
    per-unit state ``opt_state``; forwards read ``compute_dtype``; ``one_copy``: form one perturbed copy at a
    time (the planner's fallback when θ+εz and θ−εz of a block do not both fit)."""

    def __init__(self, config: Any, kernels: Any, optimizer: Any, opt_state: Any, compute_dtype: torch.dtype,
                 one_copy: bool = False):
        self.config = config
        self.kernels = kernels
        self.optimizer = optimizer
        self.opt_state = opt_state
        self.compute_dtype = compute_dtype
        self.one_copy = one_copy
        self.history: dict[int, Update] = {}
        """Updates by step, kept while some residence's home copy lags behind them (``optim.writeback_every``)."""

    @contextlib.contextmanager
    def visit(self, unit: Any, pending: Update | None, seeds: Sequence[int] = (), home: bool = False
              ) -> Iterator[tuple[torch.Tensor, Pairs]]:
        """The unit's flat buffer on the compute device with ``pending`` applied (once), and θ ± εz(seed).

        A copy whose home lags (its residence holds an older step) first gets the logged updates it lacks,
        replayed with the same calls as when they were first applied. With one seed and an update to apply to
        the whole buffer, the update and both perturbations are one fused pass (``update_and_perturb``). The
        updated part goes home while the forwards run, when the residence wants it or ``home`` asks for it.
        """
        res = unit.residence
        flat = res.acquire(unit)
        cfg, k = self.config, self.kernels
        pairs: Pairs = {}
        try:
            self._catch_up(unit, flat)
            if pending is not None and unit.applied < pending.step:
                part = res.part(unit)
                if part is None and len(seeds) == 1 and not self.one_copy and self.optimizer.fused:
                    plus, minus = self._pair_buffers(flat)
                    k.update_and_perturb(flat, unit.table, pending.seeds, pending.coeffs, pending.lr,
                                         cfg.weight_decay, seeds[0], cfg.eps, cfg.distribution,
                                         stochastic_rounding_seed=rounding_seed(cfg, pending, flat.dtype),
                                         out=flat, out_plus=plus, out_minus=minus)
                    pairs[seeds[0]] = (plus, minus)
                else:
                    self._update(flat if part is None else flat[part], res.table(unit), pending, unit, part)
                unit.applied = pending.step
                if home or res.wants_write_back(unit, pending.step):
                    res.write_back(unit, pending.step)
            elif home and res.held(unit) < unit.applied:
                res.write_back(unit, unit.applied)
            res.assemble(unit, flat)
            for seed in seeds if not self.one_copy else ():
                if seed not in pairs:
                    plus, minus = self._pair_buffers(flat)
                    k.perturb_pair(flat, unit.table, seed, cfg.eps, cfg.distribution, out_plus=plus, out_minus=minus)
                    pairs[seed] = (plus, minus)
            yield flat, pairs
        finally:
            res.release(unit)
            self.opt_state.release(unit)

    def apply(self, unit: Any, update: Update) -> None:
        """Apply ``update`` to ``unit`` unless it holds it already (a logged step replayed)."""
        if unit.applied < update.step:
            with self.visit(unit, update):
                pass

    def settle(self, unit: Any, update: Update | None) -> None:
        """Apply ``update`` (if given and not yet applied) and leave home holding the unit's current weights (a
        flush: every lagging home copy is written)."""
        if (update is not None and unit.applied < update.step) or unit.residence.held(unit) < unit.applied:
            with self.visit(unit, update, home=True):
                pass

    def remember(self, update: Update) -> None:
        """Keep ``update`` for replays on home copies that lag behind it."""
        self.history[update.step] = update

    def forget_before(self, step: int) -> None:
        """Drop the updates of steps up to ``step`` (every home copy holds them)."""
        for s in [s for s in self.history if s <= step]:
            del self.history[s]

    def _catch_up(self, unit: Any, flat: torch.Tensor) -> None:
        """Replay on ``flat`` (just acquired, holding its home's step) the updates home lacks: on the part this
        process owns (sliced transfers: the whole buffer is assembled after the visit's update)."""
        res = unit.residence
        lag = res.held(unit)
        if lag >= unit.applied:
            return
        missing = [s for s in range(lag + 1, unit.applied + 1) if s not in self.history]
        if missing:
            raise RuntimeError(f"{unit.name}: home holds step {lag} but the updates of steps {missing[:3]} to "
                               "replay on it were not kept; this is a bug in zo2.")
        part = res.part(unit)
        target = flat if part is None else flat[part]
        for s in range(lag + 1, unit.applied + 1):
            self._update(target, res.table(unit), self.history[s], unit, part)
        res.replayed(unit.applied - lag)

    def _update(self, target: torch.Tensor, table: Any, update: Update, unit: Any, part: slice | None) -> None:
        """θ ← θ − lr (D + λθ) on ``target`` (``unit``'s buffer, or its ``part`` this process owns with sliced
        transfers) described by ``table``: the fused kernels for MeZO-SGD (D = Σ c z), else the optimizer's rule
        with ``unit``'s state (uploaded, the same part of it updated, written back)."""
        state = self.opt_state.acquire(unit) if not self.optimizer.fused else None
        if state is not None and part is not None:
            view = UnitState({n: b[part] for n, b in state.buffers.items()}, state.count)
            update_flat(self.kernels, self.config, target, table, update, self.optimizer, view)
            state.count = view.count
        else:
            update_flat(self.kernels, self.config, target, table, update, self.optimizer, state)
        if state is not None:
            self.opt_state.updated(unit)

    def _pair_buffers(self, flat: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return (torch.empty(flat.numel(), dtype=self.compute_dtype, device=flat.device),
                torch.empty(flat.numel(), dtype=self.compute_dtype, device=flat.device))

    # ------------------------------------------------------------------ what the forwards read
    def point_values(self, unit: Any, flat: torch.Tensor, pairs: Pairs, point: Point) -> dict[str, torch.Tensor]:
        """Parameter views of the unit's buffer at ``point`` (θ, θ + εz, θ − εz, or θ after a candidate update)."""
        if point.after is not None:
            buf = self._candidate(unit, flat, point.after)
        elif not point.terms:
            buf = flat if flat.dtype == self.compute_dtype else flat.to(self.compute_dtype)
        elif self.one_copy:
            # θ ± εz as the update θ − 1·((∓ε) z): the same float operations as perturb_pair, one copy at a time
            (seed, sign), = point.terms
            buf = torch.empty(flat.numel(), dtype=self.compute_dtype, device=flat.device)
            self.kernels.update(flat, unit.table, [seed], [-sign * self.config.eps], 1.0, 0.0,
                                self.config.distribution, out=buf)
        else:
            (seed, sign), = point.terms
            buf = pairs[seed][0 if sign > 0 else 1]
        return {seg.name: buf[seg.offset : seg.offset + seg.numel].view(seg.shape) for seg in unit.layout}

    def _candidate(self, unit: Any, flat: torch.Tensor, update: Update) -> torch.Tensor:
        """θ after ``update``, out of place: exactly the values applying it would store, in the compute dtype."""
        out = torch.empty(flat.numel(), dtype=flat.dtype, device=flat.device)
        self.kernels.update(flat, unit.table, update.seeds, update.coeffs, update.lr, self.config.weight_decay,
                            self.config.distribution, stochastic_rounding_seed=rounding_seed(self.config, update,
                                                                                             flat.dtype),
                            out=out)
        return out if out.dtype == self.compute_dtype else out.to(self.compute_dtype)


@contextlib.contextmanager
def swapped(unit: Any, values: Mapping[str, torch.Tensor]) -> Iterator[None]:
    """Make the unit's modules read ``values[name]`` instead of their parameters, then restore them."""
    saved = [(s, s.module._parameters[s.attr]) for s in unit.slots]
    try:
        for s in unit.slots:
            s.module._parameters[s.attr] = values[s.name]
        yield
    finally:
        for s, p in saved:
            s.module._parameters[s.attr] = p
