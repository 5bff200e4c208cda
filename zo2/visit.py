"""A unit's visit: its weights fetched from their residence, the deferred update applied once, the forwards run
on them (each module's parameters at each point formed out of place, zo2.points), the buffer released.

The engine (zo2.engine) runs the step; this module is what happens to one unit during it. The unit's residence
(zo2.offload.residence) says where its weights are and moves them; the arithmetic is zo2.offload.arith's and the
kernels' (zo2_kernels), the same for every residence, so resident and streamed runs are bit-identical.
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterator

import torch

from zo2.offload.arith import update_flat
from zo2.optim.estimators import Update
from zo2.optim.optimizers import UnitState


class Visitor:
    """Visits units for an engine with ``config`` (ZOConfig), the ``kernels`` backend, the ``optimizer`` and its
    per-unit state ``opt_state``."""

    def __init__(self, config: Any, kernels: Any, optimizer: Any, opt_state: Any):
        self.config = config
        self.kernels = kernels
        self.optimizer = optimizer
        self.opt_state = opt_state
        self.history: dict[int, Update] = {}
        """Updates by step, kept while some residence's home copy lags behind them (``optim.writeback_every``)."""

    @contextlib.contextmanager
    def visit(self, unit: Any, pending: Update | None, home: bool = False) -> Iterator[torch.Tensor]:
        """The unit's flat buffer on the compute device with ``pending`` applied (once).

        A copy whose home lags (its residence holds an older step) first gets the logged updates it lacks,
        replayed with the same calls as when they were first applied. The updated part goes home while the
        forwards run, when the residence wants it or ``home`` asks for it. The points' parameters are formed from
        the buffer module by module during the forwards (zo2.points).
        """
        res = unit.residence
        flat = res.acquire(unit)
        try:
            if not isinstance(flat, torch.Tensor):  # streamed a piece at a time (zo2.offload.pieces)
                stepped = pending is not None and unit.applied < pending.step
                target = pending.step if stepped else unit.applied
                flat.prepare = lambda piece, buf, lo, hi: self._prepare_piece(unit, piece, buf, (lo, hi), pending,
                                                                               target, home)
                yield flat
                flat.finish()
                if stepped:  # every piece has the update now: the state's update count advances once
                    self.opt_state.advance(unit)
                unit.applied = target
                return
            self._catch_up(unit, flat)
            if pending is not None and unit.applied < pending.step:
                part = res.part(unit)
                self._update(flat if part is None else flat[part], res.table(unit), pending, unit, part)
                unit.applied = pending.step
                if home or res.wants_write_back(unit, pending.step):
                    res.write_back(unit, pending.step)
            elif home and res.held(unit) < unit.applied:
                res.write_back(unit, unit.applied)
            res.assemble(unit, flat)
            yield flat
        finally:
            if not isinstance(flat, torch.Tensor):
                flat.close()
            res.release(unit)
            self.opt_state.release(unit)

    def _prepare_piece(self, unit: Any, piece: int, buf: torch.Tensor, bounds: tuple[int, int],
                       pending: Update | None, target: int, home: bool) -> None:
        """Bring an acquired piece of ``unit`` (the range ``bounds`` of its flat buffer) to step ``target``: the
        logged updates its home copy lacks replayed, then ``pending``, with the piece's slice of the segment
        table (the values a whole-buffer pass gives), on the part this process owns with sliced transfers;
        written back when the residence wants it or ``home``; then assembled whole (sliced transfers). A stateful
        optimizer's state of the piece streams with it (:meth:`_update_piece`)."""
        res = unit.residence
        held = res.piece_held(piece)
        if held < target:
            part = res.piece_part(piece)
            table = res.piece_table(unit, piece, bounds)
            target_buf = buf if part is None else buf[part]
            replays = self._logged(unit, held, min(target, unit.applied))
            for update in replays + ([pending] if target > unit.applied else []):  # target > applied: pending's
                self._update_piece(unit, piece, target_buf, table, update, part)
            res.replayed(len(replays))
            if home or res.piece_wants_write_back(piece, target):
                res.write_piece(piece, target)
        res.assemble(unit, buf)

    def _update_piece(self, unit: Any, piece: int, target: torch.Tensor, table: Any, update: Update,
                      part: slice | None) -> None:
        """θ ← θ − lr (D + λθ) on ``target`` (a piece of ``unit``, or the ``part`` of it this process owns) described
        by ``table``; a stateful optimizer's state of the piece is uploaded, the same part of it updated at the
        unit's update count, written back and released (zo2.offload.state.PiecewiseState)."""
        state = None if self.optimizer.fused else self.opt_state.acquire_piece(unit, piece)
        if state is not None and part is not None:
            state = UnitState({n: b[part] for n, b in state.buffers.items()}, state.count)
        update_flat(self.kernels, self.config, target, table, update, self.optimizer, state)
        if state is not None:
            self.opt_state.piece_updated(unit, piece, update.step)

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
        part = res.part(unit)
        target = flat if part is None else flat[part]
        for update in self._logged(unit, lag, unit.applied):
            self._update(target, res.table(unit), update, unit, part)
        res.replayed(unit.applied - lag)

    def _logged(self, unit: Any, held: int, upto: int) -> list[Update]:
        """The kept updates of steps ``held`` + 1 .. ``upto``, to replay on a copy of ``unit`` whose home holds
        ``held`` (RuntimeError if one was not kept: a bug)."""
        missing = [s for s in range(held + 1, upto + 1) if s not in self.history]
        if missing:
            raise RuntimeError(f"{unit.name}: home holds step {held} but the updates of steps {missing[:3]} to "
                               "replay on it were not kept; this is a bug in zo2.")
        return [self.history[s] for s in range(held + 1, upto + 1)]

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
