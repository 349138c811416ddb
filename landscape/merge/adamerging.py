r"""AdaMerging: task-wise or layer-wise merge coefficients learned by entropy minimisation.

Yang et al., "AdaMerging: Adaptive Model Merging for Multi-Task Learning", arXiv 2310.02575.

.. math:: \theta(\lambda) = \theta_0 + \sum_k \lambda_k \tau_k \ (\text{task-wise}), \qquad
          \theta^l(\lambda) = \theta_0^l + \sum_k \lambda_k^l \tau_k^l \ (\text{layer-wise}),

and :math:`\lambda` minimises :math:`\sum_k \frac{1}{n_k}\sum_{x \in D_k} H(\mathrm{softmax}
f_{\theta(\lambda)}(x))`, the prediction entropy on each task's **unlabeled** data, with Adam.
"Layer" means one parameter tensor (one coefficient per task and leaf, as in the paper's code).
Defaults follow FusionBench: init 0.3, Adam with learning rate 1e-3, no clamping.

Two modes:

* **full batch** (the default, ``batch_size=None``): each step uses the exact entropy averaged over
  every example (through ``Objective.map_batches``), 100 steps by default; deterministic without a
  key.
* **mini-batch** (the paper's test-time adaptation, ``batch_size=16``): each step draws, for every
  task, ``batch_size`` distinct examples uniformly without replacement from its unlabelled data
  (a ``jax.random.permutation`` from ``fold_in(fold_in(key, step), task)``), and takes one Adam
  step on the sum over tasks of the mean entropy on those batches, 1000 steps by default (the
  paper's code as configured in FusionBench: ``batch_size=16``, ``lr=1e-3``, ``max_steps=1000``).
  ``key`` is required; the same key gives the same coefficients. A ``batch_size`` at least a
  task's size uses all of its examples every step (the full-batch objective, up to summation
  order).

Example:
    >>> import jax.numpy as jnp
    >>> from landscape import Objective, merge
    >>> base = {"w": jnp.zeros((2, 2))}
    >>> fts = [{"w": jnp.eye(2)}, {"w": 0.5 * jnp.eye(2)}]
    >>> obj = Objective(lambda p, x: x @ p["w"], jnp.eye(2), jnp.zeros(2, int))
    >>> res = merge.adamerging(fts, obj, base=base, steps=20, learning_rate=0.1)
    >>> bool(res.losses[-1] < res.losses[0])
    True
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import optax

from landscape._types import Array, Key, Params
from landscape.merge._inputs import acc_dtype, bcast, check_choice, check_range
from landscape.merge.task_vectors import stacked_task_vectors
from landscape.objective import Objective

__all__ = ["AdaMergingResult", "adamerging"]


@dataclasses.dataclass(frozen=True)
class AdaMergingResult:
    """Outcome of :func:`adamerging`.

    Attributes:
        params: the merged model :math:`\\theta(\\lambda)` at the final coefficients.
        coefficients: ``(tasks,)`` (task-wise) or ``(tasks, leaves)`` (layer-wise) coefficients.
        losses: ``(steps,)`` summed entropy before each step (on that step's mini-batches in
            mini-batch mode).
        granularity: ``"task"`` or ``"layer"``.
        batch_size: the mini-batch size, or None for full-batch steps.
    """

    params: Params
    coefficients: Array
    losses: Array
    granularity: str
    batch_size: int | None = None

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe summary (no parameters)."""
        return {
            "granularity": self.granularity,
            "batch_size": self.batch_size,
            "coefficients": jnp.asarray(self.coefficients).tolist(),
            "losses": jnp.asarray(self.losses).tolist(),
        }

    def plot(self) -> Any:
        """Plotly figure of the entropy over optimisation steps."""
        import plotly.graph_objects as go

        fig = go.Figure()
        fig.add_scatter(y=jnp.asarray(self.losses).tolist(), mode="lines", name="entropy")
        fig.update_layout(
            title=f"AdaMerging ({self.granularity}-wise)",
            xaxis_title="step",
            yaxis_title="summed prediction entropy",
        )
        return fig


jax.tree_util.register_dataclass(
    AdaMergingResult,
    data_fields=["params", "coefficients", "losses"],
    meta_fields=["granularity", "batch_size"],
)


def _entropy_sum(obj: Objective, params: Params) -> Array:
    def fn(xb: Array, yb: Array, mb: Array) -> Array:
        logits = obj.apply_fn(params, xb)
        logp = jax.nn.log_softmax(logits.astype(jnp.promote_types(logits.dtype, jnp.float32)))
        h = -jnp.sum(jnp.exp(logp) * logp, axis=-1)
        return jnp.sum(jnp.where(mb, h, 0.0))

    return obj.map_batches(fn) / obj.num_examples


def _entropy_batch(obj: Objective, params: Params, key: Key, batch_size: int) -> Array:
    """Mean prediction entropy on ``min(batch_size, n)`` examples drawn without replacement."""
    n = obj.num_examples
    idx = jax.random.permutation(key, n)[: min(batch_size, n)]
    logits = obj.apply_fn(params, obj.x[idx])
    logp = jax.nn.log_softmax(logits.astype(jnp.promote_types(logits.dtype, jnp.float32)))
    return jnp.mean(-jnp.sum(jnp.exp(logp) * logp, axis=-1))


def adamerging(
    finetuned: Sequence[Params] | Params,
    objectives: Objective | Sequence[Objective] | None,
    *,
    base: Params,
    granularity: str = "layer",
    init: float = 0.3,
    steps: int | None = None,
    learning_rate: float = 1e-3,
    clamp: bool = False,
    batch_size: int | None = None,
    key: Key | None = None,
) -> AdaMergingResult:
    """AdaMerging (arXiv 2310.02575); see the module docstring for the objective.

    Args:
        finetuned: the fine-tuned models (list or stacked), one per task.
        objectives: each task's unlabeled data as an :class:`~landscape.Objective` (its labels are
            ignored), or one Objective for all tasks.
        base: the pre-trained params.
        granularity: ``"task"`` (one coefficient per task) or ``"layer"`` (one per task and leaf).
        init: initial coefficient (FusionBench/paper: 0.3).
        steps: Adam steps; default 100 full-batch steps, or 1000 mini-batch steps (FusionBench).
        learning_rate: Adam learning rate (1e-3).
        clamp: clip coefficients to [0, 1] after each step (FusionBench ``clamp_weights``).
        batch_size: None (full-batch steps, the default) or the mini-batch size per task (the
            paper: 16).
        key: PRNG key of the mini-batch draws (required with ``batch_size``).

    Returns:
        :class:`AdaMergingResult`.
    """
    check_choice("granularity", granularity, ("task", "layer"))
    if objectives is None:
        msg = "adamerging needs unlabeled data: pass an Objective (or one per task)"
        raise ValueError(msg)
    objs = [objectives] if isinstance(objectives, Objective) else list(objectives)
    if not objs or not all(isinstance(o, Objective) for o in objs):
        msg = "objectives must be an Objective or a non-empty sequence of Objectives"
        raise ValueError(msg)
    if batch_size is not None:
        if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
            msg = f"batch_size must be None (full batch) or a positive int, got {batch_size!r}"
            raise ValueError(msg)
        if key is None:
            msg = "adamerging with batch_size needs key=, the PRNG key of the mini-batch draws"
            raise ValueError(msg)
    if steps is None:
        steps = 100 if batch_size is None else 1000
    if not isinstance(steps, int) or steps < 1:
        msg = f"steps must be a positive int, got {steps!r}"
        raise ValueError(msg)
    check_range("learning_rate", learning_rate, 0.0, float("inf"), lo_open=True)
    tv, m = stacked_task_vectors(finetuned, base=base)
    n_leaves = len(jax.tree.leaves(base))
    shape = (m,) if granularity == "task" else (m, n_leaves)
    c0 = jnp.full(shape, init, jnp.float32)
    c, losses = _run(c0, tv, base, objs, key, granularity=granularity, steps=steps, learning_rate=learning_rate,
                     clamp=clamp, batch_size=batch_size)
    return AdaMergingResult(
        params=_merged(c, tv, base, granularity), coefficients=c, losses=losses, granularity=granularity,
        batch_size=batch_size,
    )


def _merged(c: Array, tv: Params, base: Params, granularity: str) -> Params:
    leaves_t, treedef = jax.tree.flatten(tv)
    leaves_b = jax.tree.leaves(base)
    out = []
    for i, (t, b) in enumerate(zip(leaves_t, leaves_b, strict=True)):
        ci = c if granularity == "task" else c[:, i]
        d = jnp.sum(bcast(ci.astype(t.dtype), t) * t, axis=0)
        out.append((b.astype(acc_dtype(b)) + d).astype(b.dtype))
    return jax.tree.unflatten(treedef, out)


@functools.partial(jax.jit, static_argnames=("granularity", "steps", "learning_rate", "clamp", "batch_size"))
def _run(
    c0: Array,
    tv: Params,
    base: Params,
    objs: list[Objective],
    key: Key | None,
    *,
    granularity: str,
    steps: int,
    learning_rate: float,
    clamp: bool,
    batch_size: int | None,
) -> tuple[Array, Array]:
    opt = optax.adam(learning_rate)

    def loss(c: Array, step: Array) -> Array:
        p = _merged(c, tv, base, granularity)
        if batch_size is None:
            return sum(_entropy_sum(o, p) for o in objs)
        k = jax.random.fold_in(key, step)
        return sum(_entropy_batch(o, p, jax.random.fold_in(k, i), batch_size) for i, o in enumerate(objs))

    def step(carry: tuple[Array, Any], i: Array) -> tuple[tuple[Array, Any], Array]:
        c, state = carry
        val, g = jax.value_and_grad(loss)(c, i)
        upd, state = opt.update(g, state, c)
        c = optax.apply_updates(c, upd)
        if clamp:
            c = jnp.clip(c, 0.0, 1.0)
        return (c, state), val

    (c, _), losses = jax.lax.scan(step, (c0, opt.init(c0)), jnp.arange(steps))
    return c, losses
