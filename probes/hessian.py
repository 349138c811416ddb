"""Curvature of the full-dataset loss: Hessian, Gauss-Newton and Fisher spectra, matrix-free.

Every quantity here is computed from matrix-vector products with a curvature matrix ``C`` of the
*full-dataset* loss ``L(θ) = (1/n) Σ_i ℓ(f_θ(x_i), y_i)`` of an :class:`landscape.Objective`. The
products run through ``objective.map_batches`` (fixed padded batches, ``lax.scan``), so each
example has weight exactly ``1/n`` and a product costs one pass over the data:

* ``"hessian"``: ``H v = ∇²L(θ) v`` by forward-over-reverse differentiation (Pearlmutter 1994).
* ``"ggn"``: the generalised Gauss-Newton ``G v = (1/n) Σ_i J_iᵀ H_i J_i v`` with ``J_i = ∂f_θ(x_i)/∂θ``
  and ``H_i = ∇²_z ℓ(z, y_i)`` at ``z = f_θ(x_i)`` (Schraudolph 2002; Martens, arXiv:1412.1193).
* ``"fisher"``: the true Fisher of the model's predictive softmax distribution
  ``F v = (1/n) Σ_i J_iᵀ (diag(p_i) − p_i p_iᵀ) J_i v`` with ``p_i = softmax(f_θ(x_i))``, computed in
  closed form (no sampling). For the cross-entropy loss it equals the GGN.
* ``"empirical_fisher"``: ``F̂ v = (1/n) Σ_i g_i g_iᵀ v`` with per-example gradients
  ``g_i = ∇_θ ℓ(f_θ(x_i), y_i)`` (Kunstner et al., arXiv:1905.12558, on why it differs from ``F``),
  computed with one linearisation per batch and no per-example gradients in memory.

A ``filter`` restricts ``C`` to a block of parameters ``S`` (the submatrix ``C_SS``): a callable on
the leaf name (``landscape.tree.key_name``, e.g. ``"layers/0/kernel"``) or a regular expression
matched with ``re.search``. Vectors outside the block are zero.

Estimators that run many products hoist the primal pass out of them (``jax.linearize`` over the
whole dataset, when its stored activations fit :data:`LINEARIZE_BYTES`; ``linearize=`` decides
explicitly): on the 301k-parameter digits MLP a Hessian-vector product then costs ~37 ms instead
of ~45 ms on a 2-core CPU.

Spectra (Lanczos with full reorthogonalisation and early stopping, :mod:`probes.lanczos`; the
Lanczos residual ``‖C v − λ v‖ = |β_K| |s_K|`` of every Ritz pair), PyHessian's deflated power
iteration (Yao et al., arXiv:1912.07145) for parity, the trace by Hutchinson, by XTrace
(Epperly, Tropp & Webber, arXiv:2301.07825) and by Hutch++ (Meyer et al., arXiv:2010.09649) with
standard errors, the spectral density by
stochastic Lanczos quadrature (Ghorbani, Krishnan & Xiao, arXiv:1901.10159; Lin, Saad & Yang 2016),
per-layer blocks, and curvature along paths ``t -> params``.

Params sharded over a mesh (:func:`landscape.sharding.shard_params`) stay sharded through the
products, Lanczos (the basis is laid out like the params), SLQ, Hutchinson and Hutch++; ``remat=``
rematerialises the model apply inside every product (:data:`REMAT`); :mod:`probes.memory`
estimates what a probe needs before it runs (``verbose=True`` prints it). ``docs/scale-out.md``.

Every estimator is jitted once per static setting (``k``, ``num_steps``, ``curvature``, filter,
probe count) and reused across calls with params of the same shapes.

Example:
    >>> import jax, jax.numpy as jnp
    >>> from landscape import Objective
    >>> from probes import hessian
    >>> A = jnp.diag(jnp.arange(1.0, 7.0))
    >>> obj = Objective(lambda p, x: 0.5 * (p["w"] @ A @ p["w"]) * jnp.ones((x.shape[0], 1)),
    ...                 jnp.zeros((3, 1)), jnp.zeros((3, 1)),
    ...                 loss=lambda z, y: z[:, 0])
    >>> res = hessian.eigenvalues(jax.random.key(0), obj, {"w": jnp.ones(6)}, k=2, num_steps=6)
    >>> [round(float(v), 4) for v in res.eigenvalues]
    [6.0, 5.0]
"""

from __future__ import annotations

import dataclasses
import functools
import re
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree
from matfree import stochtrace

from landscape import sharding, tree
from landscape._types import Array, Key, Params
from landscape.objective import Objective
from probes import lanczos

__all__ = [
    "CURVATURES",
    "DensityResult",
    "PathCurvature",
    "PerLayerResult",
    "PowerIterationResult",
    "REMAT",
    "Spectrum",
    "TraceResult",
    "along_path",
    "curvature_vp",
    "dense_matrix",
    "density",
    "eigenvalues",
    "empirical_fisher_vp",
    "fisher_vp",
    "ggn_vp",
    "hvp",
    "layer_groups",
    "per_layer",
    "power_iteration",
    "summary",
    "trace",
]

CURVATURES = ("hessian", "ggn", "fisher", "empirical_fisher")
"""Accepted values of ``curvature``."""

_WHICH = ("top", "bottom", "both")
_TRACE_METHODS = ("hutchinson", "xtrace", "hutchpp")

Filter = Callable[[str], bool] | str | None


# ---------------------------------------------------------------------------------------- checks
def _check_objective(objective: Any) -> None:
    if not isinstance(objective, Objective):
        msg = f"objective must be a landscape.Objective, got {type(objective).__name__}"
        raise TypeError(msg)


def _check_params(params: Params) -> None:
    named = tree.named_leaves(params)
    if not named:
        msg = "params has no leaves; curvature needs at least one float array"
        raise ValueError(msg)
    for name, leaf in named:
        if not jnp.issubdtype(jnp.result_type(leaf), jnp.floating):
            msg = f"params leaf {name!r} has dtype {jnp.result_type(leaf)}; curvature needs float leaves"
            raise ValueError(msg)
        if not isinstance(leaf, jax.core.Tracer) and not _all_finite(leaf):
            msg = f"params leaf {name!r} holds non-finite values (NaN or inf)"
            raise ValueError(msg)


def _all_finite(leaf: Any) -> bool:
    """Whether a concrete leaf is all finite; a multi-host global array is reduced on its devices
    (its values are not all in this process) and only the replicated flag is fetched."""
    if getattr(leaf, "is_fully_addressable", True):
        return bool(np.all(np.isfinite(np.asarray(leaf))))
    rep = jax.sharding.NamedSharding(leaf.sharding.mesh, jax.sharding.PartitionSpec())
    return bool(jax.jit(lambda a: jnp.all(jnp.isfinite(a)), out_shardings=rep)(leaf))


def _check_choice(name: str, value: Any, accepted: Sequence[str]) -> None:
    if value not in accepted:
        msg = f"unknown {name} {value!r}; accepted: {list(accepted)}"
        raise ValueError(msg)


def _check_int(name: str, value: Any, *, low: int, high: int | None = None, what: str = "") -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < low or (
        high is not None and value > high
    ):
        bound = f"{low} <= {name}" + (f" <= {high}" if high is not None else "")
        msg = f"{name} must be an int with {bound}{what}, got {value!r}"
        raise ValueError(msg)


def _selection(params: Params, filter: Filter) -> tuple[bool, ...]:
    """Which leaves (in flattening order) a filter keeps; raises on an empty selection."""
    names = [name for name, _ in tree.named_leaves(params)]
    if filter is None:
        return (True,) * len(names)
    if isinstance(filter, str):
        try:
            pattern = re.compile(filter)
        except re.error as err:
            msg = f"filter {filter!r} is not a valid regular expression: {err}"
            raise ValueError(msg) from err
        keep = tuple(pattern.search(n) is not None for n in names)
    elif callable(filter):
        keep = tuple(bool(filter(n)) for n in names)
    else:
        msg = (
            "filter must be None, a regular expression string or a callable on the leaf name "
            f"(e.g. 'layers/0/kernel'), got {type(filter).__name__}"
        )
        raise ValueError(msg)
    if not any(keep):
        msg = f"filter {filter!r} selects no parameters; leaf names are {names}"
        raise ValueError(msg)
    return keep


def _prepare(objective: Objective, params: Params, curvature: str, filter: Filter) -> tuple[bool, ...]:
    _check_objective(objective)
    _check_choice("curvature", curvature, CURVATURES)
    _check_params(params)
    return _selection(params, filter)


def _num_selected(params: Params, select: tuple[bool, ...]) -> int:
    return int(sum(int(np.prod(jnp.shape(x))) for x, s in zip(jax.tree.leaves(params), select) if s))


# ------------------------------------------------------------------------------------- operators
LINEARIZE_BYTES = 1 << 30
"""Memory budget of ``linearize=None``: the primal pass is hoisted out of the products when the
stored linearisation (activations of the whole dataset) takes at most this many bytes."""


def _fisher_output_product(z: Array, v: Array) -> Array:
    """``(diag p − p pᵀ) v`` per example, ``p = softmax(z)``, without cancellation.

    The matrix annihilates constant vectors, so ``v`` is first shifted by its component at the
    most likely class ``c``: then ``pᵀw = Σ_{k≠c} p_k w_k`` is a sum of small terms when
    ``p_c ≈ 1`` (a confident model), where ``v_c − pᵀv`` would lose ``log10(1/(1 − p_c))``
    digits to cancellation.
    """
    p = jax.nn.softmax(z, axis=-1)
    c = jnp.argmax(z, axis=-1)[..., None]
    w = v - jnp.take_along_axis(v, c, axis=-1)
    return p * (w - jnp.sum(p * w, axis=-1, keepdims=True))


REMAT = (None, "full", "dots", "dots_no_batch")
"""Accepted values of ``remat``: rematerialisation (``jax.checkpoint``) of the model apply inside
every product. ``None``: none (activations stored for the backward pass). ``"full"``:
``jax.checkpoint`` with ``nothing_saveable`` — only the apply's inputs are kept and the forward
pass is recomputed in the backward (and tangent) passes. ``"dots"``: ``dots_saveable`` — matmul
outputs kept, elementwise intermediates (activations, softmax) recomputed. ``"dots_no_batch"``:
``dots_with_no_batch_dims_saveable`` — only matmuls without batch dimensions kept (for an MLP,
almost nothing that scales with the batch)."""


def _remat_policy(remat: str) -> Callable[..., bool]:
    policies = jax.checkpoint_policies
    return {
        "full": policies.nothing_saveable,
        "dots": policies.dots_saveable,
        "dots_no_batch": policies.dots_with_no_batch_dims_saveable,
    }[remat]


def _rematted(apply_fn: Callable, remat: str | None) -> Callable:
    """``apply_fn`` under ``jax.checkpoint`` with the policy :data:`REMAT` names (itself for None)."""
    if remat is None:
        return apply_fn
    return jax.checkpoint(apply_fn, policy=_remat_policy(remat))


@dataclasses.dataclass(frozen=True)
class _Mode:
    """Static settings every estimator threads through ``_problem``: the layout of the flat vector
    (params sharded over a mesh, :func:`landscape.sharding.flat_layout`) and the remat policy."""

    layout: sharding.FlatLayout | None = None
    remat: str | None = None


_PLAIN = _Mode()


def _mode(params: Params, select: tuple[bool, ...], remat: str | None) -> _Mode:
    if remat not in REMAT:
        msg = f"unknown remat {remat!r}; accepted: {list(REMAT)}"
        raise ValueError(msg)
    return _Mode(layout=sharding.flat_layout(params, _num_selected(params, select)), remat=remat)


@dataclasses.dataclass(frozen=True)
class _Problem:
    flat: Array  # selected parameters, flattened (zero-padded and sharded under a layout)
    matvec: Callable[[Array], Array]  # flat -> flat product with C_SS, recomputing the primal pass
    linearized: Callable[[], Callable[[Array], Array]]  # the same product with the primal pass hoisted
    residual_bytes: Callable[[], int]  # memory the hoisted product keeps (activations)
    embed: Callable[[Array], Params]  # flat (selected) -> full params tree, zeros elsewhere
    extract: Callable[[Params], Array]  # full params tree -> flat (selected)
    loss: Callable[[], Array]  # full-dataset loss at params
    size: int = 0  # number of selected parameters n (flat may be padded beyond it)
    layout: sharding.FlatLayout | None = None

    def lift(self, v: Array) -> Array:
        """``(..., n)`` vectors to the flat layout (zero-padded, sharded); identity without one."""
        return v if self.layout is None else self.layout.pad(v)

    def unlift(self, v: Array) -> Array:
        """``(..., padded)`` back to ``(..., n)``."""
        return v if self.layout is None else self.layout.unpad(v)

    @property
    def support(self) -> Array | None:
        """0/1 mask of the real entries of a padded flat vector (``None`` without padding)."""
        return None if self.layout is None else self.layout.mask(self.flat.dtype)

    def normal(self, key: Key, shape: tuple[int, ...] = ()) -> Array:
        """Standard normal ``shape + (n,)`` draws, lifted: the same numbers with or without a layout."""
        return self.lift(jax.random.normal(key, shape + (self.size,), self.flat.dtype))

    def operator(self, linearize: bool | None) -> Callable[[Array], Array]:
        """The product to run many times: hoisted when ``linearize`` (``None``: when it fits
        :data:`LINEARIZE_BYTES`), else recomputed per product with one batch in memory."""
        if linearize is None:
            linearize = self.residual_bytes() <= LINEARIZE_BYTES
        return self.linearized() if linearize else self.matvec


def _problem(
    objective: Objective, params: Params, select: tuple[bool, ...], curvature: str, mode: _Mode = _PLAIN
) -> _Problem:
    leaves, treedef = jax.tree.flatten(params)
    chosen = [x for x, s in zip(leaves, select) if s]
    flat, unravel = ravel_pytree(chosen)
    size = int(flat.shape[0])
    layout = mode.layout
    n = objective.num_examples
    apply_fn, loss_fn = _rematted(objective.apply_fn, mode.remat), objective.loss_fn

    def lift(v: Array) -> Array:
        return v if layout is None else layout.pad(v)

    def leaves_of(sel_flat: Array) -> list[Array]:
        return list(unravel(sel_flat if layout is None else layout.unpad(sel_flat)))

    def placed(out: list[Array]) -> Params:
        return jax.tree.unflatten(treedef, out if layout is None else layout.constrain_leaves(out))

    flat = lift(flat)

    def full(sel_flat: Array) -> Params:
        it = iter(leaves_of(sel_flat))
        return placed([next(it) if s else x for x, s in zip(leaves, select)])

    def embed(sel_flat: Array) -> Params:
        it = iter(leaves_of(sel_flat))
        return placed([next(it) if s else jnp.zeros_like(x) for x, s in zip(leaves, select)])

    def extract(p: Params) -> Array:
        ls = jax.tree.leaves(p)
        return lift(ravel_pytree([x for x, s in zip(ls, select) if s])[0].astype(flat.dtype))

    def masked_sum(per: Array, m: Array) -> Array:
        return jnp.sum(jnp.where(m, per, jnp.zeros_like(per)))

    def masked_rows(a: Array, m: Array) -> Array:
        mb = m.reshape(m.shape + (1,) * (a.ndim - m.ndim))
        return jnp.where(mb, a, jnp.zeros_like(a))

    def logits_fn(xb: Array) -> Callable[[Array], Array]:
        return lambda f: apply_fn(full(f), xb)

    def batch_grad(f: Array, xb: Array, yb: Array, m: Array) -> Array:
        return jax.grad(lambda g: masked_sum(loss_fn(apply_fn(full(g), xb), yb), m))(f)

    def output_product(z: Array, yb: Array, m: Array, ju: Array) -> Array:
        """``H_out J u`` per example (GGN: loss Hessian in the outputs; Fisher: softmax)."""
        if curvature == "ggn":
            gz = jax.grad(lambda zz: masked_sum(loss_fn(zz, yb), m))
            return jax.jvp(gz, (z,), (ju,))[1]
        return masked_rows(_fisher_output_product(z, ju), m)

    if curvature == "hessian":

        def product(u: Array, xb: Array, yb: Array, m: Array) -> Array:
            return jax.jvp(lambda f: batch_grad(f, xb, yb, m), (flat,), (u,))[1]

    elif curvature in ("ggn", "fisher"):

        def product(u: Array, xb: Array, yb: Array, m: Array) -> Array:
            z, lin = jax.linearize(logits_fn(xb), flat)
            hju = output_product(z, yb, m, lin(u))
            return jax.linear_transpose(lin, flat)(hju.astype(z.dtype))[0]

    else:  # empirical_fisher

        def product(u: Array, xb: Array, yb: Array, m: Array) -> Array:
            def per(f: Array) -> Array:
                return masked_rows(loss_fn(apply_fn(full(f), xb), yb), m)

            _, lin = jax.linearize(per, flat)
            return jax.linear_transpose(lin, flat)(lin(u))[0]

    def matvec(u: Array) -> Array:
        total = objective.map_batches(lambda xb, yb, m: product(u, xb, yb, m))
        return lift((total / n).astype(flat.dtype))

    # --- the same products with the primal pass over the whole dataset done once (jax.linearize
    # keeps its residuals: the activations of every batch), for estimators that run many products
    xs, ys, ms = objective.batches()

    def primal(f: Array) -> Array:
        """What gets linearised: the gradient (Hessian), the logits (GGN, Fisher) or the
        per-example losses (empirical Fisher) of every batch."""
        if curvature == "hessian":
            return objective.map_batches(lambda xb, yb, m: batch_grad(f, xb, yb, m))
        if curvature in ("ggn", "fisher"):
            return jax.lax.map(lambda xb: apply_fn(full(f), xb), xs)
        return jax.lax.map(lambda b: masked_rows(loss_fn(apply_fn(full(f), b[0]), b[1]), b[2]), (xs, ys, ms))

    def linearized() -> Callable[[Array], Array]:
        z, lin = jax.linearize(primal, flat)
        if curvature == "hessian":
            return lambda u: lift((lin(u) / n).astype(flat.dtype))
        transpose = jax.linear_transpose(lin, flat)
        if curvature == "empirical_fisher":
            return lambda u: lift((transpose(lin(u))[0] / n).astype(flat.dtype))

        def hz(ju: Array) -> Array:  # the per-batch output products, over the stacked batches
            return jax.vmap(output_product)(z, ys, ms, ju).astype(z.dtype)

        return lambda u: lift((transpose(hz(lin(u)))[0] / n).astype(flat.dtype))

    def residual_bytes() -> int:
        shapes = jax.eval_shape(lambda f: jax.linearize(primal, f)[1], flat)
        return int(sum(np.prod(s.shape) * np.dtype(s.dtype).itemsize for s in jax.tree.leaves(shapes)))

    def loss() -> Array:
        return objective.loss(full(flat))

    return _Problem(
        flat=flat, matvec=matvec, linearized=linearized, residual_bytes=residual_bytes, embed=embed,
        extract=extract, loss=loss, size=size, layout=layout,
    )


def curvature_vp(
    objective: Objective,
    params: Params,
    v: Params,
    *,
    curvature: str = "hessian",
    filter: Filter = None,
    remat: str | None = None,
) -> Params:
    """Product ``C v`` of a curvature matrix of the full-dataset loss with a params-shaped vector.

    Args:
        objective: the full-dataset loss.
        params: the point θ.
        v: a vector with ``params``' structure and shapes (entries outside the filter are ignored).
        curvature: ``"hessian"``, ``"ggn"``, ``"fisher"`` or ``"empirical_fisher"`` (module docs).
        filter: restrict to the block ``C_SS`` of the leaves it selects (callable on the leaf name
            or a regex); ``None`` keeps every leaf.
        remat: rematerialise the model apply inside the product (:data:`REMAT`): the same
            product with less memory per batch and more compute.

    Params whose leaves are ``NamedSharding``-sharded (:func:`landscape.sharding.shard_params`)
    stay sharded: the flattened vectors are laid out over the params' mesh axis
    (:class:`landscape.sharding.FlatLayout`) and the result's leaves carry the params' shardings.

    Returns:
        ``C v`` as a params tree, zero outside the selected leaves. Jittable.
    """
    select = _prepare(objective, params, curvature, filter)
    tree.check_match(params, v, names=("params", "v"))
    prob = _problem(objective, params, select, curvature, _mode(params, select, remat))
    return prob.embed(prob.matvec(prob.extract(v)))


def hvp(
    objective: Objective, params: Params, v: Params, *, filter: Filter = None, remat: str | None = None
) -> Params:
    """Hessian-vector product ``∇²L(θ) v`` (forward-over-reverse), see :func:`curvature_vp`."""
    return curvature_vp(objective, params, v, curvature="hessian", filter=filter, remat=remat)


def ggn_vp(objective: Objective, params: Params, v: Params, *, filter: Filter = None) -> Params:
    """Gauss-Newton-vector product ``(1/n) Σ J_iᵀ H_i J_i v``, see :func:`curvature_vp`."""
    return curvature_vp(objective, params, v, curvature="ggn", filter=filter)


def fisher_vp(objective: Objective, params: Params, v: Params, *, filter: Filter = None) -> Params:
    """True-Fisher-vector product under the predictive softmax, see :func:`curvature_vp`."""
    return curvature_vp(objective, params, v, curvature="fisher", filter=filter)


def empirical_fisher_vp(
    objective: Objective, params: Params, v: Params, *, filter: Filter = None
) -> Params:
    """Empirical-Fisher-vector product ``(1/n) Σ g_i g_iᵀ v``, see :func:`curvature_vp`."""
    return curvature_vp(objective, params, v, curvature="empirical_fisher", filter=filter)


def dense_matrix(
    objective: Objective, params: Params, *, curvature: str = "hessian", filter: Filter = None
) -> Array:
    """The curvature block ``C_SS`` as a dense ``(n_S, n_S)`` matrix, one product per column.

    Only for small models (checks, notebooks): it costs ``n_S`` products. Rows and columns follow
    the flattening order of the selected leaves (``jax.flatten_util.ravel_pytree``).
    """
    select = _prepare(objective, params, curvature, filter)
    return _dense_impl(objective, params, select=select, curvature=curvature)


@functools.partial(jax.jit, static_argnames=("select", "curvature"))
def _dense_impl(objective: Objective, params: Params, *, select: tuple[bool, ...], curvature: str) -> Array:
    prob = _problem(objective, params, select, curvature)
    eye = jnp.eye(prob.flat.shape[0], dtype=prob.flat.dtype)
    cols = jax.lax.map(prob.operator(None), eye)
    return 0.5 * (cols + cols.T)


# --------------------------------------------------------------------------------------- results
def _json(x: Any) -> Any:
    """Nested lists (floats, or bools for flags) with NaN / inf as None (:func:`probes.numerics.json_safe`)."""
    from probes.numerics import json_safe

    arr = np.asarray(x)
    return json_safe(arr if arr.dtype == bool else arr.astype(float))


def _register(cls: type, data: tuple[str, ...], meta: tuple[str, ...]) -> type:
    return jax.tree_util.register_dataclass(cls, data_fields=list(data), meta_fields=list(meta))


@dataclasses.dataclass(frozen=True)
class Spectrum:
    """Extreme eigenpairs of a curvature matrix from Lanczos.

    Attributes:
        eigenvalues: ``(k,)`` Ritz values; ``which="top"``: largest first; ``"bottom"``: smallest
            first; ``"both"``: the ``k`` largest (largest first) then the ``k`` smallest.
        residuals: ``(k,)`` residual norms ``‖C v_i − λ_i v_i‖`` of the unit Ritz vectors from the
            Lanczos identity ``|β_K| |s_{K,i}|`` (exact in exact arithmetic with full
            reorthogonalisation), floored at the rounding level ``ε max|θ|``. An eigenvalue's
            error is at most its residual, and about ``residual² / gap``.
        eigenvectors: params tree with a leading ``k`` axis (unit vectors, zero outside the
            filter), or ``None`` unless requested.
        converged: all values finite, the loss finite and every residual
            ``<= tol · max|λ|``.
        loss: full-dataset loss at the point.
        num_matvecs: ``()`` products used (Lanczos steps; with ``num_steps=None`` the step at
            which every wanted pair had converged).
        restarts: ``()`` restarts after an invariant Krylov space (eigenvalues of higher
            multiplicity are found through them).
        which, curvature: the settings.
    """

    eigenvalues: Array
    residuals: Array
    eigenvectors: Params | None
    converged: Array
    loss: Array
    num_matvecs: Array
    restarts: Array
    which: str
    curvature: str

    @property
    def top(self) -> Array:
        """The largest eigenvalue found (``nan`` for ``which="bottom"``)."""
        return jnp.nan if self.which == "bottom" else self.eigenvalues[0]

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe summary (no eigenvectors)."""
        return {
            "eigenvalues": _json(self.eigenvalues),
            "residuals": _json(self.residuals),
            "converged": bool(self.converged),
            "loss": _json(self.loss),
            "num_matvecs": int(self.num_matvecs),
            "restarts": int(self.restarts),
            "which": self.which,
            "curvature": self.curvature,
        }

    def plot(self) -> Any:
        """Eigenvalues by index with their residual norms as error bars."""
        import plotly.graph_objects as go

        vals = np.asarray(self.eigenvalues)
        fig = go.Figure(
            go.Scatter(
                x=np.arange(1, len(vals) + 1),
                y=vals,
                mode="markers",
                error_y={"type": "data", "array": np.asarray(self.residuals)},
                name=f"{self.curvature} ({self.which})",
            )
        )
        fig.update_layout(
            title=f"{self.curvature} eigenvalues ({self.which}, {int(self.num_matvecs)} Lanczos steps)",
            xaxis_title="index",
            yaxis_title="eigenvalue",
        )
        return fig


@dataclasses.dataclass(frozen=True)
class PowerIterationResult:
    """Eigenpairs from PyHessian-style deflated power iteration.

    Attributes:
        eigenvalues: ``(k,)`` in the order found (largest magnitude first, as PyHessian).
        eigenvectors: params tree with a leading ``k`` axis (unit vectors).
        residuals: ``(k,)`` ``‖C v − (vᵀCv) v‖`` at the last iterate of each eigenvalue.
        num_iterations: ``(k,)`` products spent on each eigenvalue.
        converged: ``(k,)`` whether the relative change dropped below ``tol`` before ``max_iter``.
    """

    eigenvalues: Array
    eigenvectors: Params
    residuals: Array
    num_iterations: Array
    converged: Array
    curvature: str

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe summary (no eigenvectors)."""
        return {
            "eigenvalues": _json(self.eigenvalues),
            "residuals": _json(self.residuals),
            "num_iterations": [int(i) for i in np.asarray(self.num_iterations)],
            "converged": _json(self.converged),
            "curvature": self.curvature,
        }


@dataclasses.dataclass(frozen=True)
class TraceResult:
    """A stochastic trace estimate with its standard error.

    Attributes:
        estimate: the trace estimate.
        stderr: its standard error (Hutchinson: sample std / √m; XTrace: std of the leave-one-out
            estimates / √m, as in Epperly et al.; Hutch++: std of the ``g`` deflated estimates / √g,
            conditional on the sketch); zero when the trace was computed exactly.
        samples: per-probe estimates (Hutchinson quadratic forms, XTrace leave-one-out
            estimates, ``(g,)`` Hutch++ estimates ``tr(QᵀCQ) + g_i'ᵀ C g_i'``).
        finite: whether estimate, error and loss are finite.
        num_matvecs: products used.
        method, curvature: the settings.
    """

    estimate: Array
    stderr: Array
    samples: Array
    finite: Array
    num_matvecs: int
    method: str
    curvature: str

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe summary."""
        return {
            "estimate": _json(self.estimate),
            "stderr": _json(self.stderr),
            "finite": bool(self.finite),
            "num_matvecs": self.num_matvecs,
            "method": self.method,
            "curvature": self.curvature,
        }


@dataclasses.dataclass(frozen=True)
class DensityResult:
    """Spectral density by stochastic Lanczos quadrature.

    For a unit probe ``v`` the Lanczos tridiagonal ``T = S diag(θ) Sᵀ`` gives a Gauss quadrature
    ``vᵀ f(C) v ≈ Σ_j w_j f(θ_j)`` with nodes ``θ_j`` and weights ``w_j = S_{0j}²`` (exact for
    polynomials of degree < 2m). Averaging over probes estimates ``(1/n) tr f(C)``, i.e. the
    spectral measure ``(1/n) Σ_i δ(λ − λ_i)``; the density is its convolution with a Gaussian of
    width ``sigma``.

    Attributes:
        nodes: ``(num_probes, num_steps)`` quadrature nodes (Ritz values).
        weights: ``(num_probes, num_steps)`` weights (each row sums to 1).
        grid: ``(G,)`` eigenvalue grid.
        density: ``(G,)`` smoothed density on the grid (integrates to ≈ 1).
        sigma: Gaussian width (standard deviation).
        negative_mass: quadrature estimate of the fraction of eigenvalues below zero,
            ``mean_p Σ_j w_pj [θ_pj < −τ·max|θ|]`` with ``τ = negative_tol`` (from the nodes, not
            the smoothed curve, whose Gaussians would put half of the bulk at zero below it; the
            tolerance keeps the near-zero bulk of a trained model, which SLQ lumps into one node a
            rounding error either side of 0, from counting as negative).
        finite: whether all nodes and the loss are finite.
        dim: matrix dimension ``n`` (so ``dim · moment(1)`` estimates the trace).
    """

    nodes: Array
    weights: Array
    grid: Array
    density: Array
    sigma: Array
    negative_mass: Array
    finite: Array
    dim: int
    curvature: str

    def moment(self, p: int) -> Array:
        """SLQ estimate of ``(1/n) tr(C^p)``: ``mean_p Σ_j w_pj θ_pj^p``."""
        return jnp.mean(jnp.sum(self.weights * self.nodes**p, axis=-1))

    @property
    def trace(self) -> Array:
        """SLQ estimate of the trace, ``n · moment(1)``."""
        return self.dim * self.moment(1)

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe summary with nodes, weights and the density curve."""
        return {
            "nodes": _json(self.nodes),
            "weights": _json(self.weights),
            "grid": _json(self.grid),
            "density": _json(self.density),
            "sigma": _json(self.sigma),
            "negative_mass": _json(self.negative_mass),
            "finite": bool(self.finite),
            "dim": self.dim,
            "curvature": self.curvature,
        }

    def plot(self) -> Any:
        """The smoothed density on a log scale, quadrature nodes marked along the bottom."""
        import plotly.graph_objects as go

        dens = np.maximum(np.asarray(self.density), 1e-12)
        fig = go.Figure(go.Scatter(x=np.asarray(self.grid), y=dens, mode="lines", name="density"))
        nodes = np.asarray(self.nodes).ravel()
        fig.add_trace(
            go.Scatter(
                x=nodes,
                y=np.full(nodes.shape, max(float(dens.min()), 1e-12)),
                mode="markers",
                marker={"symbol": "line-ns-open", "size": 10},
                name="nodes",
            )
        )
        fig.update_layout(
            title=f"{self.curvature} spectral density (SLQ, {self.nodes.shape[0]} probes × "
            f"{self.nodes.shape[1]} steps; mass below 0: {float(self.negative_mass):.3g})",
            xaxis_title="eigenvalue",
            yaxis_title="density",
            yaxis_type="log",
        )
        return fig


@dataclasses.dataclass(frozen=True)
class PerLayerResult:
    """Top eigenvalue and trace of each layer's diagonal curvature block ``C_SS``.

    Attributes:
        names: layer names (parent key paths, e.g. ``"layers/0"``).
        sizes: parameters per layer.
        top: ``(L,)`` largest eigenvalue of each block (Lanczos).
        residuals: ``(L,)`` residual norm of each top Ritz pair.
        trace: ``(L,)`` Hutchinson estimate of each block's trace (shared probes).
        trace_stderr: ``(L,)`` their standard errors.
    """

    names: tuple[str, ...]
    sizes: tuple[int, ...]
    top: Array
    residuals: Array
    trace: Array
    trace_stderr: Array
    curvature: str

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe summary keyed by layer name."""
        return {
            "curvature": self.curvature,
            "layers": {
                name: {
                    "size": size,
                    "top": _json(self.top[i]),
                    "residual": _json(self.residuals[i]),
                    "trace": _json(self.trace[i]),
                    "trace_stderr": _json(self.trace_stderr[i]),
                }
                for i, (name, size) in enumerate(zip(self.names, self.sizes))
            },
        }

    def plot(self) -> Any:
        """Bars of each layer's top eigenvalue and trace (± 1 standard error)."""
        import plotly.graph_objects as go
        from plotly.subplots import make_subplots

        fig = make_subplots(rows=1, cols=2, subplot_titles=("top eigenvalue", "trace"))
        names = list(self.names)
        fig.add_trace(go.Bar(x=names, y=np.asarray(self.top), name="top"), row=1, col=1)
        fig.add_trace(
            go.Bar(
                x=names,
                y=np.asarray(self.trace),
                error_y={"type": "data", "array": np.asarray(self.trace_stderr)},
                name="trace",
            ),
            row=1,
            col=2,
        )
        fig.update_layout(title=f"per-layer {self.curvature} curvature", showlegend=False)
        return fig


@dataclasses.dataclass(frozen=True)
class PathCurvature:
    """Curvature along a path ``t -> params``.

    Attributes:
        ts: ``(T,)`` path positions.
        loss: ``(T,)`` full-dataset loss.
        top: ``(T, k)`` largest eigenvalues (largest first).
        residuals: ``(T, k)`` their residual norms.
        trace: ``(T,)`` trace estimates.
        trace_stderr: ``(T,)`` their standard errors.
        converged: ``(T,)`` Lanczos convergence at each point.
    """

    ts: Array
    loss: Array
    top: Array
    residuals: Array
    trace: Array
    trace_stderr: Array
    converged: Array
    curvature: str

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe arrays."""
        return {
            "ts": _json(self.ts),
            "loss": _json(self.loss),
            "top": _json(self.top),
            "residuals": _json(self.residuals),
            "trace": _json(self.trace),
            "trace_stderr": _json(self.trace_stderr),
            "converged": _json(self.converged),
            "curvature": self.curvature,
        }

    def plot(self) -> Any:
        """Loss, top eigenvalue and trace (± 1 s.e.) against t, in three stacked panels."""
        import plotly.graph_objects as go
        from plotly.subplots import make_subplots

        ts = np.asarray(self.ts)
        fig = make_subplots(rows=3, cols=1, shared_xaxes=True, subplot_titles=("loss", "top eigenvalue", "trace"))
        fig.add_trace(go.Scatter(x=ts, y=np.asarray(self.loss), name="loss"), row=1, col=1)
        top = np.asarray(self.top)
        for j in range(top.shape[1]):
            fig.add_trace(go.Scatter(x=ts, y=top[:, j], name=f"λ{j + 1}"), row=2, col=1)
        fig.add_trace(
            go.Scatter(
                x=ts,
                y=np.asarray(self.trace),
                error_y={"type": "data", "array": np.asarray(self.trace_stderr)},
                name="trace",
            ),
            row=3,
            col=1,
        )
        fig.update_layout(title=f"{self.curvature} curvature along the path")
        fig.update_xaxes(title_text="t", row=3, col=1)
        return fig


_register(
    Spectrum,
    ("eigenvalues", "residuals", "eigenvectors", "converged", "loss", "num_matvecs", "restarts"),
    ("which", "curvature"),
)
_register(
    PowerIterationResult,
    ("eigenvalues", "eigenvectors", "residuals", "num_iterations", "converged"),
    ("curvature",),
)
_register(TraceResult, ("estimate", "stderr", "samples", "finite"), ("num_matvecs", "method", "curvature"))
_register(
    DensityResult,
    ("nodes", "weights", "grid", "density", "sigma", "negative_mass", "finite"),
    ("dim", "curvature"),
)
_register(PerLayerResult, ("top", "residuals", "trace", "trace_stderr"), ("names", "sizes", "curvature"))
_register(
    PathCurvature,
    ("ts", "loss", "top", "residuals", "trace", "trace_stderr", "converged"),
    ("curvature",),
)


# ---------------------------------------------------------------------------------- eigenvalues
def _lanczos(
    prob: _Problem, key: Key, num_steps: int, linearize: bool | None, stop: Callable | None = None,
    min_steps: int = 1,
) -> lanczos.Tridiagonal:
    """At most ``num_steps`` Lanczos steps with full reorthogonalisation from a Gaussian start."""
    k_start, k_restart = jax.random.split(key)
    v0 = prob.normal(k_start)
    return lanczos.tridiagonalize(
        k_restart, prob.operator(linearize), v0, num_steps, stop=stop, min_steps=min_steps, support=prob.support
    )


def _print_estimate(objective: Objective, params: Params, **settings: Any) -> None:
    """Print the memory estimate of a probe about to start (``verbose=True``)."""
    from probes import memory  # probes.memory builds on this module

    memory.estimate(objective, params, verbose=True, **settings)


def _floor(theta: Array, resid: Array) -> Array:
    """Residuals floored at the rounding level ``ε max|θ|`` (what a product can resolve)."""
    return jnp.maximum(resid, jnp.finfo(theta.dtype).eps * jnp.max(jnp.abs(theta)))


def _wanted(j: Array, k: int, which: str) -> Array:
    """Indices of the wanted Ritz pairs in :func:`lanczos.ritz`'s ascending order after j steps."""
    top = j - 1 - jnp.arange(k)
    bottom = jnp.arange(k)
    return {"top": top, "bottom": bottom, "both": jnp.concatenate([top, bottom])}[which]


def _converged(theta: Array, resid: Array, j: Array, *, k: int, which: str, tol: float) -> Array:
    idx = _wanted(j, k, which)
    scale = jnp.maximum(jnp.max(jnp.abs(theta)), jnp.finfo(theta.dtype).tiny)
    return jnp.all(jnp.isfinite(theta[idx])) & jnp.all(_floor(theta, resid)[idx] <= tol * scale)


def _default_max_steps(k_total: int, n: int) -> int:
    return min(n, max(3 * k_total + 20, 50))


def eigenvalues(
    key: Key,
    objective: Objective,
    params: Params,
    *,
    k: int = 1,
    which: str = "top",
    num_steps: int | None = None,
    max_steps: int | None = None,
    curvature: str = "hessian",
    filter: Filter = None,
    vectors: bool = False,
    tol: float = 1e-3,
    linearize: bool | None = None,
    remat: str | None = None,
    verbose: bool = False,
) -> Spectrum:
    """Extreme eigenvalues of a curvature matrix by Lanczos with full reorthogonalisation.

    Runs Lanczos steps ``C Q = Q T + β_K q_{K+1} e_Kᵀ`` (:mod:`probes.lanczos`: every new
    vector reorthogonalised against the basis, restarts after an invariant subspace) and returns
    the Ritz values ``θ`` of ``T`` with residual norms ``‖C Qs − θ Qs‖ = |β_K s_K|``. Lanczos
    converges to the extremes of the spectrum first (Kaniel-Paige theory), so a few dozen
    products give the top eigenvalues to near machine precision where power iteration needs
    hundreds per eigenvalue (Golub & Van Loan, ch. 10). An eigenvalue's error is at most its
    residual, and about ``residual² / gap``.

    By default (``num_steps=None``) the iteration stops as soon as every wanted Ritz pair has
    ``residual <= tol · max|θ|`` (as ARPACK does), after at most ``max_steps`` products; give
    ``num_steps`` for a fixed number of steps instead.

    Args:
        key: typed PRNG key for the start vector (and restarts).
        objective: the full-dataset loss.
        params: the point θ.
        k: eigenvalues per end of the spectrum, ``1 <= k <= n`` (``2k <= n`` for ``"both"``).
        which: ``"top"`` (largest algebraic), ``"bottom"`` (smallest algebraic) or ``"both"``.
        num_steps: a fixed number of Lanczos steps ``K`` (``k_total <= K <= n``), no early stop.
        max_steps: the most steps when stopping on convergence (default
            ``min(n, max(3 k_total + 20, 50))``); not with ``num_steps``.
        curvature: ``"hessian"``, ``"ggn"``, ``"fisher"`` or ``"empirical_fisher"``.
        filter: restrict to a parameter block (callable on the leaf name or regex).
        vectors: also return the Ritz vectors as params trees.
        tol: relative residual for ``converged`` (and for stopping when ``num_steps=None``).
        linearize: hoist the primal pass out of the products (stores the dataset's activations);
            ``None`` does so when that takes at most :data:`LINEARIZE_BYTES`.
        remat: rematerialisation of the model apply in every product (:data:`REMAT`); with
            ``linearize=False`` memory is that of one batch under that policy.
        verbose: print :func:`probes.memory.estimate` for these settings before starting.

    Params sharded over a mesh axis (:func:`landscape.sharding.shard_params`) keep the Lanczos
    basis sharded like them: the ``(K, n)`` basis is laid out ``P(None, axis)`` on the
    zero-padded flat vector (:class:`landscape.sharding.FlatLayout`), eigenvectors come back with
    the params' shardings, and the start vector is the same draw as unsharded.

    Returns:
        A :class:`Spectrum`. Non-finite products (e.g. a NaN loss) give NaN eigenvalues and
        ``converged=False``.

    Raises:
        ValueError: bad ``which``/``curvature``/``k``/``num_steps``/``max_steps``, a filter
            selecting nothing, non-float or non-finite params.
    """
    select = _prepare(objective, params, curvature, filter)
    _check_choice("which", which, _WHICH)
    n = _num_selected(params, select)
    per_end = 2 if which == "both" else 1
    _check_int("k", k, low=1, high=n // per_end, what=f" (the selected parameter count is {n})")
    k_total = per_end * k
    if not (isinstance(tol, (int, float)) and tol > 0):
        msg = f"tol must be a positive float, got {tol!r}"
        raise ValueError(msg)
    if num_steps is not None and max_steps is not None:
        msg = f"give num_steps (a fixed count) or max_steps (a cap on early stopping), not both: {num_steps}, {max_steps}"
        raise ValueError(msg)
    if num_steps is not None:
        _check_int("num_steps", num_steps, low=k_total, high=n, what=f" (k={k}, which={which!r}, n={n})")
        steps, stop = num_steps, None
    else:
        steps = _default_max_steps(k_total, n) if max_steps is None else max_steps
        _check_int("max_steps", steps, low=k_total, high=n, what=f" (k={k}, which={which!r}, n={n})")
        stop = (k, which, float(tol))
    if verbose:
        _print_estimate(objective, params, probe="eigenvalues", k=k, which=which, num_steps=steps,
                        curvature=curvature, filter=filter, linearize=linearize, remat=remat)
    return _eig_impl(
        key, objective, params, k=k, which=which, num_steps=steps, stop=stop, curvature=curvature,
        select=select, vectors=bool(vectors), tol=float(tol), linearize=linearize,
        mode=_mode(params, select, remat),
    )


@functools.partial(
    jax.jit, static_argnames=("num_steps", "stop", "curvature", "select", "linearize", "vectors", "mode")
)
def _lanczos_impl(
    key: Key, objective: Objective, params: Params, *, num_steps: int, stop: tuple | None, curvature: str,
    select: tuple[bool, ...], linearize: bool | None, vectors: bool, mode: _Mode = _PLAIN,
) -> tuple[Array, Array, Array | None, Array, Array, Array, Array]:
    """The compiled part of :func:`eigenvalues`; with a fixed ``num_steps`` it is shared by every
    ``k``, ``which`` and ``tol``. The basis is returned only for ``vectors``: as an output of the
    compiled loop it costs ~15 ms a step on the 301k-parameter MLP (2-core CPU), even unused."""
    prob = _problem(objective, params, select, curvature, mode)
    rule, min_steps = None, 1
    if stop is not None:
        k, which, tol = stop
        rule = functools.partial(_converged, k=k, which=which, tol=tol)
        min_steps = len(_wanted(jnp.asarray(k), k, which))  # no stop before every wanted pair exists
    tri = _lanczos(prob, key, num_steps, linearize, rule, min_steps=min_steps)
    theta, S, resid = lanczos.ritz(tri)
    basis = tri.basis[:num_steps] if vectors else None
    return theta, S, basis, _floor(theta, resid), tri.num_steps, tri.restarts, prob.loss()


def _eig_impl(
    key: Key, objective: Objective, params: Params, *, k: int, which: str, num_steps: int, stop: tuple | None,
    curvature: str, select: tuple[bool, ...], vectors: bool, tol: float, linearize: bool | None,
    mode: _Mode = _PLAIN,
) -> Spectrum:
    theta, S, Q, res, steps, restarts, loss = _lanczos_impl(
        key, objective, params, num_steps=num_steps, stop=stop, curvature=curvature, select=select,
        linearize=linearize, vectors=vectors, mode=mode,
    )
    idx = _wanted(steps, k, which)
    vals, resid = theta[idx], res[idx]
    converged = _converged(theta, res, steps, k=k, which=which, tol=tol) & jnp.isfinite(loss)
    vecs = None
    if vectors:
        embed = _problem(objective, params, select, curvature, mode).embed
        vecs = jax.vmap(embed)(S[:, idx].T @ Q)
    return Spectrum(
        eigenvalues=vals, residuals=resid, eigenvectors=vecs, converged=converged, loss=loss,
        num_matvecs=steps, restarts=restarts, which=which, curvature=curvature,
    )


def power_iteration(
    key: Key,
    objective: Objective,
    params: Params,
    *,
    k: int = 1,
    max_iter: int = 100,
    tol: float = 1e-3,
    curvature: str = "hessian",
    filter: Filter = None,
    linearize: bool | None = None,
    remat: str | None = None,
) -> PowerIterationResult:
    """PyHessian's deflated power iteration (Yao et al., arXiv:1912.07145), for parity.

    For each of ``k`` eigenvalues: a Gaussian start ``v``; repeat at most ``max_iter`` times:
    orthonormalise ``v`` against the eigenvectors found so far (Gram-Schmidt), ``w = C v``,
    ``λ' = vᵀ w``, ``v = w / ‖w‖``; stop when ``|λ − λ'| / (|λ| + 1e-6) < tol`` and report the
    previous estimate ``λ`` (exactly PyHessian ``hessian.eigenvalues``). It finds the eigenvalues
    of largest *magnitude* and is accurate only to about ``tol``; prefer :func:`eigenvalues`.
    ``linearize``, ``remat`` and sharded params as in :func:`eigenvalues`.

    Returns:
        A :class:`PowerIterationResult`.
    """
    select = _prepare(objective, params, curvature, filter)
    n = _num_selected(params, select)
    _check_int("k", k, low=1, high=n, what=f" (the selected parameter count is {n})")
    _check_int("max_iter", max_iter, low=1)
    return _power_impl(
        key, objective, params, k=k, max_iter=max_iter, tol=float(tol), curvature=curvature, select=select,
        linearize=linearize, mode=_mode(params, select, remat),
    )


@functools.partial(jax.jit, static_argnames=("k", "max_iter", "tol", "curvature", "select", "linearize", "mode"))
def _power_impl(
    key: Key, objective: Objective, params: Params, *, k: int, max_iter: int, tol: float,
    curvature: str, select: tuple[bool, ...], linearize: bool | None, mode: _Mode = _PLAIN,
) -> PowerIterationResult:
    prob = _problem(objective, params, select, curvature, mode)
    matvec = prob.operator(linearize)
    dtype = prob.flat.dtype
    found = prob.lift(jnp.zeros((k, prob.size), dtype))
    vals, resids, iters, convs = [], [], [], []
    for i, ki in enumerate(jax.random.split(key, k)):
        v = prob.normal(ki)
        v = v / jnp.linalg.norm(v)
        prev = found[:i]

        def body(state: tuple) -> tuple:
            it, v, eig, _, done, _ = state
            for j in range(i):  # Gram-Schmidt against earlier eigenvectors, as PyHessian
                v = v - jnp.vdot(v, prev[j]) * prev[j]
            v = v / jnp.linalg.norm(v)
            w = matvec(v)
            tmp = jnp.vdot(v, w)
            resid = jnp.linalg.norm(w - tmp * v)
            stop = (it > 0) & (jnp.abs(eig - tmp) / (jnp.abs(eig) + 1e-6) < tol)
            eig = jnp.where(stop, eig, tmp)
            return it + 1, w / jnp.linalg.norm(w), eig, resid, stop, v

        def cond(state: tuple) -> Array:
            it, *_, done, _ = state
            return (it < max_iter) & ~done

        zero = jnp.zeros((), dtype)
        init = (jnp.zeros((), jnp.int32), v, zero, zero, jnp.zeros((), bool), v)
        it, v, eig, resid, done, _ = jax.lax.while_loop(cond, body, init)
        found = found.at[i].set(v)
        vals.append(eig)
        resids.append(resid)
        iters.append(it)
        convs.append(done)
    return PowerIterationResult(
        eigenvalues=jnp.stack(vals), eigenvectors=jax.vmap(prob.embed)(found),
        residuals=jnp.stack(resids), num_iterations=jnp.stack(iters), converged=jnp.stack(convs),
        curvature=curvature,
    )


# ----------------------------------------------------------------------------------------- trace
def trace(
    key: Key,
    objective: Objective,
    params: Params,
    *,
    method: str = "hutchinson",
    num_probes: int = 32,
    curvature: str = "hessian",
    filter: Filter = None,
    probe_chunk: int = 16,
    linearize: bool | None = None,
    remat: str | None = None,
    verbose: bool = False,
) -> TraceResult:
    """Stochastic trace of a curvature matrix with its standard error.

    * ``"hutchinson"`` (Hutchinson 1989): ``tr C ≈ (1/m) Σ_i v_iᵀ C v_i`` with Rademacher
      ``v_i`` — unbiased, variance ``2(‖C‖_F² − Σ C_jj²)/m``; standard error = sample std / √m.
      ``m`` products, evaluated ``probe_chunk`` at a time.
    * ``"xtrace"`` (Epperly, Tropp & Webber, arXiv:2301.07825; matfree's
      ``leave_one_out_xtrace``): exact trace of a rank-``m`` Nyström-type approximation plus a
      Hutchinson correction, averaged over leave-one-out splits; ``2m`` products, much smaller
      error for spectra with a few large eigenvalues. Needs ``m <= n``; with ``2m >= n`` it
      forms the matrix (``n`` products) and the trace is exact.
    * ``"hutchpp"`` (Hutch++, Meyer, Musco, Musco & Woodruff, arXiv:2010.09649, Algorithm 1):
      ``m`` products in all. ``k = ⌊m/3⌋`` Rademacher sketch vectors ``S``, ``Q = qr(C S)``;
      ``g = m − 2k`` Rademacher probes ``G`` projected off ``Q``, ``G' = (I − QQᵀ) G``. Then

      .. math::  \\hat t = \\operatorname{tr}(Qᵀ C Q) + \\tfrac1g \\sum_i g_i'^ᵀ C g_i'

      — exact low-rank part plus Hutchinson on the deflated remainder; unbiased, variance
      ``O(1/m²)`` against Hutchinson's ``O(1/m)`` for spectra dominated by a few large
      eigenvalues, and exact (up to rounding) when ``rank C <= k``. ``samples`` are
      ``tr(QᵀCQ) + g_i'ᵀ C g_i'``; the standard error is their std / √g (conditional on the
      sketch). Needs ``m >= 4`` (a sketch and two probes) and ``k <= n``.

    Params sharded over a mesh (:func:`landscape.sharding.shard_params`): the Hutchinson and
    Hutch++ probes (and the Hutch++ sketch ``Q``) are laid out like the params on the zero-padded
    flat vector — the same probe draws as unsharded. XTrace goes through matfree, whose
    estimator depends on the vector length ``n`` (it ravels its samples into ``(n, m)``), so it
    runs on the unpadded ``n``-vectors and the partitioner chooses their layout.

    Args:
        key: typed PRNG key for the probes.
        objective, params: the loss and the point.
        method: ``"hutchinson"``, ``"xtrace"`` or ``"hutchpp"``.
        num_probes: ``m >= 2`` (``"hutchpp"``: ``m >= 4``, the number of products).
        curvature, filter: as in :func:`eigenvalues`.
        probe_chunk: Hutchinson probes evaluated together (memory vs speed).
        linearize, remat, verbose: as in :func:`eigenvalues`.

    Returns:
        A :class:`TraceResult`; ``finite=False`` on non-finite products or loss.
    """
    select = _prepare(objective, params, curvature, filter)
    _check_choice("method", method, _TRACE_METHODS)
    n = _num_selected(params, select)
    high = {"xtrace": n, "hutchpp": 3 * n}.get(method)
    low = 4 if method == "hutchpp" else 2
    _check_int("num_probes", num_probes, low=low, high=high, what=f" (n={n}, method={method!r})")
    _check_int("probe_chunk", probe_chunk, low=1)
    if verbose:
        _print_estimate(objective, params, probe="trace", method=method, num_probes=num_probes,
                        curvature=curvature, filter=filter, linearize=linearize, remat=remat)
    return _trace_impl(
        key, objective, params, method=method, num_probes=num_probes, curvature=curvature,
        select=select, probe_chunk=min(probe_chunk, num_probes), linearize=linearize,
        mode=_mode(params, select, remat),
    )


def _hutchpp(
    key: Key, matvec: Callable[[Array], Array], lift: Callable[[Array], Array], n: int, dtype: Any, m: int,
    chunk: int,
) -> tuple[Array, Array]:
    """Hutch++ (arXiv:2010.09649, Alg. 1) with ``m`` products: ``(samples (g,), low-rank trace)``.

    ``lift`` maps ``(..., n)`` vectors to the operator's layout (identity, or the zero-padded
    sharded flat vector); the sketch and probes are drawn on the ``n`` real entries.
    """
    k = m // 3
    g = m - 2 * k
    k_s, k_g = jax.random.split(key)
    sketch = lift(jax.random.rademacher(k_s, (k, n), dtype))
    probes = lift(jax.random.rademacher(k_g, (g, n), dtype))
    y = jax.lax.map(matvec, sketch, batch_size=min(chunk, k))  # (k, n): rows C s_j
    q, _ = jnp.linalg.qr(y.T)  # (n, k); zero rows stay zero on padding (Householder)
    qt = lift(q.T)
    low = jnp.sum(qt * jax.lax.map(matvec, qt, batch_size=min(chunk, k)))
    deflated = probes - (probes @ qt.T) @ qt  # (I − QQᵀ) g_i as rows
    forms = jnp.sum(deflated * jax.lax.map(matvec, deflated, batch_size=min(chunk, g)), axis=-1)
    return low + forms, low


@functools.partial(
    jax.jit, static_argnames=("method", "num_probes", "curvature", "select", "probe_chunk", "linearize", "mode")
)
def _trace_impl(
    key: Key, objective: Objective, params: Params, *, method: str, num_probes: int, curvature: str,
    select: tuple[bool, ...], probe_chunk: int, linearize: bool | None, mode: _Mode = _PLAIN,
) -> TraceResult:
    prob = _problem(objective, params, select, curvature, mode)
    matvec = prob.operator(linearize)
    n = prob.size
    template = jnp.zeros((n,), prob.flat.dtype)  # probes are drawn on the n real entries
    if method == "hutchinson":
        integrand = stochtrace.monte_carlo_trace()
        probes = prob.lift(stochtrace.sampler_signs(template, num=num_probes)(key))
        samples = jax.lax.map(lambda v: integrand(matvec, v), probes, batch_size=probe_chunk)
        est = jnp.mean(samples)
        se = jnp.std(samples, ddof=1) / jnp.sqrt(num_probes)
        used = num_probes
    elif method == "hutchpp":
        samples, _ = _hutchpp(key, matvec, prob.lift, n, prob.flat.dtype, num_probes, probe_chunk)
        est = jnp.mean(samples)
        se = jnp.std(samples, ddof=1) / jnp.sqrt(samples.shape[0])
        used = num_probes
    else:
        integrand = stochtrace.leave_one_out_xtrace()
        probes = stochtrace.sampler_sphere(template, num=num_probes)(key)
        samples = integrand(lambda u: prob.unlift(matvec(prob.lift(u))), probes)
        est = jnp.mean(samples)
        se = jnp.std(samples) / jnp.sqrt(num_probes)
        used = n if 2 * num_probes >= n else 2 * num_probes
    loss = prob.loss()
    finite = jnp.isfinite(est) & jnp.isfinite(se) & jnp.isfinite(loss)
    return TraceResult(
        estimate=est, stderr=se, samples=samples, finite=finite, num_matvecs=used, method=method,
        curvature=curvature,
    )


# --------------------------------------------------------------------------------------- density
def density(
    key: Key,
    objective: Objective,
    params: Params,
    *,
    num_probes: int = 1,
    num_steps: int = 100,
    grid: int | Array = 1000,
    sigma: float | None = None,
    curvature: str = "hessian",
    filter: Filter = None,
    negative_tol: float = 1e-3,
    reorthogonalize: bool = True,
    linearize: bool | None = None,
    remat: str | None = None,
    verbose: bool = False,
) -> DensityResult:
    """Spectral density by stochastic Lanczos quadrature (Ghorbani et al., arXiv:1901.10159).

    For each of ``num_probes`` normalised Rademacher probes, ``num_steps`` Lanczos steps with full
    reorthogonalisation give ``T = S diag(θ) Sᵀ``; nodes ``θ`` and weights ``S_{0j}²`` form a
    Gauss quadrature of the spectral measure. The density on the grid is
    ``φ(x) = mean_p Σ_j w_pj N(x; θ_pj, σ²)``.

    Args:
        key: typed PRNG key for the probes.
        objective, params: the loss and the point.
        num_probes: independent probes (PyHessian ``n_v``).
        num_steps: Lanczos steps per probe (PyHessian ``iter``), ``1 <= num_steps <= n``.
        grid: number of grid points (spanning the nodes with a margin) or an explicit 1-D grid.
        sigma: Gaussian width; default PyHessian's ``√(1e-5 · max(1, θmax − θmin))``, widened to
            two grid spacings so the density is resolved on the grid.
        curvature, filter: as in :func:`eigenvalues`.
        negative_tol: nodes below ``−negative_tol · max|θ|`` count as negative mass (0: strictly
            below zero).
        reorthogonalize: full reorthogonalisation (default, as PyHessian). ``False`` keeps the
            plain three-term recurrence: cheaper per step, and the quadrature stays valid (ghost
            copies of converged nodes split their weight; Knizhnerman 1996, Ubaru, Chen & Saad
            2017), but single nodes no longer stand for single eigenvalues.
        linearize, remat, verbose: as in :func:`eigenvalues` (sharded params: each probe's Lanczos basis
            is sharded like them, and the probes are the same draws as unsharded).

    Returns:
        A :class:`DensityResult` (``.plot()`` draws the log-scale density).
    """
    select = _prepare(objective, params, curvature, filter)
    n = _num_selected(params, select)
    _check_int("num_probes", num_probes, low=1)
    _check_int("num_steps", num_steps, low=1, high=n, what=f" (the selected parameter count is {n})")
    if isinstance(grid, int):
        _check_int("grid", grid, low=2)
        grid_arg = None
        num_grid = grid
    else:
        grid_arg = jnp.asarray(grid)
        if grid_arg.ndim != 1 or grid_arg.shape[0] < 2:
            msg = f"grid must be an int >= 2 or a 1-D array of >= 2 points, got shape {grid_arg.shape}"
            raise ValueError(msg)
        num_grid = int(grid_arg.shape[0])
    if sigma is not None and not (isinstance(sigma, (int, float)) and sigma > 0):
        msg = f"sigma must be a positive float or None, got {sigma!r}"
        raise ValueError(msg)
    if not (isinstance(negative_tol, (int, float)) and negative_tol >= 0):
        msg = f"negative_tol must be a float >= 0, got {negative_tol!r}"
        raise ValueError(msg)
    if verbose:
        _print_estimate(objective, params, probe="density", num_steps=num_steps, num_probes=num_probes,
                        curvature=curvature, filter=filter, linearize=linearize, remat=remat)
    return _density_impl(
        key, objective, params, grid_arg, sigma=None if sigma is None else float(sigma),
        negative_tol=float(negative_tol),
        num_probes=num_probes, num_steps=num_steps, num_grid=num_grid, curvature=curvature, select=select,
        reorthogonalize=bool(reorthogonalize), linearize=linearize, mode=_mode(params, select, remat),
    )


def _slq(
    prob: _Problem, key: Key, num_probes: int, num_steps: int, reorthogonalize: bool, linearize: bool | None
) -> tuple[Array, Array]:
    k_probes, k_restart = jax.random.split(key)
    template = jnp.zeros((prob.size,), prob.flat.dtype)
    probes = prob.lift(stochtrace.sampler_signs(template, num=num_probes)(k_probes))
    matvec = prob.operator(linearize)
    support = prob.support

    def one(args: tuple[Array, Array]) -> tuple[Array, Array]:
        v, kr = args
        tri = lanczos.tridiagonalize(
            kr, matvec, v, num_steps, reorthogonalize=reorthogonalize, support=support
        )
        theta, S, _ = lanczos.ritz(tri)
        return theta, S[0, :] ** 2

    args = (probes, jax.random.split(k_restart, num_probes))
    if num_probes == 1:  # a lax.map around the Lanczos loop costs ~15% on CPU; vmap would run
        # both branches of its conditionals (restart, second Gram-Schmidt pass) at every step
        return jax.tree.map(lambda a: a[None], one(jax.tree.map(lambda a: a[0], args)))
    return jax.lax.map(one, args)


@functools.partial(
    jax.jit,
    static_argnames=(
        "sigma", "negative_tol", "num_probes", "num_steps", "num_grid", "curvature", "select", "reorthogonalize",
        "linearize", "mode",
    ),
)
def _density_impl(
    key: Key, objective: Objective, params: Params, grid: Array | None, *, sigma: float | None, negative_tol: float,
    num_probes: int, num_steps: int, num_grid: int, curvature: str, select: tuple[bool, ...], reorthogonalize: bool,
    linearize: bool | None, mode: _Mode = _PLAIN,
) -> DensityResult:
    prob = _problem(objective, params, select, curvature, mode)
    nodes, weights = _slq(prob, key, num_probes, num_steps, reorthogonalize, linearize)
    lo, hi = jnp.min(nodes), jnp.max(nodes)
    span = hi - lo
    sigma0 = jnp.sqrt(1e-5 * jnp.maximum(1.0, span))
    if grid is None:
        pad = 0.05 * span + 4 * (sigma0 if sigma is None else sigma)
        grid = jnp.linspace(lo - pad, hi + pad, num_grid).astype(nodes.dtype)
    if sigma is None:
        spacing = (grid[-1] - grid[0]) / (num_grid - 1)
        sig = jnp.maximum(sigma0, 2 * spacing)
    else:
        sig = jnp.asarray(sigma, nodes.dtype)
    z = (grid[:, None, None] - nodes[None]) / sig
    dens = jnp.sum(weights[None] * jnp.exp(-0.5 * z**2), axis=-1).mean(axis=-1) / (sig * jnp.sqrt(2 * jnp.pi))
    below = nodes < -negative_tol * jnp.max(jnp.abs(nodes))
    neg = jnp.mean(jnp.sum(jnp.where(below, weights, jnp.zeros_like(weights)), axis=-1))
    finite = jnp.all(jnp.isfinite(nodes)) & jnp.isfinite(prob.loss())
    return DensityResult(
        nodes=nodes, weights=weights, grid=grid, density=dens, sigma=sig, negative_mass=neg,
        finite=finite, dim=prob.size, curvature=curvature,
    )


# ------------------------------------------------------------------------------------- per layer
def layer_groups(params: Params) -> dict[str, tuple[str, ...]]:
    """Group leaf names by their parent key path: ``{"layers/0": ("layers/0/bias", ...)}``.

    A leaf at the root forms its own group.
    """
    groups: dict[str, list[str]] = {}
    for name, _ in tree.named_leaves(params):
        parent = name.rsplit("/", 1)[0] if "/" in name else name
        groups.setdefault(parent, []).append(name)
    return {g: tuple(v) for g, v in groups.items()}


def per_layer(
    key: Key,
    objective: Objective,
    params: Params,
    *,
    num_steps: int = 30,
    num_probes: int = 32,
    curvature: str = "hessian",
    groups: dict[str, Sequence[str]] | None = None,
    probe_chunk: int = 16,
    linearize: bool | None = None,
) -> PerLayerResult:
    """Each layer's top eigenvalue and trace of its diagonal block ``C_SS``, in one compiled call.

    Layers are groups of leaves sharing a parent key path (:func:`layer_groups`), or ``groups``
    mapping a name to leaf names. Top eigenvalues: Lanczos on each block (``min(num_steps, n_S)``
    steps). Traces: one Hutchinson run with full-length Rademacher probes ``v``, whose block
    quadratic forms ``v_Sᵀ (C v)_S`` are unbiased for every ``tr C_SS`` at once (``num_probes``
    products in total, not per layer). ``linearize`` as in :func:`eigenvalues`.

    Returns:
        A :class:`PerLayerResult`.
    """
    _prepare(objective, params, curvature, None)
    named = [name for name, _ in tree.named_leaves(params)]
    groups = layer_groups(params) if groups is None else {g: tuple(v) for g, v in groups.items()}
    if not groups:
        msg = "groups is empty; give at least one layer"
        raise ValueError(msg)
    masks = []
    for g, members in groups.items():
        unknown = [m for m in members if m not in named]
        if unknown or not members:
            msg = f"layer {g!r} names unknown leaves {unknown or '(none)'}; leaf names are {named}"
            raise ValueError(msg)
        masks.append(tuple(n in members for n in named))
    _check_int("num_steps", num_steps, low=1)
    _check_int("num_probes", num_probes, low=2)
    _check_int("probe_chunk", probe_chunk, low=1)
    sizes = tuple(_num_selected(params, m) for m in masks)
    top, res, tr, se = _per_layer_impl(
        key, objective, params, masks=tuple(masks), num_steps=num_steps, num_probes=num_probes,
        curvature=curvature, probe_chunk=min(probe_chunk, num_probes), linearize=linearize,
    )
    return PerLayerResult(
        names=tuple(groups), sizes=sizes, top=top, residuals=res, trace=tr, trace_stderr=se, curvature=curvature
    )


@functools.partial(
    jax.jit, static_argnames=("masks", "num_steps", "num_probes", "curvature", "probe_chunk", "linearize")
)
def _per_layer_impl(
    key: Key, objective: Objective, params: Params, *, masks: tuple[tuple[bool, ...], ...], num_steps: int,
    num_probes: int, curvature: str, probe_chunk: int, linearize: bool | None,
) -> tuple[Array, Array, Array, Array]:
    keys = jax.random.split(key, len(masks) + 1)
    tops, resids = [], []
    for mask, kk in zip(masks, keys[1:]):
        prob = _problem(objective, params, mask, curvature)
        tri = _lanczos(prob, kk, min(num_steps, int(prob.flat.shape[0])), linearize)
        theta, _, resid = lanczos.ritz(tri)
        top = tri.num_steps - 1
        tops.append(theta[top])
        resids.append(_floor(theta, resid)[top])
    full = _problem(objective, params, (True,) * len(masks[0]), curvature)
    matvec = full.operator(linearize)
    leaf_sizes = [int(np.prod(jnp.shape(x))) for x in jax.tree.leaves(params)]
    seg = np.repeat(np.arange(len(leaf_sizes)), leaf_sizes)  # flat index -> leaf index
    member = np.array([[m[j] for j in seg] for m in masks], dtype=bool)  # (L, n)
    probes = stochtrace.sampler_signs(full.flat, num=num_probes)(keys[0])
    forms = jax.lax.map(
        lambda v: jnp.asarray(member, v.dtype) @ (v * matvec(v)), probes, batch_size=probe_chunk
    )  # (m, L)
    tr = jnp.mean(forms, axis=0)
    se = jnp.std(forms, axis=0, ddof=1) / jnp.sqrt(num_probes)
    return jnp.stack(tops), jnp.stack(resids), tr, se


# ------------------------------------------------------------------------------------ along path
def along_path(
    key: Key,
    objective: Objective,
    path_fn: Callable[[Array], Params],
    ts: Array | Sequence[float],
    *,
    k: int = 1,
    num_steps: int | None = None,
    num_probes: int = 16,
    method: str = "hutchinson",
    curvature: str = "hessian",
    filter: Filter = None,
    linearize: bool | None = None,
    remat: str | None = None,
) -> PathCurvature:
    """Top eigenvalues and trace at points ``θ(t)`` of any path ``t -> params``.

    A linear path is ``lambda t: landscape.tree.lerp(a, b, t)``; a curve from ``probes.paths``
    works the same. Each point reuses the same compiled Lanczos and trace estimators (one
    compilation per setting), with independent keys ``fold_in(key, i)``.

    Returns:
        A :class:`PathCurvature` (``.plot()``: loss, top eigenvalue and trace against t).
    """
    if not callable(path_fn):
        msg = f"path_fn must be a callable t -> params, got {type(path_fn).__name__}"
        raise ValueError(msg)
    ts_arr = np.asarray(ts, dtype=float).reshape(-1)
    if ts_arr.size == 0:
        msg = "ts is empty; give at least one path position"
        raise ValueError(msg)
    tops, res, tr, se, loss, conv = [], [], [], [], [], []
    for i, t in enumerate(ts_arr):
        p = path_fn(jnp.asarray(t))
        ki = jax.random.fold_in(key, i)
        k1, k2 = jax.random.split(ki)
        spec = eigenvalues(
            k1, objective, p, k=k, which="top", num_steps=num_steps, curvature=curvature, filter=filter,
            linearize=linearize, remat=remat,
        )
        est = trace(
            k2, objective, p, method=method, num_probes=num_probes, curvature=curvature, filter=filter,
            linearize=linearize, remat=remat,
        )
        tops.append(spec.eigenvalues)
        res.append(spec.residuals)
        tr.append(est.estimate)
        se.append(est.stderr)
        loss.append(spec.loss)
        conv.append(spec.converged)
    return PathCurvature(
        ts=jnp.asarray(ts_arr), loss=jnp.stack(loss), top=jnp.stack(tops), residuals=jnp.stack(res),
        trace=jnp.stack(tr), trace_stderr=jnp.stack(se), converged=jnp.stack(conv), curvature=curvature,
    )


# --------------------------------------------------------------------------------------- summary
def summary(key: Key, objective: Objective, params: Params, *, quick: bool = True) -> dict[str, Any]:
    """JSON-safe curvature summary of one model for the batch report.

    ``quick=True``: top-3 Hessian eigenvalues (30 Lanczos steps), Hutchinson trace with 16
    probes, SLQ density with 1 probe × 40 steps on 200 grid points. ``quick=False``: top-10 (60
    steps), XTrace with 64 probes, 4 probes × 100 steps on 500 points, and per-layer results.

    Returns:
        ``{"top": Spectrum.to_dict(), "trace": ..., "density": ..., ["per_layer": ...]}``.
    """
    _check_objective(objective)
    _check_params(params)
    n = tree.num_params(params)
    k1, k2, k3, k4 = jax.random.split(key, 4)
    if quick:
        k, steps, probes, method, d_probes, d_steps, d_grid = 3, 30, 16, "hutchinson", 1, 40, 200
    else:
        k, steps, probes, method, d_probes, d_steps, d_grid = 10, 60, 64, "xtrace", 4, 100, 500
    k = min(k, n)
    spec = eigenvalues(k1, objective, params, k=k, num_steps=min(steps, n))
    est = trace(k2, objective, params, method=method, num_probes=min(probes, max(2, n // 2)))
    dens = density(k3, objective, params, num_probes=d_probes, num_steps=min(d_steps, n), grid=d_grid)
    dens_dict = dens.to_dict()
    out = {
        "num_params": n,
        "top": spec.to_dict(),
        "trace": est.to_dict(),
        "density": {key_: dens_dict[key_] for key_ in ("grid", "density", "sigma", "negative_mass", "finite")}
        | {"nodes": dens_dict["nodes"], "weights": dens_dict["weights"], "trace": _json(dens.trace)},
    }
    if not quick:
        out["per_layer"] = per_layer(k4, objective, params, num_probes=probes).to_dict()
    return out
