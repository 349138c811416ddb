"""Loss and accuracy along paths, and loss barriers.

The loss barrier of the survey's Eq. (1) (Frankle et al. 2020; Entezari et al. 2021) between the
ends of a path ``θ(t)``:

.. math::  B_{\\text{linear}} = \\max_t \\; L(θ(t)) − [(1 − t) L(θ_0) + t L(θ_1)]

measures how far the path rises above the chord between the endpoint losses. The variant used by
git-re-basin (Ainsworth et al. 2022, arXiv 2209.04836) compares with the endpoints' mean:

.. math::  B_{\\text{mean}} = \\max_t \\; L(θ(t)) − ½ (L(θ_0) + L(θ_1)).

Both are reported for the loss and for the error rate (1 − accuracy). Both maxima include the
endpoints, so a barrier is never negative.

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
from probes.paths import Path, linear

__all__ = ["BARRIER_DEFINITIONS", "CURVE_KINDS", "Barrier", "CurveFit", "PathResult", "evaluate_path", "fit_curve", "interpolate"]

BARRIER_DEFINITIONS = ("linear", "mean")


@dataclasses.dataclass(frozen=True)
class Barrier:
    """Barrier heights for loss and error under one definition, and where (``t``) they peak."""

    loss: float
    error: float
    t_loss: float
    t_error: float
    definition: str

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _barrier(ts: np.ndarray, values: np.ndarray, definition: str) -> tuple[float, float]:
    if definition == "linear":
        reference = (1 - ts) * values[0] + ts * values[-1]
    else:
        reference = np.full_like(values, 0.5 * (values[0] + values[-1]))
    excess = values - reference
    i = int(np.nanargmax(excess))
    return float(max(excess[i], 0.0)), float(ts[i])


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class PathResult:
    """Loss and accuracy of an Objective at points ``ts`` of a path.

    Attributes:
        ts: the evaluated path parameters, increasing, from 0 to 1 for barriers.
        loss: mean loss at each ``t``.
        accuracy: accuracy at each ``t``.
    """

    ts: Array
    loss: Array
    accuracy: Array

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
        bl, tl = _barrier(ts, loss, definition)
        be, te = _barrier(ts, err, definition)
        return Barrier(loss=bl, error=be, t_loss=tl, t_error=te, definition=definition)

    @property
    def barrier(self) -> Barrier:
        """Barrier heights under the survey's Eq. (1) (chord between the endpoint values)."""
        return self.barrier_for("linear")

    @property
    def midpoint(self) -> dict[str, float]:
        """Loss and accuracy at the evaluated ``t`` closest to ½."""
        i = int(np.argmin(np.abs(np.asarray(self.ts) - 0.5)))
        return {"t": float(self.ts[i]), "loss": float(self.loss[i]), "accuracy": float(self.accuracy[i])}

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe summary: the curves, both barrier definitions, the midpoint."""
        out: dict[str, Any] = {
            "ts": np.asarray(self.ts).tolist(),
            "loss": np.asarray(self.loss).tolist(),
            "accuracy": np.asarray(self.accuracy).tolist(),
            "midpoint": self.midpoint,
        }
        try:
            out["barrier"] = {d: self.barrier_for(d).to_dict() for d in BARRIER_DEFINITIONS}
        except ValueError:
            out["barrier"] = None
        return out

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
    objective: Objective, path: Path, ts: Array, *, chunk: int | None = None, reset: Array | None = None
) -> PathResult:
    """Evaluate ``objective`` at ``path(t)`` for every ``t`` in ``ts``.

    Points are evaluated with ``lax.map`` over chunks of ``chunk`` points, ``jax.vmap`` inside each
    chunk (``chunk=None`` vmaps all points at once; ``chunk=1`` is sequential — the smallest memory).
    Jittable; no recompilation for new values of ``ts`` of the same length.

    ``reset``: for BatchNorm models (a zoo ``apply_fn`` with ``state``), inputs on which every
    point's running statistics are recomputed before it is evaluated (RESET, Jordan et al. 2022;
    Garipov et al.'s ``update_bn``) — the points then run one at a time.
    """
    ts = _check_ts(ts)
    if chunk is not None and (not isinstance(chunk, int) or chunk < 1):
        msg = f"chunk must be a positive int or None, got {chunk!r}"
        raise ValueError(msg)
    if reset is not None:
        return _evaluate_with_reset(objective, path, ts, reset)

    def at(t: Array) -> tuple[Array, Array]:
        out = objective.evaluate(path(t))
        return out["loss"], out["accuracy"]

    batch = ts.shape[0] if chunk is None else min(chunk, ts.shape[0])
    loss, acc = jax.lax.map(at, ts, batch_size=batch)
    return PathResult(ts=ts, loss=loss, accuracy=acc)


def _evaluate_with_reset(objective: Objective, path: Path, ts: Array, x: Array) -> PathResult:
    from landscape.align import reset as reset_statistics

    apply_fn = objective.apply_fn
    if not getattr(apply_fn, "state", None) or not hasattr(apply_fn, "with_state"):
        msg = "reset= needs a model with BatchNorm state (a zoo apply_fn with .state and .with_state)"
        raise ValueError(msg)
    losses, accs = [], []
    for t in np.asarray(ts):
        params = path(float(t))
        state = reset_statistics(apply_fn, params, apply_fn.state, x)
        out = objective.replace(apply_fn=apply_fn.with_state(state)).evaluate(params)
        losses.append(out["loss"])
        accs.append(out["accuracy"])
    return PathResult(ts=ts, loss=jnp.stack(losses), accuracy=jnp.stack(accs))


def interpolate(
    objective: Objective, a: Params, b: Params, *, num: int = 25, chunk: int | None = 5
) -> PathResult:
    """Loss and accuracy on the straight line from ``a`` to ``b`` at ``num`` evenly spaced ``t``.

    Args:
        objective: the dataset and loss ("loss" is always the full-dataset mean).
        a, b: matching params (ValueError naming the first differing key path otherwise).
        num: number of points including both ends (git-re-basin uses 25, Frankle et al. 30).
        chunk: points evaluated together (vmapped) per sequential step; bounds memory.

    Returns:
        A :class:`PathResult`; ``.barrier`` gives Eq. (1) for loss and error.
    """
    tree.check_match(a, b)
    if not isinstance(num, int) or num < 2:
        msg = f"num must be an int >= 2 (both endpoints are included), got {num!r}"
        raise ValueError(msg)
    ts = jnp.linspace(0.0, 1.0, num)
    return evaluate_path(objective, linear(a, b), ts, chunk=chunk)


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
) -> CurveFit:
    """Fit a Bezier curve or polygonal chain between fixed endpoints (Garipov et al. 2018, arXiv 1802.10026).

    The bends ``θ_1..θ_m`` are initialised on the segment (``θ_i = lerp(a, b, i/(m+1))``) unless
    ``init`` gives them, and trained with Adam on

    .. math::  E_{t \\sim U(0,1)} \\; L_{\\text{batch}}(θ(t)) + \\tfrac{w}{2} \\|θ(t)\\|^2,

    one ``t`` and one minibatch per step, as in the reference code. Nothing about the model's layers
    is rewritten: the curve is a function ``t -> params`` and any params pytree works. Models with
    BatchNorm (``apply_fn.apply_train``) use batch statistics while fitting, and their running
    statistics are recomputed on the training inputs at every evaluated ``t``.

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
    ev = eval_objective if eval_objective is not None else objective
    has_bn = bool(getattr(objective.apply_fn, "state", None))
    result = evaluate_path(ev, make(points), jnp.linspace(0.0, 1.0, num_eval), chunk=5,
                           reset=objective.x if has_bn else None)
    return CurveFit(kind, points, result, np.asarray(losses), np.asarray(ts))
