"""Sampling a basin: SWA, snapshot ensembles, Fast Geometric Ensembling and simplex ensembles.

Mode convexity (survey §6.1.1) says a trained solution sits in a wide, locally convex basin full of
good solutions that predict differently. Four ways to collect such solutions, all starting from a
:class:`~landscape.train.TrainState` and reusing a :class:`~landscape.train.Trainer`'s model, data,
batch size and loss (its optimizer is replaced by the one these functions build):

* :func:`swa` — Stochastic Weight Averaging (Izmailov et al. 2018, arXiv 1803.05407): continue
  training at a constant (or cyclic) learning rate, keep a checkpoint every ``every`` steps and
  average them, ``θ_SWA = (1/M) Σ_m θ_m``.
* :func:`snapshot_ensemble` — snapshot ensembles (Huang et al. 2017, arXiv 1704.00109): cosine
  annealing restarted every ``cycle_steps``, one member at the end of each cycle,
  ``α(s) = α_lo + ½ (α − α_lo)(1 + cos(π (s mod c) / c))``.
* :func:`fge` — Fast Geometric Ensembling (Garipov et al. 2018, arXiv 1802.10026): the same
  restarts, but short cycles and a small learning-rate range from an already trained model, so the
  members stay in its basin (and their average is meaningful).
* :func:`simplex` — simplex ensembles (Benton et al. 2021, arXiv 2102.13042, "SPRO"): grow a
  simplex of low-loss solutions from trained vertices, one new vertex at a time, then sample from it.

Every function returns the members (a tuple of params), their average where it is meaningful, and
what was done. Models with state (BatchNorm running statistics) keep each checkpoint's state;
an *average* of parameters needs its statistics recomputed on the training data (Izmailov et al.,
§3.2), which these functions do not do: the result says so in ``stale_model_state``.

Example:
    >>> import jax, jax.numpy as jnp, optax
    >>> from landscape.train import Trainer
    >>> from probes import basin
    >>> x = jax.random.normal(jax.random.key(0), (64, 3)); y = (x[:, 0] > 0).astype(jnp.int32)
    >>> trainer = Trainer(lambda p, x: x @ p["w"], x, y, optimizer=optax.sgd(0.5), batch_size=16)
    >>> trained = trainer.run(jax.random.key(1), trainer.init({"w": jnp.zeros((3, 2))}), steps=40)
    >>> res = basin.swa(jax.random.key(2), trainer, trained.state, steps=20, every=5, learning_rate=0.1)
    >>> len(res.members), res.steps
    (4, (45, 50, 55, 60))
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from landscape import tree
from landscape._types import Array, Key, Params
from landscape.objective import LOSSES
from landscape.train import TrainState, Trainer, make_optimizer

__all__ = ["BasinResult", "SimplexResult", "average", "fge", "simplex", "snapshot_ensemble", "swa"]

_OPTIMIZERS = ("sgd", "adam")
_SWA_SCHEDULES = ("constant", "cyclic")


def average(members: Sequence[Params]) -> Params:
    """Running average ``θ̄_m = θ̄_{m−1} + (θ_m − θ̄_{m−1}) / m`` of matching params (SWA's update).

    The running form is exact for identical members (``θ̄ = θ`` bit for bit) and equals the mean
    ``(1/M) Σ_m θ_m`` up to rounding otherwise.

    Raises:
        ValueError: no members, or members that do not match (naming the first differing path).
    """
    members = list(members)
    if not members:
        msg = "average needs at least one member, got an empty sequence"
        raise ValueError(msg)
    for i, m in enumerate(members[1:], start=1):
        tree.check_match(members[0], m, names=("members[0]", f"members[{i}]"))
    avg = members[0]
    for i, m in enumerate(members[1:], start=2):
        avg = jax.tree.map(lambda a, b, n=i: a + (b - a) / n, avg, m)
    return avg


@functools.partial(
    jax.tree_util.register_dataclass,
    data_fields=["members", "average", "start", "model_states", "losses"],
    meta_fields=["method", "steps", "settings", "stale_model_state"],
)
@dataclasses.dataclass(frozen=True)
class BasinResult:
    """Members collected by :func:`swa`, :func:`snapshot_ensemble` or :func:`fge`.

    Attributes:
        members: the collected params, in step order.
        average: their running average (SWA, FGE), or ``None`` where an average is not meaningful
            (snapshot ensembles from scratch visit several basins).
        start: the params the run started from (the trained solution).
        model_states: each member's model state (``{}`` for models without state).
        losses: ``(steps,)`` minibatch training loss of every step of the continued run.
        method: ``"swa"``, ``"snapshot"`` or ``"fge"``.
        steps: global training step of each member.
        settings: what was done, as ``(name, value)`` pairs (optimizer, learning rate, schedule,
            cycle length, number of steps, start step); :attr:`settings_dict` as a dict.
        stale_model_state: the model has state (BatchNorm); the average's statistics are not those
            of its parameters and must be recomputed before it is evaluated in eval mode.
    """

    members: tuple[Params, ...]
    average: Params | None
    start: Params
    model_states: tuple[Any, ...]
    losses: np.ndarray
    method: str
    steps: tuple[int, ...]
    settings: tuple[tuple[str, Any], ...]
    stale_model_state: bool

    @property
    def settings_dict(self) -> dict[str, Any]:
        return dict(self.settings)

    @property
    def num_members(self) -> int:
        return len(self.members)

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe summary (no parameters): method, steps, settings, loss trace."""
        return {
            "method": self.method,
            "num_members": self.num_members,
            "steps": list(self.steps),
            "settings": self.settings_dict,
            "has_average": self.average is not None,
            "stale_model_state": self.stale_model_state,
            "losses": [float(v) for v in np.asarray(self.losses)],
        }

    def plot(self) -> Any:
        """Plotly figure: minibatch training loss of the continued run, members marked."""
        import plotly.graph_objects as go

        start = self.settings_dict["start_step"]
        steps = start + 1 + np.arange(len(self.losses))
        fig = go.Figure(go.Scatter(x=steps, y=np.asarray(self.losses), mode="lines", name="minibatch loss"))
        for s in self.steps:
            fig.add_vline(x=s, line_dash="dot", line_color="#d62728")
        fig.update_layout(
            title=f"{self.method}: {self.num_members} members (dotted lines)",
            xaxis_title="global step", yaxis_title="training loss",
        )
        return fig


def _check_positive_int(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        msg = f"{name} must be a positive int, got {value!r}"
        raise ValueError(msg)
    return int(value)


def _check_choice(name: str, value: Any, accepted: Sequence[str]) -> None:
    if value not in accepted:
        msg = f"unknown {name} {value!r}; accepted: {list(accepted)}"
        raise ValueError(msg)


def _check_trainer(trainer: Any, state: Any) -> None:
    if not isinstance(trainer, Trainer):
        msg = f"trainer must be a landscape.train.Trainer, got {type(trainer).__name__}"
        raise ValueError(msg)
    if not isinstance(state, TrainState):
        msg = (
            f"state must be a landscape.train.TrainState (trainer.init(params) or a run's .state), "
            f"got {type(state).__name__}"
        )
        raise ValueError(msg)


@functools.lru_cache(maxsize=8)
def _with_optimizer(trainer: Trainer, optimizer_settings: tuple[tuple[str, Any], ...]) -> Trainer:
    """``trainer`` with the optimizer of :func:`~landscape.train.make_optimizer` ``(**settings)``.

    Cached (by trainer identity and settings) so that repeated sampling with the same settings,
    e.g. one basin per seed, reuses the compiled training segments.
    """
    settings = dict(optimizer_settings)
    return dataclasses.replace(trainer, optimizer=make_optimizer(settings.pop("name"), **settings))


def _continue(
    key: Key,
    trainer: Trainer,
    state: TrainState,
    *,
    method: str,
    optimizer_settings: tuple[tuple[str, Any], ...],
    steps: int,
    capture: Sequence[int],
    settings: dict[str, Any],
    keep_average: bool,
) -> BasinResult:
    """Continue ``state`` for ``steps`` steps with a fresh ``optimizer``; members at ``capture`` offsets."""
    cont = _with_optimizer(trainer, optimizer_settings)
    begin = dataclasses.replace(cont.init(state.params, state.model_state), step=state.step)
    globals_ = [state.step + c for c in capture]
    run = cont.run(key, begin, steps=state.step + steps, capture_steps=globals_)
    ckpts = [c for c in run.checkpoints if c.step in set(globals_)]
    members = tuple(c.params for c in ckpts)
    stale = bool(jax.tree.leaves(state.model_state))
    return BasinResult(
        members=members,
        average=average(members) if keep_average else None,
        start=state.params,
        model_states=tuple(c.model_state for c in ckpts),
        losses=np.asarray(run.losses),
        method=method,
        steps=tuple(c.step for c in ckpts),
        settings=tuple({**settings, "start_step": int(state.step), "steps": int(steps)}.items()),
        stale_model_state=stale,
    )


def swa(
    key: Key,
    trainer: Trainer,
    state: TrainState,
    *,
    steps: int,
    every: int,
    learning_rate: float = 0.05,
    schedule: str = "constant",
    cycle_steps: int | None = None,
    final_fraction: float = 0.0,
    optimizer: str = "sgd",
    momentum: float = 0.9,
) -> BasinResult:
    """Stochastic Weight Averaging from a trained state (Izmailov et al. 2018, arXiv 1803.05407).

    Training continues from ``state`` for ``steps`` steps with a fresh optimizer at a constant
    learning rate (``schedule="constant"``) or cosine cycles of ``cycle_steps``
    (``"cyclic"``, from ``learning_rate`` down to ``final_fraction · learning_rate``); a checkpoint
    is kept every ``every`` steps (for cyclic, ``every`` must be a multiple of ``cycle_steps`` so
    that members sit at the learning-rate minima) and the SWA solution is their average

    .. math::  θ_{SWA} = \\frac{1}{M} \\sum_{m=1}^{M} θ_{s_0 + m \\cdot every}.

    Args:
        key: data-order key of the continued run.
        trainer: model, data, batch size and loss (its optimizer is not used).
        state: the trained state to start from (its step sets where the data order resumes).
        steps: further training steps.
        every: steps between kept checkpoints (``1 <= every <= steps``).
        learning_rate, schedule, cycle_steps, final_fraction: the SWA learning rate.
        optimizer: ``"sgd"`` (with ``momentum``, as in the paper) or ``"adam"``.
        momentum: SGD momentum.

    Returns:
        :class:`BasinResult` with ``method="swa"`` and ``average`` the SWA solution.

    Raises:
        ValueError: bad settings (named, with the accepted values), before any training.
    """
    _check_trainer(trainer, state)
    steps = _check_positive_int("steps", steps)
    every = _check_positive_int("every", every)
    _check_choice("schedule", schedule, _SWA_SCHEDULES)
    _check_choice("optimizer", optimizer, _OPTIMIZERS)
    if every > steps:
        msg = f"every={every} is larger than steps={steps}: no checkpoint would be kept"
        raise ValueError(msg)
    if schedule == "cyclic":
        cycle_steps = _check_positive_int("cycle_steps", cycle_steps)
        if every % cycle_steps:
            msg = f"with schedule='cyclic', every ({every}) must be a multiple of cycle_steps ({cycle_steps})"
            raise ValueError(msg)
    make_optimizer(  # validates the learning rate before any work
        optimizer, learning_rate=learning_rate, momentum=momentum, schedule=schedule,
        cycle_steps=cycle_steps, final_fraction=final_fraction,
    )
    opt = (("name", optimizer), ("learning_rate", float(learning_rate)), ("momentum", float(momentum)),
           ("schedule", schedule), ("cycle_steps", cycle_steps), ("final_fraction", float(final_fraction)))
    settings = {"optimizer": optimizer, "learning_rate": float(learning_rate), "schedule": schedule,
                "cycle_steps": cycle_steps, "final_fraction": float(final_fraction), "every": every}
    capture = list(range(every, steps + 1, every))
    return _continue(key, trainer, state, method="swa", optimizer_settings=opt, steps=steps, capture=capture,
                     settings=settings, keep_average=True)


def _cycles(
    key: Key, trainer: Trainer, state: TrainState, *, method: str, cycles: int, cycle_steps: int,
    learning_rate: float, final_fraction: float, optimizer: str, momentum: float, keep_average: bool,
) -> BasinResult:
    _check_trainer(trainer, state)
    cycles = _check_positive_int("cycles", cycles)
    cycle_steps = _check_positive_int("cycle_steps", cycle_steps)
    _check_choice("optimizer", optimizer, _OPTIMIZERS)
    if not 0.0 <= final_fraction <= 1.0:
        msg = f"final_fraction must lie in [0, 1], got {final_fraction!r}"
        raise ValueError(msg)
    make_optimizer(  # validates the learning rate before any work
        optimizer, learning_rate=learning_rate, momentum=momentum, schedule="cyclic",
        cycle_steps=cycle_steps, final_fraction=final_fraction,
    )
    opt = (("name", optimizer), ("learning_rate", float(learning_rate)), ("momentum", float(momentum)),
           ("schedule", "cyclic"), ("cycle_steps", cycle_steps), ("final_fraction", float(final_fraction)))
    settings = {"optimizer": optimizer, "learning_rate": float(learning_rate), "schedule": "cyclic",
                "cycle_steps": cycle_steps, "final_fraction": float(final_fraction), "cycles": cycles}
    capture = [cycle_steps * (c + 1) for c in range(cycles)]
    return _continue(key, trainer, state, method=method, optimizer_settings=opt, steps=cycles * cycle_steps,
                     capture=capture, settings=settings, keep_average=keep_average)


def snapshot_ensemble(
    key: Key,
    trainer: Trainer,
    state: TrainState,
    *,
    cycles: int,
    cycle_steps: int,
    learning_rate: float = 0.1,
    final_fraction: float = 0.0,
    optimizer: str = "sgd",
    momentum: float = 0.9,
) -> BasinResult:
    """Snapshot ensemble (Huang et al. 2017, arXiv 1704.00109): one member per cosine cycle.

    From ``state`` (usually the initial state: "train 1, get M for free") the learning rate follows
    ``α(s) = α_lo + ½ (α − α_lo)(1 + cos(π (s mod c) / c))`` with ``c = cycle_steps`` and
    ``α_lo = final_fraction · α``, restarting at ``α`` every cycle; the snapshot at the end of each
    cycle is a member. Large restarts let the members leave the basin, so no average is returned.

    Args:
        key: data-order key.
        trainer: model, data, batch size and loss (its optimizer is not used).
        state: where to start.
        cycles: number of cycles ``M`` (= members).
        cycle_steps: steps per cycle.
        learning_rate: the restart (maximum) learning rate ``α``.
        final_fraction: ``α_lo / α`` (0 in the paper).
        optimizer, momentum: ``"sgd"`` with momentum (the paper) or ``"adam"``.

    Returns:
        :class:`BasinResult` with ``method="snapshot"``, ``cycles`` members and ``average=None``.
    """
    return _cycles(key, trainer, state, method="snapshot", cycles=cycles, cycle_steps=cycle_steps,
                   learning_rate=learning_rate, final_fraction=final_fraction, optimizer=optimizer,
                   momentum=momentum, keep_average=False)


def fge(
    key: Key,
    trainer: Trainer,
    state: TrainState,
    *,
    cycles: int,
    cycle_steps: int,
    learning_rate: float = 0.05,
    final_fraction: float = 0.01,
    optimizer: str = "sgd",
    momentum: float = 0.9,
) -> BasinResult:
    """Fast Geometric Ensembling (Garipov et al. 2018, arXiv 1802.10026) from a trained state.

    Short learning-rate cycles (the paper uses 2–4 epochs, ``α_1 = 5·10⁻²`` down to
    ``α_2 = 5·10⁻⁴``) move the model along low-loss paths inside its basin; the model at each
    learning-rate minimum is a member. The paper's cycle is piecewise linear and collects at its
    midpoint; here it is the cosine cycle of :func:`snapshot_ensemble`, collected at its end (the
    same learning-rate minimum). The members' average is returned too (FGE members are what SWA
    averages).

    Args:
        key: data-order key.
        trainer: model, data, batch size and loss (its optimizer is not used).
        state: the trained state.
        cycles: number of members.
        cycle_steps: steps per cycle (short: a few epochs).
        learning_rate: ``α_1``; ``final_fraction = α_2 / α_1``.
        optimizer, momentum: ``"sgd"`` with momentum (the paper) or ``"adam"``.

    Returns:
        :class:`BasinResult` with ``method="fge"``.
    """
    return _cycles(key, trainer, state, method="fge", cycles=cycles, cycle_steps=cycle_steps,
                   learning_rate=learning_rate, final_fraction=final_fraction, optimizer=optimizer,
                   momentum=momentum, keep_average=True)


# ----------------------------------------------------------------------------- simplex ensembles
@functools.partial(
    jax.tree_util.register_dataclass,
    data_fields=["vertices", "members", "average", "losses", "log_volumes"],
    meta_fields=["settings"],
)
@dataclasses.dataclass(frozen=True)
class SimplexResult:
    """A low-loss simplex from :func:`simplex` and samples from it.

    Attributes:
        vertices: the simplex vertices: the given trained ones first, then the grown ones.
        members: points drawn uniformly from the simplex (Dirichlet(1, …, 1) weights).
        average: the centroid ``(1/(K+1)) Σ_k v_k``.
        losses: ``(num_new, steps)`` the regularised training objective at every step of every
            grown vertex.
        log_volumes: ``(num_new,)`` log volume of the simplex after each vertex was grown.
        settings: what was done, as ``(name, value)`` pairs.
    """

    vertices: tuple[Params, ...]
    members: tuple[Params, ...]
    average: Params
    losses: np.ndarray
    log_volumes: np.ndarray
    settings: tuple[tuple[str, Any], ...]

    @property
    def settings_dict(self) -> dict[str, Any]:
        return dict(self.settings)

    @property
    def num_members(self) -> int:
        return len(self.members)

    def point(self, weights: Array) -> Params:
        """The simplex point ``Σ_k w_k v_k`` for barycentric ``weights`` (length = vertices)."""
        w = jnp.asarray(weights)
        if w.shape != (len(self.vertices),):
            msg = f"weights must have shape ({len(self.vertices)},), one per vertex, got {w.shape}"
            raise ValueError(msg)
        return _combine(tree.stack(list(self.vertices)), w)

    def sample(self, key: Key, num: int) -> list[Params]:
        """``num`` points drawn uniformly from the simplex."""
        num = _check_positive_int("num", num)
        w = _uniform_simplex(key, num, len(self.vertices), jnp.float32)
        stacked = tree.stack(list(self.vertices))
        return [_combine(stacked, wi) for wi in w]

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe summary (no parameters)."""
        return {
            "num_vertices": len(self.vertices),
            "num_members": self.num_members,
            "settings": self.settings_dict,
            "log_volumes": [float(v) for v in np.asarray(self.log_volumes)],
            "final_losses": [float(v) for v in np.asarray(self.losses)[:, -1]] if np.size(self.losses) else [],
        }

    def plot(self) -> Any:
        """Plotly figure: the regularised objective while each new vertex was trained."""
        import plotly.graph_objects as go

        fig = go.Figure()
        for i, row in enumerate(np.asarray(self.losses)):
            fig.add_trace(go.Scatter(y=row, mode="lines", name=f"vertex {len(self.vertices) - len(self.losses) + i}"))
        fig.update_layout(title="simplex growth: E[L] − λ log V", xaxis_title="step", yaxis_title="objective")
        return fig


def _uniform_simplex(key: Key, num: int, dim: int, dtype: Any) -> Array:
    """``(num, dim)`` uniform points of the probability simplex: Dirichlet(1, …, 1) as normalised
    Exp(1) draws (much cheaper to compile than ``jax.random.dirichlet``)."""
    g = jax.random.exponential(key, (num, dim), dtype)
    return g / jnp.sum(g, axis=1, keepdims=True)


def _combine(stacked: Params, w: Array) -> Params:
    return jax.tree.map(lambda v: jnp.tensordot(w.astype(v.dtype), v, axes=1), stacked)


def _log_volume(flat_vertices: Array) -> Array:
    """Log volume of the simplex with rows of ``flat_vertices`` (K+1, D) as vertices.

    ``V = sqrt(det G) / K!`` with ``G = E Eᵀ``, ``E_k = v_k − v_0`` (the Gram form of the
    Cayley–Menger determinant).
    """
    e = flat_vertices[1:] - flat_vertices[0]
    k = e.shape[0]
    gram = e @ e.T
    return jnp.sum(jnp.log(jnp.diagonal(jnp.linalg.cholesky(gram)))) - math.lgamma(k + 1)


def _masked_log_volume(flat_vertices: Array, mask: Array) -> Array:
    """:func:`_log_volume` of the vertices with ``mask = 1`` (a prefix), for a traced count."""
    m = mask[1:]
    e = (flat_vertices[1:] - flat_vertices[0]) * m[:, None]
    gram = e @ e.T + jnp.diag(1.0 - m)
    half_logdet = jnp.sum(jnp.log(jnp.diagonal(jnp.linalg.cholesky(gram))))
    return half_logdet - jax.scipy.special.gammaln(jnp.sum(m) + 1.0)


def simplex(
    key: Key,
    trainer: Trainer,
    vertices: Params | Sequence[Params],
    *,
    num_new: int = 2,
    steps: int = 200,
    learning_rate: float = 1e-3,
    volume_weight: float = 1e-3,
    samples_per_step: int = 2,
    init_scale: float = 1e-2,
    num_samples: int = 8,
) -> SimplexResult:
    """Grow a low-loss simplex from trained vertices (Benton et al. 2021, arXiv 2102.13042).

    Points of the simplex are convex combinations ``θ(w) = Σ_k w_k v_k`` of its vertices, ``w`` on
    the probability simplex. Starting from the given trained vertices, ``num_new`` vertices are
    added one at a time; each starts at the centroid plus Gaussian noise of scale ``init_scale``
    and is trained with Adam (the earlier vertices frozen) on

    .. math::  \\frac{1}{S} \\sum_{s=1}^{S} L_{batch}(θ(w_s)) \\; − \\; λ \\log V(v_0, …, v_K),
       \\qquad w_s \\sim \\text{Dirichlet}(1, …, 1),

    the expected minibatch loss at ``S = samples_per_step`` uniform simplex points minus ``λ``
    (``volume_weight``) times the log volume ``V = \\sqrt{\\det(E Eᵀ)} / K!``, ``E_k = v_k − v_0``
    (Cayley–Menger). The volume term pushes the new vertex away so that the simplex spans a wide
    low-loss region; the loss term keeps all of it low. Finally ``num_samples`` points are drawn
    uniformly from the simplex as ensemble members.

    Args:
        key: randomness for the initial noise, simplex points, minibatches and the final samples.
        trainer: model, data, batch size and loss (its optimizer is not used).
        vertices: one trained params or a sequence of matching trained params (the fixed start).
        num_new: vertices to grow.
        steps: Adam steps per grown vertex.
        learning_rate: Adam learning rate.
        volume_weight: ``λ``.
        samples_per_step: simplex points ``S`` per step.
        init_scale: standard deviation of the initial offset from the centroid.
        num_samples: members drawn from the final simplex.

    Returns:
        :class:`SimplexResult`.
    """
    if not isinstance(trainer, Trainer):
        msg = f"trainer must be a landscape.train.Trainer, got {type(trainer).__name__}"
        raise ValueError(msg)
    start = list(vertices) if isinstance(vertices, (list, tuple)) else [vertices]
    if not start:
        msg = "simplex needs at least one trained vertex, got an empty sequence"
        raise ValueError(msg)
    for i, v in enumerate(start[1:], start=1):
        tree.check_match(start[0], v, names=("vertices[0]", f"vertices[{i}]"))
    num_new = _check_positive_int("num_new", num_new)
    steps = _check_positive_int("steps", steps)
    samples_per_step = _check_positive_int("samples_per_step", samples_per_step)
    num_samples = _check_positive_int("num_samples", num_samples)
    if not volume_weight >= 0:
        msg = f"volume_weight must be >= 0, got {volume_weight!r}"
        raise ValueError(msg)
    if not learning_rate > 0:
        msg = f"learning_rate must be > 0, got {learning_rate!r}"
        raise ValueError(msg)
    if len(start) + num_new - 1 > tree.num_params(start[0]):
        msg = f"a simplex with {len(start) + num_new} vertices needs more than {tree.num_params(start[0])} parameters"
        raise ValueError(msg)

    loss_fn = LOSSES[trainer.loss] if isinstance(trainer.loss, str) else trainer.loss
    apply_fn = trainer.apply_fn
    flat0, unravel = tree.ravel(start[0])
    total = len(start) + num_new
    n, bs = trainer.num_examples, trainer.batch_size
    opt = optax.adam(learning_rate)

    # One compiled loop serves every stage: the (total, D) vertex array holds the vertices grown so
    # far, ``active`` (traced) says how many count; inactive ones get weight 0 and a unit Gram block.
    def objective(new: Array, verts: Array, active: Array, g: Array, idx: Array, x: Array, y: Array) -> Array:
        allv = jax.lax.dynamic_update_index_in_dim(verts, new, active - 1, axis=0)
        mask = (jnp.arange(total) < active).astype(allv.dtype)
        g = g * mask  # Exp(1) draws on the active vertices: normalised, Dirichlet(1, ..., 1)
        w = g / jnp.sum(g, axis=1, keepdims=True)
        xb, yb = x[idx], y[idx]

        def one(wi: Array) -> Array:
            return jnp.mean(loss_fn(apply_fn(unravel(wi @ allv), xb), yb))

        expected = jnp.mean(jax.vmap(one)(w))
        return expected - volume_weight * _masked_log_volume(allv, mask)

    @jax.jit
    def grow(verts: Array, active: Array, k: Key, x: Array, y: Array) -> tuple[Array, Array, Array]:
        kn, kw, kb = jax.random.split(k, 3)
        mask = (jnp.arange(total) < active - 1).astype(verts.dtype)
        centroid = (mask @ verts) / jnp.sum(mask)
        new = centroid + init_scale * jax.random.normal(kn, centroid.shape, centroid.dtype)
        gs = jax.random.exponential(kw, (steps, samples_per_step, total), verts.dtype)
        idxs = jax.random.randint(kb, (steps, bs), 0, n)  # minibatches drawn with replacement

        def step(carry: tuple[Array, Any], xs: tuple[Array, Array]) -> tuple[tuple[Array, Any], Array]:
            p, o = carry
            val, grad = jax.value_and_grad(objective)(p, verts, active, xs[0], xs[1], x, y)
            up, o = opt.update(grad, o, p)
            return (optax.apply_updates(p, up), o), val

        (p, _), vals = jax.lax.scan(step, (new, opt.init(new)), (gs, idxs))
        verts = jax.lax.dynamic_update_index_in_dim(verts, p, active - 1, axis=0)
        return verts, vals, _masked_log_volume(verts, (jnp.arange(total) < active).astype(verts.dtype))

    @jax.jit
    def draw(verts: Array, k: Key) -> tuple[Array, Array]:
        w = _uniform_simplex(k, num_samples, total, verts.dtype)
        return w @ verts, jnp.mean(verts, axis=0)

    k_grow, k_sample = jax.random.split(key)
    verts = jnp.zeros((total, flat0.shape[0]), flat0.dtype).at[: len(start)].set(
        jnp.stack([tree.ravel(v)[0] for v in start]))
    traces, log_volumes = [], []
    for j in range(num_new):
        verts, vals, logvol = grow(verts, jnp.asarray(len(start) + j + 1), jax.random.fold_in(k_grow, j),
                                   trainer.x, trainer.y)
        traces.append(np.asarray(vals))
        log_volumes.append(float(logvol))
    samples, centroid = draw(verts, k_sample)
    fixed = verts
    verts = tuple(unravel(v) for v in fixed)
    members = tuple(unravel(v) for v in samples)
    settings = {"num_start": len(start), "num_new": num_new, "steps": steps, "optimizer": "adam",
                "learning_rate": float(learning_rate), "volume_weight": float(volume_weight),
                "samples_per_step": samples_per_step, "init_scale": float(init_scale), "num_samples": num_samples}
    return SimplexResult(
        vertices=verts, members=members, average=unravel(centroid),
        losses=np.stack(traces), log_volumes=np.asarray(log_volumes), settings=tuple(settings.items()),
    )
