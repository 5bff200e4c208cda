"""The compiled CPU direction generator (``philox.c``), built on first use and loaded with ctypes.

What it computes, bit for bit what the pure-torch reference (:mod:`zo2.optim.rng`, :mod:`zo2.optim.update`)
computes: the Philox4x32-10 words; Gaussian directions (:func:`gaussian`) — in C the integer rounds, the uniforms
and the Box–Muller products, in torch ``log``, ``sqrt``, ``cos`` and ``sin`` (torch's CPU kernels round those
differently from the C library, in a few percent of values, so they cannot move to C without changing the bits);
Rademacher signs (:func:`rademacher`); and the update and dual perturbation of float32 buffers in one pass
(:func:`update_perturb`, the operations of ``update.updated`` then ``update.perturbed``, built with
``-ffp-contract=off`` so no multiply-add is fused). tests/unit/test_native.py compares all of it with the
reference.

Threads: a C loop shares its blocks among :func:`threads` POSIX threads (torch's thread count); the kernels'
torch reference cuts flat buffers into pieces of at most ``zo2_kernels.reference.CPU_PIECE`` elements and runs them
through :func:`map_pieces` on as many Python threads. The words depend only on the counters, so the
bits do not depend on the thread count.

The build: ``philox.c`` — plain C, no torch headers, about a second — compiled with the system C compiler (``$CC``,
else ``cc``) into a per-user cache (``$XDG_CACHE_HOME/zo2``, else ``~/.cache/zo2``), named by a hash of the source
and the flags, written under a temporary name and renamed into place (processes starting together never load a
half-written library). Where no compiler works, a one-line warning says so and the reference runs.
``ZO2_NATIVE=0`` turns the compiled path off.
"""

from __future__ import annotations

import ctypes
import hashlib
import math
import os
import subprocess
import tempfile
import threading
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable, Iterable, TypeVar

import torch

_SOURCE = Path(__file__).with_name("philox.c")
# -ffp-contract=off: no fused multiply-adds, so every float product and sum rounds as torch's do.
_FLAGS = ("-O3", "-shared", "-fPIC", "-std=c99", "-ffp-contract=off", "-fno-math-errno", "-pthread")
_LIBS: tuple[str, ...] = ()
_I64, _U32, _F32, _INT, _PTR = ctypes.c_int64, ctypes.c_uint32, ctypes.c_float, ctypes.c_int, ctypes.c_void_p
_SIGNATURES = {
    "zo2_philox4x32_range": (_I64, _I64, _U32, _U32, _PTR, _INT),
    "zo2_gauss_prep": (_I64, _I64, _U32, _U32, _F32, _PTR, _PTR, _INT),
    "zo2_gauss_finish": (_PTR, _PTR, _PTR, _I64, _PTR, _INT),
    "zo2_rademacher": (_I64, _I64, _U32, _U32, _PTR, _INT),
    "zo2_update_perturb": (_PTR, _PTR, _PTR, _I64, _INT, _F32, _F32, _F32, _F32, _PTR, _PTR, _PTR, _INT),
}
T = TypeVar("T")
TWO_PI = float(torch.tensor(2.0 * math.pi, dtype=torch.float32))
"""float32(2 pi), the constant of the reference's Box-Muller angle."""
_lib: ctypes.CDLL | None = None
_tried = False


def _cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "zo2"


def _build() -> Path:
    """The compiled library's path, compiling it first if the cache lacks it."""
    compiler = os.environ.get("CC", "cc")
    source = _SOURCE.read_bytes()
    tag = hashlib.sha256(source + " ".join((compiler, *_FLAGS, *_LIBS)).encode()).hexdigest()[:16]
    target = _cache_dir() / f"philox-{tag}.so"
    if target.is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=".philox-", suffix=".so")
    os.close(fd)
    try:
        done = subprocess.run([compiler, *_FLAGS, "-o", tmp, str(_SOURCE), *_LIBS], capture_output=True,
                              text=True, timeout=120)
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
        for name, argtypes in _SIGNATURES.items():
            fn = getattr(lib, name)
            fn.argtypes = argtypes
            fn.restype = None
        _lib = lib
    except (OSError, AttributeError, subprocess.SubprocessError) as exc:
        warnings.warn(f"zo2: could not build the compiled CPU Philox generator ({exc}); the pure-torch reference "
                      "generates the directions instead (same values, several times slower). Install a C compiler "
                      "(cc), or set ZO2_NATIVE=0 to silence this.", RuntimeWarning, stacklevel=2)
        _lib = None
    return _lib


_local = threading.local()
_pool: ThreadPoolExecutor | None = None
_pool_size = 0


def threads() -> int:
    """Threads a compiled loop splits into: torch's intra-op thread count (1 inside :func:`map_pieces`)."""
    return 1 if getattr(_local, "in_piece", False) else max(1, torch.get_num_threads())


def _run_piece(fn: Callable[[T], None], item: T) -> None:
    _local.in_piece = True
    try:
        fn(item)
    finally:
        _local.in_piece = False


def map_pieces(fn: Callable[[T], None], items: Iterable[T]) -> None:
    """``fn(item)`` for every item, on up to :func:`threads` threads, each taking the next item when it is free.

    For independent pieces (``zo2_kernels.reference.CPU_PIECE`` elements at most): ``fn``'s compiled calls run on
    one thread each, and its torch ops release the GIL, so the pieces overlap; a piece's temporaries stay in
    cache instead of costing one pass over memory each."""
    global _pool, _pool_size
    n = threads()
    if n == 1:
        for item in items:
            _run_piece(fn, item)
        return
    if _pool is None or _pool_size != n:
        if _pool is not None:
            _pool.shutdown(wait=False)
        _pool, _pool_size = ThreadPoolExecutor(max_workers=n, thread_name_prefix="zo2-cpu"), n
    for future in [_pool.submit(_run_piece, fn, item) for item in items]:
        future.result()


def philox_range(m0: int, m1: int, k0: int, k1: int) -> tuple[torch.Tensor, ...] | None:
    """The four Philox4x32-10 words of counters ``m0 .. m1`` under key ``(k0, k1)``, as int64 CPU tensors of uint32
    values (what :func:`zo2.optim.rng.philox4x32` returns for ``arange(m0, m1)``); None without the library."""
    lib = library()
    if lib is None:
        return None
    count = m1 - m0
    out = torch.empty(4 * count, dtype=torch.int64)
    lib.zo2_philox4x32_range(m0, count, k0 & 0xFFFFFFFF, k1 & 0xFFFFFFFF, out.data_ptr(), threads())
    return tuple(out.view(4, count))


def gaussian(m0: int, m1: int, k0: int, k1: int) -> torch.Tensor | None:
    """The 4 (m1 - m0) Gaussian elements of counters ``m0 .. m1`` (float32, element 4m + j at 4(m - m0) + j), the
    reference's bits: C for the integers, the uniforms and the products; torch for log, sqrt, cos and sin.
    None without the library."""
    lib = library()
    if lib is None:
        return None
    count, n = m1 - m0, threads()
    u1 = torch.empty(2 * count, dtype=torch.float32)
    theta = torch.empty(2 * count, dtype=torch.float32)
    lib.zo2_gauss_prep(m0, count, k0 & 0xFFFFFFFF, k1 & 0xFFFFFFFF, TWO_PI, u1.data_ptr(), theta.data_ptr(), n)
    cos = torch.cos(theta)
    torch.sin(theta, out=theta)
    torch.sqrt(torch.log(u1, out=u1).mul_(-2.0), out=u1)  # r, in place: torch's log and sqrt, not libm's
    out = torch.empty(4 * count, dtype=torch.float32)
    lib.zo2_gauss_finish(u1.data_ptr(), cos.data_ptr(), theta.data_ptr(), 2 * count, out.data_ptr(), n)
    return out


def rademacher(m0: int, m1: int, k0: int, k1: int) -> torch.Tensor | None:
    """The 128 (m1 - m0) Rademacher signs (float32 ±1) of counters ``m0 .. m1``; None without the library."""
    lib = library()
    if lib is None:
        return None
    out = torch.empty(128 * (m1 - m0), dtype=torch.float32)
    lib.zo2_rademacher(m0, m1 - m0, k0 & 0xFFFFFFFF, k1 & 0xFFFFFFFF, out.data_ptr(), threads())
    return out


def update_perturb(t: torch.Tensor, d: torch.Tensor, z: torch.Tensor, weight_decay: float, lr: float, eps: float,
                   out: torch.Tensor, plus: torch.Tensor, minus: torch.Tensor) -> bool:
    """One pass over contiguous float32 CPU tensors of one length: ``out = t − lr (d + λ t)`` (λ = ``weight_decay``,
    skipped when 0) then ``plus/minus = out ± ε z``, rounded as :func:`zo2.optim.update.updated` and
    :func:`~zo2.optim.update.perturbed` round. ``out`` may be ``t``. False (nothing done) without the library."""
    lib = library()
    if lib is None:
        return False
    lib.zo2_update_perturb(t.data_ptr(), d.data_ptr(), z.data_ptr(), t.numel(), int(bool(weight_decay)),
                           weight_decay, lr, eps, -eps, out.data_ptr(), plus.data_ptr(), minus.data_ptr(), threads())
    return True
