"""Model fusion by optimal transport of neurons, layer by layer (Singh & Jaggi 2020, arXiv 1910.05653).

OT fusion merges two networks that need not have their hidden units in the same order, nor even
the same number of them. Walking the network from the input to the output, for every hidden unit
group (every permutation name of a :class:`~landscape.align.PermutationSpec`) it

1. aligns the *incoming* weights of the source model with the transport maps already found for
   the groups feeding this one, so that both models' units live in the same input space,
   :math:`\\hat W_S = W_S\\,\\tilde T^{(\\ell-1)}`;
2. builds a ground cost between the source's units and the target's units,
   :math:`M_{ij} = \\|\\hat w_{S,i} - w_{T,j}\\|^2` (weight-based: each unit's incoming weights,
   bias included) or the distance between their activation vectors on data (activation-based);
3. solves the optimal transport problem with uniform marginals
   :math:`\\mu = \\mathbf 1/n_S`, :math:`\\nu = \\mathbf 1/n_T`,
   :math:`T^\\star = \\arg\\min_{T\\ge 0,\\ T\\mathbf 1=\\mu,\\ T^\\top\\mathbf 1=\\nu}\\langle T, M\\rangle`
   exactly or with entropic regularisation (Sinkhorn, ott-jax);
4. maps the source's units onto the target's by the barycentric projection
   :math:`T^\\star\\operatorname{diag}(1/\\beta)` (each column sums to one: target unit ``j``
   receives a convex combination of source units; ``β`` is the realised column marginal, equal to
   ``ν`` for the exact solver), and carries the map forward to the next layer's inputs;

and finally averages the target with the aligned source,
:math:`W_F = w_T W_T + w_S \\hat W_S` (paper: ``(1-s) W_A + s W_B``, ``s = 1/2``).

With equal widths and the exact solver, :math:`T^\\star` is ``1/n`` times a permutation matrix
(the assignment problem has a permutation vertex optimum, found by
``scipy.optimize.linear_sum_assignment``), so OT fusion reduces to weight matching layer by layer
followed by averaging; :attr:`OTFusionInfo.perm` then returns the permutation in
:func:`landscape.align.apply` convention.

Unequal widths and the next layer's inputs. The paper aligns the incoming weights with the same
column-normalised map :math:`\\tilde T = T\\operatorname{diag}(1/\\beta)`
(``incoming="barycentric"``). That averages the outgoing weights of the source units that are
merged into one target unit, which changes the function when widths differ: a source twice as
wide whose extra units duplicate existing ones would lose half of its signal. The default
``incoming="mass"`` instead uses the row-normalised map :math:`\\operatorname{diag}(1/\\alpha) T`
(each source unit hands its outgoing weights to the target units it is transported to, in
proportion, summing where units merge), which keeps the function exactly in that case. With equal
widths and the exact solver both are the same permutation, so every result of the paper (equal
widths) is unchanged.

Supported models: feed-forward specs without BatchNorm state, whose kernels keep the output
unit axis last (Flax layout ``(in, out)`` and ``(h, w, in, out)``): the zoo :class:`MLP` and the
:class:`CNN` with ``norm="layer"`` or ``None`` (LayerNorm scale and bias move with their units).
A spec in which a unit group feeds itself through a residual stream (the zoo ``ResNet``) has no
layer order and is rejected, as are specs with BatchNorm running statistics (``state_axes``;
fuse the parameters of a LayerNorm model instead, or recompute statistics after fusing with
RESET). Non-square or convolutional kernels are flattened per output unit for the ground cost.
The function runs on the host (the exact solver is scipy's) and is not jittable.

Example:
    >>> import jax
    >>> from flax import nnx
    >>> from landscape import align, models
    >>> fm, a, _ = models.functional(models.MLP(4, (8, 8, 3), rngs=nnx.Rngs(0)))
    >>> b = align.apply(fm.spec, align.random_permutation(jax.random.key(1), fm.spec, a), a)
    >>> fused, info = align.ot_fusion(fm.spec, a, b)
    >>> info.perm is not None, bool(jax.numpy.allclose(fused["layers"]["0"]["kernel"], a["layers"]["0"]["kernel"]))
    (True, True)
"""

from __future__ import annotations

import dataclasses
import functools
import math
import numbers
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from scipy.optimize import linear_sum_assignment, linprog
from scipy.sparse import coo_matrix

from landscape._types import Array, Params
from landscape.align.spec import Permutation, PermutationSpec, check_spec
from landscape.align.trace import with_activations
from landscape.tree import key_name, named_leaves

__all__ = [
    "GROUNDS",
    "GROUND_METRICS",
    "INCOMING",
    "OTFusionInfo",
    "SOLVERS",
    "TARGETS",
    "ot_fusion",
]

GROUNDS = ("weights", "activations")
"""Accepted ``ground``: what each unit is described by when building the cost matrix."""
SOLVERS = ("exact", "sinkhorn")
"""Accepted ``solver``: exact (unregularised) transport or entropic Sinkhorn (ott-jax)."""
GROUND_METRICS = ("sqeuclidean", "euclidean", "cosine")
"""Accepted ``ground_metric`` (otfusion's default is the squared Euclidean distance)."""
INCOMING = ("mass", "barycentric")
"""Accepted ``incoming``: how a transport map acts on the next layer's input axis (see module doc)."""
TARGETS = ("a", "b")
"""Accepted ``target``: the model whose widths and unit order the fused model takes."""

_ASSIGNMENT_MAX = 4096
"""Unequal widths: largest ``lcm(n_S, n_T)`` solved as a replicated assignment, else an LP."""
_SINKHORN_THRESHOLD = 1e-4
_SINKHORN_MAX_ITERATIONS = 20_000
_MARGINAL_EPS = 1e-12


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class OTFusionInfo:
    """What :func:`ot_fusion` computed, besides the fused params.

    Attributes:
        transport: ``{name: (n_source, n_target)}`` column-normalised maps
            :math:`T\\operatorname{diag}(1/\\beta)` applied to the source's output units (each
            column sums to one; a permutation matrix for equal widths with the exact solver).
        plans: ``{name: (n_source, n_target)}`` the raw transport plans (entries sum to one).
        aligned: the source model mapped into the target's widths and unit order, before
            averaging (``fused = w_target * target + w_source * aligned``); interpolate between
            the target and ``aligned`` to measure the aligned barrier.
        order: the unit groups in the order they were fused (inputs to outputs).
        costs: the transport cost :math:`\\langle T, M\\rangle` per group, in ``order``.
        converged: per group, whether the solver converged (always true for the exact one).
        ground, solver, target: the settings used.
    """

    transport: dict[str, Array]
    plans: dict[str, Array]
    aligned: Params
    order: tuple[str, ...] = dataclasses.field(metadata={"static": True})
    costs: tuple[float, ...] = dataclasses.field(metadata={"static": True})
    converged: tuple[bool, ...] = dataclasses.field(metadata={"static": True})
    ground: str = dataclasses.field(metadata={"static": True})
    solver: str = dataclasses.field(metadata={"static": True})
    target: str = dataclasses.field(metadata={"static": True})

    @property
    def is_permutation(self) -> bool:
        """Whether every transport map is a permutation matrix (to 1e-6)."""
        return all(_as_permutation(t) is not None for t in self.transport.values())

    @property
    def perm(self) -> Permutation | None:
        """The permutation ``{name: int array}`` (``align.apply`` convention: new unit ``j`` is source
        unit ``perm[name][j]``) when every map is a permutation matrix, else ``None``."""
        out = {n: _as_permutation(t) for n, t in self.transport.items()}
        if any(p is None for p in out.values()):
            return None
        return {n: jnp.asarray(p, dtype=jnp.int32) for n, p in out.items()}

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe summary (no arrays of parameters): per group the cost, convergence, shape and
        whether the map is a permutation, plus the settings."""
        groups = {}
        for n, c, ok in zip(self.order, self.costs, self.converged):
            t = np.asarray(self.transport[n])
            groups[n] = {
                "cost": float(c),
                "converged": bool(ok),
                "shape": list(t.shape),
                "is_permutation": _as_permutation(t) is not None,
            }
        return {
            "order": list(self.order),
            "groups": groups,
            "ground": self.ground,
            "solver": self.solver,
            "target": self.target,
            "is_permutation": self.is_permutation,
        }


def _as_permutation(t: Any) -> np.ndarray | None:
    t = np.asarray(t, dtype=np.float64)
    if t.ndim != 2 or t.shape[0] != t.shape[1]:
        return None
    n = t.shape[0]
    rows = np.argmax(t, axis=0)
    if len(set(rows.tolist())) != n:
        return None
    p = np.zeros((n, n))
    p[rows, np.arange(n)] = 1.0
    return rows if np.allclose(t, p, atol=1e-6) else None


# ---------------------------------------------------------------------------------------- checks
def _check_settings(
    ground: str, solver: str, ground_metric: str, incoming: str, target: str, epsilon: Any,
    weights: Any, num_samples: Any,
) -> tuple[float, float]:
    for what, value, accepted in (
        ("ground", ground, GROUNDS),
        ("solver", solver, SOLVERS),
        ("ground_metric", ground_metric, GROUND_METRICS),
        ("incoming", incoming, INCOMING),
        ("target", target, TARGETS),
    ):
        if value not in accepted:
            msg = f"unknown {what} {value!r}; accepted: {list(accepted)}"
            raise ValueError(msg)
    if not isinstance(epsilon, numbers.Real) or not math.isfinite(epsilon) or epsilon <= 0:
        msg = f"epsilon must be a finite number > 0 (relative to the mean cost), got {epsilon!r}"
        raise ValueError(msg)
    if (
        not isinstance(weights, Sequence)
        or len(weights) != 2
        or not all(isinstance(w, numbers.Real) and math.isfinite(w) and w >= 0 for w in weights)
        or sum(weights) <= 0
    ):
        msg = f"weights must be two finite numbers >= 0 (for a, b) with a positive sum, got {weights!r}"
        raise ValueError(msg)
    if num_samples is not None and (not isinstance(num_samples, int) or num_samples < 1):
        msg = f"num_samples must be a positive int or None (all of objective.x), got {num_samples!r}"
        raise ValueError(msg)
    wa, wb = float(weights[0]), float(weights[1])
    return wa / (wa + wb), wb / (wa + wb)


def _check_models(spec: PermutationSpec, a: Params, b: Params) -> None:
    if not isinstance(spec, PermutationSpec):
        msg = f"spec must be a PermutationSpec, got {type(spec).__name__}"
        raise ValueError(msg)
    if spec.state_axes:
        msg = (
            "OT fusion supports models without BatchNorm state; this spec has state entries "
            f"{sorted(spec.state_axes)}. Use LayerNorm (zoo CNN norm='layer') or no norm."
        )
        raise ValueError(msg)
    for name, tree in (("a", a), ("b", b)):
        try:
            check_spec(spec, tree)
        except ValueError as err:
            msg = f"model {name}: {err}"
            raise ValueError(msg) from None
        for path, leaf in named_leaves(tree):
            if not jnp.issubdtype(jnp.result_type(leaf), jnp.floating):
                msg = f"model {name} leaf {path!r} has dtype {jnp.result_type(leaf)}; OT fusion needs floats"
                raise ValueError(msg)
    la, lb = dict(named_leaves(a)), dict(named_leaves(b))
    if jax.tree.structure(a) != jax.tree.structure(b):
        msg = f"a and b have different tree structures: {jax.tree.structure(a)} vs {jax.tree.structure(b)}"
        raise ValueError(msg)
    for path, names in spec.axes.items():
        sa, sb = jnp.shape(la[path]), jnp.shape(lb[path])
        for ax, n in enumerate(names):
            if n is None and sa[ax] != sb[ax]:
                msg = (
                    f"a and b differ at {path!r} axis {ax}, which no permutation acts on: shapes "
                    f"{sa} and {sb}; only hidden-unit axes (named in the spec) may differ in size"
                )
                raise ValueError(msg)


def _layer_order(spec: PermutationSpec) -> tuple[tuple[str, ...], dict[str, list[str]]]:
    """Topological order of the unit groups and, per group, its producer leaves (name on last axis)."""
    producers: dict[str, list[str]] = {n: [] for n in spec.names}
    deps: dict[str, set[str]] = {n: set() for n in spec.names}
    for path, names in spec.axes.items():
        out = names[-1]
        if out is None:
            continue
        producers[out].append(path)
        for n in names[:-1]:
            if n == out:
                msg = (
                    f"spec entry {path!r} uses {out!r} on an input and the output axis (a residual "
                    "stream); OT fusion needs a feed-forward spec (MLP, CNN), not a ResNet"
                )
                raise ValueError(msg)
            if n is not None:
                deps[out].add(n)
    order: list[str] = []
    done: set[str] = set()
    pending = set(spec.names)
    while pending:
        ready = sorted(n for n in pending if deps[n] <= done)
        if not ready:
            msg = (
                f"the spec's unit groups {sorted(pending)} feed each other in a cycle (residual "
                "connections sharing a permutation, as in ResNet); OT fusion needs a feed-forward "
                "spec (MLP, CNN)"
            )
            raise ValueError(msg)
        order.extend(ready)
        done.update(ready)
        pending -= set(ready)
    return tuple(order), producers


# ---------------------------------------------------------------------------------------- maths
def _along(x: np.ndarray, m: np.ndarray, axis: int) -> np.ndarray:
    """``y[..., j, ...] = Σ_i m[i, j] x[..., i, ...]`` along ``axis`` (host, float64)."""
    return np.moveaxis(np.tensordot(x, m, axes=([axis], [0])), -1, axis)


def _units_first(x: np.ndarray) -> np.ndarray:
    """``(..., n)`` -> ``(n, prod(...))``: one row per output unit."""
    return np.moveaxis(np.asarray(x, dtype=np.float64), -1, 0).reshape(x.shape[-1], -1)


def _cost_fn(ground_metric: str) -> Any:
    from ott.geometry import costs as ott_costs

    return {
        "sqeuclidean": ott_costs.SqEuclidean(),
        "euclidean": ott_costs.Euclidean(),
        "cosine": ott_costs.Cosine(),
    }[ground_metric]


def _exact_plan(cost: np.ndarray) -> np.ndarray:
    """Exact OT plan with uniform marginals for the cost ``(n, m)``.

    ``n == m``: the optimum is ``1/n`` times a permutation matrix (Birkhoff), found by
    ``scipy.optimize.linear_sum_assignment``. ott's own exact matcher, ``ott.tools.unreg.hungarian``
    (optax's Hungarian), gives the same matching but measured 1.1-1.6 s per call at n = 64-512
    against 0.2-54 ms for scipy, and it only handles square problems.
    ``n != m``: with ``L = lcm(n, m)`` the transportation problem has integer supplies ``L/n``
    and demands ``L/m``, so it has an integral optimal vertex: replicating every source unit
    ``L/n`` times and every target unit ``L/m`` times turns it into an ``L x L`` assignment,
    solved exactly by scipy while ``L <= 4096``; beyond that, the transportation LP with
    ``scipy.optimize.linprog`` (HiGHS).
    """
    n, m = cost.shape
    if n == m:
        rows, cols = linear_sum_assignment(cost)
        plan = np.zeros((n, m))
        plan[rows, cols] = 1.0 / n
        return plan
    big = n * m // math.gcd(n, m)
    if big <= _ASSIGNMENT_MAX:
        rep_s, rep_t = big // n, big // m
        rows, cols = linear_sum_assignment(np.repeat(np.repeat(cost, rep_s, axis=0), rep_t, axis=1))
        plan = np.zeros((n, m))
        np.add.at(plan, (rows // rep_s, cols // rep_t), 1.0 / big)
        return plan
    idx = np.arange(n * m)
    a_eq = coo_matrix(
        (np.ones(2 * n * m), (np.concatenate([idx // m, n + idx % m]), np.concatenate([idx, idx]))),
        shape=(n + m, n * m),
    )
    b_eq = np.concatenate([np.full(n, 1.0 / n), np.full(m, 1.0 / m)])
    res = linprog(cost.ravel(), A_eq=a_eq.tocsr(), b_eq=b_eq, bounds=(0, None), method="highs")
    if res.status != 0:
        msg = f"the exact transport LP ({n} x {m}) failed: {res.message}"
        raise ValueError(msg)
    return np.clip(res.x.reshape(n, m), 0.0, None)


@functools.partial(jax.jit, static_argnums=2)
def _ground_cost(x_source: Array, x_target: Array, ground_metric: str) -> Array:
    """Cost matrix ``(n_S, n_T)`` of an ott ``PointCloud`` (negative rounding clipped to 0)."""
    from ott.geometry import pointcloud  # ott (and its jaxopt import) loads only when fusing

    geom = pointcloud.PointCloud(x_source, x_target, cost_fn=_cost_fn(ground_metric))
    return jnp.maximum(geom.cost_matrix, 0.0)


@jax.jit
def _sinkhorn_plan(cost: Array, epsilon: Array) -> tuple[Array, Array]:
    """Entropic plan with uniform marginals (ott Sinkhorn, lse mode), jitted once per shape."""
    from ott.geometry import geometry
    from ott.problems.linear import linear_problem
    from ott.solvers.linear import sinkhorn as ott_sinkhorn

    n, m = cost.shape
    geom = geometry.Geometry(cost_matrix=cost, epsilon=epsilon, relative_epsilon="mean")
    prob = linear_problem.LinearProblem(geom, a=jnp.full(n, 1.0 / n), b=jnp.full(m, 1.0 / m))
    out = ott_sinkhorn.Sinkhorn(
        threshold=_SINKHORN_THRESHOLD, max_iterations=_SINKHORN_MAX_ITERATIONS
    )(prob)
    return out.matrix, out.converged


def _solve(
    x_source: Array, x_target: Array, *, solver: str, ground_metric: str, epsilon: float
) -> tuple[np.ndarray, float, bool]:
    """Plan ``(n_S, n_T)`` between the unit descriptions, its cost ``<T, M>`` and convergence."""
    cost_j = _ground_cost(jnp.asarray(x_source), jnp.asarray(x_target), ground_metric)
    cost = np.asarray(cost_j, dtype=np.float64)
    if solver == "exact":
        plan, converged = _exact_plan(cost), True
    else:
        plan_j, ok = _sinkhorn_plan(cost_j, jnp.asarray(epsilon, dtype=cost_j.dtype))
        plan = np.asarray(plan_j, dtype=np.float64)
        converged = bool(ok) and bool(np.all(np.isfinite(plan)))
    return plan, float(np.sum(plan * cost)), converged


def _activations(
    apply_fn: Any, params: Params, x: Array, names: tuple[str, ...], batch_size: int, which: str
) -> dict[str, Array]:
    """``{name: (units, samples)}`` pre-activations over ``x`` in chunks of ``batch_size``."""
    chunks: dict[str, list[Array]] = {n: [] for n in names}
    for start in range(0, x.shape[0], batch_size):
        acts = apply_fn.intermediates(params, x[start : start + batch_size], kind="pre")
        for n in names:
            if n not in acts:
                msg = (
                    f"model {which}: intermediates have no activations for unit group {n!r}; "
                    f"they have {sorted(acts)}"
                )
                raise ValueError(msg)
            chunks[n].append(_units_first(np.asarray(acts[n])))
    return {n: np.concatenate(c, axis=1) for n, c in chunks.items()}


def _resolve_apply_fns(apply_fn: Any, objective: Any) -> tuple[Any, Any]:
    if objective is None:
        msg = "ground='activations' needs objective= (its x are the data the activations are taken on)"
        raise ValueError(msg)
    fns = apply_fn if apply_fn is not None else objective.apply_fn
    pair = tuple(fns) if isinstance(fns, (tuple, list)) else (fns, fns)
    if len(pair) != 2:
        msg = f"apply_fn must be one model or a pair (for a, for b), got {len(pair)} items"
        raise ValueError(msg)
    for which, fn in zip("ab", pair):
        if not callable(fn):
            msg = (
                f"ground='activations' needs a callable apply_fn (a zoo model with intermediates, "
                f"or any apply_fn(params, x), traced) for model {which}; got {type(fn).__name__}"
            )
            raise ValueError(msg)
    return pair


# ---------------------------------------------------------------------------------------- fusion
def ot_fusion(
    spec: PermutationSpec,
    a: Params,
    b: Params,
    *,
    objective: Any = None,
    apply_fn: Any = None,
    ground: str = "weights",
    solver: str = "exact",
    epsilon: float = 0.01,
    ground_metric: str = "sqeuclidean",
    weights: tuple[float, float] = (0.5, 0.5),
    target: str = "a",
    incoming: str = "mass",
    num_samples: int | None = None,
) -> tuple[Params, OTFusionInfo]:
    """Fuse two models by optimal transport of their hidden units (Singh & Jaggi, arXiv 1910.05653).

    The *source* model (``b`` when ``target="a"``) is aligned to the *target* group by group, from
    the inputs to the outputs (module docstring, steps 1-4), then
    ``fused = w_a * a + w_b * aligned_source`` with ``(w_a, w_b) = weights / sum(weights)``.
    Axes that no permutation acts on (inputs, logits) are averaged as they are.

    Args:
        spec: the permutation spec shared by both architectures (names and axes; the sizes of
            hidden-unit axes may differ between ``a`` and ``b``).
        a, b: the two params trees. Same tree and same sizes on unnamed axes.
        objective: an :class:`~landscape.Objective`; its ``x`` are the data for
            ``ground="activations"`` (unused for weights).
        apply_fn: a zoo ``FunctionalModel`` (with ``.intermediates``) or any ``apply_fn(params, x)``
            (activations traced, :func:`landscape.align.activations`), or a pair ``(for a, for b)``
            when the widths differ; default ``objective.apply_fn`` for both.
        ground: ``"weights"`` (each unit described by its incoming weights, bias and norm
            parameters, after aligning its inputs) or ``"activations"`` (each unit by its
            pre-activations on the first ``num_samples`` of ``objective.x``).
        solver: ``"exact"`` (unregularised OT: scipy assignment / LP) or ``"sinkhorn"``
            (``ott.solvers.linear.sinkhorn.Sinkhorn`` on the ``PointCloud`` cost matrix, lse mode,
            threshold 1e-4 on the 2-norm of the marginal error, at most 20000 iterations).
        epsilon: Sinkhorn's entropic regularisation, relative to the mean of the cost matrix
            (ott's ``relative_epsilon="mean"``); smaller is closer to the exact plan.
        ground_metric: ``"sqeuclidean"`` (otfusion's default), ``"euclidean"`` or ``"cosine"``.
        weights: ``(w_a, w_b)``, normalised to sum to one (paper: ``(1 - s, s)``, ``s = 1/2``).
        target: ``"a"`` or ``"b"``: whose widths and unit order the fused model takes.
        incoming: ``"mass"`` (default; function-preserving for unequal widths) or
            ``"barycentric"`` (the paper's literal ``T diag(1/β)`` on the inputs too); the same
            for equal widths with the exact solver.
        num_samples: for activations, how many examples of ``objective.x`` to use (all if None;
            otfusion used 200).

    Returns:
        ``(fused, info)``: ``fused`` is a params tree with the target's structure and shapes;
        ``info`` an :class:`OTFusionInfo` with the transport maps and the aligned source.

    Raises:
        ValueError: before any work, for an unknown setting, a spec that does not fit a model
            (naming the path), mismatched unnamed axes, BatchNorm state, a residual (cyclic) spec,
            or ``ground="activations"`` without an objective / intermediates.

    Example:
        >>> import jax, jax.numpy as jnp
        >>> from landscape import align
        >>> spec = align.PermutationSpec({"w1": (None, "h"), "w2": ("h", None)})
        >>> a = {"w1": jnp.array([[1.0, 2.0]]), "w2": jnp.array([[1.0], [3.0]])}
        >>> b = {"w1": jnp.array([[2.0, 1.0]]), "w2": jnp.array([[3.0], [1.0]])}
        >>> fused, info = align.ot_fusion(spec, a, b)
        >>> fused["w2"].ravel().tolist(), info.perm["h"].tolist()
        ([1.0, 3.0], [1, 0])
    """
    w_a, w_b = _check_settings(
        ground, solver, ground_metric, incoming, target, epsilon, weights, num_samples
    )
    _check_models(spec, a, b)
    order, producers = _layer_order(spec)
    if ground == "weights":
        empty = [n for n in order if not producers[n]]
        if empty:
            msg = (
                f"unit groups {empty} appear on no leaf's last (output) axis, so they have no "
                "incoming weights to compare; use ground='activations' or a spec with kernels "
                "laid out (..., in, out)"
            )
            raise ValueError(msg)
        acts_s = acts_t = None
    else:
        fn_a, fn_b = (with_activations(f, spec) for f in _resolve_apply_fns(apply_fn, objective))
        x = objective.x if num_samples is None else objective.x[:num_samples]
        bs = int(getattr(objective, "batch_size", 512))
        acts_a = _activations(fn_a, a, x, order, bs, "a")
        acts_b = _activations(fn_b, b, x, order, bs, "b")
        acts_t, acts_s = (acts_a, acts_b) if target == "a" else (acts_b, acts_a)

    tgt, src = (a, b) if target == "a" else (b, a)
    w_t, w_s = (w_a, w_b) if target == "a" else (w_b, w_a)
    src_leaves = {n: np.asarray(x, dtype=np.float64) for n, x in named_leaves(src)}
    tgt_leaves = {n: np.asarray(x, dtype=np.float64) for n, x in named_leaves(tgt)}

    out_maps: dict[str, np.ndarray] = {}
    in_maps: dict[str, np.ndarray] = {}
    plans: dict[str, np.ndarray] = {}
    costs: list[float] = []
    converged: list[bool] = []
    for name in order:
        if acts_s is None:
            feats_s, feats_t = [], []
            for path in producers[name]:
                xs = src_leaves[path]
                for ax, n in enumerate(spec.axes[path][:-1]):
                    if n is not None:
                        xs = _along(xs, in_maps[n], ax)
                feats_s.append(_units_first(xs))
                feats_t.append(_units_first(tgt_leaves[path]))
            x_s = np.concatenate(feats_s, axis=1)
            x_t = np.concatenate(feats_t, axis=1)
        else:
            x_s, x_t = acts_s[name], acts_t[name]
        plan, cost, ok = _solve(
            x_s, x_t, solver=solver, ground_metric=ground_metric, epsilon=float(epsilon)
        )
        beta = plan.sum(axis=0, keepdims=True)
        alpha = plan.sum(axis=1, keepdims=True)
        out_map = plan / np.maximum(beta, _MARGINAL_EPS)
        in_map = out_map if incoming == "barycentric" else plan / np.maximum(alpha, _MARGINAL_EPS)
        out_maps[name], in_maps[name], plans[name] = out_map, in_map, plan
        costs.append(cost)
        converged.append(ok)

    aligned_np: dict[str, np.ndarray] = {}
    for path, x in src_leaves.items():
        names = spec.axes[path]
        for ax, n in enumerate(names):
            if n is not None:
                x = _along(x, out_maps[n] if ax == len(names) - 1 else in_maps[n], ax)
        aligned_np[path] = x

    fused = jax.tree.map_with_path(
        lambda path, t: jnp.asarray(
            w_t * tgt_leaves[key_name(path)] + w_s * aligned_np[key_name(path)], dtype=t.dtype
        ),
        tgt,
    )
    aligned = jax.tree.map_with_path(
        lambda path, t: jnp.asarray(aligned_np[key_name(path)], dtype=t.dtype), tgt
    )
    dtype = jnp.result_type(*jax.tree.leaves(tgt))
    info = OTFusionInfo(
        transport={n: jnp.asarray(t, dtype=dtype) for n, t in out_maps.items()},
        plans={n: jnp.asarray(t, dtype=dtype) for n, t in plans.items()},
        aligned=aligned,
        order=order,
        costs=tuple(costs),
        converged=tuple(converged),
        ground=ground,
        solver=solver,
        target=target,
    )
    return fused, info

