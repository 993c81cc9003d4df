"""Collaborative strategy
========================

:class:`CollaborativeStrategy` trains ``n`` personal copies of a one-client module (a
:class:`~lightning_epfl.modules.ClientModule`, or a ``CausalLMModule`` with LoRA adapters) under a pluggable
:class:`~.algorithm.CollaborativeAlgorithm` (CoBo, Decor, the baselines). With one process
(``devices=1``) all clients are simulated: their trainable parameters are stacked (:class:`~.stack.ClientStack`) and
evaluated with ``torch.func.vmap``; with ``P`` processes (``P`` divides ``n``) each holds a contiguous block of
clients and algorithms communicate over ``torch.distributed`` (gloo on CPU). It subclasses ``DDPStrategy`` for its
launcher, process-group setup and ``setup`` sequence, and stacks the clients at ``configure_ddp``, the point where
DDP would wrap the model (its gradient all-reduce would be FedSGD).

The model summary counts the parameters this process holds: ``n_local`` stacked copies of the trainable ones.

Rules for the user's module: keep automatic optimization; no ``gradient_clip_val``; no gradient accumulation; no
BatchNorm running statistics; do not call ``self(x)`` outside the client hooks (the weights are stacked). Each
process's dataloader must yield batches stacked over ``strategy.local_client_ids`` (``FederatedDataModule`` and
``FederatedTextDataModule`` do).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any, Literal

import torch
from lightning.pytorch import Callback
from lightning.pytorch.strategies import DDPStrategy
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from lightning.pytorch.utilities.rank_zero import rank_zero_warn
from torch import Tensor, nn
from torch.optim import Optimizer
from typing_extensions import override

import lightning_epfl.strategies.collaborative.algorithm as _alg
from lightning_epfl._lightning_compat import InProcessWhenSimulated, optimizers_to_device
from lightning_epfl.checkpoint_io import AtomicCheckpointIO
from lightning_epfl.functional.topology import Topology, mixing_matrix
from lightning_epfl.seeding import derive_seed
from lightning_epfl.strategies.collaborative.communicator import (
    Communicator,
    LocalCommunicator,
    TorchDistributedCommunicator,
)
from lightning_epfl.strategies.collaborative.stack import ClientStack

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
_FORMAT_VERSION = 2


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


def metrics_from_sums(module: Any, sums: dict[str, Tensor]) -> dict[str, Tensor]:
    """Per-client metrics ``{name: [n]}`` from per-client evaluation sums, through the module's own rule.

    Uses ``module.metrics_from_sums`` when the module defines it (``ClientModule`` and ``CausalLMModule`` do);
    otherwise every ``<name>_sum`` is divided by ``count``.
    """
    fn = getattr(module, "metrics_from_sums", None)
    if callable(fn):
        return fn(sums)
    count = sums["count"].clamp_min(1)
    return {k[: -len("_sum")]: v / count for k, v in sums.items() if k.endswith("_sum")}


class CollaborativeStrategy(InProcessWhenSimulated, DDPStrategy):
    """Train ``n_clients`` personal models under one collaborative algorithm, simulated or over processes.

    The algorithm is the only thing that changes between methods: ``CollaborativeStrategy(algorithm=CoBo(...))``,
    ``algorithm=FedAvg()``, ``algorithm=Ditto(lam=0.1)`` ...; in YAML ``algorithm: {class_path:
    lightning_epfl.strategies.CoBo, init_args: {rho: 0.3}}``.

    Logged at every evaluation (``val/`` and ``test/``): for each metric the module defines (``loss``, ``acc``,
    ``ppl`` ...), the mean over clients under the same key as without the strategy (``val/acc``), and with
    ``log_per_client`` one key per client (``val/acc_client_{i}``); ``val/acc_min`` (worst client); ``collab/*``
    (consensus distance; with a collaboration matrix and true clusters, cluster recovery: ``collab/w_within``,
    ``collab/w_between``, ``collab/pair_accuracy``, ``collab/ari_components``, ``collab/ari_spectral``). Training:
    ``train/loss`` (mean over clients) and the algorithm's step metrics.

    Args:
        algorithm: The update rule (default :class:`~.baselines.Local`: no communication).
        n_clients: Number of clients; ``None`` reads ``trainer.datamodule.n_clients``.
        topology: Communication graph for algorithms that gossip or need neighbours: ``"complete"``, ``"ring"``,
            ``"torus"``, ``"erdos_renyi"``, or an ``[n, n]`` 0/1 adjacency matrix (must be connected). Its mixing
            matrix, neighbour lists and edge list are on the step context and in checkpoints.
        mixing_rule: ``"uniform"`` (max-degree) or ``"metropolis_hastings"`` weights of the mixing matrix.
        erdos_renyi_p: Edge probability for ``topology="erdos_renyi"`` (drawn from ``seed``).
        communicate: ``"trainable"``/``"all"`` or a list of glob patterns selecting the communicated parameters
            (the others stay personal), e.g. ``["*lora_A*", "*lora_B*"]``.
        client_init: ``"same"`` (every client starts from rank 0's weights) or ``"independent"`` (each client's
            trainable modules re-initialized under a generator seeded by ``(seed, client_id)``).
        execution: ``"vmap"`` (vectorized over clients) or ``"loop"`` (reference; models vmap cannot handle).
        client_chunk_size: ``vmap`` chunk over clients (memory bound); ``None`` = all at once.
        strict_optimizer_check: Refuse optimizers that are not element-wise (only for those is one optimizer over
            stacked ``[n, ...]`` tensors the same as ``n`` optimizers).
        log_per_client: Also log ``<stage>/<metric>_client_{i}``.
        save_frozen: Write frozen (shared, not stacked) parameters into checkpoints. ``False`` keeps checkpoints
            to the per-client tensors (e.g. LoRA adapters over a base the module reloads from ``pretrained_path``)
            plus a SHA-256 fingerprint of the base, checked on resume.
        seed: Seed of all algorithm randomness (pair sampling, centre init, independent client init, topology).
        process_group_backend: ``torch.distributed`` backend (``None``: gloo on CPU, NCCL on CUDA).
        start_method: Lightning's DDP launcher start method.

    Raises:
        MisconfigurationException: On an unknown ``topology``/``mixing_rule``/``execution``/``client_init``, a
            disconnected or malformed adjacency, ``n_clients < 1`` or a bad ``client_chunk_size`` (in ``__init__``);
            before the run (:meth:`check_config`): ``n_clients`` not matching the datamodule's or not divisible by
            the process count, a topology that cannot be built for ``n_clients``; in ``setup``: a refused module,
            trainer setting or optimizer.
    """

    strategy_name = "collaborative"

    def __init__(
        self,
        algorithm: _alg.CollaborativeAlgorithm | None = None,
        n_clients: int | None = None,
        topology: Literal["complete", "ring", "torus", "erdos_renyi"] | list[list[int]] | None = None,
        mixing_rule: Literal["uniform", "metropolis_hastings"] = "uniform",
        erdos_renyi_p: float = 0.3,
        communicate: Literal["trainable", "all"] | list[str] = "trainable",
        client_init: Literal["same", "independent"] = "same",
        execution: Literal["vmap", "loop"] = "vmap",
        client_chunk_size: int | None = None,
        strict_optimizer_check: bool = True,
        log_per_client: bool = False,
        save_frozen: bool = True,
        seed: int = 0,
        process_group_backend: str | None = None,
        start_method: Literal["popen", "spawn", "fork"] = "popen",
    ) -> None:
        super().__init__(
            process_group_backend=process_group_backend, start_method=start_method, checkpoint_io=AtomicCheckpointIO()
        )
        if n_clients is not None and n_clients < 1:
            raise MisconfigurationException(f"`n_clients` must be >= 1 or None, got {n_clients}.")
        self._custom_topology: Topology | None = None
        if isinstance(topology, (list, tuple)):
            self._custom_topology = _custom_topology(topology, n_clients)
        elif topology is not None and topology not in TOPOLOGIES:
            raise MisconfigurationException(
                f"`topology` must be one of {TOPOLOGIES}, an [n, n] 0/1 adjacency matrix, or None; got {topology!r}."
            )
        if mixing_rule not in ("uniform", "metropolis_hastings"):
            raise MisconfigurationException(
                f"`mixing_rule` must be 'uniform' or 'metropolis_hastings', got {mixing_rule!r}."
            )
        if not 0.0 < erdos_renyi_p <= 1.0:
            raise MisconfigurationException(f"`erdos_renyi_p` must be in (0, 1], got {erdos_renyi_p}.")
        if execution not in ("vmap", "loop"):
            raise MisconfigurationException(f"`execution` must be 'vmap' or 'loop', got {execution!r}.")
        if client_init not in ("same", "independent"):
            raise MisconfigurationException(f"`client_init` must be 'same' or 'independent', got {client_init!r}.")
        if client_chunk_size is not None and client_chunk_size < 1:
            raise MisconfigurationException(f"`client_chunk_size` must be >= 1 or None, got {client_chunk_size}.")
        if algorithm is not None and not isinstance(algorithm, _alg.CollaborativeAlgorithm):
            raise MisconfigurationException(
                f"`algorithm` must be a CollaborativeAlgorithm (CoBo, FedAvg, Ditto, ...), got {type(algorithm)}."
            )
        from lightning_epfl.strategies.collaborative.baselines import Local

        self.algorithm = algorithm if algorithm is not None else Local()
        self._n_clients_arg = n_clients
        self.topology_name = None if isinstance(topology, (list, tuple)) else topology
        self.mixing_rule = mixing_rule
        self.erdos_renyi_p = erdos_renyi_p
        self.communicate = communicate
        self.client_init = client_init
        self.execution = execution
        self.client_chunk_size = client_chunk_size
        self.strict_optimizer_check = strict_optimizer_check
        self.log_per_client = log_per_client
        self.save_frozen = save_frozen
        self.seed = seed
        self.n_clients: int | None = n_clients
        self.stack: ClientStack | None = None
        self.comm: Communicator | None = None
        self.ctx: _alg.StepContext | None = None
        self.topology: Topology | None = None
        self.mixing_W: Tensor | None = None
        self.last_client_metrics: dict[str, dict[str, Tensor]] = {}
        self._restored_topology: Topology | None = None
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

    # ------------------------------------------------------------------------------------------------ checks
    def check_config(self, trainer: Any, pl_module: Any, datamodule: Any = None) -> None:
        """Checks that need the trainer and data, run before any process starts (CLI) and again in ``setup``.

        Raises:
            MisconfigurationException: If ``n_clients`` is unknown, differs from the datamodule's, is not divisible
                by ``trainer.devices x trainer.num_nodes`` (the message lists the counts that work), or the topology
                cannot be built for it.
        """
        n = self._resolve_n_clients(datamodule, trainer.num_devices * trainer.num_nodes)
        topology = self._build_topology(n)
        self._check_communicate(pl_module)
        self.algorithm.check_config(trainer, pl_module, datamodule, n, topology)
        if (self.topology_name is not None or self._custom_topology is not None) and not self.algorithm.uses_topology:
            rank_zero_warn(
                f"`topology` is set but {type(self.algorithm).__name__} does not communicate along it (it averages or "
                "pairs over all clients); the topology only adds `collab/spectral_gap`.",
                category=RuntimeWarning,
            )

    def _check_communicate(self, pl_module: Any) -> None:
        if isinstance(self.communicate, str) or pl_module is None:
            return
        import fnmatch

        names = [n for n, p in pl_module.named_parameters() if p.requires_grad]
        if names and not any(fnmatch.fnmatchcase(n, pat) for n in names for pat in self.communicate):
            raise MisconfigurationException(
                f"`communicate` patterns {self.communicate} match no trainable parameter; names look like {names[:3]}."
            )

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

    def _build_topology(self, n: int) -> Topology | None:
        if self._custom_topology is not None:
            if self._custom_topology.n != n:
                raise MisconfigurationException(
                    f"`topology` is a {self._custom_topology.n}-client adjacency but `n_clients` is {n}."
                )
            return self._custom_topology
        if self.topology_name is None:
            return None
        try:
            if self.topology_name == "complete":
                return Topology.complete(n)
            if self.topology_name == "ring":
                return Topology.ring(n)
            if self.topology_name == "torus":
                return Topology.torus(n)
            return Topology.erdos_renyi(n, self.erdos_renyi_p, seed=self.seed)
        except ValueError as err:
            raise MisconfigurationException(f"`topology`={self.topology_name!r} with {n} clients: {err}") from err

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
        if not callable(getattr(lm, "client_loss", None)) or not callable(getattr(lm, "client_metrics", None)):
            raise MisconfigurationException(
                f"{type(lm).__name__} is not a client module: CollaborativeStrategy needs `client_loss(batch)` and "
                "`client_metrics(batch)` (see lightning_epfl.modules.ClientModule)."
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
                raise MisconfigurationException(
                    f"optimizer {type(inner).__name__} is not element-wise, so one optimizer over stacked clients is "
                    f"not n independent optimizers. Allowed: {allowed}; or set `strict_optimizer_check=False`."
                )

    # ------------------------------------------------------------------------------------------------ setup
    @override
    def setup(self, trainer: Any) -> None:
        assert self.model is not None
        module = self.lightning_module
        self._check_module_and_trainer(trainer, module)
        self.n_clients = n = self._resolve_n_clients(trainer.datamodule, self.world_size)
        self.comm = LocalCommunicator(n) if self.world_size == 1 else TorchDistributedCommunicator(n)
        topology = self._restored_topology or self._build_topology(n)
        self.algorithm.check_config(trainer, module, trainer.datamodule, n, topology)
        self.topology = topology
        self.mixing_W = None if topology is None else mixing_matrix(topology, self.mixing_rule)
        if trainer.state.fn == TrainerFn.FITTING:
            super().setup(trainer)  # device placement, `configure_ddp` (stacking, below), optimizers, precision
            self._check_optimizers()
        else:
            # DDPStrategy.setup would broadcast rank 0's module state to every process outside fitting, which would
            # overwrite the other processes' clients; evaluation needs device placement and the stack only.
            assert self.accelerator is not None
            self.accelerator.setup(trainer)
            self.precision_plugin.convert_module(self.model)
            self.model_to_device()
            self._stack_clients()
            self.setup_precision_plugin()
        self.ctx = _alg.StepContext(
            stack=self.stack,
            comm=self.comm,
            seed=self.seed,
            datamodule=trainer.datamodule,
            step=trainer.global_step,
            max_steps=trainer.max_steps,
            topology=topology,
            mixing_W=self.mixing_W,
        )
        if self.optimizers:
            self.ctx.lr = float(self.optimizers[0].param_groups[0]["lr"])
        self.algorithm.check_trainer(trainer, list(self.optimizers))
        if not self._algorithm_ready:
            self.algorithm.setup(self.ctx)
            self._algorithm_ready = True
        if not any(isinstance(cb, _ClientEvaluationLogger) for cb in trainer.callbacks):
            trainer.callbacks.append(_ClientEvaluationLogger(self))

    @override
    def configure_ddp(self) -> None:
        """Stack the clients where ``DDPStrategy`` wraps the model in DDP (no gradient all-reduce between clients)."""
        self._stack_clients()

    def _stack_clients(self) -> None:
        module = self.lightning_module
        assert self.comm is not None
        existing = getattr(module, "_collaborative_stack", None)
        if existing is not None:
            if existing.n_local != len(self.comm.local_ids):
                raise MisconfigurationException("this module was stacked for a different number of local clients.")
            self.stack = existing
            return
        if self.world_size > 1 and self.client_init == "same":  # every client starts from rank 0's trainable weights
            for p in module.parameters():
                if p.requires_grad:
                    torch.distributed.broadcast(p.data, src=0)
        try:
            self.stack = ClientStack(
                module,
                len(self.comm.local_ids),
                self.communicate,
                self.execution,
                self.client_chunk_size,
                client_ids=self.comm.local_ids,
                client_init=self.client_init,
                seed=self.seed,
            )
        except ValueError as err:
            raise MisconfigurationException(f"CollaborativeStrategy: {err}") from err
        object.__setattr__(module, "_collaborative_stack", self.stack)

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
        with self.precision_plugin.train_step_context(), self._step_rng(ctx.step):
            G, losses = self.algorithm.compute_gradients(ctx, batch)
            ctx.G = G
            params = self.stack.parameters()
            s = sum(
                (G[:, sl.offset : sl.offset + sl.numel].reshape(p.shape) * p).sum()
                for sl, p in zip(self.stack.layout, params)
            )
            if getattr(self.algorithm, "log_training_loss", True):  # off where the loss itself is private
                mean_loss = self.comm.all_reduce(losses.detach().sum()) / self.n_clients
                self.lightning_module.log("train/loss", mean_loss, prog_bar=True)
            return losses.mean().detach() + s - s.detach()

    @contextmanager
    def _step_rng(self, step: int) -> Iterator[None]:
        """The global RNG forked and seeded by ``(seed, step, process)`` for the step's forward passes: dropout masks
        are a function of the step, so a resumed run draws what the uninterrupted one drew (the caller's RNG state is
        restored afterwards)."""
        devices = [self.root_device] if self.root_device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices, device_type=self.root_device.type):
            torch.manual_seed(derive_seed(self.seed, "step_rng", step, self.global_rank))
            yield

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
        if ctx.stop_requested:
            self.lightning_module.trainer.should_stop = True
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
        per_client = metrics_from_sums(self.lightning_module, self.client_metrics_all(stage))
        self.last_client_metrics[stage] = {k: v.cpu() for k, v in per_client.items()}
        out: dict[str, float] = {}
        for name, values in per_client.items():
            out[f"{stage}/{name}"] = float(values.mean())
            if self.log_per_client:
                out.update({f"{stage}/{name}_client_{i}": float(v) for i, v in enumerate(values)})
        if "acc" in per_client:
            out[f"{stage}/acc_min"] = float(per_client["acc"].min())
        out.update(self.collaboration_metrics())
        pl_module.log_dict(out, sync_dist=True)  # equal on every process (gathered): the mean is the value

    def collaboration_matrix(self) -> Tensor | None:
        """The algorithm's ``[n, n]`` collaboration matrix (CoBo's ``W``, IFCA's co-assignment, ...), or ``None``."""
        return self.algorithm.collaboration_matrix()

    def recovery_metrics(self, W: Tensor | None = None) -> dict[str, float]:
        """Cluster recovery of ``W`` (default: the current matrix) against ``datamodule.true_clusters``.

        The single source of ``collab/w_within``, ``w_between``, ``pair_accuracy``, ``ari_components`` and
        ``ari_spectral`` (spectral clustering seeded by the strategy's ``seed``); empty without a matrix or clusters.
        """
        from lightning_epfl.functional.collab_metrics import recovery_metrics

        W = self.collaboration_matrix() if W is None else W
        truth = getattr(self.ctx.datamodule, "true_clusters", None) if self.ctx is not None else None
        if W is None or truth is None:
            return {}
        return recovery_metrics(torch.as_tensor(W).cpu(), torch.as_tensor(truth).cpu(), seed=self.seed)

    def cluster_assignments(
        self, k: int | None = None, method: Literal["components", "spectral"] = "components", threshold: float = 0.5
    ) -> Tensor:
        """Cluster labels ``[n]`` read from the collaboration matrix (components of ``W > threshold``, or spectral).

        Raises:
            ValueError: If the algorithm has no matrix yet.
        """
        from lightning_epfl.functional.collab_metrics import cluster_assignments

        W = self.collaboration_matrix()
        if W is None:
            raise ValueError("no collaboration matrix yet (call after setup, with an algorithm that has one).")
        return cluster_assignments(W.cpu(), k=k, method=method, threshold=threshold, seed=self.seed)

    def collaboration_metrics(self) -> dict[str, float]:
        """``collab/*`` metrics: consensus distance, spectral gap of a fixed mixing matrix, recovery (collective)."""
        from lightning_epfl.functional.collab_metrics import consensus_distance
        from lightning_epfl.functional.topology import spectral_gap

        X_all = self.comm.all_gather(self.stack.X[:, : self.stack.d_comm].detach())
        out = {"collab/consensus_distance": float(consensus_distance(X_all))}
        if self.mixing_W is not None:
            out["collab/spectral_gap"] = float(spectral_gap(self.mixing_W))
        out.update({f"collab/{k}": v for k, v in self.recovery_metrics().items()})
        return out

    # ------------------------------------------------------------------------------------------------ models
    def client_state_dict(self, i: int) -> dict[str, Tensor]:
        """Client ``i``'s trainable tensors as a one-client state dict (collective in multi-process mode): the model
        the algorithm evaluates for client ``i`` (its personal row; the average for ``Decor(evaluate="average")``)."""
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
        if self.stack is not None and not self.save_frozen:
            frozen = _frozen_keys(self.lightning_module)
            state = {k: v for k, v in state.items() if k not in frozen}
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
        module = self.lightning_module
        missing = set(module.state_dict()) - set(state)
        if strict and missing and missing <= _frozen_keys(module):  # a checkpoint saved with `save_frozen=False`
            strict = False
            saved = (checkpoint.get("collaborative") or {}).get("frozen_fingerprint")
            if saved is not None and saved != self._frozen_fingerprint():
                raise MisconfigurationException(
                    "The checkpoint holds per-client tensors trained on another frozen base (it was saved with "
                    "`save_frozen=False`, and this module's frozen weights differ from that run's): load the same "
                    "`pretrained_path`, or build the base with the same seed."
                )
        with torch.no_grad():
            module.load_state_dict(state, strict=strict)

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
        inner = getattr(optimizer, "optimizer", optimizer)
        state = inner.state_dict()
        if self.stack is None or self.world_size == 1:
            return state
        return self._map_optimizer_state(inner, state, self.comm.all_gather)

    @override
    def load_optimizer_state_dict(self, checkpoint: Mapping[str, Any]) -> None:
        for optimizer, opt_state in zip(self.optimizers, checkpoint["optimizer_states"]):
            inner = getattr(optimizer, "optimizer", optimizer)
            if self.world_size > 1:
                opt_state = self._map_optimizer_state(inner, opt_state, self._local_slice)
            optimizer.load_state_dict(opt_state)
        optimizers_to_device(self.optimizers, self.root_device)

    def _frozen_fingerprint(self) -> str:
        """SHA-256 of the frozen (shared) tensors: identifies the base a checkpoint without them was trained on."""
        import hashlib

        digest = hashlib.sha256()
        module = self.lightning_module
        for key in sorted(_frozen_keys(module)):
            digest.update(key.encode())
            digest.update(module.state_dict()[key].detach().cpu().contiguous().numpy().tobytes())
        return digest.hexdigest()

    def collaborative_state(self) -> dict[str, Any]:
        """The checkpoint's ``"collaborative"`` entry (replicated state only; no collective; no secret)."""
        return {
            "format_version": _FORMAT_VERSION,
            "frozen_fingerprint": None if self.save_frozen or self.stack is None else self._frozen_fingerprint(),
            "n_clients": self.n_clients,
            "adjacency": None if self.topology is None else self.topology.adjacency.clone(),
            "topology_name": None if self.topology is None else self.topology.name,
            "mixing_W": self.mixing_W,
            "algorithm": self.algorithm.state_dict(),
        }

    @override
    def save_checkpoint(self, checkpoint: dict[str, Any], filepath: Any, storage_options: Any = None) -> None:
        checkpoint["collaborative"] = self.collaborative_state()
        super().save_checkpoint(checkpoint, filepath, storage_options=storage_options)

    @override
    def load_checkpoint(self, checkpoint_path: Any, weights_only: bool | None = None) -> dict[str, Any]:
        checkpoint = super().load_checkpoint(checkpoint_path, weights_only=weights_only)
        entry = checkpoint.get("collaborative")
        if entry is not None:
            if self.n_clients is not None and entry["n_clients"] != self.n_clients:
                raise MisconfigurationException(
                    f"the checkpoint has {entry['n_clients']} clients but `n_clients` is {self.n_clients}."
                )
            self.algorithm.load_state_dict(entry["algorithm"])
            if entry.get("adjacency") is not None:
                restored = Topology(entry["adjacency"], name=entry.get("topology_name") or "custom")
                if self.topology is not None and self.topology != restored:
                    rank_zero_warn(
                        "The checkpoint's topology differs from the configured one; the checkpoint's is used.",
                        category=RuntimeWarning,
                    )
                self._restored_topology = restored
                self.topology = restored
                self.mixing_W = entry.get("mixing_W")
                if self.ctx is not None:
                    self.ctx.topology, self.ctx.mixing_W = restored, self.mixing_W
        return checkpoint

    # ------------------------------------------------------------------------------------------------ registry
    @classmethod
    @override
    def register_strategies(cls, strategy_registry: Any) -> None:
        strategy_registry.register("collaborative", cls, description="Collaborative learning over stacked clients")


def _frozen_keys(module: nn.Module) -> set[str]:
    """State-dict keys of frozen parameters (tied copies such as ``lm_head.weight`` included)."""
    return {
        k for k, v in module.state_dict(keep_vars=True).items() if isinstance(v, nn.Parameter) and not v.requires_grad
    }


def _custom_topology(adjacency: Any, n_clients: int | None) -> Topology:
    """A user-given adjacency matrix as a connected :class:`Topology`, or a ``MisconfigurationException``."""
    try:
        topo = Topology(torch.as_tensor(adjacency), name="custom")
    except (ValueError, TypeError, RuntimeError) as err:
        raise MisconfigurationException(f"`topology` adjacency matrix: {err}") from err
    if n_clients is not None and topo.n != n_clients:
        raise MisconfigurationException(f"`topology` is a {topo.n}-client adjacency but `n_clients` is {n_clients}.")
    if not topo.is_connected():
        parts = topo.components()
        raise MisconfigurationException(
            f"`topology` is disconnected: {len(parts)} components {parts[:4]}{' ...' if len(parts) > 4 else ''}; "
            "information could not reach every client. Add edges between the components."
        )
    return topo


__all__ = ["CollaborativeStrategy", "ELEMENTWISE_OPTIMIZERS", "TOPOLOGIES", "metrics_from_sums"]
