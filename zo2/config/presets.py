"""Presets: functions that return a complete :class:`JobConfig`.

Variants call a base preset and change a few fields (as torchtitan's ``config_registry``). ``tiny-opt`` is the
default job: a 4-layer OPT-style model on the shipped tiny corpus that trains on two CPU cores in about a
minute. The real shapes (published OPT, Llama-2 and Qwen3 sizes) start from random weights unless ``model.path``
points at a local checkpoint of that model.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Callable

from zo2.config.base import did_you_mean
from zo2.config.job import JobConfig, ModelConfig, RunConfig
from zo2.errors import ConfigError

Preset = Callable[[], JobConfig]
_PRESETS: dict[str, Preset] = {}


def register(name: str) -> Callable[[Preset], Preset]:
    """Decorator: make the function the preset ``name``; it sets ``job.preset`` and the run folder."""

    def wrap(fn: Preset) -> Preset:
        def build() -> JobConfig:
            job = fn()
            job.preset = name
            return job

        build.__doc__ = fn.__doc__
        _PRESETS[name] = build
        return build

    return wrap


def preset_names() -> list[str]:
    """Every preset, in registration order (tiny ones first)."""
    return list(_PRESETS)


def get_preset(name: str) -> JobConfig:
    """A fresh JobConfig of preset ``name``; ConfigError with a did-you-mean when there is none."""
    if name not in _PRESETS:
        raise ConfigError(f"Unknown preset {name!r}.{did_you_mean(name, _PRESETS)} "
                          f"Run `zo2 train --list-presets` to see them all.")
    return _PRESETS[name]()


def preset_summary(name: str) -> str:
    """The first line of the preset function's docstring."""
    return (_PRESETS[name].__doc__ or "").strip().splitlines()[0]


# ----------------------------------------------------------------------------------------------------------
# Parameter counts from the shape alone (no model is built)
# ----------------------------------------------------------------------------------------------------------

def parameter_count(m: ModelConfig) -> int:
    """Parameters of the model ``m`` describes, as ``sum(p.numel() for p in model.parameters())`` counts them
    (tied weights once). Ignores ``m.path``: the count is of the shape fields."""
    counters = {"opt": _opt_count, "llama": _llama_count, "qwen3": _qwen3_count, "gpt2": _gpt2_count}
    return counters[m.family](m)


def _lm_head(m: ModelConfig, width: int) -> int:
    return 0 if m.tie_embeddings else m.vocab_size * width


def _opt_count(m: ModelConfig) -> int:
    h, f, e = m.hidden_size, m.ffn_size, m.embed_dim or m.hidden_size
    layer = 4 * (h * h + h) + (h * f + f) + (f * h + h) + 2 * 2 * h
    embed = m.vocab_size * e + (m.max_positions + 2) * h  # OPT's learned positions carry an offset of 2
    project = 2 * h * e if e != h else 0
    final_norm = 2 * h if m.norm_before else 0
    return embed + project + m.num_layers * layer + final_norm + _lm_head(m, e)


def _attention_llama(m: ModelConfig) -> int:
    q, kv = m.num_heads * m.head_width, m.kv_heads * m.head_width
    return m.hidden_size * q + 2 * m.hidden_size * kv + q * m.hidden_size


def _llama_count(m: ModelConfig) -> int:
    h = m.hidden_size
    layer = _attention_llama(m) + 3 * h * m.ffn_size + 2 * h
    return m.vocab_size * h + m.num_layers * layer + h + _lm_head(m, h)


def _qwen3_count(m: ModelConfig) -> int:
    h = m.hidden_size
    layer = _attention_llama(m) + 2 * m.head_width + 3 * h * m.ffn_size + 2 * h  # + q_norm, k_norm
    return m.vocab_size * h + m.num_layers * layer + h + _lm_head(m, h)


def _gpt2_count(m: ModelConfig) -> int:
    h, f = m.hidden_size, m.ffn_size
    layer = 2 * h + (h * 3 * h + 3 * h) + (h * h + h) + 2 * h + (h * f + f) + (f * h + h)
    return m.vocab_size * h + m.max_positions * h + m.num_layers * layer + 2 * h + _lm_head(m, h)


def human_count(n: int) -> str:
    """1234567 → '1.23M'."""
    for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= size:
            return f"{n / size:.3g}{unit}"
    return str(n)


def list_presets() -> str:
    """A table of every preset: name, family, parameters, layers × hidden, summary."""
    rows = []
    for name in preset_names():
        m = get_preset(name).model
        shape = f"{m.num_layers} x {m.hidden_size}"
        rows.append(f"{name:<12} {m.family:<6} {human_count(parameter_count(m)):>8}  {shape:<12} "
                    f"{preset_summary(name)}")
    header = f"{'preset':<12} {'family':<6} {'params':>8}  {'layers x dim':<12} description"
    return "\n".join([header, *rows])


# ----------------------------------------------------------------------------------------------------------
# Tiny presets (CPU, tests, the README demo)
# ----------------------------------------------------------------------------------------------------------

@register("tiny-opt")
def tiny_opt() -> JobConfig:
    """Default job: 4-layer OPT-style model, byte tokenizer, shipped tiny corpus; about a minute on 2 CPU cores."""
    job = JobConfig()
    job.optim = replace(job.optim, lr=3e-3, eps=1e-3, seed=0)  # 1e-2 diverges within 100 steps
    job.train = replace(job.train, steps=500, log_every=10, eval_every=100, device="auto")
    job.checkpoint = replace(job.checkpoint, save_every=100, keep_last=2)
    job.run = RunConfig(out_dir="runs/default")
    return job


def _tiny_variant(name: str, **model: object) -> JobConfig:
    job = tiny_opt()
    job.model = replace(job.model, name=name, **model)
    return job


@register("tiny-llama")
def tiny_llama() -> JobConfig:
    """4-layer Llama-style model (RMSNorm, rotary, SwiGLU, 2 KV heads), otherwise as tiny-opt."""
    return _tiny_variant("tiny-llama", family="llama", num_kv_heads=2, ffn_size=192, tie_embeddings=False)


@register("tiny-qwen3")
def tiny_qwen3() -> JobConfig:
    """4-layer Qwen3-style model (q/k norms, 2 KV heads, head_dim 16), otherwise as tiny-opt."""
    return _tiny_variant("tiny-qwen3", family="qwen3", num_kv_heads=2, head_dim=16, ffn_size=192)


@register("tiny-gpt2")
def tiny_gpt2() -> JobConfig:
    """4-layer GPT-2-style model (learned positions, GELU MLP), otherwise as tiny-opt."""
    return _tiny_variant("tiny-gpt2", family="gpt2")


# ----------------------------------------------------------------------------------------------------------
# Real shapes: random weights unless model.path is set; MeZO's settings (lr 1e-6, eps 1e-3, batch 16)
# ----------------------------------------------------------------------------------------------------------

def _real(model: ModelConfig) -> JobConfig:
    job = JobConfig()
    job.model = model
    job.data = replace(job.data, batch_size=16, max_length=512)
    job.optim = replace(job.optim, lr=1e-6, eps=1e-3)
    job.train = replace(job.train, steps=20_000, log_every=10, eval_every=1000)
    job.checkpoint = replace(job.checkpoint, save_every=1000)
    job.run = RunConfig(out_dir="runs/default")
    return job


def _opt(name: str, hidden: int, layers: int, heads: int, **extra: object) -> JobConfig:
    model = ModelConfig(name=name, family="opt", dtype="bf16", vocab_size=50272, hidden_size=hidden,
                        num_layers=layers, num_heads=heads, ffn_size=4 * hidden, max_positions=2048,
                        tie_embeddings=True, **extra)  # type: ignore[arg-type]
    return _real(model)


@register("opt-125m")
def opt_125m() -> JobConfig:
    """OPT-125M shape (12 x 768, 12 heads)."""
    return _opt("opt-125m", 768, 12, 12)


@register("opt-350m")
def opt_350m() -> JobConfig:
    """OPT-350M shape (24 x 1024, 16 heads, post-LN, 512-wide embeddings projected in and out)."""
    return _opt("opt-350m", 1024, 24, 16, embed_dim=512, norm_before=False)


@register("opt-1.3b")
def opt_1_3b() -> JobConfig:
    """OPT-1.3B shape (24 x 2048, 32 heads)."""
    return _opt("opt-1.3b", 2048, 24, 32)


@register("opt-2.7b")
def opt_2_7b() -> JobConfig:
    """OPT-2.7B shape (32 x 2560, 32 heads)."""
    return _opt("opt-2.7b", 2560, 32, 32)


@register("opt-6.7b")
def opt_6_7b() -> JobConfig:
    """OPT-6.7B shape (32 x 4096, 32 heads)."""
    return _opt("opt-6.7b", 4096, 32, 32)


@register("opt-13b")
def opt_13b() -> JobConfig:
    """OPT-13B shape (40 x 5120, 40 heads)."""
    return _opt("opt-13b", 5120, 40, 40)


@register("opt-30b")
def opt_30b() -> JobConfig:
    """OPT-30B shape (48 x 7168, 56 heads)."""
    return _opt("opt-30b", 7168, 48, 56)


@register("opt-66b")
def opt_66b() -> JobConfig:
    """OPT-66B shape (64 x 9216, 72 heads)."""
    return _opt("opt-66b", 9216, 64, 72)


@register("opt-175b")
def opt_175b() -> JobConfig:
    """OPT-175B shape (96 x 12288, 96 heads)."""
    return _opt("opt-175b", 12288, 96, 96)


def _llama(name: str, hidden: int, layers: int, heads: int, kv_heads: int, ffn: int) -> JobConfig:
    model = ModelConfig(name=name, family="llama", dtype="bf16", vocab_size=32000, hidden_size=hidden,
                        num_layers=layers, num_heads=heads, num_kv_heads=kv_heads, ffn_size=ffn,
                        max_positions=4096, tie_embeddings=False, norm_eps=1e-5, rope_theta=10000.0)
    return _real(model)


@register("llama-7b")
def llama_7b() -> JobConfig:
    """Llama-2-7B shape (32 x 4096, 32 heads, SwiGLU 11008)."""
    return _llama("llama-7b", 4096, 32, 32, 32, 11008)


@register("llama-13b")
def llama_13b() -> JobConfig:
    """Llama-2-13B shape (40 x 5120, 40 heads, SwiGLU 13824)."""
    return _llama("llama-13b", 5120, 40, 40, 40, 13824)


@register("llama-70b")
def llama_70b() -> JobConfig:
    """Llama-2-70B shape (80 x 8192, 64 heads, 8 KV heads, SwiGLU 28672)."""
    return _llama("llama-70b", 8192, 80, 64, 8, 28672)


def _qwen3(name: str, hidden: int, layers: int, heads: int, ffn: int, tie: bool) -> JobConfig:
    model = ModelConfig(name=name, family="qwen3", dtype="bf16", vocab_size=151936, hidden_size=hidden,
                        num_layers=layers, num_heads=heads, num_kv_heads=8, head_dim=128, ffn_size=ffn,
                        max_positions=40960, tie_embeddings=tie, norm_eps=1e-6, rope_theta=1_000_000.0)
    return _real(model)


@register("qwen3-0.6b")
def qwen3_0_6b() -> JobConfig:
    """Qwen3-0.6B shape (28 x 1024, 16 heads, 8 KV heads, tied embeddings)."""
    return _qwen3("qwen3-0.6b", 1024, 28, 16, 3072, tie=True)


@register("qwen3-1.7b")
def qwen3_1_7b() -> JobConfig:
    """Qwen3-1.7B shape (28 x 2048, 16 heads, 8 KV heads, tied embeddings)."""
    return _qwen3("qwen3-1.7b", 2048, 28, 16, 6144, tie=True)


@register("qwen3-8b")
def qwen3_8b() -> JobConfig:
    """Qwen3-8B shape (36 x 4096, 32 heads, 8 KV heads)."""
    return _qwen3("qwen3-8b", 4096, 36, 32, 12288, tie=False)
