"""Exam outcome aggregates (arXiv:2408.11841): hand-computed matrices, the chance table, pass rates, and the
ExamOutcomeMatrix metric under duplicated records and 2-process gloo runs (metric sync and ``trainer.test``)."""

from __future__ import annotations

import itertools
import os
import socket
from collections import Counter
from fractions import Fraction

import lightning as L
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from lightning_epfl.datamodules.exam import ExamDataModule, fixture_exam_path, load_exam, save_exam
from lightning_epfl.functional.exam import (
    DEFAULT_GRADE_SCORES,
    GRADE_LABELS,
    answer_bitmask,
    chance_table,
    course_pass_rates,
    exam_aggregates,
    majority_vote,
    mcq_scores,
)
from lightning_epfl.metrics import ExamOutcomeMatrix

STRATEGIES = ["s1", "s2", "s3"]


def _bool_masks(sets, num_options):
    """Nested lists of index sets -> bool mask tensor with a trailing option dim."""
    flat = torch.zeros(*_shape(sets), num_options, dtype=torch.bool)
    for idx in itertools.product(*[range(n) for n in _shape(sets)]):
        item = sets
        for i in idx:
            item = item[i]
        for o in item:
            flat[idx + (o,)] = True
    return flat


def _shape(sets):
    shape = []
    while isinstance(sets, list):
        shape.append(len(sets))
        sets = sets[0]
    return shape


# gold {0} for three questions; s1, s2, s3 answer (q3: s3 unparsed)
CHECK6 = [[{0}, {0}, {1}], [{0}, {1}, {2}], [{1}, {1}, set()]]


@pytest.mark.parametrize("encoding", ["bool", "bits"])
def test_aggregates_by_hand(encoding):
    if encoding == "bool":
        pred, gold = _bool_masks(CHECK6, 3), _bool_masks([{0}] * 3, 3)
    else:
        pred = torch.tensor([[answer_bitmask(s) for s in row] for row in CHECK6])
        gold = torch.tensor([answer_bitmask({0})] * 3)
    out = exam_aggregates(None, pred, gold, strategies=STRATEGIES)
    assert [float(out[f"acc/{s}"]) for s in STRATEGIES] == pytest.approx([2 / 3, 1 / 3, 0.0], abs=1e-12)
    assert float(out["acc_mean"]) == pytest.approx(1 / 3, abs=1e-12)
    assert float(out["acc_majority"]) == pytest.approx(2 / 3, abs=1e-12)
    assert float(out["acc_any"]) == pytest.approx(2 / 3, abs=1e-12)
    assert [float(out[f"unparsed/{s}"]) for s in STRATEGIES] == pytest.approx([0, 0, 1 / 3])
    tie_wrong = exam_aggregates(None, pred, gold, strategies=STRATEGIES, tie="tie_wrong")
    assert float(tie_wrong["acc_majority"]) == pytest.approx(1 / 3, abs=1e-12)
    assert out["question_majority"].tolist() == [1.0, 1.0, 0.0]
    assert tie_wrong["question_majority"].tolist() == [1.0, 0.0, 0.0]
    assert out["scores"].shape == (3, 3)


def test_majority_ties_both_modes():
    gold = torch.tensor([answer_bitmask({0})] * 5)
    answers = [
        [{1}, {0}, {1}, {0}],  # 2-2 tie, the earliest strategy's answer is wrong
        [{0}, {1}, {0}, {1}],  # 2-2 tie, the earliest strategy's answer is right
        [set(), {0}, {1}, set()],  # 1-1 tie among the parsed answers; abstentions do not vote
        [set(), set(), set(), set()],  # everyone abstains
        [{2}, {0}, {0}, {1}],  # clear majority {0} although s1 answered first
    ]
    pred = torch.tensor([[answer_bitmask(s) for s in row] for row in answers])
    first = exam_aggregates(None, pred, gold, tie="first_in_order")["question_majority"]
    wrong = exam_aggregates(None, pred, gold, tie="tie_wrong")["question_majority"]
    assert first.tolist() == [0.0, 1.0, 1.0, 0.0, 1.0]
    assert wrong.tolist() == [0.0, 0.0, 0.0, 0.0, 1.0]


def test_multi_answer_exact_and_partial_credit():
    # gold {0, 2}; s1 exact, s2 misses one option, s3 adds a wrong one, s4 unparsed
    answers = [[{0, 2}, {0}, {0, 2, 3}, set()], [{0, 2}, {0, 2}, {1}, {1}]]
    pred = _bool_masks(answers, 4)
    gold = _bool_masks([{0, 2}, {0, 2}], 4)
    exact = exam_aggregates(None, pred, gold)
    assert exact["scores"].tolist() == [[1, 0, 0, 0], [1, 1, 0, 0]]
    # q1: three one-vote answers, q2: a 2-2 tie; the earliest strategy's {0, 2} wins both under first_in_order
    assert float(exact["acc_majority"]) == 1.0
    assert float(exam_aggregates(None, pred, gold, tie="tie_wrong")["acc_majority"]) == 0.0
    partial = exam_aggregates(None, pred, gold, mcq_credit="partial")
    assert partial["scores"].flatten().tolist() == pytest.approx([1, 1 / 2, 2 / 3, 0, 1, 1, 0, 0])
    assert float(partial["acc/0"]) == pytest.approx(1.0)
    assert float(partial["acc/2"]) == pytest.approx(1 / 3)
    assert float(partial["acc_any"]) == pytest.approx(1.0)
    assert mcq_scores(torch.tensor([5]), torch.tensor([5])).tolist() == [1.0]


def test_open_answer_scores_and_grade_keys():
    # open answers: the grade label is the vote key, the score comes from the judge
    labels = [["correct", "almost correct", "correct"], ["wrong answer", "almost correct", "almost correct"]]
    pred = torch.tensor([[answer_bitmask({GRADE_LABELS.index(x)}) for x in row] for row in labels])
    scores = torch.tensor([[DEFAULT_GRADE_SCORES[x] for x in row] for row in labels], dtype=torch.float64)
    out = exam_aggregates(scores, pred)
    assert out["question_majority"].tolist() == pytest.approx([1.0, 2 / 3])
    assert out["question_any"].tolist() == pytest.approx([1.0, 2 / 3])
    assert float(out["acc_mean"]) == pytest.approx((1 + 2 / 3 + 1 + 0 + 2 / 3 + 2 / 3) / 6)


def test_majority_vote_direct():
    answers = torch.tensor([[1, 2, 2], [4, 0, 0]])
    scores = torch.tensor([[1.0, 0.0, 0.0], [1.0, 0.0, 0.0]])
    assert majority_vote(answers, scores).tolist() == [0.0, 1.0]


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"scores": None, "pred_masks": torch.zeros(2, 3, dtype=torch.long)}, "gold_masks"),
        (
            {"scores": None, "pred_masks": torch.ones(2, 3, dtype=torch.long), "gold_masks": torch.zeros(2).long()},
            "gold",
        ),
        ({"scores": torch.ones(2, 2), "pred_masks": torch.ones(2, 3, dtype=torch.long)}, "scores"),
        ({"scores": torch.full((2, 3), 2.0), "pred_masks": torch.ones(2, 3, dtype=torch.long)}, r"\[0, 1\]"),
        ({"scores": torch.ones(2, 3), "pred_masks": torch.ones(2, 3, dtype=torch.long), "tie": "random"}, "tie"),
        (
            {
                "scores": None,
                "pred_masks": torch.ones(2, 3).long(),
                "gold_masks": torch.ones(2).long(),
                "mcq_credit": "x",
            },
            "mcq_credit",
        ),
        (
            {"scores": torch.ones(2, 3), "pred_masks": torch.ones(2, 3).long(), "strategies": ["a", "a", "b"]},
            "strategies",
        ),
        ({"scores": None, "pred_masks": torch.ones(2, 3)}, "dtype"),
        ({"scores": None, "pred_masks": torch.zeros(0, 3).long(), "gold_masks": torch.ones(0).long()}, "at least one"),
    ],
)
def test_aggregate_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        exam_aggregates(**kwargs)


# --------------------------------------------------------------------------------------------------------------------
# chance table
# --------------------------------------------------------------------------------------------------------------------

CHANCE_TABLE = {  # published chance baselines of the aggregates, 6 decimals
    2: (0.5, 0.5, 0.363281, 0.996094),
    3: (0.333333, 0.333333, 0.237311, 0.960982),
    4: (0.25, 0.25, 0.187515, 0.899887),
    5: (0.2, 0.2, 0.141581, 0.832228),
}


def _brute_force(n: int, s: int = 8) -> dict[str, Fraction]:
    """Independent exact enumeration with Python integers (gold option 0)."""
    hits = Counter()
    for vector in itertools.product(range(n), repeat=s):
        counts = Counter(vector)
        top = max(counts.values())
        tied = [a for a in counts if counts[a] == top]
        earliest = min(tied, key=vector.index)
        hits["mean"] += vector.count(0)
        hits["majority_first_in_order"] += earliest == 0
        hits["majority_tie_wrong"] += len(tied) == 1 and tied[0] == 0
        hits["any"] += 0 in counts
    total = n**s
    return {k: Fraction(v, total * (s if k == "mean" else 1)) for k, v in hits.items()}


@pytest.mark.parametrize("n", [2, 3, 4])
def test_chance_table_matches_exact_enumeration(n):
    got = chance_table(n)
    exact = _brute_force(n)
    for key, value in exact.items():
        assert got[key] == pytest.approx(float(value), abs=1e-12)
    assert got["any"] == pytest.approx(1 - (1 - 1 / n) ** 8, abs=1e-12)
    assert got["mean"] == pytest.approx(1 / n, abs=1e-12)


def test_chance_table_4_options_to_1e12():
    """4**8 answer vectors: chance_table, exam_aggregates on the full grid and a Python count agree to 1e-12."""
    got = chance_table(4)
    exact = _brute_force(4)
    codes = torch.arange(4**8).unsqueeze(1)
    grid = (codes // 4 ** torch.arange(7, -1, -1)) % 4  # every answer vector once
    pred, gold = torch.ones_like(grid) << grid, torch.ones(4**8, dtype=torch.int64)
    for tie in ("first_in_order", "tie_wrong"):
        agg = exam_aggregates(None, pred, gold, tie=tie)
        assert float(agg["acc_majority"]) == pytest.approx(float(exact[f"majority_{tie}"]), abs=1e-12)
        assert got[f"majority_{tie}"] == pytest.approx(float(exact[f"majority_{tie}"]), abs=1e-12)
        assert float(agg["acc_any"]) == pytest.approx(got["any"], abs=1e-12)
        assert float(agg["acc_mean"]) == pytest.approx(got["mean"], abs=1e-12)
    assert got["any"] == pytest.approx(float(Fraction(4**8 - 3**8, 4**8)), abs=1e-12)


@pytest.mark.parametrize("n", [2, 3, 4, 5])
def test_chance_table_reproduces_published_table(n):
    got = chance_table(n)
    keys = ("mean", "majority_first_in_order", "majority_tie_wrong", "any")
    assert [got[k] for k in keys] == pytest.approx(CHANCE_TABLE[n], abs=5e-7)


def test_chance_table_errors():
    with pytest.raises(ValueError, match="num_options"):
        chance_table(1)
    with pytest.raises(ValueError, match="num_strategies"):
        chance_table(4, 0)
    with pytest.raises(ValueError, match="num_strategies"):
        chance_table(4, 33)
    with pytest.raises(ValueError, match="num_options"):
        chance_table(63)
    assert chance_table(10)["any"] == pytest.approx(1 - 0.9**8, abs=1e-12)  # large tables stay cheap


# --------------------------------------------------------------------------------------------------------------------
# pass rates
# --------------------------------------------------------------------------------------------------------------------


def test_pass_rate_half_and_just_below():
    # course a: 50/100 correct (0.5, passes), course b: 49/100 (0.49, fails), one program
    correct = [1.0] * 50 + [0.0] * 50 + [1.0] * 49 + [0.0] * 51
    courses = ["a"] * 100 + ["b"] * 100
    per_course, per_program = course_pass_rates(correct, courses, {"a": "P", "b": "P"}, threshold=0.5)
    assert per_course == pytest.approx({"a": 0.5, "b": 0.49})
    assert per_program == {"P": 0.5}
    _, lenient = course_pass_rates(correct, courses, {"a": "P", "b": "P"}, threshold=0.49)
    assert lenient == {"P": 1.0}
    _, none = course_pass_rates(correct, courses, None)
    assert none == {}
    _, partial_map = course_pass_rates(correct, courses, {"a": "P"})
    assert partial_map == {"P": 1.0}


def test_pass_rate_errors():
    with pytest.raises(ValueError, match="threshold"):
        course_pass_rates([1.0], ["a"], None, threshold=1.5)
    with pytest.raises(ValueError, match="same non-zero length"):
        course_pass_rates([1.0, 0.0], ["a"], None)


# --------------------------------------------------------------------------------------------------------------------
# metric
# --------------------------------------------------------------------------------------------------------------------


def _records():
    """(question, strategy, pred set, gold set, course) for CHECK6 plus a second course."""
    rows = []
    for q, answers in enumerate(CHECK6):
        for s, pred in zip(STRATEGIES, answers):
            rows.append((q, s, pred, {0}, "c1"))
    for s, pred in zip(STRATEGIES, [{1}, {1}, {1}]):
        rows.append((3, s, pred, {1}, "c2"))
    return rows


def _feed(metric, rows):
    for q, s, pred, gold, course in rows:
        metric.update([q], [s], None, [pred], [gold], [course])


def _metric(**kw):
    return ExamOutcomeMatrix(STRATEGIES, course_program={"c1": "P", "c2": "P"}, **kw)


def _as_floats(out):
    return {k: float(v) for k, v in out.items()}


def test_metric_matches_hand_values():
    metric = _metric()
    _feed(metric, _records())
    out = _as_floats(metric.compute())
    assert out["acc/s1"] == pytest.approx(3 / 4)
    assert out["acc/s3"] == pytest.approx(1 / 4)
    assert out["acc_majority"] == pytest.approx(3 / 4)
    assert out["acc_any"] == pytest.approx(3 / 4)
    assert out["course_acc/c1"] == pytest.approx(2 / 3)
    assert out["course_acc/c2"] == pytest.approx(1.0)
    assert out["pass_rate"] == 1.0 and out["pass_rate/P"] == 1.0
    assert out["num_questions"] == 4
    tie_wrong = ExamOutcomeMatrix(STRATEGIES, majority_tie="tie_wrong", course_program={"c1": "P", "c2": "P"})
    _feed(tie_wrong, _records())
    assert float(tie_wrong.compute()["acc_majority"]) == pytest.approx(2 / 4)
    strict = _metric(pass_threshold=0.7)
    _feed(strict, _records())
    assert float(strict.compute()["pass_rate/P"]) == pytest.approx(0.5)


def test_metric_duplicates_change_nothing():
    reference = _metric()
    _feed(reference, _records())
    expected = _as_floats(reference.compute())
    duplicated = _metric()
    rows = _records()
    generator = torch.Generator().manual_seed(0)
    shuffled = [rows[i] for i in torch.randperm(len(rows), generator=generator).tolist()]
    _feed(duplicated, shuffled + rows[:5] + rows)  # padding-style duplicates, in another order
    assert _as_floats(duplicated.compute()) == pytest.approx(expected, abs=1e-12)


def test_metric_batched_update_and_encodings():
    metric = _metric()
    rows = _records()
    metric.update(
        torch.tensor([r[0] for r in rows]),
        [r[1] for r in rows],
        None,
        _bool_masks([r[2] for r in rows], 4),
        torch.tensor([answer_bitmask(r[3]) for r in rows]),
        [r[4] for r in rows],
    )
    reference = _metric()
    _feed(reference, rows)
    assert _as_floats(metric.compute()) == pytest.approx(_as_floats(reference.compute()))


def test_metric_open_scores_and_partial_credit():
    metric = ExamOutcomeMatrix(["a", "b"], mcq_credit="partial")
    metric.update([0, 0], ["a", "b"], None, [{0}, {0, 1}], [{0, 1}, {0, 1}])
    correct = {GRADE_LABELS.index("correct")}  # an open answer's vote key
    metric.update([1, 1], ["a", "b"], [1.0, float("nan")], [correct, {0}], [set(), {0}])  # NaN: from the masks
    out = _as_floats(metric.compute())
    assert out["acc/a"] == pytest.approx((0.5 + 1.0) / 2)
    assert out["acc/b"] == pytest.approx((1.0 + 1.0) / 2)
    assert "pass_rate" not in out


@pytest.mark.filterwarnings("ignore:The ``compute`` method")
def test_metric_empty_and_reset():
    metric = _metric()
    assert metric.compute() == {}
    _feed(metric, _records())
    metric.reset()
    assert metric.compute() == {}


@pytest.mark.parametrize(
    ("update", "match"),
    [
        (lambda m: m.update([0], ["zero_shot"], None, [{0}], [{0}]), "unknown strategy"),
        (lambda m: m.update(["q1"], ["s1"], None, [{0}], [{0}]), "integers"),
        (lambda m: m.update([0], ["s1"], None, [{0}], [set()]), "gold"),
        (lambda m: m.update([0], ["s1"], [1.5], [{0}], None), r"\[0, 1\]"),
        (lambda m: m.update([0, 1], ["s1"], None, [{0}], [{0}]), "strategy_ids"),
        (lambda m: m.update([0], ["s1"], None, [{70}], [{0}]), "pred_masks"),
        (lambda m: m.update([0], ["s1"], None, [{0}], [{0}], ["unknown_course"]), "unknown course"),
    ],
)
def test_metric_update_errors(update, match):
    with pytest.raises(ValueError, match=match):
        update(_metric())


def test_metric_missing_record_and_init_errors():
    metric = _metric()
    metric.update([0, 0], ["s1", "s2"], None, [{0}, {0}], [{0}, {0}])
    with pytest.raises(ValueError, match="missing"):
        metric.compute()
    for kwargs, match in [
        ({"strategies": []}, "strategies"),
        ({"strategies": ["a", "a"]}, "distinct"),
        ({"strategies": ["a"], "majority_tie": "coin"}, "majority_tie"),
        ({"strategies": ["a"], "pass_threshold": 2}, "pass_threshold"),
        ({"strategies": ["a"], "course_aggregate": "max"}, "course_aggregate"),
        ({"strategies": ["a"], "course_program": {"P": ["a"], "Q": ["a"]}}, "two programs"),
    ]:
        with pytest.raises(ValueError, match=match):
            ExamOutcomeMatrix(**kwargs)


def test_metric_course_programs_from_program_lists():
    metric = ExamOutcomeMatrix(STRATEGIES, course_program={"_comment": "x", "P": ["c1"], "Q": ["c2"]})
    _feed(metric, _records())
    out = _as_floats(metric.compute())
    assert out["pass_rate/P"] == 1.0 and out["pass_rate/Q"] == 1.0


# --------------------------------------------------------------------------------------------------------------------
# two processes
# --------------------------------------------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _sync_worker(rank: int, world: int, port: int, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    rows = _records()
    shard = rows[rank::world]
    if rank == 1:
        shard = shard + rows[:2]  # the padding a distributed sampler adds: repeats of the first samples
    metric = ExamOutcomeMatrix(STRATEGIES, courses=["c1", "c2"], course_program={"c1": "P", "c2": "P"})
    _feed(metric, shard)
    result = _as_floats(metric.compute())
    if rank == 0:
        torch.save(result, os.path.join(out, "sync.pt"))
    dist.barrier()
    dist.destroy_process_group()


def test_metric_syncs_across_two_gloo_processes(tmp_path):
    mp.start_processes(_sync_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True, start_method="fork")
    reference = _metric()
    _feed(reference, _records())
    got = torch.load(tmp_path / "sync.pt")
    assert got == pytest.approx(_as_floats(reference.compute()), abs=1e-12)


class _ScriptedExamModule(L.LightningModule):
    """Answers every fixture question under three strategies with a fixed rule; feeds ExamOutcomeMatrix."""

    def __init__(self, courses, course_program):
        super().__init__()
        self.anchor = torch.nn.Parameter(torch.zeros(1))
        self.metric = ExamOutcomeMatrix(STRATEGIES, courses=courses, course_program=course_program)
        self.records = 0
        self.rows: list[tuple[int, int, float]] = []  # (question, strategy, score) as fed, duplicates included
        self.result: dict[str, float] = {}

    def test_step(self, batch, batch_idx):
        for question in batch:
            q = question["index"]
            for k, strategy in enumerate(STRATEGIES):
                if question["question_type"] == "mcq":
                    n = len(question["options"])
                    pred = set() if (q + k) % 5 == 0 else {(q * k + q) % n}
                    self.metric.update(
                        [q], [strategy], None, [pred], [question["answer_indices"]], [question["course_id"]]
                    )
                else:
                    label = GRADE_LABELS[(q + k) % 4]
                    score = 1.0 if label == "correct" else 0.0
                    key = {GRADE_LABELS.index(label)}
                    self.metric.update([q], [strategy], [score], [key], None, [question["course_id"]])
                self.records += 1
                self.rows.append((q, k, float(self.metric.score[-1][-1])))

    def on_test_epoch_end(self):
        self.result = {k: float(v) for k, v in self.metric.compute().items()}
        self.log_dict({f"test/{k}": v for k, v in self.result.items()}, rank_zero_only=True)


def _exam_file(folder: str) -> str:
    path = os.path.join(folder, "seven.jsonl")
    if not os.path.exists(path):
        save_exam(load_exam(fixture_exam_path())[:7], path)  # odd: the sampler pads one duplicate
    return path


def _run_test(folder: str, devices: int) -> _ScriptedExamModule:
    data = ExamDataModule(_exam_file(folder), batch_size=2)
    data.setup()
    module = _ScriptedExamModule(data.course_ids, data.course_program)
    trainer = L.Trainer(
        accelerator="cpu",
        devices=devices,
        strategy="ddp" if devices > 1 else "auto",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=folder,
    )
    trainer.test(module, datamodule=data, verbose=False)
    return module


def _trainer_worker(rank: int, world: int, port: int, out: str) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), LOCAL_RANK=str(rank), NODE_RANK="0", WORLD_SIZE=str(world)
    )
    torch.set_num_threads(1)
    module = _run_test(out, devices=world)
    records, rows = [None] * world, [None] * world
    dist.all_gather_object(records, module.records)
    dist.all_gather_object(rows, module.rows)
    if rank == 0:
        torch.save({"result": module.result, "records": records, "rows": rows}, os.path.join(out, "ddp.pt"))
    dist.barrier()
    dist.destroy_process_group()


def test_two_process_trainer_test_matches_single_process(tmp_path):
    """2-process gloo DDP ``trainer.test``: the sampler's padding duplicate does not change any metric."""
    _exam_file(str(tmp_path))
    mp.start_processes(_trainer_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True, start_method="fork")
    got = torch.load(tmp_path / "ddp.pt")
    assert sum(got["records"]) == 8 * len(STRATEGIES)  # 7 questions padded to 8: one duplicated question
    single = _run_test(str(tmp_path), devices=1)
    assert single.records == 7 * len(STRATEGIES)
    assert got["result"] == pytest.approx(single.result, abs=1e-12)
    # without the deduplication the repeated question would be counted twice
    rows = [r for part in got["rows"] for r in part]
    naive = [sum(r[2] for r in rows if r[1] == k) / sum(1 for r in rows if r[1] == k) for k in range(len(STRATEGIES))]
    assert naive != pytest.approx([single.result[f"acc/{s}"] for s in STRATEGIES], abs=1e-6)
    assert "pass_rate/mathematics" in single.result and "course_acc/intro_programming" in single.result
