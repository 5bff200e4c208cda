"""The scheduler: one process per node that owns the parameter store and supervises the node's workers.

``Scheduler(job, workers=N).run()`` (what ``zo2 launch`` runs):

1. prepares the run folder (new, or resumed when it already holds this run), writes config.toml;
2. builds the model skeleton, creates the node store in shared memory and fills it once (seeded init or the
   safetensors shards, tensor by tensor); a resumed run loads the newest good snapshot and replays the log tail;
3. starts N workers (``python -m zo2.control.worker``, torch.distributed environment as torchrun sets it) and
   serves their messages: it writes the trajectory log (fsynced, one record per step), metrics.jsonl and the
   progress bar, and writes snapshots itself at the workers' sync points (it holds the store: no worker needed);
4. on a worker that dies or stops sending heartbeats: stops the group, brings every unit of the store to the
   last logged step (clean slices replay the log tail; torn ones are rebuilt from the newest snapshot and the
   log), restarts the workers there — up to ``control.max_restarts`` times. Nothing is lost: a step either made
   it into the log or is recomputed with the same seed and batch;
5. on SIGINT/SIGTERM: asks the workers to stop at the next step boundary, writes a final snapshot and exits
   0; running the same command again resumes. A second signal stops the workers at once (the store is repaired
   from the log before the snapshot). SIGUSR1 writes a snapshot at the next step boundary and goes on.
"""

from __future__ import annotations

import contextlib
import logging
import signal
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch

from zo2.config.job import JobConfig
from zo2.control.protocol import SchedulerChannel, new_token
from zo2.control.spawn import NodePlace, WorkerProc, kill_workers, start_worker, worker_env
from zo2.control.store import NodeStore
from zo2.errors import CheckpointError, ConfigError, ZO2Error
from zo2.offload.store import remove_stale_stores

log = logging.getLogger("zo2.control")

EXIT_STOPPED = 0
"""Exit status after a stop on SIGINT/SIGTERM (the run is consistent and resumes)."""


class WorkerFailure(ZO2Error):
    """The workers failed more often than ``control.max_restarts`` allows, or reported an error."""


class Scheduler:
    """Runs ``job`` on ``workers`` local worker processes (see the module docstring)."""

    def __init__(self, job: JobConfig, *, workers: int, resume: bool | None = None, overwrite: bool = False,
                 quiet: bool = False, place: NodePlace | None = None, fault: str | None = None):
        if workers < 1:
            raise ConfigError(f"--nproc-per-node {workers}: a node needs at least one worker.")
        self.place = place or NodePlace()
        world = workers * self.place.nnodes
        if job.parallel.dp * job.parallel.pp != world:
            raise ConfigError(f"parallel.dp × parallel.pp = {job.parallel.dp} × {job.parallel.pp} = "
                              f"{job.parallel.dp * job.parallel.pp}, but the job runs {world} workers "
                              f"({self.place.nnodes} node(s) × {workers}). Set --set parallel.dp=... / parallel.pp=... "
                              f"so that their product is {world}.")
        if workers > 1 and not job.optim.sliced_transfers:
            raise ConfigError("The workers of one node share the scheduler's store and must split its transfers: "
                              "set optim.sliced_transfers = true (the default).")
        self.job, self.workers, self.quiet, self.fault = job, workers, quiet, fault
        self.head = self.place.node_rank == 0  # only the first node's scheduler writes the run folder
        self.run_dir = Path(job.run.out_dir)
        self.resume, self.overwrite = resume, overwrite
        self.token = new_token()
        self.procs: list[WorkerProc] = []
        self.restarts = 0
        self.recoveries: list[dict] = []
        """One entry per repair: why (the failure), step (restarted at), rebuilt and caught_up (unit counts)."""
        self.stop_requested = 0
        """Interrupts received: 1 stops at the next step boundary, 2 stops the workers at once."""
        self._stop_sent = False
        self._error: str | None = None
        """A problem a worker reported (a restart would repeat it)."""
        self._generation_steps = 0
        self.checkpoint_requested = False
        self.stopped_at: int | None = None
        self.finished = False
        self.evals: list[dict] = []
        self.console: Any = None
        self.rejected = 0
        """Messages dropped for not carrying the run's token (counted when the scheduler closes)."""

    # ------------------------------------------------------------------ set-up
    def _prepare_run_dir(self) -> bool:
        """New run folder, or resume the run already there (True). ``resume=None``: resume when the folder
        holds a run (rerunning the same command continues it)."""
        from zo2.train.run_dir import CONFIG_FILE, check_run_dir, check_writable, create_run_dir

        exists = (self.run_dir / CONFIG_FILE).is_file()
        resume = exists and not self.overwrite if self.resume is None else self.resume
        if self.head:
            check_run_dir(self.run_dir, resume=resume, overwrite=self.overwrite)
            check_writable(self.run_dir)
            if not resume:
                create_run_dir(self.run_dir, self.overwrite)
        return resume

    def _build(self) -> None:
        from zo2.config.loader import to_toml
        from zo2.train.build import build_job_model, build_tokenizer, resolve_device
        from zo2.train.checkpoint import (LOG_FILE, TrajectoryLog, check_log_covers_snapshots, latest_good_snapshot,
                                          read_log)
        from zo2.train.metrics import JsonlWriter, MetricsWindow, NullWriter, truncate_jsonl
        from zo2.train.model import STREAMED
        from zo2.train.run_dir import CONFIG_FILE, METRICS_FILE, write_text_atomic

        job = self.job
        self.device = resolve_device(job.train.device) if job.train.device != "auto" else (
            torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu"))
        self.tokenizer = build_tokenizer(job)
        self.model = build_job_model(job, self.tokenizer)
        self.streamed_model = bool(getattr(self.model, STREAMED, False))
        freed = remove_stale_stores() + remove_stale_stores(Path(tempfile.gettempdir()))  # stores, config files
        if freed:
            log.warning("zo2 scheduler: removed %.2f GB of node-store files left in /dev/shm by a scheduler that "
                        "died", freed / 1e9)
        self.node = NodeStore(self.model, job.optim, self.workers, job.offload,
                              frozen_base=job.peft.method is not None)
        self.node.markers.set_all(-1)
        if self.streamed_model:
            self.node.fill(self._fill_base)
        # the resolved job for the workers, node-local (other nodes must not wait for the head's run folder)
        self.config_path = Path(tempfile.gettempdir()) / f"{self.node.name}-config.toml"
        self.config_path.write_text(to_toml(job), encoding="utf-8")
        self.log_path = self.run_dir / LOG_FILE
        if self.head:
            self.log = TrajectoryLog(self.log_path, fsync=job.checkpoint.fsync)  # repairs a torn last line
            write_text_atomic(self.run_dir / CONFIG_FILE, to_toml(job))
        records = read_log(self.log_path) if self.log_path.exists() else []
        check_log_covers_snapshots(self.run_dir, len(records))  # a deleted log must not restart the run
        if len(records) > job.train.steps:
            raise ConfigError(f"train.steps = {job.train.steps}, but the run in {self.run_dir} already took "
                              f"{len(records)} steps. Raise train.steps to continue it.")
        self.done = len(records)
        if records:  # a resumed run: newest good snapshot + the log tail
            snap = latest_good_snapshot(self.run_dir, self.done, set_aside_corrupt=True)
            self.node.bring_to(self.done - 1, records, snap, self._fill_base, self.device, rebuild_all=snap is not None)
        self.last_snapshot = -1
        self.window = MetricsWindow()
        kept = truncate_jsonl(self.run_dir / METRICS_FILE, self.done) if self.head and records else []
        self.evals = [r for r in kept if r.get("kind") == "eval"]
        self.window.time_offset = max((r.get("time", 0.0) for r in kept), default=0.0)
        self.window.skipped_total = sum(bool(r["skipped"]) for r in records)
        self.metrics = JsonlWriter(self.run_dir / METRICS_FILE) if self.head else NullWriter()

    def _fill_base(self, views: dict[str, torch.Tensor]) -> None:
        """Fill ``views`` (name → store view) with the run's base weights."""
        from zo2.offload.loading import init_random_into, load_safetensors_into
        from zo2.train.build import build_job_model

        m = self.job.model
        if self.job.peft.method is not None:  # the seeded adapters, built again with the model (its base on the
            base = dict(build_job_model(self.job, self.tokenizer).named_parameters())  # meta device where streamed)
            for name, view in views.items():
                view.copy_(base[name].detach())
        elif self.streamed_model and m.path is not None:
            load_safetensors_into(views, m.path, getattr(self.model, "base_model_prefix", "model"))
        elif self.streamed_model:
            init_random_into(views, m.init_seed, self.device)
        else:  # a model small enough to build whole, built again
            base = dict(build_job_model(replace(self.job, model=replace(m, stream_load="never")), self.tokenizer)
                        .named_parameters())
            for name, view in views.items():
                view.copy_(base[name].detach())

    # ------------------------------------------------------------------ workers
    def _spawn(self) -> None:
        fault = self.fault if self.restarts == 0 else None  # an injected fault fires in the first generation only
        env_base = worker_env(self.job, workers=self.workers, place=self.place, endpoint=self.channel.endpoint,
                              token=self.token, config_path=self.config_path, run_dir=self.run_dir,
                              device_type=self.device.type, fault=fault)
        self.procs = []
        self._generation_steps = 0  # steps this generation reported: none yet means a failure is a start-up one
        for local in range(self.workers):
            self.procs.append(start_worker(env_base, local, self.workers, self.place.node_rank))

    def _kill_workers(self) -> None:
        kill_workers(self.procs)

    def _send_all(self, message: dict) -> None:
        for p in self.procs:
            if p.identity is not None:
                self.channel.send(p.identity, message)

    # ------------------------------------------------------------------ the loop
    def run(self) -> int:
        """Train to ``train.steps``; returns the exit status (0: finished or stopped consistently)."""
        from zo2.train.metrics import Console

        resume = self._prepare_run_dir()
        self.channel = SchedulerChannel(self.job.control.bind, self.token)
        handlers = {s: signal.signal(s, self._on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
        handlers[signal.SIGUSR1] = signal.signal(signal.SIGUSR1, self._on_checkpoint_signal)
        try:
            self._build()
            self.console = Console(total=self.job.train.steps, initial=self.done, quiet=self.quiet,
                                   silent=not self.head)
            self._announce(resume)
            if self.done >= self.job.train.steps and resume:
                self.console.log(f"zo2: the run in {self.run_dir} already took its {self.done} steps.")
                return self._finish()
            while True:
                self._spawn()
                outcome = self._serve()
                if outcome == "finished":
                    return self._finish()
                if outcome == "stopped":
                    self.console.log(f"zo2: stopped after step {self.done}; snapshot written. Run the same command "
                                     "again to resume.")
                    return EXIT_STOPPED
                self._recover(outcome)
        finally:
            for s, h in handlers.items():
                signal.signal(s, h)
            self._kill_workers()
            self.close()

    def _serve(self) -> str:
        """Serve one generation of workers: 'finished', 'stopped', or why it failed."""
        ctl = self.job.control
        exited_ok: set[int] = set()
        while True:
            if self.stop_requested == 1 and not self._stop_sent:
                self._send_all({"type": "stop"})  # a worker registering later is told in its welcome
                self._stop_sent = True
            if self.stop_requested >= 2:
                return "a second interrupt: stopping the workers now"
            if self.checkpoint_requested:
                self._send_all({"type": "checkpoint"})
                self.checkpoint_requested = False
            got = self.channel.receive(100)
            if got is not None:
                failure = self._handle(*got)
                if failure:
                    return failure
            now = time.monotonic()
            for p in self.procs:
                code = p.popen.poll()
                if code is not None:
                    if code == 0 and (self.finished or self.stopped_at is not None):
                        exited_ok.add(p.rank)
                        continue
                    if code == 2:
                        self._drain(1000)  # its error report may still be in flight
                    if code == 2 and self._error is not None:
                        raise WorkerFailure(self._error)
                    if code > 0 and self._generation_steps == 0:  # an import error, a broken install: a restart
                        raise WorkerFailure(                        # would only repeat it
                            f"worker {p.rank} (pid {p.popen.pid}) exited with status {code} before its first step "
                            "(its error is printed above). A failure at start-up is not a crash to repair, so the "
                            f"workers were not restarted; {self.run_dir} holds the steps logged so far. Fix the "
                            "cause and run the command again.")
                    how = f"was killed by signal {-code}" if code < 0 else f"exited with status {code}"
                    return f"worker {p.rank} (pid {p.popen.pid}) {how}"
                if not p.registered and now - p.started > ctl.start_timeout_s:
                    return f"worker {p.rank} did not register within control.start_timeout_s = {ctl.start_timeout_s:g}s"
                if p.registered and now - p.last_seen > ctl.heartbeat_timeout_s:
                    return (f"worker {p.rank} (pid {p.popen.pid}) sent no heartbeat for "
                            f"{now - p.last_seen:.0f}s (control.heartbeat_timeout_s = {ctl.heartbeat_timeout_s:g})")
            if len(exited_ok) == len(self.procs):
                return "finished" if self.finished else "stopped"

    def _drain(self, timeout_ms: int) -> None:
        """Handle the messages that arrive within ``timeout_ms`` (e.g. an error report sent just before exiting)."""
        end = time.monotonic() + timeout_ms / 1000
        while (left := end - time.monotonic()) > 0:
            got = self.channel.receive(int(left * 1000) + 1)
            if got is not None:
                self._handle(*got)
            if self._error is not None:
                return

    def _handle(self, identity: bytes, msg: dict) -> str | None:
        kind, rank = msg["type"], msg.get("rank")
        proc = next((p for p in self.procs if p.rank == (rank or 0) - self.place.node_rank * self.workers), None)
        if proc is None:
            log.warning("zo2 scheduler: a message from unknown rank %r ignored", rank)
            return None
        proc.last_seen = time.monotonic()
        if kind == "register":
            if msg.get("pid") != proc.popen.pid:
                log.warning("zo2 scheduler: rejected a registration for rank %s from pid %s (the worker is pid %s)",
                            rank, msg.get("pid"), proc.popen.pid)
                self.channel.send(identity, {"type": "rejected", "reason": "not a worker of this run"})
                return None
            proc.identity, proc.registered = identity, True
            self.channel.send(identity, {"type": "welcome", "heartbeat_s": self.job.control.heartbeat_s,
                                         "store": self.node.spec.to_json(), "start_step": self.done})
            if self.stop_requested:
                self.channel.send(identity, {"type": "stop"})
            return None
        if identity != proc.identity:
            return None  # a heartbeat socket: liveness only
        if kind == "step":
            self._generation_steps += 1
            self._on_step(msg["record"], msg["result"])
        elif kind == "eval":
            self._on_eval(msg)
        elif kind == "plan":
            self.node.note_pieces(msg["pieces"])
        elif kind == "sync":
            return self._on_sync(identity, msg)
        elif kind == "error":
            self._error = msg.get("message", "a worker reported an error")
        return None

    def _on_step(self, record: dict, result: dict) -> None:
        if not self.head:
            return
        if record["step"] != self.done:
            raise CheckpointError(f"Worker 0 reported step {record['step']} but the log expects step {self.done}.")
        self.log.append(record)
        self.done += 1
        r = SimpleNamespace(**result)
        self.window.add(r.loss, r.skipped, r.tokens)
        self.window.add_transfer(r)
        self.console.step(r.loss, self.window.tokens_per_s(), self.window.transfer_summary())
        every = self.job.train.log_every
        if self.done % every == 0 or self.done == self.job.train.steps:
            line = self.window.record(r, self.done)
            self.metrics.write(line)
            self.console.metrics(line)

    def _on_eval(self, msg: dict) -> None:
        values = {k: v for k, v in msg.items() if k not in ("type", "token", "rank", "step")}
        line = {"kind": "eval", "step": msg["step"], **values, "time": self.window.elapsed()}
        self.metrics.write(line)
        self.evals.append(line)
        if "eval_loss" in msg:
            self.console.log(f"step {msg['step']}: held-out loss {msg['eval_loss']:.4f}")
        else:
            metric = msg.get("metric", "")
            self.console.log(f"step {msg['step']}: {self.job.task.name} {metric} {msg.get('eval_' + metric, float('nan')):.4f}")

    def _on_sync(self, identity: bytes, msg: dict) -> str | None:
        step, reason = int(msg["step"]), msg["reason"]
        if self.head:
            stale = [u.name for k, u in enumerate(self.node.units)
                     if self.node.markers.torn(k) or any(a != step - 1 for a in self.node.markers.applied(k))]
            if stale:
                return f"the store is not current at the step-{step} sync point (units {stale[:3]})"
            if reason == "best":
                self._save_best(msg["best"])
            else:
                self._snapshot(step, msg.get("data"))
        if reason == "end":
            self.finished = True
        elif reason == "stop":
            self.stopped_at = step
        self.channel.send(identity, {"type": "continue"})
        return None

    def _save_best(self, best: dict) -> None:
        """The store holds the best weights so far (a task's metric): save them as ``best/`` + best.json."""
        from zo2.train.task_run import BEST_DIR, write_best
        from zo2.train.run_dir import save_model

        save_model(self.model, self.tokenizer, self.run_dir / BEST_DIR, engine=self.node)
        write_best(self.run_dir, best)
        self.console.log(f"step {best['step']}: best {best['metric']} so far ({best['value']:.4f}): saved to best/")

    def _snapshot(self, step: int, data: Any = None) -> None:
        from zo2.train.checkpoint import save_snapshot
        from zo2.train.run_dir import check_finite_weights

        if step == self.last_snapshot:
            return
        tensors = self.node.snapshot_tensors()  # views of the store and deferred NVMe reads: no second copy
        weights = set(tensors)
        tensors.update(self.node.state_tensors())  # a stateful optimizer's state, as of this sync point
        meta = {"data": data, "log_records": step}
        save_snapshot(self.run_dir, step, tensors, meta, keep_last=self.job.checkpoint.keep_last,
                      fsync=self.job.checkpoint.fsync,
                      check=lambda name, t: check_finite_weights({name: t}, step) if name in weights else None)
        self.last_snapshot = step

    def _recover(self, why: str) -> None:
        """Stop the group, bring the store to the last logged step, count the restart."""
        from zo2.train.checkpoint import latest_good_snapshot, read_log

        self._kill_workers()
        if self.place.nnodes > 1:
            raise WorkerFailure(f"{why}. In a multi-node job the scheduler does not restart a node alone: it stops, "
                                "and the job's requeue resumes every node from the run folder.")
        records = read_log(self.log_path)
        self.done = len(records)
        snap = latest_good_snapshot(self.run_dir, self.done, set_aside_corrupt=True)
        counts = self.node.bring_to(self.done - 1, records, snap, self._fill_base, self.device)
        self.recoveries.append({"why": why, "step": self.done, **counts})
        if self.stop_requested:
            self._snapshot(self.done)
            self.console.log(f"zo2: stopped at step {self.done} ({why}); the store was repaired from the log and "
                             "the snapshot written. Run the same command again to resume.")
            raise SystemExit(EXIT_STOPPED)
        self.restarts += 1
        limit = self.job.control.max_restarts
        if self.restarts > limit:
            raise WorkerFailure(f"{why}; the workers failed {self.restarts} times, more than control.max_restarts = "
                                f"{limit}. Everything up to step {self.done} is in {self.run_dir}: fix the cause and "
                                "run the same command again to resume.")
        self.console.log(f"zo2: {why}; restarting the workers at step {self.done} ({self.restarts} of {limit}; "
                         f"{counts['rebuilt']} unit(s) rebuilt from "
                         f"{'snapshot ' + str(snap.step) if snap else 'the base weights'} and the log, "
                         f"{counts['caught_up']} caught up)")

    def _on_checkpoint_signal(self, signum: int, frame: Any) -> None:
        """SIGUSR1: a snapshot at the next step boundary (the run goes on)."""
        self.checkpoint_requested = True
        if self.console is not None:
            self.console.log("zo2: SIGUSR1: writing a snapshot at the next step boundary")

    def _on_signal(self, signum: int, frame: Any) -> None:
        self.stop_requested = 2 if self.stop_requested else 1
        if self.console is not None:
            name = signal.Signals(signum).name
            self.console.log(f"zo2: {name}: stopping at the next step boundary (again: stop now)"
                             if self.stop_requested == 1 else f"zo2: {name} again: stopping the workers now")

    # ------------------------------------------------------------------ the end
    def _finish(self) -> int:
        from zo2.train.checkpoint import read_log
        from zo2.train.metrics import plot_loss
        from zo2.train.run_dir import FINAL_DIR, save_model
        from zo2.train.trainer import TrainSummary, describe_summary

        if self.head:
            self._snapshot(self.done)
            if self.job.run.save_final:
                save_model(self.model, self.tokenizer, self.run_dir / FINAL_DIR, engine=self.node)
            records = read_log(self.log_path)
            if self.job.run.plot and records:
                plot_loss(records, [e for e in self.evals if "eval_loss" in e], self.run_dir / "loss.png",
                          title=f"{self.job.preset}: {self.run_dir}")
            summary = TrainSummary(self.run_dir, self.done, sum(bool(r["skipped"]) for r in records),
                                   self.window.elapsed(), [float(r["loss"]) for r in records],
                                   [(int(e["step"]), float(e["eval_loss"])) for e in self.evals if "eval_loss" in e])
            self.console.close()
            self.console.log(describe_summary(summary) + (f"; {self.restarts} restart(s)" if self.restarts else ""))
        return 0

    def _announce(self, resume: bool) -> None:
        from zo2.config.presets import human_count

        m = self.job.model
        verb = f"resuming at step {self.done} of" if resume else "training"
        count = sum(p.numel() for p in self.model.parameters())
        self.console.log(f"zo2 launch: {verb} {self.job.train.steps} steps of {m.path or m.name} "
                         f"({human_count(count)} parameters) on {self.workers} worker(s) per node × "
                         f"{self.place.nnodes} node(s); node store {self.node.nbytes / 1e9:.2f} GB in shared memory"
                         + (f" + {self.node.nvme.nbytes / 1e9:.2f} GB on NVMe in {self.node.nvme.folder}"
                            if self.node.nvme is not None else "")
                         + (f" (and the worker's {self.node.base_on_nvme / 1e9:.2f} GB of base weights there)"
                            if self.node.base_on_nvme else "")
                         + (f" + {self.node.state_nbytes / 1e9:.2f} GB of {self.job.optim.optimizer} state"
                            if self.node.state is not None else "") + f"; run folder {self.run_dir}")

    def close(self) -> None:
        """Release everything, each part even when another fails (a full disk must not leave the node store in
        /dev/shm or the workers' config file behind)."""
        with contextlib.ExitStack() as cleanup:  # runs the callbacks in reverse order, every one of them
            if getattr(self, "channel", None) is not None:
                cleanup.callback(self._close_channel)
            if getattr(self, "config_path", None) is not None:
                cleanup.callback(self.config_path.unlink, missing_ok=True)
            if getattr(self, "node", None) is not None:
                cleanup.callback(self._close_node)
            cleanup.callback(remove_stale_stores)  # what killed workers made in /dev/shm (a PEFT base they shared)
            for closer in ("metrics", "log"):
                obj = getattr(self, closer, None)
                if obj is not None:
                    cleanup.callback(obj.close)
            if self.console is not None:
                cleanup.callback(self.console.close)

    def _close_node(self) -> None:
        self.node.close()
        self.node = None

    def _close_channel(self) -> None:
        self.rejected = self.channel.rejected
        self.channel.close()
        self.channel = None
