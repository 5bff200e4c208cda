"""The data pipeline: local files → records → token sequences with loss masks → deterministic batches.

* Readers: ``.jsonl``, ``.json`` (a list of records), ``.csv`` (header row), ``.txt`` (one example per
  non-empty line) and Hugging Face ``datasets`` folders written by ``save_to_disk``.
* Formats (:class:`~zo2.config.data.DataConfig` explains them): ``text``, ``prompt_completion``,
  ``classification``. Labels are the input ids with -100 where no loss is taken (the model shifts them).
* :class:`BatchLoader`: epoch ``e``'s order is a pure function of ``(seed, e)``; ``position()``/``seek()``
  make a resumed run see exactly the batches the uninterrupted one would; each data-parallel rank gets a
  contiguous shard of every global batch.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch

from zo2.config.data import DataConfig
from zo2.errors import DataError
from zo2.train.tokenizer import encode, special_ids

IGNORE_INDEX = -100
"""Label value the loss skips (prompt and padding positions)."""

FILE_READERS = (".jsonl", ".json", ".csv", ".txt")

Located = tuple[str, dict]
"""A record and where it came from ('line 3', 'record 2', 'row 7'), for error messages."""


@dataclass(frozen=True)
class Example:
    """One tokenized example: ids and labels of the same length (labels -100 where no loss is taken)."""

    input_ids: tuple[int, ...]
    labels: tuple[int, ...]


# ----------------------------------------------------------------------------------------------------------
# Reading files
# ----------------------------------------------------------------------------------------------------------

def default_data_path() -> Path:
    """The tiny English corpus shipped with zo2 (a few hundred short sentences, format 'text')."""
    return Path(str(resources.files("zo2.data") / "tiny_corpus.jsonl"))


def default_classification_path() -> Path:
    """The tiny sentiment fixture shipped with zo2 (64 {"text", "label"} records, format 'classification')."""
    return Path(str(resources.files("zo2.data") / "tiny_sst2.jsonl"))


def read_records(path: str | Path, *, text_field: str = "text") -> list[Located]:
    """All records of a local data file or ``datasets`` folder, as ``(location, record)`` pairs.

    ``.txt`` lines become ``{text_field: line}``. Raises :class:`DataError` for a missing path, an
    unsupported file type, unparsable content or a file without records.
    """
    p = Path(path).expanduser()
    if not p.exists():
        raise DataError(f"Data path {str(p)!r} does not exist. Set data.path to an existing .jsonl, .json, "
                        ".csv or .txt file or a datasets folder saved with save_to_disk, or unset it to use "
                        "the tiny corpus shipped with zo2.")
    if p.is_dir():
        records = _read_hf_dataset(p)
    else:
        suffix = p.suffix.lower()
        readers = {".jsonl": read_jsonl_records, ".json": _read_json, ".csv": _read_csv}
        if suffix == ".txt":
            records = _read_txt(p, text_field)
        elif suffix in readers:
            records = readers[suffix](p)
        else:
            raise DataError(f"Data file {str(p)!r} has the extension {suffix or '(none)'!r}, which zo2 cannot "
                            f"read. Convert it to one of {', '.join(FILE_READERS)}, or save it as a datasets "
                            "folder with save_to_disk.")
    if not records:
        raise DataError(f"Data path {str(p)!r} holds no examples. Add records to it or point data.path at "
                        "another dataset.")
    return records


def read_text(path: Path) -> str:
    """The file's text, or a DataError if it is not UTF-8."""
    try:
        return path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as exc:
        raise DataError(f"Data file {str(path)!r} is not UTF-8 text ({exc.reason} at byte {exc.start}). "
                        "Re-save it as UTF-8.") from exc


def read_jsonl_records(path: Path) -> list[Located]:
    """One JSON object per non-blank line."""
    out: list[Located] = []
    for n, line in enumerate(read_text(path).splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataError(f"{path}, line {n} is not valid JSON ({exc.msg}, column {exc.colno}). Fix or "
                            "remove that line: a .jsonl file holds one JSON object per line.") from exc
        out.append((f"line {n}", as_record(record, path, f"line {n}")))
    return out


def _read_json(path: Path) -> list[Located]:
    """A JSON list of objects."""
    try:
        data = json.loads(read_text(path))
    except json.JSONDecodeError as exc:
        raise DataError(f"{path} is not valid JSON ({exc.msg}, line {exc.lineno}, column {exc.colno}). Fix "
                        "the file: a .json data file holds one list of records.") from exc
    if not isinstance(data, list):
        raise DataError(f"{path} holds a JSON {type(data).__name__}, not a list of records. Wrap the records "
                        "in [...], or write one record per line to a .jsonl file.")
    return [(f"record {i}", as_record(r, path, f"record {i}")) for i, r in enumerate(data, start=1)]


def _read_csv(path: Path) -> list[Located]:
    """Comma-separated values with a header row naming the fields."""
    reader = csv.DictReader(io.StringIO(read_text(path), newline=""))
    out: list[Located] = []
    for row in reader:
        if all(v is None or v == "" for v in row.values()):
            continue
        out.append((f"line {reader.line_num}", {k: v for k, v in row.items() if k is not None}))
    return out


def _read_txt(path: Path, text_field: str) -> list[Located]:
    """One example per non-empty line."""
    return [(f"line {n}", {text_field: line.strip()})
            for n, line in enumerate(read_text(path).splitlines(), start=1) if line.strip()]


def _read_hf_dataset(path: Path) -> list[Located]:
    """A folder written by ``Dataset.save_to_disk`` (or a ``DatasetDict`` with a 'train' split)."""
    if not ((path / "state.json").is_file() or (path / "dataset_dict.json").is_file()):
        raise DataError(f"Data path {str(path)!r} is a folder but not a Hugging Face datasets folder (no "
                        "state.json or dataset_dict.json). Point data.path at a data file, or at a folder "
                        "written by Dataset.save_to_disk().")
    try:
        import datasets
    except ImportError as exc:
        raise DataError(f"Data path {str(path)!r} is a Hugging Face datasets folder, but the datasets package "
                        "is not installed. Run `pip install datasets`, or export the data to .jsonl.") from exc
    try:
        ds = datasets.load_from_disk(str(path))
    except Exception as exc:  # datasets raises many kinds
        raise DataError(f"Could not read the datasets folder {str(path)!r}: {exc}. Re-save it with "
                        "save_to_disk(), or export the data to .jsonl.") from exc
    if isinstance(ds, datasets.DatasetDict):
        if "train" not in ds:
            raise DataError(f"The datasets folder {str(path)!r} has the splits {sorted(ds)} but no 'train' "
                            "split. Save the split to train on by itself: ds['<split>'].save_to_disk(...).")
        ds = ds["train"]
    return [(f"row {i}", dict(row)) for i, row in enumerate(ds)]


def as_record(value: Any, path: Path, where: str) -> dict:
    """``value`` if it is a JSON object, else a DataError."""
    if not isinstance(value, dict):
        raise DataError(f"{path}, {where} is a JSON {type(value).__name__}, not an object with named fields. "
                        'Write each example as an object, e.g. {"text": "..."}.')
    return value


# ----------------------------------------------------------------------------------------------------------
# Formats: records → examples
# ----------------------------------------------------------------------------------------------------------

def resolve_format(cfg: DataConfig, record: dict, source: str = "the data") -> str:
    """``cfg.format``, or for 'auto' the format the first record's fields call for."""
    if cfg.format != "auto":
        return cfg.format
    if cfg.prompt_field in record and cfg.completion_field in record:
        return "prompt_completion"
    if cfg.label_field in record:
        return "classification"
    if cfg.text_field in record:
        return "text"
    raise DataError(f"Cannot tell the format of {source}: its first record has the fields "
                    f"{_fields(record)} but none of data.text_field = {cfg.text_field!r}, data.label_field = "
                    f"{cfg.label_field!r}, or data.prompt_field/completion_field = {cfg.prompt_field!r}/"
                    f"{cfg.completion_field!r}. Set these to your field names, or set data.format.")


def encode_record(record: dict, fmt: str, cfg: DataConfig, tokenizer: Any, where: str = "a record") -> Example:
    """Tokenize one record in format ``fmt``, truncated to ``cfg.max_length`` tokens."""
    _, eos = special_ids(tokenizer)
    tail = [eos] if eos is not None else []
    if fmt == "text":
        ids = (encode(tokenizer, _field(record, cfg.text_field, "text_field", fmt, where), add_bos=True)
               + tail)[: cfg.max_length]
        return Example(tuple(ids), tuple(ids))
    if fmt == "prompt_completion":
        prompt = _field(record, cfg.prompt_field, "prompt_field", fmt, where)
        completion = _field(record, cfg.completion_field, "completion_field", fmt, where)
        completion_ids = encode(tokenizer, completion, add_bos=False) + tail
    elif fmt == "classification":
        prompt = _fill_template(cfg.template, record, where)
        completion_ids = encode(tokenizer, cfg.verbalizer[_label(record, cfg, where)], add_bos=False)
    else:
        raise ValueError(f"unknown data format {fmt!r}")
    if not completion_ids:
        raise DataError(f"{where}: the completion is empty, so there is nothing to compute a loss on. Give "
                        "every record a non-empty completion.")
    prompt_ids, completion_ids = fit_to_length(encode(tokenizer, prompt, add_bos=True), completion_ids,
                                               cfg.max_length, keeps_first=getattr(tokenizer, "bos_token_id",
                                                                                   None) is not None)
    return Example(tuple(prompt_ids + completion_ids),
                   tuple([IGNORE_INDEX] * len(prompt_ids) + completion_ids))


def fit_to_length(prompt: list[int], completion: list[int], max_length: int,
                  keeps_first: bool = True) -> tuple[list[int], list[int]]:
    """Cut ``prompt + completion`` to ``max_length`` tokens, keeping the completion.

    The prompt loses tokens from its left side (after its first token, the BOS, when ``keeps_first``); at
    least one prompt token stays so the first completion token has something to be predicted from. Only a
    completion longer than ``max_length - 1`` loses its own end.
    """
    if len(prompt) + len(completion) <= max_length:
        return prompt, completion
    completion = completion[: max_length - 1]
    room = max_length - len(completion)
    if keeps_first and room >= 2 and len(prompt) >= 2:
        return [prompt[0], *prompt[1:][-(room - 1):]], completion
    return prompt[-room:], completion


def _field(record: dict, name: str, key: str, fmt: str, where: str) -> str:
    """``record[name]`` as text, or a DataError naming the field, the location and the config key."""
    value = record.get(name)
    if value is None:
        raise DataError(f"{where}: the record has no field {name!r}, which format {fmt!r} reads (data.{key}). "
                        f"Its fields are {_fields(record)}. Set data.{key} to the right field name, or fix "
                        "the record.")
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        raise DataError(f"{where}: field {name!r} holds a {type(value).__name__}, not text. Store text in it "
                        f"or set data.{key} to another field.")
    return value if isinstance(value, str) else str(value)


def _fill_template(template: str, record: dict, where: str) -> str:
    """``template.format(**record)`` with errors that name the template and the record."""
    try:
        return template.format(**record)
    except KeyError as exc:
        raise DataError(f"{where}: data.template = {template!r} uses the field {exc.args[0]!r}, which the "
                        f"record does not have (its fields are {_fields(record)}). Fix data.template or the "
                        "record.") from exc
    except (ValueError, IndexError) as exc:
        raise DataError(f"data.template = {template!r} is not a valid format string ({exc}). Name record "
                        "fields in braces, e.g. '{text} It was', and double literal braces: '{{'.") from exc


def _label(record: dict, cfg: DataConfig, where: str) -> int:
    """The record's class index into ``cfg.verbalizer``."""
    value = record.get(cfg.label_field)
    if value is None:
        raise DataError(f"{where}: the record has no field {cfg.label_field!r}, which format 'classification' "
                        f"reads (data.label_field). Its fields are {_fields(record)}. Set data.label_field to "
                        "the field holding the class index, or fix the record.")
    label: int | None = None
    if isinstance(value, int):
        label = int(value)
    elif isinstance(value, float) and value.is_integer():
        label = int(value)
    elif isinstance(value, str) and value.strip().lstrip("-").isdigit():
        label = int(value.strip())
    if label is None or not 0 <= label < len(cfg.verbalizer):
        raise DataError(f"{where}: label {value!r} is not a class index in 0..{len(cfg.verbalizer) - 1} "
                        f"(data.verbalizer has {len(cfg.verbalizer)} entries: {cfg.verbalizer}). Fix the "
                        "label, or give data.verbalizer one entry per class.")
    return label


def _fields(record: dict) -> str:
    """The record's field names for messages."""
    return ", ".join(repr(k) for k in record) or "(none)"


def load_examples(cfg: DataConfig, tokenizer: Any) -> list[Example]:
    """Read ``cfg.path`` (or the shipped corpus) and tokenize every record; errors name the bad record."""
    path = Path(cfg.path).expanduser() if cfg.path is not None else default_data_path()
    records = read_records(path, text_field=cfg.text_field)
    fmt = resolve_format(cfg, records[0][1], str(path))
    return [encode_record(rec, fmt, cfg, tokenizer, f"{path}, {where}") for where, rec in records]


# ----------------------------------------------------------------------------------------------------------
# Batches
# ----------------------------------------------------------------------------------------------------------

def collate(examples: Sequence[Example], pad_id: int, pad_to: int | None = None) -> dict[str, torch.Tensor]:
    """Right-pad ``examples`` to ``pad_to`` (default: the longest) into int64 ``input_ids``,
    ``attention_mask`` (1 on real tokens) and ``labels`` (-100 on padding)."""
    width = max([len(e.input_ids) for e in examples] + [pad_to or 0])
    ids = torch.full((len(examples), width), pad_id, dtype=torch.int64)
    mask = torch.zeros((len(examples), width), dtype=torch.int64)
    labels = torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.int64)
    for row, ex in enumerate(examples):
        n = len(ex.input_ids)
        ids[row, :n] = torch.tensor(ex.input_ids, dtype=torch.int64)
        mask[row, :n] = 1
        labels[row, :n] = torch.tensor(ex.labels, dtype=torch.int64)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def epoch_seed(seed: int, epoch: int) -> int:
    """The shuffle seed of epoch ``epoch``: a hash of ``(seed, epoch)``, stable across runs and versions."""
    digest = hashlib.blake2b(f"zo2-data:{seed}:{epoch}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


def epoch_order(num_examples: int, seed: int, epoch: int, shuffle: bool = True) -> torch.Tensor:
    """Example indices in epoch ``epoch``'s order: a ``torch.randperm`` seeded by :func:`epoch_seed`."""
    if not shuffle:
        return torch.arange(num_examples)
    gen = torch.Generator().manual_seed(epoch_seed(seed, epoch))
    return torch.randperm(num_examples, generator=gen)


def count_tokens(batch: dict[str, torch.Tensor]) -> int:
    """Real (non-padding) tokens in ``batch``."""
    return int(batch["attention_mask"].sum())


def count_loss_tokens(batch: dict[str, torch.Tensor]) -> int:
    """Tokens the causal-LM loss is taken on: labels != -100 after the one-token shift (position 0 never is)."""
    return int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())


class BatchLoader:
    """Deterministic, resumable, shardable batches, cycling through epochs forever.

    A global batch is ``cfg.batch_size`` consecutive examples of the epoch's order; rank ``r`` of
    ``world_size`` gets the ``r``-th of ``world_size`` contiguous, disjoint shards of it. All shards of a step
    are padded to the longest example of the global batch, so every rank's tensors have the same shape.
    """

    def __init__(self, cfg: DataConfig, tokenizer: Any, *, rank: int = 0, world_size: int = 1,
                 examples: Sequence[Example] | None = None):
        """Read and tokenize ``cfg.path`` (or use ``examples``) and start at epoch 0, example 0."""
        if not (isinstance(world_size, int) and world_size >= 1 and isinstance(rank, int)
                and 0 <= rank < world_size):
            raise ValueError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
        self.cfg = cfg
        self.rank = rank
        self.world_size = world_size
        self.pad_id, _ = special_ids(tokenizer)
        self.examples: list[Example] = list(examples) if examples is not None else load_examples(cfg, tokenizer)
        self._check_sizes()
        self._epoch = 0
        self._index = 0
        self._order_epoch = -1
        self._order = torch.empty(0, dtype=torch.int64)

    def _check_sizes(self) -> None:
        """DataErrors for batch sizes the data or the ranks cannot be split into."""
        n, size, world = len(self.examples), self.cfg.batch_size, self.world_size
        source = self.cfg.path or "the shipped tiny corpus"
        if n == 0:
            raise DataError(f"{source} holds no examples. Point data.path at a dataset with records.")
        if size % world:
            raise DataError(f"data.batch_size = {size} does not divide into {world} data-parallel ranks. Set "
                            f"data.batch_size to a multiple of {world} (it is the global batch).")
        if n < size and self.cfg.drop_last:
            raise DataError(f"{source} has only {n} examples, fewer than one batch (data.batch_size = {size}). "
                            "Lower data.batch_size, add examples, or set data.drop_last = false to train on "
                            "smaller batches.")
        last = n % size
        if not self.cfg.drop_last and last and last < world:
            raise DataError(f"The last batch of each epoch has {last} examples, fewer than the {world} "
                            "data-parallel ranks that must share it. Set data.drop_last = true, or change "
                            "data.batch_size so the dataset size is a multiple of it.")

    # ----- sizes ---------------------------------------------------------------------------------------------

    @property
    def num_examples(self) -> int:
        """Examples in one epoch (the whole dataset)."""
        return len(self.examples)

    @property
    def batches_per_epoch(self) -> int:
        """Global batches (steps) per epoch."""
        full, rest = divmod(self.num_examples, self.cfg.batch_size)
        return full + (1 if rest and not self.cfg.drop_last else 0)

    @property
    def local_batch_size(self) -> int:
        """Examples this rank gets per full batch: batch_size / world_size."""
        return self.cfg.batch_size // self.world_size

    # ----- position ------------------------------------------------------------------------------------------

    def position(self) -> dict:
        """Where the next batch starts: ``{"epoch": e, "index": i}``, i = examples of epoch e already used."""
        return {"epoch": self._epoch, "index": self._index}

    def seek(self, position: dict) -> None:
        """Continue from a ``position()`` saved earlier: the next batches equal those the run that saved it
        would have drawn next (same data, batch size, seed and world size)."""
        epoch, index = (position or {}).get("epoch"), (position or {}).get("index")
        if not (_is_int(epoch) and _is_int(index) and epoch >= 0 and 0 <= index <= self.num_examples):
            raise DataError(f"Saved data position {position!r} does not fit this dataset of {self.num_examples} "
                            "examples. Resume with the same data.path, or start a new run.")
        self._epoch, self._index = self._normalized(epoch, index)

    def _normalized(self, epoch: int, index: int) -> tuple[int, int]:
        """``(epoch, index)``, moved to the next epoch's start when no (full, under drop_last) batch is left."""
        left = self.num_examples - index
        if left <= 0 or (self.cfg.drop_last and left < self.cfg.batch_size):
            return epoch + 1, 0
        return epoch, index

    # ----- batches -------------------------------------------------------------------------------------------

    def next_batch(self) -> dict[str, torch.Tensor]:
        """This rank's shard of the next global batch: int64 ``input_ids``, ``attention_mask``, ``labels``."""
        epoch, index = self._normalized(self._epoch, self._index)
        chosen = self._epoch_order(epoch)[index: index + self.cfg.batch_size].tolist()
        start, stop = shard_bounds(len(chosen), self.rank, self.world_size)
        width = max(len(self.examples[k].input_ids) for k in chosen)
        batch = collate([self.examples[k] for k in chosen[start:stop]], self.pad_id, pad_to=width)
        self._epoch, self._index = self._normalized(epoch, index + len(chosen))
        return batch

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        """Batches forever (one epoch after the other)."""
        while True:
            yield self.next_batch()

    def _epoch_order(self, epoch: int) -> torch.Tensor:
        """Epoch ``epoch``'s example order, cached for the current epoch."""
        if epoch != self._order_epoch:
            self._order = epoch_order(self.num_examples, self.cfg.seed, epoch, self.cfg.shuffle)
            self._order_epoch = epoch
        return self._order

    @staticmethod
    def tokens_in(batch: dict[str, torch.Tensor]) -> int:
        """Real (non-padding) tokens in ``batch``."""
        return count_tokens(batch)

    @staticmethod
    def loss_tokens_in(batch: dict[str, torch.Tensor]) -> int:
        """Tokens the loss is taken on in ``batch`` (see :func:`count_loss_tokens`)."""
        return count_loss_tokens(batch)


def shard_bounds(size: int, rank: int, world_size: int) -> tuple[int, int]:
    """``[start, stop)`` of rank ``rank``'s contiguous shard of ``size`` items (first shards 1 larger if uneven)."""
    base, extra = divmod(size, world_size)
    start = rank * base + min(rank, extra)
    return start, start + base + (1 if rank < extra else 0)


def _is_int(value: object) -> bool:
    """True for an int that is not a bool."""
    return isinstance(value, int) and not isinstance(value, bool)
