r"""
Decor
=====

Decentralized SGD with pairwise-canceling correlated noise (Allouah, Koloskova, El Firdoussi, Jaggi, Guerraoui,
"The Privacy Power of Correlated Noise in Decentralized Learning", ICML 2024, arXiv:2405.01031, Algorithm 1), as an
algorithm of :class:`~lightning_epfl.strategies.CollaborativeStrategy`. At step ``t`` every client ``i``:

1. clips its gradient at norm ``C``: the mini-batch gradient (user level) or each example's gradient, averaged over
   the *expected* batch size ``b`` (example level, per-example gradients by nested ``vmap``);
2. adds :math:`z_i = \sigma\xi_i + \sigma_{cor}\sum_{j \sim i} s_{ij}\zeta_{ij}^t` with private
   :math:`\xi_i \sim N(0, I)` and, for each neighbour, :math:`\zeta_{ij}^t = \zeta_{ji}^t \sim N(0, I)` drawn at
   both ends from the pair's secret, fresh every step, entering with :math:`s_{ij} = +1` if ``i < j`` else ``-1``
   (so the pairwise terms cancel in the sum over clients);
3. takes the user's SGD step on the noisy gradient (momentum and weight decay keep the update linear in the noise);
4. gossips: :math:`x_i \leftarrow \sum_j W_{ij} x_j` (``gossip_steps`` times).

``noise="ldp"`` is the same code with :math:`\sigma_{cor} = 0` (local DP); ``noise="cdp"`` averages over all
clients every step with the central-DP noise level (a trusted aggregator): the paper's two baselines at equal epsilon.
Privacy is accounted by :class:`~.accountant.SecLDPAccountant` (``privacy/epsilon`` is logged every step).

Noise sources: with ``secure_mode=False`` (reproducible; the same numbers in every process layout) the private and
pairwise noise come from CPU ``torch.Generator`` streams seeded by ``(seed, client[s], step)``, which offers **no
cryptographic guarantee** (a one-time warning says so). With ``secure_mode=True`` the pairs agree on keys by X25519 +
HKDF-SHA256 at setup (and again after a resume), the pairwise noise is the ChaCha20 keystream of the pair key at
``(step, stream)``, the private noise the keystream of a per-client key from ``os.urandom``, each normal is the sum of
four draws over 2 (the floating-point defence of arXiv:2107.10138, Sec. 5.1), and the training loss is not logged.
Keys live in memory only. The key agreement is unauthenticated: it protects against passive eavesdroppers, not
against an attacker who substitutes public keys.
"""

from __future__ import annotations

from typing import Any, Literal

import torch
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from lightning.pytorch.utilities.rank_zero import rank_zero_warn
from torch import Tensor

from lightning_epfl.functional.topology import Topology
from lightning_epfl.seeding import seeded_generator
from lightning_epfl.strategies.collaborative.accountant import SecLDPAccountant
from lightning_epfl.strategies.collaborative.algorithm import CollaborativeAlgorithm, StepContext
from lightning_epfl.strategies.collaborative.secrets import PrivateSecret

__all__ = ["Decor"]

_LEVELS = ("user", "example")
_NOISES = ("decor", "ldp", "cdp")
_CONVERSIONS = ("zcdp", "rdp", "gdp")
_PRECISIONS = ("32-true", "64-true", "32", "64")


class Decor(CollaborativeAlgorithm):
    """Decor: clipped local SGD steps with private + pairwise-canceling Gaussian noise, then gossip.

    Give either ``target_epsilon`` (the noise is calibrated for ``total_steps`` steps so that ``epsilon(delta)`` does
    not exceed it) or the noise itself (``sigma``, and ``sigma_cor`` for ``noise="decor"``). Needs
    ``CollaborativeStrategy(topology=...)`` except for ``noise="cdp"``.

    Args:
        clip_norm: Clipping norm ``C > 0``.
        level: ``"user"`` (clip the mini-batch gradient; a client's whole data set is the unit of privacy) or
            ``"example"`` (clip each example's gradient; Poisson sampling, ``FederatedDataModule(sampling="poisson")``,
            gives amplification by subsampling, any other sampler is accounted without it).
        noise: ``"decor"`` (pairwise-canceling noise on the graph), ``"ldp"`` (private noise only, same graph) or
            ``"cdp"`` (exact average over all clients with central-DP noise).
        sigma: Private noise standard deviation (per coordinate), if not calibrated.
        sigma_cor: Pairwise noise standard deviation (``noise="decor"``), if not calibrated.
        target_epsilon: Privacy budget to calibrate for.
        delta: ``delta`` of the ``(epsilon, delta)`` guarantee, in ``(0, 1)``.
        total_steps: Steps the budget must last; default ``trainer.max_steps``.
        sigma_factor: Calibrated ``sigma`` as a multiple of the central-DP noise (``>= 1``; the paper's rule, 1.05).
        conversion: zCDP to ``(epsilon, delta)``: ``"zcdp"`` (paper), ``"rdp"`` or ``"gdp"`` (user level only).
        neighbouring: ``"replace"`` or ``"add_remove"`` adjacent data sets.
        honest_clients: Clients that do not collude with the eavesdropper (default: all).
        gossip_steps: Gossip rounds per step (``W^k``; post-processing, free in privacy).
        stop_at_budget: End training (with a warning) when one more step would exceed ``target_epsilon``.
        secure_mode: Cryptographic noise and keys (see the module docstring); not reproducible.
        allow_nonlinear_optimizer: Accept optimizers other than SGD (an adaptive optimizer rescales the noise per
            coordinate and breaks its cancellation: privacy holds, utility drops to about local DP).
        evaluate: Evaluate the average model ``x_bar`` on every client (``"average"``, the paper's metric) or each
            client's own model (``"personal"``).

    Raises:
        MisconfigurationException: On an argument outside the ranges above, both or neither of ``target_epsilon``
            and ``sigma``, ``sigma_cor`` missing for ``noise="decor"`` (or given for the baselines), ``gdp`` at
            example level; before training: no topology, a disconnected graph, an optimizer other than SGD, a
            precision other than 32/64-bit, no step count to calibrate for, or a budget out of reach.
    """

    name = "decor"
    uses_topology = True

    def __init__(
        self,
        clip_norm: float = 1.0,
        level: Literal["user", "example"] = "user",
        noise: Literal["decor", "ldp", "cdp"] = "decor",
        sigma: float | None = None,
        sigma_cor: float | None = None,
        target_epsilon: float | None = None,
        delta: float = 1e-5,
        total_steps: int | None = None,
        sigma_factor: float = 1.05,
        conversion: Literal["zcdp", "rdp", "gdp"] = "zcdp",
        neighbouring: Literal["replace", "add_remove"] = "replace",
        honest_clients: list[int] | None = None,
        gossip_steps: int = 1,
        stop_at_budget: bool = True,
        secure_mode: bool = False,
        allow_nonlinear_optimizer: bool = False,
        evaluate: Literal["average", "personal"] = "average",
    ) -> None:
        def fail(message: str) -> None:
            raise MisconfigurationException(f"Decor: {message}")

        if not clip_norm > 0:
            fail(f"`clip_norm` must be > 0, got {clip_norm}.")
        if level not in _LEVELS:
            fail(f"`level` must be one of {_LEVELS}, got {level!r}.")
        if noise not in _NOISES:
            fail(f"`noise` must be one of {_NOISES}, got {noise!r}.")
        if conversion not in _CONVERSIONS:
            fail(f"`conversion` must be one of {_CONVERSIONS}, got {conversion!r}.")
        if neighbouring not in ("replace", "add_remove"):
            fail(f"`neighbouring` must be 'replace' or 'add_remove', got {neighbouring!r}.")
        if evaluate not in ("average", "personal"):
            fail(f"`evaluate` must be 'average' or 'personal', got {evaluate!r}.")
        if not 0.0 < delta < 1.0:
            fail(f"`delta` must be in (0, 1), got {delta}.")
        if (target_epsilon is None) == (sigma is None):
            fail("give either `target_epsilon` (calibrated noise) or `sigma` (and `sigma_cor`), exactly one of them.")
        if target_epsilon is not None and not target_epsilon > 0:
            fail(f"`target_epsilon` must be > 0, got {target_epsilon}.")
        if sigma is not None and sigma < 0:
            fail(f"`sigma` must be >= 0, got {sigma}.")
        if sigma is not None and noise == "decor" and sigma_cor is None:
            fail("`sigma_cor` is required with `sigma` for noise='decor'.")
        if noise != "decor" and sigma_cor not in (None, 0, 0.0):
            fail(f"`sigma_cor` applies to noise='decor' only, got sigma_cor={sigma_cor} with noise={noise!r}.")
        if sigma_cor is not None and sigma_cor < 0:
            fail(f"`sigma_cor` must be >= 0, got {sigma_cor}.")
        if total_steps is not None and total_steps < 1:
            fail(f"`total_steps` must be >= 1 or None, got {total_steps}.")
        if sigma_factor < 1.0:
            fail(f"`sigma_factor` must be >= 1, got {sigma_factor}.")
        if conversion == "gdp" and level == "example":
            fail("`conversion='gdp'` is exact only without subsampling: use it with `level='user'`.")
        if gossip_steps < 1:
            fail(f"`gossip_steps` must be >= 1, got {gossip_steps}.")
        if honest_clients is not None and not honest_clients:
            fail("`honest_clients` must be None (all) or a non-empty list.")
        self.clip_norm = float(clip_norm)
        self.level = level
        self.noise = noise
        self.sigma = None if sigma is None else float(sigma)
        self.sigma_cor = 0.0 if noise != "decor" else (None if sigma_cor is None else float(sigma_cor))
        self.target_epsilon = target_epsilon
        self.delta = delta
        self.total_steps = total_steps
        self.sigma_factor = sigma_factor
        self.conversion = conversion
        self.neighbouring = neighbouring
        self.honest_clients = honest_clients
        self.gossip_steps = gossip_steps
        self.stop_at_budget = stop_at_budget
        self.secure_mode = secure_mode
        self.allow_nonlinear_optimizer = allow_nonlinear_optimizer
        self.evaluate = evaluate
        self.log_training_loss = not secure_mode  # the training loss is data-dependent
        self.accountant: SecLDPAccountant | None = None
        self.W: Tensor | None = None
        self.sample_rate = 1.0
        self.batch_size = 1
        self._seed = 0
        self._neighbours: dict[int, tuple[int, ...]] = {}
        self._pair_keys: dict[tuple[int, int], Any] = {}
        self._private_keys: dict[int, PrivateSecret] = {}
        self._restored: dict[str, Any] | None = None
        self._warned_budget = False

    # ------------------------------------------------------------------ setup
    def check_trainer(self, trainer: Any, optimizers: list[Any]) -> None:
        precision = str(getattr(trainer, "precision", "32-true"))
        if precision not in _PRECISIONS:
            raise MisconfigurationException(
                f"Decor needs `trainer.precision` '32-true' or '64-true', got {precision!r}: in half precision the "
                "gradient is lost under the pairwise noise (sigma_cor is often 100x the gradient)."
            )
        if self.allow_nonlinear_optimizer:
            return
        for opt in optimizers:
            inner = getattr(opt, "optimizer", opt)
            if type(inner) is not torch.optim.SGD:
                raise MisconfigurationException(
                    f"Decor needs SGD (momentum and weight decay are fine), got {type(inner).__name__}: an adaptive "
                    "optimizer rescales the noise per coordinate and breaks the pairwise cancellation. Set "
                    "`allow_nonlinear_optimizer=True` to train anyway (privacy holds, utility drops to about LDP)."
                )

    def check_config(
        self, trainer: Any, pl_module: Any, datamodule: Any, n_clients: int, topology: Topology | None
    ) -> None:
        """Before the run: a connected graph is needed (except for central DP); honest clients must exist."""
        self._check_graph(n_clients, topology)
        if self.honest_clients is not None and any(not 0 <= int(i) < n_clients for i in self.honest_clients):
            raise MisconfigurationException(
                f"`honest_clients` must be client ids in [0, {n_clients}), got {self.honest_clients}."
            )

    def _check_graph(self, n_clients: int, topology: Topology | None) -> Topology:
        """The graph the noise is accounted on: complete for central DP, else the (connected) ``topology``."""
        if self.noise == "cdp":
            return Topology.complete(n_clients)
        if topology is None:
            raise MisconfigurationException(
                "Decor needs a communication graph: set `CollaborativeStrategy(topology=...)` (ring, torus, complete, "
                "erdos_renyi or an adjacency matrix)."
            )
        if not topology.is_connected():
            raise MisconfigurationException(
                f"Decor needs a connected graph; the topology has components {topology.components()}."
            )
        return topology

    def _sampling(self, ctx: StepContext) -> None:
        dm = ctx.datamodule
        if self.level != "example":
            self.sample_rate, self.batch_size = 1.0, 1
            return
        self.batch_size = int(getattr(dm, "batch_size", 1) or 1)
        sizes = getattr(dm, "client_sizes", None)
        if getattr(dm, "sampling", None) == "poisson" and sizes:
            self.sample_rate = min(1.0, self.batch_size / min(int(s) for s in sizes))
        else:
            self.sample_rate = 1.0  # no amplification without Poisson sampling

    def setup(self, ctx: StepContext) -> None:
        self._seed = ctx.seed
        graph = self._check_graph(ctx.n_clients, ctx.topology)
        self._sampling(ctx)
        n = ctx.n_clients
        if self.noise == "cdp":
            self.W = torch.full((n, n), 1.0 / n, dtype=torch.float64)
        else:
            assert ctx.mixing_W is not None
            self.W = ctx.mixing_W.to(torch.float64)
        self._neighbours = {i: graph.neighbours(i) for i in ctx.local_ids}
        self.accountant = SecLDPAccountant(
            graph.adjacency,
            self.clip_norm,
            honest=self.honest_clients,
            level=self.level,
            neighbouring=self.neighbouring,
            conversion=self.conversion,
            central=self.noise == "cdp",
        )
        if self._restored is not None:
            self._restore(self._restored)
        elif self.target_epsilon is not None:
            self._calibrate(ctx)
        if self.noise == "decor" and self.sigma_cor and self.sigma_cor > 0:
            if self.secure_mode:
                self._pair_keys = ctx.pairwise_keys(b"lightning-epfl/decor")
        if self.secure_mode:
            self._private_keys = {i: PrivateSecret(i) for i in ctx.local_ids}
        else:
            rank_zero_warn(
                "Decor(secure_mode=False): noise from seeded torch generators, reproducible but without any "
                "cryptographic guarantee; use secure_mode=True for a real deployment.",
                category=RuntimeWarning,
            )

    def _calibrate(self, ctx: StepContext) -> None:
        steps = self.total_steps or (ctx.max_steps if ctx.max_steps and ctx.max_steps > 0 else None)
        if steps is None:
            raise MisconfigurationException("Decor needs `total_steps` or `trainer.max_steps` to calibrate the noise.")
        assert self.accountant is not None and self.target_epsilon is not None
        target, delta, q, b = self.target_epsilon, self.delta, self.sample_rate, self.batch_size
        try:
            if self.noise == "decor":
                self.sigma, self.sigma_cor = self.accountant.calibrate(
                    target, delta, steps, sigma_factor=self.sigma_factor, sample_rate=q, batch_size=b
                )
            else:
                self.sigma = self.accountant.calibrate_sigma(target, delta, steps, sample_rate=q, batch_size=b)
                self.sigma_cor = 0.0
        except ValueError as err:
            raise MisconfigurationException(f"Decor: {err}") from err

    # ------------------------------------------------------------------ step
    def compute_gradients(self, ctx: StepContext, batch: Any) -> tuple[Tensor, Tensor]:
        if self.level == "user":
            G, losses = ctx.loss_and_grad(ctx.X, batch)
            return _clip_rows(G, self.clip_norm), losses
        G_sum, losses_ex = ctx.stack.clipped_example_grad_sum(ctx.X, batch, self.clip_norm)
        mask = _mask(batch, losses_ex)
        losses = (losses_ex * mask).sum(1) / mask.sum(1).clamp_min(1.0)
        return G_sum / self.batch_size, losses

    def noise_for(self, ctx: StepContext) -> Tensor:
        """The noise ``z`` ``[n_local, d]`` (float64) of this step for this process's clients."""
        d, t = ctx.X.shape[1], ctx.step
        assert self.sigma is not None and self.sigma_cor is not None
        z = torch.zeros(len(ctx.local_ids), d, dtype=torch.float64)
        pair_cache: dict[tuple[int, int], Tensor] = {}
        for k, i in enumerate(ctx.local_ids):
            if self.sigma > 0:
                z[k] += self.sigma * self._private_normal(i, t, d)
            if self.noise != "decor" or self.sigma_cor == 0:
                continue
            for j in self._neighbours[i]:
                edge = (min(i, j), max(i, j))
                if edge not in pair_cache:
                    pair_cache[edge] = self._pair_normal(edge, t, d)
                z[k] += (self.sigma_cor if i < j else -self.sigma_cor) * pair_cache[edge]
        return z

    def _private_normal(self, client: int, step: int, d: int) -> Tensor:
        if self.secure_mode:
            secret = self._private_keys[client]
            return _defended_normal(lambda s: secret.gaussian(step, d, stream=s))
        return torch.randn(
            d, generator=seeded_generator(self._seed, "decor_private", client, step), dtype=torch.float64
        )

    def _pair_normal(self, edge: tuple[int, int], step: int, d: int) -> Tensor:
        if self.secure_mode:
            secret = self._pair_keys[edge]
            return _defended_normal(lambda s: secret.gaussian(step, d, stream=s))
        return torch.randn(d, generator=seeded_generator(self._seed, "decor_pair", *edge, step), dtype=torch.float64)

    def before_optimizer_step(self, ctx: StepContext) -> None:
        assert ctx.G is not None and self.accountant is not None
        noise = self.noise_for(ctx).to(device=ctx.G.device, dtype=ctx.G.dtype)
        ctx.write_grads(ctx.G + noise)
        self.accountant.step(
            sigma=self.sigma, sigma_cor=self.sigma_cor, sample_rate=self.sample_rate, batch_size=self.batch_size
        )

    def after_optimizer_step(self, ctx: StepContext) -> None:
        assert self.W is not None
        dc = ctx.d_comm
        Xc = ctx.X[:, :dc]
        for _ in range(self.gossip_steps):
            Xc.copy_(ctx.comm.mix(Xc, self.W.to(Xc.device)))
        last = ctx.max_steps is not None and 0 < ctx.max_steps <= ctx.step + 1  # the run ends here anyway
        if self.stop_at_budget and self.target_epsilon is not None and not last and self._next_step_exceeds():
            ctx.stop_requested = True
            if not self._warned_budget:
                self._warned_budget = True
                rank_zero_warn(
                    f"Decor: the privacy budget epsilon={self.target_epsilon} would be exceeded by the next step "
                    f"(after {self.accountant.steps} steps); training stops.",
                    category=RuntimeWarning,
                )

    def _next_step_exceeds(self) -> bool:
        assert self.accountant is not None and self.target_epsilon is not None
        return self.accountant.would_exceed(
            self.target_epsilon,
            self.delta,
            sigma=self.sigma,
            sigma_cor=self.sigma_cor,
            sample_rate=self.sample_rate,
            batch_size=self.batch_size,
        )

    def evaluation_rows(self, ctx: StepContext) -> Tensor:
        if self.evaluate == "personal":
            return ctx.X
        mean = ctx.comm.all_reduce(ctx.X.detach().sum(0)) / ctx.n_clients
        return mean.expand_as(ctx.X)

    def collaboration_matrix(self) -> Tensor | None:
        return None if self.W is None else self.W.clone()

    def step_metrics(self) -> dict[str, float]:
        if self.accountant is None or self.sigma is None:
            return {}
        out = {
            "privacy/epsilon": self.accountant.get_epsilon(self.delta),
            "privacy/sigma": float(self.sigma),
            "privacy/sigma_cor": float(self.sigma_cor or 0.0),
        }
        if self.sample_rate >= 1.0:
            out["privacy/rho"] = self.accountant.get_rho()
        if self.target_epsilon is not None:
            out["privacy/target_epsilon"] = float(self.target_epsilon)
        return out

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        """Noise levels and the running account; never keys or seeds of the secure streams."""
        return {
            "sigma": self.sigma,
            "sigma_cor": self.sigma_cor,
            "accountant": None if self.accountant is None else self.accountant.state_dict(),
            "accounting": None if self.accountant is None else self._accounting(),
        }

    def _accounting(self) -> dict[str, Any]:
        """What the running account depends on besides the noise levels: a resume must not change it."""
        assert self.accountant is not None
        return {
            "noise": self.noise,
            "level": self.level,
            "neighbouring": self.neighbouring,
            "conversion": self.conversion,
            "clip_norm": self.clip_norm,
            "delta": self.delta,
            "honest_clients": self.accountant.honest,
            "graph_edges": [(i, j) for i, j in torch.nonzero(torch.triu(self.accountant.adjacency)).tolist()],
        }

    def _restore(self, state: dict[str, Any]) -> None:
        """Take the checkpoint's noise levels and account, after checking that the settings match and that the
        budget allows one more step."""
        assert self.accountant is not None
        saved = state.get("accounting")
        if saved is not None:
            current = self._accounting()
            changed = [k for k in current if saved.get(k) != current[k]]
            if changed:
                k = changed[0]
                shown = "the communication graph (topology)" if k == "graph_edges" else f"`{k}`"
                raise MisconfigurationException(
                    f"Decor: the checkpoint was trained with another {shown} ({saved.get(k)!r} there, "
                    f"{current[k]!r} now); its privacy account would be wrong. Resume with the same settings."
                )
        self.sigma, self.sigma_cor = state["sigma"], state["sigma_cor"]
        self.accountant.load_state_dict(state["accountant"])
        if self.stop_at_budget and self.target_epsilon is not None and self._next_step_exceeds():
            spent = self.accountant.get_epsilon(self.delta)
            raise MisconfigurationException(
                f"Decor: the checkpoint has spent its privacy budget (epsilon {spent:.6g} after "
                f"{self.accountant.steps} steps; one more step would exceed `target_epsilon`={self.target_epsilon}). "
                "Nothing is left to train; raise the target only if that privacy loss is acceptable."
            )

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("accountant") is None:
            return
        self._restored = dict(state)
        if self.accountant is not None:
            self._restore(state)


def _clip_rows(G: Tensor, clip_norm: float) -> Tensor:
    """Scale each row of ``G`` ``[m, d]`` to norm at most ``clip_norm``."""
    return G * (clip_norm / G.norm(dim=1, keepdim=True).clamp_min(1e-12)).clamp_max(1.0)


def _mask(batch: Any, like: Tensor) -> Tensor:
    """The padding mask ``[m, B]`` of a stacked batch (ones when it has none)."""
    if isinstance(batch, dict) and "mask" in batch:
        return batch["mask"].to(like.dtype)
    if isinstance(batch, (tuple, list)) and len(batch) > 2:
        return batch[2].to(like.dtype)
    return torch.ones_like(like)


def _defended_normal(draw: Any) -> Tensor:
    """A standard normal as the sum of four independent draws over 2 (arXiv:2107.10138, Sec. 5.1)."""
    return (draw(0) + draw(1) + draw(2) + draw(3)) / 2.0
