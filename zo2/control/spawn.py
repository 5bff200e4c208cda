"""Starting and stopping a node's worker processes (``python -m zo2.control.worker``) for the scheduler: where the
node sits in the job, the torch.distributed environment each worker gets (as torchrun sets it), and the bootstrap
that ties a worker's life to the scheduler's."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from zo2.config.job import JobConfig
from zo2.control.protocol import ENDPOINT_ENV, TOKEN_ENV
from zo2.control.worker import CONFIG_ENV, FAULT_ENV
from zo2.parallel.mesh import BIND_STORE_ENV


@dataclass
class NodePlace:
    """Where this scheduler's node sits in a multi-node job (defaults: a single node)."""

    nnodes: int = 1
    node_rank: int = 0
    master_addr: str = "127.0.0.1"
    master_port: int | None = None


WORKER_BOOTSTRAP = """\
import ctypes, os, sys
try:  # Linux: SIGKILL this worker when the scheduler dies, armed before the seconds of importing torch
    ctypes.CDLL(None, use_errno=True).prctl(1, 9)  # PR_SET_PDEATHSIG, SIGKILL
except (OSError, AttributeError):
    pass
if os.getppid() != int(os.environ["ZO2_SCHEDULER_PID"]):  # it died before the line above: nobody to work for
    sys.exit(3)
import runpy
runpy.run_module("zo2.control.worker", run_name="__main__", alter_sys=True)
"""
"""How the scheduler starts a worker (``python -c``): the parent-death signal is armed before anything is
imported (``import zo2`` takes seconds), so a scheduler killed at any moment never leaves workers behind."""


@dataclass
class WorkerProc:
    """A started worker and what the scheduler knows of it."""

    rank: int
    popen: subprocess.Popen
    started: float
    identity: bytes | None = None
    last_seen: float = 0.0
    registered: bool = False


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that is free on ``host`` now."""
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def worker_env(job: JobConfig, *, workers: int, place: NodePlace, endpoint: str, token: str, config_path: Path,
               run_dir: Path, device_type: str, fault: str | None = None) -> dict[str, str]:
    """The environment every worker of this node starts with (its rank is added by :func:`start_worker`):
    torch.distributed's variables, the scheduler's endpoint and token, the job's config file, and the threads of
    the node's cores each worker may use. ``fault``: a fault to inject (tests; None: none)."""
    from zo2.train.build import cpu_threads

    port = place.master_port or free_port()
    env_base = dict(os.environ)
    env_base.update({
        "WORLD_SIZE": str(workers * place.nnodes), "LOCAL_WORLD_SIZE": str(workers),
        "MASTER_ADDR": place.master_addr, "MASTER_PORT": str(port),
        ENDPOINT_ENV: endpoint, TOKEN_ENV: token,
        "ZO2_SCHEDULER_PID": str(os.getpid()),
        CONFIG_ENV: str(config_path), "ZO2_RUN_DIR": str(run_dir),
        "ZO2_START_TIMEOUT_S": str(job.control.start_timeout_s),
        "PYTHONUNBUFFERED": "1",
        BIND_STORE_ENV: "1",  # the workers' rendezvous store listens on --master-addr only, not everywhere
    })
    if place.nnodes == 1:
        env_base.setdefault("GLOO_SOCKET_IFNAME", "lo")
    # the node's cores shared by its workers (torch would start one thread per core in each of them)
    cores = max(1, (os.cpu_count() or 1) // workers)
    threads = cpu_threads(job, cores) if device_type == "cpu" else cores  # tiny models: one thread
    env_base.setdefault("OMP_NUM_THREADS", str(threads))
    env_base.pop(FAULT_ENV, None)
    if fault:
        env_base[FAULT_ENV] = fault
    return env_base


def start_worker(env_base: dict[str, str], local: int, workers: int, node_rank: int) -> WorkerProc:
    """Start worker ``local`` of this node (global rank ``node_rank × workers + local``) in its own session."""
    env = dict(env_base, RANK=str(node_rank * workers + local), LOCAL_RANK=str(local), GROUP_RANK=str(node_rank))
    popen = subprocess.Popen([sys.executable, "-c", WORKER_BOOTSTRAP], env=env,
                             start_new_session=True)  # a terminal's Ctrl-C reaches the scheduler only
    return WorkerProc(local, popen, time.monotonic())


def kill_workers(procs: list[WorkerProc]) -> None:
    """SIGKILL every worker still running (its whole session) and wait for all of them."""
    for p in procs:
        if p.popen.poll() is None:
            try:
                os.killpg(p.popen.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    for p in procs:
        p.popen.wait()
