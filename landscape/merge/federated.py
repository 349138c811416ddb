r"""Federated averaging as real loops: FedSGD and FedAvg (McMahan et al. 2017, arXiv 1602.05629).

``K`` clients hold their own data :math:`\mathcal{P}_k` (:math:`n_k` examples, :math:`n = \sum_k n_k`).
Each round ``t`` the server samples :math:`m = \max(\lfloor C K \rfloor, 1)` clients ``S_t`` at random
without replacement (``client_fraction = C``; the floor as in the common reference code), every sampled
client starts from the global model :math:`w_t` and trains locally, and the server averages:

.. math:: w_{t+1} = \sum_{k \in S_t} \frac{n_k}{\sum_{j \in S_t} n_j}\, w^k_{t+1}
          \quad (\text{weighting="samples"}), \qquad
          w_{t+1} = \frac{1}{|S_t|} \sum_{k \in S_t} w^k_{t+1} \quad (\text{"uniform"}).

* **FedAvg** (:func:`fedavg`, the paper's Algorithm 1): local training is ``local_epochs`` epochs of
  minibatch training with :class:`~landscape.train.Trainer` (batch ``B``, the client's optimizer, a
  fresh optimizer state every round). The data order of client ``k`` in round ``t`` is the key
  :func:`client_key` ``(key, t, k)``.
* **FedSGD** (:func:`fedsgd`): each sampled client takes one full-batch gradient step
  :math:`w^k = w_t - \eta \nabla F_k(w_t)` (``B = ∞``, ``E = 1``), so the average is
  :math:`w_t - \eta \sum_k \frac{n_k}{n} \nabla F_k(w_t)`: with every client sampled and sample
  weighting this is centralised full-batch gradient descent on the union of the data.

Client data come from :func:`split_clients`: IID, McMahan's shards (sort by label, cut into
``K * shards_per_client`` equal shards, deal them out at random) or a Dirichlet class split (Hsu et al.
2019, arXiv 1909.06335: for each class, proportions :math:`q \sim \mathrm{Dir}(\alpha \mathbf{1}_K)`).

Example:
    >>> import jax, jax.numpy as jnp, optax
    >>> from landscape import data, merge
    >>> ds = data.blobs(jax.random.key(0), num_samples=120, num_classes=3, dim=4)
    >>> split = merge.split_clients(jax.random.key(1), ds.y_train, 3, scheme="shards")
    >>> clients = split.take(*ds.train)
    >>> fn = lambda p, x: x @ p["w"] + p["b"]
    >>> p0 = {"w": jnp.zeros((4, 3)), "b": jnp.zeros(3)}
    >>> r = merge.fedavg(jax.random.key(2), fn, p0, clients, rounds=2, local_epochs=1, batch_size=8,
    ...                  optimizer=optax.sgd(0.1), test=ds.test)
    >>> r.test_accuracy.shape
    (3,)
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from landscape._checks import check_float, check_int
from landscape._types import ApplyFn, Array, Key, LossFn, Params
from landscape.data.dataset import Dataset, host_rng
from landscape.merge._inputs import check_choice
from landscape.merge.averaging import average
from landscape.objective import Objective
from landscape.train import Trainer

__all__ = [
    "SCHEMES",
    "WEIGHTINGS",
    "ClientSplit",
    "FederatedResult",
    "client_key",
    "fedavg",
    "fedsgd",
    "split_clients",
]

SCHEMES = ("iid", "shards", "dirichlet")
"""Client split schemes of :func:`split_clients`."""

WEIGHTINGS = ("samples", "uniform")
"""Server weightings: by client sample count (FedAvg) or uniform."""


# ----------------------------------------------------------------------------- client splits
@dataclasses.dataclass(frozen=True)
class ClientSplit:
    """A partition of ``n`` examples among clients.

    Attributes:
        indices: one sorted index array per client; together a partition of ``range(n)``.
        scheme: ``"iid"``, ``"shards"`` or ``"dirichlet"``.
        num_examples: ``n``.
    """

    indices: tuple[np.ndarray, ...]
    scheme: str
    num_examples: int

    @property
    def num_clients(self) -> int:
        return len(self.indices)

    @property
    def counts(self) -> tuple[int, ...]:
        """Examples per client ``n_k``."""
        return tuple(int(i.size) for i in self.indices)

    def class_counts(self, y: Any, num_classes: int) -> np.ndarray:
        """``(K, C)`` examples of each class at each client."""
        labels = np.asarray(y)
        return np.stack([np.bincount(labels[i], minlength=num_classes) for i in self.indices])

    def take(self, x: Any, y: Any) -> list[tuple[Array, Array]]:
        """The clients' data ``[(x_k, y_k), ...]`` (indexed on the host)."""
        xa, ya = np.asarray(x), np.asarray(y)
        if xa.shape[0] != self.num_examples or ya.shape[0] != self.num_examples:
            msg = (
                f"this split partitions {self.num_examples} examples, got x of shape {xa.shape} and y of shape "
                f"{ya.shape}"
            )
            raise ValueError(msg)
        return [(jnp.asarray(xa[i]), jnp.asarray(ya[i])) for i in self.indices]

    def to_dict(self) -> dict[str, Any]:
        return {"scheme": self.scheme, "num_examples": self.num_examples, "counts": list(self.counts)}


def split_clients(
    key: Key,
    y: Any,
    num_clients: int,
    *,
    scheme: str = "iid",
    alpha: float = 0.5,
    shards_per_client: int = 2,
    min_size: int = 1,
    max_tries: int = 1000,
) -> ClientSplit:
    r"""Partition examples among ``num_clients`` clients, IID or non-IID by class.

    * ``"iid"``: a random permutation cut into ``K`` near-equal parts (``np.array_split``).
    * ``"shards"`` (McMahan et al., Sec. 3): examples sorted by label (ties in random order), cut into
      ``K * shards_per_client`` near-equal shards, each client gets ``shards_per_client`` shards
      drawn at random without replacement (with 2 shards most clients see two classes).
    * ``"dirichlet"`` (Hsu et al. 2019, arXiv 1909.06335): for each class ``c``, proportions
      :math:`q_c \sim \mathrm{Dir}(\alpha \mathbf{1}_K)`; the class's examples (in random order) are cut
      at :math:`\lfloor n_c \cdot \mathrm{cumsum}(q_c) \rfloor`. Redrawn (all classes together) until
      every client has at least ``min_size`` examples, at most ``max_tries`` times. Small ``alpha``
      is more skewed; ``alpha -> ∞`` approaches IID class proportions.

    Randomness is NumPy's PCG64 seeded from ``key`` (:func:`landscape.data.host_rng`).

    Args:
        key: typed PRNG key; fixes the split.
        y: integer labels ``(n,)``, or a :class:`~landscape.data.Dataset` (its training labels).
        num_clients: ``K >= 1``.
        scheme: ``"iid"``, ``"shards"`` or ``"dirichlet"``.
        alpha: Dirichlet concentration, > 0.
        shards_per_client: shards per client (``"shards"``).
        min_size: least examples per client (every scheme checks it).
        max_tries: Dirichlet redraws before giving up.

    Raises:
        ValueError: a bad setting, fewer examples than ``K * min_size``, or no Dirichlet draw with
            every client at ``min_size`` within ``max_tries``.
    """
    check_choice("scheme", scheme, SCHEMES)
    labels = np.asarray(y.y_train if isinstance(y, Dataset) else y)
    if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
        msg = f"y must be integer labels of shape (n,), got shape {labels.shape} and dtype {labels.dtype}"
        raise ValueError(msg)
    k = check_int("num_clients", num_clients, low=1)
    min_size = check_int("min_size", min_size, low=0)
    n = labels.shape[0]
    if n < k * max(min_size, 1):
        msg = f"{n} examples cannot give {k} clients at least {max(min_size, 1)} each"
        raise ValueError(msg)
    rng = host_rng(key)
    if scheme == "iid":
        parts = np.array_split(rng.permutation(n), k)
    elif scheme == "shards":
        s = check_int("shards_per_client", shards_per_client, low=1)
        if n < k * s:
            msg = f"{n} examples cannot be cut into {k} * {s} = {k * s} non-empty shards"
            raise ValueError(msg)
        perm = rng.permutation(n)
        order = perm[np.argsort(labels[perm], kind="stable")]
        shards = np.array_split(order, k * s)
        deal = rng.permutation(k * s)
        parts = [np.concatenate([shards[j] for j in deal[c * s:(c + 1) * s]]) for c in range(k)]
    else:
        alpha = check_float("alpha", alpha, low=0.0, low_open=True)
        max_tries = check_int("max_tries", max_tries, low=1)
        classes = np.unique(labels)
        for _ in range(max_tries):
            buckets: list[list[np.ndarray]] = [[] for _ in range(k)]
            for c in classes:
                members = rng.permutation(np.flatnonzero(labels == c))
                q = rng.dirichlet(np.full(k, alpha))
                cuts = np.floor(np.cumsum(q)[:-1] * members.size).astype(int)
                for j, chunk in enumerate(np.split(members, cuts)):
                    buckets[j].append(chunk)
            parts = [np.concatenate(b) for b in buckets]
            if min(p.size for p in parts) >= max(min_size, 1):
                break
        else:
            msg = (
                f"no Dirichlet(alpha={alpha}) split of {n} examples gave all {k} clients at least "
                f"{max(min_size, 1)} examples in {max_tries} draws; raise alpha or lower num_clients / min_size"
            )
            raise ValueError(msg)
    parts = [np.sort(p.astype(np.int64)) for p in parts]
    small = [c for c, p in enumerate(parts) if p.size < max(min_size, 1)]
    if small:
        msg = f"clients {small} got fewer than {max(min_size, 1)} examples with scheme {scheme!r}"
        raise ValueError(msg)
    return ClientSplit(indices=tuple(parts), scheme=scheme, num_examples=n)


# ----------------------------------------------------------------------------- results
@dataclasses.dataclass(frozen=True)
class FederatedResult:
    """Outcome of :func:`fedavg` / :func:`fedsgd`.

    Attributes:
        params: the final global model.
        algorithm: ``"fedavg"`` or ``"fedsgd"``.
        test_loss: global test loss after each round, ``(rounds + 1,)``; entry 0 is the initial
            model (NaN throughout when no test set was given).
        test_accuracy: the same for accuracy.
        sampled: the clients sampled in each round (sorted).
        client_counts: ``n_k`` of every client.
    """

    params: Params
    algorithm: str
    test_loss: np.ndarray
    test_accuracy: np.ndarray
    sampled: tuple[tuple[int, ...], ...]
    client_counts: tuple[int, ...]

    @property
    def rounds(self) -> np.ndarray:
        """``0, 1, ..., R``: the round after which each test value was taken (0 = initial)."""
        return np.arange(self.test_loss.shape[0])

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe summary (no parameters; non-finite values as None)."""
        def clean(v: np.ndarray) -> list[float | None]:
            return [float(a) if np.isfinite(a) else None for a in v]

        return {
            "algorithm": self.algorithm,
            "rounds": self.rounds.tolist(),
            "test_loss": clean(self.test_loss),
            "test_accuracy": clean(self.test_accuracy),
            "sampled": [list(s) for s in self.sampled],
            "client_counts": list(self.client_counts),
        }

    def plot(self) -> Any:
        """Plotly figure: global test accuracy and loss per round."""
        import plotly.graph_objects as go

        fig = go.Figure()
        fig.add_scatter(x=self.rounds, y=self.test_accuracy, mode="lines+markers", name="test accuracy")
        fig.add_scatter(x=self.rounds, y=self.test_loss, mode="lines+markers", name="test loss", yaxis="y2")
        fig.update_layout(title=f"{self.algorithm}: global test metrics per round", xaxis_title="round",
                          yaxis_title="accuracy", yaxis2={"title": "loss", "overlaying": "y", "side": "right"})
        return fig


jax.tree_util.register_dataclass(
    FederatedResult,
    data_fields=["params", "test_loss", "test_accuracy"],
    meta_fields=["algorithm", "sampled", "client_counts"],
)


# ----------------------------------------------------------------------------- loops
def client_key(key: Key, round_index: int, client: int) -> Key:
    """Data-order key of ``client`` in round ``round_index`` (0-based): ``fold_in(fold_in(fold_in(key, 1), t), k)``."""
    return jax.random.fold_in(jax.random.fold_in(jax.random.fold_in(key, 1), round_index), client)


def _sample(key: Key, round_index: int, num_clients: int, fraction: float) -> tuple[int, ...]:
    m = max(int(fraction * num_clients), 1)
    if m >= num_clients:
        return tuple(range(num_clients))
    rng = host_rng(jax.random.fold_in(jax.random.fold_in(key, 0), round_index))
    return tuple(int(c) for c in np.sort(rng.choice(num_clients, size=m, replace=False)))


@jax.jit
def _evaluate(objective: Objective, params: Params) -> dict[str, Array]:
    return objective.evaluate(params)


def _test_objective(test: Any, apply_fn: ApplyFn, loss: str | LossFn) -> Objective | None:
    if test is None or isinstance(test, Objective):
        return test
    if isinstance(test, (tuple, list)) and len(test) == 2:
        return Objective(apply_fn, test[0], test[1], loss=loss)
    msg = f"test must be an Objective, an (x, y) pair or None, got {type(test).__name__}"
    raise ValueError(msg)


def _check_clients(clients: Any) -> list[tuple[Array, Array]]:
    if not isinstance(clients, (list, tuple)) or not clients:
        msg = "clients must be a non-empty list of (x, y) pairs (ClientSplit.take gives one)"
        raise ValueError(msg)
    out = []
    for k, c in enumerate(clients):
        if not isinstance(c, (tuple, list)) or len(c) != 2:
            msg = f"clients[{k}] must be an (x, y) pair, got {type(c).__name__}"
            raise ValueError(msg)
        x, y = jnp.asarray(c[0]), jnp.asarray(c[1])
        if x.ndim < 1 or y.ndim < 1 or x.shape[0] != y.shape[0] or x.shape[0] == 0:
            msg = f"clients[{k}]: x and y need a shared, non-empty leading axis, got shapes {x.shape} and {y.shape}"
            raise ValueError(msg)
        out.append((x, y))
    return out


def _check_stateless(apply_fn: ApplyFn) -> None:
    state = getattr(apply_fn, "state", None)
    if state and jax.tree.leaves(state):
        msg = (
            "the federated loops average parameters only; this apply_fn carries BatchNorm running statistics "
            "(apply_fn.state), whose averaging is not implemented: use a model without BatchNorm (norm='layer')"
        )
        raise ValueError(msg)


def _run_rounds(
    key: Key, algorithm: str, params: Params, clients: list[tuple[Array, Array]], local: Any, *, rounds: int,
    fraction: float, weighting: str, test: Objective | None,
) -> FederatedResult:
    counts = tuple(int(x.shape[0]) for x, _ in clients)
    nan = {"loss": np.nan, "accuracy": np.nan}
    evals = [_evaluate(test, params) if test is not None else nan]
    sampled = []
    for t in range(rounds):
        chosen = _sample(key, t, len(clients), fraction)
        updates = [local(t, k, params) for k in chosen]
        w = [counts[k] for k in chosen] if weighting == "samples" else None
        params = average(updates, weights=w)
        sampled.append(chosen)
        evals.append(_evaluate(test, params) if test is not None else nan)
    return FederatedResult(
        params=params,
        algorithm=algorithm,
        test_loss=np.asarray([float(e["loss"]) for e in evals]),
        test_accuracy=np.asarray([float(e["accuracy"]) for e in evals]),
        sampled=tuple(sampled),
        client_counts=counts,
    )


def _common_checks(rounds: int, client_fraction: float, weighting: str) -> tuple[int, float]:
    rounds = check_int("rounds", rounds, low=1)
    fraction = check_float("client_fraction", client_fraction, low=0.0, high=1.0, low_open=True)
    check_choice("weighting", weighting, WEIGHTINGS)
    return rounds, fraction


def fedavg(
    key: Key,
    apply_fn: ApplyFn,
    params: Params,
    clients: Sequence[tuple[Array, Array]],
    *,
    rounds: int,
    local_epochs: int = 1,
    batch_size: int | None = 10,
    optimizer: optax.GradientTransformation | None = None,
    client_fraction: float = 1.0,
    weighting: str = "samples",
    test: Objective | tuple[Array, Array] | None = None,
    loss: str | LossFn = "cross_entropy",
) -> FederatedResult:
    """FedAvg (McMahan et al. 2017, arXiv 1602.05629, Algorithm 1) as a loop over rounds.

    Every round: sample ``max(floor(C K), 1)`` clients (key ``fold_in(fold_in(key, 0), t)``), train
    each from the global params for ``local_epochs`` epochs with a :class:`~landscape.train.Trainer`
    (``batch_size``; ``None`` or a size above the client's ``n_k`` is the client's full data, the
    paper's ``B = ∞``; the last partial batch of an epoch is dropped, as the Trainer does; a fresh
    optimizer state each round; data order :func:`client_key`), then average weighted by ``n_k``
    (``weighting="samples"``) or uniformly. One Trainer (one compilation) per client.

    Args:
        key: PRNG key for client sampling and local data order.
        apply_fn: ``apply_fn(params, x) -> logits`` (no BatchNorm state).
        params: the initial global model.
        clients: one ``(x_k, y_k)`` per client (:meth:`ClientSplit.take`).
        rounds: communication rounds ``R``.
        local_epochs: ``E``.
        batch_size: local minibatch size ``B``.
        optimizer: the clients' optax optimizer (default ``optax.sgd(0.1)``).
        client_fraction: ``C`` in ``(0, 1]``.
        weighting: ``"samples"`` or ``"uniform"``.
        test: the global test set (an Objective or ``(x, y)``) evaluated after every round.
        loss: training loss (``"cross_entropy"``, ``"mse"`` or a callable).

    Returns:
        :class:`FederatedResult`.
    """
    rounds, fraction = _common_checks(rounds, client_fraction, weighting)
    epochs = check_int("local_epochs", local_epochs, low=1)
    data = _check_clients(clients)
    _check_stateless(apply_fn)
    if batch_size is not None:
        check_int("batch_size", batch_size, low=1)
    opt = optax.sgd(0.1) if optimizer is None else optimizer
    trainers: dict[int, Trainer] = {}

    def local(t: int, k: int, global_params: Params) -> Params:
        if k not in trainers:
            x, y = data[k]
            bs = x.shape[0] if batch_size is None else min(batch_size, int(x.shape[0]))
            trainers[k] = Trainer(apply_fn, x, y, optimizer=opt, batch_size=bs, loss=loss)
        tr = trainers[k]
        return tr.run(client_key(key, t, k), tr.init(global_params), epochs=epochs).params

    return _run_rounds(key, "fedavg", params, data, local, rounds=rounds, fraction=fraction, weighting=weighting,
                       test=_test_objective(test, apply_fn, loss))


@jax.jit
def _gradient_step(objective: Objective, params: Params, lr: Array) -> Params:
    grads = jax.grad(objective.loss)(params)
    return jax.tree.map(lambda p, g: (p - lr * g).astype(p.dtype), params, grads)


def fedsgd(
    key: Key,
    apply_fn: ApplyFn,
    params: Params,
    clients: Sequence[tuple[Array, Array]],
    *,
    rounds: int,
    learning_rate: float,
    client_fraction: float = 1.0,
    weighting: str = "samples",
    test: Objective | tuple[Array, Array] | None = None,
    loss: str | LossFn = "cross_entropy",
) -> FederatedResult:
    r"""FedSGD (McMahan et al. 2017, arXiv 1602.05629, Sec. 2): one local full-batch gradient step per round.

    Each sampled client computes :math:`w^k = w_t - \eta \nabla F_k(w_t)` with :math:`F_k` the mean
    loss over its whole data (:meth:`Objective.loss`); the server averages the :math:`w^k` weighted by
    :math:`n_k` — the same as applying the weighted average of the gradients. With all clients and
    sample weighting it is full-batch gradient descent on the union of the clients' data.

    Args:
        key: PRNG key for client sampling.
        apply_fn, params, clients, rounds, client_fraction, weighting, test, loss: as in :func:`fedavg`.
        learning_rate: :math:`\eta > 0`.

    Returns:
        :class:`FederatedResult`.
    """
    rounds, fraction = _common_checks(rounds, client_fraction, weighting)
    lr = check_float("learning_rate", learning_rate, low=0.0, low_open=True)
    data = _check_clients(clients)
    _check_stateless(apply_fn)
    objectives = [Objective(apply_fn, x, y, loss=loss) for x, y in data]
    lr_arr = jnp.asarray(lr, jnp.float32)

    def local(t: int, k: int, global_params: Params) -> Params:
        return _gradient_step(objectives[k], global_params, lr_arr)

    return _run_rounds(key, "fedsgd", params, data, local, rounds=rounds, fraction=fraction, weighting=weighting,
                       test=_test_objective(test, apply_fn, loss))
