"""DataConfig: what the trainer reads and how it turns records into batches (the ``[data]`` section)."""

from __future__ import annotations

from dataclasses import dataclass, field

from zo2.config.base import require, require_choice

DATA_FORMATS = ("auto", "text", "prompt_completion", "classification")


@dataclass(kw_only=True)
class DataConfig:
    """Training data: where it is, how records become token sequences, and how they are batched.

    Sequences: ``text`` is ``bos + text + eos`` with loss on every token; ``prompt_completion`` is
    ``bos + prompt + completion + eos`` with loss on the completion and eos only; ``classification`` is
    ``bos + template.format(**record) + verbalizer[label]`` (no eos) with loss on the verbalized label only.
    """

    path: str | None = None
    """A local .jsonl, .json (a list of records), .csv (header row), .txt (one example per line) file or a
    Hugging Face ``datasets`` folder saved with ``save_to_disk``. None: the tiny corpus shipped with zo2."""
    format: str = "auto"
    """'text', 'prompt_completion', 'classification', or 'auto': prompt+completion fields present →
    prompt_completion, else a label field → classification, else a text field → text."""
    text_field: str = "text"
    """Record field holding the text (format 'text'; 'classification' templates usually use it too)."""
    prompt_field: str = "prompt"
    """Record field holding the prompt (format 'prompt_completion')."""
    completion_field: str = "completion"
    """Record field holding the completion, the only part the loss is computed on (format 'prompt_completion')."""
    label_field: str = "label"
    """Record field holding the integer class label, an index into ``verbalizer`` (format 'classification')."""
    template: str = "{text} It was"
    """Classification prompt, filled with ``template.format(**record)``; the verbalized label follows it."""
    verbalizer: list[str] = field(default_factory=lambda: [" terrible", " great"])
    """Completion text of each class, ``verbalizer[label]``; mind the leading space."""
    max_length: int = 64
    """Maximum tokens per example. Longer texts lose their end; prompt+completion pairs lose the prompt's
    beginning (the completion is kept)."""
    batch_size: int = 8
    """Examples per step across all data-parallel ranks (each rank gets batch_size / world_size)."""
    shuffle: bool = True
    """Shuffle the examples each epoch (epoch e's order is a pure function of (seed, e))."""
    seed: int = 0
    """Seed of the per-epoch shuffle."""
    drop_last: bool = True
    """Drop the last incomplete batch of each epoch; False keeps it (smaller batch)."""
    tokenizer: str | None = None
    """None: zo2's built-in byte tokenizer (259 ids); 'model': the model folder's tokenizer; otherwise a
    local folder readable by ``AutoTokenizer.from_pretrained``."""

    def __post_init__(self) -> None:
        require(self.path is None or (isinstance(self.path, str) and self.path.strip() != ""), "data.path",
                self.path, "it must be a file or folder path, or unset for the tiny corpus shipped with zo2.")
        require_choice("data.format", self.format, DATA_FORMATS)
        for name in ("text_field", "prompt_field", "completion_field", "label_field"):
            value = getattr(self, name)
            require(isinstance(value, str) and value != "", f"data.{name}", value,
                    "it must be the non-empty name of a record field.")
        require(isinstance(self.template, str) and "{" in self.template, "data.template", self.template,
                "it must be a format string naming record fields, e.g. '{text} It was'.")
        require(isinstance(self.verbalizer, (list, tuple)) and len(self.verbalizer) >= 1
                and all(isinstance(v, str) and v != "" for v in self.verbalizer), "data.verbalizer",
                self.verbalizer, "it must be a non-empty list of non-empty strings, e.g. [' terrible', ' great'].")
        self.verbalizer = list(self.verbalizer)
        require(_is_int(self.max_length) and self.max_length >= 2, "data.max_length", self.max_length,
                "it must be an integer >= 2 (tokens per example).")
        require(_is_int(self.batch_size) and self.batch_size >= 1, "data.batch_size", self.batch_size,
                "it must be an integer >= 1 (examples per step across all ranks).")
        require(isinstance(self.shuffle, bool), "data.shuffle", self.shuffle, "it must be true or false.")
        require(_is_int(self.seed) and self.seed >= 0, "data.seed", self.seed, "it must be a non-negative integer.")
        require(isinstance(self.drop_last, bool), "data.drop_last", self.drop_last, "it must be true or false.")
        require(self.tokenizer is None or (isinstance(self.tokenizer, str) and self.tokenizer.strip() != ""),
                "data.tokenizer", self.tokenizer,
                "it must be a tokenizer folder, 'model', or unset for the built-in byte tokenizer.")


def _is_int(value: object) -> bool:
    """True for an int that is not a bool."""
    return isinstance(value, int) and not isinstance(value, bool)
