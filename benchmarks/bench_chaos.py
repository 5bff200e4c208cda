"""Fault trials for the control plane: N random trials of each fault kind under `zo2 launch`, each compared bit for
bit with the uninterrupted run of the same job. Prints a table (kind, trials, identical, stopped with a clear
error, different) and writes JSON; exits 1 if any trial ended different. Not part of the default test run
(tests/integration/test_control.py tests each fault once, and runs this script with one trial of each kind as a
slow test).

Kinds (every trial picks its step, and for kill9 its worker, at random from --seed):
  kill9     SIGKILL a worker mid-run: the scheduler repairs the store from the log and restarts the workers
  sigstop   SIGSTOP a worker (a hang): missed heartbeats, then the same repair
  torn      a worker dies halfway through a write-back (ZO2_FAULT): the torn slice is rebuilt from a snapshot + log
  sigterm   SIGTERM the scheduler: snapshot at a step boundary, exit; the same command resumes
  corrupt   truncate the newest snapshot after a stop, resume: it is set aside, an older one + the log rebuild
  tornlog   after a stop, part of one more log line (a crash mid-append), resume: the torn line is dropped
  junk      bad messages to the scheduler's port mid-run (deep nesting, junk, oversized): ignored

    python benchmarks/bench_chaos.py --trials 3                     # every kind, 3 trials each (~10 min on 2 cores)
    python benchmarks/bench_chaos.py --kinds kill9,torn --trials 5 --workers 2 --out benchmarks/out/chaos.json
"""

from __future__ import annotations

import argparse
import os
import random
import signal
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(__file__))

import torch  # noqa: E402

from bench_common import environment, print_table, write_json  # noqa: E402
from zo2.config import load_config  # noqa: E402
from zo2.control.scheduler import Scheduler  # noqa: E402
from zo2.errors import ZO2Error  # noqa: E402
from zo2.train.checkpoint import list_snapshots, load_snapshot, read_log, snapshot_path  # noqa: E402

KINDS = ("kill9", "sigstop", "torn", "sigterm", "corrupt", "tornlog", "junk")
STEPS = 10


def job(run_dir: Path, workers: int, *extra: str):
    return load_config(overrides=[
        f"train.steps={STEPS}", "data.batch_size=2", "data.max_length=32", "optim.offload=true",
        "checkpoint.save_every=3", "checkpoint.keep_last=5", "train.eval_batches=0", "run.plot=false",
        "run.save_final=false", "checkpoint.fsync=false", "control.heartbeat_s=0.2", "control.heartbeat_timeout_s=4",
        f"run.out_dir={run_dir}", *([f"parallel.pp={workers}"] if workers > 1 else []), *extra])


def outcome(run_dir: Path) -> tuple[list, dict[str, torch.Tensor]]:
    records = [(r["step"], r["seeds"], r["coeffs"], r["lr"], r["loss"]) for r in read_log(run_dir / "trajectory.jsonl")]
    tensors, _ = load_snapshot(snapshot_path(run_dir, STEPS))
    return records, tensors


def wait_steps(run_dir: Path, n: int, timeout: float = 300) -> None:
    log, end = run_dir / "trajectory.jsonl", time.monotonic() + timeout
    while time.monotonic() < end:
        if log.exists() and len(read_log(log)) >= n:
            return
        time.sleep(0.02)
    raise TimeoutError(f"the run did not reach step {n}")


def run_scheduler(run_dir: Path, workers: int, action=None, fault: str | None = None, **kw) -> int:
    sched = Scheduler(job(run_dir, workers), workers=workers, quiet=True, fault=fault, **kw)
    if action is not None:
        threading.Thread(target=action, args=(sched,), daemon=True).start()
    return sched.run()


def trial(kind: str, run_dir: Path, workers: int, rng: random.Random) -> str:
    """Run one trial; 'identical', 'error: ...' (stopped with a clear error) or 'different'."""
    at = rng.randint(2, STEPS - 2)
    try:
        if kind in ("kill9", "sigstop"):
            sig = signal.SIGKILL if kind == "kill9" else signal.SIGSTOP
            victim = rng.randrange(workers)

            def hit(sched: Scheduler) -> None:
                wait_steps(run_dir, at)
                os.kill(sched.procs[victim].popen.pid, sig)
            run_scheduler(run_dir, workers, action=hit)
        elif kind == "torn":
            run_scheduler(run_dir, workers, fault=f"{rng.randrange(workers)}:{at}:{rng.randint(1, 3)}")
        elif kind in ("sigterm", "corrupt", "tornlog"):
            def stop(sched: Scheduler) -> None:
                wait_steps(run_dir, at)
                sched._on_signal(signal.SIGTERM, None)  # what the scheduler's SIGTERM handler does
            run_scheduler(run_dir, workers, action=stop)
            if kind == "corrupt" and list_snapshots(run_dir):
                newest = list_snapshots(run_dir)[-1]
                newest.write_bytes(newest.read_bytes()[: rng.randint(1, newest.stat().st_size - 1)])
            if kind == "tornlog":  # a crash while appending the next record: half a line after the last one
                log = run_dir / "trajectory.jsonl"
                data = log.read_bytes()
                last = data[data.rstrip(b"\n").rfind(b"\n") + 1:]
                with open(log, "ab") as f:
                    f.write(last[: rng.randint(1, len(last) - 2)])
            run_scheduler(run_dir, workers, resume=True)
        elif kind == "junk":
            import zmq

            def intrude(sched: Scheduler) -> None:
                wait_steps(run_dir, at)
                ctx = zmq.Context()
                sock = ctx.socket(zmq.DEALER)
                sock.setsockopt(zmq.LINGER, 500)
                sock.connect(sched.channel.endpoint)
                for payload in (b"[" * 4000, b"{}", b'{"type": "step", "token": "x"}', os.urandom(256),
                                b"x" * (2 << 20)):
                    sock.send(payload)
                sock.close()
                ctx.term()
            run_scheduler(run_dir, workers, action=intrude)
        else:
            raise ValueError(kind)
    except ZO2Error as exc:
        return f"error: {str(exc)[:120]}"
    return "done"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--kinds", default=",".join(KINDS), help=f"comma-separated, of {', '.join(KINDS)}")
    parser.add_argument("--trials", type=int, default=3, help="trials of each kind")
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="benchmarks/out/chaos.json")
    args = parser.parse_args()
    kinds = [k for k in args.kinds.split(",") if k]
    unknown = set(kinds) - set(KINDS)
    if unknown:
        parser.error(f"unknown kinds {sorted(unknown)}; choose from {', '.join(KINDS)}")
    rng = random.Random(args.seed)
    root = Path(tempfile.mkdtemp(prefix="zo2-chaos-"))
    reference_dir = root / "reference"
    run_scheduler(reference_dir, args.workers)
    reference = outcome(reference_dir)
    rows, trials = [], []
    for kind in kinds:
        counts = {"identical": 0, "clear error": 0, "different": 0}
        for i in range(args.trials):
            run_dir = root / f"{kind}-{i}"
            started = time.perf_counter()
            result = trial(kind, run_dir, args.workers, rng)
            if result == "done":
                records, tensors = outcome(run_dir)
                same = records == reference[0] and tensors.keys() == reference[1].keys() and all(
                    torch.equal(tensors[k], reference[1][k]) for k in tensors)
                result = "identical" if same else "different"
            key = "clear error" if result.startswith("error") else result
            counts[key] += 1
            trials.append({"kind": kind, "trial": i, "result": result, "seconds": time.perf_counter() - started})
            print(f"{kind} #{i}: {result}", flush=True)
        rows.append({"kind": kind, "trials": args.trials, **counts})
    print_table(rows, [(k, k, "") for k in ("kind", "trials", "identical", "clear error", "different")])
    write_json(args.out, {"environment": environment(), "workers": args.workers, "seed": args.seed, "steps": STEPS,
                          "summary": rows, "trials": trials})
    return 0 if all(r["different"] == 0 for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
