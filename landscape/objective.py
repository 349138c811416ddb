"""Full-dataset objectives: what "loss" and "accuracy" mean everywhere in the toolkit.

An :class:`Objective` bundles ``apply_fn(params, x) -> logits``, a dataset ``(x, y)`` and a loss.
``loss(params)`` and ``evaluate(params)`` average over *every* example: the data are cut into
``ceil(n / batch_size)`` fixed-size batches (the last one padded and masked, so each example has
weight exactly ``1/n``) and reduced with ``lax.scan``. Both are pure functions of ``params``:
jittable, differentiable and vmappable over a leading params axis.

.. math::  L(\\theta) = \\frac{1}{n} \\sum_{i=1}^{n} \\ell(f_\\theta(x_i), y_i)

Sequence data (``docs/sequences.md``): ``x`` may be a pytree of arrays sharing the leading example
axis (``{"input_ids": (N, T) int, "attention_mask": (N, T)}``), and ``loss="next_token"`` averages
the cross-entropy over the *real tokens* of the whole dataset (targets not equal to
:data:`IGNORE_INDEX`), ``L = (1/N_tok) Σ_{i,t real} −log softmax(z_{it})_{y_{it}}``, with token
accuracy over the same tokens. ``Objective(..., mesh=mesh, data_axis="data")`` shards the example
axis of every batch over a device mesh axis; :class:`StreamingObjective` reads batches from a data
source too large for memory.

Example:
    >>> import jax.numpy as jnp
    >>> from landscape import Objective
    >>> apply_fn = lambda p, x: x @ p["w"]
    >>> obj = Objective(apply_fn, jnp.eye(3), jnp.array([0, 1, 1]), batch_size=2)
    >>> round(float(obj.evaluate({"w": 10 * jnp.eye(3)})["accuracy"]), 4)
    0.6667
"""

from __future__ import annotations

import dataclasses
import functools
import os
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from landscape._types import ApplyFn, Array, LossFn, Params

__all__ = [
    "IGNORE_INDEX",
    "LOSSES",
    "TOKEN_LOSSES",
    "Objective",
    "StreamingObjective",
    "TokenLoss",
    "check_targets",
    "label_range",
    "npy_batches",
]

IGNORE_INDEX = -100
"""Target value of a token that does not count (padding, the position after the last token);
Hugging Face's ``labels`` convention. With ``loss="next_token"`` a position with attention mask 0 is
set to this value when the :class:`Objective` is built."""

TOKEN_LOSSES = ("next_token",)
"""Built-in losses over token sequences: logits ``(N, T, V)``, targets ``(N, T)``; the dataset
average runs over real tokens, not over examples."""


def _cross_entropy_labels(logits: Array, y: Array) -> Array:
    """``−log softmax(z)_y`` for integer labels, with full relative precision at a confident fit.

    With margins ``d_k = z_k − z_y`` and the shift ``s = max(0, max_{k≠y} d_k)`` (held constant
    under differentiation, as in any log-sum-exp) the loss is

    .. math::  ℓ = s + \\operatorname{log1p}\\big(\\operatorname{expm1}(−s) + Σ_{k≠y} e^{d_k − s}\\big).

    The usual ``logsumexp(z) − z_y`` subtracts two numbers of size ``|z|`` to get a loss that is
    tiny once the model fits (``log(1 + δ) ≈ δ``), losing ``log10(|z| / δ)`` digits; its autodiff
    gradient ``p_y − 1`` and Hessian inherit the cancellation (float32 Hessian eigenvalues of a
    well-trained digits MLP came out 1.5e-5 off in relative terms, against 1e-6 with this form).
    Here a confident example (``s = 0``) gives ``log1p`` of a sum of small terms, and the
    derivatives are sums of the small probabilities ``p_k, k ≠ y``; a misclassified one
    (``s > 0``) has ``ℓ > log 2`` and nothing cancels.
    """
    zy = jnp.take_along_axis(logits, y[..., None].astype(jnp.int32), axis=-1)
    d = logits - zy
    others = jnp.arange(logits.shape[-1]) != y[..., None]
    shift = jax.lax.stop_gradient(jnp.maximum(jnp.max(jnp.where(others, d, -jnp.inf), axis=-1), 0))
    terms = jnp.where(others, jnp.exp(d - shift[..., None]), jnp.zeros_like(d))
    return shift + jnp.log1p(jnp.expm1(-shift) + jnp.sum(terms, axis=-1))


def _describe(y: Any, out_shape: tuple[int, ...]) -> str:
    classes = out_shape[-1] if len(out_shape) else 1
    return (
        f"labels have shape {tuple(jnp.shape(y))} and dtype {jnp.result_type(y)}; the outputs have shape "
        f"{tuple(out_shape)} ({classes} classes)"
    )


def check_targets(
    y: Any, out_shape: tuple[int, ...], *, loss: str, label_range: tuple[int, int] | None = None
) -> None:
    """Raise ``ValueError`` unless targets ``y`` fit model outputs of shape ``out_shape`` for ``loss``.

    The accepted targets (``docs/numerics.md``), checked on shapes and dtypes only (trace time, no
    cost at run time) plus the concrete ``label_range = (min, max)`` when known:

    * **class ids**: an integer array of shape ``out_shape[:-1]`` with values in ``[0, C)``,
      ``C = out_shape[-1]`` (``"cross_entropy"``; ``"mse"`` one-hot encodes them). A label ``-1`` or
      ``C`` is an error, never the last class or NaN.
    * **probability / one-hot rows** (``"cross_entropy"``, ``"mse"``): a float array of exactly
      ``out_shape`` — ``(N, C)`` for ``(N, C)`` logits. Float targets of any other shape (``(N,)``
      float labels, an ``(N, 1)`` one-hot) are an error, not broadcast.
    * **regression targets** (``"mse"``): a float array of ``out_shape``, or ``(N,)`` for ``(N, 1)``
      outputs.

    * **next-token ids** (``"next_token"``): logits ``(N, T, V)`` and an integer array ``(N, T)``
      with values in ``[0, V)`` or :data:`IGNORE_INDEX` (a token that does not count).

    ``loss="callable"`` checks nothing: a callable loss owns the meaning of its targets (the
    accuracy of a row whose integer label is outside ``[0, C)`` is then NaN, see ``evaluate``).
    """
    out_shape = tuple(out_shape)
    y_shape, y_dtype = tuple(jnp.shape(y)), jnp.result_type(y)
    integer = jnp.issubdtype(y_dtype, jnp.integer)
    if loss == "callable":  # the callable owns the meaning of its targets
        return
    if loss in TOKEN_LOSSES:
        if len(out_shape) != 3 or not integer or y_shape != out_shape[:-1]:
            msg = (
                f"{loss} needs logits of shape (N, T, V) and integer next-token ids of shape (N, T) "
                f"(the logits' shape without the vocabulary axis): targets have shape {y_shape} and dtype "
                f"{y_dtype}, the logits have shape {out_shape}"
            )
            raise ValueError(msg)
        # (min, max) may include IGNORE_INDEX (a range over all targets, as Trainer passes): allowed as min
        lo_bad = label_range is not None and label_range[0] < 0 and label_range[0] != IGNORE_INDEX
        if label_range is not None and (lo_bad or label_range[1] >= out_shape[-1]):
            msg = (
                f"next-token ids must lie in [0, {out_shape[-1]}) (the vocabulary of the logits {out_shape}) "
                f"or equal {IGNORE_INDEX} (ignored), got real targets from {label_range[0]} to {label_range[1]}"
            )
            raise ValueError(msg)
        return
    if integer and y_shape == out_shape[:-1] and len(out_shape) >= 1:
        if label_range is not None:
            lo, hi = label_range
            if lo < 0 or hi >= out_shape[-1]:
                msg = (
                    f"class labels must lie in [0, {out_shape[-1]}), got labels from {lo} to {hi}: "
                    + _describe(y, out_shape)
                )
                raise ValueError(msg)
        return
    if integer:
        msg = f"integer class labels must have the outputs' shape without the class axis: {_describe(y, out_shape)}"
        raise ValueError(msg)
    if not jnp.issubdtype(y_dtype, jnp.floating):
        msg = f"targets must be integer class ids or float rows: {_describe(y, out_shape)}"
        raise ValueError(msg)
    if y_shape == out_shape:
        return
    if loss == "mse" and len(out_shape) == 2 and out_shape[1] == 1 and y_shape == out_shape[:1]:
        return
    if loss == "cross_entropy" and len(y_shape) == 1:
        msg = (
            "float targets of shape (N,) for cross_entropy: class ids must be an integer array, probability "
            f"rows must have the outputs' shape (N, C): {_describe(y, out_shape)}"
        )
        raise ValueError(msg)
    msg = f"float targets must have exactly the outputs' shape (no broadcasting): {_describe(y, out_shape)}"
    raise ValueError(msg)


def label_range(y: Any) -> tuple[int, int] | None:
    """``(min, max)`` of concrete integer labels (``None`` for float or traced targets)."""
    if isinstance(y, jax.core.Tracer) or not jnp.issubdtype(jnp.result_type(y), jnp.integer) or jnp.size(y) == 0:
        return None
    if not getattr(y, "is_fully_addressable", True):  # a multi-host global array: values not all local
        return None
    arr = np.asarray(y)
    return int(arr.min()), int(arr.max())


def _cross_entropy(logits: Array, y: Array) -> Array:
    check_targets(y, logits.shape, loss="cross_entropy")
    if jnp.issubdtype(y.dtype, jnp.integer):
        return _cross_entropy_labels(logits, y)
    return optax.softmax_cross_entropy(logits, y)


def _mse(out: Array, y: Array) -> Array:
    check_targets(y, out.shape, loss="mse")
    if jnp.issubdtype(y.dtype, jnp.integer):
        y = jax.nn.one_hot(y, out.shape[-1], dtype=out.dtype)
    err = (out - y.reshape(out.shape)) ** 2
    return jnp.mean(err.reshape(err.shape[0], -1), axis=-1)


def _token_terms(logits: Array, y: Array) -> tuple[Array, Array, Array]:
    """Per-token ``(loss, correct, real)`` of shape ``(N, T)`` for logits ``(N, T, V)``.

    ``real = y != IGNORE_INDEX``; ignored tokens have loss and correctness exactly 0 (their target
    is replaced by 0 before the log-softmax, so nothing NaN flows into the gradient). ``correct`` is
    NaN at a real token whose logits are not all finite (``argmax`` of NaN would be token 0).
    """
    real = y != IGNORE_INDEX
    safe = jnp.where(real, y, 0).astype(jnp.int32)
    per = _cross_entropy_labels(logits, safe)
    per = jnp.where(real, per, jnp.zeros_like(per))
    finite = jnp.all(jnp.isfinite(logits), axis=-1)
    hit = (jnp.argmax(logits, axis=-1) == safe).astype(jnp.float32)
    correct = jnp.where(real, jnp.where(finite, hit, jnp.nan), 0.0)
    return per, correct, real


def _next_token(logits: Array, y: Array) -> Array:
    """Per-sequence next-token cross-entropy: the mean over the sequence's real tokens.

    For logits ``z`` of shape ``(N, T, V)`` and targets ``y`` ``(N, T)`` (``y_{it}`` the id of the
    token after position ``t``; :data:`IGNORE_INDEX` where it does not count)

    .. math::  ℓ_i = \\frac{1}{\\max(1, T_i)} Σ_{t: y_{it} ≠ −100} −\\log \\mathrm{softmax}(z_{it})_{y_{it}},

    ``T_i`` the number of real tokens of sequence ``i`` (0 for a sequence without any). This is the
    stand-alone per-example loss (``Trainer(..., loss="next_token")`` averages it over a minibatch);
    an :class:`Objective` instead averages over the real tokens of the whole dataset (see
    :class:`TokenLoss`), so long sequences weigh more than short ones, as in language modelling.
    """
    check_targets(y, jnp.shape(logits), loss="next_token")
    per, _, real = _token_terms(logits, y)
    count = jnp.maximum(jnp.sum(real, axis=-1), 1).astype(per.dtype)
    return jnp.sum(per, axis=-1) / count


@dataclasses.dataclass(frozen=True)
class TokenLoss:
    """Per-sequence next-token loss scaled so its mean over the dataset's ``n`` sequences is the
    mean over its ``N_tok`` real tokens: ``ℓ_i = (n / N_tok) Σ_{t real} ℓ_{it}``.

    This is ``Objective(..., loss="next_token").loss_fn``: probes that average ``loss_fn`` over
    examples (Hessian, GGN and Fisher products, curve fitting) then see exactly the token-averaged
    loss that ``Objective.loss`` computes (to rounding of ``scale``).
    """

    scale: Any

    def __call__(self, logits: Array, y: Array) -> Array:
        check_targets(y, jnp.shape(logits), loss="next_token")
        per, _, _ = _token_terms(logits, y)
        return self.scale * jnp.sum(per, axis=-1)


LOSSES: dict[str, LossFn] = {"cross_entropy": _cross_entropy, "mse": _mse, "next_token": _next_token}
"""Built-in per-example losses by name (``"next_token"``: see :data:`TOKEN_LOSSES`)."""


def _correct(logits: Array, y: Array) -> Array:
    """Per-example 0/1 correctness; targets are class ids or one-hot / probability rows.

    NaN where it is not defined: outputs that are not ``(batch, classes)`` with at least two
    classes, float targets that are not rows of the outputs' shape, labels outside ``[0, C)``
    (reachable only with a callable loss; built-in losses reject them), and rows whose logits are
    not all finite (``argmax`` of NaN would be class 0).
    """
    nan = jnp.full(logits.shape[:1], jnp.nan, jnp.float32)
    if logits.ndim != 2 or logits.shape[-1] < 2:
        return nan
    if jnp.issubdtype(y.dtype, jnp.integer):
        if y.shape != logits.shape[:1]:
            return nan
        label = y
    elif y.shape == logits.shape:
        label = jnp.argmax(y, axis=-1)
    else:
        return nan
    pred = jnp.argmax(logits, axis=-1)
    ok = jnp.all(jnp.isfinite(logits), axis=-1) & (label >= 0) & (label < logits.shape[-1])
    return jnp.where(ok, (pred == label).astype(jnp.float32), jnp.nan)


def _as_array(a: Any) -> Any:
    return a if isinstance(a, jax.core.Tracer) else jnp.asarray(a)


def _num_examples(x: Any, y: Any) -> int:
    """The shared leading axis of every leaf of ``x`` and of ``y``; ``ValueError`` naming the leaf."""
    named = jax.tree_util.tree_flatten_with_path(x)[0]
    if not named:
        msg = "x holds no arrays (an empty pytree); pass inputs with a leading example axis"
        raise ValueError(msg)
    shapes = {jax.tree_util.keystr(p) or "x": tuple(jnp.shape(a)) for p, a in named}
    first = next(iter(shapes.values()))
    if jnp.ndim(y) < 1 or len(first) < 1:
        msg = f"x and y need a shared leading example axis, got shapes {first} and {jnp.shape(y)}"
        raise ValueError(msg)
    n = first[0]
    bad = {k: s for k, s in shapes.items() if len(s) < 1 or s[0] != n}
    if bad or jnp.shape(y)[0] != n:
        if len(shapes) == 1:
            msg = f"x and y need a shared leading example axis, got shapes {first} and {jnp.shape(y)}"
        else:
            msg = (
                f"every input leaf and y need the same leading example axis, got x leaves {shapes} and y "
                f"{tuple(jnp.shape(y))}"
            )
        raise ValueError(msg)
    return int(n)


def _token_inputs(x: Any) -> tuple[Any, Any]:
    """``(ids, attention_mask)`` of token inputs: an ``(N, T)`` array, or a mapping with ``input_ids``
    (and optionally ``attention_mask``); ``(None, None)`` for other pytrees (nothing to check)."""
    if isinstance(x, dict):
        return x.get("input_ids"), x.get("attention_mask")
    if isinstance(x, (list, tuple)) or not jnp.issubdtype(jnp.result_type(x), jnp.integer):
        return None, None  # e.g. embeddings (N, T, D): nothing to check against
    return x, None


def _token_targets(
    x: Any, y: Any, *, allow_empty: bool = False
) -> tuple[Any, tuple[int, int] | None, int | None]:
    """Checked next-token targets ``y`` with masked positions set to :data:`IGNORE_INDEX`, the
    ``(min, max)`` of the real targets and their count (``None`` when traced)."""
    ids, mask = _token_inputs(x)
    if not jnp.issubdtype(jnp.result_type(y), jnp.integer) or jnp.ndim(y) != 2:
        msg = (
            f"next_token targets must be integer next-token ids of shape (N, T), got shape {tuple(jnp.shape(y))} "
            f"and dtype {jnp.result_type(y)}"
        )
        raise ValueError(msg)
    if ids is not None and tuple(jnp.shape(ids)) != tuple(jnp.shape(y)):
        msg = (
            f"next_token targets of shape {tuple(jnp.shape(y))} must have the token ids' shape "
            f"{tuple(jnp.shape(ids))} (one target per position: the next token, or {IGNORE_INDEX})"
        )
        raise ValueError(msg)
    if mask is not None:
        if tuple(jnp.shape(mask)) != tuple(jnp.shape(y)):
            msg = (
                f"attention_mask has shape {tuple(jnp.shape(mask))} but input_ids and the targets have shape "
                f"{tuple(jnp.shape(y))}; the mask needs one 0/1 entry per token"
            )
            raise ValueError(msg)
        if not isinstance(mask, jax.core.Tracer) and getattr(mask, "is_fully_addressable", True):
            values = np.unique(np.asarray(mask))
            if not np.all(np.isin(values, (0, 1))):
                msg = f"attention_mask must hold only 0 and 1, got values {values[:8].tolist()}"
                raise ValueError(msg)
        y = jnp.where(jnp.asarray(mask) == 0, jnp.asarray(IGNORE_INDEX, jnp.result_type(y)), y)
    if isinstance(y, jax.core.Tracer) or not getattr(y, "is_fully_addressable", True):
        return y, None, None
    arr = np.asarray(y)
    real = arr != IGNORE_INDEX
    if (arr[real] < 0).any():
        pos = tuple(int(i) for i in np.argwhere(real & (arr < 0))[0])
        msg = (
            f"next-token ids must be >= 0 or {IGNORE_INDEX} (ignored), got {int(arr[pos])} at position {pos} "
            f"of targets with shape {arr.shape}"
        )
        raise ValueError(msg)
    count = int(real.sum())
    if count == 0 and allow_empty:
        return y, None, 0
    if count == 0:
        msg = f"the next_token targets of shape {arr.shape} have no real token (all {IGNORE_INDEX} or masked)"
        raise ValueError(msg)
    return y, (int(arr[real].min()), int(arr[real].max())), count


def _batch_sums(
    apply_fn: ApplyFn, loss: str | LossFn, labels: tuple[int, int] | None, params: Params, xb: Any, yb: Array, m: Array
) -> dict[str, Array]:
    """Masked sums over one fixed batch: ``loss``, ``accuracy`` and ``count`` (the weight: 1 per
    real example, or 1 per real token for :data:`TOKEN_LOSSES`)."""
    logits = apply_fn(params, xb)
    name = loss if isinstance(loss, str) else "callable"
    check_targets(yb, jnp.shape(logits), loss=name, label_range=labels)
    if name in TOKEN_LOSSES:
        per, correct, real = _token_terms(logits, yb)
        w = real & m[:, None]
        acc_t = jnp.promote_types(per.dtype, jnp.float32)
        return {
            "loss": jnp.sum(jnp.where(w, per, 0).astype(acc_t)),
            "accuracy": jnp.sum(jnp.where(w, correct, 0).astype(acc_t)),
            "count": jnp.sum(w, dtype=jnp.int32),
        }
    per = (LOSSES[loss] if isinstance(loss, str) else loss)(logits, yb)
    correct = _correct(logits, yb)
    acc_t = jnp.promote_types(per.dtype, jnp.float32)
    return {
        "loss": jnp.sum(jnp.where(m, per, 0).astype(acc_t)),
        "accuracy": jnp.sum(jnp.where(m, correct, 0).astype(acc_t)),
        "count": jnp.sum(m, dtype=jnp.int32),
    }


def _check_mesh(mesh: Any, data_axis: Any) -> None:
    if mesh is None:
        return
    if not isinstance(mesh, jax.sharding.Mesh):
        msg = f"mesh must be a jax.sharding.Mesh or None, got {type(mesh).__name__}"
        raise TypeError(msg)
    if data_axis not in mesh.axis_names:
        msg = (
            f"data_axis {data_axis!r} is not an axis of the mesh; its axes are {tuple(mesh.axis_names)} "
            f"with sizes {dict(mesh.shape)}"
        )
        raise ValueError(msg)


def _data_sharder(mesh: jax.sharding.Mesh | None, data_axis: str) -> Callable[[Array], Array]:
    """``a -> a`` sharded ``P(None, data_axis)`` (stacked batches: the example axis is axis 1).

    A ``jax.lax.with_sharding_constraint`` on the mesh's devices with every axis of type ``Auto``
    (an ``Explicit`` axis, ``jax.make_mesh``'s default, would make the sharding part of every
    array's type and require ``jax.set_mesh`` around each ``jit``; here the constraint only tells
    the compiler how to split the batch, and params keep whatever sharding they have)."""
    if mesh is None:
        return lambda a: a
    auto_axes = (jax.sharding.AxisType.Auto,) * mesh.devices.ndim
    auto = jax.sharding.Mesh(mesh.devices, mesh.axis_names, axis_types=auto_axes)
    sharding = jax.sharding.NamedSharding(auto, jax.sharding.PartitionSpec(None, data_axis))
    return lambda a: jax.lax.with_sharding_constraint(a, sharding)


@dataclasses.dataclass(frozen=True, init=False)
class Objective:
    """A model's apply function, a dataset and a loss, averaged over the whole dataset.

    Args:
        apply_fn: ``apply_fn(params, x) -> logits`` for a batch ``x``.
        x: inputs with a leading example axis: an array, or any pytree of arrays sharing it
            (``{"input_ids": (N, T), "attention_mask": (N, T)}``); batches keep the pytree's structure.
        y: targets: integer class ids in ``[0, C)`` (cross-entropy, accuracy), float probability /
            one-hot rows of exactly the outputs' shape ``(N, C)``, or regression targets for
            ``"mse"`` (see :func:`check_targets`; any other shape or a label outside ``[0, C)`` is a
            ``ValueError`` naming both shapes at the first evaluation, never broadcast or wrapped).
            For ``"next_token"``: ``(N, T)`` integer ids of the next token (``y[:, t] = ids[:, t + 1]``,
            built by :mod:`landscape.data.text`), :data:`IGNORE_INDEX` where a position does not count.
        loss: ``"cross_entropy"``, ``"mse"``, ``"next_token"`` or a callable ``loss(logits, y) -> (batch,)``
            of per-example losses.
        batch_size: the largest number of examples per fixed-size batch; the number of batches
            ``ceil(n / batch_size)`` is static and the batches are evened out.
        mesh: optional ``jax.sharding.Mesh``: the example axis of every fixed batch is sharded over
            its axis ``data_axis`` (``NamedSharding(mesh, P(None, data_axis))`` on the stacked batches),
            so the forward pass, gradients and HVPs are sharded computations and XLA performs the
            cross-device reduction of the per-batch sums. The per-batch size is rounded up to a
            multiple of the axis size; the extra rows are padding with mask 0. Params are left as
            they are (replicated unless the caller shards them).
        data_axis: the mesh axis the examples are sharded over (default ``"data"``).

    **Next-token loss.** With ``loss="next_token"`` the model returns logits ``(N, T, V)``; a token
    counts when its target is not :data:`IGNORE_INDEX` — positions where ``x["attention_mask"]`` is 0
    are set to :data:`IGNORE_INDEX` in ``self.y`` when the objective is built (so the mask lives in
    the targets, and every probe that sees only ``(logits, y)`` masks the same tokens).
    ``loss`` is the mean cross-entropy over the ``N_tok`` real tokens of the whole dataset and
    ``accuracy`` the fraction of them whose argmax is the target; :attr:`normaliser` is ``N_tok``
    (``n`` for per-example losses) and :attr:`loss_fn` the per-sequence :class:`TokenLoss` whose mean
    over the ``n`` sequences is that same loss.

    ``Objective`` is a pytree whose leaves are ``x`` and ``y``, so it can be passed through
    ``jax.jit``; ``apply_fn``, ``loss``, ``batch_size``, ``label_range`` (the concrete
    ``(min, max)`` of integer labels, checked against the class count), ``num_tokens``, ``mesh`` and
    ``data_axis`` are static.
    """

    apply_fn: ApplyFn
    x: Any
    y: Array
    loss_name: str | LossFn
    batch_size: int
    label_range: tuple[int, int] | None
    num_tokens: int | None
    mesh: jax.sharding.Mesh | None
    data_axis: str

    def __init__(
        self,
        apply_fn: ApplyFn,
        x: Any,
        y: Any,
        *,
        loss: str | LossFn = "cross_entropy",
        batch_size: int = 512,
        mesh: jax.sharding.Mesh | None = None,
        data_axis: str = "data",
    ) -> None:
        if not callable(apply_fn):
            msg = f"apply_fn must be callable as apply_fn(params, x), got {type(apply_fn).__name__}"
            raise TypeError(msg)
        if isinstance(loss, str) and loss not in LOSSES:
            msg = f"unknown loss {loss!r}; accepted: {sorted(LOSSES)} or a callable(logits, y)"
            raise ValueError(msg)
        if not (isinstance(loss, str) or callable(loss)):
            msg = f"loss must be one of {sorted(LOSSES)} or a callable, got {type(loss).__name__}"
            raise TypeError(msg)
        x, y = jax.tree.map(_as_array, x), _as_array(y)
        n = _num_examples(x, y)
        if n == 0:
            msg = "the dataset is empty (x has 0 examples)"
            raise ValueError(msg)
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            msg = f"batch_size must be a positive int, got {batch_size!r}"
            raise ValueError(msg)
        _check_mesh(mesh, data_axis)
        num_tokens = None
        if loss in TOKEN_LOSSES:
            y, labels, num_tokens = _token_targets(x, y)
        else:
            labels = label_range(y)
            if isinstance(loss, str) and labels is not None and labels[0] < 0:
                msg = (
                    f"class labels must be >= 0, got labels from {labels[0]} to {labels[1]} (shape "
                    f"{tuple(jnp.shape(y))}, dtype {jnp.result_type(y)}); a label -1 is not the last class"
                )
                raise ValueError(msg)
            if loss == "cross_entropy" and not isinstance(y, jax.core.Tracer):
                _check_probability_rows(y)
        for name, value in (
            ("apply_fn", apply_fn), ("x", x), ("y", y), ("loss_name", loss), ("batch_size", batch_size),
            ("label_range", labels), ("num_tokens", num_tokens), ("mesh", mesh), ("data_axis", data_axis),
        ):
            object.__setattr__(self, name, value)

    # ------------------------------------------------------------------ data layout
    @property
    def num_examples(self) -> int:
        """Number of examples ``n`` (sequences, for token data)."""
        return int(jnp.shape(jax.tree.leaves(self.x)[0])[0])

    @property
    def is_token_loss(self) -> bool:
        """Whether the loss averages over tokens (:data:`TOKEN_LOSSES`) rather than examples."""
        return isinstance(self.loss_name, str) and self.loss_name in TOKEN_LOSSES

    @property
    def normaliser(self) -> Any:
        """What the summed loss is divided by: ``n`` examples, or ``N_tok`` real tokens for
        :data:`TOKEN_LOSSES` (a traced count when the objective was built from traced targets)."""
        if not self.is_token_loss:
            return self.num_examples
        if self.num_tokens is not None:
            return self.num_tokens
        return jnp.sum(self.y != IGNORE_INDEX, dtype=jnp.int32)

    @property
    def loss_fn(self) -> LossFn:
        """The per-example loss ``loss(logits, y) -> (batch,)``; its mean over the ``n`` examples is
        :meth:`loss` (for ``"next_token"`` the scaled per-sequence sum :class:`TokenLoss`)."""
        if self.is_token_loss:
            return TokenLoss(self.num_examples / self.normaliser)
        return LOSSES[self.loss_name] if isinstance(self.loss_name, str) else self.loss_name

    def replace(self, **changes: Any) -> Objective:
        """A copy with some of ``apply_fn``, ``x``, ``y``, ``loss``, ``batch_size``, ``mesh``,
        ``data_axis`` changed."""
        kw = {
            "apply_fn": self.apply_fn,
            "x": self.x,
            "y": self.y,
            "loss": self.loss_name,
            "batch_size": self.batch_size,
            "mesh": self.mesh,
            "data_axis": self.data_axis,
        }
        unknown = sorted(set(changes) - set(kw))
        if unknown:
            msg = f"unknown field(s) {unknown} for Objective.replace; accepted: {sorted(kw)}"
            raise TypeError(msg)
        kw.update(changes)
        out = Objective(kw.pop("apply_fn"), kw.pop("x"), kw.pop("y"), **kw)
        if not {"x", "y", "loss"} & set(changes) and out.label_range is None:  # keep what traced data lost
            object.__setattr__(out, "label_range", self.label_range)
            object.__setattr__(out, "num_tokens", self.num_tokens)
        return out

    def _layout(self) -> tuple[int, int]:
        """``(number of batches, rows per batch)``."""
        n = self.num_examples
        nb = -(-n // min(self.batch_size, n))
        bs = -(-n // nb)  # the same number of batches, evened out: at most nb - 1 padded rows
        if self.mesh is not None:
            k = int(self.mesh.shape[self.data_axis])
            bs = -(-bs // k) * k
        return nb, bs

    def batches(self) -> tuple[Any, Array, Array]:
        """``(xb, yb, mask)`` with shapes ``(B, batch, ...)`` (``xb`` keeps the pytree structure of
        ``x``); padded rows repeat the last example and carry ``mask = 0``. ``B = ceil(n / batch_size)``
        and the batches are evened out to ``ceil(n / B)`` examples, so at most ``B − 1`` rows are
        padding (1797 examples at ``batch_size=512``: 4 batches of 450, not 4 of 512 with 251 padded
        rows). With a ``mesh`` the batch is rounded up to a multiple of the data-axis size (more
        masked padding rows) and every array is sharded ``P(None, data_axis)``."""
        n = self.num_examples
        nb, bs = self._layout()
        pad = nb * bs - n
        shard = _data_sharder(self.mesh, self.data_axis)

        def padded(a: Array) -> Array:
            if pad:
                a = jnp.concatenate([a, jnp.repeat(a[-1:], pad, axis=0)], axis=0)
            return shard(a.reshape((nb, bs) + a.shape[1:]))

        mask = shard(jnp.arange(nb * bs).reshape(nb, bs) < n)
        return jax.tree.map(padded, self.x), padded(self.y), mask

    # ------------------------------------------------------------------ reductions
    def map_batches(self, fn: Callable[[Any, Array, Array], Any]) -> Any:
        """Sum ``fn(xb, yb, mask)`` over the fixed batches with ``lax.scan`` and return the sums.

        ``fn`` must return a pytree of arrays; the masking of padded rows is ``fn``'s job (use
        ``mask``). This is the one loop every full-dataset quantity (loss, gradients, HVPs,
        activation statistics) goes through.
        """
        xb, yb, mb = self.batches()
        first = jax.eval_shape(fn, jax.tree.map(lambda a: a[0], xb), yb[0], mb[0])
        init = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), first)

        def body(acc: Any, batch: tuple[Any, Array, Array]) -> tuple[Any, None]:
            out = fn(*batch)
            return jax.tree.map(jnp.add, acc, out), None

        total, _ = jax.lax.scan(body, init, (xb, yb, mb))
        return total

    def _sums(self, params: Params) -> dict[str, Array]:
        return self.map_batches(
            lambda xb, yb, m: _batch_sums(self.apply_fn, self.loss_name, self.label_range, params, xb, yb, m)
        )

    def loss(self, params: Params) -> Array:
        """Mean loss over the whole dataset (over its real tokens for ``"next_token"``)."""
        return self._sums(params)["loss"] / self.normaliser

    def evaluate(self, params: Params) -> dict[str, Array]:
        """``{"loss": mean loss, "accuracy": fraction correct}`` over the whole dataset.

        Accuracy is the argmax match with integer targets (or the argmax of one-hot targets); it is
        NaN for outputs that are not ``(batch, classes)`` with ``classes >= 2`` and whenever a row's
        logits are not finite (``docs/numerics.md``): NaN logits never score as class 0. For
        ``"next_token"`` both are over real tokens (token accuracy).
        """
        sums = self._sums(params)
        return {k: sums[k] / self.normaliser for k in ("loss", "accuracy")}

    def logits(self, params: Params) -> Array:
        """Model outputs for every example, in dataset order (computed in the fixed batches)."""
        xb, _, _ = self.batches()
        out = jax.lax.map(lambda xs: self.apply_fn(params, xs), xb)
        return out.reshape((-1,) + out.shape[2:])[: self.num_examples]


def _check_probability_rows(y: Any) -> None:
    """Float cross-entropy targets must be probability rows: ``(N, C)``, entries >= 0, rows summing to 1."""
    if not jnp.issubdtype(jnp.result_type(y), jnp.floating) or not getattr(y, "is_fully_addressable", True):
        return
    arr = np.asarray(y, np.float64)
    if arr.ndim != 2:
        msg = (
            f"float targets for cross_entropy must be probability rows of shape (N, C), got shape {arr.shape} "
            f"and dtype {jnp.result_type(y)}; pass class ids as an integer array"
        )
        raise ValueError(msg)
    sums = arr.sum(axis=1)
    bad = ~(np.all(arr >= 0, axis=1) & np.isclose(sums, 1.0, atol=1e-3))
    if bad.any():
        i = int(np.argmax(bad))
        msg = (
            f"float targets for cross_entropy must be probability rows (entries >= 0, each row summing to 1); "
            f"row {i} of shape {arr.shape} sums to {sums[i]:.6g}"
        )
        raise ValueError(msg)


_FIELDS = ("apply_fn", "loss_name", "batch_size", "label_range", "num_tokens", "mesh", "data_axis")


def _flatten(obj: Objective) -> tuple[tuple[Any, Array], tuple[Any, ...]]:
    return (obj.x, obj.y), tuple(getattr(obj, f) for f in _FIELDS)


def _unflatten(aux: tuple[Any, ...], children: tuple[Any, Array]) -> Objective:
    obj = object.__new__(Objective)
    object.__setattr__(obj, "x", children[0])
    object.__setattr__(obj, "y", children[1])
    for name, value in zip(_FIELDS, aux):
        object.__setattr__(obj, name, value)
    return obj


jax.tree_util.register_pytree_node(Objective, _flatten, _unflatten)


# ---------------------------------------------------------------------------------- streaming
BatchSource = Callable[[], Iterable[tuple[Any, Any]]]
"""A function returning a *fresh* iterator of ``(x, y)`` numpy (or jax) batches: every batch has
the same shapes and dtypes except that the last may hold fewer examples."""


@functools.partial(jax.jit, static_argnames=("apply_fn", "loss"))
def _stream_sums(params: Params, xb: Any, yb: Array, m: Array, *, apply_fn: ApplyFn, loss: Any) -> dict[str, Array]:
    return _batch_sums(apply_fn, loss, None, params, xb, yb, m)


@functools.partial(jax.jit, static_argnames=("apply_fn", "loss"))
def _stream_grad(params: Params, xb: Any, yb: Array, m: Array, *, apply_fn: ApplyFn, loss: Any) -> Params:
    return jax.grad(lambda q: _batch_sums(apply_fn, loss, None, q, xb, yb, m)["loss"])(params)


@functools.partial(jax.jit, static_argnames=("apply_fn", "loss"))
def _stream_hvp(params: Params, v: Params, xb: Any, yb: Array, m: Array, *, apply_fn: ApplyFn, loss: Any) -> Params:
    def grad(q: Params) -> Params:
        return jax.grad(lambda r: _batch_sums(apply_fn, loss, None, r, xb, yb, m)["loss"])(q)

    return jax.jvp(grad, (params,), (v,))[1]


def _shapes(x: Any, y: Any) -> dict[str, tuple[tuple[int, ...], str]]:
    named = jax.tree_util.tree_flatten_with_path(x)[0]
    out = {f"x{jax.tree_util.keystr(p)}": (tuple(np.shape(a)), str(np.result_type(a))) for p, a in named}
    out["y"] = (tuple(np.shape(y)), str(np.result_type(y)))
    return out


def npy_batches(x_path: str, y_path: str, *, batch_size: int) -> BatchSource:
    """A :data:`BatchSource` over two ``.npy`` files read memory-mapped (``np.load(mmap_mode="r")``):
    batches of ``batch_size`` rows in file order, the last one smaller; only one batch is in memory.

    Raises:
        FileNotFoundError: a path that is not a file (named).
        ValueError: the two arrays' leading axes differ, or a bad ``batch_size``.
    """
    for path in (x_path, y_path):
        if not os.path.isfile(path):
            msg = f"npy file not found: {os.fspath(path)!r}"
            raise FileNotFoundError(msg)
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        msg = f"batch_size must be a positive int, got {batch_size!r}"
        raise ValueError(msg)
    xs, ys = np.load(x_path, mmap_mode="r"), np.load(y_path, mmap_mode="r")
    if xs.ndim < 1 or ys.ndim < 1 or xs.shape[0] != ys.shape[0]:
        msg = f"{os.fspath(x_path)!r} has shape {xs.shape} and {os.fspath(y_path)!r} {ys.shape}: no shared leading axis"
        raise ValueError(msg)

    def source() -> Iterator[tuple[np.ndarray, np.ndarray]]:
        x, y = np.load(x_path, mmap_mode="r"), np.load(y_path, mmap_mode="r")
        for start in range(0, x.shape[0], batch_size):
            yield np.asarray(x[start : start + batch_size]), np.asarray(y[start : start + batch_size])

    return source


@dataclasses.dataclass(frozen=True, init=False)
class StreamingObjective:
    """The full-dataset loss over a data source too large for memory, one fixed-size batch at a time.

    The same quantities as :class:`Objective` — ``L = (1/n) Σ_i ℓ_i`` (or ``(1/N_tok) Σ`` over real
    tokens for ``"next_token"``), accuracy, ``∇L`` and Hessian-vector products ``∇²L v`` — but the
    batches come from ``source`` (a :data:`BatchSource`: ``source()`` returns a fresh iterator of
    ``(x, y)`` batches, e.g. :func:`npy_batches` over memory-mapped ``.npy`` files, or a generator
    reading shards) and the loop over them runs in Python: each batch goes through one jitted
    per-batch sum (module-level ``jax.jit`` with ``apply_fn`` and the loss static: one compilation
    for the whole pass). The last batch, if smaller, is padded to the batch size with masked rows,
    so the average is exact. JAX dispatches asynchronously, so the host reads and transfers batch
    ``i + 1`` while the device computes batch ``i``.

    A batch whose shapes or dtypes differ from the first one's (other than a smaller last batch)
    raises ``ValueError`` naming the batch index and both shapes.

    Which probes accept it: its own ``loss`` / ``evaluate`` / ``grad`` / ``hvp``; the
    :mod:`probes.hessian` estimators need an in-memory :class:`Objective` (they jit the whole
    Lanczos loop around ``lax.scan``), so spectra over a stream go through a host-side solver on
    :meth:`hvp`, e.g. ``scipy.sparse.linalg.eigsh`` with a ``LinearOperator`` (``docs/sequences.md``).

    Args:
        apply_fn: ``apply_fn(params, x) -> logits``; must be hashable (functions are).
        source: the batch source.
        loss: ``"cross_entropy"``, ``"mse"``, ``"next_token"`` or a hashable callable per-example loss.
    """

    apply_fn: ApplyFn
    source: BatchSource
    loss_name: str | LossFn

    def __init__(self, apply_fn: ApplyFn, source: BatchSource, *, loss: str | LossFn = "cross_entropy") -> None:
        if not callable(apply_fn) or not callable(source):
            msg = "StreamingObjective needs a callable apply_fn(params, x) and a callable source() -> iterator"
            raise TypeError(msg)
        if isinstance(loss, str) and loss not in LOSSES:
            msg = f"unknown loss {loss!r}; accepted: {sorted(LOSSES)} or a callable(logits, y)"
            raise ValueError(msg)
        if not (isinstance(loss, str) or callable(loss)):
            msg = f"loss must be one of {sorted(LOSSES)} or a callable, got {type(loss).__name__}"
            raise TypeError(msg)
        object.__setattr__(self, "apply_fn", apply_fn)
        object.__setattr__(self, "source", source)
        object.__setattr__(self, "loss_name", loss)

    @property
    def is_token_loss(self) -> bool:
        return isinstance(self.loss_name, str) and self.loss_name in TOKEN_LOSSES

    def batches(self, params: Params | None = None) -> Iterator[tuple[Any, Array, Array, int]]:
        """``(xb, yb, mask, weight)`` per batch, padded to the first batch's size; ``weight`` is the
        batch's count of real examples (real tokens for ``"next_token"``). With ``params`` the
        targets are checked against the model's output shape (labels in range)."""
        it = self.source()
        if not isinstance(it, Iterable):
            msg = f"source() must return an iterator of (x, y) batches, got {type(it).__name__}"
            raise TypeError(msg)
        first: dict[str, Any] | None = None
        size = 0
        short_at: int | None = None
        out_shape = None
        for i, item in enumerate(it):
            if not (isinstance(item, tuple) and len(item) == 2):
                msg = f"batch {i} of the source is not an (x, y) pair (got {type(item).__name__})"
                raise ValueError(msg)
            xb = jax.tree.map(np.asarray, item[0])
            yb = np.asarray(item[1])
            shapes = _shapes(xb, yb)
            rows = {k: s[0][0] if s[0] else None for k, s in shapes.items()}
            if len(set(rows.values())) != 1 or None in rows.values():
                msg = f"batch {i}: x and y need a shared leading example axis, got shapes {shapes}"
                raise ValueError(msg)
            b = next(iter(rows.values()))
            if first is None:
                first, size = shapes, b
                if b == 0:
                    msg = "batch 0 of the source is empty"
                    raise ValueError(msg)
            else:
                same = {k: (s[0][1:], s[1]) for k, s in shapes.items()} == {
                    k: (s[0][1:], s[1]) for k, s in first.items()
                }
                if not same or b > size or b == 0:
                    msg = (
                        f"batch {i} has shapes {shapes} but batch 0 had {first}; every batch must have the same "
                        "shapes and dtypes (only the last may hold fewer, but not zero, examples)"
                    )
                    raise ValueError(msg)
                if short_at is not None:
                    msg = (
                        f"batch {short_at} held {prev} examples, fewer than the batch size {size}, but batch {i} "
                        "follows it; only the last batch may be smaller"
                    )
                    raise ValueError(msg)
            if b < size:
                short_at, prev = i, b
            if self.is_token_loss:
                yb, labels, _ = _token_targets(xb, yb, allow_empty=True)
                yb = np.asarray(yb)
            else:
                labels = label_range(yb)
            weight = int((yb != IGNORE_INDEX).sum()) if self.is_token_loss else b
            pad = size - b
            if pad:
                xb = jax.tree.map(lambda a, pad=pad: np.concatenate([a, np.repeat(a[-1:], pad, axis=0)]), xb)
                yb = np.concatenate([yb, np.repeat(yb[-1:], pad, axis=0)])
            if params is not None:
                if out_shape is None:
                    out_shape = jax.eval_shape(self.apply_fn, params, xb).shape
                name = self.loss_name if isinstance(self.loss_name, str) else "callable"
                check_targets(yb, out_shape, loss=name, label_range=labels)
            yield xb, yb, np.arange(size) < b, weight
        if first is None:
            msg = "the source yielded no batches"
            raise ValueError(msg)

    def _fold(self, fn: Callable[..., Any], params: Params) -> tuple[Any, int, int]:
        total, count, n = None, 0, 0
        for xb, yb, m, w in self.batches(params):
            out = fn(xb, yb, m)
            total = out if total is None else jax.tree.map(jnp.add, total, out)
            count += w
            n += int(m.sum())
        if count == 0:
            msg = "the source holds no real token (every target is -100 or masked)"
            raise ValueError(msg)
        return total, count, n

    def evaluate(self, params: Params) -> dict[str, Array]:
        """``{"loss", "accuracy"}`` over every example (every real token) of the source."""
        kw = {"apply_fn": self.apply_fn, "loss": self.loss_name}
        sums, count, _ = self._fold(lambda xb, yb, m: _stream_sums(params, xb, yb, m, **kw), params)
        return {k: sums[k] / count for k in ("loss", "accuracy")}

    def loss(self, params: Params) -> Array:
        """The mean loss over the whole source."""
        return self.evaluate(params)["loss"]

    def grad(self, params: Params) -> Params:
        """``∇L(θ)``: per-batch gradients of the masked loss sums, summed, over the normaliser."""
        kw = {"apply_fn": self.apply_fn, "loss": self.loss_name}
        g, count, _ = self._fold(lambda xb, yb, m: _stream_grad(params, xb, yb, m, **kw), params)
        return jax.tree.map(lambda a: a / count, g)

    def hvp(self, params: Params, v: Params) -> Params:
        """``∇²L(θ) v`` by forward-over-reverse differentiation of each batch (Pearlmutter 1994)."""
        kw = {"apply_fn": self.apply_fn, "loss": self.loss_name}
        h, count, _ = self._fold(lambda xb, yb, m: _stream_hvp(params, v, xb, yb, m, **kw), params)
        return jax.tree.map(lambda a: a / count, h)

    def num_examples(self) -> int:
        """Number of examples in the source (one pass over it, no model evaluation)."""
        return sum(int(m.sum()) for _, _, m, _ in self.batches())
