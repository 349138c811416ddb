"""OT fusion of two transformers (Imfeld et al. 2024, "Transformer Fusion with Optimal Transport", arXiv 2310.05719).

Extends the layer-wise OT fusion of :mod:`landscape.align.ot_fusion` (Singh & Jaggi, arXiv 1910.05653)
to the zoo's pre-LN GPT and ViT (parameter names of ``landscape/models/transformer.py``). The source
model (``b`` when ``target="a"``) is mapped onto the target's units with one transport map per
*unit group* and then averaged with the target, ``fused = w_t * target + w_s * aligned``.

Unit groups (solved in this order, each from features already aligned by the groups before it):

* ``"residual"`` -- the residual stream, **one map shared by every block**. Every leaf that writes to
  or reads from the stream uses it: token / position / patch embeddings and the class token,
  every LayerNorm scale and bias (``ln1``, ``ln2``, ``ln_f``), the rows of ``query``, ``key``,
  ``value`` and ``fc`` kernels, the columns and bias of ``out`` and ``proj``, the unembedding
  (tied: the embedding itself; untied: ``head/kernel`` rows). A residual stream is a sum of the
  embedding and every block's output, so with a per-block map the summands would live in different
  bases; a single map is what keeps a permuted copy exact. Weight-based features of a residual
  unit are all the leaves above whose *only* permuted axis is the stream (embeddings, norms, the
  ``out`` / ``proj`` biases, untied head rows).
* ``"blocks/{i}/attn/qk"`` -- per head, one map for the within-head units shared by queries and
  keys, so :math:`q^\\top k = \\sum_u q_u k_u` is preserved by a permutation (the repository's
  ``qk_fusion="eq_t_map"``: the cost concatenates both kernels' columns and biases).
* ``"blocks/{i}/attn/vo"`` -- per head, one map shared by the value columns and the ``out`` kernel
  rows (values are the only input of ``out``).
* ``"blocks/{i}/mlp"`` -- the MLP hidden units (``fc`` columns and bias, ``proj`` rows).

Heads (``heads=``). ``"align"`` (default) first matches whole heads: for every pair (source head,
target head) it solves the within-head transports of both groups and scores the pair by the sum
of their costs, then an exact assignment over heads picks the head permutation (heads permute as
units: a head's q, k, v and o slices move together); the maps of the matched pairs are assembled
block-diagonally. ``"index"`` pairs head ``h`` with head ``h`` (no head alignment). ``"flat"``
treats the concatenated ``H * Dh`` axis as one layer, as the authors' code does (one map over all
query/key units, one over all value units), so soft maps may mix heads; exact for a permuted copy,
but not head-structured in general. Not implemented from the paper: separate Q and K maps
(``qk_fusion="separate"``, their default; it does not preserve :math:`q^\\top k` under soft maps),
the joint Q/K layer variant, and the residual *policies* that average the incoming map with each
sublayer's map (``resid_policy="mean"`` etc.; our shared map replaces them), PCA of activations.

Widths. Both models must have the same depth, head count, vocabulary / context / classes and patch
size; the stream width ``D``, the head dimension ``Dh`` and the MLP width ``F`` may differ. The
fused model takes the target's shapes. As in :mod:`~landscape.align.ot_fusion`, output axes use the
column-normalised map :math:`T\\operatorname{diag}(1/\\beta)` and input axes the row-normalised
map :math:`\\operatorname{diag}(1/\\alpha)T` (``incoming="mass"``, default; ``"barycentric"`` uses
the column-normalised map on inputs too, the paper's literal rule). With the exact solver a
Net2Net copy of a model with duplicated residual and MLP units fuses back into the model exactly.
A different head dimension changes the score scale :math:`1/\\sqrt{D_h}`, which no transport
corrects; such fusions are approximate. Rotary positions (a GPT with no ``pos/embedding``) rotate
pairs of within-head query/key units, which a permutation does not commute with: the q/k map is
then the identity (``Dh`` must agree) and only heads, values, the stream and the MLP are aligned.

Ground cost. ``ground="weights"``: each unit is described by the leaves of its group (incoming
*and* outgoing weights, biases, norm parameters) with every other permuted axis already aligned
(the paper's weight-based variant uses incoming weights only). ``ground="activations"``: each unit
by its activation vector over samples, given as ``activations=(acts_a, acts_b)`` dicts with keys
``"residual"`` ``(S, D)`` (stack every block's stream over samples), ``"blocks/{i}/attn/query"``,
``".../key"``, ``".../value"`` ``(S, H*Dh)`` and ``"blocks/{i}/mlp"`` ``(S, F)`` (the MLP hidden
units, the input of ``proj``); :func:`transformer_activations` computes them for a zoo model.
Transport: exact (scipy assignment / LP) or Sinkhorn (ott-jax), uniform marginals, through the
solvers of :mod:`~landscape.align.ot_fusion`. Runs on the host; not jittable.

Example:
    >>> import jax, jax.numpy as jnp
    >>> from landscape import align
    >>> D, F, V, C = 4, 8, 5, 3
    >>> ks = iter(jax.random.split(jax.random.key(0), 32))
    >>> rnd = lambda *s: jax.random.normal(next(ks), s)
    >>> blk = {"ln1": {"scale": rnd(D), "bias": rnd(D)}, "ln2": {"scale": rnd(D), "bias": rnd(D)},
    ...        "attn": {n: {"kernel": rnd(D, D), "bias": rnd(D)} for n in ("query", "key", "value", "out")},
    ...        "mlp": {"fc": {"kernel": rnd(D, F), "bias": rnd(F)}, "proj": {"kernel": rnd(F, D), "bias": rnd(D)}}}
    >>> a = {"embed": {"embedding": rnd(V, D)}, "pos": {"embedding": rnd(C, D)}, "blocks": {"0": blk},
    ...      "ln_f": {"scale": rnd(D), "bias": rnd(D)}}
    >>> fused, info = align.transformer_ot_fusion(a, a, model="gpt", heads=2)
    >>> info.is_permutation, info.order
    (True, ('residual', 'blocks/0/attn/qk', 'blocks/0/attn/vo', 'blocks/0/mlp'))
"""

from __future__ import annotations

import dataclasses
import math
import numbers
import re
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from scipy.optimize import linear_sum_assignment

from landscape._types import Array, Params
from landscape.align.ot_fusion import (
    _MARGINAL_EPS,
    GROUND_METRICS,
    GROUNDS,
    INCOMING,
    SOLVERS,
    TARGETS,
    _along,
    _as_permutation,
    _exact_plan,
    _sinkhorn_plan,
)
from landscape.tree import key_name, named_leaves

__all__ = [
    "HEAD_MODES",
    "KINDS",
    "TransformerFusionInfo",
    "TransformerLayout",
    "transformer_activations",
    "transformer_ot_fusion",
]

KINDS = ("gpt", "vit")
"""Accepted ``model`` kinds (parameter names of the zoo's ``GPT`` / ``ViT``)."""
HEAD_MODES = ("align", "index", "flat")
"""Accepted ``heads_mode``: how attention heads are paired (module docstring)."""

RESIDUAL = "residual"


@dataclasses.dataclass(frozen=True)
class TransformerLayout:
    """What the parameter names do not say: the kind, depth and number of attention heads.

    Attributes:
        kind: ``"gpt"`` or ``"vit"``.
        depth: number of blocks (``blocks/0 .. blocks/{depth-1}``).
        heads: number of attention heads (the ``H * Dh`` axis of query/key/value is split into
            ``heads`` contiguous slices).
    """

    kind: str
    depth: int
    heads: int

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            msg = f"TransformerLayout.kind must be one of {list(KINDS)}, got {self.kind!r}"
            raise ValueError(msg)
        for what in ("depth", "heads"):
            v = getattr(self, what)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                msg = f"TransformerLayout.{what} must be a positive int, got {v!r}"
                raise ValueError(msg)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class TransformerFusionInfo:
    """What :func:`transformer_ot_fusion` computed, besides the fused params.

    Attributes:
        transport: ``{group: (n_source, n_target)}`` column-normalised maps applied to the source's
            output axes (head groups: the full ``(H*Dh_s, H*Dh_t)`` block-diagonal map, heads
            already matched). A permutation matrix for equal widths with the exact solver.
        plans: ``{group: (n_source, n_target)}`` transport plans (entries sum to one).
        head_perm: ``{"blocks/{i}/attn": (H,) int}``: target head ``j`` receives source head
            ``head_perm[j]`` (identity for ``heads_mode="index"``; absent for ``"flat"``).
        aligned: the source mapped onto the target's shapes, before averaging.
        order: the groups in the order they were solved.
        costs: per group, the transport cost :math:`\\langle T, M\\rangle` (head groups: the mean
            over heads of the matched pairs' costs).
        converged: per group, whether every solve converged (always true for the exact solver).
        permutation: per group, whether its map is a permutation matrix (to 1e-6).
        layout, ground, solver, target, heads_mode: the settings used.
    """

    transport: dict[str, Array]
    plans: dict[str, Array]
    head_perm: dict[str, Array]
    aligned: Params
    order: tuple[str, ...] = dataclasses.field(metadata={"static": True})
    costs: tuple[float, ...] = dataclasses.field(metadata={"static": True})
    converged: tuple[bool, ...] = dataclasses.field(metadata={"static": True})
    permutation: tuple[bool, ...] = dataclasses.field(metadata={"static": True})
    layout: TransformerLayout = dataclasses.field(metadata={"static": True})
    ground: str = dataclasses.field(metadata={"static": True})
    solver: str = dataclasses.field(metadata={"static": True})
    target: str = dataclasses.field(metadata={"static": True})
    heads_mode: str = dataclasses.field(metadata={"static": True})

    @property
    def is_permutation(self) -> bool:
        """Whether every group's map is a permutation matrix."""
        return all(self.permutation)

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe summary: per group the cost, convergence, shape and permutation flag."""
        groups = {
            n: {
                "cost": float(c),
                "converged": bool(ok),
                "is_permutation": bool(p),
                "shape": list(np.shape(self.transport[n])),
            }
            for n, c, ok, p in zip(self.order, self.costs, self.converged, self.permutation)
        }
        return {
            "order": list(self.order),
            "groups": groups,
            "head_perm": {k: np.asarray(v).tolist() for k, v in self.head_perm.items()},
            "layout": dataclasses.asdict(self.layout),
            "ground": self.ground,
            "solver": self.solver,
            "target": self.target,
            "heads_mode": self.heads_mode,
            "is_permutation": self.is_permutation,
        }


# ---------------------------------------------------------------------------------------- roles
# An axis role is None (not permuted) or (group, "out" | "in"): whether the axis carries the
# group's units as values (outputs: embeddings, kernel columns, biases, norm parameters) or reads
# them (kernel rows).
_Role = tuple[str, str] | None

_BLOCK = re.compile(r"^blocks/(\d+)/")


def _block_roles(i: int) -> dict[str, tuple[tuple[_Role, ...], bool]]:
    """``{path: (roles per axis, required)}`` of block ``i``."""
    r_out, r_in = (RESIDUAL, "out"), (RESIDUAL, "in")
    qk, vo, mlp = f"blocks/{i}/attn/qk", f"blocks/{i}/attn/vo", f"blocks/{i}/mlp"
    p = f"blocks/{i}/"
    out: dict[str, tuple[tuple[_Role, ...], bool]] = {}
    for ln in ("ln1", "ln2"):
        out[p + f"{ln}/scale"] = ((r_out,), True)
        out[p + f"{ln}/bias"] = ((r_out,), False)
    for name, grp in (("query", qk), ("key", qk), ("value", vo)):
        out[p + f"attn/{name}/kernel"] = ((r_in, (grp, "out")), True)
        out[p + f"attn/{name}/bias"] = (((grp, "out"),), False)
    out[p + "attn/out/kernel"] = (((vo, "in"), r_out), True)
    out[p + "attn/out/bias"] = ((r_out,), False)
    out[p + "mlp/fc/kernel"] = ((r_in, (mlp, "out")), True)
    out[p + "mlp/fc/bias"] = (((mlp, "out"),), False)
    out[p + "mlp/gate/kernel"] = ((r_in, (mlp, "out")), False)  # gated (SwiGLU) MLPs
    out[p + "mlp/gate/bias"] = (((mlp, "out"),), False)
    out[p + "mlp/proj/kernel"] = (((mlp, "in"), r_out), True)
    out[p + "mlp/proj/bias"] = ((r_out,), False)
    return out


def _roles(layout: TransformerLayout) -> dict[str, tuple[tuple[_Role, ...], bool]]:
    """Every known leaf path of the layout: roles per axis and whether the leaf is required."""
    r_out, r_in = (RESIDUAL, "out"), (RESIDUAL, "in")
    if layout.kind == "gpt":
        top = {
            "embed/embedding": ((None, r_out), True),
            "pos/embedding": ((None, r_out), False),
            "head/kernel": ((r_in, None), False),
            "head/bias": ((None,), False),
        }
    else:
        top = {
            "patch/kernel": ((None, None, None, r_out), True),
            "patch/bias": ((r_out,), False),
            "cls": ((None, None, r_out), False),
            "pos/embedding": ((None, r_out), True),
            "head/kernel": ((r_in, None), True),
            "head/bias": ((None,), False),
        }
    top["ln_f/scale"] = ((r_out,), True)
    top["ln_f/bias"] = ((r_out,), False)
    for i in range(layout.depth):
        top.update(_block_roles(i))
    return top


def _group_order(layout: TransformerLayout) -> tuple[str, ...]:
    out = [RESIDUAL]
    for i in range(layout.depth):
        out += [f"blocks/{i}/attn/qk", f"blocks/{i}/attn/vo", f"blocks/{i}/mlp"]
    return tuple(out)


# ---------------------------------------------------------------------------------------- checks
def _host_leaves(tree: Params) -> dict[str, np.ndarray]:
    """``{path: host array}``, floats as float64 (other dtypes kept, so the checks can name them)."""
    out = {}
    for path, x in named_leaves(tree):
        x = np.asarray(x)
        out[path] = x.astype(np.float64) if np.issubdtype(x.dtype, np.floating) else x
    return out


def _depth_of(leaves: Mapping[str, Any]) -> int:
    idx = {int(m.group(1)) for p in leaves if (m := _BLOCK.match(p))}
    return max(idx) + 1 if idx else 0


def _zoo_layout(m: Any, params: Params) -> TransformerLayout | None:
    """The layout of a zoo ``GPT`` / ``ViT`` module or of its ``FunctionalModel`` (duck-typed: this
    module does not import flax), else ``None``."""
    if hasattr(m, "to_module") and hasattr(m, "module_type"):
        m = m.to_module(params)
    kind = type(m).__name__.lower()
    if kind in KINDS and isinstance(getattr(m, "heads", None), int) and isinstance(getattr(m, "depth", None), int):
        return TransformerLayout(kind, m.depth, m.heads)
    return None


def _layouts(
    model: Any, heads: Any, la: Mapping[str, Any], lb: Mapping[str, Any], trees: tuple[Params, Params]
) -> TransformerLayout:
    """Resolve ``model`` / ``heads`` into one layout, checked against both trees' depths."""
    pair = tuple(model) if isinstance(model, (tuple, list)) else (model, model)
    if len(pair) != 2:
        msg = f"model must be a kind, a TransformerLayout, or a pair of them (for a, b); got {len(pair)} items"
        raise ValueError(msg)
    out = []
    for which, m, leaves, tree in zip("ab", pair, (la, lb), trees):
        depth = _depth_of(leaves)
        zoo = None if isinstance(m, (str, TransformerLayout)) else _zoo_layout(m, tree)
        if zoo is not None:
            m = zoo
        if isinstance(m, TransformerLayout):
            lay = m
        elif isinstance(m, str):
            if m not in KINDS:
                msg = f"unknown model {m!r}; accepted: {list(KINDS)} or a TransformerLayout"
                raise ValueError(msg)
            if heads is None:
                msg = "heads= is required when model is a kind string (the params do not say how many heads)"
                raise ValueError(msg)
            if depth == 0:
                msg = f"model {which}: params have no 'blocks/0/...' leaves; not a {m} transformer"
                raise ValueError(msg)
            lay = TransformerLayout(m, depth, heads)
        else:
            msg = (
                f"model must be one of {list(KINDS)}, a TransformerLayout or a zoo GPT / ViT (module or "
                f"functional model), got {type(m).__name__}"
            )
            raise TypeError(msg)
        if heads is not None and heads != lay.heads:
            msg = f"model {which}: heads={heads!r} disagrees with the layout's {lay.heads} heads"
            raise ValueError(msg)
        if lay.depth != depth:
            msg = (
                f"model {which}: the layout says depth {lay.depth} but the params have blocks "
                f"0..{depth - 1} (depth {depth}) under 'blocks/'"
            )
            raise ValueError(msg)
        out.append(lay)
    if out[0] != out[1]:
        for what in ("kind", "depth", "heads"):
            va, vb = getattr(out[0], what), getattr(out[1], what)
            if va != vb:
                msg = f"a and b differ in {what}: {va!r} vs {vb!r}; transformer fusion needs equal {what}"
                raise ValueError(msg)
    return out[0]


def _check_tree(
    which: str, leaves: Mapping[str, np.ndarray], roles: Mapping[str, tuple[tuple[_Role, ...], bool]], heads: int
) -> dict[str, int]:
    """Check paths, ranks and consistent group sizes of one model; returns ``{group: units}``."""
    for path in leaves:
        if path not in roles:
            msg = (
                f"model {which}: unexpected leaf {path!r}; not a parameter of the layout "
                "(known: embed, pos, patch, cls, blocks/{i}/..., ln_f, head)"
            )
            raise ValueError(msg)
    sizes: dict[str, tuple[int, str]] = {}
    for path, (axes, required) in roles.items():
        if path not in leaves:
            if required:
                msg = f"model {which}: missing leaf {path!r}"
                raise ValueError(msg)
            continue
        x = leaves[path]
        if not np.issubdtype(x.dtype, np.floating):
            msg = f"model {which} leaf {path!r} has dtype {x.dtype}; transformer fusion needs floats"
            raise ValueError(msg)
        if x.ndim != len(axes):
            msg = f"model {which} leaf {path!r} has shape {x.shape}; expected {len(axes)} axes"
            raise ValueError(msg)
        if not np.all(np.isfinite(x)):
            msg = f"model {which} leaf {path!r} has non-finite entries (NaN or inf); fusion needs finite params"
            raise ValueError(msg)
        for ax, role in enumerate(axes):
            if role is None:
                continue
            g, n = role[0], int(x.shape[ax])
            if g in sizes and sizes[g][0] != n:
                msg = (
                    f"model {which}: leaf {path!r} axis {ax} has {n} units of group {g!r} but "
                    f"{sizes[g][1]!r} has {sizes[g][0]}"
                )
                raise ValueError(msg)
            sizes.setdefault(g, (n, path))
    for g, (n, path) in sizes.items():
        if "/attn/" in g and n % heads:
            msg = f"model {which}: {path!r} has {n} attention units, not divisible by heads={heads}"
            raise ValueError(msg)
    return {g: n for g, (n, _) in sizes.items()}


def _check_pair(la: Mapping[str, np.ndarray], lb: Mapping[str, np.ndarray], roles: Mapping[str, Any]) -> None:
    if set(la) != set(lb):
        only_a, only_b = sorted(set(la) - set(lb)), sorted(set(lb) - set(la))
        msg = f"a and b have different leaves: only in a {only_a}, only in b {only_b}"
        raise ValueError(msg)
    for path in la:
        axes = roles[path][0]
        for ax, role in enumerate(axes):
            if role is None and la[path].shape[ax] != lb[path].shape[ax]:
                msg = (
                    f"a and b differ at {path!r} axis {ax}, which no transport acts on: shapes "
                    f"{la[path].shape} and {lb[path].shape}; only D, the head dim and the MLP width may differ"
                )
                raise ValueError(msg)


def _check_settings(**kw: Any) -> tuple[float, float]:
    for what, accepted in (
        ("ground", GROUNDS), ("solver", SOLVERS), ("ground_metric", GROUND_METRICS),
        ("incoming", INCOMING), ("target", TARGETS), ("heads_mode", HEAD_MODES),
    ):
        if kw[what] not in accepted:
            msg = f"unknown {what} {kw[what]!r}; accepted: {list(accepted)}"
            raise ValueError(msg)
    eps = kw["epsilon"]
    if isinstance(eps, bool) or not isinstance(eps, numbers.Real) or not math.isfinite(eps) or eps <= 0:
        msg = f"epsilon must be a finite number > 0 (relative to the mean cost), got {eps!r}"
        raise ValueError(msg)
    w = kw["weights"]
    if (
        not isinstance(w, Sequence)
        or len(w) != 2
        or not all(isinstance(v, numbers.Real) and math.isfinite(v) and v >= 0 for v in w)
        or sum(w) <= 0
    ):
        msg = f"weights must be two finite numbers >= 0 (for a, b) with a positive sum, got {w!r}"
        raise ValueError(msg)
    return float(w[0]) / float(sum(w)), float(w[1]) / float(sum(w))


def _activation_features(
    which: str, acts: Any, layout: TransformerLayout, sizes: Mapping[str, int]
) -> dict[str, np.ndarray]:
    """``{group: (units, features)}`` from a model's activation dict (keys in the module docstring)."""
    if not isinstance(acts, Mapping):
        msg = f"activations for model {which} must be a dict, got {type(acts).__name__}"
        raise TypeError(msg)

    def get(key: str, units: int) -> np.ndarray:
        if key not in acts:
            msg = f"activations of model {which} have no {key!r}; they have {sorted(acts)}"
            raise ValueError(msg)
        x = np.asarray(acts[key], dtype=np.float64)
        if x.ndim < 2 or x.shape[-1] != units:
            msg = f"activations of model {which} at {key!r} have shape {x.shape}; expected (samples..., {units})"
            raise ValueError(msg)
        if not np.all(np.isfinite(x)):
            msg = f"activations of model {which} at {key!r} have non-finite entries (NaN or inf)"
            raise ValueError(msg)
        return x.reshape(-1, units).T

    out = {RESIDUAL: get(RESIDUAL, sizes[RESIDUAL])}
    for i in range(layout.depth):
        p = f"blocks/{i}/"
        nq, nv = sizes[p + "attn/qk"], sizes[p + "attn/vo"]
        out[p + "attn/qk"] = np.concatenate([get(p + "attn/query", nq), get(p + "attn/key", nq)], axis=1)
        out[p + "attn/vo"] = get(p + "attn/value", nv)
        out[p + "mlp"] = get(p + "mlp", sizes[p + "mlp"])
    return out


def transformer_activations(apply_fn: Any, params: Params, x: Any, *, batch_size: int = 256) -> dict[str, np.ndarray]:
    """Activations of a zoo GPT / ViT for ``ground="activations"``, from its layer inputs.

    Uses ``apply_fn.intermediates(params, x, kind="input")`` (the zoo's taps: every dense layer's
    input by kernel path) in chunks of ``batch_size`` examples, and returns

    * ``"residual"``: the normalised stream :math:`\\hat h = (\\mathrm{ln}(h) - b)/s` recovered from
      the inputs of every block's ``query`` (``ln1``) and ``fc`` (``ln2``) layers, stacked over
      blocks and samples, ``(S, D)`` (a LayerNorm's output is an affine map of its unit, so the
      normalised stream is what the two models' units can be compared on);
    * ``"blocks/{i}/attn/query"`` / ``"key"`` / ``"value"``: ``ln1(h) W + b`` (before rotary), ``(S, H*Dh)``;
    * ``"blocks/{i}/mlp"``: the MLP hidden units (the input of ``proj``), ``(S, F)``.

    Args:
        apply_fn: a ``FunctionalModel`` of a zoo GPT / ViT (anything with that ``intermediates``).
        params: its params.
        x: a batch of inputs (token ids ``(N, T)`` or images).
        batch_size: examples per forward pass.

    Raises:
        TypeError: when ``apply_fn`` has no ``intermediates``.
        ValueError: when the intermediates lack a layer input.
    """
    if not callable(getattr(apply_fn, "intermediates", None)):
        msg = f"transformer_activations needs a zoo FunctionalModel with intermediates, got {type(apply_fn).__name__}"
        raise TypeError(msg)
    leaves = {p: np.asarray(v, dtype=np.float64) for p, v in named_leaves(params)}
    depth = _depth_of(leaves)
    chunks: dict[str, list[np.ndarray]] = {}
    n = int(np.shape(x)[0]) if not isinstance(x, Mapping) else int(np.shape(x["input_ids"])[0])
    for start in range(0, n, batch_size):
        end = start + batch_size
        xb = {k: v[start:end] for k, v in x.items()} if isinstance(x, Mapping) else x[start:end]
        taps = apply_fn.intermediates(params, xb, kind="input")
        for i in range(depth):
            p = f"blocks/{i}/"
            for key in (p + "attn/query/kernel", p + "mlp/fc/kernel", p + "mlp/proj/kernel"):
                if key not in taps:
                    msg = f"intermediates(kind='input') have no {key!r}; they have {sorted(taps)}"
                    raise ValueError(msg)
            x1 = np.asarray(taps[p + "attn/query/kernel"], dtype=np.float64)
            x2 = np.asarray(taps[p + "mlp/fc/kernel"], dtype=np.float64)
            for ln, xi in (("ln1", x1), ("ln2", x2)):
                scale = leaves[p + f"{ln}/scale"]
                bias = leaves.get(p + f"{ln}/bias", 0.0)
                safe = np.where(np.abs(scale) > 1e-12, scale, 1.0)
                chunks.setdefault(RESIDUAL, []).append(((xi - bias) / safe).reshape(-1, scale.shape[0]))
            for name in ("query", "key", "value"):
                y = x1 @ leaves[p + f"attn/{name}/kernel"] + leaves.get(p + f"attn/{name}/bias", 0.0)
                chunks.setdefault(p + f"attn/{name}", []).append(y.reshape(-1, y.shape[-1]))
            u = np.asarray(taps[p + "mlp/proj/kernel"], dtype=np.float64)
            chunks.setdefault(p + "mlp", []).append(u.reshape(-1, u.shape[-1]))
    return {k: np.concatenate(v, axis=0) for k, v in chunks.items()}


# ---------------------------------------------------------------------------------------- maths
def _weight_features(
    group: str,
    leaves: Mapping[str, np.ndarray],
    roles: Mapping[str, tuple[tuple[_Role, ...], bool]],
    maps: Mapping[str, tuple[np.ndarray, np.ndarray]] | None,
) -> np.ndarray:
    """``(units, features)``: every leaf with an axis of ``group``, its other permuted axes aligned
    with ``maps`` (``None``: the target, nothing to align), ``group``'s axis first, flattened."""
    feats = []
    for path, x in leaves.items():
        axes = roles[path][0]
        mine = [ax for ax, r in enumerate(axes) if r is not None and r[0] == group]
        if not mine:
            continue
        others = [(ax, r) for ax, r in enumerate(axes) if r is not None and r[0] != group]
        if group == RESIDUAL and others:
            continue  # the stream is solved first, from the leaves it alone permutes
        for ax, (g, kind) in others:
            if maps is not None:
                x = _along(x, maps[g][0] if kind == "out" else maps[g][1], ax)
        feats.append(np.moveaxis(x, mine[0], 0).reshape(x.shape[mine[0]], -1))
    return np.concatenate(feats, axis=1)


def _cost_matrix(x_s: np.ndarray, x_t: np.ndarray, ground_metric: str) -> np.ndarray:
    """``(n_S, n_T)`` ground cost in float64 on the host, with ott-jax's definitions
    (``SqEuclidean``, ``Euclidean``, ``Cosine`` with ridge 1e-8); negative rounding clipped to 0."""
    sq = np.maximum(
        (x_s**2).sum(axis=1)[:, None] + (x_t**2).sum(axis=1)[None, :] - 2.0 * x_s @ x_t.T, 0.0
    )
    if ground_metric == "sqeuclidean":
        return sq
    if ground_metric == "euclidean":
        return np.sqrt(sq)
    norms = np.linalg.norm(x_s, axis=1)[:, None] * np.linalg.norm(x_t, axis=1)[None, :]
    return np.maximum(1.0 - (x_s @ x_t.T) / (norms + 1e-8), 0.0)


def _solve(
    x_s: np.ndarray, x_t: np.ndarray, *, solver: str, ground_metric: str, epsilon: float
) -> tuple[np.ndarray, float, bool]:
    """Plan ``(n_S, n_T)`` with uniform marginals, its cost ``<T, M>`` and convergence.

    The cost is built on the host (one jit compilation per feature shape would dominate at these
    sizes); the exact and Sinkhorn solvers are :mod:`~landscape.align.ot_fusion`'s.
    """
    cost = _cost_matrix(x_s, x_t, ground_metric)
    if solver == "exact":
        plan, converged = _exact_plan(cost), True
    else:
        cost_j = jnp.asarray(cost, dtype=jnp.result_type(float))
        plan_j, ok = _sinkhorn_plan(cost_j, jnp.asarray(epsilon, dtype=cost_j.dtype))
        plan = np.asarray(plan_j, dtype=np.float64)
        converged = bool(ok) and bool(np.all(np.isfinite(plan)))
    return plan, float(np.sum(plan * cost)), converged


def _normalise(plan: np.ndarray, incoming: str) -> tuple[np.ndarray, np.ndarray]:
    """``(out_map, in_map)``: ``T diag(1/beta)`` and ``diag(1/alpha) T`` (or ``T diag(1/beta)``)."""
    out_map = plan / np.maximum(plan.sum(axis=0, keepdims=True), _MARGINAL_EPS)
    if incoming == "barycentric":
        return out_map, out_map
    return out_map, plan / np.maximum(plan.sum(axis=1, keepdims=True), _MARGINAL_EPS)


def _identity_plan(x_s: np.ndarray, x_t: np.ndarray, ground_metric: str, group: str) -> tuple[np.ndarray, float, bool]:
    if x_s.shape[0] != x_t.shape[0]:
        msg = (
            f"{group}: rotary positions fix the within-head query/key units, so the head dims must "
            f"agree; got {x_s.shape[0]} (source) and {x_t.shape[0]} (target)"
        )
        raise ValueError(msg)
    n = x_s.shape[0]
    cost = _cost_matrix(x_s, x_t, ground_metric)
    plan = np.eye(n) / n
    return plan, float(np.sum(plan * cost)), True


def _head_maps(
    feats: Mapping[str, tuple[np.ndarray, np.ndarray]],
    *,
    heads: int,
    heads_mode: str,
    fixed_qk: bool,
    settings: Mapping[str, Any],
) -> tuple[np.ndarray, dict[str, tuple[np.ndarray, float, bool]]]:
    """Match heads and solve the within-head transports of ``qk`` and ``vo`` for one block.

    Returns the head permutation (target head ``j`` <- source head ``perm[j]``) and, per group, the
    full block-diagonal plan (sums to one), the mean matched cost and convergence.
    """
    split = {
        g: (xs.reshape(heads, xs.shape[0] // heads, -1), xt.reshape(heads, xt.shape[0] // heads, -1))
        for g, (xs, xt) in feats.items()
    }

    def solve(g: str, hs: int, ht: int) -> tuple[np.ndarray, float, bool]:
        xs, xt = split[g][0][hs], split[g][1][ht]
        if g == "qk" and fixed_qk:
            return _identity_plan(xs, xt, settings["ground_metric"], "attn/qk")
        return _solve(xs, xt, **settings)

    if heads_mode == "index" or heads == 1:
        perm = np.arange(heads)
        pairs = {(h, h): {g: solve(g, h, h) for g in split} for h in range(heads)}
    else:
        pairs = {(hs, ht): {g: solve(g, hs, ht) for g in split} for hs in range(heads) for ht in range(heads)}
        head_cost = np.array(
            [[pairs[hs, ht]["qk"][1] + pairs[hs, ht]["vo"][1] for ht in range(heads)] for hs in range(heads)]
        )
        rows, cols = linear_sum_assignment(head_cost)
        perm = np.empty(heads, dtype=np.int64)
        perm[cols] = rows
    out: dict[str, tuple[np.ndarray, float, bool]] = {}
    for g in split:
        ds, dt = split[g][0].shape[1], split[g][1].shape[1]
        plan = np.zeros((heads * ds, heads * dt))
        costs, ok = [], True
        for ht in range(heads):
            hs = int(perm[ht])
            p, c, conv = pairs[hs, ht][g]
            plan[hs * ds : (hs + 1) * ds, ht * dt : (ht + 1) * dt] = p / heads
            costs.append(c)
            ok = ok and conv
        out[g] = (plan, float(np.mean(costs)), ok)
    return perm, out


# ---------------------------------------------------------------------------------------- fusion
def transformer_ot_fusion(
    a: Params,
    b: Params,
    *,
    model: str | TransformerLayout | Sequence[Any] = "gpt",
    heads: int | None = None,
    heads_mode: str = "align",
    weights: tuple[float, float] = (0.5, 0.5),
    solver: str = "exact",
    epsilon: float = 0.01,
    ground_metric: str = "sqeuclidean",
    ground: str = "weights",
    activations: tuple[Mapping[str, Any], Mapping[str, Any]] | None = None,
    target: str = "a",
    incoming: str = "mass",
) -> tuple[Params, TransformerFusionInfo]:
    """Fuse two transformers by optimal transport (Imfeld et al., arXiv 2310.05719).

    The source (``b`` when ``target="a"``) is aligned group by group (module docstring: the
    residual stream with one map for all blocks, then per block the q/k and v/o head groups and
    the MLP), then ``fused = w_t * target + w_s * aligned`` with ``weights = (w_a, w_b)``
    normalised to sum to one.

    Args:
        a, b: params trees with the zoo's GPT / ViT names (``embed/embedding``, ``blocks/{i}/...``).
        model: ``"gpt"``, ``"vit"``, a :class:`TransformerLayout`, a zoo ``GPT`` / ``ViT`` module or
            its ``FunctionalModel`` (layout read off it), or a pair of these (for a, b).
        heads: number of attention heads (required with a kind string; else, if given, checked).
        heads_mode: ``"align"`` (match heads, then per-head maps; default), ``"index"`` (head h to
            head h) or ``"flat"`` (one map over the whole ``H*Dh`` axis, heads may mix).
        weights: ``(w_a, w_b)``, normalised (paper: ``(1/2, 1/2)``).
        solver: ``"exact"`` or ``"sinkhorn"`` (ott-jax, ``epsilon`` relative to the mean cost);
            head matching itself is always an exact assignment.
        epsilon: Sinkhorn regularisation (relative).
        ground_metric: ``"sqeuclidean"``, ``"euclidean"`` or ``"cosine"``.
        ground: ``"weights"`` or ``"activations"`` (then ``activations=(acts_a, acts_b)``).
        activations: per model ``{"residual": (S, D), "blocks/{i}/attn/query" | "key" | "value":
            (S, H*Dh), "blocks/{i}/mlp": (S, F)}`` on the same samples
            (:func:`transformer_activations`).
        target: ``"a"`` or ``"b"``: whose shapes and unit order the fused model takes.
        incoming: ``"mass"`` (default) or ``"barycentric"`` (see :mod:`~landscape.align.ot_fusion`).

    Returns:
        ``(fused, info)``: the target's tree and shapes; a :class:`TransformerFusionInfo`.

    Raises:
        ValueError / TypeError: before any solve, for an unknown setting, a missing, unexpected or
            mis-shaped leaf (naming its path), different depth / heads / kind, different sizes on
            axes no transport acts on, or missing activations.
    """
    w_a, w_b = _check_settings(
        ground=ground, solver=solver, ground_metric=ground_metric, incoming=incoming, target=target,
        heads_mode=heads_mode, epsilon=epsilon, weights=weights,
    )
    la, lb = _host_leaves(a), _host_leaves(b)
    layout = _layouts(model, heads, la, lb, (a, b))
    roles = _roles(layout)
    sizes_a = _check_tree("a", la, roles, layout.heads)
    sizes_b = _check_tree("b", lb, roles, layout.heads)
    _check_pair(la, lb, roles)
    rotary = layout.kind == "gpt" and "pos/embedding" not in la
    if rotary and heads_mode == "flat":
        msg = (
            "heads_mode='flat' would permute within-head query/key units, which rotary positions "
            "forbid; use 'align' or 'index'"
        )
        raise ValueError(msg)

    tgt = a if target == "a" else b
    lt, ls = (la, lb) if target == "a" else (lb, la)
    w_t, w_s = (w_a, w_b) if target == "a" else (w_b, w_a)
    if ground == "activations":
        if activations is None or not isinstance(activations, (tuple, list)) or len(activations) != 2:
            msg = "ground='activations' needs activations=(acts_a, acts_b), one dict per model"
            raise ValueError(msg)
        fa = _activation_features("a", activations[0], layout, sizes_a)
        fb = _activation_features("b", activations[1], layout, sizes_b)
        for g in fa:
            if fa[g].shape[1] != fb[g].shape[1]:
                msg = (
                    f"activations of a and b for {g!r} have {fa[g].shape[1]} and {fb[g].shape[1]} "
                    "samples; use the same data"
                )
                raise ValueError(msg)
        act_t, act_s = (fa, fb) if target == "a" else (fb, fa)
    elif activations is not None:
        msg = "activations= is only used with ground='activations'; got ground='weights'"
        raise ValueError(msg)
    settings = {"solver": solver, "ground_metric": ground_metric, "epsilon": float(epsilon)}

    maps: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    plans: dict[str, np.ndarray] = {}
    head_perm: dict[str, np.ndarray] = {}
    costs: dict[str, float] = {}
    conv: dict[str, bool] = {}

    def feats(g: str) -> tuple[np.ndarray, np.ndarray]:
        if ground == "activations":
            return act_s[g], act_t[g]
        return _weight_features(g, ls, roles, maps), _weight_features(g, lt, roles, None)

    plan, cost, ok = _solve(*feats(RESIDUAL), **settings)
    plans[RESIDUAL], costs[RESIDUAL], conv[RESIDUAL] = plan, cost, ok
    maps[RESIDUAL] = _normalise(plan, incoming)
    for i in range(layout.depth):
        p = f"blocks/{i}/"
        attn = {"qk": feats(p + "attn/qk"), "vo": feats(p + "attn/vo")}
        if heads_mode == "flat":
            for g, (xs, xt) in attn.items():
                plans[p + "attn/" + g], costs[p + "attn/" + g], conv[p + "attn/" + g] = _solve(xs, xt, **settings)
        else:
            perm, solved = _head_maps(
                attn, heads=layout.heads, heads_mode=heads_mode, fixed_qk=rotary, settings=settings
            )
            head_perm[p + "attn"] = perm
            for g, (pl, c, k) in solved.items():
                plans[p + "attn/" + g], costs[p + "attn/" + g], conv[p + "attn/" + g] = pl, c, k
        for g in ("qk", "vo"):
            maps[p + "attn/" + g] = _normalise(plans[p + "attn/" + g], incoming)
        plans[p + "mlp"], costs[p + "mlp"], conv[p + "mlp"] = _solve(*feats(p + "mlp"), **settings)
        maps[p + "mlp"] = _normalise(plans[p + "mlp"], incoming)

    aligned_np: dict[str, np.ndarray] = {}
    for path, x in ls.items():
        for ax, role in enumerate(roles[path][0]):
            if role is not None:
                out_map, in_map = maps[role[0]]
                x = _along(x, out_map if role[1] == "out" else in_map, ax)
        aligned_np[path] = x

    def build(fn: Any) -> Params:
        return jax.tree.map_with_path(lambda path, t: jnp.asarray(fn(key_name(path)), dtype=jnp.result_type(t)), tgt)

    fused = build(lambda k: w_t * lt[k] + w_s * aligned_np[k])
    aligned = build(lambda k: aligned_np[k])
    order = _group_order(layout)
    dtype = jnp.result_type(*jax.tree.leaves(tgt))
    info = TransformerFusionInfo(
        transport={g: jnp.asarray(maps[g][0], dtype=dtype) for g in order},
        plans={g: jnp.asarray(plans[g], dtype=dtype) for g in order},
        head_perm={k: jnp.asarray(v, dtype=jnp.int32) for k, v in head_perm.items()},
        aligned=aligned,
        order=order,
        costs=tuple(costs[g] for g in order),
        converged=tuple(conv[g] for g in order),
        permutation=tuple(_as_permutation(maps[g][0]) is not None for g in order),
        layout=layout,
        ground=ground,
        solver=solver,
        target=target,
        heads_mode=heads_mode,
    )
    return fused, info
