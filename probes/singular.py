"""Singular-direction alignment between two models, layer by layer, before and after permutation.

Ito, Yamada & Kumagai (2024), *Analysis of linear mode connectivity via permutation-based weight
matching* (arXiv 2402.04051), explain why weight matching works: it does not make the weights
of two models close, it aligns the *dominant singular directions* of every layer. For each layer's
weight matrix :math:`W = U \\Sigma V^\\top` (singular values descending) this probe reports

* the singular values :math:`\\sigma_i^A`, :math:`\\sigma_i^B`;
* the alignment of the top-k singular vectors pair by pair,
  :math:`|\\langle u_i^A, u_i^B\\rangle|` (input side) and :math:`|\\langle v_i^A, v_i^B\\rangle|`
  (output side), in ``[0, 1]`` (absolute values: a singular pair's sign is arbitrary);
* the principal angles between the top-k subspaces,
  :math:`\\theta_j = \\arccos \\sigma_j(U_{A,k}^\\top U_{B,k})` (ascending, in radians; the same
  for ``V``), which stay meaningful when singular values are nearly degenerate and the individual
  vectors are not;

for ``b`` as given ("before") and, when a permutation is given, for ``align.apply(spec, perm, b)``
("after"). A kernel of any rank is read as a matrix with the output units as columns: a dense
kernel ``(in, out)`` as it is, a conv kernel ``(h, w, in, out)`` reshaped to ``(h·w·in, out)``
(all leading axes flattened, row-major), so the left vectors live in the (patch) input space and
the right vectors in the output-unit space. Permuting hidden units permutes the rows / columns of
these matrices, so a layer's left vectors are unaffected by an unpermuted input (the first layer)
and its right vectors by unpermuted outputs (the logits). Leaves with fewer than two axes
(biases, norm parameters) are skipped.

Example:
    >>> import jax
    >>> from flax import nnx
    >>> from landscape import align, models
    >>> from probes.singular import singular_alignment
    >>> fm, a, _ = models.functional(models.MLP(8, (16, 16, 4), rngs=nnx.Rngs(0)))
    >>> p = align.random_permutation(jax.random.key(1), fm.spec, a)
    >>> b = align.apply(fm.spec, p, a)
    >>> res = singular_alignment(a, b, k=4, perm=align.invert(p), spec=fm.spec)
    >>> round(res.summary()["after"]["layers/1/kernel"], 4)
    1.0
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from landscape._types import Array, Params
from landscape.align.spec import Permutation, PermutationSpec, apply
from landscape.tree import check_match, named_leaves

__all__ = ["DirectionAlignment", "SingularAlignment", "layer_alignment", "singular_alignment"]


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class DirectionAlignment:
    """Per-layer alignment of the top-k singular directions of two models.

    Attributes (each ``{layer path: (k_layer,) array}``):
        u: :math:`|\\langle u_i^A, u_i^B\\rangle|`, left (input-side) singular vectors, pairwise.
        v: :math:`|\\langle v_i^A, v_i^B\\rangle|`, right (output-unit-side) singular vectors.
        angles_u: principal angles (radians, ascending) between the top-k left subspaces.
        angles_v: principal angles (radians, ascending) between the top-k right subspaces.
    """

    u: dict[str, Array]
    v: dict[str, Array]
    angles_u: dict[str, Array]
    angles_v: dict[str, Array]

    def mean(self) -> dict[str, float]:
        """``{layer: mean over the top-k of (|<u,u>| + |<v,v>|)/2}``: one number per layer in [0, 1]."""
        return {
            n: float(0.5 * (np.mean(np.asarray(self.u[n])) + np.mean(np.asarray(self.v[n]))))
            for n in self.u
        }

    def subspace(self) -> dict[str, float]:
        """``{layer: mean cosine of the principal angles of the top-k left and right subspaces}``.

        1 when the top-k subspaces coincide; more robust than :meth:`mean` when singular values
        are close (individual vectors then mix within their subspace, the subspace does not).
        """
        return {
            n: float(
                0.5 * (np.mean(np.cos(np.asarray(self.angles_u[n])))
                       + np.mean(np.cos(np.asarray(self.angles_v[n]))))
            )
            for n in self.u
        }

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe lists per layer."""
        return {
            f: {n: np.asarray(x).tolist() for n, x in getattr(self, f).items()}
            for f in ("u", "v", "angles_u", "angles_v")
        }


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class SingularAlignment:
    """Singular spectra and singular-direction alignment of two models, per weight matrix.

    Attributes:
        layers: the kernel paths compared, in the params' order.
        k: the number of top directions compared per layer (``min(k, rows, cols)``).
        singular_a: ``{layer: all singular values of A, descending}``.
        singular_b: ``{layer: all singular values of B, descending}`` (invariant under permutation).
        before: alignment of ``a`` with ``b`` as given.
        after: alignment of ``a`` with the permuted ``b`` (``None`` when no permutation was given).
    """

    singular_a: dict[str, Array]
    singular_b: dict[str, Array]
    before: DirectionAlignment
    after: DirectionAlignment | None
    layers: tuple[str, ...] = dataclasses.field(metadata={"static": True})
    k: tuple[int, ...] = dataclasses.field(metadata={"static": True})

    def summary(self) -> dict[str, Any]:
        """Headline numbers: per layer the mean top-k alignment before / after, and their means.

        Returns ``{"before": {layer: x}, "after": {layer: x} | None, "mean_before": x,
        "mean_after": x | None}`` with ``x`` = mean over the top-k of ``(|<u,u>| + |<v,v>|)/2``,
        and the same under ``"subspace_*"`` for the mean cosine of the principal angles
        (:meth:`DirectionAlignment.subspace`).
        """
        out: dict[str, Any] = {}
        for prefix, fn in (("", DirectionAlignment.mean), ("subspace_", DirectionAlignment.subspace)):
            before = fn(self.before)
            after = None if self.after is None else fn(self.after)
            out[f"{prefix}before"] = before
            out[f"{prefix}after"] = after
            out[f"{prefix}mean_before"] = float(np.mean(list(before.values())))
            out[f"{prefix}mean_after"] = None if after is None else float(np.mean(list(after.values())))
        return out

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe: layers, k, spectra, both alignments and the summary."""
        return {
            "layers": list(self.layers),
            "k": list(self.k),
            "singular_a": {n: np.asarray(s).tolist() for n, s in self.singular_a.items()},
            "singular_b": {n: np.asarray(s).tolist() for n, s in self.singular_b.items()},
            "before": self.before.to_dict(),
            "after": None if self.after is None else self.after.to_dict(),
            "summary": self.summary(),
        }

    def plot(self, *, title: str | None = None) -> Any:
        """Plotly figure: mean top-k alignment per layer (bars, before vs after, left and right
        vectors) and heat maps of :math:`|\\langle v_i^A, v_i^B\\rangle|` over layer x index."""
        import plotly.graph_objects as go
        from plotly.subplots import make_subplots

        stages = [("before", self.before)] + ([("after", self.after)] if self.after else [])
        fig = make_subplots(
            rows=1,
            cols=1 + len(stages),
            subplot_titles=["mean top-k alignment"]
            + [f"|<v_i^A, v_i^B>| {s}" for s, _ in stages],
        )
        for stage, al in stages:
            for side in ("u", "v"):
                vals = [float(np.mean(np.asarray(getattr(al, side)[n]))) for n in self.layers]
                fig.add_trace(
                    go.Bar(x=list(self.layers), y=vals, name=f"{side} {stage}"), row=1, col=1
                )
        kmax = max(self.k)
        for col, (stage, al) in enumerate(stages, start=2):
            z = np.full((len(self.layers), kmax), np.nan)
            for r, n in enumerate(self.layers):
                z[r, : self.k[r]] = np.asarray(al.v[n])
            fig.add_trace(
                go.Heatmap(
                    z=z, x=list(range(1, kmax + 1)), y=list(self.layers), zmin=0, zmax=1,
                    colorscale="Viridis", showscale=col == 2,
                ),
                row=1,
                col=col,
            )
            fig.update_xaxes(title_text="singular index i", row=1, col=col)
        fig.update_yaxes(range=[0, 1.05], title_text="alignment", row=1, col=1)
        fig.update_layout(barmode="group", title=title or "singular-direction alignment")
        return fig


def _matrix(x: Array) -> Array:
    """Kernel as a matrix ``(prod(leading axes), out)``."""
    return jnp.reshape(x, (-1, x.shape[-1]))


def layer_alignment(wa: Array, wb: Array, *, k: int) -> dict[str, Array]:
    """Singular values and top-k direction alignment of two equally shaped weight matrices.

    Args:
        wa, wb: kernels of the same shape (rank >= 2; reshaped to ``(prod(leading), out)``).
        k: how many top singular directions to compare (clipped to ``min(rows, cols)``).

    Returns:
        ``{"s_a", "s_b", "u", "v", "angles_u", "angles_v"}`` as described in the module docstring.
    """
    return _layer_alignment(jnp.asarray(wa), jnp.asarray(wb), int(k))


@functools.partial(jax.jit, static_argnums=2)
def _layer_alignment(wa: Array, wb: Array, k: int) -> dict[str, Array]:
    ma, mb = _matrix(wa), _matrix(wb)
    kk = min(k, *ma.shape)
    ua, sa, vha = jnp.linalg.svd(ma, full_matrices=False)
    ub, sb, vhb = jnp.linalg.svd(mb, full_matrices=False)
    ua, ub = ua[:, :kk], ub[:, :kk]
    va, vb = vha[:kk].T, vhb[:kk].T

    def angles(p: Array, q: Array) -> Array:
        cos = jnp.linalg.svd(p.T @ q, compute_uv=False)
        return jnp.sort(jnp.arccos(jnp.clip(cos, 0.0, 1.0)))

    return {
        "s_a": sa,
        "s_b": sb,
        "u": jnp.abs(jnp.sum(ua * ub, axis=0)),
        "v": jnp.abs(jnp.sum(va * vb, axis=0)),
        "angles_u": angles(ua, ub),
        "angles_v": angles(va, vb),
    }


def _directions(layers: tuple[str, ...], a: dict[str, Array], b: dict[str, Array], k: int) -> tuple[DirectionAlignment, dict[str, dict[str, Array]]]:
    per = {n: layer_alignment(a[n], b[n], k=k) for n in layers}
    al = DirectionAlignment(
        u={n: per[n]["u"] for n in layers},
        v={n: per[n]["v"] for n in layers},
        angles_u={n: per[n]["angles_u"] for n in layers},
        angles_v={n: per[n]["angles_v"] for n in layers},
    )
    return al, per


def singular_alignment(
    a: Params,
    b: Params,
    *,
    k: int = 10,
    perm: Permutation | None = None,
    spec: PermutationSpec | None = None,
    layers: tuple[str, ...] | None = None,
) -> SingularAlignment:
    """Singular-direction alignment of every weight matrix of ``a`` and ``b`` (Ito et al., arXiv 2402.04051).

    Args:
        a, b: two params trees of the same architecture (same structure and shapes).
        k: number of top singular directions compared per layer (>= 1; clipped per layer to the
            matrix's smaller side).
        perm: a permutation of ``b``'s hidden units (e.g. from
            :func:`landscape.align.weight_matching`); the "after" alignment compares ``a`` with
            ``align.apply(spec, perm, b)``. Without it only "before" is computed (pass an
            already aligned ``b`` to compare against that).
        spec: the models' :class:`~landscape.align.PermutationSpec`; required with ``perm``.
        layers: kernel paths to compare (default: every leaf with two or more axes).

    Returns:
        A :class:`SingularAlignment` with per-layer arrays, ``.summary()``, ``.to_dict()`` and
        ``.plot()``.

    Raises:
        ValueError: before any work, if ``k`` is not a positive int, the trees do not match
            (naming the first differing path), ``perm`` comes without ``spec`` (or ``spec``
            without ``perm``), a requested layer is missing or has fewer than two axes, or the
            models have no such layer.
    """
    if not isinstance(k, (int, np.integer)) or isinstance(k, bool) or k < 1:
        msg = f"k must be a positive int (top singular directions per layer), got {k!r}"
        raise ValueError(msg)
    check_match(a, b)
    if (perm is None) != (spec is None):
        msg = (
            "perm and spec go together: pass both to compare before and after permuting b, or "
            f"neither; got perm={'given' if perm is not None else None}, "
            f"spec={'given' if spec is not None else None}"
        )
        raise ValueError(msg)
    leaves_a, leaves_b = dict(named_leaves(a)), dict(named_leaves(b))
    if layers is None:
        layers = tuple(n for n, x in leaves_a.items() if jnp.ndim(x) >= 2)
        if not layers:
            msg = (
                "the models have no weight matrices (leaves with two or more axes); leaves: "
                f"{sorted(leaves_a)}"
            )
            raise ValueError(msg)
    else:
        layers = tuple(layers)
        for n in layers:
            if n not in leaves_a:
                msg = f"layer {n!r} is not a leaf of the params; leaves: {sorted(leaves_a)}"
                raise ValueError(msg)
            if jnp.ndim(leaves_a[n]) < 2:
                msg = f"layer {n!r} has shape {jnp.shape(leaves_a[n])}; a weight matrix needs >= 2 axes"
                raise ValueError(msg)
    aligned_b = None if perm is None else dict(named_leaves(apply(spec, perm, b)))

    before, per = _directions(layers, leaves_a, leaves_b, int(k))
    after = None if aligned_b is None else _directions(layers, leaves_a, aligned_b, int(k))[0]
    return SingularAlignment(
        singular_a={n: per[n]["s_a"] for n in layers},
        singular_b={n: per[n]["s_b"] for n in layers},
        before=before,
        after=after,
        layers=layers,
        k=tuple(int(per[n]["u"].shape[0]) for n in layers),
    )
