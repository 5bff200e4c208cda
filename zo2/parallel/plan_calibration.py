"""Fitting the cost model's rates (:mod:`zo2.parallel.plan`) to measurements: the forward model to per-block
forward times, bandwidths and kernel rates to benchmark JSONs, and the predictions set against a measured run."""

from __future__ import annotations

import json
import math
from dataclasses import replace
from pathlib import Path
from statistics import median
from typing import Sequence

from zo2.errors import ConfigError
from zo2.parallel.plan_inputs import Layout, Rates, Workload, shape_from_preset
from zo2.parallel.plan_model import block_flops, predict_layout

H100_FORWARD_MS = {
    # DESIGN.md §7: one OPT block forward on one H100 80GB SXM, bf16: (1x2048, 16x256) in milliseconds
    "opt-1.3b": (0.42, 0.72), "opt-6.7b": (1.24, 2.33), "opt-13b": (1.92, 3.53),
    "opt-30b": (3.53, 7.07), "opt-66b": (5.58, 11.3), "opt-175b": (10.4, 20.8),
}
"""Measured per-block forward times the default efficiency and floor are fitted to."""

GPU_MEMORY_GB = {"H200": 141.0, "H100": 80.0, "A100": 80.0}
"""Device memory by name, used when a calibration file names its GPU."""


def fit_forward(points: Sequence[tuple[float, float]], peak_tflops: float) -> tuple[float, float]:
    """Fit ``t = max(flops / (peak · eff), floor)`` to (flops, seconds) points in log space; (eff, floor_s)."""
    if not points:
        raise ConfigError("--calibrate: the file has no forward times to fit (rows need shape, batch, fwd2_ms).")
    best = (math.inf, 1.0, 0.0)
    for i in range(1200):
        rate = peak_tflops * 1e12 * 0.02 * (1.5 / 0.02) ** (i / 1199)
        xs = sorted((f / rate, t) for f, t in points)
        for k in range(len(xs) + 1):
            floor = 0.0
            if k:
                floor = math.exp(sum(math.log(t) for _, t in xs[:k]) / k)
                upper = xs[k][0] if k < len(xs) else math.inf
                floor = min(max(floor, xs[k - 1][0]), upper)
            err = sum((math.log(max(x, floor)) - math.log(t)) ** 2 for x, t in xs)
            if err < best[0] - 1e-12:
                best = (err, rate / (peak_tflops * 1e12), floor)
    return best[1], best[2]


def h100_forward_points() -> list[tuple[float, float]]:
    """(flops, seconds) of DESIGN.md §7's per-block forward times."""
    points = []
    for name, (t_long, t_short) in H100_FORWARD_MS.items():
        shape = shape_from_preset(name)
        points.append((block_flops(shape, 2048, 2048), t_long / 1e3))
        points.append((block_flops(shape, 4096, 256), t_short / 1e3))
    return points


def _parse_batch(text: str) -> tuple[int, int]:
    b, s = (int(x) for x in str(text).lower().split("x"))
    return b, s


def _load_json(path: str | Path) -> dict:
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"--calibrate {path}: no such file; give a benchmark JSON such as "
                          "benchmarks/results/2026-11-26-h200/offload.json.")
    try:
        return json.loads(p.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ConfigError(f"--calibrate {path}: not valid JSON ({err}).") from None


def calibrate(path: str | Path, base: Rates | None = None) -> Rates:
    """Rates fitted to a ``benchmarks/bench_offload.py`` JSON: the median measured H2D/D2H bandwidths and the forward
    model fitted to its per-block forward times; a ``kernels.json`` in the same folder also sets the copy rate and
    the kernels' fractions of it, a ``nvme.json`` (benchmarks/bench_nvme.py) the NVMe drive's read and write rates. What the files do not measure keeps ``base`` (default :class:`Rates`)."""
    base = base or Rates()
    data = _load_json(path)
    rows = [r for r in data.get("rows", []) if isinstance(r, dict) and "error" not in r]
    up = [r["bw_h2d"] for r in rows if r.get("bw_h2d")]
    down = [r["bw_d2h"] for r in rows if r.get("bw_d2h")]
    points = []
    for r in rows:
        if r.get("fwd2_ms") and r.get("shape") and r.get("batch"):
            b, s = _parse_batch(r["batch"])
            points.append((block_flops(shape_from_preset(r["shape"]), b * s, s), r["fwd2_ms"] / 2e3))
    eff, floor = fit_forward(points, base.matmul_tflops)
    changes: dict = {"matmul_efficiency": eff, "fwd_floor_ms": floor * 1e3}
    if up:
        changes["h2d_gbs"] = median(up)
    if down:
        changes["d2h_gbs"] = median(down)
    device = str(data.get("env", {}).get("device", ""))
    for key, mem in GPU_MEMORY_GB.items():
        if key in device:
            changes["gpu_mem_gb"] = mem
            break
    sources = [str(path)]
    kernels = Path(path).with_name("kernels.json")
    if kernels.is_file() and kernels != Path(path):
        changes.update(_kernel_rates(_load_json(kernels)))
        sources.append(str(kernels))
    nvme = Path(path).with_name("nvme.json")
    if nvme.is_file() and nvme != Path(path):
        changes.update(_nvme_rates(_load_json(nvme)))
        sources.append(str(nvme))
    # the loss's chunk when the file was measured; none recorded: before the loss was chunked
    changes["loss_chunk_mb"] = data.get("loss_chunk_bytes", math.inf) / 2**20
    changes["head_points_at_once"] = data.get("head_points_at_once", 2)
    changes["form_chunk_mb"] = data.get("form_chunk_bytes", math.inf) / 2**20
    overhead = _point_overhead(rows, replace(base, **changes))
    if overhead is not None:
        changes["point_overhead_ms"] = overhead
    changes["source"] = f"calibrated from {' + '.join(sources)} ({device or 'device not recorded'}); rest: defaults"
    rates = replace(base, **changes)
    rates.check()
    return rates


def _nvme_rates(data: dict) -> dict:
    """``rate.nvme_read_gbs`` (the store's best read rate) and ``rate.nvme_write_gbs`` (its write: data, fsync and
    marker) from a ``benchmarks/bench_nvme.py`` JSON."""
    rows = [r for r in data.get("rows", []) if isinstance(r, dict) and r.get("gbps")]
    reads = [r["gbps"] for r in rows if str(r.get("what", "")).startswith("store read")]
    writes = [r["gbps"] for r in rows if str(r.get("what", "")).startswith("store write")]
    return {**({"nvme_read_gbs": max(reads)} if reads else {}), **({"nvme_write_gbs": max(writes)} if writes else {})}


def _point_overhead(rows: list[dict], rates: Rates) -> float | None:
    """Engine ms per block and point: the smallest shape's resident steps (where it weighs most) minus what the
    model predicts without it, per block and point; None without such rows."""
    rows = [r for r in rows if r.get("resident_ms") and r.get("shape") and r.get("batch") and not r.get("budget")]
    if not rows:
        return None
    smallest = min({r["shape"] for r in rows}, key=lambda name: shape_from_preset(name).block_params)
    bare = replace(rates, point_overhead_ms=0.0)
    residuals = []
    for r in (r for r in rows if r["shape"] == smallest):
        b, s = _parse_batch(r["batch"])
        layers = int(r.get("layers", 4))
        pred = predict_layout(shape_from_preset(smallest, layers=layers), Layout(),
                              Workload(tokens=b * s, seq=s, offload="resident"), bare).step_s * 1e3
        residuals.append(max(0.0, (r["resident_ms"] - pred) / (2 * layers)))
    return median(residuals)


def _kernel_rates(data: dict) -> dict:
    """Copy TB/s and kernel fractions from a ``benchmarks/bench_kernels.py`` JSON."""
    rows = [r for r in data.get("rows", []) if isinstance(r, dict)]
    out = {}
    copy = [r["GBps"] for r in rows if r.get("kernel") == "copy" and r.get("GBps")]
    if copy:
        out["copy_tbs"] = median(copy) / 1e3
    names = {"upd_pair_gauss": "gauss_update_perturb", "pair_gauss": "gauss_pair", "upd_pair_rad": "rad_update_perturb",
             "pair_rad": "rad_pair"}
    for kernel, key in names.items():
        pct = [r["pct_copy"] for r in rows if r.get("kernel") == kernel and r.get("pct_copy")]
        if pct:
            out[key] = median(pct) / 100
    if "gauss_update_perturb" in out:
        out["gauss_update"] = out["gauss_update_perturb"]
    if "rad_update_perturb" in out:
        out["rad_update"] = out["rad_update_perturb"]
    return out


def compare_with_benchmark(path: str | Path, rates: Rates | None = None) -> list[dict]:
    """Predicted vs measured streamed and resident step times for every row of an offload.json.

    ``rates`` default: :func:`calibrate` of the file (for a measurement from before the engine prefetched across
    the step boundary, e.g. 2026-11-26, pass rates with ``exposed_uploads = 1``)."""
    rates = rates or calibrate(path)
    out = []
    for r in _load_json(path).get("rows", []):
        if "error" in r or not r.get("streamed_ms") or r.get("budget") or r.get("writeback_every") \
                or r.get("granularity"):  # the plain block-streamed rows (with the resident time beside them)
            continue
        b, s = _parse_batch(r["batch"])
        shape = shape_from_preset(r["shape"], layers=int(r.get("layers", 4)))
        row = {"shape": r["shape"], "batch": r["batch"]}
        for kind, offload in (("streamed", "stream"), ("resident", "resident")):
            work = Workload(tokens=b * s, seq=s, offload=offload)
            pred = predict_layout(shape, Layout(), work, rates)
            measured = r.get(f"{kind}_ms")
            row[f"{kind}_ms"] = measured
            row[f"{kind}_pred_ms"] = pred.step_s * 1e3
            row[f"{kind}_ratio"] = pred.step_s * 1e3 / measured if measured else None
        row["peak_gb"] = r.get("peak_gb")
        row["peak_pred_gb"] = predict_layout(shape, Layout(), Workload(tokens=b * s, seq=s, offload="stream"),
                                             rates).gpu_mem_gb
        out.append(row)
    return out

