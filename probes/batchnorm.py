"""BatchNorm running statistics at the points a probe evaluates (RESET, Jordan et al. 2022).

A network with BatchNorm evaluates in eval mode with running statistics ``(μ, v)`` that belong to
the weights they were collected with. A point that is not a trained model — a point of a path, a
curve, a surface, a mixture of basin members — has no statistics of its own, and evaluating it
with an endpoint's gives a wrong loss (variance collapse, Jordan et al. 2022, arXiv 2211.08403,
Sec. 3). RESET recomputes them at that point on the data, as Garipov et al.'s ``update_bn``
(arXiv 1802.10026) and :func:`landscape.align.reset` do: the inputs are cut into
``ceil(N / B)`` batches (``B`` = :data:`RESET_BATCH_SIZE`, 512, ``align.reset``'s default, or the
``batch_size`` of an Objective given as the RESET data; the last batch smaller, never padded),
each runs in train mode (every BatchNorm normalises with its batch statistics) and the
new statistics are the batch statistics averaged with weights ``n_k / N``,

.. math::  \\hat μ = \\sum_k \\frac{n_k}{N} μ_k, \\qquad \\hat v = \\sum_k \\frac{n_k}{N} v_k,

the exact population statistics when ``B >= N``. The batch statistics are read through the
model's own running-average update ``r ← m r + (1 − m) s`` from ``r = 0`` (the momentum ``m`` is
measured once per model by :func:`momentum`), so the recomputation is a pure function of the
params: vmappable over points and jitted once per setting (:func:`reset_state`,
:func:`evaluate_reset`).

Every probe takes ``stats``: ``"reset"`` (the default for a model with running statistics: every
point that is not a trained model uses RESET statistics, trained models their own), ``"given"``
(every point uses the statistics the objective's ``apply_fn`` carries — the old behaviour) or
``None`` (choose by the model). Results record which were used: ``"reset"``, ``"given"`` or
``"none"`` (a model without running statistics).

A model has running statistics when its ``apply_fn`` carries a non-empty ``state`` and offers
``apply_train(params, state, x) -> (logits, new_state)`` and ``with_state(state)``, as a zoo
:class:`~landscape.models.FunctionalModel` does.

Example:
    >>> import jax, jax.numpy as jnp
    >>> from landscape import Objective, models
    >>> fn, p, s = models.functional(models.build("cnn", jax.random.key(0), in_channels=1,
    ...                                           num_classes=3, widths=(4,), norm="batch"))
    >>> obj = Objective(fn, jnp.ones((6, 8, 8, 1)), jnp.zeros(6, jnp.int32))
    >>> resolve_stats(obj, None), resolve_stats(obj, "given")
    ('reset', 'given')
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from landscape import tree
from landscape._types import Array, Params
from landscape.objective import Objective

__all__ = [
    "RESET_BATCH_SIZE",
    "STATS",
    "evaluate_at",
    "evaluate_mixtures_reset",
    "evaluate_path_reset",
    "evaluate_given",
    "evaluate_reset",
    "evaluate_stacked_given",
    "evaluate_stacked_reset",
    "has_running_stats",
    "momentum",
    "reset_inputs",
    "reset_state",
    "resolve_stats",
]

RESET_BATCH_SIZE = 512
"""Examples per train-mode pass of RESET (:func:`landscape.align.reset`'s default): with at most
this many inputs the statistics are the exact population statistics."""

STATS = ("reset", "given")
"""Accepted ``stats`` values of every probe (or ``None``: ``"reset"`` when the model has running
statistics, else nothing to choose)."""


def has_running_stats(apply_fn: Any) -> bool:
    """Whether ``apply_fn`` carries non-empty running statistics (a non-empty ``.state``)."""
    state = getattr(apply_fn, "state", None)
    return bool(state) and bool(jax.tree.leaves(state))


def resolve_stats(objective: Objective, stats: str | None) -> str:
    """The statistics a probe uses: ``"reset"``, ``"given"`` or ``"none"`` (no running statistics).

    Args:
        objective: the probe's objective (its ``apply_fn`` carries the model's state, if any).
        stats: ``"reset"``, ``"given"`` or ``None`` (``"reset"`` for a model with running
            statistics, ``"none"`` otherwise).

    Raises:
        ValueError: an unknown ``stats``, or ``"reset"`` asked for a model without running
            statistics (no non-empty ``apply_fn.state``, or no ``apply_train`` / ``with_state``).
    """
    if stats is not None and stats not in STATS:
        msg = f"unknown stats {stats!r}; accepted: {list(STATS)} or None (reset when the model has running statistics)"
        raise ValueError(msg)
    fn = objective.apply_fn
    stateful = has_running_stats(fn)
    if stats == "reset":
        missing = [name for name in ("apply_train", "with_state") if not callable(getattr(fn, name, None))]
        if not stateful or missing:
            what = "has no running statistics (its apply_fn.state is empty or absent)" if not stateful else (
                f"lacks {missing}")
            msg = (
                f"stats='reset' recomputes BatchNorm running statistics, but the objective's apply_fn "
                f"({type(fn).__name__}) {what}; RESET needs BatchNorm state: apply_fn.state (mean / var), "
                "apply_fn.apply_train(params, state, x) and apply_fn.with_state(state), as a zoo "
                "FunctionalModel with norm='batch' has. Pass stats='given' or stats=None for this model."
            )
            raise ValueError(msg)
        return "reset"
    if not stateful:
        return "none"
    if stats is None:
        resolve_stats(objective, "reset")  # the same checks as an explicit request
        return "reset"
    return "given"


def reset_inputs(objective: Objective, x: Any | None) -> tuple[Array, int]:
    """``(inputs, batch_size)`` RESET statistics are computed on.

    ``x=None``: the objective's inputs and :data:`RESET_BATCH_SIZE`; an array: those inputs (same
    trailing shape as the objective's); an :class:`~landscape.Objective`: its inputs and batch size.
    """
    if x is None:
        return objective.x, RESET_BATCH_SIZE
    if isinstance(x, Objective):
        return x.x, x.batch_size
    arr = jnp.asarray(x)
    if arr.ndim < 1 or arr.shape[0] == 0 or arr.shape[1:] != objective.x.shape[1:]:
        msg = (
            f"reset_x must be inputs (N, {', '.join(map(str, objective.x.shape[1:]))}) with N > 0 like the "
            f"objective's, got shape {arr.shape}"
        )
        raise ValueError(msg)
    return arr, RESET_BATCH_SIZE


@jax.jit
def _momentum(objective: Objective, params: Params) -> Params:
    fn = objective.apply_fn
    xb = objective.x[:2]
    zeros = jax.tree.map(jnp.zeros_like, fn.state)
    ones = jax.tree.map(jnp.ones_like, fn.state)
    return jax.tree.map(jnp.subtract, fn.apply_train(params, ones, xb)[1], fn.apply_train(params, zeros, xb)[1])


def momentum(objective: Objective, params: Params) -> Params:
    """The momentum ``m`` of every running statistic, measured from two train steps.

    A train step from ``r = 0`` returns ``(1 − m) s`` and one from ``r = 1`` returns
    ``m + (1 − m) s``; their difference is ``m`` (per entry). It depends on the model, not on
    ``params`` (any point of the right structure will do).

    Raises:
        ValueError: a state leaf that is not updated as ``r ← m r + (1 − m) s`` with
            ``0 <= m < 1`` (not a BatchNorm statistic), naming the leaf.
    """
    keep = _momentum(objective, params)
    for path, m in jax.tree.leaves_with_path(keep):
        m = np.asarray(m)
        if not np.all((m >= 0) & (m < 1 - 1e-6)):
            msg = (
                f"state leaf {tree.key_name(path)!r} is not updated as r <- m r + (1 - m) s with 0 <= m < 1 in "
                f"train mode (found m in [{m.min()}, {m.max()}]); RESET handles BatchNorm statistics only"
            )
            raise ValueError(msg)
    return keep


def reset_state(apply_fn: Any, params: Params, x: Array, keep: Params, *, batch_size: int) -> Params:
    """RESET statistics of ``params`` on the inputs ``x``: pure, jittable and vmappable over params.

    Batches of ``min(batch_size, N)`` inputs and a smaller last one (never padded), each run in
    train mode from zero running statistics; the sum of ``n_k (1 − m) s_k`` divided by
    ``N (1 − m)`` — the same numbers as :func:`landscape.align.reset`.

    Args:
        apply_fn: a model with ``apply_train`` and a non-empty ``state`` (its structure and dtypes).
        params: the point.
        x: inputs ``(N, ...)``.
        keep: the momentum of every statistic, from :func:`momentum`.
        batch_size: examples per train-mode pass.
    """
    n = int(x.shape[0])
    bs = min(batch_size, n)
    full, rest = divmod(n, bs)
    zeros = jax.tree.map(jnp.zeros_like, apply_fn.state)

    def scaled(xb: Array) -> Params:
        return jax.tree.map(lambda v: v * xb.shape[0], apply_fn.apply_train(params, zeros, xb)[1])

    xs = x[: full * bs].reshape((full, bs) + x.shape[1:])

    def body(acc: Params, xb: Array) -> tuple[Params, None]:
        return jax.tree.map(jnp.add, acc, scaled(xb)), None

    total, _ = jax.lax.scan(body, zeros, xs)
    if rest:
        total = jax.tree.map(jnp.add, total, scaled(x[full * bs:]))
    return jax.tree.map(lambda tot, m, s: (tot / (n * (1 - m))).astype(s.dtype), total, keep, apply_fn.state)


def _evaluate_with(objective: Objective, params: Params, state: Params) -> dict[str, Array]:
    return objective.replace(apply_fn=objective.apply_fn.with_state(state)).evaluate(params)


def evaluate_reset(
    objective: Objective, params: Params, x: Array, keep: Params, *, batch_size: int = RESET_BATCH_SIZE
) -> dict[str, Array]:
    """``objective.evaluate(params)`` with RESET statistics on ``x`` (pure; jit / vmap it)."""
    state = reset_state(objective.apply_fn, params, x, keep, batch_size=batch_size)
    return _evaluate_with(objective, params, state)


def evaluate_given(objective: Objective, params: Params, state: Params) -> dict[str, Array]:
    """``objective.evaluate(params)`` with the statistics ``state`` (pure; jit / vmap it)."""
    return _evaluate_with(objective, params, state)


@functools.partial(jax.jit, static_argnames=("batch_size",))
def _stacked_reset(
    objective: Objective, stacked: Params, x: Array, keep: Params, *, batch_size: int
) -> dict[str, Array]:
    return jax.vmap(lambda p: evaluate_reset(objective, p, x, keep, batch_size=batch_size))(stacked)


@jax.jit
def _stacked_given(objective: Objective, stacked: Params, states: Params) -> dict[str, Array]:
    return jax.vmap(lambda p, s: evaluate_given(objective, p, s))(stacked, states)


def _chunks(num: int, chunk: int | None) -> tuple[int, list[np.ndarray]]:
    size = num if chunk is None else max(1, min(chunk, num))
    starts = range(0, num, size)
    return size, [np.minimum(np.arange(s, s + size), num - 1) for s in starts]


def evaluate_stacked_reset(
    objective: Objective, stacked: Params, *, x: Array, keep: Params, chunk: int | None = None,
    batch_size: int = RESET_BATCH_SIZE,
) -> dict[str, np.ndarray]:
    """RESET evaluation of every point of ``stacked`` (leading point axis), ``chunk`` at a time.

    Each chunk is one call of a module-level jitted, vmapped function; the last chunk is padded
    by repeating its last point, so every chunk has the same shape and compiles once.
    """
    num = int(jax.tree.leaves(stacked)[0].shape[0])
    _, groups = _chunks(num, chunk)
    outs = [_stacked_reset(objective, jax.tree.map(lambda v, g=g: v[g], stacked), x, keep, batch_size=batch_size)
            for g in groups]
    return _concat(outs, num)


def evaluate_stacked_given(
    objective: Objective, stacked: Params, states: Params, *, chunk: int | None = None
) -> dict[str, np.ndarray]:
    """Evaluation of every point of ``stacked`` with its own statistics ``states`` (stacked alike)."""
    num = int(jax.tree.leaves(stacked)[0].shape[0])
    _, groups = _chunks(num, chunk)
    outs = [_stacked_given(objective, jax.tree.map(lambda v, g=g: v[g], stacked),
                           jax.tree.map(lambda v, g=g: v[g], states)) for g in groups]
    return _concat(outs, num)


def _concat(outs: list[dict[str, Array]], num: int) -> dict[str, np.ndarray]:
    return {k: np.concatenate([np.asarray(o[k]) for o in outs])[:num] for k in ("loss", "accuracy")}


@functools.partial(jax.jit, static_argnames=("chunk", "batch_size"))
def evaluate_mixtures_reset(
    objective: Objective, stacked: Params, weights: Array, x: Array, keep: Params, *, chunk: int,
    batch_size: int = RESET_BATCH_SIZE,
) -> tuple[Array, Array]:
    """RESET evaluation at ``Σ_m w_m θ_m`` for every row ``w`` of ``weights`` (``lax.map`` in chunks)."""

    def at(w: Array) -> tuple[Array, Array]:
        theta = jax.tree.map(lambda v: jnp.tensordot(w.astype(v.dtype), v, axes=1), stacked)
        out = evaluate_reset(objective, theta, x, keep, batch_size=batch_size)
        return out["loss"], out["accuracy"]

    return jax.lax.map(at, weights, batch_size=min(chunk, weights.shape[0]))


evaluate_at = jax.jit(evaluate_given)
"""Jitted :func:`evaluate_given` (one compilation per objective setting)."""


def evaluate_path_reset(
    objective: Objective, path: Any, ts: np.ndarray, *, x: Array, keep: Params, chunk: int | None = None,
    batch_size: int = RESET_BATCH_SIZE,
) -> dict[str, np.ndarray]:
    """RESET evaluation of ``path(t)`` for every ``t`` in ``ts``; only ``chunk`` points exist at once.

    Each chunk's points are formed by ``jax.vmap(path)`` and evaluated by one module-level jitted,
    vmapped function (the last chunk padded by repeating its last ``t``: one compilation).
    """
    ts = np.asarray(ts)
    num = ts.shape[0]
    _, groups = _chunks(num, chunk)
    outs = [_stacked_reset(objective, jax.vmap(path)(jnp.asarray(ts[g])), x, keep, batch_size=batch_size)
            for g in groups]
    return _concat(outs, num)
