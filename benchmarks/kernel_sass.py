"""Static cost of the fused kernels: compile them for a GPU target on any machine (no GPU needed) and count
the machine instructions.

Triton ships ptxas, cuobjdump and nvdisasm, so ``_zo_kernel`` can be built for sm_90 here and its SASS read:
registers, stack (spills), shared memory, and a histogram of instructions. The kernels have no loops or data-
dependent branches in their element work, so the static count of one program is also what it executes; divided
by the elements of a tile it is the instruction cost per element, the number that bounds the Gaussian kernels
(they issue instructions faster than memory moves bytes only while that cost stays low).

    python benchmarks/kernel_sass.py                  # perturb / update+perturb, both distributions, bf16
    python benchmarks/kernel_sass.py --module FILE    # another triton_ops.py (e.g. an older one), same counts
    python benchmarks/kernel_sass.py --dump DIR       # also write the PTX, TTGIR and SASS of each variant
    python benchmarks/kernel_sass.py --maxnreg 56     # with a register cap: spills, resident programs per SM

Needs the triton package's bundled NVIDIA tools; the numbers are for the local triton version.
"""

from __future__ import annotations

import argparse
import collections
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

os.environ.pop("TRITON_INTERPRET", None)  # compile, do not interpret


def _bench_kernels():
    """benchmarks/bench_kernels.py (for its importers), under a name that is not the top-level ``kernels``."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("zo2_bench_kernels", Path(__file__).with_name("bench_kernels.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


_ARG_TYPES = {"theta_ptr": "*D", "new_ptr": "*D", "plus_ptr": "*D", "minus_ptr": "*D", "table_ptr": "*i64",
              "tile_starts_ptr": "*i64", "seed0": "I", "coef0": "fp32", "seeds_ptr": "*i64",
              "coeffs_ptr": "*fp32", "lr": "fp32", "wd": "fp32", "seed": "I", "eps": "fp32", "sr_seed": "I",
              "n_tiles": "i32"}
_ESIZE = {"bf16": 2, "fp16": 2, "fp32": 4}
_MODES = {"perturb": 1, "update": 2, "update_perturb": 3, "direction": 0}


def compile_variant(K, mode: str, gaussian: bool, dtype: str, block: int, num_warps: int, q: int, sr: int,
                    arch: int, persistent: bool = False, maxnreg: int = 0):
    """The CompiledKernel of ``K._zo_kernel`` for one specialisation (16 aligned segments, as an OPT block)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    fn = K._zo_kernel
    seed_type = "i32" if hasattr(K, "_as_int32") else "i64"  # older kernels took seeds as int64
    const = dict(N_SEG=16, N_SEG_P2=16, MODE=_MODES[mode], GAUSSIAN=gaussian, Q=q, SEEDS_FROM_PTR=False,
                 COEFFS_FROM_PTR=False, HAS_WD=False, SR=sr, ALIGNED8=True, C=block // 128,
                 PERSISTENT=persistent)
    signature, constexprs, attrs = {}, {}, {}
    const = {k: v for k, v in const.items() if k in fn.arg_names}  # older kernels lack some flags
    for i, name in enumerate(fn.arg_names):
        if name in const:
            signature[name] = "constexpr"
            constexprs[(i,)] = const[name]
            continue
        t = _ARG_TYPES[name].replace("I", seed_type)
        if t == "*D":
            t = "*fp32" if mode == "direction" else "*" + dtype
        signature[name] = t
        if t.startswith("*"):
            attrs[(i,)] = [["tt.divisibility", 16]]
    src = ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs)
    options = {"num_warps": num_warps, "enable_fp_fusion": False}
    if maxnreg:
        options["maxnreg"] = maxnreg
    return triton.compile(src, target=GPUTarget("cuda", arch, 32), options=options)


def programs_per_sm(regs: int, num_warps: int) -> int:
    """Programs one Hopper SM holds at once: 64 K registers (allocated per warp in units of 256), 64 warps,
    32 blocks; no shared memory in these kernels."""
    per_warp = -(-max(regs, 1) * 32 // 256) * 256
    return min(32, 64 // num_warps, 65536 // (per_warp * num_warps))


def sass_report(kernel) -> tuple[str, dict, collections.Counter]:
    """(SASS text, resource usage, instruction histogram without NOPs) of a CompiledKernel."""
    import triton

    tools = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
    with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as f:
        f.write(kernel.asm["cubin"])
        path = f.name
    try:
        sass = subprocess.run([str(tools / "nvdisasm"), "-c", path], capture_output=True, text=True,
                              check=True).stdout
        usage = subprocess.run([str(tools / "cuobjdump"), "--dump-resource-usage", path], capture_output=True,
                               text=True, check=True).stdout
    finally:
        os.unlink(path)
    m = re.search(r"REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)", usage)
    res = dict(zip(("reg", "stack", "shared", "local"), map(int, m.groups()))) if m else {}
    ops = collections.Counter()
    for line in sass.splitlines():
        mm = re.match(r"\s*/\*[0-9a-f]+\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_]*)", line)
        if mm and mm.group(1) != "NOP":
            ops[mm.group(1)] += 1
    return sass, res, ops


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--module", default=None, help="a triton_ops.py to analyse instead of this tree's")
    p.add_argument("--dtype", default="bf16", choices=["bf16", "fp16", "fp32"])
    p.add_argument("--block", type=int, default=2048)
    p.add_argument("--num-warps", type=int, default=4)
    p.add_argument("--arch", type=int, default=90, help="compute capability, e.g. 90 (H100/H200)")
    p.add_argument("--dump", default=None, help="directory for the PTX / TTGIR / SASS of each variant")
    p.add_argument("--persistent", action="store_true", help="the persistent (prefetching) variant")
    p.add_argument("--maxnreg", type=int, default=0,
                   help="cap registers per thread (as bench_kernels.py --maxnreg); spills show as stack and LDL/STL")
    args = p.parse_args(argv)
    bench = _bench_kernels()
    bench._import_kernels()
    import importlib

    K = bench._load_baseline(args.module) if args.module else importlib.import_module("zo2_kernels.triton_ops")
    per_thread = args.block // (32 * args.num_warps)
    print(f"sm_{args.arch}, {args.dtype}, BLOCK {args.block}, {args.num_warps} warps "
          f"({per_thread} elements per thread)")
    variants = [("perturb", True, 0, 0), ("perturb", False, 0, 0), ("update_perturb", True, 1, 0),
                ("update_perturb", False, 1, 0)]
    if args.dtype != "fp32":
        variants.append(("update_perturb", True, 1, 1 if args.dtype == "bf16" else 2))
    for mode, gaussian, q, sr in variants:
        kernel = compile_variant(K, mode, gaussian, args.dtype, args.block, args.num_warps, q, sr, args.arch,
                                 args.persistent, args.maxnreg)
        sass, res, ops = sass_report(kernel)
        total = sum(ops.values())
        name = f"{mode}{'_sr' if sr else ''} {'gaussian' if gaussian else 'rademacher'}"
        resident = programs_per_sm(res.get("reg", 0), args.num_warps)
        print(f"{name:32s} instructions {total:5d} ({total / per_thread:5.1f} per element)  regs {res.get('reg')}"
              f"  stack {res.get('stack')} (LDL {ops['LDL']}, STL {ops['STL']})  shared {res.get('shared')}  "
              f"branches {ops['BRA']}  programs/SM {resident} ({resident * args.num_warps} warps, "
              f"{resident * args.block * _ESIZE[args.dtype] // 1024} KB of θ per SM)")
        print("    " + ", ".join(f"{k} {v}" for k, v in ops.most_common(14)))
        if args.dump:
            out = Path(args.dump)
            out.mkdir(parents=True, exist_ok=True)
            stem = name.replace(" ", "_")
            (out / f"{stem}.sass").write_text(sass)
            (out / f"{stem}.ptx").write_text(kernel.asm["ptx"])
            (out / f"{stem}.ttgir").write_text(kernel.asm["ttgir"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
