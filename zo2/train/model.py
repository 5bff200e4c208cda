"""Building the model a job trains: a preset shape with seeded random weights, or a local HF checkpoint.

Either way the result is a transformers causal LM in eval mode (dropout off: MeZO's forwards run without it, and
the engine relies on L+ and L- differing only by the perturbation). Nothing is ever downloaded.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from zo2.config.job import ModelConfig
from zo2.errors import ModelError

TORCH_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
WEIGHT_PATTERNS = ("*.safetensors", "*.bin", "*.safetensors.index.json", "*.bin.index.json")


def torch_dtype(name: str) -> torch.dtype:
    """'fp32' | 'bf16' | 'fp16' → the torch dtype."""
    return TORCH_DTYPES[name]


def hf_config(m: ModelConfig, special: dict[str, int | None] | None = None) -> Any:
    """The transformers config of the shape ``m`` describes (dropout off; ``special``: pad/bos/eos token ids)."""
    builders = {"opt": _opt_config, "llama": _llama_config, "qwen3": _qwen3_config, "gpt2": _gpt2_config}
    config = builders[m.family](m)
    for key, value in (special or {}).items():
        setattr(config, key, value)
    return config


def _rope(m: ModelConfig) -> dict[str, Any]:
    return {"rope_parameters": {"rope_type": "default", "rope_theta": m.rope_theta}} if m.rope_theta else {}


def _eps(m: ModelConfig, key: str) -> dict[str, Any]:
    return {key: m.norm_eps} if m.norm_eps is not None else {}


def _opt_config(m: ModelConfig) -> Any:
    from transformers import OPTConfig

    return OPTConfig(vocab_size=m.vocab_size, hidden_size=m.hidden_size, num_hidden_layers=m.num_layers,
                     num_attention_heads=m.num_heads, ffn_dim=m.ffn_size, max_position_embeddings=m.max_positions,
                     word_embed_proj_dim=m.embed_dim or m.hidden_size, do_layer_norm_before=m.norm_before,
                     tie_word_embeddings=m.tie_embeddings, dropout=0.0, attention_dropout=0.0)


def _llama_config(m: ModelConfig) -> Any:
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=m.vocab_size, hidden_size=m.hidden_size, num_hidden_layers=m.num_layers,
                       num_attention_heads=m.num_heads, num_key_value_heads=m.kv_heads, head_dim=m.head_width,
                       intermediate_size=m.ffn_size, max_position_embeddings=m.max_positions,
                       tie_word_embeddings=m.tie_embeddings, attention_dropout=0.0, **_eps(m, "rms_norm_eps"),
                       **_rope(m))


def _qwen3_config(m: ModelConfig) -> Any:
    from transformers import Qwen3Config

    return Qwen3Config(vocab_size=m.vocab_size, hidden_size=m.hidden_size, num_hidden_layers=m.num_layers,
                       num_attention_heads=m.num_heads, num_key_value_heads=m.kv_heads, head_dim=m.head_width,
                       intermediate_size=m.ffn_size, max_position_embeddings=m.max_positions,
                       tie_word_embeddings=m.tie_embeddings, attention_dropout=0.0, **_eps(m, "rms_norm_eps"),
                       **_rope(m))


def _gpt2_config(m: ModelConfig) -> Any:
    from transformers import GPT2Config

    return GPT2Config(vocab_size=m.vocab_size, n_embd=m.hidden_size, n_layer=m.num_layers, n_head=m.num_heads,
                      n_inner=m.ffn_size, n_positions=m.max_positions, tie_word_embeddings=m.tie_embeddings,
                      resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, **_eps(m, "layer_norm_epsilon"))


def build_model(m: ModelConfig, special: dict[str, int | None] | None = None) -> nn.Module:
    """The model of ``m`` in eval mode: ``from_pretrained(m.path)`` or a seeded ``from_config`` on the CPU, or,
    when ``model.stream_load`` says so (always, or auto above STREAM_LOAD_BYTES), an empty model on the meta
    device that :func:`fill_weights` fills."""
    if m.stream_load != "never":
        from zo2.config.job import STREAM_LOAD_BYTES
        from zo2.offload.loading import empty_model

        model = empty_model(model_config(m, special), torch_dtype(m.dtype))  # parameters on meta: no memory
        size = sum(p.numel() * p.element_size() for p in model.parameters())
        if m.stream_load == "always" or size > STREAM_LOAD_BYTES:
            setattr(model, STREAMED, True)  # build_engine fills it once the engine has placed the weights
            return model
    model = load_pretrained(m) if m.path is not None else init_from_shape(m, special)
    return model.eval()  # dropout off: ZO forwards must differ only by the perturbation


STREAMED = "_zo2_streamed"
"""Attribute marking a model built on the meta device, to be filled by :func:`fill_weights`."""


def model_config(m: ModelConfig, special: dict[str, int | None] | None = None) -> Any:
    """The transformers config of ``m``: the folder's (``m.path``) or the preset shape's."""
    if m.path is None:
        return hf_config(m, special)
    from transformers import AutoConfig

    check_model_folder(m.path)
    config = AutoConfig.from_pretrained(m.path, local_files_only=True)
    config._attn_implementation = m.attn_implementation
    return config


def fill_weights(m: ModelConfig, engine: Any) -> None:
    """Fill a streamed model's weights once the engine has placed them (store or device)."""
    from zo2.offload.loading import init_random, load_safetensors

    if m.path is not None:
        load_safetensors(engine, m.path)
    else:
        init_random(engine, seed=m.init_seed)


def init_from_shape(m: ModelConfig, special: dict[str, int | None] | None = None) -> nn.Module:
    """Random weights of the shape ``m``, a pure function of (shape, dtype, ``m.init_seed``, torch version)."""
    from transformers import AutoModelForCausalLM

    with torch.random.fork_rng(devices=[]):  # seed the init without disturbing the caller's RNG
        torch.manual_seed(m.init_seed)
        return AutoModelForCausalLM.from_config(hf_config(m, special), dtype=torch_dtype(m.dtype),
                                                attn_implementation=m.attn_implementation)


def check_model_folder(path: str | Path) -> dict[str, Any]:
    """The folder's config.json as a dict, after checking the folder could hold a zo2-trainable causal LM."""
    from zo2.models import supported_model_types

    p = Path(path).expanduser()
    if not p.is_dir():
        raise ModelError(f"Model path {str(p)!r} does not exist or is not a folder. Set model.path to a local "
                         "Hugging Face model folder (config.json + weights, as written by save_pretrained), or "
                         "unset it to train a randomly initialised preset shape.")
    config_file = p / "config.json"
    if not config_file.is_file():
        raise ModelError(f"Model folder {str(p)!r} has no config.json, so it is not a Hugging Face model folder. "
                         "Point model.path at the folder save_pretrained wrote (it holds config.json).")
    try:
        config = json.loads(config_file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ModelError(f"{config_file} is not valid JSON ({exc}). Re-save the model with save_pretrained.") from exc
    model_type = config.get("model_type")
    if model_type not in supported_model_types():
        kind = ", ".join(config.get("architectures") or []) or "no architectures listed"
        raise ModelError(f"Model folder {str(p)!r} holds a {model_type!r} model ({kind}), which is not a "
                         f"decoder-only causal LM zo2 can train. Supported model types: "
                         f"{', '.join(supported_model_types())}.")
    if not any(any(p.glob(pattern)) for pattern in WEIGHT_PATTERNS):
        raise ModelError(f"Model folder {str(p)!r} has a config.json but no weights (*.safetensors or *.bin). "
                         "Copy the weight shards next to config.json, or re-save the model with save_pretrained.")
    return config


def load_pretrained(m: ModelConfig) -> nn.Module:
    """``AutoModelForCausalLM.from_pretrained(m.path)`` offline, in ``m.dtype``, with clear errors."""
    from transformers import AutoModelForCausalLM

    assert m.path is not None
    check_model_folder(m.path)
    try:
        return AutoModelForCausalLM.from_pretrained(str(Path(m.path).expanduser()), local_files_only=True,
                                                    dtype=torch_dtype(m.dtype),
                                                    attn_implementation=m.attn_implementation)
    except (OSError, ValueError, RuntimeError) as exc:
        raise ModelError(f"Could not load the model in {m.path!r}: {exc}. Check that the folder holds a complete "
                         "checkpoint written by save_pretrained (config.json and every weight shard).") from exc


def max_positions(model: nn.Module) -> int | None:
    """The longest sequence ``model`` accepts, from its config (None when it does not say)."""
    return getattr(model.config, "max_position_embeddings", None)


def vocab_size(model: nn.Module) -> int:
    """Rows of the model's input embedding."""
    return int(model.get_input_embeddings().weight.shape[0])
