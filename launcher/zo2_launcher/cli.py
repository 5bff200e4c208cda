"""The ``zo2`` command line: the parser, ``main``, and ``zo2 train``, ``replay``, ``eval``, ``slurm`` and
``completion``; ``zo2 launch`` is in :mod:`zo2_launcher.launch`, ``zo2 plan`` in :mod:`zo2_launcher.plan`, what
several commands share in :mod:`zo2_launcher.common`.

Every user error is a :class:`~zo2.errors.ZO2Error`: it is printed as one paragraph on stderr and the command
exits with status 2, without a traceback unless ``--debug`` is given.

Nothing heavy is imported before the arguments are parsed (``import zo2`` brings torch and transformers, seconds):
``zo2 --help`` and ``zo2 <command> --help`` answer at once, and each command imports what it runs.
"""

from __future__ import annotations

import argparse
import os
import sys
from dataclasses import replace
from typing import Sequence

from zo2_launcher.common import common_flags, resumed_job
from zo2_launcher.launch import add_launch
from zo2_launcher.plan import add_plan

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


def build_parser() -> argparse.ArgumentParser:
    """The ``zo2`` argument parser with its subcommands."""
    parser = argparse.ArgumentParser(
        prog="zo2", description="Zeroth-order (MeZO) fine-tuning of Hugging Face causal LMs.",
        epilog="Run `zo2 <command> --help` for a command's options and examples.")
    sub = parser.add_subparsers(dest="command", metavar="command")
    sub.required = True
    _add_train(sub)
    _add_replay(sub)
    add_plan(sub)
    _add_eval(sub)
    _add_completion(sub)
    add_launch(sub)
    _add_slurm(sub)
    return parser


def _add_train(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "train", parents=[common_flags()], formatter_class=argparse.RawDescriptionHelpFormatter,
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
    p.add_argument("--resume-from-step", type=int, metavar="S",
                   help="with --resume: continue from the weights after step S (e.g. before an update that blew "
                        "them up); the log's later lines and newer snapshots are set aside in "
                        "RUN_DIR/after-step-S/, nothing is deleted")
    p.add_argument("--overwrite", action="store_true", help="delete an existing run folder and start over")
    p.add_argument("--out", metavar="DIR", help="run folder (same as --set run.out_dir=DIR)")
    p.add_argument("--quiet", action="store_true", help="plain log lines every train.log_every steps instead of a "
                                                        "progress bar")
    p.add_argument("--list-presets", action="store_true", help="list the presets with their parameter counts")
    p.add_argument("--help-config", action="store_true", help="describe every config section and key")
    p.set_defaults(handler=cmd_train)


def _add_replay(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "replay", parents=[common_flags()], formatter_class=argparse.RawDescriptionHelpFormatter,
        help="rebuild a run's weights at any step from its trajectory log", epilog=REPLAY_EXAMPLES,
        description="Rebuild the weights after STEP steps from the base weights (or the newest snapshot at or "
                    "before STEP) and the trajectory log, bit for bit, and save them with save_pretrained.")
    p.add_argument("run_dir", metavar="RUN_DIR", help="a run folder written by zo2 train")
    p.add_argument("--to", metavar="STEP", type=int, help="steps done (0 = base weights; default: the whole log)")
    p.add_argument("--out", metavar="DIR", help="output folder (default RUN_DIR/replay/step_XXXXXXXX)")
    p.add_argument("--from-base", action="store_true", help="ignore snapshots: replay the log from the base weights")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(handler=cmd_replay)


SLURM_EXAMPLES = """\
examples:
  zo2 slurm deploy/configs/opt66b-1node-8gpu-2d.toml --nodes 1 --gpus-per-node 8 --dry-run   # print the script
  zo2 slurm deploy/configs/opt175b-4node.toml --nodes 4 --gpus-per-node 8 --partition gpu --time 48:00:00
  zo2 slurm job.toml --nodes 2 --gpus-per-node 8 --set parallel.dp=8 --set parallel.pp=2 --out-script job.sbatch
"""


def _add_slurm(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "slurm", parents=[common_flags()], formatter_class=argparse.RawDescriptionHelpFormatter,
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
    from zo2.errors import ConfigError

    if args.list_presets:
        print(list_presets())
        return 0
    if args.help_config:
        print(describe_config())
        return 0
    from zo2.train.build import set_cpu_threads
    from zo2.train.trainer import train_job

    if args.resume and (args.preset or args.config or args.out):
        raise ConfigError("--resume continues a run from the config saved in its folder, so --preset, --config "
                          "and --out do not apply. Drop them; --set may still change e.g. train.steps.")
    job = resumed_job(args.resume, args.set, args.resume_from_step)
    if job is None:
        job = load_config(args.preset, args.config, args.set)
        if args.out:
            job.run = replace(job.run, out_dir=args.out)
    args.run_dir_hint = job.run.out_dir
    set_cpu_threads(job)  # tiny models: one thread (OMP_NUM_THREADS, when set, decides)
    train_job(job, resume=bool(args.resume), overwrite=args.overwrite, quiet=args.quiet)
    return 0


EVAL_EXAMPLES = """\
examples:
  zo2 eval runs/default                                # held-out loss of the newest snapshot
  zo2 eval runs/default --step 200                     # ... of the weights after step 200 (snapshot + log)
  zo2 eval runs/opt13b --task SST2 --task-path data/SST-2 --num-eval 1000
  zo2 eval /models/opt-1.3b --task SQuAD --task-eval-path data/squad/validation.jsonl
"""


def _add_eval(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "eval", parents=[common_flags()], formatter_class=argparse.RawDescriptionHelpFormatter,
        help="evaluate a run's weights or a model folder (held-out loss, or a MeZO task's accuracy/F1)",
        epilog=EVAL_EXAMPLES,
        description="Evaluate TARGET — a zo2 run folder (its newest good snapshot) or a Hugging Face model "
                    "folder — on the run's held-out batches, or on a MeZO task (SST2, RTE, CB, BoolQ, WSC, WIC, "
                    "MultiRC, Copa, ReCoRD, SQuAD, DROP; see zo2/tasks/README.md). The model streams through the "
                    "GPU as in training. Prints one line per metric and a JSON line.")
    p.add_argument("target", metavar="TARGET", help="run folder or model folder")
    p.add_argument("--task", metavar="NAME", help="a MeZO task instead of the held-out loss")
    p.add_argument("--task-path", metavar="PATH", help="the task's folder (train/validation files)")
    p.add_argument("--task-eval-path", metavar="FILE", help="the evaluation split's file, if separate")
    p.add_argument("--num-eval", type=int, metavar="N", help="evaluate N sampled examples (default 1000)")
    p.add_argument("--step", type=int, metavar="S", help="run folder: the weights after S steps (its snapshot, or "
                                                         "the newest one before it and the log replayed to S)")
    p.add_argument("--set", metavar="SECTION.KEY=VALUE", action="append", default=[],
                   help="override a config value (e.g. optim.offload=true, train.device=cuda); repeatable")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(handler=cmd_eval)


def cmd_eval(args: argparse.Namespace) -> int:
    """``zo2 eval``."""
    import json

    from zo2.train.evaluation import evaluate_run

    result = evaluate_run(args.target, task=args.task, task_path=args.task_path, task_eval_path=args.task_eval_path,
                          num_eval=args.num_eval, step=args.step, overrides=args.set, progress=not args.quiet)
    for key, value in result.items():
        if isinstance(value, float):
            print(f"{key}: {value:.4f}")
    print(json.dumps(result))
    return 0


def _add_completion(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("completion", help="print a shell completion script: zo2 completion bash",
                       description="Print a bash completion script for zo2 (commands and their options). Enable it "
                                   "with: eval \"$(zo2 completion bash)\" (e.g. in ~/.bashrc).")
    p.add_argument("shell", choices=["bash"], help="the shell (bash)")
    p.set_defaults(handler=cmd_completion)


def cmd_completion(args: argparse.Namespace) -> int:
    """``zo2 completion bash``: complete commands, their long options and file names."""
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    cases = []
    for name, p in sub.choices.items():
        flags = sorted(o for a in p._actions for o in a.option_strings if o.startswith("--"))
        cases.append(f'    {name}) opts="{" ".join(flags)}" ;;')
    print("_zo2() {\n"
          '  local cur="${COMP_WORDS[COMP_CWORD]}" cmd="${COMP_WORDS[1]}" opts\n'
          "  if [[ $COMP_CWORD -eq 1 ]]; then\n"
          f'    COMPREPLY=($(compgen -W "{" ".join(sub.choices)}" -- "$cur")); return\n'
          "  fi\n"
          '  case "$cmd" in\n' + "\n".join(cases) + "\n  esac\n"
          '  if [[ "$cur" == -* ]]; then COMPREPLY=($(compgen -W "$opts" -- "$cur"));\n'
          '  else COMPREPLY=($(compgen -f -- "$cur")); fi\n'
          "}\ncomplete -o filenames -F _zo2 zo2")
    return 0


def cmd_replay(args: argparse.Namespace) -> int:
    """``zo2 replay``."""
    from zo2.train.replay import replay_run

    out = replay_run(args.run_dir, args.to, args.out, from_base=args.from_base, progress=not args.quiet)
    print(f"zo2: wrote the replayed weights to {out}")
    return 0


def _interrupt_advice(args: argparse.Namespace) -> str:
    """What to do after Ctrl-C, naming the real run folder."""
    run_dir = getattr(args, "run_dir_hint", None)
    if args.command == "train" and run_dir:
        return (f"Every finished step is in the trajectory log; continue with `zo2 train --resume {run_dir}`.")
    if args.command == "launch":
        return "The run stops at a step boundary; run the same command again to continue it."
    if args.command == "replay":
        return "Nothing was written; run the command again."
    return "Nothing of a run was lost."


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``zo2`` console script; returns the exit status."""
    args = build_parser().parse_args(argv)  # --help and usage errors end here, before zo2 (torch) is imported
    from zo2.errors import ZO2Error

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
        print(f"zo2: interrupted. {_interrupt_advice(args)}", file=sys.stderr)
        return 130
    except OSError as exc:  # the disk or the file system refused (full, read-only, gone): one line, no traceback
        if args.debug:
            raise
        where = f" ({exc.filename})" if exc.filename else ""
        print(f"zo2: error: {exc.strerror or exc}{where}. Everything written before it is intact; fix the cause "
              "and run the command again (--debug shows the traceback).", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
