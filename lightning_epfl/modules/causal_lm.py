"""Causal language model module
==============================

A LightningModule around any ``transformers`` causal LM: a small Llama built from a config (default about 0.8M
parameters with the byte vocabulary, trainable on 2 CPU cores in minutes), or a model loaded from a local folder.
With ``moe=MoEConfig(...)`` the MLPs of its blocks become mixture-of-experts layers
(:mod:`lightning_epfl.modules.moe`) and their auxiliary losses are added to the training loss.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from lightning.pytorch import LightningModule
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from lightning.pytorch.utilities import rank_zero_warn
from lightning.pytorch.utilities.exceptions import MisconfigurationException

from lightning_epfl.models import check_pretrained, resolve_pretrained
from lightning_epfl.modules.moe import MoEConfig, moe_aux_loss, replace_mlps_with_moe, routing_context
from lightning_epfl.utilities import atomic_directory, step_scheduler_config

DEFAULT_LLAMA_CONFIG: dict[str, Any] = {
    "model_type": "llama",
    "hidden_size": 128,
    "intermediate_size": 344,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "num_key_value_heads": 4,
    "max_position_embeddings": 512,
    "tie_word_embeddings": True,
    "rms_norm_eps": 1e-5,
}
"""Defaults of the small Llama that ``CausalLMModule`` builds; ``config`` entries override them."""


def check_same_tokenizer(tokenizer: Any, folder: str, pretrained_path: str) -> None:
    """Raise ``MisconfigurationException`` unless ``tokenizer`` is the one saved with the model in ``folder``.

    A byte-level datamodule feeding a model with a subword vocabulary (or the reverse) trains on meaningless ids
    without any error, so the two are compared before training: same kind, and equal vocabularies.
    """
    from lightning_epfl.datamodules.text import ByteTokenizer, load_tokenizer

    own = load_tokenizer(folder)
    hint = (
        f"the datamodule's tokenizer is not the one of `pretrained_path` ({pretrained_path!r}); set "
        f"`data.init_args.tokenizer_path: {pretrained_path}` (TextDataModule(tokenizer_path=...))."
    )
    if isinstance(own, ByteTokenizer) != isinstance(tokenizer, ByteTokenizer):
        raise MisconfigurationException("CausalLMModule: " + hint)
    if not isinstance(own, ByteTokenizer) and own.get_vocab() != tokenizer.get_vocab():
        raise MisconfigurationException("CausalLMModule: " + hint)


def default_optimizer(params: Any) -> torch.optim.Optimizer:
    """AdamW with the WSD paper's settings: lr 1e-3, betas (0.9, 0.95), weight decay 0.1."""
    return torch.optim.AdamW(params, lr=1e-3, betas=(0.9, 0.95), weight_decay=0.1)


class CausalLMModule(LightningModule):
    """Train or fine-tune a ``transformers`` causal LM with next-token cross-entropy.

    The model is built in :meth:`configure_model` (after the datamodule's ``setup``), so ``--print_config`` stays
    cheap and the vocabulary size can come from the datamodule (``trainer.datamodule.vocab_size``).

    Logged: ``train/loss`` (per step, nats/token), ``val/loss`` (token-weighted mean over the validation set),
    ``val/ppl`` (``exp(val/loss)``), and the same under ``test/``. Batches with a ``"domain"`` entry (``[B]`` domain
    ids, e.g. from :class:`~lightning_epfl.datamodules.multi_domain.MultiDomainTextDataModule`) also give
    ``val/ppl/<domain>`` per domain (named by the datamodule's ``domain_names`` when it has them).

    With ``moe``: the blocks' MLPs become :class:`~lightning_epfl.modules.moe.MoEMLP` layers after the model is built
    or loaded (``expert_init="copy"`` upcycles a pretrained model), and the training loss is
    ``train/loss = train/lm_loss + router_aux_loss_coef · moe/lb + router_z_loss_coef · moe/z`` (layer means, from
    :func:`~lightning_epfl.modules.moe.moe_aux_loss`); ``moe/lb``, ``moe/z`` and ``moe/dropped_frac`` are always
    logged. The batch's ``attention_mask`` and ``"domain"`` ids reach the routers (``routing="label"`` needs the
    latter). Sequence routing with ``sequence_pooling="mean"`` warns: in a causal LM each position then sees the
    future tokens of its sequence. A MoE model is not a ``transformers`` architecture, so :meth:`save_pretrained`
    refuses it (use the Lightning checkpoint). With ``lora`` the expert and router weights stay frozen unless
    ``modules_to_save`` lists them.

    It is also a collaborative client (``client_loss``, ``client_metrics`` with ``nll_sum``/``tokens``,
    ``metrics_from_sums``): under ``CollaborativeStrategy`` with ``lora=...`` only the adapters are stacked per
    client and the frozen base is shared; batches are dicts stacked over clients (``FederatedTextDataModule``).

    Args:
        config: Overrides of :data:`DEFAULT_LLAMA_CONFIG` (any ``transformers`` config field, ``model_type`` to pick
            another architecture). ``vocab_size`` defaults to the datamodule's. Mutually exclusive with
            ``pretrained_path``.
        pretrained_path: A pretrained model: a local ``transformers`` folder, a ``.gguf`` file, or a packaged model
            name such as ``"smollm2-135m-instruct"`` (resolved by :func:`lightning_epfl.models.resolve_pretrained`,
            loaded with ``from_pretrained(folder, local_files_only=True)``). The datamodule must use the same
            tokenizer (``TextDataModule(tokenizer_path=<the same name>)``).
        optimizer: Optimizer factory called with the trainable parameters (default: AdamW, lr 1e-3,
            betas (0.9, 0.95), weight decay 0.1).
        lr_scheduler: Scheduler factory called with the optimizer; stepped once per optimizer step
            (``interval="step"``), e.g. ``lightning_epfl.WSDScheduler``.
        lora: ``peft.LoraConfig`` arguments; when given, the model is wrapped with LoRA adapters and only they
            train. ``target_modules`` defaults to ``"all-linear"`` and ``task_type`` to ``"CAUSAL_LM"`` (exported
            adapters then load with ``AutoPeftModelForCausalLM``).
        attn_implementation: ``transformers`` attention kernel (``"eager"``, ``"sdpa"``; ``None``: the library's
            default). ``"eager"`` lets ``torch.func.vmap`` batch clients through attention (collaborative clients
            with ``execution="vmap"``); fused kernels have no batching rule and fall back to a loop.
        moe: :class:`~lightning_epfl.modules.moe.MoEConfig` (a dict of its fields is accepted too) to turn the MLPs
            into mixture-of-experts layers; ``None`` (default): the dense model.
        router_aux_loss_coef: Weight ``α_lb >= 0`` of the load-balancing loss (default 0.01, Switch Transformer).
        router_z_loss_coef: Weight ``α_z >= 0`` of the router z-loss (default 1e-3, ST-MoE).

    Raises:
        MisconfigurationException: If both ``config`` and ``pretrained_path`` are given, ``pretrained_path`` is not
            a model folder, a ``.gguf`` file or a packaged model name (or its package is missing; the message gives
            the install command), ``moe`` is not a valid ``MoEConfig``, a loss coefficient is negative, or (in
            ``configure_model``) no vocabulary size is known, the datamodule's tokenizer is not the pretrained
            model's, or the model has no MLP the MoE layers recognize.
    """

    def __init__(
        self,
        config: dict | None = None,
        pretrained_path: str | None = None,
        optimizer: OptimizerCallable = default_optimizer,
        lr_scheduler: LRSchedulerCallable | None = None,
        lora: dict | None = None,
        attn_implementation: str | None = None,
        moe: MoEConfig | None = None,
        router_aux_loss_coef: float = 0.01,
        router_z_loss_coef: float = 1e-3,
    ) -> None:
        super().__init__()
        if config is not None and pretrained_path is not None:
            raise MisconfigurationException("Give either `config` or `pretrained_path`, not both.")
        moe_config = _moe_config(moe)
        for name, value in (("router_aux_loss_coef", router_aux_loss_coef), ("router_z_loss_coef", router_z_loss_coef)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0:
                raise MisconfigurationException(f"CausalLMModule: `{name}` must be a number >= 0, got {value!r}.")
        if pretrained_path is not None:
            try:
                check_pretrained(pretrained_path, "pretrained_path")
            except (ValueError, OSError, ImportError) as err:
                raise MisconfigurationException(str(err)) from err
        # the optimizer/scheduler factories stay out of the checkpoint so that it loads with `weights_only=True`;
        # LightningCLI records them in config.yaml
        moe = None if moe_config is None else moe_config.to_dict()  # plain data: `weights_only` loads, loggers show it
        self.save_hyperparameters(ignore=["optimizer", "lr_scheduler"])
        self.config = dict(config or {})
        self.pretrained_path = pretrained_path
        self.optimizer = optimizer
        self.lr_scheduler = lr_scheduler
        self.lora = lora
        self.attn_implementation = attn_implementation
        self.moe = moe_config
        self.router_aux_loss_coef = float(router_aux_loss_coef)
        self.router_z_loss_coef = float(router_z_loss_coef)
        self.model: torch.nn.Module | None = None
        self._hf_config: dict | None = None
        self._tokenizer: Any = None
        self._eval_sums: dict[str, torch.Tensor] = {}

    # ------------------------------------------------------------------ model
    def build_config(self, vocab_size: int | None = None) -> Any:
        """Return the ``transformers`` config of the model to build from scratch."""
        from transformers import AutoConfig

        values = {**DEFAULT_LLAMA_CONFIG, **self.config}
        if "num_attention_heads" in self.config and "num_key_value_heads" not in self.config:
            values["num_key_value_heads"] = values["num_attention_heads"]  # plain multi-head attention by default
        if "vocab_size" not in self.config:
            if vocab_size is None:
                raise MisconfigurationException(
                    "CausalLMModule needs a vocabulary size: set `config: {vocab_size: ...}` or use a datamodule "
                    "with a `vocab_size` attribute."
                )
            values["vocab_size"] = vocab_size
        model_type = values.pop("model_type")
        return AutoConfig.for_model(model_type, **values)

    def _datamodule(self) -> Any:
        trainer = self._trainer
        return getattr(trainer, "datamodule", None) if trainer is not None else None

    def configure_model(self) -> None:
        if self.model is not None:
            return
        if (
            self._trainer is None
            and self._hf_config is None
            and self.pretrained_path is None
            and "vocab_size" not in self.config
        ):
            return  # `load_from_checkpoint` outside a Trainer: `on_load_checkpoint` builds from the stored config
        from transformers import AutoModelForCausalLM

        datamodule = self._datamodule()
        if self._hf_config is not None:  # restored from a checkpoint before the model existed
            from transformers import AutoConfig

            cfg = dict(self._hf_config)
            model = AutoModelForCausalLM.from_config(AutoConfig.for_model(cfg.pop("model_type"), **cfg))
        elif self.pretrained_path is not None:
            folder = self._resolved_path()
            if datamodule is not None and hasattr(datamodule, "tokenizer"):
                check_same_tokenizer(datamodule.tokenizer, folder, self.pretrained_path)
            model = AutoModelForCausalLM.from_pretrained(folder, local_files_only=True)
            model.train()  # from_pretrained returns eval mode; Lightning switches modes per stage from here on
        else:
            model = AutoModelForCausalLM.from_config(self.build_config(getattr(datamodule, "vocab_size", None)))
        if self.attn_implementation is not None:
            model.set_attn_implementation(self.attn_implementation)
        self._hf_config = model.config.to_dict()
        if self.moe is not None:
            try:
                replace_mlps_with_moe(model, self.moe)
            except ValueError as err:
                raise MisconfigurationException(f"CausalLMModule `moe`: {err}") from err
            if self.moe.routing == "sequence" and self.moe.sequence_pooling == "mean":
                rank_zero_warn(
                    "CausalLMModule: `moe.sequence_pooling='mean'` routes every position by the mean of its whole "
                    "sequence, future tokens included; in a causal LM this leaks the tokens being predicted. Use "
                    "'causal_mean' (the default) to compare perplexities.",
                    category=RuntimeWarning,
                )
        if self.lora is not None:
            from peft import LoraConfig, get_peft_model

            try:
                settings = {"target_modules": "all-linear", "task_type": "CAUSAL_LM", **self.lora}
                model = get_peft_model(model, LoraConfig(**settings))
            except ValueError as err:
                linear = sorted(
                    {n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
                )
                raise MisconfigurationException(
                    f"`lora`: {err} The model's linear layers are {linear} (or use 'all-linear')."
                ) from err
        self.model = model
        if datamodule is not None and hasattr(datamodule, "tokenizer"):
            self._tokenizer = datamodule.tokenizer

    def check_config(self, trainer: Any, pl_module: Any, datamodule: Any = None) -> None:
        """Resolve ``pretrained_path`` (converting a GGUF source once) and compare the datamodule's tokenizer with
        the model's, before the run starts (the ``lightning-epfl`` CLI calls this before creating any folder).

        Raises:
            MisconfigurationException: If the model cannot be resolved or the tokenizers differ.
        """
        if self.pretrained_path is None or self.model is not None:
            return
        folder = self._resolved_path()
        assert folder is not None
        if datamodule is not None and hasattr(datamodule, "tokenizer"):
            check_same_tokenizer(datamodule.tokenizer, folder, self.pretrained_path)

    def _resolved_path(self) -> str | None:
        if self.pretrained_path is None:
            return None
        try:
            return str(resolve_pretrained(self.pretrained_path, "pretrained_path"))
        except (ValueError, OSError, ImportError, RuntimeError) as err:
            raise MisconfigurationException(str(err)) from err

    @property
    def tokenizer(self) -> Any:
        """The tokenizer of the data the model was trained on (byte-level unless a local tokenizer was used)."""
        if self._tokenizer is None:
            from lightning_epfl.datamodules.text import load_tokenizer

            self._tokenizer = load_tokenizer(self._resolved_path())
        return self._tokenizer

    # ------------------------------------------------------------------ steps
    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Return logits of shape ``(batch, seq, vocab)`` for ``input_ids`` of shape ``(batch, seq)``."""
        if self.model is None:
            raise RuntimeError(
                "The model is not built: run it under a Trainer, or call `configure_model()` after setting "
                "`config={'vocab_size': ...}` or `pretrained_path`."
            )
        return self.model(input_ids=input_ids, attention_mask=attention_mask).logits

    def _loss_sum(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """Return the summed next-token cross-entropy (nats) and the number of predicted tokens.

        Labels ``-100`` are not predicted; an optional ``mask`` ``[B]`` (padding rows of a stacked client batch: 0)
        removes whole sequences. Written without data-dependent control flow, so it runs under ``torch.func.vmap``.
        """
        nll, count = self._sequence_loss_sums(batch)
        return nll.sum(), count.sum()

    def _sequence_loss_sums(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """Per sequence: the summed next-token cross-entropy ``[B]`` (nats) and the predicted tokens ``[B]``."""
        input_ids = batch["input_ids"]
        labels = batch.get("labels", input_ids)
        if self.moe is not None and self.model is not None:
            with routing_context(self.model, batch.get("attention_mask"), batch.get("domain")):
                logits = self(input_ids, batch.get("attention_mask"))
        else:
            logits = self(input_ids, batch.get("attention_mask"))
        shift_labels = labels[:, 1:]
        valid = shift_labels != -100
        if "mask" in batch:
            valid = valid & (batch["mask"][:, None] > 0)
        per_token = torch.nn.functional.cross_entropy(
            logits[:, :-1].reshape(-1, logits.size(-1)).float(), shift_labels.clamp_min(0).reshape(-1), reduction="none"
        ).view_as(shift_labels)
        weight = valid.to(per_token.dtype)
        return (per_token * weight).sum(dim=1), weight.sum(dim=1)

    # ------------------------------------------------------------------ collaborative client contract
    count_key = "tokens"
    """Key of :meth:`client_metrics` holding the number of predicted tokens."""

    def client_loss(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Mean next-token cross-entropy (nats/token) of one client's batch (pure: runs under ``vmap``)."""
        nll_sum, tokens = self._loss_sum(batch)
        return nll_sum / tokens.clamp_min(1)

    def client_metrics(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """``{"nll_sum": summed cross-entropy (nats), "tokens": predicted tokens}`` of one client's batch."""
        nll_sum, tokens = self._loss_sum(batch)
        return {"nll_sum": nll_sum, "tokens": tokens}

    def client_logits(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Logits ``[B, T, V]`` of one client's batch, in float32 or wider (pure: runs under ``vmap``; used by
        prediction-based trust)."""
        logits = self(batch["input_ids"], batch.get("attention_mask"))
        return logits if logits.dtype in (torch.float32, torch.float64) else logits.float()

    def metrics_from_sums(self, sums: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """``loss`` = ``nll_sum / tokens`` (nats/token) and ``ppl`` = ``exp(loss)``, per entry of the sums."""
        loss = sums["nll_sum"] / sums["tokens"].clamp_min(1)
        return {"loss": loss, "ppl": torch.exp(loss.clamp_max(80.0))}

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        loss_sum, count = self._loss_sum(batch)
        loss = loss_sum / count.clamp_min(1)
        if self.moe is not None:
            assert self.model is not None
            aux, stats = moe_aux_loss(self.model, self.router_aux_loss_coef, self.router_z_loss_coef)
            self.log("train/lm_loss", loss, batch_size=int(count))
            loss = loss + aux
            for key in ("lb", "z", "dropped_frac"):
                self.log(f"moe/{key}", stats[key], batch_size=int(count))
        self.log("train/loss", loss, prog_bar=True, batch_size=int(count))
        return loss

    def _eval_step(self, batch: dict[str, torch.Tensor], stage: str) -> torch.Tensor:
        nll, counts = self._sequence_loss_sums(batch)
        loss_sum, count = nll.sum(), counts.sum()
        loss = loss_sum / count.clamp_min(1)
        self.log(f"{stage}/loss", loss, prog_bar=stage == "val", batch_size=int(count), sync_dist=True)
        sums = self._eval_sums.setdefault(stage, torch.zeros(2, dtype=torch.float64, device=loss.device))
        sums += torch.stack([loss_sum.detach().double(), count.double()])
        domains = batch.get("domain") if isinstance(batch, dict) else None
        if domains is not None:
            self._add_domain_sums(stage, torch.as_tensor(domains, device=loss.device).reshape(-1), nll, counts)
        return loss

    def _domain_names(self) -> list[str] | None:
        names = getattr(self._datamodule(), "domain_names", None)
        return None if names is None else [str(n) for n in names]

    def _add_domain_sums(self, stage: str, domains: torch.Tensor, nll: torch.Tensor, counts: torch.Tensor) -> None:
        """Accumulate the NLL and token counts of each domain id (``[num_domains, 2]``, grown as ids appear)."""
        names = self._domain_names()
        size = max(len(names) if names else 0, int(domains.max()) + 1 if domains.numel() else 0)
        key = f"{stage}/domains"
        sums = self._eval_sums.get(key)
        if sums is None or sums.shape[0] < size:
            grown = torch.zeros(size, 2, dtype=torch.float64, device=nll.device)
            if sums is not None:
                grown[: sums.shape[0]] = sums
            sums = self._eval_sums[key] = grown
        values = torch.stack([nll.detach().double(), counts.detach().double()], dim=1)
        sums.index_add_(0, domains.long(), values)

    def _eval_epoch_end(self, stage: str) -> None:
        per_domain = self._eval_sums.pop(f"{stage}/domains", None)
        sums = self._eval_sums.pop(stage, None)
        if sums is None:
            return
        sums = self.trainer.strategy.reduce(sums, reduce_op="sum")
        self.log(
            f"{stage}/ppl", math.exp(min(float(sums[0] / sums[1].clamp_min(1)), 80.0)), batch_size=1, sync_dist=True
        )
        if per_domain is not None:
            per_domain = self.trainer.strategy.reduce(per_domain, reduce_op="sum")
            names = self._domain_names() or []
            for i, (nll, count) in enumerate(per_domain.tolist()):
                if count > 0:
                    name = names[i] if i < len(names) else str(i)
                    self.log(f"{stage}/ppl/{name}", math.exp(min(nll / count, 80.0)), batch_size=1, sync_dist=True)

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        return self._eval_step(batch, "val")

    def on_validation_epoch_end(self) -> None:
        self._eval_epoch_end("val")

    def test_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        return self._eval_step(batch, "test")

    def on_test_epoch_end(self) -> None:
        self._eval_epoch_end("test")

    def configure_optimizers(self) -> Any:
        optimizer = self.optimizer(p for p in self.parameters() if p.requires_grad)
        return step_scheduler_config(optimizer, None if self.lr_scheduler is None else self.lr_scheduler(optimizer))

    # ------------------------------------------------------------------ checkpoints and export
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        if self.model is not None:  # the current config: an export transform may have untied or marked the model
            self._hf_config = self.model.config.to_dict()
        checkpoint["hf_config"] = self._hf_config

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        stored = checkpoint.get("hf_config")
        if self.model is None and stored is not None:
            self._hf_config = dict(stored)
            self.configure_model()  # `load_from_checkpoint` outside a Trainer: build before the state dict loads
        elif self.model is not None and stored is not None:
            self._match_stored_config(stored)

    def _match_stored_config(self, stored: dict[str, Any]) -> None:
        """Before a checkpoint's weights load into a model built from the run's arguments: untie ``lm_head`` when the
        checkpointed model had it untied (an export transform rotates the two differently), and carry over the
        ``quarot`` / ``sparse_quant`` markers the export transforms leave in the config."""
        model: Any = self.model
        head, embed = model.get_output_embeddings(), model.get_input_embeddings()
        if stored.get("tie_word_embeddings") is False and head is not None and head.weight is embed.weight:
            head.weight = torch.nn.Parameter(embed.weight.detach().clone())
            model.config.tie_word_embeddings = False
        for marker in ("quarot", "sparse_quant"):
            if marker in stored:
                setattr(model.config, marker, stored[marker])

    def save_pretrained(self, directory: str) -> None:
        """Write a ``transformers``-loadable model and its tokenizer description to ``directory``.

        The folder is written under a temporary name and renamed, so an existing export is replaced whole or not at
        all. LoRA adapters are merged into the base weights first (on a copy), so the result loads with
        ``AutoModelForCausalLM.from_pretrained(directory)``; ``load_tokenizer(directory)`` gives the tokenizer.
        """
        if self.model is None:
            raise RuntimeError("The model is not built yet: call `configure_model()` or train first.")
        if self.moe is not None:
            raise RuntimeError(
                "save_pretrained: a model with MoE layers is not a `transformers` architecture and would not load "
                "with `from_pretrained`; keep the Lightning checkpoint (trainer.save_checkpoint) instead."
            )
        model: Any = self.model
        if hasattr(model, "merge_and_unload"):
            import copy

            model = copy.deepcopy(model).merge_and_unload()

        def write(tmp: str) -> None:
            model.save_pretrained(tmp)
            self.tokenizer.save_pretrained(tmp)

        atomic_directory(directory, write)


def _moe_config(moe: Any) -> MoEConfig | None:
    """``moe`` as a :class:`MoEConfig` (a dict of its fields, as stored in checkpoints, is converted)."""
    if moe is None or isinstance(moe, MoEConfig):
        return moe
    if isinstance(moe, dict):
        try:
            return MoEConfig.from_dict(moe)
        except (TypeError, ValueError) as err:
            raise MisconfigurationException(f"CausalLMModule `moe`: {err}") from err
    raise MisconfigurationException(
        f"CausalLMModule: `moe` must be a MoEConfig, a dict of its fields or None, got {moe!r}."
    )
