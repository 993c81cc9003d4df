"""Graders for open exam answers
==============================

In Borges et al. (arXiv:2408.11841) GPT-4, instructed as a teacher of the course, grades each open answer against
the gold answer for accuracy and completeness with one of four labels (correct, almost correct, mostly incorrect,
wrong answer), returned as JSON; an unreadable reply is re-asked once, then recorded as "not found".

**None of the graders here is GPT-4.** Grades from them are not comparable to the paper's:

* :class:`LocalLMJudge`: a second local causal LM with the same four-level rubric (prompt written for this package),
  JSON reply, one re-ask, ``"not found"`` on a second failure. A small local model is a much weaker grader than GPT-4;
  check its agreement with hand grades before trusting it.
* :class:`ReferenceMatchJudge`: a rule-based **proxy** that only says "correct" when the reference answer (normalised
  text, or a number within a relative tolerance) appears in the final part of the answer, else "wrong answer". It
  cannot recognise a correct answer worded differently.
* :class:`ExportOnlyJudge`: grades nothing; it writes every open answer with its question and reference to a JSONL
  file for human grading. Its answers are left out of the accuracies.

A grader is any :class:`OpenAnswerJudge` subclass, chosen in YAML by ``class_path``.
"""

from __future__ import annotations

import json
import math
import os
import re
import unicodedata
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from lightning_epfl.modules.assessment.strategies import ChatMessage, GenerationSettings

__all__ = [
    "PENDING",
    "ExportOnlyJudge",
    "JudgeRequest",
    "JudgeResult",
    "LocalLMJudge",
    "OpenAnswerJudge",
    "ReferenceMatchJudge",
]

PENDING = "pending"
"""Label of an answer left for human grading (:class:`ExportOnlyJudge`); it has no score."""


@dataclass
class JudgeRequest:
    """One open answer to grade.

    Attributes:
        question: The exam question (``question``, ``reference_answer``, ``course_id``, ``question_id`` ...).
        answer: The text to grade.
        strategy: Name of the prompting strategy that produced it.
    """

    question: Mapping[str, Any]
    answer: str
    strategy: str = ""


@dataclass
class JudgeResult:
    """A grade.

    Attributes:
        label: One of ``"correct"``, ``"almost correct"``, ``"mostly incorrect"``, ``"wrong answer"``,
            ``"not found"`` (unreadable grader reply) or ``"pending"`` (not graded).
        raw: The grader's raw replies (empty for rule-based graders).
        info: Grader-specific details.
    """

    label: str
    raw: list[str] = field(default_factory=list)
    info: dict[str, Any] = field(default_factory=dict)


class OpenAnswerJudge:
    """Interface of an open-answer grader.

    Subclasses implement :meth:`grade`; :meth:`setup` (load models, on the evaluator's device) and :meth:`finalize`
    (write files at the end of the run) are optional.
    """

    name: str = "judge"

    def setup(self, device: Any = None) -> None:
        """Prepare for grading (called by the evaluator before the first question)."""

    def grade(self, requests: Sequence[JudgeRequest]) -> list[JudgeResult]:
        """Grade a batch of answers; one result per request, in order."""
        raise NotImplementedError

    def finalize(self, output_dir: str, rank: int = 0, world_size: int = 1) -> list[str]:
        """Write whatever the grader keeps (called once per process at the end of the run); returns the paths."""
        return []


# --------------------------------------------------------------------------------------------------------------------
# Local LM judge
# --------------------------------------------------------------------------------------------------------------------

_RUBRIC = {
    "en": {
        "system": "You teach {course} at university and are grading exam answers.",
        "system_generic": "You teach at university and are grading exam answers.",
        "user": (
            "Grade the student's answer to the exam question below by comparing it with the reference answer. Judge "
            "whether it is accurate and whether it is complete.\n\n"
            "Question:\n{question}\n\nReference answer:\n{reference}\n\nStudent's answer:\n{answer}\n\n"
            "Choose exactly one grade:\n"
            '- "correct": accurate and complete;\n'
            '- "almost correct": accurate, with small omissions or imprecisions;\n'
            '- "mostly incorrect": contains some relevant elements, but with major errors or gaps;\n'
            '- "wrong answer": wrong, off-topic or empty.\n\n'
            'Reply only with a JSON object of the form {{"grade": "<grade>"}}.'
        ),
        "reask": 'Your reply could not be read. Reply only with a JSON object such as {"grade": "correct"}.',
    },
}


class LocalLMJudge(OpenAnswerJudge):
    """A local causal LM grades open answers with a four-level rubric (a local stand-in for the paper's GPT-4 judge).

    The model is told it teaches the course, sees the question, the reference answer and the answer, and replies
    with ``{"grade": "..."}``; the grade is read with :func:`~lightning_epfl.functional.exam.parse_grade_label`. An
    unreadable reply is re-asked once (the first reply and a request for JSON only are appended to the
    conversation); a second failure gives ``"not found"``. Decoding is greedy.

    Args:
        pretrained_path: A model name or path (:func:`lightning_epfl.models.resolve_pretrained`: a local
            ``transformers`` folder, a ``.gguf`` file or a packaged model name such as ``"smollm2-135m-instruct"``).
        max_new_tokens: Most tokens per grader reply. Default 48.
        batch_size: Most prompts per forward batch. Default 8.
        dtype: Weight dtype. Default ``"float32"``.

    Raises:
        ValueError: ``max_new_tokens`` or ``batch_size`` below 1, or a ``pretrained_path`` that cannot be resolved.
    """

    name = "local_lm"

    def __init__(
        self, pretrained_path: str, max_new_tokens: int = 48, batch_size: int = 8, dtype: str = "float32"
    ) -> None:
        if max_new_tokens < 1:
            raise ValueError(f"`max_new_tokens` must be >= 1, got {max_new_tokens}.")
        if batch_size < 1:
            raise ValueError(f"`batch_size` must be >= 1, got {batch_size}.")
        if dtype not in ("float32", "float64", "bfloat16", "float16"):
            raise ValueError(f"`dtype` must be one of ['bfloat16', 'float16', 'float32', 'float64'], got {dtype!r}.")
        from lightning_epfl.modules.assessment.generation import TINY_RANDOM_MODEL

        if pretrained_path != TINY_RANDOM_MODEL:
            from lightning_epfl.models import check_pretrained

            check_pretrained(pretrained_path, argument="pretrained_path")
        self.pretrained_path = pretrained_path
        self.max_new_tokens = max_new_tokens
        self.batch_size = batch_size
        self.dtype = dtype
        self.generator: Any = None

    def setup(self, device: Any = None) -> None:
        if self.generator is None:
            from lightning_epfl.modules.assessment.generation import HFGenerator, resolve_pretrained_path

            self.generator = HFGenerator(
                resolve_pretrained_path(self.pretrained_path), batch_size=self.batch_size, dtype=self.dtype
            )
        if device is not None:
            self.generator.model.to(device)

    def messages(self, request: JudgeRequest) -> list[ChatMessage]:
        """The grading prompt of one request."""
        text = _RUBRIC["en"]
        q = request.question
        course = str(q.get("course_name") or q.get("course_id") or "").strip()
        system = text["system"].format(course=course) if course else text["system_generic"]
        user = text["user"].format(
            question=str(q.get("question", "")).strip(),
            reference=str(q.get("reference_answer") or "").strip(),
            answer=request.answer.strip(),
        )
        return [{"role": "system", "content": system}, {"role": "user", "content": user}]

    def grade(self, requests: Sequence[JudgeRequest]) -> list[JudgeResult]:
        from lightning_epfl.functional.exam import GRADE_NOT_FOUND, parse_grade_label

        if not requests:
            return []
        self.setup()
        settings = GenerationSettings(max_new_tokens=self.max_new_tokens)
        prompts = [self.messages(r) for r in requests]
        first = self.generator(prompts, settings)
        results = [JudgeResult(label=parse_grade_label(t), raw=[t]) for t in first]
        retry = [i for i, r in enumerate(results) if r.label == GRADE_NOT_FOUND]
        if retry:
            reask = [
                [
                    *prompts[i],
                    {"role": "assistant", "content": first[i]},
                    {"role": "user", "content": _RUBRIC["en"]["reask"]},
                ]
                for i in retry
            ]
            second = self.generator(reask, settings)
            for i, text in zip(retry, second):
                results[i].raw.append(text)
                results[i].label = parse_grade_label(text)
                results[i].info["reasked"] = True
        return results


# --------------------------------------------------------------------------------------------------------------------
# Reference-match proxy
# --------------------------------------------------------------------------------------------------------------------

_NUMBER = re.compile(r"[-+−]?(?:\d+(?:[.,]\d+)*(?:\.\d+)?|\.\d+)(?:[eE][-+]?\d+)?")
_FINAL = re.compile(r"(?:final answer is|final answer:|answer:|la réponse finale est|réponse\s*:)", re.IGNORECASE)


def _plain(text: str) -> str:
    text = unicodedata.normalize("NFKC", text).casefold()
    text = re.sub(r"[^\w\s.,+-]", " ", text)
    return " ".join(text.split()).strip(" .,")


_EXPONENT = re.compile(r"(?<=[A-Za-z)])(?<![\d.][eE])\s*(?:\^\s*\{?\s*[-+]?\d+\s*\}?|[-+]?\d+(?![\d.,]))")


def _numbers(text: str) -> list[float]:
    text = unicodedata.normalize("NFKC", text).replace("−", "-")
    text = _EXPONENT.sub(" ", text)  # unit exponents: m/s² (s2 after NFKC), s^2, s^-2, s^{-2}
    out = []
    for m in _NUMBER.finditer(text):
        s = m.group(0)
        if "," in s and "." not in s and re.fullmatch(r"[-+]?\d+,\d+", s):
            s = s.replace(",", ".")  # French decimal comma
        else:
            s = s.replace(",", "")  # thousands separators
        try:
            out.append(float(s))
        except ValueError:
            continue
    return out


class ReferenceMatchJudge(OpenAnswerJudge):
    """Rule-based proxy grader: "correct" when the answer's final part contains the reference answer, else wrong.

    This is **not** the paper's grading (GPT-4 with a four-level rubric) and not a substitute for it; it only serves
    where the reference is short (a term, a formula, a number). The final part is the text after the last answer cue
    (``Final answer is``, ``Answer:``, ``La réponse finale est``, ``Réponse :``), or the whole answer without a cue.

    * When the reference holds exactly one number, the answer is correct when the last number of its final part is
      within ``numeric_rtol`` (relative) of it; exponents of units (``m/s²``, ``s^2``, ``s^-2``) are not numbers.
    * Otherwise it is correct when the normalised reference (NFKC, case-folded, punctuation removed) occurs in the
      normalised final part on word boundaries.

    Only "correct" and "wrong answer" are given. Negation is not understood: "it is not X" contains X.

    Args:
        numeric_rtol: Relative tolerance for numeric references. Default 0.01.

    Raises:
        ValueError: ``numeric_rtol`` negative.
    """

    name = "reference_match"

    def __init__(self, numeric_rtol: float = 0.01) -> None:
        if not numeric_rtol >= 0:
            raise ValueError(f"`numeric_rtol` must be >= 0, got {numeric_rtol}.")
        self.numeric_rtol = numeric_rtol

    def match(self, answer: str, reference: str) -> bool:
        """Whether ``answer`` matches ``reference`` under the rules of the class docstring."""
        cues = list(_FINAL.finditer(answer))
        final = answer[cues[-1].end() :] if cues else answer
        ref_numbers = _numbers(reference)
        if len(ref_numbers) == 1 and _plain(reference).strip("+-") and not re.search(r"[a-z]{2,}", _plain(reference)):
            got = _numbers(final)
            if not got:
                return False
            target = ref_numbers[0]
            return math.isclose(got[-1], target, rel_tol=self.numeric_rtol, abs_tol=0.0 if target else 1e-12)
        ref = _plain(reference)
        if not ref:
            return False
        return re.search(r"(?<!\w)" + re.escape(ref) + r"(?!\w)", _plain(final)) is not None

    def grade(self, requests: Sequence[JudgeRequest]) -> list[JudgeResult]:
        out = []
        for r in requests:
            ok = self.match(r.answer, str(r.question.get("reference_answer") or ""))
            out.append(JudgeResult(label="correct" if ok else "wrong answer"))
        return out


# --------------------------------------------------------------------------------------------------------------------
# Export for human grading
# --------------------------------------------------------------------------------------------------------------------


class ExportOnlyJudge(OpenAnswerJudge):
    """Grades nothing: collects the open answers and writes them to a JSONL file for human grading.

    Each line holds ``question_id``, ``course_id``, ``strategy``, ``question``, ``reference_answer``, ``answer`` and
    ``grade: null``. The file is written once, at the end of the run, to a temporary name and renamed. With several
    processes each writes ``<stem>.rank<r><suffix>``. Answers graded ``"pending"`` are left out of the accuracies.

    Args:
        path: Output file; a relative path is taken inside the evaluator's output folder. Default
            ``"open_answers.jsonl"``.
    """

    name = "export_only"

    def __init__(self, path: str = "open_answers.jsonl") -> None:
        if not str(path).strip():
            raise ValueError("`path` must be a non-empty file path.")
        self.path = str(path)
        self.rows: list[dict[str, Any]] = []

    def grade(self, requests: Sequence[JudgeRequest]) -> list[JudgeResult]:
        for r in requests:
            q = r.question
            self.rows.append(
                {
                    "question_id": q.get("question_id"),
                    "course_id": q.get("course_id"),
                    "strategy": r.strategy,
                    "question": q.get("question"),
                    "reference_answer": q.get("reference_answer"),
                    "answer": r.answer,
                    "grade": None,
                }
            )
        return [JudgeResult(label=PENDING) for _ in requests]

    def target(self, output_dir: str, rank: int = 0, world_size: int = 1) -> str:
        """The file this process writes."""
        path = self.path if os.path.isabs(self.path) else os.path.join(output_dir, self.path)
        if world_size > 1:
            stem, suffix = os.path.splitext(path)
            path = f"{stem}.rank{rank}{suffix}"
        return path

    def finalize(self, output_dir: str, rank: int = 0, world_size: int = 1) -> list[str]:
        from lightning_epfl.utilities import atomic_write

        path = self.target(output_dir, rank, world_size)

        def write(tmp: str) -> None:
            with open(tmp, "w", encoding="utf-8") as f:
                for row in self.rows:
                    f.write(json.dumps(row, ensure_ascii=False) + "\n")

        atomic_write(path, write)
        self.rows = []
        return [path]
