"""The node store: every unit's trainable parameters in shared memory, owned by the scheduler.

The scheduler (:mod:`zo2.control.scheduler`) creates one :class:`~zo2.offload.store.ParameterStore` per node
with *all* units — embedding, blocks, head — as named ``/dev/shm`` files, fills it once (a seeded init or the
safetensors shards, tensor by tensor), and hands workers a :class:`StoreSpec`. A worker's engine maps the store
instead of building its own (``ZOEngine(..., store_spec=spec)``): streamed blocks upload from it and write back
to it every step; resident units (the embedding and head, blocks that fit on the device) are copied out once
and written back at every sync point (snapshot, stop, end).

With ``[offload] nvme_path`` set, the blocks that do not fit ``offload.host_memory_budget`` live in files there
instead (:mod:`zo2.control.nvme_store`, one file pair per unit × writer slice): their units in the shared store
are empty, the spec names the folder and the units, and workers stream their slices from the files.

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

from zo2.control.nvme_store import NodeNvme, check_nvme_job, place_units
from zo2.errors import ResourceError
from zo2.offload.markers import StoreMarkers, layout_digest
from zo2.offload.state import PREFIX, STEP_KEY, StateArea, load_views, state_views
from zo2.offload.store import ALIGN, ParameterStore, layout_numel, new_store_name, pack_layout
from zo2.offload.nvme_slices import cuts_digest
from zo2.offload.tiered import host_blocks


def nvme_by_piece(config: Any, writers: int) -> bool:
    """Whether the scheduler cuts its NVMe files by piece for ``writers`` workers: for one matrix at a time,
    ``optim.stream_granularity = 'matrix'``, and ``'auto'`` where pieces split evenly over the writers. The
    scheduler cuts its files before any worker plans, so under 'auto' the workers of a node with NVMe-homed units
    stream one matrix at a time: the same values bit for bit, a fraction of block streaming's device slots (it fits
    every budget block streaming fits), and a step that reads the disk is bound by the disk, not the granularity."""
    return config.stream_granularity == "matrix" or (config.stream_granularity == "auto" and ALIGN % writers == 0)


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
    nvme_path: str | None = None
    """The folder of the NVMe-homed units' files (``{name}-unit{k}-w{r}.a/.b/.json``), or None."""
    nvme_units: tuple[int, ...] = ()
    """The units homed there (their /dev/shm buffers are empty)."""
    nvme_cuts: str = ""
    """With several workers streaming one matrix at a time (optim.stream_granularity = 'matrix', or 'auto' with
    NVMe-homed units: :func:`nvme_by_piece`): the digest of the NVMe files' cuts by piece
    (zo2.offload.nvme_slices.cuts_digest); "": each slice one range of its unit. A worker whose granularity is
    'auto' streams one matrix at a time where it is set."""

    @property
    def torch_dtype(self) -> torch.dtype:
        return getattr(torch, self.dtype.removeprefix("torch."))

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> "StoreSpec":
        fields = json.loads(text)
        fields["state_names"] = tuple(fields.get("state_names", ()))
        fields["nvme_units"] = tuple(fields.get("nvme_units", ()))
        return cls(**fields)



def _frozen_bytes(module: torch.nn.Module) -> int:
    """Bytes of the frozen (requires_grad=False) parameters under ``module`` (meta ones too: their shapes)."""
    frozen = {id(p): p for p in module.parameters() if not p.requires_grad}
    return sum(p.numel() * p.element_size() for p in frozen.values())


class NodeStore:
    """The scheduler's side of the node store: create it for ``model``, fill it, snapshot and repair it.

    ``model``'s trainable parameters (real, or on the meta device for a model filled later) are re-pointed at
    the store's views, so after :meth:`fill` the module reads the store and nothing is held twice. With ``tiers``
    (the job's ``[offload]`` section) naming an NVMe folder, the units beyond its host budget live in files there
    (``nvme``, :class:`~zo2.control.nvme_store.NodeNvme`); their parameters move to the meta device.
    ``frozen_base``: the model has frozen weights the workers build themselves (``[peft]``).
    """

    def __init__(self, model: torch.nn.Module, config: Any, writers: int, tiers: Any = None, *,
                 frozen_base: bool = False):
        from zo2.config.zo import torch_dtype
        from zo2.models.units import build_units
        from zo2.offload.arith import segment_table
        from zo2.models.base import adapter_for
        from zo2.optim.optimizers import build_optimizer
        from zo2.optim.update import math_dtype

        self.config = config
        params = {n: p for n, p in model.named_parameters() if p.requires_grad}
        storage = torch_dtype(config.storage_dtype)
        if storage is not None:
            for p in params.values():
                if p.dtype != storage:
                    p.data = p.data.to(storage)
        adapter = adapter_for(model)
        self.units = build_units(adapter, params, type(model).__name__)
        dtypes = {p.dtype for p in params.values()}
        if len(dtypes) != 1:
            raise ResourceError(f"The model's trainable weights mix dtypes {sorted(map(str, dtypes))}; the node "
                                "store holds one dtype. Set model.dtype or optim.storage_dtype.")
        dtype = dtypes.pop()
        self.name = new_store_name()
        blocks = [[(n, params[n]) for n in u.owned] for u in self.units]
        self.layouts = [pack_layout(b) for b in blocks]
        """Every unit's layout (an NVMe-homed unit's buffer in the shared store is empty)."""
        self.optimizer = build_optimizer(config)
        names = self.optimizer.state_names
        frozen = [_frozen_bytes(adapter.blocks()[u.index]) if frozen_base and u.kind == "block" else 0
                  for u in self.units]  # the workers' own base weights of each block: host memory or files too
        on_nvme = self._place(tiers, dtype, writers, frozen)
        self.base_on_nvme = sum(frozen[k] for k in on_nvme)
        """Bytes of the base weights the worker keeps in files of its own beside the NVMe-homed units ([peft])."""
        files = [k for k in on_nvme if self.units[k].owned]  # whole-frozen units: only the worker's base files
        by_piece = {k: self.units[k].slots for k in files} if nvme_by_piece(config, writers) else None
        self.nvme = NodeNvme(tiers, self.name, {k: self.layouts[k] for k in files}, dtype, writers,
                             writers * ALIGN, by_piece, names, math_dtype(dtype)) if on_nvme else None  # lock, disk
        self.store = ParameterStore.from_blocks(host_blocks(blocks, on_nvme), dtype, pin=False, shared=True,
                                                create=True, name=self.name, pad_to=writers * ALIGN)
        self.markers = StoreMarkers(self.name, len(self.units), writers, create=True)
        self.writers = writers
        if self.nvme is not None:
            self.nvme.adopt(blocks)
        self.tables = [segment_table(self.layouts[k], params, config.no_decay) for k in range(len(self.units))]
        self.views = [self.store.views(self.store.flat(k), self.store.layout(k)) for k in range(len(self.units))]
        self.state = StateArea(self.name, self.store.layouts, names, math_dtype(dtype), pad_to=writers * ALIGN,
                               create=True) if names else None
        self.spec = StoreSpec(self.name, str(dtype), writers * ALIGN, len(self.units), writers,
                              layout_digest(self.layouts), names, str(self.nvme.folder) if self.nvme else None,
                              tuple(on_nvme), cuts_digest(self.nvme.cuts) if self.nvme else "")

    def _place(self, tiers: Any, dtype: torch.dtype, writers: int, frozen: Sequence[int]) -> list[int]:
        """The units homed on NVMe (none without ``tiers.nvme_path``), each one's bytes counted with its optimizer
        state (homed with it) and its frozen base weights (``frozen``: the workers keep those in host memory, or in
        files beside these on NVMe); ConfigError where the job cannot have any."""
        if tiers is None or tiers.nvme_path is None:
            return []
        itemsize = torch.empty((), dtype=dtype).element_size() + self.optimizer.state_bytes(dtype)  # with the state
        pad = writers * ALIGN
        sizes = [-(-layout_numel(layout) // pad) * pad * itemsize + f for layout, f in zip(self.layouts, frozen)]
        on_nvme = place_units(self.units, sizes, tiers, self.config.prefetch, writers)
        check_nvme_job(on_nvme, any(frozen[k] for k in on_nvme), writers)
        return on_nvme

    @property
    def nbytes(self) -> int:
        return self.store.nbytes

    @property
    def state_nbytes(self) -> int:
        """Bytes of the optimizer-state area (0 when stateless)."""
        return self.state.nbytes if self.state is not None else 0

    def snapshot_tensors(self) -> dict[str, Any]:
        """What a snapshot holds, copying nothing: views of the shared memory and, for NVMe-homed units, deferred
        reads of their files (zo2.offload.store.Deferred: one unit in host memory at a time)."""
        out: dict[str, Any] = {name: view for views in self.views for name, view in views.items()}
        if self.nvme is not None:
            out.update(self.nvme.deferred_weights())
        return out

    def home_weights(self) -> dict[str, Any]:
        """The weights whose model parameters are on the meta device (the NVMe-homed units'), each read from their
        files when loaded (what ``zo2.train.run_dir.save_model`` writes in place of those parameters)."""
        return self.nvme.deferred_weights() if self.nvme is not None else {}

    def fill(self, fill: Any) -> None:
        """``fill(views)`` the store with the base weights (name → tensor views): the shared memory at once, then
        each NVMe-homed unit in turn through a host buffer into its files (as holding step -1)."""
        fill({name: view for views in self.views for name, view in views.items()})
        if self.nvme is not None:
            self.nvme.fill(fill)

    def state_tensors(self) -> dict[str, torch.Tensor]:
        """A stateful optimizer's state as a snapshot holds it (views of the state area; ``optimizer/step`` a
        copy), as :meth:`zo2.ZOEngine.optimizer_state` names it; empty when stateless."""
        if self.state is None:
            return {}
        on_nvme = self.nvme.state_tensors(PREFIX) if self.nvme is not None else {}  # read when the writer asks
        return {**self._state_views(), **on_nvme, STEP_KEY: torch.tensor(self.state.count, dtype=torch.int64)}

    def _state_views(self) -> dict[str, torch.Tensor]:
        out = {}
        for k in range(len(self.units)):
            out.update(state_views(self.state.names, self.state.buffers(k), self.store.layout(k)))
        return out

    def on_nvme(self, unit: int) -> bool:
        """Whether the unit lives in the NVMe files (its buffer in the shared memory is empty)."""
        return self.nvme is not None and self.nvme.holds(unit)

    def numel(self, unit: int) -> int:
        """The unit's padded numel (its buffer in the shared memory, or in its NVMe files)."""
        return self.nvme.numels[unit] if self.on_nvme(unit) else self.store.flat(unit).numel()

    by_piece: set[int] | None = None
    """The units the workers stream one matrix at a time, as they reported them (``note_pieces``); None before."""

    def note_pieces(self, units: Sequence[int]) -> None:
        """The node's workers stream ``units`` one matrix at a time: a writer's part of one is its share of every
        piece (zo2.offload.pieces), not one range."""
        self.by_piece = set(units)

    def writer_parts(self, unit: int, writer: int) -> list[tuple[int, int]] | None:
        """The ranges of the unit's buffer that writer ``writer`` writes back, or None where that depends on a
        plan no worker has reported yet (with several writers, one matrix at a time a writer writes its share of
        every piece, by block one range)."""
        from zo2.offload.nvme_slices import share_parts
        from zo2.offload.pieces import unit_pieces

        if self.on_nvme(unit):
            return self.nvme.files.parts(unit, writer)
        whole = share_parts([(0, self.numel(unit))], writer, self.writers)
        if self.writers == 1 or self.config.stream_granularity == "block":
            return whole
        if self.by_piece is None:
            return None
        if unit not in self.by_piece:
            return whole
        pieces = unit_pieces(self.units[unit].slots, self.store.layout(unit), self.numel(unit))
        return share_parts(pieces, writer, self.writers)

    # ------------------------------------------------------------------ repair
    def bring_to(self, step: int, records: Sequence[dict], snapshot: Any, fill_base: Any, device: torch.device,
                 *, rebuild_all: bool = False) -> dict[str, int]:
        """Bring every unit to the state after ``step``'s update (``step = -1``: the base weights).

        A clean slice that holds an older step is caught up by replaying the trajectory log (``records``) on
        it (a writer's slice: the ranges it writes back, :meth:`writer_parts`); so is a torn slice of an
        NVMe-homed unit, from the step its file's current version holds (a write in flight never switched the
        file's marker: that version is whole). A torn slice in host memory, one ahead of
        ``step`` or, with ``rebuild_all``, every unit is rebuilt from
        ``snapshot`` (a :class:`~zo2.train.checkpoint.Snapshot` at or before ``step + 1``, or None) or, without
        one, ``fill_base(views)`` (fills name → tensor views with the base weights), then the log replayed.
        Updates run with the engine's arithmetic (``zo2.offload.arith.update_flat``) on ``device``. An
        NVMe-homed unit is read from its files (a rebuild reads nothing), repaired in host memory and written back.
        """
        from zo2.offload.arith import select_kernels

        kernels = select_kernels(self.config.kernels, device, {self.store.dtype})
        counts = {"caught_up": 0, "rebuilt": 0}
        if self.state is not None:
            # a stateful optimizer's state is in the area only as of the last sync point: rebuild the weights
            # and the state together from the snapshot (or the start) and replay the log on both
            rebuild_all = True
            self._reload_state(snapshot)
        start_count = final_count = self.state.count if self.state is not None else 0
        for k in range(len(self.units)):
            applied, torn, nvme = self.markers.applied(k), self.markers.torn(k), self.on_nvme(k)
            if torn and nvme and not rebuild_all:
                applied, torn = self._held_in_files(k, applied)
            rebuild = rebuild_all or torn or any(a > step for a in applied)
            slices = [] if rebuild else self._lagging(k, applied, step)
            if slices is None:
                rebuild = True  # the writers hold different steps in parts no worker has described: start afresh
            if rebuild or slices:
                flat = (self.nvme.buffer(k) if rebuild else self.nvme.read(k)) if nvme else self.store.flat(k)
                if rebuild:
                    slices = [((0, self.numel(k)), self._reload(k, flat, snapshot, fill_base))]
                counts["rebuilt" if rebuild else "caught_up"] += 1
                state = self._unit_state(k, snapshot) if self.state is not None else None
                final_count = self._replay(k, flat, slices, records, step, kernels, device, start_count, state)
                if nvme:
                    self.nvme.write(k, flat, step)
                    for name, files in self.nvme.state.items():  # the unit's state, homed beside it
                        files.write(k, state[name], step)
            self.markers.table[k, :, 0] = step
            self.markers.table[k, :, 1] = 0
        if self.state is not None:
            self.state.count = final_count
        return counts

    def _lagging(self, k: int, applied: list[int], step: int) -> list | None:
        """The ranges of unit ``k`` behind ``step`` and the first step each lacks: ((lo, hi), first) pairs; None
        when its writers hold different steps in parts that are not known (:meth:`writer_parts`)."""
        if len(set(applied)) == 1:
            return [((0, self.numel(k)), applied[0] + 1)] if applied[0] < step else []
        parts = [self.writer_parts(k, w) for w in range(len(applied))]
        if None in parts:
            return None
        return [(part, a + 1) for w, a in enumerate(applied) if a < step for part in parts[w]]

    def _held_in_files(self, k: int, applied: list[int]) -> tuple[list[int], bool]:
        """A torn NVMe-homed unit: the step each slice's file holds in its current version, and whether it is
        still torn (a slice never written)."""
        self.nvme.files.refresh()  # the workers switched markers as they wrote their slices back
        held = self.nvme.files.held(k)
        if any(h is None for h in held):
            return applied, True
        return [int(h) for h in held], False

    def _replay(self, k: int, flat: torch.Tensor, slices: list, records: Sequence[dict], step: int, kernels: Any,
                device: torch.device, start_count: int, buffers: dict[str, torch.Tensor] | None = None) -> int:
        """Replay the logged updates from each slice's first step to ``step`` on ``slices`` ((lo, hi), first) of
        unit ``k``'s buffer ``flat`` (and on its optimizer state ``buffers``, by name); returns the optimizer
        state's update count after them."""
        from zo2.offload.arith import update_flat
        from zo2.optim.optimizers import UnitState
        from zo2.train.checkpoint import replay_updates

        count = start_count
        for (lo, hi), first in slices:
            if hi <= lo or first > step:
                continue
            table = self.tables[k].slice(lo, hi) if (lo, hi) != (0, self.numel(k)) else self.tables[k]
            target = flat[lo:hi]
            work = target.to(device) if device.type != "cpu" else target
            state = None
            if buffers is not None:  # always the whole unit (rebuilt)
                state = UnitState({n: b.to(device) for n, b in buffers.items()}, start_count)
            replay_updates(lambda u: update_flat(kernels, self.config, work, table, u, self.optimizer, state),
                           records, first, step + 1)
            if work is not target:
                target.copy_(work)
            if state is not None:
                for n, b in buffers.items():
                    if state.buffers[n] is not b:  # replayed on another device
                        b.copy_(state.buffers[n])
                count = state.count
        return count

    def _unit_state(self, k: int, snapshot: Any) -> dict[str, torch.Tensor]:
        """Unit ``k``'s optimizer state to replay on, as of ``snapshot`` (zero without one): the area's buffers
        (:meth:`_reload_state` filled them), or, for an NVMe-homed unit, new host buffers filled here."""
        if not self.on_nvme(k) or not self.nvme.state:
            return self.state.buffers(k)
        out = {}
        for name in self.state.names:
            out[name] = torch.zeros(self.nvme.numels[k], dtype=self.state.stores[name].dtype)
            if snapshot is not None:
                for seg, view in ParameterStore.views(out[name], self.nvme.layouts[k]).items():
                    view.copy_(snapshot.tensors[f"{PREFIX}{name}/{seg}"])
        return out

    def _reload_state(self, snapshot: Any) -> None:
        """The optimizer state from ``snapshot`` (its ``optimizer/...`` tensors), or zero at the start."""
        for k in range(len(self.units)):
            for buf in self.state.buffers(k).values():
                buf.zero_()  # the padding too
        if snapshot is None:
            self.state.count = 0
            return
        self.state.count = load_views(self._state_views(), snapshot.tensors, self.state.names)

    def _reload(self, unit: int, flat: torch.Tensor, snapshot: Any, fill_base: Any) -> int:
        """Refill a unit (its buffer ``flat``) from the snapshot (or the base weights); returns the first step to
        replay."""
        views = self.nvme.views(unit, flat) if self.on_nvme(unit) else self.views[unit]
        if snapshot is not None:
            for name, view in views.items():
                view.copy_(snapshot.tensors[name])
            return snapshot.step
        fill_base(views)
        return 0

    def close(self) -> None:
        """Unlink the shared files (mapped tensors stay valid in processes that still hold them); delete the NVMe
        files and release their folder."""
        try:
            self.store.close()
            self.markers.close()
            if self.state is not None:
                self.state.close()
        finally:
            if self.nvme is not None:
                self.nvme.close()
