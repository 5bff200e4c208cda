"""ParallelConfig: the ``[parallel]`` section (perturbation parallelism × ZO data parallelism)."""

from __future__ import annotations

from dataclasses import dataclass

from zo2.config.base import require, require_choice


@dataclass(kw_only=True)
class ParallelConfig:
    """How the ranks of a torchrun job split the work of a step (DESIGN.md §3)."""

    dp: int = 1
    """ZO data parallelism: ranks that see disjoint shards of the global batch (the losses are all-reduced)."""
    pp: int = 1
    """Perturbation parallelism: ranks that evaluate different perturbed points of the same step on the same
    batch (2 for MeZO's θ+εz / θ−εz; up to the number of points with q directions). dp × pp = world size."""
    backend: str = "auto"
    """torch.distributed backend: 'auto' (NCCL for CUDA tensors, gloo for CPU ones), 'nccl' or 'gloo'."""
    checksum_every: int = 100
    """Steps between checksums of the weights across ranks (0: never); a mismatch stops the run."""
    timeout_s: float = 600.0
    """Seconds a collective may wait for a missing rank before the run stops with an error."""

    def __post_init__(self) -> None:
        require(isinstance(self.dp, int) and self.dp >= 1, "parallel.dp", self.dp, "it must be an integer >= 1.")
        require(isinstance(self.pp, int) and self.pp >= 1, "parallel.pp", self.pp, "it must be an integer >= 1.")
        require_choice("parallel.backend", self.backend, ("auto", "nccl", "gloo"))
        require(isinstance(self.checksum_every, int) and self.checksum_every >= 0, "parallel.checksum_every",
                self.checksum_every, "it must be an integer >= 0.")
        require(self.timeout_s > 0, "parallel.timeout_s", self.timeout_s, "it must be > 0.")
