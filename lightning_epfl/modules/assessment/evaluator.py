"""ExamEvaluator: a local causal LM answers exam questions under the eight prompting strategies
==========================================================================================

The evaluation protocol of Borges et al., *Could ChatGPT get an Engineering Degree? Evaluating Higher Education
Vulnerability to AI Assistants*, PNAS 121(49) e2414955121 (2024), arXiv:2408.11841, as a ``LightningModule`` for
``trainer.test`` and ``trainer.predict`` with a local ``transformers`` model.

For every batch of questions and every configured strategy, the strategy's prompts for all questions of the batch
are generated as one batch (multi-call strategies advance in lockstep, one batch per step). MCQ outputs are parsed
with the strategy's option labels (:func:`~lightning_epfl.functional.exam.parse_mcq_answer`); unparseable outputs
score 0 and are counted (``test/unparsed/<strategy>``). Open answers are graded by a pluggable
:class:`~lightning_epfl.modules.assessment.judges.OpenAnswerJudge`. Outcomes go to
:class:`~lightning_epfl.metrics.exam.ExamOutcomeMatrix`, which deduplicates (question, strategy) records, so the
samples a ``DistributedSampler`` repeats count once.

Differences from the paper (all documented at the arguments):

* local models instead of GPT-3.5/GPT-4; greedy decoding by default (``do_sample=True`` uses the paper's temperature
  0.8 and top_p 1.0, seeded per (question, strategy, call)); ``transformers`` has no presence or frequency penalty,
  so the paper's 0.5/0.8 penalties are not applied;
* open answers are graded by a local judge, a rule-based proxy or humans, never by GPT-4;
* an optional log-likelihood scoring of single-answer MCQs for the direct strategies (not in the paper);
* one-shot demonstrations are gold answers of other questions of the same exam, as in the paper's protocol.
"""

from __future__ import annotations

import csv
import io
import json
import os
from collections.abc import Mapping, Sequence
from typing import Any, Literal

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities.rank_zero import rank_zero_warn
from typing_extensions import override

from lightning_epfl.modules.assessment.generation import TINY_RANDOM_MODEL, HFGenerator, resolve_pretrained_path
from lightning_epfl.modules.assessment.judges import (
    PENDING,
    JudgeRequest,
    JudgeResult,
    OpenAnswerJudge,
    ReferenceMatchJudge,
)
from lightning_epfl.modules.assessment.strategies import (
    ALL_STRATEGIES,
    BaseStrategy,
    ContextBudget,
    GenerationSettings,
    StrategyJob,
    get_strategy,
    run_batched,
    select_one_shot_demo,
)

__all__ = ["RESULT_FILES", "ExamEvaluator", "loglikelihood_choice"]

SCORINGS = ("generate", "loglikelihood")
PROMPT_LANGUAGES = ("question", "en", "fr", "inverted")
LOGLIKELIHOOD_TARGETS = ("label", "text")
RETRIEVERS = ("tfidf", "minilm")
DTYPES = ("float32", "float64", "bfloat16", "float16")
RESULT_FILES = ("records.jsonl", "summary.json", "summary.csv", "summary.md")
"""Files an evaluation writes into its output folder (``records.rank<r>.jsonl`` with several processes)."""


def loglikelihood_choice(logprobs: Sequence[float], continuations: Sequence[str]) -> tuple[int, int]:
    """The options chosen by summed and by length-normalised log-likelihood.

    As in lm-evaluation-harness: ``acc`` takes the argmax of the summed log-probabilities, ``acc_norm`` the argmax
    of the sum divided by the continuation's length in characters. Ties go to the first option.

    Args:
        logprobs: ``[O]`` summed log-probability of each option's continuation.
        continuations: ``[O]`` the continuation texts (without the leading separator).

    Returns:
        ``(acc_index, acc_norm_index)``.

    Raises:
        ValueError: On empty or mismatched inputs.
    """
    if not logprobs or len(logprobs) != len(continuations):
        raise ValueError(f"`logprobs` and `continuations` need the same non-zero length, got {len(logprobs)}.")
    lp = torch.tensor([float(x) for x in logprobs], dtype=torch.float64)
    lengths = torch.tensor([max(len(c), 1) for c in continuations], dtype=torch.float64)
    return int(lp.argmax()), int((lp / lengths).argmax())


class ExamEvaluator(pl.LightningModule):
    """Evaluate a causal LM on exam questions under the prompting strategies of arXiv:2408.11841.

    Use with :class:`~lightning_epfl.datamodules.ExamDataModule` and ``trainer.test`` (metrics are logged) or
    ``trainer.predict`` (each batch returns its records). The model is loaded in :meth:`configure_model` with
    ``local_files_only=True``; nothing is loaded or downloaded in ``__init__``.

    Logged at the end of the test epoch (already aggregated over processes, logged with ``sync_dist``):
    ``test/acc/<strategy>``, ``test/acc_mean``, ``test/acc_majority``, ``test/acc_any``, ``test/unparsed/<strategy>``,
    ``test/calls`` (model calls, distinct (question, strategy) pairs), ``test/pass_rate``; the same accuracies per
    question type and language (``test/mcq/acc/<strategy>``, ``test/open/acc_mean``, ``test/fr/acc_any`` ...),
    ``test/pass_rate/<program>``, ``test/acc_norm/<strategy>`` for log-likelihood scoring, and
    ``test/pending_open`` when answers were left for human grading.

    Output folder (``output_dir``): ``records.jsonl`` (``records.rank<r>.jsonl`` per process; one line per
    (question, strategy): prompts, raw outputs, parse status, score, judge, seeds; padding duplicates of a
    distributed sampler appear in the file of the process that answered them), the summary as JSON, CSV and
    Markdown (``summary.{json,csv,md}``: per-strategy and aggregate accuracy with the chance level of uniform guessing
    next to it, per-program pass rates), ``acc_by_strategy.png`` and ``acc_by_program.png``. Every file is written to a
    temporary name and renamed.

    Args:
        pretrained_path: Model name or path: a local ``transformers`` folder, a ``.gguf`` file, a packaged model name
            (``"smollm2-135m-instruct"``, see :func:`lightning_epfl.models.resolve_pretrained`), or
            ``"tiny-random-llama"`` (a random two-layer model for smoke tests, built once into the cache).
        strategies: Strategy names, in order (the order breaks ``first_in_order`` majority ties). Default: all eight
            (:data:`~lightning_epfl.modules.assessment.strategies.ALL_STRATEGIES`).
        scoring: ``"generate"`` (default; parse the generated answer) or ``"loglikelihood"``: for the direct
            strategies (``zero_shot``, ``one_shot``) on single-answer MCQs, score each option after the answer cue
            instead of generating (not in the paper); other strategies and questions still generate.
        max_new_tokens: Most generated tokens per call. Default 512.
        do_sample: Sample instead of greedy decoding (default ``False``; the paper samples).
        temperature: Sampling temperature. Default 0.8 (paper).
        top_p: Nucleus mass. Default 1.0 (paper).
        seed: Run seed; the sampling seed of each call is derived from it, the question id, the strategy and the
            call index.
        prompt_language: ``"question"`` (default: the question's language), ``"en"``, ``"fr"`` or ``"inverted"``
            (French prompts for English questions and the reverse).
        judge: Grader of open answers (``class_path`` in YAML). ``None``: :class:`ReferenceMatchJudge`, a proxy.
            No shipped judge is the paper's GPT-4.
        mcq_credit: ``"exact"`` (default; the answer set must equal the gold set) or ``"partial"`` (Jaccard index).
        label_scores: Credit per judge label; missing labels keep the defaults correct 1, almost correct 2/3,
            mostly incorrect 1/3, wrong answer 0, not found 0 (the paper does not publish its map).
        open_correct_threshold: An open answer counts as correct when its label's credit is ``>=`` this. Default 1.0
            (only "correct").
        majority_tie: ``"first_in_order"`` (default) or ``"tie_wrong"``.
        pass_threshold: Course pass mark on the majority-vote accuracy. Default 0.5.
        context_budget_tokens: Context length (prompt + ``max_new_tokens``); demonstrations of ``one_shot`` and
            ``four_shot_cot`` are dropped from the front until the prompt fits (counts in the records and
            ``test/demos_dropped``). ``None`` (default): no limit.
        one_shot_retriever: ``"tfidf"`` (default) or ``"minilm"`` (see
            :func:`~lightning_epfl.modules.assessment.strategies.select_one_shot_demo`).
        self_refine_rounds: Feedback/refine rounds of ``self_refine`` (default 1: 3 calls).
        loglikelihood_target: What log-likelihood scoring scores after the cue: ``"label"`` (default; the option's
            label, ``" 1"``) or ``"text"`` (the option's text; then ``acc_norm`` differs from ``acc``).
        generation_batch_size: Most prompts per forward batch. Default 8.
        dtype: Weight dtype. Default ``"float32"``.
        stop_strings: Extra strings that end a generation (cut from the output). Default none.
        output_dir: Output folder. ``None`` (default): ``assessment`` inside the trainer's log folder. Existing
            results there are never overwritten (error before any generation).
        plots: Write the bar plots (needs matplotlib). Default ``True``.

    Raises:
        ValueError: Any argument out of range or not among its allowed values (the message names the argument and
            the allowed values), an unknown strategy, or a ``pretrained_path`` that cannot be resolved.
    """

    def __init__(
        self,
        pretrained_path: str,
        strategies: list[str] | None = None,
        scoring: Literal["generate", "loglikelihood"] = "generate",
        max_new_tokens: int = 512,
        do_sample: bool = False,
        temperature: float = 0.8,
        top_p: float = 1.0,
        seed: int = 0,
        prompt_language: Literal["question", "en", "fr", "inverted"] = "question",
        judge: OpenAnswerJudge | None = None,
        mcq_credit: Literal["exact", "partial"] = "exact",
        label_scores: dict[str, float] | None = None,
        open_correct_threshold: float = 1.0,
        majority_tie: Literal["first_in_order", "tie_wrong"] = "first_in_order",
        pass_threshold: float = 0.5,
        context_budget_tokens: int | None = None,
        one_shot_retriever: Literal["tfidf", "minilm"] = "tfidf",
        self_refine_rounds: int = 1,
        loglikelihood_target: Literal["label", "text"] = "label",
        generation_batch_size: int = 8,
        dtype: Literal["float32", "float64", "bfloat16", "float16"] = "float32",
        stop_strings: list[str] | None = None,
        output_dir: str | None = None,
        plots: bool = True,
    ) -> None:
        super().__init__()
        from lightning_epfl.functional.exam import DEFAULT_GRADE_SCORES, MAJORITY_TIES, MCQ_CREDITS

        names = list(ALL_STRATEGIES if strategies is None else strategies)
        if isinstance(strategies, str) or not names:
            raise ValueError(
                f"`strategies` must be a non-empty list of names from {ALL_STRATEGIES}, got {strategies!r}."
            )
        for name in names:
            if name not in ALL_STRATEGIES:
                raise ValueError(f"`strategies`: unknown prompting strategy {name!r}; allowed: {ALL_STRATEGIES}.")
        if len(set(names)) != len(names):
            raise ValueError(f"`strategies` repeats a name: {names}.")
        _choice("scoring", scoring, SCORINGS)
        _choice("prompt_language", prompt_language, PROMPT_LANGUAGES)
        _choice("mcq_credit", mcq_credit, MCQ_CREDITS)
        _choice("majority_tie", majority_tie, MAJORITY_TIES)
        _choice("one_shot_retriever", one_shot_retriever, RETRIEVERS)
        _choice("loglikelihood_target", loglikelihood_target, LOGLIKELIHOOD_TARGETS)
        _choice("dtype", dtype, DTYPES)
        _int_at_least("max_new_tokens", max_new_tokens, 1)
        _int_at_least("self_refine_rounds", self_refine_rounds, 1)
        _int_at_least("generation_batch_size", generation_batch_size, 1)
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise ValueError(f"`seed` must be an int, got {seed!r}.")
        if not isinstance(temperature, (int, float)) or not temperature > 0:
            raise ValueError(f"`temperature` must be > 0, got {temperature!r}.")
        if not isinstance(top_p, (int, float)) or not 0 < top_p <= 1:
            raise ValueError(f"`top_p` must be in (0, 1], got {top_p!r}.")
        for arg, value in (("open_correct_threshold", open_correct_threshold), ("pass_threshold", pass_threshold)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= 1:
                raise ValueError(f"`{arg}` must be a number in [0, 1], got {value!r}.")
        if context_budget_tokens is not None:
            _int_at_least("context_budget_tokens", context_budget_tokens, max_new_tokens + 1)
        scores = dict(DEFAULT_GRADE_SCORES)
        for label, value in (label_scores or {}).items():
            if label not in scores:
                raise ValueError(f"`label_scores`: unknown label {label!r}; allowed: {list(scores)}.")
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= 1:
                raise ValueError(f"`label_scores[{label!r}]` must be a number in [0, 1], got {value!r}.")
            scores[label] = float(value)
        if judge is not None and not isinstance(judge, OpenAnswerJudge):
            raise ValueError(f"`judge` must be an OpenAnswerJudge (or None), got {type(judge).__name__}.")
        if stop_strings is not None and (
            isinstance(stop_strings, str) or not all(isinstance(s, str) and s for s in stop_strings)
        ):
            raise ValueError(f"`stop_strings` must be a list of non-empty strings or None, got {stop_strings!r}.")
        if output_dir is not None and not str(output_dir).strip():
            raise ValueError("`output_dir` must be a non-empty path or None.")
        if not isinstance(pretrained_path, (str, os.PathLike)) or not os.fspath(pretrained_path):
            raise ValueError(f"`pretrained_path` must be a model name or path, got {pretrained_path!r}.")
        if os.fspath(pretrained_path) != TINY_RANDOM_MODEL:
            from lightning_epfl.models import check_pretrained

            check_pretrained(pretrained_path, argument="pretrained_path")
        self.save_hyperparameters(ignore=["judge"])

        self.pretrained_path = os.fspath(pretrained_path)
        self.strategy_names = names
        self.strategies = [
            get_strategy(n, rounds=self_refine_rounds) if n == "self_refine" else get_strategy(n) for n in names
        ]
        self.scoring = scoring
        self.settings = GenerationSettings(
            max_new_tokens=max_new_tokens,
            do_sample=do_sample,
            temperature=float(temperature),
            top_p=float(top_p),
            stop_strings=tuple(stop_strings or ()),
        )
        self.seed = seed
        self.prompt_language = prompt_language
        self.judge: OpenAnswerJudge = judge if judge is not None else ReferenceMatchJudge()
        self.mcq_credit = mcq_credit
        self.label_scores = scores
        self.open_correct_threshold = float(open_correct_threshold)
        self.majority_tie = majority_tie
        self.pass_threshold = float(pass_threshold)
        self.context_budget_tokens = context_budget_tokens
        self.one_shot_retriever = one_shot_retriever
        self.loglikelihood_target = loglikelihood_target
        self.generation_batch_size = generation_batch_size
        self.dtype_name = dtype
        self.output_dir = None if output_dir is None else os.fspath(output_dir)
        self.plots = plots

        self.lm: torch.nn.Module | None = None
        self.generator: Any = None
        """``generate(prompts, settings) -> outputs`` with ``render``, ``count_tokens`` (and ``loglikelihood`` for
        log-likelihood scoring). Built in :meth:`configure_model`; a generator set before the run is kept."""
        self.outcomes: Any = None
        self._pool: list[dict[str, Any]] = []
        self._courses: list[str] = []
        self._course_program: dict[str, str | None] = {}
        self._records: list[dict[str, Any]] = []
        self._one_shot_cache: dict[str, Any] = {}
        self._resolved_output: str | None = None
        self._progress: Any = None
        self._warned_proxy = False
        self.last_summary: dict[str, Any] = {}

    # ---- model -------------------------------------------------------------------------------------------------------

    @override
    def configure_model(self) -> None:
        """Load the tokenizer and the model (``local_files_only=True``) and build the generator, once."""
        if self.generator is not None:
            return
        from transformers import AutoModelForCausalLM, AutoTokenizer

        folder = resolve_pretrained_path(self.pretrained_path)
        tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
        self.lm = AutoModelForCausalLM.from_pretrained(
            folder, local_files_only=True, dtype=getattr(torch, self.dtype_name)
        ).eval()
        self.lm.requires_grad_(False)
        self.generator = HFGenerator(model=self.lm, tokenizer=tokenizer, batch_size=self.generation_batch_size)

    # ---- checks and set-up -------------------------------------------------------------------------------------------

    def check_config(self, trainer: Any, pl_module: Any, datamodule: Any = None) -> None:
        """Before the run (CLI): refuse an explicit ``output_dir`` that already holds results, or a judge export
        file that exists or would replace them."""
        if self.output_dir is not None:
            _check_no_results(self.output_dir)
            _check_judge_target(self.judge, os.path.abspath(self.output_dir))

    @override
    def setup(self, stage: str) -> None:
        if stage not in ("test", "predict"):
            raise ValueError(f"ExamEvaluator runs with trainer.test or trainer.predict, not {stage!r}.")
        trainer = self.trainer
        folder = self.output_dir
        if folder is None:
            base = trainer.log_dir or trainer.default_root_dir
            folder = os.path.join(base, "assessment")
        self._resolved_output = os.path.abspath(folder)
        _check_no_results(self._resolved_output)
        _check_judge_target(self.judge, self._resolved_output)

    def _start(self, stage: str) -> None:
        from lightning_epfl.metrics.exam import ExamOutcomeMatrix

        trainer = self.trainer
        loaders = trainer.test_dataloaders if stage == "test" else trainer.predict_dataloaders
        loader = loaders[0] if isinstance(loaders, (list, tuple)) else loaders
        dm = getattr(trainer, "datamodule", None)
        pool = list(getattr(dm, "all_questions", None) or getattr(getattr(loader, "dataset", None), "questions", []))
        if not pool and loader is not None and hasattr(loader, "dataset"):
            pool = [loader.dataset[i] for i in range(len(loader.dataset))]
        self._pool = pool
        served = list(getattr(dm, "questions", None) or pool)
        for strategy in self.strategies:
            strategy.check_questions(served)
        self._courses = list(getattr(dm, "course_ids", None) or sorted({str(q["course_id"]) for q in pool}))
        mapping = dict(getattr(dm, "course_program", None) or {})
        for q in pool:
            if q.get("program") is not None:
                mapping.setdefault(str(q["course_id"]), q["program"])
        self._course_program = {c: mapping.get(c) for c in self._courses}
        self.outcomes = ExamOutcomeMatrix(
            self.strategy_names,
            majority_tie=self.majority_tie,
            pass_threshold=self.pass_threshold,
            course_program=self._course_program,
            courses=self._courses,
            mcq_credit=self.mcq_credit,
        ).to(self.device)
        self._records = []
        self._one_shot_cache = {}
        self.judge.setup(self.device)
        total = None
        try:
            total = len(loader.sampler) * len(self.strategies)  # this process's questions x strategies
        except (TypeError, AttributeError):
            pass
        self._progress = None
        if trainer.is_global_zero and trainer.progress_bar_callback is not None:
            from tqdm.auto import tqdm

            self._progress = tqdm(total=total, desc="questions x strategies", unit="answer", dynamic_ncols=True)

    @override
    def on_test_start(self) -> None:
        self._start("test")

    @override
    def on_predict_start(self) -> None:
        self._start("predict")

    # ---- steps -------------------------------------------------------------------------------------------------------

    @override
    def test_step(self, batch: list[dict[str, Any]], batch_idx: int) -> None:
        self._evaluate(batch)

    @override
    def predict_step(self, batch: list[dict[str, Any]], batch_idx: int, dataloader_idx: int = 0) -> list[dict]:
        return self._evaluate(batch)

    def _language(self, question: Mapping[str, Any]) -> str:
        own = str(question.get("language") or "en")
        if self.prompt_language == "question":
            return own if own in ("en", "fr") else "en"
        if self.prompt_language == "inverted":
            return "fr" if own == "en" else "en"
        return self.prompt_language

    def _demos(self, strategy: BaseStrategy, question: Mapping[str, Any]) -> list[Mapping[str, Any]]:
        if strategy.name == "one_shot":
            qid = str(question["question_id"])
            if qid not in self._one_shot_cache:
                self._one_shot_cache[qid] = select_one_shot_demo(question, self._pool, self.one_shot_retriever)
            demo = self._one_shot_cache[qid]
            return [] if demo is None else [demo]
        if strategy.name == "four_shot_cot":
            return list(question.get("demos") or [])
        return []

    def _budget(self) -> ContextBudget | None:
        if self.context_budget_tokens is None:
            return None
        return ContextBudget(self.context_budget_tokens, self.generator.count_tokens, self.settings.max_new_tokens)

    def _uses_loglikelihood(self, strategy: BaseStrategy, question: Mapping[str, Any]) -> bool:
        return (
            self.scoring == "loglikelihood"
            and strategy.kind == "direct"
            and question.get("question_type") == "mcq"
            and len(question.get("answer_indices") or []) == 1
            and not question.get("multiple_correct")
        )

    def _evaluate(self, batch: list[dict[str, Any]]) -> list[dict[str, Any]]:
        if self.generator is None:
            self.configure_model()
        if self.outcomes is None:
            raise RuntimeError("ExamEvaluator runs under trainer.test or trainer.predict.")
        for q in batch:
            if isinstance(q.get("index"), bool) or not isinstance(q.get("index"), int):
                raise ValueError(
                    f"question {q.get('question_id')!r} has no integer `index` (ExamDataModule adds it to every "
                    "question); the evaluator needs it to count every (question, strategy) once."
                )
        records: list[dict[str, Any]] = []
        budget = self._budget()
        for s_idx, strategy in enumerate(self.strategies):
            ll = [q for q in batch if self._uses_loglikelihood(strategy, q)]
            gen = [q for q in batch if not self._uses_loglikelihood(strategy, q)]
            by_id: dict[str, dict[str, Any]] = {}
            if gen:
                jobs = [
                    StrategyJob(question=q, demos=self._demos(strategy, q), language=self._language(q), seed=self.seed)
                    for q in gen
                ]
                results = run_batched(strategy, jobs, self.generator, self.settings, budget)
                for q, job, result in zip(gen, jobs, results):
                    by_id[str(q["question_id"])] = self._generated_record(q, s_idx, strategy, job.language, result)
            if ll:
                for q, record in zip(ll, self._loglikelihood_records(ll, s_idx, strategy, budget)):
                    by_id[str(q["question_id"])] = record
            records.extend(by_id[str(q["question_id"])] for q in batch)
            if self._progress is not None:
                self._progress.update(len(batch))
        self._grade_open(records, {int(q["index"]): q for q in batch})
        self._update_metrics(records)
        self._records.extend(records)
        return records

    def _base_record(self, q: Mapping[str, Any], s_idx: int, strategy: BaseStrategy, language: str) -> dict:
        return {
            "index": int(q["index"]),
            "question_id": str(q["question_id"]),
            "course_id": str(q.get("course_id")),
            "program": q.get("program"),
            "language": q.get("language"),
            "level": q.get("level"),
            "question_type": q.get("question_type"),
            "multiple_correct": bool(q.get("multiple_correct")),
            "strategy": strategy.name,
            "strategy_index": s_idx,
            "kind": strategy.kind,
            "prompt_language": language,
            "gold_indices": sorted(int(i) for i in q.get("answer_indices") or []),
            "rank": int(self.global_rank),
            "run_seed": self.seed,
        }

    def _generated_record(
        self, q: Mapping[str, Any], s_idx: int, strategy: BaseStrategy, language: str, result: Any
    ) -> dict[str, Any]:
        record = self._base_record(q, s_idx, strategy, language)
        info = dict(result.info)
        record.update(
            scoring="generate",
            prompts=result.prompts,
            outputs=result.outputs,
            final_text=result.final_text,
            calls=result.calls,
            seeds=info.pop("seeds", []),
            info=info,
        )
        if q.get("question_type") == "mcq":
            parsed = result.parsed if result.parsed is not None else strategy.parse(result.final_text, q)
            record["pred_indices"] = sorted(parsed.indices)
            record["parse_status"] = parsed.status
            record["score"] = self._mcq_score(record["pred_indices"], record["gold_indices"])
            record["correct"] = record["score"] >= 1.0
            record["judge"] = None
        else:
            record["pred_indices"] = []
            record["parse_status"] = "open"
        return record

    def _mcq_score(self, pred: Sequence[int], gold: Sequence[int]) -> float:
        from lightning_epfl.functional.exam import answer_bitmask, mcq_scores

        p = torch.tensor([answer_bitmask(pred)], dtype=torch.int64)
        g = torch.tensor([answer_bitmask(gold)], dtype=torch.int64)
        return float(mcq_scores(p, g, self.mcq_credit)[0])

    def _loglikelihood_records(
        self, questions: list[dict[str, Any]], s_idx: int, strategy: Any, budget: ContextBudget | None
    ) -> list[dict[str, Any]]:
        requests: list[tuple[str, str]] = []
        spans, prompts, conts_all, infos = [], [], [], []
        for q in questions:
            language = self._language(q)
            demos = self._demos(strategy, q)
            info: dict[str, Any] = {}
            if strategy.uses_demos and budget is not None:
                messages, dropped = budget.fit(lambda d, q=q, lang=language: strategy.messages(q, d, lang), demos)
                info.update(demos_dropped=dropped, demo_ids=[str(d.get("question_id", "")) for d in demos[dropped:]])
            else:
                messages = strategy.messages(q, demos, language)
                if strategy.uses_demos:
                    info.update(demos_dropped=0, demo_ids=[str(d.get("question_id", "")) for d in demos])
            context = self.generator.render(messages) + strategy.answer_prefix(language)
            if self.loglikelihood_target == "label":
                conts = strategy.option_labels(len(q["options"]))
            else:
                conts = [str(o) for o in q["options"]]
            spans.append((len(requests), len(requests) + len(conts)))
            requests.extend((context, " " + c) for c in conts)
            prompts.append(messages)
            conts_all.append(conts)
            infos.append(info)
        logprobs = self.generator.loglikelihood(requests)
        records = []
        for q, (a, b), messages, conts, info in zip(questions, spans, prompts, conts_all, infos):
            lp = [float(x) for x in logprobs[a:b]]
            pick, pick_norm = loglikelihood_choice(lp, conts)
            record = self._base_record(q, s_idx, strategy, self._language(q))
            record.update(
                scoring="loglikelihood",
                prompts=[messages],
                outputs=[],
                final_text="",
                calls=1,
                seeds=[],
                info={**info, "continuations": conts, "option_logprobs": lp},
                pred_indices=[pick],
                parse_status="loglikelihood",
                pred_norm_indices=[pick_norm],
                judge=None,
            )
            record["score"] = self._mcq_score([pick], record["gold_indices"])
            record["score_norm"] = self._mcq_score([pick_norm], record["gold_indices"])
            record["correct"] = record["score"] >= 1.0
            records.append(record)
        return records

    def _grade_open(self, records: list[dict[str, Any]], questions: Mapping[int, Mapping[str, Any]]) -> None:
        from lightning_epfl.functional.exam import GRADE_LABELS

        open_records = [r for r in records if r["question_type"] != "mcq"]
        if not open_records:
            return
        if isinstance(self.judge, ReferenceMatchJudge) and not self._warned_proxy:
            self._warned_proxy = True
            rank_zero_warn(
                "Open answers are graded by ReferenceMatchJudge, a reference-matching proxy (not the paper's GPT-4 "
                "judge); set `judge` to LocalLMJudge or ExportOnlyJudge for real grades.",
                category=RuntimeWarning,
            )
        requests = [
            JudgeRequest(question=questions[r["index"]], answer=r["final_text"], strategy=r["strategy"])
            for r in open_records
        ]
        results: list[JudgeResult] = self.judge.grade(requests)
        if len(results) != len(requests):
            raise RuntimeError(f"The judge returned {len(results)} grades for {len(requests)} answers.")
        for r, res in zip(open_records, results):
            r["judge"] = {"name": self.judge.name, "label": res.label, "raw": res.raw, **res.info}
            if res.label == PENDING:
                r["score"], r["correct"] = None, None
                r["pred_indices"] = []
                continue
            score = self.label_scores.get(res.label, 0.0)
            r["score"] = score
            r["correct"] = score >= self.open_correct_threshold - 1e-12
            r["grade_key"] = GRADE_LABELS.index(res.label) if res.label in GRADE_LABELS else None

    def _metric_rows(self, records: Sequence[Mapping[str, Any]], norm: bool = False) -> dict[str, list] | None:
        """Arguments of ``ExamOutcomeMatrix.update`` for the graded records (pending open answers left out)."""
        from lightning_epfl.functional.exam import answer_bitmask

        rows: dict[str, list] = {"q": [], "s": [], "score": [], "pred": [], "gold": [], "course": []}
        for r in records:
            if r.get("score") is None:
                continue
            if r["question_type"] == "mcq":
                normed = norm and r.get("pred_norm_indices") is not None
                pred = r["pred_norm_indices"] if normed else r["pred_indices"]
                score = r["score_norm"] if normed else r["score"]
                key = answer_bitmask(pred)
            else:
                score = 1.0 if r["correct"] else 0.0
                key = 0 if r.get("grade_key") is None else 1 << int(r["grade_key"])
            rows["q"].append(int(r["index"]))
            rows["s"].append(int(r["strategy_index"]))
            rows["score"].append(float(score))
            rows["pred"].append(key)
            rows["gold"].append(answer_bitmask(r["gold_indices"]))
            rows["course"].append(str(r["course_id"]))
        return rows if rows["q"] else None

    def _update_metrics(self, records: list[dict[str, Any]]) -> None:
        rows = self._metric_rows(records)
        if rows is None:
            return
        self.outcomes.update(
            torch.tensor(rows["q"]),
            torch.tensor(rows["s"]),
            torch.tensor(rows["score"], dtype=torch.float64),
            torch.tensor(rows["pred"], dtype=torch.int64),
            None,
            rows["course"],
        )

    # ---- end of the run ----------------------------------------------------------------------------------------------

    def _gather_records(self) -> list[dict[str, Any]]:
        """Every process's records (compact fields only), deduplicated on (question, strategy)."""
        keep = (
            "index", "question_id", "course_id", "program", "language", "question_type", "strategy",
            "strategy_index", "kind", "scoring", "score", "score_norm", "correct", "pred_indices",
            "pred_norm_indices", "gold_indices", "grade_key", "parse_status", "calls", "info", "judge",
        )  # fmt: skip
        mine = [{k: r.get(k) for k in keep} for r in self._records]
        for r in mine:
            info = r.pop("info") or {}
            r["demos_dropped"] = int(info.get("demos_dropped") or 0)
            r["judge_label"] = (r.pop("judge") or {}).get("label")
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            gathered: list[Any] = [None] * torch.distributed.get_world_size()
            torch.distributed.all_gather_object(gathered, mine)
            everything = [r for part in gathered for r in part]
        else:
            everything = mine
        seen, unique = set(), []
        for r in everything:
            key = (r["index"], r["strategy_index"])
            if key not in seen:
                seen.add(key)
                unique.append(r)
        return sorted(unique, key=lambda r: (r["index"], r["strategy_index"]))

    def _summarize(self, headline: dict[str, torch.Tensor]) -> dict[str, Any]:
        """All aggregates from the deduplicated records of every process (same on every process)."""
        from lightning_epfl.functional.exam import chance_table
        from lightning_epfl.metrics.exam import ExamOutcomeMatrix

        records = self._gather_records()
        summary: dict[str, Any] = {
            "strategies": self.strategy_names,
            "overall": {k: float(v) for k, v in headline.items()},
            "groups": {},
            "calls": {},
            "acc_norm": {},
            "pending_open": sum(1 for r in records if r["score"] is None),
            "demos_dropped": sum(r["demos_dropped"] for r in records),
            "judge": self.judge.name,
            "scoring": self.scoring,
            "pretrained_path": self.pretrained_path,
        }
        for name in self.strategy_names:
            mine = [r for r in records if r["strategy"] == name]
            summary["calls"][name] = sum(int(r["calls"] or 0) for r in mine)
        summary["calls_total"] = sum(summary["calls"].values())

        def local(rows_of: list[dict[str, Any]], norm: bool = False) -> dict[str, float]:
            rows = self._metric_rows(rows_of, norm=norm)
            if rows is None:
                return {}
            metric = ExamOutcomeMatrix(
                self.strategy_names,
                majority_tie=self.majority_tie,
                pass_threshold=self.pass_threshold,
                course_program=self._course_program,
                courses=self._courses,
                mcq_credit=self.mcq_credit,
                sync_on_compute=False,
            )
            metric.update(rows["q"], rows["s"], rows["score"], torch.tensor(rows["pred"]), None, rows["course"])
            try:
                return {k: float(v) for k, v in metric.compute().items()}
            except ValueError:  # some question lacks a strategy (cannot happen with complete records)
                return {}

        for field, values in (("question_type", ("mcq", "open")), ("language", ("en", "fr"))):
            for value in values:
                subset = [r for r in records if r[field] == value]
                if subset:
                    summary["groups"][value] = local(subset)
        mcq = summary["groups"].get("mcq", {})
        for key in [k for k in summary["overall"] if k.startswith("unparsed/")]:  # a share of the MCQs only
            summary["overall"][key] = mcq.get(key, 0.0)
        if any(r["scoring"] == "loglikelihood" for r in records):
            norm = local(records, norm=True)
            for name in self.strategy_names:
                if any(r["strategy"] == name and r["scoring"] == "loglikelihood" for r in records):
                    summary["acc_norm"][name] = norm.get(f"acc/{name}")
        # chance level of uniform guessing on the single-answer MCQs (mean, majority, any-correct)
        single = {}
        for r in records:
            if r["question_type"] == "mcq" and len(r["gold_indices"]) == 1:
                single[r["index"]] = r
        n_opts = [len(self._pool_by_index().get(i, {}).get("options") or []) for i in single]
        chance: dict[str, float | None] = {"mean": None, "majority": None, "any": None, "num_questions": len(n_opts)}
        try:
            tables = [chance_table(n, len(self.strategy_names)) for n in n_opts if n >= 2]
        except ValueError:
            tables = []
        if tables and len(tables) == len(n_opts):
            chance["mean"] = sum(t["mean"] for t in tables) / len(tables)
            chance["majority"] = sum(t[f"majority_{self.majority_tie}"] for t in tables) / len(tables)
            chance["any"] = sum(t["any"] for t in tables) / len(tables)
        summary["chance_single_answer_mcq"] = chance
        # per program: courses, pass rate and accuracies
        programs: dict[str, dict[str, Any]] = {}
        overall = summary["overall"]
        for program in sorted({p for p in self._course_program.values() if p is not None}):
            subset = [r for r in records if self._course_program.get(str(r["course_id"])) == program]
            if not subset:
                continue
            stats = local(subset)
            programs[program] = {
                "courses": sorted({str(r["course_id"]) for r in subset}),
                "pass_rate": overall.get(f"pass_rate/{program}"),
                "acc_mean": stats.get("acc_mean"),
                "acc_majority": stats.get("acc_majority"),
                "acc_any": stats.get("acc_any"),
            }
        summary["programs"] = programs
        summary["courses"] = {k.split("/", 1)[1]: v for k, v in overall.items() if k.startswith("course_acc/")}
        return summary

    def _pool_by_index(self) -> dict[int, Mapping[str, Any]]:
        return {int(q["index"]): q for q in self._pool if "index" in q}

    def _finish(self, stage: str) -> dict[str, Any]:
        if self._progress is not None:
            self._progress.close()
            self._progress = None
        headline = {k: v for k, v in self.outcomes.compute().items()} if self.outcomes is not None else {}
        self.outcomes.reset()
        summary = self._summarize(headline)
        self.last_summary = summary
        self._write_outputs(summary)
        return summary

    @override
    def on_test_epoch_end(self) -> None:
        summary = self._finish("test")
        logs: dict[str, float] = {}
        for key, value in summary["overall"].items():
            if key.startswith("course_acc/") or key == "num_questions":
                continue
            logs[f"test/{key}"] = value
        for group, stats in summary["groups"].items():
            for key, value in stats.items():
                if key.startswith(("acc", "unparsed")):
                    logs[f"test/{group}/{key}"] = value
        for name, value in summary["acc_norm"].items():
            if value is not None:
                logs[f"test/acc_norm/{name}"] = value
        logs["test/calls"] = float(summary["calls_total"])
        if summary["pending_open"]:
            logs["test/pending_open"] = float(summary["pending_open"])
        if self.context_budget_tokens is not None:
            logs["test/demos_dropped"] = float(summary["demos_dropped"])
        for key, value in logs.items():
            self.log(key, torch.tensor(value, dtype=torch.float32), sync_dist=True)

    @override
    def on_predict_epoch_end(self) -> None:
        self._finish("predict")

    # ---- files -------------------------------------------------------------------------------------------------------

    def _write_outputs(self, summary: dict[str, Any]) -> None:
        from lightning_epfl.utilities import atomic_write

        folder = self._resolved_output or os.path.abspath("assessment")
        world = int(self.trainer.world_size) if self._trainer is not None else 1
        rank = int(self.global_rank)
        name = "records.jsonl" if world == 1 else f"records.rank{rank}.jsonl"

        def write_records(tmp: str) -> None:
            with open(tmp, "w", encoding="utf-8") as f:
                for r in self._records:
                    f.write(json.dumps(r, ensure_ascii=False, default=_jsonable) + "\n")

        atomic_write(os.path.join(folder, name), write_records)
        extra = self.judge.finalize(folder, rank, world)
        if rank != 0:
            return
        summary = {**summary, "files": [name if world == 1 else "records.rank*.jsonl", *extra]}
        atomic_write(
            os.path.join(folder, "summary.json"),
            lambda tmp: _write_text(tmp, json.dumps(summary, indent=2, ensure_ascii=False, default=_jsonable)),
        )
        rows = _summary_rows(summary, self.strategies)
        atomic_write(os.path.join(folder, "summary.csv"), lambda tmp: _write_text(tmp, _csv(rows)))
        atomic_write(os.path.join(folder, "summary.md"), lambda tmp: _write_text(tmp, _markdown(rows, summary)))
        if self.plots:
            _plots(folder, summary)


# ---- helpers -----------------------------------------------------------------------------------------------------


def _choice(name: str, value: Any, allowed: Sequence[str]) -> None:
    if value not in allowed:
        raise ValueError(f"`{name}` must be one of {list(allowed)}, got {value!r}.")


def _int_at_least(name: str, value: Any, low: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"`{name}` must be an int >= {low}, got {value!r}.")


def _check_no_results(folder: str) -> None:
    """Raise when ``folder`` already holds evaluation results (they are never overwritten)."""
    if os.path.isfile(folder):
        raise FileExistsError(f"`output_dir` {folder!r} is a file; give a folder for the evaluation results.")
    if not os.path.isdir(folder):
        return
    found = sorted(
        f for f in os.listdir(folder) if f in RESULT_FILES or (f.startswith("records.rank") and f.endswith(".jsonl"))
    )
    if found:
        raise FileExistsError(
            f"`output_dir` {folder!r} already holds evaluation results ({', '.join(found)}); results are never "
            "overwritten: choose another `output_dir` or move them away."
        )


def _check_judge_target(judge: Any, folder: str) -> None:
    """Raise when the judge's export file (``ExportOnlyJudge``) exists already or is one of the result files."""
    target = getattr(judge, "target", None)
    if not callable(target):
        return
    path = os.path.abspath(target(folder))
    if os.path.dirname(path) == folder and os.path.basename(path) in RESULT_FILES:
        raise ValueError(
            f"the judge's `path` {path!r} is one of the evaluation's own result files {list(RESULT_FILES)}; choose "
            "another file name."
        )
    if os.path.exists(path):
        raise FileExistsError(
            f"the judge's `path` {path!r} exists already; exports are never overwritten: choose another path or move "
            "the file away."
        )


def _jsonable(value: Any) -> Any:
    if isinstance(value, (set, frozenset)):
        return sorted(value)
    if isinstance(value, torch.Tensor):
        return value.tolist()
    return str(value)


def _write_text(path: str, text: str) -> None:
    with open(path, "w", encoding="utf-8") as f:
        f.write(text if text.endswith("\n") else text + "\n")


def _fmt(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.4f}"
    return str(value)


def _summary_rows(summary: dict[str, Any], strategies: Sequence[BaseStrategy]) -> list[dict[str, Any]]:
    """One row per strategy, then the mean, majority and any-correct aggregates."""
    overall, groups = summary["overall"], summary["groups"]
    chance = summary["chance_single_answer_mcq"]
    rows = []
    for s in strategies:
        row = {
            "row": s.name,
            "kind": s.kind,
            "acc": overall.get(f"acc/{s.name}"),
            "chance": chance["mean"],
        }
        for group in ("mcq", "open", "en", "fr"):
            row[f"acc_{group}"] = groups.get(group, {}).get(f"acc/{s.name}")
        row["acc_norm"] = summary["acc_norm"].get(s.name)
        row["unparsed"] = overall.get(f"unparsed/{s.name}")
        row["calls"] = summary["calls"].get(s.name)
        rows.append(row)
    for agg in ("mean", "majority", "any"):
        row = {"row": agg, "kind": "aggregate", "acc": overall.get(f"acc_{agg}"), "chance": chance[agg]}
        for group in ("mcq", "open", "en", "fr"):
            row[f"acc_{group}"] = groups.get(group, {}).get(f"acc_{agg}")
        row.update(acc_norm=None, unparsed=None, calls=summary["calls_total"] if agg == "mean" else None)
        rows.append(row)
    return rows


_COLUMNS = ("row", "kind", "acc", "chance", "acc_mcq", "acc_open", "acc_en", "acc_fr", "acc_norm", "unparsed", "calls")


def _csv(rows: list[dict[str, Any]]) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(_COLUMNS)
    for row in rows:
        writer.writerow([_fmt(row.get(c)) for c in _COLUMNS])
    return buffer.getvalue()


def _markdown(rows: list[dict[str, Any]], summary: dict[str, Any]) -> str:
    chance = summary["chance_single_answer_mcq"]
    lines = [
        "# Exam evaluation (protocol of arXiv:2408.11841)",
        "",
        f"Model `{summary['pretrained_path']}`, scoring `{summary['scoring']}`, open answers graded by "
        f"`{summary['judge']}` (not the paper's GPT-4 judge); {int(summary['overall'].get('num_questions', 0))} "
        f"questions, {summary['calls_total']} model calls.",
        "",
        "| " + " | ".join(_COLUMNS) + " |",
        "|" + "|".join("---" for _ in _COLUMNS) + "|",
    ]
    for row in rows:
        lines.append("| " + " | ".join(_fmt(row.get(c)) for c in _COLUMNS) + " |")
    lines += [
        "",
        f"`chance`: uniform guessing on the {chance['num_questions']} single-answer MCQs with the same number of "
        "strategies (mean, majority vote, any-correct); any-correct is high by chance alone.",
    ]
    if summary["pending_open"]:
        lines.append(f"{summary['pending_open']} open answers await human grading and are left out of the accuracies.")
    if summary["programs"]:
        lines += [
            "",
            "| program | courses | pass_rate | acc_mean | acc_majority | acc_any |",
            "|---|---|---|---|---|---|",
        ]
        for program, p in summary["programs"].items():
            lines.append(
                f"| {program} | {len(p['courses'])} | {_fmt(p['pass_rate'])} | {_fmt(p['acc_mean'])} | "
                f"{_fmt(p['acc_majority'])} | {_fmt(p['acc_any'])} |"
            )
    return "\n".join(lines) + "\n"


def _plots(folder: str, summary: dict[str, Any]) -> None:
    from lightning_epfl.utilities import new_figure, save_figure

    overall = summary["overall"]
    names = [*summary["strategies"], "mean", "majority", "any"]
    values = [overall.get(f"acc/{n}", 0.0) for n in summary["strategies"]]
    values += [overall.get("acc_mean", 0.0), overall.get("acc_majority", 0.0), overall.get("acc_any", 0.0)]
    fig = new_figure((max(6.4, 0.7 * len(names)), 4.0))
    ax = fig.add_subplot(111)
    colors = ["tab:blue"] * len(summary["strategies"]) + ["tab:orange"] * 3
    ax.bar(range(len(names)), values, color=colors)
    chance = summary["chance_single_answer_mcq"]
    if chance["any"] is not None:
        ax.axhline(chance["any"], color="gray", linestyle=":", label="chance, any-correct")
        ax.axhline(chance["mean"], color="gray", linestyle="--", label="chance, one strategy")
        ax.legend(loc="upper left", fontsize=8)
    ax.set_xticks(range(len(names)))
    ax.set_xticklabels(names, rotation=45, ha="right", fontsize=8)
    ax.set_ylim(0, 1)
    ax.set_ylabel("accuracy")
    ax.set_title("Accuracy per strategy")
    fig.tight_layout()
    save_figure(fig, os.path.join(folder, "acc_by_strategy.png"))

    programs = summary["programs"]
    fig = new_figure((max(6.4, 1.2 * max(len(programs), 1)), 4.0))
    ax = fig.add_subplot(111)
    keys = ("acc_mean", "acc_majority", "acc_any", "pass_rate")
    width = 0.8 / len(keys)
    for k, key in enumerate(keys):
        vals = [programs[p].get(key) or 0.0 for p in programs]
        ax.bar([i + k * width for i in range(len(programs))], vals, width=width, label=key)
    ax.set_xticks([i + 0.4 - width / 2 for i in range(len(programs))])
    ax.set_xticklabels(list(programs), rotation=30, ha="right", fontsize=8)
    ax.set_ylim(0, 1)
    ax.set_title("Accuracy and course pass rate per program")
    if programs:
        ax.legend(fontsize=8)
    fig.tight_layout()
    save_figure(fig, os.path.join(folder, "acc_by_program.png"))
