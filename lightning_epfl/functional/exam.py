"""Exam answers and outcomes
==========================

Answer parsing and outcome aggregates for LLMs answering exam questions under several prompting strategies, after
Borges et al., *Could ChatGPT get an Engineering Degree? Evaluating Higher Education Vulnerability to AI
Assistants* (arXiv:2408.11841, PNAS 2024).

* :func:`parse_mcq_answer` reads the selected option(s) out of a generated text: first after the last answer cue
  (``"Final answer is"``, ``"Answer:"``, ``"La réponse est"``, ``"Réponse :"`` …), then from the strategy's own
  option labels, then from a unique exact match of an option's text.
* :func:`parse_grade_label` reads a judge's grade (``correct``, ``almost correct``, ``mostly incorrect``,
  ``wrong answer``) from a JSON ``grade`` field or from the text.
* :func:`exam_aggregates` turns a question × strategy outcome matrix into per-strategy accuracy, the mean over
  strategies, the majority vote and the any-strategy-correct rate.
* :func:`course_pass_rates` gives per-course accuracy and per-program pass rates (share of passed courses).
* :func:`chance_table` gives the same aggregates for uniform guessing by exact enumeration.

Answer sets are encoded either as boolean masks over the options (``[..., O]``) or as integer bit masks
(bit ``o`` set when option ``o`` is selected, at most :data:`MAX_OPTIONS` options); an empty set means the output
could not be parsed (the strategy abstains from the majority vote and scores 0). No Lightning import here.
"""

from __future__ import annotations

import functools
import json
import logging
import math
import re
import unicodedata
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from fractions import Fraction
from typing import NamedTuple

import torch
from torch import Tensor

log = logging.getLogger(__name__)

MAX_OPTIONS = 62
"""Largest number of options an answer bit mask can hold (bits 0..61 of an int64)."""

LABEL_SCHEMES = ("letters", "numbers")
PARSE_STATUSES = ("cue", "labels", "option_text", "unparsed")
MAJORITY_TIES = ("first_in_order", "tie_wrong")
MCQ_CREDITS = ("exact", "partial")

DEFAULT_ANSWER_CUES: dict[str, tuple[str, ...]] = {
    "en": (
        "Final answer is",
        "Final answer:",
        "The correct answers are",
        "The correct answer is",
        "The correct options are",
        "The correct option is",
        "The answers are",
        "The answer to the question is",
        "The answer is",
        "Answers:",
        "Answer:",
    ),
    "fr": (
        "La réponse finale est",
        "Réponse finale :",
        "Les bonnes réponses sont",
        "La bonne réponse est",
        "La réponse correcte est",
        "Les réponses sont",
        "La réponse à la question est",
        "La réponse est",
        "Réponses :",
        "Réponse :",
    ),
}
"""Answer cues per language. Matching is case-insensitive and tolerant to NFKC variants and non-breaking spaces
(``"Réponse\\u00a0:"`` matches ``"Réponse :"``), to any amount of white space between words and to none before a
colon; ``"is"``/``"est"`` also match ``"isn't"``/``"n'est"`` so that the negation stays visible to the parser."""

GRADE_LABELS = ("correct", "almost correct", "mostly incorrect", "wrong answer")
"""The four grades of the open-answer rubric, best first."""
GRADE_NOT_FOUND = "not found"
DEFAULT_GRADE_SCORES: dict[str, float] = {
    "correct": 1.0,
    "almost correct": 2.0 / 3.0,
    "mostly incorrect": 1.0 / 3.0,
    "wrong answer": 0.0,
    GRADE_NOT_FOUND: 0.0,
}
"""Default credit of each grade label (the label→score map of the paper is not published)."""


class ParsedAnswer(NamedTuple):
    """Options read from a generated answer.

    Attributes:
        indices: Selected option indices (0-based); empty when nothing could be read.
        status: How they were found: ``"cue"`` (after an answer cue), ``"labels"`` (option labels without a cue),
            ``"option_text"`` (a unique exact match of an option's text) or ``"unparsed"``.
    """

    indices: frozenset[int]
    status: str


# --------------------------------------------------------------------------------------------------------------------
# text normalisation and tokens
# --------------------------------------------------------------------------------------------------------------------

_LATEX_WRAP = re.compile(r"\\(?:boxed|text|textbf|mathrm|mathbf|fbox)\s*\{([^{}]*)\}")
_MARKUP = re.compile(r"[*`$]|__")
_MATH_DELIMITERS = re.compile(r"\\[\[\]()]")


def _normalize(text: str) -> str:
    """NFKC (maps non-breaking and narrow spaces to spaces), curly apostrophes to ``'``, LaTeX wrappers, math
    delimiters and markdown emphasis removed; case is kept (an upper-case ``A`` is read differently from the article
    ``a``)."""
    text = unicodedata.normalize("NFKC", text).replace("\u2019", "'").replace("\u2018", "'")
    for _ in range(3):  # nested \boxed{\text{B}}
        text, n = _LATEX_WRAP.subn(r"\1", text)
        if not n:
            break
    text = _MATH_DELIMITERS.sub(" ", text)  # \[ ... \] and \( ... \) display / inline math
    return _MARKUP.sub("", text)


_TOKEN = re.compile(
    r"(?P<bracket>[\[(]\s*(?:[A-Za-z]|\d{1,2})\s*[\])]|\[\s*(?:[A-Z]|\d{1,2})\s*:(?=\s*[^\W\d_]))"
    r"|(?P<neg>n't(?![^\W_]))"
    r"|(?P<decimal>\d+(?:[.,]\d+)+)"
    r"|(?P<word>[^\W\d_]+(?:'[^\W\d_]+)*|\d+)"
    r"|(?P<newline>\n)"
    r"|(?P<punct>[^\w\s])"
)


class _Tok(NamedTuple):
    kind: str
    text: str


def _tokens(text: str) -> list[_Tok]:
    return [_Tok(m.lastgroup or "punct", m.group(0)) for m in _TOKEN.finditer(text)]


_NEGATIONS = frozenset(
    {"not", "n't", "isn't", "aren't", "n'est", "pas", "non", "never", "jamais", "ni", "nor", "except", "sauf"}
)
# words after which a bare label still reads as a label ("B is correct", "A and C", "not A but C")
_FOLLOW_WORDS = frozenset(
    {
        "and", "et", "or", "ou", "but", "mais", "nor", "ni", "is", "are", "est", "sont", "because", "since", "as",
        "car", "puisque", "parce", "which", "qui", "seems", "semble", "would", "should", "correct", "right", "juste",
        "true", "vrai", "vraie", "wrong", "incorrect", "false", "faux", "fausse",
    }
)  # fmt: skip
_FOLLOW_PUNCT = frozenset(".,;:!?)]-–—&+")
_SEPARATOR_WORDS = frozenset({"and", "et"})
_SEPARATOR_PUNCT = frozenset(",;&+")
_OPTION_WORDS = frozenset({"option", "options", "choice", "choices", "l'option", "answer", "réponse", "choix"})
# words that may stand between a cue and the label ("The answer is clearly option B", "Réponse : c'est la B")
_FILLER_WORDS = frozenset(
    {
        "the", "is", "are", "be", "it", "it's", "its", "that", "this", "so", "thus", "therefore", "hence", "then",
        "clearly", "probably", "likely", "definitely", "indeed", "only", "both", "final", "correct", "right", "best",
        "letter", "number", "numbers", "answer", "answers", "option", "options", "choice", "choices", "i", "we",
        "think", "believe", "would", "should", "say", "choose", "pick", "select", "go", "with", "but", "rather",
        "instead", "one", "ones", "je", "pense", "crois", "que", "qu'il", "c'est", "ce", "sont", "est", "la", "le",
        "les", "l'option", "l'affirmation", "réponse", "réponses", "bonne", "bonnes", "correcte", "correctes",
        "finale", "donc", "ainsi", "alors", "plutôt", "mais", "choix", "proposition", "propositions", "seule",
        "seulement", "uniquement", "numéro", "lettre",
    }
)  # fmt: skip
_FILLER_PUNCT = frozenset(":-–—=.,;'\"«»“”()#>{}")
_WRONG_WORDS = frozenset(
    {"wrong", "incorrect", "false", "erroneous", "faux", "fausse", "fausses", "incorrecte", "incorrectes"}
)


def _label_value(tok: _Tok, scheme: str, num_options: int) -> tuple[int, str] | None:
    """``(index, style)`` when ``tok`` names an option under ``scheme``; style ``bracket``, ``upper``, ``lower``."""
    text = tok.text
    style = "bare"
    if tok.kind == "bracket":
        text = text[1:-1].strip()
        style = "bracket"
    elif tok.kind != "word":
        return None
    if scheme == "letters":
        if len(text) != 1 or not ("a" <= text.lower() <= "z"):
            return None
        index = ord(text.upper()) - ord("A")
        if style == "bare":
            style = "upper" if text.isupper() else "lower"
    else:
        if not text.isdigit() or len(text) > 2:
            return None
        index = int(text) - 1
        if style == "bare":
            style = "upper"  # digits carry no case: read like an upper-case letter
    if not 0 <= index < num_options:
        return None
    return index, style


def _follows_label(nxt: _Tok | None, style: str) -> bool:
    """Whether the token after a bare label lets it read as a label (``"A common mistake"`` does not)."""
    if style == "bracket" or nxt is None or nxt.kind == "newline":
        return True
    if nxt.kind == "punct":
        return nxt.text in _FOLLOW_PUNCT
    if nxt.kind in ("word", "neg"):
        words = _SEPARATOR_WORDS if style == "lower" else _FOLLOW_WORDS
        return nxt.text.casefold() in words
    return False


def _run_at(toks: list[_Tok], i: int, scheme: str, n: int, allow_lower: bool) -> tuple[frozenset[int], int] | None:
    """Read a run of labels joined by separators (``"B and D"``, ``"1, 3"``) starting at token ``i``."""
    found: list[int] = []
    styles: set[str] = set()
    j = i
    end = i
    while j < len(toks):
        value = _label_value(toks[j], scheme, n)
        if value is None:
            break
        index, style = value
        if (style == "lower" and not allow_lower) or not _follows_label(
            toks[j + 1] if j + 1 < len(toks) else None, style
        ):
            if found and "lower" in styles | {style}:
                return None  # "a and b are ...": lower-case letters joined to a non-label are words, not answers
            break
        found.append(index)
        styles.add(style)
        end = j + 1
        # separators, then an optional "option" word, before the next label
        k = end
        saw_sep = False
        while k < len(toks) and (
            (toks[k].kind == "punct" and toks[k].text in _SEPARATOR_PUNCT)
            or (toks[k].kind == "word" and toks[k].text.casefold() in _SEPARATOR_WORDS)
        ):
            k += 1
            saw_sep = True
        if not saw_sep:
            break
        while k < len(toks) and toks[k].kind == "word" and toks[k].text.casefold() in _OPTION_WORDS:
            k += 1
        j = k
    if not found:
        return None
    return frozenset(found), end


def _scan(toks: list[_Tok], scheme: str, n: int, allow_lower: bool) -> frozenset[int] | None:
    """Skip filler words and negated labels from the start of ``toks``; return the first affirmed label run."""
    negated = False
    i = 0
    while i < len(toks):
        run = _run_at(toks, i, scheme, n, allow_lower)
        if run is not None:
            labels, i = run
            # "A and C are wrong": the run is denied by what follows it
            tail = [t.text.casefold() for t in toks[i : i + 3] if t.kind == "word"]
            denied = next((k for k, w in enumerate(tail) if w in _WRONG_WORDS), None)
            if negated or denied is not None:
                negated = False
                if denied is not None:
                    while i < len(toks) and toks[i].text.casefold() not in _WRONG_WORDS:
                        i += 1
                    i += 1
                continue
            return labels
        tok = toks[i]
        low = tok.text.casefold()
        if tok.kind == "neg" or (tok.kind == "word" and low in _NEGATIONS):
            negated = True
        elif not (
            tok.kind == "newline"
            or (tok.kind == "word" and low in _FILLER_WORDS)
            or (tok.kind == "punct" and tok.text in _FILLER_PUNCT)
        ):
            return None
        i += 1
    return None


# --------------------------------------------------------------------------------------------------------------------
# cues
# --------------------------------------------------------------------------------------------------------------------

_CUE_CACHE: dict[tuple[str, ...], re.Pattern] = {}


def _cue_body(cue: str) -> str:
    parts = re.findall(r"[^\W_]+(?:'[^\W_]+)*|[^\w\s]", _normalize(cue).casefold())
    if not parts:
        raise ValueError(f"`cues` entries must contain a word or a punctuation mark, got {cue!r}.")
    out = ""
    for k, part in enumerate(parts):
        if k:
            out += r"\s*" if not part[0].isalnum() else r"\s+"
        if part == "est":
            out += r"(?:n'\s*)?est"
        elif part == "is" and k == len(parts) - 1:
            out += r"is(?:(?=n't)|(?![^\W_]))"
            continue
        else:
            out += re.escape(part)
        if k == len(parts) - 1 and part[-1].isalnum():
            out += r"(?![^\W_])"
    return r"(?<![^\W_])" + out


def _cue_pattern(cues: tuple[str, ...]) -> re.Pattern | None:
    if not cues:
        return None
    if cues not in _CUE_CACHE:
        bodies = sorted({_cue_body(c) for c in cues}, key=len, reverse=True)
        _CUE_CACHE[cues] = re.compile("|".join(f"(?:{b})" for b in bodies), re.IGNORECASE)
    return _CUE_CACHE[cues]


def _flatten_cues(cues: Sequence[str] | Mapping[str, Sequence[str]] | None) -> tuple[str, ...]:
    if cues is None:
        cues = DEFAULT_ANSWER_CUES
    if isinstance(cues, str):
        raise ValueError(f"`cues` must be a list of strings or a mapping language -> list of strings, got {cues!r}.")
    if isinstance(cues, Mapping):
        cues = [c for group in cues.values() for c in group]
    out = tuple(cues)
    if not all(isinstance(c, str) and c.strip() for c in out):
        raise ValueError(f"`cues` must hold non-empty strings, got {list(out)!r}.")
    return out


# --------------------------------------------------------------------------------------------------------------------
# option text
# --------------------------------------------------------------------------------------------------------------------

_EDGE = " \t\n.,;:!?\"'«»“”()[]{}"


def _norm_text(text: str) -> str:
    text = _normalize(text).casefold()
    return " ".join(text.split()).strip(_EDGE)


def _match_option_text(candidates: Iterable[tuple[str, bool]], options: Sequence[str]) -> int | None:
    """Index of the single option whose normalised text equals a candidate (or, where allowed, starts it)."""
    normed = [_norm_text(o) for o in options]
    for candidate, allow_prefix in candidates:
        cand = _norm_text(candidate)
        if not cand:
            continue
        exact = [k for k, o in enumerate(normed) if o and o == cand]
        if len(exact) == 1:
            return exact[0]
        if exact:
            continue  # two options with the same text: never unique
        if allow_prefix:
            hits = [
                k
                for k, o in enumerate(normed)
                if o and cand.startswith(o) and not cand[len(o)].isalnum() and normed.count(o) == 1
            ]
            # keep the most specific option: "0" and "0, 1" both start "0, 1 because ..."
            hits = [k for k in hits if not any(h != k and normed[h].startswith(normed[k]) for h in hits)]
            if len(hits) == 1:
                return hits[0]
    return None


# --------------------------------------------------------------------------------------------------------------------
# MCQ parser
# --------------------------------------------------------------------------------------------------------------------


def parse_mcq_answer(
    text: str,
    num_options: int,
    labels: str | None = None,
    cues: Sequence[str] | Mapping[str, Sequence[str]] | None = None,
    *,
    options: Sequence[str] | None = None,
) -> ParsedAnswer:
    """Read the option(s) a generated answer selects (the MCQ parser of the arXiv:2408.11841 evaluation).

    Three readings are tried in order; the first that yields options wins:

    1. **cue**: the text after an answer cue. Cues are tried from the last occurrence backwards, so the last cue
       followed by a readable answer wins (``"Answer: A … Final answer is C"`` → ``{C}``). Filler words may stand
       between the cue and the label (``"The answer is clearly option B"``); a negated label is skipped
       (``"the answer is not A but C"`` → ``{C}``, ``"La réponse n'est pas A mais C"`` → ``{C}``), as is a label
       denied by what follows it (``"A and C are wrong, B is"`` → ``{B}``).
    2. **labels**: the same reading without a cue, on the last non-empty line, then from the start of the text
       (``"B"``, ``"[B]"``, ``"(b)"``, ``"B and D"``, ``"1, 3"``, ``"2. Paris"``).
    3. **option_text**: the normalised text after a cue, the last line or the whole answer equals the text of
       exactly one option (after a cue, the option text may also start the answer: ``"Answer: Paris, because …"``).

    Labels: letters ``A``, ``B``, … or numbers ``1``, ``2``, … (1-based in the text, 0-based in the result), bare,
    bracketed (``[B]``, ``(b)``, ``(2)``, ``[B: <option text>]``) or followed by ``)``/``.``/``:``. A bare upper-case
    letter counts only when the next token allows it (end, punctuation, ``and``/``et``, ``is``/``est``, ``because`` …),
    so the article in ``"A common mistake …"`` and the pronoun in ``"I think …"`` are not answers; a bare lower-case
    letter counts only before punctuation, the end of the text or ``and``/``et`` (``"Answer: b."``), never as the
    article ``a`` of a sentence. Labels outside ``1..num_options`` are ignored; decimals (``2.5``, ``1,3``) are not
    labels. Markdown emphasis, ``$``, backticks and ``\\boxed{}``/``\\text{}`` wrappers are removed first; the text is
    NFKC-normalised (non-breaking spaces become spaces).

    Args:
        text: The generated answer.
        num_options: Number of options of the question, ``>= 1`` (at most 26 with letters, 99 with numbers).
        labels: Label scheme the prompt used: ``"letters"`` (default when ``None``) or ``"numbers"``.
        cues: Answer cues: a list of strings, a mapping language -> list (e.g. :data:`DEFAULT_ANSWER_CUES`), or
            ``None`` for every default cue of every language; an empty list skips the cue reading.
        options: The options' texts (length ``num_options``) for the option-text reading; ``None`` skips it.

    Returns:
        :class:`ParsedAnswer` ``(indices, status)``. Several indices when the answer names several options
        (scored against the gold set by the caller). An unparsed answer is logged at DEBUG level.

    Raises:
        ValueError: If ``text`` is not a string, ``num_options`` is out of range, ``labels`` is not one of
            ``"letters"``/``"numbers"``, ``cues`` holds an empty or non-string entry, or ``options`` does not have
            ``num_options`` entries.
    """
    if not isinstance(text, str):
        raise ValueError(f"`text` must be a string, got {type(text).__name__}.")
    scheme = "letters" if labels is None else labels
    if scheme not in LABEL_SCHEMES:
        raise ValueError(f"`labels` must be one of {list(LABEL_SCHEMES)} or None, got {labels!r}.")
    limit = 26 if scheme == "letters" else 99
    if isinstance(num_options, bool) or not isinstance(num_options, int) or not 1 <= num_options <= limit:
        raise ValueError(f"`num_options` must be an int in [1, {limit}] for labels={scheme!r}, got {num_options!r}.")
    if options is not None and len(options) != num_options:
        raise ValueError(f"`options` must have num_options={num_options} entries, got {len(options)}.")
    cue_list = _flatten_cues(cues)

    norm = _normalize(text)
    pattern = _cue_pattern(cue_list)
    segments = [norm[m.end() :] for m in pattern.finditer(norm)] if pattern is not None else []
    for segment in reversed(segments):
        found = _scan(_tokens(segment), scheme, num_options, allow_lower=True)
        if found:
            return ParsedAnswer(found, "cue")

    lines = [line for line in norm.splitlines() if line.strip()]
    if lines:
        for part in (lines[-1], norm):
            found = _scan(_tokens(part), scheme, num_options, allow_lower=True)
            if found:
                return ParsedAnswer(found, "labels")

    if options is not None and lines:
        candidates: list[tuple[str, bool]] = []
        for segment in reversed(segments):
            first_line = next((line for line in segment.splitlines() if line.strip()), "")
            candidates.append((first_line, True))
        candidates += [(lines[-1], False), (norm, False)]
        index = _match_option_text(candidates, options)
        if index is not None:
            return ParsedAnswer(frozenset({index}), "option_text")

    log.debug("Unparsed MCQ answer (%d options, labels=%s): %r", num_options, scheme, text[:200])
    return ParsedAnswer(frozenset(), "unparsed")


# --------------------------------------------------------------------------------------------------------------------
# grade labels
# --------------------------------------------------------------------------------------------------------------------

_GRADE_SYNONYMS = {
    "correct": "correct",
    "fully correct": "correct",
    "almost correct": "almost correct",
    "mostly correct": "almost correct",
    "mostly incorrect": "mostly incorrect",
    "mostly wrong": "mostly incorrect",
    "wrong answer": "wrong answer",
    "wrong": "wrong answer",
    "incorrect": "wrong answer",
}
_GRADE_ALTERNATIVES = "|".join(k.replace(" ", r"\s+") for k in sorted(_GRADE_SYNONYMS, key=len, reverse=True))
_GRADE_RE = re.compile(r"(?<![^\W_])(" + _GRADE_ALTERNATIVES + r")(?![^\W_])")
_GRADE_QUALIFIERS = frozenset({"not", "partially", "partly", "somewhat", "half", "barely", "never"})
_GRADE_CUE = re.compile(r"(?<![^\W_])grade\s*[:=]?\s*(?:is\s*)?[\"']?", re.IGNORECASE)
_JSON_OBJECT = re.compile(r"\{[^{}]*\}")


def _grade_in(text: str, anchored: bool = False) -> str | None:
    text = " ".join(_normalize(text).casefold().split())
    for m in _GRADE_RE.finditer(text):
        if anchored and m.start() != 0:
            return None
        before = text[: m.start()].split()
        if before and before[-1].strip(",;:") in _GRADE_QUALIFIERS:
            if anchored:
                return None
            continue
        return _GRADE_SYNONYMS[" ".join(m.group(1).split())]
    return None


def parse_grade_label(text: str) -> str:
    """Read a judge's grade for an open answer (the four-level rubric of arXiv:2408.11841).

    Order: the ``"grade"`` field of the first JSON object in the text that has one (key matched
    case-insensitively); then a ``grade:`` cue followed by a label; then the first label mentioned in the text.
    Labels are matched longest first on word boundaries, so ``"mostly incorrect"`` never reads as ``"correct"``
    or ``"incorrect"``; ``"mostly correct"`` reads as ``"almost correct"``, ``"wrong"``/``"incorrect"`` as
    ``"wrong answer"``; ``"correct"`` preceded by ``not``/``partially``/``partly``/``somewhat``/``half``/``barely``
    is skipped.

    Args:
        text: The judge's output.

    Returns:
        One of :data:`GRADE_LABELS`, or ``"not found"`` (:data:`GRADE_NOT_FOUND`).

    Raises:
        ValueError: If ``text`` is not a string.
    """
    if not isinstance(text, str):
        raise ValueError(f"`text` must be a string, got {type(text).__name__}.")
    for m in _JSON_OBJECT.finditer(text):
        try:
            obj = json.loads(m.group(0))
        except (json.JSONDecodeError, ValueError):
            continue
        if not isinstance(obj, dict):
            continue
        value = next((v for k, v in obj.items() if isinstance(k, str) and k.strip().casefold() == "grade"), None)
        if isinstance(value, str):
            label = _grade_in(value)
            if label is not None:
                return label
    for m in _GRADE_CUE.finditer(text):
        label = _grade_in(text[m.end() :], anchored=True)
        if label is not None:
            return label
    label = _grade_in(text)
    return GRADE_NOT_FOUND if label is None else label


# --------------------------------------------------------------------------------------------------------------------
# answer sets
# --------------------------------------------------------------------------------------------------------------------

_BITS = 2 ** torch.arange(MAX_OPTIONS, dtype=torch.int64)


def answer_bitmask(indices: Iterable[int]) -> int:
    """Bit mask of a set of option indices (bit ``o`` set for option ``o``); ``0`` for the empty set.

    Raises:
        ValueError: If an index is not an int in ``[0, MAX_OPTIONS)``.
    """
    mask = 0
    for index in indices:
        if isinstance(index, bool) or not isinstance(index, int) or not 0 <= index < MAX_OPTIONS:
            raise ValueError(f"option indices must be ints in [0, {MAX_OPTIONS}), got {index!r}.")
        mask |= 1 << index
    return mask


def _to_bits(masks: Tensor, name: str, ndim: int) -> Tensor:
    """Bool masks ``[..., O]`` or int bit masks ``[...]`` (``ndim`` leading dims) -> int64 bit masks."""
    if not isinstance(masks, Tensor):
        raise ValueError(f"`{name}` must be a torch.Tensor, got {type(masks).__name__}.")
    if masks.dtype == torch.bool:
        if masks.ndim != ndim + 1:
            raise ValueError(f"`{name}` as a bool mask must have {ndim + 1} dims, got shape {tuple(masks.shape)}.")
        if masks.shape[-1] > MAX_OPTIONS:
            raise ValueError(f"`{name}` has {masks.shape[-1]} options; at most {MAX_OPTIONS} are supported.")
        return (masks.long() * _BITS[: masks.shape[-1]].to(masks.device)).sum(-1)
    if masks.dtype in (torch.int64, torch.int32, torch.int16, torch.uint8, torch.int8):
        if masks.ndim != ndim:
            raise ValueError(f"`{name}` as an integer bit mask must have {ndim} dims, got shape {tuple(masks.shape)}.")
        masks = masks.long()
        if (masks < 0).any():
            raise ValueError(f"`{name}` bit masks must be >= 0.")
        return masks
    raise ValueError(f"`{name}` must be a bool mask or an integer bit mask, got dtype {masks.dtype}.")


def _popcount(bits: Tensor) -> Tensor:
    return ((bits.unsqueeze(-1) >> torch.arange(MAX_OPTIONS, device=bits.device)) & 1).sum(-1)


def mcq_scores(pred_masks: Tensor, gold_masks: Tensor, credit: str = "exact") -> Tensor:
    """Credit of predicted answer sets against gold sets.

    ``exact``: 1 when the predicted set equals the gold set, else 0 (multi-answer questions need every correct
    option and no other). ``partial``: the Jaccard index ``|P ∩ G| / |P ∪ G|``. An empty prediction scores 0.

    Args:
        pred_masks: Bool ``[..., O]`` or int64 bit masks ``[...]``.
        gold_masks: Same encoding, broadcastable against ``pred_masks``; every gold set non-empty.
        credit: ``"exact"`` (default) or ``"partial"``.

    Returns:
        Float64 tensor of the broadcast shape (without the option dim).

    Raises:
        ValueError: On an unknown ``credit``, a bad encoding or an empty gold set.
    """
    if credit not in MCQ_CREDITS:
        raise ValueError(f"`credit` must be one of {list(MCQ_CREDITS)}, got {credit!r}.")
    pred = _to_bits(pred_masks, "pred_masks", pred_masks.ndim - (pred_masks.dtype == torch.bool))
    gold = _to_bits(gold_masks, "gold_masks", gold_masks.ndim - (gold_masks.dtype == torch.bool))
    if (gold == 0).any():
        raise ValueError("`gold_masks` must hold at least one correct option per question.")
    if credit == "exact":
        return (pred == gold).double()
    inter = _popcount(pred & gold).double()
    union = _popcount(pred | gold).double()
    return inter / union


# --------------------------------------------------------------------------------------------------------------------
# aggregates
# --------------------------------------------------------------------------------------------------------------------


def majority_vote(answers: Tensor, scores: Tensor, tie: str = "first_in_order") -> Tensor:
    """Per-question credit of the majority answer over strategies.

    Strategies with an empty answer (``0``) abstain. The answer given by most strategies wins; its credit is that
    of the earliest strategy (in column order) giving it. On a tie between several answers, ``"first_in_order"``
    takes the tied answer of the earliest strategy and ``"tie_wrong"`` scores the question 0. A question where every
    strategy abstains scores 0.

    Args:
        answers: Int64 ``[Q, S]`` answer keys (bit masks of options, or label indices + 1); 0 = abstain.
        scores: ``[Q, S]`` credits.
        tie: ``"first_in_order"`` (default) or ``"tie_wrong"``.

    Returns:
        Float64 ``[Q]``.
    """
    if tie not in MAJORITY_TIES:
        raise ValueError(f"`tie` must be one of {list(MAJORITY_TIES)}, got {tie!r}.")
    q, s = answers.shape
    parsed = answers != 0
    same = (answers.unsqueeze(2) == answers.unsqueeze(1)) & parsed.unsqueeze(1) & parsed.unsqueeze(2)  # [Q, S, S]
    votes = same.sum(2)  # votes of each strategy's answer (0 when it abstains)
    top = votes.max(1, keepdim=True).values
    candidate = (votes == top) & parsed
    # a strategy represents its answer when no earlier strategy gave the same answer
    earlier = torch.tril(torch.ones(s, s, dtype=torch.bool, device=answers.device), diagonal=-1)
    representative = ~(same & earlier).any(2)
    groups = (candidate & representative).sum(1)
    first = torch.where(candidate, torch.arange(s, device=answers.device), s).min(1).values.clamp(max=s - 1)
    winner = scores.double().gather(1, first.unsqueeze(1)).squeeze(1)
    ok = parsed.any(1) & ((groups == 1) | (tie == "first_in_order"))
    return torch.where(ok, winner, torch.zeros_like(winner))


def exam_aggregates(
    scores: Tensor | None,
    pred_masks: Tensor,
    gold_masks: Tensor | None = None,
    *,
    strategies: Sequence[str] | None = None,
    tie: str = "first_in_order",
    mcq_credit: str = "exact",
) -> dict[str, Tensor]:
    """Aggregate a question × strategy outcome matrix (arXiv:2408.11841: per strategy, mean, majority, any).

    * ``acc/<strategy>``: mean credit of each strategy over the questions.
    * ``acc_mean``: mean over strategies of the per-strategy accuracy.
    * ``acc_majority``: mean over questions of the credit of the majority answer (see :func:`majority_vote`;
      unparsed outputs abstain, ties per ``tie``).
    * ``acc_any``: mean over questions of the best credit any strategy reached (1 when any strategy is correct).
    * ``unparsed/<strategy>``: share of questions where the strategy's answer set is empty.

    Args:
        scores: ``[Q, S]`` credits in ``[0, 1]`` (e.g. judge scores for open answers), or ``None`` to compute
            them from the answer sets with :func:`mcq_scores` and ``mcq_credit``.
        pred_masks: Answer sets, bool ``[Q, S, O]`` or int64 bit masks ``[Q, S]``; empty = unparsed (abstains).
            With ``scores`` given they only serve as vote keys: an open answer's grade can be encoded as a
            one-option set (e.g. the label's index in :data:`GRADE_LABELS`).
        gold_masks: Gold sets, bool ``[Q, O]`` or int64 bit masks ``[Q]``; required when ``scores`` is ``None``.
        strategies: Names of the ``S`` columns, in the configured order (default ``"0"``, ``"1"``, …). The order
            decides ``first_in_order`` ties.
        tie: Majority-vote tie rule, ``"first_in_order"`` (default) or ``"tie_wrong"``.
        mcq_credit: ``"exact"`` set match (default) or ``"partial"`` (Jaccard), when ``scores`` is ``None``.

    Returns:
        Dict of float64 tensors: the 0-dim keys above, plus ``scores`` ``[Q, S]`` and the per-question
        ``question_mean``, ``question_majority``, ``question_any`` ``[Q]``.

    Raises:
        ValueError: On shapes that disagree, ``Q == 0`` or ``S == 0``, scores outside ``[0, 1]``, a missing or
            empty gold set when scores are computed, an unknown ``tie``/``mcq_credit``, or a wrong number of names.
    """
    if tie not in MAJORITY_TIES:
        raise ValueError(f"`tie` must be one of {list(MAJORITY_TIES)}, got {tie!r}.")
    if mcq_credit not in MCQ_CREDITS:
        raise ValueError(f"`mcq_credit` must be one of {list(MCQ_CREDITS)}, got {mcq_credit!r}.")
    pred = _to_bits(pred_masks, "pred_masks", 2)
    q, s = pred.shape
    if q == 0 or s == 0:
        raise ValueError(f"`pred_masks` needs at least one question and one strategy, got shape {tuple(pred.shape)}.")
    if scores is None:
        if gold_masks is None:
            raise ValueError("`gold_masks` is required when `scores` is None.")
        gold = _to_bits(gold_masks, "gold_masks", 1)
        if gold.shape != (q,):
            raise ValueError(f"`gold_masks` must describe {q} questions, got shape {tuple(gold_masks.shape)}.")
        scores = mcq_scores(pred, gold.unsqueeze(1), mcq_credit)
    else:
        if not isinstance(scores, Tensor) or scores.shape != (q, s):
            raise ValueError(f"`scores` must be a tensor of shape {(q, s)}, got {getattr(scores, 'shape', scores)}.")
        scores = scores.double()
        if torch.isnan(scores).any() or (scores < 0).any() or (scores > 1).any():
            raise ValueError("`scores` must lie in [0, 1] (no NaN).")
    names = [str(k) for k in range(s)] if strategies is None else [str(n) for n in strategies]
    if len(names) != s or len(set(names)) != s:
        raise ValueError(f"`strategies` must name the {s} columns once each, got {list(names)!r}.")

    per_strategy = scores.mean(0)
    question_mean = scores.mean(1)
    question_any = scores.max(1).values
    question_majority = majority_vote(pred, scores, tie)
    out: dict[str, Tensor] = {}
    unparsed = (pred == 0).double().mean(0)
    for k, name in enumerate(names):
        out[f"acc/{name}"] = per_strategy[k]
    for k, name in enumerate(names):
        out[f"unparsed/{name}"] = unparsed[k]
    out["acc_mean"] = per_strategy.mean()
    out["acc_majority"] = question_majority.mean()
    out["acc_any"] = question_any.mean()
    out["scores"] = scores
    out["question_mean"] = question_mean
    out["question_majority"] = question_majority
    out["question_any"] = question_any
    return out


def course_pass_rates(
    correct: Tensor | Sequence[float],
    course_ids: Sequence[str],
    course_program: Mapping[str, str | None] | None = None,
    threshold: float = 0.5,
) -> tuple[dict[str, float], dict[str, float]]:
    """Per-course accuracy and per-program pass rate (share of a program's courses that pass).

    A course passes when its accuracy (mean per-question credit) is ``>= threshold`` (a 1e-12 tolerance absorbs
    rounding). Courses mapped to no program (absent from ``course_program`` or mapped to ``None``) count in no
    program; programs none of whose courses has questions are left out.

    Args:
        correct: ``[Q]`` per-question credit (e.g. ``question_majority`` of :func:`exam_aggregates`).
        course_ids: ``Q`` course ids.
        course_program: Course id -> program name, or ``None`` (then the program dict is empty).
        threshold: Pass mark in ``[0, 1]`` (default 0.5).

    Returns:
        ``(per_course, per_program)``: course -> accuracy and program -> pass rate, both sorted by key.

    Raises:
        ValueError: If lengths differ, ``Q == 0`` or ``threshold`` is outside ``[0, 1]``.
    """
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not 0.0 <= threshold <= 1.0:
        raise ValueError(f"`threshold` must be a number in [0, 1], got {threshold!r}.")
    values = torch.as_tensor(correct, dtype=torch.float64).reshape(-1).tolist()
    if len(values) != len(course_ids) or not values:
        raise ValueError(
            f"`correct` and `course_ids` must have the same non-zero length, got {len(values)} and {len(course_ids)}."
        )
    totals: dict[str, list[float]] = {}
    for value, course in zip(values, course_ids):
        totals.setdefault(str(course), []).append(value)
    per_course = {c: sum(v) / len(v) for c, v in sorted(totals.items())}
    per_program: dict[str, float] = {}
    if course_program:
        passed: dict[str, list[bool]] = {}
        for course, acc in per_course.items():
            program = course_program.get(course)
            if program is not None:
                passed.setdefault(program, []).append(acc >= threshold - 1e-12)
        per_program = {p: sum(v) / len(v) for p, v in sorted(passed.items())}
    return per_course, per_program


def course_program_map(mapping: Mapping[str, object]) -> dict[str, str | None]:
    """Normalise a course/program mapping to ``course -> program``.

    Accepts ``course -> program`` (string or ``None``) or ``program -> [courses]``; keys starting with ``_``
    (comments) are ignored.

    Raises:
        ValueError: If the values mix both forms, are of another type, or a course is in two programs.
    """
    if not isinstance(mapping, Mapping):
        raise ValueError(f"the course/program map must be a mapping, got {type(mapping).__name__}.")
    items = {str(k): v for k, v in mapping.items() if not str(k).startswith("_")}
    if all(isinstance(v, (list, tuple)) for v in items.values()):
        out: dict[str, str | None] = {}
        for program, courses in items.items():
            for course in courses:
                if not isinstance(course, str):
                    raise ValueError(f"program {program!r} lists a non-string course {course!r}.")
                if course in out and out[course] != program:
                    raise ValueError(f"course {course!r} is in two programs: {out[course]!r} and {program!r}.")
                out[course] = program
        return out
    if all(v is None or isinstance(v, str) for v in items.values()):
        return dict(items)
    raise ValueError(
        "the course/program map must be either course -> program (string or null) or program -> list of courses."
    )


# --------------------------------------------------------------------------------------------------------------------
# chance
# --------------------------------------------------------------------------------------------------------------------


def _partitions(total: int, largest: int) -> Iterable[tuple[int, ...]]:
    """Partitions of ``total`` into positive parts ``<= largest``, parts in non-increasing order."""
    if total == 0:
        yield ()
        return
    for part in range(min(total, largest), 0, -1):
        for rest in _partitions(total - part, part):
            yield (part, *rest)


@functools.lru_cache(maxsize=256)
def _chance_fractions(num_options: int, num_strategies: int) -> tuple[Fraction, Fraction, Fraction, Fraction]:
    n, s = num_options, num_strategies
    hits = [0, Fraction(0), 0, 0]  # mean (votes for gold), majority first_in_order, majority tie_wrong, any
    seen = 0
    for gold_votes in range(s + 1):
        for parts in _partitions(s - gold_votes, s):
            if len(parts) > n - 1:
                continue
            # answer vectors with these counts: the ways to give the parts to distinct wrong options, times the
            # ways to place the votes among the strategies
            assign = math.perm(n - 1, len(parts))
            for multiplicity in Counter(parts).values():
                assign //= math.factorial(multiplicity)
            place = math.factorial(s) // math.factorial(gold_votes)
            for part in parts:
                place //= math.factorial(part)
            weight = assign * place
            seen += weight
            top = max((gold_votes, *parts))
            tied = (gold_votes == top) + sum(part == top for part in parts)
            hits[0] += weight * gold_votes
            if gold_votes == top:
                # every arrangement of these counts is equally likely, so the earliest strategy among the tied
                # answers is equally likely to hold any of them
                hits[1] += Fraction(weight, tied)
                hits[2] += weight if tied == 1 else 0
            hits[3] += weight if gold_votes else 0
    total = n**s
    if seen != total:  # pragma: no cover - the counts cover every answer vector exactly once
        raise RuntimeError(f"enumeration covered {seen} of {total} answer vectors")
    return (Fraction(hits[0], total * s), hits[1] / total, Fraction(hits[2], total), Fraction(hits[3], total))


def chance_table(num_options: int, num_strategies: int = 8) -> dict[str, float]:
    """Aggregates reached by uniform guessing on a single-answer ``num_options``-option MCQ, by exact enumeration.

    Every one of the ``num_options ** num_strategies`` equally likely answer vectors (gold option 0) is counted,
    grouped by its vote counts (vectors with the same counts score alike; the number of vectors per group is a
    multinomial coefficient), in exact rational arithmetic; the rules are those of :func:`exam_aggregates`
    (majority with ``first_in_order`` or ``tie_wrong`` ties, any-correct, mean). With 8 strategies and 4 options
    any-correct is 0.899887 and the ``tie_wrong`` majority 0.187515: guessing alone clears most "any strategy"
    bars. Results are cached per argument pair.

    Args:
        num_options: Options per question, in ``[2, 62]``.
        num_strategies: Strategies per question, in ``[1, 32]`` (default 8, as in arXiv:2408.11841).

    Returns:
        ``{"mean", "majority_first_in_order", "majority_tie_wrong", "any"}`` as floats (a new dict per call).

    Raises:
        ValueError: If an argument is not an int in its range.
    """
    for name, value, low, high in (
        ("num_options", num_options, 2, MAX_OPTIONS),
        ("num_strategies", num_strategies, 1, 32),
    ):
        if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
            raise ValueError(f"`{name}` must be an int in [{low}, {high}], got {value!r}.")
    keys = ("mean", "majority_first_in_order", "majority_tie_wrong", "any")
    return {k: float(v) for k, v in zip(keys, _chance_fractions(num_options, num_strategies))}
