"""MCQ answer parser and grade-label parser (arXiv:2408.11841 evaluation) on tricky generated outputs."""

from __future__ import annotations

import logging

import pytest

from lightning_epfl.functional.exam import (
    DEFAULT_ANSWER_CUES,
    GRADE_LABELS,
    ParsedAnswer,
    parse_grade_label,
    parse_mcq_answer,
)

CITIES = ["London", "Paris", "Rome", "Bern"]
DIGITS = ["1", "2", "3", "4"]

# (text, num_options, labels, options, expected indices, expected status)
CASES = [
    # cues, English and French, NBSP and NFKC variants
    ("Final answer is B", 4, None, None, {1}, "cue"),
    ("The answer is C.", 4, None, None, {2}, "cue"),
    ("Answer: D", 4, None, None, {3}, "cue"),
    ("answer:b", 4, None, None, {1}, "cue"),
    ("answer: a", 4, None, None, {0}, "cue"),
    ("La réponse finale est A", 4, None, None, {0}, "cue"),
    ("La réponse est C.", 4, None, None, {2}, "cue"),
    ("Réponse : B", 4, None, None, {1}, "cue"),
    ("Réponse\u00a0: B", 4, None, None, {1}, "cue"),
    ("Réponse\u202f: D", 4, None, None, {3}, "cue"),
    ("ＡＮＳＷＥＲ： Ｃ", 4, None, None, {2}, "cue"),
    ("La réponse est : option (d)", 4, None, None, {3}, "cue"),
    ("**Answer:** \\boxed{C}", 4, None, None, {2}, "cue"),
    ("The final answer is \\[\\boxed{D}\\]", 4, None, None, {3}, "cue"),
    ("The correct answer is [C: capsule and ligaments].", 4, None, None, {2}, "cue"),
    ("The answer to the question is: [C]: To measure mass.", 4, None, None, {2}, "cue"),
    ("La réponse à la question est (b).", 4, None, None, {1}, "cue"),
    ("Final answer is \\(D\\)", 4, None, None, {3}, "cue"),
    ("Answer: \\(\\mathbf{D}\\)", 4, None, None, {3}, "cue"),
    ("Final answer is [C]", 4, None, None, {2}, "cue"),
    ("The answer is clearly option B because the rest fail.", 4, None, None, {1}, "cue"),
    # the last cue followed by an answer wins
    ("Answer: A. On second thought, the first step was wrong. Final answer is D", 4, None, None, {3}, "cue"),
    ("Answer: B\n\nThe answer is based on the chain rule.", 4, None, None, {1}, "cue"),
    # negations
    ("The answer is not A but C", 4, None, None, {2}, "cue"),
    ("La réponse n'est pas A mais C", 4, None, None, {2}, "cue"),
    ("The answer isn't B, it's D.", 4, None, None, {3}, "cue"),
    ("The answer is B because A is wrong", 4, None, None, {1}, "cue"),
    ("Options A and C are wrong, B is correct", 4, None, None, {1}, "labels"),
    # articles and pronouns are not answers
    ("A common mistake is to pick the largest value.", 4, None, None, set(), "unparsed"),
    ("A common mistake is to pick B; the answer is C", 4, None, None, {2}, "cue"),
    ("Answer: A common mistake here is subtle.", 4, None, None, set(), "unparsed"),
    ("The answer is a function of x.", 4, None, None, set(), "unparsed"),
    ("a and b are the two roots.", 4, None, None, set(), "unparsed"),
    ("Answer: a and c", 4, None, None, {0, 2}, "cue"),
    ("I think it is B", 4, None, None, {1}, "labels"),
    ("I think B", 10, None, None, {1}, "labels"),
    ("Answer: I", 10, None, None, {8}, "cue"),
    # several answers
    ("B and D", 4, None, None, {1, 3}, "labels"),
    ("Answer: B and D", 4, None, None, {1, 3}, "cue"),
    ("Final answer: A, B, D", 4, None, None, {0, 1, 3}, "cue"),
    ("Les bonnes réponses sont A et C.", 4, None, None, {0, 2}, "cue"),
    ("1, 3", 4, "numbers", None, {0, 2}, "labels"),
    # label syntaxes without a cue
    ("B", 4, None, None, {1}, "labels"),
    ("[B]", 4, None, None, {1}, "labels"),
    ("(b)", 4, None, None, {1}, "labels"),
    ("b)", 4, None, None, {1}, "labels"),
    ("2. x^2", 4, "numbers", None, {1}, "labels"),
    ("Let me reason.\nThe derivative is linear.\n\n[C]", 4, None, None, {2}, "labels"),
    # the label scheme of the strategy decides
    ("Answer: 2", 4, "numbers", None, {1}, "cue"),
    ("Answer: C", 4, "numbers", None, set(), "unparsed"),
    ("Answer: 3", 4, "letters", None, set(), "unparsed"),
    ("Answer: 3", 4, "letters", DIGITS, {2}, "option_text"),
    # out of range and decimals
    ("Answer: E", 4, None, None, set(), "unparsed"),
    ("Answer: 2.5", 4, "numbers", None, set(), "unparsed"),
    # option text: unique exact match only
    ("Paris", 4, None, CITIES, {1}, "option_text"),
    ("Answer: Paris, because it is the capital.", 4, None, CITIES, {1}, "option_text"),
    ("Paris", 4, None, ["Paris", "paris", "Rome", "Bern"], set(), "unparsed"),
    ("I believe it is Paris", 4, None, CITIES, set(), "unparsed"),
    # nothing to read
    ("I have no idea.", 4, None, None, set(), "unparsed"),
    ("", 4, None, None, set(), "unparsed"),
]


@pytest.mark.parametrize(("text", "num_options", "labels", "options", "expected", "status"), CASES)
def test_parse_mcq_answer(text, num_options, labels, options, expected, status):
    parsed = parse_mcq_answer(text, num_options, labels, options=options)
    assert isinstance(parsed, ParsedAnswer)
    assert parsed.indices == frozenset(expected), text
    assert parsed.status == status, text


def test_case_count():
    assert len(CASES) >= 30


def test_headline_cases():
    assert parse_mcq_answer("the answer is not A but C", 4).indices == {2}
    assert parse_mcq_answer("B and D", 4).indices == {1, 3}
    assert parse_mcq_answer("1, 3", 4, "numbers").indices == {0, 2}
    assert parse_mcq_answer("[B]", 4).indices == {1}
    assert parse_mcq_answer("(b)", 4).indices == {1}
    assert parse_mcq_answer("La réponse finale est B", 4).indices == {1}
    assert parse_mcq_answer("A common mistake is to confuse the two.", 4).status == "unparsed"


def test_cues_by_language_and_custom_cues():
    fr_only = DEFAULT_ANSWER_CUES["fr"]
    assert parse_mcq_answer("Réponse : C", 4, cues=fr_only).status == "cue"
    # an English cue is no cue for a French-only list, and the label reading does not search mid-sentence
    assert parse_mcq_answer("Blah. Answer: C", 4, cues=fr_only) == ParsedAnswer(frozenset(), "unparsed")
    assert parse_mcq_answer("Verdict: B", 4, cues=["Verdict:"]) == ParsedAnswer(frozenset({1}), "cue")
    assert parse_mcq_answer("Answer: B", 4, cues=[]).status == "labels"
    assert parse_mcq_answer("Answer: B", 4, cues={"en": ["Answer:"]}).status == "cue"


def test_unparsed_output_is_logged(caplog):
    with caplog.at_level(logging.DEBUG, logger="lightning_epfl.functional.exam"):
        parse_mcq_answer("no idea at all", 4)
    assert any("Unparsed MCQ answer" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"text": "B", "num_options": 0}, "num_options"),
        ({"text": "B", "num_options": 27}, "num_options"),
        ({"text": "B", "num_options": 4, "labels": "roman"}, "labels"),
        ({"text": "B", "num_options": 4, "options": ["a", "b"]}, "options"),
        ({"text": None, "num_options": 4}, "text"),
        ({"text": "B", "num_options": 4, "cues": ["", "Answer:"]}, "cues"),
        ({"text": "B", "num_options": 4, "cues": "Answer:"}, "cues"),
    ],
)
def test_parse_mcq_answer_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        parse_mcq_answer(**kwargs)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ('{"grade": "correct", "explanation": "complete"}', "correct"),
        ('{"grade": "Mostly correct"}', "almost correct"),
        ('The answer looks correct. {"grade": "wrong answer"}', "wrong answer"),
        ('```json\n{"Grade": "almost correct"}\n```', "almost correct"),
        ("mostly incorrect", "mostly incorrect"),
        ("Grade: mostly incorrect. The part about x is correct.", "mostly incorrect"),
        ("This answer is almost correct.", "almost correct"),
        ("Mostly correct, one step is missing.", "almost correct"),
        ("INCORRECT", "wrong answer"),
        ("Wrong answer.", "wrong answer"),
        ("The answer is partially correct.", "not found"),
        ("I cannot grade this.", "not found"),
        ('{"grade": "excellent"} but overall the answer is correct', "correct"),
    ],
)
def test_parse_grade_label(text, expected):
    assert parse_grade_label(text) == expected


def test_mostly_incorrect_never_reads_as_correct():
    for text in ("mostly incorrect", "Mostly Incorrect.", "grade = mostly incorrect", '{"grade":"mostly incorrect"}'):
        assert parse_grade_label(text) == "mostly incorrect"
    assert set(GRADE_LABELS) == {"correct", "almost correct", "mostly incorrect", "wrong answer"}
    with pytest.raises(ValueError, match="text"):
        parse_grade_label(None)
