"""MeZO's generation tasks: SQuAD (v1.1) and DROP, answered by greedy decoding and scored with SQuAD F1 / EM.

Records are in the Hugging Face ``datasets`` column layout (as jsonl or a ``save_to_disk`` folder):
SQuAD ``{'title', 'context', 'question', 'answers': {'text': [...], 'answer_start': [...]}}``, DROP
``{'passage', 'question', 'answers_spans': {'spans': [...], 'types': [...]}}``. Templates are MeZO's
``SQuADv2Template`` (used for SQuAD) and ``DROPTemplate``; the training sequence appends `` {answer}\\n``.
"""

from __future__ import annotations

from typing import Any, Mapping

from zo2.errors import DataError
from zo2.tasks.base import GENERATION, Task, TaskExample, text_field, text_list


class QATask(Task):
    kind = GENERATION
    metric = "f1"
    train_as_classification = False

    def _answers(self, record: Mapping[str, Any], where: str, name: str, key: str) -> tuple[str, ...]:
        answers = text_list(self, record, where, name, key)
        if not answers:
            raise DataError(f"{where}: the {self.name} record has no reference answer ({name} is empty); train and "
                            "evaluate on answered questions only.")
        return tuple(answers)

    def verbalize(self, example: TaskExample, candidate: Any) -> str:
        return f"{self.prompt(example)} {candidate}\n"


class SQuAD(QATask):
    name = "SQuAD"
    layouts = ("SQuAD records in the HF datasets layout {'title', 'context', 'question', 'answers': {'text': "
               "[...], 'answer_start': [...]}}")

    def examples(self, record: Mapping[str, Any], where: str) -> list[TaskExample]:
        data = {name: text_field(self, record, where, name) for name in ("title", "context", "question")}
        return [TaskExample(data=data, answers=self._answers(record, where, "answers", "text"))]

    def prompt(self, example: TaskExample) -> str:
        d = example.data
        return f"Title: {d['title']}\nContext: {d['context']}\nQuestion: {d['question'].strip()}\nAnswer:"


class DROP(QATask):
    name = "DROP"
    layouts = ("DROP records in the HF datasets layout {'passage', 'question', 'answers_spans': {'spans': [...], "
               "'types': [...]}}")

    def examples(self, record: Mapping[str, Any], where: str) -> list[TaskExample]:
        data = {"context": text_field(self, record, where, "passage"),
                "question": text_field(self, record, where, "question")}
        return [TaskExample(data=data, answers=self._answers(record, where, "answers_spans", "spans"))]

    def prompt(self, example: TaskExample) -> str:
        d = example.data
        return f"Passage: {d['context']}\nQuestion: {d['question'].strip()}\nAnswer:"


QA_TASKS: tuple[type[Task], ...] = (SQuAD, DROP)
