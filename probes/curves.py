"""Loss and accuracy along paths, and loss barriers.

The loss barrier of the survey's Eq. (1) (Frankle et al. 2020; Entezari et al. 2021) between the
ends of a path ``θ(t)``:

.. math::  B_{\\text{linear}} = \\max_t \\; L(θ(t)) − [(1 − t) L(θ_0) + t L(θ_1)]

measures how far the path rises above the chord between the endpoint losses. The variant used by
git-re-basin (Ainsworth et al. 2022, arXiv 2209.04836) compares with the endpoints' mean:

.. math::  B_{\\text{mean}} = \\max_t \\; L(θ(t)) − ½ (L(θ_0) + L(θ_1)).

Both are reported for the loss and for the error rate (1 − accuracy). Both maxima include the
endpoints, so a barrier is never negative. A NaN or infinite value anywhere on the path makes
that barrier NaN with ``Barrier.finite = False`` (``docs/numerics.md``): a barrier is never the
maximum over the points that happened to be finite.

Example:
    >>> import jax.numpy as jnp
    >>> from landscape import Objective
    >>> from probes.curves import interpolate
    >>> obj = Objective(lambda p, x: x @ p["w"], jnp.eye(2), jnp.array([0, 1]))
    >>> a, b = {"w": 4 * jnp.eye(2)}, {"w": -4 * jnp.eye(2) + 4}
    >>> r = interpolate(obj, a, b, num=7)
    >>> round(r.barrier.error, 4)  # both ends misclassify one example; t=2/3 misclassifies both
    0.3333
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from landscape import tree
from landscape._types import Array, Params
from landscape.objective import Objective
from probes.numerics import json_safe
from probes.paths import Path, linear

__all__ = ["BARRIER_DEFINITIONS", "CURVE_KINDS", "ENDS", "Barrier", "CurveFit", "PathResult", "evaluate_path",
           "fit_curve", "interpolate"]

BARRIER_DEFINITIONS = ("linear", "mean")


@dataclasses.dataclass(frozen=True)
class Barrier:
    """Barrier heights for loss and error under one definition, and where (``t``) they peak.

    ``finite`` is False when a loss or error value on the path (endpoints included) is NaN or
    infinite; the affected height and its ``t`` are then NaN, never the maximum over the finite
    points (``docs/numerics.md``).
    """

    loss: float
    error: float
    t_loss: float
    t_error: float
    definition: str
    finite: bool = True

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe: the heights (``None`` where non-finite), the definition and ``finite``."""
        return json_safe(dataclasses.asdict(self))


def _barrier(ts: np.ndarray, values: np.ndarray, definition: str) -> tuple[float, float, bool]:
    """``(height, t at the peak, finite)``; a non-finite value anywhere gives ``(nan, nan, False)``."""
    if not np.all(np.isfinite(values)):
        return float("nan"), float("nan"), False
    if definition == "linear":
        reference = (1 - ts) * values[0] + ts * values[-1]
    else:
        reference = np.full_like(values, 0.5 * (values[0] + values[-1]))
    excess = values - reference
    i = int(np.argmax(excess))
    return float(max(excess[i], 0.0)), float(ts[i]), True


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class PathResult:
    """Loss and accuracy of an Objective at points ``ts`` of a path.

    Attributes:
        ts: the evaluated path parameters, increasing, from 0 to 1 for barriers.
        loss: mean loss at each ``t``.
        accuracy: accuracy at each ``t``.
        stats: the BatchNorm running statistics of the points between the ends
            (:mod:`probes.batchnorm`): ``"reset"`` (recomputed at every point), ``"given"`` (those
            the objective's ``apply_fn`` carries; also for results built without saying) or
            ``"none"`` (a model without running statistics).
        end_stats: those of the points at ``t = 0`` and ``t = 1``: ``"own"`` (each endpoint's
            own), ``"reset"``, ``"given"`` or ``"none"``.
    """

    ts: Array
    loss: Array
    accuracy: Array
    stats: str = dataclasses.field(default="given", metadata={"static": True})
    end_stats: str = dataclasses.field(default="given", metadata={"static": True})

    @property
    def error(self) -> Array:
        """Error rate ``1 − accuracy`` at each ``t``."""
        return 1.0 - self.accuracy

    def barrier_for(self, definition: str = "linear") -> Barrier:
        """Barrier heights (loss and error) under ``definition`` = ``"linear"`` or ``"mean"``."""
        if definition not in BARRIER_DEFINITIONS:
            msg = f"unknown barrier definition {definition!r}; accepted: {list(BARRIER_DEFINITIONS)}"
            raise ValueError(msg)
        ts = np.asarray(self.ts, dtype=np.float64)
        if ts.ndim != 1 or ts.size < 2 or not (np.isclose(ts[0], 0.0) and np.isclose(ts[-1], 1.0)):
            msg = f"a barrier needs ts running from 0 to 1, got {ts.size} points from {ts[:1]} to {ts[-1:]}"
            raise ValueError(msg)
        loss = np.asarray(self.loss, dtype=np.float64)
        err = 1.0 - np.asarray(self.accuracy, dtype=np.float64)
        bl, tl, fl = _barrier(ts, loss, definition)
        be, te, fe = _barrier(ts, err, definition)
        return Barrier(loss=bl, error=be, t_loss=tl, t_error=te, definition=definition, finite=fl and fe)

    @property
    def barrier(self) -> Barrier:
        """Barrier heights under the survey's Eq. (1) (chord between the endpoint values)."""
        return self.barrier_for("linear")

    @property
    def finite(self) -> bool:
        """True when every loss and accuracy value on the path is finite."""
        return bool(np.all(np.isfinite(np.asarray(self.loss))) and np.all(np.isfinite(np.asarray(self.accuracy))))

    @property
    def midpoint(self) -> dict[str, float]:
        """Loss and accuracy at the evaluated ``t`` closest to ½."""
        i = int(np.argmin(np.abs(np.asarray(self.ts) - 0.5)))
        return {"t": float(self.ts[i]), "loss": float(self.loss[i]), "accuracy": float(self.accuracy[i])}

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe summary: the curves, both barrier definitions, the midpoint and ``finite``
        (non-finite values become ``None``, :func:`probes.numerics.json_safe`)."""
        out: dict[str, Any] = {
            "ts": np.asarray(self.ts).tolist(),
            "loss": np.asarray(self.loss).tolist(),
            "accuracy": np.asarray(self.accuracy).tolist(),
            "midpoint": self.midpoint,
            "finite": self.finite,
            "stats": self.stats,
            "end_stats": self.end_stats,
        }
        try:
            out["barrier"] = {d: self.barrier_for(d).to_dict() for d in BARRIER_DEFINITIONS}
        except ValueError:
            out["barrier"] = None
        return json_safe(out)

    def plot(self, *, title: str | None = None, name: str = "path") -> Any:
        """Interactive plotly figure of loss and error along the path, with the chord."""
        from probes.plot import path_figure

        return path_figure([(name, self)], title=title)


def _check_ts(ts: Array) -> Array:
    ts = jnp.asarray(ts)
    if ts.ndim != 1 or ts.shape[0] == 0:
        msg = f"ts must be a non-empty 1-D array of path parameters, got shape {ts.shape}"
        raise ValueError(msg)
    return ts


def evaluate_path(
    objective: Objective,
    path: Path,
    ts: Array,
    *,
    chunk: int | None = None,
    reset: Array | None = None,
    stats: str | None = None,
    ends: str = "own",
    end_states: tuple[Params | None, Params | None] | None = None,
    reset_x: Array | None = None,
) -> PathResult:
    """Evaluate ``objective`` at ``path(t)`` for every ``t`` in ``ts``.

    Points are evaluated with ``lax.map`` over chunks of ``chunk`` points, ``jax.vmap`` inside each
    chunk (``chunk=None`` vmaps all points at once; ``chunk=1`` is sequential — the smallest memory).
    Jittable; no recompilation for new values of ``ts`` of the same length.

    BatchNorm (:mod:`probes.batchnorm`): for a model with running statistics, ``stats="reset"``
    (the default) evaluates every point with statistics recomputed at that point on ``reset_x``
    (default: the objective's inputs; an Objective gives inputs and batch size, see
    :func:`probes.batchnorm.reset_inputs`) — RESET, Jordan et al. 2022 (arXiv 2211.08403) — and the
    ends ``t = 0`` and ``t = 1`` with their own statistics ``end_states`` (``ends="own"``; the
    state for ``t = 0`` defaults to the objective's ``apply_fn.state``, the one for ``t = 1`` must
    be given) or also with RESET (``ends="reset"``). Chunks of ``chunk`` points are vmapped
    through one jitted function. ``stats="given"`` evaluates every point with the objective's
    statistics. ``reset=x`` (older form) means ``stats="reset", ends="reset", reset_x=x``.
    The result's ``stats`` and ``end_stats`` say which were used.

    Raises:
        ValueError: bad ``ts`` / ``chunk`` / ``stats`` / ``ends``; ``stats="reset"`` for a model
            without running statistics; ``ends="own"`` with ``t = 1`` in ``ts`` but no state for it.
    """
    ts = _check_ts(ts)
    if chunk is not None and (not isinstance(chunk, int) or chunk < 1):
        msg = f"chunk must be a positive int or None, got {chunk!r}"
        raise ValueError(msg)
    if reset is not None:
        stats, ends, reset_x = "reset", "reset", reset
    mode = _resolve(objective, stats, ends)
    if mode == "reset":
        return _evaluate_with_reset(objective, path, ts, chunk=chunk, ends=ends, end_states=end_states,
                                    reset_x=reset_x)

    def at(t: Array) -> tuple[Array, Array]:
        out = objective.evaluate(path(t))
        return out["loss"], out["accuracy"]

    batch = ts.shape[0] if chunk is None else min(chunk, ts.shape[0])
    loss, acc = jax.lax.map(at, ts, batch_size=batch)
    return PathResult(ts=ts, loss=loss, accuracy=acc, stats=mode, end_stats=mode)


ENDS = ("own", "reset")
"""Accepted ``ends`` values: the statistics of a path's ends under ``stats="reset"``."""


def _resolve(objective: Objective, stats: str | None, ends: str) -> str:
    from probes.batchnorm import resolve_stats

    if ends not in ENDS:
        msg = f"unknown ends {ends!r}; accepted: {list(ENDS)}"
        raise ValueError(msg)
    return resolve_stats(objective, stats)


def _end_states(
    objective: Objective, ts: np.ndarray, end_states: tuple[Params | None, Params | None] | None
) -> dict[float, Params]:
    """``{0.0: state, 1.0: state}`` for the ends present in ``ts`` (``ends="own"``)."""
    if end_states is not None and (not isinstance(end_states, (tuple, list)) or len(end_states) != 2):
        msg = f"end_states must be a pair (state at t=0, state at t=1), got {type(end_states).__name__}"
        raise ValueError(msg)
    s0, s1 = (None, None) if end_states is None else end_states
    out: dict[float, Params] = {}
    if np.any(ts == 0.0):
        out[0.0] = objective.apply_fn.state if s0 is None else s0
    if np.any(ts == 1.0):
        if s1 is None:
            msg = (
                "stats='reset' with ends='own' evaluates t = 1 with that end's own BatchNorm running statistics, "
                "but none were given: pass end_states=(state_a, state_b) (state_a=None means the objective's "
                "apply_fn.state), ends='reset' to recompute them at the ends too, or stats='given'"
            )
            raise ValueError(msg)
        out[1.0] = s1
    for t, st in out.items():
        objective.apply_fn.with_state(st)  # checks the structure and shapes, naming the leaf
    return out


def _evaluate_with_reset(
    objective: Objective, path: Path, ts: Array, *, chunk: int | None, ends: str,
    end_states: tuple[Params | None, Params | None] | None, reset_x: Array | None,
) -> PathResult:
    from probes import batchnorm as bn

    t_np = np.asarray(ts)
    own = _end_states(objective, t_np, end_states) if ends == "own" else {}
    x, bs = bn.reset_inputs(objective, reset_x)
    loss = np.full(t_np.shape[0], np.nan, dtype=np.float32)
    acc = np.full(t_np.shape[0], np.nan, dtype=np.float32)
    inner = np.array([i for i, t in enumerate(t_np) if float(t) not in own], dtype=int)
    if inner.size:
        keep = bn.momentum(objective, path(ts[inner[0]]))
        out = bn.evaluate_path_reset(objective, path, t_np[inner], x=x, keep=keep, chunk=chunk, batch_size=bs)
        loss[inner], acc[inner] = out["loss"], out["accuracy"]
    for i, t in enumerate(t_np):
        if float(t) in own:
            out = bn.evaluate_at(objective, path(ts[i]), own[float(t)])
            loss[i], acc[i] = float(out["loss"]), float(out["accuracy"])
    return PathResult(ts=ts, loss=jnp.asarray(loss), accuracy=jnp.asarray(acc), stats="reset",
                      end_stats="own" if ends == "own" else "reset")


def interpolate(
    objective: Objective,
    a: Params,
    b: Params,
    *,
    num: int = 25,
    chunk: int | None = 5,
    stats: str | None = None,
    ends: str = "own",
    end_states: tuple[Params | None, Params | None] | None = None,
    reset_x: Array | None = None,
) -> PathResult:
    """Loss and accuracy on the straight line from ``a`` to ``b`` at ``num`` evenly spaced ``t``.

    Args:
        objective: the dataset and loss ("loss" is always the full-dataset mean).
        a, b: matching params (ValueError naming the first differing key path otherwise).
        num: number of points including both ends (git-re-basin uses 25, Frankle et al. 30).
        chunk: points evaluated together (vmapped) per sequential step; bounds memory.
        stats: BatchNorm running statistics (:mod:`probes.batchnorm`): ``"reset"`` (default for a
            model with them: recomputed at every interior point), ``"given"`` (the objective's at
            every point) or ``None``.
        ends: ``"own"`` (``a`` and ``b`` with their own statistics ``end_states``) or ``"reset"``.
        end_states: ``(state_a, state_b)``; ``state_a=None`` is the objective's ``apply_fn.state``.
            ``state_b`` is needed for a model with running statistics under ``stats="reset"``.
        reset_x: inputs RESET statistics are computed on (default: the objective's).

    Returns:
        A :class:`PathResult`; ``.barrier`` gives Eq. (1) for loss and error.
    """
    tree.check_match(a, b)
    if not isinstance(num, int) or num < 2:
        msg = f"num must be an int >= 2 (both endpoints are included), got {num!r}"
        raise ValueError(msg)
    ts = jnp.linspace(0.0, 1.0, num)
    return evaluate_path(objective, linear(a, b), ts, chunk=chunk, stats=stats, ends=ends, end_states=end_states,
                         reset_x=reset_x)


# ---------------------------------------------------------------------------- fitted curves
CURVE_KINDS = ("bezier", "polychain")


@dataclasses.dataclass(frozen=True)
class CurveFit:
    """A fitted mode-connecting curve.

    Attributes:
        kind: ``"bezier"`` or ``"polychain"``.
        points: control points stacked along a leading axis (endpoints first and last).
        result: the curve evaluated at evenly spaced ``t`` on the fitting Objective.
        losses: training loss at the sampled ``t`` of every optimisation step.
        ts_sampled: the ``t`` drawn at every step.
    """

    kind: str
    points: Params
    result: PathResult
    losses: np.ndarray
    ts_sampled: np.ndarray

    @property
    def path(self) -> Path:
        """The curve as a function ``t -> params``."""
        from probes import paths

        return paths.bezier(self.points) if self.kind == "bezier" else paths.polychain(self.points)

    @property
    def bends(self) -> list[Params]:
        """The inner control points."""
        return tree.unstack(self.points)[1:-1]

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "num_bends": len(self.bends), "result": self.result.to_dict(),
                "final_train_loss": float(np.mean(self.losses[-max(1, len(self.losses) // 10):]))}

    def plot(self, **kwargs: Any) -> Any:
        return self.result.plot(name=self.kind, **kwargs)


def _train_forward(apply_fn: Any, params: Params, x: Array) -> Array:
    train_apply = getattr(apply_fn, "apply_train", None)
    if train_apply is not None and getattr(apply_fn, "state", None):
        return train_apply(params, apply_fn.state, x)[0]  # BatchNorm: batch statistics while fitting
    return apply_fn(params, x)


def fit_curve(
    key: jax.Array,
    objective: Objective,
    a: Params,
    b: Params,
    *,
    kind: str = "bezier",
    bends: int = 1,
    steps: int = 1000,
    batch_size: int = 128,
    learning_rate: float = 1e-2,
    weight_decay: float = 0.0,
    init: Sequence[Params] | None = None,
    num_eval: int = 25,
    eval_objective: Objective | None = None,
    stats: str | None = None,
    ends: str = "own",
    end_states: tuple[Params | None, Params | None] | None = None,
) -> CurveFit:
    """Fit a Bezier curve or polygonal chain between fixed endpoints (Garipov et al. 2018, arXiv 1802.10026).

    The bends ``θ_1..θ_m`` are initialised on the segment (``θ_i = lerp(a, b, i/(m+1))``) unless
    ``init`` gives them, and trained with Adam on

    .. math::  E_{t \\sim U(0,1)} \\; L_{\\text{batch}}(θ(t)) + \\tfrac{w}{2} \\|θ(t)\\|^2,

    one ``t`` and one minibatch per step, as in the reference code. Nothing about the model's layers
    is rewritten: the curve is a function ``t -> params`` and any params pytree works. Models with
    BatchNorm (``apply_fn.apply_train``) use batch statistics while fitting; when the curve is
    evaluated, their running statistics are recomputed on the training inputs at every ``t``
    between the ends (RESET, ``stats="reset"``, the default for them) and the ends use their own
    (``end_states``; see :func:`evaluate_path` for ``stats``, ``ends`` and ``end_states``).

    Args:
        key: randomness for ``t`` and the minibatches.
        objective: training data, model and loss.
        a, b: the fixed endpoints (matching params).
        kind: ``"bezier"`` (Bernstein basis, degree ``bends + 1``) or ``"polychain"``.
        bends: number of inner control points (Garipov's ``num_bends=3`` counts the endpoints: 1 bend).
        steps, batch_size, learning_rate, weight_decay: optimisation settings.
        init: optional initial bends (a sequence of ``bends`` matching params), e.g. from alignment.
        num_eval: evenly spaced ``t`` at which the fitted curve is evaluated.
        eval_objective: Objective for that evaluation (default: ``objective``).
        stats, ends, end_states: BatchNorm statistics of the evaluation (:func:`evaluate_path`);
            checked before any fitting.

    Returns:
        :class:`CurveFit` with the control points, the evaluated curve and the training trace.
    """
    from probes import paths

    tree.check_match(a, b)
    if kind not in CURVE_KINDS:
        msg = f"unknown curve kind {kind!r}; accepted: {list(CURVE_KINDS)}"
        raise ValueError(msg)
    if not isinstance(bends, int) or bends < 1:
        msg = f"bends must be an int >= 1, got {bends!r}"
        raise ValueError(msg)
    if not isinstance(steps, int) or steps < 1:
        msg = f"steps must be an int >= 1, got {steps!r}"
        raise ValueError(msg)
    n = objective.num_examples
    bs = min(batch_size, n)
    if init is None:
        inner = [tree.lerp(a, b, (i + 1) / (bends + 1)) for i in range(bends)]
    else:
        inner = list(init)
        if len(inner) != bends:
            msg = f"init gives {len(inner)} bends, expected bends={bends}"
            raise ValueError(msg)
        for i, p in enumerate(inner):
            tree.check_match(a, p, names=("a", f"init[{i}]"))
    ev = eval_objective if eval_objective is not None else objective
    mode = _resolve(ev, stats, ends)
    if mode == "reset" and ends == "own":
        _end_states(ev, np.array([0.0, 1.0]), end_states)  # fail before fitting, not after
    make = paths.bezier if kind == "bezier" else paths.polychain
    loss_fn = objective.loss_fn
    opt = optax.adam(learning_rate)

    def curve_loss(inner_stacked: Params, t: Array, xb: Array, yb: Array) -> Array:
        pts = jax.tree.map(lambda x0, m, x1: jnp.concatenate([x0[None], m, x1[None]]), a, inner_stacked, b)
        theta = make(pts)(t)
        logits = _train_forward(objective.apply_fn, theta, xb)
        reg = 0.5 * weight_decay * tree.vdot(theta, theta) if weight_decay else 0.0
        return jnp.mean(loss_fn(logits, yb)) + reg

    @jax.jit
    def run(inner_stacked: Params, key: jax.Array, x: Array, y: Array) -> tuple[Params, Array, Array]:
        def step(carry: tuple[Params, Any], i: Array) -> tuple[tuple[Params, Any], tuple[Array, Array]]:
            params, ostate = carry
            kt, kb = jax.random.split(jax.random.fold_in(key, i))
            t = jax.random.uniform(kt)
            idx = jax.random.choice(kb, n, (bs,), replace=False)
            loss, grads = jax.value_and_grad(curve_loss)(params, t, x[idx], y[idx])
            updates, ostate = opt.update(grads, ostate, params)
            return (optax.apply_updates(params, updates), ostate), (loss, t)

        (params, _), (losses, ts) = jax.lax.scan(step, (inner_stacked, opt.init(inner_stacked)), jnp.arange(steps))
        return params, losses, ts

    trained, losses, ts = run(tree.stack(inner), key, objective.x, objective.y)
    points = jax.tree.map(lambda x0, m, x1: jnp.concatenate([x0[None], m, x1[None]]), a, trained, b)
    result = evaluate_path(ev, make(points), jnp.linspace(0.0, 1.0, num_eval), chunk=5, stats=stats, ends=ends,
                           end_states=end_states, reset_x=objective.x if mode == "reset" else None)
    return CurveFit(kind, points, result, np.asarray(losses), np.asarray(ts))
