r"""Mixture-of-Experts merging: fine-tuned dense MLPs become the experts of one sparse MoE.

Several models fine-tuned from one base keep their hidden units roughly aligned (they share the
base's basin), so their layers can be *routed* instead of averaged: each hidden layer ``l`` of the
MoE holds the ``E`` experts' versions of that layer and a router that picks, per example, which of
them to run (Shazeer et al. 2017, arXiv 1701.06538). This is mergekit-moe's construction (Mixtral
upcycling from dense fine-tunes) on the zoo MLP: there the MLP blocks of every decoder layer become
experts and the attention, norms and embeddings are shared; here the hidden layers are the MLP blocks
and the output layer (the classifier head) is shared.

For an MLP chain ``h_0 = flatten(x)``, a MoE layer computes, with router kernel
:math:`W_r^{(l)} \in \mathbb{R}^{d_{l-1} \times E}`,

.. math:: p(h) = \mathrm{softmax}(h W_r^{(l)}), \qquad
          h_l = \sum_{e \in \mathrm{top}_k(p)} g_e(h)\, \sigma(h W^{(l)}_e + b^{(l)}_e),

with gate weights :math:`g_e`:

* ``router="topk"`` (Mixtral, mergekit-moe's ``experts_per_token``): the top-``k`` probabilities
  renormalised to sum to one, :math:`g_e = p_e / \sum_{j \in \mathrm{top}_k} p_j`. With ``k = 1`` the
  chosen expert gets weight exactly 1, so the router gets no gradient from the loss.
* ``router="switch"`` (Fedus et al. 2021, arXiv 2101.03961, Sec. 2.1): top-1 with the *unnormalised*
  probability, :math:`h_l = p_{e^*}(h)\, \sigma(h W_{e^*} + b_{e^*})`, which is how the router
  receives gradients (the paper's straight-through of the gate value). Capacity factors and token
  dropping are not implemented: every example runs its chosen expert.

Layers that are not MoE layers (the output layer, and any hidden layer left out of
``moe_layers``) are shared: taken from ``base`` (``shared="base"``, as mergekit-moe takes
attention and norms from its ``base_model``) or the experts' uniform average (``shared="average"``).

Router initialisation (mergekit-moe ``gate_mode``):

* ``gate="hidden"``: for expert ``e`` the prototype is the mean, over its example inputs, of the
  hidden state at the router's input (:math:`h_{l-1}`) computed by the *shared dense model*
  (``base`` for ``shared="base"``, the experts' average for ``"average"``), minus the same mean over its negative
  examples if given, normalised to unit L2 norm (clamped at 1e-8); the router kernel's column ``e``
  is that prototype. (mergekit averages the base model's decoder-layer inputs over prompt tokens,
  ``hidden_avg``, or takes the last token, ``hidden``; an MLP has one "token" per example.)
* ``gate="random"``: standard-normal entries (mergekit's ``torch.randn``), from ``key``.

Every expert is evaluated densely and combined with zero weight for the unselected ones, which
gives the same numbers as dispatching (``0 · y`` is exactly ``0`` for finite ``y``); a non-finite
expert output therefore propagates as NaN even where that expert is not chosen.

The load-balancing loss of Switch (Eq. 4-6) for ``T`` examples and ``E`` experts is
:math:`E \sum_i f_i P_i` with :math:`f_i` the fraction of examples dispatched to expert ``i``
(argmax) and :math:`P_i` the mean router probability of expert ``i``; for ``k > 1`` every routing
slot counts, :math:`E \sum_{j<k} \sum_i f_{ji} P_i` (Hugging Face's ``load_balancing_loss_func``).
:func:`load_balancing_loss` sums it over the MoE layers; Switch adds it to the task loss with
:math:`\alpha = 10^{-2}`.

Example:
    >>> import jax, jax.numpy as jnp
    >>> from landscape import merge
    >>> def mlp(key):
    ...     k1, k2 = jax.random.split(key)
    ...     return {"layers": {"0": {"kernel": jax.random.normal(k1, (4, 8)), "bias": jnp.zeros(8)},
    ...                        "1": {"kernel": jax.random.normal(k2, (8, 3)), "bias": jnp.zeros(3)}}}
    >>> base = mlp(jax.random.key(0))
    >>> experts = [mlp(jax.random.key(1)), mlp(jax.random.key(2))]
    >>> xs = [jnp.ones((5, 4)), -jnp.ones((5, 4))]
    >>> moe = merge.moe_from_mlps(experts, base=base, examples=xs, top_k=1)
    >>> moe.apply_fn(moe.params, jnp.ones((2, 4))).shape
    (2, 3)
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp

from landscape import tree
from landscape._types import Array, Key, Params
from landscape.merge._inputs import check_choice
from landscape.merge.averaging import average

__all__ = [
    "ACTIVATIONS",
    "GATES",
    "ROUTERS",
    "MoEModel",
    "MoEResult",
    "Routing",
    "hidden_prototypes",
    "load_balancing_loss",
    "moe_from_mlps",
]

ACTIVATIONS = {"relu": jax.nn.relu, "gelu": jax.nn.gelu, "tanh": jnp.tanh, "silu": jax.nn.silu}
"""The zoo MLP's activations (the same functions as ``landscape.models.base.ACTIVATIONS``)."""

ROUTERS = ("topk", "switch")
"""``"topk"``: Mixtral top-k with renormalised weights; ``"switch"``: top-1 weighted by its probability."""

GATES = ("hidden", "random")
"""Router initialisations (mergekit-moe ``gate_mode``)."""


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Routing:
    """Routing decisions of one MoE layer for a batch.

    Attributes:
        probs: router probabilities ``softmax(h W_r)``, shape ``(N, E)``.
        experts: chosen experts, ``(N, k)``, best first (ties to the lower index).
        weights: their gate weights, ``(N, k)``.
    """

    probs: Array
    experts: Array
    weights: Array


def _route(h: Array, router_kernel: Array, *, top_k: int, router: str) -> Routing:
    logits = h @ router_kernel
    probs = jax.nn.softmax(logits.astype(jnp.promote_types(logits.dtype, jnp.float32)), axis=-1)
    vals, idx = jax.lax.top_k(probs, top_k)
    weights = vals if router == "switch" else vals / jnp.sum(vals, axis=-1, keepdims=True)
    return Routing(probs=probs, experts=idx, weights=weights)


@dataclasses.dataclass(frozen=True)
class MoEModel:
    """``apply_fn(params, x) -> logits`` of a MoE built by :func:`moe_from_mlps`; hashable (a static jit argument).

    Params layout: ``layers/<l>/kernel``, ``layers/<l>/bias`` for a dense (shared) layer;
    ``layers/<l>/experts/kernel`` ``(E, in, out)``, ``layers/<l>/experts/bias`` ``(E, out)`` and
    ``layers/<l>/router/kernel`` ``(in, E)`` for a MoE layer.

    Attributes:
        num_layers: dense layers of the source MLPs (hidden layers + output layer).
        moe_layers: indices of the MoE layers (hidden layers only).
        num_experts: ``E``.
        top_k: experts per example (1 for ``"switch"``).
        router: ``"topk"`` or ``"switch"``.
        activation: name in :data:`ACTIVATIONS`.
    """

    num_layers: int
    moe_layers: tuple[int, ...]
    num_experts: int
    top_k: int
    router: str
    activation: str

    def _forward(self, params: Params, x: Array) -> tuple[Array, dict[str, Routing]]:
        act = ACTIVATIONS[self.activation]
        h = jnp.reshape(x, (jnp.shape(x)[0], -1))
        if not jnp.issubdtype(h.dtype, jnp.floating):
            h = h.astype(jnp.float32)
        routes: dict[str, Routing] = {}
        for i in range(self.num_layers):
            layer = params["layers"][str(i)]
            last = i == self.num_layers - 1
            if i in self.moe_layers:
                r = _route(h, layer["router"]["kernel"], top_k=self.top_k, router=self.router)
                routes[str(i)] = r
                onehot = jax.nn.one_hot(r.experts, self.num_experts, dtype=r.probs.dtype)  # (N, k, E)
                gates = jnp.sum(onehot * r.weights[:, :, None], axis=1)  # (N, E), zero off the chosen experts
                out = None
                for e in range(self.num_experts):
                    y = act(h @ layer["experts"]["kernel"][e] + layer["experts"]["bias"][e])
                    term = gates[:, e : e + 1].astype(y.dtype) * y
                    out = term if out is None else out + term
                h = out
            else:
                z = h @ layer["kernel"] + layer["bias"]
                h = z if last else act(z)
        return h, routes

    def __call__(self, params: Params, x: Array) -> Array:
        """Logits ``(N, classes)``."""
        return self._forward(params, x)[0]

    def routing(self, params: Params, x: Array) -> dict[str, Routing]:
        """The :class:`Routing` of every MoE layer, keyed by layer index (as a string)."""
        return self._forward(params, x)[1]


@dataclasses.dataclass(frozen=True)
class MoEResult:
    """A merged MoE: ``params`` and its ``apply_fn`` (a :class:`MoEModel`), plus how it was built.

    Attributes:
        params: the MoE params (see :class:`MoEModel` for the layout).
        apply_fn: ``apply_fn(params, x) -> logits``.
        gate: ``"hidden"`` or ``"random"``.
        shared: ``"base"`` or ``"average"``: where the non-expert layers came from.
    """

    params: Params
    apply_fn: MoEModel
    gate: str
    shared: str

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe description (no parameters)."""
        m = self.apply_fn
        return {
            "num_experts": m.num_experts,
            "moe_layers": list(m.moe_layers),
            "top_k": m.top_k,
            "router": m.router,
            "activation": m.activation,
            "gate": self.gate,
            "shared": self.shared,
        }


jax.tree_util.register_dataclass(MoEResult, data_fields=["params"], meta_fields=["apply_fn", "gate", "shared"])


def _mlp_layers(params: Params, what: str) -> int:
    """Check the zoo MLP layout ``layers/<i>/{kernel,bias}`` with chained widths; return the layer count."""
    layers = params.get("layers") if isinstance(params, dict) else None
    if not isinstance(layers, dict) or set(params) != {"layers"}:
        got = sorted(params) if isinstance(params, dict) else type(params).__name__
        msg = (
            f"{what} must be zoo-MLP params {{'layers': {{'0': {{'kernel', 'bias'}}, ...}}}}, got top-level "
            f"keys {got}"
        )
        raise ValueError(msg)
    n = len(layers)
    if sorted(layers) != [str(i) for i in range(n)] or n < 2:
        msg = (f"{what}/layers must have keys '0'..'{n - 1}' and at least 2 layers (a hidden one and the head), "
               f"got {sorted(layers)}")
        raise ValueError(msg)
    prev = None
    for i in range(n):
        layer = layers[str(i)]
        if not isinstance(layer, dict) or set(layer) != {"kernel", "bias"}:
            got = sorted(layer) if isinstance(layer, dict) else repr(layer)
            msg = f"{what}/layers/{i} must hold exactly 'kernel' and 'bias', got {got}"
            raise ValueError(msg)
        k, b = layer["kernel"], layer["bias"]
        if jnp.ndim(k) != 2 or jnp.shape(b) != (jnp.shape(k)[1],):
            msg = (
                f"{what}/layers/{i}: kernel must be (in, out) and bias (out,), got shapes {jnp.shape(k)} and "
                f"{jnp.shape(b)}"
            )
            raise ValueError(msg)
        if prev is not None and jnp.shape(k)[0] != prev:
            msg = f"{what}/layers/{i}/kernel has {jnp.shape(k)[0]} inputs but layer {i - 1} has {prev} outputs"
            raise ValueError(msg)
        prev = jnp.shape(k)[1]
    return n


def _dense_inputs(params: Params, x: Array, activation: str, upto: int) -> list[Array]:
    """Inputs ``h_0 .. h_upto`` of the dense MLP's layers ``0..upto``."""
    act = ACTIVATIONS[activation]
    h = jnp.reshape(jnp.asarray(x), (jnp.shape(x)[0], -1)).astype(jnp.float32)
    out = [h]
    for i in range(upto):
        layer = params["layers"][str(i)]
        h = act(h @ layer["kernel"] + layer["bias"])
        out.append(h)
    return out


def hidden_prototypes(
    dense: Params,
    examples: Sequence[Array],
    *,
    layers: Sequence[int],
    negative: Sequence[Array | None] | None = None,
    activation: str = "relu",
) -> dict[str, Array]:
    r"""Router kernels from hidden-state prototypes (mergekit-moe ``gate_mode="hidden"``).

    For each layer ``l`` and expert ``e``: :math:`v_e = \bar h_{l-1}(X_e^+) - \bar h_{l-1}(X_e^-)`,
    the mean hidden state of the dense model at layer ``l``'s input over the expert's examples
    (minus its negative examples' mean), then :math:`v_e / \max(\|v_e\|_2, 10^{-8})`.

    Args:
        dense: zoo-MLP params of the model computing the hidden states (the base).
        examples: one input batch per expert, ``(n_e, ...)``.
        layers: MoE layer indices.
        negative: optional negative examples per expert (``None`` entries allowed).
        activation: the MLP's activation.

    Returns:
        ``{str(l): kernel (d_{l-1}, E)}``.
    """
    check_choice("activation", activation, tuple(ACTIVATIONS))
    num = len(examples)
    if negative is not None and len(negative) != num:
        msg = f"negative must have one entry per expert ({num}), got {len(negative)}"
        raise ValueError(msg)
    upto = max(layers) if layers else 0

    def mean_inputs(x: Array, what: str) -> list[Array]:
        if jnp.ndim(x) < 1 or jnp.shape(x)[0] == 0:
            msg = f"{what} must be a non-empty batch (n, ...), got shape {jnp.shape(x)}"
            raise ValueError(msg)
        return [jnp.mean(h, axis=0) for h in _dense_inputs(dense, x, activation, upto)]

    protos: dict[int, list[Array]] = {li: [] for li in layers}
    for e, x in enumerate(examples):
        pos = mean_inputs(x, f"examples[{e}]")
        neg = None
        if negative is not None and negative[e] is not None:
            neg = mean_inputs(negative[e], f"negative[{e}]")
        for li in layers:
            v = pos[li] if neg is None else pos[li] - neg[li]
            protos[li].append(v / jnp.maximum(jnp.linalg.norm(v), 1e-8))
    return {str(li): jnp.stack(protos[li], axis=1) for li in layers}


def moe_from_mlps(
    experts: Sequence[Params],
    *,
    base: Params | None = None,
    shared: str | None = None,
    gate: str = "hidden",
    examples: Sequence[Array] | None = None,
    negative: Sequence[Array | None] | None = None,
    key: Key | None = None,
    router: str = "topk",
    top_k: int = 2,
    moe_layers: Sequence[int] | None = None,
    activation: str = "relu",
) -> MoEResult:
    """Build a sparse MoE whose experts are the hidden layers of fine-tuned zoo MLPs (mergekit-moe).

    See the module docstring for the maths. Variants: mergekit-moe (Mixtral) with
    ``router="topk"`` (``top_k`` = ``experts_per_token``, renormalised top-k softmax weights) and
    Switch Transformers (Fedus et al., arXiv 2101.03961) with ``router="switch"`` (top-1, gate =
    router probability; no capacity factor).

    Args:
        experts: ``E >= 2`` matching zoo-MLP params (``layers/<i>/{kernel,bias}``), e.g. fine-tuned
            from one base on different tasks.
        base: the shared model (same layout); with ``shared="base"`` its layers fill the non-MoE
            layers and it computes the hidden states of ``gate="hidden"``.
        shared: ``"base"`` (default when ``base`` is given) or ``"average"`` (default otherwise).
        gate: ``"hidden"`` (needs ``examples``) or ``"random"`` (needs ``key``).
        examples: one input batch per expert for ``gate="hidden"`` (e.g. a few training inputs of
            the expert's task).
        negative: optional negative examples per expert (``gate="hidden"``).
        key: PRNG key for ``gate="random"``.
        router: ``"topk"`` or ``"switch"``.
        top_k: experts per example, ``1 <= top_k <= E`` (must be 1 for ``"switch"``).
        moe_layers: hidden layers that become MoE layers (default: every hidden layer).
        activation: the MLPs' activation (:data:`ACTIVATIONS`).

    Returns:
        :class:`MoEResult` with ``params`` and ``apply_fn``.

    Raises:
        ValueError: fewer than two experts, params that are not a zoo MLP or do not match (naming
            the path), an unknown option, a bad ``top_k``/``moe_layers``, or a missing
            ``examples``/``key``.
    """
    check_choice("gate", gate, GATES)
    check_choice("router", router, ROUTERS)
    check_choice("activation", activation, tuple(ACTIVATIONS))
    if not isinstance(experts, (list, tuple)) or len(experts) < 2:
        msg = f"experts must be a list of at least 2 params trees, got {type(experts).__name__} of length " + (
            str(len(experts)) if isinstance(experts, (list, tuple)) else "?")
        raise ValueError(msg)
    n_layers = _mlp_layers(experts[0], "experts[0]")
    for i, p in enumerate(experts[1:], start=1):
        tree.check_match(experts[0], p, names=("experts[0]", f"experts[{i}]"))
    if base is not None:
        tree.check_match(experts[0], base, names=("experts[0]", "base"))
    shared = ("base" if base is not None else "average") if shared is None else shared
    check_choice("shared", shared, ("base", "average"))
    if shared == "base" and base is None:
        msg = "shared='base' needs base=...; pass shared='average' to share the experts' average"
        raise ValueError(msg)
    num = len(experts)
    if router == "switch" and top_k != 1:
        msg = f"router='switch' routes to exactly one expert: top_k must be 1, got {top_k!r}"
        raise ValueError(msg)
    if isinstance(top_k, bool) or not isinstance(top_k, int) or not 1 <= top_k <= num:
        msg = f"top_k must be an int in [1, {num}] (the number of experts), got {top_k!r}"
        raise ValueError(msg)
    hidden = tuple(range(n_layers - 1))
    layers = hidden if moe_layers is None else tuple(sorted(set(int(li) for li in moe_layers)))
    if not layers or any(li not in hidden for li in layers):
        msg = f"moe_layers must be a non-empty subset of the hidden layers {list(hidden)}, got {moe_layers!r}"
        raise ValueError(msg)
    dense = base if shared == "base" else average(list(experts))
    if gate == "hidden":
        if examples is None or len(examples) != num:
            msg = f"gate='hidden' needs examples: one input batch per expert ({num}), got " + (
                "None" if examples is None else f"{len(examples)}")
            raise ValueError(msg)
        routers = hidden_prototypes(dense, examples, layers=layers, negative=negative, activation=activation)
    else:
        if key is None:
            msg = "gate='random' needs key=jax.random.key(seed)"
            raise ValueError(msg)
        routers = {}
        for li in layers:
            d_in = jnp.shape(experts[0]["layers"][str(li)]["kernel"])[0]
            routers[str(li)] = jax.random.normal(jax.random.fold_in(key, li), (d_in, num), jnp.float32)
    out_layers: dict[str, Any] = {}
    for i in range(n_layers):
        name = str(i)
        if i in layers:
            out_layers[name] = {
                "experts": {
                    "kernel": jnp.stack([p["layers"][name]["kernel"] for p in experts]),
                    "bias": jnp.stack([p["layers"][name]["bias"] for p in experts]),
                },
                "router": {"kernel": routers[name].astype(jnp.result_type(experts[0]["layers"][name]["kernel"]))},
            }
        else:
            out_layers[name] = dict(dense["layers"][name])
    model = MoEModel(n_layers, layers, num, top_k, router, activation)
    return MoEResult(params={"layers": out_layers}, apply_fn=model, gate=gate, shared=shared)


def load_balancing_loss(apply_fn: MoEModel, params: Params, x: Array) -> Array:
    r"""Switch's auxiliary load-balancing loss, summed over the MoE layers (not multiplied by α).

    Per layer :math:`E \sum_{j<k} \sum_i f_{ji} P_i`, :math:`f_{ji}` the fraction of the ``T``
    examples whose ``j``-th choice is expert ``i``, :math:`P_i` the mean router probability of expert
    ``i`` (Fedus et al., arXiv 2101.03961, Eq. 4-6; ``k = 1`` is the paper's). It is ``1`` under
    perfectly uniform routing and gradients reach the router only through :math:`P_i`.

    Args:
        apply_fn: a :class:`MoEModel`.
        params: its params.
        x: a batch of inputs ``(T, ...)``.
    """
    if not isinstance(apply_fn, MoEModel):
        msg = f"load_balancing_loss needs the MoEModel apply_fn of moe_from_mlps, got {type(apply_fn).__name__}"
        raise TypeError(msg)
    total = jnp.zeros((), jnp.float32)
    for r in apply_fn.routing(params, x).values():
        f = jnp.mean(jax.nn.one_hot(r.experts, apply_fn.num_experts, dtype=r.probs.dtype), axis=0)  # (k, E)
        p = jnp.mean(r.probs, axis=0)  # (E,)
        total = total + apply_fn.num_experts * jnp.sum(f * p[None, :])
    return total

