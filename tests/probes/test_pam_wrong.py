"""The PAM check (Tatro et al. 2020, arXiv 2009.02439) tells a wrong alignment from the right one.

B is A with its hidden units permuted, so the right alignment makes the curve A -> P(B) a curve from
A to A. Starting instead from that alignment with two hidden units swapped (P(B) is then A with two
units swapped: the same function, a different point), the check must move the
relaxed permutation back to the right vertex (not locally optimal), while the right alignment, under
the same settings and key, stays put.
"""

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from landscape import Objective, align, models
from probes.pam import pam_check


def test_wrong_permutation_is_not_locally_optimal():
    apply_fn, a, _ = models.functional(models.MLP(4, (3, 3), rngs=nnx.Rngs(0)))
    x = jax.random.normal(jax.random.key(1), (96, 4))
    y = jnp.argmax(apply_fn(a, x), axis=-1)  # A classifies its own labels perfectly
    planted = align.random_permutation(jax.random.key(2), apply_fn.spec, a)
    b = align.apply(apply_fn.spec, planted, a)
    obj = Objective(apply_fn, x, y, batch_size=32)
    right = align.invert(planted)
    (name,) = apply_fn.spec.names
    swapped = np.asarray(right[name]).copy()
    swapped[[0, 1]] = swapped[[1, 0]]
    wrong = {name: jnp.asarray(swapped)}
    kw = {"outer": 1, "inner_perm": 20, "inner_phi": 10, "batch_size": 32, "num_eval": 5, "perm_learning_rate": 10.0}

    bad = pam_check(jax.random.key(0), obj, a, b, wrong, **kw)
    assert not bad.locally_optimal
    assert bad.changed_fraction[name] > 0
    np.testing.assert_array_equal(bad.rounded[name], right[name])  # it finds the right alignment
    # P(B) is A up to a permutation either way (same function), but with the wrong one the curve
    # between them is worse than with the rounded (right) one
    assert float(np.mean(bad.before.loss)) > float(np.mean(bad.after.loss))
    assert float(np.min(bad.before.accuracy)) < float(np.min(bad.after.accuracy))
    np.testing.assert_allclose(np.asarray(bad.after.accuracy)[[0, -1]], 1.0)

    good = pam_check(jax.random.key(0), obj, a, b, right, **kw)
    assert good.locally_optimal
    np.testing.assert_array_equal(good.rounded[name], right[name])
