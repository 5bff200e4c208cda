"""Optimizer state beside the weights: per-unit flat buffers, streamed with their block.

A stateful optimizer (``zo-sgd-momentum``: one buffer; ``zo-adam``: two) keeps for every unit flat buffers laid
out like the unit's parameter buffer (same offsets; float32, float64 for float64 weights), zero at the start:

* a resident unit keeps them on the compute device;
* the streamed blocks keep them in a second :class:`ParameterStore` in host memory (pinned where CUDA exists),
  block k's buffers stacked back to back in its one flat buffer, and a second :class:`BlockStreamer` moves them
  in lockstep with the weights: a pass that applies an update begins both streamers in the same order; when a
  block's deferred update is applied its state is uploaded (or was prefetched), updated on the device next to
  the weights, written back to the host store, and its slot released with the weights' one.
* blocks streamed one matrix at a time (zo2.offload.pieces) keep one host store per state buffer laid out like
  the weights' store, moved a piece at a time with the weights' pieces by rings of their own
  (:class:`PiecewiseState`).
* blocks homed on the NVMe tier keep it in files beside their weights (a torchrun node's, sliced as the weights'),
  moved in lockstep with them by streamers of their own, by block or a piece at a time
  (zo2.offload.nvme_state.NvmeState).

Stateless optimizers keep nothing and every method here is a no-op for them.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Iterable, Sequence

import torch

from zo2.errors import CheckpointError, ResourceError
from zo2.offload.pieces import PieceStore, RingStreamer
from zo2.offload.store import ALIGN, SHM_DIR, Deferred, ParameterStore, Segment, made_by_first
from zo2.offload.streamer import BlockStreamer, TransferStats
from zo2.optim.optimizers import UnitState
from zo2.optim.update import math_dtype

if TYPE_CHECKING:
    from zo2.models.units import Unit

PREFIX = "optimizer/"
"""Saved state tensors are named ``optimizer/<buffer>/<parameter>``; the update count is ``optimizer/step``."""
STEP_KEY = PREFIX + "step"


class StateArea:
    """A stateful optimizer's state for every unit in shared memory: per state buffer (``momentum``; ``exp_avg``,
    ``exp_avg_sq``) one shared :class:`~zo2.offload.store.ParameterStore` laid out and padded exactly like the
    node store (so a worker's slice of a block is the same range in both), and the update count.

    Streamed blocks' state lives here: the workers stream it (their slices) beside the weights. Resident units'
    state lives on each worker's device and is copied here at every sync point. The scheduler snapshots the state
    from here and, after a failure or on resume, rebuilds it with the weights from the newest snapshot and the log.
    """

    def __init__(self, name: str, layouts: Sequence[Any], names: Sequence[str], dtype: torch.dtype, *,
                 pad_to: int, create: bool, pin: bool = False):
        self.names = tuple(names)
        self.owner = create
        self.stores = {s: ParameterStore(list(layouts), dtype, pin=pin, shared=True, name=f"{name}-state-{s}",
                                         create=create, pad_to=pad_to) for s in self.names}
        if create:
            for store in self.stores.values():
                for buf in store.buffers:
                    buf.zero_()
        self._count_path = SHM_DIR / f"{name}-state-count"
        if not create and not self._count_path.exists():
            raise ResourceError(f"The optimizer-state count {self._count_path} does not exist: the scheduler "
                                "creates it before starting the workers.")
        self._count = torch.from_file(str(self._count_path), shared=True, size=1, dtype=torch.int64)

    def buffers(self, unit: int) -> dict[str, torch.Tensor]:
        """Unit ``unit``'s state buffers by name, each laid out like its weights' store buffer."""
        return {s: store.flat(unit) for s, store in self.stores.items()}

    @property
    def nbytes(self) -> int:
        return sum(store.nbytes for store in self.stores.values())

    @property
    def count(self) -> int:
        """Updates applied to the state (Adam's t)."""
        return int(self._count[0])

    @count.setter
    def count(self, value: int) -> None:
        self._count[0] = int(value)

    def close(self) -> None:
        for store in self.stores.values():
            store.close()
        if self.owner:
            self._count_path.unlink(missing_ok=True)

    def __del__(self) -> None:  # best effort, as the stores: never leave /dev/shm files behind
        try:
            self.close()
        except Exception:
            pass


class OptimizerState:
    """Every unit's :class:`UnitState`: resident buffers on the device, streamed ones in a host store."""

    def __init__(self, names: tuple[str, ...], units: list["Unit"], dtype_of, device: torch.device,
                 prefetch: int = 1, area=None, ranges: dict[int, tuple[int, int]] | None = None, nvme: Any = None):
        """``area``: a node's :class:`StateArea` (the scheduler's, or a torchrun node's): the streamed blocks'
        state is streamed from (and written back to) it, sliced by ``ranges`` like the weights. ``nvme``: the
        NVMe-homed blocks' state in files (zo2.offload.nvme_state.NvmeState), or None."""
        self.names = names
        self.nvme = nvme
        self.units = units
        self.states: dict[str, UnitState] = {}
        self.store: ParameterStore | None = None
        self.streamer: BlockStreamer | None = None
        self.area = area
        self.streamers: dict[str, BlockStreamer] = {}
        """With an area: one streamer per state buffer, over the area's store of that buffer."""
        if not names:
            return
        streamed = sorted((u for u in units if u.store_index is not None), key=lambda u: u.store_index)
        self._slot = {u.store_index: (u.store_index if area is not None else j) for j, u in enumerate(streamed)}
        """A streamed unit's buffer in the state store, by its index in the weights' store (a node store holds
        every unit, so those indices need not start at 0 or be consecutive; an area is indexed like it)."""
        for u in units:
            if u.store_index is None and not (nvme is not None and nvme.holds(u)):
                n = u.flat.numel()
                self.states[u.name] = UnitState({s: torch.zeros(n, dtype=math_dtype(u.flat.dtype), device=device)
                                                 for s in names})
            else:
                self.states[u.name] = UnitState({})
        if streamed:
            self._stream(streamed, dtype_of, device, prefetch, ranges)

    def _stream(self, streamed: list["Unit"], dtype_of, device: torch.device, prefetch: int,
                ranges: dict[int, tuple[int, int]] | None) -> None:
        """The host stores and streamers of the streamed blocks' state: the area's stores, one streamer per
        buffer; or a private store holding each block's buffers back to back, one streamer."""
        area = self.area
        if area is not None:
            for name in self.names:
                st = BlockStreamer(area.stores[name], device, prefetch, blocks=[u.store_index for u in streamed])
                st.ranges = dict(ranges or {})
                self.streamers[name] = st
            return
        layouts = [stacked_layout(self.names, u.layout) for u in streamed]
        self.store = ParameterStore(layouts, math_dtype(dtype_of(streamed[0])), pin=device.type == "cuda")
        for buf in self.store.buffers:
            buf.zero_()
        self.streamer = BlockStreamer(self.store, device, prefetch)

    @property
    def stateful(self) -> bool:
        return bool(self.names)

    # ------------------------------------------------------------------ the streaming schedule
    def _all_streamers(self) -> list[BlockStreamer]:
        return list(self.streamers.values()) or ([self.streamer] if self.streamer is not None else [])

    def _every_streamer(self) -> list[BlockStreamer]:
        """The host-homed blocks' state streamers and the NVMe-homed ones'."""
        return self._all_streamers() + (list(self.nvme.streamers.values()) if self.nvme is not None else [])

    def _on_nvme(self, unit: "Unit") -> bool:
        return self.nvme is not None and self.nvme.holds(unit)

    def begin(self, units: Iterable["Unit"]) -> None:
        """A pass that applies an update starts: prefetch the first streamed blocks' state."""
        units = list(units)
        order = [self._slot[u.store_index] for u in units if u.store_index is not None] if self.names else []
        for streamer in self._all_streamers():
            streamer.begin(order)
        if self.nvme is not None:
            self.nvme.begin(units)

    def acquire(self, unit: "Unit") -> UnitState | None:
        """The unit's state on the compute device (a streamed block's is uploaded); None when stateless."""
        if not self.names:
            return None
        state = self.states[unit.name]
        if self._on_nvme(unit):
            state.buffers = self.nvme.acquire(unit)
        elif unit.store_index is not None and self.streamers:
            state.buffers = {s: st.acquire(self._slot[unit.store_index]) for s, st in self.streamers.items()}
        elif unit.store_index is not None:
            slot = self.streamer.acquire(self._slot[unit.store_index])
            n = slot.numel() // len(self.names)
            state.buffers = {s: slot[j * n : (j + 1) * n] for j, s in enumerate(self.names)}
        return state

    def updated(self, unit: "Unit") -> None:
        """The unit's state was updated on the device: write a streamed block's back to the host store."""
        if self._on_nvme(unit):
            self.nvme.updated(unit)
        elif unit.store_index is not None and self.names:
            for streamer in self._all_streamers():
                streamer.write_back(self._slot[unit.store_index])

    def release(self, unit: "Unit") -> None:
        """The visit of ``unit`` ends: its state's device slot may be reused."""
        if self._on_nvme(unit) and self.states[unit.name].buffers:
            self.states[unit.name].buffers = {}
            self.nvme.release(unit)
        elif unit.store_index is not None and self.names and self.states[unit.name].buffers:
            self.states[unit.name].buffers = {}
            for streamer in self._all_streamers():
                streamer.release(self._slot[unit.store_index])

    def synchronize(self) -> None:
        for streamer in self._every_streamer():
            streamer.synchronize()

    # A unit streamed one piece at a time (zo2.offload.pieces) has its state moved by a PiecewiseState.
    def acquire_piece(self, unit: "Unit", piece: int) -> UnitState | None:
        """The state of ``unit``'s piece ``piece`` (its residence's numbering) on the device, at the unit's update
        count; None when stateless."""
        if self._on_nvme(unit):
            return UnitState(self.nvme.acquire_piece(piece), self.states[unit.name].count)
        if self.names:
            raise RuntimeError(f"{unit.name} streams piece by piece but its optimizer state does not; this is a bug "
                               "in zo2.")
        return None

    def piece_updated(self, unit: "Unit", piece: int, step: int) -> None:
        """The state of ``unit``'s piece holds the update of ``step`` on the device: write it back and release
        it."""
        if self._on_nvme(unit):
            self.nvme.piece_updated(piece, step)

    def advance(self, unit: "Unit") -> None:
        """Every piece of ``unit`` received the visit's update: count it once (Adam's t)."""
        if self._on_nvme(unit):
            self.states[unit.name].count += 1

    def invalidate(self) -> None:
        for streamer in self._every_streamer():
            streamer.invalidate()

    def add_stats(self, stats: TransferStats) -> TransferStats:
        """``stats`` (the weights' transfers) plus the state's since the last call."""
        for streamer in self._every_streamer():
            stats.add(streamer.collect_stats())
        return stats

    def close(self) -> None:
        """The end of the run (ZOEngine.close): the NVMe-homed state's files go (no run starts from them)."""
        if self.nvme is not None:
            self.nvme.close()
            self.nvme = None

    # ------------------------------------------------------------------ snapshots
    def _host_buffers(self, unit: "Unit") -> dict[str, torch.Tensor]:
        """The unit's state buffers where they are kept between visits (device, or the host store)."""
        if unit.store_index is None:
            return self.states[unit.name].buffers
        if self.area is not None:
            return self.area.buffers(unit.store_index)
        flat = self.store.flat(self._slot[unit.store_index])
        n = flat.numel() // len(self.names)
        return {s: flat[j * n : (j + 1) * n] for j, s in enumerate(self.names)}

    def count(self) -> int:
        """Updates applied to the state (equal for every unit once no deferred update is pending)."""
        counts = {s.count for s in self.states.values()}
        if len(counts) > 1:
            raise RuntimeError(f"optimizer state counts differ between units ({sorted(counts)}): flush first")
        return counts.pop() if counts else 0

    def tensors(self) -> dict[str, torch.Tensor | Deferred]:
        """Every state buffer by parameter, ``optimizer/<buffer>/<parameter>``, and ``optimizer/step``, copying
        nothing (call after a flush and :meth:`synchronize`; valid until the next step): views where the state is
        kept, the NVMe-homed blocks' as :class:`~zo2.offload.store.Deferred` reads of their files (a snapshot
        writer loads one tensor at a time)."""
        if not self.names:
            return {}
        out: dict[str, torch.Tensor | Deferred] = {}
        for unit in self.units:
            if not self._on_nvme(unit):
                out.update(state_views(self.names, self._host_buffers(unit), unit.layout))
        if self.nvme is not None:
            out.update(self.nvme.tensors(PREFIX))
        out[STEP_KEY] = torch.tensor(self.count(), dtype=torch.int64)
        return out

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Copies of :meth:`tensors` (the whole state in memory)."""
        return {k: (v.load() if isinstance(v, Deferred) else v).detach().clone() for k, v in self.tensors().items()}

    @torch.no_grad()
    def load_state_dict(self, tensors) -> None:
        """Fill every state buffer from ``tensors`` (as :meth:`state_dict` names them)."""
        if not self.names:
            return
        views = {}
        for unit in self.units:
            if not self._on_nvme(unit):
                views.update(state_views(self.names, self._host_buffers(unit), unit.layout))
        self.invalidate()  # device copies of the state uploaded ahead are stale now
        on_nvme = {} if self.nvme is None else {k: d.shape for k, d in self.nvme.tensors(PREFIX).items()}
        check_saved({**{k: tuple(v.shape) for k, v in views.items()}, **on_nvme}, tensors, self.names)
        count = load_views(views, tensors, self.names)
        if self.nvme is not None:
            self.nvme.load(tensors, PREFIX, count)
        for state in self.states.values():
            state.count = count


    # ------------------------------------------------------------------ the scheduler's state area
    @torch.no_grad()
    def load_area(self) -> None:
        """Start from the state area: resident units' buffers are copied from it (streamed ones stream from it),
        and the update count."""
        self.invalidate()
        for unit in self.units:
            if unit.store_index is None and not self._on_nvme(unit):  # NVMe-homed: streamed from its files
                src, dst = self.area.buffers(unit.home), self.states[unit.name].buffers
                for name in self.names:
                    dst[name].copy_(src[name][:dst[name].numel()])
        for state in self.states.values():
            state.count = self.area.count

    @torch.no_grad()
    def save_area(self, lo_hi) -> None:
        """At a sync point (after a flush): wait for the streamed state's write-backs, and copy this process's
        share of each resident unit's state (``lo_hi(numel)``, as the weights) and the count into the area."""
        self.synchronize()
        for unit in self.units:
            if unit.store_index is None and not self._on_nvme(unit):  # NVMe-homed: its files are home already
                src, dst = self.states[unit.name].buffers, self.area.buffers(unit.home)
                for name in self.names:
                    lo, hi = lo_hi(dst[name].numel())
                    hi = min(hi, src[name].numel())  # the resident copy is not padded
                    if hi > lo:
                        dst[name][lo:hi].copy_(src[name][lo:hi])
        self.area.count = self.count()


class PiecewiseState(OptimizerState):
    """The state of blocks streamed one piece at a time (zo2.offload.pieces): per state buffer a host store laid
    out like the weights' store (the node's :class:`StateArea` with sliced transfers, else a private pinned one),
    cut at the weights' piece bounds (``pieces``) and moved by a :class:`~zo2.offload.pieces.RingStreamer` of its
    own: ``prefetch + 2`` × the largest piece per buffer on the device, never a block's state.

    A pass that applies an update begins the rings in the weights' upload order
    (:meth:`~zo2.offload.pieces.PiecewiseResidence.pass_order`). When a piece is brought to the unit's step its
    state is acquired (uploaded, or prefetched), updated with it at the unit's update count, written back and
    released (:meth:`acquire_piece`, :meth:`piece_updated`); once every piece of the unit has the update its count
    advances (:meth:`advance`), so every piece runs Adam's step t of the whole unit. A stateful optimizer always
    writes back every step (``optim.writeback_every = 1``), so a piece's state is never replayed.
    """

    def __init__(self, names: tuple[str, ...], units: list["Unit"], dtype_of, device: torch.device,
                 prefetch: int = 1, area=None, ranges: dict[int, tuple[int, int]] | None = None, *,
                 pieces: PieceStore, nvme: Any = None):
        self.pieces = pieces
        self.hosts: dict[str, ParameterStore] = {}
        """Per state buffer, the host store the streamed blocks' state lives in (indexed like the weights')."""
        super().__init__(names, units, dtype_of, device, prefetch, area=area, ranges=ranges, nvme=nvme)

    def _stream(self, streamed: list["Unit"], dtype_of, device: torch.device, prefetch: int,
                ranges: dict[int, tuple[int, int]] | None) -> None:
        weights = self.pieces.store
        if self.area is not None:
            self.hosts = dict(self.area.stores)
        else:
            for name in self.names:
                store = self.hosts[name] = ParameterStore(weights.layouts, math_dtype(weights.dtype),
                                                          pin=device.type == "cuda")
                for buf in store.buffers:
                    buf.zero_()
        if any(self.hosts[n].flat(i).numel() != weights.flat(i).numel()
               for n in self.names for i in range(len(weights))):
            raise RuntimeError("the optimizer state's store is not laid out like the weights'; this is a bug in zo2.")
        for name in self.names:
            ring = RingStreamer(PieceStore(self.hosts[name], self.pieces.pieces), device, prefetch)
            ring.ranges = dict(ranges or {})
            self.streamers[name] = ring

    def begin(self, units: Iterable["Unit"]) -> None:
        units = list(units)
        res = next((u.residence for u in units if u.store_index is not None), None)
        order = res.pass_order(units) if res is not None else []
        for streamer in self._all_streamers():
            streamer.begin(order)
        if self.nvme is not None:
            self.nvme.begin(units)

    def acquire_piece(self, unit: "Unit", piece: int) -> UnitState | None:
        if self._on_nvme(unit):
            return super().acquire_piece(unit, piece)
        return UnitState({s: st.acquire(piece) for s, st in self.streamers.items()}, self.states[unit.name].count)

    def piece_updated(self, unit: "Unit", piece: int, step: int) -> None:
        if self._on_nvme(unit):
            return super().piece_updated(unit, piece, step)
        for streamer in self._all_streamers():
            streamer.write_back(piece)
            streamer.release(piece)

    def advance(self, unit: "Unit") -> None:
        self.states[unit.name].count += 1

    def _host_buffers(self, unit: "Unit") -> dict[str, torch.Tensor]:
        if unit.store_index is None:
            return super()._host_buffers(unit)
        return {s: store.flat(unit.store_index) for s, store in self.hosts.items()}


def state_views(names: Iterable[str], buffers: dict[str, torch.Tensor], layout: Iterable[Segment]
                ) -> dict[str, torch.Tensor]:
    """``optimizer/<buffer>/<parameter>`` → parameter-shaped view of a unit's state ``buffers`` (by buffer name,
    each laid out as ``layout``): how snapshots name the state."""
    return {f"{PREFIX}{name}/{seg.name}": buffers[name][seg.offset : seg.offset + seg.numel].view(seg.shape)
            for name in names for seg in layout}


def stacked_layout(names: Sequence[str], layout: Sequence[Segment]) -> list[Segment]:
    """The layout of a block's state buffer: one copy of the weights' ``layout`` per state buffer (``names``),
    back to back, each segment named ``<buffer>/<parameter>``."""
    n = max((s.offset + s.numel for s in layout), default=0)
    return [Segment(f"{name}/{s.name}", j * n + s.offset, s.numel, s.shape)
            for j, name in enumerate(names) for s in layout]


def check_saved(shapes: dict[str, tuple[int, ...]], tensors, names: Iterable[str]) -> None:
    """CheckpointError unless ``tensors`` holds every state tensor ``shapes`` names (name → shape), with that
    shape, and the update count."""
    missing = [k for k in [*shapes, STEP_KEY] if k not in tensors]
    if missing:
        raise CheckpointError(
            f"The saved state lacks {len(missing)} optimizer-state tensors, e.g. {missing[:2]}: it was saved "
            f"without the state of this optimizer ({', '.join(names)}). Resume it with the optimizer it "
            "was trained with (the run's optim.optimizer), or replay the trajectory from the base weights "
            "(`zo2 replay RUN_DIR --from-base`).")
    for key, shape in shapes.items():
        saved = tensors[key]
        if tuple(saved.shape) != tuple(shape):
            raise CheckpointError(f"Saved optimizer state {key} has shape {tuple(saved.shape)}, the parameter's is "
                                  f"{tuple(shape)}.")


@torch.no_grad()
def load_views(views: dict[str, torch.Tensor], tensors, names: Iterable[str]) -> int:
    """Copy saved ``tensors`` into the state ``views`` (:func:`state_views`), checking that every one is there
    with its shape (:func:`check_saved`); returns the saved update count (``optimizer/step``)."""
    check_saved({k: tuple(v.shape) for k, v in views.items()}, tensors, names)
    for key, view in views.items():
        view.copy_(tensors[key])
    return int(tensors[STEP_KEY])


def build_optimizer_state(optimizer: Any, units: list["Unit"], dtype_of, device: torch.device, prefetch: int, *,
                          streamer: BlockStreamer | None, store: ParameterStore | None, comm: Any = None,
                          area: StateArea | None = None, from_area: bool = False, nvme: Any = None
                          ) -> OptimizerState:
    """The optimizer's per-unit state, once the units are placed (``streamer``/``store``: the weights' ones).
    With sliced transfers a stateful optimizer's streamed state lives in a state area shared by the node's
    processes (``area``: the scheduler's; under torchrun the node's first process creates one beside the shared
    weights store), streamed in the weights' slices; ``from_area`` (under the scheduler): the state starts from
    the area. ``nvme``: the NVMe-homed blocks' state (zo2.offload.nvme_state.NvmeState), or None."""
    ranges = None
    if streamer is not None and streamer.ranges and optimizer.state_names:
        ranges = streamer.ranges
        if area is None:
            area = _shared_area(optimizer, store, comm, device)
    if streamer is not None and isinstance(streamer.store, PieceStore) and optimizer.state_names:
        state = PiecewiseState(optimizer.state_names, units, dtype_of, device, prefetch, area=area, ranges=ranges,
                               pieces=streamer.store, nvme=nvme)
    else:
        state = OptimizerState(optimizer.state_names, units, dtype_of, device, prefetch, area=area, ranges=ranges,
                               nvme=nvme)
    if area is not None and from_area:
        state.load_area()
    return state


def _shared_area(optimizer: Any, store: ParameterStore, comm: Any, device: torch.device) -> StateArea:
    """Under torchrun with sliced transfers: the node's state area, created (zero) by its first process and
    mapped by the others, named after the shared weights store and laid out like it."""
    kwargs = dict(pad_to=comm.local_size * ALIGN, pin=device.type == "cuda")
    args = (store.name, store.layouts, optimizer.state_names, math_dtype(store.dtype))
    return made_by_first(comm, lambda: StateArea(*args, create=True, **kwargs),
                         "making the node's optimizer-state area", lambda: StateArea(*args, create=False, **kwargs))
