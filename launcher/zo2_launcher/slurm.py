"""``zo2 slurm``: render an sbatch script for a zo2 training job and submit it.

The job is checked before it is queued (the config loads with its overrides, ``parallel.dp × parallel.pp`` equals
nodes × GPUs per node, the global batch splits over the data-parallel ranks, the run folder is usable), so a
mistake costs seconds, not a place in the queue. The script comes from ``deploy/slurm/zo2.sbatch.template``
(:class:`string.Template`, ``${name}`` placeholders, ``$$`` for a literal ``$``): one ``srun`` task per node runs
the node's scheduler (``zo2 launch``), whose workers meet at a c10d store on the first node; on SIGTERM (preemption, or 120 s before the time limit) it
stops the training and requeues itself, and a requeued job continues with ``zo2 train --resume RUN_DIR`` when the
run folder holds a trajectory log.

The script and the SLURM logs go to a folder beside the run folder (``RUN_DIR.slurm/`` by default), not into it:
``zo2 train`` refuses to start a new run in a folder that is not empty, and SLURM opens its log files before the
script runs.
"""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from string import Template
from typing import Sequence

from zo2.config.job import JobConfig
from zo2.errors import ConfigError, ZO2Error

TEMPLATE_PATH = Path(__file__).resolve().parent / "zo2.sbatch.template"
"""The sbatch template, package data of zo2_launcher: in a checkout a link to ``deploy/slurm/zo2.sbatch.template``
(the file to edit), in an installed wheel a copy of it."""
RDZV_PORT = 29500
"""TCP port of the workers' c10d store on the job's first node (torchrun's default)."""
CPUS_PER_GPU = 8
"""Default CPUs per GPU when --cpus-per-task is not given."""
SCRIPT_NAME = "zo2.sbatch"

_TIME = re.compile(r"^\d+(-\d+)?(:\d+){0,2}$")
_MEM = re.compile(r"^\d+[KMGT]?$", re.IGNORECASE)
_WORD = re.compile(r"^[A-Za-z0-9_.,:+%@=/-]+$")
_TRAJECTORY = "trajectory.jsonl"
_SAVED_CONFIG = "config.toml"


@dataclass(frozen=True)
class SlurmOptions:
    """The allocation: what ends up on the ``#SBATCH`` lines."""

    nodes: int
    gpus_per_node: int
    partition: str | None = None
    account: str | None = None
    time: str = "24:00:00"
    job_name: str | None = None
    cpus_per_task: int | None = None
    mem: str = "0"

    @property
    def world_size(self) -> int:
        """Processes of the job: one per GPU."""
        return self.nodes * self.gpus_per_node

    def check(self) -> None:
        """ConfigError for values SLURM would refuse or that would break the script's ``#SBATCH`` lines."""
        if self.nodes < 1:
            raise ConfigError(f"--nodes {self.nodes}: give the number of nodes to allocate (>= 1).")
        if self.gpus_per_node < 1:
            raise ConfigError(f"--gpus-per-node {self.gpus_per_node}: give the GPUs to use on each node (>= 1); "
                              "zo2 starts one process per GPU.")
        if self.cpus_per_task is not None and self.cpus_per_task < 1:
            raise ConfigError(f"--cpus-per-task {self.cpus_per_task}: give the CPUs of each node's task (>= 1).")
        if not _TIME.match(self.time):
            raise ConfigError(f"--time {self.time!r} is not a SLURM time limit. Write HH:MM:SS, D-HH:MM:SS or "
                              "minutes, e.g. --time 24:00:00.")
        if not _MEM.match(self.mem):
            raise ConfigError(f"--mem {self.mem!r} is not a SLURM memory size. Write e.g. --mem 500G, or --mem 0 "
                              "for all of each node's memory (the default).")
        for flag, value in (("--partition", self.partition), ("--account", self.account),
                            ("--job-name", self.job_name)):
            if value is not None and not _WORD.match(value):
                raise ConfigError(f"{flag} {value!r}: use letters, digits and _ . , : + % @ = / - only (no spaces).")


@dataclass(frozen=True)
class SlurmJob:
    """A rendered job: the script text and where it and its logs go."""

    script: str
    script_path: Path
    log_dir: Path
    run_dir: Path
    job: JobConfig


def check_layout(job: JobConfig, opts: SlurmOptions) -> None:
    """ConfigError unless ``parallel.dp × parallel.pp`` equals nodes × GPUs per node and the global batch splits
    into the ``dp`` data-parallel ranks."""
    dp, pp, world = job.parallel.dp, job.parallel.pp, opts.world_size
    if dp * pp != world:
        fixes = []
        if world % pp == 0:
            fixes.append(f"--set parallel.dp={world // pp} (keeping parallel.pp={pp})")
        if (dp * pp) % opts.gpus_per_node == 0:
            fixes.append(f"--nodes {dp * pp // opts.gpus_per_node} (keeping {opts.gpus_per_node} GPUs per node)")
        hint = " or ".join(fixes) if fixes else f"sizes whose product is {world}"
        raise ConfigError(f"parallel.dp × parallel.pp = {dp} × {pp} = {dp * pp}, but --nodes {opts.nodes} × "
                          f"--gpus-per-node {opts.gpus_per_node} = {world} processes (one per GPU). They must be "
                          f"equal: use {hint}.")
    if job.data.batch_size % dp:
        raise ConfigError(f"data.batch_size = {job.data.batch_size} does not divide into parallel.dp = {dp} "
                          f"data-parallel ranks. Set data.batch_size to a multiple of {dp} (it is the global batch).")


def _absolute(path: str | Path, workdir: Path) -> Path:
    p = Path(path).expanduser()
    return p if p.is_absolute() else workdir / p


def _no_space(what: str, path: Path) -> None:
    if any(c.isspace() for c in str(path)):
        raise ConfigError(f"{what} {str(path)!r} contains whitespace, which #SBATCH lines cannot carry. Use a "
                          "path without spaces.")


def _override_key(item: str) -> str:
    return item.split("=", 1)[0].strip()


def _sets(overrides: Sequence[str]) -> str:
    return "".join(f" --set {shlex.quote(item)}" for item in overrides)


def resume_overrides(overrides: Sequence[str]) -> list[str]:
    """The overrides a ``--resume`` may repeat: the saved config.toml already holds every value, and zo2 train
    refuses those that would change what replay rebuilds (``RESUME_LOCKED``)."""
    from zo2.train.run_dir import RESUME_LOCKED

    return [o for o in overrides if not _override_key(o).startswith(RESUME_LOCKED)]


def load_template(path: Path = TEMPLATE_PATH) -> Template:
    """The sbatch template; a ZO2Error when it is not there (a damaged installation)."""
    if not path.is_file():
        raise ZO2Error(f"The sbatch template {str(path)!r} is missing: the zo2 installation is incomplete. "
                       "Reinstall zo2 (pip install --force-reinstall zo2, or pip install -e . in a checkout that has "
                       "deploy/slurm/zo2.sbatch.template).")
    return Template(path.read_text(encoding="utf-8"))


def render(config: str | Path, overrides: Sequence[str], opts: SlurmOptions, out_script: str | Path | None = None,
           workdir: Path | None = None) -> SlurmJob:
    """Check the job and render its sbatch script (nothing is written)."""
    from zo2.config.loader import load_config

    opts.check()
    workdir = (workdir or Path.cwd()).absolute()
    overrides = list(overrides)
    job = load_config(None, config, overrides)
    check_layout(job, opts)
    config_path = _absolute(config, workdir)
    run_dir = _absolute(job.run.out_dir, workdir)
    script_path = _absolute(out_script, workdir) if out_script else run_dir.with_name(run_dir.name + ".slurm") / \
        SCRIPT_NAME
    log_dir = script_path.parent
    for what, path in (("The working directory", workdir), ("The log folder", log_dir)):
        _no_space(what, path)
    if any("\n" in str(p) for p in (config_path, run_dir)):
        raise ConfigError("Paths with line breaks cannot go into a job script; rename the config or run folder.")
    passed = [o for o in overrides if _override_key(o) != "run.out_dir"]  # the script passes --out RUN_DIR
    cpus = opts.cpus_per_task or CPUS_PER_GPU * opts.gpus_per_node
    optional = "".join(f"#SBATCH --{flag}={value}\n" for flag, value in
                       (("partition", opts.partition), ("account", opts.account)) if value)
    values = dict(
        config=shlex.quote(str(config_path)), run_dir=shlex.quote(str(run_dir)), script=shlex.quote(str(script_path)),
        nodes=opts.nodes, gpus_per_node=opts.gpus_per_node, dp=job.parallel.dp, pp=job.parallel.pp,
        job_name=opts.job_name or f"zo2-{re.sub(r'[^A-Za-z0-9_.-]+', '-', run_dir.name) or 'run'}",
        cpus_per_task=cpus, mem=opts.mem, time=opts.time, optional_sbatch=optional, workdir=str(workdir),
        log_dir=str(log_dir), rdzv_port=RDZV_PORT, omp_threads=max(1, cpus // opts.gpus_per_node),
        fresh_sets=_sets(passed), resume_sets=_sets(resume_overrides(passed)),
    )
    try:
        script = load_template().substitute(values)
    except (KeyError, ValueError) as exc:
        raise ZO2Error(f"The sbatch template {str(TEMPLATE_PATH)!r} has a bad placeholder ({exc}); restore it from "
                       "the repository.") from exc
    return SlurmJob(script, script_path, log_dir, run_dir, job)


def check_run_dir(run_dir: Path) -> str | None:
    """A note when the job will continue an existing run; ConfigError when the folder cannot hold a run."""
    if (run_dir / _TRAJECTORY).is_file():
        return (f"{run_dir} already holds a run: the job continues it (zo2 train --resume). Change run.out_dir to "
                "start a new run instead.")
    if run_dir.exists() and not run_dir.is_dir():
        raise ConfigError(f"run.out_dir {str(run_dir)!r} is a file. Set run.out_dir to a folder path.")
    if run_dir.is_dir() and any(run_dir.iterdir()) and not (run_dir / _SAVED_CONFIG).is_file():
        raise ConfigError(f"Run folder {str(run_dir)!r} is not empty and is not a zo2 run folder, so zo2 train would "
                          "refuse it once the job starts. Set run.out_dir (--set run.out_dir=DIR) to a new or empty "
                          "folder.")
    return None


def submit(script_path: Path) -> str:
    """``sbatch SCRIPT``; its output line ("Submitted batch job N"). ZO2Error naming the script when sbatch is
    missing or refuses it."""
    sbatch = shutil.which("sbatch")
    if sbatch is None:
        raise ZO2Error(f"`sbatch` is not on PATH, so the job was not submitted. The script is written: submit it "
                       f"by hand on a SLURM login node with `sbatch {shlex.quote(str(script_path))}`, or run "
                       "`zo2 slurm` there.")
    proc = subprocess.run([sbatch, str(script_path)], capture_output=True, text=True)
    if proc.returncode != 0:
        detail = " ".join((proc.stderr or proc.stdout).split()) or f"exit status {proc.returncode}"
        raise ZO2Error(f"sbatch refused {str(script_path)!r}: {detail}. Fix the allocation flags (--partition, "
                       "--account, --time, --gpus-per-node) and run zo2 slurm again.")
    return proc.stdout.strip()


def run_slurm(config: str, overrides: Sequence[str], opts: SlurmOptions, out_script: str | None = None,
              dry_run: bool = False) -> int:
    """The ``zo2 slurm`` command: print the script (``dry_run``) or write it and submit it."""
    job = render(config, overrides, opts, out_script)
    note = check_run_dir(job.run_dir)
    if dry_run:
        sys.stdout.write(job.script)
        if note:
            print(f"zo2: {note}", file=sys.stderr)
        return 0
    job.log_dir.mkdir(parents=True, exist_ok=True)
    job.script_path.parent.mkdir(parents=True, exist_ok=True)
    job.script_path.write_text(job.script, encoding="utf-8")
    job.script_path.chmod(0o755)
    print(f"zo2: wrote {job.script_path} ({opts.nodes} node(s) × {opts.gpus_per_node} GPU(s), "
          f"dp={job.job.parallel.dp} pp={job.job.parallel.pp}; logs in {job.log_dir})")
    if note:
        print(f"zo2: {note}")
    print(submit(job.script_path))
    return 0
