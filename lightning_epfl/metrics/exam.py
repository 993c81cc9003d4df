"""Exam outcome metric
=====================

:class:`ExamOutcomeMatrix` accumulates one record per (question, strategy) answer and computes the aggregates of
Borges et al., *Could ChatGPT get an Engineering Degree?* (arXiv:2408.11841): per-strategy accuracy, the mean over
strategies, the majority vote, any-strategy-correct, per-course accuracy and per-program pass rates. The math is
:func:`lightning_epfl.functional.exam.exam_aggregates` and :func:`~lightning_epfl.functional.exam.course_pass_rates`.

Records are kept in ``cat`` states and deduplicated on (question, strategy) in :meth:`ExamOutcomeMatrix.compute`,
so the samples a distributed sampler repeats to even out the processes' shares count once.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor
from torchmetrics import Metric

from lightning_epfl.functional.exam import (
    MAJORITY_TIES,
    MCQ_CREDITS,
    answer_bitmask,
    course_pass_rates,
    course_program_map,
    exam_aggregates,
    mcq_scores,
)

COURSE_AGGREGATES = ("mean", "majority", "any")


def _distributed_world() -> int:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_world_size()
    return 1


def _cat(state: Any) -> Tensor | None:
    if isinstance(state, Tensor):
        return state
    if not state:
        return None
    return torch.cat([s.reshape(-1) for s in state])


class ExamOutcomeMatrix(Metric):
    """Question × strategy outcomes and their aggregates (arXiv:2408.11841), exact under multi-process runs.

    Feed one record per (question, strategy) with :meth:`update`; :meth:`compute` keeps the first record of each
    (question, strategy) pair (padding duplicates of a ``DistributedSampler`` are identical), builds the
    ``[Q, S]`` matrix and returns 0-dim float64 tensors:

    * ``acc/<strategy>``, ``unparsed/<strategy>`` (share of empty answer sets), ``acc_mean``, ``acc_majority``,
      ``acc_any`` (see :func:`~lightning_epfl.functional.exam.exam_aggregates`), ``num_questions``;
    * when course ids were given: ``course_acc/<course>`` (mean per-question credit under ``course_aggregate``),
      ``pass_rate`` (share of all courses with accuracy ``>= pass_threshold``) and, with ``course_program``,
      ``pass_rate/<program>`` (share of the program's courses that pass).

    Every question must have a record for every strategy; nothing is returned (``{}``) before the first update.

    Args:
        strategies: Strategy names in the configured order (that order breaks ``first_in_order`` ties).
        majority_tie: ``"first_in_order"`` (default) or ``"tie_wrong"``.
        pass_threshold: Course pass mark in ``[0, 1]`` (default 0.5).
        course_program: Course -> program (or ``program -> [courses]``), or ``None``.
        courses: Course names in a fixed order (e.g. ``ExamDataModule.course_ids``), so that course ids map to the
            same integers in every process; defaults to the sorted keys of ``course_program``. Without either,
            names are registered as they come, which only works in a single process.
        mcq_credit: ``"exact"`` (default) or ``"partial"`` (Jaccard), for records whose score is computed here.
        course_aggregate: Per-question credit used for courses: ``"majority"`` (default), ``"mean"`` or ``"any"``.
        **kwargs: Passed to :class:`torchmetrics.Metric`.

    Raises:
        ValueError: On empty or repeated strategy names, an unknown ``majority_tie``/``mcq_credit``/
            ``course_aggregate``, a ``pass_threshold`` outside ``[0, 1]``, or a malformed ``course_program``.
    """

    full_state_update = False
    is_differentiable = False
    higher_is_better = True

    def __init__(
        self,
        strategies: Sequence[str],
        majority_tie: str = "first_in_order",
        pass_threshold: float = 0.5,
        course_program: Mapping[str, Any] | None = None,
        courses: Sequence[str] | None = None,
        mcq_credit: str = "exact",
        course_aggregate: str = "majority",
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        if isinstance(strategies, str) or not isinstance(strategies, Sequence) or not strategies:
            raise ValueError(f"`strategies` must be a non-empty list of names, got {strategies!r}.")
        if not all(isinstance(s, str) and s for s in strategies) or len(set(strategies)) != len(strategies):
            raise ValueError(f"`strategies` must hold distinct non-empty strings, got {list(strategies)!r}.")
        if majority_tie not in MAJORITY_TIES:
            raise ValueError(f"`majority_tie` must be one of {list(MAJORITY_TIES)}, got {majority_tie!r}.")
        if mcq_credit not in MCQ_CREDITS:
            raise ValueError(f"`mcq_credit` must be one of {list(MCQ_CREDITS)}, got {mcq_credit!r}.")
        if course_aggregate not in COURSE_AGGREGATES:
            raise ValueError(f"`course_aggregate` must be one of {list(COURSE_AGGREGATES)}, got {course_aggregate!r}.")
        if isinstance(pass_threshold, bool) or not isinstance(pass_threshold, (int, float)):
            raise ValueError(f"`pass_threshold` must be a number in [0, 1], got {pass_threshold!r}.")
        if not 0.0 <= pass_threshold <= 1.0:
            raise ValueError(f"`pass_threshold` must be a number in [0, 1], got {pass_threshold!r}.")
        self.strategies = list(strategies)
        self.majority_tie = majority_tie
        self.pass_threshold = float(pass_threshold)
        self.mcq_credit = mcq_credit
        self.course_aggregate = course_aggregate
        self.course_program = course_program_map(course_program) if course_program is not None else None
        if courses is not None:
            if isinstance(courses, str) or not all(isinstance(c, str) and c for c in courses):
                raise ValueError(f"`courses` must be a list of non-empty strings, got {courses!r}.")
            if len(set(courses)) != len(courses):
                raise ValueError(f"`courses` repeats a name: {list(courses)!r}.")
            self.courses = list(courses)
        else:
            self.courses = sorted(self.course_program) if self.course_program else []
        self._fixed_courses = bool(self.courses)
        for name in ("question", "strategy", "score", "pred", "gold", "course"):
            self.add_state(name, default=[], dist_reduce_fx="cat")

    # ----------------------------------------------------------------------------------------------------------------
    def _ints(self, values: Any, name: str, size: int | None) -> Tensor:
        if isinstance(values, Tensor):
            if values.is_floating_point() or values.dtype == torch.bool:
                raise ValueError(f"`{name}` must hold integers, got dtype {values.dtype}.")
            out = values.detach().reshape(-1).long().cpu()
        else:
            values = list(values)
            if not all(isinstance(v, int) and not isinstance(v, bool) for v in values):
                raise ValueError(
                    f"`{name}` must be integers (e.g. the `index` ExamDataModule adds to questions), got {values!r}."
                )
            out = torch.tensor(values, dtype=torch.int64)
        if size is not None and out.numel() != size:
            raise ValueError(f"`{name}` must have {size} entries, got {out.numel()}.")
        return out

    def _strategy_ids(self, strategy_ids: Any, size: int) -> Tensor:
        if isinstance(strategy_ids, (str, int)) and not isinstance(strategy_ids, bool):
            strategy_ids = [strategy_ids] * size
        if isinstance(strategy_ids, Tensor):
            out = self._ints(strategy_ids, "strategy_ids", size)
        else:
            out_list = []
            for s in strategy_ids:
                if isinstance(s, str):
                    if s not in self.strategies:
                        raise ValueError(f"`strategy_ids`: unknown strategy {s!r}; allowed: {self.strategies}.")
                    out_list.append(self.strategies.index(s))
                elif isinstance(s, int) and not isinstance(s, bool):
                    out_list.append(s)
                else:
                    raise ValueError(f"`strategy_ids` must be strategy names or indices, got {s!r}.")
            out = torch.tensor(out_list, dtype=torch.int64)
            if out.numel() != size:
                raise ValueError(f"`strategy_ids` must have {size} entries, got {out.numel()}.")
        if ((out < 0) | (out >= len(self.strategies))).any():
            raise ValueError(f"`strategy_ids` indices must lie in [0, {len(self.strategies)}), got {out.tolist()}.")
        return out

    def _masks(self, masks: Any, name: str, size: int) -> Tensor:
        if isinstance(masks, Tensor):
            if masks.dtype == torch.bool:
                if masks.ndim != 2:
                    raise ValueError(f"`{name}` as a bool tensor must have shape (batch, options).")
                bits = torch.tensor(
                    [answer_bitmask(row.nonzero().reshape(-1).tolist()) for row in masks.cpu()], dtype=torch.int64
                )
            else:
                bits = self._ints(masks, name, None)
                if (bits < 0).any():
                    raise ValueError(f"`{name}` bit masks must be >= 0.")
        else:
            sets: list[Iterable[int]] = list(masks)
            try:
                bits = torch.tensor([answer_bitmask(s) for s in sets], dtype=torch.int64)
            except (TypeError, ValueError) as err:
                raise ValueError(f"`{name}`: {err}") from None
        bits = bits.reshape(-1).long()
        if bits.numel() != size:
            raise ValueError(f"`{name}` must describe {size} answers, got {bits.numel()}.")
        return bits

    def _course_ids(self, course_ids: Any, size: int) -> Tensor:
        if course_ids is None:
            return torch.full((size,), -1, dtype=torch.int64)
        if isinstance(course_ids, str):
            course_ids = [course_ids] * size
        if isinstance(course_ids, Tensor):
            out = self._ints(course_ids, "course_ids", size)
        else:
            out_list = []
            for c in course_ids:
                if not isinstance(c, str):
                    raise ValueError(f"`course_ids` must be course names (strings), got {c!r}.")
                if c not in self.courses:
                    if self._fixed_courses:
                        raise ValueError(f"`course_ids`: unknown course {c!r}; known courses: {self.courses}.")
                    if _distributed_world() > 1:
                        raise ValueError(
                            f"`course_ids`: course {c!r} is not in `courses`; in a multi-process run pass "
                            "courses=[...] (e.g. ExamDataModule.course_ids) so that every process numbers them alike."
                        )
                    self.courses.append(c)
                out_list.append(self.courses.index(c))
            out = torch.tensor(out_list, dtype=torch.int64)
            if out.numel() != size:
                raise ValueError(f"`course_ids` must have {size} entries, got {out.numel()}.")
        return out

    def update(
        self,
        question_ids: Tensor | Sequence[int],
        strategy_ids: Tensor | Sequence[str | int] | str | int,
        scores: Tensor | Sequence[float] | None,
        pred_masks: Tensor | Sequence[Iterable[int]],
        gold_masks: Tensor | Sequence[Iterable[int]] | None = None,
        course_ids: Tensor | Sequence[str] | str | None = None,
    ) -> None:
        """Add ``B`` (question, strategy) records.

        Args:
            question_ids: ``[B]`` integer question ids (e.g. ``ExamDataModule``'s ``index``).
            strategy_ids: ``[B]`` strategy names or indices into ``strategies``, or one name for the whole batch.
            scores: ``[B]`` credits in ``[0, 1]`` (e.g. open-answer grades); ``None`` or NaN entries are computed
                from the answer sets with ``mcq_credit``.
            pred_masks: Answer sets: bool ``[B, O]``, int64 bit masks ``[B]`` or ``B`` iterables of option indices
                (e.g. ``ParsedAnswer.indices``); an empty set is an unparsed answer (abstains, scores 0). For an
                open answer, a one-element set with the grade's index serves as its majority-vote key.
            gold_masks: Gold sets in the same encodings; needed for the records whose score is computed.
            course_ids: ``[B]`` course names (or indices into ``courses``), one name for the batch, or ``None``.

        Raises:
            ValueError: On sizes that disagree, non-integer question ids, an unknown strategy or course, option
                indices outside ``[0, 62)``, scores outside ``[0, 1]``, or a computed score without a gold set.
        """
        qids = self._ints(question_ids, "question_ids", None)
        size = qids.numel()
        sids = self._strategy_ids(strategy_ids, size)
        pred = self._masks(pred_masks, "pred_masks", size)
        gold = self._masks(gold_masks, "gold_masks", size) if gold_masks is not None else torch.zeros_like(pred)
        if scores is None:
            values = torch.full((size,), float("nan"), dtype=torch.float64)
        else:
            values = torch.as_tensor(scores, dtype=torch.float64).reshape(-1).cpu()
            if values.numel() != size:
                raise ValueError(f"`scores` must have {size} entries, got {values.numel()}.")
            given = values[~torch.isnan(values)]
            if ((given < 0) | (given > 1)).any():
                raise ValueError(f"`scores` must lie in [0, 1], got {values.tolist()}.")
        missing = torch.isnan(values)
        if missing.any():
            if (gold[missing] == 0).any():
                raise ValueError("`gold_masks` must give a non-empty gold set for every record without a score.")
            values[missing] = mcq_scores(pred[missing], gold[missing], self.mcq_credit)
        device = self.device
        self.question.append(qids.to(device))
        self.strategy.append(sids.to(device))
        self.score.append(values.to(device))
        self.pred.append(pred.to(device))
        self.gold.append(gold.to(device))
        self.course.append(self._course_ids(course_ids, size).to(device))

    def compute(self) -> dict[str, Tensor]:
        """Deduplicate on (question, strategy) and aggregate; see the class docstring for the keys.

        Raises:
            ValueError: If a question lacks a record for some strategy.
        """
        question = _cat(self.question)
        if question is None or question.numel() == 0:
            return {}
        strategy, score, pred, course = (_cat(x) for x in (self.strategy, self.score, self.pred, self.course))
        question, strategy, score, pred, course = (t.cpu() for t in (question, strategy, score, pred, course))
        num_strategies = len(self.strategies)
        key = question * num_strategies + strategy
        unique_keys, inverse = torch.unique(key, return_inverse=True)
        order = torch.arange(key.numel())
        first = torch.full((unique_keys.numel(),), key.numel(), dtype=torch.int64)
        first = first.scatter_reduce(0, inverse, order, reduce="amin")  # first record of each (question, strategy)
        question, strategy, score, pred, course = (t[first] for t in (question, strategy, score, pred, course))
        questions, row = torch.unique(question, return_inverse=True)
        num_questions = questions.numel()
        filled = torch.zeros(num_questions, num_strategies, dtype=torch.bool)
        filled[row, strategy] = True
        if not filled.all():
            q, s = (~filled).nonzero()[0].tolist()
            raise ValueError(
                f"{int((~filled).sum())} (question, strategy) record(s) are missing, e.g. question "
                f"{int(questions[q])} for strategy {self.strategies[s]!r}: every question needs every strategy."
            )
        scores = torch.zeros(num_questions, num_strategies, dtype=torch.float64)
        answers = torch.zeros(num_questions, num_strategies, dtype=torch.int64)
        scores[row, strategy] = score
        answers[row, strategy] = pred
        agg = exam_aggregates(scores, answers, strategies=self.strategies, tie=self.majority_tie)
        out = {k: v for k, v in agg.items() if k.startswith(("acc", "unparsed"))}
        out["num_questions"] = torch.tensor(float(num_questions), dtype=torch.float64)

        question_course = torch.full((num_questions,), -1, dtype=torch.int64)
        question_course[row] = course
        if (question_course >= 0).any():
            known = question_course >= 0
            names = [
                self.courses[int(c)] if int(c) < len(self.courses) else str(int(c)) for c in question_course[known]
            ]
            per_course, per_program = course_pass_rates(
                agg[f"question_{self.course_aggregate}"][known], names, self.course_program, self.pass_threshold
            )
            for name, acc in per_course.items():
                out[f"course_acc/{name}"] = torch.tensor(acc, dtype=torch.float64)
            passed = [acc >= self.pass_threshold - 1e-12 for acc in per_course.values()]
            out["pass_rate"] = torch.tensor(sum(passed) / len(passed), dtype=torch.float64)
            for program, rate in per_program.items():
                out[f"pass_rate/{program}"] = torch.tensor(rate, dtype=torch.float64)
        return out
