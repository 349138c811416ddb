"""Tests for landscape.data: real and synthetic datasets, splits, task constructors, registry."""

import json
import random
import socket
import urllib.request

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from sklearn.datasets import load_digits

from landscape import data


@pytest.fixture(scope="module")
def digits_ds():
    return data.digits()


def _rows(x):
    """Rows of ``x`` as a sorted list of byte strings (a multiset of examples)."""
    a = np.asarray(x).reshape(np.shape(x)[0], -1)
    return sorted(r.tobytes() for r in a)


# ------------------------------------------------------------------------------------- digits


def test_digits_shapes_and_dtypes(digits_ds):
    ds = digits_ds
    assert ds.x_train.shape == (1437, 64) and ds.x_test.shape == (360, 64)
    assert ds.y_train.shape == (1437,) and ds.y_test.shape == (360,)
    assert ds.x_train.dtype == jnp.float32 and ds.y_train.dtype == jnp.int32
    assert ds.num_classes == 10 and ds.input_shape == (64,) and ds.name == "digits"
    x, y = ds.train
    assert x is ds.x_train and y is ds.y_train
    img = data.digits(image=True)
    assert img.x_train.shape == (1437, 8, 8, 1) and img.input_shape == (8, 8, 1)
    np.testing.assert_array_equal(np.asarray(img.x_train).reshape(1437, 64), ds.x_train)


def test_digits_pixels_are_counts_over_16(digits_ds):
    x = np.concatenate([digits_ds.x_train, digits_ds.x_test])
    assert x.min() == 0.0 and x.max() == 1.0
    np.testing.assert_array_equal(x * 16, np.round(x * 16))


def test_digits_split_is_a_partition_of_all_1797(digits_ds):
    x_all, y_all = load_digits(return_X_y=True)
    ref = _rows(np.concatenate([x_all / 16.0, y_all[:, None]], axis=1).astype(np.float32))
    got = _rows(
        np.concatenate(
            [
                np.concatenate([digits_ds.x_train, np.asarray(digits_ds.y_train, np.float32)[:, None]], 1),
                np.concatenate([digits_ds.x_test, np.asarray(digits_ds.y_test, np.float32)[:, None]], 1),
            ]
        )
    )
    # train + test is exactly the full dataset as a multiset: nothing shared, nothing lost.
    assert got == ref


def test_digits_split_deterministic_and_seed_dependent(digits_ds):
    again = data.digits()
    np.testing.assert_array_equal(again.x_train, digits_ds.x_train)
    np.testing.assert_array_equal(again.y_test, digits_ds.y_test)
    other = data.digits(split_seed=1)
    assert _rows(other.x_test) != _rows(digits_ds.x_test)


def test_digits_split_is_stratified(digits_ds):
    _, y_all = load_digits(return_X_y=True)
    total = np.bincount(y_all, minlength=10)
    test_counts = np.bincount(np.asarray(digits_ds.y_test), minlength=10)
    assert np.all(np.abs(test_counts - 0.2 * total) <= 1)


def test_digits_standardize_uses_train_statistics():
    raw = data.digits()
    std = data.digits(standardize=True)
    x = np.asarray(std.x_train, np.float64)
    varying = np.asarray(raw.x_train).std(0) > 0
    np.testing.assert_allclose(x.mean(0), 0.0, atol=1e-5)
    np.testing.assert_allclose(x.std(0)[varying], 1.0, atol=1e-4)
    mu, sd = np.asarray(raw.x_train).mean(0), np.asarray(raw.x_train).std(0)
    sd = np.where(sd > 0, sd, 1.0)
    np.testing.assert_allclose(std.x_test, (np.asarray(raw.x_test) - mu) / sd, rtol=1e-5, atol=1e-5)


def test_digits_full_is_all_examples_in_order():
    full = data.digits_full()
    x_all, y_all = load_digits(return_X_y=True)
    assert full.x_train.shape == (1797, 64) and full.x_test.shape == (0, 64)
    np.testing.assert_array_equal(full.x_train, (x_all / 16.0).astype(np.float32))
    np.testing.assert_array_equal(full.y_train, y_all)
    assert full.to_dict()["num_test"] == 0


@pytest.mark.parametrize(
    "kwargs", [{"test_fraction": 1.0}, {"test_fraction": -0.1}, {"split_seed": -1}, {"split_seed": 1.5}]
)
def test_digits_rejects_bad_settings(kwargs):
    with pytest.raises(ValueError, match="test_fraction|split_seed"):
        data.digits(**kwargs)


# ------------------------------------------------------------------------------------ mnist1d


@pytest.fixture
def no_network(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("network access attempted")

    import requests

    monkeypatch.setattr(urllib.request, "urlopen", refuse)
    monkeypatch.setattr(requests, "get", refuse)
    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


def test_mnist1d_offline_shapes_and_determinism(no_network, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    np_state, py_state = np.random.get_state(), random.getstate()
    a = data.mnist1d(num_samples=200, seed=3)
    b = data.mnist1d(num_samples=200, seed=3)
    c = data.mnist1d(num_samples=200, seed=4)
    assert a.x_train.shape == (160, 40) and a.x_test.shape == (40, 40)
    assert a.num_classes == 10 and a.input_shape == (40,) and a.x_train.dtype == jnp.float32
    np.testing.assert_array_equal(a.x_train, b.x_train)
    np.testing.assert_array_equal(a.y_test, b.y_test)
    assert not np.array_equal(a.x_train, c.x_train)
    # balanced classes over the whole set, standardised inputs, nothing written to disk
    y = np.concatenate([a.y_train, a.y_test])
    np.testing.assert_array_equal(np.bincount(y, minlength=10), 20)
    x = np.concatenate([a.x_train, a.x_test])
    assert abs(x.mean()) < 1e-5 and abs(x.std() - 1) < 1e-4
    assert list(tmp_path.iterdir()) == []
    # the package seeds global generators; we restore them
    assert random.getstate() == py_state
    after = np.random.get_state()
    assert after[0] == np_state[0] and np.array_equal(after[1], np_state[1]) and after[2:] == np_state[2:]


def test_mnist1d_matches_package_generator():
    from mnist1d.data import get_dataset_args, make_dataset

    args = get_dataset_args()
    args.num_samples, args.seed = 100, 7
    ref = make_dataset(args)
    ds = data.mnist1d(num_samples=100, seed=7)
    np.testing.assert_array_equal(ds.x_train, ref["x"].astype(np.float32))
    np.testing.assert_array_equal(ds.y_test, ref["y_test"])


@pytest.mark.parametrize("kwargs", [{"num_samples": 15}, {"num_samples": 0}, {"seed": -1}, {"test_fraction": 0.0}])
def test_mnist1d_rejects_bad_settings(kwargs):
    with pytest.raises(ValueError):
        data.mnist1d(**kwargs)


# ---------------------------------------------------------------------------------- synthetic


def test_blobs_shapes_balance_and_spread():
    key = jax.random.key(0)
    ds = data.blobs(key, num_samples=600, num_classes=3, dim=4, std=0.5, test_fraction=0.25)
    assert ds.x_train.shape == (450, 4) and ds.x_test.shape == (150, 4) and ds.num_classes == 3
    y = np.concatenate([ds.y_train, ds.y_test])
    np.testing.assert_array_equal(np.bincount(y), 200)
    np.testing.assert_array_equal(np.bincount(np.asarray(ds.y_test)), 50)
    x = np.concatenate([ds.x_train, ds.x_test])
    for c in range(3):
        xc = x[y == c]
        # within-class spread is the requested std (chi-square: 200*4 draws -> ~2.5% relative error)
        assert abs((xc - xc.mean(0)).std() - 0.5) < 0.05
        assert np.all(np.abs(xc.mean(0)) <= 5.0 + 0.2)
    again = data.blobs(key, num_samples=600, num_classes=3, dim=4, std=0.5, test_fraction=0.25)
    np.testing.assert_array_equal(again.x_train, ds.x_train)
    other = data.blobs(jax.random.key(1), num_samples=600, num_classes=3, dim=4, std=0.5, test_fraction=0.25)
    assert not np.array_equal(other.x_train, ds.x_train)


def test_moons_lie_on_the_two_half_circles_without_noise():
    ds = data.moons(jax.random.key(0), num_samples=101, noise=0.0)
    x = np.concatenate([ds.x_train, ds.x_test]).astype(np.float64)
    y = np.concatenate([ds.y_train, ds.y_test])
    assert x.shape == (101, 2) and np.bincount(y).tolist() == [51, 50]
    outer, inner = x[y == 0], x[y == 1]
    np.testing.assert_allclose(np.hypot(outer[:, 0], outer[:, 1]), 1.0, atol=1e-6)
    assert np.all(outer[:, 1] >= -1e-6)
    np.testing.assert_allclose(np.hypot(inner[:, 0] - 1.0, inner[:, 1] - 0.5), 1.0, atol=1e-6)
    assert np.all(inner[:, 1] <= 0.5 + 1e-6)
    noisy = data.moons(jax.random.key(0), num_samples=2000, noise=0.1)
    xn = np.concatenate([noisy.x_train, noisy.x_test])
    yn = np.concatenate([noisy.y_train, noisy.y_test])
    r = np.hypot(xn[yn == 0, 0], xn[yn == 0, 1])
    assert 0.05 < r.std() < 0.15


@pytest.mark.parametrize(
    "call",
    [
        lambda k: data.blobs(k, num_samples=5, num_classes=3),
        lambda k: data.blobs(k, std=-1.0),
        lambda k: data.blobs(k, test_fraction=1.0),
        lambda k: data.moons(k, noise=-0.1),
        lambda k: data.moons(k, num_samples=2),
    ],
)
def test_synthetic_rejects_bad_settings(call):
    with pytest.raises(ValueError):
        call(jax.random.key(0))


# -------------------------------------------------------------------------------------- split


def test_split_is_a_stratified_partition():
    y = np.repeat(np.arange(4), [10, 20, 30, 40]).astype(np.int32)
    x = np.arange(100, dtype=np.float32)[:, None]
    (xk, yk), (xh, yh) = data.split(jax.random.key(0), x, y, 0.2)
    np.testing.assert_array_equal(np.bincount(np.asarray(yh)), [2, 4, 6, 8])
    ids = np.concatenate([xk[:, 0], xh[:, 0]]).astype(int)
    np.testing.assert_array_equal(np.sort(ids), np.arange(100))
    np.testing.assert_array_equal(y[np.asarray(xh[:, 0]).astype(int)], yh)
    (xk2, _), (xh2, _) = data.split(jax.random.key(0), x, y, 0.2)
    np.testing.assert_array_equal(xh, xh2)
    (_, _), (xh3, _) = data.split(jax.random.key(1), x, y, 0.2)
    assert not np.array_equal(np.sort(xh[:, 0]), np.sort(xh3[:, 0]))
    (_, _), (xu, _) = data.split(jax.random.key(0), x, y, 0.25, stratify=False)
    assert xu.shape == (25, 1)


@pytest.mark.parametrize("fraction", [0.0, 1.0, 1.5, -0.2, True])
def test_split_rejects_bad_fraction(fraction):
    with pytest.raises(ValueError, match="fraction"):
        data.split(jax.random.key(0), np.zeros((10, 1)), np.zeros(10, np.int32), fraction)


def test_split_rejects_mismatched_lengths_and_empty_parts():
    with pytest.raises(ValueError, match="leading example axis"):
        data.split(jax.random.key(0), np.zeros((10, 1)), np.zeros(9, np.int32), 0.5)
    with pytest.raises(ValueError, match="empty"):
        data.split(jax.random.key(0), np.zeros((3, 1)), np.arange(3), 0.1)


def test_with_validation_holds_out_part_of_train(digits_ds):
    ds = data.with_validation(jax.random.key(0), digits_ds, fraction=0.1)
    assert ds.has_val and not digits_ds.has_val
    assert ds.x_val.shape[0] + ds.x_train.shape[0] == digits_ds.x_train.shape[0]
    assert _rows(np.concatenate([ds.x_train, ds.x_val])) == _rows(digits_ds.x_train)
    np.testing.assert_array_equal(ds.x_test, digits_ds.x_test)
    summary = ds.to_dict()
    assert summary["num_val"] == ds.x_val.shape[0] and sum(summary["val_class_counts"]) == summary["num_val"]
    with pytest.raises(ValueError, match="already has a validation split"):
        data.with_validation(jax.random.key(1), ds)
    with pytest.raises(ValueError, match="no validation split"):
        _ = digits_ds.val


# -------------------------------------------------------------------------------------- tasks


def test_class_subset_keeps_exactly_the_requested_classes(digits_ds):
    sub = data.class_subset(digits_ds, [7, 2, 9])
    assert sub.num_classes == 3 and sub.name == "digits[7,2,9]"
    for part in ("train", "test"):
        y_old = np.asarray(getattr(digits_ds, f"y_{part}"))
        x_old = np.asarray(getattr(digits_ds, f"x_{part}"))
        y_new = np.asarray(getattr(sub, f"y_{part}"))
        x_new = np.asarray(getattr(sub, f"x_{part}"))
        keep = np.isin(y_old, [7, 2, 9])
        assert set(y_new.tolist()) == {0, 1, 2}
        np.testing.assert_array_equal(x_new, x_old[keep])
        np.testing.assert_array_equal(y_new, [{7: 0, 2: 1, 9: 2}[v] for v in y_old[keep]])
    same = data.class_subset(digits_ds, [7, 2, 9], relabel=False)
    assert same.num_classes == 10 and set(np.asarray(same.y_train).tolist()) == {2, 7, 9}


def test_class_subset_errors(digits_ds):
    with pytest.raises(ValueError, match=r"accepted classes are 0\.\.9"):
        data.class_subset(digits_ds, [0, 10])
    with pytest.raises(ValueError, match="at least one"):
        data.class_subset(digits_ds, [])
    with pytest.raises(ValueError, match="distinct"):
        data.class_subset(digits_ds, [1, 1])
    two = data.class_subset(digits_ds, [0, 1])
    with pytest.raises(ValueError, match="empty"):
        data.class_subset(two.replace(num_classes=3), [2])


def test_permuted_inputs_is_one_fixed_permutation(digits_ds):
    key = jax.random.key(3)
    p = data.permuted_inputs(key, digits_ds)
    perm = np.asarray(data.input_permutation(key, (64,)))
    np.testing.assert_array_equal(np.sort(perm), np.arange(64))
    assert not np.array_equal(perm, np.arange(64))
    for part in ("train", "test"):
        x_old = np.asarray(getattr(digits_ds, f"x_{part}"))
        x_new = np.asarray(getattr(p, f"x_{part}"))
        np.testing.assert_array_equal(np.sort(x_new, axis=1), np.sort(x_old, axis=1))
        np.testing.assert_array_equal(x_new, x_old[:, perm])
    np.testing.assert_array_equal(p.y_train, digits_ds.y_train)
    again = data.permuted_inputs(key, digits_ds)
    np.testing.assert_array_equal(again.x_test, p.x_test)


def test_permuted_inputs_keeps_channels_together():
    x = np.arange(3 * 4 * 4 * 2, dtype=np.float32).reshape(3, 4, 4, 2)
    ds = data.make_dataset((x, np.array([0, 1, 0])), (x[:1], np.array([1])), num_classes=2, name="img")
    key = jax.random.key(0)
    p = data.permuted_inputs(key, ds)
    perm = np.asarray(data.input_permutation(key, (4, 4, 2)))
    assert perm.shape == (16,)
    expect = x.reshape(3, 16, 2)[:, perm, :].reshape(3, 4, 4, 2)
    np.testing.assert_array_equal(p.x_train, expect)
    np.testing.assert_array_equal(p.x_test, expect[:1])


def test_relabelled_by_mapping_and_by_key(digits_ds):
    mapping = [9, 8, 7, 6, 5, 4, 3, 2, 1, 0]
    r = data.relabelled(digits_ds, mapping)
    np.testing.assert_array_equal(r.y_train, 9 - np.asarray(digits_ds.y_train))
    np.testing.assert_array_equal(r.x_train, digits_ds.x_train)
    d = data.relabelled(digits_ds, {0: 1, 1: 0})
    y = np.asarray(digits_ds.y_test)
    np.testing.assert_array_equal(d.y_test, np.where(y == 0, 1, np.where(y == 1, 0, y)))
    k = data.relabelled(jax.random.key(5), digits_ds)
    table = np.asarray(jax.random.permutation(jax.random.key(5), 10))
    np.testing.assert_array_equal(k.y_train, table[np.asarray(digits_ds.y_train)])
    counts_old = np.bincount(np.asarray(digits_ds.y_train), minlength=10)
    counts_new = np.bincount(np.asarray(k.y_train), minlength=10)
    np.testing.assert_array_equal(counts_new[table], counts_old)


@pytest.mark.parametrize("mapping", [[0, 0, 1, 2, 3, 4, 5, 6, 7, 8], [1, 0], {0: 1}, {0: 12}, "abc"])
def test_relabelled_rejects_non_permutations(digits_ds, mapping):
    with pytest.raises(ValueError, match="permutation"):
        data.relabelled(digits_ds, mapping)


# ---------------------------------------------------------------------------- dataset, registry


def test_dataset_is_a_pytree_and_summarises():
    ds = data.moons(jax.random.key(0), num_samples=40)
    leaves = jax.tree.leaves(ds)
    assert len(leaves) == 4
    doubled = jax.jit(lambda d: d.replace(x_train=2 * d.x_train))(ds)
    np.testing.assert_allclose(doubled.x_train, 2 * ds.x_train)
    assert doubled.name == "moons" and doubled.num_classes == 2
    summary = json.loads(json.dumps(ds.to_dict()))
    assert summary["num_train"] == 32 and summary["num_test"] == 8 and summary["input_shape"] == [2]
    assert sum(summary["train_class_counts"]) == 32


def test_make_dataset_checks_inputs():
    with pytest.raises(ValueError, match="lie in 0..1"):
        data.make_dataset((np.zeros((2, 3)), np.array([0, 2])), (np.zeros((0, 3)), np.zeros(0, int)), num_classes=2, name="t")
    with pytest.raises(ValueError, match="input shape"):
        data.make_dataset((np.zeros((2, 3)), np.array([0, 1])), (np.zeros((1, 4)), np.array([0])), num_classes=2, name="t")


def test_registry_load_and_errors():
    assert set(data.DATASETS) == {
        "digits", "mnist1d", "blobs", "moons",
        "mnist", "mnist_idx", "fashion_mnist", "cifar10", "cifar100", "arrays",
        "stdlib_text", "text_files",
    }
    a = data.load("moons", seed=2, num_samples=50)
    b = data.moons(jax.random.key(2), num_samples=50)
    np.testing.assert_array_equal(a.x_train, b.x_train)
    c = data.load("blobs", key=jax.random.key(1), num_samples=30, num_classes=2)
    assert c.num_classes == 2
    assert data.load("digits", test_fraction=0.5).x_test.shape[0] == 899
    with pytest.raises(ValueError, match=r"accepted names: \['arrays', 'blobs', 'cifar10', 'cifar100', 'digits', 'fashion_mnist', "):
        data.load("cifar")
    with pytest.raises(ValueError, match="accepted: .*test_fraction"):
        data.load("digits", batch_size=3)
    with pytest.raises(ValueError, match="either key= or seed="):
        data.load("moons", seed=1, key=jax.random.key(1))
