"""Logit ensembles: how much do several models gain by averaging their predictions?

For members ``θ_1 … θ_M`` with softmax outputs ``p_m(x) = softmax(f_{θ_m}(x))`` the ensemble
predicts the averaged probabilities

.. math::  \\bar p(x) = \\frac{1}{M} \\sum_{m=1}^{M} p_m(x),

and is scored by accuracy (``argmax \\bar p = y``) and negative log-likelihood
``-\\frac1n \\sum_i \\log \\bar p(x_i)_{y_i}`` over the whole dataset of an
:class:`~landscape.Objective`. This is the evaluation used for deep ensembles (Lakshminarayanan et
al. 2017, arXiv 1612.01474), snapshot ensembles (Huang et al. 2017, arXiv 1704.00109), FGE
(Garipov et al. 2018, arXiv 1802.10026) and SWA's comparisons (Izmailov et al. 2018,
arXiv 1803.05407). Diversity is the pairwise prediction disagreement
``D(m, l) = \\frac1n \\sum_i [\\arg\\max p_m(x_i) \\ne \\arg\\max p_l(x_i)]`` (Fort et al. 2019,
arXiv 1912.02757).

Example:
    >>> import jax.numpy as jnp
    >>> from landscape import Objective
    >>> obj = Objective(lambda p, x: x @ p, jnp.eye(3), jnp.array([0, 1, 2]))
    >>> res = ensemble(obj, [jnp.eye(3), 2 * jnp.eye(3)])
    >>> float(res.accuracy), float(res.mean_disagreement)
    (1.0, 0.0)
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from landscape import tree
from landscape._types import Array, Params
from landscape.objective import Objective

__all__ = ["EnsembleResult", "ensemble"]


@functools.partial(
    jax.tree_util.register_dataclass,
    data_fields=["accuracy", "nll", "member_accuracy", "member_nll", "disagreement"],
    meta_fields=[],
)
@dataclasses.dataclass(frozen=True)
class EnsembleResult:
    """Scores of a probability-averaging ensemble and of its members, from :func:`ensemble`.

    Attributes:
        accuracy: ensemble accuracy, ``argmax`` of the averaged probabilities.
        nll: ensemble negative log-likelihood of the averaged probabilities (nats per example).
        member_accuracy: ``(M,)`` each member's accuracy.
        member_nll: ``(M,)`` each member's NLL (softmax cross-entropy).
        disagreement: ``(M, M)`` fraction of examples on which two members' argmax predictions
            differ (zero diagonal).
    """

    accuracy: Array
    nll: Array
    member_accuracy: Array
    member_nll: Array
    disagreement: Array

    @property
    def num_members(self) -> int:
        """``M``."""
        return int(self.member_accuracy.shape[0])

    @property
    def mean_disagreement(self) -> Array:
        """Mean of ``disagreement`` over the ``M(M-1)/2`` unordered pairs (NaN for one member)."""
        m = self.num_members
        if m < 2:
            return jnp.asarray(jnp.nan)
        iu = np.triu_indices(m, k=1)
        return jnp.mean(self.disagreement[iu])

    @property
    def gain(self) -> Array:
        """Accuracy gain of the ensemble over the mean member: ``acc_ens - mean_m acc_m``."""
        return self.accuracy - jnp.mean(self.member_accuracy)

    @property
    def nll_gain(self) -> Array:
        """NLL reduction of the ensemble over the mean member: ``mean_m nll_m - nll_ens``."""
        return jnp.mean(self.member_nll) - self.nll

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe dict with the derived numbers (NaN as None)."""

        from probes.numerics import json_safe

        def num(x: Any) -> Any:
            return json_safe(np.asarray(x, dtype=np.float64))

        return {
            "num_members": self.num_members,
            "accuracy": num(self.accuracy),
            "nll": num(self.nll),
            "member_accuracy": num(self.member_accuracy),
            "member_nll": num(self.member_nll),
            "disagreement": num(self.disagreement),
            "mean_disagreement": num(self.mean_disagreement),
            "gain": num(self.gain),
            "nll_gain": num(self.nll_gain),
        }

    def plot(self) -> Any:
        """Plotly figure: member and ensemble accuracy / NLL bars, and the disagreement matrix."""
        import plotly.graph_objects as go
        from plotly.subplots import make_subplots

        m = self.num_members
        names = [f"member {i}" for i in range(m)] + ["ensemble"]
        fig = make_subplots(rows=1, cols=3, subplot_titles=("accuracy", "NLL", "disagreement"))
        acc = np.append(np.asarray(self.member_accuracy), float(self.accuracy))
        nll = np.append(np.asarray(self.member_nll), float(self.nll))
        colors = ["#636efa"] * m + ["#ef553b"]
        fig.add_trace(go.Bar(x=names, y=acc, marker_color=colors, showlegend=False), row=1, col=1)
        fig.add_trace(go.Bar(x=names, y=nll, marker_color=colors, showlegend=False), row=1, col=2)
        fig.add_trace(
            go.Heatmap(z=np.asarray(self.disagreement), colorscale="Viridis", showscale=True),
            row=1, col=3,
        )
        fig.update_layout(
            title=f"ensemble of {m}: gain {float(self.gain):+.4f} accuracy, "
            f"{float(self.nll_gain):+.4f} NLL; mean disagreement {float(self.mean_disagreement):.4f}"
        )
        return fig


@jax.jit
def _member_logits(objective: Objective, stacked: Params) -> Array:
    return jax.lax.map(objective.logits, stacked)


def ensemble(objective: Objective, members: Sequence[Params] | Params) -> EnsembleResult:
    """Score the probability-averaging ensemble of ``members`` on ``objective``'s whole dataset.

    Args:
        objective: supplies ``apply_fn`` and the data; targets are integer class ids or one-hot /
            probability rows (then the label is their argmax). The objective's own loss is not
            used: NLL is always the cross-entropy of (averaged) softmax probabilities.
        members: a non-empty sequence of matching params, or one stacked params (leading member
            axis).

    Returns:
        :class:`EnsembleResult` (ensemble and member accuracy / NLL, pairwise disagreement; the
        gains and mean disagreement as properties).

    Raises:
        ValueError: no members, members that do not match (naming the path), or outputs that are
            not ``(examples, classes)`` logits.
    """
    if isinstance(members, (list, tuple)):
        if not members:
            msg = "ensemble needs at least one member, got an empty sequence"
            raise ValueError(msg)
        stacked = tree.stack(list(members))
    else:
        if not jax.tree.leaves(members):
            msg = "ensemble needs at least one member, got params without leaves"
            raise ValueError(msg)
        sizes = {jnp.shape(x)[0] if jnp.ndim(x) else None for x in jax.tree.leaves(members)}
        if len(sizes) != 1 or None in sizes or 0 in sizes:
            named = {k: jnp.shape(x) for k, x in tree.named_leaves(members)}
            msg = (
                "members must be a sequence of params or stacked params with one shared, "
                f"non-empty leading member axis; got leaf shapes {named}"
            )
            raise ValueError(msg)
        stacked = members
    shape = jax.eval_shape(_member_logits, objective, stacked).shape
    if len(shape) != 3:
        msg = (
            "ensemble needs classification logits of shape (examples, classes) per member, got "
            f"per-member outputs of shape {shape[1:]}"
        )
        raise ValueError(msg)
    logits = _member_logits(objective, stacked)  # (M, n, C)
    y = objective.y
    labels = y if jnp.issubdtype(y.dtype, jnp.integer) else jnp.argmax(y, axis=-1)
    if labels.shape != shape[1:2]:
        msg = f"targets must be class ids (n,) or one-hot rows (n, C), got y of shape {y.shape}"
        raise ValueError(msg)
    return _score(logits, labels)


@jax.jit
def _score(logits: Array, labels: Array) -> EnsembleResult:
    m = logits.shape[0]
    logp = jax.nn.log_softmax(logits.astype(jnp.promote_types(logits.dtype, jnp.float32)), axis=-1)
    pick = jnp.take_along_axis(logp, labels[None, :, None], axis=-1)[..., 0]  # (M, n)
    member_nll = -jnp.mean(pick, axis=-1)
    preds = jnp.argmax(logits, axis=-1)  # (M, n)
    member_acc = jnp.mean(preds == labels[None], axis=-1)
    ens_logp = jax.scipy.special.logsumexp(logp, axis=0) - jnp.log(m)  # log of mean probabilities
    ens_nll = -jnp.mean(jnp.take_along_axis(ens_logp, labels[:, None], axis=-1)[:, 0])
    ens_acc = jnp.mean(jnp.argmax(ens_logp, axis=-1) == labels)
    disagree = jnp.mean(preds[:, None, :] != preds[None, :, :], axis=-1)
    return EnsembleResult(
        accuracy=ens_acc,
        nll=ens_nll,
        member_accuracy=member_acc,
        member_nll=member_nll,
        disagreement=disagree,
    )
