"""Block adapters: each supported Hugging Face causal-LM family seen as ``embed → blocks → head``.

Importing this package registers every adapter (one module per family); :func:`adapter_for` then picks the one
for a model by ``config.model_type``.
"""

from zo2.models import gpt2, llama, opt, peft_adapter  # noqa: F401  (imported to register their adapters)
from zo2.models.base import BlockAdapter, adapter_for, causal_lm_loss, register_adapter, supported_model_types

__all__ = ["BlockAdapter", "adapter_for", "causal_lm_loss", "register_adapter", "supported_model_types"]
