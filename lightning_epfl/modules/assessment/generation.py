"""Batched chat generation and option scoring with local causal language models
=============================================================================

:class:`HFGenerator` turns chat prompts into text with any ``transformers`` causal LM: prompts are rendered with the
tokenizer's chat template (or, without one, as ``Role: content`` lines), left-padded into batches (``pad_token`` set
to the EOS token when the tokenizer has none), and decoded with the KV cache, stopping at the end-of-sequence token(s)
or at stop strings. Greedy decoding of a batch gives the same tokens as decoding each prompt alone: positions are
computed from the attention mask, so padding changes nothing but the amount of work.

:meth:`HFGenerator.loglikelihood` scores continuations after a context the way lm-evaluation-harness does (the
continuation's tokens are the tail of the tokenized ``context + continuation``; trailing whitespace of the context
moves to the continuation).

:class:`ScriptedGenerator` replays fixed responses, for tests; :func:`tiny_random_chat_model` writes a randomly
initialized two-layer Llama with a byte-level tokenizer and a chat template (a pipeline smoke-test model whose answers
are noise).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from lightning_epfl.modules.assessment.strategies import ChatMessage, GenerationSettings

__all__ = [
    "TINY_RANDOM_MODEL",
    "HFGenerator",
    "ScriptedGenerator",
    "render_plain",
    "resolve_pretrained_path",
    "tiny_random_chat_model",
]

TINY_RANDOM_MODEL = "tiny-random-llama"
"""Model name resolved to :func:`tiny_random_chat_model` (built once into the package cache folder)."""


def render_plain(messages: Sequence[ChatMessage]) -> str:
    """A chat prompt for models without a chat template: ``System: ...``, ``User: ...`` blocks, then ``Assistant:``."""
    lines = [f"{m['role'].capitalize()}: {m['content']}" for m in messages]
    return "\n\n".join([*lines, "Assistant:"])


class _SeededSampling:
    """Logits processor that samples each row with its own seeded generator and masks every other token.

    Used with greedy decoding, the next token is the sampled one: each row's sample then depends only on its seed,
    not on the other prompts of the batch.
    """

    def __init__(self, seeds: Sequence[int], temperature: float, top_p: float, device: torch.device) -> None:
        self.generators = []
        for s in seeds:
            g = torch.Generator(device="cpu")
            g.manual_seed(int(s))
            self.generators.append(g)
        self.temperature = temperature
        self.top_p = top_p
        self.device = device

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        logits = scores.float().cpu() / max(self.temperature, 1e-6)
        probs = torch.softmax(logits, dim=-1)
        if self.top_p < 1.0:
            sorted_p, order = probs.sort(dim=-1, descending=True)
            keep = sorted_p.cumsum(-1) - sorted_p < self.top_p  # smallest prefix whose mass reaches top_p
            sorted_p = sorted_p * keep
            probs = torch.zeros_like(probs).scatter(-1, order, sorted_p)
        chosen = torch.stack([torch.multinomial(p, 1, generator=g) for p, g in zip(probs, self.generators)])
        out = torch.full_like(scores, float("-inf"))
        return out.scatter(-1, chosen.to(scores.device), 0.0)


class HFGenerator:
    """Batched chat generation with a local ``transformers`` causal LM.

    Either give ``pretrained_path`` (loaded with ``local_files_only=True``) or an already loaded ``model`` and
    ``tokenizer``.

    Args:
        pretrained_path: A local ``transformers`` folder.
        model: A loaded causal LM (takes precedence over ``pretrained_path``).
        tokenizer: Its tokenizer.
        batch_size: Most prompts per forward batch. Default 8.
        dtype: Weight dtype when loading from ``pretrained_path``. Default ``"float32"``.

    Raises:
        ValueError: Neither ``pretrained_path`` nor both ``model`` and ``tokenizer``; ``batch_size < 1``.
    """

    def __init__(
        self,
        pretrained_path: str | os.PathLike | None = None,
        *,
        model: Any = None,
        tokenizer: Any = None,
        batch_size: int = 8,
        dtype: str = "float32",
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"`batch_size` must be >= 1, got {batch_size}.")
        if model is None or tokenizer is None:
            if pretrained_path is None:
                raise ValueError("HFGenerator needs `pretrained_path`, or both `model` and `tokenizer`.")
            from transformers import AutoModelForCausalLM, AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(os.fspath(pretrained_path), local_files_only=True)
            model = AutoModelForCausalLM.from_pretrained(
                os.fspath(pretrained_path), local_files_only=True, dtype=getattr(torch, dtype)
            ).eval()
        self.model = model
        self.tokenizer = prepare_tokenizer(tokenizer)
        self.batch_size = batch_size
        self.calls = 0
        self.prompts_generated = 0

    # ---- prompts -------------------------------------------------------------------------------------------------

    @property
    def has_chat_template(self) -> bool:
        return bool(getattr(self.tokenizer, "chat_template", None))

    def render(self, messages: Sequence[ChatMessage]) -> str:
        """The prompt text: the chat template with the generation prompt, or :func:`render_plain`.

        A template that rejects the ``system`` role gets the system text prepended to the first user turn.
        """
        if not self.has_chat_template:
            return render_plain(messages)
        msgs = [dict(m) for m in messages]
        try:
            return self.tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
        except Exception:  # noqa: BLE001 - jinja raises its own exceptions for unsupported roles
            if not msgs or msgs[0]["role"] != "system":
                raise
            system, rest = msgs[0]["content"], msgs[1:]
            if rest and rest[0]["role"] == "user":
                rest[0] = {"role": "user", "content": f"{system}\n\n{rest[0]['content']}"}
            return self.tokenizer.apply_chat_template(rest, tokenize=False, add_generation_prompt=True)

    def _encode(self, text: str) -> list[int]:
        # a rendered chat template already holds its special tokens; a plain prompt gets the tokenizer's own
        return self.tokenizer(text, add_special_tokens=not self.has_chat_template)["input_ids"]

    def count_tokens(self, messages: Sequence[ChatMessage]) -> int:
        """Number of tokens of the rendered prompt."""
        return len(self._encode(self.render(messages)))

    # ---- generation ----------------------------------------------------------------------------------------------

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def _eos_ids(self) -> list[int]:
        ids: list[int] = []
        for source in (getattr(self.model, "generation_config", None), self.tokenizer):
            value = getattr(source, "eos_token_id", None)
            for i in value if isinstance(value, (list, tuple)) else [value]:
                if i is not None and int(i) not in ids:
                    ids.append(int(i))
        return ids

    @torch.no_grad()
    def __call__(self, prompts: list[list[ChatMessage]], settings: GenerationSettings) -> list[str]:
        """Generate one output per chat prompt, in batches of ``batch_size`` (longest prompts first).

        Args:
            prompts: Chat prompts.
            settings: Decoding settings; with ``do_sample`` and ``seeds`` each prompt is sampled with its own seed.

        Returns:
            The generated texts (special tokens removed, cut before the first stop string, stripped).

        Raises:
            ValueError: If ``settings.seeds`` is given with a different length than ``prompts``.
        """
        if settings.seeds is not None and len(settings.seeds) != len(prompts):
            raise ValueError(f"`seeds` has {len(settings.seeds)} entries for {len(prompts)} prompts.")
        encoded = [self._encode(self.render(p)) for p in prompts]
        order = sorted(range(len(prompts)), key=lambda i: -len(encoded[i]))
        outputs: list[str] = [""] * len(prompts)
        for start in range(0, len(order), self.batch_size):
            chunk = order[start : start + self.batch_size]
            seeds = None if settings.seeds is None else [settings.seeds[i] for i in chunk]
            texts = self._generate_batch([encoded[i] for i in chunk], settings, seeds)
            for i, text in zip(chunk, texts):
                outputs[i] = text
        self.calls += 1
        self.prompts_generated += len(prompts)
        return outputs

    def _generate_batch(
        self, encoded: list[list[int]], settings: GenerationSettings, seeds: list[int] | None
    ) -> list[str]:
        from transformers import GenerationConfig, LogitsProcessorList

        pad = self.tokenizer.pad_token_id
        width = max(len(e) for e in encoded)
        input_ids = torch.full((len(encoded), width), pad, dtype=torch.long)
        attention_mask = torch.zeros((len(encoded), width), dtype=torch.long)
        for row, ids in enumerate(encoded):  # left padding: every prompt ends at the last column
            input_ids[row, width - len(ids) :] = torch.tensor(ids, dtype=torch.long)
            attention_mask[row, width - len(ids) :] = 1
        eos = self._eos_ids()
        seeded = settings.do_sample and seeds is not None
        config = GenerationConfig(
            max_new_tokens=settings.max_new_tokens,
            do_sample=settings.do_sample and not seeded,
            temperature=settings.temperature if settings.do_sample and not seeded else None,
            top_p=settings.top_p if settings.do_sample and not seeded else None,
            top_k=None,
            use_cache=True,
            pad_token_id=pad,
            eos_token_id=eos or None,
            bos_token_id=getattr(self.tokenizer, "bos_token_id", None),
            stop_strings=list(settings.stop_strings) or None,
        )
        processors = LogitsProcessorList()
        if seeded:
            processors.append(_SeededSampling(seeds, settings.temperature, settings.top_p, self.device))
        kwargs: dict[str, Any] = {}
        if settings.stop_strings:
            kwargs["tokenizer"] = self.tokenizer
        out = self.model.generate(
            input_ids=input_ids.to(self.device),
            attention_mask=attention_mask.to(self.device),
            generation_config=config,
            logits_processor=processors,
            **kwargs,
        )
        texts = self.tokenizer.batch_decode(out[:, width:], skip_special_tokens=True)
        return [_cut(t, settings.stop_strings) for t in texts]

    # ---- option scoring ------------------------------------------------------------------------------------------

    @torch.no_grad()
    def loglikelihood(self, requests: Sequence[tuple[str, str]]) -> list[float]:
        """Summed log-probability of each continuation after its context (natural log).

        Args:
            requests: ``(context, continuation)`` text pairs; contexts are already rendered prompts.

        Returns:
            One float per request.
        """
        pairs = []
        for context, continuation in requests:
            stripped = context.rstrip()
            continuation = context[len(stripped) :] + continuation
            whole = self._encode(stripped + continuation)
            n_ctx = len(self._encode(stripped))
            n_cont = max(len(whole) - n_ctx, 1)
            pairs.append((whole, n_cont))
        limit = getattr(getattr(self.model, "config", None), "max_position_embeddings", None)
        results = [0.0] * len(pairs)
        # Requests that differ only in their last token (option labels such as " 1" / " 2" after one prompt) need
        # one forward of the shared part: the earlier continuation tokens are scored in it, and every label is read
        # from the next-token distribution at its last position.
        groups: dict[tuple[tuple[int, ...], int], list[int]] = {}
        for i, (ids, n_cont) in enumerate(pairs):
            if len(ids) > n_cont:
                groups.setdefault((tuple(ids[:-1]), n_cont), []).append(i)
        groups = {key: members for key, members in groups.items() if len(members) > 1}
        shared = {i for members in groups.values() for i in members}
        if groups:
            keys = list(groups)
            scored = self._shared_prefix_scores([list(k[0]) for k in keys], [k[1] - 1 for k in keys], limit)
            for key, (tail, logp) in zip(keys, scored):
                for i in groups[key]:
                    results[i] = tail + float(logp[pairs[i][0][-1]])
        order = sorted((i for i in range(len(pairs)) if i not in shared), key=lambda i: -len(pairs[i][0]))
        for start in range(0, len(order), self.batch_size):
            chunk = order[start : start + self.batch_size]
            seqs = []
            for i in chunk:
                ids, n_cont = pairs[i]
                if limit and len(ids) > limit:
                    ids = ids[-limit:]
                seqs.append((ids, n_cont))
            width = max(len(s) for s, _ in seqs)
            pad = self.tokenizer.pad_token_id
            ids_t = torch.full((len(seqs), width), pad, dtype=torch.long)
            mask = torch.zeros((len(seqs), width), dtype=torch.long)
            for row, (ids, _) in enumerate(seqs):  # right padding: positions start at 0 for every row
                ids_t[row, : len(ids)] = torch.tensor(ids)
                mask[row, : len(ids)] = 1
            logits = self.model(input_ids=ids_t.to(self.device), attention_mask=mask.to(self.device)).logits
            logp = torch.log_softmax(logits.float(), dim=-1).cpu()
            for row, (i, (ids, n_cont)) in enumerate(zip(chunk, seqs)):
                target = torch.tensor(ids[-n_cont:])
                positions = torch.arange(len(ids) - n_cont - 1, len(ids) - 1)
                results[i] = float(logp[row, positions, target].sum())
        return results

    @torch.no_grad()
    def _shared_prefix_scores(
        self, contexts: list[list[int]], tails: list[int], limit: int | None
    ) -> list[tuple[float, torch.Tensor]]:
        """For each token list: the summed log-probability of its last ``tails[i]`` tokens given what precedes them,
        and the next-token log-probabilities ``[vocab]`` after it (batched, right-padded)."""
        out: list[tuple[float, torch.Tensor]] = [(0.0, torch.empty(0))] * len(contexts)
        order = sorted(range(len(contexts)), key=lambda i: -len(contexts[i]))
        pad = self.tokenizer.pad_token_id
        for start in range(0, len(order), self.batch_size):
            chunk = order[start : start + self.batch_size]
            seqs = [contexts[i][-limit:] if limit else contexts[i] for i in chunk]
            width = max(len(s) for s in seqs)
            ids_t = torch.full((len(seqs), width), pad, dtype=torch.long)
            mask = torch.zeros((len(seqs), width), dtype=torch.long)
            for row, ids in enumerate(seqs):
                ids_t[row, : len(ids)] = torch.tensor(ids)
                mask[row, : len(ids)] = 1
            logits = self.model(input_ids=ids_t.to(self.device), attention_mask=mask.to(self.device)).logits
            for row, (i, ids) in enumerate(zip(chunk, seqs)):
                n = len(ids)
                tail = min(tails[i], n - 1)
                tail_sum = 0.0
                if tail > 0:
                    logp = torch.log_softmax(logits[row, n - tail - 1 : n - 1].float(), dim=-1)
                    tail_sum = float(logp.gather(1, torch.tensor(ids[n - tail :])[:, None].to(logp.device)).sum())
                out[i] = (tail_sum, torch.log_softmax(logits[row, n - 1].float(), dim=-1).cpu())
        return out


def _cut(text: str, stops: Sequence[str]) -> str:
    cut = len(text)
    for s in stops:
        k = text.find(s)
        if k != -1:
            cut = min(cut, k)
    return text[:cut].strip()


def prepare_tokenizer(tokenizer: Any) -> Any:
    """Set left padding and, when missing, ``pad_token = eos_token`` (needed for batched decoder-only generation).

    Raises:
        ValueError: If the tokenizer has neither a pad nor an EOS token.
    """
    tokenizer.padding_side = "left"
    if tokenizer.pad_token_id is None:
        if tokenizer.eos_token is None:
            raise ValueError("The tokenizer has no pad token and no EOS token; batched generation needs one of them.")
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


class ScriptedGenerator:
    """A :data:`~lightning_epfl.modules.assessment.strategies.GenerateFn` that replays responses, for tests.

    Args:
        responses: A list of outputs returned in call order (one per prompt), or a function ``f(messages) -> str``.

    Attributes:
        prompts: Every prompt received, in order.
        settings: The settings of every call.
        calls: Number of calls (batches).

    Raises:
        IndexError: When a list of responses runs out.
    """

    def __init__(self, responses: Sequence[str] | Callable[[list[ChatMessage]], str]) -> None:
        self.responses = responses if callable(responses) else list(responses)
        self.prompts: list[list[ChatMessage]] = []
        self.settings: list[GenerationSettings] = []
        self.calls = 0

    def __call__(self, prompts: list[list[ChatMessage]], settings: GenerationSettings) -> list[str]:
        self.calls += 1
        self.settings.append(settings)
        out = []
        for p in prompts:
            self.prompts.append(p)
            if callable(self.responses):
                out.append(self.responses(p))
            else:
                k = len(self.prompts) - 1
                if k >= len(self.responses):
                    raise IndexError(f"ScriptedGenerator has {len(self.responses)} responses; prompt {k + 1} asked.")
                out.append(self.responses[k])
        return out

    def render(self, messages: Sequence[ChatMessage]) -> str:
        """The prompt text (:func:`render_plain`)."""
        return render_plain(messages)

    def count_tokens(self, messages: Sequence[ChatMessage]) -> int:
        """Whitespace-separated words of the rendered prompt (a stand-in for tokens)."""
        return len(self.render(messages).split())


_TINY_CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
_TINY_VERSION = 1


def _write_tiny(folder: str, seed: int) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {ch: i for i, ch in enumerate(alphabet)}
    special = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    core = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    core.add_special_tokens(special)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core, eos_token="<|im_end|>", bos_token="<|endoftext|>", unk_token=None
    )
    tokenizer.chat_template = _TINY_CHAT_TEMPLATE
    eos = tokenizer.convert_tokens_to_ids("<|im_end|>")
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=8192,
        tie_word_embeddings=True,
        initializer_range=0.2,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=eos,
        pad_token_id=None,
    )
    model = LlamaForCausalLM(config).eval()
    model.generation_config.eos_token_id = eos
    model.generation_config.pad_token_id = None
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    with open(os.path.join(folder, "tiny_random_model.json"), "w") as f:
        json.dump({"seed": seed, "version": _TINY_VERSION}, f)


def tiny_random_chat_model(folder: str | os.PathLike | None = None, seed: int = 0) -> Path:
    """Write (once) a random two-layer Llama with a byte-level tokenizer and a ChatML-style chat template.

    The model (hidden size 32, 4 heads, 2 KV heads, 259-token vocabulary: the 256 byte symbols and three special
    tokens; EOS is ``<|im_end|>``) answers with noise; it exists to run the evaluation pipeline end to end in seconds.

    Args:
        folder: Target folder. ``None`` uses ``tiny-random-chat-llama-s<seed>-v<version>`` in the package cache
            folder (:func:`lightning_epfl.models.cache_dir`). An existing complete folder is reused.
        seed: Initialization seed. Default 0.

    Returns:
        The folder (loadable with ``from_pretrained(folder, local_files_only=True)``).
    """
    if folder is None:
        from lightning_epfl.models import cache_dir

        folder = cache_dir() / f"tiny-random-chat-llama-s{seed}-v{_TINY_VERSION}"
    final = Path(folder)
    if (final / "tiny_random_model.json").is_file():
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".tmp-{final.name}-", dir=final.parent)
    try:
        _write_tiny(tmp, seed)
        try:
            os.replace(tmp, final)
        except OSError:  # written meanwhile by another process, or a non-empty folder is in the way
            if not (final / "tiny_random_model.json").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def resolve_pretrained_path(pretrained_path: str | os.PathLike, argument: str = "pretrained_path") -> Path:
    """A local ``transformers`` folder for a model name or path.

    :data:`TINY_RANDOM_MODEL` gives :func:`tiny_random_chat_model` (built once); anything else goes through
    :func:`lightning_epfl.models.resolve_pretrained` (local folder, ``.gguf`` file, packaged model name).
    """
    if os.fspath(pretrained_path) == TINY_RANDOM_MODEL:
        return tiny_random_chat_model()
    from lightning_epfl.models import resolve_pretrained

    return resolve_pretrained(pretrained_path, argument=argument)
