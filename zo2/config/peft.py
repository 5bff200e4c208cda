"""PeftConfig: the ``[peft]`` section — ZO fine-tuning of a LoRA / prompt / prefix adapter instead of every weight."""

from __future__ import annotations

from dataclasses import dataclass

from zo2.config.base import require, require_choice

PEFT_METHODS = ("lora", "prompt", "prefix")
DEFAULT_LORA_TARGETS = {"opt": ["q_proj", "v_proj"], "llama": ["q_proj", "v_proj"], "qwen3": ["q_proj", "v_proj"],
                        "gpt2": ["c_attn"]}
"""LoRA target modules when ``peft.target_modules`` is unset (MeZO's choice: the query and value projections)."""


@dataclass(kw_only=True)
class PeftConfig:
    """Wrap the model with the ``peft`` library so only the adapter's parameters are perturbed and updated; the
    base weights stay frozen (and, with offload, stream read-only). Needs
    ``pip install -c constraints/cpu.txt -e ".[peft]"`` (``constraints/gpu.txt`` on CUDA machines). The base may
    be built on the meta device (``model.stream_load``): its frozen weights then stream from the checkpoint's
    shards into their frozen store, onto the device or into the NVMe tier's files, never the whole model in
    memory at once."""

    method: str | None = None
    """'lora', 'prompt' (prompt tuning: trainable virtual token embeddings) or 'prefix' (prefix tuning: trainable
    per-layer key/value prefixes); unset (the default): every weight is trained."""
    r: int = 8
    """LoRA rank."""
    alpha: int = 16
    """LoRA scaling numerator (the update is scaled by alpha / r)."""
    target_modules: list[str] | None = None
    """Modules LoRA wraps; unset: the attention query and value projections of the model family."""
    num_virtual_tokens: int = 16
    """Prompt and prefix tuning: virtual tokens (MeZO's prefix runs use 5)."""
    prefix_projection: bool = False
    """Prefix tuning: reparametrize the prefix through an MLP (its weights are trained too)."""

    def __post_init__(self) -> None:
        if self.method is not None:
            require_choice("peft.method", self.method, PEFT_METHODS)
        for key in ("r", "alpha", "num_virtual_tokens"):
            value = getattr(self, key)
            require(isinstance(value, int) and not isinstance(value, bool) and value >= 1, f"peft.{key}", value,
                    "it must be an integer >= 1.")
        require(self.target_modules is None or (isinstance(self.target_modules, list) and self.target_modules
                                                and all(isinstance(m, str) for m in self.target_modules)),
                "peft.target_modules", self.target_modules, "give a list of module names, e.g. ['q_proj', 'v_proj'].")
        require(isinstance(self.prefix_projection, bool), "peft.prefix_projection", self.prefix_projection,
                "it must be true or false.")
