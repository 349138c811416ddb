r"""ZipIt!: merging models feature by feature, within and across models (Stoica et al., arXiv 2305.03053).

For each hidden boundary of a chain of dense layers (an MLP), the features of all N models on the
same data are concatenated (``N d`` features) and their correlation matrix is computed. A greedy
matching (:func:`zipit_matching`, the authors' ``match_tensors_zipit``) repeatedly merges the most
correlated pair of features, **within or across** models, until ``d`` features remain, giving a
merge matrix :math:`M` (``d x N d``, averaging) and an unmerge matrix :math:`U` (``N d x d``,
copying). Each layer is then rewritten on the merged features (Flax ``(d_in, d_out)`` kernels):

.. math:: W'_\ell = U_{\ell-1}^\top\, \mathrm{blockdiag}(W^{(1)}_\ell, \dots, W^{(N)}_\ell)\, M_\ell^\top,
          \qquad b'_\ell = [b^{(1)}_\ell, \dots, b^{(N)}_\ell]\, M_\ell^\top,

with :math:`U_0 = [I; \dots; I]` (the input is shared) and :math:`M_L = [I, \dots, I]/N` (the
outputs are averaged). Partial zipping (``stop_at=k``) merges layers ``0..k-1`` and keeps layers
``k..L-1`` per model, the first of them reading the merged features through its model's block of
:math:`U_{k-1}`. Features are taken at each layer's input (post-activation), the same
``features_fn`` convention as RegMean. The greedy matching runs on the host in float64 (like
``scipy`` assignment solvers), so ``zipit`` itself is not jittable; the statistics are.

Example:
    >>> import numpy as np
    >>> from landscape.merge import zipit_matching
    >>> corr = np.array([[1, .1, .9, .2], [.1, 1, .3, .8], [.9, .3, 1, .1], [.2, .8, .1, 1.]])
    >>> m, u = zipit_matching(corr, num_models=2)
    >>> u.astype(int).tolist()  # feature 0 of model 0 with feature 0 of model 1, 1 with 1
    [[1, 0], [0, 1], [1, 0], [0, 1]]
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from landscape import tree
from landscape._types import Array, Params
from landscape.merge._inputs import as_stacked, check_range
from landscape.merge.regmean import FeaturesFn
from landscape.objective import Objective

__all__ = ["ZipItResult", "feature_correlations", "zipit", "zipit_matching"]


def zipit_matching(
    corr: Any,
    *,
    num_models: int,
    width: int | None = None,
    alpha: float = 0.3,
    beta: float = 0.125,
) -> tuple[np.ndarray, np.ndarray]:
    r"""Greedy ZipIt! feature matching on a correlation matrix (the authors' ``match_tensors_zipit``).

    Starting from ``O = num_models * d`` features (diagonal set to :math:`-\infty`), repeat until
    ``width`` (default ``d``) remain: take the most correlated pair (ties: lowest flat index),
    merge the higher-indexed feature into the lower one (its unmerge column becomes the sum), give
    the merged feature the elementwise **minimum** of the two similarity rows/columns times
    ``alpha`` (with ``alpha <= 0`` instead: the merged feature can no longer merge with features of
    either source model), and count within-model merges against each model's budget
    :math:`\lfloor \lfloor(O - \text{width})/N\rfloor\,\beta\rfloor`; a model whose budget is spent
    (or 0 from the start, e.g. ``beta=0``: only cross-model merges) can no longer merge features
    with itself.

    Returns:
        ``(merge, unmerge)``: ``merge`` (width, O) averages the features of each group,
        ``merge = (U / (colsum(U) + 1e-5)).T`` as in the authors' code; ``unmerge`` U (O, width)
        is 0/1 and copies a merged feature back to every member.
    """
    sims = np.array(corr, dtype=np.float64, copy=True)
    o = sims.shape[0]
    if sims.ndim != 2 or sims.shape[1] != o or o % num_models:
        msg = f"corr must be square with a side divisible by num_models={num_models}, got {sims.shape}"
        raise ValueError(msg)
    d = o // num_models
    width = d if width is None else width
    if not 1 <= width <= o:
        msg = f"width must lie in [1, {o}], got {width}"
        raise ValueError(msg)
    np.fill_diagonal(sims, -np.inf)
    perm = np.eye(o)
    origin = np.repeat(np.arange(num_models), d)
    budget = np.full(num_models, int((o - width) // num_models * beta + 1e-4))
    for mi in np.flatnonzero(budget <= 0):
        sel = origin == mi
        sims[np.ix_(sel, sel)] = -np.inf
    while perm.shape[1] > width:
        best = int(np.argmax(sims))
        r, c = divmod(best, sims.shape[1])
        if c < r:
            r, c = c, r
        ro, co = origin[r], origin[c]
        perm[:, r] += perm[:, c]
        perm = np.delete(perm, c, axis=1)
        col = np.minimum(sims[:, r], sims[:, c])
        row = np.minimum(sims[r, :], sims[c, :])
        if alpha > 0:
            col, row = col * alpha, row * alpha
        else:
            blocked = (origin == ro) | (origin == co)
            col = np.where(blocked, -np.inf, col)
            row = np.where(blocked, -np.inf, row)
        sims[:, r], sims[r, :] = col, row
        sims[r, r] = -np.inf
        sims = np.delete(np.delete(sims, c, axis=0), c, axis=1)
        origin = np.delete(origin, c)
        if ro == co:
            budget[ro] -= 1
            if budget[ro] <= 0:
                sel = origin == ro
                sims[np.ix_(sel, sel)] = -np.inf
    unmerge = perm
    merge = (perm / (perm.sum(axis=0, keepdims=True) + 1e-5)).T
    return merge, unmerge


def feature_correlations(
    objective: Objective | None, models: Sequence[Params], features_fn: FeaturesFn
) -> dict[str, Array]:
    r"""Pearson correlations of the concatenated features of all models over the whole dataset.

    ``features_fn(params, x) -> {kernel path: layer input (N, d)}``; for each key the features of
    the models are concatenated to ``(N_examples, M d)`` and
    :math:`\rho = \mathrm{cov} / (\sigma\sigma^\top + 10^{-4})` (the ZipIt!/REPAIR convention) is
    returned. Jittable.
    """
    if not isinstance(objective, Objective):
        msg = f"feature_correlations needs data: pass an Objective, got {type(objective).__name__}"
        raise ValueError(msg)
    models = list(models)

    def fn(xb: Array, yb: Array, mb: Array) -> dict[str, Any]:
        per = [features_fn(p, xb) for p in models]
        out = {}
        for k in per[0]:
            f = jnp.concatenate([q[k].astype(jnp.float32) for q in per], axis=-1)
            f = f.reshape(-1, f.shape[-1])
            w = jnp.repeat(mb.astype(f.dtype), f.shape[0] // mb.shape[0])
            fw = f * w[:, None]
            out[k] = {"s": jnp.sum(fw, axis=0), "ss": fw.T @ f, "n": jnp.sum(w)}
        return out

    sums = objective.map_batches(fn)
    out = {}
    for k, s in sums.items():
        mean = s["s"] / s["n"]
        cov = s["ss"] / s["n"] - jnp.outer(mean, mean)
        std = jnp.sqrt(jnp.clip(jnp.diag(cov), 0.0))
        out[k] = cov / (jnp.outer(std, std) + 1e-4)
    return out


@dataclasses.dataclass(frozen=True)
class ZipItResult:
    """Outcome of :func:`zipit`.

    Attributes:
        heads: one complete model per source model; the zipped layers are shared (identical
            leaves) and, with partial zipping, the later layers are that model's own. Fully zipped,
            all heads are the same merged model.
        merges: per zipped boundary, the merge matrix ``(d, N d)``.
        unmerges: per zipped boundary, the unmerge matrix ``(N d, d)``.
        stop_at: index of the first unzipped layer (``None``: fully zipped).
    """

    heads: tuple[Params, ...]
    merges: tuple[Array, ...]
    unmerges: tuple[Array, ...]
    stop_at: int | None

    @property
    def params(self) -> Params:
        """The merged model (fully zipped) or model 0's head (partial zipping)."""
        return self.heads[0]

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe summary: per boundary, how many features were merged within / across models."""
        info = []
        for u in self.unmerges:
            u = np.asarray(u)
            n = len(self.heads)
            d = u.shape[0] // n
            groups = [np.flatnonzero(u[:, j]) // d for j in range(u.shape[1])]
            info.append(
                {
                    "features": int(u.shape[1]),
                    "across_models": int(sum(len(set(g.tolist())) > 1 for g in groups)),
                    "singletons": int(sum(len(g) == 1 for g in groups)),
                }
            )
        return {"stop_at": self.stop_at, "boundaries": info}


jax.tree_util.register_dataclass(
    ZipItResult, data_fields=["heads", "merges", "unmerges"], meta_fields=["stop_at"]
)


def zipit(
    models: Sequence[Params] | Params,
    objective: Objective | None,
    *,
    kernels: Sequence[str],
    features_fn: FeaturesFn | None = None,
    biases: Sequence[str | None] | None = None,
    alpha: float = 0.3,
    beta: float = 0.125,
    stop_at: int | None = None,
) -> ZipItResult:
    """ZipIt! merge of a chain of dense layers (module docstring; arXiv 2305.03053).

    Args:
        models: N models of the same architecture (list or stacked).
        objective: the data whose feature correlations decide the matching (labels unused).
        kernels: key paths of the chain's ``(d_in, d_out)`` kernels, input layer first.
        features_fn: ``features_fn(params, x) -> {kernel path: layer input (N, d_in)}`` for at least
            ``kernels[1:]`` (the hidden features; post-activation); default every layer's input
            traced from ``objective.apply_fn`` (:class:`landscape.align.LayerInputs`, any model).
        biases: key path of each layer's bias (or None), default ``kernel`` with ``kernel`` -> ``bias``
            in the last component where such a leaf exists.
        alpha: similarity decay of merged features (paper default 0.3; <= 0 forbids re-merging).
        beta: within-model merge budget fraction (paper default 0.125).
        stop_at: partial zipping: layers ``>= stop_at`` stay per model (1 <= stop_at < len(kernels)).

    Every leaf outside the chain is averaged.
    """
    if not isinstance(objective, Objective):
        msg = f"zipit needs data: pass an Objective, got {type(objective).__name__}"
        raise ValueError(msg)
    check_range("beta", beta, 0.0, 1.0)
    if features_fn is None:
        from landscape.align.trace import LayerInputs

        features_fn = LayerInputs(objective.apply_fn)
    stacked, n = as_stacked(models)
    ms = tree.unstack(stacked)
    table = dict(tree.named_leaves(ms[0]))
    kernels = list(kernels)
    if len(kernels) < 2:
        msg = f"zipit needs a chain of at least 2 kernels, got {kernels}"
        raise ValueError(msg)
    for k in kernels:
        if k not in table or jnp.ndim(table[k]) != 2:
            msg = f"kernel {k!r} is not a 2-D leaf of the params; leaves: {sorted(table)}"
            raise ValueError(msg)
    for a, b in zip(kernels[:-1], kernels[1:]):
        if table[a].shape[1] != table[b].shape[0]:
            msg = f"kernels {a!r} {table[a].shape} and {b!r} {table[b].shape} do not chain"
            raise ValueError(msg)
    if biases is None:
        guess = [k.rsplit("/", 1)[0] + "/bias" if "/" in k else "bias" for k in kernels]
        biases = [g if g in table else None for g in guess]
    biases = list(biases)
    if len(biases) != len(kernels):
        msg = f"biases must have one entry (or None) per kernel ({len(kernels)}), got {len(biases)}"
        raise ValueError(msg)
    for k, b in zip(kernels, biases):
        if b is not None and (b not in table or table[b].shape != (table[k].shape[1],)):
            msg = f"bias {b!r} is not a ({table[k].shape[1]},) leaf of the params"
            raise ValueError(msg)
    n_layers = len(kernels)
    if stop_at is not None and not 1 <= stop_at < n_layers:
        msg = f"stop_at must lie in [1, {n_layers - 1}] (or None), got {stop_at}"
        raise ValueError(msg)
    last = n_layers if stop_at is None else stop_at
    corr = jax.jit(feature_correlations, static_argnums=2)(objective, ms, features_fn)
    zipped = kernels[1 : min(last + 1, n_layers)]
    missing = [k for k in zipped if k not in corr]
    if missing:
        msg = f"features_fn must return the inputs of {missing}"
        raise ValueError(msg)
    merges, unmerges = [], []
    for k in zipped:
        mm, uu = zipit_matching(np.asarray(corr[k]), num_models=n, alpha=alpha, beta=beta)
        merges.append(mm)
        unmerges.append(uu)

    def blocks(a: np.ndarray, d: int) -> list[np.ndarray]:
        return [a[i * d : (i + 1) * d] for i in range(n)]

    named = [dict(tree.named_leaves(m_)) for m_ in ms]
    new = {}
    heads_new: list[dict[str, np.ndarray]] = [{} for _ in range(n)]
    for j, (k, b) in enumerate(zip(kernels, biases)):
        if j > last:
            break
        d_in, d_out = table[k].shape
        ws = [np.asarray(nm[k], np.float64) for nm in named]
        u_in = [np.eye(d_in)] * n if j == 0 else blocks(unmerges[j - 1], d_in)
        if j < last:
            m_out = [np.eye(d_out) / n] * n if j == n_layers - 1 else blocks(merges[j].T, d_out)
            new[k] = sum(u.T @ w @ mo for u, w, mo in zip(u_in, ws, m_out))
            if b is not None:
                bs = [np.asarray(nm[b], np.float64) for nm in named]
                new[b] = sum(bi @ mo for bi, mo in zip(bs, m_out))
        elif j == last:
            for i in range(n):
                heads_new[i][k] = u_in[i].T @ ws[i]

    def build(i: int) -> Params:
        def leaf(path: Any, x: Array) -> Array:
            name = tree.key_name(path)
            src = None
            if name in new:
                src = new[name]
            elif name in heads_new[i]:
                src = heads_new[i][name]
            if src is not None:
                return jnp.asarray(src, x.dtype)
            idx = kernels.index(name) if name in kernels else None
            bidx = biases.index(name) if name in biases else None
            own = (idx is not None and idx >= last) or (bidx is not None and bidx >= last)
            if own:
                return x[i]
            return jnp.mean(x.astype(jnp.promote_types(x.dtype, jnp.float32)), axis=0).astype(x.dtype)

        return jax.tree_util.tree_map_with_path(leaf, stacked)

    heads = tuple(build(i) for i in range(n))
    return ZipItResult(
        heads=heads,
        merges=tuple(jnp.asarray(m_) for m_ in merges),
        unmerges=tuple(jnp.asarray(u) for u in unmerges),
        stop_at=stop_at,
    )
