"""Prompting strategies of the exam evaluator (arXiv:2408.11841): rendering snapshots, demo selection, four-shot
checks, the context budget, multi-call loops with scripted outputs and batched lockstep execution."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from lightning_epfl.functional.exam import parse_mcq_answer
from lightning_epfl.modules.assessment import (
    ALL_STRATEGIES,
    ContextBudget,
    GenerationSettings,
    ScriptedGenerator,
    StrategyJob,
    get_strategy,
    run_batched,
    select_one_shot_demo,
)
from lightning_epfl.modules.assessment.strategies import derive_seed, parse_experts

SNAPSHOTS = Path(__file__).parent / "snapshots" / "assessment_prompts.json"

DEMOS = [
    {
        "question": f"Demo question {k} about sorting?",
        "options": ["yes", "no"],
        "answer_indices": [k % 2],
        "explanation": f"Reason {k}.",
        "question_id": f"d{k}",
    }
    for k in range(4)
]
SINGLE = {
    "question_id": "q-single",
    "course_id": "algorithms",
    "program": "cs",
    "language": "en",
    "question_type": "mcq",
    "question": "What is the worst-case time of binary search on n sorted items?",
    "options": ["O(1)", "O(log n)", "O(n)", "O(n log n)"],
    "answer_indices": [1],
    "multiple_correct": False,
    "reference_answer": None,
    "demos": DEMOS,
}
MULTI_FR = {
    "question_id": "q-multi-fr",
    "course_id": "analyse",
    "program": "math",
    "language": "fr",
    "question_type": "mcq",
    "question": "Quelles suites convergent ?",
    "options": ["1/n", "(-1)^n", "n", "2^-n"],
    "answer_indices": [0, 3],
    "multiple_correct": True,
    "reference_answer": None,
    "demos": DEMOS[:2],
}
OPEN = {
    "question_id": "q-open",
    "course_id": "algorithms",
    "program": "cs",
    "language": "en",
    "question_type": "open",
    "question": "Why does binary search need a sorted input?",
    "options": [],
    "answer_indices": [],
    "multiple_correct": False,
    "reference_answer": "It discards half of the range after each comparison, which relies on the order.",
    "demos": DEMOS,
}
QUESTIONS = [SINGLE, MULTI_FR, OPEN]
ONE_SHOT_DEMO = {**SINGLE, "question_id": "q-other", "question": "What is the best-case time of linear search?"}
EXPERTS_JSON = json.dumps([{"name": f"Expert {k}", "description": f"Knows topic {k}."} for k in range(3)])


def _reply(messages) -> str:
    """Deterministic scripted model: valid expert JSON, then answers naming the first option."""
    last = messages[-1]["content"]
    if "JSON" in last:
        return EXPERTS_JSON
    if "Best answer" in last or "Meilleure réponse" in last:
        return "Best answer: 2"
    return "Step one.\nFinal answer is A"


def _render_all() -> dict[str, dict[str, list]]:
    out: dict[str, dict[str, list]] = {}
    for name in ALL_STRATEGIES:
        strategy = get_strategy(name)
        out[name] = {}
        for q in QUESTIONS:
            demos = [ONE_SHOT_DEMO] if name == "one_shot" else q["demos"]
            result = strategy.run(q, demos, q["language"], ScriptedGenerator(_reply))
            out[name][q["question_id"]] = result.prompts
    return out


def test_strategy_prompts_match_snapshots():
    """Every strategy's prompts (all calls, EN/FR, single/multi/open) equal the stored snapshot."""
    rendered = _render_all()
    if os.environ.get("UPDATE_SNAPSHOTS") == "1" or not SNAPSHOTS.exists():
        SNAPSHOTS.parent.mkdir(exist_ok=True)
        SNAPSHOTS.write_text(json.dumps(rendered, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    stored = json.loads(SNAPSHOTS.read_text(encoding="utf-8"))
    assert rendered == stored


def test_registry_holds_the_eight_strategies_in_paper_order():
    """The registry lists the eight strategies in the paper's order, with their kinds and label schemes."""
    assert ALL_STRATEGIES == [
        "zero_shot",
        "one_shot",
        "zero_shot_cot",
        "four_shot_cot",
        "tree_of_thought",
        "metacognitive",
        "self_refine",
        "expert_prompting",
    ]
    kinds = [get_strategy(n).kind for n in ALL_STRATEGIES]
    assert kinds == ["direct"] * 2 + ["reasoning"] * 4 + ["multi_call"] * 2
    schemes = [get_strategy(n).label_scheme for n in ALL_STRATEGIES]
    assert schemes == ["number", "number", "letter", "letter", "bracket", "bracket", "letter", "letter"]


def test_unknown_strategy_lists_the_allowed_names():
    """An unknown name raises ValueError naming it and every allowed strategy."""
    with pytest.raises(ValueError, match="'chain_of_thought'") as err:
        get_strategy("chain_of_thought")
    assert all(name in str(err.value) for name in ALL_STRATEGIES)


@pytest.mark.parametrize(
    ("name", "first_option"),
    [("zero_shot", "1. O(1)"), ("zero_shot_cot", "A: O(1)"), ("tree_of_thought", "[A]: O(1)"),
     ("metacognitive", "[A]: O(1)"), ("four_shot_cot", "A: O(1)")],
)  # fmt: skip
def test_option_labels_follow_the_strategy(name, first_option):
    """Options are labelled 1. (direct), A: (chain of thought) or [A]: (tree of thought, metacognitive)."""
    strategy = get_strategy(name)
    text = strategy.messages(SINGLE, SINGLE["demos"], "en")[-1]["content"]
    assert first_option in text.splitlines()


def test_outputs_are_parsed_with_the_strategy_labels():
    """'Answer: 2' is option index 1 for number labels; 'Final answer is B' is index 1 for letter labels."""
    assert get_strategy("zero_shot").parse("Answer: 2", SINGLE).indices == frozenset({1})
    assert get_strategy("zero_shot_cot").parse("Final answer is B", SINGLE).indices == frozenset({1})
    assert get_strategy("metacognitive").parse("Final answer is [B]", SINGLE).indices == frozenset({1})
    assert get_strategy("zero_shot").parse("Réponse : 1, 4", MULTI_FR).indices == frozenset({0, 3})


def test_french_question_gets_french_prompt_and_english_on_request():
    """The prompt language follows the argument: French cue words for 'fr', English for 'en'."""
    strategy = get_strategy("zero_shot_cot")
    fr = strategy.messages(MULTI_FR, [], "fr")[-1]["content"]
    en = strategy.messages(MULTI_FR, [], "en")[-1]["content"]
    assert "Question :" in fr and "La réponse finale est" in fr
    assert "Question:" in en and "Final answer is" in en
    with pytest.raises(ValueError, match="language"):
        strategy.messages(MULTI_FR, [], "de")


# ---- one-shot demonstrations ---------------------------------------------------------------------------------------


def _q(qid: str, course: str, text: str) -> dict:
    return {"question_id": qid, "course_id": course, "question": text, "options": ["x", "y"], "answer_indices": [0]}


def test_one_shot_demo_is_the_most_similar_question_of_the_same_course():
    """TF-IDF picks the closest question of the same course; other courses and the question itself are never used."""
    target = _q("t", "bio", "photosynthesis converts light energy in chloroplasts")
    pool = [
        target,
        _q("a", "bio", "mitosis divides the nucleus"),
        _q("b", "bio", "chloroplasts capture light energy during photosynthesis"),
        _q("c", "phys", "photosynthesis converts light energy in chloroplasts"),  # identical text, other course
    ]
    assert select_one_shot_demo(target, pool)["question_id"] == "b"
    assert select_one_shot_demo(target, [target, pool[3]]) is None  # nothing else in the course


def test_one_shot_demo_ties_break_by_id_and_are_deterministic():
    """Equally similar candidates: the smallest question id wins, whatever the pool order."""
    target = _q("t", "c", "alpha beta")
    pool = [_q("z9", "c", "gamma delta"), _q("a1", "c", "gamma delta"), _q("m5", "c", "gamma delta"), target]
    assert select_one_shot_demo(target, pool)["question_id"] == "a1"
    assert select_one_shot_demo(target, list(reversed(pool)))["question_id"] == "a1"
    with pytest.raises(ValueError, match="retriever"):
        select_one_shot_demo(target, pool, retriever="bm25")


def test_one_shot_prompt_shows_the_demo_with_its_gold_answer():
    """The one-shot prompt is demo question -> 'Answer: <gold number>', then the question."""
    messages = get_strategy("one_shot").messages(SINGLE, [ONE_SHOT_DEMO], "en")
    assert [m["role"] for m in messages] == ["user", "assistant", "user"]
    assert "best-case time of linear search" in messages[0]["content"]
    assert messages[1]["content"] == "Answer: 2"


# ---- four-shot CoT ---------------------------------------------------------------------------------------------------


def test_four_shot_uses_four_demos_with_explanations():
    """Four demo pairs, each answered 'Explanation: ...' then 'Answer: <letter>'."""
    messages = get_strategy("four_shot_cot").messages(SINGLE, DEMOS, "en")
    assert [m["role"] for m in messages] == ["system"] + ["user", "assistant"] * 4 + ["user"]
    assert messages[2]["content"] == "Explanation: Reason 0.\nAnswer: A"
    assert messages[4]["content"] == "Explanation: Reason 1.\nAnswer: B"


def test_four_shot_without_demos_lists_the_courses_lacking_them():
    """check_questions (and a run) raise ValueError naming every course without demonstrations, sorted."""
    strategy = get_strategy("four_shot_cot")
    bare = [{**SINGLE, "demos": []}, {**MULTI_FR, "demos": []}, OPEN]
    with pytest.raises(ValueError, match=r"\['algorithms', 'analyse'\]"):
        strategy.check_questions(bare)
    with pytest.raises(ValueError, match=r"\['analyse'\]"):
        strategy.run({**MULTI_FR, "demos": []}, [], "fr", ScriptedGenerator(["x"]))
    strategy.check_questions([SINGLE, MULTI_FR, OPEN])


def test_context_budget_drops_demos_from_the_front_and_reports_them():
    """With a budget in words, the earliest demonstrations go first; the count and kept ids are recorded."""
    strategy = get_strategy("four_shot_cot")
    count = ScriptedGenerator([]).count_tokens
    full = count(strategy.messages(SINGLE, DEMOS, "en"))
    without_one = count(strategy.messages(SINGLE, DEMOS[1:], "en"))
    reserve = 8
    budget = ContextBudget(max_tokens=without_one + reserve, count_tokens=count, reserve=reserve)
    assert full > without_one
    result = strategy.run(SINGLE, DEMOS, "en", ScriptedGenerator(["Final answer is B"]), budget=budget)
    assert result.info["demos_dropped"] == 1
    assert result.info["demo_ids"] == ["d1", "d2", "d3"]
    assert "Demo question 0" not in json.dumps(result.prompts)
    tiny = ContextBudget(max_tokens=reserve + 5, count_tokens=count, reserve=reserve)
    result = strategy.run(SINGLE, DEMOS, "en", ScriptedGenerator(["x"]), budget=tiny)
    assert result.info["demos_dropped"] == 4 and result.info["over_budget"]


# ---- multi-call strategies -------------------------------------------------------------------------------------------


def test_self_refine_makes_three_calls_feeding_back_draft_and_review():
    """Self-refine: answer, feedback on it, refined answer (3 calls); 2 rounds make 5; the last output is final."""
    gen = ScriptedGenerator(["Draft: Final answer is A", "The draft ignores the order.", "Final answer is B"])
    result = get_strategy("self_refine").run(SINGLE, [], "en", gen)
    assert result.calls == 3 and len(gen.prompts) == 3
    assert "Draft: Final answer is A" in gen.prompts[1][-1]["content"]
    assert "The draft ignores the order." in gen.prompts[2][-1]["content"]
    assert result.final_text == "Final answer is B"
    assert get_strategy("self_refine").parse(result.final_text, SINGLE).indices == frozenset({1})
    two = get_strategy("self_refine", rounds=2).run(SINGLE, [], "en", ScriptedGenerator(["a", "b", "c", "d", "e"]))
    assert two.calls == 5 and two.final_text == "e"


def test_expert_prompting_mcq_takes_the_majority_of_three_experts():
    """MCQ: experts JSON + 3 answers = 4 calls; the majority answer wins; personas and votes are recorded."""
    gen = ScriptedGenerator([EXPERTS_JSON, "Final answer is C", "Final answer is B", "I think B.\nFinal answer is B"])
    result = get_strategy("expert_prompting").run(SINGLE, [], "en", gen)
    assert result.calls == 4
    assert result.parsed.indices == frozenset({1})
    assert result.info["votes"] == {"2": 1, "1": 2}
    assert result.info["expert_fallback"] is False
    assert [p[0]["content"] for p in gen.prompts[1:]] == [f"You are Expert {k}. Knows topic {k}." for k in range(3)]


def test_expert_prompting_majority_tie_goes_to_the_first_expert_and_unparsed_abstain():
    """One vote each: the first expert's answer; unparsed answers do not vote."""
    gen = ScriptedGenerator([EXPERTS_JSON, "no idea", "Final answer is D", "Final answer is C"])
    result = get_strategy("expert_prompting").run(SINGLE, [], "en", gen)
    assert result.parsed.indices == frozenset({3})
    gen = ScriptedGenerator([EXPERTS_JSON, "hmm", "no idea", "?"])
    assert get_strategy("expert_prompting").run(SINGLE, [], "en", gen).parsed.status == "unparsed"


def test_expert_prompting_open_asks_the_model_to_pick_the_best_answer():
    """Open: 5 calls; the final text is the answer the model picked."""
    gen = ScriptedGenerator([EXPERTS_JSON, "answer one", "answer two", "answer three", "Best answer: 2"])
    result = get_strategy("expert_prompting").run(OPEN, [], "en", gen)
    assert result.calls == 5 and result.final_text == "answer two" and result.info["picked"] == 1
    assert "answer three" in gen.prompts[-1][-1]["content"]
    gen = ScriptedGenerator([EXPERTS_JSON, "answer one", "answer two", "answer three", "all good"])
    result = get_strategy("expert_prompting").run(OPEN, [], "en", gen)
    assert result.final_text == "answer one" and result.info["pick_fallback"] is True


@pytest.mark.parametrize("reply", ["not json at all", '[{"name": "only one"}]', '{"name": "x"}', "[1, 2"])
def test_expert_prompting_bad_json_falls_back_to_generic_personas(reply):
    """Unusable expert JSON: generic personas of the course are used and the fallback is recorded."""
    gen = ScriptedGenerator([reply, "Final answer is B", "Final answer is B", "Final answer is A"])
    result = get_strategy("expert_prompting").run(SINGLE, [], "en", gen)
    assert result.info["expert_fallback"] is True and result.calls == 4
    assert all("algorithms" in e["name"] for e in result.info["experts"])
    assert all("algorithms" in p[0]["content"] for p in gen.prompts[1:])
    assert result.parsed.indices == frozenset({1})


def test_parse_experts_accepts_objects_or_strings():
    """Expert lists may be objects with name/description or plain strings, inside surrounding prose."""
    assert parse_experts(f"Sure: {EXPERTS_JSON} done")[1] == {"name": "Expert 1", "description": "Knows topic 1."}
    assert parse_experts('["a", "b", "c", "d"]') == [{"name": n, "description": ""} for n in "abc"]
    assert parse_experts('["a", "b"]') is None


# ---- batched lockstep execution --------------------------------------------------------------------------------------


def test_run_batched_advances_questions_in_lockstep_and_matches_single_runs():
    """Expert prompting on 3 questions: 3 generate calls of 3, 9 and 1 prompts; results equal one-by-one runs."""
    gen = ScriptedGenerator(_reply)
    jobs = [StrategyJob(q, [], q["language"], seed=7) for q in QUESTIONS]
    results = run_batched(get_strategy("expert_prompting"), jobs, gen, GenerationSettings())
    sizes = [len(s.seeds) for s in gen.settings]
    assert gen.calls == 3 and sizes == [3, 9, 1]
    for q, batched in zip(QUESTIONS, results):
        alone = run_batched(
            get_strategy("expert_prompting"), [StrategyJob(q, [], q["language"], 7)], gen, GenerationSettings()
        )
        assert alone[0].prompts == batched.prompts and alone[0].outputs == batched.outputs
        assert alone[0].info["seeds"] == batched.info["seeds"]
    assert [r.calls for r in results] == [4, 4, 5]


def test_seeds_depend_on_question_strategy_and_call_only():
    """Per-call seeds are a function of (run seed, question, strategy, call) and differ between calls."""
    result = get_strategy("self_refine").run(SINGLE, [], "en", ScriptedGenerator(["a", "b", "c"]))
    expected = [derive_seed(0, "q-single", "self_refine", k) for k in range(3)]
    assert result.info["seeds"] == expected and len(set(expected)) == 3
    assert derive_seed(1, "q-single", "self_refine", 0) != expected[0]


def test_scripted_generator_runs_out_loudly():
    """A scripted list that is too short raises IndexError instead of inventing outputs."""
    with pytest.raises(IndexError, match="1 responses"):
        get_strategy("self_refine").run(SINGLE, [], "en", ScriptedGenerator(["only one"]))


def test_parser_reads_answers_in_the_format_the_prompts_ask_for():
    """The answer formats the prompts request ('Answer: 1, 4', 'La réponse finale est A, D') parse as asked."""
    assert parse_mcq_answer("Answer: 1, 4", 4, labels="numbers").indices == frozenset({0, 3})
    assert parse_mcq_answer("...\nLa réponse finale est A, D", 4, labels="letters").indices == frozenset({0, 3})


def test_demonstrations_are_formatted_by_their_own_type():
    """Course demos mix types: an open demo shows no options and its reference; a multi-answer demo lists all."""
    demos = [
        {"question": "Explain recursion.", "options": [], "answer_indices": [], "reference_answer": "A function "
         "that calls itself.", "explanation": "Definition."},
        {"question": "Which are sorting algorithms?", "options": ["heap sort", "BFS", "merge sort"],
         "answer_indices": [0, 2], "explanation": "BFS is a graph search."},
    ]  # fmt: skip
    messages = get_strategy("four_shot_cot").messages(SINGLE, demos, "en")
    open_turn, open_answer, multi_turn, multi_answer = (m["content"] for m in messages[1:5])
    assert "Options" not in open_turn and "Explain your reasoning" in open_turn
    assert open_answer == "Explanation: Definition.\nAnswer: A function that calls itself."
    assert "More than one option may be correct" in multi_turn and "C: merge sort" in multi_turn
    assert multi_answer == "Explanation: BFS is a graph search.\nAnswer: A, C"
