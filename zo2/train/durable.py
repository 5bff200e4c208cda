"""Durable files for checkpoints: safetensors written tensor by tensor (deferred tensors read when their turn
comes, the header written last) and read one tensor at a time, and CRCs of tensors (fsync: zo2.fsync)."""

from __future__ import annotations

import json
import math
import zlib
from pathlib import Path
from typing import Callable, Iterator, Mapping, Union

import torch
from safetensors import safe_open

from zo2.offload.store import Deferred


def tensor_crc(tensor: torch.Tensor) -> int:
    """CRC32 of a tensor's dtype, shape and bytes (as safetensors stores them)."""
    t = tensor.detach().contiguous().cpu()
    crc = zlib.crc32(f"{t.dtype}|{tuple(t.shape)}".encode())
    return zlib.crc32(t.reshape(-1).view(torch.uint8).numpy(), crc)


def tensors_checksum(crcs: Mapping[str, int]) -> str:
    """One checksum over the per-tensor CRCs, in name order."""
    crc = 0
    for name in sorted(crcs):
        crc = zlib.crc32(f"{name}={crcs[name]};".encode(), crc)
    return f"crc32:{crc:08x}"


_SAFETENSORS_DTYPES = {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
                      torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
                      torch.bool: "BOOL"}


Metadata = Union[Mapping[str, str], Callable[[dict[str, int]], Mapping[str, str]]]
"""A safetensors header's metadata, or a function of the tensors' CRCs (computed while they are written)."""

_CRC_PLACEHOLDER = 0xFFFFFFFF  # the longest CRC32 as a JSON number: header room for every real one


def write_safetensors(path: str | Path, tensors: Mapping[str, torch.Tensor | Deferred], metadata: Metadata, *,
                      check: Callable[[str, torch.Tensor], None] | None = None) -> dict[str, int]:
    """Write ``tensors`` in the safetensors format, streaming each one's bytes from where it lives; returns each
    tensor's CRC (:func:`tensor_crc`).

    ``safetensors.torch.save_file`` refuses tensors that share storage (views of one flat store buffer) and
    builds the whole file in memory; this writes the same format tensor by tensor, so a snapshot of a
    parameter store needs no second copy of it (a device tensor is copied to the host one at a time, a
    :class:`Deferred` one is loaded when written). A callable ``metadata`` is given the CRCs once every tensor is
    written, so each tensor is read once: its header is written in room reserved for the longest CRCs and padded
    with spaces (which safetensors allows). ``check(name, tensor)`` sees each tensor as it is written and may raise
    to abandon the file (the caller removes it).
    """
    names = sorted(tensors)
    entries, offset = {}, 0
    for name in names:
        t = tensors[name]
        if t.dtype not in _SAFETENSORS_DTYPES:
            raise ValueError(f"{name}: dtype {t.dtype} cannot be written to safetensors")
        nbytes = math.prod(t.shape) * torch.empty((), dtype=t.dtype).element_size()
        entries[name] = {"dtype": _SAFETENSORS_DTYPES[t.dtype], "shape": list(t.shape),
                         "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    late = callable(metadata)
    header = _header(metadata({n: _CRC_PLACEHOLDER for n in names}) if late else metadata, entries)
    crcs: dict[str, int] = {}
    with open(path, "wb") as f:
        f.write(len(header).to_bytes(8, "little"))
        f.write(header)
        for name in names:
            t = tensors[name]
            t = t.load() if isinstance(t, Deferred) else t.detach()
            t = t.contiguous().cpu() if (t.device.type != "cpu" or not t.is_contiguous()) else t
            if check is not None:
                check(name, t)
            crcs[name] = tensor_crc(t)
            if t.numel():
                f.write(t.reshape(-1).view(torch.uint8).numpy().data)
        if late:
            final = _header(metadata(crcs), entries)
            if len(final) > len(header):
                raise AssertionError("the header outgrew the room reserved for it; this is a bug in zo2.")
            f.seek(8)
            f.write(final + b" " * (len(header) - len(final)))
    return crcs


def _header(metadata: Mapping[str, str], entries: dict) -> bytes:
    header = json.dumps({"__metadata__": dict(metadata), **entries}, separators=(",", ":")).encode()
    return header + b" " * (-len(header) % 8)  # the data starts 8-byte aligned, as safetensors writes it


class SnapshotTensors(Mapping[str, torch.Tensor]):
    """The tensors of a snapshot file, each read from it when asked (and not kept): loading a snapshot larger
    than host memory (weights homed on NVMe) holds one tensor at a time. ``shape_of(name)`` reads no data."""

    def __init__(self, path: Path, corrupt: Callable[[Path, str], Exception]):
        self.path, self._corrupt = path, corrupt
        """``corrupt(path, why)``: the error for a file that cannot be read."""
        try:
            self._file = safe_open(str(path), framework="pt")
        except Exception as exc:  # safetensors raises its own error types for torn files
            raise corrupt(path, f"unreadable ({exc})") from exc
        self._names = list(self._file.keys())

    def __getitem__(self, name: str) -> torch.Tensor:
        if name not in self._names:
            raise KeyError(name)
        try:
            return self._file.get_tensor(name)
        except Exception as exc:  # a file changed under the run
            raise self._corrupt(self.path, f"tensor {name!r} is unreadable ({exc})") from exc

    def shape_of(self, name: str) -> tuple[int, ...]:
        return tuple(self._file.get_slice(name).get_shape())

    def __iter__(self) -> Iterator[str]:
        return iter(self._names)

    def __len__(self) -> int:
        return len(self._names)
