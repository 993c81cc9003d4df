"""Collaborative strategy
========================

:class:`CollaborativeStrategy` trains ``n`` personal copies of a one-client
:class:`~lightning_epfl.modules.ClientModule` (``collaborative_core.md`` §2). With one process (``devices=1``) all
clients are simulated: their trainable parameters are stacked (:class:`~.stack.ClientStack`) and evaluated with
``torch.func.vmap``; with ``P`` processes (``P`` divides ``n``) each holds a contiguous block of clients and
algorithms communicate over ``torch.distributed`` (gloo on CPU). It subclasses ``DDPStrategy`` for its launcher and
process-group setup but never wraps the model in DDP (whose gradient all-reduce would be FedSGD).

Rules for the user's module: keep automatic optimization; no ``gradient_clip_val``; no gradient accumulation; no
BatchNorm running statistics; do not call ``self(x)`` outside the client hooks (the weights are stacked). Each
process's dataloader must yield batches stacked over ``strategy.local_client_ids`` (``FederatedDataModule`` does),
so ``use_distributed_sampler`` is irrelevant (iterable streams are never wrapped).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from typing import Any, Literal

import torch
from lightning.fabric.utilities.optimizer import _optimizers_to_device
from lightning.pytorch import Callback
from lightning.pytorch.strategies import DDPStrategy
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from lightning.pytorch.utilities.rank_zero import rank_zero_warn
from torch import Tensor, nn
from torch.optim import Optimizer
from typing_extensions import override

import lightning_epfl.strategies.collaborative.algorithm as _alg
from lightning_epfl.strategies.collaborative.communicator import (
    Communicator,
    LocalCommunicator,
    TorchDistributedCommunicator,
)
from lightning_epfl.strategies.collaborative.stack import ClientStack
from lightning_epfl.utilities import atomic_write

ELEMENTWISE_OPTIMIZERS = (
    torch.optim.SGD,
    torch.optim.Adam,
    torch.optim.AdamW,
    torch.optim.RMSprop,
    torch.optim.Adagrad,
    torch.optim.Adamax,
    torch.optim.NAdam,
    torch.optim.RAdam,
)
TOPOLOGIES = ("complete", "ring", "torus", "erdos_renyi")
_FORMAT_VERSION = 1


class _ClientEvaluationLogger(Callback):
    """Internal callback: logs per-client evaluation sums gathered over processes (added by the strategy)."""

    def __init__(self, strategy: CollaborativeStrategy) -> None:
        self.strategy = strategy

    @override
    def on_validation_epoch_start(self, trainer: Any, pl_module: Any) -> None:
        self.strategy._eval_sums.pop("val", None)

    @override
    def on_test_epoch_start(self, trainer: Any, pl_module: Any) -> None:
        self.strategy._eval_sums.pop("test", None)

    @override
    def on_validation_epoch_end(self, trainer: Any, pl_module: Any) -> None:
        self.strategy._log_evaluation("val", pl_module)

    @override
    def on_test_epoch_end(self, trainer: Any, pl_module: Any) -> None:
        self.strategy._log_evaluation("test", pl_module)


class CollaborativeStrategy(DDPStrategy):
    """Train ``n_clients`` personal models, simulated in one process or split over processes.

    Args:
        algorithm: The update rule (:class:`~.algorithm.CollaborativeAlgorithm`; default: Local, no communication).
        n_clients: Number of clients; ``None`` reads ``trainer.datamodule.n_clients``.
        communicate: ``"trainable"``/``"all"`` or glob patterns selecting the communicated parameters.
        topology: Optional communication graph for algorithms that gossip (``complete``, ``ring``, ``torus``,
            ``erdos_renyi``); its mixing matrix (``mixing_rule``) is exposed as :attr:`mixing_W`.
        mixing_rule: ``"uniform"`` or ``"metropolis_hastings"``.
        erdos_renyi_p: Edge probability for ``topology="erdos_renyi"``.
        execution: ``"vmap"`` (vectorized over clients) or ``"loop"`` (reference; models vmap cannot handle).
        client_chunk_size: ``vmap`` chunk over clients (memory bound); ``None`` = all at once.
        strict_optimizer_check: Refuse optimizers that are not element-wise (only for those is one optimizer over
            stacked ``[n, ...]`` tensors the same as ``n`` optimizers).
        log_per_client: Also log ``val/acc_client_{i}``.
        seed: Seed of all algorithm randomness (pair sampling, centre init), per client and step.
        process_group_backend: ``torch.distributed`` backend (``None``: gloo on CPU, NCCL on CUDA).
        start_method: Lightning's DDP launcher start method.

    Raises:
        ValueError: On an unknown ``topology``/``mixing_rule``/``execution``, ``n_clients < 1`` or a bad
            ``client_chunk_size`` (in ``__init__``); in ``setup``: ``n_clients`` not matching the datamodule's, a
            process count not dividing ``n_clients``, a refused module/trainer setting or optimizer.
    """

    strategy_name = "collaborative"

    def __init__(
        self,
        algorithm: _alg.CollaborativeAlgorithm | None = None,
        n_clients: int | None = None,
        communicate: Literal["trainable", "all"] | list[str] = "trainable",
        topology: Literal["complete", "ring", "torus", "erdos_renyi"] | None = None,
        mixing_rule: Literal["uniform", "metropolis_hastings"] = "uniform",
        erdos_renyi_p: float = 0.3,
        execution: Literal["vmap", "loop"] = "vmap",
        client_chunk_size: int | None = None,
        strict_optimizer_check: bool = True,
        log_per_client: bool = False,
        seed: int = 0,
        process_group_backend: str | None = None,
        start_method: Literal["popen", "spawn", "fork"] = "popen",
    ) -> None:
        super().__init__(process_group_backend=process_group_backend, start_method=start_method)
        if n_clients is not None and n_clients < 1:
            raise ValueError(f"`n_clients` must be >= 1 or None, got {n_clients}.")
        if topology is not None and topology not in TOPOLOGIES:
            raise ValueError(f"`topology` must be one of {TOPOLOGIES} or None, got {topology!r}.")
        if mixing_rule not in ("uniform", "metropolis_hastings"):
            raise ValueError(f"`mixing_rule` must be 'uniform' or 'metropolis_hastings', got {mixing_rule!r}.")
        if execution not in ("vmap", "loop"):
            raise ValueError(f"`execution` must be 'vmap' or 'loop', got {execution!r}.")
        if client_chunk_size is not None and client_chunk_size < 1:
            raise ValueError(f"`client_chunk_size` must be >= 1 or None, got {client_chunk_size}.")
        self.algorithm = algorithm if algorithm is not None else _alg.CollaborativeAlgorithm()
        self._n_clients_arg = n_clients
        self.communicate = communicate
        self.topology_name = topology
        self.mixing_rule = mixing_rule
        self.erdos_renyi_p = erdos_renyi_p
        self.execution = execution
        self.client_chunk_size = client_chunk_size
        self.strict_optimizer_check = strict_optimizer_check
        self.log_per_client = log_per_client
        self.seed = seed
        self.n_clients: int | None = n_clients
        self.stack: ClientStack | None = None
        self.comm: Communicator | None = None
        self.ctx: _alg.StepContext | None = None
        self.mixing_W: Tensor | None = None
        self._eval_sums: dict[str, dict[str, Tensor]] = {}
        self._algorithm_ready = False

    # ------------------------------------------------------------------------------------------------ properties
    @property
    def local_client_ids(self) -> tuple[int, ...]:
        """The clients held by this process (contiguous block; all clients when simulated)."""
        if self.comm is None:
            raise RuntimeError("`local_client_ids` is known after `setup`.")
        return self.comm.local_ids

    @property
    @override
    def restore_checkpoint_after_setup(self) -> bool:
        return True  # parameters are stacked in setup; restore into the stacked tensors

    # ------------------------------------------------------------------------------------------------ setup
    @override
    def _configure_launcher(self) -> None:
        if self.num_nodes * self.num_processes == 1:
            # simulated mode: run in this process, and keep the user's torch thread count (Lightning's launchers
            # would set it to cpu_count / processes and export OMP_NUM_THREADS)
            self._launcher = None
            return
        super()._configure_launcher()

    @override
    def setup_distributed(self) -> None:
        if self.num_nodes * self.num_processes == 1:
            self.set_world_ranks()  # simulated mode: no process group needed
            return
        super().setup_distributed()

    def check_config(self, trainer: Any, pl_module: Any, datamodule: Any = None) -> None:
        """Check the client count against the datamodule and the process count, before any process starts.

        Called by the ``lightning-epfl`` CLI before the run and from :meth:`setup`.

        Raises:
            MisconfigurationException: If ``n_clients`` is unknown, differs from the datamodule's, or is not
                divisible by ``trainer.devices x trainer.num_nodes`` (the message lists the process counts that work).
        """
        self._resolve_n_clients(datamodule, trainer.num_devices * trainer.num_nodes)

    def _resolve_n_clients(self, datamodule: Any, world_size: int) -> int:
        dm_n = getattr(datamodule, "n_clients", None) if datamodule is not None else None
        n = self._n_clients_arg
        if n is None:
            if dm_n is None:
                raise MisconfigurationException(
                    "`n_clients` is None and the datamodule has no `n_clients`; set the strategy's `n_clients`."
                )
            n = int(dm_n)
        elif dm_n is not None and int(dm_n) != n:
            raise MisconfigurationException(
                f"`n_clients`={n} does not match the datamodule's partition into {dm_n} clients "
                "(`data.init_args.n_clients`); set them equal or leave the strategy's `n_clients` as None."
            )
        if n % world_size:
            ok = [d for d in range(1, n + 1) if n % d == 0]
            raise MisconfigurationException(
                f"`n_clients`={n} must be divisible by the number of processes, `trainer.devices` x "
                f"`trainer.num_nodes` = {world_size}; use `trainer.devices` in {ok} (one node) or change `n_clients`."
            )
        return n

    def _check_module_and_trainer(self, trainer: Any, module: nn.Module) -> None:
        lm = self.lightning_module
        if not lm.automatic_optimization:
            raise MisconfigurationException("CollaborativeStrategy needs `automatic_optimization=True`.")
        if trainer.accumulate_grad_batches != 1:
            raise MisconfigurationException(
                "`accumulate_grad_batches` must be 1 under CollaborativeStrategy, "
                f"got {trainer.accumulate_grad_batches}."
            )
        if trainer.gradient_clip_val:
            raise MisconfigurationException(
                "`gradient_clip_val` would clip one norm across all clients; it is not supported by "
                "CollaborativeStrategy (per-client clipping is an algorithm concern)."
            )
        for name, m in module.named_modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats:
                raise MisconfigurationException(
                    f"`{name}` is a BatchNorm with running statistics, which CollaborativeStrategy does not stack; "
                    "use GroupNorm/LayerNorm or `track_running_stats=False`."
                )
        if getattr(lm, "example_input_array", None) is not None:
            rank_zero_warn(
                "Clearing `example_input_array`: a forward on stacked weights is not a client forward.",
                category=RuntimeWarning,
            )
            lm.example_input_array = None

    def _check_optimizers(self) -> None:
        if not self.strict_optimizer_check:
            return
        for opt in self.optimizers:
            inner = getattr(opt, "optimizer", opt)
            if type(inner) not in ELEMENTWISE_OPTIMIZERS:
                allowed = ", ".join(o.__name__ for o in ELEMENTWISE_OPTIMIZERS)
                raise ValueError(
                    f"optimizer {type(inner).__name__} is not element-wise, so one optimizer over stacked clients is "
                    f"not n independent optimizers. Allowed: {allowed}; or set `strict_optimizer_check=False`."
                )

    def _build_topology(self, n: int) -> None:
        if self.topology_name is None:
            return
        from lightning_epfl.functional.topology import Topology, mixing_matrix

        if self.topology_name == "complete":
            topo = Topology.complete(n)
        elif self.topology_name == "ring":
            topo = Topology.ring(n)
        elif self.topology_name == "torus":
            topo = Topology.torus(n)
        else:
            topo = Topology.erdos_renyi(n, self.erdos_renyi_p, seed=self.seed)
        self.topology = topo
        self.mixing_W = mixing_matrix(topo, self.mixing_rule)

    @override
    def setup(self, trainer: Any) -> None:
        assert self.accelerator is not None and self.model is not None
        self.accelerator.setup(trainer)
        module = self.lightning_module
        self._check_module_and_trainer(trainer, module)
        n = self._resolve_n_clients(trainer.datamodule, self.world_size)
        self.n_clients = n
        if self.world_size == 1:
            self.comm = LocalCommunicator(n)
        else:
            self.comm = TorchDistributedCommunicator(n)
        self.precision_plugin.convert_module(self.model)
        self.model_to_device()
        existing = getattr(module, "_collaborative_stack", None)
        if existing is not None:
            if existing.n_local != len(self.comm.local_ids):
                raise ValueError("this module was stacked for a different number of local clients.")
            self.stack = existing
        else:
            if self.world_size > 1:  # client_init="same": every client starts from rank 0's template
                for p in module.parameters():
                    torch.distributed.broadcast(p.data, src=0)
            self.stack = ClientStack(
                module, len(self.comm.local_ids), self.communicate, self.execution, self.client_chunk_size
            )
            object.__setattr__(module, "_collaborative_stack", self.stack)
        self._build_topology(n)
        if trainer.state.fn == TrainerFn.FITTING:
            self.setup_optimizers(trainer)
            self._check_optimizers()
        self.setup_precision_plugin()
        if trainer.state.fn == TrainerFn.FITTING:
            _optimizers_to_device(self.optimizers, self.root_device)
        self.ctx = _alg.StepContext(
            stack=self.stack,
            comm=self.comm,
            seed=self.seed,
            datamodule=trainer.datamodule,
            step=trainer.global_step,
            max_steps=trainer.max_steps,
        )
        if self.optimizers:
            self.ctx.lr = float(self.optimizers[0].param_groups[0]["lr"])
        if not self._algorithm_ready:
            self.algorithm.setup(self.ctx)
            self._algorithm_ready = True
        if not any(isinstance(cb, _ClientEvaluationLogger) for cb in trainer.callbacks):
            trainer.callbacks.append(_ClientEvaluationLogger(self))

    # ------------------------------------------------------------------------------------------------ training
    @override
    def on_train_start(self) -> None:
        super().on_train_start()
        loader = self.lightning_module.trainer.train_dataloader
        loaders = loader if isinstance(loader, (list, tuple)) else [loader]
        for dl in loaders:
            if getattr(dl, "num_workers", 0) > 0:
                raise MisconfigurationException(
                    f"the training DataLoader has `num_workers`={dl.num_workers}; CollaborativeStrategy needs "
                    "`num_workers=0` (per-client streams are stateful and stacked in the main process)."
                )

    def _refresh_ctx(self) -> _alg.StepContext:
        ctx = self.ctx
        assert ctx is not None
        trainer = self.lightning_module.trainer
        ctx.step = trainer.global_step
        ctx.max_steps = trainer.max_steps
        if self.optimizers:
            ctx.lr = float(self.optimizers[0].param_groups[0]["lr"])
        return ctx

    @override
    def training_step(self, *args: Any, **kwargs: Any) -> Tensor:
        batch = args[0] if args else kwargs["batch"]
        ctx = self._refresh_ctx()
        with self.precision_plugin.train_step_context():
            G, losses = self.algorithm.compute_gradients(ctx, batch)
            ctx.G = G
            params = self.stack.parameters()
            s = sum(
                (G[:, sl.offset : sl.offset + sl.numel].reshape(p.shape) * p).sum()
                for sl, p in zip(self.stack.layout, params)
            )
            mean_loss = self.comm.all_reduce(losses.detach().sum()) / self.n_clients
            self.lightning_module.log("train/loss", mean_loss, prog_bar=True)
            return losses.mean().detach() + s - s.detach()

    @override
    def optimizer_step(self, optimizer: Optimizer, closure: Callable[[], Any], model: Any = None, **kwargs: Any) -> Any:
        ctx = self._refresh_ctx()

        def wrapped_closure() -> Any:
            out = closure()
            ctx.G = self.stack.grads_flat()
            with torch.no_grad():
                self.algorithm.before_optimizer_step(ctx)
            return out

        out = super().optimizer_step(optimizer, wrapped_closure, model, **kwargs)
        with torch.no_grad():
            self.algorithm.after_optimizer_step(ctx)
        metrics = self.algorithm.step_metrics()
        if metrics:
            self.lightning_module.log_dict({k: float(v) for k, v in metrics.items()})
        return out

    # ------------------------------------------------------------------------------------------------ evaluation
    def _eval_step(self, stage: str, batch: Any) -> None:
        ctx = self._refresh_ctx()
        rows = self.algorithm.evaluation_rows(ctx)
        m = self.stack.metrics(rows, batch)
        sums = self._eval_sums.setdefault(stage, {})
        for k, v in m.items():
            v = v.detach().to(torch.float64)
            sums[k] = sums[k] + v if k in sums else v

    @override
    def validation_step(self, *args: Any, **kwargs: Any) -> None:
        with self.precision_plugin.val_step_context():
            self._eval_step("val", args[0] if args else kwargs["batch"])

    @override
    def test_step(self, *args: Any, **kwargs: Any) -> None:
        with self.precision_plugin.test_step_context():
            self._eval_step("test", args[0] if args else kwargs["batch"])

    def client_metrics_all(self, stage: str = "val") -> dict[str, Tensor]:
        """The last epoch's per-client evaluation sums, gathered to ``{name: [n]}`` (collective)."""
        sums = self._eval_sums.get(stage, {})
        return {k: self.comm.all_gather(v) for k, v in sorted(sums.items())}

    def _log_evaluation(self, stage: str, pl_module: Any) -> None:
        if stage not in self._eval_sums or self.comm is None:
            return
        allm = self.client_metrics_all(stage)
        count = allm["count"].clamp_min(1)
        per_loss = allm["loss_sum"] / count
        out: dict[str, float] = {f"{stage}/loss_mean": float(per_loss.mean())}
        if "correct" in allm:
            acc = allm["correct"] / count
            out[f"{stage}/acc_mean"] = float(acc.mean())
            out[f"{stage}/acc_min"] = float(acc.min())
            if self.log_per_client:
                out.update({f"{stage}/acc_client_{i}": float(a) for i, a in enumerate(acc)})
            self.last_client_accuracy = {**getattr(self, "last_client_accuracy", {}), stage: acc.cpu()}
        out.update(self.collaboration_metrics())
        pl_module.log_dict(out, sync_dist=True)  # equal on every process (gathered): the mean is the value

    def collaboration_metrics(self) -> dict[str, float]:
        """``collab/*`` metrics: consensus distance and, with a matrix and true clusters, recovery (collective)."""
        from lightning_epfl.functional.collab_metrics import consensus_distance, recovery_metrics

        X_all = self.comm.all_gather(self.stack.X[:, : self.stack.d_comm].detach())
        out = {"collab/consensus_distance": float(consensus_distance(X_all))}
        W = self.algorithm.collaboration_matrix()
        truth = getattr(self.ctx.datamodule, "true_clusters", None) if self.ctx is not None else None
        if W is not None and truth is not None:
            rec = recovery_metrics(W.cpu(), torch.as_tensor(truth).cpu(), seed=self.seed)
            out.update({f"collab/{k}": v for k, v in rec.items()})
        return out

    # ------------------------------------------------------------------------------------------------ models
    def client_state_dict(self, i: int) -> dict[str, Tensor]:
        """Client ``i``'s trainable tensors as a one-client state dict (collective in multi-process mode)."""
        rows = self.comm.all_gather(self.algorithm.evaluation_rows(self._refresh_ctx()).detach())
        return self.stack.row_state_dict(rows[i])

    def consensus_state_dict(self) -> dict[str, Tensor]:
        """The mean over clients of the trainable tensors (collective in multi-process mode)."""
        rows = self.comm.all_gather(self.stack.X.detach())
        return self.stack.row_state_dict(rows.mean(0))

    # ------------------------------------------------------------------------------------------------ checkpoints
    def _stacked_names(self) -> set[str]:
        return set(self.stack.names) if self.stack is not None else set()

    @override
    def lightning_module_state_dict(self) -> dict[str, Any]:
        state = self.lightning_module.state_dict()
        if self.stack is None or self.world_size == 1:
            return state
        return {k: (self.comm.all_gather(v) if k in self._stacked_names() else v) for k, v in state.items()}

    def _local_slice(self, t: Tensor) -> Tensor:
        ids = self.comm.local_ids
        return t[ids[0] : ids[-1] + 1]

    @override
    def load_model_state_dict(self, checkpoint: Mapping[str, Any], strict: bool = True) -> None:
        names = self._stacked_names()
        state = {k: (self._local_slice(v) if k in names else v) for k, v in checkpoint["state_dict"].items()}
        with torch.no_grad():
            self.lightning_module.load_state_dict(state, strict=strict)

    def _map_optimizer_state(self, optimizer: Optimizer, state: dict[str, Any], fn: Callable[[Tensor], Tensor]) -> dict:
        params = [p for g in optimizer.param_groups for p in g["params"]]
        stacked = {id(p) for p in self.stack.parameters()}
        n_local = self.stack.n_local
        new_state = {}
        for idx, s in state["state"].items():
            p = params[idx]
            new_state[idx] = {
                k: (
                    fn(v)
                    if id(p) in stacked
                    and isinstance(v, Tensor)
                    and v.dim() > 0
                    and v.shape[0] in (n_local, self.n_clients)
                    else v
                )
                for k, v in s.items()
            }
        return {"state": new_state, "param_groups": state["param_groups"]}

    @override
    def optimizer_state(self, optimizer: Optimizer) -> dict[str, Tensor]:
        inner = getattr(optimizer, "_optimizer", optimizer)
        state = inner.state_dict()
        if self.stack is None or self.world_size == 1:
            return state
        return self._map_optimizer_state(inner, state, self.comm.all_gather)

    @override
    def load_optimizer_state_dict(self, checkpoint: Mapping[str, Any]) -> None:
        for optimizer, opt_state in zip(self.optimizers, checkpoint["optimizer_states"]):
            inner = getattr(optimizer, "_optimizer", optimizer)
            if self.world_size > 1:
                opt_state = self._map_optimizer_state(inner, opt_state, self._local_slice)
            optimizer.load_state_dict(opt_state)
        _optimizers_to_device(self.optimizers, self.root_device)

    def collaborative_state(self) -> dict[str, Any]:
        """The checkpoint's ``"collaborative"`` entry (replicated state only; no collective)."""
        return {
            "format_version": _FORMAT_VERSION,
            "n_clients": self.n_clients,
            "mixing_W": self.mixing_W,
            "algorithm": self.algorithm.state_dict(),
        }

    @override
    def save_checkpoint(self, checkpoint: dict[str, Any], filepath: Any, storage_options: Any = None) -> None:
        checkpoint["collaborative"] = self.collaborative_state()
        if not self.is_global_zero:
            return
        path = os.fspath(filepath)
        if "://" in path:  # remote filesystems: no rename
            self.checkpoint_io.save_checkpoint(checkpoint, filepath, storage_options=storage_options)
            return
        atomic_write(
            path, lambda tmp: self.checkpoint_io.save_checkpoint(checkpoint, tmp, storage_options=storage_options)
        )

    @override
    def load_checkpoint(self, checkpoint_path: Any, weights_only: bool | None = None) -> dict[str, Any]:
        checkpoint = super().load_checkpoint(checkpoint_path, weights_only=False)
        entry = checkpoint.get("collaborative")
        if entry is not None:
            if self.n_clients is not None and entry["n_clients"] != self.n_clients:
                raise ValueError(f"checkpoint has {entry['n_clients']} clients but `n_clients` is {self.n_clients}.")
            self.algorithm.load_state_dict(entry["algorithm"])
        return checkpoint

    # ------------------------------------------------------------------------------------------------ registry
    @classmethod
    @override
    def register_strategies(cls, strategy_registry: Any) -> None:
        strategy_registry.register("collaborative", cls, description="Collaborative learning over stacked clients")
