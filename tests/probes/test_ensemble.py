"""Tests for probes.ensemble against a direct numpy computation."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from landscape import Objective, tree
from probes.ensemble import ensemble


def apply_linear(params, x):
    return x @ params["w"] + params["b"]


def members_and_objective(num=4, n=30, c=5, batch_size=7):
    kx, ky, km = jax.random.split(jax.random.key(0), 3)
    x = jax.random.normal(kx, (n, 6))
    y = jax.random.randint(ky, (n,), 0, c)
    members = [
        {"w": 1.5 * jax.random.normal(k, (6, c)), "b": 0.2 * jax.random.normal(jax.random.fold_in(k, 1), (c,))}
        for k in jax.random.split(km, num)
    ]
    return Objective(apply_linear, x, y, batch_size=batch_size), members


def numpy_reference(obj, members):
    x, y = np.asarray(obj.x, np.float64), np.asarray(obj.y)
    logits = np.stack([x @ np.asarray(m["w"], np.float64) + np.asarray(m["b"], np.float64) for m in members])
    z = logits - logits.max(axis=-1, keepdims=True)
    probs = np.exp(z) / np.exp(z).sum(axis=-1, keepdims=True)
    n = len(y)
    member_nll = -np.log(probs[:, np.arange(n), y]).mean(axis=1)
    preds = probs.argmax(axis=-1)
    member_acc = (preds == y).mean(axis=1)
    mean_p = probs.mean(axis=0)
    ens_nll = -np.log(mean_p[np.arange(n), y]).mean()
    ens_acc = (mean_p.argmax(axis=-1) == y).mean()
    m = len(members)
    dis = np.array([[np.mean(preds[i] != preds[j]) for j in range(m)] for i in range(m)])
    pairs = [dis[i, j] for i in range(m) for j in range(i + 1, m)]
    return ens_acc, ens_nll, member_acc, member_nll, dis, np.mean(pairs)


def test_ensemble_matches_numpy():
    obj, members = members_and_objective()
    res = ensemble(obj, members)
    ens_acc, ens_nll, member_acc, member_nll, dis, mean_dis = numpy_reference(obj, members)
    np.testing.assert_allclose(res.accuracy, ens_acc)
    np.testing.assert_allclose(res.nll, ens_nll, rtol=1e-5)
    np.testing.assert_allclose(res.member_accuracy, member_acc)
    np.testing.assert_allclose(res.member_nll, member_nll, rtol=1e-5)
    np.testing.assert_allclose(res.disagreement, dis)
    np.testing.assert_allclose(res.mean_disagreement, mean_dis)
    np.testing.assert_allclose(res.gain, ens_acc - member_acc.mean(), atol=1e-6)
    np.testing.assert_allclose(res.nll_gain, member_nll.mean() - ens_nll, rtol=1e-4)
    assert res.mean_disagreement > 0
    # stacked members and one-hot targets give the same numbers
    onehot = obj.replace(y=jax.nn.one_hot(obj.y, 5))
    res2 = ensemble(onehot, tree.stack(members))
    np.testing.assert_allclose(res2.nll, res.nll, rtol=1e-6)
    np.testing.assert_allclose(res2.disagreement, res.disagreement)
    d = json.loads(json.dumps(res.to_dict(), allow_nan=False))
    assert d["num_members"] == 4 and len(d["disagreement"]) == 4
    assert [t.type for t in res.plot().data] == ["bar", "bar", "heatmap"]


def test_identical_members_and_single_member():
    obj, members = members_and_objective(num=1)
    res = ensemble(obj, [members[0]] * 3)
    np.testing.assert_allclose(res.accuracy, res.member_accuracy[0])
    np.testing.assert_allclose(res.nll, res.member_nll[0], rtol=1e-6)
    np.testing.assert_allclose(res.gain, 0.0, atol=1e-7)
    np.testing.assert_array_equal(res.disagreement, 0.0)
    one = ensemble(obj, members)
    assert one.num_members == 1 and np.isnan(one.mean_disagreement)
    assert one.to_dict()["mean_disagreement"] is None


def test_ensemble_bad_input():
    obj, members = members_and_objective()
    with pytest.raises(ValueError, match="at least one"):
        ensemble(obj, [])
    bad = {"w": members[1]["w"], "b": jnp.zeros(3)}
    with pytest.raises(ValueError, match="'b'"):
        ensemble(obj, [members[0], bad])
    with pytest.raises(ValueError, match="leading member axis"):
        ensemble(obj, {"w": jnp.zeros((2, 6, 5)), "b": jnp.zeros((3, 5))})
    regression = Objective(lambda p, x: (x @ p["w"]).sum(-1), obj.x, obj.y)
    with pytest.raises(ValueError, match="classes"):
        ensemble(regression, members)
