"""What every task shares: the example type, the task interface and the field readers behind its errors.

A :class:`Task` turns one record of a public data file into :class:`TaskExample` s (MultiRC and ReCoRD records
hold several) and formats them with MeZO's prompt template: ``prompt(example)`` is the template's ``encode``
(the text before the answer) and ``verbalize(example, candidate)`` its ``verbalize`` (the text with the answer).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Sequence

from zo2.errors import DataError

CLASSIFICATION = "classification"
"""Every example is scored against a list of candidates (verbalizers, choices or entities)."""
GENERATION = "generation"
"""The answer is generated greedily and scored with SQuAD F1 / exact match."""


@dataclass(frozen=True)
class TaskExample:
    """One example of a task, in the layout its template reads.

    Classification examples carry ``candidates`` (what ``Task.verbalize`` fills in: a class id, a choice text
    or an entity) and ``correct`` (indices of the right ones); generation examples carry ``answers``.
    """

    data: Mapping[str, Any]
    """The fields the template reads (``sentence``, ``premise``, ``question``, ...)."""
    candidates: tuple[Any, ...] = ()
    """Classification: the candidates in MeZO's order; empty for generation."""
    correct: tuple[int, ...] = ()
    """Classification: indices into ``candidates`` of the correct ones (ReCoRD can have several); the first is
    the training target."""
    answers: tuple[str, ...] = ()
    """Generation: the reference answers; the first is the training target."""
    label: int | None = None
    """The class for per-class few-shot sampling (None when the candidates differ per example)."""

    @property
    def target(self) -> Any:
        """What the training sequence verbalizes: the first correct candidate, or the first answer."""
        return self.candidates[self.correct[0]] if self.candidates else self.answers[0]


class Task:
    """A MeZO task: how records become examples and how examples become prompts."""

    name: str = ""
    """Canonical name, as MeZO spells it (``SST2``, ``Copa``, ``SQuAD``...)."""
    kind: str = CLASSIFICATION
    metric: str = "accuracy"
    """Metric MeZO reports: 'accuracy' for classification, 'f1' for SQuAD and DROP."""
    train_as_classification: bool = True
    """MeZO's setting (mezo.sh): the candidate-scoring loss, except for Copa, ReCoRD, SQuAD and DROP, which train
    on the gold answer's tokens."""
    default_num_dev: int = 500
    """mezo.sh's DEV: 500, or 100 for the small CB and Copa training sets."""
    separator: str = "\n\n"
    """Text between in-context demonstrations (MeZO's ``train_sep``)."""
    layouts: str = ""
    """The record layouts the task reads, for error messages."""

    @property
    def generation(self) -> bool:
        return self.kind == GENERATION

    def examples(self, record: Mapping[str, Any], where: str) -> list[TaskExample]:
        """The examples in one record (``where`` locates it in error messages)."""
        raise NotImplementedError

    def prompt(self, example: TaskExample) -> str:
        """The template's text before the answer."""
        raise NotImplementedError

    def verbalize(self, example: TaskExample, candidate: Any) -> str:
        """The template's text with ``candidate`` as the answer."""
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"<task {self.name}>"


# ----------------------------------------------------------------------------------------------------------
# Field readers: a DataError naming the task, the record, the field and the layouts the task reads
# ----------------------------------------------------------------------------------------------------------

def fields_of(record: Mapping[str, Any]) -> str:
    """The record's field names for messages."""
    return ", ".join(repr(k) for k in record) or "(none)"


def missing_field(task: Task, record: Mapping[str, Any], where: str, name: str) -> DataError:
    return DataError(f"{where}: the {task.name} record has no field {name!r} (its fields are {fields_of(record)}). "
                     f"{task.name} reads {task.layouts}. Convert the file to one of these layouts.")


def text_field(task: Task, record: Mapping[str, Any], where: str, *names: str) -> str:
    """The first of ``names`` present in ``record``, as text."""
    for name in names:
        if name in record and record[name] is not None:
            value = record[name]
            if isinstance(value, bool) or not isinstance(value, (str, int, float)):
                raise DataError(f"{where}: field {name!r} of the {task.name} record holds a {type(value).__name__}, "
                                f"not text. {task.name} reads {task.layouts}.")
            return str(value)
    raise missing_field(task, record, where, names[0])


def text_list(task: Task, record: Mapping[str, Any], where: str, name: str, key: str | None = None) -> list[str]:
    """``record[name]`` as a list of strings: a list, or (HF column layout) a dict whose ``key`` holds the list."""
    if record.get(name) is None:
        raise missing_field(task, record, where, name)
    value = record[name]
    if isinstance(value, Mapping) and key is not None:
        value = value.get(key)
    if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
        shape = f"a list of strings or {{{key!r}: [...]}}" if key else "a list of strings"
        raise DataError(f"{where}: field {name!r} of the {task.name} record must be {shape}, got {record[name]!r}. "
                        f"{task.name} reads {task.layouts}.")
    return list(value)


def _label_value(task: Task, record: Mapping[str, Any], where: str, names: Sequence[str]) -> tuple[str, Any]:
    """``(field name, value)`` of the first of ``names`` present in ``record``."""
    name = next((n for n in names if record.get(n) is not None), None)
    if name is None:
        raise missing_field(task, record, where, names[0])
    return name, record[name]


def _unlabeled_hint(value: Any) -> str:
    return (" A label of -1 marks an unlabeled (test split) record; train and evaluate on labeled splits."
            if value in (-1, "-1") else "")


def class_label(task: Task, record: Mapping[str, Any], where: str, names: Sequence[str], num_classes: int,
                strings: Mapping[str, int] | None = None) -> int:
    """The class index in the first of ``names``: an integer in ``0..num_classes-1`` (or its digits), or one of
    the label strings of the SuperGLUE jsonl files (``strings``, e.g. 'entailment' → 0)."""
    name, value = _label_value(task, record, where, names)
    number = value
    if isinstance(value, str):
        key = value.strip().lower()
        if strings and key in strings:
            return strings[key]
        number = int(key) if key.lstrip("-").isdigit() else None
    elif isinstance(value, float) and value.is_integer():
        number = int(value)
    if isinstance(number, int) and not isinstance(number, bool) and 0 <= number < num_classes:
        return number
    words = f" or one of {', '.join(repr(k) for k in strings)}" if strings else ""
    raise DataError(f"{where}: the {task.name} label {name!r} = {value!r} is not a class: use an integer in "
                    f"0..{num_classes - 1}{words}.{_unlabeled_hint(value)}")


def truth(task: Task, record: Mapping[str, Any], where: str, names: Sequence[str]) -> bool:
    """A yes/no label: true/false, 1/0 or 'true'/'false' (SuperGLUE jsonl and HF ``datasets`` layouts)."""
    name, value = _label_value(task, record, where, names)
    if isinstance(value, bool):
        return value
    key = value.strip().lower() if isinstance(value, str) else value
    if key in (1, 1.0, "1", "true"):
        return True
    if key in (0, 0.0, "0", "false"):
        return False
    raise DataError(f"{where}: the {task.name} label {name!r} = {value!r} is not a yes/no label: use true/false or "
                    f"1/0.{_unlabeled_hint(value)}")


def nested(task: Task, record: Mapping[str, Any], where: str, name: str, kind: type) -> Any:
    """``record[name]`` checked to be a ``kind`` (dict or list) of a nested SuperGLUE record."""
    value = record.get(name)
    if not isinstance(value, kind):
        raise DataError(f"{where}: field {name!r} of the {task.name} record must be a "
                        f"{'JSON object' if kind is dict else 'list'}, got {value!r}. {task.name} reads "
                        f"{task.layouts}.")
    return value
