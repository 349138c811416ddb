"""How much memory a curvature probe will need, before it starts.

A matrix-free spectrum (:func:`probes.hessian.eigenvalues`, :func:`~probes.hessian.density`,
:func:`~probes.hessian.trace`) holds three things:

* **parameters**: ``Σ_leaves size · itemsize`` — exact.
* **the Lanczos basis** (or the probe block of a trace estimator): ``K_pad × n_pad`` entries for
  ``K`` Lanczos steps, ``K_pad`` rounded up to the reorthogonalisation chunk
  (:data:`probes.lanczos.CHUNK`) and ``n_pad`` the flat vector, zero-padded to a multiple of the
  mesh axis it is sharded over (:class:`landscape.sharding.FlatLayout`) — exact, and divided by
  the axis size per device. SLQ keeps one basis at a time plus its ``(m, n_pad)`` probes;
  Hutchinson keeps its ``(m, n_pad)`` probes, Hutch++ ``(m, n_pad)`` (sketch, ``Q`` and
  probes), XTrace about ``3 (m, n)`` (samples, ``Y``, ``Q``).
* **activations**: what one curvature-vector product keeps alive. This is the compiler's own
  number: the product is lowered and compiled with XLA and ``compiled.memory_analysis()``'s
  ``temp_size_in_bytes`` is reported (``activation_source="xla"``). When the backend has no
  memory analysis it falls back to the ``jax.eval_shape`` size of the stored linearisation
  (``"eval_shape"``). Which product: the hoisted one (``jax.linearize`` over the whole dataset:
  its residuals are every batch's activations) when the probe will hoist
  (``linearize=True``, or ``None`` and the residuals fit :data:`probes.hessian.LINEARIZE_BYTES`),
  else the per-batch product (one batch in memory, ``lax.scan`` over batches).

Rematerialisation (``remat=``, :data:`probes.hessian.REMAT`) shrinks the hoisted residuals — on a
6-layer tanh MLP (128 wide, 512 examples) from 9.4 MiB to 3.7 MiB with ``"full"`` and 6.4 MiB
with ``"dots"`` — so the fast hoisted path fits where it did not; the per-batch product's peak is
bounded by the batch size (``Objective(batch_size=...)``), which is the knob for a model whose
activations do not fit at all.

Example:
    >>> import jax.numpy as jnp
    >>> from landscape import Objective
    >>> from probes import memory
    >>> obj = Objective(lambda p, x: x @ p["w"], jnp.ones((8, 4)), jnp.zeros(8, jnp.int32))
    >>> est = memory.estimate(obj, {"w": jnp.ones((4, 3))}, probe="eigenvalues", k=2, num_steps=8)
    >>> est.parameter_bytes, est.basis_bytes
    (48, 384)
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from landscape._types import Array, Params
from landscape.objective import Objective
from probes import hessian, lanczos

__all__ = ["PROBES", "MemoryEstimate", "estimate", "lanczos_basis_bytes"]

PROBES = ("eigenvalues", "density", "trace")
"""Accepted values of ``probe``."""


@dataclasses.dataclass(frozen=True)
class MemoryEstimate:
    """Memory a curvature probe needs (bytes; per device where the params are sharded).

    Attributes:
        probe: ``"eigenvalues"``, ``"density"`` or ``"trace"`` (with ``method``).
        num_params: selected parameters ``n``.
        parameter_bytes: all params, exact (global; ``/ devices`` per device for sharded leaves).
        basis_bytes: the Lanczos basis / probe block, exact, global.
        basis_shape: its ``(rows, n_pad)``.
        activation_bytes: what one product keeps alive (XLA temp bytes of the compiled product,
            or the ``eval_shape`` residual size, see ``activation_source``).
        activation_source: ``"xla"`` (``compiled.memory_analysis()``) or ``"eval_shape"``.
        linearized_bytes: residuals of the hoisted linearisation (``jax.eval_shape``, exact shapes).
        linearize: whether the probe hoists the primal pass (the product measured).
        remat: the rematerialisation policy measured.
        devices: devices the flat vectors are sharded over (1 if unsharded).
    """

    probe: str
    num_params: int
    parameter_bytes: int
    basis_bytes: int
    basis_shape: tuple[int, int]
    activation_bytes: int
    activation_source: str
    linearized_bytes: int
    linearize: bool
    remat: str | None
    devices: int

    @property
    def total_bytes(self) -> int:
        """``parameter_bytes + basis_bytes + activation_bytes`` (global)."""
        return self.parameter_bytes + self.basis_bytes + self.activation_bytes

    @property
    def per_device_bytes(self) -> int:
        """Parameters and basis split over ``devices``; the compiler's activation number is already
        per device (it compiles the partitioned program)."""
        return -(-(self.parameter_bytes + self.basis_bytes) // self.devices) + self.activation_bytes

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe fields and totals."""
        out = dataclasses.asdict(self)
        out["basis_shape"] = list(self.basis_shape)
        out["total_bytes"] = self.total_bytes
        out["per_device_bytes"] = self.per_device_bytes
        return out

    def __str__(self) -> str:
        path = "hoisted linearisation" if self.linearize else "per-batch products"
        rows = [
            f"memory estimate for {self.probe} ({self.num_params} parameters, {path}, remat={self.remat}, "
            f"{self.devices} device(s))",
            f"  parameters   {_fmt(self.parameter_bytes)}",
            f"  basis/probes {_fmt(self.basis_bytes)}  {self.basis_shape[0]} x {self.basis_shape[1]}",
            f"  activations  {_fmt(self.activation_bytes)}  ({self.activation_source})",
            f"  total        {_fmt(self.total_bytes)}; per device {_fmt(self.per_device_bytes)}",
        ]
        return "\n".join(rows)


def _fmt(b: int) -> str:
    for unit, size in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if b >= size:
            return f"{b / size:8.2f} {unit}"
    return f"{b:8d} B  "


def lanczos_basis_bytes(num_steps: int, n: int, itemsize: int, *, multiple: int = 1) -> tuple[int, tuple[int, int]]:
    """``(bytes, (K_pad, n_pad))`` of the basis :func:`probes.lanczos.tridiagonalize` allocates.

    ``K_pad = ceil(K / c) · c`` with ``c = min(CHUNK, K)``; ``n_pad`` rounds ``n`` up to
    ``multiple`` (the mesh axis size of a sharded flat vector).
    """
    chunk = min(lanczos.CHUNK, num_steps)
    k_pad = -(-num_steps // chunk) * chunk
    n_pad = -(-n // multiple) * multiple
    return k_pad * n_pad * itemsize, (k_pad, n_pad)


@functools.partial(jax.jit, static_argnames=("select", "curvature", "mode", "hoisted"))
def _product(
    objective: Objective, params: Params, u: Array, *, select: tuple[bool, ...], curvature: str,
    mode: Any, hoisted: bool,
) -> Array:
    prob = hessian._problem(objective, params, select, curvature, mode)
    return (prob.linearized() if hoisted else prob.matvec)(u)


def estimate(
    objective: Objective,
    params: Params,
    *,
    probe: str = "eigenvalues",
    k: int = 1,
    which: str = "top",
    num_steps: int | None = None,
    num_probes: int = 32,
    method: str = "hutchinson",
    curvature: str = "hessian",
    filter: Any = None,
    linearize: bool | None = None,
    remat: str | None = None,
    verbose: bool = False,
) -> MemoryEstimate:
    """Estimate the memory of a curvature probe with these settings, without running it.

    Compiles (never runs) one curvature-vector product to ask XLA for its temporary memory; the
    parameter and basis numbers are exact sizes. Settings mean what they mean in
    :func:`probes.hessian.eigenvalues` (``k``, ``which``, ``num_steps``: the fixed or the
    default-capped step count), :func:`~probes.hessian.density` (``num_steps``, ``num_probes``)
    and :func:`~probes.hessian.trace` (``method``, ``num_probes``).

    Args:
        verbose: print the estimate (``str(result)``) as well.

    Returns:
        A :class:`MemoryEstimate`.
    """
    if probe not in PROBES:
        msg = f"unknown probe {probe!r}; accepted: {list(PROBES)}"
        raise ValueError(msg)
    select = hessian._prepare(objective, params, curvature, filter)
    mode = hessian._mode(params, select, remat)
    n = hessian._num_selected(params, select)
    leaves = jax.tree.leaves(params)
    dtype = jnp.result_type(*[x for x, s in zip(leaves, select) if s])
    item = int(np.dtype(dtype).itemsize)
    param_bytes = int(sum(math.prod(jnp.shape(x)) * np.dtype(jnp.result_type(x)).itemsize for x in leaves))
    d = 1 if mode.layout is None else _axis_devices(mode.layout)
    n_pad = n if mode.layout is None else mode.layout.padded
    per_end = 2 if which == "both" else 1
    if probe == "eigenvalues":
        steps = num_steps if num_steps is not None else hessian._default_max_steps(per_end * k, n)
        basis, shape = lanczos_basis_bytes(steps, n, item, multiple=d)
    elif probe == "density":
        steps = 100 if num_steps is None else num_steps
        basis, (kp, _) = lanczos_basis_bytes(steps, n, item, multiple=d)
        basis += num_probes * n_pad * item
        shape = (kp + num_probes, n_pad)
    else:
        rows = {"hutchinson": num_probes, "hutchpp": num_probes, "xtrace": 3 * num_probes}.get(method)
        if rows is None:
            msg = f"unknown method {method!r}; accepted: ['hutchinson', 'xtrace', 'hutchpp']"
            raise ValueError(msg)
        width = n if method == "xtrace" else n_pad
        basis, shape = rows * width * item, (rows, width)
    prob = hessian._problem(objective, params, select, curvature, mode)
    resid = int(prob.residual_bytes())
    hoisted = resid <= hessian.LINEARIZE_BYTES if linearize is None else bool(linearize)
    act, source = _compiled_temp(objective, params, prob.flat, select, curvature, mode, hoisted)
    if act is None:
        act = resid if hoisted else _one_batch_residuals(objective, params, select, mode)
        source = "eval_shape"
    out = MemoryEstimate(
        probe=probe if probe != "trace" else f"trace ({method})", num_params=n, parameter_bytes=param_bytes,
        basis_bytes=int(basis), basis_shape=(int(shape[0]), int(shape[1])), activation_bytes=int(act),
        activation_source=source, linearized_bytes=resid, linearize=hoisted, remat=remat, devices=d,
    )
    if verbose:
        print(out)  # noqa: T201 - the printed estimate is the point of verbose
    return out


def _axis_devices(layout: Any) -> int:
    axes = layout.axis if isinstance(layout.axis, tuple) else (layout.axis,)
    return int(math.prod(int(layout.mesh.shape[a]) for a in axes))


def _compiled_temp(
    objective: Objective, params: Params, flat: Array, select: tuple[bool, ...], curvature: str, mode: Any,
    hoisted: bool,
) -> tuple[int | None, str]:
    try:
        compiled = _product.lower(
            objective, params, flat, select=select, curvature=curvature, mode=mode, hoisted=hoisted
        ).compile()
        stats = compiled.memory_analysis()
    except Exception:  # noqa: BLE001 - a backend without memory analysis falls back to shapes
        return None, "eval_shape"
    if stats is None or getattr(stats, "temp_size_in_bytes", None) is None:
        return None, "eval_shape"
    return int(stats.temp_size_in_bytes), "xla"


def _one_batch_residuals(objective: Objective, params: Params, select: tuple[bool, ...], mode: Any) -> int:
    """``eval_shape`` size of the reverse-mode residuals of one batch's loss (the fallback)."""
    xb, yb, mb = jax.eval_shape(objective.batches)
    apply_fn = hessian._rematted(objective.apply_fn, mode.remat)

    def batch_loss(p: Params, x: Array, y: Array, m: Array) -> Array:
        per = objective.loss_fn(apply_fn(p, x), y)
        return jnp.sum(jnp.where(m, per, 0))

    one = jax.ShapeDtypeStruct(xb.shape[1:], xb.dtype), jax.ShapeDtypeStruct(yb.shape[1:], yb.dtype)
    mask = jax.ShapeDtypeStruct(mb.shape[1:], mb.dtype)
    res = jax.eval_shape(lambda p, x, y, m: jax.vjp(lambda q: batch_loss(q, x, y, m), p)[1], params, *one, mask)
    return int(sum(math.prod(s.shape) * np.dtype(s.dtype).itemsize for s in jax.tree.leaves(res)))
