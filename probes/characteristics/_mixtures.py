"""Evaluate an Objective at many convex combinations of stacked members in one compiled call.

A point is given by a weight row ``w`` over the ``M`` stacked members, ``θ(w) = Σ_m w_m θ_m``:
chord endpoints and midpoints, points on the segment between two members (``w = (1−t) e_i + t e_j``)
and the members themselves (``w = e_i``) all take this form, so one jitted function serves every
measurement of the characteristics. Points are evaluated sequentially in chunks (``lax.map`` with
``batch_size``), ``vmap`` inside a chunk, which bounds memory to ``chunk`` parameter copies.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from landscape._types import Array, Params
from landscape.objective import Objective
from probes.curves import PathResult

__all__ = ["evaluate_mixtures", "pair_paths"]


@functools.partial(jax.jit, static_argnames=("chunk",))
def _evaluate(objective: Objective, stacked: Params, weights: Array, *, chunk: int) -> tuple[Array, Array]:
    def at(w: Array) -> tuple[Array, Array]:
        theta = jax.tree.map(lambda v: jnp.tensordot(w.astype(v.dtype), v, axes=1), stacked)
        out = objective.evaluate(theta)
        return out["loss"], out["accuracy"]

    return jax.lax.map(at, weights, batch_size=min(chunk, weights.shape[0]))


def evaluate_mixtures(
    objective: Objective, stacked: Params, weights: Array, *, chunk: int = 4
) -> tuple[np.ndarray, np.ndarray]:
    """Full-dataset loss and accuracy at ``Σ_m w_m θ_m`` for every row ``w`` of ``weights`` (P, M)."""
    loss, acc = _evaluate(objective, stacked, jnp.asarray(weights, jnp.float32), chunk=chunk)
    return np.asarray(loss, np.float64), np.asarray(acc, np.float64)


def pair_paths(
    objective: Objective, stacked: Params, pairs: np.ndarray, num_members: int, *, num: int, chunk: int = 4
) -> list[PathResult]:
    """Straight-line paths between the members of each ``(i, j)`` row of ``pairs``, ``num`` points each."""
    ts = np.linspace(0.0, 1.0, num)
    rows = []
    for i, j in pairs:
        w = np.zeros((num, num_members))
        w[:, i] += 1 - ts
        w[:, j] += ts
        rows.append(w)
    if not rows:
        return []
    loss, acc = evaluate_mixtures(objective, stacked, np.concatenate(rows), chunk=chunk)
    return [
        PathResult(ts=ts, loss=loss[p * num:(p + 1) * num], accuracy=acc[p * num:(p + 1) * num])
        for p in range(len(pairs))
    ]
