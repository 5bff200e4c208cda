"""Reading a task's splits from local files: jsonl, a JSON list, GLUE .tsv, or Hugging Face ``datasets`` folders.

``task.path`` may be

* a folder of split files, as the SuperGLUE and GLUE downloads unpack: ``train.jsonl`` and ``val.jsonl``
  (also ``validation``/``dev``/``valid`` and ``.json``/``.tsv``, or sub-folders saved with ``save_to_disk``);
* a ``DatasetDict`` folder saved with ``save_to_disk`` holding a ``train`` and a ``validation`` (or ``val``,
  ``dev``, ``valid``) split;
* a single file or ``Dataset`` folder: then it is the training split and ``task.eval_path`` names the
  evaluation split (``eval_path`` alone is enough for evaluation only).
"""

from __future__ import annotations

import csv
import io
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from zo2.errors import DataError
from zo2.train.data import as_record, read_jsonl_records, read_text
from zo2.tasks.base import Task, TaskExample

TRAIN_SPLITS = ("train",)
EVAL_SPLITS = ("validation", "val", "dev", "valid")
SUFFIXES = (".jsonl", ".json", ".tsv")


@dataclass(frozen=True)
class Source:
    """Where one split is: a file, a ``Dataset`` folder, or one split of a ``DatasetDict`` folder."""

    path: Path
    split: str | None = None

    def __str__(self) -> str:
        return f"{self.path} [{self.split}]" if self.split else str(self.path)


# ----------------------------------------------------------------------------------------------------------
# Finding the splits
# ----------------------------------------------------------------------------------------------------------

def _is_dataset(path: Path) -> bool:
    return path.is_dir() and (path / "state.json").is_file()


def _dict_splits(path: Path) -> list[str] | None:
    """The split names of a ``DatasetDict`` folder, or None when ``path`` is not one."""
    index = path / "dataset_dict.json"
    if not index.is_file():
        return None
    try:
        return list(json.loads(index.read_text(encoding="utf-8"))["splits"])
    except (ValueError, KeyError, TypeError) as exc:
        raise DataError(f"{index} is not a valid datasets index ({exc!r}). Re-save the folder with "
                        "DatasetDict.save_to_disk().") from exc


def _existing(path: str | Path, key: str) -> Path:
    p = Path(path).expanduser()
    if not p.exists():
        raise DataError(f"{key} = {str(p)!r} does not exist. Point it at a folder of split files (train.jsonl, "
                        "val.jsonl), a datasets folder saved with save_to_disk, or a .jsonl/.json/.tsv file.")
    return p


def find_split(path: str | Path, names: Sequence[str], key: str = "task.path") -> Source:
    """The split called one of ``names`` (in that order of preference) under ``path``; a file or ``Dataset``
    folder is a split by itself."""
    p = _existing(path, key)
    if p.is_file() or _is_dataset(p):
        return Source(p)
    splits = _dict_splits(p)
    if splits is not None:
        found = next((s for s in names if s in splits), None)
        if found is None:
            raise DataError(f"The datasets folder {key} = {str(p)!r} has the splits {splits} but none of "
                            f"{list(names)}. Rename the split, or save it alone and point {key} at it.")
        return Source(p, found)
    for name in names:
        for candidate in [p / f"{name}{suffix}" for suffix in SUFFIXES] + [p / name]:
            if candidate.is_file() or _is_dataset(candidate):
                return Source(candidate)
    wanted = ", ".join(f"{n}{s}" for n in names for s in SUFFIXES[:1] + SUFFIXES[2:])
    raise DataError(f"The folder {key} = {str(p)!r} holds no {names[0]} split: looked for {wanted} (also .json, "
                    "or a datasets folder of that name). Add the file, or point the key at the split's file.")


def split_sources(path: str | Path | None, eval_path: str | Path | None = None
                  ) -> tuple[Source | None, Source]:
    """``(train, eval)`` sources of ``task.path`` / ``task.eval_path`` (train is None with ``eval_path`` alone)."""
    if path is None and eval_path is None:
        raise DataError("No task data: set task.path to the task's folder (train.jsonl and val.jsonl, or a datasets "
                        "folder), or task.eval_path to an evaluation split.")
    if eval_path is not None:
        evals = find_split(eval_path, EVAL_SPLITS, "task.eval_path")
        return (find_split(path, TRAIN_SPLITS) if path is not None else None), evals
    p = _existing(path, "task.path")
    if p.is_file() or _is_dataset(p):
        raise DataError(f"task.path = {str(p)!r} holds a single split. Set task.eval_path to the evaluation split, "
                        "or point task.path at a folder holding train.jsonl and val.jsonl (or a DatasetDict "
                        "folder with 'train' and 'validation').")
    return find_split(p, TRAIN_SPLITS), find_split(p, EVAL_SPLITS)


# ----------------------------------------------------------------------------------------------------------
# Reading records
# ----------------------------------------------------------------------------------------------------------

def read_records(source: Source) -> list[tuple[str, dict]]:
    """``(location, record)`` pairs of one split: locations ('file, line 3') go into error messages."""
    p = source.path
    if p.is_dir():
        records = _read_dataset(source)
    elif p.suffix.lower() == ".jsonl":
        records = _read_jsonl(p)
    elif p.suffix.lower() == ".json":
        records = _read_json(p)
    elif p.suffix.lower() == ".tsv":
        records = _read_tsv(p)
    else:
        raise DataError(f"{p} has the extension {p.suffix or '(none)'!r}; task files are .jsonl, .json (a list of "
                        "records) or .tsv (GLUE). Convert it, or save it as a datasets folder with save_to_disk.")
    if not records:
        raise DataError(f"{source} holds no records. Point the task at a split with examples.")
    return records


def _text(path: Path) -> str:
    return read_text(path)


def _read_jsonl(path: Path) -> list[tuple[str, dict]]:
    """One JSON object per non-blank line, each with its location (file and line) for error messages."""
    return [(f"{path}, {where}", record) for where, record in read_jsonl_records(path)]


def _read_json(path: Path) -> list[tuple[str, dict]]:
    try:
        data = json.loads(_text(path))
    except json.JSONDecodeError as exc:
        raise DataError(f"{path} is not valid JSON ({exc.msg}, line {exc.lineno}). Fix the file.") from exc
    if not isinstance(data, list):
        raise DataError(f"{path} holds a JSON {type(data).__name__}, not a list of records. Write the records as a "
                        "list, or one per line in a .jsonl file.")
    return [(f"{path}, record {i}", as_record(r, path, f"record {i}")) for i, r in enumerate(data, start=1)]


def _read_tsv(path: Path) -> list[tuple[str, dict]]:
    """Tab-separated values with a header row (GLUE's format; quotes are text, not quoting)."""
    reader = csv.DictReader(io.StringIO(_text(path), newline=""), delimiter="\t", quoting=csv.QUOTE_NONE)
    return [(f"{path}, line {reader.line_num}", {k: v for k, v in row.items() if k is not None})
            for row in reader if any(v not in (None, "") for v in row.values())]


def _read_dataset(source: Source) -> list[tuple[str, dict]]:
    """A ``save_to_disk`` folder (one split of it for a ``DatasetDict``)."""
    try:
        import datasets
    except ImportError as exc:
        raise DataError(f"{source.path} is a Hugging Face datasets folder, but the datasets package is not "
                        "installed. Run `pip install datasets`, or export the split to .jsonl "
                        "(ds.to_json('val.jsonl')).") from exc
    try:
        ds = datasets.load_from_disk(str(source.path))
    except Exception as exc:  # datasets raises many kinds
        raise DataError(f"Could not read the datasets folder {source.path}: {exc}. Re-save it with save_to_disk(), "
                        "or export the split to .jsonl.") from exc
    if isinstance(ds, datasets.DatasetDict):
        ds = ds[source.split or next(iter(ds))]
    return [(f"{source}, row {i}", dict(row)) for i, row in enumerate(ds)]


# ----------------------------------------------------------------------------------------------------------
# Records → examples
# ----------------------------------------------------------------------------------------------------------

def load_split(task: Task, source: Source | str | Path) -> list[TaskExample]:
    """Every example of one split (a file, a ``Dataset`` folder, or a :class:`Source`)."""
    if not isinstance(source, Source):
        source = find_split(source, EVAL_SPLITS + TRAIN_SPLITS, "the split path")
    return [ex for where, record in read_records(source) for ex in task.examples(record, where)]
