"""The compiled CPU Philox generator (``philox.c``), built on first use and loaded with ctypes.

The pure-torch reference spends ~90% of a direction's time in Philox's integer rounds (about 30 ms per million
normals on one core, against 4 ms for the Box-Muller floats). This module compiles ``philox.c`` — plain C, no
torch headers, under a second — with the system C compiler (``$CC``, else ``cc``) into a per-user cache
(``$XDG_CACHE_HOME/zo2``, else ``~/.cache/zo2``), named by a hash of the source and the flags, written under a
temporary name and renamed into place (processes starting together never load a half-written library). Integer
arithmetic only: the words are bit-identical to the reference's, and the floats stay in torch, so every direction
is the same bits either way (tests/unit/test_rng.py compares them).

Where no compiler works, a one-line warning says so and the reference runs. ``ZO2_NATIVE=0`` turns the compiled
path off.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import subprocess
import tempfile
import warnings
from pathlib import Path

import torch

_SOURCE = Path(__file__).with_name("philox.c")
_FLAGS = ("-O3", "-shared", "-fPIC", "-std=c99")
_lib: ctypes.CDLL | None = None
_tried = False


def _cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "zo2"


def _build() -> Path:
    """The compiled library's path, compiling it first if the cache lacks it."""
    compiler = os.environ.get("CC", "cc")
    source = _SOURCE.read_bytes()
    tag = hashlib.sha256(source + " ".join((compiler, *_FLAGS)).encode()).hexdigest()[:16]
    target = _cache_dir() / f"philox-{tag}.so"
    if target.is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=".philox-", suffix=".so")
    os.close(fd)
    try:
        done = subprocess.run([compiler, *_FLAGS, "-o", tmp, str(_SOURCE)], capture_output=True, text=True,
                              timeout=120)
        if done.returncode != 0:
            raise OSError(f"{compiler} failed: {done.stderr.strip()[-300:]}")
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return target


def library() -> ctypes.CDLL | None:
    """The loaded generator, or None (ZO2_NATIVE=0, or it could not be built: warned once)."""
    global _lib, _tried
    if _tried:
        return _lib
    _tried = True
    if os.environ.get("ZO2_NATIVE", "1") == "0":
        return None
    try:
        lib = ctypes.CDLL(str(_build()))
        fn = lib.zo2_philox4x32_range
        fn.argtypes = (ctypes.c_int64, ctypes.c_int64, ctypes.c_uint32, ctypes.c_uint32, ctypes.c_void_p)
        fn.restype = None
        _lib = lib
    except (OSError, subprocess.SubprocessError) as exc:
        warnings.warn(f"zo2: could not build the compiled CPU Philox generator ({exc}); the pure-torch reference "
                      "generates the directions instead (same values, several times slower). Install a C compiler "
                      "(cc), or set ZO2_NATIVE=0 to silence this.", RuntimeWarning, stacklevel=2)
        _lib = None
    return _lib


def philox_range(m0: int, m1: int, k0: int, k1: int) -> tuple[torch.Tensor, ...] | None:
    """The four Philox4x32-10 words of counters ``m0 .. m1`` under key ``(k0, k1)``, as int64 CPU tensors of uint32
    values (what :func:`zo2.optim.rng.philox4x32` returns for ``arange(m0, m1)``); None without the library."""
    lib = library()
    if lib is None:
        return None
    count = m1 - m0
    out = torch.empty(4 * count, dtype=torch.int64)
    lib.zo2_philox4x32_range(m0, count, k0 & 0xFFFFFFFF, k1 & 0xFFFFFFFF, out.data_ptr())
    return tuple(out.view(4, count))
