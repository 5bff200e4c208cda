"""zo2 train with the [peft] section: only the adapter trains, snapshots hold it, resume is exact."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

pytest.importorskip("peft", reason="the peft extra is not installed")

from zo2.config import load_config  # noqa: E402
from zo2.errors import ConfigError  # noqa: E402
from zo2.train.checkpoint import load_snapshot, snapshot_path  # noqa: E402
from zo2.train.run_dir import load_resume_config  # noqa: E402
from zo2.train.trainer import Trainer, train_job  # noqa: E402

BASE = ["train.steps=4", "checkpoint.save_every=2", "checkpoint.keep_last=5", "train.eval_batches=0",
        "run.plot=false", "checkpoint.fsync=false"]


def job(run_dir: Path, *extra: str):
    return load_config(overrides=[*BASE, f"run.out_dir={run_dir}", *extra])


@pytest.mark.parametrize("method, marker", [("lora", "lora_"), ("prefix", "prompt_encoder")])
def test_only_the_adapter_trains_and_resume_is_exact(tmp_path, method, marker):
    full = tmp_path / "full"
    trainer = Trainer(job(full, f"peft.method={method}"), quiet=True)
    base = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if not p.requires_grad}
    trainer.train()
    assert all(torch.equal(p, base[n]) for n, p in trainer.model.named_parameters() if n in base)
    tensors, _ = load_snapshot(snapshot_path(full, 4))
    assert tensors and all(marker in name for name in tensors)
    assert (full / "final" / "adapter_config.json").is_file()  # the adapter, loadable with peft
    part = tmp_path / "part"
    train_job(job(part, f"peft.method={method}", "train.steps=2"), quiet=True)
    train_job(load_resume_config(part, ["train.steps=4"]), resume=True, quiet=True)
    resumed, _ = load_snapshot(snapshot_path(part, 4))
    assert all(torch.equal(resumed[n], tensors[n]) for n in tensors)


@pytest.mark.parametrize("method, offload", [("lora", "false"), ("lora", "true"), ("prefix", "true")])
def test_peft_over_a_streamed_base_trains_as_over_the_base_in_memory(tmp_path, method, offload):
    """model.stream_load = 'always' with [peft]: the base is built on the meta device and its frozen weights stream
    from the checkpoint's shards; the run's snapshots equal the run over the base built in memory."""
    from zo2.train.build import special_token_ids
    from zo2.train.model import STREAMED, build_model
    from zo2.train.tokenizer import ByteTokenizer

    folder = tmp_path / "base"
    build_model(load_config().model, special_token_ids(ByteTokenizer())).save_pretrained(folder, max_shard_size="200KB")
    common = (f"peft.method={method}", f"model.path={folder}", f"optim.offload={offload}")
    runs = {}
    for load in ("never", "always"):
        run_dir = tmp_path / load
        trainer = Trainer(job(run_dir, *common, f"model.stream_load={load}"), quiet=True)
        assert getattr(trainer.model, STREAMED, False) == (load == "always")  # built on the meta device, filled
        trainer.train()
        runs[load], _ = load_snapshot(snapshot_path(run_dir, 4))
    assert runs["never"] and runs["never"].keys() == runs["always"].keys()
    assert all(torch.equal(runs["never"][n], runs["always"][n]) for n in runs["never"])


def test_a_misspelled_peft_method_is_refused_with_the_choices(tmp_path):
    with pytest.raises(ConfigError, match="peft.method"):
        job(tmp_path / "c", "peft.method=lorra")
