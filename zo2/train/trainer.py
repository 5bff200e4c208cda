"""The trainer: small ``build_*`` functions, a :class:`Trainer` whose ``train()`` is a short loop (step, log,
checkpoint, evaluate), resume, and :func:`replay_run`.

A run folder holds:

* ``config.toml``: the resolved job (``--resume`` reads it back);
* ``trajectory.jsonl``: one fsynced record per step (update seeds, projected gradient, lr, data position, loss);
  replaying it on the base weights reproduces the run bit for bit (DESIGN.md §5);
* ``metrics.jsonl``: a ``"train"`` line every ``train.log_every`` steps and an ``"eval"`` line per evaluation;
* ``snapshots/``: atomic safetensors of the trainable parameters every ``checkpoint.save_every`` steps and at
  the end;
* ``final/``: the final model (``save_pretrained`` format, loadable as ``model.path``); ``loss.png``.

Step numbers: the trajectory log uses each step's 0-based index; metrics, snapshots, ``--to`` and the console
count steps done (index + 1), so "step 10" is the state after ten updates.
"""

from __future__ import annotations

import math
import os
import shutil
import tempfile
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Iterable

import torch
from torch import nn

from zo2.config.job import JobConfig
from zo2.config.loader import job_to_dict, load_saved_config, parse_override, to_toml
from zo2.config.presets import human_count
from zo2.engine import LossFn, StepResult, ZOEngine
from zo2.errors import CheckpointError, ConfigError, DataError, NonFiniteLossError, write_failure
from zo2.optim.estimators import Update
from zo2.parallel.mesh import ZOComm, init_comm
from zo2.train.checkpoint import (LOG_FILE, ReadOnlyLog, Snapshot, TrajectoryLog, check_log_covers_snapshots,
                                  latest_good_snapshot, make_record, read_log, replay_updates, save_snapshot)
from zo2.train.data import BatchLoader, Example, collate, load_examples
from zo2.train.guard import LossGuard
from zo2.train.metrics import Console, JsonlWriter, MetricsWindow, NullWriter, plot_loss, read_jsonl, truncate_jsonl
from zo2.train.model import STREAMED, build_model, fill_weights, max_positions, vocab_size
from zo2.train.task_run import BEST_DIR, build_task_run, read_best, write_best
from zo2.train.tokenizer import ByteTokenizer, load_tokenizer, special_ids

CONFIG_FILE = "config.toml"
METRICS_FILE = "metrics.jsonl"
FINAL_DIR = "final"
PLOT_FILE = "loss.png"
RESUME_LOCKED = ("model.", "data.", "optim.weight_decay", "optim.no_decay", "optim.sign_mode", "optim.distribution",
                 "train.eval_batches")
"""Overrides a resumed run refuses: they would change the weights replay rebuilds, or the data it continues."""


# ----------------------------------------------------------------------------------------------------------
# build_* : one piece of the job each
# ----------------------------------------------------------------------------------------------------------

def resolve_device(name: str) -> torch.device:
    """``train.device`` as a torch device ('auto': cuda when available, else cpu)."""
    if name == "auto":
        if not torch.cuda.is_available():
            return torch.device("cpu")
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")) % torch.cuda.device_count())
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"train.device = {name!r}, but torch sees no CUDA device here. Set train.device = "
                          "'cpu' (or 'auto'), or install a CUDA build of torch on a GPU machine.")
    return torch.device(name)


TINY_MODEL_PARAMS = 10_000_000
"""Below this many parameters the CPU path runs on one intra-op thread (see :func:`cpu_threads`)."""


def cpu_threads(job: JobConfig, cores: int) -> int:
    """Intra-op threads for a CPU run of ``job`` given ``cores`` for it: 1 for a model built from a shape under
    TINY_MODEL_PARAMS, else ``cores``. A tiny model's matrices (64-256 wide) take microseconds per op, less than
    handing work to a second thread costs: on 2 cores the default job runs as fast on one thread when the machine is
    idle and about 1.5x faster when another process keeps a core busy, while OPT-125M's step is 1.56x faster on two
    threads than on one (benchmarks/RESULTS.md)."""
    from zo2.config.presets import parameter_count

    if job.model.path is None and parameter_count(job.model) < TINY_MODEL_PARAMS:
        return 1
    return max(cores, 1)


def set_cpu_threads(job: JobConfig) -> int | None:
    """For the command line: set torch's intra-op threads by :func:`cpu_threads` unless OMP_NUM_THREADS says
    otherwise or the job runs on a GPU. Returns the count set (None: left alone)."""
    if "OMP_NUM_THREADS" in os.environ or job.train.device.startswith("cuda") or (
            job.train.device == "auto" and torch.cuda.is_available()):
        return None
    threads = cpu_threads(job, torch.get_num_threads())
    torch.set_num_threads(threads)
    return threads


def build_tokenizer(job: JobConfig) -> Any:
    """The tokenizer ``data.tokenizer`` names (the byte tokenizer by default)."""
    return load_tokenizer(job.data, job.model.path)


def special_token_ids(tokenizer: Any) -> dict[str, int | None]:
    """pad/bos/eos ids of the tokenizer, for the config of a model built from a shape."""
    pad, eos = special_ids(tokenizer)
    return {"pad_token_id": pad, "bos_token_id": getattr(tokenizer, "bos_token_id", None), "eos_token_id": eos}


def build_job_model(job: JobConfig, tokenizer: Any) -> nn.Module:
    """The model of ``job.model``, checked against the tokenizer and the sequence length."""
    model = build_model(job.model, special_token_ids(tokenizer))
    rows, needed = vocab_size(model), len(tokenizer)
    if rows < needed:
        raise ConfigError(f"The model's vocabulary has {rows} entries but the tokenizer produces ids up to "
                          f"{needed - 1}. Raise model.vocab_size to at least {needed}, or use a matching tokenizer "
                          "(data.tokenizer).")
    longest = max_positions(model)
    if longest is not None and job.data.max_length > longest:
        raise ConfigError(f"data.max_length = {job.data.max_length} exceeds the {longest} positions the model "
                          "accepts. Lower data.max_length.")
    if job.peft.method is not None:  # only the adapter's parameters are trained
        from zo2.models.peft_adapter import apply_peft

        model = apply_peft(model, job.peft, job.model.family, seed=job.model.init_seed)
    return model


def build_data(job: JobConfig, tokenizer: Any, comm: ZOComm | None = None
               ) -> tuple[BatchLoader, list[dict[str, torch.Tensor]]]:
    """The training loader and the held-out batches: the last ``train.eval_batches × data.batch_size``
    examples of the data set are held out from training and evaluated."""
    examples = load_examples(job.data, tokenizer)
    size = job.data.batch_size
    held = job.train.eval_batches * size
    if held and len(examples) - held < size:
        raise DataError(f"The data set has {len(examples)} examples; holding out train.eval_batches × "
                        f"data.batch_size = {held} for evaluation leaves less than one training batch. Lower "
                        "train.eval_batches (0 turns evaluation off) or data.batch_size, or add examples.")
    train: list[Example] = examples[: len(examples) - held]
    pad, _ = special_ids(tokenizer)
    evals = [collate(examples[i: i + size], pad) for i in range(len(train), len(examples), size)]
    shard = dict(rank=comm.dp_rank, world_size=comm.dims.dp) if comm is not None else {}
    return BatchLoader(job.data, tokenizer, examples=train, **shard), evals


def build_engine(job: JobConfig, model: nn.Module, loss_fn: LossFn | None = None,
                 comm: ZOComm | None = None) -> ZOEngine:
    """The ZO engine on ``train.device`` (``optim.total_steps`` filled in from ``train.steps``)."""
    device = resolve_device(job.train.device)
    optim = replace(job.optim, device=str(device), total_steps=job.optim.total_steps or job.train.steps)
    engine = ZOEngine(model, optim, loss_fn=loss_fn, comm=comm if comm is not None and comm.world_size > 1 else None)
    if getattr(model, STREAMED, False):
        fill_weights(job.model, engine)  # weights go straight into the store / onto the device
    return engine


# ----------------------------------------------------------------------------------------------------------
# Run folders
# ----------------------------------------------------------------------------------------------------------

def is_run_dir(path: Path) -> bool:
    """True when ``path`` looks like a zo2 run folder (a config.toml or a trajectory log)."""
    return (path / CONFIG_FILE).is_file() or (path / LOG_FILE).is_file()


def build_guard(job: JobConfig, resume_command: str) -> LossGuard:
    """The run's loss guard (NaN/inf streaks, blow-ups), with the command that continues it for its advice."""
    return LossGuard(job.train.max_nonfinite_steps, job.train.divergence_factor, resume_command, job.optim.lr,
                     run_dir=job.run.out_dir)


def holds_steps(run_dir: Path) -> bool:
    """True when ``run_dir`` holds trained steps (a non-empty trajectory log, or a snapshot): work a new run must
    not replace without --overwrite. A run folder whose start failed (a bad config, a broken install) holds none."""
    from zo2.train.checkpoint import list_snapshots

    log = run_dir / LOG_FILE
    return (log.is_file() and log.stat().st_size > 0) or bool(list_snapshots(run_dir))


def is_stepless_run(run_dir: Path) -> bool:
    """A zo2 run folder that holds no steps: a new run may replace it without --overwrite."""
    return is_run_dir(run_dir) and not holds_steps(run_dir)


def check_run_dir(run_dir: Path, *, resume: bool, overwrite: bool, purpose: str = "resume") -> None:
    """Refuse to touch an existing run folder unless told to resume or overwrite it (nothing is written)."""
    if run_dir.exists() and not run_dir.is_dir():
        raise CheckpointError(f"Run folder {str(run_dir)!r} is a file. Pick another folder with --out DIR.")
    used = run_dir.is_dir() and any(run_dir.iterdir())
    if resume:
        if not (run_dir / CONFIG_FILE).is_file():
            fix = {"resume": ", or drop --resume to start a new run", "evaluate": ", or a Hugging Face model "
                   "folder"}.get(purpose, "")
            raise CheckpointError(f"{str(run_dir)!r} is not a zo2 run folder (it has no {CONFIG_FILE}), so there "
                                  f"is nothing to {purpose}. Pass the folder a previous `zo2 train` wrote{fix}.")
    elif used and not overwrite and not is_stepless_run(run_dir):
        raise CheckpointError(f"Run folder {str(run_dir)!r} already exists and is not empty; zo2 left it "
                              f"untouched. Continue that run with `zo2 train --resume {run_dir}`, start it over "
                              "with --overwrite (deletes its contents), or write elsewhere with --out DIR.")
    elif used and not is_run_dir(run_dir):
        raise CheckpointError(f"Refusing to --overwrite {str(run_dir)!r}: it is not a zo2 run folder (no "
                              f"{CONFIG_FILE} or {LOG_FILE}), and --overwrite deletes its contents. Pick an empty "
                              "or new folder with --out DIR.")


def check_writable(folder: Path, what: str = "The run folder") -> None:
    """ConfigError naming ``folder`` when nothing can be written there (a read-only folder or mount), before any
    work starts; a folder that does not exist yet is checked at its nearest existing parent."""
    probe = folder.absolute()
    while not probe.exists() and probe.parent != probe:
        probe = probe.parent
    if not probe.is_dir():
        return  # a file in the way: check_run_dir names it
    try:
        with tempfile.TemporaryFile(dir=probe):
            pass
    except OSError as exc:
        raise ConfigError(f"{what} {str(folder)!r} cannot be written ({exc.strerror or exc} in {probe}). Make it "
                          "writable, or pick another folder with --out DIR.") from None


def create_run_dir(run_dir: Path, overwrite: bool) -> None:
    """Make the run folder, first deleting an old run there when ``overwrite`` or when it holds no steps (a start
    that failed before its first step: the corrected command starts the run)."""
    if run_dir.is_dir() and (overwrite or is_stepless_run(run_dir)):
        shutil.rmtree(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)


def write_text_atomic(path: Path, text: str) -> None:
    """Write ``text`` to a temporary name and rename it over ``path``."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(path)


def load_resume_config(run_dir: str | Path, overrides: Iterable[str] = (), *, purpose: str = "resume") -> JobConfig:
    """The saved config of ``run_dir`` with ``overrides`` applied (those that would break the replay refused).
    ``purpose`` ("resume", "replay" or "evaluate") words the error for a folder that holds no run."""
    run_dir = Path(run_dir)
    overrides = list(overrides)
    for item in overrides:
        section, key, _ = parse_override(item)
        if any(f"{section}.{key}".startswith(locked) for locked in RESUME_LOCKED):
            raise ConfigError(f"--set {section}.{key} cannot change on --resume: the steps already taken depend on "
                              "it, so replay and the data order would no longer match the run. Start a new run "
                              "with that setting instead (or replay this one to a step and train from there).")
    check_run_dir(run_dir, resume=True, overwrite=False, purpose=purpose)
    job = load_saved_config(run_dir / CONFIG_FILE, overrides)
    job.run = replace(job.run, out_dir=str(run_dir))
    return job


def cut_run(run_dir: str | Path, step: int) -> str | None:
    """Cut the run in ``run_dir`` back to ``step`` steps done, so that resuming continues from the weights after
    step ``step`` (e.g. before an update that blew them up): the trajectory log keeps its first ``step`` records,
    snapshots of later steps leave the rotation. Nothing is deleted: copies of the whole log and metrics.jsonl, and
    those snapshots, go to ``RUN_DIR/after-step-SSSSSSSS/``. Returns a line saying so (None: nothing to cut)."""
    from zo2.train.checkpoint import list_snapshots, snapshot_step

    run_dir = Path(run_dir)
    log = run_dir / LOG_FILE
    records = read_log(log)
    check_step_in_log(step, len(records), run_dir, "--resume-from-step")
    later = [p for p in list_snapshots(run_dir) if snapshot_step(p) > step]
    if step == len(records) and not later:
        return None
    aside = run_dir / f"after-step-{step:08d}"
    try:
        aside.mkdir(exist_ok=True)
        for name in (LOG_FILE, METRICS_FILE):
            if (run_dir / name).is_file():
                shutil.copy2(run_dir / name, aside / name)
        kept = b"".join(log.read_bytes().splitlines(keepends=True)[:step])  # read_log checked these lines
        tmp = log.with_name(f".{log.name}.cut")
        tmp.write_bytes(kept)
        os.replace(tmp, log)
        for path in later:
            os.replace(path, aside / path.name)
    except OSError as exc:
        raise CheckpointError(write_failure(aside / LOG_FILE, exc, f"setting the steps after step {step} aside",
                                            "The run folder is")) from None
    return (f"zo2: continuing from the weights after step {step}: the log's later {len(records) - step} steps, the "
            f"metrics and {len(later)} later snapshot(s) were set aside in {aside}")


def save_model(model: nn.Module, tokenizer: Any, folder: Path) -> Path:
    """``save_pretrained`` the model (and a Hugging Face tokenizer) to ``folder``, replacing it atomically."""
    from transformers.utils import logging as hf_logging

    tmp = folder.with_name(f".{folder.name}.tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    bar_was_on = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # no "Writing model shards" bar in the middle of zo2's output
    try:
        model.save_pretrained(str(tmp))
    finally:
        if bar_was_on:
            hf_logging.enable_progress_bar()
    if not isinstance(tokenizer, ByteTokenizer) and hasattr(tokenizer, "save_pretrained"):
        tokenizer.save_pretrained(str(tmp))
    if folder.exists():
        shutil.rmtree(folder)
    tmp.rename(folder)
    return folder


def check_finite_weights(tensors: dict[str, torch.Tensor], steps_done: int) -> None:
    """NonFiniteLossError instead of saving weights that hold NaN/inf."""
    bad = [name for name, t in tensors.items() if not bool(torch.isfinite(t).all())]  # host sync per tensor
    if bad:
        raise NonFiniteLossError(f"After {steps_done} steps the weights hold NaN/inf values (e.g. in {bad[0]}); "
                                 "zo2 did not save them. Lower optim.lr or optim.eps, or use model.dtype = 'fp32', "
                                 "and restart from a snapshot or `zo2 replay` of an earlier step.")


# ----------------------------------------------------------------------------------------------------------
# The trainer
# ----------------------------------------------------------------------------------------------------------

@dataclass
class TrainSummary:
    """What a finished ``train()`` reports."""

    run_dir: Path
    steps: int
    skipped: int
    seconds: float
    losses: list[float] = field(default_factory=list)
    """Per-step training losses of the whole run, from the trajectory log (NaN for skipped steps)."""
    eval_losses: list[tuple[int, float]] = field(default_factory=list)
    """(steps done, held-out loss) of every evaluation."""
    best: dict | None = None
    """With a task: the best evaluation ({"step", "metric", "value"}); its weights are in ``best/``."""


class Trainer:
    """Trains ``job``; ``resume`` continues the run in ``job.run.out_dir`` (use :func:`load_resume_config`)."""

    def __init__(self, job: JobConfig, *, resume: bool = False, overwrite: bool = False, quiet: bool = False,
                 loss_fn: LossFn | None = None):
        if resume and overwrite:
            raise ConfigError("--resume and --overwrite contradict each other: resume continues a run folder, "
                              "overwrite deletes it. Pass one of them.")
        self.job, self.quiet = job, quiet
        self.run_dir = Path(job.run.out_dir)
        self.comm = init_comm(job.parallel, resolve_device(job.train.device))
        self.main = self.comm.rank == 0  # only rank 0 writes the run folder; every rank computes
        if self.main:
            check_run_dir(self.run_dir, resume=resume, overwrite=overwrite)
            check_writable(self.run_dir)
        self.tokenizer = build_tokenizer(job)
        self.model = build_job_model(job, self.tokenizer)
        self.task = build_task_run(job, self.tokenizer, self.comm)
        if self.task is not None:  # a MeZO task: its loader and loss; evaluation scores its metric
            self.loader, self.eval_set = self.task.loader, []
            loss_fn = loss_fn or self.task.loss_fn
        else:
            self.loader, self.eval_set = build_data(job, self.tokenizer, self.comm)
        self.engine = build_engine(job, self.model, loss_fn, self.comm)
        if not resume and self.main:
            create_run_dir(self.run_dir, overwrite)
        if self.main:
            self.log = TrajectoryLog(self.run_dir / LOG_FILE, fsync=job.checkpoint.fsync)  # repairs a torn line
        self.comm.barrier()  # the folder and the log are in order before any other rank reads them
        if not self.main:
            self.log = ReadOnlyLog(self.run_dir / LOG_FILE)
        self.window = MetricsWindow()
        self.guard = build_guard(job, f"zo2 train --resume {self.run_dir}")
        self.evals: list[dict] = []
        self.last_snapshot = -1
        self.best = read_best(self.run_dir) if resume and self.task is not None else None
        if resume:
            self._restore()
        if self.main:
            write_text_atomic(self.run_dir / CONFIG_FILE, to_toml(job))  # after a resume check, so a refused one
        self.metrics = JsonlWriter(self.run_dir / METRICS_FILE) if self.main else NullWriter()
        self.console: Console | None = None

    # ----- resume ----------------------------------------------------------------------------------------------

    def _restore(self) -> None:
        """Latest good snapshot + replay of the log tail, then the data position, step and metrics state."""
        try:
            self._restore_state()
        except BaseException:
            self.log.close()
            raise

    def _restore_state(self) -> None:
        records = read_log(self.log.path)
        done = len(records)
        if done > self.job.train.steps:
            raise ConfigError(f"train.steps = {self.job.train.steps}, but the run in {self.run_dir} already took "
                              f"{done} steps. Raise train.steps to continue it, or rebuild an earlier state with "
                              f"`zo2 replay {self.run_dir} --to {self.job.train.steps}`.")
        check_log_covers_snapshots(self.run_dir, done)
        snap = latest_good_snapshot(self.run_dir, set_aside_corrupt=self.main)  # rank 0 owns the folder
        start = self._load_snapshot(snap, done)
        replay_updates(self.engine.apply_update, records, start, done)
        self.engine.load_state_dict({"step": done})
        if records:
            self.loader.seek(records[-1]["data"])
        self.guard.replay(records)
        self._restore_metrics(records, done)

    def _load_snapshot(self, snap: Snapshot | None, done: int) -> int:
        """Load ``snap`` into the engine and return its step (0 with no snapshot: the base weights)."""
        if snap is None:
            return 0
        if snap.step > done:
            raise CheckpointError(f"Snapshot {snap.path.name} is at step {snap.step} but the trajectory log ends "
                                  f"after step {done}: the log lost records. Restore the log, or delete the newer "
                                  "snapshots to resume from an older point.")
        self.engine.load_trainable_state(snap.tensors)
        self.last_snapshot = snap.step
        return snap.step

    def _restore_metrics(self, records: list[dict], done: int) -> None:
        """Cut metrics.jsonl back to ``done`` and refill the current window from the log."""
        kept = truncate_jsonl(self.run_dir / METRICS_FILE, done) if self.main else []
        self.evals = [r for r in kept if r.get("kind") == "eval"]
        logged = done - done % self.job.train.log_every  # the window the uninterrupted run would be filling
        self.window.time_offset = max((r.get("time", 0.0) for r in kept), default=0.0)
        self.window.skipped_total = sum(bool(r["skipped"]) for r in records[:logged])
        for r in records[logged:]:
            self.window.add(float(r["loss"]), bool(r["skipped"]))

    # ----- the loop --------------------------------------------------------------------------------------------

    def train(self) -> TrainSummary:
        """Run until ``train.steps`` steps are done; returns the summary (raises NonFiniteLossError on a
        NaN/inf streak, after closing the log: what was saved stays valid)."""
        steps = self.job.train.steps
        self.console = Console(total=steps, initial=self.engine.step_count, quiet=self.quiet, silent=not self.main)
        if self.engine.plan.streamed or self.job.optim.offload is True:
            self.console.log(self.engine.plan.describe())
        try:
            self._announce()
            if self.engine.step_count == 0 and self._evaluates:
                self.evaluate()
            while self.engine.step_count < steps:
                self._after_step(self.train_step())
            self.console.close()  # the bar ends here; the closing messages print below it
            return self._finish()
        finally:
            self.close()

    def train_step(self) -> StepResult:
        """One ZO step on the next batch, recorded in the trajectory log before anything else happens."""
        batch = self.loader.next_batch()
        result = self.engine.step(batch)
        update = result.update or Update(result.step, (), (), result.lr)
        self.log.append(make_record(update, data=self.loader.position(), loss=result.loss,
                                    projected_grad=result.projected_grad, skipped=result.skipped,
                                    loss_plus=result.loss_plus, loss_minus=result.loss_minus))
        return result

    def _after_step(self, result: StepResult) -> None:
        """Count, log, stop on a NaN streak, snapshot and evaluate as the config says."""
        done, cfg = result.step + 1, self.job
        self.window.add(result.loss, result.skipped, result.tokens)
        self.window.add_transfer(result)
        assert self.console is not None
        self.console.step(result.loss, self.window.tokens_per_s(), self.window.transfer_summary())
        self._check_loss(result)
        if done % cfg.train.log_every == 0 or done == cfg.train.steps:
            line = self.window.record(result, done)
            self.metrics.write(line)
            self.console.metrics(line)
        if cfg.checkpoint.save_every and done % cfg.checkpoint.save_every == 0:
            self.save_snapshot()
        every = cfg.parallel.checksum_every
        if self.comm.world_size > 1 and every and done % every == 0:
            self.comm.check_replicas(self.engine.checksum(), done)
        if cfg.train.eval_every and done % cfg.train.eval_every == 0 and self._evaluates:
            self.evaluate()

    def _check_loss(self, result: StepResult) -> None:
        """Stop on a NaN/inf streak or a loss that jumped past train.divergence_factor × its average (LossGuard)."""
        warning = self.guard.check(result.step, result.loss, result.skipped)
        if warning is not None:
            assert self.console is not None
            self.console.log(warning)

    def save_snapshot(self) -> Path | None:
        """Flush the deferred update and write the trainable weights as the snapshot of this step (rank 0)."""
        self.engine.flush()  # on every rank: with sliced transfers the flush is collective
        if not self.main:
            self.last_snapshot = self.engine.step_count
            return None
        tensors = self.engine.trainable_state()
        done = self.engine.step_count
        check_finite_weights(tensors, done)
        meta = {"data": self.loader.position(), "log_records": self.log.num_records}
        path = save_snapshot(self.run_dir, done, tensors, meta, keep_last=self.job.checkpoint.keep_last,
                             fsync=self.job.checkpoint.fsync)
        self.last_snapshot = done
        return path

    @property
    def _evaluates(self) -> bool:
        return bool(self.eval_set) or self.task is not None

    def evaluate(self) -> float:
        """Mean loss of the held-out batches (with a task: the task's metric) at the current weights, logged to
        metrics.jsonl."""
        if self.task is not None:
            return self._evaluate_task()
        losses = [self.engine.evaluate(batch).loss for batch in self.eval_set]  # host sync: one scalar each
        loss = sum(losses) / len(losses)
        line = {"kind": "eval", "step": self.engine.step_count, "eval_loss": loss, "time": self.window.elapsed()}
        self.metrics.write(line)
        self.evals.append(line)
        if self.console is not None:
            self.console.log(f"step {self.engine.step_count}: held-out loss {loss:.4f}")
        return loss

    def _evaluate_task(self) -> float:
        """The task's metric on its dev (or eval) set; the best weights so far are kept in ``best/``."""
        assert self.task is not None
        result = self.task.evaluate(self.engine, self.tokenizer)
        metric, step = self.task.metric, self.engine.step_count
        value = float(result[metric])
        line = {"kind": "eval", "step": step, "metric": metric, **{f"eval_{k}": v for k, v in result.items()},
                "time": self.window.elapsed()}
        self.metrics.write(line)
        self.evals.append(line)
        improved = self.best is None or value > self.best["value"]
        if improved:
            self.best = {"step": step, "metric": metric, "value": value}
            self.engine.flush()  # every rank (collective with sliced transfers)
            if self.main:
                save_model(self.model, self.tokenizer, self.run_dir / BEST_DIR)
                write_best(self.run_dir, self.best)
        if self.console is not None:
            self.console.log(f"step {step}: {self.task.data.task.name} {metric} {value:.4f}"
                             + (" (best so far: saved to best/)" if improved else
                                f" (best {self.best['value']:.4f} at step {self.best['step']})"))
        return value

    def _finish(self) -> TrainSummary:
        """Final snapshot, evaluation, weights, plot and summary."""
        done = self.engine.step_count
        if self.last_snapshot != done:
            self.save_snapshot()
        if self._evaluates and (not self.evals or self.evals[-1]["step"] != done):
            self.evaluate()
        self.engine.flush()  # every rank (collective with sliced transfers)
        if self.job.run.save_final and self.main:
            save_model(self.model, self.tokenizer, self.run_dir / FINAL_DIR)
        self.comm.barrier()  # rank 0 has written everything the other ranks may read back
        records = read_log(self.log.path)
        if self.job.run.plot and records and self.main:
            plot_loss(records, [e for e in self.evals if "eval_loss" in e], self.run_dir / PLOT_FILE,
                      title=f"{self.job.preset}: {self.run_dir}")
        summary = TrainSummary(self.run_dir, done, sum(bool(r["skipped"]) for r in records), self.window.elapsed(),
                               [float(r["loss"]) for r in records],
                               [(int(e["step"]), float(e["eval_loss"])) for e in self.evals if "eval_loss" in e],
                               self.best)
        assert self.console is not None
        self.console.log(describe_summary(summary))
        return summary

    def _announce(self) -> None:
        """Log the resolved config (one line per section) and what is about to run."""
        assert self.console is not None
        m, done = self.job.model, self.engine.step_count
        source = m.path or f"random init, seed {m.init_seed}"
        count = sum(p.numel() for p in self.model.parameters())
        verb = f"resuming at step {done} of" if done else "training"
        self.console.log(f"zo2: {verb} {self.job.train.steps} steps of {m.name if not m.path else m.path} "
                         f"({human_count(count)} parameters, {source}, {m.dtype}) on {self.engine.device}; "
                         f"run folder {self.run_dir}")
        if m.path is not None and self.job.data.tokenizer is None:
            self.console.log("note: model.path is set but data.tokenizer is not, so the byte tokenizer is used; set "
                             "data.tokenizer = 'model' to train with the model's own tokenizer")
        for name, values in job_to_dict(self.job).items():
            if isinstance(values, dict):
                self.console.log(f"  [{name}] " + " ".join(f"{k}={v!r}" for k, v in values.items()))

    def close(self) -> None:
        """Close the log, metrics file and progress bar (idempotent)."""
        if self.console is not None:
            self.console.close()
        self.log.close()
        self.metrics.close()
        self.comm.close()


def describe_summary(s: TrainSummary) -> str:
    """One line: steps, time, loss at the start and end, held-out loss, run folder."""
    finite = [x for x in s.losses if math.isfinite(x)]
    k = max(len(finite) // 10, 1)
    train = (f"train loss {sum(finite[:k]) / k:.4f} -> {sum(finite[-k:]) / k:.4f} (mean of first/last {k})"
             if finite else "no finite loss")
    held = f"; held-out loss {s.eval_losses[0][1]:.4f} -> {s.eval_losses[-1][1]:.4f}" if s.eval_losses else ""
    if s.best is not None:
        held += f"; best {s.best['metric']} {s.best['value']:.4f} at step {s.best['step']} (best/)"
    return (f"done: {s.steps} steps in {s.seconds:.1f}s, {s.skipped} skipped; {train}{held}; "
            f"run folder {s.run_dir}")


# ----------------------------------------------------------------------------------------------------------
# Replay
# ----------------------------------------------------------------------------------------------------------

def restore_step(engine: ZOEngine, run_dir: Path, to_step: int | None, *, from_base: bool = False,
                 progress: bool = False, option: str = "--step") -> int:
    """Put the weights after ``to_step`` steps of the run in ``run_dir`` (default: all the log holds) into
    ``engine``: the newest good snapshot at or before it (unless ``from_base``), then the log's updates up to it.
    Returns the step reached. CheckpointError (naming ``option``) when the log does not hold ``to_step`` steps."""
    records = read_log(run_dir / LOG_FILE)
    to_step = len(records) if to_step is None else to_step
    check_step_in_log(to_step, len(records), run_dir, option)
    snap = None if from_base else latest_good_snapshot(run_dir, to_step)
    if snap is not None:
        engine.load_trainable_state(snap.tensors)
    replay_updates(engine.apply_update, records, snap.step if snap else 0, to_step, progress=progress)
    engine.flush()
    return to_step


def check_step_in_log(step: int, held: int, run_dir: Path, option: str) -> None:
    """CheckpointError naming ``option`` unless 0 <= ``step`` <= ``held`` (the steps the log holds)."""
    if not 0 <= step <= held:
        raise CheckpointError(f"{option} {step} is outside the run in {run_dir}: its trajectory log holds {held} "
                              f"steps, so pick a step from 0 (the base weights) to {held}.")


def replay_run(run_dir: str | Path, to_step: int | None = None, out_dir: str | Path | None = None,
               from_base: bool = False, progress: bool = False) -> Path:
    """Rebuild the weights after ``to_step`` steps of the run in ``run_dir`` (default: all of them) from the
    base weights (or the newest snapshot at or before it, unless ``from_base``) and the trajectory log; write
    them with ``save_pretrained`` to ``out_dir`` (default ``run_dir/replay/step_XXXXXXXX``)."""
    run_dir = Path(run_dir)
    job = load_resume_config(run_dir, purpose="replay")
    records = read_log(run_dir / LOG_FILE)
    to_step = len(records) if to_step is None else to_step
    check_step_in_log(to_step, len(records), run_dir, "--to")
    out = Path(out_dir) if out_dir is not None else run_dir / "replay" / f"step_{to_step:08d}"
    check_writable(out, "The replay's output folder")
    tokenizer = build_tokenizer(job)
    model = build_job_model(job, tokenizer)
    engine = build_engine(job, model)
    restore_step(engine, run_dir, to_step, from_base=from_base, progress=progress)
    out.parent.mkdir(parents=True, exist_ok=True)
    return save_model(model, tokenizer, out)


def train_job(job: JobConfig, *, resume: bool = False, overwrite: bool = False, quiet: bool = False,
              loss_fn: LossFn | None = None) -> TrainSummary:
    """Build a :class:`Trainer` for ``job`` and train it."""
    return Trainer(job, resume=resume, overwrite=overwrite, quiet=quiet, loss_fn=loss_fn).train()


def read_metrics(run_dir: str | Path) -> list[dict]:
    """The metrics.jsonl records of a run folder."""
    return read_jsonl(Path(run_dir) / METRICS_FILE)
