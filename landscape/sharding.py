"""Meshes and FSDP-style parameter sharding over ``jax.sharding``, on one host or many.

Nothing here is a process pool: a :class:`jax.sharding.Mesh` names the devices (of every process,
under ``jax.distributed``), a :class:`~jax.sharding.NamedSharding` says how an array is laid out
over them, and XLA's partitioner turns every probe and merge into one sharded computation.

* :func:`make_mesh` builds a mesh whose axes are ``Auto`` (the partitioner propagates shardings
  through code that knows nothing of them; jax 0.10's ``jax.make_mesh`` defaults to ``Explicit``
  axes, under which ``with_sharding_constraint`` and most library code refuse to run).
* :func:`param_specs` / :func:`shard_params` lay each large leaf out over one mesh axis (FSDP,
  "fully sharded data parallel" style: every device holds ``1/d`` of each big tensor), choosing
  for each leaf the **largest dimension divisible by the axis size** (ties: the later dimension,
  which for Flax ``(in, out)`` kernels is the output axis). A leaf with no divisible dimension is
  left **replicated** by default (``indivisible="replicate"``) or refused with a ``ValueError``
  naming the leaf, its shape and the axis size (``indivisible="raise"``); nothing is padded.
  Leaves smaller than ``min_size`` entries (biases, norms) stay replicated.
* :func:`flat_layout` is how :mod:`probes.hessian` keeps its flat vectors (the Lanczos basis,
  trace probes) sharded like the params: the selected leaves are ravelled into one vector of
  length ``n``, zero-padded to a multiple of the axis size ``d`` (``with_sharding_constraint``
  silently replicates a dimension that ``d`` does not divide) and laid out ``P(axis)``.
* :func:`evaluate_grid` evaluates an objective at many points of a plane with the *points*
  sharded over a mesh axis (``shard_map``; each device runs ``lax.map`` over its share), for
  surfaces of replicated params.
* :func:`initialize_distributed` wraps ``jax.distributed.initialize`` with entry checks and a
  check that the process count the coordinator reports is the one asked for.

Example:
    >>> import jax, jax.numpy as jnp
    >>> from landscape import sharding
    >>> mesh = sharding.make_mesh({"model": 1}, devices=jax.devices()[:1])
    >>> sharding.param_specs({"w": jnp.ones((4, 6)), "b": jnp.zeros(3)}, mesh, min_size=8)
    {'b': P(), 'w': P(None, 'model')}
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from landscape import tree
from landscape._types import Array, Params

__all__ = [
    "FlatLayout",
    "evaluate_grid",
    "flat_layout",
    "initialize_distributed",
    "leaf_spec",
    "make_mesh",
    "param_specs",
    "replicate",
    "shard_params",
    "shardings_of",
]

_INDIVISIBLE = ("replicate", "raise")


# ------------------------------------------------------------------------------------------ meshes
def make_mesh(axes: Mapping[str, int] | None = None, *, devices: Sequence[Any] | None = None) -> Mesh:
    """A mesh over ``devices`` (default: every device of every process) with ``Auto`` axes.

    Args:
        axes: ``{name: size}`` in order, e.g. ``{"data": 2, "model": 4}``; one size may be ``-1``
            (the rest of the devices). Default ``{"model": -1}``: one axis over all devices.
        devices: the devices, default ``jax.devices()`` (global under ``jax.distributed``).

    Raises:
        ValueError: sizes that are not positive ints (or one ``-1``), or whose product is not the
            device count.
    """
    axes = {"model": -1} if axes is None else dict(axes)
    devs = list(jax.devices() if devices is None else devices)
    if not axes:
        msg = "axes is empty; give {name: size}, e.g. {'model': 8}"
        raise ValueError(msg)
    names = tuple(axes)
    sizes = list(axes.values())
    for name, s in axes.items():
        if not isinstance(name, str) or not isinstance(s, int) or isinstance(s, bool) or (s < 1 and s != -1):
            msg = f"mesh axis {name!r}: size must be a positive int or -1, got {s!r}"
            raise ValueError(msg)
    if sizes.count(-1) > 1:
        msg = f"at most one mesh axis may have size -1, got {axes}"
        raise ValueError(msg)
    known = math.prod(s for s in sizes if s != -1)
    if -1 in sizes:
        if len(devs) % known:
            msg = f"mesh axes {axes}: {len(devs)} devices are not a multiple of {known}"
            raise ValueError(msg)
        sizes[sizes.index(-1)] = len(devs) // known
    if math.prod(sizes) != len(devs):
        msg = f"mesh axes {dict(zip(names, sizes))} need {math.prod(sizes)} devices, there are {len(devs)}"
        raise ValueError(msg)
    grid = np.asarray(devs, dtype=object).reshape(sizes)
    return Mesh(grid, names, axis_types=(AxisType.Auto,) * len(names))


def _axis_size(mesh: Mesh, axis: str) -> int:
    if not isinstance(mesh, Mesh):
        msg = f"mesh must be a jax.sharding.Mesh (see landscape.sharding.make_mesh), got {type(mesh).__name__}"
        raise TypeError(msg)
    if axis not in mesh.shape:
        msg = f"mesh has no axis {axis!r}; its axes are {dict(mesh.shape)}"
        raise ValueError(msg)
    return int(mesh.shape[axis])


# ------------------------------------------------------------------------------------ leaf layouts
def leaf_spec(
    shape: Sequence[int], axis_size: int, axis: str, *, min_size: int = 1, indivisible: str = "replicate",
    name: str = "<leaf>",
) -> PartitionSpec:
    """The FSDP layout of one leaf: ``axis`` on its largest dimension divisible by ``axis_size``.

    Ties go to the later dimension. Leaves with fewer than ``min_size`` entries, and (with
    ``indivisible="replicate"``) leaves with no divisible dimension, get ``PartitionSpec()``
    (replicated); ``indivisible="raise"`` refuses the latter, naming the leaf.
    """
    shape = tuple(int(s) for s in shape)
    if not shape or math.prod(shape) < min_size:
        return PartitionSpec()
    ok = [i for i, s in enumerate(shape) if s % axis_size == 0 and s >= axis_size]
    if not ok:
        if indivisible == "raise":
            msg = (
                f"params leaf {name!r} of shape {shape}: no dimension is divisible by the size {axis_size} of "
                f"mesh axis {axis!r}; use indivisible='replicate' to keep it replicated, or a mesh axis that "
                "divides one of its dimensions (nothing is padded)"
            )
            raise ValueError(msg)
        return PartitionSpec()
    best = max(ok, key=lambda i: (shape[i], i))
    return PartitionSpec(*[axis if i == best else None for i in range(len(shape))])


def param_specs(
    params: Params, mesh: Mesh, *, axis: str = "model", min_size: int = 1024, indivisible: str = "replicate"
) -> Params:
    """A pytree of :class:`~jax.sharding.PartitionSpec` (one per leaf) for :func:`shard_params`.

    Args:
        params: any pytree of arrays (or ``jax.ShapeDtypeStruct``).
        mesh: the mesh; ``axis`` must be one of its axes.
        axis: the mesh axis to shard over.
        min_size: leaves with fewer entries stay replicated.
        indivisible: ``"replicate"`` (default) or ``"raise"`` for a large leaf with no dimension
            divisible by the axis size.

    Raises:
        ValueError: an unknown axis or ``indivisible``, or (``"raise"``) the leaf with no divisible
            dimension, named by its path.
    """
    d = _axis_size(mesh, axis)
    if indivisible not in _INDIVISIBLE:
        msg = f"indivisible must be one of {list(_INDIVISIBLE)}, got {indivisible!r}"
        raise ValueError(msg)
    if not isinstance(min_size, int) or isinstance(min_size, bool) or min_size < 0:
        msg = f"min_size must be an int >= 0, got {min_size!r}"
        raise ValueError(msg)
    named = tree.named_leaves(params)
    specs = [
        leaf_spec(jnp.shape(x), d, axis, min_size=min_size, indivisible=indivisible, name=n) for n, x in named
    ]
    return jax.tree.unflatten(jax.tree.structure(params), specs)


def shard_params(
    params: Params, mesh: Mesh, *, axis: str = "model", min_size: int = 1024, indivisible: str = "replicate",
    specs: Params | None = None,
) -> Params:
    """``params`` placed on ``mesh``: large leaves sharded over ``axis``, the rest replicated.

    The layout is :func:`param_specs` (or explicit ``specs``, a matching pytree of
    ``PartitionSpec``; an axis in a spec that does not divide that dimension is a ``ValueError``
    naming the leaf). Values are unchanged; every probe and merge of :mod:`probes` and
    :mod:`landscape.merge` accepts the result and returns params with the same shardings.
    """
    _axis_size(mesh, axis)
    if specs is None:
        specs = param_specs(params, mesh, axis=axis, min_size=min_size, indivisible=indivisible)
    leaves, treedef = jax.tree.flatten(params)
    spec_leaves = treedef.flatten_up_to(specs)
    out = []
    for (name, x), spec in zip(tree.named_leaves(params), spec_leaves):
        if not isinstance(spec, PartitionSpec):
            msg = f"specs for leaf {name!r} must be a PartitionSpec, got {type(spec).__name__}"
            raise TypeError(msg)
        _check_spec(name, jnp.shape(x), spec, mesh)
        out.append(jax.device_put(x, NamedSharding(mesh, spec)))
    return jax.tree.unflatten(treedef, out)


def _check_spec(name: str, shape: tuple[int, ...], spec: PartitionSpec, mesh: Mesh) -> None:
    if len(spec) > len(shape):
        msg = f"params leaf {name!r} of shape {tuple(shape)} has {len(shape)} dims but spec {spec} names {len(spec)}"
        raise ValueError(msg)
    for dim, entry in enumerate(spec):
        if entry is None:
            continue
        names = entry if isinstance(entry, tuple) else (entry,)
        size = 1
        for a in names:
            size *= _axis_size(mesh, a)
        if shape[dim] % size:
            msg = (
                f"params leaf {name!r} of shape {tuple(shape)}: dimension {dim} (size {shape[dim]}) is not divisible "
                f"by mesh axis {entry!r} of size {size}; nothing is padded — choose another dimension or mesh"
            )
            raise ValueError(msg)


def replicate(params: Params, mesh: Mesh) -> Params:
    """Every leaf replicated on every device of ``mesh``."""
    return jax.tree.map(lambda x: jax.device_put(x, NamedSharding(mesh, PartitionSpec())), params)


def shardings_of(params: Params) -> Params:
    """The pytree of each leaf's ``.sharding`` (``None`` for leaves without one)."""
    return jax.tree.map(lambda x: getattr(x, "sharding", None), params)


# ------------------------------------------------------------------------------------ flat vectors
@dataclasses.dataclass(frozen=True)
class FlatLayout:
    """How a ravelled params vector is laid out: zero-padded to ``padded`` and sharded ``P(axis)``.

    Hashable, so jitted probes take it as a static argument.

    Attributes:
        mesh: the mesh of the params.
        axis: the mesh axis (or tuple of axes) the flat vector is sharded over.
        size: ``n``, the number of real entries.
        padded: ``n`` rounded up to a multiple of the axis size.
        leaves: each leaf's ``NamedSharding`` (``None`` where it had none), in flattening order:
            what outputs shaped like params are constrained back to.
    """

    mesh: Mesh
    axis: str | tuple[str, ...]
    size: int
    padded: int
    leaves: tuple[NamedSharding | None, ...]

    @property
    def sharding(self) -> NamedSharding:
        """``NamedSharding(mesh, P(axis))`` of the padded flat vector."""
        return NamedSharding(self.mesh, PartitionSpec(self.axis))

    def pad(self, v: Array) -> Array:
        """``(..., n) -> (..., padded)`` with zeros, laid out ``P(..., axis)``."""
        extra = self.padded - v.shape[-1]
        if extra:
            v = jnp.concatenate([v, jnp.zeros(v.shape[:-1] + (extra,), v.dtype)], axis=-1)
        spec = PartitionSpec(*([None] * (v.ndim - 1)), self.axis)
        return jax.lax.with_sharding_constraint(v, NamedSharding(self.mesh, spec))

    def unpad(self, v: Array) -> Array:
        """``(..., padded) -> (..., n)``."""
        return v[..., : self.size]

    def mask(self, dtype: Any) -> Array:
        """``(padded,)``: 1 on real entries, 0 on the padding (sharded like the vector)."""
        return self.pad(jnp.ones((self.size,), dtype))

    def constrain_leaves(self, leaves: Sequence[Array]) -> list[Array]:
        """Each params-shaped leaf constrained to the params' own sharding."""
        return [x if s is None else jax.lax.with_sharding_constraint(x, s) for x, s in zip(leaves, self.leaves)]


def _named(x: Any) -> NamedSharding | None:
    s = getattr(x, "sharding", None)
    if isinstance(x, jax.core.Tracer) or not isinstance(s, NamedSharding):
        return None
    return s


def flat_layout(params: Params, size: int) -> FlatLayout | None:
    """The :class:`FlatLayout` of params whose leaves are ``NamedSharding``-sharded, else ``None``.

    The flat vector is sharded over every mesh axis that some leaf is sharded over (in mesh
    order), so a basis of ``K`` Lanczos vectors takes ``K · padded / d`` entries per device.
    Returns ``None`` for traced, single-device or fully replicated params (nothing to keep).
    """
    leaves = jax.tree.leaves(params)
    shardings = [_named(x) for x in leaves]
    named = [s for s in shardings if s is not None]
    if not named:
        return None
    mesh = named[0].mesh
    if any(s.mesh != mesh for s in named):
        msg = "params leaves are sharded over different meshes; put every leaf on one mesh"
        raise ValueError(msg)
    used: set[str] = set()
    for s in named:
        for entry in s.spec:
            if entry is not None:
                used.update(entry if isinstance(entry, tuple) else (entry,))
    axes = tuple(a for a in mesh.axis_names if a in used)
    if not axes:
        return None
    d = math.prod(int(mesh.shape[a]) for a in axes)
    padded = -(-size // d) * d
    return FlatLayout(mesh=mesh, axis=axes[0] if len(axes) == 1 else axes, size=size, padded=padded,
                      leaves=tuple(shardings))


# ------------------------------------------------------------------------------------------- grids
def evaluate_grid(
    objective: Any, center: Params, directions: Sequence[Params], coords: Any, *, mesh: Mesh, axis: str = "grid",
) -> dict[str, Array]:
    """``objective.evaluate(center + Σ_k coords[i, k] d_k)`` for every row, rows sharded over ``axis``.

    The ``m`` rows of ``coords`` (``(m, K)``, one column per direction) are zero-padded to a
    multiple of the axis size ``d`` and split over the devices of ``axis`` with ``shard_map``;
    each device evaluates its ``ceil(m / d)`` points with ``lax.map`` (params replicated), and the
    values come back replicated (``(m,)`` each, padding dropped). A 41 x 41 surface on 8 devices:
    211 points per device. Works unchanged across processes under ``jax.distributed`` (every
    process passes the same ``coords``). The objective's data are replicated onto ``mesh`` (use
    an objective without a data mesh of its own: here the parallel axis is the grid).

    Returns:
        ``{"loss": (m,), "accuracy": (m,)}``.
    """
    d = _axis_size(mesh, axis)
    coords = np.asarray(coords, dtype=np.float32)
    dirs = tuple(directions)
    if coords.ndim != 2 or coords.shape[1] != len(dirs) or coords.shape[0] == 0:
        msg = f"coords must be (points, {len(dirs)}) for {len(dirs)} directions, got shape {coords.shape}"
        raise ValueError(msg)
    for i, dvec in enumerate(dirs):
        tree.check_match(center, dvec, names=("center", f"directions[{i}]"))
    m = coords.shape[0]
    per = -(-m // d)
    padded = np.zeros((per * d, coords.shape[1]), np.float32)
    padded[:m] = coords
    rows = jax.device_put(padded, NamedSharding(mesh, PartitionSpec(axis)))
    rep = NamedSharding(mesh, PartitionSpec())
    center, dirs, objective = jax.device_put((center, dirs, objective), rep)
    out = _grid_impl(objective, center, dirs, rows, mesh=mesh, axis=axis)
    return {k: v[:m] for k, v in out.items()}


def _grid_fn(objective: Any, center: Params, dirs: tuple[Params, ...], rows: Array) -> dict[str, Array]:
    def at(c: Array) -> dict[str, Array]:
        return objective.evaluate(tree.offset(center, dirs, c))

    return jax.lax.map(at, rows)


@functools.partial(jax.jit, static_argnames=("mesh", "axis"))
def _grid_impl(objective: Any, center: Params, dirs: tuple[Params, ...], rows: Array, *, mesh: Mesh,
               axis: str) -> dict[str, Array]:
    rep = PartitionSpec()
    fn = jax.shard_map(
        _grid_fn, mesh=mesh, in_specs=(rep, rep, rep, PartitionSpec(axis)), out_specs=PartitionSpec(axis),
        check_vma=False,
    )
    out = fn(objective, center, dirs, rows)
    return jax.lax.with_sharding_constraint(out, NamedSharding(mesh, rep))


# -------------------------------------------------------------------------------------- multi-host
def initialize_distributed(
    coordinator_address: str, *, num_processes: int, process_id: int, timeout_s: int = 60,
    local_device_ids: Sequence[int] | None = None,
) -> None:
    """``jax.distributed.initialize`` with entry checks and a process-count check.

    Call once per process, before any other JAX call, with the same ``coordinator_address``
    (``"host:port"`` of process 0) and ``num_processes`` everywhere and ``process_id`` in
    ``[0, num_processes)``. On CPU the cross-process collectives are gloo (jax 0.10's default
    ``jax_cpu_collectives_implementation``).

    What goes wrong, and how it shows:

    * a process that asks for a different ``num_processes`` than the coordinator (process 0)
      is admitted by jax with the coordinator's count; here that is a ``ValueError`` naming both
      counts (raised in that process, after joining).
    * fewer processes start than process 0 asked for: jax aborts every waiting process after
      ``timeout_s`` (``DEADLINE_EXCEEDED ... RegisterTask``, exit status 134) — not catchable
      from Python; start all processes within the timeout.
    """
    if not isinstance(coordinator_address, str) or ":" not in coordinator_address:
        msg = f"coordinator_address must be 'host:port', got {coordinator_address!r}"
        raise ValueError(msg)
    for name, v, low in (("num_processes", num_processes, 1), ("process_id", process_id, 0),
                         ("timeout_s", timeout_s, 1)):
        if not isinstance(v, int) or isinstance(v, bool) or v < low:
            msg = f"{name} must be an int >= {low}, got {v!r}"
            raise ValueError(msg)
    if process_id >= num_processes:
        msg = f"process_id must lie in [0, num_processes={num_processes}), got {process_id}"
        raise ValueError(msg)
    jax.distributed.initialize(
        coordinator_address=coordinator_address, num_processes=num_processes, process_id=process_id,
        initialization_timeout=timeout_s, local_device_ids=local_device_ids,
    )
    got = jax.process_count()
    if got != num_processes:
        msg = (
            f"process {process_id} asked for num_processes={num_processes}, but the coordinator at "
            f"{coordinator_address} runs {got} processes; every process must pass the same num_processes"
        )
        raise ValueError(msg)

