"""What the control plane costs per step: the same job under `zo2 train` (one process) and under the scheduler
(`zo2 launch`: a scheduler + N workers, ZeroMQ step reports, the log written by the scheduler), side by side.

Per-step time is measured from metrics.jsonl (one line per step; the slope of its elapsed-time column after
the first steps), so start-up (imports, building the store, spawning workers) is reported separately. Also
times a worker restart: a worker killed with SIGKILL mid-run, repaired and restarted (the extra wall time over
the undisturbed scheduler run). Prints a table and writes JSON.

    python benchmarks/bench_control.py --steps 60 --workers 1 2
    python benchmarks/bench_control.py --optimizer zo-adam --workers 1   # state area, rebuild-from-snapshot repairs
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(__file__))

from bench_common import environment, print_table, write_json  # noqa: E402
from zo2.config import load_config  # noqa: E402
from zo2.control.scheduler import Scheduler  # noqa: E402
from zo2.train.checkpoint import read_log  # noqa: E402
from zo2.train.trainer import train_job  # noqa: E402


def job(run_dir: Path, steps: int, *extra: str):
    return load_config(overrides=[f"train.steps={steps}", "train.log_every=1", "train.eval_batches=0",
                                  "run.plot=false", "run.save_final=false", "checkpoint.save_every=0",
                                  f"run.out_dir={run_dir}", *extra])


def per_step_ms(run_dir: Path, skip: int = 5) -> float:
    times = [r["time"] for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())
             if r["kind"] == "train"]
    times = times[skip:]
    return 1e3 * (times[-1] - times[0]) / max(len(times) - 1, 1)


def kill_after(steps: int):
    def action(sched: Scheduler) -> None:
        log = sched.run_dir / "trajectory.jsonl"
        while not (log.exists() and len(read_log(log)) >= steps):
            time.sleep(0.02)
        os.kill(sched.procs[0].popen.pid, signal.SIGKILL)
    return action


def run(kind: str, root: Path, steps: int, workers: int = 1, action=None, optimizer: str = "zo-sgd") -> dict:
    run_dir = root / f"{kind}-{workers}"
    extra = ([f"parallel.pp={workers}"] if workers > 1 else []) + [f"optim.optimizer={optimizer}"]
    start = time.perf_counter()
    if kind == "train":
        train_job(job(run_dir, steps, *extra, "optim.offload=true"), quiet=True)
        restarts = 0
    else:
        sched = Scheduler(job(run_dir, steps, *extra, "optim.offload=true"), workers=workers, quiet=True)
        if action is not None:
            threading.Thread(target=action, args=(sched,), daemon=True).start()
        sched.run()
        restarts = sched.restarts
    wall = time.perf_counter() - start
    return {"mode": kind, "workers": workers, "steps": steps, "step_ms": per_step_ms(run_dir), "wall_s": wall,
            "restarts": restarts}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--workers", type=int, nargs="*", default=[1, 2])
    p.add_argument("--optimizer", default="zo-sgd", help="optim.optimizer of every run (zo-adam: one worker)")
    p.add_argument("--out", default="benchmarks/out/control.json")
    args = p.parse_args()
    root = Path(tempfile.mkdtemp(prefix="zo2-control-bench-"))
    rows = [run("train", root, args.steps, optimizer=args.optimizer)]
    rows[0]["mode"] = "zo2 train"
    for n in args.workers:
        rows.append(run("launch", root, args.steps, n, optimizer=args.optimizer))
        rows[-1]["mode"] = "zo2 launch"
    killed = run("launch", root / "killed", args.steps, 1, kill_after(args.steps // 2), optimizer=args.optimizer)
    killed["mode"] = "zo2 launch, kill -9 mid-run"
    rows.append(killed)
    base = rows[1]["wall_s"]
    for r in rows:
        r["step_vs_train"] = r["step_ms"] / rows[0]["step_ms"]
    killed["restart_cost_s"] = killed["wall_s"] - base
    print_table(rows, [("mode", "mode", "s"), ("workers", "workers", "d"), ("steps", "steps", "d"),
                       ("step_ms", "ms/step", ".1f"), ("step_vs_train", "vs zo2 train", ".2f"),
                       ("wall_s", "wall s (with start-up)", ".1f"), ("restarts", "restarts", "d")])
    print(f"optimizer {args.optimizer}; restart after kill -9 (repair + new worker start-up): "
          f"{killed['restart_cost_s']:.1f} s")
    write_json(args.out, {"benchmark": "control", "optimizer": args.optimizer, "env": environment(), "rows": rows})


if __name__ == "__main__":
    main()
