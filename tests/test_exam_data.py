"""Exam questions: JSONL validation, converters (MMLU-style CSV, the arXiv:2408.11841 layout), the datamodule, the
stdlib exam, the packaged fixtures and the ``lightning-epfl-convert-exam`` console script."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pytest

from lightning_epfl.datamodules import (
    ExamDataModule,
    build_stdlib_exam,
    convert_exam_cli,
    convert_mmlu_csv,
    convert_nlp4education,
    fixture_exam_path,
    load_course_programs,
    load_demos,
    load_exam,
    save_exam,
    validate_question,
)

MMLU = Path(__file__).resolve().parents[2] / "shared" / "data" / "mmlu"
ROOT = Path(__file__).resolve().parents[1]

MCQ = {
    "question_id": "q1",
    "course_id": "c1",
    "language": "en",
    "question_type": "mcq",
    "question": "Pick the even number.",
    "options": ["1", "2", "3"],
    "answer_indices": [1],
}
OPEN = {
    "question_id": "q2",
    "course_id": "c1",
    "language": "fr",
    "question_type": "open",
    "question": "Pourquoi ?",
    "reference_answer": "Parce que.",
}


def _write_jsonl(path: Path, records) -> Path:
    lines = [r if isinstance(r, str) else json.dumps(r, ensure_ascii=False) for r in records]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


# --------------------------------------------------------------------------------------------------------------------
# load / validate / save
# --------------------------------------------------------------------------------------------------------------------


def test_load_exam_normalises_records(tmp_path):
    path = _write_jsonl(tmp_path / "exam.jsonl", [MCQ, "", {**OPEN, "question_id": 7}])
    questions = load_exam(path)
    assert [q["question_id"] for q in questions] == ["q1", "7"]
    mcq, open_ = questions
    assert mcq["multiple_correct"] is False and mcq["reference_answer"] is None and mcq["demos"] == []
    assert mcq["program"] is None and mcq["level"] is None
    assert open_["options"] == [] and open_["answer_indices"] == []
    multi = validate_question({**MCQ, "answer_indices": [0, 2]})
    assert multi["multiple_correct"] is True


BAD = [
    (["{not json"], 1, "invalid JSON"),
    ([MCQ, {k: v for k, v in MCQ.items() if k != "question"} | {"question_id": "q9"}], 2, "missing field 'question'"),
    ([{**MCQ, "question_type": "essay"}], 1, "field 'question_type' is 'essay'; allowed values: ['mcq', 'open']"),
    ([{**MCQ, "language": "de"}], 1, "field 'language' is 'de'; allowed values: ['en', 'fr']"),
    ([{**MCQ, "options": ["only"], "answer_indices": [0]}], 1, "at least 2 options"),
    ([{**MCQ, "answer_indices": [3]}], 1, "gold answer index 3 is not among the 3 choices"),
    ([{**MCQ, "answer_indices": []}], 1, "at least one correct option"),
    ([{k: v for k, v in MCQ.items() if k != "answer_indices"}], 1, "missing field 'answer_indices'"),
    ([{k: v for k, v in OPEN.items() if k != "reference_answer"}], 1, "missing field 'reference_answer'"),
    ([MCQ, OPEN, {**OPEN, "question": "again"}], 3, "duplicate question_id (first seen at"),
    ([{**MCQ, "answer": "B"}], 1, "unknown field(s) ['answer']"),
    ([{**MCQ, "answer_indices": [0, 1], "multiple_correct": False}], 1, "field 'multiple_correct' is false"),
    (
        [{**MCQ, "demos": [{"question": "x", "options": ["a", "b"], "answer_indices": [5]}]}],
        1,
        "demos[0].answer_indices",
    ),
    ([{**OPEN, "options": ["a", "b"]}], 1, "field 'options' must be empty"),
    ([MCQ, {**OPEN, "course_id": "c1", "program": "P"}, {**OPEN, "question_id": "q3", "program": "Q"}], 3, "program"),
    (["[1, 2]"], 1, "expected a JSON object"),
]


@pytest.mark.parametrize(("records", "line", "message"), BAD)
def test_load_exam_errors_name_line_id_and_field(tmp_path, records, line, message):
    path = _write_jsonl(tmp_path / "bad.jsonl", records)
    with pytest.raises(ValueError) as err:
        load_exam(path)
    text = str(err.value)
    assert text.startswith(f"{path}:{line}"), text
    assert message in text, text
    record = records[line - 1]
    if isinstance(record, dict):
        assert f"question {record['question_id']!r}" in text


def test_load_exam_missing_and_empty(tmp_path):
    with pytest.raises(FileNotFoundError):
        load_exam(tmp_path / "nope.jsonl")
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(ValueError, match="no questions"):
        load_exam(tmp_path / "empty.jsonl")


def test_save_exam_round_trip_and_atomic(tmp_path):
    path = tmp_path / "out" / "exam.jsonl"
    save_exam([{**MCQ, "index": 3}, OPEN], path)
    assert load_exam(path) == [validate_question(MCQ), validate_question(OPEN)]
    assert "index" not in path.read_text()
    before = path.read_text()
    with pytest.raises(ValueError, match=r"question\[1\]: question 'q2'"):
        save_exam([MCQ, {**OPEN, "language": "it"}], path)
    assert path.read_text() == before
    assert os.listdir(path.parent) == ["exam.jsonl"]


def test_load_demos_and_course_programs(tmp_path):
    demo = {"course_id": "c1", "question": "1+1?", "options": ["1", "2"], "answer_indices": [1], "explanation": "sum"}
    path = _write_jsonl(tmp_path / "demos.jsonl", [demo, {**demo, "course_id": "c2"}])
    demos = load_demos(path)
    assert sorted(demos) == ["c1", "c2"] and demos["c1"][0]["answer_indices"] == [1]
    _write_jsonl(tmp_path / "bad.jsonl", [{k: v for k, v in demo.items() if k != "course_id"}])
    with pytest.raises(ValueError, match=r"bad.jsonl:1: field 'demo.course_id' is missing"):
        load_demos(tmp_path / "bad.jsonl")
    assert load_course_programs({"a": "P", "b": None}) == {"a": "P", "b": None}
    (tmp_path / "p.json").write_text(json.dumps({"_comment": "x", "P": ["a", "b"], "Q": ["c"]}))
    assert load_course_programs(tmp_path / "p.json") == {"a": "P", "b": "P", "c": "Q"}
    (tmp_path / "bad.json").write_text(json.dumps({"P": ["a"], "Q": "b"}))
    with pytest.raises(ValueError, match="bad.json"):
        load_course_programs(tmp_path / "bad.json")


# --------------------------------------------------------------------------------------------------------------------
# MMLU-style CSV
# --------------------------------------------------------------------------------------------------------------------


def _csv_folder(tmp_path: Path) -> Path:
    folder = tmp_path / "csv"
    folder.mkdir()
    (folder / "optics_test.csv").write_text(
        'What bends light?,A prism,"A mirror, flat",Air,Nothing,A\n"A question\nover two lines?",x,y,z,w,d\n',
        encoding="utf-8",
    )
    (folder / "graphs_test.csv").write_text("How many edges has K3?,1,2,3,4,C\n", encoding="utf-8")
    (folder / "notes.txt").write_text("ignored")
    return folder


def test_convert_mmlu_csv_synthetic(tmp_path):
    folder = _csv_folder(tmp_path)
    out = tmp_path / "exam.jsonl"
    n = convert_mmlu_csv(folder, out, programs={"optics": "Physics"})
    assert n == 3
    questions = load_exam(out)
    assert [q["question_id"] for q in questions] == ["graphs/0", "optics/0", "optics/1"]
    graphs, prism, two_lines = questions
    assert graphs["answer_indices"] == [2] and graphs["program"] is None
    assert prism["options"] == ["A prism", "A mirror, flat", "Air", "Nothing"] and prism["program"] == "Physics"
    assert two_lines["question"] == "A question\nover two lines?" and two_lines["answer_indices"] == [3]
    assert all(q["language"] == "en" and q["question_type"] == "mcq" for q in questions)
    (tmp_path / "programs.json").write_text(json.dumps({"Physics": ["optics"], "CS": ["graphs"]}))
    convert_mmlu_csv(folder, out, programs=str(tmp_path / "programs.json"))
    assert [q["program"] for q in load_exam(out)] == ["CS", "Physics", "Physics"]


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ('q1,a,b,c,d,A\n"multi\nline",a,b,c,A\n', r"bad_test.csv:2: expected 6 columns .* got 5"),
        ("q1,a,b,c,d,A\nq2,a,b,c,d,e,A\n", r"bad_test.csv:2: expected 6 columns .* got 7"),
        ("q1,a,b,c,d,E\n", r"bad_test.csv:1: field 'answer' is 'E'; allowed values: A, B, C, D"),
        ("q1,a,,c,d,A\n", r"bad_test.csv:1: question 'bad/0': field 'options'"),
    ],
)
def test_convert_mmlu_csv_errors(tmp_path, content, message):
    folder = tmp_path / "csv"
    folder.mkdir()
    (folder / "bad_test.csv").write_text(content, encoding="utf-8")
    with pytest.raises(ValueError, match=message):
        convert_mmlu_csv(folder, tmp_path / "out.jsonl")
    assert not (tmp_path / "out.jsonl").exists()


def test_convert_mmlu_csv_folder_errors(tmp_path):
    with pytest.raises(ValueError, match="`folder`.*not a directory"):
        convert_mmlu_csv(tmp_path / "missing", tmp_path / "out.jsonl")
    with pytest.raises(ValueError, match="no <course>_test.csv"):
        convert_mmlu_csv(tmp_path, tmp_path / "out.jsonl")


@pytest.mark.skipif(not MMLU.is_dir(), reason="shared MMLU course files not available")
def test_convert_real_mmlu_folder(tmp_path):
    out = tmp_path / "mmlu.jsonl"
    n = convert_mmlu_csv(MMLU, out, programs=MMLU / "programs.json")
    assert n == 1938
    questions = load_exam(out)
    assert len({q["course_id"] for q in questions}) == 15
    assert all(q["program"] is not None for q in questions)
    assert len({q["program"] for q in questions}) == 6
    assert all(len(q["options"]) == 4 and len(q["answer_indices"]) == 1 for q in questions)


# --------------------------------------------------------------------------------------------------------------------
# arXiv:2408.11841 layout
# --------------------------------------------------------------------------------------------------------------------

COURSES = [
    {
        "course_id": 1,
        "course_name": "X",
        "course_program": "Physics",
        "course_language": "English",
        "course_year": "bachelor",
    },
    {"course_id": 2, "course_name": "Y", "course_program": None, "course_language": "French", "course_year": "online"},
]
QUESTIONS = [
    {
        "question_id": 10,
        "course_id": 1,
        "question_type": "mcq",
        "question_body": "Which are vectors?",
        "question_options": ["force", "mass", "velocity"],
        "mcq_answer_index": "[0, 2]",
        "question_answer": ["force", "velocity"],
        "multiple_correct_answers": True,
        "question_difficulty": "hard",
        "blooms_rating": 2,
    },
    {
        "question_id": 11,
        "course_id": 2,
        "question_type": "mcq",
        "question_body": "Unité de la force ?",
        "question_options": "['newton', 'joule']",
        "mcq_answer_index": 0,
        "multiple_correct_answers": False,
    },
    {
        "question_id": 12,
        "course_id": 2,
        "question_type": "open_answer",
        "question_body": "Définir l'énergie.",
        "question_answer": "La capacité à produire un travail.",
        "question_explanation": "Définition usuelle.",
        "mcq_answer_index": None,
    },
]
EXPECTED = [
    {
        "question_id": "10",
        "course_id": "1",
        "program": "Physics",
        "language": "en",
        "level": "bachelor",
        "question_type": "mcq",
        "question": "Which are vectors?",
        "options": ["force", "mass", "velocity"],
        "answer_indices": [0, 2],
        "multiple_correct": True,
        "reference_answer": "force\nvelocity",
        "difficulty": "hard",
        "blooms": 2,
    },
    {
        "question_id": "11",
        "course_id": "2",
        "language": "fr",
        "level": "online",
        "question_type": "mcq",
        "question": "Unité de la force ?",
        "options": ["newton", "joule"],
        "answer_indices": [0],
        "multiple_correct": False,
        "reference_answer": None,
    },
    {
        "question_id": "12",
        "course_id": "2",
        "language": "fr",
        "level": "online",
        "question_type": "open",
        "question": "Définir l'énergie.",
        "options": [],
        "answer_indices": [],
        "multiple_correct": False,
        "reference_answer": "La capacité à produire un travail.",
        "explanation": "Définition usuelle.",
    },
]


def _nlp4education_files(tmp_path, questions=QUESTIONS, courses=COURSES):
    q, c = tmp_path / "questions.json", tmp_path / "courses.json"
    q.write_text(json.dumps(questions, ensure_ascii=False), encoding="utf-8")
    c.write_text(json.dumps(courses), encoding="utf-8")
    return q, c


def test_convert_nlp4education_exact_output(tmp_path):
    q, c = _nlp4education_files(tmp_path)
    out = tmp_path / "exam.jsonl"
    assert convert_nlp4education(q, c, out) == 3
    lines = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    assert lines == EXPECTED
    assert not [f for f in os.listdir(tmp_path) if ".tmp" in f]


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"course_id": 99}, r"question '10': course_id 99 is not in"),
        ({"mcq_answer_index": "[0, 7]"}, r"question '10': field 'answer_indices': gold answer index 7"),
        ({"mcq_answer_index": "zero"}, r"question '10': field 'mcq_answer_index'"),
        ({"question_type": "essay"}, r"question '10': field 'question_type' is 'essay'"),
        ({"question_body": None}, r"question '10': missing field 'question'"),
    ],
)
def test_convert_nlp4education_errors_name_the_id(tmp_path, change, message):
    q, c = _nlp4education_files(tmp_path, [{**QUESTIONS[0], **change}, *QUESTIONS[1:]])
    with pytest.raises(ValueError, match=message):
        convert_nlp4education(q, c, tmp_path / "out.jsonl")
    assert not (tmp_path / "out.jsonl").exists()


def test_convert_nlp4education_skip_invalid_and_language(tmp_path):
    q, c = _nlp4education_files(tmp_path, [{**QUESTIONS[0], "mcq_answer_index": None}, *QUESTIONS[1:]])
    assert convert_nlp4education(q, c, tmp_path / "out.jsonl", skip_invalid=True) == 2
    q, c = _nlp4education_files(tmp_path, courses=[{**COURSES[0], "course_language": "German"}, COURSES[1]])
    with pytest.raises(ValueError, match="question '10': course '1' has course_language 'German'"):
        convert_nlp4education(q, c, tmp_path / "out.jsonl")


# --------------------------------------------------------------------------------------------------------------------
# console script
# --------------------------------------------------------------------------------------------------------------------


def test_console_script(tmp_path, capsys):
    folder = _csv_folder(tmp_path)
    out = tmp_path / "cli.jsonl"
    assert convert_exam_cli(["mmlu-csv", str(folder), str(out), "--programs", json_path(tmp_path)]) == 0
    assert "wrote 3 questions" in capsys.readouterr().out
    assert convert_exam_cli(["validate", str(out)]) == 0
    q, c = _nlp4education_files(tmp_path)
    assert convert_exam_cli(["nlp4education", str(q), str(c), str(tmp_path / "n.jsonl")]) == 0
    before = out.read_text()
    assert convert_exam_cli(["mmlu-csv", str(folder), str(out)]) == 2  # an existing output is kept
    assert "exists; give another output path or --overwrite" in capsys.readouterr().err and out.read_text() == before
    (folder / "broken_test.csv").write_text("q,a,b,A\n")
    assert convert_exam_cli(["mmlu-csv", str(folder), str(out), "--overwrite"]) == 2
    assert re.search(r"error: .*broken_test.csv:1: expected 6 columns", capsys.readouterr().err)
    assert out.read_text() == before
    with pytest.raises(SystemExit):
        convert_exam_cli(["xml", "a", "b"])
    pyproject = (ROOT / "pyproject.toml").read_text()
    assert 'lightning-epfl-convert-exam = "lightning_epfl.datamodules.exam:convert_exam_cli"' in pyproject


def json_path(tmp_path: Path) -> str:
    path = tmp_path / "programs.json"
    path.write_text(json.dumps({"Physics": ["optics"], "CS": ["graphs"]}))
    return str(path)


# --------------------------------------------------------------------------------------------------------------------
# fixtures and stdlib exam
# --------------------------------------------------------------------------------------------------------------------


def test_fixture_exam():
    questions = load_exam(fixture_exam_path())
    assert 10 <= len(questions) <= 14
    courses = {q["course_id"] for q in questions}
    assert len(courses) == 3
    assert len({q["program"] for q in questions}) == 2
    assert {q["language"] for q in questions} == {"en", "fr"}
    assert sum(q["question_type"] == "open" for q in questions) == 2
    assert any(q["multiple_correct"] for q in questions)
    assert any(q["question_type"] == "mcq" and not q["multiple_correct"] for q in questions)
    texts = {q["question"] for q in questions}
    for course in courses:
        in_course = [q for q in questions if q["course_id"] == course]
        assert len(in_course) >= 2  # a one-shot demo from the same course, never the question itself
        demos = {json.dumps(d, sort_keys=True) for q in in_course for d in q["demos"]}
        assert len(demos) >= 4  # four-shot chain of thought
        assert all(json.loads(d)["explanation"] for d in demos)
        assert not {json.loads(d)["question"] for d in demos} & texts  # demos are not test questions
    pyproject = (ROOT / "pyproject.toml").read_text()
    assert re.search(r'\[tool\.setuptools\.package-data\]\n"lightning_epfl\.datamodules" = \["\*\.jsonl"\]', pyproject)


def test_build_stdlib_exam():
    questions = build_stdlib_exam(seed=0)
    assert len(questions) >= 60
    assert {q["course_id"] for q in questions} == {"python_builtin_functions", "python_builtin_types"}
    for q in questions:
        name = q["question_id"].split("-", 2)[2]
        if q["question_type"] == "mcq":
            assert q["options"][q["answer_indices"][0]] == name and len(q["options"]) == 4
            description = q["question"].split("“")[1].split("”")[0]
        else:
            assert f"`{name}`" in q["question"]
            description = q["reference_answer"]
        assert not re.search(rf"(?<![\w.]){re.escape(name)}(?!\w)", description)  # the text never names the answer
        assert len(q["demos"]) == 4
        assert all(d["question"] != q["question"] for d in q["demos"])
    assert build_stdlib_exam(seed=0) == questions
    assert build_stdlib_exam(seed=1) != questions
    assert all(len(q["options"]) == 2 for q in build_stdlib_exam(num_options=2) if q["question_type"] == "mcq")
    with pytest.raises(ValueError, match="num_options"):
        build_stdlib_exam(num_options=1)
    with pytest.raises(ValueError, match="seed"):
        build_stdlib_exam(seed="0")


# --------------------------------------------------------------------------------------------------------------------
# datamodule
# --------------------------------------------------------------------------------------------------------------------


def test_datamodule_batches_are_lists_of_dicts():
    data = ExamDataModule("<fixtures>", batch_size=5)
    batches = list(data.test_dataloader())
    assert [len(b) for b in batches] == [5, 5, 2]
    flat = [q for b in batches for q in b]
    assert [q["index"] for q in flat] == list(range(12))
    assert all(isinstance(q, dict) and "question" in q and "demos" in q for q in flat)
    assert data.course_ids == ["analyse_1", "intro_programming", "linear_algebra"]
    assert data.course_program == {
        "analyse_1": "mathematics",
        "intro_programming": "computer_science",
        "linear_algebra": "mathematics",
    }
    assert all(len(v) == 4 for v in data.demos.values())
    assert [len(b) for b in data.predict_dataloader()] == [5, 5, 2]


def test_datamodule_filters_and_stratified_sampling():
    data = ExamDataModule("<fixtures>", languages=["en"], question_types=["mcq"])
    data.setup()
    assert {q["language"] for q in data.questions} == {"en"} and len(data.questions) == 6
    assert len(data.all_questions) == 12
    sampled = ExamDataModule("<fixtures>", max_questions_per_course=2, seed=3)
    sampled.setup()
    per_course = {}
    for q in sampled.questions:
        per_course[q["course_id"]] = per_course.get(q["course_id"], 0) + 1
    assert per_course == {"intro_programming": 2, "linear_algebra": 2, "analyse_1": 2}
    assert [q["index"] for q in sampled.questions] == sorted(q["index"] for q in sampled.questions)
    again = ExamDataModule("<fixtures>", max_questions_per_course=2, seed=3)
    again.setup()
    assert [q["index"] for q in again.questions] == [q["index"] for q in sampled.questions]
    picks = set()
    for seed in range(6):
        other = ExamDataModule("<fixtures>", max_questions_per_course=2, seed=seed)
        other.setup()
        picks.add(tuple(q["index"] for q in other.questions))
    assert len(picks) > 1
    only = ExamDataModule("<fixtures>", courses=["analyse_1"])
    only.setup()
    assert {q["course_id"] for q in only.questions} == {"analyse_1"}


def test_datamodule_demos_file_and_stdlib(tmp_path):
    exam = _write_jsonl(tmp_path / "exam.jsonl", [MCQ, OPEN])
    demo = {"course_id": "c1", "question": "2+2?", "options": ["4", "5"], "answer_indices": [0], "explanation": "add"}
    demos = _write_jsonl(tmp_path / "demos.jsonl", [demo])
    data = ExamDataModule(str(exam), demos_path=str(demos))
    data.setup()
    assert [q["demos"][0]["question"] for q in data.questions] == ["2+2?", "2+2?"]
    assert data.demos["c1"][0]["explanation"] == "add"
    stdlib = ExamDataModule("<stdlib>", question_types=["open"])
    stdlib.setup()
    assert stdlib.questions and all(q["question_type"] == "open" for q in stdlib.questions)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"path": ""}, "`path`"),
        ({"batch_size": 0}, "`batch_size`"),
        ({"languages": ["de"]}, r"`languages` contains 'de'; allowed values: \['en', 'fr'\]"),
        ({"question_types": ["essay"]}, "`question_types`"),
        ({"question_types": "mcq"}, "`question_types`"),
        ({"courses": []}, "`courses`"),
        ({"max_questions_per_course": 0}, "`max_questions_per_course`"),
        ({"seed": 1.5}, "`seed`"),
        ({"demos_path": ""}, "`demos_path`"),
    ],
)
def test_datamodule_argument_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ExamDataModule(**{"path": "<fixtures>", **kwargs})


def test_datamodule_setup_errors(tmp_path):
    with pytest.raises(ValueError, match=r"`courses` names unknown course\(s\) \['physics'\]"):
        ExamDataModule("<fixtures>", courses=["physics"]).setup()
    with pytest.raises(ValueError, match="no question left"):
        ExamDataModule("<fixtures>", courses=["analyse_1"], languages=["en"]).setup()
    with pytest.raises(FileNotFoundError):
        ExamDataModule(str(tmp_path / "missing.jsonl")).setup()
