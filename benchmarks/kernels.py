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

Runs on a CUDA GPU; on a machine without one it prints a message and exits 0.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

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
    p.add_argument("--sweep", action="store_true", help="also time block / num_warps choices on one shape")
    p.add_argument("--out", default="benchmarks/out/kernels.json")
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


def sweep(dtype: torch.dtype, K, rng, d: int = 7168) -> list[dict]:
    """Median ms of the gaussian / rademacher kernels for a few (block, num_warps) choices."""
    table = _block_table(d, rng)
    n = table.end
    theta = torch.randn(n, device="cuda").to(dtype)
    plus, minus, scratch = torch.empty_like(theta), torch.empty_like(theta), theta.clone()
    out = []
    for block, warps in [(1024, 4), (2048, 4), (2048, 8), (4096, 4), (4096, 8)]:
        for dist in ("gaussian", "rademacher"):
            f = lambda: K.perturb_pair(theta, table, 7, 1e-3, dist, out_plus=plus, out_minus=minus,
                                       block=block, num_warps=warps)
            u = lambda: K.update_and_perturb(scratch, table, [6], [0.3], 1e-6, 0.0, 7, 1e-3, dist, out=scratch,
                                             out_plus=plus, out_minus=minus, block=block, num_warps=warps)
            out.append({"block": block, "num_warps": warps, "distribution": dist,
                        "pair_ms": _bench(f), "upd_pair_ms": _bench(u)})
            print(f"  sweep d={d} block={block:5d} warps={warps} {dist:10s} pair {out[-1]['pair_ms']:.3f} ms"
                  f"  upd_pair {out[-1]['upd_pair_ms']:.3f} ms", flush=True)
    return out


def main(argv=None) -> int:
    args = parse_args(argv)
    if not torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1":
        print("benchmarks/kernels.py: no CUDA device (or TRITON_INTERPRET=1): nothing to time; run it on a GPU.")
        return 0
    try:
        import triton  # noqa: F401
    except ImportError:
        print("benchmarks/kernels.py: triton is not installed: pip install 'zo2[kernels]'")
        return 0
    import zo2_kernels
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
    if args.sweep:
        result["sweep"] = sweep(dtype, K, rng)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    print(f"wrote {out} ({time.time() - t0:.1f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
