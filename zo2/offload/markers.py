"""Which step each home copy of a unit holds: the shared markers of a node store, and the layout digest that
lets a process check it maps the store it expects.

:class:`StoreMarkers` records, for every unit and writer (the process that writes that slice back), the last step
whose update the store's copy holds and whether a write is in flight; the scheduler (:mod:`zo2.control`) reads them
after a crash to catch clean slices up from the trajectory log and rebuild torn ones.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any, Sequence

import torch

from zo2.errors import ResourceError
from zo2.offload.store import SHM_DIR


def layout_digest(layouts: Sequence[Sequence[Any]]) -> str:
    """A short hash of the store's layout (names, offsets, shapes): a worker refuses a store that differs."""
    text = json.dumps([[(s.name, s.offset, s.numel, list(s.shape)) for s in layout] for layout in layouts])
    return hashlib.sha256(text.encode()).hexdigest()[:16]


class StoreMarkers:
    """Shared ``int64[units, writers, 2]``: (last step applied in the store's copy, 1 + step being written or 0).

    Order of writes: :meth:`begin` before the bytes of a write-back are touched, :meth:`done` after they all
    landed; a process killed in between leaves the slice marked torn.
    """

    def __init__(self, name: str, units: int, writers: int, *, create: bool):
        self.path = SHM_DIR / f"{name}-markers"
        if not create and not self.path.exists():
            raise ResourceError(f"The store markers {self.path} do not exist: the scheduler creates them before "
                                "starting the workers.")
        self.owner = create
        size = units * writers * 2
        self.table = torch.from_file(str(self.path), shared=True, size=size, dtype=torch.int64).view(units, writers, 2)

    def begin(self, unit: int, writer: int, step: int) -> None:
        """A write of the state after ``step``'s update is about to start."""
        self.table[unit, writer, 1] = step + 1

    def done(self, unit: int, writer: int, step: int) -> None:
        """The write has landed: the slice holds the state after ``step``'s update."""
        self.table[unit, writer, 0] = step
        self.table[unit, writer, 1] = 0

    def set_all(self, step: int) -> None:
        """Every slice of every unit holds the state after ``step`` (after a fill or a repair)."""
        self.table[..., 0] = step
        self.table[..., 1] = 0

    def applied(self, unit: int) -> list[int]:
        return [int(x) for x in self.table[unit, :, 0]]

    def torn(self, unit: int) -> bool:
        return bool((self.table[unit, :, 1] != 0).any())

    def close(self) -> None:
        if self.owner:
            self.path.unlink(missing_ok=True)
