"""A PEFT model's frozen base weights on the NVMe tier (zo2.offload.nvme_frozen): the blocks past the host budget keep
their base weights in files, streamed with the block (by block) or a reader at a time (by matrix); the adapters
train bit for bit as resident; the loaders fill the files from a checkpoint's shards over a base built on the meta
device. CPU only: the "device" is the CPU and the files live in a temporary folder."""

from __future__ import annotations

import pytest
import torch

peft = pytest.importorskip("peft", reason="peft is not installed (pip install -e '.[test]' or '.[peft]')")

from zo2 import ZOConfig, ZOEngine  # noqa: E402
from zo2.config.offload import OffloadConfig  # noqa: E402
from zo2.config.peft import PeftConfig  # noqa: E402
from zo2.models.peft_adapter import apply_peft  # noqa: E402
from zo2.offload.loading import empty_model, load_safetensors  # noqa: E402
from zo2.offload.nvme_frozen import FrozenFiles  # noqa: E402
from zo2.offload.nvme_io import PAGE, round_up  # noqa: E402
from zo2.offload.tiers import staging_buffers  # noqa: E402
from zo2_testing import clone_model, padded_batch, tiny_model  # noqa: E402

CFG = dict(lr=1e-2, eps=1e-3, weight_decay=0.01, seed=21)
LAYERS = 6
LORA = PeftConfig(method="lora", r=4)


def lora(model, seed: int = 5):
    """LoRA on q and v with B away from zero, so the adapters' perturbation shows in the loss."""
    wrapped = apply_peft(model, LORA, "opt", seed=seed)
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, p in wrapped.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    return wrapped


def block_bytes(model) -> int:
    layers = model.get_base_model().model.decoder.layers
    return max(sum(p.numel() * p.element_size() for p in layer.parameters()) for layer in layers)


def tiered(model, folder, *, host_blocks: int, prefetch: int = 1, **cfg) -> ZOEngine:
    """Every block streamed, those past ``host_blocks`` homed on NVMe with their base weights."""
    b = block_bytes(model)
    budget = staging_buffers(prefetch) * round_up(b) + host_blocks * b + b // 2
    tiers = OffloadConfig(nvme_path=str(folder), host_memory_budget=budget, nvme_engine="threads",
                          nvme_queue_depth=3, nvme_block_size=PAGE)
    return ZOEngine(model, ZOConfig(offload=True, prefetch=prefetch, **CFG, **cfg), offload_config=tiers)


def frozen_files(engine: ZOEngine) -> FrozenFiles:
    return next(r.frozen_files for r in engine.residences if getattr(r, "frozen_files", None) is not None)


def adapters(engine: ZOEngine) -> dict[str, torch.Tensor]:
    return {n: t.cpu() for n, t in engine.trainable_state().items()}


@pytest.mark.parametrize("granularity", ["block", "matrix"])
@pytest.mark.parametrize("prefetch, k", [(1, 1), (3, 3)])
def test_lora_with_its_base_on_nvme_trains_as_resident_bit_for_bit(tmp_path, granularity, prefetch, k):
    base = tiny_model("opt", seed=3, num_hidden_layers=8)  # more than the staging buffers and 2.5 blocks
    resident = ZOEngine(lora(clone_model(base)), ZOConfig(offload=False, writeback_every=k, **CFG))
    on_disk = tiered(lora(clone_model(base)), tmp_path, host_blocks=2, prefetch=prefetch, writeback_every=k,
                     stream_granularity=granularity)
    assert on_disk.plan.host == [0, 1] and on_disk.plan.nvme == [2, 3, 4, 5, 6, 7]
    files = frozen_files(on_disk)
    plan = on_disk.plan  # the adapters are written back, the base weights only read
    assert 0 < plan.bytes_per_step_disk_written * 10 * k < plan.bytes_per_step_disk_read
    if granularity == "matrix":  # the host-homed and the NVMe-homed blocks share one ring each for both kinds
        nvme = next(r for r in on_disk.residences if getattr(r, "frozen_files", None) is not None)
        host = next(r for r in on_disk.residences if r is not nvme and getattr(r, "frozen", None) is not None)
        assert nvme.streamer.ring is on_disk.streamer.ring and nvme.frozen.streamer.ring is host.frozen.streamer.ring
        rings = [on_disk.streamer, host.frozen, nvme.streamer, nvme.frozen]
        assert on_disk.plan.slot_bytes == sum(r.device_bytes for r in rings)  # the plan counts one of each
    layer = on_disk.model.get_base_model().model.decoder.layers[3].fc1
    assert layer.weight.is_meta  # no host copy of an NVMe-homed block's base weights
    assert sorted(p.name for p in tmp_path.glob("frozen-*")) == sorted(  # one version each: written once, then read
        [f"frozen-{j}.a" for j in range(6)] + [f"frozen-{j}.json" for j in range(6)])
    for s in range(5):
        batch = padded_batch(seed=s)
        assert resident.step(batch).losses == on_disk.step(batch).losses, s
    on_disk.flush()
    a, b = adapters(resident), adapters(on_disk)
    assert a.keys() == b.keys() and all(torch.equal(a[n], b[n]) for n in a)
    assert files.bytes_read >= 5 * files.nbytes  # every step reads the NVMe-homed blocks' base weights
    assert layer.weight.is_meta


def test_base_weights_stream_from_the_shards_into_the_files_over_a_meta_base(tmp_path):
    """model.stream_load with LoRA and the NVMe tier: the base built on the meta device, its NVMe-homed blocks'
    frozen weights written from the checkpoint's shards straight into their files (the adapters keep their seeded
    init); the same steps as the base in memory, all resident."""
    reference = tiny_model("opt", seed=9, num_hidden_layers=LAYERS)
    reference.save_pretrained(tmp_path / "ckpt", max_shard_size="40KB")
    in_memory = ZOEngine(lora(clone_model(reference)), ZOConfig(offload=False, **CFG))
    model = lora(empty_model(reference.config, torch.float32))
    streamed = tiered(model, tmp_path / "nvme", host_blocks=1, stream_granularity="matrix")
    assert streamed.plan.nvme == [1, 2, 3, 4, 5]
    load_safetensors(streamed, tmp_path / "ckpt")
    for s in range(3):
        batch = padded_batch(seed=s)
        assert in_memory.step(batch).losses == streamed.step(batch).losses, s
    a, b = adapters(in_memory), adapters(streamed)
    assert a.keys() == b.keys() and all(torch.equal(a[n], b[n]) for n in a)


def test_the_host_holds_staging_buffers_not_the_base_weights(tmp_path):
    base = tiny_model("opt", seed=4, num_hidden_layers=LAYERS)
    engine = tiered(lora(clone_model(base)), tmp_path, host_blocks=0)
    files = frozen_files(engine)
    assert len(files.staging) == staging_buffers(1) and len(files) == LAYERS
    engine.step(padded_batch())
    engine.step(padded_batch(seed=1))
    held = {b for b in files._block_of if b is not None}
    assert len(held) <= staging_buffers(1)
    assert sum(s.numel() for s in files.staging) < files.nbytes  # a few blocks staged, never all


def test_several_processes_per_node_refuse_the_base_on_nvme_with_the_fix():
    from types import SimpleNamespace

    from zo2.errors import ConfigError
    from zo2.offload.nvme_frozen import frozen_files_for

    inputs = SimpleNamespace(tiers=SimpleNamespace(nvme_path="/nowhere"), config=SimpleNamespace(prefetch=1))
    with pytest.raises(ConfigError, match="one process per node.*host_memory_budget"):
        frozen_files_for(inputs, [["slot"]], torch.device("cpu"), single=False)


@pytest.mark.parametrize("method, granularity", [("lora", "block"), ("lora", "matrix"), ("prompt", "block")])
def test_zo2_train_with_its_base_on_nvme_saves_the_same_adapter(tmp_path, method, granularity):
    """zo2 train: snapshots, evaluations and final/ (the adapter in PEFT's format, LoRA's NVMe-homed tensors read
    from their files) equal the run with every block in host memory; the base weights' files are gone afterwards.
    Prompt tuning has nothing trainable in the blocks: only their weights' files."""
    from safetensors.torch import load_file

    from zo2.config import load_config
    from zo2.train.checkpoint import load_snapshot, snapshot_path
    from zo2.train.trainer import train_job

    common = [f"peft.method={method}", "train.steps=4", "train.eval_every=2", "optim.offload=true",
              "checkpoint.save_every=2", "train.device=cpu", f"optim.stream_granularity={granularity}"]
    runs = {}
    for name, extra in (("host", []), ("nvme", [f"offload.nvme_path={tmp_path / 'files'}",
                                                "offload.host_memory_budget=650000"])):
        train_job(load_config("tiny-opt", overrides=common + [f"run.out_dir={tmp_path / name}", *extra]), quiet=True)
        runs[name] = tmp_path / name
    units = 4 if method == "lora" else 0  # every block's adapters lived on NVMe
    assert len(list((tmp_path / "files").glob("unit-*.json"))) == units
    assert not list((tmp_path / "files").glob("frozen-*"))  # the base weights' files, removed at the end
    for folder in ("final", "best"):
        if (runs["host"] / folder).exists():
            a = load_file(str(runs["host"] / folder / "adapter_model.safetensors"))
            b = load_file(str(runs["nvme"] / folder / "adapter_model.safetensors"))
            assert a.keys() == b.keys() and a and all(torch.equal(a[n], b[n]) for n in a)
    (a, _), (b, _) = (load_snapshot(snapshot_path(runs[n], 4)) for n in ("host", "nvme"))
    assert a.keys() == b.keys() and all(torch.equal(a[n], b[n]) for n in a)


def test_a_lora_base_larger_than_its_host_budget_trains_in_bounded_host_memory(tmp_path):
    """24 fp32 blocks of ~12 MB built on the meta device, LoRA, a host budget of 5 blocks: building the engine,
    filling the base weights and two steps never hold the base (a copy of it would pass the bound many times)."""
    from transformers import AutoConfig

    from zo2.offload.loading import init_random
    from test_snapshot_stream import peak_growth

    config = AutoConfig.for_model("opt", vocab_size=128, hidden_size=512, num_hidden_layers=24, ffn_dim=2048,
                                  num_attention_heads=8, max_position_embeddings=64, word_embed_proj_dim=512,
                                  pad_token_id=0)
    block = (4 * 512 * 512 + 2 * 512 * 2048) * 4
    tiers = OffloadConfig(nvme_path=str(tmp_path / "nvme"), host_memory_budget=5 * block, nvme_engine="threads")
    grown: list[int] = []
    with peak_growth(grown):
        model = lora(empty_model(config, torch.float32))
        engine = ZOEngine(model, ZOConfig(offload=True, device="cpu", stream_granularity="matrix", **CFG),
                          offload_config=tiers)
        init_random(engine, seed=1)  # the base weights, straight into their files
        losses = [engine.step(padded_batch(seed=s, batch=2, length=8)).losses for s in range(2)]
    assert len(engine.plan.nvme) >= 21 and frozen_files(engine).nbytes > 20 * block * 0.9
    assert all(torch.isfinite(torch.tensor(x)).all() for x in losses) and losses[1][0] != losses[1][1]
    # the host budget (staging buffers, host-homed blocks), the "device" (the CPU here: embedding, head, rings,
    # working memory, as planned) and allocator slack
    bound = 5 * block + engine.plan.expected_peak + (64 << 20)
    assert bound < 24 * block * 0.5  # half the base
    assert grown[0] < bound, f"grew anonymous memory by {grown[0] / 1e6:.0f} MB; the bound is {bound / 1e6:.0f} MB"
    engine.close()
    assert not list((tmp_path / "nvme").glob("frozen-*"))


def whole_frozen(model, method: str):
    return apply_peft(model, PeftConfig(method=method, num_virtual_tokens=4), "opt", seed=5)


@pytest.mark.parametrize("granularity", ["block", "matrix"])
@pytest.mark.parametrize("method", ["prompt", "prefix"])
def test_whole_frozen_blocks_past_the_host_budget_stream_their_weights_from_files_bit_for_bit(tmp_path, method,
                                                                                             granularity):
    """Prompt and prefix tuning freeze whole blocks: those past the host budget keep their weights in files
    (frozen-<k>, read ahead into staging buffers) and stream with the host-homed blocks, never written back; the
    same losses and prompt as resident, every step reading the files; the files go when the engine closes."""
    base = tiny_model("opt", seed=3, num_hidden_layers=8)
    resident = ZOEngine(whole_frozen(clone_model(base), method), ZOConfig(offload=False, **CFG))
    on_disk = tiered(whole_frozen(clone_model(base), method), tmp_path, host_blocks=2,
                     stream_granularity=granularity)
    assert on_disk.plan.host == [0, 1] and on_disk.plan.nvme == [2, 3, 4, 5, 6, 7]
    files = frozen_files(on_disk)
    assert len(files) == 6 and sorted(p.name for p in tmp_path.glob("frozen-*.a")) == [
        f"frozen-{j}.a" for j in range(6)]
    assert not list(tmp_path.glob("unit-*"))  # nothing trainable on the disk: nothing written back
    plan = on_disk.plan
    assert plan.bytes_per_step_disk_written == plan.bytes_per_step_d2h == 0 < plan.bytes_per_step_disk_read
    layers = on_disk.model.get_base_model().model.decoder.layers
    assert layers[3].fc1.weight.is_meta and not layers[1].fc1.weight.is_meta  # no host copy past the budget
    for s in range(4):
        batch = padded_batch(seed=s)
        result = on_disk.step(batch)
        assert resident.step(batch).losses == result.losses, s
        assert result.bytes_disk_read >= files.nbytes and result.bytes_disk_written == 0  # the step's own count
    on_disk.flush()
    a, b = adapters(resident), adapters(on_disk)
    assert a.keys() == b.keys() and a and all(torch.equal(a[n], b[n]) for n in a)
    assert files.bytes_read >= 4 * files.nbytes  # every step reads the NVMe-homed blocks' weights
    on_disk.close()
    assert not list(tmp_path.glob("frozen-*"))


def test_whole_frozen_blocks_stream_from_the_shards_into_their_files_over_a_meta_base(tmp_path):
    """model.stream_load with prompt tuning and the NVMe tier: the NVMe-homed blocks' weights written from the
    checkpoint's shards straight into their files; the same steps as the base in memory, all resident."""
    reference = tiny_model("opt", seed=9, num_hidden_layers=LAYERS)
    reference.save_pretrained(tmp_path / "ckpt", max_shard_size="40KB")
    in_memory = ZOEngine(whole_frozen(clone_model(reference), "prompt"), ZOConfig(offload=False, **CFG))
    streamed = tiered(whole_frozen(empty_model(reference.config, torch.float32), "prompt"), tmp_path / "nvme",
                      host_blocks=2)
    assert streamed.plan.nvme == [2, 3, 4, 5]
    load_safetensors(streamed, tmp_path / "ckpt")
    for s in range(3):
        batch = padded_batch(seed=s)
        assert in_memory.step(batch).losses == streamed.step(batch).losses, s


def test_the_folders_owner_removes_base_files_a_killed_process_left(tmp_path):
    """zo2 launch: a worker killed last leaves its base weights' files; the scheduler removes them when it closes,
    and nothing else."""
    from zo2.offload.nvme_frozen import remove_frozen_files

    for name in ("frozen-0.a", "frozen-0.json", "frozen-12.a", "frozen-12.json", "zo2-node-1-ab-unit3-w0.a",
                 "frozen-notes.txt"):
        (tmp_path / name).write_bytes(b"x")
    remove_frozen_files(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["frozen-notes.txt", "zo2-node-1-ab-unit3-w0.a"]
