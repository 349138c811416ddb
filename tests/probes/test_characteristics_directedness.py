"""Directedness: task-vector geometry, λ chosen on validation, closed-form helpers, bad input."""

import itertools
import json

import jax
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from landscape import data
from probes.characteristics import DirectednessResult, directedness
from probes.characteristics._directedness import effective_rank, select_by_validation, sign_conflict_rate

TINY = {"seeds_per_task": 2, "lams": (0.0, 0.5, 1.0), "mask_percents": (10, 100), "widths": (8,),
        "base_epochs": 2, "epochs": 2, "batch_size": 32}


@pytest.fixture(scope="module")
def tiny():
    ds = data.blobs(jax.random.key(0), num_samples=240, num_classes=4, dim=3)
    tasks = [data.class_subset(ds, [0, 1], relabel=False), data.class_subset(ds, [2, 3], relabel=False)]
    return ds, tasks, directedness(jax.random.key(1), ds, tasks, **TINY)


def test_shapes_and_cosine_matrix(tiny):
    _, _, r = tiny
    assert isinstance(r, DirectednessResult)
    n = 4
    assert r.cosine.shape == (n, n)
    np.testing.assert_allclose(r.cosine, r.cosine.T, atol=1e-12)
    np.testing.assert_allclose(np.diag(r.cosine), 1.0)
    assert np.all(np.abs(r.cosine) <= 1 + 1e-9)
    assert r.curves.shape == (2, 2, 2, 3, 2)
    # λ = 0 is the base for both signs
    for i, s in itertools.product(range(2), range(2)):
        np.testing.assert_allclose(r.curves[i, s, :, 0, :], np.broadcast_to(r.base_accuracy, (2, 2)), atol=1e-6)
    # the k = 100% mask keeps the whole task vector: the expert, all of its gain
    finite = np.isfinite(r.mask_gain[..., -1])
    np.testing.assert_allclose(r.mask_gain[..., -1][finite], 1.0, atol=1e-6)
    same, cross = r.same_task_cosine, r.cross_task_cosine
    assert np.isfinite(same[0]) and np.isfinite(cross[0])
    assert r.erank_all >= 1.0 and r.erank_all <= n + 1e-9
    assert 0.0 <= r.sign_conflicts.min() <= r.sign_conflicts.max() <= 1.0
    json.dumps(r.to_dict(), allow_nan=False)
    assert r.plot() is not None


def test_lambda_is_chosen_on_validation(tiny):
    _, _, r = tiny
    for m in range(len(r.methods)):
        want = np.argmax(r.merge_val[m].mean(-1), axis=1)
        np.testing.assert_array_equal(r.merge_choice[m], want)
        np.testing.assert_allclose(r.chosen_test[m], r.merge_test[m][np.arange(2), want])


def test_select_by_validation_ignores_test_when_they_disagree():
    # planted: validation prefers setting 0, test prefers setting 2
    val = np.array([[[0.9, 0.8], [0.5, 0.5], [0.1, 0.2]]])
    test = np.array([[[0.2, 0.1], [0.5, 0.5], [0.9, 0.95]]])
    idx, acc = select_by_validation(val, test)
    assert idx.tolist() == [0]
    np.testing.assert_allclose(acc, [[0.2, 0.1]])
    idx, _ = select_by_validation(test, val)
    assert idx.tolist() == [2]


def test_effective_rank_closed_forms():
    v = np.array([1.0, -2.0, 3.0, 0.5])
    assert effective_rank(np.stack([v, v, v])) == pytest.approx(1.0)
    assert effective_rank(np.stack([v, -2 * v])) == pytest.approx(1.0)
    assert effective_rank(3.0 * np.eye(4)) == pytest.approx(4.0)
    assert effective_rank(np.zeros((2, 3))) == 0.0
    # two orthogonal vectors with singular values 3 and 1: p = (3/4, 1/4)
    p = np.array([0.75, 0.25])
    assert effective_rank(np.array([[3.0, 0.0], [0.0, 1.0]])) == pytest.approx(np.exp(-(p * np.log(p)).sum()))


@settings(max_examples=25, deadline=None)
@given(st.lists(st.lists(st.sampled_from([-2.0, -1.0, 0.0, 1.0, 3.0]), min_size=6, max_size=6), min_size=2, max_size=4))
def test_sign_conflict_rate_brute_force(rows):
    v = np.asarray(rows)
    active = conflicts = 0
    for col in v.T:
        nz = [x for x in col if x != 0]
        if len(nz) >= 2:
            active += 1
            conflicts += len({np.sign(x) for x in nz}) > 1
    want = conflicts / active if active else 0.0
    assert sign_conflict_rate(v) == pytest.approx(want)


def test_bad_input(tiny):
    ds, tasks, _ = tiny
    with pytest.raises(ValueError, match="at least one task"):
        directedness(jax.random.key(0), ds, [], **TINY)
    with pytest.raises(ValueError, match="accepted"):
        directedness(jax.random.key(0), ds, tasks, methods=("task_arithmetic", "soup"))
    with pytest.raises(ValueError, match="seeds_per_task"):
        directedness(jax.random.key(0), ds, tasks, seeds_per_task=0)
    with pytest.raises(ValueError, match="mask_percents"):
        directedness(jax.random.key(0), ds, tasks, mask_percents=(0, 50))
    other = data.blobs(jax.random.key(0), num_samples=60, num_classes=3, dim=5)
    with pytest.raises(ValueError, match=r"tasks\[0\]"):
        directedness(jax.random.key(0), ds, [other])
    with pytest.raises(ValueError, match="non-empty"):
        effective_rank(np.zeros((0, 3)))
