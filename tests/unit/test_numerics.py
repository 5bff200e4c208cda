"""CPU math is the same in every process: a fresh process's first calls give what later calls give."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

import zo2
from zo2.numerics import _UNARY_OPS, settle_cpu_math
from zo2.optim.rng import direction

_SEED, _KEY, _NUMEL = 20261126, 7, 259 * 64  # the size of tiny-opt's embedding: z splits into 2+ threads' chunks

_CHILD = f"""
import torch, zo2
from zo2.optim.rng import direction
torch.set_num_threads(2)
torch.ones(1 << 20).add_(1.0)  # the thread pool runs before the first vector-math call, as in a worker
z = direction({_SEED}, {_KEY}, {_NUMEL})
x = torch.linspace(0.01, 6.0, 8192)
torch.save([z, torch.sqrt(x), torch.log(x), torch.sin(x), torch.cos(x)], __import__("sys").argv[1])
"""


def test_import_settles_every_vector_math_op_for_both_float_types():
    assert zo2.numerics._settled  # import zo2 did it
    zo2.numerics._settled = False
    called = settle_cpu_math()
    for op in ("sqrt", "log", "sin", "cos", "tanh", "erf", "exp"):  # z's Box-Muller and the models' forwards
        assert called.count(op) == 2
    assert set(called) <= set(_UNARY_OPS)
    assert settle_cpu_math() == []  # once per process


def test_fresh_processes_generate_the_directions_this_process_does(tmp_path):
    """oneMKL picks each function's kernel on its first call; racing threads could make a fresh process's first
    z differ by some ulps (seen as 1-ulp drift after a resumed run). Several fresh processes at once (the
    machine oversubscribed, as when a scheduler starts workers) must all agree with this process."""
    x = torch.linspace(0.01, 6.0, 8192)
    expected = [direction(_SEED, _KEY, _NUMEL), torch.sqrt(x), torch.log(x), torch.sin(x), torch.cos(x)]
    env = dict(os.environ, OMP_NUM_THREADS="2")
    outs = [tmp_path / f"child{i}.pt" for i in range(8)]
    procs = [subprocess.Popen([sys.executable, "-c", _CHILD, str(out)], env=env) for out in outs]
    assert all(p.wait(timeout=300) == 0 for p in procs)
    for out in outs:
        got = torch.load(out)
        for name, a, b in zip(("z", "sqrt", "log", "sin", "cos"), got, expected):
            assert torch.equal(a, b), f"{out.name}: first-call {name} differs from this process's"


def test_the_causal_lm_loss_scores_long_batches_in_chunks_of_tokens(monkeypatch):
    """Short batches: Hugging Face's loss to the bit; long ones (float32 logits over LOSS_CHUNK_BYTES): summed
    chunk by chunk, equal to the one-piece loss to float32 rounding, ignored labels still left out."""
    from zo2.models import base

    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 300, 500, generator=g).to(torch.bfloat16)
    labels = torch.randint(0, 500, (2, 300), generator=g)
    labels[0, 250:] = -100
    whole = torch.nn.functional.cross_entropy(logits[:, :-1].float().reshape(-1, 500), labels[:, 1:].reshape(-1),
                                              ignore_index=-100)
    assert torch.equal(base.causal_lm_loss(logits, labels), whole)
    monkeypatch.setattr(base, "LOSS_CHUNK_BYTES", 500 * 8 * 64)  # 64 tokens a chunk
    chunked = base.causal_lm_loss(logits, labels)
    assert chunked.item() == pytest.approx(whole.item(), rel=1e-6)
    labels[:, 100:] = -100  # a chunk with no scored token adds nothing
    ref = torch.nn.functional.cross_entropy(logits[:, :-1].float().reshape(-1, 500), labels[:, 1:].reshape(-1),
                                            ignore_index=-100)
    assert base.causal_lm_loss(logits, labels).item() == pytest.approx(ref.item(), rel=1e-6)
