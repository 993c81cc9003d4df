"""ExamEvaluator (arXiv:2408.11841 protocol): batched generation, log-likelihood scoring, judges, outputs, the example
YAML, argument checks and a two-process run with a padded distributed sampler."""

from __future__ import annotations

import json
import os
import socket
import time
from pathlib import Path

import lightning as L
import pytest
import torch
import torch.multiprocessing as mp

from lightning_epfl.datamodules import ExamDataModule
from lightning_epfl.datamodules.exam import fixture_exam_path, load_exam
from lightning_epfl.modules.assessment import (
    ALL_STRATEGIES,
    TINY_RANDOM_MODEL,
    ExamEvaluator,
    ExportOnlyJudge,
    GenerationSettings,
    HFGenerator,
    JudgeRequest,
    LocalLMJudge,
    ReferenceMatchJudge,
    ScriptedGenerator,
    get_strategy,
    loglikelihood_choice,
    render_plain,
    select_one_shot_demo,
    tiny_random_chat_model,
)

EXAMPLE = Path(__file__).parent.parent / "examples" / "assessment.yaml"
EXPERTS = json.dumps([{"name": f"Expert {k}", "description": "Knows the course."} for k in range(3)])


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> Path:
    """A random two-layer Llama with a byte-level tokenizer and a chat template, saved to a temporary folder."""
    return tiny_random_chat_model(tmp_path_factory.mktemp("tiny") / "model", seed=0)


@pytest.fixture(scope="module")
def fixture_questions() -> list[dict]:
    return [dict(q, index=i) for i, q in enumerate(load_exam(fixture_exam_path()))]


def _trainer(root, **kw) -> L.Trainer:
    kw.setdefault("devices", 1)
    return L.Trainer(
        accelerator="cpu",
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=str(root),
        **kw,
    )


# ---- scripted models -----------------------------------------------------------------------------------------------

_QUESTIONS = {q["question"]: q for q in load_exam(fixture_exam_path())}


def _find_question(text: str) -> dict:
    hits = [q for t, q in _QUESTIONS.items() if t in text]
    assert hits, text[:200]
    return max(hits, key=lambda q: len(q["question"]))


def _numbered(content: str) -> bool:
    return "Options:\n1. " in content or "Options :\n1. " in content


def _answer(q: dict, content: str) -> str:
    if q["question_type"] == "open":
        return f"Reasoning.\nFinal answer is {q['reference_answer']}"
    if _numbered(content):
        return "Answer: " + ", ".join(str(i + 1) for i in q["answer_indices"])
    return "Final answer is " + ", ".join("ABCDEFGH"[i] for i in q["answer_indices"])


def oracle(messages) -> str:
    """Always right, in the format each prompt asks for."""
    last = messages[-1]["content"]
    if "JSON" in last:
        return EXPERTS
    if "Best answer" in last or "Meilleure réponse" in last:
        return "Best answer: 1"
    if "Do not write a new answer" in last or "N'écrivez pas" in last:
        return "The draft is right."
    return _answer(_find_question(last), last)


def imperfect(messages) -> str:
    """Right except: wrong on question ids ending in 2 under number labels, unparsed on ids ending in 3 under [A]."""
    last = messages[-1]["content"]
    out = oracle(messages)
    if "JSON" in last or "Best answer" in last or "Meilleure réponse" in last:
        return out
    q = _find_question(last)
    if q["question_type"] == "mcq" and q["question_id"].endswith("2") and _numbered(last):
        return "Answer: 4"
    if q["question_id"].endswith("3") and "[A]:" in last:
        return "I cannot tell."
    return out


def _scripted(fn, **kw) -> ExamEvaluator:
    model = ExamEvaluator(TINY_RANDOM_MODEL, **kw)
    model.generator = ScriptedGenerator(fn)  # kept by configure_model: nothing is loaded
    return model


# ---- generation ----------------------------------------------------------------------------------------------------


def _real_prompts(questions: list[dict]) -> list[list[dict]]:
    prompts = []
    for name in ("zero_shot", "one_shot", "four_shot_cot", "metacognitive"):
        strategy = get_strategy(name)
        for q in questions[::4]:
            demos = [select_one_shot_demo(q, questions)] if name == "one_shot" else q["demos"]
            prompts.append(strategy.messages(q, demos, q["language"]))
    return prompts


def test_batched_greedy_generation_equals_one_at_a_time(tiny_model, fixture_questions):
    """Left-padded batches of prompts of very different lengths decode exactly as each prompt alone (greedy)."""
    prompts = _real_prompts(fixture_questions)
    batched_gen = HFGenerator(tiny_model, batch_size=16)
    single_gen = HFGenerator(tiny_model, batch_size=1)
    lengths = {single_gen.count_tokens(p) for p in prompts}
    assert max(lengths) > 3 * min(lengths)  # real padding happens
    settings = GenerationSettings(max_new_tokens=16)
    batched = batched_gen(prompts, settings)
    single = single_gen(prompts, settings)
    assert batched == single
    assert len(set(batched)) > 1
    stop = next(c for text in batched for c in text[1:] if c.isascii() and c.isprintable() and not c.isspace())
    stops = GenerationSettings(max_new_tokens=16, stop_strings=(stop,))
    few = [p for p, text in zip(prompts, batched) if stop in text] + prompts[:3]
    cut = batched_gen(few, stops)
    assert cut == single_gen(few, stops)
    full = dict(zip(map(str, prompts), batched))
    for p, text in zip(few, cut):
        whole = full[str(p)]
        assert text == (whole[: whole.index(stop)].strip() if stop in whole else whole)


def test_tokenizer_is_prepared_for_batched_decoding(tiny_model):
    """Left padding, pad token = EOS when missing, the chat template renders the roles."""
    gen = HFGenerator(tiny_model)
    assert gen.tokenizer.padding_side == "left" and gen.tokenizer.pad_token == gen.tokenizer.eos_token
    text = gen.render([{"role": "system", "content": "S"}, {"role": "user", "content": "U"}])
    assert text == "<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nU<|im_end|>\n<|im_start|>assistant\n"
    gen.tokenizer.chat_template = None
    assert gen.render([{"role": "user", "content": "U"}]) == render_plain([{"role": "user", "content": "U"}])


def test_seeded_sampling_does_not_depend_on_the_batch(tiny_model, fixture_questions):
    """With do_sample, each prompt's sample depends on its seed only: batched == alone, other seeds differ."""
    prompts = _real_prompts(fixture_questions)[:6]
    gen = HFGenerator(tiny_model, batch_size=8)
    seeds = tuple(range(100, 106))
    settings = GenerationSettings(max_new_tokens=12, do_sample=True, temperature=0.8, top_p=0.9, seeds=seeds)
    batched = gen(prompts, settings)
    alone = [gen([p], GenerationSettings(max_new_tokens=12, do_sample=True, top_p=0.9, seeds=(s,)))[0]
             for p, s in zip(prompts, seeds)]  # fmt: skip
    assert batched == alone
    other = gen(prompts, GenerationSettings(max_new_tokens=12, do_sample=True, top_p=0.9, seeds=tuple(range(6))))
    assert other != batched


def test_loglikelihood_equals_a_full_forward_pass(tiny_model):
    """Summed continuation log-probs match log_softmax of one forward pass; batched == alone."""
    gen = HFGenerator(tiny_model, batch_size=4)
    requests = [("<|im_start|>user\nPick one<|im_end|>\nAnswer:", " 1"), ("Answer:", " abcd"), ("Q: x\nA:", " yes no")]
    got = gen.loglikelihood(requests)
    alone = [HFGenerator(tiny_model, batch_size=1).loglikelihood([r])[0] for r in requests]
    assert got == pytest.approx(alone, abs=1e-5)
    for (context, continuation), value in zip(requests, got):
        ids = gen.tokenizer(context + continuation, add_special_tokens=False)["input_ids"]
        n_ctx = len(gen.tokenizer(context, add_special_tokens=False)["input_ids"])
        with torch.no_grad():
            logp = torch.log_softmax(gen.model(torch.tensor([ids])).logits[0].double(), -1)
        expected = sum(float(logp[t - 1, ids[t]]) for t in range(n_ctx, len(ids)))
        assert value == pytest.approx(expected, abs=1e-4)


def test_loglikelihood_of_shared_context_labels_uses_one_forward(tiny_model):
    """Single-token continuations of one context (option labels) are read from one forward of the context and
    equal the per-request computation."""
    gen = HFGenerator(tiny_model, batch_size=4)
    context = "Q: pick\nAnswer:"
    labels = ["A", "B", "C", "D"]  # one token each in the byte-level vocabulary
    assert all(len(gen.tokenizer(context + lab, add_special_tokens=False)["input_ids"])
               == len(gen.tokenizer(context, add_special_tokens=False)["input_ids"]) + 1 for lab in labels)  # fmt: skip
    calls = []
    handle = gen.model.register_forward_pre_hook(lambda m, a, k: calls.append(1), with_kwargs=True)
    try:
        got = gen.loglikelihood([(context, lab) for lab in labels] + [("other", " A")])
    finally:
        handle.remove()
    assert len(calls) == 2  # one batch of shared contexts, one for the lone request
    two = [" " + lab for lab in labels]  # a shared first continuation token (the space), then the label
    spaced = gen.loglikelihood([(context, lab) for lab in two])
    spaced_alone = [HFGenerator(tiny_model, batch_size=1).loglikelihood([(context, lab)])[0] for lab in two[:1]]
    assert spaced[0] == pytest.approx(spaced_alone[0], abs=1e-5)
    whole = [gen.tokenizer(context + lab, add_special_tokens=False)["input_ids"] for lab in two]
    with torch.no_grad():
        full = torch.log_softmax(gen.model(torch.tensor([whole[1]])).logits[0].double(), -1)
    n = len(whole[1])
    assert spaced[1] == pytest.approx(float(full[n - 3, whole[1][n - 2]] + full[n - 2, whole[1][n - 1]]), abs=1e-5)
    alone = [HFGenerator(tiny_model, batch_size=1).loglikelihood([(context + lab[:0], lab)])[0] for lab in labels]
    ids = gen.tokenizer(context, add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        logp = torch.log_softmax(gen.model(torch.tensor([ids])).logits[0, -1].double(), -1)
    for lab, value in zip(labels, got):
        token = gen.tokenizer(context + lab, add_special_tokens=False)["input_ids"][-1]
        assert value == pytest.approx(float(logp[token]), abs=1e-5)
    assert got[:4] == pytest.approx(alone, abs=1e-5)


# ---- log-likelihood scoring ----------------------------------------------------------------------------------------


class StubLM:
    """Hand-set log-probabilities per continuation text; generation answers 'Final answer is A'."""

    def __init__(self, table: dict[str, float]) -> None:
        self.table = table
        self.requests: list[tuple[str, str]] = []

    def render(self, messages):
        return render_plain(messages)

    def count_tokens(self, messages):
        return len(self.render(messages).split())

    def loglikelihood(self, requests):
        self.requests += list(requests)
        return [self.table[c.strip()] for _, c in requests]

    def __call__(self, prompts, settings):
        return ["Final answer is A"] * len(prompts)


def _write_exam(path: Path, questions: list[dict]) -> str:
    base = {"course_id": "c1", "program": "p", "language": "en", "question_type": "mcq", "multiple_correct": False}
    path.write_text("".join(json.dumps({**base, **q}) + "\n" for q in questions))
    return str(path)


def test_loglikelihood_choice_acc_and_acc_norm():
    """'ab' at -2 and 'abcd' at -3: acc picks 'ab', acc_norm (per character) picks 'abcd'."""
    assert loglikelihood_choice([-2.0, -3.0], ["ab", "abcd"]) == (0, 1)
    assert loglikelihood_choice([-1.0, -1.0], ["a", "b"]) == (0, 0)


def test_loglikelihood_scoring_with_a_stub_lm(tmp_path):
    """Direct strategy on a single-answer MCQ: options scored after the answer cue; acc and acc_norm logged."""
    exam = _write_exam(tmp_path / "exam.jsonl", [{"question_id": "q1", "question": "Pick.", "options": ["ab", "abcd"],
                                                  "answer_indices": [1]}])  # fmt: skip
    stub = StubLM({"ab": -2.0, "abcd": -3.0})
    model = ExamEvaluator(TINY_RANDOM_MODEL, strategies=["zero_shot", "zero_shot_cot"], scoring="loglikelihood",
                          loglikelihood_target="text", output_dir=str(tmp_path / "out"))  # fmt: skip
    model.generator = stub
    trainer = _trainer(tmp_path)
    trainer.test(model, ExamDataModule(exam))
    m = trainer.callback_metrics
    assert float(m["test/acc/zero_shot"]) == 0.0 and float(m["test/acc_norm/zero_shot"]) == 1.0
    assert float(m["test/acc/zero_shot_cot"]) == 0.0  # generated 'A' (reasoning strategies always generate)
    assert "test/acc_norm/zero_shot_cot" not in m
    assert [c for _, c in stub.requests] == [" ab", " abcd"]
    assert stub.requests[0][0].endswith("Assistant:Answer:")
    record = json.loads((tmp_path / "out" / "records.jsonl").read_text().splitlines()[0])
    assert record["scoring"] == "loglikelihood" and record["pred_indices"] == [0] and record["pred_norm_indices"] == [1]
    assert record["info"]["option_logprobs"] == [-2.0, -3.0]


def test_loglikelihood_scoring_of_labels(tmp_path):
    """Label target: the option labels ' 1', ' 2' are scored; the higher one is the prediction."""
    exam = _write_exam(tmp_path / "exam.jsonl", [{"question_id": "q1", "question": "Pick.", "options": ["x", "y"],
                                                  "answer_indices": [1]}])  # fmt: skip
    stub = StubLM({"1": -1.5, "2": -0.5})
    model = ExamEvaluator(TINY_RANDOM_MODEL, strategies=["one_shot"], scoring="loglikelihood",
                          output_dir=str(tmp_path / "out"))  # fmt: skip
    model.generator = stub
    trainer = _trainer(tmp_path)
    trainer.test(model, ExamDataModule(exam))
    assert float(trainer.callback_metrics["test/acc/one_shot"]) == 1.0
    assert [c for _, c in stub.requests] == [" 1", " 2"]


# ---- end to end --------------------------------------------------------------------------------------------------


def test_example_yaml_runs_all_strategies_on_the_fixtures_quickly(tmp_path, monkeypatch):
    """`lightning-epfl test -c examples/assessment.yaml`: 8 strategies, tiny random model, max_new_tokens=8, < 60 s;
    writes every record, the summary (CSV, Markdown, JSON) and both plots into the log folder."""
    from lightning_epfl.cli import cli_main

    monkeypatch.setenv("LIGHTNING_EPFL_CACHE", str(tmp_path / "cache"))
    start = time.perf_counter()
    cli = cli_main(["test", "-c", str(EXAMPLE), f"--trainer.default_root_dir={tmp_path / 'root'}",
                    "--trainer.enable_progress_bar=false"])  # fmt: skip
    elapsed = time.perf_counter() - start
    assert elapsed < 60, elapsed
    out = Path(cli.trainer.log_dir) / "assessment"
    records = [json.loads(line) for line in (out / "records.jsonl").read_text().splitlines()]
    assert len(records) == 12 * 8
    assert {r["strategy"] for r in records} == set(ALL_STRATEGIES)
    assert sum(r["calls"] for r in records) == 10 * 13 + 2 * 14 == float(cli.trainer.callback_metrics["test/calls"])
    first = records[0]
    assert first["prompts"][0][-1]["role"] == "user" and isinstance(first["outputs"][0], str)
    assert {"parse_status", "score", "seeds", "judge", "final_text"} <= set(first)
    for name in ("summary.csv", "summary.md", "summary.json", "acc_by_strategy.png", "acc_by_program.png"):
        assert (out / name).stat().st_size > 0, name
    assert not list(out.glob("*.tmp*"))
    csv_rows = (out / "summary.csv").read_text().splitlines()
    assert csv_rows[0].startswith("row,kind,acc,chance") and len(csv_rows) == 1 + 8 + 3
    metrics = cli.trainer.callback_metrics
    for key in ("test/acc_mean", "test/acc_majority", "test/acc_any", "test/unparsed/zero_shot", "test/mcq/acc_mean",
                "test/fr/acc/metacognitive", "test/pass_rate/mathematics"):  # fmt: skip
        assert key in metrics, key


def test_oracle_answers_score_one_everywhere(tmp_path):
    """An always-right scripted model in each prompt's format: every accuracy is 1, nothing unparsed."""
    model = _scripted(oracle, output_dir=str(tmp_path / "out"))
    trainer = _trainer(tmp_path)
    trainer.test(model, ExamDataModule("<fixtures>", batch_size=5))
    m = {k: float(v) for k, v in trainer.callback_metrics.items()}
    for name in ALL_STRATEGIES:
        assert m[f"test/acc/{name}"] == 1.0 and m[f"test/unparsed/{name}"] == 0.0, name
    assert m["test/acc_mean"] == m["test/acc_majority"] == m["test/acc_any"] == m["test/pass_rate"] == 1.0
    assert m["test/open/acc_mean"] == 1.0 and m["test/fr/acc_mean"] == 1.0
    assert m["test/calls"] == 158


def _imperfect_expected() -> dict[str, float]:
    """Hand count for `imperfect` on the 12 fixture questions."""
    qs = load_exam(fixture_exam_path())
    ends2 = [q for q in qs if q["question_id"].endswith("2") and q["question_type"] == "mcq"]  # 3 multi-answer MCQs
    ends3 = [q for q in qs if q["question_id"].endswith("3")]
    n = len(qs)
    return {
        "zero_shot": 1 - len(ends2) / n,
        "one_shot": 1 - len(ends2) / n,
        "tree_of_thought": 1 - len(ends3) / n,
        "metacognitive": 1 - len(ends3) / n,
        "zero_shot_cot": 1.0,
        # a share of the MCQs: open answers are graded, not parsed
        "unparsed_tot": sum(q["question_type"] == "mcq" for q in ends3) / sum(q["question_type"] == "mcq" for q in qs),
    }


def test_imperfect_answers_give_the_hand_counted_accuracies(tmp_path):
    """Wrong and unparsed answers lower exactly the strategies and questions they hit; any-correct stays 1."""
    model = _scripted(imperfect, output_dir=str(tmp_path / "out"))
    trainer = _trainer(tmp_path)
    trainer.test(model, ExamDataModule("<fixtures>", batch_size=4))
    m = {k: float(v) for k, v in trainer.callback_metrics.items()}
    expected = _imperfect_expected()
    for name in ("zero_shot", "one_shot", "tree_of_thought", "metacognitive", "zero_shot_cot"):
        assert m[f"test/acc/{name}"] == pytest.approx(expected[name], abs=1e-6), name
    assert m["test/unparsed/tree_of_thought"] == pytest.approx(expected["unparsed_tot"], abs=1e-6)
    assert m["test/acc_any"] == 1.0 and m["test/acc_majority"] == 1.0


def test_predict_returns_one_record_per_question_and_strategy(tmp_path):
    """trainer.predict yields the records batch by batch and writes the same outputs."""
    model = _scripted(oracle, strategies=["zero_shot", "expert_prompting"], output_dir=str(tmp_path / "out"))
    batches = _trainer(tmp_path).predict(model, ExamDataModule("<fixtures>", batch_size=5))
    records = [r for batch in batches for r in batch]
    assert len(records) == 24 and all(r["score"] == 1.0 for r in records)
    assert (tmp_path / "out" / "summary.json").is_file()
    assert json.loads((tmp_path / "out" / "summary.json").read_text())["overall"]["acc_mean"] == 1.0


def test_existing_results_are_never_overwritten(tmp_path):
    """A second run into the same output_dir fails before any generation."""
    out = str(tmp_path / "out")
    _trainer(tmp_path).test(_scripted(oracle, strategies=["zero_shot"], output_dir=out), ExamDataModule("<fixtures>"))
    again = _scripted(oracle, strategies=["zero_shot"], output_dir=out)
    with pytest.raises(FileExistsError, match="never overwritten"):
        _trainer(tmp_path).test(again, ExamDataModule("<fixtures>"))
    assert again.generator.calls == 0


def test_export_only_judge_leaves_open_answers_for_humans(tmp_path):
    """Open answers go to the export file (atomically) and out of the accuracies; MCQ scoring is unaffected."""
    model = _scripted(oracle, strategies=["zero_shot", "zero_shot_cot"], judge=ExportOnlyJudge("open.jsonl"),
                      output_dir=str(tmp_path / "out"))  # fmt: skip
    trainer = _trainer(tmp_path)
    trainer.test(model, ExamDataModule("<fixtures>", batch_size=4))
    rows = [json.loads(line) for line in (tmp_path / "out" / "open.jsonl").read_text().splitlines()]
    assert len(rows) == 2 * 2 and all(r["grade"] is None and r["reference_answer"] for r in rows)
    m = trainer.callback_metrics
    assert float(m["test/pending_open"]) == 4 and float(m["test/acc_mean"]) == 1.0
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["overall"]["num_questions"] == 10


# ---- judges --------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("answer", "reference", "correct"),
    [("Final answer is 3.14", "3.1416", True), ("Final answer is 3.0", "3.1416", False),
     ("We get 10 then 99.5", "100", True), ("Answer: 1,5", "1.5", True), ("no number", "42", False),
     ("Final answer is: the stack pointer.", "Stack pointer", True), ("stacked pointers", "stack pointer", False),
     ("Answer: a heap. Final answer is a queue", "heap", False)],
)  # fmt: skip
def test_reference_match_judge_is_a_strict_proxy(answer, reference, correct):
    """Numbers within 1 % of a numeric reference, or the reference text on word boundaries, after the last cue."""
    judge = ReferenceMatchJudge(numeric_rtol=0.01)
    result = judge.grade([JudgeRequest({"reference_answer": reference}, answer)])[0]
    assert result.label == ("correct" if correct else "wrong answer")


def test_local_lm_judge_re_asks_once_then_gives_not_found(tmp_path):
    """Unreadable grade -> one re-ask with the reply appended; a second failure is 'not found'."""
    judge = LocalLMJudge(TINY_RANDOM_MODEL)
    judge.generator = ScriptedGenerator(['{"grade": "mostly correct"}', "hmm", "I would say ...", '{"grade": "wrong"}',
                                         "???"])  # fmt: skip
    q = {"question": "Why?", "reference_answer": "Because.", "course_id": "logic"}
    results = judge.grade([JudgeRequest(q, "a1"), JudgeRequest(q, "a2"), JudgeRequest(q, "a3")])
    assert [r.label for r in results] == ["almost correct", "wrong answer", "not found"]
    assert results[1].raw == ["hmm", '{"grade": "wrong"}'] and results[1].info["reasked"]
    reask = judge.generator.prompts[3]
    assert reask[-2] == {"role": "assistant", "content": "hmm"} and "JSON" in reask[-1]["content"]
    assert (
        "logic" in judge.generator.prompts[0][0]["content"] and "Because." in judge.generator.prompts[0][1]["content"]
    )


def test_local_lm_judge_grades_with_a_real_local_model(tiny_model):
    """The judge loads a local model folder and returns one of the rubric labels or 'not found'."""
    judge = LocalLMJudge(str(tiny_model), max_new_tokens=4)
    results = judge.grade([JudgeRequest({"question": "Why?", "reference_answer": "Because."}, "No idea.")])
    assert results[0].label in ("correct", "almost correct", "mostly incorrect", "wrong answer", "not found")
    assert 1 <= len(results[0].raw) <= 2


# ---- argument checks -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [({"strategies": ["zero_shot", "socratic"]}, "unknown prompting strategy 'socratic'"),
     ({"strategies": ["zero_shot", "zero_shot"]}, "repeats"),
     ({"scoring": "logits"}, "`scoring` must be one of"),
     ({"prompt_language": "de"}, "`prompt_language` must be one of"),
     ({"mcq_credit": "half"}, "`mcq_credit` must be one of"),
     ({"majority_tie": "random"}, "`majority_tie` must be one of"),
     ({"max_new_tokens": 0}, "`max_new_tokens` must be an int >= 1"),
     ({"top_p": 1.5}, "`top_p`"), ({"temperature": 0.0}, "`temperature`"),
     ({"pass_threshold": 2.0}, "`pass_threshold`"),
     ({"label_scores": {"great": 1.0}}, "unknown label 'great'"),
     ({"context_budget_tokens": 100, "max_new_tokens": 200}, "`context_budget_tokens` must be an int >= 201"),
     ({"pretrained_path": "/no/such/model"}, "pretrained_path")],
)  # fmt: skip
def test_bad_arguments_fail_in_init_naming_them(kwargs, message):
    """Every argument is checked in __init__ (before any model loading), naming the argument."""
    kwargs = {"pretrained_path": TINY_RANDOM_MODEL, **kwargs}
    with pytest.raises(ValueError, match=message) as err:
        ExamEvaluator(**kwargs)
    if "socratic" in message:
        assert all(name in str(err.value) for name in ALL_STRATEGIES)


def test_four_shot_without_demos_fails_before_generating(tmp_path):
    """A course without demonstrations stops four_shot_cot at test start, naming the course."""
    exam = _write_exam(tmp_path / "exam.jsonl", [{"question_id": "q1", "question": "Pick.", "options": ["a", "b"],
                                                  "answer_indices": [0], "course_id": "nodemo"}])  # fmt: skip
    model = _scripted(oracle, strategies=["four_shot_cot"], output_dir=str(tmp_path / "out"))
    with pytest.raises(ValueError, match=r"\['nodemo'\]"):
        _trainer(tmp_path).test(model, ExamDataModule(exam))
    assert model.generator.calls == 0


# ---- two processes -------------------------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_data() -> ExamDataModule:
    return ExamDataModule("<fixtures>", batch_size=2, max_questions_per_course=3)  # 9 questions: one padded


def _ddp_worker(rank: int, world: int, port: int, out: str) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), LOCAL_RANK=str(rank), NODE_RANK="0", WORLD_SIZE=str(world)
    )
    torch.set_num_threads(1)
    model = _scripted(imperfect, output_dir=os.path.join(out, "p2"))
    trainer = _trainer(out, devices=world, strategy="ddp")
    trainer.test(model, _ddp_data())
    if rank == 0:
        torch.save({k: float(v) for k, v in trainer.callback_metrics.items()}, os.path.join(out, "metrics.pt"))


def test_two_process_test_matches_one_process(tmp_path):
    """2 gloo processes with a padded DistributedSampler (9 questions -> 10 slots) log the same metrics as one."""
    out = str(tmp_path)
    mp.start_processes(_ddp_worker, args=(2, _free_port(), out), nprocs=2, join=True, start_method="fork")
    two = torch.load(os.path.join(out, "metrics.pt"))
    model = _scripted(imperfect, output_dir=str(tmp_path / "p1"))
    trainer = _trainer(tmp_path / "single")
    trainer.test(model, _ddp_data())
    one = {k: float(v) for k, v in trainer.callback_metrics.items()}
    assert one == two
    assert one["test/acc/zero_shot"] < 1.0 and one["test/unparsed/metacognitive"] > 0.0
    lines = [
        json.loads(x) for r in (0, 1) for x in (tmp_path / "p2" / f"records.rank{r}.jsonl").read_text().splitlines()
    ]
    assert len(lines) == 10 * 8  # the padding duplicate was answered ...
    assert len({(r["index"], r["strategy"]) for r in lines}) == 9 * 8  # ... and counted once
    single_records = [json.loads(x) for x in (tmp_path / "p1" / "records.jsonl").read_text().splitlines()]
    assert one["test/calls"] == sum(r["calls"] for r in single_records)


def test_sampled_records_do_not_depend_on_the_question_batching(tiny_model, tmp_path):
    """do_sample=True with the tiny model: every (question, strategy) output and seed is the same with 1 or 5
    questions per batch (seeds derive from question, strategy and call, not from the batch)."""

    def run(batch_size: int) -> dict:
        model = ExamEvaluator(str(tiny_model), strategies=["zero_shot", "self_refine"], max_new_tokens=6,
                              do_sample=True, seed=3, output_dir=str(tmp_path / f"b{batch_size}"))  # fmt: skip
        _trainer(tmp_path).test(model, ExamDataModule("<fixtures>", batch_size=batch_size, courses=["analyse_1"]))
        lines = (tmp_path / f"b{batch_size}" / "records.jsonl").read_text().splitlines()
        return {(r["question_id"], r["strategy"]): (r["outputs"], r["seeds"]) for r in map(json.loads, lines)}

    one, five = run(1), run(5)
    assert one == five and len(one) == 8
    assert len({tuple(outputs) for outputs, _ in one.values()}) > 1


def test_prompt_language_and_context_budget_reach_the_prompts(tmp_path):
    """'inverted' prompts French questions in English; a context budget drops four-shot demos and logs the count."""
    model = _scripted(oracle, strategies=["four_shot_cot"], prompt_language="inverted", context_budget_tokens=260,
                      max_new_tokens=8, output_dir=str(tmp_path / "out"))  # fmt: skip
    trainer = _trainer(tmp_path)
    trainer.test(model, ExamDataModule("<fixtures>", courses=["analyse_1"]))
    records = [json.loads(x) for x in (tmp_path / "out" / "records.jsonl").read_text().splitlines()]
    assert {r["prompt_language"] for r in records} == {"en"}
    assert "Question:" in records[0]["prompts"][0][-1]["content"]
    dropped = [r["info"]["demos_dropped"] for r in records]
    assert all(1 <= d < 4 for d in dropped) and float(trainer.callback_metrics["test/demos_dropped"]) == sum(dropped)
    assert all(model.generator.count_tokens(r["prompts"][0]) <= 260 - 8 for r in records)


def test_judge_export_never_replaces_files(tmp_path):
    """An ExportOnlyJudge path that exists, or that names one of the evaluation's result files, is refused before any
    generation; a unit exponent is not read as the answer's number."""
    from lightning_epfl.modules.assessment import ExportOnlyJudge, ReferenceMatchJudge

    mine = tmp_path / "mine.jsonl"
    mine.write_text("keep\n")
    for path, match in ((str(mine), "exists already"), ("records.jsonl", "one of the evaluation's own result files")):
        model = ExamEvaluator(TINY_RANDOM_MODEL, strategies=["zero_shot"], max_new_tokens=2,
                              judge=ExportOnlyJudge(path), output_dir=str(tmp_path / "out"))  # fmt: skip
        with pytest.raises((FileExistsError, ValueError), match=match):
            model.check_config(None, model)
    assert mine.read_text() == "keep\n"
    judge = ReferenceMatchJudge()
    assert judge.match("Answer: 9.81 m/s²", "9.81") and judge.match("g = 9.8 m/s^2 (about)", "9.81")
    assert judge.match("Answer: 3e8 m/s", "3.0e8") and not judge.match("Answer: 2", "9.81")
