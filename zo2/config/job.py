"""The job config: what to train (``[model]``), on what (``[data]``), how (``[optim]``), where streamed blocks live
(``[offload]``), for how long (``[train]``), how to checkpoint (``[checkpoint]``) and where to write (``[run]``).

Each section is a keyword-only dataclass with a docstring under every field (``describe_config()`` in
``zo2.config.loader`` turns them into the README's configuration reference) and checks in ``__post_init__``
that name the bad field as ``section.key``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from zo2.config.base import require, require_choice
from zo2.config.checkpoint import CheckpointConfig
from zo2.config.control import ControlConfig
from zo2.config.parallel import ParallelConfig
from zo2.config.peft import PeftConfig
from zo2.config.data import DataConfig
from zo2.config.offload import OffloadConfig
from zo2.config.task import TaskConfig
from zo2.config.zo import ZOConfig
from zo2.errors import ConfigError

FAMILIES = ("opt", "llama", "qwen3", "gpt2")
DTYPES = ("fp32", "bf16", "fp16")
ATTN_IMPLEMENTATIONS = ("eager", "sdpa")


def _positive(field_name: str, value: object) -> None:
    require(isinstance(value, int) and not isinstance(value, bool) and value >= 1, field_name, value,
            "it must be a positive integer.")


def _non_negative(field_name: str, value: object) -> None:
    require(isinstance(value, int) and not isinstance(value, bool) and value >= 0, field_name, value,
            "it must be an integer >= 0.")


STREAM_LOAD_BYTES = 4 * 10**9
"""Above this many bytes of weights, model.stream_load = 'auto' builds the model on the meta device."""


@dataclass(kw_only=True)
class ModelConfig:
    """The model: a local Hugging Face checkpoint (``path``) or a randomly initialised preset shape."""

    name: str = "tiny-opt"
    """Name of the model shape, for logs and run names (the presets set it; it changes nothing else)."""
    family: str = "opt"
    """Model family of the shape below: 'opt', 'llama', 'qwen3' or 'gpt2'. Ignored when ``path`` is set."""
    path: str | None = None
    """Local Hugging Face model folder (config.json + safetensors or .bin shards). Unset: random weights of the
    shape below, seeded by ``init_seed``. Nothing is downloaded."""
    dtype: str = "fp32"
    """Storage and compute dtype of the weights: 'fp32', 'bf16' or 'fp16'."""
    init_seed: int = 0
    """Seed of the random initialisation when ``path`` is unset (replay rebuilds the same weights from it)."""
    attn_implementation: str = "sdpa"
    """Attention kernel: 'sdpa' (torch scaled_dot_product_attention) or 'eager' (the reference matmuls)."""
    stream_load: str = "auto"
    """'always': build the model on the meta device and stream its weights straight into the parameter store
    and the device (safetensors shards tensor by tensor, or a seeded N(0, 0.02) init parameter by parameter), so
    it is never materialized in full; 'never': build it in full on the CPU first (from_pretrained /
    from_config); 'auto': stream models of more than 4 GB."""
    vocab_size: int = 259
    """Vocabulary size (259 matches the byte tokenizer: 256 bytes + pad, bos, eos)."""
    hidden_size: int = 64
    """Width of the residual stream."""
    num_layers: int = 4
    """Number of decoder blocks."""
    num_heads: int = 4
    """Attention heads per block."""
    num_kv_heads: int | None = None
    """Key/value heads (grouped-query attention; llama and qwen3 only). Unset: same as ``num_heads``."""
    head_dim: int | None = None
    """Width of one attention head. Unset: ``hidden_size // num_heads`` (qwen3 presets set 128)."""
    ffn_size: int = 256
    """Inner width of the feed-forward network (MLP)."""
    max_positions: int = 256
    """Longest sequence the model accepts (learned position tables for opt and gpt2, rotary range otherwise)."""
    embed_dim: int | None = None
    """OPT only: width of the token embeddings when it differs from ``hidden_size`` (OPT-350m: 512, projected
    in and out). Unset: ``hidden_size``."""
    norm_before: bool = True
    """OPT only: pre-LayerNorm blocks (True, every OPT but 350m) or post-LayerNorm (False, OPT-350m)."""
    tie_embeddings: bool = True
    """Share the input embedding and the output projection (lm_head) weights."""
    norm_eps: float | None = None
    """Epsilon of the normalisation layers. Unset: the family's default."""
    rope_theta: float | None = None
    """Base of the rotary position embeddings (llama, qwen3). Unset: the family's default (10000)."""

    def __post_init__(self) -> None:
        require_choice("model.family", self.family, FAMILIES)
        require(self.path is None or (isinstance(self.path, str) and self.path.strip() != ""), "model.path",
                self.path, "it must be a folder path, or unset for random weights.")
        require_choice("model.dtype", self.dtype, DTYPES)
        _non_negative("model.init_seed", self.init_seed)
        require_choice("model.attn_implementation", self.attn_implementation, ATTN_IMPLEMENTATIONS)
        require_choice("model.stream_load", self.stream_load, ("auto", "always", "never"))
        for key in ("vocab_size", "hidden_size", "num_layers", "num_heads", "ffn_size", "max_positions"):
            _positive(f"model.{key}", getattr(self, key))
        for key in ("num_kv_heads", "head_dim", "embed_dim"):
            if getattr(self, key) is not None:
                _positive(f"model.{key}", getattr(self, key))
        require(self.head_dim is not None or self.hidden_size % self.num_heads == 0, "model.num_heads",
                self.num_heads, f"hidden_size {self.hidden_size} must be a multiple of it (or set model.head_dim).")
        require(self.kv_heads == self.num_heads or self.family in ("llama", "qwen3"), "model.num_kv_heads",
                self.num_kv_heads, f"grouped-query attention is not part of the {self.family!r} family; unset it.")
        require(self.num_heads % self.kv_heads == 0, "model.num_kv_heads", self.num_kv_heads,
                f"it must divide num_heads ({self.num_heads}).")
        require(self.norm_eps is None or self.norm_eps > 0, "model.norm_eps", self.norm_eps, "it must be > 0.")
        require(self.rope_theta is None or self.rope_theta > 0, "model.rope_theta", self.rope_theta,
                "it must be > 0.")

    @property
    def kv_heads(self) -> int:
        """Key/value heads, with the default filled in."""
        return self.num_kv_heads if self.num_kv_heads is not None else self.num_heads

    @property
    def head_width(self) -> int:
        """Width of one attention head, with the default filled in."""
        return self.head_dim if self.head_dim is not None else self.hidden_size // self.num_heads


@dataclass(kw_only=True)
class TrainConfig:
    """The training loop: how many steps, how often to log and evaluate, on which device."""

    steps: int = 400
    """Total number of ZO steps of the run (a resumed run continues up to this count)."""
    log_every: int = 10
    """Steps between two lines of metrics.jsonl (and plain log lines with --quiet)."""
    eval_every: int = 0
    """Steps between evaluations of the unperturbed loss on the held-out batches; 0 evaluates only at the end."""
    eval_batches: int = 2
    """Batches of the held-out split per evaluation; 0 turns evaluation off."""
    max_nonfinite_steps: int = 5
    """Stop with an error after this many consecutive steps whose loss was NaN/inf (such steps make no update)."""
    divergence_factor: float = 10.0
    """Stop with an error when a step's loss exceeds this many times the moving average of the losses before it:
    an update blew the weights up. The error names the step to continue from with
    ``--resume-from-step``. 0 turns the check off."""
    device: str = "auto"
    """Compute device: 'auto' (cuda when available, else cpu), 'cpu', 'cuda' or 'cuda:N'."""

    def __post_init__(self) -> None:
        _positive("train.steps", self.steps)
        _positive("train.log_every", self.log_every)
        _non_negative("train.eval_every", self.eval_every)
        _non_negative("train.eval_batches", self.eval_batches)
        _positive("train.max_nonfinite_steps", self.max_nonfinite_steps)
        f = self.divergence_factor
        require(isinstance(f, (int, float)) and not isinstance(f, bool) and (f == 0 or 1 < f < float("inf")),
                "train.divergence_factor", f, "it must be a number > 1, or 0 to turn the check off.")
        ok = self.device in ("auto", "cpu", "cuda") or (
            self.device.startswith("cuda:") and self.device[5:].isdigit())
        require(ok, "train.device", self.device, "it must be 'auto', 'cpu', 'cuda' or 'cuda:N'.")


@dataclass(kw_only=True)
class RunConfig:
    """Where the run writes its files."""

    out_dir: str = "runs/default"
    """Run folder: config.toml, metrics.jsonl, trajectory.jsonl, snapshots/, final/, loss.png. An existing run
    folder is only reused with --resume (continue it) or --overwrite (start over)."""
    plot: bool = True
    """Draw loss.png (per-step and smoothed loss) at the end of the run."""
    save_final: bool = True
    """Write the final model to final/ with save_pretrained (config.json + safetensors; usable as model.path)."""

    def __post_init__(self) -> None:
        require(isinstance(self.out_dir, str) and self.out_dir.strip() != "", "run.out_dir", self.out_dir,
                "it must be a folder path.")


@dataclass(kw_only=True)
class JobConfig:
    """A whole training job; sections are the fields below, ``preset`` records where it started from."""

    preset: str = "tiny-opt"
    """The preset the job was built from (informational: the sections hold every value)."""
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    task: TaskConfig = field(default_factory=TaskConfig)
    optim: ZOConfig = field(default_factory=ZOConfig)
    offload: OffloadConfig = field(default_factory=OffloadConfig)
    peft: PeftConfig = field(default_factory=PeftConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    run: RunConfig = field(default_factory=RunConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    control: ControlConfig = field(default_factory=ControlConfig)

    def __post_init__(self) -> None:
        if self.optim.device is not None and self.train.device not in ("auto", self.optim.device):
            raise ConfigError(
                f"Invalid config: optim.device = {self.optim.device!r} and train.device = {self.train.device!r} "
                "disagree. Set only train.device (the trainer passes it to the engine)."
            )
        if self.model.path is None and self.data.max_length > self.model.max_positions:
            raise ConfigError(
                f"Invalid config: data.max_length = {self.data.max_length} exceeds model.max_positions = "
                f"{self.model.max_positions}, the longest sequence the model accepts. Lower data.max_length or "
                "raise model.max_positions."
            )
