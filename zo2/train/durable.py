"""Durable files for checkpoints: safetensors written tensor by tensor and CRCs of tensors (fsync of files and
folders: zo2.fsync)."""

from __future__ import annotations

import json
import zlib
from pathlib import Path
from typing import Mapping

import torch


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


def write_safetensors(path: str | Path, tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str]) -> None:
    """Write ``tensors`` in the safetensors format, streaming each one's bytes from where it lives.

    ``safetensors.torch.save_file`` refuses tensors that share storage (views of one flat store buffer) and
    builds the whole file in memory; this writes the same format tensor by tensor, so a snapshot of a
    parameter store needs no second copy of it (a device tensor is copied to the host one at a time).
    """
    names = sorted(tensors)
    entries, offset = {}, 0
    for name in names:
        t = tensors[name]
        if t.dtype not in _SAFETENSORS_DTYPES:
            raise ValueError(f"{name}: dtype {t.dtype} cannot be written to safetensors")
        nbytes = t.numel() * t.element_size()
        entries[name] = {"dtype": _SAFETENSORS_DTYPES[t.dtype], "shape": list(t.shape),
                         "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    header = json.dumps({"__metadata__": dict(metadata), **entries}, separators=(",", ":")).encode()
    header += b" " * (-len(header) % 8)  # the data starts 8-byte aligned, as safetensors writes it
    with open(path, "wb") as f:
        f.write(len(header).to_bytes(8, "little"))
        f.write(header)
        for name in names:
            t = tensors[name].detach()
            t = t.contiguous().cpu() if (t.device.type != "cpu" or not t.is_contiguous()) else t
            if t.numel():
                f.write(t.reshape(-1).view(torch.uint8).numpy().data)
