"""MetaLearningModule
===================

Gradient-based meta-learning over any ``nn.Module`` with tasks batched by ``torch.func.vmap``: exact MAML
(arXiv:1703.03400), FO-MAML, Reptile (arXiv:1803.02999) and the first-order method of Chayti & Jaggi
(arXiv:2409.03682, "FO-B-MAML") that estimates the exact MAML meta-gradient from gradients only. The math lives in
:mod:`lightning_epfl.functional.meta`; outer steps (plain / normalized / clipped momentum) come from the injected
optimizer, e.g. :class:`~lightning_epfl.modules.meta_optim.MetaOptimizer`.
"""

from __future__ import annotations

from functools import partial
from typing import Any, Literal

import torch
from lightning.pytorch import LightningModule
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor, nn
from torch.func import vmap
from typing_extensions import override

from lightning_epfl.datamodules.few_shot import TaskBatch
from lightning_epfl.functional.meta import (
    adapt_and_predict,
    batched_task_grad,
    resolve_loss,
    task_grad_fn,
    task_loss,
    tree_norm,
)
from lightning_epfl.utilities import step_scheduler_config

__all__ = ["MLP", "MetaLearningModule"]


class MLP(nn.Sequential):
    """Fully connected network ``in -> hidden_sizes[0] -> ... -> out`` with one activation between layers.

    Args:
        in_features: Input width.
        hidden_sizes: Hidden widths, e.g. ``[40, 40]`` (the sinusoid network of arXiv:1703.03400); the same argument
            as ``MLPClassifier(hidden_sizes=...)``.
        out_features: Output width.
        activation: ``"tanh"`` (smooth: finite differences stay accurate) or ``"relu"``.

    Raises:
        ValueError: If a width is below 1 or ``activation`` is unknown.
    """

    def __init__(
        self,
        in_features: int,
        hidden_sizes: list[int],
        out_features: int,
        activation: Literal["tanh", "relu"] = "tanh",
    ) -> None:
        widths = [in_features, *hidden_sizes, out_features]
        if min(widths) < 1:
            raise ValueError(f"`in_features`, `hidden_sizes` and `out_features` must be >= 1, got {widths}.")
        acts = {"tanh": nn.Tanh, "relu": nn.ReLU}
        if activation not in acts:
            raise ValueError(f"`activation` must be one of {sorted(acts)}, got {activation!r}.")
        layers: list[nn.Module] = []
        for i, (a, b) in enumerate(zip(widths[:-1], widths[1:])):
            layers.append(nn.Linear(a, b))
            if i < len(widths) - 2:
                layers.append(acts[activation]())
        super().__init__(*layers)


class MetaLearningModule(LightningModule):
    """Meta-learn an initialization of ``net`` with MAML, FO-MAML, Reptile or FO-B-MAML (arXiv:2409.03682).

    Each training step draws a :class:`~lightning_epfl.datamodules.few_shot.TaskBatch`, computes the task-mean
    meta-gradient estimate ``d = mean_i d_i`` with ``torch.func.vmap`` over tasks, then takes one outer step with the
    injected optimizer (manual optimization; the optimizer sees ``d`` as the parameters' gradient).

    Algorithms (``d_i`` per task; ``U_i(x)``: ``inner_steps`` SGD steps of size ``inner_lr`` on the support loss):

    - ``"maml"``: exact ``J_i^T grad f_i^q(U_i(x))`` by nested ``torch.func.grad`` (second order);
    - ``"fomaml"``: ``grad f_i^q(U_i(x))`` (biased);
    - ``"reptile"``: ``(x - phi_i) / (inner_lr * reptile_steps)`` on support and query joined;
    - ``"fo_b_maml"``: the exact meta-gradient estimated by finite differences of support gradients
      (``fd_scheme``, ``fd_delta``); converges to a stationary point of the MAML objective.

    Logged: ``train/loss`` (= ``train/query_loss_post``), ``train/support_loss_pre``, ``train/meta_grad_norm``
    (``||d||``), ``train/outer_step_norm``; every ``monitor_every_n_steps`` on a fixed seeded batch of
    ``monitor_tasks`` tasks (from the datamodule's ``monitor_batch``), the exact second-order
    ``monitor/maml_grad_norm``, ``monitor/maml_objective`` and ``monitor/estimator_rel_err`` (``||d - grad F|| /
    ||grad F||`` of the configured algorithm); ``val/query_loss_pre``, ``val/query_loss_post`` (= ``val/loss``) and,
    for classification, ``val/acc_pre``, ``val/acc_post``.

    Args:
        net: The model; its trainable parameters are meta-learned, its buffers and frozen parameters are passed
            through. BatchNorm with running statistics is rejected (use GroupNorm or
            ``torch.func.replace_all_batch_norm_modules_``).
        loss: ``"mse"`` (prediction and target shapes must match) or ``"cross_entropy"``.
        algorithm: ``"maml"``, ``"fomaml"``, ``"reptile"`` or ``"fo_b_maml"``.
        inner_steps: Inner SGD steps ``K >= 1``.
        inner_lr: Inner learning rate ``alpha > 0``.
        eval_inner_steps: Inner steps at validation (default ``inner_steps``).
        reptile_steps: Reptile's ``K_r >= 2`` (``K_r = 1`` is joint training, not meta-learning).
        fd_scheme: ``"symmetric"`` (bias ``O(delta^2)``, 3K+1 gradients) or ``"forward"`` (``O(delta)``, 2K+1).
        fd_delta: Finite-difference length ``delta > 0`` in parameter space (default ``1e-2``, float32).
        adapt_params: Names of the parameters adapted in the inner loop (ANIL-style), ``None`` for all.
        task_chunk_size: ``vmap`` chunk size over tasks (bounds exact MAML's memory), ``None`` for all at once.
        vmap_randomness: ``vmap`` randomness for stochastic layers: ``"error"``, ``"different"`` or ``"same"``.
        monitor_every_n_steps: Period of the exact meta-gradient monitor in optimizer steps, ``None`` to disable.
        monitor_tasks: Tasks in the monitoring batch (``>= 1``).
        optimizer: Outer optimizer factory, e.g. ``MetaOptimizer`` (plain/normalized/clipped) or Adam (default,
            lr 1e-3).
        lr_scheduler: Optional scheduler factory, stepped every optimizer step.

    Raises:
        ValueError: If ``inner_steps < 1``, ``inner_lr <= 0``, ``fd_delta <= 0``, ``reptile_steps < 2``, a name
            (``loss``, ``algorithm``, ``fd_scheme``, ``vmap_randomness``, ``adapt_params``) is unknown, the net has
            BatchNorm with running statistics, or (in ``setup``) the datamodule's support/query shapes do not fit the
            net, or ``algorithm="fo_b_maml"`` meets Dropout layers or a half-precision Trainer (finite differences
            need a deterministic net and 32/64-bit arithmetic; ReLU-type activations only warn).
    """

    def __init__(
        self,
        net: nn.Module,
        loss: Literal["mse", "cross_entropy"] = "mse",
        algorithm: Literal["maml", "fomaml", "reptile", "fo_b_maml"] = "fo_b_maml",
        inner_steps: int = 1,
        inner_lr: float = 0.01,
        eval_inner_steps: int | None = None,
        reptile_steps: int = 5,
        fd_scheme: Literal["forward", "symmetric"] = "symmetric",
        fd_delta: float = 1e-2,
        adapt_params: list[str] | None = None,
        task_chunk_size: int | None = None,
        vmap_randomness: Literal["error", "different", "same"] = "error",
        monitor_every_n_steps: int | None = 50,
        monitor_tasks: int = 32,
        optimizer: OptimizerCallable = torch.optim.Adam,
        lr_scheduler: LRSchedulerCallable | None = None,
    ) -> None:
        super().__init__()
        resolve_loss(loss)
        task_grad_fn(algorithm)
        if inner_steps < 1:
            raise ValueError(f"`inner_steps` must be >= 1, got {inner_steps}.")
        if eval_inner_steps is not None and eval_inner_steps < 1:
            raise ValueError(f"`eval_inner_steps` must be >= 1 or None, got {eval_inner_steps}.")
        if not inner_lr > 0:
            raise ValueError(f"`inner_lr` must be > 0, got {inner_lr}.")
        if not fd_delta > 0:
            raise ValueError(f"`fd_delta` must be > 0, got {fd_delta}.")
        if fd_scheme not in ("forward", "symmetric"):
            raise ValueError(f"`fd_scheme` must be 'forward' or 'symmetric', got {fd_scheme!r}.")
        if reptile_steps < 2:
            raise ValueError(f"`reptile_steps` must be >= 2 (1 is joint training), got {reptile_steps}.")
        if vmap_randomness not in ("error", "different", "same"):
            raise ValueError(f"`vmap_randomness` must be 'error', 'different' or 'same', got {vmap_randomness!r}.")
        if task_chunk_size is not None and task_chunk_size < 1:
            raise ValueError(f"`task_chunk_size` must be >= 1 or None, got {task_chunk_size}.")
        if monitor_every_n_steps is not None and monitor_every_n_steps < 1:
            raise ValueError(f"`monitor_every_n_steps` must be >= 1 or None, got {monitor_every_n_steps}.")
        if monitor_tasks < 1:
            raise ValueError(f"`monitor_tasks` must be >= 1, got {monitor_tasks}.")
        trainable = [n for n, p in net.named_parameters() if p.requires_grad]
        if adapt_params is not None:
            unknown = sorted(set(adapt_params) - set(trainable))
            if unknown or not adapt_params:
                raise ValueError(
                    f"`adapt_params` must be a non-empty subset of the net's trainable parameters {trainable}, "
                    f"got unknown {unknown or adapt_params}."
                )
        batch_norms = [n for n, m in net.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
        if any(getattr(net.get_submodule(n), "track_running_stats", False) for n in batch_norms):
            raise ValueError(
                f"`net` has BatchNorm layers with running statistics ({batch_norms}), which cannot be updated under "
                "vmap; use GroupNorm, track_running_stats=False or torch.func.replace_all_batch_norm_modules_."
            )
        self.save_hyperparameters(ignore=["net", "optimizer", "lr_scheduler"])
        self.net = net
        self.optimizer_factory = optimizer
        self.lr_scheduler_factory = lr_scheduler
        self.automatic_optimization = False
        self._monitor_batch: TaskBatch | None = None

    # ------------------------------------------------------------------------------------------------ helpers
    def _split_params(self) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        params, frozen = {}, {}
        for n, p in self.net.named_parameters():
            (params if p.requires_grad else frozen)[n] = p.detach()
        frozen.update({n: b for n, b in self.net.named_buffers()})
        return params, frozen

    def _common(self, inner_steps: int | None = None) -> dict[str, Any]:
        hp = self.hparams
        return {
            "loss": resolve_loss(hp.loss),
            "inner_lr": hp.inner_lr,
            "inner_steps": inner_steps or hp.inner_steps,
            "adapt_names": None if hp.adapt_params is None else tuple(hp.adapt_params),
        }

    def _algorithm_kwargs(self) -> dict[str, Any]:
        hp = self.hparams
        kwargs = self._common()
        if hp.algorithm == "reptile":
            kwargs["reptile_steps"] = hp.reptile_steps
        if hp.algorithm == "fo_b_maml":
            kwargs.update(fd_scheme=hp.fd_scheme, fd_delta=hp.fd_delta)
        return kwargs

    def meta_gradient(
        self, batch: TaskBatch, algorithm: str | None = None, vectorize: bool = True
    ) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        """Task-mean meta-gradient of ``algorithm`` (default: the configured one) at the current parameters.

        Args:
            batch: Tasks ``(T, ...)``.
            algorithm: One of ``"maml"``, ``"fomaml"``, ``"reptile"``, ``"fo_b_maml"``.
            vectorize: ``vmap`` over tasks (``False``: a per-task Python loop).

        Returns:
            ``(d, stats)``: ``d`` maps trainable parameter names to tensors; ``stats`` holds ``support_loss_pre`` and
            ``query_loss_post`` (task means).
        """
        algorithm = algorithm or self.hparams.algorithm
        kwargs = self._algorithm_kwargs() if algorithm == self.hparams.algorithm else self._common()
        params, frozen = self._split_params()
        return batched_task_grad(
            task_grad_fn(algorithm),
            self.net,
            params,
            frozen,
            batch.support_x,
            batch.support_y,
            batch.query_x,
            batch.query_y,
            vectorize=vectorize,
            chunk_size=self.hparams.task_chunk_size,
            randomness=self.hparams.vmap_randomness,
            **kwargs,
        )

    # ------------------------------------------------------------------------------------------------ Lightning hooks
    @override
    def setup(self, stage: str) -> None:
        if self.hparams.algorithm == "fo_b_maml":
            self._check_finite_differences()
        dm = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        if dm is None or not hasattr(dm, "monitor_batch"):
            return
        self._check_task_shapes(dm.monitor_batch(1))

    def _check_finite_differences(self) -> None:
        stochastic = [n for n, m in self.net.named_modules() if isinstance(m, nn.Dropout) and m.p > 0]
        if stochastic:
            raise ValueError(
                f"algorithm='fo_b_maml' needs a deterministic net (its finite differences compare gradients at nearby "
                f"points), but {stochastic} are Dropout layers; remove them or use another `algorithm`."
            )
        precision = str(self.trainer.precision) if self._trainer is not None else "32"
        if "16" in precision:
            raise ValueError(
                f"algorithm='fo_b_maml' takes finite differences of gradients, which cancel in half precision; got "
                f"Trainer(precision={precision!r}). Use precision '32-true' or '64-true'."
            )
        kinks = [n for n, m in self.net.named_modules() if isinstance(m, (nn.ReLU, nn.LeakyReLU, nn.Hardtanh))]
        if kinks and self.hparams.fd_delta < 1e-1:
            rank_zero_warn(
                f"algorithm='fo_b_maml' with piecewise-linear activations ({kinks}): finite differences across kinks "
                f"are inaccurate at fd_delta={self.hparams.fd_delta}; prefer smooth activations (tanh, GELU) or "
                "fd_delta around 1e-1.",
                category=RuntimeWarning,
            )

    def _check_task_shapes(self, batch: TaskBatch) -> None:
        params, frozen = self._split_params()
        loss = resolve_loss(self.hparams.loss)
        for split, x, y in (("support", batch.support_x, batch.support_y), ("query", batch.query_x, batch.query_y)):
            try:
                with torch.no_grad():
                    task_loss(self.net, params, frozen, x[0].to(self.device), y[0].to(self.device), loss)
            except (RuntimeError, ValueError, IndexError) as err:
                raise ValueError(
                    f"The datamodule's {split} tasks do not match the model: {split}_x {tuple(x.shape[1:])}, "
                    f"{split}_y {tuple(y.shape[1:])} per task with loss={self.hparams.loss!r} failed: {err}"
                ) from err

    @override
    def configure_optimizers(self) -> Any:
        optimizer = self.optimizer_factory([p for p in self.net.parameters() if p.requires_grad])
        return step_scheduler_config(
            optimizer, None if self.lr_scheduler_factory is None else self.lr_scheduler_factory(optimizer)
        )

    @override
    def on_fit_start(self) -> None:
        dm = getattr(self.trainer, "datamodule", None)
        if self.hparams.monitor_every_n_steps is None:
            return
        if dm is None or not hasattr(dm, "monitor_batch"):
            rank_zero_warn(
                "MetaLearningModule: the datamodule has no `monitor_batch(num_tasks)`; the exact meta-gradient "
                "monitor is off.",
                category=RuntimeWarning,
            )
            return
        self._monitor_batch = dm.monitor_batch(self.hparams.monitor_tasks).to(self.device)

    @override
    def training_step(self, batch: TaskBatch, batch_idx: int) -> Tensor:
        step = self.global_step
        every = self.hparams.monitor_every_n_steps
        if every is not None and self._monitor_batch is not None and step % every == 0:
            self._log_monitor(self._monitor_batch)
        d, stats = self.meta_gradient(batch)
        opt = self.optimizers()
        params = [(n, p) for n, p in self.net.named_parameters() if p.requires_grad]
        before = [p.detach().clone() for _, p in params]
        # Surrogate whose gradient is d: Lightning (and DDP) see an ordinary backward.
        surrogate = sum((p * d[n].to(p.dtype)).sum() for n, p in params)
        self.manual_backward(surrogate)
        opt.step()
        opt.zero_grad(set_to_none=True)
        scheduler = self.lr_schedulers()
        if scheduler is not None:
            scheduler.step()
        with torch.no_grad():
            step_norm = tree_norm([p.detach() - b for (_, p), b in zip(params, before)])
        n_tasks = batch.num_tasks
        self.log("train/loss", stats["query_loss_post"], batch_size=n_tasks)
        self.log("train/query_loss_post", stats["query_loss_post"], batch_size=n_tasks)
        self.log("train/support_loss_pre", stats["support_loss_pre"], batch_size=n_tasks)
        self.log("train/meta_grad_norm", tree_norm(d), batch_size=n_tasks)
        self.log("train/outer_step_norm", step_norm, batch_size=n_tasks)
        return stats["query_loss_post"]

    def _log_monitor(self, batch: TaskBatch) -> None:
        exact, stats = self.meta_gradient(batch, algorithm="maml")
        exact_norm = tree_norm(exact)
        if self.hparams.algorithm == "maml":
            rel = torch.zeros_like(exact_norm)
        else:
            d, _ = self.meta_gradient(batch)
            rel = tree_norm({n: d[n] - exact[n] for n in d}) / exact_norm.clamp_min(1e-30)
        self.log("monitor/maml_grad_norm", exact_norm, batch_size=batch.num_tasks)
        self.log("monitor/maml_objective", stats["query_loss_post"], batch_size=batch.num_tasks)
        self.log("monitor/estimator_rel_err", rel, batch_size=batch.num_tasks)

    @override
    def validation_step(self, batch: TaskBatch, batch_idx: int) -> None:
        self._evaluate(batch, "val")

    @override
    def test_step(self, batch: TaskBatch, batch_idx: int) -> None:
        self._evaluate(batch, "test")

    def _evaluate(self, batch: TaskBatch, stage: str) -> None:
        params, frozen = self._split_params()
        common = self._common(self.hparams.eval_inner_steps)
        pre, post = adapt_and_predict(
            self.net,
            params,
            frozen,
            batch.support_x,
            batch.support_y,
            batch.query_x,
            chunk_size=self.hparams.task_chunk_size,
            **common,
        )
        loss = common["loss"]
        n = batch.num_tasks
        per_task = partial(_per_task_loss, loss=loss, target=batch.query_y)
        loss_pre, loss_post = per_task(pre), per_task(post)
        self.log(f"{stage}/query_loss_pre", loss_pre, batch_size=n, sync_dist=True)
        self.log(f"{stage}/query_loss_post", loss_post, batch_size=n, sync_dist=True)
        self.log(f"{stage}/loss", loss_post, batch_size=n, sync_dist=True)
        if self.hparams.loss == "cross_entropy":
            self.log(f"{stage}/acc_pre", (pre.argmax(-1) == batch.query_y).float().mean(), batch_size=n, sync_dist=True)
            self.log(
                f"{stage}/acc_post", (post.argmax(-1) == batch.query_y).float().mean(), batch_size=n, sync_dist=True
            )

    @override
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["meta_learning_torch_rng_state"] = torch.get_rng_state()

    @override
    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        if "meta_learning_torch_rng_state" in checkpoint:
            torch.set_rng_state(checkpoint["meta_learning_torch_rng_state"])


def _per_task_loss(pred: Tensor, loss: Any, target: Tensor) -> Tensor:
    return vmap(loss)(pred, target).mean()
