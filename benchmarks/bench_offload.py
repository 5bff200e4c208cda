"""Offloaded ZO steps on OPT shapes vs all-on-GPU and vs the transfer floor (DESIGN.md §2, §7).

For each shape a model with a few layers is built on the meta device (time and memory are per block, so the
depth only scales them), filled with random weights, and stepped three ways: all blocks resident, all blocks
streamed, and (for the largest shape) streamed under an 18 GB device budget. In the same run it measures the
pinned host↔device bandwidths for one block and the time of two forwards of one block, and reports

    floor = Σ_blocks max(2·forward, bytes_up / BW_h2d, bytes_down / BW_d2h)

next to the measured streamed step. With ``--writeback K ...`` the streamed step also runs with
``optim.writeback_every = K`` (blocks written back every K steps), measured against the one-way floor

    floor_h2d = Σ_blocks max(2·forward, bytes_up / BW_h2d)

(the median step of a K-step cycle; the cycle's one write-back is spread over its steps). Prints a table, writes
JSON.

    python benchmarks/bench_offload.py                         # GPU: 1.3b 6.7b 13b 30b 175b-shaped
    python benchmarks/bench_offload.py --shapes opt-1.3b --layers 4 --batches 1x2048
    python benchmarks/bench_offload.py --shapes opt-6.7b opt-175b --writeback 2 4 8   # lagging write-back
    python benchmarks/bench_offload.py --shapes opt-6.7b opt-175b --writeback 4 --matrix  # one matrix at a time
    python benchmarks/bench_offload.py --shapes opt-175b --matrix --spare-slots 0   # what the third slot buys

``--spare-slots 0`` also streams one matrix at a time with no spare device slot (zo2.offload.planner.SPARE_SLOTS:
the ring holds the piece computing and the one uploading; an upload waits for its slot's write-back): the row's
``spare_slots`` column, its step time and peak against the default ring in the same run.
"""

from __future__ import annotations

import argparse
import gc
import os
import sys

sys.path.insert(0, os.path.dirname(__file__))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from bench_common import cuda_timed, environment, opt_config, opt_shapes, print_table, write_json  # noqa: E402
from zo2 import ZOConfig, ZOEngine  # noqa: E402
from zo2.models.base import LOSS_CHUNK_BYTES  # noqa: E402
from zo2.offload.arith import FORM_CHUNK_BYTES  # noqa: E402
from zo2.offload.loading import empty_model, init_random  # noqa: E402
from zo2.offload import planner  # noqa: E402
from zo2.offload.planner import WritebackProbe  # noqa: E402


def bandwidths(nbytes: int) -> tuple[float, float]:
    """Pinned host→device and device→host GB/s for a buffer of ``nbytes``."""
    host = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
    dev = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    up = cuda_timed(lambda: dev.copy_(host, non_blocking=True))
    down = cuda_timed(lambda: host.copy_(dev, non_blocking=True))
    del host, dev
    return nbytes / up / 1e9, nbytes / down / 1e9


def _writeback(text: str) -> int | str:
    return text if text == "auto" else int(text)


def engine_for(shape: str, layers: int, offload, budget=None, kernels: str = "auto", writeback: int | str = 1,
               granularity: str = "block") -> ZOEngine:
    cfg = dict(lr=1e-7, eps=1e-3, offload=offload, device="cuda", gpu_memory_budget=budget, prefetch=1)
    if writeback != 1:
        cfg["writeback_every"] = writeback
    if granularity != "block":
        cfg["stream_granularity"] = granularity
    if "kernels" in ZOConfig.__dataclass_fields__:
        cfg["kernels"] = kernels
    engine = ZOEngine(empty_model(opt_config(shape, layers), torch.bfloat16), ZOConfig(**cfg))
    init_random(engine, seed=0)
    return engine


def batch_of(b: int, s: int) -> dict:
    ids = torch.randint(3, 50272, (b, s))
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}


def step_time(engine: ZOEngine, batch: dict, repeat: int) -> tuple[float, dict]:
    for _ in range(2):
        engine.step(batch)
    torch.cuda.synchronize()
    times, last = [], None
    for _ in range(repeat):
        start = torch.cuda.Event(enable_timing=True)
        end = torch.cuda.Event(enable_timing=True)
        start.record()
        last = engine.step(batch)
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    times.sort()
    return times[len(times) // 2], {"peak_gb": last.peak_device_bytes / 1e9, "wait_ms": last.transfer_wait_ms,
                                    "h2d_gb": last.bytes_h2d / 1e9, "d2h_gb": last.bytes_d2h / 1e9}


@torch.no_grad()
def block_forward_time(engine: ZOEngine, batch: dict) -> float:
    """Median time of one forward of one block at ``batch`` (resident weights)."""
    adapter = engine.adapter
    ids = batch["input_ids"].cuda()
    hidden, ctx = adapter.embed(ids, batch["attention_mask"].cuda())
    block = adapter.blocks()[0]
    params = {n: p for n, p in block.named_parameters()}
    if any(p.device.type != "cuda" for p in params.values()):
        return float("nan")
    return cuda_timed(lambda: adapter.block(0, hidden, ctx), warmup=2, repeat=5)


def run_writeback(shape: str, layers: int, batches: list[tuple[int, int]], repeat: int, kernels: str,
                  writebacks: list[int], measured: dict, block_bytes: int, bw_up: float) -> list[dict]:
    """The streamed step with a lagging write-back, against the one-way (H2D) floor measured in the same run."""
    rows = []
    for k in writebacks:
        engine = None
        for b, s in batches:
            if engine is None or k == "auto":  # 'auto' decides K per engine from its first steps: one per batch
                engine = engine_for(shape, layers, True, kernels=kernels, writeback=k)
            if k == "auto":
                for _ in range(WritebackProbe.SKIP + WritebackProbe.STEPS):
                    engine.step(batch_of(b, s))
            fwd, t_res = measured[(b, s)]
            t_str, info = step_time(engine, batch_of(b, s), max(repeat, 2 * engine.plan.writeback_every))
            info["writeback_chosen"] = engine.plan.writeback_every
            floor = layers * max(2 * fwd, block_bytes / (bw_up * 1e9))
            rows.append({"shape": shape, "layers": layers, "batch": f"{b}x{s}", "block_gb": block_bytes / 1e9,
                         "writeback_every": k, "bw_h2d": bw_up, "fwd2_ms": 2 * fwd * 1e3, "resident_ms": t_res * 1e3,
                         "streamed_ms": t_str * 1e3, "ratio": t_str / t_res, "floor_h2d_ms": floor * 1e3,
                         "vs_floor_h2d": t_str / floor, "budget": None, **info})
            print(rows[-1], flush=True)
        del engine
        gc.collect()
        torch.cuda.empty_cache()
    return rows


def run_matrix(shape: str, layers: int, batches: list[tuple[int, int]], repeat: int, kernels: str,
               writebacks: list[int], block_rows: list[dict], block_bytes: int, bw_up: float,
               spare_slots: list[int] = ()) -> list[dict]:
    """The streamed step one matrix at a time (optim.stream_granularity = 'matrix'), K = 1 and each K of
    ``writebacks``, against block granularity with the same K measured earlier in this run (``block_rows``); with
    K = 1 also for each ``spare_slots`` count other than the default (planner.SPARE_SLOTS)."""
    rows = []
    default = planner.SPARE_SLOTS
    runs = [(k, default) for k in [1] + [k for k in writebacks if isinstance(k, int) and k > 1]]
    runs += [(1, n) for n in dict.fromkeys(spare_slots) if n != default]
    for k, spare in runs:
        planner.SPARE_SLOTS = spare
        try:
            engine = engine_for(shape, layers, True, kernels=kernels, writeback=k, granularity="matrix")
        finally:
            planner.SPARE_SLOTS = default  # the engine's rings are allocated: later engines get the default
        for b, s in batches:
            block = next(r for r in block_rows if r["batch"] == f"{b}x{s}" and r.get("writeback_every", 1) == k)
            t_str, info = step_time(engine, batch_of(b, s), max(repeat, 2 * k))
            floor = layers * max(block["fwd2_ms"] / 1e3, block_bytes / (bw_up * 1e9))
            rows.append({"shape": shape, "layers": layers, "batch": f"{b}x{s}", "block_gb": block_bytes / 1e9,
                         "granularity": "matrix", "writeback_every": k, "spare_slots": spare,
                         "streamed_ms": t_str * 1e3,
                         "block_ms": block["streamed_ms"], "vs_block": t_str * 1e3 / block["streamed_ms"],
                         "floor_h2d_ms": floor * 1e3, "vs_floor_h2d": t_str / floor, "block_peak_gb": block["peak_gb"],
                         "plan_peak_gb": engine.plan.expected_peak / 1e9, "budget": None, **info})
            print(rows[-1], flush=True)
        del engine
        gc.collect()
        torch.cuda.empty_cache()
    return rows


def run_shape(shape: str, layers: int, batches: list[tuple[int, int]], repeat: int, budget_cap: str | None,
              kernels: str, writebacks: list[int] = (), matrix: bool = False,
              spare_slots: list[int] = ()) -> list[dict]:
    rows = []
    resident = engine_for(shape, layers, False, kernels=kernels)
    block_bytes = resident.plan.block_bytes[0]
    bw_up, bw_down = bandwidths(block_bytes)
    measured = {}
    for b, s in batches:
        batch = batch_of(b, s)
        fwd = block_forward_time(resident, batch)
        t_res, _ = step_time(resident, batch, repeat)
        measured[(b, s)] = (fwd, t_res)
    del resident
    gc.collect()
    torch.cuda.empty_cache()
    streamed = engine_for(shape, layers, True, kernels=kernels)
    for b, s in batches:
        fwd, t_res = measured[(b, s)]
        t_str, info = step_time(streamed, batch_of(b, s), repeat)
        per_block = max(2 * fwd, block_bytes / (bw_up * 1e9), block_bytes / (bw_down * 1e9))
        floor = layers * per_block
        rows.append({"shape": shape, "layers": layers, "batch": f"{b}x{s}", "block_gb": block_bytes / 1e9,
                     "bw_h2d": bw_up, "bw_d2h": bw_down, "fwd2_ms": 2 * fwd * 1e3, "resident_ms": t_res * 1e3,
                     "streamed_ms": t_str * 1e3, "ratio": t_str / t_res, "floor_ms": floor * 1e3,
                     "vs_floor": t_str / floor, "budget": None, **info})
        print(rows[-1], flush=True)
    del streamed
    gc.collect()
    torch.cuda.empty_cache()
    rows += run_writeback(shape, layers, batches, repeat, kernels, [k for k in writebacks if k != 1], measured,
                          block_bytes, bw_up)
    if matrix:
        rows += run_matrix(shape, layers, batches, repeat, kernels, list(writebacks), list(rows), block_bytes, bw_up,
                           spare_slots)
    if budget_cap:
        b, s = batches[0]
        row = {"shape": shape, "layers": layers, "batch": f"{b}x{s}", "block_gb": block_bytes / 1e9,
               "budget": budget_cap}
        try:
            capped = engine_for(shape, layers, "auto", budget=budget_cap, kernels=kernels)
            print(capped.plan.describe())
            t_cap, info = step_time(capped, batch_of(b, s), repeat)
            row.update(streamed_ms=t_cap * 1e3, **info)
            del capped
        except Exception as err:  # record why the capped run cannot run (e.g. the plan does not fit)
            row["error"] = f"{type(err).__name__}: {err}"
        rows.append(row)
        print(rows[-1], flush=True)
        gc.collect()
        torch.cuda.empty_cache()
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", nargs="*", default=["opt-1.3b", "opt-6.7b", "opt-13b", "opt-30b", "opt-175b"])
    parser.add_argument("--layers", type=int, default=4, help="layers per model (time and memory are per block)")
    parser.add_argument("--batches", nargs="*", default=["1x2048", "8x2048"])
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--budget-shape", default="opt-175b", help="shape also run under --budget")
    parser.add_argument("--budget", default="18GB")
    parser.add_argument("--kernels", default="auto", choices=["auto", "triton", "torch"])
    parser.add_argument("--writeback", type=_writeback, nargs="*", default=[],
                        help="also run the streamed step with optim.writeback_every = each K given ('auto': its "
                             "probe decides per batch; the row records the K it chose)")
    parser.add_argument("--matrix", action="store_true",
                        help="also stream one matrix at a time (optim.stream_granularity = 'matrix'), with K = 1 "
                             "and each --writeback K, against block granularity in the same run")
    parser.add_argument("--spare-slots", type=int, nargs="*", default=[],
                        help="with --matrix: also run K = 1 with each number of spare device slots given (the "
                             f"default is {planner.SPARE_SLOTS}; 0: computing + prefetch only)")
    parser.add_argument("--out", default="benchmarks/out/offload.json")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("benchmarks/bench_offload.py measures host↔GPU streaming and needs CUDA; nothing to do on this machine.")
        return
    batches = [tuple(int(x) for x in b.split("x")) for b in args.batches]
    rows = []
    for shape in args.shapes:
        if shape not in opt_shapes():
            parser.error(f"unknown shape {shape}; known: {', '.join(opt_shapes())}")
        cap = args.budget if shape == args.budget_shape else None
        try:
            rows += run_shape(shape, args.layers, batches, args.repeat, cap, args.kernels, args.writeback,
                              args.matrix, args.spare_slots)
        except Exception as err:  # keep measuring the other shapes; the JSON records the failure
            rows.append({"shape": shape, "error": f"{type(err).__name__}: {err}"})
            print(rows[-1], flush=True)
            gc.collect()
            torch.cuda.empty_cache()
    print()
    print_table(rows, [("shape", "shape", "s"), ("batch", "batch", "s"), ("block_gb", "block GB", ".2f"),
                       ("bw_h2d", "H2D GB/s", ".1f"), ("bw_d2h", "D2H GB/s", ".1f"), ("fwd2_ms", "2 fwd ms", ".1f"),
                       ("resident_ms", "resident ms", ".1f"), ("streamed_ms", "streamed ms", ".1f"),
                       ("ratio", "str/res", ".2f"), ("floor_ms", "floor ms", ".1f"), ("vs_floor", "str/floor", ".2f"),
                       ("wait_ms", "wait ms", ".1f"), ("peak_gb", "peak GB", ".2f"), ("budget", "budget", "s")])
    matrix = [r for r in rows if r.get("granularity") == "matrix"]
    rows = [r for r in rows if r.get("granularity") != "matrix"]
    lagging = [r for r in rows if r.get("writeback_every")]
    if lagging:
        print()
        print_table(lagging, [("shape", "shape", "s"), ("batch", "batch", "s"), ("writeback_every", "K", ""),
                              ("writeback_chosen", "K used", "d"), ("streamed_ms", "streamed ms", ".1f"), ("floor_h2d_ms", "H2D floor ms", ".1f"),
                              ("vs_floor_h2d", "str/H2D floor", ".2f"), ("d2h_gb", "D2H GB (last step)", ".2f")])
    if matrix:
        print()
        print_table(matrix, [("shape", "shape", "s"), ("batch", "batch", "s"), ("writeback_every", "K", "d"),
                             ("spare_slots", "spare", "d"),
                             ("streamed_ms", "matrix ms", ".1f"), ("block_ms", "block ms", ".1f"),
                             ("vs_block", "matrix/block", ".3f"), ("vs_floor_h2d", "matrix/H2D floor", ".2f"),
                             ("peak_gb", "peak GB", ".2f"), ("block_peak_gb", "block peak GB", ".2f"),
                             ("plan_peak_gb", "plan GB", ".2f"), ("wait_ms", "wait ms", ".1f")])
    rows += matrix
    for r in rows:
        if "error" in r:
            print(f"{r['shape']} {r.get('budget') or ''}: {r['error']}")
    write_json(args.out, {"benchmark": "offload", "env": environment(), "layers": args.layers,
                          "loss_chunk_bytes": LOSS_CHUNK_BYTES, "head_points_at_once": 1,
                          "form_chunk_bytes": FORM_CHUNK_BYTES, "rows": rows})


if __name__ == "__main__":
    main()
