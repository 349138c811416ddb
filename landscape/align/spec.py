"""Permutation specs: which axes of which parameters a hidden-unit permutation acts on.

A feed-forward network computes the same function after its hidden units are relabelled: permuting
the output units of one layer (the columns of its kernel, its bias, its norm's scale and bias) and
the input units of the next layer (the rows of its kernel) by the same permutation ``P`` leaves the
logits unchanged, :math:`W_2 P^\\top \\sigma(P W_1 x + P b_1) = W_2 \\sigma(W_1 x + b_1)`
(Hecht-Nielsen 1990; Entezari et al., arXiv:2110.06296; Ainsworth et al., Git Re-Basin,
arXiv:2209.04836). A :class:`PermutationSpec` records this bookkeeping once per architecture, as in
git-re-basin's ``axes_to_perm``: every parameter's key path (as written by
:func:`landscape.tree.key_name`, e.g. ``"layers/0/kernel"``) maps to one permutation name, or
``None``, per axis. A permutation is a plain dict ``name -> int array``, a pytree, so it can be
vmapped, stacked and saved like params.

Convention (git-re-basin's ``take(B, perm, axis)``): applying ``perm`` gives the new unit ``i`` the
old unit ``perm[name][i]`` along every axis tagged ``name``:

.. math::  \\pi(\\theta)[k]_{\\ldots, i, \\ldots} = \\theta[k]_{\\ldots, p_{\\text{name}}[i], \\ldots}

:func:`apply` is the only place in the toolkit that permutes; matchers return permutations and
call it. Non-trainable state (BatchNorm running mean / variance) has its own entries,
``state_axes``, applied with :func:`apply_state`.

Example:
    >>> import jax, jax.numpy as jnp
    >>> from landscape import align
    >>> spec = align.PermutationSpec(
    ...     {"w1": (None, "h"), "b1": ("h",), "w2": ("h", None), "b2": (None,)})
    >>> params = {"w1": jnp.ones((3, 4)), "b1": jnp.arange(4.0), "w2": jnp.ones((4, 2)),
    ...           "b2": jnp.zeros(2)}
    >>> perm = {"h": jnp.array([3, 2, 1, 0])}
    >>> align.apply(spec, perm, params)["b1"].tolist()
    [3.0, 2.0, 1.0, 0.0]
    >>> spec.sizes(params)
    {'h': 4}
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from types import MappingProxyType
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from landscape._types import Array, Key, Params
from landscape.tree import key_name, named_leaves

__all__ = [
    "Permutation",
    "PermutationSpec",
    "apply",
    "apply_state",
    "check_permutation",
    "check_spec",
    "compose",
    "identity",
    "invert",
    "random_permutation",
]

Permutation = dict[str, Array]
"""A permutation of every hidden-unit group: ``{name: int array of shape (size,)}``."""

_PARTS = ("params", "state")


def _freeze(table: Mapping[str, Any], what: str) -> Mapping[str, tuple[str | None, ...]]:
    if not isinstance(table, Mapping):
        msg = f"PermutationSpec.{what} must be a mapping path -> tuple of names, got {type(table).__name__}"
        raise ValueError(msg)
    out: dict[str, tuple[str | None, ...]] = {}
    for path, names in table.items():
        if not isinstance(path, str):
            msg = f"PermutationSpec.{what} keys must be key-path strings like 'layers/0/kernel', got {path!r}"
            raise ValueError(msg)
        if isinstance(names, str) or not isinstance(names, (tuple, list)):
            msg = (
                f"PermutationSpec.{what}[{path!r}] must be a tuple with one permutation name (str) or "
                f"None per axis, got {names!r}"
            )
            raise ValueError(msg)
        for n in names:
            if n is not None and not isinstance(n, str):
                msg = f"PermutationSpec.{what}[{path!r}] has {n!r}; accepted: a str name or None"
                raise ValueError(msg)
        out[path] = tuple(names)
    return MappingProxyType(dict(sorted(out.items())))


@dataclasses.dataclass(frozen=True, init=False)
class PermutationSpec:
    """Which permutation acts on which axis of every parameter (and state) leaf.

    Args:
        axes: ``{key path: (name | None, ...)}`` with one entry per parameter leaf and one name per
            axis of that leaf. Leaves whose axes are all ``None`` must still be listed, so that a
            spec and a params tree can be checked against each other.
        state_axes: the same for non-trainable state (BatchNorm ``mean`` / ``var``); ``{}`` when
            the model has none. Every name used here must also be used in ``axes``.

    The spec is immutable and hashable (usable as a static argument of ``jax.jit``).

    Attributes:
        names: the permutation names, sorted.
        perm_to_axes: ``{name: ((path, axis), ...)}`` over the parameters, the inverse map that
            weight matching sums over.
    """

    axes: Mapping[str, tuple[str | None, ...]]
    state_axes: Mapping[str, tuple[str | None, ...]]

    def __init__(
        self,
        axes: Mapping[str, tuple[str | None, ...]],
        state_axes: Mapping[str, tuple[str | None, ...]] | None = None,
    ) -> None:
        frozen = _freeze(axes, "axes")
        frozen_state = _freeze({} if state_axes is None else state_axes, "state_axes")
        param_names = {n for names in frozen.values() for n in names if n is not None}
        for path, names in frozen_state.items():
            for n in names:
                if n is not None and n not in param_names:
                    msg = (
                        f"PermutationSpec.state_axes[{path!r}] uses permutation {n!r} that no "
                        f"parameter uses; parameter permutations: {sorted(param_names)}"
                    )
                    raise ValueError(msg)
        object.__setattr__(self, "axes", frozen)
        object.__setattr__(self, "state_axes", frozen_state)

    def __hash__(self) -> int:
        return hash((tuple(self.axes.items()), tuple(self.state_axes.items())))

    def __repr__(self) -> str:
        return f"PermutationSpec(axes={dict(self.axes)}, state_axes={dict(self.state_axes)})"

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, PermutationSpec):
            return NotImplemented
        return dict(self.axes) == dict(other.axes) and dict(self.state_axes) == dict(other.state_axes)

    @property
    def names(self) -> tuple[str, ...]:
        """All permutation names, sorted."""
        return tuple(sorted({n for names in self.axes.values() for n in names if n is not None}))

    @property
    def perm_to_axes(self) -> dict[str, tuple[tuple[str, int], ...]]:
        """``{name: ((param path, axis), ...)}``: where each permutation acts among the params."""
        out: dict[str, list[tuple[str, int]]] = {n: [] for n in self.names}
        for path, names in self.axes.items():
            for ax, n in enumerate(names):
                if n is not None:
                    out[n].append((path, ax))
        return {n: tuple(v) for n, v in out.items()}

    def sizes(self, params: Params) -> dict[str, int]:
        """``{name: number of units}`` read off ``params`` (after :func:`check_spec`)."""
        check_spec(self, params)
        leaves = dict(named_leaves(params))
        return {n: int(jnp.shape(leaves[p])[ax]) for n, ((p, ax), *_) in self.perm_to_axes.items()}

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe form: ``{"axes": {path: [name|None, ...]}, "state_axes": {...}}``."""
        return {
            "axes": {k: list(v) for k, v in self.axes.items()},
            "state_axes": {k: list(v) for k, v in self.state_axes.items()},
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> PermutationSpec:
        """Inverse of :meth:`to_dict`."""
        return cls(data["axes"], data.get("state_axes", {}))


def check_spec(
    spec: PermutationSpec,
    tree: Params,
    *,
    part: str = "params",
    apply_fn: Any = None,
    x: Any = None,
    state: Params | None = None,
    key: Key | None = None,
    rtol: float = 1e-4,
    atol: float = 1e-6,
) -> None:
    """Raise ``ValueError`` unless ``spec`` describes ``tree`` exactly (and, given ``apply_fn``, its function).

    Checks, naming the offending key path: every spec entry has a leaf; every leaf has a spec
    entry; each entry has one name per axis of its leaf; and all axes sharing a permutation name
    have the same size. Only static shapes are read, so this is free inside ``jax.jit``.

    With ``apply_fn`` and a batch ``x`` it also checks the function (on the host, not jittable):
    a random permutation ``π`` under the spec (no group left at the identity) must leave the
    outputs unchanged, :math:`\\max|f(π θ) - f(θ)| \\le \\text{atol} + \\text{rtol} \\cdot
    \\max|f(θ)|` — float32 reassociation stays far below ``rtol = 1e-4`` of the output scale, a wrong
    spec (e.g. the two axes of a square kernel swapped) moves the outputs by O(1) of it. This
    catches a spec that fits the shapes but not the model before any matching work.

    Args:
        spec: the permutation spec.
        tree: a params tree (``part="params"``, checked against ``spec.axes``) or a state tree
            (``part="state"``, checked against ``spec.state_axes``).
        part: ``"params"`` or ``"state"``.
        apply_fn: ``apply_fn(params, x)`` (``apply_fn(params, state, x)`` when ``state`` is given;
            a zoo ``FunctionalModel`` uses its own state by default), as in
            :func:`landscape.align.trace_spec`. Only with ``part="params"``.
        x: a batch of inputs for the functional check.
        state: non-trainable state, permuted with ``spec.state_axes``.
        key: PRNG key of the random permutation (default ``jax.random.key(0)``).
        rtol: tolerance relative to the largest output magnitude.
        atol: absolute tolerance.
    """
    if apply_fn is not None:
        _check_function(spec, tree, apply_fn=apply_fn, x=x, state=state, key=key, rtol=rtol, atol=atol, part=part)
        return
    if not isinstance(spec, PermutationSpec):
        msg = f"spec must be a PermutationSpec, got {type(spec).__name__}"
        raise ValueError(msg)
    if part not in _PARTS:
        msg = f"unknown part {part!r}; accepted: {list(_PARTS)}"
        raise ValueError(msg)
    table = spec.axes if part == "params" else spec.state_axes
    leaves = dict(named_leaves(tree))
    if part == "state" and not table and not leaves:
        return
    for path in table:
        if path not in leaves:
            msg = (
                f"spec entry {path!r} has no matching {part} leaf; the {part} have: "
                f"{sorted(leaves)}"
            )
            raise ValueError(msg)
    seen: dict[str, tuple[int, str, int]] = {}
    for path, leaf in leaves.items():
        if path not in table:
            msg = (
                f"{part} leaf {path!r} (shape {tuple(jnp.shape(leaf))}) is missing from the "
                f"permutation spec; add it with one name or None per axis"
            )
            raise ValueError(msg)
        shape = tuple(jnp.shape(leaf))
        names = table[path]
        if len(names) != len(shape):
            msg = (
                f"spec entry {path!r} gives {len(names)} axes {names} but the {part} leaf has "
                f"shape {shape} ({len(shape)} axes)"
            )
            raise ValueError(msg)
        for ax, n in enumerate(names):
            if n is None:
                continue
            if n in seen and seen[n][0] != shape[ax]:
                size0, path0, ax0 = seen[n]
                msg = (
                    f"permutation {n!r} has size {size0} at {path0!r} axis {ax0} but size "
                    f"{shape[ax]} at {path!r} axis {ax}"
                )
                raise ValueError(msg)
            seen.setdefault(n, (shape[ax], path, ax))


def _check_function(
    spec: PermutationSpec,
    params: Params,
    *,
    apply_fn: Any,
    x: Any,
    state: Params | None,
    key: Key | None,
    rtol: float,
    atol: float,
    part: str,
) -> None:
    """The functional half of :func:`check_spec`: permuted params must compute the same outputs."""
    from landscape.align.trace import _call_parts

    if part != "params":
        msg = f"check_spec(apply_fn=...) checks params, got part={part!r}"
        raise ValueError(msg)
    if x is None:
        msg = "check_spec(apply_fn=...) needs x=, a batch of inputs to compare the outputs on"
        raise ValueError(msg)
    if not (rtol >= 0 and atol >= 0):
        msg = f"rtol and atol must be >= 0, got rtol={rtol!r}, atol={atol!r}"
        raise ValueError(msg)
    check_spec(spec, params)
    fn, state = _call_parts(apply_fn, state)
    state_tree = {} if state is None else state
    if state is not None:
        check_spec(spec, state_tree, part="state")
    key = jax.random.key(0) if key is None else key
    perm = random_permutation(key, spec, params)
    perm = {
        n: (jnp.roll(p, 1) if p.shape[0] > 1 and bool(jnp.all(p == jnp.arange(p.shape[0]))) else p)
        for n, p in perm.items()
    }
    permuted = apply(spec, perm, params)
    permuted_state = apply_state(spec, perm, state_tree) if state is not None else state_tree
    name = getattr(apply_fn, "__qualname__", type(apply_fn).__name__)
    try:
        before = jax.tree.leaves(fn(params, state_tree, x))
        after = jax.tree.leaves(fn(permuted, permuted_state, x))
    except Exception as err:  # noqa: BLE001 - re-raised with context
        msg = f"check_spec: apply_fn {name} fails on params and x of shape {jax.tree.map(jnp.shape, x)}: {err}"
        raise ValueError(msg) from err
    ref = [np.asarray(a, np.float64) for a in before]
    new = [np.asarray(b, np.float64) for b in after]
    if not all(np.all(np.isfinite(a)) for a in ref):
        msg = f"check_spec: apply_fn {name} gives non-finite outputs on x; cannot check the spec"
        raise ValueError(msg)
    scale = max((float(np.max(np.abs(a))) for a in ref if a.size), default=0.0)
    delta = max((float(np.max(np.abs(a - b))) if a.size else 0.0 for a, b in zip(ref, new)), default=0.0)
    tol = atol + rtol * scale
    if not delta <= tol:
        msg = (
            f"spec does not describe apply_fn {name}: a random permutation under the spec changes "
            f"the outputs by max |Δoutput| = {delta:.4g} (max |output| = {scale:.4g}, tolerance "
            f"{tol:.3g} = atol {atol:g} + rtol {rtol:g} · max |output|); derive the spec with "
            f"align.trace_spec(apply_fn, params, x)"
        )
        raise ValueError(msg)


def check_permutation(perm: Permutation, *, names: tuple[str, ...] | None = None) -> None:
    """Raise ``ValueError`` unless ``perm`` is a dict of 1-D integer arrays (with keys ``names``),
    each a permutation of ``0 … n−1``.

    Shapes and dtypes are always checked. The values (no duplicate, none out of range) are checked
    when they are concrete; under ``jax.jit`` / ``jax.vmap`` they are tracers and that check is
    skipped, so a traced index array that is not a permutation is the caller's responsibility
    (``jnp.take`` would clip it silently).
    """
    if not isinstance(perm, Mapping):
        msg = f"a permutation must be a dict name -> int array, got {type(perm).__name__}"
        raise ValueError(msg)
    for n, p in perm.items():
        if jnp.ndim(p) != 1 or not jnp.issubdtype(jnp.result_type(p), jnp.integer):
            msg = (
                f"permutation {n!r} must be a 1-D integer array, got shape {jnp.shape(p)} and "
                f"dtype {jnp.result_type(p)}"
            )
            raise ValueError(msg)
        if not isinstance(p, jax.core.Tracer):
            arr = np.asarray(p)
            size = arr.shape[0]
            if not np.array_equal(np.sort(arr), np.arange(size)):
                out = arr[(arr < 0) | (arr >= size)]
                vals, counts = np.unique(arr, return_counts=True)
                dup = vals[counts > 1]
                msg = (
                    f"permutation {n!r} is not a permutation of 0..{size - 1}: "
                    f"out of range {out[:5].tolist()}, repeated {dup[:5].tolist()}"
                )
                raise ValueError(msg)
    if names is not None and set(perm) != set(names):
        missing = sorted(set(names) - set(perm))
        extra = sorted(set(perm) - set(names))
        msg = (
            f"permutation names do not match the spec: missing {missing}, unexpected {extra}; "
            f"the spec uses {list(names)}"
        )
        raise ValueError(msg)


def _check_sizes(spec_sizes: dict[str, int], perm: Permutation) -> None:
    for n, size in spec_sizes.items():
        if jnp.shape(perm[n]) != (size,):
            msg = f"permutation {n!r} has shape {jnp.shape(perm[n])} but the model has {size} units there"
            raise ValueError(msg)


def _sizes_of(table: Mapping[str, tuple[str | None, ...]], tree: Params) -> dict[str, int]:
    leaves = dict(named_leaves(tree))
    out: dict[str, int] = {}
    for path, names in table.items():
        for ax, n in enumerate(names):
            if n is not None:
                out.setdefault(n, int(jnp.shape(leaves[path])[ax]))
    return out


def _permute(table: Mapping[str, tuple[str | None, ...]], perm: Permutation, tree: Params) -> Params:
    def one(path: Any, x: Array) -> Array:
        for ax, n in enumerate(table[key_name(path)]):
            if n is not None:
                x = jnp.take(x, perm[n], axis=ax)
        return x

    return jax.tree.map_with_path(one, tree)


def apply(spec: PermutationSpec, perm: Permutation, params: Params) -> Params:
    """Permute ``params``: along every axis tagged ``name``, new unit ``i`` is old unit ``perm[name][i]``.

    ``apply(spec, perm, θ)`` computes the same function as ``θ`` for any ``perm`` when ``spec``
    is the model's spec. Checks :func:`check_spec` and the permutation's names and sizes first;
    jittable and vmappable over stacked permutations or params.

    Args:
        spec: the model's permutation spec.
        perm: ``{name: int array (size,)}`` with exactly the names of ``spec.names``.
        params: the params tree described by ``spec.axes``.

    Returns:
        The permuted params, same structure, shapes and dtypes.
    """
    check_spec(spec, params)
    check_permutation(perm, names=spec.names)
    _check_sizes(_sizes_of(spec.axes, params), perm)
    return _permute(spec.axes, perm, params)


def apply_state(spec: PermutationSpec, perm: Permutation, state: Params) -> Params:
    """Permute non-trainable state (BatchNorm running statistics) with ``spec.state_axes``.

    Same convention as :func:`apply`; ``perm`` must contain (at least) every name that
    ``spec.state_axes`` uses. ``apply_state(spec, perm, {})`` returns ``{}``.
    """
    check_spec(spec, state, part="state")
    check_permutation(perm)
    used = {n for names in spec.state_axes.values() for n in names if n is not None}
    missing = sorted(used - set(perm))
    if missing:
        msg = f"permutation lacks {missing} that the spec's state entries use; it has {sorted(perm)}"
        raise ValueError(msg)
    _check_sizes(_sizes_of(spec.state_axes, state), perm)
    return _permute(spec.state_axes, perm, state)


def invert(perm: Permutation) -> Permutation:
    """The inverse permutation ``q`` with ``q[p[i]] = i``.

    Hence ``apply(spec, invert(p), apply(spec, p, θ)) == θ``; jittable (a scatter, ``O(n)``).
    """
    check_permutation(perm)

    def inv(p: Array) -> Array:
        return jnp.zeros_like(p).at[p].set(jnp.arange(p.shape[0], dtype=p.dtype))

    return {n: inv(p) for n, p in perm.items()}


def compose(p: Permutation, q: Permutation) -> Permutation:
    """The permutation that applies ``q`` first and then ``p`` (function composition ``p ∘ q``).

    ``apply(spec, compose(p, q), θ) == apply(spec, p, apply(spec, q, θ))``; elementwise
    ``compose(p, q)[name] = q[name][p[name]]``. With this order ``compose(p, invert(p))`` and
    ``compose(invert(p), p)`` are both the identity, and ``compose`` is associative.
    """
    check_permutation(p)
    check_permutation(q, names=tuple(p))
    for n in p:
        if jnp.shape(p[n]) != jnp.shape(q[n]):
            msg = f"cannot compose permutation {n!r}: sizes {jnp.shape(p[n])} and {jnp.shape(q[n])}"
            raise ValueError(msg)
    return {n: q[n][p[n]] for n in p}


def identity(spec: PermutationSpec, params: Params) -> Permutation:
    """The identity permutation ``{name: arange(size)}`` (int32) for a model described by ``spec``."""
    return {n: jnp.arange(s, dtype=jnp.int32) for n, s in spec.sizes(params).items()}


def random_permutation(key: Key, spec: PermutationSpec, params: Params) -> Permutation:
    """A uniformly random permutation of every group, one subkey per name in sorted order."""
    sizes = spec.sizes(params)
    keys = jax.random.split(key, max(len(sizes), 1))
    return {
        n: jax.random.permutation(k, s).astype(jnp.int32)
        for k, (n, s) in zip(keys, sorted(sizes.items()))
    }
