"""Exam questions
=================

Exam questions for evaluating LLMs as students, after Borges et al., *Could ChatGPT get an Engineering Degree?
Evaluating Higher Education Vulnerability to AI Assistants* (arXiv:2408.11841, PNAS 2024): multiple-choice (one
or several correct options) and open-answer questions, in English or French, grouped by course and degree program.

File format: JSON Lines, one :class:`ExamQuestion` object per line, validated on load by :func:`load_exam` (every
error names the file, the line, the question id and the field). Sources:

* :func:`convert_mmlu_csv`: a folder of MMLU-style ``<course>_test.csv`` files (``question,A,B,C,D,answer``, no
  header) and an optional course/program map;
* :func:`convert_nlp4education`: the public dataset layout of arXiv:2408.11841 (``questions.json`` and
  ``courses.json``), which users download themselves (the data are CC BY-NC-ND: nothing of it ships here);
* :func:`build_stdlib_exam`: a real-text exam built at run time from the docstrings of Python's builtins;
* :func:`fixture_exam_path`: twelve questions written for this package (three courses, two programs, EN and FR).

:class:`ExamDataModule` serves the questions to ``trainer.test``/``trainer.predict`` as ``list[dict]`` batches.
The console script ``lightning-epfl-convert-exam`` wraps the converters (:func:`convert_exam_cli`).
"""

from __future__ import annotations

import argparse
import ast
import csv
import glob
import inspect
import json
import logging
import os
import random
import re
import sys
from collections.abc import Mapping, Sequence
from importlib import resources
from typing import Any, TypedDict

from lightning.pytorch import LightningDataModule
from torch.utils.data import DataLoader, Dataset

from lightning_epfl.functional.exam import course_program_map
from lightning_epfl.utilities import atomic_write

log = logging.getLogger(__name__)

LANGUAGES = ("en", "fr")
QUESTION_TYPES = ("mcq", "open")
FIXTURES = "<fixtures>"
"""Special ``path`` of :class:`ExamDataModule`: the packaged fixture questions."""
STDLIB = "<stdlib>"
"""Special ``path`` of :class:`ExamDataModule`: :func:`build_stdlib_exam` with the module's seed."""


class ExamDemo(TypedDict, total=False):
    """A worked example for few-shot prompts.

    An MCQ demo has ``options`` (>= 2) and ``answer_indices``; an open demo has ``reference_answer`` and no options.
    ``explanation`` is the reasoning shown before the answer in chain-of-thought demos. ``course_id`` is required in
    a demos file (see :func:`load_demos`), optional inside a question.
    """

    question: str
    options: list[str]
    answer_indices: list[int]
    reference_answer: str | None
    explanation: str | None
    question_id: str
    course_id: str


class _ExamQuestionRequired(TypedDict):
    question_id: str
    course_id: str
    language: str
    question_type: str
    question: str
    options: list[str]
    answer_indices: list[int]
    multiple_correct: bool
    reference_answer: str | None


class ExamQuestion(_ExamQuestionRequired, total=False):
    """One exam question (one JSONL line).

    Required in a file: ``question_id`` (string, or an int read as a string), ``course_id`` (same),
    ``language`` (``"en"``/``"fr"``), ``question_type`` (``"mcq"``/``"open"``), ``question``; for an MCQ also
    ``options`` (>= 2 non-empty strings) and ``answer_indices`` (0-based, distinct, among the options); for an open
    question also ``reference_answer``. Optional: ``multiple_correct`` (default: more than one gold index; prompts
    word several-answer questions differently), ``reference_answer`` of an MCQ, ``program``, ``level`` (e.g.
    bachelor/master/online), ``explanation``, ``difficulty``, ``blooms``, ``demos`` (list of :class:`ExamDemo`).
    :func:`load_exam` returns every key, optional ones as ``None`` (``demos`` as ``[]``).
    """

    program: str | None
    level: str | None
    explanation: str | None
    difficulty: str | int | float | None
    blooms: str | int | None
    demos: list[ExamDemo]


_REQUIRED = ("question_id", "course_id", "language", "question_type", "question")
_FIELDS = (
    "question_id",
    "course_id",
    "program",
    "language",
    "level",
    "question_type",
    "question",
    "options",
    "answer_indices",
    "multiple_correct",
    "reference_answer",
    "explanation",
    "difficulty",
    "blooms",
    "demos",
)
_DEMO_FIELDS = ("question", "options", "answer_indices", "reference_answer", "explanation", "question_id", "course_id")


# --------------------------------------------------------------------------------------------------------------------
# validation
# --------------------------------------------------------------------------------------------------------------------


def _where(location: str, qid: Any) -> str:
    return f"{location}: question {qid!r}" if qid is not None else location


def _ident(value: Any, field: str, where: str) -> str:
    if isinstance(value, bool) or not isinstance(value, (str, int)) or (isinstance(value, str) and not value.strip()):
        raise ValueError(f"{where}: field {field!r} must be a non-empty string or an int, got {value!r}.")
    return str(value)


def _opt_str(value: Any, field: str, where: str) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str):
        raise ValueError(f"{where}: field {field!r} must be a string or null, got {value!r}.")
    return value


def _options(value: Any, field: str, where: str) -> list[str]:
    if value is None:
        return []
    if not isinstance(value, list) or not all(isinstance(o, str) and o.strip() for o in value):
        raise ValueError(f"{where}: field {field!r} must be a list of non-empty strings, got {value!r}.")
    return list(value)


def _indices(value: Any, field: str, where: str, num_options: int) -> list[int]:
    if value is None:
        return []
    if not isinstance(value, list) or not all(isinstance(i, int) and not isinstance(i, bool) for i in value):
        raise ValueError(f"{where}: field {field!r} must be a list of ints (0-based option indices), got {value!r}.")
    for i in value:
        if not 0 <= i < num_options:
            raise ValueError(
                f"{where}: field {field!r}: gold answer index {i} is not among the {num_options} choices "
                f"(allowed 0..{num_options - 1})."
            )
    if len(set(value)) != len(value):
        raise ValueError(f"{where}: field {field!r} repeats an index: {value!r}.")
    return list(value)


def _check_demo(raw: Any, field: str, where: str, need_course: bool) -> ExamDemo:
    if not isinstance(raw, dict):
        raise ValueError(f"{where}: field {field!r} must be a JSON object, got {raw!r}.")
    unknown = sorted(set(raw) - set(_DEMO_FIELDS))
    if unknown:
        raise ValueError(f"{where}: field {field!r} has unknown keys {unknown}; allowed: {list(_DEMO_FIELDS)}.")
    if not isinstance(raw.get("question"), str) or not raw["question"].strip():
        raise ValueError(f"{where}: field '{field}.question' is missing or empty.")
    demo: ExamDemo = {"question": raw["question"]}
    options = _options(raw.get("options"), f"{field}.options", where)
    demo["options"] = options
    if options:
        if len(options) < 2:
            raise ValueError(f"{where}: field '{field}.options' needs at least 2 options for an MCQ demo.")
        demo["answer_indices"] = _indices(raw.get("answer_indices"), f"{field}.answer_indices", where, len(options))
        if not demo["answer_indices"]:
            raise ValueError(f"{where}: field '{field}.answer_indices' is missing or empty for an MCQ demo.")
    else:
        if raw.get("answer_indices"):
            raise ValueError(f"{where}: field '{field}.answer_indices' is set but the demo has no options.")
        demo["answer_indices"] = []
    demo["reference_answer"] = _opt_str(raw.get("reference_answer"), f"{field}.reference_answer", where)
    if not options and not (demo["reference_answer"] or "").strip():
        raise ValueError(f"{where}: field '{field}.reference_answer' is missing or empty for an open demo.")
    demo["explanation"] = _opt_str(raw.get("explanation"), f"{field}.explanation", where)
    for key in ("question_id", "course_id"):
        if raw.get(key) is not None:
            demo[key] = _ident(raw[key], f"{field}.{key}", where)
    if need_course and "course_id" not in demo:
        raise ValueError(f"{where}: field '{field}.course_id' is missing (a demos file names each demo's course).")
    return demo


def validate_question(raw: Any, location: str = "<question>") -> ExamQuestion:
    """Check one question record and return it with every key of :class:`ExamQuestion` present.

    Args:
        raw: The decoded JSON object.
        location: Prefix of error messages, e.g. ``"exam.jsonl:12"``.

    Returns:
        The normalised question (ids as strings, optional keys as ``None``, ``demos`` as a list).

    Raises:
        ValueError: Naming ``location``, the question id and the field, with the allowed values: not an object,
            unknown or missing field, unknown ``question_type``/``language``, an MCQ with fewer than 2 options or
            without gold indices, a gold index not among the choices, ``multiple_correct`` false with several gold
            indices, an open question with options, gold indices or no reference answer, a bad demo.
    """
    if not isinstance(raw, dict):
        raise ValueError(f"{location}: expected a JSON object, got {type(raw).__name__}.")
    qid = raw.get("question_id")
    where = _where(location, qid if isinstance(qid, (str, int)) and not isinstance(qid, bool) else None)
    unknown = sorted(set(raw) - set(_FIELDS))
    if unknown:
        raise ValueError(f"{where}: unknown field(s) {unknown}; allowed fields: {list(_FIELDS)}.")
    for field in _REQUIRED:
        if field not in raw or raw[field] is None:
            raise ValueError(f"{where}: missing field {field!r} (required: {list(_REQUIRED)}).")
    q: dict[str, Any] = {"question_id": _ident(raw["question_id"], "question_id", where)}
    q["course_id"] = _ident(raw["course_id"], "course_id", where)
    q["program"] = _opt_str(raw.get("program"), "program", where)
    if raw["language"] not in LANGUAGES:
        raise ValueError(f"{where}: field 'language' is {raw['language']!r}; allowed values: {list(LANGUAGES)}.")
    q["language"] = raw["language"]
    q["level"] = _opt_str(raw.get("level"), "level", where)
    kind = raw["question_type"]
    if kind not in QUESTION_TYPES:
        raise ValueError(f"{where}: field 'question_type' is {kind!r}; allowed values: {list(QUESTION_TYPES)}.")
    q["question_type"] = kind
    if not isinstance(raw["question"], str) or not raw["question"].strip():
        raise ValueError(f"{where}: field 'question' must be a non-empty string, got {raw['question']!r}.")
    q["question"] = raw["question"]
    options = _options(raw.get("options"), "options", where)
    reference = _opt_str(raw.get("reference_answer"), "reference_answer", where)
    if kind == "mcq":
        if "options" not in raw:
            raise ValueError(f"{where}: missing field 'options' (required for question_type 'mcq').")
        if len(options) < 2:
            raise ValueError(f"{where}: field 'options': an MCQ needs at least 2 options, got {len(options)}.")
        if "answer_indices" not in raw:
            raise ValueError(f"{where}: missing field 'answer_indices' (required for question_type 'mcq').")
        gold = _indices(raw["answer_indices"], "answer_indices", where, len(options))
        if not gold:
            raise ValueError(f"{where}: field 'answer_indices' must name at least one correct option.")
        multiple = raw.get("multiple_correct", len(gold) > 1)
        if not isinstance(multiple, bool):
            raise ValueError(f"{where}: field 'multiple_correct' must be true or false, got {multiple!r}.")
        if not multiple and len(gold) > 1:
            raise ValueError(f"{where}: field 'multiple_correct' is false but answer_indices has {len(gold)} entries.")
    else:
        if options:
            raise ValueError(f"{where}: field 'options' must be empty or absent for question_type 'open'.")
        if raw.get("answer_indices"):
            raise ValueError(f"{where}: field 'answer_indices' must be empty or absent for question_type 'open'.")
        if reference is None or not reference.strip():
            raise ValueError(f"{where}: missing field 'reference_answer' (required for question_type 'open').")
        if raw.get("multiple_correct"):
            raise ValueError(f"{where}: field 'multiple_correct' must be false or absent for question_type 'open'.")
        gold, multiple = [], False
    q["options"] = options
    q["answer_indices"] = gold
    q["multiple_correct"] = multiple
    q["reference_answer"] = reference
    q["explanation"] = _opt_str(raw.get("explanation"), "explanation", where)
    difficulty = raw.get("difficulty")
    if difficulty is not None and (isinstance(difficulty, bool) or not isinstance(difficulty, (str, int, float))):
        raise ValueError(f"{where}: field 'difficulty' must be a string, a number or null, got {difficulty!r}.")
    q["difficulty"] = difficulty
    blooms = raw.get("blooms")
    if blooms is not None and (isinstance(blooms, bool) or not isinstance(blooms, (str, int))):
        raise ValueError(f"{where}: field 'blooms' must be a string, an int or null, got {blooms!r}.")
    q["blooms"] = blooms
    demos = raw.get("demos")
    if demos is None:
        demos = []
    if not isinstance(demos, list):
        raise ValueError(f"{where}: field 'demos' must be a list of demo objects, got {demos!r}.")
    q["demos"] = [_check_demo(d, f"demos[{k}]", where, need_course=False) for k, d in enumerate(demos)]
    return q  # type: ignore[return-value]


def _check_unique(questions: Sequence[ExamQuestion], locations: Sequence[str]) -> None:
    seen: dict[str, str] = {}
    programs: dict[str, tuple[str | None, str]] = {}
    for q, loc in zip(questions, locations):
        qid = q["question_id"]
        if qid in seen:
            raise ValueError(f"{loc}: question {qid!r}: duplicate question_id (first seen at {seen[qid]}).")
        seen[qid] = loc
        course, program = q["course_id"], q.get("program")
        if program is not None:
            if course in programs and programs[course][0] != program:
                raise ValueError(
                    f"{loc}: question {qid!r}: field 'program' is {program!r} but course {course!r} has program "
                    f"{programs[course][0]!r} at {programs[course][1]}."
                )
            programs[course] = (program, loc)


# --------------------------------------------------------------------------------------------------------------------
# files
# --------------------------------------------------------------------------------------------------------------------


def _read_jsonl(path: str | os.PathLike) -> list[tuple[str, Any]]:
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"exam file {path!r} does not exist.")
    out = []
    with open(path, encoding="utf-8-sig") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            location = f"{path}:{lineno}"
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(f"{location}: invalid JSON ({err.msg} at column {err.colno}).") from None
            out.append((location, record))
    return out


def load_exam(path: str | os.PathLike) -> list[ExamQuestion]:
    """Read and validate a JSONL exam file (one :class:`ExamQuestion` per line; blank lines are skipped).

    Args:
        path: The ``.jsonl`` file.

    Returns:
        The questions in file order, normalised by :func:`validate_question`.

    Raises:
        FileNotFoundError: If ``path`` does not exist.
        ValueError: ``"<path>:<line>: question '<id>': ..."`` on invalid JSON, a record that is not an object, any
            check of :func:`validate_question`, a duplicated ``question_id``, a course given two programs, or a file
            without questions.
    """
    records = _read_jsonl(path)
    if not records:
        raise ValueError(f"exam file {os.fspath(path)!r} contains no questions.")
    questions = [validate_question(record, location) for location, record in records]
    _check_unique(questions, [location for location, _ in records])
    return questions


def _compact(q: Mapping[str, Any]) -> dict[str, Any]:
    """Drop unset optional keys (``None``, empty ``demos``) for a readable file; keep field order."""
    keep = set(_REQUIRED) | {"options", "answer_indices", "multiple_correct", "reference_answer"}
    out = {}
    for key in _FIELDS:
        if key not in q:
            continue
        value = q[key]
        if key in keep or (value is not None and value != []):
            out[key] = value
    return out


def save_exam(questions: Sequence[Mapping[str, Any]], path: str | os.PathLike) -> str:
    """Validate ``questions`` and write them as JSONL, atomically (temporary file, then rename).

    Keys outside :class:`ExamQuestion` (e.g. the ``index`` added by :class:`ExamDataModule`) are dropped; unset
    optional keys are omitted.

    Args:
        questions: Question mappings.
        path: Output ``.jsonl`` path; its folder is created if missing.

    Returns:
        ``path`` as a string.

    Raises:
        ValueError: As :func:`load_exam`, with ``question[<k>]`` as the location; nothing is written.
    """
    checked, locations = [], []
    for k, q in enumerate(questions):
        location = f"question[{k}]"
        if not isinstance(q, Mapping):
            raise ValueError(f"{location}: expected a mapping, got {type(q).__name__}.")
        checked.append(validate_question({key: v for key, v in q.items() if key in _FIELDS}, location))
        locations.append(location)
    _check_unique(checked, locations)

    def write(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as f:
            for q in checked:
                f.write(json.dumps(_compact(q), ensure_ascii=False) + "\n")

    return atomic_write(path, write)


def load_demos(path: str | os.PathLike) -> dict[str, list[ExamDemo]]:
    """Read a JSONL file of few-shot demos (one :class:`ExamDemo` with its ``course_id`` per line).

    Returns:
        Course id -> demos in file order.

    Raises:
        FileNotFoundError: If ``path`` does not exist.
        ValueError: Naming the line and field on invalid JSON, a missing ``course_id``/``question``, unknown keys,
            or gold indices not among the demo's options.
    """
    out: dict[str, list[ExamDemo]] = {}
    for location, record in _read_jsonl(path):
        demo = _check_demo(record, "demo", location, need_course=True)
        out.setdefault(demo["course_id"], []).append(demo)
    return out


def load_course_programs(programs: str | os.PathLike | Mapping[str, Any]) -> dict[str, str | None]:
    """Course -> program map from a mapping or a JSON file.

    Both ``{"course": "program"}`` and ``{"program": ["course", ...]}`` (the layout of the team's
    ``mmlu/programs.json``) are accepted; keys starting with ``_`` are comments.

    Raises:
        FileNotFoundError: If a path does not exist.
        ValueError: On invalid JSON or a map of neither form (see :func:`course_program_map`).
    """
    if isinstance(programs, Mapping):
        return course_program_map(programs)
    path = os.fspath(programs)
    with open(path, encoding="utf-8") as f:
        try:
            data = json.load(f)
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}:{err.lineno}: invalid JSON ({err.msg}).") from None
    try:
        return course_program_map(data)
    except ValueError as err:
        raise ValueError(f"{path}: {err}") from None


# --------------------------------------------------------------------------------------------------------------------
# converters
# --------------------------------------------------------------------------------------------------------------------

_MMLU_COLUMNS = ("question", "A", "B", "C", "D", "answer")


def convert_mmlu_csv(
    folder: str | os.PathLike,
    output_jsonl: str | os.PathLike,
    programs: str | os.PathLike | Mapping[str, Any] | None = None,
) -> int:
    """Convert a folder of MMLU-style course CSV files into an exam JSONL file.

    Every ``<course>_test.csv`` (no header; columns ``question,A,B,C,D,answer``, the answer a letter) becomes
    course ``<course>``; question ids are ``<course>/<row>`` (0-based row), questions are English single-answer
    MCQs. Blank lines are skipped.

    Args:
        folder: Folder holding the CSV files.
        output_jsonl: Output path, written atomically.
        programs: Optional course/program map, as a mapping or a JSON file path (``course -> program`` or
            ``program -> [courses]``, see :func:`load_course_programs`). Courses it does not list get no program.

    Returns:
        Number of questions written.

    Raises:
        ValueError: If ``folder`` holds no ``*_test.csv`` file, a row does not have 6 columns, an answer is not one
            of A-D, or a row fails :func:`validate_question` (each names the file and line).
    """
    folder = os.fspath(folder)
    if not os.path.isdir(folder):
        raise ValueError(f"`folder` {folder!r} is not a directory.")
    files = sorted(glob.glob(os.path.join(folder, "*_test.csv")))
    if not files:
        raise ValueError(f"`folder` {folder!r} holds no <course>_test.csv file.")
    course_program = load_course_programs(programs) if programs is not None else {}
    questions: list[ExamQuestion] = []
    unmapped = []
    for file in files:
        course = os.path.basename(file)[: -len("_test.csv")]
        if programs is not None and course not in course_program:
            unmapped.append(course)
        with open(file, encoding="utf-8-sig", newline="") as f:
            reader = csv.reader(f)
            start = 1
            row_number = 0
            for row in reader:
                location = f"{file}:{start}"
                start = reader.line_num + 1
                if not row:
                    continue
                if len(row) != len(_MMLU_COLUMNS):
                    raise ValueError(
                        f"{location}: expected {len(_MMLU_COLUMNS)} columns {list(_MMLU_COLUMNS)}, got {len(row)}."
                    )
                letter = row[5].strip().upper()
                if letter not in ("A", "B", "C", "D"):
                    raise ValueError(f"{location}: field 'answer' is {row[5]!r}; allowed values: A, B, C, D.")
                record = {
                    "question_id": f"{course}/{row_number}",
                    "course_id": course,
                    "program": course_program.get(course),
                    "language": "en",
                    "question_type": "mcq",
                    "question": row[0],
                    "options": [o.strip() for o in row[1:5]],
                    "answer_indices": [ord(letter) - ord("A")],
                    "multiple_correct": False,
                }
                questions.append(validate_question(record, location))
                row_number += 1
    if unmapped:
        log.warning("convert_mmlu_csv: no program for course(s) %s", ", ".join(unmapped))
    save_exam(questions, output_jsonl)
    return len(questions)


def _load_json_records(path: str | os.PathLike, what: str) -> list[tuple[str, Any]]:
    """(location, record) pairs from a JSON list, a JSON object of records, or JSON Lines."""
    path = os.fspath(path)
    with open(path, encoding="utf-8-sig") as f:
        text = f.read()
    try:
        data = json.loads(text)
    except json.JSONDecodeError:
        return _read_jsonl(path)
    if isinstance(data, list):
        return [(f"{path}: {what}[{k}]", r) for k, r in enumerate(data)]
    if isinstance(data, dict):
        return [(f"{path}: {what}[{k!r}]", r) for k, r in data.items()]
    raise ValueError(f"{path}: expected a JSON list of {what} records, got {type(data).__name__}.")


def _parse_list(value: Any) -> Any:
    """A list given as a list, a scalar, or a string (``"[0, 2]"``, ``"2"``, ``"0, 2"``)."""
    if isinstance(value, str):
        text = value.strip()
        if not text:
            return []
        for parse in (json.loads, ast.literal_eval):
            try:
                value = parse(text)
                break
            except (ValueError, SyntaxError):
                continue
        else:
            if re.fullmatch(r"\s*-?\d+(\s*,\s*-?\d+)*\s*", text):
                return [int(t) for t in text.split(",")]
            raise ValueError(f"cannot read a list from {text!r}")
    if isinstance(value, tuple):
        value = list(value)
    if value is None:
        return []
    return value if isinstance(value, list) else [value]


_LANGUAGE_NAMES = {"english": "en", "en": "en", "french": "fr", "français": "fr", "francais": "fr", "fr": "fr"}
_TYPE_NAMES = {"mcq": "mcq", "open_answer": "open", "open": "open", "open answer": "open"}


def _first(record: Mapping[str, Any], *keys: str) -> Any:
    return next((record[k] for k in keys if record.get(k) is not None), None)


def _as_bool(value: Any) -> bool | None:
    if value is None or isinstance(value, bool):
        return value
    if isinstance(value, (int, float)) and value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.strip().casefold() in ("true", "false", "1", "0", "yes", "no"):
        return value.strip().casefold() in ("true", "1", "yes")
    raise ValueError(f"expected a boolean, got {value!r}")


def convert_nlp4education(
    questions_json: str | os.PathLike,
    courses_json: str | os.PathLike,
    output_jsonl: str | os.PathLike,
    *,
    skip_invalid: bool = False,
) -> int:
    """Convert the public dataset layout of arXiv:2408.11841 into an exam JSONL file.

    ``questions.json`` records map as ``question_body`` (or ``body``) → ``question``, ``question_options`` (or
    ``options``; a list or a stringified list) → ``options``, ``mcq_answer_index`` (0-based; an int, a list or a
    stringified list) → ``answer_indices``, ``question_answer`` (or ``answer``; a list is joined by new lines) →
    ``reference_answer``, ``question_type`` ``mcq``/``open_answer`` → ``mcq``/``open``,
    ``multiple_correct_answers`` → ``multiple_correct``, ``question_explanation`` → ``explanation``,
    ``question_difficulty`` → ``difficulty``, ``blooms_rating`` → ``blooms``. From ``courses.json`` (joined on
    ``course_id``): ``course_language`` (English/French) → ``language``, ``course_program`` → ``program``,
    ``course_year`` → ``level``. Both files may be a JSON list, a JSON object of records, or JSON Lines.

    Args:
        questions_json: The questions file.
        courses_json: The courses file.
        output_jsonl: Output path, written atomically (nothing is written on error).
        skip_invalid: Skip (and log) questions that fail a check, e.g. those whose gold answer was withdrawn from
            the public release, instead of raising.

    Returns:
        Number of questions written.

    Raises:
        ValueError: Naming the file, the record and the question id: missing ``question_id``, an unknown
            ``course_id``, an unknown question type or course language, an unreadable option list or answer
            index, or any check of :func:`validate_question` (unless ``skip_invalid``); also when no question is
            left to write.
    """
    courses: dict[str, dict[str, Any]] = {}
    for location, record in _load_json_records(courses_json, "courses"):
        if not isinstance(record, dict) or record.get("course_id") is None:
            raise ValueError(f"{location}: expected a course object with a 'course_id'.")
        courses[str(record["course_id"])] = record
    questions: list[ExamQuestion] = []
    skipped: list[str] = []
    for location, record in _load_json_records(questions_json, "questions"):
        try:
            if not isinstance(record, dict):
                raise ValueError(f"{location}: expected a question object, got {type(record).__name__}.")
            qid = record.get("question_id", record.get("id"))
            if qid is None:
                raise ValueError(f"{location}: missing field 'question_id'.")
            where = f"{location}: question {str(qid)!r}"
            course_id = record.get("course_id")
            course = courses.get(str(course_id))
            if course is None:
                raise ValueError(f"{where}: course_id {course_id!r} is not in {os.fspath(courses_json)!r}.")
            kind = _TYPE_NAMES.get(str(record.get("question_type", "")).strip().casefold())
            if kind is None:
                raise ValueError(
                    f"{where}: field 'question_type' is {record.get('question_type')!r}; "
                    f"allowed values: 'mcq', 'open_answer'."
                )
            language = _LANGUAGE_NAMES.get(str(course.get("course_language", "")).strip().casefold())
            if language is None:
                raise ValueError(
                    f"{where}: course {str(course_id)!r} has course_language {course.get('course_language')!r}; "
                    f"allowed values: English, French."
                )
            answer = _first(record, "question_answer", "answer")
            if isinstance(answer, list):
                answer = "\n".join(str(a) for a in answer if a is not None and str(a).strip()) or None
            elif answer is not None and not isinstance(answer, str):
                answer = str(answer)
            out: dict[str, Any] = {
                "question_id": str(qid),
                "course_id": str(course_id),
                "program": course.get("course_program"),
                "language": language,
                "level": course.get("course_year"),
                "question_type": kind,
                "question": _first(record, "question_body", "body", "question"),
                "reference_answer": answer,
                "explanation": _first(record, "question_explanation", "explanation"),
                "difficulty": _first(record, "question_difficulty", "difficulty"),
                "blooms": _first(record, "blooms_rating", "blooms"),
            }
            if kind == "mcq":
                try:
                    out["options"] = [str(o) for o in _parse_list(_first(record, "question_options", "options"))]
                except ValueError as err:
                    raise ValueError(f"{where}: field 'question_options': {err}.") from None
                try:
                    gold = _parse_list(record.get("mcq_answer_index"))
                    out["answer_indices"] = [int(i) if isinstance(i, str) and i.strip().isdigit() else i for i in gold]
                except ValueError as err:
                    raise ValueError(f"{where}: field 'mcq_answer_index': {err}.") from None
                try:
                    multiple = _as_bool(_first(record, "multiple_correct_answers", "multiple_correct"))
                except ValueError as err:
                    raise ValueError(f"{where}: field 'multiple_correct_answers': {err}.") from None
                if multiple is not None:
                    out["multiple_correct"] = multiple or len(out["answer_indices"]) > 1
            for key in ("program", "level"):
                if out[key] is not None and not isinstance(out[key], str):
                    out[key] = str(out[key])
            if isinstance(out["blooms"], float) and out["blooms"].is_integer():
                out["blooms"] = int(out["blooms"])
            questions.append(validate_question(out, location))
        except ValueError as err:
            if not skip_invalid:
                raise
            skipped.append(str(err))
    if skipped:
        log.warning("convert_nlp4education: skipped %d invalid question(s); first: %s", len(skipped), skipped[0])
    if not questions:
        raise ValueError(f"{os.fspath(questions_json)!r}: no valid question to write.")
    save_exam(questions, output_jsonl)
    return len(questions)


# --------------------------------------------------------------------------------------------------------------------
# stdlib exam and fixtures
# --------------------------------------------------------------------------------------------------------------------


def _builtin_description(name: str, obj: Any) -> str | None:
    """First prose sentence of ``obj``'s docstring that starts a paragraph and does not name ``name``.

    Lines naming the builtin (signature lines such as ``int(x) -> integer`` and sentences using the name) are
    dropped; a sentence that runs into a dropped line or does not end with a full stop is not used.
    """
    lines = [line.strip() for line in (inspect.getdoc(obj) or "").splitlines()]
    named = re.compile(rf"(?<![\w.]){re.escape(name)}(?!\w)")
    for i, first in enumerate(lines):
        if not first or (i and lines[i - 1]) or named.search(first) or not first[0].isupper() or "->" in first:
            continue
        text = first
        for line in lines[i + 1 :]:
            if re.search(r"\.(\s|$)", text) or not line or named.search(line):
                break
            text += " " + line
        sentence = re.split(r"(?<=\.)\s+", text)[0]
        if len(sentence.split()) >= 3 and sentence.endswith("."):
            return sentence
    return None


def _stdlib_entries() -> dict[str, list[tuple[str, str]]]:
    import builtins

    found: dict[str, list[tuple[str, str]]] = {"python_builtin_functions": [], "python_builtin_types": []}
    descriptions: dict[str, list[str]] = {}
    kinds: dict[str, str] = {}
    for name in sorted(dir(builtins)):
        if name.startswith("_"):
            continue
        obj = getattr(builtins, name)
        if isinstance(obj, type):
            if issubclass(obj, BaseException):
                continue
            course = "python_builtin_types"
        elif inspect.isbuiltin(obj):
            course = "python_builtin_functions"
        else:
            continue
        text = _builtin_description(name, obj)
        if text is not None:
            descriptions.setdefault(text, []).append(name)
            kinds[name] = course
    for text, names in descriptions.items():
        if len(names) == 1:  # a description two builtins share has no single answer
            found[kinds[names[0]]].append((names[0], text))
    return {course: sorted(entries) for course, entries in found.items()}


def build_stdlib_exam(seed: int = 0, num_options: int = 4) -> list[ExamQuestion]:
    """A real-text English exam built offline from the docstrings of Python's builtins.

    Each builtin whose docstring has a prose sentence that does not name it (signature lines such as
    ``int(x) -> integer`` are skipped) and whose sentence no other builtin shares gives two questions in course
    ``python_builtin_functions`` or ``python_builtin_types`` (program ``python``): an MCQ "Which Python built-in
    is described by: …?" whose options are the builtin and ``num_options - 1`` other builtins of the same course,
    and an open question "What does the Python built-in ``X`` do?" whose reference answer is the sentence. The
    number of questions depends on the Python version (about 70 builtins qualify). Per course, four builtins
    (drawn with ``seed``) are kept out of the questions and serve as the course's four MCQ and four open demos.

    Args:
        seed: Seed of the demo choice, the distractors and the option order.
        num_options: Options per MCQ, in ``[2, 26]`` and at most the size of the smaller course.

    Returns:
        The questions (MCQ and open alternate per builtin), each with its course's demos of the same type.

    Raises:
        ValueError: If ``num_options`` is out of range or ``seed`` is not an int.
    """
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ValueError(f"`seed` must be an int, got {seed!r}.")
    entries = _stdlib_entries()
    smallest = min(len(v) for v in entries.values())
    if isinstance(num_options, bool) or not isinstance(num_options, int) or not 2 <= num_options <= min(26, smallest):
        raise ValueError(f"`num_options` must be an int in [2, {min(26, smallest)}], got {num_options!r}.")
    rng = random.Random(seed)

    def mcq(name: str, text: str, names: list[str]) -> dict[str, Any]:
        others = rng.sample([n for n in names if n != name], num_options - 1)
        position = rng.randrange(num_options)
        options = others[:position] + [name] + others[position:]
        return {
            "question": f"Which Python built-in is described by: “{text}”?",
            "options": options,
            "answer_indices": [position],
        }

    questions: list[ExamQuestion] = []
    for course, items in entries.items():
        names = [n for n, _ in items]
        order = list(range(len(items)))
        rng.shuffle(order)
        demo_ids = set(order[:4])
        mcq_demos, open_demos = [], []
        for k in sorted(demo_ids):
            name, text = items[k]
            demo = mcq(name, text, names)
            demo["explanation"] = f"The sentence is the summary line of the documentation of `{name}`."
            mcq_demos.append(demo)
            open_demos.append(
                {
                    "question": f"What does the Python built-in `{name}` do?",
                    "reference_answer": text,
                    "explanation": f"The documentation of `{name}` summarises it in one sentence.",
                }
            )
        for k, (name, text) in enumerate(items):
            if k in demo_ids:
                continue
            common = {"course_id": course, "program": "python", "language": "en", "level": None}
            record = {"question_id": f"stdlib-mcq-{name}", **common, "question_type": "mcq", **mcq(name, text, names)}
            record["demos"] = mcq_demos
            questions.append(validate_question(record, f"stdlib:{name}"))
            record = {
                "question_id": f"stdlib-open-{name}",
                **common,
                "question_type": "open",
                "question": f"What does the Python built-in `{name}` do?",
                "reference_answer": text,
                "demos": open_demos,
            }
            questions.append(validate_question(record, f"stdlib:{name}"))
    return questions


def fixture_exam_path() -> str:
    """Path of the packaged fixture exam: 12 questions written for this package (not drawn from any dataset).

    Three courses (``intro_programming`` in English and ``linear_algebra`` in English, programs
    ``computer_science`` and ``mathematics``; ``analyse_1`` in French, program ``mathematics``), single- and
    multi-answer MCQs and two open questions; every question carries four worked demos of its course (with
    explanations, for few-shot chain-of-thought prompts).
    """
    return str(resources.files("lightning_epfl.datamodules").joinpath("exam_fixtures.jsonl"))


# --------------------------------------------------------------------------------------------------------------------
# datamodule
# --------------------------------------------------------------------------------------------------------------------


class _Questions(Dataset):
    def __init__(self, questions: list[dict[str, Any]]) -> None:
        self.questions = questions

    def __len__(self) -> int:
        return len(self.questions)

    def __getitem__(self, i: int) -> dict[str, Any]:
        return self.questions[i]


def collate_questions(batch: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Collate that keeps the question dicts as they are (a shallow copy of each)."""
    return [dict(q) for q in batch]


def _check_subset(value: Any, name: str, allowed: Sequence[str] | None) -> list[str] | None:
    if value is None:
        return None
    if isinstance(value, str) or not isinstance(value, Sequence) or not value:
        raise ValueError(f"`{name}` must be a non-empty list of strings or None, got {value!r}.")
    values = list(value)
    for v in values:
        if not isinstance(v, str) or not v or (allowed is not None and v not in allowed):
            allowed_text = f"; allowed values: {list(allowed)}" if allowed is not None else ""
            raise ValueError(f"`{name}` contains {v!r}{allowed_text}.")
    return values


class ExamDataModule(LightningDataModule):
    """Exam questions for ``trainer.test`` / ``trainer.predict`` (arXiv:2408.11841 evaluation protocol).

    Batches are ``list[dict]``: every key of :class:`ExamQuestion` plus ``index``, the question's 0-based position
    in the file (a stable integer id, e.g. for :class:`~lightning_epfl.metrics.ExamOutcomeMatrix`). A question's
    ``demos`` are its own when it has any, else its course's demos from ``demos_path`` (possibly ``[]``).

    Attributes (after :meth:`setup`):
        all_questions: Every question in the file (with ``index``): the pool for one-shot demo retrieval.
        questions: The questions served, after the filters and the per-course sampling.
        course_ids: Sorted course ids of the whole file.
        course_program: Course -> program (``None`` when no question of the course names one).
        demos: Course -> demos: those of ``demos_path`` when it lists the course, else the distinct demos carried
            by the course's questions.

    Args:
        path: JSONL exam file (see :func:`load_exam`), or ``"<fixtures>"`` (the packaged fixture questions) or
            ``"<stdlib>"`` (:func:`build_stdlib_exam` with ``seed``).
        demos_path: Optional JSONL demos file (see :func:`load_demos`).
        batch_size: Questions per batch, ``>= 1`` (default 4).
        languages: Keep only these languages (``"en"``, ``"fr"``); ``None`` keeps all.
        question_types: Keep only these types (``"mcq"``, ``"open"``); ``None`` keeps all.
        courses: Keep only these course ids; ``None`` keeps all. Unknown ids raise at setup.
        max_questions_per_course: Keep at most this many questions per course, drawn with ``seed`` independently
            per course (stratified by course) and served in file order; ``None`` keeps all.
        seed: Seed of the per-course sampling (and of ``"<stdlib>"``).

    Raises:
        ValueError: In ``__init__``, naming the argument: an empty ``path``, ``batch_size`` or
            ``max_questions_per_course`` not a positive int, ``seed`` not an int, filters that are not non-empty
            lists of allowed values. At setup: unknown ``courses`` or filters that leave no question.
        FileNotFoundError: At setup, if ``path`` or ``demos_path`` does not exist.
    """

    def __init__(
        self,
        path: str,
        demos_path: str | None = None,
        batch_size: int = 4,
        languages: list[str] | None = None,
        question_types: list[str] | None = None,
        courses: list[str] | None = None,
        max_questions_per_course: int | None = None,
        seed: int = 0,
    ) -> None:
        super().__init__()
        if not isinstance(path, (str, os.PathLike)) or not os.fspath(path):
            raise ValueError(f"`path` must be a non-empty file path, '<fixtures>' or '<stdlib>', got {path!r}.")
        if demos_path is not None and (not isinstance(demos_path, (str, os.PathLike)) or not os.fspath(demos_path)):
            raise ValueError(f"`demos_path` must be a non-empty file path or None, got {demos_path!r}.")
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"`batch_size` must be an int >= 1, got {batch_size!r}.")
        if max_questions_per_course is not None and (
            isinstance(max_questions_per_course, bool)
            or not isinstance(max_questions_per_course, int)
            or max_questions_per_course < 1
        ):
            raise ValueError(
                f"`max_questions_per_course` must be an int >= 1 or None, got {max_questions_per_course!r}."
            )
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise ValueError(f"`seed` must be an int, got {seed!r}.")
        self.path = os.fspath(path)
        self.demos_path = None if demos_path is None else os.fspath(demos_path)
        self.batch_size = batch_size
        self.languages = _check_subset(languages, "languages", LANGUAGES)
        self.question_types = _check_subset(question_types, "question_types", QUESTION_TYPES)
        self.courses = _check_subset(courses, "courses", None)
        self.max_questions_per_course = max_questions_per_course
        self.seed = seed
        self.save_hyperparameters()
        self.all_questions: list[dict[str, Any]] = []
        self.questions: list[dict[str, Any]] = []
        self.course_ids: list[str] = []
        self.course_program: dict[str, str | None] = {}
        self.demos: dict[str, list[ExamDemo]] = {}
        self._loaded = False

    def _read(self) -> list[ExamQuestion]:
        if self.path == FIXTURES:
            return load_exam(fixture_exam_path())
        if self.path == STDLIB:
            return build_stdlib_exam(seed=self.seed)
        return load_exam(self.path)

    def setup(self, stage: str | None = None) -> None:
        """Load, filter and sample the questions (once)."""
        if self._loaded:
            return
        loaded = self._read()
        file_demos = load_demos(self.demos_path) if self.demos_path is not None else {}
        self.course_ids = sorted({q["course_id"] for q in loaded})
        self.course_program = {c: None for c in self.course_ids}
        carried: dict[str, list[ExamDemo]] = {}
        for q in loaded:
            if q.get("program") is not None:
                self.course_program[q["course_id"]] = q["program"]
            pool = carried.setdefault(q["course_id"], [])
            for demo in q.get("demos") or []:
                if demo not in pool:
                    pool.append(demo)
        self.demos = {c: list(file_demos.get(c) or carried.get(c, [])) for c in self.course_ids}
        self.all_questions = []
        for index, q in enumerate(loaded):
            item = dict(q)
            item["demos"] = list(q.get("demos") or file_demos.get(q["course_id"], []))
            item["index"] = index
            self.all_questions.append(item)

        if self.courses is not None:
            unknown = sorted(set(self.courses) - set(self.course_ids))
            if unknown:
                raise ValueError(f"`courses` names unknown course(s) {unknown}; available: {self.course_ids}.")
        kept = [
            q
            for q in self.all_questions
            if (self.languages is None or q["language"] in self.languages)
            and (self.question_types is None or q["question_type"] in self.question_types)
            and (self.courses is None or q["course_id"] in self.courses)
        ]
        if not kept:
            raise ValueError(
                f"no question left after the filters languages={self.languages}, "
                f"question_types={self.question_types}, courses={self.courses}."
            )
        if self.max_questions_per_course is not None:
            by_course: dict[str, list[int]] = {}
            for position, q in enumerate(kept):
                by_course.setdefault(q["course_id"], []).append(position)
            chosen: set[int] = set()
            for course in sorted(by_course):
                positions = by_course[course]
                if len(positions) > self.max_questions_per_course:
                    rng = random.Random(f"{self.seed}:{course}")
                    positions = rng.sample(positions, self.max_questions_per_course)
                chosen.update(positions)
            kept = [q for position, q in enumerate(kept) if position in chosen]
        self.questions = kept
        self._loaded = True

    def _loader(self) -> DataLoader:
        self.setup()
        return DataLoader(
            _Questions(self.questions), batch_size=self.batch_size, shuffle=False, collate_fn=collate_questions
        )

    def test_dataloader(self) -> DataLoader:
        """The served questions in order, ``batch_size`` per batch, as ``list[dict]``."""
        return self._loader()

    def predict_dataloader(self) -> DataLoader:
        """Same as :meth:`test_dataloader`."""
        return self._loader()


# --------------------------------------------------------------------------------------------------------------------
# console script
# --------------------------------------------------------------------------------------------------------------------


def convert_exam_cli(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``lightning-epfl-convert-exam``.

    Subcommands::

        lightning-epfl-convert-exam mmlu-csv FOLDER OUTPUT [--programs PROGRAMS_JSON] [--overwrite]
        lightning-epfl-convert-exam nlp4education QUESTIONS_JSON COURSES_JSON OUTPUT [--skip-invalid] [--overwrite]

    An existing OUTPUT is refused unless ``--overwrite`` is given.
        lightning-epfl-convert-exam validate EXAM_JSONL

    Returns:
        0 on success (the number of questions is printed), 2 on invalid input (the error goes to stderr).
    """
    parser = argparse.ArgumentParser(
        prog="lightning-epfl-convert-exam", description="Convert exam questions to the lightning-epfl JSONL format."
    )
    sub = parser.add_subparsers(dest="format", required=True)
    p = sub.add_parser("mmlu-csv", help="a folder of <course>_test.csv files (question,A,B,C,D,answer)")
    p.add_argument("folder")
    p.add_argument("output")
    p.add_argument("--programs", default=None, help="JSON course->program or program->[courses] map")
    p = sub.add_parser("nlp4education", help="questions.json + courses.json of arXiv:2408.11841")
    p.add_argument("questions")
    p.add_argument("courses")
    p.add_argument("output")
    p.add_argument("--skip-invalid", action="store_true", help="skip questions that fail a check")
    p = sub.add_parser("validate", help="check an exam JSONL file")
    p.add_argument("path")
    for name in ("mmlu-csv", "nlp4education"):
        sub.choices[name].add_argument("--overwrite", action="store_true", help="replace an existing output file")
    args = parser.parse_args(argv)
    try:
        if args.format != "validate" and os.path.exists(args.output) and not args.overwrite:
            raise FileExistsError(f"{args.output!r} exists; give another output path or --overwrite.")
        if args.format == "mmlu-csv":
            n = convert_mmlu_csv(args.folder, args.output, programs=args.programs)
            print(f"wrote {n} questions to {args.output}")
        elif args.format == "nlp4education":
            n = convert_nlp4education(args.questions, args.courses, args.output, skip_invalid=args.skip_invalid)
            print(f"wrote {n} questions to {args.output}")
        else:
            n = len(load_exam(args.path))
            print(f"{args.path}: {n} valid questions")
    except (ValueError, FileNotFoundError, FileExistsError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0
