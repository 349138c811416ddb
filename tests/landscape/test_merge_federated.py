"""Federated loops against closed forms: FedAvg with one client and one round is local training; FedSGD is
full-batch gradient descent on the union; client splits are exact partitions; everything is keyed."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from landscape import Objective, data, merge
from landscape.train import Trainer

DS = data.blobs(jax.random.key(0), num_samples=150, num_classes=3, dim=4)
X, Y = DS.train
P0 = {"w": 0.1 * jax.random.normal(jax.random.key(1), (4, 3)), "b": jnp.zeros(3)}


def linear(p, x):
    return x @ p["w"] + p["b"]


@pytest.mark.parametrize("scheme", ["iid", "shards", "dirichlet"])
def test_splits_partition_the_data_and_are_keyed(scheme):
    s = merge.split_clients(jax.random.key(3), Y, 5, scheme=scheme, alpha=0.3, min_size=2)
    allidx = np.sort(np.concatenate(s.indices))
    np.testing.assert_array_equal(allidx, np.arange(Y.shape[0]))  # every example exactly once
    assert sum(s.counts) == Y.shape[0] and min(s.counts) >= 2
    cc = s.class_counts(Y, 3)
    np.testing.assert_array_equal(cc.sum(0), np.bincount(np.asarray(Y), minlength=3))
    again = merge.split_clients(jax.random.key(3), Y, 5, scheme=scheme, alpha=0.3, min_size=2)
    assert all(np.array_equal(a, b) for a, b in zip(s.indices, again.indices))
    other = merge.split_clients(jax.random.key(4), Y, 5, scheme=scheme, alpha=0.3, min_size=2)
    assert not all(np.array_equal(a, b) for a, b in zip(s.indices, other.indices))
    if scheme == "iid":
        assert max(s.counts) - min(s.counts) <= 1
    if scheme == "shards":  # 10 shards of 12: sorted by label, each shard holds at most 2 classes
        assert all(int((row > 0).sum()) <= 4 for row in cc)
        assert sorted(s.counts) == [24] * 5
    clients = s.take(X, Y)
    np.testing.assert_array_equal(clients[0][1], np.asarray(Y)[s.indices[0]])


def test_dirichlet_small_alpha_is_skewed():
    def top_share(alpha):  # mean share of each client's biggest class, over 8 keys
        counts = [merge.split_clients(jax.random.key(k), Y, 3, scheme="dirichlet", alpha=alpha).class_counts(Y, 3)
                  for k in range(8)]
        return np.mean([(c.max(1) / c.sum(1)).mean() for c in counts])

    assert top_share(0.05) > 0.75 > 0.45 > top_share(1000.0)


def test_fedavg_one_client_one_round_is_local_training():
    key = jax.random.key(6)
    opt = optax.sgd(0.2, momentum=0.9)
    res = merge.fedavg(key, linear, P0, [(X, Y)], rounds=1, local_epochs=2, batch_size=16, optimizer=opt,
                       test=DS.test)
    tr = Trainer(linear, X, Y, optimizer=opt, batch_size=16)
    local = tr.run(merge.client_key(key, 0, 0), tr.init(P0), epochs=2).params
    for k in P0:
        np.testing.assert_array_equal(np.asarray(res.params[k]), np.asarray(local[k]))
    assert res.sampled == ((0,),) and res.client_counts == (X.shape[0],)
    test = Objective(linear, *DS.test)
    want = [test.evaluate(P0)["accuracy"], test.evaluate(local)["accuracy"]]
    np.testing.assert_allclose(res.test_accuracy[[0, 1]], want)
    assert len(res.plot().data) == 2 and json.loads(json.dumps(res.to_dict()))["sampled"] == [[0]]


@jax.jit
def _gd_step(obj, params, lr):
    g = jax.grad(obj.loss)(params)
    return jax.tree.map(lambda p, gi: p - lr * gi, params, g)


def _gd(params, x, y, lr, steps):
    obj = Objective(linear, x, y)
    for _ in range(steps):
        params = _gd_step(obj, params, lr)
    return params


@pytest.mark.parametrize("scheme,weighting", [("iid", "uniform"), ("dirichlet", "samples")])
def test_fedsgd_is_full_batch_gradient_descent(scheme, weighting):
    n = 120  # iid: 4 equal shares of 30, where uniform weighting is also exact
    split = merge.split_clients(jax.random.key(7), Y[:n], 4 if scheme == "iid" else 3, scheme=scheme, alpha=0.5)
    res = merge.fedsgd(jax.random.key(8), linear, P0, split.take(X[:n], Y[:n]), rounds=3, learning_rate=0.5,
                       weighting=weighting)
    want = _gd(P0, X[:n], Y[:n], 0.5, 3)
    for k in P0:
        np.testing.assert_allclose(np.asarray(res.params[k]), np.asarray(want[k]), rtol=1e-5, atol=1e-6)
    assert np.all(np.isnan(res.test_loss))  # no test set given


def test_client_sampling_is_keyed_and_follows_the_rounds():
    clients = merge.split_clients(jax.random.key(9), Y, 3, scheme="shards").take(X, Y)
    opt = optax.sgd(0.1)
    kw = {"rounds": 2, "local_epochs": 1, "batch_size": 20, "optimizer": opt, "client_fraction": 0.5,
          "test": DS.test}
    a = merge.fedavg(jax.random.key(10), linear, P0, clients, **kw)
    assert all(len(s) == 1 for s in a.sampled)  # max(floor(0.5 * 3), 1)
    same = merge.fedsgd(jax.random.key(10), linear, P0, clients, rounds=6, learning_rate=0.1, client_fraction=0.5)
    other = merge.fedsgd(jax.random.key(11), linear, P0, clients, rounds=6, learning_rate=0.1, client_fraction=0.5)
    assert same.sampled[:2] == a.sampled and same.sampled != other.sampled  # sampling is keyed
    assert a.test_accuracy.shape == (3,) and a.to_dict()["rounds"] == [0, 1, 2]
    # by hand: each round trains the sampled client from the previous global model
    w = P0
    for t, (k,) in enumerate(a.sampled):
        tr = Trainer(linear, *clients[k], optimizer=opt, batch_size=20)
        w = tr.run(merge.client_key(jax.random.key(10), t, k), tr.init(w), epochs=1).params
    np.testing.assert_array_equal(np.asarray(a.params["w"]), np.asarray(w["w"]))
    np.testing.assert_allclose(a.test_accuracy[-1], Objective(linear, *DS.test).evaluate(w)["accuracy"])


def test_bad_input():
    class WithState:
        state = {"bn": {"mean": jnp.zeros(2)}}

        def __call__(self, p, x):
            return linear(p, x)

    with pytest.raises(ValueError, match="BatchNorm"):
        merge.fedsgd(jax.random.key(0), WithState(), P0, [(X, Y)], rounds=1, learning_rate=0.1)
    with pytest.raises(ValueError, match="weighting"):
        merge.fedsgd(jax.random.key(0), linear, P0, [(X, Y)], rounds=1, learning_rate=0.1, weighting="count")
    with pytest.raises(ValueError, match="client_fraction"):
        merge.fedsgd(jax.random.key(0), linear, P0, [(X, Y)], rounds=1, learning_rate=0.1, client_fraction=0.0)
    with pytest.raises(ValueError, match="clients\\[1\\]"):
        merge.fedsgd(jax.random.key(0), linear, P0, [(X, Y), (X, Y[:3])], rounds=1, learning_rate=0.1)
    with pytest.raises(ValueError, match="scheme"):
        merge.split_clients(jax.random.key(0), Y, 3, scheme="label")
    with pytest.raises(ValueError, match="Dirichlet"):
        merge.split_clients(jax.random.key(0), Y, 20, scheme="dirichlet", alpha=0.01, min_size=5, max_tries=3)
