"""``zo2 launch``: this node's scheduler and its workers (``zo2.control``), or with ``--torchrun`` plain
torchrun running ``zo2 train``. Nothing heavy is imported before the command runs."""

from __future__ import annotations

import argparse
import os
import sys
from dataclasses import replace

from zo2_launcher.common import common_flags, resumed_job

LAUNCH_EXAMPLES = """\
examples:
  zo2 launch --nproc-per-node 2 -- --set parallel.pp=2          # the default job: a scheduler + 2 CPU/GPU workers (PertP)
  zo2 launch --nproc-per-node 8 -- --preset opt-13b --set parallel.dp=4 --set parallel.pp=2 --out runs/13b
  zo2 launch --nproc-per-node 1 -- --config deploy/configs/opt175b-1gpu.toml   # run it again after a stop: it resumes
  kill -USR1 <scheduler pid>                                    # a snapshot at the next step boundary
  zo2 launch --nnodes 4 --node-rank $SLURM_NODEID --master-addr $HEAD --nproc-per-node 8 -- --config job.toml
  zo2 launch --torchrun --nproc-per-node 8 -- --set parallel.dp=8   # plain torchrun, no scheduler
"""


def add_launch(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "launch", parents=[common_flags()], formatter_class=argparse.RawDescriptionHelpFormatter,
        help="run a job on N local workers under a scheduler (multi-GPU; fault tolerant)", epilog=LAUNCH_EXAMPLES,
        description="Start this node's scheduler (zo2.control): it creates the parameter store in shared memory, "
                    "fills it once, starts N workers (one per GPU, or N CPU processes) and supervises them: a "
                    "killed or hung worker is replaced and the run continues from the last completed step; "
                    "Ctrl-C/SIGTERM stops at a step boundary with a snapshot, and running the same command again "
                    "resumes. Everything after `--` is the job, as for zo2 train (--preset, --config, --set, "
                    "--out, --resume, --resume-from-step, --overwrite, --quiet). parallel.dp × parallel.pp must equal nodes × N.")
    p.add_argument("--nproc-per-node", required=True, metavar="N",
                   help="workers to start on this node: a number, or 'auto' (one per visible GPU; 1 without CUDA)")
    p.add_argument("--nnodes", type=int, default=1, metavar="M", help="nodes of the job (default 1)")
    p.add_argument("--node-rank", type=int, default=0, metavar="R", help="this node's index, 0..M-1 (default 0)")
    p.add_argument("--master-addr", default="127.0.0.1", metavar="HOST",
                   help="host of node 0, where the workers' torch.distributed store listens (default 127.0.0.1)")
    p.add_argument("--master-port", type=int, metavar="PORT",
                   help="port of that store (default: a free port on a single node; 29500 on several)")
    p.add_argument("--torchrun", action="store_true",
                   help="start N `zo2 train` processes with torchrun --standalone instead (no scheduler)")
    p.add_argument("train_args", nargs=argparse.REMAINDER, help="`--` then the arguments of zo2 train")
    p.set_defaults(handler=cmd_launch)


def _nproc(value: str) -> int:
    """``--nproc-per-node``: a positive number, or 'auto' = the visible GPUs (1 on a machine without CUDA)."""
    from zo2.errors import ConfigError

    if value == "auto":
        import torch

        return max(torch.cuda.device_count(), 1)
    try:
        n = int(value)
    except ValueError:
        n = 0
    if n < 1:
        raise ConfigError(f"--nproc-per-node {value}: give the number of processes to start (>= 1), or 'auto' for "
                          "one per visible GPU.")
    return n



def _launch_job(train_args: list[str]):
    """(job, resume, overwrite, quiet) from zo2 train's arguments; a folder that holds a run resumes it."""
    from pathlib import Path

    from zo2.config.loader import load_config, load_saved_config
    from zo2.errors import ConfigError
    from zo2.train.run_dir import CONFIG_FILE, holds_steps

    parser = argparse.ArgumentParser(prog="zo2 launch ... --", add_help=False)
    for flag in ("--preset", "--config", "--out", "--resume"):
        parser.add_argument(flag)
    parser.add_argument("--resume-from-step", type=int)
    parser.add_argument("--set", action="append", default=[])
    parser.add_argument("--overwrite", action="store_true")
    parser.add_argument("--quiet", action="store_true")
    args, unknown = parser.parse_known_args(train_args)
    if unknown:
        raise ConfigError(f"zo2 launch passes {' '.join(unknown)!r} to the job, but the job takes only --preset, "
                          "--config, --set, --out, --resume, --resume-from-step, --overwrite and --quiet.")
    job = resumed_job(args.resume, args.set, args.resume_from_step)
    if job is not None:
        return job, True, False, args.quiet
    job = load_config(args.preset, args.config, args.set)
    if args.out:
        job.run = replace(job.run, out_dir=args.out)
    run_dir = Path(job.run.out_dir)
    if (run_dir / CONFIG_FILE).is_file() and not args.overwrite and holds_steps(run_dir):  # again: continue
        _check_same_run(job, load_saved_config(run_dir / CONFIG_FILE), run_dir)
        return job, True, False, args.quiet
    return job, False, args.overwrite, args.quiet


def _check_same_run(job, saved, run_dir) -> None:
    """Refuse to continue a run folder with settings its steps depend on changed (model, data, ...)."""
    from zo2.config.loader import job_to_dict
    from zo2.errors import ConfigError
    from zo2.train.run_dir import RESUME_LOCKED

    new, old = job_to_dict(job), job_to_dict(saved)
    changed = [f"{section}.{key}" for section, values in new.items() if isinstance(values, dict)
               for key, value in values.items() if old.get(section, {}).get(key) != value
               and any(f"{section}.{key}".startswith(locked) for locked in RESUME_LOCKED)]
    if changed:
        raise ConfigError(f"{run_dir} holds a run with different {', '.join(changed)}; its steps depend on them, so "
                          "it cannot continue with this job. Use the same settings to resume it, --overwrite to "
                          "start over, or --out to write elsewhere.")


def cmd_launch(args: argparse.Namespace) -> int:
    """``zo2 launch``: this node's scheduler and its workers (or, with --torchrun, torchrun itself)."""
    from zo2.errors import ConfigError

    args.nproc_per_node = _nproc(args.nproc_per_node)
    if not 0 <= args.node_rank < args.nnodes:
        raise ConfigError(f"--node-rank {args.node_rank} must be in 0..{args.nnodes - 1} (--nnodes {args.nnodes}).")
    train_args = args.train_args[1:] if args.train_args[:1] == ["--"] else args.train_args
    if args.torchrun:
        return _torchrun(args.nproc_per_node, train_args)
    from zo2.control.scheduler import Scheduler
    from zo2.control.spawn import NodePlace

    job, resume, overwrite, quiet = _launch_job(train_args)
    port = args.master_port or (29500 if args.nnodes > 1 else None)
    place = NodePlace(args.nnodes, args.node_rank, args.master_addr, port)
    return Scheduler(job, workers=args.nproc_per_node, resume=resume, overwrite=overwrite, quiet=quiet,
                     place=place).run()


def _torchrun(nproc: int, train_args: list[str]) -> int:
    """torchrun --standalone --nproc-per-node N -m zo2 train ARGS."""
    from torch.distributed import run as torchrun
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")  # one machine: keep gloo on loopback
    try:
        torchrun.main(["--standalone", f"--nproc-per-node={nproc}", "-m", "zo2", "train", *train_args])
    except ChildFailedError as err:
        failures = "; ".join(f"rank {r}: exit {f.exitcode}" for r, f in err.failures.items())
        print(f"zo2: error: a training process failed ({failures}); its own error is printed above.",
              file=sys.stderr)
        return 1
    return 0
