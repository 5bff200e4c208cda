"""A worker: one per GPU (or N on a CPU machine), started by the scheduler as ``python -m zo2.control.worker``.

It maps the scheduler's node store, runs the steps (torch.distributed for the step's collectives, as under
torchrun), and reports to the scheduler: every step's trajectory-log record (rank 0), heartbeats, evaluations,
and at each sync point (snapshot, stop, end) that the store holds the current weights. It never writes the run
folder: the scheduler does. SIGINT/SIGTERM are ignored here: the scheduler receives them and asks the workers
to stop at a step boundary, so every worker stops at the same step.

Environment (set by the scheduler): the torch.distributed variables (RANK, WORLD_SIZE, LOCAL_RANK,
LOCAL_WORLD_SIZE, MASTER_ADDR, MASTER_PORT), ``ZO2_RUN_DIR``, ``ZO2_JOB_CONFIG``, ``ZO2_CONTROL_ENDPOINT``,
``ZO2_CONTROL_TOKEN``, ``ZO2_SCHEDULER_PID``. Registration is answered with the node store's spec (names, dtype,
layout digest) and the step to start at. ``ZO2_FAULT=RANK:STEP:UNIT`` (tests) makes that rank tear the
write-back of that unit in that step — half of it copied (for an NVMe-homed unit: half of its slice written into
the file version being replaced) — and kill itself with SIGKILL.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
from dataclasses import replace
from pathlib import Path
from typing import Any

import zmq

from zo2.control.protocol import ENDPOINT_ENV, TOKEN_ENV, WorkerLink
from zo2.control.store import StoreSpec
from zo2.offload.store import process_alive
from zo2.offload.pieces import PiecewiseResidence
from zo2.offload.tiered import FileHome
from zo2.errors import ZO2Error

FAULT_ENV = "ZO2_FAULT"
CONFIG_ENV = "ZO2_JOB_CONFIG"
"""The resolved job (TOML) the scheduler wrote for its workers."""


class Heartbeat(threading.Thread):
    """Sends ``heartbeat`` messages from its own socket every ``interval`` seconds while the process lives."""

    def __init__(self, endpoint: str, token: str, rank: int, interval: float):
        super().__init__(daemon=True, name="zo2-heartbeat")
        self.endpoint, self.token, self.rank, self.interval = endpoint, token, rank, interval
        self.step = 0
        self._stop_event = threading.Event()

    def run(self) -> None:
        scheduler = int(os.environ.get("ZO2_SCHEDULER_PID", "0"))
        link = WorkerLink(self.endpoint, self.token, self.rank)
        link.socket.setsockopt(zmq.LINGER, 0)  # never hold the process open
        while not self._stop_event.wait(self.interval):
            if scheduler and not _scheduler_alive(scheduler):  # the scheduler is gone: nobody logs or repairs; stop now
                print(f"zo2 worker {self.rank}: the scheduler (pid {scheduler}) is gone; exiting.", file=sys.stderr)
                os._exit(3)
            link.send({"type": "heartbeat", "step": self.step, "pid": os.getpid()})
        link.close()

    def stop(self) -> None:
        self._stop_event.set()


class Worker:
    """The compute side of a run under the scheduler."""

    def __init__(self, run_dir: Path, link: WorkerLink, start_step: int, spec: StoreSpec,
                 heartbeat: Heartbeat | None = None):
        from zo2.config.loader import load_saved_config
        from zo2.engine import ZOEngine
        from zo2.parallel.mesh import init_comm
        from zo2.train.build import build_data, build_guard, build_job_model, build_tokenizer, resolve_device
        from zo2.train.model import STREAMED, fill_weights
        from zo2.train.checkpoint import LOG_FILE, read_log
        from zo2.train.task_run import build_task_run, read_best

        self.run_dir, self.link, self.heartbeat = run_dir, link, heartbeat
        job = load_saved_config(Path(os.environ.get(CONFIG_ENV, run_dir / "config.toml")))
        if job.peft.method is None:
            # the weights come from the node store: build the module skeleton only, on the meta device
            job = replace(job, model=replace(job.model, stream_load="always"))
        # with [peft] the trained adapters come from the node store; the frozen base model is this worker's own
        self.job = job
        device = resolve_device(job.train.device)
        self.comm = init_comm(job.parallel, device)
        self.main = self.comm.rank == 0
        self.tokenizer = build_tokenizer(job)
        self.model = build_job_model(job, self.tokenizer)
        self.task = build_task_run(job, self.tokenizer, self.comm)
        if self.task is not None:  # a MeZO task: its loader and loss; evaluation scores its metric
            self.loader, self.eval_set = self.task.loader, []
        else:
            self.loader, self.eval_set = build_data(job, self.tokenizer, self.comm)
        optim = replace(job.optim, device=str(device), total_steps=job.optim.total_steps or job.train.steps)
        comm = self.comm if self.comm.world_size > 1 else None
        self.engine = ZOEngine(self.model, optim, comm=comm, store_spec=spec, offload_config=job.offload,
                               loss_fn=self.task.loss_fn if self.task is not None else None)
        self.engine.load_state_dict({"step": start_step})
        if self.comm.local_rank == 0:  # which units this node's workers write back a piece at a time (the repair)
            link.send({"type": "plan", "pieces": [u.home for u in self.engine.units
                                                  if isinstance(u.residence, PiecewiseResidence)]})
        if job.peft.method is not None and getattr(self.model, STREAMED, False):
            fill_weights(job.model, self.engine)  # the frozen base, from the shards (the adapter is the node's)
        self.guard = build_guard(job, f"zo2 launch ... -- --resume {run_dir}")
        self.best = read_best(run_dir) if self.task is not None else None
        self._stop = False
        self._checkpoint = False
        if start_step:
            records = read_log(run_dir / LOG_FILE)[:start_step]
            self.loader.seek(records[-1]["data"])
            self.guard.replay(records)
        self._arm_fault()

    # ------------------------------------------------------------------ the loop
    def run(self) -> None:
        from zo2.optim.estimators import Update
        from zo2.train.checkpoint import make_record

        engine, steps = self.engine, self.job.train.steps
        if engine.step_count == 0 and self._evaluates:
            self.evaluate()
        while engine.step_count < steps:
            batch = self.loader.next_batch()
            result = engine.step(batch)
            done = result.step + 1
            if self.heartbeat is not None:
                self.heartbeat.step = done
            if self.main:
                update = result.update or Update(result.step, (), (), result.lr)
                record = make_record(update, data=self.loader.position(), loss=result.loss,
                                     projected_grad=result.projected_grad, skipped=result.skipped,
                                     loss_plus=result.loss_plus, loss_minus=result.loss_minus)
                self.link.send({"type": "step", "record": record, "result": _measurements(result)})
            self._check_loss(result)
            self._poll_commands()
            stop, checkpoint = self.comm.any_flags(self._stop, self._checkpoint)
            if stop:
                self.sync(done, "stop")
                return
            every = self.job.parallel.checksum_every
            if self.comm.world_size > 1 and every and done % every == 0:
                self.comm.check_replicas(engine.checksum(), done)
            cfg = self.job
            if cfg.train.eval_every and done % cfg.train.eval_every == 0 and self._evaluates and done != steps:
                self.evaluate()
            if done != steps and (checkpoint or (cfg.checkpoint.save_every and done % cfg.checkpoint.save_every == 0)):
                self._checkpoint = False
                self.sync(done, "snapshot")
        if self._evaluates:
            self.evaluate()
        self.sync(engine.step_count, "end")

    @property
    def _evaluates(self) -> bool:
        return bool(self.eval_set) or self.task is not None

    def _poll_commands(self) -> None:
        """Note the scheduler's ``stop`` and ``checkpoint`` commands (acted on at this step boundary)."""
        message = self.link.receive(0)
        while message is not None:
            self._note(message)
            message = self.link.receive(0)

    def _note(self, message: dict) -> None:
        self._stop |= message.get("type") == "stop"
        self._checkpoint |= message.get("type") == "checkpoint"

    def _check_loss(self, result) -> None:
        """Stop on a NaN/inf streak or a blow-up (LossGuard): the error reaches the scheduler, which stops the run."""
        warning = self.guard.check(result.step, result.loss, result.skipped)
        if warning is not None and self.main:
            print(f"zo2: {warning}", file=sys.stderr)

    def evaluate(self) -> None:
        if self.task is not None:
            result = self.task.evaluate(self.engine, self.tokenizer)
            line = {"metric": self.task.metric, **{f"eval_{k}": v for k, v in result.items()}}
            value = float(result[self.task.metric])
            if self.best is None or value > self.best["value"]:  # every rank scores the same set alike
                self.best = {"step": self.engine.step_count, "metric": self.task.metric, "value": value}
                if self.main:
                    self.link.send({"type": "eval", "step": self.engine.step_count, **line})
                self.sync(self.engine.step_count, "best", best=self.best)  # the scheduler saves best/
                return
        else:
            losses = [self.engine.evaluate(batch).loss for batch in self.eval_set]
            line = {"eval_loss": sum(losses) / len(losses)}
        if self.main:
            self.link.send({"type": "eval", "step": self.engine.step_count, **line})

    def sync(self, done: int, reason: str, **extra: Any) -> None:
        """Every worker writes the store back (the scheduler may then snapshot it, or save it as the best
        weights); wait for the scheduler."""
        self.engine.sync_store()
        self.comm.barrier()
        if self.main:
            self.link.send({"type": "sync", "step": done, "reason": reason, "data": self.loader.position(), **extra})
            while True:
                reply = self.link.receive(None)
                if reply is not None and reply.get("type") == "continue":
                    break
                if reply is not None:
                    self._note(reply)
        self.comm.barrier()  # nobody touches the store before the snapshot is written

    def close(self) -> None:
        """End of the worker: its engine's I/O ends and its own files go (a PEFT base's, zo2.offload.nvme_frozen);
        the node's files are the scheduler's."""
        try:
            self.engine.close()
        finally:
            self.comm.close()

    # ------------------------------------------------------------------ fault injection (tests)
    def _arm_fault(self) -> None:
        spec = os.environ.get(FAULT_ENV)
        if not spec:
            return
        rank, step, unit = (int(x) for x in spec.split(":"))
        if rank != self.comm.rank:
            return
        residence = self.engine.units[unit].residence
        if isinstance(residence, FileHome):  # an NVMe-homed block, streamed whole or a matrix at a time
            _tear_nvme_write(residence, residence.index(self.engine.units[unit]), step)
            return
        streamer = self.engine.streamer
        original = streamer.write_back if streamer is not None else None
        pieces = getattr(getattr(streamer, "store", None), "pieces", None)  # one matrix at a time: (unit, lo, hi)
        seen: list[int] = []

        def torn_write_back(block: int, step_applied: int = -1) -> None:
            owner = block if pieces is None else pieces[block][0]
            if self.engine.step_count == step and owner == unit:
                seen.append(block)
                if pieces is not None and len(seen) < 2:  # a unit written a piece at a time: die after its first
                    return original(block, step_applied)
                streamer.markers.begin(block, streamer.writer, step_applied)
                rng = streamer._range(block)
                lo, hi = rng.start, rng.stop
                src = streamer.slots[streamer._slot_of[block]]
                mid = lo + (hi - lo) // 2
                streamer.store.flat(block)[lo:mid].copy_(src[lo:mid])  # half of the block lands...
                os.kill(os.getpid(), signal.SIGKILL)  # ...and the process dies mid-write
            original(block, step_applied)

        if streamer is not None:
            streamer.write_back = torn_write_back


def _tear_nvme_write(residence: Any, block: int, step: int) -> None:
    """Fault injection: the write-back of ``block`` (an NVMe residence's) holding step ``step`` − 1's update — the
    one a visit in step ``step`` sends home — writes half of this process's slice into the file version it
    replaces, then the process dies (SIGKILL) before the marker switches."""
    streamer, store = residence.streamer, residence.store
    original = store.write

    def torn_write(k: int, src: Any, step_applied: int) -> None:
        if k == block and step_applied == step - 1:
            version = "b" if store.current(k) == "a" else "a"
            data = src[: store.file_bytes(k) // 2].numpy().tobytes()  # src: the staging buffer's bytes
            with open(store.path(k, version), "r+b") as f:  # the marker still names the other version
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.kill(os.getpid(), signal.SIGKILL)
        original(k, src, step_applied)

    assert streamer.marks is not None, "an NVMe fault under the scheduler: the write is marked in flight first"
    store.write = torn_write


def _measurements(result: Any) -> dict[str, Any]:
    return {k: getattr(result, k) for k in ("step", "loss", "loss_plus", "loss_minus", "projected_grad", "lr",
                                             "skipped", "tokens", "seconds", "bytes_h2d", "bytes_d2h",
                                             "bytes_disk_read", "bytes_disk_written",
                                             "transfer_wait_ms", "replays", "peak_device_bytes")}


def _scheduler_alive(pid: int) -> bool:
    """The scheduler that started this worker still runs (once it died we are reparented: its pid may be reused)."""
    return process_alive(pid) and os.getppid() == pid


def _die_with_parent() -> None:
    """Linux: SIGKILL this worker when the scheduler that started it dies (the heartbeat thread checks too)."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def main() -> int:
    _die_with_parent()
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the scheduler coordinates stopping
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    endpoint, token = os.environ[ENDPOINT_ENV], os.environ[TOKEN_ENV]
    rank = int(os.environ.get("RANK", "0"))
    link = WorkerLink(endpoint, token, rank)
    link.send({"type": "register", "pid": os.getpid()})
    reply = link.receive(int(float(os.environ.get("ZO2_START_TIMEOUT_S", "300")) * 1000))
    if reply is None or reply.get("type") != "welcome":
        print(f"zo2 worker {rank}: the scheduler at {endpoint} did not accept this worker ({reply}).", file=sys.stderr)
        return 1
    heartbeat = Heartbeat(endpoint, token, rank, float(reply.get("heartbeat_s", 1.0)))
    heartbeat.start()
    worker = None
    try:
        spec = StoreSpec.from_json(reply["store"])  # registration answers with the node store's layout
        worker = Worker(Path(os.environ["ZO2_RUN_DIR"]), link, int(reply["start_step"]), spec, heartbeat)
        worker.run()
        return 0
    except ZO2Error as err:  # a problem a restart would only repeat: report it and stop
        link.send({"type": "error", "kind": type(err).__name__, "message": str(err)})
        return 2
    finally:
        heartbeat.stop()
        if worker is not None:
            worker.close()
        link.close()


if __name__ == "__main__":
    sys.exit(main())
