"""Where the host time of one engine step goes: cProfile over a few steps of an OPT shape, with the device time
of the same steps beside it (CUDA events), so Python and launch overhead shows against the GPU's work.

Builds the shape with a few random-weight layers (``bench_offload.py``'s model), runs two warm-up steps, then
profiles ``--steps`` steps and prints the functions with the most own time, the step's wall time and its device
time. On a CPU the device time is left out.

    python benchmarks/profile_step.py --shape opt-6.7b --layers 4 --batch 1x2048 --offload false
    python benchmarks/profile_step.py --shape opt-1.3b --offload true --top 30
"""

from __future__ import annotations

import argparse
import cProfile
import io
import os
import pstats
import sys
import time

sys.path.insert(0, os.path.dirname(__file__))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from bench_common import opt_config, write_json  # noqa: E402
from zo2 import ZOConfig, ZOEngine  # noqa: E402
from zo2.offload.loading import empty_model, init_random  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", default="opt-1.3b")
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--batch", default="1x2048")
    parser.add_argument("--offload", choices=["true", "false"], default="false")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--top", type=int, default=25)
    parser.add_argument("--out", default="benchmarks/out/profile_step.json")
    args = parser.parse_args(argv)

    cuda = torch.cuda.is_available()
    device = "cuda" if cuda else "cpu"
    dtype = torch.bfloat16 if cuda else torch.float32
    engine = ZOEngine(empty_model(opt_config(args.shape, args.layers), dtype),
                      ZOConfig(lr=1e-7, eps=1e-3, offload=args.offload == "true", device=device))
    init_random(engine, seed=0)
    b, s = (int(x) for x in args.batch.split("x"))
    ids = torch.randint(3, engine.model.config.vocab_size, (b, s))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}
    for _ in range(2):
        engine.step(batch)
    if cuda:
        torch.cuda.synchronize()
        start_ev, end_ev = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start_ev.record()
    profiler = cProfile.Profile()
    start = time.perf_counter()
    profiler.enable()
    for _ in range(args.steps):
        engine.step(batch)
    profiler.disable()
    host_s = (time.perf_counter() - start) / args.steps
    device_s = None
    if cuda:
        end_ev.record()
        end_ev.synchronize()
        device_s = start_ev.elapsed_time(end_ev) / 1e3 / args.steps
    text = io.StringIO()
    stats = pstats.Stats(profiler, stream=text).sort_stats("tottime")
    stats.print_stats(args.top)
    print(text.getvalue())
    print(f"{args.shape} x{args.layers} {args.batch} offload={args.offload}: wall {host_s * 1e3:.1f} ms/step"
          + (f", device {device_s * 1e3:.1f} ms/step" if device_s is not None else ""))
    rows = [{"function": f"{k[0]}:{k[1]}({k[2]})", "calls": v[1], "tottime_s": v[2] / args.steps,
             "cumtime_s": v[3] / args.steps}
            for k, v in sorted(stats.stats.items(), key=lambda kv: -kv[1][2])[: args.top]]
    write_json(args.out, {"args": vars(args), "wall_ms": host_s * 1e3,
                          "device_ms": None if device_s is None else device_s * 1e3, "rows": rows})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
