"""Shared test helpers: tiny random models of each family and padded batches."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

VOCAB = 128

TINY_CONFIGS = {
    "opt": dict(model_type="opt", vocab_size=VOCAB, hidden_size=32, num_hidden_layers=3, ffn_dim=64,
                num_attention_heads=4, max_position_embeddings=64, word_embed_proj_dim=32,
                dropout=0.1, attention_dropout=0.1, pad_token_id=0),
    "llama": dict(model_type="llama", vocab_size=VOCAB, hidden_size=32, num_hidden_layers=3, intermediate_size=64,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, pad_token_id=0,
                  tie_word_embeddings=False),
    "qwen3": dict(model_type="qwen3", vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, intermediate_size=64,
                  num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=64,
                  pad_token_id=0, tie_word_embeddings=True),
    "gpt2": dict(model_type="gpt2", vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=64,
                 resid_pdrop=0.1, embd_pdrop=0.1, attn_pdrop=0.1),
}


def tiny_model(family: str = "opt", seed: int = 0, dtype: torch.dtype = torch.float32, **overrides):
    """A tiny random model of ``family``, built from a config (no hub), deterministic for ``seed``."""
    cfg = dict(TINY_CONFIGS[family])
    model_type = cfg.pop("model_type")
    cfg.update(overrides)
    config = AutoConfig.for_model(model_type, **cfg)
    config._attn_implementation = "eager"
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config).to(dtype)


def padded_batch(seed: int = 0, batch: int = 3, length: int = 12, vocab: int = VOCAB) -> dict[str, torch.Tensor]:
    """A right-padded batch with different lengths; labels are -100 on padding."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (batch, length), generator=g)
    mask = torch.ones(batch, length, dtype=torch.long)
    for row in range(1, batch):
        mask[row, length - 2 * row:] = 0
    ids = ids.masked_fill(mask == 0, 0)
    labels = ids.masked_fill(mask == 0, -100)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def clone_model(model):
    import copy

    return copy.deepcopy(model)


def assert_same_params(a, b) -> None:
    """Bit-for-bit equality of all parameters of two models (compared on the CPU: a streamed model's parameters
    live in host memory, a resident one's on the device)."""
    pa, pb = dict(a.named_parameters()), dict(b.named_parameters())
    assert pa.keys() == pb.keys()
    for name in pa:
        x, y = pa[name].detach().cpu(), pb[name].detach().cpu()
        assert torch.equal(x, y), f"{name} differs (max {(x - y).abs().max()})"


gpu_test = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def assert_same_tensors(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    """The same names, each tensor equal bit for bit."""
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name


def logged(run_dir) -> list[tuple]:
    """A run folder's trajectory log as (step, seeds, coefficients, lr, loss) records."""
    from zo2.train.checkpoint import read_log

    return [(r["step"], r["seeds"], r["coeffs"], r["lr"], r["loss"]) for r in read_log(os.path.join(run_dir,
                                                                                              "trajectory.jsonl"))]


def fill_disk_after(run_dir, steps: int, disk):
    """A thread that, once ``run_dir``'s trajectory log holds ``steps`` lines, fills the file system of ``disk``
    (a small tmpfs) with a filler file: the next write there fails with ENOSPC, as on a full disk."""
    import threading
    import time
    from pathlib import Path

    def fill() -> None:
        log = Path(run_dir) / "trajectory.jsonl"
        end = time.monotonic() + 300
        while time.monotonic() < end:
            if log.exists() and log.read_bytes().count(b"\n") >= steps:
                break
            time.sleep(0.01)
        with open(Path(disk) / "filler", "wb") as f:
            try:
                while True:
                    f.write(b"\0" * (1 << 16))
                    f.flush()
            except OSError:
                pass

    thread = threading.Thread(target=fill, daemon=True)
    thread.start()
    return thread
