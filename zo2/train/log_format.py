"""The trajectory log's line format: one CRC-protected JSON record per line (DESIGN.md §5).

:mod:`zo2.train.checkpoint` reads and appends the lines; this module only turns a record into its bytes and back.
"""

from __future__ import annotations

import json
import math
import zlib
from typing import Any, Mapping

_LINE_HEAD = b'{"crc":'
_LINE_MID = b',"r":'
_CRC_DIGITS = 10


def encode_line(record: Mapping[str, Any]) -> bytes:
    """``{"crc":"<10 digits>","r":<record JSON>}\n`` where the CRC32 covers the record's JSON bytes exactly.

    Strictly valid JSON Lines (any JSON reader takes it): floats are written with ``repr`` and so read back
    bit-identical; NaN and ±inf, which JSON lacks, as the strings ``"NaN"``, ``"Infinity"`` and ``"-Infinity"``
    (:func:`decode_line` turns them back into floats). Logs written before this format (the CRC as a bare
    zero-padded number, bare NaN) still read.
    """
    payload = json.dumps(_json_safe(record), separators=(",", ":"), default=jsonable, allow_nan=False).encode("utf-8")
    crc = zlib.crc32(payload)
    return _LINE_HEAD + f'"{crc:0{_CRC_DIGITS}d}"'.encode() + _LINE_MID + payload + b"}\n"


_NON_FINITE = {"NaN": float("nan"), "Infinity": float("inf"), "-Infinity": float("-inf")}


def _json_safe(value: Any) -> Any:
    """``value`` with every non-finite float replaced by its name (JSON has no NaN or infinity)."""
    if isinstance(value, float) and not math.isfinite(value):
        return "NaN" if value != value else ("Infinity" if value > 0 else "-Infinity")
    if isinstance(value, Mapping):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value


def _from_json_safe(value: Any) -> Any:
    """The inverse of :func:`_json_safe` (no field of a record holds these exact strings as text)."""
    if isinstance(value, str):
        return _NON_FINITE.get(value, value)
    if isinstance(value, dict):
        return {k: _from_json_safe(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_from_json_safe(v) for v in value]
    return value


def decode_line(line: bytes) -> dict | None:
    """The record of one complete log line, or None if the line is torn or fails its CRC."""
    head = len(_LINE_HEAD)
    quoted = line[head:head + 1] == b'"'  # the current format; older logs wrote the CRC as a bare number
    digits_at = head + quoted
    start = digits_at + _CRC_DIGITS + quoted + len(_LINE_MID)
    if not (line.endswith(b"}\n") and line.startswith(_LINE_HEAD) and len(line) > start + 2
            and line[digits_at + _CRC_DIGITS: start] == (b'"' if quoted else b"") + _LINE_MID):
        return None
    digits = line[digits_at: digits_at + _CRC_DIGITS]
    payload = line[start:-2]
    if not digits.isdigit() or int(digits) != zlib.crc32(payload):
        return None
    try:
        record = _from_json_safe(json.loads(payload))
    except ValueError:
        return None
    return record if isinstance(record, dict) and _is_int(record.get("step")) else None


def jsonable(value: Any) -> Any:
    """JSON fallback for numpy/torch scalars (exact: ``.item()`` gives a Python number)."""
    if hasattr(value, "item"):
        return value.item()
    raise TypeError(f"{type(value).__name__} is not JSON serializable")


def _is_int(value: object) -> bool:
    """True for an int that is not a bool."""
    return isinstance(value, int) and not isinstance(value, bool)
