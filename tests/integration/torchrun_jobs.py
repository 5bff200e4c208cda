"""Run several zo2 training jobs in turn inside one torch.distributed group (a helper the torchrun tests start).

    torchrun --nproc-per-node N tests/integration/torchrun_jobs.py CASES.json OUT_DIR

CASES.json is a list of {"name": str, "sets": [SECTION.KEY=VALUE, ...], "fail_rank": int?, "fail_step": int?}.
Every rank trains each case with `zo2.train.trainer.train_job` (the group is started here once, so the cases share
it); rank 0 prints one JSON line per case: {"case", "ok", "error"}. "fail_rank"/"fail_step" make that rank raise
an error before the given step, as a rank that leaves the loop early would. Started without torchrun (the
environment variables RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT set by the caller) it does the same, with no
agent to stop the other ranks: what they do on their own is then visible.
"""

from __future__ import annotations

import datetime
import json
import os
import sys
import traceback
from pathlib import Path


class InjectedFailure(RuntimeError):
    """The error a case asks one rank to raise."""


def main(cases_file: str, out_dir: str) -> int:
    import torch.distributed as dist

    from zo2.config import load_config
    from zo2.train import trainer as trainer_mod

    timeout = float(os.environ.get("ZO2_TEST_TIMEOUT_S", "120"))
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=timeout))
    rank = dist.get_rank()
    cases = json.loads(Path(cases_file).read_text())
    status = 0
    original_step = trainer_mod.Trainer.train_step
    for case in cases:
        run_dir = Path(out_dir) / case["name"]
        fail_rank, fail_step = case.get("fail_rank"), case.get("fail_step")

        def train_step(self, _orig=original_step, _fail=(fail_rank, fail_step)):
            if _fail[0] == rank and self.engine.step_count == _fail[1]:
                raise InjectedFailure(f"rank {rank} leaves the loop before step {_fail[1]}")
            return _orig(self)

        trainer_mod.Trainer.train_step = train_step
        try:
            job = load_config(overrides=[*case["sets"], f"run.out_dir={run_dir}"])
            trainer_mod.train_job(job, quiet=True)
            result = {"case": case["name"], "rank": rank, "ok": True, "error": None}
        except Exception as exc:  # noqa: BLE001 (reported to the test, which decides)
            result = {"case": case["name"], "rank": rank, "ok": False,
                      "error": f"{type(exc).__name__}: {exc}", "trace": traceback.format_exc()[-3000:]}
            status = 1
        if rank == 0 or not result["ok"]:
            print(json.dumps(result), flush=True)
        if not result["ok"]:
            break  # the group may be broken: stop here, as a real run would
    trainer_mod.Trainer.train_step = original_step
    if status == 0:
        dist.destroy_process_group()
    return status


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], sys.argv[2]))
