r"""RegMean: merging dense layers by least squares on their inputs (Jin et al., arXiv 2212.09849).

For a dense layer ``y = x @ W`` (kernel ``W`` of shape ``(d_in, d_out)``, the Flax layout) seen by
model i on inputs :math:`X_i` (rows are examples), RegMean solves

.. math:: W^* = \arg\min_W \sum_i \|X_i W - X_i W_i\|^2
          = \Big(\sum_i \tilde G_i\Big)^{-1} \sum_i \tilde G_i W_i, \qquad G_i = X_i^\top X_i,

with the off-diagonal shrinkage :math:`\tilde G_i = \alpha G_i + (1-\alpha)\,\mathrm{diag}(G_i)`
(``alpha=1`` is the exact least-squares merge). Every other parameter is averaged.

The Gram matrices come from :func:`gram_matrices`, which takes a ``features_fn(params, x)``
returning ``{kernel path: layer input (N, d_in)}`` (the zoo models' ``apply_fn.intermediates(params,
x, kind="input")`` fits, as does any hand-written function; by default every layer's input is
traced from ``objective.apply_fn``, :class:`landscape.align.LayerInputs`), so it works for any model.

Example:
    >>> import jax.numpy as jnp
    >>> from landscape import Objective, merge
    >>> apply_fn = lambda p, x: x @ p["w"]
    >>> feats = lambda p, x: {"w": x}
    >>> x1, x2 = jnp.array([[1.0, 0.0]]), jnp.array([[0.0, 1.0]])
    >>> g1 = merge.gram_matrices(Objective(apply_fn, x1, jnp.zeros(1, int)), {"w": jnp.eye(2)}, feats)
    >>> g2 = merge.gram_matrices(Objective(apply_fn, x2, jnp.zeros(1, int)), {"w": jnp.eye(2)}, feats)
    >>> w = merge.regmean([{"w": jnp.eye(2)}, {"w": -jnp.eye(2)}], [g1, g2], alpha=1.0)["w"]
    >>> w.tolist()  # row 0 seen only by model 0, row 1 only by model 1
    [[1.0, 0.0], [0.0, -1.0]]
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp

from landscape import tree
from landscape._types import Array, Params
from landscape.merge._inputs import acc_dtype, as_stacked, check_choice, check_range
from landscape.objective import Objective

__all__ = ["FeaturesFn", "gram_matrices", "regmean"]

FeaturesFn = Callable[[Params, Array], Mapping[str, Array]]
"""``features_fn(params, x) -> {kernel key path ("layers/0/kernel"): layer input (N, ..., d_in)}``."""


def _kernel_table(params: Params) -> dict[str, tuple[int, ...]]:
    return {name: tuple(jnp.shape(x)) for name, x in tree.named_leaves(params)}


def _check_keys(keys: Sequence[str], dims: Mapping[str, int], params: Params, what: str) -> None:
    table = _kernel_table(params)
    for k in keys:
        if k not in table:
            msg = f"{what} names {k!r}, which is not a leaf of params; leaves are {sorted(table)}"
            raise ValueError(msg)
        shape = table[k]
        if len(shape) != 2 or shape[0] != dims[k]:
            msg = (
                f"{what}[{k!r}] has input dimension {dims[k]} but params leaf {k!r} has shape "
                f"{shape}; RegMean needs a 2-D (d_in, d_out) kernel"
            )
            raise ValueError(msg)


def gram_matrices(
    objective: Objective | None,
    params: Params,
    features_fn: FeaturesFn | None = None,
    *,
    reduce: str = "sum",
) -> dict[str, Array]:
    r"""Per-dense-layer Gram matrices :math:`G = X^\top X` of the layer inputs over the whole dataset.

    Runs ``features_fn(params, xb)`` on each fixed batch of ``objective.map_batches`` (padded rows
    masked out) and accumulates :math:`X^\top X` in float32 or wider; inputs with extra axes
    ``(N, ..., d_in)`` (tokens, positions) contribute every row. ``reduce="sum"`` returns the sum
    (the RegMean paper; exact least squares when models saw different amounts of data),
    ``"mean"`` divides by the number of examples (FusionBench). Jittable.

    Args:
        objective: the data the model was trained on (labels unused).
        params: the model whose layer inputs are recorded.
        features_fn: ``features_fn(params, x) -> {kernel path: input (N, ..., d_in)}``; default
            every dense / conv layer's input traced from ``objective.apply_fn``
            (:class:`landscape.align.LayerInputs`, any model).
        reduce: ``"sum"`` or ``"mean"``.

    Returns:
        ``{kernel path: (d_in, d_in) Gram matrix}``.
    """
    check_choice("reduce", reduce, ("sum", "mean"))
    if not isinstance(objective, Objective):
        msg = f"gram_matrices needs data: pass an Objective, got {type(objective).__name__}"
        raise ValueError(msg)
    if features_fn is None:
        from landscape.align.trace import LayerInputs

        features_fn = LayerInputs(objective.apply_fn)
    if not callable(features_fn):
        msg = "features_fn must be callable as features_fn(params, x) -> {path: (N, d_in)}"
        raise ValueError(msg)
    shapes = jax.eval_shape(features_fn, params, objective.x[:1])
    if not isinstance(shapes, Mapping) or not shapes:
        msg = f"features_fn must return a non-empty dict {{path: (N, d_in)}}, got {type(shapes).__name__}"
        raise ValueError(msg)
    _check_keys(list(shapes), {k: v.shape[-1] for k, v in shapes.items()}, params, "features_fn")

    def fn(xb: Array, yb: Array, mb: Array) -> dict[str, Array]:
        feats = features_fn(params, xb)
        out = {}
        for k, x in feats.items():
            x = x.astype(acc_dtype(x))
            x = x * mb.reshape((-1,) + (1,) * (x.ndim - 1)).astype(x.dtype)
            x2 = x.reshape(-1, x.shape[-1])
            out[k] = x2.T @ x2
        return out

    total = objective.map_batches(fn)
    if reduce == "mean":
        total = {k: v / objective.num_examples for k, v in total.items()}
    return dict(total)


def regmean(
    models: Sequence[Params] | Params,
    grams: Sequence[Mapping[str, Array]],
    *,
    alpha: Array | float = 0.9,
) -> Params:
    r"""RegMean merge (Jin et al., arXiv 2212.09849; FusionBench's variant of the shrinkage).

    Each kernel named in ``grams`` becomes
    :math:`W^* = (\sum_i\tilde G_i)^{-1}\sum_i\tilde G_i W_i` with
    :math:`\tilde G_i = \alpha G_i + (1-\alpha)\mathrm{diag}(G_i)` (off-diagonal entries scaled by
    α; the paper tunes α, FusionBench uses 0.95 for CLIP); the system is solved by least squares, so
    a singular :math:`\sum_i\tilde G_i` (dead units, ``alpha=1`` with few examples) gives the
    minimum-norm solution. Every other leaf (biases, norms, heads without Grams) is the uniform
    average. ``alpha`` may be traced.

    Args:
        models: list of matching params trees or a stacked tree.
        grams: one ``{kernel path: (d_in, d_in)}`` dict per model (:func:`gram_matrices`), with the
            same keys.
        alpha: off-diagonal scale in [0, 1].
    """
    check_range("alpha", alpha, 0.0, 1.0)
    stacked, m = as_stacked(models)
    if isinstance(grams, Mapping) or not isinstance(grams, (list, tuple)):
        msg = "grams must be a list with one {path: Gram matrix} dict per model"
        raise ValueError(msg)
    if len(grams) != m:
        msg = f"got {m} models but {len(grams)} Gram dicts: pass one per model"
        raise ValueError(msg)
    if not grams[0]:
        msg = "grams[0] is empty: RegMean needs at least one dense layer's Gram matrix"
        raise ValueError(msg)
    keys = sorted(grams[0])
    for i, g in enumerate(grams):
        if sorted(g) != keys:
            msg = f"grams[{i}] has keys {sorted(g)} but grams[0] has {keys}"
            raise ValueError(msg)
        for k in keys:
            shp = jnp.shape(g[k])
            if len(shp) != 2 or shp[0] != shp[1]:
                msg = f"grams[{i}][{k!r}] must be a square (d_in, d_in) matrix, got shape {shp}"
                raise ValueError(msg)
    first = jax.tree.map(lambda x: x[0], stacked)
    _check_keys(keys, {k: jnp.shape(grams[0][k])[0] for k in keys}, first, "grams")

    def leaf(path: Any, x: Array) -> Array:
        name = tree.key_name(path)
        dt = acc_dtype(x)
        if name not in grams[0]:
            return jnp.mean(x.astype(dt), axis=0).astype(x.dtype)
        gs = jnp.stack([jnp.asarray(g[name]).astype(dt) for g in grams])
        diag = jax.vmap(lambda g: jnp.diag(jnp.diag(g)))(gs)
        gt = alpha * gs + (1 - alpha) * diag
        lhs = jnp.sum(gt, axis=0)
        rhs = jnp.einsum("mij,mjk->ik", gt, x.astype(dt))
        sol = jnp.linalg.lstsq(lhs, rhs)[0]
        return sol.astype(x.dtype)

    return jax.tree_util.tree_map_with_path(leaf, stacked)
