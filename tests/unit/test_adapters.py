"""Block adapters reproduce the Hugging Face model's own forward: same logits, same loss.

Every family runs on a tiny random config (built offline, no hub), in eval mode, on a padded batch; the adapter's
``embed → blocks → head`` path must match ``model(input_ids=..., attention_mask=..., labels=...)``.
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from collections.abc import Callable  # noqa: E402
from typing import Any  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, PretrainedConfig  # noqa: E402

from zo2.errors import ModelError  # noqa: E402
from zo2.models import BlockAdapter, adapter_for, causal_lm_loss, supported_model_types  # noqa: E402

VOCAB = 128
LENGTHS = (11, 7, 4)  # batch of 3 sequences of different lengths, longer than the sliding windows below

_DECODER = {"vocab_size": VOCAB, "num_hidden_layers": 3, "num_attention_heads": 4, "max_position_embeddings": 64}
LLAMA_LIKE = {**_DECODER, "hidden_size": 32, "intermediate_size": 64, "pad_token_id": 0}
OPT = {**_DECODER, "hidden_size": 32, "ffn_dim": 64, "dropout": 0.0, "attention_dropout": 0.0, "pad_token_id": 1}
GPT2 = {"vocab_size": VOCAB, "n_embd": 32, "n_layer": 3, "n_head": 4, "n_positions": 64}
GPT2 |= {"resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0}
SLIDING = {"use_sliding_window": True, "sliding_window": 3}  # shorter than most sequences of the batch

# test id -> (model_type, config kwargs)
CONFIGS: dict[str, tuple[str, dict[str, Any]]] = {
    "opt": ("opt", OPT),
    "opt-project": ("opt", {**OPT, "word_embed_proj_dim": 16}),  # project_in / project_out
    "opt-post-ln": ("opt", {**OPT, "do_layer_norm_before": False}),  # OPT-350m style: no final_layer_norm
    "llama-gqa": ("llama", {**LLAMA_LIKE, "num_key_value_heads": 2}),
    "llama-tied": ("llama", {**LLAMA_LIKE, "num_key_value_heads": 1, "tie_word_embeddings": True}),
    "qwen2": ("qwen2", {**LLAMA_LIKE, "num_key_value_heads": 2}),
    "qwen2-sliding": ("qwen2", {**LLAMA_LIKE, **SLIDING, "num_key_value_heads": 2, "max_window_layers": 1}),
    "qwen3": ("qwen3", {**LLAMA_LIKE, "num_key_value_heads": 2, "head_dim": 8}),
    "qwen3-sliding": (
        "qwen3",
        {**LLAMA_LIKE, **SLIDING, "num_key_value_heads": 2, "head_dim": 8, "max_window_layers": 2},
    ),
    "mistral-sliding": ("mistral", {**LLAMA_LIKE, "num_key_value_heads": 2, "sliding_window": 3}),
    "mistral-full": ("mistral", {**LLAMA_LIKE, "num_key_value_heads": 2, "sliding_window": None}),
    "olmo": ("olmo", {**LLAMA_LIKE, "num_key_value_heads": 2}),
    "olmo2": ("olmo2", {**LLAMA_LIKE, "num_key_value_heads": 2}),
    "helium": ("helium", {**LLAMA_LIKE, "num_key_value_heads": 2, "head_dim": 8}),
    # no_rope_layer_interval=2: layer 1 has no RoPE, and SmolLM3 gives its NoPE layers sliding-window attention
    "smollm3": (
        "smollm3",
        {**LLAMA_LIKE, **SLIDING, "num_key_value_heads": 2, "no_rope_layer_interval": 2}
        | {"bos_token_id": 1, "eos_token_id": 2},
    ),
    "gpt2": ("gpt2", GPT2),
}
LEFT_PADDED = ("opt", "llama-gqa", "qwen2-sliding", "mistral-sliding", "gpt2")


def build_model(name: str, attn: str = "sdpa", dtype: torch.dtype = torch.float32) -> nn.Module:
    """A tiny random causal LM of config ``name``, in eval mode."""
    model_type, kwargs = CONFIGS[name]
    config = AutoConfig.for_model(model_type, **kwargs)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, attn_implementation=attn, dtype=dtype)
    return model.eval()


def padded_batch(left: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """input_ids, attention_mask and labels (input_ids with -100 at padding) for sequences of ``LENGTHS``."""
    generator = torch.Generator().manual_seed(1)
    width = max(LENGTHS)
    ids = torch.randint(2, VOCAB, (len(LENGTHS), width), generator=generator)
    mask = torch.zeros_like(ids)
    for row, length in enumerate(LENGTHS):
        if left:
            mask[row, width - length :] = 1
        else:
            mask[row, :length] = 1
    ids = ids.masked_fill(mask == 0, 0)
    labels = ids.masked_fill(mask == 0, -100)
    return ids, mask, labels


def adapter_forward(
    adapter: BlockAdapter, ids: torch.Tensor, mask: torch.Tensor | None, ctx: dict[str, Any] | None = None
) -> torch.Tensor:
    """Logits through ``embed → blocks → head`` (optionally with a ``ctx`` computed earlier)."""
    hidden, fresh_ctx = adapter.embed(ids, mask)
    ctx = fresh_ctx if ctx is None else ctx
    for index in range(len(adapter.blocks())):
        hidden = adapter.block(index, hidden, ctx)
    return adapter.head(hidden, ctx)


def assert_matches_hf(model: nn.Module, ids: torch.Tensor, mask: torch.Tensor | None, labels: torch.Tensor) -> None:
    """Adapter loss within 1e-6 of HF's loss; logits within 1e-5 of HF's at the non-padded positions."""
    with torch.no_grad():
        expected = model(input_ids=ids, attention_mask=mask, labels=labels)
        logits = adapter_forward(adapter_for(model), ids, mask)
        loss = causal_lm_loss(logits, labels)
    keep = torch.ones_like(ids, dtype=torch.bool) if mask is None else mask.bool()
    torch.testing.assert_close(logits[keep], expected.logits[keep], atol=1e-5, rtol=0)
    assert abs(loss.item() - expected.loss.item()) <= 1e-6, (loss.item(), expected.loss.item())


# ----------------------------------------------------------------------------------------------------------------
# loss and logits equal the model's own forward
# ----------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_right_padded_batch_matches_hf(name: str, attn: str) -> None:
    assert_matches_hf(build_model(name, attn), *padded_batch(left=False))


@pytest.mark.parametrize("name", LEFT_PADDED)
def test_left_padded_batch_matches_hf(name: str) -> None:
    assert_matches_hf(build_model(name), *padded_batch(left=True))


@pytest.mark.parametrize("name", ["opt", "llama-gqa", "qwen3-sliding", "mistral-sliding", "gpt2"])
def test_no_attention_mask_matches_hf(name: str) -> None:
    ids, _, _ = padded_batch()
    ids = ids.clamp(min=2)  # no padding at all
    assert_matches_hf(build_model(name), ids, None, ids.clone())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("name", ["opt", "llama-gqa", "qwen2-sliding", "gpt2"])
def test_low_precision_matches_hf(name: str, dtype: torch.dtype) -> None:
    model = build_model(name, dtype=dtype)
    ids, mask, labels = padded_batch()
    with torch.no_grad():
        expected = model(input_ids=ids, attention_mask=mask, labels=labels)
        logits = adapter_forward(adapter_for(model), ids, mask)
    assert logits.dtype == dtype
    keep = mask.bool()
    torch.testing.assert_close(logits[keep], expected.logits[keep], atol=1e-2, rtol=1e-2)
    assert abs(causal_lm_loss(logits, labels).item() - expected.loss.item()) <= 1e-2


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("name", ["opt", "llama-gqa", "qwen3-sliding", "mistral-sliding", "gpt2"])
def test_cuda_matches_hf(name: str, dtype: torch.dtype) -> None:
    """On the GPU the adapter builds its tensors on the inputs' device and still equals the model's forward."""
    model = build_model(name, dtype=dtype).cuda()
    ids, mask, labels = (t.cuda() for t in padded_batch(left=name != "gpt2"))
    with torch.no_grad():
        expected = model(input_ids=ids, attention_mask=mask, labels=labels)
        logits = adapter_forward(adapter_for(model), ids, mask)
    assert logits.device == ids.device and logits.dtype == dtype
    keep = mask.bool()
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    torch.testing.assert_close(logits[keep], expected.logits[keep], atol=tol, rtol=tol)
    assert abs(causal_lm_loss(logits, labels).item() - expected.loss.item()) <= tol


# ----------------------------------------------------------------------------------------------------------------
# the ctx contract: computed once per batch, shared by perturbed forwards
# ----------------------------------------------------------------------------------------------------------------
def _ctx_tensors(value: Any) -> list[torch.Tensor]:
    """Every tensor inside a (nested) ctx value."""
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, dict):
        return [t for v in value.values() for t in _ctx_tensors(v)]
    if isinstance(value, (tuple, list)):
        return [t for v in value for t in _ctx_tensors(v)]
    return []


@pytest.mark.parametrize("name", ["opt-project", "llama-gqa", "qwen3-sliding", "mistral-sliding", "gpt2"])
def test_ctx_is_reusable_after_perturbing_parameters(name: str) -> None:
    model = build_model(name)
    adapter = adapter_for(model)
    ids, mask, labels = padded_batch()
    with torch.no_grad():
        _, ctx = adapter.embed(ids, mask)
        assert all(not t.requires_grad for t in _ctx_tensors(ctx))
        torch.manual_seed(2)
        for param in model.parameters():
            param.add_(0.01 * torch.randn_like(param))
        _, fresh = adapter.embed(ids, mask)
        for old, new in zip(_ctx_tensors(ctx), _ctx_tensors(fresh), strict=True):
            assert torch.equal(old, new)
        loss = causal_lm_loss(adapter_forward(adapter, ids, mask, ctx=ctx), labels)
        expected = model(input_ids=ids, attention_mask=mask, labels=labels).loss
    assert abs(loss.item() - expected.item()) <= 1e-6


# ----------------------------------------------------------------------------------------------------------------
# units cover the model's parameters
# ----------------------------------------------------------------------------------------------------------------
def _unit_parameter_ids(adapter: BlockAdapter) -> set[int]:
    modules = [*adapter.embed_modules(), *adapter.blocks(), *adapter.head_modules()]
    return {id(p) for module in modules for p in module.parameters()}


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_units_cover_every_parameter(name: str) -> None:
    model = build_model(name)
    covered = _unit_parameter_ids(adapter_for(model))
    missing = [n for n, p in model.named_parameters() if id(p) not in covered]
    assert not missing, missing
    assert covered == {id(p) for p in model.parameters()}  # nothing outside the model either


@pytest.mark.parametrize("name", ["opt", "gpt2", "llama-tied"])
def test_tied_lm_head_is_one_parameter(name: str) -> None:
    model = build_model(name)
    adapter = adapter_for(model)
    embed_ids = {id(p) for m in adapter.embed_modules() for p in m.parameters()}
    assert id(model.lm_head.weight) in embed_ids  # tied: the head's weight is the embedding's


def test_blocks_are_the_decoder_layers_in_order() -> None:
    model = build_model("llama-gqa")
    assert adapter_for(model).blocks() == list(model.model.layers)


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("qwen2-sliding", ["full", "sliding", "sliding"]),
        ("qwen3-sliding", ["full", "full", "sliding"]),
        ("smollm3", ["full", "sliding", "full"]),
        ("mistral-sliding", ["sliding"] * 3),
        ("mistral-full", ["full"] * 3),
        ("llama-gqa", ["full"] * 3),
    ],
)
def test_layer_types_follow_the_model(name: str, expected: list[str]) -> None:
    """The configs above really exercise sliding-window layers (else the equality tests would prove little)."""
    assert adapter_for(build_model(name)).layer_types() == [f"{kind}_attention" for kind in expected]


# ----------------------------------------------------------------------------------------------------------------
# registry errors
# ----------------------------------------------------------------------------------------------------------------
class _Unsupported(nn.Module):
    def __init__(self, config: PretrainedConfig | None):
        super().__init__()
        self.config = config


def test_unsupported_model_type_lists_supported_ones() -> None:
    with pytest.raises(ModelError) as info:
        adapter_for(_Unsupported(AutoConfig.for_model("bert")))
    message = str(info.value)
    assert "'bert'" in message
    for model_type in ("gpt2", "llama", "mistral", "opt", "qwen2", "qwen3"):
        assert model_type in message
    assert set(supported_model_types()) >= {"gpt2", "llama", "mistral", "opt", "qwen2", "qwen3"}


@pytest.mark.parametrize(
    "make", [lambda: _Unsupported(None), lambda: AutoModel.from_config(AutoConfig.for_model("llama", **LLAMA_LIKE))]
)
def test_not_a_causal_lm_raises_model_error(make: Callable[[], nn.Module]) -> None:
    with pytest.raises(ModelError):
        adapter_for(make())
