"""ControlConfig: the ``[control]`` section (the scheduler that ``zo2 launch`` runs: zo2.control)."""

from __future__ import annotations

from dataclasses import dataclass

from zo2.config.base import require


@dataclass(kw_only=True)
class ControlConfig:
    """How the scheduler supervises its workers (DESIGN.md §4). Only ``zo2 launch`` uses this section."""

    bind: str = "127.0.0.1"
    """Address the scheduler's ZeroMQ endpoint binds to. Workers run on the scheduler's node, so loopback
    (the default) is enough; every connection must also present the run's random token."""
    heartbeat_s: float = 1.0
    """Seconds between a worker's heartbeats."""
    heartbeat_timeout_s: float = 60.0
    """A worker silent for this long is considered hung: the scheduler stops the group, repairs the store and
    restarts it. Keep it above the longest step (and the first step's compile/warm-up)."""
    start_timeout_s: float = 300.0
    """Seconds a started worker may take to register (imports, process group, mapping the store)."""
    max_restarts: int = 3
    """Worker-group restarts after a failure (a killed or hung worker) before the run gives up; a failure
    loses nothing: the run continues from the last completed step."""

    def __post_init__(self) -> None:
        require(isinstance(self.bind, str) and self.bind != "", "control.bind", self.bind,
                "give an IP address to bind to, e.g. '127.0.0.1'.")
        require(self.heartbeat_s > 0, "control.heartbeat_s", self.heartbeat_s, "it must be > 0.")
        require(self.heartbeat_timeout_s > 2 * self.heartbeat_s, "control.heartbeat_timeout_s",
                self.heartbeat_timeout_s, "it must exceed twice control.heartbeat_s.")
        require(self.start_timeout_s > 0, "control.start_timeout_s", self.start_timeout_s, "it must be > 0.")
        require(isinstance(self.max_restarts, int) and not isinstance(self.max_restarts, bool)
                and self.max_restarts >= 0, "control.max_restarts", self.max_restarts, "it must be an integer >= 0.")
