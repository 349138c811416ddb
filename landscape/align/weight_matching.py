"""Weight matching: the permutation of model B whose weights line up best with model A's.

Git Re-Basin (Ainsworth, Hayase & Srinivasa 2022, arXiv:2209.04836, Sec. 3.2) aligns B to A by
maximising the inner product of the two weight vectors over the permutations of B's hidden units,

.. math::  \\max_{\\pi} \\; \\langle θ_A, π(θ_B) \\rangle
           = \\max_{\\pi} \\sum_k \\langle W^A_k, π(W^B)_k \\rangle ,

equivalently minimising :math:`\\lVert θ_A - π(θ_B) \\rVert^2` (permuting does not change the norm).
This sum of bilinear assignment problems is NP-hard; the paper's coordinate descent fixes all
permutations but one, ``p``, and solves the remaining *linear* assignment exactly,

.. math::  C_p = \\sum_{(k, ax) \\,:\\, k \\text{ uses } p \\text{ on } ax}
           \\mathrm{mat}_{ax}(W^A_k)\\, \\mathrm{mat}_{ax}(\\tilde W^B_k)^\\top, \\qquad
           p \\leftarrow \\arg\\max_{q} \\sum_i (C_p)_{i, q_i},

where :math:`\\mathrm{mat}_{ax}` moves axis ``ax`` first and flattens the rest, and
:math:`\\tilde W^B_k` is B's leaf with every *other* current permutation applied (biases, norm
scales / shifts and every other leaf the spec tags are included, as in the reference). The
assignment is solved by ``scipy.optimize.linear_sum_assignment(C, maximize=True)`` in float64 on
the host. A sweep visits every permutation once, in an order drawn from
``jax.random.permutation(fold_in(key, sweep), num_names)``; the descent stops after a sweep in
which no assignment raised its term by more than ``1e-12`` (relative to the term's size) or
after ``max_iter`` sweeps. Following git-re-basin's ``weight_matching``, the search starts from
the identity (or ``init``). Unlike the reference, a coordinate whose optimum does not beat the
current assignment keeps the current one, so ties never make the descent cycle.

**Attention heads** (a spec with ``blocks``, e.g. traced from a transformer): the query / key and
value / output groups of one attention layer are blockwise, ``p[h·Dh + d] = σ[h]·Dh + τ_h[d]`` with
one head permutation ``σ`` shared by the groups of that layer (Verma & Elbayad 2024,
arXiv:2403.00986, match heads as wholes). Their coordinate step is one constrained assignment over
all those groups ``g`` at once (:func:`blockwise_assignment`): the score of pairing A's head ``h``
with B's head ``h'`` is the optimum of the within-head assignment,
:math:`S[h, h'] = \\sum_g \\max_τ \\sum_d C_g[h D_h + d,\\, h' D_h + τ(d)]` (``τ`` the identity for
``inner="fixed"`` groups, rotary queries / keys), a Hungarian solve over the heads gives ``σ``, and
each group keeps the within-head assignment of its chosen pairs. This is the exact optimum of that
coordinate (the groups of one layer share no parameter leaf, so their costs are independent given
the other permutations). Unconstrained groups are solved as above.

Only ``params`` enter the objective: BatchNorm running statistics are data statistics, not
weights; permute them with :func:`landscape.align.apply_state` using the returned permutation.

Example:
    >>> import jax
    >>> from landscape import align
    >>> spec = align.PermutationSpec({"w1": (None, "h"), "b1": ("h",), "w2": ("h", None)})
    >>> a = {"w1": jax.random.normal(jax.random.key(0), (3, 6)),
    ...      "b1": jax.random.normal(jax.random.key(1), (6,)),
    ...      "w2": jax.random.normal(jax.random.key(2), (6, 2))}
    >>> planted = align.random_permutation(jax.random.key(3), spec, a)
    >>> b = align.apply(spec, planted, a)
    >>> perm, info = align.weight_matching(jax.random.key(4), spec, a, b)
    >>> bool((perm["h"] == align.invert(planted)["h"]).all()), info.converged
    (True, True)
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from scipy.optimize import linear_sum_assignment

from landscape import tree
from landscape._types import Key, Params
from landscape.align.spec import Permutation, PermutationSpec, check_blocks, check_permutation, check_spec

__all__ = ["WeightMatchingInfo", "blockwise_assignment", "weight_matching"]

PROGRESS_TOL = 1e-12
"""A coordinate step counts as progress when it raises its term by more than ``tol * max(1, |term|)``."""


@dataclasses.dataclass(frozen=True)
class WeightMatchingInfo:
    """What the coordinate descent reached.

    Attributes:
        objective: :math:`\\langle θ_A, π(θ_B) \\rangle` summed over every params leaf at the
            returned permutation (float64).
        initial_objective: the same at the starting permutation (identity or ``init``).
        iterations: sweeps run (each sweep solves one assignment per permutation name).
        converged: ``True`` when the last sweep made no progress (a coordinate-wise optimum),
            ``False`` when ``max_iter`` stopped the descent.
        history: the objective after each sweep.
    """

    objective: float
    initial_objective: float
    iterations: int
    converged: bool
    history: tuple[float, ...]

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe dict of all fields."""
        return {
            "objective": self.objective,
            "initial_objective": self.initial_objective,
            "iterations": self.iterations,
            "converged": self.converged,
            "history": list(self.history),
        }

    def plot(self, *, title: str | None = None) -> Any:
        """Plotly figure of the objective per sweep (sweep 0 is the starting point)."""
        import plotly.graph_objects as go

        ys = [self.initial_objective, *self.history]
        fig = go.Figure(go.Scatter(x=list(range(len(ys))), y=ys, mode="lines+markers", name="objective"))
        fig.update_layout(
            title=title or "Weight matching: ⟨θ_A, π(θ_B)⟩ per sweep",
            xaxis_title="sweep",
            yaxis_title="objective",
        )
        return fig


def check_key(key: Any, what: str) -> None:
    """Raise ``ValueError`` unless ``key`` is one typed PRNG key from ``jax.random.key``."""
    if not (isinstance(key, jax.Array) and jnp.issubdtype(key.dtype, jax.dtypes.prng_key)):
        msg = f"{what} needs a typed key from jax.random.key(seed) as first argument, got {getattr(key, 'dtype', type(key))}"
        raise ValueError(msg)
    if key.shape != ():
        msg = f"{what} needs a single key, got a key array of shape {key.shape}"
        raise ValueError(msg)


def check_init(spec: PermutationSpec, init: Permutation, sizes: Mapping[str, int]) -> dict[str, np.ndarray]:
    """Validate a starting permutation against ``spec`` and the unit counts; return it as numpy."""
    check_permutation(init, names=spec.names)
    check_blocks(spec, init)
    out = {}
    for n, size in sizes.items():
        p = np.asarray(init[n])
        if p.shape != (size,) or not np.array_equal(np.sort(p), np.arange(size)):
            msg = f"init[{n!r}] must be a permutation of arange({size}), got shape {p.shape}"
            raise ValueError(msg)
        out[n] = p.astype(np.int64)
    return out


def check_inputs(spec: PermutationSpec, a: Params, b: Params) -> dict[str, int]:
    """Check that ``spec`` fits both models and that they match (ValueError naming the path);
    returns the permutation sizes. Shared by every matcher."""
    if not isinstance(spec, PermutationSpec):
        msg = f"spec must be a PermutationSpec, got {type(spec).__name__}"
        raise ValueError(msg)
    check_spec(spec, a)
    check_spec(spec, b)
    tree.check_match(a, b)
    return spec.sizes(a)


def _take_except(
    w: np.ndarray, names: tuple[str | None, ...], perm: Mapping[str, np.ndarray], except_axis: int | None
) -> np.ndarray:
    for ax, n in enumerate(names):
        if n is not None and ax != except_axis:
            w = np.take(w, perm[n], axis=ax)
    return w


def inner_product(
    spec: PermutationSpec,
    a: Mapping[str, np.ndarray],
    b: Mapping[str, np.ndarray],
    perm: Mapping[str, np.ndarray],
) -> float:
    """:math:`\\langle θ_A, π(θ_B) \\rangle` over every leaf, float64 (leaves given by path)."""
    return float(sum(np.vdot(a[k], _take_except(b[k], spec.axes[k], perm, None)) for k in a))


def blockwise_assignment(
    costs: Sequence[np.ndarray], block: int, inner: Sequence[str]
) -> tuple[list[np.ndarray], float]:
    """The best blockwise permutations for several groups sharing one head permutation.

    Maximises :math:`\\sum_g \\sum_i C_g[i, p_g[i]]` over ``p_g[h·B + d] = σ[h]·B + τ_{g,h}[d]``
    (one ``σ`` for all groups, ``τ`` free per group and head, or the identity where ``inner[g]`` is
    ``"fixed"``). Exact: for every head pair ``(h, h')`` and group the within-head Hungarian gives
    :math:`S_g[h, h']`; the Hungarian over :math:`\\sum_g S_g` gives ``σ``.

    Args:
        costs: one ``(H·B, H·B)`` similarity matrix per group (rows: A's units, columns: B's).
        block: the block size ``B`` (units per head).
        inner: ``"free"`` or ``"fixed"`` per group.

    Returns:
        ``(perms, value)``: one flat permutation (int64) per group and the maximised sum.
    """
    n = costs[0].shape[0]
    heads = n // block
    total = np.zeros((heads, heads))
    taus = []
    for cost, mode in zip(costs, inner, strict=True):
        blocks = cost.reshape(heads, block, heads, block).transpose(0, 2, 1, 3)  # (h, h', d, d')
        tau = np.broadcast_to(np.arange(block), (heads, heads, block)).copy()
        if mode == "free":
            for h in range(heads):
                for g in range(heads):
                    tau[h, g] = linear_sum_assignment(blocks[h, g], maximize=True)[1]
        total += np.take_along_axis(blocks, tau[..., None], axis=3)[..., 0].sum(-1)
        taus.append(tau)
    _, sigma = linear_sum_assignment(total, maximize=True)
    perms = [(sigma[:, None] * block + tau[np.arange(heads), sigma]).reshape(-1).astype(np.int64) for tau in taus]
    return perms, float(total[np.arange(heads), sigma].sum())


def _coordinates(spec: PermutationSpec) -> list[tuple[str, ...]]:
    """The coordinates of the descent: each unconstrained name alone, each heads label's groups
    together (at the position of its first group), in sorted name order."""
    out: list[tuple[str, ...]] = []
    seen: set[str] = set()
    heads = spec.heads
    for n in spec.names:
        if n in spec.blocks:
            label = spec.blocks[n][0]
            if label not in seen:
                seen.add(label)
                out.append(heads[label])
        else:
            out.append((n,))
    return out


def weight_matching(
    key: Key,
    spec: PermutationSpec,
    a: Params,
    b: Params,
    *,
    max_iter: int = 100,
    init: Permutation | None = None,
) -> tuple[Permutation, WeightMatchingInfo]:
    """Permutation of ``b`` maximising :math:`\\langle θ_A, π(θ_B)\\rangle` by coordinate descent.

    Ainsworth et al. 2022 (arXiv:2209.04836), Algorithm 1; see the module docstring for the
    exact procedure.

    Args:
        key: typed PRNG key; fixes the order in which each sweep visits the permutations, so the
            result is a deterministic function of ``key`` and the inputs.
        spec: the models' :class:`~landscape.align.PermutationSpec`.
        a: params of the reference model A.
        b: params of model B (same structure, shapes and dtypes as ``a``).
        max_iter: the most sweeps to run.
        init: starting permutation (e.g. the previous one, to warm-start); identity when ``None``.

    Returns:
        ``(perm, info)``: ``align.apply(spec, perm, b)`` is B aligned to A (the same function
        as B); ``info`` is a :class:`WeightMatchingInfo`.

    Raises:
        ValueError: before any work, when ``spec`` does not fit ``a`` or ``b`` (naming the key
            path), ``a`` and ``b`` differ, ``key`` is not a typed key, ``max_iter < 1`` or
            ``init`` is not a permutation of the right sizes.
    """
    check_key(key, "weight_matching")
    sizes = check_inputs(spec, a, b)
    if isinstance(max_iter, bool) or not isinstance(max_iter, int) or max_iter < 1:
        msg = f"max_iter must be a positive int, got {max_iter!r}"
        raise ValueError(msg)
    perm = (
        {n: np.arange(s) for n, s in sizes.items()} if init is None else check_init(spec, init, sizes)
    )
    leaves_a = {k: np.asarray(v, np.float64) for k, v in tree.named_leaves(a)}
    leaves_b = {k: np.asarray(v, np.float64) for k, v in tree.named_leaves(b)}
    names = spec.names
    where = spec.perm_to_axes
    # A's side of every product never changes: flatten it once.
    mats_a = {
        (k, ax): np.moveaxis(leaves_a[k], ax, 0).reshape(sizes[p], -1)
        for p in names
        for k, ax in where[p]
    }

    initial = inner_product(spec, leaves_a, leaves_b, perm)
    history: list[float] = []
    converged = False
    sweeps = 0
    coords = _coordinates(spec)

    def cost_of(p: str) -> np.ndarray:
        n = sizes[p]
        cost = np.zeros((n, n))
        for k, ax in where[p]:
            wb = _take_except(leaves_b[k], spec.axes[k], perm, ax)
            cost += mats_a[(k, ax)] @ np.moveaxis(wb, ax, 0).reshape(n, -1).T
        return cost

    for sweep in range(max_iter):
        sweeps = sweep + 1
        progress = False
        order = np.asarray(jax.random.permutation(jax.random.fold_in(key, sweep), len(coords)))
        for i in order:
            group = coords[int(i)]
            costs = [cost_of(p) for p in group]
            if group[0] in spec.blocks:
                block = spec.blocks[group[0]][1]
                cols_all, _ = blockwise_assignment(costs, block, [spec.blocks[p][2] for p in group])
            else:
                cols_all = [linear_sum_assignment(costs[0], maximize=True)[1]]
            rows = np.arange(sizes[group[0]])
            old = float(sum(c[rows, perm[p]].sum() for c, p in zip(costs, group)))
            new = float(sum(c[rows, q].sum() for c, q in zip(costs, cols_all)))
            if new > old + PROGRESS_TOL * max(1.0, abs(old)):
                for p, q in zip(group, cols_all):
                    perm[p] = q.astype(np.int64)
                progress = True
        history.append(inner_product(spec, leaves_a, leaves_b, perm))
        if not progress:
            converged = True
            break
    out = {n: jnp.asarray(perm[n], jnp.int32) for n in names}
    info = WeightMatchingInfo(
        objective=history[-1],
        initial_objective=initial,
        iterations=sweeps,
        converged=converged,
        history=tuple(history),
    )
    return out, info
