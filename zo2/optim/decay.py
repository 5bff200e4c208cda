"""Which parameters weight decay skips (``optim.no_decay``).

Two rules, both common in the field:

* ``"norms_and_biases"`` (zo2's default): every 1-D parameter (biases, norm weights and scales), and any parameter
  whose name contains ``bias``, ``norm``, ``ln_``, ``layernorm`` or ``layer_norm`` (case-insensitive). So the norms
  of every family are skipped: OPT's ``*_layer_norm``, Llama/Mistral/Qwen's ``input_layernorm``,
  ``post_attention_layernorm`` and final ``norm``, Qwen3's ``q_norm``/``k_norm``, OLMo2's ``*_norm``, GPT-2's
  ``ln_1``/``ln_2``/``ln_f``.
* ``"mezo_names"`` (MeZO's ``run.py``): exactly the parameters whose (case-sensitive) name contains ``bias``,
  ``layer_norm`` or ``layernorm``. That skips OPT's norms and every ``*_layernorm``, but decays the final
  ``norm`` of Llama, Qwen and OLMo2, the ``q_norm``/``k_norm`` of Qwen3 and OLMo2, and GPT-2's ``ln_*`` weights.
"""

from __future__ import annotations

import torch

NO_DECAY_RULES = ("norms_and_biases", "mezo_names")
_NORM_MARKERS = ("bias", "norm", "ln_", "layernorm", "layer_norm")
_MEZO_MARKERS = ("bias", "layer_norm", "layernorm")


def skips_decay(name: str, param: torch.Tensor, rule: str = "norms_and_biases") -> bool:
    """Whether weight decay skips parameter ``name`` under ``rule`` (see the module docstring)."""
    if rule == "mezo_names":
        return any(marker in name for marker in _MEZO_MARKERS)
    if rule == "norms_and_biases":
        lowered = name.lower()
        return param.dim() < 2 or any(marker in lowered for marker in _NORM_MARKERS)
    raise ValueError(f"unknown weight-decay rule {rule!r}; expected one of {NO_DECAY_RULES}")
