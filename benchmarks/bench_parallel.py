"""What one GPU can tell about the multi-GPU layouts, fed to the cost model (zo2.parallel.plan).

Per OPT block shape (bf16) it measures, on one GPU: the pinned upload of 1/N of a block for N = 1, 2, 4, 8 (what
each GPU of a node moves with sliced transfers), and a device-to-device copy of the (N-1)/N of the block an
all-gather would deliver (a stand-in: one GPU cannot measure NVLink). Then it calibrates the cost model with the
offload benchmark's JSON plus these bandwidths and prints the predicted scaling table for 2/4/8 GPUs per node and
1-4 nodes, OPT-13B/30B/66B/175B, next to the published DistZO2 figure. Prints tables, writes JSON.

    python benchmarks/bench_parallel.py --calibrate benchmarks/results/2026-11-26-h200/offload.json
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import sys

sys.path.insert(0, os.path.dirname(__file__))

import torch  # noqa: E402

from bench_common import cuda_timed, environment, print_table, write_json  # noqa: E402
from zo2.parallel import plan  # noqa: E402


def measure(shape: str, parts: list[int]) -> list[dict]:
    nbytes = 2 * plan.shape_from_preset(shape).block_params  # one block in bf16
    host = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
    dev = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    other = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    rows = []
    for n in parts:
        share = nbytes // n
        up = cuda_timed(lambda: dev[:share].copy_(host[:share], non_blocking=True))
        rest = nbytes - share
        gather = cuda_timed(lambda: other[:rest].copy_(dev[:rest])) if rest else 0.0
        rows.append({"shape": shape, "N": n, "block_gb": nbytes / 1e9, "slice_gb": share / 1e9,
                     "upload_ms": up * 1e3, "upload_gbs": share / up / 1e9,
                     "gather_standin_ms": gather * 1e3})
    del host, dev, other
    torch.cuda.empty_cache()
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", nargs="*", default=["opt-13b", "opt-30b", "opt-66b", "opt-175b"])
    parser.add_argument("--calibrate", help="a benchmarks/bench_offload.py JSON of the same machine")
    parser.add_argument("--out", default="benchmarks/out/parallel.json")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("benchmarks/bench_parallel.py measures host↔GPU slices and needs CUDA; nothing to do on this machine.")
        return
    rows = [r for shape in args.shapes for r in measure(shape, [1, 2, 4, 8])]
    print_table(rows, [("shape", "shape", "s"), ("N", "N", "d"), ("block_gb", "block GB", ".2f"),
                       ("slice_gb", "slice GB", ".2f"), ("upload_ms", "upload ms", ".2f"),
                       ("upload_gbs", "upload GB/s", ".1f"), ("gather_standin_ms", "d2d (N-1)/N ms", ".2f")])
    rates = plan.calibrate(args.calibrate) if args.calibrate else plan.Rates()
    sliced = [r["upload_gbs"] for r in rows if r["N"] > 1]
    rates = dataclasses.replace(rates, h2d_gbs=statistics.median(sliced),
                                source=rates.source + " + slice uploads measured by benchmarks/bench_parallel.py")
    table = plan.scaling_table(rates=rates)
    print()
    print(plan.format_scaling(table, rates, plan.SCALING_BATCH * plan.SCALING_SEQ, plan.SCALING_SEQ))
    write_json(args.out, {"benchmark": "parallel", "env": environment(), "measured": rows,
                          "rates": dataclasses.asdict(rates), "scaling": table})


if __name__ == "__main__":
    main()
