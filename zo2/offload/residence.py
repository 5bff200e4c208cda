"""Residences: where a unit's trainable weights live between visits, and how a visit gets them.

A visit (zo2.visit) asks the unit's residence for the unit's flat buffer on the compute device, applies the
deferred update to the part of it this process owns (:meth:`Residence.part`), writes that part back home,
lets the residence assemble the whole buffer (sliced transfers), runs the forwards and releases it::

    flat = r.acquire(unit)          # device copy holding the weights of step r.held(unit) or later
    ... update flat[r.part(unit)] with r.table(unit) ...
    r.write_back(unit, step)        # home now holds ``step`` (once the copy lands)
    r.assemble(unit, flat)          # every process has the whole updated buffer
    ... forwards on flat ...
    r.release(unit)

Implementations, chosen per unit in one place (:func:`zo2.offload.build.build_offload`, from the plan):

* :class:`DeviceResidence` — resident: the home *is* the device buffer; acquire and write-back move nothing.
  With the scheduler's node store, :meth:`~DeviceResidence.sync_home` copies this process's slice of the
  buffer to the node store at sync points (the scheduler snapshots from there).
* :class:`StreamedResidence` — streamed from a host store (private pinned memory, a shared ``/dev/shm`` store,
  or the scheduler's node store) by a :class:`~zo2.offload.streamer.BlockStreamer`: uploads run ahead
  (prefetch), write-backs overlap the forwards. With sliced transfers each process of a node uploads, updates
  and writes back its slice and an all-gather assembles the block.

* :class:`~zo2.offload.tiered.NvmeResidence` — a :class:`StreamedResidence` whose home is a file pair per block
  on an NVMe disk, read ahead into pinned staging buffers; its blocks' parameters are on the meta device, so
  snapshots and loaders reach their values through :meth:`Residence.weights`, :meth:`Residence.load_weights` and
  :meth:`Residence.fill_home`. One matrix at a time, :class:`~zo2.offload.nvme_pieces.NvmePieceResidence` (a
  :class:`~zo2.offload.pieces.PiecewiseResidence`) streams those units' pieces from the staging buffers instead.

A new home for weights is a new residence: the visit does not change.
"""

from __future__ import annotations

import contextlib
import weakref
from typing import Any, Callable, Sequence

import torch

from zo2.offload.store import Deferred, share_bounds
from zo2.offload.streamer import BlockStreamer, TransferStats


class Residence:
    """The interface every residence implements; the defaults are those of a unit that never leaves the device."""

    def begin_pass(self, units: Sequence[Any]) -> None:
        """A pass over ``units`` (visit order) starts: schedule what must move first."""

    def acquire(self, unit: Any) -> torch.Tensor:
        """``unit``'s flat buffer on the compute device, holding the weights of step :meth:`held` or later."""
        raise NotImplementedError

    def part(self, unit: Any) -> slice | None:
        """The part of the buffer this process updates and writes back (None: all of it)."""
        return None

    def table(self, unit: Any) -> Any:
        """The kernels' segment table of :meth:`part`."""
        return unit.table

    def wants_write_back(self, unit: Any, step: int) -> bool:
        """Whether the visit that applied ``step``'s update should send it home now (else home lags, and the next
        visit replays what it lacks: :meth:`held`)."""
        return True

    def write_back(self, unit: Any, step: int) -> None:
        """Send the updated part home; afterwards home holds the weights after ``step``'s update."""

    def assemble(self, unit: Any, flat: torch.Tensor) -> None:
        """Make ``flat`` whole on every process after each updated its part (sliced transfers)."""

    def release(self, unit: Any) -> None:
        """The visit is done with the buffer (its forwards are queued)."""

    def after_visit(self, unit: Any) -> None:
        """Called after the visit's forwards: a chance to start moving the next pass's units."""

    def frozen_weights(self, unit: Any) -> contextlib.AbstractContextManager:
        """While active, the unit's frozen (read-only) parameters are readable on the compute device."""
        return contextlib.nullcontext()

    def held(self, unit: Any) -> int:
        """The step whose update the home copy holds last (-1: the initial weights). :meth:`acquire` returns that
        state; the visit replays the updates held+1 .. ``unit.applied`` on it before anything else."""
        return unit.applied

    def replayed(self, count: int) -> None:
        """``count`` logged updates were replayed on an acquired copy (counted in the transfer stats)."""

    def synchronize(self) -> None:
        """Wait until every write-back landed: afterwards home holds what the device copies hold."""

    def take_issued(self) -> bool:
        """Whether write-backs to a store shared by the node's processes were issued since the last call (the
        caller then enters the node barrier: every process of the node answers alike)."""
        return False

    def invalidate(self) -> None:
        """Forget device copies moved ahead: home was (or is about to be) written from the host."""

    def collect_stats(self) -> TransferStats:
        """Bytes moved since the last call."""
        return TransferStats()

    def sync_home(self, unit: Any) -> None:
        """Make a node store (zo2.control) hold the unit's current weights (nothing to do when it always does)."""

    # The weights of units whose module parameters are not views of their home (the NVMe tier keeps them only
    # in files: those parameters are on the meta device). Elsewhere the parameters themselves are read and written.
    def deferred_weights(self) -> dict[str, Deferred]:
        """The weights only this residence holds, each read when loaded (call after a flush; valid until the next
        step): a snapshot holds one unit of them at a time."""
        return {}

    def load_weights(self, tensors: Any) -> set[str]:
        """Write the weights only this residence holds from ``tensors`` (name → tensor); returns their names."""
        return set()

    def fill_home(self, fill: Callable[[dict[str, torch.Tensor]], None]) -> None:
        """Let ``fill`` write the weights only this residence holds, a unit at a time: it gets name → host tensor
        views of one unit, which then go home (the loaders: checkpoint shards straight into the NVMe files)."""

    frozen_files: Any = None
    """Frozen weights of these units kept only in files (zo2.offload.nvme_frozen.FrozenFiles: a PEFT base's, or
    whole-frozen blocks' past the host budget), or None."""

    def fill_frozen(self, fill: Callable[[dict[str, torch.Tensor]], None]) -> None:
        """As :meth:`fill_home` for the frozen (PEFT base) weights only this residence holds (in files), named as
        the base model's checkpoint names them."""
        if self.frozen_files is not None:
            self.frozen_files.fill(fill)

    def frozen_stats(self) -> TransferStats:
        """What reading the frozen weights' files moved since the last call (beside :meth:`collect_stats`)."""
        return TransferStats(bytes_disk_read=self.frozen_files.take_read() if self.frozen_files is not None else 0)

    def close(self) -> None:
        """End of the run (ZOEngine.close): delete the frozen weights' files (every start fills them again)."""
        if self.frozen_files is not None:
            self.frozen_files.close()


class DeviceResidence(Residence):
    """Units resident on the compute device; with a node store, mirrored to it at sync points."""

    def __init__(self, device: torch.device, node_store: Any = None, markers: Any = None, writer: int = 0,
                 writers: int = 1):
        self.device = torch.device(device)
        self.node_store = node_store
        self.markers = markers
        """The node store's markers (zo2.offload.markers.StoreMarkers), written around every sync."""
        self.writer, self.writers = writer, writers
        """This process's index among the node's writers, and their count: it syncs its share of each unit."""

    def acquire(self, unit: Any) -> torch.Tensor:
        return unit.flat

    def share(self, numel: int) -> tuple[int, int]:
        """This process's share [lo, hi) of a node-store buffer (or state buffer) of ``numel`` elements."""
        return share_bounds(numel, self.writer, self.writers)

    def sync_home(self, unit: Any) -> None:
        if self.node_store is None or unit.flat is None:
            return
        dst = self.node_store.flat(unit.home)
        lo, hi = self.share(dst.numel())
        hi = min(hi, unit.flat.numel())  # the resident copy is not padded
        self.markers.begin(unit.home, self.writer, unit.applied)
        if hi > lo:
            dst[lo:hi].copy_(unit.flat[lo:hi])
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)  # the bytes are in the store before the marker says so
        self.markers.done(unit.home, self.writer, unit.applied)


class StreamedResidence(Residence):
    """Units streamed from a host store through a :class:`BlockStreamer` (``unit.store_index`` names the block);
    ``gather(flat)`` assembles a sliced block (the node's all-gather), None without sliced transfers."""

    def __init__(self, streamer: BlockStreamer, units: Sequence[Any],
                 gather: Callable[[torch.Tensor], None] | None = None, writeback_every: int = 1):
        self.streamer = streamer
        self._units = [weakref.ref(u) for u in units]
        """The units streamed here, held weakly: each unit holds its residence, and a cycle would keep the
        streamer's device slots alive after the engine is dropped, until Python's cycle collector runs."""
        self.gather = gather
        self.writeback_every = writeback_every
        """K: a block's store copy may lag up to K - 1 updates behind (``optim.writeback_every``)."""
        self.last: str | None = None
        """The name of the last streamed unit of a pass: after its visit the next pass's first uploads start."""
        self._held = {u.name: u.applied for u in units}
        """The step each unit's store copy holds."""

    def units(self) -> list[Any]:
        """The units streamed here (those still alive)."""
        return [u for u in (ref() for ref in self._units) if u is not None]

    def begin_pass(self, units: Sequence[Any]) -> None:
        mine = [u for u in units if u.residence is self]
        self.last = mine[-1].name if mine else None
        self.streamer.begin([self.index(u) for u in mine])

    def index(self, unit: Any) -> int:
        """The streamer's name for ``unit``'s block: its index in the host store."""
        return unit.store_index

    def acquire(self, unit: Any) -> torch.Tensor:
        return self.streamer.acquire(self.index(unit))

    def part(self, unit: Any) -> slice | None:
        bounds = self.streamer.ranges.get(self.index(unit))
        return None if bounds is None else slice(*bounds)

    def table(self, unit: Any) -> Any:
        return unit.table if unit.slice_table is None else unit.slice_table

    def wants_write_back(self, unit: Any, step: int) -> bool:
        return step - self.held(unit) >= self.writeback_every

    def write_back(self, unit: Any, step: int) -> None:
        self.streamer.write_back(self.index(unit), step)
        self._held[unit.name] = step

    def held(self, unit: Any) -> int:
        return self._held[unit.name]

    def replayed(self, count: int) -> None:
        self.streamer.stats.replays += count

    def assemble(self, unit: Any, flat: torch.Tensor) -> None:
        if self.gather is not None:
            self.gather(flat)

    def release(self, unit: Any) -> None:
        self.streamer.release(self.index(unit))

    def after_visit(self, unit: Any) -> None:
        if unit.name == self.last:
            self.streamer.prefetch_next_pass()  # overlaps the remaining units and the head

    def frozen_weights(self, unit: Any) -> contextlib.AbstractContextManager:
        return self.streamer.frozen_weights(self.index(unit))

    def synchronize(self) -> None:
        self.streamer.synchronize()

    def take_issued(self) -> bool:
        return self.streamer.take_issued() and bool(self.streamer.ranges)

    def invalidate(self) -> None:
        self.streamer.invalidate()
        self._held = {u.name: u.applied for u in self.units()}  # written from the host: it holds what the units hold

    def collect_stats(self) -> TransferStats:
        return self.streamer.collect_stats()


def set_writeback_every(plan: Any, residences: Sequence[Residence], k: int) -> None:
    """From now on every streamed residence writes its units back every ``k`` steps; ``plan`` says so."""
    plan.writeback_every = k
    for residence in residences:
        if isinstance(residence, StreamedResidence):
            residence.writeback_every = k
