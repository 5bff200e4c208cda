"""The parameter store: every streamed block's parameters in one flat host buffer, pinned.

Block ``i``'s parameters are packed back to back in ``store.flat(i)`` (storage dtype), in the order of
``store.layout(i)``. The module's own parameters are re-pointed at views of that buffer, so ``model`` always
reads and writes the store and nothing is held twice. The buffer is page-locked (``pin_memory`` or
``cudaHostRegister``) where CUDA exists, because DMA from pageable memory runs at an eighth of the speed
(DESIGN.md §7); with ``shared=True`` it is a named file in ``/dev/shm`` that other processes on the node can map.
"""

from __future__ import annotations

import hashlib
import os
import re
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import psutil
import torch
from torch import nn

from zo2.errors import ResourceError

SHM_DIR = Path("/dev/shm")
"""Where shared stores live (tmpfs): a file per unit buffer."""
HOST_MARGIN_BYTES = 2 << 30
"""Host memory left free for the rest of the process when checking that a store fits."""


@dataclass(frozen=True)
class Deferred:
    """A tensor read only when a consumer asks for it (``load()``): shape and dtype known up front, the bytes
    where they are homed (e.g. a unit's file in the NVMe tier). A snapshot writer loads one at a time, so it never
    holds the whole model. ``load()`` may return a view of a buffer the next ``load()`` of the same source
    overwrites: a consumer is done with one before it loads the next."""

    shape: tuple[int, ...]
    dtype: torch.dtype
    load: Callable[[], torch.Tensor]



def deferred_units(layouts: dict[int, Sequence["Segment"]], dtype: torch.dtype,
                   read: Callable[[int], torch.Tensor]) -> dict[str, Deferred]:
    """Every parameter of the units ``layouts`` (unit → its layout) as a :class:`Deferred` view of its unit's flat
    buffer, ``read(k)`` when first asked for; the last unit read is kept (its buffer let go before the next one is
    read), so a consumer that asks for a unit's parameters together reads each unit once and holds one at a time."""
    holds: list = [None, None]  # the unit read, its flat buffer

    def load(k: int, name: str) -> torch.Tensor:
        if holds[0] != k:
            holds[:] = [None, None]
            holds[:] = [k, read(k)]
        return ParameterStore.views(holds[1], layouts[k])[name]

    return {seg.name: Deferred(tuple(seg.shape), dtype, lambda k=k, name=seg.name: load(k, name))
            for k, layout in layouts.items() for seg in layout}

SHM_NAME = re.compile(r"^zo2-node-(\d+)-[0-9a-f]{8}-")
"""Names of shared stores (and their state areas and config files): ``zo2-node-<creator pid>-<8 hex>-...``."""


def new_store_name(pid: int | None = None, nonce: str | None = None) -> str:
    """A shared store's name: the pid of the process that creates it (so that files left by a killed job are
    recognized as stale) and a nonce (random, or agreed on by the processes of one job)."""
    return f"zo2-node-{os.getpid() if pid is None else pid}-{nonce or uuid.uuid4().hex[:8]}"


def shared_store_name(comm) -> str:
    """The name of a torchrun job's shared store on this node, agreed on by its processes (call on each): the pid
    of the node's first process, which creates it — a store left behind by a killed or hung job is then stale
    once that process is gone, and the next run removes it — and a digest of the job's rendezvous."""
    parts = [os.environ.get(k, "") for k in ("TORCHELASTIC_RUN_ID", "MASTER_ADDR", "MASTER_PORT")]
    return new_store_name(comm.local_first_pid(), hashlib.sha1("-".join(parts).encode()).hexdigest()[:8])


def made_by_first(comm: Any, make: Callable[[], Any], what: str, mapped: Callable[[], Any] | None = None) -> Any:
    """``make()`` on the node's first process, after which every process of the node learns whether it worked
    (the others must not wait for something that never comes) and the others run ``mapped()`` (e.g. map what the
    first made); returns what each ran returned (None on the others without ``mapped``). The first's error is
    raised there, a ResourceError naming ``what`` on the others."""
    made, failure = None, None
    if comm.local_rank == 0:
        try:
            made = make()
        except Exception as exc:
            failure = exc
    if not comm.local_share(failure is None, what):
        raise failure or ResourceError(f"The node's first process failed while {what} (its error says why).")
    if comm.local_rank == 0 or mapped is None:
        return made
    return mapped()


def process_alive(pid: int) -> bool:
    """Whether a process with this pid exists (on this machine)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale_stores(folder: Path = SHM_DIR) -> int:
    """Delete shared-store files left in /dev/shm (or, given the temporary folder, a scheduler's worker config
    files) by processes that died without cleaning up (SIGKILL, OOM kill, a hung job's SIGTERM): they hold host
    memory until reboot. Files of a live creator are kept. Returns the bytes freed."""
    freed = 0
    if not folder.is_dir():
        return 0
    for path in folder.iterdir():
        match = SHM_NAME.match(path.name)
        if match and not process_alive(int(match.group(1))):
            try:
                size = path.stat().st_size
                path.unlink()
                freed += size
            except OSError:
                pass
    return freed


@dataclass(frozen=True)
class Segment:
    """One parameter inside a block's flat buffer."""

    name: str
    offset: int
    numel: int
    shape: tuple[int, ...]


ALIGN = 8
"""Parameters start at multiples of 8 elements in flat buffers, so the kernels can use 16-byte accesses."""


def pack_layout(params: Iterable[tuple[str, torch.Tensor]], align: int = ALIGN) -> list[Segment]:
    """Place parameters back to back in a flat buffer, each offset rounded up to ``align`` elements."""
    layout, offset = [], 0
    for name, p in params:
        offset = -(-offset // align) * align
        layout.append(Segment(name, offset, p.numel(), tuple(p.shape)))
        offset += p.numel()
    return layout


def layout_numel(layout: list[Segment]) -> int:
    return max((s.offset + s.numel for s in layout), default=0)


def _gb(nbytes: float) -> str:
    return f"{nbytes / 1e9:.1f} GB"


def check_host_memory(nbytes: int, what: str, dtype: torch.dtype) -> None:
    """Raise ResourceError with the numbers when ``nbytes`` does not fit in available host memory."""
    available = psutil.virtual_memory().available
    if nbytes + HOST_MARGIN_BYTES > available:
        raise ResourceError(
            f"{what} needs {_gb(nbytes)} of host memory in {str(dtype).replace('torch.', '')}, but only "
            f"{_gb(available)} is available (keeping {_gb(HOST_MARGIN_BYTES)} free). Use a smaller storage dtype "
            "(optim.storage_dtype = 'bf16' halves fp32), fewer layers, or a machine with more memory."
        )


def repoint(param: nn.Parameter, tensor: torch.Tensor) -> None:
    """Make ``param`` (the same Python object) hold ``tensor``, also across devices (meta → real)."""
    if param.device == tensor.device and param.dtype == tensor.dtype:
        param.data = tensor
    else:
        torch.utils.swap_tensors(param, nn.Parameter(tensor, requires_grad=param.requires_grad))


class ParameterStore:
    """Flat host buffers, one per block, in a single storage dtype."""

    def __init__(self, layouts: list[list[Segment]], dtype: torch.dtype, *, pin: bool | None = None,
                 shared: bool = False, name: str | None = None, create: bool = True, pad_to: int = 1):
        """``create=False`` maps the shared store another process of the node created under ``name``;
        ``pad_to`` rounds each block's buffer up to a multiple (equal slices for sliced transfers)."""
        self.layouts = layouts
        self.dtype = dtype
        self.shared = shared
        self.owner = create
        self.name = name or f"zo2-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        pin = torch.cuda.is_available() if pin is None else pin
        numels = [-(-layout_numel(layout) // pad_to) * pad_to for layout in layouts]
        itemsize = torch.empty((), dtype=dtype).element_size()
        if create:  # a mapped store is counted once, by the process that creates it
            check_host_memory(sum(numels) * itemsize, f"The parameter store ({len(layouts)} blocks)", dtype)
        self._paths: list[Path] = []
        self._registered: list[torch.Tensor] = []
        self.buffers = [self._allocate(i, n, pin) for i, n in enumerate(numels)]

    def _allocate(self, index: int, numel: int, pin: bool) -> torch.Tensor:
        if not self.shared or numel == 0:  # an empty unit (homed elsewhere, or without weights) needs no file
            return torch.empty(numel, dtype=self.dtype, pin_memory=pin and numel > 0)
        # Allocate in shared memory from the start and fill in place: sharing a filled tensor copies it.
        path = SHM_DIR / f"{self.name}-block{index}"
        if not self.owner and not path.exists():
            raise ResourceError(f"The shared parameter store {path} does not exist: the node's first process "
                                "creates it before the others map it.")
        buf = torch.from_file(str(path), shared=True, size=max(numel, 1), dtype=self.dtype)[:numel]
        if self.owner:
            self._paths.append(path)
        if pin and numel:
            cudart = torch.cuda.cudart()
            err = cudart.cudaHostRegister(buf.data_ptr(), buf.numel() * buf.element_size(), 0)
            if int(err) != 0:
                raise ResourceError(f"cudaHostRegister failed ({err}) for {path}: cannot pin the shared store.")
            self._registered.append(buf)
        return buf

    # ------------------------------------------------------------------ access
    def __len__(self) -> int:
        return len(self.buffers)

    def flat(self, index: int) -> torch.Tensor:
        return self.buffers[index]

    def numel(self, index: int) -> int:
        return self.buffers[index].numel()

    def layout(self, index: int) -> list[Segment]:
        return self.layouts[index]

    def block_bytes(self, index: int) -> int:
        return self.buffers[index].numel() * self.buffers[index].element_size()

    @property
    def nbytes(self) -> int:
        return sum(self.block_bytes(i) for i in range(len(self)))

    @staticmethod
    def views(flat: torch.Tensor, layout: Iterable[Segment]) -> dict[str, torch.Tensor]:
        """Parameter-shaped views of a block's flat buffer (host or device)."""
        return {s.name: flat[s.offset : s.offset + s.numel].view(s.shape) for s in layout}

    # ------------------------------------------------------------------ building
    @classmethod
    def from_blocks(cls, blocks: list[list[tuple[str, nn.Parameter]]], dtype: torch.dtype, **kwargs) -> "ParameterStore":
        """Copy each block's parameters into the store and re-point them at its host buffer.

        ``blocks[i]`` lists (canonical name, parameter) of block ``i``. Parameters on the meta device are
        re-pointed without a copy (their values are filled into the store later, e.g. from safetensors shards);
        so are those of a process that maps a store another one created and filled.
        """
        store = cls([pack_layout(params) for params in blocks], dtype, **kwargs)
        for i, params in enumerate(blocks):
            views = cls.views(store.flat(i), store.layout(i))
            for name, p in params:
                if not p.is_meta and store.owner:
                    views[name].copy_(p.detach())
                repoint(p, views[name])  # the module now reads and writes the store
        return store

    def close(self) -> None:
        """Unpin and unlink shared buffers (the tensors stay valid in processes that still map them)."""
        if self._registered:
            cudart = torch.cuda.cudart()
            for buf in self._registered:
                cudart.cudaHostUnregister(buf.data_ptr())
            self._registered.clear()
        for path in self._paths:
            path.unlink(missing_ok=True)
        self._paths.clear()

    def __del__(self) -> None:  # best effort: never leave /dev/shm files behind
        try:
            self.close()
        except Exception:
            pass


def node_writers(comm: Any) -> tuple[int, int]:
    """(this process's index among its node's writers, their count): the processes that each write back one
    slice of every unit with sliced transfers; (0, 1) for a node's only process."""
    if comm is None or comm.local_size == 1:
        return 0, 1
    return comm.local_rank, comm.local_size


def share_bounds(numel: int, index: int, count: int) -> tuple[int, int]:
    """Share ``index`` of ``count`` equal shares [lo, hi) of a buffer of ``numel`` elements (padded to a multiple
    of ``count``): what each process of a node uploads and writes back with sliced transfers."""
    share = numel // count
    return index * share, (index + 1) * share
