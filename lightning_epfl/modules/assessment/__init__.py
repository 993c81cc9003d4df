"""Exam evaluation of causal LMs under the eight prompting strategies of arXiv:2408.11841 (Borges et al., PNAS 2024).

* :mod:`~lightning_epfl.modules.assessment.strategies`: the strategies as chat templates and generation loops, their
  registry and the one-shot demonstration retrieval;
* :mod:`~lightning_epfl.modules.assessment.generation`: batched generation and option scoring with local models;
* :mod:`~lightning_epfl.modules.assessment.judges`: graders of open answers (local LM, reference-match proxy, export
  for human grading);
* :mod:`~lightning_epfl.modules.assessment.evaluator`: :class:`ExamEvaluator`, the ``LightningModule``.
"""

from lightning_epfl.modules.assessment.evaluator import ExamEvaluator, loglikelihood_choice
from lightning_epfl.modules.assessment.generation import (
    TINY_RANDOM_MODEL,
    HFGenerator,
    ScriptedGenerator,
    render_plain,
    resolve_pretrained_path,
    tiny_random_chat_model,
)
from lightning_epfl.modules.assessment.judges import (
    ExportOnlyJudge,
    JudgeRequest,
    JudgeResult,
    LocalLMJudge,
    OpenAnswerJudge,
    ReferenceMatchJudge,
)
from lightning_epfl.modules.assessment.strategies import (
    ALL_STRATEGIES,
    STRATEGIES,
    BaseStrategy,
    ChatMessage,
    ContextBudget,
    ExpertPrompting,
    FourShotCoT,
    GenerateFn,
    GenerationSettings,
    Metacognitive,
    OneShot,
    PromptStrategy,
    SelfRefine,
    SingleCallStrategy,
    StrategyJob,
    StrategyResult,
    TreeOfThought,
    ZeroShot,
    ZeroShotCoT,
    get_strategy,
    run_batched,
    select_one_shot_demo,
)

__all__ = [
    "ALL_STRATEGIES",
    "STRATEGIES",
    "TINY_RANDOM_MODEL",
    "BaseStrategy",
    "ChatMessage",
    "ContextBudget",
    "ExamEvaluator",
    "ExpertPrompting",
    "ExportOnlyJudge",
    "FourShotCoT",
    "GenerateFn",
    "GenerationSettings",
    "HFGenerator",
    "JudgeRequest",
    "JudgeResult",
    "LocalLMJudge",
    "Metacognitive",
    "OneShot",
    "OpenAnswerJudge",
    "PromptStrategy",
    "ReferenceMatchJudge",
    "ScriptedGenerator",
    "SelfRefine",
    "SingleCallStrategy",
    "StrategyJob",
    "StrategyResult",
    "TreeOfThought",
    "ZeroShot",
    "ZeroShotCoT",
    "get_strategy",
    "loglikelihood_choice",
    "render_plain",
    "resolve_pretrained_path",
    "run_batched",
    "select_one_shot_demo",
    "tiny_random_chat_model",
]
