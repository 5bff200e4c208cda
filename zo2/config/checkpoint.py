"""CheckpointConfig: how often snapshots are written and how many are kept (the ``[checkpoint]`` section)."""

from __future__ import annotations

from dataclasses import dataclass

from zo2.config.base import require


@dataclass(kw_only=True)
class CheckpointConfig:
    """Snapshot settings. The trajectory log is written every step regardless; snapshots only bound how much
    of it a resume must replay."""

    save_every: int = 100
    """Steps between snapshots; 0 writes one only at the end of the run."""
    keep_last: int = 2
    """Snapshots kept on disk; older ones are deleted after each new one is safely written."""
    fsync: bool = True
    """fsync the trajectory log after every line and snapshots before their rename (crash-safe; turn off
    only for throwaway runs on slow file systems)."""

    def __post_init__(self) -> None:
        require(_is_int(self.save_every) and self.save_every >= 0, "checkpoint.save_every", self.save_every,
                "it must be an integer >= 0 (0: only at the end of the run).")
        require(_is_int(self.keep_last) and self.keep_last >= 1, "checkpoint.keep_last", self.keep_last,
                "it must be an integer >= 1.")
        require(isinstance(self.fsync, bool), "checkpoint.fsync", self.fsync, "it must be true or false.")


def _is_int(value: object) -> bool:
    """True for an int that is not a bool."""
    return isinstance(value, int) and not isinstance(value, bool)
