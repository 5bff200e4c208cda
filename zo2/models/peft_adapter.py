"""PEFT models: zeroth-order fine-tuning of the adapter's parameters only (LoRA, prompt and prefix tuning, ...).

A ``peft`` PeftModel wraps a transformers causal LM; :func:`~zo2.models.base.adapter_for` sees through it here.

* Methods that change the layers in place — LoRA (and its DoRA / rsLoRA variants), IA3, LoHa, LoKr, OFT, VeRA,
  ... — need nothing special: the base model's own adapter (``embed → blocks → head``) calls the wrapped layers,
  and the engine perturbs and updates exactly the parameters with ``requires_grad=True`` (the adapter weights).
  The frozen base weights are never perturbed or written; when blocks are streamed they travel read-only with
  their block (zo2/offload/frozen.py), or a module at a time with ``optim.stream_granularity = 'matrix'``
  (zo2/offload/piece_frozen.py).
* Prompt tuning and P-tuning prepend trained virtual-token embeddings to the input: :class:`PromptAdapter` adds
  them in ``embed`` (the prompt encoder belongs to the embedding unit) and drops their positions before the
  head, so logits and loss cover the real tokens only. (PEFT's own ``forward(labels=...)`` also scores the first
  real token from the last virtual one; zo2's loss, like a model without a prompt, does not.)
* Prefix tuning (MeZO's "prefix" mode) gives every attention layer trained key/value states in front of the
  input's: :class:`PrefixAdapter` computes them all in ``embed`` from the (perturbed) prompt encoder with PEFT's
  own ``get_prompt`` (so the prompt encoder, with the MLP of ``prefix_projection=True``, belongs to the embedding
  unit), extends the attention mask and shifts the positions as PEFT's ``forward`` does, and hands each block a
  fresh cache holding its layer's prefix. The prefixes differ from one perturbed point to the next, so they travel
  in that point's ``ctx``. Supported for the families whose adapter has ``supports_prefix``: OPT, the Llama
  family (Llama, Mistral, Qwen2/3, OLMo, ...) and GPT-2.
* The other methods that change the model's forward beyond its layers (e.g. CPT, Cartridge, multitask prompt
  tuning) are refused by :func:`peft_adapter` with a :class:`~zo2.errors.ModelError`.

AdaLoRA's rank reallocation reads gradients, which a ZO step has none of: its ranks stay as initialized.
"""

from __future__ import annotations

import contextlib
import warnings
from typing import TYPE_CHECKING, Any, Iterator

import torch
from torch import nn
from transformers import DynamicCache

from zo2.errors import ModelError
from zo2.models.base import BlockAdapter, adapter_for, is_peft_model, prefix_model_types, register_wrapper

if TYPE_CHECKING:
    from zo2.config.peft import PeftConfig

PROMPT_METHODS = ("PROMPT_TUNING", "P_TUNING")
"""Prompt-learning methods whose virtual tokens are input embeddings (they work unit by unit)."""
PREFIX_METHOD = "PREFIX_TUNING"
"""The prompt-learning method whose virtual tokens are key/value states in every attention layer."""


def _method(model: nn.Module) -> str:
    peft_type = model.active_peft_config.peft_type
    return str(getattr(peft_type, "value", peft_type))


def peft_adapter(model: nn.Module) -> BlockAdapter:
    """The block adapter of a PeftModel: the base model's, wrapped for prompt tuning / P-tuning / prefix tuning."""
    inner = adapter_for(model.get_base_model())
    if not model.active_peft_config.is_prompt_learning:
        return inner
    method = _method(model)
    if method in PROMPT_METHODS:
        return PromptAdapter(model, inner)
    if method == PREFIX_METHOD:
        return PrefixAdapter(model, inner)
    raise ModelError(
        f"PEFT method {method} is not supported by zo2 (it changes the model's forward beyond its layers). "
        "Supported: the methods that wrap layers in place (LoRA, IA3, LoHa, LoKr, ...), "
        f"{', '.join(PROMPT_METHODS)} and {PREFIX_METHOD}."
    )


register_wrapper(is_peft_model, peft_adapter)


class _PromptLearningAdapter(BlockAdapter):
    """The base model's units, with PEFT's prompt encoder (the trainable prompt or prefix) in the embedding unit."""

    model: nn.Module
    inner: BlockAdapter

    def embed_modules(self) -> list[nn.Module]:
        return self.inner.embed_modules() + [self.model.prompt_encoder]

    def blocks(self) -> list[nn.Module]:
        return self.inner.blocks()

    def head_modules(self) -> list[nn.Module]:
        return self.inner.head_modules()


class PromptAdapter(_PromptLearningAdapter):
    """Prompt tuning / P-tuning: virtual-token embeddings from the prompt encoder go in front of the input's."""

    def __init__(self, model: nn.Module, inner: BlockAdapter):
        self.model = model
        self.config = inner.config
        self.inner = inner
        config = model.active_peft_config
        self.num_virtual = config.num_virtual_tokens * config.num_transformer_submodules
        """Virtual tokens in front of every sequence."""
        self.word_embeddings = model.word_embeddings
        """The module turning input ids into embeddings (PEFT's pick); its output gets the prompt prepended."""
        if self.word_embeddings is None:
            raise ModelError("The PeftModel did not find the base model's word embeddings; prompt tuning cannot run.")

    def embed(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None
    ) -> tuple[torch.Tensor, dict[str, Any]]:
        """The base model's embedding with the prompt in front, as PEFT's forward builds it: the attention mask
        gets ones for the virtual tokens, and positions (and OPT's mask-derived ones) count them."""
        batch, length = input_ids.shape

        def prepend(module: nn.Module, args: Any, out: torch.Tensor) -> torch.Tensor:
            # reads the (perturbed) prompt-encoder weights on one row of prompt tokens; with several points in one
            # batch (zo2.points) that row comes back as each point's prompt over its rows, else as one row
            prompts = self.model.get_prompt(batch_size=1)
            prompts = prompts.expand(batch, *prompts.shape[1:]) if prompts.shape[0] == 1 else prompts
            return torch.cat([prompts.to(device=out.device, dtype=out.dtype), out], dim=1)

        if attention_mask is not None:
            attention_mask = torch.cat([attention_mask.new_ones(batch, self.num_virtual), attention_mask], dim=1)
        handle = self.word_embeddings.register_forward_hook(prepend)
        try:
            hidden, ctx = self.inner.embed(input_ids, attention_mask)
        finally:
            handle.remove()
        if hidden.shape[1] != length + self.num_virtual:
            raise ModelError(f"The {type(self.inner).__name__} embedding did not call the word embeddings PEFT "
                             "found, so the prompt was not prepended; prompt tuning cannot run on this model.")
        return hidden, ctx

    def block(self, index: int, hidden: torch.Tensor, ctx: dict[str, Any]) -> torch.Tensor:
        return self.inner.block(index, hidden, ctx)

    def head(self, hidden: torch.Tensor, ctx: dict[str, Any]) -> torch.Tensor:
        return self.inner.head(hidden[:, self.num_virtual :], ctx)


class PrefixAdapter(_PromptLearningAdapter):
    """Prefix tuning: every layer attends to trained key/value states in front of the input's.

    ``embed`` runs PEFT's ``get_prompt`` on the prompt encoder as the engine swapped it in (θ or θ ± εz) and returns
    each layer's (keys, values) in the point's ``ctx``; ``block`` passes them to the layer in a fresh cache, so the
    layer's attention prepends them exactly as it does to ``past_key_values`` in PEFT's forward, and no state is
    left behind between calls or points.
    """

    def __init__(self, model: nn.Module, inner: BlockAdapter):
        if not inner.supports_prefix:
            raise ModelError(
                f"PEFT prefix tuning is not supported for model type '{inner.config.model_type}': its zo2 adapter "
                f"({type(inner).__name__}) cannot hand key/value prefixes to the layers. Supported: "
                f"{', '.join(prefix_model_types())}. Use prompt tuning (PromptTuningConfig) or LoRA instead."
            )
        config = model.active_peft_config
        if config.num_transformer_submodules != 1:
            raise ModelError("PEFT prefix tuning with num_transformer_submodules != 1 (an encoder-decoder model) is "
                             "not supported by zo2, which runs causal LMs.")
        self.model = model
        self.config = inner.config
        self.inner = inner
        self.num_virtual = config.num_virtual_tokens
        """Prefix positions in front of every sequence, in every layer."""
        blocks = inner.blocks()
        if config.num_layers != len(blocks):
            raise ModelError(f"The prefix-tuning config has num_layers={config.num_layers} but the model runs "
                             f"{len(blocks)} decoder layers; build the PeftModel from this model.")
        self._cache_index = [_attention_layer_index(block, i) for i, block in enumerate(blocks)]
        """The index each layer's attention reads and writes in a cache (``self_attn.layer_idx``)."""

    def embed(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None
    ) -> tuple[torch.Tensor, dict[str, Any]]:
        """The base model's embedding of the input as PEFT's forward calls it: the attention mask gets ones for
        the prefix, and positions and causal mask count the prefix cache (real tokens start after it)."""
        batch = input_ids.shape[0]
        prefix = self.model.get_prompt(batch_size=batch)  # reads the (perturbed) prompt-encoder weights
        if attention_mask is not None:
            attention_mask = torch.cat([attention_mask.new_ones(batch, self.num_virtual), attention_mask], dim=1)
        hidden, ctx = self.inner.embed(input_ids, attention_mask, cache=prefix)
        prefixes = [_layer_states(prefix, i) for i in range(len(self._cache_index))]
        return hidden, {"inner": ctx, "prefixes": prefixes}

    def block(self, index: int, hidden: torch.Tensor, ctx: dict[str, Any], cache: Any = None) -> torch.Tensor:
        keys, values = ctx["prefixes"][index]
        fresh = DynamicCache()  # holds this layer's prefix only; the attention appends the input's keys to it
        fresh.update(keys.to(hidden.dtype), values.to(hidden.dtype), self._cache_index[index])
        return self.inner.block(index, hidden, ctx["inner"], cache=fresh)

    def head(self, hidden: torch.Tensor, ctx: dict[str, Any]) -> torch.Tensor:
        return self.inner.head(hidden, ctx["inner"])


def _layer_states(cache: Any, index: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Layer ``index``'s (keys, values) ``[batch, heads, prefix, head_dim]`` in a transformers DynamicCache."""
    layers = getattr(cache, "layers", None)
    if layers is not None:  # transformers >= 4.56: one cache layer object per layer
        return layers[index].keys, layers[index].values
    return cache.key_cache[index], cache.value_cache[index]


def _attention_layer_index(block: nn.Module, default: int) -> int:
    """The ``layer_idx`` the block's attention passes to ``cache.update`` (its position in the model)."""
    for module in block.modules():
        layer_idx = getattr(module, "layer_idx", None)
        if isinstance(layer_idx, int):
            return layer_idx
    return default


def apply_peft(model: nn.Module, cfg: "PeftConfig", family: str | None = None, seed: int = 0) -> nn.Module:
    """``model`` wrapped by ``peft`` as the ``[peft]`` section says (LoRA, prompt or prefix tuning); the adapter's
    initial weights are a pure function of ``seed``, so a run, its resume and its replay start alike."""
    from zo2.config.peft import DEFAULT_LORA_TARGETS

    try:
        import peft
    except ImportError:
        raise ModelError("peft.method is set but the peft package is not installed. Install it with "
                         "pip install -c constraints/cpu.txt -e \".[peft]\" (or pip install peft accelerate).") from None
    model_type = getattr(model.config, "model_type", family)
    if cfg.method == "lora":
        targets = cfg.target_modules or DEFAULT_LORA_TARGETS.get(family or "", None) \
            or DEFAULT_LORA_TARGETS.get(model_type, None)
        if targets is None:
            raise ModelError(f"No default LoRA target modules for {model_type!r} models; set peft.target_modules, "
                             "e.g. ['q_proj', 'v_proj'].")
        config = peft.LoraConfig(r=cfg.r, lora_alpha=cfg.alpha, lora_dropout=0.0, target_modules=list(targets),
                                 task_type="CAUSAL_LM")
    elif cfg.method == "prompt":
        config = peft.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=cfg.num_virtual_tokens)
    else:
        config = peft.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=cfg.num_virtual_tokens,
                                         prefix_projection=cfg.prefix_projection)
    with torch.random.fork_rng(devices=[]), warnings.catch_warnings():  # seeded adapter init, the caller's RNG
        torch.manual_seed(seed)                                            # left alone
        # peft reads the model's deprecated is_gradient_checkpointing alias (transformers >= 5.2x): not ours to fix
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        with _adapters_in_memory(model):
            wrapped = peft.get_peft_model(model, config)
    return wrapped.eval()  # ZO forwards run with dropout off


@contextlib.contextmanager
def _adapters_in_memory(model: nn.Module) -> Iterator[None]:
    """While active, every parameter of ``model`` on the meta device (a base model whose weights
    zo2.offload.loading fills later) is a CPU tensor of its shape and dtype that takes no memory (one zero,
    expanded): peft then creates each adapter on the CPU in the base layer's dtype, with the values its seeded init
    gives it, exactly as over a base in memory (peft moves a new adapter to its base layer's device, which would
    lose them on the meta device). The meta parameters are put back afterwards, frozen as peft froze their
    stand-ins."""
    swapped = []
    for module in model.modules():
        for name, p in module._parameters.items():
            if p is not None and p.is_meta:
                swapped.append((module, name, p))
                stand_in = torch.zeros((), dtype=p.dtype).expand(p.shape)
                module._parameters[name] = nn.Parameter(stand_in, requires_grad=p.requires_grad)
    try:
        yield
    finally:
        for module, name, p in swapped:
            p.requires_grad_(module._parameters[name].requires_grad)  # peft froze the base: the stand-in says so
            module._parameters[name] = p
