"""Task metrics as MeZO computes them: accuracy, and SQuAD's token F1 and exact match.

Answers are compared after SQuAD's normalization: lower case, punctuation removed, the articles a/an/the
removed, whitespace collapsed. Against several references an answer scores its best match. A reference of
'CANNOTANSWER' or 'no answer' (unanswerable questions) only counts an exact match, as in MeZO.
"""

from __future__ import annotations

import re
import string
from collections import Counter
from typing import Sequence

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCTUATION = set(string.punctuation)
NO_ANSWER = ("CANNOTANSWER", "no answer")


def normalize_answer(text: str) -> str:
    """SQuAD's normalization: lower case, no punctuation, no articles, single spaces."""
    text = "".join(ch for ch in text.lower() if ch not in _PUNCTUATION)
    return " ".join(_ARTICLES.sub(" ", text).split())


def token_f1(prediction: str, reference: str) -> float:
    """F1 of the normalized answers' word multisets (0 when they share no word)."""
    pred, ref = normalize_answer(prediction).split(), normalize_answer(reference).split()
    same = sum((Counter(pred) & Counter(ref)).values())
    if same == 0:
        return 0.0
    precision, recall = same / len(pred), same / len(ref)
    return 2 * precision * recall / (precision + recall)


def exact_match(prediction: str, references: Sequence[str]) -> float:
    """1.0 when the normalized prediction equals a normalized reference, else 0.0."""
    pred = normalize_answer(prediction)
    return float(any(pred == normalize_answer(r) for r in references))


def f1_score(prediction: str, references: Sequence[str]) -> float:
    """The best :func:`token_f1` over the references (exact match for an unanswerable question)."""
    if references[0] in NO_ANSWER:
        return exact_match(prediction, references[:1])
    return max(token_f1(prediction, r) for r in references)


def accuracy(predictions: Sequence[int], correct: Sequence[Sequence[int]]) -> float:
    """Share of predictions among their example's correct candidates."""
    if not predictions:
        return 0.0
    return sum(p in c for p, c in zip(predictions, correct)) / len(predictions)


def qa_scores(predictions: Sequence[str], references: Sequence[Sequence[str]]) -> dict[str, float]:
    """Mean ``f1`` and ``em`` of generated answers."""
    n = max(len(predictions), 1)
    return {"f1": sum(f1_score(p, r) for p, r in zip(predictions, references)) / n,
            "em": sum(exact_match(p, r) for p, r in zip(predictions, references)) / n}
