"""Job config: presets, TOML + --set layering, validation messages, round trips, parameter counts, model building."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch

from zo2.config import (JobConfig, describe_config, get_preset, job_from_dict, job_to_dict, load_config,
                        load_saved_config, parameter_count, preset_names, to_toml)
from zo2.errors import ConfigError, ModelError
from zo2.train.model import build_model, hf_config

REPO = Path(__file__).resolve().parents[2]


# ----------------------------------------------------------------------------------------------------------
# Layers: preset -> TOML -> --set
# ----------------------------------------------------------------------------------------------------------

def test_default_job_is_tiny_opt():
    job = load_config()
    assert job.preset == "tiny-opt"
    assert job.model.family == "opt" and job.model.path is None
    assert job.model.vocab_size >= 259 and job.model.max_positions >= 128
    assert job.run.out_dir == "runs/default"


def test_set_overrides_parse_toml_literals():
    job = load_config(overrides=["optim.lr=1e-3", "train.steps=7", "run.plot=false", "model.path=none",
                                 'data.verbalizer=[" no", " yes"]', "train.device=cpu"])
    assert job.optim.lr == 1e-3 and job.train.steps == 7 and job.run.plot is False
    assert job.data.verbalizer == [" no", " yes"] and job.train.device == "cpu"


def test_string_field_keeps_text_that_reads_as_a_number():
    assert load_config(overrides=["model.path=2024"]).model.path == "2024"


def test_int_widens_to_float():
    job = load_config(overrides=["optim.lr=1"])
    assert job.optim.lr == 1.0 and isinstance(job.optim.lr, float)


def test_toml_file_on_top_of_its_preset(tmp_path):
    path = tmp_path / "job.toml"
    path.write_text('preset = "tiny-llama"\n[optim]\nlr = 0.02\n[train]\nsteps = 9\n')
    job = load_config(path=path, overrides=["train.steps=11"])
    assert job.preset == "tiny-llama" and job.model.family == "llama"
    assert job.optim.lr == 0.02 and job.train.steps == 11  # --set wins over the file


def test_cli_preset_wins_over_file_preset(tmp_path):
    path = tmp_path / "job.toml"
    path.write_text('preset = "tiny-llama"\n')
    assert load_config("tiny-gpt2", path).model.family == "gpt2"


def test_schedule_gets_total_steps_from_train_steps():
    job = load_config(overrides=["optim.lr_schedule=cosine", "train.steps=50"])
    assert job.optim.total_steps == 50


# ----------------------------------------------------------------------------------------------------------
# Errors name the problem and the fix
# ----------------------------------------------------------------------------------------------------------

def test_unknown_key_did_you_mean():
    with pytest.raises(ConfigError, match=r"optim\.lrr.*Did you mean 'lr'"):
        load_config(overrides=["optim.lrr=1e-3"])


def test_key_in_another_section_is_pointed_to():
    with pytest.raises(ConfigError, match=r"train\.steps"):
        load_config(overrides=["optim.steps=10"])


def test_unknown_section_did_you_mean():
    with pytest.raises(ConfigError, match=r"\[optimizer\].*Did you mean 'optim'"):
        load_config(overrides=["optimizer.lr=1e-3"])


def test_unknown_key_in_toml_file_names_the_file(tmp_path):
    path = tmp_path / "bad.toml"
    path.write_text("[train]\nstepz = 3\n")
    with pytest.raises(ConfigError, match=r"train\.stepz in .*bad\.toml.*Did you mean 'steps'"):
        load_config(path=path)


def test_type_mismatch_is_named():
    with pytest.raises(ConfigError, match=r"train\.steps expects an integer"):
        load_config(overrides=["train.steps=four"])
    with pytest.raises(ConfigError, match=r"run\.plot expects a boolean"):
        load_config(overrides=["run.plot=3"])


@pytest.mark.parametrize("item, field", [("optim.lr=-1", "optim.lr"), ("optim.eps=0", "optim.eps"),
                                         ("train.steps=0", "train.steps"), ("model.dtype=fp8", "model.dtype"),
                                         ("model.num_heads=5", "model.num_heads"),
                                         ("model.num_kv_heads=2", "model.num_kv_heads"),
                                         ("train.device=gpu", "train.device"),
                                         ("offload.host_memory_budget=lots", "offload.host_memory_budget"),
                                         ("offload.host_memory_budget=0", "offload.host_memory_budget"),
                                         ("offload.nvme_engine=uring", "offload.nvme_engine"),
                                         ("offload.nvme_queue_depth=0", "offload.nvme_queue_depth"),
                                         ("offload.nvme_block_size=512", "offload.nvme_block_size"),
                                         ("offload.nvme_path=' '", "offload.nvme_path")])
def test_impossible_values_name_the_field(item, field):
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        load_config(overrides=[item])


def test_offload_sizes_take_bytes_or_units():
    job = load_config(overrides=["offload.host_memory_budget=8GB", "offload.nvme_block_size=4MiB",
                                 "offload.nvme_path=/mnt/nvme/zo2"])
    assert job.offload.host_budget_bytes == 8 * 10**9 and job.offload.block_size_bytes == 4 << 20
    assert load_config(overrides=["offload.host_memory_budget=1000000"]).offload.host_budget_bytes == 10**6
    assert load_config().offload.nvme_path is None and load_config().offload.host_budget_bytes is None
    with pytest.raises(ConfigError, match=r"offload\.host_memory_budget.*'64GB'"):
        load_config(overrides=["offload.host_memory_budget=8 gigs"])


def test_sequence_longer_than_the_model_is_refused():
    with pytest.raises(ConfigError, match=r"data\.max_length.*model\.max_positions"):
        load_config(overrides=["data.max_length=512"])


def test_malformed_override_and_missing_file():
    with pytest.raises(ConfigError, match="no '='"):
        load_config(overrides=["optim.lr"])
    with pytest.raises(ConfigError, match="section.key"):
        load_config(overrides=["lr=1"])
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(path="/nonexistent/job.toml")


def test_unknown_preset_did_you_mean():
    with pytest.raises(ConfigError, match="Did you mean 'tiny-opt'"):
        get_preset("tiny-op")


# ----------------------------------------------------------------------------------------------------------
# Round trips and the reference
# ----------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", preset_names())
def test_every_preset_round_trips_through_toml(name, tmp_path):
    job = load_config(name)
    path = tmp_path / "config.toml"
    path.write_text(to_toml(job, comments=True))
    assert load_saved_config(path) == job
    assert job_from_dict(job_to_dict(job)) == job


def test_unset_optional_round_trips_when_the_preset_sets_it(tmp_path):
    job = load_config("llama-7b", overrides=["model.rope_theta=none"])
    path = tmp_path / "config.toml"
    path.write_text(to_toml(job))
    assert load_saved_config(path).model.rope_theta is None


def test_describe_config_covers_every_field_and_matches_the_readme():
    text = describe_config()
    job = JobConfig()
    for section in ("model", "data", "optim", "offload", "train", "checkpoint", "run"):
        for f in dataclasses.fields(getattr(job, section)):
            assert f"`{section}.{f.name}`" in text
    readme = (REPO / "README.md").read_text()
    assert "## Configuration reference" in readme
    assert text.strip() in readme, ("README's configuration reference is stale; regenerate it with: python -c "
                                    "\"from zo2.config.loader import write_reference; write_reference('README.md')\"")


# ----------------------------------------------------------------------------------------------------------
# Parameter counts from the shape equal the real model's
# ----------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", preset_names())
def test_parameter_count_matches_the_model(name):
    from transformers import AutoModelForCausalLM

    m = get_preset(name).model
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(hf_config(m))
    assert parameter_count(m) == sum(p.numel() for p in model.parameters())


def test_published_sizes():
    counts = {name: parameter_count(get_preset(name).model) for name in ("opt-125m", "opt-350m", "llama-7b")}
    assert counts == {"opt-125m": 125_239_296, "opt-350m": 331_196_416, "llama-7b": 6_738_415_616}


# ----------------------------------------------------------------------------------------------------------
# Model building
# ----------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["tiny-opt", "tiny-llama", "tiny-qwen3", "tiny-gpt2"])
def test_tiny_presets_build_seeded_and_without_dropout(name):
    m = get_preset(name).model
    a, b = build_model(m), build_model(m)
    assert not a.training
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    c = build_model(dataclasses.replace(m, init_seed=1))
    assert not all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), c.state_dict().values()))
    assert a.config.model_type == m.family


def test_dtype_is_applied():
    model = build_model(dataclasses.replace(get_preset("tiny-opt").model, dtype="bf16"))
    assert next(model.parameters()).dtype == torch.bfloat16


def test_load_from_a_local_folder(tmp_path):
    m = get_preset("tiny-llama").model
    saved = build_model(m)
    saved.save_pretrained(tmp_path / "model")
    assert list((tmp_path / "model").glob("*.safetensors"))
    loaded = build_model(dataclasses.replace(m, path=str(tmp_path / "model")))
    assert not loaded.training
    for (name, x), (_, y) in zip(saved.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(x, y), name


def test_missing_model_path():
    m = dataclasses.replace(get_preset("tiny-opt").model, path="/nonexistent/model")
    with pytest.raises(ModelError, match=r"does not exist.*model\.path"):
        build_model(m)


def test_folder_without_config(tmp_path):
    (tmp_path / "weights.bin").write_bytes(b"")
    with pytest.raises(ModelError, match="no config.json"):
        build_model(dataclasses.replace(get_preset("tiny-opt").model, path=str(tmp_path)))


def test_not_a_causal_lm(tmp_path):
    from transformers import BertConfig, BertForMaskedLM

    BertForMaskedLM(BertConfig(vocab_size=99, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                               intermediate_size=37)).save_pretrained(tmp_path / "bert")
    with pytest.raises(ModelError, match=r"'bert'.*not a decoder-only causal LM.*Supported"):
        build_model(dataclasses.replace(get_preset("tiny-opt").model, path=str(tmp_path / "bert")))


def test_config_without_weights(tmp_path):
    hf_config(get_preset("tiny-opt").model).save_pretrained(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["model_type"] == "opt"
    with pytest.raises(ModelError, match="no weights"):
        build_model(dataclasses.replace(get_preset("tiny-opt").model, path=str(tmp_path)))


def test_cpu_threads_one_for_tiny_shapes_and_every_core_otherwise(monkeypatch):
    import torch

    from zo2.train.build import cpu_threads, set_cpu_threads

    assert cpu_threads(load_config(), 2) == 1  # tiny-opt
    assert cpu_threads(load_config("opt-125m"), 2) == 2
    assert cpu_threads(load_config(overrides=["model.path=/models/x"]), 4) == 4  # a real checkpoint: not guessed
    before = torch.get_num_threads()
    try:
        monkeypatch.setenv("OMP_NUM_THREADS", "2")
        assert set_cpu_threads(load_config(overrides=["train.device=cpu"])) is None  # the user's choice wins
        monkeypatch.delenv("OMP_NUM_THREADS")
        assert set_cpu_threads(load_config(overrides=["train.device=cpu"])) == 1 and torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)
