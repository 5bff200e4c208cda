"""Segment tables: where each parameter of a block lives inside one flat buffer.

A block's parameters are packed back to back into one flat buffer so that one kernel launch covers the whole
block. A :class:`SegmentTable` records, per parameter (or per slice of one), the span of the buffer it occupies
and what the direction ``z`` needs to be regenerated there:

* ``offset``  – index in the flat buffer of the segment's first element;
* ``numel``   – number of elements in the segment;
* ``key``     – the parameter's 32-bit key (:func:`zo2.optim.rng.param_key` of its name);
* ``decay``   – whether weight decay applies (MeZO skips biases and norms);
* ``start``   – index *inside the parameter* of the segment's first element (0 for a whole parameter; non-zero
  when the buffer holds only a slice of the parameter, as in the sliced multi-GPU transfers).

Buffer element ``offset + j`` is parameter element ``start + j`` of parameter ``key``, so its direction is
``rng.direction(seed, key, ..., start=start + j, count=1)`` whatever the kernel's block size.

The table is pure host metadata; the Triton backend uploads it once per (device, block size) and caches the
device copy on the object, so an engine should build one table per block layout and reuse it every step.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterable, Iterator, Sequence, Union

import torch

_MAX_KEY = 0xFFFFFFFF

# Tiles of a segment start at a multiple of this many *parameter* elements, so that a tile always holds whole
# Philox counters for every distribution (gaussian: 4 elements per counter; rademacher: 128) and the
# element -> counter mapping never depends on where a segment starts in the buffer.
COUNTER_SPAN = 128

# Columns of the device table (int64, row-major, padded to 8 columns so a row is 64 bytes).
_COLS = 8
COL_OFFSET, COL_NUMEL, COL_KEY, COL_DECAY, COL_START, COL_BASE = range(6)


@dataclass(frozen=True)
class Segment:
    """One parameter (or a slice of one) inside a flat buffer; see the module docstring."""

    offset: int
    numel: int
    key: int
    decay: bool
    start: int = 0

    def __post_init__(self) -> None:
        if self.offset < 0 or self.numel < 0 or self.start < 0:
            raise ValueError(f"segment fields must be non-negative: {self}")
        if not 0 <= self.key <= _MAX_KEY:
            raise ValueError(f"segment key must be a 32-bit unsigned integer: {self}")

    @property
    def end(self) -> int:
        """One past the segment's last buffer index."""
        return self.offset + self.numel


SegmentLike = Union[Segment, Sequence[int]]


def _as_segment(s: SegmentLike) -> Segment:
    if isinstance(s, Segment):
        return s
    fields = tuple(s)
    if len(fields) not in (4, 5):
        raise ValueError(f"a segment is (offset, numel, key, decay_flag[, start]); got {s!r}")
    offset, numel, key, decay = (int(v) for v in fields[:4])
    start = int(fields[4]) if len(fields) == 5 else 0
    return Segment(offset, numel, key, bool(decay), start)


class SegmentTable:
    """An ordered, non-overlapping list of :class:`Segment` over one flat buffer.

    Build it from explicit ``(offset, numel, key, decay_flag[, start])`` tuples or with :meth:`pack`.
    Segments with ``numel == 0`` are dropped. Segments need not cover the whole buffer: elements outside every
    segment are never read or written by the kernels (left as they were in ``out=`` buffers, undefined in
    freshly allocated outputs).
    """

    def __init__(self, segments: Iterable[SegmentLike]):
        segs = sorted((_as_segment(s) for s in segments), key=lambda s: s.offset)
        segs = [s for s in segs if s.numel > 0]
        for a, b in zip(segs, segs[1:]):
            # Overlap would make two programs write the same output element (a race) and, in place, read an
            # element another program already updated.
            if b.offset < a.end:
                raise ValueError(f"segments overlap: {a} and {b}")
        self.segments: tuple[Segment, ...] = tuple(segs)
        self._device_cache: dict[tuple[str, int], tuple[torch.Tensor, torch.Tensor, int, bool]] = {}

    # ----------------------------------------------------------------------------------------------- building
    @classmethod
    def pack(cls, params: Iterable[tuple[int, int, bool]], *, align: int = 1) -> "SegmentTable":
        """Pack whole parameters ``(key, numel, decay)`` back to back, each offset rounded up to ``align``.

        ``align=8`` keeps every offset a multiple of 8 elements; with numels that are multiples of 8 too the
        table is :attr:`aligned8` and the Triton kernels use 16-byte vector loads and stores.
        """
        segs, off = [], 0
        for key, numel, decay in params:
            off = -(-off // align) * align
            segs.append(Segment(off, int(numel), int(key), bool(decay)))
            off += int(numel)
        return cls(segs)

    @classmethod
    def coerce(cls, segments: "SegmentTable | Iterable[SegmentLike]") -> "SegmentTable":
        """``segments`` itself when it is a table (keeping its device cache), else a new table from it."""
        return segments if isinstance(segments, SegmentTable) else cls(segments)

    def slice(self, lo: int, hi: int) -> "SegmentTable":
        """The table of the buffer range ``[lo, hi)`` alone, with offsets relative to ``lo``.

        Parameters cut by the range keep their key and get the right ``start``, so a kernel run on
        ``buffer[lo:hi]`` with this table computes exactly what a run on the whole buffer computes there.
        """
        if not 0 <= lo <= hi:
            raise ValueError(f"bad range [{lo}, {hi})")
        out = []
        for s in self.segments:
            a, b = max(s.offset, lo), min(s.end, hi)
            if a < b:
                out.append(Segment(a - lo, b - a, s.key, s.decay, s.start + (a - s.offset)))
        return SegmentTable(out)

    # -------------------------------------------------------------------------------------------- inspection
    def __iter__(self) -> Iterator[Segment]:
        return iter(self.segments)

    def __len__(self) -> int:
        return len(self.segments)

    def __repr__(self) -> str:
        return f"SegmentTable({list(self.segments)!r})"

    @property
    def end(self) -> int:
        """The smallest buffer length that holds every segment."""
        return self.segments[-1].end if self.segments else 0

    def covers(self, n: int) -> bool:
        """Whether the segments tile ``[0, n)`` exactly, with no gaps."""
        pos = 0
        for s in self.segments:
            if s.offset != pos:
                return False
            pos = s.end
        return pos == n

    @property
    def aligned8(self) -> bool:
        """Whether every segment's ``offset``, ``start`` and ``numel`` are multiples of 8.

        Then the Triton kernels may tell the compiler so and use 16-byte vector loads and stores (8 bf16
        elements); otherwise they fall back to element-wise accesses, correct but several times slower. Every
        OPT / Llama parameter has a multiple of 8 elements, so :meth:`pack` gives aligned tables for them.
        """
        return all(s.offset % 8 == 0 and s.start % 8 == 0 and s.numel % 8 == 0 for s in self.segments)

    # ----------------------------------------------------------------------------------------- device tables
    def device_tables(self, device: torch.device, block: int) -> tuple[torch.Tensor, torch.Tensor, int]:
        """``(table, tile_starts, n_tiles)`` for kernels with tiles of ``block`` elements, cached per device.

        ``table`` is int64 ``[S, 8]`` (columns ``COL_*``); ``tile_starts[s]`` is the first program id of
        segment ``s``; ``n_tiles`` is the grid size. Tile ``t`` of segment ``s`` covers parameter elements
        ``[base + t*block, base + (t+1)*block)`` with ``base = start - start % 128``, masked to the segment.
        """
        if block % COUNTER_SPAN or block & (block - 1):
            raise ValueError(f"block must be a power of two multiple of {COUNTER_SPAN}, got {block}")
        cache_key = (str(device), block)
        hit = self._device_cache.get(cache_key)
        if hit is not None:
            return hit[0], hit[1], hit[2]
        rows, tile_starts, n_tiles = [], [], 0
        for s in self.segments:
            base = s.start - s.start % COUNTER_SPAN
            rows.append([s.offset, s.numel, s.key, int(s.decay), s.start, base, 0, 0])
            tile_starts.append(n_tiles)
            n_tiles += math.ceil((s.start + s.numel - base) / block)
        table = torch.tensor(rows or [[0] * _COLS], dtype=torch.int64).to(device)
        starts = torch.tensor(tile_starts or [0], dtype=torch.int64).to(device)
        self._device_cache[cache_key] = (table, starts, n_tiles, True)
        return table, starts, n_tiles
