"""What several ``zo2`` commands share: the flags every subcommand takes, and ``--resume`` handling (zo2 train
and zo2 launch continue a run the same way)."""

from __future__ import annotations

import argparse
import sys


def common_flags() -> argparse.ArgumentParser:
    """Flags every subcommand takes."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--debug", action="store_true", help="show the full traceback of errors")
    return common


def resumed_job(run_dir: str | None, sets: list[str], from_step: int | None):
    """``--resume RUN_DIR`` (and ``--resume-from-step S``, which first cuts the run back to step S): the saved job
    with ``sets`` applied, or None without --resume. Shared by zo2 train and zo2 launch."""
    from zo2.errors import ConfigError
    from zo2.train.run_dir import cut_run, load_resume_config

    if run_dir is None:
        if from_step is not None:
            raise ConfigError("--resume-from-step S continues a run from an earlier step: give the run folder with "
                              "--resume RUN_DIR too.")
        return None
    job = load_resume_config(run_dir, sets)
    if from_step is not None:
        note = cut_run(run_dir, from_step)
        if note:
            print(note, file=sys.stderr)
    return job
