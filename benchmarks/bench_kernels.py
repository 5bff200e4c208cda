"""Benchmark the fused perturbation / update kernels (zo2_kernels) on OPT-block-sized flat buffers.

For each OPT shape (one decoder block: 12·d² + 13·d parameters, packed as the 16 real tensors) this times,
in the chosen dtype:

* ``copy``            device-to-device copy (the bandwidth ceiling);
* ``torch_pair``      torch.randn + two adds: θ± = θ ± εz the plain-torch way;
* ``torch_mezo4``     the four in-place passes of MeZO-style code (θ+=εz; θ-=2εz; θ+=εz; θ-=lr·g·z),
                      each regenerating z with torch.randn;
* ``pair_gauss`` / ``pair_rad``     ``perturb_pair`` (gaussian / rademacher);
* ``upd_pair_gauss`` / ``upd_pair_rad``  ``update_and_perturb`` with q = 1 (θ_new in place);
* ``upd_pair_gauss_sr``             the same with stochastic rounding of the low-precision store.

Each row reports the median time, the bytes the job needs at minimum (θ read once, each output written once;
the torch paths are charged the same bytes as the fused kernel doing the same job), the bandwidth that implies,
and that bandwidth as a percentage of the copy's. Prints a table and writes JSON (``--out``).

``--sweep`` instead times ``perturb_pair`` (gaussian, rademacher) and ``update_and_perturb`` (q = 1, both
distributions) for every valid (BLOCK, num_warps) of a grid, and for the persistent variant (``programs_per_sm``)
on a few tiles, on an OPT-175B-sized block and a small OPT-6.7B-sized one. Yardsticks of each size: the
device-to-device copy, the same read/write pattern with no work (read θ, write 2 or 3 outputs: what the kernels
could reach if generating z were free) and the four-pass torch sequence (and, with ``--baseline FILE``, an
older ``triton_ops.py`` at its default tile for a before/after on the same card). It checks every configuration
against the torch reference on a small block first, compiles the configurations in parallel processes (Triton's
on-disk cache hands them to the timing process), times with CUDA events (median of a few repeats after
warm-ups), prints a table and writes JSON. ``--device cpu --tiny`` runs the same path on tiny sizes under the
Triton interpreter, to check the script itself without a GPU.

Runs on a CUDA GPU; on a machine without one it prints a message and exits 0 (except ``--sweep --device cpu``).
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import inspect
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

_REPO = Path(__file__).resolve().parent.parent

SHAPES = {  # OPT model -> hidden size d
    "1.3b": 2048,
    "6.7b": 4096,
    "13b": 5120,
    "30b": 7168,
    "66b": 9216,
    "175b": 12288,
}
QUICK_SHAPES = ["1.3b", "6.7b"]
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def opt_block_params(d: int) -> list[tuple[str, int, bool]]:
    """(name, numel, weight decay) of one OPT decoder block of width d: 12·d² + 13·d parameters."""
    return [
        ("self_attn.q_proj.weight", d * d, True), ("self_attn.q_proj.bias", d, False),
        ("self_attn.k_proj.weight", d * d, True), ("self_attn.k_proj.bias", d, False),
        ("self_attn.v_proj.weight", d * d, True), ("self_attn.v_proj.bias", d, False),
        ("self_attn.out_proj.weight", d * d, True), ("self_attn.out_proj.bias", d, False),
        ("self_attn_layer_norm.weight", d, False), ("self_attn_layer_norm.bias", d, False),
        ("fc1.weight", 4 * d * d, True), ("fc1.bias", 4 * d, False),
        ("fc2.weight", 4 * d * d, True), ("fc2.bias", d, False),
        ("final_layer_norm.weight", d, False), ("final_layer_norm.bias", d, False),
    ]


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shapes", default=",".join(SHAPES), help=f"comma-separated subset of {list(SHAPES)}")
    p.add_argument("--dtype", default="bf16", choices=list(DTYPES))
    p.add_argument("--quick", action="store_true", help=f"smoke run: only {QUICK_SHAPES}")
    p.add_argument("--sweep", action="store_true",
                   help="time a BLOCK x num_warps grid of the Triton kernels on --sweep-shapes (see the docstring)")
    p.add_argument("--sweep-shapes", default="175b,6.7b",
                   help="sweep sizes: OPT names from the shape list or hidden sizes d (default: 175b,6.7b)")
    p.add_argument("--blocks", default="1024,2048,4096,8192", help="sweep: BLOCK values")
    p.add_argument("--warps", default="4,8,16", help="sweep: num_warps values")
    p.add_argument("--persistent", default="4,8",
                   help="sweep: programs per SM for the persistent variant (empty: none), on --persistent-tiles")
    p.add_argument("--persistent-tiles", default="1024/4,2048/4,2048/8",
                   help="sweep: BLOCK/num_warps pairs timed with the persistent variant")
    p.add_argument("--maxnreg", default="",
                   help="sweep: register caps per thread (ptxas maxnreg, multiples of 8) timed on --maxnreg-tiles; "
                        "more resident programs per SM against spills (benchmarks/kernel_sass.py --maxnreg counts "
                        "them)")
    p.add_argument("--maxnreg-tiles", default="2048/2,1024/2", help="sweep: BLOCK/num_warps pairs for --maxnreg")
    p.add_argument("--baseline", default=None,
                   help="sweep: an older triton_ops.py to time at its default tile on the same card")
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"],
                   help="sweep: cpu runs under TRITON_INTERPRET=1 (with --tiny: a check of the script)")
    p.add_argument("--tiny", action="store_true", help="sweep: tiny sizes (d=32 and 16), one repeat")
    p.add_argument("--warmup", type=int, default=3, help="sweep: warm-up calls per measurement")
    p.add_argument("--reps", type=int, default=10, help="sweep: timed calls per measurement (median reported)")
    p.add_argument("--jobs", type=int, default=12, help="sweep: parallel compile processes (0: compile inline)")
    p.add_argument("--out", default=None, help="JSON path (default benchmarks/out/kernels[_sweep].json)")
    return p.parse_args(argv)


def _bench(fn, rep_ms: float = 100.0) -> float:
    """Median milliseconds of ``fn`` (triton.testing.do_bench: L2 flushed between runs)."""
    from triton.testing import do_bench

    return float(do_bench(fn, warmup=25, rep=rep_ms, return_mode="median"))


def bench_shape(name: str, d: int, dtype: torch.dtype, K, rng) -> list[dict]:
    """All rows for one shape. ``K`` is the Triton backend module."""
    table = _block_table(d, rng)
    n = table.end
    esize = torch.tensor([], dtype=dtype).element_size()
    dev = torch.device("cuda")
    theta = torch.randn(n, device=dev, dtype=torch.float32).to(dtype)
    plus = torch.empty_like(theta)
    minus = torch.empty_like(theta)
    scratch = torch.empty_like(theta)
    eps, lr, g = 1e-3, 1e-6, 0.37

    def copy():
        scratch.copy_(theta)

    def torch_pair():
        z = torch.randn(n, device=dev, dtype=dtype)
        torch.add(theta, z, alpha=eps, out=plus)
        torch.add(theta, z, alpha=-eps, out=minus)

    def torch_mezo4():
        for scale in (eps, -2 * eps, eps, -lr * g):
            torch.manual_seed(1234)
            z = torch.randn(n, device=dev, dtype=dtype)
            scratch.add_(z, alpha=scale)

    def pair(dist):
        return lambda: K.perturb_pair(theta, table, 7, eps, dist, out_plus=plus, out_minus=minus)

    def upd_pair(dist, sr=None):
        # In place (out=scratch, a copy of θ): what the engine does with the store buffer.
        return lambda: K.update_and_perturb(scratch, table, [6], [g], lr, 0.0, 7, eps, dist,
                                            stochastic_rounding_seed=sr, out=scratch, out_plus=plus,
                                            out_minus=minus)

    jobs = [
        ("copy", copy, 2),
        ("torch_pair", torch_pair, 3),
        ("torch_mezo4", torch_mezo4, 4),
        ("pair_gauss", pair("gaussian"), 3),
        ("pair_rad", pair("rademacher"), 3),
        ("upd_pair_gauss", upd_pair("gaussian"), 4),
        ("upd_pair_rad", upd_pair("rademacher"), 4),
    ]
    if dtype != torch.float32:
        jobs.append(("upd_pair_gauss_sr", upd_pair("gaussian", sr=99), 4))
    rows, copy_bw = [], None
    scratch.copy_(theta)
    for kname, fn, passes in jobs:
        ms = _bench(fn)
        nbytes = passes * n * esize  # minimum traffic of the job: θ read once, each output written once
        bw = nbytes / (ms * 1e-3) / 1e9
        if kname == "copy":
            copy_bw = bw
        rows.append({"shape": name, "d": d, "params": n, "kernel": kname, "ms": ms, "bytes": nbytes,
                     "GBps": bw, "pct_copy": 100.0 * bw / copy_bw})
    del theta, plus, minus, scratch
    torch.cuda.empty_cache()
    return rows


def _block_table(d: int, rng):
    from zo2_kernels import SegmentTable

    return SegmentTable.pack((rng.param_key(f"model.decoder.layers.0.{nm}"), numel, decay)
                             for nm, numel, decay in opt_block_params(d))


# ------------------------------------------------------------------------------------------------------ sweep
SWEEP_KINDS = ("pair_gauss", "pair_rad", "upd_pair_gauss", "upd_pair_rad")
_PASSES = {"pair_gauss": 3, "pair_rad": 3, "upd_pair_gauss": 4, "upd_pair_rad": 4}  # θ read + outputs written
_SEED, _PREV_SEED, _EPS, _LR, _G = 7, 6, 1e-3, 1e-6, 0.37  # seeds < 2**31: one int32 kernel specialisation


def _import_kernels():
    """``zo2_kernels`` from this checkout (and ``zo2`` from it too): the repository's kernels/zo2_kernels/ directory is
    registered under its package name unless the importable ``zo2_kernels`` already is that directory (as
    with benchmarks/gpu_env.sh's PYTHONPATH), so the script times this tree's kernels wherever it runs."""
    if str(_REPO) not in sys.path:
        sys.path.insert(0, str(_REPO))
    here = (_REPO / "kernels" / "zo2_kernels").resolve()
    mod = sys.modules.get("zo2_kernels")
    if mod is None:
        spec = importlib.util.find_spec("zo2_kernels")
        if spec is not None and spec.origin and Path(spec.origin).resolve().parent == here:
            return importlib.import_module("zo2_kernels")
        spec = importlib.util.spec_from_file_location(
            "zo2_kernels", here / "__init__.py", submodule_search_locations=[str(here)])
        mod = importlib.util.module_from_spec(spec)
        sys.modules["zo2_kernels"] = mod
        spec.loader.exec_module(mod)
    return mod


def _load_baseline(path: str):
    """An older triton_ops.py as module ``zo2_kernels._baseline_ops`` (its relative imports resolve)."""
    _import_kernels()
    name = "zo2_kernels._baseline_ops"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    mod.__package__ = "zo2_kernels"
    sys.modules[name] = mod
    spec.loader.exec_module(mod)
    return mod


def _sweep_d(spec: str) -> tuple[str, int]:
    spec = spec.strip().lower()
    if spec in SHAPES:
        return spec, SHAPES[spec]
    return f"d{int(spec)}", int(spec)


def _grid(blocks: list[int], warps: list[int]) -> list[tuple[int, int]]:
    """Valid (BLOCK, num_warps): every thread holds at least one 8-element row (one 16-byte bf16 vector)."""
    return [(b, w) for b in blocks for w in warps if b >= 8 * 32 * w]


def _kernel_call(K, kind: str, table, theta, plus, minus, scratch, block, num_warps, pps: int = 0,
                 regs: int = 0):
    """One call of kernel ``kind`` (see SWEEP_KINDS) of backend module ``K`` on the given buffers: at its
    default tile when ``block`` is None, with ``pps`` persistent programs per SM when > 0, with at most
    ``regs`` registers per thread when > 0."""
    dist = "gaussian" if kind.endswith("gauss") else "rademacher"
    kw = {} if block is None else {"block": block, "num_warps": num_warps}
    if pps:
        kw["programs_per_sm"] = pps
    if regs:
        kw["max_registers"] = regs
    if kind.startswith("pair"):
        return K.perturb_pair(theta, table, _SEED, _EPS, dist, out_plus=plus, out_minus=minus, **kw)
    # in place, as the engine updates its store buffer
    return K.update_and_perturb(scratch, table, [_PREV_SEED], [_G], _LR, 0.0, _SEED, _EPS, dist, out=scratch,
                                out_plus=plus, out_minus=minus, **kw)


def _precompile_job(job: tuple) -> str:
    """Run in a spawned process: compile one configuration by calling it on a small block of the same layout
    (same specialisation: 16 segments, aligned, bf16...), which leaves it in Triton's on-disk cache."""
    kind, block, warps, pps, regs, dtype_name, baseline = job
    try:
        _import_kernels()
        from zo2.optim import rng

        K = _load_baseline(baseline) if baseline else importlib.import_module("zo2_kernels.triton_ops")
        table = _block_table(64, rng)
        theta = torch.randn(table.end, device="cuda").to(DTYPES[dtype_name])
        bufs = [torch.empty_like(theta) for _ in range(3)]
        _kernel_call(K, kind, table, theta, *bufs, block, warps, pps, regs)
        torch.cuda.synchronize()
        return ""
    except Exception as e:  # reported, and the timing process compiles it itself
        return f"{kind} {_config_name('', block, warps, pps, regs).strip()}: {type(e).__name__}: {e}"


def _precompile(jobs: list[tuple], n_proc: int) -> tuple[float, list[str]]:
    import concurrent.futures as cf
    import multiprocessing as mp

    t0 = time.time()
    errors = []
    try:
        with cf.ProcessPoolExecutor(max_workers=max(1, min(n_proc, len(jobs))),
                                    mp_context=mp.get_context("spawn")) as ex:
            errors = [e for e in ex.map(_precompile_job, jobs) if e]
    except Exception as e:  # a broken pool only costs time: the timing process compiles inline
        errors.append(f"parallel compile unavailable ({type(e).__name__}: {e}); compiling inline")
    return time.time() - t0, errors


def _timer(device: str):
    """``time(fn, warmup, reps) -> median ms``: CUDA events around each call on a GPU, a host clock on CPU."""
    def time_cuda(fn, warmup, reps):
        for _ in range(warmup):
            fn()
        ev = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(reps)]
        for a, b in ev:
            a.record()
            fn()
            b.record()
        torch.cuda.synchronize()
        return statistics.median(a.elapsed_time(b) for a, b in ev)

    def time_cpu(fn, warmup, reps):
        for _ in range(warmup):
            fn()
        ts = []
        for _ in range(reps):
            t = time.perf_counter()
            fn()
            ts.append((time.perf_counter() - t) * 1e3)
        return statistics.median(ts)

    return time_cuda if device == "cuda" else time_cpu


def _fanout_kernel():
    """A Triton kernel that only moves bytes: reads ``x`` once, writes it to 2 or 3 outputs (``NOUT``) — the
    memory pattern of perturb_pair (read 1, write 2) and update_and_perturb (read 1, write 3) with no work,
    as their yardstick. Built on first use (the interpreter flag is read when a kernel is created)."""
    import triton
    import triton.language as tl

    @triton.jit
    def fanout(x_ptr, a_ptr, b_ptr, c_ptr, n, NOUT: tl.constexpr, BLOCK: tl.constexpr):
        offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        m = offs < n
        x = tl.load(x_ptr + offs, mask=m)
        tl.store(a_ptr + offs, x, mask=m)
        tl.store(b_ptr + offs, x, mask=m)
        if NOUT == 3:
            tl.store(c_ptr + offs, x, mask=m)

    return fanout


def _check(K, R, rng, configs, dtype, device, d: int, baseline=None) -> dict:
    """Every configuration against the torch reference on a small OPT-layout block: Rademacher bit for bit,
    Gaussian within one output ulp on under 1% of elements; every configuration equal to the default tile's
    output bit for bit (the results do not depend on the tile or the grid); the kernel's own z within 1e-6 of
    the reference. Returns ``{"ok": bool, "failures": [...]}``."""
    table = _block_table(d, rng)
    g = torch.Generator().manual_seed(0)
    theta = torch.randn(table.end, generator=g).to(dtype).to(device)
    failures = []

    def close(a, b, dist, what):
        a, b = a.float().cpu(), b.float().cpu()
        if torch.isnan(a).any():
            failures.append(f"{what}: NaN (unwritten output)")
        elif dist == "rademacher":
            if not torch.equal(a, b):
                failures.append(f"{what}: differs from the reference (max {float((a - b).abs().max()):.3g})")
        else:
            ulp = (torch.nextafter(b.abs().to(dtype), torch.tensor(float("inf"), dtype=dtype)).float()
                   - b.abs().to(dtype).float())
            diff = (a - b).abs()
            if not bool((diff <= ulp * 1.0001).all()) or float((diff > 0).float().mean()) >= 0.01:
                failures.append(f"{what}: beyond one ulp / too many differences (max {float(diff.max()):.3g})")

    def run(mod, kind, block, warps, pps=0, regs=0):
        bufs = [torch.full_like(theta, float("nan")) for _ in range(3)]
        bufs[2].copy_(theta)  # scratch: θ, updated in place
        out = _kernel_call(mod, kind, table, theta, bufs[0], bufs[1], bufs[2], block, warps, pps, regs)
        return [x.clone() for x in out]

    for kind in SWEEP_KINDS:
        dist = "gaussian" if kind.endswith("gauss") else "rademacher"
        ref = _kernel_call(R, kind, table, theta, torch.empty_like(theta), torch.empty_like(theta),
                           theta.clone(), None, None)
        default = run(K, kind, None, None)
        for a, b in zip(default, ref):
            close(a, b, dist, f"{kind} default tile vs reference")
        for version, block, warps, pps, regs in configs:
            if version != "new":
                continue
            got = run(K, kind, block, warps, pps, regs)
            if not all(torch.equal(x, y) for x, y in zip(got, default)):
                failures.append(f"{kind} {_config_name('', block, warps, pps, regs).strip()}: differs from the "
                                "default tile's output")
        if baseline is not None:
            for a, b in zip(run(baseline, kind, None, None), ref):
                close(a, b, dist, f"{kind} baseline vs reference")
    n = min(table.end, 1 << 20)
    z = K.direction(31, table.segments[0].key, 0, n, device=device)
    zr = R.direction(31, table.segments[0].key, 0, n, device=device)
    err = float((z - zr).abs().max())
    if not err <= 1e-6:
        failures.append(f"gaussian direction: max |z - z_ref| = {err:.3g} > 1e-6")
    return {"ok": not failures, "failures": failures, "params": table.end, "z_max_abs_err": err}


def _config_name(version: str, block, warps, pps: int, regs: int = 0) -> str:
    return f"{version} {block}/{warps}" + (f" p{pps}" if pps else "") + (f" r{regs}" if regs else "")


def run_sweep(args) -> int:
    device = args.device
    if device == "cpu":
        os.environ["TRITON_INTERPRET"] = "1"  # read when the kernels are created (first import)
    elif not torch.cuda.is_available():
        print("benchmarks/bench_kernels.py --sweep: no CUDA device; use --device cpu --tiny to check the script.")
        return 0
    t_start = time.time()
    _import_kernels()
    import triton

    from zo2.optim import rng
    from zo2_kernels import reference as R

    K = importlib.import_module("zo2_kernels.triton_ops")
    if device == "cpu" and not K._INTERPRET:
        K = importlib.reload(K)
    base = _load_baseline(args.baseline) if args.baseline else None
    dtype = DTYPES[args.dtype]
    esize = torch.tensor([], dtype=dtype).element_size()
    blocks = [int(x) for x in args.blocks.split(",") if x.strip()]
    warps = [int(x) for x in args.warps.split(",") if x.strip()]
    grid = _grid(blocks, warps)
    pps_list = [int(x) for x in args.persistent.split(",") if x.strip()]
    p_tiles = [tuple(int(v) for v in x.split("/")) for x in args.persistent_tiles.split(",") if x.strip()]
    if not hasattr(K, "DEFAULT_PROGRAMS_PER_SM"):
        pps_list = []
    # (version, BLOCK, num_warps, programs per SM; 0: one program per tile)
    regs_list = [int(x) for x in args.maxnreg.split(",") if x.strip() and int(x)]
    r_tiles = [tuple(int(v) for v in x.split("/")) for x in args.maxnreg_tiles.split(",") if x.strip()]
    if "max_registers" not in inspect.signature(K.perturb_pair).parameters:
        regs_list = []
    # (version, BLOCK, num_warps, programs per SM (0: one program per tile), register cap (0: none))
    configs = [("new", b, w, 0, 0) for b, w in grid]
    configs += [("new", b, w, p, 0) for b, w in p_tiles if (b, w) in _grid([b], [w]) for p in pps_list]
    configs += [("new", b, w, 0, r) for b, w in r_tiles if (b, w) in _grid([b], [w]) for r in regs_list]
    if base is not None:
        configs.append(("baseline", base.DEFAULT_BLOCK, base.DEFAULT_NUM_WARPS, 0, 0))
    sizes = [("tiny", 32), ("tiny-small", 16)] if args.tiny else [_sweep_d(x) for x in args.sweep_shapes.split(",")]
    warmup, reps = (1, 1) if args.tiny else (args.warmup, args.reps)
    timer = _timer(device)
    dev_name = torch.cuda.get_device_name() if device == "cuda" else "cpu (Triton interpreter)"
    print(f"sweep on {dev_name}  dtype={args.dtype}  torch {torch.__version__}  triton {triton.__version__}  "
          f"{len(configs)} configurations", flush=True)

    compile_s, compile_errors = 0.0, []
    if device == "cuda" and args.jobs > 0:
        keys = {}
        for version, b, w, p, r in configs + [("new", K.DEFAULT_BLOCK, K.DEFAULT_NUM_WARPS, 0, 0)]:
            for kind in SWEEP_KINDS:  # one compile per specialisation (the programs count is not one)
                keys.setdefault((version, kind, b, w, p > 0, r),
                                (kind, b, w, p, r, args.dtype, str(args.baseline) if version == "baseline" else None))
        jobs = list(keys.values())
        compile_s, compile_errors = _precompile(jobs, args.jobs)
        print(f"compiled {len(jobs)} kernels in {compile_s:.1f} s ({args.jobs} processes)", flush=True)
        for e in compile_errors:
            print(f"  compile: {e}", flush=True)

    # d=512: 3.2M parameters, ~1500 tiles of 2048, so persistent programs walk several tiles each
    check = _check(K, R, rng, configs, dtype, device, 16 if args.tiny else 512, base)
    print(f"check vs torch reference ({check['params']} params, every configuration): "
          f"{'PASS' if check['ok'] else 'FAIL'}  (gaussian z max err {check['z_max_abs_err']:.2g})", flush=True)
    for f in check["failures"]:
        print(f"  FAIL {f}", flush=True)

    fanout = _fanout_kernel()
    results = []
    for name, d in sizes:
        table = _block_table(d, rng)
        n = table.end
        theta = torch.randn(n, device=device, dtype=torch.float32).to(dtype)
        plus, minus, scratch = torch.empty_like(theta), torch.empty_like(theta), theta.clone()
        size = {"shape": name, "d": d, "params": n, "rows": []}

        def mezo4():
            for scale in (_EPS, -2 * _EPS, _EPS, -_LR * _G):
                torch.manual_seed(1234)
                scratch.add_(torch.randn(n, device=device, dtype=dtype), alpha=scale)

        def fan(nout):
            return lambda: fanout[(triton.cdiv(n, 2048),)](theta, plus, minus, scratch, n, NOUT=nout, BLOCK=2048,
                                                           num_warps=4)

        size["copy_ms"] = timer(lambda: scratch.copy_(theta), warmup, reps)
        size["copy_GBps"] = 2 * n * esize / (size["copy_ms"] * 1e-3) / 1e9
        # pure-memory yardsticks of the kernels' access patterns, in GB/s counted like the kernels'
        size["read1_write2_GBps"] = 3 * n * esize / (timer(fan(2), warmup, reps) * 1e-3) / 1e9
        size["read1_write3_GBps"] = 4 * n * esize / (timer(fan(3), warmup, reps) * 1e-3) / 1e9
        size["torch_mezo4_ms"] = timer(mezo4, warmup, reps)
        scratch.copy_(theta)
        for version, b, w, p, r in configs:
            mod = K if version == "new" else base
            row = {"version": version, "block": b, "num_warps": w, "programs_per_sm": p, "max_registers": r}
            for kind in SWEEP_KINDS:
                ms = timer(lambda: _kernel_call(mod, kind, table, theta, plus, minus, scratch, b, w, p, r), warmup,
                           reps)
                gbps = _PASSES[kind] * n * esize / (ms * 1e-3) / 1e9
                ceiling = size["read1_write2_GBps"] if kind.startswith("pair") else size["read1_write3_GBps"]
                row[kind] = {"ms": ms, "GBps": gbps, "pct_copy": 100 * gbps / size["copy_GBps"],
                             "pct_pattern": 100 * gbps / ceiling}
                if kind.startswith("upd"):
                    row[kind]["x_mezo4"] = size["torch_mezo4_ms"] / ms
            size["rows"].append(row)
            print(f"  {name} {_config_name(version, b, w, p, r)}: " + "  ".join(
                f"{k} {row[k]['ms']:.3f} ms" for k in SWEEP_KINDS), flush=True)
        results.append(size)
        del theta, plus, minus, scratch
        if device == "cuda":
            torch.cuda.empty_cache()

    # the table, last (the end of the output is what a remote run shows)
    for size in results:
        print(f"\n{size['shape']} (d={size['d']}, {size['params'] / 1e6:.0f}M params, {args.dtype}): copy "
              f"{size['copy_GBps']:.0f} GB/s ({size['copy_ms']:.3f} ms); read 1 / write 2 "
              f"{size['read1_write2_GBps']:.0f} GB/s, read 1 / write 3 {size['read1_write3_GBps']:.0f} GB/s; "
              f"torch four-pass {size['torch_mezo4_ms']:.3f} ms")
        print("% copy: of the copy's GB/s; % pat: of the same read/write pattern's GB/s with no work")
        print(f"{'config':>20} | {'pair_gauss':>19} | {'pair_rad':>19} | {'upd_pair_gauss':>26} | "
              f"{'upd_pair_rad':>26}")
        print(f"{'':>20} | {'ms':>7} {'%copy':>5} {'%pat':>5} | {'ms':>7} {'%copy':>5} {'%pat':>5} | "
              f"{'ms':>7} {'%copy':>5} {'%pat':>5} {'x4pass':>6} | {'ms':>7} {'%copy':>5} {'%pat':>5} {'x4pass':>6}")
        for r in size["rows"]:
            cells = [f"{r[k]['ms']:7.3f} {r[k]['pct_copy']:5.1f} {r[k]['pct_pattern']:5.1f}" for k in SWEEP_KINDS[:2]]
            cells += [f"{r[k]['ms']:7.3f} {r[k]['pct_copy']:5.1f} {r[k]['pct_pattern']:5.1f} {r[k]['x_mezo4']:5.2f}x"
                      for k in SWEEP_KINDS[2:]]
            name_ = _config_name(r["version"], r["block"], r["num_warps"], r["programs_per_sm"], r["max_registers"])
            print(f"{name_:>20} | "
                  + " | ".join(cells))
        new_rows = [r for r in size["rows"] if r["version"] == "new"]
        best = {k: min(new_rows, key=lambda r: r[k]["ms"]) for k in SWEEP_KINDS}
        print("best: " + "  ".join(
            f"{k} {_config_name('', b['block'], b['num_warps'], b['programs_per_sm'], b['max_registers']).strip()} "
            f"({b[k]['ms']:.3f} ms)"
            for k, b in best.items()))
    total = time.time() - t_start
    print(f"\ncheck: {'PASS' if check['ok'] else 'FAIL'}   total {total:.1f} s (compile {compile_s:.1f} s)")
    payload = {"device": dev_name, "dtype": args.dtype, "torch": torch.__version__, "triton": triton.__version__,
               "configs": configs, "warmup": warmup, "reps": reps, "check": check, "compile_s": compile_s,
               "compile_errors": compile_errors, "total_s": total, "sizes": results,
               "default": {"block": K.DEFAULT_BLOCK, "num_warps": K.DEFAULT_NUM_WARPS,
                           "programs_per_sm": getattr(K, "DEFAULT_PROGRAMS_PER_SM", 0)}}
    out = Path(args.out or "benchmarks/out/kernels_sweep.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(payload, indent=1))
    print(f"wrote {out}")
    return 0 if check["ok"] else 1


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.sweep:
        return run_sweep(args)
    if not torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1":
        print("benchmarks/bench_kernels.py: no CUDA device (or TRITON_INTERPRET=1): nothing to time; run it on a GPU.")
        return 0
    try:
        import triton  # noqa: F401
    except ImportError:
        print("benchmarks/bench_kernels.py: triton is not installed: pip install 'zo2[kernels]'")
        return 0
    zo2_kernels = _import_kernels()
    from zo2.optim import rng

    K = zo2_kernels.get_backend("triton", "cuda")
    dtype = DTYPES[args.dtype]
    shapes = QUICK_SHAPES if args.quick else [s.strip().lower() for s in args.shapes.split(",") if s.strip()]
    unknown = [s for s in shapes if s not in SHAPES]
    if unknown:
        print(f"unknown shapes {unknown}; choose from {list(SHAPES)}", file=sys.stderr)
        return 2

    t0 = time.time()
    rows = []
    hdr = f"{'shape':>6} {'params':>7} {'kernel':>18} {'ms':>8} {'GB/s':>8} {'% copy':>7}"
    print(f"{torch.cuda.get_device_name()}  dtype={args.dtype}  torch {torch.__version__}  triton "
          f"{sys.modules['triton'].__version__}")
    print(hdr)
    for name in shapes:
        for r in bench_shape(name, SHAPES[name], dtype, K, rng):
            rows.append(r)
            print(f"{r['shape']:>6} {r['params'] / 1e6:6.0f}M {r['kernel']:>18} {r['ms']:8.3f} {r['GBps']:8.0f} "
                  f"{r['pct_copy']:6.1f}%", flush=True)
    result = {"device": torch.cuda.get_device_name(), "dtype": args.dtype, "torch": torch.__version__,
              "triton": sys.modules["triton"].__version__, "rows": rows}
    out = Path(args.out or "benchmarks/out/kernels.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    print(f"wrote {out} ({time.time() - t0:.1f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
