"""The ``zo2`` command line: ``zo2 train`` and ``zo2 replay``.

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
