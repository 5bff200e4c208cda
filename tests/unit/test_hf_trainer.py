"""ZOTrainer: transformers.Trainer with the ZO engine underneath equals a plain engine run bit for bit."""

from __future__ import annotations

import json

import pytest
import torch

pytest.importorskip("accelerate", reason="transformers.Trainer needs accelerate (pip install -e '.[test]')")

from safetensors.torch import load_file  # noqa: E402
from transformers import TrainingArguments  # noqa: E402

from zo2 import ZOConfig, ZOEngine, ZOTrainer  # noqa: E402
from zo2.errors import ConfigError  # noqa: E402
from zo2.integrations.hf_trainer import ENGINE_FILE  # noqa: E402
from zo2_testing import assert_same_params, clone_model, padded_batch, tiny_model  # noqa: E402

ZO = dict(lr=1e-2, eps=1e-3, seed=5, weight_decay=0.01)


def rows(n: int = 8) -> list[dict[str, torch.Tensor]]:
    """A tiny in-memory dataset: rows of equal length with different padding."""
    batch = padded_batch(seed=3, batch=n)
    return [{k: v[i] for k, v in batch.items()} for i in range(n)]


def training_args(tmp_path, **overrides) -> TrainingArguments:
    kw = dict(output_dir=str(tmp_path), max_steps=3, per_device_train_batch_size=2, logging_steps=1, save_steps=2,
              report_to="none", use_cpu=True, disable_tqdm=True, seed=11)
    kw.update(overrides)
    return TrainingArguments(**kw)


def recording(trainer) -> list[dict[str, torch.Tensor]]:
    """Record the batches the trainer's engine steps on."""
    seen, step = [], trainer.engine.step

    def record(batch):
        seen.append({k: v.clone() for k, v in batch.items()})
        return step(batch)

    trainer.engine.step = record
    return seen


def plain_run(model, batches, **cfg) -> tuple[ZOEngine, list]:
    engine = ZOEngine(model, ZOConfig(**{**ZO, **cfg}))
    results = [engine.step(b) for b in batches]
    engine.flush()
    return engine, results


def test_trainer_run_equals_a_plain_engine_run_and_checkpoints_hold_flushed_weights(tmp_path):
    base = tiny_model("opt")
    model = clone_model(base)
    trainer = ZOTrainer(model=model, args=training_args(tmp_path), train_dataset=rows(), zo_config=ZOConfig(**ZO))
    seen = recording(trainer)
    out = trainer.train()
    assert out.global_step == 3 and len(seen) == 3
    trainer.engine.flush()

    reference, results = plain_run(clone_model(base), seen)
    assert_same_params(model, reference.model)
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert [h["projected_grad"] for h in logs] == [r.projected_grad for r in results]
    assert [h["loss"] for h in logs] == pytest.approx([r.loss for r in results], rel=1e-6)
    assert all(h["learning_rate"] == ZO["lr"] and "grad_norm" not in h for h in logs)

    # checkpoint-2 holds the weights after two updates (the second one deferred, flushed by the save)
    after_two, _ = plain_run(clone_model(base), seen[:2])
    saved = load_file(str(tmp_path / "checkpoint-2" / "model.safetensors"))
    params = dict(after_two.model.named_parameters())
    assert saved and all(torch.equal(t, params[n]) for n, t in saved.items())
    meta = json.loads((tmp_path / "checkpoint-2" / ENGINE_FILE).read_text())
    assert meta["state"] == {"step": 2} and meta["config"]["lr"] == ZO["lr"]


@pytest.mark.parametrize("optimizer", ["zo-sgd", "zo-adam"])
def test_resuming_from_a_checkpoint_continues_the_same_run(tmp_path, optimizer):
    base = tiny_model("opt")
    zo = {**ZO, "optimizer": optimizer}
    full = ZOTrainer(model=clone_model(base), args=training_args(tmp_path / "a"), train_dataset=rows(),
                     zo_config=ZOConfig(**zo))
    full.train()
    full.engine.flush()
    first = ZOTrainer(model=clone_model(base), args=training_args(tmp_path / "b", max_steps=2), train_dataset=rows(),
                      zo_config=ZOConfig(**zo))
    first.train()
    assert (tmp_path / "b" / "checkpoint-2" / "zo2_optimizer.safetensors").is_file() == (optimizer == "zo-adam")
    resumed = ZOTrainer(model=clone_model(base), args=training_args(tmp_path / "b"), train_dataset=rows(),
                        zo_config=ZOConfig(**zo))
    resumed.train(resume_from_checkpoint=str(tmp_path / "b" / "checkpoint-2"))
    resumed.engine.flush()
    assert resumed.engine.step_count == 3
    assert_same_params(resumed.model, full.model)


def test_lora_in_the_trainer_with_offload_saves_flushed_adapter_weights(tmp_path):
    peft = pytest.importorskip("peft", reason="peft is not installed")
    base = tiny_model("llama")
    models = []
    for _ in range(2):
        torch.manual_seed(1)
        models.append(peft.get_peft_model(clone_model(base), peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"],
                                                                               init_lora_weights="gaussian")))
    base_weights = {n: p.detach().clone() for n, p in models[0].named_parameters() if not p.requires_grad}
    trainer = ZOTrainer(model=models[0], args=training_args(tmp_path, save_steps=3),
                        train_dataset=rows(), zo_config=ZOConfig(**ZO, offload=True))
    assert trainer.engine.streamer.frozen is not None
    seen = recording(trainer)
    trainer.train()
    trainer.engine.flush()
    reference, _ = plain_run(models[1], seen)
    assert_same_params(models[0], models[1])
    assert all(torch.equal(p, base_weights[n]) for n, p in models[0].named_parameters() if not p.requires_grad)
    saved = load_file(str(tmp_path / "checkpoint-3" / "adapter_model.safetensors"))
    lora = {n: p for n, p in reference.params.items()}
    assert len(saved) == len(lora)
    for name, tensor in saved.items():  # PEFT saves without the adapter name ('.default')
        matches = [p for n, p in lora.items() if n.replace(".default", "") == name]
        assert len(matches) == 1 and torch.equal(tensor, matches[0]), name


def test_evaluate_runs_the_engine_forward(tmp_path):
    model = tiny_model("opt")
    data = rows(4)
    trainer = ZOTrainer(model=model, args=training_args(tmp_path, per_device_eval_batch_size=4), eval_dataset=data,
                        zo_config=ZOConfig(**ZO))
    metrics = trainer.evaluate()
    batch = {k: torch.stack([r[k] for r in data]) for k in data[0]}
    assert metrics["eval_loss"] == pytest.approx(trainer.engine.evaluate(batch).loss, rel=1e-6)


def test_zo_settings_map_from_training_arguments(tmp_path):
    args = training_args(tmp_path, learning_rate=1e-3, lr_scheduler_type="linear", warmup_steps=1, save_steps=100,
                         weight_decay=0.1)
    trainer = ZOTrainer(model=tiny_model("opt"), args=args, train_dataset=rows())
    trainer.train()
    config = trainer.engine.config
    assert (config.lr, config.seed, config.weight_decay) == (1e-3, 11, 0.1)
    assert (config.lr_schedule, config.warmup_steps, config.total_steps) == ("linear", 1, 3)
    logged = [h["learning_rate"] for h in trainer.state.log_history if "loss" in h]
    assert logged == pytest.approx([trainer.engine.lr_at(s) for s in range(3)])


@pytest.mark.parametrize("bad", [dict(gradient_accumulation_steps=2), dict(fp16=True)])
def test_unsupported_training_arguments_are_refused(tmp_path, bad):
    with pytest.raises(ConfigError):
        ZOTrainer(model=tiny_model("opt"), args=training_args(tmp_path, **bad), train_dataset=rows())


def test_an_optimizer_is_refused(tmp_path):
    model = tiny_model("opt")
    with pytest.raises(ConfigError, match="no optimizers"):
        ZOTrainer(model=model, args=training_args(tmp_path), train_dataset=rows(),
                  optimizers=(torch.optim.SGD(model.parameters(), lr=0.1), None))
