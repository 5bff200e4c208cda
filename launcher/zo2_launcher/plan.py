"""``zo2 plan``: predicted step time and memory of every layout of a model on N GPUs per node × M nodes
(:mod:`zo2.parallel.plan`); no GPU needed."""

from __future__ import annotations

import argparse

from zo2_launcher.common import common_flags

PLAN_EXAMPLES = """\
examples:
  zo2 plan --preset opt-175b                                  # single-GPU ZO2 at 1 x 2048 tokens, H100 rates
  zo2 plan --preset opt-175b --gpus-per-node 8 --nodes 2 --tokens 32768 --seq 1024
  zo2 plan --preset opt-66b --gpus-per-node 8 --tokens 16384 --seq 512 --set rate.nvlink_gbs=300
  zo2 plan --hidden 8192 --ffn 28672 --layers 80 --vocab 32000 --family llama --heads 64
  zo2 plan --preset opt-175b --granularity matrix --host-budget 100 --nvme --writeback-every 8
                                                              # 175B on one GPU, 100 GB of host RAM, NVMe
  zo2 plan --preset opt-175b --calibrate benchmarks/results/2026-11-26-h200/offload.json
  zo2 plan --scaling --out plan.json                          # OPT-13B..175B x {2,4,8} GPUs x {1..4} nodes
"""


def add_plan(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "plan", parents=[common_flags()], formatter_class=argparse.RawDescriptionHelpFormatter,
        help="predict step time and memory of ZO2, PertP, ZO-DDP and 2D layouts (no GPU needed)",
        epilog=PLAN_EXAMPLES,
        description="Predict the step time (with its compute / PCIe / NVLink / host-memory / network breakdown), "
                    "throughput, speed-up over single-GPU ZO2 and peak GPU and host memory of every layout of "
                    "N GPUs per node x M nodes, with and without sliced transfers (zo2.parallel.plan). "
                    "Rates default to one H100 (DESIGN.md section 7); --calibrate fits them to a benchmark JSON.")
    p.add_argument("--preset", metavar="NAME", help="model shape of this preset (e.g. opt-175b; default opt-175b "
                                                     "unless --hidden etc. are given)")
    p.add_argument("--hidden", type=int, metavar="H", help="explicit shape: hidden size")
    p.add_argument("--ffn", type=int, metavar="F", help="explicit shape: FFN size (default 4 x hidden)")
    p.add_argument("--layers", type=int, metavar="L", help="number of blocks (also overrides a preset's depth)")
    p.add_argument("--vocab", type=int, metavar="V", help="explicit shape: vocabulary size (default 50272)")
    p.add_argument("--heads", type=int, metavar="N", help="explicit shape: attention heads (default hidden/128)")
    p.add_argument("--family", default="opt", metavar="NAME", help="explicit shape: opt, llama, qwen3 or gpt2")
    p.add_argument("--tokens", type=int, metavar="T", help="global tokens per step, batch x seq (default 2048; "
                                                           "--scaling: 96 x 256)")
    p.add_argument("--seq", type=int, metavar="S", help="sequence length (default min(tokens, 2048); --scaling: 256)")
    p.add_argument("--dtype", default="bf16", metavar="DTYPE", help="storage dtype: bf16, fp16 or fp32")
    p.add_argument("--compute-dtype", default="bf16", metavar="DTYPE", help="compute dtype: bf16 or fp16")
    p.add_argument("--direction", default="gaussian", metavar="KIND", help="gaussian or rademacher")
    p.add_argument("--prefetch", type=int, default=1, metavar="K", help="blocks uploaded ahead (default 1)")
    p.add_argument("--offload", default="auto", metavar="MODE", help="auto (the planner decides), stream or resident")
    p.add_argument("--granularity", default="block", metavar="G",
                   help="what one upload moves: block (default) or matrix (optim.stream_granularity)")
    p.add_argument("--host-budget", type=float, metavar="GB",
                   help="pinned host memory per node for the streamed blocks (offload.host_memory_budget; default "
                        "rate.host_capacity_gb)")
    p.add_argument("--nvme", action="store_true",
                   help="home the blocks beyond --host-budget on the node's NVMe drive (offload.nvme_path); "
                        "rates rate.nvme_read_gbs / rate.nvme_write_gbs")
    p.add_argument("--writeback-every", type=int, default=1, metavar="K",
                   help="streamed blocks written back every K steps (optim.writeback_every; default 1)")
    p.add_argument("--optimizer", default="zo-sgd", metavar="NAME",
                   help="optim.optimizer: zo-sgd (default), zo-sgd-sign, zo-sgd-conservative, or a stateful one whose "
                        "state sits and moves with the weights: zo-sgd-momentum (4 bytes per weight), zo-adam (8)")
    p.add_argument("--gpus-per-node", type=int, default=1, metavar="N", help="GPUs per node, 1..8 (default 1)")
    p.add_argument("--nodes", type=int, default=1, metavar="M", help="nodes (default 1)")
    p.add_argument("--calibrate", metavar="FILE.json", help="fit rates to a benchmarks/bench_offload.py JSON (and the "
                                                            "kernels.json beside it)")
    p.add_argument("--set", metavar="rate.KEY=VALUE", action="append", default=[],
                   help="override one rate, e.g. rate.nvlink_gbs=300 or rate.host_mem_gbs=inf; repeatable")
    p.add_argument("--scaling", action="store_true", help="print the scaling table: OPT-13B/30B/66B/175B x "
                                                          "{2,4,8} GPUs per node x {1..4} nodes")
    p.add_argument("--out", metavar="FILE.json", help="also write the predictions as JSON")
    p.set_defaults(handler=cmd_plan)


def cmd_plan(args: argparse.Namespace) -> int:
    """``zo2 plan``."""
    import json
    from pathlib import Path

    from zo2.errors import ConfigError
    from zo2.parallel import plan

    rates = plan.calibrate(args.calibrate) if args.calibrate else plan.Rates()
    rates = rates.updated(args.set)
    common = dict(dtype=args.dtype, compute_dtype=args.compute_dtype, direction=args.direction,
                  prefetch=args.prefetch, offload=args.offload, granularity=args.granularity,
                  host_budget_gb=args.host_budget, nvme=args.nvme, writeback_every=args.writeback_every,
                  optimizer=args.optimizer)
    if args.scaling:
        tokens = args.tokens or plan.SCALING_BATCH * plan.SCALING_SEQ
        seq = args.seq or (plan.SCALING_SEQ if args.tokens is None else min(args.tokens, 2048))
        rows = plan.scaling_table(tokens=tokens, seq=seq, rates=rates, **common)
        print(plan.format_scaling(rows, rates, tokens, seq))
        payload = {"scaling": rows, "tokens": tokens, "seq": seq, "rates": vars(rates),
                   "published": plan.PUBLISHED_DISTZO2, "assumptions": plan.FOOTER}
    else:
        if args.hidden is not None:
            if args.preset:
                raise ConfigError("--preset and --hidden both give the model shape; use one of them.")
            if args.layers is None:
                raise ConfigError("--hidden gives an explicit shape, which needs --layers too (e.g. --layers 96).")
            model = plan.shape_from_dims(args.hidden, args.ffn or 4 * args.hidden, args.layers,
                                         args.vocab or 50272, args.heads, args.family)
        else:
            model = plan.shape_from_preset(args.preset or "opt-175b", args.layers)
        report = plan.predict(model, tokens=args.tokens or 2048, seq=args.seq, gpus_per_node=args.gpus_per_node,
                              nodes=args.nodes, rates=rates, **common)
        print(plan.format_report(report))
        payload = report.to_dict()
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(payload, indent=2))
        print(f"zo2: wrote {args.out}")
    return 0
