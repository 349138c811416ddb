r"""MaTS: merging by matching models in task parameter subspaces (Tam et al., arXiv 2312.04339).

The merge is the solution of the linear system

.. math:: \Big(\sum_i w_i C_i\Big)\,\theta = \sum_i w_i C_i\,\theta_i,

where :math:`C_i` is model i's (approximate) Fisher: block-diagonal, one block per parameter
tensor. A block is either a diagonal (an array shaped like the tensor, as in Fisher merging, for
which the system is solved exactly entry by entry) or, for a dense kernel :math:`W` of shape
``(d_in, d_out)``, a Kronecker factorisation :math:`C \approx A\otimes G` (K-FAC: :math:`A =
\mathbb{E}[xx^\top]` over layer inputs, :math:`G = \mathbb{E}[gg^\top]` over output gradients),
whose matrix-vector product is :math:`V \mapsto A V G`; those blocks are solved by conjugate
gradients (``jax.scipy.sparse.linalg.cg``) started at the weighted average, as in the paper.
With :math:`G = I` a Kronecker block is RegMean's objective (no shrinkage).

**Convolutional kernels.** A Flax conv kernel ``(kh, kw, d_in, d_out)`` (output unit on the last
axis) is handled as the matrix ``W.reshape(kh*kw*d_in, d_out)``: one column per output filter, rows
ordered ``(kh, kw, d_in)`` row-major, which is the layout of an im2col patch of the layer input. Its
Kronecker block (K-FAC for convolutions, Grosse & Martens 2016, arXiv 1602.01407) is then
``a``: ``(kh*kw*d_in, kh*kw*d_in)``, the second moment of input patches (averaged over examples and
output positions), and ``g``: ``(d_out, d_out)``, of the output gradients summed over positions. The
system is solved by the same CG on the reshaped matrices and reshaped back. :func:`kfac_fisher`
computes factors for dense layers only; conv factors come from the caller.

Example:
    >>> import jax.numpy as jnp
    >>> from landscape import merge
    >>> kf = lambda s: merge.KroneckerFactors(a=s * jnp.eye(2), g=jnp.eye(1))
    >>> out = merge.mats([{"w": jnp.ones((2, 1))}, {"w": jnp.zeros((2, 1))}], [{"w": kf(3.0)}, {"w": kf(1.0)}])
    >>> [round(v, 4) for v in out["w"].ravel().tolist()]
    [0.75, 0.75]
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.scipy.sparse.linalg import cg

from landscape import tree
from landscape._types import Array, Params
from landscape.merge._inputs import acc_dtype, as_stacked, bcast, check_choice, check_weights
from landscape.merge.fisher import dataset_mean
from landscape.merge.regmean import FeaturesFn
from landscape.objective import Objective

__all__ = ["KroneckerFactors", "kfac_fisher", "mats"]


@dataclasses.dataclass(frozen=True)
class KroneckerFactors:
    """A Kronecker-factored Fisher block :math:`A \\otimes G` for a ``(d_in, d_out)`` kernel (or a conv
    kernel ``(kh, kw, d_in, d_out)`` read as ``(kh*kw*d_in, d_out)``, module docstring).

    Attributes:
        a: ``(d_in, d_in)`` input second moment :math:`\\mathbb{E}[xx^\\top]` (conv: of input patches).
        g: ``(d_out, d_out)`` output-gradient second moment :math:`\\mathbb{E}[gg^\\top]`.
    """

    a: Array
    g: Array

    def to_dict(self) -> dict[str, Any]:
        """Shapes and traces (JSON-safe)."""
        return {
            "a_shape": list(jnp.shape(self.a)),
            "g_shape": list(jnp.shape(self.g)),
            "a_trace": float(jnp.trace(self.a)),
            "g_trace": float(jnp.trace(self.g)),
        }


jax.tree_util.register_dataclass(KroneckerFactors, data_fields=["a", "g"], meta_fields=[])


def _is_kf(x: Any) -> bool:
    return isinstance(x, KroneckerFactors)


def kfac_fisher(
    objective: Objective | None,
    params: Params,
    features_fn: FeaturesFn,
    *,
    kind: str = "true",
) -> Params:
    r"""Block-diagonal Fisher for :func:`mats`: K-FAC blocks for the kernels ``features_fn`` names,
    the exact diagonal (as :func:`~landscape.merge.fisher_diagonal`) for every other leaf.

    For a kernel with per-example input :math:`x_n` and output gradient :math:`g_{n,c} =
    \partial \log p(c\mid x_n)/\partial(x_n W)`, :math:`A = \frac1n\sum_n x_nx_n^\top` and
    :math:`G = \frac1n\sum_n\sum_c p(c\mid x_n)\,g_{n,c}g_{n,c}^\top` (``kind="true"``) or
    :math:`g_{n,y_n}g_{n,y_n}^\top` (``"empirical"``). The output gradient is read off the exact
    per-example kernel gradient :math:`\nabla_W = x_n g^\top` as :math:`g = \nabla_W^\top x_n /
    \|x_n\|^2`, which is exact for a dense layer applied once per example (MLP layers); layer
    inputs must therefore be ``(N, d_in)``. Jittable.
    """
    check_choice("kind", kind, ("true", "empirical"))
    if not isinstance(objective, Objective):
        msg = f"kfac_fisher needs data: pass an Objective, got {type(objective).__name__}"
        raise ValueError(msg)
    shapes = jax.eval_shape(features_fn, params, objective.x[:1])
    table = dict(tree.named_leaves(params))
    for k, s in shapes.items():
        if k not in table or jnp.ndim(table[k]) != 2 or len(s.shape) != 2 or s.shape[-1] != table[k].shape[0]:
            got = jnp.shape(table[k]) if k in table else "missing"
            msg = (
                f"features_fn[{k!r}] must be (N, d_in) input of a 2-D (d_in, d_out) params leaf; "
                f"got feature shape {s.shape} and params leaf {got}"
            )
            raise ValueError(msg)
    apply_fn = objective.apply_fn

    def log_probs(p: Params, x: Array) -> Array:
        out = apply_fn(p, x[None])[0]
        return jax.nn.log_softmax(out.astype(jnp.promote_types(out.dtype, jnp.float32)))

    def per_example(x: Array, y: Array) -> Params:
        jac = jax.jacrev(log_probs)(params, x)
        prob = jnp.exp(log_probs(params, x))
        wts = prob if kind == "true" else jax.nn.one_hot(y, prob.shape[0], dtype=prob.dtype)
        feats = features_fn(params, x[None])

        def leaf(path: Any, j: Array) -> Any:
            name = tree.key_name(path)
            j = j.astype(acc_dtype(j))
            if name in feats:
                xin = feats[name][0].astype(j.dtype)
                sq = jnp.dot(xin, xin)
                g = jnp.einsum("cio,i->co", j, xin) / jnp.where(sq > 0, sq, 1.0)
                return KroneckerFactors(
                    a=jnp.outer(xin, xin), g=jnp.einsum("c,co,cp->op", wts.astype(j.dtype), g, g)
                )
            return jnp.tensordot(wts.astype(j.dtype), jnp.square(j), 1)

        return jax.tree_util.tree_map_with_path(leaf, jac)

    return dataset_mean(objective, per_example)


def mats(
    models: Sequence[Params] | Params,
    fishers: Sequence[Params] | Params,
    *,
    weights: Any = None,
    maxiter: int = 100,
    tol: float = 1e-6,
) -> Params:
    r"""MaTS merge (Tam et al., arXiv 2312.04339) with a block-diagonal Fisher (module docstring).

    Diagonal blocks are solved exactly (Fisher merging without floor or normalisation; where every
    Fisher is 0 the weighted average is kept). Kronecker blocks are solved by conjugate gradients
    from the weighted average with ``maxiter`` iterations and relative tolerance ``tol``.

    Args:
        models: list of matching params trees or a stacked tree.
        fishers: one tree per model shaped like the params, each leaf a diagonal Fisher array or a
            :class:`KroneckerFactors` (:func:`kfac_fisher` computes both kinds).
        weights: per-model weights :math:`w_i` (default 1).
        maxiter: CG iterations per Kronecker block.
        tol: CG relative residual tolerance.
    """
    stacked, m = as_stacked(models)
    if isinstance(fishers, (list, tuple)):
        if len(fishers) != m:
            msg = f"got {m} models but {len(fishers)} Fishers: pass one per model"
            raise ValueError(msg)
    fs, mf = as_stacked(fishers, what="fishers")
    if mf != m:
        msg = f"got {m} models but {mf} Fishers: pass one per model"
        raise ValueError(msg)
    w = check_weights(weights, m)
    w = jnp.ones((m,), jnp.float32) if w is None else w.astype(jnp.float32)
    f_leaves, f_def = jax.tree.flatten(fs, is_leaf=_is_kf)
    try:
        x_leaves = f_def.flatten_up_to(stacked)
    except (ValueError, TypeError) as err:
        msg = f"fishers do not match the params tree structure: {err}"
        raise ValueError(msg) from None
    names = [tree.key_name(p) for p, _ in jax.tree_util.tree_flatten_with_path(fs, is_leaf=_is_kf)[0]]
    for name, x, f in zip(names, x_leaves, f_leaves, strict=True):
        if not hasattr(x, "shape"):
            msg = f"fishers do not match the params tree structure at {name!r}"
            raise ValueError(msg)
        if _is_kf(f):
            d_in = int(np.prod(x.shape[1:-1])) if x.ndim >= 3 else 0
            ok = (
                x.ndim >= 3
                and jnp.shape(f.a) == (m, d_in, d_in)
                and jnp.shape(f.g) == (m, x.shape[-1], x.shape[-1])
            )
            if not ok:
                msg = (
                    f"Kronecker factors at {name!r} must be a: (d_in, d_in) and g: (d_out, d_out) "
                    f"for a (d_in, d_out) kernel, or a: (kh*kw*d_in, kh*kw*d_in) for a conv kernel "
                    f"(kh, kw, d_in, d_out); got params {x.shape[1:]}, a {jnp.shape(f.a)[1:]}, "
                    f"g {jnp.shape(f.g)[1:]}"
                )
                raise ValueError(msg)
        elif jnp.shape(f) != jnp.shape(x):
            msg = f"Fisher at {name!r} has shape {jnp.shape(f)[1:]}, params {jnp.shape(x)[1:]}"
            raise ValueError(msg)

    def solve(f: Any, x: Array) -> Array:
        dt = acc_dtype(x)
        xs = x.astype(dt)
        wd = w.astype(dt)
        avg = jnp.sum(bcast(wd, xs) * xs, axis=0) / jnp.sum(wd)
        if _is_kf(f):
            a, g = f.a.astype(dt), f.g.astype(dt)
            mat = xs.reshape(xs.shape[0], -1, xs.shape[-1])  # conv (kh, kw, in, out) -> (kh*kw*in, out)

            def op(v: Array) -> Array:
                return jnp.einsum("m,mij,jk,mkl->il", wd, a, v, g)

            rhs = jnp.einsum("m,mij,mjk,mkl->il", wd, a, mat, g)
            sol, _ = cg(op, rhs, x0=avg.reshape(mat.shape[1:]), tol=tol, maxiter=maxiter)
            return sol.reshape(x.shape[1:]).astype(x.dtype)
        fd = f.astype(dt)
        c = bcast(wd, fd) * fd
        den = jnp.sum(c, axis=0)
        num = jnp.sum(c * xs, axis=0)
        return jnp.where(den > 0, num / jnp.where(den > 0, den, 1.0), avg).astype(x.dtype)

    out = [solve(f, x) for f, x in zip(f_leaves, x_leaves, strict=True)]
    return jax.tree.unflatten(f_def, out)
