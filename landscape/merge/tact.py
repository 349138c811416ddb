r"""TACT: per-task rescale-and-shift of a merged model's activations (the non-local merging fix).

Sharma, Roy & Dziugaite 2024, *The Non-Local Model Merging Problem: Permutation Symmetries and
Variance Collapse* (arXiv:2410.12766), code ``ekanshs/tact-merge``. Merging experts that lie far
apart (different pre-trainings, or different initialisations aligned by weight matching) collapses
the spread of the hidden units — the "variance collapse" that REPAIR (arXiv:2211.08403) fixes for
two-model interpolation. REPAIR's pooled targets fail in the multi-task setting (the paper's
notebook: CIFAR-10 79.3% merged → 14.4% after REPAIR). TACT instead gives every task ``t`` its own
correction, whose targets are *that task's expert on that task's data*: for every hidden unit
``j`` of a corrected layer,

.. math::  z'_j = \frac{σ^{E_t}_j}{\sqrt{(σ^{M,t}_j)^2 + ε}}\,\bigl(z_j - μ^{M,t}_j\bigr) + μ^{E_t}_j,

where :math:`μ^{E_t}, σ^{E_t}` are the per-unit mean and standard deviation of the pre-activation
of expert ``t`` and :math:`μ^{M,t}, σ^{M,t}` those of the merged model, both over task ``t``'s
data. The paper inserts BatchNorm-style affine layers and estimates the statistics with a moving
average over 500 batches; here the statistics are exact population moments (1/N) over the whole
dataset (:func:`landscape.align.unit_statistics`), and the affine map is folded into the layer that
produces the pre-activation (kernel output columns and bias, :math:`W'_{\cdot j} = s_j W_{\cdot j}`,
:math:`b'_j = s_j(b_j - μ^{M,t}_j) + μ^{E_t}_j`; a norm's scale and shift when the pre-activation
is a norm's output), which is exactly the "fold it into the preceding weights" the paper notes.
Layers are corrected in forward order and the merged model's statistics of each layer are
re-measured after correcting the earlier ones (the paper re-estimates running statistics in one
pass through its inserted norms: the same sequential dependence).

**Which layers.** By default every hidden unit group of the permutation spec
(:func:`landscape.align.repair_layers`: for the zoo MLP, every hidden Dense layer's
pre-activation; the output logits are not corrected). **The head** is handled as in the paper:
classifier heads are kept per task, i.e. ``head="expert"`` copies expert ``t``'s output layer
(every leaf whose last axis is not permuted by the spec, e.g. ``layers/2/kernel`` and
``layers/2/bias``) into task ``t``'s params; ``head="merged"`` keeps the merged head.

**Non-local setting** (paper §3): experts fine-tuned from *different* initialisations are first
brought into one basis. :func:`align_experts` weight-matches (Ainsworth et al., arXiv:2209.04836)
every expert — or, as the paper does, every expert's initialisation, the expert then permuted with
its initialisation's permutation — to a reference, and returns the aligned bases too, so the base
of task arithmetic is their average (the paper's ``lerp(0.5, init_A, π(init_B))``).

Example:
    >>> import jax
    >>> from landscape import models, merge
    >>> apply_fn, a, _ = models.functional(
    ...     models.build("mlp", jax.random.key(0), in_features=4, widths=(8, 3)))
    >>> _, b, _ = models.functional(models.build("mlp", jax.random.key(1), in_features=4, widths=(8, 3)))
    >>> x = jax.random.normal(jax.random.key(2), (50, 4))
    >>> merged = merge.average([a, b])
    >>> per_task = merge.tact(merged, [a, b], [x, x], apply_fn=apply_fn)
    >>> len(per_task)
    2
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from landscape import tree
from landscape._types import Key, Params
from landscape.align.repair import check_layers, fold_affine
from landscape.objective import Objective

__all__ = ["align_experts", "head_leaves", "tact"]

_HEADS = ("expert", "merged")
_MATCH = ("experts", "bases")


def head_leaves(spec: Any, params: Params) -> tuple[str, ...]:
    """The output layer's leaves: those whose last axis carries no permutation in ``spec``.

    Args:
        spec: a :class:`~landscape.align.PermutationSpec` fitting ``params``.
        params: the params (only the key paths are read).

    Returns:
        Leaf names such as ``("layers/2/bias", "layers/2/kernel")`` (sorted).
    """
    from landscape.align import check_spec

    check_spec(spec, params)
    return tuple(sorted(p for p, axes in spec.axes.items() if axes and axes[-1] is None))


def _as_objective(data: Any, apply_fn: Any, batch_size: int, what: str) -> Objective:
    if isinstance(data, Objective):
        return data
    if isinstance(data, (jax.Array, np.ndarray)):
        x = jnp.asarray(data)
        return Objective(apply_fn, x, jnp.zeros((x.shape[0],), jnp.int32), batch_size=batch_size)
    msg = f"{what} must be an Objective or an input array (N, ...), got {type(data).__name__}"
    raise ValueError(msg)


def _copy_leaves(dst: Params, src: Params, names: Sequence[str]) -> Params:
    wanted = set(names)
    return jax.tree.map_with_path(lambda p, d, s: s if tree.key_name(p) in wanted else d, dst, src)


def tact(
    merged: Params,
    experts: Sequence[Params],
    objectives: Sequence[Any],
    *,
    apply_fn: Any,
    spec: Any = None,
    layers: Mapping[str, tuple[str, str]] | None = None,
    head: str = "expert",
    eps: float = 0.0,
    batch_size: int = 512,
    shared: str = "error",
) -> list[Params]:
    r"""TACT: one corrected copy of ``merged`` per task (Sharma et al. 2024, arXiv:2410.12766).

    For task ``t`` and each corrected unit group in forward order, the merged model's
    pre-activations on task ``t``'s data are mapped to the expert's per-unit mean and standard
    deviation, :math:`z' = σ^{E_t}(z - μ^{M,t})/\sqrt{(σ^{M,t})^2+ε} + μ^{E_t}`, folded into the
    producing layer (see the module docstring). Pure: ``merged`` and ``experts`` are not changed.

    Args:
        merged: the merged params (task arithmetic, TIES, ... of the aligned experts).
        experts: one expert per task (matching ``merged``; aligned to it in the non-local case,
            see :func:`align_experts`).
        objectives: one per task, the data its statistics are taken on (usually the task's
            training set): an :class:`~landscape.Objective` or an input array ``(N, ...)``.
        apply_fn: the model: a zoo ``FunctionalModel`` (its ``intermediates``) or any
            ``apply_fn(params, x)``, whose activations are traced (:func:`landscape.align.activations`).
        spec: permutation spec that locates the layers and the head; default ``apply_fn.spec``,
            else :func:`landscape.align.trace_spec` of ``apply_fn``.
        layers: ``{unit group: (scale leaf, shift leaf)}`` to correct; default every hidden group
            (:func:`landscape.align.repair_layers`).
        head: ``"expert"`` (default, the paper: task ``t`` gets expert ``t``'s output layer) or
            ``"merged"`` (keep the merged head).
        eps: added to the merged variance (0 keeps the expert a fixed point; a unit with zero
            merged variance is only shifted).
        batch_size: batch size when an array is given.
        shared: passed to :func:`landscape.align.repair_layers` for the default layers:
            ``"layers"`` corrects a transformer (or ResNet) at its normalisation points — every
            LayerNorm writing the residual stream, the query and key projections — measured at
            each layer's output (:func:`landscape.align.trace.layer_outputs`); ``"error"``
            (default) rejects groups without a single producing layer.

    Returns:
        A list of per-task params, each with the structure of ``merged``; copies differ only in the
        corrected layers' leaves and (``head="expert"``) the head.

    Raises:
        ValueError: before any work, for no experts, a number of objectives different from the
            number of experts, mismatched params (naming the path), an unknown ``head``, a
            negative ``eps``, a missing spec, or a unit group without a unique producing layer.
    """
    from landscape.align import repair_layers, unit_statistics
    from landscape.align.activation_matching import intermediates_fn

    intermediates_fn(apply_fn, "tact")
    experts = list(experts)
    objectives = list(objectives)
    if not experts:
        msg = "tact needs at least one expert (one per task), got an empty list"
        raise ValueError(msg)
    if len(objectives) != len(experts):
        msg = f"tact needs one objective (task data) per expert: got {len(experts)} experts and {len(objectives)} objectives"
        raise ValueError(msg)
    if head not in _HEADS:
        msg = f"unknown head {head!r}; accepted: {list(_HEADS)}"
        raise ValueError(msg)
    if not eps >= 0:
        msg = f"eps must be >= 0, got {eps!r}"
        raise ValueError(msg)
    for i, e in enumerate(experts):
        tree.check_match(merged, e, names=("merged", f"experts[{i}]"))
    objs = [_as_objective(o, apply_fn, batch_size, f"objectives[{i}]") for i, o in enumerate(objectives)]
    if spec is None:
        spec = getattr(apply_fn, "spec", None)
    if spec is None and not callable(getattr(apply_fn, "intermediates", None)):
        from landscape.align.trace import trace_spec

        spec = trace_spec(apply_fn, merged, objs[0].x[:1])
    if spec is None and (layers is None or head == "expert"):
        msg = "tact needs spec= (or an apply_fn with a .spec) to find the layers to correct and the head"
        raise ValueError(msg)
    if layers is None:
        layers = repair_layers(spec, merged, shared=shared)
    check_layers(layers, merged)
    heads = head_leaves(spec, merged) if head == "expert" else ()
    from landscape.align.repair import layer_taps
    from landscape.align.trace import LayerOutputs

    apply_fn = layer_taps(apply_fn, spec, layers, params=merged, x=objs[0].x[:1])
    objs = [o.replace(apply_fn=apply_fn) for o in objs]
    tapped = jax.eval_shape(lambda p, xb: apply_fn.intermediates(p, xb, kind="pre"), merged, objs[0].x[:1])
    missing = [n for n in layers if n not in tapped]
    if missing:
        msg = f"unit groups {missing} are not tapped by apply_fn.intermediates; it taps {sorted(tapped)}"
        raise ValueError(msg)
    order = tuple(n for n in tapped if n in layers)
    if isinstance(apply_fn, LayerOutputs):
        order = apply_fn.order(merged, objs[0].x[:1])

    out: list[Params] = []
    for t, (expert, obj) in enumerate(zip(experts, objs, strict=True)):
        del t
        target = unit_statistics(obj, apply_fn, expert, names=order)
        params = merged
        for n in order:
            mu_m, sd_m = (np.asarray(v, np.float64) for v in unit_statistics(obj, apply_fn, params, names=order)[n])
            mu_e, sd_e = (np.asarray(v, np.float64) for v in target[n])
            denom = np.sqrt(sd_m**2 + eps)
            s = np.where(denom > 0, sd_e / np.where(denom > 0, denom, 1.0), 1.0)
            c = mu_e - s * mu_m
            params = fold_affine(params, *layers[n], s, c)
        if heads:
            params = _copy_leaves(params, expert, heads)
        out.append(params)
    return out


def align_experts(
    key: Key,
    experts: Sequence[Params],
    *,
    spec: Any,
    bases: Sequence[Params] | None = None,
    reference: int = 0,
    match: str = "experts",
    max_iter: int = 100,
) -> tuple[list[Params], list[Params] | None, list[Any]]:
    """Bring experts from different initialisations into one basis by weight matching (non-local TACT).

    Every model ``i != reference`` gets the permutation :math:`π_i` that weight-matches
    (arXiv:2209.04836) it to the reference: ``match="experts"`` matches expert ``i`` to the
    reference expert; ``match="bases"`` matches base ``i`` to the reference base (the paper: the
    initialisations are matched, with the classifier zeroed, and each expert is permuted with its
    initialisation's permutation). The output layer is never permuted (the spec leaves it alone),
    so heads stay valid.

    Args:
        key: typed PRNG key (the order weight matching visits the permutations).
        experts: the experts, one per task.
        spec: their :class:`~landscape.align.PermutationSpec`.
        bases: optional initialisation / pre-trained model of each expert (same length).
        reference: index of the model the others are aligned to.
        match: ``"experts"`` or ``"bases"`` (needs ``bases``).
        max_iter: weight-matching sweeps.

    Returns:
        ``(aligned experts, aligned bases or None, permutations)``; the reference's permutation is
        the identity. The merge base of the paper is ``merge.average(aligned_bases)``.

    Raises:
        ValueError: before any work, for no experts, a bad ``reference``, an unknown ``match``,
            ``match="bases"`` without bases, bases of the wrong number, or mismatched params.
    """
    from landscape.align import apply as apply_perm
    from landscape.align import identity, weight_matching

    experts = list(experts)
    if not experts:
        msg = "align_experts needs at least one expert, got an empty list"
        raise ValueError(msg)
    if match not in _MATCH:
        msg = f"unknown match {match!r}; accepted: {list(_MATCH)}"
        raise ValueError(msg)
    if isinstance(reference, bool) or not isinstance(reference, int) or not 0 <= reference < len(experts):
        msg = f"reference must be an index in 0..{len(experts) - 1}, got {reference!r}"
        raise ValueError(msg)
    if bases is not None:
        bases = list(bases)
        if len(bases) != len(experts):
            msg = f"bases must have one model per expert: got {len(bases)} bases for {len(experts)} experts"
            raise ValueError(msg)
    if match == "bases" and bases is None:
        msg = "match='bases' needs bases= (the initialisation of each expert)"
        raise ValueError(msg)
    for i, e in enumerate(experts):
        tree.check_match(experts[reference], e, names=(f"experts[{reference}]", f"experts[{i}]"))
    for i, b in enumerate(bases or []):
        tree.check_match(experts[reference], b, names=(f"experts[{reference}]", f"bases[{i}]"))
    matched = experts if match == "experts" else bases
    perms = []
    for i in range(len(experts)):
        if i == reference:
            perms.append(identity(spec, experts[i]))
            continue
        perm, _ = weight_matching(jax.random.fold_in(key, i), spec, matched[reference], matched[i], max_iter=max_iter)
        perms.append(perm)
    out_e = [apply_perm(spec, p, e) for p, e in zip(perms, experts, strict=True)]
    out_b = None if bases is None else [apply_perm(spec, p, b) for p, b in zip(perms, bases, strict=True)]
    return out_e, out_b, perms
