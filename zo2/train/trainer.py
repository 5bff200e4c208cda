"""The trainer: a :class:`Trainer` whose ``train()`` is a short loop (step, log, checkpoint, evaluate), and
resume. Its pieces are built by :mod:`zo2.train.build`; the run folder is checked and prepared by
:mod:`zo2.train.run_dir`; weights at a step are rebuilt by :mod:`zo2.train.replay` (``zo2 replay``).

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
from dataclasses import dataclass, field
from pathlib import Path

from zo2.config.job import JobConfig
from zo2.config.loader import job_to_dict, to_toml
from zo2.config.presets import human_count
from zo2.engine import LossFn, StepResult
from zo2.errors import ConfigError
from zo2.optim.estimators import Update
from zo2.parallel.mesh import init_comm
from zo2.train.build import build_data, build_engine, build_guard, build_job_model, build_tokenizer, resolve_device
from zo2.train.checkpoint import (LOG_FILE, ReadOnlyLog, TrajectoryLog, check_log_covers_snapshots, make_record,
                                  read_log, save_snapshot)
from zo2.train.metrics import Console, JsonlWriter, MetricsWindow, NullWriter, plot_loss, truncate_jsonl
from zo2.train.replay import replay_run, restore_weights
from zo2.train.run_dir import (CONFIG_FILE, FINAL_DIR, METRICS_FILE, PLOT_FILE, check_finite_weights, check_run_dir,
                               check_writable, create_run_dir, load_resume_config, read_metrics, save_model,
                               write_text_atomic)
from zo2.train.task_run import BEST_DIR, build_task_run, read_best, write_best

__all__ = ["Trainer", "TrainSummary", "describe_summary", "train_job",
           "replay_run", "load_resume_config", "read_metrics"]  # the last three: zo2.train's, importable here too


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
        snap = restore_weights(self.engine, self.run_dir, records, done,
                               set_aside_corrupt=self.main)  # rank 0 owns the folder
        if snap is not None:
            self.last_snapshot = snap.step
        self.engine.load_state_dict({"step": done})
        if records:
            self.loader.seek(records[-1]["data"])
        self.guard.replay(records)
        self._restore_metrics(records, done)

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
            self.console.log(self.engine.describe_plan(self.job.data.batch_size, self.job.data.max_length))
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
        tensors = self.engine.snapshot_tensors()  # no copies: each tensor is read once, when it is written
        done = self.engine.step_count
        meta = {"data": self.loader.position(), "log_records": self.log.num_records}
        path = save_snapshot(self.run_dir, done, tensors, meta, keep_last=self.job.checkpoint.keep_last,
                             fsync=self.job.checkpoint.fsync,
                             check=lambda name, t: check_finite_weights({name: t}, done))
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
                save_model(self.model, self.tokenizer, self.run_dir / BEST_DIR, self.engine)
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
            save_model(self.model, self.tokenizer, self.run_dir / FINAL_DIR, self.engine)
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
        """Close the log, metrics file, progress bar and the engine's files (idempotent)."""
        if self.console is not None:
            self.console.close()
        if getattr(self, "engine", None) is not None:
            self.engine.close()
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


def train_job(job: JobConfig, *, resume: bool = False, overwrite: bool = False, quiet: bool = False,
              loss_fn: LossFn | None = None) -> TrainSummary:
    """Build a :class:`Trainer` for ``job`` and train it."""
    return Trainer(job, resume=resume, overwrite=overwrite, quiet=quiet, loss_fn=loss_fn).train()

