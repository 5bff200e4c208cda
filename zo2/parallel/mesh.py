"""The (dp, pp) layout of ranks and the few collectives a ZO step needs.

Every rank applies the same update (seeds, projected gradients, lr) to the same weights, so no parameter or
gradient tensor ever crosses the network: a step all-reduces one small vector — each point's loss weighted by
the loss tokens of the rank's shard, and the token count — and that is all (DESIGN.md §3).

Ranks are laid out as ``rank = dp_index * pp + pp_index``: the ``pp`` ranks of one data shard are adjacent.
"""

from __future__ import annotations

import datetime
import os
import socket
from dataclasses import dataclass
from enum import Enum
from typing import Sequence

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh

from zo2.config.parallel import ParallelConfig
from zo2.errors import ConfigError, ZO2Error
from zo2.offload.store import share_bounds


class Axis(str, Enum):
    """Mesh dimension names."""

    DP = "dp"
    PP = "pp"


class RankFailure(ZO2Error):
    """Another rank died or stopped answering."""


class DivergenceError(ZO2Error):
    """The replicas' weights differ: every rank must apply identical updates."""


@dataclass(frozen=True)
class ParallelDims:
    """Parallel sizes, checked against the world size."""

    dp: int
    pp: int

    @classmethod
    def from_config(cls, cfg: ParallelConfig, world_size: int) -> "ParallelDims":
        if cfg.dp * cfg.pp != world_size:
            raise ConfigError(f"parallel.dp × parallel.pp = {cfg.dp} × {cfg.pp} = {cfg.dp * cfg.pp}, but the job has "
                              f"{world_size} processes. Choose sizes whose product is the world size (for "
                              f"{world_size} processes: dp={world_size} pp=1, or dp={max(world_size // 2, 1)} pp=2).")
        return cls(cfg.dp, cfg.pp)


class ZOComm:
    """This rank's place in the (dp, pp) layout and the step's collectives (no-ops for a single process)."""

    def __init__(self, dims: ParallelDims, rank: int, group=None, device: torch.device | None = None,
                 local_size: int | None = None, local_group=None):
        self.dims = dims
        self.rank = rank
        self.dp_rank, self.pp_rank = divmod(rank, dims.pp)
        self.group = group
        self.device = device or torch.device("cpu")
        self.local_size = local_size or dims.dp * dims.pp
        """Processes on this node: they share one parameter store and split its transfers."""
        self.local_rank = rank % self.local_size
        self.local_group = local_group
        """Process group of this node's ranks (None: the whole world is one node)."""
        self.owns_group = False
        """True when init_comm started the process group (and close() should end it)."""
        self.mesh = None
        """The torch DeviceMesh of shape (dp, pp) under torchrun."""

    @property
    def world_size(self) -> int:
        return self.dims.dp * self.dims.pp

    def my_points(self, n_points: int) -> list[int]:
        """Indices of the estimator points this rank evaluates (every pp-th, starting at its pp index)."""
        if n_points % self.dims.pp:
            raise ConfigError(f"parallel.pp = {self.dims.pp} does not divide the {n_points} perturbed points of a "
                              "step (2·q for the central estimator, q+1 for the forward one); choose a divisor.")
        return list(range(self.pp_rank, n_points, self.dims.pp))

    def combine(self, local: Sequence[torch.Tensor], mine: Sequence[int], n_points: int, weight: float) -> list[float]:
        """Every point's loss over the global batch, from this rank's losses of ``mine`` on its shard.

        ``weight`` is the shard's number of loss tokens: the global mean is Σ L_r n_r / Σ n_r, the loss a
        single process computes on the whole batch (to the rounding of the sum).
        """
        vec = torch.zeros(n_points + 1, dtype=torch.float64, device=self.device)
        for i, loss in zip(mine, local):
            vec[i] = loss.to(self.device) * weight
        if self.pp_rank == 0:
            vec[n_points] = weight  # each data shard's tokens counted once
        if self.world_size > 1:
            self._all_reduce(vec)  # the step's only communication: n_points + 1 floats
        values = vec.tolist()  # host sync: the loss scalars
        total = values[n_points]
        return [v / total if total else float("nan") for v in values[:n_points]]

    def _all_reduce(self, tensor: torch.Tensor, op=dist.ReduceOp.SUM) -> None:
        self._collective("during a collective", dist.all_reduce, tensor, op=op, group=self.group)

    def _collective(self, where: str, fn, *args, **kwargs) -> None:
        """Run one torch.distributed collective; a peer that died, left the loop early or stopped answering (the
        collective's error or its timeout, parallel.timeout_s) becomes a RankFailure that says what to do."""
        try:
            fn(*args, **kwargs)
        except (RuntimeError, dist.DistBackendError) as err:
            raise RankFailure(
                f"Rank {self.rank} of {self.world_size} lost contact with another rank {where} ({err}). A process "
                "died, stopped early or hangs; the run stops here. Resume it with `zo2 train --resume RUN_DIR`: the "
                "trajectory log and snapshots hold everything up to the last completed step.") from None

    def close(self) -> None:
        """End the process group this communicator started."""
        if self.owns_group and dist.is_initialized():
            dist.destroy_process_group()
            self.owns_group = False

    def local_barrier(self) -> None:
        """Wait for the other processes of this node."""
        if self.local_size > 1:
            self._collective("at a barrier of its node", dist.barrier, group=self.local_group)

    def local_first_pid(self) -> int:
        """The pid of this node's first process (local rank 0), on every process of the node (one broadcast)."""
        return self.local_share(os.getpid(), "naming the node's shared store")

    def local_share(self, value: int, where: str = "sharing a number with its node") -> int:
        """The node's first process's ``value``, on every process of the node (one broadcast; call on each)."""
        t = torch.tensor([int(value)], dtype=torch.int64, device=self.device)
        if self.local_size > 1:
            self._collective(where, dist.broadcast, t, src=self.rank - self.local_rank, group=self.local_group)
        return int(t.item())  # host sync: at set-up only

    def slice_bounds(self, numel: int) -> tuple[int, int]:
        """This process's equal share [lo, hi) of a buffer of ``numel`` elements (a multiple of the share count)."""
        return share_bounds(numel, self.local_rank, self.local_size)

    def gather_slices(self, flat: torch.Tensor) -> None:
        """Assemble ``flat`` on every process of the node from each one's slice of it (in place)."""
        lo, hi = self.slice_bounds(flat.numel())
        mine = flat[lo:hi].clone()  # the input must not alias the output on every backend
        # NVLink on GPUs: the block
        self._collective("while assembling a block", dist.all_gather_into_tensor, flat, mine, group=self.local_group)

    def any_flags(self, *flags: bool) -> list[bool]:
        """Each flag, True on every rank when it is set on any (one tiny all-reduce; as given for one process)."""
        if self.world_size == 1:
            return list(flags)
        t = torch.tensor([1.0 if f else 0.0 for f in flags], device=self.device)
        self._all_reduce(t, dist.ReduceOp.MAX)
        return [bool(x) for x in t.tolist()]

    def barrier(self) -> None:
        """Wait for every rank (no-op for a single process)."""
        if self.world_size > 1:
            self._collective("at a barrier", dist.barrier, group=self.group)

    def check_replicas(self, checksum: float, step: int) -> None:
        """Stop with DivergenceError when the weights' checksum differs between ranks."""
        if self.world_size == 1:
            return
        lo = torch.tensor([checksum], dtype=torch.float64, device=self.device)
        hi = lo.clone()
        self._all_reduce(lo, dist.ReduceOp.MIN)
        self._all_reduce(hi, dist.ReduceOp.MAX)
        if lo.item() != hi.item():
            raise DivergenceError(
                f"The replicas' weights diverged by step {step} (checksums {lo.item()!r} .. {hi.item()!r}): every "
                "rank must run the same code, config and seed. Resume from the last snapshot; if it happens again, "
                "check that all ranks use the same zo2, torch and kernel versions.")


def node_group(world: int, local_size: int):
    """The process group of this rank's node (ranks are numbered node by node); None for a single node."""
    if local_size >= world:
        return None
    mine = None
    for first in range(0, world, local_size):  # every rank creates every group, in the same order
        group = dist.new_group(list(range(first, first + local_size)))
        if first <= dist.get_rank() < first + local_size:
            mine = group
    return mine


BIND_STORE_ENV = "ZO2_BIND_STORE"
"""Set to 1 by zo2 launch for its workers: rank 0's rendezvous store listens on MASTER_ADDR only."""


def bound_store(world: int, timeout: datetime.timedelta) -> dist.TCPStore | None:
    """With ZO2_BIND_STORE=1: the job's rendezvous store (torch.distributed's TCPStore), its server on rank 0
    listening on MASTER_ADDR's interface only — loopback for a single-node `zo2 launch`, the configured address on
    several nodes — instead of every interface (TCPStore's own default). None otherwise (torchrun's agent owns the
    store)."""
    if os.environ.get(BIND_STORE_ENV) != "1":
        return None
    addr, port, rank = os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), int(os.environ["RANK"])
    if rank != 0:
        return dist.TCPStore(addr, port, world, False, timeout=timeout)
    family, _, _, _, where = socket.getaddrinfo(addr, port, type=socket.SOCK_STREAM)[0]
    listener = socket.socket(family, socket.SOCK_STREAM)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # a restarted generation may reuse the port
    try:
        listener.bind(where)
    except OSError as exc:
        listener.close()
        raise RankFailure(f"Rank 0 cannot listen on {addr}:{port} for the job's rendezvous ({exc.strerror}). Pick "
                          "another --master-port, or the address of this node's interface as --master-addr.") from None
    listener.listen(max(world, 16))
    return dist.TCPStore(addr, port, world, True, timeout=timeout, master_listen_fd=listener.detach())


def init_comm(cfg: ParallelConfig, device: torch.device) -> ZOComm:
    """The communicator of a torchrun-started rank (a single process when WORLD_SIZE is unset)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    dims = ParallelDims.from_config(cfg, world)
    if world == 1:
        return ZOComm(dims, 0, device=device)
    owns = not dist.is_initialized()
    if owns:
        backend = cfg.backend if cfg.backend != "auto" else ("cuda:nccl,cpu:gloo" if device.type == "cuda" else "gloo")
        timeout = datetime.timedelta(seconds=cfg.timeout_s)
        store = bound_store(world, timeout)
        if store is None:
            dist.init_process_group(backend=backend, timeout=timeout)
        else:
            dist.init_process_group(backend=backend, timeout=timeout, store=store, world_size=world,
                                    rank=int(os.environ["RANK"]))
    local_size = int(os.environ.get("LOCAL_WORLD_SIZE", world))
    local_group = node_group(world, local_size)
    comm = ZOComm(dims, dist.get_rank(), device=device if device.type == "cuda" else torch.device("cpu"),
                  local_size=local_size, local_group=local_group)
    # The (dp, pp) mesh, built once; the step's all-reduce spans all of it, the axes name the layout.
    comm.mesh = init_device_mesh(device.type, (dims.dp, dims.pp), mesh_dim_names=(Axis.DP.value, Axis.PP.value))
    comm.owns_group = owns
    return comm
