"""SecLDP accountant
=================

The privacy accountant of correlated-noise decentralized SGD (Decor, arXiv:2405.01031): usable alone (``epsilon``,
``calibrate``) or as the running account of a training run (``step``, ``get_epsilon``, ``state_dict``). The math is
in :mod:`lightning_epfl.functional.privacy`; example-level accounting with Poisson subsampling goes through Opacus's
RDP analysis with the effective noise multiplier of the correlated mechanism.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, Literal

import torch
from torch import Tensor

from lightning_epfl.functional.privacy import (
    Conversion,
    cdp_sigma,
    epsilon_from_rho,
    inverse_cov_diag,
    laplacian_spectrum,
    ldp_sigma,
    sensitivity,
)

__all__ = ["SecLDPAccountant"]


class SecLDPAccountant:
    r"""Privacy of correlated Gaussian noise on a graph against an eavesdropper (and clients outside ``honest``).

    One step costs :math:`\rho_{step} = \frac{\Delta^2}{2}\max_{i\in H}[(\sigma^2 I + \sigma_{cor}^2 L_H)^{-1}]_{ii}`
    (zCDP); steps compose additively and convert to ``(epsilon, delta)`` by ``conversion``. At example level with a
    Poisson sample rate ``q < 1``, the privacy amplification by subsampling is accounted by Opacus's RDP analysis of
    the subsampled Gaussian with the effective noise multiplier
    :math:`z = (\Delta_1)^{-1} / \sqrt{\max_i [\Sigma^{-1}]_{ii}}` (``Delta_1`` the sensitivity of one example),
    converted with Opacus's ``get_privacy_spent``.

    Args:
        adjacency: ``[n, n]`` symmetric 0/1 adjacency of the communication graph.
        clip_norm: Clipping norm ``C > 0``.
        honest: Honest clients (default: all, the paper's setting).
        level: ``"user"`` (a whole local data set is the unit of privacy) or ``"example"``.
        neighbouring: ``"replace"`` (default) or ``"add_remove"``.
        conversion: ``"zcdp"`` (paper), ``"rdp"`` or ``"gdp"`` (exact Gaussian; user level only).
        orders: RDP orders for ``"rdp"`` and subsampled accounting (default: Opacus's).
        central: Account central DP instead: a trusted aggregator releases only the average of the ``n`` clients'
            noisy updates (the noise of the average has variance ``sigma^2 / n``; ``[Sigma^{-1}]_ii = 1/(n sigma^2)``).

    Raises:
        ValueError: On a non-square or asymmetric adjacency, ``clip_norm <= 0``, an unknown ``level``,
            ``neighbouring`` or ``conversion``, or ``gdp`` at example level.
    """

    def __init__(
        self,
        adjacency: Tensor,
        clip_norm: float,
        *,
        honest: Sequence[int] | None = None,
        level: Literal["user", "example"] = "user",
        neighbouring: Literal["replace", "add_remove"] = "replace",
        conversion: Conversion = "zcdp",
        orders: Sequence[float] | None = None,
        central: bool = False,
    ) -> None:
        a = torch.as_tensor(adjacency).to(torch.float64)
        if a.ndim != 2 or a.shape[0] != a.shape[1] or not torch.equal(a, a.T):
            raise ValueError(f"`adjacency` must be a symmetric [n, n] matrix, got shape {tuple(a.shape)}.")
        if not bool(((a == 0) | (a == 1)).all()) or bool(a.diagonal().any()):
            raise ValueError(
                "`adjacency` must be a 0/1 matrix with a zero diagonal (pairwise noise has unit weight per edge); "
                f"got entries {sorted({float(v) for v in a.unique()})[:5]}."
            )
        if not math.isfinite(clip_norm):
            raise ValueError(f"`clip_norm` must be finite and > 0, got {clip_norm}.")
        sensitivity(clip_norm, level, neighbouring)  # validates clip_norm, level, neighbouring
        if honest is not None and (not list(honest) or any(not 0 <= int(i) < a.shape[0] for i in honest)):
            raise ValueError(f"`honest` must be a non-empty subset of [0, {a.shape[0]}), got {list(honest)}.")
        if orders is not None and (not list(orders) or any(not o > 1 for o in orders)):
            raise ValueError(f"`orders` must be RDP orders > 1, got {list(orders)}.")
        if conversion not in ("zcdp", "rdp", "gdp"):
            raise ValueError(f"`conversion` must be 'zcdp', 'rdp' or 'gdp', got {conversion!r}.")
        if conversion == "gdp" and level == "example":
            raise ValueError("`conversion='gdp'` is exact only without subsampling: use it at `level='user'`.")
        self.adjacency = a
        self.n = a.shape[0]
        self.clip_norm = float(clip_norm)
        self.honest = None if honest is None else sorted({int(i) for i in honest})
        self.level = level
        self.neighbouring = neighbouring
        self.conversion = conversion
        self.orders = None if orders is None else [float(o) for o in orders]
        self.central = central
        self.history: list[dict[str, float]] = []
        self._spectrum: tuple[Tensor, Tensor, Tensor] | None = None

    # ------------------------------------------------------------------ per-step quantities
    def inverse_cov_diag(self, sigma: float, sigma_cor: float) -> Tensor:
        """``diag(Sigma_H^{-1})`` (``[|H|]``, float64, rounded up); ``1/(n sigma^2)`` everywhere when ``central``."""
        if self.central:
            if not sigma > 0:
                raise ValueError(f"`sigma` must be > 0, got {sigma}.")
            return torch.full((self.n,), 1.0 / (self.n * sigma**2) * (1.0 + 1e-9), dtype=torch.float64)
        if self._spectrum is None:
            self._spectrum = laplacian_spectrum(self.adjacency, self.honest)
        return inverse_cov_diag(self.adjacency, sigma, sigma_cor, self.honest, spectrum=self._spectrum)

    def rho_step(self, sigma: float, sigma_cor: float, batch_size: int = 1) -> float:
        """zCDP cost of one step (without subsampling)."""
        delta_s = sensitivity(self.clip_norm, self.level, self.neighbouring, batch_size)
        return 0.5 * delta_s**2 * float(self.inverse_cov_diag(sigma, sigma_cor).max())

    def effective_noise_multiplier(self, sigma: float, sigma_cor: float, batch_size: int = 1) -> float:
        """Noise multiplier of the equivalent single Gaussian mechanism for one unit of ``Delta``:
        ``1 / (Delta sqrt(max diag Sigma^{-1}))`` with the add/remove (one example: ``C/b``) sensitivity."""
        unit = sensitivity(self.clip_norm, self.level, "add_remove", batch_size)
        z = 1.0 / (unit * math.sqrt(float(self.inverse_cov_diag(sigma, sigma_cor).max())))
        return z / 2.0 if self.neighbouring == "replace" else z

    def bound(self, sigma: float, sigma_cor: float) -> float:
        r"""Upper bound of ``max diag Sigma^{-1}`` valid on any connected graph (loose: for tests and intuition):
        :math:`1/(n\sigma^2) + (1 - 1/n)/(\sigma^2 + \sigma_{cor}^2 \lambda_2(L))`."""
        from lightning_epfl.functional.privacy import laplacian

        lam2 = float(torch.linalg.eigvalsh(laplacian(self.adjacency))[1]) if self.n > 1 else 0.0
        return 1.0 / (self.n * sigma**2) + (1.0 - 1.0 / self.n) / (sigma**2 + sigma_cor**2 * lam2)

    # ------------------------------------------------------------------ epsilon
    def _epsilon_of_history(self, history: list[dict[str, float]], delta: float) -> float:
        if not history:
            return 0.0
        if any(math.isinf(h["rho"]) for h in history):
            return math.inf
        full = [h for h in history if h["sample_rate"] >= 1.0]
        sub = [h for h in history if h["sample_rate"] < 1.0]
        if not sub:
            return epsilon_from_rho(sum(h["rho"] * h["count"] for h in full), delta, self.conversion, self.orders)
        from opacus.accountants import RDPAccountant
        from opacus.accountants.analysis.rdp import compute_rdp, get_privacy_spent

        alphas = self.orders or list(RDPAccountant.DEFAULT_ALPHAS)
        rdp = torch.zeros(len(alphas), dtype=torch.float64)
        for h in full:
            rdp += torch.tensor(alphas, dtype=torch.float64) * h["rho"] * h["count"]
        for h in sub:
            steps = int(h["count"])
            rdp += torch.as_tensor(
                compute_rdp(q=h["sample_rate"], noise_multiplier=h["z"], steps=steps, orders=alphas),
                dtype=torch.float64,
            )
        eps, _ = get_privacy_spent(orders=alphas, rdp=rdp.tolist(), delta=delta)
        return max(0.0, float(eps))

    def epsilon(
        self,
        sigma: float,
        sigma_cor: float,
        steps: int,
        delta: float,
        sample_rate: float = 1.0,
        batch_size: int = 1,
    ) -> float:
        """``epsilon(delta)`` after ``steps`` steps at ``(sigma, sigma_cor)``, without touching the running account.

        Raises:
            ValueError: If ``sample_rate`` is not in ``(0, 1]``, or ``< 1`` at user level.
        """
        _check_steps(steps, allow_zero=True)
        return self._epsilon_of_history([self._entry(sigma, sigma_cor, sample_rate, batch_size, steps)], delta)

    def _entry(self, sigma: float, sigma_cor: float, sample_rate: float, batch_size: int, count: int) -> dict:
        if not 0.0 < sample_rate <= 1.0:
            raise ValueError(f"`sample_rate` must be in (0, 1], got {sample_rate}.")
        if sample_rate < 1.0 and self.level == "user":
            raise ValueError("subsampling (`sample_rate` < 1) is accounted at `level='example'` only.")
        entry = {
            "rho": math.inf if sigma == 0 else self.rho_step(sigma, sigma_cor, batch_size),  # no noise: no privacy
            "sample_rate": float(sample_rate),
            "count": float(count),
            "sigma": float(sigma),
            "sigma_cor": float(sigma_cor),
            "batch_size": float(batch_size),
        }
        if sample_rate < 1.0:
            entry["z"] = self.effective_noise_multiplier(sigma, sigma_cor, batch_size)
        return entry

    # ------------------------------------------------------------------ running account
    def step(self, *, sigma: float, sigma_cor: float, sample_rate: float = 1.0, batch_size: int = 1) -> None:
        """Account one more step (consecutive identical steps are merged)."""
        entry = self._entry(sigma, sigma_cor, sample_rate, batch_size, 1)
        last = self.history[-1] if self.history else None
        if last is not None and all(last[k] == entry[k] for k in ("rho", "sample_rate", "sigma", "sigma_cor")):
            last["count"] += 1
        else:
            self.history.append(entry)

    @property
    def steps(self) -> int:
        """Steps accounted so far."""
        return int(sum(h["count"] for h in self.history))

    def get_epsilon(self, delta: float) -> float:
        """``epsilon(delta)`` spent by the steps accounted so far."""
        return self._epsilon_of_history(self.history, delta)

    def get_rho(self) -> float:
        """zCDP spent so far by the unsubsampled steps."""
        return sum(h["rho"] * h["count"] for h in self.history if h["sample_rate"] >= 1.0)

    def would_exceed(
        self,
        target_epsilon: float,
        delta: float,
        *,
        sigma: float,
        sigma_cor: float,
        sample_rate: float = 1.0,
        batch_size: int = 1,
    ) -> bool:
        """Whether one more step at these settings would push ``epsilon(delta)`` above ``target_epsilon``."""
        entry = self._entry(sigma, sigma_cor, sample_rate, batch_size, 1)
        return self._epsilon_of_history([*self.history, entry], delta) > target_epsilon

    # ------------------------------------------------------------------ calibration
    def calibrate(
        self,
        target_epsilon: float,
        delta: float,
        steps: int,
        *,
        sigma: float | None = None,
        sigma_factor: float = 1.05,
        sample_rate: float = 1.0,
        batch_size: int = 1,
    ) -> tuple[float, float]:
        """``(sigma, sigma_cor)`` whose ``steps``-step epsilon is at most ``target_epsilon`` (the paper's rule).

        ``sigma`` defaults to ``sigma_factor`` times the central-DP noise ``sigma_CDP`` of the same budget; then
        ``sigma_cor`` is the smallest value (bisection, feasible end returned) that meets the target. The returned
        pair always satisfies ``epsilon(...) <= target_epsilon``.

        Raises:
            ValueError: If the target cannot be met even with ``sigma_cor -> infinity`` at this ``sigma`` (the
                message gives the smallest reachable epsilon), or an argument is out of range.
        """
        if not 0 < target_epsilon < math.inf:
            raise ValueError(f"`target_epsilon` must be finite and > 0, got {target_epsilon}.")
        _check_steps(steps)
        if sigma is None:
            if sigma_factor < 1.0:
                raise ValueError(f"`sigma_factor` must be >= 1, got {sigma_factor}.")
            sigma = sigma_factor * self.central_sigma(target_epsilon, delta, steps, sample_rate, batch_size)

        def eps(sc: float) -> float:
            return self.epsilon(sigma, sc, steps, delta, sample_rate, batch_size)

        if eps(0.0) <= target_epsilon:
            return float(sigma), 0.0
        hi = 1.0
        while eps(hi) > target_epsilon:
            hi *= 2.0
            if hi > 1e12:
                comps = _components(self)
                where = f" (the graph is disconnected: components {comps})" if len(comps) > 1 else ""
                raise ValueError(
                    f"`target_epsilon`={target_epsilon} is out of reach at sigma={sigma:.4g}: even unbounded pairwise "
                    f"noise gives epsilon {eps(1e12):.4g}{where}; raise `sigma` (or `sigma_factor`) or the target."
                )
        lo = 0.0
        while hi - lo > 1e-9 * hi:
            mid = 0.5 * (lo + hi)
            if eps(mid) > target_epsilon:
                lo = mid
            else:
                hi = mid
        assert eps(hi) <= target_epsilon
        return float(sigma), float(hi)

    def calibrate_sigma(
        self,
        target_epsilon: float,
        delta: float,
        steps: int,
        *,
        sigma_cor: float = 0.0,
        sample_rate: float = 1.0,
        batch_size: int = 1,
    ) -> float:
        """The smallest ``sigma`` (bisection, feasible end) whose ``steps``-step epsilon at ``sigma_cor`` is at most
        ``target_epsilon`` (local DP with ``sigma_cor=0``; central DP with ``central=True``).

        Raises:
            ValueError: If an argument is out of range.
        """
        if not 0 < target_epsilon < math.inf:
            raise ValueError(f"`target_epsilon` must be finite and > 0, got {target_epsilon}.")
        _check_steps(steps)

        def eps(sigma: float) -> float:
            return self.epsilon(sigma, sigma_cor, steps, delta, sample_rate, batch_size)

        hi = 1.0
        while eps(hi) > target_epsilon:
            hi *= 2.0
        lo = 0.0
        while hi - lo > 1e-10 * hi:
            mid = 0.5 * (lo + hi)
            if mid > 0 and eps(mid) <= target_epsilon:
                hi = mid
            else:
                lo = mid
        assert eps(hi) <= target_epsilon
        return float(hi)

    def central_sigma(
        self, target_epsilon: float, delta: float, steps: int, sample_rate: float = 1.0, batch_size: int = 1
    ) -> float:
        """``sigma_CDP``: the central-DP noise (a trusted average) of the same budget, accounted as this accountant
        accounts (level, neighbouring relation, conversion, subsampling), so that ``sigma_factor`` is a multiple of
        the central noise under every setting."""
        twin = SecLDPAccountant(
            self.adjacency, self.clip_norm, level=self.level, neighbouring=self.neighbouring,
            conversion=self.conversion, orders=self.orders, central=True,
        )  # fmt: skip
        return twin.calibrate_sigma(target_epsilon, delta, steps, sample_rate=sample_rate, batch_size=batch_size)

    @staticmethod
    def ldp_sigma(epsilon: float, delta: float, steps: int, clip_norm: float) -> float:
        """Local-DP noise at the same budget (see :func:`lightning_epfl.functional.privacy.ldp_sigma`)."""
        return ldp_sigma(epsilon, delta, steps, clip_norm)

    @staticmethod
    def cdp_sigma(epsilon: float, delta: float, steps: int, clip_norm: float, n_clients: int) -> float:
        """Central-DP noise at the same budget (see :func:`lightning_epfl.functional.privacy.cdp_sigma`)."""
        return cdp_sigma(epsilon, delta, steps, clip_norm, n_clients)

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        """The running account (steps and their costs); no secret."""
        return {"history": [dict(h) for h in self.history]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.history = [dict(h) for h in state.get("history", [])]


def _check_steps(steps: int, allow_zero: bool = False) -> None:
    low = 0 if allow_zero else 1
    if isinstance(steps, bool) or int(steps) != steps or steps < low:
        raise ValueError(f"`steps` must be an integer >= {low}, got {steps}.")


def _components(accountant: SecLDPAccountant) -> list[list[int]]:
    from lightning_epfl.functional.topology import Topology

    return Topology(accountant.adjacency.bool()).components()
