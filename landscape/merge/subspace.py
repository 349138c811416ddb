r"""Subspace task-vector merges: TSV-Merge, Iso-C, Iso-CTS, WUDI and CART, as pytree transforms.

Each method works on the task vectors :math:`\tau_i = \theta_i - \theta_0` one **matrix** at a
time, in the PyTorch orientation :math:`(d_{out}, d_{in})` that FusionBench 0.2.33 uses for
``Linear.weight``. Which axis of a leaf is the output unit is given by ``out_axis`` (default
``-1``: Flax kernels ``(…, in, out)``; pass ``out_axis=0`` for PyTorch state dicts ``(out, in, …)``).
A leaf of rank ≥ 2 becomes the matrix ``moveaxis(x, out_axis, 0).reshape(d_out, -1)``; for a Flax
dense kernel that is ``x.T``, for a Flax conv kernel ``(kh, kw, in, out)`` it is one row per output
filter with columns ``(kh, kw, in)``, for a PyTorch conv weight ``(out, in, kh, kw)`` one row per
filter with columns ``(in, kh, kw)``. The result is reshaped back.

**Leaf rules** (as FusionBench, whose methods act on 2-D leaves only):

* 2-D leaves: the method's matrix rule;
* leaves of rank ≥ 3 (conv kernels): the matrix rule on the reshaped kernel (``conv="reshape"``,
  the default) or the plain mean of the task vectors (``conv="average"``, which is what FusionBench
  does, since its test is ``len(shape) == 2``);
* 0-D and 1-D leaves (biases, norms): the mean :math:`\frac1T\sum_i\tau_i` (TSV, Iso-C, Iso-CTS,
  WUDI); CART averages the models there (its centred vectors sum to zero).

Iso-CTS and WUDI are not transpose-equivariant (Iso-CTS projects out a common *left* subspace, WUDI
penalises :math:`(\tau-\tau_i)\tau_i^\top`), so the output axis matters for them; TSV-Merge, Iso-C and
CART are equivariant (``out_axis`` only decides how a conv kernel is grouped).

**Non-finite input.** An SVD mixes every entry of a matrix, so if any model's task vector has a NaN
or ±inf anywhere in a matrix leaf, that whole merged leaf is NaN (the SVD runs on zeros there);
averaged leaves are NaN entrywise. Nothing is dropped. ``lam`` must be a scalar.

**Jit.** All five are jittable (``jax.jit`` with the string options, ``steps``, ``rank_fraction``
and ``common_fraction`` static; ``lam`` and WUDI's ``learning_rate`` may be traced): every rank is
computed from static shapes.

Example:
    >>> import jax.numpy as jnp
    >>> from landscape import merge
    >>> base = {"w": jnp.zeros((2, 2))}
    >>> fts = [{"w": jnp.array([[3.0, 0.0], [0.0, 1.0]])}, {"w": jnp.array([[1.0, 0.0], [0.0, 1.0]])}]
    >>> merge.iso_c(fts, base=base)["w"].tolist()  # sum diag(4, 2) -> mean singular value 3
    [[3.0, 0.0], [0.0, 3.0]]
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import optax

from landscape import tree
from landscape._types import Array, Params
from landscape.merge._inputs import acc_dtype, as_stacked, bcast, check_choice, check_weights
from landscape.merge.task_vectors import stacked_task_vectors

__all__ = ["cart", "iso_c", "iso_cts", "tsv_merge", "wudi"]

_CONV = ("reshape", "average")


# ------------------------------------------------------------------------------------------------
# Leaf plumbing


def _check_out_axis(out_axis: Any) -> int:
    if isinstance(out_axis, bool) or not isinstance(out_axis, int):
        msg = f"out_axis must be an int (the output-unit axis of every matrix leaf), got {out_axis!r}"
        raise TypeError(msg)
    return out_axis


def _to_matrices(t: Array, out_axis: int, name: str) -> Array:
    """Stacked leaf ``(m, *shape)`` -> ``(m, d_out, rest)`` with the output axis first."""
    nd = t.ndim - 1
    if not -nd <= out_axis < nd:
        msg = f"out_axis={out_axis} is out of range for leaf {name!r} of shape {t.shape[1:]}"
        raise ValueError(msg)
    ax = out_axis % nd
    moved = jnp.moveaxis(t, 1 + ax, 1)
    return moved.reshape(t.shape[0], moved.shape[1], -1)


def _from_matrix(mat: Array, shape: tuple[int, ...], out_axis: int) -> Array:
    ax = out_axis % len(shape)
    moved_shape = (shape[ax],) + tuple(s for i, s in enumerate(shape) if i != ax)
    return jnp.moveaxis(mat.reshape(moved_shape), 0, ax)


def _polar(a: Array) -> Array:
    """Orthogonal polar factor :math:`U V^\\top` of ``a`` (its nearest matrix with orthonormal columns)."""
    u, _, vh = jnp.linalg.svd(a, full_matrices=False)
    return u @ vh


def _merge_leaves(
    tv: Params,
    *,
    out_axis: int,
    conv: str,
    matrix_fn: Callable[[Array], Array],
    vector_fn: Callable[[Array], Array],
) -> Params:
    """Apply ``matrix_fn((m, d_out, rest)) -> (d_out, rest)`` to matrix leaves and ``vector_fn`` to
    the others, with the module's non-finite rule."""

    def leaf(path: Any, t: Array) -> Array:
        name = tree.key_name(path)
        finite = jnp.isfinite(t)
        is_matrix = t.ndim == 3 or (t.ndim > 3 and conv == "reshape")
        if not is_matrix:
            out = vector_fn(t)
            return jnp.where(jnp.all(finite, axis=0), out, jnp.asarray(jnp.nan, out.dtype))
        ok = jnp.all(finite)
        mats = _to_matrices(jnp.where(finite, t, 0.0), out_axis, name)
        out = _from_matrix(matrix_fn(mats), t.shape[1:], out_axis)
        return jnp.where(ok, out, jnp.asarray(jnp.nan, out.dtype))

    return jax.tree_util.tree_map_with_path(leaf, tv)


def _mean(t: Array) -> Array:
    return jnp.mean(t, axis=0)


def _finish(base: Params, merged: Params, lam: Any) -> Params:
    tree.check_scalar("lam", lam)
    return jax.tree.map(lambda b, d: (b.astype(d.dtype) + lam * d).astype(b.dtype), base, merged)


def _setup(finetuned: Any, base: Params, out_axis: Any, conv: str) -> tuple[Params, int, int]:
    out_axis = _check_out_axis(out_axis)
    check_choice("conv", conv, _CONV)
    tree.check_float("merge", base, what="base")
    tv, m = stacked_task_vectors(finetuned, base=base)
    return tv, m, out_axis


# ------------------------------------------------------------------------------------------------
# TSV-Merge


@jax.jit
def _tsv_matrix(t: Array) -> Array:
    """FusionBench ``compute_and_sum_svd_mem_reduction`` on one stacked ``(T, d_out, d_in)`` leaf."""
    n_tasks = t.shape[0]
    u, s, vh = jnp.linalg.svd(t, full_matrices=False)  # (T, o, r), (T, r), (T, r, i)
    r = s.shape[-1]
    k = int(r * (1 / n_tasks))  # FusionBench: int(s.shape[0] * sv_reduction), sv_reduction = 1/T
    sum_u = jnp.zeros_like(u[0]).at[:, : n_tasks * k].set(jnp.concatenate(list(u[:, :, :k]), axis=1))
    sum_s = jnp.zeros_like(s[0]).at[: n_tasks * k].set(s[:, :k].reshape(-1))
    sum_vh = jnp.zeros_like(vh[0]).at[: n_tasks * k].set(vh[:, :k].reshape(-1, vh.shape[-1]))
    return (_polar(sum_u) * sum_s[None, :]) @ _polar(sum_vh)


def tsv_merge(
    finetuned: Sequence[Params] | Params,
    *,
    base: Params,
    lam: Array | float = 1.0,
    weights: Any = None,
    out_axis: int = -1,
    conv: str = "reshape",
) -> Params:
    r"""TSV-Merge (Gargiulo et al., CVPR 2025, "Task Singular Vectors", arXiv 2412.00081).

    Per matrix (module docstring for the layout and leaf rules), with :math:`T` tasks and
    :math:`r = \min(d_{out}, d_{in})`: SVD each :math:`w_i\tau_i = U_i S_i V_i^\top`; keep the top
    :math:`k = \lfloor r/T \rfloor` triplets of each (FusionBench: ``int(r * (1/T))``); concatenate the
    kept columns :math:`\hat U = [U_1^{(k)} \dots U_T^{(k)}\;0]`, values :math:`\hat S` and rows
    :math:`\hat V^\top`; orthogonalise both by their polar factors (:math:`\hat U \leftarrow P_U
    Q_U^\top` from :math:`\hat U = P_U\Sigma Q_U^\top`, likewise :math:`\hat V^\top`); the merged task
    vector is :math:`\hat U\,\mathrm{diag}(\hat S)\,\hat V^\top`, and :math:`\theta = \theta_0 +
    \lambda\,\tau`. Leaves that are not matrices get the mean task vector.

    Matches FusionBench 0.2.33 ``TaskSingularVectorMerging`` (``weights`` = its per-task ``alpha``
    list applied before the SVD; ``lam`` = its scalar ``alpha``, default 1). Jittable.

    Args:
        finetuned: fine-tuned models (list or stacked).
        base: pre-trained params :math:`\theta_0`.
        lam: scalar :math:`\lambda` (may be traced).
        weights: optional per-task scales of the task vectors before the SVD.
        out_axis: output-unit axis of matrix leaves (-1: Flax, 0: PyTorch).
        conv: ``"reshape"`` or ``"average"`` for leaves of rank ≥ 3.
    """
    tv, m, out_axis = _setup(finetuned, base, out_axis, conv)
    w = check_weights(weights, m)
    if w is not None:
        tv = jax.tree.map(lambda t: bcast(jnp.asarray(w, t.dtype), t) * t, tv)
    merged = _merge_leaves(tv, out_axis=out_axis, conv=conv, matrix_fn=_tsv_matrix, vector_fn=_mean)
    return _finish(base, merged, lam)


# ------------------------------------------------------------------------------------------------
# Iso-C and Iso-CTS


@jax.jit
def _iso_c_matrix(t: Array) -> Array:
    u, s, vh = jnp.linalg.svd(jnp.sum(t, axis=0), full_matrices=False)
    return jnp.mean(s) * (u @ vh)


def iso_c(
    finetuned: Sequence[Params] | Params,
    *,
    base: Params,
    lam: Array | float = 1.0,
    out_axis: int = -1,
    conv: str = "reshape",
) -> Params:
    r"""Iso-C, isotropic merging in the common subspace (Marczak et al. 2025, "No Task Left Behind:
    Isotropic Model Merging", arXiv 2502.04959).

    Per matrix: :math:`M = \sum_i \tau_i = U S V^\top` and :math:`\tau = \bar\sigma\, U V^\top` with
    :math:`\bar\sigma = \mathrm{mean}(S)` (a flat spectrum); other leaves the mean task vector;
    :math:`\theta = \theta_0 + \lambda\tau`. FusionBench 0.2.33 ``ISO_C_Merge`` (``scaling_factor`` =
    ``lam``; the paper tunes it on validation data, FusionBench's config uses 1.0). Jittable.
    """
    tv, _, out_axis = _setup(finetuned, base, out_axis, conv)
    merged = _merge_leaves(tv, out_axis=out_axis, conv=conv, matrix_fn=_iso_c_matrix, vector_fn=_mean)
    return _finish(base, merged, lam)


def iso_cts_sizes(r: int, n_tasks: int, common_fraction: float) -> tuple[int, int]:
    """Iso-CTS subspace sizes ``(k_common, k_per_task)`` for rank ``r`` (FusionBench's arithmetic,
    Python's ``int`` and ``round``): ``k = r - round((r - int(f r)) / T) * T``, ``(r - k) / T`` each."""
    k0 = int(r * common_fraction)
    k = r - round((r - k0) / n_tasks) * n_tasks
    return k, int((r - k) / n_tasks)


@functools.partial(jax.jit, static_argnames=("common_fraction",))
def _iso_cts_matrix(t: Array, common_fraction: float) -> Array:
    n_tasks = t.shape[0]
    r = min(t.shape[1:])
    k, per = iso_cts_sizes(r, n_tasks, common_fraction)
    u, s, vh = jnp.linalg.svd(jnp.sum(t, axis=0), full_matrices=False)
    uc, sc, vc = u[:, :k], s[:k], vh[:k]
    resid = t - jnp.einsum("ok,kp,mpi->moi", uc, uc.T, t)
    ut, st, vt = jnp.linalg.svd(resid, full_matrices=False)
    cu = jnp.concatenate([*list(ut[:, :, :per]), uc], axis=1)
    cs = jnp.concatenate([st[:, :per].reshape(-1), sc])
    cv = jnp.concatenate([*list(vt[:, :per]), vc], axis=0)
    return (_polar(cu) * jnp.mean(cs)) @ _polar(cv)


def iso_cts(
    finetuned: Sequence[Params] | Params,
    *,
    base: Params,
    lam: Array | float = 1.0,
    common_fraction: float = 0.8,
    out_axis: int = -1,
    conv: str = "reshape",
) -> Params:
    r"""Iso-CTS, isotropic merging in common and task-specific subspaces (Marczak et al. 2025,
    arXiv 2502.04959).

    Per matrix of rank :math:`r`: the common subspace is the top :math:`k` left/right singular
    vectors of :math:`\sum_i\tau_i` (sizes from :func:`iso_cts_sizes`, ``common_fraction`` = f, the
    paper's and FusionBench's 0.8); each task adds the top :math:`(r-k)/T` singular triplets of
    :math:`\tau_i - U_cU_c^\top\tau_i` (its part outside the common *left* subspace); the stacked
    :math:`U` and :math:`V^\top` are orthogonalised by their polar factors and every singular value
    is replaced by the mean of all kept ones: :math:`\tau = \bar\sigma\,P_U P_V`. Other leaves: the
    mean task vector. FusionBench 0.2.33 ``ISO_CTS_Merge`` (``scaling_factor`` = ``lam``, 1.0 in its
    config). Jittable with ``common_fraction`` static.
    """
    tv, _, out_axis = _setup(finetuned, base, out_axis, conv)
    f = float(common_fraction)
    if not 0.0 <= f <= 1.0:
        msg = f"common_fraction must lie in [0, 1], got {common_fraction!r}"
        raise ValueError(msg)
    merged = _merge_leaves(
        tv, out_axis=out_axis, conv=conv, matrix_fn=lambda t: _iso_cts_matrix(t, common_fraction=f), vector_fn=_mean
    )
    return _finish(base, merged, lam)


# ------------------------------------------------------------------------------------------------
# WUDI


def wudi_loss(merged: Array, t: Array) -> Array:
    r"""WUDI's interference loss on one stacked ``(T, d_out, d_in)`` leaf:
    :math:`\sum_i \|(\tau - \tau_i)\tau_i^\top\|_F^2 / \|\tau_i\|_F^2` (tasks with a zero task
    vector are left out)."""
    sq = jnp.sum(t.reshape(t.shape[0], -1) ** 2, axis=-1)
    prod = jnp.einsum("moi,mpi->mop", merged[None] - t, t)
    per = jnp.sum(prod**2, axis=(1, 2))
    return jnp.sum(jnp.where(sq > 0, per / jnp.where(sq > 0, sq, 1.0), 0.0))


@functools.partial(jax.jit, static_argnames=("steps",))
def _wudi_matrix(t: Array, learning_rate: Any, steps: int) -> Array:
    opt = optax.adam(learning_rate, b1=0.9, b2=0.999, eps=1e-8)
    x0 = jnp.sum(t, axis=0)
    grad = jax.grad(wudi_loss)

    def step(_: int, carry: tuple[Array, Any]) -> tuple[Array, Any]:
        x, state = carry
        upd, state = opt.update(grad(x, t), state, x)
        return optax.apply_updates(x, upd), state

    x, _ = jax.lax.fori_loop(0, steps, step, (x0, opt.init(x0)))
    return x


def wudi(
    finetuned: Sequence[Params] | Params,
    *,
    base: Params,
    lam: Array | float = 1.0,
    steps: int = 300,
    learning_rate: Array | float = 1e-5,
    out_axis: int = -1,
    conv: str = "reshape",
) -> Params:
    r"""WUDI merging, data-free (Cheng et al. 2025, "Whoever Started the Interference Should End It",
    arXiv 2503.08099).

    Per matrix, starting from :math:`\tau = \sum_i\tau_i`, take ``steps`` Adam steps (optax
    ``adam(learning_rate, b1=0.9, b2=0.999, eps=1e-8)``, no weight decay: torch's defaults, as
    FusionBench) on :func:`wudi_loss`, the task vectors' own interference
    :math:`\sum_i\|(\tau-\tau_i)\tau_i^\top\|_F^2/\|\tau_i\|_F^2` (the task vector stands in for the
    layer's inputs). Other leaves: the mean task vector. :math:`\theta = \theta_0 + \lambda\tau`.
    FusionBench 0.2.33 ``wudi_merging`` defaults: lr 1e-5, ``iter_num=300`` (its config: 400), no
    scaling (``lam=1``). Each matrix is optimised on its own (one ``lax.fori_loop``). Jittable with
    ``steps`` static; ``learning_rate`` and ``lam`` may be traced.
    """
    tv, _, out_axis = _setup(finetuned, base, out_axis, conv)
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
        msg = f"steps must be a non-negative int, got {steps!r}"
        raise ValueError(msg)
    tree.check_scalar("learning_rate", learning_rate)
    merged = _merge_leaves(
        tv,
        out_axis=out_axis,
        conv=conv,
        matrix_fn=lambda t: _wudi_matrix(t, learning_rate, steps=steps),
        vector_fn=_mean,
    )
    return _finish(base, merged, lam)


# ------------------------------------------------------------------------------------------------
# CART


def cart_rank(r: int, rank_fraction: float) -> int:
    """CART's kept rank ``max(1, round(rank_fraction * r))`` of a rank-``r`` matrix."""
    return max(1, min(r, int(round(rank_fraction * r))))


@functools.partial(jax.jit, static_argnames=("k",))
def _low_rank_sum(c: Array, k: int) -> Array:
    u, s, vh = jnp.linalg.svd(c, full_matrices=False)
    return jnp.einsum("mok,mk,mki->oi", u[:, :, :k], s[:, :k], vh[:, :k])


def cart(
    finetuned: Sequence[Params] | Params,
    *,
    lam: Array | float = 1.0,
    rank_fraction: float = 0.1,
    out_axis: int = -1,
    conv: str = "reshape",
) -> Params:
    r"""CART, centred task vectors with low rank (Choi et al. 2024, "Revisiting Weight Averaging for
    Model Merging", arXiv 2412.12153).

    Task vectors are taken relative to the **average** of the fine-tuned models,
    :math:`\bar\tau_i = \theta_i - \bar\theta`, so no base model is needed. Per matrix each
    :math:`\bar\tau_i` is truncated to its top :math:`k` singular triplets (:func:`cart_rank`,
    ``rank_fraction`` of :math:`r = \min(d_{out}, d_{in})`, at least 1), and

    .. math:: \theta = \bar\theta + \lambda \sum_i \mathrm{SVD}_k(\theta_i - \bar\theta).

    Other leaves (and ``conv="average"`` kernels) are the average :math:`\bar\theta` (their centred
    vectors sum to zero). With full rank the sum vanishes and CART is the average for every λ; with
    **two** models too, at any rank (:math:`\bar\tau_2 = -\bar\tau_1`, so their truncations cancel). The
    paper tunes the rank (about 8-16 %) and λ on validation data; no FusionBench or peer code is
    checked here (tests use closed forms). Jittable with ``rank_fraction`` static.
    """
    out_axis = _check_out_axis(out_axis)
    check_choice("conv", conv, _CONV)
    stacked, m = as_stacked(finetuned, what="finetuned", stacked=True)
    tree.check_float("cart", stacked, what="finetuned")
    f = float(rank_fraction)
    if not 0.0 < f <= 1.0:
        msg = f"rank_fraction must lie in (0, 1], got {rank_fraction!r}"
        raise ValueError(msg)
    xs = jax.tree.map(lambda x: x.astype(acc_dtype(x)), stacked)
    avg = jax.tree.map(lambda x: jnp.mean(x, axis=0), xs)
    centred = jax.tree.map(lambda x, a: x - a[None], xs, avg)

    def matrix_fn(c: Array) -> Array:
        return _low_rank_sum(c, k=cart_rank(min(c.shape[1:]), f))

    delta = _merge_leaves(centred, out_axis=out_axis, conv=conv, matrix_fn=matrix_fn,
                          vector_fn=lambda c: jnp.zeros(c.shape[1:], c.dtype))
    tree.check_scalar("lam", lam)
    return jax.tree.map(
        lambda a, d, x: (a + lam * d).astype(x.dtype), avg, delta, stacked
    )
