r"""Task-vector merges: task arithmetic, TIES, DARE, Model Breadcrumbs and DELLA.

A task vector is :math:`\tau_i = \theta_i - \theta_0` (fine-tuned minus base; Ilharco et al.,
arXiv 2212.04089). Every method here sparsifies / rescales the :math:`\tau_i`, optionally elects a
sign per entry, combines them and adds the result to the base:

.. math:: \theta = \theta_0 + \lambda \cdot \mathrm{combine}_i(w_i \tilde\tau_i).

``finetuned`` is a list/tuple of params trees or one stacked tree (leading model axis). ``lam``,
``weights``, ``density``, ``drop`` may be traced (a sweep is one ``jax.vmap``); strings are fixed at
call time. Arithmetic runs in float32 or wider; the result has the base's dtypes. ``lam`` must
be a scalar (a shaped λ is a ``ValueError``: it would scale each column). An entry that is NaN or
infinite in any model's task vector is NaN in the merge, whatever trimming, dropping or sign
election would have done with it (:func:`propagate_nonfinite`, ``docs/numerics.md``).

**Sign election and combination** (shared by ``ties``, and by ``dare``/``breadcrumbs``/``della``
with ``combine="ties"``), following mergekit's generalised task arithmetic:

1. weights multiply the task vectors **before** election (mergekit #474): :math:`v_i = w_i\tilde\tau_i`;
2. ``elect="mass"``: :math:`\gamma = \mathrm{sign}(\sum_i v_i)` (TIES' summed magnitude); where the
   sum is exactly 0, :math:`\mathrm{sign}(\sum_i \mathrm{sign}(v_i))` (TIES' code), and +1 if
   that is 0 too. ``elect="count"``: :math:`\gamma = \mathrm{sign}(\sum_i\mathrm{sign}(v_i))`
   (majority), 0 -> +1. ``elect="none"``: no election, every entry is kept;
3. mask :math:`m_i = [\mathrm{sign}(v_i) = \gamma]` (zeros never agree);
4. ``merge="sum"``: :math:`\sum_i m_i v_i`; ``merge="mean"``: :math:`\sum_i m_i v_i / \sum_i m_i w_i`
   (the disjoint mean; a zero divisor becomes 1; without election the divisor is :math:`\sum_i w_i`).

Example:
    >>> import jax.numpy as jnp
    >>> from landscape import merge
    >>> base = {"w": jnp.zeros(3)}
    >>> fts = [{"w": jnp.array([1.0, -2.0, 0.5])}, {"w": jnp.array([3.0, 1.0, 0.0])}]
    >>> merge.task_arithmetic(fts, base=base, lam=0.5)["w"].tolist()
    [2.0, -0.5, 0.25]
    >>> merge.ties(fts, base=base, density=1.0)["w"].tolist()  # signs: +, -, +
    [2.0, -2.0, 0.5]
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp

from landscape import tree
from landscape._types import Array, Key, Params
from landscape.merge import sparsify
from landscape.merge._inputs import (
    acc_dtype,
    as_stacked,
    bcast,
    check_choice,
    check_range,
    check_weights,
)

__all__ = [
    "breadcrumbs",
    "combine_task_vectors",
    "dare",
    "della",
    "propagate_nonfinite",
    "task_arithmetic",
    "task_vector",
    "stacked_task_vectors",
    "ties",
]

_ELECT = ("mass", "count", "none")
_MERGE = ("mean", "sum")
_RESCALE = ("inverse", "l1", "none")
_COMBINE = ("task_arithmetic", "ties")


def task_vector(finetuned: Params | Sequence[Params], base: Params) -> Params | list[Params]:
    r"""Task vector(s) :math:`\tau = \theta_{ft} - \theta_0` (Ilharco et al., arXiv 2212.04089).

    Args:
        finetuned: one params tree matching ``base`` (returns one tree), a list of them (returns a
            list) or a stacked tree (returns a stacked tree).
        base: the pre-trained params :math:`\theta_0`.
    """
    if isinstance(finetuned, (list, tuple)):
        as_stacked(finetuned, what="finetuned", base=base)
        return [tree.sub(ft, base) for ft in finetuned]
    shapes_ft = [jnp.shape(x) for x in jax.tree.leaves(finetuned)]
    shapes_b = [jnp.shape(x) for x in jax.tree.leaves(base)]
    if shapes_ft == shapes_b:
        return tree.sub(finetuned, base)
    stacked, _ = as_stacked(finetuned, what="finetuned", base=base)
    return jax.tree.map(lambda x, b: x - b[None], stacked, base)


def stacked_task_vectors(finetuned: Sequence[Params] | Params, *, base: Params) -> tuple[Params, int]:
    """Stacked task vectors ``(tau (m, ...) in >= float32, m)`` after validating the inputs."""
    stacked, m = as_stacked(finetuned, what="finetuned", base=base)
    tv = jax.tree.map(
        lambda x, b: x.astype(acc_dtype(x)) - b.astype(acc_dtype(x))[None], stacked, base
    )
    return tv, m


def _weights(weights: Any, m: int) -> Array:
    w = check_weights(weights, m)
    return jnp.ones((m,), jnp.float32) if w is None else w


def combine_task_vectors(
    tv: Params,
    *,
    weights: Array,
    elect: str = "mass",
    merge: str = "mean",
) -> Params:
    """Sign election and disjoint combination of stacked task vectors (module docstring, steps 1-4).

    Args:
        tv: stacked (sparsified) task vectors, leading model axis.
        weights: ``(m,)`` per-model weights.
        elect: ``"mass"``, ``"count"`` or ``"none"``.
        merge: ``"mean"`` or ``"sum"``.
    """
    check_choice("elect", elect, _ELECT)
    check_choice("merge", merge, _MERGE)
    return propagate_nonfinite(_combine_finite(tv, weights=weights, elect=elect, merge=merge), tv)


def propagate_nonfinite(merged: Params, tv: Params) -> Params:
    """``merged`` with NaN at every entry where any model's task vector in ``tv`` (stacked, leading
    model axis) is NaN or infinite.

    Trimming, random drops and sign election would otherwise erase a non-finite entry of one model
    and return a plausible number (``docs/numerics.md``); every task-vector merge passes the task
    vectors it *received* (before sparsification) through here.
    """
    return jax.tree.map(
        lambda d, t: jnp.where(jnp.all(jnp.isfinite(t), axis=0), d, jnp.asarray(jnp.nan, d.dtype)), merged, tv
    )


def _combine_finite(tv: Params, *, weights: Array, elect: str, merge: str) -> Params:
    def leaf(t: Array) -> Array:
        w = bcast(weights.astype(t.dtype), t)
        v = w * t
        if elect == "none":
            merged = jnp.sum(v, axis=0)
            if merge == "sum":
                return merged
            den = jnp.sum(weights.astype(t.dtype))
            return merged / jnp.where(jnp.abs(den) < 1e-8, 1.0, den)
        s = jnp.sign(v)
        count_sign = jnp.sign(jnp.sum(s, axis=0))
        if elect == "mass":
            gamma = jnp.sign(jnp.sum(v, axis=0))
            gamma = jnp.where(gamma == 0, count_sign, gamma)
        else:
            gamma = count_sign
        gamma = jnp.where(gamma == 0, 1.0, gamma)
        keep = s == gamma[None]
        merged = jnp.sum(jnp.where(keep, v, 0.0), axis=0)
        if merge == "sum":
            return merged
        den = jnp.sum(jnp.where(keep, w, 0.0), axis=0)
        return merged / jnp.where(jnp.abs(den) < 1e-8, 1.0, den)

    return jax.tree.map(leaf, tv)


def _finish(base: Params, merged: Params, lam: Array | float) -> Params:
    """``base + lam * merged``; ``lam`` must be a scalar (a shaped λ would scale columns)."""
    tree.check_scalar("lam", lam)
    return jax.tree.map(
        lambda b, d: (b.astype(d.dtype) + lam * d).astype(b.dtype), base, merged
    )


def task_arithmetic(
    finetuned: Sequence[Params] | Params,
    *,
    base: Params,
    lam: Array | float = 1.0,
    weights: Any = None,
) -> Params:
    r"""Task arithmetic (Ilharco et al., arXiv 2212.04089): :math:`\theta_0 + \lambda\sum_i w_i\tau_i`.

    Addition with positive ``lam``; negation (forgetting a task) with a negative ``lam`` or
    negative ``weights``. The paper tunes ``lam`` on validation data (README: 0.8 for addition,
    0.5 for negation); FusionBench uses 0.3 for 8 tasks.

    Args:
        finetuned: fine-tuned models (list or stacked).
        base: pre-trained params.
        lam: scaling :math:`\lambda` (may be traced).
        weights: optional per-model weights :math:`w_i` (default 1).
    """
    tv, m = stacked_task_vectors(finetuned, base=base)
    w = _weights(weights, m)
    merged = jax.tree.map(lambda t: jnp.sum(bcast(w.astype(t.dtype), t) * t, axis=0), tv)
    return _finish(base, propagate_nonfinite(merged, tv), lam)


def ties(
    finetuned: Sequence[Params] | Params,
    *,
    base: Params,
    density: Array | float = 0.2,
    lam: Array | float = 1.0,
    scope: str = "leaf",
    elect: str = "mass",
    merge: str = "mean",
    weights: Any = None,
    trim: str = "exact",
    out_axis: int | None = -1,
) -> Params:
    r"""TIES-Merging (Yadav et al., arXiv 2306.01708): trim, elect sign, disjoint merge.

    1. **Trim**: keep the top :math:`k=\max(1,\lfloor\text{density}\cdot n\rceil)` entries of each
       :math:`|\tau_i|` (:func:`~landscape.merge.sparsify.topk_mask`: exact count, ties by index),
       per tensor (``scope="leaf"``, mergekit) or over the whole model (``"global"``, the original
       code and FusionBench) or per output unit (``"row"``, along ``out_axis``: -1 for Flax, 0 for
       PyTorch layouts). ``trim="exact"`` keeps exactly ``k``; ``trim="original"`` reproduces the
       original code's ``topk_values_mask`` count exactly: every entry at or above the
       :math:`(n - \mathrm{int}(\text{density}\, n))`-th smallest magnitude, i.e. ``int(density n) + 1``
       entries plus ties (436 of 2176 at density 0.2, where ``"exact"`` keeps 435).
    2. **Elect** and 3. **disjoint merge** as in the module docstring (``elect="mass"``,
       ``merge="mean"`` is the paper; FusionBench's default is ``merge="sum"`` with ``lam=0.3``;
       mergekit's ``ties`` is ``merge="mean"`` with weights).
    4. :math:`\theta = \theta_0 + \lambda\,\tau_m` (paper searches λ in [0.8, 2.5]).

    With ``density=1``, ``elect="none"`` and ``merge="sum"`` this is task arithmetic.
    ``density`` and ``lam`` may be traced.
    """
    check_choice("scope", scope, ("leaf", "global", "row"))
    check_choice("elect", elect, _ELECT)
    check_choice("merge", merge, _MERGE)
    check_choice("trim", trim, ("exact", "original"))
    check_range("density", density, 0.0, 1.0, lo_open=True)
    out_axis = sparsify.check_out_axis(out_axis)
    tv, m = stacked_task_vectors(finetuned, base=base)
    w = _weights(weights, m)
    masks = jax.vmap(
        lambda t: sparsify.topk_mask(t, density=density, scope=scope, out_axis=out_axis, rule=trim)
    )(tv)
    trimmed = jax.tree.map(lambda t, k: jnp.where(k, t, 0.0), tv, masks)
    merged = combine_task_vectors(trimmed, weights=w, elect=elect, merge=merge)
    return _finish(base, propagate_nonfinite(merged, tv), lam)


def _rescale_l1(t: Array, kept: Array) -> Array:
    """mergekit: scale each model's masked tensor back to its original L1 norm (skip if < 1e-7)."""
    axes = tuple(range(1, t.ndim))
    n_full = jnp.sum(jnp.abs(t), axis=axes, keepdims=True)
    n_kept = jnp.sum(jnp.abs(kept), axis=axes, keepdims=True)
    ok = (n_full > 1e-7) & (n_kept > 1e-7)
    return jnp.where(ok, kept * n_full / jnp.where(ok, n_kept, 1.0), kept)


def _stacked_mask(mask: Any, tv: Params, m: int) -> Params:
    ms, mm = as_stacked(mask, what="mask")
    if mm != m:
        msg = f"mask has {mm} models but finetuned has {m}"
        raise ValueError(msg)
    tree.check_match(
        jax.tree.map(lambda x: jnp.zeros(jnp.shape(x), bool), tv),
        jax.tree.map(lambda x: jnp.asarray(x).astype(bool), ms),
        names=("finetuned", "mask"),
    )
    return jax.tree.map(lambda x: jnp.asarray(x).astype(bool), ms)


def _combine(
    tv: Params, base: Params, w: Array, lam: Any, combine: str, elect: str, merge: str, *, received: Params
) -> Params:
    """Combine the sparsified ``tv``; entries non-finite in the ``received`` task vectors stay NaN."""
    if combine == "task_arithmetic":
        merged = combine_task_vectors(tv, weights=w, elect="none", merge="sum")
    else:
        merged = combine_task_vectors(tv, weights=w, elect=elect, merge=merge)
    return _finish(base, propagate_nonfinite(merged, received), lam)


def dare(
    key: Key | None,
    finetuned: Sequence[Params] | Params,
    *,
    base: Params,
    drop: Array | float = 0.9,
    rescale: str = "inverse",
    combine: str = "task_arithmetic",
    mask: Any = None,
    sampling: str = "bernoulli",
    lam: Array | float = 1.0,
    weights: Any = None,
    elect: str = "mass",
    merge: str = "sum",
) -> Params:
    r"""DARE, drop and rescale (Yu et al., arXiv 2311.03099), then task arithmetic or TIES.

    Each entry of each :math:`\tau_i` is dropped with probability ``drop`` = p
    (``sampling="bernoulli"``, the paper) or exactly :math:`\lfloor(1-p)n\rceil` entries of each
    tensor are kept uniformly at random (``"exact"``); an explicit keep-``mask`` (stacked bool tree
    or list of bool trees) replaces the sampling for reproducibility. Kept entries are rescaled:

    * ``"inverse"``: by :math:`1/(1-p)` (the paper, MergeLM, FusionBench), so
      :math:`\mathbb{E}[\tilde\tau] = \tau` (with ``"exact"`` sampling or an explicit mask, by
      :math:`n/\#\text{kept}` per tensor instead);
    * ``"l1"``: per tensor and model by :math:`\|\tau\|_1/\|m\odot\tau\|_1` (mergekit since PR #245;
      skipped when either norm is below 1e-7);
    * ``"none"``.

    ``combine="task_arithmetic"``: :math:`\theta_0 + \lambda\sum_i w_i\tilde\tau_i` (``dare_linear``);
    ``combine="ties"``: sign election + ``merge`` (``dare_ties``; mergekit sums, ``merge="sum"``).
    ``drop`` and ``lam`` may be traced.

    Args:
        key: typed PRNG key (one subkey per model); may be None only with an explicit ``mask``.
    """
    check_choice("rescale", rescale, _RESCALE)
    check_choice("combine", combine, _COMBINE)
    check_choice("sampling", sampling, ("bernoulli", "exact"))
    check_choice("elect", elect, _ELECT)
    check_choice("merge", merge, _MERGE)
    check_range("drop", drop, 0.0, 1.0, hi_open=True)
    if key is None and mask is None:
        msg = "dare needs a PRNG key (jax.random.key) as its first argument, or an explicit mask"
        raise ValueError(msg)
    tv, m = stacked_task_vectors(finetuned, base=base)
    w = _weights(weights, m)
    if mask is not None:
        keep = _stacked_mask(mask, tv, m)
    else:
        keys = jax.random.split(key, m)
        if sampling == "bernoulli":
            keep = jax.vmap(lambda k, t: sparsify.bernoulli_mask(k, t, keep=1.0 - drop))(keys, tv)
        else:
            keep = jax.vmap(lambda k, t: sparsify.exact_random_mask(k, t, keep=1.0 - drop))(keys, tv)

    def leaf(t: Array, k: Array) -> Array:
        kept = jnp.where(k, t, 0.0)
        if rescale == "l1":
            return _rescale_l1(t, kept)
        if rescale == "none":
            return kept
        if mask is None and sampling == "bernoulli":
            return kept / (1.0 - drop)
        axes = tuple(range(1, t.ndim))
        n = jnp.sum(k, axis=axes, keepdims=True)
        return jnp.where(n > 0, kept * (t[0].size / jnp.maximum(n, 1)), kept)

    kept = jax.tree.map(leaf, tv, keep)
    return _combine(kept, base, w, lam, combine, elect, merge, received=tv)


def breadcrumbs(
    finetuned: Sequence[Params] | Params,
    *,
    base: Params,
    density: Array | float = 0.1,
    gamma: Array | float = 0.01,
    lam: Array | float = 1.0,
    scope: str = "row",
    combine: str = "task_arithmetic",
    weights: Any = None,
    elect: str = "mass",
    merge: str = "sum",
    out_axis: int | None = -1,
) -> Params:
    r"""Model Breadcrumbs (Davari & Belilovsky, arXiv 2312.06795).

    Per output unit of each tensor (the authors' code: rows of PyTorch ``(out, in)`` weights; here
    the unit axis is ``out_axis``, -1 for Flax ``(in, out)`` kernels, 0 for PyTorch layouts, None for
    rows along the stored last axis; ``scope="leaf"`` for whole tensors as mergekit), drop the top-γ
    fraction of :math:`|\tau_i|` (outliers) and keep the next
    β = ``density`` fraction (:func:`~landscape.merge.sparsify.breadcrumbs_mask`, exact counts),
    then :math:`\theta_0 + \lambda\sum_i w_i\tilde\tau_i` (``combine="task_arithmetic"``) or sign
    election + ``merge`` (``"ties"``, mergekit ``breadcrumbs_ties``). The authors tune β in
    0.05-0.4 and γ in 0.001-0.01; mergekit's γ default is 0.01.
    """
    check_choice("combine", combine, _COMBINE)
    check_choice("scope", scope, ("row", "leaf"))
    check_range("density", density, 0.0, 1.0, lo_open=True)
    check_range("gamma", gamma, 0.0, 1.0, hi_open=True)
    out_axis = sparsify.check_out_axis(out_axis)
    tv, m = stacked_task_vectors(finetuned, base=base)
    w = _weights(weights, m)
    masks = jax.vmap(
        lambda t: sparsify.breadcrumbs_mask(t, density=density, gamma=gamma, scope=scope, out_axis=out_axis)
    )(tv)
    kept = jax.tree.map(lambda t, k: jnp.where(k, t, 0.0), tv, masks)
    return _combine(kept, base, w, lam, combine, elect, merge, received=tv)


def della(
    key: Key | None,
    finetuned: Sequence[Params] | Params,
    *,
    base: Params,
    density: Array | float = 0.5,
    epsilon: Array | float = 0.15,
    lam: Array | float = 1.0,
    rescale: str = "inverse",
    combine: str = "ties",
    weights: Any = None,
    elect: str = "mass",
    merge: str = "mean",
    out_axis: int | None = -1,
    mask: Any = None,
) -> Params:
    r"""DELLA-Merging (Deep et al., arXiv 2406.11617): drop (MAGPRUNE), elect, fuse.

    Each entry is kept with the magnitude-ranked probability of
    :func:`~landscape.merge.sparsify.della_probabilities` (row-wise, mean ``density``, spread
    :math:`\pm\epsilon`), kept entries rescaled by :math:`1/p_{keep}` (``"inverse"``, the paper,
    unbiased) or to the tensor's L1 norm (``"l1"``, mergekit) or not (``"none"``); then sign
    election and disjoint mean (``combine="ties"``, mergekit ``della``) or plain sum
    (``"task_arithmetic"``, mergekit ``della_linear``), scaled by λ. ``epsilon=0.15`` is mergekit's
    default; ``density`` is tuned in the paper (no single published default). Ranks are taken
    within each output unit along ``out_axis`` (-1: Flax ``(in, out)``; 0: PyTorch ``(out, in)``, as
    mergekit; None: rows along the stored last axis). An explicit keep-``mask`` (stacked bool tree or
    list of bool trees, e.g. masks recorded from mergekit) replaces the Bernoulli draw; then ``key``
    may be None.
    """
    check_choice("rescale", rescale, _RESCALE)
    check_choice("combine", combine, _COMBINE)
    sparsify.check_della(density, epsilon)
    out_axis = sparsify.check_out_axis(out_axis)
    if key is None and mask is None:
        msg = "della needs a PRNG key (jax.random.key) as its first argument, or an explicit mask"
        raise ValueError(msg)
    tv, m = stacked_task_vectors(finetuned, base=base)
    w = _weights(weights, m)
    probs = jax.vmap(
        lambda t: sparsify.della_probabilities(t, density=density, epsilon=epsilon, out_axis=out_axis)
    )(tv)
    if mask is not None:
        keep = _stacked_mask(mask, tv, m)
    else:
        keys = jax.random.split(key, m)
        keep = jax.vmap(lambda k, t, p: sparsify.bernoulli_mask(k, t, keep=p))(keys, tv, probs)

    def leaf(t: Array, k: Array, p: Array) -> Array:
        kept = jnp.where(k, t, 0.0)
        if rescale == "inverse":
            return kept / p
        if rescale == "l1":
            return _rescale_l1(t, kept)
        return kept

    kept = jax.tree.map(leaf, tv, keep, probs)
    return _combine(kept, base, w, lam, combine, elect, merge, received=tv)
