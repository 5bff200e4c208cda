"""MeZO's classification and multiple-choice tasks: SST-2 and the SuperGLUE tasks it fine-tunes on.

Prompt templates are MeZO's (``large_models/templates.py``; BoolQ uses its default, ``BoolQTemplateV3``; ReCoRD
``ReCoRDTemplateGPT3``). Records are read in both public layouts:

* the SuperGLUE jsonl files (``label`` as a string or boolean; MultiRC, ReCoRD and WSC nested), and
* the Hugging Face ``datasets`` column layout (``super_glue``, ``glue/sst2``, ``boolq``), as jsonl records or a
  folder saved with ``save_to_disk`` (integer labels, one row per MultiRC answer and per ReCoRD query).
"""

from __future__ import annotations

from typing import Any, Mapping

from zo2.errors import DataError
from zo2.tasks.base import (Task, TaskExample, class_label, nested, text_field, text_list,
                            truth)


class VerbalizerTask(Task):
    """A task whose candidates are the class ids and whose answers are fixed words (``verbalizer[class]``)."""

    verbalizer: tuple[str, ...] = ()

    def labeled(self, data: dict, label: int) -> TaskExample:
        candidates = tuple(range(len(self.verbalizer)))
        return TaskExample(data=data, candidates=candidates, correct=(label,), label=label)

    def verbalize(self, example: TaskExample, candidate: Any) -> str:
        return f"{self.prompt(example)}{self.verbalizer[candidate]}"


class SST2(VerbalizerTask):
    name = "SST2"
    verbalizer = ("terrible", "great")
    layouts = ("GLUE SST-2 records {'sentence', 'label': 0/1} (jsonl, or the GLUE .tsv with a 'sentence\\tlabel' "
               "header); 'text' is read when 'sentence' is absent")

    def examples(self, record: Mapping[str, Any], where: str) -> list[TaskExample]:
        data = {"sentence": text_field(self, record, where, "sentence", "text")}
        return [self.labeled(data, class_label(self, record, where, ["label"], 2))]

    def prompt(self, example: TaskExample) -> str:
        return f"{example.data['sentence'].strip()} It was"

    def verbalize(self, example: TaskExample, candidate: Any) -> str:
        return f"{self.prompt(example)} {self.verbalizer[candidate]}"


class RTE(VerbalizerTask):
    name = "RTE"
    verbalizer = ("Yes", "No")
    layouts = ("SuperGLUE RTE records {'premise', 'hypothesis', 'label': 'entailment'/'not_entailment' or 0/1}")

    def examples(self, record: Mapping[str, Any], where: str) -> list[TaskExample]:
        data = {"premise": text_field(self, record, where, "premise"),
                "hypothesis": text_field(self, record, where, "hypothesis")}
        label = class_label(self, record, where, ["label"], 2, {"entailment": 0, "not_entailment": 1})
        return [self.labeled(data, label)]

    def prompt(self, example: TaskExample) -> str:
        d = example.data
        return f"{d['premise']}\nDoes this mean that \"{d['hypothesis']}\" is true? Yes or No?\n"


class CB(VerbalizerTask):
    name = "CB"
    verbalizer = ("Yes", "No", "Maybe")
    default_num_dev = 100
    layouts = ("SuperGLUE CB records {'premise', 'hypothesis', 'label': 'entailment'/'contradiction'/'neutral' "
               "or 0/1/2}")

    def examples(self, record: Mapping[str, Any], where: str) -> list[TaskExample]:
        data = {"premise": text_field(self, record, where, "premise"),
                "hypothesis": text_field(self, record, where, "hypothesis")}
        label = class_label(self, record, where, ["label"], 3, {"entailment": 0, "contradiction": 1, "neutral": 2})
        return [self.labeled(data, label)]

    def prompt(self, example: TaskExample) -> str:
        d = example.data
        return f"Suppose {d['premise']} Can we infer that \"{d['hypothesis']}\"? Yes, No, or Maybe?\n"


class BoolQ(Task):
    name = "BoolQ"
    layouts = ("BoolQ records {'passage', 'question', 'label': true/false or 1/0} (SuperGLUE jsonl, HF "
               "super_glue/boolq) or {'passage', 'question', 'answer': true/false} (HF boolq)")

    def examples(self, record: Mapping[str, Any], where: str) -> list[TaskExample]:
        data = {"passage": text_field(self, record, where, "passage"),
                "question": text_field(self, record, where, "question")}
        label = 0 if truth(self, record, where, ["label", "answer"]) else 1
        return [TaskExample(data=data, candidates=("Yes", "No"), correct=(label,), label=label)]

    def prompt(self, example: TaskExample) -> str:
        question = example.data["question"]
        if not question.endswith("?"):
            question += "?"
        question = question[0].upper() + question[1:]
        return f"{example.data['passage']} {question}\n"

    def verbalize(self, example: TaskExample, candidate: Any) -> str:
        return f"{self.prompt(example)}{candidate}"


class WSC(VerbalizerTask):
    name = "WSC"
    verbalizer = ("No", "Yes")
    layouts = ("WSC records {'text', 'span1_text', 'span2_text', 'label'} (HF super_glue/wsc.fixed) or "
               "{'text', 'target': {'span1_text', 'span2_text'}, 'label': true/false} (SuperGLUE jsonl)")

    def examples(self, record: Mapping[str, Any], where: str) -> list[TaskExample]:
        jsonl = "target" in record  # SuperGLUE's own files: spans as written by the annotators
        spans = nested(self, record, where, "target", dict) if jsonl else record
        data = {"text": text_field(self, record, where, "text"),
                "span1_text": text_field(self, spans, where, "span1_text"),
                "span2_text": text_field(self, spans, where, "span2_text")}
        if jsonl:  # MeZO reads wsc.fixed, whose builder repairs such spans: do the same
            for k in ("span1", "span2"):
                data[f"{k}_text"] = fixed_span(data["text"], data[f"{k}_text"], spans.get(f"{k}_index"))
        return [self.labeled(data, int(truth(self, record, where, ["label"])))]

    def prompt(self, example: TaskExample) -> str:
        d = example.data
        return (f"{d['text']}\nIn the previous sentence, does the pronoun \"{d['span2_text'].lower()}\" refer to "
                f"{d['span1_text']}? Yes or No?\n")


def fixed_span(text: str, span: str, index: Any) -> str:
    """A WSC span as Hugging Face's ``super_glue/wsc.fixed`` gives it (the data MeZO trains on): a span that is not
    literally in the sentence takes the case of the first letter of the sentence's word at ``index`` (the span's
    word index), loses a trailing ".", and has line breaks turned into spaces; a span found verbatim stays as it
    is. So ``"the trophy"`` at index 0 of ``"The trophy doesn't fit ..."`` becomes ``"The trophy"`` and ``"Susan."``
    becomes ``"Susan"``."""
    if span in text or not span:
        return span
    words = text.split()
    if isinstance(index, int) and not isinstance(index, bool) and 0 <= index < len(words):
        first = words[index][:1]
        span = (span[0].lower() if first.islower() else span[0].upper()) + span[1:]
    return span.rstrip(".").replace("\n", " ")


class WiC(VerbalizerTask):
    name = "WIC"
    verbalizer = ("No", "Yes")
    layouts = "WiC records {'word', 'sentence1', 'sentence2', 'label': true/false or 1/0}"

    def examples(self, record: Mapping[str, Any], where: str) -> list[TaskExample]:
        data = {name: text_field(self, record, where, name) for name in ("word", "sentence1", "sentence2")}
        return [self.labeled(data, int(truth(self, record, where, ["label"])))]

    def prompt(self, example: TaskExample) -> str:
        d = example.data
        return (f"Does the word \"{d['word']}\" have the same meaning in these two sentences? Yes, No?\n"
                f"{d['sentence1']}\n{d['sentence2']}\n")


class MultiRC(VerbalizerTask):
    name = "MultiRC"
    verbalizer = ("No", "Yes")
    layouts = ("MultiRC records {'paragraph', 'question', 'answer', 'label'} (HF super_glue/multirc, one row per "
               "answer) or {'passage': {'text', 'questions': [{'question', 'answers': [{'text', 'label'}]}]}} "
               "(SuperGLUE jsonl)")

    def examples(self, record: Mapping[str, Any], where: str) -> list[TaskExample]:
        if "passage" in record and "paragraph" not in record:
            return self._nested(record, where)
        data = {name: text_field(self, record, where, name) for name in ("paragraph", "question", "answer")}
        return [self.labeled(data, int(truth(self, record, where, ["label"])))]

    def _nested(self, record: Mapping[str, Any], where: str) -> list[TaskExample]:
        """One example per answer of every question of a SuperGLUE jsonl passage."""
        passage = nested(self, record, where, "passage", dict)
        paragraph = text_field(self, passage, where, "text")
        out = []
        for q in nested(self, passage, where, "questions", list):
            question = text_field(self, q, where, "question")
            for a in nested(self, q, where, "answers", list):
                data = {"paragraph": paragraph, "question": question, "answer": text_field(self, a, where, "text")}
                out.append(self.labeled(data, int(truth(self, a, where, ["label"]))))
        return out

    def prompt(self, example: TaskExample) -> str:
        d = example.data
        return (f"{d['paragraph']}\nQuestion: {d['question']}\nI found this answer \"{d['answer']}\". Is that "
                "correct? Yes or No?\n")


class Copa(Task):
    name = "Copa"
    train_as_classification = False
    default_num_dev = 100
    layouts = "COPA records {'premise', 'choice1', 'choice2', 'question': 'cause'/'effect', 'label': 0/1}"
    conjunctions = {"effect": " so ", "cause": " because "}

    def examples(self, record: Mapping[str, Any], where: str) -> list[TaskExample]:
        data = {name: text_field(self, record, where, name) for name in ("premise", "choice1", "choice2", "question")}
        if data["question"] not in self.conjunctions:
            raise DataError(f"{where}: COPA question = {data['question']!r} must be 'cause' or 'effect'.")
        label = class_label(self, record, where, ["label"], 2)
        return [TaskExample(data=data, candidates=(data["choice1"], data["choice2"]), correct=(label,), label=label)]

    def _premise(self, example: TaskExample) -> str:
        premise = example.data["premise"].rstrip()
        if premise.endswith("."):
            premise = premise[:-1]
        return premise + self.conjunctions[example.data["question"]]

    def prompt(self, example: TaskExample) -> str:
        return self._premise(example)

    def verbalize(self, example: TaskExample, candidate: Any) -> str:
        words = str(candidate).split(" ")
        if words[0] != "I":
            words[0] = words[0].lower()
        return self._premise(example) + " ".join(words)


class ReCoRD(Task):
    name = "ReCoRD"
    train_as_classification = False
    layouts = ("ReCoRD records {'passage', 'query', 'entities': [...], 'answers': [...]} (HF super_glue/record, "
               "one row per query) or {'passage': {'text', 'entities': [{'start', 'end'}]}, 'qas': [{'query', "
               "'answers': [{'text'}]}]} (SuperGLUE jsonl)")

    def examples(self, record: Mapping[str, Any], where: str) -> list[TaskExample]:
        if isinstance(record.get("passage"), Mapping):
            return self._nested(record, where)
        passage = text_field(self, record, where, "passage")
        entities = text_list(self, record, where, "entities")
        answers = text_list(self, record, where, "answers")
        return [self._example(passage, text_field(self, record, where, "query"), entities, answers, where)]

    def _nested(self, record: Mapping[str, Any], where: str) -> list[TaskExample]:
        """One example per query, entities and answers as the HF ``super_glue`` builder derives them."""
        passage = record["passage"]
        text = text_field(self, passage, where, "text")
        spans = nested(self, passage, where, "entities", list)
        try:
            entities = sorted({text[int(e["start"]): int(e["end"]) + 1] for e in spans})  # 'end' is inclusive
        except (KeyError, TypeError, ValueError) as exc:
            raise DataError(f"{where}: ReCoRD passage entities must be {{'start', 'end'}} character offsets "
                            f"({exc!r}). ReCoRD reads {self.layouts}.") from exc
        out = []
        for qa in nested(self, record, where, "qas", list):
            answers = sorted({text_field(self, a, where, "text") for a in nested(self, qa, where, "answers", list)})
            out.append(self._example(text, text_field(self, qa, where, "query"), entities, answers, where))
        return out

    def _example(self, passage: str, query: str, entities: list[str], answers: list[str], where: str) -> TaskExample:
        correct = tuple(i for i, e in enumerate(entities) if e in answers)
        if not correct:
            raise DataError(f"{where}: none of the ReCoRD answers {answers} is among the passage entities, so there "
                            "is no correct candidate. Keep only labeled records (the test split has no answers) "
                            "whose answers are entities.")
        return TaskExample(data={"passage": passage, "query": query}, candidates=tuple(entities), correct=correct)

    def _passage(self, example: TaskExample) -> str:
        return example.data["passage"].replace("@highlight\n", "- ")

    def prompt(self, example: TaskExample) -> str:
        return f"{self._passage(example)}\n-"

    def verbalize(self, example: TaskExample, candidate: Any) -> str:
        return f"{self._passage(example)}\n- {example.data['query'].replace('@placeholder', str(candidate))}"


CLASSIFICATION_TASKS: tuple[type[Task], ...] = (SST2, RTE, CB, BoolQ, WSC, WiC, MultiRC, Copa, ReCoRD)
