"""The ``zo2`` command line: ``zo2 train``, ``zo2 replay`` and ``zo2 plan``.

Every user error is a :class:`~zo2.errors.ZO2Error`: it is printed as one paragraph on stderr and the command
exits with status 2, without a traceback unless ``--debug`` is given.
"""

from __future__ import annotations

import argparse
import os
import sys
from dataclasses import replace
from typing import Sequence

from zo2.errors import ConfigError, ZO2Error

TRAIN_EXAMPLES = """\
examples:
  zo2 train                                   # the default job: tiny-opt on the shipped corpus (~1 min on 2 CPU cores)
  zo2 train --preset tiny-llama --out runs/llama
  zo2 train --preset opt-125m --set model.path=/models/opt-125m --set data.tokenizer=model
  zo2 train --config job.toml --set optim.lr=1e-3 --set train.steps=1000
  zo2 train --resume runs/default --set train.steps=800     # continue a run, bit-exactly
  zo2 train --list-presets
  zo2 train --help-config                     # every config section and key, with defaults
"""

REPLAY_EXAMPLES = """\
examples:
  zo2 replay runs/default --to 200            # weights after 200 steps -> runs/default/replay/step_00000200
  zo2 replay runs/default --out /tmp/final    # weights at the end of the log
  zo2 replay runs/default --to 50 --from-base # ignore snapshots: base weights + the whole log
"""


def _common() -> argparse.ArgumentParser:
    """Flags every subcommand takes."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--debug", action="store_true", help="show the full traceback of errors")
    return common


def build_parser() -> argparse.ArgumentParser:
    """The ``zo2`` argument parser with its subcommands."""
    parser = argparse.ArgumentParser(
        prog="zo2", description="Zeroth-order (MeZO) fine-tuning of Hugging Face causal LMs.",
        epilog="Run `zo2 <command> --help` for a command's options and examples.")
    sub = parser.add_subparsers(dest="command", metavar="command")
    sub.required = True
    _add_train(sub)
    _add_replay(sub)
    _add_plan(sub)
    _add_launch(sub)
    _add_slurm(sub)
    return parser


def _add_train(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "train", parents=[_common()], formatter_class=argparse.RawDescriptionHelpFormatter,
        help="train a model (no arguments: the tiny-opt demo job)", epilog=TRAIN_EXAMPLES,
        description="Train with zeroth-order steps. The job is a preset, a TOML file merged on top, then "
                    "--set overrides; the resolved config is saved in the run folder.")
    p.add_argument("--preset", metavar="NAME", help="start from this preset (default tiny-opt; see --list-presets)")
    p.add_argument("--config", metavar="FILE.toml", help="TOML file merged on top of the preset")
    p.add_argument("--set", metavar="SECTION.KEY=VALUE", action="append", default=[],
                   help="override one config value (TOML literal: 4, 1e-3, true, \"text\"; bare words are "
                        "strings; none unsets); repeatable")
    p.add_argument("--resume", metavar="RUN_DIR", help="continue the run in RUN_DIR from its saved config, latest "
                                                       "snapshot and trajectory log")
    p.add_argument("--overwrite", action="store_true", help="delete an existing run folder and start over")
    p.add_argument("--out", metavar="DIR", help="run folder (same as --set run.out_dir=DIR)")
    p.add_argument("--quiet", action="store_true", help="plain log lines every train.log_every steps instead of a "
                                                        "progress bar")
    p.add_argument("--list-presets", action="store_true", help="list the presets with their parameter counts")
    p.add_argument("--help-config", action="store_true", help="describe every config section and key")
    p.set_defaults(handler=cmd_train)


def _add_replay(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "replay", parents=[_common()], formatter_class=argparse.RawDescriptionHelpFormatter,
        help="rebuild a run's weights at any step from its trajectory log", epilog=REPLAY_EXAMPLES,
        description="Rebuild the weights after STEP steps from the base weights (or the newest snapshot at or "
                    "before STEP) and the trajectory log, bit for bit, and save them with save_pretrained.")
    p.add_argument("run_dir", metavar="RUN_DIR", help="a run folder written by zo2 train")
    p.add_argument("--to", metavar="STEP", type=int, help="steps done (0 = base weights; default: the whole log)")
    p.add_argument("--out", metavar="DIR", help="output folder (default RUN_DIR/replay/step_XXXXXXXX)")
    p.add_argument("--from-base", action="store_true", help="ignore snapshots: replay the log from the base weights")
    p.set_defaults(handler=cmd_replay)


LAUNCH_EXAMPLES = """\
examples:
  zo2 launch --nproc-per-node 2 -- --set parallel.pp=2          # the default job on 2 processes (PertP)
  zo2 launch --nproc-per-node 8 -- --preset opt-13b --set parallel.dp=4 --set parallel.pp=2
  torchrun --nproc-per-node 8 -m zo2 train --set parallel.dp=8  # the same thing through torchrun itself
"""


def _add_launch(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "launch", parents=[_common()], formatter_class=argparse.RawDescriptionHelpFormatter,
        help="run `zo2 train` on N local processes (torchrun --standalone)", epilog=LAUNCH_EXAMPLES,
        description="Start N `zo2 train` processes on this machine with torch's elastic launcher (a local "
                    "rendezvous, one process per GPU or N CPU processes); everything after `--` goes to zo2 "
                    "train. parallel.dp × parallel.pp must equal N.")
    p.add_argument("--nproc-per-node", type=int, required=True, metavar="N", help="processes to start")
    p.add_argument("train_args", nargs=argparse.REMAINDER, help="`--` then the arguments of zo2 train")
    p.set_defaults(handler=cmd_launch)


def cmd_launch(args: argparse.Namespace) -> int:
    """``zo2 launch``: torchrun --standalone --nproc-per-node N -m zo2 train ARGS."""
    if args.nproc_per_node < 1:
        raise ConfigError(f"--nproc-per-node {args.nproc_per_node}: give the number of processes to start (>= 1).")
    from torch.distributed import run as torchrun
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

    train_args = args.train_args[1:] if args.train_args[:1] == ["--"] else args.train_args
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")  # one machine: keep gloo on loopback
    try:
        torchrun.main(["--standalone", f"--nproc-per-node={args.nproc_per_node}", "-m", "zo2", "train",
                       *train_args])
    except ChildFailedError as err:
        failures = "; ".join(f"rank {r}: exit {f.exitcode}" for r, f in err.failures.items())
        print(f"zo2: error: a training process failed ({failures}); its own error is printed above.",
              file=sys.stderr)
        return 1
    return 0


SLURM_EXAMPLES = """\
examples:
  zo2 slurm deploy/configs/opt66b-1node-8gpu-2d.toml --nodes 1 --gpus-per-node 8 --dry-run   # print the script
  zo2 slurm deploy/configs/opt175b-4node.toml --nodes 4 --gpus-per-node 8 --partition gpu --time 48:00:00
  zo2 slurm job.toml --nodes 2 --gpus-per-node 8 --set parallel.dp=8 --set parallel.pp=2 --out-script job.sbatch
"""


def _add_slurm(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "slurm", parents=[_common()], formatter_class=argparse.RawDescriptionHelpFormatter,
        help="write an sbatch script for a multi-node zo2 train job and submit it", epilog=SLURM_EXAMPLES,
        description="Check the job (the config loads, parallel.dp × parallel.pp = nodes × GPUs per node), render "
                    "deploy/slurm/zo2.sbatch.template (one srun task per node running torchrun with a c10d "
                    "rendezvous on the first node; requeue on preemption and continue with --resume), write it "
                    "(default RUN_DIR.slurm/zo2.sbatch, beside the run folder, with the logs) and submit it with "
                    "sbatch. See deploy/OPERATIONS.md.")
    p.add_argument("config", metavar="CONFIG.toml", help="the job's TOML config (as for zo2 train --config)")
    p.add_argument("--nodes", type=int, required=True, metavar="N", help="nodes to allocate")
    p.add_argument("--gpus-per-node", type=int, required=True, metavar="G", help="GPUs per node (one process each)")
    p.add_argument("--partition", metavar="P", help="SLURM partition (default: the cluster's)")
    p.add_argument("--account", metavar="A", help="SLURM account (default: the user's)")
    p.add_argument("--time", default="24:00:00", metavar="HH:MM:SS", help="time limit of each run of the job "
                                                                            "(default 24:00:00; it requeues)")
    p.add_argument("--job-name", metavar="NAME", help="job name (default zo2-<run folder name>)")
    p.add_argument("--cpus-per-task", type=int, metavar="C", help="CPUs of each node's task (default 8 per GPU)")
    p.add_argument("--mem", default="0", metavar="MEM", help="host memory per node, e.g. 500G (default 0: all "
                                                             "of it; see deploy/OPERATIONS.md for what a model needs)")
    p.add_argument("--set", metavar="SECTION.KEY=VALUE", action="append", default=[],
                   help="override one config value, passed on to zo2 train; repeatable")
    p.add_argument("--out-script", metavar="FILE", help="where to write the script (its folder also gets the "
                                                        "SLURM logs)")
    p.add_argument("--dry-run", action="store_true", help="print the script and submit nothing")
    p.set_defaults(handler=cmd_slurm)


def cmd_slurm(args: argparse.Namespace) -> int:
    """``zo2 slurm``: check the job, render its sbatch script, then print it or write and submit it."""
    from zo2_launcher.slurm import SlurmOptions, run_slurm

    opts = SlurmOptions(nodes=args.nodes, gpus_per_node=args.gpus_per_node, partition=args.partition,
                        account=args.account, time=args.time, job_name=args.job_name,
                        cpus_per_task=args.cpus_per_task, mem=args.mem)
    return run_slurm(args.config, args.set, opts, out_script=args.out_script, dry_run=args.dry_run)


def cmd_train(args: argparse.Namespace) -> int:
    """``zo2 train``."""
    from zo2.config.loader import describe_config, load_config
    from zo2.config.presets import list_presets

    if args.list_presets:
        print(list_presets())
        return 0
    if args.help_config:
        print(describe_config())
        return 0
    from zo2.train.trainer import load_resume_config, train_job

    if args.resume:
        if args.preset or args.config or args.out:
            raise ConfigError("--resume continues a run from the config saved in its folder, so --preset, --config "
                              "and --out do not apply. Drop them; --set may still change e.g. train.steps.")
        job = load_resume_config(args.resume, args.set)
    else:
        job = load_config(args.preset, args.config, args.set)
        if args.out:
            job.run = replace(job.run, out_dir=args.out)
    train_job(job, resume=bool(args.resume), overwrite=args.overwrite, quiet=args.quiet)
    return 0


def cmd_replay(args: argparse.Namespace) -> int:
    """``zo2 replay``."""
    from zo2.train.trainer import replay_run

    out = replay_run(args.run_dir, args.to, args.out, from_base=args.from_base)
    print(f"zo2: wrote the replayed weights to {out}")
    return 0


PLAN_EXAMPLES = """\
examples:
  zo2 plan --preset opt-175b                                  # single-GPU ZO2 at 1 x 2048 tokens, H100 rates
  zo2 plan --preset opt-175b --gpus-per-node 8 --nodes 2 --tokens 32768 --seq 1024
  zo2 plan --preset opt-66b --gpus-per-node 8 --tokens 16384 --seq 512 --set rate.nvlink_gbs=300
  zo2 plan --hidden 8192 --ffn 28672 --layers 80 --vocab 32000 --family llama --heads 64
  zo2 plan --preset opt-175b --calibrate benchmarks/results/2026-11-26-h200/offload.json
  zo2 plan --scaling --out plan.json                          # OPT-13B..175B x {2,4,8} GPUs x {1..4} nodes
"""


def _add_plan(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "plan", parents=[_common()], formatter_class=argparse.RawDescriptionHelpFormatter,
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
    p.add_argument("--gpus-per-node", type=int, default=1, metavar="N", help="GPUs per node, 1..8 (default 1)")
    p.add_argument("--nodes", type=int, default=1, metavar="M", help="nodes (default 1)")
    p.add_argument("--calibrate", metavar="FILE.json", help="fit rates to a benchmarks/offload.py JSON (and the "
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

    from zo2.parallel import plan

    rates = plan.calibrate(args.calibrate) if args.calibrate else plan.Rates()
    rates = rates.updated(args.set)
    common = dict(dtype=args.dtype, compute_dtype=args.compute_dtype, direction=args.direction,
                  prefetch=args.prefetch, offload=args.offload)
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


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``zo2`` console script; returns the exit status."""
    args = build_parser().parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # zo2 never downloads: models and tokenizers are local folders
    try:
        return args.handler(args)
    except ZO2Error as exc:
        if args.debug:
            raise
        print(f"zo2: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        if args.debug:
            raise
        print("zo2: interrupted. Every finished step is in the trajectory log; continue with "
              "`zo2 train --resume RUN_DIR`.", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
