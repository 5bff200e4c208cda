"""The node store: every unit's trainable parameters in shared memory, owned by the scheduler.

The scheduler (:mod:`zo2.control.scheduler`) creates one :class:`~zo2.offload.store.ParameterStore` per node
with *all* units — embedding, blocks, head — as named ``/dev/shm`` files, fills it once (a seeded init or the
safetensors shards, tensor by tensor), and hands workers a :class:`StoreSpec`. A worker's engine maps the store
instead of building its own (``ZOEngine(..., store_spec=spec)``): streamed blocks upload from it and write back
to it every step; resident units (the embedding and head, blocks that fit on the device) are copied out once
and written back at every sync point (snapshot, stop, end).

Beside the weights, :class:`StoreMarkers` records for every unit and writer (the process that writes that slice
back: local rank r with sliced transfers, else 0) the last step whose update the store's copy holds and
whether a write is in flight. After a crash the scheduler reads them to bring every unit to the last logged
step: clean slices are caught up from the trajectory log; a slice whose write was in flight (torn) is rebuilt
from the newest snapshot (or the base weights) and the log.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from typing import Any, Sequence

import torch

from zo2.errors import ResourceError
from zo2.offload.markers import StoreMarkers, layout_digest
from zo2.offload.state import STEP_KEY, StateArea, load_views, state_views
from zo2.offload.store import new_store_name


@dataclass(frozen=True)
class StoreSpec:
    """What a worker needs to map the node store: names, dtype, padding, size and layout digest."""

    name: str
    """Prefix of the /dev/shm files: ``{name}-block{i}`` per unit, ``{name}-markers``."""
    dtype: str
    """Storage dtype, e.g. 'torch.float32'."""
    pad_to: int
    """Each unit's buffer is padded to a multiple of this (equal slices for every writer)."""
    units: int
    writers: int
    """Processes that write slices back (the node's workers with sliced transfers)."""
    digest: str
    state_names: tuple[str, ...] = ()
    """A stateful optimizer's buffer names (zo-sgd-momentum, zo-adam): their :class:`StateArea` exists."""

    @property
    def torch_dtype(self) -> torch.dtype:
        return getattr(torch, self.dtype.removeprefix("torch."))

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> "StoreSpec":
        fields = json.loads(text)
        fields["state_names"] = tuple(fields.get("state_names", ()))
        return cls(**fields)



class NodeStore:
    """The scheduler's side of the node store: create it for ``model``, fill it, snapshot and repair it.

    ``model``'s trainable parameters (real, or on the meta device for a model filled later) are re-pointed at
    the store's views, so after :meth:`fill` the module reads the store and nothing is held twice.
    """

    def __init__(self, model: torch.nn.Module, config: Any, writers: int):
        from zo2.config.zo import torch_dtype
        from zo2.models.units import build_units
        from zo2.offload.arith import segment_table
        from zo2.models.base import adapter_for
        from zo2.offload.store import ALIGN, ParameterStore
        from zo2.optim.optimizers import build_optimizer
        from zo2.optim.update import math_dtype

        self.config = config
        params = {n: p for n, p in model.named_parameters() if p.requires_grad}
        storage = torch_dtype(config.storage_dtype)
        if storage is not None:
            for p in params.values():
                if p.dtype != storage:
                    p.data = p.data.to(storage)
        self.units = build_units(adapter_for(model), params, type(model).__name__)
        dtypes = {p.dtype for p in params.values()}
        if len(dtypes) != 1:
            raise ResourceError(f"The model's trainable weights mix dtypes {sorted(map(str, dtypes))}; the node "
                                "store holds one dtype. Set model.dtype or optim.storage_dtype.")
        dtype = dtypes.pop()
        self.name = new_store_name()
        self.store = ParameterStore.from_blocks([[(n, params[n]) for n in u.owned] for u in self.units], dtype,
                                                pin=False, shared=True, create=True, name=self.name,
                                                pad_to=writers * ALIGN)
        self.markers = StoreMarkers(self.name, len(self.units), writers, create=True)
        self.writers = writers
        self.tables = [segment_table(self.store.layout(k), params, config.no_decay) for k in range(len(self.units))]
        self.views = [self.store.views(self.store.flat(k), self.store.layout(k)) for k in range(len(self.units))]
        self.optimizer = build_optimizer(config)
        names = self.optimizer.state_names
        self.state = StateArea(self.name, self.store.layouts, names, math_dtype(dtype), pad_to=writers * ALIGN,
                               create=True) if names else None
        self.spec = StoreSpec(self.name, str(dtype), writers * ALIGN, len(self.units), writers,
                              layout_digest(self.store.layouts), names)

    @property
    def nbytes(self) -> int:
        return self.store.nbytes

    @property
    def state_nbytes(self) -> int:
        """Bytes of the optimizer-state area (0 when stateless)."""
        return self.state.nbytes if self.state is not None else 0

    def tensors(self) -> dict[str, torch.Tensor]:
        """Every trainable parameter by name: views of the store (copy them before the workers write again)."""
        return {name: view for views in self.views for name, view in views.items()}

    def state_tensors(self) -> dict[str, torch.Tensor]:
        """A stateful optimizer's state as a snapshot holds it (views of the state area; ``optimizer/step`` a
        copy), as :meth:`zo2.ZOEngine.optimizer_state` names it; empty when stateless."""
        if self.state is None:
            return {}
        return {**self._state_views(), STEP_KEY: torch.tensor(self.state.count, dtype=torch.int64)}

    def _state_views(self) -> dict[str, torch.Tensor]:
        out = {}
        for k in range(len(self.units)):
            out.update(state_views(self.state.names, self.state.buffers(k), self.store.layout(k)))
        return out

    def slice_of(self, unit: int, writer: int) -> tuple[int, int]:
        from zo2.offload.store import share_bounds

        return share_bounds(self.store.flat(unit).numel(), writer, self.writers)

    # ------------------------------------------------------------------ repair
    def bring_to(self, step: int, records: Sequence[dict], snapshot: Any, fill_base: Any, device: torch.device,
                 *, rebuild_all: bool = False) -> dict[str, int]:
        """Bring every unit to the state after ``step``'s update (``step = -1``: the base weights).

        A clean slice that holds an older step is caught up by replaying the trajectory log (``records``) on
        it; a torn slice, one ahead of ``step`` or, with ``rebuild_all``, every unit is rebuilt from
        ``snapshot`` (a :class:`~zo2.train.checkpoint.Snapshot` at or before ``step + 1``, or None) or, without
        one, ``fill_base(views)`` (fills name → tensor views with the base weights), then the log replayed.
        Updates run with the engine's arithmetic (``zo2.offload.arith.update_flat``) on ``device``.
        """
        from zo2.offload.arith import select_kernels, update_flat
        from zo2.optim.optimizers import UnitState
        from zo2.train.checkpoint import replay_updates

        kernels = select_kernels(self.config.kernels, device, {self.store.dtype})
        counts = {"caught_up": 0, "rebuilt": 0}
        if self.state is not None:
            # a stateful optimizer's state is in the area only as of the last sync point: rebuild the weights
            # and the state together from the snapshot (or the start) and replay the log on both
            rebuild_all = True
            self._reload_state(snapshot)
        start_count = final_count = self.state.count if self.state is not None else 0
        for k in range(len(self.units)):
            applied = self.markers.applied(k)
            rebuild = rebuild_all or self.markers.torn(k) or any(a > step for a in applied)
            if rebuild:
                start = self._reload(k, snapshot, fill_base)
                slices = [((0, self.store.flat(k).numel()), start)]
                counts["rebuilt"] += 1
            else:
                slices = [(self.slice_of(k, w), a + 1) for w, a in enumerate(applied) if a < step]
                counts["caught_up"] += bool(slices)
            for (lo, hi), first in slices:
                if hi <= lo or first > step:
                    continue
                table = self.tables[k].slice(lo, hi) if (lo, hi) != (0, self.store.flat(k).numel()) else self.tables[k]
                target = self.store.flat(k)[lo:hi]
                work = target.to(device) if device.type != "cpu" else target
                state = None
                if self.state is not None:  # always the whole unit (rebuilt)
                    state = UnitState({n: b.to(device) for n, b in self.state.buffers(k).items()}, start_count)
                replay_updates(lambda u: update_flat(kernels, self.config, work, table, u, self.optimizer, state),
                               records, first, step + 1)
                if work is not target:
                    target.copy_(work)
                if state is not None:
                    for n, b in self.state.buffers(k).items():
                        if state.buffers[n] is not b:  # replayed on another device
                            b.copy_(state.buffers[n])
                    final_count = state.count
            self.markers.table[k, :, 0] = step
            self.markers.table[k, :, 1] = 0
        if self.state is not None:
            self.state.count = final_count
        return counts

    def _reload_state(self, snapshot: Any) -> None:
        """The optimizer state from ``snapshot`` (its ``optimizer/...`` tensors), or zero at the start."""
        for k in range(len(self.units)):
            for buf in self.state.buffers(k).values():
                buf.zero_()  # the padding too
        if snapshot is None:
            self.state.count = 0
            return
        self.state.count = load_views(self._state_views(), snapshot.tensors, self.state.names)

    def _reload(self, unit: int, snapshot: Any, fill_base: Any) -> int:
        """Refill a unit from the snapshot (or the base weights); returns the first step to replay."""
        views = self.views[unit]
        if snapshot is not None:
            for name, view in views.items():
                view.copy_(snapshot.tensors[name])
            return snapshot.step
        fill_base(views)
        return 0

    def close(self) -> None:
        """Unlink the shared files (mapped tensors stay valid in processes that still hold them)."""
        self.store.close()
        self.markers.close()
        if self.state is not None:
            self.state.close()
